"""Quantization quality metrics: errors, SQNR, cosine similarity, saliency.

Every metric compares an ``original`` array with its ``reconstructed`` version (for instance
``compression.dequantize(q)``), accumulates in float32 whatever the input dtypes, and returns a
float32 scalar ``jax.Array``, so it works under ``jit`` and ``vmap``. Shapes must agree exactly
(:class:`~viva_tensor.errors.ShapeMismatch` otherwise) and be non-empty
(:class:`~viva_tensor.errors.InvalidShape`); NaN or inf in the inputs propagate to the result.
float64 inputs are refused with :class:`~viva_tensor.errors.DTypeError` (convert with ``.astype(jnp.float32)``):
the metrics are float32, and narrowing silently would hide differences below float32's resolution.

Example:
    >>> import jax.numpy as jnp
    >>> from viva_tensor import metrics
    >>> x = jnp.array([1.0, -2.0, 3.0, -4.0])
    >>> x_hat = jnp.array([1.0, -2.0, 3.0, -3.0])
    >>> float(metrics.mse(x, x_hat)), round(float(metrics.snr_db(x, x_hat)), 2)
    (0.25, 14.77)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from viva_tensor._pytree import pytree_dataclass
from viva_tensor.errors import ConfigError, DTypeError, InvalidShape, ShapeMismatch
from viva_tensor.tensor import _array, _l2, _restore, _rms_parts, _scaled

__all__ = [
    "QuantMetrics",
    "mse",
    "mae",
    "rmse",
    "cosine_similarity",
    "snr_db",
    "theoretical_sqnr",
    "max_error",
    "error_percentile",
    "outlier_percentage",
    "compute_all",
    "compute_saliency",
    "find_salient_weights",
]


def _floating(x: Any, argument: str) -> jax.Array:
    if isinstance(x, (list, tuple)):
        try:
            x = jnp.asarray(x)
        except (TypeError, ValueError, OverflowError) as e:
            raise DTypeError(argument=argument, expected="a floating array",
                             got=f"a {type(x).__name__} ({e})") from None
    x = _array(x, argument)  # refuses float64 (it would be narrowed silently) and non-arrays
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise DTypeError(argument=argument, expected="a floating array", got=str(x.dtype))
    return x


def _float32(x: Any, argument: str) -> jax.Array:
    x = _floating(x, argument)
    if x.size == 0:
        raise InvalidShape(argument=argument, expected="a non-empty array", got=tuple(x.shape))
    return x.astype(jnp.float32)


def _pair(original: Any, reconstructed: Any) -> tuple[jax.Array, jax.Array]:
    a = _float32(original, "original")
    b = _floating(reconstructed, "reconstructed")
    if b.shape != a.shape:
        raise ShapeMismatch(
            argument="reconstructed",
            expected=f"shape {tuple(a.shape)} (the shape of 'original')",
            got=tuple(b.shape),
        )
    return a, b.astype(jnp.float32)


def _abs_error(original: Any, reconstructed: Any) -> jax.Array:
    a, b = _pair(original, reconstructed)
    return jnp.abs(a - b)


def mse(original: jax.Array, reconstructed: jax.Array) -> jax.Array:
    """Mean squared error ``mean((x - x_hat)**2)``.

    Args:
        original: a floating array.
        reconstructed: a floating array of the same shape.

    Returns:
        A float32 scalar.

    Raises:
        ShapeMismatch: the shapes differ.
        InvalidShape: the arrays are empty.
        DTypeError: an array is not floating.

    Example:
        >>> import jax.numpy as jnp
        >>> float(mse(jnp.array([1.0, 2.0]), jnp.array([1.0, 4.0])))
        2.0
    """
    # scaled by a power of two (exact): the sum of squares cannot overflow early, and rounds as the plain one
    err, e = _scaled(_abs_error(original, reconstructed))
    return _restore(_restore(jnp.mean(err * err), e), e)


def mae(original: jax.Array, reconstructed: jax.Array) -> jax.Array:
    """Mean absolute error ``mean(|x - x_hat|)``.

    Args:
        original: a floating array.
        reconstructed: a floating array of the same shape.

    Returns:
        A float32 scalar.

    Raises:
        ShapeMismatch, InvalidShape, DTypeError: as :func:`mse`.

    Example:
        >>> import jax.numpy as jnp
        >>> float(mae(jnp.array([1.0, 2.0]), jnp.array([1.0, 4.0])))
        1.0
    """
    err, e = _scaled(_abs_error(original, reconstructed))  # scaled: the sum cannot overflow early (3e38 + 3e38)
    return _restore(jnp.mean(err), e)


def rmse(original: jax.Array, reconstructed: jax.Array) -> jax.Array:
    """Root mean squared error ``sqrt(mse)``.

    Args:
        original: a floating array.
        reconstructed: a floating array of the same shape.

    Returns:
        A float32 scalar.

    Raises:
        ShapeMismatch, InvalidShape, DTypeError: as :func:`mse`.

    Example:
        >>> import jax.numpy as jnp
        >>> float(rmse(jnp.array([0.0, 0.0]), jnp.array([3.0, -3.0])))
        3.0
    """
    return _l2(_abs_error(original, reconstructed))  # scaled: no overflow of err**2 at 2e19


def cosine_similarity(original: jax.Array, reconstructed: jax.Array) -> jax.Array:
    """Cosine of the angle between the two arrays, flattened: ``<x, y> / (|x| |y|)``.

    Two all-zero arrays are identical (1.0); one all-zero array against a non-zero one gives 0.0.

    Args:
        original: a floating array.
        reconstructed: a floating array of the same shape.

    Returns:
        A float32 scalar in ``[-1, 1]``.

    Raises:
        ShapeMismatch, InvalidShape, DTypeError: as :func:`mse`.

    Example:
        >>> import jax.numpy as jnp
        >>> round(float(cosine_similarity(jnp.array([1.0, 0.0]), jnp.array([1.0, 1.0]))), 6)
        0.707107
    """
    a, b = _pair(original, reconstructed)
    a, b = a.reshape(-1), b.reshape(-1)
    # each side scaled by its largest magnitude (the cosine does not change), so that neither 3e38 (squares
    # overflow) nor 1e-30 (squares flush to 0) spoils it
    (a, _), (b, _) = _scaled(a), _scaled(b)
    ra, rb = jnp.sqrt(jnp.sum(a * a)), jnp.sqrt(jnp.sum(b * b))
    dot = jnp.sum(a * b)
    denom = ra * rb
    cos = dot / jnp.where(denom > 0, denom, jnp.float32(1))
    both_zero = (ra == 0) & (rb == 0)
    out = jnp.where(denom > 0, jnp.clip(cos, -1.0, 1.0), jnp.where(both_zero, 1.0, 0.0))
    return jnp.where(jnp.isnan(denom) | jnp.isnan(dot), jnp.nan, out).astype(jnp.float32)


def snr_db(original: jax.Array, reconstructed: jax.Array) -> jax.Array:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum(x**2) / sum((x - x_hat)**2))``.

    ``+inf`` when the reconstruction is exact (including an all-zero signal reconstructed exactly);
    ``-inf`` for a zero signal with a non-zero reconstruction.

    Args:
        original: the signal ``x``.
        reconstructed: ``x_hat``, of the same shape.

    Returns:
        A float32 scalar (dB).

    Raises:
        ShapeMismatch, InvalidShape, DTypeError: as :func:`mse`.

    Example:
        >>> import jax.numpy as jnp
        >>> float(snr_db(jnp.array([3.0, 4.0]), jnp.array([3.0, 4.5])))  # 10 log10(25 / 0.25)
        20.0
        >>> float(snr_db(jnp.ones(3), jnp.ones(3)))
        inf
    """
    a, b = _pair(original, reconstructed)
    # in the log domain, each sum of squares scaled by its largest term: 10 log10(S / N) with
    # sqrt(S) = ms * rs and sqrt(N) = mn * rn, finite for any finite inputs (1e-30 and 3e38 included)
    rs, es = _rms_parts(a, jnp.sum)
    rn, en = _rms_parts(a - b, jnp.sum)
    one = jnp.float32(1)
    finite = 20.0 * (jnp.log10(jnp.where(rs > 0, rs, one)) - jnp.log10(jnp.where(rn > 0, rn, one))
                     + (es - en).astype(jnp.float32) * jnp.float32(math.log10(2.0)))
    out = jnp.where(rn > 0, jnp.where(rs > 0, finite, -jnp.inf), jnp.inf)
    return jnp.where(jnp.isnan(rs) | jnp.isnan(rn), jnp.nan, out).astype(jnp.float32)


def theoretical_sqnr(bits: float) -> float:
    """The SQNR of an ideal uniform quantizer of a full-scale sine: ``6.02 * bits + 1.76`` dB.

    Args:
        bits: bits per value (positive).

    Returns:
        A Python float (dB).

    Raises:
        ConfigError: ``bits`` is not a positive number.

    Example:
        >>> round(theoretical_sqnr(8), 2), round(theoretical_sqnr(4), 2)
        (49.92, 25.84)
    """
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not bits > 0 or not math.isfinite(bits):
        raise ConfigError(argument="bits", expected="a positive number", got=bits)
    return 6.02 * float(bits) + 1.76


def max_error(original: jax.Array, reconstructed: jax.Array) -> jax.Array:
    """Largest absolute error ``max(|x - x_hat|)``.

    Args:
        original: a floating array.
        reconstructed: a floating array of the same shape.

    Returns:
        A float32 scalar.

    Raises:
        ShapeMismatch, InvalidShape, DTypeError: as :func:`mse`.

    Example:
        >>> import jax.numpy as jnp
        >>> float(max_error(jnp.array([1.0, 2.0, 3.0]), jnp.array([1.5, 2.0, 1.0])))
        2.0
    """
    return jnp.max(_abs_error(original, reconstructed))


def _check_percent(value: Any, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise ConfigError(argument=argument, expected="a number in [0, 100]", got=value)
    return float(value)


def error_percentile(original: jax.Array, reconstructed: jax.Array, percentile: float = 99.0) -> jax.Array:
    """A percentile of the absolute error (linear interpolation, as ``numpy.percentile``).

    Args:
        original: a floating array.
        reconstructed: a floating array of the same shape.
        percentile: in ``[0, 100]`` (a Python number); 50 is the median, 100 the max error.

    Returns:
        A float32 scalar.

    Raises:
        ConfigError: ``percentile`` outside ``[0, 100]``.
        ShapeMismatch, InvalidShape, DTypeError: as :func:`mse`.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.zeros(5)
        >>> float(error_percentile(x, jnp.array([0.0, 1.0, 2.0, 3.0, 4.0]), 50))
        2.0
    """
    q = _check_percent(percentile, "percentile")
    err = _abs_error(original, reconstructed).reshape(-1)
    # numpy.percentile's linear rule, written out: sizes are static, so the two neighbours are known. Equal
    # neighbours give themselves (jnp.percentile computed inf + (inf - inf) * t = NaN for all-inf errors).
    pos = q / 100.0 * (err.size - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    srt = jnp.sort(err)
    a, b = srt[lo], srt[hi]
    value = jnp.where(a == b, a, a + (b - a) * jnp.float32(pos - lo))
    return jnp.where(jnp.any(jnp.isnan(err)), jnp.nan, value).astype(jnp.float32)


def outlier_percentage(original: jax.Array, reconstructed: jax.Array, *, threshold: float = 3.0) -> jax.Array:
    """Share (in %) of values whose absolute error exceeds ``threshold`` times the RMSE.

    A quantizer with a few badly reconstructed values (clipped outliers, a spoiled block) shows here
    long before it moves the MSE. An exact reconstruction has no outliers (0.0).

    Args:
        original: a floating array.
        reconstructed: a floating array of the same shape.
        threshold: a positive multiple of the RMSE.

    Returns:
        A float32 scalar in ``[0, 100]``.

    Raises:
        ConfigError: ``threshold`` is not positive.
        ShapeMismatch, InvalidShape, DTypeError: as :func:`mse`.

    Example:
        >>> import jax.numpy as jnp
        >>> err = jnp.array([0.0] * 99 + [10.0])
        >>> float(outlier_percentage(jnp.zeros(100), err))
        1.0
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ConfigError(argument="threshold", expected="a positive number", got=threshold)
    err = _abs_error(original, reconstructed)
    limit = jnp.float32(threshold) * _l2(err)
    return (100.0 * jnp.mean((err > limit).astype(jnp.float32))).astype(jnp.float32)


@pytree_dataclass
class QuantMetrics:
    """Every metric of a reconstruction at once (a frozen pytree: float32 scalars as children).

    Attributes:
        mse, mae, rmse, max_error: error statistics.
        cosine_similarity: of the flattened arrays.
        snr_db: SQNR in dB (``+inf`` when exact).
        p99_error: the 99th percentile of the absolute error.
        outlier_percentage: % of errors above 3 x RMSE.
    """

    mse: jax.Array
    mae: jax.Array
    rmse: jax.Array
    max_error: jax.Array
    cosine_similarity: jax.Array
    snr_db: jax.Array
    p99_error: jax.Array
    outlier_percentage: jax.Array


def compute_all(original: jax.Array, reconstructed: jax.Array) -> QuantMetrics:
    """All metrics of :class:`QuantMetrics` for one reconstruction.

    Args:
        original: a floating array.
        reconstructed: a floating array of the same shape.

    Returns:
        A :class:`QuantMetrics`.

    Raises:
        ShapeMismatch, InvalidShape, DTypeError: as :func:`mse`.

    Example:
        >>> import jax.numpy as jnp
        >>> m = compute_all(jnp.array([1.0, -1.0]), jnp.array([1.0, -0.5]))
        >>> float(m.mse), float(m.max_error), round(float(m.snr_db), 2)
        (0.125, 0.5, 9.03)
    """
    return QuantMetrics(
        mse=mse(original, reconstructed),
        mae=mae(original, reconstructed),
        rmse=rmse(original, reconstructed),
        max_error=max_error(original, reconstructed),
        cosine_similarity=cosine_similarity(original, reconstructed),
        snr_db=snr_db(original, reconstructed),
        p99_error=error_percentile(original, reconstructed, 99.0),
        outlier_percentage=outlier_percentage(original, reconstructed),
    )


def compute_saliency(
    weights: jax.Array, *, gradients: jax.Array | None = None, activation_norms: jax.Array | None = None
) -> jax.Array:
    """Importance of each weight: ``|w|``, times ``|grad|`` and/or the activation norm of its input.

    ``|w * grad|`` is the first-order Taylor estimate of the loss change when a weight is removed;
    ``|w| * ||a_j||`` (``activation_norms`` along the LAST axis of ``weights``, the input features in
    the ``x @ w.T`` layout) is the Wanda / AWQ-style activation-aware score. Both may be combined.

    Args:
        weights: a floating array.
        gradients: optional, the same shape as ``weights``.
        activation_norms: optional, shape ``(weights.shape[-1],)``.

    Returns:
        A float32 array of ``weights.shape``.

    Raises:
        ShapeMismatch: ``gradients`` or ``activation_norms`` have the wrong shape.
        InvalidShape, DTypeError: empty or non-floating ``weights``.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[1.0, -2.0], [0.5, 0.0]])
        >>> compute_saliency(w, gradients=jnp.array([[0.1, 0.1], [-4.0, 9.0]])).tolist()
        [[0.10000000149011612, 0.20000000298023224], [2.0, 0.0]]
        >>> compute_saliency(w, activation_norms=jnp.array([2.0, 1.0])).tolist()
        [[2.0, 2.0], [1.0, 0.0]]
    """
    w = _float32(weights, "weights")
    score = jnp.abs(w)
    if gradients is not None:
        g = _floating(gradients, "gradients")
        if g.shape != w.shape:
            raise ShapeMismatch(
                argument="gradients", expected=f"shape {tuple(w.shape)} (the shape of 'weights')", got=tuple(g.shape)
            )
        score = score * jnp.abs(_float32(g, "gradients"))
    if activation_norms is not None:
        a = _floating(activation_norms, "activation_norms")
        if w.ndim == 0 or a.shape != (w.shape[-1],):
            raise ShapeMismatch(
                argument="activation_norms",
                expected=f"shape ({w.shape[-1] if w.ndim else '?'},) (the last dim of 'weights')",
                got=tuple(a.shape),
            )
        score = score * jnp.abs(_float32(a, "activation_norms")).reshape((1,) * (w.ndim - 1) + a.shape)
    return score


def find_salient_weights(saliency: jax.Array, *, top_percent: float = 1.0) -> jax.Array:
    """A boolean mask of the ``top_percent`` % most salient weights.

    Exactly ``ceil(size * top_percent / 100)`` entries are True; ties go to the lower flat index.

    Args:
        saliency: a floating array of scores (see :func:`compute_saliency`).
        top_percent: in ``[0, 100]`` (a Python number).

    Returns:
        A bool array of ``saliency.shape``.

    Raises:
        ConfigError: ``top_percent`` outside ``[0, 100]``.
        InvalidShape, DTypeError: empty or non-floating ``saliency``.

    Example:
        >>> import jax.numpy as jnp
        >>> find_salient_weights(jnp.array([[0.1, 3.0], [2.0, 0.5]]), top_percent=50).tolist()
        [[False, True], [True, False]]
    """
    percent = _check_percent(top_percent, "top_percent")
    s = _float32(saliency, "saliency")
    k = math.ceil(s.size * percent / 100.0 - 1e-9)
    flat = s.reshape(-1)
    if k == 0:
        return jnp.zeros(s.shape, bool)
    _, idx = jax.lax.top_k(flat, k)
    return jnp.zeros(flat.shape, bool).at[idx].set(True).reshape(s.shape)
