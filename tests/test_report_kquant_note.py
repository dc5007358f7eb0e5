"""``viva-tensor report`` says plainly when a K-quant covers only the tensors whose rows are whole super-blocks."""

import numpy as np
from rich.console import Console
from safetensors.numpy import save_file

from viva_tensor.cli import report


def test_k_quant_row_says_which_tensors_it_covers(tmp_path):
    rng = np.random.default_rng(0)
    path = str(tmp_path / "m.safetensors")
    save_file({"wide.weight": rng.standard_normal((8, 512)).astype(np.float32),  # rows of 2 super-blocks
               "narrow.weight": rng.standard_normal((8, 384)).astype(np.float32)}, path)  # 384 % 256 != 0
    rows = report.run_report(path, formats=["q4_k", "q4_0"], progress=False, fidelity=False)
    by = {r["format"]: r for r in rows}
    assert by["q4_k"]["tensors"] == 1 and by["q4_k"]["values"] == 8 * 512
    assert "only 1 of 2 tensors" in by["q4_k"]["note"] and "super-blocks of 256" in by["q4_k"]["note"]
    assert "note" not in by["q4_0"] and by["q4_0"]["tensors"] == 2
    console = Console(width=120, record=True, color_system=None)
    report.print_report(rows, console=console)
    text = console.export_text()
    assert "q4_k*" in text and "q4_0*" not in text
    assert "q4_k: quantizes only 1 of 2 tensors" in " ".join(text.split())


def test_no_note_when_every_tensor_has_whole_super_blocks(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file({"w.weight": np.ones((4, 256), np.float32)}, path)
    rows = report.run_report(path, formats=["q6_k"], progress=False, fidelity=False)
    assert "note" not in rows[1]
