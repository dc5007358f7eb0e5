"""Quantization-aware training: :class:`FakeQuantLinear`, :func:`fake_quantize_model`, :func:`freeze_fake_quant`.

A :class:`FakeQuantLinear` is an ``nnx.Linear`` (same constructor, same ``kernel`` and ``bias`` parameters, an
instance of ``nnx.Linear``) whose float kernel is fake-quantized on every call with
:func:`viva_tensor.quant.fake_quantize`: the forward sees exactly the weight the format would store, the gradient
reaches the float kernel straight through (zero where the format clips). The kernel is quantized in
:class:`~viva_tensor.nn.QLinear`'s ``(out, in)`` layout, so :meth:`FakeQuantLinear.to_qlinear` (and
:func:`freeze_fake_quant` for a whole model) stores the very same bits, and the frozen layer computes the same
output up to float32 summation order (the frozen layer may take the compiled kernel, which sums in its own order).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from viva_tensor import quant
from viva_tensor._formats.registry import check_options
from viva_tensor._paths import path_str
from viva_tensor.errors import ConfigError
from viva_tensor.nn._awq import linears
from viva_tensor.nn._graph import set_child
from viva_tensor.nn._qlinear import _DEFAULT_OPTIONS, QLinear

__all__ = ["FakeQuantLinear", "fake_quantize_model", "freeze_fake_quant"]


def _static_options(fmt: str, options: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    check_options(quant.format_spec(fmt), options)
    for name, value in options.items():
        if isinstance(value, jax.Array) or hasattr(value, "__array__"):
            raise ConfigError(
                argument=name,
                expected="a static option (an int, a config) for a fake-quantized layer",
                got=f"an array of shape {getattr(value, 'shape', '?')}",
                hint="array options (imatrix, clip, calibration) are per tensor: quantize such a layer with "
                "nn.quantize_model, or fake-quantize its kernel with quant.fake_quantize yourself.",
            )
    return tuple(sorted({**_DEFAULT_OPTIONS.get(fmt, {}), **options}.items()))


class FakeQuantLinear(nnx.Linear):
    """An ``nnx.Linear`` that trains quantization-aware: its kernel is fake-quantized in format ``fmt`` on every call.

    ``y = x @ fake_quantize(kernel.T, fmt).T + bias``, the product accumulated in float32 and returned in the
    computation dtype (``dtype``, or ``x``'s), as :class:`~viva_tensor.nn.QLinear` computes it.

    Args:
        in_features: as ``nnx.Linear``.
        out_features: as ``nnx.Linear``.
        fmt: a format name of :func:`viva_tensor.quant.format_names`.
        options: the format's static options (``block_size``, ``group_size`` ...); ``int8`` defaults to
            ``axis=0`` (a scale per output row), as :meth:`QLinear.from_linear`.
        **kwargs: the other arguments of ``nnx.Linear`` (``use_bias``, ``dtype``, ``param_dtype``,
            ``kernel_init``, ``rngs`` ...).

    Raises:
        FormatError: an unknown format or option.
        ConfigError: an array option (per-tensor data such as ``imatrix`` or ``clip``).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> layer = FakeQuantLinear(64, 4, fmt="nf4", rngs=nnx.Rngs(0))
        >>> x = jnp.ones((2, 64))
        >>> bool(jnp.allclose(layer(x), layer.to_qlinear()(x), rtol=1e-5, atol=1e-5))
        True
        >>> grads = nnx.grad(lambda m: m(x).sum())(layer)
        >>> grads["kernel"].get_value().shape
        (64, 4)
    """

    def __init__(self, in_features: int, out_features: int, *, fmt: str, options: dict[str, Any] | None = None,
                 **kwargs: Any):
        self.fmt = fmt
        self.options = _static_options(fmt, dict(options or {}))
        super().__init__(in_features, out_features, **kwargs)

    @classmethod
    def from_linear(cls, linear: nnx.Linear, fmt: str, **options: Any) -> FakeQuantLinear:
        """A fake-quantized copy of an ``nnx.Linear`` (its kernel, bias, dtypes and precision).

        Example:
            >>> from flax import nnx
            >>> layer = FakeQuantLinear.from_linear(nnx.Linear(64, 8, rngs=nnx.Rngs(0)), "q8_0")
            >>> layer.fmt, layer.kernel.get_value().shape
            ('q8_0', (64, 8))
        """
        kernel = jnp.asarray(linear.kernel.get_value())
        bias = None if linear.bias is None else jnp.asarray(linear.bias.get_value())
        return cls(
            linear.in_features,
            linear.out_features,
            fmt=fmt,
            options=options,
            use_bias=bias is not None,
            dtype=linear.dtype,
            param_dtype=kernel.dtype,
            precision=linear.precision,
            kernel_init=lambda *_: kernel,
            bias_init=lambda *_: bias,
            rngs=nnx.Rngs(0),
        )

    def fake_weight(self) -> jax.Array:
        """The ``(out, in)`` weight the forward uses: ``fake_quantize(kernel.T, fmt, **options)``."""
        return quant.fake_quantize(self.kernel.get_value().T, self.fmt, **dict(self.options))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x @ W^T + b`` with the fake-quantized ``W``, for ``x`` of shape ``(..., in_features)``."""
        dtype = x.dtype if self.dtype is None else jnp.dtype(self.dtype)
        x = x.astype(dtype)
        w = self.fake_weight().astype(dtype)
        dims = (((x.ndim - 1,), (1,)), ((), ()))
        y = jax.lax.dot_general(x, w, dims, precision=self.precision, preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias.get_value().astype(jnp.float32).reshape((1,) * (y.ndim - 1) + (-1,))
        return y.astype(dtype)

    def to_qlinear(self) -> QLinear:
        """The :class:`~viva_tensor.nn.QLinear` storing the bits this layer trains against (same output)."""
        weight = quant.quantize(self.kernel.get_value().T, self.fmt, **dict(self.options))
        bias = None if self.bias is None else self.bias.get_value()
        return QLinear(weight, bias, dtype=self.dtype)


def fake_quantize_model(model: nnx.Module, fmt: str, *, where: Callable[[str, nnx.Linear], bool] | None = None,
                        **options: Any) -> nnx.Module:
    """A copy of ``model`` whose ``nnx.Linear`` layers are :class:`FakeQuantLinear` layers in format ``fmt``.

    Train the copy as the float model (``nnx.Optimizer(model, tx, wrt=nnx.Param)``), then
    :func:`freeze_fake_quant` it. The model passed in is not changed; layers already fake-quantized are kept.

    Args:
        model: an NNX module.
        fmt: a format name of :func:`viva_tensor.quant.format_names`.
        where: ``where(path, layer) -> bool`` picks the layers (dotted paths); ``None``: every ``nnx.Linear``
            whose input size is a whole number of the format's rows (256 for the K-quants).
        **options: the format's static options.

    Returns:
        The fake-quantized copy.

    Raises:
        FormatError: an unknown format or option.
        ConfigError: an array option.

    Example:
        >>> from flax import nnx
        >>> from viva_tensor import nn
        >>> model = nnx.Sequential(nnx.Linear(64, 64, rngs=nnx.Rngs(0)), nnx.Linear(64, 2, rngs=nnx.Rngs(1)))
        >>> qat = nn.fake_quantize_model(model, "nf4", where=lambda path, layer: path == "layers.0")
        >>> [type(layer).__name__ for layer in qat.layers]
        ['FakeQuantLinear', 'Linear']
    """
    _static_options(fmt, dict(options))
    copy = nnx.clone(model)
    rows = quant.format_spec(fmt).row_multiple
    for path, layer in linears(copy):
        if isinstance(layer, FakeQuantLinear):
            continue
        name = path_str(path)
        if where is not None and not where(name, layer):
            continue
        if where is None and layer.in_features % rows:
            continue
        set_child(copy, path, FakeQuantLinear.from_linear(layer, fmt, **options))
    return copy


def freeze_fake_quant(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` whose :class:`FakeQuantLinear` layers are :class:`~viva_tensor.nn.QLinear` ones.

    Each stores ``quantize(kernel.T, fmt)``: the bits its training saw, so the frozen model computes what the
    fake-quantized one did. The model passed in is not changed.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from viva_tensor import nn
        >>> qat = nn.fake_quantize_model(nnx.Sequential(nnx.Linear(64, 2, rngs=nnx.Rngs(0))), "q4_0")
        >>> frozen = nn.freeze_fake_quant(qat)
        >>> x = jnp.ones((1, 64))
        >>> type(frozen.layers[0]).__name__, bool(jnp.allclose(frozen(x), qat(x), atol=1e-5))
        ('QLinear', True)
    """
    copy = nnx.clone(model)
    for path, layer in linears(copy):
        if isinstance(layer, FakeQuantLinear):
            set_child(copy, path, layer.to_qlinear())
    return copy
