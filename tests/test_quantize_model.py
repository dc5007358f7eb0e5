"""nn.quantize_model with method="gptq": calibrated, sequential, grouped, masked — against gptq.quantize by hand.

The references are written here from the definition: a layer's Hessian is 2 XᵀX / n of the inputs the
model gives it (NumPy, float64, padding rows dropped), and the record is ``gptq.quantize`` on it; sequential
means that the inputs come from the model whose earlier layers hold their GPTQ records.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from viva_tensor import gptq, nn, quant
from viva_tensor.errors import ConfigError, FormatError
from viva_tensor.nn import _sequential


class MLP(nnx.Module):
    def __init__(self, dims=(64, 64, 32), *, param_dtype=jnp.float32, seed=0):
        rngs = nnx.Rngs(seed)
        self.first = nnx.Linear(dims[0], dims[1], param_dtype=param_dtype, rngs=rngs)
        self.second = nnx.Linear(dims[1], dims[2], param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.second(jax.nn.relu(self.first(x)))


class Shared(nnx.Module):
    """q, k and v read the same input; out reads their combination."""

    def __init__(self, d=64, seed=0):
        rngs = nnx.Rngs(seed)
        self.q, self.k, self.v = (nnx.Linear(d, d, rngs=rngs) for _ in range(3))
        self.out = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x):
        a = jax.nn.softmax(jnp.einsum("btd,bsd->bts", self.q(x), self.k(x)) / 8.0, axis=-1)
        return self.out(jnp.einsum("bts,bsd->btd", a, self.v(x)))


def _inputs(seed, shape=(4, 16, 64)):
    """Correlated inputs: independent draws of one distribution (the mixing matrix is the same for every seed)."""
    mix = jnp.eye(shape[-1]) + jax.random.normal(jax.random.key(99), (shape[-1], shape[-1])) / 2
    return jnp.einsum("btd,de->bte", jax.random.normal(jax.random.key(seed), shape), mix)


def _hessian(rows):
    rows = np.asarray(rows, np.float64).reshape(-1, np.shape(rows)[-1])
    return (2 * rows.T @ rows / len(rows)).astype(np.float32)


def _weight(layer):
    return jnp.asarray(layer.kernel.get_value()).T


def _same_record(a, b):
    return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize("sequential", [True, False])
def test_gptq_sequential_is_gptq_on_the_quantized_model_inputs(sequential):
    model = MLP()
    batches = [(_inputs(i),) for i in range(2)]
    qmodel, report = nn.quantize_model(model, "int4_group", method="gptq", calibration=batches,
                                       sequential=sequential, group_size=32)  # fmt: skip
    x = jnp.concatenate([b[0] for b in batches])
    first = gptq.quantize(_weight(model.first), _hessian(x), "int4_group", group_size=32)
    hidden_layer = nn.QLinear(first, model.first.bias.get_value()) if sequential else model.first
    hidden = jax.nn.relu(hidden_layer(x))
    second = gptq.quantize(_weight(model.second), _hessian(hidden), "int4_group", group_size=32)
    got_first, got_second = qmodel.first.weight.get_value(), qmodel.second.weight.get_value()
    # the Hessians agree to float32 rounding (device sum in float32 against NumPy float64): compare codes
    np.testing.assert_array_equal(np.asarray(quant.dequantize(got_first)), np.asarray(quant.dequantize(first)))
    agree = np.mean(np.asarray(quant.dequantize(got_second)) == np.asarray(quant.dequantize(second)))
    assert agree >= 0.99, agree
    assert report.method == "gptq" and report.quantized == ("first", "second")


def test_sequential_and_one_shot_differ_after_the_first_layer():
    model, batches = MLP(), [(_inputs(0),)]
    a, _ = nn.quantize_model(model, "q4_0", method="gptq", calibration=batches, sequential=True)
    b, _ = nn.quantize_model(model, "q4_0", method="gptq", calibration=batches, sequential=False)
    assert _same_record(a.first.weight.get_value(), b.first.weight.get_value())
    assert not _same_record(a.second.weight.get_value(), b.second.weight.get_value())


def test_gptq_beats_round_to_nearest_on_the_model_output():
    model = MLP()
    batches = [(_inputs(i),) for i in range(3)]
    held_out = _inputs(10)
    g, _ = nn.quantize_model(model, "int4_group", method="gptq", calibration=batches, group_size=32)
    r, _ = nn.quantize_model(model, "int4_group", group_size=32)
    y = model(held_out)
    err = lambda m: float(jnp.linalg.norm(m(held_out) - y))  # noqa: E731
    assert err(g) < 0.9 * err(r), (err(g), err(r))


def test_layers_fed_the_same_input_form_one_group():
    model = Shared()
    grams, groups = _sequential.capture_grams(model, [(_inputs(0),)])
    assert groups == {"q": "q", "k": "q", "v": "q", "out": "out"}
    assert set(grams) == {"q", "out"}
    np.testing.assert_allclose(np.asarray(grams["q"][0]), _hessian(_inputs(0)) * 64 / 2, rtol=2e-5, atol=1e-3)
    qmodel, report = nn.quantize_model(model, "q8_0", method="gptq", calibration=[(_inputs(0),)])
    h = _hessian(_inputs(0))
    for name in ("q", "k", "v"):
        want = gptq.quantize(_weight(getattr(model, name)), h, "q8_0")
        got = getattr(qmodel, name).weight.get_value()
        assert np.mean(np.asarray(got.qs) == np.asarray(want.qs)) > 0.999
    assert sorted(report.quantized) == ["k", "out", "q", "v"]  # graph order: nnx sorts attribute names


def test_the_mask_leaves_padding_out():
    model = MLP()
    x = _inputs(0)
    mask = jnp.arange(16)[None, :] < jnp.array([16, 9, 3, 12])[:, None]
    padded = jnp.where(mask[..., None], x, 100.0)  # large padding: would dominate if counted
    grams, _ = _sequential.capture_grams(model, [nn.CalibrationBatch((padded,), mask=mask)], names=["first"])
    rows = np.asarray(x)[np.asarray(mask)]
    np.testing.assert_allclose(np.asarray(grams["first"][0]), rows.T @ rows, rtol=2e-5, atol=1e-3)
    assert float(grams["first"][1]) == int(mask.sum())


def test_a_callable_calibration_runs_eagerly_and_gives_the_same_hessians():
    model = MLP()
    xs = [_inputs(0), _inputs(1)]

    def run(m):
        for x in xs:
            m(x)

    eager, g1 = _sequential.capture_grams(model, run)
    jitted, g2 = _sequential.capture_grams(model, [(x,) for x in xs])
    assert g1 == g2
    for name in eager:
        np.testing.assert_allclose(np.asarray(eager[name][0]), np.asarray(jitted[name][0]), rtol=1e-5, atol=1e-3)
    a, _ = nn.quantize_model(model, "q4_0", method="gptq", calibration=run)
    b, _ = nn.quantize_model(model, "q4_0", method="gptq", calibration=[(x,) for x in xs])
    assert np.mean(np.asarray(a.second.weight.get_value().qs) == np.asarray(b.second.weight.get_value().qs)) > 0.99


def test_bfloat16_parameters():
    model = MLP(param_dtype=jnp.bfloat16)
    qmodel, report = nn.quantize_model(model, "nf4", method="gptq", calibration=[(_inputs(0).astype(jnp.bfloat16),)])
    assert qmodel.first.weight.get_value().dtype == jnp.bfloat16
    y = qmodel(_inputs(1).astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
    assert report.bits_per_value == pytest.approx(4.5)


def test_where_selects_and_the_report_counts_bytes_and_bits():
    model = MLP()
    qmodel, report = nn.quantize_model(model, "q8_0", method="gptq", calibration=[(_inputs(0),)],
                                       where=lambda path, layer: path == "second")  # fmt: skip
    assert isinstance(qmodel.first, nnx.Linear) and report.quantized == ("second",)
    assert report.linear_bytes_after == qmodel.second.weight.get_value().nbytes
    assert report.bits_per_value == pytest.approx(8.5)
    assert "GPTQ" in str(report) and "8.50 bits/value" in str(report)


def test_rtn_default_is_unchanged():
    model = MLP()
    a, ra = nn.quantize_model(model, "q4_0")
    assert ra.method == "rtn"
    want = quant.quantize(_weight(model.first), "q4_0")
    assert _same_record(a.first.weight.get_value(), want)


def test_awq_from_calibration_batches():
    model = MLP()
    x = _inputs(0)
    a, ra = nn.quantize_model(model, "awq_int4", method="awq", calibration=[(x,)], group_size=32)
    b, rb = nn.quantize_model(model, "awq_int4", activations=nn.capture_linear_inputs(model, x), group_size=32)
    assert ra.alphas == rb.alphas and ra.method == rb.method == "awq"


def test_errors():
    model = MLP()
    with pytest.raises(ConfigError, match="argument 'method'"):
        nn.quantize_model(model, "q4_0", method="smooth")
    with pytest.raises(ConfigError, match="argument 'calibration'"):
        nn.quantize_model(model, "q4_0", method="gptq")
    with pytest.raises(ConfigError, match="argument 'calibration'"):
        nn.quantize_model(model, "q4_0", method="gptq", calibration=[])
    with pytest.raises(ConfigError, match="argument 'calibration'"):
        nn.quantize_model(model, "q4_0", method="gptq", calibration="some text")
    with pytest.raises(FormatError, match="argument 'fmt'"):
        nn.quantize_model(model, "q9", method="gptq", calibration=[(_inputs(0),)])
    with pytest.raises(ConfigError, match="argument 'method'"):
        nn.quantize_model(model, "q4_0", method="awq", calibration=[(_inputs(0),)])


def test_others_quantizes_the_embeddings_through_quantize_layer():
    class Tok(nnx.Module):
        def __init__(self):
            self.embed = nnx.Embed(100, 64, rngs=nnx.Rngs(0))
            self.out = nnx.Linear(64, 64, rngs=nnx.Rngs(1))

        def __call__(self, ids):
            return self.out(self.embed(ids))

    model = Tok()
    ids = jnp.array([[1, 5, 99, 0]], jnp.int32)
    qmodel, report = nn.quantize_model(model, "q4_0", method="gptq", calibration=[(ids,)], others="q8_0")
    assert report.formats == {"out": "q4_0", "embed": "q8_0"}
    assert type(qmodel.embed).__name__ == "QEmbed"
    assert report.linear_values == 64 * 64 and report.bytes_after == nn.param_bytes(qmodel)
    want = nn.quantize_layer(model.embed, "q8_0")(ids)
    np.testing.assert_array_equal(np.asarray(qmodel.embed(ids)), np.asarray(want))
    plain, _ = nn.quantize_model(model, "q4_0")
    assert isinstance(plain.embed, nnx.Embed)  # others=None: the default keeps them float


def test_others_mapping_gives_each_layer_its_format_and_leaves_the_rest_float():
    class Tok(nnx.Module):
        def __init__(self):
            self.word = nnx.Embed(100, 64, rngs=nnx.Rngs(0))
            self.position = nnx.Embed(16, 64, rngs=nnx.Rngs(1))
            self.kind = nnx.Embed(2, 64, rngs=nnx.Rngs(2))
            self.out = nnx.Linear(64, 64, rngs=nnx.Rngs(3))

        def __call__(self, ids):
            return self.out(self.word(ids) + self.position(jnp.arange(ids.shape[1])[None]) + self.kind(ids % 2))

    model = Tok()
    ids = jnp.array([[1, 5, 99, 0]], jnp.int32)
    others = {"word": "q5_0", "position": ("q4_0", {})}
    qmodel, report = nn.quantize_model(model, "q8_0", others=others)
    assert report.formats == {"out": "q8_0", "word": "q5_0", "position": "q4_0"}
    assert isinstance(qmodel.kind, nnx.Embed)  # not in the mapping: float
    for name, fmt in (("word", "q5_0"), ("position", "q4_0")):
        want = nn.quantize_layer(getattr(model, name), fmt)(ids % 16)
        np.testing.assert_array_equal(np.asarray(getattr(qmodel, name)(ids % 16)), np.asarray(want))
    gmodel, greport = nn.quantize_model(model, "q8_0", method="gptq", calibration=[(ids,)], others=others)
    assert greport.formats == report.formats and report.bytes_after == nn.param_bytes(qmodel)
    with pytest.raises(ConfigError, match=r"argument 'others'.*'word'.*got 'out', 'wrd'"):
        nn.quantize_model(model, "q8_0", others={"wrd": "q5_0", "out": "q8_0"})
    with pytest.raises(ConfigError, match=r"argument 'others\['word'\]'"):
        nn.quantize_model(model, "q8_0", method="gptq", calibration=[(ids,)], others={"word": 5})
    with pytest.raises(ConfigError, match="argument 'others'"):
        nn.quantize_model(model, "q8_0", others=("q5_0",))
