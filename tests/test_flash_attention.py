"""Tests for viva_tensor.flash_attention against jax.nn.dot_product_attention (an independent oracle)."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from viva_tensor import errors, memory
from viva_tensor import flash_attention as fa

F32_TOL = dict(rtol=1e-5, atol=1e-5)


def _normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _visible(B, N, T, S, *, mask=None, causal=False, window=None, qlen=None, kvlen=None):
    """NumPy (B, N, T, S) visibility, written from jax.nn's documented semantics."""
    vis = np.ones((B, N, T, S), bool)
    i = np.arange(T)[:, None]
    j = np.arange(S)[None, :]
    if causal:
        vis &= j <= i
    if window is not None:
        left, right = (window, window) if isinstance(window, int) else window
        vis &= (j >= i - left) & (j <= i + right)
    if qlen is not None:
        vis &= (np.arange(T)[None, :, None] < np.asarray(qlen)[:, None, None])[:, None]
    if kvlen is not None:
        vis &= (np.arange(S)[None, None, :] < np.asarray(kvlen)[:, None, None])[:, None]
    if mask is not None:
        m = np.asarray(mask)
        vis &= np.broadcast_to(m.reshape((1,) * (4 - m.ndim) + m.shape), vis.shape)
    return vis


# name: (B, T, S, N, K, H, kwargs, bias shape, mask shape, (block_q, block_kv))
CASES = {
    "causal_odd_T_lt_S": (1, 37, 53, 2, 2, 8, {"is_causal": True}, None, None, (16, 16)),
    "gqa_window": (2, 50, 50, 6, 2, 8, {"local_window_size": (5, 3)}, None, None, (8, 16)),
    "mqa_causal_window_bias": (1, 45, 45, 4, 1, 8, {"is_causal": True, "local_window_size": (7, 0)},
                               (1, 4, 45, 45), None, (16, 8)),
    "bias_full_mask": (2, 33, 41, 2, 2, 8, {}, (2, 2, 33, 41), (2, 1, 33, 41), (16, 16)),
    "lengths": (3, 40, 48, 2, 2, 8, {"query_seq_lengths": [40, 17, 1], "key_value_seq_lengths": [48, 9, 30]},
                None, None, (16, 16)),
}
SLOW_CASES = {
    "blocks_bigger_than_seq": (1, 20, 30, 2, 2, 8, {}, (1, 1, 1, 30), (1, 2, 20, 1), (64, 64)),
    "default_blocks": (1, 70, 90, 2, 2, 8, {"is_causal": True}, (70, 90), None, (None, None)),
    "causal_T_gt_S": (1, 72, 40, 2, 1, 8, {"is_causal": True}, None, None, (16, 32)),
    "causal": (2, 64, 64, 4, 4, 16, {"is_causal": True}, None, None, (16, 16)),
    "plain": (2, 64, 64, 4, 4, 16, {}, None, None, (16, 32)),
    "window_int": (1, 64, 64, 2, 2, 8, {"local_window_size": 4}, None, None, (8, 8)),
    "window_T_gt_S_empty_rows": (1, 60, 20, 2, 2, 8, {"local_window_size": (3, 2)}, None, None, (16, 8)),
    "bias_row_col": (2, 30, 34, 4, 2, 8, {"is_causal": True}, (2, 1, 1, 34), (1, 4, 30, 34), (8, 16)),
    "everything": (2, 57, 61, 6, 3, 16, {"is_causal": True, "local_window_size": (20, 0),
                                          "query_seq_lengths": [57, 31], "key_value_seq_lengths": [50, 61]},
                   (1, 6, 57, 61), (2, 1, 57, 61), (16, 24)),
    "block_1x1": (1, 9, 11, 2, 2, 4, {"is_causal": True}, None, None, (1, 1)),
    "head_dim_odd": (2, 31, 31, 3, 3, 5, {}, (1, 3, 31, 31), None, (32, 8)),
}


def _inputs(case, dtype=jnp.float32):
    B, T, S, N, K, H, kw, bias_shape, mask_shape, blocks = case
    q, k, v = _normal(1, (B, T, N, H), dtype), _normal(2, (B, S, K, H), dtype), _normal(3, (B, S, K, H), dtype)
    bias = None if bias_shape is None else _normal(4, bias_shape)
    mask = None
    if mask_shape is not None:
        mask = np.asarray(jax.random.bernoulli(jax.random.key(5), 0.7, mask_shape))
    kw = dict(kw)
    for name in ("query_seq_lengths", "key_value_seq_lengths"):
        if name in kw:
            kw[name] = jnp.asarray(kw[name], jnp.int32)
    vis = _visible(B, N, T, S, mask=mask, causal=kw.get("is_causal", False), window=kw.get("local_window_size"),
                   qlen=kw.get("query_seq_lengths"), kvlen=kw.get("key_value_seq_lengths"))
    seen = vis.any(-1).transpose(0, 2, 1)[..., None]  # (B, T, N, 1): rows that see some key
    return q, k, v, bias, (None if mask is None else jnp.asarray(mask)), kw, blocks, seen


def _out_and_grads(fn, q, k, v, bias, seen=None, jit=True):
    """One compiled call: the output and the gradients of sum(out * w) (rows that see nothing included:
    both return the mean of V there)."""
    w = _normal(9, q.shape).astype(q.dtype)

    def go(q, k, v, b):
        out, vjp = jax.vjp(fn, q, k, v, b)
        return out, vjp(w)

    return (jax.jit(go) if jit else go)(q, k, v, bias)


@functools.cache
def _vjp_program(attention, static):
    """``jit`` of (out, VJP of sum(out * w)) of ``attention(q, k, v, bias, **static)`` over (q, k, v, bias), cached on
    (attention, static options): tests that differ only in their values (the NaN and huge-logit cases) share one
    compiled program per static configuration and shapes."""

    def go(q, k, v, b, w):
        out, vjp = jax.vjp(lambda q, k, v, b: attention(q, k, v, b, **dict(static)), q, k, v, b)
        return out, vjp(w)

    return jax.jit(go)


def _shared_out_and_grads(attention, q, k, v, bias, **static):
    """:func:`_out_and_grads` of ``attention`` with static options through :func:`_vjp_program`."""
    w = _normal(9, q.shape).astype(q.dtype)
    return _vjp_program(attention, tuple(sorted(static.items())))(q, k, v, bias, w)


def _check_case(case):
    q, k, v, bias, mask, kw, blocks, seen = _inputs(case)
    out, g_ours = _out_and_grads(
        lambda *a: fa.dot_product_attention(*a, mask, block_q=blocks[0], block_kv=blocks[1], **kw), q, k, v, bias, seen)
    ref, g_ref = _out_and_grads(lambda *a: jax.nn.dot_product_attention(*a, mask, **kw), q, k, v, bias, seen)
    np.testing.assert_allclose(out, ref, **F32_TOL)
    for name, a, b in zip("qkvb", g_ours, g_ref, strict=False):
        if b is None:
            assert a is None
            continue
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=f"gradient of {name}")


@pytest.mark.parametrize("name", list(CASES))
def test_matches_jax_nn_forward_and_gradients(name):
    _check_case(CASES[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_CASES))
def test_matches_jax_nn_more_cases(name):
    _check_case(SLOW_CASES[name])


@pytest.mark.parametrize("name", ["bias_full_mask", pytest.param("causal_odd_T_lt_S", marks=pytest.mark.slow)])
def test_bfloat16_within_stated_tolerance(name):
    # bfloat16 inputs, float32 statistics: compared with jax.nn in float32 on the same (rounded) inputs.
    # Stated tolerance: outputs within 2e-2, gradients within 3% of the largest gradient entry.
    q, k, v, bias, mask, kw, blocks, seen = _inputs(CASES[name], jnp.bfloat16)
    out, g_ours = _out_and_grads(
        lambda *a: fa.dot_product_attention(*a, mask, block_q=blocks[0], block_kv=blocks[1], **kw), q, k, v, bias, seen)
    assert out.dtype == jnp.bfloat16
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref, g_ref = _out_and_grads(lambda *a: jax.nn.dot_product_attention(*a, mask, **kw), *f32, bias, seen)
    np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(g_ours[:3], g_ref[:3], strict=False):
        assert a.dtype == jnp.bfloat16
        scale = float(jnp.abs(b).max())
        np.testing.assert_allclose(a.astype(jnp.float32), b, atol=3e-2 * scale, rtol=0)


def test_three_dimensional_layout_and_maybe_jit(maybe_jit, dtype):
    q, k, v = _normal(1, (33, 4, 8), dtype), _normal(2, (21, 2, 8), dtype), _normal(3, (21, 2, 8), dtype)
    bias = _normal(4, (4, 33, 21))
    f = maybe_jit(lambda q, k, v, b: fa.dot_product_attention(q, k, v, b, is_causal=True, block_q=8, block_kv=8))
    out = f(q, k, v, bias)
    assert out.shape == q.shape and out.dtype == dtype
    ref = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), bias, is_causal=True)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=tol, atol=tol)


# Numerical gradients (check_grads), NaN and huge logits for every implementation: tests/attention_contract.py.


def test_fully_masked_rows_average_v_as_jax_nn():
    # A row that sees no key (mask, lengths, a window that leaves it nothing) gets the mean of V, as jax.nn;
    # its gradient goes to V only (1/S per key), none to q, k or the bias.
    B, T, S, N, H = 2, 20, 24, 2, 8
    q, k, v = _normal(1, (B, T, N, H)), _normal(2, (B, S, N, H)), _normal(3, (B, S, N, H))
    mask = np.ones((B, 1, T, S), bool)
    mask[0, 0, 5] = False  # row 5 of example 0 sees nothing
    mask = jnp.asarray(mask)
    kvlen = jnp.array([24, 0], jnp.int32)  # example 1 sees no key at all
    bias = _normal(4, (B, N, T, S))
    ours, g_ours = _out_and_grads(lambda *a: fa.dot_product_attention(*a, mask, key_value_seq_lengths=kvlen,
                                                                      block_q=8, block_kv=8), q, k, v, bias)
    ref, g_ref = _out_and_grads(lambda *a: jax.nn.dot_product_attention(*a, mask, key_value_seq_lengths=kvlen),
                                q, k, v, bias)
    np.testing.assert_allclose(ours, ref, **F32_TOL)
    np.testing.assert_allclose(ours[1, 0, 0], v[1, :, 0].mean(0), **F32_TOL)
    for a, b in zip(g_ours, g_ref, strict=False):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    assert float(jnp.abs(g_ours[0][1]).max()) == 0.0 and float(jnp.abs(g_ours[3][1]).max()) == 0.0
    # a window that hides every key block from the last query blocks: those rows are merged in closed form
    window = dict(local_window_size=(2, 1))
    q2, k2, v2 = _normal(5, (1, 40, 2, 8)), k[:1, :21], v[:1, :21]  # 21 keys: the last key block is padded
    out = fa.dot_product_attention(q2, k2, v2, block_q=8, block_kv=8, **window)
    np.testing.assert_allclose(out, jax.nn.dot_product_attention(q2, k2, v2, **window), **F32_TOL)
    np.testing.assert_allclose(out[0, 39], jnp.broadcast_to(v2[0].mean(0), (2, 8)), **F32_TOL)


def _nan_cases():
    B, T, N, K, H = 1, 24, 2, 1, 4
    q, k, v, b = _normal(1, (B, T, N, H)), _normal(2, (B, T, K, H)), _normal(3, (B, T, K, H)), _normal(4, (B, N, T, T))
    nan, inf = jnp.nan, jnp.inf
    return {
        "nan_key": (q, k.at[0, 5, 0, 1].set(nan), v, b, None),
        "inf_key": (q, k.at[0, 5, 0, 1].set(inf), v, b, None),
        "nan_value_in_a_skipped_block": (q, k, v.at[0, 20, 0, 1].set(nan), b, None),
        "nan_bias": (q, k, v, b.at[0, 1, 9, 3].set(nan), None),
        "nan_bias_hidden_by_causal": (q, k, v, b.at[0, 1, 3, 9].set(nan), None),
        "inf_bias": (q, k, v, b.at[0, 1, 9, 3].set(inf), None),
        "row_of_minus_inf_bias": (q, k, v, b.at[0, 1, 9, :].set(-inf), None),
        "scale_nan": (q, k, v, b, float("nan")),
    }


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", list(_nan_cases()))
def test_nan_in_nan_out_as_jax_nn_forward_and_backward(case, causal):
    # NaN exactly where jax.nn gives NaN, in the output and in every gradient (8 x 8 blocks: some skipped), under
    # jit and eagerly. The reference runs op by op: under jit, XLA:CPU gives jax.nn finite rows for scale=nan.
    q, k, v, b, scale = _nan_cases()[case]
    kw = dict(scale=scale, is_causal=causal)
    ref, g_ref = _out_and_grads(lambda *a: jax.nn.dot_product_attention(*a, **kw), q, k, v, b, jit=False)
    ours, g_ours = _shared_out_and_grads(fa.dot_product_attention, q, k, v, b, block_q=8, block_kv=8, **kw)
    eager = fa.dot_product_attention(q, k, v, b, block_q=8, block_kv=8, **kw)
    np.testing.assert_array_equal(eager, ours)
    assert bool(jnp.isnan(ref).any()) or case.endswith("hidden_by_causal") or case.startswith("row_of")
    for name, a, r in zip(["out", "dq", "dk", "dv", "dbias"], (ours, *g_ours), (ref, *g_ref), strict=False):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(r), err_msg=name)
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=2e-5, err_msg=name)  # NaN positions equal, the rest close


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("magnitude", [1e10, 1e20, 3e38])
def test_huge_logits_jit_equals_eager_equals_jax_nn(magnitude, causal):
    # Logits of magnitude 1e10 .. 3e38 (from the bias, so that jax.nn's logits do not overflow either): the
    # softmax is nearly one-hot, and at 3e38 some visible logits fall below jax.nn's hidden value.
    q, k, v = _normal(1, (1, 24, 2, 4)), _normal(2, (1, 24, 2, 4)), _normal(3, (1, 24, 2, 4))
    bias = magnitude * jax.random.uniform(jax.random.key(4), (1, 2, 24, 24), minval=-1.0, maxval=1.0)
    ref, g_ref = _shared_out_and_grads(jax.nn.dot_product_attention, q, k, v, bias, is_causal=causal)
    for blocks in [(8, 8), (16, 8), (None, None)]:
        eager = fa.dot_product_attention(q, k, v, bias, is_causal=causal, block_q=blocks[0], block_kv=blocks[1])
        jitted, g_ours = _shared_out_and_grads(fa.dot_product_attention, q, k, v, bias, is_causal=causal,
                                               block_q=blocks[0], block_kv=blocks[1])
        np.testing.assert_array_equal(eager, jitted)
        assert bool(jnp.all(jnp.isfinite(jitted)))
        np.testing.assert_allclose(jitted, ref, **F32_TOL)
        for name, a, r in zip("qkvb", g_ours, g_ref, strict=False):
            assert bool(jnp.all(jnp.isfinite(a))), name
            np.testing.assert_allclose(a, r, rtol=1e-4, atol=2e-5, err_msg=f"gradient of {name} {blocks}")
        if magnitude < 1e30:  # the same magnitude from the scale (issue 12: NaN under jit only, was)
            def g(q, k, v):
                return fa.dot_product_attention(q, k, v, scale=magnitude, is_causal=causal, block_q=blocks[0],
                                                block_kv=blocks[1])

            eager, jitted = g(q, k, v), jax.jit(g)(q, k, v)
            np.testing.assert_array_equal(eager, jitted)
            np.testing.assert_allclose(jitted, jax.nn.dot_product_attention(q, k, v, scale=magnitude,
                                                                            is_causal=causal), **F32_TOL)


def test_vmap_and_no_retracing():
    q, k, v = _normal(1, (3, 2, 17, 2, 8)), _normal(2, (3, 2, 19, 2, 8)), _normal(3, (3, 2, 19, 2, 8))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(q, k, v):
        return jax.vmap(lambda a, b, c: fa.dot_product_attention(a, b, c, is_causal=True, block_q=8, block_kv=8))(
            q, k, v)

    out = f(q, k, v)
    out = f(q + 1.0, k, v)
    # the reference under jit: one compiled program each instead of every operation of the vmapped (and
    # differentiated) jax.nn compiled for its shapes one by one
    reference = jax.vmap(lambda a, b, c: jax.nn.dot_product_attention(a, b, c, is_causal=True))
    ref = jax.jit(reference)(q + 1.0, k, v)
    np.testing.assert_allclose(out, ref, **F32_TOL)
    g = jax.grad(lambda q: f(q, k, v).sum())(q)
    g_ref = jax.jit(jax.grad(lambda q: reference(q, k, v).sum()))(q)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=2e-5)


def _temp(fn, T, S=None, causal=True, grad=False):
    shape_q = jax.ShapeDtypeStruct((1, T, 4, 32), jnp.float32)
    shape_kv = jax.ShapeDtypeStruct((1, S or T, 4, 32), jnp.float32)
    f = lambda q, k, v: fn(q, k, v, is_causal=causal)  # noqa: E731
    if grad:
        f = jax.value_and_grad(lambda q, k, v: fn(q, k, v, is_causal=causal).sum(), (0, 1, 2))
    return memory.compiled_memory(f, shape_q, shape_kv, shape_kv).temp_bytes


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "value_and_grad"])
def test_compiled_memory_grows_linearly(grad):
    ours = [_temp(fa.dot_product_attention, T, grad=grad) for T in (2048, 4096)]
    theirs = [_temp(jax.nn.dot_product_attention, T, grad=grad) for T in (2048, 4096)]
    assert ours[1] <= 2.2 * ours[0], ours
    assert theirs[1] >= 3.5 * theirs[0], theirs  # quadratic
    assert ours[1] * 20 <= theirs[1], (ours, theirs)


def test_only_visible_blocks_are_visited():
    # The loop bounds decide which (query block, key block) pairs are computed: check them against the
    # pairs that hold at least one visible logit, counted in NumPy.
    def visited(st, nq, nkv):
        def kv(i):
            return range(*(int(x) for x in fa._kv_range(st, jnp.int32(i * st.block_q), nkv)))

        def q(j):
            return range(*(int(x) for x in fa._q_range(st, jnp.int32(j * st.block_kv), nq)))

        fwd = {(i, j) for i in range(nq) for j in kv(i)}
        bwd = {(i, j) for j in range(nkv) for i in q(j)}
        return fwd, bwd

    for causal, window, T, S, bq, bkv in [(True, None, 64, 64, 8, 8), (True, (16, 0), 64, 64, 8, 16),
                                          (False, (5, 9), 50, 70, 8, 16), (True, None, 40, 24, 16, 8)]:
        st = fa._Static(scale=1.0, causal=causal, window=window, block_q=bq, block_kv=bkv, seq_q=T, seq_kv=S)
        nq, nkv = -(-T // bq), -(-S // bkv)
        vis = _visible(1, 1, T, S, causal=causal, window=window)[0, 0]
        needed = {(i, j) for i in range(nq) for j in range(nkv)
                  if vis[i * bq:(i + 1) * bq, j * bkv:(j + 1) * bkv].any()}
        fwd, bwd = visited(st, nq, nkv)
        assert fwd == needed and bwd == needed
        if causal:
            assert len(needed) < nq * nkv


# ---- errors -----------------------------------------------------------------------------------------


def _qkv(T=8, S=8, N=2, K=2, H=4, dtype=jnp.float32):
    return jnp.zeros((1, T, N, H), dtype), jnp.zeros((1, S, K, H), dtype), jnp.zeros((1, S, K, H), dtype)


def test_errors_name_the_argument():
    q, k, v = _qkv()
    with pytest.raises(errors.DimensionError, match="argument 'query'"):
        fa.dot_product_attention(q[0, :, 0], k, v)
    with pytest.raises(errors.DimensionError, match="argument 'key'.*rank 4"):
        fa.dot_product_attention(q, k[0], v)
    with pytest.raises(errors.DTypeError, match="argument 'key'.*float32"):
        fa.dot_product_attention(q, k.astype(jnp.bfloat16), v)
    with pytest.raises(errors.DTypeError, match="argument 'query'"):
        fa.dot_product_attention(q.astype(jnp.int32), k, v)
    with pytest.raises(errors.ShapeMismatch, match="argument 'key'.*divides the 3 query heads"):
        fa.dot_product_attention(jnp.zeros((1, 8, 3, 4)), k, v)
    with pytest.raises(errors.ShapeMismatch, match="argument 'key'.*head dim 4"):
        fa.dot_product_attention(q, jnp.zeros((1, 8, 2, 5)), jnp.zeros((1, 8, 2, 5)))
    with pytest.raises(errors.ShapeMismatch, match="argument 'value'"):
        fa.dot_product_attention(q, k, v[:, :4])
    with pytest.raises(errors.ShapeMismatch, match="argument 'key'.*batch 1"):
        fa.dot_product_attention(q, jnp.zeros((2, 8, 2, 4)), jnp.zeros((2, 8, 2, 4)))
    with pytest.raises(errors.DTypeError, match="argument 'mask'.*boolean"):
        fa.dot_product_attention(q, k, v, mask=jnp.ones((8, 8)))
    with pytest.raises(errors.BroadcastError, match="argument 'mask'"):
        fa.dot_product_attention(q, k, v, mask=jnp.ones((1, 2, 8, 3), bool))
    with pytest.raises(errors.BroadcastError, match="argument 'bias'"):
        fa.dot_product_attention(q, k, v, bias=jnp.ones((3, 8, 8)))
    with pytest.raises(errors.DimensionError, match="argument 'bias'.*at most 4"):
        fa.dot_product_attention(q, k, v, bias=jnp.ones((1, 1, 2, 8, 8)))
    with pytest.raises(errors.ShapeMismatch, match="argument 'query_seq_lengths'"):
        fa.dot_product_attention(q, k, v, query_seq_lengths=jnp.array([1, 2], jnp.int32))
    with pytest.raises(errors.DTypeError, match="argument 'key_value_seq_lengths'"):
        fa.dot_product_attention(q, k, v, key_value_seq_lengths=jnp.array([1.0]))
    for window in [(-1, 2), (1, 2, 3), 1.5, "3"]:
        with pytest.raises(errors.ConfigError, match="argument 'local_window_size'"):
            fa.dot_product_attention(q, k, v, local_window_size=window)
    for name in ("block_q", "block_kv"):
        for bad in (0, -4, 2.5, True):
            with pytest.raises(errors.ConfigError, match=f"argument '{name}'"):
                fa.dot_product_attention(q, k, v, **{name: bad})
    with pytest.raises(errors.ShapeMismatch, match="non-empty"):
        fa.dot_product_attention(q[:, :0], k, v)


def test_errors_of_issue_12():
    q, k, v = _qkv()
    with pytest.raises(errors.ShapeMismatch, match="argument 'query'.*non-empty"):  # was ZeroDivisionError
        fa.dot_product_attention(q[:, :, :0], k[:, :, :0], v[:, :, :0])
    with pytest.raises(errors.ShapeMismatch, match="argument 'key'.*non-empty"):
        fa.dot_product_attention(q, k[:, :, :0], v[:, :, :0])
    for bad in ("a", [1.0], True, jnp.ones(2)):
        with pytest.raises(errors.ConfigError, match="argument 'scale'.*a real number"):
            fa.dot_product_attention(q, k, v, scale=bad)
    with pytest.raises(errors.ConfigError, match="argument 'scale'.*traced.*query \\* s"):
        jax.jit(lambda s: fa.dot_product_attention(q, k, v, scale=s))(0.5)
    for good in (np.float32(0.5), jnp.float32(0.5), np.int64(1), 0.5):  # concrete scalars are fine
        np.testing.assert_allclose(fa.dot_product_attention(q, k, v, scale=good),
                                   jax.nn.dot_product_attention(q, k, v, scale=float(good)), **F32_TOL)
    for lengths in (np.array([2**32 + 3]), [2**32 + 3], np.array([-1])):  # JAX would wrap 2**32 + 3 to 3
        with pytest.raises(errors.ConfigError, match="argument 'key_value_seq_lengths'.*int32"):
            fa.dot_product_attention(q, k, v, key_value_seq_lengths=lengths)
    fa.dot_product_attention(q, k, v, key_value_seq_lengths=np.array([3], np.int64))  # fits: accepted
    q64 = np.zeros((1, 8, 2, 4))
    for name, args in [("query", (q64, k, v)), ("key", (q, np.asarray(k, np.float64), v)),
                       ("value", (q, k, np.asarray(v, np.float64)))]:
        with pytest.raises(errors.DTypeError, match=f"argument '{name}'.*float64.*astype\\(jnp.float32\\)"):
            fa.dot_product_attention(*args)
    with pytest.raises(errors.DTypeError, match="argument 'bias'.*float64"):
        fa.dot_product_attention(q, k, v, np.zeros((8, 8)))
    with pytest.raises(errors.DTypeError, match="argument 'query'.*an array"):
        fa.dot_product_attention("abc", k, v)
    out = fa.dot_product_attention(q, k, v, block_q=np.int64(4), block_kv=np.int32(4))
    assert out.shape == q.shape


def test_errors_of_gleam_entry_points():
    with pytest.raises(errors.ConfigError, match="argument 'head_dim'"):
        fa.default_config(0)
    with pytest.raises(errors.ConfigError, match="argument 'head_dim'"):
        fa.causal_config(-1)
    with pytest.raises(errors.DimensionError, match="argument 'q'"):
        fa.flash_attention(jnp.zeros((4,)), jnp.zeros((4,)), jnp.zeros((4,)))
    with pytest.raises(errors.ConfigError, match="argument 'config'"):
        fa.flash_attention(jnp.zeros((4, 2)), jnp.zeros((4, 2)), jnp.zeros((4, 2)), {"causal": True})
    with pytest.raises(errors.ShapeMismatch, match="argument 'k'"):
        fa.naive_attention(jnp.zeros((4, 2)), jnp.zeros((4, 3)), jnp.zeros((4, 3)))


# ---- Gleam-style entry points -----------------------------------------------------------------------


def _numpy_attention(q, k, v, scale, causal):
    s = np.einsum("...th,...sh->...ts", np.float64(q), np.float64(k)) * scale
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ np.float64(v)


def test_configs():
    assert fa.default_config(16) == fa.FlashConfig(scale=0.25, causal=False)
    assert fa.causal_config(16).causal and fa.causal_config(16).scale == 0.25
    with pytest.raises(dataclasses.FrozenInstanceError):
        fa.default_config(16).causal = True  # frozen


@pytest.mark.parametrize("causal", [False, True])
def test_naive_attention_matches_numpy(causal, maybe_jit):
    q, k, v = _normal(1, (2, 9, 4)), _normal(2, (2, 11, 4)), _normal(3, (2, 11, 4))
    out = maybe_jit(lambda a, b, c: fa.naive_attention(a, b, c, 0.3, is_causal=causal))(q, k, v)
    np.testing.assert_allclose(out, _numpy_attention(q, k, v, 0.3, causal), rtol=1e-5, atol=1e-5)


# Layout x dtype x (eager, jit), pairwise: every layout in both dtypes, every layout and every dtype both eagerly and
# under jit (6 of the 12 combinations; each call compiles three programs: the attention and two memory analyses).
GLEAM_CASES = [((40, 8), "float32", False), ((40, 8), "bfloat16", True), ((2, 40, 8), "float32", True),
               ((2, 40, 8), "bfloat16", False), ((2, 40, 3, 8), "float32", False), ((2, 40, 3, 8), "bfloat16", True)]


@pytest.mark.parametrize("shape, dtype, jit", GLEAM_CASES,
                         ids=[f"{len(s)}d-{d}-{'jit' if j else 'eager'}" for s, d, j in GLEAM_CASES])
def test_flash_attention_gleam_layouts(shape, dtype, jit):
    dtype = jnp.dtype(dtype)
    q, k, v = (_normal(i, shape, dtype) for i in (1, 2, 3))
    config = fa.FlashConfig(block_q=16, block_kv=16, scale=None, causal=True)
    f = lambda a, b, c: fa.flash_attention(a, b, c, config)  # noqa: E731
    result = (jax.jit(f) if jit else f)(q, k, v)
    assert isinstance(result, fa.FlashResult) and result.output.shape == shape and result.output.dtype == dtype
    f32 = [np.asarray(x.astype(jnp.float32)) for x in (q, k, v)]
    if len(shape) == 4:
        f32 = [x.transpose(0, 2, 1, 3) for x in f32]
    ref = _numpy_attention(*f32, 1 / np.sqrt(8), True)
    if len(shape) == 4:
        ref = ref.transpose(0, 2, 1, 3)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(result.output.astype(jnp.float32), ref, rtol=tol, atol=tol)


def test_flash_attention_memory_is_measured():
    q = jax.ShapeDtypeStruct((2048, 64), jnp.float32)
    x = jnp.zeros(q.shape)
    result = fa.flash_attention(x, x, x, fa.default_config(64))
    naive = memory.compiled_memory(lambda a, b, c: jax.nn.dot_product_attention(
        a[None, :, None], b[None, :, None], c[None, :, None]), q, q, q).temp_bytes
    assert 0 < result.memory_bytes < naive / 4  # the naive temporaries hold the 2048 x 2048 logits
    assert 75.0 < result.memory_saved_percent < 100.0


# ---- Flax NNX adapter -------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_nnx_multi_head_attention_adapter(causal):
    kw = dict(num_heads=4, in_features=16, qkv_features=32, decode=False)
    ours = nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(0), attention_fn=fa.attention_fn)
    ref = nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(0))
    x = _normal(1, (2, 3, 21, 16))  # two batch dims
    mask = nnx.make_causal_mask(jnp.ones((2, 3, 21))) if causal else None

    def loss(model):
        return model(x, mask=mask).sum()

    # ours eagerly and under nnx.jit (with its gradient); the reference under nnx.jit only: one compiled program
    # each instead of every operation of the module and of its VJP compiled one by one
    out_and_grad = nnx.jit(lambda model: (model(x, mask=mask), nnx.grad(loss)(model)))
    ours_jit, g_ours = out_and_grad(ours)
    ref_out, g_ref = out_and_grad(ref)
    np.testing.assert_allclose(ours(x, mask=mask), ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours_jit, ref_out, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(nnx.to_pure_dict(g_ours), nnx.to_pure_dict(g_ref), rtol=1e-4, atol=1e-4)


def test_nnx_adapter_rejects_dropout_and_sowing():
    layer = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, dropout_rate=0.1,
                                   rngs=nnx.Rngs(0), attention_fn=fa.attention_fn)
    x = _normal(1, (1, 5, 8))
    with pytest.raises(errors.InvalidOp, match="argument 'dropout_rate'"):
        layer(x, deterministic=False)
    assert layer(x, deterministic=True).shape == (1, 5, 8)
    sow = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(0),
                                 attention_fn=fa.attention_fn)
    with pytest.raises(errors.InvalidOp, match="argument 'module'"):
        sow(x, sow_weights=True)


# ---- properties -------------------------------------------------------------------------------------


@pytest.mark.slow
@settings(max_examples=8, deadline=None)
@given(
    T=st.integers(1, 40), S=st.integers(1, 40), groups=st.sampled_from([(2, 1), (2, 2), (4, 2)]),
    causal=st.booleans(), block_q=st.integers(1, 24), block_kv=st.integers(1, 24),
)
def test_property_matches_jax_nn_for_any_sizes(T, S, groups, causal, block_q, block_kv):
    N, K = groups
    q, k, v = _normal(T, (1, T, N, 4)), _normal(S, (1, S, K, 4)), _normal(7, (1, S, K, 4))
    out = fa.dot_product_attention(q, k, v, is_causal=causal, block_q=block_q, block_kv=block_kv)
    ref = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    np.testing.assert_allclose(out, ref, **F32_TOL)
