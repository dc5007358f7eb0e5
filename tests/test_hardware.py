"""Tests of viva_tensor.hardware: specs with sources, record sizes, roofline from XLA's cost analysis.

Expected byte counts are written from each format's definition (GGML, QLoRA, NVFP4), and the FLOPs
of a matmul by hand (2*M*K*N).
"""

import math
import types

import jax
import jax.numpy as jnp
import pytest

from viva_tensor import hardware
from viva_tensor.errors import ConfigError, FormatError


def test_every_spec_names_its_sources():
    for name, spec in hardware.SPECS.items():
        sources = dict(spec.sources)
        assert set(sources) == {"memory_bytes", "bandwidth", "flops"}, name
        assert all(len(text) > 10 for text in sources.values())
        flops = dict(spec.flops)
        assert flops["bfloat16"] >= flops["float32"] > 0
        assert spec.ridge_point == flops["float32"] / spec.bandwidth


def test_published_figures():
    # the datasheets' headline numbers: memory, bandwidth, dense BF16
    assert hardware.device_spec("rtx4090").memory_bytes == 24 * 2**30
    assert hardware.device_spec("RTX4090").bandwidth == 1008e9
    assert hardware.peak_flops("h100", jnp.bfloat16) == 989.5e12
    assert hardware.device_spec("h200").memory_bytes == 141e9
    assert hardware.device_spec("h200").bandwidth == 4.8e12
    assert hardware.peak_flops("b200", "float4_e2m1fn") == 2 * hardware.peak_flops("b200", "float8_e4m3fn")
    assert hardware.peak_flops("h100", "tfloat32") == pytest.approx(hardware.peak_flops("h100", "bfloat16") / 2,
                                                                    rel=1e-3)


def test_device_spec_from_a_jax_device():
    fake = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    assert hardware.device_spec(fake) is hardware.SPECS["h100"]
    fake = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA GeForce RTX 4090")
    assert hardware.device_spec(fake) is hardware.SPECS["rtx4090"]
    with pytest.raises(ConfigError, match="argument 'device': expected a device kind with a spec"):
        hardware.device_spec(types.SimpleNamespace(platform="gpu", device_kind="Tesla T4"))
    with pytest.raises(ConfigError, match="argument 'device': expected one of"):
        hardware.device_spec("a100")
    with pytest.raises(ConfigError, match="argument 'dtype': expected one of"):
        hardware.peak_flops("rtx4090", "float4_e2m1fn")
    with pytest.raises(ConfigError, match="argument 'dtype': expected a dtype"):
        hardware.peak_flops("rtx4090", "float5")


def test_local_cpu_is_measured():
    spec = hardware.device_spec(jax.devices()[0])
    assert spec.memory_bytes > 2**30 and spec.bandwidth > 1e8
    assert hardware.peak_flops(spec, "float32") > 1e8
    assert dict(spec.sources)["flops"].startswith("measured")


@pytest.mark.parametrize("fmt, itemsize", [("float32", 4), ("bfloat16", 2), ("float16", 2), ("uint8", 1)])
def test_tensor_memory_bytes_of_dtypes(fmt, itemsize):
    assert hardware.tensor_memory_bytes((3, 5, 7), fmt) == 105 * itemsize
    assert hardware.tensor_memory_bytes((0, 5), fmt) == 0


# bytes of 4096 values, from each format's definition
FORMAT_BYTES = {
    "int8": 4096 + 4,              # int8 codes + one fp32 scale per tensor (the format wins over the dtype)
    "q4_0": 128 * (16 + 2),        # blocks of 32: 16 bytes of nibbles + an fp16 scale
    "q4_1": 128 * (16 + 2 + 2),    # + an fp16 min
    "q8_0": 128 * (32 + 2),        # 32 int8 + an fp16 scale
    "nf4": 4096 // 2 + 64 * 4,     # nibbles + an fp32 absmax per 64
    "nvfp4": 4096 // 2 + 256 + 4,  # E2M1 nibbles + an E4M3 scale per 16 + one fp32 per tensor
    "mxfp4": 4096 // 2 + 128,      # E2M1 nibbles + an E8M0 scale per 32
}


@pytest.mark.parametrize("fmt", sorted(FORMAT_BYTES))
def test_tensor_memory_bytes_of_quantized_records(fmt):
    assert hardware.tensor_memory_bytes((64, 64), fmt) == FORMAT_BYTES[fmt]


def test_tensor_memory_bytes_allocates_nothing():
    shape = (2**20, 2**16)  # 2**36 values: 256 GiB in float32, far more than this machine has
    assert hardware.tensor_memory_bytes(shape, "q8_0") == 2**36 // 32 * 34


def test_tensor_memory_bytes_errors():
    with pytest.raises(FormatError, match="argument 'fmt': expected a dtype or one of"):
        hardware.tensor_memory_bytes((4,), "q9_k")
    with pytest.raises(FormatError, match="argument 'options'"):
        hardware.tensor_memory_bytes((4,), "float32", block_size=32)


def test_effective_memory():
    e = hardware.effective_memory("rtx4090", "bfloat16")
    assert e.bits_per_value == 16 and e.values == 12 * 2**30 and e.float32_equivalent_bytes == 48 * 2**30
    q = hardware.effective_memory("rtx4090", "q4_0")
    assert q.bits_per_value == 4.5
    assert q.values == int(24 * 2**30 * 8 // 4.5)


@pytest.mark.parametrize("m, k, n", [(8, 16, 32), (128, 256, 64), (1, 512, 128), (33, 17, 65), (512, 8, 512)])
def test_roofline_of_a_matmul_by_hand(m, k, n):
    spec = hardware.DeviceSpec("toy", 2**30, 1e11, (("float32", 1e12),), ())
    a = jax.ShapeDtypeStruct((m, k), jnp.float32)
    b = jax.ShapeDtypeStruct((k, n), jnp.float32)
    e = hardware.estimate_performance(jnp.matmul, a, b, device=spec)
    flops, moved = 2 * m * k * n, 4 * (m * k + k * n + m * n)
    assert e.flops == flops
    # reading both operands and writing the output once; XLA may add a layout copy (the row vector)
    assert moved <= e.bytes_accessed <= 1.05 * moved
    moved = e.bytes_accessed
    assert e.compute_seconds == pytest.approx(flops / 1e12)
    assert e.memory_seconds == pytest.approx(moved / 1e11)
    assert e.seconds == max(e.compute_seconds, e.memory_seconds)
    assert e.bound == ("compute" if flops / moved >= 10 else "memory")  # ridge point: 1e12 / 1e11
    assert e.arithmetic_intensity == flops / moved


def test_roofline_bounds_on_real_devices():
    big = jax.ShapeDtypeStruct((4096, 4096), jnp.float32)
    vec = jax.ShapeDtypeStruct((4096, 1), jnp.float32)
    assert hardware.estimate_performance(jnp.matmul, big, big, device="h100").bound == "compute"
    e = hardware.estimate_performance(jnp.matmul, big, vec, device="h100")  # a matrix-vector product
    assert e.bound == "memory"
    assert e.arithmetic_intensity == pytest.approx(2 * 4096**2 / (4 * (4096**2 + 8192)), rel=2e-3)
    add = hardware.estimate_performance(lambda x: x + 1, big, device="b200")
    assert add.flops == 4096**2 and add.bound == "memory"


def test_roofline_dtype_and_jitted_functions():
    a = jax.ShapeDtypeStruct((256, 256), jnp.bfloat16)
    e = hardware.estimate_performance(jax.jit(jnp.matmul), a, a, device="h100")
    assert e.dtype == "bfloat16"
    assert e.compute_seconds == pytest.approx(e.flops / 989.5e12)
    e = hardware.estimate_performance(jnp.matmul, a, a, device="h100", dtype="float8_e4m3fn")
    assert e.compute_seconds == pytest.approx(e.flops / 1979e12)
    with pytest.raises(ConfigError, match="argument 'dtype'"):
        hardware.estimate_performance(jnp.matmul, a, a, device="rtx4090", dtype="float64")


def test_estimate_against_this_cpu():
    """The estimate is a lower bound: a measured run cannot beat it by much (a loose check)."""
    import time

    spec = hardware.local_cpu(size=256, repeats=2)
    x = jnp.ones((512, 512))
    f = jax.jit(jnp.matmul)
    f(x, x).block_until_ready()
    t0 = time.perf_counter()
    f(x, x).block_until_ready()
    measured = time.perf_counter() - t0
    e = hardware.estimate_performance(f, x, x, device=spec)
    assert math.isfinite(e.seconds) and e.seconds > 0
    assert e.seconds < 20 * measured
