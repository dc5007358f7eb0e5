"""A bit planner: measure each layer's sensitivity to each format, then spend a budget where the model needs it.

:func:`plan` quantizes each ``nnx.Linear`` alone in each candidate format (round to nearest), runs the model
on calibration data with only that layer quantized, and records the relative squared error of the outputs
``Σ||y - y₀||² / Σ||y₀||²`` and the record's stored bytes. The kernel is swapped by value (its dequantized
weight), so the measuring program compiles once. It then picks one format per layer (a multiple-choice
knapsack solved greedily on each layer's lower convex hull of (bytes, error), by marginal error per byte):
the least summed error under an average of ``bits`` stored bits per value over the kernels (every byte of
every record counted), or the fewest bytes whose summed error is at most ``target``. The sum of single-layer
errors is the planner's model of the whole; the result is deterministic for a fixed calibration set.
:func:`viva_tensor.nn.quantize_model` applies a :class:`Plan` with any method (``"gptq"`` included).
llama.cpp's Q4_K_M / Q3_K_M mixes are the idea, done by measurement instead of a fixed recipe.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from viva_tensor import quant
from viva_tensor import rotation as _rotation
from viva_tensor._paths import path_str
from viva_tensor.errors import ConfigError, FormatError
from viva_tensor.nn._awq import linears
from viva_tensor.nn._qlinear import dense, split_rotation
from viva_tensor.nn._sequential import _at, _batches, capture_grams
from viva_tensor.nn._sequential import progress as _progress

__all__ = ["DEFAULT_CANDIDATES", "LayerChoice", "Plan", "plan", "sensitivity"]

DEFAULT_CANDIDATES: tuple[tuple[str, tuple], ...] = (
    ("int4_group", (("group_size", 128),)),
    ("int4_group", (("group_size", 32),)),
    ("q4_1", ()),
    ("q8_0", ()),
)
"""Candidates of :func:`plan`: int4 groups of 128 (4.13 bits) and of 32 (4.5), Q4_1 (5.0), Q8_0 (8.5) (all
have a GPTQ grid, so a plan can be applied with ``method="gptq"``)."""


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    """One layer of a :class:`Plan`: its format and options, its stored bits per value and measured error.

    Attributes:
        name: the layer's dotted path.
        fmt: the format name.
        options: the format's options, as sorted ``(name, value)`` pairs.
        nbytes: bytes of the layer's record (every buffer).
        values: values of the layer's kernel.
        error: the model's relative output error with only this layer quantized this way.

    Example:
        >>> c = LayerChoice("layers.0", "q8_0", (), 34, 32, 1e-4)
        >>> c.bits, c.label
        (8.5, 'q8_0')
    """

    name: str
    fmt: str
    options: tuple
    nbytes: int
    values: int
    error: float

    @property
    def bits(self) -> float:
        """Stored bits per value."""
        return 8.0 * self.nbytes / self.values

    @property
    def label(self) -> str:
        """The format with its options, e.g. ``"int4_group(group_size=32)"``."""
        opts = ", ".join(f"{k}={v}" for k, v in self.options)
        return f"{self.fmt}({opts})" if opts else self.fmt


@dataclasses.dataclass(frozen=True)
class Plan:
    """A format per layer, chosen by :func:`plan`; ``nn.quantize_model(model, plan, method=...)`` applies it.

    Attributes:
        layers: the chosen :class:`LayerChoice` per layer, in graph order.
        measured: every measured ``LayerChoice`` (each layer in each candidate).
        bits: the budget asked (or ``None``).
        target: the error target asked (or ``None``).

    Example:
        >>> p = Plan((LayerChoice("a", "q8_0", (), 34, 32, 1e-4), LayerChoice("b", "q4_0", (), 18, 32, 3e-3)), ())
        >>> p.formats["a"], round(p.bits_per_value, 2), round(p.error, 4)
        (('q8_0', {}), 6.5, 0.0031)
        >>> print(p)
        layer  format  bits  error
        a      q8_0    8.50  1.000e-04
        b      q4_0    4.50  3.000e-03
        total          6.50  3.100e-03
    """

    layers: tuple[LayerChoice, ...]
    measured: tuple[LayerChoice, ...]
    bits: float | None = None
    target: float | None = None

    @property
    def formats(self) -> dict[str, tuple[str, dict]]:
        """``{layer: (fmt, options)}``, what :func:`viva_tensor.nn.quantize_model` reads."""
        return {c.name: (c.fmt, dict(c.options)) for c in self.layers}

    @property
    def bits_per_value(self) -> float:
        """Stored bits per value over the planned kernels."""
        return 8.0 * sum(c.nbytes for c in self.layers) / max(1, sum(c.values for c in self.layers))

    @property
    def error(self) -> float:
        """The predicted error: the sum of the chosen layers' measured errors."""
        return float(sum(c.error for c in self.layers))

    def __str__(self) -> str:
        width = max([len("layer")] + [len(c.name) for c in self.layers])
        fwidth = max([len("format")] + [len(c.label) for c in self.layers])
        lines = [f"{'layer':{width}s}  {'format':{fwidth}s}  bits  error"]
        lines += [f"{c.name:{width}s}  {c.label:{fwidth}s}  {c.bits:.2f}  {c.error:.3e}" for c in self.layers]
        lines.append(f"{'total':{width}s}  {'':{fwidth}s}  {self.bits_per_value:.2f}  {self.error:.3e}")
        return "\n".join(lines)


def _candidates(formats: Sequence[Any]) -> list[tuple[str, tuple]]:
    out = []
    for item in formats:
        fmt, options = (item, ()) if isinstance(item, str) else (item[0], tuple(sorted(dict(item[1]).items())))
        if fmt not in quant.format_names():
            raise FormatError(argument="formats", expected="format names of quant.format_names()", got=repr(fmt))
        out.append((fmt, options))
    if not out:
        raise ConfigError(argument="formats", expected="at least one candidate format", got="none")
    return out


def _outputs(graphdef, state, args, kwargs):
    return nnx.merge(graphdef, state)(*args, **kwargs)


_outputs_jit = jax.jit(_outputs, static_argnums=0)


def _squared(a, b=None):
    leaves = jax.tree_util.tree_leaves(a)
    other = [None] * len(leaves) if b is None else jax.tree_util.tree_leaves(b)
    total = jnp.float32(0)
    for x, y in zip(leaves, other, strict=True):
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
            d = jnp.asarray(x, jnp.float32) if y is None else jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)
            total = total + jnp.sum(d * d)
    return total


def sensitivity(
    model: nnx.Module,
    calibration: Any,
    *,
    formats: Sequence[Any] = DEFAULT_CANDIDATES,
    show_progress: bool = False,
    measure: str = "model",
    gptq_options: dict | None = None,
    grams: tuple[dict, dict] | None = None,
) -> tuple[LayerChoice, ...]:
    """Each ``nnx.Linear`` quantized alone (round to nearest) in each candidate format: bytes and model error.

    Args:
        model: an NNX module (not changed).
        calibration: a sequence of batches (argument tuples or :class:`viva_tensor.nn.CalibrationBatch`).
        formats: candidates: format names or ``(name, options)`` pairs. A layer is measured in a candidate
            only when its input size is a whole number of the format's rows (K-quants: 256).
        show_progress: a rich progress bar on stderr.
        measure: ``"model"``: every (layer, candidate) through the model. ``"gain"``: one model run per
            layer, in its first candidate; the other candidates' errors are that error times the ratio of
            their layer output errors ``tr(ΔW G ΔWᵀ)`` (``G`` the Gram matrix of the layer's inputs on the
            same batches): the model's response to a layer taken as proportional to the layer's output
            error. One model run per layer instead of one per candidate. ``"gptq"``: as ``"gain"``, but every
            candidate's record is :func:`viva_tensor.gptq.quantize` of the kernel on the layer's Hessian
            ``2 G / n`` (a candidate's ``block_size`` as GPTQ's ``group_size``, as
            :func:`viva_tensor.nn.quantize_model` applies a plan), so the errors are those GPTQ leaves.
        gptq_options: with ``measure="gptq"``: options of :func:`viva_tensor.gptq.quantize` (``damp``, ``mse``).
        grams: with ``"gain"`` / ``"gptq"``: :func:`viva_tensor.nn._sequential.capture_grams`'s ``(grams, groups)``
            to use instead of measuring them on ``calibration`` (e.g. those of a larger calibration set).

    Returns:
        One :class:`LayerChoice` per (layer, candidate) measured, in graph order.

    Raises:
        ConfigError: a callable calibration, no candidate, or an unknown ``measure``.
        FormatError: an unknown format.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> model = nnx.Sequential(nnx.Linear(64, 64, rngs=nnx.Rngs(0)), nnx.Linear(64, 8, rngs=nnx.Rngs(1)))
        >>> found = sensitivity(model, [(jax.random.normal(jax.random.key(0), (16, 64)),)], formats=["q4_0", "q8_0"])
        >>> [(c.name, c.fmt, c.bits) for c in found][:2], all(c.error > 0 for c in found)
        ([('layers.0', 'q4_0', 4.5), ('layers.0', 'q8_0', 8.5)], True)
        >>> gain = sensitivity(model, [(jax.random.normal(jax.random.key(0), (16, 64)),)], formats=["q4_0", "q8_0"],
        ...                    measure="gain")
        >>> gain[0].error == found[0].error, gain[1].error < gain[0].error
        (True, True)
    """
    if measure not in ("model", "gain", "gptq"):
        raise ConfigError(argument="measure", expected="'model', 'gain' or 'gptq'", got=repr(measure))
    candidates = _candidates(formats)
    batches = _batches(calibration)
    if callable(batches):
        raise ConfigError(argument="calibration", expected="a sequence of batches for the planner", got="a callable")
    copy = nnx.clone(model)
    graphdef, state = nnx.split(copy)
    calls = [(tuple(b.args), dict(b.kwargs)) for b in batches]
    base = [_outputs_jit(graphdef, state, a, k) for a, k in calls]
    norm = float(sum(_squared(y) for y in base))
    found = []
    layers = [(path, layer) for path, layer in linears(model)]
    todo = [(p, layer, c) for p, layer in layers for c in candidates
            if layer.in_features % quant.format_spec(c[0]).row_multiple == 0]  # fmt: skip
    gain = measure in ("gain", "gptq")
    if gain and grams is None:
        grams = capture_grams(model, batches)
    grams, groups = grams if gain else ({}, {})
    first: dict[str, tuple[float, float]] = {}  # layer -> (model error, layer output error) of its first candidate
    steps = len(todo) if measure != "gain" else len(layers)
    with _progress(show_progress, steps, "sensitivity") as bar:
        for path, layer, (fmt, options) in todo:
            name = path_str(path)
            kernel = jnp.asarray(layer.kernel.get_value())
            r, opts = split_rotation(kernel.shape[0], options)
            w = kernel.T if r is None else _rotation.apply(kernel.T, r)  # (out, in): W or W R
            if measure == "gptq":
                gram, count = grams[groups[name]]
                gram = gram if r is None else _rotation.hessian(gram, r)
                record = _gptq_record(w.T, (gram, count), fmt, opts, gptq_options or {})
            else:
                record = quant.quantize(w, fmt, **opts)
            deq = dense(record, r).T.astype(kernel.dtype)
            stored = int(record.nbytes) + (0 if r is None else r.nbytes)
            if gain and name in first:
                model_error, layer_error = first[name]
                ratio = _layer_error(kernel, deq, grams[groups[name]][0]) / layer_error if layer_error else 0.0
                err = model_error * ratio
                if measure == "gptq":
                    bar.step(f"sensitivity {name} {fmt}")
            else:
                target = _at(copy, path).kernel
                target.set_value(deq)
                swapped = nnx.split(copy)[1]
                err = sum(_squared(_outputs_jit(graphdef, swapped, a, k), y)
                          for (a, k), y in zip(calls, base, strict=True)) / norm  # fmt: skip
                err = float(err)
                target.set_value(kernel)
                if gain:
                    first[name] = (err, _layer_error(kernel, deq, grams[groups[name]][0]))
                bar.step(f"sensitivity {name} {fmt}")
            found.append(LayerChoice(name, fmt, options, stored, int(kernel.size), float(err)))
    return tuple(found)


def _gptq_record(kernel: jax.Array, gram_count: tuple, fmt: str, options: dict, gptq_options: dict) -> Any:
    """GPTQ of ``kernel.T`` in ``fmt`` on the Hessian ``2 G / n``; a ``block_size`` becomes GPTQ's ``group_size``."""
    from viva_tensor import gptq
    from viva_tensor.nn._qlinear import _DEFAULT_OPTIONS

    gram, count = gram_count
    h = gptq.Hessian(gram * (jnp.float32(2) / jnp.maximum(count, jnp.float32(1))), count)
    options = {**_DEFAULT_OPTIONS.get(fmt, {}), **options, **gptq_options}
    if "block_size" in options:
        options["group_size"] = options.pop("block_size")
    return gptq.quantize(kernel.T, h, fmt, **options)


def _layer_error(kernel: jax.Array, deq: jax.Array, gram: jax.Array) -> float:
    """``tr(ΔKᵀ G ΔK)``: the squared output error of a layer whose kernel ``(in, out)`` moves by ``ΔK``."""
    delta = jnp.asarray(kernel, jnp.float32) - jnp.asarray(deq, jnp.float32)
    return float(jnp.sum(jnp.matmul(gram, delta, precision=jax.lax.Precision.HIGHEST) * delta))


def _hull(options: list[LayerChoice]) -> list[LayerChoice]:
    """The lower convex hull of (bytes, error), cheapest first: the choices a greedy knapsack can walk."""
    options = sorted(options, key=lambda c: (c.nbytes, c.error, c.label))
    kept: list[LayerChoice] = []
    for c in options:
        if kept and c.error >= kept[-1].error:
            continue  # dominated: more bytes, no less error
        while len(kept) >= 2:
            a, b = kept[-2], kept[-1]
            slope_ab = (b.error - a.error) / (b.nbytes - a.nbytes)
            slope_ac = (c.error - a.error) / (c.nbytes - a.nbytes)
            if slope_ac <= slope_ab:
                kept.pop()
            else:
                break
        kept.append(c)
    return kept


def choose(measured: Sequence[LayerChoice], *, bits: float | None = None, target: float | None = None) -> tuple:
    """One choice per layer: the least summed error within ``bits`` per value, or the fewest bytes to ``target``."""
    names = list(dict.fromkeys(c.name for c in measured))
    hulls = {n: _hull([c for c in measured if c.name == n]) for n in names}
    at = {n: 0 for n in names}
    values = sum(hulls[n][0].values for n in names)
    used = sum(hulls[n][0].nbytes for n in names)
    budget = None if bits is None else bits * values / 8.0
    if budget is not None and used > budget:
        least = 8.0 * used / values
        raise ConfigError(argument="bits", expected=f"at least {least:.3f} (the cheapest candidates)", got=bits)
    if target is not None:
        return _downgrade(names, hulls, target)
    while True:
        best = None
        for n in names:
            if at[n] + 1 >= len(hulls[n]):
                continue
            now, nxt = hulls[n][at[n]], hulls[n][at[n] + 1]
            extra = nxt.nbytes - now.nbytes
            if used + extra > budget:
                continue
            gain = (now.error - nxt.error) / extra
            if best is None or gain > best[0]:
                best = (gain, n, extra)
        if best is None:
            break
        at[best[1]] += 1
        used += best[2]
    return tuple(hulls[n][at[n]] for n in names)


def _downgrade(names: list[str], hulls: dict[str, list[LayerChoice]], target: float) -> tuple:
    """From the most accurate choice of every layer, step down the hulls (least error added per byte saved)
    while the summed error stays within ``target``."""
    at = {n: len(hulls[n]) - 1 for n in names}
    error = sum(hulls[n][-1].error for n in names)
    if error > target:
        raise ConfigError(argument="target", expected=f"at least {error:.3e} (every layer in its best candidate)",
                          got=target)  # fmt: skip
    while True:
        best = None
        for n in names:
            if at[n] == 0:
                continue
            now, prev = hulls[n][at[n]], hulls[n][at[n] - 1]
            cost = prev.error - now.error
            if error + cost > target:
                continue
            rate = cost / (now.nbytes - prev.nbytes)
            if best is None or rate < best[0]:
                best = (rate, n, cost)
        if best is None:
            return tuple(hulls[n][at[n]] for n in names)
        at[best[1]] -= 1
        error += best[2]


def plan(
    model: nnx.Module,
    calibration: Any,
    *,
    bits: float | None = None,
    target: float | None = None,
    formats: Sequence[Any] = DEFAULT_CANDIDATES,
    progress: bool = False,
    measure: str = "model",
    gptq_options: dict | None = None,
    grams: tuple[dict, dict] | None = None,
) -> Plan:
    """A format per ``nnx.Linear``: the least model error within a budget of bits, or the fewest bits to a target.

    Args:
        model: an NNX module (not changed).
        calibration: a sequence of batches (argument tuples or :class:`viva_tensor.nn.CalibrationBatch`);
            the sensitivity runs the model once per layer and candidate on every batch, so a few batches
            suffice.
        bits: the budget: average stored bits per value over the kernels (every byte counted).
        target: the largest predicted relative output error (the sum of the single-layer errors).
        formats: candidate formats (names or ``(name, options)`` pairs), see :data:`DEFAULT_CANDIDATES`.
        progress: a rich progress bar on stderr.
        measure: how :func:`sensitivity` measures (``"model"``: every layer and candidate through the
            model; ``"gain"``: once per layer, the other candidates scaled by their layer output errors; ``"gptq"``:
            as ``"gain"`` with every candidate quantized by GPTQ on the layer's Hessian).
        gptq_options: :func:`sensitivity`'s, with ``measure="gptq"``.
        grams: :func:`sensitivity`'s: precomputed ``capture_grams`` output for ``"gain"`` / ``"gptq"``.

    Returns:
        A :class:`Plan` (``print(plan)`` shows layer, format, bits and measured error).

    Raises:
        ConfigError: neither or both of ``bits`` and ``target``, a budget below the cheapest candidates, or a
            target below the error of the best ones.
        FormatError: an unknown format.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from viva_tensor import nn
        >>> model = nnx.Sequential(nnx.Linear(64, 64, rngs=nnx.Rngs(0)), nnx.Linear(64, 64, rngs=nnx.Rngs(1)))
        >>> batches = [(jax.random.normal(jax.random.key(0), (32, 64)),)]
        >>> p = nn.plan(model, batches, bits=6.5, formats=["q4_0", "q8_0"])
        >>> sorted(c.fmt for c in p.layers), p.bits_per_value <= 6.5
        (['q4_0', 'q8_0'], True)
        >>> qmodel, report = nn.quantize_model(model, p)
        >>> report.formats == {c.name: c.fmt for c in p.layers}
        True
    """
    if (bits is None) == (target is None):
        raise ConfigError(argument="bits", expected="exactly one of bits and target",
                          got=f"bits={bits}, target={target}")  # fmt: skip
    measured = sensitivity(model, calibration, formats=formats, show_progress=progress, measure=measure,
                           gptq_options=gptq_options, grams=grams)  # fmt: skip
    return Plan(choose(measured, bits=bits, target=target), measured, bits, target)
