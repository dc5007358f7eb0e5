"""Randomized Hadamard rotations of a layer's input space: incoherence processing for 4-bit weights.

A linear layer ``y = x Wᵀ`` computes the same thing as ``y = (x R)(W R)ᵀ`` for any orthogonal ``R``. With
``R = D H`` (``D`` a diagonal of random signs, ``H`` a block-diagonal, normalised Hadamard matrix) the rotated
weight ``W R`` spreads every input column's outliers over a whole block of columns: its rows look Gaussian,
so a per-block grid (int4 groups, NF4, Q4_0 ...) fits them with less error, and the Hessian ``Rᵀ H R`` that
GPTQ works on has no dominant diagonal entries. This is the incoherence processing of QuIP (Chee et al.,
2023) and QuIP# (Tseng et al., 2024), here with blocks of ``block`` columns so the transform is a fast
Walsh-Hadamard transform of ``log2(block)`` butterfly stages (``n log n`` additions, no matrix stored).

The quantized layer keeps ``Q ≈ W R`` and rotates its input at run time: ``y = (x R) Qᵀ``
(:class:`viva_tensor.nn.QLinear` with ``rotation``; ``nn.quantize_model(..., rotate=128)``). The dense
weight it stands for is ``Q Rᵀ`` (:func:`invert` of the decoded rows). A :class:`Rotation` stores only its
signs, one bit per input feature, and the block size. ``quant.save`` keeps it with the model's state; the
checkpoint writers of other tools (``viva_tensor.interop``: GPTQ, AWQ, bitsandbytes, GGUF ...) have no place for
it, so a rotated record handed to them alone would decode as ``W R``, not ``W``: export an unrotated quantization
(or ``QLinear.dense_weight()`` quantized again) to those tools. This is why rotation is opt-in
(``rotate=None`` by default everywhere).

Measured on MiniLM (``python benchmarks/minilm_fidelity.py --rows ...``, ``benchmarks/results/
minilm_fidelity_rows.md``; ``minilm.quantize`` with its GPTQ defaults and ``rotate=128``; 32 evaluation sentences,
mean / min embedding cosine to the float32 model): int4 groups of 128 0.9722 / 0.933 -> 0.9815 / 0.958; NF4-DQ
0.9805 / 0.956 -> 0.9843 / 0.967; Q4_0 0.9810 / 0.964 -> 0.9856 / 0.967; the plan at 4.5 bits per value 0.9887 /
0.974 -> 0.9904 / 0.977, at 4.25 bits 0.9854 / 0.961 -> 0.9881 / 0.972 (all with GPTQ's damp 0.1); with damp 0.3
(``minilm.quantize``'s default with ``rotate``) the plan at 4.5 bits reaches 0.9911 / 0.979. The signs cost 1/8
byte per input feature (0.003 bits per value on MiniLM's kernels). A dense random orthogonal ``R`` (384 x 384)
measured no better than blocks of 128 (int4 g128 0.9814 against 0.9815).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from viva_tensor import rotation
    >>> r = rotation.hadamard(jax.random.key(0), 256, block=128)
    >>> x, w = jax.random.normal(jax.random.key(1), (4, 256)), jax.random.normal(jax.random.key(2), (8, 256))
    >>> y = rotation.apply(x, r) @ rotation.apply(w, r).T          # (x R)(W R)ᵀ = x Wᵀ
    >>> bool(jnp.allclose(y, x @ w.T, atol=1e-4)), r.nbytes
    (True, 32)
    >>> bool(jnp.allclose(rotation.invert(rotation.apply(x, r), r), x, atol=1e-5))
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from viva_tensor._pytree import pytree_dataclass
from viva_tensor.errors import ConfigError, DTypeError, ShapeMismatch

__all__ = ["Rotation", "hadamard", "apply", "invert", "hessian", "signs", "matrix", "block_for"]


@pytree_dataclass
class Rotation:
    """An orthogonal ``R = D H`` of size ``n``: ``D = diag(signs)``, ``H`` block-diagonal Hadamard / ``sqrt(block)``.

    Attributes:
        packed: uint8 ``(n / 8,)``: bit ``i`` (``np.packbits`` order, most significant first) set where
            ``signs[i] = -1``.
        block: the Hadamard block (a power of two dividing ``n``); static.
    """

    packed: jax.Array
    block: int = dataclasses.field(metadata={"pytree_node": False})

    @property
    def size(self) -> int:
        """``n``, the number of input features rotated."""
        return int(self.packed.shape[-1]) * 8

    @property
    def nbytes(self) -> int:
        """Bytes stored (the packed signs)."""
        return int(self.packed.size) * self.packed.dtype.itemsize


def _check_block(n: int, block: Any) -> int:
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 2 or block & (block - 1):
        raise ConfigError(argument="block", expected="a power of two >= 2", got=repr(block))
    if n % block or n % 8:
        raise ShapeMismatch(argument="n", expected=f"a multiple of block={int(block)} and of 8", got=n)
    return int(block)


def block_for(n: int, block: int = 128) -> int:
    """The largest power of two ``<= block`` that divides ``n`` (and is at least 8), for a layer of ``n`` inputs.

    Args:
        n: the input features.
        block: the largest block wanted (a power of two).

    Returns:
        The block.

    Raises:
        ConfigError: ``block`` not a power of two, or ``n`` not a multiple of 8.

    Example:
        >>> block_for(384), block_for(1536), block_for(96, 128), block_for(384, 32)
        (128, 128, 32, 32)
    """
    _check_block(max(8, int(block)), block)
    if n % 8:
        raise ConfigError(argument="n", expected="a multiple of 8 (a rotation packs its signs in bytes)", got=n)
    b = int(block)
    while n % b:
        b //= 2
    return b


def hadamard(key: jax.Array, n: int, *, block: int = 128) -> Rotation:
    """A random rotation of ``n`` features: random signs from ``key``, Hadamard blocks of ``block``.

    Args:
        key: a PRNG key (the signs are ``jax.random.bernoulli(key, 0.5, (n,))``).
        n: the features (a multiple of ``block`` and of 8).
        block: the Hadamard block, a power of two (see :func:`block_for` for a layer's size).

    Returns:
        The :class:`Rotation`.

    Raises:
        ConfigError: ``block`` not a power of two.
        ShapeMismatch: ``n`` not a multiple of ``block`` and of 8.

    Example:
        >>> import jax
        >>> r = hadamard(jax.random.key(0), 64, block=32)
        >>> r.size, r.block, r.packed.dtype.name
        (64, 32, 'uint8')
    """
    block = _check_block(int(n), block)
    flips = jax.random.bernoulli(key, 0.5, (int(n),))
    return Rotation(jnp.packbits(flips.astype(jnp.uint8)), block)


def signs(r: Rotation) -> jax.Array:
    """The ``±1`` float32 diagonal ``D`` of ``R = D H``, shape ``(n,)``.

    Example:
        >>> import jax.numpy as jnp
        >>> signs(Rotation(jnp.asarray([0b10000001], jnp.uint8), 8)).tolist()
        [-1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0]
    """
    bits = jnp.unpackbits(r.packed, axis=-1)
    return jnp.float32(1) - jnp.float32(2) * bits.astype(jnp.float32)


def matrix(r: Rotation) -> jax.Array:
    """The dense float32 ``R`` ``(n, n)`` (for tests and small sizes; :func:`apply` never forms it).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> m = matrix(hadamard(jax.random.key(0), 16, block=8))
        >>> bool(jnp.allclose(m @ m.T, jnp.eye(16), atol=1e-6))
        True
    """
    return apply(jnp.eye(r.size, dtype=jnp.float32), r)


def _broadcast_signs(r: Rotation, ndim: int) -> jax.Array:
    return signs(r).reshape((1,) * (ndim - 1) + (-1,))


def _fwht(x: jax.Array, block: int) -> jax.Array:
    """Each block of ``block`` consecutive last-axis values times the normalised Sylvester Hadamard matrix."""
    lead, n = x.shape[:-1], x.shape[-1]
    y = x.reshape(lead + (n // block, block))
    h = 1
    while h < block:  # log2(block) butterflies: pairs (j, j + h) inside each run of 2h values
        y = y.reshape(lead + (n // block, block // (2 * h), 2, h))
        a, b = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2).reshape(lead + (n // block, block))
        h *= 2
    return y.reshape(x.shape) * jnp.float32(1 / np.sqrt(block))


def _check(x: Any, r: Any, name: str) -> jax.Array:
    if not isinstance(r, Rotation):
        raise ConfigError(argument="r", expected="a rotation.Rotation", got=type(r).__name__)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise DTypeError(argument=name, expected="a floating dtype", got=x.dtype)
    if x.ndim < 1 or x.shape[-1] != r.size:
        raise ShapeMismatch(argument=name, expected=f"last dim {r.size} (the rotation's size)", got=x.shape)
    return x


def apply(x: jax.Array, r: Rotation) -> jax.Array:
    """``x R`` over the last axis: the rotated inputs of a layer, or the rotated rows of a weight ``(out, in)``.

    Computed in float32 (a fast Walsh-Hadamard transform per block), returned in ``x``'s dtype.

    Args:
        x: ``(..., n)`` floating.
        r: the :class:`Rotation` of size ``n``.

    Returns:
        ``(x ⊙ signs) H``, shape and dtype of ``x``.

    Raises:
        ShapeMismatch: a last axis that is not ``r``'s size.
        DTypeError: a non-floating ``x``.
        ConfigError: ``r`` not a :class:`Rotation`.

    Example:
        >>> import jax.numpy as jnp
        >>> r = Rotation(jnp.zeros((1,), jnp.uint8), 8)    # no sign flips: H / sqrt(8)
        >>> [round(v, 4) for v in apply(jnp.eye(8)[0], r).tolist()] == [round(8 ** -0.5, 4)] * 8
        True
    """
    x = _check(x, r, "x")
    y = _fwht(x.astype(jnp.float32) * _broadcast_signs(r, x.ndim), r.block)
    return y.astype(x.dtype)


def invert(x: jax.Array, r: Rotation) -> jax.Array:
    """``x Rᵀ`` over the last axis (undoes :func:`apply`): the dense weight rows a rotated record stands for.

    Args:
        x: ``(..., n)`` floating.
        r: the :class:`Rotation` of size ``n``.

    Returns:
        ``(x H) ⊙ signs``, shape and dtype of ``x``.

    Raises:
        ShapeMismatch, DTypeError, ConfigError: as :func:`apply`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> r = hadamard(jax.random.key(3), 32, block=16)
        >>> x = jnp.arange(32.0)
        >>> bool(jnp.allclose(apply(invert(x, r), r), x, atol=1e-4))
        True
    """
    x = _check(x, r, "x")
    return (_fwht(x.astype(jnp.float32), r.block) * _broadcast_signs(r, x.ndim)).astype(x.dtype)


def hessian(h: jax.Array, r: Rotation) -> jax.Array:
    """``Rᵀ H R``: the Hessian (or Gram matrix) of the rotated inputs ``x R``, from that of ``x``.

    Args:
        h: ``(n, n)`` symmetric floating (e.g. GPTQ's ``2 XᵀX / count``).
        r: the :class:`Rotation` of size ``n``.

    Returns:
        ``(n, n)`` float32.

    Raises:
        ShapeMismatch: ``h`` not ``(n, n)``.
        DTypeError, ConfigError: as :func:`apply`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> r = hadamard(jax.random.key(0), 16, block=16)
        >>> x = jax.random.normal(jax.random.key(1), (64, 16))
        >>> bool(jnp.allclose(hessian(x.T @ x, r), apply(x, r).T @ apply(x, r), rtol=1e-4, atol=1e-3))
        True
    """
    h = _check(h, r, "h")
    if h.shape != (r.size, r.size):
        raise ShapeMismatch(argument="h", expected=f"shape ({r.size}, {r.size})", got=h.shape)
    h = h.astype(jnp.float32)
    half = apply(h, r)  # rows: H R (H symmetric)
    return apply(half.T, r)  # (Rᵀ (H R))ᵀ = Rᵀ H R, symmetric
