"""viva_tensor.interop.gguf against gguf-py (reader, writer, dequantizer) and ggml's own quantizers."""

from __future__ import annotations

import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from viva_tensor import compression, ggml
from viva_tensor._formats.registry import is_quantized
from viva_tensor.errors import CheckpointError, FormatError
from viva_tensor.interop import gguf as vgguf

gguf = pytest.importorskip("gguf")

import _ggml_oracle as oracle  # noqa: E402

RNG = np.random.default_rng(7)


def _tensors():
    w = RNG.standard_normal((4, 512)).astype(np.float32)
    return {
        "f32": jnp.asarray(RNG.standard_normal((3, 5)).astype(np.float32)),
        "f16": jnp.asarray(RNG.standard_normal((2, 7)).astype(np.float16)),
        "bf16": jnp.asarray(RNG.standard_normal((6,)).astype(np.float32)).astype(jnp.bfloat16),
        "i32": jnp.arange(5, dtype=jnp.int32),
        "q4_0": compression.quantize_q4_0(w),
        "q8_0": compression.quantize_q8_0(w),
        "q5_1": ggml.quantize_q5_1(w),
        "q6_k": ggml.quantize_q6_k(w),
        "q4_k": ggml.quantize_q4_k(w[:1]),
    }


METADATA = {
    "general.name": "tiny",
    "demo.block_count": np.uint32(6),
    "demo.eps": np.float32(1e-12),
    "demo.causal": False,
    "demo.count": 3,
    "demo.big": np.uint64(2**40),
    "demo.tokens": ["[PAD]", "a", "é"],
    "demo.scores": np.array([0.5, -1.0], np.float32),
    "demo.ids": np.array([1, 2, 3], np.int32),
}


def _bytes_of(t):
    if isinstance(t, (compression.Q4_0Tensor, compression.Q4_1Tensor, compression.Q8_0Tensor)):
        return compression.to_ggml_bytes(t)
    if is_quantized(t):
        return ggml.to_ggml_bytes(t)
    return None


def test_written_files_are_read_by_gguf_py(tmp_path):
    path = tmp_path / "m.gguf"
    tensors = _tensors()
    vgguf.write(path, tensors, arch="demo", metadata=METADATA)
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "demo"
    for key, value in METADATA.items():
        got = reader.fields[key].contents()
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(np.asarray(got, value.dtype), value)
        else:
            assert got == (value.item() if isinstance(value, np.generic) else value), key
    by_name = {t.name: t for t in reader.tensors}
    assert list(by_name) == list(tensors)
    for name, t in tensors.items():
        rt = by_name[name]
        assert tuple(int(n) for n in rt.shape) == tuple(reversed(t.shape)), name
        raw = _bytes_of(t)
        if raw is not None:
            assert rt.tensor_type == vgguf.GGML_TYPES[t.format]
            np.testing.assert_array_equal(np.asarray(rt.data).reshape(raw.shape), raw)
        elif name == "bf16":
            np.testing.assert_array_equal(np.asarray(rt.data).view(np.uint16), np.asarray(t).view(np.uint16))
        else:
            np.testing.assert_array_equal(np.asarray(rt.data), np.asarray(t))
        assert rt.data_offset % 32 == 0


def test_round_trip_here(tmp_path):
    path = tmp_path / "m.gguf"
    tensors = _tensors()
    vgguf.write(path, tensors, arch="demo", metadata=METADATA, alignment=64)
    back, meta = vgguf.read(path)
    assert list(back) == list(tensors)
    assert meta["general.alignment"] == 64 and meta["general.architecture"] == "demo"
    for key, value in METADATA.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(meta[key], value)
            assert meta[key].dtype == value.dtype
        else:
            assert meta[key] == value and type(meta[key]) is (type(value) if not isinstance(value, int)
                                                             or isinstance(value, bool) else np.int32)
    for name, t in tensors.items():
        b = back[name]
        assert b.shape == t.shape and type(b) is type(t), name
        raw = _bytes_of(t)
        if raw is not None:
            np.testing.assert_array_equal(_bytes_of(b), raw)
        else:
            assert b.dtype == t.dtype
            np.testing.assert_array_equal(np.asarray(b).view(np.uint8), np.asarray(t).view(np.uint8))


@pytest.mark.skipif(oracle.LIB is None, reason="libggml-python is not installed")
@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k",
                                 "iq4_nl", "iq4_xs"])
def test_files_written_by_gguf_py_with_ggml_blocks(tmp_path, fmt):
    x = RNG.standard_normal((3, 512)).astype(np.float32)
    raw = oracle.quantize(x, fmt)
    qtype = gguf.GGMLQuantizationType[fmt.upper()]
    path = tmp_path / "g.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint32("llama.block_count", 2)
    writer.add_tensor("blk.0.w", raw, raw_dtype=qtype)
    writer.add_tensor("blk.0.b", x[0, :7].copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors, meta = vgguf.read(path)
    assert meta["llama.block_count"] == 2 and isinstance(meta["llama.block_count"], np.uint32)
    q = tensors["blk.0.w"]
    assert q.shape == (3, 512) and q.format == fmt
    np.testing.assert_array_equal(_bytes_of(q), raw)
    reference = gguf.quants.dequantize(raw, qtype).reshape(3, 512)
    ours = np.asarray(compression.dequantize(q) if fmt in ("q4_0", "q4_1", "q8_0") else ggml.dequantize(q))
    np.testing.assert_array_equal(ours.view(np.uint32), reference.astype(np.float32).view(np.uint32))
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.b"]), x[0, :7])


def test_bf16_reads_as_bfloat16(tmp_path):
    path = tmp_path / "b.gguf"
    values = np.array([1.5, -2.0, 3.25], ml_dtypes.bfloat16)
    vgguf.write(path, {"x": jnp.asarray(values)}, arch="demo")
    tensors, _ = vgguf.read(path)
    assert tensors["x"].dtype == jnp.bfloat16
    assert tensors["x"].astype(jnp.float32).tolist() == [1.5, -2.0, 3.25]


_NAME_W = struct.pack("<Q", 1) + b"w"


def _good(tmp_path):
    path = tmp_path / "ok.gguf"
    vgguf.write(path, {"w": ggml.quantize_q6_k(jnp.ones((1, 256)))}, arch="demo", metadata={"k": "v"})
    return path.read_bytes()


@pytest.mark.parametrize("case", ["missing", "empty", "magic", "version", "truncated_header", "truncated_data",
                                  "bad_value_type", "bad_tensor_type", "safetensors", "misaligned"])
def test_bad_files_raise_checkpoint_error(tmp_path, case):
    good = _good(tmp_path)
    path = tmp_path / "bad.gguf"
    if case == "missing":
        path = tmp_path / "nothing.gguf"
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "magic":
        path.write_bytes(b"GGML" + good[4:])
    elif case == "version":
        path.write_bytes(good[:4] + struct.pack("<I", 9) + good[8:])
    elif case == "truncated_header":
        path.write_bytes(good[:40])
    elif case == "truncated_data":
        path.write_bytes(good[:-100])
    elif case == "bad_value_type":
        i = good.index(b"general.architecture") + len(b"general.architecture")
        path.write_bytes(good[:i] + struct.pack("<I", 99) + good[i + 4:])
    elif case == "bad_tensor_type":
        i = good.index(_NAME_W) + len(_NAME_W) + 4 + 16  # name, n_dims, ne[0], ne[1]
        path.write_bytes(good[:i] + struct.pack("<I", 77) + good[i + 4:])
    elif case == "safetensors":
        header = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
        path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    elif case == "misaligned":
        i = good.index(_NAME_W) + len(_NAME_W) + 4 + 16 + 4
        path.write_bytes(good[:i] + struct.pack("<Q", 3) + good[i + 8:])
    with pytest.raises(CheckpointError, match="expected"):
        vgguf.read(path)


def test_write_rejects_what_gguf_cannot_hold(tmp_path):
    from viva_tensor import nf4

    with pytest.raises(FormatError, match="GGML record"):
        vgguf.write(tmp_path / "x.gguf", {"w": nf4.quantize(jnp.ones((2, 64)))}, arch="demo")
    with pytest.raises(FormatError, match="metadata"):
        vgguf.write(tmp_path / "x.gguf", {}, arch="demo", metadata={"k": object()})
    with pytest.raises(FormatError, match="once"):
        vgguf.write(tmp_path / "x.gguf", {}, arch="demo", metadata={"general.architecture": "x"})
    with pytest.raises(FormatError, match="power of two"):
        vgguf.write(tmp_path / "x.gguf", {}, arch="demo", alignment=48)


def _minilm_gguf(tmp_path, quantize: bool):
    minilm = pytest.importorskip("viva_tensor.models.minilm")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    try:
        weights = safetensors_numpy.load_file(str(minilm.default_model_dir() / "model.safetensors"))
    except Exception:  # pragma: no cover - the model package is optional
        pytest.skip("the MiniLM model package is not installed")
    tensors = {}
    for key, value in weights.items():
        name = vgguf.gguf_bert_name(key)
        if name is None:
            continue
        value = jnp.asarray(value, jnp.float32)
        if quantize and value.ndim == 2 and name != "token_types.weight":
            # llama.cpp's Q4_K_M mix on MiniLM: Q4_K where rows allow it, Q5_0 elsewhere, Q8_0 embeddings.
            if name.endswith("ffn_down.weight"):
                value = ggml.quantize_q4_k(value)
            elif "embd" in name:
                value = compression.quantize_q8_0(value)
            else:
                value = ggml.quantize_q5_0(value)
        tensors[name] = value
    path = tmp_path / ("q.gguf" if quantize else "f32.gguf")
    cfg = minilm.load_config()
    vgguf.write(path, tensors, arch="bert", metadata={"bert.block_count": np.uint32(cfg.num_layers),
                                                       "bert.embedding_length": np.uint32(cfg.hidden_size),
                                                       "bert.attention.head_count": np.uint32(cfg.num_heads)})
    return minilm, path


SENTENCES = ["A man is eating food.", "A plane is taking off.", "Two dogs play in the snow."]


def test_minilm_from_f32_gguf_equals_the_safetensors_model(tmp_path):
    minilm, path = _minilm_gguf(tmp_path, quantize=False)
    ours = np.asarray(minilm.encode(minilm.load(path), SENTENCES))
    ref = np.asarray(minilm.encode(minilm.load(), SENTENCES))
    np.testing.assert_array_equal(ours, ref)


def test_minilm_from_quantized_gguf_keeps_the_embeddings(tmp_path):
    minilm, path = _minilm_gguf(tmp_path, quantize=True)
    tensors, _ = vgguf.read(path)
    assert type(tensors["blk.0.ffn_down.weight"]).__name__ == "Q4KTensor"
    ours = np.asarray(minilm.encode(minilm.load(path), SENTENCES))
    ref = np.asarray(minilm.encode(minilm.load(), SENTENCES))
    cos = np.sum(ours * ref, -1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() > 0.98, cos  # llama.cpp on its own Q4_K_M file: mean 0.990, min 0.974


def test_minilm_gguf_missing_tensor(tmp_path):
    minilm = pytest.importorskip("viva_tensor.models.minilm")
    path = tmp_path / "bad.gguf"
    vgguf.write(path, {"blk.0.attn_q.bias": jnp.zeros(384)}, arch="bert")
    with pytest.raises(CheckpointError, match="a weight named"):
        minilm.load(path)
    assert minilm is not None
