"""Quantization benchmark: sizes, errors, throughput and the quantized matmul, per format.

1. A 4096 x 4096 float32 Gaussian matrix: bytes, bits per value, ratio, SQNR, cosine; quantize and
   dequantize throughput (GB/s of float32 input, jitted, warm, ``block_until_ready``); and
   ``quant.dot(x, q)`` against the float32 ``x @ w`` at batch 1, 16 and 256.
2. All eligible weights of all-MiniLM-L6-v2 (``viva_tensor.cli.report.run_report``).

Targets: quantize >= 1 GB/s; ``quant.dot`` within 1.5x of the float32 matmul at batch >= 16.

Run: ``python benchmarks/quantization.py [--quick]``; writes ``benchmarks/results/quantization.md`` and
``.json``. Timings are the minimum over repeats (the least disturbed run). The core lives in
``viva_tensor/cli/bench/quant.py`` (also run by ``viva-tensor bench quant``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from viva_tensor.cli.bench import quant as _bench_quant  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (noisy)")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("-f", "--format", action="append", dest="formats")
    parser.add_argument("--no-minilm", action="store_true")
    args = parser.parse_args(argv)
    text, data = _bench_quant.run(
        args.formats, size=args.size, repeats=2 if args.quick else 5, minilm=not args.no_minilm
    )
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "quantization.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(RESULTS, "quantization.json"), "w") as fh:
        json.dump(data, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
