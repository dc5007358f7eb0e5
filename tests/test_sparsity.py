"""Tests for viva_tensor.sparsity against a NumPy reference of 2:4 pruning written from its definition."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from viva_tensor import sparsity
from viva_tensor.errors import DimensionError, DTypeError, InvalidShape, ShapeMismatch


def ref_prune(w, score):
    """(pruned dense, kept values (..., G, 2), positions (..., G, 2)) by a plain loop over groups."""
    w = np.asarray(w, np.float32)
    score = np.asarray(score, np.float64)
    n = w.shape[-1]
    pad = -n % 4
    wp = np.concatenate([w, np.zeros(w.shape[:-1] + (pad,), np.float32)], axis=-1)
    sp = np.concatenate([score, np.zeros(score.shape[:-1] + (pad,))], axis=-1)
    wg = wp.reshape(-1, wp.shape[-1] // 4, 4)
    sg = sp.reshape(-1, sp.shape[-1] // 4, 4)
    pruned = np.zeros_like(wg)
    values = np.zeros(wg.shape[:-1] + (2,), np.float32)
    pos = np.zeros(wg.shape[:-1] + (2,), np.int64)
    for r in range(wg.shape[0]):
        for g in range(wg.shape[1]):
            order = sorted(range(4), key=lambda i: (-sg[r, g, i], i))[:2]
            keep = sorted(order)
            pos[r, g] = keep
            values[r, g] = wg[r, g, keep]
            pruned[r, g, keep] = wg[r, g, keep]
    lead = w.shape[:-1]
    return (
        pruned.reshape(*lead, -1)[..., :n],
        values.reshape(*lead, -1, 2),
        pos.reshape(*lead, -1, 2),
    )


def ref_pack(pos):
    nib = pos[..., 0] | (pos[..., 1] << 2)
    if nib.shape[-1] % 2:
        nib = np.concatenate([nib, np.zeros(nib.shape[:-1] + (1,), nib.dtype)], axis=-1)
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).astype(np.uint8)


@pytest.mark.parametrize("shape", [(8, 16), (3, 10), (5,), (2, 3, 12)])
def test_prune_magnitude_matches_reference(shape, dtype, maybe_jit, rng):
    w = jnp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype)
    s = maybe_jit(sparsity.prune_24_magnitude)(w)
    w32 = np.asarray(w.astype(jnp.float32))
    pruned, values, pos = ref_prune(w32, np.abs(w32))
    assert s.shape == shape and s.dtype == dtype and s.values.dtype == dtype
    np.testing.assert_array_equal(np.asarray(s.values.astype(jnp.float32)), values)
    np.testing.assert_array_equal(np.asarray(s.positions), ref_pack(pos))
    dense = maybe_jit(sparsity.decompress)(s)
    assert dense.shape == shape and dense.dtype == dtype
    np.testing.assert_array_equal(np.asarray(dense.astype(jnp.float32)), pruned)


def test_prune_gradient_matches_reference(maybe_jit, rng):
    w = rng.standard_normal((6, 20)).astype(np.float32)
    g = rng.standard_normal((6, 20)).astype(np.float32)
    s = maybe_jit(sparsity.prune_24_gradient)(jnp.asarray(w), jnp.asarray(g))
    pruned, values, pos = ref_prune(w, np.abs(w.astype(np.float64) * g))
    np.testing.assert_array_equal(np.asarray(sparsity.decompress(s)), pruned)
    np.testing.assert_array_equal(np.asarray(s.positions), ref_pack(pos))
    # The gradient changes the choice: not the same as magnitude pruning on this data.
    assert not np.array_equal(pruned, ref_prune(w, np.abs(w))[0])


def test_ties_keep_lower_positions():
    s = sparsity.prune_24_magnitude(jnp.ones((1, 8)))
    assert sparsity.decompress(s).tolist() == [[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]]
    assert s.positions.tolist() == [[0x44]]  # i0=0, i1=1 -> 0b0100 in each nibble


def test_exactly_two_of_four_kept(rng):
    w = rng.standard_normal((32, 64)).astype(np.float32)
    dense = np.asarray(sparsity.decompress(sparsity.prune_24_magnitude(jnp.asarray(w))))
    nonzero = (dense != 0).reshape(32, 16, 4).sum(-1)
    assert np.all(nonzero == 2)
    kept = dense.reshape(32, 16, 4)
    dropped = np.where(kept == 0, np.abs(w).reshape(32, 16, 4), -np.inf).max(-1)
    assert np.all(np.where(kept != 0, np.abs(kept), np.inf).min(-1) >= dropped)


@pytest.mark.parametrize("batch", [1, 5])
def test_sparse_matmul(batch, dtype, maybe_jit, rng):
    w = jnp.asarray(rng.standard_normal((12, 24)).astype(np.float32)).astype(dtype)
    x = jnp.asarray(rng.standard_normal((batch, 24)).astype(np.float32)).astype(dtype)
    s = sparsity.prune_24_magnitude(w)
    got = maybe_jit(sparsity.sparse_matmul)(x, s)
    w32 = np.asarray(w.astype(jnp.float32))
    want = np.asarray(x.astype(jnp.float32), np.float64) @ ref_prune(w32, np.abs(w32))[0].T
    assert got.shape == (batch, 12) and got.dtype == dtype
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=tol, atol=tol)


def test_bytes_and_metrics(rng):
    w = rng.standard_normal((64, 128)).astype(np.float32)
    s = sparsity.prune_24_magnitude(jnp.asarray(w))
    assert s.nbytes == 64 * 64 * 4 + 64 * 16  # kept float32 values + 4 bits per group of 4
    assert s.bits_per_value == pytest.approx(17.0)
    assert s.compression_ratio == pytest.approx(32 / 17)
    m = jax.jit(sparsity.compute_metrics)(jnp.asarray(w), s)
    pruned = ref_prune(w, np.abs(w))[0].astype(np.float64)
    assert float(m.sparsity) == pytest.approx(0.5)
    assert float(m.kept_energy) == pytest.approx((pruned**2).sum() / (w.astype(np.float64) ** 2).sum(), rel=1e-5)
    assert float(m.mse) == pytest.approx(((w - pruned) ** 2).mean(), rel=1e-5)
    assert float(m.relative_error) == pytest.approx(np.linalg.norm(w - pruned) / np.linalg.norm(w), rel=1e-5)
    assert m.dense_bytes == w.nbytes and m.sparse_bytes == s.nbytes
    assert m.compression_ratio == pytest.approx(32 / 17)
    bf = sparsity.prune_24_magnitude(jnp.asarray(w).astype(jnp.bfloat16))
    assert bf.bits_per_value == pytest.approx(9.0)


def test_zero_weights_and_non_finite():
    m = sparsity.compute_metrics(jnp.zeros((2, 8)), sparsity.prune_24_magnitude(jnp.zeros((2, 8))))
    assert float(m.kept_energy) == 1.0 and float(m.relative_error) == 0.0 and float(m.sparsity) == 1.0
    w = jnp.array([[1.0, jnp.nan, 0.5, 2.0, 1.0, 2.0, 3.0, 4.0]])
    dense = sparsity.decompress(sparsity.prune_24_magnitude(w))
    assert np.isnan(np.asarray(dense[0, 1]))  # NaN counts as largest: kept, and it propagates
    assert dense[0, 4:].tolist() == [0.0, 0.0, 3.0, 4.0]  # other groups untouched


def test_vmap_and_no_retrace(rng):
    ws = jnp.asarray(rng.standard_normal((3, 4, 8)).astype(np.float32))
    sb = jax.vmap(sparsity.prune_24_magnitude)(ws)
    assert sb.batch_shape == (3,) and sb.shape == (4, 8)
    dense = sparsity.decompress(sb)
    for i in range(3):
        np.testing.assert_array_equal(
            np.asarray(dense[i]), np.asarray(sparsity.decompress(sparsity.prune_24_magnitude(ws[i])))
        )
    m = sparsity.compute_metrics(ws, sb)
    assert float(m.sparsity) == pytest.approx(0.5)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(w, x):
        return sparsity.sparse_matmul(x, sparsity.prune_24_magnitude(w))

    for _ in range(3):
        run(ws[0], jnp.ones((2, 8)))


def test_error_paths():
    with pytest.raises(DTypeError, match="argument 'w': expected a float32, bfloat16 or float16 array, got int32"):
        sparsity.prune_24_magnitude(jnp.ones(8, jnp.int32))
    with pytest.raises(InvalidShape, match="argument 'w': expected a non-empty array of rank >= 1"):
        sparsity.prune_24_magnitude(jnp.float32(1.0))
    with pytest.raises(InvalidShape, match="argument 'w'"):
        sparsity.prune_24_magnitude(jnp.ones((2, 0)))
    with pytest.raises(ShapeMismatch, match=r"argument 'grad': expected shape \(2, 8\)"):
        sparsity.prune_24_gradient(jnp.ones((2, 8)), jnp.ones((8, 2)))
    s = sparsity.prune_24_magnitude(jnp.ones((2, 8)))
    with pytest.raises(ShapeMismatch, match="argument 'x': expected a last dim of 8"):
        sparsity.sparse_matmul(jnp.ones((1, 7)), s)
    with pytest.raises(DTypeError, match="argument 'x': expected a floating array"):
        sparsity.sparse_matmul(jnp.ones((1, 8), jnp.int32), s)
    with pytest.raises(DimensionError, match="argument 's': expected a \\(out, in\\) weight"):
        sparsity.sparse_matmul(jnp.ones(8), sparsity.prune_24_magnitude(jnp.ones(8)))
    with pytest.raises(DTypeError, match="argument 's': expected a Sparse24Tensor"):
        sparsity.decompress(jnp.ones(8))
    with pytest.raises(ShapeMismatch, match="argument 'original'"):
        sparsity.compute_metrics(jnp.ones((8, 2)), s)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 13), min_size=1, max_size=3).map(tuple),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
)
def test_property_round_trip(shape, seed, dtype):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype)
    s = sparsity.prune_24_magnitude(w)
    dense = sparsity.decompress(s)
    assert dense.shape == shape and dense.dtype == w.dtype
    w32 = np.asarray(w.astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(dense.astype(jnp.float32)), ref_prune(w32, np.abs(w32))[0])
    # Pruning the pruned weights changes nothing (idempotent).
    again = sparsity.decompress(sparsity.prune_24_magnitude(dense))
    np.testing.assert_array_equal(np.asarray(again.astype(jnp.float32)), np.asarray(dense.astype(jnp.float32)))
