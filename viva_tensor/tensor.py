"""Core tensor functions with the Gleam names, as pure functions over ``jax.Array``.

Every function of the Gleam library's ``tensor`` module is here, with its name and argument order. A Gleam
``Tensor`` is a ``jax.Array``; a Gleam ``Result(_, TensorError)`` becomes an error from
:mod:`viva_tensor.errors` raised at trace time (shapes are static in JAX), naming the argument, what was
expected and what came. Values are never checked inside ``jit``.

Conventions and decisions:

* Axes are Python ints; negative axes count from the end, as in NumPy (Gleam accepted only ``0..rank-1``).
  An axis out of range raises :class:`~viva_tensor.errors.DimensionError`.
* Reductions (``sum``, ``mean`` ...) return a 0-d ``jax.Array`` (not a Python float) so they stay jittable;
  ``argmax``/``argmin`` return a 0-d ``int32`` array. The access functions that report static facts
  (``shape``, ``size``, ``rank``, ``dim``, ``rows``, ``cols``) return Python ints; ``to_list`` and
  ``to_list2d`` return Python lists (they need concrete values: not under ``jit``).
* Dtypes: bfloat16 and float16 are accumulated in float32 (sums, means, variances, norms, matmuls) and the
  result is cast back to the input dtype. Integer and bool inputs of ``sum``, ``product``, ``sum_axis``,
  ``dot``, ``matmul_vec`` and ``matmul`` accumulate as ``jnp.sum`` does and return that type: int32 for
  bool, int8 and int16, uint32 for uint8 and uint16 (``sum`` of int8 ``[100, 100]`` is 200, not -56; an
  int32 result wraps past 2**31 as in JAX). Element-wise operations (``add``, ``mul``, ``outer`` ...) keep
  the dtype and wrap as NumPy's do. ``mean``, ``variance``, ``std``, ``norm`` and ``normalize`` of integers
  return float32.
* float64 is not computed in: a float64 (or complex128) input is refused with
  :class:`~viva_tensor.errors.DTypeError` and the hint ``.astype(jnp.float32)``, since with JAX's x64 mode
  off ``jnp.asarray`` would narrow it silently; so is a NumPy int64 array whose values do not fit in 32 bits
  (they would wrap), and a 64-bit ``dtype=`` for a constructor. Nothing becomes float64.
* Empty arrays: ``sum`` gives 0, ``product`` 1, ``norm`` 0 and ``normalize`` returns its (empty) input;
  ``mean``, ``variance``, ``std``, ``max``, ``min``, ``argmax``, ``argmin`` (and ``mean_axis`` over an empty
  axis) raise :class:`~viva_tensor.errors.InvalidShape` (Gleam returned 0.0, a silent wrong answer).
* Non-finite values propagate as in NumPy: a NaN makes ``sum``, ``max`` ... NaN and ``argmax`` points at
  the first NaN.
* Where the port differs from Gleam it says so in the function's docstring (``squeeze`` of all-ones
  shapes, ``sum_axis`` of a vector, ``concat`` of matrices, ``broadcast_to``'s direction, ``slice`` bounds).

The Gleam strided-view functions (``to_strided``, ``to_contiguous``, ``transpose_strided``,
``is_contiguous``, ``get_fast``, ``get2d_fast``) have no JAX counterpart and are deliberately absent:
arrays are immutable, XLA owns memory layouts, and under ``jit`` a ``transpose`` or ``reshape`` costs no
copy (XLA folds it into the consumer), while element access is already O(1).

Example:
    >>> from viva_tensor import tensor as T
    >>> a = T.matrix(2, 3, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    >>> T.matmul(a, T.transpose(a)).tolist()
    [[14.0, 32.0], [32.0, 77.0]]
    >>> T.sum_axis(a, 0).tolist()
    [5.0, 7.0, 9.0]
"""

from __future__ import annotations

import builtins
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from viva_tensor.errors import (
    BroadcastError,
    DimensionError,
    DTypeError,
    InvalidOp,
    InvalidShape,
    ShapeMismatch,
)

__all__ = [
    # constructors
    "zeros",
    "ones",
    "fill",
    "from_list",
    "from_list2d",
    "vector",
    "matrix",
    "random_uniform",
    "random_normal",
    "xavier_init",
    "he_init",
    # access
    "shape",
    "size",
    "rank",
    "dim",
    "rows",
    "cols",
    "get",
    "get2d",
    "get_row",
    "get_col",
    "to_list",
    "to_list2d",
    "clone",
    # element-wise
    "add",
    "sub",
    "mul",
    "div",
    "scale",
    "add_scalar",
    "negate",
    "map",
    "map_indexed",
    # reductions
    "sum",
    "product",
    "mean",
    "max",
    "min",
    "argmax",
    "argmin",
    "variance",
    "std",
    "sum_axis",
    "mean_axis",
    # linear algebra
    "dot",
    "matmul_vec",
    "matmul",
    "transpose",
    "outer",
    # shape
    "reshape",
    "flatten",
    "concat",
    "concat_axis",
    "stack",
    "slice",
    "take_first",
    "take_last",
    "squeeze",
    "squeeze_axis",
    "unsqueeze",
    "expand_dims",
    # utilities
    "norm",
    "normalize",
    "clamp",
    # broadcasting
    "can_broadcast",
    "broadcast_shape",
    "broadcast_to",
    "add_broadcast",
    "mul_broadcast",
]

Shape = tuple[int, ...]

# --------------------------------------------------------------------------------------------------
# private helpers
# --------------------------------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


# float64 and complex128 are not computed in: with JAX's x64 mode off (the default) ``jnp.asarray`` would
# narrow them to 32 bits silently, so they are refused with the conversion to write (the library's policy).
_NARROWED = {np.dtype(np.float64): "jnp.float32", np.dtype(np.complex128): "jnp.complex64"}
_INT32_RANGE = {np.dtype(np.int64): (-(2**31), 2**31 - 1), np.dtype(np.uint64): (0, 2**32 - 1)}


def _no_float64(dtype: Any, argument: str) -> None:
    """DTypeError for float64/complex128 (the library computes in 32 bits at most), with the fix."""
    dtype = np.dtype(dtype)
    if dtype in _NARROWED:
        raise DTypeError(
            argument=argument,
            expected="float32, bfloat16, float16 or another dtype of at most 32 bits (float64 is not computed in)",
            got=str(dtype),
            hint=f"convert it first with .astype({_NARROWED[dtype]}).",
        )


def _numpy_input(x: Any, argument: str) -> jax.Array:
    """A NumPy array or scalar as a jax.Array, refusing what ``jnp.asarray`` would change silently."""
    try:
        dtype = jnp.dtype(x.dtype)
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "biufcV" or (dtype.kind == "V" and dtype.itemsize > 2):
        raise DTypeError(argument=argument, expected="a numeric array", got=f"a NumPy array of dtype {x.dtype}")
    _no_float64(dtype, argument)
    if dtype in _INT32_RANGE and not jax.config.jax_enable_x64 and np.size(x):
        lo, hi = _INT32_RANGE[dtype]
        if np.min(x) < lo or np.max(x) > hi:
            raise DTypeError(
                argument=argument,
                expected=f"{dtype} values in [{lo}, {hi}] (they become 32-bit integers)",
                got=f"values in [{np.min(x)}, {np.max(x)}]",
                hint="JAX's x64 mode is off: 64-bit integers would wrap silently.",
            )
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:
        raise DTypeError(argument=argument, expected="a numeric array", got=f"dtype {x.dtype} ({e})") from None


def _array(x: Any, argument: str) -> jax.Array:
    """``x`` as a jax.Array (tracers, NumPy arrays and Python numbers accepted), else DTypeError.

    float64/complex128 input is refused (see :func:`_no_float64`), and so are 64-bit NumPy integers that do
    not fit in 32 bits, which ``jnp.asarray`` would wrap.
    """
    if isinstance(x, jax.Array):
        _no_float64(x.dtype, argument)
        return x
    if isinstance(x, (np.ndarray, np.generic)):
        return _numpy_input(x, argument)
    if isinstance(x, (int, float, complex)) and not isinstance(x, bool):
        try:
            return jnp.asarray(x)
        except OverflowError:
            raise DTypeError(argument=argument, expected="an int that fits in int32", got=x) from None
    raise DTypeError(
        argument=argument,
        expected="a jax.Array",
        got=f"a {type(x).__name__}",
        hint="build one with from_list, from_list2d, matrix or jnp.asarray.",
    )


def _shaped(x: Any, argument: str) -> Any:
    """``x`` itself when it is an array of any dtype (for the functions that only read its shape), else
    what :func:`_array` makes of it."""
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return x
    return _array(x, argument)


def _dtype(dtype: Any, argument: str = "dtype", *, floating: bool = False) -> np.dtype:
    """``dtype`` as a NumPy dtype that JAX holds as it is, else DTypeError (64-bit types narrow with x64 off)."""
    try:
        out = jnp.dtype(dtype)
    except (TypeError, ValueError):
        raise DTypeError(argument=argument, expected="a dtype (jnp.float32, 'bfloat16', ...)",
                         got=repr(dtype)) from None
    if out.kind not in "biufcV" or (out.kind == "V" and out.itemsize > 2):
        raise DTypeError(argument=argument, expected="a numeric dtype", got=str(out))
    _no_float64(out, argument)
    if out.itemsize == 8 and out.kind in "iu" and not jax.config.jax_enable_x64:
        raise DTypeError(argument=argument, expected="a dtype of at most 32 bits (JAX's x64 mode is off)",
                         got=str(out), hint="use int32 or uint32.")
    if floating and not jnp.issubdtype(out, jnp.floating):
        raise DTypeError(argument=argument, expected="a floating dtype (float32, bfloat16, float16)", got=str(out))
    return out


def _memory_limit() -> int:
    """Bytes one array may take: the default device's memory limit, else the host's physical memory."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - some backends do not report memory
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 2**40


def _fits(shape: Shape, dtype: Any, argument: str = "shape") -> Shape:
    """``shape`` if an array of it in ``dtype`` fits in memory, else InvalidShape (not an out-of-memory crash)."""
    nbytes = math.prod(shape) * jnp.dtype(dtype).itemsize
    limit = _memory_limit()
    if nbytes > limit:
        raise InvalidShape(
            argument=argument,
            expected=f"an array that fits in memory (at most {limit:,} bytes on {jax.devices()[0].platform})",
            got=f"shape {shape} of {jnp.dtype(dtype).name}, {nbytes:,} bytes",
        )
    return shape


def _key(key: Any, argument: str = "key") -> jax.Array:
    """A PRNG key (``jax.random.key(0)`` or a legacy ``PRNGKey(0)``), else DTypeError."""
    if isinstance(key, jax.Array):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 0:
            return key
        if key.dtype == jnp.uint32 and key.shape == (2,):
            return key
        got = f"an array of dtype {key.dtype} and shape {key.shape}"
    else:
        got = f"a {type(key).__name__} ({key!r})" if isinstance(key, (int, float)) else f"a {type(key).__name__}"
    raise DTypeError(argument=argument, expected="a PRNG key", got=got, hint="make one with jax.random.key(0).")


def _shape(shape: Any, argument: str = "shape") -> Shape:
    """A static shape (an int or a sequence of non-negative ints) as a tuple, else InvalidShape."""
    if _is_int(shape):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)) or not builtins.all(_is_int(d) for d in shape):
        raise InvalidShape(argument=argument, expected="a sequence of non-negative ints", got=repr(shape))
    out = tuple(int(d) for d in shape)
    if builtins.any(d < 0 for d in out):
        raise InvalidShape(argument=argument, expected="non-negative sizes", got=out)
    return out


def _axis(axis: Any, ndim: int, argument: str = "axis") -> int:
    """``axis`` normalised into ``0..ndim-1`` (negatives count from the end), else DimensionError."""
    if not _is_int(axis):
        raise DimensionError(argument=argument, expected="an int axis", got=repr(axis))
    if not -ndim <= axis < ndim:
        raise DimensionError(
            argument=argument,
            expected=f"an axis in [{-ndim}, {ndim}) for rank {ndim}",
            got=int(axis),
        )
    return int(axis) % ndim


def _rank(x: jax.Array, want: int, argument: str, what: str) -> None:
    if x.ndim != want:
        raise DimensionError(
            argument=argument, expected=f"a rank-{want} array ({what})", got=f"shape {x.shape}"
        )


def _acc(dtype) -> np.dtype:
    """The accumulation dtype: float32 for narrow floats, int32/uint32 for bool and narrow ints, else itself.

    Integers follow ``jnp.sum``: int8/int16/bool accumulate in int32 and uint8/uint16 in uint32, so that
    ``sum([100, 100])`` of int8 is 200, not -56.
    """
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
        return jnp.dtype(jnp.float32)
    if dtype == jnp.bool_ or (jnp.issubdtype(dtype, jnp.signedinteger) and dtype.itemsize < 4):
        return jnp.dtype(jnp.int32)
    if jnp.issubdtype(dtype, jnp.unsignedinteger) and dtype.itemsize < 4:
        return jnp.dtype(jnp.uint32)
    return dtype


def _sum_out(dtype) -> np.dtype:
    """Output dtype of a sum, product or contraction: the input dtype if inexact, else the accumulator."""
    dtype = jnp.dtype(dtype)
    return dtype if jnp.issubdtype(dtype, jnp.inexact) else _acc(dtype)


def _float_out(dtype) -> np.dtype:
    """Output dtype of a floating reduction: the input dtype if floating, float32 otherwise."""
    dtype = jnp.dtype(dtype)
    return dtype if jnp.issubdtype(dtype, jnp.inexact) else jnp.dtype(jnp.float32)


def _real_out(dtype) -> np.dtype:
    """Output dtype of a magnitude (variance, std, norm): real; float32 for integers and complex64."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return jnp.dtype(jnp.float32)
    return _float_out(dtype)


def _is_weak(x: Any) -> bool:
    return isinstance(x, (int, float, complex)) and not isinstance(x, bool)


def _promoted(*xs: Any) -> tuple:
    """The operands cast to the dtype JAX's standard promotion gives them, Python numbers left weakly typed.

    The operation that follows then computes exactly what it computes under the default
    ``jax_numpy_dtype_promotion="standard"`` (same dtype, same bits), and also works when a user has turned
    ``"strict"`` on: a documented promotion (``mul`` of int32 and 0.5, ``scale`` of bfloat16 by a float32
    scalar) is the library's, not an implicit one."""
    with jax.numpy_dtype_promotion("standard"):
        dt = jnp.result_type(*xs)
    return tuple(x if _is_weak(x) else jnp.asarray(x).astype(dt) for x in xs)


def _times(a: Any, b: Any) -> jax.Array:
    """``a * b`` as NumPy computes it when one side is bool: ``False * nan`` is NaN. (XLA rewrites
    ``convert(bool) * x`` into a select, which gives 0 there and hides the NaN.)"""
    a_bool, b_bool = jnp.dtype(jnp.result_type(a)) == jnp.bool_, jnp.dtype(jnp.result_type(b)) == jnp.bool_
    if a_bool != b_bool:
        mask, x = (a, b) if a_bool else (b, a)
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.where(mask, x, x * 0)
    a, b = _promoted(a, b)
    return a * b


def _not_bool(x: jax.Array, argument: str, op: str) -> None:
    if x.dtype == jnp.bool_:
        raise DTypeError(argument=argument, expected=f"a numeric dtype ({op} of booleans is undefined, as in NumPy)",
                         got="bool", hint="use ~ or jnp.logical_xor, or convert with .astype(jnp.int32).")


def _ordered(x: jax.Array, argument: str, op: str) -> None:
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise DTypeError(argument=argument, expected=f"a real dtype ({op} needs an order; complex numbers have none)",
                         got=str(x.dtype), hint="compare jnp.abs(t), or t.real.")


def _mag(d: jax.Array) -> jax.Array:
    """``|d|``; for complex, ``hypot(re, im)`` (C99: ``|nan + inf j|`` is inf, where ``jnp.abs`` gives NaN)."""
    if jnp.issubdtype(d.dtype, jnp.complexfloating):
        return jnp.hypot(d.real, d.imag)
    return jnp.abs(d)


def _pow2(k: jax.Array) -> jax.Array:
    """``2.0 ** k`` exactly, in float32, for integer ``k`` in ``[-126, 127]`` (built from the bits)."""
    return lax.bitcast_convert_type(((k + 127) << 23).astype(jnp.int32), jnp.float32)


def _scaled(d: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(d * 2**-e, e)`` with ``2**e`` the power of two just above ``max|d|`` (``e = 0`` when that is 0, inf or
    NaN), so that squares of the scaled values neither overflow (3e38) nor flush to zero (1e-30).

    The scaling is by exact powers of two applied in two steps (``2**-127`` alone would be subnormal, and
    XLA:CPU flushes subnormals), never by a division, which XLA would turn into a rounded reciprocal.
    """
    m = jnp.max(_mag(d), initial=0.0).astype(jnp.float32)
    ok = (m > 0) & jnp.isfinite(m)
    _, e = jnp.frexp(jnp.where(ok, m, jnp.float32(1)))
    e = jnp.where(ok, e, 0).astype(jnp.int32)
    h = e // 2
    s1, s2 = _pow2(-h).astype(d.real.dtype), _pow2(h - e).astype(d.real.dtype)
    if jnp.issubdtype(d.dtype, jnp.complexfloating):  # part by part: (nan+infj) * (1+0j) would be nan+nanj
        return lax.complex((d.real * s1) * s2, (d.imag * s1) * s2), e
    return (d * s1) * s2, e


def _restore(v: jax.Array, e: jax.Array) -> jax.Array:
    """``v * 2**e`` (the inverse of :func:`_scaled`), in two exact steps."""
    h = e // 2
    return (v * _pow2(e - h)) * _pow2(h)


def _rms_parts(d: jax.Array, reduce: Callable = jnp.mean) -> tuple[jax.Array, jax.Array]:
    """``(r, e)`` with ``sqrt(reduce(|d|**2)) == r * 2**e``, computed on the scaled values of :func:`_scaled`."""
    x, e = _scaled(d)
    a = _mag(x)
    return jnp.sqrt(reduce(a * a)), e


def _l2(d: jax.Array, reduce: Callable = jnp.mean) -> jax.Array:
    """``sqrt(reduce(|d|**2))`` without overflow or underflow of the squares (see :func:`_scaled`)."""
    r, e = _rms_parts(d, reduce)
    return _restore(r, e)


def _nonempty(x: jax.Array, argument: str, op: str) -> None:
    if x.size == 0:
        raise InvalidShape(
            argument=argument,
            expected=f"a non-empty array ({op} of nothing is undefined)",
            got=f"shape {x.shape}",
        )


def _same_shape(a: jax.Array, b: jax.Array, hint: str) -> None:
    if a.shape != b.shape:
        raise ShapeMismatch(argument="b", expected=f"shape {a.shape} (the shape of 'a')", got=b.shape, hint=hint)


def _scalar(s: Any, argument: str) -> Any:
    if isinstance(s, (int, float, np.generic)) and not isinstance(s, bool):
        return s
    s = _array(s, argument)
    if s.ndim != 0:
        raise DimensionError(argument=argument, expected="a scalar", got=f"shape {s.shape}")
    return s


def _index(i: Any, n: int, argument: str) -> Any:
    """A Python int index checked against ``n`` (negatives count from the end); a traced one as is."""
    if _is_int(i):
        if not -n <= i < n:
            raise DimensionError(argument=argument, expected=f"an index in [{-n}, {n})", got=int(i))
        return int(i) % n
    i = _array(i, argument)
    if i.ndim != 0 or not jnp.issubdtype(i.dtype, jnp.integer):
        raise DTypeError(argument=argument, expected="an int or a 0-d integer array", got=f"{i.dtype}{i.shape}")
    return i


def _list_of_arrays(tensors: Any, argument: str) -> list[jax.Array]:
    if isinstance(tensors, jax.Array) or not isinstance(tensors, (list, tuple)):
        raise InvalidShape(argument=argument, expected="a list of arrays", got=f"a {type(tensors).__name__}")
    if not tensors:
        raise InvalidShape(argument=argument, expected="a non-empty list of arrays", got="[]")
    return [_array(t, f"{argument}[{k}]") for k, t in enumerate(tensors)]


# --------------------------------------------------------------------------------------------------
# constructors
# --------------------------------------------------------------------------------------------------


def zeros(shape: Sequence[int] | int, *, dtype=jnp.float32) -> jax.Array:
    """An array of zeros.

    Args:
        shape: the static shape, an int or a sequence of non-negative ints.
        dtype: the element type (keyword-only).

    Returns:
        A ``jax.Array`` of ``shape`` filled with 0.

    Raises:
        InvalidShape: for a negative size, a shape that is not a sequence of ints, or an array that would
            not fit in memory (more bytes than the device or host has).
        DTypeError: when ``dtype`` is not a numeric dtype of at most 32 bits.

    Example:
        >>> zeros((2, 2)).tolist()
        [[0.0, 0.0], [0.0, 0.0]]
    """
    dtype = _dtype(dtype)
    return jnp.zeros(_fits(_shape(shape), dtype), dtype=dtype)


def ones(shape: Sequence[int] | int, *, dtype=jnp.float32) -> jax.Array:
    """An array of ones.

    Args:
        shape: the static shape.
        dtype: the element type (keyword-only).

    Returns:
        A ``jax.Array`` of ``shape`` filled with 1.

    Raises:
        InvalidShape: for a negative size, a shape that is not a sequence of ints, or an array that would
            not fit in memory (more bytes than the device or host has).
        DTypeError: when ``dtype`` is not a numeric dtype of at most 32 bits.

    Example:
        >>> ones(3).tolist()
        [1.0, 1.0, 1.0]
    """
    dtype = _dtype(dtype)
    return jnp.ones(_fits(_shape(shape), dtype), dtype=dtype)


def fill(shape: Sequence[int] | int, value: Any, *, dtype=jnp.float32) -> jax.Array:
    """An array with every element equal to ``value``.

    Args:
        shape: the static shape.
        value: a scalar (a Python number or a 0-d array, possibly traced).
        dtype: the element type (keyword-only).

    Returns:
        A ``jax.Array`` of ``shape`` filled with ``value``.

    Raises:
        InvalidShape: for a bad shape, or one too large to fit in memory.
        DTypeError: when ``dtype`` is not a numeric dtype of at most 32 bits.
        DimensionError: when ``value`` is not a scalar.

    Example:
        >>> fill((2,), 0.5).tolist()
        [0.5, 0.5]
    """
    dtype = _dtype(dtype)
    return jnp.full(_fits(_shape(shape), dtype), _scalar(value, "value"), dtype=dtype)


def from_list(data: Sequence[float], *, dtype=jnp.float32) -> jax.Array:
    """A vector (rank-1 array) from a flat list of numbers.

    Args:
        data: a flat sequence of numbers (or a 1-D NumPy array).
        dtype: the element type (keyword-only).

    Returns:
        A rank-1 ``jax.Array`` of length ``len(data)``.

    Raises:
        InvalidShape: when ``data`` is nested, ragged or not numbers.

    Example:
        >>> from_list([1.0, 2.0]).shape
        (2,)
    """
    dtype = _dtype(dtype)
    try:
        arr = np.asarray(data, dtype=np.float64 if jnp.issubdtype(dtype, jnp.floating) else None)
    except (ValueError, TypeError) as e:
        got = f"{type(data).__name__} ({e})"
        raise InvalidShape(argument="data", expected="a flat list of numbers", got=got) from None
    if arr.ndim != 1:
        raise InvalidShape(
            argument="data", expected="a flat list of numbers", got=f"a nested list of shape {arr.shape}",
            hint="use from_list2d for rows, or reshape.",
        )
    return jnp.asarray(arr, dtype=dtype)


def from_list2d(rows: Sequence[Sequence[float]], *, dtype=jnp.float32) -> jax.Array:
    """A matrix from a list of rows, all of the same length.

    An empty list gives shape ``(0, 0)``, as in Gleam.

    Args:
        rows: a list of rows, each a list of numbers.
        dtype: the element type (keyword-only).

    Returns:
        A rank-2 ``jax.Array`` of shape ``(len(rows), len(rows[0]))``.

    Raises:
        InvalidShape: when the rows have different lengths or are not lists of numbers.

    Example:
        >>> from_list2d([[1.0, 2.0], [3.0, 4.0]]).shape
        (2, 2)
    """
    dtype = _dtype(dtype)
    if isinstance(rows, (list, tuple)) and len(rows) == 0:
        return jnp.zeros((0, 0), dtype=dtype)
    if not isinstance(rows, (list, tuple, np.ndarray)):
        raise InvalidShape(argument="rows", expected="a list of rows", got=f"a {type(rows).__name__}")
    lengths = [len(r) if isinstance(r, (list, tuple, np.ndarray)) else None for r in rows]
    if None in lengths:
        raise InvalidShape(argument="rows", expected="a list of rows (lists of numbers)", got=repr(rows)[:60])
    if len(set(lengths)) != 1:
        raise InvalidShape(argument="rows", expected="rows of equal length", got=f"row lengths {lengths}")
    try:
        arr = np.asarray(rows, dtype=np.float64 if jnp.issubdtype(dtype, jnp.floating) else None)
    except (ValueError, TypeError) as e:
        raise InvalidShape(argument="rows", expected="rows of numbers", got=f"{repr(rows)[:60]} ({e})") from None
    if arr.ndim != 2:
        raise InvalidShape(argument="rows", expected="rows of numbers", got=f"a nested list of shape {arr.shape}")
    return jnp.asarray(arr, dtype=dtype)


def vector(data: Sequence[float], *, dtype=jnp.float32) -> jax.Array:
    """A vector from a flat list: the same as :func:`from_list`.

    Args:
        data: a flat sequence of numbers.
        dtype: the element type (keyword-only).

    Returns:
        A rank-1 ``jax.Array``.

    Raises:
        InvalidShape: when ``data`` is nested or not numbers.

    Example:
        >>> vector([3.0, 4.0]).tolist()
        [3.0, 4.0]
    """
    return from_list(data, dtype=dtype)


def matrix(rows: int, cols: int, data: Sequence[float], *, dtype=jnp.float32) -> jax.Array:
    """A ``rows x cols`` matrix from a flat row-major list.

    Args:
        rows: the number of rows.
        cols: the number of columns.
        data: ``rows * cols`` numbers, row after row.
        dtype: the element type (keyword-only).

    Returns:
        A rank-2 ``jax.Array`` of shape ``(rows, cols)``.

    Raises:
        InvalidShape: when ``len(data) != rows * cols`` or a size is negative.

    Example:
        >>> matrix(2, 2, [1.0, 2.0, 3.0, 4.0]).tolist()
        [[1.0, 2.0], [3.0, 4.0]]
    """
    shp = _shape((rows, cols), "rows, cols")
    flat = from_list(data, dtype=dtype)
    if flat.size != shp[0] * shp[1]:
        raise InvalidShape(
            argument="data", expected=f"{shp[0] * shp[1]} elements (rows * cols = {shp[0]} * {shp[1]})",
            got=f"{flat.size} elements",
        )
    return flat.reshape(shp)


def random_uniform(key: jax.Array, shape: Sequence[int] | int, *, dtype=jnp.float32) -> jax.Array:
    """Uniform random values in ``[0, 1)``.

    Args:
        key: a PRNG key (``jax.random.key(0)``); the same key gives the same values.
        shape: the static shape.
        dtype: a floating element type (keyword-only).

    Returns:
        A ``jax.Array`` of ``shape``.

    Raises:
        InvalidShape: for a bad shape, or one too large to fit in memory.
        DTypeError: when ``key`` is not a PRNG key (an int seed is not one: use ``jax.random.key(0)``)
            or ``dtype`` is not a floating dtype.

    Example:
        >>> x = random_uniform(jax.random.key(0), (1000,))
        >>> bool((x >= 0).all() & (x < 1).all())
        True
    """
    dtype = _dtype(dtype, floating=True)
    return jax.random.uniform(_key(key), _fits(_shape(shape), dtype), dtype=dtype)


def random_normal(
    key: jax.Array, shape: Sequence[int] | int, mean: float = 0.0, std: float = 1.0, *, dtype=jnp.float32
) -> jax.Array:
    """Normal random values with the given mean and standard deviation.

    Args:
        key: a PRNG key.
        shape: the static shape.
        mean: the mean of the distribution.
        std: its standard deviation.
        dtype: a floating element type (keyword-only).

    Returns:
        A ``jax.Array`` of ``shape``: ``mean + std * N(0, 1)``.

    Raises:
        InvalidShape: for a bad shape, or one too large to fit in memory.
        DTypeError: when ``key`` is not a PRNG key (an int seed is not one: use ``jax.random.key(0)``)
            or ``dtype`` is not a floating dtype.

    Example:
        >>> x = random_normal(jax.random.key(0), (10000,), 5.0, 2.0)
        >>> round(float(x.mean())), round(float(x.std()))
        (5, 2)
    """
    dtype = _dtype(dtype, floating=True)
    mean, std = _scalar(mean, "mean"), _scalar(std, "std")
    z = jax.random.normal(_key(key), _fits(_shape(shape), jnp.float32), dtype=jnp.float32)
    return (mean + std * z).astype(dtype)


def _fans(fan_in: int, fan_out: int) -> Shape:
    shp = _shape((fan_out, fan_in), "fan_in, fan_out")
    if 0 in shp:
        raise InvalidShape(argument="fan_in, fan_out", expected="positive fans", got=(fan_in, fan_out))
    return shp


def xavier_init(key: jax.Array, fan_in: int, fan_out: int, *, dtype=jnp.float32) -> jax.Array:
    """Xavier/Glorot uniform initialisation, shape ``(fan_out, fan_in)`` as in Gleam (``W @ x``).

    Values are uniform in ``[-l, l)`` with ``l = sqrt(6 / (fan_in + fan_out))``.

    Args:
        key: a PRNG key.
        fan_in: the number of inputs.
        fan_out: the number of outputs.
        dtype: a floating element type (keyword-only).

    Returns:
        A ``(fan_out, fan_in)`` ``jax.Array``.

    Raises:
        InvalidShape: when a fan is not a positive int.
        DTypeError: when ``key`` is not a PRNG key or ``dtype`` not a floating dtype.

    Example:
        >>> w = xavier_init(jax.random.key(0), 4, 2)
        >>> w.shape, bool(abs(w).max() <= 1.0)
        ((2, 4), True)
    """
    dtype = _dtype(dtype, floating=True)
    shp = _fits(_fans(fan_in, fan_out), jnp.float32, "fan_in, fan_out")
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(_key(key), shp, jnp.float32, -limit, limit).astype(dtype)


def he_init(key: jax.Array, fan_in: int, fan_out: int, *, dtype=jnp.float32) -> jax.Array:
    """He (Kaiming) normal initialisation for ReLU layers, shape ``(fan_out, fan_in)``.

    Values are ``N(0, 2 / fan_in)``.

    Args:
        key: a PRNG key.
        fan_in: the number of inputs.
        fan_out: the number of outputs.
        dtype: a floating element type (keyword-only).

    Returns:
        A ``(fan_out, fan_in)`` ``jax.Array``.

    Raises:
        InvalidShape: when a fan is not a positive int.
        DTypeError: when ``key`` is not a PRNG key or ``dtype`` not a floating dtype.

    Example:
        >>> he_init(jax.random.key(0), 3, 5).shape
        (5, 3)
    """
    dtype = _dtype(dtype, floating=True)
    shp = _fits(_fans(fan_in, fan_out), jnp.float32, "fan_in, fan_out")
    return (math.sqrt(2.0 / fan_in) * jax.random.normal(_key(key), shp, jnp.float32)).astype(dtype)


# --------------------------------------------------------------------------------------------------
# access
# --------------------------------------------------------------------------------------------------


def shape(t: jax.Array) -> Shape:
    """The shape of ``t``, a tuple of Python ints.

    Args:
        t: an array.

    Returns:
        ``t.shape``.

    Raises:
        DTypeError: when ``t`` is not an array.

    Example:
        >>> shape(zeros((2, 3)))
        (2, 3)
    """
    return tuple(int(d) for d in _shaped(t, "t").shape)


def size(t: jax.Array) -> int:
    """The number of elements of ``t``.

    Args:
        t: an array.

    Returns:
        The product of the shape (1 for a scalar).

    Raises:
        DTypeError: when ``t`` is not an array.

    Example:
        >>> size(zeros((2, 3)))
        6
    """
    return int(_shaped(t, "t").size)


def rank(t: jax.Array) -> int:
    """The number of axes of ``t``.

    Args:
        t: an array.

    Returns:
        ``t.ndim``.

    Raises:
        DTypeError: when ``t`` is not an array.

    Example:
        >>> rank(zeros((2, 3)))
        2
    """
    return int(_shaped(t, "t").ndim)


def dim(t: jax.Array, axis: int) -> int:
    """The size of one axis of ``t``.

    Args:
        t: an array.
        axis: the axis (negative counts from the end).

    Returns:
        ``t.shape[axis]``.

    Raises:
        DimensionError: when ``axis`` is out of range.

    Example:
        >>> dim(zeros((2, 3)), 1), dim(zeros((2, 3)), -2)
        (3, 2)
    """
    t = _shaped(t, "t")
    return t.shape[_axis(axis, t.ndim)]


def rows(t: jax.Array) -> int:
    """The number of rows: the size of the first axis, 0 for a scalar (Gleam semantics).

    Args:
        t: an array.

    Returns:
        ``t.shape[0]``, or 0 when ``t`` is 0-d.

    Raises:
        DTypeError: when ``t`` is not an array.

    Example:
        >>> rows(zeros((2, 3)))
        2
    """
    t = _shaped(t, "t")
    return t.shape[0] if t.ndim else 0


def cols(t: jax.Array) -> int:
    """The number of columns: the second axis, the length of a vector, 0 for a scalar (Gleam semantics).

    Args:
        t: an array.

    Returns:
        ``t.shape[1]`` for rank >= 2, ``t.shape[0]`` for a vector, 0 for a scalar.

    Raises:
        DTypeError: when ``t`` is not an array.

    Example:
        >>> cols(zeros((2, 3))), cols(zeros(4))
        (3, 4)
    """
    t = _shaped(t, "t")
    return t.shape[1] if t.ndim >= 2 else (t.shape[0] if t.ndim == 1 else 0)


def get(t: jax.Array, index: Any) -> jax.Array:
    """The element at a flat (row-major) index.

    A Python int index is checked (negatives count from the end); a traced index is not: JAX wraps
    negatives and clamps indices past the end.

    Args:
        t: an array.
        index: a flat index, an int or a 0-d integer array.

    Returns:
        A 0-d array of ``t``'s dtype.

    Raises:
        DimensionError: when a Python int index is out of range.

    Example:
        >>> get(matrix(2, 2, [1.0, 2.0, 3.0, 4.0]), 2).tolist()
        3.0
    """
    t = _array(t, "t")
    return jnp.ravel(t)[_index(index, t.size, "index")]


def get2d(t: jax.Array, row: Any, col: Any) -> jax.Array:
    """The element at ``(row, col)`` of a matrix.

    Args:
        t: a rank-2 array.
        row: the row index (Python ints are checked, negatives count from the end).
        col: the column index.

    Returns:
        A 0-d array of ``t``'s dtype.

    Raises:
        DimensionError: when ``t`` is not rank 2 or a Python int index is out of range.

    Example:
        >>> get2d(matrix(2, 2, [1.0, 2.0, 3.0, 4.0]), 1, 0).tolist()
        3.0
    """
    t = _array(t, "t")
    _rank(t, 2, "t", "a matrix")
    return t[_index(row, t.shape[0], "row"), _index(col, t.shape[1], "col")]


def get_row(t: jax.Array, row: Any) -> jax.Array:
    """One row of a matrix, as a vector.

    Args:
        t: a rank-2 array.
        row: the row index (Python ints are checked).

    Returns:
        A vector of length ``cols(t)``.

    Raises:
        DimensionError: when ``t`` is not rank 2 or ``row`` is out of range.

    Example:
        >>> get_row(matrix(2, 2, [1.0, 2.0, 3.0, 4.0]), 1).tolist()
        [3.0, 4.0]
    """
    t = _array(t, "t")
    _rank(t, 2, "t", "a matrix")
    return t[_index(row, t.shape[0], "row")]


def get_col(t: jax.Array, col: Any) -> jax.Array:
    """One column of a matrix, as a vector.

    Args:
        t: a rank-2 array.
        col: the column index (Python ints are checked).

    Returns:
        A vector of length ``rows(t)``.

    Raises:
        DimensionError: when ``t`` is not rank 2 or ``col`` is out of range.

    Example:
        >>> get_col(matrix(2, 2, [1.0, 2.0, 3.0, 4.0]), 1).tolist()
        [2.0, 4.0]
    """
    t = _array(t, "t")
    _rank(t, 2, "t", "a matrix")
    return t[:, _index(col, t.shape[1], "col")]


def _py(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.core.Tracer):
        raise InvalidOp(argument="t", expected="a concrete array", got="a traced array",
                        hint="to_list needs values: call it outside jit.")
    return np.asarray(x)


def to_list(t: jax.Array) -> list:
    """All elements of ``t`` as a flat Python list, in row-major order (Gleam's flat ``List(Float)``).

    Not usable under ``jit``: it needs concrete values.

    Args:
        t: an array.

    Returns:
        A flat list of Python numbers (floats for floating dtypes).

    Raises:
        InvalidOp: when ``t`` is traced.

    Example:
        >>> to_list(matrix(2, 2, [1.0, 2.0, 3.0, 4.0]))
        [1.0, 2.0, 3.0, 4.0]
    """
    return _py(_array(t, "t")).ravel().tolist()


def to_list2d(t: jax.Array) -> list[list]:
    """A matrix as a list of rows.

    Args:
        t: a rank-2 array.

    Returns:
        A list of ``rows(t)`` lists of ``cols(t)`` Python numbers.

    Raises:
        DimensionError: when ``t`` is not rank 2.
        InvalidOp: when ``t`` is traced.

    Example:
        >>> to_list2d(matrix(2, 2, [1.0, 2.0, 3.0, 4.0]))
        [[1.0, 2.0], [3.0, 4.0]]
    """
    t = _array(t, "t")
    _rank(t, 2, "t", "a matrix")
    return _py(t).tolist()


def clone(t: jax.Array) -> jax.Array:
    """A copy of ``t`` (arrays are immutable, so this only matters for buffer donation).

    Args:
        t: an array.

    Returns:
        An array equal to ``t``, in a new buffer when run eagerly.

    Raises:
        DTypeError: when ``t`` is not an array.

    Example:
        >>> clone(ones(2)).tolist()
        [1.0, 1.0]
    """
    return jnp.array(_array(t, "t"), copy=True)


# --------------------------------------------------------------------------------------------------
# element-wise
# --------------------------------------------------------------------------------------------------


def add(a: jax.Array, b: jax.Array) -> jax.Array:
    """Element-wise ``a + b``; the shapes must be equal (use :func:`add_broadcast` to broadcast).

    Args:
        a: an array.
        b: an array of the same shape.

    Returns:
        ``a + b``.

    Raises:
        ShapeMismatch: when the shapes differ.

    Example:
        >>> add(vector([1.0, 2.0]), vector([3.0, 4.0])).tolist()
        [4.0, 6.0]
    """
    a, b = _array(a, "a"), _array(b, "b")
    _same_shape(a, b, "use add_broadcast to broadcast.")
    a, b = _promoted(a, b)
    return a + b


def sub(a: jax.Array, b: jax.Array) -> jax.Array:
    """Element-wise ``a - b``; the shapes must be equal.

    Args:
        a: an array.
        b: an array of the same shape.

    Returns:
        ``a - b``.

    Raises:
        ShapeMismatch: when the shapes differ.
        DTypeError: when both are bool (NumPy refuses ``bool - bool`` too).

    Example:
        >>> sub(vector([1.0, 2.0]), vector([3.0, 4.0])).tolist()
        [-2.0, -2.0]
    """
    a, b = _array(a, "a"), _array(b, "b")
    _same_shape(a, b, "broadcast_to the shape of 'a' first.")
    if a.dtype == jnp.bool_ and b.dtype == jnp.bool_:
        _not_bool(a, "a", "subtraction")
    a, b = _promoted(a, b)
    return a - b


def mul(a: jax.Array, b: jax.Array) -> jax.Array:
    """Element-wise (Hadamard) ``a * b``; the shapes must be equal (use :func:`mul_broadcast`).

    Args:
        a: an array.
        b: an array of the same shape.

    Returns:
        ``a * b``.

    Raises:
        ShapeMismatch: when the shapes differ.

    Example:
        >>> mul(vector([1.0, 2.0]), vector([3.0, 4.0])).tolist()
        [3.0, 8.0]
    """
    a, b = _array(a, "a"), _array(b, "b")
    _same_shape(a, b, "use mul_broadcast to broadcast.")
    return _times(a, b)


def div(a: jax.Array, b: jax.Array) -> jax.Array:
    """Element-wise ``a / b``; the shapes must be equal. Division by zero gives inf/NaN as in IEEE.

    Args:
        a: an array.
        b: an array of the same shape.

    Returns:
        ``a / b``.

    Raises:
        ShapeMismatch: when the shapes differ.

    Example:
        >>> div(vector([1.0, 2.0]), vector([4.0, 4.0])).tolist()
        [0.25, 0.5]
    """
    a, b = _array(a, "a"), _array(b, "b")
    _same_shape(a, b, "broadcast_to the shape of 'a' first.")
    a, b = _promoted(a, b)
    return a / b


def scale(t: jax.Array, s: Any) -> jax.Array:
    """Multiply every element by the scalar ``s``; the result keeps ``t``'s dtype.

    Args:
        t: an array.
        s: a scalar (Python number or 0-d array, possibly traced).

    Returns:
        ``t * s`` in ``t``'s dtype.

    Raises:
        DimensionError: when ``s`` is not a scalar.

    Example:
        >>> scale(vector([1.0, 2.0]), 3.0).tolist()
        [3.0, 6.0]
    """
    t = _array(t, "t")
    t_, s_ = _promoted(t, _scalar(s, "s"))
    return (t_ * s_).astype(t.dtype)


def add_scalar(t: jax.Array, s: Any) -> jax.Array:
    """Add the scalar ``s`` to every element; the result keeps ``t``'s dtype.

    Args:
        t: an array.
        s: a scalar (Python number or 0-d array, possibly traced).

    Returns:
        ``t + s`` in ``t``'s dtype.

    Raises:
        DimensionError: when ``s`` is not a scalar.

    Example:
        >>> add_scalar(vector([1.0, 2.0]), 0.5).tolist()
        [1.5, 2.5]
    """
    t = _array(t, "t")
    t_, s_ = _promoted(t, _scalar(s, "s"))
    return (t_ + s_).astype(t.dtype)


def negate(t: jax.Array) -> jax.Array:
    """Element-wise ``-t``.

    Args:
        t: an array.

    Returns:
        ``-t``.

    Raises:
        DTypeError: when ``t`` is not an array, or is bool (use ``~t``).

    Example:
        >>> negate(vector([1.0, -2.0])).tolist()
        [-1.0, 2.0]
    """
    t = _array(t, "t")
    _not_bool(t, "t", "negation")
    return -t


def _numeric_fn(f: Any, argument: str) -> Callable:
    """``f`` wrapped so that a non-numeric result (a str, None, a list ...) raises DTypeError when traced."""
    if not callable(f):
        raise InvalidOp(argument=argument, expected="a function", got=f"a {type(f).__name__}")

    def checked(*args):
        y = f(*args)
        if isinstance(y, (jax.Array, np.ndarray, np.generic, int, float, complex)):
            return y
        raise DTypeError(argument=argument, expected="a function returning a number (a 0-d array)",
                         got=f"a {type(y).__name__} ({repr(y)[:40]})")

    return checked


def _check_elementwise(out: Any, n: int, argument: str) -> jax.Array:
    out = jnp.asarray(out)
    if out.shape != (n,):
        raise ShapeMismatch(
            argument=argument, expected="a function returning one scalar per element",
            got=f"per-element output of shape {out.shape[1:]}",
        )
    return out


def map(t: jax.Array, f: Callable[[jax.Array], Any]) -> jax.Array:  # noqa: A001 - the Gleam name
    """Apply ``f`` to every element (Gleam ``map``): ``f`` receives a 0-d array and returns a scalar.

    ``f`` is vectorised with ``jax.vmap``, so any function written with ``jnp`` operations works and is
    applied truly element by element; XLA compiles it to one element-wise kernel.

    Args:
        t: an array.
        f: a function from a 0-d array to a scalar (``jnp.exp``, ``lambda x: x * x + 1`` ...).

    Returns:
        An array of ``t``'s shape, with the dtype ``f`` returns.

    Raises:
        ShapeMismatch: when ``f`` does not return a scalar.
        DTypeError: when ``f`` returns something that is not a number (a str, None ...).
        InvalidOp: when ``f`` is not callable.

    Example:
        >>> map(vector([1.0, 2.0, 3.0]), lambda x: x * x).tolist()
        [1.0, 4.0, 9.0]
    """
    t = _array(t, "t")
    out = jax.vmap(_numeric_fn(f, "f"))(jnp.ravel(t))
    return _check_elementwise(out, t.size, "f").reshape(t.shape)


def map_indexed(t: jax.Array, f: Callable[[jax.Array, jax.Array], Any]) -> jax.Array:
    """Apply ``f(value, index)`` to every element, as Gleam's ``map_indexed`` (value first).

    ``index`` is the element's flat row-major position, a 0-d ``int32`` array (cast it to mix it with float
    values under ``jax_numpy_dtype_promotion="strict"``: ``x + i.astype(x.dtype)``).

    Args:
        t: an array.
        f: a function of a 0-d value and a 0-d int32 index returning a scalar.

    Returns:
        An array of ``t``'s shape.

    Raises:
        ShapeMismatch: when ``f`` does not return a scalar.
        DTypeError: when ``f`` returns something that is not a number (a str, None ...).
        InvalidOp: when ``f`` is not callable.

    Example:
        >>> map_indexed(vector([10.0, 20.0, 30.0]), lambda x, i: x + i.astype(x.dtype)).tolist()
        [10.0, 21.0, 32.0]
    """
    t = _array(t, "t")
    out = jax.vmap(_numeric_fn(f, "f"))(jnp.ravel(t), jnp.arange(t.size, dtype=jnp.int32))
    return _check_elementwise(out, t.size, "f").reshape(t.shape)


# --------------------------------------------------------------------------------------------------
# reductions
# --------------------------------------------------------------------------------------------------


def sum(t: jax.Array) -> jax.Array:  # noqa: A001 - the Gleam name
    """The sum of all elements (0 for an empty array), accumulated in float32 for bf16/f16.

    Integers accumulate as ``jnp.sum`` does: bool, int8 and int16 in int32, uint8 and uint16 in uint32.

    Args:
        t: an array.

    Returns:
        A 0-d array of ``t``'s dtype (int32 or uint32 for narrower integers and bool).

    Raises:
        DTypeError: when ``t`` is not an array.

    Example:
        >>> sum(matrix(2, 2, [1.0, 2.0, 3.0, 4.0])).tolist()
        10.0
    """
    t = _array(t, "t")
    return jnp.sum(t, dtype=_acc(t.dtype)).astype(_sum_out(t.dtype))


def product(t: jax.Array) -> jax.Array:
    """The product of all elements (1 for an empty array), accumulated in float32 for bf16/f16.

    Args:
        t: an array.

    Returns:
        A 0-d array of ``t``'s dtype (int32 or uint32 for narrower integers and bool, as ``jnp.prod``).

    Raises:
        DTypeError: when ``t`` is not an array.

    Example:
        >>> product(vector([2.0, 3.0, 4.0])).tolist()
        24.0
    """
    t = _array(t, "t")
    return jnp.prod(t, dtype=_acc(t.dtype)).astype(_sum_out(t.dtype))


def mean(t: jax.Array) -> jax.Array:
    """The mean of all elements, accumulated in float32 for bf16/f16.

    Args:
        t: a non-empty array.

    Returns:
        A 0-d array of ``t``'s dtype (float32 for integer input).

    Raises:
        InvalidShape: when ``t`` is empty.

    Example:
        >>> mean(vector([1.0, 2.0, 6.0])).tolist()
        3.0
    """
    t = _array(t, "t")
    _nonempty(t, "t", "mean")
    out = _float_out(t.dtype)
    return jnp.mean(t, dtype=_acc(out)).astype(out)


def max(t: jax.Array) -> jax.Array:  # noqa: A001 - the Gleam name
    """The largest element (NaN if any element is NaN).

    Args:
        t: a non-empty array.

    Returns:
        A 0-d array of ``t``'s dtype.

    Raises:
        InvalidShape: when ``t`` is empty.
        DTypeError: for complex input (it has no order).

    Example:
        >>> max(vector([1.0, 5.0, 3.0])).tolist()
        5.0
    """
    t = _array(t, "t")
    _nonempty(t, "t", "max")
    _ordered(t, "t", "max")
    return jnp.max(t)


def min(t: jax.Array) -> jax.Array:  # noqa: A001 - the Gleam name
    """The smallest element (NaN if any element is NaN).

    Args:
        t: a non-empty array.

    Returns:
        A 0-d array of ``t``'s dtype.

    Raises:
        InvalidShape: when ``t`` is empty.
        DTypeError: for complex input (it has no order).

    Example:
        >>> min(vector([1.0, 5.0, -3.0])).tolist()
        -3.0
    """
    t = _array(t, "t")
    _nonempty(t, "t", "min")
    _ordered(t, "t", "min")
    return jnp.min(t)


def argmax(t: jax.Array) -> jax.Array:
    """The flat index of the largest element (the first one on ties, as in Gleam).

    Args:
        t: a non-empty array.

    Returns:
        A 0-d int32 array.

    Raises:
        InvalidShape: when ``t`` is empty.
        DTypeError: for complex input (it has no order).

    Example:
        >>> argmax(vector([1.0, 5.0, 5.0])).tolist()
        1
    """
    t = _array(t, "t")
    _nonempty(t, "t", "argmax")
    _ordered(t, "t", "argmax")
    return jnp.argmax(jnp.ravel(t)).astype(jnp.int32)


def argmin(t: jax.Array) -> jax.Array:
    """The flat index of the smallest element (the first one on ties).

    Args:
        t: a non-empty array.

    Returns:
        A 0-d int32 array.

    Raises:
        InvalidShape: when ``t`` is empty.
        DTypeError: for complex input (it has no order).

    Example:
        >>> argmin(vector([4.0, 1.0, 1.0])).tolist()
        1
    """
    t = _array(t, "t")
    _nonempty(t, "t", "argmin")
    _ordered(t, "t", "argmin")
    return jnp.argmin(jnp.ravel(t)).astype(jnp.int32)


def variance(t: jax.Array) -> jax.Array:
    """The population variance (divides by ``n``, as Gleam), computed in float32 for bf16/f16.

    Args:
        t: a non-empty array.

    Returns:
        A 0-d array of ``t``'s dtype (float32 for integer and complex64 input: ``|x - mean|**2`` is
        averaged, scaled by its largest term so that it neither overflows nor underflows early).

    Raises:
        InvalidShape: when ``t`` is empty.

    Example:
        >>> variance(vector([1.0, 3.0])).tolist()
        1.0
    """
    t = _array(t, "t")
    _nonempty(t, "t", "variance")
    x = t.astype(_acc(_float_out(t.dtype)))
    d, e = _scaled(x - jnp.mean(x))  # a power of two: rounds as the plain mean of squares, without overflow
    a = _mag(d)
    return _restore(_restore(jnp.mean(a * a), e), e).astype(_real_out(t.dtype))


def std(t: jax.Array) -> jax.Array:
    """The population standard deviation: ``sqrt(variance(t))``.

    Args:
        t: a non-empty array.

    Returns:
        A 0-d array of ``t``'s dtype (float32 for integer and complex64 input: ``|x - mean|**2`` is
        averaged, scaled by its largest term so that it neither overflows nor underflows early).

    Raises:
        InvalidShape: when ``t`` is empty.

    Example:
        >>> std(vector([1.0, 5.0])).tolist()
        2.0
    """
    t = _array(t, "t")
    _nonempty(t, "t", "std")
    x = t.astype(_acc(_float_out(t.dtype)))
    return _l2(x - jnp.mean(x)).astype(_real_out(t.dtype))


def sum_axis(t: jax.Array, axis: int, *, keepdims: bool = False) -> jax.Array:
    """Sum along one axis, which disappears (kept as size 1 with ``keepdims=True``).

    Unlike Gleam, the sum of a vector along axis 0 has shape ``()`` (Gleam wrapped it as ``[1]``).

    Args:
        t: an array of rank >= 1.
        axis: the axis to reduce (negative counts from the end).
        keepdims: keep the reduced axis with size 1 (keyword-only).

    Returns:
        An array of ``t``'s dtype, accumulated in float32 for bf16/f16 (int32 or uint32 for narrower
        integers and bool, as :func:`sum`).

    Raises:
        DimensionError: when ``axis`` is out of range (a 0-d array has no axis).

    Example:
        >>> sum_axis(matrix(2, 3, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), 1).tolist()
        [6.0, 15.0]
    """
    t = _array(t, "t")
    ax = _axis(axis, t.ndim)
    return jnp.sum(t, axis=ax, dtype=_acc(t.dtype), keepdims=keepdims).astype(_sum_out(t.dtype))


def mean_axis(t: jax.Array, axis: int, *, keepdims: bool = False) -> jax.Array:
    """Mean along one axis, which disappears (kept as size 1 with ``keepdims=True``).

    Args:
        t: an array of rank >= 1.
        axis: the axis to reduce (negative counts from the end); it must not be empty.
        keepdims: keep the reduced axis with size 1 (keyword-only).

    Returns:
        An array of ``t``'s dtype (float32 for integer input), accumulated in float32 for bf16/f16.

    Raises:
        DimensionError: when ``axis`` is out of range.
        InvalidShape: when the axis has size 0.

    Example:
        >>> mean_axis(matrix(2, 2, [1.0, 2.0, 3.0, 4.0]), 0).tolist()
        [2.0, 3.0]
    """
    t = _array(t, "t")
    ax = _axis(axis, t.ndim)
    if t.shape[ax] == 0:
        raise InvalidShape(argument="axis", expected="a non-empty axis (mean of nothing is undefined)",
                           got=f"axis {axis} of size 0 in shape {t.shape}")
    out = _float_out(t.dtype)
    return jnp.mean(t, axis=ax, dtype=_acc(out), keepdims=keepdims).astype(out)


# --------------------------------------------------------------------------------------------------
# linear algebra
# --------------------------------------------------------------------------------------------------


def _inner(a: jax.Array, b: jax.Array, ka: int, kb: int, what: str) -> None:
    if a.shape[ka] != b.shape[kb]:
        raise ShapeMismatch(
            argument="b",
            expected=f"{what} of size {a.shape[ka]} (from 'a' of shape {a.shape})",
            got=f"shape {b.shape}",
        )


def _contract(a: jax.Array, b: jax.Array, dims, precision) -> jax.Array:
    with jax.numpy_dtype_promotion("standard"):  # the documented promotion, also under "strict"
        out = jnp.result_type(a.dtype, b.dtype)
    acc = _acc(out)
    if not jnp.issubdtype(out, jnp.inexact):  # integers (and bool) are multiplied and summed in int32/uint32
        a, b = a.astype(acc), b.astype(acc)
    else:  # one dtype on both sides (a bool operand would otherwise turn False * nan into 0)
        a, b = a.astype(out), b.astype(out)
    r = lax.dot_general(a, b, (dims, ((), ())), precision=precision, preferred_element_type=acc)
    return r.astype(_sum_out(out))


def dot(a: jax.Array, b: jax.Array, *, precision=None) -> jax.Array:
    """The dot product of two vectors of equal length, accumulated in float32 for bf16/f16.

    Args:
        a: a vector.
        b: a vector of the same length.
        precision: passed to ``lax.dot_general`` (keyword-only). ``None`` is JAX's default, which on
            GPU/TPU may compute float32 products in TF32/bfloat16 passes; ``lax.Precision.HIGHEST`` asks
            for full float32.

    Returns:
        A 0-d array of the operands' promoted dtype; integers and bool are multiplied and summed in int32
        (uint32 for unsigned) and returned so: ``dot`` of int8 ``[100, 100]`` with itself is 20000.

    Raises:
        DimensionError: when ``a`` or ``b`` is not a vector.
        ShapeMismatch: when the lengths differ.

    Example:
        >>> dot(vector([1.0, 2.0]), vector([3.0, 4.0])).tolist()
        11.0
    """
    a, b = _array(a, "a"), _array(b, "b")
    _rank(a, 1, "a", "a vector")
    _rank(b, 1, "b", "a vector")
    _inner(a, b, 0, 0, "a vector")
    return _contract(a, b, ((0,), (0,)), precision)


def matmul_vec(m: jax.Array, v: jax.Array, *, precision=None) -> jax.Array:
    """Matrix-vector product ``m @ v``: ``(r, n) @ (n,) -> (r,)``.

    Args:
        m: a matrix of shape ``(r, n)``.
        v: a vector of length ``n``.
        precision: passed to ``lax.dot_general`` (keyword-only). ``None`` is JAX's default, which on
            GPU/TPU may compute float32 products in TF32/bfloat16 passes; ``lax.Precision.HIGHEST`` asks
            for full float32.

    Returns:
        A vector of length ``r``, accumulated in float32 for bf16/f16 (integers: int32/uint32, as :func:`dot`).

    Raises:
        DimensionError: when ``m`` is not a matrix or ``v`` not a vector.
        ShapeMismatch: when ``len(v) != n``.

    Example:
        >>> matmul_vec(matrix(2, 2, [1.0, 2.0, 3.0, 4.0]), vector([1.0, 1.0])).tolist()
        [3.0, 7.0]
    """
    m, v = _array(m, "m"), _array(v, "v")
    _rank(m, 2, "m", "a matrix")
    _rank(v, 1, "v", "a vector")
    if m.shape[1] != v.shape[0]:
        raise ShapeMismatch(argument="v", expected=f"a vector of length {m.shape[1]} (the columns of 'm' "
                            f"of shape {m.shape})", got=f"shape {v.shape}")
    return _contract(m, v, ((1,), (0,)), precision)


def matmul(a: jax.Array, b: jax.Array, *, precision=None) -> jax.Array:
    """Matrix product ``a @ b``: ``(m, k) @ (k, n) -> (m, n)``, accumulated in float32 for bf16/f16.

    Both operands must be matrices, as in Gleam (map over a batch with ``jax.vmap``).

    Args:
        a: a matrix of shape ``(m, k)``.
        b: a matrix of shape ``(k, n)``.
        precision: passed to ``lax.dot_general`` (keyword-only). ``None`` is JAX's default, which on
            GPU/TPU may compute float32 products in TF32/bfloat16 passes; ``lax.Precision.HIGHEST`` asks
            for full float32.

    Returns:
        A matrix of shape ``(m, n)`` of the operands' promoted dtype; integers and bool are accumulated and
        returned in int32 (uint32 for unsigned), as :func:`dot`.

    Raises:
        DimensionError: when ``a`` or ``b`` is not rank 2.
        ShapeMismatch: when the inner sizes differ.

    Example:
        >>> matmul(matrix(1, 2, [1.0, 2.0]), matrix(2, 1, [3.0, 4.0])).tolist()
        [[11.0]]
    """
    a, b = _array(a, "a"), _array(b, "b")
    _rank(a, 2, "a", "a matrix")
    _rank(b, 2, "b", "a matrix")
    _inner(a, b, 1, 0, "a first axis")
    return _contract(a, b, ((1,), (0,)), precision)


def transpose(t: jax.Array) -> jax.Array:
    """The transpose of a matrix (free under ``jit``: XLA folds it into the consumer).

    Args:
        t: a rank-2 array.

    Returns:
        ``t.T``.

    Raises:
        DimensionError: when ``t`` is not rank 2.

    Example:
        >>> transpose(matrix(1, 2, [1.0, 2.0])).tolist()
        [[1.0], [2.0]]
    """
    t = _array(t, "t")
    _rank(t, 2, "t", "a matrix; use jnp.transpose with axes for other ranks")
    return t.T


def outer(a: jax.Array, b: jax.Array) -> jax.Array:
    """The outer product of two vectors: ``(m,) x (n,) -> (m, n)``.

    Args:
        a: a vector.
        b: a vector.

    Returns:
        The matrix ``a[i] * b[j]``, element-wise products in the promoted dtype as :func:`mul` and
        ``numpy.outer`` (integers wrap on overflow; nothing is accumulated).

    Raises:
        DimensionError: when ``a`` or ``b`` is not a vector.

    Example:
        >>> outer(vector([1.0, 2.0]), vector([3.0, 4.0])).tolist()
        [[3.0, 4.0], [6.0, 8.0]]
    """
    a, b = _array(a, "a"), _array(b, "b")
    _rank(a, 1, "a", "a vector")
    _rank(b, 1, "b", "a vector")
    return _times(a[:, None], b[None, :])


# --------------------------------------------------------------------------------------------------
# shape
# --------------------------------------------------------------------------------------------------


def reshape(t: jax.Array, shape: Sequence[int] | int) -> jax.Array:  # noqa: A002 - shadows shape()
    """The same elements in a new shape (row-major); one size may be -1 and is then inferred.

    Args:
        t: an array.
        shape: the new static shape, with the same number of elements.

    Returns:
        ``t`` reshaped (no copy under ``jit``).

    Raises:
        InvalidShape: when the sizes differ, or for a bad shape.

    Example:
        >>> reshape(vector([1.0, 2.0, 3.0, 4.0]), (2, -1)).tolist()
        [[1.0, 2.0], [3.0, 4.0]]
    """
    t = _array(t, "t")
    new = (shape,) if _is_int(shape) else shape
    if isinstance(new, (tuple, list)) and builtins.sum(1 for d in new if _is_int(d) and d == -1) == 1:
        known = [d for d in new if not (_is_int(d) and d == -1)]
        known = _shape(known)
        rest = math.prod(known)
        if rest == 0 or t.size % rest:
            raise InvalidShape(argument="shape", expected=f"a shape whose -1 fits {t.size} elements",
                               got=tuple(new))
        new = tuple(t.size // rest if (_is_int(d) and d == -1) else d for d in new)
    new = _shape(new)
    if math.prod(new) != t.size:
        raise InvalidShape(
            argument="shape",
            expected=f"{t.size} elements (the size of 't' of shape {t.shape})",
            got=f"{new} with {math.prod(new)} elements",
        )
    return jnp.reshape(t, new)


def flatten(t: jax.Array) -> jax.Array:
    """All elements as a vector, in row-major order.

    Args:
        t: an array.

    Returns:
        A vector of length ``size(t)``.

    Raises:
        DTypeError: when ``t`` is not an array.

    Example:
        >>> flatten(matrix(2, 2, [1.0, 2.0, 3.0, 4.0])).tolist()
        [1.0, 2.0, 3.0, 4.0]
    """
    return jnp.ravel(_array(t, "t"))


def concat(tensors: Sequence[jax.Array]) -> jax.Array:
    """Join arrays along axis 0.

    For vectors this is Gleam's ``concat``. Gleam flattened matrices before joining; here matrices are
    joined along their first axis (a flattened join is ``concat([flatten(t) for t in tensors])``).

    Args:
        tensors: a non-empty list of arrays of rank >= 1 that agree on every axis but the first.

    Returns:
        The joined array.

    Raises:
        InvalidShape: for an empty list.
        DimensionError: for 0-d arrays.
        ShapeMismatch: when the other axes differ.

    Example:
        >>> concat([vector([1.0]), vector([2.0, 3.0])]).tolist()
        [1.0, 2.0, 3.0]
    """
    return concat_axis(tensors, 0)


def concat_axis(tensors: Sequence[jax.Array], axis: int) -> jax.Array:
    """Join arrays along an existing axis.

    Args:
        tensors: a non-empty list of arrays of equal rank that agree on every other axis.
        axis: the axis to join along (negative counts from the end).

    Returns:
        The joined array.

    Raises:
        InvalidShape: for an empty list.
        DimensionError: for a rank mismatch, 0-d arrays or an axis out of range.
        ShapeMismatch: when the other axes differ.

    Example:
        >>> concat_axis([ones((2, 1)), zeros((2, 1))], 1).tolist()
        [[1.0, 0.0], [1.0, 0.0]]
    """
    ts = _list_of_arrays(tensors, "tensors")
    first = ts[0]
    if first.ndim == 0:
        raise DimensionError(argument="tensors[0]", expected="an array of rank >= 1", got="a 0-d array",
                             hint="stack scalars instead.")
    ax = _axis(axis, first.ndim)
    for k, t in enumerate(ts[1:], 1):
        if t.ndim != first.ndim:
            raise DimensionError(argument=f"tensors[{k}]", expected=f"rank {first.ndim} (the rank of tensors[0])",
                                 got=f"shape {t.shape}")
        if t.shape[:ax] + t.shape[ax + 1:] != first.shape[:ax] + first.shape[ax + 1:]:
            raise ShapeMismatch(argument=f"tensors[{k}]",
                                expected=f"shape {first.shape} except on axis {ax} (the shape of tensors[0])",
                                got=t.shape)
    return jnp.concatenate(ts, axis=ax)


def stack(tensors: Sequence[jax.Array], axis: int = 0) -> jax.Array:
    """Stack arrays of equal shape along a new axis.

    Args:
        tensors: a non-empty list of arrays of the same shape.
        axis: where the new axis goes, in ``[-(rank+1), rank]``.

    Returns:
        An array of rank ``rank + 1``.

    Raises:
        InvalidShape: for an empty list.
        ShapeMismatch: when the shapes differ.
        DimensionError: when ``axis`` is out of range.

    Example:
        >>> stack([vector([1.0, 2.0]), vector([3.0, 4.0])], 1).tolist()
        [[1.0, 3.0], [2.0, 4.0]]
    """
    ts = _list_of_arrays(tensors, "tensors")
    for k, t in enumerate(ts[1:], 1):
        if t.shape != ts[0].shape:
            raise ShapeMismatch(argument=f"tensors[{k}]", expected=f"shape {ts[0].shape} (the shape of tensors[0])",
                                got=t.shape)
    return jnp.stack(ts, axis=_axis(axis, ts[0].ndim + 1))


def slice(t: jax.Array, start: Sequence[Any], lengths: Sequence[int]) -> jax.Array:  # noqa: A001
    """The block of ``t`` that begins at ``start`` and has shape ``lengths`` (Gleam ``slice``).

    ``lengths`` is static. With Python int starts the block must lie inside ``t`` (Gleam padded with
    zeros silently); traced starts are allowed (``lax.dynamic_slice``) and are then clamped by JAX so
    that the block stays inside ``t``.

    Args:
        t: an array.
        start: one start index per axis (ints, or 0-d integer arrays).
        lengths: one non-negative length per axis.

    Returns:
        An array of shape ``tuple(lengths)``.

    Raises:
        DimensionError: when ``start`` or ``lengths`` does not have one entry per axis, or a static block
            goes past the end of an axis or starts below 0.
        InvalidShape: for a negative length.

    Example:
        >>> slice(vector([0.0, 1.0, 2.0, 3.0, 4.0]), [1], [3]).tolist()
        [1.0, 2.0, 3.0]
    """
    t = _array(t, "t")
    lengths = _shape(lengths, "lengths")
    start = tuple(start) if isinstance(start, (list, tuple)) else (start,)
    for name, seq in (("start", start), ("lengths", lengths)):
        if len(seq) != t.ndim:
            raise DimensionError(argument=name, expected=f"{t.ndim} entries (one per axis of shape {t.shape})",
                                 got=f"{len(seq)} entries")
    for ax, (s, n, d) in enumerate(zip(start, lengths, t.shape, strict=False)):
        if n > d:
            raise DimensionError(argument="lengths", expected=f"at most {d} on axis {ax}", got=n)
        if _is_int(s) and not 0 <= s <= d - n:
            raise DimensionError(argument="start", expected=f"a start in [0, {d - n}] on axis {ax} "
                                 f"(size {d}, length {n})", got=int(s))
    if builtins.all(_is_int(s) for s in start):
        ends = tuple(int(s) + n for s, n in zip(start, lengths, strict=True))
        return lax.slice(t, tuple(int(s) for s in start), ends)
    starts = [s if _is_int(s) else _index(s, builtins.max(d, 1), "start") for s, d in zip(start, t.shape, strict=True)]
    return lax.dynamic_slice(t, starts, lengths)


def _take_n(t: jax.Array, n: int) -> int:
    if t.ndim == 0:
        raise DimensionError(argument="t", expected="an array of rank >= 1", got="a 0-d array")
    if not _is_int(n) or n < 0:
        raise InvalidShape(argument="n", expected="a non-negative int", got=repr(n))
    return builtins.min(int(n), t.shape[0])


def take_first(t: jax.Array, n: int) -> jax.Array:
    """The first ``n`` entries along axis 0 (all of them when ``n`` exceeds the size, as in Gleam).

    Args:
        t: an array of rank >= 1.
        n: how many to keep, a non-negative int.

    Returns:
        ``t[:n]``.

    Raises:
        DimensionError: when ``t`` is 0-d.
        InvalidShape: when ``n`` is negative or not an int.

    Example:
        >>> take_first(vector([1.0, 2.0, 3.0]), 2).tolist()
        [1.0, 2.0]
    """
    t = _array(t, "t")
    return t[: _take_n(t, n)]


def take_last(t: jax.Array, n: int) -> jax.Array:
    """The last ``n`` entries along axis 0 (all of them when ``n`` exceeds the size, as in Gleam).

    Args:
        t: an array of rank >= 1.
        n: how many to keep, a non-negative int.

    Returns:
        ``t[len(t) - n:]``.

    Raises:
        DimensionError: when ``t`` is 0-d.
        InvalidShape: when ``n`` is negative or not an int.

    Example:
        >>> take_last(vector([1.0, 2.0, 3.0]), 2).tolist()
        [2.0, 3.0]
    """
    t = _array(t, "t")
    k = _take_n(t, n)
    return t[t.shape[0] - k:]


def squeeze(t: jax.Array) -> jax.Array:
    """Remove every axis of size 1.

    All-ones shapes give a 0-d array, as in NumPy (Gleam, which had no scalars, gave shape ``[1]``).

    Args:
        t: an array.

    Returns:
        ``t`` without its size-1 axes.

    Raises:
        DTypeError: when ``t`` is not an array.

    Example:
        >>> squeeze(zeros((1, 3, 1))).shape
        (3,)
    """
    return jnp.squeeze(_array(t, "t"))


def squeeze_axis(t: jax.Array, axis: int) -> jax.Array:
    """Remove one axis, which must have size 1.

    Args:
        t: an array.
        axis: the axis (negative counts from the end).

    Returns:
        ``t`` with that axis removed.

    Raises:
        DimensionError: when ``axis`` is out of range.
        InvalidShape: when the axis does not have size 1.

    Example:
        >>> squeeze_axis(zeros((2, 1)), 1).shape
        (2,)
    """
    t = _array(t, "t")
    ax = _axis(axis, t.ndim)
    if t.shape[ax] != 1:
        raise InvalidShape(argument="axis", expected="an axis of size 1", got=f"axis {axis} of size "
                           f"{t.shape[ax]} in shape {t.shape}")
    return jnp.squeeze(t, axis=ax)


def unsqueeze(t: jax.Array, axis: int) -> jax.Array:
    """Insert an axis of size 1 at position ``axis`` of the result.

    Args:
        t: an array.
        axis: the position in ``[-(rank+1), rank]`` (-1 appends).

    Returns:
        An array of rank ``rank + 1``.

    Raises:
        DimensionError: when ``axis`` is out of range.

    Example:
        >>> unsqueeze(zeros(3), 0).shape, unsqueeze(zeros(3), -1).shape
        ((1, 3), (3, 1))
    """
    t = _array(t, "t")
    return jnp.expand_dims(t, _axis(axis, t.ndim + 1))


def expand_dims(t: jax.Array, axis: int) -> jax.Array:
    """Insert an axis of size 1: the same as :func:`unsqueeze` (both names are Gleam's).

    Args:
        t: an array.
        axis: the position in ``[-(rank+1), rank]``.

    Returns:
        An array of rank ``rank + 1``.

    Raises:
        DimensionError: when ``axis`` is out of range.

    Example:
        >>> expand_dims(zeros((2, 3)), 1).shape
        (2, 1, 3)
    """
    return unsqueeze(t, axis)


# --------------------------------------------------------------------------------------------------
# utilities
# --------------------------------------------------------------------------------------------------


def norm(t: jax.Array) -> jax.Array:
    """The L2 (Frobenius) norm of all elements, computed in float32 for bf16/f16; 0 for empty input.

    The sum of squares is scaled by the largest magnitude, so the norm of ``[2e19, 2e19]`` is finite and that
    of ``[1e-30, 1e-30]`` is not 0, as in exact arithmetic. Complex input gives ``sqrt(sum |x|**2)``.

    Args:
        t: an array.

    Returns:
        A 0-d array of ``t``'s dtype (float32 for integer and complex64 input).

    Raises:
        DTypeError: when ``t`` is not an array.

    Example:
        >>> norm(vector([3.0, 4.0])).tolist()
        5.0
    """
    t = _array(t, "t")
    return _l2(t.astype(_acc(_float_out(t.dtype))), jnp.sum).astype(_real_out(t.dtype))


def normalize(t: jax.Array, *, eps: float = 1e-4) -> jax.Array:
    """``t`` divided by its L2 norm; returned unchanged when the norm is at most ``eps`` (Gleam's rule).

    Args:
        t: an array.
        eps: below or at this norm the input is returned as is (keyword-only; Gleam used 1e-4).

    Returns:
        An array of ``t``'s shape and dtype (float32 for integer input) with norm 1, or ``t``. The norm is
        computed as :func:`norm` (scaled), so huge and tiny inputs normalize too.

    Raises:
        DTypeError: when ``t`` is not an array.

    Example:
        >>> normalize(vector([3.0, 4.0])).tolist()
        [0.6000000238418579, 0.800000011920929]
    """
    t = _array(t, "t")
    out = _float_out(t.dtype)
    x = t.astype(_acc(out))
    xs, e = _scaled(x)
    a = jnp.abs(xs)
    r = jnp.sqrt(jnp.sum(a * a))
    big = _restore(r, e) > eps
    return jnp.where(big, xs / jnp.where(big, r, 1.0), x).astype(out)


def clamp(t: jax.Array, lo: Any, hi: Any) -> jax.Array:
    """Limit every element to ``[lo, hi]``; the result keeps ``t``'s dtype. NaN stays NaN.

    Args:
        t: an array.
        lo: the lower bound (a scalar).
        hi: the upper bound (a scalar, at least ``lo`` when both are Python numbers).

    Returns:
        ``min(max(t, lo), hi)``.

    Raises:
        InvalidOp: when Python-number bounds have ``lo > hi``.
        DimensionError: when a bound is not a scalar.
        DTypeError: for complex ``t`` (it has no order).

    Example:
        >>> clamp(vector([-2.0, 0.5, 2.0]), -1.0, 1.0).tolist()
        [-1.0, 0.5, 1.0]
    """
    t = _array(t, "t")
    _ordered(t, "t", "clamp")
    lo, hi = _scalar(lo, "lo"), _scalar(hi, "hi")
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo > hi:
        raise InvalidOp(argument="hi", expected=f"a bound >= lo = {lo}", got=hi)
    if jnp.issubdtype(t.dtype, jnp.integer):  # a Python int beyond the dtype's range does not bind (nor overflow)
        info = jnp.iinfo(t.dtype)
        lo, hi = (jnp.asarray(builtins.min(builtins.max(b, int(info.min)), int(info.max)), t.dtype) if _is_int(b)
                  else b for b in (lo, hi))
    t_, lo, hi = _promoted(t, lo, hi)
    return jnp.minimum(jnp.maximum(t_, lo), hi).astype(t.dtype)


# --------------------------------------------------------------------------------------------------
# broadcasting
# --------------------------------------------------------------------------------------------------


def can_broadcast(a_shape: Sequence[int], b_shape: Sequence[int]) -> bool:
    """Whether two shapes broadcast together under NumPy's rules (aligned at the right, 1 stretches).

    Args:
        a_shape: a shape.
        b_shape: another shape.

    Returns:
        ``True`` when :func:`broadcast_shape` would succeed.

    Raises:
        InvalidShape: when a shape is not a sequence of non-negative ints.

    Example:
        >>> can_broadcast((2, 1, 3), (4, 1)), can_broadcast((2, 3), (3, 2))
        (True, False)
    """
    a, b = _shape(a_shape, "a_shape"), _shape(b_shape, "b_shape")
    return builtins.all(x == y or x == 1 or y == 1 for x, y in zip(reversed(a), reversed(b), strict=False))


def broadcast_shape(a_shape: Sequence[int], b_shape: Sequence[int]) -> Shape:
    """The shape two shapes broadcast to under NumPy's rules.

    Args:
        a_shape: a shape.
        b_shape: another shape.

    Returns:
        The broadcast shape, a tuple.

    Raises:
        BroadcastError: when the shapes do not broadcast.
        InvalidShape: when a shape is not a sequence of non-negative ints.

    Example:
        >>> broadcast_shape((2, 1, 3), (4, 1))
        (2, 4, 3)
    """
    a, b = _shape(a_shape, "a_shape"), _shape(b_shape, "b_shape")
    if not can_broadcast(a, b):
        raise BroadcastError(argument="b_shape", expected=f"a shape that broadcasts with {a}", got=b,
                             hint="sizes aligned from the right must be equal or 1.")
    n = builtins.max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    return tuple(x if y == 1 else y for x, y in zip(a, b, strict=False))


def broadcast_to(t: jax.Array, shape: Sequence[int]) -> jax.Array:  # noqa: A002
    """Broadcast ``t`` to ``shape`` (one-directional: ``broadcast_shape(t.shape, shape) == shape``).

    Gleam only checked that the two shapes broadcast together, so ``(2, 3)`` "broadcast to" ``(3,)``
    produced garbage; here the target must contain ``t``'s shape.

    Args:
        t: an array.
        shape: the target shape.

    Returns:
        An array of ``shape`` (free under ``jit``).

    Raises:
        BroadcastError: when ``t`` cannot be broadcast to ``shape``.

    Example:
        >>> broadcast_to(vector([1.0, 2.0]), (2, 2)).tolist()
        [[1.0, 2.0], [1.0, 2.0]]
    """
    t = _array(t, "t")
    target = _shape(shape)
    if not can_broadcast(t.shape, target) or broadcast_shape(t.shape, target) != target:
        raise BroadcastError(argument="shape", expected=f"a shape that {t.shape} broadcasts to", got=target,
                             hint="sizes aligned from the right must be equal, or 1 in 't'.")
    return jnp.broadcast_to(t, _fits(target, t.dtype))


def _broadcast_pair(a: Any, b: Any) -> tuple[jax.Array, jax.Array]:
    a, b = _array(a, "a"), _array(b, "b")
    if not can_broadcast(a.shape, b.shape):
        raise BroadcastError(argument="b", expected=f"a shape that broadcasts with {a.shape} (the shape of 'a')",
                             got=b.shape, hint="sizes aligned from the right must be equal or 1.")
    out = broadcast_shape(a.shape, b.shape)
    return jnp.broadcast_to(a, out), jnp.broadcast_to(b, out)


def add_broadcast(a: jax.Array, b: jax.Array) -> jax.Array:
    """Element-wise ``a + b`` with NumPy broadcasting.

    Args:
        a: an array.
        b: an array whose shape broadcasts with ``a``'s.

    Returns:
        ``a + b`` of shape ``broadcast_shape(a.shape, b.shape)``.

    Raises:
        BroadcastError: when the shapes do not broadcast.

    Example:
        >>> add_broadcast(zeros((2, 2)), vector([1.0, 2.0])).tolist()
        [[1.0, 2.0], [1.0, 2.0]]
    """
    a, b = _promoted(*_broadcast_pair(a, b))
    return a + b


def mul_broadcast(a: jax.Array, b: jax.Array) -> jax.Array:
    """Element-wise ``a * b`` with NumPy broadcasting.

    Args:
        a: an array.
        b: an array whose shape broadcasts with ``a``'s.

    Returns:
        ``a * b`` of shape ``broadcast_shape(a.shape, b.shape)``.

    Raises:
        BroadcastError: when the shapes do not broadcast.

    Example:
        >>> mul_broadcast(ones((2, 2)), from_list2d([[2.0], [3.0]])).tolist()
        [[2.0, 2.0], [3.0, 3.0]]
    """
    a, b = _broadcast_pair(a, b)
    return _times(a, b)
