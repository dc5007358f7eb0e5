"""The one safetensors reader/writer: round trips, interop with the safetensors library, and refusal of
every malformed or tampered file with a CheckpointError (never a raw struct/JSON/OS error)."""

import json
import os
import stat
import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import save_file

from viva_tensor import _safetensors as sf
from viva_tensor.errors import CheckpointError

ARRAYS = {
    "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
    "bf16": np.array([1.5, -2.0], ml_dtypes.bfloat16),
    "fp4": np.array([0.5, -6.0, 1.0], ml_dtypes.float4_e2m1fn),
    "e4m3": np.array([448.0, -0.25], ml_dtypes.float8_e4m3fn),
    "empty": np.zeros((0, 3), np.int8),
    "scalar": np.array(3.0, np.float32),
    "u8": np.arange(7, dtype=np.uint8),
}


def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.reshape(-1).view(np.uint8),
                                                                        b.reshape(-1).view(np.uint8))


@pytest.fixture
def written(tmp_path):
    f = tmp_path / "t.safetensors"
    sf.write(f, ARRAYS, metadata={"note": "hello"})
    return f


def test_round_trip_bit_for_bit(written):
    h = sf.read_header(written)
    assert h.signed and h.metadata == {"note": "hello"} and list(h.tensors) == list(ARRAYS)
    out = sf.read_all(h)
    for name, a in ARRAYS.items():
        assert _same(out[name], a), name


def test_the_safetensors_library_reads_our_files(written):
    from safetensors import safe_open

    with safe_open(str(written), "np") as f:  # (its NumPy API has no FP8 dtype; torch's reads F8_E4M3)
        theirs = {k: f.get_tensor(k) for k in ("f32", "bf16", "fp4", "u8")}
        assert f.metadata()["note"] == "hello"
    assert _same(theirs["f32"], ARRAYS["f32"]) and _same(theirs["bf16"], ARRAYS["bf16"])
    assert theirs["fp4"].dtype == np.uint8  # stored as raw bits; our reader gives the dtype back
    header = json.loads(open(written, "rb").read()[8:][: struct.unpack("<Q", open(written, "rb").read(8))[0]])
    assert header["e4m3"]["dtype"] == "F8_E4M3"


def test_we_read_the_safetensors_library_files(tmp_path):
    f = tmp_path / "hf.safetensors"
    save_file({"w": np.ones((2, 5), np.float32), "b": np.arange(3, dtype=np.int64)}, str(f), metadata={"a": "b"})
    h = sf.read_header(f)
    assert not h.signed and h.metadata == {"a": "b"}
    assert sf.read_tensor(h, "b").tolist() == [0, 1, 2]


def _tamper(path, old: bytes, new: bytes):
    b = open(path, "rb").read()
    assert old in b
    open(path, "wb").write(b.replace(old, new, 1))


@pytest.mark.parametrize("old,new", [
    (b'"F32"', b'"I32"'),                  # a dtype
    (b'"shape":[3,4]', b'"shape":[4,3]'),  # a shape with the same bytes
    (b'"hello"', b'"hellO"'),              # the user metadata
    (b'\\"dtype\\":\\"float4_e2m1fn\\"', b'\\"dtype\\":\\"float8_e4m3fn\\"'),  # a logical dtype in the table
])
def test_tampered_header_or_metadata_is_refused(written, old, new):
    _tamper(written, old, new)
    with pytest.raises(CheckpointError, match="changed after it was written"):
        sf.read_header(written)


def test_flipped_tensor_byte_is_refused(written):
    b = bytearray(open(written, "rb").read())
    b[-1] ^= 1  # the last tensor's last byte
    open(written, "wb").write(b)
    h = sf.read_header(written)  # the header is intact
    with pytest.raises(CheckpointError, match="SHA-256"):
        sf.read_tensor(h, "u8")
    assert _same(sf.read_tensor(h, "f32"), ARRAYS["f32"])  # the other tensors still read


def _raw_file(path, header: dict, data: bytes = b""):
    blob = json.dumps(header).encode()
    open(path, "wb").write(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize("header,data,match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, b"\0" * 8, "data_offsets"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlaps"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "hole"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12 bytes"),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 9, "unexpected bytes"),
    ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4, "shape"),
    ({"__metadata__": {"k": 1}}, b"", "dict of strings"),
    ({"__metadata__": {"viva_tensor.digest": "00"}}, b"", "changed after"),
])
def test_malformed_headers_are_refused(tmp_path, header, data, match):
    f = tmp_path / "bad.safetensors"
    _raw_file(f, header, data)
    with pytest.raises(CheckpointError, match=match):
        sf.read_header(f)


def test_deeply_nested_json_is_refused(tmp_path):
    f = tmp_path / "deep.safetensors"
    blob = b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    open(f, "wb").write(struct.pack("<Q", len(blob)) + blob)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        sf.read_header(f)


def test_paths_that_are_not_readable_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        sf.read_header(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="not a file"):
        sf.read_header(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_permission_denied(written):
    os.chmod(written, 0)
    try:
        with pytest.raises(CheckpointError, match="permission denied"):
            sf.read_header(written)
    finally:
        os.chmod(written, stat.S_IRUSR | stat.S_IWUSR)


@pytest.mark.parametrize("name", ["__version__", "float", "ndarray", "", 3, "float32x"])
def test_dtype_names_that_are_not_dtypes(name):
    with pytest.raises(CheckpointError, match="dtype name"):
        sf.np_dtype(name)


def test_reserved_metadata_and_bad_names_refused(tmp_path):
    with pytest.raises(CheckpointError, match="reserved"):
        sf.write(tmp_path / "a", {"x": np.zeros(1)}, metadata={sf.DIGEST_KEY: "x"})
    with pytest.raises(CheckpointError, match="names"):
        sf.write(tmp_path / "a", {"__metadata__": np.zeros(1)})


@given(st.binary(max_size=300))
def test_random_bytes_never_raise_a_raw_error(tmp_path_factory, blob):
    f = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    open(f, "wb").write(blob)
    try:
        h = sf.read_header(f)
    except CheckpointError:
        return
    sf.read_all(h)  # a file that passes the checks reads


@given(st.integers(0, 10_000), st.integers(0, 255))
def test_any_flipped_byte_is_detected(tmp_path_factory, pos, xor):
    f = tmp_path_factory.mktemp("flip") / "x.safetensors"
    sf.write(f, {"a": np.arange(10, dtype=np.float32), "b": np.ones((3, 3), ml_dtypes.bfloat16)})
    b = bytearray(open(f, "rb").read())
    pos %= len(b)
    if xor == 0 or (b[pos] == 0x20 and (b[pos] ^ xor) == 0x20):
        return
    b[pos] ^= xor
    open(f, "wb").write(b)
    try:
        h = sf.read_header(f)
        sf.read_all(h)
    except CheckpointError:
        return
    # The only change that can go unnoticed is in the header's trailing padding spaces.
    (n,) = struct.unpack("<Q", bytes(b[:8]))
    raw = bytes(b[8:8 + n])
    assert pos >= 8 + len(raw.rstrip()) and pos < 8 + n, pos
