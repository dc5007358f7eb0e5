"""Frozen pytree dataclasses, each registered as a pytree node of its own type (private, the core layer).

:func:`pytree_dataclass` is what ``flax.struct.dataclass`` makes, registered by its own flatten functions: the
quantized records (``viva_tensor._formats.record``) and the library's other pytree classes (FlashConfig,
NamedTensor, the metrics, the offload policies ...) use it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.serialization
import jax

__all__ = ["pytree_dataclass"]


def pytree_dataclass(cls: type) -> type:
    """What ``flax.struct.dataclass`` makes (a frozen dataclass with ``replace``, flax serialization of its
    children), registered as a pytree node by its own flatten functions instead of ``register_dataclass``.

    jaxlib's dataclass nodes compare equal across classes with the same field names and static values (an
    ``NF4Tensor`` and an ``FP4Tensor`` of one shape: equal treedefs, different hashes), so a cache keyed by
    treedefs could run one format's trace on another's record whenever two hashes meet in a bucket: NF4's
    code book on FP4 codes, seen as a rare wrong gradient in the test suite. A custom node compares its class.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> @pytree_dataclass
        ... class A:
        ...     x: jax.Array
        >>> @pytree_dataclass
        ... class B:
        ...     x: jax.Array
        >>> jax.tree_util.tree_structure(A(jnp.ones(2))) == jax.tree_util.tree_structure(B(jnp.ones(2)))
        False
        >>> A(jnp.ones(2)).replace(x=jnp.zeros(2)).x.tolist()
        [0.0, 0.0]
    """
    data_clz = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(data_clz)
    data = tuple(f.name for f in fields if f.metadata.get("pytree_node", True))
    meta = tuple(f.name for f in fields if not f.metadata.get("pytree_node", True))
    keys = tuple(jax.tree_util.GetAttrKey(name) for name in data)

    def flatten_with_keys(x: Any) -> tuple[list, tuple]:
        return [(k, getattr(x, n)) for k, n in zip(keys, data, strict=True)], tuple(getattr(x, n) for n in meta)

    def flatten(x: Any) -> tuple[list, tuple]:
        return [getattr(x, n) for n in data], tuple(getattr(x, n) for n in meta)

    def unflatten(aux: tuple, children: Any) -> Any:
        x = object.__new__(data_clz)  # as register_dataclass: no validation of the children (tracers, None ...)
        for name, value in zip(data, children, strict=True):
            object.__setattr__(x, name, value)
        for name, value in zip(meta, aux, strict=True):
            object.__setattr__(x, name, value)
        return x

    jax.tree_util.register_pytree_with_keys(data_clz, flatten_with_keys, unflatten, flatten)
    data_clz.replace = lambda self, **updates: dataclasses.replace(self, **updates)

    def to_state_dict(x: Any) -> dict:
        return {name: flax.serialization.to_state_dict(getattr(x, name)) for name in data}

    def from_state_dict(x: Any, state: dict) -> Any:
        missing, unknown = set(data) - set(state), set(state) - set(data)
        if missing or unknown:
            raise ValueError(f"{data_clz.__name__}: state dict fields {sorted(state)} != {list(data)}")
        return x.replace(**{n: flax.serialization.from_state_dict(getattr(x, n), state[n], name=n) for n in data})

    flax.serialization.register_serialization_state(data_clz, to_state_dict, from_state_dict)
    data_clz._flax_dataclass = True  # flax's own mark of its dataclasses
    return data_clz
