"""Micro-block floating formats of Blackwell-class hardware: NVIDIA NVFP4 and OCP MX FP4.

Both store 4-bit E2M1 elements (1 sign, 2 exponent, 1 mantissa bit: magnitudes 0, 0.5, 1, 1.5, 2, 3, 4,
6) in blocks along the LAST axis, packed two per byte with the FIRST value in the LOW nibble (the
OCP / torch / ModelOpt convention). They differ in the scales:

* **NVFP4** (NVIDIA): a block of 16 values shares an FP8 E4M3 scale, and the tensor one float32 scale.
  As in NVIDIA's TensorRT Model Optimizer (``NVFP4QTensor``): ``tensor_scale = amax / (6 * 448)``,
  ``block_scale = e4m3(block_amax / (6 * tensor_scale))`` (a zero block scale becomes 1; values above
  448 saturate to 448 before the cast), ``code = e2m1(x / (block_scale * tensor_scale))`` rounding to
  nearest even and saturating at 6. 4.5 bits per value, plus 4 bytes per tensor.
* **MXFP4** (OCP Microscaling spec v1.0, section 6.3): a block of 32 values shares an E8M0 scale
  ``X = 2**(floor(log2(block_amax)) - 2)`` (2 is E2M1's largest exponent), clamped to E8M0's range
  [2**-127, 2**127]; elements are ``e2m1(x / X)``, nearest even, saturating at 6. 4.25 bits per value.
  The exponent is taken from the float32 bits (JAX's ``float8_e8m0fnu`` cast rounds to the nearest
  power of two and maps 0 to NaN, so it is not used).

Decisions, documented and tested:

* Blocks are cut along the last axis; a last axis that is not a multiple of the block is padded with
  zeros inside (the codes and scales keep the padded blocks), and the shape is restored. A 0-d
  array is treated as shape ``(1,)``. Empty arrays raise :class:`~viva_tensor.errors.InvalidShape`.
* An all-zero block has codes 0 and dequantizes to exact zeros (NVFP4 block scale 1.0, or the tensor
  scale 0 for an all-zero tensor; MXFP4 scale byte 0, 2**-127). ModelOpt would compute 0/0 = NaN
  for an all-zero tensor; here it is 0.
* A NaN or infinity makes its own block's scale NaN (E4M3 0x7F, E8M0 0xFF), so that block
  dequantizes to NaN; NVFP4's tensor scale is computed from the finite values only, so no other
  block changes. ``validate=True`` raises :class:`~viva_tensor.errors.NonFiniteError` instead.
* The sign bit of a code is the float's sign bit, as the hardware conversion (PTX
  ``cvt.rn.satfinite.e2m1x2``) and JAX's cast do: ``-0.0`` and a small negative value that rounds to
  zero are code 8. ModelOpt's PyTorch fallback takes ``x < 0`` and so writes ``-0.0`` as code 0: the
  only byte that can differ from it, and both decode to zero.
* A block whose E4M3 scale underflows to 0 (block amax below ~2**-9 / 448 of the tensor amax) is
  divided by infinity and stores zeros (codes 0 or 8; ModelOpt would divide by zero and store 7 or
  15, times a zero scale); it dequantizes to zeros either way.
* XLA on CPU flushes float32 subnormals to zero; inputs below 2**-126 in magnitude count as zeros.

Example:
    >>> import jax.numpy as jnp
    >>> from viva_tensor import blackwell
    >>> q = blackwell.quantize_mxfp4(jnp.array([1.0, -0.5, 3.0, 6.0]))
    >>> [hex(b) for b in q.codes.tolist()[:2]], q.scales.tolist()
    (['0x92', '0x75'], [127])
    >>> blackwell.dequantize(q).tolist()
    [1.0, -0.5, 3.0, 6.0]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from viva_tensor._formats import packing
from viva_tensor._formats.checks import float_input, validate_finite
from viva_tensor._formats.packing import E2M1_VALUES
from viva_tensor._formats.record import QuantizedArray, record, static
from viva_tensor._formats.registry import Planes, check_record, register_format
from viva_tensor.errors import FormatError

__all__ = [
    "E2M1_VALUES",
    "NVFP4_BLOCK",
    "MXFP4_BLOCK",
    "NVFP4Tensor",
    "MXFP4Tensor",
    "quantize_nvfp4",
    "quantize_mxfp4",
    "dequantize",
]

NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
_E2M1_MAX = 6.0
_E4M3_MAX = 448.0


def _core_ndim(record: Any) -> int:
    return max(1, len(record.shape))


@record("nvfp4", core_ndim=_core_ndim)
class NVFP4Tensor(QuantizedArray):
    """NVFP4: E2M1 codes, an E4M3 scale per 16 values of the last axis, a float32 tensor scale."""

    codes: jax.Array  # uint8 (*lead, padded_last / 2), first value in the low nibble
    scales: jax.Array  # float8_e4m3fn (*lead, blocks)
    tensor_scale: jax.Array  # float32 ()
    block_size: int = static(default=NVFP4_BLOCK)


@record("mxfp4", core_ndim=_core_ndim)
class MXFP4Tensor(QuantizedArray):
    """OCP MXFP4: E2M1 codes and an E8M0 scale byte (biased exponent) per 32 values of the last axis."""

    codes: jax.Array  # uint8 (*lead, padded_last / 2), first value in the low nibble
    scales: jax.Array  # uint8 (*lead, blocks): E8M0, 2**(byte - 127), 0xFF = NaN
    block_size: int = static(default=MXFP4_BLOCK)


def _blocked(x: jax.Array, block: int) -> jax.Array:
    """``x`` as float32 blocks (*lead, nb, block) along its last axis, zero-padded."""
    v = x.reshape(x.shape if x.ndim else (1,)).astype(jnp.float32)
    last = v.shape[-1]
    nb = -(-last // block)
    v = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, nb * block - last)])
    return v.reshape(*v.shape[:-1], nb, block)


def _pack_e2m1(scaled: jax.Array) -> jax.Array:
    """E2M1 (round to nearest even, saturating) of (..., nb, block) values, packed first-low per byte.

    The sign bit is the float's sign bit (``-0.0`` gives code 8). ``astype(float4_e2m1fn)`` then a
    bitcast of pairs measured faster on CPU than counting decision points with compares.
    """
    fp4 = scaled.astype(jnp.float4_e2m1fn)
    pairs = fp4.reshape(*fp4.shape[:-2], -1, 2)
    return jax.lax.bitcast_convert_type(pairs, jnp.uint8)


def _block_ok(blocks: jax.Array) -> jax.Array:
    """Whether each block is all finite: ``x * 0`` is NaN exactly for NaN and infinities."""
    return ~jnp.isnan(jnp.sum(blocks * jnp.float32(0), axis=-1))


def _unpack_e2m1(codes: jax.Array) -> jax.Array:
    """Packed uint8 codes (..., n) -> float32 values (..., 2n): one table gather per byte."""
    return jnp.asarray(packing.E2M1_PAIRS)[codes].reshape(*codes.shape[:-1], -1)


def _e4m3_to_float32(scales: jax.Array) -> jax.Array:
    """float8_e4m3fn scales as float32 through a 256-entry table (bit-identical to ``astype``)."""
    return jnp.asarray(packing.E4M3_TABLE)[jax.lax.bitcast_convert_type(scales, jnp.uint8)]


def quantize_nvfp4(x: Any, *, validate: bool = False) -> NVFP4Tensor:
    """Quantizes ``x`` to NVIDIA NVFP4 (E2M1, E4M3 scale per 16 values, float32 tensor scale).

    Args:
        x: A float32, bfloat16 or float16 array of any non-empty shape; blocks run along its last axis.
        validate: Check (eagerly) that every value is finite.

    Returns:
        An :class:`NVFP4Tensor`: ``codes`` (uint8, two per byte, first value low), ``scales``
        (float8_e4m3fn per block) and ``tensor_scale`` (float32).

    Raises:
        DTypeError: ``x`` is not a float32, bfloat16 or float16 array.
        InvalidShape: ``x`` is empty.
        InvalidOp: ``validate=True`` under jit or vmap.
        NonFiniteError: ``validate=True`` and ``x`` holds a NaN or an infinity.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_nvfp4(jnp.arange(32.0).reshape(2, 16))
        >>> q.codes.shape, q.scales.dtype.name, q.scales.astype(jnp.float32).tolist()
        ((2, 8), 'float8_e4m3fn', [[224.0], [448.0]])
        >>> [round(v, 2) for v in dequantize(q)[1, :4].tolist()]
        [15.5, 15.5, 15.5, 20.67]
    """
    x = float_input(x)
    if validate:
        validate_finite(x)
    codes, scales, tensor_scale = _nvfp4_core(x)
    return NVFP4Tensor(codes=codes, scales=scales, tensor_scale=tensor_scale, shape=tuple(x.shape), dtype=x.dtype)


@jax.jit
def _nvfp4_core(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    blocks = _blocked(x, NVFP4_BLOCK)
    ok = _block_ok(blocks)
    block_amax = jnp.where(ok, jnp.max(jnp.abs(blocks), axis=-1), 0)
    # An exact division: XLA on CPU would multiply by a rounded reciprocal of the constant under jit (one
    # ulp off for most amax, e.g. 72.97671); the barrier hides the constant from that rewrite.
    tensor_scale = jnp.max(block_amax) / jax.lax.optimization_barrier(jnp.float32(6.0 * 448.0))
    six_g = jnp.float32(6.0) * tensor_scale
    # the same for the per-block division: a broadcast divisor would also become a reciprocal multiply (found by
    # the property test: bfloat16 input, one E4M3 scale one step low)
    divisor = jax.lax.optimization_barrier(jnp.broadcast_to(jnp.where(six_g > 0, six_g, 1), block_amax.shape))
    s = jnp.where(six_g > 0, block_amax / divisor, 0)
    s = jnp.minimum(jnp.where(s == 0, jnp.float32(1), s), jnp.float32(_E4M3_MAX))
    s = jnp.where(ok, s, jnp.float32(jnp.nan))
    scales = s.astype(jnp.float8_e4m3fn)
    denom = (scales.astype(jnp.float32) * tensor_scale)[..., None]
    # A zero scale (all-zero tensor, or an E4M3 underflow) divides by infinity instead: zeros.
    denom = jnp.where(denom > 0, denom, jnp.float32(jnp.inf))
    return _pack_e2m1(blocks / denom), scales, tensor_scale


def _pow2(exponent: jax.Array) -> jax.Array:
    """2**exponent as float32 for an int32 exponent in [-126, 127] (exact, from the bits)."""
    return jax.lax.bitcast_convert_type((exponent + 127).astype(jnp.uint32) << 23, jnp.float32)


def quantize_mxfp4(x: Any, *, validate: bool = False) -> MXFP4Tensor:
    """Quantizes ``x`` to OCP MXFP4 (E2M1 elements, an E8M0 scale per 32 values of the last axis).

    Args:
        x: A float32, bfloat16 or float16 array of any non-empty shape; blocks run along its last axis.
        validate: Check (eagerly) that every value is finite.

    Returns:
        An :class:`MXFP4Tensor`: ``codes`` (uint8, two per byte, first value low) and ``scales``
        (uint8 E8M0 bytes: the scale is ``2**(byte - 127)``, 0xFF is NaN).

    Raises:
        DTypeError: ``x`` is not a float32, bfloat16 or float16 array.
        InvalidShape: ``x`` is empty.
        InvalidOp: ``validate=True`` under jit or vmap.
        NonFiniteError: ``validate=True`` and ``x`` holds a NaN or an infinity.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_mxfp4(jnp.array([0.1, 7.0, -2.5]))
        >>> q.scales.tolist(), dequantize(q).tolist()
        ([127], [0.0, 6.0, -2.0])
    """
    x = float_input(x)
    if validate:
        validate_finite(x)
    codes, scales = _mxfp4_core(x)
    return MXFP4Tensor(codes=codes, scales=scales, shape=tuple(x.shape), dtype=x.dtype)


@jax.jit
def _mxfp4_core(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    blocks = _blocked(x, MXFP4_BLOCK)
    ok = _block_ok(blocks)
    amax = jnp.where(ok, jnp.max(jnp.abs(blocks), axis=-1), 0)
    biased_exp = (jax.lax.bitcast_convert_type(amax, jnp.uint32) >> 23).astype(jnp.int32)
    biased = jnp.maximum(biased_exp - 2, 0)  # floor(log2 amax) - 2, clamped at 2**-127
    scaled = blocks * _pow2(127 - biased)[..., None]  # x / 2**(biased - 127), exact
    scales = jnp.where(ok, biased, 255).astype(jnp.uint8)
    return _pack_e2m1(scaled), scales


def _finish(values: jax.Array, q: Any) -> jax.Array:
    """(*batch, *lead, nb, block) float32 -> (*batch, *q.shape) in q.dtype, padding dropped."""
    flat = values.reshape(*values.shape[:-2], -1)
    last = q.shape[-1] if q.shape else 1
    return flat[..., :last].reshape(*values.shape[: values.ndim - 1 - _core_ndim(q)], *q.shape).astype(q.dtype)


def dequantize(q: NVFP4Tensor | MXFP4Tensor) -> jax.Array:
    """Dequantizes an NVFP4 or MXFP4 record to its original shape and dtype (float32 arithmetic).

    NVFP4: ``e2m1[code] * (float(block_scale) * tensor_scale)``; MXFP4: ``e2m1[code] * 2**(byte - 127)``
    (NaN for the scale byte 0xFF). Records made under ``vmap`` work too.

    Args:
        q: An :class:`NVFP4Tensor` or :class:`MXFP4Tensor`.

    Returns:
        An array of ``q.shape`` (after any batch dims) and ``q.dtype``.

    Raises:
        FormatError: ``q`` is not an NVFP4 or MXFP4 record.

    Example:
        >>> import jax.numpy as jnp
        >>> dequantize(quantize_nvfp4(jnp.array([[1.0, -2.0, 0.0]]))).tolist()
        [[1.0, -2.0, 0.0]]
    """
    if not isinstance(q, (NVFP4Tensor, MXFP4Tensor)):
        raise FormatError(
            argument="q", expected="an NVFP4Tensor or MXFP4Tensor", got=type(q).__name__,
            hint="use viva_tensor.quant.dequantize for any format.",
        )
    check_record(q)
    return _dequantize(q)


@jax.jit
def _dequantize(q: NVFP4Tensor | MXFP4Tensor) -> jax.Array:
    values = _unpack_e2m1(q.codes)
    values = values.reshape(*q.scales.shape, q.block_size) * _block_scales(q)[..., None]
    return _finish(values, q)


def _block_scales(q: NVFP4Tensor | MXFP4Tensor) -> jax.Array:
    """The float32 factor of each block, shaped like ``q.scales``."""
    if isinstance(q, NVFP4Tensor):
        return _e4m3_to_float32(q.scales) * q.tensor_scale.reshape(
            q.tensor_scale.shape + (1,) * (q.scales.ndim - q.tensor_scale.ndim)
        )
    e = q.scales.astype(jnp.int32) - 127
    half = e // 2  # two normal factors: XLA on CPU flushes the subnormal 2**-127 to zero
    scale = _pow2(half) * _pow2(e - half)
    return jnp.where(q.scales == 255, jnp.float32(jnp.nan), scale)


def _planes(q: NVFP4Tensor | MXFP4Tensor) -> Planes | None:
    """The decode planes of a 2-D record (low nibbles = even columns), or None for a partial last block."""
    rows, n = q.shape
    if q.block_size % 2 or n % q.block_size:
        return None
    codes = q.codes.reshape(*q.scales.shape, q.block_size // 2)
    scale = packing.materialized(_block_scales(q))[..., None]
    lo, hi = packing.e2m1(codes & 0x0F) * scale, packing.e2m1(codes >> 4) * scale
    return Planes(lo.reshape(rows, -1), hi.reshape(rows, -1), "pairs")


register_format(
    "nvfp4",
    record=NVFP4Tensor,
    quantize=quantize_nvfp4,
    dequantize=dequantize,
    block_size=NVFP4_BLOCK,
    description="NVIDIA NVFP4: E2M1, an E4M3 scale per 16 values of the last axis, a float32 tensor scale",
    planes=_planes,
)
register_format(
    "mxfp4",
    record=MXFP4Tensor,
    quantize=quantize_mxfp4,
    dequantize=dequantize,
    block_size=MXFP4_BLOCK,
    description="OCP MX FP4: E2M1 with an E8M0 power-of-two scale per 32 values of the last axis",
    planes=_planes,
)
