"""A property-based fuzzer of the runtime area (issue 12): sharding, pool, memory tiers, offloading and remat.

Random arguments, good and bad: rules, specs and meshes (8 host CPU devices), arrays of every dtype and rank,
strings, None, nested garbage, sizes and thresholds of every sign and type. The property: **a viva_tensor
error, or a result equal to its reference** (NumPy written from the definition; the placement asked for;
the bits that were written) — never a raw JAX/NumPy/Python error, never a silent wrong answer. Examples are
bounded and shrinking is off (each example may compile); the file runs in well under a minute.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

from viva_tensor import memory, named, pool, sharding
from viva_tensor.errors import TensorError

FUZZ = settings(max_examples=int(os.environ.get("VIVA_FUZZ_EXAMPLES", 25)), deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck), phases=(Phase.explicit, Phase.reuse, Phase.generate))
AUTO = jax.sharding.AxisType.Auto
MESH_AXES = ("data", "model")
GARBAGE = st.sampled_from([None, "", "data", "nope", 0, -1, 1.5, True, b"data", ("data",), ("data", "data"),
                           ["model"], {"a": 1}, object(), ("data", 3), (None,), jnp.ones(2), np.int64(2)])


def _mesh(shape):
    return jax.make_mesh(shape, MESH_AXES[: len(shape)], axis_types=(AUTO,) * len(shape))


MESHES = st.sampled_from([(1,), (2,), (4,), (8,), (2, 2), (2, 4), (4, 2), (1, 8)])


def _viva_or(f, *args, **kw):
    """f's result, or None for a viva_tensor error (that names its argument); anything else propagates."""
    try:
        return f(*args, **kw)
    except TensorError as e:
        assert e.argument, f"{type(e).__name__} without the argument's name: {e}"
        return None


# ------------------------------------------------------------------------------------------- sharding


@st.composite
def rules(draw):
    entry = st.one_of(
        st.tuples(st.sampled_from(["batch", "embed", "seq", "x"]),
                  st.one_of(st.none(), st.sampled_from(MESH_AXES + ("other",)),
                            st.lists(st.sampled_from(MESH_AXES), max_size=2).map(tuple))),
        GARBAGE)
    if draw(st.integers(0, 9)) == 0:
        return draw(GARBAGE)
    return draw(st.lists(entry, max_size=4))


def _reference_spec(names, shape, rs, mesh_shape):
    """The spec from the definition: the first rule of a name whose mesh axes are not yet used; sizes divide."""
    sizes = dict(zip(MESH_AXES, mesh_shape, strict=False))
    used, out = set(), []
    for i, name in enumerate(names):
        chosen = ()
        for rname, axes in rs:
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            if rname == name and not used & set(axes):
                chosen = axes
                break
        if chosen and shape is not None:
            m = int(np.prod([sizes[a] for a in chosen]))
            if shape[i] % m:
                return None  # on_indivisible="error": refused
        used |= set(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    return P(*out)


def _well_formed(rs, mesh_shape):
    if not isinstance(rs, list):
        return False
    for r in rs:
        if not (isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], str)):
            return False
        axes = r[1]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        if not isinstance(axes, tuple) or not all(a in MESH_AXES[: len(mesh_shape)] for a in axes):
            return False
    return True


@FUZZ
@given(MESHES, rules(), st.lists(st.sampled_from(["batch", "embed", "seq", None]), min_size=1, max_size=3, unique=True),
       st.lists(st.sampled_from([1, 2, 3, 4, 8, 12]), min_size=3, max_size=3), st.booleans())
def test_spec_and_named_sharding(mesh_shape, rs, names, sizes, with_shape):
    mesh = _mesh(mesh_shape)
    shape = tuple(sizes[: len(names)])
    t = named.NamedTensor(data=jnp.zeros(shape), names=tuple(names)) if with_shape else tuple(names)
    got = _viva_or(sharding.spec, t, rs, mesh=mesh)
    if not _well_formed(rs, mesh_shape):
        assert got is None, f"malformed rules {rs!r} accepted: {got}"
        return
    want = _reference_spec(names, shape if with_shape else None, rs, mesh_shape)
    assert got == want, (got, want)
    if got is not None:
        ns = _viva_or(sharding.named_sharding, t, rs, mesh)
        assert ns is not None and ns.spec == got and ns.mesh == mesh


_SPECS = st.one_of(
    st.lists(st.one_of(st.none(), st.sampled_from(MESH_AXES + ("other",)),
                       st.lists(st.sampled_from(MESH_AXES), min_size=1, max_size=2).map(tuple)),
             max_size=4).map(lambda e: P(*e)),
    GARBAGE)


@FUZZ
@given(MESHES, _SPECS, st.lists(st.sampled_from([1, 2, 3, 4, 8]), min_size=0, max_size=3),
       st.sampled_from(["float32", "bfloat16", "int8", "bool"]), st.booleans())
@example((2, 2), P("data"), [3, 4, 2], "bool", False)  # finding: JAX's raw IndivisibleError
@example((2,), P("nope"), [4], "float32", True)
def test_place_puts_the_data_where_asked(mesh_shape, spec, shape, dtype, under_jit):
    mesh = _mesh(mesh_shape)
    x = (jnp.arange(int(np.prod(shape))) % 3).reshape(shape).astype(dtype)
    if under_jit:
        got = _viva_or(jax.jit(lambda a: sharding.place(a, spec, mesh)), x)
    else:
        got = _viva_or(sharding.place, x, spec, mesh)
    if got is None:
        return
    assert isinstance(spec, P)
    sizes = dict(zip(MESH_AXES, mesh_shape, strict=False))
    assert len(spec) <= len(shape)
    flat = [a for e in spec for a in ((e,) if isinstance(e, str) else (e or ()))]
    assert len(flat) == len(set(flat)) and all(a in sizes for a in flat)
    for e, n in zip(spec, shape, strict=False):
        axes = (e,) if isinstance(e, str) else (e or ())
        assert n % int(np.prod([sizes[a] for a in axes])) == 0, f"placed {shape} by {spec} on {mesh_shape}"
    np.testing.assert_array_equal(np.asarray(got), np.asarray(x))
    assert got.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), len(shape))


@FUZZ
@given(MESHES, rules(), st.lists(st.sampled_from([1, 2, 4, 6, 8]), min_size=1, max_size=2), st.booleans())
@example((1,), None, [1], False)  # finding: rules=None raised TypeError
def test_shard_named_tensors(mesh_shape, rs, sizes, quantized):
    mesh = _mesh(mesh_shape)
    names = ("batch", "embed")[: len(sizes)]
    data = jnp.arange(float(np.prod(sizes))).reshape(sizes)
    t = named.NamedTensor(data=data, names=names)
    got = _viva_or(sharding.shard, {"t": t, "other": 3}, rs, mesh)
    if got is None:
        return
    assert got["other"] == 3
    np.testing.assert_array_equal(np.asarray(got["t"].data), np.asarray(data))
    want = _reference_spec(names, tuple(sizes), rs, mesh_shape)
    assert want is not None
    assert got["t"].data.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, want), len(sizes))


# ------------------------------------------------------------------------------------------------ pool

_POOL_DTYPES = ("float32", "bfloat16", "float16", "int32", "int8", "bool", "uint8")


@st.composite
def documents(draw):
    kind = draw(st.integers(0, 9))
    n, dim = draw(st.integers(0, 6)), draw(st.integers(0, 5))
    dtype = draw(st.sampled_from(_POOL_DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    d = rng.standard_normal((n, dim)).astype(np.float32)
    if n * dim and draw(st.booleans()):
        d.reshape(-1)[draw(st.integers(0, n * dim - 1))] = draw(st.sampled_from([np.nan, np.inf, 0.0, 1e30, 1e-30]))
    if kind == 0:
        return draw(GARBAGE)
    if kind == 1:
        return d.tolist()
    if kind == 2:
        return d.astype(np.float64)  # float64: refused, or computed as float32 (never a raw error)
    return jnp.asarray(d).astype(dtype)


def _cosine_reference(q, d):
    q64, d64 = np.asarray(q, np.float64), np.asarray(d, np.float64)
    norms = np.linalg.norm(d64, axis=1) * np.linalg.norm(q64)
    with np.errstate(all="ignore"):
        return np.where(norms == 0, 0.0, (d64 @ q64) / np.where(norms == 0, 1.0, norms))


@FUZZ
@given(documents(), st.one_of(st.integers(0, 5), GARBAGE), st.integers(0, 2**16), st.booleans())
@example(None, 0, 0, False)  # finding: documents=None raised JAX's ValueError
# finding: top_k_similar ranked a NaN score first (lax.top_k), similarity_search last
@example(jnp.asarray([[0.26, -1.9, -1.1, -0.19], [-0.13, np.nan, 0.73, -0.85]], jnp.bfloat16), 5, 1739, True)
def test_similarity_functions(docs, dim_or_garbage, seed, as_list):
    dim = getattr(docs, "shape", (0, 0))[-1] if getattr(docs, "ndim", 0) == 2 else 3
    q = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    query = q.tolist() if as_list else jnp.asarray(q)
    if not isinstance(dim_or_garbage, int) or isinstance(dim_or_garbage, bool):
        query = dim_or_garbage
    sims = _viva_or(pool.cosine_similarity, query, docs)
    ranked = _viva_or(pool.similarity_search, query, docs)
    assert (sims is None) == (ranked is None)
    for k in (1, 2, 0, -1, 2.0, True, "1", np.int64(1)):
        top = _viva_or(pool.top_k_similar, query, docs, k)
        if sims is None:
            assert top is None
            continue
        n = sims.shape[0]
        ok_k = isinstance(k, (int, np.integer)) and not isinstance(k, bool) and 1 <= k <= n
        if not ok_k:
            assert top is None, f"k={k!r} accepted for {n} documents"
            continue
        assert top is not None
        np.testing.assert_array_equal(np.asarray(top[0], np.float32), np.asarray(ranked[0], np.float32)[:k])
    if sims is None:
        return
    d = np.asarray(jnp.asarray(docs).astype(jnp.float32)) if not isinstance(docs, list) else np.asarray(docs)
    want = _cosine_reference(np.asarray(jnp.asarray(query).astype(jnp.float32)), d)
    got = np.asarray(sims, np.float64)
    tol = 2e-2 if sims.dtype in (jnp.bfloat16, jnp.float16) else 1e-5
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    order = np.asarray(ranked[1])
    assert sorted(order.tolist()) == list(range(len(order)))


@FUZZ
@given(st.one_of(documents(), st.lists(documents(), max_size=3)), st.sampled_from([None, (1,), (2,), (8,), (2, 2)]),
       st.sampled_from([None, "data", "model", ("data", "model"), "nope", 3]))
def test_parallel_sum_and_map(tensors, mesh_shape, axis):
    mesh = None if mesh_shape is None else _mesh(mesh_shape)
    total = _viva_or(pool.parallel_sum, tensors, mesh=mesh, axis=axis)
    mapped = _viva_or(pool.parallel_map, tensors, lambda t: t.sum(), mesh=mesh, axis=axis)
    if total is None:
        return
    stack = np.stack([np.asarray(jnp.asarray(t).astype(jnp.float32)) for t in tensors]) \
        if isinstance(tensors, list) else np.asarray(jnp.asarray(tensors).astype(jnp.float32))
    dtype = np.asarray(total).dtype
    tol = 2e-2 if total.dtype in (jnp.bfloat16, jnp.float16) else 1e-5
    if np.issubdtype(dtype, np.floating) or total.dtype in (jnp.bfloat16,):
        np.testing.assert_allclose(np.asarray(total, np.float64), stack.astype(np.float64).sum(0), rtol=tol, atol=tol)
    assert mapped is not None and mapped.shape == stack.shape[:1]


# --------------------------------------------------------------------------------------------- memory

TIERS = st.sampled_from(["device", "pinned_host", "unpinned_host", "disk", "gpu", "", None, 3, "DEVICE"])
LEAVES = st.sampled_from(["f32", "bf16", "i8", "np", "scalar", "str", "none", "int", "float", "empty", "record"])


def _leaf(kind, i):
    from viva_tensor import quant

    return {
        "f32": jnp.arange(6.0).reshape(2, 3) + i, "bf16": jnp.ones(3, jnp.bfloat16) * i,
        "i8": jnp.arange(4, dtype=jnp.int8), "np": np.arange(3, dtype=np.int16), "scalar": jnp.float32(i),
        "str": "w", "none": None, "int": 7, "float": 2.5, "empty": jnp.zeros((0, 2)),
        "record": quant.quantize(jnp.linspace(-1.0, 1.0, 64), "int8"),
    }[kind]


@FUZZ
@given(st.dictionaries(st.sampled_from(["a", "b", "c.d", "1"]), LEAVES, max_size=3), TIERS,
       st.sampled_from([None, "file", "dir", 3, "missing/deep"]))
def test_place_and_load_round_trip(tmp_path_factory, leaves, tier, path_kind):
    tree = {k: _leaf(v, i) for i, (k, v) in enumerate(leaves.items())}
    base = tmp_path_factory.mktemp("tier")
    path = {None: None, "file": base / "t.safetensors", "dir": base, 3: 3,
            "missing/deep": base / "missing" / "deep.safetensors"}[path_kind]
    placed = _viva_or(memory.place, tree, tier, path=path)
    if placed is None:
        return
    assert tier in memory.TIERS
    back = _viva_or(memory.load, placed)
    assert back is not None
    got_leaves, want_leaves = jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree)
    assert len(got_leaves) == len(want_leaves)
    for a, b in zip(got_leaves, want_leaves, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


_POLICY_ARG = st.sampled_from([0, 1, 100, 10**12, -1, 1.5, "1", None, True, np.int64(8)])


@FUZZ
@given(st.sampled_from(["keep", "host", "disk", "smart", "garbage"]), _POLICY_ARG, _POLICY_ARG,
       st.sampled_from([None, ("w",), ("w", "b", "w"), ("zz",), "w"]), st.sampled_from(["pinned_host", "x", None]))
def test_offload_policies(tmp_path_factory, kind, a, b, trace, host_kind):
    path = str(tmp_path_factory.mktemp("off") / "o.safetensors")
    tree = {"w": jnp.ones((16, 16)), "b": jnp.ones(4)}
    try:
        policy = {
            "keep": lambda: memory.KeepOnDevice(),
            "host": lambda: memory.OffloadToHost(threshold=a, kind=host_kind),
            "disk": lambda: memory.OffloadToDisk(host_threshold=a, path=path, kind=host_kind),
            "smart": lambda: memory.SmartOffload(device_budget=a, host_budget=b, path=path, trace=trace,
                                                 kind=host_kind),
            "garbage": lambda: a,
        }[kind]()
    except TensorError:
        return
    where = _viva_or(memory.plan, tree, policy)
    moved = _viva_or(memory.offload, tree, policy)
    assert (where is None) == (moved is None)
    if where is None:
        return
    assert set(where) == {"w", "b"} and set(where.values()) <= {"device", "pinned_host", "unpinned_host", "disk"}
    if kind in ("host", "disk"):
        for name, size in (("w", 1024), ("b", 16)):
            assert (where[name] != "device") == (size > a), (where, a)
    assert memory.tier_of(moved) == where
    for name in tree:
        np.testing.assert_array_equal(np.asarray(memory.load({name: moved[name]})[name]), np.asarray(tree[name]))


_STRATEGY = st.sampled_from(["none", "every", "large", "adaptive", "garbage"])


@FUZZ
@given(_STRATEGY, st.sampled_from([1, 2, 3, 5, 0, -1, 1.5, "2", None, True, 10**9]), st.integers(1, 5))
def test_remat_strategies_give_the_same_values(kind, n, depth):
    ws = jnp.stack([jnp.eye(4) * (0.5 + 0.1 * i) for i in range(depth)])
    x = jnp.arange(8.0).reshape(2, 4)

    def layer(w, h):
        return jnp.tanh(h @ w)

    try:
        strategy = {"none": lambda: memory.NoCheckpoint(), "every": lambda: memory.EveryN(n),
                    "large": lambda: memory.LargeLayersOnly(n), "adaptive": lambda: memory.Adaptive(n),
                    "garbage": lambda: n}[kind]()
    except TensorError:
        return
    segs = _viva_or(memory.checkpoint_plan, layer, ws, x, strategy)
    out = _viva_or(memory.apply_layers, layer, ws, x, strategy=strategy)
    assert (segs is None) == (out is None)
    if out is None:
        return
    assert all(isinstance(s, int) and s >= 0 for s in segs)
    want = np.asarray(x, np.float64)
    for i in range(depth):
        want = np.tanh(want @ np.asarray(ws[i], np.float64))
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda w: memory.apply_layers(layer, w, x, strategy=strategy).sum())(ws)
    g_ref = jax.grad(lambda w: memory.apply_layers(layer, w, x).sum())(ws)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-6)


@FUZZ
@given(st.sampled_from(["device_bytes", "host_bytes", "disk_bytes", "disk_path"]),
       st.sampled_from([0, 1, 2**40, -1, 1.5, "8", True, None, np.int64(5), "/nonexistent/x"]))
@example("disk_path", np.int64(5))  # finding: raw TypeError from os.fspath
@example("device_bytes", "8")  # finding: raw TypeError from "8" <= 0
def test_memory_hierarchy_arguments(name, value):
    h = _viva_or(memory.create_memory_hierarchy, **{name: value})
    if h is None:
        return
    if name != "disk_path" and value is not None:
        assert isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0


@pytest.mark.parametrize("tree", [{"a": "str"}, {"a": None}, [object()], {"a": jnp.ones(2), "b": {1, 2}}])
def test_tree_nbytes_of_odd_trees(tree):
    got = _viva_or(memory.tree_nbytes, tree)
    assert got is None or got == sum(x.nbytes for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "nbytes"))
