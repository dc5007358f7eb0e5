"""bitsandbytes, GPTQ and AutoAWQ checkpoints: files the tools wrote themselves (tests/data/interop, made by
tools/make_interop_fixtures.py) read bit for bit, and our files byte-identical to theirs."""

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import load_file

from viva_tensor import awq, nf4
from viva_tensor.errors import CheckpointError
from viva_tensor.interop import _int4, bnb
from viva_tensor.interop import awq as awq_file
from viva_tensor.interop import gptq as gptq_file

DATA = pathlib.Path(__file__).parent / "data" / "interop"


def fixture(name):
    return load_file(str(DATA / f"{name}.safetensors"))


def bits(a):
    a = np.asarray(a)
    return a.reshape(-1).view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


# --- bitsandbytes ------------------------------------------------------------------------------


@pytest.mark.parametrize("name,cls", [("bnb_nf4", nf4.NF4Tensor), ("bnb_nf4_dq", nf4.NF4DQTensor)])
def test_bnb_files_decode_as_bitsandbytes_does(name, cls):
    sd = fixture(name)
    tensors = bnb.read_state_dict({k: v for k, v in sd.items() if k.startswith("fc.")})
    q = tensors["fc.weight"]
    assert type(q) is cls and q.shape == (64, 384) and list(tensors) == ["fc.weight"]
    np.testing.assert_array_equal(bits(nf4.dequantize(q)), bits(sd["reference"]))


def _assert_same_state_dict(ours, theirs):
    """Every tensor's bits, and the quant state's JSON (the offset there a float's decimal repr) equal."""
    assert set(ours) == set(theirs)
    state = "fc.weight." + bnb.STATE_KEY + "nf4"
    for k in theirs:
        if k == state:
            assert json.loads(ours[k].tobytes()) == json.loads(theirs[k].tobytes())
            continue
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        np.testing.assert_array_equal(bits(ours[k]), bits(theirs[k]), err_msg=k)


@pytest.mark.parametrize("name", ["bnb_nf4", "bnb_nf4_dq"])
def test_bnb_files_written_back_are_byte_identical(name):
    theirs = {k: v for k, v in fixture(name).items() if k.startswith("fc.")}
    _assert_same_state_dict(bnb.write_state_dict(bnb.read_state_dict(theirs)), theirs)


def test_our_nf4_quantization_writes_the_state_dict_bitsandbytes_writes():
    sd = fixture("bnb_nf4")
    ours = bnb.write_state_dict({"fc.weight": nf4.quantize(jnp.asarray(sd["original"]))})
    _assert_same_state_dict(ours, {k: v for k, v in sd.items() if k.startswith("fc.")})


def test_our_double_quantization_is_bitsandbytes_bit_for_bit():
    # Every code is bitsandbytes', and so are the offset (torch's float32 mean of the absmax values, summed in
    # torch's order) and the nested absmax.
    sd = fixture("bnb_nf4_dq")
    ours = bnb.write_state_dict({"fc.weight": nf4.double_quantize(jnp.asarray(sd["original"]))})
    _assert_same_state_dict(ours, {k: v for k, v in sd.items() if k.startswith("fc.")})


def test_bnb_round_trip_keeps_other_tensors(dtype):
    w = jax.random.normal(jax.random.key(1), (10, 33)).astype(dtype)  # odd size: a half-filled last byte
    bias = np.arange(10, dtype=np.float32)
    back = bnb.read_state_dict(bnb.write_state_dict({"a.weight": nf4.double_quantize(w), "a.bias": bias}))
    assert list(back) == ["a.weight", "a.bias"] and back["a.weight"].dtype == dtype
    np.testing.assert_array_equal(bits(nf4.dequantize(back["a.weight"])), bits(nf4.dequantize(nf4.double_quantize(w))))
    np.testing.assert_array_equal(back["a.bias"], bias)


def test_bnb_refuses_what_it_cannot_read():
    sd = {k: v for k, v in fixture("bnb_nf4").items() if k.startswith("fc.")}
    fp4 = dict(sd)
    fp4["fc.weight.quant_state.bitsandbytes__fp4"] = fp4.pop("fc.weight.quant_state.bitsandbytes__nf4")
    with pytest.raises(CheckpointError, match="NF4 quant state"):
        bnb.read_state_dict(fp4)
    bad_map = dict(sd, **{"fc.weight.quant_map": sd["fc.weight.quant_map"][::-1].copy()})
    with pytest.raises(CheckpointError, match="NF4 code book"):
        bnb.read_state_dict(bad_map)
    no_absmax = {k: v for k, v in sd.items() if not k.endswith("absmax")}
    with pytest.raises(CheckpointError, match="absmax"):
        bnb.read_state_dict(no_absmax)
    not_json = dict(sd, **{"fc.weight.quant_state.bitsandbytes__nf4": np.frombuffer(b"{oops", np.uint8)})
    with pytest.raises(CheckpointError, match="JSON"):
        bnb.read_state_dict(not_json)
    with pytest.raises(CheckpointError, match="NF4 record"):
        bnb.write_state_dict({"w": awq.quantize_group(jnp.ones((8, 8)))})


# --- AutoAWQ GEMM ------------------------------------------------------------------------------


def test_autoawq_files_decode_as_autoawq_does():
    sd = fixture("awq_gemm")
    q = awq_file.read_state_dict({k: v for k, v in sd.items() if k.startswith("fc.")})["fc.weight"]
    assert isinstance(q, awq.GroupInt4Tensor) and q.shape == (64, 384) and q.group_size == 128
    # AutoAWQ dequantizes in float16: (q - z) * s rounded once; ours is exact in float32, then rounded once.
    ours = awq.dequantize(q).astype(jnp.float32).astype(jnp.float16).T
    np.testing.assert_array_equal(bits(ours), bits(sd["reference"]))


def test_our_autoawq_tensors_are_byte_identical_to_its_own():
    sd = fixture("awq_gemm")
    layer = {k.removeprefix("fc."): v for k, v in sd.items() if k.startswith("fc.")}
    again = awq_file.write_layer(awq_file.read_layer(**layer))
    for k, v in layer.items():
        assert again[k].dtype == v.dtype and again[k].shape == v.shape
        np.testing.assert_array_equal(bits(again[k]), bits(v), err_msg=k)


def test_awq_interleave_matches_the_documented_example():
    # interop research, verified with AutoAWQ: codes of columns 0..7 [8,0,5,2,7,1,4,13] -> nibbles [8,5,7,4,0,2,1,13]
    word = _int4.pack(np.array([[8, 0, 5, 2, 7, 1, 4, 13]]), 1, _int4.AWQ_ORDER)[0, 0]
    assert [(int(np.uint32(word)) >> (4 * i)) & 15 for i in range(8)] == [8, 5, 7, 4, 0, 2, 1, 13]


# --- GPTQ --------------------------------------------------------------------------------------


def gptq_reference_pack(codes_in_out, zeros_groups_out, v1):
    """auto-gptq / GPTQModel packing written from the definition with Python ints (slow, small shapes)."""
    k, out = codes_in_out.shape
    qweight = np.zeros((k // 8, out), np.int64)
    for r in range(k // 8):
        for j in range(8):
            qweight[r] |= codes_in_out[8 * r + j].astype(np.int64) << (4 * j)
    g = zeros_groups_out.shape[0]
    qzeros = np.zeros((g, out // 8), np.int64)
    for c in range(out // 8):
        for j in range(8):
            qzeros[:, c] |= zeros_groups_out[:, 8 * c + j].astype(np.int64) << (4 * j)
    if v1:
        qzeros = (qzeros - 0x11111111) % (1 << 32)  # one int32 subtraction per word (GPTQModel)
    to32 = lambda a: (a % (1 << 32)).astype(np.uint32).view(np.int32)  # noqa: E731
    return to32(qweight), to32(qzeros)


@pytest.mark.parametrize("fmt", gptq_file.FORMATS)
@given(st.integers(1, 3), st.integers(1, 3), st.sampled_from([8, 16, 32]), st.integers(0, 2**31))
def test_gptq_layer_matches_the_reference_packing(fmt, out8, groups, group, seed):
    rng = np.random.default_rng(seed)
    out, k = 8 * out8, groups * group
    codes = rng.integers(0, 16, (out, k))
    zeros = rng.integers(0, 16, (out, groups))
    zeros[0, 0] = 0  # a zero point of 0 borrows from the next nibble in v1
    scales = rng.uniform(0.001, 0.1, (out, groups)).astype(np.float16)
    q = _int4.group_record(codes, scales, zeros, group_size=group, dtype=jnp.float32)
    layer = gptq_file.write_layer(q, checkpoint_format=fmt)
    ref_w, ref_z = gptq_reference_pack(codes.T, zeros.T, v1=fmt == "gptq")
    np.testing.assert_array_equal(layer["qweight"], ref_w)
    np.testing.assert_array_equal(layer["qzeros"], ref_z)
    np.testing.assert_array_equal(layer["g_idx"], np.arange(k) // group)
    back = gptq_file.read_layer(**layer, checkpoint_format=fmt, dtype="float32")
    np.testing.assert_array_equal(bits(awq.dequantize(back)), bits(awq.dequantize(q)))
    # and the dequantization is GPTQ's: scales[g] * (q - zero[g])
    want = scales.astype(np.float32).repeat(group, 1) * (codes - zeros.repeat(group, 1)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(awq.dequantize(back)), want)


def test_gptq_v1_borrow_matches_gptqmodel():
    # interop research, verified with GPTQModel's pack: v2 zero nibbles [0,7,7,8,...] are stored as [15,5,6,7,...]
    zeros = np.array([[0, 7, 7, 8, 8, 8, 8, 8]]).repeat(8, 0).T  # (out=8, groups=8): zero of output c is [c]
    q = _int4.group_record(np.zeros((8, 64), int), np.ones((8, 8), np.float16), zeros, group_size=8,
                           dtype=jnp.float32)
    word = np.uint32(gptq_file.write_layer(q)["qzeros"].view(np.uint32)[0, 0])
    assert [(int(word) >> (4 * i)) & 15 for i in range(4)] == [15, 5, 6, 7]


def test_gptq_state_dict_round_trip_and_errors():
    w = jax.random.normal(jax.random.key(2), (16, 64))
    q = awq.quantize_group(w, group_size=32)
    sd = gptq_file.write_state_dict({"l.weight": q, "l.bias": np.ones(16, np.float16)})
    assert sorted(sd) == ["l.bias", "l.g_idx", "l.qweight", "l.qzeros", "l.scales"]
    back = gptq_file.read_state_dict(sd, dtype="float32")
    np.testing.assert_array_equal(bits(awq.dequantize(back["l.weight"])), bits(awq.dequantize(q)))
    perm = dict(sd, **{"l.g_idx": np.random.default_rng(0).permutation(sd["l.g_idx"]).astype(np.int32)})
    act_order = gptq_file.read_state_dict(perm)["l.weight"]  # desc_act: an int4_gidx record (test_gptq_act_order)
    assert act_order.format == "int4_gidx" and np.array_equal(np.asarray(act_order.g_idx), perm["l.g_idx"])
    with pytest.raises(CheckpointError, match="checkpoint_format"):
        gptq_file.read_state_dict(sd, checkpoint_format="exl2")
    with pytest.raises(CheckpointError, match="int32"):
        gptq_file.read_layer(sd["l.qweight"].astype(np.int64), sd["l.qzeros"], sd["l.scales"])
    with pytest.raises(CheckpointError, match="multiples of 8"):
        gptq_file.write_layer(awq.quantize_group(jnp.ones((12, 64))))
    assert gptq_file.quantization_config({"l.weight": q})["group_size"] == 32


def test_bfloat16_fixture_dtypes_are_named():
    meta = json.loads(__import__("safetensors").safe_open(str(DATA / "ct_w4a16_bfloat16.safetensors"), "np")
                      .metadata()["torch_dtypes"])
    assert meta["original"] == "bfloat16"
    assert ml_dtypes.bfloat16  # fixtures store bfloat16 as raw uint16 bits


# --- compressed-tensors ------------------------------------------------------------------------

CT = ["ct_w4a16_float32", "ct_w4a16_asym_float32", "ct_w4a16_bfloat16", "ct_w4a16_asym_float16"]


def ct_fixture(name):
    """The fixture's fc.* tensors (bfloat16 restored from its raw bits) and a config.json for its scheme."""
    import safetensors

    from viva_tensor.interop import compressed_tensors as ct

    path = str(DATA / f"{name}.safetensors")
    meta = safetensors.safe_open(path, "np").metadata()
    dtypes = json.loads(meta["torch_dtypes"])
    sd = {k: (v.view(ml_dtypes.bfloat16) if dtypes[k] == "bfloat16" else
              v.view(ml_dtypes.float8_e4m3fn) if dtypes[k] == "float8_e4m3fn" else v)
          for k, v in load_file(path).items()}
    weights = json.loads(meta["weights"])
    fmt = "nvfp4-pack-quantized" if weights["type"] == "float" else "pack-quantized"
    config = ct.quantization_config("int4")
    config["format"] = fmt
    config["config_groups"]["group_0"].update(format=fmt, weights=weights)
    return sd, config


@pytest.mark.parametrize("name", CT)
def test_compressed_tensors_int4_decodes_as_compressed_tensors_does(name):
    from viva_tensor.interop import compressed_tensors as ct

    sd, config = ct_fixture(name)
    q = ct.read_state_dict({k: v for k, v in sd.items() if k.startswith("fc.")}, config)["fc.weight"]
    assert isinstance(q, awq.GroupInt4Tensor) and q.shape == (64, 384)
    assert q.scales.dtype == sd["fc.weight_scale"].dtype  # the file's scales, kept exactly
    ours = awq.dequantize(q).astype(jnp.float32).astype(sd["reference"].dtype)
    np.testing.assert_array_equal(bits(ours), bits(sd["reference"]))


@pytest.mark.parametrize("name", ["ct_w4a16_asym_float32", "ct_w4a16_asym_float16"])
def test_compressed_tensors_asym_written_back_byte_identical(name):
    from viva_tensor.interop import compressed_tensors as ct

    sd, config = ct_fixture(name)
    theirs = {k: v for k, v in sd.items() if k.startswith("fc.")}
    ours, _ = ct.write_state_dict(ct.read_state_dict(theirs, config))
    assert set(ours) == set(theirs)
    for k in theirs:
        np.testing.assert_array_equal(bits(ours[k]), bits(theirs[k]), err_msg=k)


def test_compressed_tensors_nvfp4_codes_exact_values_within_one_rounding():
    from viva_tensor import blackwell
    from viva_tensor.interop import compressed_tensors as ct

    sd, config = ct_fixture("ct_nvfp4a16_float32")
    theirs = {k: v for k, v in sd.items() if k.startswith("fc.")}
    q = ct.read_state_dict(theirs, config)["fc.weight"]
    assert isinstance(q, blackwell.NVFP4Tensor)
    ours = np.asarray(blackwell.dequantize(q), np.float32)
    ref = np.asarray(sd["reference"], np.float32)  # compressed-tensors decodes NVFP4 to bfloat16
    np.testing.assert_array_equal(bits(ours.astype(ml_dtypes.bfloat16)), bits(ref.astype(ml_dtypes.bfloat16)))
    back, cfg = ct.write_state_dict({"fc.weight": q})
    assert cfg["format"] == "nvfp4-pack-quantized"
    np.testing.assert_array_equal(back["fc.weight_packed"], theirs["fc.weight_packed"])
    np.testing.assert_array_equal(bits(back["fc.weight_scale"]), bits(theirs["fc.weight_scale"]))
    assert back["fc.weight_global_scale"][0] == pytest.approx(theirs["fc.weight_global_scale"][0], rel=2e-7)


def test_compressed_tensors_refusals():
    from viva_tensor.interop import compressed_tensors as ct

    sd, config = ct_fixture("ct_w4a16_float32")
    theirs = {k: v for k, v in sd.items() if k.startswith("fc.")}
    with pytest.raises(CheckpointError, match="compressed-tensors"):
        ct.read_state_dict(theirs, {"quant_method": "gptq"})
    odd = json.loads(json.dumps(config))
    odd["config_groups"]["group_0"]["weights"]["num_bits"] = 3
    with pytest.raises(CheckpointError, match="4 or 8"):
        ct.read_state_dict(theirs, odd)
    other = json.loads(json.dumps(config))
    other["config_groups"]["group_0"]["targets"] = ["re:decoder.*"]
    with pytest.raises(CheckpointError, match="targets match"):
        ct.read_state_dict(theirs, other)
    with pytest.raises(CheckpointError, match="int4_group or nvfp4"):
        ct.write_state_dict({"w.weight": nf4.quantize(jnp.ones((8, 64)))})


# --- folders: config.json + model.safetensors ----------------------------------------------------


@pytest.mark.parametrize("kind,make", [
    ("bnb", lambda w: nf4.double_quantize(w)),
    ("gptq", lambda w: awq.quantize_group(w, group_size=64)),
    ("awq", lambda w: awq.quantize_group(w, group_size=64)),
    ("compressed-tensors", lambda w: awq.quantize_group(w, group_size=64)),
])
def test_folders_round_trip(tmp_path, kind, make):
    from viva_tensor.interop import _hf

    w = jax.random.normal(jax.random.key(3), (16, 128))
    q = make(w)
    _hf.save(tmp_path / "ckpt", {"enc.fc.weight": q, "enc.fc.bias": np.ones(16, np.float32)}, kind=kind,
             config={"model_type": "bert"})
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "bert" and "quant_method" in config["quantization_config"]
    assert __import__("safetensors").safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "np").metadata()[
        "format"] == "pt"
    tensors, meta = _hf.load(tmp_path / "ckpt")
    assert meta["kind"] == kind and set(tensors) == {"enc.fc.weight", "enc.fc.bias"}
    from viva_tensor import quant

    got = np.asarray(quant.dequantize(tensors["enc.fc.weight"]))  # in the dtype the kind records
    np.testing.assert_array_equal(got, np.asarray(quant.dequantize(q)).astype(got.dtype))


def test_sharded_folder_and_detection(tmp_path):
    from viva_tensor import _safetensors
    from viva_tensor.interop import _hf

    sd = gptq_file.write_state_dict({"a.weight": awq.quantize_group(jnp.ones((8, 64)), group_size=32)})
    first = {k: v for k, v in sd.items() if "qweight" in k}
    _safetensors.write(tmp_path / "model-00001-of-00002.safetensors", first)
    _safetensors.write(tmp_path / "model-00002-of-00002.safetensors", {k: v for k, v in sd.items() if k not in first})
    weight_map = {k: ("model-00001-of-00002.safetensors" if k in first else "model-00002-of-00002.safetensors")
                  for k in sd}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    tensors, meta = _hf.load(tmp_path)  # no config.json: told apart from AWQ by its g_idx
    assert meta["kind"] == "gptq" and isinstance(tensors["a.weight"], awq.GroupInt4Tensor)
    with pytest.raises(CheckpointError, match="quant_method"):
        _hf.detect(sd, {"quant_method": "exl2"})
    with pytest.raises(CheckpointError, match="no such file"):
        _hf.load(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="kind"):
        _hf.save(tmp_path / "x", {}, kind="onnx")


# --- inspect and convert -----------------------------------------------------------------------


def test_convert_keeps_what_the_kind_stores_and_requantizes_the_rest(tmp_path):
    from viva_tensor import quant
    from viva_tensor.interop import _convert

    sd = fixture("bnb_nf4_dq")
    tensors = bnb.read_state_dict({k: v for k, v in sd.items() if k.startswith("fc.")})
    tensors["fc.bias"] = np.zeros(64, np.float32)
    rows = _convert.inspect(tensors)
    assert rows[0].format == "nf4_dq" and rows[0].shape == (64, 384) and 4.1 < rows[0].bits_per_value < 4.2
    same, report = _convert.convert(tensors, "bnb")
    assert report == {"fc.weight": "kept"} and same["fc.weight"] is tensors["fc.weight"]
    gptq_ready, report = _convert.convert(tensors, "gptq")
    assert report == {"fc.weight": "re-quantized nf4_dq -> int4_group"}
    assert gptq_ready["fc.weight"].format == "int4_group"
    np.testing.assert_allclose(quant.dequantize(gptq_ready["fc.weight"]), quant.dequantize(tensors["fc.weight"]),
                               atol=0.05)
    for kind, (load, save) in _convert.KINDS.items():
        ready, _ = _convert.convert(tensors, kind)
        save(str(tmp_path / kind), ready)
        back, meta = load(str(tmp_path / kind) + ("" if kind != "viva" else ""))
        assert set(back) == {"fc.weight", "fc.bias"}, kind
        np.testing.assert_array_equal(np.asarray(quant.dequantize(back["fc.weight"]), np.float32),
                                      np.asarray(quant.dequantize(ready["fc.weight"]), np.float32))
    with pytest.raises(CheckpointError, match="stores"):
        _convert.convert(tensors, "gptq", fmt="nf4")
    with pytest.raises(CheckpointError, match="'to'"):
        _convert.convert(tensors, "onnx")


def test_one_entry_point_for_every_kind(tmp_path):
    from viva_tensor import interop, quant

    w = jax.random.normal(jax.random.key(4), (16, 256))
    records = {"bnb": nf4.double_quantize(w), "gptq": awq.quantize_group(w), "awq": awq.quantize_group(w),
               "compressed-tensors": awq.quantize_group(w), "viva": nf4.quantize(w),
               "gguf": quant.quantize(w, "q4_k")}
    for kind, q in records.items():
        path = tmp_path / (kind + (".gguf" if kind == "gguf" else ".safetensors" if kind == "viva" else ""))
        interop.save(path, {"fc.weight": q}, kind=kind)
        assert interop.kind_of(path) == kind
        tensors, meta = interop.load(path)
        assert meta["kind"] == kind
        got = tensors["fc.weight"]
        assert got.format == q.format, kind
        np.testing.assert_array_equal(np.asarray(quant.dequantize(got), np.float32),
                                      np.asarray(quant.dequantize(q).astype(got.dtype), np.float32))
    with pytest.raises(CheckpointError, match="kind"):
        interop.save(tmp_path / "x", {}, kind="onnx")
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        interop.load(tmp_path / "junk.bin")
