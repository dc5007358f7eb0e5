"""The format registry (private): :class:`FormatSpec`, :data:`FORMATS`, by-name quantize and dequantize.

Format modules register themselves here when imported (:func:`register_format`), so that
:mod:`viva_tensor.quant` (the public face of this module) and :mod:`viva_tensor.sparsity` can quantize
and dequantize by name without knowing each module. A format may register a ``planes`` hook that gives
:func:`viva_tensor.quant.dot_general` its 4-bit decode planes (see :mod:`viva_tensor._formats.packing`).

Example:
    >>> import jax.numpy as jnp
    >>> from viva_tensor import quant
    >>> q = quantize(jnp.full((2, 32), 0.5), "q8_0")
    >>> spec_of(q).name, format_spec("q8_0").block_size, dequantize(q)[0, :2].round(3).tolist()
    ('q8_0', 32, [0.5, 0.5])
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.nnx as nnx
import jax

from viva_tensor._formats.record import QuantizedArray
from viva_tensor.errors import FormatError

__all__ = [
    "FormatSpec",
    "Planes",
    "FORMATS",
    "register_format",
    "is_quantized",
    "format_names",
    "format_spec",
    "spec_of",
    "check_options",
    "option_names",
    "quantize",
    "dequantize",
    "expected_record",
    "check_record",
]


class Planes(NamedTuple):
    """A 2-D 4-bit record decoded as two float32 column planes ``(rows, n / 2)``, one per nibble.

    ``layout == "pairs"``: ``a`` holds the even columns and ``b`` the odd ones; ``"halves"`` (GGML):
    ``a`` holds columns ``32 j .. 32 j + 15`` and ``b`` columns ``32 j + 16 .. 32 j + 31``. The values
    are those of the format's ``dequantize``, bit for bit, in float32.
    """

    a: jax.Array
    b: jax.Array
    layout: str


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """A registered format: its name, record class, quantize and dequantize functions, block size.

    ``planes`` (optional) maps a 2-D record made outside vmap to :class:`Planes`, or to ``None`` when
    that record cannot be decoded by planes (then :mod:`viva_tensor.quant` falls back to dequantize).
    ``row_multiple``: the last dim a tensor must be a multiple of (the GGML K-quants' super-block of 256;
    1 for the formats that pad their last block).
    """

    name: str
    record: type
    quantize: Callable[..., Any]
    dequantize: Callable[[Any], jax.Array]
    block_size: int
    description: str
    planes: Callable[[Any], Planes | None] | None = None
    row_multiple: int = 1


FORMATS: dict[str, FormatSpec] = {}

# The built-in formats, in the order format_names() lists them (any others follow in registration order).
_ORDER = (
    "int8", "q4_0", "q4_1", "q8_0", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k",
    "nf4", "nf4_dq", "nvfp4", "mxfp4", "int4_group", "awq_int4",
)


def register_format(
    name: str,
    *,
    record: type,
    quantize: Callable[..., Any],
    dequantize: Callable[[Any], jax.Array],
    block_size: int,
    description: str,
    planes: Callable[[Any], Planes | None] | None = None,
    row_multiple: int = 1,
) -> None:
    """Register a format under ``name`` (called by each format module at import; idempotent).

    The record class is best declared with :func:`viva_tensor._formats.record.record`; it is (also)
    registered with ``flax.nnx.register_data_type`` here, so that NNX modules hold its instances as data.
    """
    nnx.register_data_type(record)
    FORMATS[name] = FormatSpec(name, record, quantize, dequantize, block_size, description, planes, row_multiple)


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a quantized record of any registered format.

    Example:
        >>> import jax.numpy as jnp
        >>> is_quantized(quantize(jnp.ones(32), "q8_0")), is_quantized(jnp.ones(32))
        (True, False)
    """
    return isinstance(x, QuantizedArray)


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


def spec_of(q: Any, argument: str = "q") -> FormatSpec:
    """The :class:`FormatSpec` of a record (by its format name), or :class:`FormatError`."""
    if is_quantized(q):
        spec = FORMATS.get(type(q).format)
        if spec is not None and isinstance(q, spec.record):
            return spec
        for spec in FORMATS.values():
            if type(q) is spec.record:
                return spec
    raise FormatError(
        argument=argument,
        expected="a quantized record of a registered format",
        got=type(q).__name__,
        hint="make one with quant.quantize(x, fmt).",
    )


def option_names(spec: FormatSpec) -> tuple[set[str], bool]:
    """The keyword options of a format's quantize, and whether it takes any keyword (``**options``)."""
    params = list(inspect.signature(spec.quantize).parameters.values())[1:]
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def check_options(spec: FormatSpec, options: dict[str, Any]) -> None:
    """Raises :class:`FormatError` for an option the format's quantize does not take."""
    names, any_name = option_names(spec)
    unknown = sorted(set(options) - names)
    if unknown and not any_name:
        raise FormatError(
            argument="options",
            expected=f"options of format '{spec.name}' among ({', '.join(sorted(names)) or 'none'})",
            got=", ".join(unknown),
            hint=f"see the signature of {spec.quantize.__module__}.{spec.quantize.__name__}.",
        )


def expected_record(spec: FormatSpec, rec: Any) -> Any:
    """The record that quantizing a tensor of ``rec``'s shape and dtype would give (shapes only, ``eval_shape``)."""
    names, _ = option_names(spec)
    statics = {
        f.name: getattr(rec, f.name)
        for f in dataclasses.fields(type(rec))
        if not f.metadata.get("pytree_node", True) and f.name in names
    }
    x = jax.ShapeDtypeStruct(tuple(rec.shape), rec.dtype)
    return jax.eval_shape(lambda a: spec.quantize(a, **statics), x)


def _static_key(rec: Any) -> tuple:
    return tuple((f.name, getattr(rec, f.name)) for f in dataclasses.fields(type(rec))
                 if not f.metadata.get("pytree_node", True))


@functools.lru_cache(maxsize=512)
def _expected_leaves(spec: FormatSpec, cls: type, key: tuple) -> tuple[Any, tuple | str]:
    """(treedef, ((shape, dtype) ...)) of the record a quantize of these static fields gives, or an error text."""
    rec = object.__new__(cls)
    for name, value in key:
        object.__setattr__(rec, name, value)
    try:
        expected = expected_record(spec, rec)
    except Exception as e:  # noqa: BLE001 - any failure means the static fields are not valid for the format
        return None, f"static fields the format refuses ({type(e).__name__}: {e})"
    leaves, tree = jax.tree_util.tree_flatten(expected)
    return tree, tuple((tuple(e.shape), jax.numpy.dtype(e.dtype)) for e in leaves)


def check_record(rec: Any, argument: str = "q") -> FormatSpec:
    """Raises :class:`FormatError` unless ``rec``'s buffers are what its format's quantize makes for its static fields.

    A record edited with ``dataclasses.replace`` (another ``shape``, a ``dtype`` of int32, another block size)
    would otherwise decode to a wrong tensor silently. Static shapes only: runs at trace time, under ``jit`` and
    ``vmap`` too (leading batch dims of the buffers are allowed, the same for every buffer).

    Returns:
        The record's :class:`FormatSpec`.

    Example:
        >>> import dataclasses, jax.numpy as jnp
        >>> q = quantize(jnp.ones((2, 32)), "q8_0")
        >>> check_record(q).name
        'q8_0'
        >>> try:
        ...     check_record(dataclasses.replace(q, shape=(1, 32)))
        ... except FormatError as e:
        ...     print(e.argument)
        q
    """
    spec = spec_of(rec, argument)
    try:
        key = _static_key(rec)
        hash(key)
    except TypeError:
        return spec  # unhashable static fields (not made by a quantize): nothing to compare with
    tree, want = _expected_leaves(spec, type(rec), key)
    what = f"a {spec.name} record whose buffers match its static fields (shape {tuple(rec.shape)}, dtype {rec.dtype})"
    hint = "do not edit a record's static fields (dataclasses.replace); quantize the tensor again."
    if tree is None:
        raise FormatError(argument=argument, expected=what, got=want, hint=hint)
    leaves, got_tree = jax.tree_util.tree_flatten(rec)
    if got_tree != tree:
        raise FormatError(argument=argument, expected=what, got=f"the fields {got_tree}", hint=hint)
    batch = None
    for i, (leaf, (shape, dtype)) in enumerate(zip(leaves, want, strict=True)):
        nb = leaf.ndim - len(shape)
        lead = tuple(leaf.shape[:nb]) if nb >= 0 else None
        same_dtype = jax.numpy.dtype(leaf.dtype) == dtype or (
            getattr(type(rec), "float_buffers_any_float_dtype", False)  # e.g. scales kept as another tool stored them
            and jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating) and jax.numpy.issubdtype(dtype, jax.numpy.floating)
        )
        if lead is None or tuple(leaf.shape[nb:]) != shape or not same_dtype or (batch is not None and lead != batch):
            got = f"buffer {i} of {jax.numpy.dtype(leaf.dtype).name}{tuple(leaf.shape)}"
            exp = f"{what}: buffer {i} of {dtype.name}{shape}" + (f" after batch dims {batch}" if batch else "")
            raise FormatError(argument=argument, expected=exp, got=got, hint=hint)
        batch = lead
    return spec


def quantize(x: jax.Array, fmt: str, **options: Any) -> Any:
    """Quantize ``x`` in the format named ``fmt``.

    Args:
        x: a floating array (float32, bfloat16 or float16) of any non-empty shape.
        fmt: a registered name (:func:`format_names`): ``"int8"``, ``"q4_0"``, ``"q4_1"``, ``"q8_0"``,
            ``"nf4"``, ``"nf4_dq"``, ``"nvfp4"``, ``"mxfp4"``, ``"int4_group"``, ``"awq_int4"``.
        **options: keyword options of that format's quantize function (``block_size`` ...).

    Returns:
        The format's quantized record (a pytree), identical to calling the format module directly.

    Raises:
        FormatError: an unknown format name, or an option the format does not take.
        DTypeError: ``x`` is not a float32, bfloat16 or float16 array.
        InvalidShape: ``x`` is empty.

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import quant
        >>> q = quant.quantize(jnp.ones((4, 64)), "nf4", block_size=64)
        >>> q.format, q.shape, q.nbytes
        ('nf4', (4, 64), 144)
    """
    spec = format_spec(fmt)
    check_options(spec, options)
    return spec.quantize(x, **options)


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
    return check_record(q).dequantize(q)
