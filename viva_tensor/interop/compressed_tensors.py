"""compressed-tensors checkpoints (llm-compressor, vLLM): ``pack-quantized`` int4/int8 and
``nvfp4-pack-quantized``, read into records and written back.

A compressed Linear layer ``(out, in)`` is stored under ``"<layer>.weight_<part>"``:

``pack-quantized`` (integer weights, offset binary: the stored code is ``q + 2**(bits - 1)``)
    ``weight_packed`` int32 ``[out, in * bits / 32]`` (element i of a row at bits ``i*bits ...`` of the row's
    words, first element lowest), ``weight_scale`` ``[out, groups]`` (``[out, 1]`` per channel) in the
    model's dtype, ``weight_zero_point`` int32 ``[ceil(out * bits / 32), groups]`` (asymmetric only, packed
    along the OUTPUT dim), ``weight_shape`` int64 ``[2]``. Dequantizes to ``(q - zero_point) * scale``.
``nvfp4-pack-quantized``
    ``weight_packed`` uint8 ``[out, in / 2]`` (E2M1 codes, first value of a pair in the low nibble),
    ``weight_scale`` float8_e4m3fn ``[out, in / 16]``, ``weight_global_scale`` float32 ``[1]``
    (``448 * 6 / amax``). Dequantizes to ``code * (weight_scale / weight_global_scale)``.

4-bit integer layers become :mod:`viva_tensor.awq` ``int4_group`` records (unsigned code ``q + 8``, zero point
``zp + 8``, 8 for symmetric layers: the same ``(code - zero) * scale``), with the scales kept in the file's
dtype, so the dequantized weight equals compressed-tensors' own bit for bit. Symmetric 8-bit layers become
``int8`` records (per channel or per group). NVFP4 layers become :class:`~viva_tensor.blackwell.NVFP4Tensor`
records whose codes and block scales are the file's bytes; the tensor scale is stored here as
``1 / weight_global_scale`` rounded to float32, so a value decodes as ``code * scale * (1 / g)`` rather than
``code * (scale / g)``: at most one float32 rounding apart (measured in the tests).

Example:
    >>> import jax
    >>> from viva_tensor import awq
    >>> from viva_tensor.interop import compressed_tensors as ct
    >>> q = awq.quantize_group(jax.random.normal(jax.random.key(0), (16, 256)), group_size=128)
    >>> sd, config = ct.write_state_dict({"fc.weight": q})
    >>> sorted(sd), config["format"]
    (['fc.weight_packed', 'fc.weight_scale', 'fc.weight_shape', 'fc.weight_zero_point'], 'pack-quantized')
    >>> r = ct.read_state_dict(sd, config, dtype="float32")["fc.weight"]
    >>> bool((awq.dequantize(r) == awq.dequantize(q)).all())
    True
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from viva_tensor import awq, blackwell, compression
from viva_tensor._formats.registry import is_quantized
from viva_tensor.errors import CheckpointError
from viva_tensor.interop import _int4

__all__ = ["read_state_dict", "write_state_dict", "quantization_config", "is_compressed_tensors"]

_PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_global_scale", "weight_g_idx")
_FLOATS = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def is_compressed_tensors(config: Mapping[str, Any] | None) -> bool:
    """Whether a ``quantization_config`` (from ``config.json``) is compressed-tensors'."""
    return isinstance(config, Mapping) and config.get("quant_method") == "compressed-tensors"


def _scheme_for(layer: str, config: Mapping[str, Any]) -> tuple[str, dict]:
    """The format and weight arguments of the config group whose targets match ``layer``."""
    groups = config.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise CheckpointError(argument="config", expected="a quantization_config with config_groups", got=repr(config))
    for group in groups.values():
        targets = group.get("targets", []) if isinstance(group, Mapping) else []
        for t in targets:
            if t == "Linear" or t == layer or (isinstance(t, str) and t.startswith("re:")
                                               and re.fullmatch(t[3:], layer)):
                weights = group.get("weights")
                if not isinstance(weights, Mapping):
                    break
                return group.get("format", config.get("format")), dict(weights)
    raise CheckpointError(argument="config", expected=f"a config group whose targets match {layer!r}",
                          got=str([g.get("targets") for g in groups.values() if isinstance(g, Mapping)]))


def _unpack_bits(words: np.ndarray, bits: int, n: int, axis: int) -> np.ndarray:
    """Dense LSB-first unpacking of ``n`` values of ``bits`` bits along ``axis`` of int32 words."""
    if bits == 4:
        return np.take(_int4.unpack(words, axis), np.arange(n), axis=axis)
    if bits == 8:
        w = np.moveaxis(np.asarray(words).view(np.uint32), axis, -1)
        v = ((w[..., None] >> np.arange(0, 32, 8, dtype=np.uint32)) & 0xFF).astype(np.uint8)
        return np.moveaxis(v.reshape(*w.shape[:-1], -1)[..., :n], -1, axis)
    raise CheckpointError(argument="num_bits", expected="4 or 8", got=str(bits))


def _pack_bits(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
    per = 32 // bits
    v = np.moveaxis(np.asarray(values, np.uint32), axis, -1)
    pad = -v.shape[-1] % per
    v = np.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, pad)])
    groups = v.reshape(*v.shape[:-1], -1, per) << np.arange(0, 32, bits, dtype=np.uint32)
    return np.moveaxis(np.bitwise_or.reduce(groups, axis=-1).astype(np.uint32).view(np.int32), -1, axis)


def _scale_array(a: Any, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.name not in _FLOATS or a.ndim != 2:
        raise CheckpointError(argument=name, expected="2-D float32/float16/bfloat16 scales", got=f"{a.dtype}{a.shape}")
    return a


def _int_layer(p: str, parts: dict, weights: dict, dtype: Any) -> Any:
    bits = weights.get("num_bits")
    shape = parts.get("weight_shape")
    if shape is None or np.asarray(shape).shape != (2,):
        raise CheckpointError(argument=p + "weight_shape", expected="the [out, in] of the weight", got=repr(shape))
    out, k = (int(d) for d in np.asarray(shape))
    scale = _scale_array(parts["weight_scale"], p + "weight_scale")
    groups = scale.shape[1]
    if scale.shape[0] != out or groups == 0 or -(-k // -(-k // groups)) != groups:
        raise CheckpointError(argument=p + "weight_scale", expected=f"[{out}, groups]", got=str(list(scale.shape)))
    group = -(-k // groups)
    codes = _unpack_bits(parts["weight_packed"], bits, k, 1)
    mid = 1 << (bits - 1)
    symmetric = weights.get("symmetric", True)
    if symmetric:
        zeros = np.full((out, groups), mid, np.uint8)
    elif "weight_zero_point" not in parts:
        raise CheckpointError(argument=p + "weight_zero_point", expected="zero points of an asymmetric layer",
                              got="none")
    else:
        zeros = _unpack_bits(parts["weight_zero_point"], bits, out, 0)
    if "weight_g_idx" in parts and not np.array_equal(np.asarray(parts["weight_g_idx"]), np.arange(k) // group):
        raise CheckpointError(argument=p + "weight_g_idx", expected=f"i // {group}", got="a permuted g_idx",
                              hint="activation-ordered groups cannot be held by an int4_group/int8 record.")
    if bits == 4:
        if scale.dtype == np.float16:
            return _int4.group_record(codes, scale, zeros, group_size=group, dtype=dtype)
        rec = _int4.group_record(codes, np.zeros(scale.shape, np.float16), zeros, group_size=group, dtype=dtype)
        return rec.replace(scales=jnp.asarray(scale))  # the file's scale dtype, exactly
    if not symmetric:
        raise CheckpointError(argument=p + "weight_zero_point", expected="a symmetric 8-bit layer",
                              got="an asymmetric one", hint="viva_tensor's int8 format has no zero points.")
    q = (codes.astype(np.int16) - mid).astype(np.int8)
    scale32 = scale.astype(np.float32)
    if groups == 1:
        return compression.Int8Tensor(jnp.asarray(q), jnp.asarray(scale32), shape=(out, k), dtype=jnp.dtype(dtype),
                                      axis=0)
    if k % group:
        raise CheckpointError(argument=p + "weight_scale", expected=f"groups dividing {k}", got=str(group))
    return compression.Int8Tensor(jnp.asarray(q.reshape(-1, group)), jnp.asarray(scale32.reshape(-1, 1)),
                                  shape=(out, k), dtype=jnp.dtype(dtype), block_size=group)


def _nvfp4_layer(p: str, parts: dict, dtype: Any) -> blackwell.NVFP4Tensor:
    packed = np.asarray(parts["weight_packed"])
    scale = np.asarray(parts["weight_scale"])
    g = np.asarray(parts.get("weight_global_scale"), np.float32).reshape(-1)
    if packed.dtype != np.uint8 or packed.ndim != 2 or scale.dtype != ml_dtypes.float8_e4m3fn or g.shape != (1,):
        raise CheckpointError(argument=p + "weight_packed", expected="uint8 codes, float8_e4m3fn scales and one "
                              "float32 global scale", got=f"{packed.dtype}, {scale.dtype}, {g.shape}")
    out, k = packed.shape[0], packed.shape[1] * 2
    if scale.shape != (out, -(-k // 16)):
        raise CheckpointError(argument=p + "weight_scale", expected=f"[{out}, {-(-k // 16)}]", got=str(scale.shape))
    tensor_scale = np.float32(1.0) / g[0]
    return blackwell.NVFP4Tensor(codes=jnp.asarray(packed), scales=jnp.asarray(scale),
                                 tensor_scale=jnp.asarray(tensor_scale), shape=(out, k), dtype=jnp.dtype(dtype))


def read_state_dict(tensors: Mapping[str, Any], config: Mapping[str, Any], *, dtype: Any = None) -> dict[str, Any]:
    """Every compressed layer of a state dict (``"<layer>.weight_packed"`` ...) → ``"<layer>.weight"``: a record.

    Args:
        tensors: name → array (NumPy, as read from the safetensors files).
        config: the ``quantization_config`` of ``config.json``.
        dtype: the dtype records dequantize to (default: the scales' dtype, float32 for NVFP4).

    Raises:
        CheckpointError: a config that is not compressed-tensors', a layer no config group targets, parts
            of the wrong dtype or shape, a scheme viva_tensor has no record for (3/5/6/7-bit, asymmetric int8,
            FP8 weights, activation-ordered groups).
    """
    if not is_compressed_tensors(config):
        raise CheckpointError(argument="config", expected="quant_method 'compressed-tensors'",
                              got=repr(config.get("quant_method") if isinstance(config, Mapping) else config))
    out: dict[str, Any] = {}
    for key, value in tensors.items():
        if key.endswith(".weight_packed"):
            p = key[: -len("weight_packed")]
            parts = {n: np.asarray(tensors[p + n]) for n in _PARTS if p + n in tensors}
            fmt, weights = _scheme_for(p[:-1], config)
            if fmt == "nvfp4-pack-quantized":
                out[p + "weight"] = _nvfp4_layer(p, parts, dtype or jnp.float32)
            elif fmt == "pack-quantized" and weights.get("type", "int") == "int":
                layer_dtype = dtype or _FLOATS.get(np.asarray(parts.get("weight_scale")).dtype.name, np.float32)
                out[p + "weight"] = _int_layer(p, parts, weights, layer_dtype)
            else:
                raise CheckpointError(argument="config", expected="pack-quantized int or nvfp4-pack-quantized",
                                      got=f"{fmt!r} ({weights.get('type')})")
        elif not any(key.endswith("." + n) for n in _PARTS):
            out[key] = np.asarray(value)
    return out


def _write_int4(q: awq.GroupInt4Tensor) -> dict[str, np.ndarray]:
    codes, scales, zeros = _int4.group_codes(q)
    out, k = codes.shape
    return {"weight_packed": _pack_bits(codes, 4, 1), "weight_scale": scales,
            "weight_zero_point": _pack_bits(zeros, 4, 0), "weight_shape": np.array([out, k], np.int64)}


def _write_nvfp4(q: blackwell.NVFP4Tensor) -> dict[str, np.ndarray]:
    if q.batch_shape or len(q.shape) != 2 or q.shape[1] % 16:
        raise CheckpointError(argument="q", expected="an nvfp4 record of a 2-D weight with in a multiple of 16",
                              got=str(q.shape))
    t = np.asarray(q.tensor_scale, np.float32)
    return {"weight_packed": np.asarray(q.codes), "weight_scale": np.asarray(q.scales),
            "weight_global_scale": (np.float32(1.0) / t).reshape(1)}


def write_state_dict(tensors: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
    """A compressed-tensors state dict and its ``quantization_config`` from int4_group or nvfp4 records.

    Records must be named ``"<layer>.weight"`` and all be of one kind (the config has one group that
    targets every Linear layer).

    Raises:
        CheckpointError: other records, a mix of kinds, or shapes the format cannot pack.
    """
    out: dict[str, np.ndarray] = {}
    kinds: set[str] = set()
    groups: set[int] = set()
    for key, value in tensors.items():
        if isinstance(value, (awq.GroupInt4Tensor, blackwell.NVFP4Tensor)) and not isinstance(value, awq.AWQTensor):
            if not key.endswith("weight"):
                raise CheckpointError(argument=key, expected="a record named '<layer>.weight'", got=repr(key))
            if isinstance(value, awq.GroupInt4Tensor):
                parts, kind = _write_int4(value), "int4"
                groups.add(min(value.group_size, value.shape[-1]))
            else:
                parts, kind = _write_nvfp4(value), "nvfp4"
            kinds.add(kind)
            out.update({key[: -len("weight")] + n: a for n, a in parts.items()})
        elif is_quantized(value):
            raise CheckpointError(argument=key, expected="an int4_group or nvfp4 record, or an array",
                                  got=f"a {value.format} record")
        else:
            out[key] = np.asarray(value)
    if len(kinds) > 1 or len(groups) > 1:
        raise CheckpointError(argument="tensors", expected="records of one kind and one group size",
                              got=f"{sorted(kinds)}, group sizes {sorted(groups)}")
    return out, quantization_config(kinds.pop() if kinds else "int4", group_size=groups.pop() if groups else 128)


def quantization_config(kind: str, *, group_size: int = 128) -> dict:
    """The ``quantization_config`` of ``config.json`` for ``kind`` ``"int4"`` (asymmetric groups) or ``"nvfp4"``."""
    if kind == "nvfp4":
        fmt = "nvfp4-pack-quantized"
        weights = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
                   "dynamic": False, "actorder": None, "observer": "memoryless_minmax",
                   "scale_dtype": "torch.float8_e4m3fn"}
    elif kind == "int4":
        fmt = "pack-quantized"
        weights = {"num_bits": 4, "type": "int", "symmetric": False, "group_size": int(group_size),
                   "strategy": "group", "dynamic": False, "actorder": None, "observer": "memoryless_minmax",
                   "zp_dtype": "torch.int8"}
    else:
        raise CheckpointError(argument="kind", expected="'int4' or 'nvfp4'", got=repr(kind))
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"format": fmt, "targets": ["Linear"], "input_activations": None,
                                          "output_activations": None, "weights": weights}},
            "ignore": [], "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {}}
