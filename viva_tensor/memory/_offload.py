"""Offloading policies (private to ``viva_tensor.memory``): where each unit of a parameter tree lives.

:func:`plan` decides, deterministically, the tier of each unit (an array, or a quantized record whole)
under a policy; :func:`offload` moves the units there.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import flax.struct
import jax

from viva_tensor._pytree import pytree_dataclass
from viva_tensor.errors import ConfigError
from viva_tensor.memory._hierarchy import MemoryHierarchy
from viva_tensor.memory._tiers import _check_bytes, _flatten_units, _is_unit, place, tree_nbytes

__all__ = ["KeepOnDevice", "OffloadToHost", "OffloadToDisk", "SmartOffload", "plan", "offload"]


@pytree_dataclass
class KeepOnDevice:
    """Every leaf on the device (Gleam ``KeepOnGpu``)."""


@pytree_dataclass
class OffloadToHost:
    """Leaves larger than ``threshold`` bytes go to host memory, the others stay on the device.

    Attributes:
        threshold: bytes; a unit strictly larger goes to ``kind``.
        kind: the host memory kind, ``"pinned_host"`` (default: fast transfers) or ``"unpinned_host"``.
    """

    threshold: int = flax.struct.field(pytree_node=False)
    kind: str = flax.struct.field(pytree_node=False, default="pinned_host")


@pytree_dataclass
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


@pytree_dataclass
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
        trace: the accesses, as dotted paths of units (``"layers.0.w"``, as :func:`plan` names them).
        kind: the host memory kind.
    """

    device_budget: int = flax.struct.field(pytree_node=False)
    host_budget: int | None = flax.struct.field(pytree_node=False, default=None)
    path: str | None = flax.struct.field(pytree_node=False, default=None)
    trace: tuple[str, ...] | None = flax.struct.field(pytree_node=False, default=None)
    kind: str = flax.struct.field(pytree_node=False, default="pinned_host")


def _units_with_sizes(tree: Any) -> list[tuple[str, int]]:
    paths, units, _ = _flatten_units(tree, _is_unit)
    return [(p, tree_nbytes(unit)) for p, unit in zip(paths, units, strict=False)]


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
        A dict from each unit's dotted path (``"layers.0.w"``, see ``viva_tensor._paths.path_str``) to its
        tier, in flattening order.
        The same tree and policy always give the same plan.

    Raises:
        ConfigError: an unknown policy, a negative threshold or budget, a trace naming no unit, units
            that must go to disk with no path, a plan that overflows the hierarchy, or two units whose
            dotted paths are the same.

    Example:
        >>> import jax.numpy as jnp
        >>> tree = {"big": jnp.ones((256, 256)), "small": jnp.ones(8)}
        >>> plan(tree, OffloadToHost(threshold=1024))
        {'big': 'pinned_host', 'small': 'device'}
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
    keys, units, treedef = _flatten_units(tree, _is_unit)
    disk_idx = [i for i, k in enumerate(keys) if where[k] == "disk"]
    if disk_idx:
        written = place({keys[i]: units[i] for i in disk_idx}, "disk", path=policy.path)
        for i in disk_idx:
            units[i] = written[keys[i]]
    for i, k in enumerate(keys):
        if where[k] != "disk":
            units[i] = place(units[i], where[k], device=device)
    return jax.tree_util.tree_unflatten(treedef, units)

