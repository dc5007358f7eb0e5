"""viva_tensor.rotation and the rotated QLinear: against a dense NumPy R built from the definition.

The reference is ``R = diag(signs) · blockdiag(H_b / sqrt(b))`` with ``H_b`` Sylvester's Hadamard matrix
(``H_1 = [1]``, ``H_2k = [[H_k, H_k], [H_k, -H_k]]``), in float64; the signs are read from the record's packed
bits with ``np.unpackbits``. A rotated layer must compute ``(x R) Qᵀ + b`` with ``Q`` the record of ``W R``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from viva_tensor import gptq, nn, quant, rotation
from viva_tensor.errors import CheckpointError, ConfigError, DTypeError, ShapeMismatch


def _sylvester(b):
    h = np.ones((1, 1))
    while h.shape[0] < b:
        h = np.block([[h, h], [h, -h]])
    return h


def _dense(r):
    signs = 1.0 - 2.0 * np.unpackbits(np.asarray(r.packed)).astype(np.float64)
    n, b = signs.size, r.block
    blocks = np.kron(np.eye(n // b), _sylvester(b) / np.sqrt(b))
    return signs[:, None] * blocks


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n,block", [(64, 64), (384, 128), (96, 32), (16, 2)])
def test_apply_and_invert_are_x_R_and_x_Rt(jit, dtype, n, block):
    r = rotation.hadamard(jax.random.key(n), n, block=block)
    x = jax.random.normal(jax.random.key(1), (3, 5, n)).astype(dtype)
    ref = _dense(r)
    f_apply = jax.jit(rotation.apply) if jit else rotation.apply
    f_invert = jax.jit(rotation.invert) if jit else rotation.invert
    y, z = f_apply(x, r), f_invert(x, r)
    assert y.dtype == dtype and y.shape == x.shape and z.dtype == dtype
    x64 = np.asarray(x, np.float64)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(y, np.float64), x64 @ ref, atol=tol * 4, rtol=tol)
    np.testing.assert_allclose(np.asarray(z, np.float64), x64 @ ref.T, atol=tol * 4, rtol=tol)


def test_jit_and_eager_agree_bit_for_bit_and_vmap_is_per_row():
    r = rotation.hadamard(jax.random.key(0), 256, block=128)
    x = jax.random.normal(jax.random.key(2), (8, 256))
    np.testing.assert_array_equal(np.asarray(rotation.apply(x, r)), np.asarray(jax.jit(rotation.apply)(x, r)))
    mapped = jax.vmap(rotation.apply, in_axes=(0, None))(x, r)
    np.testing.assert_allclose(np.asarray(mapped), np.asarray(rotation.apply(x, r)), atol=1e-6)


def test_dense_matrix_is_orthogonal_and_signs_come_from_the_key():
    a, b = rotation.hadamard(jax.random.key(0), 128, block=64), rotation.hadamard(jax.random.key(1), 128, block=64)
    m = np.asarray(rotation.matrix(a), np.float64)
    np.testing.assert_allclose(m @ m.T, np.eye(128), atol=1e-6)
    np.testing.assert_allclose(m, _dense(a), atol=1e-6)
    again = rotation.hadamard(jax.random.key(0), 128, block=64)
    assert np.array_equal(np.asarray(a.packed), np.asarray(again.packed))
    assert not np.array_equal(np.asarray(a.packed), np.asarray(b.packed))
    assert a.nbytes == 16 and a.size == 128


def test_hessian_is_the_gram_matrix_of_the_rotated_inputs():
    r = rotation.hadamard(jax.random.key(0), 64, block=32)
    x = np.asarray(jax.random.normal(jax.random.key(3), (200, 64)), np.float64)
    x[:, 5] *= 30.0  # an outlier feature
    h = 2 * x.T @ x / len(x)
    ref = _dense(r).T @ h @ _dense(r)
    np.testing.assert_allclose(np.asarray(rotation.hessian(jnp.asarray(h, jnp.float32), r)), ref,
                               rtol=1e-5, atol=1e-5 * np.abs(ref).max())  # fmt: skip


@settings(max_examples=25, deadline=None)
@given(blocks=st.integers(1, 4), log_block=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_round_trip_and_norms_hold_for_any_size(blocks, log_block, seed):
    block = 2**log_block
    n = blocks * max(block, 8)
    r = rotation.hadamard(jax.random.key(seed), n, block=block)
    x = jax.random.normal(jax.random.key(seed + 1), (4, n))
    y = rotation.apply(x, r)
    np.testing.assert_allclose(np.asarray(rotation.invert(y, r)), np.asarray(x), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(y), axis=-1), np.linalg.norm(np.asarray(x), axis=-1),
                               rtol=1e-5)  # fmt: skip


def test_nan_in_gives_nan_only_in_its_block():
    r = rotation.hadamard(jax.random.key(0), 64, block=32)
    x = jnp.zeros((64,)).at[3].set(jnp.nan)
    y = np.asarray(rotation.apply(x, r))
    assert np.isnan(y[:32]).all() and not np.isnan(y[32:]).any()


def test_block_for_picks_the_largest_power_of_two_that_divides():
    assert [rotation.block_for(n) for n in (384, 1536, 96, 8)] == [128, 128, 32, 8]
    assert rotation.block_for(384, 32) == 32


def test_errors_name_the_argument():
    r = rotation.hadamard(jax.random.key(0), 64, block=32)
    with pytest.raises(ConfigError, match="block"):
        rotation.hadamard(jax.random.key(0), 64, block=48)
    with pytest.raises(ShapeMismatch, match="n"):
        rotation.hadamard(jax.random.key(0), 96, block=64)
    with pytest.raises(ShapeMismatch, match="last dim 64"):
        rotation.apply(jnp.ones((2, 32)), r)
    with pytest.raises(DTypeError, match="x"):
        rotation.apply(jnp.ones((2, 64), jnp.int32), r)
    with pytest.raises(ConfigError, match="Rotation"):
        rotation.invert(jnp.ones((64,)), "not a rotation")
    with pytest.raises(ShapeMismatch, match="h"):
        rotation.hessian(jnp.ones((64, 32)), r)
    with pytest.raises(ConfigError, match="n"):
        rotation.block_for(100)


# ------------------------------------------------------------------------------------------ rotated layers


def _outlier_linear(d_in=128, d_out=32, seed=0):
    layer = nnx.Linear(d_in, d_out, rngs=nnx.Rngs(seed))
    kernel = np.asarray(layer.kernel.get_value()).copy()
    kernel[[3, 70]] *= 25.0  # two outlier input features: the groups holding them lose their resolution
    layer.kernel.set_value(jnp.asarray(kernel))
    return layer


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rotated_qlinear_computes_xR_times_the_record_of_WR(jit, dtype):
    layer = _outlier_linear()
    q = nn.QLinear.from_linear(layer, "q4_0", rotate=128, rotation_key=jax.random.key(7))
    r = q.rotation.get_value()
    w = np.asarray(layer.kernel.get_value(), np.float64).T
    record = quant.quantize(jnp.asarray(w @ _dense(r), jnp.float32), "q4_0")
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q.weight.get_value())),
                                  np.asarray(quant.dequantize(record)))  # fmt: skip
    x = jax.random.normal(jax.random.key(1), (4, 128)).astype(dtype)
    ref = np.asarray(x, np.float64) @ _dense(r) @ np.asarray(quant.dequantize(record), np.float64).T
    ref += np.asarray(layer.bias.get_value(), np.float64)
    y = (nnx.jit(lambda m, v: m(v)) if jit else (lambda m, v: m(v)))(q, x)
    assert y.dtype == dtype
    tol = 1e-4 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=tol, atol=tol * np.abs(ref).max())
    dense = np.asarray(quant.dequantize(record), np.float64) @ _dense(r).T
    np.testing.assert_allclose(np.asarray(q.dense_weight()), dense, atol=1e-4 * np.abs(dense).max())


def test_rotation_lowers_the_error_of_outlier_columns():
    layer = _outlier_linear()
    w = np.asarray(layer.kernel.get_value()).T
    x = jax.random.normal(jax.random.key(4), (256, 128))
    for fmt in ("q4_0", "int4_group", "nf4"):
        plain = nn.QLinear.from_linear(layer, fmt)
        rotated = nn.QLinear.from_linear(layer, fmt, rotate=128)
        err = lambda m: float(jnp.linalg.norm(m(x) - layer(x)))  # noqa: E731
        assert err(rotated) < 0.8 * err(plain), (fmt, err(rotated), err(plain))
        assert np.abs(np.asarray(rotated.dense_weight()) - w).max() < np.abs(np.asarray(plain.dense_weight()) - w).max()


class _MLP(nnx.Module):
    def __init__(self, seed=0):
        self.first = _outlier_linear(128, 64, seed)
        self.second = nnx.Linear(64, 32, rngs=nnx.Rngs(seed + 1))

    def __call__(self, x):
        return self.second(jax.nn.relu(self.first(x)))


def _batches(n=3):
    return [(jax.random.normal(jax.random.key(10 + i), (4, 16, 128)),) for i in range(n)]


def test_quantize_model_rtn_and_the_report_count_the_signs():
    model = _MLP()
    qmodel, report = nn.quantize_model(model, "q4_0", rotate=128)
    assert qmodel.first.rotation.get_value().block == 128 and qmodel.second.rotation.get_value().block == 64
    records = qmodel.first.weight.get_value().nbytes + qmodel.second.weight.get_value().nbytes
    assert report.linear_bytes_after == records + 128 // 8 + 64 // 8
    plain, plain_report = nn.quantize_model(model, "q4_0")
    assert report.bits_per_value > plain_report.bits_per_value
    assert nn.param_bytes(qmodel) == nn.param_bytes(plain) + 24


def test_gptq_with_rotate_is_gptq_of_WR_on_the_rotated_hessian():
    model = _MLP()
    batches = _batches()
    qmodel, report = nn.quantize_model(model, "int4_group", method="gptq", calibration=batches, sequential=False,
                                       group_size=32, rotate=128)  # fmt: skip
    x = np.concatenate([np.asarray(b[0], np.float64).reshape(-1, 128) for b in batches])
    r = qmodel.first.rotation.get_value()
    h = (2 * x.T @ x / len(x)).astype(np.float32)
    w = jnp.asarray(np.asarray(model.first.kernel.get_value(), np.float64).T @ _dense(r), jnp.float32)
    want = gptq.quantize(w, rotation.hessian(jnp.asarray(h), r), "int4_group", group_size=32)
    got = qmodel.first.weight.get_value()
    agree = np.mean(np.asarray(quant.dequantize(got)) == np.asarray(quant.dequantize(want)))
    assert agree >= 0.99, agree  # the Hessians agree to float32 rounding (device sums against NumPy float64)
    plain, _ = nn.quantize_model(model, "int4_group", method="gptq", calibration=batches, sequential=False,
                                 group_size=32)  # fmt: skip
    held_out = jax.random.normal(jax.random.key(99), (64, 128))
    err = lambda m: float(jnp.linalg.norm(m(held_out) - model(held_out)))  # noqa: E731
    assert err(qmodel) < err(plain), (err(qmodel), err(plain))
    assert report.method == "gptq"


def test_sequential_gptq_runs_the_later_layers_on_the_rotated_ones():
    model = _MLP()
    qmodel, _ = nn.quantize_model(model, "q4_0", method="gptq", calibration=_batches(2), rotate=64)
    x = jax.random.normal(jax.random.key(5), (8, 128))
    dense = jax.nn.relu(x @ qmodel.first.dense_weight().T + qmodel.first.bias.get_value()[None])
    y = dense @ qmodel.second.dense_weight().T + qmodel.second.bias.get_value()[None]
    np.testing.assert_allclose(np.asarray(qmodel(x)), np.asarray(y), rtol=1e-4, atol=1e-4)


def test_a_plan_with_rotated_candidates_is_applied_rotated():
    model = _MLP()
    batches = _batches(1)
    p = nn.plan(model, batches, bits=6.0, formats=[("q4_0", {"rotate": 128}), ("q8_0", {"rotate": 128})])
    assert all(dict(c.options)["rotate"] == 128 for c in p.layers)
    for c in p.measured:  # a candidate's bytes count its signs
        record = quant.quantize(jnp.zeros((64 if c.name == "first" else 32, 128 if c.name == "first" else 64)),
                                c.fmt)  # fmt: skip
        assert c.nbytes == record.nbytes + (16 if c.name == "first" else 8)
    qmodel, report = nn.quantize_model(model, p, method="gptq", calibration=batches)
    assert qmodel.first.rotation is not None and qmodel.second.rotation is not None
    assert report.formats == {c.name: c.fmt for c in p.layers}


def test_lora_on_a_rotated_base_starts_equal_and_merges_to_the_adapted_model():
    model = _MLP()
    qmodel, _ = nn.quantize_model(model, "nf4", rotate=128)
    adapted = nn.lora(qmodel, rank=4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(6), (8, 128))
    np.testing.assert_array_equal(np.asarray(adapted(x)), np.asarray(qmodel(x)))
    b = adapted.first.lora_b
    b.set_value(jax.random.normal(jax.random.key(8), b.get_value().shape) * 0.1)
    merged = nn.merge_lora(adapted)
    np.testing.assert_allclose(np.asarray(merged(x)), np.asarray(adapted(x)), rtol=1e-4, atol=1e-4)


def test_a_rotated_model_saves_and_loads(tmp_path):
    model = _MLP()
    qmodel, _ = nn.quantize_model(model, "q4_0", rotate=128)
    quant.save(tmp_path / "m.vtq", nnx.to_pure_dict(nnx.state(qmodel)))
    other, _ = nn.quantize_model(_MLP(seed=3), "q4_0", rotate=128, rotation_key=jax.random.key(5))
    state = nnx.state(other)
    nnx.replace_by_pure_dict(state, quant.load(tmp_path / "m.vtq"))
    nnx.update(other, state)
    x = jax.random.normal(jax.random.key(6), (4, 128))
    np.testing.assert_array_equal(np.asarray(other(x)), np.asarray(qmodel(x)))


def test_rotation_errors_at_the_layer_and_the_model():
    layer = _outlier_linear()
    record = quant.quantize(jnp.zeros((32, 128)), "q4_0")
    with pytest.raises(ShapeMismatch, match="rotation"):
        nn.QLinear(record, rotation=rotation.hadamard(jax.random.key(0), 64, block=64))
    with pytest.raises(ConfigError, match="rotation"):
        nn.QLinear(record, rotation=np.ones(128))
    with pytest.raises(ConfigError, match="block"):
        nn.QLinear.from_linear(layer, "q4_0", rotate=100)
    with pytest.raises(ConfigError, match="rotate"):
        nn.quantize_model(_MLP(), "awq_int4", method="awq", calibration=_batches(1), rotate=128)
    with pytest.raises(CheckpointError, match="rotation"):
        from viva_tensor.quant import _checkpoint

        _checkpoint._decode_node({"rotation": {"packed": "p", "block": 3}}, "w", {"p": np.zeros(4, np.uint8)}, "f",
                                 set())  # fmt: skip


def test_minilm_quantize_rotates_every_candidate_and_damps_more(monkeypatch):
    from viva_tensor.models import _quantize, minilm

    seen = []
    monkeypatch.setattr(_quantize.nn, "quantize_model", lambda model, target, **kw: seen.append((target, kw))
                        or (model, None))  # fmt: skip
    monkeypatch.setattr(_quantize.nn, "plan", lambda model, sens, **kw: ("plan", kw["formats"]))
    cfg = minilm.MiniLMConfig(hidden_size=64, num_layers=1, num_heads=4, intermediate_size=128)
    encoder = minilm.SentenceEncoder(minilm.MiniLM(cfg, rngs=nnx.Rngs(0)), minilm.load_tokenizer(max_length=32), 32)
    texts = ["A short text.", "Another one, a little longer than the first."]
    minilm.quantize(encoder, fmt="q4_0", calibration=texts, rotate=128)
    minilm.quantize(encoder, fmt="q4_0", calibration=texts, rotate=64, damp=0.05)
    minilm.quantize(encoder, fmt="q4_0", calibration=texts)
    minilm.quantize(encoder, bits=4.5, calibration=texts, rotate=128)
    (_, a), (_, b), (_, c), ((_, formats), d) = seen
    assert (a["rotate"], a["damp"]) == (128, _quantize.ROTATED_DAMP)
    assert (b["rotate"], b["damp"]) == (64, 0.05)
    assert "rotate" not in c and c["damp"] == _quantize.GPTQ_OPTIONS["damp"]
    assert all(o["rotate"] == 128 for _, o in formats) and len(formats) == len(_quantize.PLAN_CANDIDATES)
    assert d["damp"] == _quantize.ROTATED_DAMP


def test_hadamard_signs_matrix_and_hessian_agree_under_jit():
    key = jax.random.key(4)
    made = jax.jit(rotation.hadamard, static_argnums=1, static_argnames="block")(key, 64, block=32)
    eager = rotation.hadamard(key, 64, block=32)
    assert made.block == 32 and np.array_equal(np.asarray(made.packed), np.asarray(eager.packed))
    np.testing.assert_array_equal(np.asarray(jax.jit(rotation.signs)(eager)), np.asarray(rotation.signs(eager)))
    np.testing.assert_allclose(np.asarray(jax.jit(rotation.matrix)(eager)), _dense(eager), atol=1e-6)
    h = jnp.asarray(np.cov(np.asarray(jax.random.normal(key, (64, 200)))), jnp.float32)
    np.testing.assert_allclose(np.asarray(jax.jit(rotation.hessian)(h, eager)), np.asarray(rotation.hessian(h, eager)),
                               rtol=1e-6, atol=1e-6)  # fmt: skip
