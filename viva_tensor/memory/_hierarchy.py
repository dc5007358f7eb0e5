"""The memory hierarchy of the actual machine (private to ``viva_tensor.memory``): device, host, disk.

Capacities come from the runtime (``memory_stats()``), the physical RAM and the free disk space,
each with its source; explicit capacities win.
"""

from __future__ import annotations

import os
import shutil

import flax.struct
import jax
import numpy as np

from viva_tensor.errors import ConfigError
from viva_tensor.memory._tiers import TIERS

__all__ = ["TierInfo", "MemoryHierarchy", "create_memory_hierarchy"]


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
        ConfigError: a capacity that is not a positive integer, a ``disk_path`` that is not a path or cannot be
            read, or an accelerator without memory statistics and no explicit ``device_bytes``.

    Example:
        >>> h = create_memory_hierarchy(device_bytes=2**30)
        >>> [t.name for t in h.tiers], h.capacity("device"), h.tiers[0].source
        (['device', 'host', 'disk'], 1073741824, 'explicit')
    """
    device = device or jax.devices()[0]
    for name, value in (("device_bytes", device_bytes), ("host_bytes", host_bytes), ("disk_bytes", disk_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0):
            raise ConfigError(argument=name, expected="a positive integer number of bytes", got=repr(value))
    if not isinstance(disk_path, (str, os.PathLike)):
        raise ConfigError(argument="disk_path", expected="a path (str or os.PathLike)", got=type(disk_path).__name__)
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
    try:
        usage = shutil.disk_usage(os.fspath(disk_path))
    except OSError as e:
        raise ConfigError(argument="disk_path", expected="an existing, readable path", got=f"{disk_path!r} ({e})",
                          hint="pass disk_bytes= to give the capacity without asking the file system.") from None
    disk = (TierInfo("disk", int(disk_bytes), None, "explicit") if disk_bytes is not None
            else TierInfo("disk", int(usage.free), int(usage.used), "free disk space (shutil.disk_usage)"))
    kinds = tuple(m.kind for m in device.addressable_memories())
    return MemoryHierarchy(str(device), device.platform, kinds, (dev, host, disk))

