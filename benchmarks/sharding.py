"""Ring attention on 8 CPU devices against single-device flash attention.

Per-device compiled memory (XLA's memory analysis: nothing is allocated, so every length is measured)
and, for the lengths given to ``--run``, wall time of a forward pass (median of a few runs after a
warm-up). Forward and forward+gradient are both compiled. B=1, 8 heads, head dim 64, float32.

Target: ring attention's per-device memory is about 1/8 of the single-device figure.

Usage:
    python benchmarks/sharding.py                      # memory at 8k..64k, wall time at 8k
    python benchmarks/sharding.py --run 8192 16384     # wall time at more lengths (quiet machine)

Writes ``benchmarks/results/sharding.json`` and ``.md`` (``sharding_causal.*`` with ``--causal``).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from viva_tensor import memory, ring_attention  # noqa: E402

try:
    from viva_tensor import flash_attention
except ImportError:  # the flash branch not merged: jax.nn as the single-device baseline
    flash_attention = None

B, N, H = 1, 8, 64
DEVICES = 8
MIB = 2**20


def single(q, k, v, causal):
    if flash_attention is not None:
        return flash_attention.dot_product_attention(q, k, v, is_causal=causal)
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal)


def make_fns(mesh, causal):
    ring = jax.jit(lambda q, k, v: ring_attention.ring_attention(q, k, v, mesh=mesh, axis="sp", is_causal=causal))
    one = jax.jit(lambda q, k, v: single(q, k, v, causal))

    def grad_of(f):
        return jax.jit(jax.grad(lambda q, k, v: f(q, k, v).sum(), (0, 1, 2)))

    return ring, one, grad_of(ring), grad_of(one)


def measure(T, causal, run, repeats):
    mesh = jax.make_mesh((DEVICES,), ("sp",), axis_types=(AxisType.Auto,))
    sh = NamedSharding(mesh, P(None, "sp"))
    x_ring = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32, sharding=sh)
    x_one = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
    ring, one, ring_g, one_g = make_fns(mesh, causal)
    row = {"T": T, "causal": causal}
    for name, f, x in (("ring", ring, x_ring), ("single", one, x_one), ("ring_grad", ring_g, x_ring),
                       ("single_grad", one_g, x_one)):
        m = memory.compiled_memory(f, x, x, x)
        row[f"{name}_mib"] = round(m.total_bytes / MIB, 1)
        row[f"{name}_temp_mib"] = round(m.temp_bytes / MIB, 1)
    row["fwd_ratio"] = round(row["ring_mib"] / row["single_mib"], 3)
    row["grad_ratio"] = round(row["ring_grad_mib"] / row["single_grad_mib"], 3)
    if run:
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(kk, (B, T, N, H), jnp.float32) for kk in keys)
        qs, ks, vs = (jax.device_put(a, sh) for a in (q, k, v))
        for name, f, args in (("ring", ring, (qs, ks, vs)), ("single", one, (q, k, v))):
            f(*args).block_until_ready()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                f(*args).block_until_ready()
                times.append(time.perf_counter() - t0)
            row[f"{name}_s"] = round(statistics.median(times), 3)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=[8192, 16384, 32768, 65536])
    ap.add_argument("--run", type=int, nargs="*", default=[8192], help="lengths whose wall time is measured")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--causal", action="store_true", help="causal attention (default: full)")
    args = ap.parse_args()
    rows = [measure(T, args.causal, T in args.run, args.repeats) for T in args.lengths]
    baseline = "flash_attention.dot_product_attention" if flash_attention is not None else "jax.nn.dot_product_attention"
    head = (f"ring attention on {DEVICES} CPU devices vs single-device {baseline}; B={B}, N={N}, H={H}, float32, "
            f"{'causal' if args.causal else 'full'}; memory = per-device compiled total (args+out+temp), MiB")
    cols = ["T", "ring_mib", "single_mib", "fwd_ratio", "ring_grad_mib", "single_grad_mib", "grad_ratio", "ring_s",
            "single_s"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |")
    text = "\n".join(lines)
    print(text)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    stem = "sharding_causal" if args.causal else "sharding"
    (out / f"{stem}.json").write_text(json.dumps({"setup": head, "devices": jax.device_count(),
                                                   "backend": jax.default_backend(), "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
