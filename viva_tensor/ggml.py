"""GGML block formats beyond Q4_0/Q4_1/Q8_0: Q5_0, Q5_1, the K-quants Q2_K..Q6_K, and IQ4_NL/IQ4_XS (decode).

Every record holds the fields of ggml's block struct (``ggml-common.h``) as ggml packs them, one row per block,
so :func:`to_ggml_bytes` gives exactly the bytes a GGUF file stores and :func:`from_ggml_bytes` reads them back.

Quantization follows ggml's reference quantizers (``ggml-quants.c``) operation by operation in float32, so the
bytes are identical to ``ggml_quantize_chunk`` (what llama.cpp's quantizer calls), eagerly and under ``jit``:

- ``q5_0``, ``q5_1``: blocks of 32 (``quantize_row_q5_{0,1}_ref``), 5.5 and 6 bits per value.
- ``q2_k`` ... ``q6_k``: super-blocks of 256 values with 16 or 8 sub-blocks whose scales are themselves quantized
  (``quantize_row_q{2..6}_K_ref``: the searches ``make_qkx2_quants``, ``make_qx_quants``, ``make_q3_quants``),
  2.625, 3.4375, 4.5, 5.5 and 6.5625 bits per value. The searches run for all blocks at once (the candidate
  scales are an array axis); only the short coordinate-descent passes are unrolled per element of a sub-block.
- ``imatrix=`` (an importance per input column, as llama.cpp's ``quant_weights``): the ``quantize_row_*_impl``
  paths (``make_qkx3_quants``, ``make_qp_quants``), also for Q4_0/Q4_1 (:func:`quantize_q4_0_imatrix`,
  :func:`quantize_q4_1_imatrix` return :mod:`viva_tensor.compression` records).
- ``iq4_nl``, ``iq4_xs``: decode only (their quantizers search non-linear grids; files that hold them are read).

K-quant rows must hold a multiple of 256 values: llama.cpp itself falls back (Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to
Q8_0, Q2_K/Q3_K to IQ4_NL) for such tensors; the error names that fallback.
Exactness under ``jit``: XLA on CPU contracts ``a * b + c`` into one fused multiply-add and turns a division by a
broadcast or constant divisor into a multiplication by its reciprocal. Here every product that is then added
goes through :func:`_rounded` (``nextafter(p, p)``, which is ``p`` but cannot be fused) and every division through
:func:`_div`; sums run in ggml's order (left to right). Blocks holding NaN or inf get a NaN ``d`` and zero codes.

Range of the exactness, measured against ``ggml_quantize_chunk`` on normal rows scaled to a super-block absmax of
``10**e`` (``e`` from -16 to 16 in steps of 1/4; ``tests/test_ggml.py`` checks 1e-4 ... 1e12): Q5_0, Q5_1 and every
``imatrix=`` path (absmax 1e-8 ... 1e12) give ggml's bytes throughout. The K-quants' plain searches give them for an
absmax from 1e-4 to 1e12 (Q2_K, Q4_K, Q5_K also beyond), and differ in these bands: Q2_K 10**-15.25 ... 10**-12.5,
Q3_K 10**-15 ... 10**-11.75 and 10**-5.75 ... 10**-4.75, Q4_K and Q5_K 10**-14 ... 10**-11, Q6_K 10**-13.25 ...
10**-11.75 and 10**-7.5 ... 10**-6.5. There the searches compare products of up to eight values (``slx * slx *
suml2``) that C rounds to float32 subnormals, with fewer bits, while XLA:CPU flushes them to zero. Below each band
the products underflow to zero in C as well, and the bytes agree again. Searching on the block times a power of two
(exact, no subnormals) was tried and moves away from ggml: it computes those comparisons at full precision where C
has partial or none. Above an absmax of ~1e12, Q3_K's and Q6_K's float16 ``d`` overflows: ggml stores an infinity,
this module a NaN.

Example:
    >>> import jax.numpy as jnp
    >>> from viva_tensor import ggml
    >>> x = jnp.sin(jnp.arange(512.0)).reshape(2, 256)
    >>> q = ggml.quantize_q4_k(x)
    >>> q.nbytes, q.bits_per_value, ggml.to_ggml_bytes(q).shape
    (288, 4.5, (2, 144))
    >>> float(jnp.max(jnp.abs(ggml.dequantize(q) - x))) < 0.07
    True
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from viva_tensor import compression
from viva_tensor._formats.checks import float_input, validate_scale_range
from viva_tensor._formats.record import QuantizedArray, batch_dims, pytree_dataclass
from viva_tensor._formats.registry import FORMATS, check_record, register_format
from viva_tensor.errors import DTypeError, FormatError, InvalidOp, InvalidShape, NonFiniteError

__all__ = [
    "Q5_0Tensor",
    "Q5_1Tensor",
    "Q2KTensor",
    "Q3KTensor",
    "Q4KTensor",
    "Q5KTensor",
    "Q6KTensor",
    "IQ4NLTensor",
    "IQ4XSTensor",
    "QK_K",
    "BLOCK_BYTES",
    "BLOCK_VALUES",
    "quantize_q5_0",
    "quantize_q5_1",
    "quantize_q2_k",
    "quantize_q3_k",
    "quantize_q4_k",
    "quantize_q5_k",
    "quantize_q6_k",
    "quantize_q4_0_imatrix",
    "quantize_q4_1_imatrix",
    "dequantize",
    "to_ggml_bytes",
    "from_ggml_bytes",
]

QK_K = 256
"""Values per K-quant super-block (ggml's ``QK_K``)."""

_F16, _U8, _I8, _U16 = np.dtype("<f2"), np.dtype(np.uint8), np.dtype(np.int8), np.dtype("<u2")

# Each format: values per block, then the block's fields in ggml's order: (name, dtype, count).
_LAYOUT: dict[str, tuple[int, tuple[tuple[str, np.dtype, int], ...]]] = {
    "q5_0": (32, (("d", _F16, 1), ("qh", _U8, 4), ("qs", _U8, 16))),
    "q5_1": (32, (("d", _F16, 1), ("m", _F16, 1), ("qh", _U8, 4), ("qs", _U8, 16))),
    "q2_k": (QK_K, (("scales", _U8, 16), ("qs", _U8, 64), ("d", _F16, 1), ("dmin", _F16, 1))),
    "q3_k": (QK_K, (("hmask", _U8, 32), ("qs", _U8, 64), ("scales", _U8, 12), ("d", _F16, 1))),
    "q4_k": (QK_K, (("d", _F16, 1), ("dmin", _F16, 1), ("scales", _U8, 12), ("qs", _U8, 128))),
    "q5_k": (QK_K, (("d", _F16, 1), ("dmin", _F16, 1), ("scales", _U8, 12), ("qh", _U8, 32), ("qs", _U8, 128))),
    "q6_k": (QK_K, (("ql", _U8, 128), ("qh", _U8, 64), ("scales", _I8, 16), ("d", _F16, 1))),
    "iq4_nl": (32, (("d", _F16, 1), ("qs", _U8, 16))),
    "iq4_xs": (QK_K, (("d", _F16, 1), ("scales_h", _U16, 1), ("scales_l", _U8, 4), ("qs", _U8, 128))),
}

BLOCK_VALUES = {name: layout[0] for name, layout in _LAYOUT.items()}
"""Values per block of each format here."""

BLOCK_BYTES = {name: sum(dt.itemsize * n for _, dt, n in layout[1]) for name, layout in _LAYOUT.items()}
"""Bytes per block of each format here (as in a GGUF file)."""

_FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_GROUP_MAX_EPS = 1e-15


# ----------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------


class _GGMLRecord(QuantizedArray):
    """What the records here share: fields in ggml's block order, one leading row per block."""

    @staticmethod
    def _core_ndim(record) -> int:
        return 1 if _LAYOUT[record.format][1][0][2] == 1 else 2


def _static():
    return flax.struct.field(pytree_node=False)


@pytree_dataclass
class Q5_0Tensor(_GGMLRecord):
    """GGML Q5_0 blocks of 32: ``d`` float16 ``(n,)``, ``qh`` uint8 ``(n, 4)`` (5th bits), ``qs`` uint8 ``(n, 16)``."""

    d: jax.Array
    qh: jax.Array
    qs: jax.Array
    shape: tuple[int, ...] = _static()
    dtype: Any = _static()
    format: ClassVar[str] = "q5_0"
    block_size: ClassVar[int] = 32


@pytree_dataclass
class Q5_1Tensor(_GGMLRecord):
    """GGML Q5_1 blocks of 32: ``d``, ``m`` float16 ``(n,)``, ``qh`` uint8 ``(n, 4)``, ``qs`` uint8 ``(n, 16)``."""

    d: jax.Array
    m: jax.Array
    qh: jax.Array
    qs: jax.Array
    shape: tuple[int, ...] = _static()
    dtype: Any = _static()
    format: ClassVar[str] = "q5_1"
    block_size: ClassVar[int] = 32


@pytree_dataclass
class Q2KTensor(_GGMLRecord):
    """GGML Q2_K super-blocks: ``scales`` uint8 (n, 16) (4-bit scale, 4-bit min), ``qs`` (n, 64), ``d``, ``dmin``."""

    scales: jax.Array
    qs: jax.Array
    d: jax.Array
    dmin: jax.Array
    shape: tuple[int, ...] = _static()
    dtype: Any = _static()
    format: ClassVar[str] = "q2_k"
    block_size: ClassVar[int] = QK_K


@pytree_dataclass
class Q3KTensor(_GGMLRecord):
    """GGML Q3_K super-blocks: ``hmask`` ``(n, 32)``, ``qs`` ``(n, 64)``, ``scales`` ``(n, 12)`` (6-bit), ``d``."""

    hmask: jax.Array
    qs: jax.Array
    scales: jax.Array
    d: jax.Array
    shape: tuple[int, ...] = _static()
    dtype: Any = _static()
    format: ClassVar[str] = "q3_k"
    block_size: ClassVar[int] = QK_K


@pytree_dataclass
class Q4KTensor(_GGMLRecord):
    """GGML Q4_K super-blocks: ``d``, ``dmin`` float16 ``(n,)``, ``scales`` ``(n, 12)`` (6-bit), ``qs`` ``(n, 128)``."""

    d: jax.Array
    dmin: jax.Array
    scales: jax.Array
    qs: jax.Array
    shape: tuple[int, ...] = _static()
    dtype: Any = _static()
    format: ClassVar[str] = "q4_k"
    block_size: ClassVar[int] = QK_K


@pytree_dataclass
class Q5KTensor(_GGMLRecord):
    """GGML Q5_K super-blocks: ``d``, ``dmin``, ``scales`` ``(n, 12)``, ``qh`` ``(n, 32)``, ``qs`` ``(n, 128)``."""

    d: jax.Array
    dmin: jax.Array
    scales: jax.Array
    qh: jax.Array
    qs: jax.Array
    shape: tuple[int, ...] = _static()
    dtype: Any = _static()
    format: ClassVar[str] = "q5_k"
    block_size: ClassVar[int] = QK_K


@pytree_dataclass
class Q6KTensor(_GGMLRecord):
    """GGML Q6_K super-blocks: ``ql`` ``(n, 128)``, ``qh`` ``(n, 64)``, ``scales`` int8 ``(n, 16)``, ``d`` float16."""

    ql: jax.Array
    qh: jax.Array
    scales: jax.Array
    d: jax.Array
    shape: tuple[int, ...] = _static()
    dtype: Any = _static()
    format: ClassVar[str] = "q6_k"
    block_size: ClassVar[int] = QK_K


@pytree_dataclass
class IQ4NLTensor(_GGMLRecord):
    """GGML IQ4_NL blocks of 32 (decode only): ``d`` float16 ``(n,)``, ``qs`` uint8 ``(n, 16)`` grid indices."""

    d: jax.Array
    qs: jax.Array
    shape: tuple[int, ...] = _static()
    dtype: Any = _static()
    format: ClassVar[str] = "iq4_nl"
    block_size: ClassVar[int] = 32


@pytree_dataclass
class IQ4XSTensor(_GGMLRecord):
    """GGML IQ4_XS super-blocks (decode only): ``d``, ``scales_h`` uint16, ``scales_l`` (n, 4), ``qs`` (n, 128)."""

    d: jax.Array
    scales_h: jax.Array
    scales_l: jax.Array
    qs: jax.Array
    shape: tuple[int, ...] = _static()
    dtype: Any = _static()
    format: ClassVar[str] = "iq4_xs"
    block_size: ClassVar[int] = QK_K


_RECORDS = {
    "q5_0": Q5_0Tensor, "q5_1": Q5_1Tensor, "q2_k": Q2KTensor, "q3_k": Q3KTensor, "q4_k": Q4KTensor,
    "q5_k": Q5KTensor, "q6_k": Q6KTensor, "iq4_nl": IQ4NLTensor, "iq4_xs": IQ4XSTensor,
}


# ----------------------------------------------------------------------------------------------------
# Exact float32 arithmetic under XLA
# ----------------------------------------------------------------------------------------------------


def _jit(fn=None, **kwargs):
    """``jax.jit`` of ``fn`` traced with NumPy rank promotion allowed (the block maths broadcasts on purpose)."""
    if fn is None:
        return functools.partial(_jit, **kwargs)

    @functools.wraps(fn)
    def traced(*args):
        with jax.numpy_rank_promotion("allow"):
            return fn(*args)

    return jax.jit(traced, **kwargs)


def _rounded(p: jax.Array) -> jax.Array:
    """``p`` itself, but opaque to XLA's FMA contraction: a product passed through here is rounded before any add."""
    return lax.nextafter(p, p)


def _mul(a: Any, b: Any) -> jax.Array:
    """The float32 product ``a * b`` rounded on its own (C's ``a*b`` before a ``+``)."""
    return _rounded(jnp.multiply(a, b))


def _div(a: Any, b: Any) -> jax.Array:
    """``a / b`` correctly rounded, as C divides.

    XLA rewrites a division by a constant or broadcast divisor into a multiplication by a rounded reciprocal; a
    divisor that depends on ``a`` elementwise (``b + 0 * a``, through :func:`_rounded`) cannot be rewritten.
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    shape = jnp.broadcast_shapes(a.shape, b.shape)
    a = jnp.broadcast_to(a, shape)
    b = _rounded(jnp.broadcast_to(b, shape) + a * jnp.float32(0))
    return _rounded(a / b)


def _nearest(f: jax.Array) -> jax.Array:
    """ggml's ``nearest_int``: round half to even (|f| < 2**22), as int32."""
    return jnp.round(f).astype(jnp.int32)


def _seqsum(terms: jax.Array) -> jax.Array:
    """``0 + t[0] + t[1] + ...`` over the last axis, left to right in float32 (C's accumulation loop)."""
    n = terms.shape[-1]
    if n > 256:
        moved = jnp.moveaxis(terms, -1, 0)
        total, _ = lax.scan(lambda c, t: (c + t, None), jnp.zeros(moved.shape[1:], jnp.float32), moved)
        return total
    total = jnp.zeros(terms.shape[:-1], jnp.float32) + terms[..., 0]
    for i in range(1, n):
        total = total + terms[..., i]
    return total


def _f32(v: float) -> float:
    return float(np.float32(v))


def _step_constants(rmin: float, rdelta: float, nstep: int, nmax: int) -> np.ndarray:
    """``rmin + rdelta*is + nmax`` for ``is = 0..nstep`` in C's float32 order."""
    out = [(np.float32(rmin) + np.float32(rdelta) * np.float32(i)) + np.float32(nmax) for i in range(nstep + 1)]
    return np.array(out, np.float32)


def _first_of_largest(values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(|v|, v) of the first element of largest magnitude along the last axis (C's ``if (ax > amax)``)."""
    av = jnp.abs(values)
    idx = jnp.argmax(av, axis=-1)
    v = jnp.take_along_axis(values, idx[..., None], axis=-1)[..., 0]
    return jnp.abs(v), v


# ----------------------------------------------------------------------------------------------------
# ggml's searches, vectorised over blocks (leading dims); n values along the last axis
# ----------------------------------------------------------------------------------------------------


def _make_qx_quants(x: jax.Array, nmax: int, qw: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``: the scale and the codes ``L`` in ``[0, 2 nmax)``."""
    amax, vmax = _first_of_largest(x)
    w = _mul(x, x) if qw is None else qw
    wx = _mul(w, x)
    steps = np.array([nmax] + [np.float32(nmax) + np.float32(0.1) * np.float32(i) for i in range(-9, 10) if i],
                     np.float32)
    iscale = _div(-jnp.asarray(steps)[None], vmax[..., None])  # (..., 19)
    iscale = jnp.moveaxis(iscale, -1, 0)[..., None]  # (19, ..., 1)
    lvals = jnp.clip(_nearest(iscale * x), -nmax, nmax - 1)
    lf = lvals.astype(jnp.float32)
    sumlx = _seqsum(_mul(wx, lf))
    suml2 = _seqsum(_mul(_mul(w, lf), lf))
    scale = jnp.where(suml2[0] != 0, _div(sumlx[0], suml2[0]), jnp.float32(0))
    best = scale * sumlx[0]
    codes = lvals[0]
    for k in range(1, len(steps)):
        take = (suml2[k] > 0) & (sumlx[k] * sumlx[k] > best * suml2[k])
        codes = jnp.where(take[..., None], lvals[k], codes)
        scale = jnp.where(take, _div(sumlx[k], suml2[k]), scale)
        best = jnp.where(take, scale * sumlx[k], best)
    zero = amax < _GROUP_MAX_EPS
    return jnp.where(zero, jnp.float32(0), scale), jnp.where(zero[..., None], 0, codes + nmax)


def _make_q3_quants(x: jax.Array, nmax: int) -> tuple[jax.Array, jax.Array]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: scale and codes in ``[0, 2 nmax)``."""
    amax, vmax = _first_of_largest(x)
    iscale = _div(jnp.float32(-nmax), vmax)
    lvals = jnp.clip(_nearest(iscale[..., None] * x), -nmax, nmax - 1)
    w = _mul(x, x)
    wx = _mul(w, x)
    lf = lvals.astype(jnp.float32)
    sumlx = _seqsum(_mul(wx, lf))
    suml2 = _seqsum(_mul(_mul(w, lf), lf))
    lf, sumlx, suml2 = _descend(x, w, wx, lf, sumlx, suml2, -nmax, nmax - 1, True)
    codes = lf.astype(jnp.int32) + nmax
    scale = jnp.where(suml2 > 0, _div(sumlx, suml2), jnp.float32(0))
    zero = amax < _GROUP_MAX_EPS
    return jnp.where(zero, jnp.float32(0), scale), jnp.where(zero[..., None], 0, codes)


def _make_qkx_quants(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """``make_qkx2_quants`` / ``make_qkx3_quants`` (with weights): ``(scale, the_min, codes in [0, nmax])``."""
    vmin = jnp.minimum(jnp.min(x, axis=-1), 0.0)
    vmax = jnp.max(x, axis=-1)
    sum_w = w[..., 0]
    for i in range(1, x.shape[-1]):
        sum_w = sum_w + w[..., i]
    wx = _mul(w, x)
    sum_x = wx[..., 0]
    for i in range(1, x.shape[-1]):
        sum_x = sum_x + wx[..., i]
    span = vmax - vmin
    degenerate = ~(vmax > vmin)

    def error(scale, minv, lf):
        diff = (_mul(scale[..., None], lf) + minv[..., None]) - x
        diff = jnp.abs(diff) if use_mad else _mul(diff, diff)
        return _seqsum(_mul(w, diff))

    iscale0 = _div(jnp.float32(nmax), span)
    scale = _div(jnp.float32(1), iscale0)
    codes = jnp.clip(_nearest(iscale0[..., None] * (x - vmin[..., None])), 0, nmax)
    best_error = error(scale, vmin, codes.astype(jnp.float32))
    minv = vmin
    if nstep >= 1:
        # Sequential over the candidate scales: a better candidate moves ``min``, which the next ones start from.
        def step(carry, c):
            codes, best_error, scale, minv = carry
            iscale = _div(c, vmax - minv)
            laux = jnp.clip(_nearest(iscale[..., None] * (x - minv[..., None])), 0, nmax)
            lf = laux.astype(jnp.float32)
            wl = _mul(w, lf)
            sum_l = _seqsum(wl)
            sum_l2 = _seqsum(_mul(wl, lf))
            sum_xl = _seqsum(_mul(wl, x))
            big_d = _mul(sum_w, sum_l2) - _mul(sum_l, sum_l)
            this_scale = _div(_mul(sum_w, sum_xl) - _mul(sum_x, sum_l), big_d)
            this_min = _div(_mul(sum_l2, sum_x) - _mul(sum_l, sum_xl), big_d)
            clamp = this_min > 0
            this_scale = jnp.where(clamp, _div(sum_xl, sum_l2), this_scale)
            this_min = jnp.where(clamp, jnp.float32(0), this_min)
            cur = error(this_scale, this_min, lf)
            take = (big_d > 0) & (cur < best_error)
            return (jnp.where(take[..., None], laux, codes), jnp.where(take, cur, best_error),
                    jnp.where(take, this_scale, scale), jnp.where(take, this_min, minv)), None

        consts = jnp.asarray(_step_constants(rmin, rdelta, nstep, nmax))
        (codes, best_error, scale, minv), _ = lax.scan(step, (codes, best_error, scale, minv), consts)
    scale = jnp.where(degenerate, jnp.float32(0), scale)
    codes = jnp.where(degenerate[..., None], 0, codes)
    minv = jnp.where(degenerate, vmin, minv)
    return scale, -minv, codes


def _descend(x, w, wx, lf, sumlx, suml2, lo, hi, q3: bool):
    """The coordinate descent of ``make_q3_quants`` (``q3``) and ``make_qp_quants``: 5 passes over the n values.

    Element by element, in order (each step sees the sums the previous one left), as a ``lax.scan`` over
    (pass, element) so that the program stays small; vectorised over the blocks.
    """
    n = x.shape[-1]

    def step(carry, i):
        lf, sumlx, suml2 = carry

        def pick(a):
            return lax.dynamic_index_in_dim(a, i, axis=a.ndim - 1, keepdims=False)

        wi, xi, li, wxi = pick(w), pick(x), pick(lf), pick(wx)
        slx = sumlx - _mul(wxi, li)
        sl2 = suml2 - _mul(_mul(wi, li), li)
        new_l = _nearest(_div(xi * sl2, slx))
        new_l = (jnp.minimum(hi, new_l) if lo is None else jnp.clip(new_l, lo, hi)).astype(jnp.float32)
        slx2 = slx + _mul(wxi, new_l)
        sl22 = sl2 + _mul(_mul(wi, new_l), new_l)
        better = slx2 * slx2 * suml2 > sumlx * sumlx * sl22
        take = (slx > 0) & (new_l != li) & better & ((sl22 > 0) if q3 else (sl2 > 0))
        onehot = lax.broadcasted_iota(jnp.int32, lf.shape, lf.ndim - 1) == i
        lf = jnp.where(onehot & take[..., None], new_l[..., None], lf)
        return (lf, jnp.where(take, slx2, sumlx), jnp.where(take, sl22, suml2)), None

    order = jnp.tile(jnp.arange(n, dtype=jnp.int32), 5)
    (lf, sumlx, suml2), _ = lax.scan(step, (lf, sumlx, suml2), order)
    return lf, sumlx, suml2


def _make_qp_quants(x: jax.Array, nmax: int, qw: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``make_qp_quants(n, nmax, x, L, quant_weights)`` for positive ``x``: scale and codes in ``[0, nmax]``."""
    vmax = jnp.maximum(jnp.max(x, axis=-1), 0.0)
    zero = vmax < _GROUP_MAX_EPS

    def mse(iscale, clip):
        lvals = _nearest(iscale[..., None] * x)
        if clip:
            lvals = jnp.minimum(nmax, lvals)
        diff = x - _mul(_div(jnp.float32(1), iscale)[..., None], lvals.astype(jnp.float32))
        return _seqsum(_mul(_mul(qw, diff), diff))

    iscale = _div(jnp.float32(nmax), vmax)
    best = mse(iscale, False)
    for i in [-4, -3, -2, -1, 1, 2, 3, 4]:
        c = np.float32(0.1) * np.float32(i) + np.float32(nmax)
        iscale_is = _div(jnp.float32(c), vmax)
        cur = mse(iscale_is, True)
        take = cur < best
        best = jnp.where(take, cur, best)
        iscale = jnp.where(take, iscale_is, iscale)
    lf = jnp.minimum(nmax, _nearest(iscale[..., None] * x)).astype(jnp.float32)
    wx = _mul(qw, x)
    sumlx = _seqsum(_mul(wx, lf))
    suml2 = _seqsum(_mul(_mul(qw, lf), lf))
    lf, sumlx, suml2 = _descend(x, qw, wx, lf, sumlx, suml2, None, nmax, False)
    codes = lf.astype(jnp.int32)
    scale = jnp.where(suml2 > 0, _div(sumlx, suml2), jnp.float32(0))
    return jnp.where(zero, jnp.float32(0), scale), jnp.where(zero[..., None], 0, codes)


# ----------------------------------------------------------------------------------------------------
# Packing helpers
# ----------------------------------------------------------------------------------------------------


def _u8(v: jax.Array) -> jax.Array:
    return (v.astype(jnp.int32) & 0xFF).astype(jnp.uint8)


def _f16(v: jax.Array) -> jax.Array:
    return v.astype(jnp.float16)


def _pack_2bit(codes: jax.Array) -> jax.Array:
    """(nb, 256) codes 0..3 to (nb, 64): ``qs[32h + l]`` bits 2k..2k+1 = code ``128h + 32k + l``."""
    c = codes.reshape(*codes.shape[:-1], 2, 4, 32).astype(jnp.int32)
    out = c[..., 0, :] | (c[..., 1, :] << 2) | (c[..., 2, :] << 4) | (c[..., 3, :] << 6)
    return _u8(out.reshape(*codes.shape[:-1], 64))


def _unpack_2bit(qs: jax.Array) -> jax.Array:
    q = qs.reshape(*qs.shape[:-1], 2, 1, 32).astype(jnp.int32)
    shifts = jnp.array([0, 2, 4, 6], jnp.int32).reshape(4, 1)
    return ((q >> shifts) & 3).reshape(*qs.shape[:-1], 256)


def _pack_scales_k4(ls: jax.Array, lm: jax.Array) -> jax.Array:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales ``ls`` and mins ``lm`` (inverse of ``get_scale_min_k4``)."""
    lo = [ls[..., j] | ((ls[..., j + 4] >> 4) << 6) for j in range(4)]
    mid = [lm[..., j] | ((lm[..., j + 4] >> 4) << 6) for j in range(4)]
    hi = [(ls[..., j] & 0xF) | ((lm[..., j] & 0xF) << 4) for j in range(4, 8)]
    return _u8(jnp.stack(lo + mid + hi, axis=-1))


def _unpack_scales_k4(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    s = s.astype(jnp.int32)
    sc = [s[..., j] & 63 for j in range(4)] + [(s[..., j + 4] & 0xF) | ((s[..., j - 4] >> 6) << 4) for j in range(4, 8)]
    mn = [s[..., j + 4] & 63 for j in range(4)] + [(s[..., j + 4] >> 4) | ((s[..., j] >> 6) << 4) for j in range(4, 8)]
    return jnp.stack(sc, axis=-1), jnp.stack(mn, axis=-1)


def _pack_scales_q3(l6: jax.Array) -> jax.Array:
    """Q3_K's 12 bytes of sixteen 6-bit scales (stored +32)."""
    low = [(l6[..., j] & 0xF) | ((l6[..., j + 8] & 0xF) << 4) for j in range(8)]
    high = []
    for k in range(4):
        b = jnp.zeros_like(l6[..., 0])
        for j in range(k, 16, 4):
            b = b | ((l6[..., j] >> 4) << (2 * (j // 4)))
        high.append(b)
    return _u8(jnp.stack(low + high, axis=-1))


def _unpack_scales_q3(s: jax.Array) -> jax.Array:
    s = s.astype(jnp.int32)
    out = []
    for j in range(16):
        low = (s[..., j] & 0xF) if j < 8 else (s[..., j - 8] >> 4)
        out.append(low | (((s[..., 8 + j % 4] >> (2 * (j // 4))) & 3) << 4))
    return jnp.stack(out, axis=-1)


@_jit
def _pack_5bit_32(codes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(nb, 32) codes 0..31 to Q5_0/Q5_1's ``qh`` (nb, 4) little-endian bits and ``qs`` (nb, 16) nibbles."""
    c = codes.astype(jnp.int32)
    qs = _u8((c[..., :16] & 0xF) | ((c[..., 16:] & 0xF) << 4))
    bits = (c >> 4) & 1  # bit j of the 32-bit qh is the 5th bit of value j
    weights = jnp.left_shift(jnp.int32(1), jnp.arange(8, dtype=jnp.int32))
    qh = jnp.sum(bits.reshape(*c.shape[:-1], 4, 8) * weights, axis=-1)
    return _u8(qh), qs


def _unpack_5bit_32(qh: jax.Array, qs: jax.Array) -> jax.Array:
    q = qs.astype(jnp.int32)
    low = jnp.concatenate([q & 0xF, q >> 4], axis=-1)
    h = qh.astype(jnp.int32)[..., :, None] >> jnp.arange(8, dtype=jnp.int32)
    high = (h & 1).reshape(*qh.shape[:-1], 32)
    return low | (high << 4)


# ----------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------


def _as_float32(x: Any, argument: str = "x") -> tuple[jax.Array, Any]:
    x = float_input(x, argument)
    return x.astype(jnp.float32), jnp.dtype(x.dtype)


def _validate_finite(x: Any) -> None:
    if isinstance(x, jax.core.Tracer):
        raise InvalidOp(argument="validate", expected="concrete input values (validate=True checks them eagerly)",
                        got="a traced array (inside jit, vmap or grad)",
                        hint="call with validate=True outside jit/vmap.")
    values = np.asarray(jnp.asarray(x).astype(jnp.float32))
    bad = np.argwhere(~np.isfinite(values))
    if bad.size:
        index = tuple(int(i) for i in bad[0])
        raise NonFiniteError(argument="x", expected="finite values", got=f"{values[index]} at index {index}",
                             hint="replace NaN/inf (jnp.nan_to_num) or leave validate=False: only the blocks "
                             "holding them dequantize to NaN.")


# llama.cpp's own fallback for tensors whose rows are not whole super-blocks (``llama-quant.cpp``).
_FALLBACK = {"q2_k": "iq4_nl", "q3_k": "iq4_nl", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
_FALLBACK_HINT = {"iq4_nl": "quantize_q5_0 (IQ4_NL, llama.cpp's choice, is decode-only here)",
                  "q5_0": "quantize_q5_0", "q5_1": "quantize_q5_1", "q8_0": "compression.quantize_q8_0"}


def _check_k_rows(fmt: str, shape: tuple[int, ...], argument: str) -> None:
    if len(shape) == 0 or shape[-1] % QK_K != 0:
        fallback = _FALLBACK[fmt]
        raise InvalidShape(
            argument=argument,
            expected=f"a last dim (the GGUF row) that is a multiple of 256 for {fmt} (K-quant super-blocks)",
            got=tuple(shape),
            hint=f"llama.cpp falls back to {fallback} for such tensors: use {_FALLBACK_HINT[fallback]}.",
        )


def _check_imatrix(imatrix: Any, n: int, shape: tuple[int, ...]) -> jax.Array:
    if not hasattr(imatrix, "shape"):
        imatrix = jnp.asarray(imatrix)
    if tuple(imatrix.shape) != (n,):
        raise InvalidShape(argument="imatrix", expected=f"shape ({n},): one importance per input column "
                           f"(the last dim of x, {tuple(shape)})", got=tuple(imatrix.shape))
    if jnp.dtype(imatrix.dtype) not in _FLOAT_DTYPES:
        raise DTypeError(argument="imatrix", expected="a float32, bfloat16 or float16 array", got=str(imatrix.dtype))
    return jnp.asarray(imatrix, jnp.float32)


def _prepare(x: Any, validate: bool, fmt: str | None) -> tuple[jax.Array, Any, tuple[int, ...]]:
    x32, dtype = _as_float32(x)
    shape = tuple(x32.shape)
    if fmt is not None:
        _check_k_rows(fmt, shape, "x")
    if validate:
        _validate_finite(x)
    return x32, dtype, shape


def _blocks32(x32: jax.Array) -> jax.Array:
    flat = x32.reshape(-1)
    n_blocks = -(-flat.size // 32)
    return jnp.pad(flat, (0, n_blocks * 32 - flat.size)).reshape(n_blocks, 32)


def _finite(blocks: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(blocks), axis=-1)


def _nan_d(finite: jax.Array, d: jax.Array) -> jax.Array:
    return _f16(jnp.where(finite, d, jnp.float32(jnp.nan)))


# ----------------------------------------------------------------------------------------------------
# Q5_0 and Q5_1
# ----------------------------------------------------------------------------------------------------


def quantize_q5_0(x: jax.Array, *, imatrix: jax.Array | None = None, validate: bool = False) -> Q5_0Tensor:
    """GGML Q5_0: blocks of 32 values, a float16 scale and 5-bit codes around 16 (5.5 bits per value).

    As ``quantize_row_q5_0_ref``: ``d = v / -16`` (``v`` the first value of largest magnitude),
    ``code = min(31, trunc(x * (1 / d) + 16.5))``; with ``imatrix``, ``quantize_row_q5_0_impl``
    (``make_qx_quants`` weighted by ``imatrix[j] * sqrt(sigma2 + x**2)``, ``sigma2`` the row's mean square).

    Args:
        x: a float32, bfloat16 or float16 array (blocks over the flattened tensor; with ``imatrix``, rows of the
            last dim, which must be a multiple of 32).
        imatrix: optional importance of each input column, shape ``(x.shape[-1],)``.
        validate: check eagerly that every value is finite.
            Also checks every block's float16 scale.
            Usable range: a block absmax of 0 or in [0.000977, 1.05e+06] (float16's normal
            range times 16); below it the scale is subnormal and the block loses precision (all
            zeros below ~9.5e-07), above it the scale overflows. ``validate=True`` raises
            NonFiniteError naming the first such block; otherwise they pass silently (as in GGML).

    Returns:
        A :class:`Q5_0Tensor`.

    Raises:
        DTypeError: ``x`` or ``imatrix`` is not a float array.
        InvalidShape: a bad ``imatrix`` shape, or rows not a multiple of 32 with ``imatrix``.
        NonFiniteError, InvalidOp: ``validate=True`` and a non-finite value / a traced array.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_q5_0(jnp.array([-1.0, 0.5, 0.25, 0.0]))
        >>> q.d.tolist(), dequantize(q).tolist()
        ([0.0625], [-1.0, 0.5, 0.25, 0.0])
    """
    x32, dtype, shape = _prepare(x, validate, None)
    if validate:
        validate_scale_range(x, block=32, levels=16, fmt="q5_0", asymmetric=False)
    if imatrix is not None:
        rows = _rows32(x32, shape, "q5_0")
        d, codes = _q5_0_impl(rows, _check_imatrix(imatrix, shape[-1], shape))
    else:
        d, codes = _q5_0_ref(_blocks32(x32))
    qh, qs = _pack_5bit_32(codes)
    return Q5_0Tensor(d, qh, qs, shape=shape, dtype=dtype)


def _rows32(x32: jax.Array, shape: tuple[int, ...], fmt: str) -> jax.Array:
    if len(shape) == 0 or shape[-1] % 32:
        raise InvalidShape(argument="x", expected=f"a last dim that is a multiple of 32 for {fmt} with an imatrix "
                           "(its weights are per input column)", got=shape)
    return x32.reshape(-1, shape[-1])


@_jit
def _q5_0_ref(blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
    finite = _finite(blocks)
    _, vmax = _first_of_largest(blocks)
    d = vmax / jnp.float32(-16)  # exact: a power of two
    inv = jnp.where(d != 0, _div(jnp.float32(1), d), jnp.float32(0))
    p = _mul(blocks, inv[:, None])
    codes = jnp.minimum(31, jnp.trunc(p + jnp.float32(16.5)).astype(jnp.int32))
    return _nan_d(finite, d), jnp.where(finite[:, None], codes, 0)


def _sigma2_rows(rows: jax.Array) -> jax.Array:
    """``sum_x2 / n_per_row`` of each row, summed in C's order."""
    return _div(_seqsum(_mul(rows, rows)), jnp.float32(rows.shape[-1]))


def _row_weights(rows: jax.Array, qw: jax.Array, sigma2: jax.Array) -> jax.Array:
    return qw * jnp.sqrt(sigma2[:, None] + _mul(rows, rows))


@_jit
def _q5_0_impl(rows: jax.Array, qw: jax.Array) -> tuple[jax.Array, jax.Array]:
    weights = _row_weights(rows, qw, _sigma2_rows(rows)).reshape(-1, 32)
    blocks = rows.reshape(-1, 32)
    finite = _finite(blocks)
    d, codes = _make_qx_quants(blocks, 16, weights)
    return _nan_d(finite, d), jnp.where(finite[:, None], codes, 0)


def quantize_q5_1(x: jax.Array, *, imatrix: jax.Array | None = None, validate: bool = False) -> Q5_1Tensor:
    """GGML Q5_1: blocks of 32 values, float16 scale and min, 5-bit codes (6 bits per value).

    As ``quantize_row_q5_1_ref``: ``d = (max - min) / 31``, ``code = trunc((x - min) * (1 / d) + 0.5)``; with
    ``imatrix``, ``quantize_row_q5_1_impl`` (``make_qkx3_quants``).

    Args:
        x: a float32, bfloat16 or float16 array (as :func:`quantize_q5_0`).
        imatrix: optional importance of each input column, shape ``(x.shape[-1],)``.
        validate: check eagerly that every value is finite.
            Also checks every block's float16 scale.
            Usable range: a block range (max - min) of 0 or in [0.00189, 2.03e+06] (float16's normal
            range times 31); below it the scale is subnormal and the block loses precision (all
            zeros below ~1.8e-06), above it the scale overflows. ``validate=True`` raises
            NonFiniteError naming the first such block; otherwise they pass silently (as in GGML).

    Returns:
        A :class:`Q5_1Tensor`.

    Raises:
        DTypeError, InvalidShape, NonFiniteError, InvalidOp: as :func:`quantize_q5_0`.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_q5_1(jnp.arange(32.0))
        >>> q.d.tolist(), q.m.tolist(), dequantize(q)[:3].tolist()
        ([1.0], [0.0], [0.0, 1.0, 2.0])
    """
    x32, dtype, shape = _prepare(x, validate, None)
    if validate:
        validate_scale_range(x, block=32, levels=31, fmt="q5_1", asymmetric=True)
    if imatrix is not None:
        d, m, codes = _q5_1_impl(_rows32(x32, shape, "q5_1"), _check_imatrix(imatrix, shape[-1], shape))
    else:
        d, m, codes = _q5_1_ref(_blocks32(x32))
    qh, qs = _pack_5bit_32(codes)
    return Q5_1Tensor(d, m, qh, qs, shape=shape, dtype=dtype)


@_jit
def _q5_1_ref(blocks: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    finite = _finite(blocks)
    vmin = jnp.min(blocks, axis=-1)
    vmax = jnp.max(blocks, axis=-1)
    d = _div(vmax - vmin, jnp.float32(31))
    inv = jnp.where(d != 0, _div(jnp.float32(1), d), jnp.float32(0))
    p = _mul(blocks - vmin[:, None], inv[:, None])
    codes = jnp.trunc(p + jnp.float32(0.5)).astype(jnp.int32)
    m = _f16(jnp.where(finite, vmin, jnp.float32(jnp.nan)))
    return _nan_d(finite, d), m, jnp.where(finite[:, None], codes, 0)


@_jit(static_argnums=2)
def _qkx3_rows(rows: jax.Array, qw: jax.Array, nmax: int):
    weights = _row_weights(rows, qw, _sigma2_rows(rows)).reshape(-1, 32)
    blocks = rows.reshape(-1, 32)
    finite = _finite(blocks)
    d, the_min, codes = _make_qkx_quants(blocks, weights, nmax, -0.9, 0.05, 36, False)
    m = _f16(jnp.where(finite, -the_min, jnp.float32(jnp.nan)))
    return _nan_d(finite, d), m, jnp.where(finite[:, None], codes, 0)


def _q5_1_impl(rows, qw):
    return _qkx3_rows(rows, qw, 31)


def quantize_q4_0_imatrix(x: jax.Array, imatrix: jax.Array, *, validate: bool = False) -> compression.Q4_0Tensor:
    """GGML Q4_0 with an importance matrix (``quantize_row_q4_0_impl``): a :class:`compression.Q4_0Tensor`.

    The scale of each block of 32 comes from ``make_qx_quants`` weighted by ``imatrix[j] * sqrt(sigma2 + x**2)``
    (``sigma2`` the mean square of the row). Without an importance matrix ggml uses
    :func:`viva_tensor.compression.quantize_q4_0`.

    Args:
        x: a float32, bfloat16 or float16 array whose last dim (the rows) is a multiple of 32.
        imatrix: importance of each input column, shape ``(x.shape[-1],)``.
        validate: check eagerly that every value is finite.

    Returns:
        A :class:`viva_tensor.compression.Q4_0Tensor` (bytes as ``ggml_quantize_chunk`` with ``imatrix``).

    Raises:
        DTypeError, InvalidShape, NonFiniteError, InvalidOp: as :func:`quantize_q5_0`.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_q4_0_imatrix(jnp.linspace(-1.0, 1.0, 32), jnp.ones(32))
        >>> type(q).__name__, q.qs.shape
        ('Q4_0Tensor', (1, 16))
    """
    x32, dtype, shape = _prepare(x, validate, None)
    d, codes = _q4_0_impl(_rows32(x32, shape, "q4_0"), _check_imatrix(imatrix, shape[-1], shape))
    c = codes.astype(jnp.int32)
    qs = _u8(c[:, :16] | (c[:, 16:] << 4))
    return compression.Q4_0Tensor(qs, d, shape=shape, dtype=dtype)


@_jit
def _q4_0_impl(rows: jax.Array, qw: jax.Array) -> tuple[jax.Array, jax.Array]:
    weights = _row_weights(rows, qw, _sigma2_rows(rows)).reshape(-1, 32)
    blocks = rows.reshape(-1, 32)
    finite = _finite(blocks)
    d, codes = _make_qx_quants(blocks, 8, weights)
    return _nan_d(finite, d), jnp.where(finite[:, None], codes, 8)


def quantize_q4_1_imatrix(x: jax.Array, imatrix: jax.Array, *, validate: bool = False) -> compression.Q4_1Tensor:
    """GGML Q4_1 with an importance matrix (``quantize_row_q4_1_impl``): a :class:`compression.Q4_1Tensor`.

    Scale and min of each block of 32 come from ``make_qkx3_quants`` weighted by ``imatrix[j] * sqrt(sigma2 + x**2)``.

    Args:
        x: a float32, bfloat16 or float16 array whose last dim (the rows) is a multiple of 32.
        imatrix: importance of each input column, shape ``(x.shape[-1],)``.
        validate: check eagerly that every value is finite.

    Returns:
        A :class:`viva_tensor.compression.Q4_1Tensor`.

    Raises:
        DTypeError, InvalidShape, NonFiniteError, InvalidOp: as :func:`quantize_q5_0`.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_q4_1_imatrix(jnp.arange(32.0), jnp.ones(32))
        >>> type(q).__name__, q.m.tolist()
        ('Q4_1Tensor', [0.0])
    """
    x32, dtype, shape = _prepare(x, validate, None)
    d, m, codes = _qkx3_rows(_rows32(x32, shape, "q4_1"), _check_imatrix(imatrix, shape[-1], shape), 15)
    c = codes.astype(jnp.int32)
    qs = _u8(c[:, :16] | (c[:, 16:] << 4))
    return compression.Q4_1Tensor(qs, d, m, shape=shape, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# K-quants
# ----------------------------------------------------------------------------------------------------


def _k_blocks(x32: jax.Array, imatrix: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """Super-blocks (nb, 256) of the rows, and the imatrix weights of each (nb, 256) (the same for every row)."""
    n = x32.shape[-1]
    blocks = x32.reshape(-1, QK_K)
    if imatrix is None:
        return blocks, None
    rows = blocks.shape[0] // (n // QK_K) if n else 0
    qw = jnp.broadcast_to(imatrix.reshape(1, n // QK_K, QK_K), (rows, n // QK_K, QK_K)).reshape(-1, QK_K)
    return blocks, qw


def _sigma2_blocks(blocks: jax.Array, factor: int) -> jax.Array:
    total = _seqsum(_mul(blocks, blocks))
    return (jnp.float32(factor) * total) / jnp.float32(QK_K)  # exact: powers of two


def _requantize(x, d, dm, lo, hi, codes):
    """``clamp(nearest_int((x + dm) / d), lo, hi)`` where ``d != 0``, else the search's codes (``if (!d) continue``)."""
    num = x if dm is None else x + dm[..., None]
    new = jnp.clip(_nearest(_div(num, d[..., None])), lo, hi)
    return jnp.where((d != 0)[..., None], new, codes)


def _finish(finite: jax.Array, fields: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Blocks holding NaN/inf: NaN ``d``, every other field zero."""
    out = {}
    for name, v in fields.items():
        keep = finite.reshape(finite.shape + (1,) * (v.ndim - 1))
        if name == "d":
            out[name] = jnp.where(keep, v, jnp.float16(jnp.nan))
        else:
            out[name] = jnp.where(keep, v, jnp.zeros((), v.dtype))
    return out


@_jit
def _q6_k_core(blocks: jax.Array, qw: jax.Array | None) -> dict[str, jax.Array]:
    finite = _finite(blocks)
    sub = blocks.reshape(-1, 16, 16)
    scales, codes = _make_qx_quants(sub, 32, None if qw is None else qw.reshape(-1, 16, 16))
    max_abs, max_scale = _first_of_largest(scales)
    zero = max_abs < _GROUP_MAX_EPS
    iscale = _div(jnp.float32(-128), max_scale)
    d = _f16(_div(jnp.float32(1), iscale))
    sc = jnp.minimum(127, _nearest(iscale[:, None] * scales))
    dj = d.astype(jnp.float32)[:, None] * sc.astype(jnp.float32)
    codes = _requantize(sub, dj, None, -32, 31, codes - 32) + 32
    lq = codes.reshape(-1, 2, 4, 32)  # half, quarter, l
    low = lq & 0xF
    ql = jnp.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=-1)
    qh = (lq[:, :, 0] >> 4) | ((lq[:, :, 1] >> 4) << 2) | ((lq[:, :, 2] >> 4) << 4) | ((lq[:, :, 3] >> 4) << 6)
    fields = {
        "ql": _u8(jnp.where(zero[:, None], 0, ql.reshape(-1, 128))),
        "qh": _u8(jnp.where(zero[:, None], 0, qh.reshape(-1, 64))),
        "scales": jnp.where(zero[:, None], 0, sc).astype(jnp.int8),
        "d": jnp.where(zero, jnp.float16(0), d),
    }
    return _finish(finite, fields)


@_jit
def _q4_k_core(blocks: jax.Array, qw: jax.Array | None) -> dict[str, jax.Array]:
    return _q45_k_core(blocks, qw, 15)


@_jit
def _q5_k_core(blocks: jax.Array, qw: jax.Array | None) -> dict[str, jax.Array]:
    return _q45_k_core(blocks, qw, 31)


def _q45_k_core(blocks, qw, nmax):
    finite = _finite(blocks)
    sub = blocks.reshape(-1, 8, 32)
    if qw is None:
        sum_x2 = _seqsum(_mul(sub, sub))
        av_x = jnp.sqrt(sum_x2 / jnp.float32(32))  # exact: a power of two
        weights = av_x[..., None] + jnp.abs(sub)
        params = (-1.0, 0.1, 20) if nmax == 15 else (-0.5, 0.1, 15)
        scales, mins, codes = _make_qkx_quants(sub, weights, nmax, *params, False)
        max_scale = jnp.maximum(jnp.max(scales, axis=-1), 0.0)
        max_min = jnp.maximum(jnp.max(mins, axis=-1), 0.0)
        inv_scale = jnp.where(max_scale > 0, _div(jnp.float32(63), max_scale), jnp.float32(0))
        inv_min = jnp.where(max_min > 0, _div(jnp.float32(63), max_min), jnp.float32(0))
        ls = jnp.minimum(63, _nearest(inv_scale[:, None] * scales) & 0xFF)
        lm = jnp.minimum(63, _nearest(inv_min[:, None] * mins) & 0xFF)
        d = _f16(_div(max_scale, jnp.float32(63)))
        dmin = _f16(_div(max_min, jnp.float32(63)))
    else:
        sigma2 = _sigma2_blocks(blocks, 2)
        weights = qw.reshape(-1, 8, 32) * jnp.sqrt(sigma2[:, None, None] + _mul(sub, sub))
        sw = _seqsum(weights)
        scales, mins, codes = _make_qkx_quants(sub, weights, nmax, -0.9, 0.05, 36, False)
        d_block, ls = _make_qp_quants(scales, 63, sw)
        m_block, lm = _make_qp_quants(mins, 63, sw)
        ls, lm = ls & 0xFF, lm & 0xFF
        d, dmin = _f16(d_block), _f16(m_block)
    packed = _pack_scales_k4(ls, lm)
    sc, m = _unpack_scales_k4(packed)
    dj = d.astype(jnp.float32)[:, None] * sc.astype(jnp.float32)
    dm = dmin.astype(jnp.float32)[:, None] * m.astype(jnp.float32)
    codes = _requantize(sub, dj, dm, 0, nmax, codes).reshape(-1, 4, 2, 32)  # (nb, pair, half, l)
    fields = {"d": d, "dmin": dmin, "scales": packed}
    if nmax == 31:
        weights_h = jnp.left_shift(jnp.int32(1), jnp.arange(8, dtype=jnp.int32)).reshape(4, 2, 1)
        fields["qh"] = _u8(jnp.sum((codes >> 4) * weights_h, axis=(1, 2)))
        codes = codes & 0xF
    fields["qs"] = _u8((codes[:, :, 0] | (codes[:, :, 1] << 4)).reshape(-1, 128))
    return _finish(finite, fields)


@_jit
def _q2_k_core(blocks: jax.Array, qw: jax.Array | None) -> dict[str, jax.Array]:
    finite = _finite(blocks)
    sub = blocks.reshape(-1, 16, 16)
    if qw is None:
        scales, mins, codes = _make_qkx_quants(sub, jnp.abs(sub), 3, -0.5, 0.1, 15, True)
        max_scale = jnp.maximum(jnp.max(scales, axis=-1), 0.0)
        max_min = jnp.maximum(jnp.max(mins, axis=-1), 0.0)
        iscale = _div(jnp.float32(15), max_scale)
        ls = jnp.where(max_scale[:, None] > 0, _nearest(iscale[:, None] * scales), 0)
        d = _f16(jnp.where(max_scale > 0, _div(max_scale, jnp.float32(15)), jnp.float32(0)))
        imin = _div(jnp.float32(15), max_min)
        lm = jnp.where(max_min[:, None] > 0, _nearest(imin[:, None] * mins), 0)
        dmin = _f16(jnp.where(max_min > 0, _div(max_min, jnp.float32(15)), jnp.float32(0)))
    else:
        sigma2 = _sigma2_blocks(blocks, 1)
        weights = qw.reshape(-1, 16, 16) * jnp.sqrt(sigma2[:, None, None] + _mul(sub, sub))
        sw = _seqsum(weights)
        scales, mins, codes = _make_qkx_quants(sub, weights, 3, -0.9, 0.05, 36, False)
        dm, ls = _make_qp_quants(scales, 15, sw)
        mm, lm = _make_qp_quants(mins, 15, sw)
        d, dmin = _f16(dm), _f16(mm)
    packed = _u8((ls & 0xFF) | (lm << 4))
    s = packed.astype(jnp.int32)
    dj = d.astype(jnp.float32)[:, None] * (s & 0xF).astype(jnp.float32)
    dmj = dmin.astype(jnp.float32)[:, None] * (s >> 4).astype(jnp.float32)
    codes = _requantize(sub, dj, dmj, 0, 3, codes)
    return _finish(finite, {"scales": packed, "qs": _pack_2bit(codes.reshape(-1, 256)), "d": d, "dmin": dmin})


@_jit
def _q3_k_core(blocks: jax.Array, qw: jax.Array | None) -> dict[str, jax.Array]:
    finite = _finite(blocks)
    sub = blocks.reshape(-1, 16, 16)
    if qw is None:
        scales, codes = _make_q3_quants(sub, 4)
        _, max_scale = _first_of_largest(scales)
        iscale = _div(jnp.float32(-32), max_scale)
        l6 = jnp.clip(_nearest(iscale[:, None] * scales), -32, 31) + 32
        nonzero = max_scale != 0
        l6 = jnp.where(nonzero[:, None], l6, 0)
        packed = jnp.where(nonzero[:, None], _pack_scales_q3(l6), jnp.uint8(0))
        d = _f16(jnp.where(nonzero, _div(jnp.float32(1), iscale), jnp.float32(0)))
    else:
        sigma2 = _sigma2_blocks(blocks, 2)
        weights = qw.reshape(-1, 16, 16) * jnp.sqrt(sigma2[:, None, None] + _mul(sub, sub))
        sw = _seqsum(weights)
        scales, codes = _make_qx_quants(sub, 4, weights)
        d_block, l6 = _make_qx_quants(scales, 32, sw)
        packed = _pack_scales_q3(l6)
        d = _f16(d_block)
    sc = _unpack_scales_q3(packed) - 32
    dj = d.astype(jnp.float32)[:, None] * sc.astype(jnp.float32)
    codes = (_requantize(sub, dj, None, -4, 3, codes - 4) + 4).reshape(-1, 256)
    high = (codes > 3).astype(jnp.int32).reshape(-1, 8, 32)  # bit j//32 of hmask[j % 32]
    weights_h = jnp.left_shift(jnp.int32(1), jnp.arange(8, dtype=jnp.int32)).reshape(8, 1)
    hmask = _u8(jnp.sum(high * weights_h, axis=1))
    qs = _pack_2bit(jnp.where(codes > 3, codes - 4, codes))
    return _finish(finite, {"hmask": hmask, "qs": qs, "scales": packed, "d": d})


_K_CORES = {"q2_k": _q2_k_core, "q3_k": _q3_k_core, "q4_k": _q4_k_core, "q5_k": _q5_k_core, "q6_k": _q6_k_core}


def _quantize_k(fmt: str, x: Any, imatrix: Any, validate: bool):
    x32, dtype, shape = _prepare(x, validate, fmt)
    qw = None if imatrix is None else _check_imatrix(imatrix, shape[-1], shape)
    blocks, qwb = _k_blocks(x32, qw)
    fields = _K_CORES[fmt](blocks, qwb)
    return _RECORDS[fmt](**fields, shape=shape, dtype=dtype)


_K_DOC = """GGML {upper}: super-blocks of 256 values, {what} ({bits} bits per value).

    As ggml's ``quantize_row_{ref}_ref`` ({search}) or, with ``imatrix``, ``quantize_row_{ref}_impl``: bytes
    identical to ``ggml_quantize_chunk`` eagerly and under ``jit``.

    Args:
        x: a float32, bfloat16 or float16 array whose last dim (the GGUF row) is a multiple of 256.
        imatrix: optional importance of each input column (llama.cpp's ``quant_weights``), shape
            ``(x.shape[-1],)``.
        validate: check eagerly that every value is finite.

    Returns:
        A :class:`{cls}`.

    Raises:
        InvalidShape: the last dim is not a multiple of 256 (the message names llama.cpp's fallback), or a bad
            ``imatrix`` shape.
        DTypeError: ``x`` or ``imatrix`` is not a float array.
        NonFiniteError, InvalidOp: ``validate=True`` and a non-finite value / a traced array.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_{name}(jnp.cos(jnp.arange(256.0)))
        >>> q.nbytes, round(float(jnp.max(jnp.abs(dequantize(q) - jnp.cos(jnp.arange(256.0))))), 1) <= {tol}
        ({nbytes}, True)
    """


def _k_entry(fmt: str, upper: str, ref: str, what: str, bits: str, search: str, tol: float):
    def quantize(x: jax.Array, *, imatrix: jax.Array | None = None, validate: bool = False):
        return _quantize_k(fmt, x, imatrix, validate)

    quantize.__name__ = quantize.__qualname__ = f"quantize_{fmt}"
    quantize.__doc__ = _K_DOC.format(upper=upper, what=what, bits=bits, ref=ref, search=search,
                                     cls=_RECORDS[fmt].__name__, name=fmt, tol=tol, nbytes=BLOCK_BYTES[fmt])
    return quantize


quantize_q2_k = _k_entry("q2_k", "Q2_K", "q2_K", "16 sub-blocks of 16 with 4-bit scales and mins, 2-bit codes",
                         "2.625", "``make_qkx2_quants`` per sub-block", 0.5)
quantize_q3_k = _k_entry("q3_k", "Q3_K", "q3_K", "16 sub-blocks of 16 with 6-bit scales, 3-bit codes", "3.4375",
                         "``make_q3_quants`` per sub-block", 0.3)
quantize_q4_k = _k_entry("q4_k", "Q4_K", "q4_K", "8 sub-blocks of 32 with 6-bit scales and mins, 4-bit codes",
                         "4.5", "``make_qkx2_quants`` per sub-block", 0.1)
quantize_q5_k = _k_entry("q5_k", "Q5_K", "q5_K", "8 sub-blocks of 32 with 6-bit scales and mins, 5-bit codes",
                         "5.5", "``make_qkx2_quants`` per sub-block", 0.1)
quantize_q6_k = _k_entry("q6_k", "Q6_K", "q6_K", "16 sub-blocks of 16 with int8 scales, 6-bit codes", "6.5625",
                         "``make_qx_quants`` per sub-block", 0.1)


# ----------------------------------------------------------------------------------------------------
# Dequantization (in ggml's float32 order: bit-identical to dequantize_row_* and gguf-py)
# ----------------------------------------------------------------------------------------------------


def _restore(values: jax.Array, record: Any) -> jax.Array:
    """Flattened block values (batch dims in front) back to ``batch + shape`` in the original dtype."""
    batch = batch_dims(record)
    flat = values.reshape(*batch, -1)[..., : math.prod(record.shape)]
    return flat.reshape(*batch, *record.shape).astype(record.dtype)


def _f32_of(v: jax.Array) -> jax.Array:
    return v.astype(jnp.float32)


@_jit
def _deq_q5_0(q):
    codes = _unpack_5bit_32(q.qh, q.qs).astype(jnp.float32) - 16.0
    return _restore(codes * _f32_of(q.d)[..., None], q)


@_jit
def _deq_q5_1(q):
    codes = _unpack_5bit_32(q.qh, q.qs).astype(jnp.float32)
    return _restore(_mul(codes, _f32_of(q.d)[..., None]) + _f32_of(q.m)[..., None], q)


@_jit
def _deq_q2_k(q):
    s = q.scales.astype(jnp.int32)
    dl = _f32_of(q.d)[..., None] * (s & 0xF).astype(jnp.float32)
    ml = _f32_of(q.dmin)[..., None] * (s >> 4).astype(jnp.float32)
    codes = _unpack_2bit(q.qs).astype(jnp.float32).reshape(*q.qs.shape[:-1], 16, 16)
    return _restore(_mul(dl[..., None], codes) - ml[..., None], q)


@_jit
def _deq_q3_k(q):
    sc = (_unpack_scales_q3(q.scales) - 32).astype(jnp.float32)
    dl = _f32_of(q.d)[..., None] * sc
    low = _unpack_2bit(q.qs)
    h = q.hmask.astype(jnp.int32)[..., None, :] >> jnp.arange(8, dtype=jnp.int32)[:, None]
    high = (h & 1).reshape(*q.hmask.shape[:-1], 256)
    codes = (low - jnp.where(high == 1, 0, 4)).astype(jnp.float32).reshape(*low.shape[:-1], 16, 16)
    return _restore(dl[..., None] * codes, q)


def _deq_q45(q, five: bool):
    sc, m = _unpack_scales_k4(q.scales)
    d1 = _f32_of(q.d)[..., None] * sc.astype(jnp.float32)
    m1 = _f32_of(q.dmin)[..., None] * m.astype(jnp.float32)
    qs = q.qs.astype(jnp.int32).reshape(*q.qs.shape[:-1], 4, 1, 32)
    codes = (qs >> jnp.array([0, 4], jnp.int32).reshape(2, 1)) & 0xF  # (..., 4, 2, 32)
    if five:
        qh = q.qh.astype(jnp.int32)[..., None, None, :]
        bit = jnp.arange(8, dtype=jnp.int32).reshape(4, 2, 1)
        codes = codes + ((qh >> bit) & 1) * 16
    codes = codes.reshape(*q.qs.shape[:-1], 8, 32).astype(jnp.float32)
    return _restore(_mul(d1[..., None], codes) - m1[..., None], q)


@_jit
def _deq_q4_k(q):
    return _deq_q45(q, False)


@_jit
def _deq_q5_k(q):
    return _deq_q45(q, True)


@_jit
def _deq_q6_k(q):
    ql = q.ql.astype(jnp.int32).reshape(*q.ql.shape[:-1], 2, 2, 1, 32)  # half, byte group, nibble, l
    low = (ql >> jnp.array([0, 4], jnp.int32).reshape(2, 1)) & 0xF  # (..., h, g, nib, l): quarter = g + 2 nib
    low = jnp.swapaxes(low, -3, -2).reshape(*q.ql.shape[:-1], 2, 4, 32)
    qh = q.qh.astype(jnp.int32).reshape(*q.qh.shape[:-1], 2, 1, 32)
    high = (qh >> jnp.array([0, 2, 4, 6], jnp.int32).reshape(4, 1)) & 3
    codes = ((low | (high << 4)) - 32).astype(jnp.float32).reshape(*q.ql.shape[:-1], 16, 16)
    dl = _f32_of(q.d)[..., None] * q.scales.astype(jnp.float32)
    return _restore(dl[..., None] * codes, q)


def _iq4_values(qs: jax.Array) -> jax.Array:
    table = jnp.asarray(_KVALUES_IQ4NL, jnp.float32)
    q = qs.astype(jnp.int32)
    return jnp.concatenate([table[q & 0xF], table[q >> 4]], axis=-1)


@_jit
def _deq_iq4_nl(q):
    return _restore(_f32_of(q.d)[..., None] * _iq4_values(q.qs), q)


@_jit
def _deq_iq4_xs(q):
    lead = q.qs.shape[:-1]
    sl = q.scales_l.astype(jnp.int32)
    low = jnp.stack([sl & 0xF, sl >> 4], axis=-1).reshape(*lead, 8)
    high = (q.scales_h.astype(jnp.int32)[..., None] >> (2 * jnp.arange(8, dtype=jnp.int32))) & 3
    dl = _f32_of(q.d)[..., None] * ((low | (high << 4)) - 32).astype(jnp.float32)
    values = _iq4_values(q.qs.reshape(*lead, 8, 16))
    return _restore(dl[..., None] * values, q)


_DEQUANTIZE = {
    Q5_0Tensor: _deq_q5_0, Q5_1Tensor: _deq_q5_1, Q2KTensor: _deq_q2_k, Q3KTensor: _deq_q3_k,
    Q4KTensor: _deq_q4_k, Q5KTensor: _deq_q5_k, Q6KTensor: _deq_q6_k, IQ4NLTensor: _deq_iq4_nl,
    IQ4XSTensor: _deq_iq4_xs,
}


def dequantize(q: Any) -> jax.Array:
    """Values of a record from this module, in its original shape and dtype (as ggml's ``dequantize_row_*``).

    Args:
        q: a record of this module (``Q5_0Tensor`` ... ``IQ4XSTensor``).

    Returns:
        An array of shape ``batch_shape + q.shape`` and dtype ``q.dtype``.

    Raises:
        FormatError: ``q`` is not a record of this module.

    Example:
        >>> import jax.numpy as jnp
        >>> dequantize(quantize_q5_0(jnp.array([0.5, -1.0]))).tolist()
        [0.5, -1.0]
    """
    fn = _DEQUANTIZE.get(type(q))
    if fn is None:
        raise FormatError(argument="q", expected=f"a record of viva_tensor.ggml ({', '.join(_RECORDS)})",
                          got=type(q).__name__, hint="viva_tensor.quant.dequantize handles every registered format.")
    if q.format in FORMATS:  # IQ4_NL / IQ4_XS are decode-only: no quantize to check them against
        check_record(q)
    return fn(q)


# ----------------------------------------------------------------------------------------------------
# GGUF bytes
# ----------------------------------------------------------------------------------------------------


def _check_rows(fmt: str, shape: tuple[int, ...], argument: str) -> None:
    block = BLOCK_VALUES[fmt]
    if len(shape) == 0 or shape[-1] % block != 0:
        raise InvalidShape(argument=argument, expected=f"a shape whose last dim (the GGUF row) is a multiple of "
                           f"{block} for {fmt}", got=tuple(shape),
                           hint="GGML blocks never cross rows.")


def to_ggml_bytes(q: Any) -> np.ndarray:
    """The block bytes a GGUF file stores for this tensor (each block's fields in ggml's order, little-endian).

    Args:
        q: a record of this module with concrete values.

    Returns:
        A uint8 array of shape ``(*batch, *q.shape[:-1], row bytes)``.

    Raises:
        FormatError: ``q`` is not a record of this module.
        InvalidShape: the last dim of ``q.shape`` is not a whole number of blocks.

    Example:
        >>> import jax.numpy as jnp
        >>> to_ggml_bytes(quantize_q6_k(jnp.ones((3, 256)))).shape
        (3, 210)
    """
    if type(q) not in _DEQUANTIZE:
        raise FormatError(argument="q", expected=f"a record of viva_tensor.ggml ({', '.join(_RECORDS)})",
                          got=type(q).__name__)
    fmt = q.format
    _check_rows(fmt, q.shape, "q.shape")
    batch = batch_dims(q)
    parts = []
    for name, dt, count in _LAYOUT[fmt][1]:
        v = np.asarray(getattr(q, name)).astype(dt)
        n_blocks = v.shape[len(batch)] if v.ndim > len(batch) else 1
        parts.append(np.ascontiguousarray(v).reshape(*batch, n_blocks, count).view(np.uint8))
    data = np.concatenate(parts, axis=-1)
    row_bytes = q.shape[-1] // BLOCK_VALUES[fmt] * BLOCK_BYTES[fmt]
    return data.reshape(*batch, *q.shape[:-1], row_bytes)


def from_ggml_bytes(data: Any, fmt: str, shape: tuple[int, ...], *, dtype: Any = jnp.float32) -> Any:
    """A record from the block bytes a GGUF file stores (the inverse of :func:`to_ggml_bytes`).

    Args:
        data: ``bytes``, ``bytearray``, ``memoryview`` or a uint8 array holding the blocks in order.
        fmt: one of ``"q5_0"``, ``"q5_1"``, ``"q2_k"`` ... ``"q6_k"``, ``"iq4_nl"``, ``"iq4_xs"``.
        shape: the logical shape (NumPy order); its last dim must be a whole number of blocks.
        dtype: the dtype that ``dequantize`` returns (float32, bfloat16 or float16).

    Returns:
        The record of ``fmt``.

    Raises:
        FormatError: unknown ``fmt``.
        InvalidShape: the last dim of ``shape`` is not a whole number of blocks, or ``data`` has the wrong size.
        DTypeError: ``data`` is an array of another dtype than uint8, or a bad ``dtype``.

    Example:
        >>> import jax.numpy as jnp
        >>> q = from_ggml_bytes(to_ggml_bytes(quantize_q4_k(jnp.ones(256))), "q4_k", (256,))
        >>> round(float(dequantize(q)[0]), 3)
        1.0
    """
    if fmt not in _LAYOUT:
        raise FormatError(argument="fmt", expected=f"one of {tuple(_LAYOUT)}", got=repr(fmt))
    shape = tuple(int(s) for s in shape)
    _check_rows(fmt, shape, "shape")
    if jnp.dtype(dtype) not in _FLOAT_DTYPES:
        raise DTypeError(argument="dtype", expected="float32, bfloat16 or float16", got=str(dtype))
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = np.frombuffer(bytes(data), np.uint8)
    else:
        raw = np.asarray(data)
        if raw.dtype != np.uint8:
            raise DTypeError(argument="data", expected="uint8 bytes", got=str(raw.dtype))
        raw = raw.reshape(-1)
    n_blocks = math.prod(shape) // BLOCK_VALUES[fmt]
    block_bytes = BLOCK_BYTES[fmt]
    if raw.size != n_blocks * block_bytes:
        raise InvalidShape(argument="data", expected=f"{n_blocks * block_bytes} bytes ({n_blocks} {fmt} blocks of "
                           f"{block_bytes} bytes for shape {shape})", got=f"{raw.size} bytes")
    blocks = raw.reshape(n_blocks, block_bytes)
    fields, offset = {}, 0
    for name, dt, count in _LAYOUT[fmt][1]:
        size = dt.itemsize * count
        v = np.ascontiguousarray(blocks[:, offset:offset + size]).view(dt)
        v = v.reshape(n_blocks) if count == 1 else v.reshape(n_blocks, count)
        fields[name] = jnp.asarray(v.astype(dt.newbyteorder("=")))
        offset += size
    return _RECORDS[fmt](**fields, shape=shape, dtype=jnp.dtype(dtype))


# ----------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------

_DESCRIPTIONS = {
    "q5_0": "GGML Q5_0: 32 values, fp16 scale, 5-bit codes around 16 (5.5 bits per value)",
    "q5_1": "GGML Q5_1: 32 values, fp16 scale and min, 5-bit codes (6 bits per value)",
    "q2_k": "GGML Q2_K: 256 values, 4-bit sub-block scales and mins, 2-bit codes (2.625 bits per value)",
    "q3_k": "GGML Q3_K: 256 values, 6-bit sub-block scales, 3-bit codes (3.4375 bits per value)",
    "q4_k": "GGML Q4_K: 256 values, 6-bit sub-block scales and mins, 4-bit codes (4.5 bits per value)",
    "q5_k": "GGML Q5_K: 256 values, 6-bit sub-block scales and mins, 5-bit codes (5.5 bits per value)",
    "q6_k": "GGML Q6_K: 256 values, int8 sub-block scales, 6-bit codes (6.5625 bits per value)",
}
_QUANTIZE = {"q5_0": quantize_q5_0, "q5_1": quantize_q5_1, "q2_k": quantize_q2_k, "q3_k": quantize_q3_k,
             "q4_k": quantize_q4_k, "q5_k": quantize_q5_k, "q6_k": quantize_q6_k}

for _name, _fn in _QUANTIZE.items():
    register_format(_name, record=_RECORDS[_name], quantize=_fn, dequantize=_DEQUANTIZE[_RECORDS[_name]],
                    block_size=BLOCK_VALUES[_name], description=_DESCRIPTIONS[_name],
                    row_multiple=BLOCK_VALUES[_name] if _name.endswith("_k") else 1)
compression._register_imatrix("q4_0", quantize_q4_0_imatrix)  # compression.quantize_q4_0(x, imatrix=...)
compression._register_imatrix("q4_1", quantize_q4_1_imatrix)
