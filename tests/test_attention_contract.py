"""Every attention implementation of viva_tensor against the contract of tests/attention_contract.py.

Flash attention at several block sizes (whole blocks, ragged blocks, the defaults), ring attention on 8
host CPU devices (conftest asks for 8 before jax is imported), and the naive O(n^2) reference.
"""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from tests import attention_contract as contract
from viva_tensor import flash_attention as fa
from viva_tensor import ring_attention as ra


def _flash(block_q, block_kv):
    return functools.partial(fa.dot_product_attention, block_q=block_q, block_kv=block_kv)


def _ring(devices):
    mesh = jax.make_mesh((devices,), ("sp",), axis_types=(AxisType.Auto,), devices=jax.devices()[:devices])

    def fn(q, k, v, *, scale=None, is_causal=False):
        return ra.ring_attention(q, k, v, mesh=mesh, axis="sp", scale=scale, is_causal=is_causal, block_q=2,
                                 block_kv=2)

    return fn


def _naive(q, k, v, *, scale=None, is_causal=False):
    return fa.naive_attention(q, k, v, scale, is_causal=is_causal)


IMPLS = [
    contract.Impl("flash_8x8", _flash(8, 8)),
    contract.Impl("flash_ragged_16x5", _flash(16, 5)),
    contract.Impl("flash_default", _flash(None, None)),
    contract.Impl("ring_8_devices", _ring(8), features=frozenset({"gqa", "robust"}), seq=32),
    contract.Impl("naive", _naive, features=frozenset({"cross"}), exact_jit=False),
]


@pytest.mark.parametrize("check", list(contract.CHECKS))
@pytest.mark.parametrize("impl", IMPLS, ids=[i.name for i in IMPLS])
def test_contract(impl, check):
    contract.CHECKS[check](impl)


def test_ring_attention_eager_calls_reuse_one_compiled_program():
    # ring_attention keeps one jitted shard_map per (mesh, axis, options): eager calls with the same options and
    # shapes (every check above calls it eagerly next to its jitted VJP) run one compiled program, not one each
    impl = next(i for i in IMPLS if i.name == "ring_8_devices")
    q, k, v = contract.inputs(impl, seed=40)
    first = impl.fn(q, k, v, scale=0.25, is_causal=True)
    second = impl.fn(q + 1.0, k, v, scale=0.25, is_causal=True)
    mesh = jax.make_mesh((8,), ("sp",), axis_types=(AxisType.Auto,), devices=jax.devices()[:8])
    program = ra._program(mesh, "sp", True, 0.25, 2, 2)
    assert program._cache_size() == 1
    for out, query in ((first, q), (second, q + 1.0)):
        np.testing.assert_allclose(out, jax.nn.dot_product_attention(query, k, v, scale=0.25, is_causal=True),
                                   rtol=2e-5, atol=2e-5)
