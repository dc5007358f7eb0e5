"""A property-based fuzzer of the attention area (issue 12): flash attention, ring attention (one device) and
the nn attention functions.

Random shapes (3-D and 4-D, cross attention, grouped-query heads), dtypes, masks, biases, scales, causal masks,
windows, sequence lengths, block sizes and values (NaN, inf, huge logits up to overflow). The property: every
call gives a viva_tensor error, or a result equal to ``jax.nn.dot_product_attention`` (the independent oracle,
run op by op in float32 on the same inputs) within the dtype's tolerance, NaN exactly where it gives NaN, and
``jit`` equal to eager bit for bit. Bad arguments of every kind give viva_tensor errors, never raw ones.

Huge logits are built from small integers times powers of two, the entries of one query or key vector sharing
a sign, so that every logit is exact or overflows to a signed inf whatever the summation order (all its
products have one sign: the partial sums only grow). The implementations must then agree to rounding even at
1e20 or when the logits overflow. (With mixed signs, products of 2**128 would make a logit -inf in one order
and inf - inf = NaN in another: XLA's CPU dot changed its order between releases.)
Examples are bounded; the file runs in well under a minute with the CI profile.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from viva_tensor import flash_attention as fa
from viva_tensor import ring_attention as ra
from viva_tensor.errors import TensorError
from viva_tensor.nn import attention_function, exact_attention

# No shrinking: each example compiles its own shapes, and a failure is printed as drawn (already small).
_EXAMPLES = os.environ.get("VIVA_FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(_EXAMPLES or 20), deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck), phases=(Phase.explicit, Phase.reuse, Phase.generate))
HEAVY = settings(FUZZ, max_examples=int(_EXAMPLES or 6))  # each example compiles its own shapes
DTYPES = ("float32", "bfloat16", "float16")
TOL = {"float32": 5e-5, "bfloat16": 2e-2, "float16": 4e-3}


def _bits(x):
    x = np.asarray(x)
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


def _assert_same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    # NaN payloads may differ between fusions: compare NaN positions, and the bits of everything else
    np.testing.assert_array_equal(np.isnan(a.astype(np.float32)), np.isnan(b.astype(np.float32)))
    keep = ~np.isnan(a.astype(np.float32))
    np.testing.assert_array_equal(_bits(a)[keep], _bits(b)[keep])


def _assert_like_reference(got, want, dtype, *, scale_with=1.0):
    got = np.asarray(got, np.float32)
    want = np.asarray(want, np.float32)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg="NaN where jax.nn gives NaN, only there")
    inf = np.isinf(want)
    np.testing.assert_array_equal(got[inf], want[inf])
    fin = np.isfinite(want)
    assert np.isfinite(got[fin]).all()
    tol = TOL[dtype]
    np.testing.assert_allclose(got[fin], want[fin], rtol=tol, atol=tol * scale_with)


def _exact_values(rng, shape, exponent):
    """Small integers times 2**exponent, one sign per vector (last axis): the products in a logit share a sign,
    so it is exact while it fits and the same signed inf in every summation order once it does not."""
    sign = rng.choice(np.array([-1.0, 1.0], np.float32), (*shape[:-1], 1))
    return (sign * rng.integers(0, 4, shape).astype(np.float32) * np.float32(2.0**exponent)).astype(np.float32)


def _inject(x, flat_index, special, *, signed):
    """Put ``special`` at ``flat_index`` of ``x``; with ``signed``, an inf takes the sign of its vector (see
    :func:`_exact_values`), so that the logits it reaches stay the same in every summation order."""
    flat = x.reshape(-1)
    if signed and np.isinf(special):
        row = x.reshape(-1, x.shape[-1])[flat_index // x.shape[-1]]
        special = np.copysign(np.inf, row.sum() if row.any() else special)
    flat[flat_index] = special


@st.composite
def attention_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    batch = draw(st.sampled_from([None, 1, 2]))
    t, s = draw(st.sampled_from([1, 3, 8])), draw(st.sampled_from([1, 5, 8]))
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    h = draw(st.sampled_from([1, 2, 4, 8]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    lead = () if batch is None else (batch,)
    b = 1 if batch is None else batch
    huge = draw(st.sampled_from([None, None, 20, 33, 64, 70]))  # logits of 2**(2e): 1e12, 7e19, 3e38, inf
    if huge is None:
        q = rng.standard_normal((*lead, t, heads, h)).astype(np.float32)
        k = rng.standard_normal((*lead, s, kv_heads, h)).astype(np.float32)
        scale = draw(st.sampled_from([None, None, 1.0, 0.5, 0.0, 3.0]))
    else:
        if dtype != "float32":  # bfloat16 has float32's range; float16 does not: keep float16 moderate
            dtype = "bfloat16" if dtype == "float16" else dtype
        e = draw(st.integers(huge - 4, huge))
        q, k = _exact_values(rng, (*lead, t, heads, h), e), _exact_values(rng, (*lead, s, kv_heads, h), e)
        # powers of two: the logits stay exact. No scale below 1 where a logit may overflow: jax.nn scales the
        # logits after the product (inf * 0.25 = inf), viva_tensor the query before it (documented, _logits)
        may_overflow = 2 * e + np.log2(9 * h) >= 128
        scale = draw(st.sampled_from([1.0, 4.0] if may_overflow else [1.0, 0.25, 4.0]))
    v = rng.standard_normal((*lead, s, kv_heads, h)).astype(np.float32)
    for arr in draw(st.lists(st.sampled_from(["q", "k", "v"]), max_size=2)):
        x = {"q": q, "k": k, "v": v}[arr]
        _inject(x, draw(st.integers(0, x.size - 1)), draw(st.sampled_from([np.nan, np.inf, -np.inf])),
                signed=huge is not None and arr != "v")
    opts = {"scale": scale}
    pair = (b, heads, t, s) if batch is not None else (heads, t, s)
    if draw(st.booleans()):
        keep = tuple(d if draw(st.booleans()) else 1 for d in pair)
        opts["mask"] = jnp.asarray(rng.random(keep) < 0.7)
    if draw(st.booleans()):
        keep = tuple(d if draw(st.booleans()) else 1 for d in pair)
        bias = rng.standard_normal(keep).astype(np.float32)
        if draw(st.booleans()):
            bias.reshape(-1)[0] = draw(st.sampled_from([np.nan, -np.inf, 1e30]))
        opts["bias"] = jnp.asarray(bias)
    opts["is_causal"] = draw(st.booleans())
    if draw(st.integers(0, 3)) == 0:
        opts["local_window_size"] = draw(st.sampled_from([0, 1, 3, (2, 0), (0, 2), (1, 4)]))
    if batch is not None and draw(st.integers(0, 3)) == 0:
        opts["query_seq_lengths"] = jnp.asarray(rng.integers(0, t + 1, (b,)), jnp.int32)
    if batch is not None and draw(st.integers(0, 3)) == 0:
        opts["key_value_seq_lengths"] = jnp.asarray(rng.integers(0, s + 1, (b,)), jnp.int32)
    blocks = {"block_q": draw(st.sampled_from([None, 1, 2, 3, 8])),
              "block_kv": draw(st.sampled_from([None, 1, 2, 4, 16]))}
    cast = lambda a: jnp.asarray(a).astype(jnp.dtype(dtype))  # noqa: E731
    return dtype, cast(q), cast(k), cast(v), opts, blocks


def _reference(q, k, v, opts):
    """jax.nn.dot_product_attention in float32 on the same (rounded) inputs, op by op, 4-D."""
    four = q.ndim == 4
    up = lambda a: a.astype(jnp.float32) if four else a.astype(jnp.float32)[None]  # noqa: E731
    o = dict(opts)
    for name in ("mask", "bias"):
        if name in o and not four:
            o[name] = o[name][None]
    if "bias" in o:
        o["bias"] = jnp.broadcast_to(o["bias"], (*o["bias"].shape[:-2], q.shape[-3], k.shape[-3]))
    with jax.disable_jit():
        out = jax.nn.dot_product_attention(up(q), up(k), up(v), implementation="xla", **o)
    return out if four else out[0]


@HEAVY
@given(attention_cases())
# finding: an inf in V made the closed-form sum of the skipped key blocks (total - prefix) NaN: NaN, not inf
@example(("float32", jnp.array([[[131072.0], [65536.0]]]), jnp.zeros((1, 1, 1)), jnp.full((1, 1, 1), jnp.inf),
          {"scale": 1.0, "is_causal": False, "local_window_size": 0}, {"block_q": None, "block_kv": None}))
def test_flash_equals_jax_nn(case):
    dtype, q, k, v, opts, blocks = case
    f = lambda q, k, v: fa.dot_product_attention(q, k, v, **opts, **blocks)  # noqa: E731
    got = f(q, k, v)
    assert got.shape == q.shape and got.dtype == q.dtype
    _assert_same_bits(got, jax.jit(f)(q, k, v))
    want = _reference(q, k, v, opts)
    vmax = float(np.nanmax(np.abs(np.where(np.isinf(np.asarray(v, np.float32)), 0, np.asarray(v, np.float32)))))
    _assert_like_reference(got, want, dtype, scale_with=max(vmax, 1.0))


@HEAVY
@given(st.sampled_from(DTYPES), st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 2]), st.integers(0, 2**16),
       st.booleans(), st.sampled_from([None, 0.5, 1.0]), st.sampled_from([1, 2, 512]),
       st.sampled_from([None, 0, 64]))
@example("float32", 4, 1, 0, True, 1.0, 512, 64)  # logits of 2**128: inf - inf = NaN, as jax.nn
def test_ring_attention_one_device_equals_jax_nn(dtype, t, kv_heads, seed, causal, scale, block, huge):
    rng = np.random.default_rng(seed)
    heads = 2 * kv_heads
    if huge is None:
        q, k = rng.standard_normal((1, t, heads, 4)), rng.standard_normal((1, t, kv_heads, 4))
    else:
        q, k = _exact_values(rng, (1, t, heads, 4), huge), _exact_values(rng, (1, t, kv_heads, 4), huge)
        dtype = "float32" if dtype == "float16" else dtype
        scale = 1.0
    v = rng.standard_normal((1, t, kv_heads, 4))
    q, k, v = (jnp.asarray(np.asarray(a, np.float32)).astype(jnp.dtype(dtype)) for a in (q, k, v))
    mesh = jax.make_mesh((1,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
    f = lambda q, k, v: ra.ring_attention(q, k, v, mesh=mesh, axis="seq", is_causal=causal,  # noqa: E731
                                          scale=scale, block_q=block, block_kv=block)
    got = f(q, k, v)
    assert got.shape == q.shape and got.dtype == q.dtype
    _assert_same_bits(got, jax.jit(f)(q, k, v))
    _assert_like_reference(got, _reference(q, k, v, {"scale": scale, "is_causal": causal}), dtype)


@HEAVY
@given(st.sampled_from(["exact", "flash"]), st.sampled_from(DTYPES), st.integers(1, 6), st.integers(1, 6),
       st.integers(0, 2**16), st.booleans(), st.booleans(), st.sampled_from([None, 0.5]),
       st.sampled_from([None, np.nan, np.inf]))
def test_nn_attention_functions_equal_jax_nn(name, dtype, t, s, seed, with_mask, with_bias, scale, special):
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal((2, t, 2, 4)), rng.standard_normal((2, s, 2, 4)), rng.standard_normal((2, s, 2, 4))
    if special is not None:
        k.reshape(-1)[rng.integers(k.size)] = special
    q, k, v = (jnp.asarray(np.asarray(a, np.float32)).astype(jnp.dtype(dtype)) for a in (q, k, v))
    opts = {"scale": scale}
    if with_mask:
        opts["mask"] = jnp.asarray(rng.random((1, 2, t, s)) < 0.7)
    if with_bias:
        opts["bias"] = jnp.asarray(rng.standard_normal((2, 1, t, s)), jnp.float32)
    f = attention_function(name)
    g = lambda q, k, v: f(q, k, v, **opts)  # noqa: E731
    got = g(q, k, v)
    assert got.shape == q.shape and got.dtype == q.dtype
    if name == "flash":
        _assert_same_bits(got, jax.jit(g)(q, k, v))
    else:  # the naive reference runs op by op: jit may differ by a few ulps (attention_contract.py)
        _assert_like_reference(jax.jit(g)(q, k, v), got, dtype)
    _assert_like_reference(got, _reference(q, k, v, opts), dtype)


# ------------------------------------------------------------------------------------------ bad arguments

def _bad_call(kind, choice, kv_heads=1):
    q = jnp.ones((1, 4, 2, 8), jnp.float32)
    kv = jnp.ones((1, 5, kv_heads, 8), jnp.float32)
    args, kw = [q, kv, kv], {}
    bad = {
        "rank": lambda: args.__setitem__(choice % 3, jnp.ones((2,) * [0, 1, 2, 5, 6][choice % 5], jnp.float32)),
        "dtype": lambda: args.__setitem__(choice % 3, args[choice % 3].astype(
            ["int32", "bool", "float64", "complex64", "uint8"][choice % 5])),
        "numpy64": lambda: args.__setitem__(choice % 3, np.ones(args[choice % 3].shape, np.float64)),
        "notarray": lambda: args.__setitem__(choice % 3, ["a", None, {"x": 1}, object(), "1.0"][choice % 5]),
        "heads": lambda: args.__setitem__(1, jnp.ones((1, 5, 3, 8), jnp.float32)),
        "headdim": lambda: args.__setitem__(2, jnp.ones((1, 5, 1, 1 + choice % 7), jnp.float32)),
        "empty": lambda: args.__setitem__(choice % 3, jnp.ones(tuple(0 if i == choice % 4 else d for i, d in
                                                                     enumerate(args[choice % 3].shape)))),
        "mask": lambda: kw.update(mask=[jnp.ones((1, 2, 4, 5), jnp.int32), jnp.ones((3, 2, 4, 5), bool),
                                        jnp.ones((1, 1, 1, 1, 4, 5), bool), "yes", jnp.ones((4, 6), bool)][choice % 5]),
        "bias": lambda: kw.update(bias=[jnp.ones((1, 2, 4, 6)), jnp.ones((2, 2, 2, 4, 5)), "b", {"b": 1},
                                        jnp.ones((1, 3, 4, 5))][choice % 5]),
        "scale": lambda: kw.update(scale=["a", [1.0], jnp.ones(2), True, {"s": 1}, 1j][choice % 6]),
        "causal_window": lambda: kw.update(local_window_size=[-1, (1,), (1, 2, 3), (-1, 0), 1.5, "w", (True, 1),
                                                              (np.int64(1), -3)][choice % 8]),
        "lengths": lambda: kw.update(**{["query_seq_lengths", "key_value_seq_lengths"][choice % 2]: [
            jnp.ones((2,), jnp.int32), jnp.ones((1,), jnp.float32), np.array([2**32 + 3]), np.array([-1]), "3",
            jnp.ones((1, 1), jnp.int32)][choice % 6]}),
        "block": lambda: kw.update(**{["block_q", "block_kv"][choice % 2]: [0, -1, 1.5, True, "8", None, 2**70,
                                                                              np.float32(2)][choice % 8]}),
    }
    bad[kind]()
    return args, kw


_KINDS = ["rank", "dtype", "numpy64", "notarray", "heads", "headdim", "empty", "mask", "bias", "scale",
          "causal_window", "lengths", "block"]


def _outcome(f, *args, **kw):
    """'ok' or 'error'; a raw (non-viva_tensor) exception propagates and fails the test."""
    try:
        f(*args, **kw)
    except TensorError as e:
        assert e.argument, f"{type(e).__name__} without the argument's name: {e}"
        return "error"
    return "ok"


@FUZZ
@given(st.sampled_from(_KINDS), st.integers(0, 1000), st.booleans())
def test_flash_bad_arguments_give_viva_errors(kind, choice, under_jit):
    args, kw = _bad_call(kind, choice)
    if under_jit and all(isinstance(a, jax.Array) for a in args):
        jitted = jax.jit(lambda q, k, v: fa.dot_product_attention(q, k, v, **kw))
        _outcome(jitted, *args)
    else:
        _outcome(fa.dot_product_attention, *args, **kw)


@FUZZ
@given(st.sampled_from(["rank", "dtype", "numpy64", "notarray", "heads", "headdim", "empty", "scale", "block",
                        "length", "axis", "mesh"]), st.integers(0, 1000))
@example("mesh", 0)  # finding: mesh="mesh" raised AttributeError
def test_ring_bad_arguments_give_viva_errors(kind, choice):
    mesh = jax.make_mesh((1,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
    q = jnp.ones((1, 4, 2, 8), jnp.float32)
    kv = jnp.ones((1, 4, 1, 8), jnp.float32)
    args, kw = [q, kv, kv], {"mesh": mesh, "axis": "seq"}
    if kind in ("rank", "dtype", "numpy64", "notarray", "heads", "headdim", "empty", "scale", "block"):
        args2, kw2 = _bad_call(kind, choice)
        args = [a if not hasattr(a, "shape") or a.ndim != 4 or a.shape[1] != 5 else
                (a[:, :4] if a.shape[1] == 5 else a) for a in args2]
        kw.update({k: v for k, v in kw2.items() if k in ("scale", "block_q", "block_kv")})
        if kw.get("block_q", 1) is None or kw.get("block_kv", 1) is None:
            kw.pop("block_q", None), kw.pop("block_kv", None)
    elif kind == "length":
        args = [jnp.ones((1, 3, 2, 8)), jnp.ones((1, 5, 1, 8)), jnp.ones((1, 5, 1, 8))]
    elif kind == "axis":
        kw["axis"] = ["data", None, 3, ("seq",)][choice % 4]
    else:
        kw["mesh"] = ["mesh", 1, None][choice % 3]
    _outcome(ra.ring_attention, *args, **kw)


@FUZZ
@given(st.sampled_from(["rank", "dtype", "heads", "headdim", "mask", "bias", "scale", "notarray"]),
       st.integers(0, 1000))
@example("notarray", 3)  # finding: a non-array raised AttributeError
@example("bias", 776)  # finding: a 5-D bias raised JAX's raw broadcasting ValueError
@example("scale", 613)  # finding: scale=[1.0] raised JAX's raw broadcasting ValueError
def test_exact_attention_bad_arguments_give_viva_errors(kind, choice):
    args, kw = _bad_call(kind, choice, kv_heads=2)
    kw = {k: v for k, v in kw.items() if k in ("mask", "bias", "scale")}
    _outcome(exact_attention, *args, **kw)
