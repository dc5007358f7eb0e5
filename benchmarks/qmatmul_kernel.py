"""The compiled CPU quantized-matmul kernel (viva_tensor._kernels.qmatmul) against the float32 matmul, same run.

For a 4096 x 4096 weight, batch 1, 16 and 256, every 4-bit table layout and int8, both weight layouts
(``nk``: weight (N, K) contracted on K, the checkpoint layout; ``kn``: weight (K, N), ``y = x @ w``): milliseconds
(minimum over repeats, jitted, warm, ``block_until_ready``; all functions of one batch take turns, round after
round, so that a loaded machine slows them alike), the ratio to the float32 matmul in its best layout at
that batch (``jnp.einsum("bk,nk->bn")`` or ``x @ w``, whichever is faster in this run), and GB/s of the bytes the
kernel reads for the weight (codes + float32 scales + offsets).

Targets (issue 13): B=1 4-bit >= 2.0x faster than float32 (ratio <= 0.5), int8 >= 1.5x (ratio <= 0.667);
B=16 ratio <= 1.0; B=256 ratio <= 1.15.

Run: ``python benchmarks/qmatmul_kernel.py [--quick] [--size 4096] [--batch 1 --batch 16]``; writes
``benchmarks/results/qmatmul_kernel.md`` and ``.json`` (not with ``--quick`` unless ``--write``).
"""

from __future__ import annotations

import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402 - puts the repository first on sys.path
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from viva_tensor import _kernels  # noqa: E402

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
NF4 = np.linspace(-1, 1, 16).astype(np.float32)  # speed does not depend on the table's values
# name: (layout, table, block (0 = one per row), offsets)
FORMATS = {
    "nf4": ("high_first", NF4, 64, False),
    "nvfp4": ("low_first", E2M1, 16, False),
    "mxfp4": ("low_first", E2M1, 32, False),
    "int4_group": ("low_first", np.arange(16, dtype=np.float32), 128, True),
    "q4_0": ("ggml", np.arange(16, dtype=np.float32) - 8, 32, False),
    "q4_1": ("ggml", np.arange(16, dtype=np.float32), 32, True),
    "q8_0": ("int8", None, 32, False),
    "int8": ("int8", None, 0, False),
}
TARGET = {1: {"4bit": 0.5, "int8": 1 / 1.5}, 16: 1.0, 256: 1.15}


def _time(f, *args, repeats: int) -> float:
    f(*args).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(*args).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def _planes(rng, name, rows, packed):
    layout, table, block, with_off = FORMATS[name]
    block = block or packed
    if layout == "int8":
        codes = jnp.asarray(rng.integers(-127, 128, (rows, packed), dtype=np.int8))
    else:
        codes = jnp.asarray(rng.integers(0, 256, (rows, packed // 2), dtype=np.uint8))
    scales = jnp.asarray(rng.uniform(0.01, 0.02, (rows, packed // block)).astype(np.float32))
    offsets = jnp.asarray(rng.normal(size=(rows, packed // block)).astype(np.float32)) if with_off else None
    nbytes = codes.nbytes + scales.nbytes + (0 if offsets is None else offsets.nbytes)
    return layout, table, block, codes, scales, offsets, nbytes


def _interleaved(fns: dict, repeats: int) -> dict:
    """Minimum time of each function, the functions taking turns round after round (the load hits them alike)."""
    for f, args in fns.values():
        f(*args).block_until_ready()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, (f, args) in fns.items():
            t = time.perf_counter()
            f(*args).block_until_ready()
            best[k] = min(best[k], time.perf_counter() - t)
    return {k: v * 1e3 for k, v in best.items()}


def run(size: int, batches, formats, repeats: int):
    rng = np.random.default_rng(0)
    n = k = size
    w = jnp.asarray(rng.normal(size=(n, k)).astype(np.float32))
    f32 = {"nk": jax.jit(lambda x, w: jnp.einsum("bk,nk->bn", x, w)), "kn": jax.jit(lambda x, w: x @ w)}
    planes = {(name, lay): _planes(rng, name, n if lay == "nk" else k, k if lay == "nk" else n)
              for name in formats for lay in ("nk", "kn")}
    rows = []
    for b in batches:
        x = jnp.asarray(rng.normal(size=(b, k)).astype(np.float32))
        fns = {("float32", lay): (f, (x, w)) for lay, f in f32.items()}
        for (name, lay), (layout, table, block, codes, scales, offsets, _nbytes) in planes.items():

            def f(x, codes, scales, offsets, layout=layout, table=table, block=block, lay=lay):
                return _kernels.qmatmul(x, codes, table, scales, offsets, layout=layout, block_size=block,
                                        weight_layout=lay)

            fns[(name, lay)] = (jax.jit(f), (x, codes, scales, offsets))
        times = _interleaved(fns, repeats)
        best = min(times[("float32", lay)] for lay in f32)
        for (name, lay), t in times.items():
            nbytes = w.nbytes if name == "float32" else planes[(name, lay)][-1]
            path = "xla" if name == "float32" else (
                ("panels+xla" if b >= _kernels.PANEL_BATCH else "kernel") if _kernels.available() else "pure-jax")
            rows.append(dict(batch=b, format=name, weight_layout=lay, ms=t, ratio=t / best, gbps=nbytes / t / 1e6,
                             path=path))
            print(f"B={b:4d} {name:11s} {lay}  {t:8.3f} ms  {t / best:6.3f}x of float32  {nbytes / t / 1e6:6.1f} GB/s",
                  flush=True)
    return rows


def choose(size: int, batches, repeats: int):
    """The measurement behind PANEL_BATCH: nf4, fused kernel vs decoded panels + XLA's GEMM, per batch and layout."""
    rng = np.random.default_rng(1)
    layout, table, block, codes, scales, offsets, nbytes = _planes(rng, "nf4", size, size)
    w = jnp.asarray(rng.normal(size=(size, size)).astype(np.float32))
    f32 = {"nk": jax.jit(lambda x, w: jnp.einsum("bk,nk->bn", x, w)), "kn": jax.jit(lambda x, w: x @ w)}
    rows, saved = [], _kernels.PANEL_BATCH
    try:
        for b in batches:
            x = jnp.asarray(rng.normal(size=(b, size)).astype(np.float32))
            fns = {f"float32_{lay}": (f, (x, w)) for lay, f in f32.items()}
            for lay in ("nk", "kn"):
                for path, threshold in (("fused", 1 << 30), ("panels", 1)):
                    _kernels.PANEL_BATCH = threshold  # read when traced: each jit below keeps its path
                    f = jax.jit(lambda x, c, s, lay=lay: _kernels.qmatmul(x, c, table, s, layout=layout,
                                                                          block_size=block, weight_layout=lay))
                    f(x, codes, scales).block_until_ready()
                    fns[f"{lay}_{path}"] = (f, (x, codes, scales))
            times = _interleaved(fns, repeats)
            row = dict(batch=b, float32=min(times["float32_nk"], times["float32_kn"]),
                       **{k: v for k, v in times.items() if not k.startswith("float32")})
            print(f"B={b:4d} " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "batch"), flush=True)
            rows.append(row)
    finally:
        _kernels.PANEL_BATCH = saved
    lines = ["| batch | best float32 ms | nk fused ms | nk panels ms | kn fused ms | kn panels ms |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['float32']:.3f} | {r['nk_fused']:.3f} | {r['nk_panels']:.3f} | "
              f"{r['kn_fused']:.3f} | {r['kn_panels']:.3f} |" for r in rows]
    return rows, "\n".join(lines)


def _target(row) -> str:
    if row["format"] == "float32":
        return ""
    tgt = TARGET.get(row["batch"])
    if isinstance(tgt, dict):
        tgt = tgt["int8" if FORMATS[row["format"]][0] == "int8" else "4bit"]
    if tgt is None:
        return ""
    return ("ok" if row["ratio"] <= tgt else "MISS") + f" (<= {tgt:.3g})"


def table(rows) -> str:
    lines = ["| batch | format | weight layout | path | ms | ratio to best float32 | GB/s of weight bytes | target |",
             "|---:|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['format']} | {r['weight_layout']} | {r['path']} | {r['ms']:.3f} | "
                     f"{r['ratio']:.3f} | {r['gbps']:.1f} | {_target(r)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = _common.parser(__doc__)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--batch", type=int, action="append", dest="batches")
    parser.add_argument("-f", "--format", action="append", dest="formats", choices=sorted(FORMATS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--choose", action="store_true", help="also time fused vs panels at B=1..64 (nf4)")
    args = parser.parse_args(argv)
    batches = args.batches or ([1, 16] if args.quick else [1, 16, 256])
    repeats = 3 if args.quick else args.repeats
    rows = run(args.size, batches, args.formats or list(FORMATS), repeats)
    chosen, chosen_text = choose(args.size, [1, 2, 4, 8, 16, 32, 64], repeats) if args.choose else ([], "")
    text = (f"# qmatmul kernel, {args.size}x{args.size}, min of {repeats}\n\n"
            f"kernels available: {_kernels.available()}, threads: {_kernels.threads()}, "
            f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f}\n\n"
            + table(rows) + "\n")
    if chosen:
        text += f"\nPaths by batch (PANEL_BATCH = {_kernels.PANEL_BATCH}: panels from there on)\n\n{chosen_text}\n"
    print(text)
    _common.write_results("qmatmul_kernel", text, {"size": args.size, "repeats": repeats, "rows": rows,
                                                   "paths": chosen}, out=_common.results_dir(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
