"""What every quantized record shares (private).

A quantized record is a frozen pytree dataclass (``flax.struct.dataclass``): its arrays (codes, scales,
mins ...) are children, and its ``shape`` (the logical shape of the tensor it encodes), ``dtype`` (the
original dtype) and format options (block size ...) are static fields.

Records made under ``vmap`` carry the per-example ``shape``; their leaves get the mapped axes in front.
Every ``dequantize`` therefore derives leading batch dims from its leaves (see :func:`batch_dims`) so
that a record returned by a vmapped quantize can be dequantized outside the vmap too.

Formats register themselves in :data:`FORMATS` so that :mod:`viva_tensor.quant` can quantize and
dequantize by name without knowing each module. Registering a format also registers its record class
with ``flax.nnx.register_data_type`` (as qwix does for its QArray), so that an NNX module can hold a
record: its arrays are the module's state, not static attributes. ``record[...]`` is the record itself
(``nnx.Linear`` reads its kernel as ``self.kernel[...]``); any other index raises.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar

import flax.nnx as nnx
import jax
import numpy as np

from viva_tensor.errors import InvalidOp

__all__ = ["QuantizedArray", "FormatSpec", "FORMATS", "register_format", "batch_dims", "is_quantized"]


class QuantizedArray:
    """Mixin for quantized records: sizes measured from the real buffers.

    Subclasses are ``flax.struct.dataclass`` es that define the static fields ``shape`` and ``dtype``,
    set the class variable ``format`` (the name used by :mod:`viva_tensor.quant`), and register a
    format with :func:`register_format`.
    """

    format: ClassVar[str] = ""

    def __getitem__(self, index: Any) -> Any:
        """``record[...]`` (or ``record[()]``) is the record itself; a record cannot be sliced."""
        if index is Ellipsis or (isinstance(index, tuple) and index in ((), (Ellipsis,))):
            return self
        raise InvalidOp(
            argument="index",
            expected="... (a quantized record cannot be sliced)",
            got=repr(index),
            hint="dequantize it first: quant.dequantize(q)[index].",
        )

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer the record holds (codes, scales, mins ...), measured, not computed."""
        return int(sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(self)))

    @property
    def size(self) -> int:
        """Number of values encoded (per example, for a record made under vmap)."""
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def original_nbytes(self) -> int:
        """Bytes of the tensor this record encodes, in its original dtype (times any batch dims)."""
        return self.size * np.dtype(self.dtype).itemsize * math.prod(self.batch_shape)

    @property
    def bits_per_value(self) -> float:
        """Stored bits per encoded value: ``8 * nbytes / number of values``."""
        return 8.0 * self.nbytes / max(1, self.size * math.prod(self.batch_shape))

    @property
    def compression_ratio(self) -> float:
        """Original bytes divided by :attr:`nbytes`."""
        return self.original_nbytes / max(1, self.nbytes)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading dims added by ``vmap`` (empty for a record made outside a vmap)."""
        return batch_dims(self)


def batch_dims(record: Any) -> tuple[int, ...]:
    """Leading dims that ``vmap`` added in front of a record's leaves.

    Each record class lists in ``_core_ndim`` how many dims its first leaf has when made outside any
    vmap (a callable of the record, since it may depend on static fields). Extra leading dims are batch
    dims.
    """
    leaves = jax.tree_util.tree_leaves(record)
    if not leaves:
        return ()
    first = leaves[0]
    core = type(record)._core_ndim(record)
    return tuple(first.shape[: first.ndim - core])


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a quantized record of any registered format."""
    return isinstance(x, QuantizedArray)


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """A registered format: its name, record class, quantize and dequantize functions, block size."""

    name: str
    record: type
    quantize: Callable[..., Any]
    dequantize: Callable[[Any], jax.Array]
    block_size: int
    description: str


FORMATS: dict[str, FormatSpec] = {}


def register_format(
    name: str,
    *,
    record: type,
    quantize: Callable[..., Any],
    dequantize: Callable[[Any], jax.Array],
    block_size: int,
    description: str,
) -> None:
    """Register a format under ``name`` (called by each format module at import).

    Also registers ``record`` with ``flax.nnx.register_data_type``, so that NNX modules hold its
    instances as data (their arrays are state).
    """
    nnx.register_data_type(record)
    FORMATS[name] = FormatSpec(name, record, quantize, dequantize, block_size, description)
