"""Tests of viva_tensor._benchmarking: the one timer (its statistic, its counts, its argument checks)."""

import time

import jax
import jax.numpy as jnp
import pytest

from viva_tensor._benchmarking import Timing, time_fn
from viva_tensor.errors import ConfigError


def test_warmup_then_samples_of_one_call():
    calls = []
    t = time_fn(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(calls) == 2 + 4 and (t.samples, t.calls) == (4, 1)
    assert 0 <= t.min_s <= t.median_s and t.cpu_s >= 0


def test_min_and_median_of_the_samples(monkeypatch):
    # a fake clock: call i lasts durations[i] seconds of wall and of CPU time
    durations = iter([0.0, 3.0, 1.0, 2.0, 5.0, 4.0])  # the warm-up, then five samples
    now = [0.0]

    def fn():
        now[0] += next(durations)

    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(time, "process_time", lambda: now[0])
    t = time_fn(fn, repeats=5)
    assert t == Timing(min_s=1.0, median_s=3.0, cpu_s=3.0, samples=5, calls=1)


def test_min_time_repeats_short_calls_and_every_sample_has_as_many():
    calls = []
    t = time_fn(lambda: calls.append(1), repeats=3, warmup=0, min_time=1e9, max_calls=7)
    assert t.calls == 7 and len(calls) == 3 * 7


def test_blocks_until_ready_on_jax_results():
    f = jax.jit(lambda x: (x @ x).sum())
    t = time_fn(f, jnp.ones((128, 128)), repeats=2)
    assert t.samples == 2 and t.min_s > 0


@pytest.mark.parametrize(
    "kwargs, argument",
    [({"repeats": 0}, "repeats"), ({"repeats": 1.5}, "repeats"), ({"warmup": -1}, "warmup"),
     ({"max_calls": 0}, "max_calls"), ({"min_time": -1.0}, "min_time"), ({"min_time": float("nan")}, "min_time"),
     ({"repeats": True}, "repeats")],
)  # fmt: skip
def test_bad_counts_are_refused(kwargs, argument):
    with pytest.raises(ConfigError, match=f"argument '{argument}'"):
        time_fn(lambda: None, **kwargs)


def _common():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "_common.py"
    spec = importlib.util.spec_from_file_location("benchmarks_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmarks_result_writer(tmp_path):
    import json
    import math

    import numpy as np

    common = _common()
    md, js = common.write_results("x", "| a |\n", {"v": math.inf, "n": np.float32(1.5), "t": (1, 2)}, out=tmp_path)
    assert (md, js) == (tmp_path / "x.md", tmp_path / "x.json")
    text = md.read_text()
    assert text.startswith("| a |\n\n---\n") and f"jax {jax.__version__}" in text
    data = json.loads(js.read_text())
    assert data["data"] == {"v": "inf", "n": 1.5, "t": [1, 2]}
    env = data["environment"]
    assert env["jax"] == jax.__version__ and env["device_count"] == jax.device_count() and env["date"].endswith("UTC")
    assert common.results_dir(common.parser("d").parse_args(["--quick"])) == common.QUICK_RESULTS
    assert common.results_dir(common.parser("d").parse_args([])) == common.RESULTS


def test_every_benchmark_takes_quick_and_ci_runs_it():
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    scripts = sorted(p for p in (root / "benchmarks").glob("[a-z]*.py"))
    assert {p.stem for p in scripts} >= {"attention", "quantization", "memory", "sharding", "awq", "sparsity"}
    for p in scripts:  # --quick comes from the shared parser, results from the shared writer
        text = p.read_text()
        assert "_common.parser(" in text and "_common.write_results(" in text, p.name
    ci = (root / ".ci" / "run").read_text()
    assert 'for script in benchmarks/[a-z]*.py' in ci and '"$script" --quick' in ci and "ruff check ." in ci
    readme = (root / "benchmarks" / "README.md").read_text()
    assert all(f"`{p.name}" in readme for p in scripts)


def test_quick_results_never_land_in_the_committed_folder(tmp_path, monkeypatch):
    common = _common()
    monkeypatch.setattr(common, "QUICK_RESULTS", tmp_path / "quick")
    monkeypatch.setattr(common, "RESULTS", tmp_path / "full")
    md, _ = common.write_results("x", "text", {}, quick=True)
    assert md.parent == tmp_path / "quick" and not (tmp_path / "full").exists()
    ignored = (common.ROOT / ".gitignore").read_text().splitlines()
    assert "benchmarks/results/quick/" in ignored
