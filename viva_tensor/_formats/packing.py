"""Bit packing and decode tables shared by the 4-bit formats (private).

- :func:`pack_pairs` / :func:`unpack_pairs`: two codes a byte along the last axis, the first value in
  the low nibble (OCP FP4, AWQ, 2:4 positions) or in the high nibble (bitsandbytes NF4).
- :func:`pack_halves` / :func:`unpack_halves`: GGML's block of 32: value ``j`` low, ``j + 16`` high.
- :data:`E2M1_VALUES`, :data:`E2M1_PAIRS`, :data:`E4M3_TABLE`: FP4 / FP8 values as float32 tables.
- Decode-plane helpers for the ``planes`` hooks: :func:`materialized`, :func:`lookup16`, :func:`e2m1`.

Example:
    >>> import jax.numpy as jnp
    >>> codes = jnp.array([1, 2, 3], jnp.uint8)
    >>> [hex(b) for b in pack_pairs(codes).tolist()], [hex(b) for b in pack_pairs(codes, first="high").tolist()]
    (['0x21', '0x3'], ['0x12', '0x30'])
    >>> unpack_pairs(pack_pairs(codes), 3).tolist()
    [1, 2, 3]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

__all__ = [
    "pack_pairs",
    "unpack_pairs",
    "pack_halves",
    "unpack_halves",
    "HALF",
    "E2M1_VALUES",
    "E2M1_PAIRS",
    "E4M3_TABLE",
    "materialized",
    "lookup16",
    "e2m1",
]

HALF = 16
"""Values per nibble half of a GGML block of 32."""

#: Values of the 16 E2M1 codes (bit 3 sign, bits 2-1 exponent with bias 1, bit 0 mantissa).
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)
#: The two E2M1 values of each packed code byte, (low nibble, high nibble): first value low.
E2M1_PAIRS = np.stack([E2M1_VALUES[np.arange(256) & 0xF], E2M1_VALUES[np.arange(256) >> 4]], axis=-1)
#: The float32 value of each E4M3 (``float8_e4m3fn``) byte: 0x7F and 0xFF are NaN, 0x80 is -0.0.
E4M3_TABLE = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def pack_pairs(codes: jax.Array, *, first: str = "low", pad: int = 0) -> jax.Array:
    """``(..., n)`` codes 0..15 to ``(..., ceil(n / 2))`` bytes; an odd ``n`` is padded with ``pad``.

    ``first="low"``: the even index in the low nibble; ``"high"``: in the high nibble.
    """
    codes = codes.astype(jnp.uint8)
    if codes.shape[-1] % 2:
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 1)], constant_values=pad)
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    lo, hi = (pairs[..., 0], pairs[..., 1]) if first == "low" else (pairs[..., 1], pairs[..., 0])
    return lo | (hi << 4)


def unpack_pairs(packed: jax.Array, n: int, *, first: str = "low") -> jax.Array:
    """``(..., m)`` bytes to the first ``n`` of their ``2 m`` codes (inverse of :func:`pack_pairs`)."""
    lo, hi = packed & 0xF, packed >> 4
    both = jnp.stack([lo, hi] if first == "low" else [hi, lo], axis=-1)
    return both.reshape(*packed.shape[:-1], -1)[..., :n]


def pack_halves(codes: jax.Array) -> jax.Array:
    """``(..., 32)`` codes 0..15 to ``(..., 16)`` bytes: value j low nibble, value j + 16 high nibble."""
    codes = codes.astype(jnp.uint8)
    return codes[..., :HALF] | (codes[..., HALF:] << 4)


def unpack_halves(qs: jax.Array) -> jax.Array:
    """``(..., 16)`` bytes to ``(..., 32)`` codes (inverse of :func:`pack_halves`)."""
    return jnp.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def materialized(scales: jax.Array) -> jax.Array:
    """Per-block factors computed once into a buffer: without the barrier XLA fuses their decode
    (a float16 convert, an FP8 table, a nested dequantization) into every value of the block."""
    return jax.lax.optimization_barrier(scales)


def lookup16(table: np.ndarray, idx: jax.Array) -> jax.Array:
    """``table[idx]`` for a 16-entry float32 table and codes 0..15, as a tree of 15 selects.

    XLA:CPU emits a gather from a constant as scalar loads; selects between constants vectorise.
    A select copies its operand, so the result has the table's exact bits.
    """
    level = [jnp.float32(v) for v in np.asarray(table, np.float32)]
    for bit in (1, 2, 4, 8):
        on = (idx & bit) != 0
        level = [jnp.where(on, level[i + 1], level[i]) for i in range(0, len(level), 2)]
    return level[0]


def e2m1(idx: jax.Array) -> jax.Array:
    """The E2M1 value of codes 0..15 as float32, built from its bits (equal to ``E2M1_VALUES[idx]``).

    Example:
        >>> import jax.numpy as jnp
        >>> bool((e2m1(jnp.arange(16, dtype=jnp.uint8)) == jnp.asarray(E2M1_VALUES)).all())
        True
    """
    i = idx.astype(jnp.uint32)
    m = i & 7  # exponent (2 bits) and mantissa (1 bit): 0, 0.5, 1, 1.5, 2, 3, 4, 6
    # m >= 2 is the normal number 2**((m >> 1) - 1) * (1 + (m & 1) / 2), whose float32 bits are
    # (m + 252) << 22; m == 1 is the subnormal 0.5 (0x3F000000), m == 0 is zero.
    magnitude = jnp.where(m > 1, (m + 252) << 22, m * jnp.uint32(0x3F000000))
    return jax.lax.bitcast_convert_type(magnitude | ((i & 8) << 28), jnp.float32)
