"""The one timer of the package (private): ``viva-tensor bench``, ``hardware`` and ``benchmarks/`` use it.

The statistic, stated once: :func:`time_fn` calls ``fn(*args)`` ``warmup`` times untimed (compilation
and first-touch page faults), then takes ``repeats`` samples. A sample is the mean wall time
(``time.perf_counter``) of ``n`` back-to-back calls, each waited for with ``jax.block_until_ready``;
``n`` is 1 unless ``min_time`` asks for more (the smallest ``n`` whose sample lasts ``min_time /
repeats``, at most ``max_calls``), so that a sub-millisecond function is not timed by the clock's
resolution. It returns the **minimum** (the least disturbed run: what a benchmark on a shared machine
should report) and the **median** of the samples, and the median process CPU time per call
(``time.process_time``: all threads, so CPU / wall tells how many cores the call kept busy).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.struct
import jax

from viva_tensor._pytree import pytree_dataclass
from viva_tensor.errors import ConfigError

__all__ = ["Timing", "time_fn"]


@pytree_dataclass
class Timing:
    """What :func:`time_fn` measured, in seconds per call.

    Attributes:
        min_s: the fastest sample.
        median_s: the median sample.
        cpu_s: the median process CPU time per call (every thread of the process).
        samples: how many samples were taken.
        calls: calls per sample (``n``).
    """

    min_s: float = flax.struct.field(pytree_node=False)
    median_s: float = flax.struct.field(pytree_node=False)
    cpu_s: float = flax.struct.field(pytree_node=False)
    samples: int = flax.struct.field(pytree_node=False)
    calls: int = flax.struct.field(pytree_node=False)


def _count(name: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(argument=name, expected=f"an integer >= {least}", got=value)
    return value


def time_fn(
    fn: Callable[..., Any],
    *args: Any,
    repeats: int = 5,
    warmup: int = 1,
    min_time: float = 0.0,
    max_calls: int = 50,
) -> Timing:
    """Time ``fn(*args)``: ``warmup`` untimed calls, then ``repeats`` samples (see the module docstring).

    Args:
        fn: the function (jitted or not); its result is waited for with ``jax.block_until_ready``.
        *args: its arguments.
        repeats: samples taken (>= 1).
        warmup: untimed calls first (>= 0; 1 compiles a jitted function).
        min_time: seconds that all samples together should last at least; a sample repeats the call up to
            ``max_calls`` times to reach ``min_time / repeats``.
        max_calls: the most calls in one sample (>= 1).

    Returns:
        A :class:`Timing` (minimum and median per call over the samples, median CPU time per call).

    Raises:
        ConfigError: a count that is not a positive integer, or a negative ``min_time``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from viva_tensor._benchmarking import time_fn
        >>> t = time_fn(jax.jit(lambda x: x @ x), jnp.ones((64, 64)), repeats=3)
        >>> 0 < t.min_s <= t.median_s, t.samples, t.calls
        (True, 3, 1)
    """
    repeats, warmup = _count("repeats", repeats, 1), _count("warmup", warmup, 0)
    max_calls = _count("max_calls", max_calls, 1)
    if not min_time >= 0:
        raise ConfigError(argument="min_time", expected="a number of seconds >= 0", got=min_time)
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    per_sample = min_time / repeats
    walls, cpus, n = [], [], 1
    for i in range(repeats):
        wall, cpu, calls = time.perf_counter(), time.process_time(), 0
        while True:
            jax.block_until_ready(fn(*args))
            calls += 1
            elapsed = time.perf_counter() - wall
            # the first sample finds n; the others repeat it, so that every sample averages as many calls
            if (calls >= n and i > 0) or (i == 0 and (elapsed >= per_sample or calls >= max_calls)):
                break
        n = calls
        walls.append(elapsed / calls)
        cpus.append((time.process_time() - cpu) / calls)
    return Timing(min(walls), statistics.median(walls), statistics.median(cpus), repeats, n)
