"""Quantized records: the :class:`QuantizedArray` mixin and the :func:`record` decorator (private).

A quantized record is a frozen pytree dataclass (what ``flax.struct.dataclass`` makes, registered as a pytree
node of its own class: see :func:`pytree_dataclass`): its arrays (codes, scales, mins ...) are children, and its
``shape`` (the logical shape of the tensor it encodes), ``dtype`` (the original dtype) and format options (block
size ...) are static fields.

Records made under ``vmap`` carry the per-example ``shape``; their leaves get the mapped axes in front.
Every ``dequantize`` therefore derives leading batch dims from its leaves (see :func:`batch_dims`) so
that a record returned by a vmapped quantize can be dequantized outside the vmap too.

:func:`record` declares a record class in one line: it adds the static fields ``shape`` and ``dtype``,
sets ``format`` and ``_core_ndim``, makes it a frozen pytree dataclass and registers the class with
``flax.nnx.register_data_type`` (as qwix does for its QArray), so that an NNX module can hold a record:
its arrays are the module's state, not static attributes. ``record[...]`` is the record itself
(``nnx.Linear`` reads its kernel as ``self.kernel[...]``); any other index raises.

Example:
    >>> import dataclasses, jax, jax.numpy as jnp
    >>> @record("demo", core_ndim=1)
    ... class Demo(QuantizedArray):
    ...     codes: jax.Array
    ...     block_size: int = static(default=4)
    >>> d = Demo(jnp.zeros(4, jnp.uint8), shape=(4,), dtype=jnp.float32)
    >>> d.format, d.nbytes, d.bits_per_value, [f.name for f in dataclasses.fields(d)]
    ('demo', 4, 8.0, ['codes', 'shape', 'dtype', 'block_size'])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import flax.nnx as nnx
import flax.serialization
import flax.struct
import jax
import numpy as np

from viva_tensor._pytree import pytree_dataclass
from viva_tensor.errors import InvalidOp

__all__ = ["QuantizedArray", "batch_dims", "pytree_dataclass", "record", "static"]


class QuantizedArray:
    """Mixin for quantized records: sizes measured from the real buffers.

    Subclasses are declared with :func:`record`, which gives them the static fields ``shape`` and
    ``dtype``, the class variable ``format`` (the name used by :mod:`viva_tensor.quant`) and
    ``_core_ndim``.
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

    Each record class knows (``_core_ndim``, set by :func:`record`) how many dims its first leaf has
    when made outside any vmap; extra leading dims are batch dims.
    """
    leaves = jax.tree_util.tree_leaves(record)
    if not leaves:
        return ()
    first = leaves[0]
    core = type(record)._core_ndim(record)
    return tuple(first.shape[: first.ndim - core])


def static(**kwargs: Any) -> Any:
    """A static (non-pytree) dataclass field of a record: a size, an axis, a format option."""
    return flax.struct.field(pytree_node=False, **kwargs)


def _add_shape_dtype(cls: type) -> None:
    """Insert the static ``shape`` and ``dtype`` fields after the children (before the first default).

    They are keyword-only, so records keep their positional children; their place in the field list is
    the one every record had when it declared them itself (checkpoint metadata and treedefs unchanged).
    """
    own = dict(cls.__dict__.get("__annotations__", {}))
    if "shape" in own or "dtype" in own:
        raise TypeError(f"{cls.__name__}: @record adds 'shape' and 'dtype'; do not declare them")
    names = list(own)
    at = next((i for i, n in enumerate(names) if n in cls.__dict__ or "ClassVar" in str(own[n])), len(names))
    new = names[:at] + ["shape", "dtype"] + names[at:]
    own.update(shape="tuple[int, ...]", dtype="Any")
    cls.__annotations__ = {n: own[n] for n in new}
    cls.shape = static(kw_only=True)
    cls.dtype = static(kw_only=True)


def record(format: str, *, core_ndim: int | Callable[[Any], int]) -> Callable[[type], type]:
    """Declare a quantized record class: ``@record("nf4", core_ndim=1)`` over its fields.

    Args:
        format: the format name (``record.format``).
        core_ndim: dims of the first leaf outside vmap: an int, or a function of the record.

    Returns:
        A class decorator: adds ``shape``/``dtype``, makes the class a frozen pytree dataclass (whose
        treedefs differ from any other class's) and applies ``nnx.register_data_type``.
    """

    def wrap(cls: type) -> type:
        if not issubclass(cls, QuantizedArray):
            raise TypeError(f"{cls.__name__}: a record class derives from QuantizedArray")
        _add_shape_dtype(cls)
        cls.format = format
        cls._core_ndim = staticmethod(core_ndim if callable(core_ndim) else (lambda rec, n=int(core_ndim): n))
        out = pytree_dataclass(cls)
        nnx.register_data_type(out)
        return out

    return wrap

