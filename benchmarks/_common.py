"""What every benchmark script shares: the repository paths, the ``--quick`` flag, one result writer.

- :func:`parser`: an ``argparse`` parser with ``--quick`` (small sizes, seconds; what CI runs) and
  ``--out`` (default: ``benchmarks/results``, or ``benchmarks/results/quick`` with ``--quick``, a
  git-ignored folder, so a quick run never overwrites the committed full results).
- :func:`write_results`: ``NAME.md`` (the markdown, then the environment) and ``NAME.json``
  (``{"environment": ..., "data": ...}``), with the environment of :func:`environment`: date, command,
  jax version, backend, CPU, device count.
- Times come from :func:`viva_tensor._benchmarking.time_fn` (re-exported here): one timer, one stated
  statistic (minimum and median of the samples after a warm-up, with ``block_until_ready``).

Run each script from the repository root (``python benchmarks/NAME.py [--quick]``): importing this
module puts the repository first on ``sys.path``, so the checkout's ``viva_tensor`` is the one measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
QUICK_RESULTS = RESULTS / "quick"
FIXTURE = ROOT / "tests" / "data" / "minilm_reference.npz"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from viva_tensor._benchmarking import Timing, time_fn  # noqa: E402
from viva_tensor.cli._args import positive_float, positive_int  # noqa: E402 - 0 or -5 is a usage error
from viva_tensor.hardware import _cpu_name  # noqa: E402 - the CPU's name, as hardware reads it

__all__ = ["ROOT", "RESULTS", "QUICK_RESULTS", "FIXTURE", "Timing", "time_fn", "parser", "environment",
           "write_results", "positive_int", "positive_float"]  # fmt: skip


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser described by the first line of ``doc``, with ``--quick`` and ``--out``."""
    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    p.add_argument("--quick", action="store_true", help="small sizes, a few seconds (CI); results go to results/quick")
    p.add_argument("--out", type=pathlib.Path, default=None, help="results folder (default: benchmarks/results)")
    return p


def environment() -> dict[str, Any]:
    """Where and when the numbers were measured."""
    import jax

    devices = jax.devices()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", *[os.path.relpath(a, ROOT) if a.endswith(".py") else a for a in sys.argv]]),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "devices": f"{len(devices)} x {devices[0].device_kind}",
        "device_count": len(devices),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
    }


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # "inf", "nan": JSON has no literal for them
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", None) == 0:  # NumPy / JAX scalars
        return _json_safe(x.item())
    return x if isinstance(x, (str, int, float, bool)) or x is None else str(x)


def results_dir(args: argparse.Namespace) -> pathlib.Path:
    """``--out``, else ``results/quick`` for a quick run, else ``results``."""
    if getattr(args, "out", None) is not None:
        return pathlib.Path(args.out)
    return QUICK_RESULTS if getattr(args, "quick", False) else RESULTS


def write_results(
    name: str, markdown: str, data: Any, *, quick: bool = False, out: pathlib.Path | None = None
) -> tuple[pathlib.Path, pathlib.Path]:
    """Write ``NAME.md`` and ``NAME.json`` with the environment; returns their paths.

    Args:
        name: the file stem (``"attention"``).
        markdown: the tables, ending without the environment (it is appended).
        data: anything JSON can hold once non-finite floats and NumPy scalars are converted.
        quick: write into ``results/quick`` (git-ignored) instead of ``results``.
        out: the folder, overriding both.
    """
    folder = pathlib.Path(out) if out is not None else QUICK_RESULTS if quick else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    env = environment()
    footer = (f"\n\n---\n`{env['command']}`, {env['date']}: jax {env['jax']} ({env['backend']}, {env['devices']}), "
              f"{env['cpu']}, {env['cpu_count']} CPUs, Python {env['python']}.\n")  # fmt: skip
    md, js = folder / f"{name}.md", folder / f"{name}.json"
    md.write_text(markdown.rstrip("\n") + footer)
    js.write_text(json.dumps({"environment": env, "data": _json_safe(data)}, indent=1) + "\n")
    print(f"wrote {md.relative_to(ROOT) if md.is_relative_to(ROOT) else md} and .json", file=sys.stderr)
    return md, js
