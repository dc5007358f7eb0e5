"""What every quantization format promises, as helpers for tests/test_format_contract.py.

A format registered in ``quant.FORMATS`` is checked against one contract, parametrized over
``quant.format_names()``: round trip within the format's stated error, the same bytes under ``jit`` and
eagerly, ``vmap``, no retrace for new values, a record held by an NNX module as data, a bit-exact
checkpoint, decode planes equal to ``dequantize``, and the library's input policy (float64, str, None,
lists and empty arrays refused with the right error class). The per-family test files keep only their
oracle tests (gguf, bitsandbytes-derived fixtures, spec tables).
"""

import jax
import jax.numpy as jnp
import numpy as np

from viva_tensor import quant

#: The stated worst-case error of each built-in format, as a fraction of the tensor's absmax, for the
#: contract's Gaussian input (float32). From the definitions: half a code step of the format's grid
#: (INT8/Q8_0 1/254; Q4_0 1/16; Q4_1 and group-int4 range/30 <= 1/15; NF4 half the widest level gap
#: 0.139; E2M1 half of the 4..6 gap over a block scale, MXFP4 up to 1/4 with saturation; Q5_0 1/32;
#: Q5_1 and Q5_K range/62; Q6_K 1/64; Q4_K range/30; Q3_K 1/8; Q2_K range/6), plus the rounding of a
#: float16 / FP8 / 8-bit scale (the K-quants' 4/6/8-bit sub-block scales add the most).
STATED_ERROR = {
    "int8": 0.0041,
    "q8_0": 0.0045,
    "q5_0": 0.034,
    "q5_1": 0.035,
    "q2_k": 0.34,
    "q3_k": 0.14,
    "q4_k": 0.08,
    "q5_k": 0.04,
    "q6_k": 0.02,
    "q4_0": 0.066,
    "q4_1": 0.07,
    "nf4": 0.14,
    "nf4_dq": 0.16,
    "bnb_fp4": 0.17,  # half the widest gap of bitsandbytes' FP4 code book (0.667 .. 1): 1/6
    "bnb_fp4_dq": 0.19,
    "nvfp4": 0.2,
    "mxfp4": 0.26,
    "int4_group": 0.07,
    "awq_int4": 0.07,
    "int4_gidx": 0.07,  # int4_group's grid, groups given by g_idx
}
#: An error for formats registered by others (a test-only format ...): only a sanity bound.
DEFAULT_ERROR = 1.0

SHAPE = (8, 256)  # whole blocks for every built-in format (16, 32, 64, 128 values; the K-quants: 256)


def sample(dtype=jnp.float32, seed=0, shape=SHAPE):
    """A Gaussian tensor with a zero row, an outlier and a negative extreme (every code path)."""
    x = np.array(jax.random.normal(jax.random.key(seed), shape), np.float32)
    x[1] = 0.0
    x[2, 5] = 7.5
    x[3, 17] = -6.0
    return jnp.asarray(x, dtype)


def bits(a):
    """An array's raw bits as unsigned integers (so NaN payloads and signed zeros compare exactly)."""
    a = np.asarray(a)
    if a.dtype.kind in "fV" or a.dtype.name in ("bfloat16",) or "float" in a.dtype.name:
        return a.view(f"uint{8 * a.dtype.itemsize}")
    return a


def assert_same_bits(a, b, what=""):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    np.testing.assert_array_equal(bits(a), bits(b), err_msg=what)


def assert_same_record(q1, q2, what=""):
    """Same class, same static fields, same leaves bit for bit."""
    assert type(q1) is type(q2), what
    t1, t2 = jax.tree_util.tree_structure(q1), jax.tree_util.tree_structure(q2)
    assert t1 == t2, f"{what}: {t1} != {t2}"
    for i, (a, b) in enumerate(zip(jax.tree_util.tree_leaves(q1), jax.tree_util.tree_leaves(q2), strict=True)):
        assert_same_bits(a, b, f"{what} leaf {i}")


def quantize(fmt):
    """The by-name quantizer of a format, as a one-argument function (for jit, vmap, checks)."""
    return lambda x: quant.quantize(x, fmt)


def merged_planes(q):
    """The format's decode planes merged back into the weight's column order (or None without a hook)."""
    from viva_tensor.quant import _dot

    hook = quant.format_spec(q.format).planes
    got = None if hook is None else hook(q)
    return None if got is None else _dot._merge_planes(*got)
