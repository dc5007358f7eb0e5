"""What every quantization format shares: by-name quantization, a quantized matmul, trees, checkpoints.

The format modules (:mod:`viva_tensor.compression`, :mod:`viva_tensor.nf4`, :mod:`viva_tensor.blackwell`)
register their formats in :data:`FORMATS` when imported; this module imports them, so that
``quant.quantize(w, "nf4")`` works without knowing where NF4 lives.

- :func:`quantize` / :func:`dequantize`: any registered format by name.
- :func:`dot_general` / :func:`dot`: a drop-in for ``jax.lax.dot_general`` where an operand may be a
  quantized record. The record is dequantized inside the same XLA computation as the matmul (to the
  other operand's dtype), so XLA fuses the decode with whatever reads it and nothing dequantized is
  kept between calls. It plugs into ``flax.nnx.Linear(..., dot_general=quant.dot_general,
  promote_dtype=quant.promote_dtype)``.
- :func:`quantize_tree` / :func:`dequantize_tree`: the parameters of a model in one call.
- :func:`save` / :func:`load`: safetensors files (never pickle: loading an untrusted file runs no
  code). The tree, each record's format, class and static fields, and a SHA-256 of every tensor live in
  the header's ``__metadata__``; a truncated, foreign or tampered file raises
  :class:`~viva_tensor.errors.CheckpointError`.

Example:
    >>> import jax.numpy as jnp
    >>> from viva_tensor import quant
    >>> w = jnp.linspace(-1.0, 1.0, 64 * 64).reshape(64, 64)
    >>> q = quant.quantize(w, "q8_0")
    >>> round(q.bits_per_value, 2), q.shape
    (8.5, (64, 64))
    >>> x = jnp.ones((2, 64))
    >>> bool(jnp.allclose(quant.dot(x, q), x @ quant.dequantize(q), atol=1e-4))
    True
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import struct
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from viva_tensor import compression, nf4, blackwell, awq  # noqa: F401, I001 - each registers its formats in FORMATS
from viva_tensor._record import FORMATS, FormatSpec, is_quantized
from viva_tensor.errors import CheckpointError, DimensionError, DTypeError, FormatError, ShapeMismatch

__all__ = [
    "FORMATS",
    "is_quantized",
    "format_names",
    "format_spec",
    "quantize",
    "dequantize",
    "dot_general",
    "dot",
    "promote_dtype",
    "default_where",
    "quantize_tree",
    "dequantize_tree",
    "save",
    "load",
]


# ----------------------------------------------------------------------------------------------
# By name
# ----------------------------------------------------------------------------------------------


_ORDER = ("int8", "q4_0", "q4_1", "q8_0", "nf4", "nf4_dq", "nvfp4", "mxfp4", "int4_group", "awq_int4")


def format_names() -> list[str]:
    """The names of the registered formats: the built-in ones in a fixed order, then any others.

    Returns:
        A list of names accepted by :func:`quantize`.

    Example:
        >>> from viva_tensor import quant
        >>> quant.format_names()[:4]
        ['int8', 'q4_0', 'q4_1', 'q8_0']
    """
    return [n for n in _ORDER if n in FORMATS] + [n for n in FORMATS if n not in _ORDER]


def format_spec(fmt: Any) -> FormatSpec:
    """The registered :class:`FormatSpec` of a format name (record class, quantize, dequantize, block size).

    Raises:
        FormatError: ``fmt`` is not a registered format name.

    Example:
        >>> from viva_tensor import quant
        >>> quant.format_spec("nf4").block_size
        64
    """
    if isinstance(fmt, str) and fmt in FORMATS:
        return FORMATS[fmt]
    raise FormatError(
        argument="fmt",
        expected="one of " + ", ".join(repr(n) for n in format_names()),
        got=repr(fmt),
        hint="quant.format_names() lists the registered formats.",
    )


_spec = format_spec


def _option_names(spec: FormatSpec) -> tuple[set[str], bool]:
    params = list(inspect.signature(spec.quantize).parameters.values())[1:]
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def _check_options(spec: FormatSpec, options: dict[str, Any]) -> None:
    names, any_name = _option_names(spec)
    unknown = sorted(set(options) - names)
    if unknown and not any_name:
        raise FormatError(
            argument="options",
            expected=f"options of format '{spec.name}' among ({', '.join(sorted(names)) or 'none'})",
            got=", ".join(unknown),
            hint=f"see the signature of {spec.quantize.__module__}.{spec.quantize.__name__}.",
        )


def quantize(x: jax.Array, fmt: str, **options: Any) -> Any:
    """Quantize ``x`` in the format named ``fmt``.

    Args:
        x: a floating array (float32, bfloat16 or float16) of any shape.
        fmt: a name from :data:`FORMATS`: ``"int8"``, ``"q4_0"``, ``"q4_1"``, ``"q8_0"``, ``"nf4"``,
            ``"nf4_dq"``, ``"nvfp4"``, ``"mxfp4"``.
        **options: keyword options of that format's quantize function (``block_size`` ...).

    Returns:
        The format's quantized record (a pytree), identical to calling the format module directly.

    Raises:
        FormatError: an unknown format name, or an option the format does not take.

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import quant
        >>> q = quant.quantize(jnp.ones((4, 64)), "nf4", block_size=64)
        >>> q.format, q.shape, q.nbytes
        ('nf4', (4, 64), 144)
    """
    spec = _spec(fmt)
    _check_options(spec, options)
    return spec.quantize(x, **options)


def _spec_of(q: Any, argument: str = "q") -> FormatSpec:
    if is_quantized(q):
        spec = FORMATS.get(type(q).format)
        if spec is not None and isinstance(q, spec.record):
            return _spec(spec.name)
        for spec in FORMATS.values():
            if type(q) is spec.record:
                return _spec(spec.name)
    raise FormatError(
        argument=argument,
        expected="a quantized record of a registered format",
        got=type(q).__name__,
        hint="make one with quant.quantize(x, fmt).",
    )


def dequantize(q: Any) -> jax.Array:
    """Decode a quantized record of any registered format to its original shape and dtype.

    Args:
        q: a record returned by :func:`quantize` (or by a format module).

    Returns:
        An array of shape ``q.batch_shape + q.shape`` and dtype ``q.dtype``.

    Raises:
        FormatError: ``q`` is not a record of a registered format.

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import quant
        >>> quant.dequantize(quant.quantize(jnp.full((2, 32), 0.5), "q8_0"))[0, :3].round(3).tolist()
        [0.5, 0.5, 0.5]
    """
    return _spec_of(q).dequantize(q)


# ----------------------------------------------------------------------------------------------
# Quantized matmul
# ----------------------------------------------------------------------------------------------


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
        chunk = _expected_record(_spec_of(rec), dataclasses.replace(rec, shape=(rows, n)))
    except Exception:  # noqa: BLE001 - no plan: the caller decodes the whole record
        return None
    leaves, expected = jax.tree_util.tree_leaves(rec), jax.tree_util.tree_leaves(chunk)
    if len(leaves) != len(expected):
        return None
    sliced, nc = [], k // rows
    for leaf, e in zip(leaves, expected):
        if tuple(leaf.shape) == tuple(e.shape):
            sliced.append(False)
        elif leaf.ndim >= 1 and leaf.shape[0] == nc * e.shape[0] and tuple(leaf.shape[1:]) == tuple(e.shape[1:]):
            sliced.append(True)
        else:
            return None
    return rows, sliced


def _materialized(scales: jax.Array) -> jax.Array:
    """The per-block factors computed once into a buffer: without the barrier XLA fuses their decode
    (a float16 convert, an FP8 table, a nested dequantization) into every value of the block."""
    return jax.lax.optimization_barrier(scales)


def _lookup16(table: np.ndarray, idx: jax.Array) -> jax.Array:
    """``table[idx]`` for a 16-entry float32 table and codes 0..15, as a tree of 15 selects.

    XLA:CPU emits a gather from a constant as scalar loads; selects between constants vectorise.
    A select copies its operand, so the result has the table's exact bits.
    """
    level = [jnp.float32(v) for v in np.asarray(table, np.float32)]
    for bit in (1, 2, 4, 8):
        on = (idx & bit) != 0
        level = [jnp.where(on, level[i + 1], level[i]) for i in range(0, len(level), 2)]
    return level[0]


def _e2m1(idx: jax.Array) -> jax.Array:
    """The E2M1 value of codes 0..15 as float32, built from its bits (equal to ``E2M1_VALUES[idx]``)."""
    i = idx.astype(jnp.uint32)
    m = i & 7  # exponent (2 bits) and mantissa (1 bit): 0, 0.5, 1, 1.5, 2, 3, 4, 6
    # m >= 2 is the normal number 2**((m >> 1) - 1) * (1 + (m & 1) / 2), whose float32 bits are
    # (m + 252) << 22; m == 1 is the subnormal 0.5 (0x3F000000), m == 0 is zero.
    magnitude = jnp.where(m > 1, (m + 252) << 22, m * jnp.uint32(0x3F000000))
    return jax.lax.bitcast_convert_type(magnitude | ((i & 8) << 28), jnp.float32)


def _nibble_planes(rec: Any) -> tuple[jax.Array, jax.Array, str] | None:
    """A 2-D 4-bit record decoded as two column planes, one per nibble, or None for other records.

    Returns ``(a, b, layout)``, float32 ``(rows, n / 2)`` each, with the values of ``dequantize``:
    ``layout == "pairs"``: ``a`` holds the even columns and ``b`` the odd ones; ``"halves"``: ``a``
    holds columns ``32 j .. 32 j + 15`` and ``b`` columns ``32 j + 16 .. 32 j + 31``. Each plane is an
    elementwise function of the packed bytes, so XLA decodes it in one vectorised loop: interleaving
    the two nibbles into the weight's own column order (a concatenate or a stack in the decode) made
    XLA:CPU's loop several times slower. The matmul then runs on each plane and only its small output
    is interleaved (:func:`_merge_planes`).
    """
    if len(rec.shape) != 2 or rec.batch_shape:
        return None
    rows, n = rec.shape
    f32 = jnp.float32
    if isinstance(rec, (compression.Q4_0Tensor, compression.Q4_1Tensor)):
        if n % compression.GGML_BLOCK_SIZE:
            return None
        d = _materialized(rec.d.astype(f32))[:, None]
        lo, hi = (rec.qs & 0x0F).astype(f32), (rec.qs >> 4).astype(f32)
        if isinstance(rec, compression.Q4_0Tensor):
            lo, hi = (lo - 8.0) * d, (hi - 8.0) * d
        else:
            m = _materialized(rec.m.astype(f32))[:, None]
            lo, hi = lo * d + m, hi * d + m
        return lo.reshape(rows, -1), hi.reshape(rows, -1), "halves"
    if isinstance(rec, (nf4.NF4Tensor, nf4.NF4DQTensor)):
        if rec.block_size % 2 or n % rec.block_size:
            return None
        absmax = nf4._dq_absmax(rec) if isinstance(rec, nf4.NF4DQTensor) else rec.absmax
        codes = rec.codes.reshape(-1, rec.block_size // 2)
        scale = _materialized(absmax)[:, None]
        hi = _lookup16(nf4.NF4_LEVELS, codes >> 4) * scale  # the first value is the high nibble
        lo = _lookup16(nf4.NF4_LEVELS, codes & 0x0F) * scale
        return hi.reshape(rows, -1), lo.reshape(rows, -1), "pairs"
    if isinstance(rec, (blackwell.NVFP4Tensor, blackwell.MXFP4Tensor)):
        if rec.block_size % 2 or n % rec.block_size:
            return None
        codes = rec.codes.reshape(*rec.scales.shape, rec.block_size // 2)
        scale = _materialized(blackwell._block_scales(rec))[..., None]
        lo, hi = _e2m1(codes & 0x0F) * scale, _e2m1(codes >> 4) * scale
        return lo.reshape(rows, -1), hi.reshape(rows, -1), "pairs"
    if isinstance(rec, (awq.GroupInt4Tensor, awq.AWQTensor)):
        group = min(rec.group_size, n)
        if group % 2 or n % group:
            return None
        ng = n // group
        codes = rec.codes.reshape(rows, ng, group // 2)
        scale = _materialized(rec.scales.astype(f32))[..., None]
        zero = _materialized(awq._unpack(rec.zeros, ng).astype(f32))[..., None]
        lo = ((codes & 0x0F).astype(f32) - zero) * scale
        hi = ((codes >> 4).astype(f32) - zero) * scale
        lo, hi = lo.reshape(rows, -1), hi.reshape(rows, -1)
        if isinstance(rec, awq.AWQTensor):
            s = rec.act_scale.astype(f32)
            lo, hi = awq._div(lo, s[0::2]), awq._div(hi, s[1::2])
        return lo, hi, "pairs"
    return None


def _merge_planes(a: jax.Array, b: jax.Array, layout: str) -> jax.Array:
    """The columns of two planes (:func:`_nibble_planes`) back in the weight's order."""
    if layout == "pairs":
        return jnp.stack([a, b], axis=-1).reshape(*a.shape[:-1], -1)
    half = compression.GGML_BLOCK_SIZE // 2
    both = [a.reshape(*a.shape[:-1], -1, half), b.reshape(*b.shape[:-1], -1, half)]
    return jnp.concatenate(both, axis=-1).reshape(*a.shape[:-1], -1)


def _chunked_dot(x: jax.Array, rec: Any, rows: int, sliced: list[bool], out_dtype: Any, precision: Any):
    """``x @ decode(rec)`` over row chunks of ``rec``: decode a chunk, multiply, accumulate in float32."""
    spec = _spec_of(rec)
    k, n = rec.shape
    nc = k // rows
    leaves, treedef = jax.tree_util.tree_flatten(rec)
    stacked = [leaf.reshape(nc, -1, *leaf.shape[1:]) if s else None for leaf, s in zip(leaves, sliced)]
    xs = jnp.moveaxis(x.reshape(*x.shape[:-1], nc, rows), -2, 0)
    cdtype = _compute_dtype(rec, x)

    def chunk_of(parts):
        chunk_leaves = [p if s else leaf for p, leaf, s in zip(parts, leaves, sliced)]
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
        a, b, _ = _nibble_planes(chunk_of(parts))
        return (acc[0] + mul(xc, a), acc[1] + mul(xc, b)), None

    # traced once to read the layout (XLA drops this unused decode of the first chunk)
    probe = _nibble_planes(chunk_of([leaf[0] if s else None for leaf, s in zip(stacked, sliced)]))
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
    dims = _canonical_dims(dimension_numbers)
    _check_dims(_logical_shape(lhs), _logical_shape(rhs), dims)
    for name, x in (("lhs", lhs), ("rhs", rhs)):
        if is_quantized(x):
            _spec_of(x, name)
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
        dtype = jnp.result_type(*dtypes) if dtypes else jnp.float32
        if inexact and not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.promote_types(jnp.float32, dtype)
    if inexact and not jnp.issubdtype(dtype, jnp.inexact):
        raise DTypeError(argument="dtype", expected="a floating dtype", got=str(np.dtype(dtype)))
    return tuple(a if a is None or is_quantized(a) else jnp.asarray(a, dtype) for a in args)


# ----------------------------------------------------------------------------------------------
# Trees
# ----------------------------------------------------------------------------------------------


def _block_size(spec: FormatSpec, options: dict[str, Any]) -> int:
    size = options.get("block_size", spec.block_size)
    return int(size) if isinstance(size, (int, np.integer)) and size > 0 else 1


def default_where(path: str, leaf: Any, *, block_size: int = 1) -> bool:
    """The default leaf selection of :func:`quantize_tree`.

    A floating array of rank >= 2 whose last dim holds at least one full block (``block_size``
    values): weight matrices, not biases, norms or scalars.

    Args:
        path: the leaf's path (unused by the default; part of the predicate signature).
        leaf: the leaf.
        block_size: the format's block size.

    Returns:
        Whether the leaf is quantized.

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import quant
        >>> quant.default_where("w", jnp.ones((4, 64)), block_size=32), quant.default_where("b", jnp.ones(64))
        (True, False)
    """
    del path
    return (
        hasattr(leaf, "dtype")
        and hasattr(leaf, "shape")
        and not is_quantized(leaf)
        and jnp.issubdtype(leaf.dtype, jnp.floating)
        and len(leaf.shape) >= 2
        and leaf.shape[-1] >= block_size
    )


def _path_str(path: tuple) -> str:
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def quantize_tree(
    tree: Any, fmt: str, *, where: Callable[[str, Any], bool] | None = None, **options: Any
) -> Any:
    """Quantize the leaves of a pytree that ``where`` selects; leave every other leaf untouched.

    Args:
        tree: a pytree of arrays (a parameter dict, an ``nnx.State`` ...). Records already in it are
            kept as they are.
        fmt: a format name (see :func:`quantize`).
        where: a predicate ``where(path, leaf) -> bool``; ``path`` is the leaf's key path joined by
            dots (``"encoder.layer.0.weight"``). Default: :func:`default_where` with the format's
            block size.
        **options: options of the format.

    Returns:
        A tree of the same structure with records in place of the selected leaves.

    Raises:
        FormatError: an unknown format or option.

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import quant
        >>> t = quant.quantize_tree({"w": jnp.ones((64, 64)), "b": jnp.zeros(64)}, "nf4")
        >>> type(t["w"]).__name__ != "ArrayImpl", t["b"].shape
        (True, (64,))
    """
    spec = _spec(fmt)
    _check_options(spec, options)
    if where is None:
        block = _block_size(spec, options)
        where = functools.partial(default_where, block_size=block)

    def one(path, leaf):
        if is_quantized(leaf) or not where(_path_str(path), leaf):
            return leaf
        return spec.quantize(leaf, **options)

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=is_quantized)


def dequantize_tree(tree: Any) -> Any:
    """Replace every quantized record of a pytree by its dequantized array.

    Args:
        tree: a pytree that may hold records.

    Returns:
        The same tree with arrays (original shapes and dtypes) in place of records.

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import quant
        >>> t = quant.dequantize_tree(quant.quantize_tree({"w": jnp.ones((32, 32))}, "q8_0"))
        >>> t["w"].shape, round(float(t["w"][0, 0]), 3)
        ((32, 32), 1.0)
    """
    return jax.tree_util.tree_map(
        lambda x: dequantize(x) if is_quantized(x) else x, tree, is_leaf=is_quantized
    )


# ----------------------------------------------------------------------------------------------
# Checkpoints (safetensors)
# ----------------------------------------------------------------------------------------------

_META_KEY = "viva_tensor"
_VERSION = 1
# dtypes safetensors' numpy API stores and loads natively; others are stored as raw unsigned bits.
_NATIVE = {
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64", "bfloat16",
}  # fmt: skip
_MAX_HEADER = 100 * 1024 * 1024


def _np_dtype(name: str) -> np.dtype:
    if name in _NATIVE:
        return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
    dt = getattr(ml_dtypes, name, None)
    if dt is None:
        raise CheckpointError(f"unknown dtype {name!r} in the checkpoint's metadata")
    return np.dtype(dt)


def _contiguous(a: np.ndarray) -> np.ndarray:
    return a if a.flags.c_contiguous else a.copy(order="C")  # (np.ascontiguousarray makes 0-d 1-d)


def _to_stored(a: np.ndarray) -> np.ndarray:
    a = _contiguous(np.asarray(a))
    if a.dtype.name in _NATIVE:
        return a
    bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    return a.view(bits)


def _encode_static(v: Any) -> Any:
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    if isinstance(v, (tuple, list)):
        return {"tuple" if isinstance(v, tuple) else "list": [_encode_static(e) for e in v]}
    try:
        return {"dtype": np.dtype(v).name}
    except TypeError:
        raise CheckpointError(
            f"cannot store the static field value {v!r} ({type(v).__name__}) in a checkpoint"
        ) from None


def _decode_static(v: Any, where: str) -> Any:
    if v is None or isinstance(v, (bool, str, int, float)):
        return v
    if isinstance(v, dict) and len(v) == 1:
        (kind, body), = v.items()
        if kind in ("tuple", "list") and isinstance(body, list):
            items = [_decode_static(e, where) for e in body]
            return tuple(items) if kind == "tuple" else items
        if kind == "dtype" and isinstance(body, str):
            return jnp.dtype(_np_dtype(body))
    raise CheckpointError(f"malformed static field {v!r} of the record at '{where}'")


class _Writer:
    def __init__(self):
        self.tensors: dict[str, np.ndarray] = {}
        self.info: dict[str, dict] = {}

    def add(self, name: str, x: Any) -> str:
        if name in self.tensors:
            raise CheckpointError(f"two leaves of the tree map to the tensor name {name!r}")
        a = np.asarray(jax.device_get(x))
        stored = _to_stored(a)
        self.tensors[name] = stored
        self.info[name] = {
            "dtype": a.dtype.name,
            "shape": list(a.shape),
            "sha256": hashlib.sha256(stored.tobytes()).hexdigest(),
        }
        return name


def _encode_node(node: Any, path: str, w: _Writer) -> dict:
    if node is None:
        return {"none": None}
    if is_quantized(node):
        spec = _spec_of(node, path or "tree")
        cls = type(node)
        static, children = {}, {}
        for f in dataclasses.fields(cls):
            v = getattr(node, f.name)
            if f.metadata.get("pytree_node", True) and is_quantized(v):  # a record inside a record
                children[f.name] = _encode_node(v, f"{path}:{f.name}", w)
            elif f.metadata.get("pytree_node", True):
                children[f.name] = None if v is None else w.add(f"{path}:{f.name}", v)
            else:
                static[f.name] = _encode_static(v)
        rec = {"format": spec.name, "class": f"{cls.__module__}.{cls.__qualname__}"}
        return {"record": {**rec, "static": static, "children": children}}
    if isinstance(node, dict) or (hasattr(node, "items") and hasattr(node, "keys") and not hasattr(node, "shape")):
        items = []
        for k, v in node.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise CheckpointError(f"dict keys must be str or int to be saved, got {k!r} at '{path}'")
            items.append([k, _encode_node(v, f"{path}.{k}" if path else str(k), w)])
        return {"dict": items}
    if isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
        kind = "tuple" if isinstance(node, tuple) else "list"
        return {kind: [_encode_node(v, f"{path}.{i}" if path else str(i), w) for i, v in enumerate(node)]}
    if isinstance(node, (bool, int, float, str)):
        return {"scalar": node}
    if isinstance(node, (jax.Array, np.ndarray, np.generic)):
        return {"array": w.add(path or "array", node)}
    raise CheckpointError(
        f"cannot save a leaf of type {type(node).__name__} at '{path}'",
        hint="save arrays, quantized records, Python scalars and None inside dicts, lists and tuples "
        "(for an nnx model, nnx.to_pure_dict(nnx.state(model))).",
    )


def save(path: str | os.PathLike, tree: Any) -> None:
    """Write a tree of arrays and quantized records to a safetensors file.

    Each plain array is stored under its key path (``"encoder.layer.0.bias"``), each buffer of a
    record under ``"<path>:<field>"``, all bit for bit in their own dtype (bfloat16 natively; FP8 and
    FP4 dtypes as their raw bits). The header's ``__metadata__`` holds, as JSON, the tree structure,
    every record's format, class and static fields, and every tensor's dtype, shape and SHA-256.

    Args:
        path: the file to write (overwritten).
        tree: nested dicts (str or int keys), lists and tuples of arrays, quantized records, Python
            scalars and ``None``.

    Raises:
        CheckpointError: a leaf that cannot be saved, two leaves with the same tensor name, or a file
            that cannot be written.

    Example:
        >>> import os, tempfile, jax.numpy as jnp
        >>> from viva_tensor import quant
        >>> f = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> quant.save(f, {"w": quant.quantize(jnp.ones((32, 32)), "q8_0"), "b": jnp.zeros(3)})
        >>> round(float(quant.dequantize(quant.load(f)["w"])[0, 0]), 3)
        1.0
    """
    from safetensors.numpy import save_file

    w = _Writer()
    tree_json = _encode_node(tree, "", w)
    meta = {"version": _VERSION, "tree": tree_json, "tensors": w.info}
    try:
        save_file(w.tensors, os.fspath(path), metadata={_META_KEY: json.dumps(meta, separators=(",", ":"))})
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for I/O failures
        raise CheckpointError(f"cannot write {os.fspath(path)!r}: {e}") from None


def _read_header(path: str) -> dict:
    """The JSON header of a safetensors file, checked against the file's size."""
    if not os.path.exists(path):
        raise CheckpointError(f"no such file: {path!r}")
    if not os.path.isfile(path):
        raise CheckpointError(f"not a file: {path!r}")
    size = os.path.getsize(path)
    not_st = f"{path!r} is not a safetensors file"
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{not_st}: {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{not_st} (or it is truncated): its header claims {n} bytes, the file has {size}"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{not_st}: its header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{not_st}: its header is not a JSON object")
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        offsets = t.get("data_offsets") if isinstance(t, dict) else None
        ok = isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
        if not ok or not isinstance(t.get("dtype"), str) or not isinstance(t.get("shape"), list):
            raise CheckpointError(f"{not_st}: malformed header entry for tensor {name!r}")
        end = max(end, int(t["data_offsets"][1]))
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path!r} is truncated: its tensors need {8 + n + end} bytes, the file has {size}"
        )
    if 8 + n + end < size:
        raise CheckpointError(f"{path!r} has {size - 8 - n - end} unexpected bytes after its last tensor")
    return header


def _load_tensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, ValueError, TypeError, AttributeError, OSError) as e:
        raise CheckpointError(f"cannot read the tensors of {path!r}: {e}") from None


def _check_tensors(path: str, arrays: dict[str, np.ndarray], info: Any, verify: bool) -> dict[str, np.ndarray]:
    if not isinstance(info, dict):
        raise CheckpointError(f"{path!r}: malformed metadata (no tensor table)")
    missing, extra = sorted(set(info) - set(arrays)), sorted(set(arrays) - set(info))
    if missing or extra:
        raise CheckpointError(
            f"{path!r} does not match its metadata: missing tensors {missing[:5]}, unexpected tensors {extra[:5]}"
        )
    out = {}
    for name, meta in info.items():
        if not isinstance(meta, dict) or not {"dtype", "shape", "sha256"} <= set(meta):
            raise CheckpointError(f"{path!r}: malformed metadata for tensor {name!r}")
        stored = arrays[name]
        dt = _np_dtype(meta["dtype"])
        want_stored = dt.name if dt.name in _NATIVE else f"uint{8 * dt.itemsize}"
        if stored.dtype.name != want_stored or list(stored.shape) != list(meta["shape"]):
            raise CheckpointError(
                f"{path!r}: tensor {name!r} is {stored.dtype.name}{list(stored.shape)}, "
                f"its metadata says {meta['dtype']}{list(meta['shape'])}"
            )
        stored = _contiguous(stored)
        if verify and hashlib.sha256(stored.tobytes()).hexdigest() != meta["sha256"]:
            raise CheckpointError(f"{path!r}: the bytes of tensor {name!r} do not match their SHA-256 (corrupted?)")
        out[name] = stored if dt.name in _NATIVE else stored.view(dt)
    return out


def _expected_record(spec: FormatSpec, rec: Any) -> Any:
    """The record that quantizing a tensor of ``rec``'s shape and dtype would give (shapes only)."""
    names, _ = _option_names(spec)
    statics = {
        f.name: getattr(rec, f.name)
        for f in dataclasses.fields(type(rec))
        if not f.metadata.get("pytree_node", True) and f.name in names
    }
    x = jax.ShapeDtypeStruct(tuple(rec.shape), rec.dtype)
    return jax.eval_shape(lambda a: spec.quantize(a, **statics), x)


def _check_record(path: str, where: str, spec: FormatSpec, rec: Any) -> None:
    bad = f"{path!r}: the {spec.name} record at '{where}' is inconsistent"
    try:
        expected = _expected_record(spec, rec)
    except Exception as e:  # noqa: BLE001 - any failure here means the metadata is not a valid record
        raise CheckpointError(f"{bad}: its static fields are not valid for the format ({e})") from None
    got_l, got_t = jax.tree_util.tree_flatten(rec)
    exp_l, exp_t = jax.tree_util.tree_flatten(expected)
    if got_t != exp_t:
        raise CheckpointError(f"{bad}: its fields differ from what the format produces")
    batch = None
    for g, e in zip(got_l, exp_l):
        nb = g.ndim - len(e.shape)
        if nb < 0 or tuple(g.shape[nb:]) != tuple(e.shape) or np.dtype(g.dtype) != np.dtype(e.dtype):
            raise CheckpointError(f"{bad}: a buffer is {g.dtype}{tuple(g.shape)}, expected {e.dtype}{tuple(e.shape)}")
        if batch is None:
            batch = tuple(g.shape[:nb])
        elif tuple(g.shape[:nb]) != batch:
            raise CheckpointError(f"{bad}: its buffers disagree on the batch dims")


def _to_jax(a: np.ndarray) -> Any:
    """A jax.Array, unless JAX would change the dtype (int64/float64 without x64): then NumPy, exact."""
    if jax.dtypes.canonicalize_dtype(a.dtype) != a.dtype:
        return a
    return jnp.asarray(a)


def _decode_node(node: Any, where: str, arrays: dict[str, np.ndarray], path: str, used: set) -> Any:
    def tensor(name: Any) -> jax.Array:
        if not isinstance(name, str) or name not in arrays:
            raise CheckpointError(f"{path!r}: metadata refers to a missing tensor {name!r} at '{where}'")
        used.add(name)
        return _to_jax(arrays[name])

    if not isinstance(node, dict) or len(node) != 1:
        raise CheckpointError(f"{path!r}: malformed tree metadata at '{where}'")
    (kind, body), = node.items()
    sub = lambda k: f"{where}.{k}" if where else str(k)  # noqa: E731
    if kind == "none":
        return None
    if kind == "scalar" and isinstance(body, (bool, int, float, str)):
        return body
    if kind == "array":
        return tensor(body)
    if kind in ("list", "tuple") and isinstance(body, list):
        items = [_decode_node(v, sub(i), arrays, path, used) for i, v in enumerate(body)]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict" and isinstance(body, list):
        out = {}
        for item in body:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], (str, int))):
                raise CheckpointError(f"{path!r}: malformed dict entry in the tree metadata at '{where}'")
            out[item[0]] = _decode_node(item[1], sub(item[0]), arrays, path, used)
        return out
    if kind == "record" and isinstance(body, dict):
        return _decode_record(body, where, arrays, path, tensor)
    raise CheckpointError(f"{path!r}: malformed tree metadata at '{where}' (kind {kind!r})")


def _decode_record(body: dict, where: str, arrays: dict, path: str, tensor: Callable) -> Any:
    fmt = body.get("format")
    if fmt not in FORMATS:
        raise CheckpointError(
            f"{path!r}: the record at '{where}' has format {fmt!r}, not one of {', '.join(format_names())}",
            hint="import the module that registers that format before loading.",
        )
    spec = _spec(fmt)
    cls = spec.record
    if body.get("class") != f"{cls.__module__}.{cls.__qualname__}":
        raise CheckpointError(
            f"{path!r}: the record at '{where}' has class {body.get('class')!r}, format {fmt!r} uses "
            f"{cls.__module__}.{cls.__qualname__}"
        )
    static, children = body.get("static"), body.get("children")
    if not isinstance(static, dict) or not isinstance(children, dict):
        raise CheckpointError(f"{path!r}: malformed record metadata at '{where}'")
    fields = {f.name: f.metadata.get("pytree_node", True) for f in dataclasses.fields(cls) if f.init}
    want_static = {k for k, child in fields.items() if not child}
    if set(static) != want_static or set(children) != set(fields) - want_static:
        raise CheckpointError(f"{path!r}: the record at '{where}' does not have the fields of {cls.__qualname__}")
    kwargs = {k: _decode_static(v, where) for k, v in static.items()}
    for k, v in children.items():
        if isinstance(v, dict) and set(v) == {"record"} and isinstance(v["record"], dict):
            kwargs[k] = _decode_record(v["record"], f"{where}:{k}", arrays, path, tensor)
        else:
            kwargs[k] = None if v is None else tensor(v)
    try:
        rec = cls(**kwargs)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path!r}: cannot rebuild the record at '{where}': {e}") from None
    _check_record(path, where, spec, rec)
    return rec


def load(path: str | os.PathLike, *, verify: bool = True) -> Any:
    """Read a file written by :func:`save` (or any safetensors file) back, bit for bit.

    Nothing in the file is executed: the tree is rebuilt from JSON, records only from formats
    registered in :data:`FORMATS`, and each record is checked against what its format produces for
    its shape. A safetensors file without viva_tensor metadata (a Hugging Face checkpoint) loads as a
    flat dict of arrays.

    Args:
        path: the file.
        verify: check every tensor's SHA-256 against the metadata (detects corrupted bytes).

    Returns:
        The saved tree, with ``jax.Array`` leaves and records (a 64-bit tensor stays a NumPy array
        when JAX runs without x64, rather than being silently narrowed).

    Raises:
        CheckpointError: a missing file, a file that is not safetensors, a truncated file, metadata that
            does not match the tensors, corrupted bytes, an unknown format.

    Example:
        >>> import os, tempfile, jax.numpy as jnp
        >>> from viva_tensor import quant
        >>> f = os.path.join(tempfile.mkdtemp(), "t.safetensors")
        >>> quant.save(f, {"a": [jnp.arange(3), None]})
        >>> quant.load(f)["a"][0].tolist()
        [0, 1, 2]
    """
    path = os.fspath(path)
    header = _read_header(path)
    meta_str = (header.get("__metadata__") or {}).get(_META_KEY) if isinstance(header.get("__metadata__"), dict) else None
    arrays = _load_tensors(path)
    if meta_str is None:
        return {name: _to_jax(arrays[name]) for name in header if name != "__metadata__"}
    try:
        meta = json.loads(meta_str)
    except (TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path!r}: its viva_tensor metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("version") != _VERSION or "tree" not in meta:
        raise CheckpointError(f"{path!r}: unsupported viva_tensor metadata (version {meta.get('version') if isinstance(meta, dict) else None!r})")
    arrays = _check_tensors(path, arrays, meta.get("tensors"), verify)
    used: set = set()
    tree = _decode_node(meta["tree"], "", arrays, path, used)
    if used != set(arrays):
        raise CheckpointError(f"{path!r}: tensors not referenced by the tree: {sorted(set(arrays) - used)[:5]}")
    return tree
