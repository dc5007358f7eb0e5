"""Semantic axis names.

The Gleam library had an ``Axis`` union (``Batch | Seq | Feature | ... | Named(String) | Anon``). Here an
axis name is a plain string, as in haliax, penzai and xarray: the semantic names below are constants
that spell the usual ones, any other string is a custom axis, and ``None`` is an anonymous axis.

Example:
    >>> from viva_tensor import axis
    >>> axis.batch, axis.seq, axis.embed
    ('batch', 'seq', 'embed')
    >>> axis.is_semantic("seq"), axis.is_semantic("my_axis")
    (True, False)
"""

from __future__ import annotations

from typing import Optional

from viva_tensor.errors import AxisError, DuplicateAxis

__all__ = [
    "AxisName",
    "batch",
    "seq",
    "feature",
    "height",
    "width",
    "channel",
    "input",
    "output",
    "head",
    "embed",
    "SEMANTIC",
    "is_semantic",
    "is_anonymous",
    "validate_name",
    "validate_names",
]

AxisName = Optional[str]
"""An axis name: a string, or ``None`` for an anonymous axis."""

batch = "batch"
seq = "seq"
feature = "feature"
height = "height"
width = "width"
channel = "channel"
input = "input"  # noqa: A001 - the Gleam name
output = "output"
head = "head"
embed = "embed"

SEMANTIC: tuple[str, ...] = (batch, seq, feature, height, width, channel, input, output, head, embed)
"""The semantic names of the Gleam ``Axis`` type, in its order."""


def is_semantic(name: AxisName) -> bool:
    """Whether ``name`` is one of the Gleam library's semantic axis names.

    Example:
        >>> is_semantic("head")
        True
    """
    return name in SEMANTIC


def is_anonymous(name: AxisName) -> bool:
    """Whether ``name`` is the anonymous axis (``None``).

    Example:
        >>> is_anonymous(None), is_anonymous("seq")
        (True, False)
    """
    return name is None


def validate_name(name: AxisName, *, argument: str = "name") -> AxisName:
    """Return ``name`` if it is a valid axis name (a non-empty string or ``None``), else raise.

    Raises:
        AxisError: for anything else (an integer, an empty string ...).

    Example:
        >>> validate_name("seq")
        'seq'
    """
    if name is None or (isinstance(name, str) and name):
        return name
    raise AxisError(argument=argument, expected="a non-empty string or None", got=repr(name))


def validate_names(names, *, argument: str = "names") -> tuple[AxisName, ...]:
    """Return ``names`` as a tuple after checking each name and that no string repeats.

    Anonymous axes (``None``) may repeat; named ones may not.

    Raises:
        AxisError: for ``names`` that is not a sequence (``None``, a string, an int ...), or a name that
            is not a string or ``None``.
        DuplicateAxis: for a string given twice.

    Example:
        >>> validate_names(["batch", None, None, "embed"])
        ('batch', None, None, 'embed')
    """
    if isinstance(names, (str, bytes)):
        raise AxisError(argument=argument, expected="a sequence of axis names", got=f"the string {names!r}")
    try:
        names = tuple(names)
    except TypeError:
        raise AxisError(argument=argument, expected="a sequence of axis names (one per axis)",
                        got=f"a {type(names).__name__} ({repr(names)[:40]})") from None
    out = tuple(validate_name(n, argument=argument) for n in names)
    seen = set()
    for n in out:
        if n is not None:
            if n in seen:
                raise DuplicateAxis(argument=argument, expected="unique axis names", got=f"{n!r} twice in {out}")
            seen.add(n)
    return out
