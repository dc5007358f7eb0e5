"""Compiles the CPU kernels into ``viva_tensor/_kernels/lib/libvt_kernels.so`` (private).

Used by the hatchling build hook (``hatch_build.py``) at ``pip install`` time and by hand during development::

    python -m viva_tensor._kernels.build          # -O3 -march=native, falling back to a generic build
    python -m viva_tensor._kernels.build --generic

This module imports nothing from viva_tensor or JAX at module level, so the build hook can load it by path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = [HERE / "qmatmul.cc"]
# In a folder without __init__.py: pkgutil.walk_packages would take a .so beside the modules for a Python module.
LIBRARY = "libvt_kernels.so"
LIB_DIR = HERE / "lib"

# First the native build (AVX-512 where the CPU has it), then a portable one (scalar loops).
FLAG_SETS = (
    ["-O3", "-march=native", "-ffp-contract=off"],
    ["-O3", "-ffp-contract=off"],
)


def ffi_include_dir() -> str | None:
    """The XLA FFI headers shipped with jaxlib, or None when jaxlib is not importable."""
    try:
        import jax.ffi  # noqa: PLC0415

        return jax.ffi.include_dir()
    except Exception:  # noqa: BLE001
        pass
    try:  # jaxlib alone (the build environment of `pip install`)
        import jaxlib  # noqa: PLC0415

        inc = Path(jaxlib.__file__).parent / "include"
        return str(inc) if (inc / "xla" / "ffi" / "api" / "ffi.h").exists() else None
    except Exception:  # noqa: BLE001
        return None


def cpu_flags() -> set[str]:
    """The instruction-set flags of this CPU (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return {f for f in line.split(":", 1)[1].split() if f.startswith(ISA_PREFIXES)}
    except OSError:
        pass
    return set()


ISA_PREFIXES = ("avx", "amx", "fma", "bmi", "f16c", "sse", "ssse", "popcnt", "lzcnt", "movbe", "vaes", "vpclmul",
                "gfni", "sha", "adx")
CPU_FILE = LIBRARY + ".cpu"  # beside the library: the flags of the CPU a -march=native build was made for


def build(out_dir: str | os.PathLike | None = None, *, native: bool = True, verbose: bool = False) -> Path | None:
    """Compiles the kernels; returns the library's path, or None when no compiler or no headers are found.

    Args:
        out_dir: where the library goes (default: ``lib/`` in this package's folder).
        native: try ``-march=native`` first; False builds only the portable library.
        verbose: print the compiler's commands and errors.
    """
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    include = ffi_include_dir()
    if cxx is None or include is None:
        if verbose:
            print(f"viva_tensor kernels: not built (compiler={cxx}, FFI headers={include})", file=sys.stderr)
        return None
    out = Path(out_dir or LIB_DIR) / LIBRARY
    for flags in FLAG_SETS if native else FLAG_SETS[1:]:
        with tempfile.TemporaryDirectory() as tmp:
            tmp_out = Path(tmp) / LIBRARY
            cmd = [cxx, *flags, "-std=c++17", "-shared", "-fPIC", "-pthread", "-w", f"-I{include}",
                   *map(str, SOURCES), "-o", str(tmp_out)]
            if verbose:
                print(" ".join(cmd), file=sys.stderr)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(tmp_out), out)  # one rename: a running process keeps its old mapping
                # a native build runs only on a CPU with the same instructions (a wheel copied elsewhere)
                sidecar = out.parent / CPU_FILE
                sidecar.write_text(" ".join(sorted(cpu_flags())) if "-march=native" in flags else "")
                return out
            if verbose:
                print(proc.stderr[-4000:], file=sys.stderr)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = build(native="--generic" not in argv, verbose=True)
    print(path if path else "build failed: the pure-JAX path will be used")
    return 0 if path else 1


if __name__ == "__main__":
    raise SystemExit(main())
