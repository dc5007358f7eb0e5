"""Checkpoints written by older versions keep loading (quant.load keys records on the format name)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from viva_tensor import quant, sparsity

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "quant_checkpoint_v1.safetensors")
# How the fixture was made (viva_tensor at main aaa9856, before the format toolkit and the quant package):
# x = normal(key(11), (4, 64)) * 0.5; every format by name (sparse24 with axis=0), plus these.
_EXTRA = {
    "sparse24_nf4": ("sparse24", {"axis": -1, "values_format": "nf4"}),
    "int8_axis": ("int8", {"axis": 1}),
    "nf4_bf16": ("nf4", {"block_size": 32}),
}


@pytest.fixture
def with_sparse24():
    had = "sparse24" in quant.FORMATS
    sparsity.register_formats()
    yield
    if not had:
        del quant.FORMATS["sparse24"]


def _bits(a):
    a = np.asarray(a)
    return a.view(f"uint{8 * a.dtype.itemsize}") if a.dtype.kind == "f" or a.dtype.name == "bfloat16" else a


def _same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(_bits(a), _bits(b))


# The fixture's input, saved (fully optimized, as the fixture was made): jax.random.normal's last bits depend on
# XLA's optimization level (at the suite's -O0, 9 of its 128 kept values came out 1-2 ulp away; fused
# multiply-adds at -O3 are the likely cause), and this test is about the quantizers, not about the generator.
SOURCE = os.path.join(os.path.dirname(__file__), "data", "quant_checkpoint_v1_source.npy")


def _generated_source():
    return (jax.random.normal(jax.random.key(11), (4, 64)) * 0.5).astype(jnp.float32)


def test_the_saved_source_is_the_fixtures_input():
    saved = np.load(SOURCE)
    assert saved.dtype == np.float32 and saved.shape == (4, 64)
    # bit for bit where XLA compiles as the fixture's commit did, within a few ulp where it does not
    np.testing.assert_array_max_ulp(saved, np.asarray(_generated_source()), maxulp=4)


def _source(name):
    x = jnp.asarray(np.load(SOURCE))
    fmt, options = _EXTRA.get(name, (name, {"axis": 0} if name == "sparse24" else {}))
    if name == "nf4_bf16":
        x = x.astype(jnp.bfloat16)
    return x, fmt, options


def test_an_old_checkpoint_loads_and_decodes_bit_for_bit(with_sparse24):
    tree = quant.load(FIXTURE)
    # every format the fixture's commit had (the GGML Q5/K-quant formats, bitsandbytes' FP4 and GPTQ's act-order
    # int4 came later: tests/test_ggml.py, test_bnb_fp4.py, test_gptq_act_order.py)
    later = {"q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "bnb_fp4", "bnb_fp4_dq", "int4_gidx"}
    assert set(tree["records"]) == set(quant.format_names()) - later | set(_EXTRA)
    _same_bits(tree["plain"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert tree["nested"] == [None, {"n": 3}]
    for name, rec in tree["records"].items():
        _same_bits(quant.dequantize(rec), tree["expected"][name])


def test_todays_quantizers_write_the_bytes_of_the_old_checkpoint(with_sparse24):
    tree = quant.load(FIXTURE)
    for name, old in tree["records"].items():
        x, fmt, options = _source(name)
        new = quant.quantize(x, fmt, **options)
        assert type(new) is type(old)
        assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(old), name
        for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old), strict=True):
            _same_bits(a, b)


def test_the_stored_class_path_does_not_matter(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    f = tmp_path / "moved.safetensors"
    quant.save(f, {"w": quant.quantize(jnp.linspace(-1.0, 1.0, 128).reshape(2, 64), "nf4")})
    with safe_open(str(f), "np") as fh:
        metadata = fh.metadata()
    meta = json.loads(metadata["viva_tensor"])
    rec = meta["tree"]["dict"][0][1]["record"]
    assert rec["class"] == "viva_tensor.nf4.NF4Tensor"
    rec["class"] = "viva_tensor.some_old_home.NF4Tensor"
    save_file(load_file(str(f)), str(f), metadata={"viva_tensor": json.dumps(meta)})
    back = quant.load(f)["w"]
    assert type(back).__name__ == "NF4Tensor" and back.shape == (2, 64)
