"""The attention contract: what every attention implementation of viva_tensor promises, as checks.

An implementation is an :class:`Impl`: a function with ``jax.nn.dot_product_attention``'s meaning (layout
``(B, T, N, H)``; keyword options ``bias``, ``mask``, ``scale``, ``is_causal``, ``query_seq_lengths``,
``key_value_seq_lengths``) and the set of features it supports. Each ``check_*`` function takes an ``Impl``
and compares it with ``jax.nn.dot_product_attention`` (the independent oracle: under a cached jit, op by op in
the NaN and huge-logit checks), skipping what the implementation does not support.
``tests/test_attention_contract.py`` runs every check over every implementation.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads as _numerical_check

#: Features an implementation may support (a check that needs one it lacks is skipped). "robust": NaN in gives
#: NaN out and logits of 1e10 stay right under jit too (the naive reference, like jax.nn itself, computes
#: ``softmax(logits * scale)`` and XLA:CPU contracts ``logits * scale - max`` into a fused multiply-add inside one
#: fusion and not another: NaN rows at 1e10, and a NaN scale can come out finite).
FEATURES = frozenset({"cross", "gqa", "bias", "mask", "lengths", "window", "robust"})

F32 = dict(rtol=2e-5, atol=2e-5)
GRAD_F32 = dict(rtol=1e-4, atol=5e-5)
BF16 = dict(rtol=3e-2, atol=3e-2)


@dataclasses.dataclass(frozen=True)
class Impl:
    """One attention implementation under the contract.

    Attributes:
        name: for test ids.
        fn: ``fn(q, k, v, **options)`` with jax.nn's meaning for the options it supports.
        features: the subset of :data:`FEATURES` it supports.
        seq: the sequence length its inputs must have (ring attention: a multiple of the devices).
        exact_jit: ``jit`` and eager give the same bits (the naive reference runs op by op: a few ulps).
    """

    name: str
    fn: Callable
    features: frozenset = FEATURES
    seq: int = 24
    exact_jit: bool = True

    def needs(self, *features: str) -> None:
        missing = set(features) - set(self.features)
        if missing:
            pytest.skip(f"{self.name} does not support {sorted(missing)}")


def _normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def inputs(impl: Impl, *, S=None, N=2, K=2, H=8, B=2, dtype=jnp.float32, seed=0):
    T = impl.seq
    S = T if S is None else S
    return (_normal(seed, (B, T, N, H), dtype), _normal(seed + 1, (B, S, K, H), dtype),
            _normal(seed + 2, (B, S, K, H), dtype))


def _ref(q, k, v, **kw):
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    return jax.nn.dot_product_attention(*f32, **kw)


def _out_and_grads(fn, q, k, v, w, jit=True):
    def go(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(w)

    return (jax.jit(go) if jit else go)(q, k, v)


#: Options that are static parts of a compiled attention (hashable); the others are arrays.
_STATIC = frozenset({"scale", "is_causal", "local_window_size"})


@functools.cache
def _program(fn, static, names, grads=True):
    """``jit`` of ``fn``'s forward, or with ``grads`` of (out, VJP of sum(out * w)), with options ``static`` (name,
    value pairs) and array options ``names`` (passed as traced arguments). Cached: a check that calls the same
    function with the same options on inputs of the same shapes again (the NaN cases, the checks that share
    shapes) reuses the compiled program."""

    def forward(q, k, v, arrays):
        return fn(q, k, v, **dict(static), **dict(zip(names, arrays, strict=True)))

    def with_grads(q, k, v, arrays, w):
        out, vjp = jax.vjp(lambda q, k, v: forward(q, k, v, arrays), q, k, v)
        return out, vjp(w)

    return jax.jit(with_grads if grads else forward)


def _jitted(fn, q, k, v, w=None, **kw):
    """``fn``'s output, and with ``w`` the gradients of sum(out * w), under one cached ``jit`` (:func:`_program`)."""
    static = tuple(sorted((name, x) for name, x in kw.items() if name in _STATIC))
    names = tuple(sorted(name for name in kw if name not in _STATIC))
    arrays = [kw[name] for name in names]
    if w is None:
        return _program(fn, static, names, grads=False)(q, k, v, arrays)
    return _program(fn, static, names)(q, k, v, arrays, w)


def _jit_out_and_grads(impl: Impl, q, k, v, w, **kw):
    """The output and the gradients of sum(out * w) of ``impl.fn`` with options ``kw``, under one ``jit``."""
    return _jitted(impl.fn, q, k, v, w, **kw)


def _compare(impl: Impl, q, k, v, *, grads=True, tol=F32, eager_ref=False, **kw):
    """Forward (jit and eager) and the gradients of sum(out * w) against jax.nn.

    With ``grads`` the jitted forward is the output of the jitted VJP (one compilation for both); without,
    a ``jit`` of the forward alone. ``grads="dv"``: every gradient finite, dV against jax.nn's (huge logits).
    The reference runs under a (cached) ``jit``: one compilation instead of one per operation and shape, the
    tolerances cover XLA's fusion differences; ``eager_ref``: op by op, where logits of 1e10 make those
    differences matter (see :data:`FEATURES`)."""
    out = impl.fn(q, k, v, **kw)
    w = _normal(9, q.shape, q.dtype) if grads else None
    if grads:
        jitted, g = _jit_out_and_grads(impl, q, k, v, w, **kw)
    else:
        jitted = _jitted(impl.fn, q, k, v, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert jitted.shape == q.shape and jitted.dtype == q.dtype
    w_ref = None if w is None else w.astype(jnp.float32)
    if eager_ref:
        ref = _ref(q, k, v, **kw)
        g_ref = None if w is None else _out_and_grads(lambda *a: _ref(*a, **kw), q, k, v, w_ref, jit=False)[1]
    elif grads:
        ref, g_ref = _jitted(_ref, q, k, v, w_ref, **kw)
    else:
        ref = _jitted(_ref, q, k, v, **kw)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, **tol)
    if impl.exact_jit:
        np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(jitted, np.float32))
    else:
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(jitted, np.float32), rtol=1e-6, atol=1e-6)
    if not grads:
        return
    if grads == "dv":
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in g)
        np.testing.assert_allclose(g[2], g_ref[2], **GRAD_F32)
        return
    for name, a, b in zip("qkv", g, g_ref, strict=False):
        assert a.dtype == q.dtype, name
        if q.dtype == jnp.float32:
            np.testing.assert_allclose(a, b, **GRAD_F32, err_msg=f"d{name}")
        else:  # bfloat16: within 3% of the largest gradient entry
            np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0, atol=3e-2 * float(jnp.abs(b).max()),
                                       err_msg=f"d{name}")


# ---- the checks -----------------------------------------------------------------------------------------


def check_self_attention(impl: Impl):
    _compare(impl, *inputs(impl))


def check_causal(impl: Impl):
    _compare(impl, *inputs(impl), is_causal=True)


def check_scale(impl: Impl):
    _compare(impl, *inputs(impl), scale=0.3, grads=False)


def check_cross_attention(impl: Impl):
    impl.needs("cross")
    q, k, v = inputs(impl, S=impl.seq + 13)
    _compare(impl, q, k, v)
    _compare(impl, q, k[:, :7], v[:, :7], is_causal=True)  # T > S: causal aligned top-left, as jax.nn


def check_grouped_query(impl: Impl):
    impl.needs("gqa")
    _compare(impl, *inputs(impl, N=4, K=2), is_causal=True)
    _compare(impl, *inputs(impl, N=4, K=1), grads=False)  # multi-query


def check_bias(impl: Impl):
    impl.needs("bias")
    q, k, v = inputs(impl)
    T = impl.seq
    for shape in [(2, 2, T, T), (1, 2, T, T), (T, T), (2, 1, 1, T)]:
        bias = _normal(5, shape)
        _compare(impl, q, k, v, bias=bias, grads=shape == (2, 2, T, T))


def check_mask_with_a_fully_masked_row(impl: Impl):
    impl.needs("mask")
    q, k, v = inputs(impl)
    T = impl.seq
    mask = np.array(jax.random.bernoulli(jax.random.key(6), 0.7, (2, 1, T, T)))
    mask[0, 0, 3] = False  # this row sees nothing: the mean of V, as jax.nn
    _compare(impl, q, k, v, mask=jnp.asarray(mask))


def check_lengths(impl: Impl):
    impl.needs("lengths")
    q, k, v = inputs(impl)
    T = impl.seq
    kw = dict(query_seq_lengths=jnp.array([T, 5], jnp.int32), key_value_seq_lengths=jnp.array([3, 0], jnp.int32))
    _compare(impl, q, k, v, **kw)


def check_window(impl: Impl):
    impl.needs("window")
    _compare(impl, *inputs(impl), local_window_size=(3, 1))


def check_bfloat16(impl: Impl):
    _compare(impl, *inputs(impl, dtype=jnp.bfloat16), is_causal=True, tol=BF16)


def check_nan_in_nan_out(impl: Impl):
    """NaN exactly where jax.nn (op by op) gives NaN, forward and backward: a NaN key, an inf key, a NaN value
    in the last rows (hidden by the causal mask from the first rows: jax.nn's 0 * NaN spreads it), scale=NaN."""
    impl.needs("robust")
    q, k, v = inputs(impl, B=1)
    T = impl.seq
    # the NaN and inf keys are key 0, which every query sees: a hidden NaN key reaches jax.nn's dQ through its
    # dense 0 * NaN, and not the kernels' that skip the blocks hiding it (documented in flash_attention)
    cases = [(q, k.at[0, 0, 0, 1].set(jnp.nan), v, {}), (q, k.at[0, 0, 1, 1].set(jnp.inf), v, {}),
             (q, k, v.at[0, T - 2, 0, 1].set(jnp.nan), {}), (q, k, v, {"scale": float("nan")})]
    w = _normal(9, q.shape)
    for causal in (False, True):
        for q_, k_, v_, kw in cases:
            kw = dict(kw, is_causal=causal)
            got = _jit_out_and_grads(impl, q_, k_, v_, w, **kw)
            ref = _out_and_grads(lambda *a: _ref(*a, **kw), q_, k_, v_, w, jit=False)
            for name, a, b in zip(["out", "dq", "dk", "dv"], jax.tree.leaves(got), jax.tree.leaves(ref), strict=False):
                np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{name} {kw}")
                np.testing.assert_allclose(a, b, **GRAD_F32, err_msg=f"{name} {kw}")


def check_huge_logits(impl: Impl):
    """Logits of 1e10 and 1e20 (from the scale): jit == eager == jax.nn forward; gradients finite, dV equal to
    jax.nn's. (dQ and dK are ``scale`` times a difference that is 0 in exact arithmetic: FlashAttention-2's
    ``D = rowsum(dO * O)`` rounds differently from jax.nn's softmax VJP, so they are only required finite.)
    The jitted forward is the one of the jitted VJP; flash attention's forward alone under jit at these scales
    (the NaN-under-jit-only bug of issue 12), with the same three block sizes, is
    ``test_flash_attention.py::test_huge_logits_jit_equals_eager_equals_jax_nn``."""
    impl.needs("robust")
    q, k, v = inputs(impl, B=1)
    for scale in (1e10, 1e20):
        for causal in (False, True):
            _compare(impl, q, k, v, grads="dv", eager_ref=True, scale=scale, is_causal=causal)


def check_numerical_gradients(impl: Impl):
    """Central differences in float32 (eps and tolerances sized for float32)."""
    q, k, v = inputs(impl, B=1, H=4)
    _numerical_check(lambda q, k, v: impl.fn(q, k, v, is_causal=True), (q, k, v), order=1, modes=["rev"], eps=1e-2,
                     atol=2e-2, rtol=2e-2)


CHECKS = {name[len("check_"):]: f for name, f in sorted(globals().items())
          if name.startswith("check_") and callable(f) and f.__module__ == __name__}
