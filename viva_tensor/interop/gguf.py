"""GGUF files (llama.cpp's container): read and write tensors and metadata.

A GGUF file is a header, typed key/value metadata, a table of tensor infos (name, dims in ggml order, ggml
type, offset) and the tensor data, each tensor at a multiple of ``general.alignment`` (32 by default).

- :func:`read` gives ``(tensors, metadata)``: tensors keyed by the file's names, in NumPy order (GGUF stores
  the dims reversed: ``ne[0]`` is the contiguous one). F32/F16/BF16/F64 and integer tensors become arrays;
  quantized tensors become records that hold the file's block bytes unchanged: Q4_0/Q4_1/Q8_0 from
  :mod:`viva_tensor.compression`, Q5_0/Q5_1, Q2_K..Q6_K, IQ4_NL, IQ4_XS from :mod:`viva_tensor.ggml`.
- :func:`write` writes such a dict (arrays and records) with the architecture and metadata.

Metadata values come back as Python ``str``/``bool``, NumPy scalars of the stored type (``np.uint32`` ...) and
lists (string arrays) or 1-D NumPy arrays (numeric arrays), so that a read file writes back with the same types.
When writing, a plain ``int`` is stored as INT32 and a ``float`` as FLOAT32 (as gguf-py does); pass NumPy
scalars for other types. Anything that is not a well-formed GGUF file raises
:class:`~viva_tensor.errors.CheckpointError` saying what was expected.

Example:
    >>> import tempfile, pathlib
    >>> import jax.numpy as jnp
    >>> from viva_tensor import ggml
    >>> from viva_tensor.interop import gguf
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "m.gguf"
    >>> w = jnp.sin(jnp.arange(512.0)).reshape(2, 256)
    >>> gguf.write(path, {"w": ggml.quantize_q4_k(w), "b": jnp.ones(3)}, arch="demo", metadata={"demo.n": 2})
    >>> tensors, meta = gguf.read(path)
    >>> type(tensors["w"]).__name__, tensors["w"].shape, tensors["b"].tolist(), meta["demo.n"]
    ('Q4KTensor', (2, 256), [1.0, 1.0, 1.0], np.int32(2))
"""

from __future__ import annotations

import math
import os
import struct
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from viva_tensor import compression, ggml
from viva_tensor._formats.record import batch_dims
from viva_tensor._formats.registry import is_quantized
from viva_tensor.errors import CheckpointError, FormatError

__all__ = ["read", "write", "read_metadata", "GGML_TYPES", "hf_bert_name", "gguf_bert_name", "to_minilm_params"]

MAGIC = 0x46554747  # "GGUF" little-endian
DEFAULT_ALIGNMENT = 32

GGML_TYPES = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q8_1": 9, "q2_k": 10, "q3_k": 11,
    "q4_k": 12, "q5_k": 13, "q6_k": 14, "q8_k": 15, "iq2_xxs": 16, "iq2_xs": 17, "iq3_xxs": 18, "iq1_s": 19,
    "iq4_nl": 20, "iq3_s": 21, "iq2_s": 22, "iq4_xs": 23, "i8": 24, "i16": 25, "i32": 26, "i64": 27, "f64": 28,
    "iq1_m": 29, "bf16": 30, "tq1_0": 34, "tq2_0": 35, "mxfp4": 39, "nvfp4": 40,
}
"""ggml type ids by name (``ggml.h``'s ``enum ggml_type``)."""

_TYPE_NAMES = {v: k for k, v in GGML_TYPES.items()}

# (values per block, bytes per block) of every type whose size is known (ggml's type traits).
_TYPE_SIZES = {
    "f32": (1, 4), "f16": (1, 2), "bf16": (1, 2), "f64": (1, 8), "i8": (1, 1), "i16": (1, 2), "i32": (1, 4),
    "i64": (1, 8), "q4_0": (32, 18), "q4_1": (32, 20), "q8_0": (32, 34), "q8_1": (32, 36), "q8_k": (256, 292),
    "iq2_xxs": (256, 66), "iq2_xs": (256, 74), "iq3_xxs": (256, 98), "iq1_s": (256, 50), "iq3_s": (256, 110),
    "iq2_s": (256, 82), "iq1_m": (256, 56), "tq1_0": (256, 54), "tq2_0": (256, 66), "mxfp4": (32, 17),
    "nvfp4": (64, 36),
}
_TYPE_SIZES.update({name: (ggml.BLOCK_VALUES[name], ggml.BLOCK_BYTES[name]) for name in ggml.BLOCK_VALUES})

_PLAIN = {
    "f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "f64": np.dtype("<f8"), "i8": np.dtype("i1"),
    "i16": np.dtype("<i2"), "i32": np.dtype("<i4"), "i64": np.dtype("<i8"), "bf16": np.dtype("<u2"),
}
_PLAIN_OF_DTYPE = {
    np.dtype(np.float32): "f32", np.dtype(np.float16): "f16", np.dtype(np.float64): "f64", np.dtype(np.int8): "i8",
    np.dtype(np.int16): "i16", np.dtype(np.int32): "i32", np.dtype(np.int64): "i64",
    np.dtype(ml_dtypes.bfloat16): "bf16",
}
_COMPRESSION_TYPES = ("q4_0", "q4_1", "q8_0")

# GGUF metadata value types: id -> (name, struct format or None).
_VALUE_TYPES = {
    0: ("uint8", "<B"), 1: ("int8", "<b"), 2: ("uint16", "<H"), 3: ("int16", "<h"), 4: ("uint32", "<I"),
    5: ("int32", "<i"), 6: ("float32", "<f"), 7: ("bool", "<?"), 8: ("string", None), 9: ("array", None),
    10: ("uint64", "<Q"), 11: ("int64", "<q"), 12: ("float64", "<d"),
}
_NUMPY_OF_VALUE = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
                   10: np.uint64, 11: np.int64, 12: np.float64}
_VALUE_OF_NUMPY = {np.dtype(v): k for k, v in _NUMPY_OF_VALUE.items()}


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------


class _Cursor:
    """Reads little-endian fields from a buffer; running past its end raises CheckpointError."""

    def __init__(self, buf: memoryview, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str, got: Any) -> CheckpointError:
        return CheckpointError(argument="path", expected=f"a GGUF file ({what})", got=f"{got} in {self.path!r}")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"{n} bytes of {what} at offset {self.pos}", f"a file of {len(self.buf)} bytes")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", f"the length of {what}")
        raw = self.take(n, what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} in UTF-8", "invalid UTF-8") from None

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        if vtype not in _VALUE_TYPES:
            raise self.fail(f"a value type 0..12 for key {key!r}", f"type {vtype}")
        name, fmt = _VALUE_TYPES[vtype]
        if name == "string":
            return self.string(f"the value of {key!r}")
        if name == "array":
            if depth > 8:
                raise self.fail(f"arrays nested at most 8 deep for key {key!r}", "deeper nesting")
            etype = self.unpack("<I", f"the element type of {key!r}")
            count = self.unpack("<Q", f"the length of {key!r}")
            if etype in _NUMPY_OF_VALUE or etype == 7:
                size = struct.calcsize(_VALUE_TYPES[etype][1])
                raw = self.take(count * size, f"the elements of {key!r}")
                dt = np.dtype(_NUMPY_OF_VALUE[etype]).newbyteorder("<") if etype != 7 else np.dtype(np.uint8)
                arr = np.frombuffer(raw, dt).astype(dt.newbyteorder("="))
                return [bool(b) for b in arr] if etype == 7 else arr
            if count > len(self.buf) - self.pos:
                raise self.fail(f"at most one element per remaining byte for {key!r}", f"{count} elements")
            return [self.value(etype, key, depth + 1) for _ in range(count)]
        v = self.unpack(fmt, f"the value of {key!r}")
        return bool(v) if name == "bool" else _NUMPY_OF_VALUE[vtype](v)


def _open(path: Any) -> tuple[memoryview, str]:
    path = os.fspath(path)
    try:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    except FileNotFoundError:
        raise CheckpointError(argument="path", expected="an existing GGUF file", got=repr(path)) from None
    except (ValueError, OSError) as e:  # empty files cannot be mapped
        raise CheckpointError(argument="path", expected="a GGUF file", got=f"{path!r} ({e})") from None
    return memoryview(mm), path


def _header(cur: _Cursor) -> tuple[int, dict[str, Any], list[tuple[str, tuple[int, ...], int, int]]]:
    magic = cur.unpack("<I", "the magic")
    if magic != MAGIC:
        raise cur.fail("the magic b'GGUF' at offset 0", repr(bytes(cur.buf[:4])))
    version = cur.unpack("<I", "the version")
    if version not in (2, 3):
        raise cur.fail("version 2 or 3", f"version {version}")
    n_tensors = cur.unpack("<Q", "the tensor count")
    n_kv = cur.unpack("<Q", "the metadata count")
    if n_tensors > len(cur.buf) or n_kv > len(cur.buf):
        raise cur.fail("tensor and metadata counts that fit the file", f"{n_tensors} tensors, {n_kv} keys")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("a metadata key")
        vtype = cur.unpack("<I", f"the type of {key!r}")
        metadata[key] = cur.value(vtype, key)
    infos = []
    for _ in range(n_tensors):
        name = cur.string("a tensor name")
        n_dims = cur.unpack("<I", f"the rank of {name!r}")
        if n_dims > 8:
            raise cur.fail(f"at most 8 dims for tensor {name!r}", f"{n_dims} dims")
        ne = tuple(cur.unpack("<Q", f"the dims of {name!r}") for _ in range(n_dims))
        ttype = cur.unpack("<I", f"the type of {name!r}")
        offset = cur.unpack("<Q", f"the offset of {name!r}")
        infos.append((name, ne, ttype, offset))
    return version, metadata, infos


def _alignment(cur: _Cursor, metadata: dict[str, Any]) -> int:
    align = metadata.get("general.alignment", np.uint32(DEFAULT_ALIGNMENT))
    if not isinstance(align, np.integer) or int(align) <= 0 or int(align) & (int(align) - 1):
        raise cur.fail("general.alignment a positive power of two", repr(align))
    return int(align)


def read_metadata(path: Any) -> dict[str, Any]:
    """The metadata of a GGUF file (without reading its tensor data).

    Args:
        path: the file.

    Returns:
        The key/value metadata, in file order.

    Raises:
        CheckpointError: missing, truncated or not a GGUF file.

    Example:
        >>> import tempfile, pathlib
        >>> import jax.numpy as jnp
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.gguf"
        >>> write(p, {"x": jnp.zeros(4)}, arch="demo")
        >>> read_metadata(p)["general.architecture"]
        'demo'
    """
    buf, name = _open(path)
    _, metadata, _ = _header(_Cursor(buf, name))
    return metadata


def read(path: Any, *, dtype: Any = jnp.float32) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tensors and metadata of a GGUF file.

    Args:
        path: the file.
        dtype: the dtype that quantized records dequantize to (float32, bfloat16 or float16).

    Returns:
        ``(tensors, metadata)``: tensors keyed by name in file order, shapes in NumPy order (the reverse of
        GGUF's ``ne``): ``jax.Array`` for F32/F16/BF16/F64/I8..I64, records for Q4_0/Q4_1/Q8_0
        (:mod:`viva_tensor.compression`) and Q5_0/Q5_1/Q2_K..Q6_K/IQ4_NL/IQ4_XS (:mod:`viva_tensor.ggml`).

    Raises:
        CheckpointError: missing, truncated or not a GGUF file, a tensor outside the file or misaligned, a
            duplicate name, or a ggml type that has no record here (IQ2/IQ3/IQ1, TQ, MXFP4, ...).

    Example:
        >>> import tempfile, pathlib
        >>> import jax.numpy as jnp
        >>> from viva_tensor import compression
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.gguf"
        >>> write(p, {"w": compression.quantize_q8_0(jnp.ones((2, 32)))}, arch="demo")
        >>> t, meta = read(p)
        >>> type(t["w"]).__name__, t["w"].shape, meta["general.architecture"]
        ('Q8_0Tensor', (2, 32), 'demo')
    """
    buf, name = _open(path)
    cur = _Cursor(buf, name)
    _, metadata, infos = _header(cur)
    align = _alignment(cur, metadata)
    data_start = -(-cur.pos // align) * align
    tensors: dict[str, Any] = {}
    for tname, ne, ttype, offset in infos:
        if tname in tensors:
            raise cur.fail("unique tensor names", f"{tname!r} twice")
        tensors[tname] = _tensor(cur, tname, ne, ttype, data_start + offset, offset, align, dtype)
    return tensors, metadata


def _tensor(cur: _Cursor, name: str, ne: tuple[int, ...], ttype: int, start: int, offset: int, align: int,
            dtype: Any) -> Any:
    tname = _TYPE_NAMES.get(ttype)
    if tname is None or tname not in _TYPE_SIZES:
        raise cur.fail(f"a known ggml type for tensor {name!r}", f"type id {ttype}")
    if offset % align:
        raise cur.fail(f"tensor {name!r} at a multiple of the alignment {align}", f"offset {offset}")
    shape = tuple(int(n) for n in reversed(ne))
    block, block_bytes = _TYPE_SIZES[tname]
    if (shape and shape[-1] % block) or (not shape and block != 1):
        raise cur.fail(f"rows of tensor {name!r} ({tname}) in whole blocks of {block}", f"shape {shape}")
    nbytes = math.prod(shape) // block * block_bytes
    if start + nbytes > len(cur.buf):
        raise cur.fail(f"the {nbytes} bytes of tensor {name!r} inside the file",
                       f"a file of {len(cur.buf)} bytes (data at {start})")
    raw = np.frombuffer(cur.buf[start:start + nbytes], np.uint8)
    if tname in _PLAIN:
        arr = raw.view(_PLAIN[tname]).reshape(shape)
        if tname == "bf16":
            return jnp.asarray(arr.astype(np.uint16)).view(jnp.bfloat16)
        return jnp.asarray(arr.astype(_PLAIN[tname].newbyteorder("=")))
    if tname in _COMPRESSION_TYPES:
        return compression.from_ggml_bytes(raw, tname, shape, dtype=dtype)
    if tname in ggml.BLOCK_VALUES:
        return ggml.from_ggml_bytes(raw, tname, shape, dtype=dtype)
    raise cur.fail(f"a type with a record in viva_tensor for tensor {name!r} (f32, f16, bf16, "
                   f"{', '.join(_COMPRESSION_TYPES + tuple(ggml.BLOCK_VALUES))})", tname)


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def _pack_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value_type(key: str, v: Any) -> int:
    if isinstance(v, (bool, np.bool_)):
        return 7
    if isinstance(v, str):
        return 8
    if isinstance(v, (list, tuple, np.ndarray)):
        return 9
    if isinstance(v, np.generic) and np.dtype(v.dtype) in _VALUE_OF_NUMPY:
        return _VALUE_OF_NUMPY[np.dtype(v.dtype)]
    if isinstance(v, int):
        return 5 if -(2**31) <= v < 2**31 else 11
    if isinstance(v, float):
        return 6
    raise FormatError(argument="metadata", expected=f"str, bool, int, float, a NumPy scalar or a list for key {key!r}",
                      got=type(v).__name__)


def _pack_value(key: str, v: Any, vtype: int) -> bytes:
    if vtype == 8:
        return _pack_string(v)
    if vtype == 7:
        return struct.pack("<?", bool(v))
    if vtype == 9:
        if isinstance(v, np.ndarray):
            if v.ndim != 1 or np.dtype(v.dtype) not in _VALUE_OF_NUMPY:
                raise FormatError(argument="metadata", expected=f"a 1-D numeric array for key {key!r}",
                                  got=f"{v.dtype} of shape {v.shape}")
            etype = _VALUE_OF_NUMPY[np.dtype(v.dtype)]
            return struct.pack("<IQ", etype, v.size) + v.astype(v.dtype.newbyteorder("<")).tobytes()
        items = list(v)
        etypes = {_value_type(key, item) for item in items} or {8}
        if etypes == {5, 11}:  # Python ints, some beyond int32
            etypes = {11}
        if len(etypes) > 1:
            raise FormatError(argument="metadata", expected=f"a list of one value type for key {key!r}",
                              got=sorted(_VALUE_TYPES[t][0] for t in etypes))
        etype = etypes.pop()
        return struct.pack("<IQ", etype, len(items)) + b"".join(_pack_value(key, item, etype) for item in items)
    return struct.pack(_VALUE_TYPES[vtype][1], v)


def _tensor_bytes(name: str, t: Any) -> tuple[int, tuple[int, ...], bytes]:
    """(ggml type id, shape in NumPy order, data) of one tensor."""
    if is_quantized(t):
        if batch_dims(t):
            raise FormatError(argument="tensors", expected=f"a record made outside vmap for {name!r}",
                              got=f"batch dims {batch_dims(t)}")
        if t.format in _COMPRESSION_TYPES and isinstance(t, tuple(compression._GGML_RECORDS.values())):
            data = compression.to_ggml_bytes(t)
        elif t.format in ggml.BLOCK_VALUES:
            data = ggml.to_ggml_bytes(t)
        else:
            raise FormatError(argument="tensors", expected=f"a GGML record or an array for {name!r} (q4_0, q4_1, "
                              f"q8_0, {', '.join(ggml.BLOCK_VALUES)})", got=f"a {t.format} record",
                              hint="GGUF stores only ggml's block types; dequantize it or requantize with a "
                              "GGML format.")
        return GGML_TYPES[t.format], tuple(t.shape), np.ascontiguousarray(data).tobytes()
    if not hasattr(t, "dtype"):
        raise FormatError(argument="tensors", expected=f"an array or a GGML record for {name!r}", got=type(t).__name__)
    arr = np.asarray(jax.device_get(t))
    kind = _PLAIN_OF_DTYPE.get(np.dtype(arr.dtype))
    if kind is None:
        raise FormatError(argument="tensors", expected=f"float32, float16, bfloat16, float64 or int8..int64 for "
                          f"{name!r}", got=str(arr.dtype))
    if kind == "bf16":
        arr = arr.view(np.uint16)
    return GGML_TYPES[kind], tuple(arr.shape), np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()


def write(path: Any, tensors: dict[str, Any], *, arch: str, metadata: dict[str, Any] | None = None,
          alignment: int = DEFAULT_ALIGNMENT) -> None:
    """Write tensors and metadata as a GGUF (version 3) file.

    ``general.architecture`` comes first (``arch``), then ``general.alignment`` when it is not 32, then
    ``metadata`` in order. Tensors are written in the dict's order, each at a multiple of ``alignment`` and
    padded with zeros to it (as gguf-py does).

    Args:
        path: the file to create (overwritten).
        tensors: names to arrays (float32/float16/bfloat16/float64/int8..int64) or GGML records
            (:mod:`viva_tensor.compression` Q4_0/Q4_1/Q8_0, :mod:`viva_tensor.ggml`). Shapes in NumPy order.
        arch: ``general.architecture`` (``"bert"``, ``"llama"`` ...).
        metadata: further keys; values ``str``, ``bool``, ``int`` (INT32), ``float`` (FLOAT32), NumPy scalars
            (their own type), lists of one type or 1-D NumPy arrays.
        alignment: the data alignment, a power of two.

    Raises:
        FormatError: a tensor or metadata value that GGUF cannot hold, or a key given twice.

    Example:
        >>> import tempfile, pathlib
        >>> import jax.numpy as jnp
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.gguf"
        >>> write(p, {"x": jnp.arange(6.0).reshape(2, 3)}, arch="demo", metadata={"demo.names": ["a", "b"]})
        >>> t, meta = read(p)
        >>> t["x"].shape, meta["demo.names"]
        ((2, 3), ['a', 'b'])
    """
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise FormatError(argument="alignment", expected="a positive power of two", got=alignment)
    kv: dict[str, Any] = {"general.architecture": str(arch)}
    if alignment != DEFAULT_ALIGNMENT:
        kv["general.alignment"] = np.uint32(alignment)
    for key, value in (metadata or {}).items():
        if key in kv:
            raise FormatError(argument="metadata", expected=f"{key!r} once (it is set by write)", got=repr(value))
        kv[key] = value
    infos, blobs, offset = [], [], 0
    for name, t in tensors.items():
        ttype, shape, data = _tensor_bytes(name, t)
        info = _pack_string(name) + struct.pack("<I", len(shape))
        info += b"".join(struct.pack("<Q", n) for n in reversed(shape)) + struct.pack("<IQ", ttype, offset)
        infos.append(info)
        pad = -len(data) % alignment
        blobs.append(data + b"\0" * pad)
        offset += len(data) + pad
    out = [struct.pack("<IIQQ", MAGIC, 3, len(tensors), len(kv))]
    for key, value in kv.items():
        vtype = _value_type(key, value)
        out.append(_pack_string(key) + struct.pack("<I", vtype) + _pack_value(key, value, vtype))
    out.extend(infos)
    head = b"".join(out)
    head += b"\0" * (-len(head) % alignment)
    with open(os.fspath(path), "wb") as f:
        f.write(head)
        for blob in blobs:
            f.write(blob)


# ----------------------------------------------------------------------------------------------------
# BERT / MiniLM tensor names
# ----------------------------------------------------------------------------------------------------

_BERT_TOP = {
    "token_embd.weight": "embeddings.word_embeddings.weight",
    "position_embd.weight": "embeddings.position_embeddings.weight",
    "token_types.weight": "embeddings.token_type_embeddings.weight",
    "token_embd_norm.weight": "embeddings.LayerNorm.weight",
    "token_embd_norm.bias": "embeddings.LayerNorm.bias",
}
_BERT_LAYER = {
    "attn_q": "attention.self.query",
    "attn_k": "attention.self.key",
    "attn_v": "attention.self.value",
    "attn_output": "attention.output.dense",
    "attn_output_norm": "attention.output.LayerNorm",
    "ffn_up": "intermediate.dense",
    "ffn_down": "output.dense",
    "layer_output_norm": "output.LayerNorm",
}


def hf_bert_name(name: str) -> str | None:
    """The Hugging Face BERT name of a GGUF BERT tensor name (``convert_hf_to_gguf.py``'s map), or None.

    Example:
        >>> hf_bert_name("blk.3.ffn_down.weight"), hf_bert_name("token_embd.weight")
        ('encoder.layer.3.output.dense.weight', 'embeddings.word_embeddings.weight')
    """
    if name in _BERT_TOP:
        return _BERT_TOP[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BERT_LAYER:
        return f"encoder.layer.{parts[1]}.{_BERT_LAYER[parts[2]]}.{parts[3]}"
    return None


def gguf_bert_name(name: str) -> str | None:
    """The GGUF name of a Hugging Face BERT tensor name (a leading ``bert.`` is dropped), or None.

    Example:
        >>> gguf_bert_name("bert.encoder.layer.0.attention.self.query.bias")
        'blk.0.attn_q.bias'
    """
    name = name.removeprefix("bert.")
    for g, h in _BERT_TOP.items():
        if h == name:
            return g
    if name.startswith("encoder.layer."):
        rest = name.removeprefix("encoder.layer.")
        index, _, tail = rest.partition(".")
        module, _, leaf = tail.rpartition(".")
        for g, h in _BERT_LAYER.items():
            if h == module and index.isdigit():
                return f"blk.{index}.{g}.{leaf}"
    return None


def to_minilm_params(tensors: dict[str, Any]) -> dict[str, np.ndarray]:
    """GGUF BERT tensors as a Hugging Face state dict of float32 arrays (records dequantized bit-exactly).

    Args:
        tensors: the tensors of :func:`read` of a BERT GGUF (``token_embd.weight``, ``blk.N.attn_q.weight`` ...).

    Returns:
        ``{"embeddings.word_embeddings.weight": ..., "encoder.layer.0.attention.self.query.weight": ...}``;
        names without a BERT counterpart are left out.

    Example:
        >>> import jax.numpy as jnp
        >>> sorted(to_minilm_params({"blk.0.attn_q.bias": jnp.zeros(4), "other": jnp.zeros(1)}))
        ['encoder.layer.0.attention.self.query.bias']
    """
    out = {}
    for name, t in tensors.items():
        hf = hf_bert_name(name)
        if hf is None:
            continue
        if is_quantized(t):
            t = compression.dequantize(t) if t.format in _COMPRESSION_TYPES else ggml.dequantize(t)
        out[hf] = np.asarray(jnp.asarray(t, jnp.float32))
    return out
