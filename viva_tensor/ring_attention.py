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

The block math is flash attention's own (``flash_attention._block_forward`` and ``_block_backward``, one
implementation of the FlashAttention-2 online softmax in the package); this module only moves the chunks
around the ring and tells the kernels how far apart the chunks are. So ring attention means exactly what
:func:`viva_tensor.flash_attention.dot_product_attention` means, NaN and huge logits included.

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from viva_tensor import flash_attention as _fa
from viva_tensor.errors import ConfigError, DimensionError, DTypeError, ShapeMismatch, ShardingError
from viva_tensor.sharding import place

__all__ = ["ring_attention", "ring_attention_local"]

_F32 = jnp.float32
_slice = jax.lax.dynamic_slice_in_dim
_update = jax.lax.dynamic_update_slice_in_dim


def _auto_block(n: int, target: int) -> int:
    """The largest divisor of ``n`` not above ``target``."""
    for b in range(min(n, target), 0, -1):
        if n % b == 0:
            return b
    return 1


def _ring_perm(n):
    return [(j, (j + 1) % n) for j in range(n)]


def _varying_zeros(shape, like):
    """float32 zeros that vary along the mesh axes like ``like`` (a loop carry inside shard_map must)."""
    return jnp.zeros(shape, _F32) + 0.0 * like.reshape(-1)[0].astype(_F32)


# The block math is flash attention's (flash_attention._block_forward / _block_backward): this module only
# moves the key/value chunks around the ring and tells the kernels how far apart the chunks are (offset =
# global position of this device's query 0 minus that of the chunk's key 0), which is what lets the causal
# mask skip whole chunks and sub-blocks. Layouts are the kernels': queries (B, T, K, G, H), row statistics
# (B, K, G, T), keys and values (B, T, K, H).


def _merge_chunk(st, ops, stats, offset):
    """Merge one key/value chunk (``ops.k``, ``ops.v``) into the running (max, sum, acc) of every query row."""
    prefix = _fa._value_prefix(st, ops.v)

    def q_block(i, stats):
        i0 = i * st.block_q
        blk = tuple(_slice(x, i0, st.block_q, axis=3) for x in stats)
        blk = _fa._block_forward(st, ops, i0, blk, value_prefix=prefix, offset=offset)
        return tuple(_update(x, b, i0, axis=3) for x, b in zip(stats, blk, strict=False))

    return jax.lax.fori_loop(0, st.seq_q // st.block_q, q_block, stats)


def _forward(q, k, v, axis_name, st):
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    n = jax.lax.axis_size(axis_name)
    idx = jax.lax.axis_index(axis_name)
    ops = _fa._operands(st, q, k, v)  # the blocks divide T: no padding
    shape = (B, K, G, T)
    stats = (_varying_zeros(shape, q) - jnp.inf, _varying_zeros(shape, q), _varying_zeros((*shape, H), q))
    perm = _ring_perm(n)

    def step(s, carry):
        stats, k, v = carry[:3], carry[3], carry[4]
        src = (idx - s) % n  # the device whose chunk is here at step s
        stats = _merge_chunk(st, ops._replace(k=k, v=v), stats, (idx - src) * T)
        k, v = jax.lax.ppermute((k, v), axis_name, perm)
        return (*stats, k, v)

    # n - 1 hops: the last chunk is merged where it arrives
    m, den, acc, k_last, v_last = jax.lax.fori_loop(0, n - 1, step, (*stats, ops.k, ops.v))
    src = (idx - (n - 1)) % n
    m, den, acc = _merge_chunk(st, ops._replace(k=k_last, v=v_last), (m, den, acc), (idx - src) * T)
    out = (acc / den[..., None]).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q.dtype)
    return out, (m, den)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _ring(q, k, v, axis_name, st):
    return _forward(q, k, v, axis_name, st)[0]


def _ring_fwd(q, k, v, axis_name, st):
    out, stats = _forward(q, k, v, axis_name, st)
    return out, (q, k, v, out, stats)


def _backward_chunk(st, ops, saved, grads, offset):
    """Add one chunk's terms to dQ (all local queries) and to the chunk's dK, dV (which travel with it)."""

    def kv_block(j, grads):
        dq, dk, dv = grads
        j0 = j * st.block_kv
        carry = (dq, _slice(dk, j0, st.block_kv, axis=1), _slice(dv, j0, st.block_kv, axis=1), None)
        dq, dk_j, dv_j, _ = _fa._block_backward(st, ops, saved, j0, carry, offset=offset)
        return dq, _update(dk, dk_j, j0, axis=1), _update(dv, dv_j, j0, axis=1)

    return jax.lax.fori_loop(0, st.seq_kv // st.block_kv, kv_block, grads)


def _ring_bwd(axis_name, st, res, dout):
    q, k, v, out, stats = res
    B, T, N, H = q.shape
    K = k.shape[2]
    n = jax.lax.axis_size(axis_name)
    idx = jax.lax.axis_index(axis_name)
    ops = _fa._operands(st, q, k, v)
    saved = _fa._saved(st, out, stats, dout.astype(q.dtype), None, K)
    dq = _varying_zeros(ops.q.shape, q)
    dk, dv = _varying_zeros(k.shape, k), _varying_zeros(v.shape, v)
    perm = _ring_perm(n)

    def step(s, carry):
        dq, k, v, dk, dv = carry
        src = (idx - s) % n
        dq, dk, dv = _backward_chunk(st, ops._replace(k=k, v=v), saved, (dq, dk, dv), (idx - src) * T)
        # the chunk and its gradient accumulators move on together
        k, v, dk, dv = jax.lax.ppermute((k, v, dk, dv), axis_name, perm)
        return dq, k, v, dk, dv

    dq, k, v, dk, dv = jax.lax.fori_loop(0, n - 1, step, (dq, ops.k, ops.v, dk, dv))
    src = (idx - (n - 1)) % n
    dq, dk, dv = _backward_chunk(st, ops._replace(k=k, v=v), saved, (dq, dk, dv), (idx - src) * T)
    dk, dv = jax.lax.ppermute((dk, dv), axis_name, perm)  # the n-th hop brings dK, dV home
    return dq.reshape(B, T, N, H).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_ring.defvjp(_ring_fwd, _ring_bwd)


def _check(query, key, value):
    """The three inputs as jax arrays, checked (float64 and non-arrays refused as in flash attention)."""
    query, key, value = (_fa._as_array(n, x) for n, x in (("query", query), ("key", key), ("value", value)))
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 4:
            raise DimensionError(argument=name, expected="rank 4 (B, T, N, H)", got=f"shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
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
    if 0 in query.shape or 0 in key.shape:
        raise ShapeMismatch(argument="query" if 0 in query.shape else "key",
                            expected="a non-empty sequence, heads and head dim",
                            got=f"shape {query.shape}, key {key.shape}")
    if N % key.shape[2]:
        raise ShapeMismatch(argument="key", expected=f"a number of heads dividing {N}", got=key.shape[2])
    return query, key, value


def _check_block(name: str, b: Any) -> int:
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
        raise ConfigError(argument=name, expected="a positive integer", got=repr(b))
    return int(b)


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
        DimensionError, DTypeError, ShapeMismatch: for inputs of the wrong rank, dtype (float64 included:
            cast to float32) or shape, or empty ones.
        ConfigError: for block sizes that are not positive integers, a scale that is not a concrete number.
        ShardingError: when called outside a ``shard_map`` that binds ``axis_name``.

    Example:
        >>> mesh = jax.make_mesh((1,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,))
        >>> f = jax.jit(jax.shard_map(lambda q: ring_attention_local(q, q, q, axis_name="sp", is_causal=True),
        ...                           mesh=mesh, in_specs=P(None, "sp"), out_specs=P(None, "sp")))
        >>> float(f(jnp.ones((1, 4, 1, 2)))[0, 3, 0, 0])
        1.0
    """
    query, key, value = _check(query, key, value)
    block_q, block_kv = _check_block("block_q", block_q), _check_block("block_kv", block_kv)
    try:
        jax.lax.axis_size(axis_name)
    except NameError:
        hint = "use ring_attention(q, k, v, mesh=..., axis=...), or call this inside shard_map."
        raise ShardingError(argument="axis_name", expected="a mesh axis bound by an enclosing jax.shard_map",
                            got=repr(axis_name), hint=hint) from None
    T, H = query.shape[1], query.shape[3]
    st = _fa._Static(scale=_fa._check_scale(scale, H), causal=bool(is_causal), window=None,
                     block_q=_auto_block(T, block_q), block_kv=_auto_block(T, block_kv), seq_q=T, seq_kv=T)
    return _ring(query, key, value, axis_name, st)


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
        DimensionError, DTypeError, ShapeMismatch: for inputs of the wrong rank, dtype (float64 included:
            cast to float32) or shape, or empty ones.
        ConfigError: for block sizes that are not positive integers, a scale that is not a concrete number.
        ShardingError: for an axis the mesh lacks, or a length the axis does not divide.

    Example:
        >>> mesh = jax.make_mesh((1,), ("seq",))
        >>> q = jax.random.normal(jax.random.key(0), (1, 16, 2, 8))
        >>> ref = jax.nn.dot_product_attention(q, q, q, is_causal=True)
        >>> got = ring_attention(q, q, q, mesh=mesh, axis="seq", is_causal=True)
        >>> bool(jnp.allclose(got, ref, atol=1e-5))
        True
    """
    query, key, value = _check(query, key, value)
    block_q, block_kv = _check_block("block_q", block_q), _check_block("block_kv", block_kv)
    scale = _fa._check_scale(scale, query.shape[3])  # a float (hashable: the cached program's key)
    if mesh is None:
        mesh = jax.sharding.get_mesh()
        if mesh.empty:
            mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            raise ShardingError(argument="mesh", expected="a mesh (the mesh= argument or jax.set_mesh)", got="none")
    if not isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
        raise ShardingError(argument="mesh", expected="a jax.sharding.Mesh (or None: the one of jax.set_mesh)",
                            got=type(mesh).__name__)
    if not isinstance(axis, str) or axis not in mesh.axis_names:
        raise ShardingError(argument="axis", expected=f"a mesh axis among {tuple(mesh.axis_names)}", got=repr(axis))
    n = mesh.shape[axis]
    T = query.shape[1]
    if T % n:
        raise ShardingError(argument="query", expected=f"a sequence length divisible by {n} (mesh axis {axis!r})",
                            got=T, hint="pad the sequence.")
    spec = P(None, axis, None, None)
    program = _program(mesh, axis, is_causal, scale, block_q, block_kv)
    return program(*(place(x, spec, mesh) for x in (query, key, value)))


@functools.lru_cache(maxsize=64)
def _program(mesh, axis: str, is_causal: bool, scale: float | None, block_q: int, block_kv: int):
    """The jitted ``shard_map`` of :func:`ring_attention_local` for one mesh, axis and static options: cached, so
    that eager calls with the same options (and shapes) reuse one compiled program instead of compiling anew."""
    spec = P(None, axis, None, None)
    f = functools.partial(ring_attention_local, axis_name=axis, is_causal=is_causal, scale=scale,
                          block_q=block_q, block_kv=block_kv)
    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False))
