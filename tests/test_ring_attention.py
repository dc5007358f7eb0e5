"""Ring attention: what is its own (the ppermute schedule, causal chunk skipping, memory per device, errors).

Its meaning (against jax.nn.dot_product_attention) is checked by tests/attention_contract.py.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from viva_tensor import flash_attention as fa
from viva_tensor import memory
from viva_tensor import ring_attention as ra
from viva_tensor.errors import ConfigError, DimensionError, DTypeError, ShapeMismatch, ShardingError


def ring_mesh(n, types=AxisType.Auto):
    return jax.make_mesh((n,), ("sp",), axis_types=(types,), devices=jax.devices()[:n])


def inputs(dtype, B=1, T=32, N=4, K=2, H=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, K, H), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (B, T, N, H), jnp.float32).astype(dtype)
    return q, k, v, do


def oracle(q, k, v, causal):
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    return jax.nn.dot_product_attention(*f32, is_causal=causal)


# Forward, gradients, GQA, bfloat16, NaN and huge logits against jax.nn: tests/attention_contract.py (ring on 8
# devices); ring on 4 devices against flash attention: test_matches_single_device_flash_attention below.


def test_eager_grad_with_set_mesh_and_explicit_axes():
    q, k, v, do = inputs(jnp.float32, T=16, N=2, K=2)
    mesh = ring_mesh(4, AxisType.Explicit)
    with jax.set_mesh(mesh):
        out = ra.ring_attention(q, k, v, axis="sp", is_causal=True)
        g = jax.grad(lambda q: jnp.sum(ra.ring_attention(q, k, v, mesh=mesh, axis="sp") * do))(q)
    np.testing.assert_allclose(np.asarray(out), np.asarray(oracle(q, k, v, True)), rtol=2e-5, atol=2e-5)
    want = jax.grad(lambda q: jnp.sum(oracle(q, k, v, False) * do))(q)
    np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=5e-5, atol=5e-5)


def test_causal_skips_hidden_blocks():
    """With is_causal a device computes no block of a chunk that comes after its queries, a triangle of the
    chunk on the diagonal and every block of earlier chunks: the kernels' block ranges for the ring offset
    (this device's query 0 minus the chunk's key 0), forward and backward."""
    T, b, n = 8, 2, 4
    st = fa._Static(scale=1.0, causal=True, window=None, block_q=b, block_kv=b, seq_q=T, seq_kv=T)
    nb = T // b
    for idx in range(n):
        for src in range(n):
            offset = jnp.int32((idx - src) * T)
            fwd = {(i, j) for i in range(nb) for j in range(*map(int, fa._kv_range(st, jnp.int32(i * b), nb, offset)))}
            bwd = {(i, j) for j in range(nb) for i in range(*map(int, fa._q_range(st, jnp.int32(j * b), nb, offset)))}
            if src < idx:
                want = {(i, j) for i in range(nb) for j in range(nb)}
            else:
                want = set() if src > idx else {(i, j) for i in range(nb) for j in range(i + 1)}
            assert fwd == want == bwd, (idx, src)


def test_hidden_nan_keys_do_not_spread():
    """Keys of the last device's chunk are NaN: earlier queries never see them and stay equal to jax.nn."""
    n, T = 4, 32
    q, k, v, _ = inputs(jnp.float32, T=T)
    cut = T * (n - 1) // n
    k_nan = k.at[:, cut:].set(jnp.nan)
    got = np.asarray(ra.ring_attention(q, k_nan, v, mesh=ring_mesh(n), axis="sp", is_causal=True,
                                       block_q=4, block_kv=4))
    np.testing.assert_allclose(got[:, :cut], np.asarray(oracle(q, k, v, True))[:, :cut], rtol=2e-5, atol=2e-5)
    assert np.isnan(got[:, cut:]).all()  # NaN inputs that a query does see give NaN, never a silent number


def test_local_inside_users_shard_map():
    mesh = ring_mesh(4)
    q, k, v, _ = inputs(jnp.float32, T=16)
    spec = P(None, "sp")
    f = jax.jit(jax.shard_map(lambda q, k, v: ra.ring_attention_local(q, k, v, axis_name="sp", scale=0.3),
                              mesh=mesh, in_specs=(spec,) * 3, out_specs=spec))
    got = f(q, k, v)
    want = jax.nn.dot_product_attention(q, k, v, scale=0.3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_no_retracing():
    mesh = ring_mesh(2)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(q, k, v):
        return ra.ring_attention(q, k, v, mesh=mesh, axis="sp", is_causal=True)

    for s in range(3):
        q, k, v, _ = inputs(jnp.float32, T=8, seed=s)
        f(q, k, v)


def test_memory_per_device_shrinks_with_devices():
    """Compiled per-device memory is O(T / devices): 8 devices need well under half of what 2 devices need.

    (Ideal 1/4; the sub-block scores are a fixed cost that does not shrink with the device count. Measured with
    flash attention's kernels: 0.42, temporaries 1.14 MB on 2 devices and 0.66 MB on 8.)"""
    x = jax.ShapeDtypeStruct((1, 4096, 2, 16), jnp.float32)

    def mem(n):
        f = jax.jit(lambda q, k, v: ra.ring_attention(q, k, v, mesh=ring_mesh(n), axis="sp", block_q=128,
                                                      block_kv=128))
        return memory.compiled_memory(f, x, x, x)

    m2, m8 = mem(2), mem(8)
    assert m8.argument_bytes * 4 == m2.argument_bytes
    assert m8.total_bytes < m2.total_bytes * 0.45
    # far below the T x T scores of one head that a naive attention would hold
    assert m8.temp_bytes < 4096 * 4096 * 4 / 16


def test_errors():
    q, k, v, _ = inputs(jnp.float32, T=12)
    mesh = ring_mesh(8)
    with pytest.raises(ShardingError, match="sequence length divisible by 8"):
        ra.ring_attention(q, k, v, mesh=mesh, axis="sp")
    with pytest.raises(ShardingError, match="mesh axis among"):
        ra.ring_attention(q, k, v, mesh=mesh, axis="seq")
    with pytest.raises(DimensionError, match=r"rank 4 \(B, T, N, H\)"):
        ra.ring_attention(q[0], k[0], v[0], mesh=mesh, axis="sp")
    with pytest.raises(DTypeError, match="the query's"):
        ra.ring_attention(q, k.astype(jnp.bfloat16), v, mesh=mesh, axis="sp")
    with pytest.raises(DTypeError, match="float32, bfloat16 or float16"):
        ra.ring_attention(q.astype(jnp.int32), k, v, mesh=mesh, axis="sp")
    with pytest.raises(ShapeMismatch, match="self-attention"):
        ra.ring_attention(q, k[:, :8], v[:, :8], mesh=mesh, axis="sp")
    with pytest.raises(ShapeMismatch, match="dividing 4"):
        ra.ring_attention(q, jnp.zeros((1, 12, 3, 8)), jnp.zeros((1, 12, 3, 8)), mesh=mesh, axis="sp")
    with pytest.raises(ShapeMismatch, match="the key's"):
        ra.ring_attention(q, k, v[..., :4], mesh=mesh, axis="sp")
    with pytest.raises(ConfigError, match="positive integer"):
        ra.ring_attention_local(q, k, v, axis_name="sp", block_q=0)
    with pytest.raises(ShardingError, match="expected a mesh"):
        ra.ring_attention(q, k, v, axis="sp")


def test_errors_of_issue_12():
    q, k, v, _ = inputs(jnp.float32, T=8)
    mesh = ring_mesh(2)
    for bad, name in [(q[:, :0], "query"), (q[..., :0], "query"), (q[:, :, :0], "query")]:
        with pytest.raises(ShapeMismatch, match=f"argument '{name}'.*non-empty"):
            ra.ring_attention(bad, k[:, : bad.shape[1], :, : bad.shape[3]], v[:, : bad.shape[1], :, : bad.shape[3]],
                              mesh=mesh, axis="sp")
    with pytest.raises(ShapeMismatch, match="argument 'query'.*non-empty"):  # N = K = 0
        ra.ring_attention(q[:, :, :0], k[:, :, :0], v[:, :, :0], mesh=mesh, axis="sp")
    with pytest.raises(DTypeError, match="argument 'query'.*float64.*astype"):
        ra.ring_attention(np.asarray(q, np.float64), k, v, mesh=mesh, axis="sp")
    with pytest.raises(DTypeError, match="argument 'key'.*an array"):
        ra.ring_attention(q, "k", v, mesh=mesh, axis="sp")
    got = ra.ring_attention(np.asarray(q).tolist(), k, v, mesh=mesh, axis="sp")  # nested lists: an array
    np.testing.assert_allclose(np.asarray(got), np.asarray(oracle(q, k, v, False)), rtol=2e-5, atol=2e-5)
    with pytest.raises(ShardingError, match="argument 'axis_name'.*shard_map"):  # was a NameError
        ra.ring_attention_local(q, k, v, axis_name="sp")
    with pytest.raises(ConfigError, match="argument 'scale'"):
        ra.ring_attention(q, k, v, mesh=mesh, axis="sp", scale="a")
    with pytest.raises(ConfigError, match="argument 'block_kv'"):
        ra.ring_attention(q, k, v, mesh=mesh, axis="sp", block_kv=True)
    got = ra.ring_attention(q, k, v, mesh=mesh, axis="sp", block_q=np.int64(4), block_kv=np.int32(2))
    np.testing.assert_allclose(np.asarray(got), np.asarray(oracle(q, k, v, False)), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_single_device_flash_attention(causal):
    flash = pytest.importorskip("viva_tensor.flash_attention")
    q, k, v, do = inputs(jnp.float32, T=32)
    mesh = ring_mesh(4)
    ring = lambda q, k, v: ra.ring_attention(q, k, v, mesh=mesh, axis="sp", is_causal=causal, block_q=4)  # noqa: E731
    one = lambda q, k, v: flash.dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    out = ring(q, k, v)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "sp")), 4)  # sharded along T, as its input
    np.testing.assert_allclose(np.asarray(out), np.asarray(one(q, k, v)), rtol=2e-5, atol=2e-5)
    g_ring = jax.grad(lambda *a: jnp.sum(ring(*a) * do), (0, 1, 2))(q, k, v)
    g_one = jax.grad(lambda *a: jnp.sum(one(*a) * do), (0, 1, 2))(q, k, v)
    for a, b in zip(g_ring, g_one):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=5e-5, atol=5e-5)
