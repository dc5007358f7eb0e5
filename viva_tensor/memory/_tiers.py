"""Tiers (private to ``viva_tensor.memory``): JAX memory kinds and safetensors files on disk.

:func:`place` moves a pytree between JAX's memory kinds (``device``, ``pinned_host``,
``unpinned_host``) and a safetensors file; a leaf placed on disk becomes a :class:`DiskArray` handle,
which :func:`load` reads back bit for bit. A quantized record is one unit: it moves whole.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from viva_tensor._paths import path_str
from viva_tensor._record import is_quantized
from viva_tensor.errors import CheckpointError, ConfigError, InvalidOp

__all__ = ["TIERS", "DiskArray", "place", "load", "tier_of", "tree_nbytes"]

TIERS: tuple[str, ...] = ("device", "pinned_host", "unpinned_host", "disk")
"""Where data can live, fastest first: JAX's three memory kinds, then a safetensors file."""

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
        key: the tensor's name in the file: the leaf's dotted path in the tree (``"layers.0.w"``, see
            ``viva_tensor._paths.path_str``).
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
    for (kp, _), p in zip(flat, paths):
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
        ConfigError: an unknown tier, a memory kind the device lacks, ``"disk"`` without a path, or (for
            the disk tier, whose tensor names are the leaves' dotted paths) two leaves with the same path.
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
    for p, unit in zip(paths, units):
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
    """Writes the leaves of ``tree`` into one safetensors file, one leaf at a time."""
    path = os.path.abspath(path)
    keys, flat, treedef = _flatten_units(tree, _is_handle)
    leaves = [_read(x) if isinstance(x, DiskArray) else x for x in flat]  # before overwriting
    header, meta, handles, offset = {}, {"format": "viva_tensor.memory"}, [], 0
    for key, leaf in zip(keys, leaves):
        if isinstance(leaf, jax.core.Tracer) or not isinstance(leaf, (jax.Array, np.ndarray)):
            raise InvalidOp(argument="tree", expected="concrete arrays", got=type(leaf).__name__)
        name = np.dtype(leaf.dtype).name
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

