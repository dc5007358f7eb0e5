"""Tests of viva_tensor.tensor against NumPy (float64 references computed from the same input values).

Every function runs eagerly and under jit (``maybe_jit``), in float32 and bfloat16 (``dtype``); results
must have the input dtype. Error paths are checked with their messages; hypothesis checks round trips
and the broadcasting rules against NumPy's.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tolerance
from hypothesis import given, settings
from hypothesis import strategies as st

import viva_tensor as vt
from viva_tensor import errors
from viva_tensor import tensor as T

SHAPES = [(5,), (2, 3, 4)]  # rank 2 is covered by the matrix tests


def data(rng, shape, dtype, lo=-2.0, hi=2.0):
    """A random array in ``dtype`` and the float64 NumPy copy of exactly the same values."""
    x = jnp.asarray(rng.uniform(lo, hi, size=shape).astype(np.float32)).astype(dtype)
    return x, np.asarray(x.astype(jnp.float32), dtype=np.float64)


def check(got, want, dtype):
    assert got.dtype == jnp.dtype(dtype), (got.dtype, dtype)
    rtol, atol = tolerance(dtype)
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32), np.float64), want, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------ top level


def test_every_tensor_function_is_exported_at_the_top_level():
    for name in T.__all__:
        assert getattr(vt, name) is getattr(T, name), name
        # the Gleam names that shadow builtins are attributes, not star-exported
        assert (name in vt.__all__) != (name in {"sum", "max", "min", "map", "slice"}), name
    assert vt.tensor is T


def test_strided_view_functions_are_not_faked():
    for name in ("to_strided", "to_contiguous", "transpose_strided", "is_contiguous", "get_fast", "get2d_fast"):
        assert not hasattr(T, name)
        assert name in T.__doc__


# ------------------------------------------------------------------------------------------ constructors


@pytest.mark.parametrize("shape", [(), (3,), (2, 3), (0, 4)])
def test_zeros_ones_fill(shape, dtype, maybe_jit):
    for fn, want in ((lambda: T.zeros(shape, dtype=dtype), 0.0), (lambda: T.ones(shape, dtype=dtype), 1.0),
                     (lambda: T.fill(shape, 2.5, dtype=dtype), 2.5)):
        out = maybe_jit(fn)()
        assert out.shape == shape
        check(out, np.full(shape, want), dtype)


def test_int_shape_and_traced_fill_value():
    assert T.zeros(4).shape == (4,)
    out = jax.jit(lambda v: T.fill((2,), v))(jnp.float32(3.0))
    assert out.tolist() == [3.0, 3.0]


def test_from_list_vector_matrix_from_list2d(dtype):
    check(T.from_list([1, 2.5, -3], dtype=dtype), np.array([1, 2.5, -3]), dtype)
    check(T.vector([0.5, 4.0], dtype=dtype), np.array([0.5, 4.0]), dtype)
    check(T.matrix(2, 3, list(range(6)), dtype=dtype), np.arange(6.0).reshape(2, 3), dtype)
    check(T.from_list2d([[1, 2], [3, 4], [5, 6]], dtype=dtype), np.arange(1.0, 7).reshape(3, 2), dtype)
    assert T.from_list2d([]).shape == (0, 0)
    assert T.from_list([]).shape == (0,)
    assert T.from_list(np.arange(3)).dtype == jnp.float32


def test_random_uniform_and_normal(dtype):
    k0, k1 = jax.random.key(0), jax.random.key(1)
    u = T.random_uniform(k0, (4000,), dtype=dtype)
    assert u.dtype == dtype and u.shape == (4000,)
    assert bool((u >= 0).all()) and bool((u < 1).all())
    assert np.array_equal(np.asarray(u), np.asarray(T.random_uniform(k0, (4000,), dtype=dtype)))
    assert not np.array_equal(np.asarray(u), np.asarray(T.random_uniform(k1, (4000,), dtype=dtype)))
    uf = np.asarray(u.astype(jnp.float32), np.float64)
    assert abs(uf.mean() - 0.5) < 0.03 and abs(uf.var() - 1 / 12) < 0.01
    n = np.asarray(T.random_normal(k0, (4000,), 3.0, 0.5, dtype=dtype).astype(jnp.float32), np.float64)
    assert abs(n.mean() - 3.0) < 0.05 and abs(n.std() - 0.5) < 0.05


def test_xavier_and_he_init(dtype):
    w = T.xavier_init(jax.random.key(2), 30, 20, dtype=dtype)
    assert w.shape == (20, 30) and w.dtype == dtype
    wf = np.asarray(w.astype(jnp.float32), np.float64)
    limit = np.sqrt(6.0 / 50)
    assert np.abs(wf).max() <= limit * (1 + 1e-2)
    assert abs(wf.var() - limit**2 / 3) < 0.15 * limit**2 / 3  # variance of U(-l, l) is l^2/3
    h = np.asarray(T.he_init(jax.random.key(3), 50, 80, dtype=dtype).astype(jnp.float32), np.float64)
    assert h.shape == (80, 50)
    assert abs(h.std() - np.sqrt(2 / 50)) < 0.1 * np.sqrt(2 / 50) and abs(h.mean()) < 0.02


def test_random_constructors_jit():
    # the same key gives the same values under jit (up to one rounding: XLA fuses the scaling)
    for make in (lambda k: T.he_init(k, 4, 3), lambda k: T.xavier_init(k, 4, 3),
                 lambda k: T.random_normal(k, (5,), 1.0, 2.0), lambda k: T.random_uniform(k, (5,))):
        got, want = jax.jit(make)(jax.random.key(5)), make(jax.random.key(5))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ access


@pytest.mark.parametrize("shape", [(), (4,), (2, 3), (2, 0, 5)])
def test_shape_size_rank_dim_rows_cols(shape):
    x = np.zeros(shape)
    t = jnp.asarray(x)
    assert T.shape(t) == x.shape and T.size(t) == x.size and T.rank(t) == x.ndim
    for ax in range(-x.ndim, x.ndim):
        assert T.dim(t, ax) == x.shape[ax]
    assert T.rows(t) == (x.shape[0] if x.ndim else 0)
    assert T.cols(t) == (x.shape[1] if x.ndim >= 2 else x.shape[0] if x.ndim == 1 else 0)


def test_get_get2d_row_col(rng, dtype, maybe_jit):
    x, ref = data(rng, (3, 4), dtype)
    for i in (0, 5, 11, -1):
        check(maybe_jit(lambda t: T.get(t, i))(x), ref.ravel()[i], dtype)
    check(maybe_jit(lambda t: T.get2d(t, 2, -1))(x), ref[2, -1], dtype)
    check(maybe_jit(lambda t: T.get_row(t, 1))(x), ref[1], dtype)
    check(maybe_jit(lambda t: T.get_col(t, 3))(x), ref[:, 3], dtype)


def test_traced_indices(rng):
    x, ref = data(rng, (3, 4), jnp.float32)
    assert float(jax.jit(T.get)(x, 7)) == np.float32(ref.ravel()[7])
    assert float(jax.jit(T.get2d)(x, 1, 2)) == np.float32(ref[1, 2])
    check(jax.jit(T.get_row)(x, jnp.int32(2)), ref[2], jnp.float32)
    check(jax.jit(T.get_col)(x, jnp.int32(0)), ref[:, 0], jnp.float32)


def test_to_list_to_list2d_clone(rng, dtype):
    x, ref = data(rng, (2, 3), dtype)
    assert T.to_list(x) == ref.ravel().tolist()
    assert T.to_list2d(x) == ref.tolist()
    assert all(type(v) is float for v in T.to_list(x))
    c = T.clone(x)
    assert c.dtype == dtype and np.array_equal(np.asarray(c), np.asarray(x))
    check(jax.jit(T.clone)(x), ref, dtype)


# ------------------------------------------------------------------------------------------ element-wise

BINARY = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}


@pytest.mark.parametrize("name", sorted(BINARY))
@pytest.mark.parametrize("shape", SHAPES)
def test_binary(name, shape, rng, dtype, maybe_jit):
    a, ra = data(rng, shape, dtype)
    b, rb = data(rng, shape, dtype, 0.5, 2.0)
    check(maybe_jit(getattr(T, name))(a, b), BINARY[name](ra, rb), dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_scale_add_scalar_negate(shape, rng, dtype, maybe_jit):
    x, ref = data(rng, shape, dtype)
    check(maybe_jit(lambda t: T.scale(t, 1.5))(x), ref * 1.5, dtype)
    check(maybe_jit(lambda t: T.add_scalar(t, -0.25))(x), ref - 0.25, dtype)
    check(maybe_jit(T.negate)(x), -ref, dtype)
    # a float32 0-d scalar does not promote a bfloat16 tensor
    check(maybe_jit(T.scale)(x, jnp.float32(2.0)), ref * 2, dtype)
    check(maybe_jit(T.add_scalar)(x, jnp.float32(1.0)), ref + 1, dtype)


@pytest.mark.parametrize("shape", [(0,), *SHAPES])
def test_map_and_map_indexed(shape, rng, dtype, maybe_jit):
    x, ref = data(rng, shape, dtype)
    check(maybe_jit(lambda t: T.map(t, jnp.exp))(x), np.exp(ref), dtype)
    check(maybe_jit(lambda t: T.map(t, lambda v: v * v + 1.0))(x), ref * ref + 1.0, dtype)
    idx = np.arange(ref.size, dtype=np.float64).reshape(shape)
    # the index is int32: cast both sides to float32 (what standard promotion did) for strict promotion
    out = maybe_jit(lambda t: T.map_indexed(t, lambda v, i: v.astype(jnp.float32) + 0.5 * i.astype(jnp.float32)))(x)
    check(out.astype(dtype), ref + 0.5 * idx, dtype)


def test_map_is_truly_elementwise():
    # a function that would reduce over its whole input sees one element at a time
    out = T.map(T.vector([1.0, 2.0, 3.0]), lambda v: v - jnp.mean(v))
    assert out.tolist() == [0.0, 0.0, 0.0]
    assert T.map(T.vector([1.0, 2.0]), lambda v: 7.0).tolist() == [7.0, 7.0]


# ------------------------------------------------------------------------------------------ reductions

REDUCTIONS = {
    "sum": np.sum,
    "product": np.prod,
    "mean": np.mean,
    "max": np.max,
    "min": np.min,
    "variance": np.var,
    "std": np.std,
    "norm": lambda x: np.sqrt(np.sum(x * x)),
}


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
@pytest.mark.parametrize("shape", SHAPES)
def test_reductions(name, shape, rng, dtype, maybe_jit):
    lo, hi = (0.7, 1.3) if name == "product" else (-2.0, 2.0)
    x, ref = data(rng, shape, dtype, lo, hi)
    out = maybe_jit(getattr(T, name))(x)
    assert out.shape == ()
    check(out, REDUCTIONS[name](ref), dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_argmax_argmin(shape, rng, dtype, maybe_jit):
    x, ref = data(rng, shape, dtype)
    for fn, np_fn in ((T.argmax, np.argmax), (T.argmin, np.argmin)):
        out = maybe_jit(fn)(x)
        assert out.dtype == jnp.int32 and out.shape == ()
        assert int(out) == int(np_fn(ref))


def test_reductions_under_vmap(rng, dtype):
    x, ref = data(rng, (3, 6), dtype)
    for name in ("sum", "mean", "max", "variance", "std", "norm"):
        check(jax.vmap(getattr(T, name))(x), np.array([REDUCTIONS[name](r) for r in ref]), dtype)
    assert jax.vmap(T.argmax)(x).tolist() == ref.argmax(1).tolist()
    check(jax.vmap(lambda r: T.map(r, jnp.sin))(x), np.sin(ref), dtype)


def test_argmax_takes_the_first_on_ties():
    assert int(T.argmax(T.vector([1.0, 3.0, 3.0]))) == 1
    assert int(T.argmin(T.vector([2.0, 0.0, 0.0]))) == 1


@pytest.mark.parametrize("shape", SHAPES)
def test_sum_axis_mean_axis(shape, rng, dtype, maybe_jit):
    x, ref = data(rng, shape, dtype)
    for ax, keepdims in [(a, False) for a in range(-len(shape), len(shape))] + [(-1, True)]:
        out = maybe_jit(lambda t: T.sum_axis(t, ax, keepdims=keepdims))(x)
        check(out, ref.sum(axis=ax, keepdims=keepdims), dtype)
        out = maybe_jit(lambda t: T.mean_axis(t, ax, keepdims=keepdims))(x)
        check(out, ref.mean(axis=ax, keepdims=keepdims), dtype)


def test_sum_axis_of_a_vector_is_a_scalar():
    assert T.sum_axis(T.vector([1.0, 2.0]), 0).shape == ()


@pytest.mark.parametrize("narrow", [jnp.bfloat16, jnp.float16])
def test_narrow_floats_accumulate_in_float32(narrow):
    x = jnp.ones((4096,), narrow)
    assert T.sum(x).dtype == narrow and float(T.sum(x)) == 4096.0
    assert float(jax.jit(T.sum)(x)) == 4096.0
    assert float(T.sum_axis(x.reshape(2, 2048), 1)[0]) == 2048.0
    # the mean of 1 + tiny values: a bf16/f16 running sum would lose them
    y = jnp.concatenate([jnp.full((1,), 256.0, narrow), jnp.full((2047,), 0.25, narrow)])
    want = (256.0 + 2047 * 0.25) / 2048
    assert abs(float(T.mean(y)) - want) <= 0.01 * want
    assert abs(float(T.dot(y, jnp.ones_like(y))) - 256.0 - 2047 * 0.25) <= 0.01 * (256 + 2047 * 0.25)
    z = jnp.full((1000,), 300.0, narrow)
    assert float(T.norm(z)) == pytest.approx(300 * np.sqrt(1000), rel=1e-2)  # sum of squares 9e7 > f16 max
    assert float(T.variance(z)) == 0.0


def test_integer_inputs():
    i = jnp.arange(6, dtype=jnp.int32)
    assert T.sum(i).dtype == jnp.int32 and int(T.sum(i)) == 15
    assert T.mean(i).dtype == jnp.float32 and float(T.mean(i)) == 2.5
    assert T.variance(i).dtype == jnp.float32
    assert float(T.norm(jnp.array([3, 4]))) == 5.0


def test_non_finite_values_propagate():
    x = T.vector([1.0, float("nan"), 3.0])
    for fn in (T.sum, T.mean, T.max, T.min, T.variance, T.norm):
        assert np.isnan(float(fn(x))), fn.__name__
    assert int(T.argmax(x)) == 1
    assert float(T.max(T.vector([1.0, float("inf")]))) == float("inf")


def test_empty_arrays():
    e = T.zeros((0,))
    assert float(T.sum(e)) == 0.0 and float(T.product(e)) == 1.0 and float(T.norm(e)) == 0.0
    assert T.normalize(e).shape == (0,)
    assert T.sum_axis(T.zeros((3, 0)), 1).tolist() == [0.0, 0.0, 0.0]
    assert T.matmul(T.zeros((2, 0)), T.zeros((0, 3))).tolist() == [[0.0] * 3] * 2
    assert T.flatten(T.zeros((2, 0))).shape == (0,)
    for fn in (T.mean, T.max, T.min, T.argmax, T.argmin, T.variance, T.std):
        with pytest.raises(errors.InvalidShape, match=r"argument 't': expected a non-empty array"):
            fn(e)
    with pytest.raises(errors.InvalidShape, match="axis 1 of size 0"):
        T.mean_axis(T.zeros((3, 0)), 1)


# ------------------------------------------------------------------------------------------ linear algebra


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (8, 16, 5)])
def test_matmul_matmul_vec_dot_outer(m, k, n, rng, dtype, maybe_jit):
    a, ra = data(rng, (m, k), dtype)
    b, rb = data(rng, (k, n), dtype)
    v, rv = data(rng, (k,), dtype)
    w, rw = data(rng, (m,), dtype)
    check(maybe_jit(T.matmul)(a, b), ra @ rb, dtype)
    check(maybe_jit(T.matmul_vec)(a, v), ra @ rv, dtype)
    check(maybe_jit(T.dot)(v, v), rv @ rv, dtype)
    check(maybe_jit(T.outer)(w, v), np.outer(rw, rv), dtype)
    check(maybe_jit(T.transpose)(a), ra.T, dtype)


def test_precision_is_passed_through(rng):
    a, ra = data(rng, (4, 8), jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    check(jax.jit(lambda x: T.matmul(x, x.T, precision=hi))(a), ra @ ra.T, jnp.float32)
    check(T.matmul_vec(a, a[0], precision=hi), ra @ ra[0], jnp.float32)
    check(T.dot(a[0], a[1], precision=hi), ra[0] @ ra[1], jnp.float32)
    hlo = jax.jit(lambda x: T.matmul(x, x.T, precision=hi)).lower(a).as_text()
    assert "HIGHEST" in hlo


def test_linear_algebra_under_vmap(rng):
    a, ra = data(rng, (4, 3, 5), jnp.float32)
    v, rv = data(rng, (4, 5), jnp.float32)
    check(jax.vmap(T.matmul_vec)(a, v), np.einsum("bij,bj->bi", ra, rv), jnp.float32)
    check(jax.vmap(T.dot)(v, v), (rv * rv).sum(1), jnp.float32)
    check(jax.vmap(T.matmul, in_axes=(0, None))(a, a[0].T), ra @ ra[0].T, jnp.float32)
    check(jax.vmap(T.normalize)(v), rv / np.linalg.norm(rv, axis=1, keepdims=True), jnp.float32)


def test_transpose_is_free_under_jit():
    # XLA folds the transpose into the dot (contracting dims), no transpose instruction remains
    a = T.ones((64, 32))
    hlo = jax.jit(lambda x, y: T.matmul(x, T.transpose(y))).lower(a, a).compile().as_text()
    assert re.search(r"=\s*\S+\s+dot\(", hlo)
    assert not re.search(r"=\s*\S+\s+transpose\(", hlo)


# ------------------------------------------------------------------------------------------ shape


@pytest.mark.parametrize("shape,new", [((6,), (2, 3)), ((2, 3, 4), (4, 6)), ((2, 3, 4), (-1, 2)), ((4,), 4)])
def test_reshape_flatten(shape, new, rng, dtype, maybe_jit):
    x, ref = data(rng, shape, dtype)
    check(maybe_jit(lambda t: T.reshape(t, new))(x), ref.reshape(new), dtype)
    check(maybe_jit(T.flatten)(x), ref.ravel(), dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_concat_concat_axis_stack(shape, rng, dtype, maybe_jit):
    (a, ra), (b, rb) = data(rng, shape, dtype), data(rng, shape, dtype)
    check(maybe_jit(lambda p, q: T.concat([p, q]))(a, b), np.concatenate([ra, rb]), dtype)
    for ax in range(-len(shape), len(shape)):
        check(maybe_jit(lambda p, q: T.concat_axis([p, q, p], ax))(a, b), np.concatenate([ra, rb, ra], ax), dtype)
    for ax in (0, 1, -1):
        check(maybe_jit(lambda p, q: T.stack([p, q], ax))(a, b), np.stack([ra, rb], ax), dtype)


def test_concat_of_unequal_first_axes():
    out = T.concat([T.ones((1, 2)), T.zeros((3, 2))])
    assert out.shape == (4, 2) and out.tolist()[0] == [1.0, 1.0]


@pytest.mark.parametrize(
    "shape,start,lengths",
    [((7,), [1], [3]), ((7,), [0], [7]), ((4, 5), [1, 2], [2, 3]), ((2, 3, 4), [1, 0, 2], [1, 3, 2]), ((3,), [3], [0])],
)
def test_slice(shape, start, lengths, rng, dtype, maybe_jit):
    x, ref = data(rng, shape, dtype)
    want = ref[tuple(np.s_[s : s + n] for s, n in zip(start, lengths, strict=False))]
    check(maybe_jit(lambda t: T.slice(t, start, lengths))(x), want, dtype)


def test_slice_with_traced_start_is_clamped():
    x = jnp.arange(10.0)
    f = jax.jit(lambda t, s: T.slice(t, [s], [3]))
    assert f(x, 2).tolist() == [2.0, 3.0, 4.0]
    assert f(x, 9).tolist() == [7.0, 8.0, 9.0]  # clamped, as documented
    g = jax.jit(lambda t, s: T.slice(t, [1, s], [2, 2]))
    assert g(jnp.arange(15.0).reshape(3, 5), jnp.int32(3)).tolist() == [[8.0, 9.0], [13.0, 14.0]]


@pytest.mark.parametrize("shape", SHAPES)
def test_take_first_take_last(shape, rng, dtype, maybe_jit):
    x, ref = data(rng, shape, dtype)
    for n in (0, 1, shape[0], shape[0] + 3):
        check(maybe_jit(lambda t: T.take_first(t, n))(x), ref[:n], dtype)
        check(maybe_jit(lambda t: T.take_last(t, n))(x), ref[max(shape[0] - n, 0):], dtype)


@pytest.mark.parametrize("shape", [(1, 3, 1), (1, 1), (2, 3)])
def test_squeeze_unsqueeze(shape, rng, dtype, maybe_jit):
    x, ref = data(rng, shape, dtype)
    check(maybe_jit(T.squeeze)(x), np.squeeze(ref), dtype)
    for ax in [a for a in range(-len(shape), len(shape)) if shape[a] == 1]:
        check(maybe_jit(lambda t: T.squeeze_axis(t, ax))(x), np.squeeze(ref, ax), dtype)
    for ax in range(-len(shape) - 1, len(shape) + 1):
        check(maybe_jit(lambda t: T.unsqueeze(t, ax))(x), np.expand_dims(ref, ax), dtype)
    check(maybe_jit(lambda t: T.expand_dims(t, 1))(x), np.expand_dims(ref, 1), dtype)


# ------------------------------------------------------------------------------------------ utilities


@pytest.mark.parametrize("shape", SHAPES)
def test_normalize_and_clamp(shape, rng, dtype, maybe_jit):
    x, ref = data(rng, shape, dtype)
    check(maybe_jit(T.normalize)(x), ref / np.sqrt((ref * ref).sum()), dtype)
    check(maybe_jit(lambda t: T.clamp(t, -0.5, 1.0))(x), np.clip(ref, -0.5, 1.0), dtype)
    check(maybe_jit(T.clamp)(x, jnp.float32(-1), jnp.float32(0)), np.clip(ref, -1, 0), dtype)


def test_normalize_keeps_tiny_vectors_as_gleam():
    tiny = T.vector([3e-5, 4e-5])  # norm 5e-5 <= 1e-4
    assert np.array_equal(np.asarray(T.normalize(tiny)), np.asarray(tiny))
    assert T.normalize(tiny, eps=1e-6).tolist() == pytest.approx([0.6, 0.8])
    assert T.normalize(T.zeros(3)).tolist() == [0.0, 0.0, 0.0]


def test_clamp_keeps_nan():
    assert np.isnan(T.to_list(T.clamp(T.vector([float("nan")]), 0.0, 1.0))[0])


# ------------------------------------------------------------------------------------------ broadcasting

PAIRS = [((2, 3), (3,)), ((2, 1, 3), (4, 1)), ((), (2, 2)), ((0, 1), (1, 4))]


@pytest.mark.parametrize("sa,sb", PAIRS)
def test_broadcasting(sa, sb, rng, dtype, maybe_jit):
    a, ra = data(rng, sa, dtype)
    b, rb = data(rng, sb, dtype)
    assert T.can_broadcast(sa, sb) and T.broadcast_shape(sa, sb) == np.broadcast_shapes(sa, sb)
    check(maybe_jit(T.add_broadcast)(a, b), ra + rb, dtype)
    check(maybe_jit(T.mul_broadcast)(a, b), ra * rb, dtype)
    target = np.broadcast_shapes(sa, sb)
    check(maybe_jit(lambda t: T.broadcast_to(t, target))(a), np.broadcast_to(ra, target), dtype)


def test_cannot_broadcast():
    assert not T.can_broadcast((2, 3), (3, 2))
    assert not T.can_broadcast((4,), (3,))


# ------------------------------------------------------------------------------------------ no retracing

TRACED_OPS = {
    "add": lambda x: T.add(x, x),
    "matmul": lambda x: T.matmul(x, T.transpose(x)),
    "sum_axis": lambda x: T.sum_axis(x, 1),
    "variance": T.variance,
    "reshape": lambda x: T.reshape(x, (-1,)),
    "slice": lambda x: T.slice(x, [1, 0], [2, 2]),
    "broadcast": lambda x: T.add_broadcast(x, x[0]),
    "map": lambda x: T.map(x, jnp.tanh),
    "normalize": T.normalize,
    "argmax": T.argmax,
}


@pytest.mark.parametrize("name", sorted(TRACED_OPS))
def test_no_retrace_on_second_call(name, rng):
    op = TRACED_OPS[name]
    chex.clear_trace_counter()  # chex counts by code object: this lambda is shared by the parametrized cases
    f = jax.jit(chex.assert_max_traces(lambda x: op(x), n=1))
    x, _ = data(rng, (3, 4), jnp.float32)
    y, _ = data(rng, (3, 4), jnp.float32)
    f(x)
    f(y)  # same shape and dtype: no second trace (chex raises if there is one)


# ------------------------------------------------------------------------------------------ errors

M23, M32, V3 = T.zeros((2, 3)), T.zeros((3, 2)), T.zeros(3)

ERRORS = [
    (lambda: T.add(M23, M32), errors.ShapeMismatch,
     r"argument 'b': expected shape \(2, 3\) \(the shape of 'a'\), got \(3, 2\)\. Hint: use add_broadcast"),
    (lambda: T.sub(M23, M32), errors.ShapeMismatch, r"argument 'b': expected shape \(2, 3\)"),
    (lambda: T.mul(M23, V3), errors.ShapeMismatch, r"got \(3,\)\. Hint: use mul_broadcast"),
    (lambda: T.div(V3, M23), errors.ShapeMismatch, r"argument 'b': expected shape \(3,\)"),
    (lambda: T.add([1.0], V3), errors.DTypeError, r"argument 'a': expected a jax.Array, got a list"),
    (lambda: T.zeros((2, -1)), errors.InvalidShape, r"argument 'shape': expected non-negative sizes, got \(2, -1\)"),
    (lambda: T.ones("3"), errors.InvalidShape, r"argument 'shape': expected a sequence of non-negative ints"),
    (lambda: T.fill((2,), jnp.ones(2)), errors.DimensionError, r"argument 'value': expected a scalar"),
    (lambda: T.from_list([[1.0], [2.0]]), errors.InvalidShape, r"argument 'data': expected a flat list.*from_list2d"),
    (lambda: T.from_list(["a"]), errors.InvalidShape, r"argument 'data'"),
    (lambda: T.from_list2d([[1.0, 2.0], [3.0]]), errors.InvalidShape,
     r"argument 'rows': expected rows of equal length, got row lengths \[2, 1\]"),
    (lambda: T.from_list2d([1.0, 2.0]), errors.InvalidShape, r"argument 'rows': expected a list of rows"),
    (lambda: T.matrix(2, 2, [1.0, 2.0, 3.0]), errors.InvalidShape,
     r"argument 'data': expected 4 elements \(rows \* cols = 2 \* 2\), got 3 elements"),
    (lambda: T.xavier_init(jax.random.key(0), 0, 3), errors.InvalidShape, r"argument 'fan_in, fan_out'"),
    (lambda: T.he_init(jax.random.key(0), -1, 3), errors.InvalidShape, r"non-negative"),
    (lambda: T.dim(M23, 2), errors.DimensionError, r"argument 'axis': expected an axis in \[-2, 2\) for rank 2, got 2"),
    (lambda: T.dim(M23, 1.0), errors.DimensionError, r"argument 'axis': expected an int axis"),
    (lambda: T.get(M23, 6), errors.DimensionError, r"argument 'index': expected an index in \[-6, 6\), got 6"),
    (lambda: T.get(M23, -7), errors.DimensionError, r"argument 'index'"),
    (lambda: T.get(M23, 1.5), errors.DTypeError, r"argument 'index'"),
    (lambda: T.get2d(V3, 0, 0), errors.DimensionError,
     r"argument 't': expected a rank-2 array \(a matrix\), got shape \(3,\)"),
    (lambda: T.get2d(M23, 0, 3), errors.DimensionError, r"argument 'col': expected an index in \[-3, 3\), got 3"),
    (lambda: T.get_row(M23, 2), errors.DimensionError, r"argument 'row'"),
    (lambda: T.get_col(M23, -4), errors.DimensionError, r"argument 'col'"),
    (lambda: T.get_col(V3, 0), errors.DimensionError, r"rank-2"),
    (lambda: T.to_list2d(V3), errors.DimensionError, r"rank-2"),
    (lambda: jax.jit(T.to_list)(V3), errors.InvalidOp, r"a concrete array, got a traced array"),
    (lambda: T.scale(V3, jnp.ones(3)), errors.DimensionError, r"argument 's': expected a scalar, got shape \(3,\)"),
    (lambda: T.map(V3, lambda v: jnp.stack([v, v])), errors.ShapeMismatch,
     r"argument 'f': expected a function returning one scalar"),
    (lambda: T.map_indexed(V3, lambda v, i: jnp.zeros(2)), errors.ShapeMismatch, r"argument 'f'"),
    (lambda: T.sum_axis(M23, 2), errors.DimensionError, r"argument 'axis': expected an axis in \[-2, 2\)"),
    (lambda: T.sum_axis(jnp.float32(1), 0), errors.DimensionError, r"\[0, 0\) for rank 0"),
    (lambda: T.mean_axis(M23, -3), errors.DimensionError, r"argument 'axis'"),
    (lambda: T.dot(M23, V3), errors.DimensionError,
     r"argument 'a': expected a rank-1 array \(a vector\), got shape \(2, 3\)"),
    (lambda: T.dot(V3, T.zeros(4)), errors.ShapeMismatch,
     r"argument 'b': expected a vector of size 3 .*got shape \(4,\)"),
    (lambda: T.matmul_vec(M23, T.zeros(2)), errors.ShapeMismatch, r"argument 'v': expected a vector of length 3"),
    (lambda: T.matmul_vec(V3, V3), errors.DimensionError, r"argument 'm': expected a rank-2 array"),
    (lambda: T.matmul_vec(M23, M32), errors.DimensionError, r"argument 'v': expected a rank-1 array"),
    (lambda: T.matmul(M23, M23), errors.ShapeMismatch,
     r"argument 'b': expected a first axis of size 3 \(from 'a' of shape \(2, 3\)\), got shape \(2, 3\)"),
    (lambda: T.matmul(T.zeros((2, 2, 2)), M23), errors.DimensionError, r"argument 'a': expected a rank-2 array"),
    (lambda: T.matmul(M23, V3), errors.DimensionError, r"argument 'b': expected a rank-2 array"),
    (lambda: T.transpose(V3), errors.DimensionError, r"argument 't': expected a rank-2 array"),
    (lambda: T.outer(M23, V3), errors.DimensionError, r"argument 'a': expected a rank-1 array"),
    (lambda: T.reshape(M23, (4, 2)), errors.InvalidShape,
     r"argument 'shape': expected 6 elements \(the size of 't' of shape \(2, 3\)\), got \(4, 2\) with 8 elements"),
    (lambda: T.reshape(M23, (4, -1)), errors.InvalidShape, r"expected a shape whose -1 fits 6 elements"),
    (lambda: T.reshape(M23, (-1, -1)), errors.InvalidShape, r"argument 'shape'"),
    (lambda: T.concat([]), errors.InvalidShape, r"argument 'tensors': expected a non-empty list of arrays, got \[\]"),
    (lambda: T.concat(M23), errors.InvalidShape, r"expected a list of arrays, got a ArrayImpl"),
    (lambda: T.concat([M23, V3]), errors.DimensionError, r"argument 'tensors\[1\]': expected rank 2"),
    (lambda: T.concat([jnp.float32(1)]), errors.DimensionError, r"argument 'tensors\[0\]'"),
    (lambda: T.concat([M23, M32]), errors.ShapeMismatch,
     r"argument 'tensors\[1\]': expected shape \(2, 3\) except on axis 0 \(the shape of tensors\[0\]\), got \(3, 2\)"),
    (lambda: T.concat_axis([M23, M23], 2), errors.DimensionError, r"argument 'axis'"),
    (lambda: T.stack([M23, M32]), errors.ShapeMismatch, r"argument 'tensors\[1\]': expected shape \(2, 3\)"),
    (lambda: T.stack([V3, V3], 2), errors.DimensionError, r"argument 'axis': expected an axis in \[-2, 2\)"),
    (lambda: T.stack([]), errors.InvalidShape, r"non-empty"),
    (lambda: T.slice(M23, [0], [1]), errors.DimensionError, r"argument 'start': expected 2 entries"),
    (lambda: T.slice(M23, [0, 0], [1]), errors.DimensionError, r"argument 'lengths': expected 2 entries"),
    (lambda: T.slice(M23, [1, 2], [2, 1]), errors.DimensionError,
     r"argument 'start': expected a start in \[0, 0\] on axis 0 \(size 2, length 2\), got 1"),
    (lambda: T.slice(M23, [0, -1], [1, 1]), errors.DimensionError, r"argument 'start'"),
    (lambda: T.slice(M23, [0, 0], [1, 4]), errors.DimensionError, r"argument 'lengths': expected at most 3 on axis 1"),
    (lambda: T.slice(M23, [0, 0], [1, -1]), errors.InvalidShape, r"argument 'lengths'"),
    (lambda: T.take_first(V3, -1), errors.InvalidShape, r"argument 'n': expected a non-negative int"),
    (lambda: T.take_last(jnp.float32(1), 1), errors.DimensionError, r"argument 't': expected an array of rank >= 1"),
    (lambda: T.squeeze_axis(M23, 0), errors.InvalidShape,
     r"argument 'axis': expected an axis of size 1, got axis 0 of size 2"),
    (lambda: T.squeeze_axis(M23, 5), errors.DimensionError, r"argument 'axis'"),
    (lambda: T.unsqueeze(M23, 3), errors.DimensionError, r"argument 'axis': expected an axis in \[-3, 3\)"),
    (lambda: T.expand_dims(M23, -4), errors.DimensionError, r"argument 'axis'"),
    (lambda: T.clamp(V3, 1.0, 0.0), errors.InvalidOp, r"argument 'hi': expected a bound >= lo = 1.0, got 0.0"),
    (lambda: T.clamp(V3, jnp.zeros(2), 1.0), errors.DimensionError, r"argument 'lo'"),
    (lambda: T.broadcast_shape((2, 3), (3, 2)), errors.BroadcastError,
     r"argument 'b_shape': expected a shape that broadcasts with \(2, 3\), got \(3, 2\)\. Hint: sizes aligned"),
    (lambda: T.can_broadcast((2, 3), "ab"), errors.InvalidShape, r"argument 'b_shape'"),
    (lambda: T.broadcast_to(M23, (3,)), errors.BroadcastError,
     r"argument 'shape': expected a shape that \(2, 3\) broadcasts to, got \(3,\)"),
    (lambda: T.broadcast_to(M23, (2, 2)), errors.BroadcastError, r"argument 'shape'"),
    (lambda: T.add_broadcast(M23, M32), errors.BroadcastError,
     r"argument 'b': expected a shape that broadcasts with \(2, 3\) \(the shape of 'a'\), got \(3, 2\)"),
    (lambda: T.mul_broadcast(V3, T.zeros(2)), errors.BroadcastError, r"argument 'b'"),
]


@pytest.mark.parametrize("call,exc,match", ERRORS, ids=[f"error{i}" for i in range(len(ERRORS))])
def test_error_paths(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_errors_are_raised_at_trace_time():
    traced = []

    def f(a, b):
        traced.append(1)
        return T.matmul(a, b)

    with pytest.raises(errors.ShapeMismatch):
        jax.jit(f)(M23, M23)
    assert traced == [1]  # raised while tracing, before anything was compiled or run


# ------------------------------------------------------------------------------------------ properties

# properties that run jax ops compile once per new shape: fewer examples keep the file fast
JAX_PROPERTY = settings(max_examples=15)
dims = st.integers(min_value=1, max_value=4)
shapes = st.lists(dims, min_size=0, max_size=4).map(tuple)
bshapes = st.lists(st.integers(min_value=0, max_value=3), min_size=0, max_size=4).map(tuple)


@JAX_PROPERTY
@given(shapes, st.randoms(use_true_random=False))
def test_reshape_flatten_round_trip(shape, r):
    x = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    t = jnp.asarray(x)
    flat = T.flatten(t)
    assert np.array_equal(np.asarray(flat), x.ravel())
    assert np.array_equal(np.asarray(T.reshape(flat, shape)), x)
    perm = list(shape)
    r.shuffle(perm)
    assert np.array_equal(np.asarray(T.reshape(T.reshape(t, tuple(perm)), shape)), x)


@given(bshapes, bshapes)
def test_broadcast_rules_agree_with_numpy(sa, sb):
    try:
        want = np.broadcast_shapes(sa, sb)
    except ValueError:
        want = None
    assert T.can_broadcast(sa, sb) == (want is not None)
    if want is None:
        with pytest.raises(errors.BroadcastError):
            T.broadcast_shape(sa, sb)
    else:
        assert T.broadcast_shape(sa, sb) == want


@JAX_PROPERTY
@given(st.integers(1, 4), st.integers(1, 4))
def test_transpose_is_an_involution(m, n):
    x = jnp.arange(m * n, dtype=jnp.float32).reshape(m, n)
    assert T.transpose(x).shape == (n, m)
    assert np.array_equal(np.asarray(T.transpose(T.transpose(x))), np.asarray(x))


@JAX_PROPERTY
@given(st.lists(st.integers(0, 3), min_size=1, max_size=4), st.integers(1, 3))
def test_concat_then_slice_gives_back_the_parts(lengths, width):
    parts = [jnp.full((n, width), float(k)) for k, n in enumerate(lengths)]
    joined = T.concat(parts)
    assert joined.shape == (sum(lengths), width)
    offset = 0
    for p, n in zip(parts, lengths, strict=False):
        assert np.array_equal(np.asarray(T.slice(joined, [offset, 0], [n, width])), np.asarray(p))
        offset += n


@JAX_PROPERTY
@given(st.integers(0, 6), st.integers(0, 8))
def test_take_first_and_last_cover_the_array(size, n):
    x = jnp.arange(size, dtype=jnp.float32)
    k = min(n, size)
    first, last = T.take_first(x, n), T.take_last(x, n)
    assert first.shape == last.shape == (k,)
    if n >= size:
        assert np.array_equal(np.asarray(first), np.asarray(x))
    else:
        assert np.array_equal(np.asarray(T.concat([first, T.take_last(x, size - n)])), np.asarray(x))


@JAX_PROPERTY
@given(shapes, st.integers(-5, 5))
def test_unsqueeze_then_squeeze_axis_round_trip(shape, axis):
    t = jnp.zeros(shape)
    if not -(len(shape) + 1) <= axis <= len(shape):
        with pytest.raises(errors.DimensionError):
            T.unsqueeze(t, axis)
        return
    u = T.unsqueeze(t, axis)
    assert u.shape == np.expand_dims(np.zeros(shape), axis).shape
    assert T.squeeze_axis(u, axis).shape == shape


# ------------------------------------------------------------------- issue 12: integers, float64, bad input

INT_DTYPES = [jnp.int8, jnp.int16, jnp.uint8, jnp.uint16, jnp.bool_]


def _int_data(rng, shape, dtype):
    if dtype == jnp.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)


def _acc_dtype(dtype):
    return np.uint32 if np.issubdtype(dtype, np.unsignedinteger) else np.int32


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_integer_sums_and_products_do_not_wrap_in_the_input_dtype(dtype, rng, maybe_jit):
    """int8 100 + 100 was -56: sums and contractions accumulate in int32/uint32 and return it, as jnp.sum."""
    x = _int_data(rng, (6, 5), dtype)
    v = _int_data(rng, (5,), dtype)
    acc = _acc_dtype(dtype)
    wide, vw = x.astype(np.int64), v.astype(np.int64)
    cases = [
        (lambda a: T.sum(a), wide.sum()),
        (lambda a: T.sum_axis(a, 0), wide.sum(0)),
        (lambda a: T.sum_axis(a, 1, keepdims=True), wide.sum(1, keepdims=True)),
        (lambda a: T.matmul(a, jnp.transpose(a)), wide @ wide.T),
        (lambda a: T.matmul_vec(a, jnp.asarray(v)), wide @ vw),
        (lambda a: T.dot(a[0], a[1]), wide[0] @ wide[1]),
    ]
    for f, want in cases:
        got = maybe_jit(f)(jnp.asarray(x))
        assert got.dtype == acc, (got.dtype, acc)
        np.testing.assert_array_equal(np.asarray(got, np.int64), np.asarray(want).astype(acc).astype(np.int64))
    got = maybe_jit(T.product)(jnp.asarray(x[0, :3]))
    assert got.dtype == acc
    assert int(got) == int(np.prod(x[0, :3].astype(np.int64)).astype(acc))


def test_int8_sum_of_100_and_100_is_200():
    x = jnp.array([100, 100], jnp.int8)
    assert int(T.sum(x)) == 200
    assert int(T.matmul(jnp.full((1, 2), 100, jnp.int8), jnp.full((2, 1), 100, jnp.int8))[0, 0]) == 20000
    assert int(T.dot(x, x)) == 20000
    # mean is float32, computed from the exact sum
    assert float(T.mean(x)) == 100.0
    # element-wise products keep the dtype and wrap, as NumPy's outer and multiply do
    assert T.outer(x, x).dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(T.outer(x, x)), np.outer(np.int8([100, 100]), np.int8([100, 100])))


@pytest.mark.parametrize("make", [
    lambda: np.ones(3, np.float64),
    lambda: np.float64(1.5),
    lambda: np.ones(3, np.complex128),
], ids=["float64-array", "float64-scalar", "complex128"])
def test_float64_input_is_refused_with_the_conversion_to_write(make):
    for call in (lambda x: T.sum(x), lambda x: T.add(x, x), lambda x: T.norm(x), lambda x: T.reshape(x, (-1,))):
        with pytest.raises(errors.DTypeError, match=r"argument '(t|a)'.*float64|complex128") as e:
            call(make())
        assert ".astype(jnp." in str(e.value)


def test_numpy_int64_values_that_would_wrap_are_refused():
    with pytest.raises(errors.DTypeError, match=r"argument 't'.*int64.*wrap"):
        T.sum(np.array([2**40, 1]))
    assert int(T.sum(np.arange(5))) == 10  # int64 values that fit are fine


@pytest.mark.parametrize("call, exc, match", [
    (lambda: T.zeros(2, dtype="foo"), errors.DTypeError, r"argument 'dtype': expected a dtype.*got 'foo'"),
    (lambda: T.ones(3, dtype=jnp.float64), errors.DTypeError, r"argument 'dtype'.*float64.*astype\(jnp.float32\)"),
    (lambda: T.fill(2, 1.0, dtype=object), errors.DTypeError, r"argument 'dtype'"),
    (lambda: T.from_list([1.0], dtype="nope"), errors.DTypeError, r"argument 'dtype'"),
    (lambda: T.ones(2**40), errors.InvalidShape, r"argument 'shape': expected an array that fits in memory.*bytes"),
    (lambda: T.zeros((2**20, 2**20)), errors.InvalidShape, r"fits in memory"),
    (lambda: T.broadcast_to(T.ones(1), (2**40,)), errors.InvalidShape, r"fits in memory"),
    (lambda: T.random_normal(0, (2,)), errors.DTypeError, r"argument 'key': expected a PRNG key, got a int \(0\)"),
    (lambda: T.random_uniform(3, 2), errors.DTypeError, r"argument 'key'.*jax.random.key\(0\)"),
    (lambda: T.xavier_init(jnp.zeros(3), 2, 2), errors.DTypeError, r"argument 'key'"),
    (lambda: T.he_init("k", 2, 2), errors.DTypeError, r"argument 'key'"),
    (lambda: T.random_uniform(jax.random.key(0), (2,), dtype=jnp.int32), errors.DTypeError,
     r"argument 'dtype': expected a floating dtype.*got int32"),
    (lambda: T.random_normal(jax.random.key(0), (2,), dtype=jnp.uint8), errors.DTypeError, r"argument 'dtype'"),
    (lambda: T.random_normal(jax.random.key(0), (2,), "a"), errors.DTypeError, r"argument 'mean'"),
    (lambda: T.map(T.zeros(2), lambda x: "a"), errors.DTypeError,
     r"argument 'f': expected a function returning a number.*got a str"),
    (lambda: T.map(T.zeros(2), lambda x: None), errors.DTypeError, r"argument 'f'.*NoneType"),
    (lambda: T.map_indexed(T.zeros(2), lambda x, i: [x]), errors.DTypeError, r"argument 'f'.*list"),
    (lambda: T.map(T.zeros(2), 3), errors.InvalidOp, r"argument 'f': expected a function"),
    (lambda: T.sum(np.array(["a"])), errors.DTypeError, r"argument 't': expected a numeric array"),
    (lambda: T.sum(2**40), errors.DTypeError, r"argument 't': expected an int that fits in int32"),
])
def test_bad_input_is_a_viva_tensor_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_legacy_and_typed_keys_are_both_accepted():
    a = T.random_uniform(jax.random.key(1), (3,))
    b = T.random_uniform(jax.random.PRNGKey(1), (3,))
    assert a.shape == b.shape == (3,)
