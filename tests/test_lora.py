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


class _NormNet(nnx.Module):
    def __init__(self):
        self.up = nnx.Linear(64, 128, rngs=nnx.Rngs(0))
        self.norm = nnx.LayerNorm(128, rngs=nnx.Rngs(0))
        self.down = nnx.Linear(128, 32, rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.norm(self.up(x))))


def _quantized_norm_net():
    return nn.quantize_model(_NormNet(), "nf4", where=lambda path, layer: path == "up")[0]


def test_lora_filter_selects_adapters_biases_and_norms_never_a_kernel():
    adapted = nn.lora(_quantized_norm_net(), rank=4, rngs=nnx.Rngs(0))
    names = {}
    for parts in [("lora",), ("bias",), ("norm",), ("lora", "bias", "norm")]:
        state = nnx.state(adapted, nn.lora_filter(adapted, parts))
        names[parts] = sorted(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0])
    assert names["lora",] == sorted(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        nnx.state(adapted, nn.LoRAParam))[0])  # fmt: skip
    assert names["bias",] == ["['down']['base']['bias'].value", "['up']['base']['bias'].value"]
    assert names["norm",] == ["['norm']['bias'].value", "['norm']['scale'].value"]
    assert names["lora", "bias", "norm"] == sorted(names["lora",] + names["bias",] + names["norm",])
    assert "weight" not in str(names) and "kernel" not in str(names)  # the frozen kernels (NF4 and float) never
    for bad in [(), ("lora", "kernel"), "everything"]:
        with pytest.raises(ConfigError, match="train"):
            nn.lora_filter(adapted, bad)


def test_training_biases_and_norms_beside_the_adapters():
    """BitFit + LayerNorm tuning with LoRA: the selected leaves change, the kernels do not, the loss drops further
    than with the adapters alone in the same steps; the whole trained state saves and loads."""
    teacher = _NormNet()
    x = jax.random.normal(jax.random.key(5), (64, 64), jnp.float32)
    target = teacher(x) + 0.3 * jnp.tanh(x[:, :32]) + 0.2  # a shift: what biases fix cheaply

    def train(parts):
        adapted = nn.lora(_quantized_norm_net(), rank=2, rngs=nnx.Rngs(0))
        keep = nn.lora_filter(adapted, parts)
        graphdef, params, frozen = nnx.split(adapted, keep, ...)
        frozen_bytes = [np.asarray(v).tobytes() for v in jax.tree_util.tree_leaves(frozen)]
        tx = optax.adam(1e-2)
        opt = tx.init(params)

        def step(params, opt):
            loss, g = jax.value_and_grad(lambda p: jnp.mean((nnx.merge(graphdef, p, frozen)(x) - target) ** 2))(params)
            with jax.numpy_dtype_promotion("standard"):
                updates, opt = tx.update(g, opt, params)
            return optax.apply_updates(params, updates), opt, loss

        step = jax.jit(step)
        for _ in range(25):
            params, opt, loss = step(params, opt)
        nnx.update(adapted, params)
        assert [np.asarray(v).tobytes() for v in jax.tree_util.tree_leaves(nnx.state(adapted, nnx.Not(keep)))] == (
            frozen_bytes
        )
        return adapted, float(jnp.mean((adapted(x) - target) ** 2))

    lora_only, loss_lora = train(("lora",))
    everything, loss_all = train(("lora", "bias", "norm"))
    assert loss_all < 0.9 * loss_lora  # measured 0.0251 against 0.0290
    parts = ("lora", "bias", "norm")
    state = nn.lora_state(everything, parts)
    assert sorted(state) == ["down", "norm", "up"] and sorted(state["norm"]) == ["bias", "scale"]
    fresh = nn.lora(_quantized_norm_net(), rank=2, rngs=nnx.Rngs(7))
    nn.load_lora_state(fresh, state, parts)
    np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(everything(x)))
    with pytest.raises(ConfigError, match="state"):  # the adapters alone lack the biases and norms
        nn.load_lora_state(fresh, nn.lora_state(lora_only), parts)


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


# ---- Initialisation at the quantization error's best low-rank correction (LoftQ's SVD, calibrated as CLoQ).


def _inputs(rows=256, seed=11):
    """Correlated inputs (as a layer's activations are): white noise through a random mixing with decaying scales."""
    z = jax.random.normal(jax.random.key(seed), (rows, 64), jnp.float32)
    mix = jax.random.normal(jax.random.key(seed + 1), (64, 64), jnp.float32) * jnp.logspace(0, -2, 64)[None, :]
    return z @ mix.T


def _reference_product(error, gram, rank, damp):
    """NumPy float64 from the definition: H^{-1/2} SVD_r(H^{1/2} E), H = gram + damp * mean(diag) * I."""
    e = np.asarray(error, np.float64)
    if gram is None:
        u, s, vt = np.linalg.svd(e, full_matrices=False)
        return (u[:, :rank] * s[:rank]) @ vt[:rank]
    g = np.asarray(gram, np.float64)
    h = g + damp * np.mean(np.diag(g)) * np.eye(len(g))
    values, vectors = np.linalg.eigh(h)
    root = (vectors * np.sqrt(values)) @ vectors.T
    inv = (vectors / np.sqrt(values)) @ vectors.T
    u, s, vt = np.linalg.svd(root @ e, full_matrices=False)
    return inv @ ((u[:, :rank] * s[:rank]) @ vt[:rank])


def _product(layer):
    a, b = (np.asarray(v.get_value(), np.float64) for v in (layer.lora_a, layer.lora_b))
    return layer.scale * a @ b


@pytest.mark.parametrize("init", ["svd", "calibrated"])
def test_initialisation_is_the_best_low_rank_correction(init):
    from viva_tensor.nn._sequential import capture_grams

    teacher = _Net()
    x = _inputs()
    qmodel, _ = nn.quantize_model(teacher, "nf4")
    grams = capture_grams(teacher, [(x,)])
    adapted = nn.lora(qmodel, rank=8, alpha=16, init=init, reference=teacher, calibration=grams, rngs=nnx.Rngs(0))
    inputs = {"up": np.asarray(x, np.float64), "down": np.asarray(jax.nn.gelu(teacher.up(x)), np.float64)}
    for name in ("up", "down"):
        layer = getattr(adapted, name)
        w = np.asarray(getattr(teacher, name).kernel.get_value(), np.float64)
        error = w - np.asarray(quant.dequantize(getattr(qmodel, name).weight.get_value()), np.float64).T
        gram = None if init == "svd" else np.asarray(grams[0][name][0], np.float64)
        want = _reference_product(error, gram, 8, 0.01)
        got = _product(layer)
        assert np.linalg.norm(got - want) <= 2e-3 * np.linalg.norm(want), name
        xs = inputs[name]
        left, fixed = np.linalg.norm(xs @ error), np.linalg.norm(xs @ (error - got))
        assert fixed < 0.9 * left, name  # the correction removes a part of the output error on those inputs
        if init == "calibrated":  # and more of it than the unweighted SVD does
            svd = _reference_product(error, None, 8, 0.01)
            assert fixed < np.linalg.norm(xs @ (error - svd)), name
        a, b = np.asarray(layer.lora_a.get_value(), np.float64), np.asarray(layer.lora_b.get_value(), np.float64)
        if gram is not None:  # the split is even in the whitened inputs' space: H^{1/2} A against B
            values, vectors = np.linalg.eigh(gram + 0.01 * np.mean(np.diag(gram)) * np.eye(len(gram)))
            a = (vectors * np.sqrt(values)) @ vectors.T @ a
        np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1), rtol=2e-3)
    got, want = adapted(x), np.asarray(qmodel(x))
    assert np.linalg.norm(np.asarray(got) - np.asarray(teacher(x))) < np.linalg.norm(want - np.asarray(teacher(x)))
    np.testing.assert_allclose(
        np.asarray(nnx.jit(lambda m, v: m(v))(adapted, x)), np.asarray(got), rtol=1e-5, atol=1e-5
    )


def test_calibrated_initialisation_takes_a_mapping_and_the_group_leader():
    from viva_tensor.nn._sequential import capture_grams

    teacher = _Net()
    x = _inputs()
    qmodel, _ = nn.quantize_model(teacher, "nf4")
    grams, groups = capture_grams(teacher, [(x,)])
    one = nn.lora(qmodel, rank=4, init="calibrated", reference=teacher, calibration=(grams, groups), rngs=nnx.Rngs(0))
    mapping = {name: gram for name, (gram, _) in grams.items()}
    two = nn.lora(qmodel, rank=4, init="calibrated", reference=teacher, calibration=mapping, rngs=nnx.Rngs(0))
    for name in ("up", "down"):
        np.testing.assert_array_equal(_product(getattr(one, name)), _product(getattr(two, name)))
    led = nn._lora._gram_of(({"q": grams["up"]}, {"q": "q", "k": "q"}), "k")  # k shares q's input: q's Gram
    np.testing.assert_array_equal(np.asarray(led), np.asarray(grams["up"][0]))


def test_initialisation_bad_arguments():
    teacher = _Net()
    qmodel, _ = nn.quantize_model(teacher, "nf4")
    with pytest.raises(ConfigError, match="init"):
        nn.lora(qmodel, init="loftq", rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="reference"):
        nn.lora(qmodel, init="svd", rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="calibration"):
        nn.lora(qmodel, init="calibrated", reference=teacher, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="reference"):
        nn.lora(qmodel, init="svd", reference=nnx.Linear(64, 128, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="damp"):
        nn.lora(qmodel, init="svd", reference=teacher, damp=0.0, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="rank"):
        nn._lora.lora_init(jnp.ones((8, 4)), 5)
    with pytest.raises(ConfigError, match="gram"):
        nn._lora.lora_init(jnp.ones((8, 4)), 2, gram=jnp.eye(4))
