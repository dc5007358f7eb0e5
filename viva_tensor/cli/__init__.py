"""The ``viva-tensor`` command (also ``python -m viva_tensor``).

- ``viva-tensor report [CHECKPOINT] [-f FMT ...]``: the memory-multiplication report (the default
  command): every format on every eligible tensor of a safetensors checkpoint (default: the bundled
  all-MiniLM-L6-v2 weights).
- ``viva-tensor quantize CHECKPOINT -f FMT -o OUT [--force]``: a safetensors checkpoint in, a quantized
  checkpoint (:func:`viva_tensor.quant.save`) out; tensors that cannot be quantized are listed and kept.
- ``viva-tensor bench attention|quant [--quick]``: the benchmarks' core (:mod:`viva_tensor.cli.bench`:
  flash attention against ``jax.nn.dot_product_attention``; every format's size, error, throughput and
  ``quant.dot`` time), printed as markdown tables; sizes can be made tiny with flags.
  ``benchmarks/*.py`` also write results.
- ``viva-tensor tour``: a short guided tour of the library (:mod:`viva_tensor.cli.tour`).
- ``viva-tensor inspect FILE``: what a checkpoint holds (GGUF, bitsandbytes, GPTQ, AWQ, compressed-tensors
  or viva_tensor; a file or a Hugging Face folder): a table of tensor, format, shape, bits/value, bytes.
- ``viva-tensor convert IN OUT --to gguf|bnb|gptq|awq|compressed-tensors|viva [-f FMT]``: one kind of
  checkpoint into another (:func:`viva_tensor.interop.convert`): records the target stores are kept bit for
  bit, the others re-quantized (listed on stderr); ``-f`` quantizes every weight into ``FMT``.

Errors (a missing or unreadable file, a file that is not safetensors, an unknown format, an output that
exists or cannot be written) print one line ``viva-tensor: error: ...`` on stderr and exit with status 1;
usage errors (a missing argument; a size, count or length that is not a positive integer) exit with 2.
When ``quantize`` meets tensors that the format refuses (e.g. a float64 matrix for ``int8``), it still
writes the output with those tensors kept as they are, lists each one with the reason on stderr
(``viva-tensor: warning: kept as is (could not be quantized): NAME: WHY``), and exits with status 3.

Example:
    >>> from viva_tensor import cli
    >>> cli.main(["quantize", "/no/such/file.safetensors", "-f", "nf4", "-o", "/tmp/x"])
    1
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from viva_tensor.cli._args import positive_float, positive_int, positive_ints

__all__ = ["main", "build_parser", "PARTIAL"]

#: Exit status of ``quantize`` when some tensors could not be quantized (written unquantized, listed).
PARTIAL = 3


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``viva-tensor`` command.

    Returns:
        An ``argparse.ArgumentParser`` with the sub-commands ``report``, ``quantize``, ``bench`` and
        ``tour``.

    Example:
        >>> from viva_tensor import cli
        >>> cli.build_parser().parse_args(["quantize", "m.safetensors", "-f", "nf4", "-o", "q.safetensors"]).format
        'nf4'
    """
    parser = argparse.ArgumentParser(
        prog="viva-tensor",
        description="Quantization that really packs bits, measured on real weights.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{report,quantize,inspect,convert,bench,tour}")
    rep = sub.add_parser("report", help="every format on a checkpoint: bytes, bits/value, ratio, SQNR, cosine")
    rep.add_argument("checkpoint", nargs="?", default=None, help="a safetensors file (default: bundled MiniLM)")
    rep.add_argument("-f", "--format", action="append", dest="formats", metavar="FMT", help="only these formats")
    rep.add_argument("--no-progress", action="store_true", help="no progress bar")
    rep.add_argument("--calibrated", nargs="+", default=(), metavar="SPEC",
                     help="MiniLM rows quantized on calibration text: gptq:<fmt> or plan:<bits>, "
                          "+rot:<block> to rotate the inputs (minutes each)")
    qz = sub.add_parser("quantize", help="quantize a safetensors checkpoint into a viva_tensor checkpoint")
    qz.add_argument("checkpoint", help="a safetensors file")
    qz.add_argument("-f", "--format", required=True, metavar="FMT", help="a format name (see `report`)")
    qz.add_argument("-o", "--output", required=True, metavar="OUT", help="the file to write")
    qz.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    qz.add_argument("--no-progress", action="store_true", help="no progress bar")
    ins = sub.add_parser("inspect", help="what a checkpoint file or folder holds: tensor, format, shape, bits, bytes")
    ins.add_argument("checkpoint", help="a GGUF or safetensors file, or a Hugging Face checkpoint folder")
    cv = sub.add_parser("convert", help="one kind of checkpoint into another (GGUF, bnb, GPTQ, AWQ, ...)")
    cv.add_argument("checkpoint", help="a GGUF or safetensors file, or a Hugging Face checkpoint folder")
    cv.add_argument("output", help="the file (gguf, viva) or folder (bnb, gptq, awq, compressed-tensors) to write")
    cv.add_argument("--to", required=True, choices=["gguf", "bnb", "gptq", "awq", "compressed-tensors", "viva"],
                    help="the kind to write")
    cv.add_argument("-f", "--format", default=None, metavar="FMT", help="quantize every weight into FMT")
    cv.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    cv.add_argument("--no-progress", action="store_true", help="no progress bar")
    _bench_parser(sub)
    sub.add_parser("tour", help="a short guided tour of the library")
    return parser


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="run a benchmark and print its tables")
    which = bench.add_subparsers(dest="bench", metavar="{attention,quant}", required=True)
    att = which.add_parser("attention", help="flash attention vs jax.nn.dot_product_attention: memory and time")
    att.add_argument("--quick", action="store_true", help="T = 1024 and 2048, float32, 1 repeat")
    att.add_argument("--lengths", type=positive_ints, metavar="T,T,...", help="sequence lengths (default 1024..16384)")
    att.add_argument("--dtypes", default=None, help="comma-separated dtypes (default float32,bfloat16)")
    att.add_argument("--heads", type=positive_int, default=8, metavar="N", help="attention heads (default 8)")
    att.add_argument("--head-dim", type=positive_int, default=64, metavar="H", help="head dimension (default 64)")
    att.add_argument("--repeats", type=positive_int, default=None, metavar="R", help="timed runs (default 3)")
    att.add_argument("--budget-gib", type=positive_float, default=3.0, metavar="GIB",
                     help="run a case only if its compiled total fits (default 3)")  # fmt: skip
    qb = which.add_parser("quant", help="every format: size, SQNR, throughput, quant.dot vs float32 matmul")
    qb.add_argument("--quick", action="store_true", help="a 1024 x 1024 matrix, fewer repeats, no MiniLM")
    qb.add_argument("--size", type=positive_int, default=None, metavar="N",
                    help="the matrix is N x N (default 4096)")  # fmt: skip
    qb.add_argument("-f", "--format", action="append", dest="formats", metavar="FMT", help="only these formats")
    qb.add_argument("--batches", type=positive_ints, default=[1, 16, 256], metavar="B,B,...", help="quant.dot batches")
    qb.add_argument("--repeats", type=positive_int, default=None, metavar="R", help="timed batches (default 5)")
    qb.add_argument("--no-minilm", action="store_true", help="skip the MiniLM checkpoint report")


def _error(message: str) -> int:
    print(f"viva-tensor: error: {message}", file=sys.stderr)
    return 1


def _os_error(e: OSError) -> str:
    """One line for a file the command could not read or write: ``'PATH': Permission denied``."""
    why = e.strerror or str(e) or type(e).__name__
    return f"{e.filename!r}: {why}" if e.filename is not None else why


def _check_output(path: str, force: bool) -> str | None:
    """Why ``path`` cannot be written (before any work is done), or ``None``."""
    if os.path.isdir(path):
        return f"{path!r} is a directory"
    if os.path.exists(path) and not force:
        return f"{path!r} exists (pass --force to overwrite it)"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"{path!r}: the folder {folder!r} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return f"{path!r}: Permission denied"
    return None


def _report(args: argparse.Namespace) -> int:
    from viva_tensor.cli import report

    rows = report.run_report(args.checkpoint, args.formats, progress=not args.no_progress,
                             calibrated=args.calibrated)  # fmt: skip
    path = args.checkpoint or report.default_checkpoint()
    report.print_report(rows, title=f"memory multiplication: {os.path.basename(path)}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    import jax
    from rich.console import Console
    from rich.table import Table

    from viva_tensor import quant
    from viva_tensor.cli import report
    from viva_tensor.errors import TensorError

    spec = quant.format_spec(args.format)
    problem = _check_output(args.output, args.force)
    if problem:
        return _error(problem)
    tree = quant.load(args.checkpoint)
    if not isinstance(tree, dict):
        return _error(f"{args.checkpoint!r} does not hold a flat dict of tensors")
    out, failed, kept = {}, [], 0
    chosen = report.eligible_tensors(report.flat_tensors(tree), spec.name)
    with report.progress_bar(not args.no_progress) as bar:
        task = bar.add_task(f"quantizing to {spec.name}", total=len(tree)) if bar else None
        for name, x in tree.items():
            if name in chosen:
                try:
                    out[name] = jax.block_until_ready(quant.quantize(x, spec.name))
                except TensorError as e:
                    failed.append((name, str(e)))
                    out[name] = x
            else:
                out[name], kept = x, kept + 1
            if bar:
                bar.advance(task)
    quant.save(args.output, out)
    before = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree_util.tree_leaves(tree))
    after = os.path.getsize(args.output)
    console = Console()
    table = Table(title=f"{os.path.basename(args.checkpoint)} -> {os.path.basename(args.output)} ({spec.name})")
    for col in ("quantized", "kept as is", "failed", "tensor bytes before", "file bytes after", "ratio"):
        table.add_column(col, justify="right")
    quantized = len(tree) - kept - len(failed)
    table.add_row(str(quantized), str(kept), str(len(failed)), f"{before:,}", f"{after:,}", f"{before / after:.2f}x")
    console.print(table)
    for name, why in failed:
        print(f"viva-tensor: warning: kept as is (could not be quantized): {name}: {why}", file=sys.stderr)
    if failed:
        print(
            f"viva-tensor: warning: {len(failed)} of {len(chosen)} tensors could not be quantized to {spec.name};"
            f" {args.output!r} holds them unquantized",
            file=sys.stderr,
        )
        return PARTIAL
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from viva_tensor import interop

    tensors, meta = interop.load(args.checkpoint)
    rows = interop.inspect(tensors)
    table = Table(title=f"{os.path.basename(os.path.normpath(args.checkpoint))} ({meta.get('kind') or 'safetensors'})")
    for col, justify in (("tensor", "left"), ("format", "left"), ("shape", "right"), ("bits/value", "right"),
                         ("bytes", "right")):
        table.add_column(col, justify=justify)
    for r in rows:
        table.add_row(r.name, r.format, "x".join(map(str, r.shape)) or "()", f"{r.bits_per_value:.3f}",
                      f"{r.nbytes:,}")
    total = sum(r.nbytes for r in rows)
    table.caption = f"{len(rows)} tensors, {total:,} bytes"
    Console().print(table)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from viva_tensor import interop

    if args.to in ("gguf", "viva"):
        problem = _check_output(args.output, args.force)
    elif os.path.exists(args.output) and not args.force:
        problem = f"{args.output!r} exists (pass --force to overwrite it)"
    else:
        problem = None
    if problem:
        return _error(problem)
    from viva_tensor.cli import report

    with report.progress_bar(not args.no_progress) as bar:
        task = bar.add_task(f"reading {os.path.basename(os.path.normpath(args.checkpoint))}", total=3) if bar else None
        tensors, meta = interop.load(args.checkpoint)
        if bar:
            bar.update(task, advance=1, description=f"converting to {args.to}")
        out, changes = interop.convert(tensors, args.to, fmt=args.format)
        if bar:
            bar.update(task, advance=1, description=f"writing {os.path.basename(os.path.normpath(args.output))}")
        interop.save(args.output, out, kind=args.to)
        if bar:
            bar.advance(task)
    for name, what in changes.items():
        if what != "kept":
            print(f"viva-tensor: {name}: {what}", file=sys.stderr)
    kept = sum(1 for w in changes.values() if w == "kept")
    print(f"{meta.get('kind') or 'safetensors'} -> {args.to}: {len(out)} tensors, {kept} records kept bit for bit, "
          f"{len(changes) - kept} (re-)quantized")
    return 0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _bench(args: argparse.Namespace) -> int:
    if args.bench == "attention":
        from viva_tensor.cli.bench import attention as bench

        lengths = args.lengths or ([1024, 2048] if args.quick else [1024, 2048, 4096, 8192, 16384])
        dtypes = (args.dtypes or ("float32" if args.quick else "float32,bfloat16")).split(",")
        for dtype in dtypes:
            if dtype not in ("float32", "bfloat16", "float16"):
                return _error(f"argument '--dtypes': expected float32, bfloat16 or float16, got {dtype!r}")
        repeats = args.repeats if args.repeats is not None else 1 if args.quick else 3
        text, _ = bench.run(
            lengths, dtypes=dtypes, heads=args.heads, head_dim=args.head_dim, repeats=repeats,
            budget=int(args.budget_gib * bench.GIB), log=_log,
        )  # fmt: skip
    else:
        from viva_tensor.cli.bench import quant as bench

        size = args.size if args.size is not None else 1024 if args.quick else 4096
        repeats = args.repeats if args.repeats is not None else 2 if args.quick else 5
        text, _ = bench.run(
            args.formats, size=size, batches=args.batches, repeats=repeats,
            min_time=0.05 if args.quick else 0.2, minilm=not (args.no_minilm or args.quick), log=_log,
        )  # fmt: skip
    print(text)
    return 0


def _tour(args: argparse.Namespace) -> int:
    from viva_tensor.cli import tour

    tour.main()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``viva-tensor`` command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``); no sub-command runs ``report``.

    Returns:
        The exit status: 0 on success, 1 on an error (one line on stderr: a bad checkpoint, a file that
        cannot be read or written, an unknown format), 2 on a usage error (argparse: a missing or
        non-positive option), 3 (:data:`PARTIAL`) when ``quantize`` kept some tensors unquantized (listed
        on stderr).

    Example:
        >>> from viva_tensor import cli
        >>> cli.main(["report", "/no/such.safetensors"])
        1
    """
    from viva_tensor.errors import TensorError

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv) or ["report"])
    commands = {"report": _report, "quantize": _quantize, "inspect": _inspect, "convert": _convert, "bench": _bench,
                "tour": _tour}
    if args.command is None:
        args = build_parser().parse_args(["report"])
    try:
        return commands[args.command](args)
    except TensorError as e:
        return _error(str(e))
    except OSError as e:  # a file that cannot be read or written: one line, no traceback
        return _error(_os_error(e))
    except KeyboardInterrupt:
        return _error("interrupted")
