"""Tests of viva_tensor.pool against NumPy references, single-device and sharded on 8 CPU devices."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from tests.conftest import tolerance
from viva_tensor import pool
from viva_tensor.errors import DimensionError, DTypeError, InvalidShape, ShapeMismatch, ShardingError


def np_cosine(q, d):
    q = np.asarray(q, np.float64)
    d = np.asarray(d, np.float64)
    norms = np.linalg.norm(d, axis=1) * np.linalg.norm(q)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, d @ q / np.where(norms > 0, norms, 1), 0.0)


def f32(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


@pytest.fixture(params=["auto", "explicit"])
def mesh(request):
    t = AxisType.Auto if request.param == "auto" else AxisType.Explicit
    return jax.make_mesh((8,), ("docs",), axis_types=(t,))


def test_parallel_map(maybe_jit, dtype, rng):
    xs = [jnp.asarray(rng.standard_normal((3, 4)), dtype) for _ in range(5)]
    out = maybe_jit(lambda s: pool.parallel_map(s, lambda m: m @ m.T))(pool.stack(xs))
    ref = np.stack([f32(x) @ f32(x).T for x in xs])
    rtol, atol = tolerance(dtype)
    np.testing.assert_allclose(f32(out), ref, rtol=rtol * 4, atol=atol * 4)
    assert out.dtype == dtype


def test_parallel_map_sharded(mesh, rng):
    x = jnp.asarray(rng.standard_normal((13, 6)), jnp.float32)  # 13 tensors on 8 devices: padded
    out = pool.parallel_map(x, lambda v: (jnp.sum(v), v * 2), mesh=mesh)
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(x).sum(1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out[1]), 2 * np.asarray(x), rtol=1e-6)
    x16 = jnp.asarray(rng.standard_normal((16, 6)), jnp.float32)
    out16 = pool.parallel_map(x16, jnp.sum, mesh=mesh)
    assert out16.sharding.is_equivalent_to(NamedSharding(mesh, P("docs")), 1)
    with pytest.raises(ShardingError, match="mesh axes among"):
        pool.parallel_map(x, jnp.sum, mesh=mesh, axis="nope")


def test_parallel_sum(maybe_jit, dtype, rng, mesh):
    xs = jnp.asarray(rng.standard_normal((11, 4)), dtype)
    out = maybe_jit(pool.parallel_sum)(xs)
    rtol, atol = tolerance(dtype)
    np.testing.assert_allclose(f32(out), f32(xs).sum(0), rtol=rtol * 4, atol=atol * 4)
    assert out.dtype == dtype
    sharded = pool.parallel_sum(xs, mesh=mesh)
    np.testing.assert_allclose(f32(sharded), f32(xs).sum(0), rtol=rtol * 4, atol=atol * 4)


def test_stack_errors():
    with pytest.raises(InvalidShape, match="at least one tensor"):
        pool.stack([])
    with pytest.raises(ShapeMismatch, match=r"argument 'tensors\[1\]': expected shape \(2,\)"):
        pool.stack([jnp.zeros(2), jnp.zeros(3)])
    with pytest.raises(DimensionError, match="leading axis"):
        pool.parallel_map(jnp.float32(1), jnp.sum)


def test_cosine_and_search(maybe_jit, dtype, rng):
    q = jnp.asarray(rng.standard_normal(8), dtype)
    d = jnp.asarray(rng.standard_normal((20, 8)), dtype).at[3].set(0)  # a zero document
    ref = np_cosine(f32(q), f32(d))
    rtol, atol = tolerance(dtype)
    c = maybe_jit(pool.cosine_similarity)(q, d)
    np.testing.assert_allclose(f32(c), ref, rtol=rtol, atol=atol)
    assert f32(c)[3] == 0.0
    s, i = maybe_jit(pool.similarity_search)(q, d)
    assert s.dtype == dtype and i.dtype == jnp.int32
    # sorted, a permutation, and scores are the references at those indices
    assert sorted(np.asarray(i).tolist()) == list(range(20))
    assert np.all(np.diff(f32(s)) <= 0)
    np.testing.assert_allclose(f32(s), ref[np.asarray(i)], rtol=rtol, atol=atol)
    if dtype == jnp.float32:
        np.testing.assert_array_equal(np.asarray(i), np.argsort(-ref, kind="stable"))


def test_top_k(maybe_jit, dtype, rng):
    q = jnp.asarray(rng.standard_normal(16), dtype)
    d = jnp.asarray(rng.standard_normal((50, 16)), dtype)
    s, i = maybe_jit(lambda q, d: pool.top_k_similar(q, d, 5))(q, d)
    ref = np_cosine(f32(q), f32(d))
    rtol, atol = tolerance(dtype)
    np.testing.assert_allclose(f32(s), np.sort(ref)[::-1][:5], rtol=rtol, atol=atol)
    np.testing.assert_allclose(ref[np.asarray(i)], np.sort(ref)[::-1][:5], rtol=rtol, atol=atol)


@pytest.mark.parametrize("n", [64, 61])
def test_top_k_sharded_matches_single(mesh, rng, n):
    q = jnp.asarray(rng.standard_normal(16), jnp.float32)
    d = jnp.asarray(rng.standard_normal((n, 16)), jnp.float32)
    if n % 8 == 0:
        d = jax.device_put(d, NamedSharding(mesh, P("docs", None)))  # documents live on the devices
    for k in (1, 5, 12):  # k larger than a device's 8 documents, too
        s, i = pool.top_k_similar(q, d, k, mesh=mesh)
        ref = np_cosine(np.asarray(q), np.asarray(d))
        want = np.argsort(-ref, kind="stable")[:k]
        np.testing.assert_array_equal(np.asarray(i), want)
        np.testing.assert_allclose(np.asarray(s), ref[want], rtol=1e-5, atol=1e-6)


def test_top_k_no_retracing(rng):
    f = jax.jit(chex.assert_max_traces(lambda q, d: pool.top_k_similar(q, d, 3), n=1))
    d = jnp.asarray(rng.standard_normal((10, 4)), jnp.float32)
    for s in range(3):
        f(jnp.asarray(rng.standard_normal(4), jnp.float32), d + s)


def test_vmap_over_queries(rng):
    qs = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
    d = jnp.asarray(rng.standard_normal((12, 8)), jnp.float32)
    s, i = jax.vmap(lambda q: pool.top_k_similar(q, d, 2))(qs)
    for r in range(4):
        ref = np_cosine(np.asarray(qs[r]), np.asarray(d))
        np.testing.assert_array_equal(np.asarray(i[r]), np.argsort(-ref, kind="stable")[:2])


def test_search_errors():
    d = jnp.zeros((5, 3))
    with pytest.raises(DimensionError, match=r"integer in \[1, 5\]"):
        pool.top_k_similar(jnp.ones(3), d, 6)
    with pytest.raises(DimensionError, match=r"integer in \[1, 5\]"):
        pool.top_k_similar(jnp.ones(3), d, 0)
    with pytest.raises(DimensionError, match="a vector"):
        pool.similarity_search(jnp.ones((1, 3)), d)
    with pytest.raises(DimensionError, match="a matrix"):
        pool.similarity_search(jnp.ones(3), jnp.ones(3))
    with pytest.raises(ShapeMismatch, match=r"rows of size 4 \(the query's size\)"):
        pool.cosine_similarity(jnp.ones(4), d)
    with pytest.raises(DTypeError, match="floating dtype"):
        pool.cosine_similarity(jnp.ones(3, jnp.int32), d)


def test_non_finite_gives_nan():
    d = jnp.array([[1.0, 0.0], [jnp.nan, 1.0]])
    c = np.asarray(pool.cosine_similarity(jnp.array([1.0, 0.0]), d))
    assert c[0] == 1.0 and np.isnan(c[1])


@given(st.integers(1, 30), st.integers(1, 6), st.integers(0, 10_000))
def test_search_is_scale_invariant_and_sorted(n, dim, seed):
    r = np.random.default_rng(seed)
    q = r.standard_normal(dim).astype(np.float32)
    d = r.standard_normal((n, dim)).astype(np.float32)
    s1, i1 = pool.similarity_search(q, d)
    s2, _ = pool.similarity_search(q * 3.5, d * 0.25)
    np.testing.assert_allclose(np.asarray(s1), np.asarray(s2), rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(np.asarray(s1)) <= 1e-7)
    assert np.all(np.abs(np.asarray(s1)) <= 1 + 1e-6)
    k = max(1, n // 2)
    ts, _ = pool.top_k_similar(q, d, k)
    np.testing.assert_allclose(np.asarray(ts), np.asarray(s1)[:k], rtol=1e-6, atol=1e-7)
