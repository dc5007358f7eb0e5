"""LoRA and QLoRA: trainable low-rank adapters on frozen ``nnx.Linear`` and :class:`QLinear` layers.

:func:`lora` returns a copy of a model whose selected linear layers are :class:`LoRALinear` ones:
``y = base(x) + (alpha / rank) * (x @ A) @ B`` with ``A`` random (Kaiming-uniform, as peft) and ``B``
zero, so the adapted model equals the base bit for bit until ``B`` is trained. ``A`` and ``B`` are
:class:`LoRAParam` variables (an ``nnx.Param`` subclass): train only them with
``nnx.Optimizer(model, tx, wrt=nn.LoRAParam)`` and ``nnx.grad(..., argnums=nnx.DiffState(0, nn.LoRAParam))``.
The base layer is left as it was: an ``nnx.Linear`` in float, a :class:`QLinear` still quantized (QLoRA
when its record is NF4). :func:`merge_lora` folds the adapters back into the kernels (into a new
quantized record with ``fmt=``); :func:`lora_state` and :func:`load_lora_state` move the adapters
alone in and out of a model, as a tree that :func:`viva_tensor.quant.save` writes.

Initialisation (``lora(..., init=)``): ``"zero"`` (``B = 0``, the default, exact at step 0); ``"svd"``, LoftQ's
data-free start (Li et al. 2023): ``A B`` is the best rank-``r`` approximation of the quantization error
``E = W - dequantize(Q)`` (the float weight ``W`` from ``reference=``); ``"calibrated"`` (as CLoQ, Deng et al.
2025): the rank-``r`` ``A B`` minimising ``||X (E - A B)||_F`` for the layer's calibration inputs ``X``, given as
their Gram matrix ``H = XᵀX`` (:func:`viva_tensor.nn._sequential.capture_grams`):
``A B = H^{-1/2} SVD_r(H^{1/2} E)`` with ``H`` damped, computed with its Cholesky factor ``H = L Lᵀ`` in place of
``H^{1/2}`` (the same product, the same ``A`` and ``B``, without an eigendecomposition). Both split the product
evenly, ``A = L^{-T} U_r Σ_r^{1/2}``, ``B = Σ_r^{1/2} V_rᵀ`` (over ``sqrt(alpha / rank)``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from viva_tensor._paths import path_str
from viva_tensor.errors import ConfigError, InvalidOp
from viva_tensor.nn._graph import set_child
from viva_tensor.nn._qlinear import QLinear

__all__ = [
    "LoRAParam", "LoRALinear", "lora", "lora_init", "merge_lora", "lora_state", "load_lora_state", "lora_filter",
    "INITS", "TRAINABLE",
]  # fmt: skip

INITS = ("zero", "svd", "calibrated")
"""The adapters' initialisations of :func:`lora`."""

TRAINABLE = ("lora", "bias", "norm")
"""What :func:`lora_filter` can select to train: the adapters, the linear layers' biases (BitFit), the
normalisation layers' scales and biases (LayerNorm tuning)."""

_NORMS = (nnx.LayerNorm, nnx.RMSNorm)

_HIGHEST = jax.lax.Precision.HIGHEST


class LoRAParam(nnx.Param):
    """An adapter parameter of :class:`LoRALinear`: the one kind an optimizer of a LoRA model updates.

    Example:
        >>> from flax import nnx
        >>> issubclass(LoRAParam, nnx.Param)
        True
    """


class LoRALinear(nnx.Module):
    """A frozen linear layer plus a trainable low-rank update: ``base(x) + (alpha / rank) * x @ A @ B``.

    ``A`` is ``(in_features, rank)``, drawn Kaiming-uniform (bound ``1 / sqrt(in_features)``, peft's
    default); ``B`` is ``(rank, out_features)`` zeros, so the layer returns exactly ``base(x)`` until ``B``
    changes. The adapter product runs in ``x``'s dtype with float32 accumulation and is added to the base
    output in its dtype.

    Args:
        base: an ``nnx.Linear`` or a :class:`QLinear` (held as it is: frozen, and quantized for a QLinear).
        rank: the adapters' rank (>= 1).
        alpha: the scale numerator: the update is multiplied by ``alpha / rank``.
        param_dtype: the adapters' dtype (float32).
        rngs: ``nnx.Rngs`` with a ``params`` stream (for ``A``).

    Raises:
        ConfigError: a rank below 1 or above ``min(in_features, out_features)``.
        InvalidOp: a base that is neither an ``nnx.Linear`` nor a :class:`QLinear`.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> base = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
        >>> layer = LoRALinear(base, rank=4, alpha=8, rngs=nnx.Rngs(1))
        >>> x = jnp.ones((2, 16))
        >>> bool((layer(x) == base(x)).all()), layer.lora_a.get_value().shape, layer.lora_b.get_value().shape
        (True, (16, 4), (4, 8))
    """

    def __init__(self, base: Any, *, rank: int = 8, alpha: float = 16, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if not isinstance(base, (nnx.Linear, QLinear)):
            raise InvalidOp(argument="base", expected="an nnx.Linear or an nn.QLinear", got=type(base).__name__)
        n_in, n_out = base.in_features, base.out_features
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= min(n_in, n_out):
            raise ConfigError(argument="rank", expected=f"an int in [1, {min(n_in, n_out)}]", got=rank)
        self.base = base
        self.in_features, self.out_features, self.rank = n_in, n_out, rank
        self.scale = float(alpha) / rank
        bound = 1.0 / math.sqrt(n_in)
        a = jax.random.uniform(rngs.params(), (n_in, rank), param_dtype, -bound, bound)
        self.lora_a = LoRAParam(a)
        self.lora_b = LoRAParam(jnp.zeros((rank, n_out), param_dtype))

    def delta(self, x: jax.Array) -> jax.Array:
        """The adapters' update ``(alpha / rank) * x @ A @ B`` in float32, ``(..., out_features)``."""
        a = self.lora_a.get_value().astype(x.dtype)
        h = jax.lax.dot_general(x, a, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        b = self.lora_b.get_value().astype(jnp.float32)
        d = jax.lax.dot_general(h, b, (((h.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return d * jnp.asarray(self.scale, jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``base(x) + delta(x)`` in the base output's dtype."""
        y = self.base(x)
        x = x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(y.dtype)
        return y + self.delta(x).astype(y.dtype)

    def merged_weight(self) -> jax.Array:
        """The base kernel plus the update, float32, in ``nnx.Linear``'s ``(in_features, out_features)`` layout."""
        kernel = _base_kernel(self.base)
        a = self.lora_a.get_value().astype(jnp.float32)
        b = self.lora_b.get_value().astype(jnp.float32)
        return kernel + (a @ b) * jnp.asarray(self.scale, jnp.float32)


def _base_kernel(base: Any) -> jax.Array:
    """A base layer's kernel in float32, ``(in_features, out_features)`` (a :class:`QLinear`'s decoded)."""
    if isinstance(base, QLinear):
        return base.dense_weight().T
    return jnp.asarray(base.kernel.get_value()).astype(jnp.float32)


@jax.jit
def _gram_factor(gram: jax.Array, damp: jax.Array) -> jax.Array:
    """``L`` lower triangular with ``L Lᵀ = H = gram + damp * mean(diag(gram)) * I`` (Cholesky).

    Any ``L`` with ``L Lᵀ = H`` gives the same adapters as the symmetric root ``H^{1/2}`` (``H^{1/2} = Q Lᵀ`` with
    ``Q`` orthogonal, so ``SVD(H^{1/2} E)`` has ``Q`` times the left vectors of ``SVD(Lᵀ E)``), at a fraction of an
    eigendecomposition's cost."""
    g = gram.astype(jnp.float32)
    g = 0.5 * (g + g.T)
    n = g.shape[0]
    level = jnp.maximum(jnp.mean(jnp.diagonal(g)), jnp.float32(1e-30))
    return jnp.linalg.cholesky(g + damp * level * jnp.eye(n, dtype=jnp.float32))


@functools.partial(jax.jit, static_argnames=("rank",))
def _low_rank(error, factor, scale, *, rank):
    """``(A, B)`` with ``scale * A @ B = L^{-T} SVD_rank(Lᵀ @ error)``, the singular values split evenly."""
    m = jnp.matmul(factor.T, error, precision=_HIGHEST)
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    half = jnp.sqrt(s[:rank] / scale)
    a = jax.scipy.linalg.solve_triangular(factor, u[:, :rank] * half[None, :], trans="T", lower=True)
    return a, half[:, None] * vt[:rank]


def lora_init(
    error: jax.Array, rank: int, *, scale: float = 1.0, gram: jax.Array | None = None, damp: float = 0.01
) -> tuple[jax.Array, jax.Array]:
    """The adapters ``(A, B)`` whose update ``scale * A @ B`` best corrects a quantization error at rank ``rank``.

    Without ``gram``: ``scale * A @ B = SVD_rank(E)``, the best rank-``rank`` approximation of ``E`` in the
    Frobenius norm (LoftQ's data-free start). With ``gram = XᵀX`` of the layer's inputs: the rank-``rank``
    product minimising ``||X (E - scale * A @ B)||_F``, that is ``H^{-1/2} SVD_rank(H^{1/2} E)`` with
    ``H = gram + damp * mean(diag(gram)) * I``. The singular values are split evenly between ``A`` and ``B``.

    Args:
        error: ``W - dequantize(Q)`` in ``nnx.Linear``'s ``(in_features, out_features)`` layout.
        rank: the adapters' rank.
        scale: LoRA's ``alpha / rank`` (the update is ``scale * A @ B``).
        gram: ``(in_features, in_features)`` Gram matrix of the inputs, or ``None``.
        damp: the damping of ``gram``, relative to the mean of its diagonal.

    Returns:
        ``(A, B)`` float32, ``(in_features, rank)`` and ``(rank, out_features)``.

    Raises:
        ConfigError: a bad rank, or a Gram matrix of another size.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> e = jax.random.normal(jax.random.key(0), (16, 8))
        >>> a, b = lora_init(e, 8)  # full rank: the error itself
        >>> bool(jnp.allclose(a @ b, e, atol=1e-4)), a.shape, b.shape
        (True, (16, 8), (8, 8))
    """
    error = jnp.asarray(error, jnp.float32)
    if error.ndim != 2:
        raise ConfigError(argument="error", expected="a 2-D (in_features, out_features) array", got=error.shape)
    n_in, n_out = error.shape
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= min(n_in, n_out):
        raise ConfigError(argument="rank", expected=f"an int in [1, {min(n_in, n_out)}]", got=rank)
    factor = jnp.eye(n_in, dtype=jnp.float32) if gram is None else _checked_factor(gram, n_in, damp)
    return _low_rank(error, factor, jnp.float32(scale), rank=rank)


def _checked_factor(gram: Any, n_in: int, damp: float) -> jax.Array:
    if tuple(jnp.shape(gram)) != (n_in, n_in):
        raise ConfigError(argument="gram", expected=f"shape {(n_in, n_in)}", got=tuple(jnp.shape(gram)))
    return _gram_factor(jnp.asarray(gram), jnp.float32(damp))


def _gram_of(calibration: Any, name: str) -> jax.Array | None:
    """The Gram matrix of layer ``name`` in ``capture_grams``'s ``(grams, groups)`` or a ``{name: gram}`` mapping."""
    grams, groups = calibration if isinstance(calibration, tuple) else (calibration, {})
    value = grams.get(name, grams.get(groups.get(name, name)))
    return value[0] if isinstance(value, tuple) else value


def _layers(model: nnx.Module, kinds: tuple[type, ...]) -> list[tuple[tuple, Any]]:
    """``(path, layer)`` of the layers of those kinds, in graph order, not looking inside a :class:`LoRALinear`."""
    nodes = [(tuple(path), node) for path, node in nnx.iter_graph(model)]
    wrappers = [path for path, node in nodes if isinstance(node, LoRALinear)]
    inside = {path for path, _ in nodes for w in wrappers if len(path) > len(w) and path[: len(w)] == w}
    return [(path, node) for path, node in nodes if isinstance(node, kinds) and path not in inside]


def lora(
    model: nnx.Module,
    *,
    rank: int = 8,
    alpha: float = 16,
    where: Callable[[str, Any], bool] | None = None,
    param_dtype: Any = jnp.float32,
    init: str = "zero",
    reference: nnx.Module | None = None,
    calibration: Any = None,
    damp: float = 0.01,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """A copy of ``model`` whose ``nnx.Linear`` / :class:`QLinear` layers carry trainable LoRA adapters.

    Each selected layer becomes a :class:`LoRALinear` holding the original layer as ``.base``; the copy
    shares the base's arrays with ``model`` (nothing is duplicated) and, with ``init="zero"``, computes
    exactly what ``model`` does until the adapters are trained. ``init="svd"`` or ``"calibrated"`` start the
    adapters at the best rank-``rank`` correction of each layer's quantization error instead
    (:func:`lora_init`): the error is the ``reference`` model's float kernel at the same path minus the base's
    (decoded) kernel, weighted for ``"calibrated"`` by the layer's input Gram matrix from ``calibration``.
    Train the adapters only, e.g.
    ``nnx.Optimizer(adapted, optax.adam(1e-3), wrt=nn.LoRAParam)`` with gradients from
    ``nnx.grad(loss, argnums=nnx.DiffState(0, nn.LoRAParam))``: the base stays frozen, and a
    :class:`QLinear` base stays quantized (QLoRA).

    Args:
        model: an NNX module (not changed).
        rank: the adapters' rank.
        alpha: the update is scaled by ``alpha / rank``.
        where: ``where(path, layer) -> bool`` picks the layers (dotted paths, e.g. ``"layers.0.query"``);
            ``None``: every ``nnx.Linear`` and :class:`QLinear`.
        param_dtype: the adapters' dtype.
        init: ``"zero"`` (``B = 0``: the base exactly), ``"svd"`` (LoftQ: ``A B`` the best rank-``rank``
            approximation of ``W - dequantize(Q)``) or ``"calibrated"`` (the rank-``rank`` ``A B`` minimising
            ``||X (W - dequantize(Q) - A B)||_F`` on the calibration inputs ``X``).
        reference: for ``"svd"`` / ``"calibrated"``: the float model ``model`` was quantized from, an
            ``nnx.Linear`` at the path of every selected layer.
        calibration: for ``"calibrated"``: the ``(grams, groups)`` that
            :func:`viva_tensor.nn._sequential.capture_grams` returns for ``reference`` (or a ``{path: XᵀX}``
            mapping); a layer without one gets ``"svd"``.
        damp: the Gram matrices' damping, relative to the mean of their diagonal (> 0).
        rngs: ``nnx.Rngs`` for the ``A`` matrices.

    Returns:
        The adapted copy.

    Raises:
        ConfigError: a bad rank for some layer, nothing selected, an unknown ``init``, or ``"svd"`` /
            ``"calibrated"`` without ``reference`` (or ``calibration``), or a reference layer that does not fit.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from viva_tensor import nn
        >>> model = nnx.Sequential(nnx.Linear(16, 16, rngs=nnx.Rngs(0)), nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
        >>> adapted = nn.lora(model, rank=2, rngs=nnx.Rngs(2))
        >>> x = jnp.ones((3, 16))
        >>> bool((adapted(x) == model(x)).all()), type(adapted.layers[0]).__name__
        (True, 'LoRALinear')
        >>> sum(v.size for v in jax.tree_util.tree_leaves(nnx.state(adapted, nn.LoRAParam)))  # 2*(16*2) + 16*2 + 2*4
        104
        >>> q, _ = nn.quantize_model(model, "nf4")
        >>> from viva_tensor.nn._sequential import capture_grams
        >>> xs = jax.random.normal(jax.random.key(0), (64, 16))
        >>> grams = capture_grams(model, [(xs,)])
        >>> fixed = nn.lora(q, rank=2, init="calibrated", reference=model, calibration=grams, rngs=nnx.Rngs(2))
        >>> bool(jnp.linalg.norm(fixed(xs) - model(xs)) < jnp.linalg.norm(q(xs) - model(xs)))
        True
    """
    _check_init(init, reference, calibration, damp)
    copy = nnx.clone(model)
    done = 0
    factors: dict[int, tuple[Any, jax.Array]] = {}
    for path, layer in _layers(copy, (nnx.Linear, QLinear, LoRALinear)):
        if isinstance(layer, LoRALinear) or (where is not None and not where(path_str(path), layer)):
            continue
        adapted = LoRALinear(layer, rank=rank, alpha=alpha, param_dtype=param_dtype, rngs=rngs)
        if init != "zero":
            gram = None if init == "svd" else _gram_of(calibration, path_str(path))
            error = _error(reference, path, layer)
            if gram is None:
                a, b = lora_init(error, rank, scale=adapted.scale, damp=damp)
            else:  # query, key and value share one input, one Gram matrix: factored once
                if id(gram) not in factors:
                    factors[id(gram)] = (gram, _checked_factor(gram, layer.in_features, damp))
                a, b = _low_rank(error, factors[id(gram)][1], jnp.float32(adapted.scale), rank=rank)
            adapted.lora_a.set_value(a.astype(param_dtype))
            adapted.lora_b.set_value(b.astype(param_dtype))
        if not path:  # the model is itself one linear layer
            return adapted
        set_child(copy, path, adapted)
        done += 1
    if not done:
        raise ConfigError(
            argument="where" if where is not None else "model",
            expected="at least one nnx.Linear or nn.QLinear layer to adapt",
            got="none selected",
        )
    return copy


def _check_init(init: str, reference: Any, calibration: Any, damp: float) -> None:
    if init not in INITS:
        raise ConfigError(argument="init", expected=f"one of {INITS}", got=init)
    if init != "zero" and reference is None:
        raise ConfigError(argument="reference", expected=f"the float model for init={init!r}", got=None)
    if init == "calibrated" and calibration is None:
        raise ConfigError(argument="calibration", expected="Gram matrices (nn.capture_grams) for init='calibrated'",
                          got=None)  # fmt: skip
    if not damp > 0:
        raise ConfigError(argument="damp", expected="a float > 0", got=damp)


def _error(reference: nnx.Module, path: tuple, layer: Any) -> jax.Array:
    """``W - dequantize(Q)`` of one layer, ``(in, out)`` float32, ``W`` the reference's kernel at ``path``."""
    node = reference
    try:
        for key in path:
            node = node[key] if isinstance(key, int) else getattr(node, key)
    except (AttributeError, IndexError, KeyError, TypeError):
        node = None
    want = (layer.in_features, layer.out_features)
    if not isinstance(node, nnx.Linear) or tuple(node.kernel.get_value().shape) != want:
        raise ConfigError(argument="reference", expected=f"an nnx.Linear {want} at {path_str(path)!r}",
                          got=type(node).__name__ if not isinstance(node, nnx.Linear)
                          else tuple(node.kernel.get_value().shape))  # fmt: skip
    return jnp.asarray(node.kernel.get_value()).astype(jnp.float32) - _base_kernel(layer)


def _float_linear(base: Any, kernel: jax.Array) -> nnx.Linear:
    n_in, n_out = kernel.shape
    bias = None if base.bias is None else base.bias.get_value()
    if isinstance(base, nnx.Linear):
        layer = nnx.clone(base)
        layer.kernel.set_value(kernel.astype(base.kernel.get_value().dtype))
        return layer
    layer = nnx.eval_shape(
        lambda: nnx.Linear(n_in, n_out, use_bias=bias is not None, dtype=base.dtype, rngs=nnx.Rngs(0))
    )
    layer.kernel.set_value(kernel)
    if bias is not None:
        layer.bias.set_value(jnp.asarray(bias))
    return layer


def merge_lora(model: nnx.Module, *, fmt: str | None = None, **options: Any) -> nnx.Module:
    """A copy of ``model`` with every :class:`LoRALinear` folded into one plain layer.

    The merged kernel is ``W + (alpha / rank) * A @ B`` computed in float32 (a :class:`QLinear` base is
    decoded first). With ``fmt=None`` the result is an ``nnx.Linear`` holding that float kernel (equal to
    the adapted model up to float32 rounding); with a format name it is a :class:`QLinear` holding a new
    record of the merged weight in that format (equal to the adapted model within the format's error).

    Args:
        model: an NNX module with :class:`LoRALinear` layers (not changed).
        fmt: ``None``, or a format name of :func:`viva_tensor.quant.format_names`.
        **options: the format's options (see :meth:`QLinear.from_linear`).

    Returns:
        The merged copy (no :class:`LoRAParam` left).

    Raises:
        FormatError: an unknown format or option.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from viva_tensor import nn
        >>> adapted = nn.lora(nnx.Linear(64, 32, rngs=nnx.Rngs(0)), rank=4, rngs=nnx.Rngs(1))
        >>> adapted.lora_b.set_value(jnp.full((4, 32), 0.1))
        >>> x = jnp.ones((2, 64))
        >>> merged = nn.merge_lora(adapted)
        >>> type(merged).__name__, bool(jnp.allclose(merged(x), adapted(x), atol=1e-4))
        ('Linear', True)
        >>> type(nn.merge_lora(adapted, fmt="q8_0")).__name__
        'QLinear'
    """
    copy = nnx.clone(model)
    if isinstance(copy, LoRALinear):
        return _merged(copy, fmt, options)
    for path, layer in _layers(copy, (LoRALinear,)):
        set_child(copy, path, _merged(layer, fmt, options))
    return copy


def _merged(layer: LoRALinear, fmt: str | None, options: dict[str, Any]) -> Any:
    kernel = layer.merged_weight()
    linear = _float_linear(layer.base, kernel)
    return linear if fmt is None else QLinear.from_linear(linear, fmt, **options)


def _check_train(train: Any) -> tuple[str, ...]:
    parts = (train,) if isinstance(train, str) else tuple(train)
    if not parts or any(p not in TRAINABLE for p in parts):
        raise ConfigError(argument="train", expected=f"a non-empty tuple of {TRAINABLE}", got=train)
    return parts


def lora_filter(model: nnx.Module, train: Any = ("lora",)) -> Callable[[tuple, Any], bool]:
    """The ``nnx`` filter of a LoRA model's trained parameters: adapters, and optionally biases and norms.

    ``"lora"`` selects the :class:`LoRAParam` adapters; ``"bias"`` the bias of every ``nnx.Linear`` and
    :class:`QLinear` (a :class:`LoRALinear`'s base included: BitFit); ``"norm"`` the scale and bias of every
    ``nnx.LayerNorm`` / ``nnx.RMSNorm``. A quantized kernel is never selected. Use it wherever a filter goes:
    ``nnx.split(model, lora_filter(model, train), ...)``, ``nnx.Optimizer(..., wrt=...)``. What is trained is
    what must be saved with the adapters (:func:`lora_state` with the same ``train``).

    Args:
        model: the adapted model (the filter knows its layers' paths).
        train: a tuple of :data:`TRAINABLE`.

    Returns:
        ``keep(path, variable) -> bool``.

    Raises:
        ConfigError: an empty ``train`` or an unknown part.

    Example:
        >>> from flax import nnx
        >>> from viva_tensor import nn
        >>> model = nnx.Sequential(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), nnx.LayerNorm(8, rngs=nnx.Rngs(0)))
        >>> adapted = nn.lora(model, rank=2, rngs=nnx.Rngs(1))
        >>> state = nnx.state(adapted, nn.lora_filter(adapted, ("lora", "bias", "norm")))
        >>> sum(v.size for v in jax.tree_util.tree_leaves(state))  # 16*2 + 2*8 adapters, 8 bias, 8 + 8 norm
        72
    """
    parts = _check_train(train)
    owners: list[tuple[tuple, str | None]] = []  # (a layer's path, the one attribute to train or None: all)
    for path, node in nnx.iter_graph(model):
        if "bias" in parts and isinstance(node, (nnx.Linear, QLinear)):
            owners.append((tuple(path), "bias"))
        elif "norm" in parts and isinstance(node, _NORMS):
            owners.append((tuple(path), None))
    keys = set(owners)

    def keep(path: tuple, value: Any) -> bool:
        if isinstance(value, LoRAParam):
            return "lora" in parts
        if not isinstance(value, nnx.Param) or not path:
            return False
        path = tuple(path)
        return (path[:-1], path[-1]) in keys or (path[:-1], None) in keys

    return keep


def lora_state(model: nnx.Module, train: Any = ("lora",)) -> dict:
    """The adapters of a model alone, as a nested dict of arrays that :func:`viva_tensor.quant.save` writes.

    Args:
        model: an NNX module with :class:`LoRALinear` layers.
        train: what was trained (:func:`lora_filter`): with ``"bias"`` / ``"norm"`` the trained biases and
            norm parameters are in the state too (they are part of what a user must save).

    Returns:
        ``{path...: {"lora_a": array, "lora_b": array}}`` (the pure dict of ``nnx.state(model, LoRAParam)``;
        of ``nnx.state(model, lora_filter(model, train))`` in general).

    Example:
        >>> from flax import nnx
        >>> from viva_tensor import nn
        >>> adapted = nn.lora(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), rank=2, rngs=nnx.Rngs(1))
        >>> sorted(nn.lora_state(adapted))
        ['lora_a', 'lora_b']
    """
    return nnx.to_pure_dict(nnx.state(model, lora_filter(model, train)))


def load_lora_state(model: nnx.Module, state: Any, train: Any = ("lora",)) -> None:
    """Puts adapters (from :func:`lora_state`, e.g. read back by :func:`viva_tensor.quant.load`) into ``model``.

    The model is updated in place; its base layers are untouched.

    Args:
        model: an NNX module with the same :class:`LoRALinear` layers (same paths and ranks).
        state: the nested dict of adapter arrays.
        train: what the state holds (the ``train`` of :func:`lora_state`).

    Raises:
        ConfigError: a state whose paths or shapes differ from the model's adapters.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from viva_tensor import nn
        >>> adapted = nn.lora(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), rank=2, rngs=nnx.Rngs(1))
        >>> nn.load_lora_state(adapted, {"lora_a": jnp.ones((16, 2)), "lora_b": jnp.ones((2, 8))})
        >>> float(adapted.lora_b.get_value().sum())
        16.0
    """
    current = nnx.state(model, lora_filter(model, train))
    ours = nnx.to_pure_dict(current)
    mine = jax.tree_util.tree_flatten_with_path(ours)
    theirs = jax.tree_util.tree_flatten_with_path(state)
    want = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in mine[0]}
    got = {jax.tree_util.keystr(p): tuple(jnp.shape(v)) for p, v in theirs[0]}
    if want != got:
        missing = sorted(set(want) - set(got))[:3]
        extra = sorted(set(got) - set(want))[:3]
        shape = sorted(k for k in set(want) & set(got) if want[k] != got[k])[:3]
        raise ConfigError(
            argument="state",
            expected=f"the model's {len(want)} adapter arrays",
            got=f"missing {missing}, unexpected {extra}, other shapes at {shape}",
        )
    dtypes = {jax.tree_util.keystr(p): v.dtype for p, v in mine[0]}
    cast = jax.tree_util.tree_map_with_path(lambda p, v: jnp.asarray(v).astype(dtypes[jax.tree_util.keystr(p)]), state)
    nnx.replace_by_pure_dict(current, cast)
    nnx.update(model, current)
