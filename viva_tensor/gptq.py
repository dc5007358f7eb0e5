"""GPTQ (Frantar et al., 2022): quantize a linear layer's weight column by column with error feedback.

Round to nearest quantizes every weight on its own. GPTQ quantizes the input columns of a weight
``W (out, in)`` one after another and, after each, spreads the column's rounding error over the columns
not yet quantized, weighted by the inverse Hessian of the layer's squared output error,
``H = 2 X Xᵀ / n`` (``X`` the layer's inputs). The steps are those of the reference implementation
(IST-DASLab ``gptq.py``, ``GPTQ.fasterquant``; AutoGPTQ is the same):

1. :func:`hessian` / :func:`accumulate`: ``H`` as a running mean over calibration batches (``H *= n / (n +
   m); n += m; H += (2 / n) XᵀX``), where ``m`` counts a batch's samples as the reference does: the
   leading dims of ``x (..., tokens, in)``; a 2-D ``x`` is one sample. A uniform scale of ``H`` does not
   change the result (the damping is relative).
2. Dead columns (``H[i, i] == 0``: an input that is always zero): ``H[i, i] = 1`` and ``W[:, i] = 0``.
3. ``static_groups=True``: every group's scales from the weight before the sweep (llm-compressor's
   practice); otherwise a group's scales are computed when the sweep reaches its first column, from the
   weight as updated so far. As in the reference, that is the state at the start of the current block
   of ``block_size`` columns (a group that starts inside a block does not see that block's own updates).
4. ``act_order=True``: columns in order of decreasing ``H[i, i]``, undone at the end. With
   ``static_groups=True`` the groups are those of consecutive columns (the reference's ``actorder +
   static_groups``, llm-compressor's ``actorder="weight"``) and the record is the format's own. Without it
   (GPTQModel's and AutoGPTQ's ``desc_act=True``), a group is ``group_size`` consecutive columns of the sweep's
   order, so for ``int4_group`` with several groups per row the result is an ``int4_gidx`` record
   (:mod:`viva_tensor.gidx`: the ``int4_group`` buffers plus ``g_idx``, the group of each input column, as
   GPTQ checkpoints store it); the fixed-block formats cannot hold such groups and need ``static_groups``.
5. Damping ``H += damp * mean(diag H) * I``; ``U`` = the upper Cholesky factor of ``H⁻¹``.
6. For each block of ``block_size`` columns, for each column ``i``: snap ``w = W[:, i]`` onto the
   format's grid (``q``), ``err = (w - q) / U[i, i]``, ``W[:, i:] -= err ⊗ U[i, i:]`` inside the block;
   after the block, the lazy batch update ``W[:, end:] -= Err @ U[block, end:]``.
7. ``mse=True`` (the reference quantizer's ``mse`` option): a group's scales are searched rather than taken
   from its range: the format's own scales of the group shrunk by ``p = 1, 0.99, ... 0.21``, keeping per
   row the first ``p`` with the least ``Σ |q - w|^2.4``. On MiniLM (int4 groups of 128, the default
   calibration of ``minilm.quantize``) it raised the mean embedding cosine from 0.9678 to 0.9692.

Asymmetric calibration (GPTAQ, Li et al. 2025): when the layer's inputs in the partly quantized model
(``X_q``) differ from the float model's (``X_f``), :func:`float_target` gives the weight ``W'`` whose outputs on
``X_q`` best match ``X_f Wᵀ``; GPTQ of ``W'`` on the Hessian of ``X_q`` then minimises ``||X_f Wᵀ - X_q Qᵀ||²``
(``nn.quantize_model(..., method="gptq", asymmetric=True)``).

The result is an ordinary record of the format (the class that ``quant.quantize(w, fmt)`` returns),
so ``quant.dequantize``, ``quant.dot_general``, ``quant.save`` / ``load`` and ``nn.QLinear`` take it
unchanged. Every format whose values sit on a per-block grid works: ``int4_group``, ``q4_0``, ``q4_1``,
``q5_0``, ``q5_1``, ``q8_0``, ``int8``, ``nf4``, ``nf4_dq``, ``nvfp4``, ``mxfp4``. Each format's scales, snapping
and record come from its entry in :mod:`viva_tensor._grids`, written with the format's own arithmetic: with
an identity Hessian (no error feedback) the record is bit-identical to ``quant.quantize(w, fmt)``.
``nf4_dq`` chooses codes with the exact absmax and double-quantizes the absmax at the end (the error
feedback does not see that second rounding); NVFP4's tensor scale and a per-tensor INT8 scale come from
the whole weight before the sweep.

The sweep is one jitted program (``lax.fori_loop`` over blocks and over the columns of a block); an
``in`` that is not a multiple of ``block_size`` is padded inside with independent zero columns. A
Hessian that is not positive definite even after damping gives NaN (the reference raises; GPTQModel
raises the damping, llm-compressor falls back to round to nearest): raise ``damp``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from viva_tensor import gptq, quant
    >>> kw, kx, kc = jax.random.split(jax.random.key(0), 3)
    >>> w = jax.random.normal(kw, (64, 256))
    >>> x = jax.random.normal(kx, (2048, 256)) @ (jnp.eye(256) + jax.random.normal(kc, (256, 256)) / 8)
    >>> q = gptq.quantize(w, gptq.hessian(x), "int4_group", group_size=128)
    >>> rtn = quant.quantize(w, "int4_group")
    >>> error = lambda r: float(jnp.linalg.norm(x @ w.T - x @ quant.dequantize(r).T))
    >>> type(q).__name__, q.nbytes == rtn.nbytes, error(q) < 0.8 * error(rtn)
    ('GroupInt4Tensor', True, True)
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from viva_tensor import _grids, gidx
from viva_tensor.errors import ConfigError, DimensionError, DTypeError, InvalidShape, ShapeMismatch

__all__ = ["Hessian", "hessian", "accumulate", "quantize", "formats", "float_target"]

_FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_HIGHEST = jax.lax.Precision.HIGHEST


class Hessian(NamedTuple):
    """The running GPTQ Hessian of a layer: ``matrix = 2 XᵀX / count`` over the inputs seen so far.

    Attributes:
        matrix: float32 ``(in, in)``.
        count: float32 ``()``: calibration samples accumulated (see :func:`accumulate`).
    """

    matrix: jax.Array
    count: jax.Array


def formats() -> list[str]:
    """The format names GPTQ can produce (those with a registered grid).

    Returns:
        The names, sorted.

    Example:
        >>> formats()
        ['int4_group', 'int8', 'mxfp4', 'nf4', 'nf4_dq', 'nvfp4', 'q4_0', 'q4_1', 'q5_0', 'q5_1', 'q8_0']
    """
    return sorted(_grids.GRIDS)


# ----------------------------------------------------------------------------------------- checks


def _float_array(x: Any, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if x.dtype not in _FLOAT_DTYPES:
        raise DTypeError(
            argument=name, expected="float32, bfloat16 or float16", got=str(x.dtype),
            hint="cast with .astype(jnp.float32) first.",
        )
    if x.size == 0:
        raise InvalidShape(argument=name, expected="at least one value", got=f"an empty array of shape {x.shape}")
    return x


def _inputs(x: Any, name: str = "x") -> jax.Array:
    x = _float_array(x, name)
    if x.ndim < 2:
        raise DimensionError(
            argument=name, expected="inputs (..., tokens, in) of rank >= 2", got=tuple(x.shape),
            hint="a single token is x[None, :].",
        )
    return x


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(argument=name, expected="a positive integer", got=value)
    return int(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(argument=name, expected="True or False", got=value)
    return bool(value)


def _hessian_matrix(h: Any, k: int, name: str = "h") -> jax.Array:
    matrix = h.matrix if isinstance(h, Hessian) else h
    matrix = _float_array(matrix, name)
    if matrix.shape != (k, k):
        raise ShapeMismatch(
            argument=name, expected=f"shape ({k}, {k}) (in x in, in = the weight's input dim)", got=tuple(matrix.shape),
            hint="build it from the layer's inputs with gptq.hessian(x); w is (out, in).",
        )
    return matrix.astype(jnp.float32)


# ----------------------------------------------------------------------------------------- Hessian


@jax.jit
def _accumulate(matrix: jax.Array, count: jax.Array, x: jax.Array, samples: jax.Array) -> Hessian:
    total = count + samples
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    update = jax.lax.dot_general(x, x, (((0,), (0,)), ((), ())), precision=_HIGHEST)
    return Hessian(matrix * (count / total) + update * (jnp.float32(2) / total), total)


def accumulate(
    h: Hessian | None, x: jax.Array, *, mask: jax.Array | None = None, weights: jax.Array | None = None
) -> Hessian:
    """Adds a calibration batch to a running Hessian: ``H *= n / (n + m); n += m; H += (2 / n) XᵀX``.

    ``m`` counts the batch's samples as the reference's ``add_batch``: the product of the dims before
    ``tokens`` (``x`` of shape ``(batch, tokens, in)`` adds ``batch``; a 2-D ``x`` is one sample). The
    rows of every sample are summed, so the result is ``2 / n`` times the sum of ``x xᵀ`` over all tokens.

    Args:
        h: the Hessian so far, or ``None`` to start.
        x: the layer's inputs ``(..., tokens, in)``, float32, bfloat16 or float16.
        mask: optional ``(..., tokens)`` booleans: tokens to leave out (padding), zero where False.
        weights: optional ``(..., tokens)`` non-negative token weights ``w_t``: the batch adds
            ``(2 / n) Σ_t w_t x_t x_tᵀ`` instead of ``(2 / n) Σ_t x_t x_tᵀ`` (``m`` is unchanged). E.g. ``1 / L``
            for the tokens of a text of ``L`` tokens when the objective is the text's mean over its tokens
            (a token moves the mean by ``1 / L`` of its own error): every text then counts equally. GPTQ
            itself (:func:`quantize`) is unchanged; it sees the weighted Hessian.

    Returns:
        A :class:`Hessian`.

    Raises:
        DTypeError, InvalidShape, DimensionError: ``x`` not a float array of rank >= 2 (or empty).
        ShapeMismatch: ``x``'s last dim differs from ``h``'s, or ``mask`` / ``weights`` is not ``x.shape[:-1]``.
        ConfigError: a negative or non-finite weight (checked when ``weights`` is concrete).

    Example:
        >>> import jax.numpy as jnp
        >>> h = accumulate(None, jnp.ones((2, 3, 4)))            # 2 samples of 3 tokens
        >>> h = accumulate(h, 2 * jnp.ones((1, 3, 4)))           # 1 more sample
        >>> float(h.count), h.matrix[0, 0].tolist()               # 2 * (6 * 1 + 3 * 4) / 3
        (3.0, 12.0)
    """
    x = _inputs(x)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != x.shape[:-1]:
            raise ShapeMismatch(argument="mask", expected=f"shape {tuple(x.shape[:-1])} (x without in)", got=mask.shape)
        x = jnp.where(mask[..., None].astype(bool), x, jnp.zeros((), x.dtype))
    if weights is not None:
        weights = jnp.asarray(weights)
        if weights.shape != x.shape[:-1]:
            raise ShapeMismatch(argument="weights", expected=f"shape {tuple(x.shape[:-1])} (x without in)",
                                got=weights.shape)  # fmt: skip
        if not isinstance(weights, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(weights) & (weights >= 0))):
            raise ConfigError(argument="weights", expected="finite weights >= 0", got="a negative or non-finite weight")
        x = x.astype(jnp.float32) * jnp.sqrt(weights.astype(jnp.float32))[..., None]
    k = x.shape[-1]
    if h is None:
        h = Hessian(jnp.zeros((k, k), jnp.float32), jnp.zeros((), jnp.float32))
    elif not isinstance(h, Hessian):
        raise ConfigError(argument="h", expected="a gptq.Hessian or None", got=type(h).__name__)
    elif h.matrix.shape != (k, k):
        size = h.matrix.shape[0]
        raise ShapeMismatch(argument="x", expected=f"inputs (..., {size}) (the Hessian's size)", got=x.shape)
    samples = jnp.float32(math.prod(x.shape[:-2]))
    return _accumulate(h.matrix, h.count, x, samples)


def hessian(x: jax.Array, *, mask: jax.Array | None = None, weights: jax.Array | None = None) -> Hessian:
    """The GPTQ Hessian ``2 XᵀX / n`` of a layer's inputs (:func:`accumulate` from nothing).

    Args:
        x: the layer's inputs ``(..., tokens, in)``.
        mask: optional ``(..., tokens)`` booleans: tokens to leave out.
        weights: optional ``(..., tokens)`` token weights (see :func:`accumulate`).

    Returns:
        A :class:`Hessian` (``matrix (in, in)`` float32, ``count``).

    Raises:
        DTypeError, InvalidShape, DimensionError, ShapeMismatch: as :func:`accumulate`.

    Example:
        >>> import jax.numpy as jnp
        >>> h = hessian(jnp.array([[1.0, 0.0], [1.0, 2.0]]))     # one sample of two tokens
        >>> h.matrix.tolist(), float(h.count)
        ([[4.0, 4.0], [4.0, 8.0]], 1.0)
    """
    return accumulate(None, x, mask=mask, weights=weights)


# ----------------------------------------------------------------------------------------- the sweep


def _upper_inverse_factor(h: jax.Array) -> jax.Array:
    """``U`` upper triangular with ``Uᵀ U = H⁻¹`` (torch: ``cholesky(cholesky_inverse(cholesky(H)), upper=True)``)."""
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    lower = jnp.linalg.cholesky(h)
    inverse = jax.scipy.linalg.cho_solve((lower, True), eye)
    return jnp.linalg.cholesky((inverse + inverse.T) / 2).T


def _embed(u: jax.Array, size: int) -> jax.Array:
    """``u`` in the top-left of a ``size x size`` identity: padding columns are independent of the others."""
    k = u.shape[0]
    return jnp.eye(size, dtype=u.dtype).at[:k, :k].set(u)


MSE_GRID = 100
"""``mse=True``: shrink factors ``1, 1 - 1/100, ...`` of a group's range are tried (the reference's ``grid``)."""
MSE_MAX_SHRINK = 0.8
"""``mse=True``: the factors go down to ``1 - 0.8`` (the reference's ``maxshrink``: 80 candidates)."""
MSE_NORM = 2.4
"""``mse=True``: the error minimised is ``Σ |q - w|^2.4`` over a group's row (the reference's ``norm``)."""


def _mse_params(grid: _grids.Grid, wg: jax.Array, tensor: Any) -> Any:
    """A group's scales with the least ``Σ|q - w|^2.4`` per row over shrunk ranges (the reference's ``mse=True``).

    Candidate ``p`` takes the format's own scales of ``p * wg`` (its range, absmax or min and max, times
    ``p``), snaps the unshrunk ``wg`` onto them (values beyond the range clip to the grid's ends) and keeps,
    for each row, the first ``p`` with the least error; ``p = 1`` (the plain scales) is the first candidate.
    """
    steps = int(MSE_MAX_SHRINK * MSE_GRID)
    shrinks = 1 - jnp.arange(steps, dtype=jnp.float32) / jnp.float32(MSE_GRID)

    def candidate(p):
        params = grid.params(wg * p, tensor)
        _, q = jax.vmap(lambda x: grid.snap(x, params, tensor), in_axes=1, out_axes=1)(wg)
        return params, jnp.sum(jnp.abs(q - wg) ** jnp.float32(MSE_NORM), axis=1)

    params, errors = jax.lax.map(candidate, shrinks)
    best = jnp.argmin(jnp.where(jnp.isnan(errors), jnp.inf, errors), axis=0)  # (out,): first least error
    rows = jnp.arange(wg.shape[0])
    return jax.tree.map(lambda a: a[best, rows], params)


@functools.partial(
    jax.jit,
    static_argnames=("fmt", "group", "options", "act_order", "static_groups", "block", "shape", "dtype", "mse"),
)
def _sweep(w32, h, damp, *, fmt, group, options, act_order, static_groups, block, shape, dtype, mse=False):
    grid = _grids.GRIDS[fmt]
    layout = _grids.Layout(group, dict(options))
    find_params = functools.partial(_mse_params, grid) if mse else grid.params
    out, k = w32.shape
    dead = jnp.diagonal(h) == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    w32 = jnp.where(dead[None, :], jnp.float32(0), w32)
    tensor = grid.tensor(w32, layout)
    n_groups = -(-k // group)
    padded = -(-k // block) * block
    width = max(padded, n_groups * group)
    groups_of = jnp.arange(padded) // group
    static = None
    if static_groups:
        cut = jnp.pad(w32, ((0, 0), (0, n_groups * group - k))).reshape(out, n_groups, group)
        static = jax.vmap(lambda g: find_params(g, tensor), in_axes=1)(cut)
    if act_order:
        perm = jnp.argsort(-jnp.diagonal(h), stable=True)
        w32, h = w32[:, perm], h[perm][:, perm]
        if static_groups:  # else groups of consecutive columns in the sweep's order (their g_idx is kept)
            groups_of = jnp.concatenate([perm, jnp.arange(k, padded)]) // group
    h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(k, dtype=h.dtype)
    u = _embed(_upper_inverse_factor(h), width)
    w = jnp.pad(w32, ((0, 0), (0, width - k)))
    groups_of = jnp.minimum(groups_of, n_groups - 1)

    stored = static
    if not static_groups:
        shapes = jax.eval_shape(lambda g: find_params(g, tensor), w[:, :group])
        stored = jax.tree.map(lambda a: jnp.zeros((n_groups,) + a.shape, a.dtype), shapes)
    starts = jnp.arange(n_groups) * group
    whole_groups = block % group == 0 and padded == n_groups * group

    def column(i, carry, u1, start, stored):
        w1, err1, codes = carry
        j = start + i
        params = jax.tree.map(lambda a: a[groups_of[j]], stored)
        x = w1[:, i]
        code, q = grid.snap(x, params, tensor)
        err = (x - q) / u1[i, i]
        w1 = w1 - err[:, None] * u1[i][None, :]
        err1 = jax.lax.dynamic_update_slice_in_dim(err1, err[:, None], i, axis=1)
        return w1, err1, jax.lax.dynamic_update_slice_in_dim(codes, code[:, None], j, axis=1)

    def block_step(b, carry):
        w, codes, stored = carry
        start = b * block
        if not static_groups:
            # The groups that start in this block get their scales from the weight as it is now (the
            # reference's find_params on W, which this block's own updates have not reached yet).
            if whole_groups:  # the block holds whole groups: compute only theirs
                cut = jax.lax.dynamic_slice_in_dim(w, start, block, axis=1).reshape(out, block // group, group)
                fresh = jax.vmap(lambda g: find_params(g, tensor), in_axes=1)(cut)
                stored = jax.tree.map(
                    lambda s, f: jax.lax.dynamic_update_slice_in_dim(s, f, start // group, axis=0), stored, fresh
                )
            else:
                cut = w[:, : n_groups * group].reshape(out, n_groups, group)
                fresh = jax.vmap(lambda g: find_params(g, tensor), in_axes=1)(cut)
                new = (starts >= start) & (starts < start + block)
                stored = jax.tree.map(
                    lambda s, f: jnp.where(new.reshape((-1,) + (1,) * (s.ndim - 1)), f, s), stored, fresh
                )
        w1 = jax.lax.dynamic_slice_in_dim(w, start, block, axis=1)
        u1 = jax.lax.dynamic_slice(u, (start, start), (block, block))
        _, err1, codes = jax.lax.fori_loop(
            0, block, functools.partial(column, u1=u1, start=start, stored=stored), (w1, jnp.zeros_like(w1), codes)
        )
        rows = jax.lax.dynamic_slice_in_dim(u, start, block, axis=0)
        w = w - jnp.matmul(err1, rows, precision=_HIGHEST)
        return w, codes, stored

    codes = jnp.zeros((out, padded), jnp.int32)
    _, codes, stored = jax.lax.fori_loop(0, padded // block, block_step, (w, codes, stored))
    codes = codes[:, :k]
    if act_order:
        codes = codes[:, jnp.argsort(perm)]
    rec = grid.record(codes, stored, tensor, shape, dtype, layout)
    if act_order and not static_groups and n_groups > 1:  # int4_group only (quantize checks)
        rec = gidx.from_group_record(rec, (jnp.argsort(perm) // group).astype(jnp.int32))
    return rec


# ----------------------------------------------------------------------------------------- asymmetric target


@jax.jit
def _float_target(w, gram, cross, damp):
    k = gram.shape[0]
    scale = jnp.mean(jnp.diagonal(gram))
    lam = damp * jnp.where(scale > 0, scale, jnp.float32(1))
    eye = jnp.eye(k, dtype=jnp.float32)
    lower = jnp.linalg.cholesky(gram + lam * eye)
    rhs = jnp.matmul(cross.T, w.T, precision=_HIGHEST) + lam * w.T  # (in, out): X_qᵀ X_f Wᵀ + λ Wᵀ
    target = jax.scipy.linalg.cho_solve((lower, True), rhs)
    residual = jnp.matmul(gram + lam * eye, target, precision=_HIGHEST) - rhs
    ok = jnp.linalg.norm(residual) <= jnp.float32(1e-3) * jnp.linalg.norm(rhs) + jnp.float32(1e-30)
    return jnp.where(ok & jnp.all(jnp.isfinite(target)), target.T, w), ok


def float_target(
    w: jax.Array, gram: jax.Array, cross: jax.Array, *, damp: float = 0.01, return_ok: bool = False
) -> Any:
    """The weight that best gives, on the quantized model's inputs, the float model's outputs (asymmetric GPTQ).

    GPTQ fits ``Q`` to ``W`` on one set of inputs. In a model whose earlier layers are already quantized, a
    layer receives ``X_q`` where the float model gives ``X_f``; what matters is ``||X_f Wᵀ - X_q Qᵀ||²``
    (the "asymmetric calibration" of GPTAQ, Li et al. 2025). That objective is ``||X_q (W' - Q)ᵀ||²`` plus a
    constant, with ``W'`` the least-squares solution of ``X_q W'ᵀ ≈ X_f Wᵀ``; so GPTQ of ``W'`` on the
    Hessian of ``X_q`` minimises it. With ridge damping toward ``W`` (``λ = damp * mean(diag G)``):
    ``W' = W (C + λI) (G + λI)⁻¹``, ``G = X_qᵀ X_q``, ``C = X_fᵀ X_q``. The solve is a float32 Cholesky; if its
    relative residual exceeds ``1e-3`` or the result is not finite, ``W`` is returned unchanged.

    Args:
        w: the float weight ``(out, in)``.
        gram: ``G = X_qᵀ X_q``, ``(in, in)``, the Gram matrix of the quantized model's inputs (any common scale
            with ``cross``).
        cross: ``C = X_fᵀ X_q``, ``(in, in)``, over the same tokens (float inputs first).
        damp: relative ridge ``λ = damp * mean(diag G)`` (larger: closer to ``w``).
        return_ok: also return whether the solve passed its residual check.

    Returns:
        ``W'`` float32 ``(out, in)`` (and a boolean array with ``return_ok``).

    Raises:
        DTypeError, InvalidShape, DimensionError: ``w`` not a 2-D float array.
        ShapeMismatch: ``gram`` or ``cross`` not ``(in, in)``.
        ConfigError: a negative or non-finite ``damp``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> kw, kx, kn = jax.random.split(jax.random.key(0), 3)
        >>> w = jax.random.normal(kw, (8, 16))
        >>> xf = jax.random.normal(kx, (256, 16))
        >>> xq = xf @ (jnp.eye(16) + 0.2 * jax.random.normal(kn, (16, 16)))   # the quantized model's inputs
        >>> t = float_target(w, xq.T @ xq, xf.T @ xq, damp=0.0)
        >>> err = lambda v: float(jnp.linalg.norm(xf @ w.T - xq @ v.T))
        >>> err(t) < 0.01 * err(w)
        True
    """
    w = _float_array(w, "w")
    if w.ndim != 2:
        raise DimensionError(argument="w", expected="a 2-D weight (out, in)", got=tuple(w.shape))
    k = w.shape[1]
    gram, cross = _hessian_matrix(gram, k, "gram"), _hessian_matrix(cross, k, "cross")
    if isinstance(damp, bool) or not isinstance(damp, (int, float, np.floating)) or not 0 <= damp < math.inf:
        raise ConfigError(argument="damp", expected="a finite float >= 0", got=damp)
    target, ok = _float_target(w.astype(jnp.float32), gram, cross, jnp.float32(damp))
    return (target, ok) if return_ok else target


def quantize(
    w: jax.Array,
    h: Hessian | jax.Array,
    fmt: str,
    *,
    group_size: int | None = None,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    static_groups: bool = False,
    mse: bool = False,
    **format_options: Any,
) -> Any:
    """GPTQ-quantizes a weight ``(out, in)`` into an ordinary record of format ``fmt``.

    Args:
        w: the weight, ``(out, in)`` (PyTorch's layout; ``nnx.Linear``'s kernel is ``w.T``), float32,
            bfloat16 or float16.
        h: the layer's :class:`Hessian` (:func:`hessian`), or its ``(in, in)`` matrix.
        fmt: a format with a grid (:func:`formats`): ``"int4_group"``, ``"q4_0"``, ``"q4_1"``, ``"q5_0"``,
            ``"q5_1"``, ``"q8_0"``, ``"int8"``, ``"nf4"``, ``"nf4_dq"``, ``"nvfp4"``, ``"mxfp4"``.
        group_size: input columns per scale: ``int4_group``'s ``group_size`` (default 128), the block of
            ``nf4``/``nf4_dq``/``int8`` (``block_size``; for int8 default one scale per tensor); the
            fixed-block formats take only ``None`` or their block (32, or 16 for NVFP4). Formats whose
            blocks run over the flattened weight (GGML, NF4, INT8 blocks) need a block dividing ``in``.
        act_order: quantize columns in order of decreasing ``H[i, i]``. Without ``static_groups`` and with
            several groups per row: ``int4_group`` gives an ``int4_gidx`` record (GPTQ's ``desc_act``, groups of
            the sweep's order and their ``g_idx``); other formats need ``static_groups=True``.
        damp: relative damping, ``H += damp * mean(diag H) * I``.
        block_size: columns per lazy batch update.
        static_groups: every group's scales from the weight before the sweep.
        mse: each group's scales chosen by a search (the reference quantizer's ``mse=True``): the format's
            scales of the group's values shrunk by ``p = 1, 0.99, ... 0.21``, keeping per row the ``p`` with
            the least ``Σ|q - w|^2.4`` (values past the shrunk range clip to the grid's ends). The record is
            the format's own (its decoder gives the snapped values); with an identity Hessian it is round to
            nearest on the searched scales. Formats whose scale is per tensor (NVFP4's float32 scale, INT8 per
            tensor) search only their per-block scales.
        **format_options: the format's own options (``axis=0`` for a per-row INT8 scale,
            ``nested_block_size`` for ``nf4_dq`` ...).

    Returns:
        The format's record (the class ``quant.quantize(w, fmt)`` returns; an ``int4_gidx`` record for
        ``int4_group`` with act-order groups, see ``act_order``), shape ``(out, in)``, dtype ``w.dtype``.

    Raises:
        FormatError: ``fmt`` has no grid, or an option the format does not take.
        DTypeError, InvalidShape, DimensionError: ``w`` not a non-empty 2-D float array.
        ShapeMismatch: ``h`` not ``(in, in)``.
        ConfigError: a ``group_size`` the format cannot use, a non-positive ``block_size``, a negative or
            non-finite ``damp``, ``act_order`` with several groups per row and dynamic groups for a format
            other than ``int4_group``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> w = jax.random.normal(jax.random.key(1), (8, 64))
        >>> q = quantize(w, jnp.eye(64), "q4_0")                    # identity H: no error feedback
        >>> from viva_tensor import quant
        >>> bool(jnp.all(q.qs == quant.quantize(w, "q4_0").qs))
        True
    """
    grid = _grids.grid_of(fmt)
    w = _float_array(w, "w")
    if w.ndim != 2:
        raise DimensionError(
            argument="w", expected="a 2-D weight (out, in)", got=tuple(w.shape),
            hint="nnx.Linear's kernel is (in, out): pass kernel.T.",
        )
    out, k = w.shape
    matrix = _hessian_matrix(h, k)
    layout = grid.resolve(group_size, dict(format_options), (out, k))
    block = _positive_int("block_size", block_size)
    act_order, static_groups = _flag("act_order", act_order), _flag("static_groups", static_groups)
    mse = _flag("mse", mse)
    if isinstance(damp, bool) or not isinstance(damp, (int, float, np.floating)) or not 0 <= damp < math.inf:
        raise ConfigError(argument="damp", expected="a finite float >= 0 (0.01 in the reference)", got=damp)
    if act_order and not static_groups and layout.group < k and grid.name != "int4_group":
        raise ConfigError(
            argument="act_order",
            expected=f"static_groups=True with act_order when a row has several groups ({-(-k // layout.group)})",
            got=act_order,
            hint=f"{grid.name} stores one scale per block of consecutive columns; int4_group with act_order "
            "gives an int4_gidx record (a g_idx per column).",
        )
    record = _sweep(
        w.astype(jnp.float32),
        matrix,
        jnp.float32(damp),
        fmt=grid.name,
        group=layout.group,
        options=tuple(sorted(layout.options.items())),
        act_order=act_order,
        static_groups=static_groups,
        block=block,
        shape=(out, k),
        dtype=w.dtype,
        mse=mse,
    )
    return record if grid.finish is None else grid.finish(record, layout)
