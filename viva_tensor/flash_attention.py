"""Blockwise (flash) attention: O(n) memory forward and backward, a drop-in for jax.nn.

:func:`dot_product_attention` takes what :func:`jax.nn.dot_product_attention` takes and means the same
(layout ``(B, T, N, H)`` or ``(T, N, H)``, grouped-query attention, boolean masks, additive biases,
causal masks aligned top-left, sliding windows, per-example lengths), but never builds the ``T x S``
matrix of logits. The forward pass walks over blocks of queries; for each it scans the blocks of
keys and values that the causal mask and the window leave visible, keeping a running maximum, a running
sum and a rescaled accumulator in float32 (the online softmax). Only the output and the softmax max and sum of
each row are kept for the backward pass, a :func:`jax.custom_vjp` in the FlashAttention-2 way
(arXiv:2307.08691): the probabilities are recomputed block by block from them (not from the logsumexp:
at logits of 1e10 ``max + log(sum)`` rounds to ``max``), and
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

from viva_tensor import _xla
from viva_tensor._pytree import pytree_dataclass
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

#: What jax.nn puts in place of a hidden logit: -0.7 * the float32 maximum. It is finite, so a row that sees no
#: key averages V over all keys (as jax.nn does), and a hidden NaN or inf logit never reaches the softmax.
_HIDDEN = float(np.asarray(-0.7 * np.finfo(np.float32).max, np.float32))


class _Operands(NamedTuple):
    """What the block kernels read, padded to whole blocks (shape letters as in dot_product_attention).

    ``q``: (B, Tp, K, G, H); ``k``, ``v``: (B, Sp, K, H); ``bias``, ``mask``: None or 5-D
    (B|1, K|1, G|1, Tp|1, Sp|1); ``qlen``, ``kvlen``: None or int32 (B,).
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    bias: Any = None
    mask: Any = None
    qlen: Any = None
    kvlen: Any = None


class _Saved(NamedTuple):
    """What the backward kernel reads besides the operands, per (padded) query row.

    ``do``: dO (B, Tp, K, G, H) in the inputs' dtype, 0 on rows past ``query_seq_lengths``; ``m``, ``rl``: the
    row maximum and ``1 / sum`` of the forward softmax (B, K, G, Tp) float32; ``delta``: rowsum(dO * O)
    (B, K, G, Tp); ``dv_hidden``: :func:`_hidden_dv_prefix` of the rows.
    """

    do: jax.Array
    m: jax.Array
    rl: jax.Array
    delta: jax.Array
    dv_hidden: tuple[jax.Array, jax.Array]


def _padded(st: _Static) -> tuple[int, int]:
    return _round_up(st.seq_q, st.block_q), _round_up(st.seq_kv, st.block_kv)


def _logits(q_blk, k_blk, scale):
    """(B, bq, K, G, H) x (B, bkv, K, H) -> (B, K, G, bq, bkv) float32 logits, ``scale * q k^T``.

    The scale multiplies the float32 query block before the product, not the logits after it: XLA:CPU
    contracts ``logits * scale - max`` into a fused multiply-add inside one consumer of the logits and not
    inside another, and at logits of 1e10 the half-ulp difference (512) is enough for ``exp(s - max(s))`` to
    overflow. With no multiply after the product, every consumer rounds the logits the same way.
    """
    q32 = q_blk.astype(_F32) * jnp.asarray(scale, _F32)
    return jnp.einsum("bqkgh,bskh->bkgqs", q32, k_blk.astype(_F32), preferred_element_type=_F32)


def _slice_pair(x, i0, bq, j0, bkv):
    """The (bq, bkv) block of a 5-D (.., T|1, S|1) bias or mask at rows i0 and columns j0."""
    if x.shape[3] > 1:
        x = lax.dynamic_slice_in_dim(x, i0, bq, axis=3)
    if x.shape[4] > 1:
        x = lax.dynamic_slice_in_dim(x, j0, bkv, axis=4)
    return x


def _block_mask(st: _Static, ops: _Operands, i0, j0, offset):
    """Which logits of the block at (i0, j0) are visible: a 5-D bool array, or None for all.

    ``offset`` is the global position of query row 0 minus that of key 0 (0 in one call; ring attention
    passes the distance between the devices' chunks): the causal mask and the window compare
    ``kpos <= qpos + offset``.
    """
    bq, bkv = st.block_q, st.block_kv
    Tp, Sp = _padded(st)
    parts = []
    qpos = i0 + lax.broadcasted_iota(jnp.int32, (1, 1, 1, bq, 1), 3)
    kpos = j0 + lax.broadcasted_iota(jnp.int32, (1, 1, 1, 1, bkv), 4)
    qrel = qpos + offset
    if st.causal:
        parts.append(kpos <= qrel)
    if st.window is not None:
        left, right = st.window
        parts.append((kpos >= qrel - left) & (kpos <= qrel + right))
    if Sp != st.seq_kv:
        parts.append(kpos < st.seq_kv)
    if Tp != st.seq_q:
        parts.append(qpos < st.seq_q)
    if ops.kvlen is not None:
        parts.append(kpos < ops.kvlen[:, None, None, None, None])
    if ops.qlen is not None:
        parts.append(qpos < ops.qlen[:, None, None, None, None])
    if ops.mask is not None:
        parts.append(_slice_pair(ops.mask, i0, bq, j0, bkv))
    if not parts:
        return None, None
    hidden = _HIDDEN
    if Sp != st.seq_kv:  # padding keys are not keys at all: -inf, so they weigh nothing even in a hidden row
        hidden = jnp.where(kpos < st.seq_kv, _HIDDEN, -jnp.inf)
    return functools.reduce(jnp.logical_and, parts), hidden


def _scores(st: _Static, ops: _Operands, q_blk, k_blk, i0, j0, offset=0):
    """Masked float32 logits of one block, ``scale * q k^T + bias`` (jax.nn's value where hidden), and the
    visibility mask (None: all visible). See :func:`_logits` for why the scale comes first."""
    s = _logits(q_blk, k_blk, st.scale)
    if ops.bias is not None:
        s = s + _slice_pair(ops.bias, i0, st.block_q, j0, st.block_kv).astype(_F32)
    visible, hidden = _block_mask(st, ops, i0, j0, offset)
    if visible is not None:
        s = jnp.where(visible, s, hidden)
    return s, visible


def _kv_range(st: _Static, i0, num_kv_blocks: int, offset=0):
    """[lo, hi) of the key/value blocks that some query of the block starting at i0 can see."""
    lo_pos = jnp.int32(0)
    hi_pos = jnp.int32(st.seq_kv)
    last_q = jnp.minimum(i0 + st.block_q, st.seq_q) - 1
    if st.causal:
        hi_pos = jnp.minimum(hi_pos, last_q + offset + 1)
    if st.window is not None:
        left, right = st.window
        lo_pos = jnp.maximum(lo_pos, i0 + offset - left)
        hi_pos = jnp.minimum(hi_pos, last_q + offset + right + 1)
    lo = jnp.clip(lo_pos // st.block_kv, 0, num_kv_blocks)
    hi = jnp.clip((hi_pos + st.block_kv - 1) // st.block_kv, lo, num_kv_blocks)
    return lo, jnp.where(lo_pos < hi_pos, hi, lo)


def _q_range(st: _Static, j0, num_q_blocks: int, offset=0):
    """[lo, hi) of the query blocks that see some key of the block starting at j0."""
    lo_pos = jnp.int32(0)
    hi_pos = jnp.int32(st.seq_q)
    last_k = jnp.minimum(j0 + st.block_kv, st.seq_kv) - 1
    if st.causal:
        lo_pos = jnp.maximum(lo_pos, j0 - offset)
    if st.window is not None:
        left, right = st.window
        lo_pos = jnp.maximum(lo_pos, j0 - offset - right)
        hi_pos = jnp.minimum(hi_pos, last_k - offset + left + 1)
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


def _operands(st: _Static, q, k, v, bias=None, mask=None, qlen=None, kvlen=None) -> _Operands:
    """4-D validated inputs -> the padded, grouped :class:`_Operands` of the kernels."""
    B, _, N, H = q.shape
    K = k.shape[2]
    Tp, Sp = _padded(st)
    return _Operands(
        q=_pad_axis(q, 1, Tp).reshape(B, Tp, K, N // K, H),
        k=_pad_axis(k, 1, Sp),
        v=_pad_axis(v, 1, Sp),
        bias=_pad_axis(_pad_axis(_grouped(bias, K), 3, Tp), 4, Sp),
        mask=_pad_axis(_pad_axis(_grouped(mask, K), 3, Tp), 4, Sp),
        qlen=qlen,
        kvlen=kvlen,
    )


# --------------------------------------------------------------------------------------------------
# The FlashAttention-2 block kernels (shared with ring_attention)
# --------------------------------------------------------------------------------------------------


def _empty_stats(batch: int, heads_kv: int, groups: int, rows: int, head_dim: int):
    """Running (max, sum, accumulator) of ``rows`` query rows before any key: (-inf, 0, 0), float32."""
    shape = (batch, heads_kv, groups, rows)
    return jnp.full(shape, -jnp.inf, _F32), jnp.zeros(shape, _F32), jnp.zeros((*shape, head_dim), _F32)


def _before_after(sums):
    """(before, after) of per-block sums (B, n, ...): ``before[:, i]`` sums the blocks ``< i``, ``after[:, i]``
    the blocks ``>= i``; both (B, n + 1, ...). Two running sums, not one and a difference: an inf in one block
    would make ``total - prefix`` NaN for the blocks that do not hold it."""
    zero = jnp.zeros_like(sums[:, :1])
    before = jnp.concatenate([zero, jnp.cumsum(sums, axis=1)], axis=1)
    after = jnp.concatenate([jnp.flip(jnp.cumsum(jnp.flip(sums, axis=1), axis=1), axis=1), zero], axis=1)
    return before, after


def _value_prefix(st: _Static, v):
    """:func:`_before_after` of the sums of V per key block: two (B, nkv + 1, K, H) float32 (padding keys are 0)."""
    B, Sp, K, H = v.shape
    return _before_after(v.reshape(B, Sp // st.block_kv, st.block_kv, K, H).astype(_F32).sum(axis=2))


def _merge_hidden(m, den, acc, count, value_sum):
    """Merge ``count`` keys whose logit is the hidden value into the running stats (their V sums to
    ``value_sum``, (B, K, H)). Exact where jax.nn's softmax gives them weight (a row that sees nothing);
    otherwise their weight is 0 but a NaN or inf in their V still reaches the output, as in jax.nn."""
    some = count > 0
    m_new = jnp.where(some, jnp.maximum(m, _HIDDEN), m)
    alpha = jnp.where(some, jnp.exp(m - m_new), 1.0)
    w = jnp.where(some, jnp.exp(_HIDDEN - m_new), 0.0)
    den = alpha * den + w * count.astype(_F32)
    acc = alpha[..., None] * acc + w[..., None] * value_sum[:, :, None, None, :]
    return m_new, den, acc


def _block_forward(st: _Static, ops: _Operands, i0, stats, *, value_prefix, offset=0):
    """The online softmax of the query block at row ``i0`` over the keys of ``ops``: merges every visible
    key block into ``stats`` = (max, sum, accumulator) of shapes (B, K, G, bq), (B, K, G, bq), (B, K, G, bq, H)
    float32 and returns them. Blocks that the causal mask or the window hide entirely are not computed: their
    keys are merged in closed form (:func:`_merge_hidden`). ``value_prefix`` is :func:`_value_prefix` of
    ``ops.v``; ``offset`` as in :func:`_block_mask`. The output of the rows is ``acc / sum``."""
    bq, bkv = st.block_q, st.block_kv
    nkv = ops.k.shape[1] // bkv
    q_blk = lax.dynamic_slice_in_dim(ops.q, i0, bq, axis=1)

    def kv_block(j, c):
        m, den, acc = c
        j0 = j * bkv
        k_blk = lax.dynamic_slice_in_dim(ops.k, j0, bkv, axis=1)
        v_blk = lax.dynamic_slice_in_dim(ops.v, j0, bkv, axis=1)
        s, _ = _scores(st, ops, q_blk, k_blk, i0, j0, offset)
        m_new = jnp.maximum(m, s.max(axis=-1))
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # only padding so far: no NaN
        p = jnp.exp(s - shift[..., None])
        alpha = jnp.exp(m - shift)
        den = alpha * den + p.sum(axis=-1)
        pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(ops.v.dtype), v_blk, preferred_element_type=_F32)
        return m_new, den, alpha[..., None] * acc + pv

    lo, hi = _kv_range(st, i0, nkv, offset)
    m, den, acc = lax.fori_loop(lo, hi, kv_block, stats)
    count = jnp.minimum(lo * bkv, st.seq_kv) + jnp.maximum(st.seq_kv - hi * bkv, 0)  # real keys skipped
    before, after = value_prefix
    skipped = before[:, lo] + after[:, hi]
    return _merge_hidden(m, den, acc, count, skipped)


def _hidden_dv_prefix(st: _Static, m, rl, do):
    """:func:`_before_after` of the sums per query block of ``p_hidden * dO`` (G summed): (B, nq + 1, K, H) float32,
    where ``p_hidden = exp(hidden - m) / sum`` is the weight of a hidden key in a row (0 unless the row
    sees nothing). What a key block adds to dV from the query blocks that skip it."""
    B, K, G, Tp = m.shape
    nq = Tp // st.block_q
    w = (jnp.exp(_HIDDEN - m) * rl).transpose(0, 3, 1, 2).reshape(B, nq, st.block_q, K, G, 1)
    dog = do.reshape(B, nq, st.block_q, K, G, do.shape[-1])
    sums = (dog.astype(_F32) * w).sum(axis=(2, 4))  # a fused multiply-reduce: no transposed copy of dO
    return _before_after(sums)


def _reduce_to(x, shape):
    """Sum a 5-D block over the axes where ``shape`` has size 1 (the bias was broadcast there)."""
    axes = tuple(a for a in range(x.ndim) if shape[a] == 1 and x.shape[a] != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


def _block_backward(st: _Static, ops: _Operands, saved: _Saved, j0, carry, *, offset=0):
    """The FlashAttention-2 backward of the key block at row ``j0``: walks the query blocks that see it,
    recomputes their probabilities from the saved row max and sum, and adds to ``carry`` =
    (dQ (B, Tp, K, G, H), dK_j (B, bkv, K, H), dV_j (B, bkv, K, H), dbias or None), all float32."""
    bq, bkv = st.block_q, st.block_kv
    nq = ops.q.shape[1] // bq
    k_blk = lax.dynamic_slice_in_dim(ops.k, j0, bkv, axis=1)
    v_blk = lax.dynamic_slice_in_dim(ops.v, j0, bkv, axis=1)
    scale = jnp.asarray(st.scale, _F32)
    dtype = ops.q.dtype

    def q_block(i, c):
        dq, dk_j, dv_j, dbias = c
        i0 = i * bq
        q_blk = lax.dynamic_slice_in_dim(ops.q, i0, bq, axis=1)
        do_blk = lax.dynamic_slice_in_dim(saved.do, i0, bq, axis=1)
        m_blk, rl_blk, d_blk = (lax.dynamic_slice_in_dim(x, i0, bq, axis=3) for x in saved[1:4])
        s, visible = _scores(st, ops, q_blk, k_blk, i0, j0, offset)
        # p <= 1 by construction; the clamp keeps a one-ulp difference from the forward's rounding finite
        p = jnp.exp(jnp.minimum(s - m_blk[..., None], 0.0)) * rl_blk[..., None]
        dv_j = dv_j + jnp.einsum("bkgqs,bqkgh->bskh", p.astype(dtype), do_blk, preferred_element_type=_F32)
        dp = jnp.einsum("bqkgh,bskh->bkgqs", do_blk, v_blk, preferred_element_type=_F32)
        ds = p * (dp - d_blk[..., None])
        if visible is not None:
            ds = jnp.where(visible, ds, 0.0)  # a hidden logit is a constant: no gradient (as in jax.nn)
        ds_in = ds.astype(dtype)
        dq_blk = jnp.einsum("bkgqs,bskh->bqkgh", ds_in, k_blk, preferred_element_type=_F32) * scale
        dq = lax.dynamic_update_slice_in_dim(dq, lax.dynamic_slice_in_dim(dq, i0, bq, axis=1) + dq_blk, i0, axis=1)
        dk_j = dk_j + jnp.einsum("bkgqs,bqkgh->bskh", ds_in, q_blk, preferred_element_type=_F32) * scale
        if dbias is not None:
            part = _reduce_to(ds, dbias.shape)
            at = (0, 0, 0, i0 if dbias.shape[3] > 1 else 0, j0 if dbias.shape[4] > 1 else 0)
            dbias = lax.dynamic_update_slice(dbias, lax.dynamic_slice(dbias, at, part.shape) + part, at)
        return dq, dk_j, dv_j, dbias

    lo, hi = _q_range(st, j0, nq, offset)
    dq, dk_j, dv_j, dbias = lax.fori_loop(lo, hi, q_block, carry)
    before, after = saved.dv_hidden
    skipped = before[:, lo] + after[:, hi]  # rows of the skipped query blocks
    return dq, dk_j, dv_j + skipped[:, None], dbias


# --------------------------------------------------------------------------------------------------
# Forward and backward of one call (inputs already 4-D and validated)
# --------------------------------------------------------------------------------------------------


def _row_mask(qlen, i0, rows: int):
    """(B, rows, 1, 1) float32: 1 for query rows below ``query_seq_lengths``, else 0."""
    pos = i0 + lax.broadcasted_iota(jnp.int32, (1, rows, 1, 1), 1)
    return (pos < qlen[:, None, None, None]).astype(_F32)


def _forward(st: _Static, q, k, v, bias, mask, qlen, kvlen):
    """Output (B, T, N, H) in q.dtype and the float32 row max and sum (B, K, G, Tp) of the softmax."""
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    bq = st.block_q
    Tp, _ = _padded(st)
    ops = _operands(st, q, k, v, bias, mask, qlen, kvlen)
    prefix = _value_prefix(st, ops.v)

    def q_block(i, carry):
        out, m_all, l_all = carry
        i0 = i * bq
        m, den, acc = _block_forward(st, ops, i0, _empty_stats(B, K, G, bq, H), value_prefix=prefix)
        o = (acc / den[..., None]).transpose(0, 3, 1, 2, 4).reshape(B, bq, N, H)
        if qlen is not None:
            o = o * _row_mask(qlen, i0, bq)  # a multiply, as jax.nn: a NaN there stays NaN
        out = lax.dynamic_update_slice_in_dim(out, o.astype(q.dtype), i0, axis=1)
        m_all = lax.dynamic_update_slice_in_dim(m_all, m, i0, axis=3)
        l_all = lax.dynamic_update_slice_in_dim(l_all, den, i0, axis=3)
        return out, m_all, l_all

    init = (jnp.zeros((B, Tp, N, H), q.dtype), jnp.zeros((B, K, G, Tp), _F32), jnp.ones((B, K, G, Tp), _F32))
    out, m, den = lax.fori_loop(0, Tp // bq, q_block, init)
    return (out[:, :T] if Tp != T else out), (m, den)


def _saved(st: _Static, out, stats, dout, qlen, heads_kv: int) -> _Saved:
    """The :class:`_Saved` rows of a backward pass from the forward's output and (max, sum)."""
    B, T, N, H = out.shape
    Tp, _ = _padded(st)
    if qlen is not None:
        dout = (dout.astype(_F32) * _row_mask(qlen, 0, T)).astype(out.dtype)  # rows that jax.nn multiplies by 0
    m, den = stats
    delta = jnp.sum(dout.astype(_F32) * out.astype(_F32), axis=-1)  # D = rowsum(dO * O), (B, T, N)
    delta = _pad_axis(delta.reshape(B, T, heads_kv, N // heads_kv).transpose(0, 2, 3, 1), 3, Tp)
    do = _pad_axis(dout, 1, Tp).reshape(B, Tp, heads_kv, N // heads_kv, H)
    rl = 1.0 / den
    return _Saved(do=do, m=m, rl=rl, delta=delta, dv_hidden=_hidden_dv_prefix(st, m, rl, do))


def _backward(st: _Static, q, k, v, bias, mask, qlen, kvlen, out, stats, dout):
    """Gradients for q, k, v and bias (FlashAttention-2: recompute P block by block from the row stats)."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    bkv = st.block_kv
    Tp, Sp = _padded(st)
    ops = _operands(st, q, k, v, bias, mask, qlen, kvlen)
    saved = _saved(st, out, stats, dout.astype(q.dtype), qlen, K)

    def kv_block(j, carry):
        dq, dk, dv, dbias = carry
        j0 = j * bkv
        zeros = jnp.zeros((B, bkv, K, H), _F32)
        dq, dk_j, dv_j, dbias = _block_backward(st, ops, saved, j0, (dq, zeros, zeros, dbias))
        dk = lax.dynamic_update_slice_in_dim(dk, dk_j.astype(k.dtype), j0, axis=1)
        dv = lax.dynamic_update_slice_in_dim(dv, dv_j.astype(v.dtype), j0, axis=1)
        return dq, dk, dv, dbias

    init = (
        jnp.zeros((B, Tp, K, G, H), _F32),
        jnp.zeros((B, Sp, K, H), k.dtype),
        jnp.zeros((B, Sp, K, H), v.dtype),
        None if ops.bias is None else jnp.zeros(ops.bias.shape, _F32),
    )
    dq, dk, dv, dbias = lax.fori_loop(0, Sp // bkv, kv_block, init)
    dq = dq.reshape(B, Tp, N, H)[:, :T].astype(q.dtype)
    dk, dv = dk[:, :S], dv[:, :S]
    if dbias is not None:
        dbias = dbias[:, :, :, : bias.shape[2], : bias.shape[3]].reshape(bias.shape).astype(bias.dtype)
    return dq, dk, dv, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, bias, mask, qlen, kvlen):
    return _forward(st, q, k, v, bias, mask, qlen, kvlen)[0]


def _flash_fwd(st, q, k, v, bias, mask, qlen, kvlen):
    out, stats = _forward(st, q, k, v, bias, mask, qlen, kvlen)
    return out, (q, k, v, bias, mask, qlen, kvlen, out, stats)


def _flash_bwd(st, res, dout):
    q, k, v, bias, mask, qlen, kvlen, out, stats = res
    dq, dk, dv, dbias = _backward(st, q, k, v, bias, mask, qlen, kvlen, out, stats, dout)
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
    if any(d not in (1, t) for d, t in zip(x4.shape, target, strict=False)):
        raise BroadcastError(
            argument=name,
            expected=f"a shape broadcastable to (B, N, T, S) = {target}, each axis 1 or full",
            got=f"shape {x.shape}",
        )
    return x4


def _check_lengths(name: str, x, batch: int):
    if x is None:
        return None
    if not isinstance(x, jax.Array):  # NumPy or Python ints: check the values before JAX narrows them to int32
        x = np.asarray(x)
        if x.dtype.kind in "iu" and x.size and (x.min() < 0 or x.max() > np.iinfo(np.int32).max):
            bad = x.max() if x.max() > np.iinfo(np.int32).max else x.min()
            raise ConfigError(argument=name, expected="lengths in 0 .. 2**31 - 1 (int32)", got=int(bad),
                              hint="a length never exceeds the sequence; JAX would wrap this value silently.")
    x = _as_array(name, x)
    if x.shape != (batch,):
        raise ShapeMismatch(argument=name, expected=f"shape ({batch},) (one length per example)", got=x.shape)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise DTypeError(argument=name, expected="an integer array", got=str(x.dtype))
    return x.astype(jnp.int32)


_NAN = float("nan")  # one NaN object: a static scale of NaN then compares equal to itself (one compilation)


def _check_scale(scale: Any, head_dim: int) -> float:
    """The logits' scale as a Python float: ``1 / sqrt(head_dim)`` for None; refuses a traced value (private).

    The scale is a static part of the compiled kernels. A traced scale (one computed inside ``jit`` or
    differentiated) is refused with a hint: multiply the query by it and pass ``scale=1.0``.
    """
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, jax.core.Tracer):
        raise ConfigError(argument="scale", expected="a concrete number (a static part of the compiled kernel)",
                          got=f"a traced value {scale.aval}",
                          hint="multiply the query instead: dot_product_attention(query * s, key, value, scale=1.0).")
    ok = isinstance(scale, (int, float, np.integer, np.floating, np.ndarray, jax.Array)) and not isinstance(scale, bool)
    if ok and isinstance(scale, (np.ndarray, jax.Array)):
        ok = scale.ndim == 0 and (jnp.issubdtype(scale.dtype, jnp.floating) or jnp.issubdtype(scale.dtype, jnp.integer))
    if not ok:
        raise ConfigError(argument="scale", expected="a real number or None", got=repr(scale))
    value = float(scale)
    return _NAN if math.isnan(value) else value


def _as_array(name: str, x: Any):
    """An array argument as a jax.Array, refusing float64 (JAX would narrow it to float32 silently) and
    what is not an array at all, with the argument's name (private, shared with ring_attention)."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None and not isinstance(x, jax.core.Tracer) and np.dtype(dtype) == np.float64:
        raise DTypeError(argument=name, expected="float32, bfloat16 or float16", got="float64",
                         hint=f"cast it first: {name}.astype(jnp.float32); float64 is never narrowed silently.")
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError, OverflowError) as e:
        raise DTypeError(argument=name, expected="an array (jax.Array, NumPy array or nested lists of numbers)",
                         got=f"{type(x).__name__} ({e})") from None


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
    row max and sum are kept) for ``query``, ``key``, ``value`` and ``bias``.

    Hidden logits take jax.nn's value (``-0.7 * float32 max``), so the results are jax.nn's also at the edges:
    a query row that sees no key at all (a fully masked row, a window or lengths that leave it nothing) returns
    the mean of ``value`` over all keys (its gradient goes to ``value`` only); rows past ``query_seq_lengths``
    are 0. NaN in gives NaN out where jax.nn gives NaN, forward and backward: a NaN or inf in a visible logit,
    in ``value``, in ``scale``; a NaN that a mask hides does not spread. (One difference: jax.nn's dense
    backward multiplies a hidden NaN in ``query`` or ``key`` by 0 and spreads it into the other side's
    gradient; blocks that the causal mask or the window hide entirely are never computed, so such a NaN
    stays out.) ``jit`` and eager give the same result, also for logits of magnitude 1e10 to 3e38: the
    scale multiplies the query before the product, so no consumer of the logits rounds them differently.

    Args:
        query: ``(B, T, N, H)`` or ``(T, N, H)``, float32, bfloat16 or float16.
        key: ``(B, S, K, H)`` or ``(S, K, H)``, same dtype and rank as ``query``; ``N % K == 0``
            (grouped-query attention; ``K == 1`` is multi-query attention).
        value: same shape and dtype as ``key``.
        bias: optional additive bias of rank <= 4 broadcastable to ``(B, N, T, S)`` (``(N, T, S)``
            for 3-D inputs), each axis 1 or full, as in jax.nn; any float dtype. Its gradient has
            its own shape.
        mask: optional boolean mask, same shapes as ``bias``; True means "attend".
        scale: multiplies the logits; ``1 / sqrt(H)`` when None. A concrete number (Python, NumPy or a
            concrete 0-d array): it is compiled into the kernel.
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
            empty sequences, heads or head dims, lengths of the wrong shape.
        DTypeError: a non-float or mixed dtype, float64 (never narrowed silently: cast to float32), a
            non-boolean mask, non-integer lengths, an argument that is not an array.
        BroadcastError: a mask or bias that does not broadcast to ``(B, N, T, S)``.
        ConfigError: a bad window or block size; a scale that is not a number, or is traced (the scale is
            static: multiply ``query`` by a traced scale instead); lengths outside int32.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> q = jax.random.normal(jax.random.key(1), (2, 50, 4, 8))
        >>> kv = jax.random.normal(jax.random.key(2), (2, 70, 2, 8))
        >>> out = dot_product_attention(q, kv, kv, local_window_size=(5, 0), block_q=16, block_kv=16)
        >>> ref = jax.nn.dot_product_attention(q, kv, kv, local_window_size=(5, 0))
        >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
        ((2, 50, 4, 8), True)
    """
    query, key, value = _as_array("query", query), _as_array("key", key), _as_array("value", value)
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
        raise ShapeMismatch(argument="key", expected=f"head dim {H} (the head dim of 'query')",
                            got=f"shape {key.shape}")
    if T == 0 or S == 0 or H == 0 or N == 0 or K == 0:
        raise ShapeMismatch(argument="query" if T == 0 or H == 0 or N == 0 else "key",
                            expected="non-empty sequences, heads and head dims",
                            got=f"shapes {query.shape} and {key.shape}")
    if N % K != 0:
        raise ShapeMismatch(
            argument="key",
            expected=f"a number of heads that divides the {N} query heads",
            got=f"{K} heads (shape {key.shape})",
            hint="grouped-query attention needs N % K == 0.",
        )
    target = (B, N, T, S)
    if mask is not None:
        mask = _as_array("mask", mask)
        if mask.dtype != jnp.bool_:
            raise DTypeError(argument="mask", expected="a boolean array", got=str(mask.dtype),
                             hint="pass an additive mask as 'bias'.")
        mask = _check_pair_shape("mask", mask, target)
    if bias is not None:
        bias = _as_array("bias", bias)
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            bias = bias.astype(_F32)
        bias = _check_pair_shape("bias", bias, target)
    qlen = _check_lengths("query_seq_lengths", query_seq_lengths, B)
    kvlen = _check_lengths("key_value_seq_lengths", key_value_seq_lengths, B)
    st = _Static(
        scale=_check_scale(scale, H),
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


@pytree_dataclass
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


@pytree_dataclass
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
    flash_bytes = _xla.compiled_memory(blockwise, *shapes).temp_bytes
    naive_bytes = _xla.compiled_memory(naive, *shapes).temp_bytes
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
