"""nn.plan: measured sensitivities, a budget that holds, a target that is met, determinism, and applying a plan.

The sensitivity of a layer is checked against an independent computation (the model with that layer alone
replaced by a QLinear of the format, through quantize_model's where=); the knapsack against brute force over
every combination on a small instance.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from viva_tensor import nn
from viva_tensor.errors import ConfigError, FormatError
from viva_tensor.nn import _plan


class Net(nnx.Module):
    def __init__(self, seed=0):
        rngs = nnx.Rngs(seed)
        self.a = nnx.Linear(256, 64, rngs=rngs)
        self.b = nnx.Linear(64, 64, rngs=rngs)
        self.c = nnx.Linear(64, 16, rngs=rngs)

    def __call__(self, x):
        return self.c(jax.nn.gelu(self.b(jax.nn.gelu(self.a(x)))))


FORMATS = [("int4_group", {"group_size": 32}), "q4_1", "q8_0"]


@pytest.fixture(scope="module")
def setup():
    model = Net()
    batches = [(jax.random.normal(jax.random.key(i), (4, 8, 256)),) for i in range(2)]
    return model, batches, _plan.sensitivity(model, batches, formats=FORMATS)


def test_sensitivity_is_the_model_error_with_that_layer_alone_quantized(setup):
    model, batches, measured = setup
    assert [(c.name, c.fmt) for c in measured] == [(n, f) for n in "abc" for f in ("int4_group", "q4_1", "q8_0")]
    y = [model(*b) for b in batches]
    norm = sum(float(jnp.sum(v * v)) for v in y)
    for c in measured:
        alone = lambda path, layer, n=c.name: path == n  # noqa: E731
        qmodel, report = nn.quantize_model(model, c.fmt, where=alone, **dict(c.options))
        err = sum(float(jnp.sum((qmodel(*b) - v) ** 2)) for b, v in zip(batches, y, strict=True)) / norm
        assert c.error == pytest.approx(err, rel=1e-3, abs=1e-9), c
        assert c.nbytes == report.linear_bytes_after and c.values == report.linear_values
    errors = {(c.name, c.fmt): c.error for c in measured}
    for n in "abc":  # more bits, less error
        assert errors[(n, "q8_0")] < errors[(n, "q4_1")] and errors[(n, "q8_0")] < errors[(n, "int4_group")]


def test_gain_sensitivity_scales_the_first_candidate_by_layer_output_error(setup):
    """measure="gain": the first candidate of each layer is the model error itself; the others are it times
    the ratio of the layer's squared output errors, computed here in NumPy from the layer's real inputs."""
    model, batches, measured = setup
    gain = _plan.sensitivity(model, batches, formats=FORMATS, measure="gain")
    assert [(c.name, c.fmt, c.nbytes) for c in gain] == [(c.name, c.fmt, c.nbytes) for c in measured]
    x = np.concatenate([np.asarray(b[0], np.float64).reshape(-1, 256) for b in batches])
    inputs = {"a": x}
    inputs["b"] = np.asarray(jax.nn.gelu(model.a(jnp.asarray(x, jnp.float32))), np.float64)
    inputs["c"] = np.asarray(jax.nn.gelu(model.b(jnp.asarray(inputs["b"], jnp.float32))), np.float64)
    from viva_tensor import quant

    for name in "abc":
        rows = [c for c in gain if c.name == name]
        model_first = next(c for c in measured if c.name == name)
        assert rows[0].error == pytest.approx(model_first.error, rel=1e-6)
        kernel = np.asarray(getattr(model, name).kernel.get_value(), np.float64)

        def out_error(c, kernel=kernel, name=name):
            deq = np.asarray(quant.dequantize(quant.quantize(jnp.asarray(kernel.T, jnp.float32), c.fmt,
                                                             **dict(c.options))), np.float64).T  # fmt: skip
            return np.sum((inputs[name] @ (kernel - deq)) ** 2)

        for c in rows[1:]:
            assert c.error == pytest.approx(rows[0].error * out_error(c) / out_error(rows[0]), rel=1e-3), c
    errors = np.array([c.error for c in measured]), np.array([c.error for c in gain])
    assert np.corrcoef(np.log(errors[0]), np.log(errors[1]))[0, 1] > 0.9
    plan = nn.plan(model, batches, bits=5.0, formats=FORMATS, measure="gain")
    assert plan.bits_per_value <= 5.0
    with pytest.raises(ConfigError, match="measure"):
        _plan.sensitivity(model, batches, formats=FORMATS, measure="rtn")


def test_gptq_sensitivity_measures_the_records_gptq_makes(setup):
    """measure="gptq": the first candidate is the model error with that layer's GPTQ record (checked through
    quantize_model's GPTQ on the same layer alone); the others scale it by GPTQ's layer output errors (NumPy);
    every GPTQ error is at most round to nearest's; a given ``grams=`` is used as is; deterministic."""
    from viva_tensor import gptq, quant
    from viva_tensor.nn import _sequential

    model, batches, measured = setup
    options = {"damp": 0.1}
    got = _plan.sensitivity(model, batches, formats=FORMATS, measure="gptq", gptq_options=options)
    assert [(c.name, c.fmt, c.nbytes) for c in got] == [(c.name, c.fmt, c.nbytes) for c in measured]
    y = [model(*b) for b in batches]
    norm = sum(float(jnp.sum(v * v)) for v in y)
    grams, groups = _sequential.capture_grams(model, batches)
    for name in "abc":
        rows = [c for c in got if c.name == name]
        alone = lambda path, layer, n=name: path == n  # noqa: E731
        first = rows[0]
        if name == "b":  # one layer through quantize_model's GPTQ (the others share the code path)
            qmodel, _ = nn.quantize_model(model, first.fmt, method="gptq", calibration=batches, where=alone,
                                          sequential=False, **options, **dict(first.options))  # fmt: skip
            err = sum(float(jnp.sum((qmodel(*b) - v) ** 2)) for b, v in zip(batches, y, strict=True)) / norm
            assert first.error == pytest.approx(err, rel=1e-3)
        gram, count = grams[groups[name]]
        g = np.asarray(gram, np.float64)
        h = gptq.Hessian(gram * (2.0 / count), count)
        kernel = np.asarray(getattr(model, name).kernel.get_value(), np.float64)

        def out_error(c, kernel=kernel, g=g, h=h):
            rec = gptq.quantize(jnp.asarray(kernel.T, jnp.float32), h, c.fmt, **options, **dict(c.options))
            d = kernel - np.asarray(quant.dequantize(rec), np.float64).T
            return np.sum((g @ d) * d)

        for c in rows[1:]:
            assert c.error == pytest.approx(first.error * out_error(c) / out_error(first), rel=1e-3), c
        rtn = {c.fmt: c.error for c in measured if c.name == name}
        assert all(c.error <= rtn[c.fmt] * 1.0001 for c in rows), (rows, rtn)
    again = _plan.sensitivity(model, batches, formats=FORMATS, measure="gptq", gptq_options=options,
                              grams=(grams, groups))  # fmt: skip
    assert again == got


def test_k_quants_only_where_rows_fit():
    model = Net()
    found = _plan.sensitivity(model, [(jnp.ones((2, 256)),)], formats=["q4_k", "q8_0"])
    assert [(c.name, c.fmt) for c in found] == [("a", "q4_k"), ("a", "q8_0"), ("b", "q8_0"), ("c", "q8_0")]


def _brute_force(measured, bits):
    by_layer = [[c for c in measured if c.name == n] for n in dict.fromkeys(c.name for c in measured)]
    values = sum(opts[0].values for opts in by_layer)
    best = None
    for combo in itertools.product(*by_layer):
        if 8 * sum(c.nbytes for c in combo) <= bits * values:
            err = sum(c.error for c in combo)
            best = err if best is None or err < best else best
    return best


@pytest.mark.parametrize("bits", [4.7, 5.0, 5.5, 6.5, 8.5])
def test_the_budget_holds_and_the_choice_is_near_the_brute_force_optimum(setup, bits):
    model, batches, measured = setup
    chosen = _plan.choose(measured, bits=bits)
    plan = nn.Plan(chosen, measured, bits)
    assert plan.bits_per_value <= bits + 1e-9
    optimum = _brute_force(measured, bits)
    assert plan.error <= 1.5 * optimum + 1e-12, (plan.error, optimum)


def test_more_bits_never_more_error(setup):
    _, _, measured = setup
    errors = [nn.Plan(_plan.choose(measured, bits=b), measured).error for b in (4.7, 5.0, 6.0, 7.0, 8.5)]
    assert errors == sorted(errors, reverse=True)
    top = nn.Plan(_plan.choose(measured, bits=8.5), measured)
    assert {c.fmt for c in top.layers} == {"q8_0"}


def test_target_gives_the_fewest_bits_that_meet_it(setup):
    _, _, measured = setup
    err = {(c.name, c.fmt): c.error for c in measured}
    all_q8 = sum(err[(n, "q8_0")] for n in "abc")
    hulls = {n: _plan._hull([c for c in measured if c.name == n]) for n in "abc"}
    target = all_q8 + 1.01 * min(hulls[n][-2].error - err[(n, "q8_0")] for n in "abc")  # room for one layer
    plan = nn.Plan(_plan.choose(measured, target=target), measured, target=target)
    assert plan.error <= target
    assert plan.bits_per_value < 8.5


def test_plan_is_deterministic_and_applied_by_quantize_model(setup):
    model, batches, _ = setup
    p1 = nn.plan(model, batches, bits=5.0, formats=FORMATS)
    p2 = nn.plan(model, batches, bits=5.0, formats=FORMATS)
    assert p1 == p2
    assert str(p1) == str(p2) and str(p1).splitlines()[0].split() == ["layer", "format", "bits", "error"]
    qmodel, report = nn.quantize_model(model, p1)
    assert report.fmt == "plan" and report.formats == {c.name: c.fmt for c in p1.layers}
    assert report.bits_per_value == pytest.approx(p1.bits_per_value)
    g, greport = nn.quantize_model(model, p1, method="gptq", calibration=batches)
    assert greport.formats == report.formats and greport.linear_bytes_after == report.linear_bytes_after
    x = jax.random.normal(jax.random.key(9), (4, 8, 256))
    np.testing.assert_allclose(np.asarray(qmodel(x)), np.asarray(model(x)), atol=0.5)


def test_errors(setup):
    model, batches, _ = setup
    with pytest.raises(ConfigError, match="argument 'bits'"):
        nn.plan(model, batches, formats=FORMATS)
    with pytest.raises(ConfigError, match="argument 'bits'"):
        nn.plan(model, batches, bits=4.0, target=0.1, formats=FORMATS)
    with pytest.raises(ConfigError, match="argument 'bits'"):
        nn.plan(model, batches, bits=3.0, formats=FORMATS)
    with pytest.raises(FormatError, match="argument 'formats'"):
        nn.plan(model, batches, bits=5.0, formats=["int3"])
    with pytest.raises(ConfigError, match="argument 'calibration'"):
        nn.plan(model, lambda m: None, bits=5.0, formats=FORMATS)
