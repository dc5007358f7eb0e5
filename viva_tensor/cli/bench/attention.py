"""The attention benchmark's core, run by ``viva-tensor bench attention`` and ``benchmarks/attention.py``.

Blockwise flash attention (:func:`viva_tensor.flash_attention.dot_product_attention`) against
``jax.nn.dot_product_attention``: forward and forward+backward (``value_and_grad`` of the sum), B=1,
``heads`` heads of ``head_dim``, for each sequence length, dtype and causal flag. Memory is XLA's
compiled ``temp_size_in_bytes`` measured on ``jax.ShapeDtypeStruct`` inputs (nothing allocated), so
jax.nn's column is filled even where it could not run; a case is only *run* when its compiled footprint
(arguments + outputs + temporaries) fits in ``budget`` bytes.

Times: the median wall and process CPU time of :func:`viva_tensor._benchmarking.time_fn` (one call a
sample, after a warm-up). ``benchmarks/attention.py`` calls :func:`measure` and :func:`table` from here
and writes ``benchmarks/results/attention.*`` and the plot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from viva_tensor import flash_attention as fa
from viva_tensor import memory
from viva_tensor._benchmarking import time_fn
from viva_tensor.errors import ConfigError

__all__ = ["GIB", "MIB", "IMPLEMENTATIONS", "measure", "table", "wide_table", "run"]

GIB = 2**30
MIB = 2**20


#: The implementations a run can compare: viva_tensor's blockwise kernel and jax.nn's (``"jax.nn"`` lets
#: JAX choose; ``"xla"`` and ``"cudnn"`` force one, as on a GPU).
IMPLEMENTATIONS = ("flash", "jax.nn", "xla", "cudnn")


def _impl(name: str, causal: bool):
    if name == "flash":
        return lambda q, k, v: fa.dot_product_attention(q, k, v, is_causal=causal)
    if name not in IMPLEMENTATIONS:
        raise ConfigError(argument="impls", expected=f"names from {IMPLEMENTATIONS}", got=name)
    implementation = None if name == "jax.nn" else name
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)


def _fwd_bwd(f):
    return jax.value_and_grad(lambda q, k, v: f(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))


def measure(
    T: int, dtype: Any, causal: bool, *, heads: int = 8, head_dim: int = 64, repeats: int = 3,
    budget: int = 3 * GIB, run: bool = True, impls: Sequence[str] = ("flash", "jax.nn"),
) -> list[dict]:  # fmt: skip
    """Rows for one (T, dtype, causal): per implementation and pass, temp bytes and times.

    An implementation other than ``flash`` and ``jax.nn`` that fails to compile (cuDNN refuses a shape, or
    runs only on a GPU) gives a row with ``None`` bytes and times and the reason in ``note``.
    """
    shape = jax.ShapeDtypeStruct((1, T, heads, head_dim), jnp.dtype(dtype))
    rows = []
    args = None
    for name in impls:
        f = _impl(name, causal)
        for mode, g in (("fwd", f), ("fwd+bwd", _fwd_bwd(f))):
            row = dict(impl=name, mode=mode, T=T, dtype=str(jnp.dtype(dtype)), causal=causal, heads=heads,
                       temp_bytes=None, total_bytes=None, wall_s=None, cpu_s=None, note=None)  # fmt: skip
            jitted = jax.jit(g)
            try:
                mem = memory.compiled_memory(jitted, shape, shape, shape)
            except Exception as e:  # noqa: BLE001 - a forced implementation may not exist here
                if name in ("flash", "jax.nn"):
                    raise
                row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}" if str(e) else type(e).__name__
                rows.append(row)
                continue
            row["temp_bytes"], row["total_bytes"] = mem.temp_bytes, mem.total_bytes
            if run and mem.total_bytes <= budget:
                if args is None:
                    args = [jax.random.normal(jax.random.key(i), shape.shape, shape.dtype) for i in range(3)]
                t = time_fn(jitted, *args, repeats=repeats)
                row["wall_s"], row["cpu_s"] = t.median_s, t.cpu_s
            rows.append(row)
    return rows


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
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


def wide_table(rows: list[dict], impls: Sequence[str]) -> str:
    """A markdown table with one time column and one memory column per implementation (the GPU comparison)."""
    head = ["dtype", "causal", "T", "pass", *(f"{i} time" for i in impls), *(f"{i} temp" for i in impls)]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keyed = {(r["dtype"], r["causal"], r["T"], r["heads"], r["mode"], r["impl"]): r for r in rows}
    cases = dict.fromkeys(k[:5] for k in keyed)
    for dt, causal, T, heads, mode in cases:
        got = [keyed.get((dt, causal, T, heads, mode, i), {}) for i in impls]
        times = [_fmt_s(r.get("wall_s")) if r.get("note") is None else "failed" for r in got]
        temps = [_fmt_bytes(r.get("temp_bytes")) for r in got]
        out.append(f"| {dt} | {causal} | {T} | {mode} | " + " | ".join(times + temps) + " |")
    notes = sorted({f"{r['impl']}: {r['note']}" for r in rows if r.get("note")})
    return "\n".join(out + ([""] + [f"- {n}" for n in notes] if notes else []))


def run(
    lengths: Sequence[int] = (1024, 2048, 4096, 8192, 16384),
    *,
    dtypes: Sequence[str] = ("float32", "bfloat16"),
    causal: Sequence[bool] = (False, True),
    heads: int = 8,
    head_dim: int = 64,
    repeats: int = 3,
    budget: int = 3 * GIB,
    impls: Sequence[str] = ("flash", "jax.nn"),
    log: Any = None,
) -> tuple[str, list[dict]]:
    """Every (dtype, causal, T) case; returns (the markdown table, the rows).

    With the default ``impls`` the table sets flash and jax.nn side by side with their ratios
    (:func:`table`); with others, one column per implementation (:func:`wide_table`).
    """
    rows = []
    for dtype in dtypes:
        jnp.dtype(dtype)  # an unknown dtype fails before anything runs
    for dtype in dtypes:
        for c in causal:
            for T in lengths:
                new = measure(T, dtype, c, heads=heads, head_dim=head_dim, repeats=repeats, budget=budget,
                              impls=impls)
                rows += new
                if log:
                    for r in new:
                        log(f"{r['dtype']:8} causal={r['causal']!s:5} T={T:6} {r['impl']:6} {r['mode']:7} "
                            f"temp {_fmt_bytes(r['temp_bytes']):>10}  wall {_fmt_s(r['wall_s']):>8}")  # fmt: skip
    header = (f"## Attention benchmark\n\nB=1, N={heads}, H={head_dim}; temp = XLA compiled temporaries; "
              f"times: median wall and process CPU time over {repeats}; 'skipped' = compiled footprint over "
              f"{budget / GIB:.1f} GiB.\n\n")  # fmt: skip
    body = table(rows, default_heads=heads) if tuple(impls) == ("flash", "jax.nn") else wide_table(rows, impls)
    return header + body + "\n", rows
