"""From a quantized record to the kernel's arguments (private): ``kernel_args(record)``.

Reads only the records' public fields. The planes describe the record's 2-D weight ``(rows, packed)`` as stored,
packed and blocked along its last axis: contract that axis with ``weight_layout="nk"`` (``x @ w.T``, the
checkpoint layout ``(out, in)``), or the other one with ``"kn"`` (``x @ w``). Decoding the planes
(``_kernels.decode`` or ``decode_reference``) gives the format's own ``dequantize`` bit for bit.

=============  ===========  ===================================  ===================================  ============
record         layout       lut                                  scales (per block, as stored)        offsets
=============  ===========  ===================================  ===================================  ============
NF4Tensor      high_first   NF4 levels                           absmax (float32)                     --
NF4DQTensor    high_first   NF4 levels                           dynamic_map[absmax_codes] * nested    --
                                                                 (rounded) + offset (float32, per
                                                                 call)
FP4Tensor      high_first   bitsandbytes FP4 code book           absmax (FP4DQTensor: as NF4DQTensor)  --
NVFP4Tensor    low_first    E2M1 values                          e4m3 byte, table: float(e4m3) *      --
                                                                 tensor_scale
MXFP4Tensor    low_first    E2M1 values                          E8M0 byte, table: 2**(byte - 127),   --
                                                                 NaN for 0xFF
Q4_0Tensor     ggml         code - 8                             d (float16)                          --
Q4_1Tensor     ggml         code                                 d (float16)                          m (float16)
Q8_0Tensor     int8         --                                   d (float16)                          --
Int8Tensor     int8         --                                   scales (per row / block / tensor;    --
                                                                 per column: ``x_mul``)
GroupInt4      low_first    code                                 scales (float16)                     zero nibbles
AWQTensor      low_first    code                                 scales (float16)                     zero nibbles
=============  ===========  ===================================  ===================================  ============

Scales and offsets are handed over as the record stores them (float16, bfloat16, bytes through a 256-entry
``scale_table``, packed zero points): the kernel widens them itself, so a call never writes a float32 copy of a
plane first (at batch 1 that copy cost as much as the product). ``_kernels.float_planes`` gives the float32 values.

AWQ's weight is ``grid / act_scale`` per input column: ``x_div = act_scale`` (divide the activations by it
first, as ``awq.awq_matmul`` does); an Int8Tensor with one scale per input column gives ``x_mul``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["kernel_args", "decoded", "matmul"]

_E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
_UINT4 = np.arange(16, dtype=np.float32)


def _f32(a: jax.Array) -> jax.Array:
    return jnp.asarray(a).astype(jnp.float32)


def _rows(record: Any, block: int) -> tuple[int, int] | None:
    """(rows, packed) of a 2-D record whose blocks do not cross rows, else None."""
    shape = tuple(record.shape)
    if len(shape) != 2:
        return None
    rows, packed = shape
    if packed % 32 or packed % block:
        return None
    return rows, packed


def _mx_scales(byte: jax.Array) -> jax.Array:
    """E8M0 bytes to float32 without arithmetic (2**-127 is subnormal: built from its bits)."""
    b = byte.astype(jnp.int32)
    bits = jnp.where(b == 0, jnp.int32(0x00400000), b << 23)
    scale = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return jnp.where(b == 255, jnp.float32(jnp.nan), scale)


def kernel_args(record: Any) -> dict | None:
    """The planes of a 2-D quantized record for :func:`viva_tensor._kernels.qmatmul`, or None when it cannot take it.

    Returns:
        ``dict(codes, lut, scales, offsets, scale_table, layout, block_size, x_mul, x_div)``: ``codes`` uint8/int8
        ``(rows, packed/2 or packed)``, ``lut`` float32 ``(16,)`` or None, ``scales`` ``(rows, packed / block_size)``
        and ``offsets`` (or None) as :func:`viva_tensor._kernels.qmatmul` reads them (``scale_table`` float32
        ``(256,)`` for byte scales, else None), ``x_mul`` / ``x_div`` (None or float32 ``(packed,)``) to apply to
        the activations' contracted axis first (with ``weight_layout="nk"``). None when the record is not 2-D, is
        batched, or its packed axis is not a multiple of 32 and of its block (the pure-JAX path then applies).

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import compression
        >>> from viva_tensor._kernels.planes import kernel_args
        >>> a = kernel_args(compression.quantize_q4_0(jnp.ones((2, 64))))
        >>> a["layout"], a["block_size"], a["codes"].shape, a["scales"].shape
        ('ggml', 32, (2, 32), (2, 2))
    """
    from viva_tensor import awq, blackwell, compression, nf4

    out = dict(offsets=None, x_mul=None, x_div=None, lut=None, scale_table=None)
    books = {nf4.NF4Tensor: nf4.NF4_LEVELS, nf4.NF4DQTensor: nf4.NF4_LEVELS,  # bitsandbytes' FP4: NF4's layout,
             nf4.FP4Tensor: nf4.FP4_LEVELS, nf4.FP4DQTensor: nf4.FP4_LEVELS}  # its own code book
    if type(record) in books:
        rp = _rows(record, record.block_size)
        if rp is None or record.codes.ndim != 1:
            return None
        rows, packed = rp
        double = isinstance(record, (nf4.NF4DQTensor, nf4.FP4DQTensor))
        absmax = nf4._dq_absmax(record) if double else _f32(record.absmax)
        return out | dict(codes=record.codes.reshape(rows, packed // 2), lut=jnp.asarray(books[type(record)]),
                          scales=absmax.reshape(rows, packed // record.block_size), layout="high_first",
                          block_size=record.block_size)
    if isinstance(record, (blackwell.NVFP4Tensor, blackwell.MXFP4Tensor)):
        rp = _rows(record, record.block_size)
        if rp is None or record.codes.shape != (rp[0], rp[1] // 2):
            return None
        byte = jnp.arange(256, dtype=jnp.uint8)
        if isinstance(record, blackwell.NVFP4Tensor):
            if record.tensor_scale.ndim:
                return None
            scales = record.scales  # E4M3: the kernel indexes the table by the byte
            table = _f32(jax.lax.bitcast_convert_type(byte, record.scales.dtype)) * record.tensor_scale
        else:
            scales, table = record.scales, _mx_scales(byte)
        return out | dict(codes=record.codes, lut=jnp.asarray(_E2M1), scales=scales, layout="low_first",
                          block_size=record.block_size, scale_table=table)
    if isinstance(record, (compression.Q4_0Tensor, compression.Q4_1Tensor, compression.Q8_0Tensor)):
        rp = _rows(record, 32)
        nb = None if rp is None else rp[0] * rp[1] // 32
        if rp is None or record.qs.shape[0] != nb or record.d.shape[0] != nb:
            return None
        rows, packed = rp
        d = record.d.reshape(rows, packed // 32)
        if isinstance(record, compression.Q8_0Tensor):
            return out | dict(codes=record.qs.reshape(rows, packed), scales=d, layout="int8", block_size=32)
        res = out | dict(codes=record.qs.reshape(rows, packed // 2), scales=d, layout="ggml", block_size=32,
                         lut=jnp.asarray(_UINT4 - 8 if isinstance(record, compression.Q4_0Tensor) else _UINT4))
        if isinstance(record, compression.Q4_1Tensor):
            res["offsets"] = record.m.reshape(rows, packed // 32)
        return res
    if isinstance(record, compression.Int8Tensor):
        shape = tuple(record.shape)
        if len(shape) != 2 or shape[1] % 32:
            return None
        rows, packed = shape
        if record.block_size is not None:
            bs = record.block_size
            if packed % bs or not (bs == 16 or bs % 32 == 0) or record.codes.size != rows * packed:
                return None
            return out | dict(codes=record.codes.reshape(rows, packed), layout="int8", block_size=bs,
                              scales=_f32(record.scales).reshape(rows, packed // bs))
        if record.codes.shape != shape:
            return None
        s = _f32(record.scales)
        if record.axis == 1:  # one scale per column: it multiplies the activations
            return out | dict(codes=record.codes, layout="int8", block_size=packed, scales=jnp.ones((rows, 1)),
                              x_mul=s.reshape(packed))
        return out | dict(codes=record.codes, layout="int8", block_size=packed,
                          scales=jnp.broadcast_to(s.reshape(-1, 1), (rows, 1)))
    if isinstance(record, (awq.GroupInt4Tensor, awq.AWQTensor)):
        shape = tuple(record.shape)
        if len(shape) != 2:
            return None
        rows, packed = shape
        group = min(record.group_size, packed)
        if _rows(record, group) is None or record.codes.shape != (rows, packed // 2):
            return None
        ng = packed // group
        if record.scales.shape != (rows, ng) or record.zeros.shape != (rows, (ng + 1) // 2):
            return None
        res = out | dict(codes=record.codes, lut=jnp.asarray(_UINT4), scales=record.scales, offsets=record.zeros,
                         layout="low_first", block_size=group)
        if isinstance(record, awq.AWQTensor):
            res["x_div"] = _f32(record.act_scale).reshape(packed)
        return res
    return None


def decoded(args: dict) -> jax.Array:
    """The float32 weight the planes describe, in pure JAX (``x_mul`` / ``x_div`` applied to its columns)."""
    from viva_tensor import _kernels

    w = _kernels.decode_reference(args["codes"], args["lut"] if args["lut"] is not None else jnp.zeros(16),
                                  args["scales"], args["offsets"], layout=args["layout"],
                                  block_size=args["block_size"], scale_table=args["scale_table"])
    if args["x_mul"] is not None:
        w = w * args["x_mul"][None, :]
    if args["x_div"] is not None:
        # correctly rounded: XLA rewrites a division by a broadcast into a product with a rounded reciprocal
        w = w / jax.lax.optimization_barrier(jnp.broadcast_to(args["x_div"][None, :], w.shape))
    return w



def matmul(x: jax.Array, record: Any, *, weight_layout: str = "nk") -> jax.Array | None:
    """``x`` times a 2-D quantized record through the kernel, or None when :func:`kernel_args` cannot take it.

    ``weight_layout="nk"`` contracts the record's last (packed, blocked) axis: ``x @ dequantize(record).T``;
    ``"kn"`` its first: ``x @ dequantize(record)``. The result is in ``x``'s dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import nf4
        >>> from viva_tensor._kernels.planes import matmul
        >>> matmul(jnp.ones((1, 64)), nf4.quantize(jnp.ones((3, 64)))).tolist()
        [[64.0, 64.0, 64.0]]
    """
    args = kernel_args(record)
    if args is None:
        return None
    from viva_tensor import _kernels

    x = jnp.asarray(x)
    col_mul, col_div = args["x_mul"], args["x_div"]
    lift = (1,) * (x.ndim - 1) + (-1,)  # (K,) or (N,) against the last axis of x or y
    col_mul = None if col_mul is None else col_mul.reshape(lift)
    col_div = None if col_div is None else col_div.reshape(lift)
    if weight_layout == "nk":  # per-column factors of w scale the contracted axis of x
        if col_mul is not None:
            x = (x.astype(jnp.float32) * col_mul).astype(x.dtype)
        if col_div is not None:
            x = (x.astype(jnp.float32) / col_div).astype(x.dtype)
    y = _kernels.qmatmul(x, args["codes"], args["lut"], args["scales"], args["offsets"], layout=args["layout"],
                         block_size=args["block_size"], weight_layout=weight_layout, scale_table=args["scale_table"])
    if weight_layout == "kn" and (col_mul is not None or col_div is not None):  # they scale the output columns
        y32 = y.astype(jnp.float32)
        y32 = y32 * col_mul if col_mul is not None else y32
        y32 = y32 / col_div if col_div is not None else y32
        y = y32.astype(y.dtype)
    return y
