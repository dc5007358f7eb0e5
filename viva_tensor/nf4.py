"""NormalFloat4 (QLoRA) with the byte layout of bitsandbytes, and its double quantization.

NF4 stores each value as one of 16 levels, the quantiles of a standard normal distribution scaled to
[-1, 1] with an exact 0 (QLoRA, Dettmers et al. 2023). The tensor is flattened and cut into blocks of
``block_size`` values; each block keeps its float32 absmax, and each value the index of the level
nearest to ``value * (1 / absmax)``. Two codes share a byte, the first value in the HIGH nibble, so
``codes`` holds ``ceil(n / 2)`` bytes exactly like ``bitsandbytes.functional.quantize_4bit``.

Choices made like bitsandbytes (``kQuantizeBlockwise`` / ``dQuantizeNF4``):

* the value is multiplied by the float32 reciprocal of the absmax, not divided by the absmax;
* the level is picked with the decision thresholds of ``dQuantizeNF4`` (midpoints between adjacent
  levels): a value exactly on a threshold takes the LOWER code;
* double quantization subtracts the mean of the absmax values (kept as ``offset``) and quantizes them
  with the signed 8-bit dynamic map (``create_dynamic_map(signed=True)``) in nested blocks of
  ``nested_block_size``, each with its float32 absmax; dequantization is
  ``dynamic_map[code] * nested_absmax + offset``;
* the mean is bitsandbytes' ``absmax.mean()``: a float32 sum in the order of PyTorch's CPU sum kernel
  (``cascade_sum``: 8 lanes, 4 vectors side by side, a four-level cascade; from 32768 blocks on, one chunk per
  thread, see ``torch_threads``), divided by the count, so ``offset`` and ``nested_absmax`` are bitsandbytes'
  bits (tested against torch's own sums for lengths up to 300007 and 1 to 8 threads);
* the 8-bit absmax codes follow bitsandbytes' CPU kernel by default (``backend="cpu"``: the value times
  ``1 / absmax`` looked up in a 65536-bin table of [-1, 1]), or its CUDA kernel (``backend="cuda"``:
  ``dQuantize``'s 7-step binary search and nearest of three). The two differ by one code step in about 0.2%
  of the codes (in 43 of 244 random tensors, 1 to 4 codes each); with ``"cpu"`` every field of
  ``quantize_4bit(..., compress_statistics=True)`` on the CPU is reproduced bit for bit (all 244).

Where this port decides differently, on purpose:

* An all-zero block: bitsandbytes computes ``0 * (1 / 0) = NaN`` and stores code 0 (the level -1),
  which dequantizes to ``-0.0`` and, after double quantization, to ``-absmax'`` (a non-zero value).
  Here the reciprocal of a zero absmax is 0, so such a block stores code 7 (the level 0.0) and always
  dequantizes to exact ``+0.0``, also with double quantization. Only these blocks' bytes differ.
* A NaN makes its block's absmax NaN (bitsandbytes' ``fmaxf`` skips NaN and silently turns it into
  ``-absmax``); an infinity makes the absmax infinite. Either way that block dequantizes to
  non-finite values, and no other block is touched. With double quantization the 8-bit absmax code
  cannot hold NaN: the offset and the nested absmax are computed from the finite absmax values only,
  and a nested block holding a non-finite absmax gets a NaN nested absmax, so its
  ``nested_block_size`` NF4 blocks dequantize to NaN and all other nested blocks are exact as usual.
  ``validate=True`` raises
  :class:`~viva_tensor.errors.NonFiniteError` naming the first bad index instead.
* Huge values (absmax above 2**120, up to float32's max): the block is scaled by 2**-64 before the
  reciprocal, whose float32 value would otherwise be subnormal and flushed to 0 by XLA on CPU (every value
  would decode to 0). With double quantization the mean of the absmax values is computed in a scaled form
  when their plain sum overflows, so tensors near 3e38 stay finite. Ordinary blocks keep bitsandbytes' bytes.
* Empty arrays raise :class:`~viva_tensor.errors.InvalidShape`: there is nothing to scale.
* The dynamic map is rebuilt from its definition in float32, with torch's CPU ``linspace`` (each
  point ``start + k * step`` from the nearer end, one fused multiply-add). That reproduces all 256
  values of the table that bitsandbytes users print (e.g. 0.5710937976837158 at index 224); a plain
  float64 evaluation would differ in the last bit of ~70 entries.

Example:
    >>> import jax.numpy as jnp
    >>> from viva_tensor import nf4
    >>> q = nf4.quantize(jnp.array([1.0, -0.5, 0.25, 0.0]), block_size=64)
    >>> [hex(b) for b in q.codes.tolist()], q.absmax.tolist()
    (['0xf2', '0xa7'], [1.0])
    >>> [round(v, 3) for v in nf4.dequantize(q).tolist()]
    [1.0, -0.525, 0.246, 0.0]
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from viva_tensor._formats import packing
from viva_tensor._formats.checks import float_input, positive_int, validate_finite
from viva_tensor._formats.record import QuantizedArray, record, static
from viva_tensor._formats.registry import Planes, check_record, register_format
from viva_tensor.errors import ConfigError, FormatError, NonFiniteError

__all__ = [
    "NF4_LEVELS",
    "DYNAMIC_MAP",
    "NF4Config",
    "NF4Tensor",
    "NF4DQTensor",
    "NF4Stats",
    "default_config",
    "quantize",
    "double_quantize",
    "dequantize",
    "compute_stats",
    "create_dynamic_map",
    "DQ_ABSMAX_TOLERANCE",
    "FP4_LEVELS",
    "FP4_CODE_BOOK",
    "FP4Tensor",
    "FP4DQTensor",
    "quantize_fp4",
    "double_quantize_fp4",
    "levels_of",
    "torch_default_threads",
]

#: The 16 NF4 levels, the float32 table of ``bitsandbytes.functional.get_4bit_type("nf4")``.
NF4_LEVELS = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)  # fmt: skip

# The 15 float32 decision thresholds of bitsandbytes' dQuantizeNF4: code = #thresholds strictly below x.
_NF4_THRESHOLDS = np.array(
    [
        -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
        -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
        0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
        0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
    ],
    dtype=np.float32,
)  # fmt: skip


def create_dynamic_map() -> np.ndarray:
    """The signed 8-bit dynamic map of bitsandbytes (``create_dynamic_map(signed=True)``).

    For each decade ``i`` in 0..6, ``2**i`` values: the means of adjacent points of ``2**i + 1`` points
    spaced evenly over [0.1, 1], times ``10**(i - 6)``, with both signs; then 0 and 1.0; sorted. All in
    float32, ``linspace`` evaluated as torch's CPU kernel does (from the nearer end, fused multiply-add).

    Returns:
        A sorted float32 NumPy array of 256 values: ``[0] = -0.99296875``, ``[127] = 0``, ``[255] = 1``.

    Example:
        >>> m = create_dynamic_map()
        >>> m.shape, float(m[127]), float(m[255]), round(float(m[0]), 6)
        ((256,), 0.0, 1.0, -0.992969)
    """
    f32 = np.float32
    values: list[np.float32] = []
    for i in range(7):
        n = 2**i + 1
        start, end = f32(0.1), f32(1.0)
        step = f32((end - start) / f32(n - 1))
        # torch's CPU linspace: start + k * step for the first half, end - (n - 1 - k) * step for the
        # second, each one fused multiply-add (one rounding; the float64 product of two float32s is
        # exact), as the compiled kernel computes it.
        s64, e64, d64 = np.float64(start), np.float64(end), np.float64(step)
        points = np.array(
            [f32(s64 + d64 * k) if k < n // 2 else f32(e64 - d64 * (n - 1 - k)) for k in range(n)],
            dtype=f32,
        )
        means = ((points[:-1] + points[1:]) / f32(2.0)).astype(f32)
        scale = f32(10.0 ** (i - 6))
        values += list((scale * means).astype(f32)) + list((-scale * means).astype(f32))
    values += [f32(0.0), f32(1.0)]
    return np.sort(np.array(values, dtype=f32))


#: The signed dynamic map (256 sorted float32 values) used for double quantization.
DYNAMIC_MAP = create_dynamic_map()


@dataclasses.dataclass(frozen=True)
class NF4Config:
    """Options of the Gleam ``NF4Config``: the block size, and whether to double-quantize the absmax.

    Example:
        >>> NF4Config(block_size=128, double_quant=True)
        NF4Config(block_size=128, double_quant=True)
    """

    block_size: int = 64
    double_quant: bool = False


def default_config() -> NF4Config:
    """The default NF4 options: blocks of 64, no double quantization (as QLoRA's default storage).

    Returns:
        ``NF4Config(block_size=64, double_quant=False)``.

    Example:
        >>> default_config()
        NF4Config(block_size=64, double_quant=False)
    """
    return NF4Config()


@record("nf4", core_ndim=1)
class NF4Tensor(QuantizedArray):
    """NF4 codes (two per byte, first value high) and one float32 absmax per block of the flat tensor."""

    codes: jax.Array  # uint8 (..., ceil(n / 2))
    absmax: jax.Array  # float32 (..., ceil(n / block_size))
    block_size: int = static(default=64)


@record("nf4_dq", core_ndim=1)
class NF4DQTensor(QuantizedArray):
    """NF4 with double quantization: absmax stored as dynamic-map codes, nested absmax and an offset."""

    codes: jax.Array  # uint8 (..., ceil(n / 2))
    absmax_codes: jax.Array  # uint8 (..., ceil(n / block_size))
    nested_absmax: jax.Array  # float32 (..., ceil(n_blocks / nested_block_size))
    offset: jax.Array  # float32 (...,)
    block_size: int = static(default=64)
    nested_block_size: int = static(default=256)


class NF4Stats(NamedTuple):
    """What :func:`compute_stats` measures (the Gleam ``compute_stats`` result)."""

    original_bytes: int
    quantized_bytes: int
    compression_ratio: float
    bits_per_value: float
    mean_error: float
    max_error: float


def _check_block(name: str, value: Any, *, even: bool) -> int:
    return positive_int(name, value, even=even, hint="bitsandbytes uses 64 (and 256 nested).")


def _safe_reciprocal(a: jax.Array) -> jax.Array:
    """``1 / a`` in float32, but 0 where ``a == 0`` (so a zero block gives zeros, not NaN)."""
    return jnp.where(a == 0, jnp.float32(0), jnp.float32(1) / jnp.where(a == 0, jnp.float32(1), a))


def _scaled(blocks: jax.Array, absmax: jax.Array) -> jax.Array:
    """``blocks * (1 / absmax)`` per row, with huge absmax scaled down first (exact powers of two).

    Above ~2**126 the float32 reciprocal of the absmax is subnormal and XLA on CPU flushes it to 0 (every
    value would get the level 0); bitsandbytes keeps it. Such blocks are multiplied by 2**-64 first, which
    changes no code of ordinary blocks (their factor is exactly 1).
    """
    huge = absmax > jnp.float32(2.0**120)
    down = jnp.where(huge, jnp.float32(2.0**-64), jnp.float32(1))
    return (blocks * down[:, None]) * _safe_reciprocal(absmax * down)[:, None]


def _blocks(flat: jax.Array, block: int) -> jax.Array:
    n = flat.shape[0]
    nb = -(-n // block)
    return jnp.pad(flat, (0, nb * block - n)).reshape(nb, block)


def _nf4_codes(scaled: jax.Array) -> jax.Array:
    """Code = number of dQuantizeNF4 thresholds strictly below ``scaled`` (ties take the lower code)."""
    t = jnp.asarray(_NF4_THRESHOLDS).reshape((1,) * scaled.ndim + (-1,))
    return jnp.sum(scaled[..., None] > t, axis=-1, dtype=jnp.uint8)


@functools.partial(jax.jit, static_argnums=1)
def _nf4_core(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    flat = x.reshape(-1).astype(jnp.float32)
    n = flat.shape[0]
    blocks = _blocks(flat, block)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    # XLA's max reduction on CPU may skip a NaN (like fmaxf): make a NaN block's absmax NaN explicitly.
    absmax = jnp.where(jnp.any(jnp.isnan(blocks), axis=1), jnp.float32(jnp.nan), absmax)
    scaled = _scaled(blocks, absmax).reshape(-1)[:n]
    return packing.pack_pairs(_nf4_codes(scaled), first="high", pad=7), absmax


def quantize(
    x: Any,
    *,
    block_size: int = 64,
    config: NF4Config | None = None,
    validate: bool = False,
) -> NF4Tensor | NF4DQTensor:
    """Quantizes ``x`` to NF4 with one float32 absmax per block of the flattened tensor.

    Args:
        x: A float32, bfloat16 or float16 array of any non-empty shape.
        block_size: Values per block (a positive even integer; bitsandbytes uses 64).
        config: A Gleam-style :class:`NF4Config`; when given it sets the block size (a different,
            non-default ``block_size`` is an error), and ``double_quant=True`` returns
            :func:`double_quantize`'s record.
        validate: Check (eagerly) that every value is finite.

    Returns:
        An :class:`NF4Tensor` (``codes``: uint8, ``ceil(n / 2)`` bytes, first value in the high
        nibble; ``absmax``: float32 per block), or an :class:`NF4DQTensor` when the config asks.

    Raises:
        DTypeError: ``x`` is not a float32, bfloat16 or float16 array.
        InvalidShape: ``x`` is empty.
        ConfigError: a block size that is not a positive even integer.
        InvalidOp: ``validate=True`` under jit or vmap.
        NonFiniteError: ``validate=True`` and ``x`` holds a NaN or an infinity.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize(jnp.linspace(-1.0, 1.0, 128), block_size=64)
        >>> q.codes.shape, q.absmax.shape, q.bits_per_value
        ((64,), (2,), 4.5)
    """
    if config is not None:
        if not isinstance(config, NF4Config):
            raise ConfigError(argument="config", expected="an NF4Config", got=type(config).__name__)
        if block_size != 64 and block_size != config.block_size:
            raise ConfigError(
                argument="block_size", expected=f"{config.block_size} (the block size of 'config')",
                got=block_size, hint="pass either config or block_size.",
            )
        if config.double_quant:
            return double_quantize(x, block_size=config.block_size, validate=validate)
        block_size = config.block_size
    block = _check_block("block_size", block_size, even=True)
    x = float_input(x)
    if validate:
        validate_finite(x)
    codes, absmax = _nf4_core(x, block)
    return NF4Tensor(codes=codes, absmax=absmax, shape=tuple(x.shape), dtype=x.dtype, block_size=block)


def _dynamic_codes(v: jax.Array) -> jax.Array:
    """bitsandbytes' ``dQuantize<0>``: a 7-step binary search from index 127, then nearest of three."""
    table = jnp.asarray(DYNAMIC_MAP)
    pivot = jnp.full(v.shape, 127, jnp.int32)
    lower_p = jnp.zeros(v.shape, jnp.int32)
    upper_p = jnp.full(v.shape, 255, jnp.int32)
    lower = jnp.full(v.shape, -1.0, jnp.float32)
    upper = jnp.full(v.shape, 1.0, jnp.float32)
    val = table[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        gt = v > val
        lower_p, lower = jnp.where(gt, pivot, lower_p), jnp.where(gt, val, lower)
        upper_p, upper = jnp.where(gt, upper_p, pivot), jnp.where(gt, upper, val)
        pivot = jnp.where(gt, pivot + step, pivot - step)
        val = table[pivot]
    upper = jnp.where(upper_p == 255, table[255], upper)
    lower = jnp.where(lower_p == 0, table[0], lower)
    above = v > val
    up = jnp.where(v > (upper + val) * jnp.float32(0.5), upper_p, pivot)
    down = jnp.where(v < (lower + val) * jnp.float32(0.5), lower_p, pivot)
    return jnp.where(above, up, down).astype(jnp.uint8)


def _cpu_lookup_table(code: np.ndarray) -> np.ndarray:
    """bitsandbytes' CPU lookup table (``build_quantize_lut``): for ``i`` in 0..65535 the value
    ``-1 + 2 i / 65535`` (float32) and the index of the first midpoint ``(code[k] + code[k+1]) / 2`` that is not
    below it, so each of 65536 equal bins of [-1, 1] holds one code: the nearest to the bin's left edge."""
    f32 = np.float32
    mid = (f32(0.5) * (code[:-1].astype(f32) + code[1:].astype(f32))).astype(f32)
    val = (f32(-1) + (f32(2) * np.arange(65536, dtype=f32)) / f32(65535)).astype(f32)
    return np.searchsorted(mid, val, side="left").astype(np.uint8)


_CPU_LUT = _cpu_lookup_table(DYNAMIC_MAP)


def _cpu_dynamic_codes(v: jax.Array) -> jax.Array:
    """bitsandbytes' CPU ``quantize_blockwise`` for values already scaled by ``1 / absmax``: the bin
    ``trunc((clip(v, -1, 1) + 1) * 0.5 * 65535 + 0.5)`` of :func:`_cpu_lookup_table`. A bin is 2/65535 wide,
    so a value within a bin of a midpoint between two codes can take the farther code (about 0.2% of the
    values of real absmax tensors; measured against bitsandbytes 0.50.2)."""
    t = (jnp.clip(v, -1.0, 1.0) + jnp.float32(1)) * jnp.float32(0.5)
    bins = (t * jnp.float32(65535) + jnp.float32(0.5)).astype(jnp.int32)
    return jnp.asarray(_CPU_LUT)[bins]


_ABSMAX_CODES = {"cpu": _cpu_dynamic_codes, "cuda": _dynamic_codes}


def _check_backend(backend: Any) -> str:
    if backend not in _ABSMAX_CODES:
        raise ConfigError(argument="backend", expected="'cpu' or 'cuda' (which bitsandbytes kernel to match)",
                          got=backend)
    return backend


def double_quantize(
    x: Any,
    *,
    block_size: int = 64,
    nested_block_size: int = 256,
    validate: bool = False,
    torch_threads: int | None = None,
    backend: str = "cpu",
) -> NF4DQTensor:
    """NF4 with double quantization, as bitsandbytes' ``quantize_4bit(..., compress_statistics=True)``.

    The absmax values of the NF4 blocks, minus their mean (stored as ``offset``), are quantized to
    8-bit codes of the signed dynamic map in nested blocks of ``nested_block_size``, each with a float32
    absmax: about ``4 + 8 / 64 + 32 / (64 * 256)`` = 4.127 bits per value at the defaults.

    Args:
        x: A float32, bfloat16 or float16 array of any non-empty shape.
        block_size: Values per NF4 block (a positive even integer).
        nested_block_size: absmax values per nested block (a positive integer; bitsandbytes uses 256).
        validate: Check (eagerly) that every value is finite, and that every block's decoded absmax is within
            :data:`DQ_ABSMAX_TOLERANCE` (10%) of its true absmax. Double quantization stores the absmax
            values minus their mean as 8-bit codes scaled by the largest deviation in each nested block: one
            outlier (1e6 among values of ~4) makes that scale so coarse that the small blocks' absmax decode
            far off (values of ~3.9 come back as ~925; bitsandbytes does the same). Without ``validate``
            this passes silently.
        torch_threads: The threads of the PyTorch whose bitsandbytes this is to match (``None``:
            :func:`torch_default_threads`). ``offset`` is the float32 mean of the absmax values summed in the
            order of PyTorch's CPU sum kernel, as bitsandbytes computes it (``absmax.mean()``), bit for bit; from
            32768 NF4 blocks on (2**21 values at ``block_size=64``) that order depends on the thread count.
        backend: Which bitsandbytes kernel picks the 8-bit absmax codes: ``"cpu"`` (its 65536-entry lookup
            table: bitsandbytes with torch on the CPU, bit for bit) or ``"cuda"`` (``dQuantize``'s binary search
            and nearest of three, its CUDA kernel). They differ by one code step in about 0.2% of the codes;
            either decodes with the same map.

    Returns:
        An :class:`NF4DQTensor` with ``codes``, ``absmax_codes`` (uint8), ``nested_absmax`` and
        ``offset`` (float32).

    Raises:
        DTypeError: ``x`` is not a float32, bfloat16 or float16 array.
        InvalidShape: ``x`` is empty.
        ConfigError: a block size out of range.
        InvalidOp: ``validate=True`` under jit or vmap.
        NonFiniteError: ``validate=True`` and ``x`` holds a NaN or an infinity, or a block's absmax does not
            survive double quantization (see ``validate``).

    Example:
        >>> import jax
        >>> q = double_quantize(jax.random.normal(jax.random.key(0), (1024, 1024)))
        >>> q.absmax_codes.shape, q.nested_absmax.shape, round(q.bits_per_value, 3)
        ((16384,), (64,), 4.127)
    """
    block = _check_block("block_size", block_size, even=True)
    nested = _check_block("nested_block_size", nested_block_size, even=False)
    x = float_input(x)
    if validate:
        validate_finite(x)
    threads, backend = _threads(torch_threads), _check_backend(backend)
    codes, absmax = _nf4_core(x, block)
    absmax_codes, nested_absmax, offset = _double_core(absmax, nested, threads, backend)
    q = NF4DQTensor(
        codes=codes,
        absmax_codes=absmax_codes,
        nested_absmax=nested_absmax,
        offset=offset,
        shape=tuple(x.shape),
        dtype=x.dtype,
        block_size=block,
        nested_block_size=nested,
    )
    if validate:
        _validate_double(absmax, _dq_absmax(q), block)
    return q


#: ``validate=True`` of :func:`double_quantize` refuses a block whose decoded absmax is off by more than this
#: fraction of its true absmax (ordinary tensors: well under 2%).
DQ_ABSMAX_TOLERANCE = 0.1


def _validate_double(absmax: jax.Array, decoded: jax.Array, block: int) -> None:
    true, got = np.asarray(absmax, np.float64), np.asarray(decoded, np.float64)
    with np.errstate(all="ignore"):
        off = np.abs(got - true) > DQ_ABSMAX_TOLERANCE * true
    bad = np.argwhere((true > 0) & off)
    if bad.size:
        b = int(bad[0][0])
        raise NonFiniteError(
            argument="x",
            expected=f"every block's double-quantized absmax within {DQ_ABSMAX_TOLERANCE:.0%} of its true absmax",
            got=f"block {b} (values {b * block}..{(b + 1) * block - 1}): absmax {true[b]:.4g} decoded as {got[b]:.4g}",
            hint="an outlier far above the other blocks' absmax makes the 8-bit absmax codes too coarse for "
            "the small blocks (bitsandbytes does the same); use nf4 (float32 absmax), or clip the outlier.",
        )


# ---- torch's float32 sum, in its order (bitsandbytes' offset is ``absmax.mean()`` on the CPU)

_TORCH_GRAIN = 32768  # at::internal::GRAIN_SIZE: a smaller reduction runs on one thread
_TORCH_LANES = 8  # floats per Vectorized<float> in the sum kernel
_TORCH_ILP = 4  # vectors summed side by side (row_sum's ilp_factor)
_TORCH_LEVELS = 4  # the cascade's accumulator levels (multi_row_sum's num_levels)


def _running_sum(v: jax.Array) -> jax.Array:
    """``0 + v[0] + v[1] + ...`` over axis 0, in that order, in float32."""
    if v.shape[0] == 0:
        return jnp.zeros(v.shape[1:], jnp.float32)
    total, _ = jax.lax.scan(lambda c, t: (c + t, None), jnp.zeros(v.shape[1:], jnp.float32), v)
    return total


def _cascade_sum(rows: jax.Array) -> jax.Array:
    """``multi_row_sum``: rows (size, ...) summed into accumulators of four levels, the lowest flushed upward
    every ``2**level_power`` rows (``level_power = max(4, ceil(log2(size)) // 4)``), then the levels added
    from the lowest."""
    size = rows.shape[0]
    step = 1 << max(4, (size - 1).bit_length() // _TORCH_LEVELS) if size > 1 else 16
    full = size // step
    level = _running_sum(rows[: full * step].reshape((full, step) + rows.shape[1:]).swapaxes(0, 1))
    acc = [_running_sum(rows[full * step:])]  # what the last, partial run of rows left in level 0
    for _ in range(_TORCH_LEVELS - 2):  # levels 1 and 2 flush upward after every `step` additions
        runs = level.shape[0] // step
        acc.append(_running_sum(level[runs * step:]))
        level = _running_sum(level[: runs * step].reshape((runs, step) + level.shape[1:]).swapaxes(0, 1))
    acc.append(_running_sum(level))  # level 3 keeps everything flushed into it
    total = acc[0]
    for a in acc[1:]:
        total = total + a
    return total


def _row_sum(units: jax.Array) -> jax.Array:
    """``row_sum``: units (m, ...) in 4 side-by-side cascades over rows of 4, the leftover units added into the
    first cascade's sum, then the four sums added."""
    rows = units.shape[0] // _TORCH_ILP
    part = _cascade_sum(units[: rows * _TORCH_ILP].reshape((rows, _TORCH_ILP) + units.shape[1:]))
    first = part[0]
    for i in range(rows * _TORCH_ILP, units.shape[0]):
        first = first + units[i]
    for k in range(1, _TORCH_ILP):
        first = first + part[k]
    return first


def _torch_serial_sum(a: jax.Array) -> jax.Array:
    """PyTorch's CPU float32 sum of a contiguous 1-D tensor on one thread (``cascade_sum``). Below 8 values
    (``scalar_inner_sum``): :func:`_row_sum` of the values. From 8 on (``vectorized_inner_sum``): :func:`_row_sum`
    of the vectors of 8 lanes, then a scalar ``0 + leftover values + lane 0 + ... + lane 7``."""
    n = a.shape[0]
    if n < _TORCH_LANES:
        return _row_sum(a)
    nvec = n // _TORCH_LANES
    lanes = _row_sum(a[: nvec * _TORCH_LANES].reshape(nvec, _TORCH_LANES))
    total = jnp.float32(0)
    for i in range(nvec * _TORCH_LANES, n):
        total = total + a[i]
    for lane in range(_TORCH_LANES):
        total = total + lanes[lane]
    return total


def _torch_sum(a: jax.Array, threads: int) -> jax.Array:
    """``torch.sum`` of a float32 vector on the CPU with ``threads`` intra-op threads, bit for bit: from
    ``_TORCH_GRAIN`` values on, ``min(threads, ceil(n / grain))`` equal chunks summed alone, then added in order."""
    n = a.shape[0]
    tasks = 1 if n < _TORCH_GRAIN else min(threads, -(-n // _TORCH_GRAIN))
    if tasks == 1:
        return _torch_serial_sum(a)
    chunk = -(-n // tasks)
    total = jnp.float32(0)
    for t in range(tasks):
        total = total + _torch_serial_sum(a[t * chunk: min(n, (t + 1) * chunk)])
    return total


@functools.cache
def torch_default_threads() -> int:
    """The intra-op threads PyTorch starts with here (``torch.get_num_threads()``): ``OMP_NUM_THREADS`` or
    ``MKL_NUM_THREADS`` when set, else the machine's physical cores (``/proc/cpuinfo``; else ``os.cpu_count()``).

    :func:`double_quantize`'s default ``torch_threads``: bitsandbytes' ``offset`` is a float32 mean whose
    summation order depends on it once there are 32768 or more NF4 blocks.

    Example:
        >>> torch_default_threads() >= 1
        True
    """
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        with open("/proc/cpuinfo") as f:
            cores, physical = set(), "0"
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "physical id":
                    physical = value.strip()
                elif key.strip() == "core id":
                    cores.add((physical, value.strip()))
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1


def _threads(torch_threads: int | None) -> int:
    return torch_default_threads() if torch_threads is None else positive_int("torch_threads", torch_threads)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _double_core(
    absmax: jax.Array, nested: int, threads: int = 1, backend: str = "cpu"
) -> tuple[jax.Array, jax.Array, jax.Array]:
    finite = jnp.isfinite(absmax)
    count = jnp.sum(finite).astype(jnp.float32)
    kept = jnp.where(finite, absmax, 0)
    offset = _torch_sum(kept, threads) / jnp.maximum(count, 1)
    # The sum of huge finite absmax values can overflow (two blocks at 3e38): then take the mean of the
    # values scaled by 2**-64 (exact) and scale it back; ordinary tensors keep the plain mean's bits.
    small = jnp.sum(kept * jnp.float32(2.0**-64)) / jnp.maximum(count, 1) * jnp.float32(2.0**64)
    offset = jnp.where(jnp.isfinite(offset), offset, small)
    centered = absmax - offset
    nb = absmax.shape[0]
    clean = jnp.where(finite, centered, 0)
    groups = _blocks(clean, nested)
    nested_absmax = jnp.max(jnp.abs(groups), axis=1)
    scaled = _scaled(groups, nested_absmax).reshape(-1)[:nb]
    absmax_codes = _ABSMAX_CODES[backend](scaled)
    # An 8-bit code cannot hold NaN: a non-finite absmax makes its nested block's absmax NaN, so
    # those blocks dequantize to NaN instead of to a finite, wrong value.
    spoiled = jnp.any(_blocks(~finite, nested), axis=1)
    nested_absmax = jnp.where(spoiled, jnp.float32(jnp.nan), nested_absmax)
    return absmax_codes, nested_absmax, offset


def _dq_absmax(q: NF4DQTensor) -> jax.Array:
    nb = q.absmax_codes.shape[-1]
    nested = jnp.repeat(q.nested_absmax, q.nested_block_size, axis=-1)[..., :nb]
    product = jnp.asarray(DYNAMIC_MAP)[q.absmax_codes] * nested
    # Round the product before adding the offset, as bitsandbytes does (two float32 roundings). A
    # per-element select on the product's bits (it only makes NaN payloads canonical) keeps XLA on
    # CPU from contracting the two into one fused multiply-add; a float select, or a select whose
    # condition is loop-invariant, does not.
    bits = jax.lax.bitcast_convert_type(product, jnp.int32)
    bits = jnp.where(jnp.isnan(product), jnp.int32(0x7FC00000), bits)
    return jax.lax.bitcast_convert_type(bits, jnp.float32) + q.offset[..., None]


def dequantize(q: Any) -> jax.Array:
    """Dequantizes an NF4 (or bitsandbytes FP4) record: ``level[code] * absmax`` in float32, cast to the original dtype.

    Works on records made under ``vmap`` too (their leaves carry leading batch dims).

    Args:
        q: An :class:`NF4Tensor` or :class:`NF4DQTensor` (or :class:`FP4Tensor` / :class:`FP4DQTensor`).

    Returns:
        An array of ``q.shape`` (after any batch dims) and ``q.dtype``.

    Raises:
        FormatError: ``q`` is not an NF4 record.

    Example:
        >>> import jax.numpy as jnp
        >>> y = dequantize(quantize(jnp.array([[2.0, -1.0], [0.0, 0.5]])))
        >>> y.shape, [round(v, 3) for v in y.reshape(-1).tolist()]
        ((2, 2), [2.0, -1.05, 0.0, 0.492])
    """
    if not isinstance(q, (NF4Tensor, NF4DQTensor, FP4Tensor, FP4DQTensor)):
        raise FormatError(
            argument="q", expected="an NF4Tensor or NF4DQTensor", got=type(q).__name__,
            hint="(or bitsandbytes' FP4Tensor / FP4DQTensor); use viva_tensor.quant.dequantize for any format.",
        )
    check_record(q)
    return _dequantize(q)


@jax.jit
def _dequantize(q: Any) -> jax.Array:
    absmax = _dq_absmax(q) if isinstance(q, (NF4DQTensor, FP4DQTensor)) else q.absmax
    batch = q.codes.shape[:-1]
    n = math.prod(q.shape)
    nb = absmax.shape[-1]
    levels = jnp.asarray(levels_of(q))[packing.unpack_pairs(q.codes, n, first="high")]
    levels = jnp.pad(levels, [(0, 0)] * len(batch) + [(0, nb * q.block_size - n)])
    values = levels.reshape(*batch, nb, q.block_size) * absmax[..., None]
    return values.reshape(*batch, -1)[..., :n].reshape(*batch, *q.shape).astype(q.dtype)


def _planes(q: Any) -> Planes | None:
    """The decode planes of a 2-D record (high nibbles = even columns), or None when blocks straddle rows."""
    rows, n = q.shape
    if q.block_size % 2 or n % q.block_size:
        return None
    absmax = _dq_absmax(q) if isinstance(q, (NF4DQTensor, FP4DQTensor)) else q.absmax
    codes = q.codes.reshape(-1, q.block_size // 2)
    scale = packing.materialized(absmax)[:, None]
    levels = levels_of(q)
    hi = packing.lookup16(levels, codes >> 4) * scale  # the first value is the high nibble
    lo = packing.lookup16(levels, codes & 0x0F) * scale
    return Planes(hi.reshape(rows, -1), lo.reshape(rows, -1), "pairs")


# --------------------------------------------------------------------------- bitsandbytes' own FP4

#: bitsandbytes' FP4 code book as its files store it (``weight.quant_map`` = ``get_4bit_type("fp4")``), by code:
#: sign bit 3, then 2 exponent bits and 1 mantissa bit with bias 2 and a subnormal 0.0625, normalized by 12. Not
#: OCP E2M1: other values (0.0052 ... 1) and another bit order (code 3 is 1.0). Codes 0 and 8 are both +0.0.
FP4_CODE_BOOK = (
    np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], np.float32) / np.float32(12)
).astype(np.float32)

#: The values FP4 codes decode to: the code book itself (code 8 is +0.0, as in bitsandbytes' PyTorch decode and
#: its vectorized CPU kernel; only that kernel's scalar tail loop decodes it as -0.0).
FP4_LEVELS = FP4_CODE_BOOK

# bitsandbytes quantizes by bucketing into the sorted code book: _FP4_ORDER[k] is the code of the k-th smallest
# level (its ``torch.argsort``, ties between the two zeros as bitsandbytes 0.50.2 breaks them), and
# _FP4_BOUNDS the float32 midpoints between sorted neighbours.
_FP4_ORDER = np.array([11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3], np.uint8)
_FP4_SORTED = FP4_CODE_BOOK[_FP4_ORDER]
_FP4_BOUNDS = ((_FP4_SORTED[:-1] + _FP4_SORTED[1:]) / np.float32(2)).astype(np.float32)


@record("bnb_fp4", core_ndim=1)
class FP4Tensor(QuantizedArray):
    """bitsandbytes FP4 codes (two per byte, first value high) and one float32 absmax per block of the flat tensor."""

    codes: jax.Array  # uint8 (..., ceil(n / 2))
    absmax: jax.Array  # float32 (..., ceil(n / block_size))
    block_size: int = static(default=64)


@record("bnb_fp4_dq", core_ndim=1)
class FP4DQTensor(QuantizedArray):
    """bitsandbytes FP4 with double quantization of the absmax (the same nested scheme as :class:`NF4DQTensor`)."""

    codes: jax.Array  # uint8 (..., ceil(n / 2))
    absmax_codes: jax.Array  # uint8 (..., ceil(n / block_size))
    nested_absmax: jax.Array  # float32 (..., ceil(n_blocks / nested_block_size))
    offset: jax.Array  # float32 (...,)
    block_size: int = static(default=64)
    nested_block_size: int = static(default=256)


def levels_of(q: Any) -> np.ndarray:
    """The 16-value code book of a bitsandbytes 4-bit record: :data:`FP4_LEVELS` or :data:`NF4_LEVELS`.

    Example:
        >>> import jax.numpy as jnp
        >>> float(levels_of(quantize_fp4(jnp.ones(2)))[3]), float(levels_of(quantize(jnp.ones(2)))[3])
        (1.0, -0.39491748809814453)
    """
    return FP4_LEVELS if isinstance(q, (FP4Tensor, FP4DQTensor)) else NF4_LEVELS


def _fp4_codes(scaled: jax.Array) -> jax.Array:
    """``torch.bucketize`` into the sorted code book (ties take the lower bucket; NaN the last), then the code."""
    t = jnp.asarray(_FP4_BOUNDS).reshape((1,) * scaled.ndim + (-1,))
    bucket = jnp.sum(~(scaled[..., None] <= t), axis=-1, dtype=jnp.int32)
    return jnp.asarray(_FP4_ORDER)[bucket]


@functools.partial(jax.jit, static_argnums=1)
def _fp4_core(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    flat = x.reshape(-1).astype(jnp.float32)
    n = flat.shape[0]
    full = n - n % block
    blocks = _blocks(flat, block)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    absmax = jnp.where(jnp.any(jnp.isnan(blocks), axis=1), jnp.float32(jnp.nan), absmax)
    # bitsandbytes multiplies the whole blocks by 1 / max(absmax, 1e-38) but DIVIDES the last, partial block.
    tiny = jnp.float32(1e-38)
    whole = _scaled(blocks[: full // block], jnp.maximum(absmax[: full // block], tiny)).reshape(-1)
    if full < n:
        am = jnp.maximum(absmax[-1], tiny)
        whole = jnp.concatenate([whole, flat[full:] / am])
    return packing.pack_pairs(_fp4_codes(whole), first="high", pad=0), absmax


def quantize_fp4(x: Any, *, block_size: int = 64, validate: bool = False) -> FP4Tensor:
    """Quantizes ``x`` to bitsandbytes' FP4 (``quantize_4bit(..., quant_type="fp4")``), byte for byte.

    Each block of ``block_size`` values of the flat tensor keeps its float32 absmax; each value the code of the
    :data:`FP4_LEVELS` entry its scaled value falls to, bucketed as bitsandbytes does (the midpoint between two
    levels goes to the lower one; values up to 1/384 of the absmax above zero take code 8, below it code 0).
    NaN and infinities follow bitsandbytes too (a NaN block's absmax is NaN); blocks above 2**120 are scaled
    down first as in :func:`quantize`.

    Args:
        x: A float32, bfloat16 or float16 array of any non-empty shape.
        block_size: Values per block (a positive even integer; bitsandbytes uses 64).
        validate: Check (eagerly) that every value is finite.

    Returns:
        An :class:`FP4Tensor` (``codes``: uint8, ``ceil(n / 2)`` bytes, first value in the high nibble;
        ``absmax``: float32 per block).

    Raises:
        DTypeError: ``x`` is not a float32, bfloat16 or float16 array.
        InvalidShape: ``x`` is empty.
        ConfigError: a block size that is not a positive even integer.
        InvalidOp: ``validate=True`` under jit or vmap.
        NonFiniteError: ``validate=True`` and ``x`` holds a NaN or an infinity.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_fp4(jnp.array([1.0, -0.5, 0.25, 0.0]))
        >>> [hex(b) for b in q.codes.tolist()], dequantize(q).tolist()
        (['0x3d', '0x70'], [1.0, -0.5, 0.25, 0.0])
    """
    block = _check_block("block_size", block_size, even=True)
    x = float_input(x)
    if validate:
        validate_finite(x)
    codes, absmax = _fp4_core(x, block)
    return FP4Tensor(codes=codes, absmax=absmax, shape=tuple(x.shape), dtype=x.dtype, block_size=block)


def double_quantize_fp4(
    x: Any, *, block_size: int = 64, nested_block_size: int = 256, validate: bool = False,
    torch_threads: int | None = None, backend: str = "cpu",
) -> FP4DQTensor:
    """bitsandbytes FP4 with double quantization (``quantize_4bit(..., "fp4", compress_statistics=True)``).

    The FP4 codes of :func:`quantize_fp4`; the absmax values stored as in :func:`double_quantize` (mean
    subtracted, 8-bit dynamic-map codes per nested block by the rule of ``backend``).

    Args:
        x: A float32, bfloat16 or float16 array of any non-empty shape.
        block_size: Values per FP4 block (a positive even integer).
        nested_block_size: absmax values per nested block (a positive integer; bitsandbytes uses 256).
        validate: As :func:`double_quantize`'s.
        torch_threads: As :func:`double_quantize`'s (the order of the float32 mean ``offset``).
        backend: As :func:`double_quantize`'s (``"cpu"`` or ``"cuda"``: the rule of the 8-bit absmax codes).

    Returns:
        An :class:`FP4DQTensor`.

    Raises:
        DTypeError: ``x`` is not a float32, bfloat16 or float16 array.
        InvalidShape: ``x`` is empty.
        ConfigError: a block size out of range.
        InvalidOp: ``validate=True`` under jit or vmap.
        NonFiniteError: ``validate=True`` and a value or a block's decoded absmax is bad (see :func:`double_quantize`).

    Example:
        >>> import jax
        >>> q = double_quantize_fp4(jax.random.normal(jax.random.key(0), (256, 256)))
        >>> q.absmax_codes.shape, q.nested_absmax.shape, round(q.bits_per_value, 3)
        ((1024,), (4,), 4.127)
    """
    block = _check_block("block_size", block_size, even=True)
    nested = _check_block("nested_block_size", nested_block_size, even=False)
    x = float_input(x)
    if validate:
        validate_finite(x)
    codes, absmax = _fp4_core(x, block)
    absmax_codes, nested_absmax, offset = _double_core(absmax, nested, _threads(torch_threads), _check_backend(backend))
    q = FP4DQTensor(codes=codes, absmax_codes=absmax_codes, nested_absmax=nested_absmax, offset=offset,
                    shape=tuple(x.shape), dtype=x.dtype, block_size=block, nested_block_size=nested)
    if validate:
        _validate_double(absmax, _dq_absmax(q), block)
    return q


def compute_stats(original: Any, q: NF4Tensor | NF4DQTensor) -> NF4Stats:
    """Bytes and errors of an NF4 record against the tensor it encodes (the Gleam ``compute_stats``).

    Args:
        original: The array that was quantized.
        q: Its NF4 record.

    Returns:
        :class:`NF4Stats`: original and stored bytes (measured from the buffers), compression ratio,
        bits per value, and the mean and max absolute error (in float32).

    Raises:
        FormatError: ``q`` is not an NF4 record.
        ShapeMismatch: ``original`` does not have the shape that ``q`` encodes.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([1.0, -0.5, 0.25, 0.0])
        >>> s = compute_stats(x, quantize(x))
        >>> s.quantized_bytes, round(s.max_error, 3)
        (6, 0.025)
    """
    from viva_tensor.errors import ShapeMismatch

    restored = dequantize(q)
    original = jnp.asarray(original)
    if tuple(original.shape) != tuple(restored.shape):
        raise ShapeMismatch(argument="original", expected=f"shape {tuple(restored.shape)}", got=tuple(original.shape))
    err = jnp.abs(original.astype(jnp.float32) - restored.astype(jnp.float32))
    return NF4Stats(
        original_bytes=q.original_nbytes,
        quantized_bytes=q.nbytes,
        compression_ratio=q.compression_ratio,
        bits_per_value=q.bits_per_value,
        mean_error=float(jnp.mean(err)),
        max_error=float(jnp.max(err)),
    )


register_format(
    "nf4",
    record=NF4Tensor,
    quantize=quantize,
    dequantize=dequantize,
    block_size=64,
    description="NormalFloat4 (QLoRA, bitsandbytes layout): 16 levels, float32 absmax per 64 values",
    planes=_planes,
)
register_format(
    "nf4_dq",
    record=NF4DQTensor,
    quantize=double_quantize,
    dequantize=dequantize,
    block_size=64,
    description="NF4 with double quantization: absmax as 8-bit dynamic-map codes per 256 blocks",
    planes=_planes,
)
register_format(
    "bnb_fp4",
    record=FP4Tensor,
    quantize=quantize_fp4,
    dequantize=dequantize,
    block_size=64,
    description="bitsandbytes FP4 (its own 16-value code book, not OCP E2M1): float32 absmax per 64 values",
    planes=_planes,
)
register_format(
    "bnb_fp4_dq",
    record=FP4DQTensor,
    quantize=double_quantize_fp4,
    dequantize=dequantize,
    block_size=64,
    description="bitsandbytes FP4 with double quantization: absmax as 8-bit dynamic-map codes per 256 blocks",
    planes=_planes,
)
