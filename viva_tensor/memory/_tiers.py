"""Tiers (private to ``viva_tensor.memory``): JAX memory kinds and safetensors files on disk.

:func:`place` moves a pytree between JAX's memory kinds (``device``, ``pinned_host``,
``unpinned_host``) and a safetensors file; a leaf placed on disk becomes a :class:`DiskArray` handle,
which :func:`load` reads back bit for bit. A quantized record is one unit: it moves whole.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import numpy as np

from viva_tensor import _safetensors
from viva_tensor._formats.registry import is_quantized
from viva_tensor._paths import path_str
from viva_tensor.errors import CheckpointError, ConfigError, InvalidOp

__all__ = ["TIERS", "DiskArray", "place", "load", "tier_of", "tree_nbytes"]

TIERS: tuple[str, ...] = ("device", "pinned_host", "unpinned_host", "disk")
"""Where data can live, fastest first: JAX's three memory kinds, then a safetensors file."""

_ROOT = "array"  # the file's name for the tensor of a tree that is one array (its dotted path is "")


@flax.struct.dataclass
class DiskArray:
    """A handle to one array stored in a safetensors file: what :func:`place` leaves for the disk tier.

    It holds no data (no pytree children): ``jax.tree_util.tree_leaves`` of a tree placed on disk is
    empty. :func:`load` (or :func:`place` to a memory kind) reads it back, bit for bit, through the
    library's one safetensors reader (``viva_tensor._safetensors``): the file's structure and its digest
    over header and metadata are checked, the tensor's dtype and shape must be the handle's, and its bytes
    must match the SHA-256 that the handle remembers (the one written with them). So a flipped byte, an
    edited header, a file re-placed with another tree since the handle was made, or a handle edited to
    read the bytes as another dtype or shape, is refused with :class:`~viva_tensor.errors.CheckpointError`.

    A handle may also be made by hand for a file written elsewhere (``sha256=None``): its dtype and
    shape must then be the file's, and only the structure of the file is checked.

    Attributes:
        path: the absolute path of the file.
        key: the tensor's name in the file: the leaf's dotted path in the tree (``"layers.0.w"``, see
            ``viva_tensor._paths.path_str``; ``"array"`` for a tree that is a single array).
        shape: the array's shape.
        dtype: the array's dtype name (``"bfloat16"``, ``"float4_e2m1fn"`` ...).
        sha256: the SHA-256 (hex) of the tensor's bytes, as written; ``None`` for a hand-made handle.
    """

    path: str = flax.struct.field(pytree_node=False)
    key: str = flax.struct.field(pytree_node=False)
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
    dtype: str = flax.struct.field(pytree_node=False)
    sha256: str | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def nbytes(self) -> int:
        """Bytes the array takes once loaded."""
        _check_handle(self)
        return math.prod(self.shape) * _safetensors.np_dtype(self.dtype).itemsize


def _check_handle(h: DiskArray) -> None:
    """The fields of a handle have the types they claim (a hand-made or edited one may not)."""
    for name in ("path", "key"):
        if not isinstance(getattr(h, name), str):
            raise CheckpointError(argument=name, expected="a str", got=type(getattr(h, name)).__name__)
    if not (isinstance(h.shape, tuple)
            and all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in h.shape)):
        raise CheckpointError(argument="shape", expected="a tuple of non-negative ints", got=repr(h.shape))
    if h.sha256 is not None and not isinstance(h.sha256, str):
        raise CheckpointError(argument="sha256", expected="a hex str or None", got=type(h.sha256).__name__)
    _safetensors.np_dtype(h.dtype)


def _is_unit(x: Any) -> bool:
    return isinstance(x, DiskArray) or is_quantized(x)


def _is_handle(x: Any) -> bool:
    return isinstance(x, DiskArray)


def _leaf_nbytes(leaf: Any) -> int:
    if isinstance(leaf, DiskArray):
        return leaf.nbytes
    if not (hasattr(leaf, "dtype") and hasattr(leaf, "shape")):
        raise InvalidOp(argument="tree", expected="leaves that are arrays, records, disk handles or ShapeDtypeStructs",
                        got=type(leaf).__name__)
    return int(np.dtype(leaf.dtype).itemsize * math.prod(leaf.shape))


def tree_nbytes(tree: Any) -> int:
    """Bytes of every array of a pytree, wherever it lives (disk handles count what they would load).

    Args:
        tree: any pytree of arrays, quantized records, :class:`DiskArray` handles or
            ``jax.ShapeDtypeStruct`` s.

    Returns:
        The sum of the leaves' bytes.

    Raises:
        InvalidOp: a leaf that is not an array (a string, an arbitrary object).

    Example:
        >>> import jax.numpy as jnp
        >>> tree_nbytes({"w": jnp.ones((4, 4)), "b": jnp.ones(4, jnp.bfloat16)})
        72
    """
    return sum(_leaf_nbytes(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=_is_handle))



def _check_bytes(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ConfigError(argument=name, expected="a number of bytes >= 0", got=value)



def _flatten_units(tree: Any, is_leaf: Callable[[Any], bool]) -> tuple[list[str], list[Any], Any]:
    """The dotted paths (``"layers.0.w"``) and units of a tree, and its treedef; two units may not share a path."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    paths = [path_str(kp) for kp, _ in flat]
    seen: dict[str, Any] = {}
    for (kp, _), p in zip(flat, paths, strict=False):
        if p in seen:
            raise ConfigError(argument="tree", expected="leaves with distinct dotted paths",
                              got=f"{jax.tree_util.keystr(seen[p])} and {jax.tree_util.keystr(kp)} both named {p!r}",
                              hint="rename a key that contains a dot.")
        seen[p] = kp
    return paths, [u for _, u in flat], treedef


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


def _to_memory(leaf: Any, tier: str, device: jax.Device | None, cache: dict) -> jax.Array:
    if isinstance(leaf, jax.core.Tracer):
        raise InvalidOp(
            argument="tree", expected="concrete arrays", got="a traced value",
            hint="place moves data at run time: call it outside jit.",
        )
    if isinstance(leaf, DiskArray):
        leaf = _read(leaf, cache)
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
        ConfigError: an unknown tier, a memory kind the device lacks, ``"disk"`` without a path, or (for
            the disk tier, whose tensor names are the leaves' dotted paths) two leaves with the same path.
        InvalidOp: a leaf that is not an array, or a call under ``jit``.
        CheckpointError: a file that cannot be written; a disk handle whose file is missing, unreadable,
            damaged or changed since the handle was made, or whose fields do not match its tensor (see
            :class:`DiskArray`).

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
        if path is None or not isinstance(path, (str, os.PathLike)):
            raise ConfigError(argument="path", expected="a file path for the disk tier",
                              got=None if path is None else type(path).__name__)
        return _write(tree, os.fspath(path))
    cache: dict[str, _safetensors.Header] = {}  # each file's header is read (and checked) once per call
    return jax.tree_util.tree_map(lambda x: _to_memory(x, tier, device, cache), tree, is_leaf=_is_handle)


def load(tree: Any, *, tier: str = "device", device: jax.Device | None = None) -> Any:
    """Reads the :class:`DiskArray` handles of a tree back into memory (other leaves are moved too).

    Args:
        tree: a pytree, typically returned by ``place(..., "disk", path=...)``.
        tier: the memory kind to load into.
        device: the device to load onto (default: the first device).

    Returns:
        The tree with arrays in ``tier``, bit-identical to what was written.

    Raises:
        ConfigError: ``tier="disk"`` (use :func:`place`).
        CheckpointError: a missing, unreadable, truncated, malformed or tampered file, a tensor that is not
            in it, bytes that do not match their SHA-256, or a handle that does not match its tensor (a file
            re-placed with another tree since, an edited dtype or shape).

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
        A dict from each unit's dotted path (``"layers.0.w"``) to its tier, in flattening order.

    Raises:
        ConfigError: two units whose paths spell the same (``{"a.b": x, "a": {"b": y}}``).

    Example:
        >>> import jax.numpy as jnp
        >>> tier_of({"a": jnp.ones(2), "b": [place(jnp.ones(2), "pinned_host")]})
        {'a': 'device', 'b.0': 'pinned_host'}
    """
    out = {}
    paths, units, _ = _flatten_units(tree, _is_unit)
    for p, unit in zip(paths, units, strict=False):
        kinds = {_leaf_tier(x) for x in jax.tree_util.tree_leaves(unit, is_leaf=_is_handle)}
        out[p] = kinds.pop() if len(kinds) == 1 else "mixed"
    return out


def _leaf_tier(x: Any) -> str:
    if isinstance(x, DiskArray):
        return "disk"
    if isinstance(x, jax.Array):
        return x.sharding.memory_kind or "device"
    return "numpy"


def _write(tree: Any, path: str) -> Any:
    """Writes the leaves of ``tree`` into one safetensors file (``_safetensors.write``) and returns handles."""
    path = os.path.abspath(path)
    keys, flat, treedef = _flatten_units(tree, _is_handle)
    cache: dict[str, _safetensors.Header] = {}
    leaves = [_read(x, cache) if isinstance(x, DiskArray) else x for x in flat]  # before overwriting
    for leaf in leaves:
        if isinstance(leaf, jax.core.Tracer) or not isinstance(leaf, (jax.Array, np.ndarray)):
            raise InvalidOp(argument="tree", expected="concrete arrays", got=type(leaf).__name__)
    names = [k or _ROOT for k in keys]
    if "__metadata__" in names:
        raise ConfigError(argument="tree", expected="no leaf whose path is '__metadata__'",
                          got="one", hint="safetensors reserves that name for the file's metadata.")
    header = _safetensors.write(path, dict(zip(names, leaves, strict=False)), metadata={"format": "viva_tensor.memory"})
    handles = []
    for name in names:
        info = header.tensors[name]
        handles.append(DiskArray(path=header.path, key=name, shape=info.shape, dtype=info.dtype.name,
                                 sha256=info.sha256))
    return jax.tree_util.tree_unflatten(treedef, handles)


def _mismatch(handle: DiskArray, info: _safetensors.TensorInfo) -> str:
    return (f"{info.dtype.name}{list(info.shape)} in the file, the handle says "
            f"{handle.dtype}{list(handle.shape)}")


def _read(handle: DiskArray, cache: dict[str, _safetensors.Header] | None = None) -> np.ndarray:
    """Reads one array from its file, bit for bit, after checking it is the one the handle points to."""
    _check_handle(handle)
    cache = {} if cache is None else cache
    if handle.path not in cache:
        cache[handle.path] = _safetensors.read_header(handle.path)
    header = cache[handle.path]
    info = header.tensors.get(handle.key)
    if info is None:
        raise CheckpointError(argument="key", expected=f"a tensor of {handle.path!r} ({sorted(header.tensors)})",
                              got=repr(handle.key))
    same = info.dtype == _safetensors.np_dtype(handle.dtype) and info.shape == tuple(int(d) for d in handle.shape)
    if handle.sha256 is not None and info.sha256 != handle.sha256:
        raise CheckpointError(
            argument="path", expected=f"the file the handle of {handle.key!r} was made from "
                                      f"(that tensor with SHA-256 {handle.sha256[:12]}...)",
            got=f"{handle.path!r}, rewritten since: its {handle.key!r} is "
                f"{'another array' if same else _mismatch(handle, info)}"
                f"{'' if info.sha256 is None else f' (SHA-256 {info.sha256[:12]}...)'}",
            hint="place the tree on disk again, or keep each tree in its own file.")
    if not same:
        field = "dtype" if info.dtype != _safetensors.np_dtype(handle.dtype) else "shape"
        raise CheckpointError(argument=field, expected=f"the {field} of tensor {handle.key!r} of {handle.path!r}",
                              got=_mismatch(handle, info), hint="a handle cannot reinterpret a tensor's bytes.")
    return _safetensors.read_tensor(header, handle.key)
