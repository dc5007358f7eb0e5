"""What every quantization format shares: by-name quantization, a quantized matmul, trees, checkpoints.

The format modules (:mod:`viva_tensor.compression`, :mod:`viva_tensor.nf4`, :mod:`viva_tensor.blackwell`,
:mod:`viva_tensor.awq`) register their formats in :data:`FORMATS` when imported; this package imports them,
so that ``quant.quantize(w, "nf4")`` works without knowing where NF4 lives. This ``__init__`` only
re-exports: the by-name functions live in the format registry (:mod:`viva_tensor._formats.registry`),
the matmul in ``_dot``, trees in ``_tree``, checkpoints in ``_checkpoint``.

- :func:`quantize` / :func:`dequantize`: any registered format by name.
- :func:`dot_general` / :func:`dot`: a drop-in for ``jax.lax.dot_general`` where an operand may be a
  quantized record. The record is dequantized inside the same XLA computation as the matmul (to the
  other operand's dtype), so XLA fuses the decode with whatever reads it and nothing dequantized is
  kept between calls. It plugs into ``flax.nnx.Linear(..., dot_general=quant.dot_general,
  promote_dtype=quant.promote_dtype)``.
- :func:`fake_quantize`: ``dequantize(quantize(x))`` with a straight-through gradient (zero where the format
  clips), for quantization-aware training; :func:`clip_mask` is where that gradient passes. Gradients of
  :func:`dot_general` flow to the plain operand only (records are frozen) and decode the record again in the
  backward instead of keeping a dense copy.
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

from viva_tensor import awq, blackwell, compression, ggml, nf4  # noqa: F401 - each registers its formats in FORMATS
from viva_tensor._formats.registry import (
    FORMATS,
    FormatSpec,
    dequantize,
    format_names,
    format_spec,
    is_quantized,
    quantize,
)
from viva_tensor._paths import path_str as _path_str  # noqa: F401 - used by report/cli until they move
from viva_tensor.quant._checkpoint import load, save
from viva_tensor.quant._dot import dot, dot_general, promote_dtype
from viva_tensor.quant._fake import clip_mask, fake_quantize
from viva_tensor.quant._tree import default_where, dequantize_tree, quantize_tree

_spec = format_spec  # the old private name, used by report/cli until they switch to format_spec

__all__ = [
    "FORMATS",
    "FormatSpec",
    "is_quantized",
    "format_names",
    "format_spec",
    "quantize",
    "dequantize",
    "dot_general",
    "dot",
    "promote_dtype",
    "fake_quantize",
    "clip_mask",
    "default_where",
    "quantize_tree",
    "dequantize_tree",
    "save",
    "load",
]
