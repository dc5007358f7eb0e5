"""Blockwise (flash) attention: O(n) memory forward and backward, a drop-in for jax.nn.

:func:`dot_product_attention` takes what :func:`jax.nn.dot_product_attention` takes and means the same
(layout ``(B, T, N, H)`` or ``(T, N, H)``, grouped-query attention, boolean masks, additive biases,
causal masks aligned top-left, sliding windows, per-example lengths), but never builds the ``T x S``
matrix of logits. The forward pass walks over blocks of queries; for each it scans the blocks of
keys and values that the causal mask and the window leave visible, keeping a running maximum, a running
sum and a rescaled accumulator in float32 (the online softmax). Only the output and the logsumexp of
each row are kept for the backward pass, a :func:`jax.custom_vjp` in the FlashAttention-2 way
(arXiv:2307.08691): the probabilities are recomputed block by block from the logsumexp, and
``D = rowsum(dO * O)`` replaces the softmax Jacobian.

The Gleam-style entry points (:class:`FlashConfig`, :func:`default_config`, :func:`causal_config`,
:func:`flash_attention`, :func:`naive_attention`) sit beside it; :func:`flash_attention` reports the
temporary memory that XLA's compiler measured, not a formula. :func:`attention_fn` plugs into
``flax.nnx.MultiHeadAttention(..., attention_fn=attention_fn)``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from viva_tensor import flash_attention as fa
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 100, 4, 16))
    >>> out = fa.dot_product_attention(q, k, v, is_causal=True, block_q=32, block_kv=32)
    >>> ref = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    >>> bool(jnp.allclose(out, ref, atol=1e-5))
    True
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from viva_tensor import memory
from viva_tensor.errors import (
    BroadcastError,
    ConfigError,
    DimensionError,
    DTypeError,
    InvalidOp,
    ShapeMismatch,
)

__all__ = [
    "dot_product_attention",
    "FlashConfig",
    "FlashResult",
    "default_config",
    "causal_config",
    "flash_attention",
    "naive_attention",
    "attention_fn",
    "DEFAULT_BLOCK_Q",
    "DEFAULT_BLOCK_KV",
]

#: Query rows per block when ``block_q`` is not given (clamped to the sequence length).
DEFAULT_BLOCK_Q = 256
#: Key/value rows per block when ``block_kv`` is not given (clamped to the sequence length).
DEFAULT_BLOCK_KV = 512

_F32 = jnp.float32
_FLOATS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# --------------------------------------------------------------------------------------------------
# Static description of one call
# --------------------------------------------------------------------------------------------------


class _Static(NamedTuple):
    """Everything about a call that is known when it is traced (hashable: a custom_vjp static arg)."""

    scale: float
    causal: bool
    window: tuple[int, int] | None  # (left, right), clamped to the sequence lengths
    block_q: int
    block_kv: int
    seq_q: int  # T, before padding
    seq_kv: int  # S, before padding


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _auto_block(n: int, target: int) -> int:
    """A block near ``target`` that wastes the least padding: ceil(n / ceil(n / target)), to 8."""
    if n <= target:
        return n
    blocks = -(-n // target)
    return min(_round_up(-(-n // blocks), 8), target)


def _check_block(name: str, value: Any, n: int, target: int) -> int:
    if value is None:
        return _auto_block(n, target)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(argument=name, expected="a positive int or None", got=value)
    return min(int(value), n)


def _check_window(window: Any, seq_q: int, seq_kv: int) -> tuple[int, int] | None:
    if window is None:
        return None
    pair = (window, window) if isinstance(window, (int, np.integer)) else window
    ok = (
        isinstance(pair, (tuple, list))
        and len(pair) == 2
        and all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) and w >= 0 for w in pair)
    )
    if not ok:
        raise ConfigError(
            argument="local_window_size",
            expected="an int >= 0 or a pair (left, right) of ints >= 0",
            got=window,
            hint="(3, 2) lets query i see keys i-3 .. i+2, as in jax.nn.dot_product_attention.",
        )
    limit = seq_q + seq_kv  # a wider window changes nothing; clamping keeps int32 bounds safe
    return (min(int(pair[0]), limit), min(int(pair[1]), limit))


# --------------------------------------------------------------------------------------------------
# Blocks: logits, masks, visible ranges
# --------------------------------------------------------------------------------------------------


def _logits(q_blk, k_blk, scale):
    """(B, bq, K, G, H) x (B, bkv, K, H) -> (B, K, G, bq, bkv) float32 logits times ``scale``."""
    s = jnp.einsum("bqkgh,bskh->bkgqs", q_blk, k_blk, preferred_element_type=_F32)
    return s * jnp.asarray(scale, _F32)


def _slice_pair(x, i0, bq, j0, bkv):
    """The (bq, bkv) block of a 5-D (.., T|1, S|1) bias or mask at rows i0 and columns j0."""
    if x.shape[3] > 1:
        x = lax.dynamic_slice_in_dim(x, i0, bq, axis=3)
    if x.shape[4] > 1:
        x = lax.dynamic_slice_in_dim(x, j0, bkv, axis=4)
    return x


def _block_mask(st: _Static, i0, j0, mask, qlen, kvlen, padded_q: bool, padded_kv: bool):
    """Which logits of the block at (i0, j0) are visible: a 5-D bool array, or None for all."""
    bq, bkv = st.block_q, st.block_kv
    parts = []
    qpos = i0 + lax.broadcasted_iota(jnp.int32, (1, 1, 1, bq, 1), 3)
    kpos = j0 + lax.broadcasted_iota(jnp.int32, (1, 1, 1, 1, bkv), 4)
    if st.causal:
        parts.append(kpos <= qpos)
    if st.window is not None:
        left, right = st.window
        parts.append((kpos >= qpos - left) & (kpos <= qpos + right))
    if padded_kv:
        parts.append(kpos < st.seq_kv)
    if padded_q:
        parts.append(qpos < st.seq_q)
    if kvlen is not None:
        parts.append(kpos < kvlen[:, None, None, None, None])
    if qlen is not None:
        parts.append(qpos < qlen[:, None, None, None, None])
    if mask is not None:
        parts.append(_slice_pair(mask, i0, bq, j0, bkv))
    if not parts:
        return None
    return functools.reduce(jnp.logical_and, parts)


def _scores(st: _Static, q_blk, k_blk, i0, j0, bias, mask, qlen, kvlen, padded_q, padded_kv):
    """Masked float32 logits of one block: scale * q k^T + bias, -inf where not visible."""
    s = _logits(q_blk, k_blk, st.scale)
    if bias is not None:
        s = s + _slice_pair(bias, i0, st.block_q, j0, st.block_kv).astype(_F32)
    visible = _block_mask(st, i0, j0, mask, qlen, kvlen, padded_q, padded_kv)
    if visible is not None:
        s = jnp.where(visible, s, -jnp.inf)
    return s


def _kv_range(st: _Static, i0, num_kv_blocks: int):
    """[lo, hi) of the key/value blocks that some query of the block starting at i0 can see."""
    lo_pos = jnp.int32(0)
    hi_pos = jnp.int32(st.seq_kv)
    last_q = jnp.minimum(i0 + st.block_q, st.seq_q) - 1
    if st.causal:
        hi_pos = jnp.minimum(hi_pos, last_q + 1)
    if st.window is not None:
        left, right = st.window
        lo_pos = jnp.maximum(lo_pos, i0 - left)
        hi_pos = jnp.minimum(hi_pos, last_q + right + 1)
    lo = jnp.clip(lo_pos // st.block_kv, 0, num_kv_blocks)
    hi = jnp.clip((hi_pos + st.block_kv - 1) // st.block_kv, lo, num_kv_blocks)
    return lo, jnp.where(lo_pos < hi_pos, hi, lo)


def _q_range(st: _Static, j0, num_q_blocks: int):
    """[lo, hi) of the query blocks that see some key of the block starting at j0."""
    lo_pos = jnp.int32(0)
    hi_pos = jnp.int32(st.seq_q)
    last_k = jnp.minimum(j0 + st.block_kv, st.seq_kv) - 1
    if st.causal:
        lo_pos = jnp.maximum(lo_pos, j0)
    if st.window is not None:
        left, right = st.window
        lo_pos = jnp.maximum(lo_pos, j0 - right)
        hi_pos = jnp.minimum(hi_pos, last_k + left + 1)
    lo = jnp.clip(lo_pos // st.block_q, 0, num_q_blocks)
    hi = jnp.clip((hi_pos + st.block_q - 1) // st.block_q, lo, num_q_blocks)
    return lo, jnp.where(lo_pos < hi_pos, hi, lo)


def _pad_axis(x, axis: int, size: int):
    if x is None or x.shape[axis] in (1, size):
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _grouped(x, heads_kv: int):
    """A 4-D (B|1, N|1, T|1, S|1) bias or mask as 5-D (B|1, K|1, G|1, T|1, S|1)."""
    if x is None:
        return None
    b, n, t, s = x.shape
    if n == 1:
        return x.reshape(b, 1, 1, t, s)
    return x.reshape(b, heads_kv, n // heads_kv, t, s)


# --------------------------------------------------------------------------------------------------
# Forward and backward kernels (inputs already 4-D and validated)
# --------------------------------------------------------------------------------------------------


def _forward(st: _Static, q, k, v, bias, mask, qlen, kvlen):
    """Output (B, T, N, H) in q.dtype and the float32 logsumexp (B, K, G, Tp) (+inf: empty row)."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    bq, bkv = st.block_q, st.block_kv
    Tp, Sp = _round_up(T, bq), _round_up(S, bkv)
    nq, nkv = Tp // bq, Sp // bkv
    padded_q, padded_kv = Tp != T, Sp != S
    qg = _pad_axis(q, 1, Tp).reshape(B, Tp, K, G, H)
    k, v = _pad_axis(k, 1, Sp), _pad_axis(v, 1, Sp)
    bias = _pad_axis(_pad_axis(_grouped(bias, K), 3, Tp), 4, Sp)
    mask = _pad_axis(_pad_axis(_grouped(mask, K), 3, Tp), 4, Sp)

    def q_block(i, carry):
        out, lse = carry
        i0 = i * bq
        q_blk = lax.dynamic_slice_in_dim(qg, i0, bq, axis=1)

        def kv_block(j, c):
            m, l, acc = c
            j0 = j * bkv
            k_blk = lax.dynamic_slice_in_dim(k, j0, bkv, axis=1)
            v_blk = lax.dynamic_slice_in_dim(v, j0, bkv, axis=1)
            s = _scores(st, q_blk, k_blk, i0, j0, bias, mask, qlen, kvlen, padded_q, padded_kv)
            m_new = jnp.maximum(m, s.max(axis=-1))
            shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # all hidden so far: no NaN
            p = jnp.exp(s - shift[..., None])
            alpha = jnp.exp(m - shift)
            l = alpha * l + p.sum(axis=-1)
            pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v.dtype), v_blk, preferred_element_type=_F32)
            return m_new, l, alpha[..., None] * acc + pv

        init = (
            jnp.full((B, K, G, bq), -jnp.inf, _F32),
            jnp.zeros((B, K, G, bq), _F32),
            jnp.zeros((B, K, G, bq, H), _F32),
        )
        lo, hi = _kv_range(st, i0, nkv)
        m, l, acc = lax.fori_loop(lo, hi, kv_block, init)
        seen = l > 0
        o = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        o = o.transpose(0, 3, 1, 2, 4).reshape(B, bq, N, H).astype(q.dtype)
        row_lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
        out = lax.dynamic_update_slice_in_dim(out, o, i0, axis=1)
        lse = lax.dynamic_update_slice_in_dim(lse, row_lse, i0, axis=3)
        return out, lse

    out0 = jnp.zeros((B, Tp, N, H), q.dtype)
    lse0 = jnp.zeros((B, K, G, Tp), _F32)
    out, lse = lax.fori_loop(0, nq, q_block, (out0, lse0))
    return out[:, :T] if padded_q else out, lse


def _reduce_to(x, shape):
    """Sum a 5-D block over the axes where ``shape`` has size 1 (the bias was broadcast there)."""
    axes = tuple(a for a in range(x.ndim) if shape[a] == 1 and x.shape[a] != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


def _backward(st: _Static, q, k, v, bias, mask, qlen, kvlen, out, lse, dout):
    """Gradients for q, k, v and bias (FlashAttention-2: recompute P block by block from lse)."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    bq, bkv = st.block_q, st.block_kv
    Tp, Sp = _round_up(T, bq), _round_up(S, bkv)
    nq, nkv = Tp // bq, Sp // bkv
    padded_q, padded_kv = Tp != T, Sp != S
    dout = dout.astype(q.dtype)
    delta = jnp.sum(dout.astype(_F32) * out.astype(_F32), axis=-1)  # (B, T, N)
    delta = _pad_axis(delta.reshape(B, T, K, G).transpose(0, 2, 3, 1), 3, Tp)
    qg = _pad_axis(q, 1, Tp).reshape(B, Tp, K, G, H)
    dog = _pad_axis(dout, 1, Tp).reshape(B, Tp, K, G, H)
    kp, vp = _pad_axis(k, 1, Sp), _pad_axis(v, 1, Sp)
    bias_shape = None if bias is None else bias.shape
    bias5 = _pad_axis(_pad_axis(_grouped(bias, K), 3, Tp), 4, Sp)
    mask5 = _pad_axis(_pad_axis(_grouped(mask, K), 3, Tp), 4, Sp)
    scale = jnp.asarray(st.scale, _F32)

    def kv_block(j, carry):
        dq, dk, dv, dbias = carry
        j0 = j * bkv
        k_blk = lax.dynamic_slice_in_dim(kp, j0, bkv, axis=1)
        v_blk = lax.dynamic_slice_in_dim(vp, j0, bkv, axis=1)

        def q_block(i, c):
            dq, dk_j, dv_j, dbias = c
            i0 = i * bq
            q_blk = lax.dynamic_slice_in_dim(qg, i0, bq, axis=1)
            do_blk = lax.dynamic_slice_in_dim(dog, i0, bq, axis=1)
            lse_blk = lax.dynamic_slice_in_dim(lse, i0, bq, axis=3)
            d_blk = lax.dynamic_slice_in_dim(delta, i0, bq, axis=3)
            s = _scores(st, q_blk, k_blk, i0, j0, bias5, mask5, qlen, kvlen, padded_q, padded_kv)
            p = jnp.exp(s - lse_blk[..., None])  # hidden: exp(-inf) = 0; empty row: lse = +inf
            dv_j = dv_j + jnp.einsum("bkgqs,bqkgh->bskh", p.astype(q.dtype), do_blk, preferred_element_type=_F32)
            dp = jnp.einsum("bqkgh,bskh->bkgqs", do_blk, v_blk, preferred_element_type=_F32)
            ds = p * (dp - d_blk[..., None])
            ds_in = ds.astype(q.dtype)
            dq_blk = jnp.einsum("bkgqs,bskh->bqkgh", ds_in, k_blk, preferred_element_type=_F32) * scale
            dq = lax.dynamic_update_slice_in_dim(
                dq, lax.dynamic_slice_in_dim(dq, i0, bq, axis=1) + dq_blk, i0, axis=1
            )
            dk_j = dk_j + jnp.einsum("bkgqs,bqkgh->bskh", ds_in, q_blk, preferred_element_type=_F32) * scale
            if dbias is not None:
                part = _reduce_to(ds, dbias.shape)
                at = (0, 0, 0, i0 if dbias.shape[3] > 1 else 0, j0 if dbias.shape[4] > 1 else 0)
                dbias = lax.dynamic_update_slice(dbias, lax.dynamic_slice(dbias, at, part.shape) + part, at)
            return dq, dk_j, dv_j, dbias

        lo, hi = _q_range(st, j0, nq)
        zeros = jnp.zeros((B, bkv, K, H), _F32)
        dq, dk_j, dv_j, dbias = lax.fori_loop(lo, hi, q_block, (dq, zeros, zeros, dbias))
        dk = lax.dynamic_update_slice_in_dim(dk, dk_j.astype(k.dtype), j0, axis=1)
        dv = lax.dynamic_update_slice_in_dim(dv, dv_j.astype(v.dtype), j0, axis=1)
        return dq, dk, dv, dbias

    init = (
        jnp.zeros((B, Tp, K, G, H), _F32),
        jnp.zeros((B, Sp, K, H), k.dtype),
        jnp.zeros((B, Sp, K, H), v.dtype),
        None if bias5 is None else jnp.zeros(bias5.shape, _F32),
    )
    dq, dk, dv, dbias = lax.fori_loop(0, nkv, kv_block, init)
    dq = dq.reshape(B, Tp, N, H)[:, :T].astype(q.dtype)
    dk, dv = dk[:, :S], dv[:, :S]
    if dbias is not None:
        dbias = dbias[:, :, :, : bias_shape[2], : bias_shape[3]].reshape(bias_shape).astype(bias.dtype)
    return dq, dk, dv, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, bias, mask, qlen, kvlen):
    return _forward(st, q, k, v, bias, mask, qlen, kvlen)[0]


def _flash_fwd(st, q, k, v, bias, mask, qlen, kvlen):
    out, lse = _forward(st, q, k, v, bias, mask, qlen, kvlen)
    return out, (q, k, v, bias, mask, qlen, kvlen, out, lse)


def _flash_bwd(st, res, dout):
    q, k, v, bias, mask, qlen, kvlen, out, lse = res
    dq, dk, dv, dbias = _backward(st, q, k, v, bias, mask, qlen, kvlen, out, lse, dout)
    return dq, dk, dv, dbias, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
# One compiled program per static configuration, also when called eagerly (inlined under an outer jit).
_flash_jit = jax.jit(_flash, static_argnums=0)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _check_rank(name: str, x, ranks: tuple[int, ...]) -> None:
    if x.ndim not in ranks:
        expected = " or ".join(f"{r}-D" for r in ranks)
        layout = "(B, T, N, H) or (T, N, H)" if name in ("query", "key", "value") else "broadcastable"
        raise DimensionError(argument=name, expected=f"a {expected} array {layout}", got=f"shape {x.shape}")


def _as_4d(x):
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _check_pair_shape(name: str, x, target: tuple[int, int, int, int]):
    """A mask or bias: rank <= 4, each axis 1 or the target size (heads 1 or N, as in jax.nn)."""
    if x.ndim > 4:
        raise DimensionError(argument=name, expected="at most 4 dimensions (B, N, T, S)", got=f"shape {x.shape}")
    x4 = _as_4d(x)
    if any(d not in (1, t) for d, t in zip(x4.shape, target)):
        raise BroadcastError(
            argument=name,
            expected=f"a shape broadcastable to (B, N, T, S) = {target}, each axis 1 or full",
            got=f"shape {x.shape}",
        )
    return x4


def _check_lengths(name: str, x, batch: int):
    if x is None:
        return None
    x = jnp.asarray(x)
    if x.shape != (batch,):
        raise ShapeMismatch(argument=name, expected=f"shape ({batch},) (one length per example)", got=x.shape)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise DTypeError(argument=name, expected="an integer array", got=str(x.dtype))
    return x.astype(jnp.int32)


def dot_product_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size: int | tuple[int, int] | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
):
    """Scaled dot-product attention, blockwise: :func:`jax.nn.dot_product_attention` in O(n) memory.

    Computes ``softmax(scale * Q K^T + bias, masked) V`` per head with the meaning of
    :func:`jax.nn.dot_product_attention` (shape letters: B batch, T query length, S key length, N query
    heads, K key/value heads, H head dim). Logits, softmax statistics and the accumulator are float32
    whatever the input dtype; the output has the input dtype. Blocks that the causal mask or the window
    hide entirely are not computed. Differentiable (FlashAttention-2 backward: only the output and the
    row logsumexp are kept) for ``query``, ``key``, ``value`` and ``bias``.

    Unlike jax.nn, a query row that sees no key at all (a fully masked row, a window or lengths that
    leave it nothing) returns 0 with zero, finite gradients; jax.nn returns the mean of ``value`` over
    all keys there. Rows past ``query_seq_lengths`` are 0 in both.

    Args:
        query: ``(B, T, N, H)`` or ``(T, N, H)``, float32, bfloat16 or float16.
        key: ``(B, S, K, H)`` or ``(S, K, H)``, same dtype and rank as ``query``; ``N % K == 0``
            (grouped-query attention; ``K == 1`` is multi-query attention).
        value: same shape and dtype as ``key``.
        bias: optional additive bias of rank <= 4 broadcastable to ``(B, N, T, S)`` (``(N, T, S)``
            for 3-D inputs), each axis 1 or full, as in jax.nn; any float dtype. Its gradient has
            its own shape.
        mask: optional boolean mask, same shapes as ``bias``; True means "attend".
        scale: multiplies the logits; ``1 / sqrt(H)`` when None.
        is_causal: query ``i`` sees keys ``j <= i`` (aligned top-left when T != S, as in jax.nn).
        query_seq_lengths: optional int ``(B,)``: rows at or past the length are 0.
        key_value_seq_lengths: optional int ``(B,)``: keys at or past the length are hidden.
        local_window_size: ``w`` or ``(left, right)`` (ints >= 0): query ``i`` sees keys
            ``i - left .. i + right``.
        block_q: query rows per block (default: about :data:`DEFAULT_BLOCK_Q`, picked to need little
            padding); clamped to T. Any T works: the last block is padded and masked.
        block_kv: key rows per block, likewise (:data:`DEFAULT_BLOCK_KV`).

    Returns:
        The attention output, shape and dtype of ``query``.

    Raises:
        DimensionError: a rank other than 3 or 4, ranks that differ, a mask or bias of rank > 4.
        ShapeMismatch: batch, head dim or key/value shapes that disagree, heads that do not divide,
            lengths of the wrong shape.
        DTypeError: a non-float or mixed dtype, a non-boolean mask, non-integer lengths.
        BroadcastError: a mask or bias that does not broadcast to ``(B, N, T, S)``.
        ConfigError: a bad window or block size.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> q = jax.random.normal(jax.random.key(1), (2, 50, 4, 8))
        >>> kv = jax.random.normal(jax.random.key(2), (2, 70, 2, 8))
        >>> out = dot_product_attention(q, kv, kv, local_window_size=(5, 0), block_q=16, block_kv=16)
        >>> ref = jax.nn.dot_product_attention(q, kv, kv, local_window_size=(5, 0))
        >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
        ((2, 50, 4, 8), True)
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    for name, x in (("query", query), ("key", key), ("value", value)):
        _check_rank(name, x, (3, 4))
        if jnp.dtype(x.dtype) not in _FLOATS:
            raise DTypeError(argument=name, expected="float32, bfloat16 or float16", got=str(x.dtype))
    if key.ndim != query.ndim or value.ndim != query.ndim:
        raise DimensionError(
            argument="key" if key.ndim != query.ndim else "value",
            expected=f"rank {query.ndim} (the rank of 'query')",
            got=f"shape {key.shape if key.ndim != query.ndim else value.shape}",
        )
    if key.dtype != query.dtype or value.dtype != query.dtype:
        bad = "key" if key.dtype != query.dtype else "value"
        raise DTypeError(
            argument=bad,
            expected=f"{query.dtype} (the dtype of 'query')",
            got=str((key if bad == "key" else value).dtype),
            hint="cast query, key and value to one dtype.",
        )
    if value.shape != key.shape:
        raise ShapeMismatch(argument="value", expected=f"shape {key.shape} (the shape of 'key')", got=value.shape)
    out_shape = query.shape
    q4, k4, v4 = _as_4d(query), _as_4d(key), _as_4d(value)
    B, T, N, H = q4.shape
    _, S, K, Hk = k4.shape
    if k4.shape[0] != B:
        raise ShapeMismatch(argument="key", expected=f"batch {B} (the batch of 'query')", got=f"shape {key.shape}")
    if Hk != H:
        raise ShapeMismatch(argument="key", expected=f"head dim {H} (the head dim of 'query')", got=f"shape {key.shape}")
    if N % K != 0:
        raise ShapeMismatch(
            argument="key",
            expected=f"a number of heads that divides the {N} query heads",
            got=f"{K} heads (shape {key.shape})",
            hint="grouped-query attention needs N % K == 0.",
        )
    if T == 0 or S == 0 or H == 0:
        raise ShapeMismatch(argument="query" if T == 0 or H == 0 else "key", expected="non-empty sequences and heads",
                            got=f"shapes {query.shape} and {key.shape}")
    target = (B, N, T, S)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise DTypeError(argument="mask", expected="a boolean array", got=str(mask.dtype),
                             hint="pass an additive mask as 'bias'.")
        mask = _check_pair_shape("mask", mask, target)
    if bias is not None:
        bias = jnp.asarray(bias)
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            bias = bias.astype(_F32)
        bias = _check_pair_shape("bias", bias, target)
    qlen = _check_lengths("query_seq_lengths", query_seq_lengths, B)
    kvlen = _check_lengths("key_value_seq_lengths", key_value_seq_lengths, B)
    st = _Static(
        scale=float(1.0 / math.sqrt(H) if scale is None else scale),
        causal=bool(is_causal),
        window=_check_window(local_window_size, T, S),
        block_q=_check_block("block_q", block_q, T, DEFAULT_BLOCK_Q),
        block_kv=_check_block("block_kv", block_kv, S, DEFAULT_BLOCK_KV),
        seq_q=T,
        seq_kv=S,
    )
    return _flash_jit(st, q4, k4, v4, bias, mask, qlen, kvlen).reshape(out_shape)


# --------------------------------------------------------------------------------------------------
# Gleam-style entry points
# --------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class FlashConfig:
    """How :func:`flash_attention` tiles one call (frozen; every field is static).

    Attributes:
        block_q: query rows per block (clamped to the sequence length).
        block_kv: key/value rows per block (clamped to the sequence length).
        scale: multiplies the logits; ``1 / sqrt(head_dim)`` when None.
        causal: query ``i`` sees keys ``j <= i`` only.
    """

    block_q: int = flax.struct.field(pytree_node=False, default=DEFAULT_BLOCK_Q)
    block_kv: int = flax.struct.field(pytree_node=False, default=DEFAULT_BLOCK_KV)
    scale: float | None = flax.struct.field(pytree_node=False, default=None)
    causal: bool = flax.struct.field(pytree_node=False, default=False)


@flax.struct.dataclass
class FlashResult:
    """What :func:`flash_attention` returns.

    Attributes:
        output: the attention output, shape and dtype of ``q``.
        memory_bytes: temporary bytes of the compiled blockwise attention (XLA's memory analysis).
        memory_saved_percent: ``100 * (1 - memory_bytes / naive)``, where ``naive`` is the compiled
            temporary bytes of :func:`naive_attention` on the same shapes.
    """

    output: jax.Array
    memory_bytes: int = flax.struct.field(pytree_node=False, default=0)
    memory_saved_percent: float = flax.struct.field(pytree_node=False, default=0.0)


def _check_head_dim(head_dim: Any) -> int:
    if isinstance(head_dim, bool) or not isinstance(head_dim, (int, np.integer)) or head_dim <= 0:
        raise ConfigError(argument="head_dim", expected="a positive int", got=head_dim)
    return int(head_dim)


def default_config(head_dim: int) -> FlashConfig:
    """The default tiling for heads of size ``head_dim``: not causal, scale ``1 / sqrt(head_dim)``.

    Args:
        head_dim: the size of one head (H).

    Returns:
        A :class:`FlashConfig` with :data:`DEFAULT_BLOCK_Q` and :data:`DEFAULT_BLOCK_KV`.

    Raises:
        ConfigError: ``head_dim`` is not a positive int.

    Example:
        >>> c = default_config(64)
        >>> c.scale, c.causal, c.block_q, c.block_kv
        (0.125, False, 256, 512)
    """
    return FlashConfig(scale=1.0 / math.sqrt(_check_head_dim(head_dim)), causal=False)


def causal_config(head_dim: int) -> FlashConfig:
    """Like :func:`default_config`, with the causal mask (query ``i`` sees keys ``j <= i``).

    Args:
        head_dim: the size of one head (H).

    Returns:
        A causal :class:`FlashConfig`.

    Raises:
        ConfigError: ``head_dim`` is not a positive int.

    Example:
        >>> causal_config(16).causal
        True
    """
    return FlashConfig(scale=1.0 / math.sqrt(_check_head_dim(head_dim)), causal=True)


def _to_bthd(x, name: str):
    """Gleam layouts: (T, H), (B, T, H) or (B, T, N, H) -> (B, T, N, H)."""
    x = jnp.asarray(x)
    if x.ndim == 2:
        return x[None, :, None, :]
    if x.ndim == 3:
        return x[:, :, None, :]
    if x.ndim == 4:
        return x
    raise DimensionError(argument=name, expected="(seq, head_dim), (batch, seq, head_dim) or "
                         "(batch, seq, heads, head_dim)", got=f"shape {x.shape}")


def naive_attention(q, k, v, scale: float | None = None, *, is_causal: bool = False, bias=None, mask=None):
    """The O(n^2) reference: ``softmax(scale * q k^T) v`` with the whole matrix of logits in float32.

    Args:
        q: ``(seq_q, head_dim)``, ``(batch, seq_q, head_dim)`` or ``(batch, seq_q, heads, head_dim)``.
        k: keys, same layout as ``q`` (``seq_kv`` rows).
        v: values, same shape as ``k``.
        scale: multiplies the logits; ``1 / sqrt(head_dim)`` when None.
        is_causal: query ``i`` sees keys ``j <= i`` only (top-left aligned).
        bias: optional, broadcastable to the logits ``(batch, heads, seq_q, seq_kv)``, added after the scale.
        mask: optional boolean, broadcastable to the logits; ``False`` drops a score (set to the lowest
            float32, so a row that sees no key gets the mean of ``v``, as in ``jax.nn``).

    Returns:
        The attention output, shape and dtype of ``q``.

    Raises:
        DimensionError: a rank other than 2, 3 or 4.
        ShapeMismatch: shapes that do not fit together.

    Example:
        >>> import jax.numpy as jnp
        >>> q = jnp.array([[1.0, 0.0], [0.0, 1.0]])
        >>> out = naive_attention(q, q, jnp.array([[1.0, 2.0], [3.0, 4.0]]), 1.0, is_causal=True)
        >>> [[round(float(x), 3) for x in row] for row in out]
        [[1.0, 2.0], [2.462, 3.462]]
    """
    q4, k4, v4 = _to_bthd(q, "q"), _to_bthd(k, "k"), _to_bthd(v, "v")
    if k4.shape != v4.shape or k4.shape[0] != q4.shape[0] or k4.shape[2:] != q4.shape[2:]:
        raise ShapeMismatch(argument="k", expected=f"batch, heads and head dim of 'q' {q4.shape} "
                            "and the shape of 'v'", got=f"k {jnp.shape(k)}, v {jnp.shape(v)}")
    scale = 1.0 / math.sqrt(q4.shape[-1]) if scale is None else scale
    s = jnp.einsum("btnh,bsnh->bnts", q4.astype(_F32), k4.astype(_F32)) * jnp.float32(scale)
    if bias is not None:
        s = s + jnp.asarray(bias).astype(_F32)
    if mask is not None:
        s = jnp.where(jnp.asarray(mask, bool), s, jnp.finfo(_F32).min)
    if is_causal:
        T, S = s.shape[2], s.shape[3]
        s = jnp.where(jnp.tril(jnp.ones((T, S), bool))[None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bnts,bsnh->btnh", p, v4.astype(_F32)).astype(jnp.result_type(q))
    return out.reshape(jnp.shape(q))


def flash_attention(q, k, v, config: FlashConfig | None = None) -> FlashResult:
    """Blockwise attention with the Gleam signature, and its memory as XLA's compiler measured it.

    Args:
        q: ``(seq_q, head_dim)``, ``(batch, seq_q, head_dim)`` or ``(batch, seq_q, heads, head_dim)``.
        k: keys, same layout (``seq_kv`` rows).
        v: values, same shape as ``k``.
        config: a :class:`FlashConfig`; :func:`default_config` of the head dim when None.

    Returns:
        A :class:`FlashResult`: the output (shape and dtype of ``q``), the compiled temporary bytes of
        the blockwise attention, and the percentage saved against :func:`naive_attention`'s.
        The memory figures come from compiling on shapes only; they are static, so this works under
        ``jax.jit`` too.

    Raises:
        DimensionError, ShapeMismatch, DTypeError, ConfigError: as :func:`dot_product_attention`.

    Example:
        >>> import jax
        >>> q = jax.random.normal(jax.random.key(0), (1024, 64))
        >>> r = flash_attention(q, q, q, causal_config(64))
        >>> r.output.shape, r.memory_saved_percent > 50
        ((1024, 64), True)
    """
    config = default_config(jnp.shape(q)[-1]) if config is None else config
    if not isinstance(config, FlashConfig):
        raise ConfigError(argument="config", expected="a FlashConfig", got=type(config).__name__)
    q4, k4, v4 = _to_bthd(q, "q"), _to_bthd(k, "k"), _to_bthd(v, "v")

    def blockwise(a, b, c):
        return dot_product_attention(a, b, c, scale=config.scale, is_causal=config.causal,
                                     block_q=config.block_q, block_kv=config.block_kv)

    def naive(a, b, c):
        return naive_attention(a, b, c, config.scale, is_causal=config.causal)

    out = blockwise(q4, k4, v4).reshape(jnp.shape(q))
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q4, k4, v4)]
    flash_bytes = memory.compiled_memory(blockwise, *shapes).temp_bytes
    naive_bytes = memory.compiled_memory(naive, *shapes).temp_bytes
    saved = 100.0 * (1.0 - flash_bytes / naive_bytes) if naive_bytes else 0.0
    return FlashResult(output=out, memory_bytes=int(flash_bytes), memory_saved_percent=float(saved))


# --------------------------------------------------------------------------------------------------
# Flax NNX adapter
# --------------------------------------------------------------------------------------------------


def attention_fn(
    query,
    key,
    value,
    bias=None,
    mask=None,
    broadcast_dropout: bool = True,
    dropout_rng=None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype=None,
    precision=None,
    module=None,
    promote_dtype=None,
    is_causal: bool = False,
):
    """``flax.nnx.dot_product_attention``'s signature on top of :func:`dot_product_attention`.

    Pass it as ``nnx.MultiHeadAttention(..., attention_fn=attention_fn)``. Inputs are
    ``[batch..., length, heads, head_dim]`` (any number of batch dims, or none); ``mask`` and ``bias``
    broadcast to ``[batch..., heads, q_length, kv_length]``. The logits use float32 whatever
    ``precision`` says.

    Args:
        query: ``[batch..., q_length, heads, head_dim]``.
        key: ``[batch..., kv_length, kv_heads, head_dim]``.
        value: same shape as ``key``.
        bias: optional additive bias.
        mask: optional mask (True or nonzero attends).
        broadcast_dropout: accepted for the signature; dropout is not implemented.
        dropout_rng: accepted for the signature.
        dropout_rate: must be 0 unless ``deterministic``.
        deterministic: True disables dropout.
        dtype: the dtype of the computation (default: promoted from the inputs).
        precision: ignored (float32 logits and accumulation).
        module: must be None (the blockwise kernel never forms the attention weights to sow).
        promote_dtype: promotes ``(query, key, value)`` to ``dtype``
            (default: ``flax.nnx.nn.dtypes.promote_dtype``).
        is_causal: the causal mask.

    Returns:
        ``[batch..., q_length, heads, head_dim]``.

    Raises:
        InvalidOp: dropout with ``dropout_rate > 0`` and not ``deterministic``, or ``module`` given
            (``sow_weights=True``).
        And what :func:`dot_product_attention` raises.

    Example:
        >>> from flax import nnx
        >>> import jax
        >>> layer = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8, decode=False,
        ...                                rngs=nnx.Rngs(0), attention_fn=attention_fn)
        >>> x = jax.random.normal(jax.random.key(0), (1, 5, 8))
        >>> layer(x).shape
        (1, 5, 8)
    """
    del broadcast_dropout, dropout_rng, precision
    if dropout_rate and not deterministic:
        raise InvalidOp(argument="dropout_rate", expected="0.0 (or deterministic=True)", got=dropout_rate,
                        hint="blockwise attention has no dropout; set dropout_rate=0 or deterministic=True.")
    if module is not None:
        raise InvalidOp(argument="module", expected="None", got="a module (sow_weights=True)",
                        hint="the blockwise kernel never forms the attention weights; use sow_weights=False.")
    if promote_dtype is None:
        from flax.nnx.nn import dtypes as nnx_dtypes

        promote_dtype = nnx_dtypes.promote_dtype
    query, key, value = promote_dtype((query, key, value), dtype=dtype)
    shape = query.shape
    if query.ndim > 4:
        def flat(x):
            return None if x is None else jnp.reshape(x, (math.prod(x.shape[:-3]), *x.shape[-3:]))

        query, key, value, bias, mask = flat(query), flat(key), flat(value), flat(bias), flat(mask)
    if mask is not None:
        mask = jnp.asarray(mask).astype(jnp.bool_)
    out = dot_product_attention(query, key, value, bias, mask, is_causal=is_causal)
    return out.reshape(shape)
