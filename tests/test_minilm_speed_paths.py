"""The fast paths of the MiniLM encoder: ``dense_attention`` against a float64 NumPy reference and against
``exact_attention``, under jit and eagerly, float32 and bfloat16, vmap; a MiniLM layer with either attention."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tolerance
from flax import nnx

from viva_tensor import nn
from viva_tensor.errors import BroadcastError, ConfigError, DimensionError, DTypeError, ShapeMismatch
from viva_tensor.nn._attention import dense_attention, exact_attention


def numpy_attention(q, k, v, mask=None, bias=None, scale=None):
    """Softmax attention from its definition, float64, layout (B, T, N, H); a row with no key: mean of v."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    if mask is not None:
        s = np.where(np.asarray(mask), s, -1e300)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return np.einsum("bnts,bsnh->btnh", p / p.sum(axis=-1, keepdims=True), v)


def qkv(rng, b=3, t=6, s=9, n=2, h=8, dtype=jnp.float32):
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for shape in ((b, t, n, h), (b, s, n, h), (b, s, n, h)))


@pytest.mark.parametrize("mask_shape", [None, (3, 1, 1, 9), (3, 1, 6, 9), (1, 2, 6, 9)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dense_attention_matches_numpy(rng, dtype, maybe_jit, mask_shape, with_bias):
    q, k, v = qkv(rng, dtype=dtype)
    mask = None if mask_shape is None else jnp.asarray(rng.random(mask_shape) > 0.4)
    bias = jnp.asarray(rng.standard_normal((1, 2, 6, 9)), jnp.float32) if with_bias else None
    out = maybe_jit(dense_attention)(q, k, v, bias, mask)
    assert out.shape == q.shape and out.dtype == dtype
    f32 = [np.asarray(x, np.float32) for x in (q, k, v)]
    rtol, atol = tolerance(dtype)
    np.testing.assert_allclose(np.asarray(out, np.float32), numpy_attention(*f32, mask, bias), rtol=rtol, atol=atol)


def test_dense_attention_equals_exact_within_float32_rounding(rng):
    # MiniLM's shapes: 12 heads of 32, a key mask (padding) and a per-query mask (packed sentences)
    q, k, v = qkv(rng, b=4, t=64, s=64, n=12, h=32)
    key_mask = jnp.asarray(np.arange(64)[None, :] < np.array([64, 50, 17, 1])[:, None])[:, None, None, :]
    seg = np.repeat(np.arange(1, 5), 16)
    packed = jnp.asarray(seg[:, None] == seg[None, :])[None, None]
    for mask in (key_mask, packed):
        want = exact_attention(q, k, v, mask=mask)
        for f in (dense_attention, jax.jit(dense_attention)):
            np.testing.assert_allclose(f(q, k, v, mask=mask), want, rtol=0, atol=2e-6)


def test_dense_attention_row_without_keys_gets_the_mean_of_values(rng, maybe_jit):
    q, k, v = qkv(rng)
    mask = jnp.ones((3, 1, 6, 9), bool).at[1, :, 2].set(False)
    out = maybe_jit(dense_attention)(q, k, v, mask=mask)
    want = jax.nn.dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(out[1, 2], np.asarray(v[1]).mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(out, want, atol=2e-6)
    assert np.isfinite(np.asarray(out)).all()


def test_dense_attention_nan_in_gives_nan_out(rng):
    q, k, v = qkv(rng)
    out = dense_attention(q.at[0, 1, 0, 0].set(jnp.nan), k, v)
    assert np.isnan(np.asarray(out[0, 1, 0])).all() and np.isfinite(np.asarray(out[1:])).all()


def test_dense_attention_scale_vmap_and_grad(rng):
    q, k, v = qkv(rng)
    np.testing.assert_allclose(dense_attention(q, k, v, scale=0.3), numpy_attention(q, k, v, scale=0.3), atol=1e-5)
    per_row = jax.vmap(lambda a, b, c: dense_attention(a[None], b[None], c[None])[0])(q, k, v)
    np.testing.assert_allclose(per_row, dense_attention(q, k, v), atol=1e-6)
    g_dense = jax.grad(lambda q: dense_attention(q, k, v).sum())(q)
    g_exact = jax.grad(lambda q: exact_attention(q, k, v).sum())(q)
    np.testing.assert_allclose(g_dense, g_exact, atol=1e-5)


def test_dense_attention_errors(rng):
    q, k, v = qkv(rng)
    with pytest.raises(DimensionError, match="argument 'query'"):
        dense_attention(q[0], k, v)
    with pytest.raises(ShapeMismatch, match="argument 'value'"):
        dense_attention(q, k, v[:, :3])
    with pytest.raises(DTypeError, match="argument 'mask'"):
        dense_attention(q, k, v, mask=jnp.ones((3, 1, 1, 9), jnp.int32))
    with pytest.raises(BroadcastError, match="argument 'mask'"):
        dense_attention(q, k, v, mask=jnp.ones((3, 1, 1, 8), bool))
    with pytest.raises(ConfigError, match="argument 'scale'"):
        dense_attention(q, k, v, scale="big")


def test_dense_is_a_named_implementation():
    assert "dense" in nn.ATTENTION_IMPLEMENTATIONS
    assert nn.attention_function("dense") is dense_attention is nn.dense_attention


@pytest.mark.parametrize("mask_kind", ["keys", "pairs"])
def test_self_attention_dense_equals_exact(rng, mask_kind):
    x = jnp.asarray(rng.standard_normal((2, 7, 12)), jnp.float32)
    dense = nn.SelfAttention(12, num_heads=3, attention="dense", rngs=nnx.Rngs(0))
    exact = nn.SelfAttention(12, num_heads=3, attention="exact", rngs=nnx.Rngs(0))
    mask = jnp.asarray(rng.random((2, 7)) > 0.3).at[:, 0].set(True)
    if mask_kind == "pairs":
        mask = mask[:, None, :] & mask[:, :, None]
    want = exact(x, mask=mask)
    np.testing.assert_allclose(dense(x, mask=mask), want, atol=2e-6)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x, mask=mask))(dense, x), want, atol=2e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gelu_is_the_erf_gelu(dtype, maybe_jit):
    from viva_tensor.models.minilm import _gelu

    x = np.concatenate([np.linspace(-9, 9, 3001), [0.0, -40.0, 40.0]]).astype(np.float32)
    want = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    out = maybe_jit(_gelu)(jnp.asarray(x, dtype))
    assert out.dtype == dtype
    rtol, atol = (1e-6, 1e-6) if dtype == jnp.float32 else (1e-2, 1e-2)
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.asarray(out, np.float32), jax.nn.gelu(jnp.asarray(x, dtype), approximate=False)
                               .astype(jnp.float32), rtol=rtol, atol=atol)
    assert np.isnan(np.asarray(_gelu(jnp.array([jnp.nan], dtype)), np.float32)).all()


def test_pack_all_fills_long_rows_first_and_keeps_every_sentence():
    from viva_tensor.models import minilm

    lengths = [230, 20, 200, 5, 40, 150, 7, 100, 30, 3]
    rows = minilm._pack_all(lengths, 128, 256)
    assert list(rows) == [128, 256]  # shortest capacity first
    assert sorted(i for rs in rows.values() for row in rs for i in row) == list(range(len(lengths)))
    for capacity, rs in rows.items():
        for row in rs:
            assert sum(lengths[i] for i in row) <= capacity and len(row) <= minilm._segments(capacity)
    # the three long sentences open 256-token rows; best fit puts the 100 with the 150, the 40 with the 200
    assert sorted(row[0] for row in rows[256]) == [0, 2, 5]
    assert [row for row in rows[256] if row[0] == 5][0][1] == 7
    assert sum(lengths[i] for row in rows[128] for i in row) <= 128 * len(rows[128])
    # a 512-token model: a 300-token sentence's row (bucket 512) takes a 200-token one
    assert minilm._pack_all([300, 200], 128, 512) == {512: [[0, 1]]}
