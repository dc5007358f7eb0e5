"""The layers of viva_tensor hold: every file belongs to a part, and imports only go down or sideways.

Each ``viva_tensor/**/*.py`` is read with ``ast`` (nothing is imported). Every ``import`` counts: at the
top of a module, inside a function (a lazy import is still an arrow), under ``TYPE_CHECKING``, and
``importlib.import_module("viva_tensor....")`` with a literal name. A file may import from its own part
or a lower one; formats know no models; nothing below the models imports ``flax.nnx`` (but the format
toolkit's registration helper); and the modules of the package import each other without a cycle.

A new module is one line: add its path pattern to its part in :data:`LAYERS`.
"""

from __future__ import annotations

import ast
import fnmatch
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "viva_tensor"

LAYERS: dict[str, tuple[str, ...]] = {
    # lowest first. A file's key is its path under viva_tensor/ without ".py": "errors", "nn/_awq",
    # "quant/__init__". It belongs to the part of the first pattern (fnmatch) that matches its key.
    "core": ("errors", "axis", "tensor", "_xla", "_paths", "_safetensors", "_kernels/__init__", "_kernels/build",
             "_benchmarking", "_pytree"),  # the one timer: hardware (memory) uses it too, it imports only errors
    "formats": (
        "_formats/*", "compression", "nf4", "blackwell", "awq", "sparsity", "metrics", "ggml", "gidx",
    ),
    # planes: records -> kernel arguments; rotation: the input rotation of a quantized layer (checkpoints keep it)
    "quant": ("quant", "quant/*", "gptq", "rotation", "_grids", "_kernels/planes"),
    "attention": ("flash_attention", "named", "sharding"),  # attention and named axes
    "parallel": ("ring_attention", "pool"),
    "memory": ("memory", "memory/*", "hardware"),
    "interop": ("interop/*",),
    "models": ("nn/*", "models/*"),
    "face": (
        "cli/*", "__main__",
        "__init__",  # the package root may import everything
    ),
}

NNX_HELPERS = {"_formats/record", "_formats/registry"}
"""Files below the models allowed to import ``flax.nnx``: the format toolkit registers records with
``nnx.register_data_type``."""

NNX_ADAPTERS: set[str] = {"flash_attention", "sharding"}
"""Files below the models that import ``flax.nnx`` for an adapter, for the lead to decide (move the adapter up to
``nn``, or accept it here): ``flash_attention.attention_fn`` (the ``nnx.MultiHeadAttention`` drop-in takes
``flax.nnx.nn.dtypes.promote_dtype``), ``sharding.param_specs`` / ``shard_params`` (they read an NNX model's
state). Both import lazily, inside the function."""

KNOWN_VIOLATIONS: set[tuple[str, str]] = set()
"""(importer, imported) arrows that break the layering and are being removed; empty: none left.
Modules by key without "/__init__" ("memory" is memory.py or memory/__init__.py)."""

RANK = {part: i for i, part in enumerate(LAYERS)}


def part_of(key: str) -> str | None:
    """The part of a file key, or None when no pattern of :data:`LAYERS` matches it."""
    for part, patterns in LAYERS.items():
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns):
            return part
    return None


def files(root: pathlib.Path = PACKAGE) -> dict[str, pathlib.Path]:
    """``{key: path}`` of every Python file of the package."""
    return {
        p.relative_to(root).with_suffix("").as_posix(): p
        for p in sorted(root.rglob("*.py"))
        if "__pycache__" not in p.parts
    }


def module_name(key: str) -> str:
    """``"nn/_awq"`` -> ``"viva_tensor.nn._awq"``; ``"nn/__init__"`` -> ``"viva_tensor.nn"``."""
    parts = key.split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["viva_tensor", *parts])


def key_of(module: str, known: set[str]) -> str | None:
    """The file key of a module name inside viva_tensor (None: outside the package, or not a module)."""
    if module != "viva_tensor" and not module.startswith("viva_tensor."):
        return None
    rel = module.split(".")[1:]
    if not rel:
        return "__init__"
    key = "/".join(rel)
    if key in known:
        return key
    if key + "/__init__" in known:
        return key + "/__init__"
    return None


def _resolve(node: ast.ImportFrom, key: str) -> str:
    """The absolute module name an ``ImportFrom`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module_name(key).split(".")
    if not key.endswith("__init__"):
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(source: str, key: str, known: set[str]) -> list[tuple[int, str]]:
    """``(line, imported)`` for every import in ``source``: file keys inside viva_tensor, dotted names outside.

    ``from A import b`` names the module ``A.b`` when it is one, else ``A``.
    """
    found: list[tuple[int, str]] = []

    def add(line: int, module: str) -> None:
        inner = key_of(module, known)
        found.append((line, inner if inner is not None else module))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("viva_tensor") and key_of(alias.name, known) is None:
                    # `import viva_tensor.x.name`: keep the deepest prefix that is a module
                    parts = alias.name.split(".")
                    while len(parts) > 1 and key_of(".".join(parts), known) is None:
                        parts.pop()
                    add(node.lineno, ".".join(parts))
                else:
                    add(node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, key)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                inner = key_of(full, known) is not None
                add(node.lineno, full if inner or (base == "flax" and alias.name == "nnx") else base)
        elif isinstance(node, ast.Call) and _is_import_module(node.func):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                add(node.lineno, arg.value)
    return found


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module"
    )


def _is_nnx(name: str) -> bool:
    return name == "flax.nnx" or name.startswith("flax.nnx.")


def graph() -> dict[str, list[tuple[int, str]]]:
    """``{key: [(line, imported), ...]}`` for every file of the package."""
    table = files()
    known = set(table)
    return {key: imports_of(path.read_text(), key, known) for key, path in table.items()}


GRAPH = graph()


def inner_edges(g: dict[str, list[tuple[int, str]]] | None = None) -> dict[str, set[str]]:
    """``{key: {imported keys inside viva_tensor}}``."""
    g = GRAPH if g is None else g
    return {src: {dst for _, dst in edges if dst in g and dst != src} for src, edges in g.items()}


def _known(src: str, dst: str) -> bool:
    return (src.removesuffix("/__init__"), dst.removesuffix("/__init__")) in KNOWN_VIOLATIONS


def _where(src: str, line: int) -> str:
    return f"viva_tensor/{src}.py:{line}"


# ------------------------------------------------------------------------------------------ the rules


def test_every_file_belongs_to_a_part():
    unknown = [f"viva_tensor/{key}.py" for key in GRAPH if part_of(key) is None]
    assert not unknown, (
        f"files in no part of the layering: {unknown}. Add a pattern for each to its part in LAYERS "
        f"(tests/test_layers.py): {list(LAYERS)} (lowest first)."
    )


def test_imports_go_to_the_same_part_or_a_lower_one():
    bad = []
    for src, edges in GRAPH.items():
        for line, dst in edges:
            if dst not in GRAPH or _known(src, dst) or None in (part_of(src), part_of(dst)):
                continue
            if RANK[part_of(dst)] > RANK[part_of(src)]:
                bad.append(f"{_where(src, line)} ({part_of(src)}) imports viva_tensor/{dst}.py ({part_of(dst)})")
    assert not bad, "imports that go up the layers (" + " < ".join(LAYERS) + "):\n" + "\n".join(bad)


def test_formats_know_no_models_nor_quant():
    bad = []
    for src, edges in GRAPH.items():
        if part_of(src) != "formats":
            continue
        for line, dst in edges:
            upward = dst in GRAPH and part_of(dst) in ("quant", "models") and not _known(src, dst)
            if upward or (_is_nnx(dst) and src not in NNX_HELPERS):
                bad.append(f"{_where(src, line)} imports {dst}")
    assert not bad, "a format module imports flax.nnx, nn or quant (flax.struct is fine):\n" + "\n".join(bad)


def test_nothing_below_the_models_imports_nnx():
    bad = [
        f"{_where(src, line)} ({part_of(src)}) imports {dst}"
        for src, edges in GRAPH.items()
        if part_of(src) is not None and RANK[part_of(src)] < RANK["models"] and src not in NNX_HELPERS | NNX_ADAPTERS
        for line, dst in edges
        if _is_nnx(dst)
    ]
    assert not bad, "flax.nnx below the models (only the format toolkit's registration may):\n" + "\n".join(bad)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``edges`` as ``[a, b, ..., a]``, or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(inner_edges())
    assert cycle is None, "an import cycle inside viva_tensor: " + " -> ".join(cycle)


def test_known_violations_are_still_real():
    edges = inner_edges()
    real = {(a.removesuffix("/__init__"), b.removesuffix("/__init__")) for a, bs in edges.items() for b in bs}
    gone = sorted(KNOWN_VIOLATIONS - real)
    assert not gone, f"fixed: remove {gone} from KNOWN_VIOLATIONS in tests/test_layers.py"
    nnx_users = {src for src, found in GRAPH.items() for _, dst in found if _is_nnx(dst)}
    stale = sorted((NNX_HELPERS | NNX_ADAPTERS) & set(GRAPH) - nnx_users)
    assert not stale, f"no longer import flax.nnx: remove {stale} from NNX_HELPERS / NNX_ADAPTERS"


# ------------------------------------------------------------------------------- the walker itself


def test_the_walker_sees_every_kind_of_import():
    known = {"__init__", "errors", "nn/__init__", "nn/_awq", "nn/_graph", "quant/__init__", "quant/_dot"}
    source = '''
import numpy as np
import viva_tensor
import viva_tensor.quant._dot
from flax import nnx, struct
from viva_tensor import nn, errors
from viva_tensor.errors import ConfigError
from . import _graph
from ._awq import capture_linear_inputs
from .. import quant

def lazy():
    from viva_tensor.quant import dot_general
    import importlib
    return importlib.import_module("viva_tensor.nn._awq")
'''
    got = {dst for _, dst in imports_of(source, "nn/_qlinear", known)}
    assert got == {
        "numpy", "__init__", "quant/_dot", "flax.nnx", "flax", "nn/__init__", "errors", "nn/_graph", "nn/_awq",
        "quant/__init__", "importlib",
    }


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("key, part", [("nn/_awq", "models"), ("quant/__init__", "quant"), ("__init__", "face"),
                                       ("_formats/checks", "formats"), ("cli/bench/quant", "face"), ("new", None)])
def test_part_of(key, part):
    assert part_of(key) == part
