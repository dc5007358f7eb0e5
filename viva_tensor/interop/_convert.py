"""What a checkpoint holds, and converting one kind of checkpoint into another (private; the CLI's
``inspect`` and ``convert`` are thin wrappers of :func:`inspect` and :func:`convert`).

Each kind names the record formats it can store. Converting keeps every record the target kind can store
as it is (bit for bit) and re-quantizes the others — and, with ``fmt``, every weight — from their decoded
values into ``fmt`` or the kind's default format, so nothing is silently lost: the returned report lists
what was kept and what was re-quantized.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from viva_tensor.errors import CheckpointError

__all__ = ["Row", "KINDS", "STORES", "DEFAULT_FORMAT", "inspect", "convert", "register_kind"]


@dataclasses.dataclass(frozen=True)
class Row:
    """One tensor of a checkpoint: its name, format (``"float32"`` ... for a plain array), shape and size."""

    name: str
    format: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def bits_per_value(self) -> float:
        return 8.0 * self.nbytes / max(1, math.prod(self.shape))


# kind -> (load(path) -> (tensors, metadata), save(path, tensors) -> None); filled by register_kind.
KINDS: dict[str, tuple[Callable[[str], tuple[dict, dict]], Callable[[str, dict], None]]] = {}
# kind -> the record formats it stores (None: any registered format).
STORES: dict[str, tuple[str, ...] | None] = {}
DEFAULT_FORMAT: dict[str, str] = {}


def register_kind(name: str, load: Callable, save: Callable, *, stores: tuple[str, ...] | None,
                  default: str) -> None:
    """Add a checkpoint kind: how to read and write it, which formats it stores, and its default format."""
    KINDS[name] = (load, save)
    STORES[name] = stores
    DEFAULT_FORMAT[name] = default


def _row(name: str, value: Any) -> Row:
    from viva_tensor import quant

    if quant.is_quantized(value):
        return Row(name, value.format, tuple(value.shape), int(value.nbytes))
    a = np.asarray(value) if not hasattr(value, "nbytes") else value
    return Row(name, np.dtype(a.dtype).name, tuple(a.shape), int(a.nbytes))


def inspect(tensors: dict[str, Any]) -> list[Row]:
    """One :class:`Row` per tensor (records measured from their real buffers), in order."""
    return [_row(k, v) for k, v in tensors.items()]


def _is_weight(name: str, value: Any) -> bool:
    shape = getattr(value, "shape", ())
    return len(shape) == 2 and name.endswith("weight") and min(shape) >= 8


def convert(tensors: dict[str, Any], to: str, *, fmt: str | None = None,
            where: Callable[[str, Any], bool] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors ready for kind ``to``: records it stores kept bit for bit, the others re-quantized.

    Args:
        tensors: name → record or array (from :func:`viva_tensor.interop.load`).
        to: the target kind (a key of :data:`KINDS`).
        fmt: quantize every selected weight into this format (from its decoded values when it is a record of
            another format); default: keep storable records, re-quantize the rest into the kind's default.
        where: which plain arrays to quantize when ``fmt`` is given (default: 2-D ``*weight`` tensors).

    Returns:
        ``(tensors, report)``: report maps each changed tensor to ``"kept"``, ``"quantized to F"`` or
        ``"re-quantized F1 -> F2"``.

    Raises:
        CheckpointError: an unknown kind, or a format the kind cannot store.
    """
    from viva_tensor import quant

    if to not in KINDS:
        raise CheckpointError(argument="to", expected=" / ".join(map(repr, KINDS)), got=repr(to))
    stores = STORES[to]
    target = fmt or DEFAULT_FORMAT[to]
    if fmt is not None:
        quant.format_spec(fmt)  # an unknown name raises FormatError listing the formats
        if stores is not None and fmt not in stores:
            raise CheckpointError(argument="fmt", expected=f"a format {to!r} stores: {', '.join(stores)}",
                                  got=repr(fmt))
    where = where or _is_weight
    out, report = {}, {}
    for name, value in tensors.items():
        if quant.is_quantized(value):
            keep = (fmt is None or value.format == fmt) and (stores is None or value.format in stores)
            if keep:
                out[name], report[name] = value, "kept"
            else:
                dense = quant.dequantize(value)
                out[name] = quant.quantize(dense, target)
                report[name] = f"re-quantized {value.format} -> {target}"
        elif fmt is not None and where(name, value):
            out[name] = quant.quantize(np.asarray(value, np.float32), fmt)
            report[name] = f"quantized to {fmt}"
        else:
            out[name] = value
    return out, report


def _viva_load(path: str) -> tuple[dict, dict]:
    from viva_tensor import quant
    from viva_tensor._paths import leaves_with_paths

    tree = quant.load(path)
    flat = dict(leaves_with_paths(tree, is_leaf=quant.is_quantized))
    return flat, {"kind": "viva"}


def _viva_save(path: str, tensors: dict) -> None:
    from viva_tensor import quant

    quant.save(os.fspath(path), dict(tensors))


def _hf_kind(kind: str) -> tuple[Callable, Callable]:
    from viva_tensor.interop import _hf

    return (lambda path: _hf.load(path)), (lambda path, tensors: _hf.save(path, tensors, kind=kind))


register_kind("viva", _viva_load, _viva_save, stores=None, default="nf4")
register_kind("bnb", *_hf_kind("bnb"), stores=("nf4", "nf4_dq", "bnb_fp4", "bnb_fp4_dq"), default="nf4_dq")
register_kind("gptq", *_hf_kind("gptq"), stores=("int4_group", "int4_gidx"), default="int4_group")
register_kind("awq", *_hf_kind("awq"), stores=("int4_group",), default="int4_group")
register_kind("compressed-tensors", *_hf_kind("compressed-tensors"), stores=("int4_group", "nvfp4"),
              default="int4_group")
