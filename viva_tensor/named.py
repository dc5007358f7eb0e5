"""Named tensors: arrays whose axes are addressed by name, not by position.

A :class:`NamedTensor` is a frozen pytree that holds ``data`` (a ``jax.Array``, its only child) and the
axis ``names`` (strings, ``None`` for an anonymous axis) as static data. Sizes are always read from the
data, so a NamedTensor passes through ``jit``, ``grad``, ``vmap``, ``lax.scan`` and ``shard_map`` (where it
sees its local block) with the right sizes.

The ``names`` name the *trailing* axes of ``data``: ``vmap`` (or ``lax.scan``) over a stack of named
tensors adds anonymous axes in front of the data, and mapping over an anonymous leading axis removes
one. Both leave the named axes untouched.

Binary operations align and broadcast by name: the result has the names of ``a`` followed by the names
of ``b`` that ``a`` lacks; an axis present in both must have one size. Anonymous axes must lead, and
broadcast among themselves with NumPy's rules.

Example:
    >>> import jax.numpy as jnp
    >>> from viva_tensor import named
    >>> x = named.new(jnp.ones((2, 3)), ("batch", "embed"))
    >>> b = named.new(jnp.arange(3.0), ("embed",))
    >>> named.describe(named.add(x, b))
    'NamedTensor[batch=2, embed=3] float32'
    >>> named.sum_along(named.add(x, b), "embed").data.tolist()
    [6.0, 6.0]
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from viva_tensor import axis as _axis
from viva_tensor._formats.registry import is_quantized
from viva_tensor._pytree import pytree_dataclass
from viva_tensor.errors import (
    AxisError,
    AxisMismatch,
    AxisNotFound,
    DimensionError,
    DTypeError,
    InvalidOp,
    InvalidShape,
    SizeMismatch,
)
from viva_tensor.tensor import _acc, _array, _dtype, _fits, _key, _promoted, _sum_out, _times

__all__ = [
    "NamedTensor",
    "is_named",
    "new",
    "from_tensor",
    "zeros",
    "ones",
    "random",
    "randn",
    "find_axis",
    "axis_size",
    "has_axis",
    "axis_names",
    "shape",
    "rank",
    "size",
    "sizes",
    "rename_axis",
    "unsqueeze",
    "squeeze",
    "sum_along",
    "mean_along",
    "max_along",
    "softmax_along",
    "add",
    "sub",
    "mul",
    "div",
    "scale",
    "map",
    "to_tensor",
    "describe",
    "transpose",
    "align_to",
    "dot",
    "take",
    "nmap",
]


@pytree_dataclass
class NamedTensor:
    """An array with named axes.

    Attributes:
        data: the array (the pytree's only child).
        names: the names of the trailing ``len(names)`` axes of ``data`` (static). Leading axes of
            ``data`` beyond those are anonymous (added by ``vmap`` or ``lax.scan`` over a stack).

    Build one with :func:`new`, which checks the names against the data.
    """

    data: Any
    names: tuple = flax.struct.field(pytree_node=False)

    def __post_init__(self):
        # names are static: checking them costs nothing per step, and a duplicate would make every lookup
        # by name find the first axis silently. The data is not checked here (it may be a tracer, or a
        # placeholder while JAX rebuilds the pytree).
        object.__setattr__(self, "names", _axis.validate_names(self.names, argument="names"))

    @property
    def shape(self) -> tuple[int, ...]:
        """The data's shape."""
        return tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        """The data's rank."""
        return self.data.ndim

    @property
    def dtype(self):
        """The data's dtype."""
        return self.data.dtype

    @property
    def axes(self) -> tuple:
        """One name per axis of ``data`` (``None`` for anonymous axes), see :func:`axis_names`."""
        return _full_names(self)


def _full_names(t: NamedTensor) -> tuple:
    names, nd = tuple(t.names), t.data.ndim
    if nd >= len(names):
        return (None,) * (nd - len(names)) + names
    dropped = names[: len(names) - nd]
    if any(n is not None for n in dropped):
        raise AxisMismatch(
            argument="t",
            expected=f"data of rank >= {len(names) - sum(n is None for n in dropped)} for names {names}",
            got=f"shape {tuple(t.data.shape)}",
            hint="vmap/scan may only map over anonymous axes; use nmap to map over named ones.",
        )
    return names[len(names) - nd :]


def is_named(x: Any) -> bool:
    """Whether ``x`` is a :class:`NamedTensor`.

    Example:
        >>> is_named(new(jnp.zeros(2), ("seq",))), is_named(jnp.zeros(2))
        (True, False)
    """
    return isinstance(x, NamedTensor)


def _check(t: Any, argument: str = "t") -> NamedTensor:
    if not isinstance(t, NamedTensor):
        raise InvalidOp(argument=argument, expected="a NamedTensor", got=type(t).__name__,
                        hint="wrap an array with named.new(data, names).")
    return t


def _data(data: Any, argument: str) -> jax.Array:
    """``data`` as a jax.Array: arrays and numbers as :mod:`viva_tensor.tensor` takes them, nested lists of
    numbers as ``jnp.asarray`` reads them; anything else (a str, None ...) is a DTypeError."""
    if isinstance(data, (list, tuple)):
        try:
            kind = np.asarray(data).dtype.kind
            if kind not in "biufc":
                raise TypeError(f"elements of dtype kind {kind!r}")
            return jnp.asarray(data)
        except (TypeError, ValueError, OverflowError) as e:
            raise DTypeError(argument=argument, expected="an array or a nested list of numbers",
                             got=f"a {type(data).__name__} ({e})") from None
    return _array(data, argument)


def new(data: Any, names: Sequence[_axis.AxisName]) -> NamedTensor:
    """Wrap ``data`` with one name per axis.

    Args:
        data: an array (anything ``jnp.asarray`` accepts), or a quantized record (kept as it is, so that
            :mod:`viva_tensor.sharding` can shard its codes and scales by these names).
        names: one name per axis: a string, or ``None`` for an anonymous axis. Strings must be unique.

    Returns:
        A :class:`NamedTensor`.

    Raises:
        AxisMismatch: when the number of names is not the rank of ``data``.
        DuplicateAxis: when a name appears twice.
        AxisError: when ``names`` is not a sequence, or a name is not a non-empty string or ``None``.
        DTypeError: when ``data`` is not numeric (a str ...), or is float64 (refused library-wide: convert
            it with ``.astype(jnp.float32)``; with JAX's x64 mode off it would be narrowed silently).

    Example:
        >>> t = new(jnp.zeros((2, 3)), ["batch", "embed"])
        >>> t.names
        ('batch', 'embed')
    """
    names = _axis.validate_names(names, argument="names")
    if not is_quantized(data):
        data = _data(data, "data")
    if data.ndim != len(names):
        raise AxisMismatch(argument="names", expected=f"{data.ndim} names for data of shape {data.shape}",
                           got=f"{len(names)} names {names}")
    return NamedTensor(data=data, names=names)


def from_tensor(data: Any) -> NamedTensor:
    """Wrap ``data`` with every axis anonymous (Gleam ``from_tensor``).

    Example:
        >>> from_tensor(jnp.zeros((2, 3))).names
        (None, None)
    """
    data = _data(data, "data")
    return NamedTensor(data=data, names=(None,) * data.ndim)


def _axes_spec(axes: Any) -> tuple[tuple, tuple[int, ...]]:
    if isinstance(axes, Mapping):
        items = list(axes.items())
    elif isinstance(axes, (list, tuple)):
        items = list(axes)
    else:
        raise AxisError(argument="axes", expected="(name, size) pairs or a {name: size} mapping",
                        got=f"a {type(axes).__name__}")
    names, dims = [], []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise AxisError(argument="axes", expected="(name, size) pairs or a {name: size} mapping", got=repr(item))
        n, s = item
        if not isinstance(s, (int, np.integer)) or isinstance(s, (bool, np.bool_)) or s < 0:
            raise InvalidShape(argument="axes", expected="non-negative integer sizes", got=f"{n!r}={s!r}")
        names.append(n)
        dims.append(int(s))
    return _axis.validate_names(names, argument="axes"), tuple(dims)


def _bound(x: Any, argument: str) -> Any:
    """A Python number or a 0-d numeric array (a distribution parameter), else DTypeError."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return x
    if isinstance(x, (jax.Array, np.ndarray, np.generic)) and np.ndim(x) == 0 and x.dtype.kind in "iuf":
        return x
    raise DTypeError(argument=argument, expected="a real number", got=repr(x)[:60])


def zeros(axes: Any, *, dtype: Any = jnp.float32) -> NamedTensor:
    """A tensor of zeros with the given named axes.

    Args:
        axes: a ``{name: size}`` mapping or a sequence of ``(name, size)`` pairs (name may be ``None``).
        dtype: the dtype (default float32).

    Returns:
        A :class:`NamedTensor` of zeros.

    Raises:
        InvalidShape: for a negative or non-integer size, or an array too large to fit in memory.
        DuplicateAxis: for a name given twice.
        DTypeError: for a dtype that is not numeric, or 64-bit.

    Example:
        >>> describe(zeros({"batch": 2, "seq": 4}))
        'NamedTensor[batch=2, seq=4] float32'
    """
    names, dims = _axes_spec(axes)
    dtype = _dtype(dtype)
    return NamedTensor(data=jnp.zeros(_fits(dims, dtype, "axes"), dtype), names=names)


def ones(axes: Any, *, dtype: Any = jnp.float32) -> NamedTensor:
    """A tensor of ones with the given named axes (see :func:`zeros`).

    Example:
        >>> ones([("seq", 2)]).data.tolist()
        [1.0, 1.0]
    """
    names, dims = _axes_spec(axes)
    dtype = _dtype(dtype)
    return NamedTensor(data=jnp.ones(_fits(dims, dtype, "axes"), dtype), names=names)


def random(key: jax.Array, axes: Any, *, dtype: Any = jnp.float32, minval: float = 0.0,
           maxval: float = 1.0) -> NamedTensor:
    """Uniform random values in ``[minval, maxval)`` with the given named axes.

    Args:
        key: a PRNG key (the Gleam version used hidden global randomness).
        axes: a ``{name: size}`` mapping or ``(name, size)`` pairs.
        dtype: a floating dtype.
        minval: lower bound.
        maxval: upper bound.

    Returns:
        A :class:`NamedTensor`.

    Raises:
        DTypeError: when ``key`` is not a PRNG key (an int seed is not one), ``dtype`` is not floating, or a
            bound is not a number.
        InvalidShape, DuplicateAxis: as :func:`zeros`.

    Example:
        >>> t = random(jax.random.key(0), {"seq": 3})
        >>> bool(((t.data >= 0) & (t.data < 1)).all())
        True
    """
    names, dims = _axes_spec(axes)
    dtype = _dtype(dtype, floating=True)
    lo, hi = _bound(minval, "minval"), _bound(maxval, "maxval")
    x = jax.random.uniform(_key(key), _fits(dims, dtype, "axes"), dtype, lo, hi)
    return NamedTensor(data=x, names=names)


def randn(key: jax.Array, axes: Any, *, dtype: Any = jnp.float32, mean: float = 0.0,
          std: float = 1.0) -> NamedTensor:
    """Normal random values ``mean + std * N(0, 1)`` with the given named axes.

    Raises:
        DTypeError, InvalidShape, DuplicateAxis: as :func:`random`.

    Example:
        >>> randn(jax.random.key(0), {"batch": 2, "embed": 3}).shape
        (2, 3)
    """
    names, dims = _axes_spec(axes)
    dtype = _dtype(dtype, floating=True)
    mean, std = _bound(mean, "mean"), _bound(std, "std")
    x = jax.random.normal(_key(key), _fits(dims, jnp.float32, "axes"), jnp.float32) * std + mean
    return NamedTensor(data=x.astype(dtype), names=names)


# ---------------------------------------------------------------------------------------- access


def axis_names(t: NamedTensor) -> tuple:
    """One name per axis of the data (``None`` for anonymous ones).

    Example:
        >>> axis_names(new(jnp.zeros((2, 3)), (None, "embed")))
        (None, 'embed')
    """
    return _full_names(_check(t))


def find_axis(t: NamedTensor, name: str) -> int:
    """The position of axis ``name``.

    Raises:
        AxisNotFound: when ``t`` has no axis ``name``.

    Example:
        >>> find_axis(zeros({"batch": 2, "seq": 3}), "seq")
        1
    """
    names = axis_names(t)
    if name is None or name not in names:
        raise AxisNotFound(argument="name", expected=f"one of the axes {names}", got=repr(name))
    return names.index(name)


def has_axis(t: NamedTensor, name: str) -> bool:
    """Whether ``t`` has an axis ``name``.

    Example:
        >>> has_axis(zeros({"seq": 2}), "seq"), has_axis(zeros({"seq": 2}), "batch")
        (True, False)
    """
    return name is not None and name in axis_names(t)


def axis_size(t: NamedTensor, name: str) -> int:
    """The size of axis ``name`` (read from the data).

    Raises:
        AxisNotFound: when ``t`` has no axis ``name``.

    Example:
        >>> axis_size(zeros({"batch": 2, "seq": 3}), "seq")
        3
    """
    return int(_check(t).data.shape[find_axis(t, name)])


def shape(t: NamedTensor) -> tuple[int, ...]:
    """The data's shape.

    Example:
        >>> shape(zeros({"batch": 2, "seq": 3}))
        (2, 3)
    """
    return tuple(_check(t).data.shape)


def sizes(t: NamedTensor) -> dict:
    """``{name: size}`` for the named axes.

    Example:
        >>> sizes(zeros({"batch": 2, "seq": 3}))
        {'batch': 2, 'seq': 3}
    """
    return {n: int(s) for n, s in zip(axis_names(t), t.data.shape, strict=False) if n is not None}


def rank(t: NamedTensor) -> int:
    """The number of axes.

    Example:
        >>> rank(zeros({"batch": 2, "seq": 3}))
        2
    """
    return _check(t).data.ndim


def size(t: NamedTensor) -> int:
    """The number of elements.

    Example:
        >>> size(zeros({"batch": 2, "seq": 3}))
        6
    """
    return math.prod(shape(t))


def to_tensor(t: NamedTensor) -> jax.Array:
    """The data, names dropped.

    Example:
        >>> to_tensor(ones({"seq": 2})).tolist()
        [1.0, 1.0]
    """
    return _check(t).data


def describe(t: NamedTensor) -> str:
    """A one-line description: names, sizes (``_`` for anonymous axes) and dtype.

    Example:
        >>> describe(zeros({"batch": 8, "seq": 128, "embed": 64}))
        'NamedTensor[batch=8, seq=128, embed=64] float32'
    """
    parts = [f"{'_' if n is None else n}={s}" for n, s in zip(axis_names(t), t.data.shape, strict=False)]
    return f"NamedTensor[{', '.join(parts)}] {jnp.dtype(t.data.dtype).name}"


# ------------------------------------------------------------------------------- shape changes


def rename_axis(t: NamedTensor, old: str, new_name: _axis.AxisName) -> NamedTensor:
    """Rename axis ``old`` to ``new_name``.

    Raises:
        AxisNotFound: when ``old`` is not an axis.
        DuplicateAxis: when ``new_name`` is already another axis.

    Example:
        >>> rename_axis(zeros({"batch": 2, "seq": 3}), "seq", "time").names
        ('batch', 'time')
    """
    i = find_axis(t, old)
    names = list(axis_names(t))
    names[i] = _axis.validate_name(new_name, argument="new_name")
    return NamedTensor(data=t.data, names=_axis.validate_names(names, argument="new_name"))


def unsqueeze(t: NamedTensor, name: _axis.AxisName, position: int = 0) -> NamedTensor:
    """Insert an axis of size 1 called ``name`` at ``position`` (negative counts from the end).

    Raises:
        DuplicateAxis: when ``name`` is already an axis.
        DimensionError: when ``position`` is out of ``[-rank-1, rank]``.

    Example:
        >>> unsqueeze(zeros({"seq": 3}), "batch").shape
        (1, 3)
    """
    names = list(axis_names(t))
    r = len(names)
    if not -r - 1 <= position <= r:
        raise DimensionError(argument="position", expected=f"a position in [{-r - 1}, {r}]", got=position)
    pos = position if position >= 0 else r + 1 + position
    names.insert(pos, _axis.validate_name(name, argument="name"))
    names = _axis.validate_names(names, argument="name")
    return NamedTensor(data=jnp.expand_dims(t.data, pos), names=names)


def squeeze(t: NamedTensor, name: str) -> NamedTensor:
    """Remove axis ``name``, which must have size 1.

    Raises:
        AxisNotFound: when ``name`` is not an axis.
        InvalidShape: when its size is not 1.

    Example:
        >>> squeeze(zeros({"batch": 1, "seq": 3}), "batch").names
        ('seq',)
    """
    i = find_axis(t, name)
    if t.data.shape[i] != 1:
        raise InvalidShape(argument="name", expected=f"axis {name!r} of size 1", got=f"size {t.data.shape[i]}",
                           hint="use sum_along, mean_along or take to remove a longer axis.")
    names = axis_names(t)
    return NamedTensor(data=jnp.squeeze(t.data, i), names=names[:i] + names[i + 1 :])


def transpose(t: NamedTensor, names: Sequence[str]) -> NamedTensor:
    """Reorder the named axes into ``names`` (anonymous axes stay in front, in their order).

    Args:
        t: a named tensor.
        names: a permutation of the tensor's named axes.

    Raises:
        AxisMismatch: when ``names`` is not a permutation of the named axes.

    Example:
        >>> transpose(zeros({"batch": 2, "seq": 3}), ("seq", "batch")).shape
        (3, 2)
    """
    have = axis_names(t)
    names = _axis.validate_names(names, argument="names")
    named_have = [n for n in have if n is not None]
    if None in names or sorted(names) != sorted(named_have):
        raise AxisMismatch(argument="names", expected=f"a permutation of {tuple(named_have)}", got=names)
    anon = [i for i, n in enumerate(have) if n is None]
    perm = anon + [have.index(n) for n in names]
    return NamedTensor(data=jnp.transpose(t.data, perm), names=(None,) * len(anon) + tuple(names))


# ---------------------------------------------------------------------------------- reductions


def _reduce_axis(t: NamedTensor, name: str) -> tuple[int, tuple]:
    i = find_axis(t, name)
    names = axis_names(t)
    return i, names[:i] + names[i + 1 :]


def _float_check(t: NamedTensor, op: str) -> None:
    if not jnp.issubdtype(t.data.dtype, jnp.floating):
        raise DTypeError(argument="t", expected=f"a floating dtype for {op}", got=str(t.data.dtype))


def sum_along(t: NamedTensor, name: str) -> NamedTensor:
    """Sum over axis ``name`` (accumulated in float32 for floating inputs, returned in the input dtype).

    Integers accumulate as ``jnp.sum`` does and are returned so: bool, int8 and int16 in int32, uint8 and
    uint16 in uint32 (int8 ``100 + 100`` is 200, not -56).

    Raises:
        AxisNotFound: when ``name`` is not an axis.

    Example:
        >>> sum_along(new(jnp.arange(6.0).reshape(2, 3), ("batch", "seq")), "seq").data.tolist()
        [3.0, 12.0]
    """
    i, names = _reduce_axis(t, name)
    x = t.data
    acc = jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else _acc(x.dtype)
    return NamedTensor(data=jnp.sum(x, axis=i, dtype=acc).astype(_sum_out(x.dtype)), names=names)


def mean_along(t: NamedTensor, name: str) -> NamedTensor:
    """Mean over axis ``name`` (float32 accumulation; NaN for an empty axis, as NumPy).

    Raises:
        AxisNotFound: when ``name`` is not an axis.
        DTypeError: for a non-floating tensor.

    Example:
        >>> mean_along(new(jnp.arange(6.0).reshape(2, 3), ("batch", "seq")), "batch").data.tolist()
        [1.5, 2.5, 3.5]
    """
    _float_check(t, "mean_along")
    i, names = _reduce_axis(t, name)
    x = t.data
    return NamedTensor(data=jnp.mean(x, axis=i, dtype=jnp.float32).astype(x.dtype), names=names)


def max_along(t: NamedTensor, name: str) -> NamedTensor:
    """Maximum over axis ``name``.

    Raises:
        AxisNotFound: when ``name`` is not an axis.
        InvalidShape: when the axis is empty (no maximum).
        DTypeError: for complex data (no order).

    Example:
        >>> max_along(new(jnp.array([[1.0, 5.0], [7.0, 2.0]]), ("a", "b")), "b").data.tolist()
        [5.0, 7.0]
    """
    i, names = _reduce_axis(t, name)
    if jnp.issubdtype(t.data.dtype, jnp.complexfloating):
        raise DTypeError(argument="t", expected="a real dtype (max_along needs an order; complex has none)",
                         got=str(t.data.dtype), hint="take jnp.abs or .real first.")
    if t.data.shape[i] == 0:
        raise InvalidShape(argument="name", expected=f"a non-empty axis {name!r}", got="size 0")
    return NamedTensor(data=jnp.max(t.data, axis=i), names=names)


def softmax_along(t: NamedTensor, name: str) -> NamedTensor:
    """Softmax over axis ``name`` (computed in float32, returned in the input dtype).

    Raises:
        AxisNotFound: when ``name`` is not an axis.
        DTypeError: for a non-floating tensor.

    Example:
        >>> p = softmax_along(new(jnp.zeros((2, 4)), ("batch", "seq")), "seq")
        >>> p.data[0].tolist()
        [0.25, 0.25, 0.25, 0.25]
    """
    _float_check(t, "softmax_along")
    i = find_axis(t, name)
    x = t.data
    return NamedTensor(data=jax.nn.softmax(x.astype(jnp.float32), axis=i).astype(x.dtype), names=t.names)


# ----------------------------------------------------------------------------------- alignment


def _split_anon(names: tuple, argument: str) -> int:
    """Number of leading anonymous axes; raise if an anonymous axis follows a named one."""
    k = 0
    while k < len(names) and names[k] is None:
        k += 1
    if any(n is None for n in names[k:]):
        raise InvalidOp(argument=argument, expected="anonymous axes only in front of the named ones",
                        got=names, hint="name the axis (rename_axis) or use nmap.")
    return k


def _union(a: NamedTensor, b: NamedTensor) -> tuple[tuple, dict]:
    na, nb = axis_names(a), axis_names(b)
    ka, kb = _split_anon(na, "a"), _split_anon(nb, "b")
    size_of: dict = {}
    for t, names in ((a, na), (b, nb)):
        for n, s in zip(names, t.data.shape, strict=False):
            if n is None:
                continue
            if n in size_of and size_of[n] != s:
                raise SizeMismatch(argument="b", expected=f"axis {n!r} of size {size_of[n]} (its size in 'a')",
                                   got=f"size {s}", hint="axes with one name must have one size.")
            size_of[n] = int(s)
    named = [n for n in na[ka:]] + [n for n in nb[kb:] if n not in na]
    anon = np.broadcast_shapes(a.data.shape[:ka], b.data.shape[:kb]) if (ka or kb) else ()
    return (None,) * len(anon) + tuple(named), {"anon": tuple(anon), **size_of}


def align_to(t: NamedTensor, names: Sequence[_axis.AxisName]) -> jax.Array:
    """The data of ``t`` laid out for ``names``: its axes permuted, size-1 axes for names it lacks.

    Leading ``None`` names in ``names`` receive ``t``'s anonymous axes, right-aligned.

    Raises:
        AxisNotFound: when ``t`` has a named axis missing from ``names``.

    Example:
        >>> align_to(new(jnp.arange(3.0), ("embed",)), ("batch", "embed")).shape
        (1, 3)
    """
    have = axis_names(t)
    k = _split_anon(have, "t")
    target = tuple(names)
    kt = _split_anon(target, "names")
    for n in have[k:]:
        if n not in target:
            raise AxisNotFound(argument="names", expected=f"axis {n!r} of the tensor among {target}", got=target)
    if k > kt:
        raise DimensionError(argument="names", expected=f"at least {k} anonymous axes", got=kt)
    named = have[k:]
    perm = list(range(k)) + [k + named.index(n) for n in target[kt:] if n in named]
    x = jnp.transpose(t.data, perm)
    out_shape = [1] * (kt - k) + list(x.shape[:k])
    j = k
    for n in target[kt:]:
        if n in named:
            out_shape.append(x.shape[j])
            j += 1
        else:
            out_shape.append(1)
    return jnp.reshape(x, out_shape)


def _promoting(op: Callable) -> Callable:
    """``op`` on its operands cast to their standard promoted dtype (the same bits; works under strict)."""
    return lambda x, y: op(*_promoted(x, y))


def _binary(a: NamedTensor, b: Any, op: Callable, name: str) -> NamedTensor:
    if op is not _times:  # _times promotes itself (and keeps False * nan NaN)
        op = _promoting(op)
    _check(a, "a")
    if name == "sub" and a.data.dtype == jnp.bool_ and jnp.result_type(b.data if isinstance(b, NamedTensor) else b) \
            == jnp.bool_:
        raise DTypeError(argument="a", expected="a numeric dtype (bool - bool is undefined, as in NumPy)", got="bool",
                         hint="use jnp.logical_xor, or convert with .astype(jnp.int32).")
    if not isinstance(b, NamedTensor):
        b_arr = jnp.asarray(b)
        if b_arr.ndim != 0:
            raise InvalidOp(argument="b", expected="a NamedTensor or a scalar", got=f"an array of shape {b_arr.shape}",
                            hint="name its axes with named.new.")
        if isinstance(b, (int, float)) and not isinstance(b, bool):
            return NamedTensor(data=op(a.data, b), names=a.names)  # a Python scalar keeps a's dtype
        return NamedTensor(data=op(a.data, b_arr), names=a.names)
    names, _ = _union(a, b)
    return NamedTensor(data=op(align_to(a, names), align_to(b, names)), names=names)


def add(a: NamedTensor, b: Any) -> NamedTensor:
    """``a + b``, aligned and broadcast by name (``b`` may be a scalar).

    Raises:
        SizeMismatch: when a shared axis has two sizes.

    Example:
        >>> x = new(jnp.zeros((2, 3)), ("batch", "embed"))
        >>> y = new(jnp.arange(2.0), ("batch",))
        >>> add(x, y).data.tolist()
        [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    """
    return _binary(a, b, jnp.add, "add")


def sub(a: NamedTensor, b: Any) -> NamedTensor:
    """``a - b``, aligned and broadcast by name.

    Example:
        >>> sub(ones({"seq": 2}), 1.0).data.tolist()
        [0.0, 0.0]
    """
    return _binary(a, b, jnp.subtract, "sub")


def mul(a: NamedTensor, b: Any) -> NamedTensor:
    """``a * b``, aligned and broadcast by name (an outer product for disjoint names).

    Example:
        >>> x = new(jnp.array([1.0, 2.0]), ("a",))
        >>> y = new(jnp.array([3.0, 4.0, 5.0]), ("b",))
        >>> mul(x, y).data.tolist()
        [[3.0, 4.0, 5.0], [6.0, 8.0, 10.0]]
    """
    return _binary(a, b, _times, "mul")  # _times: False * nan is NaN, as in NumPy


def div(a: NamedTensor, b: Any) -> NamedTensor:
    """``a / b``, aligned and broadcast by name.

    Example:
        >>> div(ones({"seq": 2}), 4.0).data.tolist()
        [0.25, 0.25]
    """
    return _binary(a, b, jnp.divide, "div")


def scale(t: NamedTensor, s: float) -> NamedTensor:
    """Multiply every element by the scalar ``s`` (the dtype is kept).

    The factor takes the tensor's dtype first, as a Python number does in NumPy and JAX: ``3e38`` scales
    a float16 tensor by ``inf``.

    Raises:
        DTypeError: for a factor that is not a real number; on an integer tensor, for a fractional, NaN or
            infinite factor (it would be truncated) or one outside the dtype's range; for a bool tensor.

    Example:
        >>> scale(ones({"seq": 2}), 3.0).data.tolist()
        [3.0, 3.0]
    """
    _check(t)
    dt = jnp.dtype(t.data.dtype)
    if dt == jnp.bool_:
        raise DTypeError(argument="t", expected="a numeric tensor (scaling booleans is undefined)", got="bool",
                         hint="convert it with .astype(jnp.int32) first.")
    if isinstance(s, (jax.Array, np.ndarray, np.generic)) and np.ndim(s) == 0 and s.dtype.kind in "iuf":
        if isinstance(s, jax.core.Tracer):
            if not jnp.issubdtype(dt, jnp.inexact) and not jnp.issubdtype(s.dtype, jnp.integer):
                raise DTypeError(argument="s", expected=f"an integer factor for a {dt} tensor", got=str(s.dtype))
            return NamedTensor(data=(t.data * s.astype(dt)).astype(dt), names=t.names)
        s = s.item()
    if isinstance(s, bool) or not isinstance(s, (int, float)):
        raise DTypeError(argument="s", expected="a real number", got=repr(s)[:60])
    if not jnp.issubdtype(dt, jnp.inexact):
        info = jnp.iinfo(dt)
        if not (math.isfinite(s) and float(s).is_integer()):
            raise DTypeError(argument="s", expected=f"an integer factor for a {dt} tensor", got=s,
                             hint="convert the tensor to a floating dtype first.")
        if not info.min <= int(s) <= info.max:
            raise DTypeError(argument="s", expected=f"a factor in [{info.min}, {info.max}] (the range of {dt})",
                             got=int(s))
        s = int(s)
    return NamedTensor(data=(t.data * jnp.asarray(s, dt)).astype(dt), names=t.names)


def map(t: NamedTensor, f: Callable[[jax.Array], jax.Array]) -> NamedTensor:  # noqa: A001 - the Gleam name
    """Apply an element-wise function; the shape must not change.

    Raises:
        InvalidOp: when ``f`` changes the shape (use :func:`nmap` for that).

    Example:
        >>> map(ones({"seq": 2}), lambda x: x * 2 + 1).data.tolist()
        [3.0, 3.0]
    """
    _check(t)
    y = f(t.data)
    if tuple(jnp.shape(y)) != tuple(t.data.shape):
        raise InvalidOp(argument="f", expected=f"an element-wise function keeping shape {t.data.shape}",
                        got=f"shape {jnp.shape(y)}", hint="use named.nmap for functions that change shapes.")
    return NamedTensor(data=y, names=t.names)


def _letters(names: Sequence[str]) -> dict:
    return {n: string.ascii_letters[i] for i, n in enumerate(names)}


def dot(a: NamedTensor, b: NamedTensor, *, over: str | Sequence[str]) -> NamedTensor:
    """Contract ``a`` and ``b`` over the axis (or axes) ``over``; other shared names are batch axes.

    The result has ``a``'s remaining names, then ``b``'s names that ``a`` lacks. Floating products are
    accumulated in float32 and returned in the inputs' dtype; integers and bool are multiplied and summed
    in int32 (uint32 for unsigned) and returned in it, as :func:`viva_tensor.tensor.dot`.

    Raises:
        AxisNotFound: when an axis of ``over`` is missing from ``a`` or ``b``.
        SizeMismatch: when a shared axis has two sizes.
        InvalidOp: when either tensor has anonymous axes.
        DTypeError: when the dtypes differ.

    Example:
        >>> x = new(jnp.array([[1.0, 2.0], [3.0, 4.0]]), ("batch", "embed"))
        >>> w = new(jnp.array([[1.0], [1.0]]), ("embed", "out"))
        >>> dot(x, w, over="embed").data.tolist()
        [[3.0], [7.0]]
    """
    _check(a, "a"), _check(b, "b")
    over = (over,) if isinstance(over, str) else tuple(over)
    na, nb = axis_names(a), axis_names(b)
    for arg, names in (("a", na), ("b", nb)):
        if None in names:
            raise InvalidOp(argument=arg, expected="only named axes in dot", got=names,
                            hint="name the anonymous axes, or vmap over them.")
    for n in over:
        find_axis(a, n), find_axis(b, n)
    if a.data.dtype != b.data.dtype:
        raise DTypeError(argument="b", expected=f"dtype {a.data.dtype} (the dtype of 'a')", got=str(b.data.dtype))
    _union(a, b)  # size checks
    out = tuple(n for n in na if n not in over) + tuple(n for n in nb if n not in na and n not in over)
    letters = _letters(tuple(dict.fromkeys(na + nb)))
    spec = "".join(letters[n] for n in na) + "," + "".join(letters[n] for n in nb) + "->" + "".join(
        letters[n] for n in out)
    x, w = a.data, b.data
    if jnp.issubdtype(x.dtype, jnp.inexact):
        acc = jnp.complex64 if jnp.issubdtype(x.dtype, jnp.complexfloating) else jnp.float32
        y = jnp.einsum(spec, x, w, preferred_element_type=acc).astype(x.dtype)
    else:
        acc = _acc(x.dtype)
        y = jnp.einsum(spec, x.astype(acc), w.astype(acc), preferred_element_type=acc)
    return NamedTensor(data=y, names=out)


def take(t: NamedTensor, name: str, index: Any) -> NamedTensor:
    """Select along axis ``name``: an integer removes the axis, a 1-D index array keeps it (new size).

    Negative indices count from the end, as in NumPy. A concrete index (a Python int, a NumPy array, a
    ``jax.Array`` outside ``jit``) is checked: one outside ``[-n, n)`` raises. A traced index cannot be
    checked and follows ``jnp.take``'s default (``mode="fill"``): an index outside ``[-n, n)`` gives the
    fill value, NaN for floating data (so the mistake shows), and for other dtypes the value JAX uses:
    the minimum of a signed integer dtype, the maximum of an unsigned one, ``True`` for bool. Clip the
    index first (``jnp.clip(i, 0, n - 1)``) if clamping is what you want.

    Raises:
        AxisNotFound: when ``name`` is not an axis.
        DimensionError: for a concrete index out of range, or an index array that is not 0-D or 1-D.
        DTypeError: for an index that is not an integer (or integer array).

    Example:
        >>> t = new(jnp.arange(6.0).reshape(2, 3), ("batch", "seq"))
        >>> take(t, "seq", 1).data.tolist()
        [1.0, 4.0]
        >>> take(t, "seq", jnp.array([2, 0])).data.tolist()
        [[2.0, 0.0], [5.0, 3.0]]
    """
    i = find_axis(t, name)
    n = t.data.shape[i]
    names = axis_names(t)
    if isinstance(index, (int, np.integer)) and not isinstance(index, (bool, np.bool_)):
        if not -n <= index < n:
            raise DimensionError(argument="index", expected=f"an index in [{-n}, {n}) for axis {name!r}",
                                 got=int(index))
        return NamedTensor(data=jnp.take(t.data, int(index), axis=i), names=names[:i] + names[i + 1 :])
    if isinstance(index, (list, tuple)):
        index = np.asarray(index)
    if not isinstance(index, (jax.Array, np.ndarray, np.generic)):
        raise DTypeError(argument="index", expected="an int or an integer index array", got=type(index).__name__)
    if not jnp.issubdtype(index.dtype, jnp.integer) or index.dtype == jnp.bool_:
        raise DTypeError(argument="index", expected="integer indices", got=str(index.dtype))
    if index.ndim > 1:
        raise DimensionError(argument="index", expected="an integer or a 1-D index array", got=f"shape {index.shape}")
    if not isinstance(index, jax.core.Tracer) and index.size:
        lo, hi = int(np.min(index)), int(np.max(index))
        if lo < -n or hi >= n:
            raise DimensionError(argument="index", expected=f"indices in [{-n}, {n}) for axis {name!r}",
                                 got=f"indices in [{lo}, {hi}]",
                                 hint="a traced index is not checked: it gives NaN (floats) out of range.")
    idx = jnp.asarray(index) if not isinstance(index, jax.Array) else index
    kept = names if idx.ndim == 1 else names[:i] + names[i + 1 :]
    return NamedTensor(data=jnp.take(t.data, idx, axis=i), names=kept)


def nmap(t: NamedTensor, f: Callable[[jax.Array], jax.Array], *, axes: Sequence[str],
         out_names: Sequence[_axis.AxisName] | None = None) -> NamedTensor:
    """Run a positional function ``f`` over the named ``axes``, vectorised over every other axis.

    ``f`` receives an array whose axes are ``axes`` in that order and returns an array whose axes are
    ``out_names`` (default: ``axes``, for functions that keep the rank). The result has the other axes
    of ``t`` first (in their order), then ``out_names``.

    Raises:
        AxisNotFound: when an axis of ``axes`` is missing.
        AxisMismatch: when ``f``'s output rank differs from ``len(out_names)``.
        DuplicateAxis: when ``out_names`` repeats a name or reuses a name of the mapped-over axes.

    Example:
        >>> t = new(jnp.arange(6.0).reshape(2, 3), ("batch", "seq"))
        >>> nmap(t, jnp.cumsum, axes=("seq",)).data.tolist()
        [[0.0, 1.0, 3.0], [3.0, 7.0, 12.0]]
        >>> describe(nmap(t, lambda v: v[:2], axes=("seq",), out_names=("first",)))
        'NamedTensor[batch=2, first=2] float32'
    """
    axes = _axis.validate_names(axes, argument="axes")
    idx = [find_axis(t, n) for n in axes]
    names = axis_names(t)
    rest = [i for i in range(len(names)) if i not in idx]
    out_names = axes if out_names is None else _axis.validate_names(out_names, argument="out_names")
    rest_names = tuple(names[i] for i in rest)
    _axis.validate_names(rest_names + tuple(out_names), argument="out_names")
    x = jnp.transpose(t.data, rest + idx)
    g = f
    for _ in rest:
        g = jax.vmap(g)
    y = g(x)
    if y.ndim != len(rest) + len(out_names):
        raise AxisMismatch(argument="out_names", expected=f"{y.ndim - len(rest)} names for f's output",
                           got=tuple(out_names))
    return NamedTensor(data=y, names=rest_names + tuple(out_names))
