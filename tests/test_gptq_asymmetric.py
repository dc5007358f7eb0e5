"""Asymmetric calibration (GPTAQ): gptq.float_target against a NumPy float64 least-squares solution, and
nn.quantize_model(..., asymmetric=True) against gptq.quantize of that target by hand."""

from __future__ import annotations

import gptq_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from viva_tensor import gptq, nn, quant
from viva_tensor.errors import ConfigError, ShapeMismatch
from viva_tensor.nn import _sequential


def _pair(seed=0, n=512, k=32, out=16, noise=0.2):
    kw, kx, kn, km = jax.random.split(jax.random.key(seed), 4)
    mix = jnp.eye(k) + jax.random.normal(km, (k, k)) / 3
    w = jax.random.normal(kw, (out, k))
    xf = jax.random.normal(kx, (n, k)) @ mix
    xq = xf + noise * jax.random.normal(kn, (n, k))
    return w, xf, xq


@pytest.mark.parametrize("damp", [0.0, 0.01, 0.3])
@pytest.mark.parametrize("jit", [False, True])
def test_float_target_is_the_float64_least_squares_solution(damp, jit):
    w, xf, xq = _pair()
    f = jax.jit(lambda *a: gptq.float_target(*a, damp=damp)) if jit else (lambda *a: gptq.float_target(*a, damp=damp))
    got = f(w, xq.T @ xq, xf.T @ xq)
    want = ref.float_target(np.asarray(w), np.asarray(xq), np.asarray(xf), damp)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-3, atol=2e-3)


def test_float_target_lowers_the_float_output_error_and_is_w_when_inputs_agree():
    w, xf, _ = _pair()
    xq = xf @ (jnp.eye(32) + 0.2 * jax.random.normal(jax.random.key(5), (32, 32)))  # an invertible distortion
    t = gptq.float_target(w, xq.T @ xq, xf.T @ xq, damp=0.0)
    err = lambda v: float(jnp.linalg.norm(xf @ w.T - xq @ v.T))  # noqa: E731
    assert err(t) < 0.01 * err(w), (err(t), err(w))
    same = gptq.float_target(w, xf.T @ xf, xf.T @ xf, damp=0.01)
    np.testing.assert_allclose(np.asarray(same), np.asarray(w), rtol=1e-3, atol=1e-3)


def test_float_target_bfloat16_weight_and_vmap():
    w, xf, xq = _pair()
    g, c = xq.T @ xq, xf.T @ xq
    t16 = gptq.float_target(w.astype(jnp.bfloat16), g, c, damp=0.01)
    t32 = gptq.float_target(w.astype(jnp.bfloat16).astype(jnp.float32), g, c, damp=0.01)
    assert t16.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(t16), np.asarray(t32))
    ws = jnp.stack([w, 2 * w])
    vm = jax.vmap(lambda v: gptq.float_target(v, g, c, damp=0.01))(ws)
    np.testing.assert_allclose(np.asarray(vm[1]), 2 * np.asarray(vm[0]), rtol=1e-4, atol=1e-4)


def test_float_target_falls_back_to_w_when_the_solve_fails():
    w, xf, xq = _pair()
    bad = jnp.full((32, 32), jnp.nan)
    t, ok = gptq.float_target(w, bad, xf.T @ xq, damp=0.01, return_ok=True)
    assert not bool(ok)
    np.testing.assert_array_equal(np.asarray(t), np.asarray(w))


def test_float_target_errors():
    w, xf, xq = _pair()
    with pytest.raises(ShapeMismatch, match="gram"):
        gptq.float_target(w, jnp.eye(8), xf.T @ xq)
    with pytest.raises(ShapeMismatch, match="cross"):
        gptq.float_target(w, jnp.eye(32), jnp.eye(8))
    with pytest.raises(ConfigError, match="damp"):
        gptq.float_target(w, jnp.eye(32), jnp.eye(32), damp=-1.0)


class MLP(nnx.Module):
    def __init__(self, seed=0):
        rngs = nnx.Rngs(seed)
        self.first = nnx.Linear(64, 64, rngs=rngs)
        self.second = nnx.Linear(64, 32, rngs=rngs)

    def __call__(self, x):
        return self.second(jax.nn.relu(self.first(x)))


def _inputs(seed, shape=(4, 16, 64)):
    mix = jnp.eye(shape[-1]) + jax.random.normal(jax.random.key(99), (shape[-1], shape[-1])) / 2
    return jnp.einsum("btd,de->bte", jax.random.normal(jax.random.key(seed), shape), mix)


def _rows(x):
    return np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])


def test_asymmetric_is_gptq_of_the_float_target_on_the_quantized_inputs():
    model = MLP()
    batches = [(_inputs(i),) for i in range(2)]
    qmodel, _ = nn.quantize_model(model, "int4_group", method="gptq", calibration=batches, asymmetric=True,
                                  target_damp=0.05, group_size=32)  # fmt: skip
    x = jnp.concatenate([b[0] for b in batches])
    w1, w2 = model.first.kernel.get_value().T, model.second.kernel.get_value().T
    xr = _rows(x)
    h1 = (2 * xr.T @ xr / len(xr)).astype(np.float32)
    first = gptq.quantize(w1, h1, "int4_group", group_size=32)  # the first layer: X_q = X_f, W' = W
    hf = _rows(jax.nn.relu(model.first(x)))
    hq = _rows(jax.nn.relu(nn.QLinear(first, model.first.bias.get_value())(x)))
    target = ref.float_target(np.asarray(w2), hq, hf, 0.05).astype(np.float32)
    second = gptq.quantize(jnp.asarray(target), (2 * hq.T @ hq / len(hq)).astype(np.float32), "int4_group",
                           group_size=32)  # fmt: skip
    got1, got2 = qmodel.first.weight.get_value(), qmodel.second.weight.get_value()
    agree1 = np.mean(np.asarray(quant.dequantize(got1)) == np.asarray(quant.dequantize(first)))  # W' = W to rounding
    assert agree1 >= 0.99, agree1
    agree = np.mean(np.asarray(quant.dequantize(got2)) == np.asarray(quant.dequantize(second)))
    assert agree >= 0.98, agree


def test_asymmetric_fits_the_float_model_better_on_held_out_inputs():
    model = MLP()
    batches = [(_inputs(i),) for i in range(4)]
    held = _inputs(20)
    y = model(held)
    err = lambda m: float(jnp.linalg.norm(m(held) - y))  # noqa: E731
    sym, _ = nn.quantize_model(model, "int4_group", method="gptq", calibration=batches, group_size=32)
    asym, _ = nn.quantize_model(model, "int4_group", method="gptq", calibration=batches, asymmetric=True,
                                group_size=32)  # fmt: skip
    assert err(asym) < err(sym), (err(asym), err(sym))


def test_capture_cross_counts_masked_tokens_only():
    model = MLP()
    other = nnx.clone(model)
    other.first.kernel.set_value(1.5 * other.first.kernel.get_value())
    x = _inputs(0, (2, 8, 64))
    mask = jnp.arange(8)[None, :] < jnp.array([[5], [3]])
    gram, cross, n = _sequential.capture_cross(model, other, [nn.CalibrationBatch((x,), mask=mask)], "second")
    keep = np.asarray(mask).reshape(-1)
    hf = _rows(jax.nn.relu(model.first(x)))[keep]
    hq = _rows(jax.nn.relu(other.first(x)))[keep]
    assert float(n) == 8.0
    np.testing.assert_allclose(np.asarray(gram), hq.T @ hq, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(np.asarray(cross), hf.T @ hq, rtol=1e-4, atol=1e-2)


def test_asymmetric_needs_sequential_and_batches():
    model, batches = MLP(), [(_inputs(0),)]
    with pytest.raises(ConfigError, match="asymmetric"):
        nn.quantize_model(model, "q4_0", method="gptq", calibration=batches, sequential=False, asymmetric=True)
    with pytest.raises(ConfigError, match="calibration"):
        nn.quantize_model(model, "q4_0", method="gptq", calibration=lambda m: m(_inputs(0)), asymmetric=True)


def test_a_plan_block_size_is_the_gptq_group_of_the_record():
    model = MLP()
    batches = [(_inputs(0),)]
    plan = nn.Plan((nn.LayerChoice("first", "nf4_dq", (("block_size", 32),), 0, 64 * 64, 0.0),
                    nn.LayerChoice("second", "nf4_dq", (), 0, 64 * 32, 0.0)), ())  # fmt: skip
    qmodel, _ = nn.quantize_model(model, plan, method="gptq", calibration=batches)
    first = qmodel.first.weight.get_value()
    rtn = quant.quantize(model.first.kernel.get_value().T, "nf4_dq", block_size=32)
    assert first.nbytes == rtn.nbytes
    assert qmodel.second.weight.get_value().nbytes == quant.quantize(model.second.kernel.get_value().T, "nf4_dq").nbytes


def test_token_weights_weigh_the_gram_matrices_and_the_counts():
    """CalibrationBatch.weights: capture_grams and capture_cross give sum_t w_t m_t x_t x_t^T (NumPy) and sum w m."""
    model = MLP()
    other = nnx.clone(model)
    other.first.kernel.set_value(1.5 * other.first.kernel.get_value())
    x = _inputs(0, (2, 8, 64))
    mask = jnp.arange(8)[None, :] < jnp.array([[5], [3]])
    lengths = jnp.sum(mask, axis=1, keepdims=True).astype(jnp.float32)
    weights = jnp.where(mask, 1.0 / lengths, 7.0)  # 1/L per text; the padding (weight 7) masked out
    batch = nn.CalibrationBatch((x,), mask=mask, weights=weights)
    wm = (np.asarray(weights, np.float64) * np.asarray(mask)).reshape(-1)
    grams, _ = _sequential.capture_grams(model, [batch])
    rows = _rows(x)
    np.testing.assert_allclose(np.asarray(grams["first"][0]), (rows * wm[:, None]).T @ rows, rtol=1e-4, atol=1e-4)
    assert float(grams["first"][1]) == pytest.approx(2.0)  # each text weighs 1
    gram, cross, n = _sequential.capture_cross(model, other, [batch], "second")
    hf, hq = _rows(jax.nn.relu(model.first(x))), _rows(jax.nn.relu(other.first(x)))
    np.testing.assert_allclose(np.asarray(gram), (hq * wm[:, None]).T @ hq, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(cross), (hf * wm[:, None]).T @ hq, rtol=1e-4, atol=1e-3)
    assert float(n) == pytest.approx(2.0)
