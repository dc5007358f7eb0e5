"""Ring attention: flash attention with the sequence split across the devices of a mesh axis.

Each device keeps its block of queries; the key/value blocks travel around the ring with
``lax.ppermute`` inside ``shard_map``, one hop per step, and every device merges what it sees with the
online softmax (running max, running sum, float32 accumulator). Within a device the work is blockwise
too (query sub-blocks times key/value sub-blocks), so the memory per device is O(T / devices) and no
device ever holds the full ``T x T`` scores, nor the full keys and values.

With ``is_causal=True`` a device skips the key/value blocks that come entirely after its queries
(and, inside a block, the sub-blocks that the mask hides). The gradient is a ``custom_vjp``
(FlashAttention-2 backward, from the output and the row logsumexp): the key/value blocks travel the
ring again, with their dK/dV accumulators, and arrive back at their owner after a full turn.

Layout ``(B, T, N, H)`` as :func:`jax.nn.dot_product_attention` (``N`` query heads, ``K`` key/value
heads with ``N % K == 0``). Logits, statistics and accumulators are float32; outputs and gradients have
the inputs' dtype.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from viva_tensor import ring_attention
    >>> mesh = jax.make_mesh((1,), ("seq",))
    >>> q = k = v = jnp.ones((1, 8, 2, 4))
    >>> ring_attention.ring_attention(q, k, v, mesh=mesh, axis="seq").shape
    (1, 8, 2, 4)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from viva_tensor.sharding import _place
from viva_tensor.errors import ConfigError, DimensionError, DTypeError, ShapeMismatch, ShardingError

__all__ = ["ring_attention", "ring_attention_local"]

_F32 = jnp.float32
_NEG = -jnp.inf


def _auto_block(n: int, target: int) -> int:
    """The largest divisor of ``n`` not above ``target``."""
    for b in range(min(n, target), 0, -1):
        if n % b == 0:
            return b
    return 1


def _idx(x, i, axis):
    return jax.lax.dynamic_index_in_dim(x, i, axis, keepdims=False)


def _put(x, val, i, axis):
    return jax.lax.dynamic_update_index_in_dim(x, val, i, axis)


# Layouts inside a device (batch-like dims first, so every block product is a plain batched matmul):
# queries, outputs, dQ: (B, K, G, nq, bq, H); row statistics: (B, K, G, nq, bq);
# keys, values, dK, dV (these travel the ring): (B, K, nk, bk, H). Sub-block i is index i of axis 3
# (queries) or axis 2 (keys).
_QA, _KA = 3, 2


def _to_q(x, bq, K):  # (B, T, N, H) -> (B, K, G, nq, bq, H)
    B, T, N, H = x.shape
    return jnp.transpose(x.reshape(B, T // bq, bq, K, N // K, H), (0, 3, 4, 1, 2, 5))


def _from_q(x):  # inverse of _to_q
    B, K, G, nq, bq, H = x.shape
    return jnp.transpose(x, (0, 3, 4, 1, 2, 5)).reshape(B, nq * bq, K * G, H)


def _to_kv(x, bk):  # (B, S, K, H) -> (B, K, nk, bk, H)
    B, S, K, H = x.shape
    return jnp.transpose(x.reshape(B, S // bk, bk, K, H), (0, 3, 1, 2, 4))


def _from_kv(x):
    B, K, nk, bk, H = x.shape
    return jnp.transpose(x, (0, 2, 3, 1, 4)).reshape(B, nk * bk, K, H)


def _logits(qb, kb, scale, qpos0, kpos0, causal):
    """Scores ``(B, K, G, bq, bk)`` of a query sub-block ``(B,K,G,bq,H)`` against keys ``(B,K,bk,H)``."""
    s = jnp.einsum("bkgqh,bkth->bkgqt", qb, kb, preferred_element_type=_F32) * scale
    if causal:
        qpos = qpos0 + jnp.arange(qb.shape[-2])
        kpos = kpos0 + jnp.arange(kb.shape[-2])
        visible = (kpos[None, :] <= qpos[:, None])[None, None, None]
        s = jnp.where(visible, s, _NEG)
    return s


def _hidden(causal, qpos0, bq, kpos0):
    """Whether the causal mask hides a whole (query sub-block, key sub-block) pair."""
    return jnp.logical_and(causal, kpos0 > qpos0 + bq - 1)


def _fwd_chunk(st, q5, k4, v4, o, m, l, qoff, koff):
    """Merge one key/value chunk into the running (o, m, l); loops update the carries in place."""
    scale, causal, bq, bk = st
    nq, nk = q5.shape[_QA], k4.shape[_KA]

    def q_body(i, carry):
        o, m, l = carry
        qb = _idx(q5, i, _QA)

        def kv_body(j, c):
            def compute(c):
                ob, mb, lb = c
                s = _logits(qb, _idx(k4, j, _KA), scale, qoff + i * bq, koff + j * bk, causal)
                m_new = jnp.maximum(mb, s.max(-1))
                m_safe = jnp.where(m_new == _NEG, 0.0, m_new)
                p = jnp.exp(s - m_safe[..., None])
                corr = jnp.exp(mb - m_safe)
                lb = lb * corr + p.sum(-1)
                ob = ob * corr[..., None] + jnp.einsum("bkgqt,bkth->bkgqh", p, _idx(v4, j, _KA).astype(_F32),
                                                       preferred_element_type=_F32)
                return ob, m_new, lb

            return jax.lax.cond(_hidden(causal, qoff + i * bq, bq, koff + j * bk), lambda c: c, compute, c)

        ob, mb, lb = jax.lax.fori_loop(0, nk, kv_body, (_idx(o, i, _QA), _idx(m, i, _QA), _idx(l, i, _QA)))
        return _put(o, ob, i, _QA), _put(m, mb, i, _QA), _put(l, lb, i, _QA)

    return jax.lax.fori_loop(0, nq, q_body, (o, m, l))


def _bwd_chunk(st, q5, do5, lse5, dd5, dq, k4, v4, dk, dv, qoff, koff):
    """Add one key/value chunk's gradient terms to dQ (all queries) and to the chunk's dK, dV."""
    scale, causal, bq, bk = st
    nq, nk = q5.shape[_QA], k4.shape[_KA]

    def kv_body(j, carry):
        dq, dk, dv = carry
        kb, vb = _idx(k4, j, _KA), _idx(v4, j, _KA)
        kb32, vb32 = kb.astype(_F32), vb.astype(_F32)

        def q_body(i, c):
            def compute(c):
                dq, dkb, dvb = c
                qb = _idx(q5, i, _QA)
                s = _logits(qb, kb, scale, qoff + i * bq, koff + j * bk, causal)
                p = jnp.exp(s - _idx(lse5, i, _QA)[..., None])
                do32 = _idx(do5, i, _QA).astype(_F32)
                dvb = dvb + jnp.einsum("bkgqt,bkgqh->bkth", p, do32, preferred_element_type=_F32)
                dp = jnp.einsum("bkgqh,bkth->bkgqt", do32, vb32, preferred_element_type=_F32)
                dsc = p * (dp - _idx(dd5, i, _QA)[..., None])
                dqb = _idx(dq, i, _QA) + jnp.einsum("bkgqt,bkth->bkgqh", dsc, kb32,
                                                    preferred_element_type=_F32) * scale
                dkb = dkb + jnp.einsum("bkgqt,bkgqh->bkth", dsc, qb.astype(_F32), preferred_element_type=_F32) * scale
                return _put(dq, dqb, i, _QA), dkb, dvb

            return jax.lax.cond(_hidden(causal, qoff + i * bq, bq, koff + j * bk), lambda c: c, compute, c)

        dq, dkb, dvb = jax.lax.fori_loop(0, nq, q_body, (dq, _idx(dk, j, _KA), _idx(dv, j, _KA)))
        return dq, _put(dk, dkb, j, _KA), _put(dv, dvb, j, _KA)

    return jax.lax.fori_loop(0, nk, kv_body, (dq, dk, dv))


def _ring_perm(n):
    return [(j, (j + 1) % n) for j in range(n)]


def _forward(q, k, v, axis_name, causal, scale, bq, bk):
    K = k.shape[2]
    T = q.shape[1]
    n = jax.lax.axis_size(axis_name)
    idx = jax.lax.axis_index(axis_name)
    st = (scale, causal, bq, bk)
    q5 = _to_q(q, bq, K)
    zero = 0.0 * q5[..., 0].astype(_F32)  # zeros that vary along the mesh axis like q
    o = jnp.zeros(q5.shape, _F32) + zero[..., None]
    m = jnp.full(zero.shape, _NEG, _F32) + zero
    l = zero
    perm = _ring_perm(n)

    def merge(s, o, m, l, k4, v4):
        src = (idx - s) % n

        def compute(c):
            return _fwd_chunk(st, q5, k4, v4, *c, idx * T, src * T)

        return compute((o, m, l))  # hidden sub-blocks (all of them when src > idx) are skipped inside

    def step(s, carry):
        o, m, l, k4, v4 = carry
        o, m, l = merge(s, o, m, l, k4, v4)
        k4, v4 = jax.lax.ppermute((k4, v4), axis_name, perm)
        return o, m, l, k4, v4

    # n - 1 hops: the last chunk is merged where it arrives
    o, m, l, k4, v4 = jax.lax.fori_loop(0, n - 1, step, (o, m, l, _to_kv(k, bk), _to_kv(v, bk)))
    o, m, l = merge(n - 1, o, m, l, k4, v4)
    l_safe = jnp.where(l == 0, 1.0, l)
    out = _from_q(o / l_safe[..., None]).astype(q.dtype)
    lse = jnp.where(l == 0, _NEG, m + jnp.log(l_safe))
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _ring(q, k, v, axis_name, causal, scale, bq, bk):
    return _forward(q, k, v, axis_name, causal, scale, bq, bk)[0]


def _ring_fwd(q, k, v, axis_name, causal, scale, bq, bk):
    out, lse = _forward(q, k, v, axis_name, causal, scale, bq, bk)
    return out, (q, k, v, out, lse)


def _ring_bwd(axis_name, causal, scale, bq, bk, res, dout):
    q, k, v, out, lse = res
    K = k.shape[2]
    T = q.shape[1]
    n = jax.lax.axis_size(axis_name)
    idx = jax.lax.axis_index(axis_name)
    st = (scale, causal, bq, bk)
    q5 = _to_q(q, bq, K)
    do5 = _to_q(dout, bq, K)
    dd5 = jnp.sum(do5.astype(_F32) * _to_q(out, bq, K).astype(_F32), axis=-1)  # D = rowsum(dO * O)
    lse5 = jnp.where(lse == _NEG, 0.0, lse)
    dq = jnp.zeros(q5.shape, _F32) + 0.0 * q5.astype(_F32)
    k4, v4 = _to_kv(k, bk), _to_kv(v, bk)
    dk = jnp.zeros(k4.shape, _F32) + 0.0 * k4.astype(_F32)
    dv = jnp.zeros(v4.shape, _F32) + 0.0 * v4.astype(_F32)
    perm = _ring_perm(n)

    def add(s, dq, k4, v4, dk, dv):
        src = (idx - s) % n

        def compute(c):
            return _bwd_chunk(st, q5, do5, lse5, dd5, c[0], k4, v4, c[1], c[2], idx * T, src * T)

        return compute((dq, dk, dv))  # hidden sub-blocks (all of them when src > idx) are skipped inside

    def step(s, carry):
        dq, k4, v4, dk, dv = carry
        dq, dk, dv = add(s, dq, k4, v4, dk, dv)
        # the chunk and its gradient accumulators move on together
        k4, v4, dk, dv = jax.lax.ppermute((k4, v4, dk, dv), axis_name, perm)
        return dq, k4, v4, dk, dv

    dq, k4, v4, dk, dv = jax.lax.fori_loop(0, n - 1, step, (dq, k4, v4, dk, dv))
    dq, dk, dv = add(n - 1, dq, k4, v4, dk, dv)
    dk, dv = jax.lax.ppermute((dk, dv), axis_name, perm)  # the n-th hop brings dK, dV home
    return _from_q(dq).astype(q.dtype), _from_kv(dk).astype(k.dtype), _from_kv(dv).astype(v.dtype)


_ring.defvjp(_ring_fwd, _ring_bwd)


def _check(query, key, value):
    for name, x in (("query", query), ("key", key), ("value", value)):
        if jnp.ndim(x) != 4:
            raise DimensionError(argument=name, expected="rank 4 (B, T, N, H)", got=f"shape {jnp.shape(x)}")
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == jnp.float64:
            raise DTypeError(argument=name, expected="float32, bfloat16 or float16", got=str(x.dtype))
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise DTypeError(argument="key", expected=f"dtype {query.dtype} (the query's) for key and value",
                         got=f"{key.dtype} and {value.dtype}")
    if key.shape != value.shape:
        raise ShapeMismatch(argument="value", expected=f"shape {key.shape} (the key's)", got=value.shape)
    B, T, N, H = query.shape
    if key.shape[0] != B or key.shape[1] != T or key.shape[3] != H:
        raise ShapeMismatch(argument="key", expected=f"shape ({B}, {T}, K, {H}) (self-attention: the query's length)",
                            got=key.shape, hint="ring attention needs keys as long as the queries.")
    if N % key.shape[2]:
        raise ShapeMismatch(argument="key", expected=f"a number of heads dividing {N}", got=key.shape[2])


def ring_attention_local(query, key, value, *, axis_name: str, is_causal: bool = False, scale: float | None = None,
                         block_q: int = 512, block_kv: int = 512):
    """Ring attention on the local blocks, for use inside your own ``shard_map``.

    Each argument is this device's block of the sequence (block ``i`` on the device of index ``i``
    along ``axis_name``); all blocks have the same length.

    Args:
        query: ``(B, T_local, N, H)``.
        key: ``(B, T_local, K, H)``, ``N % K == 0``.
        value: like ``key``.
        axis_name: the mesh axis over which the sequence is split.
        is_causal: query ``i`` sees keys ``j <= i`` (global positions).
        scale: logits multiplier, ``1 / sqrt(H)`` when None.
        block_q: target query sub-block (the largest divisor of ``T_local`` not above it is used).
        block_kv: target key/value sub-block.

    Returns:
        This device's block of the output, ``(B, T_local, N, H)`` in the query's dtype.

    Raises:
        DimensionError, DTypeError, ShapeMismatch: for inputs of the wrong rank, dtype or shape.
        ConfigError: for block sizes below 1.

    Example:
        >>> mesh = jax.make_mesh((1,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,))
        >>> f = jax.jit(jax.shard_map(lambda q: ring_attention_local(q, q, q, axis_name="sp", is_causal=True),
        ...                           mesh=mesh, in_specs=P(None, "sp"), out_specs=P(None, "sp")))
        >>> float(f(jnp.ones((1, 4, 1, 2)))[0, 3, 0, 0])
        1.0
    """
    _check(query, key, value)
    for name, b in (("block_q", block_q), ("block_kv", block_kv)):
        if not isinstance(b, int) or b < 1:
            raise ConfigError(argument=name, expected="a positive integer", got=repr(b))
    T, H = query.shape[1], query.shape[3]
    scale = 1.0 / math.sqrt(H) if scale is None else float(scale)
    return _ring(query, key, value, axis_name, bool(is_causal), scale, _auto_block(T, block_q),
                 _auto_block(T, block_kv))


def ring_attention(query, key, value, *, mesh: Any = None, axis: str, is_causal: bool = False,
                   scale: float | None = None, block_q: int = 512, block_kv: int = 512):
    """Attention with the sequence split over the mesh axis ``axis`` (``jax.nn.dot_product_attention``'s meaning).

    The inputs are global arrays ``(B, T, N, H)``; they are sharded along ``T`` over ``axis`` (other
    mesh axes replicate) and the output comes back sharded the same way. Differentiable.

    Args:
        query: ``(B, T, N, H)`` float32, bfloat16 or float16.
        key: ``(B, T, K, H)``, ``N % K == 0``.
        value: like ``key``.
        mesh: the mesh (default: the one of ``jax.set_mesh``).
        axis: the mesh axis that splits the sequence.
        is_causal: causal mask (query ``i`` sees keys ``j <= i``).
        scale: logits multiplier, ``1 / sqrt(H)`` when None.
        block_q: target query sub-block per device.
        block_kv: target key/value sub-block per device.

    Returns:
        ``(B, T, N, H)`` in the query's dtype, sharded along ``T``.

    Raises:
        DimensionError, DTypeError, ShapeMismatch: for inputs of the wrong rank, dtype or shape.
        ShardingError: for an axis the mesh lacks, or a length the axis does not divide.

    Example:
        >>> mesh = jax.make_mesh((1,), ("seq",))
        >>> q = jax.random.normal(jax.random.key(0), (1, 16, 2, 8))
        >>> ref = jax.nn.dot_product_attention(q, q, q, is_causal=True)
        >>> got = ring_attention(q, q, q, mesh=mesh, axis="seq", is_causal=True)
        >>> bool(jnp.allclose(got, ref, atol=1e-5))
        True
    """
    _check(query, key, value)
    if mesh is None:
        mesh = jax.sharding.get_mesh()
        if mesh.empty:
            mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            raise ShardingError(argument="mesh", expected="a mesh (the mesh= argument or jax.set_mesh)", got="none")
    if axis not in mesh.axis_names:
        raise ShardingError(argument="axis", expected=f"a mesh axis among {tuple(mesh.axis_names)}", got=repr(axis))
    n = mesh.shape[axis]
    T = query.shape[1]
    if T % n:
        raise ShardingError(argument="query", expected=f"a sequence length divisible by {n} (mesh axis {axis!r})",
                            got=T, hint="pad the sequence.")
    spec = P(None, axis, None, None)
    f = functools.partial(ring_attention_local, axis_name=axis, is_causal=is_causal, scale=scale,
                          block_q=block_q, block_kv=block_kv)
    sm = jax.shard_map(f, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
    concrete = not isinstance(mesh, jax.sharding.AbstractMesh)
    return jax.jit(sm)(*(_place(x, spec, mesh, concrete) for x in (query, key, value)))
