"""MiniLM encoding speed: sentences per second of ``minilm.encode`` against sentence-transformers, one run.

The sentences are ``--sentences`` (default 512) varied English sentences that are not the fidelity
evaluation sentences: the calibration text of :mod:`viva_tensor.models._calibration` (7/8 short
sentences of 6-40 words, 1/8 passages of ~170 words, truncated at the model's 256 tokens), the same list
for every encoder. Encoders, all all-MiniLM-L6-v2 from the same model folder
(``minilm.default_model_dir()``):

- viva_tensor float32 (``minilm.encode``: every sentence packed into shared rows, ``"dense"``
  attention), float32 with ``attention="exact"`` (the reference order of the attention sums: the
  encoder before this benchmark's fixes, with packing), float32 with ``pack=False`` (each sentence
  its own padded row), and the 36 Linear
  kernels in q8_0 and in a 4-bit format (``nn.quantize_model``), and q8_0 with int8 activations
  (``activation_quant="int8"``, dynamic W8A8) where this checkout's ``QLinear`` offers it;
- sentence-transformers (PyTorch, ``SentenceTransformer.encode(batch_size=32)``), in this same process,
  when ``torch`` and ``sentence_transformers`` are importable (the script says so and skips it when they
  are not: torch is never a dependency of viva_tensor). Its threads are set to ``--threads`` (default
  ``min(2, cpu_count)``); XLA uses every core of the machine (2 on the machine of the committed results).

Each encoder is called once untimed (compilation), then the encoders take turns for ``--rounds``
rounds, each call timed by ``viva_tensor._benchmarking.time_fn`` (one sample), so a load change on a
shared machine hits all of them alike; the table gives the best and the median round as sentences/s and
the ratio to sentence-transformers' best, and the least process CPU time per call. The first (compiling)
call of the float32 encoder is reported too: a new process pays it once per (rows, length) shape. The
cosine of each encoder's embeddings to sentence-transformers' (or to viva_tensor float32's) says they
computed the same thing.

``--single-thread`` pins the process to one CPU (XLA, the kernels and torch on one thread each) and writes
``minilm_speed_1thread``: on a shared machine (the committed results were measured with other jobs running)
a 2-thread pool that waits for a preempted thread loses wall time, torch's more than XLA's, so one pinned core
is the comparison least disturbed by the load; the 2-thread table is the target's condition.

Run: ``python benchmarks/minilm_speed.py [--quick] [--single-thread]`` from the repository root, in an environment that
has viva_tensor's dependencies and, for the comparison, torch and sentence-transformers; writes
``benchmarks/results/minilm_speed.{md,json}`` (``--quick``: 16 sentences, 1 round, without the
``attention="exact"`` and ``pack=False`` rows, into results/quick).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if "--single-thread" in sys.argv:  # before jax is imported: importing the library starts XLA's CPU client
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                               "intra_op_parallelism_threads=1").strip()
    os.environ["VIVA_TENSOR_KERNEL_THREADS"] = "1"  # the compiled quantized-matmul kernels too
    if hasattr(os, "sched_setaffinity"):  # and the whole process on one CPU: XLA's thunk runtime has its own pool
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import _common  # noqa: E402 - puts the repository first on sys.path
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from viva_tensor import nn  # noqa: E402
from viva_tensor.models import _calibration, minilm  # noqa: E402

FOUR_BIT = "q4_0"
"""The 4-bit format measured (GGML's, blocks of 32 along the inputs)."""


def sentences(n: int) -> list[str]:
    """``n`` varied sentences: 7/8 short calibration sentences, 1/8 long passages."""
    passages = n // 8
    return _calibration.calibration_text(n - passages) + _calibration.calibration_passages(passages)


def sentence_transformers_encoder(threads: int):
    """``(encode function, description)``, or ``(None, why not)`` when torch or sentence-transformers is missing."""
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        return None, f"not measured: {e.name or e} is not importable here (torch is never a viva_tensor dependency)"
    torch.set_num_threads(threads)
    model = SentenceTransformer(str(minilm.default_model_dir()), device="cpu")
    model.eval()

    def encode(s):
        return model.encode(s, batch_size=32, convert_to_numpy=True, show_progress_bar=False)

    return encode, f"sentence-transformers (torch {torch.__version__}, {torch.get_num_threads()} threads)"


def with_int8_activations(model):
    """A copy whose QLinear layers quantize their inputs per token (``activation_quant="int8"``, dynamic
    W8A8), or None where this checkout's QLinear has no such option."""
    copy = nnx.clone(model)
    layers = [node for _, node in nnx.iter_graph(copy) if isinstance(node, nn.QLinear)]
    if not layers or not hasattr(layers[0], "activation_quant"):
        return None
    for layer in layers:
        layer.activation_quant = "int8"
    return copy


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def main() -> None:
    p = _common.parser(__doc__)
    p.add_argument("--sentences", type=_common.positive_int, default=512, help="sentences encoded (default 512)")
    p.add_argument("--rounds", type=_common.positive_int, default=5, help="timed rounds per encoder (default 5)")
    p.add_argument("--threads", type=_common.positive_int, default=min(2, os.cpu_count() or 1),
                   help="torch threads (default min(2, cpu_count))")
    p.add_argument("--single-thread", action="store_true",
                   help="XLA and torch on one thread each (results minilm_speed_1thread): on a shared machine the "
                   "CPU time of one thread is the comparison least disturbed by other processes")
    args = p.parse_args()
    if args.single_thread:  # XLA's flags were set before jax was imported (top of this file)
        args.threads = 1
    n, rounds = (16, 1) if args.quick else (args.sentences, args.rounds)
    text = sentences(n)
    encoder = minilm.load()
    lengths = [len(e.ids) for e in encoder.tokenizer.encode_batch(text)]

    encoders = {"viva_tensor float32": lambda s: minilm.encode(encoder, s)}
    if not args.quick:  # --quick: the default encoder and the quantized ones only (seconds, for CI)
        exact = encoder.replace(model=minilm.load_model(attention="exact"))
        encoders["viva_tensor float32, attention=exact"] = lambda s: minilm.encode(exact, s)
        encoders["viva_tensor float32, pack=False"] = lambda s: minilm.encode(encoder, s, pack=False)
    for fmt in ("q8_0", FOUR_BIT):
        quantized = encoder.replace(model=nn.quantize_model(encoder.model, fmt)[0])
        encoders[f"viva_tensor {fmt}"] = lambda s, e=quantized: minilm.encode(e, s)
        w8a8 = with_int8_activations(quantized.model) if fmt == "q8_0" else None
        if w8a8 is not None:
            w8a8_encoder = quantized.replace(model=w8a8)
            encoders[f"viva_tensor {fmt} W8A8"] = lambda s, e=w8a8_encoder: minilm.encode(e, s)
    peer, peer_name = sentence_transformers_encoder(args.threads)
    print(f"peer: {peer_name}")
    if peer is not None:
        encoders[peer_name] = peer

    t0 = time.perf_counter()
    outputs = {"viva_tensor float32": np.asarray(encoders["viva_tensor float32"](text))}
    first_call = time.perf_counter() - t0
    for name, f in encoders.items():
        if name not in outputs:
            outputs[name] = np.asarray(f(text))  # compiles its shapes
    times: dict[str, list[float]] = {name: [] for name in encoders}
    cpu: dict[str, list[float]] = {name: [] for name in encoders}
    for _ in range(rounds):
        for name, f in encoders.items():
            t = _common.time_fn(f, text, repeats=1, warmup=0)
            times[name].append(t.min_s)
            cpu[name].append(t.cpu_s)

    base = peer_name if peer is not None else "viva_tensor float32"
    rows, data = [], {}
    for name, ts in times.items():
        best, median = len(text) / min(ts), len(text) / float(np.median(ts))
        cos = cosine(outputs[name], outputs[base])
        ratio = best / (len(text) / min(times[base]))
        cpu_ratio = min(cpu[base]) / min(cpu[name])
        data[name] = {"best_sentences_per_s": best, "median_sentences_per_s": median, "ratio_to_" + base: ratio,
                      "seconds": ts, "cpu_seconds": cpu[name], "cpu_ratio_to_" + base: cpu_ratio,
                      "min_cosine_to_" + base: float(cos.min())}
        rows.append(f"| {name} | {best:.0f} | {median:.0f} | {ratio:.2f}x | {min(cpu[name]):.2f} | {cpu_ratio:.2f}x "
                    f"| {cos.min():.6f} |")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    md = "\n".join([
        "# MiniLM encoding speed" + (" (XLA and torch on one thread each)" if args.single_thread else ""),
        "",
        f"{len(text)} sentences ({sum(lengths)} tokens, mean {np.mean(lengths):.1f}, max {max(lengths)}), "
        f"{rounds} interleaved rounds; peer: {peer_name}. Load average at the end: "
        f"{', '.join(f'{x:.1f}' for x in load) if load else 'n/a'} ({os.cpu_count()} CPUs).",
        "",
        f"| encoder | sentences/s (best round) | sentences/s (median) | best vs {base} | CPU s (least) "
        f"| CPU time of {base} / this | min cosine to {base} |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"viva_tensor float32's first call (tokenize + compile every shape + encode): {first_call:.2f} s. "
        "CPU time is the process's (every thread): on a loaded machine a spinning thread pool inflates it.",
    ])
    data["first_call_s"] = first_call
    data["sentences"], data["tokens"], data["rounds"], data["load_average"] = len(text), sum(lengths), rounds, load
    print(md)
    data["single_thread"] = args.single_thread
    name = "minilm_speed_1thread" if args.single_thread else "minilm_speed"
    _common.write_results(name, md, data, quick=args.quick, out=args.out)


if __name__ == "__main__":
    main()
