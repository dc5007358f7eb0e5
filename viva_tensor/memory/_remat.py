"""Rematerialisation (private to ``viva_tensor.memory``): ``jax.checkpoint`` over a stack of layers.

The strategies decide, at trace time, which segments of a ``lax.scan`` over stacked layers are
checkpointed; :func:`checkpoint_savings` reads what they save from the compiled gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from viva_tensor import _xla
from viva_tensor._xla import CompiledMemory
from viva_tensor.errors import ConfigError
from viva_tensor.memory._tiers import _check_bytes, tree_nbytes

__all__ = [
    "NoCheckpoint",
    "EveryN",
    "LargeLayersOnly",
    "Adaptive",
    "layer_activation_bytes",
    "checkpoint_plan",
    "apply_layers",
    "CheckpointSavings",
    "checkpoint_savings",
]


@flax.struct.dataclass
class NoCheckpoint:
    """Save every activation for the backward pass (no recomputation)."""


@flax.struct.dataclass
class EveryN:
    """Checkpoint segments of ``n`` layers: only each segment's input is saved, its layers recomputed.

    ``EveryN(1)`` checkpoints every layer; ``n`` near the square root of the depth is the classic
    sqrt(L) schedule (Chen et al., 2016). When ``n`` does not divide the depth, the last layers form a
    shorter segment, checkpointed outside the scan (on CPU, XLA may merge that one back into the
    forward pass: its saving can be lost).
    """

    n: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class LargeLayersOnly:
    """Checkpoint (one by one) the layers whose activations exceed ``threshold`` bytes.

    A layer's activations are measured by :func:`layer_activation_bytes`.
    """

    threshold: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class Adaptive:
    """Choose the segment length of each stage from its measured activation and input bytes.

    A stage of ``L`` layers, each creating ``a`` bytes of activations from an input of ``s`` bytes,
    keeps about ``L*a`` bytes without checkpoints and about ``ceil(L/n)*s + n*a`` with segments of
    ``n``; Adaptive takes the ``n`` that minimises it. With ``budget_bytes``, stages are left
    unchecked (no recomputation) as long as the estimate stays within the budget, largest stages
    checkpointed first. Every checkpointed stage recomputes its forward pass once, whatever ``n``.
    """

    budget_bytes: int | None = flax.struct.field(pytree_node=False, default=None)


def _jaxpr_bytes(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        subs = [p for p in eqn.params.values() if hasattr(p, "eqns") or hasattr(p, "jaxpr")]
        if subs:
            total += sum(_jaxpr_bytes(getattr(s, "jaxpr", s)) for s in subs)
            continue
        for v in eqn.outvars:
            aval = v.aval
            if hasattr(aval, "shape") and hasattr(aval, "dtype"):
                total += math.prod(aval.shape) * np.dtype(aval.dtype).itemsize
    return total


def layer_activation_bytes(layer_fn: Callable[[Any, Any], Any], layer_params: Any, x: Any) -> int:
    """Bytes of every value one layer creates (one pass over its jaxpr): what it could save for grad.

    Args:
        layer_fn: ``layer_fn(params, x) -> x``.
        layer_params: one layer's parameters (arrays or ``jax.ShapeDtypeStruct`` s).
        x: the layer's input (arrays or ``jax.ShapeDtypeStruct`` s).

    Returns:
        The sum of the bytes of the outputs of every equation of ``layer_fn``'s jaxpr (entering nested
        jaxprs such as ``jit`` calls; a loop body counts once).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> w, x = jax.ShapeDtypeStruct((4, 8), jnp.float32), jax.ShapeDtypeStruct((2, 4), jnp.float32)
        >>> layer_activation_bytes(lambda w, x: jnp.tanh(x @ w), w, x)  # x @ w and tanh: 2 * 2*8*4
        128
    """
    return _jaxpr_bytes(jax.make_jaxpr(layer_fn)(layer_params, x).jaxpr)


def _stages(layer_fn, layers) -> tuple[list, list]:
    if isinstance(layers, (list, tuple)):
        fns = list(layer_fn) if isinstance(layer_fn, (list, tuple)) else [layer_fn] * len(layers)
        if len(fns) != len(layers):
            raise ConfigError(argument="layer_fn", expected=f"{len(layers)} functions, one per stage",
                              got=len(fns))
        return fns, list(layers)
    return [layer_fn], [layers]


def _depth(stacked: Any) -> int:
    leaves = jax.tree_util.tree_leaves(stacked)
    if not leaves or any(np.ndim(a) == 0 for a in leaves):
        raise ConfigError(argument="layers", expected="stacked parameters (a leading layer axis on every leaf)",
                          got="a leaf without one" if leaves else "no leaves")
    depths = {a.shape[0] for a in leaves}
    if len(depths) != 1:
        raise ConfigError(argument="layers", expected="one depth on every leaf", got=sorted(depths))
    return depths.pop()


def _one_layer(stacked: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), stacked)


def _spec(x: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), x)


def checkpoint_plan(layer_fn: Any, layers: Any, x: Any, strategy: Any) -> tuple[int, ...]:
    """The segment length a strategy gives each stage (0: no checkpoint), decided at trace time.

    Args:
        layer_fn: ``layer_fn(params, x) -> x``, or one such function per stage.
        layers: stacked parameters (every leaf with a leading layer axis), or a list of them (stages).
        x: the input (arrays or ``jax.ShapeDtypeStruct`` s).
        strategy: :class:`NoCheckpoint`, :class:`EveryN`, :class:`LargeLayersOnly` or :class:`Adaptive`.

    Returns:
        One segment length per stage.

    Raises:
        ConfigError: an unknown strategy, ``n < 1``, a negative threshold or budget, or layers that
            are not stacked.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> f = lambda w, x: jnp.tanh(x @ w)
        >>> small, big = jnp.zeros((3, 4, 4)), jnp.zeros((2, 4, 4))
        >>> x = jnp.zeros((2, 4))
        >>> checkpoint_plan(f, [small, big], x, EveryN(2)), checkpoint_plan(f, [small], x, NoCheckpoint())
        ((2, 2), (0,))
    """
    fns, stacks = _stages(layer_fn, layers)
    depths = [_depth(s) for s in stacks]
    if isinstance(strategy, NoCheckpoint):
        return (0,) * len(stacks)
    if isinstance(strategy, EveryN):
        if isinstance(strategy.n, bool) or not isinstance(strategy.n, (int, np.integer)) or strategy.n < 1:
            raise ConfigError(argument="n", expected="an integer >= 1", got=strategy.n)
        return (int(strategy.n),) * len(stacks)
    if not isinstance(strategy, (LargeLayersOnly, Adaptive)):
        raise ConfigError(argument="strategy", expected="NoCheckpoint, EveryN, LargeLayersOnly or Adaptive",
                          got=type(strategy).__name__)
    acts, ins, h = [], [], _spec(x)
    for fn, stack in zip(fns, stacks, strict=False):
        one = _one_layer(stack)
        acts.append(layer_activation_bytes(fn, one, h))
        ins.append(tree_nbytes(h))
        h = jax.eval_shape(fn, one, h)
    if isinstance(strategy, LargeLayersOnly):
        _check_bytes("threshold", strategy.threshold)
        return tuple(1 if a > strategy.threshold else 0 for a in acts)
    _check_bytes("budget_bytes", strategy.budget_bytes, allow_none=True)
    best = []
    for L, a, s in zip(depths, acts, ins, strict=False):
        estimates = {n: math.ceil(L / n) * s + n * a for n in range(1, L + 1)}
        best.append(min(estimates, key=lambda n: (estimates[n], n)))
    if strategy.budget_bytes is None:
        return tuple(best)
    plan_ = [0] * len(stacks)
    keep = [L * a for L, a in zip(depths, acts, strict=False)]
    cost = {i: keep[i] for i in range(len(stacks))}
    for i in sorted(range(len(stacks)), key=lambda i: (-keep[i], i)):
        if sum(cost.values()) <= strategy.budget_bytes:
            break
        plan_[i] = best[i]
        cost[i] = math.ceil(depths[i] / best[i]) * ins[i] + best[i] * acts[i]
    return tuple(plan_)


def _run_stage(fn: Callable, stacked: Any, x: Any, n: int) -> Any:
    def body(h, p):
        return fn(p, h), None

    if n == 0:
        return jax.lax.scan(body, x, stacked)[0]
    if n == 1:
        return jax.lax.scan(jax.checkpoint(body), x, stacked)[0]
    L = _depth(stacked)
    groups, rest = divmod(L, n)

    def segment(h, ps):
        return jax.lax.scan(body, h, ps)[0], None

    if groups:
        head = jax.tree_util.tree_map(lambda a: a[: groups * n].reshape((groups, n) + a.shape[1:]), stacked)
        x = jax.lax.scan(jax.checkpoint(segment), x, head)[0]
    if rest:
        tail = jax.tree_util.tree_map(lambda a: a[groups * n:], stacked)
        x = jax.checkpoint(segment)(x, tail)[0]
    return x


def apply_layers(layer_fn: Any, layers: Any, x: Any, *, strategy: Any = NoCheckpoint()) -> Any:  # noqa: B008 - frozen
    """Runs ``x`` through a stack of layers (``lax.scan``), checkpointed as a strategy says.

    Checkpointed segments are ``jax.checkpoint`` ed bodies of the scan: their activations are
    recomputed in the backward pass instead of being saved. (Inside a scan the recomputation cannot
    be merged back into the forward pass by the compiler, which happens on CPU to a checkpoint in
    straight-line code.)

    Args:
        layer_fn: ``layer_fn(params, x) -> x``, or one such function per stage.
        layers: stacked parameters (a leading layer axis on every leaf), or a list of them (stages).
        x: the input.
        strategy: a rematerialisation strategy (see :func:`checkpoint_plan`).

    Returns:
        The output of the last layer: the same values whatever the strategy.

    Raises:
        ConfigError: as :func:`checkpoint_plan`.

    Example:
        >>> import jax.numpy as jnp
        >>> ws = jnp.stack([jnp.eye(2) * 2, jnp.eye(2) * 3])
        >>> apply_layers(lambda w, x: x @ w, ws, jnp.ones((1, 2)), strategy=EveryN(1)).tolist()
        [[6.0, 6.0]]
    """
    fns, stacks = _stages(layer_fn, layers)
    for fn, stack, n in zip(fns, stacks, checkpoint_plan(layer_fn, layers, x, strategy), strict=False):
        x = _run_stage(fn, stack, x, n)
    return x


@flax.struct.dataclass
class CheckpointSavings:
    """Compiled memory of a gradient with and without a strategy.

    Attributes:
        baseline: ``compiled_memory`` of the gradient with :class:`NoCheckpoint`.
        checkpointed: the same with the strategy.
        saved_bytes: ``baseline.temp_bytes - checkpointed.temp_bytes`` (temporaries at the peak).
        saved_fraction: ``saved_bytes / baseline.temp_bytes``.
        extra_flops: FLOPs the recomputation adds, from XLA's cost analysis.
        plan: the segment length of each stage.
    """

    baseline: CompiledMemory
    checkpointed: CompiledMemory
    saved_bytes: int = flax.struct.field(pytree_node=False)
    saved_fraction: float = flax.struct.field(pytree_node=False)
    extra_flops: float = flax.struct.field(pytree_node=False)
    plan: tuple[int, ...] = flax.struct.field(pytree_node=False)


def _default_loss(y: Any) -> jax.Array:
    return sum(jnp.sum(jnp.square(a.astype(jnp.float32))) for a in jax.tree_util.tree_leaves(y))


def checkpoint_savings(layer_fn: Any, layers: Any, x: Any, strategy: Any, *,
                       loss: Callable[[Any], jax.Array] | None = None) -> CheckpointSavings:
    """Measures what a strategy saves: XLA's compiled memory of the gradient, with and without it.

    The gradient of ``loss(apply_layers(layer_fn, layers, x, strategy=...))`` with respect to the
    layers and ``x`` is compiled twice (nothing runs: ``jax.ShapeDtypeStruct`` inputs are enough).

    Args:
        layer_fn: ``layer_fn(params, x) -> x``, or one per stage.
        layers: stacked parameters, or a list of them (stages).
        x: the input.
        strategy: the rematerialisation strategy to measure.
        loss: a scalar function of the output (default: the sum of squares, in float32).

    Returns:
        A :class:`CheckpointSavings`.

    Raises:
        ConfigError: as :func:`checkpoint_plan`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> ws = jax.ShapeDtypeStruct((8, 64, 256), jnp.float32)
        >>> x = jax.ShapeDtypeStruct((512, 64), jnp.float32)
        >>> f = lambda w, x: x + jnp.tanh(x @ w) @ w.T
        >>> s = checkpoint_savings(f, ws, x, EveryN(1))
        >>> s.saved_bytes > 0, s.checkpointed.temp_bytes < s.baseline.temp_bytes
        (True, True)
    """
    loss = loss or _default_loss

    def compile_grad(strat):
        grad = jax.grad(lambda ls, h: loss(apply_layers(layer_fn, ls, h, strategy=strat)), argnums=(0, 1))
        return _xla.compile(grad, layers, x)

    base_c, ck_c = compile_grad(NoCheckpoint()), compile_grad(strategy)
    base, ck = _xla.memory_of(base_c), _xla.memory_of(ck_c)
    saved = base.temp_bytes - ck.temp_bytes
    return CheckpointSavings(
        baseline=base, checkpointed=ck, saved_bytes=saved,
        saved_fraction=saved / base.temp_bytes if base.temp_bytes else 0.0,
        extra_flops=_xla.flops(ck_c) - _xla.flops(base_c),
        plan=checkpoint_plan(layer_fn, layers, x, strategy),
    )

