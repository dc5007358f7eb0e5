"""Int4 codes in int32 words, as GPTQ, AutoAWQ and compressed-tensors pack them (private).

All three put eight 4-bit codes in one int32 word, the first in bits 0-3 ("LSB first"); they differ in
the axis they pack along and in the order of the eight codes within a word (AutoAWQ interleaves them).
The helpers here work on NumPy arrays: packing is file layout, done once on load or save.
"""

from __future__ import annotations

import numpy as np

from viva_tensor import awq
from viva_tensor.errors import CheckpointError

__all__ = ["SEQUENTIAL", "AWQ_ORDER", "pack", "unpack", "group_codes", "group_record"]

SEQUENTIAL = (0, 1, 2, 3, 4, 5, 6, 7)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds element 8w + AWQ_ORDER[i]
_SHIFTS = np.arange(0, 32, 4, dtype=np.uint32)


def pack(codes: np.ndarray, axis: int, order: tuple[int, ...] = SEQUENTIAL) -> np.ndarray:
    """Codes 0..15 → int32 words, eight per word along ``axis`` (whose length must be a multiple of 8)."""
    codes = np.moveaxis(np.asarray(codes, np.uint32), axis, -1)
    if codes.shape[-1] % 8:
        raise CheckpointError(argument="codes", expected="a multiple of 8 values along the packed axis",
                              got=str(codes.shape[-1]))
    groups = codes.reshape(*codes.shape[:-1], -1, 8)[..., list(order)]
    words = np.bitwise_or.reduce(groups << _SHIFTS, axis=-1).astype(np.uint32)
    return np.moveaxis(words.view(np.int32), -1, axis)


def unpack(words: np.ndarray, axis: int, order: tuple[int, ...] = SEQUENTIAL) -> np.ndarray:
    """int32 words → codes 0..15 (uint8), eight per word along ``axis``: the inverse of :func:`pack`."""
    w = np.moveaxis(np.asarray(words).view(np.uint32), axis, -1)
    nibbles = ((w[..., None] >> _SHIFTS) & 0xF).astype(np.uint8)
    codes = np.empty_like(nibbles)
    codes[..., list(order)] = nibbles
    return np.moveaxis(codes.reshape(*w.shape[:-1], -1), -1, axis)


def group_codes(q: awq.GroupInt4Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A group-int4 record's codes ``(out, in)``, float16 scales and zero points ``(out, n_groups)`` (uint8)."""
    if not isinstance(q, awq.GroupInt4Tensor) or q.batch_shape or len(q.shape) != 2:
        raise CheckpointError(argument="q", expected="an int4_group record of a 2-D (out, in) weight",
                              got=type(q).__name__)
    out, k = q.shape
    ng = np.asarray(q.scales).shape[-1]
    codes = np.stack([np.asarray(q.codes) & 0xF, np.asarray(q.codes) >> 4], -1).reshape(out, -1)[:, :k]
    zeros = np.stack([np.asarray(q.zeros) & 0xF, np.asarray(q.zeros) >> 4], -1).reshape(out, -1)[:, :ng]
    return codes, np.asarray(q.scales), zeros


def _pairs(codes: np.ndarray) -> np.ndarray:
    if codes.shape[-1] % 2:
        codes = np.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 1)])
    pairs = codes.reshape(*codes.shape[:-1], -1, 2).astype(np.uint8)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def group_record(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, *, group_size: int,
                 dtype: object) -> awq.GroupInt4Tensor:
    """An int4_group record from codes ``(out, in)``, float16 scales and zeros ``(out, n_groups)``."""
    import jax.numpy as jnp

    out, k = codes.shape
    ng = -(-k // min(group_size, k))
    if scales.shape != (out, ng) or zeros.shape != (out, ng) or scales.dtype != np.float16:
        raise CheckpointError(argument="scales", expected=f"float16 scales and zeros of shape {(out, ng)}",
                              got=f"{scales.dtype}{scales.shape}, zeros {zeros.shape}")
    if codes.max(initial=0) > 15 or zeros.max(initial=0) > 15:
        raise CheckpointError(argument="codes", expected="4-bit codes and zero points 0..15", got="larger values")
    return awq.GroupInt4Tensor(jnp.asarray(_pairs(codes)), jnp.asarray(scales), jnp.asarray(_pairs(zeros)),
                               shape=(out, k), dtype=jnp.dtype(dtype), group_size=int(group_size))
