"""The quantized matmul against the float32 matmul, every format, both weight layouts, batch 1 / 16 / 256: one table.

A 4096 x 4096 float32 Gaussian weight, quantized once per format (``quant.quantize``; int8 with a scale per row).
Each record is timed in both contractions of ``quant.dot_general``: ``nk`` contracts the record's blocked last axis
(``x @ w.T``, the checkpoint layout ``(out, in)``, ``QLinear``) and ``kn`` its first (``x @ w``). The peer is the
float32 matmul in its best layout in the same run (``jnp.einsum("bk,nk->bn")`` or ``x @ w``, whichever is faster at
that batch). int8 and q8_0 are also timed with ``activation_quant="int8"`` (dynamic W8A8, int32 sums).

Columns: ms (the minimum over rounds, three times as many at batch 1: in each round every function of a batch runs
once, one ``viva_tensor._benchmarking.time_fn`` sample each, so that a loaded machine slows them alike), the ratio to
the best float32 time, GB/s of the record's bytes, % of the byte limit (the record's bytes streamed at the float32
matmul's own GB/s at that batch: 100% is a matmul bound by its weight's bytes and as efficient as float32's),
the minimum process CPU ms (all threads: on a loaded machine the wall time counts the others' work, the CPU time
less so) and its ratio to the best float32 CPU time, the path ``quant.dot_general`` takes (``kernel``: the fused
``vt_qmatmul``; ``gemm``: ``vt_qmatmul``'s blocked GEMM, decode in its packing step; ``panels+xla``: ``vt_decode``
panels into XLA's GEMM, builds without AVX-512; ``w8a8-vnni``: ``vt_qmatmul_i8``; ``pure-jax``), the target, and
the output's relative error
``||y - x w|| / ||x w||`` against the float32 product (weight-only, and W8A8 in the W8A8 rows).

Targets (issue 13): B=1 4-bit >= 2.0x faster than float32 (ratio <= 0.5), int8 / q8_0 >= 1.5x (<= 0.667);
B=16 <= 1.0; B=256 <= 1.15.

On a GPU backend the activations are bfloat16 and the peer is the bfloat16 matmul (the pure-JAX path).

Run: ``python benchmarks/quantization.py [--quick] [--size 4096] [--batch 1 --batch 16] [-f nf4]``; writes
``benchmarks/results/quantization.md`` and ``.json`` (``--quick``: 256 x 256, batches 1 and 16, four formats, two
rounds, into results/quick). Sizes, SQNR and quantize throughput per format: ``viva-tensor bench quant``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402 - puts the repository first on sys.path
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from viva_tensor import _kernels, quant  # noqa: E402
from viva_tensor._kernels import planes  # noqa: E402

FORMATS = {  # name: quant.quantize options
    "nf4": {}, "nf4_dq": {}, "nvfp4": {}, "mxfp4": {}, "q4_0": {}, "q4_1": {}, "int4_group": {}, "awq_int4": {},
    "q8_0": {}, "int8": {"axis": 0},
}  # fmt: skip
QUICK_FORMATS = ["nf4", "q4_0", "q8_0", "int8"]
INT8 = ("q8_0", "int8")
TARGET = {1: {"4bit": 0.5, "int8": 1 / 1.5}, 16: 1.0, 256: 1.15}
DIMS = {"nk": (((1,), (1,)), ((), ())), "kn": (((1,), (0,)), ((), ()))}


def _path(record, layout: str, batch: int, w8a8: bool) -> str:
    if jax.default_backend() != "cpu" or not _kernels.available():
        return "pure-jax"
    args = planes.kernel_args(record)
    if args is None:
        return "pure-jax"
    gemm = _kernels.gemm_batch(layout)
    path = ("gemm" if gemm and batch >= gemm else "panels+xla" if not gemm and batch >= _kernels.PANEL_BATCH
            else "kernel")
    if w8a8:
        return "w8a8-vnni" if layout == "nk" and args["layout"] == "int8" else "w8a8-rounded+" + path
    return path


def _interleaved(fns: dict, rounds: int) -> tuple[dict, dict]:
    """Minimum wall and process-CPU ms of each function over ``rounds`` rounds; in a round each runs once (one
    time_fn sample)."""
    for f, args in fns.values():
        jax.block_until_ready(f(*args))  # compile and warm up, all before the first round
    wall, cpu = {k: float("inf") for k in fns}, {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, (f, args) in fns.items():
            t = _common.time_fn(f, *args, repeats=1, warmup=0)
            wall[k], cpu[k] = min(wall[k], t.min_s * 1e3), min(cpu[k], t.cpu_s * 1e3)
    return wall, cpu


def _rel_err(y, exact) -> float:
    y, exact = np.asarray(y, np.float64), np.asarray(exact, np.float64)
    return float(np.linalg.norm(y - exact) / np.linalg.norm(exact))


def _target(fmt: str, batch: int) -> float | None:
    tgt = TARGET.get(batch)
    if isinstance(tgt, dict):
        return tgt["int8" if fmt in INT8 else "4bit"]
    return tgt


def run(size: int, batches, formats, rounds: int):
    gpu = jax.default_backend() != "cpu"
    act = jnp.bfloat16 if gpu else jnp.float32
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(size, size)).astype(np.float32)).astype(act)
    records = {f: quant.quantize(w.astype(jnp.float32), f, **FORMATS[f]) for f in formats}
    peers = {"nk": jax.jit(lambda x, w: jnp.einsum("bk,nk->bn", x, w)), "kn": jax.jit(lambda x, w: x @ w)}
    rows = []
    for b in batches:
        x = jnp.asarray(rng.normal(size=(b, size)).astype(np.float32)).astype(act)
        fns = {("float32" if not gpu else "bfloat16", lay, False): (f, (x, w)) for lay, f in peers.items()}
        for name, q in records.items():
            for lay, dims in DIMS.items():
                for w8a8 in (False, True) if name in INT8 else (False,):
                    aq = "int8" if w8a8 else None
                    f = jax.jit(lambda x, q, dims=dims, aq=aq: quant.dot_general(x, q, dims, activation_quant=aq))
                    fns[(name, lay, w8a8)] = (f, (x, q))
        times, cpus = _interleaved(fns, rounds * (3 if b == 1 else 1))  # batch 1 calls are short: more rounds
        peer = {lay: times[(k, lay, False)] for (k, lay, _) in fns if k in ("float32", "bfloat16")}
        best = min(peer.values())
        best_cpu = min(cpus[(k, lay, False)] for (k, lay, _) in fns if k in ("float32", "bfloat16"))
        peer_gbps = w.nbytes / best / 1e6
        exact = {"nk": np.asarray(x, np.float64) @ np.asarray(w, np.float64).T,
                 "kn": np.asarray(x, np.float64) @ np.asarray(w, np.float64)}
        for (name, lay, w8a8), t in times.items():
            is_peer = name in ("float32", "bfloat16")
            nbytes = w.nbytes if is_peer else records[name].nbytes
            f, args = fns[(name, lay, w8a8)]
            err = 0.0 if is_peer else _rel_err(f(*args), exact[lay])
            tgt = None if is_peer or w8a8 or size != 4096 else _target(name, b)  # the targets are for 4096²
            ratio = t / best
            rows.append(dict(
                layout=lay, batch=b, format=name + (" W8A8" if w8a8 else ""), ms=t, ratio=ratio,
                cpu_ms=cpus[(name, lay, w8a8)], cpu_ratio=cpus[(name, lay, w8a8)] / best_cpu,
                gbps=nbytes / t / 1e6, limit_pct=100 * (nbytes / peer_gbps / 1e6) / t,
                path="xla" if is_peer else _path(records[name], lay, b, w8a8), rel_err=err,
                target=None if tgt is None else ("ok" if ratio <= tgt else "MISS") + f" (<= {tgt:.3g})",
            ))  # fmt: skip
            print(f"{lay} B={b:4d} {rows[-1]['format']:12s} {t:9.3f} ms {ratio:6.3f}x {rows[-1]['gbps']:6.1f} GB/s "
                  f"{rows[-1]['path']:12s} err {err:.2e} {rows[-1]['target'] or ''}", flush=True)
    return rows


def table(rows) -> str:
    lines = ["| layout | batch | format | path | ms | ratio to best float32 | GB/s of weight bytes | % of byte limit "
             "| CPU ms | CPU ratio | rel. error vs float32 product | target |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    order = sorted(rows, key=lambda r: (r["layout"], r["batch"]))
    for r in order:
        lines.append(f"| {r['layout']} | {r['batch']} | {r['format']} | {r['path']} | {r['ms']:.3f} | "
                     f"{r['ratio']:.3f} | {r['gbps']:.1f} | {r['limit_pct']:.0f} | {r['cpu_ms']:.3f} | "
                     f"{r['cpu_ratio']:.3f} | {r['rel_err']:.2e} | "
                     f"{r['target'] or ''} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = _common.parser(__doc__)
    parser.add_argument("--size", type=_common.positive_int, default=None, help="the weight is SIZE x SIZE")
    parser.add_argument("--batch", type=_common.positive_int, action="append", dest="batches")
    parser.add_argument("-f", "--format", action="append", dest="formats", choices=sorted(FORMATS))
    parser.add_argument("--rounds", type=_common.positive_int, default=None)
    args = parser.parse_args(argv)
    size = args.size or (256 if args.quick else 4096)
    batches = args.batches or ([1, 16] if args.quick else [1, 16, 256])
    formats = args.formats or (QUICK_FORMATS if args.quick else list(FORMATS))
    rounds = args.rounds or (2 if args.quick else 20)
    rows = run(size, batches, formats, rounds)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    misses = [f"{r['layout']} B={r['batch']} {r['format']}" for r in rows if (r["target"] or "").startswith("MISS")]
    text = (f"# quant.dot_general vs the {'bfloat16' if jax.default_backend() != 'cpu' else 'float32'} matmul, "
            f"{size}x{size}, min of {rounds} interleaved rounds\n\n"
            f"backend {jax.default_backend()}, kernels available: {_kernels.available()}, threads: "
            f"{_kernels.threads()}, load average at the end {load:.1f}; targets missed: {', '.join(misses) or 'none'}"
            "\n\n" + table(rows) + "\n")
    print(text)
    _common.write_results("quantization", text, {"size": size, "rounds": rounds, "load_average": load, "rows": rows},
                          quick=args.quick, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
