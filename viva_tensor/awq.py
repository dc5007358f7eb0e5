"""Activation-aware weight quantization (AWQ, Lin et al. 2023) with group-wise 4-bit integers.

A linear layer ``y = x @ W^T`` (``W`` of shape ``(out, in)``, PyTorch's layout, as
:class:`viva_tensor.nn.QLinear` holds it) loses most accuracy at 4 bits on the few input channels
whose activations are large. AWQ protects them without mixed precision: it multiplies the weight's
input channels by ``s`` before quantizing and divides the activations by ``s``, since
``x @ W^T = (x / s) @ (W * s)^T``. The scales are searched, as in the paper and its reference code
(llm-awq ``auto_scale.py``):

1. ``stat[c] = mean |x[:, c]|`` over calibration activations (:func:`collect_activation_stats`);
2. for ``alpha`` in ``{0, 1/20, ..., 19/20}``: ``s = max(stat ** alpha, 1e-4)``, normalised by
   ``sqrt(max(s) * min(s))`` (:func:`compute_awq_scales`); the layer's output on the calibration
   data with the quantized weight ``Q(W * s) / s`` is compared with the float output;
3. the ``alpha`` with the lowest output MSE wins (the first one on a tie; ``alpha = 0`` is plain
   quantization, so the search never does worse than it on the calibration data).

An optional clipping search (llm-awq ``auto_clip.py``, ``AWQConfig(clip=True)``) then shrinks each
group's max ``|w|`` by ``1 - i/20`` for ``i < 10`` and keeps, per output row and group, the shrink
with the lowest MSE of that group's partial outputs on (at most ~512) calibration tokens.

The quantizer (:func:`quantize_group`, also the plain baseline, format ``"int4_group"``) is
llm-awq's ``pseudo_quantize_tensor`` with zero points, in float32, with storage rounding made part
of the definition: per group of ``group_size`` consecutive input channels of a row, with
``hi = max(max, 0)`` and ``lo = min(min, 0)``,
``scale = float16(max(hi - lo, 1e-5) / 15)``, ``zero = clip(-round(lo / scale), 0, 15)``,
``code = clip(round(w / scale) + zero, 0, 15)`` (round half to even, with the float16 ``scale``
read back as float32), value ``(code - zero) * scale``. Divisions are correctly rounded (XLA
would otherwise multiply by a rounded reciprocal of a broadcast divisor under ``jit``), so the codes
are the same eagerly, under ``jit`` and in NumPy.

Storage (real bytes): ``codes`` uint8 ``(out, ceil(in / 2))``, two codes a byte along the input axis,
the even column in the LOW nibble; ``scales`` float16 ``(out, n_groups)``; ``zeros`` uint8
``(out, ceil(n_groups / 2))``, packed the same way (llm-awq packs its zero points in 4 bits too).
An :class:`AWQTensor` (format ``"awq_int4"``) adds ``act_scale`` float16 ``(in,)``: the AWQ scales
``s``, rounded to float16 BEFORE the weight is scaled (so the search, the codes and inference all use
the same ``s``). Its :func:`dequantize` is ``Q(W * s) / s``, an approximation of ``W``, so
:func:`viva_tensor.quant.dot_general` and :class:`viva_tensor.nn.QLinear` compute the AWQ layer with
no extra hook; :func:`awq_matmul` computes ``(x / s) @ Q(W * s)^T`` instead (the same product, the
division on the activations).

Where the inverse scales go. llm-awq folds ``1 / s`` into the operation before the layer: a norm's
weight and bias (:func:`fold_into_layernorm`) or the previous linear's output rows
(:func:`fold_into_linear`); the folded layer is then a plain ``int4_group`` record of ``W * s``. That
is exact only when the previous operation feeds nothing but the scaled layers. In a post-LN BERT
(MiniLM) the LayerNorm output also feeds the residual, and the FFN's second layer follows a GELU, so
only the attention output projection could be folded (into the value projection); the record
therefore carries ``act_scale`` (``in`` float16 values, ~0.04 bits per weight for a 384-wide layer).

Decisions:

- The range of a group always holds 0 (as GPTQ's quantizer). llm-awq uses the group's own min and
  max and clamps the zero point to 0..15, so a group that does not straddle 0 (e.g. all values in
  [1.0, 1.1]) decodes to values in [0, 0.1]: a silent wrong answer. For the groups of real weights,
  which straddle 0, both definitions give the same codes.

- A group size that does not divide ``in``: the last group is shorter (padded inside with copies of
  its last value, which change neither its min nor its max; no code is stored for the padding).
  ``group_size >= in`` makes one group per row.
- By name without activations, ``quant.quantize(w, "awq_int4")`` uses ``s = 1`` (the search's
  ``alpha = 0``): the record is then plain group-int4 plus unit scales. Pass ``calibration=`` (the
  layer's inputs) to search, or ``scales=``.
- Non-finite weights: a group holding a NaN or an infinity gets a NaN scale and dequantizes to NaN;
  other groups are untouched. ``validate=True`` raises :class:`~viva_tensor.errors.NonFiniteError`
  (eagerly). A NaN output loss counts as infinite in the searches.
- float16 scales: a group range above ~9.8e5 (after AWQ scaling) overflows to an infinite scale and
  that group dequantizes to NaN, as with any float16-scale format. The AWQ scales ``s`` are clamped to
  float16's normal range ``[2**-14, 65504]`` before they are used (reached only when the activation
  statistics span more than ~9 decades).
- Empty arrays raise :class:`~viva_tensor.errors.InvalidShape`. A weight is ``(out, in)``; the
  quantizers also take any rank >= 1 (groups run along the last axis, every leading dim is a row),
  so ``quant.quantize`` and ``viva-tensor report`` work on any tensor; the matmuls need 2-D records.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from viva_tensor import awq
    >>> kw, kx = jax.random.split(jax.random.key(0))
    >>> w = jax.random.normal(kw, (64, 256))
    >>> x = jax.random.normal(kx, (512, 256)) * jnp.where(jnp.arange(256) < 4, 30.0, 1.0)[None, :]
    >>> q = awq.quantize_awq(w, x)
    >>> plain = awq.quantize_group(w)
    >>> mse = lambda wq: float(jnp.mean((x @ w.T - x @ wq.T) ** 2))
    >>> mse(awq.dequantize(q)) < mse(awq.dequantize(plain))
    True
    >>> q.nbytes, plain.nbytes, q.act_scale.dtype.name
    (9024, 8512, 'float16')
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from viva_tensor._formats import packing
from viva_tensor._formats.checks import float_input, positive_int, validate_finite, validate_scale_range
from viva_tensor._formats.record import QuantizedArray, record, static
from viva_tensor._formats.registry import Planes, check_record, register_format
from viva_tensor.errors import ConfigError, DimensionError, FormatError, ShapeMismatch

__all__ = [
    "AWQConfig",
    "AWQSearch",
    "GroupInt4Tensor",
    "AWQTensor",
    "default_config",
    "collect_activation_stats",
    "compute_awq_scales",
    "identify_salient_channels",
    "apply_weight_transform",
    "apply_activation_transform",
    "fold_into_layernorm",
    "fold_into_linear",
    "search_scales",
    "search_clip",
    "quantize_group",
    "quantize_awq",
    "dequantize",
    "dequantize_awq",
    "awq_matmul",
    "output_mse",
]

_MAX_CODE = 15  # 4-bit codes 0..15
_MIN_RANGE = 1e-5  # llm-awq's clamp of (max - min)
_MIN_SCALE = 1e-4  # llm-awq's clamp of stat ** alpha


# ----------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class AWQConfig:
    """Options of the AWQ search and quantizer (defaults: llm-awq's w4 g128 recipe).

    Attributes:
        group_size: input channels per quantization group (llm-awq: 128).
        n_grid: grid points of ``alpha`` in ``[0, 1)``: ``alpha = i / n_grid`` (llm-awq: 20).
        duo_scaling: AutoAWQ's variant ``s = stat ** alpha / (w_mean ** (1 - alpha) + 1e-4)``, where
            ``w_mean`` is the mean over output rows of ``|w|`` relative to its group's max.
        clip: run the clipping search after the scale search (llm-awq's ``auto_clip``).
        clip_grid: shrink steps ``1 - i / clip_grid`` of the clipping search.
        max_shrink: the clipping search tries ``i < max_shrink * clip_grid``.
        clip_tokens: calibration tokens the clipping search samples (every ``N // clip_tokens``-th).
        salient_percent: the share of channels :func:`identify_salient_channels` calls salient.

    Example:
        >>> AWQConfig(group_size=64).n_grid
        20
    """

    group_size: int = 128
    n_grid: int = 20
    duo_scaling: bool = False
    clip: bool = False
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512
    salient_percent: float = 1.0

    def __post_init__(self):
        for name in ("group_size", "n_grid", "clip_grid", "clip_tokens"):
            _positive_int(name, getattr(self, name))
        if not 0.0 < float(self.max_shrink) < 1.0:
            raise ConfigError(argument="max_shrink", expected="a float in (0, 1)", got=self.max_shrink)
        if not 0.0 < float(self.salient_percent) <= 100.0:
            raise ConfigError(argument="salient_percent", expected="a percentage in (0, 100]", got=self.salient_percent)


def default_config() -> AWQConfig:
    """The default AWQ options: groups of 128, a 20-point alpha grid, no clipping search.

    Returns:
        ``AWQConfig()``.

    Example:
        >>> default_config().group_size, default_config().clip
        (128, False)
    """
    return AWQConfig()


class AWQSearch(NamedTuple):
    """What :func:`search_scales` found: the scales, their ``alpha``, and the loss of every ``alpha``."""

    scales: jax.Array  # float32 (in,), already rounded to float16 values
    alpha: jax.Array  # float32 scalar
    losses: jax.Array  # float32 (n_grid,): output MSE for alpha = i / n_grid


# ----------------------------------------------------------------------------------------- records


@record("int4_group", core_ndim=2)
class GroupInt4Tensor(QuantizedArray):
    """Group-wise asymmetric 4-bit weights ``(out, in)``: packed codes, float16 scales, packed zeros.

    Attributes:
        codes: uint8 ``(out, ceil(in / 2))``; column ``2j`` in the low nibble of byte ``j``.
        scales: float16 ``(out, n_groups)`` when quantized here; a record read from a compressed-tensors
            file keeps that file's float32 or bfloat16 scales exactly (decoding is in float32 either way).
        zeros: uint8 ``(out, ceil(n_groups / 2))``; zero points 0..15 packed like the codes.
        shape: ``(out, in)`` (static). dtype: the original dtype (static). group_size: static.
    """

    codes: jax.Array
    scales: jax.Array
    zeros: jax.Array
    group_size: int = static(default=128)

    # The record checks (registry.check_record) accept scales of any float dtype, for the reason above.
    float_buffers_any_float_dtype: ClassVar[bool] = True


@record("awq_int4", core_ndim=2)
class AWQTensor(QuantizedArray):
    """An AWQ-quantized weight: the group-int4 record of ``W * s`` and the scales ``s`` (float16, ``(in,)``).

    Decodes to ``Q(W * s) / s`` (:func:`dequantize`); fields as :class:`GroupInt4Tensor`, plus
    ``act_scale``.
    """

    codes: jax.Array
    scales: jax.Array
    zeros: jax.Array
    act_scale: jax.Array
    group_size: int = static(default=128)


# ----------------------------------------------------------------------------------------- checks


def _positive_int(name: str, value: Any) -> int:
    return positive_int(name, value)


def _as_float(x: Any, name: str) -> jax.Array:
    return float_input(x, name)


def _weight(w: Any, name: str = "w") -> jax.Array:
    w = _as_float(w, name)
    if w.ndim != 2:
        raise DimensionError(
            argument=name, expected="a 2-D weight (out, in)", got=tuple(w.shape),
            hint="nnx.Linear's kernel is (in, out): pass kernel.T; vmap over a stack of weights.",
        )
    return w


def _rows_of(w: Any, name: str = "w") -> tuple[jax.Array, jax.Array]:
    """A weight of any rank >= 1 and its 2-D view ``(rows, in)``: groups run along the last axis."""
    w = _as_float(w, name)
    if w.ndim == 0:
        raise DimensionError(argument=name, expected="an array of rank >= 1 (..., in)", got="a scalar")
    return w, w.reshape(-1, w.shape[-1])


def _features(x: Any, n: int, name: str) -> jax.Array:
    x = _as_float(x, name)
    if x.ndim < 1 or x.shape[-1] != n:
        want = f"shape (..., {n}) (in = the weight's input dim)"
        raise ShapeMismatch(argument=name, expected=want, got=tuple(x.shape))
    return x


def _vector(s: Any, n: int, name: str) -> jax.Array:
    s = _as_float(s, name)
    if s.shape != (n,):
        raise ShapeMismatch(argument=name, expected=f"shape ({n},)", got=tuple(s.shape))
    return s


def _config(config: AWQConfig | None, group_size: int | None) -> AWQConfig:
    if config is None:
        config = AWQConfig() if group_size is None else AWQConfig(group_size=_positive_int("group_size", group_size))
    elif not isinstance(config, AWQConfig):
        raise ConfigError(argument="config", expected="an AWQConfig", got=type(config).__name__)
    elif group_size is not None and group_size != config.group_size:
        raise ConfigError(
            argument="group_size", expected=f"None or config.group_size={config.group_size}", got=group_size,
            hint="set the group size in one place.",
        )
    return config


# ----------------------------------------------------------------------------------------- core


def _div(a: jax.Array, b: Any) -> jax.Array:
    """``a / b`` correctly rounded: ``b`` is broadcast to ``a``'s shape behind an optimization barrier,
    so XLA cannot replace the division by a product with a rounded reciprocal."""
    return a / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(b, a.dtype), a.shape))


def _n_groups(k: int, group: int) -> int:
    return -(-k // min(group, k))


def _groups(w: jax.Array, group: int, mode: str = "edge") -> jax.Array:
    """``(..., k)`` -> ``(..., n_groups, group)``, the last group padded (``edge``: copies of its last value)."""
    k = w.shape[-1]
    group = min(group, k)
    ng = -(-k // group)
    pad = ng * group - k
    if pad:
        w = jnp.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, pad)], mode=mode)
    return w.reshape(*w.shape[:-1], ng, group)


def _quant_core(w32: jax.Array, group: int, clip: jax.Array | None = None):
    """Codes ``(..., ng, g)``, float16 scales and float32 zeros ``(..., ng)`` of a float32 weight."""
    g = _groups(w32, group)
    if clip is not None:
        g = jnp.clip(g, -clip[..., None], clip[..., None])
    finite = jnp.all(jnp.isfinite(g), axis=-1)
    # The range always holds 0 (as GPTQ's quantizer; llm-awq does not, see the module docstring).
    hi = jnp.maximum(jnp.max(g, axis=-1), 0.0)
    lo = jnp.minimum(jnp.min(g, axis=-1), 0.0)
    scale = _div(jnp.maximum(hi - lo, jnp.float32(_MIN_RANGE)), jnp.float32(_MAX_CODE)).astype(jnp.float16)
    scale = jnp.where(finite, scale, jnp.float16(jnp.nan))
    s32 = scale.astype(jnp.float32)
    zero = jnp.where(finite, jnp.clip(-jnp.round(_div(lo, s32)), 0, _MAX_CODE), 0.0)
    code = jnp.clip(jnp.round(_div(g, s32[..., None])) + zero[..., None], 0, _MAX_CODE)
    code = jnp.where(finite[..., None], code, 0.0)
    return code.astype(jnp.uint8), scale, zero


def _dequant_core(code: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
    # (code - zero) is a small integer and scale a float16: the product is exact in float32.
    return (code.astype(jnp.float32) - zero.astype(jnp.float32)[..., None]) * scale.astype(jnp.float32)[..., None]


def _fake_quant(w32: jax.Array, group: int, clip: jax.Array | None = None) -> jax.Array:
    """``dequantize(quantize(w))`` in float32, same shape as ``w32`` (the search's quantizer)."""
    deq = _dequant_core(*_quant_core(w32, group, clip))
    return deq.reshape(*deq.shape[:-2], -1)[..., : w32.shape[-1]]


def _pack(codes: jax.Array) -> jax.Array:
    """``(..., n)`` codes 0..15 -> ``(..., ceil(n / 2))`` bytes, the even index in the low nibble."""
    return packing.pack_pairs(codes)


def _unpack(packed: jax.Array, n: int) -> jax.Array:
    return packing.unpack_pairs(packed, n)


def _stored_scales(s: jax.Array) -> jax.Array:
    """AWQ scales as they are stored (float16, clamped to its normal range) and used (read back as float32)."""
    s = jnp.clip(s.astype(jnp.float32), jnp.float32(2.0**-14), jnp.float32(65504.0))
    return s.astype(jnp.float16).astype(jnp.float32)


def _mse(a: jax.Array, b: jax.Array) -> jax.Array:
    d = a - b
    return jnp.mean(d * d)


def _nan_to_inf(losses: jax.Array) -> jax.Array:
    return jnp.where(jnp.isnan(losses), jnp.float32(jnp.inf), losses)


def _matmul_t(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w^T`` in float32 at full precision."""
    return jnp.einsum("...k,ok->...o", x, w, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _weight_mean(w32: jax.Array, group: int) -> jax.Array:
    g = jnp.abs(_groups(w32, group))
    rel = g / (jnp.max(g, axis=-1, keepdims=True) + 1e-6)
    rel = rel.reshape(*rel.shape[:-2], -1)[..., : w32.shape[-1]]
    return jnp.mean(rel, axis=-2)


def _scales_formula(stats: jax.Array, alpha: jax.Array, w_mean: jax.Array | None) -> jax.Array:
    s = jnp.power(stats, alpha)
    if w_mean is not None:
        s = s / (jnp.power(w_mean, 1.0 - alpha) + 1e-4)
    s = jnp.maximum(s, jnp.float32(_MIN_SCALE))
    s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))
    return jnp.where(jnp.isfinite(s), s, jnp.float32(1.0))


@functools.partial(jax.jit, static_argnames=("group", "n_grid", "duo"))
def _search_core(w32, x32, stats, *, group, n_grid, duo):
    reference = _matmul_t(x32, w32)
    w_mean = _weight_mean(w32, group) if duo else None

    def loss(alpha):
        s = _stored_scales(_scales_formula(stats, alpha, w_mean))
        wq = _div(_fake_quant(w32 * s[None, :], group), s)
        return _mse(reference, _matmul_t(x32, wq))

    alphas = jnp.arange(n_grid, dtype=jnp.float32) / jnp.float32(n_grid)
    losses = jax.lax.map(loss, alphas)
    best = jnp.argmin(_nan_to_inf(losses))
    return _stored_scales(_scales_formula(stats, alphas[best], w_mean)), alphas[best], losses


@functools.partial(jax.jit, static_argnames=("group", "steps", "grid"))
def _clip_core(w32, x32, *, group, steps, grid):
    xg = _groups(x32, group, mode="constant")  # (N, ng, g): padding columns meet zero inputs
    wg = _groups(w32, group)  # (out, ng, g)
    hp = jax.lax.Precision.HIGHEST
    reference = jnp.einsum("ngk,ogk->ong", xg, wg, precision=hp)
    org_max = jnp.max(jnp.abs(wg), axis=-1)  # (out, ng)

    def err(i):
        max_val = org_max * (1.0 - i.astype(jnp.float32) / grid)
        q = _dequant_core(*_quant_core(w32, group, max_val))
        out = jnp.einsum("ngk,ogk->ong", xg, q, precision=hp)
        d = out - reference
        return jnp.mean(d * d, axis=1), max_val  # (out, ng)

    errs, max_vals = jax.lax.map(err, jnp.arange(steps))
    best = jnp.argmin(_nan_to_inf(errs), axis=0)
    return jnp.take_along_axis(max_vals, best[None], axis=0)[0]


# ----------------------------------------------------------------------------------------- statistics


def collect_activation_stats(x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Mean absolute activation per input channel: ``stat[c] = mean |x[..., c]|`` (float32).

    Args:
        x: calibration inputs of a layer, ``(..., in)`` (e.g. ``(batch, tokens, in)``).
        mask: optional boolean ``x.shape[:-1]``: only rows where it is ``True`` count (padding tokens
            out). No row selected gives zeros.

    Returns:
        float32 ``(in,)``.

    Raises:
        DTypeError: a non-floating ``x``. InvalidShape: an empty ``x``.
        ShapeMismatch: a mask of another shape.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([[1.0, -2.0], [3.0, 0.0], [100.0, 100.0]])
        >>> collect_activation_stats(x, mask=jnp.array([True, True, False])).tolist()
        [2.0, 1.0]
    """
    x = _as_float(x, "x")
    a = jnp.abs(x.astype(jnp.float32)).reshape(-1, x.shape[-1])
    if mask is None:
        return jnp.mean(a, axis=0)
    mask = jnp.asarray(mask)
    if mask.shape != x.shape[:-1]:
        want = f"shape {x.shape[:-1]} (x's shape without its last dim)"
        raise ShapeMismatch(argument="mask", expected=want, got=mask.shape)
    m = mask.reshape(-1, 1).astype(jnp.float32)
    return jnp.sum(a * m, axis=0) / jnp.maximum(jnp.sum(m), 1.0)


def compute_awq_scales(stats: jax.Array, alpha: float, *, w_mean: jax.Array | None = None) -> jax.Array:
    """AWQ's per-channel scales for one ``alpha``: ``s = max(stat ** alpha, 1e-4) / sqrt(max(s) * min(s))``.

    Args:
        stats: float ``(in,)``, from :func:`collect_activation_stats`.
        alpha: the exponent (the search tries ``i / 20``).
        w_mean: optional ``(in,)`` (AutoAWQ's ``duo_scaling``): ``s = stat ** alpha / (w_mean ** (1 - alpha) + 1e-4)``
            before the clamp.

    Returns:
        float32 ``(in,)``; a non-finite entry becomes 1.

    Raises:
        DimensionError: ``stats`` is not 1-D. ShapeMismatch: ``w_mean`` of another shape.

    Example:
        >>> import jax.numpy as jnp
        >>> [round(v, 3) for v in compute_awq_scales(jnp.array([1.0, 4.0, 16.0]), 0.5).tolist()]
        [0.5, 1.0, 2.0]
    """
    stats = _as_float(stats, "stats")
    if stats.ndim != 1:
        raise DimensionError(argument="stats", expected="a 1-D array (in,)", got=tuple(stats.shape))
    if w_mean is not None:
        w_mean = _vector(w_mean, stats.shape[0], "w_mean").astype(jnp.float32)
    return _scales_formula(stats.astype(jnp.float32), jnp.float32(alpha), w_mean)


def identify_salient_channels(stats: jax.Array, *, top_percent: float = 1.0) -> jax.Array:
    """The input channels with the largest activation statistic (the paper's 1% salient channels).

    Args:
        stats: ``(in,)`` from :func:`collect_activation_stats`.
        top_percent: the share of channels to return, in percent; at least one channel.

    Returns:
        int32 indices, ``ceil(in * top_percent / 100)`` of them, largest statistic first (ties: lower index).

    Raises:
        DimensionError: ``stats`` not 1-D. ConfigError: ``top_percent`` outside ``(0, 100]``.

    Example:
        >>> import jax.numpy as jnp
        >>> identify_salient_channels(jnp.array([0.1, 5.0, 0.2, 3.0]), top_percent=50).tolist()
        [1, 3]
    """
    stats = _as_float(stats, "stats")
    if stats.ndim != 1:
        raise DimensionError(argument="stats", expected="a 1-D array (in,)", got=tuple(stats.shape))
    if not isinstance(top_percent, (int, float)) or not 0 < top_percent <= 100:
        raise ConfigError(argument="top_percent", expected="a percentage in (0, 100]", got=top_percent)
    k = max(1, math.ceil(stats.shape[0] * top_percent / 100 - 1e-9))
    order = jnp.argsort(-stats.astype(jnp.float32), stable=True)
    return order[:k].astype(jnp.int32)


# ----------------------------------------------------------------------------------------- transforms


def apply_weight_transform(w: jax.Array, scales: jax.Array) -> jax.Array:
    """``W * s``: each input channel (column) of an ``(out, in)`` weight times its scale.

    Args:
        w: ``(out, in)``.
        scales: ``(in,)``.

    Returns:
        ``(out, in)`` in ``w``'s dtype (computed in float32).

    Raises:
        DimensionError: ``w`` not 2-D. ShapeMismatch: ``scales`` not ``(in,)``.

    Example:
        >>> import jax.numpy as jnp
        >>> apply_weight_transform(jnp.ones((2, 3)), jnp.array([1.0, 2.0, 4.0])).tolist()
        [[1.0, 2.0, 4.0], [1.0, 2.0, 4.0]]
    """
    w = _weight(w)
    s = _vector(scales, w.shape[1], "scales")
    return (w.astype(jnp.float32) * s.astype(jnp.float32)[None, :]).astype(w.dtype)


def apply_activation_transform(x: jax.Array, scales: jax.Array) -> jax.Array:
    """``x / s``: each input channel of the activations divided by its scale (correctly rounded).

    Args:
        x: ``(..., in)``.
        scales: ``(in,)``.

    Returns:
        ``x``'s shape and dtype.

    Raises:
        ShapeMismatch: ``scales`` whose length is not ``x.shape[-1]``.

    Example:
        >>> import jax.numpy as jnp
        >>> apply_activation_transform(jnp.array([[2.0, 2.0]]), jnp.array([1.0, 4.0])).tolist()
        [[2.0, 0.5]]
    """
    x = _as_float(x, "x")
    s = _vector(scales, x.shape[-1], "scales")
    return _div(x.astype(jnp.float32), s.astype(jnp.float32)).astype(x.dtype)


def fold_into_layernorm(
    scale: jax.Array, bias: jax.Array | None, scales: jax.Array
) -> tuple[jax.Array, jax.Array | None]:
    """Folds ``1 / s`` into a norm's affine weight and bias (llm-awq ``scale_ln_fcs``).

    Exact only when the norm's output feeds nothing but the layers whose weights are multiplied by
    ``s`` (a pre-LN transformer); not in a post-LN BERT, whose norm output is also the residual.

    Args:
        scale: the norm's weight ``(in,)``.
        bias: the norm's bias ``(in,)`` or ``None``.
        scales: the AWQ scales ``(in,)``.

    Returns:
        ``(scale / s, bias / s)`` in their dtypes.

    Raises:
        ShapeMismatch: lengths that differ.

    Example:
        >>> import jax.numpy as jnp
        >>> g, b = fold_into_layernorm(jnp.ones(2), jnp.array([2.0, 4.0]), jnp.array([2.0, 4.0]))
        >>> g.tolist(), b.tolist()
        ([0.5, 0.25], [1.0, 1.0])
    """
    scale = _as_float(scale, "scale")
    if scale.ndim != 1:
        raise DimensionError(argument="scale", expected="a 1-D array", got=tuple(scale.shape))
    s = _vector(scales, scale.shape[0], "scales").astype(jnp.float32)
    new_scale = _div(scale.astype(jnp.float32), s).astype(scale.dtype)
    if bias is None:
        return new_scale, None
    bias = _vector(bias, scale.shape[0], "bias")
    return new_scale, _div(bias.astype(jnp.float32), s).astype(bias.dtype)


def fold_into_linear(w: jax.Array, bias: jax.Array | None, scales: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Folds ``1 / s`` into the previous linear layer's output rows (llm-awq ``scale_fc_fc``).

    Args:
        w: the previous layer's weight ``(in, in_prev)`` (PyTorch layout: its output dim first).
        bias: its bias ``(in,)`` or ``None``.
        scales: the AWQ scales ``(in,)``.

    Returns:
        ``(w / s[:, None], bias / s)``.

    Raises:
        DimensionError: ``w`` not 2-D. ShapeMismatch: lengths that differ.

    Example:
        >>> import jax.numpy as jnp
        >>> w, b = fold_into_linear(jnp.ones((2, 3)), jnp.ones(2), jnp.array([1.0, 2.0]))
        >>> w.tolist(), b.tolist()
        ([[1.0, 1.0, 1.0], [0.5, 0.5, 0.5]], [1.0, 0.5])
    """
    w = _weight(w)
    s = _vector(scales, w.shape[0], "scales").astype(jnp.float32)
    new_w = _div(w.astype(jnp.float32), s[:, None]).astype(w.dtype)
    if bias is None:
        return new_w, None
    bias = _vector(bias, w.shape[0], "bias")
    return new_w, _div(bias.astype(jnp.float32), s).astype(bias.dtype)


# ----------------------------------------------------------------------------------------- searches


def _rows(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32).reshape(-1, x.shape[-1])


def search_scales(w: jax.Array, calibration: jax.Array, *, config: AWQConfig | None = None) -> AWQSearch:
    """The AWQ grid search: the ``alpha`` whose scales give the lowest output MSE of the quantized layer.

    For each ``alpha = i / n_grid``: ``s = float16(compute_awq_scales(stat, alpha))`` and the loss
    ``mean((x @ W^T - x @ (Q(W * s) / s)^T) ** 2)`` over the calibration rows, ``Q`` the group
    quantizer of :func:`quantize_group`. The first ``alpha`` with the lowest loss wins (NaN counts as
    infinite). The bias cancels in the difference, so it is not needed.

    Args:
        w: the weight ``(out, in)``.
        calibration: the layer's inputs ``(..., in)`` (only real tokens: drop padding first).
        config: the options (:class:`AWQConfig`).

    Returns:
        An :class:`AWQSearch`: ``scales`` float32 ``(in,)`` (float16 values), ``alpha``, ``losses``.

    Raises:
        DimensionError: ``w`` not 2-D. ShapeMismatch: ``calibration`` not ``(..., in)``.
        DTypeError, InvalidShape: non-float or empty inputs. ConfigError: a bad config.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[1.0, -1.0, 0.5, 0.25]])
        >>> x = jnp.array([[8.0, 0.1, 0.1, 0.1]])
        >>> r = search_scales(w, x, config=AWQConfig(group_size=4, n_grid=4))
        >>> r.losses.shape, 0.0 <= float(r.alpha) < 1.0
        ((4,), True)
    """
    config = _config(config, None)
    w = _weight(w)
    x = _features(calibration, w.shape[1], "calibration")
    x32 = _rows(x)
    stats = jnp.mean(jnp.abs(x32), axis=0)
    return AWQSearch(*_search_core(
        w.astype(jnp.float32), x32, stats, group=config.group_size, n_grid=config.n_grid, duo=config.duo_scaling
    ))


def search_clip(w: jax.Array, calibration: jax.Array, *, config: AWQConfig | None = None) -> jax.Array:
    """The clipping search: per output row and group, the max ``|w|`` that minimises the group's output MSE.

    Tries ``max_val = max|w_group| * (1 - i / clip_grid)`` for ``i < max_shrink * clip_grid``, clamps
    the group to ``[-max_val, max_val]``, quantizes, and compares the group's partial outputs
    ``sum_k x[n, k] w[o, k]`` over every ``N // clip_tokens``-th calibration row. Run it on the
    already scaled weight ``W * s`` and scaled inputs ``x / s`` (as :func:`quantize_awq` does).

    Args:
        w: the weight ``(out, in)``.
        calibration: its inputs ``(..., in)``.
        config: the options.

    Returns:
        float32 ``(out, n_groups)``: the clip value of every group (pass it to :func:`quantize_group`).

    Raises:
        DimensionError, ShapeMismatch, DTypeError, InvalidShape: as :func:`search_scales`.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[0.1, -0.2, 0.15, 8.0]])
        >>> search_clip(w, jnp.ones((4, 4)), config=AWQConfig(group_size=4)).shape
        (1, 1)
    """
    config = _config(config, None)
    w = _weight(w)
    x32 = _rows(_features(calibration, w.shape[1], "calibration"))
    step = max(1, x32.shape[0] // config.clip_tokens)
    steps = max(1, int(config.max_shrink * config.clip_grid))
    return _clip_core(w.astype(jnp.float32), x32[::step], group=config.group_size, steps=steps, grid=config.clip_grid)


# ----------------------------------------------------------------------------------------- quantize


def _check_clip(clip: Any, out: int, ng: int) -> jax.Array:
    clip = _as_float(clip, "clip")
    if clip.shape != (out, ng):
        raise ShapeMismatch(argument="clip", expected=f"shape ({out}, {ng}) (out, n_groups)", got=tuple(clip.shape))
    return clip.astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=1)
def _encode(w32: jax.Array, group: int, clip: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    code, scale, zero = _quant_core(w32, group, clip)
    code = code.reshape(*code.shape[:-2], -1)[..., : w32.shape[-1]]
    return _pack(code), scale, _pack(zero.astype(jnp.uint8))


def quantize_group(
    w: jax.Array,
    *,
    group_size: int = 128,
    clip: jax.Array | None = None,
    validate: bool = False,
) -> GroupInt4Tensor:
    """Plain group-wise asymmetric 4-bit quantization with zero points (the baseline; format ``"int4_group"``).

    Per group of ``group_size`` input channels of each row, with ``lo = min(min, 0)``, ``hi = max(max, 0)``:
    ``scale = float16(max(hi - lo, 1e-5) / 15)``, ``zero = clip(-round(lo / scale), 0, 15)``,
    ``code = clip(round(w / scale) + zero, 0, 15)``
    (see the module docstring for the storage and the decisions).

    Args:
        w: float32, bfloat16 or float16 ``(out, in)`` (PyTorch layout: groups run along ``in``), or
            any rank >= 1 (groups along the last axis).
        group_size: channels per group; the last group is shorter when it does not divide ``in``.
        clip: optional float ``(out, n_groups)``: clamp each group to ``[-clip, clip]`` first
            (from :func:`search_clip`).
        validate: check (eagerly) that every weight is finite.
            Also checks every block's float16 scale.
            Usable range: a block range (max - min) of 0 or in [0.000916, 9.83e+05] (float16's normal
            range times 15); below it the scale is subnormal and the block loses precision (all
            zeros below ~8.9e-07), above it the scale overflows. ``validate=True`` raises
            NonFiniteError naming the first such block; otherwise they pass silently (as in GGML).

    Returns:
        A :class:`GroupInt4Tensor`.

    Raises:
        DimensionError: a scalar ``w``. DTypeError, InvalidShape: non-float or empty ``w``.
        ConfigError: a ``group_size`` that is not a positive integer.
        InvalidOp: ``validate`` under jit or vmap.
        ShapeMismatch: a ``clip`` of the wrong shape. NonFiniteError: ``validate`` and a non-finite weight.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_group(jnp.array([[0.0, 1.0, 2.0, 3.0]]), group_size=4)
        >>> q.scales.tolist(), [hex(b) for b in q.codes[0].tolist()], dequantize(q).tolist()
        ([[0.199951171875]], ['0x50', '0xfa'], [[0.0, 0.999755859375, 1.99951171875, 2.999267578125]])
    """
    group = _positive_int("group_size", group_size)
    w, w2 = _rows_of(w)
    if validate:
        validate_scale_range(w, block=group, levels=15, fmt="int4_group", asymmetric=True, flat=False, name="w")
    if clip is not None:
        clip = _check_clip(clip, w2.shape[0], _n_groups(w2.shape[1], group))
    codes, scales, zeros = _encode(w2.astype(jnp.float32), group, clip)
    return GroupInt4Tensor(codes, scales, zeros, shape=tuple(w.shape), dtype=w.dtype, group_size=group)


def quantize_awq(
    w: jax.Array,
    calibration: jax.Array | None = None,
    *,
    scales: jax.Array | None = None,
    config: AWQConfig | None = None,
    group_size: int | None = None,
    validate: bool = False,
) -> AWQTensor:
    """AWQ: searches the scales on the calibration inputs, then quantizes ``W * s`` group-wise (format ``"awq_int4"``).

    With ``calibration``: :func:`search_scales`, then (``config.clip``) :func:`search_clip` on
    ``W * s`` and ``x / s``. With ``scales``: those (rounded to float16), no scale search. With
    neither: ``s = 1`` (plain group int4 in an AWQ record; what ``quant.quantize(w, "awq_int4")``
    gives without activations).

    Args:
        w: float32, bfloat16 or float16 ``(out, in)`` (or any rank >= 1, groups along the last axis).
        calibration: the layer's inputs ``(..., in)``, real tokens only.
        scales: given AWQ scales ``(in,)`` (skips the scale search).
        config: an :class:`AWQConfig` (default :func:`default_config`).
        group_size: shortcut for ``AWQConfig(group_size=...)`` (must agree with ``config`` if both).
        validate: check (eagerly) that the weight and the calibration inputs are finite.
            Also checks every block's float16 scale.
            Usable range: a block range (max - min) of 0 or in [0.000916, 9.83e+05] (float16's normal
            range times 15); below it the scale is subnormal and the block loses precision (all
            zeros below ~8.9e-07), above it the scale overflows. ``validate=True`` raises
            NonFiniteError naming the first such block; otherwise they pass silently (as in GGML).

    Returns:
        An :class:`AWQTensor`.

    Raises:
        DimensionError, ShapeMismatch, DTypeError, InvalidShape: bad shapes or dtypes.
        ConfigError: bad options; ``config.clip`` without ``calibration``.
        InvalidOp: ``validate`` under jit or vmap.
        NonFiniteError: ``validate`` and a non-finite value.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_awq(jnp.ones((2, 8)), scales=jnp.full(8, 2.0), group_size=8)
        >>> q.act_scale.tolist(), round(float(dequantize(q)[0, 0]), 3), q.format
        ([2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0], 1.0, 'awq_int4')
    """
    config = _config(config, group_size)
    w, w2 = _rows_of(w)
    x32 = None
    if calibration is not None:
        x32 = _rows(_features(calibration, w2.shape[1], "calibration"))
    if validate:
        # The range of w (before the activation scales, which move it by their factor): a first check.
        validate_scale_range(w, block=config.group_size, levels=15, fmt="awq_int4", asymmetric=True, flat=False,
                             name="w")
        if x32 is not None:
            validate_finite(x32, "calibration")
    w32 = w2.astype(jnp.float32)
    if scales is not None:
        s = _stored_scales(_vector(scales, w2.shape[1], "scales"))
    elif x32 is not None:
        stats = jnp.mean(jnp.abs(x32), axis=0)
        s = _search_core(w32, x32, stats, group=config.group_size, n_grid=config.n_grid, duo=config.duo_scaling)[0]
    else:
        s = jnp.ones((w2.shape[1],), jnp.float32)
    ws = w32 * s[None, :]
    clip = None
    if config.clip:
        if x32 is None:
            raise ConfigError(argument="calibration", expected="the layer's inputs when config.clip is True", got=None)
        clip = search_clip(ws, _div(x32, s), config=config)
    codes, qscales, zeros = _encode(ws, config.group_size, clip)
    return AWQTensor(
        codes, qscales, zeros, s.astype(jnp.float16), shape=tuple(w.shape), dtype=w.dtype, group_size=config.group_size
    )


# ----------------------------------------------------------------------------------------- decode, matmul


def _check_record(q: Any, name: str = "q") -> None:
    if not isinstance(q, (GroupInt4Tensor, AWQTensor)):
        raise FormatError(
            argument=name, expected="a GroupInt4Tensor or an AWQTensor", got=type(q).__name__,
            hint="make one with awq.quantize_group or awq.quantize_awq.",
        )


@jax.jit
def _grid_weight(q: GroupInt4Tensor | AWQTensor) -> jax.Array:
    """The stored grid weight (``Q(W * s)`` for AWQ), float32 ``batch + shape``."""
    k = q.shape[-1]
    group = min(q.group_size, k)
    ng = -(-k // group)
    codes = _unpack(q.codes, k)
    codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, ng * group - k)])
    codes = codes.reshape(*codes.shape[:-1], ng, group)
    deq = _dequant_core(codes, q.scales, _unpack(q.zeros, ng))
    deq = deq.reshape(*deq.shape[:-2], -1)[..., :k]
    return deq.reshape(*deq.shape[:-2], *q.shape)


def dequantize(q: GroupInt4Tensor | AWQTensor) -> jax.Array:
    """Decodes a record to the weight it approximates: ``Q(W)`` (plain) or ``Q(W * s) / s`` (AWQ).

    Args:
        q: a :class:`GroupInt4Tensor` or an :class:`AWQTensor` (batch dims from ``vmap`` allowed).

    Returns:
        ``q.batch_shape + q.shape`` in ``q.dtype``.

    Raises:
        FormatError: ``q`` is another kind of object.

    Example:
        >>> import jax.numpy as jnp
        >>> dequantize(quantize_group(jnp.array([[0.0, 0.5, -1.0, 2.0]]), group_size=4)).tolist()
        [[0.0, 0.599853515625, -0.999755859375, 1.99951171875]]
    """
    return dequantize_awq(q)


def dequantize_awq(q: GroupInt4Tensor | AWQTensor, *, include_scales: bool = True) -> jax.Array:
    """Decodes an AWQ record: ``Q(W * s) / s``, or the stored grid weight ``Q(W * s)`` (``include_scales=False``).

    Args:
        q: an :class:`AWQTensor` (a :class:`GroupInt4Tensor` decodes as :func:`dequantize`).
        include_scales: divide by the AWQ scales (then ``x @ result^T`` is the layer's product);
            ``False`` gives the weight that multiplies ``x / s`` (:func:`awq_matmul`).

    Returns:
        ``q.batch_shape + (out, in)`` in ``q.dtype``.

    Raises:
        FormatError: ``q`` is not a record of this module.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_awq(jnp.ones((1, 4)), scales=jnp.array([1.0, 2.0, 4.0, 8.0]), group_size=4)
        >>> [round(v, 2) for v in dequantize_awq(q, include_scales=False)[0].tolist()]
        [1.07, 2.13, 4.27, 8.0]
        >>> [round(v, 2) for v in dequantize_awq(q)[0].tolist()]
        [1.07, 1.07, 1.07, 1.0]
    """
    _check_record(q)
    check_record(q)
    w = _grid_weight(q)
    if include_scales and isinstance(q, AWQTensor):
        s = q.act_scale.astype(jnp.float32)
        w = _div(w, s.reshape(*s.shape[:-1], *(1,) * (len(q.shape) - 1), s.shape[-1]))
    return w.astype(q.dtype)


def awq_matmul(x: jax.Array, q: GroupInt4Tensor | AWQTensor, *, bias: jax.Array | None = None) -> jax.Array:
    """The layer's product ``(x / s) @ Q(W * s)^T + b`` (``x @ Q(W)^T + b`` for a plain record).

    The activations are divided by the AWQ scales (the "activation-side" placement of ``1 / s``),
    the grid weight decoded inside the same computation, the product accumulated in float32.

    Args:
        x: ``(..., in)``.
        q: a :class:`GroupInt4Tensor` or :class:`AWQTensor` of logical shape ``(out, in)``.
        bias: optional ``(out,)``.

    Returns:
        ``(..., out)`` in ``x``'s dtype.

    Raises:
        FormatError: ``q`` not a record of this module. ShapeMismatch: ``x`` or ``bias`` of the wrong size.
        DimensionError: a record with batch dims (made under ``vmap``: vmap the matmul too).

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_awq(jnp.eye(4), scales=jnp.array([1.0, 2.0, 4.0, 8.0]), group_size=4)
        >>> [round(v, 3) for v in awq_matmul(jnp.array([[1.0, 2.0, 3.0, 4.0]]), q)[0].tolist()]
        [1.0, 2.0, 2.999, 3.999]
    """
    _check_record(q)
    if q.batch_shape or len(q.shape) != 2:
        raise DimensionError(argument="q", expected="a 2-D record (out, in) without batch dims",
                             got=f"shape {tuple(q.shape)}, batch dims {q.batch_shape}",
                             hint="vmap awq_matmul over stacked records.")
    out, k = q.shape
    x = _features(x, k, "x")
    x32 = x.astype(jnp.float32)
    if isinstance(q, AWQTensor):
        x32 = _div(x32, q.act_scale.astype(jnp.float32))
    y = _matmul_t(x32, _grid_weight(q))
    if bias is not None:
        y = y + _vector(bias, out, "bias").astype(jnp.float32).reshape((1,) * (y.ndim - 1) + (out,))
    return y.astype(x.dtype)


def output_mse(w: jax.Array, q: GroupInt4Tensor | AWQTensor, x: jax.Array) -> jax.Array:
    """Mean squared error of a quantized layer's output: ``mean((x @ W^T - x @ dequantize(q)^T) ** 2)``.

    Args:
        w: the float weight ``(out, in)``.
        q: its quantized record.
        x: inputs ``(..., in)``.

    Returns:
        A float32 scalar.

    Raises:
        ShapeMismatch: ``q.shape != w.shape`` or ``x`` of the wrong width.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[0.0, 1.0, 2.0, 3.0]])
        >>> float(output_mse(w, quantize_group(w, group_size=4), jnp.ones((1, 4))))
        2.1457672119140625e-06
    """
    _check_record(q)
    w = _weight(w)
    if tuple(q.shape) != tuple(w.shape):
        raise ShapeMismatch(argument="q", expected=f"a record of shape {tuple(w.shape)}", got=tuple(q.shape))
    x32 = _rows(_features(x, w.shape[1], "x"))
    return _mse(_matmul_t(x32, w.astype(jnp.float32)), _matmul_t(x32, dequantize_awq(q).astype(jnp.float32)))


def _planes(q: GroupInt4Tensor | AWQTensor) -> Planes | None:
    """The decode planes of a 2-D record (low nibbles = even columns), or None for a partial group."""
    rows, n = q.shape
    group = min(q.group_size, n)
    if group % 2 or n % group:
        return None
    f32 = jnp.float32
    ng = n // group
    codes = q.codes.reshape(rows, ng, group // 2)
    scale = packing.materialized(q.scales.astype(f32))[..., None]
    zero = packing.materialized(_unpack(q.zeros, ng).astype(f32))[..., None]
    lo = ((codes & 0x0F).astype(f32) - zero) * scale
    hi = ((codes >> 4).astype(f32) - zero) * scale
    lo, hi = lo.reshape(rows, -1), hi.reshape(rows, -1)
    if isinstance(q, AWQTensor):
        s = q.act_scale.astype(f32)
        lo, hi = _div(lo, s[0::2]), _div(hi, s[1::2])
    return Planes(lo, hi, "pairs")


register_format(
    "int4_group",
    record=GroupInt4Tensor,
    quantize=quantize_group,
    dequantize=dequantize,
    block_size=128,
    description="group-wise asymmetric 4-bit ints with zero points (AWQ's quantizer without scaling), fp16 scales",
    planes=_planes,
)
register_format(
    "awq_int4",
    record=AWQTensor,
    quantize=quantize_awq,
    dequantize=dequantize,
    block_size=128,
    description="AWQ: group-int4 of W * s with the searched per-channel scales s (pass calibration=)",
    planes=_planes,
)
