"""Blockwise flash attention against jax.nn.dot_product_attention: wall time and compiled memory.

Forward and forward+backward (``value_and_grad`` of the sum), B=1, N=8, H=64, T from 1024 up to
``--max-t``, float32 and bfloat16, causal and not. Memory is XLA's compiled ``temp_size_in_bytes``
measured on ``jax.ShapeDtypeStruct`` inputs (nothing allocated), so jax.nn's column is filled even where
it could not run; a case is only *run* when its compiled footprint (arguments + outputs + temporaries)
fits in ``--budget-gib``.

Writes ``benchmarks/results/attention.md``, ``attention.json`` and ``attention.png`` (log-log memory and
time against T).

    python benchmarks/attention.py --quick          # T = 1024, 2048; seconds
    python benchmarks/attention.py                  # T = 1024 .. 16384
    python benchmarks/attention.py --full           # also runs one head fwd+bwd at T = 131072
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from viva_tensor import flash_attention as fa  # noqa: E402
from viva_tensor import memory  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GIB = 2**30
MIB = 2**20


def _impls(causal):
    return {
        "flash": lambda q, k, v: fa.dot_product_attention(q, k, v, is_causal=causal),
        "jax.nn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal),
    }


def _fwd_bwd(f):
    return jax.value_and_grad(lambda q, k, v: f(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))


def _time(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile + warm up
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def measure(T, dtype, causal, *, heads=8, head_dim=64, repeats=3, budget=3 * GIB, run=True):
    """Rows for one (T, dtype, causal): per implementation and pass, temp bytes and times."""
    shape = jax.ShapeDtypeStruct((1, T, heads, head_dim), jnp.dtype(dtype))
    rows = []
    args = None
    for name, f in _impls(causal).items():
        for mode, g in (("fwd", f), ("fwd+bwd", _fwd_bwd(f))):
            jitted = jax.jit(g)
            mem = memory.compiled_memory(jitted, shape, shape, shape)
            row = dict(impl=name, mode=mode, T=T, dtype=str(jnp.dtype(dtype)), causal=causal, heads=heads,
                       temp_bytes=mem.temp_bytes, total_bytes=mem.total_bytes, wall_s=None, cpu_s=None)
            if run and mem.total_bytes <= budget:
                if args is None:
                    args = [jax.random.normal(jax.random.key(i), shape.shape, shape.dtype) for i in range(3)]
                row["wall_s"], row["cpu_s"] = _time(jitted, args, repeats)
            rows.append(row)
    return rows


def _fmt_bytes(n):
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def _fmt_s(x):
    return "skipped" if x is None else f"{x * 1e3:.0f} ms"


def table(rows):
    """A markdown table with flash and jax.nn side by side, and their ratios."""
    out = ["| dtype | causal | T | pass | flash temp | jax.nn temp | mem ratio | flash time | jax.nn time "
           "| time ratio | flash cpu | jax.nn cpu |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keyed = {(r["dtype"], r["causal"], r["T"], r["mode"], r["impl"], r["heads"]): r for r in rows}
    for (dt, causal, T, mode, impl, heads), r in keyed.items():
        if impl != "flash":
            continue
        o = keyed[(dt, causal, T, mode, "jax.nn", heads)]
        ratio_t = (f"{r['wall_s'] / o['wall_s']:.2f}x" if r["wall_s"] and o["wall_s"] else "-")
        out.append(
            f"| {dt} | {causal} | {T}{'' if heads == 8 else f' (N={heads})'} | {mode} | {_fmt_bytes(r['temp_bytes'])} "
            f"| {_fmt_bytes(o['temp_bytes'])} | 1/{o['temp_bytes'] / max(r['temp_bytes'], 1):.0f} "
            f"| {_fmt_s(r['wall_s'])} | {_fmt_s(o['wall_s'])} | {ratio_t} | {_fmt_s(r['cpu_s'])} | {_fmt_s(o['cpu_s'])} |")
    return "\n".join(out)


def plot(rows, path):
    """Log-log temp memory and wall time against T (float32), flash vs jax.nn, causal and not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl, color in (("flash", "tab:blue"), ("jax.nn", "tab:red")):
        for mode, style in (("fwd", "-"), ("fwd+bwd", "--")):
            for causal, marker in ((False, "o"), (True, "s")):
                sel = sorted((r for r in rows if r["impl"] == impl and r["mode"] == mode and r["causal"] == causal
                              and r["dtype"] == "float32" and r["heads"] == 8), key=lambda r: r["T"])
                if not sel:
                    continue
                label = f"{impl} {mode}{' causal' if causal else ''}"
                axes[0].plot([r["T"] for r in sel], [r["temp_bytes"] / MIB for r in sel], style, marker=marker,
                             color=color, label=label)
                timed = [r for r in sel if r["wall_s"] is not None]
                if timed:
                    axes[1].plot([r["T"] for r in timed], [r["wall_s"] for r in timed], style, marker=marker,
                                 color=color, label=label)
    for ax, title, unit in ((axes[0], "compiled temporary memory", "MiB"), (axes[1], "wall time", "s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(unit)
        ax.set_title(f"{title} (float32, B=1, N=8, H=64)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="T = 1024 and 2048 only")
    p.add_argument("--max-t", type=int, default=16384, help="largest T (powers of two from 1024)")
    p.add_argument("--budget-gib", type=float, default=3.0, help="run a case only if its compiled total fits")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--full", action="store_true", help="also run one head fwd+bwd at T = 131072")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--no-run", action="store_true", help="compiled memory only, run nothing")
    p.add_argument("--run-max-t", type=int, default=None, help="run (time) only T up to this; memory for all")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    budget = int(args.budget_gib * GIB)
    max_t = min(args.max_t, 2048) if args.quick else args.max_t
    lengths = [t for t in (1024, 2048, 4096, 8192, 16384, 32768) if t <= max_t]
    rows = []
    for dtype in args.dtypes.split(","):
        for causal in (False, True):
            for T in lengths:
                run = not args.no_run and (args.run_max_t is None or T <= args.run_max_t)
                new = measure(T, dtype, causal, repeats=args.repeats, budget=budget, run=run)
                rows += new
                for r in new:
                    print(f"{r['dtype']:8} causal={r['causal']!s:5} T={T:6} {r['impl']:6} {r['mode']:7} "
                          f"temp {_fmt_bytes(r['temp_bytes']):>10}  wall {_fmt_s(r['wall_s']):>8}  "
                          f"cpu {_fmt_s(r['cpu_s']):>8}", flush=True)
    # One head at T = 131072: memory from compiling; run only with --full (jax.nn needs ~64 GiB of logits).
    big = measure(131072, "float32", True, heads=1, repeats=1, budget=24 * GIB, run=args.full and not args.no_run)
    big = [r for r in big if r["mode"] == "fwd+bwd"]
    for r in big:
        if r["impl"] == "jax.nn":
            r["wall_s"] = r["cpu_s"] = None  # never run: its temporaries exceed any budget here
    rows += big
    md = table(rows)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    header = (f"# Attention benchmark\n\n`python benchmarks/attention.py {' '.join(argv or sys.argv[1:])}` on "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, "
              f"{jax.devices()[0].platform}. Temp = XLA compiled temporaries (ShapeDtypeStruct, nothing "
              f"allocated); times: median wall and process CPU time; 'skipped' = compiled footprint over "
              f"{args.budget_gib} GiB (or not run). B=1, N=8, H=64 unless noted.\n\n")
    with open(os.path.join(args.out, "attention.md"), "w") as fh:
        fh.write(header + md + "\n")
    with open(os.path.join(args.out, "attention.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    plot(rows, os.path.join(args.out, "attention.png"))
    return rows


if __name__ == "__main__":
    main()
