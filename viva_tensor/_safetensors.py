"""The one safetensors reader and writer of the library (private), with integrity checks.

A safetensors file is an 8-byte little-endian header length, a JSON header, then the tensors' bytes. The
header maps each tensor name to ``{"dtype", "shape", "data_offsets"}`` and may hold a ``"__metadata__"``
dict of strings. Everything here reads and writes that layout by hand (no pickle, nothing executed), so
``quant.save``/``quant.load`` (checkpoints) and ``memory``'s disk tier share one parser and one set of
checks:

- **Structure**, on every read: the header length fits the file, the JSON is an object (deep nesting is
  refused, not a ``RecursionError``), each entry has a known dtype, a shape of non-negative ints and
  offsets whose length is the shape's bytes, the offsets tile the data section exactly (no negative
  offset, no overlap, no hole, no trailing byte).
- **Integrity**, for files written here: the metadata records each tensor's logical dtype (FP4, E8M0 and
  other dtypes safetensors has no code for are stored as their raw unsigned bits) and SHA-256
  (``"viva_tensor.tensors"``), and one SHA-256 over the whole canonical header — dtypes, shapes, offsets
  and all metadata — (``"viva_tensor.digest"``). So any change to the bytes, the header or the metadata is
  refused on read with a :class:`~viva_tensor.errors.CheckpointError` saying what did not match. Files
  written elsewhere (a Hugging Face checkpoint) have no digest: their structure is still checked.

Example:
    >>> import os, tempfile, numpy as np
    >>> from viva_tensor import _safetensors
    >>> f = os.path.join(tempfile.mkdtemp(), "t.safetensors")
    >>> _ = _safetensors.write(f, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, metadata={"k": "v"})
    >>> h = _safetensors.read_header(f)
    >>> h.signed, h.metadata["k"], _safetensors.read_tensor(h, "w").tolist()
    (True, 'v', [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import stat
import struct
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from viva_tensor.errors import CheckpointError

__all__ = [
    "TensorInfo", "Header", "write", "read_header", "read_tensor", "read_all", "np_dtype", "loads_json", "MAX_HEADER",
]

MAX_HEADER = 100 * 1024 * 1024
TENSORS_KEY = "viva_tensor.tensors"
DIGEST_KEY = "viva_tensor.digest"
_MAX_DEPTH = 64

# safetensors' dtype codes and the NumPy dtypes they name.
_CODES: dict[str, np.dtype] = {
    "BOOL": np.dtype(bool), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16), "I16": np.dtype(np.int16), "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32), "U64": np.dtype(np.uint64), "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16), "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}  # fmt: skip
# The dtypes written under their own code (FP8 too: torch and the safetensors tools read F8_E4M3/F8_E5M2);
# any other dtype (FP4, E8M0, int4 ...) is written as its raw unsigned bits.
_WRITTEN = {dt.name: code for code, dt in _CODES.items()}
_UINT = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32), 8: np.dtype(np.uint64)}


def np_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a dtype name (``"bfloat16"``, ``"float4_e2m1fn"`` ...), or ``CheckpointError``.

    Only real dtype names are accepted: attributes of ``ml_dtypes`` that are not dtypes
    (``"__version__"``) are refused.

    Example:
        >>> from viva_tensor._safetensors import np_dtype
        >>> np_dtype("bfloat16").name, np_dtype("int8").name
        ('bfloat16', 'int8')
    """
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
        raise CheckpointError(argument="dtype", expected="a dtype name such as 'float32'", got=repr(name))
    if name in _WRITTEN:
        return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
    candidate = getattr(ml_dtypes, name, None)
    try:
        dt = np.dtype(candidate) if isinstance(candidate, type) else None
    except TypeError:
        dt = None
    if dt is None or dt.name != name:
        raise CheckpointError(argument="dtype", expected="a dtype name such as 'float32'", got=repr(name))
    return dt


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a file: logical dtype and shape, where its bytes are, and its SHA-256 (if recorded)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    stored_dtype: np.dtype
    stored_shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int
    sha256: str | None

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclasses.dataclass(frozen=True)
class Header:
    """A validated safetensors header.

    Attributes:
        path: the file.
        tensors: each tensor's :class:`TensorInfo`, in file order.
        metadata: the ``__metadata__`` strings, without the integrity entries.
        digest: the SHA-256 of the canonical header (``None`` for a file without one: not written here).
        size: the file's size in bytes.
    """

    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    digest: str | None
    size: int

    @property
    def signed(self) -> bool:
        """Whether the file carries the integrity digest and per-tensor SHA-256 written by :func:`write`."""
        return self.digest is not None


def _canonical_digest(header: dict) -> str:
    blob = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _bytes(a: np.ndarray) -> np.ndarray:
    """The bytes of a C-contiguous array, as a flat uint8 view (no copy)."""
    return a.reshape(-1).view(np.uint8)


def _stored(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    a = a if a.flags.c_contiguous else a.copy(order="C")  # (np.ascontiguousarray makes 0-d 1-d)
    if a.dtype.name in _WRITTEN:
        return a
    if a.dtype.itemsize not in _UINT:
        raise CheckpointError(argument="tensors", expected="arrays of 1, 2, 4 or 8-byte dtypes", got=a.dtype.name)
    return a.view(_UINT[a.dtype.itemsize])


def write(path: str | os.PathLike, tensors: Mapping[str, Any], *, metadata: Mapping[str, str] | None = None
          ) -> Header:
    """Write named arrays to a safetensors file, with per-tensor SHA-256 and a digest over the header.

    Tensors are written in the given order, contiguously. Arrays of a dtype safetensors has no code for
    (FP4, E8M0, int4 ...) are stored as their raw unsigned bits; their logical dtype is in the metadata
    and :func:`read_tensor` gives them back in it.

    Args:
        path: the file to write (overwritten; its folder is created).
        tensors: name → NumPy array (or anything ``np.asarray`` takes, e.g. a concrete ``jax.Array``).
        metadata: extra ``__metadata__`` strings (keys starting with ``"viva_tensor."`` are reserved).

    Returns:
        The :class:`Header` of the file written (as :func:`read_header` would give it).

    Raises:
        CheckpointError: a name or metadata that is not a str, a reserved metadata key, an array that
            cannot be stored, or a file that cannot be written.
    """
    path = os.path.abspath(os.fspath(path))
    metadata = dict(metadata or {})
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            got = f"{k!r}: {type(v).__name__}"
            raise CheckpointError(argument="metadata", expected="a dict of str to str", got=got)
        if k in (TENSORS_KEY, DIGEST_KEY):
            raise CheckpointError(argument="metadata", expected="keys other than the reserved ones", got=repr(k))
    header: dict[str, Any] = {}
    table: dict[str, dict[str, str]] = {}
    stored: list[np.ndarray] = []
    offset = 0
    for name, array in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise CheckpointError(argument="tensors", expected="non-empty str names other than '__metadata__'",
                                  got=repr(name))
        logical = np.asarray(array)
        s = _stored(logical)
        header[name] = {"dtype": _WRITTEN[s.dtype.name], "shape": list(s.shape),
                        "data_offsets": [offset, offset + s.nbytes]}
        table[name] = {"dtype": logical.dtype.name, "sha256": hashlib.sha256(_bytes(s)).hexdigest()}
        stored.append(s)
        offset += s.nbytes
    header["__metadata__"] = {**metadata, TENSORS_KEY: json.dumps(table, separators=(",", ":"))}
    header["__metadata__"][DIGEST_KEY] = _canonical_digest(header)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for s in stored:
                f.write(_bytes(s))
    except OSError as e:
        raise CheckpointError(argument="path", expected="a file that can be written",
                              got=f"{path!r}: cannot write ({e.strerror or e})") from None
    return read_header(path, verify=False)


def _open_error(path: str, e: OSError) -> CheckpointError:
    if isinstance(e, FileNotFoundError) or e.errno == errno.ENOENT:
        return CheckpointError(argument="path", expected="an existing file", got=f"{path!r} (no such file)")
    if isinstance(e, PermissionError) or e.errno in (errno.EACCES, errno.EPERM):
        return CheckpointError(argument="path", expected="a readable file", got=f"{path!r} (permission denied)")
    if isinstance(e, (IsADirectoryError, NotADirectoryError)):
        return CheckpointError(argument="path", expected="a file", got=f"{path!r} ({e.strerror})")
    return CheckpointError(argument="path", expected="a readable file", got=f"{path!r} ({e.strerror or e})")


def _depth(x: Any, limit: int) -> int:
    stack, deepest = [(x, 1)], 0
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node)
    return deepest


def loads_json(raw: str | bytes, *, what: str) -> Any:
    """``json.loads`` that refuses, with ``CheckpointError``, invalid or too deeply nested JSON."""
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{what} is not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{what} is nested too deeply (more than {_MAX_DEPTH} levels)") from None
    if _depth(value, _MAX_DEPTH) > _MAX_DEPTH:
        raise CheckpointError(f"{what} is nested too deeply (more than {_MAX_DEPTH} levels)")
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _entry(path: str, name: str, t: Any, data_start: int) -> TensorInfo:
    bad = f"{path!r} is not a valid safetensors file: tensor {name!r}"
    if not isinstance(t, dict) or set(t) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{bad} needs exactly 'dtype', 'shape' and 'data_offsets'")
    code, shape, offsets = t["dtype"], t["shape"], t["data_offsets"]
    if not isinstance(code, str) or code not in _CODES:
        raise CheckpointError(f"{bad} has dtype {code!r}, not one of {', '.join(_CODES)}")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise CheckpointError(f"{bad} has shape {shape!r}, not a list of non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{bad} has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end")
    dt = _CODES[code]
    want = math.prod(shape) * dt.itemsize
    if offsets[1] - offsets[0] != want:
        raise CheckpointError(f"{bad}: {code}{shape} needs {want} bytes, its data_offsets span "
                              f"{offsets[1] - offsets[0]}")
    return TensorInfo(name, dt, tuple(shape), dt, tuple(shape), data_start + offsets[0], data_start + offsets[1],
                      None)


def _check_tiling(path: str, infos: list[TensorInfo], data_start: int, size: int) -> None:
    end = data_start
    for info in sorted(infos, key=lambda i: (i.start, i.end)):
        if info.start != end:
            what = "overlaps the tensor before it" if info.start < end else "leaves a hole before it"
            raise CheckpointError(f"{path!r} is not a valid safetensors file: tensor {info.name!r} {what}")
        end = info.end
    if end > size:
        raise CheckpointError(f"{path!r} is truncated: its tensors need {end} bytes, the file has {size}")
    if end < size:
        raise CheckpointError(f"{path!r} has {size - end} unexpected bytes after its last tensor")


def _apply_table(path: str, infos: dict[str, TensorInfo], raw: str) -> dict[str, TensorInfo]:
    table = loads_json(raw, what=f"{path!r}: the tensor table in its metadata")
    if not isinstance(table, dict) or set(table) != set(infos):
        raise CheckpointError(f"{path!r}: its tensor table does not list exactly the file's tensors")
    out = {}
    for name, info in infos.items():
        entry = table[name]
        if not (isinstance(entry, dict) and set(entry) == {"dtype", "sha256"} and isinstance(entry["sha256"], str)):
            raise CheckpointError(f"{path!r}: malformed tensor table entry for {name!r}")
        dt = np_dtype(entry["dtype"])
        if dt.itemsize != info.stored_dtype.itemsize:
            raise CheckpointError(f"{path!r}: tensor {name!r} is stored as {info.stored_dtype.name}, "
                                  f"which cannot hold {dt.name}")
        out[name] = dataclasses.replace(info, dtype=dt, sha256=entry["sha256"])
    return out


def read_header(path: str | os.PathLike, *, verify: bool = True) -> Header:
    """Read and validate the header of a safetensors file (the tensors' bytes are not read).

    Args:
        path: the file.
        verify: check the digest over the header and metadata, when the file has one.

    Returns:
        A :class:`Header`.

    Raises:
        CheckpointError: a missing or unreadable path, a directory, a file that is not safetensors, a
            truncated file, malformed or tampered header or metadata.
    """
    path = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(argument="path", expected="a regular file", got=f"{path!r} (not a file)")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            not_st = f"{path!r} is not a safetensors file"
            if len(head) < 8:
                raise CheckpointError(f"{not_st}: {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{not_st} (or it is truncated): its header claims {n} bytes, "
                                      f"the file has {size}")
            raw = f.read(n)
    except OSError as e:
        raise _open_error(path, e) from None
    header = loads_json(raw, what=f"{path!r}: its safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{not_st}: its header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"{not_st}: its __metadata__ is not a dict of strings")
    infos = {name: _entry(path, name, t, 8 + n) for name, t in header.items() if name != "__metadata__"}
    _check_tiling(path, list(infos.values()), 8 + n, size)
    digest = meta.get(DIGEST_KEY)
    if digest is not None and verify:
        unsigned = {**header, "__metadata__": {k: v for k, v in meta.items() if k != DIGEST_KEY}}
        if _canonical_digest(unsigned) != digest:
            raise CheckpointError(f"{path!r}: its header or metadata was changed after it was written "
                                  "(the digest over dtypes, shapes, offsets and metadata does not match)")
    if (TENSORS_KEY in meta) != (digest is not None):
        raise CheckpointError(f"{path!r}: its metadata has a tensor table or a digest without the other "
                              "(it was changed after it was written)")
    if TENSORS_KEY in meta:
        infos = _apply_table(path, infos, meta[TENSORS_KEY])
    user = {k: v for k, v in meta.items() if k not in (TENSORS_KEY, DIGEST_KEY)}
    return Header(path, infos, user, digest, size)


def read_tensor(header: Header, name: str, *, verify: bool = True) -> np.ndarray:
    """Read one tensor of a file whose :class:`Header` was read, in its logical dtype and shape.

    Args:
        header: from :func:`read_header` (the file must not have changed since: its size is rechecked).
        name: the tensor's name.
        verify: check the tensor's SHA-256, when the file records one.

    Raises:
        CheckpointError: an unknown name, a file that changed or is unreadable, bytes that do not match
            their SHA-256.
    """
    info = header.tensors.get(name) if isinstance(name, str) else None
    if info is None:
        raise CheckpointError(argument="name", expected=f"a tensor of {header.path!r}", got=repr(name))
    out = np.empty(info.stored_shape, info.stored_dtype)
    try:
        with open(header.path, "rb") as f:
            if os.fstat(f.fileno()).st_size != header.size:
                raise CheckpointError(f"{header.path!r} changed since its header was read")
            f.seek(info.start)
            got = f.readinto(_bytes(out)) if out.size else 0
    except OSError as e:
        raise _open_error(header.path, e) from None
    if got != info.nbytes:
        raise CheckpointError(f"{header.path!r} is truncated: tensor {name!r} has {got} of {info.nbytes} bytes")
    if verify and info.sha256 is not None:
        if hashlib.sha256(_bytes(out)).hexdigest() != info.sha256:
            raise CheckpointError(f"{header.path!r}: the bytes of tensor {name!r} do not match their SHA-256 "
                                  "(the file is corrupted or was changed)")
    return out if out.dtype == info.dtype else out.view(info.dtype)


def read_all(header: Header, *, verify: bool = True) -> dict[str, np.ndarray]:
    """Every tensor of a file, by name, in file order (see :func:`read_tensor`)."""
    return {name: read_tensor(header, name, verify=verify) for name in header.tensors}
