"""Tests of viva_tensor.quant: formats by name, the quantized dot_general, trees, checkpoints.

References are independent of the code under test: each format module's own function (for the
by-name dispatch), NumPy float64 einsum over the dequantized weights (for the matmul), and the
saved bytes themselves (for the checkpoints).
"""

import json
import os
import struct

import chex
import flax
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from viva_tensor import _formats as _record
from viva_tensor import awq, blackwell, compression, memory, nf4, quant
from viva_tensor.errors import CheckpointError, DimensionError, DTypeError, FormatError, InvalidOp, ShapeMismatch
from viva_tensor.quant import _dot as quant_dot

MODULE_FUNCTIONS = {
    "int8": (compression.quantize_int8, compression.dequantize),
    "q4_0": (compression.quantize_q4_0, compression.dequantize),
    "q4_1": (compression.quantize_q4_1, compression.dequantize),
    "q8_0": (compression.quantize_q8_0, compression.dequantize),
    "nf4": (nf4.quantize, nf4.dequantize),
    "nf4_dq": (nf4.double_quantize, nf4.dequantize),
    "nvfp4": (blackwell.quantize_nvfp4, blackwell.dequantize),
    "mxfp4": (blackwell.quantize_mxfp4, blackwell.dequantize),
    "int4_group": (awq.quantize_group, awq.dequantize),
    "awq_int4": (awq.quantize_awq, awq.dequantize),
}
NAMES = list(MODULE_FUNCTIONS)


def _normal(shape, dtype=jnp.float32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _trees_bit_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    return ta == tb and all(_bits_equal(x, y) for x, y in zip(la, lb, strict=True))


# ---------------------------------------------------------------------------------------------
# By name
# ---------------------------------------------------------------------------------------------


GGML_MORE = ["q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]  # viva_tensor.ggml (oracle tests: test_ggml.py)
# bitsandbytes' FP4 (oracle tests: test_bnb_fp4.py) and GPTQ's act-order int4 (test_gptq_act_order.py), listed last
LATER = ["bnb_fp4", "bnb_fp4_dq", "int4_gidx"]


def test_formats_lists_every_format_in_order():
    assert quant.format_names() == NAMES[:4] + GGML_MORE + NAMES[4:] + LATER
    assert set(quant.FORMATS) == set(NAMES) | set(GGML_MORE) | set(LATER)
    for name, spec in quant.FORMATS.items():
        assert spec.name == name and spec.record.format == name


@pytest.mark.parametrize("fmt", NAMES)
def test_quantize_by_name_is_the_module_function(fmt, dtype):
    x = _normal((6, 96), dtype)
    q_mod, deq_mod = MODULE_FUNCTIONS[fmt]
    q = quant.quantize(x, fmt)
    ref = q_mod(x)
    assert type(q) is type(ref)
    assert _trees_bit_equal(q, ref)
    assert q.shape == ref.shape == (6, 96) and q.dtype == ref.dtype == dtype
    assert _bits_equal(quant.dequantize(q), deq_mod(ref))
    assert quant.dequantize(q).dtype == dtype


def test_quantize_passes_options():
    x = _normal((4, 128))
    assert _trees_bit_equal(quant.quantize(x, "nf4", block_size=128), nf4.quantize(x, block_size=128))
    assert _trees_bit_equal(quant.quantize(x, "int8", axis=0), compression.quantize_int8(x, axis=0))


def test_unknown_format_lists_the_known_ones():
    with pytest.raises(FormatError, match=r"argument 'fmt': expected one of 'int8', 'q4_0'.*'awq_int4'.*, got 'fp3'"):
        quant.quantize(jnp.ones((2, 32)), "fp3")
    with pytest.raises(FormatError, match="fmt"):
        quant.quantize(jnp.ones((2, 32)), None)


def test_unknown_option_is_a_format_error():
    with pytest.raises(FormatError, match=r"options of format 'nf4' among \(block_size.*got blocksize"):
        quant.quantize(jnp.ones((2, 64)), "nf4", blocksize=32)
    with pytest.raises(FormatError, match="options of format 'q4_0'"):
        quant.quantize(jnp.ones((2, 64)), "q4_0", block_size=64)


def test_dequantize_of_a_plain_array_is_a_format_error():
    with pytest.raises(FormatError, match=r"argument 'q': expected a quantized record.*got ArrayImpl"):
        quant.dequantize(jnp.ones((2, 32)))


# ---------------------------------------------------------------------------------------------
# dot_general
# ---------------------------------------------------------------------------------------------

# (lhs shape, rhs shape, dimension_numbers, which operand is quantized, format, einsum of the reference)
DOT_CASES = [
    ((5, 64), (64, 96), (((1,), (0,)), ((), ())), "rhs", "int8", "bk,kn->bn"),
    ((5, 64), (96, 64), (((1,), (1,)), ((), ())), "rhs", "q4_1", "bk,nk->bn"),
    ((64, 96), (64, 7), (((0,), (0,)), ((), ())), "lhs", "nf4_dq", "kn,km->nm"),
    ((3, 32, 64), (3, 4, 64), (((2,), (2,)), ((0,), (0,))), "lhs", "mxfp4", "gnk,gbk->gnb"),
    ((3, 4, 64), (3, 64, 32), (((2,), (1,)), ((0,), (0,))), "rhs", "nvfp4", "gbk,gkn->gbn"),
    ((2, 3, 64), (3, 64, 64), (((1, 2), (0, 1)), ((), ())), "rhs", "q4_0", "bgk,gkn->bn"),
]


def _reference(lhs, rhs, subscripts):
    return np.einsum(subscripts, np.asarray(lhs, np.float64), np.asarray(rhs, np.float64))


@pytest.mark.parametrize("case", DOT_CASES, ids=[f"{c[4]}-{c[5]}" for c in DOT_CASES])
def test_dot_general_matches_dequantize_then_matmul(case, dtype, maybe_jit):
    lshape, rshape, dims, which, fmt, subscripts = case
    lhs, rhs = _normal(lshape, dtype, 1), _normal(rshape, dtype, 2)
    if which == "rhs":
        rhs = quant.quantize(rhs, fmt)
        dense = (lhs, quant.dequantize(rhs))
    else:
        lhs = quant.quantize(lhs, fmt)
        dense = (quant.dequantize(lhs), rhs)
    out = maybe_jit(lambda a, b: quant.dot_general(a, b, dims))(lhs, rhs)
    ref = _reference(*dense, subscripts)
    assert out.dtype == dtype and out.shape == ref.shape
    rtol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=rtol, atol=rtol * np.abs(ref).max())
    # the same as lax.dot_general on the dequantized operands (bfloat16: the kernel sums the float32 weight in
    # float32, lax the bfloat16-rounded one, so both are within the reference's bound, not within 0.02 absolute)
    lax_out = jax.lax.dot_general(*dense, dims)
    atol = rtol * (np.abs(ref).max() if dtype == jnp.bfloat16 else 1.0)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(lax_out, np.float32), rtol=rtol, atol=atol)


@pytest.mark.parametrize("fmt", NAMES)
def test_dot_every_format(fmt, maybe_jit):
    x, w = _normal((4, 64), seed=3), _normal((64, 32), seed=4)
    q = quant.quantize(w, fmt)
    out = maybe_jit(quant.dot)(x, q)
    ref = np.asarray(x, np.float64) @ np.asarray(quant.dequantize(q), np.float64)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-4)


@pytest.fixture
def small_chunks(monkeypatch):
    """Makes dot_general decode a (512, 256) weight in two chunks of 256 rows."""
    monkeypatch.setattr(quant_dot, "_CHUNK_VALUES", 1 << 12)
    quant_dot._qdot.clear_cache()
    yield
    quant_dot._qdot.clear_cache()


@pytest.mark.parametrize("fmt", NAMES)
def test_dot_decodes_large_weights_in_chunks(fmt, small_chunks, dtype):
    x, w = _normal((3, 7, 512), dtype, seed=8), _normal((512, 256), seed=9)
    q = quant.quantize(w, fmt)
    rows, sliced = quant_dot._chunk_plan(q)
    assert rows == 256 and any(sliced)
    out = quant.dot(x, q)
    assert out.dtype == dtype and out.shape == (3, 7, 256)
    ref = _reference(x, quant.dequantize(q).astype(dtype), "abk,kn->abn")
    rtol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=rtol, atol=rtol * np.abs(ref).max())


FOUR_BIT = ["q4_0", "q4_1", "nf4", "nf4_dq", "nvfp4", "mxfp4", "int4_group", "awq_int4"]


def test_every_4_bit_format_registers_a_planes_hook():
    assert {f for f in NAMES if quant.format_spec(f).planes is not None} == set(FOUR_BIT) & set(NAMES)


def test_dot_chunk_plan_refuses_misaligned_weights(small_chunks):
    assert quant_dot._chunk_plan(quant.quantize(_normal((300, 256)), "nf4")) is None  # 300 rows: no 256-row chunk
    assert quant_dot._chunk_plan(quant.quantize(_normal((2, 512, 256)), "q8_0")) is None  # not 2-D
    q = quant.quantize(_normal((512, 256)), "int8", block_size=96)  # blocks straddle chunk boundaries
    assert quant_dot._chunk_plan(q) is None or quant_dot._chunk_plan(q)[0] % 3 == 0


def test_dot_decodes_to_the_other_operands_dtype():
    w = quant.quantize(_normal((64, 32)), "nf4")  # a float32 record
    x16 = _normal((2, 64), jnp.bfloat16)
    out = quant.dot(x16, w)
    assert out.dtype == jnp.bfloat16
    ref = jax.lax.dot_general(x16, quant.dequantize(w).astype(jnp.bfloat16), (((1,), (0,)), ((), ())))
    assert _bits_equal(out, ref)
    out32 = quant.dot(x16, w, preferred_element_type=jnp.float32)
    assert out32.dtype == jnp.float32
    # a bfloat16 record against float32 activations computes in float32
    wb = quant.quantize(_normal((64, 32), jnp.bfloat16), "q8_0")
    assert quant.dot(_normal((2, 64)), wb).dtype == jnp.float32


def test_dot_general_with_a_record_made_under_vmap():
    w = _normal((3, 64, 32))
    q = jax.vmap(lambda a: quant.quantize(a, "nf4"))(w)
    assert q.batch_shape == (3,) and q.shape == (64, 32)
    x = _normal((3, 5, 64), seed=1)
    out = quant.dot_general(x, q, (((2,), (1,)), ((0,), (0,))))
    ref = _reference(x, quant.dequantize(q), "gbk,gkn->gbn")
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-4)


def test_dot_general_of_two_records():
    a, b = quant.quantize(_normal((8, 64)), "q8_0"), quant.quantize(_normal((64, 32), seed=1), "nf4")
    out = quant.dot_general(a, b, (((1,), (0,)), ((), ())))
    ref = _reference(quant.dequantize(a), quant.dequantize(b), "bk,kn->bn")
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-4)


def test_dot_general_of_plain_arrays_is_lax():
    a, b = _normal((3, 4)), _normal((4, 5))
    dims = (((1,), (0,)), ((), ()))
    assert _bits_equal(quant.dot_general(a, b, dims), jax.lax.dot_general(a, b, dims))


def test_dot_does_not_retrace():
    q = quant.quantize(_normal((64, 32)), "q4_0")

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(x, q):
        return quant.dot(x, q)

    for seed in range(3):
        f(_normal((2, 64), seed=seed), q)
    chex.clear_trace_counter()


def test_dot_takes_the_record_not_dense_weights_as_input():
    x, q = _normal((4, 256)), quant.quantize(_normal((256, 256)), "nf4")
    mem = memory.compiled_memory(lambda a, w: quant.dot(a, w), x, q)
    assert mem.argument_bytes == x.nbytes + q.nbytes  # 4.5 bits a weight come in, not 32


def test_dot_general_errors():
    q = quant.quantize(_normal((64, 32)), "q8_0")
    with pytest.raises(ShapeMismatch, match=r"argument 'rhs': expected contracting sizes \(48,\)"):
        quant.dot(_normal((2, 48)), q)
    with pytest.raises(DimensionError, match="rhs dims in"):
        quant.dot_general(_normal((2, 64)), q, (((1,), (2,)), ((), ())))
    with pytest.raises(ShapeMismatch, match="as many lhs as rhs batch dims"):
        quant.dot_general(_normal((2, 64)), q, (((1,), (0,)), ((0,), ())))
    with pytest.raises(FormatError, match="dimension_numbers"):
        quant.dot_general(_normal((2, 64)), q, "bk,kn")
    with pytest.raises(DimensionError, match="rank >= 1"):
        quant.dot(jnp.float32(1.0), q)


# ---------------------------------------------------------------------------------------------
# Flax NNX
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["q4_0", "nf4"])
def test_nnx_linear_with_a_quantized_kernel(fmt, dtype):
    layer = nnx.Linear(
        64, 32, dot_general=quant.dot_general, promote_dtype=quant.promote_dtype, rngs=nnx.Rngs(0)
    )
    w, b = layer.kernel[...], layer.bias[...]
    layer.kernel = nnx.Param(quant.quantize(w, fmt))
    x = _normal((3, 64), dtype, seed=5)
    ref = _reference(x, quant.dequantize(layer.kernel[...]), "bk,kn->bn") + np.asarray(b, np.float64)
    rtol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    for y in (layer(x), nnx.jit(lambda m, a: m(a))(layer, x)):
        assert y.shape == (3, 32)
        np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=rtol, atol=rtol * 4)
    # the record's buffers are the module's Param state and survive split / merge
    graphdef, params = nnx.split(layer, nnx.Param)
    leaves = jax.tree_util.tree_leaves(params)
    assert sum(leaf.nbytes for leaf in leaves) == layer.kernel[...].nbytes + b.nbytes
    again = nnx.merge(graphdef, params)
    assert _trees_bit_equal(again.kernel[...], layer.kernel[...])


def test_record_index_only_takes_ellipsis():
    q = quant.quantize(_normal((4, 32)), "q8_0")
    assert q[...] is q
    with pytest.raises(InvalidOp, match="cannot be sliced"):
        q[0]


def test_register_format_makes_a_new_record_nnx_ready_without_quant():
    @flax.struct.dataclass
    class Halves(_record.QuantizedArray):
        values: jax.Array
        shape: tuple = flax.struct.field(pytree_node=False)
        dtype: object = flax.struct.field(pytree_node=False)
        format = "halves_test"

    assert not nnx.is_data(Halves(values=jnp.ones(2, jnp.float16), shape=(2,), dtype=jnp.float32))
    _record.register_format(
        "halves_test", record=Halves, quantize=lambda x: x, dequantize=lambda q: q.values, block_size=1,
        description="test only",
    )
    try:
        rec = Halves(values=jnp.ones(2, jnp.float16), shape=(2,), dtype=jnp.float32)
        assert nnx.is_data(rec) and rec[...] is rec and rec[()] is rec
        with pytest.raises(InvalidOp, match=r"argument 'index'.*cannot be sliced.*got slice"):
            rec[:1]

        class Holder(nnx.Module):
            def __init__(self):
                self.w = rec  # no nnx.data(...) wrapper needed

        _, state = nnx.split(Holder())
        assert [leaf.dtype for leaf in jax.tree_util.tree_leaves(state)] == [jnp.float16]
    finally:
        _record.FORMATS.pop("halves_test")


def test_promote_dtype():
    q = quant.quantize(_normal((2, 32)), "q8_0")
    x, r, none = quant.promote_dtype((jnp.ones(2, jnp.bfloat16), q, None))
    assert x.dtype == jnp.float32 and r is q and none is None
    (y,) = quant.promote_dtype((jnp.ones(2, jnp.int32),))
    assert y.dtype == jnp.float32
    (z,) = quant.promote_dtype((jnp.ones(2),), dtype=jnp.bfloat16)
    assert z.dtype == jnp.bfloat16
    with pytest.raises(DTypeError, match="floating"):
        quant.promote_dtype((jnp.ones(2),), dtype=jnp.int32)


# ---------------------------------------------------------------------------------------------
# Trees
# ---------------------------------------------------------------------------------------------


def _params():
    return {
        "dense": {"kernel": _normal((64, 32)), "bias": _normal((32,))},
        "embed": _normal((10, 64), jnp.bfloat16),
        "narrow": _normal((64, 16)),  # last dim smaller than a 32 block
        "ids": jnp.arange(64 * 2).reshape(2, 64),
        "layers": [_normal((2, 64), seed=7), 3.0],
    }


def test_quantize_tree_default_selection(maybe_jit):
    tree = _params()
    q = maybe_jit(lambda t: quant.quantize_tree(t, "q4_0"))(tree)
    assert quant.is_quantized(q["dense"]["kernel"]) and quant.is_quantized(q["embed"])
    assert quant.is_quantized(q["layers"][0])
    for untouched in (("dense", "bias"), ("narrow",), ("ids",)):
        a, b = tree, q
        for k in untouched:
            a, b = a[k], b[k]
        assert _bits_equal(a, b)
    assert q["layers"][1] == 3.0
    assert _trees_bit_equal(q["embed"], compression.quantize_q4_0(tree["embed"]))


def test_quantize_tree_where_gets_dotted_paths():
    seen = []

    def where(path, leaf):
        seen.append(path)
        return path == "dense.kernel"

    q = quant.quantize_tree(_params(), "nf4", where=where, block_size=32)
    assert "dense.kernel" in seen and "layers.0" in seen
    assert quant.is_quantized(q["dense"]["kernel"]) and q["dense"]["kernel"].block_size == 32
    assert not quant.is_quantized(q["embed"])


def test_quantize_tree_leaves_records_alone_and_dequantize_tree():
    tree = quant.quantize_tree(_params(), "q8_0")
    again = quant.quantize_tree(tree, "nf4")
    assert type(again["embed"]) is type(tree["embed"])
    dense = quant.dequantize_tree(tree)
    assert jax.tree_util.tree_structure(dense) == jax.tree_util.tree_structure(_params())
    assert _bits_equal(dense["embed"], compression.dequantize(tree["embed"]))
    assert dense["embed"].dtype == jnp.bfloat16


def test_quantize_tree_errors():
    with pytest.raises(FormatError, match="fmt"):
        quant.quantize_tree(_params(), "nope")
    with pytest.raises(FormatError, match="options"):
        quant.quantize_tree(_params(), "nf4", nope=1)


def test_default_where():
    assert quant.default_where("w", jnp.ones((2, 32)), block_size=32)
    assert not quant.default_where("w", jnp.ones((2, 31)), block_size=32)
    assert not quant.default_where("w", jnp.ones((64,)), block_size=32)
    assert not quant.default_where("w", jnp.ones((2, 64), jnp.int8))
    assert not quant.default_where("w", 1.0)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


@given(
    fmt=st.sampled_from(NAMES),
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple),
    bf16=st.booleans(),
)
@settings(max_examples=15, deadline=None)
def test_save_load_round_trip_property(fmt, shape, bf16, tmp_path_factory):
    x = _normal(shape, jnp.bfloat16 if bf16 else jnp.float32, seed=sum(shape))
    q = quant.quantize(x, fmt)
    path = tmp_path_factory.mktemp("prop") / "q.safetensors"
    quant.save(path, {"q": q, "x": x})
    back = quant.load(path)
    assert _trees_bit_equal(back, {"q": q, "x": x})


def test_load_a_plain_safetensors_file(tmp_path):
    import ml_dtypes

    tensors = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, ml_dtypes.bfloat16)}
    save_file(tensors, tmp_path / "hf.safetensors")
    back = quant.load(tmp_path / "hf.safetensors")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert _bits_equal(back[k], v)


def test_records_are_stored_as_named_tensors_with_json_metadata(tmp_path):
    path = tmp_path / "q.safetensors"
    quant.save(path, {"w": quant.quantize(_normal((4, 64)), "nf4"), "b": jnp.zeros(3)})
    header = _read_header(path)[0]
    assert set(header) == {"__metadata__", "w:codes", "w:absmax", "b"}
    meta = json.loads(header["__metadata__"]["viva_tensor"])
    record = meta["tree"]["dict"][0][1]["record"]
    assert record["format"] == "nf4" and record["static"]["shape"] == {"tuple": [4, 64]}


def _read_header(path):
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write_with_header(path, header, body):
    """Rewrite a file with an edited header, as a foreign or older writer would: without the integrity
    digest and tensor table of viva_tensor._safetensors, so quant.load's own checks are what catch it."""
    header.get("__metadata__", {}).pop("viva_tensor.digest", None)
    header.get("__metadata__", {}).pop("viva_tensor.tensors", None)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw + body)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "q.safetensors"
    quant.save(path, {"w": quant.quantize(_normal((4, 64)), "q4_1"), "b": jnp.arange(4.0)})
    return path


def test_load_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        quant.load(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="not a file"):
        quant.load(tmp_path)


def test_load_not_safetensors(tmp_path):
    for content in (b"", b"abc", b"hello, this is a text file and not a checkpoint"):
        (tmp_path / "x.bin").write_bytes(content)
        with pytest.raises(CheckpointError, match="not a safetensors file"):
            quant.load(tmp_path / "x.bin")
    (tmp_path / "y.bin").write_bytes(struct.pack("<Q", 8) + b"not json")
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        quant.load(tmp_path / "y.bin")
    (tmp_path / "z.bin").write_bytes(struct.pack("<Q", 8) + b"[1, 2]  ")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        quant.load(tmp_path / "z.bin")


def test_load_truncated(saved):
    data = saved.read_bytes()
    for cut in (len(data) - 1, len(data) - 40, 100, 9):
        saved.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            quant.load(saved)
    saved.write_bytes(data + b"\0" * 4)
    with pytest.raises(CheckpointError, match="unexpected bytes"):
        quant.load(saved)


def test_load_corrupted_bytes(saved):
    header, body = _read_header(saved)
    start = header["w:qs"]["data_offsets"][0]
    body = bytearray(body)
    body[start] ^= 0x10
    _write_with_header(saved, header, bytes(body))
    with pytest.raises(CheckpointError, match=r"tensor 'w:qs' do not match their SHA-256"):
        quant.load(saved)
    assert quant.is_quantized(quant.load(saved, verify=False)["w"])


def _tamper_meta(path, change):
    header, body = _read_header(path)
    meta = json.loads(header["__metadata__"]["viva_tensor"])
    change(meta)
    header["__metadata__"]["viva_tensor"] = json.dumps(meta)
    _write_with_header(path, header, body)


def _record_meta(meta):
    return meta["tree"]["dict"][0][1]["record"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: _record_meta(m)["static"].update(shape={"tuple": [4, 96]}), "inconsistent: a buffer is uint8"),
        (lambda m: _record_meta(m)["static"].update(shape={"tuple": [-1]}), "inconsistent"),
        (lambda m: _record_meta(m).update(format="fp7"), "format 'fp7', not one of"),
        (lambda m: _record_meta(m).update(format="q4_0"), "does not have the fields of Q4_0Tensor"),
        (lambda m: _record_meta(m)["static"].pop("dtype"), "does not have the fields"),
        (lambda m: _record_meta(m)["static"].update(dtype={"eval": "os.system"}), "malformed static field"),
        (lambda m: _record_meta(m)["children"].update(qs="b"), "not referenced|inconsistent"),
        (lambda m: m["tensors"]["b"].update(shape=[2, 2]), r"tensor 'b' is float32\[4\], its metadata says"),
        (lambda m: m["tensors"]["b"].update(dtype="int32"), "tensor 'b' is float32"),
        (lambda m: m["tensors"].pop("b"), "unexpected tensors"),
        (lambda m: m.update(version=99), "unsupported viva_tensor metadata"),
        (lambda m: m["tree"].update(dict=[["b", {"pickle": "x"}]]), "malformed tree metadata"),
    ],
)
def test_load_tampered_metadata(saved, change, message):
    _tamper_meta(saved, change)
    with pytest.raises(CheckpointError, match=message):
        quant.load(saved)


def test_load_tampered_header_shape(saved):
    header, body = _read_header(saved)
    header["b"]["shape"] = [2, 2]  # same bytes, another shape: safetensors accepts it, the metadata not
    _write_with_header(saved, header, body)
    with pytest.raises(CheckpointError, match=r"tensor 'b' is float32\[2, 2\]"):
        quant.load(saved)
    header["b"]["shape"] = [5]
    _write_with_header(saved, header, body)
    with pytest.raises(CheckpointError, match="'b'"):  # the offsets do not hold 5 float32 values
        quant.load(saved)


def test_load_refuses_an_edited_signed_file(saved):
    header, body = _read_header(saved)
    meta = json.loads(header["__metadata__"]["viva_tensor"])
    meta["version"] = 99
    header["__metadata__"]["viva_tensor"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    saved.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    with pytest.raises(CheckpointError, match="changed after it was written"):
        quant.load(saved)


def test_load_invalid_metadata_json(saved):
    header, body = _read_header(saved)
    header["__metadata__"]["viva_tensor"] = "{not json"
    _write_with_header(saved, header, body)
    with pytest.raises(CheckpointError, match="metadata is not valid JSON"):
        quant.load(saved)


def test_save_errors(tmp_path):
    with pytest.raises(CheckpointError, match="cannot save a leaf of type object at 'a'"):
        quant.save(tmp_path / "x.safetensors", {"a": object()})
    with pytest.raises(CheckpointError, match="two leaves .* tensor name 'a.b'"):
        quant.save(tmp_path / "x.safetensors", {"a.b": jnp.ones(2), "a": {"b": jnp.ones(2)}})
    with pytest.raises(CheckpointError, match="keys must be str or int"):
        quant.save(tmp_path / "x.safetensors", {(1, 2): jnp.ones(2)})
    assert not os.path.exists(tmp_path / "x.safetensors")
    (tmp_path / "a_file").write_bytes(b"")
    with pytest.raises(CheckpointError, match="cannot write"):
        quant.save(tmp_path / "a_file" / "x.safetensors", {"a": jnp.ones(2)})
