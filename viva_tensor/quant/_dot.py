"""The quantized matmul: :func:`dot_general`, :func:`dot`, :func:`promote_dtype` (see :mod:`viva_tensor.quant`).

A record is decoded inside the same XLA computation as the matmul. A large 2-D weight on the right of an
``x @ w`` contraction is decoded in row chunks, each consumed while it is in cache; a 4-bit format that
registers a ``planes`` hook is decoded as two nibble planes (no interleave in the decode loop), others
through their ``dequantize``. Nothing here names a format: it asks the format's :class:`FormatSpec`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from viva_tensor._formats import packing
from viva_tensor._formats.registry import Planes, check_record, dequantize, is_quantized, spec_of
from viva_tensor._formats.registry import expected_record as _expected_record
from viva_tensor.errors import DimensionError, DTypeError, FormatError, ShapeMismatch

__all__ = ["dot_general", "dot", "promote_dtype"]


def _logical_shape(x: Any) -> tuple[int, ...]:
    if is_quantized(x):
        return tuple(x.batch_shape) + tuple(x.shape)
    return tuple(np.shape(x))


def _canonical_dims(dimension_numbers: Any) -> tuple:
    try:
        (lc, rc), (lb, rb) = dimension_numbers
        return (tuple(int(d) for d in lc), tuple(int(d) for d in rc)), (
            tuple(int(d) for d in lb),
            tuple(int(d) for d in rb),
        )
    except (TypeError, ValueError):
        raise FormatError(
            argument="dimension_numbers",
            expected="((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))",
            got=repr(dimension_numbers),
        ) from None


def _check_dims(lshape: tuple, rshape: tuple, dims: tuple) -> None:
    (lc, rc), (lb, rb) = dims
    for name, shape, ds in (("lhs", lshape, lc + lb), ("rhs", rshape, rc + rb)):
        for d in ds:
            if not -len(shape) <= d < len(shape):
                raise DimensionError(
                    argument="dimension_numbers",
                    expected=f"{name} dims in [0, {len(shape)}) for {name} shape {shape}",
                    got=d,
                )
    for name, shape, ds in (("lhs", lshape, lc + lb), ("rhs", rshape, rc + rb)):
        canon = [d % len(shape) for d in ds]
        if len(set(canon)) != len(canon):
            raise DimensionError(
                argument="dimension_numbers",
                expected=f"distinct {name} contracting and batch dims",
                got=f"{name} dims {tuple(ds)} (contracting {lc if name == 'lhs' else rc}, "
                f"batch {lb if name == 'lhs' else rb})",
            )
    for kind, ls, rs in (("contracting", lc, rc), ("batch", lb, rb)):
        if len(ls) != len(rs):
            raise ShapeMismatch(
                argument="dimension_numbers",
                expected=f"as many lhs as rhs {kind} dims",
                got=f"{ls} and {rs}",
            )
        left, right = tuple(lshape[d] for d in ls), tuple(rshape[d] for d in rs)
        if left != right:
            raise ShapeMismatch(
                argument="rhs",
                expected=f"{kind} sizes {left} (those of lhs dims {ls})",
                got=f"{right} (rhs dims {rs})",
            )


def _operand_dtype(x: Any) -> np.dtype:
    return np.dtype(x.dtype) if is_quantized(x) else jnp.result_type(x)


def _compute_dtype(this: Any, other: Any) -> np.dtype:
    """The dtype a record is decoded to: the other operand's floating dtype, else its own."""
    other_dtype = _operand_dtype(other)
    if jnp.issubdtype(other_dtype, jnp.floating):
        return other_dtype
    return np.dtype(this.dtype)


def _decode(x: Any, other: Any) -> jax.Array:
    if not is_quantized(x):
        return jnp.asarray(x)
    return dequantize(x).astype(_compute_dtype(x, other))


# The decoded weight is produced and consumed in chunks of about this many values (2 MiB of float32,
# an L2 cache), so the matmul reads it from cache instead of a full-size dequantized copy in memory.
_CHUNK_VALUES = 1 << 19
# Chunks hold a multiple of this many values, so that every block (16, 32, 64 values; NF4 double
# quantization's 64 x 256) starts at the same place in a chunk as in the whole tensor.
_CHUNK_ALIGN = 1 << 16


def _chunk_plan(rec: Any) -> tuple[int, list[bool]] | None:
    """Rows per chunk of a 2-D record, and which leaves are sliced by rows (others are shared)."""
    if len(rec.shape) != 2 or rec.batch_shape:
        return None
    k, n = rec.shape
    align = _CHUNK_ALIGN
    for f in dataclasses.fields(rec):
        v = getattr(rec, f.name)
        if not f.metadata.get("pytree_node", True) and isinstance(v, int) and not isinstance(v, bool) and v > 1:
            align = math.lcm(align, v)
    step = align // math.gcd(align, n)
    target = max(step, _CHUNK_VALUES // max(n, 1))
    rows = next((r for r in range(step * -(-target // step), k // 2 + 1, step) if k % r == 0), None)
    if rows is None:
        return None
    try:
        chunk = _expected_record(spec_of(rec), dataclasses.replace(rec, shape=(rows, n)))
    except Exception:  # noqa: BLE001 - no plan: the caller decodes the whole record
        return None
    leaves, expected = jax.tree_util.tree_leaves(rec), jax.tree_util.tree_leaves(chunk)
    if len(leaves) != len(expected):
        return None
    sliced, nc = [], k // rows
    for leaf, e in zip(leaves, expected, strict=True):
        if tuple(leaf.shape) == tuple(e.shape):
            sliced.append(False)
        elif leaf.ndim >= 1 and leaf.shape[0] == nc * e.shape[0] and tuple(leaf.shape[1:]) == tuple(e.shape[1:]):
            sliced.append(True)
        else:
            return None
    return rows, sliced


def _planes(rec: Any) -> Planes | None:
    """The format's decode planes of a 2-D record made outside vmap, or None (then: dequantize)."""
    if len(rec.shape) != 2 or rec.batch_shape:
        return None
    hook = spec_of(rec).planes
    return None if hook is None else hook(rec)


def _merge_planes(a: jax.Array, b: jax.Array, layout: str) -> jax.Array:
    """The columns of two planes (:class:`~viva_tensor._formats.registry.Planes`) back in the weight's order."""
    if layout == "pairs":
        return jnp.stack([a, b], axis=-1).reshape(*a.shape[:-1], -1)
    half = packing.HALF
    both = [a.reshape(*a.shape[:-1], -1, half), b.reshape(*b.shape[:-1], -1, half)]
    return jnp.concatenate(both, axis=-1).reshape(*a.shape[:-1], -1)


def _chunked_dot(x: jax.Array, rec: Any, rows: int, sliced: list[bool], out_dtype: Any, precision: Any):
    """``x @ decode(rec)`` over row chunks of ``rec``: decode a chunk, multiply, accumulate in float32."""
    spec = spec_of(rec)
    k, n = rec.shape
    nc = k // rows
    leaves, treedef = jax.tree_util.tree_flatten(rec)
    stacked = [leaf.reshape(nc, -1, *leaf.shape[1:]) if s else None for leaf, s in zip(leaves, sliced, strict=True)]
    xs = jnp.moveaxis(x.reshape(*x.shape[:-1], nc, rows), -2, 0)
    cdtype = _compute_dtype(rec, x)

    def chunk_of(parts):
        chunk_leaves = [p if s else leaf for p, leaf, s in zip(parts, leaves, sliced, strict=True)]
        return dataclasses.replace(jax.tree_util.tree_unflatten(treedef, chunk_leaves), shape=(rows, n))

    def mul(xc, w):
        return jax.lax.dot_general(
            xc.astype(cdtype), w.astype(rec.dtype).astype(cdtype), (((xc.ndim - 1,), (0,)), ((), ())),
            precision=precision, preferred_element_type=jnp.float32,
        )  # fmt: skip

    def body(acc, inputs):
        xc, parts = inputs
        return acc + mul(xc, spec.dequantize(chunk_of(parts))), None

    def planes_body(acc, inputs):
        xc, parts = inputs
        a, b, _ = _planes(chunk_of(parts))
        return (acc[0] + mul(xc, a), acc[1] + mul(xc, b)), None

    # traced once to read the layout (XLA drops this unused decode of the first chunk)
    probe = _planes(chunk_of([leaf[0] if s else None for leaf, s in zip(stacked, sliced, strict=True)]))
    if probe is not None:
        zero = jnp.zeros((*x.shape[:-1], n // 2), jnp.float32)
        (a, b), _ = jax.lax.scan(planes_body, (zero, zero), (xs, stacked))
        return _merge_planes(a, b, probe[2]).astype(out_dtype)

    acc = jnp.zeros((*x.shape[:-1], n), jnp.float32)
    acc, _ = jax.lax.scan(body, acc, (xs, stacked))
    return acc.astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("dims", "precision", "preferred_element_type", "out_sharding"))
def _qdot(lhs, rhs, *, dims, precision, preferred_element_type, out_sharding):
    # One XLA computation: the decode runs next to the matmul, and the decoded weight is a temporary
    # of this call only (under an outer jit this inlines). A large 2-D weight on the right of an
    # ``x @ w`` contraction is decoded chunk by chunk, each chunk consumed while it is in cache.
    (lc, rc), (lb, rb) = dims
    if (
        is_quantized(rhs)
        and not is_quantized(lhs)
        and out_sharding is None
        and rc == (0,)
        and lc == (jnp.ndim(lhs) - 1,)
        and not lb
        and math.prod(rhs.shape) >= 4 * _CHUNK_VALUES
    ):
        plan = _chunk_plan(rhs)
        if plan is not None:
            a = jnp.asarray(lhs)
            out_dtype = preferred_element_type or jnp.result_type(a.dtype, _compute_dtype(rhs, a))
            return _chunked_dot(a, rhs, *plan, out_dtype=out_dtype, precision=precision)
    a, b = _decode(lhs, rhs), _decode(rhs, lhs)
    return jax.lax.dot_general(
        a, b, dims, precision=precision, preferred_element_type=preferred_element_type, out_sharding=out_sharding
    )


def dot_general(
    lhs: Any,
    rhs: Any,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
) -> jax.Array:
    """``jax.lax.dot_general`` where either operand may be a quantized record.

    A record is decoded to the other operand's floating dtype (its own dtype when the other is not
    floating) inside the same jitted computation as the matmul, so the decode fuses with the matmul's
    operand and no dequantized copy outlives the call. With two plain arrays this is exactly
    ``jax.lax.dot_general``.

    Args:
        lhs: an array or a quantized record.
        rhs: an array or a quantized record.
        dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))``, as in
            ``jax.lax.dot_general``, over the records' logical shapes.
        precision: as in ``jax.lax.dot_general``.
        preferred_element_type: as in ``jax.lax.dot_general``.
        out_sharding: as in ``jax.lax.dot_general``.

    Returns:
        The product, of the dtype ``jax.lax.dot_general`` gives for the decoded operands.

    Raises:
        DimensionError: a dimension number out of range.
        ShapeMismatch: contracting or batch sizes that differ.
        FormatError: malformed ``dimension_numbers`` or a record of an unregistered format.

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import quant
        >>> q = quant.quantize(jnp.eye(32), "q8_0")
        >>> x = jnp.arange(64.0).reshape(2, 32)
        >>> quant.dot_general(x, q, (((1,), (0,)), ((), ())))[:, :3].round(1).tolist()
        [[0.0, 1.0, 2.0], [32.0, 33.0, 34.0]]
    """
    if not (is_quantized(lhs) or is_quantized(rhs)):
        return jax.lax.dot_general(
            lhs,
            rhs,
            dimension_numbers,
            precision=precision,
            preferred_element_type=preferred_element_type,
            out_sharding=out_sharding,
        )
    for name, x in (("lhs", lhs), ("rhs", rhs)):
        if is_quantized(x):
            check_record(x, name)
    dims = _canonical_dims(dimension_numbers)
    _check_dims(_logical_shape(lhs), _logical_shape(rhs), dims)
    if preferred_element_type is not None:
        preferred_element_type = np.dtype(preferred_element_type)
    if isinstance(precision, list):
        precision = tuple(precision)
    return _qdot(
        lhs,
        rhs,
        dims=dims,
        precision=precision,
        preferred_element_type=preferred_element_type,
        out_sharding=out_sharding,
    )


def dot(x: jax.Array, w: Any, *, precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
    """``x @ w`` for a (possibly quantized) weight ``w`` of shape ``(K, ...)``.

    Contracts the last dim of ``x`` with the first dim of ``w`` (``jnp.tensordot(x, w, 1)``).

    Args:
        x: an array of shape ``(..., K)``.
        w: an array or a quantized record of logical shape ``(K, N, ...)``.
        precision: as in ``jax.lax.dot_general``.
        preferred_element_type: as in ``jax.lax.dot_general``.

    Returns:
        An array of shape ``x.shape[:-1] + w.shape[1:]``.

    Raises:
        ShapeMismatch: ``x.shape[-1] != w.shape[0]``.
        DimensionError: ``x`` or ``w`` has rank 0.

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import quant
        >>> quant.dot(jnp.ones((1, 32)), quant.quantize(jnp.ones((32, 2)), "int8")).tolist()
        [[32.0, 32.0]]
    """
    xs, ws = _logical_shape(x), _logical_shape(w)
    if not xs or not ws:
        raise DimensionError(argument="x" if not xs else "w", expected="rank >= 1", got="rank 0")
    dims = (((len(xs) - 1,), (0,)), ((), ()))
    return dot_general(x, w, dims, precision=precision, preferred_element_type=preferred_element_type)


def promote_dtype(args: Sequence[Any], /, *, dtype: Any = None, inexact: bool = True) -> tuple:
    """Flax NNX's ``promote_dtype`` that lets quantized records through undecoded.

    Pass it with :func:`dot_general` to ``flax.nnx.Linear`` (or ``Einsum``, ``Conv``) holding a
    quantized kernel: arrays are cast to the common dtype, records stay records (their dtype takes
    part in the promotion), and :func:`dot_general` decodes them next to the matmul.

    Args:
        args: arrays, records or ``None``.
        dtype: a dtype to cast the arrays to (skips inference), as in Flax.
        inexact: require a floating result dtype, as in Flax.

    Returns:
        A tuple like ``args``, arrays cast, records and ``None`` untouched.

    Raises:
        DTypeError: ``inexact`` and ``dtype`` is not floating.

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import quant
        >>> x, q, b = quant.promote_dtype((jnp.ones(2, jnp.bfloat16), quant.quantize(jnp.ones((2, 32)), "q8_0"), None))
        >>> str(x.dtype), type(q).__name__ == type(quant.quantize(jnp.ones((2, 32)), "q8_0")).__name__, b
        ('float32', True, None)
    """
    if dtype is None:
        dtypes = [_operand_dtype(a) for a in args if a is not None]
        with jax.numpy_dtype_promotion("standard"):  # promoting is this function's job, also under "strict"
            dtype = jnp.result_type(*dtypes) if dtypes else jnp.float32
            if inexact and not jnp.issubdtype(dtype, jnp.inexact):
                dtype = jnp.promote_types(jnp.float32, dtype)
    if inexact and not jnp.issubdtype(dtype, jnp.inexact):
        raise DTypeError(argument="dtype", expected="a floating dtype", got=str(np.dtype(dtype)))
    return tuple(a if a is None or is_quantized(a) else jnp.asarray(a, dtype) for a in args)
