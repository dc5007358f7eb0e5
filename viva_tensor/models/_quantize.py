"""One call to quantize the MiniLM sentence encoder on calibration text: :func:`quantize` (re-exported by minilm).

Calibration text: :func:`viva_tensor.models._calibration.calibration_mix`, English that ships with the
installation: sentences of the standard library's docstrings (read with :mod:`ast`, nothing imported), of
the installed packages' READMEs (their ``METADATA``), texts of one to four words, and the packages' one-line
summaries; never the evaluation sentences of ``tests/data``. (Short sentences calibrate MiniLM better than
long passages for short queries: measured in ``benchmarks/results/gptq_layers*.md``.) They are tokenized
and padded into batches of a fixed shape, so the calibration forward compiles once per pass, and the padding
tokens are masked out of the Hessians (:class:`viva_tensor.nn.CalibrationBatch`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from viva_tensor import nn
from viva_tensor.errors import ConfigError

__all__ = ["calibration_batches", "quantize", "DEFAULT_SENTENCES", "GPTQ_OPTIONS", "ROTATED_DAMP",
           "SENSITIVITY_BATCHES", "PLAN_CANDIDATES", "TABLES", "TABLE_FORMATS"]

DEFAULT_SENTENCES = 192
"""Texts :func:`quantize` takes from each source of ``calibration_mix`` by default (626 texts, 20 batches of 32)."""

GPTQ_OPTIONS = {"sequential": False, "mse": True, "damp": 0.1}
""":func:`quantize`'s GPTQ options (any can be overridden): one-shot, searched scales, damping 0.1. Asymmetric
calibration (``sequential=True, asymmetric=True``: each layer fit to the float model's outputs on the quantized
model's inputs) was measured and not taken: int4 g128 0.9724 / 0.940 / 26 of 32 (one-shot 0.9722 / 0.933 / 28)
in 256 CPU s instead of 37-44; on held-out calibration text it did better (0.9898 against 0.9859 mean), on the
evaluation sentences not; the plan at 4.5 bits 0.9868 / 0.970 / 28 (one-shot 0.9887 / 0.975 / 30), 188 CPU s.
Measured on
MiniLM, int4 groups of 128, the default calibration (mean / min cosine of the 32 evaluation sentences):
damp 0.01 0.9678 / 0.930; damp 0.1 0.9704 / 0.943; mse + damp 0.01 0.9692 / 0.936; mse + damp 0.1
0.9722 / 0.933; mse + damp 0.3 0.9716 / 0.935. A diagnostic, never a setting: calibrated on the 32 evaluation
sentences themselves (oracle calibration) int4 g128 reaches 0.98922 / 0.964 / 30 of 32 on them, while 300 held-out
calibration-style texts fall to 0.97441 (the default calibration: 0.98685): GPTQ alone can meet 0.985 on these
sentences only by fitting them, so the gap is the calibration text's distance from the evaluation sentences."""

ROTATED_DAMP = 0.3
""":func:`quantize`'s GPTQ damping with ``rotate`` (instead of :data:`GPTQ_OPTIONS`' 0.1; ``damp=`` overrides it).
Measured on MiniLM with ``rotate=128`` (the 32 evaluation sentences, mean / min cosine / same nearest neighbour,
2026-12-03): the plan at 4.5 bits damp 0.1 0.99038 / 0.977 / 30, 0.3 0.99111 / 0.979 / 31, 0.6 0.99089 / 0.980 /
30, 1.0 0.99029 / 0.979 / 30; GPTQ int4 g128 alone (rotations of other signs) 0.1 0.9814, 0.3 0.9819, 0.6 0.9819,
1.0 0.9810. A rotated Hessian has no dominant diagonal, and more damping keeps the error feedback closer to
round to nearest."""

SENSITIVITY_BATCHES = 1
"""Calibration batches (of 32 sentences) on which :func:`quantize`'s planner measures each layer's sensitivity."""


PLAN_CANDIDATES = (
    ("nf4_dq", {}),
    ("nf4_dq", {"block_size": 32}),
    ("q5_0", {}),
    ("q5_1", {}),
    ("q8_0", {}),
)
"""Candidate formats of :func:`quantize`'s planner (all with a GPTQ grid): NF4 with double quantization in
blocks of 64 (4.13 bits per value) and 32 (4.25), Q5_0 (5.5), Q5_1 (6.0), Q8_0 (8.5). Sensitivities by
``measure="gain"`` (one model run per layer; on MiniLM the log errors correlate 0.9955 with one run per layer
and candidate, at 26 s of CPU instead of 147 s). Measured with this module's GPTQ options (32 evaluation
sentences, mean / min cosine): with int4 g128 / g64, NF4, NVFP4, Q4_1, Q5_0, Q5_1, Q8_0 as candidates the
plan at 4.25 bits gave 0.9792 / 0.952, at 4.5 bits 0.9855 / 0.960; adding the two NF4-DQ candidates the
planner chose only NF4-DQ and Q5/Q8 (0.9846 / 0.967 at 4.21 bits, 0.9866 / 0.970 at 4.41 bits), hence
this list. Those runs applied NF4-DQ's ``block_size=32`` as GPTQ's column block (the record kept blocks of 64);
with the block passed as GPTQ's ``group_size`` (fixed): 4.25 bits 0.9854 / 0.961 / 30 of 32 same nearest
neighbour, 4.50 bits 0.9887 / 0.975 / 30 of 32, 77 and 80 CPU s (was 124 and 214).

Tried at 4.5 bits and not taken (2026-12-02; 300 held-out calibration-style texts outside ``calibration_mix``, then
the 32 evaluation sentences, mean / min cosine / same nearest neighbour): these candidates 0.99449 / 0.9878 held
out, 0.98868 / 0.974 / 30; adding Q4_0 and NVFP4 (4.5 bits each) gave the same numbers (the planner did not
choose them); ``sensitivity="gptq"`` (every candidate by GPTQ on the whole calibration text's Hessians) 0.99438 /
0.9870 held out, 0.98781 / 0.970 / 28, in 348 CPU s against 141 on a loaded machine."""


TABLES = ("word", "position", "token_type")
"""MiniLM's embedding tables (``encoder.model.embeddings.<table>``), the keys of :func:`quantize`'s ``embeddings``."""

TABLE_FORMATS = {"word": "q5_0", "position": "q8_0", "token_type": "q8_0"}
"""Formats per embedding table that make the whole quantized MiniLM over 6x smaller than float32 with a 4.5-bit plan
(``quantize(encoder, bits=4.5, rotate=128, embeddings=TABLE_FORMATS)``: 6.29x at 0.99074 mean / 0.9782 min cosine /
31 of 32 same nearest neighbour on the 32 evaluation sentences, ``benchmarks/results/minilm_fidelity_tables.md``).
The word table (30,522 rows, 98% of the tables' values) takes the bytes; the position table, added to every token,
takes most of the error. Measured on one plan at 4.5 bits with ``rotate=128`` (2026-12-03, the 32 evaluation
sentences, mean / min cosine / same nearest neighbour, whole-model ratio): tables float32 0.99111 / 0.9789 / 31
(1.68x); all three Q5_0 0.98967 / 0.9761 / 31 (6.32x); only the word table Q5_0 0.99073 / 0.9781 / 31 (6.04x); only
position and token type Q5_0 0.99008 / 0.9771 (1.70x); word Q5_1 and position Q5_0 0.99066 / 0.9759 (6.01x). A
rotation does not help the word table (Q5_0 relative error 0.04269 plain, 0.04270 rotated: its rows have no outlier
features); it does the position table's (0.0472 -> 0.0424), but Q8_0 there costs less."""


WEIGHTINGS = ("tokens", "sqrt", "texts")
"""The token weightings of :func:`calibration_batches`: each token of a text of ``L`` tokens weighs 1 (``"tokens"``:
``H = 2 Σ x xᵀ``, long texts dominate), ``1 / sqrt(L)`` (``"sqrt"``) or ``1 / L`` (``"texts"``: every text weighs
the same, as in the gradient of its mean-pooled embedding)."""

DEFAULT_WEIGHTING = "tokens"
"""The token weighting :func:`quantize` uses by default (see :data:`WEIGHTINGS`). Measured on MiniLM (this module's
defaults otherwise; the 32 evaluation sentences, mean / min cosine / same nearest neighbour; 2026-12-02): int4 g128
``"tokens"`` 0.97212 / 0.933 / 28, ``"sqrt"`` 0.97231 / 0.938 / 28, ``"texts"`` 0.97255 / 0.942 / 27; the plan at
4.5 bits ``"tokens"`` 0.98867 / 0.975 / 30, ``"sqrt"`` 0.98815 / 0.970 / 29, ``"texts"`` 0.98863 / 0.969 / 30
(with 3 sensitivity batches 0.98846 / 0.968 / 30): within the run-to-run spread of these configurations (about
0.0005), so the default stays the reference's unweighted Hessian."""


def calibration_batches(
    encoder: Any,
    texts: Sequence[str] | None = None,
    *,
    batch_size: int = 32,
    length: int | None = None,
    weighting: str = "tokens",
) -> list[nn.CalibrationBatch]:
    """Calibration texts as MiniLM batches of one shape, with the attention mask as the token mask.

    Args:
        encoder: a :class:`viva_tensor.models.minilm.SentenceEncoder`.
        texts: the texts (``None``: ``calibration_mix(DEFAULT_SENTENCES)``).
        batch_size: rows per batch (the last batch is padded with empty rows).
        length: tokens per row; ``None``: the texts are sorted by token count (shortest first) and each
            batch takes the bucket of its longest text (16, 32, 64 ...): a few shapes, little padding (on
            the default text 15,872 token slots for 8,706 tokens, instead of 40,960).
        weighting: the weight of each token in the Hessians and Gram matrices (the batches' ``weights``), for
            a text of ``L`` tokens: ``"tokens"`` 1 (no weights), ``"sqrt"`` ``1 / sqrt(L)``, ``"texts"`` ``1 / L``.
            MiniLM's embedding is the mean over a text's tokens, so an error on one token moves it by ``1 / L``
            of that error: with ``"texts"`` every text counts the same, short texts as much as long passages.

    Returns:
        A list of :class:`viva_tensor.nn.CalibrationBatch` calling ``model(ids, mask, types)``.

    Example:
        >>> from viva_tensor.models import minilm
        >>> batches = calibration_batches(minilm.load(), ["A first text.", "A second one."])  # doctest: +SKIP
        >>> len(batches), batches[0].mask.shape                                                # doctest: +SKIP
        (1, (32, 16))
    """
    from viva_tensor.models import _calibration

    if weighting not in WEIGHTINGS:
        raise ConfigError(argument="weighting", expected=f"one of {WEIGHTINGS}", got=repr(weighting))
    texts = list(_calibration.calibration_mix(DEFAULT_SENTENCES) if texts is None else texts)
    if not texts:
        raise ConfigError(argument="texts", expected="at least one text", got="none")
    encodings = encoder.tokenizer.encode_batch(texts)
    if length is None:  # shortest first, so that each batch pads only to its own bucket
        encodings = sorted(encodings, key=lambda e: len(e.ids))
    batches = []
    for start in range(0, len(encodings), batch_size):
        if length is None:
            longest = max(len(e.ids) for e in encodings[start : start + batch_size])
            size = _bucket(longest, encoder.max_length)
        else:
            size = length
        batches.append(_batch(encodings[start : start + batch_size], batch_size, size, weighting))
    return batches


def _bucket(longest: int, limit: int) -> int:
    """minilm's buckets: 16, 32, 64 ... capped at the truncation length."""
    size = 16
    while size < longest:
        size *= 2
    return min(size, max(limit, longest))


def _batch(encodings: Sequence[Any], batch_size: int, length: int, weighting: str = "tokens") -> nn.CalibrationBatch:
    ids = np.zeros((batch_size, length), np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    types = np.zeros((batch_size, length), np.int32)
    for i, e in enumerate(encodings):
        n = min(len(e.ids), length)
        ids[i, :n], mask[i, :n], types[i, :n] = e.ids[:n], e.attention_mask[:n], e.type_ids[:n]
    args = (jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    weights = None
    if weighting != "tokens":
        tokens = np.maximum(mask.sum(axis=1, keepdims=True), 1).astype(np.float64)
        per_text = 1.0 / tokens if weighting == "texts" else 1.0 / np.sqrt(tokens)
        weights = jnp.asarray(mask * per_text, jnp.float32)
    return nn.CalibrationBatch(args, mask=jnp.asarray(mask, bool), weights=weights)


def quantize(
    encoder: Any,
    *,
    bits: float | None = None,
    fmt: str | None = None,
    method: str = "gptq",
    calibration: Sequence[str] | None = None,
    embeddings: str | None = None,
    weighting: str | None = None,
    bias_correction: str | None = None,
    candidates: Sequence[Any] | None = None,
    sensitivity: str = "gain",
    rotate: int | None = None,
    progress: bool = False,
    **options: Any,
) -> tuple[Any, nn.QuantizeReport]:
    """Quantizes a MiniLM encoder's Linear kernels: one format, or a plan for a budget of bits per value.

    Calibration text (default): :func:`viva_tensor.models._calibration.calibration_mix` (English from the
    Python standard library's docstrings and the installed packages' READMEs, and short texts; never the
    evaluation sentences of ``tests/data``). With ``bits``, the planner measures the sensitivities on the first
    :data:`SENSITIVITY_BATCHES` batches of it.

    Args:
        encoder: a :class:`viva_tensor.models.minilm.SentenceEncoder` (not changed).
        bits: a budget of stored bits per value over the Linear kernels: :func:`viva_tensor.nn.plan` picks
            a format per layer (default candidates) and the plan is applied with ``method``.
        fmt: one format for every layer (default ``"int4_group"`` when ``bits`` is not given).
        method: ``"gptq"`` (default), ``"rtn"`` or ``"awq"``. GPTQ here takes :data:`GPTQ_OPTIONS`:
            ``sequential=False`` (every layer on the float model's inputs, one calibration pass: on MiniLM,
            sequential GPTQ measured the same mean cosine, 0.9639 against 0.9626, int4 groups of 128, 512
            docstring sentences, with a lower minimum, 0.889 against 0.916, and took 24 passes), ``mse=True``
            and ``damp=0.1``; pass any of them to override.
        calibration: calibration texts instead of the default sentences.
        embeddings: a format for the word, position and token-type tables (``nn.QEmbed``, round to nearest;
            e.g. ``"nf4"`` makes the whole model over 6x smaller than float32), or a mapping ``{table: format or
            (format, options)}`` over :data:`TABLES` (those left out stay float32; :data:`TABLE_FORMATS` is the
            measured mix for a 6x smaller model); ``None`` keeps them float32.
        weighting: the calibration tokens' weights in the Hessians, the planner's layer errors and the AWQ
            statistics (:func:`calibration_batches`: ``"tokens"``, ``"sqrt"``, ``"texts"``); ``None``:
            :data:`DEFAULT_WEIGHTING`.
        bias_correction: ``None``, ``"quantized"`` or ``"float"``: after quantization each layer's bias absorbs
            the mean of its output error on the calibration text (:func:`viva_tensor.nn.quantize_model`'s
            ``bias_correction``; no stored bits change). Not the default: measured on MiniLM (int4 g128, this
            module's GPTQ options, 2026-12-02, a loaded 2-core machine) on 300 held-out calibration-style texts
            (docstring and README sentences, short and varied texts outside ``calibration_mix``) and then the 32
            evaluation sentences (mean / min cosine / same nearest neighbour): none 0.98685 / 0.9705 held out,
            0.97217 / 0.933 / 28; ``"quantized"`` 0.98702 / 0.9714, 0.97271 / 0.934 / 28 (248 CPU s against 62:
            the sweep runs the model once per layer group); ``"float"`` 0.98655 / 0.9674, 0.97114 / 0.930 / 29.
        candidates: the planner's candidate formats (``None``: :data:`PLAN_CANDIDATES`).
        sensitivity: how the planner measures (:func:`viva_tensor.nn.sensitivity`'s ``measure``): ``"gain"``
            (round to nearest, one model run per layer) or ``"gptq"`` (every candidate by GPTQ on the Hessians of
            the whole calibration text, with this call's GPTQ options).
        rotate: ``None``, or the largest Hadamard block of a random rotation of every layer's inputs
            (:mod:`viva_tensor.rotation`; the largest power of two up to it that divides the layer's inputs):
            the records hold ``W R`` and each layer rotates its input, one bit of signs per input feature. With
            ``bits``, every candidate is rotated and the planner measures the rotated layers. GPTQ then damps by
            :data:`ROTATED_DAMP` unless ``damp`` is given. Not the default: other tools' checkpoint writers
            cannot hold the rotation (see :mod:`viva_tensor.rotation`). Measured (2026-12-03, 32 evaluation
            sentences, mean / min cosine / same nearest neighbour): int4 g128 0.9722 / 0.933 / 28 -> 0.9815 /
            0.958 / 27 (damp 0.1); the plan at 4.5 bits 0.9887 / 0.974 / 30 -> 0.9911 / 0.979 / 31 (damp 0.3).
            The minimum depends on the rotation's signs (``rotation_key``): the plan at 4.5 bits with
            :data:`TABLE_FORMATS`, keys 0-3, gave mean 0.99074 / 0.99024 / 0.99019 / 0.99029 and min 0.97821 /
            0.97397 / 0.98210 / 0.97536 (the worst sentence, "ok", has three tokens). 400 held-out
            calibration-style texts did not rank the keys that way (min 0.98137 / 0.98016 / 0.97864 / 0.98121),
            so the signs cannot be chosen on calibration text (``tools/minilm_rotation_seeds.py``, 2026-12-05).
        progress: a progress bar on stderr.
        **options: passed to :func:`viva_tensor.nn.quantize_model` (e.g. ``group_size``, ``damp``,
            ``migrate="awq"``: AWQ-style scale migration before GPTQ for the ``int4_group`` layers, which then
            hold ``awq_int4`` records, 4.19 bits per value; measured with ``fmt="int4_group"``: 0.9754 mean /
            0.947 min cosine / 27 of 32 same nearest neighbour on the evaluation sentences against plain GPTQ's
            0.9721 / 0.933 / 28, in 90 CPU s; not the default, since it changes the records' format).

    Returns:
        ``(quantized encoder, report)``: the encoder with its model replaced, and the
        :class:`viva_tensor.nn.QuantizeReport`.

    Raises:
        ConfigError: both ``bits`` and ``fmt``; an ``embeddings`` mapping with a key not in :data:`TABLES`.

    Example:
        >>> from viva_tensor.models import minilm
        >>> q, report = minilm.quantize(minilm.load(), fmt="int4_group")          # doctest: +SKIP
        >>> report.method, len(report.quantized)                                  # doctest: +SKIP
        ('gptq', 36)
    """
    if bits is not None and fmt is not None:
        raise ConfigError(argument="bits", expected="bits or fmt, not both", got=f"bits={bits}, fmt={fmt!r}")
    from viva_tensor.models import _calibration

    others = _table_formats(embeddings)
    weighting = DEFAULT_WEIGHTING if weighting is None else weighting
    texts = list(_calibration.calibration_mix(DEFAULT_SENTENCES) if calibration is None else calibration)
    batches = calibration_batches(encoder, texts, weighting=weighting)
    if method == "gptq":
        options = {**GPTQ_OPTIONS, **({"damp": ROTATED_DAMP} if rotate is not None else {}), **options}
    if rotate is not None:
        options["rotate"] = rotate
    if bits is not None:  # the first texts (in their order: every source), one batch each
        sample = texts[: 32 * SENSITIVITY_BATCHES]
        sens = [b for i in range(0, len(sample), 32)
                for b in calibration_batches(encoder, sample[i : i + 32], weighting=weighting)]  # fmt: skip
        extra = {}
        if sensitivity == "gptq":
            from viva_tensor.nn._sequential import capture_grams

            gptq_keys = ("damp", "mse", "act_order", "static_groups")
            extra = {"grams": capture_grams(encoder.model, batches),
                     "gptq_options": {k: v for k, v in options.items() if k in gptq_keys}}  # fmt: skip
        formats = PLAN_CANDIDATES if candidates is None else candidates
        if rotate is not None:
            pairs = [(c, {}) if isinstance(c, str) else (c[0], dict(c[1])) for c in formats]
            formats = [(f, {**o, "rotate": rotate}) for f, o in pairs]
        target = nn.plan(encoder.model, sens, bits=bits, formats=formats, progress=progress, measure=sensitivity,
                         **extra)  # fmt: skip
    else:
        target = fmt or "int4_group"
    if bias_correction is not None:
        options["bias_correction"] = bias_correction
    model, report = nn.quantize_model(
        encoder.model, target, method=method, calibration=batches, progress=progress, others=others, **options
    )
    return encoder.replace(model=model), report


def _table_formats(embeddings: Any) -> Any:
    """``quantize``'s ``embeddings`` as :func:`viva_tensor.nn.quantize_model`'s ``others``."""
    if not isinstance(embeddings, Mapping):
        return embeddings
    unknown = sorted(set(embeddings) - set(TABLES))
    if unknown:
        raise ConfigError(argument="embeddings", expected=f"a format, or a mapping over the tables {TABLES}",
                          got="keys " + ", ".join(map(repr, unknown)))  # fmt: skip
    return {f"embeddings.{table}": value for table, value in embeddings.items()}
