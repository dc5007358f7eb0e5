"""GPTQ int4 checkpoints (AutoGPTQ / GPTQModel ``qweight``/``qzeros``/``scales``/``g_idx``) ⇄ int4_group records.

A GPTQ Linear layer ``(out, in)`` is stored as:

=============  =========  ==================  ==================================================================
``qweight``    int32      ``[in / 8, out]``   codes packed along the input dim: bits 4j..4j+3 of ``qweight[r, c]``
                                              are the code of input ``8r + j``, output ``c``
``qzeros``     int32      ``[groups, out/8]`` zero points packed along the output dim the same way; the default
                                              on-disk format (``"gptq"``, v1) stores zero − 1 as one int32
                                              subtraction of ``0x11111111``; ``"gptq_v2"`` stores the zeros
``scales``     float16    ``[groups, out]``
``g_idx``      int32      ``[in]``            the group of each input column (``i // group_size``)
=============  =========  ==================  ==================================================================

and dequantizes to ``scales[g] * (q - zero[g])``: exactly :mod:`viva_tensor.awq`'s ``int4_group`` record
(``(code - zero) * scale``, groups along ``in``), so reading and writing are bit for bit. v1 zeros are read
back with the whole-word ``+ 0x11111111`` (GPTQModel's rule, exact for every file it writes). An act-order
file (``desc_act=True``) whose ``g_idx`` is not ``i // group_size`` gives each input column its own group: it
is read into an ``int4_gidx`` record (:class:`viva_tensor.gidx.GIdxInt4Tensor`, the same buffers plus that
``g_idx``), which is written back byte for byte (``desc_act: true`` in :func:`quantization_config`).

Example:
    >>> import jax
    >>> from viva_tensor import awq
    >>> from viva_tensor.interop import gptq
    >>> q = awq.quantize_group(jax.random.normal(jax.random.key(0), (16, 64)), group_size=32)
    >>> layer = gptq.write_layer(q)
    >>> {k: (v.dtype.name, v.shape) for k, v in layer.items()}["qweight"]
    ('int32', (8, 16))
    >>> bool((awq.dequantize(gptq.read_layer(**layer, dtype="float32")) == awq.dequantize(q)).all())
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from viva_tensor import awq, gidx
from viva_tensor._formats.registry import is_quantized
from viva_tensor.errors import CheckpointError
from viva_tensor.interop import _int4

__all__ = ["FORMATS", "read_layer", "write_layer", "read_state_dict", "write_state_dict", "quantization_config"]

FORMATS = ("gptq", "gptq_v2")
_ONES = np.uint32(0x11111111)
_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def _arr(name: str, a: Any, dtype: Any, ndim: int) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.dtype(dtype) or a.ndim != ndim:
        raise CheckpointError(argument=name, expected=f"a {ndim}-D {np.dtype(dtype).name} array",
                              got=f"{a.dtype.name}{list(a.shape)}")
    return a


def _check_format(checkpoint_format: str) -> None:
    if checkpoint_format not in FORMATS:
        raise CheckpointError(argument="checkpoint_format", expected=" or ".join(map(repr, FORMATS)),
                              got=repr(checkpoint_format))


def read_layer(qweight: Any, qzeros: Any, scales: Any, g_idx: Any = None, *, checkpoint_format: str = "gptq",
               dtype: Any = "float16") -> awq.GroupInt4Tensor | gidx.GIdxInt4Tensor:
    """One GPTQ layer's tensors → an ``int4_group`` record of the ``(out, in)`` weight (``int4_gidx`` for act-order).

    Args:
        qweight, qzeros, scales, g_idx: the layer's tensors (``g_idx`` optional: then ``i // group_size``).
        checkpoint_format: ``"gptq"`` (v1, zero − 1 stored; the default on disk) or ``"gptq_v2"``.
        dtype: the dtype the record dequantizes to (the model's dtype).

    Raises:
        CheckpointError: tensors of the wrong dtype or shape, a group size that does not tile the input, a
            ``g_idx`` that is not a permutation of ``i // group_size`` (groups of ``group_size`` inputs).
    """
    _check_format(checkpoint_format)
    qweight = _arr("qweight", qweight, np.int32, 2)
    scales = _arr("scales", scales, np.float16, 2)
    qzeros = _arr("qzeros", qzeros, np.int32, 2)
    k, out = qweight.shape[0] * 8, qweight.shape[1]
    groups = scales.shape[0]
    if scales.shape != (groups, out) or qzeros.shape != (groups, -(-out // 8)) or groups == 0:
        raise CheckpointError(argument="scales", expected=f"scales [groups, {out}] and qzeros [groups, {out // 8}]",
                              got=f"{list(scales.shape)} and {list(qzeros.shape)}")
    group = -(-k // groups)
    if -(-k // group) != groups:
        raise CheckpointError(argument="scales", expected=f"a group count that tiles {k} inputs", got=str(groups))
    act_order = None
    if g_idx is not None:
        g_idx = _arr("g_idx", g_idx, np.int32, 1)
        if g_idx.shape != (k,) or not np.array_equal(np.sort(g_idx), np.arange(k) // group):
            raise CheckpointError(argument="g_idx", expected=f"{k} group indices, a permutation of i // {group}",
                                  got=f"{list(g_idx.shape)} values {g_idx[:8].tolist()}...")
        if not np.array_equal(g_idx, np.arange(k) // group):
            act_order = g_idx
    words = qzeros.view(np.uint32)
    if checkpoint_format == "gptq":
        words = words + _ONES  # uint32 arithmetic wraps, as GPTQModel's int32 addition
    zeros = _int4.unpack(words, 1)[:, :out]
    codes = _int4.unpack(qweight, 0)  # (in, out)
    q = _int4.group_record(codes.T, scales.T.copy(), zeros.T, group_size=group, dtype=dtype)
    return q if act_order is None else gidx.from_group_record(q, act_order)


def write_layer(q: awq.GroupInt4Tensor | gidx.GIdxInt4Tensor, *, checkpoint_format: str = "gptq"
                ) -> dict[str, np.ndarray]:
    """An ``int4_group`` (or act-order ``int4_gidx``) record of an ``(out, in)`` weight → the layer's GPTQ tensors.

    Raises:
        CheckpointError: another kind of record, or ``in`` / ``out`` not multiples of 8.
    """
    _check_format(checkpoint_format)
    g_idx = None
    if isinstance(q, gidx.GIdxInt4Tensor):
        g_idx = np.asarray(q.g_idx, np.int32)
        q = awq.GroupInt4Tensor(q.codes, q.scales, q.zeros, shape=q.shape, dtype=q.dtype, group_size=q.group_size)
    codes, scales, zeros = _int4.group_codes(q)
    out, k = codes.shape
    if out % 8 or k % 8:
        raise CheckpointError(argument="q", expected="a weight whose out and in are multiples of 8",
                              got=str(tuple(q.shape)))
    group = min(q.group_size, k)
    qzeros = _int4.pack(zeros.T, 1).view(np.uint32)
    if checkpoint_format == "gptq":
        qzeros = qzeros - _ONES
    return {"qweight": _int4.pack(codes.T, 0), "qzeros": qzeros.view(np.int32), "scales": scales.T.copy(),
            "g_idx": (np.arange(k) // group).astype(np.int32) if g_idx is None else g_idx}


def read_state_dict(tensors: Mapping[str, Any], *, checkpoint_format: str = "gptq", dtype: Any = "float16"
                    ) -> dict[str, Any]:
    """Every GPTQ layer of a state dict (``"<layer>.qweight"`` ...) → ``"<layer>.weight"``: an ``int4_group`` record
    (``int4_gidx`` where ``g_idx`` is an act-order permutation).

    The other tensors are returned as they are (NumPy arrays), in order.
    """
    out: dict[str, Any] = {}
    for key, value in tensors.items():
        if key.endswith(".qweight"):
            p = key[: -len("qweight")]
            parts = {n: tensors[p + n] for n in _PARTS if p + n in tensors}
            if {"qweight", "qzeros", "scales"} - set(parts):
                raise CheckpointError(argument=key, expected=f"{p}qzeros and {p}scales beside it", got="missing")
            out[p + "weight"] = read_layer(**parts, checkpoint_format=checkpoint_format, dtype=dtype)
        elif not any(key.endswith("." + n) for n in _PARTS[1:]):
            out[key] = np.asarray(value)
    return out


def write_state_dict(tensors: Mapping[str, Any], *, checkpoint_format: str = "gptq") -> dict[str, np.ndarray]:
    """The inverse of :func:`read_state_dict`: ``"<layer>.weight"`` records become the layer's GPTQ tensors."""
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if isinstance(value, (awq.GroupInt4Tensor, gidx.GIdxInt4Tensor)):
            if not key.endswith("weight"):
                raise CheckpointError(argument=key, expected="a record named '<layer>.weight'", got=repr(key))
            for n, a in write_layer(value, checkpoint_format=checkpoint_format).items():
                out[key[: -len("weight")] + n] = a
        elif is_quantized(value):
            raise CheckpointError(argument=key, expected="an int4_group or int4_gidx record or an array",
                                  got=f"a {value.format} record")
        else:
            out[key] = np.asarray(value)
    return out


def quantization_config(tensors: Mapping[str, Any], *, checkpoint_format: str = "gptq") -> dict:
    """The ``"quantization_config"`` of ``config.json`` for these records (transformers' ``GPTQConfig``)."""
    records = [v for v in tensors.values() if isinstance(v, (awq.GroupInt4Tensor, gidx.GIdxInt4Tensor))]
    groups = {min(v.group_size, v.shape[-1]) for v in records}
    if len(groups) > 1:
        raise CheckpointError(argument="tensors", expected="one group size for every layer", got=str(sorted(groups)))
    desc_act = any(isinstance(v, gidx.GIdxInt4Tensor) for v in records)
    return {"quant_method": "gptq", "bits": 4, "group_size": groups.pop() if groups else 128, "desc_act": desc_act,
            "sym": False, "checkpoint_format": checkpoint_format, "format": checkpoint_format}
