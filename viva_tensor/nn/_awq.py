"""The AWQ calibration pass over a Flax NNX model (the model half of AWQ; the math is :mod:`viva_tensor.awq`).

:func:`capture_linear_inputs` runs a model once and records what every ``nnx.Linear`` receives;
:func:`awq_weight` searches one layer's AWQ scales on those inputs and quantizes its kernel.
:func:`viva_tensor.nn.quantize_model` with ``fmt="awq_int4"`` and ``activations=`` calls it for each
selected layer. This split follows qwix's ``awq_core`` / ``awq``: the format module knows no models.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from viva_tensor import awq, quant
from viva_tensor._paths import path_str
from viva_tensor.errors import ConfigError, InvalidShape, ShapeMismatch
from viva_tensor.nn._graph import set_child

__all__ = ["capture_linear_inputs", "awq_weight", "calibration_rows"]


class _Recorder(nnx.Module):
    """Calls a linear layer and hands its input to a callback (eager use only)."""

    def __init__(self, layer: nnx.Module, callback: Callable[[jax.Array], None]):
        self.layer = layer
        self.callback = callback

    def __call__(self, x: jax.Array) -> jax.Array:
        self.callback(x)
        return self.layer(x)


def linears(model: nnx.Module) -> list[tuple[tuple, nnx.Linear]]:
    """``(path, layer)`` of every ``nnx.Linear`` of ``model``, in graph order (private helper of nn)."""
    return [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Linear)]


def capture_linear_inputs(model: nnx.Module, *args: Any, **kwargs: Any) -> dict[str, list[jax.Array]]:
    """Runs ``model(*args, **kwargs)`` once, eagerly, and returns the input of every ``nnx.Linear``.

    The model is not changed: a copy has each ``nnx.Linear`` wrapped by a recorder. The result is what
    :func:`viva_tensor.nn.quantize_model` takes as ``activations=`` for ``"awq_int4"`` (drop padding
    tokens first when the model is called on padded batches).

    Args:
        model: an NNX module.
        *args: its call's positional arguments.
        **kwargs: its call's keyword arguments.

    Returns:
        ``{path: [input of each call]}``, paths dotted (``"layers.0.attention.query"``), in call order.

    Raises:
        InvalidShape: a model with no ``nnx.Linear``.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from viva_tensor import nn
        >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
        >>> inputs = nn.capture_linear_inputs(model, jnp.ones((5, 3)))
        >>> {k: v[0].shape for k, v in inputs.items()}
        {'layers.0': (5, 3), 'layers.1': (5, 4)}
    """
    copy = nnx.clone(model)
    found = linears(copy)
    if not found:
        raise InvalidShape(argument="model", expected="a model with nnx.Linear layers", got="none")
    captured: dict[str, list[jax.Array]] = {}
    for path, layer in found:
        name = path_str(path)
        captured[name] = []
        set_child(copy, path, _Recorder(layer, captured[name].append))
    copy(*args, **kwargs)
    return captured


def calibration_rows(x: jax.Array | Sequence[jax.Array], in_features: int, name: str) -> jax.Array:
    """One layer's calibration inputs as rows ``(n, in_features)``: an array ``(..., in)`` or a list of them.

    Example:
        >>> import jax.numpy as jnp
        >>> calibration_rows([jnp.ones((2, 3, 4)), jnp.ones((5, 4))], 4, "layers.0").shape
        (11, 4)
    """
    parts = list(x) if isinstance(x, (list, tuple)) else [x]
    if not parts:
        raise ShapeMismatch(argument="activations", expected=f"inputs (..., {in_features}) of layer {name!r}",
                            got="an empty list")
    rows = []
    for part in parts:
        part = jnp.asarray(part)
        if part.ndim < 1 or part.shape[-1] != in_features:
            raise ShapeMismatch(argument="activations", expected=f"inputs (..., {in_features}) of layer {name!r}",
                                got=f"shape {part.shape}")
        rows.append(part.reshape(-1, in_features))
    return rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=0)


def awq_weight(layer: nnx.Linear, x: jax.Array, **options: Any) -> tuple[Any, float]:
    """AWQ for one ``nnx.Linear``: searches the scales on its inputs ``x``, quantizes ``kernel.T``.

    The scale search is :func:`viva_tensor.awq.search_scales`; the record is
    ``quant.quantize(kernel.T, "awq_int4", calibration=x, scales=<searched>, **options)``, so the
    options are those of :func:`viva_tensor.awq.quantize_awq` (``config``, ``group_size``, ``validate``).

    Args:
        layer: the layer (its kernel ``(in, out)``).
        x: its calibration inputs, rows ``(n, in)``.
        **options: options of the ``"awq_int4"`` format.

    Returns:
        ``(record, alpha)``: the :class:`viva_tensor.awq.AWQTensor` of shape ``(out, in)`` and the alpha
        the search picked.

    Raises:
        FormatError: an option ``"awq_int4"`` does not take.
        ConfigError: a ``config`` that is not an :class:`viva_tensor.awq.AWQConfig`, or one that
            disagrees with ``group_size``.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> record, alpha = awq_weight(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), jnp.ones((3, 8)), group_size=8)
        >>> record.format, record.shape, 0.0 <= alpha < 1.0
        ('awq_int4', (4, 8), True)
    """
    config = options.get("config")
    if config is None and options.get("group_size") is not None:
        config = awq.AWQConfig(group_size=options["group_size"])
    if config is not None and not isinstance(config, awq.AWQConfig):
        raise ConfigError(argument="config", expected="an AWQConfig", got=type(config).__name__)
    w = jnp.asarray(layer.kernel.get_value()).T
    search = awq.search_scales(w, x, config=config)
    record = quant.quantize(w, "awq_int4", calibration=x, scales=search.scales, **options)
    return record, float(search.alpha)
