"""quant.fake_quantize: the round trip bit for bit, a straight-through gradient that is zero where the format clips.

References: ``dequantize(quantize(x))`` (the forward, compared bit for bit), and the clip mask written in NumPy from
each format's definition, read from the record's bytes as GGML's C, OCP MX and the compressed-tensors layout describe
them (``get_scale_min_k4``, the Q3_K scale shuffle, E4M3/E8M0 scales, packed zero points).
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from viva_tensor import quant
from viva_tensor.errors import DTypeError, FormatError

FORMATS = quant.format_names()
SHAPE = (4, 256)  # rows of 256 for the K-quants, whole groups of 128 for int4_group / awq_int4


def _x(dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE) * np.exp(rng.standard_normal(SHAPE))  # heavy tails: some blocks clip
    return jnp.asarray(x, dtype)


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


# ------------------------------------------------------------------------------------ the mask, from the definition


def _np(a):
    return np.asarray(a).astype(np.float64)


def _blocks(x, n):
    flat = x.reshape(-1)
    nb = -(-flat.size // n)
    return np.pad(flat, (0, nb * n - flat.size)).reshape(nb, n)


def _inside(x, scale, offset, qmin, qmax):
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(scale != 0, (x - offset) / np.where(scale != 0, scale, 1), 0)
    return (t > qmin - 0.5) & (t < qmax + 0.5)


def _k4_scales(s):
    """get_scale_min_k4 of ggml-quants.c for j = 0..7: (sc, m) of each 12-byte block."""
    s = np.asarray(s).astype(np.int64)
    sc, m = np.zeros((s.shape[0], 8), np.int64), np.zeros((s.shape[0], 8), np.int64)
    for j in range(8):
        if j < 4:
            sc[:, j], m[:, j] = s[:, j] & 63, s[:, j + 4] & 63
        else:
            sc[:, j] = (s[:, j + 4] & 0xF) | ((s[:, j - 4] >> 6) << 4)
            m[:, j] = (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)
    return sc, m


def _q3_scales(s):
    """dequantize_row_q3_K's kmask shuffle of the 12 scale bytes: 16 signed 6-bit scales."""
    aux = np.ascontiguousarray(np.asarray(s, np.uint8)).view("<u4").astype(np.uint64)
    k1, k2 = 0x03030303, 0x0F0F0F0F
    tmp = aux[:, 2]
    out = np.stack([
        (aux[:, 0] & k2) | (((tmp >> 0) & k1) << 4),
        (aux[:, 1] & k2) | (((tmp >> 2) & k1) << 4),
        ((aux[:, 0] >> 4) & k2) | (((tmp >> 4) & k1) << 4),
        ((aux[:, 1] >> 4) & k2) | (((tmp >> 6) & k1) << 4),
    ], axis=1).astype("<u4")  # fmt: skip
    return out.view(np.uint8).reshape(-1, 16).astype(np.int64) - 32


def reference_mask(x, q, options=None) -> np.ndarray:
    """Where the clamp of ``q``'s quantizer does not bind on ``x`` (and ``x`` is finite), from the definitions."""
    options = options or {}
    x = _np(np.asarray(x, np.float32))
    fmt = q.format
    finite = np.isfinite(x)
    never = ("int8", "q8_0", "q4_1", "nf4", "nf4_dq", "bnb_fp4", "bnb_fp4_dq")
    if fmt in never or (fmt == "q5_1" and "imatrix" not in options):
        return finite
    if fmt in ("q4_0", "q5_0"):
        half = 8 if fmt == "q4_0" else 16
        m = _inside(_blocks(x, 32), _np(q.d)[:, None], 0, -half, half - 1)
    elif fmt == "q5_1":
        m = _inside(_blocks(x, 32), _np(q.d)[:, None], _np(q.m)[:, None], 0, 31)
    elif fmt == "q2_k":
        s = np.asarray(q.scales).astype(np.int64)
        dl, ml = _np(q.d)[:, None] * (s & 15), _np(q.dmin)[:, None] * (s >> 4)
        m = _inside(_blocks(x, 256).reshape(-1, 16, 16), dl[..., None], -ml[..., None], 0, 3)
    elif fmt == "q3_k":
        dl = _np(q.d)[:, None] * _q3_scales(q.scales)
        m = _inside(_blocks(x, 256).reshape(-1, 16, 16), dl[..., None], 0, -4, 3)
    elif fmt in ("q4_k", "q5_k"):
        sc, mn = _k4_scales(q.scales)
        d1, m1 = _np(q.d)[:, None] * sc, _np(q.dmin)[:, None] * mn
        m = _inside(_blocks(x, 256).reshape(-1, 8, 32), d1[..., None], -m1[..., None], 0, 15 if fmt == "q4_k" else 31)
    elif fmt == "q6_k":
        dl = _np(q.d)[:, None] * np.asarray(q.scales).astype(np.int64)
        m = _inside(_blocks(x, 256).reshape(-1, 16, 16), dl[..., None], 0, -32, 31)
    elif fmt in ("nvfp4", "mxfp4"):
        b = q.block_size
        if fmt == "nvfp4":
            scale = np.asarray(q.scales).view(ml_dtypes.float8_e4m3fn).astype(np.float64) * float(q.tensor_scale)
        else:
            scale = 2.0 ** (np.asarray(q.scales).astype(np.float64) - 127)
        xb = x.reshape(x.shape[0], -1, b)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(scale[..., None] != 0, xb / scale[..., None], 0)
        return finite & (np.abs(t) < 7).reshape(x.shape)
    else:  # int4_group, awq_int4: (code - zero) * scale per group of the last axis
        g = q.group_size
        w = x * _np(q.act_scale)[None, :] if fmt == "awq_int4" else x
        packed = np.asarray(q.zeros)
        zeros = np.stack([packed & 15, packed >> 4], axis=-1).reshape(packed.shape[0], -1)[:, : w.shape[1] // g]
        inside = _inside(w.reshape(w.shape[0], -1, g), _np(q.scales)[..., None], -_np(zeros)[..., None] * _np(
            q.scales)[..., None], 0, 15).reshape(x.shape)
        if "clip" in options:
            inside &= np.abs(x) <= np.repeat(_np(options["clip"]), g, axis=1)
        return finite & inside
    return finite & m.reshape(-1)[: x.size].reshape(x.shape)


# ------------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("fmt", FORMATS)
def test_forward_is_the_round_trip_bit_for_bit_and_the_gradient_is_the_mask(fmt, dtype):
    """Every format in float32 and bfloat16, each once eagerly and once under jit (alternating by format and dtype,
    the K-quants' searches are slow to compile): value bits, then ``x_bar = where(mask, upstream, 0)``."""
    x = _x(dtype).at[0, :3].set(jnp.asarray([-0.0, 0.0, 1e-30], dtype))
    want = quant.dequantize(quant.quantize(x, fmt))
    c = jnp.asarray(np.random.default_rng(2).standard_normal(SHAPE), dtype)
    mask = reference_mask(x, quant.quantize(x, fmt))

    def value_and_vjp(x, c):
        out, vjp = jax.vjp(lambda x: quant.fake_quantize(x, fmt), x)
        return out, vjp(c)[0]

    use_jit = (FORMATS.index(fmt) + (dtype == jnp.bfloat16)) % 2 == 1
    got, grad = (jax.jit(value_and_vjp) if use_jit else value_and_vjp)(x, c)
    assert got.dtype == x.dtype and got.shape == x.shape and grad.dtype == x.dtype
    np.testing.assert_array_equal(_bits(got), _bits(want))
    np.testing.assert_array_equal(np.asarray(grad), np.where(mask, np.asarray(c), 0).astype(np.asarray(c).dtype))
    if fmt in ("q4_0", "q5_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "mxfp4"):  # the others: see the next tests
        assert 0 < (~mask).sum() < mask.size // 4, (fmt, (~mask).sum())  # the heavy tails make these clip
    elif fmt not in quant._fake.CLIPPING_FORMATS:
        assert mask.all()


def test_hand_made_clipping_cases():
    q4 = jnp.asarray([1.0, -0.9, -0.99, 0.0] + [0.0] * 28)  # d = -1/8: -0.99 is 7.92 steps out, -0.9 is 7.2
    g = jax.grad(lambda x: quant.fake_quantize(x, "q4_0").sum())(q4)
    assert g[:4].tolist() == [1.0, 1.0, 0.0, 1.0]
    mx = jnp.asarray([7.5, 6.9, -7.0, 1.0] + [0.0] * 28)  # scale 2**(2-2) = 1: 7.5 and -7.0 saturate at 6
    g = jax.grad(lambda x: quant.fake_quantize(x, "mxfp4").sum())(mx)
    assert g[:4].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert quant.fake_quantize(mx, "mxfp4")[:3].tolist() == [6.0, 6.0, -6.0]
    step = 2.0**-9  # NVFP4: tensor scale 1 (amax 2688); block 2's E4M3 scale 1.4 * 2**-9 is subnormal, rounds to 2**-9
    nv = jnp.asarray([2688.0] + [0.0] * 15 + [6 * 1.4 * step, 3 * 1.4 * step] + [0.0] * 14, jnp.float32)
    g = jax.grad(lambda x: quant.fake_quantize(x, "nvfp4").sum())(nv)
    assert g[16:18].tolist() == [0.0, 1.0] and float(quant.fake_quantize(nv, "nvfp4")[16]) == 6 * step
    w = jnp.asarray(np.linspace(-2.0, 2.0, 2 * 128).reshape(2, 128), jnp.float32)
    clip = jnp.full((2, 1), 1.5, jnp.float32)
    g = jax.grad(lambda w: quant.fake_quantize(w, "int4_group", clip=clip).sum())(w)
    np.testing.assert_array_equal(np.asarray(g), (np.abs(np.asarray(w)) <= 1.5).astype(np.float32))


def test_non_finite_values_have_a_zero_gradient_and_the_round_trip_value():
    x = _x().at[1, 5].set(jnp.nan).at[2, 7].set(jnp.inf).at[3, 9].set(-jnp.inf)
    for fmt in ("int8", "nf4", "q4_k", "nvfp4"):
        got = quant.fake_quantize(x, fmt)
        np.testing.assert_array_equal(_bits(got), _bits(quant.dequantize(quant.quantize(x, fmt))))
        g = jax.grad(lambda x: jnp.sum(jnp.where(jnp.isfinite(quant.fake_quantize(x, fmt)),
                                                 quant.fake_quantize(x, fmt), 0.0)))(x)
        assert float(g[1, 5]) == float(g[2, 7]) == float(g[3, 9]) == 0.0


@pytest.mark.parametrize("fmt, options", [
    ("q5_0", {"imatrix": jnp.linspace(0.5, 2.0, 256)}),
    ("q5_1", {"imatrix": jnp.linspace(0.5, 2.0, 256)}),
    ("nf4", {"block_size": 32}),
    ("int8", {"axis": 0}),
    ("int4_group", {"group_size": 64, "clip": jnp.full((4, 4), 1.0)}),
], ids=["q5_0-imatrix", "q5_1-imatrix", "nf4-b32", "int8-axis", "int4-clip"])  # fmt: skip
def test_options_pass_through_and_get_no_gradient(fmt, options):
    x = _x()
    np.testing.assert_array_equal(_bits(quant.fake_quantize(x, fmt, **options)),
                                  _bits(quant.dequantize(quant.quantize(x, fmt, **options))))
    arrays = {k: v for k, v in options.items() if isinstance(v, jax.Array)}
    statics = {k: v for k, v in options.items() if k not in arrays}
    gx, ga = jax.jit(jax.grad(lambda x, a: jnp.sum(quant.fake_quantize(x, fmt, **a, **statics)), argnums=(0, 1)))(
        x, arrays)
    np.testing.assert_array_equal(np.asarray(gx), reference_mask(x, quant.quantize(x, fmt, **options), options)
                                  .astype(np.float32))
    assert all(not np.any(np.asarray(v)) for v in jax.tree_util.tree_leaves(ga))


def test_vmap_quantizes_each_example_alone():
    x = _x().reshape(2, 2, 256)
    for fmt in ("int8", "nf4", "q4_0", "nvfp4"):
        got = jax.vmap(lambda a: quant.fake_quantize(a, fmt))(x)
        qs = jax.vmap(lambda a: quant.quantize(a, fmt))(x)  # (int8 under vmap may round its scale 1 ulp apart)
        np.testing.assert_array_equal(_bits(got), _bits(quant.dequantize(qs)))
        g = jax.vmap(jax.grad(lambda a: quant.fake_quantize(a, fmt).sum()))(x)
        each = [jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], qs) for i in range(len(x))]
        want = np.stack([reference_mask(a, q) for a, q in zip(x, each, strict=True)]).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(g), want)


def test_bad_input_raises_naming_the_argument():
    with pytest.raises(FormatError, match="argument 'fmt'"):
        quant.fake_quantize(jnp.ones(32), "nf5")
    with pytest.raises(FormatError, match="argument 'options'"):
        quant.fake_quantize(jnp.ones(32), "nf4", group_size=4)
    with pytest.raises(DTypeError, match="argument 'x'"):
        quant.fake_quantize(jnp.ones(32, jnp.int32), "nf4")


def test_clip_mask_is_the_gradient():
    x = _x()
    for fmt in ("q4_0", "q6_k", "mxfp4"):
        q = quant.quantize(x, fmt)
        g = jax.grad(lambda x: quant.fake_quantize(x, fmt).sum())(x)
        np.testing.assert_array_equal(np.asarray(quant.clip_mask(x, q)), np.asarray(g) == 1.0)
