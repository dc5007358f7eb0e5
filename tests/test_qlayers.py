"""viva_tensor.nn's quantized layers (nn/_qlayers.py): QEmbed, QLinearGeneral, QEinsum, QConv, the dispatch table.

References: the float Flax layer (``nnx.Embed``, ``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Conv``) holding the
dequantized kernel; ``jnp.take(quant.dequantize(table), ids, axis=0)`` for lookups (bit for bit); XLA's compiled
memory and cost analyses for "decodes only the gathered rows". Strict dtype promotion throughout.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from viva_tensor import _xla, nn, quant
from viva_tensor.errors import DimensionError, DTypeError, FormatError, ShapeMismatch, TensorError


@pytest.fixture(autouse=True)
def _strict_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield


def _same(a, b):
    return np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), equal_nan=True)


def _normal(shape, dtype=jnp.float32, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _quantized(x, fmt, **options):
    """``quant.quantize`` under jit (the K-quants are slow eagerly): the same record."""
    return jax.jit(lambda a: quant.quantize(a, fmt, **options))(x)


# ------------------------------------------------------------------------------------------------ QEmbed

ROW_FORMATS = [
    ("q8_0", {}), ("q4_0", {}), ("q4_1", {}), ("q5_0", {}), ("q5_1", {}), ("nf4", {}), ("nvfp4", {}),
    ("mxfp4", {}), ("int4_group", {}), ("int8", {}), ("int8", {"axis": None}), ("q4_k", {}),
]


@pytest.mark.parametrize(("fmt", "options"), ROW_FORMATS, ids=[f + str(o) for f, o in ROW_FORMATS])
def test_qembed_lookup_is_the_dequantized_rows_bit_for_bit(fmt, options, maybe_jit):
    embed = nnx.Embed(40, 256, rngs=nnx.Rngs(0))
    q = nn.QEmbed(_quantized(embed.embedding.get_value(), fmt, **options))
    ids = jnp.array([[0, 5, -1, 39], [39, -40, 7, 7]], jnp.int32)
    got = maybe_jit(lambda m, i: m(i))(q, ids)
    want = maybe_jit(lambda t, i: jnp.take(quant.dequantize(t), i, axis=0))(q.table.get_value(), ids)
    assert got.shape == (2, 4, 256) and got.dtype == jnp.float32
    assert _same(got, want)
    # the float layer on the dequantized table gives the same rows
    embed.embedding.set_value(q.float_kernel())
    assert _same(got, embed(ids))


def test_qembed_out_of_range_ids_give_nan_like_nnx_embed():
    q = nn.QEmbed.from_embed(nnx.Embed(8, 32, rngs=nnx.Rngs(0)), "q8_0")
    out = jax.jit(q.__call__)(jnp.array([8, -9, 100, 3], jnp.int32))
    assert bool(jnp.isnan(out[:3]).all()) and bool(jnp.isfinite(out[3]).all())


def test_qembed_bfloat16_table_and_dtype():
    table = _normal((16, 64), jnp.bfloat16)
    q = nn.QEmbed(quant.quantize(table, "q4_0"))
    ids = jnp.array([3, 1, 15], jnp.int32)
    out = jax.jit(q.__call__)(ids)
    assert out.dtype == jnp.bfloat16
    assert _same(out, jax.jit(lambda t: quant.dequantize(t)[ids])(q.table.get_value()))
    assert nn.QEmbed(quant.quantize(table, "q4_0"), dtype=jnp.float32)(ids).dtype == jnp.float32


def test_qembed_under_vmap():
    q = nn.QEmbed.from_embed(nnx.Embed(32, 64, rngs=nnx.Rngs(1)), "nf4")
    ids = jnp.array([[1, 2, 3], [31, 0, 4]], jnp.int32)
    out = jax.vmap(lambda i: q(i))(ids)
    assert _same(out, q(ids))


def test_qembed_lookup_decodes_only_the_gathered_rows():
    """64 ids into MiniLM's 30522 x 384 word table: temporaries and FLOPs of the compiled lookup."""
    table_bytes = 30522 * 384 * 4
    for fmt in ("q4_0", "nf4", "nvfp4"):
        q = jax.eval_shape(lambda a, f=fmt: quant.quantize(a, f), jax.ShapeDtypeStruct((30522, 384), jnp.float32))
        ids = jax.ShapeDtypeStruct((64,), jnp.int32)
        small = jax.eval_shape(lambda a, f=fmt: quant.quantize(a, f), jax.ShapeDtypeStruct((128, 384), jnp.float32))
        lookup = _xla.compile(nn.gather_rows, q, ids)
        mem = _xla.memory_of(lookup)
        assert mem.temp_bytes < table_bytes // 1000, (fmt, mem)
        assert mem.output_bytes == 64 * 384 * 4
        # the work does not grow with the table: the FLOPs of the lookup into a table of 128 rows (NVFP4: XLA's cost
        # analysis counts the FP8 scales' no-op bitcast over the whole buffer, 24 per row; measured 4% of a decode)
        flops = _xla.cost(lookup)["flops"]
        if fmt != "nvfp4":
            assert flops <= 1.01 * _xla.cost(_xla.compile(nn.gather_rows, small, ids))["flops"], fmt
        assert flops < 0.05 * _xla.cost(_xla.compile(quant.dequantize, q))["flops"], fmt


def test_qembed_attend_is_the_tied_projection(dtype):
    embed = nnx.Embed(48, 64, rngs=nnx.Rngs(0), dtype=dtype)
    q = nn.QEmbed.from_embed(embed, "q8_0")
    embed.embedding.set_value(q.float_kernel())
    query = _normal((2, 3, 64), dtype)
    got = jax.jit(lambda m, x: m.attend(x))(q, query)
    want = embed.attend(query)
    assert got.shape == (2, 3, 48) and got.dtype == dtype
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol * 8)


def test_qembed_refuses_what_it_cannot_gather():
    with pytest.raises(FormatError, match="blocks run along the feature axis"):
        nn.QEmbed.from_embed(nnx.Embed(64, 512, rngs=nnx.Rngs(0)), "nf4_dq")
    with pytest.raises(TensorError):
        nn.QEmbed.from_embed(nnx.Embed(8, 384, rngs=nnx.Rngs(0)), "q4_k")  # rows of 256
    with pytest.raises(FormatError, match="quantized record"):
        nn.QEmbed(jnp.ones((4, 32)))
    with pytest.raises(DimensionError):
        nn.QEmbed(quant.quantize(jnp.ones((2, 4, 32)), "q8_0"))
    q = nn.QEmbed(quant.quantize(jnp.ones((4, 32)), "q8_0"))
    with pytest.raises(DTypeError, match="inputs"):
        q(jnp.array([1.0]))
    with pytest.raises(ShapeMismatch, match="query"):
        q.attend(jnp.ones((2, 31)))


def test_a_model_holding_a_qembed_round_trips_through_nnx_and_save(tmp_path):
    class Model(nnx.Module):
        def __init__(self):
            self.embed = nn.QEmbed.from_embed(nnx.Embed(64, 64, rngs=nnx.Rngs(0)), "q4_0")
            self.out = nn.QLinear.from_linear(nnx.Linear(64, 32, rngs=nnx.Rngs(1)), "nf4")

        def __call__(self, ids):
            return self.out(self.embed(ids))

    model = Model()
    ids = jnp.array([[1, 2, 63]], jnp.int32)
    want = model(ids)
    graphdef, state = nnx.split(model)
    assert _same(nnx.merge(graphdef, state)(ids), want)
    path = os.path.join(tmp_path, "m.safetensors")
    quant.save(path, nnx.to_pure_dict(state))
    loaded = quant.load(path)
    back = nnx.merge(graphdef, state)
    nnx.replace_by_pure_dict(state, loaded)
    back = nnx.merge(graphdef, state)
    assert _same(back(ids), want)
    assert quant.is_quantized(nnx.state(back, nnx.Param)["embed"]["table"].get_value())
    # a jitted call on the split state
    assert _same(jax.jit(lambda s, i: nnx.merge(graphdef, s)(i))(state, ids), want)
