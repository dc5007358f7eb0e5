"""Tests of viva_tensor.memory: tiers that really hold the data, policies, streaming, rematerialisation.

References are independent of the code under test: NumPy forward passes in float64, the safetensors
library's own reader, byte counts and LRU plans worked out by hand in the comments.
"""

import json
import os
import types

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import tolerance
from hypothesis import given
from hypothesis import strategies as st

from viva_tensor import compression, memory
from viva_tensor.errors import CheckpointError, ConfigError, InvalidOp

KINDS = ("device", "pinned_host", "unpinned_host")


def _q4_0():
    """GGML Q4_0 (quantize, dequantize)."""
    return compression.quantize_q4_0, compression.dequantize


def _bits(a):
    """The raw bytes of an array, as uint8 (to compare bit for bit, NaNs included)."""
    return np.ascontiguousarray(np.asarray(a)).view(np.uint8).reshape(-1)


# ---------------------------------------------------------------------------------------------- tiers


@pytest.mark.parametrize("tier", KINDS)
def test_place_lands_in_the_memory_kind(tier, dtype, rng):
    w = rng.standard_normal((8, 4)).astype(dtype)
    tree = {"w": jnp.asarray(w), "b": [np.arange(4, dtype=np.int8)]}
    out = memory.place(tree, tier)
    for leaf in jax.tree_util.tree_leaves(out):
        assert leaf.sharding.memory_kind == tier
    np.testing.assert_array_equal(_bits(out["w"]), _bits(w))
    np.testing.assert_array_equal(np.asarray(out["b"][0]), np.arange(4))
    assert set(memory.tier_of(out).values()) == {tier}


def test_place_keeps_a_multi_device_sharding():
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    x = jax.device_put(jnp.arange(16.0), sharding)
    host = memory.place(x, "pinned_host")
    assert host.sharding.memory_kind == "pinned_host"
    assert host.sharding.is_equivalent_to(sharding.with_memory_kind("pinned_host"), 1)
    back = memory.place(host, "device")
    assert back.sharding.memory_kind == "device"
    np.testing.assert_array_equal(np.asarray(back), np.arange(16.0))


def test_place_on_a_chosen_device():
    d = jax.devices()[3]
    out = memory.place(np.ones(3, np.float32), "unpinned_host", device=d)
    assert out.devices() == {d} and out.sharding.memory_kind == "unpinned_host"


def test_place_returns_an_array_already_there_unchanged():
    x = jnp.ones(3)
    assert memory.place(x, "device") is x


DISK_DTYPES = ["float32", "bfloat16", "float16", "int8", "uint8", "int32", "bool", "float8_e4m3fn",
               "float8_e5m2", "float4_e2m1fn", "float8_e8m0fnu"]


@given(
    dtype=st.sampled_from(DISK_DTYPES),
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple),
    seed=st.integers(0, 2**31 - 1),
)
def test_disk_round_trip_is_bit_exact(tmp_path_factory, dtype, shape, seed):
    dt = np.dtype(getattr(ml_dtypes, dtype, None) or dtype)
    raw = np.random.default_rng(seed).integers(0, 256, size=int(np.prod(shape)) * dt.itemsize, dtype=np.uint8)
    if dtype == "bool":
        raw = raw % 2
    if dtype == "float4_e2m1fn":
        raw = raw % 16  # an unpacked float4 byte uses its low nibble
    a = raw.view(dt).reshape(shape)
    path = tmp_path_factory.mktemp("disk") / "t.safetensors"
    handles = memory.place({"a": jnp.asarray(a), "n": [a]}, "disk", path=path)
    assert jax.tree_util.tree_leaves(handles) == []  # nothing left in memory
    assert handles["a"].path == str(path) and handles["a"].shape == shape and handles["a"].dtype == dtype
    back = memory.load(handles)
    for leaf in (back["a"], back["n"][0]):
        assert leaf.dtype == dt and leaf.shape == shape
        np.testing.assert_array_equal(_bits(leaf), _bits(a))


def test_disk_file_is_read_by_the_safetensors_library(tmp_path, rng):
    safetensors = pytest.importorskip("safetensors")
    w = rng.standard_normal((3, 5)).astype(np.float32)
    b = rng.standard_normal(5).astype(ml_dtypes.bfloat16)
    memory.place({"w": w, "b": jnp.asarray(b)}, "disk", path=tmp_path / "m.safetensors")
    with safetensors.safe_open(str(tmp_path / "m.safetensors"), framework="numpy") as f:
        np.testing.assert_array_equal(f.get_tensor("w"), w)
    with safetensors.safe_open(str(tmp_path / "m.safetensors"), framework="flax") as f:
        np.testing.assert_array_equal(_bits(f.get_tensor("b")), _bits(b))


def test_disk_handles_move_to_host_kinds_directly(tmp_path):
    handles = memory.place({"w": jnp.arange(6.0)}, "disk", path=tmp_path / "w.safetensors")
    out = memory.place(handles, "pinned_host")
    assert out["w"].sharding.memory_kind == "pinned_host"
    np.testing.assert_array_equal(np.asarray(out["w"]), np.arange(6.0))
    again = memory.place(handles, "disk", path=tmp_path / "w.safetensors")  # rewriting its own file
    np.testing.assert_array_equal(np.asarray(memory.load(again)["w"]), np.arange(6.0))


def test_quantized_records_move_whole(tmp_path, rng):
    quantize, dequantize = _q4_0()
    w = jnp.asarray(rng.standard_normal((8, 64)).astype(np.float32))
    q = quantize(w)
    tree = {"q": q, "bias": jnp.zeros(8)}
    host = memory.place(tree, "pinned_host")
    assert type(host["q"]) is type(q)
    assert {leaf.sharding.memory_kind for leaf in jax.tree_util.tree_leaves(host["q"])} == {"pinned_host"}
    assert memory.tier_of(host) == {"bias": "pinned_host", "q": "pinned_host"}
    handles = memory.place(host, "disk", path=tmp_path / "q.safetensors")
    back = memory.load(handles)
    for got, want in zip(jax.tree_util.tree_leaves(back["q"]), jax.tree_util.tree_leaves(q), strict=False):
        np.testing.assert_array_equal(_bits(got), _bits(want))
    np.testing.assert_array_equal(np.asarray(dequantize(back["q"])), np.asarray(dequantize(q)))


def test_tree_nbytes_counts_every_buffer(tmp_path):
    tree = {"a": jnp.ones((3, 4)), "b": np.ones(5, np.int8), "c": jax.ShapeDtypeStruct((2,), jnp.bfloat16)}
    assert memory.tree_nbytes(tree) == 48 + 5 + 4
    handles = memory.place({"a": tree["a"]}, "disk", path=tmp_path / "a.safetensors")
    assert memory.tree_nbytes(handles) == 48


def test_paths_are_dotted_everywhere(tmp_path):
    """Tier maps, plans and file tensor names spell paths as viva_tensor._paths.path_str: "layers.0.w"."""
    quantize, _ = _q4_0()
    tree = {"layers": [{"w": jnp.ones((4, 32)), "q": quantize(jnp.ones((4, 32)))}], "head": (jnp.ones(2),)}
    units = ["head.0", "layers.0.q", "layers.0.w"]
    assert list(memory.tier_of(tree)) == units
    assert list(memory.plan(tree, memory.KeepOnDevice())) == units
    assert memory.plan(tree, memory.SmartOffload(10**6, trace=("layers.0.w",)))["layers.0.w"] == "device"
    handles = memory.place(tree, "disk", path=tmp_path / "t.safetensors")
    assert handles["layers"][0]["w"].key == "layers.0.w"
    assert handles["layers"][0]["q"].qs.key == "layers.0.q.qs"
    safetensors = pytest.importorskip("safetensors")
    with safetensors.safe_open(str(tmp_path / "t.safetensors"), framework="numpy") as f:
        assert set(f.keys()) == {"head.0", "layers.0.w", "layers.0.q.qs", "layers.0.q.d"}


def test_disk_single_array_and_reserved_names(tmp_path):
    handle = memory.place(jnp.arange(3.0), "disk", path=tmp_path / "one.safetensors")
    assert isinstance(handle, memory.DiskArray) and handle.key == "array"
    np.testing.assert_array_equal(np.asarray(memory.load(handle)), np.arange(3.0))
    with pytest.raises(ConfigError, match="argument 'tree': expected no leaf whose path is '__metadata__'"):
        memory.place({"__metadata__": jnp.ones(2)}, "disk", path=tmp_path / "m.safetensors")


def test_paths_that_spell_the_same_are_refused(tmp_path):
    clash = {"a.b": jnp.ones(2), "a": {"b": jnp.zeros(2)}}
    for call in (memory.tier_of, lambda t: memory.plan(t, memory.KeepOnDevice()),
                 lambda t: memory.place(t, "disk", path=tmp_path / "c.safetensors")):
        with pytest.raises(ConfigError, match="argument 'tree': expected leaves with distinct dotted paths.*'a.b'"):
            call(clash)


def test_tier_of_reports_mixed_records():
    quantize, _ = _q4_0()
    q = quantize(jnp.ones((4, 32)))
    leaves, treedef = jax.tree_util.tree_flatten(q)
    split = jax.tree_util.tree_unflatten(treedef, [memory.place(leaves[0], "pinned_host")] + leaves[1:])
    tree = {"q": split, "x": memory.place(jnp.ones(2), "unpinned_host"), "y": np.ones(2)}
    assert memory.tier_of(tree) == {"q": "mixed", "x": "unpinned_host", "y": "numpy"}


def test_place_errors(tmp_path):
    with pytest.raises(ConfigError, match="argument 'tier': expected one of"):
        memory.place(jnp.ones(2), "gpu")
    with pytest.raises(ConfigError, match="argument 'path': expected a file path"):
        memory.place(jnp.ones(2), "disk")
    with pytest.raises(InvalidOp, match="expected leaves that are arrays, got str"):
        memory.place({"a": "text"}, "device")
    with pytest.raises(InvalidOp, match="call it outside jit"):
        jax.jit(lambda x: memory.place(x, "pinned_host"))(jnp.ones(2))
    with pytest.raises(ConfigError, match="expected a memory kind"):
        memory.load(jnp.ones(2), tier="disk")
    no_host = types.SimpleNamespace(addressable_memories=lambda: [types.SimpleNamespace(kind="device")])
    with pytest.raises(ConfigError, match="argument 'tier': expected a memory kind of .*, got pinned_host"):
        memory.place(np.ones(2), "pinned_host", device=no_host)


def test_disk_errors(tmp_path):
    path = tmp_path / "w.safetensors"
    handles = memory.place({"w": jnp.arange(64.0)}, "disk", path=path)
    with pytest.raises(CheckpointError, match="argument 'path': expected an existing file, got .* \\(no such file\\)"):
        memory.load(handles["w"].replace(path=str(tmp_path / "missing.safetensors")))
    with pytest.raises(CheckpointError, match="argument 'key': expected a tensor of .*\\['w'\\]\\), got 'v'"):
        memory.load(handles["w"].replace(key="v"))
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="is truncated"):
        memory.load(handles)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="is not a safetensors file"):
        memory.load(handles)


# ------------------------------------------------------------------------------------ disk integrity


def _rewrite_header(path, edit):
    """Rewrites a safetensors file's JSON header with ``edit(header)``, keeping its data bytes."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data[8 + n:])


def _two_tensors(tmp_path):
    path = tmp_path / "t.safetensors"
    return path, memory.place({"a": jnp.arange(4.0), "b": jnp.arange(4.0) + 10}, "disk", path=path)


def test_disk_flipped_byte_is_refused(tmp_path):
    path, handles = _two_tensors(tmp_path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte of "b"
    path.write_bytes(bytes(data))
    np.testing.assert_array_equal(np.asarray(memory.load(handles["a"])), np.arange(4.0))  # "a" is intact
    with pytest.raises(CheckpointError, match="the bytes of tensor 'b' do not match their SHA-256"):
        memory.load(handles)


@pytest.mark.parametrize("offsets, match", [
    ([-8, 8], "data_offsets \\[-8, 8\\], not \\[begin, end\\]"),  # reads the header's bytes as data
    ([8, 24], "overlaps the tensor before it"),  # "b" overlapping the second half of "a"
    ([0, 16], "overlaps the tensor before it"),  # "b" read from "a"'s bytes
    ([16, 30], "needs 16 bytes, its data_offsets span 14"),
    ([16, 32, 48], "not \\[begin, end\\]"),
])
def test_disk_bad_data_offsets_are_refused(tmp_path, offsets, match):
    path, handles = _two_tensors(tmp_path)
    _rewrite_header(path, lambda h: h["b"].update(data_offsets=offsets))
    with pytest.raises(CheckpointError, match=match):
        memory.load(handles)


def test_disk_edited_header_or_metadata_is_refused(tmp_path):
    path, handles = _two_tensors(tmp_path)
    _rewrite_header(path, lambda h: h["b"].update(dtype="I32"))  # the same bytes, read as int32
    with pytest.raises(CheckpointError, match="its header or metadata was changed"):
        memory.load(handles)
    path, handles = _two_tensors(tmp_path)
    _rewrite_header(path, lambda h: h["b"].update(shape=[2, 2]))
    with pytest.raises(CheckpointError, match="its header or metadata was changed"):
        memory.load(handles)


def test_disk_old_handle_of_a_replaced_file_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    old = memory.place({"w": jnp.arange(4.0)}, "disk", path=path)
    memory.place({"w": jnp.arange(4, dtype=jnp.int32)}, "disk", path=path)  # another tree, the same file
    with pytest.raises(CheckpointError, match="argument 'path': .*rewritten since: its 'w' is int32\\[4\\] in the "
                                              "file, the handle says float32\\[4\\]"):
        memory.load(old)
    memory.place({"w": jnp.arange(4.0) + 1}, "disk", path=path)  # the same dtype and shape, other values
    with pytest.raises(CheckpointError, match="rewritten since: its 'w' is another array"):
        memory.load(old)
    same = memory.place({"w": jnp.arange(4.0)}, "disk", path=path)  # the same data again: the old handle holds
    assert same["w"] == old["w"]
    np.testing.assert_array_equal(np.asarray(memory.load(old)["w"]), np.arange(4.0))


def test_disk_handle_cannot_reinterpret_a_tensor(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    foreign = tmp_path / "foreign.safetensors"
    safetensors_numpy.save_file({"w": np.arange(4, dtype=np.float32)}, str(foreign))
    hand_made = memory.DiskArray(path=str(foreign), key="w", shape=(4,), dtype="float32")
    np.testing.assert_array_equal(np.asarray(memory.load(hand_made)), np.arange(4.0))
    with pytest.raises(CheckpointError, match="argument 'dtype': expected the dtype of tensor 'w' of .*, got "
                                              "float32\\[4\\] in the file, the handle says int32\\[4\\]"):
        memory.load(hand_made.replace(dtype="int32"))
    with pytest.raises(CheckpointError, match="argument 'shape': expected the shape of tensor 'w'"):
        memory.load(hand_made.replace(shape=(2, 2)))
    own = memory.place({"w": jnp.arange(4.0)}, "disk", path=tmp_path / "own.safetensors")["w"]
    for edited, field in ((own.replace(dtype="int32"), "dtype"), (own.replace(dtype="uint8", shape=(16,)), "dtype"),
                          (own.replace(shape=(2, 2)), "shape")):
        with pytest.raises(CheckpointError, match=f"argument '{field}'"):
            memory.load(edited)


@pytest.mark.parametrize("field, value, match", [
    ("dtype", "__version__", "argument 'dtype': expected a dtype name"),
    ("dtype", "foo", "argument 'dtype': expected a dtype name"),
    ("shape", (-1,), "argument 'shape': expected a tuple of non-negative ints"),
    ("shape", [4], "argument 'shape'"),
    ("key", None, "argument 'key': expected a str"),
    ("path", None, "argument 'path': expected a str"),
    ("sha256", 7, "argument 'sha256'"),
])
def test_disk_malformed_handle_fields(tmp_path, field, value, match):
    h = memory.place({"w": jnp.arange(4.0)}, "disk", path=tmp_path / "w.safetensors")["w"]
    bad = h.replace(**{field: value})
    with pytest.raises(CheckpointError, match=match):
        memory.load(bad)
    with pytest.raises(CheckpointError, match=match):
        memory.tree_nbytes(bad)


@pytest.mark.parametrize("header, match", [
    (b"[1, 2]", "its header is not a JSON object"),  # was an AttributeError
    (b'{"w": {"dtype": "F32", "shape": [4]}}', "needs exactly 'dtype', 'shape' and 'data_offsets'"),  # KeyError
    (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8, 16]}}', "not \\[begin, end\\]"),  # ValueError
    (b'{"w": "F32"}', "needs exactly"),
    (b'{"w": {"dtype": "F99", "shape": [4], "data_offsets": [0, 16]}}', "has dtype 'F99'"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),  # was a RecursionError
    (b'{"a": ' * 100 + b"1" + b"}" * 100, "nested too deeply"),
    (b"\xff\xfe", "is not valid JSON"),
])
def test_disk_malformed_headers_are_checkpoint_errors(tmp_path, header, match):
    path = tmp_path / "w.safetensors"
    handle = memory.place({"w": jnp.arange(4.0)}, "disk", path=path)["w"]
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match=match):
        memory.load(handle)


def test_disk_os_errors_are_checkpoint_errors(tmp_path):
    handle = memory.place({"w": jnp.arange(4.0)}, "disk", path=tmp_path / "w.safetensors")["w"]
    (tmp_path / "dir").mkdir()
    with pytest.raises(CheckpointError, match="argument 'path': expected a regular file"):  # was IsADirectoryError
        memory.load(handle.replace(path=str(tmp_path / "dir")))
    with pytest.raises(CheckpointError, match="argument 'path': expected a file that can be written"):
        memory.place({"w": jnp.ones(2)}, "disk", path=tmp_path / "dir")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(CheckpointError, match="argument 'path': expected a file that can be written"):
        memory.place({"w": jnp.ones(2)}, "disk", path=tmp_path / "file" / "w.safetensors")
    with pytest.raises(ConfigError, match="argument 'path': expected a file path for the disk tier, got int"):
        memory.place({"w": jnp.ones(2)}, "disk", path=3)


def _denied(*args, **kwargs):
    raise PermissionError(13, "Permission denied")


def test_disk_permission_errors_are_checkpoint_errors(tmp_path, monkeypatch):
    """Root reads and writes anything, so the refusals of the OS are simulated where the file is opened."""
    from viva_tensor import _safetensors

    handle = memory.place({"w": jnp.arange(4.0)}, "disk", path=tmp_path / "w.safetensors")["w"]
    with monkeypatch.context() as m:
        m.setattr(_safetensors, "open", _denied, raising=False)  # shadows the builtin in that module only
        with pytest.raises(CheckpointError, match="argument 'path': expected a readable file, got .*permission denied"):
            memory.load(handle)
        with pytest.raises(CheckpointError, match="argument 'path': expected a file that can be written, got "
                                                  ".*Permission denied"):
            memory.place({"w": jnp.ones(2)}, "disk", path=tmp_path / "v.safetensors")
    real_stat = os.stat
    with monkeypatch.context() as m:  # a folder without search permission: stat itself is refused
        m.setattr(os, "stat", lambda p, *a, **k: _denied() if str(p) == handle.path else real_stat(p, *a, **k))
        with pytest.raises(CheckpointError, match="permission denied"):
            memory.load(handle)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores file permissions")
def test_disk_real_permission_errors(tmp_path):
    handle = memory.place({"w": jnp.arange(4.0)}, "disk", path=tmp_path / "w.safetensors")["w"]
    os.chmod(handle.path, 0)
    with pytest.raises(CheckpointError, match="permission denied"):
        memory.load(handle)
    os.chmod(handle.path, 0o600)
    os.chmod(tmp_path, 0o600)  # no search permission: the file is there, it cannot be reached
    try:
        with pytest.raises(CheckpointError, match="permission denied"):
            memory.load(handle)
    finally:
        os.chmod(tmp_path, 0o700)


_FUZZ_TREE = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.arange(5, dtype=np.int8),
              "c": np.linspace(-6, 6, 8).astype(ml_dtypes.float4_e2m1fn)}


def _truncate(data, draw):
    return data[: draw(st.integers(0, len(data) - 1))]


def _overwrite(data, draw):
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
    return bytes(out)


def _random_file(data, draw):
    return draw(st.binary(max_size=256))


def _header_length(data, draw):
    n = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, len(data))))
    return n.to_bytes(8, "little") + data[8:]


def _bad_json(data, draw):
    n = int.from_bytes(data[:8], "little")
    blob = draw(st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode),
                          st.sampled_from([b"{", b"null", b"[]", b'{"a": 1}', b'{"__metadata__": []}', b"{}",
                                           b'{"a": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]}}'])))
    return len(blob).to_bytes(8, "little") + blob + data[8 + n:]


def _bad_entry(data, draw):
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = draw(st.sampled_from(["a", "b", "c"]))
    field = draw(st.sampled_from(["data_offsets", "shape", "dtype"]))
    ints = st.integers(-2**63, 2**64)
    header[name][field] = draw({
        "data_offsets": st.lists(st.one_of(ints, st.integers(-64, 128)), max_size=3),
        "shape": st.lists(st.one_of(ints, st.integers(-2, 16)), max_size=3),
        "dtype": st.sampled_from(["F32", "I8", "U8", "F16", "BF16", "I64", "BOOL", "F8_E4M3", "x", ""]),
    }[field])
    blob = json.dumps(header).encode()
    return len(blob).to_bytes(8, "little") + blob + data[8 + n:]


_MUTATIONS = [_truncate, _overwrite, _random_file, _header_length, _bad_json, _bad_entry]


@given(mutation=st.sampled_from(_MUTATIONS), draw=st.data())
def test_fuzz_malformed_disk_files_give_checkpoint_error_or_the_right_array(tmp_path_factory, mutation, draw):
    """Whatever is done to the file, loading a handle raises CheckpointError or gives the array written."""
    path = tmp_path_factory.mktemp("fuzz") / "t.safetensors"
    handles = memory.place(_FUZZ_TREE, "disk", path=path)
    path.write_bytes(mutation(path.read_bytes(), draw.draw))
    for key, handle in handles.items():
        try:
            got = memory.load(handle)
        except CheckpointError:
            continue
        assert got.dtype == _FUZZ_TREE[key].dtype and got.shape == _FUZZ_TREE[key].shape
        np.testing.assert_array_equal(_bits(got), _bits(_FUZZ_TREE[key]))


@given(field=st.sampled_from(["key", "shape", "dtype", "sha256"]), draw=st.data())
def test_fuzz_edited_handles_give_checkpoint_error_or_the_right_array(tmp_path_factory, field, draw):
    path = tmp_path_factory.mktemp("fuzz") / "t.safetensors"
    handles = memory.place(_FUZZ_TREE, "disk", path=path)
    value = draw.draw({
        "key": st.one_of(st.sampled_from(["a", "b", "c", "", "__metadata__"]), st.text(max_size=4)),
        "shape": st.one_of(st.lists(st.integers(-1, 12), max_size=3).map(tuple), st.none()),
        "dtype": st.sampled_from(["float32", "int8", "uint8", "float4_e2m1fn", "bfloat16", "int32", "bool",
                                  "__version__", "float8_e4m3fn", "", "x"]),
        "sha256": st.one_of(st.none(), st.text(max_size=8), st.sampled_from([h.sha256 for h in handles.values()])),
    }[field])
    for key, handle in handles.items():
        try:
            got = memory.load(handle.replace(**{field: value}))
        except CheckpointError:
            continue
        assert got.dtype == _FUZZ_TREE[key].dtype and got.shape == _FUZZ_TREE[key].shape
        np.testing.assert_array_equal(_bits(got), _bits(_FUZZ_TREE[key]))


# ------------------------------------------------------------------------------------------ hierarchy


def test_hierarchy_from_the_cpu_device(tmp_path):
    h = memory.create_memory_hierarchy(disk_path=tmp_path)
    device = jax.devices()[0]
    assert h.platform == "cpu"
    assert h.memory_kinds == tuple(m.kind for m in device.addressable_memories())
    with open("/proc/meminfo") as f:  # an independent reading of the RAM: MemTotal in kB
        total = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    assert abs(h.capacity("device") - total) / total < 0.05
    assert h.capacity("pinned_host") == h.capacity("unpinned_host") == h.capacity("device")
    assert h.tiers[0].source.startswith("physical RAM")
    assert 0 < h.capacity("disk") <= os.statvfs(tmp_path).f_blocks * os.statvfs(tmp_path).f_frsize


def test_hierarchy_prefers_memory_stats_then_explicit():
    fake = types.SimpleNamespace(
        platform="gpu", memory_stats=lambda: {"bytes_limit": 123456, "bytes_in_use": 789},
        addressable_memories=lambda: [types.SimpleNamespace(kind="device")], __str__=None,
    )
    h = memory.create_memory_hierarchy(fake)
    assert h.tiers[0].capacity_bytes == 123456 and h.tiers[0].used_bytes == 789
    assert h.tiers[0].source == "memory_stats()['bytes_limit']"
    h = memory.create_memory_hierarchy(fake, device_bytes=1000, host_bytes=2000, disk_bytes=3000)
    assert [t.capacity_bytes for t in h.tiers] == [1000, 2000, 3000]
    assert {t.source for t in h.tiers} == {"explicit"}
    silent = types.SimpleNamespace(platform="tpu", memory_stats=lambda: None, addressable_memories=lambda: [])
    with pytest.raises(ConfigError, match="argument 'device_bytes': expected a capacity"):
        memory.create_memory_hierarchy(silent)
    with pytest.raises(ConfigError, match="argument 'host_bytes': expected a positive"):
        memory.create_memory_hierarchy(host_bytes=0)
    with pytest.raises(ConfigError, match="expected one of"):
        h.capacity("gpu")


# ------------------------------------------------------------------------------------------- policies

# Units of 400, 800 and 1200 bytes (100, 200 and 300 float32).
TREE = {"a": jnp.ones(100), "b": jnp.ones(200), "c": jnp.ones(300)}
A, B, C = "a", "b", "c"  # dotted paths (viva_tensor._paths.path_str)


def test_keep_on_device_and_thresholds():
    assert memory.plan(TREE, memory.KeepOnDevice()) == {A: "device", B: "device", C: "device"}
    # strictly larger than the threshold goes down: b (800 bytes) at threshold 800 stays
    assert memory.plan(TREE, memory.OffloadToHost(800)) == {A: "device", B: "device", C: "pinned_host"}
    assert memory.plan(TREE, memory.OffloadToHost(0, kind="unpinned_host")) == dict.fromkeys((A, B, C),
                                                                                            "unpinned_host")
    assert memory.plan(TREE, memory.OffloadToDisk(500, "x")) == {A: "pinned_host", B: "disk", C: "disk"}


def test_smart_offload_is_least_recently_used():
    # a, b, c touched in order under 2000 bytes: c (1200) pushes a (the oldest) out.
    assert memory.plan(TREE, memory.SmartOffload(2000)) == {A: "pinned_host", B: "device", C: "device"}
    # trace c, a, b, a: b pushes out c (the oldest), then a is touched again.
    trace = (C, A, B, A)
    assert memory.plan(TREE, memory.SmartOffload(2000, trace=trace)) == {A: "device", B: "device",
                                                                        C: "pinned_host"}
    # device 1000, host 500: a then b evicts a to host (400 fits); c is larger than the device budget,
    # goes to host, and host (1600 > 500) drops a then c itself to disk.
    policy = memory.SmartOffload(1000, host_budget=500, path="unused")
    assert memory.plan(TREE, policy) == {A: "disk", B: "device", C: "disk"}
    # an untouched unit stays where it started: in host, or on disk past the host budget
    assert memory.plan(TREE, memory.SmartOffload(2000, host_budget=1300, path="p", trace=(A,))) == {
        A: "device", B: "pinned_host", C: "disk"}


@given(sizes=st.lists(st.integers(1, 64), min_size=1, max_size=8), budget=st.integers(0, 300),
       host=st.one_of(st.none(), st.integers(0, 300)), seed=st.integers(0, 1000))
def test_smart_offload_invariants(sizes, budget, host, seed):
    tree = [jax.ShapeDtypeStruct((n,), jnp.float32) for n in sizes]
    keys = [str(i) for i in range(len(sizes))]
    trace = tuple(np.random.default_rng(seed).choice(keys, size=2 * len(keys)))
    policy = memory.SmartOffload(budget, host_budget=host, path="p", trace=trace)
    where = memory.plan(tree, policy)
    assert where == memory.plan(tree, policy)  # deterministic
    nbytes = dict(zip(keys, (4 * n for n in sizes), strict=False))
    assert sum(nbytes[k] for k, t in where.items() if t == "device") <= budget
    if host is not None:
        assert sum(nbytes[k] for k, t in where.items() if t == "pinned_host") <= host
    assert all(where[k] != "device" for k in keys if nbytes[k] > budget)
    # the most recently touched unit that fits is on the device
    fits = [k for k in trace if nbytes[k] <= budget]
    if fits:
        assert where[fits[-1]] == "device"


def test_offload_moves_as_planned(tmp_path):
    path = tmp_path / "off.safetensors"
    for policy in (memory.KeepOnDevice(), memory.OffloadToHost(500), memory.OffloadToDisk(500, str(path)),
                   memory.SmartOffload(1000, host_budget=500, path=str(path))):
        moved = memory.offload(TREE, policy)
        assert memory.tier_of(moved) == memory.plan(TREE, policy)
        back = memory.load(moved)
        for k in TREE:
            np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(TREE[k]))


def test_offload_places_quantized_records_whole(tmp_path):
    quantize, _ = _q4_0()
    q = quantize(jnp.ones((16, 64)))  # 32 blocks of 16 bytes of codes + a 2-byte scale: 576 bytes
    tree = {"q": q, "b": jnp.ones(4)}
    assert memory.plan(tree, memory.OffloadToHost(100)) == {"b": "device", "q": "pinned_host"}
    moved = memory.offload(tree, memory.OffloadToDisk(100, str(tmp_path / "q.safetensors")))
    assert memory.tier_of(moved) == {"b": "pinned_host", "q": "disk"}


def test_policy_errors():
    with pytest.raises(ConfigError, match="argument 'threshold': expected a number of bytes >= 0, got -1"):
        memory.plan(TREE, memory.OffloadToHost(-1))
    with pytest.raises(ConfigError, match="argument 'kind'"):
        memory.plan(TREE, memory.OffloadToHost(1, kind="device"))
    with pytest.raises(ConfigError, match="argument 'policy': expected KeepOnDevice"):
        memory.plan(TREE, "lru")
    with pytest.raises(ConfigError, match="argument 'trace'"):
        memory.plan(TREE, memory.SmartOffload(10, trace=("z",)))
    with pytest.raises(ConfigError, match="argument 'path'.*larger host_budget"):
        memory.plan(TREE, memory.SmartOffload(10, host_budget=10))
    small = memory.create_memory_hierarchy(device_bytes=1000)
    with pytest.raises(ConfigError, match="expected at most 1000 bytes on device, got 2400 bytes"):
        memory.plan(TREE, memory.KeepOnDevice(), hierarchy=small)
    assert memory.plan(TREE, memory.OffloadToHost(500), hierarchy=small)[C] == "pinned_host"


# ------------------------------------------------------------------------------------------ streaming

DEPTH, WIDTH, BATCH = 8, 64, 4


def _mlp_layers(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [{"w": (rng.standard_normal((WIDTH, WIDTH)) / 8).astype(dtype),
             "b": (rng.standard_normal((1, WIDTH)) / 8).astype(dtype)} for _ in range(DEPTH)]


def _mlp(p, x):
    return jnp.tanh(x @ p["w"] + p["b"])


def _numpy_mlp(layers, x):
    x = np.asarray(x, np.float64)
    for p in layers:
        x = np.tanh(x @ np.asarray(p["w"], np.float64) + np.asarray(p["b"], np.float64))
    return x


@pytest.mark.parametrize("source", ["pinned_host", "unpinned_host", "disk", "numpy"])
def test_stream_under_a_quarter_budget(source, dtype, tmp_path):
    layers = _mlp_layers(dtype)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((BATCH, WIDTH)).astype(dtype))
    total = sum(p["w"].nbytes + p["b"].nbytes for p in layers)
    budget = total // 4  # exactly two layers
    if source == "disk":
        held = [memory.place(p, "disk", path=tmp_path / f"l{i}.safetensors") for i, p in enumerate(layers)]
    elif source == "numpy":
        held = layers
    else:
        held = [memory.place(p, source) for p in layers]
    f = jax.jit(_mlp)
    y, stats = memory.stream(f, held, x, budget_bytes=budget, return_stats=True)
    expected = x
    for p in layers:  # the in-memory run: every layer on the device
        expected = f(jax.tree_util.tree_map(jnp.asarray, p), expected)
    np.testing.assert_array_equal(_bits(y), _bits(expected))
    rtol, atol = tolerance(dtype)
    np.testing.assert_allclose(np.asarray(y, np.float64), _numpy_mlp(layers, x), rtol=rtol, atol=atol)
    assert stats.peak_resident_bytes <= budget
    assert stats.layer_bytes == (total // DEPTH,) * DEPTH
    assert stats.prefetched == DEPTH - 1
    activations = 2 * x.nbytes  # a layer's input and output
    assert 0 < stats.peak_live_device_bytes <= budget + activations
    if source != "numpy":  # the caller's copies are left alone
        assert memory.tier_of(held[0])["w"] == ("disk" if source == "disk" else source)
        np.testing.assert_array_equal(_bits(memory.load(held[0])["w"]), _bits(layers[0]["w"]))


def test_stream_without_room_to_prefetch_holds_one_layer():
    layers = [memory.place(p, "pinned_host") for p in _mlp_layers(np.float32)]
    one = memory.tree_nbytes(layers[0])
    x = jnp.ones((BATCH, WIDTH))
    y1, s1 = memory.stream(_mlp, layers, x, budget_bytes=one + one // 2, return_stats=True)
    y2, s2 = memory.stream(_mlp, layers, x, budget_bytes=10 * one, prefetch=False, return_stats=True)
    assert s1.peak_resident_bytes == one and s1.prefetched == 0
    assert s2.peak_resident_bytes == one and s2.prefetched == 0
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))


_STREAM_F = jax.jit(_mlp)


@given(depth=st.integers(1, 6), budget_layers=st.floats(1.0, 3.5), prefetch=st.booleans())
def test_stream_property_same_output_within_budget(depth, budget_layers, prefetch):
    layers = [memory.place(p, "unpinned_host") for p in _mlp_layers(np.float32)[:depth]]
    one = memory.tree_nbytes(layers[0])
    budget = int(budget_layers * one)
    x = jnp.ones((BATCH, WIDTH))
    y, stats = memory.stream(_STREAM_F, layers, x, budget_bytes=budget, prefetch=prefetch, return_stats=True)
    expected = x
    for p in layers:
        expected = _STREAM_F(memory.place(p, "device"), expected)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))
    assert stats.peak_resident_bytes <= budget
    # the next layer is copied early exactly when two fit and prefetching is on
    assert stats.prefetched == (depth - 1 if prefetch and budget >= 2 * one else 0)


def test_stream_traces_once():
    layers = [memory.place(p, "pinned_host") for p in _mlp_layers(np.float32)]
    f = chex.assert_max_traces(_mlp, n=1)
    memory.stream(f, layers, jnp.ones((BATCH, WIDTH)), budget_bytes=10**6)


def test_stream_quantized_layers(tmp_path):
    quantize, dequantize = _q4_0()
    layers = [{"q": quantize(jnp.asarray(p["w"])), "b": jnp.asarray(p["b"])} for p in _mlp_layers(np.float32)]
    on_disk = [memory.place(p, "disk", path=tmp_path / f"q{i}.safetensors") for i, p in enumerate(layers)]

    def layer(p, x):
        return jnp.tanh(x @ dequantize(p["q"]) + p["b"])

    x = jnp.ones((BATCH, WIDTH))
    budget = memory.tree_nbytes(layers) // 4
    y, stats = memory.stream(layer, on_disk, x, budget_bytes=budget, return_stats=True)
    expected = x
    for p in layers:
        expected = jax.jit(layer)(p, expected)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))
    assert stats.peak_resident_bytes <= budget


def test_stream_edge_cases_and_errors():
    x = jnp.ones((BATCH, WIDTH))
    assert memory.stream(_mlp, [], x, budget_bytes=1) is x
    layers = _mlp_layers(np.float32)
    with pytest.raises(ConfigError, match="argument 'budget_bytes': expected a positive number"):
        memory.stream(_mlp, layers, x, budget_bytes=0)
    with pytest.raises(ConfigError, match="expected at least layer 0's 16640 bytes, got 100"):
        memory.stream(_mlp, layers, x, budget_bytes=100)


# ------------------------------------------------------------------------------------ rematerialisation


def _block(p, x):
    return x + jnp.tanh(jnp.tanh(x @ p["up"]) @ p["down"])


def _stack(rng, depth, width, hidden, dtype=np.float32):
    return {"up": (rng.standard_normal((depth, width, hidden)) / np.sqrt(width)).astype(dtype),
            "down": (rng.standard_normal((depth, hidden, width)) / np.sqrt(hidden)).astype(dtype)}


def _numpy_blocks(stacks, x):
    x = np.asarray(x, np.float64)
    for s in stacks:
        for up, down in zip(np.asarray(s["up"], np.float64), np.asarray(s["down"], np.float64), strict=False):
            x = x + np.tanh(np.tanh(x @ up) @ down)
    return x


STRATEGIES = [memory.NoCheckpoint(), memory.EveryN(2), memory.LargeLayersOnly(0), memory.Adaptive(budget_bytes=1)]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=repr)
def test_apply_layers_matches_numpy(strategy, dtype, maybe_jit, rng):
    stacks = [_stack(rng, 5, 8, 16, dtype), _stack(rng, 2, 8, 32, dtype)]
    x = rng.standard_normal((3, 8)).astype(dtype)
    y = maybe_jit(lambda s, h: memory.apply_layers(_block, s, h, strategy=strategy))(stacks, x)
    assert y.dtype == dtype
    rtol, atol = tolerance(dtype)
    np.testing.assert_allclose(np.asarray(y, np.float64), _numpy_blocks(stacks, x), rtol=4 * rtol, atol=4 * atol)


@pytest.mark.parametrize("strategy", STRATEGIES[1:], ids=repr)
def test_checkpointed_gradients_equal_the_plain_ones(strategy, rng):
    stacks = [_stack(rng, 5, 8, 16), _stack(rng, 2, 8, 32)]
    x = rng.standard_normal((3, 8)).astype(np.float32)

    def loss(strat):
        return jax.jit(jax.grad(lambda s, h: jnp.sum(memory.apply_layers(_block, s, h, strategy=strat) ** 2),
                                argnums=(0, 1)))

    chex.assert_trees_all_close(loss(strategy)(stacks, x), loss(memory.NoCheckpoint())(stacks, x),
                                rtol=1e-5, atol=1e-6)


def test_checkpointed_gradients_against_finite_differences(rng):
    from jax.test_util import check_grads

    stack = jax.tree_util.tree_map(lambda a: a.astype(np.float64), _stack(rng, 4, 3, 5))
    x = rng.standard_normal((2, 3))
    with jax.enable_x64(True):
        check_grads(lambda s, h: memory.apply_layers(_block, s, h, strategy=memory.EveryN(2)), (stack, x),
                    order=1, modes=["rev"])


def test_apply_layers_under_vmap(rng):
    stack = _stack(rng, 3, 8, 16)
    xs = rng.standard_normal((4, 2, 8)).astype(np.float32)
    f = jax.vmap(lambda h: memory.apply_layers(_block, stack, h, strategy=memory.EveryN(2)))
    np.testing.assert_allclose(np.asarray(f(xs)), np.stack([_numpy_blocks([stack], h) for h in xs]),
                               rtol=1e-5, atol=1e-5)


def test_apply_layers_traces_once(rng):
    stack, x = _stack(rng, 3, 8, 16), jnp.ones((2, 8))
    f = jax.jit(chex.assert_max_traces(lambda s, h: memory.apply_layers(_block, s, h, strategy=memory.EveryN(2)),
                                       n=1))
    f(stack, x)
    f(jax.tree_util.tree_map(lambda a: a + 1, stack), x + 1)


def test_layer_activation_bytes_by_hand():
    w = jax.ShapeDtypeStruct((8, 32), jnp.float32)
    x = jax.ShapeDtypeStruct((4, 8), jnp.float32)
    # x @ w (4x32) and tanh (4x32), float32: 2 * 512 bytes
    assert memory.layer_activation_bytes(lambda w, x: jnp.tanh(x @ w), w, x) == 1024
    # the same inside a jit call is entered, not counted as one output
    assert memory.layer_activation_bytes(jax.jit(lambda w, x: jnp.tanh(x @ w)), w, x) == 1024


def test_checkpoint_plan_decisions():
    x = jax.ShapeDtypeStruct((16, 8), jnp.float32)  # 512 bytes
    small = {"up": jax.ShapeDtypeStruct((9, 8, 8), jnp.float32), "down": jax.ShapeDtypeStruct((9, 8, 8), jnp.float32)}
    big = {"up": jax.ShapeDtypeStruct((4, 8, 64), jnp.float32), "down": jax.ShapeDtypeStruct((4, 64, 8), jnp.float32)}
    # a block creates x@up, tanh, @down, tanh, add: small 5 * 512 = 2560 bytes; big 2*4096 + 3*512 = 9728
    assert memory.layer_activation_bytes(_block, jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), big), x) == 9728
    plan = lambda s: memory.checkpoint_plan(_block, [small, big], x, s)  # noqa: E731
    assert plan(memory.NoCheckpoint()) == (0, 0)
    assert plan(memory.EveryN(3)) == (3, 3)
    assert plan(memory.LargeLayersOnly(5000)) == (0, 1)
    assert plan(memory.LargeLayersOnly(0)) == (1, 1)
    # Adaptive: small, L=9, a=2560, s=512: ceil(9/n)*512 + n*2560 is least at n=1 (7168);
    # big, L=4, a=9728: n=1 gives 2048 + 9728 = 11776, the least.
    assert plan(memory.Adaptive()) == (1, 1)
    # keeping: small 9*2560 = 23040, big 4*9728 = 38912 (61952 in all); a budget of 40000 checkpoints
    # the big stage first (23040 + 11776 = 34816 fits), 30000 needs both.
    assert plan(memory.Adaptive(budget_bytes=70000)) == (0, 0)
    assert plan(memory.Adaptive(budget_bytes=40000)) == (0, 1)
    assert plan(memory.Adaptive(budget_bytes=30000)) == (1, 1)


def test_remat_errors():
    x = jnp.ones((2, 4))
    stack = {"up": jnp.ones((3, 4, 4)), "down": jnp.ones((3, 4, 4))}
    with pytest.raises(ConfigError, match="argument 'n': expected an integer >= 1, got 0"):
        memory.apply_layers(_block, stack, x, strategy=memory.EveryN(0))
    with pytest.raises(ConfigError, match="argument 'threshold'"):
        memory.apply_layers(_block, stack, x, strategy=memory.LargeLayersOnly(-5))
    with pytest.raises(ConfigError, match="argument 'strategy'"):
        memory.apply_layers(_block, stack, x, strategy="sqrt")
    with pytest.raises(ConfigError, match="expected one depth on every leaf, got \\[2, 3\\]"):
        memory.apply_layers(_block, {"up": jnp.ones((3, 4, 4)), "down": jnp.ones((2, 4, 4))}, x)
    with pytest.raises(ConfigError, match="expected stacked parameters"):
        memory.apply_layers(lambda p, h: h * p, {"s": jnp.float32(2)}, x)
    with pytest.raises(ConfigError, match="argument 'layer_fn': expected 2 functions"):
        memory.apply_layers([_block], [stack, stack], x)


@pytest.mark.slow
def test_remat_savings_grow_with_the_strategy():
    """Savings read from the compiled gradient: more checkpointing, fewer temporaries."""
    x = jax.ShapeDtypeStruct((256, 64), jnp.float32)
    sds = jax.ShapeDtypeStruct
    small = {"up": sds((6, 64, 64), jnp.float32), "down": sds((6, 64, 64), jnp.float32)}
    big = {"up": sds((6, 64, 512), jnp.float32), "down": sds((6, 512, 64), jnp.float32)}
    stacks = [small, big]
    a_small = 5 * 256 * 64 * 4
    saved = {}
    for name, strategy in [("none", memory.NoCheckpoint()), ("large", memory.LargeLayersOnly(2 * a_small)),
                           ("all", memory.LargeLayersOnly(0)), ("every2", memory.EveryN(2)),
                           ("every6", memory.EveryN(6))]:
        s = memory.checkpoint_savings(_block, stacks, x, strategy)
        assert s.saved_bytes == s.baseline.temp_bytes - s.checkpointed.temp_bytes
        saved[name] = s.saved_bytes
        if name == "none":
            assert s.saved_bytes == 0 and s.extra_flops == 0
        else:
            assert s.extra_flops > 0  # the forward pass is recomputed
    assert 0 < saved["large"] < saved["all"]
    assert saved["every6"] < saved["every2"] < saved["all"]
