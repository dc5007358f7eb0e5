"""Quantized linear layers for NNX models, and quantizing a whole model.

:class:`QLinear` holds a quantized record (any format of :mod:`viva_tensor.quant`) as its kernel and
computes with :func:`viva_tensor.quant.dot_general`; :func:`quantize_model` returns a copy of a model whose
``nnx.Linear`` layers are :class:`QLinear` ones (for ``"awq_int4"`` with ``activations=``, after the AWQ
calibration pass of :mod:`viva_tensor.nn._awq`), with a :class:`QuantizeReport` of the bytes before and after.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from viva_tensor import quant
from viva_tensor._paths import path_str
from viva_tensor.errors import ConfigError, DimensionError, FormatError, ShapeMismatch
from viva_tensor.nn._awq import awq_weight, calibration_rows, linears
from viva_tensor.nn._graph import set_child

__all__ = ["QLinear", "QuantizeReport", "quantize_model", "param_bytes"]

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

    Raises:
        DimensionError: a weight that is not a 2-D record, or a bias that is not 1-D.
        ShapeMismatch: a bias whose length is not ``out_features``.
        FormatError: a weight that is not a quantized record.

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import quant
        >>> w = jnp.eye(32)
        >>> layer = QLinear(quant.quantize(w, "q8_0"), jnp.ones(32))
        >>> [round(v, 2) for v in layer(jnp.arange(32.0)[None])[0, :3].tolist()]
        [1.0, 2.0, 3.0]
    """

    def __init__(self, weight: Any, bias: jax.Array | None = None, *, dtype: Any = None):
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
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype

    @classmethod
    def from_linear(cls, linear: nnx.Linear, fmt: str, **options: Any) -> QLinear:
        """Quantizes an ``nnx.Linear``'s kernel (transposed to ``(out, in)``) in format ``fmt``.

        Args:
            linear: the layer (its kernel ``(in, out)``, its bias if any, its ``dtype``).
            fmt: a format name of :func:`viva_tensor.quant.format_names`.
            **options: the format's options; ``int8`` defaults to ``axis=0`` (a scale per output row).

        Returns:
            The :class:`QLinear`.

        Raises:
            FormatError: an unknown format or option.

        Example:
            >>> from flax import nnx
            >>> layer = QLinear.from_linear(nnx.Linear(64, 8, rngs=nnx.Rngs(0)), "int8")
            >>> layer.weight.get_value().shape, layer.in_features
            ((8, 64), 64)
        """
        options = {**_DEFAULT_OPTIONS.get(fmt, {}), **options}
        kernel = jnp.asarray(linear.kernel.get_value())
        weight = quant.quantize(kernel.T, fmt, **options)
        bias = None if linear.bias is None else linear.bias.get_value()
        return cls(weight, bias, dtype=linear.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x @ W^T + b`` for ``x`` of shape ``(..., in_features)``."""
        if x.shape[-1] != self.in_features:
            raise ShapeMismatch(argument="x", expected=f"last dim {self.in_features}", got=x.shape)
        dtype = x.dtype if self.dtype is None else jnp.dtype(self.dtype)
        x = x.astype(dtype)
        dims = (((x.ndim - 1,), (1,)), ((), ()))
        y = quant.dot_general(x, self.weight.get_value(), dims, preferred_element_type=jnp.float32)
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


def _layer_formats(fmt: Any) -> tuple[str, dict[str, tuple[str, dict]] | None]:
    """``(label, per-layer formats or None)`` of a format name or a plan (anything with ``.formats``)."""
    formats = getattr(fmt, "formats", None)
    if isinstance(fmt, str) or formats is None:
        return fmt, None
    return "plan", {name: (f, dict(o)) for name, (f, o) in dict(formats).items()}


def _awq_activations(model: nnx.Module, calibration: Any) -> dict[str, list[jax.Array]]:
    """Every Linear's inputs over calibration batches, padding rows dropped (AWQ's search needs the rows)."""
    from viva_tensor.nn._awq import capture_linear_inputs
    from viva_tensor.nn._sequential import _batches

    batches = _batches(calibration)
    if callable(batches):
        raise ConfigError(argument="calibration", expected="a sequence of batches for method='awq'", got="a callable")
    out: dict[str, list[jax.Array]] = {}
    for batch in batches:
        captured = capture_linear_inputs(model, *batch.args, **dict(batch.kwargs))
        for name, calls in captured.items():
            for x in calls:
                if batch.mask is not None and tuple(jnp.shape(batch.mask)) == tuple(x.shape[:-1]):
                    x = x[np.asarray(batch.mask).astype(bool)]
                out.setdefault(name, []).append(x)
    return out


def quantize_model(
    model: nnx.Module,
    fmt: Any,
    *,
    method: str = "rtn",
    calibration: Any = None,
    activations: Mapping[str, Any] | None = None,
    where: Callable[[str, nnx.Linear], bool] | None = None,
    sequential: bool = True,
    progress: bool = False,
    **options: Any,
) -> tuple[nnx.Module, QuantizeReport]:
    """A copy of ``model`` whose ``nnx.Linear`` layers are :class:`QLinear` layers in format ``fmt``.

    The model passed in is not changed. Embeddings, norms and biases stay as they are. A layer that the
    format refuses raises the format's error (nothing is half done): leave it out with ``where``.

    ``fmt`` is a format name, or a plan of :func:`viva_tensor.nn.plan` (a format per layer; the layers
    it does not name stay in float). Methods:

    * ``"rtn"`` (default): round to nearest, ``quant.quantize(kernel.T, fmt, **options)``.
    * ``"gptq"``: :func:`viva_tensor.gptq.quantize` on the Hessian of each layer's inputs over
      ``calibration``. With ``sequential=True`` (default) the layers are quantized group by group in call
      order (layers fed the same input, like query/key/value, form a group) and each group's Hessian
      comes from the model whose earlier groups are already quantized; ``sequential=False`` takes every
      Hessian from the float model in one pass. ``options`` go to :func:`viva_tensor.gptq.quantize`
      (``group_size``, ``damp``, ``act_order``, ``static_groups``, ``block_size``, format options).
    * ``"awq"`` (format ``"awq_int4"``): AWQ's scale search per layer on its inputs, from
      ``activations`` (``{path: inputs}``, e.g. :func:`capture_linear_inputs`) or from ``calibration``.
      ``fmt="awq_int4"`` with ``activations`` also selects it. Layers with no inputs are kept in float
      (in ``report.skipped``) unless ``where`` selects them, which is an error. Without inputs,
      ``"awq_int4"`` uses unit scales (plain group-int4).

    ``calibration`` is a callable ``f(model) -> None`` that runs the model on calibration data (run
    eagerly), or a sequence of batches: argument tuples of ``model(*args)``, or
    :class:`viva_tensor.nn.CalibrationBatch` (arguments and a ``(batch, tokens)`` mask that leaves
    padding tokens out of the Hessians). Batches run as one jitted program per shape whose outputs are
    the Hessians, accumulated in float32 on the device.

    Args:
        model: an NNX module.
        fmt: a format name of :func:`viva_tensor.quant.format_names` (for GPTQ, of
            :func:`viva_tensor.gptq.formats`), or an ``nn.Plan``.
        method: ``"rtn"``, ``"gptq"`` or ``"awq"``.
        calibration: calibration data for ``"gptq"`` (required) and ``"awq"``.
        activations: ``{path: inputs (..., in) or a list of them}``, for AWQ only.
        where: ``where(path, layer) -> bool`` picks the layers to quantize (``path`` is dotted, e.g.
            ``"layers.0.attention.query"``); ``None`` quantizes every ``nnx.Linear`` whose input size the
            format takes (with AWQ: every one that has activations).
        sequential: GPTQ only: each group on the inputs of the model quantized so far.
        progress: show a rich progress bar on stderr (GPTQ).
        **options: the format's options (see :meth:`QLinear.from_linear`); for AWQ those of
            :func:`viva_tensor.awq.quantize_awq` (``config=awq.AWQConfig(...)``, ``group_size``); for
            GPTQ those of :func:`viva_tensor.gptq.quantize`.

    Returns:
        ``(quantized_model, report)``, the report a :class:`QuantizeReport`.

    Raises:
        FormatError: an unknown format or option (GPTQ: a format with no grid).
        ConfigError: an unknown ``method``, ``method="gptq"`` without ``calibration``, ``activations``
            for a format other than ``"awq_int4"``, or a layer selected by ``where`` that has no
            activations.
        TensorError: whatever the format raises for a kernel it cannot quantize.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from viva_tensor import nn
        >>> model = nnx.Sequential(nnx.Linear(64, 64, rngs=nnx.Rngs(0)), nnx.Linear(64, 2, rngs=nnx.Rngs(1)))
        >>> qmodel, report = nn.quantize_model(model, "q8_0", where=lambda path, layer: layer.out_features > 2)
        >>> report.quantized, [p for p, _ in report.skipped], type(qmodel.layers[0]).__name__
        (('layers.0',), ['layers.1'], 'QLinear')
        >>> inputs = nn.capture_linear_inputs(model, jnp.ones((8, 64)))
        >>> amodel, areport = nn.quantize_model(model, "awq_int4", activations=inputs, group_size=32)
        >>> areport.quantized, sorted(areport.alphas) == ['layers.0', 'layers.1']
        (('layers.0', 'layers.1'), True)
        >>> batches = [(jax.random.normal(jax.random.key(i), (16, 64)),) for i in range(4)]
        >>> gmodel, greport = nn.quantize_model(model, "q4_0", method="gptq", calibration=batches)
        >>> greport.method, greport.quantized
        ('gptq', ('layers.0', 'layers.1'))
    """
    if method not in METHODS:
        raise ConfigError(argument="method", expected="one of " + ", ".join(map(repr, METHODS)), got=repr(method))
    label, per_layer = _layer_formats(fmt)
    for name in sorted({f for f, _ in per_layer.values()}) if per_layer else [fmt]:
        _check_format(name, activations, method)
    if method == "gptq" and calibration is None:
        raise ConfigError(argument="calibration", expected="calibration data for method='gptq'", got="None",
                          hint="a sequence of argument tuples / nn.CalibrationBatch, or a callable f(model).")
    if method == "awq" or (activations is not None):
        method = "awq"
        if activations is None and calibration is not None:
            activations = _awq_activations(model, calibration)
    before = param_bytes(model)
    copy = nnx.clone(model)
    done, skipped, alphas, formats = [], [], {}, {}
    selected: dict[str, tuple[tuple, nnx.Linear, str, dict]] = {}
    for path, layer in linears(copy):
        name = path_str(path)
        if per_layer is not None:
            if name not in per_layer:
                skipped.append((name, "not in the plan"))
                continue
            layer_fmt, layer_options = per_layer[name]
            layer_options = {**layer_options, **options}
        else:
            layer_fmt, layer_options = fmt, dict(options)
        if where is not None and not where(name, layer):
            skipped.append((name, "not selected by where"))
            continue
        rows = quant.format_spec(layer_fmt).row_multiple
        if where is None and per_layer is None and layer.in_features % rows:
            skipped.append((name, f"{layer.in_features} inputs: not whole {layer_fmt} rows of {rows}"))
            continue
        if method == "awq" and activations is not None and name not in activations:
            if where is not None:
                raise ConfigError(argument="activations", expected=f"the inputs of layer {name!r}", got="none")
            skipped.append((name, "no activations"))
            continue
        selected[name] = (path, layer, layer_fmt, layer_options)
    records = {}
    if method == "gptq":
        from viva_tensor.nn._sequential import gptq_records

        def choose(name, layer):
            if name not in selected:
                return None
            _, _, f, o = selected[name]
            return f, {**_DEFAULT_OPTIONS.get(f, {}), **o}

        records = gptq_records(model, choose, calibration, _make_qlinear, sequential=sequential,
                               show_progress=progress)  # fmt: skip
    for name, (path, layer, layer_fmt, layer_options) in selected.items():
        if method == "gptq":
            qlayer = _make_qlinear(layer, records[name])
        elif method == "awq" and activations is not None:
            x = calibration_rows(activations[name], layer.in_features, name)
            record, alphas[name] = awq_weight(layer, x, **layer_options)
            qlayer = _make_qlinear(layer, record)
        else:
            qlayer = QLinear.from_linear(layer, layer_fmt, **layer_options)
        set_child(copy, path, qlayer)
        done.append(name)
        formats[name] = layer_fmt
    lin_before = sum(int(selected[n][1].kernel.get_value().nbytes) for n in done)
    lin_after = sum(int(_get_weight(copy, selected[n][0]).nbytes) for n in done)
    report = QuantizeReport(
        label, tuple(done), tuple(skipped), before, param_bytes(copy), lin_before, lin_after, alphas,
        method=method, formats=formats,
        linear_values=sum(int(selected[n][1].kernel.get_value().size) for n in done),
    )
    return copy, report


def _make_qlinear(layer: nnx.Linear, record: Any) -> QLinear:
    bias = None if layer.bias is None else layer.bias.get_value()
    return QLinear(record, bias, dtype=layer.dtype)


def _get_weight(root: nnx.Module, path: tuple) -> Any:
    node = root
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node.weight.get_value()
