"""Bias correction after quantization (nn.quantize_model(..., bias_correction=...)) against NumPy from the definition.

Reference, written here: the layers are corrected in call order; layer ``i``'s mean input ``μ_q`` is taken over the
calibration tokens (padding masked out, token weights respected) in the model whose earlier layers already hold
their quantized kernels AND corrected biases; ``"quantized"`` sets ``b + μ_q (K - K_q)``, ``"float"`` sets
``b + μ_f K - μ_q K_q`` with ``μ_f`` the float model's mean input. NumPy float64 forward of a two-layer MLP.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from viva_tensor import nn, quant
from viva_tensor.errors import ConfigError
from viva_tensor.nn import _sequential


class MLP(nnx.Module):
    def __init__(self, dims=(64, 64, 32), *, param_dtype=jnp.float32, seed=0):
        rngs = nnx.Rngs(seed)
        self.first = nnx.Linear(dims[0], dims[1], param_dtype=param_dtype, rngs=rngs)
        self.second = nnx.Linear(dims[1], dims[2], param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.second(jax.nn.relu(self.first(x)))


def _inputs(seed, shape=(4, 16, 64)):
    """Inputs with a non-zero mean per channel (a zero-mean input would make the correction vanish)."""
    offset = jnp.linspace(-1.0, 2.0, shape[-1])
    return jax.random.normal(jax.random.key(seed), shape) + offset[None, None, :]


def _kernels(qmodel):
    """The quantized kernels ``(in, out)`` of the two layers, float64."""
    return {n: np.asarray(quant.dequantize(getattr(qmodel, n).weight.get_value()), np.float64).T
            for n in ("first", "second")}  # fmt: skip


def _reference(model, kernels, rows, weights, mode):
    """NumPy: the corrected biases of ``first`` then ``second`` on ``rows`` ``(n, in)`` with token ``weights``."""
    k1, b1 = (np.asarray(v, np.float64) for v in (model.first.kernel.get_value(), model.first.bias.get_value()))
    k2, b2 = (np.asarray(v, np.float64) for v in (model.second.kernel.get_value(), model.second.bias.get_value()))
    w = weights / weights.sum()
    mean = lambda x: w @ x  # noqa: E731
    mu1 = mean(rows)  # the first layer: the float model's input
    c1 = b1 + mu1 @ (k1 - kernels["first"]) if mode == "quantized" else b1 + mu1 @ k1 - mu1 @ kernels["first"]
    hidden_q = np.maximum(rows @ kernels["first"] + c1, 0)
    hidden_f = np.maximum(rows @ k1 + b1, 0)
    mu2 = mean(hidden_q)
    if mode == "quantized":
        c2 = b2 + mu2 @ (k2 - kernels["second"])
    else:
        c2 = b2 + mean(hidden_f) @ k2 - mu2 @ kernels["second"]
    return {"first": c1, "second": c2}


def _check(qmodel, model, rows, weights, mode, *, tol=2e-4):
    want = _reference(model, _kernels(qmodel), rows, weights, mode)
    for name in ("first", "second"):
        got = np.asarray(getattr(qmodel, name).bias.get_value(), np.float64)
        np.testing.assert_allclose(got, want[name], rtol=tol, atol=tol, err_msg=f"{mode} {name}")


@pytest.mark.parametrize("mode", ["quantized", "float"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_biases_match_numpy_with_mask_and_weights(mode, method):
    model = MLP()
    x = [_inputs(0), _inputs(1)]
    mask = jnp.arange(16)[None, :] < jnp.array([16, 9, 3, 12])[:, None]
    counts = jnp.maximum(mask.sum(1, keepdims=True).astype(jnp.float32), jnp.float32(1))
    weights = jnp.where(mask, jnp.float32(1) / counts, jnp.float32(0))
    padded = [jnp.where(mask[..., None], xi, 100.0) for xi in x]  # large padding: would dominate if counted
    batches = [nn.CalibrationBatch((p,), mask=mask, weights=weights) for p in padded]
    options = {"sequential": True} if method == "gptq" else {}
    qmodel, _ = nn.quantize_model(model, "q4_0", method=method, calibration=batches, bias_correction=mode, **options)
    keep = np.asarray(mask).reshape(-1)
    rows = np.concatenate([np.asarray(xi, np.float64).reshape(-1, 64)[keep] for xi in x])
    w = np.concatenate([np.asarray(weights, np.float64).reshape(-1)[keep]] * 2)
    _check(qmodel, model, rows, w, mode)


@pytest.mark.parametrize("sequential", [True, False])
def test_gptq_one_shot_and_sequential_correct_on_the_quantized_model(sequential):
    """One-shot GPTQ's records come from the float Hessians; its biases still follow the corrected model."""
    model = MLP()
    xs = [_inputs(2), _inputs(3)]
    qmodel, _ = nn.quantize_model(model, "int4_group", method="gptq", calibration=[(x,) for x in xs],
                                  group_size=32, sequential=sequential, bias_correction="quantized")  # fmt: skip
    rows = np.concatenate([np.asarray(x, np.float64).reshape(-1, 64) for x in xs])
    _check(qmodel, model, rows, np.ones(len(rows)), "quantized")


def test_the_records_do_not_change_and_rtn_without_correction_keeps_the_biases():
    model = MLP()
    batches = [(_inputs(0),)]
    plain, _ = nn.quantize_model(model, "q4_0")
    corrected, report = nn.quantize_model(model, "q4_0", calibration=batches, bias_correction="quantized")
    for name in ("first", "second"):
        a, b = getattr(plain, name), getattr(corrected, name)
        assert all(bool(jnp.array_equal(u, v)) for u, v in
                   zip(jax.tree.leaves(a.weight.get_value()), jax.tree.leaves(b.weight.get_value()), strict=True))
        np.testing.assert_array_equal(np.asarray(a.bias.get_value()), np.asarray(getattr(model, name).bias.get_value()))
        assert not np.array_equal(np.asarray(a.bias.get_value()), np.asarray(b.bias.get_value()))
    assert report.linear_bytes_after == nn.quantize_model(model, "q4_0")[1].linear_bytes_after


def test_the_mean_output_of_each_corrected_layer_is_the_float_kernels_on_its_inputs():
    model = MLP()
    x = _inputs(4)
    qmodel, _ = nn.quantize_model(model, "q4_0", calibration=[(x,)], bias_correction="quantized")
    h = jax.nn.relu(qmodel.first(x))
    for layer, qlayer, inputs in ((model.first, qmodel.first, x), (model.second, qmodel.second, h)):
        want = np.asarray(layer(inputs), np.float64).reshape(-1, layer.out_features).mean(0)
        got = np.asarray(qlayer(inputs), np.float64).reshape(-1, layer.out_features).mean(0)
        np.testing.assert_allclose(got, want, atol=2e-4)


def test_eager_callable_and_jitted_batches_agree():
    model = MLP()
    xs = [_inputs(5), _inputs(6)]

    def run(m):
        for x in xs:
            m(x)

    a, _ = nn.quantize_model(model, "q4_0", calibration=run, bias_correction="float")
    b, _ = nn.quantize_model(model, "q4_0", calibration=[(x,) for x in xs], bias_correction="float")
    for name in ("first", "second"):
        np.testing.assert_allclose(np.asarray(getattr(a, name).bias.get_value()),
                                   np.asarray(getattr(b, name).bias.get_value()), rtol=1e-5, atol=1e-5)  # fmt: skip


def test_bfloat16_model_keeps_its_bias_dtype():
    model = MLP(param_dtype=jnp.bfloat16)
    qmodel, _ = nn.quantize_model(model, "q8_0", calibration=[(_inputs(7).astype(jnp.bfloat16),)],
                                  bias_correction="quantized")  # fmt: skip
    assert qmodel.first.bias.get_value().dtype == jnp.bfloat16
    y = qmodel(_inputs(7).astype(jnp.bfloat16))
    assert y.shape == (4, 16, 32) and bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))


def test_bias_corrections_directly_and_errors():
    model = MLP()
    k = jnp.asarray(model.first.kernel.get_value())
    got = _sequential.bias_corrections(model, {"first": jnp.round(k * 8) / 8}, [(_inputs(8),)])
    assert set(got) == {"first"}
    with pytest.raises(ConfigError, match="bias_correction"):
        nn.quantize_model(model, "q4_0", calibration=[(_inputs(0),)], bias_correction="mean")
    with pytest.raises(ConfigError, match="calibration"):
        nn.quantize_model(model, "q4_0", bias_correction="quantized")
    with pytest.raises(ConfigError, match="bias_correction"):
        nn.quantize_model(model, "q4_0", method="gptq", calibration=[(_inputs(0),)], asymmetric=True,
                          bias_correction="quantized")  # fmt: skip
    with pytest.raises(ConfigError, match="mode"):
        _sequential.bias_corrections(model, {"first": k}, [(_inputs(8),)], mode=None)
