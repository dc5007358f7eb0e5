"""QLoRA: memory of one compiled training step (adam), and MiniLM's NF4 fidelity won back by distillation.

Memory is XLA's ``memory_analysis()`` of one jitted training step (``viva_tensor._xla.compiled_memory``;
nothing runs), parameters and optimizer state donated as a training loop does:

- one 4096x4096 ``nnx.Linear``, batch 16 (``--quick``: 256x256): full float32 fine-tuning (adam on the
  kernel and the bias) against QLoRA (the kernel in NF4, frozen; LoRA rank 16 trained), each step also
  returning the gradient of the layer's input, as a layer inside a deep network does;
- MiniLM (all-MiniLM-L6-v2's sizes), batch 16 x 64 tokens, loss on the sentence embeddings: full float32
  fine-tuning against QLoRA (every Linear kernel NF4, rank 8 adapters): the training state (the step's
  arguments: frozen base + trainable parameters + adam's two moments) and the whole step; the same with
  the 6 layers run by ``viva_tensor.memory.apply_layers`` under its checkpoint policies.

Distillation (``minilm.distill``, ``--only distill``): the NF4 MiniLM with LoRA adapters (rank ``--rank``, default 16)
trained to match the float32 model on the default text (the standard library's docstrings, the installed
distributions' descriptions and message catalogs, odd texts (docstring examples, numeric README lines, questions),
35% spans of 1-8 words; packed rows of 256 tokens); ``--only qat``: the same
with quantization-aware training of int4 kernels (``int4_group``, groups of 128), then frozen to real records;
``--only int4``: LoRA on the GPTQ int4 (groups of 128) base. ``distill``'s defaults: the frozen base quantized by GPTQ
(``minilm.quantize``), the adapters started at the calibrated correction of its error (``nn.lora(init="calibrated")``);
the step-0 fidelity of that base and that start is measured too, and their preparation's CPU time is counted.
Measured on the 32 sentences of ``tests/data/minilm_reference.npz`` (never trained on: tested): mean / min cosine
to the float32 encoder and nearest-neighbour agreement, before and after; wall and CPU seconds of the training
(CPU time of the process; the machine's load average is recorded: it is shared).
``--quick``: a 256x256 layer, a 2-layer MiniLM of width 64, and 2 distillation steps on a random one (the int4 part,
the same code as the NF4 one with another format, only with ``--only int4``).
"""

from __future__ import annotations

import os
import time

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from viva_tensor import memory, nn
from viva_tensor._xla import compiled_memory
from viva_tensor.models import _calibration, minilm

MiB = 2**20


def _abstract(tree):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def step_memory(graphdef, params, frozen, loss_of, batch, tx, *, input_grad: bool = False) -> dict:
    """Compiled memory of ``params, opt_state = adam step`` on ``loss_of(model, *batch)`` (params donated).

    ``input_grad``: also return the gradient of the first batch array (a layer inside a deep network passes it
    back to the layer before)."""

    def step(params, opt_state, frozen, *batch):
        def loss(p, x0):
            return loss_of(nnx.merge(graphdef, p, frozen), x0, *batch[1:])

        value, grads = jax.value_and_grad(loss, argnums=(0, 1) if input_grad else 0)(params, batch[0])
        grads, dx = grads if input_grad else (grads, None)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value, dx

    opt_state = jax.eval_shape(tx.init, params)
    m = compiled_memory(jax.jit(step, donate_argnums=(0, 1)), params, opt_state, frozen, *batch)
    batch_bytes = sum(int(np.prod(b.shape)) * jnp.dtype(b.dtype).itemsize for b in batch)
    return {
        "state_bytes": m.argument_bytes - batch_bytes,
        "argument_bytes": m.argument_bytes,
        "output_bytes": m.output_bytes,
        "temp_bytes": m.temp_bytes,
        "alias_bytes": m.alias_bytes,
        "total_bytes": m.total_bytes,
    }


def layer_rows(n: int, batch: int = 16) -> list[dict]:
    tx = optax.adam(1e-3)
    x = jax.ShapeDtypeStruct((batch, n), jnp.float32)
    y = jax.ShapeDtypeStruct((batch, n), jnp.float32)

    def mse(model, x, y):
        return jnp.mean((model(x) - y) ** 2)

    full = nnx.eval_shape(lambda: nnx.Linear(n, n, rngs=nnx.Rngs(0)))
    g, params = nnx.split(full, nnx.Param)
    rows = [
        {"setup": f"full float32, {n}x{n}", **step_memory(g, params, nnx.State({}), mse, (x, y), tx, input_grad=True)}
    ]
    q = nnx.eval_shape(
        lambda: nn.lora(nn.QLinear.from_linear(nnx.Linear(n, n, rngs=nnx.Rngs(0)), "nf4"), rank=16, rngs=nnx.Rngs(1))
    )
    g, adapters, frozen = nnx.split(q, nn.LoRAParam, ...)
    q = step_memory(g, adapters, frozen, mse, (x, y), tx, input_grad=True)
    rows.append({"setup": f"QLoRA NF4 rank 16, {n}x{n}", **q})
    rows[-1]["weight_f32_bytes"] = rows[0]["weight_f32_bytes"] = n * n * 4
    return rows


def _embedding_loss(model, ids, mask, target):
    return jnp.mean(1.0 - jnp.sum(model(ids, mask) * target, axis=-1))


def _scanned_loss(strategy):
    """The same loss with the layers run by ``memory.apply_layers`` (a scan over the stacked layers)."""

    def loss(model, ids, mask, target):
        x = model.embeddings(ids, jnp.zeros_like(ids))
        lgraph, _ = nnx.split(model.layers[0])
        stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[nnx.state(layer) for layer in model.layers])
        mbool = mask.astype(bool)
        h = memory.apply_layers(lambda p, h: nnx.merge(lgraph, p)(h, mbool), stacked, x, strategy=strategy)
        w = mask.astype(jnp.float32)[..., None]
        pooled = (h * w).sum(1) / jnp.maximum(w.sum(1), 1e-9)
        e = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return jnp.mean(1.0 - jnp.sum(e * target, axis=-1))

    return loss


def minilm_rows(cfg: minilm.MiniLMConfig, batch: int, tokens: int, rank: int) -> list[dict]:
    tx = optax.adam(1e-3)
    ids = jax.ShapeDtypeStruct((batch, tokens), jnp.int32)
    target = jax.ShapeDtypeStruct((batch, cfg.hidden_size), jnp.float32)
    teacher = nnx.eval_shape(lambda: minilm.MiniLM(cfg, rngs=nnx.Rngs(0)))
    student = nnx.eval_shape(
        lambda: nn.lora(nn.quantize_model(minilm.MiniLM(cfg, rngs=nnx.Rngs(0)), "nf4")[0], rank=rank, rngs=nnx.Rngs(1))
    )
    g_full, p_full = nnx.split(teacher, nnx.Param)
    g_q, adapters, frozen = nnx.split(student, nn.LoRAParam, ...)
    policies = [
        ("layers unrolled", _embedding_loss),
        ("scan, no checkpoint", _scanned_loss(memory.NoCheckpoint())),
        ("scan, EveryN(1)", _scanned_loss(memory.EveryN(1))),
        ("scan, EveryN(2)", _scanned_loss(memory.EveryN(2))),
    ]
    rows = []
    for name, loss in policies:
        full = step_memory(g_full, p_full, nnx.State({}), loss, (ids, ids, target), tx)
        q = step_memory(g_q, adapters, frozen, loss, (ids, ids, target), tx)
        rows.append({"setup": f"full float32, {name}", **full})
        rows.append({"setup": f"QLoRA NF4 rank {rank}, {name}", **q})
        mib = {k: v / MiB for k, v in (("fs", full["state_bytes"]), ("ft", full["total_bytes"]),
                                       ("qs", q["state_bytes"]), ("qt", q["total_bytes"]))}  # fmt: skip
        print(f"{name:22s} full state {mib['fs']:7.1f} MiB step {mib['ft']:7.1f} | "
              f"qlora state {mib['qs']:6.1f} MiB step {mib['qt']:7.1f}", flush=True)  # fmt: skip
    return rows


def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def _top1(e):
    s = np.asarray(e, np.float64) @ np.asarray(e, np.float64).T
    np.fill_diagonal(s, -np.inf)
    return s.argmax(1)


def _fidelity(e, base) -> dict:
    cos = _cos(e, base)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "top1_agreement": float(np.mean(_top1(e) == _top1(base)))}  # fmt: skip


def _zero_adapters(model):
    """The frozen base of a LoRA model: a copy with every ``B`` set to zero (exactly the base's outputs)."""
    base = nnx.clone(model)
    for _, node in nnx.iter_graph(base):
        if isinstance(node, nn.LoRALinear):
            node.lora_b.set_value(jnp.zeros_like(node.lora_b.get_value()))
    return base


def distill_row(
    quick: bool,
    steps: int,
    rank: int,
    method: str = "lora",
    fmt: str = "nf4",
    learning_rate: float | None = None,
    lora: dict | None = None,
    rotate: int | None = None,
) -> dict:
    """One distillation run; ``lora``: ``minilm.distill``'s ``train`` / ``bias_learning_rate`` / ``adapter_dtype``
    (``"lora"`` only); ``rotate``: the frozen base's input rotation (``options={"rotate": ...}``, ``"lora"`` only)."""
    if quick:
        tok = minilm.load_tokenizer(max_length=64)
        cfg = minilm.MiniLMConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
        encoder = minilm.SentenceEncoder(minilm.MiniLM(cfg, rngs=nnx.Rngs(0)), tok, 64)
        text, held_out, batch = _calibration.calibration_text(120), 16, 4
    else:
        encoder, text, held_out, batch = minilm.load(), None, 64, 8
    sentences = [str(s) for s in np.load(_common.FIXTURE)["sentences"]]
    sentences = sentences[:8] if quick else sentences
    base = np.asarray(minilm.encode(encoder, sentences))
    qmodel, _ = nn.quantize_model(encoder.model, fmt)
    before = _fidelity(np.asarray(minilm.encode(encoder.replace(model=qmodel), sentences)), base)
    kwargs = {"text": text, "batch_size": batch, "held_out": held_out, "progress": False}
    if rotate is not None and method == "lora":
        kwargs["options"] = {"rotate": rotate}
    lora = dict(lora or {}) if method == "lora" else {}
    start = {}
    if method == "lora":  # the step-0 student (the default GPTQ base, adapters at their calibrated start)
        student0, report0 = minilm.distill(encoder, fmt=fmt, rank=rank, alpha=2 * rank, steps=0, **kwargs)
        start["base"] = _fidelity(np.asarray(minilm.encode(student0.replace(model=_zero_adapters(student0.model)),
                                                           sentences)), base)  # fmt: skip
        start["init"] = _fidelity(np.asarray(minilm.encode(student0, sentences)), base)
        start["base_name"], start["init_name"] = report0.base, report0.init
        print(f"step 0: {report0.base} base {start['base']}, + {report0.init} adapters {start['init']}", flush=True)
        del student0
    load0 = os.getloadavg()[0]
    student, report = minilm.distill(encoder, method=method, fmt=fmt, rank=rank, alpha=2 * rank, steps=steps,
                                     learning_rate=learning_rate, **lora, **{**kwargs, "progress": True})  # fmt: skip
    after = _fidelity(np.asarray(minilm.encode(student, sentences)), base)
    row = {
        "method": method, "fmt": fmt, "steps": steps, "rank": report.rank, "batch": batch,
        "row_tokens": min(encoder.max_length, 256), "train_seconds": report.seconds,
        "train_cpu_seconds": report.cpu_seconds, "prepare_seconds": report.prepare_seconds,
        "prepare_cpu_seconds": report.prepare_cpu_seconds, "total_cpu_seconds": report.total_cpu_seconds,
        "base": report.base, "init": report.init, "start": start,
        "load_average_start": load0, "load_average_end": os.getloadavg()[0],
        "cpu_count": os.cpu_count(), "adapter_bytes": report.adapter_bytes, "quantized_bytes": report.quantized_bytes,
        "adapter_fraction": report.adapter_fraction, "held_out_cosine_before": report.held_out_cosine_before,
        "held_out_cosine_after": report.held_out_cosine_after, "sentences": report.sentences,
        "before": before, "after": after, "losses": list(report.losses),
        "train": list(lora.get("train", ("lora",))) if method == "lora" else [],
        "bias_learning_rate": lora.get("bias_learning_rate"),
        "adapter_dtype": str(jnp.dtype(lora["adapter_dtype"])) if lora.get("adapter_dtype") else "float32",
        "learning_rate": learning_rate, "rotate": rotate if method == "lora" else None,
    }  # fmt: skip
    print(report, flush=True)
    print(f"evaluation sentences: before {before}, after {after}", flush=True)
    return row


def _distill_md(row: dict) -> list[str]:
    b, a = row["before"], row["after"]
    if row["method"] == "qat":
        title = f"## Distillation: {row['fmt']} MiniLM by quantization-aware training (kernels trained, then frozen)"
        trained = f"{row['fmt']} QAT, {row['steps']} steps, frozen"
        size = f"No adapters: the frozen model is {row['quantized_bytes']:,} bytes."
    else:
        title = f"## Distillation: {row['fmt']} MiniLM + LoRA, trained to match float32 on text shipped with Python"
        trained = f"{row['fmt']} ({row['base']}) + LoRA rank {row['rank']} ({row['init']} start), {row['steps']} steps"
        extra = [p for p in row.get("train", []) if p != "lora"]
        if extra:
            trained += f", {' and '.join(extra)} trained too"
        if row.get("adapter_dtype", "float32") != "float32":
            trained += f", adapters stored {row['adapter_dtype']}"
        if row.get("rotate"):
            trained += f", base inputs rotated (rotate={row['rotate']})"
        size = (f"Adapters {row['adapter_bytes']:,} bytes = {100 * row['adapter_fraction']:.2f}% of the quantized "
                f"model ({row['quantized_bytes']:,} bytes).")  # fmt: skip
    return [title, "", "| | mean cosine | min cosine | top-1 agreement |", "|---|---|---|---|",
            f"| {row['fmt']} (round to nearest) | {b['mean_cosine']:.4f} | {b['min_cosine']:.4f} | "
            f"{b['top1_agreement']:.3f} |",
            *[f"| {row['fmt']} {label}, step 0 | {f['mean_cosine']:.4f} | {f['min_cosine']:.4f} | "
              f"{f['top1_agreement']:.3f} |"
              for label, f in ((f"{row['start'].get('base_name')} (the frozen base)", row["start"].get("base")),
                               (f"+ {row['start'].get('init_name')} adapters", row["start"].get("init"))) if f],
            f"| {trained} | {a['mean_cosine']:.4f} | {a['min_cosine']:.4f} | {a['top1_agreement']:.3f} |", "",
            f"On the {len(np.load(_common.FIXTURE)['sentences'])} evaluation sentences of "
            "`tests/data/minilm_reference.npz` (cosine to the float32 encoder; never in the training text). "
            f"Held-out training texts (not trained on): {row['held_out_cosine_before']:.4f} -> "
            f"{row['held_out_cosine_after']:.4f}. {size} Preparation (GPTQ, the calibration Gram "
            f"matrices, the adapters' start): {row['prepare_seconds']:.0f} s wall, {row['prepare_cpu_seconds']:.0f} s "
            f"CPU. Training: {row['train_seconds']:.0f} s wall, "
            f"{row['train_cpu_seconds']:.0f} s CPU time of the process (compilation included; batch {row['batch']} "
            f"packed rows x {row['row_tokens']} tokens) on {row['cpu_count']} cores with a load average of "
            f"{row['load_average_start']:.1f} -> {row['load_average_end']:.1f} (the machine was shared). Total CPU "
            f"time (preparation + training): {row['total_cpu_seconds']:.0f} s.",
            ""]  # fmt: skip


def _table(rows: list[dict]) -> str:
    lines = ["| setup | training state | arguments | outputs | temporaries | whole step |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['setup']} | {r['state_bytes'] / MiB:.1f} MiB | {r['argument_bytes'] / MiB:.1f} MiB | "
            f"{r['output_bytes'] / MiB:.1f} MiB | {r['temp_bytes'] / MiB:.1f} MiB | {r['total_bytes'] / MiB:.1f} MiB |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = _common.parser(__doc__)
    p.add_argument(
        "--only", choices=["memory", "distill", "qat", "int4"], default=None, help="run one part (writes qlora_PART.*)"
    )
    p.add_argument("--steps", type=_common.positive_int, default=None, help="distillation steps (default 120)")
    p.add_argument("--rank", type=_common.positive_int, default=16, help="distillation adapters' rank")
    p.add_argument("--rotate", type=_common.positive_int, default=None,
                   help="LoRA: rotate the frozen base's inputs (Hadamard blocks of up to this size)")
    p.add_argument("--learning-rate", type=float, default=None, help="distillation's peak learning rate")
    p.add_argument("--train", default=None, help="LoRA parts that train, comma-separated (lora,bias,norm)")
    p.add_argument("--bias-learning-rate", type=float, default=None, help="peak learning rate of biases and norms")
    p.add_argument("--adapter-dtype", choices=["float32", "bfloat16"], default=None, help="adapters' stored dtype")
    args = p.parse_args(argv)
    lora = {k: v for k, v in (("train", tuple(args.train.split(",")) if args.train else None),
                              ("bias_learning_rate", args.bias_learning_rate),
                              ("adapter_dtype", jnp.dtype(args.adapter_dtype) if args.adapter_dtype else None))
            if v is not None}  # fmt: skip
    data, md = {}, []
    if args.only in (None, "memory"):
        n = 256 if args.quick else 4096
        layer = layer_rows(n)
        full, q = layer
        md += [f"## One {n}x{n} layer, batch 16, adam (parameters and optimizer state donated)", "", _table(layer), "",
               f"QLoRA / full: whole step {q['total_bytes'] / full['total_bytes']:.3f}, training state "
               f"{q['state_bytes'] / full['state_bytes']:.3f}; QLoRA temporaries / (weight float32 bytes / 4) = "
               f"{q['temp_bytes'] / (q['weight_f32_bytes'] / 4):.2f}.", ""]  # fmt: skip
        print(md[-2], flush=True)
        small = {"vocab_size": 1000, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}
        cfg = minilm.MiniLMConfig(**small) if args.quick else minilm.MiniLMConfig()
        rows = minilm_rows(cfg, 16, 64, 8)
        f0, q0 = rows[0], rows[1]
        md += [f"## MiniLM ({cfg.num_layers} layers), batch 16 x 64 tokens, adam, loss on the sentence embeddings", "",
               _table(rows), "",
               f"QLoRA / full (layers unrolled): training state {q0['state_bytes'] / f0['state_bytes']:.3f}, whole "
               f"step {q0['total_bytes'] / f0['total_bytes']:.3f}. At this batch the activations (temporaries), not "
               "the weights, dominate the whole step; the scan rows show what `memory.apply_layers` checkpoint "
               "policies save of them.", ""]  # fmt: skip
        data["layer"], data["minilm"] = layer, rows
    for part, method, fmt in (("distill", "lora", "nf4"), ("qat", "qat", "int4_group"), ("int4", "lora", "int4_group")):
        if args.only == part or (args.only is None and not (args.quick and part == "int4")):
            steps = args.steps or (2 if args.quick else 120)
            fmt = "q4_0" if args.quick and fmt == "int4_group" else fmt
            row = distill_row(args.quick, steps, args.rank, method, fmt, args.learning_rate, lora, args.rotate)
            md += _distill_md(row)
            data[part] = row
    name = "qlora" if args.only is None else f"qlora_{args.only}"
    _common.write_results(name, "\n".join(md), data, quick=args.quick, out=args.out)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"{time.perf_counter() - t0:.1f} s", flush=True)
