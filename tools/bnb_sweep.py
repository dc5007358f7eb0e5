"""bitsandbytes' 4-bit quantization against viva_tensor's on random tensors across 61 decades (run by hand).

Two steps in two environments, as bitsandbytes needs torch and viva_tensor never imports it:

    # 1. in the oracle environment of tools/make_interop_fixtures.py (torch 2.13 CPU, bitsandbytes 0.50.2):
    python tools/bnb_sweep.py make /tmp/bnb_sweep.npz
    # 2. in viva_tensor's environment:
    python tools/bnb_sweep.py compare /tmp/bnb_sweep.npz

``make`` quantizes 244 tensors (absmax 1e-30 ... 1e30, one per decade, times four kinds: normal values, heavy
tails, zero and constant blocks, a partial block) with ``quantize_4bit(..., "nf4")``, with and without
``compress_statistics``, and keeps every field and bitsandbytes' own dequantization. ``compare`` runs
``nf4.quantize`` / ``nf4.double_quantize`` on the same tensors and prints, per field, how many tensors differ in
any bit (0 everywhere is the claim of ``viva_tensor.nf4``'s docstring).
"""

from __future__ import annotations

import argparse
import collections

import numpy as np

KINDS = 4


def _tensors() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    out = []
    for e in range(-30, 31):
        for kind in range(KINDS):
            n = (4096, 4096 + 64 * 3, 64 * 257, 1000)[kind]  # whole nested blocks, partial ones, odd counts
            x = rng.standard_t(2, n) if kind == 1 else rng.standard_normal(n)
            if kind == 2:
                x[:64], x[64:128] = 0.0, 1.0
            out.append((x / np.abs(x).max() * 10.0**e).astype(np.float32))
    return out


def make(path: str) -> None:
    import bitsandbytes.functional as F
    import torch

    arrays = {}
    for i, x in enumerate(_tensors()):
        for dq in (False, True):
            packed, state = F.quantize_4bit(torch.from_numpy(x.copy()), blocksize=64, quant_type="nf4",
                                            compress_statistics=dq)
            key = f"{i:03d}_{int(dq)}_"
            arrays[key + "codes"] = packed.numpy().reshape(-1)
            if dq:
                arrays[key + "absmax_codes"] = state.absmax.numpy()
                arrays[key + "nested_absmax"] = state.state2.absmax.numpy()
                arrays[key + "offset"] = np.array(state.offset.item(), np.float32)
            else:
                arrays[key + "absmax"] = state.absmax.numpy()
            arrays[key + "dequantized"] = F.dequantize_4bit(packed, state).numpy().reshape(-1)
    arrays["torch_threads"] = np.array(torch.get_num_threads())
    np.savez(path, **arrays)
    print(f"{path}: {len(_tensors())} tensors, torch {torch.__version__} on {torch.get_num_threads()} threads")


def compare(path: str) -> None:
    from viva_tensor import nf4

    ref = np.load(path)
    threads = int(ref["torch_threads"])
    differ = collections.Counter()
    for i, x in enumerate(_tensors()):
        for dq in (False, True):
            key = f"{i:03d}_{int(dq)}_"
            if dq:
                q = nf4.double_quantize(x, torch_threads=threads)
                fields = {"absmax_codes": q.absmax_codes, "nested_absmax": q.nested_absmax, "offset": q.offset}
            else:
                q = nf4.quantize(x)
                fields = {"absmax": q.absmax}
            fields = {"codes": q.codes, **fields, "dequantized": nf4.dequantize(q)}
            for name, ours in fields.items():
                ours, theirs = np.asarray(ours).reshape(-1), ref[key + name].reshape(-1)
                same = ours.shape == theirs.shape and np.array_equal(ours.view(np.uint8), theirs.view(np.uint8))
                differ[("double_quantize" if dq else "quantize", name)] += not same
    n = len(_tensors())
    for (fn, name), count in sorted(differ.items()):
        print(f"nf4.{fn:<15} {name:<14} {count:>3} of {n} tensors differ")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["make", "compare"])
    p.add_argument("path", help="the .npz that make writes and compare reads")
    args = p.parse_args()
    (make if args.step == "make" else compare)(args.path)


if __name__ == "__main__":
    main()
