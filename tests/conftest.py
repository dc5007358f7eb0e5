"""Shared test set-up.

Eight host CPU devices are asked for before jax is imported, so sharding tests find a mesh; the suite
runs with ``jax_numpy_rank_promotion="raise"`` so that no test passes by accidental broadcasting, and with
``jax_numpy_dtype_promotion="strict"`` so that no test (and no library path) mixes dtypes implicitly.
"""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

FLOAT_DTYPES = ("float32", "bfloat16")


@pytest.fixture(params=FLOAT_DTYPES)
def dtype(request):
    """The floating dtypes every public function is tested in."""
    return jax.numpy.dtype(request.param)


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
    """Runs a function eagerly or under ``jax.jit``: tests take it and call ``maybe_jit(f)(*args)``."""
    if request.param:
        return lambda f, **kw: jax.jit(f, **kw)
    return lambda f, **kw: f


@pytest.fixture
def rng():
    """A NumPy generator with a fixed seed."""
    return np.random.default_rng(0)


def tolerance(dtype):
    """(rtol, atol) for comparing a result in ``dtype`` with a float64 NumPy reference."""
    dtype = np.dtype(dtype)
    if dtype == np.dtype(jax.numpy.bfloat16):
        return 2e-2, 2e-2
    if dtype == np.float16:
        return 2e-3, 2e-3
    return 1e-5, 1e-5
