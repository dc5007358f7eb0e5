"""Private helpers for walking Flax NNX module graphs (used by the modules of :mod:`viva_tensor.nn`)."""

from __future__ import annotations

from typing import Any

from flax import nnx

__all__ = ["set_child"]


def set_child(root: nnx.Module, path: tuple, value: Any) -> None:
    """Replace the submodule at ``path`` (as given by ``nnx.iter_graph``) of ``root`` with ``value``."""
    parent = root
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = value
    else:
        setattr(parent, path[-1], value)
