"""Tests of viva_tensor.nf4 against a NumPy reference written from bitsandbytes' algorithm.

The reference follows bitsandbytes' CUDA kernels (kQuantizeBlockwise with dQuantizeNF4 for the codes,
dQuantize for the dynamic map) as plain NumPy: float32 reciprocal of the absmax, the NF4 decision
tree with thresholds at the float32 midpoints of adjacent levels (ties to the lower code), the dynamic
map rebuilt in float64 from its definition, the 7-step binary search of dQuantize run element by
element in Python. bitsandbytes itself needs torch, which is not installed here.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from viva_tensor import nf4
from viva_tensor._formats.registry import FORMATS
from viva_tensor.errors import (
    ConfigError,
    DTypeError,
    FormatError,
    InvalidOp,
    InvalidShape,
    NonFiniteError,
    ShapeMismatch,
)

F32 = np.float32

# QLoRA's NF4 levels: bitsandbytes' get_4bit_type("nf4") table (the data under test is the table).
LEVELS = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=F32,
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# The reference
# ----------------------------------------------------------------------------------------------------
def ref_thresholds():
    """Float32 of the float64 midpoints of adjacent float32 levels (the literals in dQuantizeNF4)."""
    lv = LEVELS.astype(np.float64)
    return ((lv[:-1] + lv[1:]) / 2).astype(F32)


def ref_nf4_code(x):
    """dQuantizeNF4's decision tree, written as nested where over float32 values."""
    t = ref_thresholds()
    w = np.where
    hi = w(x > t[11], w(x > t[13], w(x > t[14], 15, 14), w(x > t[12], 13, 12)),
           w(x > t[9], w(x > t[10], 11, 10), w(x > t[8], 9, 8)))  # fmt: skip
    lo = w(x > t[3], w(x > t[5], w(x > t[6], 7, 6), w(x > t[4], 5, 4)),
           w(x > t[1], w(x > t[2], 3, 2), w(x > t[0], 1, 0)))  # fmt: skip
    return w(x > t[7], hi, lo).astype(np.uint8)


def ref_quantize(x, block):
    """bitsandbytes' kQuantizeBlockwise for NF4 in NumPy; zero blocks take code 7 (documented choice)."""
    flat = np.asarray(x, dtype=F32).reshape(-1)
    n = flat.size
    nb = -(-n // block)
    padded = np.zeros(nb * block, F32)
    padded[:n] = flat
    blocks = padded.reshape(nb, block)
    absmax = np.abs(blocks).max(axis=1).astype(F32)
    with np.errstate(divide="ignore"):
        inv = np.where(absmax == 0, F32(0), F32(1) / absmax).astype(F32)
    scaled = (blocks * inv[:, None]).astype(F32).reshape(-1)[:n]
    codes = ref_nf4_code(scaled)
    if n % 2:
        codes = np.append(codes, np.uint8(7))
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.astype(np.uint8), absmax


def ref_dequantize(packed, absmax, n, block, dtype):
    codes = np.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)[:n]
    vals = LEVELS[codes] * np.repeat(absmax, block)[:n]
    return vals.astype(F32).astype(dtype)


def ref_dynamic_map():
    """bitsandbytes' create_dynamic_map(signed=True) evaluated in float64, rounded once to float32."""
    data = []
    for i in range(7):
        b = np.linspace(0.1, 1.0, 2**i + 1)
        means = (b[:-1] + b[1:]) / 2
        data += list(10.0 ** (i - 6) * means) + list(-(10.0 ** (i - 6)) * means)
    data += [0.0, 1.0]
    return np.sort(np.array(data)).astype(F32)


def ref_dquantize(code, x):
    """dQuantize<STOCHASTIC=0> of bitsandbytes, one float32 value at a time."""
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower, upper = F32(-1.0), F32(1.0)
    val = code[pivot]
    i = 64
    while i > 0:
        if x > val:
            lower_pivot, lower, pivot = pivot, val, pivot + i
        else:
            upper_pivot, upper, pivot = pivot, val, pivot - i
        val = code[pivot]
        i >>= 1
    if upper_pivot == 255:
        upper = code[upper_pivot]
    if lower_pivot == 0:
        lower = code[lower_pivot]
    if x > val:
        return upper_pivot if x > F32((upper + val) * F32(0.5)) else pivot
    return lower_pivot if x < F32((lower + val) * F32(0.5)) else pivot


def ref_nested(absmax, offset, nested, code):
    """quantize_blockwise(absmax - offset, blocksize=nested) with the dynamic map ``code``."""
    v = (absmax - F32(offset)).astype(F32)
    nb = v.size
    ng = -(-nb // nested)
    padded = np.zeros(ng * nested, F32)
    padded[:nb] = v
    groups = padded.reshape(ng, nested)
    gmax = np.abs(groups).max(axis=1).astype(F32)
    with np.errstate(divide="ignore"):
        inv = np.where(gmax == 0, F32(0), F32(1) / gmax).astype(F32)
    scaled = (groups * inv[:, None]).astype(F32).reshape(-1)[:nb]
    codes = np.array([ref_dquantize(code, F32(s)) for s in scaled], dtype=np.uint8)
    return codes, gmax


def heavy_tailed(rng, shape):
    return rng.standard_t(3, size=shape).astype(F32)


# ----------------------------------------------------------------------------------------------------
# The tables
# ----------------------------------------------------------------------------------------------------
def test_levels_are_bitsandbytes_table_and_normal_quantiles():
    np.testing.assert_array_equal(nf4.NF4_LEVELS, LEVELS)
    scipy_stats = pytest.importorskip("scipy.stats")
    # create_normal_map(offset=0.9677083, use_extra_value=True), in float64.
    offset = 0.9677083
    v1 = scipy_stats.norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    v3 = -scipy_stats.norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([v1, [0.0], v3]))
    np.testing.assert_allclose(nf4.NF4_LEVELS, v / v.max(), atol=2e-7)


def test_thresholds_are_the_float32_midpoints():
    np.testing.assert_array_equal(nf4._NF4_THRESHOLDS, ref_thresholds())


def test_dynamic_map_definition():
    m = nf4.DYNAMIC_MAP
    assert m.dtype == np.float32 and m.shape == (256,)
    assert np.all(np.diff(m) > 0)
    assert m[127] == 0 and m[255] == 1.0 and m[0] == F32(-0.99296875)
    assert m[128] == pytest.approx(5.5e-7, rel=1e-6)
    # The ranges that a comment in bitsandbytes' kernels.cu (quantize_atomic) lists for this map, as
    # printed from torch: "values 32 to 64: 0.014218750409781933 to 0.10703125596046448", "64 to 96:
    # 0.12109375 to 0.5570312738418579", "96 to 128: 0.5710937976837158 to 1.0" (positive half).
    assert [float(m[128 + i]) for i in (32, 63, 64, 95, 96, 127)] == [
        0.014218750409781933, 0.10703125596046448, 0.12109375, 0.5570312738418579, 0.5710937976837158, 1.0,
    ]  # fmt: skip
    ref = ref_dynamic_map()
    ulps = np.abs(m.view(np.int32).astype(np.int64) - ref.view(np.int32).astype(np.int64))
    assert ulps.max() <= 1, "every entry within 1 float32 ulp of the float64 evaluation"
    assert np.mean(ulps == 0) > 0.6


def test_binary_search_is_nearest_except_at_midpoints():
    m = nf4.DYNAMIC_MAP
    x = np.linspace(-1, 1, 4001, dtype=F32)
    got = np.asarray(nf4._dynamic_codes(jnp.asarray(x)))
    want = np.array([ref_dquantize(m, v) for v in x], np.uint8)
    np.testing.assert_array_equal(got, want)
    nearest = np.abs(x[:, None] - m[None, :]).argmin(axis=1)
    assert np.mean(got == nearest) > 0.99  # the others are (float32) ties between two entries
    d_got = np.abs(m[got] - x)
    d_best = np.abs(m[nearest] - x)
    np.testing.assert_allclose(d_got, d_best, atol=1e-7)


# ----------------------------------------------------------------------------------------------------
# Hand-checked vectors
# ----------------------------------------------------------------------------------------------------
def test_known_codes_high_nibble_first():
    q = nf4.quantize(jnp.array([1.0, -0.5, 0.25, 0.0, -1.0], jnp.float32))
    # 1.0 -> 15, -0.5 -> 2 (between -0.525 and -0.395, nearer -0.525), 0.25 -> 10, 0.0 -> 7, -1 -> 0.
    assert q.codes.tolist() == [0xF2, 0xA7, 0x07]
    assert q.absmax.tolist() == [1.0]
    assert q.codes.dtype == jnp.uint8 and q.absmax.dtype == jnp.float32


def test_value_on_a_threshold_takes_the_lower_code():
    t = ref_thresholds()
    x = np.concatenate([[F32(1.0)], t, np.nextafter(t, F32(2))]).astype(F32)
    q = nf4.quantize(jnp.asarray(x), block_size=32)
    codes = np.stack([np.asarray(q.codes) >> 4, np.asarray(q.codes) & 15], -1).reshape(-1)[: x.size]
    np.testing.assert_array_equal(codes[1:16], np.arange(15))
    np.testing.assert_array_equal(codes[16:31], np.arange(1, 16))


def test_multiplies_by_the_reciprocal():
    # 0.0397901 * (1/3) vs 0.0397901 / 3 can differ in the last bit near a threshold: pick values
    # where they do, and check the reciprocal's answer.
    absmax = F32(3.0)
    inv = F32(1) / absmax
    t = ref_thresholds()
    cand = np.nextafter(t * absmax, F32(np.inf)).astype(F32)
    cand = np.concatenate([cand, (t * absmax).astype(F32), np.nextafter(t * absmax, F32(-np.inf))]).astype(F32)
    by_mul = ref_nf4_code((cand * inv).astype(F32))
    by_div = ref_nf4_code((cand / absmax).astype(F32))
    assert np.any(by_mul != by_div), "the test data must separate the two formulas"
    x = np.concatenate([[absmax], cand]).astype(F32)
    q = nf4.quantize(jnp.asarray(x), block_size=64)
    codes = np.stack([np.asarray(q.codes) >> 4, np.asarray(q.codes) & 15], -1).reshape(-1)[1 : x.size]
    np.testing.assert_array_equal(codes, by_mul)


# ----------------------------------------------------------------------------------------------------
# Against the reference
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,block", [((4, 64), 64), ((3, 37), 64), ((1001,), 32), ((2, 3, 50), 128), ((), 64)])
def test_quantize_matches_reference(shape, block, dtype, maybe_jit, rng):
    x = jnp.asarray(rng.normal(size=shape).astype(F32) * 3, dtype=dtype)
    q = maybe_jit(lambda v: nf4.quantize(v, block_size=block))(x)
    codes, absmax = ref_quantize(np.asarray(x.astype(jnp.float32)), block)
    np.testing.assert_array_equal(np.asarray(q.codes), codes)
    np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
    y = maybe_jit(nf4.dequantize)(q)
    assert y.shape == x.shape and y.dtype == x.dtype
    want = ref_dequantize(codes, absmax, x.size, block, np.dtype(dtype)).reshape(shape)
    np.testing.assert_array_equal(np.asarray(y), want)


def test_quantize_matches_reference_float16(rng):
    x = jnp.asarray(rng.normal(size=(5, 40)), jnp.float16)
    q = nf4.quantize(x)
    codes, absmax = ref_quantize(np.asarray(x, np.float32), 64)
    np.testing.assert_array_equal(np.asarray(q.codes), codes)
    np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
    assert nf4.dequantize(q).dtype == jnp.float16


# ---- torch's CPU float32 sum (bitsandbytes' offset is ``absmax.mean()``), from ATen's SumKernel.cpp


def ref_cascade(rows: np.ndarray) -> np.ndarray:
    """multi_row_sum: rows added one by one into level 0; after every 2**p rows (p = max(4, ceil(log2(size)) // 4))
    level 0 is added into level 1 and cleared, and so on upward while the row count is a multiple of 2**(p*j)."""
    size = rows.shape[0]
    p = max(4, math.ceil(math.log2(size)) // 4) if size > 1 else 4
    step, mask = 1 << p, (1 << p) - 1
    acc = np.zeros((4,) + rows.shape[1:], F32)
    i = 0
    while i + step <= size:
        for _ in range(step):
            acc[0] = (acc[0] + rows[i]).astype(F32)
            i += 1
        for j in range(1, 4):
            acc[j] = (acc[j] + acc[j - 1]).astype(F32)
            acc[j - 1] = 0
            if i & (mask << (j * p)):
                break
    for r in rows[i:]:
        acc[0] = (acc[0] + r).astype(F32)
    for j in range(1, 4):
        acc[0] = (acc[0] + acc[j]).astype(F32)
    return acc[0]


def ref_serial_sum(a: np.ndarray) -> np.float32:
    """cascade_sum on one thread: vectorized_inner_sum (8 lanes, 4 vectors side by side) from 8 values on, else
    scalar_inner_sum (4 scalars side by side); the leftovers go into the first partial sum."""
    a = a.astype(F32)
    if a.size < 8:
        rows = a.size // 4
        part = ref_cascade(a[: rows * 4].reshape(rows, 4)) if rows else np.zeros(4, F32)
        for v in a[rows * 4:]:
            part[0] = F32(part[0] + v)
        total = part[0]
        for k in range(1, 4):
            total = F32(total + part[k])
        return total
    nvec = a.size // 8
    vecs = a[: nvec * 8].reshape(nvec, 8)
    rows = nvec // 4
    part = ref_cascade(vecs[: rows * 4].reshape(rows, 4, 8)) if rows else np.zeros((4, 8), F32)
    for v in vecs[rows * 4:]:
        part[0] = (part[0] + v).astype(F32)
    for k in range(1, 4):
        part[0] = (part[0] + part[k]).astype(F32)
    total = F32(0)
    for v in a[nvec * 8:]:
        total = F32(total + v)
    for v in part[0]:
        total = F32(total + v)
    return total


def ref_torch_sum(a: np.ndarray, threads: int) -> np.float32:
    """From 32768 values on (at::internal::GRAIN_SIZE), min(threads, ceil(n / 32768)) equal chunks, added in order."""
    n = a.size
    tasks = 1 if n < 32768 else min(threads, -(-n // 32768))
    chunk = -(-n // tasks)
    if tasks == 1:
        return ref_serial_sum(a)
    total = F32(0)
    for t in range(tasks):
        total = F32(total + ref_serial_sum(a[t * chunk:(t + 1) * chunk]))
    return total


def _torch_sum_values(n: int) -> np.ndarray:  # tools/make_interop_fixtures.py's torch_sum_values
    i = np.arange(n, dtype=np.int64)
    return ((i * 2654435761 % 1000003).astype(np.float64) / 1000003 * 0.09 + 0.01).astype(F32)


def test_offset_is_torchs_float32_mean_bit_for_bit():
    """torch.mean on the CPU (tests/data/interop/torch_sums.safetensors, written by torch 2.14.1 on the CPU through
    tools/make_interop_fixtures.py) for 18 lengths up to 300007 and 1, 2, 3, 8 threads, against the offset
    that _double_core computes (jit) and the NumPy reference above."""
    import pathlib

    from safetensors.numpy import load_file

    sums = load_file(str(pathlib.Path(__file__).parent / "data" / "interop" / "torch_sums.safetensors"))
    core = jax.jit(nf4._double_core, static_argnums=(1, 2))
    for threads in (1, 2, 3, 8):
        for n, want in zip(sums["lengths"].tolist(), sums[f"mean_threads_{threads}"], strict=True):
            a = _torch_sum_values(n)
            got = np.asarray(core(jnp.asarray(a), 256, threads)[2])
            assert got.view(np.uint32) == want.view(np.uint32), (threads, n, float(got), float(want))
            if n <= 40000:  # the NumPy reference is slow; its longer runs are the same chunks
                assert (ref_torch_sum(a, threads) / F32(n)).view(np.uint32) == want.view(np.uint32), (threads, n)


@given(n=st.integers(1, 3000), threads=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_property_torch_sum_order_is_the_reference(n, threads, seed):
    a = np.abs(np.random.default_rng(seed).standard_normal(n)).astype(F32) * F32(0.05)
    got = np.asarray(nf4._torch_sum(jnp.asarray(a), threads))
    assert got.view(np.uint32) == ref_torch_sum(a, threads).view(np.uint32)


def ref_cpu_codes(v: np.ndarray, code: np.ndarray) -> np.ndarray:
    """bitsandbytes' CPU quantize_blockwise for values already times 1/absmax, element by element: the bin
    int((v + 1) * 0.5 * 65535 + 0.5) of [-1, 1] in 65536 bins, and for bin i the nearest code to -1 + 2i/65535
    (the first whose upper midpoint is not below it)."""
    out = np.empty(v.size, np.int64)
    mid = [F32(0.5) * (F32(code[k]) + F32(code[k + 1])) for k in range(255)]
    for j, value in enumerate(v.astype(F32)):
        value = min(max(value, F32(-1)), F32(1))
        i = int(F32(F32(F32(value + F32(1)) * F32(0.5)) * F32(65535)) + F32(0.5))
        left = F32(-1) + F32(F32(2) * F32(i)) / F32(65535)
        k = 0
        while k < 255 and mid[k] < left:
            k += 1
        out[j] = k
    return out


@pytest.mark.parametrize("n,nested", [(5000, 256), (64 * 700, 256), (3000, 16)])
def test_cpu_backend_absmax_codes_are_the_lookup_table(n, nested, maybe_jit, rng):
    x = jnp.asarray(rng.normal(size=n).astype(F32))
    q = maybe_jit(lambda v: nf4.double_quantize(v, nested_block_size=nested))(x)
    cuda = nf4.double_quantize(x, nested_block_size=nested, backend="cuda")
    _, absmax = ref_quantize(np.asarray(x), 64)
    centered = (absmax - np.asarray(q.offset)).astype(F32)
    want = []
    for g in range(0, centered.size, nested):
        group = centered[g:g + nested]
        want.append(ref_cpu_codes(group * (F32(1) / np.abs(group).max()), nf4.DYNAMIC_MAP))
    np.testing.assert_array_equal(np.asarray(q.absmax_codes), np.concatenate(want))
    diff = np.asarray(q.absmax_codes).astype(int) - np.asarray(cuda.absmax_codes).astype(int)
    assert np.abs(diff).max() <= 1 and np.count_nonzero(diff) <= max(2, diff.size // 100)  # the two kernels
    np.testing.assert_array_equal(np.asarray(q.nested_absmax), np.asarray(cuda.nested_absmax))
    with pytest.raises(ConfigError, match="backend"):
        nf4.double_quantize(x, backend="gpu")


def test_torch_threads_argument_and_default(monkeypatch):
    x = jnp.abs(jnp.sin(jnp.arange(64 * 40000, dtype=jnp.float32))) + 0.01  # 40000 blocks: the order splits
    one, two = (nf4.double_quantize(x, torch_threads=t) for t in (1, 2))
    absmax = np.asarray(nf4.quantize(x).absmax)
    for q, t in ((one, 1), (two, 2)):
        np.testing.assert_array_equal(np.asarray(q.offset), ref_torch_sum(absmax, t) / F32(absmax.size))
    for bad in (0, -1, 2.0, "2", True):
        with pytest.raises(ConfigError, match="torch_threads"):
            nf4.double_quantize(x[:64], torch_threads=bad)
    nf4.torch_default_threads.cache_clear()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    try:
        assert nf4.torch_default_threads() == 3
    finally:
        nf4.torch_default_threads.cache_clear()


@pytest.mark.parametrize("n,block,nested", [(64 * 600, 64, 256), (5000, 64, 256), (3000, 32, 16)])
def test_double_quantize_matches_reference(n, block, nested, maybe_jit, rng):
    x = jnp.asarray(rng.normal(size=n).astype(F32))
    q = maybe_jit(lambda v: nf4.double_quantize(v, block_size=block, nested_block_size=nested, backend="cuda"))(x)
    codes, absmax = ref_quantize(np.asarray(x), block)
    np.testing.assert_array_equal(np.asarray(q.codes), codes)
    # The offset: the float32 mean of the absmax values in torch's CPU order (bitsandbytes' absmax.mean()).
    mean = ref_torch_sum(absmax, nf4.torch_default_threads()) / F32(absmax.size)
    np.testing.assert_array_equal(np.asarray(q.offset), mean)
    acodes, gmax = ref_nested(absmax, np.asarray(q.offset), nested, nf4.DYNAMIC_MAP)
    np.testing.assert_array_equal(np.asarray(q.absmax_codes), acodes)
    np.testing.assert_array_equal(np.asarray(q.nested_absmax), gmax)
    # Dequantization as bitsandbytes: (map[code] * nested_absmax) rounded, then + offset rounded.
    restored_absmax = (
        (nf4.DYNAMIC_MAP[acodes] * np.repeat(gmax, nested)[: acodes.size]).astype(F32) + F32(q.offset)
    ).astype(F32)
    want = ref_dequantize(codes, restored_absmax, n, block, np.float32)
    np.testing.assert_array_equal(np.asarray(maybe_jit(nf4.dequantize)(q)), want)


def test_double_quantize_bytes_and_bits(rng):
    x = jnp.asarray(rng.normal(size=(1024, 1024)).astype(F32))
    q = nf4.double_quantize(x)
    assert q.codes.dtype == jnp.uint8 and q.absmax_codes.dtype == jnp.uint8
    assert q.nested_absmax.dtype == jnp.float32 and q.offset.dtype == jnp.float32
    assert q.nbytes == 1024 * 1024 // 2 + 1024 * 1024 // 64 + 4 * (1024 * 1024 // 64 // 256) + 4
    assert q.bits_per_value == pytest.approx(4.127, abs=1e-3)
    assert q.compression_ratio == pytest.approx(7.75, abs=0.01)
    p = nf4.quantize(x)
    assert p.nbytes == 1024 * 1024 // 2 + 4 * 1024 * 1024 // 64
    assert p.bits_per_value == 4.5
    assert p.compression_ratio == pytest.approx(32 / 4.5)


def test_odd_sizes_store_ceil_half_bytes():
    q = nf4.quantize(jnp.ones((3, 5)), block_size=4)
    assert q.codes.shape == (8,) and q.absmax.shape == (4,)
    assert q.codes.tolist()[-1] == 0xF7  # the pad nibble is the code of 0.0


# ----------------------------------------------------------------------------------------------------
# Quality
# ----------------------------------------------------------------------------------------------------
def _sqnr(x, y):
    x = np.asarray(x, np.float64)
    e = x - np.asarray(y, np.float64)
    return 10 * np.log10(np.sum(x * x) / np.sum(e * e))


@pytest.mark.parametrize("double", [False, True])
def test_error_bound_and_sqnr(double, rng):
    x = rng.normal(size=(256, 256)).astype(F32)
    q = (nf4.double_quantize if double else nf4.quantize)(jnp.asarray(x))
    y = np.asarray(nf4.dequantize(q))
    absmax = np.abs(x.reshape(-1, 64)).max(axis=1)
    half_gap = np.max(np.diff(LEVELS)) / 2  # 0.1385: the largest distance to a level
    slack = 0.02 if double else 1e-6  # the absmax itself is 8-bit with double quantization
    bound = absmax[:, None] * (half_gap + slack) + 1e-6
    assert np.all(np.abs(x - y).reshape(-1, 64) <= bound)
    assert 20.0 < _sqnr(x, y) < 22.0  # NF4 on Gaussian data: about 20.7 dB
    t = heavy_tailed(rng, (256, 256))
    yt = np.asarray(nf4.dequantize((nf4.double_quantize if double else nf4.quantize)(jnp.asarray(t))))
    assert 14.0 < _sqnr(t, yt) < 22.0


# ----------------------------------------------------------------------------------------------------
# Zeros, non-finite values, validation
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("double", [False, True])
def test_zero_blocks_are_exact_positive_zeros(double, rng):
    x = rng.normal(size=(4, 64)).astype(F32)
    x[1] = 0
    q = (nf4.double_quantize if double else nf4.quantize)(jnp.asarray(x))
    y = np.asarray(nf4.dequantize(q))
    assert np.all(y[1] == 0) and not np.any(np.signbit(y[1]))
    assert np.asarray(q.codes)[32:64].tolist() == [0x77] * 32
    z = nf4.dequantize((nf4.double_quantize if double else nf4.quantize)(jnp.zeros((7, 9))))
    assert np.all(np.asarray(z) == 0) and not np.any(np.isnan(np.asarray(z)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_spoils_only_its_block(bad, rng):
    x = rng.normal(size=(6, 64)).astype(F32)
    clean = nf4.quantize(jnp.asarray(x))
    x[2, 5] = bad
    q = nf4.quantize(jnp.asarray(x))
    y = np.asarray(nf4.dequantize(q))
    assert not np.all(np.isfinite(y[2]))
    keep = np.r_[0:2, 3:6]
    np.testing.assert_array_equal(y[keep], np.asarray(nf4.dequantize(clean))[keep])


def test_non_finite_with_double_quant_spoils_only_its_nested_block(rng):
    x = rng.normal(size=(3 * 256, 64)).astype(F32)  # 768 NF4 blocks, 3 nested blocks
    x[300, 7] = np.nan
    q = nf4.double_quantize(jnp.asarray(x))
    y = np.asarray(nf4.dequantize(q))
    assert np.all(np.isnan(y[256:512]))
    assert np.all(np.isfinite(y[:256])) and np.all(np.isfinite(y[512:]))
    assert np.isfinite(float(q.offset))
    finite_absmax = np.abs(np.delete(x, 300, axis=0)).max(axis=1)
    assert float(q.offset) == pytest.approx(float(finite_absmax.mean()), rel=1e-6)


def test_validate_names_the_first_bad_index():
    x = np.ones((3, 4), F32)
    x[1, 2] = np.inf
    x[2, 0] = np.nan
    with pytest.raises(NonFiniteError, match=r"argument 'x': expected finite values, got inf at index \(1, 2\)"):
        nf4.quantize(jnp.asarray(x), validate=True)
    with pytest.raises(NonFiniteError, match=r"index \(1, 2\)"):
        nf4.double_quantize(jnp.asarray(x), validate=True)
    assert nf4.quantize(jnp.ones(4), validate=True).absmax.tolist() == [1.0]
    with pytest.raises(InvalidOp, match="validate"):
        jax.jit(lambda v: nf4.quantize(v, validate=True))(jnp.ones(4))


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------
def test_error_paths():
    with pytest.raises(DTypeError, match=r"argument 'x': expected a float32, bfloat16 or float16 array, got int32"):
        nf4.quantize(jnp.arange(4))
    with pytest.raises(InvalidShape, match=r"expected at least one value, got an empty array of shape \(0, 3\)"):
        nf4.quantize(jnp.zeros((0, 3)))
    with pytest.raises(InvalidShape, match="empty"):
        nf4.double_quantize(jnp.zeros((0,)))
    for bad in (0, -64, 63, 64.0, True, "64"):
        with pytest.raises(ConfigError, match="argument 'block_size': expected a positive even integer"):
            nf4.quantize(jnp.ones(4), block_size=bad)
    with pytest.raises(ConfigError, match="argument 'nested_block_size': expected a positive integer, got 0"):
        nf4.double_quantize(jnp.ones(4), nested_block_size=0)
    with pytest.raises(FormatError, match="argument 'q': expected an NF4Tensor or NF4DQTensor, got ndarray"):
        nf4.dequantize(np.ones(3))
    with pytest.raises(ConfigError, match="argument 'config': expected an NF4Config, got dict"):
        nf4.quantize(jnp.ones(4), config={"block_size": 64})
    msg = r"argument 'block_size': expected 128 \(the block size of 'config'\), got 32"
    with pytest.raises(ConfigError, match=msg):
        nf4.quantize(jnp.ones(4), block_size=32, config=nf4.NF4Config(block_size=128))
    with pytest.raises(ShapeMismatch, match=r"argument 'original': expected shape \(4,\), got \(2, 2\)"):
        nf4.compute_stats(jnp.ones((2, 2)), nf4.quantize(jnp.ones(4)))


# ----------------------------------------------------------------------------------------------------
# Transformations
# ----------------------------------------------------------------------------------------------------
def test_no_retracing():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def roundtrip(v):
        return nf4.dequantize(nf4.double_quantize(v))

    for seed in range(3):
        roundtrip(jax.random.normal(jax.random.key(seed), (8, 64)))


# ----------------------------------------------------------------------------------------------------
# Gleam API, registry
# ----------------------------------------------------------------------------------------------------
def test_config_and_stats(rng):
    assert nf4.default_config() == nf4.NF4Config(block_size=64, double_quant=False)
    x = jnp.asarray(rng.normal(size=(128, 64)).astype(F32))
    q = nf4.quantize(x, config=nf4.NF4Config(block_size=128))
    assert isinstance(q, nf4.NF4Tensor) and q.block_size == 128
    dq = nf4.quantize(x, config=nf4.NF4Config(double_quant=True))
    assert isinstance(dq, nf4.NF4DQTensor)
    s = nf4.compute_stats(x, q)
    err = np.abs(np.asarray(x) - np.asarray(nf4.dequantize(q)))
    assert s.original_bytes == 128 * 64 * 4 and s.quantized_bytes == 128 * 64 // 2 + 4 * 64
    assert s.compression_ratio == pytest.approx(s.original_bytes / s.quantized_bytes)
    assert s.mean_error == pytest.approx(float(err.mean()), rel=1e-5)
    assert s.max_error == pytest.approx(float(err.max()), rel=1e-6)


def test_registered_formats():
    assert FORMATS["nf4"].record is nf4.NF4Tensor and FORMATS["nf4"].quantize is nf4.quantize
    assert FORMATS["nf4_dq"].record is nf4.NF4DQTensor and FORMATS["nf4_dq"].dequantize is nf4.dequantize
    assert nf4.NF4Tensor.format == "nf4" and nf4.NF4DQTensor.format == "nf4_dq"


# ----------------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------------
# A fixed menu of shapes (odd, even, scalar, 3-D) keeps the number of compilations small.
shapes = st.sampled_from([(), (1,), (7,), (3, 5), (4, 4, 6), (2, 65), (9, 9)])


@given(
    shape=shapes,
    scale=st.floats(1e-3, 1e3),
    block=st.sampled_from([8, 64]),
    seed=st.integers(0, 2**16),
    double=st.booleans(),
)
def test_property_round_trip(shape, scale, block, seed, double):
    r = np.random.default_rng(seed)
    x = (r.standard_t(4, size=shape) * scale).astype(F32)
    if double:
        q = nf4.double_quantize(jnp.asarray(x), block_size=block, nested_block_size=4)
    else:
        q = nf4.quantize(jnp.asarray(x), block_size=block)
    n = max(1, math.prod(shape))
    assert q.codes.shape == ((n + 1) // 2,)
    y = np.asarray(nf4.dequantize(q))
    assert y.shape == x.shape and y.dtype == x.dtype
    flat = np.zeros(-(-n // block) * block, F32)
    flat[:n] = x.reshape(-1)
    absmax = np.repeat(np.abs(flat.reshape(-1, block)).max(axis=1), block)[:n]
    tol = np.max(np.diff(LEVELS)) / 2 + (0.03 if double else 1e-6)
    assert np.all(np.abs(x.reshape(-1) - y.reshape(-1)) <= absmax * tol + 1e-6 * scale)
    if not double:
        codes, am = ref_quantize(x, block)
        np.testing.assert_array_equal(np.asarray(q.codes), codes)


# ----------------------------------------------------------------------------------------------------
# Compiled memory (XLA's analysis: stable, not a timing)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("double", [False, True])
def test_compiled_memory_is_linear_and_small(double):
    from viva_tensor.memory import compiled_memory

    f = nf4.double_quantize if double else nf4.quantize
    x = jax.ShapeDtypeStruct((1024, 1024), jnp.float32)
    m = compiled_memory(f, x)
    # no (n, 15) comparison array: temporaries stay well under the 4 MiB input
    assert m.temp_bytes <= 1.5 * 2**20  # (+ 256 KiB since the overflow-safe offset of the 16384 absmax)
    q = f(jnp.ones((1024, 1024)))
    assert 0 <= m.output_bytes - q.nbytes <= 64  # the buffers, plus the output tuple's pointers
    d = compiled_memory(nf4.dequantize, q)
    assert d.temp_bytes <= 4 * 2**20 and d.output_bytes == 4 * 2**20


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("scale", [2.0**126, 1e38, 3e38, 3.4e38])
@pytest.mark.parametrize("double", [False, True])
def test_huge_values_keep_their_codes(scale, double, jit):
    # Above ~2**126 the reciprocal of the absmax is subnormal (flushed by XLA:CPU): every code became level 0.
    base = np.random.default_rng(1).standard_normal(256).astype(np.float32)
    base /= np.abs(base).max()
    x = jnp.asarray(base * np.float32(scale))
    f = nf4.double_quantize if double else nf4.quantize
    f = jax.jit(f) if jit else f
    y = np.asarray(nf4.dequantize(f(x)), np.float64)
    ref = np.asarray(nf4.dequantize(nf4.quantize(jnp.asarray(base))), np.float64) * scale
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, ref, rtol=0.02, atol=0.02 * scale)


def test_double_quant_validate_flags_an_outlier():
    # One outlier (1e6) makes the 8-bit absmax codes too coarse: small blocks decode far off (as bitsandbytes).
    x = jax.random.normal(jax.random.key(0), (256, 256)).reshape(-1)
    nf4.double_quantize(x, validate=True)  # ordinary: within the tolerance
    y = x.at[5].set(1e6)
    got = np.asarray(nf4.dequantize(nf4.double_quantize(y)))
    assert np.abs(got[64:] - np.asarray(y)[64:]).max() > 1.0  # the silent loss (validate=False)
    with pytest.raises(NonFiniteError, match="double-quantized absmax") as e:
        nf4.double_quantize(y, validate=True)
    assert e.value.argument == "x" and "block" in e.value.got


def test_double_quant_validate_passes_zero_blocks_and_the_contract_sample():
    from format_contract import sample

    nf4.double_quantize(sample(), validate=True)
    nf4.double_quantize(jnp.zeros(256), validate=True)
