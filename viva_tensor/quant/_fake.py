"""Fake quantization with a straight-through gradient: :func:`fake_quantize` (see :mod:`viva_tensor.quant`).

The value is exactly ``dequantize(quantize(x, fmt, **options))``; the gradient passes straight through (identity)
where the quantizer's clamp does not bind, and is zero where it does. "Binds" is judged as a rounding quantizer
would be: with the record's own scales, ``x``'s continuous code ``t`` (``x / scale + offset``) lies within half a
step of the end codes, ``qmin - 1/2 < t < qmax + 1/2``; anything beyond rounds to a code the format does not have
and is clamped. Non-finite values (NaN, infinities) get a zero gradient everywhere.

Which formats can clip a finite value (and where):

- never (absmax or min/max scaling maps every value inside the end codes): ``int8`` (tensor, channel, block),
  ``q8_0``, ``q4_1``, ``q5_1``, ``nf4``, ``nf4_dq``, ``bnb_fp4``, ``bnb_fp4_dq`` (bitsandbytes' FP4 code book
  spans [-1, 1] of the block's absmax);
- ``q4_0`` / ``q5_0``: the end code of the sign opposite to the block's first largest value is one step short
  (``7 d`` against ``-8 d``): a value beyond ``7.5 |d|`` (``15.5 |d|``) of that sign clips;
- the K-quants ``q2_k`` .. ``q6_k`` (and ``q5_0``, ``q5_1`` with an ``imatrix``): their scales
  come from a search, and values beyond the searched range clip (the effective per-sub-block scale and min are
  read from the record);
- ``nvfp4`` / ``mxfp4``: E2M1 saturates at 6; a value beyond 7 times its block's scale (the midpoint to the next
  level, 8) clips. MXFP4's power-of-two scale (``2**(floor(log2 amax) - 2)``) leaves up to ``8 x`` the scale in a
  block: values above 7 clip often. NVFP4's E4M3 block scale rounds by at most 1/16 (6.4 at most): only a block
  whose scale is an E4M3 subnormal (amax below 1/28672 of the tensor's) can clip;
- ``int4_group`` / ``awq_int4``: asymmetric 4-bit groups; the float16 scale and the rounded zero point may cut the
  range by a fraction of a step, and ``int4_group(clip=...)`` clips ``|x| > clip`` (the mask follows the clip; for
  ``awq_int4`` the range is judged on ``x * act_scale``, so its clipping search's cut shows through the record).

A format registered by another package without an entry here gets the identity where ``x`` is finite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from viva_tensor import blackwell, ggml
from viva_tensor._formats import packing
from viva_tensor._formats.registry import check_options, format_spec
from viva_tensor.errors import DTypeError

__all__ = ["fake_quantize", "clip_mask", "CLIPPING_FORMATS"]


def _flat_blocks(x32: jax.Array, n: int) -> jax.Array:
    """The flattened tensor zero-padded to whole blocks of ``n``: ``(n_blocks, n)``."""
    flat = x32.reshape(-1)
    nb = -(-flat.size // n)
    return jnp.pad(flat, (0, nb * n - flat.size)).reshape(nb, n)


def _unblock(mask: jax.Array, x32: jax.Array) -> jax.Array:
    return mask.reshape(-1)[: x32.size].reshape(x32.shape)


def _inside(t: jax.Array, qmin: float, qmax: float) -> jax.Array:
    """Whether a continuous code rounds into ``[qmin, qmax]`` (strictly within half a step of the end codes)."""
    return (t > jnp.float32(qmin - 0.5)) & (t < jnp.float32(qmax + 0.5))


def _t(x: jax.Array, scale: jax.Array, offset: jax.Array | float = 0.0) -> jax.Array:
    """``(x - offset) / scale`` where ``scale != 0``; 0 (inside any range) where the block's scale is zero."""
    nonzero = scale != 0
    return jnp.where(nonzero, (x - offset) / jnp.where(nonzero, scale, jnp.float32(1)), jnp.float32(0))


def _f32(v: jax.Array) -> jax.Array:
    return v.astype(jnp.float32)


def _q4_0(x32, q):  # value (c - 8) d, c in [0, 15]
    return _unblock(_inside(_t(_flat_blocks(x32, 32), _f32(q.d)[:, None]), -8, 7), x32)


def _q5_0(x32, q):  # value (c - 16) d, c in [0, 31]
    return _unblock(_inside(_t(_flat_blocks(x32, 32), _f32(q.d)[:, None]), -16, 15), x32)


def _min_scale(levels: int) -> Callable:
    def mask(x32, q):  # value c d + m, c in [0, levels]
        t = _t(_flat_blocks(x32, 32), _f32(q.d)[:, None], _f32(q.m)[:, None])
        return _unblock(_inside(t, 0, levels), x32)

    return mask


def _q2_k(x32, q):  # per 16: value (d sc) c - dmin m, c in [0, 3]
    s = q.scales.astype(jnp.int32)
    dl = _f32(q.d)[:, None] * _f32(s & 0xF)
    ml = _f32(q.dmin)[:, None] * _f32(s >> 4)
    t = _t(_flat_blocks(x32, 256).reshape(-1, 16, 16), dl[..., None], -ml[..., None])
    return _unblock(_inside(t, 0, 3), x32)


def _q3_k(x32, q):  # per 16: value (d (sc - 32)) c, c in [-4, 3]
    dl = _f32(q.d)[:, None] * _f32(ggml._unpack_scales_q3(q.scales) - 32)
    t = _t(_flat_blocks(x32, 256).reshape(-1, 16, 16), dl[..., None])
    return _unblock(_inside(t, -4, 3), x32)


def _q45_k(levels: int) -> Callable:
    def mask(x32, q):  # per 32: value (d sc) c - dmin m, c in [0, levels]
        sc, m = ggml._unpack_scales_k4(q.scales)
        d1 = _f32(q.d)[:, None] * _f32(sc)
        m1 = _f32(q.dmin)[:, None] * _f32(m)
        t = _t(_flat_blocks(x32, 256).reshape(-1, 8, 32), d1[..., None], -m1[..., None])
        return _unblock(_inside(t, 0, levels), x32)

    return mask


def _q6_k(x32, q):  # per 16: value (d sc) c, c in [-32, 31]
    dl = _f32(q.d)[:, None] * _f32(q.scales)
    t = _t(_flat_blocks(x32, 256).reshape(-1, 16, 16), dl[..., None])
    return _unblock(_inside(t, -32, 31), x32)


def _e2m1(x32, q):  # value e2m1 * block scale, |e2m1| <= 6; rounds to 6 up to 7 (the midpoint to 8)
    block = q.block_size
    last = x32.shape[-1] if x32.ndim else 1
    rows = x32.reshape(-1, last)
    nb = -(-last // block)
    blocks = jnp.pad(rows, ((0, 0), (0, nb * block - last))).reshape(rows.shape[0], nb, block)
    t = _t(blocks, blackwell._block_scales(q).reshape(rows.shape[0], nb, 1))
    return (jnp.abs(t) < jnp.float32(7)).reshape(rows.shape[0], -1)[:, :last].reshape(x32.shape)


def _group_int4(x32, q, *, scaled: jax.Array | None = None, clip: jax.Array | None = None):
    """value (c - zero) scale per group along the last axis, c in [0, 15]."""
    out, k = q.shape
    g = min(q.group_size, k)
    ng = -(-k // g)
    w = x32 if scaled is None else x32 * scaled
    w = jnp.pad(w, ((0, 0), (0, ng * g - k))).reshape(out, ng, g)
    zeros = _f32(packing.unpack_pairs(q.zeros, ng))
    t = _t(w, _f32(q.scales)[..., None]) + zeros[..., None]
    inside = _inside(jnp.where(_f32(q.scales)[..., None] != 0, t, zeros[..., None]), 0, 15)
    inside = inside.reshape(out, -1)[:, :k]
    if clip is not None:
        inside = inside & (jnp.abs(x32) <= jnp.repeat(_f32(clip), g, axis=-1)[:, :k])
    return inside


def _awq(x32, q):
    return _group_int4(x32, q, scaled=_f32(q.act_scale)[None, :])


_MASKS: dict[str, Callable] = {
    "q4_0": _q4_0,
    "q5_0": _q5_0,
    "q5_1": _min_scale(31),  # with an imatrix (a searched scale and min); without one no clamp binds
    "q2_k": _q2_k,
    "q3_k": _q3_k,
    "q4_k": _q45_k(15),
    "q5_k": _q45_k(31),
    "q6_k": _q6_k,
    "nvfp4": _e2m1,
    "mxfp4": _e2m1,
    "int4_group": _group_int4,
    "awq_int4": _awq,
}
#: The formats whose quantizer can clip a finite value (see the module docstring); the others never do.
CLIPPING_FORMATS = ("q4_0", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "nvfp4", "mxfp4", "int4_group",
                    "awq_int4")


def clip_mask(x: jax.Array, q: Any, **options: Any) -> jax.Array:
    """Where the straight-through gradient of :func:`fake_quantize` passes: ``x`` finite and not clipped by ``q``.

    Args:
        x: the tensor that was quantized.
        q: its record, ``quant.quantize(x, fmt, **options)``.
        **options: the options it was made with (``int4_group``'s ``clip`` narrows the mask).

    Returns:
        A bool array of ``x``'s shape.

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import quant
        >>> x = jnp.array([1.0, -0.9, -0.99, 0.0] + [0.0] * 28)
        >>> clip_mask(x, quant.quantize(x, "q4_0"))[:4].tolist()  # d = -1/8: -0.99 / d = 7.92 > 7.5
        [True, True, False, True]
    """
    x32 = jnp.asarray(x).astype(jnp.float32)
    finite = jnp.isfinite(x32)
    fn = _MASKS.get(q.format)
    if fn is None or (q.format == "q5_1" and options.get("imatrix") is None):
        return finite  # no clamp binds for a finite value (absmax or min/max scaling)
    if q.format == "int4_group":
        return finite & fn(x32, q, clip=options.get("clip"))
    return finite & fn(x32, q)


def _split(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    arrays = {k: v for k, v in options.items() if isinstance(v, (jax.Array, np.ndarray))}
    return arrays, {k: v for k, v in options.items() if k not in arrays}


def fake_quantize(x: jax.Array, fmt: str, **options: Any) -> jax.Array:
    """``dequantize(quantize(x, fmt, **options))`` with a straight-through gradient (quantization-aware training).

    The value is the format's round trip bit for bit. The gradient is the identity where the quantizer's clamp
    does not bind and zero where it does (and where ``x`` is not finite); :mod:`viva_tensor.quant._fake` lists
    which formats can clip a finite value and where (:func:`clip_mask` gives the mask). Array options
    (``imatrix``, ``clip``, ``calibration``, ``scales``) get no gradient. Jittable and vmappable; reverse mode
    (``jax.grad``) only, as any ``custom_vjp``.

    Args:
        x: a float32, bfloat16 or float16 array the format accepts.
        fmt: a registered format name (:func:`viva_tensor.quant.format_names`).
        **options: the format's quantize options (``block_size``, ``group_size``, ``imatrix`` ...).

    Returns:
        An array of ``x``'s shape and dtype.

    Raises:
        FormatError: an unknown format or option.
        DTypeError: ``x`` is not a floating array.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from viva_tensor import quant
        >>> x = jnp.linspace(-1.0, 1.0, 64)
        >>> bool((quant.fake_quantize(x, "nf4") == quant.dequantize(quant.quantize(x, "nf4"))).all())
        True
        >>> jax.grad(lambda x: quant.fake_quantize(x, "nf4").sum())(x)[:3].tolist()
        [1.0, 1.0, 1.0]
    """
    spec = format_spec(fmt)
    check_options(spec, options)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise DTypeError(argument="x", expected="a floating array (float32, bfloat16, float16)", got=str(x.dtype))
    arrays, statics = _split(options)

    def round_trip(x: jax.Array, arrays: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
        q = spec.quantize(x, **arrays, **statics)
        return spec.dequantize(q).reshape(x.shape), clip_mask(x, q, **arrays, **statics)

    @jax.custom_vjp
    def fq(x, arrays):
        return round_trip(x, arrays)[0]

    def fwd(x, arrays):
        value, mask = round_trip(x, arrays)
        return value, (mask, arrays)

    def bwd(res, g):
        mask, arrays = res
        return jnp.where(mask, g, jnp.zeros((), g.dtype)), jax.tree_util.tree_map(jnp.zeros_like, arrays)

    fq.defvjp(fwd, bwd)
    return fq(x, arrays)

