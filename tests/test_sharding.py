"""Tests of viva_tensor.sharding on 8 host CPU devices (set by conftest), both mesh axis types."""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from viva_tensor import named, sharding
from viva_tensor._formats.record import QuantizedArray
from viva_tensor.errors import ShardingError

AUTO = (AxisType.Auto, AxisType.Auto)
EXPLICIT = (AxisType.Explicit, AxisType.Explicit)
RULES = [("batch", "data"), ("embed", "model"), ("mlp", "model"), ("seq", None)]


def mesh_of(types):
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=types)


@pytest.fixture(params=["auto", "explicit"])
def mesh(request):
    return mesh_of(AUTO if request.param == "auto" else EXPLICIT)


def assert_sharded(x, mesh, spec):
    want = NamedSharding(mesh, spec)
    assert x.sharding.is_equivalent_to(want, x.ndim), f"{x.sharding} is not {want}"


# ------------------------------------------------------------------------------------- spec


def test_spec_basic():
    m = mesh_of(AUTO)
    t = named.zeros({"batch": 8, "seq": 3, "embed": 4})
    assert sharding.spec(t, RULES, mesh=m) == P("data", None, "model")
    assert sharding.spec(("head", None), RULES) == P(None, None)
    # multi-axis rule, and first match wins
    assert sharding.spec(("batch",), [("batch", ("data", "model")), ("batch", "data")], mesh=m) == P(("data", "model"))
    # a mesh axis shards at most one axis: 'mlp' falls back to its next rule
    rules = [("embed", "model"), ("mlp", "model"), ("mlp", "data")]
    assert sharding.spec(("embed", "mlp"), rules, mesh=m) == P("model", "data")
    assert sharding.spec(("embed", "mlp"), rules[:2], mesh=m) == P("model", None)


def test_spec_errors_and_replicate():
    m = mesh_of(AUTO)
    t = named.zeros({"batch": 6, "embed": 4})
    with pytest.raises(ShardingError,
                       match=r"axis 'batch' of a size divisible by 4 \(mesh axes \('data',\)\), got size 6"):
        sharding.spec(t, RULES, mesh=m)
    assert sharding.spec(t, RULES, mesh=m, on_indivisible="replicate") == P(None, "model")
    with pytest.raises(ShardingError, match=r"mesh axes among \('data', 'model'\), got 'tensor'"):
        sharding.spec(named.zeros({"embed": 4}), [("embed", "tensor")], mesh=m)
    with pytest.raises(ShardingError, match="axis name, mesh axes"):
        sharding.spec(t, [("batch",)], mesh=m)
    with pytest.raises(ShardingError, match="sequence of"):
        sharding.spec(t, {"batch": "data"}, mesh=m)
    with pytest.raises(ShardingError, match="a mesh axis name, a tuple of them, or None"):
        sharding.validate_rules([("batch", 3)])
    with pytest.raises(ShardingError, match="on_indivisible"):
        sharding.spec(t, RULES, mesh=m, on_indivisible="pad")
    with pytest.raises(ShardingError, match="expected a mesh"):
        sharding.shard(t, RULES)


def test_named_sharding_equivalence(mesh):
    t = named.zeros({"batch": 8, "embed": 4, "seq": 2})
    ns = sharding.named_sharding(t, RULES, mesh)
    assert ns.is_equivalent_to(NamedSharding(mesh, P("data", "model")), 3)
    assert not ns.is_equivalent_to(NamedSharding(mesh, P("model", "data")), 3)


# ------------------------------------------------------------------------------------ shard


def test_shard_outside_jit(mesh):
    x = jnp.arange(8 * 4 * 3.0).reshape(8, 4, 3)
    tree = {"t": named.new(x, ("batch", "embed", "seq")), "other": jnp.ones(3)}
    out = sharding.shard(tree, RULES, mesh)
    assert_sharded(out["t"].data, mesh, P("data", "model"))
    assert out["other"] is tree["other"]
    assert out["t"].names == ("batch", "embed", "seq")
    np.testing.assert_array_equal(np.asarray(out["t"].data), np.asarray(x))
    # each device holds one (2, 2, 3) block
    assert {s.data.shape for s in out["t"].data.addressable_shards} == {(2, 2, 3)}


def test_shard_inside_jit(mesh):
    x = jnp.arange(8 * 4.0).reshape(8, 4)
    t = named.new(x, ("batch", "embed"))

    @jax.jit
    def f(t):
        t = sharding.shard(t, RULES, mesh)
        return named.scale(t, 2.0)

    if mesh.axis_types[0] == AxisType.Explicit:
        # JAX needs the mesh context to trace a reshard of an unsharded input on Explicit axes
        with jax.set_mesh(mesh):
            out = f(t)
    else:
        out = f(t)
    assert_sharded(out.data, mesh, P("data", "model"))
    np.testing.assert_array_equal(np.asarray(out.data), 2 * np.asarray(x))
    # an input already on the mesh needs no context, on either axis type
    out2 = f(sharding.shard(t, [("batch", "data")], mesh))
    assert_sharded(out2.data, mesh, P("data", "model"))


def test_shard_with_set_mesh(mesh):
    x = jnp.arange(8 * 4.0).reshape(8, 4)
    with jax.set_mesh(mesh):
        t = sharding.shard(named.new(x, ("batch", "embed")), RULES)  # outside jit, mesh from context
        assert_sharded(t.data, mesh, P("data", "model"))

        @jax.jit
        def f(t):
            return sharding.shard(named.transpose(t, ("embed", "batch")), [("batch", "model"), ("embed", "data")])

        out = f(t)
        assert_sharded(out.data, mesh, P("data", "model"))
        np.testing.assert_array_equal(np.asarray(out.data), np.asarray(x).T)


def test_grad_through_sharded(mesh):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 4)), jnp.float32)
    with jax.set_mesh(mesh):
        t = sharding.shard(named.new(x, ("batch", "embed")), RULES)

        def loss(t):
            t = sharding.shard(t, RULES)
            return (named.sum_along(named.mul(t, t), "embed").data).sum()

        g = jax.jit(jax.grad(loss))(t)
    np.testing.assert_allclose(np.asarray(g.data), 2 * np.asarray(x), rtol=1e-6)


# -------------------------------------------------------------------------------- shard_map


@pytest.mark.parametrize("types", ["auto", "explicit"])
def test_shard_map_by_names(types):
    m = mesh_of(AUTO if types == "auto" else EXPLICIT)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 6, 4)).astype(np.float32)  # batch seq embed
    w = rng.standard_normal((4, 2)).astype(np.float32)  # embed out
    tx = named.new(x, ("batch", "seq", "embed"))
    tw = named.new(w, ("embed", "out"))

    def local(tx, tw):
        # each device: its batch rows, its half of embed; contract then sum the halves
        assert named.sizes(tx) == {"batch": 2, "seq": 6, "embed": 2}
        y = named.dot(tx, tw, over="embed")
        return named.NamedTensor(data=jax.lax.psum(y.data, "model"), names=y.names), jnp.float32(1.0)

    f = sharding.shard_map(local, rules=RULES, mesh=m, out_names=(("batch", "seq", "out"), ()))
    y, one = f(tx, tw)
    assert y.names == ("batch", "seq", "out")
    np.testing.assert_allclose(np.asarray(y.data), np.einsum("bse,eo->bso", x, w), rtol=1e-5, atol=1e-5)
    assert_sharded(y.data, m, P("data"))
    assert float(one) == 1.0


def test_shard_map_with_set_mesh_and_grad():
    m = mesh_of(AUTO)
    x = np.arange(8 * 4.0, dtype=np.float32).reshape(8, 4) / 10
    t = named.new(x, ("batch", "embed"))
    with jax.set_mesh(m):
        f = sharding.shard_map(lambda t: named.map(t, jnp.sin), rules=RULES, out_names=("batch", "embed"))
        g = jax.grad(lambda t: f(t).data.sum())(t)
    np.testing.assert_allclose(np.asarray(g.data), np.cos(x), rtol=1e-6)


# ------------------------------------------------------------------------------------- NNX


class MLP(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(4, 8, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")), rngs=rngs)
        self.down = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


def make_mlp():
    with nnx.use_eager_sharding(False):
        return MLP(nnx.Rngs(0))


def test_param_specs_from_metadata_and_names(mesh):
    model = make_mlp()
    rules = [("embed", "data"), ("mlp", "model"), ("hidden", "model")]
    specs = sharding.param_specs(model, rules, mesh=mesh, names={"down.kernel": ("hidden", "embed")})
    assert specs["up"]["kernel"].get_value() == P("data", "model")
    assert specs["down"]["kernel"].get_value() == P("model", "data")
    assert specs["up"]["bias"].get_value() == P(None)
    with pytest.raises(ShardingError, match=r"unknown paths \['nope.kernel'\]"):
        sharding.param_specs(model, rules, mesh=mesh, names={"nope.kernel": ("a", "b")})
    with pytest.raises(ShardingError, match="2 names for variable 'down.kernel'"):
        sharding.param_specs(model, rules, mesh=mesh, names={"down.kernel": ("a",)})
    # the old spelling with slashes is refused with the dotted one in the hint
    with pytest.raises(ShardingError, match=r"unknown paths \['down/kernel'\].*'down.kernel', not 'down/kernel'"):
        sharding.param_specs(model, rules, mesh=mesh, names={"down/kernel": ("hidden", "embed")})


def test_shard_params_and_run(mesh):
    model = make_mlp()
    x = jnp.asarray(np.random.default_rng(2).standard_normal((8, 4)), jnp.float32)
    want = np.asarray(model(x))
    rules = [("embed", "data"), ("mlp", "model")]
    sharding.shard_params(model, rules, mesh=mesh)
    assert_sharded(model.up.kernel.get_value(), mesh, P("data", "model"))
    assert_sharded(model.down.kernel.get_value(), mesh, P())
    with jax.set_mesh(mesh):
        got = nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- records


@flax.struct.dataclass
class BlockRecord(QuantizedArray):
    """A stand-in record: int8 codes packed 2 per byte along the last axis, a scale per 16 values."""

    codes: jax.Array
    scales: jax.Array
    shape: tuple = flax.struct.field(pytree_node=False)
    dtype: str = flax.struct.field(pytree_node=False, default="float32")
    block_size: int = flax.struct.field(pytree_node=False, default=16)
    format = "test4"
    _core_ndim = staticmethod(lambda r: len(r.shape))


def make_record(rows, cols):
    codes = jnp.arange(rows * cols // 2, dtype=jnp.int32).reshape(rows, cols // 2).astype(jnp.uint8)
    scales = jnp.arange(rows * cols // 16, dtype=jnp.float32).reshape(rows, cols // 16)
    return BlockRecord(codes=codes, scales=scales, shape=(rows, cols))


def test_record_specs_follow_the_tensor(mesh):
    rec = make_record(8, 64)
    s = sharding.record_specs(rec, ("out", "in"), [("out", "data"), ("in", "model")], mesh=mesh)
    assert s.codes == P("data", "model") and s.scales == P("data", "model")
    t = sharding.shard(named.NamedTensor(data=rec, names=("out", "in")), [("out", "data"), ("in", "model")], mesh)
    assert_sharded(t.data.codes, mesh, P("data", "model"))
    assert_sharded(t.data.scales, mesh, P("data", "model"))
    # each device holds the codes and the scales of the same (2, 32) part of the tensor
    for cs, ss in zip(t.data.codes.addressable_shards, t.data.scales.addressable_shards):
        assert cs.device == ss.device
        assert cs.data.shape == (2, 16) and ss.data.shape == (2, 2)
        assert cs.index[0] == ss.index[0]
        assert cs.index[1].start * 2 == ss.index[1].start * 16  # same first value of the tensor


def test_record_specs_straddling_blocks():
    m = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
    rec = make_record(2, 32)  # two scales per row: 8 shards would split a block
    with pytest.raises(ShardingError, match="blocks that do not straddle shards"):
        sharding.record_specs(rec, ("out", "in"), [("in", "model")], mesh=m)
    s = sharding.record_specs(rec, ("out", "in"), [("in", "model")], mesh=m, on_indivisible="replicate")
    assert s.codes == P(None, "model") and s.scales == P(None, None)
    with pytest.raises(ShardingError, match="a quantized record"):
        sharding.record_specs(jnp.zeros(3), ("a",), [], mesh=m)
    with pytest.raises(ShardingError, match="2 names for a record of shape"):
        sharding.record_specs(rec, ("a",), [], mesh=m)


# ------------------------------------------------------------------ real records, every format

FORMATS = {
    "int8_channel_rows": lambda x: __import__("viva_tensor.compression").compression.quantize_int8(x, axis=0),
    "int8_channel_cols": lambda x: __import__("viva_tensor.compression").compression.quantize_int8(x, axis=1),
    "int8_block": lambda x: __import__("viva_tensor.compression").compression.quantize_int8(x, block_size=64),
    "q4_0": lambda x: __import__("viva_tensor.compression").compression.quantize_q4_0(x),
    "q4_1": lambda x: __import__("viva_tensor.compression").compression.quantize_q4_1(x),
    "q8_0": lambda x: __import__("viva_tensor.compression").compression.quantize_q8_0(x),
    "nf4": lambda x: __import__("viva_tensor.nf4").nf4.quantize(x),
    "nf4_double": lambda x: __import__("viva_tensor.nf4").nf4.double_quantize(x),
    "nvfp4": lambda x: __import__("viva_tensor.blackwell").blackwell.quantize_nvfp4(x),
    "mxfp4": lambda x: __import__("viva_tensor.blackwell").blackwell.quantize_mxfp4(x),
}


def dequantize_any(rec):
    from viva_tensor import blackwell, compression, nf4

    mod = {"nf4": nf4, "nf4_dq": nf4, "nvfp4": blackwell, "mxfp4": blackwell}.get(rec.format, compression)
    return mod.dequantize(rec)


def local_record(rec, device, local_shape):
    """The record that one device holds: its buffers' local blocks, the local tensor shape."""
    import dataclasses

    fields = {}
    for f in dataclasses.fields(rec):
        leaf = getattr(rec, f.name)
        if isinstance(leaf, jax.Array):
            (shard,) = [s for s in leaf.addressable_shards if s.device == device]
            fields[f.name] = shard.data
    return rec.replace(**fields, shape=local_shape)


FAST = {"q4_0", "nf4_double", "nvfp4", "int8_channel_cols"}


@pytest.mark.parametrize("fmt", [f if f in FAST else pytest.param(f, marks=pytest.mark.slow) for f in FORMATS])
@pytest.mark.parametrize("two_axes", [False, True], ids=["rows", "rows+cols"])
def test_real_records_shard_consistently(fmt, two_axes):
    """Each device's codes and scales dequantize to exactly its block of the whole tensor."""
    pytest.importorskip("viva_tensor.compression")
    pytest.importorskip("viva_tensor.nf4")
    pytest.importorskip("viva_tensor.blackwell")
    m = mesh_of(AUTO)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((8, 256)), jnp.float32)
    rec = FORMATS[fmt](x)
    rules = [("out", "data"), ("in", "model")] if two_axes else [("out", "data")]
    flat = fmt.startswith(("q", "nf4")) or fmt == "int8_block"
    t = named.NamedTensor(data=rec, names=("out", "in"))
    if two_axes and flat:
        # a flat list of blocks cannot follow a split of the second axis: an error, or replication
        with pytest.raises(ShardingError, match="do not straddle shards"):
            sharding.shard(t, rules, m)
        placed = sharding.shard(t, rules, m, on_indivisible="replicate")
        full = np.asarray(dequantize_any(placed.data))
        np.testing.assert_array_equal(full, np.asarray(dequantize_any(rec)))
        return
    placed = sharding.shard(t, rules, m)
    whole = np.asarray(dequantize_any(rec))
    tensor_spec = sharding.spec(named.new(x, ("out", "in")), rules, mesh=m)
    tensor = jax.device_put(x, NamedSharding(m, tensor_spec))
    for shard in tensor.addressable_shards:
        local = local_record(placed.data, shard.device, shard.data.shape)
        np.testing.assert_array_equal(np.asarray(dequantize_any(local)), whole[shard.index], err_msg=str(shard.device))
    # the buffers really are split (not all replicated) along the rows
    biggest = max(jax.tree.leaves(placed.data), key=lambda a: a.size)
    assert biggest.addressable_shards[0].data.size < biggest.size


def test_nnx_model_holding_a_quantized_record():
    compression = pytest.importorskip("viva_tensor.compression")
    m = mesh_of(AUTO)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((8, 64)), jnp.float32)

    class QLinear(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(compression.quantize_q8_0(x))

    model = QLinear()
    specs = sharding.param_specs(model, [("out", "data")], mesh=m, names={"w": ("out", "in")})
    assert specs["w"].get_value().qs == P("data", None) and specs["w"].get_value().d == P("data")
    sharding.shard_params(model, [("out", "data")], mesh=m, names={"w": ("out", "in")})
    rec = model.w.get_value()
    assert rec.qs.sharding.is_equivalent_to(NamedSharding(m, P("data", None)), 2)
    np.testing.assert_array_equal(np.asarray(compression.dequantize(rec)),
                                  np.asarray(compression.dequantize(compression.quantize_q8_0(x))))


@given(
    st.lists(st.sampled_from(["batch", "seq", "embed", "mlp", None]), min_size=1, max_size=4),
    st.lists(st.tuples(st.sampled_from(["batch", "seq", "embed", "mlp"]),
                       st.sampled_from([None, "data", "model", ("data", "model"), ("model", "data")])), max_size=6),
)
def test_spec_invariants(names, rules):
    """Each mesh axis shards at most one axis; each axis gets the first free rule for its name."""
    names = [n for i, n in enumerate(names) if n is None or n not in names[:i]]
    m = mesh_of(AUTO)
    s = sharding.spec(tuple(names), rules, mesh=m)
    assert len(s) == len(names)
    used = [a for e in s if e is not None for a in ((e,) if isinstance(e, str) else e)]
    assert len(used) == len(set(used))
    taken: set = set()
    for n, e in zip(names, s):
        want = None
        for rn, axes in rules:
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            if n is not None and rn == n and not taken & set(axes):
                want = axes
                break
        want = None if not want else want[0] if len(want) == 1 else tuple(want)
        assert e == want
        if want:
            taken |= {want} if isinstance(want, str) else set(want)
