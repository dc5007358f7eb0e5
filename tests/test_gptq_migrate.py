"""AWQ-style scale migration before GPTQ (nn._sequential.migrated_gptq, nn.quantize_model(migrate="awq")) against
NumPy written from the definition: s = rms(x)^alpha / sqrt(max * min) in float16, GPTQ (the float64 reference of
tests/gptq_reference.py) of W diag(s) with H' = diag(1/s) H diag(1/s), decode Q(W s) / s, and the alpha of the least
held-out output error tr(D G_h Dᵀ)."""

from __future__ import annotations

import gptq_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from viva_tensor import awq, gptq, nn, quant
from viva_tensor.errors import ConfigError
from viva_tensor.nn import _sequential

K, OUT = 64, 16


def _data(seed=0, n=256):
    kx, kh, kw = jax.random.split(jax.random.key(seed), 3)
    channel = jnp.exp(jnp.linspace(-1.5, 1.5, K))  # channels of very different sizes: migration matters
    x = jax.random.normal(kx, (n, K)) * channel[None, :]
    xh = jax.random.normal(kh, (n, K)) * channel[None, :]
    w = jax.random.normal(kw, (OUT, K))
    return w, x, xh


def _np_scales(gram, count, alpha):
    rms = np.sqrt(np.diag(np.asarray(gram, np.float64)) / count)
    s = rms**alpha
    s = s / np.sqrt(s.max() * s.min())
    return s.astype(np.float16).astype(np.float64)


def _np_migrated(w, gram, count, alpha, damp):
    """(decoded weight, codes) of GPTQ (NumPy float64 reference) on W diag(s) with the Hessian of x / s."""
    s = _np_scales(gram, count, alpha)
    h = 2 * np.asarray(gram, np.float64) / count / np.outer(s, s)
    find_params, snap = ref.int4_group_grid()
    codes, values, _ = ref.gptq(np.asarray(w, np.float64) * s, h, find_params=find_params, snap=snap,
                                group_size=32, percdamp=damp)  # fmt: skip
    return values / s, codes


def _held_error(w, approx, held_gram):
    d = np.asarray(w, np.float64) - np.asarray(approx, np.float64)
    return float(np.sum((d @ np.asarray(held_gram, np.float64)) * d))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_migration_scales_follow_the_definition(alpha):
    _, x, _ = _data()
    gram = x.T @ x
    got = _sequential.migration_scales(gram, 256.0, alpha)
    np.testing.assert_allclose(np.asarray(got), _np_scales(gram, 256.0, alpha), rtol=1e-3)
    assert got.dtype == jnp.float32 and np.all(np.asarray(got, np.float16).astype(np.float32) == np.asarray(got))
    jitted = jax.jit(lambda g: _sequential.migration_scales(g, 256.0, alpha))(gram)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(got))


@pytest.mark.parametrize("alpha", [0.25, 0.75])
def test_one_alpha_is_gptq_of_the_scaled_weight(alpha):
    w, x, _ = _data()
    gram = x.T @ x
    q = _sequential.migrated_gptq(w, gram, 256.0, gram, alphas=(alpha,), group_size=32, damp=0.01)
    assert q.format == "awq_int4" and q.shape == (OUT, K) and q.act_scale.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(q.act_scale, np.float64), _np_scales(gram, 256.0, alpha), rtol=1e-3)
    want, codes = _np_migrated(w, gram, 256.0, alpha, 0.01)
    got_codes = np.asarray(awq._unpack(q.codes, K))
    assert np.mean(got_codes == codes) >= 0.98  # float32 against float64: a tie may round the other way
    close = np.isclose(np.asarray(quant.dequantize(q), np.float64), want, rtol=1e-3, atol=1e-3)
    assert close.mean() >= 0.98
    # the record decodes to Q(W s) / s: the int4-group record of the same codes, divided by s
    grid = awq.GroupInt4Tensor(q.codes, q.scales, q.zeros, shape=q.shape, dtype=q.dtype, group_size=32)
    np.testing.assert_allclose(np.asarray(quant.dequantize(q)),
                               np.asarray(quant.dequantize(grid)) / np.asarray(q.act_scale, np.float32), rtol=1e-6)


def test_the_alpha_kept_has_the_least_held_out_error_and_beats_plain_gptq():
    w, x, xh = _data(1)
    gram, held = x.T @ x, xh.T @ xh
    alphas = (0.0, 0.25, 0.5, 0.75)
    q = _sequential.migrated_gptq(w, gram, 256.0, held, alphas=alphas, group_size=32, damp=0.01)
    errors = [_held_error(w, _np_migrated(w, gram, 256.0, a, 0.01)[0], held) for a in alphas]
    got = _held_error(w, quant.dequantize(q), held)
    assert got <= min(errors) * 1.01, (got, errors)
    assert np.argmin(errors) > 0  # on these inputs migration helps: the test can fail
    plain = gptq.quantize(w, gptq.Hessian(2 * gram / 256.0, jnp.float32(256)), "int4_group", group_size=32)
    assert got < _held_error(w, quant.dequantize(plain), held)


def test_bfloat16_weight_keeps_its_dtype():
    w, x, _ = _data()
    q = _sequential.migrated_gptq(w.astype(jnp.bfloat16), x.T @ x, 256.0, x.T @ x, group_size=32)
    assert q.dtype == jnp.bfloat16 and quant.dequantize(q).dtype == jnp.bfloat16


def test_migrated_gptq_errors():
    w, x, _ = _data()
    with pytest.raises(ConfigError, match="argument 'alphas'"):
        _sequential.migrated_gptq(w, x.T @ x, 256.0, x.T @ x, alphas=())
    with pytest.raises(ConfigError, match="argument 'act_order'"):
        _sequential.migrated_gptq(w, x.T @ x, 256.0, x.T @ x, act_order=True)


def _model_and_batches():
    model = nnx.Sequential(nnx.Linear(K, K, rngs=nnx.Rngs(0)), nnx.Linear(K, 8, rngs=nnx.Rngs(1)))
    channel = jnp.exp(jnp.linspace(-1.5, 1.5, K))
    batches = [(jax.random.normal(jax.random.key(i), (32, K)) * channel[None, :],) for i in range(6)]
    return model, batches


def test_quantize_model_migrate_holds_awq_records_fitted_on_the_calibration_split():
    model, batches = _model_and_batches()
    qmodel, report = nn.quantize_model(model, "int4_group", method="gptq", calibration=batches, group_size=32,
                                       sequential=False, migrate="awq")  # fmt: skip
    assert report.quantized == ("layers.0", "layers.1")
    record = qmodel.layers[0].weight.get_value()
    assert record.format == "awq_int4"
    # by hand: the fitting batches are all but every 5th; the held-out ones are every 5th
    fit = jnp.concatenate([b[0] for i, b in enumerate(batches) if i % 5])
    held = jnp.concatenate([b[0] for b in batches[::5]])
    kernel = model.layers[0].kernel.get_value()
    want = _sequential.migrated_gptq(kernel.T, fit.T @ fit, float(fit.shape[0]), held.T @ held, group_size=32)
    np.testing.assert_array_equal(np.asarray(record.codes), np.asarray(want.codes))
    np.testing.assert_array_equal(np.asarray(record.act_scale), np.asarray(want.act_scale))
    y = batches[0][0]
    jitted = nnx.jit(lambda m, v: m(v))(qmodel, y)  # the quantized model gives the same eagerly and under jit
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(qmodel(y)), rtol=1e-5, atol=1e-5)
    assert float(jnp.mean((qmodel(y) - model(y)) ** 2)) < float(jnp.mean(model(y) ** 2)) * 0.05


def test_quantize_model_migrate_errors():
    model, batches = _model_and_batches()
    with pytest.raises(ConfigError, match="argument 'migrate'"):
        nn.quantize_model(model, "int4_group", migrate="awq")
    with pytest.raises(ConfigError, match="argument 'migrate'"):
        nn.quantize_model(model, "int4_group", method="gptq", calibration=batches, migrate="smooth")
    with pytest.raises(ConfigError, match="argument 'calibration'"):
        nn.quantize_model(model, "int4_group", method="gptq", calibration=batches[:1], migrate="awq")
    with pytest.raises(ConfigError, match="argument 'migrate'"):
        nn.quantize_model(model, "int4_group", method="gptq", calibration=batches, migrate="awq", asymmetric=True)


def test_sequential_migration_quantizes_every_layer_on_the_quantized_inputs():
    model, batches = _model_and_batches()
    qmodel, report = nn.quantize_model(model, "int4_group", method="gptq", calibration=batches, group_size=32,
                                       migrate="awq")  # fmt: skip
    assert [qmodel.layers[i].weight.get_value().format for i in (0, 1)] == ["awq_int4", "awq_int4"]
    # the second layer's Hessian: its inputs in the model whose first layer is already quantized
    first = qmodel.layers[0]
    fit = jnp.concatenate([first(b[0]) for i, b in enumerate(batches) if i % 5])
    held = jnp.concatenate([first(b[0]) for b in batches[::5]])
    kernel = model.layers[1].kernel.get_value()
    want = _sequential.migrated_gptq(kernel.T, fit.T @ fit, float(fit.shape[0]), held.T @ held, group_size=32)
    got = qmodel.layers[1].weight.get_value()
    assert np.mean(np.asarray(got.codes) == np.asarray(want.codes)) >= 0.98
    np.testing.assert_array_equal(np.asarray(got.act_scale), np.asarray(want.act_scale))
