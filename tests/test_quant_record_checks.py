"""Records whose static fields were edited (dataclasses.replace) are refused where decoded (issue 12, item 8)."""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import pytest
from format_contract import SHAPE, sample

from viva_tensor import quant
from viva_tensor._formats.registry import expected_record
from viva_tensor.errors import FormatError

FORMATS = quant.format_names()


def _module_dequantize(q):
    spec = quant.format_spec(q.format)
    return importlib.import_module(spec.quantize.__module__).dequantize


def _edits(q):
    yield "smaller shape", dataclasses.replace(q, shape=(SHAPE[0] // 2, SHAPE[1]))
    yield "transposed shape", dataclasses.replace(q, shape=(SHAPE[1], SHAPE[0]))
    yield "dtype int32", dataclasses.replace(q, dtype=jnp.int32)


def _same_buffers(q, bad):
    if SHAPE[0] % quant.format_spec(q.format).row_multiple:
        return True
    want = jax.tree_util.tree_leaves(expected_record(quant.format_spec(q.format), bad))
    return [e.shape for e in want] == [a.shape for a in jax.tree_util.tree_leaves(q)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_edited_record_is_refused(fmt):
    q = quant.quantize(sample(), fmt)
    quant.dequantize(q)  # the unedited record decodes
    x = jnp.ones((3, SHAPE[1]), jnp.float32)
    for what, bad in _edits(q):
        if what == "transposed shape" and _same_buffers(q, bad):
            continue  # a format of flat blocks (q4_0, nf4 ...): a reshape of the same bytes, decoded as such
        for f in (quant.dequantize, jax.jit(quant.dequantize), _module_dequantize(q)):
            with pytest.raises(FormatError, match="static fields") as e:
                f(bad)
            assert e.value.argument == "q", what
        with pytest.raises(FormatError) as e:
            quant.dot_general(x, bad, (((1,), (1,)), ((), ())))
        assert e.value.argument == "rhs", what


def test_int8_shape_is_checked():
    q = quant.quantize(jnp.ones((4, 8)), "int8")
    with pytest.raises(FormatError):
        quant.dequantize(dataclasses.replace(q, shape=(2, 8)))


@pytest.mark.parametrize("fmt", ["nf4", "q4_0", "int8"])
def test_records_made_under_vmap_still_decode(fmt):
    x = jnp.stack([sample(), sample(seed=1)])
    q = jax.vmap(lambda a: quant.quantize(a, fmt))(x)
    assert quant.dequantize(q).shape == x.shape
    assert jax.vmap(quant.dequantize)(q).shape == x.shape
