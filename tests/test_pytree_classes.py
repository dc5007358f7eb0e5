"""Every pytree record class of the library is a pytree node of its own type.

jaxlib's ``register_dataclass`` nodes (what ``flax.struct.dataclass`` makes) compare equal across classes with the
same fields and static values, so a cache keyed by treedefs (``jax.jit``'s) could unflatten one class's arguments as
another's. ``tests/test_format_contract.py`` checks the quantized records; this file the library's other classes:
each against a ``flax.struct.dataclass`` twin with the same fields and values (equal treedefs under the old
registration, so the test fails there).
"""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import pytest

from viva_tensor import flash_attention, hardware, metrics, named, sparsity
from viva_tensor._benchmarking import Timing
from viva_tensor._xla import CompiledMemory
from viva_tensor.memory import _offload

CLASSES = [flash_attention.FlashConfig, hardware.DeviceSpec, hardware.EffectiveMemory, hardware.PerformanceEstimate,
           metrics.QuantMetrics, named.NamedTensor, sparsity.SparsityMetrics, Timing, CompiledMemory,
           _offload.KeepOnDevice, _offload.OffloadToHost]


def _values(cls):
    return {f.name: jnp.zeros(2) if f.metadata.get("pytree_node", True) else 1 for f in dataclasses.fields(cls)}


def _make(cls, values):
    obj = object.__new__(cls)  # no __post_init__ checks: only the registration is under test
    for name, value in values.items():
        object.__setattr__(obj, name, value)
    return obj


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_a_class_never_shares_a_treedef_with_a_twin(cls):
    fields = [(f.name, f.type, flax.struct.field(pytree_node=f.metadata.get("pytree_node", True)))
              for f in dataclasses.fields(cls)]
    twin = flax.struct.dataclass(dataclasses.make_dataclass(cls.__name__, fields))
    values = _values(cls)
    mine, theirs = _make(cls, values), _make(twin, values)
    assert jax.tree_util.tree_structure(mine) != jax.tree_util.tree_structure(theirs)
    # and the class still flattens, unflattens and equals itself
    leaves, treedef = jax.tree_util.tree_flatten(mine)
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert type(back) is cls and treedef == jax.tree_util.tree_structure(_make(cls, values))
