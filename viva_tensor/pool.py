"""Batched and sharded work over many tensors: map, sum, similarity search and top-k.

The Gleam pool ran one BEAM process per tensor. Here a list of same-shaped tensors is a stack (one
array with a leading axis), ``vmap`` maps over it, and with a ``mesh`` the stack is split across
devices along that axis: each device works on the tensors it holds.

Cosine similarity of a zero vector is defined as 0 (no direction, no similarity); NaN or infinite
inputs give NaN scores, which are returned as such (never a silent number).

Example:
    >>> import jax.numpy as jnp
    >>> from viva_tensor import pool
    >>> docs = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> scores, idx = pool.top_k_similar(jnp.array([1.0, 0.1]), docs, 2)
    >>> idx.tolist()
    [0, 2]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from viva_tensor.errors import DimensionError, DTypeError, InvalidShape, ShapeMismatch, ShardingError
from viva_tensor.sharding import place

__all__ = ["stack", "parallel_map", "parallel_sum", "cosine_similarity", "similarity_search", "top_k_similar"]


def _as_array(name: str, x: Any) -> jax.Array:
    """``jnp.asarray(x)``, or a DTypeError naming the argument for what is not an array (None, a str ...)."""
    if isinstance(x, (str, bytes)) or x is None:
        raise DTypeError(argument=name, expected="an array (or nested lists of numbers)", got=type(x).__name__)
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError, OverflowError) as e:
        raise DTypeError(argument=name, expected="an array (or nested lists of numbers)",
                         got=f"{type(x).__name__} ({e})") from None


def stack(tensors: Any) -> jax.Array:
    """Stack a sequence of same-shaped arrays along a new leading axis (an array is returned as is).

    Raises:
        InvalidShape: for an empty sequence.
        ShapeMismatch: when the shapes differ.
        DTypeError: when the dtypes differ, or an element is not an array (None, a string ...).

    Example:
        >>> stack([jnp.zeros(2), jnp.ones(2)]).shape
        (2, 2)
    """
    if isinstance(tensors, (list, tuple)):
        if not tensors:
            raise InvalidShape(argument="tensors", expected="at least one tensor", got="an empty sequence")
        arrays = [_as_array(f"tensors[{i}]", t) for i, t in enumerate(tensors)]
        first = arrays[0].shape
        for i, t in enumerate(arrays):
            if t.shape != first:
                raise ShapeMismatch(argument=f"tensors[{i}]", expected=f"shape {first} (the shape of tensors[0])",
                                    got=t.shape)
        dtypes = {t.dtype for t in arrays}
        if len(dtypes) > 1:
            raise DTypeError(argument="tensors", expected="arrays of one dtype", got=sorted(map(str, dtypes)),
                             hint="cast them to one dtype first.")
        return jnp.stack(arrays)
    x = _as_array("tensors", tensors)
    if x.ndim == 0:
        raise DimensionError(argument="tensors", expected="a stack with a leading axis", got="a scalar")
    return x


def _mesh_axes(mesh: Any, axis: Any) -> tuple[str, ...]:
    if not isinstance(mesh, jax.sharding.Mesh):
        raise ShardingError(argument="mesh", expected="a jax.sharding.Mesh (or None)", got=type(mesh).__name__)
    if axis is None:
        return tuple(mesh.axis_names)
    if not (isinstance(axis, str) or (isinstance(axis, (tuple, list)) and all(isinstance(a, str) for a in axis))):
        raise ShardingError(argument="axis", expected="a mesh axis name or a tuple of them", got=repr(axis))
    axes = (axis,) if isinstance(axis, str) else tuple(axis)
    for a in axes:
        if a not in mesh.axis_names:
            raise ShardingError(argument="axis", expected=f"mesh axes among {tuple(mesh.axis_names)}", got=repr(a))
    return axes


def _pad_to(x: jax.Array, multiple: int) -> jax.Array:
    extra = (-x.shape[0]) % multiple
    if not extra:
        return x
    return jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)])


def parallel_map(tensors: Any, op: Callable[[jax.Array], Any], *, mesh: Any = None, axis: Any = None) -> Any:
    """Apply ``op`` to every tensor of the stack: ``vmap(op)``, split across devices when ``mesh`` is given.

    Args:
        tensors: a stack (array with a leading axis) or a sequence of same-shaped arrays.
        op: a function of one tensor.
        mesh: optional device mesh; the stack is sharded over ``axis`` (padded to a multiple of the
            devices with copies of its last tensor, the padding dropped from the result).
        axis: mesh axis name or tuple of names (default: all of the mesh's axes).

    Returns:
        ``op``'s outputs stacked along a leading axis (sharded along it when ``mesh`` is given).

    Raises:
        InvalidShape, ShapeMismatch: as :func:`stack`.
        ShardingError: for an axis the mesh lacks.

    Example:
        >>> parallel_map([jnp.ones(3), 2 * jnp.ones(3)], jnp.sum).tolist()
        [3.0, 6.0]
    """
    x = stack(tensors)
    if mesh is None:
        return jax.vmap(op)(x)
    axes = _mesh_axes(mesh, axis)
    n = x.shape[0]
    devices = 1
    for a in axes:
        devices *= mesh.shape[a]
    xp = _pad_to(x, devices)
    spec = P(axes if len(axes) > 1 else axes[0])
    xp = jax.device_put(xp, NamedSharding(mesh, spec))
    out = jax.jit(jax.vmap(op), out_shardings=NamedSharding(mesh, spec))(xp)
    if xp.shape[0] == n:
        return out
    # the padding is dropped: the result has n rows, which the devices may not divide, so it is replicated
    return jax.tree.map(lambda y: jax.device_put(y, NamedSharding(mesh, P()))[:n], out)


def parallel_sum(tensors: Any, *, mesh: Any = None, axis: Any = None) -> jax.Array:
    """Element-wise sum of all the tensors of the stack (float32 accumulation, input dtype returned).

    With ``mesh``, each device sums the tensors it holds and the partial sums are added across
    devices.

    Args:
        tensors: a stack or a sequence of same-shaped arrays.
        mesh: optional device mesh (the stack is sharded over ``axis``).
        axis: mesh axis name or tuple of names (default: all).

    Returns:
        One tensor of the stacked tensors' shape.

    Raises:
        InvalidShape, ShapeMismatch: as :func:`stack`.

    Example:
        >>> parallel_sum([jnp.ones(2), jnp.full(2, 2.0)]).tolist()
        [3.0, 3.0]
    """
    x = stack(tensors)
    acc = jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else None

    def total(x):
        return jnp.sum(x, axis=0, dtype=acc).astype(x.dtype)

    if mesh is None:
        return total(x)
    axes = _mesh_axes(mesh, axis)
    devices = 1
    for a in axes:
        devices *= mesh.shape[a]
    extra = (-x.shape[0]) % devices
    if extra:
        x = jnp.concatenate([x, jnp.zeros((extra,) + x.shape[1:], x.dtype)])
    x = jax.device_put(x, NamedSharding(mesh, P(axes if len(axes) > 1 else axes[0])))
    return jax.jit(total)(x)


def _check_qd(query: Any, documents: Any) -> tuple[jax.Array, jax.Array]:
    q, d = _as_array("query", query), _as_array("documents", documents)
    if q.ndim != 1:
        raise DimensionError(argument="query", expected="a vector (1-D)", got=f"shape {q.shape}",
                             hint="vmap over a batch of queries.")
    if d.ndim != 2:
        raise DimensionError(argument="documents", expected="a matrix (n_documents, dim)", got=f"shape {d.shape}")
    if d.shape[1] != q.shape[0]:
        raise ShapeMismatch(argument="documents", expected=f"rows of size {q.shape[0]} (the query's size)",
                            got=f"shape {d.shape}")
    for name, a in (("query", q), ("documents", d)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise DTypeError(argument=name, expected="a floating dtype", got=str(a.dtype))
    return q, d


def _cosine(q: jax.Array, d: jax.Array) -> jax.Array:
    q32, d32 = q.astype(jnp.float32), d.astype(jnp.float32)
    dots = jnp.dot(d32, q32, precision=jax.lax.Precision.HIGHEST)
    norms = jnp.linalg.norm(d32, axis=1) * jnp.linalg.norm(q32)
    zero = norms == 0  # NaN norms are not zero: NaN inputs give NaN scores
    return jnp.where(zero, 0.0, dots / jnp.where(zero, 1.0, norms))


def cosine_similarity(query: jax.Array, documents: jax.Array) -> jax.Array:
    """Cosine similarity of ``query`` with each row of ``documents`` (0 for a zero vector).

    Args:
        query: a vector ``(dim,)``.
        documents: a matrix ``(n_documents, dim)``.

    Returns:
        ``(n_documents,)`` similarities in ``[-1, 1]``, computed in float32, in the documents' dtype.

    Raises:
        DimensionError: for a query that is not 1-D or documents that are not 2-D.
        ShapeMismatch: when the sizes disagree.
        DTypeError: for non-floating inputs.

    Example:
        >>> cosine_similarity(jnp.array([1.0, 0.0]), jnp.array([[2.0, 0.0], [0.0, 3.0], [0.0, 0.0]])).tolist()
        [1.0, 0.0, 0.0]
    """
    q, d = _check_qd(query, documents)
    return _cosine(q, d).astype(d.dtype)


def similarity_search(query: jax.Array, documents: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Every document ranked by cosine similarity to ``query``, most similar first.

    Args:
        query: a vector ``(dim,)``.
        documents: ``(n_documents, dim)``.

    Returns:
        ``(scores, indices)``, both ``(n_documents,)``, sorted by decreasing score (ties: lower index
        first).

    Raises:
        As :func:`cosine_similarity`.

    Example:
        >>> s, i = similarity_search(jnp.array([0.0, 1.0]), jnp.array([[1.0, 0.0], [0.0, 1.0]]))
        >>> i.tolist(), s.tolist()
        ([1, 0], [1.0, 0.0])
    """
    q, d = _check_qd(query, documents)
    s = _cosine(q, d)
    order = jnp.argsort(-s, stable=True)
    return s[order].astype(d.dtype), order.astype(jnp.int32)


def _nan_last(s: jax.Array) -> jax.Array:
    """Ranking keys: a NaN score ranks last, as in :func:`similarity_search` (``lax.top_k`` ranks NaN first)."""
    return jnp.where(jnp.isnan(s), -jnp.inf, s)


def top_k_similar(query: jax.Array, documents: jax.Array, k: int, *, mesh: Any = None,
                  axis: Any = None) -> tuple[jax.Array, jax.Array]:
    """The ``k`` documents most similar to ``query`` (cosine), via ``lax.top_k``.

    With ``mesh``, the documents are sharded by rows over ``axis``: each device scores the documents
    it holds and keeps its own top ``k``; the candidates are then gathered and merged. Only
    ``k`` candidates per device cross the network, never the documents.

    Args:
        query: a vector ``(dim,)``.
        documents: ``(n_documents, dim)`` (already sharded by rows, or placed so by this function).
        k: how many to return, ``1 <= k <= n_documents``.
        mesh: optional device mesh.
        axis: mesh axis name or tuple of names over which the rows are split (default: all).

    Returns:
        ``(scores, indices)`` of shape ``(k,)``, by decreasing score (replicated with ``mesh``); a NaN score
        (a document holding NaN) ranks last, as in :func:`similarity_search`.

    Raises:
        DimensionError: for ``k`` out of range, or wrong ranks.
        ShapeMismatch, DTypeError: as :func:`cosine_similarity`.
        ShardingError: for an axis the mesh lacks.

    Example:
        >>> docs = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
        >>> top_k_similar(jnp.array([1.0, 0.0]), docs, 2)[1].tolist()
        [0, 1]
    """
    q, d = _check_qd(query, documents)
    n = d.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise DimensionError(argument="k", expected=f"an integer in [1, {n}] (the number of documents)", got=repr(k))
    k = int(k)
    if mesh is None:
        s = _cosine(q, d)
        _, i = jax.lax.top_k(_nan_last(s), k)
        return s[i].astype(d.dtype), i.astype(jnp.int32)
    axes = _mesh_axes(mesh, axis)
    devices = 1
    for a in axes:
        devices *= mesh.shape[a]
    name = axes if len(axes) > 1 else axes[0]
    extra = (-n) % devices
    if extra:
        d = jnp.concatenate([d, jnp.zeros((extra, d.shape[1]), d.dtype)])
    local_n = d.shape[0] // devices
    local_k = min(k, local_n)

    def local(q, d):
        s = _cosine(q, d)
        offset = jax.lax.axis_index(name) * local_n
        gidx = offset + jnp.arange(local_n, dtype=jnp.int32)
        s = jnp.where(gidx < n, s, -jnp.inf)  # padding never wins
        lr, li = jax.lax.top_k(_nan_last(s), local_k)
        cs = jax.lax.all_gather(s[li], name, tiled=True)
        cr = jax.lax.all_gather(lr, name, tiled=True)
        ci = jax.lax.all_gather(gidx[li], name, tiled=True)
        _, pos = jax.lax.top_k(cr, k)
        return cs[pos], ci[pos]

    f = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(name, None)), out_specs=(P(), P()), check_vma=False)
    d = place(d, P(name, None), mesh)  # no move when the documents already live there
    q = place(q, P(), mesh)
    s, i = jax.jit(f)(q, d)
    return s.astype(documents.dtype), i
