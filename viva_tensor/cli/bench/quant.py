"""The quantization benchmark's core: shared by ``benchmarks/quantization.py`` and ``viva-tensor bench quant``.

1. An ``n x n`` float32 Gaussian matrix: bytes, bits per value, ratio, SQNR, cosine; quantize and
   dequantize throughput (GB/s of float32 input, jitted, warm, ``block_until_ready``); and
   ``quant.dot(x, q)`` against the float32 ``x @ w`` at several batch sizes.
2. All eligible weights of all-MiniLM-L6-v2 (:func:`viva_tensor.cli.report.run_report`).

Targets: quantize >= 1 GB/s; ``quant.dot`` within 1.5x of the float32 matmul at batch >= 16. Timings
are the minimum over the samples of :func:`viva_tensor._benchmarking.time_fn` (the least disturbed run).
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from viva_tensor import quant
from viva_tensor._benchmarking import time_fn
from viva_tensor.cli import report

__all__ = ["best_time", "quality", "bench_matrix", "matrix_table", "minilm_table", "targets", "run"]


def best_time(fn, *args, repeats: int = 5, min_time: float = 0.2) -> float:
    """The minimum per-call wall time of ``fn(*args)`` (:func:`viva_tensor._benchmarking.time_fn`)."""
    return time_fn(fn, *args, repeats=repeats, min_time=min_time).min_s


def quality(x: jax.Array, y: jax.Array) -> tuple[float, float]:
    """(SQNR in dB, cosine) of ``y`` against ``x``, in float64."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    se = float(((x - y) ** 2).sum())
    sqnr = math.inf if se == 0 else 10 * math.log10(float((x * x).sum()) / se)
    return sqnr, float(x @ y / math.sqrt((x @ x) * (y @ y)))


def bench_matrix(
    formats: Sequence[str], n: int, batches: Sequence[int], repeats: int, *, min_time: float = 0.2, log: Any = None
) -> list[dict]:
    """Rows (a float32 row first, then one per format) for an ``n x n`` Gaussian matrix."""
    log = log or (lambda message: print(message, file=sys.stderr))
    w = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    gb = w.nbytes / 1e9
    matmul = jax.jit(lambda a, b: a @ b)
    xs = {b: jax.random.normal(jax.random.key(b), (b, n), jnp.float32) for b in batches}
    timed = lambda fn, *a: best_time(fn, *a, repeats=repeats, min_time=min_time)  # noqa: E731
    f32_times = {b: timed(matmul, xs[b], w) for b in batches}
    rows = []
    for fmt in formats:  # (the float32 row is built last: its times are the best seen)
        spec = quant.format_spec(fmt)
        qf, dqf = jax.jit(spec.quantize), jax.jit(spec.dequantize)
        q = jax.block_until_ready(qf(w))
        y = dqf(q)
        sqnr, cosine = quality(w, y)
        del y
        row = {
            "format": fmt,
            "bytes": q.nbytes,
            "bits_per_value": 8 * q.nbytes / w.size,
            "ratio": w.nbytes / q.nbytes,
            "sqnr_db": sqnr,
            "cosine": cosine,
            "quantize_gbps": gb / timed(qf, w),
            "dequantize_gbps": gb / timed(dqf, q),
        }
        qdot = jax.jit(quant.dot)
        for b in batches:
            # the float32 matmul is timed again right before, so that each ratio compares runs made
            # under the same machine load (the reported float32 time is the best of all)
            t_f32 = timed(matmul, xs[b], w)
            f32_times[b] = min(f32_times[b], t_f32)
            t = timed(qdot, xs[b], q)
            row[f"dot_b{b}_ms"] = 1e3 * t
            row[f"dot_b{b}_vs_f32"] = t / t_f32
        rows.append(row)
        log(f"  {fmt}: done")
    rows.insert(
        0,
        {
            "format": "float32",
            "bytes": w.nbytes,
            "bits_per_value": 32.0,
            "ratio": 1.0,
            "sqnr_db": math.inf,
            "cosine": 1.0,
            **{f"dot_b{b}_ms": 1e3 * f32_times[b] for b in batches},
            **{f"dot_b{b}_vs_f32": 1.0 for b in batches},
        },
    )
    return rows


def _fmt(v, spec=".2f"):
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec) if isinstance(v, float) else str(v)


def matrix_table(rows: list[dict], batches: Sequence[int], n: int) -> str:
    """The matrix rows as a markdown table."""
    head = ["format", "bytes", "bits/value", "ratio", "SQNR dB", "cosine", "quantize GB/s", "dequantize GB/s"]
    head += [f"dot B={b} ms (x f32)" for b in batches]
    lines = [f"### {n} x {n} float32 Gaussian", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["format"],
            f"{r['bytes']:,}",
            f"{r['bits_per_value']:.3f}",
            f"{r['ratio']:.2f}x",
            _fmt(r["sqnr_db"]),
            f"{r['cosine']:.6f}",
            _fmt(r.get("quantize_gbps")),
            _fmt(r.get("dequantize_gbps")),
        ]
        cells += [f"{r[f'dot_b{b}_ms']:.2f} ({r[f'dot_b{b}_vs_f32']:.2f}x)" for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def minilm_table(rows: list[dict]) -> str:
    """The rows of :func:`viva_tensor.cli.report.run_report` as a markdown table (with the embedding
    fidelity columns when they were measured)."""
    emb = any(r.get("embedding_cosine_mean") is not None for r in rows)
    head = ["format", "bytes", "bits/value", "ratio", "SQNR dB", "cosine"]
    head += ["emb cos mean", "emb cos min"] if emb else []
    lines = [
        f"### all-MiniLM-L6-v2: {rows[0]['tensors']} tensors, {rows[0]['values']:,} values",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        line = (
            f"| {r['format']} | {r['bytes']:,} | {r['bits_per_value']:.3f} | {r['ratio']:.2f}x | "
            f"{_fmt(r['sqnr_db'])} | {r['cosine']:.6f} |"
        )
        if emb:
            line += f" {_fmt(r.get('embedding_cosine_mean'), '.5f')} | {_fmt(r.get('embedding_cosine_min'), '.5f')} |"
        lines.append(line)
    return "\n".join(lines)


def targets(rows: list[dict], batches: Sequence[int]) -> str:
    """The targets, met or missed, as a markdown list."""
    lines = ["### Targets", ""]
    for r in rows[1:]:
        q_ok = r["quantize_gbps"] >= 1.0
        big = [b for b in batches if b >= 16]
        d_ok = all(r[f"dot_b{b}_vs_f32"] <= 1.5 for b in big)
        worst = max((r[f"dot_b{b}_vs_f32"] for b in big), default=float("nan"))
        lines.append(
            f"- {r['format']}: quantize {r['quantize_gbps']:.2f} GB/s ({'ok' if q_ok else 'MISSED'} >= 1), "
            f"quant.dot at batch >= 16 worst {worst:.2f}x f32 ({'ok' if d_ok else 'MISSED'} <= 1.5)"
        )
    return "\n".join(lines)


def run(
    formats: Sequence[str] | None = None,
    *,
    size: int = 4096,
    batches: Sequence[int] = (1, 16, 256),
    repeats: int = 5,
    min_time: float = 0.2,
    minilm: bool = True,
    log: Any = None,
) -> tuple[str, dict]:
    """Run the benchmark; returns (the markdown text, ``{"environment", "matrix", "minilm"}``)."""
    log = log or (lambda message: print(message, file=sys.stderr))
    formats = list(formats) if formats else quant.format_names()
    for f in formats:
        quant.format_spec(f)  # an unknown format fails before anything runs
    log(f"{size}x{size} matrix ...")
    mrows = bench_matrix(formats, size, batches, repeats, min_time=min_time, log=log)
    lrows = None
    if minilm:
        log("MiniLM ...")
        start = time.perf_counter()
        lrows = report.run_report(formats=formats, progress=False)
        log(f"  report took {time.perf_counter() - start:.1f} s")
    env = (
        f"jax {jax.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{jax.devices()[0].platform}"
    )
    parts = ["## Quantization benchmark", "", env, "", matrix_table(mrows, batches, size), "", targets(mrows, batches)]
    if lrows:
        parts += ["", minilm_table(lrows)]
    return "\n".join(parts) + "\n", {"environment": env, "matrix": mrows, "minilm": lrows}
