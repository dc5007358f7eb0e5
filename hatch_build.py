"""Hatchling build hook: compiles viva_tensor's CPU kernels (``viva_tensor/_kernels``) at ``pip install`` time.

Runs for wheels and editable installs. ``-O3 -march=native`` first, then a portable build; when neither works
(no C++ compiler, no jaxlib headers) the install still succeeds and ``viva_tensor._kernels.available()`` is False:
every quantized matmul then takes the pure-JAX path. ``VIVA_TENSOR_NO_KERNELS=1`` skips the compilation.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


def _load_builder(root: Path):
    # viva_tensor/_kernels/build.py imports neither viva_tensor nor jax at module level: load it by path.
    spec = importlib.util.spec_from_file_location("_vt_kernels_build", root / "viva_tensor" / "_kernels" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class KernelBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel" or os.environ.get("VIVA_TENSOR_NO_KERNELS") == "1":
            return
        root = Path(self.root)
        builder = _load_builder(root)
        verbose = bool(os.environ.get("VIVA_TENSOR_BUILD_VERBOSE"))
        path = builder.build(root / "viva_tensor" / "_kernels" / "lib", verbose=verbose)
        if path is None:
            print("viva_tensor: CPU kernels not built; the pure-JAX path will be used", file=sys.stderr)
            return
        if version != "editable":  # an editable install finds the library in the source tree
            build_data["force_include"][str(path)] = "viva_tensor/_kernels/lib/" + path.name
            sidecar = path.parent / builder.CPU_FILE  # the CPU a native build needs: checked before loading
            if sidecar.exists():
                build_data["force_include"][str(sidecar)] = "viva_tensor/_kernels/lib/" + sidecar.name
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
