"""ggml's own quantizers and dequantizers through ctypes (the libggml-python wheel), for the tests.

``ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)`` is the entry point that llama.cpp's
quantizer calls; ``dequantize_row_*`` are ggml's reference decoders.
"""

from __future__ import annotations

import ctypes
import importlib.util
import pathlib

import numpy as np

TYPES = {"q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q2_k": 10, "q3_k": 11, "q4_k": 12, "q5_k": 13,
         "q6_k": 14, "iq4_nl": 20, "iq4_xs": 23}


def load() -> ctypes.CDLL | None:
    """ggml's base library, or None when libggml-python is not installed."""
    spec = importlib.util.find_spec("libggml")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "lib64" / "libggml-base.so"
    if not path.exists():
        return None
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib


LIB = load()


def quantize(x: np.ndarray, fmt: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """ggml's bytes for the rows of ``x`` (float32, shape (rows, n)): uint8 (rows, row bytes)."""
    x = np.ascontiguousarray(x, np.float32).reshape(-1, x.shape[-1])
    rows, n = x.shape
    t = TYPES[fmt]
    row_bytes = LIB.ggml_row_size(t, n)
    out = np.zeros((rows, row_bytes), np.uint8)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, np.float32)
    size = LIB.ggml_quantize_chunk(t, x.ctypes.data, out.ctypes.data, 0, rows, n,
                                   None if qw is None else qw.ctypes.data)
    assert size == out.size
    return out


def dequantize(data: np.ndarray, fmt: str, n: int) -> np.ndarray:
    """ggml's ``dequantize_row_<fmt>`` of ``n`` values from their block bytes."""
    fn = getattr(LIB, f"dequantize_row_{fmt.replace('_k', '_K')}")
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    data = np.ascontiguousarray(data, np.uint8)
    out = np.zeros(n, np.float32)
    fn(data.ctypes.data, out.ctypes.data, n)
    return out
