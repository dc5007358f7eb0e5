"""One spelling of a tree path for the whole library (private).

Every module that names a leaf of a pytree (quantizing a tree, a model's layers, sharding rules,
memory tiers, checkpoints) spells its path the same way: the keys joined by dots, list and tuple
indices as plain numbers, attribute names as they are. ``{"layers": [{"kernel": w}]}`` gives
``"layers.0.kernel"``; an NNX model's ``model.encoder.layer[0].query.kernel`` gives
``"encoder.layer.0.query.kernel"``.
"""

from __future__ import annotations

from typing import Any

import jax

__all__ = ["path_str", "leaves_with_paths"]


def _key_str(k: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path: Any) -> str:
    """The dotted name of a key path (from ``jax.tree_util`` or ``nnx``): ``"layers.0.kernel"``.

    Accepts a tuple of ``jax.tree_util`` keys (``DictKey``, ``SequenceKey``, ``GetAttrKey``,
    ``FlattenedIndexKey``) or of plain strings and ints, as ``nnx.iter_graph`` and ``nnx.State`` give.

    Example:
        >>> import jax
        >>> from viva_tensor._paths import path_str
        >>> [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path({"layers": [{"kernel": 1}]})[0]]
        ['layers.0.kernel']
        >>> path_str(("encoder", 0, "kernel"))
        'encoder.0.kernel'
    """
    return ".".join(_key_str(k) for k in path)


def leaves_with_paths(tree: Any, *, is_leaf: Any = None) -> list[tuple[str, Any]]:
    """``(dotted path, leaf)`` for every leaf of ``tree``, in flattening order.

    Example:
        >>> from viva_tensor._paths import leaves_with_paths
        >>> leaves_with_paths({"b": 2, "a": [1]})
        [('a.0', 1), ('b', 2)]
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(p), leaf) for p, leaf in flat]
