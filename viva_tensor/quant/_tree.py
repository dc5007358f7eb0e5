"""Quantizing the parameters of a model in one call: :func:`quantize_tree`, :func:`dequantize_tree`.

Leaf paths are spelled as everywhere in viva_tensor (:func:`viva_tensor._paths.path_str`):
``"encoder.layer.0.weight"``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from viva_tensor._formats.registry import FormatSpec, check_options, dequantize, format_spec, is_quantized
from viva_tensor._paths import path_str

__all__ = ["default_where", "quantize_tree", "dequantize_tree"]


def _block_size(spec: FormatSpec, options: dict[str, Any]) -> int:
    size = options.get("block_size", spec.block_size)
    return int(size) if isinstance(size, (int, np.integer)) and size > 0 else 1


def default_where(path: str, leaf: Any, *, block_size: int = 1, row_multiple: int = 1) -> bool:
    """The default leaf selection of :func:`quantize_tree`.

    A floating array of rank >= 2 whose last dim holds at least one full block (``block_size``
    values) and is a multiple of ``row_multiple``: weight matrices, not biases, norms or scalars (nor, for
    the GGML K-quants, matrices whose rows are not whole super-blocks of 256).

    Args:
        path: the leaf's path (unused by the default; part of the predicate signature).
        leaf: the leaf.
        block_size: the format's block size.
        row_multiple: what the last dim must be a multiple of (``quant.format_spec(f).row_multiple``).

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
        and leaf.shape[-1] % row_multiple == 0
    )


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
    spec = format_spec(fmt)
    check_options(spec, options)
    if where is None:
        block = _block_size(spec, options)
        where = functools.partial(default_where, block_size=block, row_multiple=spec.row_multiple)

    def one(path, leaf):
        if is_quantized(leaf) or not where(path_str(path), leaf):
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
