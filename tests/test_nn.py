"""viva_tensor.nn: exact attention against NumPy and jax.nn, SelfAttention, QLinear and quantize_model
against dequantize-then-matmul."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tolerance
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from viva_tensor import awq, flash_attention, nn, quant
from viva_tensor.errors import ConfigError, DimensionError, FormatError, InvalidShape, ShapeMismatch

FORMATS = quant.format_names()


def numpy_attention(q, k, v, mask=None, bias=None):
    """Softmax attention from its definition, in float64, layout (B, T, N, H)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    if mask is not None:
        s = np.where(np.asarray(mask), s, -np.inf)
    s = s - s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p = p / p.sum(axis=-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


def qkv(rng, b=2, t=5, s=7, n=3, h=4, dtype=jnp.float32):
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)
    k = jnp.asarray(rng.standard_normal((b, s, n, h)), dtype)
    v = jnp.asarray(rng.standard_normal((b, s, n, h)), dtype)
    return q, k, v


# --------------------------------------------------------------------------------- attention


def test_exact_attention_matches_numpy(rng, dtype, maybe_jit):
    q, k, v = qkv(rng, dtype=dtype)
    mask = jnp.asarray(rng.random((2, 1, 5, 7)) > 0.3).at[..., 0].set(True)
    bias = jnp.asarray(rng.standard_normal((1, 3, 5, 7)), jnp.float32)
    out = maybe_jit(nn.exact_attention)(q, k, v, bias, mask)
    assert out.dtype == dtype and out.shape == q.shape
    rtol, atol = tolerance(dtype)
    ref = numpy_attention(np.asarray(q, np.float32), np.asarray(k, np.float32), np.asarray(v, np.float32), mask, bias)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=rtol * 10, atol=atol * 10)


def test_exact_attention_matches_jax_nn(rng):
    q, k, v = qkv(rng)
    mask = jnp.asarray(rng.random((2, 1, 1, 7)) > 0.5)
    mask = mask.at[0].set(False)  # batch 0: no visible key at all, jax.nn gives the mean of v
    ours = nn.exact_attention(q, k, v, mask=mask)
    theirs = jax.nn.dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    np.testing.assert_allclose(ours[0], jnp.broadcast_to(v[0].mean(axis=0), ours[0].shape), atol=1e-5)


def test_exact_attention_is_the_one_reference(rng):
    """exact_attention delegates to flash_attention.naive_attention: the same bits, with and without bias/mask."""
    q, k, v = qkv(rng)
    mask = jnp.asarray(rng.random((2, 1, 5, 7)) > 0.3)
    bias = jnp.asarray(rng.standard_normal((1, 3, 5, 7)), jnp.float32)
    for args in ((), (bias,), (bias, mask), (None, mask)):
        ours = nn.exact_attention(q, k, v, *args, scale=0.7)
        ref = flash_attention.naive_attention(q, k, v, 0.7, **dict(zip(("bias", "mask"), args, strict=False)))
        np.testing.assert_array_equal(ours, ref)
        theirs = jax.nn.dot_product_attention(q, k, v, *args, scale=0.7)
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_exact_attention_scale_and_vmap(rng):
    q, k, v = qkv(rng)
    out = jax.vmap(lambda a, b, c: nn.exact_attention(a[None], b[None], c[None], scale=0.5)[0])(q, k, v)
    ref = numpy_attention(np.asarray(q) * 0.5 * math.sqrt(4), k, v)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_exact_attention_no_retrace(rng):
    q, k, v = qkv(rng)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(q, k, v):
        return nn.exact_attention(q, k, v)

    f(q, k, v)
    f(q + 1, k, v)


def test_exact_attention_errors(rng):
    q, k, v = qkv(rng)
    with pytest.raises(DimensionError, match=r"argument 'query': expected a 4-D array"):
        nn.exact_attention(q[0], k, v)
    with pytest.raises(ShapeMismatch, match="argument 'value'"):
        nn.exact_attention(q, k, v[:, :3])
    with pytest.raises(ShapeMismatch, match="argument 'key'.*grouped-query"):
        nn.exact_attention(q, k[:, :, :1], v[:, :, :1])


def test_attention_function():
    assert nn.attention_function("exact") is nn.exact_attention
    assert nn.attention_function("xla") is jax.nn.dot_product_attention
    custom = lambda *a, **kw: None  # noqa: E731
    assert nn.attention_function(custom) is custom
    expected = r"argument 'attention': expected one of \('exact', 'xla', 'flash', 'dense'\)"
    with pytest.raises(ConfigError, match=expected):
        nn.attention_function("fast")


@pytest.mark.parametrize("attention", ["exact", "xla", "flash"])
def test_self_attention_matches_numpy(attention, rng, maybe_jit):
    model = nn.SelfAttention(12, num_heads=3, attention=attention, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((2, 6, 12)), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    out = maybe_jit(lambda x, m: model(x, mask=m))(x, mask)

    def proj(layer, a):
        return np.asarray(a, np.float64) @ np.asarray(layer.kernel.get_value()) + np.asarray(layer.bias.get_value())

    heads = lambda a: a.reshape(2, 6, 3, 4)  # noqa: E731
    att = numpy_attention(
        heads(proj(model.query, x)), heads(proj(model.key, x)), heads(proj(model.value, x)), mask[:, None, None, :]
    )
    ref = proj(model.out, att.reshape(2, 6, 12))
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_self_attention_errors():
    with pytest.raises(ConfigError, match="argument 'num_heads': expected a positive divisor of 12"):
        nn.SelfAttention(12, num_heads=5, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="argument 'attention'"):
        nn.SelfAttention(12, num_heads=3, attention="nope", rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------------- QLinear


@pytest.mark.parametrize("fmt", FORMATS)
def test_qlinear_is_dequantize_then_matmul(fmt, rng, dtype, maybe_jit):
    k = 256 if quant.format_spec(fmt).row_multiple > 1 else 96  # the K-quants need whole rows of 256
    w = jnp.asarray(rng.standard_normal((64, k)) * 0.1, jnp.float32)  # (out, in)
    b = jnp.asarray(rng.standard_normal(64), jnp.float32)
    record = quant.quantize(w, fmt)
    layer = nn.QLinear(record, b)
    x = jnp.asarray(rng.standard_normal((3, 5, k)), dtype)
    out = maybe_jit(lambda x: layer(x))(x)
    assert out.shape == (3, 5, 64) and out.dtype == dtype
    wd = np.asarray(quant.dequantize(record), np.float64)
    ref = np.asarray(x, np.float64) @ wd.T + np.asarray(b, np.float64)
    rtol, atol = tolerance(dtype)
    if dtype == jnp.bfloat16:  # the weight is decoded to bfloat16 before the matmul
        ref = np.asarray(x, np.float64) @ np.asarray(jnp.asarray(wd, jnp.bfloat16), np.float64).T + np.asarray(b)
        atol = 0.1
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=rtol, atol=atol * 10)


def test_qlinear_without_bias_and_dtype(rng):
    w = jnp.asarray(rng.standard_normal((32, 64)), jnp.float32)
    layer = nn.QLinear(quant.quantize(w, "q8_0"), dtype=jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((4, 64)), jnp.float32)
    out = layer(x)
    assert out.dtype == jnp.bfloat16
    ref = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64) @ np.asarray(
        quant.dequantize(layer.weight.get_value()).astype(jnp.bfloat16), np.float64
    ).T
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=2e-2, atol=0.2)


def test_qlinear_vmap_and_no_retrace(rng):
    layer = nn.QLinear(quant.quantize(jnp.asarray(rng.standard_normal((16, 64)), jnp.float32), "nf4"))
    graphdef, state = nnx.split(layer)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(state, x):
        return nnx.merge(graphdef, state)(x)

    x = jnp.asarray(rng.standard_normal((6, 64)), jnp.float32)
    a = f(state, x)
    f(state, x * 2)
    rows = jax.vmap(lambda r: nnx.merge(graphdef, state)(r[None])[0])(x)
    np.testing.assert_allclose(rows, a, atol=1e-5)


def test_qlinear_from_linear(rng):
    linear = nnx.Linear(64, 8, rngs=nnx.Rngs(0))
    q = nn.QLinear.from_linear(linear, "int8")
    record = q.weight.get_value()
    assert record.shape == (8, 64) and record.axis == 0  # one scale per output row by default
    kernel = np.asarray(linear.kernel.get_value())
    codes = np.clip(np.round(kernel.T / (np.abs(kernel.T).max(axis=1, keepdims=True) / 127)), -127, 127)
    approx = codes * (np.abs(kernel.T).max(axis=1, keepdims=True) / 127)
    np.testing.assert_allclose(np.asarray(quant.dequantize(record)), approx, atol=1e-6)
    x = jnp.asarray(rng.standard_normal((2, 64)), jnp.float32)
    np.testing.assert_allclose(q(x), np.asarray(x) @ approx.T + np.asarray(linear.bias.get_value()), atol=1e-4)
    assert nn.QLinear.from_linear(linear, "int8", axis=None).weight.get_value().axis is None


def test_qlinear_errors(rng):
    w = jnp.asarray(rng.standard_normal((8, 32)), jnp.float32)
    with pytest.raises(FormatError, match="argument 'weight': expected a quantized record"):
        nn.QLinear(w)
    with pytest.raises(DimensionError, match="argument 'weight': expected a 2-D record"):
        nn.QLinear(quant.quantize(w.reshape(2, 4, 32), "q8_0"))
    with pytest.raises(ShapeMismatch, match=r"argument 'bias': expected shape \(8,\)"):
        nn.QLinear(quant.quantize(w, "q8_0"), jnp.ones(7))
    with pytest.raises(DimensionError, match="argument 'bias'"):
        nn.QLinear(quant.quantize(w, "q8_0"), jnp.ones((8, 1)))
    layer = nn.QLinear(quant.quantize(w, "q8_0"))
    with pytest.raises(ShapeMismatch, match="argument 'x': expected last dim 32"):
        layer(jnp.ones((2, 16)))
    with pytest.raises(FormatError, match="argument 'fmt'"):
        nn.QLinear.from_linear(nnx.Linear(32, 8, rngs=nnx.Rngs(0)), "int3")


# ----------------------------------------------------------------------------- quantize_model


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(64, 128, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(128, 128, rngs=rngs), nnx.Linear(128, 128, use_bias=False, rngs=rngs)])
        self.norm = nnx.LayerNorm(128, rngs=rngs)
        self.down = nnx.Linear(128, 16, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.up(x))
        for block in self.blocks:
            x = jax.nn.relu(block(x))
        return self.down(self.norm(x))


def numpy_mlp(model, x):
    """The MLP in float64 NumPy; a QLinear layer contributes its dequantized weight."""

    def lin(layer, a):
        if isinstance(layer, nn.QLinear):
            w = np.asarray(quant.dequantize(layer.weight.get_value()), np.float64).T
            b = layer.bias
        else:
            w, b = np.asarray(layer.kernel.get_value(), np.float64), layer.bias
        return a @ w + (0.0 if b is None else np.asarray(b.get_value(), np.float64))

    a = np.maximum(lin(model.up, np.asarray(x, np.float64)), 0)
    for block in model.blocks:
        a = np.maximum(lin(block, a), 0)
    mu, var = a.mean(-1, keepdims=True), a.var(-1, keepdims=True)
    a = (a - mu) / np.sqrt(var + 1e-6) * np.asarray(model.norm.scale.get_value()) + np.asarray(
        model.norm.bias.get_value()
    )
    return lin(model.down, a)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if quant.format_spec(f).row_multiple == 1])
def test_quantize_model_is_dequantize_then_matmul(fmt, rng):
    model = MLP(nnx.Rngs(0))
    qmodel, report = nn.quantize_model(model, fmt)
    assert all(type(layer) is nnx.Linear for layer in (model.up, model.down, *model.blocks))  # unchanged
    assert all(type(layer) is nn.QLinear for layer in (qmodel.up, qmodel.down, *qmodel.blocks))
    assert set(report.quantized) == {"up", "blocks.0", "blocks.1", "down"} and report.skipped == ()
    x = jnp.asarray(rng.standard_normal((4, 64)), jnp.float32)
    out = nnx.jit(lambda m, x: m(x))(qmodel, x)
    np.testing.assert_allclose(np.asarray(out), numpy_mlp(qmodel, x), rtol=1e-4, atol=1e-4)
    # the float model is still float
    np.testing.assert_allclose(np.asarray(model(x)), numpy_mlp(model, x), rtol=1e-4, atol=1e-4)


def test_quantize_model_bytes_are_measured():
    model = MLP(nnx.Rngs(0))
    qmodel, report = nn.quantize_model(model, "q8_0")
    float_bytes = sum(
        4 * math.prod(a.shape)
        for a in (
            model.up.kernel, model.up.bias, model.blocks[0].kernel, model.blocks[0].bias, model.blocks[1].kernel,
            model.norm.scale, model.norm.bias, model.down.kernel, model.down.bias,
        )
    )
    assert report.bytes_before == float_bytes == nn.param_bytes(model)
    kernels = 4 * (64 * 128 + 2 * 128 * 128 + 128 * 16)
    assert report.linear_bytes_before == kernels
    # Q8_0: 32 int8 codes and one float16 scale per block of 32 values -> 34 bytes per 32 values
    assert report.linear_bytes_after == kernels // 4 // 32 * 34
    assert report.bytes_after == float_bytes - kernels + report.linear_bytes_after == nn.param_bytes(qmodel)
    assert report.ratio == pytest.approx(report.bytes_before / report.bytes_after)
    assert "4 layers quantized" in str(report)


def test_quantize_model_where_and_options():
    model = MLP(nnx.Rngs(0))
    qmodel, report = nn.quantize_model(model, "nf4", where=lambda path, layer: path.startswith("blocks"), block_size=32)
    assert set(report.quantized) == {"blocks.0", "blocks.1"}
    assert {p for p, _ in report.skipped} == {"up", "down"}
    assert type(qmodel.up) is nnx.Linear and type(qmodel.blocks[1]) is nn.QLinear
    assert qmodel.blocks[0].weight.get_value().block_size == 32


def test_quantize_model_errors():
    model = MLP(nnx.Rngs(0))
    with pytest.raises(FormatError, match="argument 'fmt'"):
        nn.quantize_model(model, "fp3")
    with pytest.raises(FormatError, match="argument 'options'"):
        nn.quantize_model(model, "q4_0", block_size=64)


# ------------------------------------------------------------------------ AWQ calibration pass


def _awq_model():
    return nnx.Sequential(nnx.Linear(32, 24, rngs=nnx.Rngs(0)), nnx.Linear(24, 8, rngs=nnx.Rngs(1)))


def _awq_input():
    # a few large input channels, so that the scale search has something to protect
    return jax.random.normal(jax.random.key(0), (20, 32)) * jnp.where(jnp.arange(32) < 3, 25.0, 1.0)[None, :]


def test_capture_linear_inputs():
    model, x = _awq_model(), _awq_input()
    inputs = nn.capture_linear_inputs(model, x)
    assert list(inputs) == ["layers.0", "layers.1"]
    np.testing.assert_array_equal(inputs["layers.0"][0], x)
    np.testing.assert_allclose(inputs["layers.1"][0], model.layers[0](x), rtol=1e-6)
    assert all(type(layer) is nnx.Linear for layer in model.layers)  # the model is untouched
    with pytest.raises(InvalidShape, match="argument 'model'"):
        nn.capture_linear_inputs(nnx.LayerNorm(4, rngs=nnx.Rngs(0)), jnp.ones((2, 4)))


@pytest.mark.parametrize("clip", [False, True])
def test_quantize_model_awq_is_the_layer_search(clip):
    """Each layer's record is exactly awq.search_scales then awq.quantize_awq on that layer's own inputs."""
    model, x = _awq_model(), _awq_input()
    inputs = nn.capture_linear_inputs(model, x)
    config = awq.AWQConfig(group_size=8, clip=clip)
    qmodel, report = nn.quantize_model(model, "awq_int4", activations=inputs, config=config)
    assert report.quantized == ("layers.0", "layers.1") and report.skipped == ()
    assert all(type(layer) is nn.QLinear for layer in qmodel.layers)
    for i, layer in enumerate(model.layers):
        w, a = jnp.asarray(layer.kernel.get_value()).T, inputs[f"layers.{i}"][0]
        search = awq.search_scales(w, a, config=config)
        expected = awq.quantize_awq(w, a, scales=search.scales, config=config)
        chex.assert_trees_all_equal(qmodel.layers[i].weight.get_value(), expected)
        np.testing.assert_array_equal(qmodel.layers[i].bias.get_value(), layer.bias.get_value())
        assert report.alphas[f"layers.{i}"] == float(search.alpha)
    ref = numpy_mlp_awq(qmodel, x)
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, a: m(a))(qmodel, x)), ref, rtol=1e-4, atol=1e-4)
    assert report.linear_bytes_after == sum(int(layer.weight.get_value().nbytes) for layer in qmodel.layers)


def numpy_mlp_awq(qmodel, x):
    a = np.asarray(x, np.float64)
    for layer in qmodel.layers:
        w = np.asarray(quant.dequantize(layer.weight.get_value()), np.float64)
        a = a @ w.T + np.asarray(layer.bias.get_value(), np.float64)
    return a


def test_quantize_model_awq_beats_plain_on_the_calibration_data():
    model, x = _awq_model(), _awq_input()
    inputs = nn.capture_linear_inputs(model, x)
    awq_model, _ = nn.quantize_model(model, "awq_int4", activations=inputs, group_size=8)
    plain_model, _ = nn.quantize_model(model, "int4_group", group_size=8)
    first = model.layers[0](x)
    err = lambda m: float(jnp.mean((m.layers[0](x) - first) ** 2))  # noqa: E731
    assert err(awq_model) < err(plain_model)


def test_quantize_model_awq_activations_forms_and_selection():
    model, x = _awq_model(), _awq_input()
    inputs = nn.capture_linear_inputs(model, x)
    # a list of inputs of any leading shape is concatenated into rows; an array works too
    split = {"layers.0": [x[:7].reshape(7, 1, 32), x[7:]], "layers.1": inputs["layers.1"][0]}
    a, ra = nn.quantize_model(model, "awq_int4", activations=split, group_size=8)
    b, rb = nn.quantize_model(model, "awq_int4", activations=inputs, group_size=8)
    chex.assert_trees_all_equal(a.layers[0].weight.get_value(), b.layers[0].weight.get_value())
    assert ra.alphas == rb.alphas
    # a layer without activations is kept in float unless where selects it
    only = {"layers.0": inputs["layers.0"]}
    c, rc = nn.quantize_model(model, "awq_int4", activations=only, group_size=8)
    assert rc.quantized == ("layers.0",) and rc.skipped == (("layers.1", "no activations"),)
    assert type(c.layers[1]) is nnx.Linear and list(rc.alphas) == ["layers.0"]
    with pytest.raises(ConfigError, match="argument 'activations': expected the inputs of layer 'layers.1'"):
        nn.quantize_model(model, "awq_int4", activations=only, where=lambda path, layer: True)
    d, rd = nn.quantize_model(model, "awq_int4", activations=inputs, where=lambda path, layer: path == "layers.1")
    assert rd.quantized == ("layers.1",) and rd.skipped == (("layers.0", "not selected by where"),)
    # without activations, awq_int4 is group-int4 with unit scales, no search
    e, re_ = nn.quantize_model(model, "awq_int4")
    assert re_.alphas == {} and float(jnp.min(e.layers[0].weight.get_value().act_scale)) == 1.0


def test_quantize_model_awq_errors():
    model, x = _awq_model(), _awq_input()
    inputs = nn.capture_linear_inputs(model, x)
    with pytest.raises(ConfigError, match="argument 'activations': expected None for format 'nf4'"):
        nn.quantize_model(model, "nf4", activations=inputs)
    wrong = r"argument 'activations': expected inputs \(\.\.\., 32\) of layer 'layers.0'"
    with pytest.raises(ShapeMismatch, match=wrong):
        nn.quantize_model(model, "awq_int4", activations={"layers.0": jnp.ones((4, 31))})
    with pytest.raises(ShapeMismatch, match="got an empty list"):
        nn.quantize_model(model, "awq_int4", activations={"layers.0": []})
    with pytest.raises(FormatError, match="options of format 'awq_int4'"):
        nn.quantize_model(model, "awq_int4", activations=inputs, block_size=8)
    with pytest.raises(ConfigError, match="argument 'config': expected an AWQConfig"):
        nn.quantize_model(model, "awq_int4", activations=inputs, config={"group_size": 8})
    assert not hasattr(awq, "quantize_model") and not hasattr(awq, "capture_linear_inputs")


@given(st.integers(1, 4), st.sampled_from(["int8", "q8_0", "nf4"]))
def test_qlinear_property_matches_dequantized(rows, fmt):
    rng = np.random.default_rng(rows)
    w = jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)
    layer = nn.QLinear(quant.quantize(w, fmt))
    x = jnp.asarray(rng.standard_normal((rows, 64)), jnp.float32)
    ref = np.asarray(x, np.float64) @ np.asarray(quant.dequantize(layer.weight.get_value()), np.float64).T
    np.testing.assert_allclose(np.asarray(layer(x)), ref, rtol=1e-4, atol=1e-4)


def test_param_bytes():
    assert nn.param_bytes(nnx.Linear(4, 2, rngs=nnx.Rngs(0))) == 4 * (4 * 2 + 2)


def test_quantize_model_skips_layers_a_k_quant_cannot_hold():
    model = MLP(nnx.Rngs(0))  # every layer has 64 inputs: not a whole K-quant row of 256
    qmodel, report = nn.quantize_model(model, "q4_k")
    assert report.quantized == () and len(report.skipped) == 4
    assert all("not whole q4_k rows of 256" in why for _, why in report.skipped)
    assert all(type(layer) is nnx.Linear for layer in (qmodel.up, qmodel.down, *qmodel.blocks))
