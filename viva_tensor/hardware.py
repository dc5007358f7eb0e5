"""Device specs and roofline estimates from the compiler.

The Gleam ``rtx4090`` and ``blackwell`` modules held a table of specs and did byte arithmetic. Here
each number of a :class:`DeviceSpec` carries its source (a vendor datasheet, or a measurement on this
machine); :func:`tensor_memory_bytes` quantizes a ``jax.ShapeDtypeStruct`` with ``jax.eval_shape`` and
sums the real record's buffers (nothing is allocated); :func:`estimate_performance` compiles a function
and reads XLA's cost analysis (FLOPs and bytes accessed) to place it on a device's roofline.

Peak FLOP/s are *dense* tensor-core figures (the datasheets' "with sparsity" numbers halved), except
``float32``, which is the non-tensor (CUDA core) rate; ``tfloat32`` is listed apart.

Example:
    >>> from viva_tensor import hardware
    >>> spec = hardware.device_spec("h100")
    >>> spec.memory_bytes // 2**30, hardware.peak_flops(spec, "bfloat16") / 1e12
    (80, 989.5)
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from viva_tensor import _xla
from viva_tensor._benchmarking import time_fn
from viva_tensor._formats.registry import FORMATS
from viva_tensor._pytree import pytree_dataclass
from viva_tensor.errors import ConfigError, FormatError

__all__ = [
    "DeviceSpec",
    "SPECS",
    "device_spec",
    "local_cpu",
    "peak_flops",
    "tensor_memory_bytes",
    "EffectiveMemory",
    "effective_memory",
    "PerformanceEstimate",
    "estimate_performance",
]

_GB, _GIB, _T = 1e9, 2**30, 1e12


@pytree_dataclass
class DeviceSpec:
    """What a device offers: memory, bandwidth and peak FLOP/s per dtype, each with its source.

    Attributes:
        name: the device's name.
        memory_bytes: device memory in bytes.
        bandwidth: memory bandwidth in bytes per second.
        flops: ``(dtype name, FLOP/s)`` pairs (dense peaks; measured rates for the local CPU).
        sources: ``(field, source)`` pairs: where each number comes from.
    """

    name: str = flax.struct.field(pytree_node=False)
    memory_bytes: int = flax.struct.field(pytree_node=False)
    bandwidth: float = flax.struct.field(pytree_node=False)
    flops: tuple[tuple[str, float], ...] = flax.struct.field(pytree_node=False)
    sources: tuple[tuple[str, str], ...] = flax.struct.field(pytree_node=False)

    @property
    def ridge_point(self) -> float:
        """FLOPs per byte at which the ``float32`` roofline turns from memory- to compute-bound."""
        return peak_flops(self, "float32") / self.bandwidth


_ADA = "NVIDIA Ada Lovelace GPU architecture whitepaper v1.1, appendix A (GeForce RTX 4090)"
_H100 = "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column (dense: sparse figures halved)"
_H200 = "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column (dense: sparse figures halved)"
_B200 = ("NVIDIA Blackwell architecture technical brief, HGX B200 at 1000 W (dense), as tabulated at "
         "glennklockwood.com/garden/processors/B200; the HGX B200 datasheet gives 75 TF FP32 and 37 TF FP64 "
         "per GPU (600 / 296 TF for 8 GPUs)")

SPECS: dict[str, DeviceSpec] = {
    "rtx4090": DeviceSpec(
        name="NVIDIA GeForce RTX 4090",
        memory_bytes=24 * _GIB,
        bandwidth=1008 * _GB,
        flops=(("float32", 82.6 * _T), ("tfloat32", 82.6 * _T), ("float16", 165.2 * _T),
               ("bfloat16", 165.2 * _T), ("float8_e4m3fn", 330.3 * _T), ("int8", 660.6 * _T)),
        sources=(("memory_bytes", f"{_ADA}: 24 GB GDDR6X"),
                 ("bandwidth", f"{_ADA}: 1008 GB/s (384-bit, 21 Gbps)"),
                 ("flops", f"{_ADA}: tensor figures with FP32 accumulate, dense; float32 non-tensor")),
    ),
    "h100": DeviceSpec(
        name="NVIDIA H100 SXM5 80GB",
        memory_bytes=80 * _GIB,
        bandwidth=3350 * _GB,
        flops=(("float64", 67 * _T), ("float32", 67 * _T), ("tfloat32", 494.7 * _T), ("float16", 989.5 * _T),
               ("bfloat16", 989.5 * _T), ("float8_e4m3fn", 1979 * _T), ("int8", 1979 * _T)),
        sources=(("memory_bytes", f"{_H100}: 80 GB HBM3"), ("bandwidth", f"{_H100}: 3.35 TB/s"),
                 ("flops", _H100)),
    ),
    "h200": DeviceSpec(
        name="NVIDIA H200 SXM 141GB",
        memory_bytes=141 * 10**9,
        bandwidth=4800 * _GB,
        flops=(("float64", 67 * _T), ("float32", 67 * _T), ("tfloat32", 494.7 * _T), ("float16", 989.5 * _T),
               ("bfloat16", 989.5 * _T), ("float8_e4m3fn", 1979 * _T), ("int8", 1979 * _T)),
        sources=(("memory_bytes", f"{_H200}: 141 GB HBM3e"), ("bandwidth", f"{_H200}: 4.8 TB/s"),
                 ("flops", f"{_H200}: the same compute as H100 SXM")),
    ),
    "b200": DeviceSpec(
        name="NVIDIA B200 (HGX)",
        memory_bytes=180 * 10**9,
        bandwidth=8000 * _GB,
        flops=(("float64", 40 * _T), ("float32", 80 * _T), ("tfloat32", 1100 * _T), ("float16", 2250 * _T),
               ("bfloat16", 2250 * _T), ("float8_e4m3fn", 4500 * _T), ("int8", 4500 * _T),
               ("float4_e2m1fn", 9000 * _T)),
        sources=(("memory_bytes", "NVIDIA HGX B200 datasheet: 1.44 TB for 8 GPUs, 180 GB each (192 GB at the "
                                  "2024 announcement)"),
                 ("bandwidth", "NVIDIA Blackwell announcement: 8 TB/s HBM3e (the HGX datasheet: 62 TB/s for 8, "
                               "7.7 TB/s each)"),
                 ("flops", _B200)),
    ),
}
"""The devices the Gleam library described (RTX 4090, Blackwell B200), H100 and H200, by short name."""

_KIND_NAMES = (("rtx 4090", "rtx4090"), ("h100", "h100"), ("h200", "h200"), ("b200", "b200"))


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, str) and dtype == "tfloat32":
        return dtype
    try:
        return jnp.dtype(dtype).name
    except TypeError:
        raise ConfigError(argument="dtype", expected="a dtype or 'tfloat32'", got=dtype) from None


def peak_flops(device: DeviceSpec | str, dtype: Any = "float32") -> float:
    """A device's peak FLOP/s for a dtype.

    Args:
        device: a :class:`DeviceSpec`, or a name for :func:`device_spec`.
        dtype: a dtype (``jnp.bfloat16``, ``"float8_e4m3fn"`` ...) or ``"tfloat32"``.

    Returns:
        FLOP/s (dense).

    Raises:
        ConfigError: a dtype the spec has no figure for.

    Example:
        >>> peak_flops("rtx4090", "bfloat16") / 1e12
        165.2
    """
    spec = device_spec(device) if isinstance(device, str) else device
    name = _dtype_name(dtype)
    table = dict(spec.flops)
    if name not in table:
        raise ConfigError(argument="dtype", expected=f"one of {tuple(table)} for {spec.name}", got=name)
    return table[name]


def device_spec(device: str | jax.Device | None = None) -> DeviceSpec:
    """The spec of a device: a name of :data:`SPECS`, ``"cpu"`` (measured here), or a JAX device.

    Args:
        device: ``"rtx4090"``, ``"h100"``, ``"h200"``, ``"b200"``, ``"cpu"``, a ``jax.Device`` (matched by
            its ``device_kind``; a CPU device is measured), or ``None`` for the first JAX device.

    Returns:
        A :class:`DeviceSpec`.

    Raises:
        ConfigError: a name or device kind with no spec.

    Example:
        >>> device_spec("B200").bandwidth / 1e12
        8.0
    """
    if device is None:
        device = jax.devices()[0]
    if isinstance(device, str):
        key = device.lower().replace(" ", "").replace("_", "")
        if key in ("cpu", "local"):
            return local_cpu()
        if key not in SPECS:
            raise ConfigError(argument="device", expected=f"one of {tuple(SPECS) + ('cpu',)}", got=device)
        return SPECS[key]
    if device.platform == "cpu":
        return local_cpu()
    kind = device.device_kind.lower()
    for needle, key in _KIND_NAMES:
        if needle in kind:
            return SPECS[key]
    raise ConfigError(argument="device", expected=f"a device kind with a spec ({tuple(SPECS)})",
                      got=device.device_kind, hint="build a DeviceSpec for it.")


def _best_time(f: Callable[[], Any], repeats: int) -> float:
    return time_fn(f, repeats=repeats).min_s


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def local_cpu(*, size: int = 1024, repeats: int = 3) -> DeviceSpec:
    """The spec of this machine's CPU, measured (about a second): what XLA actually reaches here.

    Bandwidth is the best rate of a jitted, donated (in place) ``x * 2`` over 64 MiB (bytes read plus
    written); FLOP/s are the best rate of a jitted ``size x size`` matmul in float32 and bfloat16;
    memory is the physical RAM. These are achieved rates, not the processor's theoretical peak, and
    they vary with the load on the machine. A function that writes fresh output buffers can run far
    slower than this bandwidth says: on Linux each new page is zeroed by the kernel at first touch.

    Args:
        size: the matmul's side.
        repeats: timed runs after a warm-up; the best is kept.

    Returns:
        A :class:`DeviceSpec` whose sources say how each number was measured.

    Example:
        >>> spec = local_cpu(size=128, repeats=1)
        >>> spec.bandwidth > 0 and peak_flops(spec, "float32") > 0
        True
    """
    n = 16 * 2**20  # 64 MiB of float32
    double = jax.jit(lambda a: a * 2, donate_argnums=0)  # in place: no fresh pages to fault in
    state = [jnp.ones((n,), jnp.float32)]

    def step():
        state[0] = double(state[0])
        return state[0]

    bandwidth = 2 * 4 * n / _best_time(step, repeats)
    state.clear()
    flops = []
    matmul = jax.jit(lambda a, b: a @ b)
    for dtype in ("float32", "bfloat16"):
        a = jnp.ones((size, size), dtype)
        flops.append((dtype, 2 * size**3 / _best_time(lambda a=a: matmul(a, a), repeats)))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return DeviceSpec(
        name=f"{_cpu_name()} ({cores} cores available)",
        memory_bytes=int(ram),
        bandwidth=float(bandwidth),
        flops=tuple(flops),
        sources=(("memory_bytes", "physical RAM (os.sysconf)"),
                 ("bandwidth", f"measured: best of {repeats} jitted in-place x * 2 over 64 MiB float32, "
                               "read + written"),
                 ("flops", f"measured: best of {repeats} jitted {size}x{size} matmuls, 2*n^3 FLOPs")),
    )


def _is_dtype(fmt: str) -> bool:
    try:
        jnp.dtype(fmt)
        return True
    except TypeError:
        return False


def tensor_memory_bytes(shape: tuple[int, ...], fmt: str = "float32", **options: Any) -> int:
    """Bytes a tensor of ``shape`` takes in a format: a dtype, or a quantization format's real record.

    A quantization format is measured, not computed: its ``quantize`` is traced with
    ``jax.eval_shape`` on a float32 ``jax.ShapeDtypeStruct`` (nothing is allocated) and the record's
    buffers (codes, scales ...) are summed.

    Args:
        shape: the tensor's shape.
        fmt: a dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``, ``"int8"`` ...) or a registered
            format (``"nf4"``, ``"q4_0"``, ``"nvfp4"`` ..., see ``viva_tensor._formats.registry.FORMATS``). A name
            that is both (``"int8"``) means the format: codes plus their scales.
        **options: keyword options for the format's ``quantize`` (``block_size`` ...).

    Returns:
        Bytes.

    Raises:
        FormatError: an unknown format.
        InvalidShape and others: what the format's ``quantize`` raises for this shape.

    Example:
        >>> tensor_memory_bytes((4096, 4096), "bfloat16")
        33554432
    """
    shape = tuple(int(d) for d in shape)
    if fmt in FORMATS:
        record = jax.eval_shape(lambda x: FORMATS[fmt].quantize(x, **options),
                                jax.ShapeDtypeStruct(shape, jnp.float32))
        return int(sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(record)))
    if isinstance(fmt, str) and _is_dtype(fmt):
        if options:
            raise FormatError(argument="options", expected=f"none for the dtype {fmt}", got=sorted(options))
        return math.prod(shape) * jnp.dtype(fmt).itemsize
    raise FormatError(argument="fmt", expected=f"a dtype or one of {tuple(FORMATS)}", got=fmt)


@pytree_dataclass
class EffectiveMemory:
    """How many values a device holds in a format.

    Attributes:
        device: the device's name.
        fmt: the format.
        bits_per_value: stored bits per value (measured on a 4096 x 4096 tensor).
        values: how many values fit in the device's memory.
        float32_equivalent_bytes: the bytes those values would take in float32.
    """

    device: str = flax.struct.field(pytree_node=False)
    fmt: str = flax.struct.field(pytree_node=False)
    bits_per_value: float = flax.struct.field(pytree_node=False)
    values: int = flax.struct.field(pytree_node=False)
    float32_equivalent_bytes: int = flax.struct.field(pytree_node=False)


def effective_memory(device: DeviceSpec | str, fmt: str = "float32") -> EffectiveMemory:
    """How many parameters fit on a device in a format (the bytes per value measured from the record).

    Args:
        device: a :class:`DeviceSpec` or a name for :func:`device_spec`.
        fmt: a dtype or a registered quantization format.

    Returns:
        An :class:`EffectiveMemory`.

    Raises:
        FormatError: an unknown format.

    Example:
        >>> e = effective_memory("rtx4090", "bfloat16")
        >>> e.bits_per_value, e.values == 12 * 2**30
        (16.0, True)
    """
    spec = device_spec(device) if isinstance(device, str) else device
    side = 4096
    bits = 8.0 * tensor_memory_bytes((side, side), fmt) / side**2
    values = int(spec.memory_bytes * 8 // bits)
    return EffectiveMemory(spec.name, fmt, bits, values, 4 * values)


@pytree_dataclass
class PerformanceEstimate:
    """Where a compiled function sits on a device's roofline.

    Attributes:
        device: the device's name.
        dtype: the dtype whose peak was used.
        flops: FLOPs of the compiled function (XLA's cost analysis).
        bytes_accessed: bytes it reads and writes (XLA's cost analysis).
        arithmetic_intensity: ``flops / bytes_accessed``.
        compute_seconds: ``flops / peak``.
        memory_seconds: ``bytes_accessed / bandwidth``.
        seconds: the estimate, the larger of the two.
        bound: ``"compute"`` or ``"memory"``.
    """

    device: str = flax.struct.field(pytree_node=False)
    dtype: str = flax.struct.field(pytree_node=False)
    flops: float = flax.struct.field(pytree_node=False)
    bytes_accessed: float = flax.struct.field(pytree_node=False)
    arithmetic_intensity: float = flax.struct.field(pytree_node=False)
    compute_seconds: float = flax.struct.field(pytree_node=False)
    memory_seconds: float = flax.struct.field(pytree_node=False)
    seconds: float = flax.struct.field(pytree_node=False)
    bound: str = flax.struct.field(pytree_node=False)


def _widest_float(args: Any) -> str:
    names = [jnp.dtype(a.dtype).name for a in jax.tree_util.tree_leaves(args)
             if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)]
    if not names:
        return "float32"
    return max(names, key=lambda n: jnp.dtype(n).itemsize)


def estimate_performance(f: Callable[..., Any], *args: Any, device: DeviceSpec | str = "cpu",
                         dtype: Any = None, **kwargs: Any) -> PerformanceEstimate:
    """A roofline estimate of ``f(*args)`` on a device, from XLA's cost analysis of the compiled function.

    Nothing runs: ``f`` is compiled (for the local backend) for ``args`` (arrays or
    ``jax.ShapeDtypeStruct`` s) and its FLOPs and bytes accessed are divided by the device's peak and
    bandwidth. The estimate ignores launch overheads, caches and overlap; it is a lower bound of the time.

    Args:
        f: the function (jitted or not).
        *args: its arguments.
        device: a :class:`DeviceSpec` or a name for :func:`device_spec` (``"cpu"`` measures this machine).
        dtype: whose peak FLOP/s to use (default: the widest floating dtype among the arguments).
        **kwargs: keyword arguments for ``f``.

    Returns:
        A :class:`PerformanceEstimate`.

    Raises:
        ConfigError: a dtype the device has no peak for.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> a = jax.ShapeDtypeStruct((1024, 1024), jnp.float32)
        >>> e = estimate_performance(lambda x, y: x @ y, a, a, device="h100")
        >>> e.flops == 2 * 1024**3, e.bound
        (True, 'compute')
    """
    spec = device_spec(device) if isinstance(device, str) else device
    name = _dtype_name(dtype) if dtype is not None else _widest_float(args)
    peak = peak_flops(spec, name)
    cost = _xla.cost(_xla.compile(f, *args, **kwargs))
    flops = float(cost.get("flops", 0.0))
    moved = float(cost.get("bytes accessed", 0.0))
    compute, memory = flops / peak, moved / spec.bandwidth
    return PerformanceEstimate(
        device=spec.name, dtype=name, flops=flops, bytes_accessed=moved,
        arithmetic_intensity=flops / moved if moved else math.inf,
        compute_seconds=compute, memory_seconds=memory, seconds=max(compute, memory),
        bound="compute" if compute >= memory else "memory",
    )
