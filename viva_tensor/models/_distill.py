"""Winning back a quantized MiniLM's fidelity: LoRA adapters distilled from the float32 model on unlabeled text.

:func:`distill` quantizes every ``nnx.Linear`` kernel of a :class:`~viva_tensor.models.minilm.SentenceEncoder`
(NF4 by default), puts LoRA adapters on them (:func:`viva_tensor.nn.lora`), and trains only the adapters
(adam) so that the student's sentence embeddings match the float32 teacher's on plain text: the standard
library's docstrings (:mod:`viva_tensor.models._calibration`), which never contain the evaluation
sentences. Each step is one jitted function of fixed shapes (one compilation for the whole run); the
teacher runs inside it. A slice of the text is held out and its mean cosine shown on the progress bar.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from viva_tensor import nn
from viva_tensor.errors import ConfigError

__all__ = ["DistillReport", "distill"]


@dataclasses.dataclass(frozen=True)
class DistillReport:
    """What :func:`distill` did and measured.

    Attributes:
        fmt: the kernels' format.
        rank: the adapters' rank.
        steps: optimizer steps taken.
        losses: the training loss (mean ``1 - cosine`` to the teacher) at every step.
        held_out_cosine_before: mean cosine to the teacher on the held-out text, quantized, before training.
        held_out_cosine_after: the same after training.
        quantized_bytes: every parameter of the quantized model without adapters (records count their buffers).
        adapter_bytes: the adapters' bytes.
        seconds: wall time of the training loop (compilation included).
        sentences: training sentences, held-out sentences.
        cpu_seconds: CPU time of this process over the loop (all its threads): on a shared machine, a
            measure of the work that the wall time is not.

    Example:
        >>> r = DistillReport("nf4", 8, 2, (0.03, 0.02), 0.97, 0.99, 1000, 30, 1.5, (64, 8), 2.5)
        >>> round(r.adapter_fraction, 3)
        0.03
        >>> for part in str(r).split("; "):
        ...     print(part)
        nf4 + LoRA rank 8: held-out cosine 0.9700 -> 0.9900 after 2 steps (1.5 s, 2.5 CPU s)
        adapters 30 bytes (3.00% of 1,000)
    """

    fmt: str
    rank: int
    steps: int
    losses: tuple[float, ...]
    held_out_cosine_before: float
    held_out_cosine_after: float
    quantized_bytes: int
    adapter_bytes: int
    seconds: float
    sentences: tuple[int, int]
    cpu_seconds: float = math.nan

    @property
    def adapter_fraction(self) -> float:
        """``adapter_bytes / quantized_bytes``."""
        return self.adapter_bytes / max(1, self.quantized_bytes)

    def __str__(self) -> str:
        return (
            f"{self.fmt} + LoRA rank {self.rank}: held-out cosine {self.held_out_cosine_before:.4f} -> "
            f"{self.held_out_cosine_after:.4f} after {self.steps} steps ({self.seconds:.1f} s, "
            f"{self.cpu_seconds:.1f} CPU s); adapters "
            f"{self.adapter_bytes:,} bytes ({100 * self.adapter_fraction:.2f}% of {self.quantized_bytes:,})"
        )


def _tokens(tokenizer: Any, sentences: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)`` int32 ``(n, length)`` of the sentences that fit in ``length`` tokens (others dropped)."""
    kept = [e for e in tokenizer.encode_batch(list(sentences)) if len(e.ids) <= length]
    ids = np.zeros((len(kept), length), np.int32)
    mask = np.zeros((len(kept), length), np.int32)
    for i, e in enumerate(kept):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
    return ids, mask


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.sum(a * b, axis=-1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)


def _check(rank: int, steps: int, batch_size: int, max_length: int) -> None:
    for name, value, low in (("rank", rank, 1), ("steps", steps, 0), ("batch_size", batch_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(argument=name, expected=f"an int >= {low}", got=value)
    if not isinstance(max_length, int) or not 8 <= max_length <= 512:
        raise ConfigError(argument="max_length", expected="an int in [8, 512]", got=max_length)


def _pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """MiniLM's sentence embedding of its last token states: the masked mean (then compared by cosine)."""
    weights = mask.astype(jnp.float32)[..., None]
    return (hidden.astype(jnp.float32) * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1e-9)


def _embed(graphdef: Any, params: Any, frozen: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params, frozen)(ids, mask)


def _loss(params, frozen, ids, mask, target, graphdef, token_weight):
    """Mean ``1 - cosine`` of the sentence embeddings, plus ``token_weight`` times that of every real token's state."""
    hidden = nnx.merge(graphdef, params, frozen).hidden_states(ids, mask)
    sentence = jnp.mean(1.0 - _cosine(_pool(hidden, mask), _pool(target, mask)))
    m = mask.astype(jnp.float32)
    tokens = jnp.sum((1.0 - _cosine(hidden, target)) * m) / jnp.maximum(jnp.sum(m), 1.0)
    return sentence + jnp.asarray(token_weight, jnp.float32) * tokens


@functools.partial(jax.jit, static_argnames=("graphdef", "tgraph", "tx", "token_weight"), donate_argnums=(0, 1))
def _train_step(params, opt_state, frozen, tstate, ids, mask, *, graphdef, tgraph, tx, token_weight):
    """One adam step on the adapters ``params``; the teacher (``tgraph``, ``tstate``) gives the targets."""
    import optax

    target = jax.lax.stop_gradient(nnx.merge(tgraph, tstate).hidden_states(ids, mask))
    loss, grads = jax.value_and_grad(_loss)(params, frozen, ids, mask, target, graphdef, token_weight)
    with jax.numpy_dtype_promotion("standard"):  # optax's adam computes decay ** count (float ** int32)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params, opt_state, loss


@functools.partial(jax.jit, static_argnames=("graphdef", "tgraph"))
def _held_out_cosine(params, frozen, tstate, ids, mask, *, graphdef, tgraph):
    return jnp.mean(_cosine(_embed(graphdef, params, frozen, ids, mask), nnx.merge(tgraph, tstate)(ids, mask)))


def _progress(enabled: bool) -> Any:
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("distill"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.5f}"),
        TextColumn("held-out cos {task.fields[cosine]:.4f}"), TimeElapsedColumn(), transient=True,
    )  # fmt: skip


def distill(
    encoder: Any,
    *,
    fmt: str = "nf4",
    rank: int = 8,
    alpha: float = 16,
    steps: int = 300,
    text: Sequence[str] | None = None,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    max_length: int = 64,
    held_out: int = 64,
    eval_every: int = 25,
    token_weight: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    options: dict[str, Any] | None = None,
) -> tuple[Any, DistillReport]:
    """Quantize an encoder's kernels and train LoRA adapters so its embeddings match the float32 model's.

    Every ``nnx.Linear`` kernel of ``encoder.model`` goes to ``fmt`` (:func:`viva_tensor.nn.quantize_model`);
    each gets rank-``rank`` adapters (:func:`viva_tensor.nn.lora`); adam with a cosine-decayed learning rate
    minimises the mean ``1 - cosine`` between the student's and the float32 teacher's sentence embeddings,
    plus ``token_weight`` times the same for every token's last-layer state (a denser signal), on batches of
    ``text``. Sentences longer than ``max_length`` tokens are left out; batches are all padded to
    ``max_length`` so the step compiles once. The last ``held_out`` sentences are not trained on: their
    mean cosine is on the progress bar and in the report.

    Args:
        encoder: a :class:`~viva_tensor.models.minilm.SentenceEncoder` with a float model (the teacher).
        fmt: the kernels' format (a name of :func:`viva_tensor.quant.format_names`).
        rank: the adapters' rank.
        alpha: LoRA's scale numerator (the update is ``alpha / rank * x A B``).
        steps: optimizer steps (0: quantize and add adapters only).
        text: unlabeled training sentences; ``None``: the standard library's docstrings
            (:func:`viva_tensor.models._calibration.calibration_text`). Never the sentences you evaluate on.
        batch_size: sentences per step.
        learning_rate: adam's peak learning rate (cosine decay to 0 over ``steps``).
        max_length: tokens per padded sentence.
        held_out: sentences of ``text`` kept for the held-out cosine.
        eval_every: steps between two held-out measurements on the progress bar.
        token_weight: weight of the token-level term of the loss (the last layer's state of every real
            token, compared by cosine with the teacher's); 0 trains on the sentence embeddings alone.
        seed: the adapters' initialisation and the batch order.
        progress: show a rich progress bar (loss, held-out cosine).
        options: the format's options for :func:`viva_tensor.nn.quantize_model`.

    Returns:
        ``(student, report)``: a :class:`~viva_tensor.models.minilm.SentenceEncoder` whose model is the
        quantized one with trained :class:`viva_tensor.nn.LoRALinear` layers (merge them with
        :func:`viva_tensor.nn.merge_lora`), and a :class:`DistillReport`.

    Raises:
        ConfigError: a bad size, or too little text for ``held_out`` plus one batch.
        FormatError: an unknown format.

    Example:
        >>> from viva_tensor.models import minilm
        >>> student, report = minilm.distill(minilm.load(), steps=300)   # doctest: +SKIP
        >>> report.held_out_cosine_after > report.held_out_cosine_before  # doctest: +SKIP
        True
    """
    import optax

    from viva_tensor.models._calibration import calibration_text

    _check(rank, steps, batch_size, max_length)
    ids, mask = _tokens(encoder.tokenizer, calibration_text() if text is None else text, max_length)
    if len(ids) < held_out + batch_size:
        raise ConfigError(
            argument="text",
            expected=f"at least held_out + batch_size = {held_out + batch_size} sentences of <= {max_length} tokens",
            got=len(ids),
        )
    train_ids, train_mask = ids[: len(ids) - held_out], mask[: len(ids) - held_out]
    eval_ids, eval_mask = ids[len(ids) - held_out :], mask[len(ids) - held_out :]

    teacher = encoder.model
    base, _ = nn.quantize_model(teacher, fmt, **(options or {}))
    student = nn.lora(base, rank=rank, alpha=alpha, rngs=nnx.Rngs(seed))
    graphdef, adapters, frozen = nnx.split(student, nn.LoRAParam, ...)
    tgraph, tstate = nnx.split(teacher)
    schedule = optax.cosine_decay_schedule(learning_rate, max(steps, 1))
    tx = optax.adam(schedule)
    with jax.numpy_dtype_promotion("standard"):  # optax's adam computes decay ** count (float ** int32)
        opt_state = tx.init(adapters)

    def held_out_cosine(params):
        return float(_held_out_cosine(params, frozen, tstate, eval_ids, eval_mask, graphdef=graphdef, tgraph=tgraph))

    before = held_out_cosine(adapters)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_ids))
    per_epoch = len(order) // batch_size
    losses: list[float] = []
    cosine = before
    bar = _progress(progress)
    t0, c0 = time.perf_counter(), time.process_time()
    if bar is not None:
        bar.start()
        task = bar.add_task("distill", total=steps, loss=math.nan, cosine=before)
    try:
        for i in range(steps):
            if i and i % per_epoch == 0:
                order = rng.permutation(len(train_ids))
            rows = order[(i % per_epoch) * batch_size : (i % per_epoch + 1) * batch_size]
            adapters, opt_state, loss = _train_step(
                adapters, opt_state, frozen, tstate, train_ids[rows], train_mask[rows],
                graphdef=graphdef, tgraph=tgraph, tx=tx, token_weight=float(token_weight),
            )  # fmt: skip
            losses.append(float(loss))
            if bar is not None:
                if (i + 1) % eval_every == 0 or i + 1 == steps:
                    cosine = held_out_cosine(adapters)
                bar.update(task, advance=1, loss=losses[-1], cosine=cosine)
    finally:
        if bar is not None:
            bar.stop()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    after = held_out_cosine(adapters)
    nnx.update(student, adapters)
    adapter_bytes = int(sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(adapters)))
    report = DistillReport(
        fmt, rank, steps, tuple(losses), before, after, nn.param_bytes(base), adapter_bytes, seconds,
        (len(train_ids), len(eval_ids)), cpu_seconds,
    )  # fmt: skip
    return encoder.replace(model=student), report
