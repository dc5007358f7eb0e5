"""Shared test set-up.

Eight host CPU devices are asked for before jax is imported, so sharding tests find a mesh; the suite
runs with ``jax_numpy_rank_promotion="raise"`` so that no test passes by accidental broadcasting, and with
``jax_numpy_dtype_promotion="strict"`` so that no test (and no library path) mixes dtypes implicitly.

XLA compiles the suite's programs with most optimizations off (``jax_disable_most_optimizations``: LLVM at
``-O0``, no expensive passes; XLA's HLO passes, fusion and buffer assignment included, still run), because the
suite is dominated by compiling thousands of small programs, not by running them: measured on a 2-core AMD
EPYC, ``tests/test_quant_dot.py`` and ``tests/test_flash_attention.py`` took 89 + 180 worker-seconds against
337 + 500 with full optimization, every test passing in both. The tests check values, not speed; the
benchmarks (which CI runs too, with ``--quick``) compile with full optimization. The environment variable is
set here, before jax is imported, so that the processes the tests start (the CLI, the notebooks' kernels, the
multi-process test) inherit it. ``VIVA_TEST_XLA_OPT=full`` runs the suite fully optimized, as users compile.

``VIVA_TEST_JAX_CACHE=on`` turns on XLA's persistent compilation cache (off by default: over the whole suite, fully
optimized, it measured 3623 s against 3865 s without, in different hours of a loaded machine), in a temporary
directory that the pytest process which starts the run creates, shares with its xdist workers (through the
environment) and removes at the end: a program that two tests (or the two workers) compile with the same HLO is
compiled once. The directory is new for every run, so a run never reuses an executable compiled by an earlier one.
"""

import os
import shutil
import tempfile

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

_opt = os.environ.get("VIVA_TEST_XLA_OPT", "low")
if _opt not in ("low", "full"):
    raise ValueError(f"VIVA_TEST_XLA_OPT: expected 'low' (the default) or 'full', got {_opt!r}")
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1" if _opt == "low" else "0"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

_CACHE_ENV = "VIVA_TEST_JAX_CACHE"
_OWNS_CACHE = os.environ.get(_CACHE_ENV) == "on"  # this process starts the run: it makes the directory, removes it
if _OWNS_CACHE:  # the workers inherit the directory's path
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="viva_tensor_jax_cache_")
if os.environ.get(_CACHE_ENV, "off") not in ("off", ""):
    _cache_dir = os.environ[_CACHE_ENV]
    try:  # a size limit turns on the cache's file lock: no worker reads an entry while another writes it
        import filelock  # noqa: F401

        jax.config.update("jax_compilation_cache_max_size", 16 * 2**30)
    except ImportError:  # no lock: a directory per process (nothing shared between the workers)
        _cache_dir = tempfile.mkdtemp(prefix=f"{os.getpid()}_", dir=_cache_dir)
    jax.config.update("jax_compilation_cache_dir", _cache_dir)
    # only programs that took this long to compile are written (each write scans the directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get("VIVA_TEST_JAX_CACHE_MIN_SECS", "0.2")))
else:  # no cache: jax 0.10 would still hash every program for a cache key (2-3% of the suite's compile time)
    jax.config.update("jax_enable_compilation_cache", False)


def pytest_unconfigure(config):
    if _OWNS_CACHE:
        shutil.rmtree(os.environ[_CACHE_ENV], ignore_errors=True)


@pytest.fixture(autouse=True)
def _optimized(request):
    """``@pytest.mark.optimized``: the test's programs compile fully optimized. For the few tests whose time is
    running, not compiling (GPTQ over the whole MiniLM: measured 48 s against 83 s at the suite's level). The
    flag is read at each compile; a program the worker compiled earlier at the lower level is reused as it is."""
    if request.node.get_closest_marker("optimized") is None or _opt == "full":
        yield
        return
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", True)


# A test whose xdist worker dies (a native crash: XLA:CPU's compiler segfaulted now and then in programs that
# compile cleanly on their own, in the CI log and twice in one local run) runs once more on the fresh worker that
# xdist starts; a second crash fails it. The terminal summary names every retried test, so a crash is never silent.
_CRASH_RETRIES = int(os.environ.get("VIVA_TEST_CRASH_RETRIES", "1"))
_crashed: dict[str, int] = {}


@pytest.hookimpl(optionalhook=True)  # an xdist hook: without xdist there is no worker to crash
def pytest_handlecrashitem(crashitem, report, sched):
    crashes = _crashed.get(crashitem, 0)
    if crashes >= _CRASH_RETRIES:
        return
    try:
        sched.mark_test_pending(crashitem)  # xdist's "load" scheduler; the scope schedulers cannot re-queue one test
    except (AttributeError, NotImplementedError):
        return
    _crashed[crashitem] = crashes + 1
    report.outcome = "rerun"  # neither passed nor failed: the retry's own report decides


def pytest_report_teststatus(report, config):
    if report.outcome == "rerun":
        return "rerun", "R", "RERUN"
    return None


def pytest_terminal_summary(terminalreporter):
    if _crashed:
        terminalreporter.section("tests retried after their worker crashed")
        for nodeid, n in sorted(_crashed.items()):
            terminalreporter.write_line(f"{nodeid}: {n} crash(es), then run again")


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
