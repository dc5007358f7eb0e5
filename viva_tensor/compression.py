"""INT8 absmax quantization and GGML's block formats Q4_0, Q4_1 and Q8_0, with their real bytes.

The Gleam ``compression`` module kept codes as lists of integers and only computed byte counts. Here
every record holds its packed buffers, so ``nbytes`` is measured, and the GGML records hold exactly the
block bytes that a GGUF file stores (:func:`to_ggml_bytes` / :func:`from_ggml_bytes`).

Formats:

- ``int8`` (:func:`quantize_int8`): symmetric absmax INT8 with a float32 scale per tensor (the Gleam
  default), per channel, or per block of the flattened tensor. ``scale = absmax / 127`` and
  ``code = roundf(x * (1 / scale))`` (round half away from zero), the same arithmetic as GGML's Q8_0.
- ``q4_0``, ``q4_1``, ``q8_0`` (:func:`quantize_q4_0` ...): blocks of 32 consecutive values of the
  flattened tensor, with the rules of GGML's reference quantizers (``quantize_row_q4_0_ref`` ...):

  - Q4_0: ``d = v / -8`` where ``v`` is the first value of largest magnitude,
    ``code = min(15, trunc(x * (1 / d) + 8.5))``, value ``(code - 8) * d``; 18 bytes a block (4.5 bits).
  - Q4_1: ``d = (max - min) / 15``, ``code = min(15, trunc((x - min) * (1 / d) + 0.5))``, value
    ``code * d + min``; 20 bytes a block (5 bits).
  - Q8_0: ``d = absmax / 127``, ``code = roundf(x * (1 / d))``, value ``code * d``; 34 bytes (8.5 bits).

  ``d`` (and ``m``, the min of Q4_1) are stored as float16; the codes are computed from the float32
  ``d`` and ``1 / d`` as GGML does. Two 4-bit codes share a byte as in a GGML block: value ``j`` in the
  low nibble and value ``j + 16`` in the high nibble of byte ``j``.

Rounding is immune to XLA's fused multiply-add: under ``jit`` XLA on CPU contracts ``x * id + 8.5``
into one FMA, which rounds once where C rounds twice and moves a code about once in 650,000 values.
Here the product ``p = x * id`` is never added to: a code is the number of precomputed float32
thresholds ``t_k`` that ``p`` reaches, ``t_k`` being the smallest float32 ``p`` with
``float32(p + 8.5) >= k``. Comparisons cannot be contracted, so the bytes are identical under ``jit``,
eagerly, and to GGML's C reference.

Conventions shared by every format here:

- Any shape; the flattened tensor is padded with zeros to whole blocks inside, the shape restored by
  :func:`dequantize`. float32, bfloat16 and float16 inputs are quantized from their exact float32
  values; :func:`dequantize` returns the original dtype.
- An all-zero block gives exact zeros. A block that holds a NaN or an infinity gets a NaN scale and
  zero codes, so it dequantizes to NaN; the other blocks are untouched (a per-tensor INT8 scale makes
  the whole tensor one block). ``validate=True`` raises :class:`~viva_tensor.errors.NonFiniteError`
  naming the first bad index instead; it needs concrete values (not under ``jit``/``vmap``).
- A scale below float32's normal range (block absmax below ~1e-36; XLA on CPU flushes subnormals to
  zero) or whose reciprocal overflows encodes its block as zeros; GGML's C code would divide by it.
- Divisions by 15 and 127 are correctly rounded as in C (XLA would otherwise multiply by a rounded
  reciprocal, one ulp off for most scales). float16 scales overflow above 65504: GGML formats need
  ``|x|`` below ~5.2e5 (Q4_0), ~9.8e5 (Q4_1 range) or ~8.3e6 (Q8_0), as in GGML.
- Empty arrays raise :class:`~viva_tensor.errors.InvalidShape` (the one input check of every format).
- Signed zeros: a Q4_1 ``min`` or a zero scale may differ from GGML's in the sign of a zero only.
- Records made under ``vmap`` carry batch dims in front of their leaves and can be dequantized outside
  the vmap (:func:`viva_tensor._formats.record.batch_dims`).

Example:
    >>> import jax.numpy as jnp
    >>> from viva_tensor import compression
    >>> x = jnp.linspace(-1.0, 1.0, 64).reshape(2, 32)
    >>> q = compression.quantize_q4_0(x)
    >>> q.nbytes, q.bits_per_value, round(q.compression_ratio, 2)
    (36, 4.5, 7.11)
    >>> compression.to_ggml_bytes(q).shape
    (2, 18)
    >>> float(jnp.max(jnp.abs(compression.dequantize(q) - x))) < 0.07
    True
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from viva_tensor._formats import packing
from viva_tensor._formats.checks import float_dtype, float_input, positive_int, validate_finite, validate_scale_range
from viva_tensor._formats.record import QuantizedArray, batch_dims, record, static
from viva_tensor._formats.registry import Planes, check_record, register_format
from viva_tensor.errors import ConfigError, DimensionError, DTypeError, FormatError, InvalidShape

__all__ = [
    "Int8Tensor",
    "Q4_0Tensor",
    "Q4_1Tensor",
    "Q8_0Tensor",
    "GGML_BLOCK_SIZE",
    "GGML_BLOCK_BYTES",
    "quantize_int8",
    "quantize_q4_0",
    "quantize_q4_1",
    "quantize_q8_0",
    "quantize_q4",
    "dequantize",
    "to_ggml_bytes",
    "from_ggml_bytes",
]

GGML_BLOCK_SIZE = 32
"""Values per block in GGML's Q4_0, Q4_1 and Q8_0 (``QK4_0 = QK4_1 = QK8_0 = 32``)."""

GGML_BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}
"""Bytes per block in a GGUF file: fp16 ``d`` (+ fp16 ``m`` for Q4_1) then the codes."""

# ----------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------


def _int8_core_ndim(record: Any) -> int:
    return 2 if record.block_size is not None else len(record.shape)


@record("int8", core_ndim=_int8_core_ndim)
class Int8Tensor(QuantizedArray):
    """INT8 absmax codes and their float32 scales.

    Attributes:
        codes: int8 codes. Shape ``shape`` (per tensor, per channel) or ``(n_blocks, block_size)``
            (per block of the flattened, zero-padded tensor).
        scales: float32 scales (``absmax / 127``). Shape ``(1,) * ndim`` per tensor, ``shape`` with
            every dim but ``axis`` set to 1 per channel, ``(n_blocks, 1)`` per block.
        shape: logical shape (static). dtype: original dtype (static).
        axis: the channel axis (per channel) or None. block_size: the block (per block) or None.
    """

    codes: jax.Array
    scales: jax.Array
    axis: int | None = static(default=None)
    block_size: int | None = static(default=None)


@record("q4_0", core_ndim=2)
class Q4_0Tensor(QuantizedArray):
    """GGML Q4_0 blocks: ``qs`` uint8 ``(n_blocks, 16)`` packed codes, ``d`` float16 ``(n_blocks,)``."""

    qs: jax.Array
    d: jax.Array

    block_size: ClassVar[int] = GGML_BLOCK_SIZE


@record("q4_1", core_ndim=2)
class Q4_1Tensor(QuantizedArray):
    """GGML Q4_1 blocks: ``qs`` uint8 ``(n_blocks, 16)``, ``d`` and ``m`` float16 ``(n_blocks,)``."""

    qs: jax.Array
    d: jax.Array
    m: jax.Array

    block_size: ClassVar[int] = GGML_BLOCK_SIZE


@record("q8_0", core_ndim=2)
class Q8_0Tensor(QuantizedArray):
    """GGML Q8_0 blocks: ``qs`` int8 ``(n_blocks, 32)`` codes, ``d`` float16 ``(n_blocks,)``."""

    qs: jax.Array
    d: jax.Array

    block_size: ClassVar[int] = GGML_BLOCK_SIZE


_GGML_RECORDS = {"q4_0": Q4_0Tensor, "q4_1": Q4_1Tensor, "q8_0": Q8_0Tensor}


# ----------------------------------------------------------------------------------------------------
# Exact rounding helpers (immune to FMA contraction)
# ----------------------------------------------------------------------------------------------------


def _ordered_key(f: np.float32) -> int:
    """An integer that orders float32 values like the floats themselves."""
    bits = int(np.array([f], np.float32).view(np.int32)[0])
    return bits if bits >= 0 else -(bits & 0x7FFFFFFF)


def _from_key(key: int) -> np.float32:
    bits = key if key >= 0 else (-key) | -0x80000000
    return np.array([bits], np.int64).astype(np.int32).view(np.float32)[0]


def _add_thresholds(c: float, kmax: int) -> np.ndarray:
    """``t[k-1]`` = the smallest float32 ``p`` with ``float32(p + c) >= k``, for ``k = 1 .. kmax``.

    Found by bisection over the float32 line with NumPy's float32 arithmetic (one rounding per
    operation, as in C), so ``trunc(float32(p + c)) >= k`` exactly when ``p >= t[k-1]``.
    """
    c32 = np.float32(c)
    out = []
    for k in range(1, kmax + 1):
        lo, hi = _ordered_key(np.float32(k - c - 1)), _ordered_key(np.float32(k - c + 1))
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if np.float32(_from_key(mid) + c32) >= k:
                hi = mid
            else:
                lo = mid
        out.append(_from_key(hi))
    return np.array(out, np.float32)


_Q4_0_THRESHOLDS = tuple(float(t) for t in _add_thresholds(8.5, 15))
_Q4_1_THRESHOLDS = tuple(float(t) for t in _add_thresholds(0.5, 15))


def _count_thresholds(p: jax.Array, thresholds: tuple[float, ...]) -> jax.Array:
    """Number of thresholds that ``p`` reaches (an int32 code); ``p`` is only compared, never added."""
    code = jnp.zeros(p.shape, jnp.int32)
    for t in thresholds:
        code = code + (p >= jnp.float32(t)).astype(jnp.int32)
    return code


def _roundf(p: jax.Array) -> jax.Array:
    """C's ``roundf`` (half away from zero) of float32 ``p`` (|p| < 2**22), without adding to ``p``."""
    a = jnp.abs(p)
    f = jnp.floor(a)
    r = f + (a >= f + 0.5).astype(jnp.float32)
    return jnp.where(p < 0, -r, r)


def _div_exact(a: jax.Array, n: int) -> jax.Array:
    """``a / n`` correctly rounded in float32, for ``n`` in {15, 127}: ``n + 1`` a power of two.

    XLA rewrites a division by a constant into a multiplication by its rounded reciprocal, which is
    one ulp off for most values (GGML divides). So the quotient is taken among the floats nearest
    ``a * (1 / n)`` as the one with the smallest residual ``a - n * q``, computed exactly as
    ``(a - (n + 1) * q) + q`` (both steps are exact by Sterbenz's lemma; no tie is possible for odd
    ``n``). Small ``a`` are scaled by ``2**64`` first (exact) so that no residual is subnormal: XLA on
    CPU flushes subnormals to zero.
    """
    small = jnp.abs(a) < jnp.float32(2.0**-60)
    a = jnp.where(small, a * jnp.float32(2.0**64), a)
    q0 = a * jnp.float32(1.0 / n)
    # Candidates come out of nextafter (integer operations), so that XLA cannot reassociate
    # (n + 1) * q with the constant inside q0, nor LLVM fuse "+ q" with the product into an FMA.
    q = jnp.nextafter(jnp.nextafter(q0, jnp.float32(-jnp.inf)), jnp.float32(-jnp.inf))
    best, best_r = q, jnp.abs((a - jnp.float32(n + 1) * q) + q)
    for _ in range(4):
        q = jnp.nextafter(q, jnp.float32(jnp.inf))
        r = jnp.abs((a - jnp.float32(n + 1) * q) + q)
        take = r < best_r
        best, best_r = jnp.where(take, q, best), jnp.where(take, r, best_r)
    best = jnp.where(jnp.isfinite(q0) & (a != 0), best, q0)
    return jnp.where(small, best * jnp.float32(2.0**-64), best)


def _reciprocal(d: jax.Array) -> jax.Array:
    """``1 / d``, or 0 where ``d`` is 0 or subnormal or its reciprocal overflows.

    GGML writes ``d ? 1.0f/d : 0.0f``; treating subnormal ``d`` as 0 too makes the result the same on
    every backend (XLA on CPU flushes subnormals, on GPU it may not).
    """
    # 1 / inf = 0; the final select reads only the quotient, so that XLA, which does not duplicate a
    # division into the per-value loop, computes everything above it once per block.
    tiny = jnp.abs(d) < jnp.float32(np.finfo(np.float32).tiny)
    inv = jnp.float32(1) / jnp.where(tiny, jnp.float32(jnp.inf), d)
    return jnp.where(jnp.isfinite(inv), inv, jnp.float32(0))


# ----------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------


def _as_float32(x: Any, argument: str = "x") -> tuple[jax.Array, Any]:
    """Checks ``x`` (a non-empty float array) and returns ``(x as float32, original dtype)``."""
    x = float_input(x, argument)
    return x.astype(jnp.float32), jnp.dtype(x.dtype)


#: int8's block_size is clamped to max(tensor size, _MAX_PAD): at most this many padded values per record.
_MAX_PAD = 4096


def _blocks(x32: jax.Array, block_size: int) -> jax.Array:
    """The flattened tensor, zero-padded to whole blocks: shape ``(n_blocks, block_size)``."""
    flat = x32.reshape(-1)
    n_blocks = -(-flat.size // block_size)
    flat = jnp.pad(flat, (0, n_blocks * block_size - flat.size))
    return flat.reshape(n_blocks, block_size)


def _restore(values: jax.Array, record: Any, core_ndim: int) -> jax.Array:
    """Flattened block values (batch dims in front) back to ``batch + shape`` in the original dtype."""
    batch = values.shape[: values.ndim - core_ndim]
    flat = values.reshape(*batch, -1)[..., : math.prod(record.shape)]
    return flat.reshape(*batch, *record.shape).astype(record.dtype)


# ----------------------------------------------------------------------------------------------------
# INT8
# ----------------------------------------------------------------------------------------------------


def _int8_codes(x32: jax.Array, amax: jax.Array, finite: jax.Array) -> tuple[jax.Array, jax.Array]:
    scale = _div_exact(amax, 127)
    inv = _reciprocal(scale)
    safe = jnp.where(finite, x32, jnp.float32(0))
    codes = jnp.clip(_roundf(safe * inv), -127, 127).astype(jnp.int8)
    scale = jnp.where(finite, scale, jnp.float32(jnp.nan))
    return codes, scale


@functools.partial(jax.jit, static_argnums=(1, 2))
def _int8_core(x32: jax.Array, reduce: tuple[int, ...] | None, block_size: int | None):
    if block_size is not None:
        x32 = _blocks(x32, block_size)
        reduce = (1,)
    amax = jnp.max(jnp.abs(x32), axis=reduce, keepdims=True, initial=0.0)
    finite = jnp.all(jnp.isfinite(x32), axis=reduce, keepdims=True)
    return _int8_codes(x32, amax, finite)


def quantize_int8(
    x: jax.Array, *, axis: int | None = None, block_size: int | None = None, validate: bool = False
) -> Int8Tensor:
    """Symmetric absmax INT8: one scale per tensor, per channel along ``axis``, or per block.

    ``scale = absmax / 127`` (float32) and ``code = roundf(x * (1 / scale))`` in ``[-127, 127]``: the
    Gleam ``quantize_int8`` (``round(x * 127 / absmax)``) with GGML Q8_0's arithmetic.

    Args:
        x: a float32, bfloat16 or float16 array of any shape.
        axis: the channel axis: one scale per index along ``axis`` (absmax over the other axes).
        block_size: one scale per ``block_size`` consecutive values of the flattened tensor (the last
            block zero-padded inside). At most one of ``axis`` and ``block_size``. A block larger than both
            the tensor and 4096 values is clamped to ``max(size, 4096)`` (one block, bounded padding).
        validate: check eagerly that every value is finite (needs concrete input: not under jit).

    Returns:
        An :class:`Int8Tensor`; ``dequantize`` gives back ``x.shape`` and ``x.dtype``.

    Raises:
        DTypeError: ``x`` is not a float32, bfloat16 or float16 array.
        InvalidShape: ``x`` is empty.
        ConfigError: ``block_size`` is not a positive int, or both ``axis`` and ``block_size`` given.
        DimensionError: ``axis`` is out of range.
        NonFiniteError: ``validate=True`` and ``x`` holds NaN or inf.
        InvalidOp: ``validate=True`` on a traced array (under jit or vmap).

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_int8(jnp.array([[1.0, -0.5], [0.25, 2.0]]), axis=0)
        >>> q.codes.tolist(), q.scales.shape
        ([[127, -64], [16, 127]], (2, 1))
        >>> [round(v, 3) for v in dequantize(q).ravel().tolist()]
        [1.0, -0.504, 0.252, 2.0]
    """
    x32, dtype = _as_float32(x)
    if axis is not None and block_size is not None:
        raise ConfigError(
            argument="axis",
            expected="None when block_size is given",
            got=axis,
            hint="choose per channel (axis) or per block (block_size), not both.",
        )
    if block_size is not None:
        # A block larger than both the tensor and _MAX_PAD values is clamped to max(size, _MAX_PAD): one block of
        # the whole tensor, as before, but block_size=2**30 on 1,024 values no longer stores 1 GiB of padding.
        # Blocks up to _MAX_PAD (and up to the tensor's size) keep their bytes.
        block_size = min(positive_int("block_size", block_size), max(_MAX_PAD, math.prod(x32.shape)))
    if validate:
        validate_finite(x)
    shape = tuple(x32.shape)
    if block_size is not None:
        codes, scales = _int8_core(x32, None, block_size)
        return Int8Tensor(codes, scales, shape=shape, dtype=dtype, block_size=block_size)
    if axis is not None:
        if isinstance(axis, bool) or not isinstance(axis, int) or not -len(shape) <= axis < len(shape):
            raise DimensionError(
                argument="axis", expected=f"an int in [-{len(shape)}, {len(shape)})", got=axis
            )
        axis = axis % len(shape)
        reduce = tuple(i for i in range(len(shape)) if i != axis)
    else:
        reduce = tuple(range(len(shape)))
    codes, scales = _int8_core(x32, reduce, None)
    return Int8Tensor(codes, scales, shape=shape, dtype=dtype, axis=axis)


@jax.jit
def _dequantize_int8(q: Int8Tensor) -> jax.Array:
    values = q.codes.astype(jnp.float32) * q.scales
    if q.block_size is None:
        return values.astype(q.dtype)
    return _restore(values, q, 2)


# ----------------------------------------------------------------------------------------------------
# GGML block formats
# ----------------------------------------------------------------------------------------------------


#: The divisor of each GGML format's float16 scale (``validate=True`` checks that the scale is a normal float16).
_LEVELS = {"q4_0": (8, False), "q4_1": (15, True), "q8_0": (127, False)}


def _ggml_prepare(x: jax.Array, validate: bool, fmt: str) -> tuple[jax.Array, Any, tuple[int, ...]]:
    x32, dtype = _as_float32(x)
    if validate:
        levels, asymmetric = _LEVELS[fmt]
        validate_scale_range(x, block=GGML_BLOCK_SIZE, levels=levels, fmt=fmt, asymmetric=asymmetric)
    return x32, dtype, tuple(x32.shape)


def _finite_blocks(x32: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Blocks of 32 and the ``(n_blocks, 1)`` mask of finite blocks.

    Non-finite blocks are not zeroed here (that would cost a pass over memory): their statistics
    become NaN or inf and their codes are replaced at the end (:func:`_zero_codes_where_not`).
    """
    blocks = _blocks(x32, GGML_BLOCK_SIZE)
    return blocks, jnp.all(jnp.isfinite(blocks), axis=1, keepdims=True)


def _zero_codes_where_not(finite: jax.Array, codes: jax.Array, zero_code: int) -> jax.Array:
    return jnp.where(finite, codes, zero_code)


def _nan_where_not(finite: jax.Array, d: jax.Array) -> jax.Array:
    return jnp.where(finite[:, 0], d[:, 0], jnp.float32(jnp.nan)).astype(jnp.float16)


# The importance-matrix quantizers of Q4_0/Q4_1 (llama.cpp's quantize_row_q4_*_impl) live in viva_tensor.ggml, with
# the other GGML impls; ggml registers them here when imported (it imports this module, not the other way round).
_IMATRIX: dict[str, Any] = {}


def _register_imatrix(fmt: str, fn: Any) -> None:
    """Called by :mod:`viva_tensor.ggml` at import: ``fn(x, imatrix, *, validate)`` for ``fmt``'s ``imatrix=``."""
    _IMATRIX[fmt] = fn


def _with_imatrix(fmt: str, x: Any, imatrix: Any, validate: bool) -> Any:
    # viva_tensor/__init__ imports ggml, so importing this module through the package has registered it.
    return _IMATRIX[fmt](x, imatrix, validate=validate)


def quantize_q4_0(x: jax.Array, *, imatrix: Any = None, validate: bool = False) -> Q4_0Tensor:
    """GGML Q4_0: blocks of 32 values, a float16 scale and 4-bit codes (4.5 bits per value).

    As ``quantize_row_q4_0_ref``: ``v`` is the first value of largest magnitude in the block,
    ``d = v / -8``, ``code = min(15, trunc(x * (1 / d) + 8.5))`` (codes from the float32 ``d``), the
    value ``(code - 8) * float16(d)``. Bytes identical to GGML's, eagerly and under ``jit``.
    With ``imatrix``, llama.cpp's ``quantize_row_q4_0_impl`` instead (:func:`viva_tensor.ggml.quantize_q4_0_imatrix`,
    the bytes of ``ggml_quantize_chunk`` with ``quant_weights``).

    Args:
        x: a float32, bfloat16 or float16 array of any shape (blocks over the flattened tensor; with ``imatrix``,
            rows of the last dim, a multiple of 32).
        imatrix: optional importance of each input column (llama.cpp's ``quant_weights``), shape
            ``(x.shape[-1],)``, float.
        validate: check eagerly that every value is finite (needs concrete input: not under jit).
            Also checks every block's float16 scale.
            Usable range: a block absmax of 0 or in [0.000488, 5.24e+05] (float16's normal
            range times 8); below it the scale is subnormal and the block loses precision (all
            zeros below ~4.8e-07), above it the scale overflows. ``validate=True`` raises
            NonFiniteError naming the first such block; otherwise they pass silently (as in GGML).

    Returns:
        A :class:`Q4_0Tensor`.

    Raises:
        DTypeError: ``x`` is not a float32, bfloat16 or float16 array.
        InvalidShape: ``x`` is empty.
        NonFiniteError: ``validate=True`` and ``x`` holds NaN or inf.
        InvalidOp: ``validate=True`` on a traced array (under jit or vmap).
        InvalidShape, DTypeError: with ``imatrix``, a last dim not a multiple of 32, or a bad ``imatrix``.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_q4_0(jnp.array([-1.0, 0.5, 0.25, 0.0]))  # padded with zeros to 32 values
        >>> q.d.tolist(), [b & 15 for b in q.qs[0, :4].tolist()]
        ([0.125], [0, 12, 10, 8])
        >>> dequantize(q).tolist()
        [-1.0, 0.5, 0.25, 0.0]
    """
    if imatrix is not None:
        return _with_imatrix("q4_0", x, imatrix, validate)
    x32, dtype, shape = _ggml_prepare(x, validate, "q4_0")
    return Q4_0Tensor(*_q4_0_core(x32), shape=shape, dtype=dtype)


@jax.jit
def _q4_0_core(x32: jax.Array) -> tuple[jax.Array, jax.Array]:
    blocks, finite = _finite_blocks(x32)
    amax = jnp.max(jnp.abs(blocks), axis=1, keepdims=True)
    # The first value of largest magnitude (C keeps the first on a tie): +amax or -amax, whichever
    # comes first. Two min-reductions instead of an argmax and a gather (much faster on CPU).
    position = jax.lax.broadcasted_iota(jnp.int32, blocks.shape, 1)
    first_pos = jnp.min(jnp.where(blocks == amax, position, GGML_BLOCK_SIZE), axis=1, keepdims=True)
    first_neg = jnp.min(jnp.where(blocks == -amax, position, GGML_BLOCK_SIZE), axis=1, keepdims=True)
    vmax = jnp.where(amax > 0, jnp.where(first_pos <= first_neg, amax, -amax), jnp.float32(0))
    d = vmax / jnp.float32(-8)  # exact: a power of two
    codes = _count_thresholds(blocks * _reciprocal(d), _Q4_0_THRESHOLDS)
    return packing.pack_halves(_zero_codes_where_not(finite, codes, 8)), _nan_where_not(finite, d)


def quantize_q4_1(x: jax.Array, *, imatrix: Any = None, validate: bool = False) -> Q4_1Tensor:
    """GGML Q4_1: blocks of 32 values, float16 scale and min, 4-bit codes (5 bits per value).

    As ``quantize_row_q4_1_ref``: ``d = (max - min) / 15``,
    ``code = min(15, trunc((x - min) * (1 / d) + 0.5))`` (from the float32 ``d`` and ``min``), the
    value ``code * float16(d) + float16(min)``. With ``imatrix``, llama.cpp's ``quantize_row_q4_1_impl``
    (:func:`viva_tensor.ggml.quantize_q4_1_imatrix`, the bytes of ``ggml_quantize_chunk`` with ``quant_weights``).

    Args:
        x: a float32, bfloat16 or float16 array of any shape (blocks over the flattened tensor; with ``imatrix``,
            rows of the last dim, a multiple of 32).
        imatrix: optional importance of each input column (llama.cpp's ``quant_weights``), shape
            ``(x.shape[-1],)``, float.
        validate: check eagerly that every value is finite (needs concrete input: not under jit).
            Also checks every block's float16 scale.
            Usable range: a block range (max - min) of 0 or in [0.000916, 9.83e+05] (float16's normal
            range times 15); below it the scale is subnormal and the block loses precision (all
            zeros below ~8.9e-07), above it the scale overflows. ``validate=True`` raises
            NonFiniteError naming the first such block; otherwise they pass silently (as in GGML).

    Returns:
        A :class:`Q4_1Tensor`.

    Raises:
        DTypeError: ``x`` is not a float32, bfloat16 or float16 array.
        InvalidShape: ``x`` is empty.
        NonFiniteError: ``validate=True`` and ``x`` holds NaN or inf.
        InvalidOp: ``validate=True`` on a traced array (under jit or vmap).
        InvalidShape, DTypeError: with ``imatrix``, a last dim not a multiple of 32, or a bad ``imatrix``.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_q4_1(jnp.arange(32.0))
        >>> q.d.tolist(), q.m.tolist(), q.qs[0, :3].tolist()
        ([2.06640625], [0.0], [128, 128, 145])
        >>> dequantize(q)[:3].tolist()
        [0.0, 0.0, 2.06640625]
    """
    if imatrix is not None:
        return _with_imatrix("q4_1", x, imatrix, validate)
    x32, dtype, shape = _ggml_prepare(x, validate, "q4_1")
    return Q4_1Tensor(*_q4_1_core(x32), shape=shape, dtype=dtype)


@jax.jit
def _q4_1_core(x32: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    blocks, finite = _finite_blocks(x32)
    vmin = jnp.min(blocks, axis=1, keepdims=True)
    vmax = jnp.max(blocks, axis=1, keepdims=True)
    d = _div_exact(vmax - vmin, 15)
    codes = _zero_codes_where_not(finite, _count_thresholds((blocks - vmin) * _reciprocal(d), _Q4_1_THRESHOLDS), 0)
    m = jnp.where(finite[:, 0], vmin[:, 0], jnp.float32(jnp.nan)).astype(jnp.float16)
    return packing.pack_halves(codes), _nan_where_not(finite, d), m


def quantize_q8_0(x: jax.Array, *, validate: bool = False) -> Q8_0Tensor:
    """GGML Q8_0: blocks of 32 values, a float16 scale and int8 codes (8.5 bits per value).

    As ``quantize_row_q8_0_ref``: ``d = absmax / 127``, ``code = roundf(x * (1 / d))`` (half away
    from zero, from the float32 ``d``), the value ``code * float16(d)``.

    Args:
        x: a float32, bfloat16 or float16 array of any shape (blocks over the flattened tensor).
        validate: check eagerly that every value is finite (needs concrete input: not under jit).
            Also checks every block's float16 scale.
            Usable range: a block absmax of 0 or in [0.00775, 8.32e+06] (float16's normal
            range times 127); below it the scale is subnormal and the block loses precision (all
            zeros below ~7.6e-06), above it the scale overflows. ``validate=True`` raises
            NonFiniteError naming the first such block; otherwise they pass silently (as in GGML).

    Returns:
        A :class:`Q8_0Tensor`.

    Raises:
        DTypeError: ``x`` is not a float32, bfloat16 or float16 array.
        InvalidShape: ``x`` is empty.
        NonFiniteError: ``validate=True`` and ``x`` holds NaN or inf.
        InvalidOp: ``validate=True`` on a traced array (under jit or vmap).

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_q8_0(jnp.array([1.0, -0.5, 0.25]))
        >>> q.qs[0, :4].tolist(), q.d.dtype.name
        ([127, -64, 32, 0], 'float16')
    """
    x32, dtype, shape = _ggml_prepare(x, validate, "q8_0")
    return Q8_0Tensor(*_q8_0_core(x32), shape=shape, dtype=dtype)


@jax.jit
def _q8_0_core(x32: jax.Array) -> tuple[jax.Array, jax.Array]:
    blocks, finite = _finite_blocks(x32)
    amax = jnp.max(jnp.abs(blocks), axis=1, keepdims=True)
    d = _div_exact(amax, 127)
    codes = jnp.clip(_roundf(blocks * _reciprocal(d)), -127, 127)
    return _zero_codes_where_not(finite, codes, 0).astype(jnp.int8), _nan_where_not(finite, d)


def quantize_q4(x: jax.Array, block_size: int = 32, *, validate: bool = False) -> Q4_0Tensor:
    """The Gleam ``quantize_q4(t, block_size)``: GGML Q4_0, which uses the whole 4-bit range.

    The Gleam code scaled by ``15 / absmax`` around an offset of 8, so half the codes overflowed and
    were clamped. This entry point is :func:`quantize_q4_0` (scale ``v / -8`` from the value of largest
    magnitude: every code 0..15 is reachable). Only ``block_size=32`` (GGML's block) is offered; use
    :func:`viva_tensor.nf4.quantize` for other block sizes.

    Args:
        x: a float32, bfloat16 or float16 array of any shape.
        block_size: must be 32.
        validate: as in :func:`quantize_q4_0`.

    Returns:
        A :class:`Q4_0Tensor`.

    Raises:
        ConfigError: ``block_size`` is not 32.
        DTypeError, NonFiniteError, InvalidOp: as :func:`quantize_q4_0`.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_q4(jnp.linspace(-1.0, 1.0, 32))
        >>> codes = [b & 15 for b in q.qs[0].tolist()] + [b >> 4 for b in q.qs[0].tolist()]
        >>> type(q).__name__, min(codes), max(codes)
        ('Q4_0Tensor', 0, 15)
    """
    if block_size != GGML_BLOCK_SIZE:
        raise ConfigError(
            argument="block_size",
            expected="32 (GGML Q4_0 blocks)",
            got=block_size,
            hint="use viva_tensor.nf4.quantize(x, block_size=...) for other 4-bit block sizes.",
        )
    return quantize_q4_0(x, validate=validate)


@jax.jit
def _dequantize_q4_0(q: Q4_0Tensor) -> jax.Array:
    codes = packing.unpack_halves(q.qs).astype(jnp.float32) - 8.0
    return _restore(codes * q.d.astype(jnp.float32)[..., None], q, 2)


@jax.jit
def _dequantize_q4_1(q: Q4_1Tensor) -> jax.Array:
    codes = packing.unpack_halves(q.qs).astype(jnp.float32)
    # code * d is exact in float32 (4 bits times an 11-bit float16), so an FMA cannot change the sum.
    values = codes * q.d.astype(jnp.float32)[..., None] + q.m.astype(jnp.float32)[..., None]
    return _restore(values, q, 2)


@jax.jit
def _dequantize_q8_0(q: Q8_0Tensor) -> jax.Array:
    return _restore(q.qs.astype(jnp.float32) * q.d.astype(jnp.float32)[..., None], q, 2)


_DEQUANTIZE = {
    Int8Tensor: _dequantize_int8,
    Q4_0Tensor: _dequantize_q4_0,
    Q4_1Tensor: _dequantize_q4_1,
    Q8_0Tensor: _dequantize_q8_0,
}


def dequantize(q: Int8Tensor | Q4_0Tensor | Q4_1Tensor | Q8_0Tensor) -> jax.Array:
    """Values of a record from this module, in its original shape and dtype.

    A record made under ``vmap`` can be dequantized outside it: the batch dims come first.

    Args:
        q: an :class:`Int8Tensor`, :class:`Q4_0Tensor`, :class:`Q4_1Tensor` or :class:`Q8_0Tensor`.

    Returns:
        An array of shape ``batch_shape + q.shape`` and dtype ``q.dtype``.

    Raises:
        FormatError: ``q`` is not a record of this module.

    Example:
        >>> import jax.numpy as jnp
        >>> dequantize(quantize_q4_0(jnp.array([0.5, -1.0]))).tolist()
        [0.5, -1.0]
    """
    fn = _DEQUANTIZE.get(type(q))
    if fn is None:
        raise FormatError(
            argument="q",
            expected="an Int8Tensor, Q4_0Tensor, Q4_1Tensor or Q8_0Tensor",
            got=type(q).__name__,
            hint="viva_tensor.quant.dequantize handles every registered format.",
        )
    check_record(q)
    return fn(q)


# ----------------------------------------------------------------------------------------------------
# GGUF bytes
# ----------------------------------------------------------------------------------------------------


def _check_ggml_format(fmt: Any) -> str:
    if fmt not in _GGML_RECORDS:
        raise FormatError(argument="fmt", expected="one of 'q4_0', 'q4_1', 'q8_0'", got=repr(fmt))
    return fmt


def _check_row_shape(shape: tuple[int, ...], argument: str) -> None:
    if len(shape) == 0 or shape[-1] % GGML_BLOCK_SIZE != 0:
        raise InvalidShape(
            argument=argument,
            expected="a shape whose last dim (the GGUF row) is a multiple of 32",
            got=tuple(shape),
            hint="GGML blocks never cross rows; pad or reshape the rows to a multiple of 32.",
        )


def to_ggml_bytes(q: Q4_0Tensor | Q4_1Tensor | Q8_0Tensor) -> np.ndarray:
    """The block bytes a GGUF file stores for this tensor.

    Rows are the leading dims (batch dims of a vmapped record first); the last dim becomes
    ``n_blocks x block bytes``: float16 ``d`` little-endian (then ``m`` for Q4_1), then the codes.

    Args:
        q: a :class:`Q4_0Tensor`, :class:`Q4_1Tensor` or :class:`Q8_0Tensor` with concrete values.

    Returns:
        A uint8 NumPy array of shape ``(*batch, *q.shape[:-1], q.shape[-1] // 32 * block_bytes)``.

    Raises:
        FormatError: ``q`` is not a GGML record.
        InvalidShape: the last dim of ``q.shape`` is not a multiple of 32 (or ``q`` is a scalar).

    Example:
        >>> import jax.numpy as jnp
        >>> data = to_ggml_bytes(quantize_q8_0(jnp.ones((2, 32))))
        >>> data.shape, data[0, :4].tolist()
        ((2, 34), [8, 32, 127, 127])
    """
    if type(q) not in _GGML_RECORDS.values():
        raise FormatError(argument="q", expected="a Q4_0Tensor, Q4_1Tensor or Q8_0Tensor", got=type(q).__name__)
    _check_row_shape(q.shape, "q.shape")
    batch = batch_dims(q)
    n_blocks = q.qs.shape[-2]
    parts = [np.asarray(q.d).astype("<f2").reshape(*batch, n_blocks, 1).view(np.uint8)]
    if isinstance(q, Q4_1Tensor):
        parts.append(np.asarray(q.m).astype("<f2").reshape(*batch, n_blocks, 1).view(np.uint8))
    parts.append(np.asarray(q.qs).view(np.uint8))
    data = np.concatenate(parts, axis=-1)
    row_bytes = q.shape[-1] // GGML_BLOCK_SIZE * GGML_BLOCK_BYTES[q.format]
    return data.reshape(*batch, *q.shape[:-1], row_bytes)


def from_ggml_bytes(data: Any, fmt: str, shape: tuple[int, ...], *, dtype: Any = jnp.float32) -> Any:
    """A GGML record from the block bytes a GGUF file stores (the inverse of :func:`to_ggml_bytes`).

    Args:
        data: ``bytes``, ``bytearray``, ``memoryview`` or a uint8 array holding the blocks in order.
        fmt: ``"q4_0"``, ``"q4_1"`` or ``"q8_0"``.
        shape: the logical shape of the tensor; its last dim must be a multiple of 32.
        dtype: the dtype that ``dequantize`` returns (float32, bfloat16 or float16).

    Returns:
        A :class:`Q4_0Tensor`, :class:`Q4_1Tensor` or :class:`Q8_0Tensor`.

    Raises:
        FormatError: unknown ``fmt``.
        InvalidShape: the last dim of ``shape`` is not a multiple of 32, or ``data`` has the wrong
            number of bytes.
        DTypeError: ``data`` is an array of another dtype than uint8, or a bad ``dtype``.

    Example:
        >>> import jax.numpy as jnp
        >>> q = from_ggml_bytes(bytes([0, 60]) + bytes([0x98] * 16), "q4_0", (32,))
        >>> dequantize(q)[jnp.array([0, 16])].tolist()
        [0.0, 1.0]
    """
    fmt = _check_ggml_format(fmt)
    shape = tuple(int(s) for s in shape)
    _check_row_shape(shape, "shape")
    float_dtype(dtype)
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = np.frombuffer(bytes(data), np.uint8)
    else:
        raw = np.asarray(data)
        if raw.dtype != np.uint8:
            raise DTypeError(argument="data", expected="uint8 bytes", got=str(raw.dtype))
        raw = raw.reshape(-1)
    n_blocks = math.prod(shape) // GGML_BLOCK_SIZE
    block_bytes = GGML_BLOCK_BYTES[fmt]
    if raw.size != n_blocks * block_bytes:
        raise InvalidShape(
            argument="data",
            expected=f"{n_blocks * block_bytes} bytes ({n_blocks} {fmt} blocks of {block_bytes} bytes "
            f"for shape {shape})",
            got=f"{raw.size} bytes",
        )
    blocks = raw.reshape(n_blocks, block_bytes)
    d = jnp.asarray(np.ascontiguousarray(blocks[:, 0:2]).view("<f2").reshape(n_blocks).astype(np.float16))
    dtype = jnp.dtype(dtype)
    if fmt == "q4_0":
        return Q4_0Tensor(jnp.asarray(blocks[:, 2:]), d, shape=shape, dtype=dtype)
    if fmt == "q4_1":
        m = jnp.asarray(np.ascontiguousarray(blocks[:, 2:4]).view("<f2").reshape(n_blocks).astype(np.float16))
        return Q4_1Tensor(jnp.asarray(blocks[:, 4:]), d, m, shape=shape, dtype=dtype)
    qs = jnp.asarray(np.ascontiguousarray(blocks[:, 2:]).view(np.int8))
    return Q8_0Tensor(qs, d, shape=shape, dtype=dtype)


def _ggml_planes(q: Q4_0Tensor | Q4_1Tensor) -> Planes | None:
    """The decode planes of a 2-D Q4_0 / Q4_1 record (the two 16-value halves of each block)."""
    rows, n = q.shape
    if n % GGML_BLOCK_SIZE:
        return None
    f32 = jnp.float32
    d = packing.materialized(q.d.astype(f32))[:, None]
    lo, hi = (q.qs & 0x0F).astype(f32), (q.qs >> 4).astype(f32)
    if isinstance(q, Q4_0Tensor):
        lo, hi = (lo - 8.0) * d, (hi - 8.0) * d
    else:
        m = packing.materialized(q.m.astype(f32))[:, None]
        lo, hi = lo * d + m, hi * d + m
    return Planes(lo.reshape(rows, -1), hi.reshape(rows, -1), "halves")


# ----------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------

register_format(
    "int8",
    record=Int8Tensor,
    quantize=quantize_int8,
    dequantize=_dequantize_int8,
    block_size=0,
    description="absmax INT8, float32 scale per tensor (default), per channel (axis=) or per block "
    "(block_size=)",
)
register_format(
    "q4_0",
    record=Q4_0Tensor,
    quantize=quantize_q4_0,
    dequantize=_dequantize_q4_0,
    block_size=GGML_BLOCK_SIZE,
    description="GGML Q4_0: 32 values, fp16 scale, 4-bit codes around 8 (4.5 bits per value)",
    planes=_ggml_planes,
)
register_format(
    "q4_1",
    record=Q4_1Tensor,
    quantize=quantize_q4_1,
    dequantize=_dequantize_q4_1,
    block_size=GGML_BLOCK_SIZE,
    description="GGML Q4_1: 32 values, fp16 scale and min, 4-bit codes (5 bits per value)",
    planes=_ggml_planes,
)
register_format(
    "q8_0",
    record=Q8_0Tensor,
    quantize=quantize_q8_0,
    dequantize=_dequantize_q8_0,
    block_size=GGML_BLOCK_SIZE,
    description="GGML Q8_0: 32 values, fp16 scale, int8 codes (8.5 bits per value)",
)
