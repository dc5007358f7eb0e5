"""quantize_model: a copy of an NNX model with its layers quantized, by round to nearest, GPTQ or AWQ, or a plan.

The one entry point of the package for quantizing a model: ``nnx.Linear`` layers become
:class:`~viva_tensor.nn.QLinear` (RTN, calibrated sequential GPTQ from :mod:`viva_tensor.nn._sequential`, or
AWQ from :mod:`viva_tensor.nn._awq`), with a format per layer when given a :class:`~viva_tensor.nn.Plan`;
with ``others=``, the other parameterised layers (``nnx.Embed``, ``LinearGeneral``, ``Einsum``, ``Conv``) are
replaced through :func:`viva_tensor.nn.quantize_layer` (round to nearest).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from viva_tensor import quant
from viva_tensor._paths import path_str
from viva_tensor.errors import ConfigError
from viva_tensor.nn._awq import awq_weight, calibration_rows, linears
from viva_tensor.nn._graph import set_child
from viva_tensor.nn._qlayers import quantizable, quantize_layer
from viva_tensor.nn._qlinear import _DEFAULT_OPTIONS, METHODS, QLinear, QuantizeReport, _check_format, param_bytes
from viva_tensor.nn._sequential import _batches, _check_bias_correction, bias_corrections, gptq_records

__all__ = ["quantize_model"]


def _layer_formats(fmt: Any) -> tuple[str, dict[str, tuple[str, dict]] | None]:
    """``(label, per-layer formats or None)`` of a format name or a plan (anything with ``.formats``)."""
    formats = getattr(fmt, "formats", None)
    if isinstance(fmt, str) or formats is None:
        return fmt, None
    return "plan", {name: (f, dict(o)) for name, (f, o) in dict(formats).items()}


def _awq_activations(model: nnx.Module, calibration: Any) -> dict[str, list[jax.Array]]:
    """Every Linear's inputs over calibration batches, padding rows dropped (AWQ's search needs the rows)."""
    from viva_tensor.nn._awq import capture_linear_inputs

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
    asymmetric: bool = False,
    target_damp: float = 0.01,
    migrate: str | None = None,
    bias_correction: str | None = None,
    progress: bool = False,
    others: Any = None,
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
      (``group_size``, ``damp``, ``act_order``, ``static_groups``, ``block_size``, format options). A plan's
      ``block_size`` (the format's block, e.g. NF4's) becomes GPTQ's ``group_size`` (GPTQ's own ``block_size``
      is its column block).
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
        asymmetric: GPTQ only (with ``sequential``): fit each layer, on the inputs of the model quantized so
            far, to the FLOAT model's outputs (GPTAQ's asymmetric calibration): GPTQ of
            :func:`viva_tensor.gptq.float_target` on the quantized inputs' Hessian. With ``others``, the other
            layers (embeddings) are quantized first, so that the Linear layers also make up for them.
        target_damp: GPTQ with ``asymmetric``: the ridge of :func:`viva_tensor.gptq.float_target`.
        migrate: GPTQ only: ``"awq"`` migrates AWQ-style per-input-channel scales ``s`` into every
            ``int4_group`` layer's weight before GPTQ (``W diag(s)`` quantized with the Hessian of ``x / s``,
            :func:`viva_tensor.nn._sequential.migrated_gptq`; ``s = rms(x)^alpha``, alpha per layer on held-out
            calibration batches, every 5th). Those layers hold ``"awq_int4"`` records (the int4-group codes plus the
            float16 ``s``, applied to the activations: nothing else in the model changes; 16 bits per input
            channel more). MiniLM is post-LayerNorm (a LayerNorm output is also the residual), so ``1 / s``
            cannot be folded into the LayerNorms there. Other formats: plain GPTQ. ``None``: no migration.
        bias_correction: methods ``"rtn"`` and ``"gptq"``, with ``calibration``: ``"quantized"`` sets each
            quantized layer's bias to ``b + μ (K - K_q)``, ``μ`` its mean input over the calibration tokens in
            the model whose earlier layers are already quantized and corrected (mask and token weights
            respected), cancelling the mean of the layer's output error; ``"float"`` to ``b + μ_f K - μ K_q``
            (``μ_f`` the float model's mean input: the layer's mean output becomes the float model's). No
            stored bits change. See :func:`viva_tensor.nn._sequential.bias_corrections`. ``None``: biases kept.
        progress: show a rich progress bar on stderr (GPTQ).
        others: a format name, or ``(name, options)``, for every other layer that
            :func:`viva_tensor.nn.quantizable` accepts (``nnx.Embed``, ``nnx.LinearGeneral``, ``nnx.Einsum``,
            ``nnx.Conv``), by round to nearest through :func:`viva_tensor.nn.quantize_layer`; or a mapping
            ``{dotted path: name or (name, options)}`` giving each of those layers its own format (the layers
            it leaves out stay float); ``None`` (default) keeps them in float. They are listed in
            ``report.quantized`` and ``report.formats``, not in the ``linear_*`` counts.
        **options: the format's options (see :meth:`QLinear.from_linear`, whose ``rotate=`` / ``rotation_key=``
            rotate each layer's inputs by a random Hadamard transform, :mod:`viva_tensor.rotation`: the record
            holds ``W R``, GPTQ works on the rotated Hessian ``Rᵀ H R``; a plan's candidates may carry them too);
            for AWQ those of
            :func:`viva_tensor.awq.quantize_awq` (``config=awq.AWQConfig(...)``, ``group_size``); for
            GPTQ those of :func:`viva_tensor.gptq.quantize`.

    Returns:
        ``(quantized_model, report)``, the report a :class:`QuantizeReport`.

    Raises:
        FormatError: an unknown format or option (GPTQ: a format with no grid).
        ConfigError: an unknown ``method``, ``method="gptq"`` without ``calibration``, ``activations``
            for a format other than ``"awq_int4"``, a layer selected by ``where`` that has no
            activations, or ``migrate`` with another method than GPTQ, with ``asymmetric`` or with a
            calibration that is not a sequence of at least 2 batches; an ``others`` mapping naming a path that is
            not one of the model's non-Linear quantizable layers, or a value that is not a format or a pair.
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
        >>> emb = nnx.Sequential(nnx.Embed(100, 64, rngs=nnx.Rngs(0)), nnx.Linear(64, 64, rngs=nnx.Rngs(1)))
        >>> _, ereport = nn.quantize_model(emb, "q4_0", others="q8_0")
        >>> ereport.formats
        {'layers.1': 'q4_0', 'layers.0': 'q8_0'}
    """
    if method not in METHODS:
        raise ConfigError(argument="method", expected="one of " + ", ".join(map(repr, METHODS)), got=repr(method))
    label, per_layer = _layer_formats(fmt)
    for name in sorted({f for f, _ in per_layer.values()}) if per_layer else [fmt]:
        _check_format(name, activations, method)
    if bias_correction is not None:
        if method not in ("rtn", "gptq") or activations is not None:
            raise ConfigError(argument="bias_correction", expected="method 'rtn' or 'gptq' with bias_correction",
                              got=f"method={method!r}")  # fmt: skip
        if calibration is None:
            raise ConfigError(argument="calibration", expected="calibration data with bias_correction", got="None")
        _check_bias_correction(bias_correction)
    if method == "awq" and "rotate" in options:
        raise ConfigError(argument="rotate", expected="no rotation with method 'awq' (AWQ scales the inputs instead)",
                          got=repr(options["rotate"]))  # fmt: skip
    if migrate is not None and method != "gptq":
        raise ConfigError(argument="migrate", expected="method='gptq' with migrate", got=f"method={method!r}")
    if method == "gptq" and calibration is None:
        raise ConfigError(argument="calibration", expected="calibration data for method='gptq'", got="None",
                          hint="a sequence of argument tuples / nn.CalibrationBatch, or a callable f(model).")
    if others is not None:  # checked before any calibration runs
        _other_formats(others, [path_str(p) for p, _ in _other_layers(model)])
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
            if method == "gptq" and "block_size" in layer_options:  # the format's block: GPTQ's group_size
                layer_options = dict(layer_options)
                layer_options["group_size"] = layer_options.pop("block_size")
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
    records, biases, rtn, rotations = {}, {}, {}, {}
    if method == "gptq":
        def choose(name, layer):
            if name not in selected:
                return None
            _, _, f, o = selected[name]
            return f, {**_DEFAULT_OPTIONS.get(f, {}), **o}

        start = None
        if others is not None and sequential:  # the later layers see the quantized others
            start = _quantize_others(nnx.clone(model), model, others, where, [], {})
        records, biases, rotations = gptq_records(model, choose, calibration, _make_qlinear, sequential=sequential,
                                       asymmetric=asymmetric, target_damp=target_damp, start=start,
                                       show_progress=progress, migrate=migrate,
                                       bias_correction=bias_correction)  # fmt: skip
    if method == "rtn" and bias_correction is not None:
        rtn = {n: QLinear.from_linear(layer, f, **o) for n, (_, layer, f, o) in selected.items()}
        start = None if others is None else _quantize_others(nnx.clone(model), model, others, where, [], {})
        kernels = {n: q.dense_weight().T for n, q in rtn.items()}
        biases = bias_corrections(model, kernels, calibration, mode=bias_correction, start=start)
    for name, (path, layer, layer_fmt, layer_options) in selected.items():
        if method == "gptq":
            qlayer = _make_qlinear(layer, records[name], rotations.get(name))
        elif method == "awq" and activations is not None:
            x = calibration_rows(activations[name], layer.in_features, name)
            record, alphas[name] = awq_weight(layer, x, **layer_options)
            qlayer = _make_qlinear(layer, record)
        else:
            qlayer = rtn[name] if name in rtn else QLinear.from_linear(layer, layer_fmt, **layer_options)
        if name in biases:
            qlayer.bias.set_value(biases[name])
        set_child(copy, path, qlayer)
        done.append(name)
        formats[name] = layer_fmt
    if others is not None:
        _quantize_others(copy, model, others, where, done, formats)
    done_linear = [n for n in done if n in selected]
    lin_before = sum(int(selected[n][1].kernel.get_value().nbytes) for n in done_linear)
    lin_after = sum(_stored_bytes(copy, selected[n][0]) for n in done_linear)
    report = QuantizeReport(
        label, tuple(done), tuple(skipped), before, param_bytes(copy), lin_before, lin_after, alphas,
        method=method, formats=formats,
        linear_values=sum(int(selected[n][1].kernel.get_value().size) for n in done_linear),
    )
    return copy, report


def _quantize_others(copy: nnx.Module, model: nnx.Module, others: Any, where: Any, done: list, formats: dict):
    """Replaces in ``copy`` the non-Linear quantizable layers of ``model`` (round to nearest); returns ``copy``."""
    candidates = _other_layers(model)
    per_layer = _other_formats(others, [path_str(p) for p, _ in candidates])
    for path, layer in candidates:
        name = path_str(path)
        if name not in per_layer or (where is not None and not where(name, layer)):
            continue
        other_fmt, other_options = per_layer[name]
        set_child(copy, path, quantize_layer(layer, other_fmt, **other_options))
        done.append(name)
        formats[name] = other_fmt
    return copy


def _other_layers(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
    """``(path, layer)`` of the quantizable layers of ``model`` that are not ``nnx.Linear`` (``others=``'s layers)."""
    return [(p, n) for p, n in nnx.iter_graph(model) if p and quantizable(n) and not isinstance(n, nnx.Linear)]


def _format_and_options(value: Any, argument: str) -> tuple[str, dict]:
    """``"fmt"`` or ``("fmt", {options})`` as ``(fmt, options)``."""
    if isinstance(value, str):
        return value, {}
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], Mapping):
        return value[0], dict(value[1])
    raise ConfigError(argument=argument, expected="a format name or a (format, options) pair", got=repr(value))


def _other_formats(others: Any, names: list[str]) -> dict[str, tuple[str, dict]]:
    """``others=`` as ``{path: (fmt, options)}`` over the non-Linear quantizable layers ``names``."""
    if not isinstance(others, Mapping):
        fmt, options = _format_and_options(others, "others")
        return {name: (fmt, options) for name in names}
    unknown = sorted(set(others) - set(names))
    if unknown:
        raise ConfigError(argument="others", expected="paths of the model's non-Linear quantizable layers ("
                          + ", ".join(map(repr, names)) + ")", got=", ".join(map(repr, unknown)))  # fmt: skip
    return {name: _format_and_options(value, f"others[{name!r}]") for name, value in others.items()}


def _make_qlinear(layer: nnx.Linear, record: Any, rotation: Any = None) -> QLinear:
    bias = None if layer.bias is None else layer.bias.get_value()
    return QLinear(record, bias, dtype=layer.dtype, rotation=rotation)


def _stored_bytes(root: nnx.Module, path: tuple) -> int:
    """Bytes a quantized layer stores for its weight: the record, and a rotation's signs."""
    node = root
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    r = getattr(node, "rotation", None)
    return int(node.weight.get_value().nbytes) + (0 if r is None else r.get_value().nbytes)
