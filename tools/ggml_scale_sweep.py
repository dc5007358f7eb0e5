"""Where viva_tensor's GGML quantizers give ggml's own bytes, by the scale of the values (run by hand).

    python tools/ggml_scale_sweep.py [--seeds 8] [--imatrix]

For each format and each exponent ``e`` from -16 to 16 in steps of 1/4, rows of normal values scaled to a
(super-)block absmax of ``10**e`` are quantized by viva_tensor and by ``ggml_quantize_chunk`` (libggml-python,
the test suite's oracle, ``tests/_ggml_oracle.py``). One line per format: ``+`` where every seed gives ggml's
bytes, ``.`` where one does not, then the exponents that differ. ``viva_tensor.ggml``'s docstring states the
bands this prints.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import _ggml_oracle as oracle  # noqa: E402

from viva_tensor import compression, ggml  # noqa: E402

FORMATS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")


def _quantize(fmt: str, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    if fmt in ("q4_0", "q4_1", "q8_0"):
        if imatrix is None:
            return compression.to_ggml_bytes(getattr(compression, f"quantize_{fmt}")(jnp.asarray(x)))
        return compression.to_ggml_bytes(getattr(ggml, f"quantize_{fmt}_imatrix")(jnp.asarray(x), jnp.asarray(imatrix)))
    q = getattr(ggml, f"quantize_{fmt}")(jnp.asarray(x), imatrix=None if imatrix is None else jnp.asarray(imatrix))
    return ggml.to_ggml_bytes(q)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=8, help="random rows per exponent (default 8)")
    p.add_argument("--imatrix", action="store_true", help="with an importance matrix (llama.cpp's imatrix path)")
    args = p.parse_args()
    if oracle.LIB is None:
        sys.exit("libggml-python is not installed (pip install -e '.[test]')")
    exps = np.round(np.arange(-16, 16.01, 0.25), 2)
    imatrix = np.random.default_rng(1).gamma(0.5, 2.0, 256).astype(np.float32) if args.imatrix else None
    for fmt in FORMATS:
        if fmt == "q8_0" and args.imatrix:
            continue  # ggml's Q8_0 has no imatrix path
        marks, bad = [], []
        for e in exps:
            same = True
            for seed in range(args.seeds):
                x = np.random.default_rng(seed).standard_normal((2, 256))
                x = (x / np.abs(x).max(axis=1, keepdims=True) * 10.0**e).astype(np.float32)
                if not np.isfinite(x).all():
                    break
                ours = np.asarray(_quantize(fmt, x, imatrix)).reshape(-1)
                if not np.array_equal(ours, oracle.quantize(x, fmt, imatrix).reshape(-1)):
                    same = False
                    break
            marks.append("+" if same else ".")
            if not same:
                bad.append(float(e))
        print(f"{fmt:5} {''.join(marks)}  differs at 10**e for e in {bad}")


if __name__ == "__main__":
    main()
