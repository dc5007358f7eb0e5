"""bitsandbytes 4-bit checkpoints as ``transformers`` saves them, read into NF4 records and written back.

A ``bnb.nn.Linear4bit`` layer saves its ``weight`` as the packed 4-bit codes (uint8 ``[ceil(n / 2), 1]``,
the first value of each pair in the HIGH nibble — the same bytes as :class:`viva_tensor.nf4.NF4Tensor`'s
``codes``) beside its quantization state, each under ``"<layer>.weight.<key>"``:

=============================================  =====================================================
``absmax``                                     float32 per block of 64 (uint8 codes with double quant)
``quant_map``                                  the 16-value NF4 code book (float32)
``nested_absmax``, ``nested_quant_map``        double quant only: float32 per 256 blocks, and the
                                               signed 8-bit dynamic map (256 values)
``quant_state.bitsandbytes__nf4``              uint8 bytes of a JSON dict: ``quant_type``, ``blocksize``,
                                               ``dtype``, ``shape`` and, with double quant,
                                               ``nested_blocksize``, ``nested_dtype``, ``nested_offset``
=============================================  =====================================================

:func:`read_state_dict` turns each such group into one record under ``"<layer>.weight"`` — an
:class:`~viva_tensor.nf4.NF4Tensor`, or an :class:`~viva_tensor.nf4.NF4DQTensor` with double
quantization — bit for bit (the code book and dynamic map are checked against NF4's, the nested offset
is the float32 of the JSON number). :func:`write_state_dict` is its inverse, so files written here load in
bitsandbytes (``QuantState.from_dict`` + ``dequantize_4bit``) to the same weights. bitsandbytes' own FP4
(``bitsandbytes__fp4``, its 16-value code book :data:`viva_tensor.nf4.FP4_CODE_BOOK`, not OCP E2M1) is read
the same way into :class:`~viva_tensor.nf4.FP4Tensor` / :class:`~viva_tensor.nf4.FP4DQTensor`.

Example:
    >>> import jax, numpy as np
    >>> from viva_tensor import nf4
    >>> from viva_tensor.interop import bnb
    >>> w = jax.random.normal(jax.random.key(0), (8, 64))
    >>> sd = bnb.write_state_dict({"fc.weight": nf4.double_quantize(w), "fc.bias": np.zeros(8, np.float32)})
    >>> sorted(sd)[:3], sd["fc.weight"].shape
    (['fc.bias', 'fc.weight', 'fc.weight.absmax'], (256, 1))
    >>> back = bnb.read_state_dict(sd)
    >>> bool((nf4.dequantize(back["fc.weight"]) == nf4.dequantize(nf4.double_quantize(w))).all())
    True
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from viva_tensor import nf4
from viva_tensor._formats.registry import is_quantized
from viva_tensor._safetensors import loads_json
from viva_tensor.errors import CheckpointError

__all__ = ["STATE_KEY", "is_bnb", "read_state_dict", "write_state_dict", "quantization_config"]

STATE_KEY = "quant_state.bitsandbytes__"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_RECORDS = (nf4.NF4Tensor, nf4.NF4DQTensor, nf4.FP4Tensor, nf4.FP4DQTensor)
# quant_type -> (code book, record, record with double quantization)
_KINDS = {"nf4": (nf4.NF4_LEVELS, nf4.NF4Tensor, nf4.NF4DQTensor),
          "fp4": (nf4.FP4_CODE_BOOK, nf4.FP4Tensor, nf4.FP4DQTensor)}


def is_bnb(tensors: Mapping[str, Any]) -> bool:
    """Whether a state dict holds bitsandbytes 4-bit layers (a ``...weight.quant_state.bitsandbytes__*`` key)."""
    return any(STATE_KEY in k for k in tensors)


def _state_json(name: str, raw: Any) -> dict:
    a = np.asarray(raw)
    if a.dtype != np.uint8 or a.ndim != 1:
        raise CheckpointError(argument=name, expected="uint8 bytes of a JSON dict (1-D)", got=f"{a.dtype}{a.shape}")
    state = loads_json(a.tobytes(), what=f"the bitsandbytes quant state {name!r}")
    if not isinstance(state, dict):
        raise CheckpointError(argument=name, expected="a JSON dict", got=type(state).__name__)
    return state


def _need(state: dict, key: str, kind: type | tuple, where: str) -> Any:
    v = state.get(key)
    if not isinstance(v, kind) or isinstance(v, bool):
        kind_name = getattr(kind, "__name__", "a number")
        raise CheckpointError(argument=where, expected=f"a quant state with {key!r} ({kind_name})", got=repr(v))
    return v


def _take(tensors: Mapping[str, Any], key: str, dtype: Any, shape: tuple | None, used: set) -> np.ndarray:
    if key not in tensors:
        raise CheckpointError(argument="tensors", expected=f"a tensor {key!r}", got="none")
    a = np.asarray(tensors[key])
    if a.dtype != np.dtype(dtype) or (shape is not None and a.shape != shape):
        want = f"{np.dtype(dtype).name}{list(shape) if shape is not None else ''}"
        raise CheckpointError(argument=key, expected=want, got=f"{a.dtype.name}{list(a.shape)}")
    used.add(key)
    return a


def _layer(tensors: Mapping[str, Any], weight: str, state_key: str, used: set) -> Any:
    state = _state_json(state_key, tensors[state_key])
    used.add(state_key)
    quant_type = state.get("quant_type")
    if quant_type not in _KINDS or not state_key.endswith(str(quant_type)):
        raise CheckpointError(argument=state_key, expected="an NF4 quant state (quant_type 'nf4') or an FP4 one "
                              "('fp4'), the same as its key's suffix", got=repr(quant_type))
    book, plain, double = _KINDS[quant_type]
    block = _need(state, "blocksize", int, state_key)
    shape = tuple(_need(state, "shape", list, state_key))
    dtype = _DTYPES.get(state.get("dtype"))
    if dtype is None or not all(isinstance(d, int) and d >= 0 for d in shape) or block <= 0 or block % 2:
        raise CheckpointError(argument=state_key, expected="a dtype of float32/bfloat16/float16, a shape of ints "
                              "and a positive even blocksize", got=repr(state))
    n = math.prod(shape)
    raw = np.asarray(tensors.get(weight)) if weight in tensors else None
    if raw is None or raw.ndim != 2 or raw.shape[1] != 1 or raw.nbytes != -(-n // 2):
        got = "none" if raw is None else f"{raw.dtype}{list(raw.shape)}"
        raise CheckpointError(argument=weight, expected=f"packed codes of {-(-n // 2)} bytes, shape [k, 1]", got=got)
    used.add(weight)
    codes = jnp.asarray(np.ascontiguousarray(raw).view(np.uint8).reshape(-1))
    nb = -(-n // block)
    qmap = _take(tensors, weight + ".quant_map", np.float32, (16,), used)
    if not np.array_equal(qmap.view(np.uint32), book.astype(np.float32).view(np.uint32)):
        raise CheckpointError(argument=weight + ".quant_map", expected=f"the {quant_type.upper()} code book",
                              got=str(qmap.tolist()))
    absmax_key = weight + ".absmax"
    if "nested_offset" not in state:
        absmax = _take(tensors, absmax_key, np.float32, (nb,), used)
        return plain(codes, jnp.asarray(absmax), shape=shape, dtype=jnp.dtype(dtype), block_size=block)
    nested = _need(state, "nested_blocksize", int, state_key)
    offset = _need(state, "nested_offset", (int, float), state_key)
    if nested <= 0 or state.get("nested_dtype", "float32") != "float32":
        raise CheckpointError(argument=state_key, expected="a positive nested_blocksize and nested_dtype float32",
                              got=repr(state))
    codes8 = _take(tensors, absmax_key, np.uint8, (nb,), used)
    nested_absmax = _take(tensors, weight + ".nested_absmax", np.float32, (-(-nb // nested),), used)
    nmap = _take(tensors, weight + ".nested_quant_map", np.float32, (256,), used)
    if not np.array_equal(nmap.view(np.uint32), np.asarray(nf4.DYNAMIC_MAP, np.float32).view(np.uint32)):
        raise CheckpointError(argument=weight + ".nested_quant_map", expected="bitsandbytes' signed dynamic map",
                              got="another map")
    return double(codes, jnp.asarray(codes8), jnp.asarray(nested_absmax), jnp.asarray(np.float32(offset)),
                           shape=shape, dtype=jnp.dtype(dtype), block_size=block, nested_block_size=nested)


def read_state_dict(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """NF4 (or FP4) records for every bitsandbytes 4-bit layer of a state dict; the other tensors as they are.

    Args:
        tensors: name → array, as a ``transformers`` bitsandbytes checkpoint holds them (NumPy arrays from
            a safetensors file).

    Returns:
        A dict in the same order: ``"<layer>.weight"`` → :class:`~viva_tensor.nf4.NF4Tensor` /
        :class:`~viva_tensor.nf4.NF4DQTensor` (``quant_type`` ``"fp4"``: :class:`~viva_tensor.nf4.FP4Tensor` /
        :class:`~viva_tensor.nf4.FP4DQTensor`), every other tensor → a ``jax.Array`` (or the NumPy array
        when JAX would change its dtype, e.g. int64 without x64).

    Raises:
        CheckpointError: a malformed quant state, a missing or mis-shaped companion tensor, a code book that is
            not the one its ``quant_type`` names.
    """
    used: set = set()
    layers = {}
    for key in tensors:
        if STATE_KEY in key:
            weight = key[: key.index(STATE_KEY)].rstrip(".")
            layers[weight] = _layer(tensors, weight, key, used)
    out: dict[str, Any] = {}
    for key, value in tensors.items():
        if key in layers:
            out[key] = layers[key]
        elif key not in used:
            a = np.asarray(value)
            out[key] = a if jax.dtypes.canonicalize_dtype(a.dtype) != a.dtype else jnp.asarray(a)
    return out


def _state_bytes(state: dict) -> np.ndarray:
    return np.frombuffer(json.dumps(state).encode(), np.uint8).copy()


def _quant_type(q: Any) -> str:
    return "fp4" if isinstance(q, (nf4.FP4Tensor, nf4.FP4DQTensor)) else "nf4"


def _write_layer(name: str, q: Any, out: dict) -> None:
    n = math.prod(q.shape)
    if q.batch_shape:
        raise CheckpointError(argument=name, expected="a record made outside vmap", got=f"batch dims {q.batch_shape}")
    kind = _quant_type(q)
    book = _KINDS[kind][0].astype(np.float32)
    state = {"quant_type": kind, "blocksize": int(q.block_size), "dtype": jnp.dtype(q.dtype).name,
             "shape": [int(d) for d in q.shape]}
    out[name] = np.asarray(q.codes).reshape(-(-n // 2), 1)
    if isinstance(q, (nf4.NF4DQTensor, nf4.FP4DQTensor)):
        out[name + ".absmax"] = np.asarray(q.absmax_codes)
        out[name + ".quant_map"] = book
        out[name + ".nested_absmax"] = np.asarray(q.nested_absmax)
        out[name + ".nested_quant_map"] = np.asarray(nf4.DYNAMIC_MAP, np.float32)
        state.update(nested_blocksize=int(q.nested_block_size), nested_dtype="float32",
                     nested_offset=float(np.asarray(q.offset, np.float32)))
    else:
        out[name + ".absmax"] = np.asarray(q.absmax)
        out[name + ".quant_map"] = book
    out[name + "." + STATE_KEY + kind] = _state_bytes(state)


def write_state_dict(tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A bitsandbytes 4-bit state dict (NumPy arrays) from NF4 (or bitsandbytes FP4) records and plain arrays.

    Args:
        tensors: name → :class:`~viva_tensor.nf4.NF4Tensor` / :class:`~viva_tensor.nf4.NF4DQTensor` (or
            :class:`~viva_tensor.nf4.FP4Tensor` / :class:`~viva_tensor.nf4.FP4DQTensor`) or an array. Name a
            weight record ``"<layer>.weight"``, as ``transformers`` does.

    Returns:
        name → NumPy array, ready for ``safetensors.numpy.save_file`` (or :func:`viva_tensor.interop.save`).

    Raises:
        CheckpointError: a record of another format (bitsandbytes stores only NF4/FP4 this way), or made
            under ``vmap``.
    """
    out: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if isinstance(value, _RECORDS):
            _write_layer(name, value, out)
        elif is_quantized(value):
            raise CheckpointError(argument=name, expected="an NF4 record (nf4 or nf4_dq), an FP4 one (bnb_fp4 or "
                                  "bnb_fp4_dq) or an array", got=f"a {value.format} record",
                                  hint="quantize it with quant.quantize(w, 'nf4_dq').")
        else:
            out[name] = np.asarray(value)
    return out


def quantization_config(tensors: Mapping[str, Any]) -> dict:
    """The ``"quantization_config"`` of ``config.json`` that ``transformers`` writes for these records.

    Raises:
        CheckpointError: NF4 and FP4 records together (``transformers`` names one ``bnb_4bit_quant_type``).
    """
    records = [v for v in tensors.values() if isinstance(v, _RECORDS)]
    kinds = {_quant_type(v) for v in records}
    if len(kinds) > 1:
        raise CheckpointError(argument="tensors", expected="records of one bitsandbytes quant_type (nf4 or fp4)",
                              got="both", hint="quantize every layer with the same format.")
    dq = any(isinstance(v, (nf4.NF4DQTensor, nf4.FP4DQTensor)) for v in records)
    dtype = jnp.dtype(records[0].dtype).name if records else "float32"
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": kinds.pop() if kinds else "nf4", "bnb_4bit_use_double_quant": dq,
            "bnb_4bit_compute_dtype": dtype,
            "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}
