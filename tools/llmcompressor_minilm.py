"""A MiniLM folder written by llm-compressor, loaded by ``viva_tensor.models.minilm.load(folder)`` (skips when absent).

Two steps, in two environments (llm-compressor pins its own transformers and torch; viva_tensor needs neither):

    # 1. in a venv with llmcompressor (e.g. pip install torch llmcompressor==0.14.0.1): write the folder, and the
    #    embeddings that transformers + compressed-tensors compute from it (the oracle)
    python tools/llmcompressor_minilm.py make --model PATH/TO/all-MiniLM-L6-v2 --out /tmp/minilm-w4a16
    # 2. in viva_tensor's venv: load the folder, compare the embeddings with the float model's and the oracle's
    python tools/llmcompressor_minilm.py check --out /tmp/minilm-w4a16

``make`` runs ``oneshot(model, QuantizationModifier(targets="Linear", scheme=SCHEME))`` (data-free, weight-only)
and ``save_pretrained(save_compressed=True)``: compressed-tensors' ``pack-quantized`` int4 with group scales. The
sentences are ``viva_tensor.cli.report.FIDELITY_SENTENCES`` (``make`` reads them from ``sentences.json`` that
``check --write-sentences`` writes, so that it needs no viva_tensor).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

import numpy as np


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def make(model: str, out: str, scheme: str) -> None:
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModel, AutoTokenizer

    m = AutoModel.from_pretrained(model, torch_dtype=torch.float32)
    oneshot(model=m, recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=["pooler.dense"]))
    m.save_pretrained(out, save_compressed=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(pathlib.Path(model) / f, pathlib.Path(out) / f)
    sentences = json.loads((pathlib.Path(out) / "sentences.json").read_text()) if (
        pathlib.Path(out) / "sentences.json").exists() else None
    if sentences:
        tok = AutoTokenizer.from_pretrained(model)
        batch = tok(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
        q = AutoModel.from_pretrained(out, torch_dtype=torch.float32).eval()  # compressed-tensors decompresses
        with torch.no_grad():
            h = q(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        np.save(pathlib.Path(out) / "oracle_embeddings.npy", ((h * mask).sum(1) / mask.sum(1)).numpy())
    print(f"wrote {out}")


def check(out: str) -> int:
    folder = pathlib.Path(out)
    if not (folder / "config.json").exists():
        print(f"skipped: no llm-compressor folder at {folder} (run `make` first)")
        return 0
    from viva_tensor.cli.report import FIDELITY_SENTENCES
    from viva_tensor.models import minilm

    sentences = list(FIDELITY_SENTENCES)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    reference = np.asarray(minilm.encode(minilm.load(), sentences))
    ours = np.asarray(minilm.encode(minilm.load(folder), sentences))
    c = _cos(ours, reference)
    print(f"{folder}: format {config.get('format')}, {len(sentences)} sentences")
    print(f"viva_tensor minilm.load(folder) vs the float32 model: cosine mean {c.mean():.5f} min {c.min():.5f}")
    oracle = folder / "oracle_embeddings.npy"
    if oracle.exists():
        t = _cos(np.load(oracle), reference)
        same = _cos(ours, np.load(oracle))
        print(f"transformers + compressed-tensors vs the float32 model: cosine mean {t.mean():.5f} min {t.min():.5f}")
        print(f"viva_tensor vs transformers on the same folder: cosine min {same.min():.7f}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["make", "check"])
    p.add_argument("--model", help="the float all-MiniLM-L6-v2 folder (make)")
    p.add_argument("--out", default="/tmp/minilm-w4a16")
    p.add_argument("--scheme", default="W4A16")
    p.add_argument("--write-sentences", action="store_true", help="(check) write OUT/sentences.json for make")
    args = p.parse_args()
    if args.step == "make":
        make(args.model, args.out, args.scheme)
        return 0
    if args.write_sentences:
        from viva_tensor.cli.report import FIDELITY_SENTENCES

        pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(args.out) / "sentences.json").write_text(json.dumps(list(FIDELITY_SENTENCES)))
        return 0
    return check(args.out)


if __name__ == "__main__":
    sys.exit(main())
