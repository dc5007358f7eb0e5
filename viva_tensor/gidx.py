"""Group-wise int4 with a group index per input column (GPTQ act-order, ``desc_act=True``): format ``int4_gidx``.

An ``int4_group`` record (:mod:`viva_tensor.awq`) gives input column ``c`` of a weight ``(out, in)`` the scale and
zero point of group ``c // group_size``. GPTQ with act-order quantizes the columns in order of decreasing
``H[c, c]`` and forms groups of ``group_size`` consecutive columns *in that order*, so the group of a column is a
free index: GPTQ checkpoints store it as ``g_idx`` (int32, one per input column). :class:`GIdxInt4Tensor` is the
``int4_group`` record plus that ``g_idx``; it decodes to ``(code[o, c] - zero[o, g_idx[c]]) * scale[o, g_idx[c]]``
in float32 (the same arithmetic as ``int4_group``, bit for bit when ``g_idx[c] == c // group_size``).

:func:`quantize` (round to nearest) takes the group of each column from ``g_idx`` (default ``c // group_size``):
every group must hold ``group_size`` columns (the last one may hold fewer), as GPTQ's ``g_idx`` always does; the
scales and zero points are ``int4_group``'s, computed over each group's columns. ``gptq.quantize(...,
act_order=True)`` with several groups per row returns this record.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from viva_tensor import awq, gidx
    >>> w = jax.random.normal(jax.random.key(0), (4, 64))
    >>> g = jnp.asarray([1, 0] * 32, jnp.int32)          # even columns in group 1, odd ones in group 0
    >>> q = gidx.quantize(w, group_size=32, g_idx=g)
    >>> q.format, q.scales.shape, q.g_idx.shape
    ('int4_gidx', (4, 2), (64,))
    >>> plain = gidx.quantize(w, group_size=32)         # g_idx = c // 32: the int4_group record's values
    >>> bool((gidx.dequantize(plain) == awq.dequantize(awq.quantize_group(w, group_size=32))).all())
    True
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from viva_tensor import awq
from viva_tensor._formats import packing
from viva_tensor._formats.record import QuantizedArray, record, static
from viva_tensor._formats.registry import check_record, register_format
from viva_tensor.errors import ConfigError, DTypeError, FormatError, InvalidShape

__all__ = ["GIdxInt4Tensor", "quantize", "dequantize", "from_group_record", "default_g_idx"]


@record("int4_gidx", core_ndim=2)
class GIdxInt4Tensor(QuantizedArray):
    """Group-wise asymmetric 4-bit weights ``(out, in)`` whose groups are given by ``g_idx`` (GPTQ act-order).

    Attributes:
        codes: uint8 ``(out, ceil(in / 2))``; column ``2j`` in the low nibble of byte ``j`` (as ``int4_group``).
        scales: float16 ``(out, n_groups)``.
        zeros: uint8 ``(out, ceil(n_groups / 2))``; zero points 0..15 packed like the codes.
        g_idx: int32 ``(in,)``: the group of each input column.
        shape: ``(out, in)`` (static). dtype: the original dtype (static). group_size: static.
    """

    codes: jax.Array
    scales: jax.Array
    zeros: jax.Array
    g_idx: jax.Array
    group_size: int = static(default=128)


def default_g_idx(k: int, group_size: int) -> jax.Array:
    """``c // group_size`` for the ``k`` input columns (int32): groups of consecutive columns.

    Example:
        >>> default_g_idx(5, 2).tolist()
        [0, 0, 1, 1, 2]
    """
    return jnp.arange(k, dtype=jnp.int32) // jnp.int32(min(group_size, k))


def _check_g_idx(g_idx: Any, k: int, group: int) -> jax.Array:
    g = g_idx if isinstance(g_idx, jax.Array) else jnp.asarray(np.asarray(g_idx))
    if tuple(g.shape) != (k,):
        raise InvalidShape(argument="g_idx", expected=f"shape ({k},): one group per input column", got=tuple(g.shape))
    if not jnp.issubdtype(g.dtype, jnp.integer):
        raise DTypeError(argument="g_idx", expected="an integer array", got=str(g.dtype))
    g = g.astype(jnp.int32)
    if not isinstance(g, jax.core.Tracer):  # values are checked when they are known (not under jit)
        v = np.asarray(g)
        ng = -(-k // group)
        want = np.full(ng, group)
        want[-1] = k - group * (ng - 1)
        counts = np.bincount(v.clip(0, ng), minlength=ng + 1)
        if v.min() < 0 or v.max() >= ng or not np.array_equal(np.sort(counts[:ng]), np.sort(want)):
            raise ConfigError(argument="g_idx", expected=f"groups 0..{ng - 1} of {group} columns each (one may "
                              f"hold {want[-1]})", got=f"groups {v.min()}..{v.max()} of sizes {counts.tolist()}",
                              hint="GPTQ's g_idx is a permutation of c // group_size.")
    return g


def quantize(w: Any, *, group_size: int = 128, g_idx: Any = None, validate: bool = False) -> GIdxInt4Tensor:
    """Round-to-nearest group-wise int4 of a weight ``(out, in)`` with the groups of ``g_idx``.

    Args:
        w: a float32, bfloat16 or float16 weight ``(out, in)`` (any rank >= 1: groups along the last axis).
        group_size: columns per group (as ``int4_group``; a group size above ``in`` means one group).
        g_idx: the group of each input column, int ``(in,)``; default ``c // group_size``. Each group must hold
            ``group_size`` columns (the group that holds fewer is the last group id, as GPTQ's ``g_idx``).
        validate: as :func:`viva_tensor.awq.quantize_group`'s (every value finite, every scale in float16's range).

    Returns:
        A :class:`GIdxInt4Tensor`.

    Raises:
        DTypeError, InvalidShape, DimensionError: as :func:`viva_tensor.awq.quantize_group`, or a bad ``g_idx``.
        FormatError: (``from_group_record``) not an int4_group record.
        ConfigError: a bad ``group_size``, or ``g_idx`` groups of the wrong sizes (checked when not traced).
        NonFiniteError, InvalidOp: as :func:`viva_tensor.awq.quantize_group` with ``validate=True``.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize(jnp.arange(8.0).reshape(1, 8), group_size=4, g_idx=jnp.asarray([0, 1] * 4))
        >>> q.scales.tolist()                               # group 0: columns 0, 2, 4, 6; group 1: 1, 3, 5, 7
        [[0.39990234375, 0.466552734375]]
        >>> [round(v, 2) for v in dequantize(q)[0].tolist()]
        [0.0, 0.93, 2.0, 2.8, 4.0, 5.13, 6.0, 7.0]
    """
    if g_idx is None:  # awq checks w and group_size
        return from_group_record(awq.quantize_group(w, group_size=group_size, validate=validate), None)
    w, _ = awq._rows_of(w)
    k = w.shape[-1]
    g = _check_g_idx(g_idx, k, min(awq._positive_int("group_size", group_size), k))
    order = jnp.argsort(g, stable=True)  # the columns of group 0, then of group 1 ...: int4_group's layout
    q = awq.quantize_group(w[..., order], group_size=group_size, validate=validate)
    codes = packing.unpack_pairs(q.codes, k)[:, jnp.argsort(order)]
    return GIdxInt4Tensor(packing.pack_pairs(codes), q.scales, q.zeros, g, shape=q.shape, dtype=q.dtype,
                          group_size=q.group_size)


def from_group_record(q: awq.GroupInt4Tensor, g_idx: Any) -> GIdxInt4Tensor:
    """An ``int4_gidx`` record from an ``int4_group`` one's buffers and a ``g_idx`` (default ``c // group_size``).

    The codes stay where they are (column ``c``'s code), the scales and zero points stay per group: only the map
    from columns to groups is new.

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import awq
        >>> from_group_record(awq.quantize_group(jnp.ones((2, 8)), group_size=4), None).g_idx.tolist()
        [0, 0, 0, 0, 1, 1, 1, 1]
    """
    if not isinstance(q, awq.GroupInt4Tensor) or q.batch_shape:
        raise FormatError(argument="q", expected="an int4_group record made outside vmap", got=type(q).__name__)
    k = q.shape[-1]
    g = default_g_idx(k, q.group_size) if g_idx is None else _check_g_idx(g_idx, k, min(q.group_size, k))
    return GIdxInt4Tensor(q.codes, q.scales, q.zeros, g, shape=q.shape, dtype=q.dtype, group_size=q.group_size)


def dequantize(q: GIdxInt4Tensor) -> jax.Array:
    """Decodes ``(code[o, c] - zero[o, g_idx[c]]) * scale[o, g_idx[c]]`` in float32, cast to ``q.dtype``.

    Raises:
        FormatError: ``q`` is not an ``int4_gidx`` record (or its buffers do not match its static fields).

    Example:
        >>> import jax.numpy as jnp
        >>> dequantize(quantize(jnp.ones((2, 8)), group_size=4)).tolist()[0][:3]
        [0.999755859375, 0.999755859375, 0.999755859375]
    """
    if not isinstance(q, GIdxInt4Tensor):
        raise FormatError(argument="q", expected="a GIdxInt4Tensor", got=type(q).__name__,
                          hint="use viva_tensor.quant.dequantize for any format.")
    check_record(q)
    return _dequantize(q)


@jax.jit
def _dequantize(q: GIdxInt4Tensor) -> jax.Array:
    k = q.shape[-1]
    ng = q.scales.shape[-1]
    codes = packing.unpack_pairs(q.codes, k).astype(jnp.float32)
    zeros = packing.unpack_pairs(q.zeros, ng).astype(jnp.float32)
    g = jnp.clip(q.g_idx, 0, ng - 1)
    g = jnp.broadcast_to(g[..., None, :], (*codes.shape[:-1], k))  # one g_idx per example under vmap
    zero = jnp.take_along_axis(zeros, g, axis=-1)
    scale = jnp.take_along_axis(q.scales.astype(jnp.float32), g, axis=-1)
    return ((codes - zero) * scale).astype(q.dtype)


register_format(
    "int4_gidx",
    record=GIdxInt4Tensor,
    quantize=quantize,
    dequantize=dequantize,
    block_size=128,
    description="group int4 with a group index per input column (GPTQ act-order g_idx): fp16 scales, 4-bit zeros",
)
