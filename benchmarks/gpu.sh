#!/usr/bin/env bash
# GPU comparison for viva_tensor's blockwise attention, in one call (budget: 10 minutes).
# bfloat16, B=1, N=8, H=64, T = 1024 .. 32768, causal and not, forward and forward+backward:
# flash (viva_tensor) against jax.nn.dot_product_attention(implementation='xla' and 'cudnn').
# Installs nothing but this package (`pip install -e .`, skipped when it already imports); prints a
# markdown table and writes benchmarks/results/gpu.md. Usage: bash benchmarks/gpu.sh [max_T]
set -uo pipefail
cd "$(dirname "$0")/.."
python -c "import viva_tensor" 2>/dev/null || pip install -q -e . || true
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
MAX_T="${1:-32768}" timeout 570 python - <<'PY'
import os, statistics, sys, time
sys.path.insert(0, os.getcwd())
import jax, jax.numpy as jnp
from viva_tensor import flash_attention as fa, memory

start = time.time()
BUDGET_S = 540
dev = jax.devices()[0]
print("device:", dev.device_kind, "| jax", jax.__version__, flush=True)
gpu_bytes = (dev.memory_stats() or {}).get("bytes_limit", 70 * 2**30)
max_t = int(os.environ.get("MAX_T", "32768"))
lengths = [t for t in (1024, 2048, 4096, 8192, 16384, 32768) if t <= max_t]

def impls(causal):
    return {
        "flash": lambda q, k, v: fa.dot_product_attention(q, k, v, is_causal=causal),
        "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla"),
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn"),
    }

def fwd_bwd(f):
    return jax.value_and_grad(lambda q, k, v: f(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))

def timed(fn, args, n=5):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(n):
        t = time.perf_counter(); jax.block_until_ready(fn(*args)); ts.append(time.perf_counter() - t)
    return statistics.median(ts)

rows = []
print(f"{'causal':6} {'T':>6} {'impl':6} {'pass':8} {'temp MiB':>10} {'ms':>9}", flush=True)
for causal in (False, True):
    for T in lengths:
        shape = jax.ShapeDtypeStruct((1, T, 8, 64), jnp.bfloat16)
        args = [jax.random.normal(jax.random.key(i), shape.shape, jnp.bfloat16) for i in range(3)]
        for name, f in impls(causal).items():
            for mode, g in (("fwd", f), ("fwd+bwd", fwd_bwd(f))):
                if time.time() - start > BUDGET_S:
                    print("time budget reached; stopping", flush=True); break
                temp, ms, note = None, None, ""
                try:
                    jitted = jax.jit(g)
                    mem = memory.compiled_memory(jitted, shape, shape, shape)
                    temp = mem.temp_bytes / 2**20
                    if mem.total_bytes < 0.8 * gpu_bytes:
                        ms = timed(jitted, args) * 1e3
                    else:
                        note = "too big to run"
                except Exception as e:  # cudnn may refuse a shape; keep going
                    note = f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"
                rows.append((causal, T, name, mode, temp, ms, note))
                print(f"{causal!s:6} {T:6} {name:6} {mode:8} {temp if temp is not None else float('nan'):10.1f} "
                      f"{ms if ms is not None else float('nan'):9.2f} {note}", flush=True)

lines = [f"GPU: {dev.device_kind}, jax {jax.__version__}, bfloat16, B=1, N=8, H=64 (temp = XLA compiled temporaries)",
         "", "| causal | T | pass | flash ms | xla ms | cudnn ms | flash temp MiB | xla temp MiB | cudnn temp MiB |",
         "|---|---|---|---|---|---|---|---|---|"]
key = {(c, T, n, m): (t, ms) for c, T, n, m, t, ms, _ in rows}
fmt = lambda x: "-" if x is None else f"{x:.2f}"
for c in (False, True):
    for T in lengths:
        for m in ("fwd", "fwd+bwd"):
            vals = [key.get((c, T, n, m), (None, None)) for n in ("flash", "xla", "cudnn")]
            if all(v == (None, None) for v in vals):
                continue
            lines.append(f"| {c} | {T} | {m} | " + " | ".join(fmt(v[1]) for v in vals) + " | "
                         + " | ".join(fmt(v[0]) for v in vals) + " |")
print("\n".join(lines))
os.makedirs("benchmarks/results", exist_ok=True)
open("benchmarks/results/gpu.md", "w").write("\n".join(lines) + "\n")
print(f"done in {time.time() - start:.0f} s")
PY
