"""The compiled CPU kernels (viva_tensor._kernels) against a NumPy float64 dequantize-then-dot from the definition.

Tolerance: the kernel decodes in float32 and sums in float32 in its own order (16 lanes, blocks, threads), so it
is compared with the float64 reference within the float32 summation bound ``|y - ref| <= 4 * K * 2**-24 * (|x| @
|w|^T)`` (plus a tiny absolute floor), not bit for bit; bfloat16 activations add the output's rounding (2**-8).
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from viva_tensor import _kernels
from viva_tensor.errors import ConfigError, DTypeError, ShapeMismatch

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)  # fmt: skip
UINT4 = np.arange(16, dtype=np.float32)
TABLES = {"e2m1": E2M1, "nf4": NF4, "int4": UINT4 - 8, "uint4": UINT4}

# (layout, table, block size, with offsets): every layout and table, the formats' block sizes.
CASES = [
    ("low_first", "e2m1", 16, False),   # NVFP4
    ("low_first", "e2m1", 32, False),   # MXFP4
    ("low_first", "uint4", 32, True),   # int4_group / AWQ (offset = -zero * scale)
    ("high_first", "nf4", 64, False),   # NF4
    ("high_first", "nf4", 16, False),
    ("ggml", "int4", 32, False),        # Q4_0
    ("ggml", "uint4", 32, True),        # Q4_1
    ("int8", None, 32, False),          # Q8_0
    ("int8", None, 0, False),           # int8 per row (block = the whole packed axis)
]


@pytest.fixture(scope="module", autouse=True)
def built_library():
    """Builds the library when a source checkout has none yet (pip install builds it)."""
    if not _kernels.library_path().exists() and os.environ.get("VIVA_TENSOR_KERNELS", "1") != "0":
        from viva_tensor._kernels import build

        build.build()
        _kernels._state.clear()
    yield


def needs_kernel():
    if not _kernels.available():
        pytest.skip("the compiled kernels are not available (no compiler at install time?)")


def _numpy_decode(codes: np.ndarray, lut, scales: np.ndarray, offsets, layout: str, block: int) -> np.ndarray:
    """float64 weights (rows, packed), from the layouts' definitions."""
    rows = codes.shape[0]
    if layout == "int8":
        v = codes.astype(np.float64)
    else:
        lo, hi = codes & 15, codes >> 4
        idx = np.empty((rows, codes.shape[1] * 2), np.int64)
        if layout == "low_first":
            idx[:, 0::2], idx[:, 1::2] = lo, hi
        elif layout == "high_first":
            idx[:, 0::2], idx[:, 1::2] = hi, lo
        else:  # byte j of each 32-value block: value j (low nibble), value j + 16 (high nibble)
            for g in range(codes.shape[1] // 16):
                idx[:, 32 * g: 32 * g + 16] = lo[:, 16 * g: 16 * g + 16]
                idx[:, 32 * g + 16: 32 * g + 32] = hi[:, 16 * g: 16 * g + 16]
        v = np.asarray(lut, np.float64)[idx]
    s = np.repeat(scales.astype(np.float64), block, axis=1)
    w = v * s
    if offsets is not None:
        w = w + np.repeat(offsets.astype(np.float64), block, axis=1)
    return w


def _planes(rng, layout, table, block, with_off, rows, packed):
    block = block or packed
    if layout == "int8":
        codes = rng.integers(-128, 128, (rows, packed)).astype(np.int8)
        lut = None
    else:
        codes = rng.integers(0, 256, (rows, packed // 2)).astype(np.uint8)
        lut = TABLES[table]
    scales = rng.uniform(0.5, 2.0, (rows, packed // block)).astype(np.float32) * rng.choice([-1, 1], (rows, 1))
    offsets = rng.normal(size=scales.shape).astype(np.float32) if with_off else None
    return codes, lut, scales.astype(np.float32), offsets, block


def _reference(x, codes, lut, scales, offsets, layout, block, weight_layout):
    w = _numpy_decode(codes, lut, scales, offsets, layout, block)
    w = w if weight_layout == "nk" else w.T  # (N, K)
    x64 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = x64 @ w.T
    bound = 4 * x64.shape[-1] * 2.0**-24 * (np.abs(x64) @ np.abs(w).T) + 1e-30
    return ref, bound


def _call(x, codes, lut, scales, offsets, layout, block, weight_layout, jit=True):
    def f(x, codes, scales, offsets):
        return _kernels.qmatmul(x, codes, lut, scales, offsets, layout=layout, block_size=block,
                                weight_layout=weight_layout)

    return (jax.jit(f) if jit else f)(x, jnp.asarray(codes), jnp.asarray(scales),
                                      None if offsets is None else jnp.asarray(offsets))


@pytest.mark.parametrize("weight_layout", ["nk", "kn"])
@pytest.mark.parametrize("layout,table,block,with_off", CASES)
def test_matches_numpy(layout, table, block, with_off, weight_layout):
    needs_kernel()
    rng = np.random.default_rng(hash((layout, table, block, with_off, weight_layout)) % 2**32)
    # odd N for (N, K) (not a multiple of the 2-row step nor of the thread split); (K, N) packs along N: 3 groups
    n, k = (37, 128) if weight_layout == "nk" else (192, 45)
    rows, packed = (n, k) if weight_layout == "nk" else (k, n)
    codes, lut, scales, offsets, bs = _planes(rng, layout, table, block, with_off, rows, packed)
    for batch in (1, 3, 16, 64):
        x = rng.normal(size=(batch, k)).astype(np.float32)
        y = np.asarray(_call(x, codes, lut, scales, offsets, layout, bs, weight_layout))
        ref, bound = _reference(x, codes, lut, scales, offsets, layout, bs, weight_layout)
        assert y.shape == (batch, n) and y.dtype == np.float32
        assert np.all(np.abs(y - ref) <= bound), (batch, np.max(np.abs(y - ref) / bound))


@pytest.mark.parametrize("weight_layout", ["nk", "kn"])
@pytest.mark.parametrize("layout,table,block", [("high_first", "nf4", 64), ("int8", None, 32), ("ggml", "int4", 32)])
def test_bfloat16_and_eager(layout, table, block, weight_layout):
    needs_kernel()
    rng = np.random.default_rng(1)
    n, k = (33, 64) if weight_layout == "nk" else (64, 33)
    rows, packed = (n, k) if weight_layout == "nk" else (k, n)
    codes, lut, scales, offsets, bs = _planes(rng, layout, table, block, False, rows, packed)
    x = jnp.asarray(rng.normal(size=(5, k)), jnp.bfloat16)
    y_jit = _call(x, codes, lut, scales, offsets, layout, bs, weight_layout, jit=True)
    y_eager = _call(x, codes, lut, scales, offsets, layout, bs, weight_layout, jit=False)
    assert y_jit.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y_jit, np.float32), np.asarray(y_eager, np.float32))
    ref, bound = _reference(x, codes, lut, scales, offsets, layout, bs, weight_layout)
    y = np.asarray(y_jit, np.float64)
    assert np.all(np.abs(y - ref) <= bound + 2.0**-8 * np.abs(ref))


@pytest.mark.parametrize("weight_layout", ["nk", "kn"])
def test_vmap_over_activations(weight_layout):
    needs_kernel()
    rng = np.random.default_rng(2)
    n, k = (40, 64) if weight_layout == "nk" else (64, 64)
    rows, packed = (n, k) if weight_layout == "nk" else (k, n)
    codes, lut, scales, offsets, bs = _planes(rng, "low_first", "e2m1", 16, False, rows, packed)
    xs = rng.normal(size=(3, 4, k)).astype(np.float32)

    def f(x):
        return _kernels.qmatmul(x, jnp.asarray(codes), lut, jnp.asarray(scales), layout="low_first", block_size=bs,
                                weight_layout=weight_layout)

    y = np.asarray(jax.jit(jax.vmap(f))(xs))
    for i in range(3):
        np.testing.assert_array_equal(y[i], np.asarray(jax.jit(f)(xs[i])))
    # weights batched too: one call per slice
    codes2 = np.stack([codes, codes[::-1]])

    def g(x, c):
        return _kernels.qmatmul(x, c, lut, jnp.asarray(scales), layout="low_first", block_size=bs,
                                weight_layout=weight_layout)

    y2 = np.asarray(jax.vmap(g)(xs[:2], jnp.asarray(codes2)))
    for i in range(2):
        ref, bound = _reference(xs[i], codes2[i], lut, scales, None, "low_first", bs, weight_layout)
        assert np.all(np.abs(y2[i] - ref) <= bound)


def test_leading_axes_and_vector():
    needs_kernel()
    rng = np.random.default_rng(3)
    codes, lut, scales, offsets, bs = _planes(rng, "int8", None, 32, False, 8, 64)
    x = rng.normal(size=(2, 3, 64)).astype(np.float32)
    y = _call(x, codes, lut, scales, offsets, "int8", bs, "nk")
    assert y.shape == (2, 3, 8)
    np.testing.assert_array_equal(np.asarray(y[1, 2]), np.asarray(_call(x[1, 2], codes, lut, scales, offsets,
                                                                         "int8", bs, "nk")))


@pytest.mark.parametrize("weight_layout", ["nk", "kn"])
def test_nan_in_gives_nan_out(weight_layout):
    needs_kernel()
    rng = np.random.default_rng(4)
    n, k = (9, 64) if weight_layout == "nk" else (64, 64)
    rows, packed = (n, k) if weight_layout == "nk" else (k, n)
    codes, lut, scales, offsets, bs = _planes(rng, "high_first", "nf4", 64, False, rows, packed)
    x = rng.normal(size=(3, k)).astype(np.float32)
    x[1, 5] = np.nan
    y = np.asarray(_call(x, codes, lut, scales, offsets, "high_first", bs, weight_layout))
    assert np.all(np.isnan(y[1])) and np.all(np.isfinite(y[[0, 2]]))


def test_custom_call_in_jit_and_one_compile_per_shape():
    needs_kernel()
    rng = np.random.default_rng(5)
    codes, lut, scales, offsets, bs = _planes(rng, "ggml", "int4", 32, False, 16, 64)
    traces = []

    @jax.jit
    def f(x, c, s):
        traces.append(1)
        return _kernels.qmatmul(x, c, lut, s, layout="ggml", block_size=bs)

    args = (jnp.asarray(codes), jnp.asarray(scales))
    text = f.lower(jnp.ones((2, 64)), *args).compile().as_text()
    assert "vt_qmatmul" in text and "callback" not in text.lower()
    for _ in range(3):
        f(jnp.asarray(rng.normal(size=(2, 64)), jnp.float32), *args).block_until_ready()
    assert len(traces) == 1


def test_decode_matches_numpy_bit_for_bit():
    needs_kernel()
    rng = np.random.default_rng(6)
    for layout, table, block, with_off in CASES:
        codes, lut, scales, offsets, bs = _planes(rng, layout, table, block, with_off, 7, 128)
        w = np.asarray(_kernels.decode(jnp.asarray(codes), lut, jnp.asarray(scales),
                                       None if offsets is None else jnp.asarray(offsets), layout=layout, block_size=bs))
        # float64 product then sum, rounded once to float32: what the kernel's multiply or FMA gives
        ref = _numpy_decode(codes, lut, scales, offsets, layout, bs).astype(np.float32)
        np.testing.assert_array_equal(w, ref, err_msg=f"{layout} {table} {block}")
        wr = np.asarray(_kernels.decode_reference(jnp.asarray(codes), lut, jnp.asarray(scales), layout=layout,
                                                  block_size=bs))
        if offsets is None:
            np.testing.assert_array_equal(wr, ref)


def test_fallback_path_when_forced_off(monkeypatch):
    rng = np.random.default_rng(7)
    codes, lut, scales, offsets, bs = _planes(rng, "low_first", "uint4", 32, True, 12, 64)
    x = rng.normal(size=(3, 64)).astype(np.float32)
    monkeypatch.setattr(_kernels, "_state", {"ok": False})
    assert not _kernels.available()

    def f(x):
        return _kernels.qmatmul(x, jnp.asarray(codes), lut, jnp.asarray(scales), jnp.asarray(offsets),
                                layout="low_first", block_size=bs)

    assert "vt_qmatmul" not in jax.jit(f).lower(x).as_text()
    y = np.asarray(jax.jit(f)(x))
    ref, bound = _reference(x, codes, lut, scales, offsets, "low_first", bs, "nk")
    assert np.all(np.abs(y - ref) <= bound)


def test_environment_switch_turns_kernels_off():
    code = "from viva_tensor import _kernels; print(_kernels.available())"
    env = dict(os.environ, VIVA_TENSOR_KERNELS="0", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_shapes_the_kernel_does_not_take_use_the_reference():
    # packed axis 48 (not a multiple of 32): pure JAX, same contract
    rng = np.random.default_rng(8)
    codes, lut, scales, offsets, bs = _planes(rng, "int8", None, 16, False, 5, 48)
    x = rng.normal(size=(2, 48)).astype(np.float32)
    y = np.asarray(_call(x, codes, lut, scales, offsets, "int8", bs, "nk"))
    ref, bound = _reference(x, codes, lut, scales, offsets, "int8", bs, "nk")
    assert np.all(np.abs(y - ref) <= bound)


def test_errors_name_the_argument():
    codes = jnp.zeros((4, 32), jnp.uint8)
    lut, scales = jnp.zeros(16), jnp.ones((4, 2))
    with pytest.raises(ConfigError, match="layout"):
        _kernels.qmatmul(jnp.ones((1, 64)), codes, lut, scales, layout="middle", block_size=32)
    with pytest.raises(ShapeMismatch, match="'x'"):
        _kernels.qmatmul(jnp.ones((1, 63)), codes, lut, scales, layout="low_first", block_size=32)
    with pytest.raises(ShapeMismatch, match="scales"):
        _kernels.qmatmul(jnp.ones((1, 64)), codes, lut, scales, layout="low_first", block_size=16)
    with pytest.raises(DTypeError, match="codes"):
        _kernels.qmatmul(jnp.ones((1, 64)), codes, lut, scales, layout="int8", block_size=32)
    with pytest.raises(DTypeError, match="'x'"):
        _kernels.qmatmul(jnp.ones((1, 64), jnp.int32), codes, lut, scales, layout="low_first", block_size=32)
    with pytest.raises(ConfigError, match="weight_layout"):
        _kernels.qmatmul(jnp.ones((1, 64)), codes, lut, scales, layout="low_first", block_size=32, weight_layout="t")


def _records():
    from viva_tensor import awq, blackwell, compression, nf4

    rng = np.random.default_rng(9)
    w = jnp.asarray(rng.normal(size=(24, 256)).astype(np.float32))
    w = w.at[3, :64].set(0.0)  # an all-zero block (E8M0 byte 0 for MXFP4 is not reached: 2**-127 needs tiny values)
    act = jnp.asarray(rng.uniform(0.5, 2.0, 256).astype(np.float16).astype(np.float32))
    return {
        "nf4": (nf4.quantize(w), nf4.dequantize),
        "nf4_dq": (nf4.double_quantize(w), nf4.dequantize),
        "nvfp4": (blackwell.quantize_nvfp4(w), blackwell.dequantize),
        "mxfp4": (blackwell.quantize_mxfp4(w), blackwell.dequantize),
        "q4_0": (compression.quantize_q4_0(w), compression.dequantize),
        "q4_1": (compression.quantize_q4_1(w), compression.dequantize),
        "q8_0": (compression.quantize_q8_0(w), compression.dequantize),
        "int8_rows": (compression.quantize_int8(w, axis=0), compression.dequantize),
        "int8_cols": (compression.quantize_int8(w, axis=1), compression.dequantize),
        "int8_tensor": (compression.quantize_int8(w), compression.dequantize),
        "int8_blocks": (compression.quantize_int8(w, block_size=64), compression.dequantize),
        "int4_group": (awq.quantize_group(w, group_size=128), awq.dequantize),
        "awq": (awq.quantize_awq(w, scales=act, group_size=64), awq.dequantize),
    }


@pytest.mark.parametrize("name", list(_records()))
def test_kernel_args_decode_bit_for_bit(name):
    from viva_tensor._kernels.planes import decoded, kernel_args

    record, dequantize = _records()[name]
    args = kernel_args(record)
    assert args is not None
    want = np.asarray(dequantize(record), np.float32)
    np.testing.assert_array_equal(np.asarray(decoded(args)), want)
    if _kernels.available() and args["x_mul"] is None and args["x_div"] is None:
        got = _kernels.decode(args["codes"], args["lut"], args["scales"], args["offsets"], layout=args["layout"],
                              block_size=args["block_size"], scale_table=args["scale_table"])
        np.testing.assert_array_equal(np.asarray(got), want)
    # and the matmul through the planes equals dequantize-then-dot within the summation bound
    x = np.random.default_rng(10).normal(size=(3, want.shape[1])).astype(np.float32)
    xk = jnp.asarray(x)
    if args["x_mul"] is not None:
        xk = xk * args["x_mul"][None, :]
    if args["x_div"] is not None:
        xk = xk / args["x_div"][None, :]
    y = np.asarray(_kernels.qmatmul(xk, args["codes"], args["lut"], args["scales"], args["offsets"],
                                    layout=args["layout"], block_size=args["block_size"],
                                    scale_table=args["scale_table"]))
    ref = x.astype(np.float64) @ want.astype(np.float64).T
    bound = 8 * want.shape[1] * 2.0**-24 * (np.abs(x) @ np.abs(want).T) + 1e-6
    assert np.all(np.abs(y - ref) <= bound)


@pytest.mark.parametrize("weight_layout", ["nk", "kn"])
@pytest.mark.parametrize("with_off", [False, True])
def test_large_batch_panels_with_a_remainder(monkeypatch, weight_layout, with_off):
    needs_kernel()
    # the portable build's path (the AVX-512 build's GEMM turned off): 37 rows of the stored weight in panels of
    # 10: three panels through the scan and a remainder of 7
    monkeypatch.setenv("VIVA_TENSOR_GEMM", "0")
    monkeypatch.setattr(_kernels, "PANEL_BYTES", 10 * 4 * 64)
    rng = np.random.default_rng(11)
    rows, packed = (37, 64) if weight_layout == "nk" else (37, 64)
    n, k = (rows, packed) if weight_layout == "nk" else (packed, rows)
    codes, lut, scales, offsets, bs = _planes(rng, "low_first", "uint4", 32, with_off, rows, packed)
    x = rng.normal(size=(_kernels.PANEL_BATCH + 3, k)).astype(np.float32)
    fn = jax.jit(lambda x, c, s, o: _kernels.qmatmul(x, c, lut, s, o, layout="low_first", block_size=bs,
                                                     weight_layout=weight_layout))
    text = fn.lower(x, codes, scales, offsets).as_text()
    assert "vt_decode" in text and "vt_qmatmul" not in text
    y = np.asarray(fn(x, codes, scales, offsets))
    ref, bound = _reference(x, codes, lut, scales, offsets, "low_first", bs, weight_layout)
    assert y.shape == (x.shape[0], n)
    assert np.all(np.abs(y - ref) <= bound)


def test_large_batch_keeps_only_a_panel_of_the_weight(monkeypatch):
    needs_kernel()
    monkeypatch.setenv("VIVA_TENSOR_GEMM", "0")  # the panel path (the GEMM has no weight-sized buffer at all)
    n = k = 4096  # compiled only: 64 MiB as float32, one 8 MiB panel at a time
    codes = jax.ShapeDtypeStruct((n, k // 2), jnp.uint8)
    scales = jax.ShapeDtypeStruct((n, k // 64), jnp.float32)
    x = jax.ShapeDtypeStruct((64, k), jnp.float32)
    lut = jnp.asarray(NF4)
    fn = jax.jit(lambda x, c, s: _kernels.qmatmul(x, c, lut, s, layout="high_first", block_size=64))
    mem = fn.lower(x, codes, scales).compile().memory_analysis()
    assert mem.temp_size_in_bytes <= _kernels.PANEL_BYTES + 2 * 64 * n * 4, mem.temp_size_in_bytes
    assert mem.temp_size_in_bytes < n * k * 4 / 4  # issue 13: below a quarter of the float32 weight


@pytest.mark.parametrize("weight_layout", ["nk", "kn"])
def test_a_row_does_not_depend_on_the_batch(weight_layout):
    needs_kernel()
    rng = np.random.default_rng(12)
    rows, packed = (37, 256) if weight_layout == "nk" else (45, 256)
    k = packed if weight_layout == "nk" else rows
    codes, lut, scales, offsets, bs = _planes(rng, "high_first", "nf4", 64, False, rows, packed)
    gemm = _kernels.gemm_batch(weight_layout) or _kernels.PANEL_BATCH
    x = rng.normal(size=(gemm - 1, k)).astype(np.float32)  # the fused kernel's batches
    full = np.asarray(_call(x, codes, lut, scales, offsets, "high_first", bs, weight_layout))
    for b in (1, 3, 5, gemm - 2):
        np.testing.assert_array_equal(np.asarray(_call(x[:b], codes, lut, scales, offsets, "high_first", bs,
                                                       weight_layout)), full[:b])
    if _kernels.gemm_batch(weight_layout):  # the GEMM's batches: one chain of FMAs per output, whatever B
        x = rng.normal(size=(3 * gemm + 5, k)).astype(np.float32)
        full = np.asarray(_call(x, codes, lut, scales, offsets, "high_first", bs, weight_layout))
        for b in (gemm, gemm + 1, 2 * gemm + 3):
            np.testing.assert_array_equal(np.asarray(_call(x[:b], codes, lut, scales, offsets, "high_first", bs,
                                                           weight_layout)), full[:b])


@pytest.mark.parametrize("weight_layout", ["nk", "kn"])
@pytest.mark.parametrize("layout,table,block,with_off", [("ggml", "uint4", 32, True), ("low_first", "e2m1", 16, False),
                                                         ("int8", None, 0, False)])
def test_gemm_edges(weight_layout, layout, table, block, with_off):
    # the GEMM's remainders: N not a multiple of its 14 / 16-row tiles (nk) and K not of its 128-value chunks or of
    # 16 (kn), rows of x past one group (groups of up to 320 rows for nk, 315 for kn) and not a multiple of a strip
    # (32 / 14); for kn also the small-batch form (below 28 rows: strips of 16, one partly empty at 17 and 27)
    needs_kernel()
    if not _kernels.gemm_batch(weight_layout):
        pytest.skip("this build has no GEMM (no AVX-512)")
    rng = np.random.default_rng(14)
    n, k = (45, 416) if weight_layout == "nk" else (96, 301)
    rows, packed = (n, k) if weight_layout == "nk" else (k, n)
    codes, lut, scales, offsets, bs = _planes(rng, layout, table, block, with_off, rows, packed)
    for batch in ((17, 1029) if weight_layout == "nk" else (17, 27, 33, 331)):
        x = rng.normal(size=(batch, k)).astype(np.float32)
        fn = jax.jit(lambda x, c, s, o: _kernels.qmatmul(x, c, lut, s, o, layout=layout, block_size=bs,
                                                         weight_layout=weight_layout))
        args = (x, jnp.asarray(codes), jnp.asarray(scales), None if offsets is None else jnp.asarray(offsets))
        assert "vt_decode" not in fn.lower(*args).as_text()
        y = np.asarray(fn(*args))
        ref, bound = _reference(x, codes, lut, scales, offsets, layout, bs, weight_layout)
        assert y.shape == (batch, n)
        assert np.all(np.abs(y - ref) <= bound), (batch, np.max(np.abs(y - ref) / bound))


@pytest.mark.parametrize("weight_layout", ["nk", "kn"])
def test_result_does_not_depend_on_the_thread_count(weight_layout, monkeypatch):
    # the kernels split rows / column strips into chunks that the threads claim as they come: every output is still
    # one chain of FMAs, so 1, 2, 3 or 8 threads give the same bits (fused path, GEMM and the decode)
    needs_kernel()
    rng = np.random.default_rng(15)
    n, k = (90, 320) if weight_layout == "nk" else (320, 96)
    rows, packed = (n, k) if weight_layout == "nk" else (k, n)
    codes, lut, scales, offsets, bs = _planes(rng, "low_first", "uint4", 64, True, rows, packed)
    scales, offsets, table = _kernels._kernel_planes(jnp.asarray(scales), jnp.asarray(offsets), None)
    planes = (jnp.asarray(codes), jnp.asarray(lut, jnp.float32), scales, offsets, jnp.zeros((0,), jnp.float32))
    kw = dict(layout="low_first", block_size=bs)

    def by_threads(call):
        out = {}
        for t in (1, 2, 3, 8):
            monkeypatch.setattr(_kernels, "threads", lambda t=t: t)
            fn = jax.jit(lambda *a, t=t: call(*a))  # a new function: traced (and the thread count read) anew
            assert f"threads = {t} : i64" in fn.lower(*planes).as_text()
            out[t] = np.asarray(fn(*planes))
        return out

    for batch in (3, 40, 70):  # fused; GEMM from 16 (nk) / 32 (kn) rows where the build has it
        x = jnp.asarray(rng.normal(size=(batch, k)).astype(np.float32))
        got = by_threads(lambda *p, x=x: _kernels._ffi_qmatmul(x, *p, kn=int(weight_layout == "kn"), n=n,
                                                               gemm_min=_kernels.gemm_batch(weight_layout), **kw))
        for t in (2, 3, 8):
            np.testing.assert_array_equal(got[t], got[1], err_msg=f"{t} threads, batch {batch}")
    dec = by_threads(lambda *p: _kernels._ffi_decode(*p, packed=packed, **kw))
    for t in (2, 3, 8):
        np.testing.assert_array_equal(dec[t], dec[1], err_msg=f"decode, {t} threads")


@pytest.mark.parametrize("weight_layout", ["nk", "kn"])
def test_gradients_match_the_reference(weight_layout):
    rng = np.random.default_rng(13)
    rows, packed = (40, 64)
    k = packed if weight_layout == "nk" else rows
    codes, lut, scales, offsets, bs = _planes(rng, "ggml", "uint4", 32, True, rows, packed)
    codes, scales, offsets = jnp.asarray(codes), jnp.asarray(scales), jnp.asarray(offsets)
    x = jnp.asarray(rng.normal(size=(3, k)).astype(np.float32))
    kw = dict(layout="ggml", block_size=bs, weight_layout=weight_layout)

    n = rows if weight_layout == "nk" else packed
    cot = jnp.asarray(rng.normal(size=(3, n)).astype(np.float32))

    def loss(fn):  # linear in y: the cotangent does not amplify the forward's rounding differences
        return lambda x, s, o: jnp.sum(cot * fn(x, codes, jnp.asarray(lut), s, o, **kw))

    got = jax.jit(jax.grad(loss(_kernels.qmatmul), argnums=(0, 1, 2)))(x, scales, offsets)
    want = jax.grad(loss(_kernels.qmatmul_reference), argnums=(0, 1, 2))(x, scales, offsets)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)
    if _kernels.available():
        text = jax.jit(jax.grad(lambda x: loss(_kernels.qmatmul)(x, scales, offsets))).lower(x).as_text()
        assert "vt_qmatmul" in text  # the activations' cotangent runs the kernel too


@pytest.mark.parametrize("weight_layout", ["nk", "kn"])
@pytest.mark.parametrize("name", ["nf4", "q4_1", "int8_cols", "awq", "nvfp4"])
def test_matmul_of_a_record(name, weight_layout):
    from viva_tensor._kernels.planes import matmul

    record, dequantize = _records()[name]
    w = np.asarray(dequantize(record), np.float64)  # (24, 256)
    k = w.shape[1] if weight_layout == "nk" else w.shape[0]
    x = np.random.default_rng(14).normal(size=(2, k)).astype(np.float32)
    y = np.asarray(jax.jit(lambda x: matmul(x, record, weight_layout=weight_layout))(x))
    ref = x @ (w.T if weight_layout == "nk" else w)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_a_library_built_for_another_cpu_is_not_loaded(monkeypatch, tmp_path):
    import shutil

    from viva_tensor._kernels import build

    if not _kernels.library_path().exists():
        pytest.skip("no library")
    lib = tmp_path / build.LIBRARY
    shutil.copy(_kernels.library_path(), lib)
    flags = build.cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo")
    (tmp_path / build.CPU_FILE).write_text(" ".join(sorted(flags | {"avx1024_imaginary"})))
    monkeypatch.setattr(_kernels, "_LIB", lib)
    monkeypatch.setattr(_kernels, "_state", {})
    assert not _kernels.available()
    assert "avx1024_imaginary" in _kernels._state["error"]


@pytest.mark.parametrize("k, block", [(96, 32), (256, 64), (160, 160), (384, 128), (256, 256)])
@pytest.mark.parametrize("b, n", [(1, 37), (5, 8), (9, 45), (70, 133)])  # the last crosses the 64 x 64 tiles
def test_int8_activation_kernel_matches_numpy(k, block, b, n):
    # W8A8: y = xs * sum_blk s * sum(xq * w) with int32 sums; K not a multiple of 64 and N, B off the 4 x 4 tiles;
    # blocks of a multiple of 64 sum in int32 over the whole block
    rng = np.random.default_rng(14)
    xq = rng.integers(-127, 128, (b, k)).astype(np.int8)
    xq[0, :5] = -127  # extremes: (x + 128) in the unsigned operand reaches 1 and 255
    xq[-1, -5:] = 127
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    xs = rng.uniform(0.5, 2.0, b).astype(np.float32)
    s = rng.uniform(0.01, 0.02, (n, k // block)).astype(np.float32)
    isum = (xq.astype(np.int64).reshape(b, 1, -1, block) * w.astype(np.int64).reshape(1, n, -1, block)).sum(-1)
    ref = xs.astype(np.float64)[:, None] * (isum * s.astype(np.float64)[None]).sum(-1)
    # the kernel's lanes hold partial sums of 4 products: its float32 rounding is relative to sum |x| |w| s
    absum = (np.abs(xq.astype(np.int64)).reshape(b, 1, -1, block) * np.abs(w.astype(np.int64)).reshape(1, n, -1, block))
    mag = xs.astype(np.float64)[:, None] * (absum.sum(-1) * s.astype(np.float64)[None]).sum(-1)
    bound = (k // 32 + 8) * 2.0**-23 * mag + 1e-30  # float32 sums over 64-byte steps, 16 lanes, the scales
    for fn in (_kernels.qmatmul_int8, _kernels.qmatmul_int8_reference):
        y = np.asarray(jax.jit(lambda *a, fn=fn: fn(*a, block_size=block))(xq, xs, w, s))
        assert y.shape == (b, n) and np.all(np.abs(y - ref) <= bound), fn.__name__
    if _kernels.available():
        text = jax.jit(lambda *a: _kernels.qmatmul_int8(*a, block_size=block)).lower(xq, xs, w, s).as_text()
        assert "vt_qmatmul_i8" in text


# ---------------------------------------------------------------------------------------------------------------
# scales and offsets as records store them (the kernel widens them itself)
# ---------------------------------------------------------------------------------------------------------------

def _half_bits_numpy(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).astype(np.float64)


STORED = {  # name: (scale dtype, offset kind)
    "f16": ("float16", None),
    "f16+f16 offsets": ("float16", "float16"),
    "f16+zero nibbles": ("float16", "uint8"),
    "e4m3 bytes": ("float8_e4m3fn", None),
    "e8m0 bytes": ("uint8", None),
    "bf16 (widened first)": ("bfloat16", None),
    "bf16+f16 offsets (widened first)": ("bfloat16", "float16"),
}


def _stored_planes(name, rows, nblk, rng):
    """Stored scales/offsets of a kind, and the float64 scales/offsets they mean (from the definition)."""
    sdt, odt = STORED[name]
    table = None
    if sdt in ("float16", "bfloat16"):
        s = jnp.asarray(rng.uniform(0.01, 2.0, size=(rows, nblk)).astype(np.float32)).astype(sdt)
        s64 = np.asarray(s.astype(jnp.float32), np.float64)
    elif sdt == "float8_e4m3fn":
        s = jnp.asarray(rng.uniform(0.02, 400.0, size=(rows, nblk)).astype(np.float32)).astype(jnp.float8_e4m3fn)
        ts = np.float32(1.0 / 3.0)
        table = (np.arange(256, dtype=np.uint8).view(jnp.float8_e4m3fn).astype(np.float32) * ts).astype(np.float32)
        bits = np.asarray(s).view(np.uint8)
        s64 = table[bits].astype(np.float64)
    else:  # E8M0: 2**(byte - 127)
        s = jnp.asarray(rng.integers(110, 140, size=(rows, nblk)).astype(np.uint8))
        with np.errstate(over="ignore"):  # byte 255 (NaN in E8M0) is never drawn here
            table = np.ldexp(np.float32(1.0), np.arange(256) - 127).astype(np.float32)
        s64 = table[np.asarray(s)].astype(np.float64)
    o, o64 = None, None
    if odt == "float16":
        o = jnp.asarray(rng.normal(size=(rows, nblk)).astype(np.float32)).astype(jnp.float16)
        o64 = np.asarray(o.astype(jnp.float32), np.float64)
    elif odt == "uint8":
        z = rng.integers(0, 16, size=(rows, nblk))
        zp = np.zeros((rows, (nblk + 1) // 2), np.uint8)
        zp |= z[:, 0::2].astype(np.uint8)
        zp[:, : z[:, 1::2].shape[1]] |= (z[:, 1::2] << 4).astype(np.uint8)
        o = jnp.asarray(zp)
        o64 = -(z * s64.astype(np.float32)).astype(np.float32).astype(np.float64)
    return s, o, (None if table is None else jnp.asarray(table)), s64, o64


@pytest.mark.parametrize("name", list(STORED))
@pytest.mark.parametrize("weight_layout", ["nk", "kn"])
@pytest.mark.parametrize("batch", [1, 5, 40])
def test_stored_scale_kinds_match_the_definition(name, weight_layout, batch):
    rng = np.random.default_rng(sum(map(ord, name)) + batch)
    rows, packed, block = 96, 256, 32
    nblk = packed // block
    codes = rng.integers(0, 256, size=(rows, packed // 2), dtype=np.uint8)
    s, o, table, s64, o64 = _stored_planes(name, rows, nblk, rng)
    idx = np.stack([codes & 15, codes >> 4], axis=-1).reshape(rows, packed)  # low_first
    w = UINT4.astype(np.float64)[idx].reshape(rows, nblk, block) * s64[..., None]
    if o64 is not None:
        w = w + o64[..., None]
    w = w.reshape(rows, packed).astype(np.float32).astype(np.float64)
    k = packed if weight_layout == "nk" else rows
    x = rng.normal(size=(batch, k)).astype(np.float32)
    ref = x.astype(np.float64) @ (w.T if weight_layout == "nk" else w)
    wabs = np.abs(w.T if weight_layout == "nk" else w)
    bound = 8 * k * 2.0**-24 * (np.abs(x) @ wabs) + 1e-6
    fn = jax.jit(lambda x, c, s, o, t: _kernels.qmatmul(x, c, jnp.asarray(UINT4), s, o, layout="low_first",
                                                         block_size=block, weight_layout=weight_layout,
                                                         scale_table=t))
    y = np.asarray(fn(jnp.asarray(x), jnp.asarray(codes), s, o, table), np.float64)
    assert np.all(np.abs(y - ref) <= bound), np.max(np.abs(y - ref) - bound)
    # decoding: the kernel and the pure-JAX reference give the definition's float32 values bit for bit
    dec = _kernels.decode(jnp.asarray(codes), jnp.asarray(UINT4), s, o, layout="low_first", block_size=block,
                          scale_table=table)
    ref_dec = _kernels.decode_reference(jnp.asarray(codes), jnp.asarray(UINT4), s, o, layout="low_first",
                                        block_size=block, scale_table=table)
    np.testing.assert_array_equal(np.asarray(dec), w.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(ref_dec), w.astype(np.float32))


def test_stored_scale_kinds_bad_input_is_named():
    from viva_tensor.errors import InvalidShape

    codes = jnp.zeros((2, 32), jnp.uint8)
    x = jnp.ones((1, 64))
    lut = jnp.asarray(UINT4)
    with pytest.raises(InvalidShape, match="scale_table"):
        _kernels.qmatmul(x, codes, lut, jnp.zeros((2, 2), jnp.uint8), layout="low_first", block_size=32)
    with pytest.raises(DTypeError, match="scales"):
        _kernels.qmatmul(x, codes, lut, jnp.zeros((2, 2), jnp.int32), layout="low_first", block_size=32)
    with pytest.raises(DTypeError, match="offsets"):
        _kernels.qmatmul(x, codes, lut, jnp.ones((2, 2)), jnp.zeros((2, 2), jnp.int32), layout="low_first",
                         block_size=32)
    with pytest.raises(ShapeMismatch, match="offsets"):  # packed zero pairs: (rows, ceil(blocks / 2))
        _kernels.qmatmul(x, codes, lut, jnp.ones((2, 2), jnp.float16), jnp.zeros((2, 2), jnp.uint8),
                         layout="low_first", block_size=32)


def test_stored_scales_gradient_of_the_activations():
    from jax.test_util import check_grads

    needs_kernel()
    rng = np.random.default_rng(3)
    s, o, table, _, _ = _stored_planes("f16+zero nibbles", 32, 2, rng)
    codes = jnp.asarray(rng.integers(0, 256, size=(32, 32), dtype=np.uint8))

    def f(x):
        return _kernels.qmatmul(x, codes, jnp.asarray(UINT4), s, o, layout="low_first", block_size=32)

    check_grads(f, (jnp.asarray(rng.normal(size=(3, 64)).astype(np.float32)),), order=1, modes=["rev"],
                atol=2e-2, rtol=2e-2)
