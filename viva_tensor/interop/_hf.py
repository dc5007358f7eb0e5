"""Hugging Face checkpoint folders (``config.json`` + safetensors), for the four quantized kinds (private).

``transformers`` saves a quantized model as a folder: ``config.json`` (its ``"quantization_config"`` names the
method) and one ``model.safetensors``, or several shards listed in ``model.safetensors.index.json``. The
kinds: ``"bnb"`` (bitsandbytes 4-bit), ``"gptq"``, ``"awq"`` and ``"compressed-tensors"``, each handled by its
module in :mod:`viva_tensor.interop`. Safetensors files are read and written with the library's one
implementation (:mod:`viva_tensor._safetensors`: structure checks on read; on write a per-tensor SHA-256 and a
header digest beside ``"format": "pt"``, which ``transformers`` requires).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

from viva_tensor import _safetensors
from viva_tensor._formats.registry import is_quantized
from viva_tensor.errors import CheckpointError
from viva_tensor.interop import awq as awq_file
from viva_tensor.interop import bnb
from viva_tensor.interop import compressed_tensors as ct
from viva_tensor.interop import gptq as gptq_file

__all__ = ["KINDS", "detect", "kind_of", "load", "save"]

KINDS = ("bnb", "gptq", "awq", "compressed-tensors")
_METHODS = {"bitsandbytes": "bnb", "gptq": "gptq", "awq": "awq", "compressed-tensors": "compressed-tensors"}


def _read_json(path: pathlib.Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as e:
        got = f"{str(path)!r} ({e.strerror})"
        raise CheckpointError(argument="path", expected="a readable JSON file", got=got) from None
    return _safetensors.loads_json(raw, what=repr(str(path)))


def _files(path: pathlib.Path) -> tuple[list[pathlib.Path], dict]:
    """The safetensors files of a checkpoint (a file, or a folder with one file or an index) and its config."""
    if path.is_file():
        config_file = path.parent / "config.json"
        return [path], (_read_json(config_file) if config_file.is_file() else {})
    if not path.is_dir():
        raise CheckpointError(argument="path", expected="a safetensors file or a checkpoint folder",
                              got=f"{str(path)!r} (no such file or folder)")
    config = _read_json(path / "config.json") if (path / "config.json").is_file() else {}
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(argument="path", expected="an index with a weight_map", got=str(index))
        names = list(dict.fromkeys(weight_map.values()))
        if not all(isinstance(n, str) and "/" not in n and n.endswith(".safetensors") for n in names):
            raise CheckpointError(argument="path", expected="shard names of the folder", got=str(names[:3]))
        return [path / n for n in names], config
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(argument="path", expected="a folder holding *.safetensors files", got=str(path))
    return files, config


def _quant_config(config: Any) -> dict:
    if not isinstance(config, dict):
        raise CheckpointError(argument="config.json", expected="a JSON object", got=type(config).__name__)
    q = config.get("quantization_config") or {}
    if not isinstance(q, dict):
        raise CheckpointError(argument="config.json", expected="a quantization_config object", got=repr(q))
    return q


def detect(tensors: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> str | None:
    """The kind of a checkpoint from its ``quantization_config`` or, without one, its tensor names.

    Returns ``"bnb"``, ``"gptq"``, ``"awq"``, ``"compressed-tensors"``, or ``None`` for a plain checkpoint.
    GPTQ and AWQ both name ``qweight``; without a config a GPTQ layer is told by its ``g_idx``.
    """
    method = (config or {}).get("quant_method")
    if method is not None:
        if method not in _METHODS:
            raise CheckpointError(argument="quantization_config", expected="quant_method " +
                                  " / ".join(map(repr, _METHODS)), got=repr(method))
        return _METHODS[method]
    names = list(tensors)
    if bnb.is_bnb(tensors):
        return "bnb"
    if any(n.endswith(".weight_packed") for n in names):
        return "compressed-tensors"
    if any(n.endswith(".qweight") for n in names):
        return "gptq" if any(n.endswith(".g_idx") for n in names) else "awq"
    return None


def kind_of(path: str | os.PathLike) -> str | None:
    """The kind of a Hugging Face file or folder from its config and tensor names, reading no tensor."""
    files, config = _files(pathlib.Path(os.fspath(path)))
    names = {n: None for f in files for n in _safetensors.read_header(f).tensors}
    return detect(names, _quant_config(config) or None)


def load(path: str | os.PathLike) -> tuple[dict[str, Any], dict]:
    """A quantized Hugging Face checkpoint's tensors as records and arrays, and its metadata.

    Returns:
        ``(tensors, metadata)``: tensors keyed by the checkpoint's names, quantized layers as records under
        ``"<layer>.weight"`` (decoding to ``config.json``'s ``torch_dtype``; GPTQ/AWQ default to float16);
        metadata ``{"kind", "config", "quantization_config"}``.

    Raises:
        CheckpointError: a missing, unreadable or malformed file or folder, a quantization method or scheme
            viva_tensor cannot hold.
    """
    files, config = _files(pathlib.Path(os.fspath(path)))
    raw: dict[str, Any] = {}
    for f in files:
        header = _safetensors.read_header(f)
        for name, array in _safetensors.read_all(header).items():
            if name in raw:
                raise CheckpointError(argument="path", expected="each tensor in one shard", got=f"{name!r} twice")
            raw[name] = array
    qconfig = _quant_config(config)
    kind = detect(raw, qconfig or None)
    dtype = config.get("torch_dtype", config.get("dtype"))
    dtype = dtype if dtype in ("float32", "float16", "bfloat16") else None
    if kind == "bnb":
        tensors = bnb.read_state_dict(raw)
    elif kind == "gptq":
        fmt = qconfig.get("checkpoint_format", qconfig.get("format", "gptq"))
        tensors = gptq_file.read_state_dict(raw, checkpoint_format=fmt, dtype=dtype or "float16")
    elif kind == "awq":
        if qconfig.get("version", "gemm") != "gemm":
            raise CheckpointError(argument="quantization_config", expected="AutoAWQ version 'gemm'",
                                  got=repr(qconfig.get("version")))
        tensors = awq_file.read_state_dict(raw, dtype=dtype or "float16")
    elif kind == "compressed-tensors":
        if not qconfig:
            raise CheckpointError(argument="config.json", expected="a compressed-tensors quantization_config",
                                  got="none", hint="compressed-tensors layers need their scheme from config.json.")
        tensors = ct.read_state_dict(raw, qconfig, dtype=dtype)
    else:
        tensors = raw
    return tensors, {"kind": kind, "config": config, "quantization_config": qconfig}


def save(path: str | os.PathLike, tensors: Mapping[str, Any], *, kind: str, config: Mapping[str, Any] | None = None,
         checkpoint_format: str = "gptq") -> None:
    """Write records and arrays as a Hugging Face checkpoint folder of ``kind`` (model.safetensors + config.json).

    Args:
        path: the folder (created).
        tensors: name → record or array; quantized layers named ``"<layer>.weight"``.
        kind: ``"bnb"`` (nf4/nf4_dq/bnb_fp4/bnb_fp4_dq records), ``"gptq"`` or ``"awq"`` (int4_group),
            ``"compressed-tensors"`` (int4_group or nvfp4).
        config: the model's ``config.json`` to extend (its ``quantization_config`` is replaced).
        checkpoint_format: GPTQ's ``"gptq"`` (v1) or ``"gptq_v2"``.

    Raises:
        CheckpointError: an unknown kind, records the kind cannot store, a folder that cannot be written.
    """
    if kind == "bnb":
        sd, qconfig = bnb.write_state_dict(tensors), bnb.quantization_config(tensors)
    elif kind == "gptq":
        sd = gptq_file.write_state_dict(tensors, checkpoint_format=checkpoint_format)
        qconfig = gptq_file.quantization_config(tensors, checkpoint_format=checkpoint_format)
    elif kind == "awq":
        sd, qconfig = awq_file.write_state_dict(tensors), awq_file.quantization_config(tensors)
    elif kind == "compressed-tensors":
        sd, qconfig = ct.write_state_dict(tensors)
    else:
        raise CheckpointError(argument="kind", expected=" / ".join(map(repr, KINDS)), got=repr(kind))
    folder = pathlib.Path(os.fspath(path))
    _safetensors.write(folder / "model.safetensors", sd, metadata={"format": "pt"})
    full = {**dict(config or {}), "quantization_config": qconfig}
    dtypes = {str(getattr(v, "dtype", "")) for v in tensors.values() if is_quantized(v)}
    if len(dtypes) == 1:  # the model dtype the records decode to (transformers' torch_dtype)
        full.setdefault("torch_dtype", dtypes.pop())
    try:
        (folder / "config.json").write_text(json.dumps(full, indent=2) + "\n")
    except OSError as e:
        raise CheckpointError(argument="path", expected="a folder that can be written",
                              got=f"{str(folder)!r} ({e.strerror})") from None
