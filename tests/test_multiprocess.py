"""Two JAX processes on 127.0.0.1 (gloo CPU collectives, 2 CPU devices each) form one 4-device mesh.

Each process shards a NamedTensor by rules across both processes, runs ring attention and a sharded
top-k; process 0 writes the gathered results, which are checked against a single-process run of the
same code (this process's own devices) and against jax.nn.
"""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from viva_tensor import named, pool, ring_attention, sharding

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240

WORKER = textwrap.dedent(
    """
    import os, sys
    port, pid, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=120)
    import numpy as np
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from viva_tensor import named, pool, ring_attention, sharding
    from tests.test_multiprocess import problem, RULES

    assert jax.process_count() == 2 and jax.local_device_count() == 2 and jax.device_count() == 4
    mesh = jax.make_mesh((4,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,))
    q, k, v, query, docs = problem()
    # one global NamedTensor sharded by rules across both processes
    tq, tk, tv = (sharding.shard(named.new(x, ("batch", "seq", "head", "dim")), RULES, mesh) for x in (q, k, v))
    assert not tq.data.is_fully_addressable
    assert {s.data.shape for s in tq.data.addressable_shards} == {(1, q.shape[1] // 4, 2, 8)}
    out = ring_attention.ring_attention(tq.data, tk.data, tv.data, mesh=mesh, axis="sp", is_causal=True,
                                        block_q=8, block_kv=8)
    out = multihost_utils.process_allgather(out, tiled=True)
    scores, idx = pool.top_k_similar(query, docs, 5, mesh=mesh, axis="sp")
    scores, idx = (np.asarray(x.addressable_data(0)) for x in (scores, idx))
    if pid == 0:
        np.savez(os.path.join(out_dir, "result.npz"), out=np.asarray(out), scores=scores, idx=idx)
    multihost_utils.sync_global_devices("done")
    print("worker", pid, "ok", flush=True)
    """
)

RULES = [("seq", "sp"), ("batch", None)]


def problem():
    r = np.random.default_rng(7)
    q, k, v = (r.standard_normal((1, 64, 2, 8)).astype(np.float32) for _ in range(3))
    query = r.standard_normal(16).astype(np.float32)
    docs = r.standard_normal((40, 16)).astype(np.float32)
    return q, k, v, query, docs


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("JAX_PLATFORMS", None)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i), str(tmp_path)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            logs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, log) in enumerate(zip(procs, logs, strict=False)):
        assert p.returncode == 0, f"worker {i} failed:\n{log[-4000:]}"
    res = np.load(tmp_path / "result.npz")

    # the same computation in this single process, on 4 of its 8 devices
    q, k, v, query, docs = problem()
    mesh = jax.make_mesh((4,), ("sp",), axis_types=(AxisType.Auto,), devices=jax.devices()[:4])
    tq, tk, tv = (sharding.shard(named.new(x, ("batch", "seq", "head", "dim")), RULES, mesh) for x in (q, k, v))
    single = ring_attention.ring_attention(tq.data, tk.data, tv.data, mesh=mesh, axis="sp", is_causal=True,
                                           block_q=8, block_kv=8)
    np.testing.assert_allclose(res["out"], np.asarray(single), rtol=1e-6, atol=1e-6)
    ref = jax.nn.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), is_causal=True)
    np.testing.assert_allclose(res["out"], np.asarray(ref), rtol=2e-5, atol=2e-5)
    s1, i1 = pool.top_k_similar(query, docs, 5, mesh=mesh, axis="sp")
    np.testing.assert_array_equal(res["idx"], np.asarray(i1))
    np.testing.assert_allclose(res["scores"], np.asarray(s1), rtol=1e-6)
    cos = docs @ query / (np.linalg.norm(docs, axis=1) * np.linalg.norm(query))
    np.testing.assert_array_equal(res["idx"], np.argsort(-cos, kind="stable")[:5])
