"""Blockwise flash attention against jax.nn.dot_product_attention: wall time and compiled memory.

Forward and forward+backward (``value_and_grad`` of the sum), B=1, N=8, H=64, T from 1024 up to
``--max-t``, float32 and bfloat16, causal and not. Memory is XLA's compiled ``temp_size_in_bytes``
measured on ``jax.ShapeDtypeStruct`` inputs (nothing allocated), so jax.nn's column is filled even where
it could not run; a case is only *run* when its compiled footprint (arguments + outputs + temporaries)
fits in ``--budget-gib``. Times: median wall and CPU time of ``viva_tensor._benchmarking.time_fn``.

Writes ``benchmarks/results/attention.md``, ``attention.json`` and ``attention.png`` (log-log memory and
time against T); ``--gpu`` writes ``gpu.md``/``gpu.json`` (flash against jax.nn forced to ``xla`` and
``cudnn``, bfloat16, T up to 32768, budget 80% of the device's memory).

    python benchmarks/attention.py --quick          # T = 256, float32; seconds (results/quick)
    python benchmarks/attention.py                  # T = 1024 .. 16384
    python benchmarks/attention.py --full           # also runs one head fwd+bwd at T = 131072
    python benchmarks/attention.py --gpu            # on a GPU: flash vs xla vs cudnn (benchmarks/gpu.sh)
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402 - puts the repository first on sys.path
import jax  # noqa: E402

from viva_tensor.cli.bench import attention as core  # noqa: E402 - the core, shared with `viva-tensor bench`
from viva_tensor.cli.bench.attention import GIB, MIB, measure, table  # noqa: E402


def plot(rows, path):
    """Log-log temp memory and wall time against T (float32), flash vs jax.nn, causal and not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

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
    lengths = sorted({r["T"] for r in rows if r["dtype"] == "float32" and r["heads"] == 8})
    for ax, title, unit in ((axes[0], "compiled temporary memory", "MiB"), (axes[1], "wall time", "s")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(lengths))  # one tick per measured T, written out
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(unit)
        ax.set_title(f"{title} (float32, B=1, N=8, H=64)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _lengths(args) -> list[int]:
    if args.quick:
        return [256]
    top = args.max_t or (32768 if args.gpu else 16384)
    return [t for t in (1024, 2048, 4096, 8192, 16384, 32768) if t <= top]


def main(argv=None):
    p = _common.parser(__doc__)
    count, number = _common.positive_int, _common.positive_float  # 0, -5, nan: usage errors (exit 2)
    p.add_argument("--max-t", type=count, default=None, help="largest T (powers of two from 1024; default 16384)")
    p.add_argument("--budget-gib", type=number, default=None, help="run a case only if its compiled total fits")
    p.add_argument("--repeats", type=count, default=None, help="timed runs (default 3; 1 with --quick)")
    p.add_argument("--full", action="store_true", help="also run one head fwd+bwd at T = 131072")
    p.add_argument("--dtypes", default=None, help="default float32,bfloat16 (bfloat16 with --gpu)")
    p.add_argument("--gpu", action="store_true", help="flash vs jax.nn's xla and cudnn implementations")
    p.add_argument("--impls", default=None, help=f"comma-separated, from {','.join(core.IMPLEMENTATIONS)}")
    p.add_argument("--no-run", action="store_true", help="compiled memory only, run nothing")
    p.add_argument("--run-max-t", type=count, default=None, help="run (time) only T up to this; memory for all")
    args = p.parse_args(argv)
    impls = tuple((args.impls or ("flash,xla,cudnn" if args.gpu else "flash,jax.nn")).split(","))
    dtypes = (args.dtypes or ("float32" if args.quick else "bfloat16" if args.gpu else "float32,bfloat16")).split(",")
    repeats = args.repeats or (1 if args.quick else 5 if args.gpu else 3)
    if args.budget_gib is not None:
        budget = int(args.budget_gib * GIB)
    elif args.gpu and jax.default_backend() != "cpu":
        budget = int(0.8 * (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 16 * GIB))
    else:
        budget = 3 * GIB
    print(f"devices: {jax.devices()}", file=sys.stderr, flush=True)
    rows = []
    for dtype in dtypes:
        for causal in (False, True):
            for T in _lengths(args):
                run = not args.no_run and (args.run_max_t is None or T <= args.run_max_t)
                new = measure(T, dtype, causal, repeats=repeats, budget=budget, run=run, impls=impls)
                rows += new
                for r in new:
                    print(f"{r['dtype']:8} causal={r['causal']!s:5} T={T:6} {r['impl']:6} {r['mode']:7} "
                          f"temp {core._fmt_bytes(r['temp_bytes']):>10}  wall {core._fmt_s(r['wall_s']):>8}  "
                          f"cpu {core._fmt_s(r['cpu_s']):>8} {r['note'] or ''}", flush=True)
    if not (args.quick or args.gpu):
        # One head at T = 131072: memory from compiling; run only with --full (jax.nn needs ~64 GiB of logits).
        big = measure(131072, "float32", True, heads=1, repeats=1, budget=24 * GIB, run=args.full and not args.no_run)
        big = [r for r in big if r["mode"] == "fwd+bwd"]
        for r in big:
            if r["impl"] == "jax.nn":
                r["wall_s"] = r["cpu_s"] = None  # never run: its temporaries exceed any budget here
        rows += big
    md = table(rows) if impls == ("flash", "jax.nn") else core.wide_table(rows, impls)
    print(md)
    name = "gpu" if args.gpu else "attention"
    title = "GPU attention benchmark" if args.gpu else "Attention benchmark"
    header = (f"# {title}\n\nTemp = XLA compiled temporaries (ShapeDtypeStruct, nothing allocated); times: "
              f"median wall and process CPU time of {repeats} runs after a warm-up; 'skipped' = compiled "
              f"footprint over {budget / GIB:.1f} GiB (or not run). B=1, N=8, H=64 unless noted.\n\n")
    md_path, _ = _common.write_results(name, header + md, rows, quick=args.quick, out=args.out)
    if not args.gpu:
        plot(rows, md_path.with_suffix(".png"))
    return rows


if __name__ == "__main__":
    main()
