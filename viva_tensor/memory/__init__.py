"""Memory, measured and moved: tiers, offloading, streaming and rematerialisation.

Everything here is about real bytes. :func:`compiled_memory` asks XLA what a jitted function needs;
:func:`place` moves a pytree between JAX's memory kinds (``device``, ``pinned_host``,
``unpinned_host``) and safetensors files on disk, and the data really is there afterwards (read
``x.sharding.memory_kind``, or the file); the offloading policies decide, deterministically, where each
leaf of a parameter tree lives; :func:`stream` runs a stack of layers whose weights do not fit a device
budget, layer by layer, prefetching the next one; the rematerialisation strategies are
``jax.checkpoint`` over a stack of layers, and :func:`checkpoint_savings` reads what they save from
the compiler.

A quantized record (any :class:`viva_tensor._formats.record.QuantizedArray`) is one unit: the policies place
it whole, with all its buffers.

One file per concept: ``_tiers`` (memory kinds and the disk tier), ``_hierarchy`` (the machine's
capacities), ``_offload`` (policies), ``_stream`` (layer streaming), ``_remat`` (rematerialisation);
:class:`CompiledMemory` and :func:`compiled_memory` come from ``viva_tensor._xla``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from viva_tensor import memory
    >>> m = memory.compiled_memory(lambda x: (x @ x.T).sum(), jnp.ones((256, 64)))
    >>> m.argument_bytes
    65536
    >>> host = memory.place({"w": jnp.ones((4, 4))}, "pinned_host")
    >>> host["w"].sharding.memory_kind
    'pinned_host'
"""

from viva_tensor._xla import CompiledMemory as CompiledMemory
from viva_tensor._xla import compiled_memory as compiled_memory
from viva_tensor.memory._hierarchy import MemoryHierarchy as MemoryHierarchy
from viva_tensor.memory._hierarchy import TierInfo as TierInfo
from viva_tensor.memory._hierarchy import create_memory_hierarchy as create_memory_hierarchy
from viva_tensor.memory._offload import KeepOnDevice as KeepOnDevice
from viva_tensor.memory._offload import OffloadToDisk as OffloadToDisk
from viva_tensor.memory._offload import OffloadToHost as OffloadToHost
from viva_tensor.memory._offload import SmartOffload as SmartOffload
from viva_tensor.memory._offload import offload as offload
from viva_tensor.memory._offload import plan as plan
from viva_tensor.memory._remat import Adaptive as Adaptive
from viva_tensor.memory._remat import CheckpointSavings as CheckpointSavings
from viva_tensor.memory._remat import EveryN as EveryN
from viva_tensor.memory._remat import LargeLayersOnly as LargeLayersOnly
from viva_tensor.memory._remat import NoCheckpoint as NoCheckpoint
from viva_tensor.memory._remat import apply_layers as apply_layers
from viva_tensor.memory._remat import checkpoint_plan as checkpoint_plan
from viva_tensor.memory._remat import checkpoint_savings as checkpoint_savings
from viva_tensor.memory._remat import layer_activation_bytes as layer_activation_bytes
from viva_tensor.memory._stream import StreamStats as StreamStats
from viva_tensor.memory._stream import stream as stream
from viva_tensor.memory._tiers import TIERS as TIERS
from viva_tensor.memory._tiers import DiskArray as DiskArray
from viva_tensor.memory._tiers import load as load
from viva_tensor.memory._tiers import place as place
from viva_tensor.memory._tiers import tier_of as tier_of
from viva_tensor.memory._tiers import tree_nbytes as tree_nbytes

__all__ = [
    "CompiledMemory",
    "compiled_memory",
    "TIERS",
    "DiskArray",
    "place",
    "load",
    "tier_of",
    "tree_nbytes",
    "TierInfo",
    "MemoryHierarchy",
    "create_memory_hierarchy",
    "KeepOnDevice",
    "OffloadToHost",
    "OffloadToDisk",
    "SmartOffload",
    "plan",
    "offload",
    "StreamStats",
    "stream",
    "NoCheckpoint",
    "EveryN",
    "LargeLayersOnly",
    "Adaptive",
    "layer_activation_bytes",
    "checkpoint_plan",
    "apply_layers",
    "CheckpointSavings",
    "checkpoint_savings",
]
