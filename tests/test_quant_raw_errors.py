"""Inputs that raised raw JAX/NumPy errors give viva_tensor errors naming the argument (issue 12, raw errors)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from viva_tensor import _safetensors, quant
from viva_tensor.errors import CheckpointError, DimensionError

_DIMS = [(((1, 1), (1, 1)), ((), ())), (((1,), (1,)), ((1,), (1,))), (((1, -1), (0, 1)), ((), ()))]


@pytest.mark.parametrize("dims", _DIMS)
def test_dot_general_duplicate_dims(dims):
    q = quant.quantize(jnp.ones((4, 32)), "q8_0")
    with pytest.raises(DimensionError) as e:
        quant.dot_general(jnp.ones((4, 32)), q, dims)
    assert e.value.argument == "dimension_numbers" and "distinct" in str(e.value)


def test_save_of_a_traced_array(tmp_path):
    with pytest.raises(CheckpointError, match="traced") as e:
        jax.jit(lambda a: quant.save(tmp_path / "x.safetensors", {"w": a}))(jnp.ones(3))
    assert e.value.argument == "tree"


@pytest.mark.parametrize("name", ["__version__", "__class__", "object", "O", "V8", "float64x"])
def test_load_refuses_odd_dtype_names(tmp_path, name):
    meta = {"version": 1, "tree": {"array": "a"}, "tensors": {"a": {"dtype": name, "shape": [3], "sha256": "0"}}}
    path = tmp_path / "odd.safetensors"
    _safetensors.write(path, {"a": np.ones(3, np.float32)}, metadata={"viva_tensor": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="unknown dtype"):
        quant.load(path)
