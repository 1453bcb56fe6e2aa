"""Unit tests for shared.messages: round trips, the wire form, strict decoding, fuzzing."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmq.shared.errors import DecodeError
from fedmq.shared.messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    SCHEMA_VERSION,
    Control,
    Message,
    ModelVersion,
    Task,
    Update,
    decode,
    encode,
    message_type,
)


def _params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {  # deliberately not in sorted order
        "dense_1/W": rng.standard_normal((4, 3)).astype(np.float32),
        "dense_0/b": rng.standard_normal(4).astype(np.float64),
        "dense_0/W": rng.standard_normal((5, 4)).astype(np.float16),
        "steps": np.array(7, dtype=np.int64),
        "mask": np.array([[1, 0], [0, 1]], dtype=np.uint8),
        "ids": np.arange(3, dtype=np.int32),
        "empty": np.zeros((0, 2), np.float32),
    }


def _model(**changes: Any) -> ModelVersion:
    base = ModelVersion(
        version=3,
        params=_params(),
        spec={"layers": [5, 4, 3], "activation": "relu", "dropout": 0.5, "bias": True, "x": None},
        round=2,
        created_s=1700000000.25,
    )
    return dataclasses.replace(base, **changes)


def _task(**changes: Any) -> Task:
    base = Task(
        task_id="t-17",
        version=3,
        mode="sync",
        epochs=2,
        batch_size=32,
        lr=0.05,
        mu=0.01,
        seed=42,
        round=2,
    )
    return dataclasses.replace(base, **changes)


def _update(**changes: Any) -> Update:
    base = Update(
        task_id="t-17",
        worker_id="w-1",
        base_version=3,
        num_samples=600,
        params=_params(1),
        kind="delta",
        train_loss=0.7,
        train_accuracy=0.81,
        duration_s=1.5,
        round=2,
    )
    return dataclasses.replace(base, **changes)


def _control(**changes: Any) -> Control:
    base = Control(kind="heartbeat", worker_id="w-1", sent_s=12.5, info={"cpu": 0.3, "tags": ["a"]})
    return dataclasses.replace(base, **changes)


MESSAGES = {
    "model": _model(),
    "task": _task(),
    "update": _update(),
    "control": _control(),
}


def _assert_same(a: Message, b: Message) -> None:
    """Equal messages: arrays equal in order, dtype and shape; floats compare as floats."""
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "params":
            assert list(x) == list(y), "order of params kept"
            for name in x:
                assert x[name].dtype == y[name].dtype and x[name].shape == y[name].shape
                np.testing.assert_array_equal(x[name], y[name])
        elif f.type == "float":
            assert type(x) is float and type(y) is float and x == y, f.name
        else:
            assert x == y and type(x) is type(y), f.name


def _doc(msg: Message) -> dict[str, Any]:
    """The message as plain msgpack sees it."""
    return msgpack.unpackb(encode(msg))


def _redecode(doc: dict[str, Any], **kwargs: Any) -> Message:
    return decode(msgpack.packb(doc), **kwargs)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_round_trip(name):
    msg = MESSAGES[name]
    _assert_same(decode(encode(msg)), msg)
    assert message_type(msg) == name


@pytest.mark.parametrize(
    "msg",
    [
        _model(round=None, created_s=0, params={}, spec={}),
        _task(version=None, round=None, mode="async", mu=0, lr=1, update_kind="delta"),
        _update(round=None, kind="weights", num_samples=0, params={}, train_loss=-1.0),
        Control(kind="stop"),
        Control(kind="bye", info={"nested": {"deep": [1, [2, {"x": None}]]}, "": ""}),
    ],
    ids=["model-minimal", "task-async", "update-weights", "control-default", "control-nested"],
)
def test_round_trip_of_optional_and_edge_values(msg):
    floats = {
        f.name: float(getattr(msg, f.name)) for f in dataclasses.fields(msg) if f.type == "float"
    }
    _assert_same(decode(encode(msg)), dataclasses.replace(msg, **floats))


def test_wire_form_is_a_plain_msgpack_map():
    doc = _doc(_update())
    assert doc["schema"] == SCHEMA_VERSION and doc["type"] == "update"
    assert list(doc)[:2] == ["schema", "type"]
    # compression "none", a later field, is left out (peers without it read the message)
    assert set(doc) - {"schema", "type"} == {f.name for f in dataclasses.fields(Update)} - {"compression"}
    w = doc["params"]["dense_1/W"]
    assert w["dtype"] == "<f4" and w["shape"] == [4, 3]
    assert w["data"] == _update().params["dense_1/W"].tobytes()
    assert list(doc["params"]) == list(_params(1))


def test_a_tasks_model_size_is_a_later_field_left_out_when_unsaid():
    task = Task(task_id="t", version=1, mode="async", epochs=1, batch_size=8, lr=0.1, mu=0.0, seed=0)
    assert "model_bytes" not in _doc(task)  # peers without the field read the message
    assert decode(encode(task)).model_bytes == 0  # type: ignore[union-attr]
    sized = dataclasses.replace(task, model_bytes=400_000_000)
    assert decode(encode(sized)) == sized
    with pytest.raises(DecodeError, match="model_bytes"):
        decode(encode(dataclasses.replace(task, model_bytes=-1)))


def test_decoded_params_are_read_only_views():
    wire = encode(_update())
    params = decode(wire).params  # type: ignore[union-attr]
    buf = np.frombuffer(wire, np.uint8)
    for arr in params.values():
        assert not arr.flags.writeable
        assert arr.size == 0 or np.shares_memory(arr, buf)


def test_decode_accepts_bytearray_and_memoryview():
    wire = encode(_model())
    _assert_same(decode(bytearray(wire)), _model())
    _assert_same(decode(memoryview(wire)), _model())


def test_decode_accepts_arrays_in_plain_msgpack_layout():
    _assert_same(_redecode(_doc(_update())), _update())


def test_message_type_refuses_other_objects():
    with pytest.raises(TypeError, match="dict is not a fedmq message"):
        message_type({})  # type: ignore[arg-type]


def test_encode_refuses_params_that_are_not_arrays():
    with pytest.raises(TypeError, match=r"update.params\['w'\] is a list, not a numpy array"):
        encode(_update(params={"w": [1.0]}))
    with pytest.raises(TypeError, match="model.params must be a dict"):
        encode(_model(params=[np.zeros(1)]))
    with pytest.raises(TypeError, match=r"params\['w'\]: dtype bool is not supported"):
        encode(_update(params={"w": np.zeros(2, bool)}))


# --------------------------------------------------------------------------- expect


def test_expect_accepts_a_class_a_tuple_and_the_union():
    wire = encode(_task())
    assert isinstance(decode(wire, expect=Task), Task)
    assert isinstance(decode(wire, expect=(Update, Task)), Task)
    assert isinstance(decode(wire, expect=Message), Task)


def test_expect_rejects_other_message_types():
    with pytest.raises(DecodeError, match="expected update, got a task message"):
        decode(encode(_task()), expect=Update)
    with pytest.raises(DecodeError, match="expected model or control, got a update message"):
        decode(encode(_update()), expect=(ModelVersion, Control))


def test_expect_must_name_message_classes():
    with pytest.raises(TypeError, match="is not a fedmq message class"):
        decode(encode(_task()), expect=dict)


# --------------------------------------------------------------------------- rejections


def test_default_limit_is_128_mib():
    assert DEFAULT_MAX_MESSAGE_BYTES == 128 * 1024 * 1024


def test_size_is_checked_before_parsing():
    with pytest.raises(DecodeError, match="the message is 101 bytes, over the limit of 100"):
        decode(b"\xc1" * 101, max_bytes=100)
    wire = encode(_update())
    with pytest.raises(DecodeError, match="over the limit"):
        decode(wire, max_bytes=len(wire) - 1)
    assert decode(wire, max_bytes=len(wire))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"\xc1", "unsupported msgpack type byte"),
        (b"not msgpack at all", "trailing bytes"),
        (encode(_task()) + b"\x00", "1 trailing bytes"),
        (encode(_task())[:-3], "truncated"),
        (msgpack.packb([1, 2, 3]), "top level must be a map, got list"),
        (msgpack.packb(None), "top level must be a map, got nil"),
    ],
)
def test_rejects_bytes_that_are_not_a_message(data, match):
    with pytest.raises(DecodeError, match=match):
        decode(data)


def test_rejects_non_bytes():
    with pytest.raises(DecodeError, match="expected bytes, bytearray or memoryview, got str"):
        decode("hello")  # type: ignore[arg-type]


def _corrupt(msg: Message, **fields: Any) -> dict[str, Any]:
    doc = _doc(msg)
    for key, value in fields.items():
        if value is _DELETE:
            del doc[key]
        else:
            doc[key] = value
    return doc


_DELETE = object()


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"type": "task"}, "not a fedmq message: no 'schema' field"),
        (_corrupt(_task(), schema=3), "unknown schema version 3; this fedmq speaks 2"),
        (_corrupt(_task(), schema=1), "unknown schema version 1; this fedmq speaks 2"),
        (_corrupt(_task(), schema=0), "unknown schema version 0"),
        (_corrupt(_task(), schema="1"), "'schema' must be an int, got str '1'"),
        (_corrupt(_task(), schema=True), "'schema' must be an int, got bool True"),
        (_corrupt(_task(), type="job"), "unknown message type 'job'; expected one of model, task"),
        (_corrupt(_task(), type=_DELETE), "unknown message type None"),
        (_corrupt(_task(), type=1), "unknown message type 1"),
        (_corrupt(_task(), extra=1), "unknown field\\(s\\) in task: 'extra'"),
        (_corrupt(_task(), seed=_DELETE), "missing field\\(s\\) in task: 'seed'"),
        (
            _corrupt(_control(), info=_DELETE, sent_s=_DELETE),
            "missing field\\(s\\) in control: 'info', 'sent_s'",
        ),
        (_corrupt(_update(), params=_DELETE), "missing field\\(s\\) in update: 'params'"),
    ],
)
def test_rejects_bad_envelopes_and_field_sets(doc, match):
    with pytest.raises(DecodeError, match=match):
        _redecode(doc)


@pytest.mark.parametrize(
    ("msg", "field", "value", "match"),
    [
        # ints: bool is not int, floats are not ints, None only where Optional
        (_task(), "epochs", True, "task.epochs must be an int, got bool True"),
        (_task(), "epochs", 2.0, "task.epochs must be an int, got float 2.0"),
        (_task(), "seed", "1", "task.seed must be an int, got str '1'"),
        (_task(), "seed", None, "task.seed must be an int, got None"),
        (_update(), "num_samples", None, "update.num_samples must be an int"),
        (_model(), "version", [1], "model.version must be an int, got list"),
        # ranges
        (_model(), "version", -1, "model.version must be >= 0, got -1"),
        (_task(), "version", -2, "task.version must be >= 0, got -2"),
        (_update(), "base_version", -1, "update.base_version must be >= 0"),
        (_update(), "num_samples", -5, "update.num_samples must be >= 0, got -5"),
        (_task(), "epochs", 0, "task.epochs must be >= 1, got 0"),
        (_task(), "batch_size", 0, "task.batch_size must be >= 1, got 0"),
        (_task(), "seed", -1, "task.seed must be >= 0"),
        (_task(), "round", -1, "task.round must be >= 0"),
        (_update(), "round", 1.5, "update.round must be an int, got float"),
        # floats: finite, int accepted, bool and str not
        (_task(), "lr", float("nan"), "task.lr must be finite, got nan"),
        (_task(), "lr", float("inf"), "task.lr must be finite, got inf"),
        (_task(), "lr", 0.0, "task.lr must be > 0.0, got 0.0"),
        (_task(), "lr", -0.1, "task.lr must be > 0.0"),
        (_task(), "mu", -0.5, "task.mu must be >= 0.0, got -0.5"),
        (_task(), "mu", True, "task.mu must be a float, got bool True"),
        (_task(), "mu", "0.1", "task.mu must be a float, got str"),
        (_task(), "mu", None, "task.mu must be a float, got None"),
        (_update(), "train_loss", float("-inf"), "update.train_loss must be finite"),
        (_update(), "train_accuracy", float("nan"), "update.train_accuracy must be finite"),
        (_update(), "duration_s", -1.0, "update.duration_s must be >= 0.0"),
        (_model(), "created_s", float("nan"), "model.created_s must be finite"),
        (_control(), "sent_s", -3, "control.sent_s must be >= 0.0, got -3.0"),
        (_task(), "lr", 2**64 - 1, None),  # a large int is a fine (finite) float
        # strings and enums
        (_task(), "mode", "semi", "task.mode must be one of sync, async; got 'semi'"),
        (_task(), "mode", None, "task.mode must be a str, got None"),
        (_update(), "kind", "diff", "update.kind must be one of weights, delta; got 'diff'"),
        (_task(), "update_kind", "full", "task.update_kind must be one of weights, delta"),
        (_task(), "update_kind", None, "task.update_kind must be a str, got None"),
        (_control(), "kind", "pause", "control.kind must be one of stop, hello, heartbeat, bye"),
        (_task(), "task_id", "", "task.task_id must not be empty"),
        (_task(), "task_id", 17, "task.task_id must be a str, got int 17"),
        (_update(), "worker_id", "", "update.worker_id must not be empty"),
        (_update(), "worker_id", b"w", "update.worker_id must be a str, got bytes"),
        (_control(), "worker_id", 3, "control.worker_id must be a str"),
        # JSON-like maps
        (_model(), "spec", [1], "model.spec must be a map, got list"),
        (_model(), "spec", None, "model.spec must be a map, got None"),
        (_model(), "spec", {"a": b"x"}, r"model.spec\['a'\] is a bytes, which is not JSON-like"),
        (_model(), "spec", {"a": [1, float("nan")]}, r"model.spec\['a'\]\[1\] is nan; only finite"),
        (_control(), "info", {"x": {"y": float("inf")}}, r"control.info\['x'\]\['y'\] is inf"),
        (_control(), "info", "hi", "control.info must be a map, got str"),
        (
            _control(),
            "info",
            {"a": {"dtype": "<f4", "shape": [1], "data": b"\x00" * 4}},
            r"control.info\['a'\] is a array, which is not JSON-like",
        ),
        # params
        (_update(), "params", [1], "update.params must be a map of name -> array, got list"),
        (_model(), "params", {"w": [1.0]}, r"model.params\['w'\] is a list, not an array map"),
        (
            _model(),
            "params",
            {"w": {"dtype": "<f4"}},
            r"model.params\['w'\] is a map, not an array map",
        ),
        (
            _update(),
            "params",
            {"w": {"dtype": "<f4", "shape": [2], "data": "xxxxxxxx"}},
            r"update.params\['w'\] is a map, not an array map",
        ),
    ],
)
def test_rejects_bad_field_values(msg, field, value, match):
    doc = _corrupt(msg, **{field: value})
    if match is None:
        assert _redecode(doc)
        return
    with pytest.raises(DecodeError, match=match):
        _redecode(doc)


def _array_map(dtype: str, shape: list, data: bytes) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data": data}


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (_array_map("<c8", [1], b"\x00" * 8), r"params\['w'\]: dtype '<c8' is not allowed"),
        (_array_map("|b1", [2], b"\x00\x01"), "dtype '|b1' is not allowed"),
        (_array_map("<i2", [2], b"\x00" * 4), "dtype '<i2' is not allowed"),
        (_array_map("<f4", [3], b"\x00" * 8), r"8 data bytes, but shape \[3\] of <f4 needs 12"),
        (_array_map("<f8", [2, 2], b"\x00" * 8), r"shape \[2, 2\] of <f8 needs 32"),
        (_array_map("<f4", [-2], b""), "not a non-negative int"),
        (_array_map("<f4", "2", b"\x00" * 8), "the shape must be a list"),
        (
            _array_map("<f4", [2], np.array([1, np.nan], "<f4").tobytes()),
            "contains NaN or infinity",
        ),
        (_array_map("<f2", [1], np.array([np.inf], "<f2").tobytes()), "<f2 array contains NaN"),
        (_array_map("<f8", [1], np.array([-np.inf], "<f8").tobytes()), "<f8 array contains NaN"),
    ],
)
def test_rejects_bad_params(array, match):
    doc = _corrupt(_update(), params={"ok": _array_map("<i4", [1], b"\x00" * 4), "w": array})
    with pytest.raises(DecodeError, match=match):
        _redecode(doc)


def test_rejects_non_finite_params_in_our_own_layout():
    bad = _params()
    bad["dense_1/W"] = bad["dense_1/W"].copy()
    bad["dense_1/W"][2, 1] = np.nan
    with pytest.raises(DecodeError, match=r"params\['dense_1/W'\]: the <f4 array contains NaN"):
        decode(encode(_model(params=bad)))


# --------------------------------------------------------------------------- fuzzing

_FUZZ = settings(
    max_examples=1500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
_WIRES = [encode(m) for m in MESSAGES.values()]

_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10)
)
_ANY = st.recursive(
    _LEAVES,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def _decode_or_decode_error(data: bytes) -> None:
    try:
        msg = decode(data)
    except DecodeError as exc:
        assert str(exc), "a DecodeError says what is wrong"
        return
    assert message_type(msg) in {"model", "task", "update", "control"}


@_FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data):
    _decode_or_decode_error(data)


@_FUZZ
@given(st.sampled_from(_WIRES), st.data())
def test_fuzz_flipped_truncated_and_extended_messages(wire, data):
    wire = bytearray(wire)
    kind = data.draw(st.sampled_from(["flip", "truncate", "append", "insert", "delete"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 3))):
            i = data.draw(st.integers(0, len(wire) - 1))
            wire[i] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del wire[data.draw(st.integers(0, len(wire) - 1)) :]
    elif kind == "append":
        wire += data.draw(st.binary(min_size=1, max_size=12))
    elif kind == "insert":
        i = data.draw(st.integers(0, len(wire)))
        wire[i:i] = data.draw(st.binary(min_size=1, max_size=6))
    else:
        i = data.draw(st.integers(0, len(wire) - 1))
        del wire[i : i + data.draw(st.integers(1, 6))]
    _decode_or_decode_error(bytes(wire))


@_FUZZ
@given(st.sampled_from(list(MESSAGES.values())), st.data())
def test_fuzz_field_level_corruption(msg, data):
    doc = _doc(msg)
    action = data.draw(st.sampled_from(["replace", "delete", "add", "param"]))
    if action == "replace":
        doc[data.draw(st.sampled_from(sorted(doc)))] = data.draw(_ANY)
    elif action == "delete":
        del doc[data.draw(st.sampled_from(sorted(doc)))]
    elif action == "add":
        doc[data.draw(st.text(max_size=8))] = data.draw(_ANY)
    elif "params" in doc and doc["params"]:
        array = doc["params"][data.draw(st.sampled_from(sorted(doc["params"])))]
        array[data.draw(st.sampled_from(["dtype", "shape", "data", "extra"]))] = data.draw(_ANY)
    else:
        doc["params"] = data.draw(_ANY)
    try:
        raw = msgpack.packb(doc)
    except (OverflowError, ValueError):
        return
    _decode_or_decode_error(raw)
