"""Memory, measured and moved: tiers, offloading, streaming and rematerialisation.

Everything here is about real bytes. :func:`compiled_memory` asks XLA what a jitted function needs;
:func:`place` moves a pytree between JAX's memory kinds (``device``, ``pinned_host``,
``unpinned_host``) and safetensors files on disk, and the data really is there afterwards (read
``x.sharding.memory_kind``, or the file); the offloading policies decide, deterministically, where each
leaf of a parameter tree lives; :func:`stream` runs a stack of layers whose weights do not fit a device
budget, layer by layer, prefetching the next one; the rematerialisation strategies are
``jax.checkpoint`` over a stack of layers, and :func:`checkpoint_savings` reads what they save from
the compiler.

A quantized record (any :class:`viva_tensor._record.QuantizedArray`) is one unit: the policies place
it whole, with all its buffers.

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

from __future__ import annotations

import collections
import concurrent.futures
import json
import math
import os
import shutil
import struct
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from viva_tensor._formats.registry import is_quantized
from viva_tensor.errors import CheckpointError, ConfigError, InvalidOp

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



@flax.struct.dataclass
class CompiledMemory:
    """XLA's memory analysis of one compiled function, in bytes.

    Attributes:
        argument_bytes: the inputs.
        output_bytes: the outputs.
        temp_bytes: temporaries live at the peak (what an O(n) algorithm keeps small).
        alias_bytes: bytes shared between inputs and outputs (donation).
        generated_code_bytes: the compiled program itself.
    """

    argument_bytes: int = flax.struct.field(pytree_node=False)
    output_bytes: int = flax.struct.field(pytree_node=False)
    temp_bytes: int = flax.struct.field(pytree_node=False)
    alias_bytes: int = flax.struct.field(pytree_node=False)
    generated_code_bytes: int = flax.struct.field(pytree_node=False)

    @property
    def total_bytes(self) -> int:
        """Arguments + outputs + temporaries - aliased bytes: the peak a call needs."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


def compiled_memory(f: Callable[..., Any], *args: Any, static_argnums=(), **kwargs: Any) -> CompiledMemory:
    """Compile ``f`` for ``args`` (arrays or ``jax.ShapeDtypeStruct``) and return XLA's memory analysis.

    Nothing runs and nothing is allocated: ``ShapeDtypeStruct`` inputs let you ask about sizes that
    would not fit in memory.

    Args:
        f: any function ``jax.jit`` accepts (already jitted or not).
        *args: its positional arguments, arrays or ``jax.ShapeDtypeStruct``.
        static_argnums: passed to ``jax.jit`` when ``f`` is not jitted yet.
        **kwargs: keyword arguments for ``f``.

    Returns:
        A :class:`CompiledMemory`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jax.ShapeDtypeStruct((1024, 1024), jnp.float32)
        >>> compiled_memory(lambda a: a + 1, x).output_bytes
        4194304
    """
    jitted = f if hasattr(f, "lower") else jax.jit(f, static_argnums=static_argnums)
    analysis = jitted.lower(*args, **kwargs).compile().memory_analysis()
    return CompiledMemory(
        argument_bytes=int(analysis.argument_size_in_bytes),
        output_bytes=int(analysis.output_size_in_bytes),
        temp_bytes=int(analysis.temp_size_in_bytes),
        alias_bytes=int(analysis.alias_size_in_bytes),
        generated_code_bytes=int(analysis.generated_code_size_in_bytes),
    )


# --------------------------------------------------------------------------------------------------
# Tiers: JAX memory kinds and safetensors files
# --------------------------------------------------------------------------------------------------

TIERS: tuple[str, ...] = ("device", "pinned_host", "unpinned_host", "disk")
"""Where data can live, fastest first: JAX's three memory kinds, then a safetensors file."""

_MEMORY_KINDS = TIERS[:3]

# safetensors names of the dtypes whose bytes it stores one element per itemsize; any other dtype
# (float4_e2m1fn, int4 ...) is stored as its raw bytes ("U8") with its name in the file's metadata.
_ST_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}
_META_DTYPE = "viva_tensor.dtype."


@flax.struct.dataclass
class DiskArray:
    """A handle to one array stored in a safetensors file: what :func:`place` leaves for the disk tier.

    It holds no data (no pytree children): ``jax.tree_util.tree_leaves`` of a tree placed on disk is
    empty. :func:`load` (or :func:`place` to a memory kind) reads it back, bit for bit.

    Attributes:
        path: the absolute path of the file.
        key: the tensor's name in the file (the leaf's path in the tree, e.g. ``"['w']"``).
        shape: the array's shape.
        dtype: the array's dtype name (``"bfloat16"``, ``"float4_e2m1fn"`` ...).
    """

    path: str = flax.struct.field(pytree_node=False)
    key: str = flax.struct.field(pytree_node=False)
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
    dtype: str = flax.struct.field(pytree_node=False)

    @property
    def nbytes(self) -> int:
        """Bytes the array takes once loaded."""
        return math.prod(self.shape) * jnp.dtype(self.dtype).itemsize


def _is_unit(x: Any) -> bool:
    return isinstance(x, DiskArray) or is_quantized(x)


def _is_handle(x: Any) -> bool:
    return isinstance(x, DiskArray)


def _leaf_nbytes(leaf: Any) -> int:
    if isinstance(leaf, DiskArray):
        return leaf.nbytes
    return int(np.dtype(leaf.dtype).itemsize * math.prod(leaf.shape))


def tree_nbytes(tree: Any) -> int:
    """Bytes of every array of a pytree, wherever it lives (disk handles count what they would load).

    Args:
        tree: any pytree of arrays, quantized records, :class:`DiskArray` handles or
            ``jax.ShapeDtypeStruct`` s.

    Returns:
        The sum of the leaves' bytes.

    Example:
        >>> import jax.numpy as jnp
        >>> tree_nbytes({"w": jnp.ones((4, 4)), "b": jnp.ones(4, jnp.bfloat16)})
        72
    """
    return sum(_leaf_nbytes(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=_is_handle))


def _check_tier(tier: Any) -> None:
    if tier not in TIERS:
        raise ConfigError(argument="tier", expected=f"one of {TIERS}", got=tier)


def _check_kind(device: jax.Device, tier: str) -> None:
    kinds = [m.kind for m in device.addressable_memories()]
    if tier not in kinds:
        raise ConfigError(argument="tier", expected=f"a memory kind of {device} ({kinds})", got=tier)


def _sharding_for(leaf: Any, tier: str, device: jax.Device | None):
    if device is None and isinstance(leaf, jax.Array):
        for d in leaf.devices():
            _check_kind(d, tier)
        return leaf.sharding.with_memory_kind(tier)
    device = device or jax.devices()[0]
    _check_kind(device, tier)
    return jax.sharding.SingleDeviceSharding(device, memory_kind=tier)


def _to_memory(leaf: Any, tier: str, device: jax.Device | None) -> jax.Array:
    if isinstance(leaf, jax.core.Tracer):
        raise InvalidOp(
            argument="tree", expected="concrete arrays", got="a traced value",
            hint="place moves data at run time: call it outside jit.",
        )
    if isinstance(leaf, DiskArray):
        leaf = _read(leaf)
    if isinstance(leaf, jax.Array):
        same_device = device is None or leaf.devices() == {device}
        if same_device and leaf.sharding.memory_kind == tier:
            return leaf
    elif not isinstance(leaf, np.ndarray):
        raise InvalidOp(argument="tree", expected="leaves that are arrays", got=type(leaf).__name__)
    return jax.device_put(leaf, _sharding_for(leaf, tier, device))


def place(tree: Any, tier: str, *, path: str | os.PathLike | None = None,
          device: jax.Device | None = None) -> Any:
    """Moves every array of a pytree to a tier, and returns the tree as it is there.

    Memory kinds keep each array's sharding and change only its memory kind (or put it on ``device``
    when given); the copy is asynchronous, as ``jax.device_put`` is. The disk tier writes all leaves
    into one safetensors file and returns the tree with :class:`DiskArray` handles in their places.
    Disk handles given to a memory kind are read back. An array already where it is asked to be is
    returned as it is.

    Args:
        tree: a pytree of ``jax.Array`` s, NumPy arrays, quantized records or :class:`DiskArray` s.
        tier: one of :data:`TIERS`.
        path: the file to write, for ``tier="disk"`` (overwritten if present).
        device: the device to move to (default: each array's own devices, else the first device).

    Returns:
        The same tree structure, its leaves in ``tier``.

    Raises:
        ConfigError: an unknown tier, a memory kind the device lacks, or ``"disk"`` without a path.
        InvalidOp: a leaf that is not an array, or a call under ``jit``.
        CheckpointError: a disk handle whose file is missing or damaged.

    Example:
        >>> import jax.numpy as jnp, tempfile, os
        >>> tree = {"w": jnp.arange(4.0)}
        >>> place(tree, "unpinned_host")["w"].sharding.memory_kind
        'unpinned_host'
        >>> f = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> handles = place(tree, "disk", path=f)
        >>> handles["w"].shape, load(handles)["w"].tolist()
        ((4,), [0.0, 1.0, 2.0, 3.0])
    """
    _check_tier(tier)
    if tier == "disk":
        if path is None:
            raise ConfigError(argument="path", expected="a file path for the disk tier", got=None)
        return _write(tree, os.fspath(path))
    return jax.tree_util.tree_map(lambda x: _to_memory(x, tier, device), tree, is_leaf=_is_handle)


def load(tree: Any, *, tier: str = "device", device: jax.Device | None = None) -> Any:
    """Reads the :class:`DiskArray` handles of a tree back into memory (other leaves are moved too).

    Args:
        tree: a pytree, typically returned by ``place(..., "disk", path=...)``.
        tier: the memory kind to load into.
        device: the device to load onto (default: the first device).

    Returns:
        The tree with arrays in ``tier``, bit-identical to what was written.

    Raises:
        CheckpointError: a missing, truncated or foreign file, or a tensor that is not in it.

    Example:
        >>> import jax.numpy as jnp, tempfile, os
        >>> f = os.path.join(tempfile.mkdtemp(), "t.safetensors")
        >>> load(place([jnp.ones(2, jnp.bfloat16)], "disk", path=f))[0].dtype
        dtype(bfloat16)
    """
    if tier == "disk":
        raise ConfigError(argument="tier", expected="a memory kind", got=tier, hint="use place(..., 'disk').")
    return place(tree, tier, device=device)


def tier_of(tree: Any) -> dict[str, str]:
    """Where each unit of a tree lives: its memory kind, ``"disk"``, or ``"numpy"``.

    A quantized record is one unit; its tier is ``"mixed"`` if its buffers are in different places.

    Args:
        tree: a pytree of arrays, quantized records and :class:`DiskArray` s.

    Returns:
        A dict from each unit's path (``jax.tree_util.keystr``) to its tier, in flattening order.

    Example:
        >>> import jax.numpy as jnp
        >>> tier_of({"a": jnp.ones(2), "b": place(jnp.ones(2), "pinned_host")})
        {"['a']": 'device', "['b']": 'pinned_host'}
    """
    out = {}
    for kp, unit in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_unit)[0]:
        kinds = {_leaf_tier(x) for x in jax.tree_util.tree_leaves(unit, is_leaf=_is_handle)}
        out[jax.tree_util.keystr(kp)] = kinds.pop() if len(kinds) == 1 else "mixed"
    return out


def _leaf_tier(x: Any) -> str:
    if isinstance(x, DiskArray):
        return "disk"
    if isinstance(x, jax.Array):
        return x.sharding.memory_kind or "device"
    return "numpy"


def _write(tree: Any, path: str) -> Any:
    """Writes the leaves of ``tree`` into one safetensors file, one leaf at a time."""
    path = os.path.abspath(path)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_handle)
    leaves = [_read(x) if isinstance(x, DiskArray) else x for _, x in flat]  # before overwriting
    header, meta, handles, offset = {}, {"format": "viva_tensor.memory"}, [], 0
    for (kp, _), leaf in zip(flat, leaves):
        if isinstance(leaf, jax.core.Tracer) or not isinstance(leaf, (jax.Array, np.ndarray)):
            raise InvalidOp(argument="tree", expected="concrete arrays", got=type(leaf).__name__)
        key, name = jax.tree_util.keystr(kp), np.dtype(leaf.dtype).name
        nbytes = _leaf_nbytes(leaf)
        st = _ST_DTYPES.get(name)
        if st is None:
            st, shape = "U8", [nbytes]
            meta[_META_DTYPE + key] = name
        else:
            shape = list(leaf.shape)
        header[key] = {"dtype": st, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        handles.append(DiskArray(path=path, key=key, shape=tuple(leaf.shape), dtype=name))
        offset += nbytes
    header["__metadata__"] = meta
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for leaf in leaves:
            f.write(np.ascontiguousarray(np.asarray(leaf)).view(np.uint8).reshape(-1).data)
    return jax.tree_util.tree_unflatten(treedef, handles)


def _header(path: str) -> tuple[dict, int]:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            (n,) = struct.unpack("<Q", raw)
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(argument="path", expected="an existing safetensors file", got=path) from None
    except (struct.error, ValueError, UnicodeDecodeError, MemoryError, OverflowError):
        raise CheckpointError(argument="path", expected="a safetensors file", got=path) from None
    return header, 8 + n


def _read(handle: DiskArray) -> np.ndarray:
    """Reads one array from its file, bit for bit."""
    header, start = _header(handle.path)
    entry = header.get(handle.key)
    if entry is None:
        raise CheckpointError(argument="key", expected=f"a tensor of {handle.path}", got=handle.key)
    begin, end = entry["data_offsets"]
    if end - begin != handle.nbytes:
        raise CheckpointError(argument="key", expected=f"{handle.nbytes} bytes for {handle.key}",
                              got=f"{end - begin} bytes in the file")
    if os.path.getsize(handle.path) < start + end:
        raise CheckpointError(argument="path", expected=f"at least {start + end} bytes",
                              got=f"{os.path.getsize(handle.path)} (a truncated file)")
    out = np.empty(handle.nbytes, np.uint8)
    with open(handle.path, "rb") as f:
        f.seek(start + begin)
        f.readinto(out.data)
    return out.view(np.dtype(handle.dtype)).reshape(handle.shape)


# --------------------------------------------------------------------------------------------------
# The hierarchy of the actual machine
# --------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TierInfo:
    """One level of a :class:`MemoryHierarchy`.

    Attributes:
        name: ``"device"``, ``"host"`` (``pinned_host`` and ``unpinned_host`` share it) or ``"disk"``.
        capacity_bytes: how many bytes it holds.
        used_bytes: bytes in use when the hierarchy was made, where the runtime says so, else ``None``.
        source: where ``capacity_bytes`` comes from (``"memory_stats()['bytes_limit']"``, ``"explicit"``,
            ``"physical RAM (os.sysconf)"``, ``"free disk space (shutil.disk_usage)"``).
    """

    name: str = flax.struct.field(pytree_node=False)
    capacity_bytes: int = flax.struct.field(pytree_node=False)
    used_bytes: int | None = flax.struct.field(pytree_node=False)
    source: str = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class MemoryHierarchy:
    """The device, host and disk levels of one machine, with capacities from the runtime.

    Attributes:
        device: the JAX device it describes (as text, e.g. ``"TFRT_CPU_0"`` or ``"cuda:0"``).
        platform: ``"cpu"``, ``"gpu"``, ``"tpu"``.
        memory_kinds: the memory kinds the device offers.
        tiers: the levels, fastest first.
    """

    device: str = flax.struct.field(pytree_node=False)
    platform: str = flax.struct.field(pytree_node=False)
    memory_kinds: tuple[str, ...] = flax.struct.field(pytree_node=False)
    tiers: tuple[TierInfo, ...] = flax.struct.field(pytree_node=False)

    def capacity(self, tier: str) -> int:
        """Capacity in bytes of a tier name (``"pinned_host"`` and ``"unpinned_host"`` mean host)."""
        name = "host" if tier in ("pinned_host", "unpinned_host") else tier
        for t in self.tiers:
            if t.name == name:
                return t.capacity_bytes
        raise ConfigError(argument="tier", expected=f"one of {TIERS}", got=tier)


def _physical_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def create_memory_hierarchy(device: jax.Device | None = None, *, device_bytes: int | None = None,
                            host_bytes: int | None = None, disk_bytes: int | None = None,
                            disk_path: str | os.PathLike = ".") -> MemoryHierarchy:
    """Describes the memory of the actual machine: device, host and disk, with their capacities.

    The device's capacity comes from ``device.memory_stats()['bytes_limit']`` where the backend gives it
    (GPUs, TPUs); a CPU backend gives no statistics and its device memory *is* the host's RAM, so it
    gets the physical RAM. Any explicit capacity wins over what the runtime says.

    Args:
        device: the JAX device (default: the first).
        device_bytes: the device capacity to use instead of the runtime's.
        host_bytes: the host capacity (default: the physical RAM).
        disk_bytes: the disk capacity (default: the free space under ``disk_path``).
        disk_path: where the disk tier writes.

    Returns:
        A :class:`MemoryHierarchy`, each capacity with its source.

    Raises:
        ConfigError: a capacity that is not positive, or an accelerator without memory statistics and
            no explicit ``device_bytes``.

    Example:
        >>> h = create_memory_hierarchy(device_bytes=2**30)
        >>> [t.name for t in h.tiers], h.capacity("device"), h.tiers[0].source
        (['device', 'host', 'disk'], 1073741824, 'explicit')
    """
    device = device or jax.devices()[0]
    for name, value in (("device_bytes", device_bytes), ("host_bytes", host_bytes), ("disk_bytes", disk_bytes)):
        if value is not None and value <= 0:
            raise ConfigError(argument=name, expected="a positive number of bytes", got=value)
    stats = device.memory_stats() or {}
    used = stats.get("bytes_in_use")
    if device_bytes is not None:
        dev = TierInfo("device", int(device_bytes), used, "explicit")
    elif "bytes_limit" in stats:
        dev = TierInfo("device", int(stats["bytes_limit"]), used, "memory_stats()['bytes_limit']")
    elif device.platform == "cpu":
        dev = TierInfo("device", _physical_ram(), None, "physical RAM (os.sysconf): a CPU device is the host")
    else:
        raise ConfigError(argument="device_bytes", expected=f"a capacity: {device} gives no memory_stats()",
                          got=None)
    host = (TierInfo("host", int(host_bytes), None, "explicit") if host_bytes is not None
            else TierInfo("host", _physical_ram(), None, "physical RAM (os.sysconf)"))
    usage = shutil.disk_usage(os.fspath(disk_path))
    disk = (TierInfo("disk", int(disk_bytes), None, "explicit") if disk_bytes is not None
            else TierInfo("disk", int(usage.free), int(usage.used), "free disk space (shutil.disk_usage)"))
    kinds = tuple(m.kind for m in device.addressable_memories())
    return MemoryHierarchy(str(device), device.platform, kinds, (dev, host, disk))


# --------------------------------------------------------------------------------------------------
# Offloading policies: where each leaf lives
# --------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class KeepOnDevice:
    """Every leaf on the device (Gleam ``KeepOnGpu``)."""


@flax.struct.dataclass
class OffloadToHost:
    """Leaves larger than ``threshold`` bytes go to host memory, the others stay on the device.

    Attributes:
        threshold: bytes; a unit strictly larger goes to ``kind``.
        kind: the host memory kind, ``"pinned_host"`` (default: fast transfers) or ``"unpinned_host"``.
    """

    threshold: int = flax.struct.field(pytree_node=False)
    kind: str = flax.struct.field(pytree_node=False, default="pinned_host")


@flax.struct.dataclass
class OffloadToDisk:
    """Leaves larger than ``host_threshold`` bytes go to a safetensors file, the others to host memory.

    Attributes:
        host_threshold: bytes; a unit strictly larger goes to disk.
        path: the file the disk leaves are written to.
        kind: the host memory kind of the others.
    """

    host_threshold: int = flax.struct.field(pytree_node=False)
    path: str = flax.struct.field(pytree_node=False)
    kind: str = flax.struct.field(pytree_node=False, default="pinned_host")


@flax.struct.dataclass
class SmartOffload:
    """Least-recently-used placement under byte budgets (the Gleam policy that was never built).

    All units start in host memory (and, past ``host_budget``, on disk, in flattening order). The
    ``trace`` of accesses (unit paths, oldest first; default: every unit once, in flattening order, as
    one forward pass touches them) is replayed: an access brings the unit to the device, and while the
    device holds more than ``device_budget`` its least recently used unit goes down to host; while host
    holds more than ``host_budget`` its least recently used unit goes down to disk. A unit larger than
    the device budget is used from host. Ties cannot happen: the order is total, so the plan is
    deterministic.

    Attributes:
        device_budget: bytes the device may hold.
        host_budget: bytes host memory may hold (``None``: unlimited).
        path: the file for units that end on disk (needed only if some do).
        trace: the accesses, as ``jax.tree_util.keystr`` paths of units.
        kind: the host memory kind.
    """

    device_budget: int = flax.struct.field(pytree_node=False)
    host_budget: int | None = flax.struct.field(pytree_node=False, default=None)
    path: str | None = flax.struct.field(pytree_node=False, default=None)
    trace: tuple[str, ...] | None = flax.struct.field(pytree_node=False, default=None)
    kind: str = flax.struct.field(pytree_node=False, default="pinned_host")


def _units_with_sizes(tree: Any) -> list[tuple[str, int]]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_unit)[0]
    return [(jax.tree_util.keystr(kp), tree_nbytes(unit)) for kp, unit in flat]


def _check_bytes(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ConfigError(argument=name, expected="a number of bytes >= 0", got=value)


def _lru(units: list[tuple[str, int]], policy: SmartOffload) -> dict[str, str]:
    sizes = dict(units)
    trace = policy.trace if policy.trace is not None else tuple(sizes)
    for key in trace:
        if key not in sizes:
            raise ConfigError(argument="trace", expected=f"paths of the tree's units {tuple(sizes)}", got=key)
    host_cap = math.inf if policy.host_budget is None else policy.host_budget
    dev, host = collections.OrderedDict(), collections.OrderedDict()  # oldest first
    where = {}
    for key, size in units:  # the start: host in flattening order, then disk
        if sum(host.values()) + size <= host_cap:
            host[key], where[key] = size, policy.kind
        else:
            where[key] = "disk"

    def demote(key):
        host[key] = sizes[key]
        where[key] = policy.kind
        while sum(host.values()) > host_cap:
            old, _ = host.popitem(last=False)
            where[old] = "disk"

    for key in trace:
        dev.pop(key, None)
        host.pop(key, None)
        if sizes[key] > policy.device_budget:
            demote(key)
            continue
        dev[key], where[key] = sizes[key], "device"
        while sum(dev.values()) > policy.device_budget:
            old, _ = dev.popitem(last=False)
            demote(old)
    return {key: where[key] for key, _ in units}


def plan(tree: Any, policy: Any, *, hierarchy: MemoryHierarchy | None = None) -> dict[str, str]:
    """Decides where each unit of a parameter tree lives under a policy (moves nothing).

    Args:
        tree: a pytree of arrays, quantized records (one unit each), disk handles or
            ``jax.ShapeDtypeStruct`` s.
        policy: :class:`KeepOnDevice`, :class:`OffloadToHost`, :class:`OffloadToDisk` or
            :class:`SmartOffload`.
        hierarchy: if given, each tier's total is checked against its capacity.

    Returns:
        A dict from each unit's path (``jax.tree_util.keystr``) to its tier, in flattening order.
        The same tree and policy always give the same plan.

    Raises:
        ConfigError: an unknown policy, a negative threshold or budget, a trace naming no unit, units
            that must go to disk with no path, or a plan that overflows the hierarchy.

    Example:
        >>> import jax.numpy as jnp
        >>> tree = {"big": jnp.ones((256, 256)), "small": jnp.ones(8)}
        >>> plan(tree, OffloadToHost(threshold=1024))
        {"['big']": 'pinned_host', "['small']": 'device'}
    """
    units = _units_with_sizes(tree)
    if isinstance(policy, KeepOnDevice):
        out = {k: "device" for k, _ in units}
    elif isinstance(policy, OffloadToHost):
        _check_bytes("threshold", policy.threshold)
        _check_host_kind(policy.kind)
        out = {k: policy.kind if s > policy.threshold else "device" for k, s in units}
    elif isinstance(policy, OffloadToDisk):
        _check_bytes("host_threshold", policy.host_threshold)
        _check_host_kind(policy.kind)
        out = {k: "disk" if s > policy.host_threshold else policy.kind for k, s in units}
    elif isinstance(policy, SmartOffload):
        _check_bytes("device_budget", policy.device_budget)
        _check_bytes("host_budget", policy.host_budget, allow_none=True)
        _check_host_kind(policy.kind)
        out = _lru(units, policy)
        if "disk" in out.values() and policy.path is None:
            raise ConfigError(argument="path", expected="a file for the units that go to disk", got=None,
                              hint="give SmartOffload a path, or a larger host_budget.")
    else:
        raise ConfigError(argument="policy", expected="KeepOnDevice, OffloadToHost, OffloadToDisk or SmartOffload",
                          got=type(policy).__name__)
    if hierarchy is not None:
        _check_fits(out, dict(units), hierarchy)
    return out


def _check_host_kind(kind: str) -> None:
    if kind not in ("pinned_host", "unpinned_host"):
        raise ConfigError(argument="kind", expected="'pinned_host' or 'unpinned_host'", got=kind)


def _check_fits(where: dict[str, str], sizes: dict[str, int], hierarchy: MemoryHierarchy) -> None:
    totals = collections.Counter()
    for key, tier in where.items():
        totals["host" if tier in ("pinned_host", "unpinned_host") else tier] += sizes[key]
    for name, total in totals.items():
        cap = hierarchy.capacity(name)
        if total > cap:
            raise ConfigError(argument="policy", expected=f"at most {cap} bytes on {name}", got=f"{total} bytes",
                              hint="offload more, or quantize the tree.")


def offload(tree: Any, policy: Any, *, hierarchy: MemoryHierarchy | None = None,
            device: jax.Device | None = None) -> Any:
    """Moves each unit of a tree where :func:`plan` decides.

    Args:
        tree: a pytree of arrays, quantized records or disk handles.
        policy: an offloading policy (see :func:`plan`).
        hierarchy: if given, the plan is checked against its capacities first.
        device: the device for the memory kinds (default: each array's own).

    Returns:
        The tree, each unit in its tier (disk units as :class:`DiskArray` handles, all in the
        policy's file).

    Raises:
        ConfigError: as :func:`plan`.

    Example:
        >>> import jax.numpy as jnp
        >>> tree = {"big": jnp.ones((256, 256)), "small": jnp.ones(8)}
        >>> moved = offload(tree, OffloadToHost(threshold=1024))
        >>> moved["big"].sharding.memory_kind, moved["small"].sharding.memory_kind
        ('pinned_host', 'device')
    """
    where = plan(tree, policy, hierarchy=hierarchy)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_unit)
    keys = [jax.tree_util.keystr(kp) for kp, _ in flat]
    units = [u for _, u in flat]
    disk_idx = [i for i, k in enumerate(keys) if where[k] == "disk"]
    if disk_idx:
        written = place({keys[i]: units[i] for i in disk_idx}, "disk", path=policy.path)
        for i in disk_idx:
            units[i] = written[keys[i]]
    for i, k in enumerate(keys):
        if where[k] != "disk":
            units[i] = place(units[i], where[k], device=device)
    return jax.tree_util.tree_unflatten(treedef, units)


# --------------------------------------------------------------------------------------------------
# Streaming a stack of layers through a device budget
# --------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class StreamStats:
    """What :func:`stream` held on the device, in bytes.

    Attributes:
        budget_bytes: the budget it was given.
        layer_bytes: each layer's weight bytes.
        peak_resident_bytes: the most weight bytes on the device at once (the ledger of copies alive).
        peak_live_device_bytes: the most bytes of arrays in the device memory kind that the run created
            and that were alive at once (weights and activations), read from ``jax.live_arrays()``
            right after each layer finished, when both its weights and the next layer's are there.
        prefetched: how many layers were copied while the previous one computed.
    """

    budget_bytes: int = flax.struct.field(pytree_node=False)
    layer_bytes: tuple[int, ...] = flax.struct.field(pytree_node=False)
    peak_resident_bytes: int = flax.struct.field(pytree_node=False)
    peak_live_device_bytes: int = flax.struct.field(pytree_node=False)
    prefetched: int = flax.struct.field(pytree_node=False)


def _device_live_bytes(exclude: set[int]) -> int:
    total = 0
    for a in jax.live_arrays():
        if id(a) not in exclude and not a.is_deleted() and (a.sharding.memory_kind or "device") == "device":
            total += a.nbytes
    return total


def _free(copy: Any, source: Any) -> None:
    """Deletes the device copies that :func:`stream` made (never a caller's own array)."""
    copies = jax.tree_util.tree_leaves(copy)
    sources = jax.tree_util.tree_leaves(source, is_leaf=_is_handle)
    for c, s in zip(copies, sources):
        if c is not s:
            c.delete()


def stream(layer_fn: Callable[[Any, Any], Any], layers: Sequence[Any], x: Any, *, budget_bytes: int,
           device: jax.Device | None = None, prefetch: bool = True,
           return_stats: bool = False) -> Any:
    """Runs ``x`` through a stack of layers whose weights live off the device, one layer at a time.

    Each layer's weights (on host memory, in NumPy arrays or in safetensors files) are copied to the
    device, used by ``layer_fn`` (jitted once for all layers of the same structure) and deleted once
    the layer has run. While a layer computes, the next one is already being copied (``device_put`` is
    asynchronous, file reads run in a worker thread) whenever both fit the budget; otherwise the copy
    waits. The device never holds more than ``budget_bytes`` of weights, and the output is the one the
    same ``layer_fn`` gives with every layer on the device.

    Args:
        layer_fn: ``layer_fn(params, x) -> x``, the same function for every layer.
        layers: the layers' parameter trees, first to last.
        x: the input (a pytree of device arrays).
        budget_bytes: the most weight bytes the device may hold; each layer must fit alone.
        device: the device to run on (default: the first).
        prefetch: copy the next layer while the current computes (when both fit).
        return_stats: also return a :class:`StreamStats`.

    Returns:
        The output of the last layer, or ``(output, StreamStats)``.

    Raises:
        ConfigError: a budget that is not positive, or a layer larger than the budget.

    Example:
        >>> import jax.numpy as jnp
        >>> layers = [place({"w": jnp.eye(4) * (i + 1)}, "pinned_host") for i in range(3)]
        >>> y, stats = stream(lambda p, x: x @ p["w"], layers, jnp.ones((1, 4)), budget_bytes=128,
        ...                   return_stats=True)
        >>> y.tolist(), stats.peak_resident_bytes
        ([[6.0, 6.0, 6.0, 6.0]], 128)
    """
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, np.integer)) or budget_bytes <= 0:
        raise ConfigError(argument="budget_bytes", expected="a positive number of bytes", got=budget_bytes)
    layers = list(layers)
    sizes = [tree_nbytes(layer) for layer in layers]
    for i, size in enumerate(sizes):
        if size > budget_bytes:
            raise ConfigError(argument="budget_bytes", expected=f"at least layer {i}'s {size} bytes",
                              got=budget_bytes, hint="split the layer, or quantize it.")
    device = device or jax.devices()[0]
    fn = layer_fn if hasattr(layer_fn, "lower") else jax.jit(layer_fn)
    before = {id(a) for a in jax.live_arrays()}
    resident = peak = live_peak = prefetched = 0
    pending: dict[int, concurrent.futures.Future] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        def fetch(i):
            nonlocal resident
            resident += sizes[i]
            pending[i] = pool.submit(place, layers[i], "device", device=device)

        if layers:
            fetch(0)
        for i in range(len(layers)):
            weights = pending.pop(i).result()
            nxt = i + 1
            if prefetch and nxt < len(layers) and resident + sizes[nxt] <= budget_bytes:
                fetch(nxt)
                prefetched += 1
            peak = max(peak, resident)
            x = jax.block_until_ready(fn(weights, x))
            live_peak = max(live_peak, _device_live_bytes(before))
            _free(weights, layers[i])
            del weights
            resident -= sizes[i]
            if nxt < len(layers) and nxt not in pending:
                fetch(nxt)
    if not return_stats:
        return x
    return x, StreamStats(int(budget_bytes), tuple(sizes), peak, live_peak, prefetched)


# --------------------------------------------------------------------------------------------------
# Rematerialisation over a stack of layers
# --------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class NoCheckpoint:
    """Save every activation for the backward pass (no recomputation)."""


@flax.struct.dataclass
class EveryN:
    """Checkpoint segments of ``n`` layers: only each segment's input is saved, its layers recomputed.

    ``EveryN(1)`` checkpoints every layer; ``n`` near the square root of the depth is the classic
    sqrt(L) schedule (Chen et al., 2016). When ``n`` does not divide the depth, the last layers form a
    shorter segment, checkpointed outside the scan (on CPU, XLA may merge that one back into the
    forward pass: its saving can be lost).
    """

    n: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class LargeLayersOnly:
    """Checkpoint (one by one) the layers whose activations exceed ``threshold`` bytes.

    A layer's activations are measured by :func:`layer_activation_bytes`.
    """

    threshold: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class Adaptive:
    """Choose the segment length of each stage from its measured activation and input bytes.

    A stage of ``L`` layers, each creating ``a`` bytes of activations from an input of ``s`` bytes,
    keeps about ``L*a`` bytes without checkpoints and about ``ceil(L/n)*s + n*a`` with segments of
    ``n``; Adaptive takes the ``n`` that minimises it. With ``budget_bytes``, stages are left
    unchecked (no recomputation) as long as the estimate stays within the budget, largest stages
    checkpointed first. Every checkpointed stage recomputes its forward pass once, whatever ``n``.
    """

    budget_bytes: int | None = flax.struct.field(pytree_node=False, default=None)


def _jaxpr_bytes(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        subs = [p for p in eqn.params.values() if hasattr(p, "eqns") or hasattr(p, "jaxpr")]
        if subs:
            total += sum(_jaxpr_bytes(getattr(s, "jaxpr", s)) for s in subs)
            continue
        for v in eqn.outvars:
            aval = v.aval
            if hasattr(aval, "shape") and hasattr(aval, "dtype"):
                total += math.prod(aval.shape) * np.dtype(aval.dtype).itemsize
    return total


def layer_activation_bytes(layer_fn: Callable[[Any, Any], Any], layer_params: Any, x: Any) -> int:
    """Bytes of every value one layer creates (one pass over its jaxpr): what it could save for grad.

    Args:
        layer_fn: ``layer_fn(params, x) -> x``.
        layer_params: one layer's parameters (arrays or ``jax.ShapeDtypeStruct`` s).
        x: the layer's input (arrays or ``jax.ShapeDtypeStruct`` s).

    Returns:
        The sum of the bytes of the outputs of every equation of ``layer_fn``'s jaxpr (entering nested
        jaxprs such as ``jit`` calls; a loop body counts once).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> w, x = jax.ShapeDtypeStruct((4, 8), jnp.float32), jax.ShapeDtypeStruct((2, 4), jnp.float32)
        >>> layer_activation_bytes(lambda w, x: jnp.tanh(x @ w), w, x)  # x @ w and tanh: 2 * 2*8*4
        128
    """
    return _jaxpr_bytes(jax.make_jaxpr(layer_fn)(layer_params, x).jaxpr)


def _stages(layer_fn, layers) -> tuple[list, list]:
    if isinstance(layers, (list, tuple)):
        fns = list(layer_fn) if isinstance(layer_fn, (list, tuple)) else [layer_fn] * len(layers)
        if len(fns) != len(layers):
            raise ConfigError(argument="layer_fn", expected=f"{len(layers)} functions, one per stage",
                              got=len(fns))
        return fns, list(layers)
    return [layer_fn], [layers]


def _depth(stacked: Any) -> int:
    leaves = jax.tree_util.tree_leaves(stacked)
    if not leaves or any(np.ndim(a) == 0 for a in leaves):
        raise ConfigError(argument="layers", expected="stacked parameters (a leading layer axis on every leaf)",
                          got="a leaf without one" if leaves else "no leaves")
    depths = {a.shape[0] for a in leaves}
    if len(depths) != 1:
        raise ConfigError(argument="layers", expected="one depth on every leaf", got=sorted(depths))
    return depths.pop()


def _one_layer(stacked: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), stacked)


def _spec(x: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), x)


def checkpoint_plan(layer_fn: Any, layers: Any, x: Any, strategy: Any) -> tuple[int, ...]:
    """The segment length a strategy gives each stage (0: no checkpoint), decided at trace time.

    Args:
        layer_fn: ``layer_fn(params, x) -> x``, or one such function per stage.
        layers: stacked parameters (every leaf with a leading layer axis), or a list of them (stages).
        x: the input (arrays or ``jax.ShapeDtypeStruct`` s).
        strategy: :class:`NoCheckpoint`, :class:`EveryN`, :class:`LargeLayersOnly` or :class:`Adaptive`.

    Returns:
        One segment length per stage.

    Raises:
        ConfigError: an unknown strategy, ``n < 1``, a negative threshold or budget, or layers that
            are not stacked.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> f = lambda w, x: jnp.tanh(x @ w)
        >>> small, big = jnp.zeros((3, 4, 4)), jnp.zeros((2, 4, 4))
        >>> x = jnp.zeros((2, 4))
        >>> checkpoint_plan(f, [small, big], x, EveryN(2)), checkpoint_plan(f, [small], x, NoCheckpoint())
        ((2, 2), (0,))
    """
    fns, stacks = _stages(layer_fn, layers)
    depths = [_depth(s) for s in stacks]
    if isinstance(strategy, NoCheckpoint):
        return (0,) * len(stacks)
    if isinstance(strategy, EveryN):
        if isinstance(strategy.n, bool) or not isinstance(strategy.n, (int, np.integer)) or strategy.n < 1:
            raise ConfigError(argument="n", expected="an integer >= 1", got=strategy.n)
        return (int(strategy.n),) * len(stacks)
    if not isinstance(strategy, (LargeLayersOnly, Adaptive)):
        raise ConfigError(argument="strategy", expected="NoCheckpoint, EveryN, LargeLayersOnly or Adaptive",
                          got=type(strategy).__name__)
    acts, ins, h = [], [], _spec(x)
    for fn, stack in zip(fns, stacks):
        one = _one_layer(stack)
        acts.append(layer_activation_bytes(fn, one, h))
        ins.append(tree_nbytes(h))
        h = jax.eval_shape(fn, one, h)
    if isinstance(strategy, LargeLayersOnly):
        _check_bytes("threshold", strategy.threshold)
        return tuple(1 if a > strategy.threshold else 0 for a in acts)
    _check_bytes("budget_bytes", strategy.budget_bytes, allow_none=True)
    best = []
    for L, a, s in zip(depths, acts, ins):
        estimates = {n: math.ceil(L / n) * s + n * a for n in range(1, L + 1)}
        best.append(min(estimates, key=lambda n: (estimates[n], n)))
    if strategy.budget_bytes is None:
        return tuple(best)
    plan_ = [0] * len(stacks)
    keep = [L * a for L, a in zip(depths, acts)]
    cost = {i: keep[i] for i in range(len(stacks))}
    for i in sorted(range(len(stacks)), key=lambda i: (-keep[i], i)):
        if sum(cost.values()) <= strategy.budget_bytes:
            break
        plan_[i] = best[i]
        cost[i] = math.ceil(depths[i] / best[i]) * ins[i] + best[i] * acts[i]
    return tuple(plan_)


def _run_stage(fn: Callable, stacked: Any, x: Any, n: int) -> Any:
    def body(h, p):
        return fn(p, h), None

    if n == 0:
        return jax.lax.scan(body, x, stacked)[0]
    if n == 1:
        return jax.lax.scan(jax.checkpoint(body), x, stacked)[0]
    L = _depth(stacked)
    groups, rest = divmod(L, n)

    def segment(h, ps):
        return jax.lax.scan(body, h, ps)[0], None

    if groups:
        head = jax.tree_util.tree_map(lambda a: a[: groups * n].reshape((groups, n) + a.shape[1:]), stacked)
        x = jax.lax.scan(jax.checkpoint(segment), x, head)[0]
    if rest:
        tail = jax.tree_util.tree_map(lambda a: a[groups * n:], stacked)
        x = jax.checkpoint(segment)(x, tail)[0]
    return x


def apply_layers(layer_fn: Any, layers: Any, x: Any, *, strategy: Any = NoCheckpoint()) -> Any:
    """Runs ``x`` through a stack of layers (``lax.scan``), checkpointed as a strategy says.

    Checkpointed segments are ``jax.checkpoint`` ed bodies of the scan: their activations are
    recomputed in the backward pass instead of being saved. (Inside a scan the recomputation cannot
    be merged back into the forward pass by the compiler, which happens on CPU to a checkpoint in
    straight-line code.)

    Args:
        layer_fn: ``layer_fn(params, x) -> x``, or one such function per stage.
        layers: stacked parameters (a leading layer axis on every leaf), or a list of them (stages).
        x: the input.
        strategy: a rematerialisation strategy (see :func:`checkpoint_plan`).

    Returns:
        The output of the last layer: the same values whatever the strategy.

    Raises:
        ConfigError: as :func:`checkpoint_plan`.

    Example:
        >>> import jax.numpy as jnp
        >>> ws = jnp.stack([jnp.eye(2) * 2, jnp.eye(2) * 3])
        >>> apply_layers(lambda w, x: x @ w, ws, jnp.ones((1, 2)), strategy=EveryN(1)).tolist()
        [[6.0, 6.0]]
    """
    fns, stacks = _stages(layer_fn, layers)
    for fn, stack, n in zip(fns, stacks, checkpoint_plan(layer_fn, layers, x, strategy)):
        x = _run_stage(fn, stack, x, n)
    return x


@flax.struct.dataclass
class CheckpointSavings:
    """Compiled memory of a gradient with and without a strategy.

    Attributes:
        baseline: :func:`compiled_memory` of the gradient with :class:`NoCheckpoint`.
        checkpointed: the same with the strategy.
        saved_bytes: ``baseline.temp_bytes - checkpointed.temp_bytes`` (temporaries at the peak).
        saved_fraction: ``saved_bytes / baseline.temp_bytes``.
        extra_flops: FLOPs the recomputation adds, from XLA's cost analysis.
        plan: the segment length of each stage.
    """

    baseline: CompiledMemory
    checkpointed: CompiledMemory
    saved_bytes: int = flax.struct.field(pytree_node=False)
    saved_fraction: float = flax.struct.field(pytree_node=False)
    extra_flops: float = flax.struct.field(pytree_node=False)
    plan: tuple[int, ...] = flax.struct.field(pytree_node=False)


def _default_loss(y: Any) -> jax.Array:
    return sum(jnp.sum(jnp.square(a.astype(jnp.float32))) for a in jax.tree_util.tree_leaves(y))


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def checkpoint_savings(layer_fn: Any, layers: Any, x: Any, strategy: Any, *,
                       loss: Callable[[Any], jax.Array] | None = None) -> CheckpointSavings:
    """Measures what a strategy saves: XLA's compiled memory of the gradient, with and without it.

    The gradient of ``loss(apply_layers(layer_fn, layers, x, strategy=...))`` with respect to the
    layers and ``x`` is compiled twice (nothing runs: ``jax.ShapeDtypeStruct`` inputs are enough).

    Args:
        layer_fn: ``layer_fn(params, x) -> x``, or one per stage.
        layers: stacked parameters, or a list of them (stages).
        x: the input.
        strategy: the rematerialisation strategy to measure.
        loss: a scalar function of the output (default: the sum of squares, in float32).

    Returns:
        A :class:`CheckpointSavings`.

    Raises:
        ConfigError: as :func:`checkpoint_plan`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> ws = jax.ShapeDtypeStruct((8, 64, 256), jnp.float32)
        >>> x = jax.ShapeDtypeStruct((512, 64), jnp.float32)
        >>> f = lambda w, x: x + jnp.tanh(x @ w) @ w.T
        >>> s = checkpoint_savings(f, ws, x, EveryN(1))
        >>> s.saved_bytes > 0, s.checkpointed.temp_bytes < s.baseline.temp_bytes
        (True, True)
    """
    loss = loss or _default_loss

    def compile_grad(strat):
        g = jax.jit(jax.grad(lambda ls, h: loss(apply_layers(layer_fn, ls, h, strategy=strat)), argnums=(0, 1)))
        compiled = g.lower(layers, x).compile()
        return compiled

    base_c, ck_c = compile_grad(NoCheckpoint()), compile_grad(strategy)
    base = _memory_of(base_c)
    ck = _memory_of(ck_c)
    saved = base.temp_bytes - ck.temp_bytes
    return CheckpointSavings(
        baseline=base, checkpointed=ck, saved_bytes=saved,
        saved_fraction=saved / base.temp_bytes if base.temp_bytes else 0.0,
        extra_flops=_flops(ck_c) - _flops(base_c),
        plan=checkpoint_plan(layer_fn, layers, x, strategy),
    )


def _memory_of(compiled) -> CompiledMemory:
    analysis = compiled.memory_analysis()
    return CompiledMemory(
        argument_bytes=int(analysis.argument_size_in_bytes),
        output_bytes=int(analysis.output_size_in_bytes),
        temp_bytes=int(analysis.temp_size_in_bytes),
        alias_bytes=int(analysis.alias_size_in_bytes),
        generated_code_bytes=int(analysis.generated_code_size_in_bytes),
    )
