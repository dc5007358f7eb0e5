"""Errors raised by viva_tensor.

Gleam's ``Result(value, TensorError)`` becomes an exception raised at trace time: shapes and dtypes are
static in JAX, so a wrong call fails when it is traced, before anything runs. Every error names the
argument, what was expected and what came, and often a hint.

All errors derive from :class:`TensorError`, itself a :class:`ValueError`; the dtype errors are also
:class:`TypeError`, so ``except TypeError`` and ``except ValueError`` both keep working.

Example:
    >>> import viva_tensor as vt
    >>> try:
    ...     vt.add(vt.zeros((2, 3)), vt.zeros((3, 2)))
    ... except vt.errors.ShapeMismatch as e:
    ...     print(e)
    argument 'b': expected shape (2, 3) (the shape of 'a'), got (3, 2). Hint: use add_broadcast to broadcast.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "TensorError",
    "ShapeMismatch",
    "InvalidShape",
    "DimensionError",
    "BroadcastError",
    "AxisError",
    "AxisNotFound",
    "DuplicateAxis",
    "AxisMismatch",
    "SizeMismatch",
    "InvalidOp",
    "DTypeError",
    "FormatError",
    "NonFiniteError",
    "CheckpointError",
    "ShardingError",
    "ConfigError",
]


def _fmt(value: Any) -> str:
    if isinstance(value, str):
        return value
    return repr(value)


class TensorError(ValueError):
    """Base of every viva_tensor error.

    Built either from a finished message, or from its parts: ``argument``, ``expected``, ``got`` and an
    optional ``hint``, giving ``"argument 'x': expected ..., got .... Hint: ..."``. The parts stay
    available as attributes for programs that inspect them.
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        argument: str | None = None,
        expected: Any = None,
        got: Any = None,
        hint: str | None = None,
    ):
        self.argument = argument
        self.expected = expected
        self.got = got
        self.hint = hint
        if message is None:
            parts = []
            if argument is not None:
                parts.append(f"argument '{argument}': ")
            if expected is not None:
                parts.append(f"expected {_fmt(expected)}")
            if got is not None:
                parts.append(f", got {_fmt(got)}" if expected is not None else f"got {_fmt(got)}")
            message = "".join(parts) + "."
            if hint:
                message += f" Hint: {hint}"
        elif hint:
            message = f"{message} Hint: {hint}"
        super().__init__(message)


class ShapeMismatch(TensorError):
    """Two shapes that must agree do not (Gleam ``ShapeMismatch(expected, got)``)."""


class InvalidShape(TensorError):
    """A shape that no operation accepts: negative sizes, a reshape that changes the size, empty input."""


class DimensionError(TensorError):
    """The wrong rank, or an index or axis out of range (Gleam ``DimensionError``)."""


class BroadcastError(TensorError):
    """Two shapes that NumPy's rules cannot broadcast together (Gleam ``BroadcastError``)."""


class AxisError(TensorError):
    """A problem with a named axis."""


class AxisNotFound(AxisError):
    """An axis name that the tensor does not have."""


class DuplicateAxis(AxisError):
    """An axis name given twice where names must be unique."""


class AxisMismatch(AxisError):
    """Axis names that must agree (same set, same order) do not."""


class SizeMismatch(AxisError, ShapeMismatch):
    """One axis name with two different sizes."""


class InvalidOp(TensorError):
    """An operation that does not apply to these arguments."""


class DTypeError(TensorError, TypeError):
    """A dtype that the operation does not accept, or two dtypes that must agree and do not."""


class FormatError(TensorError):
    """An unknown quantization format, or options that the format does not accept."""


class NonFiniteError(TensorError):
    """A NaN or infinity where finite values are required (raised by ``validate=True`` paths)."""


class CheckpointError(TensorError):
    """A file that is missing, not a safetensors file, truncated, or tampered with."""


class ShardingError(TensorError):
    """Sharding rules that do not fit the mesh or the array."""


class ConfigError(TensorError):
    """A configuration value out of its range (block sizes, windows, budgets)."""
