"""viva-tensor report's calibrated rows (gptq:<fmt>, plan:<bits>): the spec check and the printed column.

The rows themselves take minutes (sequential GPTQ of MiniLM); benchmarks/minilm_fidelity.py measures them.
"""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from viva_tensor import cli
from viva_tensor.cli import report
from viva_tensor.errors import ConfigError


@pytest.mark.parametrize("spec", ["gptq", "awq:int4_group", "plan:", "int4_group", "plan:4.5+rot:", "gptq:q4_0+rot:x",
                                  "plan:+rot:128"])
def test_a_bad_spec_is_refused_before_any_work(spec):
    with pytest.raises(ConfigError, match="argument 'calibrated'"):
        report.calibrated_fidelity(None, [spec])


def test_the_top1_column_is_printed_for_calibrated_rows():
    row = {"format": "plan:4.5", "tensors": 36, "values": 64, "bytes": 36, "bits_per_value": 4.5, "ratio": 7.1,
           "sqnr_db": 20.0, "cosine": 0.99, "seconds": 1.0, "embedding_cosine_mean": 0.99,
           "embedding_cosine_min": 0.98, "embedding_top1": 0.9375}  # fmt: skip
    console = Console(file=io.StringIO(), width=160)
    report.print_report([row], console=console)
    text = console.file.getvalue()
    assert "emb top-1" in text and "0.938" in text and "gptq:/plan: rows" in text


def test_the_cli_takes_calibrated_specs():
    args = cli.build_parser().parse_args(["report", "--calibrated", "gptq:int4_group", "plan:4.5+rot:128"])
    assert list(args.calibrated) == ["gptq:int4_group", "plan:4.5+rot:128"]
    assert list(cli.build_parser().parse_args(["report"]).calibrated) == []
