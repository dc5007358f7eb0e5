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
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from viva_tensor import quant
from viva_tensor._formats.registry import expected_record, spec_of
from viva_tensor.errors import DimensionError, DTypeError, FormatError, ShapeMismatch

__all__ = ["QEmbed", "gather_rows"]

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
