"""A GGUF file that llama.cpp's own ``llama-quantize`` made (Q4_K_M of MiniLM's layer 0; tools/make_llamacpp_fixture.py)
is read here with every tensor identical to gguf-py's dequantizer, and written back byte for byte."""

import pathlib

import numpy as np
import pytest

from viva_tensor import quant
from viva_tensor.interop import gguf

gguf_py = pytest.importorskip("gguf")
FIXTURE = pathlib.Path(__file__).parent / "data" / "interop" / "llamacpp_minilm_l0_q4_k_m.gguf"
needs_fixture = pytest.mark.skipif(not FIXTURE.exists(), reason="the llama.cpp fixture was not made")


def _theirs():
    reader = gguf_py.GGUFReader(str(FIXTURE))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # NumPy order
        out[t.name] = (t.tensor_type.name, gguf_py.quants.dequantize(t.data, t.tensor_type).reshape(shape))
    return out, reader


@needs_fixture
def test_llamacpp_q4_k_m_file_reads_as_gguf_py_dequantizes_it():
    tensors, meta = gguf.read(FIXTURE)
    theirs, _ = _theirs()
    assert list(tensors) == list(theirs)
    types = {name: kind for name, (kind, _) in theirs.items()}
    # llama-quantize chose these itself: K-quants where rows are whole super-blocks, fallbacks where not
    assert "Q4_K" in types.values() or "Q6_K" in types.values()
    assert {"Q5_0", "Q8_0", "Q5_1", "Q4_0"} & set(types.values())
    assert types["blk.0.ffn_down.weight"] in ("Q4_K", "Q6_K", "Q5_K")
    for name, (_kind, want) in theirs.items():
        got = quant.dequantize(tensors[name]) if quant.is_quantized(tensors[name]) else tensors[name]
        got = np.asarray(got, np.float32)
        assert got.shape == want.shape, name
        np.testing.assert_array_equal(got.view(np.uint32), np.asarray(want, np.float32).view(np.uint32), err_msg=name)
    assert meta["general.architecture"] == "bert" and int(meta["bert.block_count"]) == 1


@needs_fixture
def test_llamacpp_file_writes_back_with_the_same_tensor_bytes(tmp_path):
    tensors, meta = gguf.read(FIXTURE)
    arch = meta.pop("general.architecture")
    meta = {k: v for k, v in meta.items() if k != "general.alignment"}
    out = tmp_path / "again.gguf"
    gguf.write(out, tensors, arch=arch, metadata=meta)
    a, b = gguf_py.GGUFReader(str(FIXTURE)), gguf_py.GGUFReader(str(out))
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert ta.tensor_type == tb.tensor_type and list(ta.shape) == list(tb.shape), ta.name
        np.testing.assert_array_equal(np.asarray(ta.data).view(np.uint8), np.asarray(tb.data).view(np.uint8))
