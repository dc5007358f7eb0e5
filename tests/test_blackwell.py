"""Tests of viva_tensor.blackwell against NumPy references written from the format definitions.

E2M1, E4M3 and E8M0 are decoded here by hand from their bit fields (no jnp casts): E2M1 is
sign | 2 exponent bits (bias 1) | 1 mantissa bit; E4M3 (fn) is sign | 4 exponent bits (bias 7) |
3 mantissa bits, with S.1111.111 the only NaN; E8M0 is a biased exponent, 2**(byte - 127), 0xFF NaN.
Encoding rounds to the nearest value, ties to the even code, saturating. NVFP4 follows NVIDIA
TensorRT Model Optimizer's NVFP4QTensor; MXFP4 follows OCP MX spec v1.0 section 6.3.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from viva_tensor import blackwell as bw
from viva_tensor._formats import packing
from viva_tensor._formats.registry import FORMATS
from viva_tensor.errors import DTypeError, FormatError, InvalidOp, InvalidShape, NonFiniteError

F32 = np.float32


# ----------------------------------------------------------------------------------------------------
# Bit-level codecs, by hand
# ----------------------------------------------------------------------------------------------------
def e2m1_decode(code):
    code = np.asarray(code, np.int64)
    sign, exp, man = (code >> 3) & 1, (code >> 1) & 3, code & 1
    mag = np.where(exp == 0, man * 0.5, 2.0 ** (exp - 1) * (1 + man / 2))
    return np.where(sign == 1, -mag, mag)


E2M1_POS = e2m1_decode(np.arange(8))


def e2m1_encode(v, *, negative):
    """Nearest E2M1 magnitude code (ties to the even code), saturating at 6; sign bit from ``negative``."""
    a = np.minimum(np.abs(np.asarray(v, np.float64)), 6.0)
    code = _nearest_even(a, E2M1_POS)
    return (code + 8 * negative.astype(np.int64)).astype(np.uint8)


def _nearest_even(a, table):
    """Index of the nearest table entry; of two equally near (adjacent) entries, the even index."""
    d = np.abs(a[..., None] - table)
    nearest = d == d.min(axis=-1, keepdims=True)
    even = nearest & (np.arange(table.size) % 2 == 0)
    return np.where(even.any(axis=-1), np.argmax(even, axis=-1), np.argmax(nearest, axis=-1))


def e4m3_decode(byte):
    byte = np.asarray(byte, np.int64)
    sign, exp, man = (byte >> 7) & 1, (byte >> 3) & 15, byte & 7
    mag = np.where(exp == 0, man / 8 * 2.0**-6, 2.0 ** (exp - 7) * (1 + man / 8))
    mag = np.where((exp == 15) & (man == 7), np.nan, mag)
    return np.where(sign == 1, -mag, mag)


E4M3_POS = e4m3_decode(np.arange(127))  # 0 .. 448


def e4m3_encode_positive(v):
    """Nearest E4M3 code of a non-negative value <= 448 (ties to even); NaN -> 0x7F."""
    v = np.asarray(v, np.float64)
    safe = np.where(np.isnan(v), 0, v)
    code = _nearest_even(safe, E4M3_POS)
    return np.where(np.isnan(v), 0x7F, code).astype(np.uint8)


def pack_low_first(codes):
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack_low_first(packed):
    return np.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def _blocks(x, block):
    x = np.asarray(x, F32)
    x = x.reshape(x.shape if x.ndim else (1,))
    last = x.shape[-1]
    nb = -(-last // block)
    pad = np.zeros((*x.shape[:-1], nb * block), F32)
    pad[..., :last] = x
    return pad.reshape(*x.shape[:-1], nb, block)


def ref_nvfp4(x):
    """ModelOpt's NVFP4QTensor.quantize in NumPy, with this library's documented zero/NaN choices."""
    b = _blocks(x, 16)
    finite = np.isfinite(b)
    mag = np.where(finite, np.abs(b), F32(0))
    g = F32(mag.max() / F32(6.0 * 448.0))
    six_g = F32(F32(6.0) * g)
    block_amax = mag.max(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(six_g > 0, (block_amax / six_g).astype(F32), F32(0))
    s = np.where(s == 0, F32(1), s)
    s = np.minimum(s, F32(448))
    s = np.where(finite.all(axis=-1), s, np.nan)
    scale_bytes = e4m3_encode_positive(s)
    denom = (e4m3_decode(scale_bytes).astype(F32) * g).astype(F32)[..., None]
    denom = np.where(denom > 0, denom, F32(np.inf))  # documented: a zero scale gives zeros
    scaled = (b / denom).astype(F32)
    codes = e2m1_encode(scaled, negative=np.signbit(scaled))
    packed = pack_low_first(codes.reshape(*codes.shape[:-2], -1))
    return packed, scale_bytes, g


def ref_mxfp4(x):
    """OCP MX v1.0 6.3: X = 2**(floor(log2 amax) - emax_elem) clamped to E8M0; elements e2m1(x / X)."""
    b = _blocks(x, 32)
    finite = np.isfinite(b)
    amax = np.where(finite, np.abs(b), 0).max(axis=-1).astype(np.float64)
    _, e = np.frexp(amax)  # amax = m * 2**e with m in [0.5, 1): floor(log2 amax) = e - 1
    shared = np.where(amax > 0, e - 1 - 2, -127)
    shared = np.clip(shared, -127, 127)
    scale_bytes = np.where(finite.all(axis=-1), shared + 127, 255).astype(np.uint8)
    scaled = b.astype(np.float64) / (2.0 ** shared)[..., None]
    codes = e2m1_encode(scaled, negative=np.signbit(scaled))
    packed = pack_low_first(codes.reshape(*codes.shape[:-2], -1))
    return packed, scale_bytes


def ref_dequant(packed, scale, block, shape, dtype):
    """Codes times the per-block float scale, padding dropped."""
    vals = e2m1_decode(unpack_low_first(packed)).astype(F32)
    vals = vals.reshape(*scale.shape, block) * scale.astype(F32)[..., None]
    last = shape[-1] if shape else 1
    flat = vals.reshape(*vals.shape[:-2], -1)[..., :last].astype(F32)
    return flat.reshape(shape).astype(dtype)


def scale_bytes_of(q):
    return np.asarray(jax.lax.bitcast_convert_type(q.scales, jnp.uint8))


# ----------------------------------------------------------------------------------------------------
# Tables and hand-checked vectors
# ----------------------------------------------------------------------------------------------------
def test_e2m1_table_from_bits():
    assert E2M1_POS.tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    np.testing.assert_array_equal(bw.E2M1_VALUES, e2m1_decode(np.arange(16)).astype(F32))
    assert np.signbit(bw.E2M1_VALUES[8])


def test_e4m3_lookup_table_equals_bit_decode_for_every_byte():
    table = packing.E4M3_TABLE
    assert table.dtype == np.float32 and table.shape == (256,)
    by_hand = e4m3_decode(np.arange(256)).astype(F32)
    np.testing.assert_array_equal(table, by_hand)  # NaN == NaN here
    np.testing.assert_array_equal(np.signbit(table), np.arange(256) >= 128)  # -0.0 for 0x80
    assert np.isnan(table).sum() == 2 and np.isnan(table[[0x7F, 0xFF]]).all()
    # and the traced decode gives those bits for every byte
    scales = jax.lax.bitcast_convert_type(jnp.arange(256, dtype=jnp.uint8), jnp.float8_e4m3fn)
    traced = np.asarray(jax.jit(bw._e4m3_to_float32)(scales))
    np.testing.assert_array_equal(traced.view(np.uint32), by_hand.view(np.uint32))


def test_e2m1_pair_table_equals_bit_decode_for_every_byte():
    codes = jnp.arange(256, dtype=jnp.uint8).reshape(4, 64)
    got = np.asarray(jax.jit(bw._unpack_e2m1)(codes)).reshape(256, 2)
    byte = np.arange(256)
    want = np.stack([e2m1_decode(byte & 0xF), e2m1_decode(byte >> 4)], axis=-1).astype(F32)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))  # first value low, -0.0 kept


def test_mxfp4_e8m0_decode_for_every_scale_byte():
    # one block per scale byte, every element code 2 (1.0) but the second, code 7 (6.0): value = scale
    codes = np.full((256, 16), 0x02 | (0x02 << 4), np.uint8)
    codes[:, 0] = 0x02 | (0x07 << 4)
    q = bw.MXFP4Tensor(codes=jnp.asarray(codes), scales=jnp.arange(256, dtype=jnp.uint8)[:, None], shape=(256, 32),
                       dtype=jnp.float32)  # fmt: skip
    got = np.asarray(jax.jit(bw.dequantize)(q), np.float64)
    byte = np.arange(256)
    scale = np.where(byte == 255, np.nan, 2.0 ** (byte - 127.0))  # E8M0 by definition
    np.testing.assert_array_equal(got[1:, 0], scale[1:])
    with np.errstate(over="ignore"):
        six = (6 * scale[1:]).astype(np.float32)  # 6 * 2**127 overflows float32: inf, as the decode gives
    np.testing.assert_array_equal(got[1:, 1], six)
    assert got[0, 0] in (0.0, 2.0**-127)  # 2**-127 is subnormal: XLA on CPU may flush it to zero


def test_e4m3_scales_are_real_e4m3_bytes():
    assert E4M3_POS[-1] == 448 and E4M3_POS[1] == 2.0**-9
    # the library's float8_e4m3fn bytes decode (by hand) to the float values jax reports
    q = bw.quantize_nvfp4(jnp.asarray(np.random.default_rng(1).normal(size=(8, 64)).astype(F32)))
    assert q.scales.dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(e4m3_decode(scale_bytes_of(q)), np.asarray(q.scales.astype(jnp.float32)))


def test_nvfp4_hand_vector():
    x = np.zeros(32, F32)
    x[:4] = [2688.0, 448.0, -224.0, 0.0]
    x[16:] = 1.0
    q = bw.quantize_nvfp4(jnp.asarray(x))
    assert float(q.tensor_scale) == 1.0  # 2688 / (6 * 448)
    # block 0: scale 448 (0x7E); 2688/448 = 6 -> 7, 1 -> 2, -0.5 -> 9, 0 -> 0: bytes 0x27, 0x09 (low first)
    # block 1: scale e4m3(1/6) = 0.171875 (0x23); 1/0.171875 = 5.82 -> 6 (code 7)
    assert scale_bytes_of(q).tolist() == [0x7E, 0x23]
    assert np.asarray(q.codes).tolist() == [0x27, 0x09] + [0] * 6 + [0x77] * 8
    y = np.asarray(bw.dequantize(q))
    assert y[:4].tolist() == [2688.0, 448.0, -224.0, 0.0] and y[16] == 6 * 0.171875


def test_mxfp4_ties_round_to_even_and_saturate():
    v = [7.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.0, -0.1, -7.0, 0.2]
    q = bw.quantize_mxfp4(jnp.asarray(np.array(v, F32)))
    assert q.scales.tolist() == [127]  # floor(log2 7) - 2 = 0
    codes = unpack_low_first(np.asarray(q.codes))[: len(v)]
    assert codes.tolist() == [7, 0, 2, 2, 4, 4, 6, 6, 8, 8, 15, 0]
    assert np.asarray(q.codes)[0] == 0x07  # first value in the low nibble


def test_nvfp4_sign_bit_is_the_float_sign_bit():
    q = bw.quantize_nvfp4(jnp.asarray(np.array([6.0, -0.0, -0.1, 0.1, -6.0], F32)))
    # scale 448 * (6 / 2688): -0.0 -> -0 (8), -0.1 / 1.0 rounds to -0 (8), 0.1 -> 0, -6 -> 15
    assert unpack_low_first(np.asarray(q.codes))[:5].tolist() == [7, 8, 8, 0, 15]


def test_mxfp4_scale_exponent_from_bits():
    amax = np.array([1.0, 1.5, 4.0, 7.99, 8.0, 2.0**-120, 2.0**-126, 3e38, 1e-30], F32)
    x = np.zeros((amax.size, 32), F32)
    x[:, 3] = amax
    q = bw.quantize_mxfp4(jnp.asarray(x))
    want = np.clip(np.floor(np.log2(amax.astype(np.float64))) - 2, -127, 127) + 127
    assert q.scales[:, 0].tolist() == want.astype(int).tolist()
    assert q.scales.dtype == jnp.uint8


# ----------------------------------------------------------------------------------------------------
# Against the references
# ----------------------------------------------------------------------------------------------------
SHAPES = [(4, 64), (3, 37), (5,), (), (2, 3, 33), (1, 100)]


@pytest.mark.parametrize("shape", SHAPES)
def test_nvfp4_matches_reference(shape, dtype, maybe_jit, rng):
    x = jnp.asarray(rng.standard_t(3, size=shape).astype(F32) * 2, dtype=dtype)
    q = maybe_jit(bw.quantize_nvfp4)(x)
    packed, sbytes, g = ref_nvfp4(np.asarray(x.astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(q.codes), packed)
    np.testing.assert_array_equal(scale_bytes_of(q), sbytes)
    assert np.asarray(q.tensor_scale) == g and q.tensor_scale.dtype == jnp.float32
    y = maybe_jit(bw.dequantize)(q)
    assert y.shape == x.shape and y.dtype == x.dtype
    scale = (e4m3_decode(sbytes).astype(F32) * g).astype(F32)
    np.testing.assert_array_equal(np.asarray(y), ref_dequant(packed, scale, 16, shape, np.dtype(dtype)))


@pytest.mark.parametrize("shape", SHAPES)
def test_mxfp4_matches_reference(shape, dtype, maybe_jit, rng):
    x = jnp.asarray(rng.standard_t(3, size=shape).astype(F32) * 2, dtype=dtype)
    q = maybe_jit(bw.quantize_mxfp4)(x)
    packed, sbytes = ref_mxfp4(np.asarray(x.astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(q.codes), packed)
    np.testing.assert_array_equal(np.asarray(q.scales), sbytes)
    y = maybe_jit(bw.dequantize)(q)
    assert y.shape == x.shape and y.dtype == x.dtype
    scale = (2.0 ** (sbytes.astype(np.float64) - 127)).astype(F32)
    np.testing.assert_array_equal(np.asarray(y), ref_dequant(packed, scale, 32, shape, np.dtype(dtype)))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_float16_and_wide_range(fmt, rng):
    x16 = jnp.asarray(rng.normal(size=(6, 48)), jnp.float16)
    f = bw.quantize_nvfp4 if fmt == "nvfp4" else bw.quantize_mxfp4
    ref = ref_nvfp4 if fmt == "nvfp4" else ref_mxfp4
    q = f(x16)
    np.testing.assert_array_equal(np.asarray(q.codes), ref(np.asarray(x16, F32))[0])
    assert bw.dequantize(q).dtype == jnp.float16
    # values spanning 60 binades: blocks far below the tensor amax exercise E4M3 subnormal scales
    wide = (rng.normal(size=(64, 32)) * 2.0 ** rng.integers(-30, 30, size=(64, 1))).astype(F32)
    q = f(jnp.asarray(wide))
    np.testing.assert_array_equal(np.asarray(q.codes), ref(wide)[0])
    np.testing.assert_array_equal(scale_bytes_of(q) if fmt == "nvfp4" else np.asarray(q.scales), ref(wide)[1])


# ----------------------------------------------------------------------------------------------------
# Sizes and quality
# ----------------------------------------------------------------------------------------------------
def test_bits_per_value_measured():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(256, 256)).astype(F32))
    n = x.size
    q = bw.quantize_nvfp4(x)
    assert q.codes.shape == (256, 128) and q.scales.shape == (256, 16)
    assert q.nbytes == n // 2 + n // 16 + 4
    assert q.bits_per_value == 4.5 + 32 / n
    m = bw.quantize_mxfp4(x)
    assert m.codes.shape == (256, 128) and m.scales.shape == (256, 8)
    assert m.nbytes == n // 2 + n // 32 and m.bits_per_value == 4.25
    assert m.compression_ratio == pytest.approx(32 / 4.25)


def test_padding_is_internal():
    q = bw.quantize_mxfp4(jnp.ones((3, 33)))
    assert q.codes.shape == (3, 32) and q.scales.shape == (3, 2)
    assert bw.dequantize(q).shape == (3, 33)
    assert bw.dequantize(bw.quantize_nvfp4(jnp.float32(2.5))).shape == ()


def _sqnr(x, y):
    e = np.asarray(x, np.float64) - np.asarray(y, np.float64)
    return 10 * np.log10(np.sum(np.asarray(x, np.float64) ** 2) / np.sum(e * e))


def test_error_bounds_and_sqnr(rng):
    x = rng.normal(size=(256, 256)).astype(F32)
    q = bw.quantize_nvfp4(jnp.asarray(x))
    y = np.asarray(bw.dequantize(q))
    denom = np.repeat(np.asarray(q.scales.astype(jnp.float32)) * float(q.tensor_scale), 16, axis=-1)
    assert np.all(np.abs(x - y) <= denom * 1.0 + 1e-7)  # half the largest E2M1 gap (4 -> 6) or saturation
    assert 19.5 < _sqnr(x, y) < 22
    m = bw.quantize_mxfp4(jnp.asarray(x))
    ym = np.asarray(bw.dequantize(m))
    X = np.repeat(2.0 ** (np.asarray(m.scales, np.float64) - 127), 32, axis=-1)
    assert np.all(np.abs(x - ym) <= 2 * X)  # saturation of values in [6, 8) * X costs < 2X
    assert 17.5 < _sqnr(x, ym) < 20.5
    t = rng.standard_t(3, size=(256, 256)).astype(F32)
    assert _sqnr(t, bw.dequantize(bw.quantize_nvfp4(jnp.asarray(t)))) > 17
    assert _sqnr(t, bw.dequantize(bw.quantize_mxfp4(jnp.asarray(t)))) > 15


# ----------------------------------------------------------------------------------------------------
# Zeros, non-finite values, validation, errors
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_zero_blocks_and_zero_tensor(fmt, rng):
    f = bw.quantize_nvfp4 if fmt == "nvfp4" else bw.quantize_mxfp4
    x = rng.normal(size=(4, 64)).astype(F32)
    x[1] = 0
    y = np.asarray(bw.dequantize(f(jnp.asarray(x))))
    assert np.all(y[1] == 0)
    z = f(jnp.zeros((3, 40), jnp.bfloat16))
    assert np.all(np.asarray(z.codes) == 0)
    yz = np.asarray(bw.dequantize(z), F32)
    assert np.all(yz == 0) and not np.any(np.isnan(yz))
    if fmt == "nvfp4":
        assert float(z.tensor_scale) == 0 and np.all(np.asarray(z.scales.astype(jnp.float32)) == 1)
    else:
        assert np.all(np.asarray(z.scales) == 0)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_spoils_only_its_block(fmt, bad, rng):
    f = bw.quantize_nvfp4 if fmt == "nvfp4" else bw.quantize_mxfp4
    x = rng.normal(size=(4, 64)).astype(F32)
    x[2, 5] = 0.0
    clean = np.asarray(bw.dequantize(f(jnp.asarray(x))))
    x[2, 5] = bad
    q = f(jnp.asarray(x))
    y = np.asarray(bw.dequantize(q))
    block = 16 if fmt == "nvfp4" else 32
    assert np.all(np.isnan(y[2, :block]))
    mask = np.ones_like(y, bool)
    mask[2, :block] = False
    np.testing.assert_array_equal(y[mask], clean[mask])
    assert np.isfinite(float(q.tensor_scale)) if fmt == "nvfp4" else np.asarray(q.scales)[2, 0] == 255


@pytest.mark.parametrize("f", [bw.quantize_nvfp4, bw.quantize_mxfp4])
def test_validate(f):
    x = np.ones((2, 3), F32)
    x[1, 1] = np.nan
    with pytest.raises(NonFiniteError, match=r"argument 'x': expected finite values, got nan at index \(1, 1\)"):
        f(jnp.asarray(x), validate=True)
    f(jnp.ones(3), validate=True)
    with pytest.raises(InvalidOp, match="argument 'validate'"):
        jax.jit(lambda v: f(v, validate=True))(jnp.ones(3))


@pytest.mark.parametrize("f", [bw.quantize_nvfp4, bw.quantize_mxfp4])
def test_error_paths(f):
    with pytest.raises(DTypeError, match="argument 'x': expected a float32, bfloat16 or float16 array, got int32"):
        f(jnp.arange(3))
    with pytest.raises(InvalidShape, match=r"expected at least one value, got an empty array of shape \(2, 0\)"):
        f(jnp.zeros((2, 0)))
    with pytest.raises(FormatError, match="argument 'q': expected an NVFP4Tensor or MXFP4Tensor, got str"):
        bw.dequantize("q")


# ----------------------------------------------------------------------------------------------------
# Transformations
# ----------------------------------------------------------------------------------------------------
def test_registered_formats():
    assert FORMATS["nvfp4"].record is bw.NVFP4Tensor and FORMATS["nvfp4"].block_size == 16
    assert FORMATS["mxfp4"].record is bw.MXFP4Tensor and FORMATS["mxfp4"].block_size == 32
    assert FORMATS["mxfp4"].dequantize is bw.dequantize


# ----------------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------------
@given(
    shape=st.sampled_from([(), (3,), (2, 17), (4, 32), (2, 2, 50)]),
    log_scale=st.integers(-20, 20),
    seed=st.integers(0, 2**16),
    fmt=st.sampled_from(["nvfp4", "mxfp4"]),
    dt=st.sampled_from(["float32", "bfloat16"]),
)
def test_property_matches_reference(shape, log_scale, seed, fmt, dt):
    r = np.random.default_rng(seed)
    x = jnp.asarray((r.standard_t(3, size=shape) * 2.0**log_scale).astype(F32), dtype=dt)
    x32 = np.asarray(x.astype(jnp.float32))
    if fmt == "nvfp4":
        q = bw.quantize_nvfp4(x)
        packed, sbytes, _ = ref_nvfp4(x32)
        np.testing.assert_array_equal(scale_bytes_of(q), sbytes)
    else:
        q = bw.quantize_mxfp4(x)
        packed, sbytes = ref_mxfp4(x32)
        np.testing.assert_array_equal(np.asarray(q.scales), sbytes)
    np.testing.assert_array_equal(np.asarray(q.codes), packed)
    y = bw.dequantize(q)
    assert y.shape == x.shape and y.dtype == x.dtype
    amax = np.abs(x32).max()
    assert np.all(np.abs(np.asarray(y, F32) - x32) <= amax * 0.5 + 1e-30)


@pytest.mark.parametrize("f", [bw.quantize_nvfp4, bw.quantize_mxfp4])
def test_compiled_memory_is_small(f):
    from viva_tensor.memory import compiled_memory

    x = jax.ShapeDtypeStruct((1024, 1024), jnp.float32)
    m = compiled_memory(f, x)
    assert m.temp_bytes <= 0.6 * 2**20  # well under the 4 MiB input
    assert 0 <= m.output_bytes - f(jnp.ones((1024, 1024))).nbytes <= 64  # plus the tuple's pointers


@pytest.mark.parametrize("jit", [False, True])
def test_nvfp4_tensor_scale_is_an_exact_division(jit):
    # 72.97671 * (1 / 2688) rounds one ulp away from 72.97671 / 2688 (XLA:CPU's rewrite under jit).
    amax = np.float32(72.97671)
    assert amax * (np.float32(1) / np.float32(2688)) != amax / np.float32(2688)
    x = jnp.zeros(16, jnp.float32).at[3].set(amax)
    f = jax.jit(bw.quantize_nvfp4) if jit else bw.quantize_nvfp4
    got = np.float32(f(x).tensor_scale)
    assert got.view(np.uint32) == (amax / np.float32(2688)).view(np.uint32)
