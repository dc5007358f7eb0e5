"""Quantization benchmark: sizes, errors, throughput and the quantized matmul, per format.

1. A 4096 x 4096 float32 Gaussian matrix: bytes, bits per value, ratio, SQNR, cosine; quantize and
   dequantize throughput (GB/s of float32 input, jitted, warm, ``block_until_ready``); and
   ``quant.dot(x, q)`` against the float32 ``x @ w`` at batch 1, 16 and 256.
2. All eligible weights of all-MiniLM-L6-v2 (``viva_tensor.report.run_report``).

Targets: quantize >= 1 GB/s; ``quant.dot`` within 1.5x of the float32 matmul at batch >= 16.

Run: ``python benchmarks/quantization.py [--quick]``; writes ``benchmarks/results/quantization.md`` and
``.json``. Timings are the minimum over repeats (the least disturbed run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from viva_tensor import quant, report  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def best_time(fn, *args, repeats: int = 5, min_time: float = 0.2) -> float:
    """Minimum wall time of ``fn(*args)`` (warm, blocking), over ``repeats`` batches."""
    jax.block_until_ready(fn(*args))  # compile and warm
    times = []
    for _ in range(repeats):
        n, start = 0, time.perf_counter()
        while True:
            jax.block_until_ready(fn(*args))
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time / repeats or n >= 50:
                break
        times.append(elapsed / n)
    return min(times)


def quality(x: jax.Array, y: jax.Array) -> tuple[float, float]:
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    se = float(((x - y) ** 2).sum())
    sqnr = math.inf if se == 0 else 10 * math.log10(float((x * x).sum()) / se)
    return sqnr, float(x @ y / math.sqrt((x @ x) * (y @ y)))


def bench_matrix(formats, n: int, batches, repeats: int) -> list[dict]:
    w = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    gb = w.nbytes / 1e9
    matmul = jax.jit(lambda a, b: a @ b)
    xs = {b: jax.random.normal(jax.random.key(b), (b, n), jnp.float32) for b in batches}
    f32_times = {b: best_time(matmul, xs[b], w, repeats=repeats) for b in batches}
    rows = []
    for fmt in formats:  # (the float32 row is built last: its times are the best seen)
        spec = quant.FORMATS[fmt]
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
            "quantize_gbps": gb / best_time(qf, w, repeats=repeats),
            "dequantize_gbps": gb / best_time(dqf, q, repeats=repeats),
        }
        qdot = jax.jit(quant.dot)
        for b in batches:
            # the float32 matmul is timed again right before, so that each ratio compares runs made
            # under the same machine load (the reported float32 time is the best of all)
            t_f32 = best_time(matmul, xs[b], w, repeats=repeats)
            f32_times[b] = min(f32_times[b], t_f32)
            t = best_time(qdot, xs[b], q, repeats=repeats)
            row[f"dot_b{b}_ms"] = 1e3 * t
            row[f"dot_b{b}_vs_f32"] = t / t_f32
        rows.append(row)
        print(f"  {fmt}: done", file=sys.stderr)
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


def matrix_table(rows, batches, n) -> str:
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


def minilm_table(rows) -> str:
    head = ["format", "bytes", "bits/value", "ratio", "SQNR dB", "cosine"]
    lines = [
        f"### all-MiniLM-L6-v2: {rows[0]['tensors']} tensors, {rows[0]['values']:,} values",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        lines.append(
            f"| {r['format']} | {r['bytes']:,} | {r['bits_per_value']:.3f} | {r['ratio']:.2f}x | "
            f"{_fmt(r['sqnr_db'])} | {r['cosine']:.6f} |"
        )
    return "\n".join(lines)


def targets(rows, batches) -> str:
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (noisy)")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("-f", "--format", action="append", dest="formats")
    parser.add_argument("--no-minilm", action="store_true")
    args = parser.parse_args(argv)
    formats = args.formats or quant.format_names()
    batches = (1, 16, 256)
    repeats = 2 if args.quick else 5
    print(f"{args.size}x{args.size} matrix ...", file=sys.stderr)
    mrows = bench_matrix(formats, args.size, batches, repeats)
    lrows = None
    if not args.no_minilm:
        print("MiniLM ...", file=sys.stderr)
        start = time.perf_counter()
        lrows = report.run_report(formats=formats, progress=False)
        print(f"  report took {time.perf_counter() - start:.1f} s", file=sys.stderr)
    env = f"jax {jax.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {jax.devices()[0].platform}"
    parts = ["## Quantization benchmark", "", env, "", matrix_table(mrows, batches, args.size), "", targets(mrows, batches)]
    if lrows:
        parts += ["", minilm_table(lrows)]
    text = "\n".join(parts) + "\n"
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "quantization.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(RESULTS, "quantization.json"), "w") as fh:
        json.dump({"environment": env, "matrix": mrows, "minilm": lrows}, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
