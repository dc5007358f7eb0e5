"""The quantized matmul: :func:`dot_general`, :func:`dot`, :func:`promote_dtype` (see :mod:`viva_tensor.quant`).

A record is decoded inside the same XLA computation as the matmul; nothing here names a format: it asks the
format's :class:`FormatSpec` and :func:`viva_tensor._kernels.planes.kernel_args`.

Paths. A floating array times a 2-D record on one axis each, no batch dims (any dimension numbers of that kind:
the record on either side, contracting its blocked last axis, "nk", ``x @ w.T`` as checkpoints store ``(out, in)``,
or its first axis, "kn", ``x @ w``; the array's other axes fold into the batch B; a record on the left is computed
as the transposed product and only the *output* is transposed):

======================================  ==========================================================================
where                                   path
======================================  ==========================================================================
CPU, kernel library loaded, small B     ``vt_qmatmul``: the fused AVX-512 kernel decodes each 32-value group in
                                        registers (every format of ``planes.kernel_args``, both layouts)
CPU, kernel library, B >= 16 ("nk")     ``vt_qmatmul``'s blocked GEMM: each group decoded once per call into the
or B >= 32 ("kn")                       block its FMA tiles read from L1 (``_kernels.gemm_batch``)
CPU, portable library, B >= 32          ``vt_decode`` panels of at most 8 MiB (1/8 of a smaller weight) of float32,
                                        each contracted by XLA's own GEMM (``_kernels.PANEL_BATCH``)
``activation_quant="int8"``            int8 / q8_0 weight contracted on its blocked axis: ``vt_qmatmul_i8`` (VNNI
                                        int32 sums; pure JAX: an int8 ``lax.dot_general`` per block); any other: the
                                        rounded activations through the rows above
GPU / TPU / no library / no planes      pure JAX: a weight of >= 2 Mi values is decoded in row chunks of ~2 MiB of
                                        float32 inside a ``lax.scan`` (for "kn" each chunk adds to y; for "nk"
                                        each chunk gives its columns of y); a smaller one is decoded whole
anything else (batch dims, two records) pure JAX: dequantize, then ``lax.dot_general``
======================================  ==========================================================================

No path materialises a transposed or dense float32 copy of a large weight (the tests assert it on the compiled
program). The kernel decodes in float32 and sums in float32 (in another order than XLA: results agree within
float32 summation rounding, not bit for bit); the pure-JAX path decodes to the activations' dtype, as before.
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

from viva_tensor import _kernels
from viva_tensor._formats import packing
from viva_tensor._formats.registry import Planes, check_record, dequantize, is_quantized, spec_of
from viva_tensor._formats.registry import expected_record as _expected_record
from viva_tensor._kernels import planes
from viva_tensor.errors import ConfigError, DimensionError, DTypeError, FormatError, ShapeMismatch
from viva_tensor.quant import _grad

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
    """``x @ decode(rec)`` over row chunks of ``rec`` (:func:`~viva_tensor.quant._grad.row_chunks`): decode a chunk
    (its two planes when the format has them, else its ``dequantize``), multiply, accumulate in float32."""
    plan = (rows, sliced)
    stacked, chunk_of = _grad.row_chunks(rec, plan)
    # traced once to read the layout (XLA drops this unused decode of the first chunk)
    probe = _planes(chunk_of([leaf[0] if s else None for leaf, s in zip(stacked, sliced, strict=True)]))
    if probe is None:
        return _grad.chunked_dot(x, rec, x.ndim - 1, 0, precision=precision, out_dtype=out_dtype, plan=plan)
    n = rec.shape[1]
    xs = jnp.moveaxis(x.reshape(*x.shape[:-1], rec.shape[0] // rows, rows), -2, 0)
    cdtype = _compute_dtype(rec, x)

    def mul(xc, w):
        return jax.lax.dot_general(
            xc.astype(cdtype), w.astype(rec.dtype).astype(cdtype), (((xc.ndim - 1,), (0,)), ((), ())),
            precision=precision, preferred_element_type=jnp.float32,
        )  # fmt: skip

    def planes_body(acc, inputs):
        xc, parts = inputs
        a, b, _ = _planes(chunk_of(parts))
        return (acc[0] + mul(xc, a), acc[1] + mul(xc, b)), None

    zero = jnp.zeros((*x.shape[:-1], n // 2), jnp.float32)
    (a, b), _ = jax.lax.scan(planes_body, (zero, zero), (xs, stacked))
    return _merge_planes(a, b, probe[2]).astype(out_dtype)


def _matmul_form(lhs: Any, rhs: Any, dims: tuple) -> tuple | None:
    """``(x, record, weight_layout, record_on_lhs)`` when the product is a floating array times a 2-D record, one
    contracted axis each and no batch dims; ``x`` has its contracted axis moved last. Else None."""
    (lc, rc), (lb, rb) = dims
    if lb or rb or is_quantized(lhs) == is_quantized(rhs) or len(lc) != 1:
        return None
    on_lhs = is_quantized(lhs)
    rec, x, rcon, xcon = (lhs, rhs, lc, rc) if on_lhs else (rhs, lhs, rc, lc)
    if len(rec.shape) != 2 or rec.batch_shape:
        return None
    x = jnp.asarray(x)
    if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
        return None
    x = jnp.moveaxis(x, xcon[0] % x.ndim, -1)
    return x, rec, "nk" if rcon[0] % 2 == 1 else "kn", on_lhs


def _kernel_enabled() -> bool:
    """The compiled CPU kernel applies: it is loaded and the computation is for the CPU."""
    return jax.default_backend() == "cpu" and _kernels.available()


def _kernel_takes(lhs: Any, rhs: Any, dims: tuple) -> bool:
    """The product goes to the compiled kernel (a 2-D record times an array on one axis each); then so does its
    transpose, since the kernel reads both layouts."""
    form = _matmul_form(lhs, rhs, dims)
    if form is None or not _kernel_enabled():
        return False
    args = planes.kernel_args(form[1])
    return args is not None and _kernels._kernel_fits(form[1].shape[-1], args["block_size"], args["layout"])


def _fast_matmul(x: jax.Array, rec: Any, layout: str, out_dtype: Any, precision: Any) -> jax.Array | None:
    """``x`` times a 2-D record on one axis without a dense or transposed weight: the compiled kernel, else the
    pure-JAX chunked decode for a large weight; None when neither applies (the caller decodes the whole record)."""
    if _kernel_enabled():
        y = planes.matmul(x.astype(jnp.float32), rec, weight_layout=layout)
        if y is not None:
            return y.astype(out_dtype)
    if math.prod(rec.shape) < 4 * _CHUNK_VALUES:
        return None
    plan = _chunk_plan(rec)
    if plan is None:
        return None
    if layout == "kn":
        return _chunked_dot(x, rec, *plan, out_dtype=out_dtype, precision=precision)
    # the record's rows are y's columns: each chunk gives its columns of y (never a transposed or dense weight)
    return _grad.chunked_dot(x, rec, x.ndim - 1, 1, precision=precision, out_dtype=out_dtype, plan=plan)


ACTIVATION_QUANT = (None, "int8")


def _poison(x2: jax.Array) -> jax.Array:
    """0 per row of ``x2``, NaN where the row holds a NaN or an infinity (rounded activations would hide it)."""
    return jnp.sum(x2 * jnp.float32(0.0), axis=-1, keepdims=True)


def _w8a8(x: jax.Array, rec: Any, layout: str, out_dtype: Any, precision: Any) -> jax.Array:
    """``activation_quant="int8"``: activations in int8 per row (per token), then int32 sums against an int8 weight
    contracted on its blocked axis (kernel ``vt_qmatmul_i8`` on CPU, an int8 ``lax.dot_general`` elsewhere); any
    other weight takes the same rounded activations through the weight-only path."""
    args = planes.kernel_args(rec)
    xf = x.astype(jnp.float32)
    lead, k = xf.shape[:-1], xf.shape[-1]
    if (args is not None and args["layout"] == "int8" and layout == "nk" and args["block_size"] % 32 == 0
            and args["x_div"] is None):
        if args["x_mul"] is not None:  # a scale per input column multiplies the activations
            xf = xf * args["x_mul"].reshape((1,) * len(lead) + (k,))
        x2 = xf.reshape(-1, k)
        xq, xs = _kernels.quantize_rows(x2)
        fn = _kernels.qmatmul_int8 if _kernel_enabled() else _kernels.qmatmul_int8_reference
        y = fn(xq, xs, args["codes"], args["scales"], block_size=args["block_size"]) + _poison(x2)
        return y.reshape(*lead, -1).astype(out_dtype)
    x2 = xf.reshape(-1, k)
    xq, xs = _kernels.quantize_rows(x2)
    xd = (xq.astype(jnp.float32) * xs + _poison(x2)).reshape(xf.shape)
    y = _fast_matmul(xd, rec, layout, out_dtype, precision)
    if y is None:
        w = _decode(rec, xd)
        y = jax.lax.dot_general(xd, w, (((xd.ndim - 1,), (1 if layout == "nk" else 0,)), ((), ())),
                                precision=precision, preferred_element_type=jnp.float32).astype(out_dtype)
    return y


def _round_activations(x: Any, contracting: tuple) -> Any:
    """The generic path's ``activation_quant="int8"``: a plain floating operand rounded per vector along its
    contracted axes (the rest of the product is the weight-only one)."""
    if is_quantized(x) or not jnp.issubdtype(jnp.result_type(x), jnp.floating) or not contracting:
        return x
    a = jnp.asarray(x)
    con = [d % a.ndim for d in contracting]
    free = [d for d in range(a.ndim) if d not in con]
    moved = jnp.transpose(a, free + con)
    x2 = moved.reshape(-1, math.prod(moved.shape[len(free):])).astype(jnp.float32)
    xq, xs = _kernels.quantize_rows(x2)
    xd = (xq.astype(jnp.float32) * xs + _poison(x2)).reshape(moved.shape)
    return jnp.transpose(xd, np.argsort(free + con)).astype(a.dtype)


@functools.partial(jax.jit, static_argnames=("dims", "precision", "preferred_element_type", "out_sharding",
                                             "activation_quant"))
def _qdot(lhs, rhs, *, dims, precision, preferred_element_type, out_sharding, activation_quant=None):
    # One XLA computation: the decode runs next to the matmul, and the decoded weight is a temporary
    # of this call only (under an outer jit this inlines). A 2-D record times an array on one axis each (either
    # side, either axis of the record) goes to _fast_matmul: the compiled kernel on CPU, else a chunked decode.
    form = _matmul_form(lhs, rhs, dims) if out_sharding is None else None
    if form is not None:
        x, rec, layout, on_lhs = form
        out_dtype = preferred_element_type or jnp.result_type(x.dtype, _compute_dtype(rec, x))
        if activation_quant == "int8":
            y = _w8a8(x, rec, layout, out_dtype, precision)
        else:
            y = _fast_matmul(x, rec, layout, out_dtype, precision)
        if y is not None:
            return jnp.moveaxis(y, -1, 0) if on_lhs else y
    if activation_quant == "int8":
        (lc, rc), _ = dims
        lhs, rhs = _round_activations(lhs, lc), _round_activations(rhs, rc)
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
    *,
    activation_quant: str | None = None,
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
        activation_quant: ``None`` (weight-only quantization) or ``"int8"``: dynamic-range W8A8. The plain
            operand is quantized at run time per token (per vector along its contracted axis: absmax int8, a
            float32 scale each, :func:`viva_tensor._kernels.quantize_rows`). Against an int8 weight (``int8``
            with a scale per row, block or tensor, or per input column; ``q8_0``) contracted on its blocked
            axis the products are summed in int32 per block (AVX-512 VNNI on CPU), then scaled; any other
            weight or contraction takes the same rounded activations through the weight-only path. It changes
            the numerics (``benchmarks/quantization.py`` reports the error next to weight-only's) and has no
            gradient.

    Returns:
        The product, of the dtype ``jax.lax.dot_general`` gives for the decoded operands.

    Raises:
        DimensionError: a dimension number out of range.
        ShapeMismatch: contracting or batch sizes that differ.
        FormatError: malformed ``dimension_numbers`` or a record of an unregistered format.
        ConfigError: an ``activation_quant`` other than None and ``"int8"``.

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import quant
        >>> q = quant.quantize(jnp.eye(32), "q8_0")
        >>> x = jnp.arange(64.0).reshape(2, 32)
        >>> quant.dot_general(x, q, (((1,), (0,)), ((), ())))[:, :3].round(1).tolist()
        [[0.0, 1.0, 2.0], [32.0, 33.0, 34.0]]
        >>> w8a8 = quant.dot_general(x, q, (((1,), (1,)), ((), ())), activation_quant="int8")  # x @ w.T, int8 x
        >>> w8a8[1, :3].tolist()  # 32 is 65 steps of 63 / 127; q8_0 stores 1 as 127 * fp16(1 / 127)
        [32.24212646484375, 33.23419189453125, 34.22625732421875]
    """
    if activation_quant not in ACTIVATION_QUANT:
        raise ConfigError(argument="activation_quant", expected="None or 'int8'", got=activation_quant)
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
    if activation_quant is not None:  # W8A8 rounds the activations: no custom VJP (see ACTIVATION_QUANT)
        return _qdot(lhs, rhs, dims=dims, precision=precision, preferred_element_type=preferred_element_type,
                     out_sharding=out_sharding, activation_quant=activation_quant)
    return _grad.qdot(  # the VJP (quant/_grad.py) wraps _qdot
        _qdot,
        lhs,
        rhs,
        dims=dims,
        precision=precision,
        preferred_element_type=preferred_element_type,
        out_sharding=out_sharding,
        kernel=out_sharding is None and _kernel_takes(lhs, rhs, dims),
    )


def dot(x: jax.Array, w: Any, *, precision: Any = None, preferred_element_type: Any = None,
        activation_quant: str | None = None) -> jax.Array:
    """``x @ w`` for a (possibly quantized) weight ``w`` of shape ``(K, ...)``.

    Contracts the last dim of ``x`` with the first dim of ``w`` (``jnp.tensordot(x, w, 1)``).

    Args:
        x: an array of shape ``(..., K)``.
        w: an array or a quantized record of logical shape ``(K, N, ...)``.
        precision: as in ``jax.lax.dot_general``.
        preferred_element_type: as in ``jax.lax.dot_general``.
        activation_quant: ``None`` or ``"int8"`` (dynamic per-token W8A8, see :func:`dot_general`).

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
    return dot_general(x, w, dims, precision=precision, preferred_element_type=preferred_element_type,
                       activation_quant=activation_quant)


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
