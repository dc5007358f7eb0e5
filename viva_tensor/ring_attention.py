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


def _idx(x, i):
    return jax.lax.dynamic_index_in_dim(x, i, 1, keepdims=False)


def _put(x, val, i):
    return jax.lax.dynamic_update_index_in_dim(x, val, i, 1)


def _logits(qb, kb, scale, qpos0, kpos0, causal):
    """Scores ``(B, bq, K, G, bk)`` of a query sub-block ``(B,bq,K,G,H)`` against keys ``(B,bk,K,H)``."""
    s = jnp.einsum("bqkgh,btkh->bqkgt", qb, kb, preferred_element_type=_F32) * scale
    if causal:
        qpos = qpos0 + jnp.arange(qb.shape[1])
        kpos = kpos0 + jnp.arange(kb.shape[1])
        visible = (kpos[None, :] <= qpos[:, None])[None, :, None, None, :]
        s = jnp.where(visible, s, _NEG)
    return s


def _hidden(causal, qpos0, bq, kpos0):
    """Whether the causal mask hides a whole (query sub-block, key sub-block) pair."""
    return jnp.logical_and(causal, kpos0 > qpos0 + bq - 1)


def _fwd_chunk(st, q5, k4, v4, o, m, l, qoff, koff):
    """Merge one key/value chunk into the running (o, m, l); loops update the carries in place.

    Layouts (free reshapes of the inputs): q5 and o ``(B, nq, bq, K, G, H)``, m and l
    ``(B, nq, bq, K, G)``, k4 and v4 ``(B, nk, bk, K, H)``.
    """
    scale, causal, bq, bk = st
    nq, nk = q5.shape[1], k4.shape[1]

    def q_body(i, carry):
        o, m, l = carry
        qb = _idx(q5, i)

        def kv_body(j, c):
            def compute(c):
                ob, mb, lb = c
                s = _logits(qb, _idx(k4, j), scale, qoff + i * bq, koff + j * bk, causal)
                m_new = jnp.maximum(mb, s.max(-1))
                m_safe = jnp.where(m_new == _NEG, 0.0, m_new)
                p = jnp.exp(s - m_safe[..., None])
                corr = jnp.exp(mb - m_safe)
                lb = lb * corr + p.sum(-1)
                ob = ob * corr[..., None] + jnp.einsum("bqkgt,btkh->bqkgh", p, _idx(v4, j).astype(_F32),
                                                       preferred_element_type=_F32)
                return ob, m_new, lb

            return jax.lax.cond(_hidden(causal, qoff + i * bq, bq, koff + j * bk), lambda c: c, compute, c)

        ob, mb, lb = jax.lax.fori_loop(0, nk, kv_body, (_idx(o, i), _idx(m, i), _idx(l, i)))
        return _put(o, ob, i), _put(m, mb, i), _put(l, lb, i)

    return jax.lax.fori_loop(0, nq, q_body, (o, m, l))


def _bwd_chunk(st, q5, do5, lse5, dd5, dq, k4, v4, dk, dv, qoff, koff):
    """Add one key/value chunk's gradient terms to dQ (all queries) and to the chunk's dK, dV."""
    scale, causal, bq, bk = st
    nq, nk = q5.shape[1], k4.shape[1]

    def kv_body(j, carry):
        dq, dk, dv = carry
        kb, vb = _idx(k4, j), _idx(v4, j)
        kb32, vb32 = kb.astype(_F32), vb.astype(_F32)

        def q_body(i, c):
            def compute(c):
                dq, dkb, dvb = c
                qb = _idx(q5, i)
                s = _logits(qb, kb, scale, qoff + i * bq, koff + j * bk, causal)
                p = jnp.exp(s - _idx(lse5, i)[..., None])
                do32 = _idx(do5, i).astype(_F32)
                dvb = dvb + jnp.einsum("bqkgt,bqkgh->btkh", p, do32, preferred_element_type=_F32)
                dp = jnp.einsum("bqkgh,btkh->bqkgt", do32, vb32, preferred_element_type=_F32)
                dsc = p * (dp - _idx(dd5, i)[..., None])
                dqb = _idx(dq, i) + jnp.einsum("bqkgt,btkh->bqkgh", dsc, kb32, preferred_element_type=_F32) * scale
                dkb = dkb + jnp.einsum("bqkgt,bqkgh->btkh", dsc, qb.astype(_F32), preferred_element_type=_F32) * scale
                return _put(dq, dqb, i), dkb, dvb

            return jax.lax.cond(_hidden(causal, qoff + i * bq, bq, koff + j * bk), lambda c: c, compute, c)

        dq, dkb, dvb = jax.lax.fori_loop(0, nq, q_body, (dq, _idx(dk, j), _idx(dv, j)))
        return dq, _put(dk, dkb, j), _put(dv, dvb, j)

    return jax.lax.fori_loop(0, nk, kv_body, (dq, dk, dv))


def _ring_perm(n):
    return [(j, (j + 1) % n) for j in range(n)]


def _shapes(q, k, bq, bk):
    B, T, N, H = q.shape
    K = k.shape[2]
    return B, T, N, H, K, N // K, T // bq, T // bk


def _forward(q, k, v, axis_name, causal, scale, bq, bk):
    B, T, N, H, K, G, nq, nk = _shapes(q, k, bq, bk)
    n = jax.lax.axis_size(axis_name)
    idx = jax.lax.axis_index(axis_name)
    st = (scale, causal, bq, bk)
    q5 = q.reshape(B, nq, bq, K, G, H)
    zero = 0.0 * q5[..., 0].astype(_F32)  # zeros that vary along the mesh axis like q
    o = jnp.zeros(q5.shape, _F32) + zero[..., None]
    m = jnp.full(zero.shape, _NEG, _F32) + zero
    l = zero
    perm = _ring_perm(n)

    def step(s, carry):
        o, m, l, k, v = carry
        src = (idx - s) % n

        def compute(c):
            return _fwd_chunk(st, q5, k.reshape(B, nk, bk, K, H), v.reshape(B, nk, bk, K, H), *c, idx * T, src * T)

        o, m, l = jax.lax.cond(jnp.logical_and(causal, src > idx), lambda c: c, compute, (o, m, l))
        k, v = jax.lax.ppermute((k, v), axis_name, perm)
        return o, m, l, k, v

    o, m, l, _, _ = jax.lax.fori_loop(0, n, step, (o, m, l, k, v))
    l_safe = jnp.where(l == 0, 1.0, l)
    out = (o / l_safe[..., None]).reshape(B, T, N, H).astype(q.dtype)
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
    B, T, N, H, K, G, nq, nk = _shapes(q, k, bq, bk)
    n = jax.lax.axis_size(axis_name)
    idx = jax.lax.axis_index(axis_name)
    st = (scale, causal, bq, bk)
    q5 = q.reshape(B, nq, bq, K, G, H)
    do5 = dout.reshape(B, nq, bq, K, G, H)
    dd5 = jnp.sum(do5.astype(_F32) * out.reshape(q5.shape).astype(_F32), axis=-1)  # D = rowsum(dO * O)
    lse5 = jnp.where(lse == _NEG, 0.0, lse)
    dq = jnp.zeros(q5.shape, _F32) + 0.0 * q5.astype(_F32)
    dk = jnp.zeros(k.shape, _F32) + 0.0 * k.astype(_F32)
    dv = jnp.zeros(v.shape, _F32) + 0.0 * v.astype(_F32)
    perm = _ring_perm(n)

    def step(s, carry):
        dq, k, v, dk, dv = carry
        src = (idx - s) % n

        def compute(c):
            dq, dk, dv = c
            dq, dk4, dv4 = _bwd_chunk(st, q5, do5, lse5, dd5, dq, k.reshape(B, nk, bk, K, H),
                                      v.reshape(B, nk, bk, K, H), dk.reshape(B, nk, bk, K, H),
                                      dv.reshape(B, nk, bk, K, H), idx * T, src * T)
            return dq, dk4.reshape(k.shape), dv4.reshape(v.shape)

        dq, dk, dv = jax.lax.cond(jnp.logical_and(causal, src > idx), lambda c: c, compute, (dq, dk, dv))
        # the chunk and its gradient accumulators move on together: after n hops they are home
        k, v, dk, dv = jax.lax.ppermute((k, v, dk, dv), axis_name, perm)
        return dq, k, v, dk, dv

    dq, _, _, dk, dv = jax.lax.fori_loop(0, n, step, (dq, k, v, dk, dv))
    return dq.reshape(B, T, N, H).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


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
