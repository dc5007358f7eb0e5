"""An independent GPTQ in NumPy float64, written from the paper and the reference code's steps.

Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
(Algorithm 1), and IST-DASLab ``gptq.py`` (``GPTQ.add_batch``, ``GPTQ.fasterquant``): the same loops,
written plainly (a Python loop over blocks and columns, float64 throughout), generic over the grid: a
``find_params(wg) -> params`` computing a group's scales from its weights ``(out, group)``, and a
``snap(x, params) -> (codes, values)`` putting one column on that grid. Nothing from viva_tensor is used.
"""

from __future__ import annotations

import numpy as np


def add_batch(h: np.ndarray | None, n: int, x: np.ndarray) -> tuple[np.ndarray, int]:
    """``GPTQ.add_batch``: ``H *= n / (n + m); n += m; H += (sqrt(2 / n) X)(sqrt(2 / n) X)ᵀ``.

    ``x`` is ``(tokens, in)`` (one sample, as a 2-D input is in the reference) or ``(batch, tokens, in)``.
    """
    x = np.asarray(x, np.float64)
    if x.ndim == 2:
        x = x[None]
    m = x.shape[0]
    x = x.reshape(-1, x.shape[-1]).T
    if h is None:
        h = np.zeros((x.shape[0], x.shape[0]))
    h = h * (n / (n + m))
    n += m
    x = np.sqrt(2 / n) * x
    return h + x @ x.T, n


def gptq(
    w: np.ndarray,
    h: np.ndarray,
    *,
    find_params,
    snap,
    group_size: int,
    blocksize: int = 128,
    percdamp: float = 0.01,
    actorder: bool = False,
    static_groups: bool = False,
    dtype=np.float64,
) -> tuple[np.ndarray, np.ndarray, list]:
    """``GPTQ.fasterquant`` (float64 unless ``dtype`` says otherwise).

    Returns ``(codes, values, params of each group in column order)``.
    """
    W = np.array(w, dtype)
    H = np.array(h, dtype)
    rows, columns = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    groups = [find_params(W[:, i : i + group_size]) for i in range(0, columns, group_size)] if static_groups else None
    perm = np.arange(columns)
    if actorder:
        perm = np.argsort(-np.diag(H), kind="stable")
        W = W[:, perm]
        H = H[perm][:, perm]
    H[np.arange(columns), np.arange(columns)] += percdamp * np.mean(np.diag(H))
    L = np.linalg.cholesky(H)
    Linv = np.linalg.inv(L)
    Hinv = np.linalg.cholesky(Linv.T @ Linv).T  # upper factor of H^-1
    codes = np.zeros((rows, columns), np.int64)
    Q = np.zeros_like(W)
    params = [None] * (-(-columns // group_size))
    current = None
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if static_groups:
                current = groups[perm[j] // group_size]
            elif j % group_size == 0:
                current = find_params(W[:, j : j + group_size])  # W: the state at the start of this block
                params[j // group_size] = current
            w_col = W1[:, i]
            c, q = snap(w_col, current)
            codes[:, j], Q[:, j] = c, q
            err = (w_col - q) / Hinv1[i, i]
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    invperm = np.argsort(perm)
    return codes[:, invperm], Q[:, invperm], (groups if static_groups else params)


# ------------------------------------------------------------------------------------------ grids


def int4_group_grid():
    """The ``int4_group`` grid from its definition (awq module docstring), in float64.

    Per group: ``lo = min(min, 0)``, ``hi = max(max, 0)``, ``scale = float16(max(hi - lo, 1e-5) / 15)``,
    ``zero = clip(-round(lo / scale), 0, 15)``, ``code = clip(round(w / scale) + zero, 0, 15)`` (half to
    even), value ``(code - zero) * scale``: GPTQ's asymmetric 4-bit quantizer with a float16 scale.
    """

    def find_params(wg):
        lo = np.minimum(wg.min(axis=1), 0.0)
        hi = np.maximum(wg.max(axis=1), 0.0)
        scale = (np.maximum(hi - lo, 1e-5) / 15).astype(np.float16).astype(np.float64)
        zero = np.clip(-np.round(lo / scale), 0, 15)
        return scale, zero

    def snap(x, params):
        scale, zero = params
        code = np.clip(np.round(x / scale) + zero, 0, 15)
        return code.astype(np.int64), (code - zero) * scale

    return find_params, snap


def ist_asym_grid(bits: int = 4):
    """IST-DASLab ``Quantizer`` (``perchannel=True, sym=False``) with its float scale (no float16)."""
    maxq = 2**bits - 1

    def find_params(wg):
        xmin = np.minimum(wg.min(axis=1), 0.0)
        xmax = np.maximum(wg.max(axis=1), 0.0)
        both_zero = (xmin == 0) & (xmax == 0)
        xmin, xmax = np.where(both_zero, -1.0, xmin), np.where(both_zero, 1.0, xmax)
        scale = (xmax - xmin) / maxq
        return scale, np.round(-xmin / scale)

    def snap(x, params):
        scale, zero = params
        code = np.clip(np.round(x / scale) + zero, 0, maxq)
        return code.astype(np.int64), scale * (code - zero)

    return find_params, snap


NF4_LEVELS = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ]
)  # fmt: skip


def nf4_grid():
    """NF4 from its definition: per block the absmax; a value takes the nearest level of ``x / absmax``
    (on an exact midpoint the lower one), value ``level * absmax``."""

    def find_params(wg):
        return (np.abs(wg).max(axis=1),)

    def snap(x, params):
        (absmax,) = params
        scaled = np.where(absmax > 0, x / np.where(absmax > 0, absmax, 1), 0)
        midpoints = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
        code = np.sum(scaled[:, None] > midpoints[None, :], axis=1)
        return code, NF4_LEVELS[code] * absmax

    return find_params, snap


def mse_grid(find_params, snap, *, grid: int = 100, maxshrink: float = 0.8, norm: float = 2.4):
    """IST-DASLab ``Quantizer.find_params`` with ``mse=True``, generic over a grid: for ``i`` in
    ``range(int(maxshrink * grid))``, ``p = 1 - i / grid``, the scales of the range shrunk by ``p`` (here:
    ``find_params(p * wg)``, the grid's own scales of the shrunk values), the error ``Σ |snap(w) - w|^norm``
    of each row, and the scales of a row replaced only when its error is strictly smaller (``tmp = err <
    best``). Returns ``(find_params, snap)`` for :func:`gptq`."""

    def searched(wg):
        wg = np.asarray(wg, np.float64)
        best_err, best = None, None
        for i in range(int(maxshrink * grid)):
            p = 1 - i / grid
            params = find_params(p * wg)
            values = np.stack([snap(wg[:, j], params)[1] for j in range(wg.shape[1])], axis=1)
            err = np.sum(np.abs(values - wg) ** norm, axis=1)
            if best is None:
                best_err, best = err, [np.array(a, np.float64) for a in params]
                continue
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best = [np.where(better, a, b) for a, b in zip(params, best, strict=True)]
        return tuple(best)

    return searched, snap


def float_target(w: np.ndarray, xq: np.ndarray, xf: np.ndarray, damp: float) -> np.ndarray:
    """Asymmetric calibration's target in float64, from its definition: the ``W'`` minimising
    ``||X_q W'ᵀ - X_f Wᵀ||² + λ||W' - W||²`` with ``λ = damp * mean(diag(X_qᵀ X_q))``, found by ``lstsq`` on the
    stacked system ``[X_q; sqrt(λ) I] W'ᵀ = [X_f Wᵀ; sqrt(λ) Wᵀ]`` (no normal equations)."""
    w, xq, xf = (np.asarray(a, np.float64) for a in (w, xq, xf))
    lam = damp * np.mean(np.sum(xq * xq, axis=0))
    k = w.shape[1]
    a = np.concatenate([xq, np.sqrt(lam) * np.eye(k)])
    b = np.concatenate([xf @ w.T, np.sqrt(lam) * w.T])
    return np.linalg.lstsq(a, b, rcond=None)[0].T
