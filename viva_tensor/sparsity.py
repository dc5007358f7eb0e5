"""2:4 structured sparsity: keep 2 of every 4 weights along the INPUT axis, with real bytes.

In every group of 4 consecutive weights along the input axis (the one a matmul sums over), the 2 of
largest score are kept: ``|w|`` (:func:`prune_24_magnitude`) or ``|w * grad|``
(:func:`prune_24_gradient`, the first-order Taylor estimate of the loss change). Ties go to the lower
position.

**Which axis.** Two layouts of a linear weight live side by side in JAX code: Flax's kernel ``(in,
out)`` (``y = x @ kernel``; ``quant.dot``) and PyTorch's ``(out, in)`` (``y = x @ w.T``;
:class:`viva_tensor.nn.QLinear`). A default would silently prune along the output axis for one of
them, so ``axis`` (the input axis) is a required keyword: ``axis=0`` for a Flax kernel, ``axis=-1``
for an ``(out, in)`` weight. The record remembers it, and :func:`sparse_matmul` contracts ``x`` with
that axis, so ``sparse_matmul(x, compress(w, axis=...))`` equals the layer's dense product with the
pruned weights in either layout.

**Storage.** What NVIDIA's sparse tensor cores store: the kept values as a compressed matrix
``values`` of shape ``other + (2 * groups,)`` (the input axis moved last, ``groups = ceil(in / 4)``),
and their 2-bit positions packed (``i0 | i1 << 2`` per group, ``i0 < i1``, two groups per byte, the
even group in the low nibble). float32 weights take 17 bits per value (1.88x), bfloat16 9 bits. The
kept values can themselves be quantized (:func:`quantize_values`, or ``compress(...,
values_format=...)``): ``values`` is then a record of :mod:`viva_tensor.quant` (``"int8"`` one scale
per output row, ``"nf4"`` blocks of 64 along the input axis ...), the "NF4 + 2:4" stack: NF4 kept
values plus positions take 4.5 / 2 + 1 = 3.25 bits per weight.

An input dim that is not a multiple of 4 is padded with zeros inside and cut by :func:`decompress`.
NaN scores count as the largest; NaN weights are kept and propagate. :func:`sparse_matmul` decodes
(positions, and the quantized values if any) inside the jitted computation and multiplies densely:
without sparse tensor cores (CPU, or XLA on GPU) that is the fastest exact path; the saving is in
the bytes. :func:`register_formats` makes ``"sparse24"`` a format of :mod:`viva_tensor.quant`
(``quant.quantize(w, "sparse24", axis=0, values_format="nf4")``, ``quant.dot_general``).

Example:
    >>> import jax.numpy as jnp
    >>> from viva_tensor import sparsity
    >>> w = jnp.array([[0.1, -3.0, 2.0, 0.5, 1.0, 0.0, 0.0, -1.0]])  # (out=1, in=8)
    >>> s = sparsity.prune_24_magnitude(w, axis=-1)
    >>> s.values.tolist(), s.positions.tolist()
    ([[-3.0, 2.0, 1.0, -1.0]], [[201]])
    >>> sparsity.decompress(s).tolist()
    [[0.0, -3.0, 2.0, 0.0, 1.0, 0.0, 0.0, -1.0]]
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from viva_tensor._formats import packing, registry
from viva_tensor._formats.checks import float_input
from viva_tensor._formats.record import QuantizedArray, pytree_dataclass, record, static
from viva_tensor.errors import ConfigError, DimensionError, DTypeError, FormatError, InvalidShape, ShapeMismatch

__all__ = [
    "Sparse24Tensor",
    "SparsityMetrics",
    "prune_24_magnitude",
    "prune_24_gradient",
    "compress",
    "quantize_values",
    "decompress",
    "sparse_matmul",
    "compute_metrics",
    "register_formats",
]

_METHODS = ("magnitude", "gradient")
_VALUE_DEFAULTS: dict[str, Any] = {"int8": lambda ndim: {"axis": 0} if ndim >= 2 else {}}
"""Options of :func:`quantize_values` when none are given: INT8 gets one scale per output row."""


def _core_ndim(record: Any) -> int:
    return len(record.shape)  # positions, the first leaf: other + (packed groups,)


@record("sparse24", core_ndim=_core_ndim)
class Sparse24Tensor(QuantizedArray):
    """2:4 sparse weights: packed 2-bit ``positions`` and the kept ``values`` (an array or a record).

    Attributes:
        positions: uint8, shape ``other + (ceil(groups / 2),)`` (``other``: ``shape`` without the input
            axis): per group ``i0 | i1 << 2`` (``i0 < i1`` in 0..3), the even group in the low nibble.
        values: the kept weights in input order, shape ``other + (2 * groups,)``: an array of the
            original dtype, or a quantized record of that logical shape (see :func:`quantize_values`).
        shape: the dense shape (static). dtype: the original dtype (static).
        axis: the input axis of ``shape``, non-negative (static): groups of 4 run along it.
        values_format: ``None`` or the format name of a quantized ``values`` (static).
    """

    positions: jax.Array
    values: Any
    axis: int = static(default=0)
    values_format: str | None = static(default=None)


def _check_weights(w: Any, argument: str = "w") -> jax.Array:
    w = float_input(w, argument)
    if w.ndim == 0:
        raise InvalidShape(
            argument=argument, expected="a non-empty array of rank >= 1 (groups of 4 along the input axis)",
            got=tuple(w.shape),
        )
    return w


def _check_axis(axis: Any, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int) or not -ndim <= axis < ndim:
        raise DimensionError(
            argument="axis", expected=f"the input axis, an int in [-{ndim}, {ndim})", got=repr(axis),
            hint="0 for a Flax kernel (in, out), -1 for a PyTorch/QLinear weight (out, in).",
        )
    return axis % ndim


def _groups(a: jax.Array) -> jax.Array:
    """``(..., n)`` to ``(..., ceil(n / 4), 4)``, zero-padded."""
    pad = -a.shape[-1] % 4
    if pad:
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
    return a.reshape(*a.shape[:-1], a.shape[-1] // 4, 4)


@functools.partial(jax.jit, static_argnums=2)
def _select(w: jax.Array, score: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    wg, sg = _groups(jnp.moveaxis(w, axis, -1)), _groups(jnp.moveaxis(score, axis, -1))
    sg = jnp.where(jnp.isnan(sg), jnp.inf, sg)  # NaN scores count as the largest
    _, idx = jax.lax.top_k(sg, 2)  # ties: the lower index first
    idx = jnp.sort(idx, axis=-1)
    values = jnp.take_along_axis(wg, idx, axis=-1)
    nibbles = (idx[..., 0] | (idx[..., 1] << 2)).astype(jnp.uint8)
    return packing.pack_pairs(nibbles), values.reshape(*values.shape[:-2], -1)


def _record_of(w: jax.Array, score: jax.Array, axis: Any) -> Sparse24Tensor:
    axis = _check_axis(axis, w.ndim)
    positions, values = _select(w, score, axis)
    return Sparse24Tensor(positions, values, shape=tuple(w.shape), dtype=jnp.dtype(w.dtype), axis=axis)


def prune_24_magnitude(w: jax.Array, *, axis: int) -> Sparse24Tensor:
    """Keep the 2 weights of largest magnitude in every group of 4 along the input axis.

    Args:
        w: a float32, bfloat16 or float16 array of rank >= 1.
        axis: the input axis (required): 0 for a Flax kernel ``(in, out)``, -1 for ``(out, in)``.

    Returns:
        A :class:`Sparse24Tensor`.

    Raises:
        DTypeError: ``w`` is not float32, bfloat16 or float16.
        InvalidShape: ``w`` is a scalar or empty.
        DimensionError: ``axis`` is not an axis of ``w``.

    Example:
        >>> import jax.numpy as jnp
        >>> decompress(prune_24_magnitude(jnp.array([1.0, -4.0, 3.0, 2.0]), axis=0)).tolist()
        [0.0, -4.0, 3.0, 0.0]
    """
    w = _check_weights(w)
    return _record_of(w, jnp.abs(w.astype(jnp.float32)), axis)


def prune_24_gradient(w: jax.Array, grad: jax.Array, *, axis: int) -> Sparse24Tensor:
    """Keep the 2 weights of largest ``|w * grad|`` saliency in every group of 4 along the input axis.

    Args:
        w: a float32, bfloat16 or float16 array of rank >= 1.
        grad: the loss gradient with respect to ``w`` (same shape, floating).
        axis: the input axis (required): 0 for a Flax kernel ``(in, out)``, -1 for ``(out, in)``.

    Returns:
        A :class:`Sparse24Tensor`.

    Raises:
        DTypeError: ``w`` or ``grad`` is not float32, bfloat16 or float16.
        InvalidShape: ``w`` is a scalar or empty.
        ShapeMismatch: ``grad`` has another shape.
        DimensionError: ``axis`` is not an axis of ``w``.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([1.0, -4.0, 3.0, 2.0])
        >>> decompress(prune_24_gradient(w, jnp.array([5.0, 0.0, 1.0, 1.0]), axis=0)).tolist()
        [1.0, 0.0, 3.0, 0.0]
    """
    w = _check_weights(w)
    g = jnp.asarray(grad)
    if g.shape != w.shape:
        raise ShapeMismatch(argument="grad", expected=f"shape {tuple(w.shape)} (the shape of 'w')", got=tuple(g.shape))
    g = _check_weights(g, "grad")
    return _record_of(w, jnp.abs(w.astype(jnp.float32) * g.astype(jnp.float32)), axis)


def _check_record(s: Any, argument: str = "s") -> Sparse24Tensor:
    if not isinstance(s, Sparse24Tensor):
        raise DTypeError(argument=argument, expected="a Sparse24Tensor", got=type(s).__name__)
    return s


def quantize_values(s: Sparse24Tensor, fmt: str, **options: Any) -> Sparse24Tensor:
    """Quantize the kept values of a 2:4 record with a :mod:`viva_tensor.quant` format (stacking).

    The compressed matrix of kept values (``other + (2 * groups,)``, input axis last) is replaced by
    ``quant.quantize(values, fmt, **options)``; the positions stay. ``nbytes`` is then the quantized
    values' buffers plus the packed positions, measured. INT8 defaults to one scale per output row
    (``axis=0``) for a 2-D weight; NF4's blocks (64) run along the input axis.

    Args:
        s: a :class:`Sparse24Tensor` whose values are not quantized yet.
        fmt: a format name of :func:`viva_tensor.quant.format_names` (``"int8"``, ``"nf4"`` ...).
        **options: that format's options (``block_size`` ...).

    Returns:
        A :class:`Sparse24Tensor` with a record as ``values`` and ``values_format=fmt``.

    Raises:
        DTypeError: ``s`` is not a :class:`Sparse24Tensor`.
        FormatError: ``s`` is already quantized, ``fmt`` is ``"sparse24"`` or not a format, or an
            option the format does not take.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.linspace(-1.0, 1.0, 8 * 128).reshape(8, 128)
        >>> s = quantize_values(prune_24_magnitude(w, axis=-1), "nf4")
        >>> s.values_format, s.nbytes, s.bits_per_value   # 8 x 64 NF4 values + 8 x 16 position bytes
        ('nf4', 416, 3.25)
    """
    s = _check_record(s)
    if s.values_format is not None:
        raise FormatError(
            argument="s", expected="a record with unquantized kept values", got=f"values in '{s.values_format}'",
            hint="quantize the values of the plain record (prune again) once.",
        )
    if fmt == Sparse24Tensor.format:
        raise FormatError(argument="fmt", expected="a format for the kept values, not 'sparse24'", got=repr(fmt))
    defaults = _VALUE_DEFAULTS.get(fmt, lambda ndim: {})(len(s.shape))
    values = registry.quantize(s.values, fmt, **{**defaults, **options})
    return s.replace(values=values, values_format=fmt)


def compress(
    w: jax.Array,
    *,
    axis: int,
    method: str = "magnitude",
    grad: jax.Array | None = None,
    values_format: str | None = None,
    values_options: dict[str, Any] | None = None,
) -> Sparse24Tensor:
    """2:4 pruning along the input axis and, optionally, quantization of the kept values, in one call.

    Args:
        w: a float32, bfloat16 or float16 array of rank >= 1.
        axis: the input axis (required): 0 for a Flax kernel ``(in, out)``, -1 for ``(out, in)``.
        method: ``"magnitude"`` (``|w|``) or ``"gradient"`` (``|w * grad|``, needs ``grad``).
        grad: the loss gradient with respect to ``w`` (only with ``method="gradient"``).
        values_format: ``None`` (kept values in ``w``'s dtype) or a :mod:`viva_tensor.quant` format
            for them (``"int8"``, ``"nf4"`` ...; see :func:`quantize_values`).
        values_options: options of that format.

    Returns:
        A :class:`Sparse24Tensor`.

    Raises:
        ConfigError: an unknown ``method``, ``grad`` missing or given for the other method, or
            ``values_options`` without ``values_format``.
        DTypeError, InvalidShape, ShapeMismatch, DimensionError, FormatError: as
            :func:`prune_24_magnitude`, :func:`prune_24_gradient` and :func:`quantize_values`.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.linspace(-1.0, 1.0, 64 * 8).reshape(64, 8)                 # a Flax kernel (in, out)
        >>> s = compress(w, axis=0, values_format="int8")
        >>> s.values.shape, s.positions.shape, s.nbytes                         # (out, kept) codes
        ((8, 32), (8, 8), 352)
    """
    if method not in _METHODS:
        raise ConfigError(argument="method", expected="'magnitude' or 'gradient'", got=repr(method))
    if method == "gradient" and grad is None:
        raise ConfigError(argument="grad", expected="the loss gradient for method='gradient'", got=None)
    if method == "magnitude" and grad is not None:
        raise ConfigError(
            argument="grad", expected="None for method='magnitude'", got="an array",
            hint="pass method='gradient' to rank by |w * grad|.",
        )
    if values_options is not None and values_format is None:
        raise ConfigError(argument="values_options", expected="None without values_format", got=values_options)
    s = prune_24_magnitude(w, axis=axis) if method == "magnitude" else prune_24_gradient(w, grad, axis=axis)
    if values_format is None:
        return s
    return quantize_values(s, values_format, **(values_options or {}))


def _kept(s: Sparse24Tensor) -> jax.Array:
    """The kept values ``batch + other + (2 * groups,)`` in the original dtype (dequantized if stacked)."""
    if not registry.is_quantized(s.values):
        return s.values
    want = s.positions.shape[: s.positions.ndim - 1]
    kept = registry.dequantize(s.values)
    if tuple(kept.shape[:-1]) != tuple(want):
        raise ShapeMismatch(
            argument="s", expected=f"kept values for the positions {tuple(want)}", got=tuple(kept.shape),
            hint="the quantized values record does not belong to these positions.",
        )
    return kept.astype(s.dtype)


def _dense_moved(s: Sparse24Tensor) -> jax.Array:
    """The dense pruned weights with the input axis last: ``batch + other + (in,)``."""
    kept = _kept(s)
    lead = kept.shape[:-1]
    groups = kept.shape[-1] // 2
    values = kept.reshape(*lead, groups, 2)
    nibbles = packing.unpack_pairs(s.positions, groups)
    idx = jnp.stack([nibbles & 3, (nibbles >> 2) & 3], axis=-1).astype(jnp.int32)
    slot = jax.lax.broadcasted_iota(jnp.int32, (*lead, groups, 4), len(lead) + 1)
    zero = jnp.zeros((), values.dtype)
    dense = jnp.where(slot == idx[..., :1], values[..., :1], zero)
    dense = jnp.where(slot == idx[..., 1:], values[..., 1:], dense)
    return dense.reshape(*lead, groups * 4)[..., : s.shape[s.axis]]


@jax.jit
def _decompress(s: Sparse24Tensor) -> jax.Array:
    nbatch = s.positions.ndim - len(s.shape)
    return jnp.moveaxis(_dense_moved(s), -1, nbatch + s.axis)


def decompress(s: Sparse24Tensor) -> jax.Array:
    """The dense pruned weights (zeros where pruned), in the original shape and dtype.

    Quantized kept values are dequantized first. A record made under ``vmap`` can be decompressed
    outside it (batch dims first).

    Args:
        s: a :class:`Sparse24Tensor`.

    Returns:
        An array of shape ``batch + s.shape`` and dtype ``s.dtype``.

    Raises:
        DTypeError: ``s`` is not a :class:`Sparse24Tensor`.

    Example:
        >>> import jax.numpy as jnp
        >>> decompress(prune_24_magnitude(jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0]]), axis=-1)).tolist()
        [[0.0, 0.0, 3.0, 4.0, 5.0]]
        >>> decompress(prune_24_magnitude(jnp.array([[1.0], [2.0], [3.0], [4.0]]), axis=0)).ravel().tolist()
        [0.0, 0.0, 3.0, 4.0]
    """
    return _decompress(_check_record(s))


@functools.partial(jax.jit, static_argnames=("precision",))
def _sparse_matmul(x: jax.Array, s: Sparse24Tensor, precision: Any) -> jax.Array:
    w = _dense_moved(s)  # (out, in): decoded next to the product, a temporary of this computation
    dtype = jnp.result_type(x.dtype, s.dtype)
    y = jax.lax.dot_general(
        x.astype(dtype), w.astype(dtype), (((x.ndim - 1,), (1,)), ((), ())),
        precision=precision, preferred_element_type=jnp.float32,
    )  # fmt: skip
    return y.astype(dtype)


def sparse_matmul(x: jax.Array, s: Sparse24Tensor, *, precision: Any = None) -> jax.Array:
    """The linear layer's product with 2:4 sparse weights: ``x`` contracted with the input axis of ``s``.

    For a Flax kernel (``axis=0``, shape ``(in, out)``) this is ``x @ w``; for an ``(out, in)`` weight
    (``axis=1``) ``x @ w.T``: the record knows its input axis, so there is one meaning. Equal to the
    dense product with the pruned weights; positions and quantized values are decoded inside the
    jitted computation; the product accumulates in float32.

    Args:
        x: ``(..., in)`` activations (floating).
        s: a 2-D :class:`Sparse24Tensor` made outside vmap.
        precision: as in ``jax.lax.dot_general``.

    Returns:
        ``(..., out)``, in the promoted dtype of ``x`` and the weights.

    Raises:
        DTypeError: ``s`` is not a :class:`Sparse24Tensor`, or ``x`` is not floating.
        DimensionError: ``s`` is not 2-D, or made under vmap.
        ShapeMismatch: the last dim of ``x`` is not ``in``.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[1.0, -4.0, 3.0, 2.0], [0.0, 1.0, 0.0, 1.0]])    # (out, in)
        >>> sparse_matmul(jnp.ones((1, 4)), prune_24_magnitude(w, axis=1)).tolist()
        [[-1.0, 2.0]]
        >>> sparse_matmul(jnp.ones((1, 4)), prune_24_magnitude(w.T, axis=0)).tolist()  # kernel (in, out)
        [[-1.0, 2.0]]
    """
    s = _check_record(s)
    if len(s.shape) != 2 or s.batch_shape:
        raise DimensionError(
            argument="s", expected="a 2-D weight made outside vmap", got=f"shape {s.batch_shape + s.shape}"
        )
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise DTypeError(argument="x", expected="a floating array", got=str(x.dtype))
    n_in = s.shape[s.axis]
    if x.ndim == 0 or x.shape[-1] != n_in:
        raise ShapeMismatch(
            argument="x", expected=f"a last dim of {n_in} (the input axis {s.axis} of 's')", got=tuple(x.shape)
        )
    return _sparse_matmul(x, s, precision)


@pytree_dataclass
class SparsityMetrics:
    """What 2:4 pruning kept and cost (float32 scalars as children, byte counts static).

    Attributes:
        sparsity: fraction of zeros in the decompressed weights (0.5, more where weights were 0).
        kept_energy: ``sum(kept**2) / sum(w**2)`` (1.0 for all-zero weights).
        mse: mean squared error of the pruned weights.
        relative_error: ``||w - pruned|| / ||w||`` (0.0 for all-zero weights).
        dense_bytes, sparse_bytes: measured bytes (static ints). compression_ratio: their ratio.
    """

    sparsity: jax.Array
    kept_energy: jax.Array
    mse: jax.Array
    relative_error: jax.Array
    dense_bytes: int = flax.struct.field(pytree_node=False)
    sparse_bytes: int = flax.struct.field(pytree_node=False)

    @property
    def compression_ratio(self) -> float:
        return self.dense_bytes / max(1, self.sparse_bytes)


def compute_metrics(original: jax.Array, s: Sparse24Tensor) -> SparsityMetrics:
    """Sparsity, kept energy, error and bytes of a 2:4 pruning of ``original``.

    Args:
        original: the dense weights that were pruned.
        s: the :class:`Sparse24Tensor` made from them (outside vmap).

    Returns:
        A :class:`SparsityMetrics`.

    Raises:
        DTypeError: ``s`` is not a :class:`Sparse24Tensor`.
        ShapeMismatch: ``original`` does not have ``s.shape``.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([1.0, -4.0, 3.0, 2.0])
        >>> m = compute_metrics(w, prune_24_magnitude(w, axis=0))
        >>> float(m.sparsity), round(float(m.kept_energy), 4), m.dense_bytes, m.sparse_bytes
        (0.5, 0.8333, 16, 9)
    """
    s = _check_record(s)
    w = jnp.asarray(original)
    if tuple(w.shape) != s.batch_shape + s.shape:
        raise ShapeMismatch(
            argument="original", expected=f"shape {s.batch_shape + s.shape} (the shape of 's')", got=tuple(w.shape)
        )
    w32 = w.astype(jnp.float32)
    pruned = decompress(s).astype(jnp.float32)
    total = jnp.sum(w32 * w32)
    kept = jnp.sum(pruned * pruned)
    err = jnp.sum(jnp.square(w32 - pruned))
    return SparsityMetrics(
        sparsity=jnp.mean((pruned == 0).astype(jnp.float32)),
        kept_energy=jnp.where(total > 0, kept / jnp.where(total > 0, total, 1.0), 1.0),
        mse=err / w32.size,
        relative_error=jnp.where(total > 0, jnp.sqrt(err / jnp.where(total > 0, total, 1.0)), 0.0),
        dense_bytes=int(w.size * jnp.dtype(w.dtype).itemsize),
        sparse_bytes=s.nbytes,
    )


def register_formats() -> None:
    """Register ``"sparse24"`` as a format of :mod:`viva_tensor.quant` (idempotent).

    Then ``quant.quantize(w, "sparse24", axis=..., values_format=...)`` calls :func:`compress`,
    ``quant.dequantize`` calls :func:`decompress`, and ``quant.dot_general`` / ``quant.dot`` /
    :class:`viva_tensor.nn.QLinear` accept the record and decode it next to the matmul. Not done at
    import: the record is lossy by design (half the weights are zero), so code that iterates over every
    registered format expecting a dense approximation opts in explicitly.

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import quant
        >>> register_formats()
        >>> q = quant.quantize(jnp.array([[1.0], [-4.0], [3.0], [2.0]]), "sparse24", axis=0)
        >>> quant.dot(jnp.ones((1, 4)), q).tolist()
        [[-1.0]]
        >>> del quant.FORMATS["sparse24"]  # leave the registry as it was
    """
    registry.register_format(
        Sparse24Tensor.format,
        record=Sparse24Tensor,
        quantize=compress,
        dequantize=decompress,
        block_size=4,
        description="2:4 structured sparsity along the input axis (kept values + packed 2-bit positions)",
    )
