"""The README's Python examples run as written, and print what their comments say."""

import contextlib
import io
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
# The cluster snippet needs jax.distributed and a cluster; tests/test_multiprocess.py runs its equivalent.
RUNNABLE = [b for b in BLOCKS if "jax.distributed.initialize()" not in b]


def test_readme_has_examples():
    assert len(RUNNABLE) >= 2


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"block{i}" for i in range(len(RUNNABLE))])
def test_readme_example_runs(block):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    printed = out.getvalue().splitlines()
    # Every `print(...)  # value` comment whose value is a literal must match what was printed.
    expected = [m.group(1).strip() for line in block.splitlines() if line.startswith("print(")
                for m in [re.search(r"#\s*(.+)$", line)] if m]
    for want, got in zip(expected, printed, strict=False):
        if want.split()[0].replace(".", "").isdigit() or want.startswith("NamedTensor"):
            assert got.startswith(want.split(" (")[0]), (want, got)
