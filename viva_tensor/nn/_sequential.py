"""Calibrated, sequential GPTQ over a whole NNX model: every ``nnx.Linear`` on the inputs the model really gives it.

:func:`capture_grams` runs a model on calibration data and returns, for each captured ``nnx.Linear``, the
Gram matrix ``XᵀX`` of its inputs (float32, accumulated on the device, padding tokens masked out) and the
token count. Layers that receive the same array (the query, key and value projections of an attention
block) form one *group* and share one matrix: the grouping is read from the program itself (the same
traced array reaches them). With calibration batches (a sequence), the forward runs as one jitted
program per batch shape whose outputs are the Gram matrices only, so XLA drops the part of the model after
the last captured layer; a calibration callable runs the model eagerly.

:func:`gptq_records` quantizes the layers group by group: with ``sequential=True`` group ``i`` is
quantized with the Hessian of the inputs that the already-quantized groups before it produce (GPTQ's and
AutoGPTQ's practice; within an attention block q/k/v first, then the output projection, then the
feed-forward layers: "true sequential"); with ``sequential=False`` every layer is quantized on the float
model's inputs, from one pass. With ``asymmetric=True`` (sequential) each layer is fit to the float model's
outputs instead (GPTAQ's asymmetric calibration, :func:`viva_tensor.gptq.float_target`): :func:`capture_cross`
runs the float and the partly quantized model on the same batches and returns the Gram matrix of the quantized
inputs and their cross Gram matrix with the float inputs. While the sweep runs, the layers already quantized
are float Linears holding their decoded kernels (one program structure for every capture).
:func:`viva_tensor.nn.quantize_model` with ``method="gptq"`` calls it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from viva_tensor import gptq, quant
from viva_tensor import rotation as _rotation
from viva_tensor._paths import path_str
from viva_tensor.errors import ConfigError, ShapeMismatch
from viva_tensor.nn._awq import linears
from viva_tensor.nn._graph import set_child
from viva_tensor.nn._qlinear import dense, split_rotation

__all__ = ["BIAS_CORRECTIONS", "CalibrationBatch", "bias_corrections", "capture_grams", "capture_cross", "gptq_records",
           "migrated_gptq", "migration_scales", "progress"]

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class CalibrationBatch:
    """One calibration call of a model: ``model(*args, **kwargs)``, with an optional token mask.

    Attributes:
        args: the positional arguments.
        kwargs: the keyword arguments.
        mask: optional booleans ``(batch, tokens)``: a layer input ``(batch, tokens, in)`` counts only
            the tokens where it is True (leave padding out). Inputs of another shape are not masked.
        weights: optional non-negative floats ``(batch, tokens)``: token ``t`` of a layer input ``(batch,
            tokens, in)`` adds ``w_t x_t x_tᵀ`` to the Gram matrix and ``w_t`` to the token count (times the
            mask, when both are given), as :func:`viva_tensor.gptq.accumulate`'s ``weights``. E.g. ``1 / L``
            on the ``L`` tokens of each text when the model's output is a mean over each text's tokens:
            every text then weighs the same in the Hessians, the AWQ statistics and the planner's layer
            errors. Inputs of another shape are not weighted.

    Example:
        >>> import jax.numpy as jnp
        >>> b = CalibrationBatch((jnp.ones((2, 4, 8)),), mask=jnp.array([[1, 1, 0, 0], [1, 1, 1, 0]]))
        >>> len(b.args), b.mask.shape
        (1, (2, 4))
    """

    args: tuple = ()
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    mask: Any = None
    weights: Any = None


class _Context:
    """What the capture modules report to while a calibration forward is traced or run."""

    def __init__(self, wanted: set[str] | None):
        self.wanted = wanted
        self.mask: jax.Array | None = None
        self.weights: jax.Array | None = None
        self.grams: dict[str, tuple[jax.Array, jax.Array]] = {}
        self.first: dict[int, str] = {}
        self.group_of: dict[str, str] = {}
        self.keep: list[jax.Array] = []  # inputs kept alive while running, so that their ids stay unique
        self.raw: str | None = None  # a layer whose (masked) input rows are kept in `rows`
        self.rows: list[jax.Array] = []
        self.what = "grams"  # "grams", "both" (grams and input sums) or "sums"
        self.sums: dict[str, jax.Array] = {}

    def token_weights(self, x: jax.Array) -> jax.Array | None:
        """The weight of each row of ``x.reshape(-1, in)`` (mask times weights), or ``None`` (all 1)."""
        return _token_weights(self.mask, self.weights, x.shape[:-1])

    def record(self, name: str, x: jax.Array) -> None:
        leader = self.first.setdefault(id(x), name)
        self.keep.append(x)
        self.group_of.setdefault(name, leader)
        weight = self.token_weights(x)
        if name == self.raw:
            rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
            if weight is not None:
                rows = rows * jnp.sqrt(weight)[:, None]
            self.rows.append(rows)
        if leader != name or (self.wanted is not None and name not in self.wanted):
            return
        rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        if self.what != "grams":  # the weighted sum of the inputs (their mean times the token count)
            total = jnp.sum(rows if weight is None else rows * weight[:, None], axis=0)
            self.sums[name] = total + self.sums[name] if name in self.sums else total
        if weight is not None:
            rows = rows * jnp.sqrt(weight)[:, None]
            count = jnp.sum(weight)
        else:
            count = jnp.float32(rows.shape[0])
        if self.what == "sums":
            gram = jnp.zeros((), jnp.float32)  # not asked: a placeholder scalar, never returned to a caller
        else:
            gram = jax.lax.dot_general(rows, rows, (((0,), (0,)), ((), ())), precision=_HIGHEST)
        if name in self.grams:  # a layer called twice in one forward
            old, n = self.grams[name]
            gram, count = old + gram, n + count
        self.grams[name] = (gram, count)


_CONTEXT: list[_Context] = []


def _token_weights(mask: Any, weights: Any, shape: tuple) -> jax.Array | None:
    """Flat float32 weights of the tokens of an input of leading shape ``shape``: ``mask * weights`` where their
    shapes match it; ``None`` when neither applies."""
    out = None
    for part in (mask, weights):
        if part is not None and tuple(part.shape) == tuple(shape):
            part = jnp.asarray(part).reshape(-1).astype(jnp.float32)
            out = part if out is None else out * part
    return out


class _Capture(nnx.Module):
    """Calls a layer and reports its input to the current :class:`_Context`."""

    def __init__(self, layer: nnx.Module, name: str):
        self.layer = layer
        self.name = name

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        if _CONTEXT:
            _CONTEXT[-1].record(self.name, x)
        return self.layer(x, *args, **kwargs)


def _forward(graphdef: Any, state: Any, args: tuple, kwargs: dict, mask: Any, weights: Any, wanted: tuple | None,
             what: str = "grams"):  # fmt: skip
    context = _Context(None if wanted is None else set(wanted))
    context.mask = None if mask is None else jnp.asarray(mask)
    context.weights = None if weights is None else jnp.asarray(weights)
    context.what = what
    _CONTEXT.append(context)
    try:
        nnx.merge(graphdef, state)(*args, **kwargs)
    finally:
        _CONTEXT.pop()
    _TRACED_GROUPS[(graphdef, wanted)] = dict(context.group_of)  # read at trace time: the same on every trace
    return context.grams, context.sums


_TRACED_GROUPS: dict[tuple, dict[str, str]] = {}
_forward_jit = jax.jit(_forward, static_argnums=(0, 6, 7))


def _inputs_of(graphdef: Any, state: Any, args: tuple, kwargs: dict, mask: Any, weights: Any, name: str) -> jax.Array:
    """The (masked) input rows ``(tokens, in)`` of layer ``name`` in one forward (all its calls, stacked), each row
    times the square root of its token weight."""
    context = _Context(set())
    context.mask = None if mask is None else jnp.asarray(mask)
    context.weights = None if weights is None else jnp.asarray(weights)
    context.raw = name
    _CONTEXT.append(context)
    try:
        nnx.merge(graphdef, state)(*args, **kwargs)
    finally:
        _CONTEXT.pop()
    if not context.rows:
        raise ConfigError(argument="calibration", expected=f"a run that calls layer {name!r}", got="no call")
    return jnp.concatenate(context.rows, axis=0)


def _pair(float_def, float_state, graphdef, state, args, kwargs, mask, weights, name):
    xf = _inputs_of(float_def, float_state, args, kwargs, mask, weights, name)
    xq = _inputs_of(graphdef, state, args, kwargs, mask, weights, name)
    contract = (((0,), (0,)), ((), ()))
    gram = jax.lax.dot_general(xq, xq, contract, precision=_HIGHEST)
    cross = jax.lax.dot_general(xf, xq, contract, precision=_HIGHEST)
    shape = None if mask is None and weights is None else (mask if mask is not None else weights).shape
    weight = None if shape is None else _token_weights(mask, weights, tuple(shape))
    count = jnp.float32(xq.shape[0]) if weight is None else jnp.sum(weight)
    return gram, cross, count


_pair_jit = jax.jit(_pair, static_argnums=(0, 2, 8))


def _wrapped(model: nnx.Module) -> nnx.Module:
    copy = nnx.clone(model)
    for path, layer in linears(copy):
        set_child(copy, path, _Capture(layer, path_str(path)))
    return copy


def capture_cross(
    float_model: nnx.Module, model: nnx.Module, calibration: Any, name: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(X_qᵀX_q, X_fᵀX_q, tokens)`` for layer ``name``: its inputs in ``model`` (``X_q``) and in
    ``float_model`` (``X_f``) on the same calibration batches (a sequence; padding masked out).

    Args:
        float_model: the reference model (not changed).
        model: the same architecture, some layers changed (not changed).
        calibration: a sequence of batches (argument tuples or :class:`CalibrationBatch`).
        name: the layer's dotted path.

    Returns:
        float32 ``gram (in, in)``, ``cross (in, in)`` and the token count.

    Raises:
        ConfigError: a callable or empty calibration, or a layer that the model does not call.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
        >>> other = nnx.clone(model)
        >>> other.layers[0].kernel.set_value(2 * other.layers[0].kernel.get_value())
        >>> gram, cross, n = capture_cross(model, other, [(jnp.ones((5, 3)),)], "layers.1")
        >>> bool(jnp.allclose(gram, 2 * cross)), float(n)
        (True, 5.0)
    """
    batches = _batches(calibration)
    if callable(batches):
        raise ConfigError(argument="calibration", expected="a sequence of batches", got="a callable")
    float_def, float_state = nnx.split(_wrapped(float_model))
    graphdef, state = nnx.split(_wrapped(model))
    total = None
    for batch in batches:
        got = _pair_jit(float_def, float_state, graphdef, state, tuple(batch.args), dict(batch.kwargs), batch.mask,
                        batch.weights, name)  # fmt: skip
        total = got if total is None else tuple(a + b for a, b in zip(total, got, strict=True))
    return total


def _batches(calibration: Any) -> list[CalibrationBatch] | Callable:
    if callable(calibration) and not isinstance(calibration, (list, tuple)):
        return calibration
    if calibration is None or isinstance(calibration, (str, bytes)) or not isinstance(calibration, Sequence):
        raise ConfigError(
            argument="calibration",
            expected="a callable f(model) or a sequence of argument tuples / CalibrationBatch",
            got=type(calibration).__name__,
        )
    out = []
    for item in calibration:
        if isinstance(item, CalibrationBatch):
            out.append(item)
        elif isinstance(item, tuple):
            out.append(CalibrationBatch(item))
        else:
            out.append(CalibrationBatch((item,)))
    if not out:
        raise ConfigError(argument="calibration", expected="at least one batch", got="an empty sequence")
    return out


def capture_grams(
    model: nnx.Module, calibration: Any, *, names: Sequence[str] | None = None
) -> tuple[dict[str, tuple[jax.Array, jax.Array]], dict[str, str]]:
    """Gram matrices ``XᵀX`` of the inputs of a model's ``nnx.Linear`` layers over calibration data.

    Args:
        model: an NNX module (not changed).
        calibration: a callable ``f(model) -> None`` that runs the model (eagerly), or a sequence of
            batches: argument tuples or :class:`CalibrationBatch` (jitted, masked).
        names: dotted paths of the layers to measure (``None``: all). The others still run.

    Returns:
        ``(grams, groups)``: ``grams[leader] = (XᵀX float32 (in, in), tokens)`` for each group leader
        measured, and ``groups[name] = leader``, the first layer (in call order) that received the same
        input, for every layer that ran.

    Raises:
        ConfigError: a calibration that is neither a callable nor a non-empty sequence.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
        >>> grams, groups = capture_grams(model, [(jnp.ones((5, 3)),)])
        >>> grams["layers.0"][0].tolist()[0], float(grams["layers.0"][1]), groups
        ([5.0, 5.0, 5.0], 5.0, {'layers.0': 'layers.0', 'layers.1': 'layers.1'})
    """
    grams, groups, _ = _capture(model, calibration, names=names)
    return grams, groups


def _capture(
    model: nnx.Module, calibration: Any, *, names: Sequence[str] | None = None, what: str = "grams"
) -> tuple[dict[str, tuple[jax.Array, jax.Array]], dict[str, str], dict[str, jax.Array]]:
    """:func:`capture_grams` with the inputs' weighted sums ``Σ w_t x_t`` per group leader as well (``what="both"``),
    or the sums and token counts only (``"sums"``: ``grams[leader] = (placeholder, tokens)``); private."""
    copy = nnx.clone(model)
    for path, layer in linears(copy):
        set_child(copy, path, _Capture(layer, path_str(path)))
    batches = _batches(calibration)
    wanted = None if names is None else tuple(sorted(names))
    total: dict[str, tuple[jax.Array, jax.Array]] = {}
    sums: dict[str, jax.Array] = {}
    groups: dict[str, str] = {}

    def add(grams, group_of, batch_sums):
        for name, (gram, count) in grams.items():
            if name in total:
                gram, count = total[name][0] + gram, total[name][1] + count
            total[name] = (gram, count)
        for name, value in batch_sums.items():
            sums[name] = sums[name] + value if name in sums else value
        for name, leader in group_of.items():
            groups.setdefault(name, leader)

    if callable(batches):
        context = _Context(None if wanted is None else set(wanted))
        context.what = what
        _CONTEXT.append(context)
        try:
            batches(copy)
        finally:
            _CONTEXT.pop()
        add(context.grams, context.group_of, context.sums)
        return total, groups, sums
    graphdef, state = nnx.split(copy)
    for batch in batches:
        grams, batch_sums = _forward_jit(graphdef, state, tuple(batch.args), dict(batch.kwargs), batch.mask,
                                         batch.weights, wanted, what)  # fmt: skip
        add(grams, _TRACED_GROUPS.get((graphdef, wanted), {}) if not groups else {}, batch_sums)
    return total, groups, sums


def progress(enabled: bool, total: int, description: str):
    """A transient rich progress bar on stderr advancing once per step, or a silent stand-in (private)."""
    if not enabled:
        return _Silent()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description:40s}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=Console(stderr=True), transient=True)  # fmt: skip
    return _Bar(bar, total, description)


class _Silent:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def step(self, description: str) -> None:
        pass


class _Bar(_Silent):
    def __init__(self, bar, total, description):
        self.bar, self.total, self.description = bar, total, description

    def __enter__(self):
        self.bar.__enter__()
        self.task = self.bar.add_task(self.description, total=self.total)
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def step(self, description: str) -> None:
        self.bar.update(self.task, advance=1, description=description)


MIGRATE_ALPHAS = (0.0, 0.25, 0.5)
"""The alphas :func:`migrated_gptq` tries by default. Measured on MiniLM (int4 g128, mse, damp 0.1, 500 calibration
texts fitting / 126 held out): alphas 0, 1/8 ... 5/8 gave the held-out calibration texts 0.99046 mean cosine and the 32
evaluation sentences 0.9751 / 0.950 min; 0, 1/4, 1/2 gave 0.99025 and 0.9773 / 0.959 at half the GPTQ runs (plain
GPTQ on the same split: 0.98761, 0.9718 / 0.935)."""


def gptq_records(
    model: nnx.Module,
    choose: Callable[[str, nnx.Linear], tuple[str, dict] | None],
    calibration: Any,
    make_layer: Callable[[nnx.Linear, Any, Any], nnx.Module],
    *,
    sequential: bool = True,
    asymmetric: bool = False,
    target_damp: float = 0.01,
    start: nnx.Module | None = None,
    show_progress: bool = False,
    migrate: str | None = None,
    migrate_alphas: Sequence[float] = MIGRATE_ALPHAS,
    bias_correction: str | None = None,
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """GPTQ records for the chosen ``nnx.Linear`` layers of ``model``, group by group (private helper).

    Args:
        model: the float model (not changed).
        choose: ``choose(name, layer) -> (fmt, options)`` or ``None`` to leave a layer in float; the
            options are those of :func:`viva_tensor.gptq.quantize`, and ``rotate`` / ``rotation_key`` (as
            :meth:`viva_tensor.nn.QLinear.from_linear`'s): GPTQ of ``W R`` on the rotated inputs' Hessian
            ``Rᵀ H R`` (:mod:`viva_tensor.rotation`).
        calibration: as :func:`capture_grams`.
        make_layer: builds the quantized layer from the float one, its record and its rotation (or ``None``) (to
            run the later groups
            on the quantized ones before them).
        sequential: quantize each group on the inputs of the model quantized so far (True), or every layer
            on the float model's inputs (False).
        asymmetric: (with ``sequential``) fit each layer to the float model's outputs: GPTQ of
            :func:`viva_tensor.gptq.float_target` (``W' = W (C + λI)(G + λI)⁻¹`` from the quantized model's
            inputs ``X_q`` and the float model's ``X_f`` on the same batches) on the Hessian of ``X_q``, which
            minimises ``||X_f Wᵀ - X_q Qᵀ||²`` (GPTAQ's asymmetric calibration). Needs calibration batches.
        target_damp: the ridge of :func:`viva_tensor.gptq.float_target` (relative to ``mean(diag G)``).
        start: the model the quantized copy starts from (e.g. ``model`` with its embeddings already
            quantized); ``None``: ``model``.
        show_progress: show a rich progress bar on stderr.
        migrate: ``"awq"``: AWQ-style scale migration before GPTQ for the ``int4_group`` layers (see
            :func:`migrated_gptq`); every 5th calibration batch is held out to pick each layer's alpha and
            the Hessians come from the others. ``None``: plain GPTQ.
        migrate_alphas: the alphas tried (0 is plain GPTQ on the same Hessian).
        bias_correction: ``None``, ``"quantized"`` or ``"float"``: correct each quantized layer's bias for the
            mean of its output error on the calibration inputs (see :func:`bias_corrections`). With
            ``sequential`` the corrected biases are in the model whose inputs the later groups' Hessians come
            from; one-shot, a sweep after GPTQ measures the means group by group on the corrected model.

    Returns:
        ``({name: record}, {name: corrected bias}, {name: rotation})`` of the chosen layers (the second empty
        without ``bias_correction``, layers without a bias left out of it; the third holds the rotated layers).
    """
    chosen = {}
    for path, layer in linears(model):
        name = path_str(path)
        picked = choose(name, layer)
        if picked is not None:
            chosen[name] = (path, picked)
    if not chosen:
        return {}, {}, {}
    _check_bias_correction(bias_correction)
    if bias_correction is not None and asymmetric:
        raise ConfigError(argument="bias_correction", expected="None with asymmetric=True", got=repr(bias_correction))
    what = "grams" if bias_correction is None else "both"
    names = () if asymmetric else None if sequential else list(chosen)
    held: list | None = None
    if migrate is not None:
        if migrate != "awq":
            raise ConfigError(argument="migrate", expected="None or 'awq'", got=repr(migrate))
        if asymmetric:
            raise ConfigError(argument="migrate", expected="migrate=None with asymmetric=True", got=repr(migrate))
        calibration, held = _split(calibration)
    grams, groups, sums = _capture(model, calibration, names=names, what=what)
    float_means = {n: sums[n] / jnp.maximum(grams[n][1], jnp.float32(1e-30)) for n in sums}
    held_grams = capture_grams(model, held, names=names)[0] if held is not None else None
    order: list[str] = []
    for name in groups:  # call order
        if name in chosen and groups[name] not in order:
            order.append(groups[name])
    missing = sorted(set(chosen) - set(groups))
    if missing:
        raise ConfigError(argument="calibration", expected="a run that calls every selected layer",
                          got=f"layers never called: {missing}")  # fmt: skip
    if asymmetric and not sequential:
        raise ConfigError(argument="asymmetric", expected="sequential=True with asymmetric=True", got=asymmetric)
    # The quantized layers run in `current` as float Linears holding their decoded kernels: one graph for
    # every capture (the same program structure), the same outputs as the records' layers.
    current = nnx.clone(model if start is None else start)
    records: dict[str, Any] = {}
    biases: dict[str, jax.Array] = {}
    rotations: dict[str, Any] = {}
    with progress(show_progress, len(chosen), "GPTQ") as bar:
        for i, leader in enumerate(order):
            cross = None
            means = float_means
            if asymmetric:
                gram, cross, count = capture_cross(model, current, calibration, leader)
            else:
                if sequential and (i > 0 or start is not None):
                    grams, _, sums = _capture(current, calibration, names=[leader], what=what)
                    means = {n: sums[n] / jnp.maximum(grams[n][1], jnp.float32(1e-30)) for n in sums}
                    if held is not None:
                        held_grams, _ = capture_grams(current, held, names=[leader])
                gram, count = grams[leader]
            h = gptq.Hessian(gram * (jnp.float32(2) / jnp.maximum(count, jnp.float32(1))), count)
            for name in [n for n in groups if groups[n] == leader and n in chosen]:
                path, (fmt, options) = chosen[name]
                layer = _at(model, path)
                kernel = jnp.asarray(layer.kernel.get_value())
                if h.matrix.shape[0] != kernel.shape[0]:
                    raise ShapeMismatch(argument="calibration", expected=f"inputs (..., {kernel.shape[0]})",
                                        got=f"a Hessian of size {h.matrix.shape[0]} for {name!r}")  # fmt: skip
                w = kernel.T if cross is None else gptq.float_target(kernel.T, gram, cross, damp=target_damp)
                r, options = split_rotation(kernel.shape[0], options)
                if r is not None and held_grams is not None and fmt == "int4_group":
                    raise ConfigError(argument="rotate", expected="None with migrate='awq'",
                                      got=repr(chosen[name][1]["rotate"]))  # fmt: skip
                if held_grams is not None and fmt == "int4_group":
                    records[name] = migrated_gptq(w, gram, count, held_grams[leader][0], alphas=migrate_alphas,
                                                  **options)  # fmt: skip
                elif r is not None:  # GPTQ of W R on the Hessian of x R: Rᵀ H R
                    hr = gptq.Hessian(_rotation.hessian(h.matrix, r), h.count)
                    records[name] = gptq.quantize(_rotation.apply(w, r), hr, fmt, **options)
                    rotations[name] = r
                else:
                    records[name] = gptq.quantize(w, h, fmt, **options)
                target = _at(current, path)
                deq = dense(records[name], r).T.astype(kernel.dtype)
                if sequential and bias_correction is not None and layer.bias is not None:
                    biases[name] = _corrected_bias(layer, deq, means[leader], float_means.get(leader),
                                                   bias_correction)  # fmt: skip
                if isinstance(target, nnx.Linear):
                    target.kernel.set_value(deq)
                    if name in biases:
                        target.bias.set_value(biases[name])
                else:
                    set_child(current, path, make_layer(layer, records[name], r))
                bar.step(f"GPTQ {name}")
    if bias_correction is not None and not sequential:
        kernels = {n: dense(r, rotations.get(n)).T for n, r in records.items()}
        biases = bias_corrections(model, kernels, calibration, mode=bias_correction, start=start,
                                  float_means=float_means, groups=groups)  # fmt: skip
    return records, biases, rotations


BIAS_CORRECTIONS = ("quantized", "float")
"""The modes of :func:`bias_corrections`."""


def _check_bias_correction(mode: Any) -> None:
    if mode is not None and mode not in BIAS_CORRECTIONS:
        raise ConfigError(argument="bias_correction", expected=f"None or one of {BIAS_CORRECTIONS}", got=repr(mode))


def _corrected_bias(layer: nnx.Linear, deq: jax.Array, mean_q: jax.Array, mean_f: jax.Array | None,
                    mode: str) -> jax.Array:  # fmt: skip
    """``b + μ_q (K - K_q)`` (``"quantized"``) or ``b + μ_f K - μ_q K_q`` (``"float"``), kernels ``(in, out)``."""
    kernel = jnp.asarray(layer.kernel.get_value(), jnp.float32)
    deq = jnp.asarray(deq, jnp.float32)
    bias = jnp.asarray(layer.bias.get_value())
    mean_q = jnp.asarray(mean_q, jnp.float32)
    if mode == "quantized":
        delta = jnp.matmul(mean_q, kernel - deq, precision=_HIGHEST)
    else:
        delta = jnp.matmul(jnp.asarray(mean_f, jnp.float32), kernel, precision=_HIGHEST) - jnp.matmul(
            mean_q, deq, precision=_HIGHEST)  # fmt: skip
    return (bias.astype(jnp.float32) + delta).astype(bias.dtype)


def bias_corrections(
    model: nnx.Module,
    kernels: Mapping[str, jax.Array],
    calibration: Any,
    *,
    mode: str = "quantized",
    start: nnx.Module | None = None,
    float_means: Mapping[str, jax.Array] | None = None,
    groups: Mapping[str, str] | None = None,
) -> dict[str, jax.Array]:
    """Biases that cancel the mean output error of quantized kernels, layer group by group (classic PTQ).

    The layers named in ``kernels`` get, in call order, their quantized kernel ``K_q`` (``(in, out)``, nnx's
    layout) and a new bias: ``b + μ_q (K - K_q)`` (``mode="quantized"``), where ``μ_q`` is the mean input of the
    layer over the calibration tokens (mask and token weights respected) in the model whose earlier layers are
    already quantized and corrected, so that each layer's mean output on its own inputs is the float kernel's;
    or ``b + μ_f K - μ_q K_q`` (``"float"``), ``μ_f`` the mean input in the float model, so that the layer's
    mean output is the float model's. Layers fed the same input share one measurement (one pass of the
    calibration per group). No stored bits change: the biases are floats already. Layers without a bias are
    skipped.

    Args:
        model: the float model (not changed).
        kernels: ``{dotted path: quantized kernel (in, out)}`` (e.g. ``quant.dequantize(record).T``).
        calibration: as :func:`capture_grams` (a callable or a sequence of batches).
        mode: ``"quantized"`` or ``"float"``.
        start: the model the sweep starts from (e.g. with quantized embeddings); ``None``: ``model``.
        float_means: the float model's mean input per group leader, when already measured.
        groups: ``capture_grams``'s ``{layer: group leader}``, when already known.

    Returns:
        ``{dotted path: corrected bias}`` for the named layers that have a bias.

    Raises:
        ConfigError: an unknown ``mode``, or a named layer that the calibration does not call.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
        >>> x = jax.random.normal(jax.random.key(0), (16, 4)) + 1.0
        >>> k = model.layers[0].kernel.get_value()
        >>> b = bias_corrections(model, {"layers.0": jnp.round(k * 4) / 4}, [(x,)])
        >>> y = x @ k + model.layers[0].bias.get_value()[None]
        >>> yq = x @ (jnp.round(k * 4) / 4) + b["layers.0"][None]
        >>> bool(jnp.allclose(y.mean(0), yq.mean(0), atol=1e-5))
        True
    """
    _check_bias_correction(mode)
    if mode is None:
        raise ConfigError(argument="mode", expected=f"one of {BIAS_CORRECTIONS}", got="None")
    if groups is None or (mode == "float" and float_means is None):
        grams, groups, sums = _capture(model, calibration, what="sums")
        float_means = {n: sums[n] / jnp.maximum(grams[n][1], jnp.float32(1e-30)) for n in sums}
    missing = sorted(set(kernels) - set(groups))
    if missing:
        raise ConfigError(argument="calibration", expected="a run that calls every quantized layer",
                          got=f"layers never called: {missing}")  # fmt: skip
    paths = {path_str(p): (p, layer) for p, layer in linears(model)}
    order = list(dict.fromkeys(groups[n] for n in groups if n in kernels))
    current = nnx.clone(model if start is None else start)
    out: dict[str, jax.Array] = {}
    for i, leader in enumerate(order):
        if i == 0 and start is None and float_means is not None and leader in float_means:
            mean_q = float_means[leader]
        else:  # every leader's sums: one program per batch shape for the whole sweep (sums cost little)
            grams, _, sums = _capture(current, calibration, what="sums")
            mean_q = sums[leader] / jnp.maximum(grams[leader][1], jnp.float32(1e-30))
        for name in [n for n in groups if groups[n] == leader and n in kernels]:
            path, layer = paths[name]
            target = _at(current, path)
            target.kernel.set_value(jnp.asarray(kernels[name]).astype(target.kernel.get_value().dtype))
            if layer.bias is None:
                continue
            mean_f = None if float_means is None else float_means.get(leader)
            out[name] = _corrected_bias(layer, kernels[name], mean_q, mean_f, mode)
            target.bias.set_value(out[name])
    return out


def _split(calibration: Any) -> tuple[list[CalibrationBatch], list[CalibrationBatch]]:
    """``(fit, held out)``: every 5th calibration batch held out (at least one of each)."""
    batches = _batches(calibration)
    if callable(batches) or len(batches) < 2:
        raise ConfigError(argument="calibration", expected="a sequence of at least 2 batches with migrate='awq'",
                          got="a callable" if callable(batches) else f"{len(batches)} batch")  # fmt: skip
    held = batches[::5]
    fit = [b for i, b in enumerate(batches) if i % 5]
    return fit, held


def migration_scales(gram: jax.Array, count: Any, alpha: float) -> jax.Array:
    """AWQ-style per-input-channel scales from a Gram matrix: ``s = rms(x)^alpha / sqrt(max · min)``, float16 values.

    ``rms(x)_j = sqrt(G_jj / count)`` (the root mean square of input channel ``j`` over the calibration tokens:
    the Gram matrix's diagonal; AWQ itself takes the mean ``|x|``), raised to ``alpha`` and normalised by the
    geometric mean of its extremes as AWQ does, then rounded to float16 (what the ``awq_int4`` record stores).
    A channel that never fires gets scale ``1 / sqrt(max · min)`` of the others (``rms`` floored at 1e-8 of
    the largest).

    Args:
        gram: ``XᵀX`` ``(in, in)`` float32.
        count: the token count.
        alpha: the exponent (0: all ones).

    Returns:
        float32 ``(in,)`` holding float16 values.

    Example:
        >>> import jax.numpy as jnp
        >>> migration_scales(jnp.diag(jnp.array([4.0, 1.0])), 1.0, 1.0).tolist()
        [1.4140625, 0.70703125]
    """
    rms = jnp.sqrt(jnp.diag(jnp.asarray(gram, jnp.float32)) / jnp.asarray(count, jnp.float32))
    rms = jnp.maximum(rms, jnp.max(rms) * jnp.float32(1e-8))
    s = rms ** jnp.float32(alpha)
    s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))
    return s.astype(jnp.float16).astype(jnp.float32)


def _output_error(w: jax.Array, approx: jax.Array, gram: jax.Array) -> jax.Array:
    """``sum((X (W - A)ᵀ)²) = tr(D G Dᵀ)`` with ``D = W - A`` and ``G = XᵀX``."""
    d = jnp.asarray(w, jnp.float32) - approx
    return jnp.sum(jax.lax.dot_general(d, gram, (((1,), (0,)), ((), ())), precision=_HIGHEST) * d)


def migrated_gptq(
    w: jax.Array,
    gram: jax.Array,
    count: Any,
    held_gram: jax.Array,
    *,
    alphas: Sequence[float] = MIGRATE_ALPHAS,
    group_size: int | None = None,
    **options: Any,
) -> Any:
    """AWQ-style scale migration, then GPTQ: an ``awq_int4`` record whose codes GPTQ chose for ``W diag(s)``.

    For each ``alpha``: ``s`` = :func:`migration_scales` ``(gram, count, alpha)``; GPTQ quantizes ``W' = W diag(s)``
    (int4 groups) with the Hessian of the scaled inputs ``x / s``, ``H' = diag(1/s) H diag(1/s)`` with
    ``H = 2 G / count``; the layer then computes ``(x / s) Q(W')ᵀ``, i.e. decodes to ``Q(W') / s``. The alpha kept
    is the one with the least output error on the held-out inputs, ``tr(D G_h Dᵀ)``, ``D = W - Q(W')/s``
    (``alpha = 0`` is plain GPTQ on the same Hessian, so with 0 in ``alphas`` the held-out error is never
    above plain GPTQ's). The record is the format ``"awq_int4"`` (the int4-group record plus the float16
    scales ``s``; :func:`viva_tensor.awq.dequantize` decodes it).

    Args:
        w: the weight ``(out, in)``.
        gram: ``XᵀX`` of the fitting inputs ``(in, in)``; ``count`` their token count.
        held_gram: ``XᵀX`` of held-out inputs (the alpha's selection).
        alphas: the exponents tried.
        group_size: int4 columns per group (default 128).
        **options: :func:`viva_tensor.gptq.quantize`'s options (``damp``, ``mse``, ``block_size`` ...; not
            ``act_order``).

    Returns:
        An :class:`viva_tensor.awq.AWQTensor`.

    Raises:
        ConfigError: no alphas, or ``act_order``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jax.random.normal(jax.random.key(0), (64, 32)) * jnp.linspace(0.1, 3.0, 32)[None, :]
        >>> g = x.T @ x
        >>> w = jax.random.normal(jax.random.key(1), (8, 32))
        >>> q = migrated_gptq(w, g, 64.0, g, group_size=32)
        >>> q.format, q.shape, q.act_scale.shape
        ('awq_int4', (8, 32), (32,))
    """
    from viva_tensor import awq

    if not alphas:
        raise ConfigError(argument="alphas", expected="at least one alpha", got=tuple(alphas))
    if options.get("act_order"):
        raise ConfigError(argument="act_order", expected="False with scale migration", got=options["act_order"])
    w32 = jnp.asarray(w, jnp.float32)
    h = jnp.asarray(gram, jnp.float32) * (jnp.float32(2) / jnp.maximum(jnp.asarray(count, jnp.float32), 1))
    best = None
    for alpha in alphas:
        s = migration_scales(gram, count, alpha)
        q = gptq.quantize(w32 * s[None, :], h / (s[:, None] * s[None, :]), "int4_group", group_size=group_size,
                          **options)  # fmt: skip
        err = float(_output_error(w32, quant.dequantize(q).astype(jnp.float32) / s[None, :], held_gram))
        if best is None or err < best[0]:
            best = (err, q, s)
    _, q, s = best
    return awq.AWQTensor(q.codes, q.scales, q.zeros, s.astype(jnp.float16), shape=tuple(q.shape), dtype=w.dtype,
                         group_size=q.group_size)  # fmt: skip


def _at(root: nnx.Module, path: tuple) -> Any:
    node = root
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node
