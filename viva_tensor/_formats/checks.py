"""Input checks shared by every format (private): one dtype policy, one error class per mistake.

- :data:`FLOAT_DTYPES`: what every quantize accepts (float32, bfloat16, float16). float64 and every other
  dtype are refused with :class:`~viva_tensor.errors.DTypeError` (no silent narrowing to float32);
  a str, ``None``, a list or another non-array gets a DTypeError too, never a raw JAX error.
- :func:`float_input`: a non-empty float array, else DTypeError or :class:`~viva_tensor.errors.InvalidShape`.
- :func:`validate_finite`: the ``validate=True`` path: :class:`~viva_tensor.errors.NonFiniteError`
  naming the first bad index; under ``jit``/``vmap`` (no concrete values) always
  :class:`~viva_tensor.errors.InvalidOp`.
- :func:`positive_int`: a positive (optionally even) Python int, else :class:`~viva_tensor.errors.ConfigError`.

Example:
    >>> import jax.numpy as jnp
    >>> float_input(jnp.ones(3, jnp.bfloat16)).dtype.name
    'bfloat16'
    >>> try:
    ...     float_input(jnp.ones(3, jnp.int32), "w")
    ... except Exception as e:
    ...     print(type(e).__name__, e.got, e.hint)
    DTypeError int32 cast with x.astype(jnp.float32) first.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from viva_tensor.errors import ConfigError, DTypeError, InvalidOp, InvalidShape, NonFiniteError

__all__ = ["FLOAT_DTYPES", "float_input", "float_dtype", "validate_finite", "validate_scale_range", "positive_int",
           "FLOAT16_SCALE_RANGE"]

#: The float16 normal range a stored float16 block scale must fall in: below it the scale is subnormal (precision
#: lost, 0 below ~6e-8), above it infinite.
FLOAT16_SCALE_RANGE = (2.0**-14, 65504.0)

#: The dtypes every quantize accepts.
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

_EXPECTED = "a float32, bfloat16 or float16 array"


def float_dtype(dtype: Any, name: str = "dtype") -> np.dtype:
    """``dtype`` as a NumPy dtype if it is one of :data:`FLOAT_DTYPES`, else :class:`DTypeError`."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in FLOAT_DTYPES:
        raise DTypeError(argument=name, expected="float32, bfloat16 or float16", got=str(dtype))
    return dt


def float_input(x: Any, name: str = "x") -> jax.Array:
    """``x`` as a ``jax.Array`` if it is a non-empty float32, bfloat16 or float16 array.

    The dtype is checked before any conversion, so a float64 NumPy array is refused rather than
    narrowed to float32 by JAX.

    Raises:
        DTypeError: ``x`` is not an array (a str, None, a list ...) or not of a float dtype above.
        InvalidShape: ``x`` is empty.
    """
    dtype = getattr(x, "dtype", None)
    if dtype is None or not hasattr(x, "shape"):
        raise DTypeError(
            argument=name, expected=_EXPECTED, got=type(x).__name__,
            hint="pass an array: jnp.asarray(x, jnp.float32).",
        )
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in FLOAT_DTYPES:
        hint = "cast with x.astype(jnp.float32) first."
        raise DTypeError(argument=name, expected=_EXPECTED, got=str(dtype), hint=hint)
    if int(np.prod(x.shape)) == 0:
        raise InvalidShape(
            argument=name, expected="at least one value", got=f"an empty array of shape {tuple(x.shape)}",
            hint="an empty tensor has nothing to quantize; skip it.",
        )
    return jnp.asarray(x)


def validate_finite(x: Any, name: str = "x") -> None:
    """Raises :class:`NonFiniteError` naming the first non-finite index of concrete ``x``.

    Raises:
        InvalidOp: ``x`` is traced (``validate=True`` under ``jit``, ``vmap`` or ``grad``).
        NonFiniteError: ``x`` holds a NaN or an infinity.
    """
    if isinstance(x, jax.core.Tracer):
        raise InvalidOp(
            argument="validate",
            expected="concrete input values (validate=True checks them eagerly)",
            got="a traced array (inside jit, vmap or grad)",
            hint="call with validate=True outside the transformation, or use jax.experimental.checkify.",
        )
    values = np.asarray(jnp.asarray(x).astype(jnp.float32))
    bad = np.argwhere(~np.isfinite(values))
    if bad.size:
        index = tuple(int(i) for i in bad[0])
        raise NonFiniteError(
            argument=name,
            expected="finite values",
            got=f"{float(values[index])} at index {index}",
            hint="replace NaN/inf (jnp.nan_to_num), or leave validate=False: only the blocks holding "
            "them dequantize to NaN.",
        )


def validate_scale_range(
    x: Any, *, block: int, levels: float, fmt: str, asymmetric: bool = False, flat: bool = True, name: str = "x"
) -> None:
    """The ``validate=True`` check of a format with a float16 block scale: every block's scale must be normal.

    The scale of a block is ``absmax / levels`` (``(max - min) / levels`` when ``asymmetric``); it must lie in
    :data:`FLOAT16_SCALE_RANGE`, i.e. the block's absmax (range) in ``[2**-14 * levels, 65504 * levels]``. An
    all-zero block (exact) and a non-finite one (see :func:`validate_finite`) are not checked here. Blocks are
    ``block`` consecutive values of the flattened tensor (``flat``) or of each row along the last axis.

    Raises:
        InvalidOp: ``x`` is traced.
        NonFiniteError: a block whose float16 scale would be subnormal (most of its precision lost, zeros below
            ~6e-8 * levels) or overflow; the message names the first such block and the usable range.
    """
    validate_finite(x, name)
    values = np.asarray(jnp.asarray(x).astype(jnp.float32))
    rows = values.reshape(1, -1) if flat or values.ndim == 0 else values.reshape(-1, values.shape[-1])
    pad = -rows.shape[1] % block
    rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=np.nan)
    blocks = rows.reshape(rows.shape[0], -1, block)
    with np.errstate(all="ignore"):
        stat = np.nanmax(blocks, -1) - np.nanmin(blocks, -1) if asymmetric else np.nanmax(np.abs(blocks), -1)
    stat = stat.astype(np.float64)
    lo, hi = FLOAT16_SCALE_RANGE[0] * levels, FLOAT16_SCALE_RANGE[1] * levels
    bad = np.argwhere((stat != 0) & ((stat < lo) | (stat > hi)))
    if bad.size:
        r, b = (int(i) for i in bad[0])
        where = f"block {b}" if flat else f"block {b} of row {r}"
        what = "range (max - min)" if asymmetric else "absmax"
        raise NonFiniteError(
            argument=name,
            expected=f"every {fmt} block's {what} 0 or within [{lo:.3g}, {hi:.3g}] (its float16 scale "
            f"{what} / {levels:g} in float16's normal range)",
            got=f"{what} {stat[r, b]:.3g} in {where} (of {block} values)",
            hint="rescale the tensor into the usable range, or use a format with a float32 scale (int8, nf4); "
            "with validate=False such blocks lose precision (or overflow) silently.",
        )


def positive_int(name: str, value: Any, *, even: bool = False, hint: str | None = None) -> int:
    """``value`` as an int if it is a positive (and, with ``even``, even) integer, else :class:`ConfigError`."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0
    if ok and even:
        ok = value % 2 == 0
    if not ok:
        want = "a positive even integer" if even else "a positive integer"
        raise ConfigError(argument=name, expected=want, got=value, hint=hint)
    return int(value)
