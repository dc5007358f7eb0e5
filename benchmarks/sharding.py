"""Ring attention on 8 CPU devices against single-device flash attention.

Per-device compiled memory (XLA's memory analysis: nothing is allocated, so every length is measured)
and, for the lengths given to ``--run``, wall time of a forward pass (the median of
``viva_tensor._benchmarking.time_fn``'s samples after a warm-up). Forward and forward+gradient are both
compiled. B=1, 8 heads, head dim 64, float32.

Target: ring attention's per-device memory is about 1/8 of the single-device figure.

Usage:
    python benchmarks/sharding.py --quick              # seconds: memory at 512 and 1024, wall time at 512
    python benchmarks/sharding.py                      # memory at 8k..64k, wall time at 8k
    python benchmarks/sharding.py --run 8192 16384     # wall time at more lengths (quiet machine)

Writes ``benchmarks/results/sharding.json`` and ``.md`` (``sharding_causal.*`` with ``--causal``).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402 - puts the repository first on sys.path
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from viva_tensor import flash_attention, memory, ring_attention  # noqa: E402

B, N, H = 1, 8, 64
DEVICES = 8
MIB = 2**20


def single(q, k, v, causal):
    return flash_attention.dot_product_attention(q, k, v, is_causal=causal)


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
            row[f"{name}_s"] = round(_common.time_fn(f, *args, repeats=repeats).median_s, 4)
    return row


def main(argv=None):
    ap = _common.parser(__doc__)
    count = _common.positive_int  # 0 or -5: a usage error (exit 2), never the default
    ap.add_argument("--lengths", type=count, nargs="*", default=None, help="default 8192 16384 32768 65536")
    ap.add_argument("--run", type=count, nargs="*", default=None, help="lengths whose wall time is measured (8192)")
    ap.add_argument("--repeats", type=count, default=None, help="timed samples (default 3; 1 with --quick)")
    ap.add_argument("--causal", action="store_true", help="causal attention (default: full)")
    args = ap.parse_args(argv)
    lengths = args.lengths or ([512, 1024] if args.quick else [8192, 16384, 32768, 65536])
    timed = args.run if args.run is not None else [512] if args.quick else [8192]
    repeats = args.repeats or (1 if args.quick else 3)
    rows = [measure(T, args.causal, T in timed, repeats) for T in lengths]
    head = (f"ring attention on {DEVICES} CPU devices vs single-device flash_attention.dot_product_attention; "
            f"B={B}, N={N}, H={H}, float32, {'causal' if args.causal else 'full'}; memory = per-device compiled "
            "total (args+out+temp), MiB; times: median of the samples, s")
    cols = ["T", "ring_mib", "single_mib", "fwd_ratio", "ring_grad_mib", "single_grad_mib", "grad_ratio", "ring_s",
            "single_s"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |")
    text = "\n".join(lines)
    print(text)
    stem = "sharding_causal" if args.causal else "sharding"
    data = {"setup": head, "devices": jax.device_count(), "backend": jax.default_backend(), "rows": rows}
    _common.write_results(stem, text, data, quick=args.quick, out=args.out)


if __name__ == "__main__":
    main()
