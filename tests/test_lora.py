"""nn.lora / nn.merge_lora: exact at step 0, the update against NumPy, merging, adapters saved alone, training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from viva_tensor import nn, quant
from viva_tensor.errors import ConfigError, InvalidOp

optax = pytest.importorskip("optax")


@pytest.fixture(autouse=True)
def _strict():
    with jax.numpy_dtype_promotion("strict"):
        yield


class _Net(nnx.Module):
    def __init__(self, dtype=None):
        self.up = nnx.Linear(64, 128, dtype=dtype, rngs=nnx.Rngs(0))
        self.down = nnx.Linear(128, 32, dtype=dtype, rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


def _qnet(dtype=None):
    qmodel, _ = nn.quantize_model(_Net(dtype), "nf4", where=lambda path, layer: path == "up")
    return qmodel


def _bits(x):
    x = np.asarray(x)
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


def _x(dtype=jnp.float32, rows=5):
    return jax.random.normal(jax.random.key(3), (rows, 64), jnp.float32).astype(dtype)


def _randomize_b(model, seed=4, scale=0.05):
    for i, (path, layer) in enumerate(nn._lora._layers(model, (nn.LoRALinear,))):
        del path
        b = scale * jax.random.normal(jax.random.key(seed + i), layer.lora_b.get_value().shape, jnp.float32)
        layer.lora_b.set_value(b)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("quantized", [False, True], ids=["float", "nf4"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_step_zero_equals_base_bit_for_bit(dtype, quantized, jit):
    base = _qnet(dtype) if quantized else _Net(dtype)
    adapted = nn.lora(base, rank=8, rngs=nnx.Rngs(7))
    assert isinstance(adapted.up, nn.LoRALinear) and isinstance(adapted.down, nn.LoRALinear)
    assert isinstance(adapted.up.base, nn.QLinear if quantized else nnx.Linear)
    x = _x(dtype)
    run = (lambda m, v: nnx.jit(lambda m, v: m(v))(m, v)) if jit else (lambda m, v: m(v))
    want, got = run(base, x), run(adapted, x)
    assert got.dtype == want.dtype == dtype
    np.testing.assert_array_equal(_bits(got), _bits(want))
    assert isinstance(base.up, nn.QLinear if quantized else nnx.Linear)  # the model passed in is unchanged


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "nf4"])
def test_update_matches_numpy(quantized):
    base = _qnet() if quantized else _Net()
    adapted = nn.lora(base, rank=4, alpha=12, rngs=nnx.Rngs(0), where=lambda path, layer: path == "up")
    assert isinstance(adapted.down, nnx.Linear)  # not selected
    _randomize_b(adapted)
    x = _x()
    layer = adapted.up
    a, b = (np.asarray(v.get_value(), np.float64) for v in (layer.lora_a, layer.lora_b))
    want = np.asarray(base.up(x), np.float64) + (12 / 4) * (np.asarray(x, np.float64) @ a) @ b
    for got in (layer(x), nnx.jit(lambda m, v: m(v))(layer, x)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    bound = 1 / np.sqrt(64)
    assert a.shape == (64, 4) and np.abs(a).max() <= bound and np.abs(a).max() > 0.5 * bound


def test_vmap_over_a_batch_of_inputs():
    adapted = nn.lora(_qnet(), rank=4, rngs=nnx.Rngs(0))
    _randomize_b(adapted)
    xs = jax.random.normal(jax.random.key(1), (3, 2, 64), jnp.float32)
    got = nnx.vmap(lambda m, v: m(v), in_axes=(None, 0))(adapted, xs)
    np.testing.assert_allclose(np.asarray(got), np.stack([np.asarray(adapted(x)) for x in xs]), rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="rank"):
        nn.lora(_Net(), rank=0, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="rank"):
        nn.lora(_Net(), rank=33, rngs=nnx.Rngs(0))  # down has 32 outputs
    with pytest.raises(ConfigError, match="where"):
        nn.lora(_Net(), where=lambda path, layer: False, rngs=nnx.Rngs(0))
    with pytest.raises(InvalidOp, match="base"):
        nn.LoRALinear(nnx.LayerNorm(4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0))


def test_lora_twice_does_not_wrap_adapters():
    adapted = nn.lora(_Net(), rank=2, rngs=nnx.Rngs(0), where=lambda path, layer: path == "up")
    again = nn.lora(adapted, rank=2, rngs=nnx.Rngs(1), where=lambda path, layer: True)
    assert isinstance(again.up.base, nnx.Linear) and isinstance(again.down.base, nnx.Linear)
    with pytest.raises(ConfigError):
        nn.lora(again, rank=2, rngs=nnx.Rngs(1))  # nothing left to adapt


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "nf4"])
def test_merge_in_float_equals_adapted(quantized):
    adapted = nn.lora(_qnet() if quantized else _Net(), rank=8, rngs=nnx.Rngs(0))
    _randomize_b(adapted)
    merged = nn.merge_lora(adapted)
    assert isinstance(merged.up, nnx.Linear) and isinstance(merged.down, nnx.Linear)
    assert not jax.tree_util.tree_leaves(nnx.state(merged, nn.LoRAParam))
    x = _x()
    np.testing.assert_allclose(np.asarray(merged(x)), np.asarray(adapted(x)), rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(
        np.asarray(nnx.jit(lambda m, v: m(v))(merged, x)), np.asarray(adapted(x)), rtol=1e-5, atol=2e-5
    )
    assert isinstance(adapted.up, nn.LoRALinear)  # merge_lora copies


@pytest.mark.parametrize("fmt", ["nf4", "q8_0", "int8"])
def test_merge_requantized_within_the_format_error(fmt):
    adapted = nn.lora(_qnet(), rank=8, rngs=nnx.Rngs(0), where=lambda path, layer: path == "up")
    _randomize_b(adapted)
    merged = nn.merge_lora(adapted, fmt=fmt)
    assert isinstance(merged.up, nn.QLinear) and quant.format_spec(fmt).name == merged.up.weight.get_value().format
    w = np.asarray(adapted.up.merged_weight()).T  # (out, in), float32
    layer = nn.QLinear.from_linear(nn._lora._float_linear(adapted.up.base, jnp.asarray(w.T)), fmt)
    for mine, ref in zip(
        jax.tree_util.tree_leaves(merged.up.weight.get_value()),
        jax.tree_util.tree_leaves(layer.weight.get_value()),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(ref))  # the record of the merged weight
    err = np.abs(np.asarray(quant.dequantize(merged.up.weight.get_value()), np.float64) - w)
    x = _x()
    got, want = np.asarray(merged.up(x), np.float64), np.asarray(adapted.up(x), np.float64)
    bound = np.abs(np.asarray(x, np.float64)) @ err.T  # |x (W' - W)| <= |x| |W' - W|
    assert np.all(np.abs(got - want) <= bound + 1e-4)
    assert np.abs(got - want).max() > 0  # a real re-quantization happened


def test_adapters_save_and_load_alone(tmp_path):
    adapted = nn.lora(_qnet(), rank=4, rngs=nnx.Rngs(0))
    _randomize_b(adapted)
    state = nn.lora_state(adapted)
    path = tmp_path / "adapters.safetensors"
    quant.save(path, state)
    n_adapter = sum(v.nbytes for v in jax.tree_util.tree_leaves(state))
    assert path.stat().st_size < n_adapter + 8192  # the adapters only, not the base
    fresh = nn.lora(_qnet(), rank=4, rngs=nnx.Rngs(99))
    x = _x()
    assert not np.allclose(np.asarray(fresh(x)), np.asarray(adapted(x)))
    nn.load_lora_state(fresh, quant.load(path))
    np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(adapted(x)))
    with pytest.raises(ConfigError, match="state"):
        nn.load_lora_state(nn.lora(_qnet(), rank=2, rngs=nnx.Rngs(0)), quant.load(path))


def _base_bytes(model):
    leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Not(nn.LoRAParam)))
    return [np.asarray(leaf).tobytes() for leaf in leaves]


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "nf4"])
def test_optax_steps_reduce_the_loss_and_leave_the_base_alone(quantized):
    teacher = _Net()
    x = jax.random.normal(jax.random.key(5), (64, 64), jnp.float32)
    target = teacher(x) + 0.1 * jnp.sin(x[:, :32])  # something the base does not do
    adapted = nn.lora(_qnet() if quantized else _Net(), rank=8, rngs=nnx.Rngs(0))
    before = _base_bytes(adapted)
    opt = nnx.Optimizer(adapted, optax.adam(1e-2), wrt=nn.LoRAParam)
    traces = []

    def loss_fn(model):
        return jnp.mean((model(x) - target) ** 2)

    @nnx.jit
    def step(model, opt):
        traces.append(None)
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nn.LoRAParam))(model)
        with jax.numpy_dtype_promotion("standard"):  # optax's adam computes decay**count (float ** int32)
            opt.update(model, grads)
        return loss

    losses = [float(step(adapted, opt)) for _ in range(30)]
    assert len(traces) == 1  # traced once
    assert losses[-1] < 0.5 * losses[0]
    assert float(loss_fn(adapted)) < losses[-1]
    assert _base_bytes(adapted) == before  # frozen: the base's bytes (a quantized record's codes too) unchanged
    if quantized:
        assert quant.is_quantized(adapted.up.base.weight.get_value())
