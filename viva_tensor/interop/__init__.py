"""Other tools' checkpoint files, read and written bit-exactly.

One entry point: :func:`load` tells the kind of a file or folder (GGUF's magic, ``config.json``'s
``quantization_config``, the tensor names) and returns ``(tensors, metadata)``, quantized layers as records;
:func:`save` writes records and arrays as a checkpoint of a given kind. The kinds:

- ``"gguf"`` — :mod:`viva_tensor.interop.gguf`: llama.cpp's GGUF, the GGML block formats of
  :mod:`viva_tensor.compression` and :mod:`viva_tensor.ggml` (K-quants) as records;
- ``"bnb"`` — :mod:`viva_tensor.interop.bnb`: bitsandbytes 4-bit state dicts (NF4, double quant) as
  ``transformers`` saves them;
- ``"gptq"``, ``"awq"`` — :mod:`viva_tensor.interop.gptq`, :mod:`viva_tensor.interop.awq`: int32-packed int4
  (AutoGPTQ / GPTQModel v1 and v2, AutoAWQ GEMM) as ``int4_group`` records;
- ``"compressed-tensors"`` — :mod:`viva_tensor.interop.compressed_tensors`: llm-compressor / vLLM
  ``pack-quantized`` int4/int8 and ``nvfp4-pack-quantized``;
- ``"viva"`` — :func:`viva_tensor.quant.save` / :func:`viva_tensor.quant.load` files.

Bad or foreign files raise :class:`~viva_tensor.errors.CheckpointError` saying what was expected.

Example:
    >>> import os, tempfile, jax
    >>> from viva_tensor import awq, interop, quant
    >>> q = awq.quantize_group(jax.random.normal(jax.random.key(0), (16, 64)), group_size=32)
    >>> folder = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> interop.save(folder, {"fc.weight": q}, kind="awq")
    >>> tensors, meta = interop.load(folder)
    >>> meta["kind"], tensors["fc.weight"].format
    ('awq', 'int4_group')
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

from viva_tensor import _safetensors
from viva_tensor.errors import CheckpointError
from viva_tensor.interop import _convert, _hf, awq, bnb, compressed_tensors, gguf, gptq
from viva_tensor.interop._convert import Row, convert, inspect

__all__ = ["load", "save", "kind_of", "KINDS", "inspect", "convert", "Row", "gguf", "bnb", "gptq", "awq",
           "compressed_tensors"]


def _gguf_load(path: str) -> tuple[dict, dict]:
    tensors, metadata = gguf.read(path)
    return tensors, {"kind": "gguf", "metadata": metadata}


def _gguf_save(path: str, tensors: dict) -> None:
    gguf.write(path, tensors, arch="viva_tensor")


_convert.register_kind("gguf", _gguf_load, _gguf_save,
                       stores=("q4_0", "q4_1", "q8_0", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"),
                       default="q8_0")
KINDS = tuple(_convert.KINDS)


def kind_of(path: str | os.PathLike) -> str | None:
    """The kind of a checkpoint file or folder from its magic, config and tensor names (``None``: plain).

    Raises:
        CheckpointError: a missing path, or a file that is neither GGUF nor safetensors.
    """
    p = pathlib.Path(os.fspath(path))
    if _is_gguf(p):
        return "gguf"
    if p.is_file() and "viva_tensor" in _safetensors.read_header(p).metadata:
        return "viva"
    return _hf.kind_of(p)


def _is_gguf(p: pathlib.Path) -> bool:
    if not p.is_file():
        return False
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError as e:
        raise CheckpointError(argument="path", expected="a readable file", got=f"{str(p)!r} ({e.strerror})") from None


def load(path: str | os.PathLike) -> tuple[dict[str, Any], dict]:
    """Read any supported checkpoint: ``(tensors, metadata)`` with ``metadata["kind"]``.

    Args:
        path: a GGUF file, a safetensors file (viva_tensor's own, or a Hugging Face one), or a Hugging Face
            checkpoint folder (``config.json`` + safetensors).

    Returns:
        Tensors by the file's names — records for quantized layers, arrays otherwise — and the metadata
        (``"kind"``; GGUF's key-value metadata under ``"metadata"``; a folder's ``"config"`` and
        ``"quantization_config"``).

    Raises:
        CheckpointError: a missing, unreadable, malformed or foreign file, or a scheme viva_tensor has no
            record for.
    """
    p = pathlib.Path(os.fspath(path))
    if _is_gguf(p):
        return _gguf_load(str(p))
    if p.is_file() and "viva_tensor" in _safetensors.read_header(p).metadata:
        return _convert.KINDS["viva"][0](str(p))
    return _hf.load(p)


def save(path: str | os.PathLike, tensors: Mapping[str, Any], *, kind: str, **options: Any) -> None:
    """Write records and arrays as a checkpoint of ``kind`` (see the module docstring).

    Args:
        path: a file (``"gguf"``, ``"viva"``) or a folder (the Hugging Face kinds).
        tensors: name → record or array; quantized layers named ``"<layer>.weight"`` for the Hugging Face kinds.
        kind: one of :data:`KINDS`.
        **options: ``gguf``: ``arch``, ``metadata``, ``alignment``; Hugging Face kinds: ``config`` (and GPTQ's
            ``checkpoint_format``).

    Raises:
        CheckpointError: an unknown kind, a record the kind cannot store, a path that cannot be written.
    """
    if kind == "gguf":
        gguf.write(path, dict(tensors), **{"arch": "viva_tensor", **options})
    elif kind == "viva":
        _convert.KINDS["viva"][1](os.fspath(path), dict(tensors))
    elif kind in _hf.KINDS:
        _hf.save(path, tensors, kind=kind, **options)
    else:
        raise CheckpointError(argument="kind", expected=" / ".join(map(repr, KINDS)), got=repr(kind))
