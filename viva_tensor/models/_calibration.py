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
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re

__all__ = ["MODULES", "calibration_text", "calibration_passages"]

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
