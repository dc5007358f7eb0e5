"""Memory benchmark: streaming layers under a device budget, rematerialisation, roofline vs measured.

    python benchmarks/memory.py --quick    # seconds: a 4 MiB stack, no MiniLM, small roofline (results/quick)
    python benchmarks/memory.py            # small: a 64 MiB stack (safe while others work)
    python benchmarks/memory.py --full     # a 2 GiB stack (needs ~5 GiB of RAM and as much free disk)

1. Streaming: a synthetic stack of ``tanh(x @ W + b)`` layers whose weights live in ``pinned_host``,
   ``unpinned_host`` or safetensors files, run by ``memory.stream`` under a budget of a quarter of the
   stack's bytes, against the in-memory run (every layer on the device). Outputs must be bit-identical.
2. Rematerialisation: ``memory.checkpoint_savings`` of each strategy (compiled memory of the gradient).
3. Roofline: ``hardware.estimate_performance`` on this CPU's measured spec against measured times.

Times: minimum and median of ``viva_tensor._benchmarking.time_fn`` (after a warm-up). Prints tables and
writes ``benchmarks/results/memory.md`` and ``memory.json``.
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402 - puts the repository first on sys.path
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from viva_tensor import hardware, memory  # noqa: E402


def best_of(f, repeats):
    """(minimum, median) seconds of ``f()`` over ``repeats`` samples after a warm-up."""
    t = _common.time_fn(f, repeats=repeats)
    return t.min_s, t.median_s


def layer(p, x):
    return jnp.tanh(x @ p["w"] + p["b"])


def streaming(depth, width, batch, repeats, workdir):
    key = jax.random.key(0)
    f = jax.jit(layer)
    device_layers = [{"w": jax.random.normal(jax.random.fold_in(key, i), (width, width)) / np.sqrt(width),
                      "b": jnp.zeros((1, width))} for i in range(depth)]
    x = jax.random.normal(key, (batch, width))
    total = memory.tree_nbytes(device_layers)
    budget = total // 4

    def in_memory():
        h = x
        for p in device_layers:
            h = f(p, h)
        return h.block_until_ready()

    reference = in_memory()
    rows = [{"source": "device (in memory)", "prefetch": "-", "best_s": None, "median_s": None,
             "peak_resident_MiB": total / 2**20, "identical": True}]
    rows[0]["best_s"], rows[0]["median_s"] = best_of(in_memory, repeats)
    sources = {
        "pinned_host": [memory.place(p, "pinned_host") for p in device_layers],
        "unpinned_host": [memory.place(p, "unpinned_host") for p in device_layers],
        "disk": [memory.place(p, "disk", path=os.path.join(workdir, f"layer{i}.safetensors"))
                 for i, p in enumerate(device_layers)],
    }
    device_layers.clear()  # the streamed runs hold at most the budget on the device
    for name, layers in sources.items():
        for prefetch in (True, False):
            out = {}

            def run(out=out, layers=layers, prefetch=prefetch):
                out["y"], out["stats"] = memory.stream(f, layers, x, budget_bytes=budget, prefetch=prefetch,
                                                       return_stats=True)

            best, median = best_of(run, repeats)
            stats = out["stats"]
            assert stats.peak_resident_bytes <= budget
            rows.append({"source": name, "prefetch": prefetch, "best_s": best, "median_s": median,
                         "peak_resident_MiB": stats.peak_resident_bytes / 2**20,
                         "peak_live_device_MiB": stats.peak_live_device_bytes / 2**20,
                         "identical": bool(jnp.array_equal(out["y"], reference))})
    for row in rows:
        row["vs_in_memory"] = row["best_s"] / rows[0]["best_s"]
    meta = {"depth": depth, "width": width, "batch": batch, "stack_MiB": total / 2**20,
            "budget_MiB": budget / 2**20, "layer_MiB": total / depth / 2**20}
    return meta, rows


def minilm_streaming(repeats, workdir):
    """all-MiniLM-L6-v2's six encoder layers streamed from host and disk."""
    from flax import nnx

    from viva_tensor.errors import TensorError
    from viva_tensor.models import minilm

    try:
        model = minilm.load_model()
        tokenizer = minilm.load_tokenizer()
    except (TensorError, ImportError) as e:  # the weights' package or `tokenizers` is not installed
        return {"skipped": f"{type(e).__name__}: {e}"}, []
    sentences = ["Memory that really moves between tiers."] * 8 + ["A second, longer sentence " * 6] * 8
    batch = tokenizer.encode_batch(sentences)  # truncated, not padded: pad with id 0, mask 0
    length = max(len(b.ids) for b in batch)
    ids = jnp.asarray([b.ids + [0] * (length - len(b.ids)) for b in batch])
    mask = jnp.asarray([[1] * len(b.ids) + [0] * (length - len(b.ids)) for b in batch])
    graphdef, _ = nnx.split(model.layers[0])
    states = [nnx.split(layer)[1] for layer in model.layers]

    @jax.jit
    def step(state, carry):
        h, m = carry
        return nnx.merge(graphdef, state)(h, m), m

    @jax.jit
    def embed(ids):
        return model.embeddings(ids, jnp.zeros_like(ids))

    h0 = embed(ids).block_until_ready()
    carry = (h0, mask.astype(bool))
    total = memory.tree_nbytes(states)
    model_bytes = memory.tree_nbytes(nnx.state(model))

    def in_memory():
        c = carry
        for st in states:
            c = step(st, c)
        return jax.block_until_ready(c[0])

    reference = in_memory()
    expected = model.hidden_states(ids, mask)
    rows = [{"source": "device (in memory)", "budget_MiB": None, "prefetch": "-",
             "peak_resident_MiB": total / 2**20, "identical": True,
             "max_abs_vs_model": float(jnp.abs(reference - expected).max())}]
    rows[0]["best_s"], rows[0]["median_s"] = best_of(in_memory, repeats)
    sources = {"pinned_host": [memory.place(st, "pinned_host") for st in states],
               "disk": [memory.place(st, "disk", path=os.path.join(workdir, f"minilm{i}.safetensors"))
                        for i, st in enumerate(states)]}
    layer_bytes = total // len(states)
    for name, held in sources.items():
        for label, budget in (("a quarter of the layers", total // 4), ("two layers", 2 * layer_bytes)):
            out = {}

            def run(out=out, held=held, budget=budget):
                y, out["stats"] = memory.stream(step, held, carry, budget_bytes=budget, return_stats=True)
                out["y"] = y[0]

            best, median = best_of(run, repeats)
            rows.append({"source": name, "budget": label, "budget_MiB": budget / 2**20,
                         "prefetch": out["stats"].prefetched, "best_s": best, "median_s": median,
                         "peak_resident_MiB": out["stats"].peak_resident_bytes / 2**20,
                         "identical": bool(jnp.array_equal(out["y"], reference))})
    for row in rows:
        row["vs_in_memory"] = row["best_s"] / rows[0]["best_s"]
    meta = {"model": "sentence-transformers/all-MiniLM-L6-v2", "batch": list(ids.shape),
            "model_MiB": model_bytes / 2**20, "encoder_layers_MiB": total / 2**20,
            "note": "the embedding tables stay on the device; the six encoder layers are streamed"}
    return meta, rows


def block(p, x):
    return x + jnp.tanh(jnp.tanh(x @ p["up"]) @ p["down"])


def remat(width, hidden, depth, batch):
    spec = jax.ShapeDtypeStruct
    stacks = [{"up": spec((depth, width, width), jnp.float32), "down": spec((depth, width, width), jnp.float32)},
              {"up": spec((depth, width, hidden), jnp.float32), "down": spec((depth, hidden, width), jnp.float32)}]
    x = spec((batch, width), jnp.float32)
    one = [jax.tree_util.tree_map(lambda a: spec(a.shape[1:], a.dtype), s) for s in stacks]
    small_act = memory.layer_activation_bytes(block, one[0], x)
    kept = depth * (small_act + memory.layer_activation_bytes(block, one[1], x))
    rows = []
    for name, strategy in [("NoCheckpoint", memory.NoCheckpoint()),
                           ("LargeLayersOnly(> small layers)", memory.LargeLayersOnly(small_act)),
                           ("LargeLayersOnly(0)", memory.LargeLayersOnly(0)),
                           ("EveryN(1)", memory.EveryN(1)), ("EveryN(2)", memory.EveryN(2)),
                           (f"EveryN({depth})", memory.EveryN(depth)),
                           ("Adaptive()", memory.Adaptive()),
                           ("Adaptive(half the activations)", memory.Adaptive(budget_bytes=kept // 2))]:
        s = memory.checkpoint_savings(block, stacks, x, strategy)
        rows.append({"strategy": name, "plan": list(s.plan), "baseline_temp_MiB": s.baseline.temp_bytes / 2**20,
                     "temp_MiB": s.checkpointed.temp_bytes / 2**20, "saved_MiB": s.saved_bytes / 2**20,
                     "saved_pct": 100 * s.saved_fraction, "extra_GFLOP": s.extra_flops / 1e9})
    meta = {"stages": [f"{depth} layers {width}->{width}->{width}", f"{depth} layers {width}->{hidden}->{width}"],
            "batch": batch}
    return meta, rows


def roofline(repeats, quick=False):
    spec = hardware.local_cpu(size=256 if quick else 1024, repeats=1 if quick else 3)
    cases = [
        ("matmul 256^3", jnp.matmul, [(256, 256), (256, 256)]),
        ("x + 1 over 1M", lambda a: a + 1, [(2**20,)]),
    ] if quick else [
        ("matmul 256^3", jnp.matmul, [(256, 256), (256, 256)]),
        ("matmul 1024^3", jnp.matmul, [(1024, 1024), (1024, 1024)]),
        ("matmul 2048^3", jnp.matmul, [(2048, 2048), (2048, 2048)]),
        ("matvec 4096x4096 @ 4096", jnp.matmul, [(4096, 4096), (4096, 1)]),
        ("x + 1 over 16M", lambda a: a + 1, [(16 * 2**20,)]),
        ("sum over 16M", jnp.sum, [(16 * 2**20,)]),
        ("softmax 2048x2048", lambda a: jax.nn.softmax(a, axis=-1), [(2048, 2048)]),
    ]
    rows = []
    for name, fn, shapes in cases:
        args = [jnp.ones(s, jnp.float32) for s in shapes]
        jitted = jax.jit(fn)
        e = hardware.estimate_performance(jitted, *args, device=spec)
        best, median = best_of(lambda jitted=jitted, args=args: jitted(*args), repeats)
        rows.append({"case": name, "GFLOP": e.flops / 1e9, "MB_accessed": e.bytes_accessed / 1e6,
                     "intensity": e.arithmetic_intensity, "bound": e.bound, "estimate_ms": 1e3 * e.seconds,
                     "measured_ms": 1e3 * best, "measured_over_estimate": best / e.seconds})
    meta = {"cpu": spec.name, "bandwidth_GBps": spec.bandwidth / 1e9,
            "float32_GFLOPs": hardware.peak_flops(spec, "float32") / 1e9,
            "bfloat16_GFLOPs": hardware.peak_flops(spec, "bfloat16") / 1e9, "sources": dict(spec.sources)}
    return meta, rows


def table(rows, columns):
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = _common.parser(__doc__)
    count = _common.positive_int  # 0 or -5: a usage error (exit 2), never the default
    parser.add_argument("--full", action="store_true", help="stream a 2 GiB stack (default: 64 MiB)")
    parser.add_argument("--stack-mib", type=count, default=None, help="size of the streamed stack (16 layers; 64)")
    parser.add_argument("--repeats", type=count, default=None, help="timed samples (default 3; 1 with --quick)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    stack_mib = args.stack_mib or (4 if args.quick else 64)
    if args.full:
        depth, width = 32, 4096  # 32 layers of 64 MiB
    else:
        depth = 4 if args.quick else 16
        width = int(round((stack_mib * 2**20 / depth / 4) ** 0.5))
    with tempfile.TemporaryDirectory(dir=os.environ.get("VIVA_BENCH_TMP")) as workdir:
        s_meta, s_rows = streaming(depth, width, batch=64, repeats=repeats, workdir=workdir)
        if args.quick:
            m_meta, m_rows = {"skipped": "--quick"}, []
        else:
            m_meta, m_rows = minilm_streaming(repeats, workdir)
    r_meta, r_rows = remat(width=64, hidden=256, depth=2, batch=64) if args.quick else remat(
        width=256, hidden=2048, depth=8, batch=1024)
    f_meta, f_rows = roofline(repeats, quick=args.quick)
    env = {"jax": jax.__version__, "backend": jax.default_backend(), "machine": f_meta["cpu"]}
    s_cols = ["source", "prefetch", "best_s", "median_s", "vs_in_memory", "peak_resident_MiB",
              "peak_live_device_MiB", "identical"]
    m_cols = ["source", "budget", "budget_MiB", "prefetch", "best_s", "median_s", "vs_in_memory",
              "peak_resident_MiB", "identical", "max_abs_vs_model"]
    r_cols = ["strategy", "plan", "baseline_temp_MiB", "temp_MiB", "saved_MiB", "saved_pct", "extra_GFLOP"]
    f_cols = ["case", "GFLOP", "MB_accessed", "intensity", "bound", "estimate_ms", "measured_ms",
              "measured_over_estimate"]
    md = [
        "# Memory benchmark", "",
        f"## Streaming a stack of {depth} layers of {s_meta['layer_MiB']:.1f} MiB ({s_meta['stack_MiB']:.0f} MiB), "
        f"budget {s_meta['budget_MiB']:.0f} MiB (a quarter), batch {s_meta['batch']}", "",
        "Every streamed output is compared bit for bit with the in-memory run (`identical`). "
        "`peak_resident_MiB`: weight bytes on the device (ledger); `peak_live_device_MiB`: arrays in the "
        "device memory kind created by the run, read from `jax.live_arrays()`. Disk reads come from the "
        "page cache (the files were just written).", "",
        table(s_rows, s_cols), "",
        "## Streaming MiniLM (all-MiniLM-L6-v2)", "",
        (f"Skipped: {m_meta['skipped']}" if "skipped" in m_meta else
         f"Batch {m_meta['batch']}; model {m_meta['model_MiB']:.1f} MiB, of which the six encoder layers "
         f"{m_meta['encoder_layers_MiB']:.1f} MiB are streamed ({m_meta['note']}). `prefetch`: layers copied "
         "while the previous one computed; `max_abs_vs_model`: the layer-by-layer run against "
         "`MiniLM.hidden_states`."), "",
        table(m_rows, m_cols) if m_rows else "", "",
        f"## Rematerialisation (compiled memory of the gradient), stages: {', '.join(r_meta['stages'])}, "
        f"batch {r_meta['batch']}", "",
        table(r_rows, r_cols), "",
        "## Roofline on this CPU vs measured", "",
        f"Spec measured by `hardware.local_cpu()`: {f_meta['bandwidth_GBps']:.1f} GB/s, "
        f"{f_meta['float32_GFLOPs']:.0f} GFLOP/s float32, {f_meta['bfloat16_GFLOPs']:.0f} GFLOP/s bfloat16.", "",
        table(f_rows, f_cols), "",
    ]
    text = "\n".join(md)
    print(text)
    data = {"env": env, "streaming": {"meta": s_meta, "rows": s_rows}, "minilm": {"meta": m_meta, "rows": m_rows},
            "remat": {"meta": r_meta, "rows": r_rows}, "roofline": {"meta": f_meta, "rows": f_rows}}  # fmt: skip
    _common.write_results("memory", text, data, quick=args.quick, out=args.out)


if __name__ == "__main__":
    main()
