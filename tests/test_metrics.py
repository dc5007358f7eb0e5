"""Tests for viva_tensor.metrics, against NumPy float64 references written from the definitions."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from viva_tensor import compression, metrics
from viva_tensor.errors import ConfigError, DTypeError, InvalidShape, ShapeMismatch

PAIRWISE = {
    "mse": lambda a, b: np.mean((a - b) ** 2),
    "mae": lambda a, b: np.mean(np.abs(a - b)),
    "rmse": lambda a, b: np.sqrt(np.mean((a - b) ** 2)),
    "max_error": lambda a, b: np.max(np.abs(a - b)),
    "cosine_similarity": lambda a, b: np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)),
    "snr_db": lambda a, b: 10 * np.log10(np.sum(a**2) / np.sum((a - b) ** 2)),
    "error_percentile": lambda a, b: np.percentile(np.abs(a - b), 99.0),
}


def _pair(rng, dtype, shape=(16, 24)):
    a = rng.standard_normal(shape).astype(np.float32)
    b = a + 0.1 * rng.standard_normal(shape).astype(np.float32)
    a, b = jnp.asarray(a).astype(dtype), jnp.asarray(b).astype(dtype)
    return a, b, np.asarray(a.astype(jnp.float32), np.float64), np.asarray(b.astype(jnp.float32), np.float64)


@pytest.mark.parametrize("name", list(PAIRWISE))
def test_pairwise_metrics_match_numpy(name, dtype, maybe_jit, rng):
    a, b, a64, b64 = _pair(rng, dtype)
    got = maybe_jit(getattr(metrics, name))(a, b)
    assert got.dtype == jnp.float32 and got.shape == ()
    assert float(got) == pytest.approx(PAIRWISE[name](a64, b64), rel=1e-5, abs=1e-7)


def test_snr_special_values(maybe_jit):
    snr = maybe_jit(metrics.snr_db)
    assert float(snr(jnp.ones(4), jnp.ones(4))) == math.inf
    assert float(snr(jnp.zeros(4), jnp.zeros(4))) == math.inf
    assert float(snr(jnp.zeros(4), jnp.ones(4))) == -math.inf
    assert float(snr(jnp.array([3.0, 4.0]), jnp.array([3.0, 4.5]))) == pytest.approx(20.0, rel=1e-6)


def test_cosine_special_values():
    assert float(metrics.cosine_similarity(jnp.zeros(3), jnp.zeros(3))) == 1.0
    assert float(metrics.cosine_similarity(jnp.zeros(3), jnp.ones(3))) == 0.0
    assert float(metrics.cosine_similarity(jnp.ones(3), -jnp.ones(3))) == -1.0
    x = jnp.array([1e-20, 2e-20])  # tiny norms: squares underflow in float32 but the result is defined
    assert 0.0 <= float(metrics.cosine_similarity(x, x)) <= 1.0


def test_theoretical_sqnr():
    assert metrics.theoretical_sqnr(8) == pytest.approx(49.92)
    assert metrics.theoretical_sqnr(4.5) == pytest.approx(6.02 * 4.5 + 1.76)
    for bad in (0, -1, True, "8", math.inf, math.nan):
        with pytest.raises(ConfigError, match="argument 'bits': expected a positive number"):
            metrics.theoretical_sqnr(bad)


def test_int8_sqnr_near_theory_on_uniform_data(rng):
    """A uniform full-scale signal quantized with b bits has SQNR 6.02 b dB (no sine crest term)."""
    x = jnp.asarray(rng.uniform(-1, 1, 1 << 16).astype(np.float32))
    x = x.at[0].set(1.0)
    snr = float(metrics.snr_db(x, compression.dequantize(compression.quantize_int8(x))))
    # 255 levels over [-1, 1]: step 2/254, noise step^2/12, signal 1/3.
    expected = 10 * np.log10((1 / 3) / ((2 / 254) ** 2 / 12))
    assert snr == pytest.approx(expected, abs=0.1)
    assert metrics.theoretical_sqnr(8) - 2 < snr < metrics.theoretical_sqnr(8)


@pytest.mark.parametrize("percentile", [0, 50, 90, 100])
def test_error_percentile(percentile, rng):
    a, b, a64, b64 = _pair(rng, jnp.float32)
    got = float(metrics.error_percentile(a, b, percentile))
    assert got == pytest.approx(np.percentile(np.abs(a64 - b64), percentile), rel=1e-5)
    for bad in (-1, 101, True, "50"):
        with pytest.raises(ConfigError, match="argument 'percentile': expected a number in \\[0, 100\\]"):
            metrics.error_percentile(a, b, bad)


def test_outlier_percentage(maybe_jit, rng):
    a, b, a64, b64 = _pair(rng, jnp.float32, (50, 40))
    b = b.at[3, 7].add(5.0).at[10, 1].add(-4.0)
    b64 = np.asarray(b, np.float64)
    err = np.abs(a64 - b64)
    for threshold in (1.0, 3.0):
        want = 100 * np.mean(err > threshold * np.sqrt(np.mean(err**2)))
        got = maybe_jit(lambda x, y: metrics.outlier_percentage(x, y, threshold=threshold))(a, b)
        assert float(got) == pytest.approx(want, rel=1e-6)
    assert float(metrics.outlier_percentage(a, a)) == 0.0
    with pytest.raises(ConfigError, match="argument 'threshold': expected a positive number"):
        metrics.outlier_percentage(a, b, threshold=0)


def test_compute_all(maybe_jit, rng):
    a, b, a64, b64 = _pair(rng, jnp.bfloat16)
    m = maybe_jit(metrics.compute_all)(a, b)
    assert isinstance(m, metrics.QuantMetrics)
    assert len(jax.tree_util.tree_leaves(m)) == 8
    for name in ("mse", "mae", "rmse", "max_error", "cosine_similarity", "snr_db"):
        assert float(getattr(m, name)) == pytest.approx(PAIRWISE[name](a64, b64), rel=1e-5), name
    assert float(m.p99_error) == pytest.approx(np.percentile(np.abs(a64 - b64), 99), rel=1e-5)
    with pytest.raises(Exception):
        m.mse = 0.0  # frozen


def test_compute_all_vmap_and_no_retrace(rng):
    a = jnp.asarray(rng.standard_normal((3, 64)).astype(np.float32))
    b = a * 0.9
    batched = jax.vmap(metrics.compute_all)(a, b)
    assert batched.mse.shape == (3,)
    for i in range(3):
        assert float(batched.snr_db[i]) == pytest.approx(20.0, rel=1e-5)  # 10 log10(1 / 0.01)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(x, y):
        return metrics.compute_all(x, y)

    for _ in range(3):
        run(a, b)


def test_accumulates_in_float32():
    x = jnp.full((4096,), 1.0, jnp.bfloat16)
    y = jnp.full((4096,), 1.0 + 2**-7, jnp.bfloat16)
    # In bfloat16 the sum of 4096 squared errors would saturate at 256 ulps; float32 keeps it exact.
    assert float(metrics.mse(x, y)) == 2.0**-14
    assert metrics.mse(x, y).dtype == jnp.float32


def test_error_paths():
    x = jnp.ones((2, 3))
    for name in list(PAIRWISE) + ["outlier_percentage", "compute_all"]:
        fn = getattr(metrics, name)
        with pytest.raises(ShapeMismatch, match=r"argument 'reconstructed': expected shape \(2, 3\).*got \(3, 2\)"):
            fn(x, jnp.ones((3, 2)))
        with pytest.raises(InvalidShape, match="argument 'original': expected a non-empty array, got \\(0,\\)"):
            fn(jnp.ones(0), jnp.ones(0))
        with pytest.raises(DTypeError, match="argument 'original': expected a floating array, got int32"):
            fn(jnp.ones(3, jnp.int32), jnp.ones(3))


# ----------------------------------------------------------------------------------------------------
# Saliency
# ----------------------------------------------------------------------------------------------------


def test_compute_saliency(dtype, maybe_jit, rng):
    w = rng.standard_normal((6, 8)).astype(np.float32)
    g = rng.standard_normal((6, 8)).astype(np.float32)
    a = rng.uniform(0.1, 2.0, 8).astype(np.float32)
    wj, gj = jnp.asarray(w).astype(dtype), jnp.asarray(g).astype(dtype)
    w64, g64 = np.asarray(wj.astype(jnp.float32), np.float64), np.asarray(gj.astype(jnp.float32), np.float64)
    f = maybe_jit(metrics.compute_saliency)
    np.testing.assert_allclose(np.asarray(f(wj)), np.abs(w64), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(f(wj, gradients=gj)), np.abs(w64 * g64), rtol=1e-6)
    got = f(wj, gradients=gj, activation_norms=jnp.asarray(a))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.abs(w64 * g64) * a[None, :], rtol=1e-6)


def test_compute_saliency_errors():
    w = jnp.ones((2, 3))
    with pytest.raises(ShapeMismatch, match=r"argument 'gradients': expected shape \(2, 3\)"):
        metrics.compute_saliency(w, gradients=jnp.ones((3, 2)))
    with pytest.raises(ShapeMismatch, match=r"argument 'activation_norms': expected shape \(3,\)"):
        metrics.compute_saliency(w, activation_norms=jnp.ones(2))
    with pytest.raises(DTypeError):
        metrics.compute_saliency(jnp.ones(3, jnp.int32))


@pytest.mark.parametrize("percent", [0, 1, 12.5, 50, 100])
def test_find_salient_weights(percent, maybe_jit, rng):
    s = rng.uniform(0, 1, (16, 8)).astype(np.float32)
    mask = np.asarray(maybe_jit(lambda v: metrics.find_salient_weights(v, top_percent=percent))(jnp.asarray(s)))
    assert mask.shape == s.shape and mask.dtype == bool
    k = math.ceil(s.size * percent / 100)
    assert mask.sum() == k
    want = np.zeros(s.size, bool)
    want[np.argsort(-s.ravel(), kind="stable")[:k]] = True
    np.testing.assert_array_equal(mask.ravel(), want)


def test_find_salient_weights_ties_and_errors():
    mask = metrics.find_salient_weights(jnp.ones(4), top_percent=50)
    assert mask.tolist() == [True, True, False, False]
    with pytest.raises(ConfigError, match="argument 'top_percent'"):
        metrics.find_salient_weights(jnp.ones(4), top_percent=150)
    with pytest.raises(InvalidShape, match="argument 'saliency'"):
        metrics.find_salient_weights(jnp.ones(0))


# ----------------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(
    shape=st.sampled_from([(1,), (7,), (3, 5), (2, 3, 4)]),
    seed=st.integers(0, 2**31 - 1),
    noise=st.sampled_from([0.0, 1e-3, 0.5, 10.0]),
)
def test_property_invariants(shape, seed, noise):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape).astype(np.float32)
    b = (a + noise * rng.standard_normal(shape)).astype(np.float32)
    aj, bj = jnp.asarray(a), jnp.asarray(b)
    m = metrics.compute_all(aj, bj)
    mse, mae, rmse, mx = (float(v) for v in (m.mse, m.mae, m.rmse, m.max_error))
    assert mse >= 0 and rmse == pytest.approx(math.sqrt(mse), rel=1e-6)
    assert mae <= rmse * (1 + 1e-6) + 1e-12 and rmse <= mx * (1 + 1e-6) + 1e-12
    assert -1.0 <= float(m.cosine_similarity) <= 1.0
    assert float(metrics.cosine_similarity(aj, bj)) == pytest.approx(float(metrics.cosine_similarity(bj, aj)), abs=1e-6)
    assert 0.0 <= float(m.outlier_percentage) <= 100.0
    if mse > 0 and np.any(a != 0):
        assert float(m.snr_db) == pytest.approx(10 * math.log10(np.mean(a.astype(np.float64) ** 2) / mse), abs=1e-3)
    elif mse == 0:
        assert float(m.snr_db) == math.inf


# ------------------------------------------------------------------- issue 12: float64 policy


@pytest.mark.parametrize("fn", [metrics.mse, metrics.mae, metrics.rmse, metrics.max_error, metrics.snr_db,
                                metrics.cosine_similarity, metrics.compute_all, metrics.outlier_percentage])
def test_float64_input_is_refused_not_narrowed(fn):
    """float64 was narrowed silently: mse(x, x + 1e-10) gave 0 in float32."""
    x = np.ones(4)
    with pytest.raises(DTypeError, match=r"argument 'original'.*float64.*astype\(jnp.float32\)"):
        fn(x, x + 1e-10)
    with pytest.raises(DTypeError, match=r"argument 'reconstructed'.*float64"):
        fn(x.astype(np.float32), x + 1e-10)
    assert float(metrics.mse(x.astype(np.float32), x.astype(np.float32))) == 0.0  # float32 NumPy is fine


def test_saliency_refuses_float64_and_strings():
    w = jnp.ones((2, 2))
    with pytest.raises(DTypeError, match=r"argument 'weights'.*float64"):
        metrics.compute_saliency(np.ones((2, 2)))
    with pytest.raises(DTypeError, match=r"argument 'gradients'.*float64"):
        metrics.compute_saliency(w, gradients=np.ones((2, 2)))
    with pytest.raises(DTypeError, match=r"argument 'activation_norms'"):
        metrics.compute_saliency(w, activation_norms="ab")
    with pytest.raises(DTypeError, match=r"argument 'original'"):
        metrics.mse("ab", "ab")
