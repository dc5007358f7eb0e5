"""Quantization benchmark: sizes, errors, throughput and the quantized matmul, per format.

1. A 4096 x 4096 float32 Gaussian matrix: bytes, bits per value, ratio, SQNR, cosine; quantize and
   dequantize throughput (GB/s of float32 input, jitted, warm, ``block_until_ready``); and
   ``quant.dot(x, q)`` against the float32 ``x @ w`` at batch 1, 16 and 256.
2. All eligible weights of all-MiniLM-L6-v2 (``viva_tensor.cli.report.run_report``).

Targets: quantize >= 1 GB/s; ``quant.dot`` within 1.5x of the float32 matmul at batch >= 16.

Run: ``python benchmarks/quantization.py [--quick]``; writes ``benchmarks/results/quantization.md`` and
``.json`` (``--quick``: a 256 x 256 matrix, batches 1 and 16, one repeat, no MiniLM, into results/quick).
Timings are the minimum over the samples of ``viva_tensor._benchmarking.time_fn`` (the least disturbed
run). The core lives in ``viva_tensor/cli/bench/quant.py`` (also run by ``viva-tensor bench quant``).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402 - puts the repository first on sys.path

from viva_tensor.cli.bench import quant as core  # noqa: E402


def main(argv=None) -> int:
    parser = _common.parser(__doc__)
    count = _common.positive_int  # 0 or -5: a usage error (exit 2), never the default
    parser.add_argument("--size", type=count, default=None, help="the matrix is SIZE x SIZE (default 4096)")
    parser.add_argument("-f", "--format", action="append", dest="formats")
    parser.add_argument("--no-minilm", action="store_true")
    args = parser.parse_args(argv)
    size = args.size or (256 if args.quick else 4096)
    batches = (1, 16) if args.quick else (1, 16, 256)
    text, data = core.run(
        args.formats, size=size, batches=batches, repeats=1 if args.quick else 5,
        min_time=0.01 if args.quick else 0.2, minilm=not (args.no_minilm or args.quick),
    )  # fmt: skip
    print(text)
    _common.write_results("quantization", text, data, quick=args.quick, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
