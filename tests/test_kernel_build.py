"""The installed kernel library uses the vector instructions this CPU has.

A ``-march=native`` build that fails falls back to the portable library without a word (build.py tries the flag
sets in turn), and the portable library's plain loops are an order of magnitude slower than float32 XLA: on an
AVX2-only CPU (AMD Zen 3) the native build once failed to compile (``_cvtsh_ss`` undeclared: ``immintrin.h`` was
included only for AVX-512) and every quantized matmul ran 10-16x slower than float32.
"""

from __future__ import annotations

import pytest

from viva_tensor import _kernels
from viva_tensor._kernels import build


def _native_flags() -> set[str] | None:
    sidecar = _kernels.library_path().parent / build.CPU_FILE
    try:
        text = sidecar.read_text()
    except OSError:
        return None
    return set(text.split()) if text.strip() else None


def test_the_library_is_built_for_this_cpu():
    if not _kernels.available():
        pytest.skip("no kernel library in this install (pure-JAX path)")
    have = build.cpu_flags()
    if not {"avx2", "fma"} <= have:
        pytest.skip("this CPU has no AVX2 + FMA: the portable library is the right one")
    assert _native_flags() is not None, "the -march=native build failed here and the portable library was installed"


def test_the_vector_width_matches_the_cpu():
    if not _kernels.available() or _native_flags() is None:
        pytest.skip("no native kernel library in this install")
    have = build.cpu_flags()
    simd = _kernels._state["simd"]
    if "avx512f" in have:
        assert simd == 512
    elif {"avx2", "fma"} <= have:
        assert simd == 256
    else:
        assert simd == 0
