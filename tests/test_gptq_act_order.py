"""GPTQ act-order (``desc_act=True``): the ``int4_gidx`` record (a group index per input column), GPTQ's sweep
that makes it, and GPTQ checkpoints with a permuted ``g_idx`` read and written bit for bit.

References: the group-int4 quantizer and GPTQ checkpoint layout written out in NumPy from their definitions
(tests/gptq_reference.py for the sweep: IST-DASLab ``fasterquant`` with ``actorder`` and dynamic groups, as
GPTQModel's ``desc_act``), not this library's code.
"""

import gptq_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from viva_tensor import awq, gidx, gptq, quant
from viva_tensor.errors import CheckpointError, ConfigError, InvalidShape
from viva_tensor.interop import gptq as gptq_file


def _nibbles(packed, n):
    p = np.asarray(packed)
    return np.stack([p & 15, p >> 4], -1).reshape(*p.shape[:-1], -1)[..., :n].astype(np.int64)


def _rtn_reference(w, g_idx, group):
    """Group-int4 from its definition over each group's columns (float32 arithmetic, float16 scale)."""
    w = np.asarray(w, np.float32)
    out, k = w.shape
    ng = -(-k // group)
    values = np.zeros_like(w)
    for g in range(ng):
        cols = np.where(g_idx == g)[0]
        wg = w[:, cols]
        lo, hi = np.minimum(wg.min(1), 0).astype(np.float32), np.maximum(wg.max(1), 0).astype(np.float32)
        scale = (np.maximum(hi - lo, np.float32(1e-5)) / np.float32(15)).astype(np.float16).astype(np.float32)
        zero = np.clip(-np.round(lo / scale), 0, 15)
        code = np.clip(np.round(wg / scale[:, None]) + zero[:, None], 0, 15)
        values[:, cols] = (code - zero[:, None]) * scale[:, None]
    return values


def _perm_g_idx(k, group, seed):
    return (np.argsort(np.random.default_rng(seed).permutation(k)) // group).astype(np.int32)


@pytest.mark.parametrize("jit", [False, True])
def test_gidx_quantize_is_the_definition(jit, dtype):
    w = jax.random.normal(jax.random.key(0), (16, 96)).astype(dtype)
    g = _perm_g_idx(96, 32, 1)

    def f(a, b):
        return gidx.quantize(a, group_size=32, g_idx=b)

    q = (jax.jit(f) if jit else f)(w, jnp.asarray(g))
    assert isinstance(q, gidx.GIdxInt4Tensor) and q.format == "int4_gidx" and q.g_idx.dtype == jnp.int32
    y = quant.dequantize(q)
    assert y.dtype == dtype
    want = _rtn_reference(np.asarray(w, np.float32), g, 32)
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)), np.asarray(jnp.asarray(want).astype(dtype)
                                                                                 .astype(jnp.float32)))


def test_default_g_idx_is_int4_group_bit_for_bit():
    w = jax.random.normal(jax.random.key(2), (8, 100))
    q, r = gidx.quantize(w, group_size=32), awq.quantize_group(w, group_size=32)
    for a, b in zip((q.codes, q.scales, q.zeros), (r.codes, r.scales, r.zeros), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)).view(np.uint32),
                                  np.asarray(quant.dequantize(r)).view(np.uint32))


def test_dot_general_uses_the_group_index():
    w = jax.random.normal(jax.random.key(3), (24, 128))
    q = gidx.quantize(w, group_size=32, g_idx=jnp.asarray(_perm_g_idx(128, 32, 4)))
    x = jax.random.normal(jax.random.key(5), (3, 128))
    want = np.asarray(quant.dequantize(q), np.float64)
    y = np.asarray(quant.dot_general(x, q, (((1,), (1,)), ((), ()))), np.float64)
    ref64 = np.asarray(x, np.float64) @ want.T
    assert np.all(np.abs(y - ref64) <= 8 * 128 * 2.0**-24 * (np.abs(np.asarray(x)) @ np.abs(want).T) + 1e-6)


def test_vmap_and_bad_g_idx():
    w = jax.random.normal(jax.random.key(6), (2, 4, 64))
    qv = jax.vmap(lambda a: gidx.quantize(a, group_size=32))(w)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(qv)[1]),
                                  np.asarray(quant.dequantize(gidx.quantize(w[1], group_size=32))))
    with pytest.raises(InvalidShape, match="g_idx"):
        gidx.quantize(w[0], group_size=32, g_idx=jnp.zeros(63, jnp.int32))
    with pytest.raises(ConfigError, match="g_idx"):
        gidx.quantize(w[0], group_size=32, g_idx=jnp.zeros(64, jnp.int32))  # one group of 64, not two of 32


# --------------------------------------------------------------------------------- GPTQ's desc_act sweep


def _layer():
    kw, kx, kc = jax.random.split(jax.random.key(0), 3)
    mix = jnp.eye(256) + jax.random.normal(kc, (256, 256)) / 8
    scale = jnp.linspace(0.2, 3.0, 256)  # uneven activations: act-order really reorders
    return jax.random.normal(kw, (40, 256)) * 0.05, (jax.random.normal(kx, (512, 256)) @ mix) * scale[None, :]


def test_gptq_act_order_without_static_groups_matches_the_reference():
    w, x = _layer()
    h = gptq.hessian(x)
    q = gptq.quantize(w, h, "int4_group", group_size=64, act_order=True)
    assert isinstance(q, gidx.GIdxInt4Tensor)
    find_params, snap = ref.int4_group_grid()
    codes, values, _ = ref.gptq(np.asarray(w, np.float64), np.asarray(h.matrix, np.float64), find_params=find_params,
                                snap=snap, group_size=64, actorder=True, static_groups=False)
    perm = np.argsort(-np.diag(np.asarray(h.matrix)), kind="stable")
    np.testing.assert_array_equal(np.asarray(q.g_idx), np.argsort(perm) // 64)  # GPTQModel's g_idx[invperm]
    assert not np.array_equal(np.asarray(q.g_idx), np.arange(256) // 64)
    agree = np.mean(_nibbles(q.codes, 256) == codes)
    assert agree > 0.995, agree
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)

    def error(v):
        return np.linalg.norm(x64 @ w64.T - x64 @ np.asarray(v, np.float64).T)

    assert error(quant.dequantize(q)) <= error(values) * 1.01
    assert error(quant.dequantize(q)) < 0.9 * error(quant.dequantize(quant.quantize(w, "int4_group", group_size=64)))


def test_other_formats_still_need_static_groups_with_act_order():
    w, x = _layer()
    with pytest.raises(ConfigError, match="act_order"):
        gptq.quantize(w, gptq.hessian(x), "q4_0", act_order=True)


# --------------------------------------------------------------------------------- GPTQ checkpoints


def _pack_gptq(codes_in_out, zeros_g_out, scales_g_out, g_idx, v1=True):
    """GPTQ's layout from its definition: qweight bits 4j of [r, c] = code of input 8r + j; qzeros the same along
    the output dim, v1 storing zero - 1 as one int32 subtraction of 0x11111111."""
    k, out = codes_in_out.shape
    qweight = np.zeros((k // 8, out), np.uint32)
    for j in range(8):
        qweight |= codes_in_out[j::8].astype(np.uint32) << np.uint32(4 * j)
    qzeros = np.zeros((zeros_g_out.shape[0], out // 8), np.uint32)
    for j in range(8):
        qzeros |= zeros_g_out[:, j::8].astype(np.uint32) << np.uint32(4 * j)
    if v1:
        qzeros = qzeros - np.uint32(0x11111111)
    return {"qweight": qweight.view(np.int32), "qzeros": qzeros.view(np.int32), "scales": scales_g_out,
            "g_idx": g_idx}


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_desc_act_checkpoint_reads_and_writes_bit_for_bit(fmt):
    rng = np.random.default_rng(7)
    k, out, group = 128, 16, 32
    codes = rng.integers(0, 16, (k, out))
    zeros = rng.integers(1, 16, (k // group, out))
    scales = rng.uniform(0.001, 0.02, (k // group, out)).astype(np.float16)
    g_idx = _perm_g_idx(k, group, 8)
    layer = _pack_gptq(codes, zeros, scales, g_idx, v1=fmt == "gptq")
    q = gptq_file.read_layer(**layer, checkpoint_format=fmt, dtype="float32")
    assert isinstance(q, gidx.GIdxInt4Tensor) and q.shape == (out, k)
    want = (scales[g_idx].astype(np.float32) * (codes - zeros[g_idx]).astype(np.float32)).T  # (out, in)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), want)
    back = gptq_file.write_layer(q, checkpoint_format=fmt)
    for name, a in layer.items():
        assert back[name].dtype == a.dtype and back[name].shape == a.shape, name
        np.testing.assert_array_equal(np.ascontiguousarray(back[name]).view(np.uint8),
                                      np.ascontiguousarray(a).view(np.uint8), err_msg=name)
    sd = gptq_file.write_state_dict({"fc.weight": q, "fc.bias": np.zeros(out, np.float16)}, checkpoint_format=fmt)
    assert gptq_file.quantization_config({"fc.weight": q})["desc_act"] is True
    again = gptq_file.read_state_dict(sd, checkpoint_format=fmt, dtype="float32")["fc.weight"]
    np.testing.assert_array_equal(np.asarray(again.g_idx), g_idx)


def test_gptq_made_act_order_record_round_trips_through_a_checkpoint():
    w, x = _layer()
    q = gptq.quantize(w[:32], gptq.hessian(x), "int4_group", group_size=64, act_order=True)
    back = gptq_file.read_layer(**gptq_file.write_layer(q), dtype="float32")
    np.testing.assert_array_equal(np.asarray(quant.dequantize(back)), np.asarray(quant.dequantize(q)))


def test_a_g_idx_that_is_no_permutation_is_refused():
    rng = np.random.default_rng(9)
    layer = _pack_gptq(rng.integers(0, 16, (64, 8)), rng.integers(1, 16, (2, 8)),
                       np.ones((2, 8), np.float16), np.zeros(64, np.int32))
    with pytest.raises(CheckpointError, match="g_idx"):
        gptq_file.read_layer(**layer)
