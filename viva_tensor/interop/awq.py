"""AutoAWQ GEMM checkpoints (``qweight``/``qzeros``/``scales``) ⇄ int4_group records.

AutoAWQ's ``WQLinear_GEMM`` stores a Linear layer ``(out, in)`` transposed and packed along the OUTPUT dim:

=============  =========  ========================  ============================================================
``qweight``    int32      ``[in, out / 8]``         nibble i (bits 4i..4i+3) of ``qweight[r, w]`` is the code of
                                                    input r, output ``8w + [0, 2, 4, 6, 1, 3, 5, 7][i]``
``qzeros``     int32      ``[in / group, out / 8]`` true zero points (no "minus one"), the same interleave
``scales``     float16    ``[in / group, out]``
=============  =========  ========================  ============================================================

and dequantizes to ``(q - zero) * scale`` — :mod:`viva_tensor.awq`'s ``int4_group`` record, bit for bit. The
per-channel AWQ scales were folded into the previous layer before the file was written, so a layer here is a
plain ``int4_group`` record (not ``awq_int4``, whose record keeps those scales).

Example:
    >>> import jax
    >>> from viva_tensor import awq
    >>> from viva_tensor.interop import awq as awq_file
    >>> q = awq.quantize_group(jax.random.normal(jax.random.key(0), (16, 64)), group_size=32)
    >>> layer = awq_file.write_layer(q)
    >>> layer["qweight"].shape, layer["scales"].shape
    ((64, 2), (2, 16))
    >>> bool((awq.dequantize(awq_file.read_layer(**layer, dtype="float32")) == awq.dequantize(q)).all())
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from viva_tensor import awq
from viva_tensor._formats.registry import is_quantized
from viva_tensor.errors import CheckpointError
from viva_tensor.interop import _int4

__all__ = ["read_layer", "write_layer", "read_state_dict", "write_state_dict", "quantization_config"]

_PARTS = ("qweight", "qzeros", "scales")


def _arr(name: str, a: Any, dtype: Any) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.dtype(dtype) or a.ndim != 2:
        raise CheckpointError(argument=name, expected=f"a 2-D {np.dtype(dtype).name} array",
                              got=f"{a.dtype.name}{list(a.shape)}")
    return a


def read_layer(qweight: Any, qzeros: Any, scales: Any, *, dtype: Any = "float16") -> awq.GroupInt4Tensor:
    """One AutoAWQ GEMM layer's tensors → an ``int4_group`` record of the ``(out, in)`` weight.

    Raises:
        CheckpointError: tensors of the wrong dtype or of shapes that do not fit together.
    """
    qweight, qzeros, scales = _arr("qweight", qweight, np.int32), _arr("qzeros", qzeros, np.int32), \
        _arr("scales", scales, np.float16)
    k, out = qweight.shape[0], qweight.shape[1] * 8
    groups = scales.shape[0]
    if groups == 0 or k % groups or scales.shape != (groups, out) or qzeros.shape != (groups, out // 8):
        raise CheckpointError(argument="scales", expected=f"scales [groups, {out}] and qzeros [groups, {out // 8}] "
                              f"with groups dividing {k}", got=f"{list(scales.shape)} and {list(qzeros.shape)}")
    codes = _int4.unpack(qweight, 1, _int4.AWQ_ORDER)  # (in, out)
    zeros = _int4.unpack(qzeros, 1, _int4.AWQ_ORDER)  # (groups, out)
    return _int4.group_record(codes.T, scales.T.copy(), zeros.T, group_size=k // groups, dtype=dtype)


def write_layer(q: awq.GroupInt4Tensor) -> dict[str, np.ndarray]:
    """An ``int4_group`` record of an ``(out, in)`` weight → the layer's AutoAWQ GEMM tensors (NumPy).

    Raises:
        CheckpointError: another kind of record, ``out`` not a multiple of 8, or a group size that does not
            divide ``in``.
    """
    codes, scales, zeros = _int4.group_codes(q)
    out, k = codes.shape
    group = min(q.group_size, k)
    if out % 8 or k % group:
        raise CheckpointError(argument="q", expected="out a multiple of 8 and a group size dividing in",
                              got=f"shape {tuple(q.shape)}, group size {group}")
    return {"qweight": _int4.pack(codes.T, 1, _int4.AWQ_ORDER), "qzeros": _int4.pack(zeros.T, 1, _int4.AWQ_ORDER),
            "scales": scales.T.copy()}


def read_state_dict(tensors: Mapping[str, Any], *, dtype: Any = "float16") -> dict[str, Any]:
    """Every AWQ layer of a state dict (``"<layer>.qweight"`` ...) → ``"<layer>.weight"``: an ``int4_group`` record."""
    out: dict[str, Any] = {}
    for key, value in tensors.items():
        if key.endswith(".qweight"):
            p = key[: -len("qweight")]
            if any(p + n not in tensors for n in _PARTS):
                raise CheckpointError(argument=key, expected=f"{p}qzeros and {p}scales beside it", got="missing")
            out[p + "weight"] = read_layer(*(tensors[p + n] for n in _PARTS), dtype=dtype)
        elif not any(key.endswith("." + n) for n in _PARTS[1:]):
            out[key] = np.asarray(value)
    return out


def write_state_dict(tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse of :func:`read_state_dict`."""
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if isinstance(value, awq.GroupInt4Tensor):
            if not key.endswith("weight"):
                raise CheckpointError(argument=key, expected="a record named '<layer>.weight'", got=repr(key))
            for n, a in write_layer(value).items():
                out[key[: -len("weight")] + n] = a
        elif is_quantized(value):
            raise CheckpointError(argument=key, expected="an int4_group record or an array",
                                  got=f"a {value.format} record")
        else:
            out[key] = np.asarray(value)
    return out


def quantization_config(tensors: Mapping[str, Any]) -> dict:
    """The ``"quantization_config"`` of ``config.json`` that AutoAWQ writes (``version: "gemm"``)."""
    groups = {min(v.group_size, v.shape[-1]) for v in tensors.values() if isinstance(v, awq.GroupInt4Tensor)}
    if len(groups) > 1:
        raise CheckpointError(argument="tensors", expected="one group size for every layer", got=str(sorted(groups)))
    return {"quant_method": "awq", "zero_point": True, "group_size": groups.pop() if groups else 128, "bits": 4,
            "version": "gemm", "modules_to_not_convert": None}
