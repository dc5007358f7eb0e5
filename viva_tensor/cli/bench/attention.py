"""The attention benchmark's core (private), run by ``viva-tensor bench attention``.

Blockwise flash attention (:func:`viva_tensor.flash_attention.dot_product_attention`) against
``jax.nn.dot_product_attention``: forward and forward+backward (``value_and_grad`` of the sum), B=1,
``heads`` heads of ``head_dim``, for each sequence length, dtype and causal flag. Memory is XLA's
compiled ``temp_size_in_bytes`` measured on ``jax.ShapeDtypeStruct`` inputs (nothing allocated), so
jax.nn's column is filled even where it could not run; a case is only *run* when its compiled footprint
(arguments + outputs + temporaries) fits in ``budget`` bytes.

It mirrors ``benchmarks/attention.py`` (the script that writes ``benchmarks/results/attention.*`` and
the plot); that script can call :func:`measure` and :func:`table` from here.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from viva_tensor import flash_attention as fa
from viva_tensor import memory

__all__ = ["GIB", "MIB", "measure", "table", "run"]

GIB = 2**30
MIB = 2**20


def _impls(causal: bool) -> dict:
    return {
        "flash": lambda q, k, v: fa.dot_product_attention(q, k, v, is_causal=causal),
        "jax.nn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal),
    }


def _fwd_bwd(f):
    return jax.value_and_grad(lambda q, k, v: f(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))


def _time(fn, args, repeats: int) -> tuple[float, float]:
    jax.block_until_ready(fn(*args))  # compile + warm up
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def measure(
    T: int, dtype: Any, causal: bool, *, heads: int = 8, head_dim: int = 64, repeats: int = 3,
    budget: int = 3 * GIB, run: bool = True,
) -> list[dict]:  # fmt: skip
    """Rows for one (T, dtype, causal): per implementation and pass, temp bytes and times."""
    shape = jax.ShapeDtypeStruct((1, T, heads, head_dim), jnp.dtype(dtype))
    rows = []
    args = None
    for name, f in _impls(causal).items():
        for mode, g in (("fwd", f), ("fwd+bwd", _fwd_bwd(f))):
            jitted = jax.jit(g)
            mem = memory.compiled_memory(jitted, shape, shape, shape)
            row = dict(impl=name, mode=mode, T=T, dtype=str(jnp.dtype(dtype)), causal=causal, heads=heads,
                       temp_bytes=mem.temp_bytes, total_bytes=mem.total_bytes, wall_s=None, cpu_s=None)  # fmt: skip
            if run and mem.total_bytes <= budget:
                if args is None:
                    args = [jax.random.normal(jax.random.key(i), shape.shape, shape.dtype) for i in range(3)]
                row["wall_s"], row["cpu_s"] = _time(jitted, args, repeats)
            rows.append(row)
    return rows


def _fmt_bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def _fmt_s(x: float | None) -> str:
    return "skipped" if x is None else f"{x * 1e3:.0f} ms" if x >= 0.01 else f"{x * 1e3:.2f} ms"


def table(rows: list[dict], *, default_heads: int = 8) -> str:
    """A markdown table with flash and jax.nn side by side, and their ratios."""
    out = ["| dtype | causal | T | pass | flash temp | jax.nn temp | mem ratio | flash time | jax.nn time "
           "| time ratio | flash cpu | jax.nn cpu |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    keyed = {(r["dtype"], r["causal"], r["T"], r["mode"], r["impl"], r["heads"]): r for r in rows}
    for (dt, causal, T, mode, impl, heads), r in keyed.items():
        if impl != "flash":
            continue
        o = keyed[(dt, causal, T, mode, "jax.nn", heads)]
        ratio_t = f"{r['wall_s'] / o['wall_s']:.2f}x" if r["wall_s"] and o["wall_s"] else "-"
        n = "" if heads == default_heads else f" (N={heads})"
        out.append(
            f"| {dt} | {causal} | {T}{n} | {mode} | {_fmt_bytes(r['temp_bytes'])} "
            f"| {_fmt_bytes(o['temp_bytes'])} | 1/{o['temp_bytes'] / max(r['temp_bytes'], 1):.0f} "
            f"| {_fmt_s(r['wall_s'])} | {_fmt_s(o['wall_s'])} | {ratio_t} "
            f"| {_fmt_s(r['cpu_s'])} | {_fmt_s(o['cpu_s'])} |"
        )
    return "\n".join(out)


def run(
    lengths: Sequence[int] = (1024, 2048, 4096, 8192, 16384),
    *,
    dtypes: Sequence[str] = ("float32", "bfloat16"),
    causal: Sequence[bool] = (False, True),
    heads: int = 8,
    head_dim: int = 64,
    repeats: int = 3,
    budget: int = 3 * GIB,
    log: Any = None,
) -> tuple[str, list[dict]]:
    """Every (dtype, causal, T) case; returns (the markdown table, the rows)."""
    rows = []
    for dtype in dtypes:
        jnp.dtype(dtype)  # an unknown dtype fails before anything runs
    for dtype in dtypes:
        for c in causal:
            for T in lengths:
                new = measure(T, dtype, c, heads=heads, head_dim=head_dim, repeats=repeats, budget=budget)
                rows += new
                if log:
                    for r in new:
                        log(f"{r['dtype']:8} causal={r['causal']!s:5} T={T:6} {r['impl']:6} {r['mode']:7} "
                            f"temp {_fmt_bytes(r['temp_bytes']):>10}  wall {_fmt_s(r['wall_s']):>8}")  # fmt: skip
    header = (f"## Attention benchmark\n\nB=1, N={heads}, H={head_dim}; temp = XLA compiled temporaries; "
              f"times: median wall and process CPU time over {repeats}; 'skipped' = compiled footprint over "
              f"{budget / GIB:.1f} GiB.\n\n")  # fmt: skip
    return header + table(rows, default_heads=heads) + "\n", rows
