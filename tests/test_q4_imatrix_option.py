"""``quant.quantize(x, "q4_0" | "q4_1", imatrix=w)``: llama.cpp's importance-matrix quantizers, byte for byte as
``ggml_quantize_chunk`` with ``quant_weights`` (libggml-python through ctypes), under jit and eagerly."""

from __future__ import annotations

import _ggml_oracle as oracle
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from viva_tensor import compression, ggml, quant
from viva_tensor.errors import DTypeError, FormatError, InvalidShape

needs_ggml = pytest.mark.skipif(oracle.LIB is None, reason="libggml-python is not installed")


def _rows(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.stack([rng.standard_normal(256), rng.standard_t(3, 256) * 0.02, rng.uniform(-1, 3, 256)])
    x[2, 64:96] = 0.25  # a constant block
    x[1, :32] = 0.0  # an all-zero block
    return x.astype(np.float32)


def _imatrix(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).gamma(0.5, 2.0, n).astype(np.float32)


def _minilm_rows() -> np.ndarray | None:
    try:
        from safetensors.numpy import load_file

        from viva_tensor.models import minilm

        w = load_file(str(minilm.default_model_dir() / "model.safetensors"))
    except Exception:  # pragma: no cover - the model package is optional
        return None
    return next(v for k, v in w.items() if k.endswith("layer.0.attention.self.key.weight"))[:8]


@needs_ggml
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("fmt", ["q4_0", "q4_1"])
def test_imatrix_option_is_ggml_byte_for_byte(fmt, jit):
    x, im = _rows(), _imatrix(256)

    def f(a, w):
        return quant.quantize(a, fmt, imatrix=w)

    q = (jax.jit(f) if jit else f)(jnp.asarray(x), jnp.asarray(im))
    assert type(q) is (compression.Q4_0Tensor if fmt == "q4_0" else compression.Q4_1Tensor)
    ours = compression.to_ggml_bytes(q).reshape(x.shape[0], -1)
    np.testing.assert_array_equal(ours, oracle.quantize(x, fmt, im))
    # the imatrix really is used: without it ggml (and we) give other bytes
    assert not np.array_equal(ours, oracle.quantize(x, fmt))
    np.testing.assert_array_equal(ours, compression.to_ggml_bytes(quant.quantize(jnp.asarray(x), fmt, imatrix=im))
                                  .reshape(x.shape[0], -1))


@needs_ggml
@pytest.mark.parametrize("fmt", ["q4_0", "q4_1"])
def test_imatrix_option_on_minilm_weights_and_bfloat16(fmt):
    x = _minilm_rows()
    if x is None:
        pytest.skip("the MiniLM package is not installed")
    im = (np.linspace(0.2, 3.0, x.shape[-1]) ** 2).astype(np.float32)  # a mean square of activations per column
    q = quant.quantize(jnp.asarray(x), fmt, imatrix=jnp.asarray(im))
    np.testing.assert_array_equal(compression.to_ggml_bytes(q).reshape(x.shape[0], -1), oracle.quantize(x, fmt, im))
    # bfloat16 input: ggml quantizes its float32 values (the bfloat16 input is exactly representable)
    xb = jnp.asarray(x, jnp.bfloat16)
    qb = quant.quantize(xb, fmt, imatrix=jnp.asarray(im, jnp.bfloat16))
    assert qb.dtype == jnp.bfloat16 and quant.dequantize(qb).dtype == jnp.bfloat16
    x32 = np.asarray(xb.astype(jnp.float32))
    im32 = np.asarray(jnp.asarray(im, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(compression.to_ggml_bytes(qb).reshape(x.shape[0], -1),
                                  oracle.quantize(x32, fmt, im32))


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1"])
def test_same_as_the_ggml_functions_and_none_is_the_reference_path(fmt):
    x, im = jnp.asarray(_rows(2)), jnp.asarray(_imatrix(256, 3))
    direct = (ggml.quantize_q4_0_imatrix if fmt == "q4_0" else ggml.quantize_q4_1_imatrix)(x, im)
    via = getattr(compression, f"quantize_{fmt}")(x, imatrix=im)
    for a, b in zip(jax.tree_util.tree_leaves(direct), jax.tree_util.tree_leaves(via), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    plain = getattr(compression, f"quantize_{fmt}")(x)
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(quant.quantize(x, fmt, imatrix=None)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_imatrix_is_refused():
    x = jnp.ones((2, 64))
    with pytest.raises(InvalidShape, match="imatrix"):
        quant.quantize(x, "q4_0", imatrix=jnp.ones(32))
    with pytest.raises(DTypeError, match="imatrix"):
        quant.quantize(x, "q4_1", imatrix=jnp.ones(64, jnp.int32))
    with pytest.raises(InvalidShape, match="multiple of 32"):
        quant.quantize(jnp.ones((2, 40)), "q4_0", imatrix=jnp.ones(40))
    with pytest.raises(FormatError, match="imatrix"):
        quant.quantize(x, "q8_0", imatrix=jnp.ones(64))  # Q8_0 has no importance-matrix path in ggml
