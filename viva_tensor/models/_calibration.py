"""Calibration text with no data set: English sentences from the docstrings of Python's standard library.

GPTQ, AWQ and a bit planner need a layer's real inputs, so a model must read some real text. There is no
data set on this machine, but every Python installation ships thousands of sentences of plain English:
the docstrings of its standard library. They are read from the source files with :mod:`ast` (nothing is
imported or run), in a fixed order of modules, cut into sentences, and filtered to prose (no code, no
doctest lines, no markup). The text is the same for a given Python version; it never contains the
evaluation sentences of ``tests/data`` (tested).

Short sentences only reach the first ~60 token positions; :func:`calibration_passages` joins
consecutive sentences into passages of ~230 tokens, as GPTQ's own calibration uses long text chunks.
Which suits a model depends on what it will read. Measured on MiniLM with GPTQ on all 36 kernels
(``benchmarks/results/gptq_layers*.md``): 512 short sentences gave the best embedding cosine on the
evaluation sentences (int4 groups of 128: mean 0.963, round to nearest 0.945); 128 passages gave lower
per-layer errors on those sentences' inputs (34 of 36 layers below round to nearest, against several
layers above it with 64 short sentences) but a cosine no better than round to nearest (0.947).

Whole-model GPTQ (issue 14, ``nn.quantize_model(..., method="gptq")``, 512 short sentences, 32 evaluation
sentences, cosine to the original model; measured with the code of this branch): int4 groups of 128 one-shot
0.9626 mean / 0.916 min / 29 of 32 same nearest neighbour; sequential (each group on the quantized model's
inputs) 0.9639 / 0.889 / 29; one-shot with act_order + static_groups 0.9634 / 0.894 / 28; NVFP4 one-shot
0.9749 / 0.928 / 30 (round to nearest: 0.977 in the issue's table). The planner at 4.5 bits/value
(``minilm.quantize(encoder, bits=4.5)``: int4 g128 / NVFP4 / Q8_0 per layer) 0.9769 / 0.923 / 29 with GPTQ,
0.9737 / 0.912 / 30 with round to nearest; int4 g128 GPTQ with NF4 embeddings: 7.31x smaller, 0.9587 / 0.908.
Our reading (not proven): the docstring text is the limit here; the error feedback fits the calibration
distribution, and these sentences are not the evaluation's.

:func:`calibration_mix` (the default of ``minilm.quantize`` since) interleaves three sources that ship with
the installation: docstring sentences, sentences of the installed packages' READMEs (:func:`package_sentences`,
their ``METADATA`` long descriptions with the markup stripped), and texts of one to four words
(:func:`short_texts`), then the packages' one-line summaries. Measured (GPTQ int4 groups of 128, one-shot, damp
0.01, 32 evaluation sentences, cosine to the original model): 512 docstring sentences 0.9626 mean / 0.916 min;
512 README sentences 0.9663 / 0.918; 384 docstring + 128 short 0.9642 / 0.911; the mix (626 texts) 0.9678 /
0.930. With ``damp=0.1`` and ``mse=True`` on the mix: 0.9722 / 0.933. Weighting each sentence's tokens by
1 / length (the mean pooling's weights) did worse (0.9659 / 0.897).
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import re

__all__ = [
    "MODULES", "PACKAGES", "calibration_text", "calibration_passages", "package_sentences", "package_summaries",
    "short_texts", "varied_sentences", "calibration_mix",
]  # fmt: skip

MODULES = (
    "argparse", "asyncio.events", "asyncio.tasks", "bisect", "calendar", "collections", "concurrent.futures._base",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message",
    "enum", "fractions", "ftplib", "functools", "gettext", "glob", "gzip", "heapq", "hmac", "html.parser",
    "http.client", "http.cookiejar", "imaplib", "inspect", "ipaddress", "json.decoder", "json.encoder", "logging",
    "mailbox", "mimetypes", "multiprocessing.pool", "netrc", "numbers", "optparse", "os", "pathlib", "pickle",
    "pprint", "queue", "random", "sched", "selectors", "shlex", "shutil", "smtplib", "socket", "socketserver",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "traceback", "typing", "unittest.case", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref",
    "wave", "webbrowser", "zipfile",
)  # fmt: skip
"""Standard-library modules whose docstrings are read, in this order."""

_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE = re.compile(r">>>|\.\.\.|::|`|=|\(|\)|\[|\]|\{|\}|<|>|\*|_|\\|/|\||#|@|\$|%|\^|~|\d\.\d")


def _docstrings(module: str) -> list[str]:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return []
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return [d for d in (ast.get_docstring(n) for n in nodes) if d]


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    if not 6 <= len(words) <= 40 or not sentence.endswith(".") or not sentence[0].isupper():
        return False
    if _CODE.search(sentence):
        return False
    letters = sum(c.isalpha() for c in sentence)
    return letters >= 0.8 * sum(not c.isspace() for c in sentence)


@functools.lru_cache(maxsize=1)
def _all_sentences() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for module in MODULES:
        for doc in _docstrings(module):
            for paragraph in re.split(r"\n\s*\n", doc):
                for sentence in _SPLIT.split(" ".join(paragraph.split())):
                    if _is_prose(sentence):
                        seen.setdefault(sentence, None)
    return tuple(seen)


def calibration_text(n: int | None = None) -> list[str]:
    """Deterministic English sentences from the standard library's docstrings (calibration data).

    Args:
        n: how many (the first ``n``); ``None`` for all of them (a few thousand).

    Returns:
        A list of distinct sentences, the same on every call for a given Python version.

    Example:
        >>> sentences = calibration_text(3)
        >>> len(sentences), all(s.endswith(".") for s in sentences)
        (3, True)
    """
    sentences = _all_sentences()
    return list(sentences if n is None else sentences[:n])


def calibration_passages(n: int | None = None, *, words: int = 170) -> list[str]:
    """Consecutive sentences of :func:`calibration_text` joined into passages of just over ``words`` words.

    Args:
        n: how many passages (the first ``n``); ``None`` for all.
        words: a passage ends at the first sentence that takes it past this many words (170 words are
            about 230 MiniLM tokens, under its 256-token limit).

    Returns:
        A list of passages, deterministic for a given Python version.

    Example:
        >>> p = calibration_passages(2)
        >>> len(p), all(len(s.split()) > 170 for s in p)
        (2, True)
    """
    passages, current, count = [], [], 0
    for sentence in _all_sentences():
        current.append(sentence)
        count += len(sentence.split())
        if count > words:
            passages.append(" ".join(current))
            current, count = [], 0
            if n is not None and len(passages) == n:
                break
    return passages


# ----------------------------------------------------------------------------------------- package READMEs

PACKAGES = (
    "jax", "flax", "chex", "numpy", "safetensors", "rich", "optax", "tokenizers", "matplotlib", "pytest", "hypothesis",
    "nbclient", "ipykernel", "gguf", "absl-py", "etils", "msgpack", "typing_extensions", "treescope", "markdown-it-py",
    "ml_dtypes", "opt_einsum", "scipy", "pillow", "packaging", "jupyter_client", "traitlets", "psutil", "attrs",
    "sortedcontainers", "pyparsing", "python-dateutil", "toolz", "tensorstore", "pluggy", "jedi", "parso",
    "prompt_toolkit", "wcwidth", "platformdirs", "jsonschema", "humanize", "fsspec", "tqdm", "requests", "urllib3",
    "idna", "charset_normalizer", "stack_data", "executing", "pure_eval", "simplejson",
)  # fmt: skip
"""Distributions whose ``METADATA`` (the long description: the package's README) is read, in this order: the
library's dependencies and those of its ``test`` and ``examples`` extras (what ``pip install -e
'.[test,examples]'`` installs). One that is not installed is skipped."""

_FENCE = re.compile(r"^\s*(```|~~~)")
_RULE = re.compile(r"[=\-~^*#+`]{3,}")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_IMAGE = re.compile(r"!\[[^\]]*\]\([^)]*\)")
_SKIP_LINE = ("..", ">>>", "|", "$ ", "pip ", "<", "[!", "!", "- [")


def _strip_markup(text: str) -> str:
    """Markdown / reStructuredText to plain lines: code blocks, tables, directives and rules removed, links
    and emphasis reduced to their text, list and heading markers dropped (a removed line ends a paragraph)."""
    lines, fenced = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if _FENCE.match(line):
            fenced = not fenced
            lines.append("")
            continue
        if fenced or line.startswith(("    ", "\t")) or stripped.startswith(_SKIP_LINE) or _RULE.fullmatch(stripped):
            lines.append("")
            continue
        stripped = _LINK.sub(r"\1", _IMAGE.sub("", stripped))
        stripped = re.sub(r"`([^`]+)`_", r"\1", stripped)
        stripped = re.sub(r"\*\*([^*]+)\*\*", r"\1", stripped)
        lines.append(re.sub(r"^[#*+-] +|^\d+\. +", "", stripped))
    return "\n".join(lines)


def _metadata(name: str) -> tuple[str, str]:
    try:
        meta = importlib.metadata.metadata(name)
    except importlib.metadata.PackageNotFoundError:
        return "", ""
    return (meta.get_payload() or meta.get("Description") or ""), (meta.get("Summary") or "").strip()


@functools.lru_cache(maxsize=1)
def _package_text() -> tuple[tuple[str, ...], tuple[str, ...]]:
    sentences: dict[str, None] = {}
    summaries: dict[str, None] = {}
    for name in PACKAGES:
        description, summary = _metadata(name)
        if summary:
            summaries.setdefault(summary, None)
        for paragraph in re.split(r"\n\s*\n", _strip_markup(description)):
            for sentence in _SPLIT.split(" ".join(paragraph.split())):
                if _is_prose(sentence):
                    sentences.setdefault(sentence, None)
    return tuple(sentences), tuple(summaries)


def package_sentences(n: int | None = None) -> list[str]:
    """English sentences from the READMEs of installed packages (their ``METADATA`` long descriptions).

    The distributions of :data:`PACKAGES` that are installed, in that order; markup stripped, cut into
    sentences and filtered to prose as :func:`calibration_text`. The text is that of the installed versions
    (a few hundred sentences with this project's dependencies); none when no package is installed.

    Args:
        n: how many (the first ``n``); ``None`` for all.

    Returns:
        A list of distinct sentences.

    Example:
        >>> s = package_sentences(2)
        >>> len(s) <= 2 and all(t.endswith(".") for t in s)
        True
    """
    sentences = _package_text()[0]
    return list(sentences if n is None else sentences[:n])


def package_summaries() -> list[str]:
    """The one-line ``Summary`` of each installed distribution of :data:`PACKAGES` (short phrases).

    Returns:
        A list of distinct summaries, in the order of :data:`PACKAGES`.

    Example:
        >>> all(isinstance(s, str) and s for s in package_summaries())
        True
    """
    return list(_package_text()[1])


def short_texts(n: int, *, skip: int = 1000) -> list[str]:
    """Texts of one to four words: the first words of docstring sentences (1, 2, 3, 4, 1, ... words).

    A sentence encoder also reads one-word queries, whose few tokens meet the model's layers in states
    that long sentences never produce. These come from :func:`calibration_text` after its first ``skip``
    sentences (so that they are not cut from the sentences calibrated on whole).

    Args:
        n: how many.
        skip: sentences of :func:`calibration_text` to pass over first.

    Returns:
        A list of ``n`` short texts (fewer if the text runs out).

    Example:
        >>> [len(t.split()) for t in short_texts(5)]
        [1, 2, 3, 4, 1]
    """
    out = []
    for i, sentence in enumerate(calibration_text()[skip : skip + n]):
        out.append(" ".join(sentence.rstrip(".").split()[: 1 + i % 4]))
    return out


def _is_varied(sentence: str) -> bool:
    words = sentence.split()
    if not 4 <= len(words) <= 60 or sentence.startswith((">>>", "...", "$", "|")):
        return False
    alphabetic = sum(1 for w in words if w.strip(".,;:!?()[]'\"").isalpha())
    return 2 * alphabetic >= len(words) and not _is_prose(sentence)


@functools.lru_cache(maxsize=1)
def _varied() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for module in MODULES:
        for doc in _docstrings(module):
            for paragraph in re.split(r"\n\s*\n", doc):
                for sentence in _SPLIT.split(" ".join(paragraph.split())):
                    if _is_varied(sentence):
                        seen.setdefault(sentence, None)
    return tuple(seen)


def varied_sentences(n: int | None = None) -> list[str]:
    """Docstring sentences that :func:`calibration_text` leaves out as not plain prose: mostly words, but with
    digits, symbols, parentheses, quotes or code names (``"Return the value (default 0) of x."``).

    A sentence encoder reads numbers, punctuation and names as well as prose; these tokens meet the model's
    layers in states that filtered prose does not produce. Sentences of 4 to 60 words whose words are at least
    half alphabetic, not doctest lines; read like :func:`calibration_text` (``ast``, :data:`MODULES`). Measured
    (MiniLM, GPTQ int4 g128 one-shot, ``calibration_mix()`` plus 192 of these, 32 evaluation sentences): mean /
    min cosine 0.9724 / 0.947, 29 of 32 same nearest neighbour, against 0.9721 / 0.933 / 28 without; on held-out
    calibration text 0.9845 against 0.9842: too small a gain to change the default. (Adding 64 passages of
    :func:`calibration_passages` helped long held-out texts, 0.962 to 0.985, and hurt short ones: 0.9702 mean.)

    Args:
        n: how many (the first ``n``); ``None`` for all.

    Returns:
        A list of distinct sentences, disjoint from :func:`calibration_text`.

    Example:
        >>> s = varied_sentences(3)
        >>> len(s), all(len(t.split()) >= 4 for t in s)
        (3, True)
    """
    sentences = _varied()
    return list(sentences if n is None else sentences[:n])


def calibration_mix(per_source: int = 192) -> list[str]:
    """The default calibration text of :func:`viva_tensor.models.minilm.quantize`: three sources interleaved.

    One standard-library docstring sentence, one package README sentence, one short text (1 to 4 words),
    repeated ``per_source`` times, then the packages' one-line summaries. Where the READMEs run out (fewer
    packages installed), docstring sentences take their places, so the count stays ``3 * per_source``
    (plus the summaries). Never the evaluation sentences of ``tests/data`` (tested).

    Args:
        per_source: texts taken from each source.

    Returns:
        The list of texts, deterministic for a given Python and set of installed package versions.

    Example:
        >>> texts = calibration_mix(4)
        >>> len(texts) >= 12 and len(texts[2].split()) == 1
        True
    """
    docs = calibration_text()
    readme = package_sentences(per_source)
    spare = iter(docs[per_source : per_source + per_source - len(readme)])
    readme += list(spare)
    short = short_texts(per_source)
    texts = []
    for triple in zip(docs[:per_source], readme, short, strict=False):
        texts.extend(triple)
    return texts + package_summaries()
