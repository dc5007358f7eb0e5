"""Tests of viva_tensor.named against NumPy / einsum references written from the definitions."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

from tests.conftest import tolerance
from viva_tensor import named
from viva_tensor.errors import (
    AxisError,
    AxisMismatch,
    AxisNotFound,
    DimensionError,
    DTypeError,
    DuplicateAxis,
    InvalidOp,
    InvalidShape,
    SizeMismatch,
)


def _arr(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def _np(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def close(got, want, dtype):
    rtol, atol = tolerance(dtype)
    np.testing.assert_allclose(_np(got), want, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------ construction


def test_new_and_access(dtype):
    t = named.new(jnp.zeros((2, 3, 4), dtype), ("batch", "seq", "embed"))
    assert named.axis_names(t) == ("batch", "seq", "embed")
    assert named.shape(t) == (2, 3, 4) and named.rank(t) == 3 and named.size(t) == 24
    assert named.find_axis(t, "embed") == 2
    assert named.axis_size(t, "seq") == 3
    assert named.has_axis(t, "seq") and not named.has_axis(t, "head") and not named.has_axis(t, None)
    assert named.sizes(t) == {"batch": 2, "seq": 3, "embed": 4}
    assert named.describe(t) == f"NamedTensor[batch=2, seq=3, embed=4] {jnp.dtype(dtype).name}"
    assert named.to_tensor(t).dtype == dtype
    assert named.is_named(t) and not named.is_named(t.data)


def test_from_tensor_and_describe_anonymous():
    t = named.from_tensor(np.zeros((2, 5), np.float32))
    assert named.axis_names(t) == (None, None)
    assert named.describe(t) == "NamedTensor[_=2, _=5] float32"


def test_constructors(dtype):
    z = named.zeros({"a": 2, "b": 3}, dtype=dtype)
    o = named.ones([("a", 2), (None, 3)], dtype=dtype)
    assert z.names == ("a", "b") and o.names == ("a", None)
    assert z.dtype == dtype and o.dtype == dtype
    np.testing.assert_array_equal(_np(z.data), np.zeros((2, 3)))
    np.testing.assert_array_equal(_np(o.data), np.ones((2, 3)))
    key = jax.random.key(1)
    r = named.random(key, {"a": 1000}, dtype=dtype, minval=-2.0, maxval=2.0)
    assert r.dtype == dtype and float(r.data.min()) >= -2 and float(r.data.max()) < 2
    assert abs(float(r.data.astype(jnp.float32).mean())) < 0.2
    n = named.randn(key, {"a": 4000}, dtype=dtype, mean=3.0, std=2.0)
    x = _np(n.data)
    assert abs(x.mean() - 3.0) < 0.15 and abs(x.std() - 2.0) < 0.15
    # explicit keys: same key, same values; other key, other values
    np.testing.assert_array_equal(_np(named.randn(key, {"a": 8}).data), _np(named.randn(key, {"a": 8}).data))
    assert not np.array_equal(_np(named.randn(jax.random.key(2), {"a": 8}).data), _np(named.randn(key, {"a": 8}).data))


def test_constructor_errors():
    with pytest.raises(AxisMismatch, match=r"expected 2 names for data of shape \(2, 3\), got 1 names"):
        named.new(jnp.zeros((2, 3)), ("a",))
    with pytest.raises(DuplicateAxis, match="'a' twice"):
        named.new(jnp.zeros((2, 3)), ("a", "a"))
    with pytest.raises(AxisError, match="non-empty string or None"):
        named.new(jnp.zeros((2,)), (3,))
    with pytest.raises(AxisError, match="sequence of axis names"):
        named.new(jnp.zeros((2,)), "a")
    with pytest.raises(InvalidShape, match="non-negative integer sizes"):
        named.zeros({"a": -1})
    with pytest.raises(AxisError, match=r"\(name, size\) pairs"):
        named.zeros([3, 4])
    with pytest.raises(InvalidOp, match="expected a NamedTensor"):
        named.rank(jnp.zeros(3))


def test_find_axis_errors():
    t = named.zeros({"batch": 2, "seq": 3})
    for f in (lambda: named.find_axis(t, "head"), lambda: named.axis_size(t, "head"),
              lambda: named.sum_along(t, "head"), lambda: named.squeeze(t, "head"),
              lambda: named.take(t, "head", 0), lambda: named.softmax_along(t, "head")):
        with pytest.raises(AxisNotFound, match=r"expected one of the axes \('batch', 'seq'\), got 'head'"):
            f()


# ----------------------------------------------------------------------------- shape changes


def test_rename_unsqueeze_squeeze(maybe_jit):
    t = named.new(jnp.arange(6.0).reshape(2, 3), ("batch", "seq"))
    r = maybe_jit(lambda t: named.rename_axis(t, "seq", "time"))(t)
    assert r.names == ("batch", "time")
    u = maybe_jit(lambda t: named.unsqueeze(t, "head", 1))(t)
    assert u.names == ("batch", "head", "seq") and u.shape == (2, 1, 3)
    u2 = named.unsqueeze(t, "head", -1)
    assert u2.names == ("batch", "seq", "head") and u2.shape == (2, 3, 1)
    s = maybe_jit(lambda u: named.squeeze(u, "head"))(u)
    assert s.names == ("batch", "seq")
    np.testing.assert_array_equal(np.asarray(s.data), np.arange(6.0).reshape(2, 3))
    with pytest.raises(DuplicateAxis, match="'batch' twice"):
        named.rename_axis(t, "seq", "batch")
    with pytest.raises(DuplicateAxis):
        named.unsqueeze(t, "seq")
    with pytest.raises(DimensionError, match=r"position in \[-3, 2\], got 5"):
        named.unsqueeze(t, "x", 5)
    with pytest.raises(InvalidShape, match="axis 'seq' of size 1, got size 3"):
        named.squeeze(t, "seq")


def test_transpose(maybe_jit, rng, dtype):
    x = _arr(rng, (2, 3, 4), dtype)
    t = named.new(x, ("a", "b", "c"))
    y = maybe_jit(lambda t: named.transpose(t, ("c", "a", "b")))(t)
    assert y.names == ("c", "a", "b")
    np.testing.assert_array_equal(_np(y.data), np.transpose(_np(x), (2, 0, 1)))
    anon = named.new(x, (None, "b", "c"))
    ya = named.transpose(anon, ("c", "b"))
    assert named.axis_names(ya) == (None, "c", "b")
    np.testing.assert_array_equal(_np(ya.data), np.transpose(_np(x), (0, 2, 1)))
    with pytest.raises(AxisMismatch, match=r"permutation of \('a', 'b', 'c'\)"):
        named.transpose(t, ("a", "b"))


# -------------------------------------------------------------------------------- reductions


@pytest.mark.parametrize("name,axis", [("batch", 0), ("seq", 1), ("embed", 2)])
def test_reductions(maybe_jit, rng, dtype, name, axis):
    x = _arr(rng, (3, 5, 4), dtype)
    t = named.new(x, ("batch", "seq", "embed"))
    ref = _np(x)
    rest = tuple(n for n in ("batch", "seq", "embed") if n != name)
    s = maybe_jit(lambda t: named.sum_along(t, name))(t)
    m = maybe_jit(lambda t: named.mean_along(t, name))(t)
    mx = maybe_jit(lambda t: named.max_along(t, name))(t)
    sm = maybe_jit(lambda t: named.softmax_along(t, name))(t)
    for r in (s, m, mx):
        assert r.names == rest and r.dtype == dtype
    assert sm.names == t.names and sm.dtype == dtype
    close(s.data, ref.sum(axis), dtype)
    close(m.data, ref.mean(axis), dtype)
    close(mx.data, ref.max(axis), dtype)
    e = np.exp(ref - ref.max(axis, keepdims=True))
    close(sm.data, e / e.sum(axis, keepdims=True), dtype)


def test_reduction_errors():
    t = named.new(jnp.zeros((2, 0)), ("a", "b"))
    with pytest.raises(InvalidShape, match="non-empty axis 'b'"):
        named.max_along(t, "b")
    i = named.new(jnp.arange(4), ("a",))
    with pytest.raises(DTypeError, match="floating dtype for mean_along"):
        named.mean_along(i, "a")
    with pytest.raises(DTypeError, match="floating dtype for softmax_along"):
        named.softmax_along(i, "a")
    assert named.sum_along(i, "a").data.tolist() == 6  # integers sum exactly
    # an empty axis sums to 0 and averages to NaN, as NumPy
    assert named.sum_along(t, "b").data.tolist() == [0.0, 0.0]
    assert np.isnan(np.asarray(named.mean_along(t, "b").data)).all()


def test_softmax_non_finite():
    t = named.new(jnp.array([[0.0, -jnp.inf], [jnp.nan, 1.0]]), ("a", "b"))
    p = np.asarray(named.softmax_along(t, "b").data)
    np.testing.assert_allclose(p[0], [1.0, 0.0])
    assert np.isnan(p[1]).all()  # NaN propagates, never a silent number


# ------------------------------------------------------------------------------- binary ops


OPS = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}


@pytest.mark.parametrize("op", list(OPS))
def test_binary_align_by_name(maybe_jit, rng, dtype, op):
    a = _arr(rng, (2, 3, 4), dtype)  # batch seq embed
    b = _arr(rng, (4, 5, 3), dtype) + 3  # embed head seq (away from 0 for div)
    ta = named.new(a, ("batch", "seq", "embed"))
    tb = named.new(b, ("embed", "head", "seq"))
    out = maybe_jit(getattr(named, op))(ta, tb)
    assert out.names == ("batch", "seq", "embed", "head") and out.dtype == dtype
    ref = OPS[op](_np(a)[:, :, :, None], np.transpose(_np(b), (2, 0, 1))[None])
    rtol, atol = tolerance(dtype)
    np.testing.assert_allclose(_np(out.data), ref, rtol=rtol * 2, atol=atol * 2)


def test_binary_scalar_and_scale(maybe_jit, dtype):
    t = named.new(jnp.arange(4.0, dtype=dtype), ("seq",))
    np.testing.assert_array_equal(_np(maybe_jit(named.add)(t, 2.0).data), np.arange(4.0) + 2)
    s = maybe_jit(lambda t: named.scale(t, 0.5))(t)
    assert s.dtype == dtype
    np.testing.assert_array_equal(_np(s.data), np.arange(4.0) * 0.5)
    assert named.add(t, 2.0).dtype == dtype  # a Python scalar keeps the dtype
    i = named.new(jnp.arange(3), ("seq",))
    assert named.scale(i, 2).data.tolist() == [0, 2, 4]
    with pytest.raises(DTypeError, match="integer factor"):
        named.scale(i, 0.5)
    assert named.mul(i, 0.5).data.tolist() == [0.0, 0.5, 1.0]  # promoted, not truncated
    with pytest.raises(InvalidOp, match=r"NamedTensor or a scalar, got an array of shape \(4,\)"):
        named.add(t, jnp.zeros(4))


def test_binary_anonymous_leading_broadcast(rng):
    a = named.new(_arr(rng, (5, 3), jnp.float32), (None, "seq"))
    b = named.new(_arr(rng, (3, 2), jnp.float32), ("seq", "embed"))
    out = named.mul(a, b)
    assert named.axis_names(out) == (None, "seq", "embed")
    np.testing.assert_allclose(np.asarray(out.data), np.asarray(a.data)[:, :, None] * np.asarray(b.data)[None],
                               rtol=1e-6)
    bad = named.new(jnp.zeros((3, 2)), ("seq", None))
    with pytest.raises(InvalidOp, match="anonymous axes only in front"):
        named.add(a, bad)


def test_binary_size_mismatch():
    a = named.zeros({"batch": 2, "seq": 3})
    b = named.zeros({"seq": 4})
    with pytest.raises(SizeMismatch, match=r"axis 'seq' of size 3 \(its size in 'a'\), got size 4"):
        named.add(a, b)
    with pytest.raises(SizeMismatch):
        named.dot(a, b, over="seq")


def test_align_to():
    t = named.new(jnp.arange(6.0).reshape(2, 3), ("a", "b"))
    x = named.align_to(t, ("b", "c", "a"))
    assert x.shape == (3, 1, 2)
    np.testing.assert_array_equal(np.asarray(x[:, 0]), np.arange(6.0).reshape(2, 3).T)
    with pytest.raises(AxisNotFound, match="axis 'a' of the tensor"):
        named.align_to(t, ("b",))


# ------------------------------------------------------------------------------------- dot


def test_dot_matches_einsum(maybe_jit, rng, dtype):
    a = _arr(rng, (2, 3, 4), dtype)  # batch seq embed
    b = _arr(rng, (4, 2, 5), dtype)  # embed batch out
    ta, tb = named.new(a, ("batch", "seq", "embed")), named.new(b, ("embed", "batch", "out"))
    out = maybe_jit(lambda x, y: named.dot(x, y, over="embed"))(ta, tb)
    assert out.names == ("batch", "seq", "out") and out.dtype == dtype
    ref = np.einsum("bse,ebo->bso", _np(a), _np(b))
    rtol, atol = tolerance(dtype)
    np.testing.assert_allclose(_np(out.data), ref, rtol=rtol * 3, atol=atol * 3)
    two = named.dot(ta, tb, over=("embed", "batch"))
    assert two.names == ("seq", "out")
    np.testing.assert_allclose(_np(two.data), np.einsum("bse,ebo->so", _np(a), _np(b)), rtol=rtol * 3,
                               atol=atol * 6)


def test_dot_errors():
    a = named.zeros({"a": 2, "b": 3})
    with pytest.raises(AxisNotFound, match="got 'c'"):
        named.dot(a, named.zeros({"c": 2}), over="c")
    with pytest.raises(InvalidOp, match="only named axes in dot"):
        named.dot(a, named.new(jnp.zeros((3, 2)), ("b", None)), over="b")
    with pytest.raises(DTypeError, match="dtype float32"):
        named.dot(a, named.zeros({"b": 3}, dtype=jnp.bfloat16), over="b")


def test_dot_grad():
    rng = np.random.default_rng(3)
    a = named.new(_arr(rng, (3, 4), jnp.float32), ("s", "e"))
    b = named.new(_arr(rng, (4, 2), jnp.float32), ("e", "o"))
    g = jax.grad(lambda a, b: named.sum_along(named.sum_along(named.dot(a, b, over="e"), "s"), "o").data)(a, b)
    assert isinstance(g, named.NamedTensor) and g.names == ("s", "e")
    # d/dA sum(A @ B) = 1 B^T
    np.testing.assert_allclose(np.asarray(g.data), np.ones((3, 2)) @ np.asarray(b.data).T, rtol=1e-6)
    jax.test_util.check_grads(lambda x, y: named.dot(named.new(x, ("s", "e")), named.new(y, ("e", "o")),
                                                     over="e").data, (a.data, b.data), order=2, modes=["rev"])


# ---------------------------------------------------------------------------------- take / map


def test_take(maybe_jit, rng, dtype):
    x = _arr(rng, (3, 4), dtype)
    t = named.new(x, ("a", "b"))
    one = maybe_jit(lambda t: named.take(t, "b", 2))(t)
    assert one.names == ("a",)
    np.testing.assert_array_equal(_np(one.data), _np(x)[:, 2])
    neg = named.take(t, "a", -1)
    np.testing.assert_array_equal(_np(neg.data), _np(x)[-1])
    many = maybe_jit(lambda t, i: named.take(t, "b", i))(t, jnp.array([3, 0, 0]))
    assert many.names == ("a", "b") and many.shape == (3, 3)
    np.testing.assert_array_equal(_np(many.data), _np(x)[:, [3, 0, 0]])
    traced = jax.jit(lambda t, i: named.take(t, "a", i))(t, jnp.int32(1))
    np.testing.assert_array_equal(_np(traced.data), _np(x)[1])
    with pytest.raises(DimensionError, match=r"index in \[-4, 4\) for axis 'b', got 4"):
        named.take(t, "b", 4)
    with pytest.raises(DimensionError, match="1-D index array"):
        named.take(t, "b", jnp.zeros((2, 2), jnp.int32))
    with pytest.raises(DTypeError, match="integer indices"):
        named.take(t, "b", jnp.zeros(2))


def test_map(maybe_jit, dtype):
    t = named.new(jnp.arange(4.0, dtype=dtype), ("seq",))
    out = maybe_jit(lambda t: named.map(t, jnp.square))(t)
    np.testing.assert_array_equal(_np(out.data), np.arange(4.0) ** 2)
    with pytest.raises(InvalidOp, match="element-wise function keeping shape"):
        named.map(t, jnp.sum)


def test_nmap(maybe_jit, rng, dtype):
    x = _arr(rng, (2, 5, 3), dtype)  # batch seq embed
    t = named.new(x, ("batch", "seq", "embed"))
    # a positional function of (embed, seq): a matrix-vector product over seq per embed row
    w = np.asarray(rng.standard_normal(5), np.float32)
    f = lambda m: jnp.dot(m.astype(jnp.float32), w).astype(m.dtype)  # noqa: E731
    out = maybe_jit(lambda t: named.nmap(t, f, axes=("embed", "seq"), out_names=("embed",)))(t)
    assert out.names == ("batch", "embed")
    close(out.data, np.einsum("bse,s->be", _np(x), w), dtype)
    keep = named.nmap(t, lambda v: jnp.flip(v), axes=("seq",))
    assert keep.names == ("batch", "embed", "seq")
    np.testing.assert_array_equal(_np(keep.data), np.flip(np.transpose(_np(x), (0, 2, 1)), -1))
    with pytest.raises(AxisMismatch, match="names for f's output"):
        named.nmap(t, jnp.sum, axes=("seq",))
    with pytest.raises(DuplicateAxis):
        named.nmap(t, lambda v: v, axes=("seq",), out_names=("batch",))


# ------------------------------------------------------------------------- transformations


def test_vmap_over_anonymous_leading_axis(rng):
    x = _arr(rng, (4, 3, 5), jnp.float32)
    t = named.new(x, (None, "seq", "embed"))

    def f(t):
        assert named.axis_names(t) == ("seq", "embed")  # the mapped axis is gone inside
        return named.softmax_along(named.sum_along(t, "embed"), "seq")

    out = jax.vmap(f)(t)
    assert named.axis_names(out) == (None, "seq")
    s = np.asarray(x).sum(-1)
    e = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(out.data), e / e.sum(-1, keepdims=True), rtol=1e-5)
    # vmap can also stack named tensors built inside: leading anonymous axis appears
    stacked = jax.vmap(lambda v: named.new(v, ("seq", "embed")))(x)
    assert named.axis_names(stacked) == (None, "seq", "embed")
    assert named.describe(stacked) == "NamedTensor[_=4, seq=3, embed=5] float32"


def test_vmap_over_named_axis_is_an_error():
    t = named.zeros({"seq": 3, "embed": 2})
    with pytest.raises(AxisMismatch, match="vmap/scan may only map over anonymous axes"):
        jax.vmap(named.axis_names)(t)


def test_scan_and_grad():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 4)), jnp.float32)
    t = named.new(x, (None, "embed"))

    def step(carry, row):
        return named.add(carry, row), named.sum_along(row, "embed")

    init = named.zeros({"embed": 4})
    final, sums = jax.lax.scan(step, init, t)
    assert final.names == ("embed",) and named.axis_names(sums) == (None,)
    np.testing.assert_allclose(np.asarray(final.data), np.asarray(x).sum(0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sums.data), np.asarray(x).sum(1), rtol=1e-6)

    def loss(t):
        return named.sum_along(named.softmax_along(t, "embed"), "embed").data.sum() + (t.data ** 2).sum()

    g = jax.grad(loss)(t)
    assert isinstance(g, named.NamedTensor) and g.names == t.names
    np.testing.assert_allclose(np.asarray(g.data), 2 * np.asarray(x), rtol=1e-5, atol=1e-5)


def test_no_retracing():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(a, b):
        return named.dot(named.add(a, b), b, over="e")

    a = named.zeros({"s": 2, "e": 3})
    b = named.ones({"e": 3})
    for _ in range(3):
        f(a, b)
        a = named.add(a, 1.0)


def test_shard_map_sees_local_block():
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    x = jnp.arange(16.0 * 3).reshape(16, 3)
    t = jax.device_put(named.new(x, ("seq", "embed")), jax.sharding.NamedSharding(mesh, P("d")))

    def local(t):
        assert named.axis_size(t, "seq") == 2  # the local block
        return named.sum_along(t, "embed")

    out = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("d"), out_specs=P("d")))(t)
    assert out.names == ("seq",)
    np.testing.assert_allclose(np.asarray(out.data), np.asarray(x).sum(1))


def test_nnx_module_holds_named_tensor():
    class Layer(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Param(named.randn(rngs.params(), {"embed": 3, "out": 2}))

        def __call__(self, x):
            return named.dot(x, self.w.get_value(), over="embed")

    class Holder(nnx.Module):  # a NamedTensor as a plain data attribute, no Variable
        def __init__(self):
            self.t = nnx.data(named.ones({"seq": 2}))

    h = Holder()
    graph, state = nnx.split(h)
    h2 = nnx.merge(graph, jax.tree.map(lambda x: x * 3, state))
    assert h2.t.names == ("seq",) and h2.t.data.tolist() == [3.0, 3.0]

    m = Layer(nnx.Rngs(0))
    x = named.ones({"batch": 4, "embed": 3})
    y = m(x)
    assert y.names == ("batch", "out")
    np.testing.assert_allclose(np.asarray(y.data), np.ones((4, 3)) @ np.asarray(m.w.get_value().data), rtol=1e-6)
    grads = nnx.grad(lambda m: m(x).data.sum())(m)
    gw = grads["w"].get_value()
    assert isinstance(gw, named.NamedTensor) and gw.names == ("embed", "out")
    np.testing.assert_allclose(np.asarray(gw.data), np.full((3, 2), 4.0))


# ------------------------------------------------------------------------------- properties


@given(
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=4, max_side=4),
               elements=st.floats(-10, 10, width=32)),
    st.randoms(use_true_random=False),
)
def test_transpose_round_trip_and_sum_invariance(x, rnd):
    names = tuple(f"ax{i}" for i in range(x.ndim))
    t = named.new(x, names)
    perm = list(names)
    rnd.shuffle(perm)
    tt = named.transpose(t, perm)
    back = named.transpose(tt, names)
    np.testing.assert_array_equal(np.asarray(back.data), x)
    # summing a named axis gives the same answer whatever the layout
    for n in names:
        a = named.align_to(named.sum_along(t, n), tuple(p for p in perm if p != n))
        b = named.sum_along(tt, n).data
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


@given(st.lists(st.sampled_from("abcde"), min_size=1, max_size=3, unique=True),
       st.lists(st.sampled_from("abcde"), min_size=1, max_size=3, unique=True))
def test_add_is_commutative_up_to_layout(na, nb):
    size = {"a": 2, "b": 3, "c": 1, "d": 4, "e": 2}
    r = np.random.default_rng(len(na) * 7 + len(nb))
    ta = named.new(r.standard_normal([size[n] for n in na]).astype(np.float32), na)
    tb = named.new(r.standard_normal([size[n] for n in nb]).astype(np.float32), nb)
    ab, ba = named.add(ta, tb), named.add(tb, ta)
    assert set(ab.names) == set(na) | set(nb)
    np.testing.assert_array_equal(np.asarray(named.align_to(ba, ab.names)), np.asarray(ab.data))


def test_new_keeps_a_quantized_record_for_sharding():
    from viva_tensor import quant

    w = jnp.asarray(np.random.default_rng(0).standard_normal((64, 128)), jnp.float32)
    q = quant.quantize(w, "q8_0")
    t = named.new(q, ("input", "output"))
    assert t.data is q and t.names == ("input", "output") and t.shape == (64, 128)
    with pytest.raises(AxisMismatch, match="names"):
        named.new(q, ("input",))


# ------------------------------------------------------------------- issue 12: silent answers, bad input


def test_take_refuses_a_concrete_index_array_out_of_range():
    """An out-of-range index filled int32 data with -2147483648: a concrete index is now checked."""
    t = named.new(jnp.arange(3, dtype=jnp.int32), ("a",))
    for index in (jnp.array([5]), np.array([0, -4]), [3], jnp.int32(7), np.int64(2**40)):
        with pytest.raises(DimensionError, match=r"argument 'index': expected (an index|indices) in \[-3, 3\)"):
            named.take(t, "a", index)
    np.testing.assert_array_equal(np.asarray(named.take(t, "a", np.array([-1, 0])).data), [2, 0])
    with pytest.raises(DTypeError, match="integer indices"):
        named.take(t, "a", jnp.array([True]))


def test_take_with_a_traced_index_fills_as_jnp_take_does():
    """Documented: a traced index outside [-n, n) gives jnp.take's fill value (NaN for floats)."""
    f = named.new(jnp.arange(3.0), ("a",))
    i = named.new(jnp.arange(3, dtype=jnp.int32), ("a",))
    idx = jnp.array([-1, 3, -4])
    got_f = jax.jit(lambda t, k: named.take(t, "a", k))(f, idx).data
    got_i = jax.jit(lambda t, k: named.take(t, "a", k))(i, idx).data
    np.testing.assert_array_equal(np.asarray(got_f), np.asarray(jnp.take(f.data, idx)))
    assert float(got_f[0]) == 2.0 and np.isnan(np.asarray(got_f[1:])).all()
    np.testing.assert_array_equal(np.asarray(got_i), np.asarray(jnp.take(i.data, idx)))


def test_a_named_tensor_built_directly_refuses_duplicate_names():
    with pytest.raises(DuplicateAxis, match=r"argument 'names'.*'a' twice"):
        named.NamedTensor(data=jnp.zeros((2, 3)), names=("a", "a"))
    with pytest.raises(AxisError, match="non-empty string or None"):
        named.NamedTensor(data=jnp.zeros(2), names=("",))
    t = named.NamedTensor(data=jnp.zeros((2, 3)), names=["a", "b"])  # a list becomes a (hashable) tuple
    assert t.names == ("a", "b")
    # pytrees still rebuild (jit, vmap, tree_map) without trouble
    assert jax.jit(lambda t: t)(t).names == ("a", "b")
    assert jax.tree_util.tree_map(lambda x: x + 1, t).names == ("a", "b")


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.uint8, jnp.int16, jnp.bool_], ids=lambda d: jnp.dtype(d).name)
def test_integer_sum_along_and_dot_do_not_wrap(dtype):
    x = np.array([[100, 100, 27], [1, 0, 1]]).astype(dtype)
    t = named.new(x, ("a", "b"))
    acc = np.uint32 if np.issubdtype(dtype, np.unsignedinteger) else np.int32
    s = named.sum_along(t, "b")
    assert s.data.dtype == acc
    np.testing.assert_array_equal(np.asarray(s.data), x.astype(np.int64).sum(1))
    w = named.new(x.T.copy(), ("b", "c"))
    d = named.dot(t, w, over="b")
    assert d.data.dtype == acc
    np.testing.assert_array_equal(np.asarray(d.data), x.astype(np.int64) @ x.T.astype(np.int64))


@pytest.mark.parametrize("call, exc, match", [
    (lambda: named.new(jnp.zeros(2), None), AxisError, r"argument 'names': expected a sequence of axis names.*None"),
    (lambda: named.new(jnp.zeros(2), 3), AxisError, r"argument 'names'.*got a int"),
    (lambda: named.new("abc", ("a",)), DTypeError, r"argument 'data': expected a jax.Array, got a str"),
    (lambda: named.new(["a", "b"], ("a",)), DTypeError, r"argument 'data': expected an array or a nested list"),
    (lambda: named.new(None, ()), DTypeError, r"argument 'data'"),
    (lambda: named.from_tensor("x"), DTypeError, r"argument 'data'"),
    (lambda: named.new(np.ones(2), ("a",)), DTypeError, r"argument 'data'.*float64.*astype\(jnp.float32\)"),
    (lambda: named.new(np.array([2**40]), ("a",)), DTypeError, r"argument 'data'.*wrap"),
    (lambda: named.zeros({"a": 2}, dtype="foo"), DTypeError, r"argument 'dtype'"),
    (lambda: named.ones({"a": 2**40}), InvalidShape, r"argument 'axes'.*fits in memory"),
    (lambda: named.zeros({"a": True}), InvalidShape, r"non-negative integer sizes"),
    (lambda: named.zeros(None), AxisError, r"argument 'axes'"),
    (lambda: named.random(0, {"a": 2}), DTypeError, r"argument 'key': expected a PRNG key"),
    (lambda: named.randn(jax.random.key(0), {"a": 2}, dtype=jnp.int32), DTypeError, r"floating dtype"),
    (lambda: named.random(jax.random.key(0), {"a": 2}, minval="x"), DTypeError, r"argument 'minval'"),
])
def test_bad_input_is_a_viva_tensor_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_nested_lists_are_still_accepted():
    t = named.new([[1.0, 2.0], [3.0, 4.0]], ("a", "b"))
    assert t.data.dtype == jnp.float32 and t.shape == (2, 2)
    assert named.new([1, 2], ("a",)).data.dtype == jnp.int32
