"""Quantized versions of every parameterised Flax NNX layer, and a dispatch table from float layers to them.

* :class:`QEmbed` holds an embedding table as a quantized record; a lookup gathers the record's row slices
  (codes, scales, offsets) and decodes only those rows, never the whole table. :meth:`QEmbed.attend` is the
  tied output projection, through :func:`viva_tensor.quant.dot_general`.
* :class:`QLinearGeneral`, :class:`QEinsum` (:func:`viva_tensor.quant.dot_general`) and :class:`QConv` (the
  kernel decoded inside the jitted call, then ``lax.conv_general_dilated``) replace ``nnx.LinearGeneral``,
  ``nnx.Einsum`` and ``nnx.Conv``.
* :func:`quantizable` and :func:`quantize_layer` map ``nnx.Linear``, ``nnx.Embed``, ``nnx.LinearGeneral``,
  ``nnx.Einsum`` and ``nnx.Conv`` to those layers (``nnx.Linear`` to :class:`~viva_tensor.nn.QLinear`).

Layout: every kernel is stored with the dims a matmul sums over LAST, flattened into one, so that block
formats (Q4_0, NF4, NVFP4 ...) group values along the contraction as GGML and bitsandbytes do: an
embedding table as ``(num_embeddings, features)`` (blocks along the features), a LinearGeneral kernel as
``(*batch, out, in)``, an Einsum kernel as ``(*batch, free, contracted)``, a Conv kernel as
``(out_features, window * in_features / groups)``. ``float_kernel()`` gives the decoded kernel back in the
float layer's own layout.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from viva_tensor import quant
from viva_tensor._formats.registry import expected_record, spec_of
from viva_tensor.errors import ConfigError, DimensionError, DTypeError, FormatError, ShapeMismatch
from viva_tensor.nn._qlinear import QLinear

__all__ = [
    "QEmbed",
    "QLinearGeneral",
    "QEinsum",
    "QConv",
    "gather_rows",
    "quantizable",
    "quantize_layer",
]

# Rows of the probe record that the row layout is checked against (eval_shape only: nothing is allocated).
# A flat block layout whose blocks straddle rows cannot look row-sliceable for this many rows when the
# block is at most this long.
_PROBE_ROWS = 4096


def _require_record(record: Any, argument: str, ndim: int | None = None) -> None:
    if not quant.is_quantized(record):
        raise FormatError(
            argument=argument,
            expected="a quantized record",
            got=type(record).__name__,
            hint="quantize the array with quant.quantize(x, fmt), or use the layer's from_* constructor.",
        )
    if record.batch_shape:
        raise DimensionError(argument=argument, expected="a record made outside vmap", got=record.batch_shape)
    if ndim is not None and len(record.shape) != ndim:
        raise DimensionError(argument=argument, expected=f"a {ndim}-D record", got=tuple(record.shape))


def _row_layout(record: Any, argument: str = "table") -> tuple[int | None, ...]:
    """Per leaf of a 2-D record: how many leading entries one row owns (``None``: a leaf all rows share).

    A leaf is row-sliced when its leading dim is ``rows * e`` for the record of one row (``e`` entries), for
    the record itself and for a probe of :data:`_PROBE_ROWS` rows; it is shared when its shape does not depend
    on the rows (a per-tensor scale). Anything else (scales grouped across rows, blocks that straddle rows)
    raises :class:`FormatError`.
    """
    spec = spec_of(record, argument)
    rows, features = record.shape
    one = jax.tree_util.tree_leaves(expected_record(spec, dataclasses.replace(record, shape=(1, features))))
    probe = jax.tree_util.tree_leaves(
        expected_record(spec, dataclasses.replace(record, shape=(_PROBE_ROWS, features)))
    )
    leaves = jax.tree_util.tree_leaves(record)
    layout: list[int | None] = []
    for i, (leaf, e1, ek) in enumerate(zip(leaves, one, probe, strict=True)):
        s1, sk, sv = tuple(e1.shape), tuple(ek.shape), tuple(leaf.shape)
        if sv == s1 and sk == s1:
            layout.append(None)
        elif s1 and sk == (_PROBE_ROWS * s1[0], *s1[1:]) and sv == (rows * s1[0], *s1[1:]):
            layout.append(s1[0])
        else:
            raise FormatError(
                argument=argument,
                expected=f"a format whose blocks run along the feature axis (each of the {rows} rows owning its "
                f"own codes and scales)",
                got=f"format {spec.name!r}: buffer {i} has shape {s1} for one row and {sv} for {rows} rows",
                hint="use a row-wise format: q8_0, q4_0, q4_1, q5_0, nf4, nvfp4, mxfp4, int4_group, "
                "int8 with axis=0, or a K-quant when the features are a multiple of 256.",
            )
    return tuple(layout)


def _take_rows(record: Any, layout: tuple[int | None, ...], idx: jax.Array) -> Any:
    """The record of the rows ``idx`` (1-D, in range) of a 2-D record: its row slices gathered, shared leaves kept."""
    rows, features = record.shape
    leaves, treedef = jax.tree_util.tree_flatten(record)
    out = []
    for leaf, per_row in zip(leaves, layout, strict=True):
        if per_row is None:
            out.append(leaf)
            continue
        blocks = leaf if per_row == 1 else leaf.reshape(rows, per_row, *leaf.shape[1:])
        narrow_float = jnp.issubdtype(leaf.dtype, jnp.floating) and jnp.dtype(leaf.dtype).itemsize == 1
        if narrow_float:  # XLA:CPU would convert the whole FP8 buffer to float16 before a gather: move bytes
            blocks = jax.lax.bitcast_convert_type(blocks, jnp.uint8)
        taken = blocks.at[idx].get(mode="promise_in_bounds")
        if narrow_float:
            taken = jax.lax.bitcast_convert_type(taken, leaf.dtype)
        out.append(taken.reshape(idx.shape[0] * per_row, *leaf.shape[1:]))
    return dataclasses.replace(jax.tree_util.tree_unflatten(treedef, out), shape=(int(idx.shape[0]), features))


def gather_rows(table: Any, ids: jax.Array) -> jax.Array:
    """``jnp.take(quant.dequantize(table), ids, axis=0)``, decoding only the rows ``ids`` names.

    The record's row slices (codes, scales, offsets) are gathered first, then the small record of those rows
    is decoded with the format's own ``dequantize``: the whole table is never decoded, so a lookup of a few
    ids costs memory and time for those rows only. Semantics are ``jnp.take``'s (those of ``nnx.Embed``):
    a negative id counts from the end, an id outside ``[-rows, rows)`` gives a row of NaN.

    Args:
        table: a 2-D quantized record ``(rows, features)`` of a format whose blocks run along the features
            (q8_0, q4_0, q4_1, q5_0, q5_1, nf4, nvfp4, mxfp4, int4_group, int8 per tensor or with ``axis=0``,
            the K-quants when ``features % 256 == 0``).
        ids: an integer array of any shape.

    Returns:
        An array of shape ``ids.shape + (features,)`` and dtype ``table.dtype``, bit for bit the rows of
        ``quant.dequantize(table)``.

    Raises:
        FormatError: ``table`` is not a record, or its format groups scales across rows (nf4_dq).
        DimensionError: ``table`` is not 2-D.
        DTypeError: ``ids`` is not an integer array.

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import quant
        >>> table = quant.quantize(jnp.arange(4 * 32.0).reshape(4, 32) / 128, "q8_0")
        >>> rows = gather_rows(table, jnp.array([[3, 0]]))
        >>> rows.shape, bool((rows == quant.dequantize(table)[jnp.array([[3, 0]])]).all())
        ((1, 2, 32), True)
    """
    _require_record(table, "table", ndim=2)
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise DTypeError(argument="ids", expected="an integer array", got=str(ids.dtype))
    layout = _row_layout(table, "table")
    rows, features = table.shape
    flat = ids.reshape(-1)
    if flat.shape[0] == 0:
        return jnp.zeros((*ids.shape, features), table.dtype)
    flat = jnp.where(flat < 0, flat + jnp.asarray(rows, flat.dtype), flat)
    valid = (flat >= 0) & (flat < rows)
    safe = jnp.where(valid, flat, jnp.zeros_like(flat))
    decoded = quant.dequantize(_take_rows(table, layout, safe))
    decoded = jnp.where(valid[:, None], decoded, jnp.asarray(jnp.nan, decoded.dtype))
    return decoded.reshape(*ids.shape, features)


_EMBED_DEFAULTS: dict[str, dict[str, Any]] = {"int8": {"axis": 0}}
"""Options :meth:`QEmbed.from_embed` uses when none are given: INT8 gets one scale per embedding row."""


class QEmbed(nnx.Module):
    """An embedding layer whose table is a quantized record; a lookup decodes only the rows it gathers.

    The drop-in for ``nnx.Embed``: ``layer(ids)`` is ``jnp.take(dequantize(table), ids, axis=0)`` bit for
    bit (see :func:`gather_rows`), and :meth:`attend` is the tied output projection ``query @ table^T``
    computed with :func:`viva_tensor.quant.dot_general` (the table decoded inside that one computation).

    Args:
        table: a 2-D quantized record ``(num_embeddings, features)`` of a row-wise format (blocks along the
            features).
        dtype: the dtype of the looked-up vectors and of :meth:`attend` (``None``: the table's dtype).

    Raises:
        FormatError: ``table`` is not a record, or its format cannot be gathered by rows (nf4_dq).
        DimensionError: ``table`` is not 2-D.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> embed = QEmbed.from_embed(nnx.Embed(100, 64, rngs=nnx.Rngs(0)), "q4_0")
        >>> embed(jnp.array([[1, 2, 3]])).shape, embed.attend(jnp.ones((2, 64))).shape
        ((1, 3, 64), (2, 100))
        >>> embed.table.get_value().nbytes, 100 * 64 * 4  # 4.5 bits per value instead of 32
        (3600, 25600)
    """

    def __init__(self, table: Any, *, dtype: Any = None):
        _require_record(table, "table", ndim=2)
        _row_layout(table, "table")
        self.table = nnx.Param(table)
        self.num_embeddings, self.features = table.shape
        self.dtype = jnp.dtype(table.dtype if dtype is None else dtype)

    @classmethod
    def from_embed(cls, embed: nnx.Embed, fmt: str, **options: Any) -> QEmbed:
        """Quantizes an ``nnx.Embed``'s table in format ``fmt``.

        Args:
            embed: the layer (its ``embedding`` ``(num_embeddings, features)`` and ``dtype``).
            fmt: a format name of :func:`viva_tensor.quant.format_names` whose blocks run along the features.
            **options: the format's options; ``int8`` defaults to ``axis=0`` (a scale per row).

        Returns:
            The :class:`QEmbed`.

        Raises:
            FormatError: an unknown format or option, or a format that cannot be gathered by rows.
            TensorError: whatever the format raises for this table (K-quants: features not a multiple of 256).

        Example:
            >>> from flax import nnx
            >>> QEmbed.from_embed(nnx.Embed(10, 32, rngs=nnx.Rngs(0)), "int8").table.get_value().shape
            (10, 32)
        """
        options = {**_EMBED_DEFAULTS.get(fmt, {}), **options}
        table = quant.quantize(jnp.asarray(embed.embedding.get_value()), fmt, **options)
        return cls(table, dtype=embed.dtype)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """The rows ``inputs`` (integers of any shape) of the table: shape ``inputs.shape + (features,)``."""
        inputs = jnp.asarray(inputs)
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise DTypeError(argument="inputs", expected="an integer array", got=str(inputs.dtype))
        return gather_rows(self.table.get_value(), inputs).astype(self.dtype)

    def attend(self, query: jax.Array) -> jax.Array:
        """``query @ table^T`` for ``query`` of shape ``(..., features)``: shape ``(..., num_embeddings)``."""
        query = jnp.asarray(query)
        if query.ndim < 1 or query.shape[-1] != self.features:
            raise ShapeMismatch(argument="query", expected=f"last dim {self.features}", got=query.shape)
        query = query.astype(self.dtype)
        dims = (((query.ndim - 1,), (1,)), ((), ()))
        y = quant.dot_general(query, self.table.get_value(), dims, preferred_element_type=jnp.float32)
        return y.astype(self.dtype)

    def float_kernel(self) -> jax.Array:
        """The decoded table ``(num_embeddings, features)`` (for tests and for a float copy of the layer)."""
        return quant.dequantize(self.table.get_value())


# ------------------------------------------------------------------------------------------ shared helpers


def _int8_rows(fmt: str, options: dict[str, Any], ndim: int) -> dict[str, Any]:
    """INT8 defaults to one scale per output row (axis ``ndim - 2`` of a ``(..., out, in)`` record)."""
    return {"axis": ndim - 2, **options} if fmt == "int8" else options


def _compute_dtype(x: jax.Array, dtype: Any) -> Any:
    return x.dtype if dtype is None else jnp.dtype(dtype)


def _finish(y: jax.Array, bias: Any, bias_shape: tuple[int, ...], dtype: Any, preferred: Any) -> jax.Array:
    """``y`` (float32) plus the bias reshaped to ``bias_shape``, in ``preferred`` (else ``dtype``)."""
    if bias is not None:
        y = y + bias.astype(jnp.float32).reshape(bias_shape)
    return y.astype(dtype if preferred is None else preferred)


def _require_bias(bias: Any, shape: tuple[int, ...]) -> Any:
    if bias is None:
        return None
    bias = jnp.asarray(bias)
    if math.prod(bias.shape) != math.prod(shape):
        raise ShapeMismatch(argument="bias", expected=f"{math.prod(shape)} values (shape {shape})", got=bias.shape)
    return nnx.Param(bias.reshape(shape))


# ------------------------------------------------------------------------------------------ QLinearGeneral


class QLinearGeneral(nnx.Module):
    """``nnx.LinearGeneral`` with a quantized kernel: contracts ``axis`` of the input with ``in_features``.

    The kernel is stored as a record of logical shape ``(*batch, prod(out_features), prod(in_features))``
    (contraction last, so blocks run along it). A call moves the contracted input axes to the end (no copy
    when they are already the trailing axes in order, the usual case), merges them, and computes
    :func:`viva_tensor.quant.dot_general` with the batch axes (leading, as in ``nnx.LinearGeneral``) as its
    batch dims; accumulation is float32, the result has the input's dtype (or ``dtype``; or
    ``preferred_element_type`` when given).

    Args:
        kernel: the record ``(*batch_sizes, prod(out_features), prod(in_features))``.
        bias: ``None`` or ``prod(batch) * prod(out)`` values (shape ``(*batch, *out_features)``).
        in_features: the contracted sizes, one per axis of ``axis``.
        out_features: the output feature sizes.
        axis: the input axes contracted (ints, negative counting from the end); as in ``nnx.LinearGeneral``
            they are taken in increasing order, ``in_features`` giving their sizes in that order.
        batch_axis: ``{input axis: size}`` of the leading batch axes shared by input and kernel.
        dtype: the computation dtype (``None``: the input's).
        precision: as in ``lax.dot_general``.
        preferred_element_type: the output dtype, when given.

    Raises:
        FormatError: ``kernel`` is not a record.
        DimensionError: a record whose shape does not match the features.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> layer = nnx.LinearGeneral((4, 16), (2, 8), axis=(-2, -1), rngs=nnx.Rngs(0))
        >>> q = QLinearGeneral.from_linear_general(layer, "q8_0")
        >>> q.kernel.get_value().shape, q(jnp.ones((3, 4, 16))).shape
        ((16, 64), (3, 2, 8))
    """

    def __init__(
        self,
        kernel: Any,
        bias: Any = None,
        *,
        in_features: Sequence[int],
        out_features: Sequence[int],
        axis: Sequence[int] = (-1,),
        batch_axis: dict[int, int] | None = None,
        dtype: Any = None,
        precision: Any = None,
        preferred_element_type: Any = None,
    ):
        self.in_features = tuple(int(n) for n in in_features)
        self.out_features = tuple(int(n) for n in out_features)
        self.axis = tuple(int(a) for a in axis)
        self.batch_axis = tuple(sorted((int(k), int(v)) for k, v in (batch_axis or {}).items()))
        batch = tuple(v for _, v in self.batch_axis)
        want = (*batch, math.prod(self.out_features), math.prod(self.in_features))
        _require_record(kernel, "kernel", ndim=len(want))
        if tuple(kernel.shape) != want:
            raise DimensionError(argument="kernel", expected=f"a record of shape {want}", got=tuple(kernel.shape))
        if len(self.axis) != len(self.in_features):
            raise ShapeMismatch(argument="axis", expected=f"{len(self.in_features)} axes", got=self.axis)
        if [k for k, _ in self.batch_axis] != list(range(len(batch))):
            raise DimensionError(argument="batch_axis", expected="the leading axes 0, 1, ...", got=self.batch_axis)
        self.kernel = nnx.Param(kernel)
        self.bias = _require_bias(bias, (*batch, *self.out_features))
        self.dtype = dtype
        self.precision = precision
        self.preferred_element_type = preferred_element_type

    @classmethod
    def from_linear_general(cls, layer: nnx.LinearGeneral, fmt: str, **options: Any) -> QLinearGeneral:
        """Quantizes an ``nnx.LinearGeneral``'s kernel ``(*batch, *in, *out)`` as ``(*batch, out, in)`` in ``fmt``.

        Args:
            layer: the float layer.
            fmt: a format name of :func:`viva_tensor.quant.format_names`.
            **options: the format's options; ``int8`` defaults to a scale per output row.

        Returns:
            The :class:`QLinearGeneral`.

        Raises:
            FormatError: an unknown format or option.
            TensorError: whatever the format raises for this kernel.
        """
        nb, ni = len(layer.batch_axis), len(layer.in_features)
        kernel = jnp.asarray(layer.kernel.get_value())
        batch = kernel.shape[:nb]
        order = (*range(nb), *range(nb + ni, kernel.ndim), *range(nb, nb + ni))
        flat = kernel.transpose(order).reshape(*batch, math.prod(layer.out_features), math.prod(layer.in_features))
        record = quant.quantize(flat, fmt, **_int8_rows(fmt, options, flat.ndim))
        bias = None if layer.bias is None else layer.bias.get_value()
        return cls(
            record, bias, in_features=layer.in_features, out_features=layer.out_features, axis=layer.axis,
            batch_axis=dict(layer.batch_axis), dtype=layer.dtype, precision=layer.precision,
            preferred_element_type=layer.preferred_element_type,
        )  # fmt: skip

    def float_kernel(self) -> jax.Array:
        """The decoded kernel in ``nnx.LinearGeneral``'s layout ``(*batch, *in_features, *out_features)``."""
        nb, no, ni = len(self.batch_axis), len(self.out_features), len(self.in_features)
        w = quant.dequantize(self.kernel.get_value())
        w = w.reshape(*w.shape[:nb], *self.out_features, *self.in_features)
        return w.transpose((*range(nb), *range(nb + no, nb + no + ni), *range(nb, nb + no)))

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """The product over ``axis``: shape ``(*batch, *other input axes, *out_features)``."""
        x = jnp.asarray(inputs)
        nb = len(self.batch_axis)
        axis = tuple(sorted(a % x.ndim for a in self.axis)) if x.ndim else self.axis  # sorted, as Flax does
        got = tuple(x.shape[a] for a in axis) if all(0 <= a < x.ndim for a in axis) else None
        if got != self.in_features or any(a < nb for a in axis):
            raise ShapeMismatch(
                argument="inputs", expected=f"sizes {self.in_features} on axes {self.axis}", got=x.shape
            )
        for k, size in self.batch_axis:
            if x.shape[k] != size:
                raise ShapeMismatch(argument="inputs", expected=f"size {size} on batch axis {k}", got=x.shape)
        dtype = _compute_dtype(x, self.dtype)
        rest = [a for a in range(x.ndim) if a not in axis]
        free_shape = tuple(x.shape[a] for a in rest)
        x = x.transpose((*rest, *axis)).reshape(*free_shape, math.prod(self.in_features)).astype(dtype)
        record = self.kernel.get_value()
        dims = (((x.ndim - 1,), (len(record.shape) - 1,)), (tuple(range(nb)), tuple(range(nb))))
        y = quant.dot_general(x, record, dims, precision=self.precision, preferred_element_type=jnp.float32)
        y = y.reshape(*free_shape, *self.out_features)
        bias = None if self.bias is None else self.bias.get_value()
        bias_shape = (*free_shape[:nb], *(1,) * (len(free_shape) - nb), *self.out_features)
        return _finish(y, bias, bias_shape, dtype, self.preferred_element_type)


# ------------------------------------------------------------------------------------------------- QEinsum


@dataclasses.dataclass(frozen=True)
class _EinsumPlan:
    """An ``"lhs,rhs->out"`` equation read as one dot_general: which kernel letters are batch, free, contracted."""

    lhs: str  # with "..." kept
    rhs: str
    out: str
    batch: str  # in lhs, rhs and out, in the kernel's order
    free: str  # in rhs and out only
    contracted: str  # in lhs and rhs, not out


def _einsum_plan(einsum_str: str, kernel_ndim: int) -> _EinsumPlan:
    eq = einsum_str.replace(" ", "")
    bad = ConfigError(
        argument="einsum_str",
        expected='an explicit two-operand equation "lhs,kernel->out" (kernel without "..." or repeated letters, '
        "every kernel letter in the input or the output)",
        got=repr(einsum_str),
    )
    if eq.count("->") != 1 or eq.count(",") != 1:
        raise bad
    operands, out = eq.split("->")
    lhs, rhs = operands.split(",")
    if "." in rhs or len(set(rhs)) != len(rhs) or len(rhs) != kernel_ndim:
        raise bad
    lhs_letters = lhs.replace("...", "")
    if len(set(lhs_letters)) != len(lhs_letters) or any(c not in lhs_letters + rhs for c in out.replace("...", "")):
        raise bad
    if any(c not in out and c not in rhs for c in lhs_letters) or any(c not in lhs_letters + out for c in rhs):
        raise bad  # a letter summed over one operand only
    batch = "".join(c for c in rhs if c in lhs_letters and c in out)
    free = "".join(c for c in rhs if c not in lhs_letters)
    contracted = "".join(c for c in rhs if c in lhs_letters and c not in out)
    return _EinsumPlan(lhs, rhs, out, batch, free, contracted)


class QEinsum(nnx.Module):
    """``nnx.Einsum`` with a quantized kernel: the equation computed as one :func:`viva_tensor.quant.dot_general`.

    The equation ``"lhs,kernel->out"`` is read once: kernel letters also in the input and the output are batch
    dims, those in the output only are free, those in the input only are contracted. The kernel is stored as a
    record ``(*batch, prod(free), prod(contracted))`` (contraction last, so blocks run along it); a call
    orders the input as ``(batch, its own letters, contracted)``, merges the contracted axes, multiplies, and
    puts the result in the equation's output order. Accumulation is float32; the result has the input's dtype
    (or ``dtype``; or ``preferred_element_type``). ``"..."`` is allowed in the input and the output.

    Args:
        kernel: the record, from :meth:`from_einsum`.
        bias: ``None`` or an array of ``bias_shape``.
        einsum_str: the equation.
        kernel_shape: the float kernel's shape (in the equation's kernel letters).
        bias_shape: the bias's shape, as in ``nnx.Einsum``.
        dtype: the computation dtype (``None``: the input's).
        precision: as in ``lax.dot_general``.
        preferred_element_type: the output dtype, when given.

    Raises:
        ConfigError: an equation that is not two operands with a plain kernel, or that sums a letter over one
            operand only.
        DimensionError: a record whose shape does not match ``kernel_shape``.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> layer = nnx.Einsum("btd,dnh->btnh", (64, 2, 16), (2, 16), rngs=nnx.Rngs(0))
        >>> q = QEinsum.from_einsum(layer, "q4_0")
        >>> q.kernel.get_value().shape, q(jnp.ones((1, 3, 64))).shape
        ((32, 64), (1, 3, 2, 16))
    """

    def __init__(
        self,
        kernel: Any,
        bias: Any = None,
        *,
        einsum_str: str,
        kernel_shape: Sequence[int],
        bias_shape: Sequence[int] | None = None,
        dtype: Any = None,
        precision: Any = None,
        preferred_element_type: Any = None,
    ):
        self.kernel_shape = tuple(int(n) for n in kernel_shape)
        self.einsum_str = einsum_str.replace(" ", "")
        plan = _einsum_plan(self.einsum_str, len(self.kernel_shape))
        size = dict(zip(plan.rhs, self.kernel_shape, strict=True))
        want = (*(size[c] for c in plan.batch), math.prod(size[c] for c in plan.free),
                math.prod(size[c] for c in plan.contracted))  # fmt: skip
        _require_record(kernel, "kernel", ndim=len(want))
        if tuple(kernel.shape) != want:
            raise DimensionError(argument="kernel", expected=f"a record of shape {want}", got=tuple(kernel.shape))
        self.kernel = nnx.Param(kernel)
        self.bias_shape = None if bias_shape is None else tuple(int(n) for n in bias_shape)
        self.bias = None if bias is None else _require_bias(bias, self.bias_shape or tuple(np.shape(bias)))
        self.dtype = dtype
        self.precision = precision
        self.preferred_element_type = preferred_element_type

    @classmethod
    def from_einsum(cls, layer: nnx.Einsum, fmt: str, **options: Any) -> QEinsum:
        """Quantizes an ``nnx.Einsum``'s kernel, laid out ``(*batch, free, contracted)``, in format ``fmt``.

        Args:
            layer: the float layer (its ``einsum_str`` must be set).
            fmt: a format name of :func:`viva_tensor.quant.format_names`.
            **options: the format's options; ``int8`` defaults to a scale per output row.

        Returns:
            The :class:`QEinsum`.

        Raises:
            ConfigError: an equation :class:`QEinsum` cannot compute as one product.
            TensorError: whatever the format raises for this kernel.
        """
        kernel = jnp.asarray(layer.kernel.get_value())
        plan = _einsum_plan(layer.einsum_str, kernel.ndim)
        size = dict(zip(plan.rhs, kernel.shape, strict=True))
        order = [plan.rhs.index(c) for c in plan.batch + plan.free + plan.contracted]
        flat = kernel.transpose(order).reshape(
            *(size[c] for c in plan.batch), math.prod(size[c] for c in plan.free),
            math.prod(size[c] for c in plan.contracted),
        )  # fmt: skip
        record = quant.quantize(flat, fmt, **_int8_rows(fmt, options, flat.ndim))
        bias = None if layer.bias is None else layer.bias.get_value()
        return cls(
            record, bias, einsum_str=layer.einsum_str, kernel_shape=kernel.shape, bias_shape=layer.bias_shape,
            dtype=layer.dtype, precision=layer.precision, preferred_element_type=layer.preferred_element_type,
        )  # fmt: skip

    def float_kernel(self) -> jax.Array:
        """The decoded kernel in ``nnx.Einsum``'s layout (``kernel_shape``)."""
        plan = _einsum_plan(self.einsum_str, len(self.kernel_shape))
        size = dict(zip(plan.rhs, self.kernel_shape, strict=True))
        letters = plan.batch + plan.free + plan.contracted
        w = quant.dequantize(self.kernel.get_value()).reshape(*(size[c] for c in letters))
        return w.transpose([letters.index(c) for c in plan.rhs])

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """The equation applied to ``inputs`` and the kernel (plus the bias)."""
        x = jnp.asarray(inputs)
        plan = _einsum_plan(self.einsum_str, len(self.kernel_shape))
        lhs, out = plan.lhs, plan.out
        if "..." in lhs:
            spare = [c for c in string.ascii_letters if c not in self.einsum_str]
            n = x.ndim - (len(lhs) - 3)
            if n < 0 or n > len(spare):
                raise ShapeMismatch(argument="inputs", expected=f"rank >= {len(lhs) - 3} for {lhs!r}", got=x.shape)
            fill = "".join(spare[:n])
            lhs, out = lhs.replace("...", fill), out.replace("...", fill)
        if x.ndim != len(lhs):
            raise ShapeMismatch(argument="inputs", expected=f"rank {len(lhs)} for {plan.lhs!r}", got=x.shape)
        size = dict(zip(plan.rhs, self.kernel_shape, strict=True))
        for c, n in zip(lhs, x.shape, strict=True):
            if c in size and size[c] != n:
                expected = f"size {size[c]} for {c!r} of {plan.lhs!r}"
                raise ShapeMismatch(argument="inputs", expected=expected, got=x.shape)
        own = "".join(c for c in lhs if c not in plan.rhs)
        xs = dict(zip(lhs, x.shape, strict=True))
        dtype = _compute_dtype(x, self.dtype)
        order = plan.batch + own + plan.contracted
        x = x.transpose([lhs.index(c) for c in order])
        x = x.reshape(*(xs[c] for c in plan.batch + own), math.prod(size[c] for c in plan.contracted)).astype(dtype)
        nb = len(plan.batch)
        record = self.kernel.get_value()
        dims = (((x.ndim - 1,), (len(record.shape) - 1,)), (tuple(range(nb)), tuple(range(nb))))
        y = quant.dot_general(x, record, dims, precision=self.precision, preferred_element_type=jnp.float32)
        got = plan.batch + own + plan.free
        y = y.reshape(*(xs[c] for c in plan.batch + own), *(size[c] for c in plan.free))
        y = y.transpose([got.index(c) for c in out])
        bias = None if self.bias is None else self.bias.get_value()
        bias_shape = tuple(size[c] if c in size else 1 for c in out)
        return _finish(y, bias, bias_shape, dtype, self.preferred_element_type)


# --------------------------------------------------------------------------------------------------- QConv


@functools.partial(
    jax.jit, static_argnames=("window", "strides", "padding", "lhs_dilation", "rhs_dilation", "groups", "precision",
                              "dtype", "preferred"),
)  # fmt: skip
def _qconv(x, record, bias, *, window, strides, padding, lhs_dilation, rhs_dilation, groups, precision, dtype,
           preferred):  # fmt: skip
    # One XLA computation: the kernel is decoded here, in the layout (out, *window, in) it is stored in, and
    # handed to the convolution with matching dimension numbers (no transpose of the decoded kernel).
    n = len(window)
    out_features = record.shape[0]
    w = quant.dequantize(record).astype(dtype).reshape(out_features, *window, -1)
    spec = (0, n + 1, *range(1, n + 1))
    dims = jax.lax.ConvDimensionNumbers(lhs_spec=spec, rhs_spec=spec, out_spec=spec)
    y = jax.lax.conv_general_dilated(
        x.astype(dtype), w, strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dims, feature_group_count=groups, precision=precision, preferred_element_type=jnp.float32,
    )  # fmt: skip
    return _finish(y, bias, (1,) * (y.ndim - 1) + (out_features,), dtype, preferred)


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * n
    if isinstance(value, int):
        return (value,) * n
    return tuple(int(v) for v in value)


class QConv(nnx.Module):
    """``nnx.Conv`` with a quantized kernel, decoded inside the jitted call and fed to ``lax.conv_general_dilated``.

    The kernel is stored as a record ``(out_features, prod(kernel_size) * in_features / groups)``: each output
    channel's whole receptive field is one row, so blocks run along what the convolution sums over. A call
    decodes it (one XLA computation with the convolution, nothing decoded outlives it), views it as
    ``(out, *kernel_size, in / groups)`` and convolves with dimension numbers that read that layout directly.
    (An im2col :func:`viva_tensor.quant.dot_general` was the alternative; XLA's convolution with the decode in
    front is simpler, keeps every padding mode and dilation, and its decoded kernel is no bigger than one
    im2col patch matrix of a small batch.) Inputs are channels-last with any number of batch dims, padding
    ``"SAME"``, ``"VALID"``, ``"CIRCULAR"``, ``"REFLECT"``, ``"CAUSAL"`` or explicit, as in ``nnx.Conv``.
    Accumulation is float32; the result has the input's dtype (or ``dtype``; or ``preferred_element_type``).

    Args:
        kernel: the record, from :meth:`from_conv`.
        bias: ``None`` or ``(out_features,)``.
        kernel_size: the window.
        in_features: input channels.
        strides, padding, input_dilation, kernel_dilation, feature_group_count: as in ``nnx.Conv``.
        dtype: the computation dtype (``None``: the input's).
        precision: as in ``lax.conv_general_dilated``.
        preferred_element_type: the output dtype, when given.

    Raises:
        DimensionError: a record whose shape does not match the window and the channels.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> q = QConv.from_conv(nnx.Conv(8, 16, (3, 3), rngs=nnx.Rngs(0)), "q8_0")
        >>> q.kernel.get_value().shape, q(jnp.ones((2, 5, 5, 8))).shape
        ((16, 72), (2, 5, 5, 16))
    """

    def __init__(
        self,
        kernel: Any,
        bias: Any = None,
        *,
        kernel_size: Sequence[int],
        in_features: int,
        strides: Any = 1,
        padding: Any = "SAME",
        input_dilation: Any = 1,
        kernel_dilation: Any = 1,
        feature_group_count: int = 1,
        dtype: Any = None,
        precision: Any = None,
        preferred_element_type: Any = None,
    ):
        self.kernel_size = tuple(int(k) for k in kernel_size)
        self.in_features = int(in_features)
        self.feature_group_count = int(feature_group_count)
        if self.in_features % self.feature_group_count:
            raise ShapeMismatch(
                argument="feature_group_count", expected=f"a divisor of in_features {self.in_features}",
                got=self.feature_group_count,
            )  # fmt: skip
        _require_record(kernel, "kernel", ndim=2)
        want = math.prod(self.kernel_size) * (self.in_features // self.feature_group_count)
        if kernel.shape[1] != want:
            raise DimensionError(argument="kernel", expected=f"a record of shape (out, {want})", got=kernel.shape)
        self.out_features = int(kernel.shape[0])
        self.kernel = nnx.Param(kernel)
        self.bias = _require_bias(bias, (self.out_features,))
        n = len(self.kernel_size)
        self.strides, self.input_dilation = _tuple(strides, n), _tuple(input_dilation, n)
        self.kernel_dilation = _tuple(kernel_dilation, n)
        self.padding = padding if isinstance(padding, str) else tuple(tuple(p) for p in _pads(padding, n))
        self.dtype = dtype
        self.precision = precision
        self.preferred_element_type = preferred_element_type

    @classmethod
    def from_conv(cls, layer: nnx.Conv, fmt: str, **options: Any) -> QConv:
        """Quantizes an ``nnx.Conv``'s kernel ``(*window, in / groups, out)`` (its mask applied) in format ``fmt``.

        Args:
            layer: the float layer.
            fmt: a format name of :func:`viva_tensor.quant.format_names`.
            **options: the format's options; ``int8`` defaults to a scale per output channel.

        Returns:
            The :class:`QConv`.

        Raises:
            TensorError: whatever the format raises for this kernel.
        """
        kernel = jnp.asarray(layer.kernel.get_value())
        if layer.mask is not None:
            kernel = kernel * jnp.asarray(layer.mask, kernel.dtype)
        out_features = kernel.shape[-1]
        flat = jnp.moveaxis(kernel, -1, 0).reshape(out_features, -1)
        record = quant.quantize(flat, fmt, **_int8_rows(fmt, options, 2))
        bias = None if layer.bias is None else layer.bias.get_value()
        return cls(
            record, bias, kernel_size=layer.kernel_size, in_features=layer.in_features, strides=layer.strides,
            padding=layer.padding, input_dilation=layer.input_dilation, kernel_dilation=layer.kernel_dilation,
            feature_group_count=layer.feature_group_count, dtype=layer.dtype, precision=layer.precision,
            preferred_element_type=layer.preferred_element_type,
        )  # fmt: skip

    def float_kernel(self) -> jax.Array:
        """The decoded kernel in ``nnx.Conv``'s layout ``(*kernel_size, in / groups, out)``."""
        w = quant.dequantize(self.kernel.get_value())
        return jnp.moveaxis(w.reshape(self.out_features, *self.kernel_size, -1), 0, -1)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """The convolution of channels-last ``inputs`` ``(*batch, *spatial, in_features)``."""
        x = jnp.asarray(inputs)
        n = len(self.kernel_size)
        if x.ndim < n + 1 or x.shape[-1] != self.in_features:
            raise ShapeMismatch(
                argument="inputs", expected=f"(*batch, {n} spatial dims, {self.in_features})", got=x.shape
            )
        batch = x.shape[: x.ndim - n - 1]
        x = x.reshape(-1, *x.shape[x.ndim - n - 1 :])
        padding = self.padding
        if isinstance(padding, str) and padding.upper() in ("CIRCULAR", "REFLECT"):
            dilated = [(k - 1) * d + 1 for k, d in zip(self.kernel_size, self.kernel_dilation, strict=True)]
            pads = [(0, 0), *(((k - 1) // 2, k // 2) for k in dilated), (0, 0)]
            x = jnp.pad(x, pads, mode="wrap" if padding.upper() == "CIRCULAR" else "reflect")
            padding = "VALID"
        elif isinstance(padding, str) and padding.upper() == "CAUSAL":
            if n != 1:
                raise ConfigError(argument="padding", expected="'CAUSAL' for a 1-D convolution", got=f"{n}-D")
            x = jnp.pad(x, [(0, 0), (self.kernel_dilation[0] * (self.kernel_size[0] - 1), 0), (0, 0)])
            padding = "VALID"
        elif isinstance(padding, str):
            padding = padding.upper()
        dtype = _compute_dtype(x, self.dtype)
        bias = None if self.bias is None else self.bias.get_value()
        preferred = None if self.preferred_element_type is None else jnp.dtype(self.preferred_element_type)
        y = _qconv(
            x, self.kernel.get_value(), bias, window=self.kernel_size, strides=self.strides, padding=padding,
            lhs_dilation=self.input_dilation, rhs_dilation=self.kernel_dilation, groups=self.feature_group_count,
            precision=self.precision, dtype=jnp.dtype(dtype), preferred=preferred,
        )  # fmt: skip
        return y.reshape(*batch, *y.shape[1:]) if len(batch) != 1 else y


def _pads(padding: Any, n: int) -> list[tuple[int, int]]:
    """Explicit padding as ``nnx.Conv`` takes it (an int, or per dim an int or a pair) as ``n`` pairs."""
    if isinstance(padding, int):
        return [(padding, padding)] * n
    pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    if len(pads) != n:
        raise ConfigError(argument="padding", expected=f"{n} (low, high) pairs", got=repr(padding))
    return pads


# ---------------------------------------------------------------------------------------------- dispatch

_QUANTIZERS: dict[type, Any] = {
    nnx.Linear: QLinear.from_linear,
    nnx.Embed: QEmbed.from_embed,
    nnx.LinearGeneral: QLinearGeneral.from_linear_general,
    nnx.Einsum: QEinsum.from_einsum,
    nnx.Conv: QConv.from_conv,
}
"""The float layer types :func:`quantize_layer` replaces, and the constructor of each one's quantized layer.
Matched by exact type: a subclass may compute something else (``nnx.ConvTranspose`` is not a ``Conv``)."""


def quantizable(layer: Any) -> bool:
    """Whether :func:`quantize_layer` has a quantized layer for ``layer``'s type.

    Args:
        layer: any object (an NNX module or not).

    Returns:
        ``True`` for ``nnx.Linear``, ``nnx.Embed``, ``nnx.LinearGeneral``, ``nnx.Einsum`` and ``nnx.Conv``
        (exact types), ``False`` otherwise.

    Example:
        >>> from flax import nnx
        >>> quantizable(nnx.Embed(4, 8, rngs=nnx.Rngs(0))), quantizable(nnx.LayerNorm(8, rngs=nnx.Rngs(0)))
        (True, False)
    """
    return type(layer) in _QUANTIZERS


def quantize_layer(layer: nnx.Module, fmt: str, **options: Any) -> nnx.Module:
    """The quantized counterpart of a float layer, its kernel in format ``fmt``.

    ``nnx.Linear`` -> :class:`~viva_tensor.nn.QLinear`, ``nnx.Embed`` -> :class:`QEmbed`,
    ``nnx.LinearGeneral`` -> :class:`QLinearGeneral`, ``nnx.Einsum`` -> :class:`QEinsum`, ``nnx.Conv`` ->
    :class:`QConv`. The layer passed in is not changed.

    Args:
        layer: a layer for which :func:`quantizable` is true.
        fmt: a format name of :func:`viva_tensor.quant.format_names`.
        **options: the format's options (``block_size``, ``group_size`` ...).

    Returns:
        The new module.

    Raises:
        ConfigError: a layer type with no quantized counterpart.
        FormatError: an unknown format or option; an embedding in a format that cannot be gathered by rows.
        TensorError: whatever the format raises for this kernel (the K-quants: rows not a multiple of 256).

    Example:
        >>> from flax import nnx
        >>> type(quantize_layer(nnx.Conv(4, 8, (3,), rngs=nnx.Rngs(0)), "q8_0")).__name__
        'QConv'
    """
    make = _QUANTIZERS.get(type(layer))
    if make is None:
        raise ConfigError(
            argument="layer",
            expected="one of " + ", ".join(f"nnx.{t.__name__}" for t in _QUANTIZERS),
            got=type(layer).__name__,
            hint="check nn.quantizable(layer) first, and leave other layers in float.",
        )
    return make(layer, fmt, **options)
