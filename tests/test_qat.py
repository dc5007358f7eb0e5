"""Quantization-aware training (nn/_qat.py): FakeQuantLinear trains with optax, freezing keeps its output exactly.

References: ``nnx.Linear`` (the same layer with a float kernel), ``quant.dequantize(quant.quantize(kernel.T))`` (the
weight the forward must see), the straight-through mask of ``quant.clip_mask``, and QLinear (the frozen layer).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from viva_tensor import nn, quant
from viva_tensor.errors import ConfigError, FormatError


def _toy(seed=0):
    return nnx.Sequential(nnx.Linear(64, 64, rngs=nnx.Rngs(seed)), jax.nn.relu, nnx.Linear(64, 8, rngs=nnx.Rngs(1)))


@pytest.mark.parametrize("fmt", ["nf4", "q4_0", "int8", "nvfp4"])
def test_forward_uses_the_fake_quantized_kernel(fmt, dtype, maybe_jit):
    linear = nnx.Linear(64, 16, rngs=nnx.Rngs(0))
    layer = nn.FakeQuantLinear.from_linear(linear, fmt)
    assert isinstance(layer, nnx.Linear) and layer.kernel.get_value().shape == (64, 16)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 64)), dtype)
    w = quant.dequantize(quant.quantize(linear.kernel.get_value().T, fmt, **({"axis": 0} if fmt == "int8" else {})))
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T + np.asarray(linear.bias.get_value(), np.float64)
    got = maybe_jit(lambda x: layer(x))(x)
    assert got.dtype == dtype
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol * np.abs(want).max())


def test_kernel_gradient_is_straight_through():
    layer = nn.FakeQuantLinear(256, 4, fmt="mxfp4", rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    layer.kernel.set_value(jnp.asarray(rng.standard_normal((256, 4)) * np.exp(rng.standard_normal((256, 4))),
                                       jnp.float32))  # heavy tails: MXFP4's power-of-two scales clip some
    x = jnp.asarray(rng.standard_normal((5, 256)), jnp.float32)
    grads = nnx.grad(lambda m: jnp.sum(m(x)))(layer)
    kernel = layer.kernel.get_value()
    mask = np.asarray(quant.clip_mask(kernel.T, quant.quantize(kernel.T, "mxfp4"))).T
    want = np.where(mask, np.asarray(x).sum(axis=0)[:, None], 0.0)  # d sum(x @ W^T) / d kernel[i, o] = sum_b x[b, i]
    np.testing.assert_allclose(np.asarray(grads["kernel"].get_value()), want, rtol=1e-5, atol=1e-5)
    assert not mask.all()


@pytest.mark.parametrize("fmt", ["nf4", "q4_0"])
def test_a_few_adam_steps_train_and_freezing_gives_the_fake_quant_output(fmt):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((32, 64)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((32, 8)), jnp.float32)
    model = nn.fake_quantize_model(_toy(), fmt)
    assert [type(m).__name__ for m in (model.layers[0], model.layers[2])] == ["FakeQuantLinear"] * 2
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        with jax.numpy_dtype_promotion("standard"):  # optax's adam mixes its int32 count with floats
            optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0], losses
    frozen = nn.freeze_fake_quant(model)
    assert [type(m).__name__ for m in (frozen.layers[0], frozen.layers[2])] == ["QLinear"] * 2
    for fake, q in ((model.layers[0], frozen.layers[0]), (model.layers[2], frozen.layers[2])):  # the same bits
        want = quant.quantize(fake.kernel.get_value().T, fmt)
        for a, b in zip(jax.tree_util.tree_leaves(q.weight.get_value()), jax.tree_util.tree_leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the same output up to float32 summation order (the frozen layers may take the compiled kernel)
    np.testing.assert_allclose(np.asarray(frozen(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda x: frozen(x))(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-5)


def test_selection_and_the_model_passed_in_is_unchanged():
    base = _toy()
    qat = nn.fake_quantize_model(base, "nf4", where=lambda path, layer: path == "layers.2")
    assert type(base.layers[2]).__name__ == "Linear" and type(qat.layers[0]).__name__ == "Linear"
    assert type(qat.layers[2]).__name__ == "FakeQuantLinear"
    k_rows = nn.fake_quantize_model(base, "q4_k")  # 64 inputs: not whole rows of 256, left in float
    assert type(k_rows.layers[0]).__name__ == "Linear"
    again = nn.fake_quantize_model(qat, "q8_0")  # already fake-quantized layers keep their format
    assert again.layers[2].fmt == "nf4" and again.layers[0].fmt == "q8_0"


def test_bad_options_raise():
    with pytest.raises(FormatError, match="argument 'fmt'"):
        nn.fake_quantize_model(_toy(), "nf5")
    with pytest.raises(FormatError, match="argument 'options'"):
        nn.FakeQuantLinear(64, 4, fmt="nf4", options={"group_size": 4}, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="argument 'clip'"):
        nn.fake_quantize_model(_toy(), "int4_group", clip=jnp.ones((64, 1)))
