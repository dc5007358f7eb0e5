"""Checkpoints: :func:`save` and :func:`load` of trees of arrays and quantized records (safetensors).

Files are read and written through the library's one safetensors module (:mod:`viva_tensor._safetensors`:
header validation, dtype map, a digest over the header and a SHA-256 per tensor). Never pickle: loading an
untrusted file runs no code. The tree, each record's format name, class path
and static fields, and a SHA-256 of every tensor live in the header's ``__metadata__``; a truncated,
foreign or tampered file raises :class:`~viva_tensor.errors.CheckpointError`. Records are rebuilt by
their FORMAT NAME (the class path is stored for information only), so old files keep loading after a
record class moves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from viva_tensor import _safetensors
from viva_tensor._formats.registry import FORMATS, FormatSpec, format_names, format_spec, is_quantized, spec_of
from viva_tensor._formats.registry import expected_record as _expected_record
from viva_tensor.errors import CheckpointError
from viva_tensor.rotation import Rotation

__all__ = ["save", "load"]

_META_KEY = "viva_tensor"
_VERSION = 1


def _np_dtype(name: str) -> np.dtype:
    try:
        return _safetensors.np_dtype(name)
    except CheckpointError:
        raise CheckpointError(f"unknown dtype {name!r} in the checkpoint's metadata") from None


def _contiguous(a: np.ndarray) -> np.ndarray:
    return a if a.flags.c_contiguous else a.copy(order="C")  # (np.ascontiguousarray makes 0-d 1-d)


def _raw_bytes(a: np.ndarray) -> bytes:
    return _contiguous(a).reshape(-1).view(np.uint8).tobytes()


def _encode_static(v: Any) -> Any:
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    if isinstance(v, (tuple, list)):
        return {"tuple" if isinstance(v, tuple) else "list": [_encode_static(e) for e in v]}
    try:
        return {"dtype": np.dtype(v).name}
    except TypeError:
        raise CheckpointError(
            f"cannot store the static field value {v!r} ({type(v).__name__}) in a checkpoint"
        ) from None


def _decode_static(v: Any, where: str) -> Any:
    if v is None or isinstance(v, (bool, str, int, float)):
        return v
    if isinstance(v, dict) and len(v) == 1:
        (kind, body), = v.items()
        if kind in ("tuple", "list") and isinstance(body, list):
            items = [_decode_static(e, where) for e in body]
            return tuple(items) if kind == "tuple" else items
        if kind == "dtype" and isinstance(body, str):
            return jnp.dtype(_np_dtype(body))
    raise CheckpointError(f"malformed static field {v!r} of the record at '{where}'")


class _Writer:
    def __init__(self):
        self.tensors: dict[str, np.ndarray] = {}
        self.info: dict[str, dict] = {}

    def add(self, name: str, x: Any) -> str:
        if name in self.tensors:
            raise CheckpointError(f"two leaves of the tree map to the tensor name {name!r}")
        if isinstance(x, jax.core.Tracer):
            raise CheckpointError(
                argument="tree", expected="concrete arrays (quant.save writes a file: call it outside jit)",
                got=f"a traced array at '{name}' (inside jit, vmap or grad)",
                hint="return the tree from the jitted function and save it outside.",
            )
        a = _contiguous(np.asarray(jax.device_get(x)))
        self.tensors[name] = a
        digest = hashlib.sha256(_raw_bytes(a)).hexdigest()
        self.info[name] = {"dtype": a.dtype.name, "shape": list(a.shape), "sha256": digest}
        return name


def _encode_node(node: Any, path: str, w: _Writer) -> dict:
    if node is None:
        return {"none": None}
    if is_quantized(node):
        spec = spec_of(node, path or "tree")
        cls = type(node)
        static, children = {}, {}
        for f in dataclasses.fields(cls):
            v = getattr(node, f.name)
            if f.metadata.get("pytree_node", True) and is_quantized(v):  # a record inside a record
                children[f.name] = _encode_node(v, f"{path}:{f.name}", w)
            elif f.metadata.get("pytree_node", True):
                children[f.name] = None if v is None else w.add(f"{path}:{f.name}", v)
            else:
                static[f.name] = _encode_static(v)
        rec = {"format": spec.name, "class": f"{cls.__module__}.{cls.__qualname__}"}
        return {"record": {**rec, "static": static, "children": children}}
    if isinstance(node, Rotation):  # a rotated QLinear's input rotation: its packed signs and block
        return {"rotation": {"packed": w.add(f"{path}:packed", node.packed), "block": int(node.block)}}
    if isinstance(node, dict) or (hasattr(node, "items") and hasattr(node, "keys") and not hasattr(node, "shape")):
        items = []
        for k, v in node.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise CheckpointError(f"dict keys must be str or int to be saved, got {k!r} at '{path}'")
            items.append([k, _encode_node(v, f"{path}.{k}" if path else str(k), w)])
        return {"dict": items}
    if isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
        kind = "tuple" if isinstance(node, tuple) else "list"
        return {kind: [_encode_node(v, f"{path}.{i}" if path else str(i), w) for i, v in enumerate(node)]}
    if isinstance(node, (bool, int, float, str)):
        return {"scalar": node}
    if isinstance(node, (jax.Array, np.ndarray, np.generic)):
        return {"array": w.add(path or "array", node)}
    raise CheckpointError(
        f"cannot save a leaf of type {type(node).__name__} at '{path}'",
        hint="save arrays, quantized records, Python scalars and None inside dicts, lists and tuples "
        "(for an nnx model, nnx.to_pure_dict(nnx.state(model))).",
    )


def save(path: str | os.PathLike, tree: Any) -> None:
    """Write a tree of arrays and quantized records to a safetensors file.

    Each plain array is stored under its key path (``"encoder.layer.0.bias"``), each buffer of a
    record under ``"<path>:<field>"``, all bit for bit in their own dtype (bfloat16 natively; FP8 and
    FP4 dtypes as their raw bits). The header's ``__metadata__`` holds, as JSON, the tree structure,
    every record's format, class and static fields, and every tensor's dtype, shape and SHA-256.

    Args:
        path: the file to write (overwritten).
        tree: nested dicts (str or int keys), lists and tuples of arrays, quantized records, Python
            scalars and ``None``.

    Raises:
        CheckpointError: a leaf that cannot be saved, two leaves with the same tensor name, or a file
            that cannot be written.

    Example:
        >>> import os, tempfile, jax.numpy as jnp
        >>> from viva_tensor import quant
        >>> f = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> quant.save(f, {"w": quant.quantize(jnp.ones((32, 32)), "q8_0"), "b": jnp.zeros(3)})
        >>> round(float(quant.dequantize(quant.load(f)["w"])[0, 0]), 3)
        1.0
    """
    w = _Writer()
    tree_json = _encode_node(tree, "", w)
    meta = {"version": _VERSION, "tree": tree_json, "tensors": w.info}
    _safetensors.write(path, w.tensors, metadata={_META_KEY: json.dumps(meta, separators=(",", ":"))})


def _check_tensors(path: str, arrays: dict[str, np.ndarray], info: Any, verify: bool) -> dict[str, np.ndarray]:
    if not isinstance(info, dict):
        raise CheckpointError(f"{path!r}: malformed metadata (no tensor table)")
    missing, extra = sorted(set(info) - set(arrays)), sorted(set(arrays) - set(info))
    if missing or extra:
        raise CheckpointError(
            f"{path!r} does not match its metadata: missing tensors {missing[:5]}, unexpected tensors {extra[:5]}"
        )
    out = {}
    for name, meta in info.items():
        if not isinstance(meta, dict) or not {"dtype", "shape", "sha256"} <= set(meta):
            raise CheckpointError(f"{path!r}: malformed metadata for tensor {name!r}")
        stored = arrays[name]
        dt = _np_dtype(meta["dtype"])
        # Files written before the shared safetensors module stored FP8/FP4 dtypes as raw unsigned bits.
        raw_bits = stored.dtype == np.dtype(f"uint{8 * dt.itemsize}") and dt.kind not in "biu"
        if (stored.dtype != dt and not raw_bits) or list(stored.shape) != list(meta["shape"]):
            raise CheckpointError(
                f"{path!r}: tensor {name!r} is {stored.dtype.name}{list(stored.shape)}, "
                f"its metadata says {meta['dtype']}{list(meta['shape'])}"
            )
        stored = _contiguous(stored)
        if verify and hashlib.sha256(_raw_bytes(stored)).hexdigest() != meta["sha256"]:
            raise CheckpointError(f"{path!r}: the bytes of tensor {name!r} do not match their SHA-256 (corrupted?)")
        out[name] = stored if stored.dtype == dt else stored.view(dt)
    return out


def _check_record(path: str, where: str, spec: FormatSpec, rec: Any) -> None:
    bad = f"{path!r}: the {spec.name} record at '{where}' is inconsistent"
    try:
        expected = _expected_record(spec, rec)
    except Exception as e:  # noqa: BLE001 - any failure here means the metadata is not a valid record
        raise CheckpointError(f"{bad}: its static fields are not valid for the format ({e})") from None
    got_l, got_t = jax.tree_util.tree_flatten(rec)
    exp_l, exp_t = jax.tree_util.tree_flatten(expected)
    if got_t != exp_t:
        raise CheckpointError(f"{bad}: its fields differ from what the format produces")
    batch = None
    for g, e in zip(got_l, exp_l, strict=True):
        nb = g.ndim - len(e.shape)
        if nb < 0 or tuple(g.shape[nb:]) != tuple(e.shape) or np.dtype(g.dtype) != np.dtype(e.dtype):
            raise CheckpointError(f"{bad}: a buffer is {g.dtype}{tuple(g.shape)}, expected {e.dtype}{tuple(e.shape)}")
        if batch is None:
            batch = tuple(g.shape[:nb])
        elif tuple(g.shape[:nb]) != batch:
            raise CheckpointError(f"{bad}: its buffers disagree on the batch dims")


def _to_jax(a: np.ndarray) -> Any:
    """A jax.Array, unless JAX would change the dtype (int64/float64 without x64): then NumPy, exact."""
    if jax.dtypes.canonicalize_dtype(a.dtype) != a.dtype:
        return a
    return jnp.asarray(a)


def _decode_node(node: Any, where: str, arrays: dict[str, np.ndarray], path: str, used: set) -> Any:
    def tensor(name: Any) -> jax.Array:
        if not isinstance(name, str) or name not in arrays:
            raise CheckpointError(f"{path!r}: metadata refers to a missing tensor {name!r} at '{where}'")
        used.add(name)
        return _to_jax(arrays[name])

    if not isinstance(node, dict) or len(node) != 1:
        raise CheckpointError(f"{path!r}: malformed tree metadata at '{where}'")
    (kind, body), = node.items()
    sub = lambda k: f"{where}.{k}" if where else str(k)  # noqa: E731
    if kind == "none":
        return None
    if kind == "scalar" and isinstance(body, (bool, int, float, str)):
        return body
    if kind == "array":
        return tensor(body)
    if kind in ("list", "tuple") and isinstance(body, list):
        items = [_decode_node(v, sub(i), arrays, path, used) for i, v in enumerate(body)]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict" and isinstance(body, list):
        out = {}
        for item in body:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], (str, int))):
                raise CheckpointError(f"{path!r}: malformed dict entry in the tree metadata at '{where}'")
            out[item[0]] = _decode_node(item[1], sub(item[0]), arrays, path, used)
        return out
    if kind == "record" and isinstance(body, dict):
        return _decode_record(body, where, arrays, path, tensor)
    if kind == "rotation" and isinstance(body, dict) and set(body) == {"packed", "block"}:
        packed, block = tensor(body["packed"]), body["block"]
        valid = isinstance(block, int) and not isinstance(block, bool) and block >= 2 and not block & (block - 1)
        if not valid or packed.dtype != jnp.uint8 or packed.ndim != 1 or (packed.shape[0] * 8) % block:
            raise CheckpointError(f"{path!r}: malformed rotation at '{where}' (block {block!r}, signs "
                                  f"{packed.dtype} {tuple(packed.shape)})")  # fmt: skip
        return Rotation(packed, block)
    raise CheckpointError(f"{path!r}: malformed tree metadata at '{where}' (kind {kind!r})")


def _decode_record(body: dict, where: str, arrays: dict, path: str, tensor: Callable) -> Any:
    fmt = body.get("format")
    if fmt not in FORMATS:
        raise CheckpointError(
            f"{path!r}: the record at '{where}' has format {fmt!r}, not one of {', '.join(format_names())}",
            hint="import the module that registers that format before loading.",
        )
    spec = format_spec(fmt)
    # Records are keyed on the format name; the stored class path is informative only, so files keep
    # loading after a record class moves (any string, or none, is accepted).
    cls = spec.record
    if not isinstance(body.get("class", ""), str):
        raise CheckpointError(f"{path!r}: malformed record metadata at '{where}' (class {body.get('class')!r})")
    static, children = body.get("static"), body.get("children")
    if not isinstance(static, dict) or not isinstance(children, dict):
        raise CheckpointError(f"{path!r}: malformed record metadata at '{where}'")
    fields = {f.name: f.metadata.get("pytree_node", True) for f in dataclasses.fields(cls) if f.init}
    want_static = {k for k, child in fields.items() if not child}
    if set(static) != want_static or set(children) != set(fields) - want_static:
        raise CheckpointError(f"{path!r}: the record at '{where}' does not have the fields of {cls.__qualname__}")
    kwargs = {k: _decode_static(v, where) for k, v in static.items()}
    for k, v in children.items():
        if isinstance(v, dict) and set(v) == {"record"} and isinstance(v["record"], dict):
            kwargs[k] = _decode_record(v["record"], f"{where}:{k}", arrays, path, tensor)
        else:
            kwargs[k] = None if v is None else tensor(v)
    try:
        rec = cls(**kwargs)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path!r}: cannot rebuild the record at '{where}': {e}") from None
    _check_record(path, where, spec, rec)
    return rec


def load(path: str | os.PathLike, *, verify: bool = True) -> Any:
    """Read a file written by :func:`save` (or any safetensors file) back, bit for bit.

    Nothing in the file is executed: the tree is rebuilt from JSON, records only from formats
    registered in :data:`FORMATS`, and each record is checked against what its format produces for
    its shape. A safetensors file without viva_tensor metadata (a Hugging Face checkpoint) loads as a
    flat dict of arrays.

    Args:
        path: the file.
        verify: check every tensor's SHA-256 against the metadata (detects corrupted bytes).

    Returns:
        The saved tree, with ``jax.Array`` leaves and records (a 64-bit tensor stays a NumPy array
        when JAX runs without x64, rather than being silently narrowed).

    Raises:
        CheckpointError: a missing file, a file that is not safetensors, a truncated file, metadata that
            does not match the tensors, corrupted bytes, an unknown format.

    Example:
        >>> import os, tempfile, jax.numpy as jnp
        >>> from viva_tensor import quant
        >>> f = os.path.join(tempfile.mkdtemp(), "t.safetensors")
        >>> quant.save(f, {"a": [jnp.arange(3), None]})
        >>> quant.load(f)["a"][0].tolist()
        [0, 1, 2]
    """
    path = os.fspath(path)
    header = _safetensors.read_header(path, verify=verify)
    meta_str = header.metadata.get(_META_KEY)
    arrays = _safetensors.read_all(header, verify=verify)
    if meta_str is None:
        return {name: _to_jax(a) for name, a in arrays.items()}
    try:
        meta = json.loads(meta_str)
    except (TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path!r}: its viva_tensor metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("version") != _VERSION or "tree" not in meta:
        version = meta.get("version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path!r}: unsupported viva_tensor metadata (version {version!r})")
    arrays = _check_tensors(path, arrays, meta.get("tensors"), verify)
    used: set = set()
    tree = _decode_node(meta["tree"], "", arrays, path, used)
    if used != set(arrays):
        raise CheckpointError(f"{path!r}: tensors not referenced by the tree: {sorted(set(arrays) - used)[:5]}")
    return tree
