"""Every docstring example of every viva_tensor module runs and prints what it shows.

Modules are found with ``pkgutil.walk_packages``, so a new module is covered without editing this file.
``__main__`` modules are left out (importing one runs the program); a module whose import needs an
optional extra that is not installed is skipped with the reason.
"""

import doctest
import importlib
import pkgutil

import pytest

import viva_tensor

OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules():
    names = [viva_tensor.__name__]
    for info in pkgutil.walk_packages(viva_tensor.__path__, prefix=viva_tensor.__name__ + "."):
        if info.name.rsplit(".", 1)[-1] != "__main__":
            names.append(info.name)
    return sorted(names)


MODULES = _modules()


def test_the_walk_finds_the_core_modules():
    assert {"viva_tensor", "viva_tensor.errors", "viva_tensor.tensor", "viva_tensor.axis"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:  # an optional extra (matplotlib, tokenizers ...) is missing
        if e.name and e.name.split(".")[0] != viva_tensor.__name__:
            pytest.skip(f"{name} needs the optional package {e.name!r}")
        raise
    result = doctest.testmod(module, optionflags=OPTIONS, verbose=False, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in {name}"
