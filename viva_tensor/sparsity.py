"""2:4 structured sparsity: keep 2 of every 4 weights along the input (last) axis, with real bytes.

In every group of 4 consecutive weights along the last axis (the input features of a ``(out, in)``
kernel used as ``x @ w.T``), the 2 of largest score are kept: ``|w|`` (:func:`prune_24_magnitude`) or
``|w * grad|`` (:func:`prune_24_gradient`, the first-order Taylor estimate of the loss change). Ties
go to the lower position. The record stores only what NVIDIA's sparse tensor cores store: the kept
values ``(..., groups, 2)`` in the original dtype and their 2-bit positions packed (``i0 | i1 << 2``
per group, two groups per byte, the even group in the low nibble, ``i0 < i1``). So float32 weights
take 17 bits per value (1.88x), bfloat16 9 bits (1.78x).

A last dim that is not a multiple of 4 is padded with zeros inside and restored by
:func:`decompress`. NaN scores count as the largest; NaN weights are kept and propagate.
:func:`sparse_matmul` decompresses inside the jitted computation and multiplies densely: without
sparse tensor cores (CPU, or XLA on GPU) that is the fastest exact path; the saving is in the bytes.

Example:
    >>> import jax.numpy as jnp
    >>> from viva_tensor import sparsity
    >>> w = jnp.array([[0.1, -3.0, 2.0, 0.5, 1.0, 0.0, 0.0, -1.0]])
    >>> s = sparsity.prune_24_magnitude(w)
    >>> s.values.tolist(), s.positions.tolist()
    ([[[-3.0, 2.0], [1.0, -1.0]]], [[201]])
    >>> sparsity.decompress(s).tolist()
    [[0.0, -3.0, 2.0, 0.0, 1.0, 0.0, 0.0, -1.0]]
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from viva_tensor import _record
from viva_tensor.errors import DimensionError, DTypeError, InvalidShape, ShapeMismatch

__all__ = [
    "Sparse24Tensor",
    "SparsityMetrics",
    "prune_24_magnitude",
    "prune_24_gradient",
    "decompress",
    "sparse_matmul",
    "compute_metrics",
]

_FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@flax.struct.dataclass
class Sparse24Tensor(_record.QuantizedArray):
    """2:4 sparse weights: kept ``values`` ``(..., groups, 2)`` and packed 2-bit ``positions``.

    Attributes:
        values: the kept weights, in the original dtype, shape ``shape[:-1] + (groups, 2)`` with
            ``groups = ceil(shape[-1] / 4)``.
        positions: uint8, shape ``shape[:-1] + (ceil(groups / 2),)``: per group ``i0 | i1 << 2``
            (``i0 < i1`` in 0..3), the even group in the low nibble.
        shape: the dense shape (static). dtype: the original dtype (static).
    """

    values: jax.Array
    positions: jax.Array
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
    dtype: Any = flax.struct.field(pytree_node=False)

    format: ClassVar[str] = "sparse24"

    @staticmethod
    def _core_ndim(record) -> int:
        return len(record.shape) + 1


def _check_weights(w: Any, argument: str = "w") -> jax.Array:
    w = jnp.asarray(w)
    if jnp.dtype(w.dtype) not in _FLOAT_DTYPES:
        raise DTypeError(argument=argument, expected="a float32, bfloat16 or float16 array", got=str(w.dtype))
    if w.ndim == 0 or w.size == 0:
        raise InvalidShape(
            argument=argument, expected="a non-empty array of rank >= 1 (groups of 4 along the last axis)",
            got=tuple(w.shape),
        )
    return w


def _groups(a: jax.Array) -> jax.Array:
    """``(..., n)`` to ``(..., ceil(n / 4), 4)``, zero-padded."""
    pad = -a.shape[-1] % 4
    if pad:
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
    return a.reshape(*a.shape[:-1], a.shape[-1] // 4, 4)


@jax.jit
def _select(w: jax.Array, score: jax.Array) -> tuple[jax.Array, jax.Array]:
    wg, sg = _groups(w), _groups(score)
    _, idx = jax.lax.top_k(sg, 2)  # ties: the lower index first
    idx = jnp.sort(idx, axis=-1)
    values = jnp.take_along_axis(wg, idx, axis=-1)
    nibbles = (idx[..., 0] | (idx[..., 1] << 2)).astype(jnp.uint8)
    if nibbles.shape[-1] % 2:
        nibbles = jnp.pad(nibbles, [(0, 0)] * (nibbles.ndim - 1) + [(0, 1)])
    pairs = nibbles.reshape(*nibbles.shape[:-1], nibbles.shape[-1] // 2, 2)
    return values, pairs[..., 0] | (pairs[..., 1] << 4)


def prune_24_magnitude(w: jax.Array) -> Sparse24Tensor:
    """Keep the 2 weights of largest magnitude in every group of 4 along the last axis.

    Args:
        w: a float32, bfloat16 or float16 array of rank >= 1 (e.g. a ``(out, in)`` kernel).

    Returns:
        A :class:`Sparse24Tensor`.

    Raises:
        DTypeError: ``w`` is not float32, bfloat16 or float16.
        InvalidShape: ``w`` is a scalar or empty.

    Example:
        >>> import jax.numpy as jnp
        >>> decompress(prune_24_magnitude(jnp.array([1.0, -4.0, 3.0, 2.0]))).tolist()
        [0.0, -4.0, 3.0, 0.0]
    """
    w = _check_weights(w)
    values, positions = _select(w, jnp.abs(w.astype(jnp.float32)))
    return Sparse24Tensor(values, positions, shape=tuple(w.shape), dtype=jnp.dtype(w.dtype))


def prune_24_gradient(w: jax.Array, grad: jax.Array) -> Sparse24Tensor:
    """Keep the 2 weights of largest ``|w * grad|`` saliency in every group of 4 along the last axis.

    Args:
        w: a float32, bfloat16 or float16 array of rank >= 1.
        grad: the loss gradient with respect to ``w`` (same shape, floating).

    Returns:
        A :class:`Sparse24Tensor`.

    Raises:
        DTypeError: ``w`` or ``grad`` is not float32, bfloat16 or float16.
        InvalidShape: ``w`` is a scalar or empty.
        ShapeMismatch: ``grad`` has another shape.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([1.0, -4.0, 3.0, 2.0])
        >>> decompress(prune_24_gradient(w, jnp.array([5.0, 0.0, 1.0, 1.0]))).tolist()
        [1.0, 0.0, 3.0, 0.0]
    """
    w = _check_weights(w)
    g = jnp.asarray(grad)
    if g.shape != w.shape:
        raise ShapeMismatch(argument="grad", expected=f"shape {tuple(w.shape)} (the shape of 'w')", got=tuple(g.shape))
    g = _check_weights(g, "grad")
    score = jnp.abs(w.astype(jnp.float32) * g.astype(jnp.float32))
    values, positions = _select(w, score)
    return Sparse24Tensor(values, positions, shape=tuple(w.shape), dtype=jnp.dtype(w.dtype))


def _check_record(s: Any) -> Sparse24Tensor:
    if not isinstance(s, Sparse24Tensor):
        raise DTypeError(argument="s", expected="a Sparse24Tensor", got=type(s).__name__)
    return s


@jax.jit
def _decompress(s: Sparse24Tensor) -> jax.Array:
    lead = s.values.shape[:-2]
    groups = s.values.shape[-2]
    nibbles = jnp.stack([s.positions & 0x0F, s.positions >> 4], axis=-1).reshape(*lead, -1)[..., :groups]
    idx = jnp.stack([nibbles & 3, (nibbles >> 2) & 3], axis=-1).astype(jnp.int32)
    slot = jax.lax.broadcasted_iota(jnp.int32, (*lead, groups, 4), len(lead) + 1)
    zero = jnp.zeros((), s.values.dtype)
    dense = jnp.where(slot == idx[..., :1], s.values[..., :1], zero)
    dense = jnp.where(slot == idx[..., 1:], s.values[..., 1:], dense)
    return dense.reshape(*lead, groups * 4)[..., : s.shape[-1]]


def decompress(s: Sparse24Tensor) -> jax.Array:
    """The dense pruned weights (zeros where pruned), in the original shape and dtype.

    A record made under ``vmap`` can be decompressed outside it (batch dims first).

    Args:
        s: a :class:`Sparse24Tensor`.

    Returns:
        An array of shape ``batch + s.shape`` and dtype ``s.dtype``.

    Raises:
        DTypeError: ``s`` is not a :class:`Sparse24Tensor`.

    Example:
        >>> import jax.numpy as jnp
        >>> decompress(prune_24_magnitude(jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0]]))).tolist()
        [[0.0, 0.0, 3.0, 4.0, 5.0]]
    """
    return _decompress(_check_record(s))


def sparse_matmul(x: jax.Array, s: Sparse24Tensor, *, precision: Any = None) -> jax.Array:
    """``x @ w.T`` for 2:4 sparse weights ``w`` of shape ``(out, in)``: the layout of a Linear layer.

    Equal to the dense product with the pruned weights; the decompression happens inside the jitted
    computation, next to the matmul.

    Args:
        x: ``(..., in)`` activations (floating).
        s: a :class:`Sparse24Tensor` of shape ``(out, in)``.
        precision: passed to :func:`jax.numpy.matmul`.

    Returns:
        ``(..., out)``, in the promoted dtype of ``x`` and the weights.

    Raises:
        DTypeError: ``s`` is not a :class:`Sparse24Tensor`, or ``x`` is not floating.
        DimensionError: ``s`` is not 2-D, or made under vmap.
        ShapeMismatch: the last dim of ``x`` is not ``in``.

    Example:
        >>> import jax.numpy as jnp
        >>> s = prune_24_magnitude(jnp.array([[1.0, -4.0, 3.0, 2.0], [0.0, 1.0, 0.0, 1.0]]))
        >>> sparse_matmul(jnp.ones((1, 4)), s).tolist()
        [[-1.0, 2.0]]
    """
    s = _check_record(s)
    if len(s.shape) != 2 or s.batch_shape:
        raise DimensionError(
            argument="s", expected="a (out, in) weight made outside vmap", got=f"shape {s.batch_shape + s.shape}"
        )
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise DTypeError(argument="x", expected="a floating array", got=str(x.dtype))
    if x.ndim == 0 or x.shape[-1] != s.shape[1]:
        raise ShapeMismatch(
            argument="x", expected=f"a last dim of {s.shape[1]} (the input dim of 's')", got=tuple(x.shape)
        )
    return jnp.matmul(x, _decompress(s).T, precision=precision)


@flax.struct.dataclass
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
        >>> m = compute_metrics(w, prune_24_magnitude(w))
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
