"""Tests of quant.dot_general's fast paths: the compiled kernel and the pure-JAX chunked decode, for every format, both
contractions of a 2-D record (its blocked last axis, "nk", ``x @ w.T``; its first axis, "kn", ``x @ w``), the record
on either side, batch 1, 3 and 17.

The reference is NumPy float64 over the format's own ``dequantize`` (dequantize-then-dot). The kernel and the pure-JAX
path sum in other orders than NumPy, so a result is checked against the float32 summation bound
``8 * K * 2**-24 * (|x| @ |w|)``; with integer-valued operands every partial sum is exact and the results are
bit for bit the same. Memory is XLA's compiled ``memory_analysis()`` of a 4096 x 4096 record (compiled only).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from viva_tensor import _kernels, quant
from viva_tensor._xla import compiled_memory
from viva_tensor.quant import _dot as quant_dot

FORMATS = ["int8", "q4_0", "q4_1", "q8_0", "nf4", "nf4_dq", "nvfp4", "mxfp4", "int4_group", "awq_int4"]
ROWS, PACKED = 48, 256  # the record's stored shape: blocked along its last axis


def _normal(shape, dtype=jnp.float32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@pytest.fixture
def no_kernel(monkeypatch):
    """Forces the pure-JAX path (what a GPU, a TPU or a machine without the compiled library takes)."""
    monkeypatch.setattr(quant_dot, "_kernel_enabled", lambda: False)
    quant_dot._qdot.clear_cache()
    yield
    quant_dot._qdot.clear_cache()


def _case(fmt, layout, batch, side, dtype=jnp.float32, seed=0):
    """(f, x, record, reference float64, bound): f(x, record) is the dot_general under test."""
    q = quant.quantize(_normal((ROWS, PACKED), seed=seed), fmt)
    w = np.asarray(quant.dequantize(q), np.float64)  # (ROWS, PACKED)
    k = PACKED if layout == "nk" else ROWS
    x = _normal((batch, k), dtype, seed + 1)
    xf = np.asarray(x, np.float64)
    wk = w.T if layout == "nk" else w  # (K, N)
    ref, mag = xf @ wk, np.abs(xf) @ np.abs(wk)
    rec_axis = 1 if layout == "nk" else 0
    if side == "rhs":
        dims = (((1,), (rec_axis,)), ((), ()))
    else:  # the record first: the output is the transpose
        dims = (((rec_axis,), (1,)), ((), ()))
        ref, mag = ref.T, mag.T
    bound = 8 * k * 2.0**-24 * mag + 1e-30
    if dtype == jnp.bfloat16:
        bound = bound + 2.0**-8 * np.abs(ref) + 2.0**-8 * 2.0**-126
    if side == "rhs":
        return (lambda a, r: quant.dot_general(a, r, dims)), x, q, ref, bound
    return (lambda a, r: quant.dot_general(r, a, dims)), x, q, ref, bound


def _within(y, ref, bound):
    err = np.abs(np.asarray(y, np.float64) - ref)
    assert np.all(err <= bound), f"worst excess {np.max(err - bound)}"


@pytest.mark.parametrize("side", ["rhs", "lhs"])
@pytest.mark.parametrize("batch", [1, 3, 17])
@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_path_equals_dequantize_then_dot(fmt, layout, batch, side):
    f, x, q, ref, bound = _case(fmt, layout, batch, side)
    eager, jitted = f(x, q), jax.jit(f)(x, q)
    assert eager.dtype == jnp.float32 and eager.shape == ref.shape
    _within(eager, ref, bound)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager))  # jit == eager, bit for bit


@pytest.mark.parametrize("side", ["rhs", "lhs"])
@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_the_kernel_takes_every_format(fmt, layout, side):
    if not _kernels.available():
        pytest.skip("the compiled kernel library is not built")
    f, x, q, _, _ = _case(fmt, layout, 2, side)
    assert "vt_qmatmul" in jax.jit(f).lower(x, q).as_text()


@pytest.mark.parametrize("side", ["rhs", "lhs"])
@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("fmt", ["q4_1", "nf4_dq", "nvfp4", "awq_int4", "int8"])
def test_bfloat16_activations(fmt, layout, side):
    f, x, q, ref, bound = _case(fmt, layout, 5, side, jnp.bfloat16, seed=3)
    y = jax.jit(f)(x, q)
    assert y.dtype == jnp.bfloat16
    _within(y, ref, bound)


@pytest.mark.parametrize("side", ["rhs", "lhs"])
@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("fmt", ["q4_0", "int8"])
def test_integer_operands_are_bit_for_bit(fmt, layout, side, no_kernel):
    # integer weights that the format stores exactly (q4_0: a -8 in every block, d = 1; int8: absmax 127, scale 1)
    rng = np.random.default_rng(5)
    lo, hi = (-8, 8) if fmt == "q4_0" else (-127, 128)
    w = rng.integers(lo, hi, (ROWS, PACKED)).astype(np.float32)
    w[:, ::32] = lo if fmt == "q4_0" else 127
    q = quant.quantize(jnp.asarray(w), fmt)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), w)
    k = PACKED if layout == "nk" else ROWS
    x = jnp.asarray(rng.integers(-8, 9, (17, k)).astype(np.float32))
    rec_axis = 1 if layout == "nk" else 0
    want = np.asarray(x) @ (w.T if layout == "nk" else w)  # exact: every partial sum is an integer below 2**24
    if side == "rhs":
        got_pure = quant.dot_general(x, q, (((1,), (rec_axis,)), ((), ())))
    else:
        got_pure, want = quant.dot_general(q, x, (((rec_axis,), (1,)), ((), ()))), want.T
    quant_dot._qdot.clear_cache()
    with pytest.MonkeyPatch.context() as mp:  # and the kernel path
        mp.setattr(quant_dot, "_kernel_enabled", lambda: _kernels.available())
        if side == "rhs":
            got_kernel = quant.dot_general(x, q, (((1,), (rec_axis,)), ((), ())))
        else:
            got_kernel = quant.dot_general(q, x, (((rec_axis,), (1,)), ((), ())))
    quant_dot._qdot.clear_cache()
    np.testing.assert_array_equal(np.asarray(got_pure), want)
    np.testing.assert_array_equal(np.asarray(got_kernel), want)


@pytest.mark.parametrize("side", ["rhs", "lhs"])
@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("fmt", ["q4_1", "nf4", "nvfp4", "q8_0", "awq_int4"])
def test_forced_fallback_is_the_pure_jax_path(fmt, layout, side, no_kernel):
    f, x, q, ref, bound = _case(fmt, layout, 3, side, seed=7)
    assert "vt_qmatmul" not in jax.jit(f).lower(x, q).as_text()
    _within(jax.jit(f)(x, q), ref, bound)


@pytest.fixture
def small_chunks(monkeypatch):
    """The pure-JAX path decodes a (512, 256) record in two chunks of 256 rows."""
    monkeypatch.setattr(quant_dot, "_CHUNK_VALUES", 1 << 12)
    monkeypatch.setattr(quant_dot, "_kernel_enabled", lambda: False)
    quant_dot._qdot.clear_cache()
    yield
    quant_dot._qdot.clear_cache()


@pytest.mark.parametrize("side", ["rhs", "lhs"])
@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("fmt", ["q4_1", "nf4_dq", "q8_0", "int8"])
def test_pure_jax_path_chunks_both_contractions(fmt, layout, side, small_chunks, dtype):
    q = quant.quantize(_normal((512, 256), seed=9), fmt)
    assert quant_dot._chunk_plan(q)[0] == 256
    w = np.asarray(quant.dequantize(q).astype(dtype), np.float64)
    k = 256 if layout == "nk" else 512
    x = _normal((3, 2, k), dtype, seed=8)  # leading dims fold into the batch
    ref = np.einsum("abk,nk->abn" if layout == "nk" else "abk,kn->abn", np.asarray(x, np.float64), w)
    rec_axis = 1 if layout == "nk" else 0
    if side == "rhs":
        out = quant.dot_general(x, q, (((2,), (rec_axis,)), ((), ())))
    else:
        out, ref = quant.dot_general(q, x, (((rec_axis,), (2,)), ((), ()))), np.moveaxis(ref, -1, 0)
    assert out.dtype == dtype and out.shape == ref.shape
    rtol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=rtol, atol=rtol * np.abs(ref).max())
    text = jax.jit(lambda a, r: quant.dot_general(a, r, (((2,), (rec_axis,)), ((), ())))).lower(x, q).as_text()
    assert "while" in text or "scan" in text  # decoded chunk by chunk


@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_contracted_axis_in_the_middle_and_vmap(layout):
    q = quant.quantize(_normal((ROWS, PACKED), seed=11), "nf4")
    w = np.asarray(quant.dequantize(q), np.float64)
    k = PACKED if layout == "nk" else ROWS
    rec_axis = 1 if layout == "nk" else 0
    x = _normal((2, k, 3), seed=12)  # the contracted axis of x is not its last
    out = quant.dot_general(x, q, (((1,), (rec_axis,)), ((), ())))
    ref = np.einsum("akc,nk->acn" if layout == "nk" else "akc,kn->acn", np.asarray(x, np.float64), w)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    xs = _normal((4, 5, k), seed=13)
    f = jax.vmap(lambda a: quant.dot_general(a, q, (((1,), (rec_axis,)), ((), ()))))
    each = np.stack([np.asarray(quant.dot_general(a, q, (((1,), (rec_axis,)), ((), ())))) for a in xs])
    # vmap folds the 4 x 5 rows into one call of 20: on the kernel path that is the GEMM (from 16 rows for "nk"),
    # which sums in another order than the 5-row fused kernel: equal within float32 summation rounding
    np.testing.assert_allclose(np.asarray(f(xs)), each, rtol=1e-5, atol=1e-5 * np.abs(each).max())


@pytest.mark.parametrize("side", ["rhs", "lhs"])
@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_gradients_through_the_kernel_path(layout, side):
    f, x, q, _, _ = _case("q4_1", layout, 3, side, seed=15)
    check_grads(lambda a: f(a, q), (x,), order=1, modes=("rev",), atol=2e-2, rtol=2e-2)
    g = jax.jit(jax.grad(lambda a: jnp.sum(f(a, q) ** 2)))
    # the cotangent of a linear map: d/dx sum(c * (x w)) = c w^T, against NumPy
    c = _normal(f(x, q).shape, seed=16)
    gx = jax.jit(jax.grad(lambda a: jnp.sum(c * f(a, q))))(x)
    w = np.asarray(quant.dequantize(q), np.float64)
    cf = np.asarray(c, np.float64)
    if side == "lhs":
        cf = cf.T
    expect = cf @ w if layout == "nk" else cf @ w.T
    np.testing.assert_allclose(np.asarray(gx), expect, rtol=1e-5, atol=1e-5 * np.abs(expect).max())
    if _kernels.available():
        assert "vt_qmatmul" in g.lower(x).as_text()


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "pure-jax"])
@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("fmt", ["nf4", "q8_0", "nvfp4"])
def test_no_dense_or_transposed_weight_is_compiled(fmt, layout, kernel, monkeypatch):
    if not kernel:
        monkeypatch.setattr(quant_dot, "_kernel_enabled", lambda: False)
    quant_dot._qdot.clear_cache()
    n = k = 4096  # compiled only, never run: 64 MiB as float32
    rec = jax.eval_shape(lambda w: quant.quantize(w, fmt), jax.ShapeDtypeStruct((n, k), jnp.float32))
    dims = (((1,), (1 if layout == "nk" else 0,)), ((), ()))
    for batch in (1, 64):
        x = jax.ShapeDtypeStruct((batch, k), jnp.float32)
        mem = compiled_memory(lambda a, r: quant.dot_general(a, r, dims), x, rec)
        assert mem.temp_bytes < n * k * 4 / 4, (batch, mem.temp_bytes)
    quant_dot._qdot.clear_cache()


# ---------------------------------------------------------------------------------------------
# activation_quant="int8" (dynamic W8A8)
# ---------------------------------------------------------------------------------------------


def _rows_int8_numpy(x):
    """Per-row absmax int8 from the definition: scale = max|x| / 127 in float32, codes = round half to even."""
    x = np.asarray(x, np.float32)
    amax = np.max(np.abs(x), axis=-1, keepdims=True)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    codes = np.clip(np.round(x / scale), -127, 127)
    return codes.astype(np.float64), scale.astype(np.float64)


W8A8_RECORDS = {
    "q8_0": lambda w: quant.quantize(w, "q8_0"),
    "int8_rows": lambda w: quant.quantize(w, "int8", axis=0),
    "int8_cols": lambda w: quant.quantize(w, "int8", axis=1),
    "int8_blocks": lambda w: quant.quantize(w, "int8", block_size=64),
    "int8_tensor": lambda w: quant.quantize(w, "int8"),
    "nf4": lambda w: quant.quantize(w, "nf4"),
    "q4_1": lambda w: quant.quantize(w, "q4_1"),
}


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "pure-jax"])
@pytest.mark.parametrize("batch", [1, 17])  # 17: a tile of 4 rows of x and a tail (test_kernels covers more)
@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("name", list(W8A8_RECORDS))
def test_w8a8_matches_numpy(name, layout, batch, kernel, monkeypatch):
    if not kernel:
        monkeypatch.setattr(quant_dot, "_kernel_enabled", lambda: False)
    quant_dot._qdot.clear_cache()
    q = W8A8_RECORDS[name](_normal((ROWS, PACKED), seed=21))
    w = np.asarray(quant.dequantize(q), np.float64)
    k = PACKED if layout == "nk" else ROWS
    x = _normal((batch, k), seed=22)
    dims = (((1,), (1 if layout == "nk" else 0,)), ((), ()))
    got = jax.jit(lambda a, r: quant.dot_general(a, r, dims, activation_quant="int8"))(x, q)
    eager = quant.dot_general(x, q, dims, activation_quant="int8")
    quant_dot._qdot.clear_cache()
    wk = w.T if layout == "nk" else w
    xin = np.asarray(x, np.float32)
    if name == "int8_cols" and layout == "nk":  # the column scales multiply the activations before rounding
        xin = xin * np.asarray(q.scales, np.float32).reshape(1, -1)
        wk = np.asarray(q.codes, np.float64).T
    codes, scale = _rows_int8_numpy(xin)
    ref = scale * (codes @ wk)
    bound = (PACKED // 32 + 8) * 2.0**-23 * scale * (np.abs(codes) @ np.abs(wk)) + 1e-30
    err = np.abs(np.asarray(got, np.float64) - ref)
    assert np.all(err <= bound), np.max(err - bound)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(eager))
    # W8A8 is within a few percent of the float product here (Gaussian x, a 48 x 256 weight)
    exact = np.asarray(x, np.float64) @ (w.T if layout == "nk" else w)
    assert np.linalg.norm(np.asarray(got) - exact) <= 0.02 * np.linalg.norm(exact)


def test_w8a8_takes_the_int8_kernel_for_int8_weights_on_their_blocked_axis():
    if not _kernels.available():
        pytest.skip("the compiled kernel library is not built")
    x = _normal((3, PACKED))
    for name, want in (("q8_0", True), ("int8_rows", True), ("int8_cols", True), ("nf4", False)):
        q = W8A8_RECORDS[name](_normal((ROWS, PACKED), seed=23))
        f = jax.jit(lambda a, r: quant.dot_general(a, r, (((1,), (1,)), ((), ())), activation_quant="int8"))
        assert ("vt_qmatmul_i8" in f.lower(x, q).as_text()) == want, name


def test_w8a8_nan_in_gives_nan_out_and_zero_rows():
    q = quant.quantize(_normal((ROWS, PACKED), seed=24), "q8_0")
    x = _normal((3, PACKED), seed=25).at[1, 7].set(jnp.nan).at[2].set(0.0)
    for layout in ("nk", "kn"):
        xx = x if layout == "nk" else x[:, :ROWS]
        y = np.asarray(quant.dot_general(xx, q, (((1,), (1 if layout == "nk" else 0,)), ((), ())),
                                         activation_quant="int8"))
        assert np.all(np.isfinite(y[0])) and np.all(np.isnan(y[1])) and np.all(y[2] == 0.0), layout


def test_w8a8_generic_path_and_the_layer():
    from viva_tensor.errors import ConfigError
    from viva_tensor.nn import QLinear

    # batch dims: the generic path rounds the plain operand per vector along its contracted axis
    q = jax.vmap(lambda a: quant.quantize(a, "q8_0"))(_normal((2, 32, 64), seed=26))
    x = _normal((2, 5, 64), seed=27)
    got = quant.dot_general(x, q, (((2,), (2,)), ((0,), (0,))), activation_quant="int8")
    codes, scale = _rows_int8_numpy(x)
    ref = np.einsum("gbk,gnk->gbn", scale * codes, np.asarray(quant.dequantize(q), np.float64))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    layer = QLinear(quant.quantize(_normal((32, 64), seed=28), "q8_0"), jnp.ones(32), activation_quant="int8")
    xs = _normal((4, 64), seed=29)
    want = quant.dot_general(xs, layer.weight.get_value(), (((1,), (1,)), ((), ())), activation_quant="int8") + 1.0
    np.testing.assert_allclose(np.asarray(layer(xs)), np.asarray(want), rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="activation_quant"):
        quant.dot_general(xs, layer.weight.get_value(), (((1,), (1,)), ((), ())), activation_quant="int4")
    with pytest.raises(ConfigError, match="activation_quant"):
        QLinear(layer.weight.get_value(), activation_quant="fp8")
