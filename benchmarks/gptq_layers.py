"""GPTQ against round to nearest, layer by layer, on all 36 Linear kernels of all-MiniLM-L6-v2.

Calibration text: English from the standard library's docstrings, as passages of ~230 tokens
(:func:`viva_tensor.models._calibration.calibration_passages`, default) or short sentences
(``--text sentences``), never the evaluation sentences of ``tests/data``. The first ``--calibration``
units calibrate, the next ``--holdout`` are held-out text (disjoint). The 32 evaluation sentences of
``tests/data/minilm_reference.npz`` are a second, out-of-distribution held-out set (used only to
measure). The float32 encoder runs on all three (padding tokens masked out) and every Linear layer's
inputs are reduced on the fly: the calibration inputs to the GPTQ Hessian
(:func:`viva_tensor.gptq.accumulate`), the held-out inputs to their Gram matrix ``G = XᵀX`` (float64), so
that a layer's output error ``||X Wᵀ - X Qᵀ||`` is ``sqrt(sum((D G) * D))`` with ``D = W - Q``,
exact over every token without keeping the activations.

Per format (int4 groups of 128, NF4 block 64, Q4_0) and layer: round to nearest (``quant.quantize``) and
GPTQ (``gptq.quantize``, defaults: damp 0.01, block 128, no act_order), both ordinary records, and the
relative held-out output error ``||X(W - Q)ᵀ|| / ||X Wᵀ||``. Each layer is quantized on the float model's
inputs (one-shot, not sequential). GPTQ time: all 36 layers of a format, after one warm-up per weight
shape (compilation is reported apart).

Run: ``python benchmarks/gptq_layers.py`` (full, writes ``benchmarks/results/gptq_layers.md``;
``--text sentences`` writes ``gptq_layers_sentences.md``) or ``--quick`` (seconds: a few passages, 4 evaluation
sentences, int4 groups of 128 on the first layer's 6 kernels, the other layers float; into results/quick).
"""

from __future__ import annotations

import os
import pathlib
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402 - puts the repository first on sys.path
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from viva_tensor import gptq, nn, quant  # noqa: E402
from viva_tensor.models import _calibration, minilm  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "minilm_reference.npz"
FORMATS = (("int4_group", {"group_size": 128}), ("nf4", {}), ("q4_0", {}))


def _weights(model) -> dict[str, jax.Array]:
    """Every Linear kernel as ``W (out, in)``, by dotted path."""
    from flax import nnx

    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Linear):
            out[".".join(str(p) for p in path)] = jnp.asarray(node.kernel.get_value()).T
    return dict(sorted(out.items()))


def _reduce_inputs(encoder, sentences, batch, on_batch) -> int:
    """Runs the float encoder on ``sentences`` in batches; calls ``on_batch(name, x (B, T, in), mask)``."""
    from flax import nnx

    graphdef, state = nnx.split(encoder.model)
    capture = jax.jit(lambda state, *args: nn.capture_linear_inputs(nnx.merge(graphdef, state), *args))
    tokens = 0
    for start in range(0, len(sentences), batch):  # one compile per batch shape (eagerly: one per operation)
        ids, mask, types = minilm.tokenize(
            encoder.tokenizer, sentences[start : start + batch], max_length=encoder.max_length
        )
        captured = capture(state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
        for name, calls in captured.items():
            on_batch(name, calls[0], jnp.asarray(mask, bool))
        tokens += int(mask.sum())
    return tokens


def collect(encoder, calibration, holdout, evaluation, batch=16):
    hessians: dict[str, gptq.Hessian] = {}
    grams: dict[str, dict[str, np.ndarray]] = {"holdout": {}, "evaluation": {}}

    def add_calibration(name, x, mask):
        hessians[name] = gptq.accumulate(hessians.get(name), x, mask=mask)

    def add_gram(which):
        def add(name, x, mask):
            rows = np.asarray(x, np.float64)[np.asarray(mask)]
            grams[which][name] = grams[which].get(name, 0.0) + rows.T @ rows

        return add

    n_cal = _reduce_inputs(encoder, calibration, batch, add_calibration)
    n_hold = _reduce_inputs(encoder, holdout, batch, add_gram("holdout"))
    n_eval = _reduce_inputs(encoder, evaluation, batch, add_gram("evaluation"))
    return hessians, grams, (n_cal, n_hold, n_eval)


def relative_error(w: jax.Array, q, gram: np.ndarray) -> float:
    w64 = np.asarray(w, np.float64)
    d = w64 - np.asarray(quant.dequantize(q), np.float64)
    return float(np.sqrt(np.sum((d @ gram) * d) / np.sum((w64 @ gram) * w64)))


def _with_records(model, records: dict):
    """A copy of ``model`` with every Linear replaced by ``nn.QLinear`` holding its record."""
    from flax import nnx

    from viva_tensor.nn._graph import set_child

    copy = nnx.clone(model)
    for path, node in [(p, n) for p, n in nnx.iter_graph(copy) if isinstance(n, nnx.Linear)]:
        if ".".join(str(p) for p in path) not in records:  # --quick: the other layers stay float
            continue
        bias = None if node.bias is None else node.bias.get_value()
        set_child(copy, path, nn.QLinear(records[".".join(str(p) for p in path)], bias, dtype=node.dtype))
    return copy


def fidelity(encoder, records: dict, n: int = 32) -> tuple[float, float, float]:
    """Cosine of the sentence embeddings to the original PyTorch model's (the first ``n`` of the 32 fixture
    sentences, evaluation only), mean and min, and the share of sentences with the same nearest neighbour."""
    data = np.load(FIXTURE)
    ref = data["embeddings"][:n].astype(np.float64)
    sentences = [str(s) for s in data["sentences"][:n]]
    e = np.asarray(minilm.encode(encoder.replace(model=_with_records(encoder.model, records)), sentences))
    e = e.astype(np.float64)
    cos = (e * ref).sum(-1) / np.linalg.norm(e, axis=-1) / np.linalg.norm(ref, axis=-1)

    def neighbours(v):
        sim = v @ v.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(axis=1)

    return float(cos.mean()), float(cos.min()), float(np.mean(neighbours(e) == neighbours(ref)))


def run(encoder, hessians, grams, formats=FORMATS, prefix="", n_eval=32):
    weights = {k: w for k, w in _weights(encoder.model).items() if k.startswith(prefix)}
    rows, timing, embeddings = [], {}, {}
    for fmt, options in formats:
        shapes = {}
        for name, w in weights.items():
            shapes.setdefault(w.shape, name)
        t0 = time.perf_counter()
        for name in shapes.values():  # one compile per weight shape
            jax.block_until_ready(gptq.quantize(weights[name], hessians[name], fmt, **options))
        compile_s = time.perf_counter() - t0
        records, t0, c0 = {}, time.perf_counter(), time.process_time()
        for name, w in weights.items():
            records[name] = jax.block_until_ready(gptq.quantize(w, hessians[name], fmt, **options))
        timing[fmt] = (time.perf_counter() - t0, time.process_time() - c0, compile_s)
        rtn_options = {"group_size": 128} if fmt == "int4_group" else {}
        rtns = {name: quant.quantize(w, fmt, **rtn_options) for name, w in weights.items()}
        embeddings[fmt] = {"rtn": fidelity(encoder, rtns, n_eval), "gptq": fidelity(encoder, records, n_eval)}
        for name, w in weights.items():
            rtn = rtns[name]
            row = {"format": fmt, "layer": name, "shape": f"{w.shape[0]}x{w.shape[1]}"}
            for which, suffix in (("holdout", ""), ("evaluation", "_eval")):
                row["rtn" + suffix] = relative_error(w, rtn, grams[which][name])
                row["gptq" + suffix] = relative_error(w, records[name], grams[which][name])
            rows.append(row)
    return rows, timing, embeddings


def table(rows, timing, embeddings, formats=FORMATS, n_eval=32) -> list[str]:
    lines = [
        "| format | GPTQ < RTN, held-out text | geomean GPTQ / RTN | GPTQ < RTN, evaluation sentences | geomean "
        "GPTQ / RTN | GPTQ, 36 layers: wall (s) | CPU (s) | compile (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for fmt, _ in formats:
        mine = [r for r in rows if r["format"] == fmt]
        cells = []
        for suffix in ("", "_eval"):
            wins = sum(r["gptq" + suffix] < r["rtn" + suffix] for r in mine)
            ratio = float(np.exp(np.mean([np.log(r["gptq" + suffix] / r["rtn" + suffix]) for r in mine])))
            cells.append(f"{wins} / {len(mine)} | {ratio:.3f}")
        wall, cpu, compile_s = timing[fmt]
        lines.append(f"| {fmt} | {' | '.join(cells)} | {wall:.2f} | {cpu:.2f} | {compile_s:.1f} |")
    which = f"the {len(rows) // len(formats)} kernels above" if len(rows) != 36 * len(formats) else "all 36 kernels"
    lines += ["", f"Whole model, {which} quantized (one-shot, each on the float model's inputs): cosine of "
              f"the sentence embeddings of {n_eval} evaluation sentences of `tests/data/minilm_reference.npz` to "
              "the original PyTorch model's, and same nearest neighbour.", "",
              "| format | method | mean cosine | min cosine | same nearest neighbour |", "|---|---|---:|---:|---:|"]
    for fmt, _ in formats:
        for method in ("rtn", "gptq"):
            mean, low, nn_share = embeddings[fmt][method]
            lines.append(f"| {fmt} | {method.upper()} | {mean:.4f} | {low:.4f} | {nn_share * n_eval:.0f}/{n_eval} |")
    lines += ["", "Per layer: relative output error on the held-out text, RTN and GPTQ; and GPTQ / RTN on the "
              "evaluation sentences (below 1: GPTQ better).", "",
              "| layer | out x in | " + " | ".join(f"{f} RTN | {f} GPTQ | {f} eval ratio" for f, _ in formats) + " |",
              "|---|---|" + "---:|---:|---:|" * len(formats)]  # fmt: skip
    by_layer: dict[str, dict] = {}
    for r in rows:
        by_layer.setdefault(r["layer"], {"shape": r["shape"]})[r["format"]] = r
    for layer, v in by_layer.items():
        cells = " | ".join(
            f"{v[f]['rtn']:.4f} | {v[f]['gptq']:.4f} | {v[f]['gptq_eval'] / v[f]['rtn_eval']:.3f}" for f, _ in formats
        )
        lines.append(f"| {layer} | {v['shape']} | {cells} |")
    return lines


def main() -> None:
    parser = _common.parser(__doc__)
    parser.add_argument("--text", choices=("passages", "sentences"), default="passages", help="calibration units")
    parser.add_argument("--calibration", type=int, default=None, help="calibration passages (default 128)")
    parser.add_argument("--holdout", type=int, default=None, help="held-out passages (default 32)")
    args = parser.parse_args()
    scale = 1 if args.text == "passages" else 8  # about 8 sentences a passage
    n_cal = args.calibration or scale * (4 if args.quick else 128)
    n_hold = args.holdout or scale * (2 if args.quick else 32)
    text = _calibration.calibration_passages() if args.text == "passages" else _calibration.calibration_text()
    calibration, holdout = text[:n_cal], text[n_cal : n_cal + n_hold]
    n_eval = 4 if args.quick else 32  # --quick: 4 evaluation sentences, int4 g128 on the first layer's 6 kernels
    evaluation = [str(s) for s in np.load(FIXTURE)["sentences"]][:n_eval]
    formats, prefix = (FORMATS[:1], "layers.0.") if args.quick else (FORMATS, "")
    encoder = minilm.load()
    t0 = time.perf_counter()
    hessians, grams, (tok_cal, tok_hold, tok_eval) = collect(encoder, calibration, holdout, evaluation)
    collect_s = time.perf_counter() - t0
    rows, timing, embeddings = run(encoder, hessians, grams, formats, prefix, n_eval)
    lines = table(rows, timing, embeddings, formats, n_eval)
    print("\n".join(lines))
    header = [
        "# GPTQ against round to nearest on MiniLM's 36 Linear kernels",
        "",
        f"all-MiniLM-L6-v2. Calibration: the first {len(calibration)} {args.text} of "
        f"`viva_tensor.models._calibration.calibration_{'passages' if args.text == 'passages' else 'text'}()` "
        f"(standard-library docstrings; {tok_cal} tokens); held-out text: the next {len(holdout)} ({tok_hold} "
        "tokens); none of them is an evaluation sentence of `tests/data`. Evaluation sentences: the 32 of "
        f"`tests/data/minilm_reference.npz` ({tok_eval} tokens, two long paragraphs; never used to calibrate). "
        "Inputs of every Linear captured from the float32 encoder (padding masked out). "
        "Error = relative output error ||X(W - Q)ᵀ|| / ||X Wᵀ|| over every token of the set. "
        "GPTQ: `gptq.quantize(w, h, fmt)` with damp 0.01, block 128, no act_order; RTN: `quant.quantize(w, fmt)`; "
        "int4_group with groups of 128, nf4 block 64, q4_0 blocks of 32. Each layer on the float model's "
        "inputs (one-shot). GPTQ time: the 36 layers after one compile per weight shape (compile apart). "
        f"Collecting the Hessians and held-out Grams: {collect_s:.1f} s. "
        f"Machine: {platform.machine()}, {jax.devices()[0].platform}, jax {jax.__version__}, 2 cores shared with "
        f"other jobs (load average {os.getloadavg()[0]:.1f} at the end: wall times are inflated, CPU is the "
        "process's user + system time). "
        "Written by `python benchmarks/gptq_layers.py`.",
    ]
    suffix = "" if args.text == "passages" else "_sentences"
    _common.write_results(f"gptq_layers{suffix}", "\n".join(header + [""] + lines), {"rows": rows, "timing": timing},
                          out=_common.results_dir(args))


if __name__ == "__main__":
    main()
