"""Gradients through a quantized operand of :func:`viva_tensor.quant.dot_general` (private).

:func:`qdot` wraps the quantized matmul in a ``jax.custom_vjp``: the forward is the matmul itself, and it saves
only the plain operand and the record (no dequantized weight). The backward of the plain operand is another
quantized contraction of the cotangent with the same record under the transposed dimension numbers (those of
``jax.lax.dot_general``'s own transpose rule), which decodes the record again: for a 2-D record in row chunks
(:func:`chunked_dot`), at every size, so that the backward never holds a dense copy of the weight; otherwise
through the quantized matmul itself. Under differentiation the forward of a 2-D record of at least ``2**16``
values is chunked the same way (the primal call, without a gradient, is untouched).

Records are frozen: their cotangent is zero (``None``; integer codes would take ``float0``), so a quantized base
weight never trains. A ``custom_vjp`` differentiates in reverse mode only: ``jax.grad``, ``jax.vjp`` and
``jax.test_util.check_grads(..., modes=["rev"])`` work, ``jax.jvp`` through a record does not.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from viva_tensor import quant
    >>> q = quant.quantize(jnp.eye(32), "q8_0")
    >>> g = jax.grad(lambda x: quant.dot(x, q).sum())(jnp.ones((2, 32)))
    >>> g.shape, bool(jnp.allclose(g, quant.dequantize(q).sum(axis=1)[None, :]))
    ((2, 32), True)
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from viva_tensor._formats.registry import expected_record, is_quantized, spec_of

__all__ = ["qdot", "chunked_dot", "chunk_plan", "row_chunks", "transposed_dims"]

# A chunk of the decoded weight holds at most this many values (2 MiB of float32, an L2 cache) and at most
# 1/_CHUNK_PARTS of the weight, so that the backward's temporaries stay a small part of a dense copy.
_CHUNK_VALUES = 1 << 19
_CHUNK_PARTS = 16
_MAX_CHUNKS = 1024  # more chunks than this (a prime number of rows): decode whole instead
# Under differentiation the forward of a 2-D record of at least this many values is chunked too (smaller ones
# decode whole: at most 256 KiB of float32).
_MIN_CHUNKED = 1 << 16


def _remaining(n: int, *removed: tuple[int, ...]) -> list[int]:
    gone = set(itertools.chain(*removed))
    return [i for i in range(n) if i not in gone]


def _ranges_like(*xs: Any) -> list[list[int]]:
    out, start = [], 0
    for x in xs:
        out.append(list(range(start, start + len(x))))
        start += len(x)
    return out


def transposed_dims(dims: tuple, x_ndim: int, y_ndim: int, *, swap: bool) -> tuple[tuple, tuple[int, ...]]:
    """The dimension numbers of ``x``'s cotangent, ``dot_general(g, y, dims')``, and the permutation after it.

    ``dims`` are those of ``dot_general(x, y)`` (``swap=False``) or of ``dot_general(y, x)`` written with ``x``
    first (``swap=True``). As ``jax.lax.dot_general``'s transpose rule: ``x_bar = transpose(dot_general(g, y,
    dims'), perm)``.

    Example:
        >>> transposed_dims((((1,), (0,)), ((), ())), 2, 2, swap=False)
        ((((1,), (1,)), ((), ())), (0, 1))
    """
    (xc, yc), (xb, yb) = dims
    x_kept, y_kept = _remaining(x_ndim, xc, xb), _remaining(y_ndim, yc, yb)
    if swap:
        ans_batch, ans_y, _ = _ranges_like(xb, y_kept, x_kept)
    else:
        ans_batch, _, ans_y = _ranges_like(xb, x_kept, y_kept)
    new = ((tuple(ans_y), tuple(y_kept)), (tuple(ans_batch), tuple(yb)))
    xc_by_y = [int(v) for v in np.take(np.asarray(xc, int), np.argsort(np.asarray(yc, int)))] if xc else []
    perm = tuple(int(v) for v in np.argsort(list(xb) + x_kept + xc_by_y))
    return new, perm


def _normalize(dims: tuple, l_ndim: int, r_ndim: int) -> tuple:
    (lc, rc), (lb, rb) = dims
    return (tuple(d % l_ndim for d in lc), tuple(d % r_ndim for d in rc)), (
        tuple(d % l_ndim for d in lb),
        tuple(d % r_ndim for d in rb),
    )


def _ndim(x: Any) -> int:
    return len(x.batch_shape) + len(x.shape) if is_quantized(x) else jnp.ndim(x)


def _static_key(rec: Any) -> tuple:
    return tuple(
        (f.name, getattr(rec, f.name)) for f in dataclasses.fields(rec) if not f.metadata.get("pytree_node", True)
    )


@functools.lru_cache(maxsize=256)
def _plan_for(spec: Any, cls: type, key: tuple, leaf_shapes: tuple) -> tuple[int, tuple[bool, ...]] | None:
    statics = dict(key)
    k, n = statics["shape"]
    limit = min(_CHUNK_VALUES, (k * n) // _CHUNK_PARTS)
    for rows in range(max(1, limit // max(n, 1)), 0, -1):
        if k % rows or not 2 <= k // rows <= _MAX_CHUNKS:
            continue
        probe = object.__new__(cls)
        for name, value in {**statics, "shape": (rows, n)}.items():
            object.__setattr__(probe, name, value)
        try:
            chunk = jax.tree_util.tree_leaves(expected_record(spec, probe))
        except Exception:  # noqa: BLE001 - this chunk height is not a valid tensor for the format: try another
            continue
        if len(chunk) != len(leaf_shapes):
            return None
        sliced, nc = [], k // rows
        for whole, part in zip(leaf_shapes, chunk, strict=True):
            part = tuple(part.shape)
            if whole == part:
                sliced.append(False)
            elif len(whole) >= 1 and whole[0] == nc * part[0] and whole[1:] == part[1:]:
                sliced.append(True)
            else:
                break
        else:
            return rows, tuple(sliced)
    return None


def chunk_plan(rec: Any) -> tuple[int, tuple[bool, ...]] | None:
    """Rows per chunk of a 2-D record made outside vmap, and which leaves are sliced by rows (others are shared).

    A chunk holds at most ``2**19`` values and at most 1/16 of the record (at most 1024 chunks), and its blocks
    start where the whole record's do (the chunk's buffers are slices of the record's). ``None`` when no such
    chunk exists.

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import quant
        >>> chunk_plan(quant.quantize(jnp.ones((256, 64)), "q8_0"))
        (16, (True, True))
    """
    if not is_quantized(rec) or len(rec.shape) != 2 or rec.batch_shape:
        return None
    try:
        key = _static_key(rec)
        hash(key)
    except TypeError:
        return None
    shapes = tuple(tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(rec))
    return _plan_for(spec_of(rec), type(rec), key, shapes)


def row_chunks(rec: Any, plan: tuple[int, Sequence[bool]]) -> tuple[list, Callable[[list], Any]]:
    """A 2-D record cut into row chunks by ``plan`` (rows per chunk, which leaves are sliced by rows): the sliced
    leaves stacked chunk by chunk (``None`` for the shared ones), to scan over, and a function from one chunk's
    slices to that chunk's record (shape ``(rows, n)``, its format's ``dequantize`` decodes it).

    The row-chunked decoder of :func:`chunked_dot` and of :mod:`viva_tensor.quant._dot`'s large-weight path.

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import quant
        >>> q = quant.quantize(jnp.ones((256, 64)), "q8_0")
        >>> stacked, chunk_of = row_chunks(q, chunk_plan(q))
        >>> [s.shape for s in stacked], chunk_of([s[0] for s in stacked]).shape
        ([(16, 32, 32), (16, 32)], (16, 64))
    """
    rows, sliced = plan
    k, n = rec.shape
    nc = k // rows
    leaves, treedef = jax.tree_util.tree_flatten(rec)
    stacked = [leaf.reshape(nc, -1, *leaf.shape[1:]) if s else None for leaf, s in zip(leaves, sliced, strict=True)]

    def chunk_of(parts: list) -> Any:
        chunk_leaves = [p if s else leaf for p, leaf, s in zip(parts, leaves, sliced, strict=True)]
        return dataclasses.replace(jax.tree_util.tree_unflatten(treedef, chunk_leaves), shape=(rows, n))

    return stacked, chunk_of


def chunked_dot(a: jax.Array, rec: Any, a_axis: int, rec_axis: int, *, precision: Any = None,
                out_dtype: Any = None, plan: tuple[int, Sequence[bool]] | None = None) -> jax.Array:
    """``dot_general(a, rec)`` contracting ``a``'s ``a_axis`` with the 2-D record's ``rec_axis``, decoded in row chunks.

    The record is decoded chunk by chunk inside a ``lax.scan`` (its format's ``dequantize`` of each slice, see
    :func:`row_chunks`), so no dense copy of it exists at any time. The product accumulates in float32. ``plan``:
    rows per chunk and the sliced leaves, by default :func:`chunk_plan`'s.

    Returns:
        ``a``'s other dims followed by the record's other dim, in ``out_dtype`` (default: as ``dot_general``).

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import quant
        >>> q = quant.quantize(jnp.ones((256, 64)), "q8_0")
        >>> chunked_dot(jnp.ones((3, 64)), q, 1, 1).shape
        (3, 256)
    """
    plan = chunk_plan(rec) if plan is None else plan
    spec = spec_of(rec)
    k, n = rec.shape
    nc = k // plan[0]
    cdtype = a.dtype if jnp.issubdtype(a.dtype, jnp.floating) else np.dtype(rec.dtype)
    out_dtype = out_dtype or jnp.result_type(a.dtype, cdtype)
    stacked, chunk_of = row_chunks(rec, plan)
    a = jnp.moveaxis(a, a_axis, -1).astype(cdtype)

    def decode(parts: list) -> jax.Array:
        return spec.dequantize(chunk_of(parts)).astype(rec.dtype).astype(cdtype)

    def mul(x: jax.Array, w: jax.Array, w_axis: int) -> jax.Array:
        dims = (((x.ndim - 1,), (w_axis,)), ((), ()))
        return jax.lax.dot_general(x, w, dims, precision=precision, preferred_element_type=jnp.float32)

    if rec_axis == 1:  # rows of the record are output columns: one slice of the output per chunk

        def rows_body(carry, parts):
            return carry, mul(a, decode(parts), 1).astype(out_dtype)

        _, ys = jax.lax.scan(rows_body, None, stacked)  # (nc, ..., rows)
        return jnp.moveaxis(ys, 0, -2).reshape(*a.shape[:-1], k)

    xs = jnp.moveaxis(a.reshape(*a.shape[:-1], nc, plan[0]), -2, 0)

    def sum_body(acc, inputs):
        xc, parts = inputs
        return acc + mul(xc, decode(parts), 0), None

    acc, _ = jax.lax.scan(sum_body, jnp.zeros((*a.shape[:-1], n), jnp.float32), (xs, stacked))
    return acc.astype(out_dtype)


def _contract(forward: Callable, g: jax.Array, rec: Any, dims: tuple, precision: Any, kernel: bool) -> jax.Array:
    """``dot_general(g, rec, dims)``: the quantized matmul when it takes the compiled kernel (which decodes in
    cache, never densely, in either layout), else chunked for a 2-D record and one contracted dim, else the
    quantized matmul."""
    (gc, rc), (gb, rb) = dims
    if not kernel and len(rc) == 1 and not gb and chunk_plan(rec) is not None:
        return chunked_dot(g, rec, gc[0], rc[0], precision=precision)
    return forward(g, rec, dims=dims, precision=precision, preferred_element_type=None, out_sharding=None)


def _cotangent(forward: Callable, g: jax.Array, plain: Any, rec: Any, dims: tuple, *, swap: bool,
               precision: Any, kernel: bool) -> Any:
    """The plain operand's cotangent: the record contracted again with ``g`` (transposed dims), cast back."""
    plain = jnp.asarray(plain)
    if not jnp.issubdtype(plain.dtype, jnp.inexact):
        return np.zeros(plain.shape, jax.dtypes.float0)
    tdims, perm = transposed_dims(dims, plain.ndim, _ndim(rec), swap=swap)
    out = _contract(forward, g, rec, tdims, precision, kernel)
    return jnp.transpose(out, perm).astype(plain.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4, 5, 6, 7))
def _vjp_dot(forward, lhs, rhs, dims, precision, preferred_element_type, out_sharding, kernel):
    return forward(lhs, rhs, dims=dims, precision=precision, preferred_element_type=preferred_element_type,
                   out_sharding=out_sharding)


def _chunked_forward(lhs: Any, rhs: Any, dims: tuple, precision: Any, preferred_element_type: Any) -> Any:
    """The product by :func:`chunked_dot` when one operand is a chunkable 2-D record of at least ``2**16`` values
    contracted on one dim with no batch dims, else ``None``."""
    (lc, rc), (lb, rb) = _normalize(dims, _ndim(lhs), _ndim(rhs))
    if lb or len(lc) != 1 or is_quantized(lhs) == is_quantized(rhs):
        return None
    rec, plain, rec_axis, axis = (rhs, lhs, rc[0], lc[0]) if is_quantized(rhs) else (lhs, rhs, lc[0], rc[0])
    if math.prod(rec.shape) < _MIN_CHUNKED or chunk_plan(rec) is None:
        return None
    plain = jnp.asarray(plain)
    out = chunked_dot(plain, rec, axis, rec_axis, precision=precision, out_dtype=preferred_element_type)
    return out if rec is rhs else jnp.moveaxis(out, -1, 0)


def _vjp_fwd(forward, lhs, rhs, dims, precision, preferred_element_type, out_sharding, kernel):
    out = None
    if out_sharding is None and not kernel:
        out = _chunked_forward(lhs, rhs, dims, precision, preferred_element_type)
    if out is None:
        out = _vjp_dot(forward, lhs, rhs, dims, precision, preferred_element_type, out_sharding, kernel)
    return out, (lhs, rhs)  # the plain operand and the record: no decoded weight


def _vjp_bwd(forward, dims, precision, preferred_element_type, out_sharding, kernel, residuals, g):
    lhs, rhs = residuals
    dims = _normalize(dims, _ndim(lhs), _ndim(rhs))
    (lc, rc), (lb, rb) = dims
    lhs_bar = rhs_bar = None  # records are frozen: zero cotangent
    if is_quantized(rhs) and not is_quantized(lhs):
        lhs_bar = _cotangent(forward, g, lhs, rhs, dims, swap=False, precision=precision, kernel=kernel)
    elif is_quantized(lhs) and not is_quantized(rhs):
        rhs_bar = _cotangent(forward, g, rhs, lhs, ((rc, lc), (rb, lb)), swap=True, precision=precision,
                             kernel=kernel)
    return lhs_bar, rhs_bar


_vjp_dot.defvjp(_vjp_fwd, _vjp_bwd)


def qdot(forward: Callable[..., jax.Array], lhs: Any, rhs: Any, *, dims: tuple, precision: Any,
         preferred_element_type: Any, out_sharding: Any, kernel: bool = False) -> jax.Array:
    """``forward(lhs, rhs, ...)`` (the quantized matmul) with the VJP of this module.

    ``kernel``: the product takes the compiled CPU kernel (:mod:`viva_tensor._kernels`), in this layout and so in
    the transposed one: the forward and the backward then call ``forward`` itself, which decodes in cache.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from viva_tensor import quant
        >>> q = quant.quantize(jnp.eye(32), "q8_0")
        >>> jax.grad(lambda x: quant.dot(x, q)[0, 0])(jnp.ones((1, 32)))[0, :2].round(2).tolist()
        [1.0, 0.0]
    """
    return _vjp_dot(forward, lhs, rhs, dims, precision, preferred_element_type, out_sharding, bool(kernel))
