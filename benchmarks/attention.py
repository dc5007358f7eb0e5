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
import sys

import jax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from viva_tensor.cli.bench import attention as _core  # noqa: E402 - the core, shared with `viva-tensor bench`
from viva_tensor.cli.bench.attention import GIB, MIB, measure, table  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
_fmt_bytes, _fmt_s = _core._fmt_bytes, _core._fmt_s


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
