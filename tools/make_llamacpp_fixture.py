"""Make tests/data/interop/llamacpp_minilm_l0_q4_k_m.gguf with llama.cpp's own ``llama-quantize`` (run once, by hand).

The source is MiniLM converted by llama.cpp's ``convert_hf_to_gguf.py`` (F32), reduced to what a small fixture can
hold: layer 0 of the encoder (attention q/k/v/output, FFN up/down, their biases and norms) and the embedding norm,
with the file's ``bert.*`` hyper-parameters (``block_count`` set to 1) and no tokenizer (``llama-quantize`` needs
neither the vocabulary nor the embeddings). ``llama-quantize ... Q4_K_M`` then picks each tensor's type itself:
Q4_K/Q6_K where rows are whole super-blocks (the FFN down projection, rows of 1536), its fallbacks elsewhere
(rows of 384), F32 for the 1-D tensors. About 1 MB.

    # llama.cpp from the llama-cpp-python sdist (vendor/llama.cpp):
    cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build build -j 2 --target llama-quantize
    python convert_hf_to_gguf.py PATH/TO/all-MiniLM-L6-v2 --outtype f32 --outfile minilm-f32.gguf  # needs torch
    python tools/make_llamacpp_fixture.py --f32 minilm-f32.gguf --quantize build/bin/llama-quantize
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import tempfile

from viva_tensor.interop import gguf

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "interop" / "llamacpp_minilm_l0_q4_k_m.gguf"


def reduced_source(f32: str, path: pathlib.Path) -> None:
    tensors, meta = gguf.read(f32)
    keep = {k: v for k, v in tensors.items() if k.startswith("blk.0.") or k.startswith("token_embd_norm.")}
    arch = str(meta["general.architecture"])
    metadata = {k: v for k, v in meta.items()
                if k.startswith(arch + ".") or k in ("general.name", "general.file_type")}
    metadata[arch + ".block_count"] = type(meta[arch + ".block_count"])(1)
    metadata["general.name"] = "all-MiniLM-L6-v2, layer 0 only (viva_tensor test fixture)"
    gguf.write(path, keep, arch=arch, metadata=metadata)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--f32", required=True, help="MiniLM as F32 GGUF, made by llama.cpp's convert_hf_to_gguf.py")
    p.add_argument("--quantize", required=True, help="llama.cpp's llama-quantize binary")
    p.add_argument("--type", default="Q4_K_M")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "minilm-l0-f32.gguf"
        reduced_source(args.f32, src)
        subprocess.run([args.quantize, str(src), args.out, args.type], check=True)
    print(f"{args.out}: {pathlib.Path(args.out).stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
