"""Unit tests for shared.codec: the msgpack wire format for documents with numpy arrays."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedmq.shared import codec
from fedmq.shared.errors import DecodeError

LIMIT = 1 << 30
ALL_DTYPES = ["<f2", "<f4", "<f8", "<i4", "<i8", "|i1", "|u1", "<u2"]


def _array(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.asarray(rng.standard_normal(shape) * 50).astype(dtype)


def _foreign(doc: dict) -> bytes:
    """The document as plain msgpack writes it, arrays as {dtype, shape, data} maps."""

    def convert(value):
        if isinstance(value, np.ndarray):
            return {"dtype": value.dtype.str, "shape": list(value.shape), "data": value.tobytes()}
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return msgpack.packb(convert(doc))


def _reject(data, match: str, max_bytes: int = LIMIT) -> DecodeError:
    with pytest.raises(DecodeError, match=match) as info:
        codec.unpack(data, max_bytes)
    return info.value


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (3, 5), (2, 0, 4), (2, 3, 4, 5)])
def test_round_trip_keeps_values_dtype_and_shape(dtype, shape):
    arr = _array(dtype, shape)
    out = codec.unpack(codec.pack({"a": arr}), LIMIT)["a"]
    assert out.dtype == np.dtype(dtype)
    assert out.shape == shape
    np.testing.assert_array_equal(out, arr)


def test_round_trip_keeps_order_nesting_and_plain_values():
    doc = {
        "z": _array("<f4", (4, 3)),
        "a": {
            "m": _array("<i8", (2,)),
            "b": [1, -2, 2**63, -(2**63), 1.5, None, True, "é", b"\x00"],
        },
        "empty": {},
        "list": [],
        "k": "v",
    }
    out = codec.unpack(codec.pack(doc), LIMIT)
    assert list(out) == ["z", "a", "empty", "list", "k"]
    assert list(out["a"]) == ["m", "b"]
    np.testing.assert_array_equal(out["z"], doc["z"])
    np.testing.assert_array_equal(out["a"]["m"], doc["a"]["m"])
    assert out["a"]["b"] == doc["a"]["b"]
    assert out["empty"] == {} and out["list"] == [] and out["k"] == "v"


def test_converts_big_endian_non_contiguous_and_numpy_scalars():
    base = np.arange(24, dtype=">f8").reshape(4, 6)
    doc = {"t": base.T, "s": base[::2, 1::3], "n": np.float32(2.5), "i": np.int64(-3)}
    out = codec.unpack(codec.pack(doc), LIMIT)
    assert out["t"].dtype.str == "<f8"
    np.testing.assert_array_equal(out["t"], base.T)
    np.testing.assert_array_equal(out["s"], base[::2, 1::3])
    assert out["n"] == 2.5 and out["i"] == -3


def test_output_is_plain_msgpack():
    arr = _array("<f4", (3, 2))
    plain = msgpack.unpackb(codec.pack({"w": arr, "x": [1, "a"]}))
    assert plain["x"] == [1, "a"]
    assert plain["w"] == {"dtype": "<f4", "shape": [3, 2], "data": arr.tobytes()}


def test_reads_arrays_written_by_plain_msgpack_in_any_key_order():
    arr = _array("<f8", (2, 3))
    raw = msgpack.packb({"w": {"shape": [2, 3], "data": arr.tobytes(), "dtype": "<f8"}})
    np.testing.assert_array_equal(codec.unpack(raw, LIMIT)["w"], arr)
    np.testing.assert_array_equal(codec.unpack(_foreign({"w": arr}), LIMIT)["w"], arr)


def test_array_like_maps_without_a_bin_stay_maps():
    doc = {"info": {"dtype": "<f4", "shape": [1], "data": "not a bin"}}
    assert codec.unpack(codec.pack(doc), LIMIT) == doc


def test_bins_that_are_not_arrays_come_out_as_bytes():
    doc = {"b": b"\x01\x02", "l": [b"x"], "m": {"k": b""}}
    out = codec.unpack(codec.pack(doc), LIMIT)
    assert out == doc and type(out["b"]) is bytes and type(out["l"][0]) is bytes


def test_encode_and_decode_arrays():
    arrays = {"b": _array("<f4", (3,)), "a": _array("|u1", (2, 2))}
    out = codec.decode_arrays(codec.encode_arrays(arrays), LIMIT)
    assert list(out) == ["b", "a"]
    for name, arr in arrays.items():
        np.testing.assert_array_equal(out[name], arr)
    with pytest.raises(DecodeError, match="'x' is a int, not an array map"):
        codec.decode_arrays(codec.pack({"x": 1}), LIMIT)
    with pytest.raises(TypeError, match="'x' is a list, not a numpy array"):
        codec.encode_arrays({"x": [1.0]})


# --------------------------------------------------------------------------- zero copy


@pytest.mark.parametrize("prefix", range(12))
def test_payloads_are_8_byte_aligned_zero_copy_views(prefix):
    doc = {"p" * prefix: 1, "a": _array("<f8", (5,)), "bb": _array("<i4", (3, 3)), "c": 2.0}
    wire = codec.pack(doc)
    buf = np.frombuffer(wire, np.uint8)
    out = codec.unpack(wire, LIMIT)
    for name in ("a", "bb"):
        arr = out[name]
        assert np.shares_memory(arr, buf), "decoded without copying"
        assert (arr.ctypes.data - buf.ctypes.data) % 8 == 0
        assert arr.flags.aligned and not arr.flags.writeable
    assert msgpack.unpackb(wire)["c"] == 2.0


def test_decoded_arrays_are_read_only_also_from_a_bytearray():
    wire = bytearray(codec.pack({"a": _array("<f4", (4,))}))
    arr = codec.unpack(wire, LIMIT)["a"]
    assert not arr.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        arr[0] = 1.0


def test_misaligned_buffer_gives_aligned_copies():
    arr = _array("<f8", (100,))
    wire = codec.pack({"a": arr})
    shifted = memoryview(b"x" + wire)[1:]
    out = codec.unpack(shifted, LIMIT)["a"]
    assert out.flags.aligned and not out.flags.writeable
    np.testing.assert_array_equal(out, arr)


def test_accepts_memoryviews_of_any_format():
    wire = codec.pack({"a": _array("<i8", (2,))})
    as_words = np.frombuffer(wire + b"\x00" * (-len(wire) % 8), np.uint8)[: len(wire)]
    assert codec.unpack(memoryview(as_words), LIMIT)["a"].shape == (2,)
    with pytest.raises(DecodeError, match="not contiguous"):
        codec.unpack(memoryview(np.zeros((4, 4), np.uint8)[:, ::2]), LIMIT)


# --------------------------------------------------------------------------- rejections


def test_rejects_data_over_the_limit_before_parsing():
    _reject(b"\xc1" * 11, "the message is 11 bytes, over the limit of 10", max_bytes=10)


def test_rejects_non_bytes_and_empty_input():
    with pytest.raises(DecodeError, match="expected bytes, bytearray or memoryview, got str"):
        codec.unpack("{}", LIMIT)
    _reject(b"", "empty")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\xc1", r"unsupported msgpack type byte 0xc1 \(reserved"),
        (
            msgpack.packb({"a": msgpack.ExtType(1, b"x")}),
            r"a: unsupported msgpack type byte 0xd4 \(ext\)",
        ),
        (msgpack.packb({"a": msgpack.ExtType(1, b"xyz")}), r"0xc7 \(ext\)"),
        (msgpack.packb({"a": 1}) + b"\x00", "1 trailing bytes after the msgpack document"),
        (msgpack.packb({"a": "hello"})[:-2], "truncated: a string needs 5 bytes"),
        (msgpack.packb({"a": 1.5})[:-1], "truncated: a number needs 8 bytes"),
        (msgpack.packb({"a": b"x" * 300})[:-1], "truncated: a bin needs 300 bytes"),
        (b"\x82\xa1a\x01", "truncated: a map of 2 entries cannot fit"),
        (b"\x81\xa1a", "truncated: a value should start at offset 3"),
        (b"\xdf\xff\xff\xff\xff", "a map of 4294967295 entries cannot fit in the 0 bytes left"),
        (b"\x81\xa1a\xdd\xff\xff\xff\xff", r"a: truncated: a list of 4294967295 entries"),
        (msgpack.packb([1, 2]), r"top level must be a map, got list \[1, 2\]"),
        (msgpack.packb("x"), "top level must be a map, got str"),
        (msgpack.packb({1: 2}), "map key at offset 1 is a int, not a str"),
        (msgpack.packb({b"k": 2}), "map key at offset 1 is a bytes, not a str"),
        (b"\x82\xa1a\x01\xa1a\x02", "duplicate map key 'a'"),
        (b"\x81\xa2\xff\xfe\x01", "key at offset 2 is not valid UTF-8"),
        (b"\x81\xa1a\xa1\xff", r"a: the string at offset 4 is not valid UTF-8"),
        (b"\x81\xa1a\x91\xd9\x01\xff", r"a\[0\]: the string at offset 6 is not valid UTF-8"),
    ],
)
def test_rejects_malformed_msgpack(data, match):
    _reject(data, match)


def test_rejects_deep_nesting():
    deep = b"\x81\xa1a" * (codec.MAX_DEPTH + 1) + b"\x80"
    _reject(deep, f"nested deeper than {codec.MAX_DEPTH} levels")
    ok = b"\x81\xa1a" * (codec.MAX_DEPTH - 1) + b"\x80"
    assert codec.unpack(ok, LIMIT)


def _array_doc(dtype="<f4", shape=(2,), data=b"\x00" * 8) -> dict:
    return {"params": {"w": {"dtype": dtype, "shape": shape, "data": data}}}


@pytest.mark.parametrize(
    ("dtype", "shape", "data", "match"),
    [
        ("<c8", [1], b"\x00" * 8, r"params\['w'\]: dtype '<c8' is not allowed; allowed: <f2"),
        ("|b1", [1], b"\x00", "dtype '|b1' is not allowed"),
        ("float32", [1], b"\x00" * 4, "dtype 'float32' is not allowed"),
        (">f4", [1], b"\x00" * 4, "dtype '>f4' is not allowed"),
        (4, [1], b"\x00" * 4, "dtype 4 is not allowed"),
        (
            "<f4",
            2,
            b"\x00" * 8,
            "the shape must be a list of at most 32 non-negative ints, got int 2",
        ),
        ("<f4", [-1], b"", r"the shape \[-1\] has -1, not a non-negative int"),
        ("<f4", [True], b"\x00" * 4, "has True, not a non-negative int"),
        ("<f4", [2.0], b"\x00" * 8, "has 2.0, not a non-negative int"),
        ("<f4", [1] * 33, b"\x00" * 4, "at most 32"),
        ("<f4", [3], b"\x00" * 8, r"params\['w'\]: 8 data bytes, but shape \[3\] of <f4 needs 12"),
        ("<f8", [2, 2], b"\x00" * 24, r"24 data bytes, but shape \[2, 2\] of <f8 needs 32"),
        ("<f4", [0, 2**62, 2**62], b"", "not a valid numpy shape"),
        ("<f4", [0, 2**64 - 1], b"", r"the shape \[0, 18446744073709551615\] is not a valid numpy"),
        ("<f4", [2**40, 2**40], b"", "needs"),
    ],
)
def test_rejects_bad_arrays(dtype, shape, data, match):
    _reject(msgpack.packb(_array_doc(dtype, shape, data)), match)


@pytest.mark.parametrize("dtype", ["<f2", "<f4", "<f8"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("size", [1, 1000, 20_000, 300_000])
@pytest.mark.parametrize("writer", ["pack", "plain"])
def test_rejects_non_finite_floats(dtype, bad, size, writer):
    arr = _array(dtype, (size,))
    arr[size // 2] = bad
    doc = {"params": {"dense_0/W": arr}}
    wire = codec.pack(doc) if writer == "pack" else _foreign(doc)
    _reject(wire, rf"params\['dense_0/W'\]: the {dtype} array contains NaN or infinity")


@pytest.mark.parametrize("dtype", ["<f4", "<f8"])
def test_accepts_finite_values_whose_squares_overflow(dtype):
    big = np.finfo(dtype).max / 2
    arr = np.full(100_000, big, dtype=dtype)
    arr[::3] = -big
    out = codec.unpack(codec.pack({"a": arr}), LIMIT)["a"]
    np.testing.assert_array_equal(out, arr)


def test_integer_arrays_are_not_finiteness_checked():
    arr = np.array([np.iinfo(np.int64).max, -1], dtype=np.int64)
    np.testing.assert_array_equal(codec.unpack(codec.pack({"a": arr}), LIMIT)["a"], arr)


def test_decode_errors_name_nested_paths():
    _reject(codec.pack({"a": [0, {"b": "xy"}]})[:-1], r"a\[1\]\['b'\]: truncated")


# --------------------------------------------------------------------------- encoding errors


@pytest.mark.parametrize(
    "arr",
    [np.zeros(2, bool), np.zeros(2, np.complex64), np.zeros(2, np.int16), np.zeros(2, object)],
)
def test_encode_refuses_dtypes_outside_the_allowlist(arr):
    with pytest.raises(TypeError, match=r"params\['w'\]: dtype .* is not supported on the wire"):
        codec.pack({"params": {"w": arr}})


@pytest.mark.parametrize(
    ("doc", "exc", "match"),
    [
        ({"a": {1: 2}}, TypeError, "a: map key 1 is a int, not a str"),
        ({"a": [{1, 2}]}, TypeError, r"a\[0\]: cannot encode a set"),
        ({"a": 2**64}, ValueError, "a: cannot encode 18446744073709551616"),
        ({"a": "\udcff"}, ValueError, "a: cannot encode"),
    ],
)
def test_encode_errors_name_the_value(doc, exc, match):
    with pytest.raises(exc, match=match):
        codec.pack(doc)


def test_pack_wants_a_mapping():
    with pytest.raises(TypeError, match="must be a mapping, not a list"):
        codec.pack([1])  # type: ignore[arg-type]


def test_bin_header_sizes():
    for n in (0, 255, 256, 65535, 65536):
        arr = np.zeros(n, np.uint8)
        out = codec.unpack(codec.pack({"a": arr}), LIMIT)["a"]
        assert out.size == n
        assert msgpack.unpackb(codec.pack({"a": arr}))["a"]["data"] == arr.tobytes()


def test_large_container_headers():
    doc = {"l": list(range(70_000)), "m": {str(i): i for i in range(20)}}
    assert codec.unpack(codec.pack(doc), LIMIT) == doc
    assert msgpack.unpackb(codec.pack(doc)) == doc


# --------------------------------------------------------------------------- properties

_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.floats(width=32)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
_VALUES = st.recursive(
    _LEAVES,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)
_DOCS = st.dictionaries(st.text(max_size=8), _VALUES, max_size=6)
_FUZZ = settings(
    max_examples=1000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def _has_array_shaped_map(value) -> bool:
    if isinstance(value, dict):
        if value.keys() == codec.ARRAY_KEYS and isinstance(value["data"], bytes):
            return True
        return any(_has_array_shaped_map(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_array_shaped_map(v) for v in value)
    return False


@settings(_FUZZ, max_examples=250)
@given(_DOCS, st.booleans())
def test_reads_what_msgpack_reads(doc, single_floats):
    assume(not _has_array_shaped_map(doc))
    try:
        raw = msgpack.packb(doc, use_single_float=single_floats)
    except OverflowError:  # a float64 beyond float32's range
        assume(False)
    ours = codec.unpack(raw, LIMIT)
    assert msgpack.packb(ours) == msgpack.packb(msgpack.unpackb(raw))


@settings(_FUZZ, max_examples=300)
@given(_DOCS, st.dictionaries(st.text(max_size=8), _LEAVES, max_size=20))
def test_documents_without_arrays_encode_to_msgpacks_own_bytes(doc, flat):
    """Maps of plain values are packed by msgpack in one call (a speed path): the bytes are
    those of the general path, i.e. msgpack's, nested or flat, up to map16 headers."""
    for one in (doc, flat, {"outer": flat, "list": [flat, 1]}):
        assert codec.pack(one) == msgpack.packb(one)
        assert b"".join(codec.pack_pieces(one)) == msgpack.packb(one)


def test_arrays_after_plain_maps_stay_aligned():
    arr = np.arange(5, dtype="<f4")
    for prefix in ({}, {"a": 1}, {"a": 1, "b": "xy"}, {str(i): i for i in range(17)}):
        raw = codec.pack({"p": prefix, "w": arr})
        buf = np.frombuffer(raw, np.uint8)
        out = codec.unpack(raw, LIMIT)
        assert out["p"] == prefix
        np.testing.assert_array_equal(out["w"], arr)
        assert np.shares_memory(out["w"], buf) and (out["w"].ctypes.data - buf.ctypes.data) % 8 == 0


@_FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_decode_error(data):
    try:
        doc = codec.unpack(data, LIMIT)
    except DecodeError:
        return
    assert isinstance(doc, dict)
    assert isinstance(msgpack.unpackb(data), dict), "never accept what msgpack refuses"


_SAMPLE = codec.pack(
    {
        "schema": 1,
        "x": [1.5, "s", None],
        "params": {"w": _array("<f4", (3, 4)), "b": _array("<f8", (4,)), "u": _array("|u1", (5,))},
    }
)


@_FUZZ
@given(st.data())
def test_mutated_documents_raise_only_decode_error(data):
    wire = bytearray(_SAMPLE)
    kind = data.draw(st.sampled_from(["flip", "truncate", "append", "splice"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(wire) - 1))
            wire[i] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del wire[data.draw(st.integers(0, len(wire) - 1)) :]
    elif kind == "append":
        wire += data.draw(st.binary(min_size=1, max_size=16))
    else:
        i = data.draw(st.integers(0, len(wire)))
        wire[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        doc = codec.unpack(bytes(wire), LIMIT)
    except DecodeError:
        return
    assert isinstance(doc, dict)
    assert isinstance(msgpack.unpackb(bytes(wire)), dict), "never accept what msgpack refuses"


def test_float_checks_agree_with_isfinite():
    rng = np.random.default_rng(1)
    for dtype in ("<f2", "<f4", "<f8"):
        for _ in range(50):
            arr = rng.standard_normal(rng.integers(0, 70_000)).astype(dtype)
            if arr.size and rng.random() < 0.5:
                arr[rng.integers(0, arr.size)] = rng.choice([np.nan, np.inf, -np.inf])
            with np.errstate(over="ignore", invalid="ignore"):
                assert codec._all_finite(arr) == bool(np.isfinite(arr).all())


@_FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from(ALL_DTYPES), st.lists(st.integers(0, 5), max_size=4)),
        max_size=5,
    ),
    st.text(max_size=12),
)
def test_arrays_round_trip_in_our_layout_and_plain_msgpack(specs, prefix):
    doc = {prefix: 0, "params": {f"p{i}": _array(d, tuple(s), i) for i, (d, s) in enumerate(specs)}}
    for wire in (codec.pack(doc), _foreign(doc)):
        out = codec.unpack(wire, LIMIT)["params"]
        assert list(out) == list(doc["params"])
        for name, arr in doc["params"].items():
            assert out[name].dtype == arr.dtype and out[name].shape == arr.shape
            np.testing.assert_array_equal(out[name], arr)
            assert out[name].flags.aligned and not out[name].flags.writeable
