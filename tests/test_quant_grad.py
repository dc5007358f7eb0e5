"""Gradients through quant.dot_general (quant/_grad.py): the activations' VJP decodes the record again, never densely.

References: float64 NumPy of the transposed product (``x_bar = g @ W.T`` with ``W = dequantize(q)``),
``jax.test_util.check_grads`` (finite differences, reverse mode: a custom_vjp has no forward mode), ``jax.grad`` of
``jax.lax.dot_general`` on the dequantized weight, and XLA's compiled memory analysis.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tolerance
from jax.test_util import check_grads

from viva_tensor import quant
from viva_tensor._xla import compiled_memory
from viva_tensor.quant import _grad

FORMATS = quant.format_names()
K_QUANTS = {"q2_k", "q3_k", "q4_k", "q5_k", "q6_k"}


_RECORDS = {}


def _weight(fmt, rng=None, k=64, n=64):
    """A (k, n) weight and its record, made once per format (K-quants need rows of 256: the last dim)."""
    if fmt in K_QUANTS:
        n = 256
    if (fmt, k, n) not in _RECORDS:
        w = jnp.asarray(np.random.default_rng(1).standard_normal((k, n)), jnp.float32)
        _RECORDS[fmt, k, n] = w, quant.quantize(w, fmt)
    return _RECORDS[fmt, k, n]


def _dense(q) -> np.ndarray:
    return np.asarray(quant.dequantize(q), np.float64)


@pytest.mark.parametrize("fmt", FORMATS)
def test_check_grads_every_format_record_on_either_side(fmt, rng):
    _, q = _weight(fmt, rng)
    k, n = q.shape
    x = jnp.asarray(rng.standard_normal((3, k)), jnp.float32)
    check_grads(lambda x: quant.dot(x, q), (x,), order=1, modes=["rev"], eps=0.5, atol=2e-3, rtol=2e-3)
    xt = jnp.asarray(rng.standard_normal((k, 2)), jnp.float32)  # q on the left: (n, 2) = W.T @ xt
    check_grads(lambda a: quant.dot_general(q, a, (((0,), (0,)), ((), ()))), (xt,), order=1, modes=["rev"], eps=0.5,
                atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_grad_equals_the_transposed_product(fmt, rng, dtype):
    """Every format in float32 and bfloat16; jit for every other format, eager for the rest."""
    maybe_jit = jax.jit if FORMATS.index(fmt) % 2 else (lambda f: f)
    _, q = _weight(fmt)
    k, n = q.shape
    x = jnp.asarray(rng.standard_normal((2, 3, k)), dtype)
    c = rng.standard_normal((2, 3, n)).astype(np.float32)
    grad = maybe_jit(jax.grad(lambda x: jnp.sum(quant.dot(x, q).astype(jnp.float32) * c)))(x)
    assert grad.dtype == dtype and grad.shape == x.shape
    want = c.astype(np.float64) @ _dense(q).T
    rtol, atol = tolerance(dtype)
    np.testing.assert_allclose(np.asarray(grad, np.float64), want, rtol=rtol, atol=atol * np.abs(want).max())


@pytest.mark.parametrize("fmt", ["nf4", "q4_k"])
@pytest.mark.parametrize(
    "dims, x_shape",
    [
        ((((1,), (1,)), ((), ())), (3, 64)),  # x @ W.T: the record's rows are the outputs
        ((((0, 2), (1, 0)), ((), ())), (64, 2, 8)),  # two contracted dims, out of order
        ((((1,), (0,)), ((), ())), (5, 8)),  # contracts the record's first dim
    ],
    ids=["rows_out", "two_dims", "k_first"],
)
def test_any_dimension_numbers(fmt, dims, x_shape, rng, maybe_jit):
    w = jnp.asarray(rng.standard_normal((8, 64) if fmt not in K_QUANTS else (8, 256)), jnp.float32)
    if fmt in K_QUANTS:
        x_shape = tuple(256 if s == 64 else s for s in x_shape)
    q = quant.quantize(w, fmt)
    dense = quant.dequantize(q)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    out_shape = jax.eval_shape(lambda x: jax.lax.dot_general(x, dense, dims), x).shape
    c = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)
    got = maybe_jit(jax.grad(lambda x: jnp.sum(quant.dot_general(x, q, dims) * c)))(x)
    want = jax.grad(lambda x: jnp.sum(jax.lax.dot_general(x, dense, dims) * c))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    # the record on the left: swap the dimension numbers
    (lc, rc), (lb, rb) = dims
    swapped = ((rc, lc), (rb, lb))
    got = maybe_jit(jax.grad(lambda x: jnp.sum(quant.dot_general(q, x, swapped))))(x)
    want = jax.grad(lambda x: jnp.sum(jax.lax.dot_general(dense, x, swapped)))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["nf4", "int8", "q4_0"])
def test_batch_dims_on_a_3d_record(fmt, rng, maybe_jit):
    w = jnp.asarray(rng.standard_normal((4, 32, 64)), jnp.float32)
    q = quant.quantize(w, fmt)
    dense = quant.dequantize(q)
    x = jnp.asarray(rng.standard_normal((4, 3, 64)), jnp.float32)
    dims = (((2,), (2,)), ((0,), (0,)))  # (4, 3, 32)
    got = maybe_jit(jax.grad(lambda x: jnp.sum(quant.dot_general(x, q, dims) ** 2)))(x)
    want = jax.grad(lambda x: jnp.sum(jax.lax.dot_general(x, dense, dims) ** 2))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-3)
    check_grads(lambda x: quant.dot_general(x, q, dims), (x,), order=1, modes=["rev"], eps=0.5, atol=2e-3, rtol=2e-3)


def test_vmap_of_grad_over_activations_and_over_records(rng):
    w = jnp.asarray(rng.standard_normal((3, 128, 64)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((3, 2, 128)), jnp.float32)
    q = quant.quantize(w[0], "nf4")

    def grad_x(x, q):
        return jax.grad(lambda x: jnp.sum(quant.dot(x, q) ** 2))(x)

    got = jax.vmap(grad_x, in_axes=(0, None))(x, q)
    want = jax.vmap(jax.grad(lambda x: jnp.sum((x @ quant.dequantize(q)) ** 2)))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-3)
    qs = jax.vmap(lambda w: quant.quantize(w, "nf4"))(w)  # records made under vmap: batched leaves
    got = jax.jit(jax.vmap(grad_x))(x, qs)
    dense = quant.dequantize(qs)
    want = jax.vmap(lambda x, d: jax.grad(lambda x: jnp.sum((x @ d) ** 2))(x))(x, dense)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-3)


def test_records_are_frozen_their_cotangent_is_zero(rng):
    _, q = _weight("nf4", rng)
    x = jnp.asarray(rng.standard_normal((2, q.shape[0])), jnp.float32)
    out, vjp = jax.vjp(lambda x, q: quant.dot(x, q), x, q)
    x_bar, q_bar = vjp(jnp.ones_like(out))
    assert x_bar.shape == x.shape
    for leaf, bar in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(q_bar), strict=True):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert bar.shape == leaf.shape and not np.any(np.asarray(bar))
        else:
            assert bar.dtype == jax.dtypes.float0


def test_forward_mode_is_not_offered():
    q = quant.quantize(jnp.ones((32, 32)), "q8_0")
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: quant.dot(x, q), (jnp.ones((1, 32)),), (jnp.ones((1, 32)),))


def test_value_under_grad_equals_the_plain_call(rng):
    """The chunked forward used under differentiation gives the plain call's value (float32 rounding apart)."""
    w = jnp.asarray(rng.standard_normal((512, 256)), jnp.float32)
    q = quant.quantize(w, "nf4")
    x = jnp.asarray(rng.standard_normal((4, 512)), jnp.float32)
    value, _ = jax.value_and_grad(lambda x: jnp.sum(quant.dot(x, q) ** 2))(x)
    np.testing.assert_allclose(float(value), float(jnp.sum(quant.dot(x, q) ** 2)), rtol=1e-5)


def test_chunk_plan_slices_blocks_where_the_record_does(rng):
    w = jnp.asarray(rng.standard_normal((512, 512)), jnp.float32)
    for fmt, (k, n) in [("nf4_dq", (512, 512)), ("nf4", (256, 64)), ("int8", (256, 64)), ("nvfp4", (256, 64))]:
        q = quant.quantize(w[:k, :n], fmt)
        rows, sliced = _grad.chunk_plan(q)
        assert k % rows == 0 and rows * n <= k * n // 16
        for axis in (0, 1):
            a = jnp.asarray(rng.standard_normal((3, q.shape[axis])), jnp.float32)
            got = _grad.chunked_dot(a, q, 1, axis)
            want = jax.lax.dot_general(a, quant.dequantize(q), (((1,), (axis,)), ((), ())))
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
    assert _grad.chunk_plan(quant.quantize(jnp.ones((1, 64)), "q8_0")) is None  # one row: no chunks
    assert _grad.chunk_plan(quant.quantize(jnp.ones((2053, 32)), "q8_0")) is None  # a prime: 2053 chunks is too many


@pytest.mark.parametrize("shape", [(512, 512), (1024, 1024), (2048, 2048), (4096, 1024)])
@pytest.mark.parametrize("batch", [1, 16])
def test_gradient_keeps_no_dense_weight(shape, batch):
    """Temporaries of the compiled gradient below the weight's float32 bytes / 4, below and above _dot's threshold."""
    w = jax.ShapeDtypeStruct(shape, jnp.float32)
    q = jax.eval_shape(lambda w: quant.quantize(w, "nf4"), w)
    x = jax.ShapeDtypeStruct((batch, shape[0]), jnp.float32)
    grad = jax.jit(jax.grad(lambda x, q: jnp.sum(quant.dot(x, q) ** 2)))
    mem = compiled_memory(grad, x, q)
    assert mem.temp_bytes < shape[0] * shape[1] * 4 // 4, mem
    dense = compiled_memory(jax.jit(jax.grad(lambda x, w: jnp.sum((x @ w) ** 2))), x, w)
    assert mem.total_bytes < dense.total_bytes


def _adam_step_memory(loss, params, *frozen):
    """Compiled memory of one adam step on ``params`` (donated, as a training loop does), ``frozen`` arguments."""
    tx = optax.adam(1e-3)
    state = jax.eval_shape(tx.init, params)

    def step(params, state, *frozen):
        grads = jax.grad(loss)(params, *frozen)
        with jax.numpy_dtype_promotion("standard"):  # optax's adam mixes its int32 count with floats
            updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return compiled_memory(jax.jit(step, donate_argnums=(0, 1)), params, state, *frozen)


@pytest.mark.parametrize("through_base", [False, True], ids=["adapters_only", "input_cotangent"])
def test_qlora_nf4_step_memory_against_full_float32_fine_tuning(through_base):
    """One 4096x4096 layer, batch 16: a QLoRA step (frozen NF4 base, rank-16 adapters x @ A @ B) against full float32
    fine-tuning of the same layer, both one compiled adam step: whole step <= 1/4, temporaries < W's float32 / 4.

    ``input_cotangent``: the layer's input is scaled by a trained vector first, so the step needs the input's
    cotangent through the frozen base, as every layer but the first of a network does (before this VJP: 83 MiB of
    temporaries, a dense decoded weight).
    """
    n, batch, rank = 4096, 16, 16
    f32 = jnp.float32
    x = jax.ShapeDtypeStruct((batch, n), f32)
    y = jax.ShapeDtypeStruct((batch, n), f32)
    w = jax.ShapeDtypeStruct((n, n), f32)
    s = jax.ShapeDtypeStruct((n,), f32)
    q = jax.eval_shape(lambda w: quant.quantize(w, "nf4"), w)

    def inputs(p, x):
        return x * p[-1][None, :] if through_base else x

    def full_loss(p, x, y):
        return jnp.mean((inputs(p, x) @ p[0] - y) ** 2)

    def qlora_loss(p, q, x, y):
        h = inputs(p, x)
        return jnp.mean((quant.dot(h, q) + (h @ p[0]) @ p[1] * f32(2.0) - y) ** 2)

    extra = (s,) if through_base else ()
    full = _adam_step_memory(full_loss, (w, *extra), x, y)
    adapters = (jax.ShapeDtypeStruct((n, rank), f32), jax.ShapeDtypeStruct((rank, n), f32), *extra)
    qlora = _adam_step_memory(qlora_loss, adapters, q, x, y)
    weight_f32 = n * n * 4
    print(f"\nfull float32 step: {full.total_bytes / 2**20:.1f} MiB (temporaries {full.temp_bytes / 2**20:.1f} MiB); "
          f"QLoRA-NF4 r{rank}: {qlora.total_bytes / 2**20:.1f} MiB (temporaries {qlora.temp_bytes / 2**20:.1f} MiB, "
          f"arguments {qlora.argument_bytes / 2**20:.1f} MiB); ratio {qlora.total_bytes / full.total_bytes:.3f}")
    assert qlora.total_bytes <= full.total_bytes / 4, (qlora, full)
    assert qlora.temp_bytes < weight_f32 / 4, qlora
