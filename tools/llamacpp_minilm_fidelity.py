"""MiniLM from a llama.cpp-made GGUF: viva_tensor's embeddings next to llama.cpp's own, on the same file.

For each GGUF (default: Q4_K_M, Q8_0 and the F32 source, the quantized ones made here with ``llama-quantize``),
the cosine of each sentence embedding of ``viva_tensor.cli.report.FIDELITY_SENTENCES`` to the float32 model's
(``minilm.load()``, the bundled safetensors), for

- viva_tensor: ``minilm.load(path.gguf)`` then ``minilm.encode`` (every tensor decoded from the file's blocks);
- llama.cpp: ``llama-embedding -m path.gguf --pooling mean`` on the same sentences.

Skips cleanly (exit 0, a message) when llama.cpp's binaries or the F32 GGUF are absent. Build them as
tools/make_llamacpp_fixture.py says, then:

    python tools/llamacpp_minilm_fidelity.py --f32 minilm-f32.gguf --bin llama.cpp/build/bin [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

SEP = "<#sep#>"


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def llama_embeddings(binary: str, gguf: str, sentences: list[str]) -> np.ndarray:
    cmd = [binary, "-m", gguf, "--pooling", "mean", "--embd-normalize", "2", "--embd-output-format", "array",
           "--embd-separator", SEP, "-p", SEP.join(sentences), "-c", "512", "-b", "4096", "-ub", "512", "-t", "2"]
    run = subprocess.run(cmd, check=True, capture_output=True, text=True)
    out = run.stdout
    if "[[" not in out or "]]" not in out:
        raise RuntimeError(f"llama-embedding gave no embeddings for {gguf}: {out[-300:]!r} {run.stderr[-600:]}")
    return np.asarray(json.loads(out[out.index("[["):out.rindex("]]") + 2]), np.float64)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--f32", default="/work/llamacpp/minilm-f32.gguf", help="MiniLM F32 GGUF (convert_hf_to_gguf.py)")
    p.add_argument("--bin", default="/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin",
                   help="folder with llama-quantize and llama-embedding")
    p.add_argument("--types", nargs="*", default=["Q4_K_M", "Q8_0"])
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = p.parse_args()
    quantize, embedding = (pathlib.Path(args.bin) / n for n in ("llama-quantize", "llama-embedding"))
    missing = [str(f) for f in (quantize, embedding, pathlib.Path(args.f32)) if not f.exists()]
    if missing:
        print(f"skipped: not found: {', '.join(missing)} (see tools/make_llamacpp_fixture.py)")
        return 0

    from viva_tensor.cli.report import FIDELITY_SENTENCES
    from viva_tensor.models import minilm

    sentences = list(FIDELITY_SENTENCES)
    reference = np.asarray(minilm.encode(minilm.load(), sentences))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = [("F32", args.f32)]
        for t in args.types:
            path = str(pathlib.Path(tmp) / f"minilm-{t}.gguf")
            subprocess.run([str(quantize), args.f32, path, t], check=True, capture_output=True)
            files.append((t, path))
        for name, path in files:
            ours = _cosines(np.asarray(minilm.encode(minilm.load(path), sentences)), reference)
            theirs = _cosines(llama_embeddings(str(embedding), path, sentences), reference)
            size = pathlib.Path(path).stat().st_size
            rows.append({"file": name, "bytes": size, "viva_mean": ours.mean(), "viva_min": ours.min(),
                         "llamacpp_mean": theirs.mean(), "llamacpp_min": theirs.min()})
    print(f"MiniLM sentence embeddings, cosine to the float32 model, {len(sentences)} sentences")
    print(f"{'file':8s} {'bytes':>11s} {'viva mean':>10s} {'viva min':>9s} {'llama mean':>11s} {'llama min':>10s}")
    for r in rows:
        print(f"{r['file']:8s} {r['bytes']:>11,d} {r['viva_mean']:10.5f} {r['viva_min']:9.5f} "
              f"{r['llamacpp_mean']:11.5f} {r['llamacpp_min']:10.5f}")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
