"""Quantized linear layers for NNX models, and quantizing a whole model.

:class:`QLinear` holds a quantized record (any format of :mod:`viva_tensor.quant`) as its kernel and
computes with :func:`viva_tensor.quant.dot_general`; :class:`QuantizeReport` is what
:func:`viva_tensor.nn.quantize_model` (``nn/_model.py``) returns with the quantized model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from viva_tensor import quant
from viva_tensor import rotation as _rotation
from viva_tensor.errors import ConfigError, DimensionError, FormatError, ShapeMismatch

__all__ = ["QLinear", "QuantizeReport", "param_bytes", "rotation_for"]

_DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {"int8": {"axis": 0}}
"""Options :meth:`QLinear.from_linear` uses when none are given: INT8 gets one scale per output row."""


class QLinear(nnx.Module):
    """A linear layer whose weight is a quantized record: ``y = x @ W^T + b``.

    The weight is held in PyTorch's ``(out_features, in_features)`` layout, the transpose of
    ``nnx.Linear``'s kernel, so that block formats (Q4_0, NF4, NVFP4 ...) group values along the input
    dimension, the one the matmul sums over, as GGML and bitsandbytes do. The product is
    :func:`viva_tensor.quant.dot_general`: the record is decoded inside the same XLA computation as the
    matmul, accumulated in float32, and the result has ``x``'s dtype (or ``dtype`` when given).

    Args:
        weight: a quantized record of logical shape ``(out_features, in_features)`` (from
            :func:`viva_tensor.quant.quantize`).
        bias: optional ``(out_features,)`` array.
        dtype: computation dtype (``None``: that of ``x``).
        activation_quant: ``None`` (weight-only) or ``"int8"``: dynamic-range W8A8, the activations quantized per
            token at run time and summed in int32 against an int8 / q8_0 weight (see
            :func:`viva_tensor.quant.dot_general`).
        rotation: ``None``, or a :class:`viva_tensor.rotation.Rotation` ``R`` of ``in_features``: the record
            holds ``W R`` and the layer computes ``(x R) Qᵀ + b`` (incoherence processing: see
            :mod:`viva_tensor.rotation`; :meth:`from_linear` with ``rotate=``). Its signs are a parameter (one
            bit per input feature, counted by :func:`param_bytes`). The record alone is then ``W R``: other tools'
            checkpoint writers need :meth:`dense_weight` (quantized again), not ``weight``.

    Raises:
        DimensionError: a weight that is not a 2-D record, or a bias that is not 1-D.
        ShapeMismatch: a bias whose length is not ``out_features``, or a rotation not of ``in_features``.
        FormatError: a weight that is not a quantized record.
        ConfigError: an ``activation_quant`` other than None and ``"int8"``, or a ``rotation`` that is not a
            :class:`viva_tensor.rotation.Rotation`.

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import quant
        >>> w = jnp.eye(32)
        >>> layer = QLinear(quant.quantize(w, "q8_0"), jnp.ones(32))
        >>> [round(v, 2) for v in layer(jnp.arange(32.0)[None])[0, :3].tolist()]
        [1.0, 2.0, 3.0]
        >>> w8a8 = QLinear(quant.quantize(w, "q8_0"), jnp.ones(32), activation_quant="int8")
        >>> [round(v, 2) for v in w8a8(jnp.arange(32.0)[None])[0, :3].tolist()]
        [1.0, 1.98, 2.95]
    """

    def __init__(self, weight: Any, bias: jax.Array | None = None, *, dtype: Any = None,
                 activation_quant: str | None = None, rotation: _rotation.Rotation | None = None):
        if not quant.is_quantized(weight):
            raise FormatError(
                argument="weight",
                expected="a quantized record",
                got=type(weight).__name__,
                hint="quantize it with quant.quantize(w.T, fmt), or use QLinear.from_linear.",
            )
        if len(weight.shape) != 2 or weight.batch_shape:
            raise DimensionError(argument="weight", expected="a 2-D record (out, in)", got=tuple(weight.shape))
        if bias is not None:
            if bias.ndim != 1:
                raise DimensionError(argument="bias", expected="a 1-D array", got=bias.shape)
            if bias.shape[0] != weight.shape[0]:
                raise ShapeMismatch(argument="bias", expected=f"shape ({weight.shape[0]},)", got=bias.shape)
        self.weight = nnx.Param(weight)
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias))
        if activation_quant not in (None, "int8"):
            raise ConfigError(argument="activation_quant", expected="None or 'int8'", got=activation_quant)
        if rotation is not None:
            if not isinstance(rotation, _rotation.Rotation):
                raise ConfigError(argument="rotation", expected="None or a rotation.Rotation",
                                  got=type(rotation).__name__)  # fmt: skip
            if rotation.size != weight.shape[1]:
                raise ShapeMismatch(argument="rotation", expected=f"a rotation of {weight.shape[1]} features",
                                    got=rotation.size)  # fmt: skip
        self.rotation = None if rotation is None else nnx.Param(rotation)
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        self.activation_quant = activation_quant

    @classmethod
    def from_linear(cls, linear: nnx.Linear, fmt: str, *, rotate: int | None = None, rotation_key: Any = None,
                    **options: Any) -> QLinear:
        """Quantizes an ``nnx.Linear``'s kernel (transposed to ``(out, in)``) in format ``fmt``.

        Args:
            linear: the layer (its kernel ``(in, out)``, its bias if any, its ``dtype``).
            fmt: a format name of :func:`viva_tensor.quant.format_names`.
            rotate: ``None``, or the largest Hadamard block of a random rotation of the inputs
                (:func:`rotation_for`): the record quantizes ``W R`` and the layer rotates its inputs.
            rotation_key: the PRNG key of the rotation's signs (``None``: ``jax.random.key(0)``).
            **options: the format's options; ``int8`` defaults to ``axis=0`` (a scale per output row).

        Returns:
            The :class:`QLinear`.

        Raises:
            FormatError: an unknown format or option.
            ConfigError: a ``rotate`` that is not a power of two, or inputs not a multiple of 8.

        Example:
            >>> from flax import nnx
            >>> layer = QLinear.from_linear(nnx.Linear(64, 8, rngs=nnx.Rngs(0)), "int8")
            >>> layer.weight.get_value().shape, layer.in_features
            ((8, 64), 64)
        """
        options = {**_DEFAULT_OPTIONS.get(fmt, {}), **options}
        kernel = jnp.asarray(linear.kernel.get_value())
        r = None if rotate is None else rotation_for(kernel.shape[0], rotate, rotation_key)
        weight = quant.quantize(kernel.T if r is None else _rotation.apply(kernel.T, r), fmt, **options)
        bias = None if linear.bias is None else linear.bias.get_value()
        return cls(weight, bias, dtype=linear.dtype, rotation=r)

    def dense_weight(self) -> jax.Array:
        """The float32 ``(out, in)`` weight this layer applies: the decoded record, rotated back (``Q Rᵀ``).

        Example:
            >>> from flax import nnx
            >>> layer = nnx.Linear(64, 8, rngs=nnx.Rngs(0))
            >>> q = QLinear.from_linear(layer, "q8_0", rotate=32)
            >>> err = jnp.abs(q.dense_weight() - layer.kernel.get_value().T).max()
            >>> q.rotation.get_value().block, bool(err < 0.01)
            (32, True)
        """
        r = getattr(self, "rotation", None)
        return dense(self.weight.get_value(), None if r is None else r.get_value())

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x @ W^T + b`` for ``x`` of shape ``(..., in_features)``."""
        if x.shape[-1] != self.in_features:
            raise ShapeMismatch(argument="x", expected=f"last dim {self.in_features}", got=x.shape)
        dtype = x.dtype if self.dtype is None else jnp.dtype(self.dtype)
        x = x.astype(dtype)
        r = getattr(self, "rotation", None)
        if r is not None:
            x = _rotation.apply(x, r.get_value())
        dims = (((x.ndim - 1,), (1,)), ((), ()))
        y = quant.dot_general(x, self.weight.get_value(), dims, preferred_element_type=jnp.float32,
                              activation_quant=getattr(self, "activation_quant", None))
        if self.bias is not None:
            bias = self.bias.get_value().astype(jnp.float32)
            y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
        return y.astype(dtype)


@dataclasses.dataclass(frozen=True)
class QuantizeReport:
    """What :func:`quantize_model` did: which layers it replaced, and the bytes it measured before and after.

    ``print(report)`` gives a one-line summary; the ratios are properties.

    Attributes:
        fmt: the format name.
        quantized: dotted paths of the layers replaced by :class:`QLinear`, in graph order.
        skipped: ``(path, reason)`` of the ``nnx.Linear`` layers left in float: ``"not selected by
            where"``, or ``"no activations"`` (AWQ with no calibration inputs for that layer).
        bytes_before: bytes of every parameter of the model before (measured from the buffers).
        bytes_after: the same after (quantized records count their real buffers).
        linear_bytes_before: bytes of the replaced layers' kernels before.
        linear_bytes_after: bytes of their quantized weights.
        alphas: ``{path: alpha}`` the AWQ scale search picked for each layer (``"awq_int4"`` with
            ``activations=`` only; empty otherwise).
        method: ``"rtn"``, ``"gptq"`` or ``"awq"``.
        formats: ``{path: format}`` of each replaced layer (``fmt`` is ``"plan"`` for a plan).
        linear_values: values of the replaced kernels (``bits_per_value`` counts every stored byte over them).

    Example:
        >>> r = QuantizeReport("int8", ("a",), (("b", "not selected by where"),), 400, 200, 256, 56)
        >>> round(r.ratio, 1), round(r.linear_ratio, 2)
        (2.0, 4.57)
        >>> print(r)
        int8: 1 layer quantized, 1 kept in float; kernels 256 -> 56 bytes (4.57x); model 400 -> 200 bytes (2.00x)
        >>> str(QuantizeReport("awq_int4", ("a", "b"), (), 400, 200, 256, 56, {"a": 0.25, "b": 0.5})).split("; ")[-1]
        'AWQ alpha 0.25..0.50'
    """

    fmt: str
    quantized: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]
    bytes_before: int
    bytes_after: int
    linear_bytes_before: int
    linear_bytes_after: int
    alphas: dict[str, float] = dataclasses.field(default_factory=dict)
    method: str = "rtn"
    formats: dict[str, str] = dataclasses.field(default_factory=dict)
    linear_values: int = 0

    @property
    def bits_per_value(self) -> float:
        """Stored bits per kernel value over the replaced layers (``8 * linear_bytes_after / linear_values``)."""
        return 8.0 * self.linear_bytes_after / self.linear_values if self.linear_values else 0.0

    @property
    def ratio(self) -> float:
        """``bytes_before / bytes_after`` for the whole model."""
        return self.bytes_before / max(1, self.bytes_after)

    @property
    def linear_ratio(self) -> float:
        """``linear_bytes_before / linear_bytes_after`` for the replaced kernels."""
        return self.linear_bytes_before / max(1, self.linear_bytes_after)

    def __str__(self) -> str:
        n = len(self.quantized)
        text = (
            f"{self.fmt}: {n} layer{'' if n == 1 else 's'} quantized, {len(self.skipped)} kept in float; "
            f"kernels {self.linear_bytes_before:,} -> {self.linear_bytes_after:,} bytes "
            f"({self.linear_ratio:.2f}x); model {self.bytes_before:,} -> {self.bytes_after:,} bytes "
            f"({self.ratio:.2f}x)"
        )
        if self.linear_values:
            text += f"; {self.bits_per_value:.2f} bits/value"
        if self.method != "rtn":
            text += f"; {self.method.upper()}"
        if self.alphas:
            text += f"; AWQ alpha {min(self.alphas.values()):.2f}..{max(self.alphas.values()):.2f}"
        return text


def rotation_for(features: int, rotate: int, key: Any = None) -> _rotation.Rotation:
    """The input rotation of a layer of ``features`` inputs for ``rotate=`` (the largest block wanted).

    Args:
        features: the layer's inputs (a multiple of 8).
        rotate: the largest Hadamard block, a power of two (:func:`viva_tensor.rotation.block_for` picks the
            largest that divides ``features``).
        key: the PRNG key of the signs (``None``: ``jax.random.key(0)``, so that a model quantized twice gets
            the same rotations).

    Returns:
        The :class:`viva_tensor.rotation.Rotation`.

    Example:
        >>> rotation_for(384, 128).block, rotation_for(96, 128).block
        (128, 32)
    """
    block = _rotation.block_for(int(features), rotate)
    return _rotation.hadamard(jax.random.key(0) if key is None else key, int(features), block=block)


def split_rotation(features: int, options: dict[str, Any]) -> tuple[_rotation.Rotation | None, dict[str, Any]]:
    """A layer's options without ``rotate`` / ``rotation_key``, and the rotation they ask for (or ``None``).

    Args:
        features: the layer's inputs.
        options: its options (not changed).

    Returns:
        ``(rotation or None, the other options)``.

    Example:
        >>> r, rest = split_rotation(384, {"rotate": 128, "group_size": 64})
        >>> r.block, rest
        (128, {'group_size': 64})
    """
    rest = dict(options)
    rotate, key = rest.pop("rotate", None), rest.pop("rotation_key", None)
    return (None if rotate is None else rotation_for(features, rotate, key)), rest


def dense(record: Any, r: _rotation.Rotation | None = None) -> jax.Array:
    """The float32 ``(out, in)`` weight a record stands for: decoded, and rotated back (``Q Rᵀ``) when ``r`` is given.

    Example:
        >>> w = jnp.eye(32)
        >>> bool(jnp.allclose(dense(quant.quantize(w, "q8_0")), w, atol=1e-2))
        True
    """
    w = quant.dequantize(record).astype(jnp.float32)
    return w if r is None else _rotation.invert(w, r)


def param_bytes(model: nnx.Module) -> int:
    """Bytes of every ``nnx.Param`` of a model, measured from its buffers (records count their codes and scales).

    Args:
        model: an NNX module.

    Returns:
        The total in bytes.

    Example:
        >>> from flax import nnx
        >>> param_bytes(nnx.Linear(4, 2, rngs=nnx.Rngs(0)))  # 4*2 + 2 float32 values
        40
    """
    leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    return int(sum(np.asarray(leaf).nbytes if not hasattr(leaf, "nbytes") else leaf.nbytes for leaf in leaves))


METHODS = ("rtn", "gptq", "awq")
"""The methods of :func:`quantize_model`: round to nearest, GPTQ (calibrated, sequential), AWQ."""


def _check_format(fmt: Any, activations: Any, method: str) -> None:
    if fmt not in quant.format_names():
        raise FormatError(
            argument="fmt",
            expected="one of " + ", ".join(repr(n) for n in quant.format_names()) + ", or an nn.Plan",
            got=repr(fmt),
        )
    if activations is not None and fmt != "awq_int4":
        raise ConfigError(
            argument="activations",
            expected="None for format " + repr(fmt),
            got="calibration inputs",
            hint="only 'awq_int4' calibrates on activations; leave activations out for the other formats.",
        )
    if method == "awq" and fmt != "awq_int4":
        raise ConfigError(argument="method", expected="'awq' with format 'awq_int4'", got=f"'awq' with {fmt!r}")
