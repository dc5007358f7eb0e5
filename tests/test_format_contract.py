"""The contract every registered quantization format keeps (helpers in tests/format_contract.py)."""

import chex
import format_contract as fc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from viva_tensor import quant
from viva_tensor.errors import DTypeError, InvalidOp, InvalidShape

NAMES = quant.format_names()


@pytest.mark.parametrize("fmt", NAMES)
def test_round_trip_within_the_stated_error(fmt, dtype):
    x = fc.sample(dtype)
    q = quant.quantize(x, fmt)
    assert q.format == fmt and q.shape == x.shape and np.dtype(q.dtype) == np.dtype(dtype)
    y = quant.dequantize(q)
    assert y.shape == x.shape and y.dtype == x.dtype
    x32, y32 = np.asarray(x, np.float32), np.asarray(y, np.float32)
    assert np.all(y32[1] == 0.0), "an all-zero row decodes to zeros"
    err = np.max(np.abs(x32 - y32)) / np.max(np.abs(x32))
    # plus the rounding of the output to a 16-bit dtype
    tol = fc.STATED_ERROR.get(fmt, fc.DEFAULT_ERROR) + (0 if dtype == jnp.float32 else float(jnp.finfo(dtype).eps))
    assert err <= tol, f"{fmt}: relative error {err:.4f}"
    assert q.nbytes == sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(q))


def test_records_of_two_formats_never_share_a_treedef():
    # jaxlib's register_dataclass nodes compare equal whenever the child counts and static values match, whatever the
    # class (NF4 and FP4, Q4_0 and Q8_0, four K-quants ...): a jit cache could then run one format's trace on another
    # format's record when two hashes meet in a bucket (seen: NF4's code book applied to FP4 codes, a wrong gradient
    # in one suite run of three). Every record class is its own pytree node type.
    x = fc.sample(jnp.float32)
    defs = {fmt: jax.tree_util.tree_structure(quant.quantize(x, fmt)) for fmt in NAMES}
    same = [(a, b) for i, a in enumerate(NAMES) for b in NAMES[i + 1:] if defs[a] == defs[b]]
    assert not same
    for fmt in NAMES:  # and a record still equals itself (one trace per format and shape)
        assert defs[fmt] == jax.tree_util.tree_structure(quant.quantize(x * 2, fmt))


@pytest.mark.parametrize("fmt", NAMES)
def test_jit_and_eager_give_the_same_bytes(fmt, dtype):
    x = fc.sample(dtype, seed=1)
    eager = quant.quantize(x, fmt)
    fc.assert_same_record(jax.jit(fc.quantize(fmt))(x), eager, fmt)
    fc.assert_same_bits(jax.jit(quant.dequantize)(eager), quant.dequantize(eager), fmt)


@pytest.mark.parametrize("fmt", NAMES)
def test_vmap_records_decode_inside_and_outside_the_vmap(fmt):
    xs = jnp.stack([fc.sample(seed=s, shape=(4, 256)) for s in (2, 3)])
    qs = jax.vmap(fc.quantize(fmt))(xs)
    assert qs.batch_shape == (2,) and qs.shape == (4, 256)
    outside = quant.dequantize(qs)
    inside = jax.vmap(quant.dequantize)(qs)
    fc.assert_same_bits(outside, inside, fmt)
    for i in range(2):
        fc.assert_same_bits(outside[i], quant.dequantize(quant.quantize(xs[i], fmt)), f"{fmt} example {i}")


@pytest.mark.parametrize("fmt", NAMES)
def test_new_values_do_not_retrace(fmt):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def round_trip(x):
        return quant.dequantize(quant.quantize(x, fmt))

    round_trip(fc.sample(seed=4))
    round_trip(fc.sample(seed=5))
    chex.clear_trace_counter()


@pytest.mark.parametrize("fmt", NAMES)
def test_an_nnx_module_holds_a_record_as_data(fmt):
    q = quant.quantize(fc.sample(), fmt)

    class Holder(nnx.Module):
        def __init__(self):
            self.w = q  # no nnx.data(...) wrapper

    assert nnx.is_data(q) and q[...] is q
    graphdef, state = nnx.split(Holder())
    fc.assert_same_record(nnx.merge(graphdef, state).w, q, fmt)
    assert len(jax.tree_util.tree_leaves(state)) == len(jax.tree_util.tree_leaves(q))


@pytest.mark.parametrize("fmt", NAMES)
def test_save_and_load_are_bit_exact(fmt, tmp_path, dtype):
    q = quant.quantize(fc.sample(dtype), fmt)
    f = tmp_path / f"{fmt}.safetensors"
    quant.save(f, {"w": q, "b": jnp.arange(3.0)})
    back = quant.load(f)
    fc.assert_same_record(back["w"], q, fmt)
    fc.assert_same_bits(quant.dequantize(back["w"]), quant.dequantize(q), fmt)


@pytest.mark.parametrize("fmt", NAMES)
def test_decode_planes_equal_dequantize_bit_for_bit(fmt, dtype, maybe_jit):
    """The planes hook (4-bit formats) gives exactly ``dequantize``, with a non-finite and a zero block."""
    if quant.format_spec(fmt).planes is None:
        pytest.skip(f"{fmt} has no planes hook (dot_general decodes it through dequantize)")
    w = np.array(fc.sample(seed=6, shape=(64, 256))) * 3
    w[0, :32] = 0.0
    w[5, 64:70] = [np.inf, -np.inf, np.nan, 1.0, -1.0, 0.5]
    q = quant.quantize(jnp.asarray(w, dtype), fmt)
    got = maybe_jit(lambda r: fc.merged_planes(r).astype(r.dtype))(q)
    fc.assert_same_bits(got, quant.dequantize(q), fmt)


@pytest.mark.parametrize("fmt", NAMES)
@pytest.mark.parametrize(
    "bad, kind",
    [
        (np.ones((4, 128), np.float64), "float64"),
        (np.ones((4, 128), np.int32), "int32"),
        ("weights", "str"),
        (None, "NoneType"),
        ([[1.0] * 128] * 4, "list"),
    ],
    ids=["float64", "int32", "str", "None", "list"],
)
def test_bad_dtypes_are_refused_with_a_dtype_error(fmt, bad, kind):
    with pytest.raises(DTypeError, match=r"expected a float32, bfloat16 or float16 array, got " + kind) as e:
        quant.quantize(bad, fmt)
    assert e.value.argument in ("x", "w") and e.value.hint


@pytest.mark.parametrize("fmt", NAMES)
def test_empty_arrays_are_refused(fmt):
    with pytest.raises(InvalidShape, match="expected at least one value"):
        quant.quantize(jnp.zeros((0, 128)), fmt)


@pytest.mark.parametrize("fmt", NAMES)
def test_validate_under_jit_is_one_error_class(fmt):
    with pytest.raises(InvalidOp, match="argument 'validate'"):
        jax.jit(lambda x: quant.quantize(x, fmt, validate=True))(fc.sample())
