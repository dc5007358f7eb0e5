"""bitsandbytes' own FP4 (``quant_type="fp4"``) against bitsandbytes itself.

The oracle files were written by bitsandbytes 0.50.2 on the CPU (tools/make_interop_fixtures.py): ``bnb_fp4*`` (a
real MiniLM layer, as ``QuantState.as_dict`` saves it) and ``bnb_fp4_random`` (random tensors with partial blocks,
odd sizes, bfloat16/float16, block sizes 32/128, values on and one ulp beside every bucket bound, zero blocks).
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from viva_tensor import nf4, quant
from viva_tensor._formats import packing
from viva_tensor.errors import CheckpointError, ConfigError, FormatError
from viva_tensor.interop import bnb

DATA = pathlib.Path(__file__).parent / "data" / "interop"
RANDOM = DATA / "bnb_fp4_random.safetensors"


def bits(a):
    a = np.asarray(a)
    return a.reshape(-1).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def _random_fixture():
    sd = load_file(str(RANDOM))
    with safe_open(str(RANDOM), "np") as f:
        meta = f.metadata()
    torch_dtypes = json.loads(meta["torch_dtypes"])
    for k, name in torch_dtypes.items():
        if name == "bfloat16":
            sd[k] = sd[k].view(ml_dtypes.bfloat16)
    return sd, {k: json.loads(v) for k, v in json.loads(meta["cases"]).items()}


SD, CASES = _random_fixture()


def test_code_book_is_bitsandbytes_and_not_e2m1():
    sd = load_file(str(DATA / "bnb_fp4.safetensors"))
    np.testing.assert_array_equal(bits(sd["fc.weight.quant_map"]), bits(nf4.FP4_CODE_BOOK))
    # from the definition: sign, 2 exponent bits (bias 2), 1 mantissa bit, subnormal 0.0625; max 12 -> 1
    e2m1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)
    mine = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3], np.float32) / np.float32(12)
    np.testing.assert_array_equal(nf4.FP4_CODE_BOOK[:8], mine)
    np.testing.assert_array_equal(nf4.FP4_CODE_BOOK[8:], -mine)
    assert not np.allclose(nf4.FP4_CODE_BOOK[:8] / nf4.FP4_CODE_BOOK.max(), e2m1 / 6)
    np.testing.assert_array_equal(bits(nf4.FP4_LEVELS), bits(nf4.FP4_CODE_BOOK))  # code 8 decodes to +0.0


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_codes_and_absmax_are_bitsandbytes_on_random_tensors(case, jit):
    x, block, dq = jnp.asarray(SD[case + ".x"]), CASES[case]["blocksize"], CASES[case]["double_quant"]
    f = nf4.double_quantize_fp4 if dq else nf4.quantize_fp4
    q = (jax.jit(lambda a: f(a, block_size=block)) if jit else lambda a: f(a, block_size=block))(x)
    theirs = SD[case + ".codes"]
    ours = np.asarray(q.codes)
    if case == "edges_b64":
        # The value one ulp above 0 is subnormal; XLA on CPU flushes it to 0 (code 0), bitsandbytes keeps it
        # (code 8, just above the bound 0). Both decode to zero; every other edge value matches.
        n = x.size
        c_ours = np.asarray(packing.unpack_pairs(jnp.asarray(ours), n, first="high"))
        c_theirs = np.asarray(packing.unpack_pairs(jnp.asarray(theirs), n, first="high"))
        sub = (np.abs(np.asarray(x)) < np.finfo(np.float32).tiny) & (np.asarray(x) != 0)
        assert sub.sum() == 2 and set(c_theirs[sub]) == {0, 8} and set(c_ours[sub]) == {0}
        assert (nf4.FP4_LEVELS[c_theirs[sub]] == 0).all()
        np.testing.assert_array_equal(c_ours[~sub], c_theirs[~sub])
    else:
        np.testing.assert_array_equal(ours, theirs)
    if dq:
        # Every field is bitsandbytes': the absmax codes by its CPU lookup table (backend="cpu"), the offset
        # (torch's float32 mean, summed in torch's order) and so the nested absmax.
        np.testing.assert_array_equal(np.asarray(q.absmax_codes), SD[case + ".absmax"])
        np.testing.assert_array_equal(bits(q.nested_absmax), bits(SD[case + ".nested_absmax"]))
        np.testing.assert_array_equal(bits(q.offset), bits(SD[case + ".offset"][0]))
    else:
        np.testing.assert_array_equal(bits(q.absmax), bits(SD[case + ".absmax"]))


def _their_record(case):
    x, block = SD[case + ".x"], CASES[case]["blocksize"]
    codes = jnp.asarray(SD[case + ".codes"])
    kw = dict(shape=tuple(x.shape), dtype=jnp.dtype(x.dtype), block_size=block)
    if CASES[case]["double_quant"]:
        return nf4.FP4DQTensor(codes, jnp.asarray(SD[case + ".absmax"]), jnp.asarray(SD[case + ".nested_absmax"]),
                               jnp.asarray(SD[case + ".offset"][0]), nested_block_size=256, **kw)
    return nf4.FP4Tensor(codes, jnp.asarray(SD[case + ".absmax"]), **kw)


@pytest.mark.parametrize("case", sorted(CASES))
def test_their_codes_decode_as_bitsandbytes_does(case):
    q = _their_record(case)
    ours = np.asarray(nf4.dequantize(q))
    np.testing.assert_array_equal(bits(ours), bits(SD[case + ".reference_torch"]))  # bitsandbytes' PyTorch decode
    kernel = SD[case + ".reference"].reshape(-1)
    if q.shape[-1] % 2 == 0 and q.shape[-1] % q.block_size and len(q.shape) > 1:
        # blocks straddling rows: bitsandbytes' CPU kernel reads another block's absmax (its bug, not ours)
        assert np.count_nonzero(ours.reshape(-1) != kernel) > 0
    else:
        # its CPU kernel (or its fallback for odd rows): the same values; its scalar tail loop gives code 8 -0.0
        np.testing.assert_array_equal(ours.reshape(-1), kernel)


def test_minilm_layer_fixture_decodes_bit_exactly():
    for name, cls in (("bnb_fp4", nf4.FP4Tensor), ("bnb_fp4_dq", nf4.FP4DQTensor)):
        sd = load_file(str(DATA / f"{name}.safetensors"))
        q = bnb.read_state_dict({k: v for k, v in sd.items() if k.startswith("fc.")})["fc.weight"]
        assert type(q) is cls and q.shape == (64, 384) and q.format == name.replace("bnb_fp4", "bnb_fp4")
        np.testing.assert_array_equal(bits(nf4.dequantize(q)), bits(sd["reference"]))
        f = nf4.double_quantize_fp4 if cls is nf4.FP4DQTensor else nf4.quantize_fp4
        np.testing.assert_array_equal(np.asarray(f(jnp.asarray(sd["original"])).codes), sd["fc.weight"].reshape(-1))


def _fc(sd):
    return {k: v for k, v in sd.items() if k.startswith("fc.")}


@pytest.mark.parametrize("name", ["bnb_fp4", "bnb_fp4_dq"])
def test_files_written_back_are_byte_identical(name):
    theirs = _fc(load_file(str(DATA / f"{name}.safetensors")))
    ours = bnb.write_state_dict(bnb.read_state_dict(theirs))
    assert set(ours) == set(theirs)
    for k in theirs:
        if k.endswith("bitsandbytes__fp4"):
            assert json.loads(ours[k].tobytes()) == json.loads(theirs[k].tobytes())
        else:
            assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
            np.testing.assert_array_equal(bits(ours[k]), bits(theirs[k]), err_msg=k)


def test_our_quantization_writes_the_state_dict_bitsandbytes_writes():
    sd = load_file(str(DATA / "bnb_fp4.safetensors"))
    ours = bnb.write_state_dict({"fc.weight": nf4.quantize_fp4(jnp.asarray(sd["original"]))})
    theirs = _fc(sd)
    assert set(ours) == set(theirs)
    for k in theirs:
        np.testing.assert_array_equal(bits(ours[k]), bits(theirs[k]), err_msg=k)
    assert bnb.quantization_config({"w": nf4.quantize_fp4(jnp.ones(64))})["bnb_4bit_quant_type"] == "fp4"


def test_mixed_code_books_are_refused():
    sd = _fc(load_file(str(DATA / "bnb_fp4.safetensors")))
    bad = dict(sd, **{"fc.weight.quant_map": nf4.NF4_LEVELS.copy()})
    with pytest.raises(CheckpointError, match="FP4 code book"):
        bnb.read_state_dict(bad)
    with pytest.raises(CheckpointError, match="one bitsandbytes quant_type"):
        bnb.quantization_config({"a": nf4.quantize_fp4(jnp.ones(64)), "b": nf4.quantize(jnp.ones(64))})


@pytest.mark.parametrize("fmt", ["bnb_fp4", "bnb_fp4_dq"])
def test_registered_and_round_trips(fmt, dtype):
    x = jax.random.normal(jax.random.key(3), (4, 128)).astype(dtype)
    q = quant.quantize(x, fmt)
    assert q.format == fmt and quant.dequantize(q).dtype == dtype
    y = np.asarray(quant.dequantize(q), np.float32)
    amax = np.abs(np.asarray(x, np.float32)).reshape(-1, 64).max(axis=1)
    # half the widest gap of the code book (0.5 .. 0.667 .. 1: 1/6), times each block's absmax
    err = np.abs(y - np.asarray(x, np.float32)).reshape(-1, 64).max(axis=1)
    assert np.all(err <= amax / 6 * 1.02 + 1e-6)


def test_vmap_matches_per_example():
    x = jax.random.normal(jax.random.key(4), (3, 2, 64))
    qv = jax.vmap(nf4.quantize_fp4)(x)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(qv.codes[i]), np.asarray(nf4.quantize_fp4(x[i]).codes))
    np.testing.assert_array_equal(np.asarray(nf4.dequantize(qv)[1]), np.asarray(nf4.dequantize(nf4.quantize_fp4(x[1]))))


def test_nan_block_is_nan_and_others_untouched():
    x = np.ones((2, 64), np.float32)
    x[0, 3] = np.nan
    y = np.asarray(nf4.dequantize(nf4.quantize_fp4(jnp.asarray(x))))
    assert np.isnan(y[0]).all() and (y[1] == 1).all()


def test_bad_input_is_refused():
    with pytest.raises(ConfigError, match="block_size"):
        nf4.quantize_fp4(jnp.ones(64), block_size=63)
    with pytest.raises(FormatError):
        nf4.dequantize(jnp.ones(4))


@pytest.mark.parametrize("dq", [False, True])
def test_kernel_planes_and_dot_general(dq):
    from viva_tensor import _kernels
    from viva_tensor._kernels.planes import decoded, kernel_args

    w = jax.random.normal(jax.random.key(5), (16, 128)).at[2, :64].set(0.0)
    q = (nf4.double_quantize_fp4 if dq else nf4.quantize_fp4)(w)
    want = np.asarray(nf4.dequantize(q))
    args = kernel_args(q)
    assert args["layout"] == "high_first" and args["block_size"] == 64
    np.testing.assert_array_equal(bits(decoded(args)), bits(want))
    if _kernels.available():
        got = _kernels.decode(args["codes"], args["lut"], args["scales"], args["offsets"], layout=args["layout"],
                              block_size=args["block_size"], scale_table=args["scale_table"])
        np.testing.assert_array_equal(bits(got), bits(want))
    x = jax.random.normal(jax.random.key(6), (3, 128))
    dims = (((1,), (1,)), ((), ()))
    y = np.asarray(quant.dot_general(x, q, dims), np.float64)
    ref = np.asarray(x, np.float64) @ want.astype(np.float64).T
    bound = 8 * 128 * 2.0**-24 * (np.abs(np.asarray(x)) @ np.abs(want).T) + 1e-6
    assert np.all(np.abs(y - ref) <= bound)
