"""Argument types shared by the ``viva-tensor`` command and the scripts in ``benchmarks/`` (private).

Each raises ``argparse.ArgumentTypeError``, so argparse prints ``argument --size: expected a positive
integer, got '0'`` and exits with status 2: a size, count or length is never silently replaced by a default.
"""

from __future__ import annotations

import argparse

__all__ = ["positive_ints", "positive_int", "positive_float"]


def positive_ints(text: str) -> list[int]:
    """``"1,16,256"`` -> ``[1, 16, 256]``; anything else, or a value below 1, is a usage error."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def positive_int(text: str) -> int:
    """An integer >= 1 (``--size``, ``--repeats``, ``--heads`` ...): ``0`` is refused, never read as a default."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (``--budget-gib``); ``nan``, ``inf``, ``0`` and negatives are refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value
