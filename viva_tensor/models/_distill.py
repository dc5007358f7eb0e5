"""Winning back a quantized MiniLM's fidelity by distillation from the float32 model on unlabeled text.

:func:`distill` makes a 4-bit student of a :class:`~viva_tensor.models.minilm.SentenceEncoder` and trains it so
that its sentence embeddings (and last-layer token states) match the float32 teacher's:

- ``method="lora"`` (QLoRA): every ``nnx.Linear`` kernel is quantized (NF4 by default; by GPTQ on calibration text
  by default, still a frozen record of the format) and rank-``rank`` LoRA adapters (:func:`viva_tensor.nn.lora`) are
  trained on top, starting by default at the calibrated correction of each kernel's quantization error (the rank-``r``
  ``AB`` minimising ``||X (W - dequantize(Q) - AB)||_F`` on the layer's calibration inputs ``X``, as LoftQ / CLoQ);
- ``method="qat"``: every kernel is fake-quantized (:func:`viva_tensor.nn.fake_quantize_model`: the forward uses
  exactly the stored 4-bit weight, the gradient passes straight through) and the float kernels and biases are
  trained; the result is frozen into real records (:func:`viva_tensor.nn.freeze_fake_quant`), no adapters.

The default text (:func:`_mixed_text`) ships with every installation, never with the evaluation sentences: the
standard library's docstrings (:mod:`viva_tensor.models._calibration`), the installed distributions' long
descriptions (their ``METADATA``, markup and code stripped) cut into sentences and kept whole as passages, the
translated strings of the gettext catalogs they ship (many languages and scripts); odd texts: docstring sentences
with digits and symbols, the packages' one-line summaries, the lines of the docstrings' examples (``>>>``
expressions and the values they print), README lines that are mostly digits and punctuation (version headings,
dates), questions and exclamations; and spans of 1 to 8 words cut from the sentences, a fixed 35% of the texts
(about 18,800 texts, 359,000 tokens). Each text's cosine counts once in the loss (:func:`_sentence_loss`), whatever
its length. Sentences are packed several to a row (each attends only to itself, positions restart), so no compute
goes to padding; each step is one jitted function of fixed shapes (one compilation for the whole run) and runs the
teacher inside it.
A held-out slice of the text is not trained on: its mean cosine is on the progress bar and in the report.

Measured with that text (``python benchmarks/qlora.py --only distill --steps 120 --rank 16``, 2026-12-02 01:26 UTC,
an AMD EPYC 2-core machine, load 7.4 -> 3.4): trained 0.9881 / 0.9770 / 30 of 32 (47 + 346 CPU s); the
earlier text (:func:`_prose_text`) gave 0.9878 / 0.975 / 30 below. From the same calibrated start, 40 steps each,
32 evaluation sentences (mean / min / top-1) and 208 held-out package texts that are short or odd (mean): earlier
text 0.9866 / 0.9707 / 31, 0.9911; mixed text 0.9872 / 0.9764 / 30, 0.9916; earlier text without the token term
(``token_weight=0``) 0.9865 / 0.9704 / 31, 0.9910; mixed text with ``worst_weight=1`` 0.9869 / 0.9727 / 31, 0.9918
(step 0: 0.9854 / 0.9655 / 31, 0.9895). QAT of int4 groups of 128 with that text (``--only qat --steps 150``, 01:33
UTC): 0.9815 / 0.9572 / 29 (317 CPU s), against 0.9816 / 0.9541 / 29 with the earlier text. A peak learning rate of
6e-4 instead of 3e-4 (120 steps, ``--learning-rate 6e-4``, 02:02 UTC): 0.9881 / 0.9784 / 30, the same; not kept.
Training the biases and LayerNorms too (``train=("lora", "bias", "norm")``, BitFit and LayerNorm tuning: 30,720
more float32 values, 122,880 bytes, which take the float32 rank-16 adapters from 4.94% to 5.17% of the quantized
model, over the 5% budget: ``adapter_dtype=jnp.bfloat16`` halves the adapters), from the defaults' start, 40 steps
each, 64 held-out texts 0.9920 at step 0 (2026-12-02 06:50 UTC, load 9-18 on 2 cores): adapters alone 0.9937 (on the
evaluation sentences 0.9871 / 0.9692 / 31); with biases and norms at a peak rate of 3e-3 0.9935 (0.9870 / 0.9691 /
32); at 1e-3 0.9937 (0.9873 / 0.9695 / 32). No gain on the held-out slice: kept as an option, off by default.

Measured with the earlier text on all-MiniLM-L6-v2 (``benchmarks/results/qlora_distill.md`` of the round before,
``qlora_int4.md``; the 32 evaluation sentences of ``tests/data``, cosine to the float32 encoder, mean / min / same
nearest neighbour): NF4 to nearest 0.965 / 0.891 / 29 of 32; the defaults, rank 16, 120 steps of 8 rows x 256 tokens
(54 CPU s of GPTQ, Gram matrices and initialisation + 448 CPU s of training on a shared machine, 503 in all; the round
before, with the eigendecomposition in the initialisation, 100 + 503): GPTQ NF4 base 0.981 / 0.956 / 31, with the
calibrated adapters at step 0 0.985 / 0.965 / 31, trained 0.988 / 0.975 / 30 (held-out training text 0.9917 ->
0.9945). Before them (round-to-nearest base, ``B = 0``, learning rate 2e-3, 130 steps, 505 CPU s): 0.985 / 0.967 / 29.
From the calibrated start a learning rate of 2e-3 lowered the held-out cosine (0.9917 -> 0.9909 in 40 steps), 3e-4
raised it (0.9935). int4 groups of 128 by QAT, 150 steps (510 CPU s): 0.945 -> 0.982, min 0.847 -> 0.954, 27/32 ->
29/32. With the docstrings alone and 64-token rows (rank 8, 200 steps) NF4 reached 0.978 only. Tried from the
defaults' start and not kept (40 steps, held-out training text 0.9917 -> 0.9936): matching every layer's token states
as well (TinyBERT-style, cosine, weight 1) 0.9936; 80 steps of 4 rows instead of 40 of 8 (the same tokens, 147 against
151 CPU s) 0.9937.

On a rotated base (``rotate=128``: the NF4 GPTQ base of every layer quantized as ``W R``, 2026-12-03, the 32 evaluation
sentences; ``benchmarks/results/qlora_distill_rotated*.md``): 120 steps 0.9889 / 0.9755 / 30 of 32 (369 s of wall
time training); 200 steps 0.9893 / 0.9775 / 31, held-out training text 0.9922 -> 0.9950, in 832 s of wall time on a
shared machine, over the 10 minutes of the target and still under 0.99: more steps are not the way to 0.99 here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from viva_tensor import nn
from viva_tensor.errors import ConfigError
from viva_tensor.nn._lora import INITS, _check_train
from viva_tensor.nn._sequential import capture_grams

__all__ = ["DistillReport", "distill"]

METHODS = ("lora", "qat")
"""The student kinds of :func:`distill`."""

BASES = ("rtn", "gptq")
"""How :func:`distill` quantizes the frozen kernels for ``method="lora"``: round to nearest, or GPTQ
(:func:`viva_tensor.models.minilm.quantize`: still a record of ``fmt``, frozen)."""


@dataclasses.dataclass(frozen=True)
class DistillReport:
    """What :func:`distill` did and measured.

    Attributes:
        fmt: the kernels' format.
        rank: the adapters' rank (0 for ``method="qat"``: no adapters).
        steps: optimizer steps taken.
        losses: the training loss at every step (mean ``1 - cosine`` to the teacher of the sentence
            embeddings, plus ``token_weight`` times that of the token states).
        held_out_cosine_before: mean cosine to the teacher on the held-out text before training (the
            quantized model with its adapters at their start).
        held_out_cosine_after: the same after training.
        quantized_bytes: every parameter of the quantized model without adapters (records count their buffers).
        adapter_bytes: the adapters' bytes (0 for ``method="qat"``).
        seconds: wall time of the training loop (compilation included).
        sentences: training texts, held-out texts.
        cpu_seconds: CPU time of this process over the loop (all its threads): on a shared machine, a
            measure of the work that the wall time is not.
        method: ``"lora"`` or ``"qat"``.
        base: how the frozen kernels were quantized: ``"rtn"`` (round to nearest) or ``"gptq"``.
        init: the adapters' initialisation (:data:`viva_tensor.INITS`; ``"zero"`` for ``"qat"``).
        prepare_seconds: wall time before the loop (GPTQ, the calibration Gram matrices, the adapters'
            initialisation; not the teacher's loading).
        prepare_cpu_seconds: the process's CPU time over the same.

    Example:
        >>> r = DistillReport("nf4", 8, 2, (0.03, 0.02), 0.97, 0.99, 1000, 30, 1.5, (64, 8), 2.5)
        >>> round(r.adapter_fraction, 3)
        0.03
        >>> for part in str(r).split("; "):
        ...     print(part)
        nf4 + LoRA rank 8: held-out cosine 0.9700 -> 0.9900 after 2 steps (1.5 s, 2.5 CPU s)
        adapters 30 bytes (3.00% of 1,000)
        >>> print(DistillReport("int4_group", 0, 2, (0.03, 0.02), 0.95, 0.98, 1000, 0, 1.5, (64, 8), 2.5, "qat"))
        int4_group QAT: held-out cosine 0.9500 -> 0.9800 after 2 steps (1.5 s, 2.5 CPU s); 1,000 bytes
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
    method: str = "lora"
    base: str = "rtn"
    init: str = "zero"
    prepare_seconds: float = 0.0
    prepare_cpu_seconds: float = 0.0

    @property
    def adapter_fraction(self) -> float:
        """``adapter_bytes / quantized_bytes``."""
        return self.adapter_bytes / max(1, self.quantized_bytes)

    @property
    def total_cpu_seconds(self) -> float:
        """``prepare_cpu_seconds + cpu_seconds``: the CPU time of the whole recipe (GPTQ included)."""
        return self.prepare_cpu_seconds + self.cpu_seconds

    def __str__(self) -> str:
        what = f"{self.fmt} QAT" if self.method == "qat" else f"{self.fmt} + LoRA rank {self.rank}"
        if self.base != "rtn" or self.init != "zero":
            what += f" ({self.base} base, {self.init} init, {self.prepare_cpu_seconds:.1f} CPU s before)"
        size = (
            f"{self.quantized_bytes:,} bytes"
            if self.method == "qat"
            else f"adapters {self.adapter_bytes:,} bytes "
            f"({100 * self.adapter_fraction:.2f}% of {self.quantized_bytes:,})"
        )
        return (
            f"{what}: held-out cosine {self.held_out_cosine_before:.4f} -> {self.held_out_cosine_after:.4f} after "
            f"{self.steps} steps ({self.seconds:.1f} s, {self.cpu_seconds:.1f} CPU s); {size}"
        )


# ---- Plain text from the installed packages' metadata (their long descriptions) and message catalogs.

_FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1[^\n]*$", re.M | re.S)
_HTML = re.compile(r"<!--.*?-->|<[^>\n]+>", re.S)
_IMAGE = re.compile(r"!\[[^\]]*\]\([^)]*\)|!\[[^\]]*\]\[[^\]]*\]")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)|\[([^\]]+)\]\[[^\]]*\]")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`__?")
_ROLE = re.compile(r":[a-z:]+:`([^`]+)`")
_INLINE = re.compile(r"``([^`]+)``|`([^`]+)`_?|\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*")
_RULE = re.compile(r"^\s*([=\-~^*#+_`:'\".]{3,}|\|.*\||\+[-=+]+\+)\s*$")


def _prose_lines(lines: list[str]) -> list[str]:
    """Drops code (indented blocks, prompts), rst directives with their bodies, tables and underlines."""
    kept, skipping = [], False
    for line in lines:
        if skipping and (not line.strip() or line[:1] in " \t"):
            continue
        skipping = False
        stripped = line.strip()
        if stripped.startswith(".. ") or stripped.endswith("::"):
            skipping = True  # a directive or a literal block: its indented body follows
            if stripped.endswith("::") and not stripped.startswith(".. ") and len(stripped) > 2:
                kept.append(stripped[:-1])
            continue
        if line.startswith(("    ", "\t")) or stripped.startswith((">>>", "$ ", "...", "|")) or _RULE.match(line):
            kept.append("")
            continue
        kept.append(stripped.lstrip("#").strip() if stripped.startswith("#") else stripped)
    return kept


def _clean(text: str) -> list[str]:
    """Paragraphs of plain text in a Markdown or reStructuredText description (markup and code removed)."""
    text = _HTML.sub(" ", _RST_LINK.sub(r"\1", _FENCE.sub("\n", text)))
    paragraphs = []
    for block in re.split(r"\n\s*\n", "\n".join(_prose_lines(text.splitlines()))):
        p = " ".join(block.split())
        p = _INLINE.sub(lambda m: next(g for g in m.groups() if g), _ROLE.sub(r"\1", p))
        p = _LINK.sub(lambda m: m.group(1) or m.group(2), _IMAGE.sub(" ", p))
        p = " ".join(p.replace("\\", "").split())
        letters = sum(c.isalpha() for c in p)
        if p and letters >= 0.6 * sum(not c.isspace() for c in p) and len(p.split()) >= 2:
            paragraphs.append(p)
    return paragraphs


@functools.lru_cache(maxsize=1)
def _package_text() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(paragraphs, messages)`` of the installed distributions, in the order of their names.

    ``paragraphs``: the plain-text paragraphs of every distribution's long description (its ``METADATA``
    body) with the markup and code stripped; ``messages``: the translated strings (``msgstr``) of the
    gettext catalogs (``*.po``) the distributions ship, in many languages and scripts. Both are read as
    text (nothing is imported) and deduplicated; they depend on what is installed.
    """
    from importlib import metadata

    by_name = {}
    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower()
        by_name.setdefault(name, dist)
    paragraphs: dict[str, None] = {}
    messages: dict[str, None] = {}
    for _, dist in sorted(by_name.items()):
        for p in _clean(dist.metadata.get_payload() or dist.metadata.get("Description") or ""):
            paragraphs.setdefault(p, None)
        for file in sorted(str(f) for f in (dist.files or ()) if str(f).endswith(".po")):
            try:
                catalog = dist.locate_file(file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            for m in re.finditer(r'^msgstr(?:\[\d+\])? "(.*)"$', catalog, re.M):
                msg = " ".join(m.group(1).replace('\\"', '"').replace("\\n", " ").split())
                if sum(c.isalpha() for c in msg) >= 2:
                    messages.setdefault(msg, None)
    return tuple(paragraphs), tuple(messages)


def _sentences(paragraph: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", paragraph) if s]


@functools.lru_cache(maxsize=1)
def _stdlib_docstrings() -> tuple[str, ...]:
    """The docstrings of :data:`~viva_tensor.models._calibration.MODULES`, read once (``ast``, nothing imported)."""
    from viva_tensor.models._calibration import MODULES, _docstrings

    return tuple(d for m in MODULES for d in _docstrings(m))


@functools.lru_cache(maxsize=1)
def _doctest_lines() -> tuple[str, ...]:
    """The lines of the standard library's docstring examples (:data:`~viva_tensor.models._calibration.MODULES`):
    each ``>>>`` expression without its prompt and each value it prints: numbers, brackets, quotes and names."""
    seen: dict[str, None] = {}
    for doc in _stdlib_docstrings():
        example = False
        for line in doc.splitlines():
            s = " ".join(line.split())
            if s.startswith(">>>"):
                example, s = True, s[3:].strip()
            elif not s or s.startswith("..."):
                example = example and bool(s)
                continue
            elif not example:
                continue
            if 1 <= len(s) <= 120:
                seen.setdefault(s, None)
    return tuple(seen)


@functools.lru_cache(maxsize=1)
def _numeric_lines() -> tuple[str, ...]:
    """Lines of the installed distributions' descriptions that are mostly digits and punctuation (version
    headings, dates, commands, numbers in examples), at most 100 characters, markup characters trimmed."""
    from importlib import metadata

    seen: dict[str, None] = {}
    for dist in sorted(metadata.distributions(), key=lambda d: (d.metadata.get("Name") or "").lower()):
        for line in (dist.metadata.get_payload() or "").splitlines():
            s = " ".join(_HTML.sub(" ", line).strip(" #*-=`>|").split())
            other = sum(not c.isalpha() and not c.isspace() for c in s)
            if 3 <= len(s) <= 100 and any(c.isdigit() for c in s) and other >= 0.4 * sum(not c.isspace() for c in s):
                seen.setdefault(s, None)
    return tuple(seen)


def _questions(paragraphs: Sequence[str]) -> list[str]:
    """The questions and exclamations among the sentences of ``paragraphs`` and the standard library's docstrings."""
    docs = [" ".join(p.split()) for d in _stdlib_docstrings() for p in re.split(r"\n\s*\n", d)]
    found = (s for p in (*paragraphs, *docs) for s in _sentences(p))
    return list(dict.fromkeys(s for s in found if s.endswith(("?", "!")) and 2 <= len(s.split()) <= 40))


def _spans(sentences: Sequence[str], n: int, rng: np.random.Generator, longest: int) -> list[str]:
    """``n`` spans of 1 to ``longest`` consecutive words (punctuation kept) cut from random ``sentences``."""
    out = []
    for s in rng.choice(np.array(list(sentences), dtype=object), n):
        words = s.split()
        k = int(rng.integers(1, longest + 1))
        start = int(rng.integers(0, max(1, len(words) - k + 1)))
        out.append(" ".join(words[start : start + k]))
    return out


def _mixed_text(seed: int, short_share: float = 0.35) -> list[str]:
    """Prose, odd texts and a fixed share of short spans, shuffled with ``seed`` (see the module's docstring)."""
    return list(_mixed_texts(seed, short_share))


@functools.lru_cache(maxsize=2)
def _mixed_texts(seed: int, short_share: float) -> tuple[str, ...]:
    from viva_tensor.models._calibration import calibration_text, package_summaries, varied_sentences

    paragraphs, messages = _package_text()
    sentences = [s for p in paragraphs for s in _sentences(p)]
    prose = calibration_text() + sentences + list(paragraphs)
    odd = (list(messages) + varied_sentences() + package_summaries() + list(_doctest_lines())
           + list(_numeric_lines()) + _questions(paragraphs))  # fmt: skip
    rng = np.random.default_rng(seed)
    texts = list(dict.fromkeys(prose + odd))
    n_short = int(short_share / (1 - short_share) * len(texts))
    short = _spans(sentences + calibration_text() + varied_sentences(), n_short, rng, 8)
    texts = list(dict.fromkeys(texts + short))
    return tuple(texts[i] for i in rng.permutation(len(texts)))


def _default_text(seed: int) -> list[str]:
    """The default training text: :func:`_mixed_text` (prose, odd texts, 35% short spans), shuffled with ``seed``."""
    return _mixed_text(seed)


def _prose_text(seed: int) -> list[str]:
    """The default text before :func:`_mixed_text` (prose, messages, 1-4 word spans), shuffled with ``seed``."""
    from viva_tensor.models._calibration import calibration_text

    paragraphs, messages = _package_text()
    sentences = [s for p in paragraphs for s in _sentences(p)]
    rng = np.random.default_rng(seed)
    spans = []
    for s in rng.choice(np.array(sentences + calibration_text(), dtype=object), len(sentences) // 3):
        words = s.split()
        n = int(rng.integers(1, 5))
        start = int(rng.integers(0, max(1, len(words) - n + 1)))
        spans.append(" ".join(words[start : start + n]))
    texts = list(dict.fromkeys(calibration_text() + sentences + list(paragraphs) + list(messages) + spans))
    return [texts[i] for i in rng.permutation(len(texts))]


# ---- Training on packed rows.


def _encode(tokenizer: Any, texts: Sequence[str], length: int) -> list[np.ndarray]:
    """Token ids of each text, cut to ``length`` tokens (its last token, ``[SEP]``, kept)."""
    out = []
    for e in tokenizer.encode_batch(list(texts)):
        ids = np.asarray(e.ids, np.int32)
        out.append(ids if len(ids) <= length else np.concatenate([ids[: length - 1], ids[-1:]]))
    return out


def _pack(seqs: Sequence[np.ndarray], length: int, segments: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, seg)`` int32 ``(rows, length)``: the sequences in order, each into the first of the last 16 open rows
    with room (``seg`` numbers a row's sequences from 1, 0 is padding)."""
    rows: list[list[np.ndarray]] = []
    free: list[int] = []
    open_rows: list[int] = []
    for ids in seqs:
        n = len(ids)
        for r in open_rows[-16:]:
            if free[r] >= n and len(rows[r]) < segments:
                break
        else:
            rows.append([])
            free.append(length)
            open_rows.append(len(rows) - 1)
            r = open_rows[-1]
        rows[r].append(ids)
        free[r] -= n
        if free[r] < 4 or len(rows[r]) == segments:
            open_rows.remove(r)
    out_ids = np.zeros((len(rows), length), np.int32)
    out_seg = np.zeros((len(rows), length), np.int32)
    for r, row in enumerate(rows):
        at = 0
        for s, ids in enumerate(row, start=1):
            out_ids[r, at : at + len(ids)] = ids
            out_seg[r, at : at + len(ids)] = s
            at += len(ids)
    return out_ids, out_seg


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine along the last axis; 0 for a zero vector, with a finite gradient there (empty segments are zero)."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    na = jnp.sqrt(jnp.maximum(jnp.sum(a * a, axis=-1), 1e-12))
    nb = jnp.sqrt(jnp.maximum(jnp.sum(b * b, axis=-1), 1e-12))
    return jnp.sum(a * b, axis=-1) / (na * nb)


def _check(method: str, rank: int, steps: int, batch_size: int, max_length: int | None, base: str, init: str) -> None:
    if method not in METHODS:
        raise ConfigError(argument="method", expected=f"one of {METHODS}", got=method)
    if base not in BASES or (method == "qat" and base != "rtn"):
        raise ConfigError(argument="base", expected=f"one of {BASES} ('rtn' for method='qat')", got=base)
    if init not in INITS or (method == "qat" and init != "zero"):
        raise ConfigError(argument="init", expected=f"one of {INITS} ('zero' for method='qat')", got=init)
    for name, value, low in (("rank", rank, 1), ("steps", steps, 0), ("batch_size", batch_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(argument=name, expected=f"an int >= {low}", got=value)
    if max_length is not None and (not isinstance(max_length, int) or not 8 <= max_length <= 512):
        raise ConfigError(argument="max_length", expected="an int in [8, 512] or None", got=max_length)


def _states(model: Any, ids: jax.Array, seg: jax.Array) -> jax.Array:
    """The last token states of packed rows: each sequence attends to itself only, its positions start at 0."""
    real = seg > 0
    mask = (seg[:, :, None] == seg[:, None, :]) & real[:, None, :]
    starts = jnp.concatenate([jnp.ones_like(real[:, :1]), seg[:, 1:] != seg[:, :-1]], axis=1)
    index = jnp.broadcast_to(jnp.arange(seg.shape[1], dtype=jnp.int32), seg.shape)
    positions = index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return model.hidden_states(ids, mask, None, positions).astype(jnp.float32)


def _pooled(hidden: jax.Array, seg: jax.Array, segments: int) -> tuple[jax.Array, jax.Array]:
    """Each sequence's summed token states ``(B, segments, hidden)`` (cosine needs no mean) and which are real."""
    onehot = (seg[:, :, None] == jnp.arange(1, segments + 1, dtype=jnp.int32)[None, None]).astype(jnp.float32)
    return jnp.einsum("bts,bth->bsh", onehot, hidden), onehot.sum(axis=1) > 0


def _segment_cosines(student: jax.Array, teacher: jax.Array, seg: jax.Array, segments: int):
    ps, real = _pooled(student, seg, segments)
    pt, _ = _pooled(teacher, seg, segments)
    return _cosine(ps, pt), real.astype(jnp.float32)


def _sentence_loss(cos: jax.Array, real: jax.Array, worst_weight: float = 0.0) -> jax.Array:
    """``mean(d) + worst_weight * sum(d * d) / sum(d)`` over the real texts, ``d = 1 - cos``: each text counts once
    whatever its length; the second term weights each text by its own ``d`` (held constant in the gradient), so
    the worst texts of the batch count most."""
    d = (1.0 - cos) * real
    loss = jnp.sum(d) / jnp.maximum(jnp.sum(real), 1.0)
    if worst_weight:
        w = jax.lax.stop_gradient(d)
        loss = loss + worst_weight * jnp.sum(w * d) / jnp.maximum(jnp.sum(w), 1e-12)
    return loss


def _loss(params, frozen, ids, seg, target, graphdef, token_weight, segments, worst_weight=0.0):
    """Mean ``1 - cosine`` of the sentence embeddings (each text counts once), plus ``worst_weight`` times their
    mean weighted by themselves (the worst texts count most), plus ``token_weight`` times the mean ``1 - cosine`` of
    every real token's state."""
    hidden = _states(nnx.merge(graphdef, params, frozen), ids, seg)
    sentence = _sentence_loss(*_segment_cosines(hidden, target, seg, segments), worst_weight)
    m = (seg > 0).astype(jnp.float32)
    tokens = jnp.sum((1.0 - _cosine(hidden, target)) * m) / jnp.maximum(jnp.sum(m), 1.0)
    return sentence + jnp.asarray(token_weight, jnp.float32) * tokens


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "tgraph", "tx", "token_weight", "segments", "worst_weight"),
    donate_argnums=(0, 1),
)
def _train_step(
    params, opt_state, frozen, tstate, ids, seg, *, graphdef, tgraph, tx, token_weight, segments, worst_weight=0.0
):
    """One adam step on ``params``; the teacher (``tgraph``, ``tstate``) gives the targets."""
    import optax

    target = jax.lax.stop_gradient(_states(nnx.merge(tgraph, tstate), ids, seg))
    loss, grads = jax.value_and_grad(_loss)(
        params, frozen, ids, seg, target, graphdef, token_weight, segments, worst_weight
    )
    with jax.numpy_dtype_promotion("standard"):  # optax's adam computes decay ** count (float ** int32)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params, opt_state, loss


@functools.partial(jax.jit, static_argnames=("graphdef", "tgraph", "segments"))
def _held_out_sums(params, frozen, tstate, ids, seg, *, graphdef, tgraph, segments):
    student = _states(nnx.merge(graphdef, params, frozen), ids, seg)
    cos, real = _segment_cosines(student, _states(nnx.merge(tgraph, tstate), ids, seg), seg, segments)
    return jnp.sum(cos * real), jnp.sum(real)


def _progress(enabled: bool) -> Any:
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("distill"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.5f}"),
        TextColumn("held-out cos {task.fields[cosine]:.4f}"), TimeElapsedColumn(), transient=True,
    )  # fmt: skip


def _quantized(encoder: Any, fmt: str, base: str, calibration: Any, options: dict[str, Any]) -> Any:
    """The frozen quantized model of ``method="lora"``: every Linear kernel in ``fmt``, by GPTQ or to nearest."""
    if base == "rtn":
        return nn.quantize_model(encoder.model, fmt, **options)[0]
    from viva_tensor.models._quantize import quantize

    return quantize(encoder, fmt=fmt, calibration=calibration, **options)[0].model


def _trainable(student: Any, method: str, train: tuple[str, ...] = ("lora",)) -> Any:
    """The filter of the trained parameters: the adapters (and the parts of ``train``:
    :func:`viva_tensor.nn.lora_filter`), or the fake-quantized layers' kernels and biases."""
    if method == "lora":
        return nn.LoRAParam if tuple(train) == ("lora",) else nn.lora_filter(student, train)
    layers = [path for path, node in nnx.iter_graph(student) if isinstance(node, nn.FakeQuantLinear)]

    def inside(path: tuple, value: Any) -> bool:
        return isinstance(value, nnx.Param) and any(tuple(path[: len(p)]) == tuple(p) for p in layers)

    return inside


def _is_adapter(path: tuple) -> bool:
    """Whether a leaf's key path (``jax.tree_util``) is a LoRA ``A`` or ``B``."""
    names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
    return bool(names & {"lora_a", "lora_b"})


def _optimizer(peak: float, extra_peak: float | None, warmup: float, steps: int, extra: bool) -> Any:
    """Adam with a linear warmup (from a tenth of the peak) and a cosine decay to 0; with ``extra``, the leaves that
    are not adapters (biases, norms) get their own adam with the same schedule at ``extra_peak``."""
    import optax

    def adam(top: float) -> Any:
        n = int(warmup * steps)
        return optax.adam(optax.warmup_cosine_decay_schedule(0.1 * top, top, n, max(steps, n + 1), 0.0))

    if not extra:
        return adam(peak)

    def labels(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(lambda p, _: "lora" if _is_adapter(p) else "extra", params)

    return optax.multi_transform({"lora": adam(peak), "extra": adam(peak if extra_peak is None else extra_peak)},
                                 labels)  # fmt: skip


def distill(
    encoder: Any,
    *,
    method: str = "lora",
    fmt: str = "nf4",
    base: str | None = None,
    init: str | None = None,
    rank: int = 16,
    alpha: float = 32,
    steps: int = 120,
    text: Sequence[str] | None = None,
    batch_size: int = 8,
    learning_rate: float | None = None,
    warmup: float = 0.05,
    max_length: int | None = None,
    held_out: int = 64,
    eval_every: int = 25,
    token_weight: float = 1.0,
    worst_weight: float = 0.0,
    train: Sequence[str] = ("lora",),
    bias_learning_rate: float | None = None,
    adapter_dtype: Any = None,
    seed: int = 0,
    progress: bool = True,
    options: dict[str, Any] | None = None,
) -> tuple[Any, DistillReport]:
    """Make a 4-bit student of an encoder and train it so that its embeddings match the float32 model's.

    ``method="lora"``: every ``nnx.Linear`` kernel of ``encoder.model`` goes to ``fmt``
    (:func:`viva_tensor.nn.quantize_model`) and gets rank-``rank`` adapters (:func:`viva_tensor.nn.lora`); only
    the adapters train. ``method="qat"``: every kernel is fake-quantized in ``fmt``
    (:func:`viva_tensor.nn.fake_quantize_model`) and the float kernels and biases train through the
    straight-through estimator; the student is then frozen into real records (:func:`viva_tensor.nn.freeze_fake_quant`).
    Adam, with a linear warmup over the first ``warmup`` fraction of the steps and a cosine decay to 0,
    minimises the mean ``1 - cosine`` between the student's and the float32 teacher's sentence embeddings
    (mean-pooled last-layer states), plus ``token_weight`` times the same for every token's last-layer state (a
    denser signal). Texts are cut to ``max_length`` tokens and packed several to a row of ``max_length`` tokens
    (each attends only to itself, its positions start at 0): ``batch_size`` rows per step, one compilation
    for the whole run. The last ``held_out`` texts are not trained on: their mean cosine is on the progress
    bar and in the report.

    Args:
        encoder: a :class:`~viva_tensor.models.minilm.SentenceEncoder` with a float model (the teacher).
        method: ``"lora"`` (QLoRA: frozen quantized kernels plus adapters) or ``"qat"`` (quantization-aware
            training of the kernels themselves).
        fmt: the kernels' format (a name of :func:`viva_tensor.quant.format_names`).
        base: ``"lora"`` only: how the frozen kernels are quantized, ``"gptq"`` (default:
            :func:`viva_tensor.models.minilm.quantize` with ``fmt``, still a frozen ``fmt`` record) or ``"rtn"``
            (round to nearest, :func:`viva_tensor.nn.quantize_model`). ``"qat"``: ``"rtn"`` only.
        init: ``"lora"`` only: the adapters' start (:func:`viva_tensor.nn.lora`'s ``init``): ``"calibrated"``
            (default: the rank-``rank`` correction of each kernel's quantization error weighted by its inputs'
            Gram matrix on the calibration text), ``"svd"`` (unweighted) or ``"zero"`` (the quantized model
            exactly). The calibration text is ``minilm.quantize``'s default (``text=None``) or the first 640
            training texts; GPTQ uses the same.
        rank: the adapters' rank (``"lora"`` only).
        alpha: LoRA's scale numerator (the update is ``alpha / rank * x A B``).
        steps: optimizer steps (0: only quantize, and add adapters); the default 120 with the other defaults
            took about 500 CPU s on all-MiniLM-L6-v2 (a shared 2-core machine, GPTQ included).
        text: unlabeled training texts; ``None``: text that ships with the installation (the standard library's
            docstrings, the installed distributions' descriptions and message catalogs: see the module), shuffled
            with ``seed``. Never the sentences you evaluate on.
        batch_size: packed rows per step.
        learning_rate: adam's peak learning rate; ``None``: 3e-4 for ``"lora"`` (2e-3 with ``init="zero"``),
            1e-4 for ``"qat"``.
        warmup: the fraction of ``steps`` of linear warmup (from a tenth of the peak).
        max_length: tokens per packed row, and the most of one text; ``None``: the encoder's ``max_length``
            (at most 256).
        held_out: texts (the last of ``text``) kept for the held-out cosine.
        eval_every: steps between two held-out measurements on the progress bar.
        token_weight: weight of the token-level term of the loss (the last layer's state of every real
            token, compared by cosine with the teacher's); 0 trains on the sentence embeddings alone.
        worst_weight: weight of a second sentence term, the batch's ``1 - cosine`` weighted by itself (the worst
            texts count most; :func:`_sentence_loss`); 0: each text counts once (the mean, what is evaluated).
            The mean squared error of the normalised embeddings is ``2 (1 - cosine)``: the same loss.
        train: ``"lora"`` only: what trains (:func:`viva_tensor.nn.lora_filter`): ``("lora",)`` the adapters
            alone; add ``"bias"`` (every Linear layer's bias: BitFit) and ``"norm"`` (every LayerNorm's scale and
            bias). Their trained values are part of what must be saved with the adapters
            (``nn.lora_state(model, train)``): the report's ``adapter_bytes`` counts them.
        bias_learning_rate: the peak learning rate of the biases and norms (their own adam, the same schedule);
            ``None``: ``learning_rate``.
        adapter_dtype: ``"lora"`` only: the dtype the adapters ``A``, ``B`` are stored in after training
            (``jnp.bfloat16`` halves their bytes); ``None`` keeps float32. The held-out cosine after training and
            ``adapter_bytes`` are measured after the cast (biases and norms stay float32).
        seed: the adapters' initialisation, the default text's order and the batch order.
        progress: show a rich progress bar (loss, held-out cosine).
        options: the format's options for :func:`viva_tensor.nn.quantize_model` (static ones for ``"qat"``).

    Returns:
        ``(student, report)``: a :class:`~viva_tensor.models.minilm.SentenceEncoder` whose model is the
        quantized one with trained :class:`viva_tensor.nn.LoRALinear` layers (merge them with
        :func:`viva_tensor.nn.merge_lora`) or, for ``"qat"``, with :class:`viva_tensor.nn.QLinear` layers
        storing the trained kernels; and a :class:`DistillReport`.

    Raises:
        ConfigError: a bad size or method, or too little text for ``held_out`` plus one batch.
        FormatError: an unknown format.

    Example:
        >>> from viva_tensor.models import minilm
        >>> student, report = minilm.distill(minilm.load())              # doctest: +SKIP
        >>> report.held_out_cosine_after > report.held_out_cosine_before  # doctest: +SKIP
        True
        >>> qat, report = minilm.distill(minilm.load(), method="qat", fmt="int4_group")  # doctest: +SKIP
    """

    base = base or ("gptq" if method == "lora" else "rtn")
    init = init or ("calibrated" if method == "lora" else "zero")
    _check(method, rank, steps, batch_size, max_length, base, init)
    parts = _check_train(train)
    cfg = encoder.model.config
    length = min(encoder.max_length, cfg.max_position_embeddings, 256) if max_length is None else max_length
    texts = _default_text(seed) if text is None else list(text)
    seqs = _encode(encoder.tokenizer, texts, length)
    segments = max(1, length // 4)
    train, evaluation = seqs[: len(seqs) - held_out], seqs[len(seqs) - held_out :]
    rows_per_epoch = len(_pack(train, length, segments)[0]) if len(seqs) > held_out else 0
    if held_out < 1 or rows_per_epoch < batch_size:
        raise ConfigError(
            argument="text",
            expected=f"held_out >= 1 texts and enough others to fill batch_size = {batch_size} rows of {length} tokens",
            got=f"{len(seqs)} texts ({rows_per_epoch} rows after the {held_out} held out)",
        )
    eval_ids, eval_seg = _pack(evaluation, length, segments)

    teacher = encoder.model
    p0, q0 = time.perf_counter(), time.process_time()
    if method == "lora":
        calibration = None if text is None else texts[: min(640, len(texts) - held_out)]
        quantized = _quantized(encoder, fmt, base, calibration, options or {})
        grams = None
        if init == "calibrated":
            from viva_tensor.models._quantize import calibration_batches

            grams = capture_grams(teacher, calibration_batches(encoder, calibration))
        student = nn.lora(quantized, rank=rank, alpha=alpha, init=init, reference=teacher, calibration=grams,
                          rngs=nnx.Rngs(seed))  # fmt: skip
    else:
        student = nn.fake_quantize_model(teacher, fmt, **(options or {}))
    jax.block_until_ready(nnx.state(student))
    prepare_seconds, prepare_cpu = time.perf_counter() - p0, time.process_time() - q0
    graphdef, params, frozen = nnx.split(student, _trainable(student, method, parts), ...)
    params = jax.tree_util.tree_map(jnp.copy, params)  # donated each step: share no buffer with the teacher
    tgraph, tstate = nnx.split(teacher)
    if learning_rate is None:  # a start at the calibrated correction wants smaller steps (held-out text: 2e-3 hurt)
        learning_rate = 1e-4 if method == "qat" else 2e-3 if init == "zero" else 3e-4
    tx = _optimizer(learning_rate, bias_learning_rate, warmup, steps, method == "lora" and parts != ("lora",))
    with jax.numpy_dtype_promotion("standard"):  # optax's adam computes decay ** count (float ** int32)
        opt_state = tx.init(params)

    def held_out_cosine(params):
        total = count = 0.0
        for start in range(0, len(eval_ids), batch_size):
            ids, seg = (np.zeros((batch_size, length), np.int32) for _ in range(2))
            n = min(batch_size, len(eval_ids) - start)
            ids[:n], seg[:n] = eval_ids[start : start + n], eval_seg[start : start + n]
            s, c = _held_out_sums(params, frozen, tstate, ids, seg, graphdef=graphdef, tgraph=tgraph, segments=segments)
            total, count = total + float(s), count + float(c)
        return total / max(count, 1.0)

    before = held_out_cosine(params)
    rng = np.random.default_rng(seed)
    batches: list[tuple[np.ndarray, np.ndarray]] = []
    losses: list[float] = []
    cosine = before
    bar = _progress(progress)
    t0, c0 = time.perf_counter(), time.process_time()
    if bar is not None:
        bar.start()
        task = bar.add_task("distill", total=steps, loss=math.nan, cosine=before)
    try:
        for i in range(steps):
            if not batches:  # a new epoch: the training texts in a new order, packed again
                ids, seg = _pack([train[j] for j in rng.permutation(len(train))], length, segments)
                batches = [(ids[k : k + batch_size], seg[k : k + batch_size])
                           for k in range(0, len(ids) - batch_size + 1, batch_size)][::-1]  # fmt: skip
            ids, seg = batches.pop()
            params, opt_state, loss = _train_step(
                params, opt_state, frozen, tstate, ids, seg, graphdef=graphdef, tgraph=tgraph, tx=tx,
                token_weight=float(token_weight), segments=segments, worst_weight=float(worst_weight),
            )  # fmt: skip
            losses.append(float(loss))
            if bar is not None:
                if (i + 1) % eval_every == 0 or i + 1 == steps:
                    cosine = held_out_cosine(params)
                bar.update(task, advance=1, loss=losses[-1], cosine=cosine)
    finally:
        if bar is not None:
            bar.stop()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    if adapter_dtype is not None and method == "lora":  # stored in that dtype: measured after the cast
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: x.astype(adapter_dtype) if _is_adapter(path) else x, params
        )
    after = held_out_cosine(params)
    nnx.update(student, params)
    if method == "lora":
        quantized_bytes = nn.param_bytes(quantized)
        adapter_bytes = int(sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(params)))
    else:
        student = nn.freeze_fake_quant(student)
        quantized_bytes, adapter_bytes, rank = nn.param_bytes(student), 0, 0
    report = DistillReport(
        fmt, rank, steps, tuple(losses), before, after, quantized_bytes, adapter_bytes, seconds,
        (len(train), len(evaluation)), cpu_seconds, method, base, init, prepare_seconds, prepare_cpu,
    )  # fmt: skip
    return encoder.replace(model=student), report
