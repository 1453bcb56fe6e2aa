"""Unit tests for update compression: round trips with their error bounds, error feedback, the
wire form through the strict message decoder, and seeded fuzzing of compressed payloads."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import numpy as np
import pytest

from fedmq.shared import codec, compression
from fedmq.shared.compression import INT8_BLOCK, ErrorFeedback, Scheme, parse
from fedmq.shared.errors import DecodeError
from fedmq.shared.messages import Task, Update, decode, encode

LIMIT = 1 << 24


def _delta(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    big = rng.standard_normal(3 * INT8_BLOCK + 77).astype(np.float32) * 0.01
    big[5] = 3.0  # an outlier: only its block's scale grows
    return {
        "dense_0/W": rng.standard_normal((64, 33)).astype(np.float32) * 0.05,
        "dense_0/b": rng.standard_normal(33).astype(np.float32) * 0.001,
        "big": big,
        "zeros": np.zeros((2, 3), np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "one": np.array([0.25], np.float32),
    }


def _update(scheme: str, params: Any, **changes: Any) -> Update:
    base = Update(task_id="t-1", worker_id="w1", base_version=3, num_samples=10, params=params, kind="delta",
                  train_loss=0.5, train_accuracy=0.9, duration_s=1.0, round=None, run_id="run-a",
                  compression=scheme)
    return dataclasses.replace(base, **changes)


def _roundtrip(scheme: str, delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    layers = compression.encode_params(delta, parse(scheme))
    got = decode(encode(_update(scheme, layers)), max_bytes=LIMIT)
    assert isinstance(got, Update) and got.compression == scheme
    return got.params


# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize("text,name,fraction", [("none", "none", None), ("fp16", "fp16", None),
                                                ("int8", "int8", None), ("topk:0.1", "topk", 0.1),
                                                ("topk:.5", "topk", 0.5)])
def test_parse(text, name, fraction):
    scheme = parse(text)
    assert (scheme.name, scheme.fraction) == (name, fraction)
    assert parse(scheme.text) == scheme


@pytest.mark.parametrize("text", ["", "gzip", "int4", "topk", "topk:0", "topk:0.6", "topk:nan", "topk:-1",
                                  "topk:x", "int8:3", "fp16:"])
def test_parse_refuses(text):
    with pytest.raises(ValueError, match="compress|topk"):
        parse(text)


# ------------------------------------------------------------------ round trips


def test_fp16_round_trip_relative_error():
    delta = _delta()
    got = _roundtrip("fp16", delta)
    for name, x in delta.items():
        assert got[name].dtype == np.float32 and got[name].shape == x.shape
        normal = np.abs(x) >= np.finfo(np.float16).tiny
        assert np.all(np.abs(got[name] - x)[normal] <= np.abs(x)[normal] * 2.0**-11)
        assert np.all(np.abs(got[name] - x)[~normal] <= 2.0**-24)


def test_fp16_refuses_values_it_cannot_hold():
    with pytest.raises(ValueError, match="float16"):
        compression.encode_params({"w": np.array([1e5], np.float32)}, parse("fp16"))


def test_int8_round_trip_within_half_a_scale_per_element():
    delta = _delta()
    layers = compression.encode_params(delta, parse("int8"))
    got = _roundtrip("int8", delta)
    for name, x in delta.items():
        scale = layers[name]["scale"]
        assert layers[name]["q"].dtype == np.int8 and scale.size == -(-x.size // INT8_BLOCK)
        per_element = np.repeat(scale, INT8_BLOCK)[: x.size].reshape(x.shape)
        assert got[name].dtype == np.float32 and got[name].shape == x.shape
        assert np.all(np.abs(got[name] - x) <= per_element / 2 * (1 + 1e-6) + 1e-12)
    # per block: the outlier's block is coarse, the other blocks keep their own fine scale
    assert layers["big"]["scale"][0] > 50 * layers["big"]["scale"][1]


def test_int8_scales_are_each_blocks_largest_magnitude_over_127_across_scratch_chunks():
    x = (np.random.default_rng(3).standard_normal(300 * INT8_BLOCK + 5) * 0.1).astype(np.float32)
    layer = compression.encode_params({"x": x}, parse("int8"))["x"]
    padded = np.concatenate([np.abs(x), np.zeros(-x.size % INT8_BLOCK, np.float32)])
    np.testing.assert_allclose(layer["scale"], padded.reshape(-1, INT8_BLOCK).max(axis=1) / 127, rtol=1e-6)
    per_element = np.repeat(layer["scale"], INT8_BLOCK)[: x.size]
    back = layer["q"].astype(np.float32) * per_element
    assert np.all(np.abs(back - x) <= per_element / 2 * (1 + 1e-6))


def test_int8_quantised_in_lanes_has_the_bits_of_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A large layer's runs of blocks are dealt to the lanes (fedmq.shared.lanes): the scales and
    values are the same bits as on one thread, with and without a base, last block partial."""
    import threading

    from fedmq.shared import lanes

    rng = np.random.default_rng(5)
    x = (rng.standard_normal(700 * INT8_BLOCK + 37) * 0.1).astype(np.float32)
    base = (x * 0.75 + 0.01).astype(np.float32)
    one = [compression._int8(x), compression._int8(x, base)]
    monkeypatch.setattr(lanes, "PARALLEL_MIN", 0)
    monkeypatch.setattr(lanes, "LANES", 3)
    monkeypatch.setattr(lanes, "_pool", None)
    monkeypatch.setattr(lanes, "_idle", None)
    seen: set[str] = set()
    real_abs = np.abs
    monkeypatch.setattr(np, "abs", lambda *a, **kw: (seen.add(threading.current_thread().name), real_abs(*a, **kw))[1])
    try:
        three = [compression._int8(x), compression._int8(x, base)]
    finally:
        if lanes._pool is not None:
            lanes._pool.shutdown()
    for a, b in zip(one, three, strict=True):
        assert a["q"].tobytes() == b["q"].tobytes() and a["scale"].tobytes() == b["scale"].tobytes()
    # this thread and the helpers took runs (which helper thread runs which lane is the pool's choice)
    assert threading.current_thread().name in seen and any(n.startswith("fedmq-lane") for n in seen), seen


@pytest.mark.filterwarnings("error")  # no overflow in 1/scale, no NaN cast to int8
def test_int8_keeps_a_block_of_tiny_values_within_half_a_scale():
    # a block whose largest magnitude is 1e-37 has a (subnormal) scale of ~7.9e-40, whose inverse
    # overflows float32: multiplying by it made 0 x inf = NaN and sent every nonzero value to
    # +-127, i.e. the block's largest magnitude
    x = np.zeros(3 * INT8_BLOCK, np.float32)
    x[:4] = [1e-37, 1e-38, -4e-38, 3e-40]
    x[INT8_BLOCK] = 0.25  # a normal block beside it
    layer = compression.encode_params({"x": x}, parse("int8"))["x"]
    assert layer["q"][:4].tolist() == [127, 13, -51, 0] and layer["q"][INT8_BLOCK] == 127
    back = compression.decompress({"x": layer}, parse("int8"))["x"]
    per_element = np.repeat(layer["scale"], INT8_BLOCK)
    assert np.all(np.abs(back - x) <= per_element / 2 * (1 + 1e-5))


@pytest.mark.parametrize("scheme", ["fp16", "int8", "topk:0.1"])
def test_encoding_from_a_base_is_the_encoding_of_the_subtracted_delta(scheme):
    """The worker hands the compressor its trained weights and the model (int8 forms the delta
    block by block): the wire form must be bit for bit that of the delta subtracted first,
    across scratch chunks and a partial last block, with and without error feedback."""
    rng = np.random.default_rng(11)
    base = {**_delta(1), "long": rng.standard_normal(300 * INT8_BLOCK + 5).astype(np.float32)}
    new = {k: (v + rng.standard_normal(v.shape).astype(np.float32) * 0.01).astype(np.float32) for k, v in base.items()}
    delta = {k: np.subtract(new[k], base[k], dtype=np.float32) for k in new}
    for feedback in (False, True):
        plain = ErrorFeedback().compress("run-a", delta, parse(scheme), feedback=feedback).layers
        fused = ErrorFeedback().compress("run-a", new, parse(scheme), feedback=feedback, base=base).layers
        assert plain.keys() == fused.keys()
        for name, layer in plain.items():
            for key, value in layer.items():
                assert np.array_equal(np.asarray(value), np.asarray(fused[name][key])), (scheme, name, key)
                assert np.asarray(value).dtype == np.asarray(fused[name][key]).dtype


def test_topk_keeps_exactly_the_largest_entries():
    delta = _delta()
    got = _roundtrip("topk:0.1", delta)
    for name, x in delta.items():
        flat, out = x.reshape(-1), got[name].reshape(-1)
        k = compression.topk_count(flat.size, 0.1)
        kept = np.flatnonzero(out)
        assert kept.size <= k
        assert np.array_equal(out[kept], flat[kept])  # exact on kept entries
        if flat.size:
            dropped = np.setdiff1d(np.arange(flat.size), kept)
            smallest_kept = np.abs(out[kept]).min() if kept.size else 0.0
            assert np.all(np.abs(flat[dropped]) <= smallest_kept)
    assert _roundtrip("topk:0.1", {"one": np.array([0.25], np.float32)})["one"][0] == 0.25


def test_compressed_updates_are_smaller():
    delta = {"w": np.random.default_rng(1).standard_normal(100_000).astype(np.float32)}
    sizes = {s: len(encode(_update(s, delta if s == "none" else compression.encode_params(delta, parse(s)))))
             for s in ("none", "fp16", "int8", "topk:0.1")}
    assert sizes["fp16"] < 0.51 * sizes["none"]
    assert sizes["int8"] < 0.26 * sizes["none"]
    assert sizes["topk:0.1"] < 0.21 * sizes["none"]


def test_an_uncompressed_message_has_no_compression_field_and_old_messages_mean_none():
    task = Task(task_id="t", version=1, mode="sync", epochs=1, batch_size=8, lr=0.1, mu=0.0, seed=1)
    wire = encode(task)
    assert "compression" not in msgpack.unpackb(wire)  # peers without the field still read it
    assert decode(wire) == task and task.compression == "none"
    doc = msgpack.unpackb(encode(dataclasses.replace(task, compression="int8")))
    assert doc["compression"] == "int8"
    doc["compression"] = "int4"
    with pytest.raises(DecodeError, match="task.compression"):
        decode(msgpack.packb(doc))


def test_a_compressed_update_must_match_its_scheme():
    delta = {"w": np.ones(10, np.float32)}
    int8 = compression.encode_params(delta, parse("int8"))
    with pytest.raises(DecodeError, match="fp16 layer has exactly"):
        decode(encode(_update("fp16", int8)))
    doc = msgpack.unpackb(encode(_update("int8", int8)))
    del doc["compression"]  # sent as if uncompressed
    with pytest.raises(DecodeError, match="not an array map"):
        decode(msgpack.packb(doc))


# ------------------------------------------------------------------ error feedback


def test_error_feedback_sent_plus_residual_equals_the_true_deltas():
    rng = np.random.default_rng(7)
    scheme = parse("topk:0.1")
    feedback = ErrorFeedback()
    true_sum = np.zeros((40, 25), np.float32)
    sent_sum = np.zeros((40, 25), np.float32)
    for _ in range(12):
        delta = {"w": rng.standard_normal((40, 25)).astype(np.float32)}
        out = feedback.compress("run-a", delta, scheme)
        feedback.keep(out)
        true_sum += delta["w"]
        sent_sum += compression.decompress(out.layers, scheme)["w"]
    assert feedback.residual is not None
    np.testing.assert_allclose(sent_sum + feedback.residual["w"], true_sum, atol=1e-4)


def test_error_feedback_keeps_the_residual_only_when_confirmed_and_only_for_its_run():
    scheme = parse("topk:0.1")
    feedback = ErrorFeedback()
    delta = {"w": np.arange(1, 21, dtype=np.float32)}
    first = feedback.compress("run-a", delta, scheme)
    again = feedback.compress("run-a", delta, scheme)  # the first was never confirmed
    assert compression.decompress(again.layers, scheme)["w"].tolist() == \
        compression.decompress(first.layers, scheme)["w"].tolist()
    feedback.keep(first)
    carried = compression.decompress(feedback.compress("run-a", delta, scheme).layers, scheme)["w"]
    # 17 + 17 and 18 + 18 now beat 19 and 20 (sent before, so no residual): the residual was added
    assert np.flatnonzero(carried).tolist() == [16, 17] and carried[16:18].tolist() == [34.0, 36.0]
    fresh = compression.decompress(feedback.compress("run-b", delta, scheme).layers, scheme)["w"]
    assert fresh[-2:].tolist() == [19.0, 20.0]  # another run starts from nothing


def test_error_feedback_of_a_fortran_ordered_delta_keeps_what_was_not_sent():
    feedback, scheme = ErrorFeedback(), parse("topk:0.1")
    delta = {"w": np.asfortranarray(np.arange(1, 41, dtype=np.float32).reshape(5, 8))}
    out = feedback.compress("r", delta, scheme)
    feedback.keep(out)
    assert feedback.residual is not None
    np.testing.assert_array_equal(compression.decompress(out.layers, scheme)["w"] + feedback.residual["w"], delta["w"])


def test_without_feedback_nothing_is_kept():
    feedback = ErrorFeedback()
    out = feedback.compress("r", {"w": np.ones(10, np.float32)}, parse("topk:0.1"), feedback=False)
    feedback.keep(out)
    assert feedback.residual is None


# ------------------------------------------------------------------ the strict decoder


def _wire_layers(scheme: str, **override: Any) -> dict[str, Any]:
    layers: dict[str, Any] = compression.encode_params({"w": np.linspace(-1, 1, 50, dtype=np.float32)}, parse(scheme))
    layers["w"].update(override)
    return layers


@pytest.mark.parametrize("scheme,override,reason", [
    ("int8", {"scale": np.array([-0.01], np.float32)}, "scale"),
    ("int8", {"scale": np.array([1e37], np.float32)}, "scale"),
    ("int8", {"scale": np.zeros(2, np.float32)}, "scales"),
    ("int8", {"q": np.full(50, -128, np.int8)}, "-128"),
    ("int8", {"q": np.zeros(50, np.int32)}, "dtype"),
    ("int8", {"block": 0}, "block"),
    ("int8", {"block": 2.5}, "block"),
    ("topk", {"indices": np.array([0, 60, 70, 80, 90], np.int32)}, "indices"),
    ("topk", {"indices": np.array([-1, 2, 3, 4, 5], np.int64)}, "indices"),
    ("topk", {"indices": np.array([1, 1, 2, 3, 4], np.int32)}, "strictly increasing"),
    ("topk", {"indices": np.array([4, 3, 2, 1, 0], np.int32)}, "strictly increasing"),
    ("topk", {"indices": np.arange(4, dtype=np.int32)}, "4 indices and 5 values"),
    ("topk", {"indices": np.arange(10, dtype=np.int32), "values": np.ones(10, np.float32)}, "at most 5"),
    ("topk", {"indices": np.arange(5, dtype=np.float32)}, "dtype"),
    ("topk", {"values": np.ones(5, np.float16)}, "dtype"),
    ("topk", {"shape": [2**40]}, "decompresses to"),
    ("topk", {"shape": [-1]}, "shape"),
    ("topk", {"shape": "50"}, "shape"),
    ("fp16", {"values": np.ones(50, np.float32)}, "dtype"),
])
def test_malformed_compressed_layers_are_refused_with_a_reason(scheme, override, reason):
    text = "topk:0.1" if scheme == "topk" else scheme
    with pytest.raises(DecodeError, match=reason):
        decode(encode(_update(text, _wire_layers(text, **override))), max_bytes=LIMIT)


def test_nan_in_a_compressed_payload_is_refused():
    for scheme, key in (("fp16", "values"), ("topk:0.1", "values"), ("int8", "scale")):
        layers: Any = compression.encode_params({"w": np.ones(50, np.float32)}, parse(scheme))
        bad = layers["w"][key].copy()
        bad[0] = np.nan
        layers["w"][key] = bad
        with pytest.raises(DecodeError, match="NaN"):
            decode(encode(_update(scheme, layers)), max_bytes=LIMIT)


def _mutations(value: Any, rng: np.random.Generator) -> Any:
    """One random change somewhere inside a compressed layer map."""
    choice = rng.integers(8)
    if isinstance(value, np.ndarray):
        arr = value.copy().reshape(-1)
        if choice == 0 and arr.size:
            arr.view(np.uint8)[rng.integers(arr.nbytes)] ^= np.uint8(1 << rng.integers(8))
            return arr.reshape(value.shape)
        if choice == 1:
            return arr[: rng.integers(arr.size + 1)]
        if choice == 2:
            return np.concatenate([arr, arr[:3]])
        if choice == 3:
            return arr.astype(rng.choice(["<f4", "<f2", "<i4", "<i8", "|i1", "|u1", "<f8"]))
        if choice == 4 and arr.size:
            return rng.permutation(arr).reshape(value.shape)
        return arr.reshape(-1, 1) if arr.size else arr
    if isinstance(value, int):
        return int(value + rng.integers(-1100, 1100))
    if isinstance(value, list):
        return [int(d + rng.integers(-3, 4)) for d in value] + ([1] if choice == 0 else [])
    return value


@pytest.mark.parametrize("scheme", ["fp16", "int8", "topk:0.1", "topk:0.5"])
def test_fuzzed_compressed_payloads_are_refused_or_decode_to_finite_float32(scheme):
    rng = np.random.default_rng(20261201)
    parsed = parse(scheme)
    for _ in range(300):
        delta = {f"l{i}": (rng.standard_normal(tuple(rng.integers(0, 40, size=rng.integers(1, 3))))
                           * rng.choice([1e-4, 1.0, 1e3])).astype(np.float32) for i in range(2)}
        layers: dict[str, Any] = compression.encode_params(delta, parsed)
        for _ in range(rng.integers(1, 4)):
            name = str(rng.choice(sorted(layers)))
            if not layers[name]:
                continue
            key = str(rng.choice(sorted(layers[name])))
            if rng.random() < 0.1:
                layers[name].pop(key)
            elif rng.random() < 0.05:
                layers[name]["extra"] = 1
            else:
                layers[name][key] = _mutations(layers[name][key], rng)
        try:
            wire = encode(_update(scheme, layers))
        except (TypeError, ValueError):
            continue  # no wire form (e.g. a shape that overflows msgpack): nothing to decode
        try:
            got = decode(wire, max_bytes=LIMIT)
        except DecodeError as exc:
            assert str(exc)
            continue
        assert isinstance(got, Update)
        for name, arr in got.params.items():
            assert arr.dtype == np.float32 and np.all(np.isfinite(arr)), name
            if parsed.name == "topk":
                assert arr.shape == tuple(layers[name]["shape"])
            else:
                assert arr.shape == layers[name]["q" if parsed.name == "int8" else "values"].shape


def test_scheme_text_is_canonical():
    assert Scheme("topk", 0.1).text == "topk:0.1" and parse(" topk:0.10 ").text == "topk:0.1"


def test_the_decompressed_size_has_its_own_limit():
    layers = compression.encode_params({"w": np.ones(10_000, np.float32)}, parse("int8"))
    wire = encode(_update("int8", layers))
    assert len(wire) < 20_000
    got = decode(wire, max_bytes=20_000, max_decompressed_bytes=40_000)  # 10 KB on the wire, 40 KB as float32
    assert isinstance(got, Update) and got.params["w"].nbytes == 40_000
    with pytest.raises(DecodeError, match="decompresses to 40000 bytes, over the limit of 39999"):
        decode(wire, max_bytes=20_000, max_decompressed_bytes=39_999)


# ------------------------------------------------------------------ bfloat16 model versions


def test_bfloat16_rounds_to_nearest_even_within_2_to_the_minus_8():
    # 1 + 2**-8 is a tie between 1 and 1 + 2**-7: even (1.0) wins; a hair above rounds up
    x = np.array([1.0, 1 + 2**-8, 1 + 2**-8 + 2**-20, 1 + 3 * 2**-8, -2.5, 0.0, -0.0, 1e-40, 3.3e38], np.float32)
    bits = compression.to_bfloat16({"x": x})["x"]
    assert bits.dtype == np.dtype("<u2") and bits.shape == x.shape
    back = compression.from_bfloat16({"x": bits})["x"]
    assert back.dtype == np.float32
    assert back[:5].tolist() == [1.0, 1.0, 1 + 2**-7, 1 + 4 * 2**-8, -2.5]
    assert np.signbit(back[6]) and back[5] == 0.0
    rng = np.random.default_rng(4)
    y = (rng.standard_normal((257, 1031)) * 0.05).astype(np.float32)  # more than one rounding block
    z = compression.from_bfloat16(compression.to_bfloat16({"y": y}))["y"]
    assert z.shape == y.shape and np.all(np.abs(z - y) <= np.abs(y) * 2.0**-8)


def test_bfloat16_refuses_what_it_cannot_carry_with_the_layer_named():
    with pytest.raises(ValueError, match="big"):
        compression.to_bfloat16({"big": np.array([3.4e38], np.float32)})  # rounds to infinity
    with pytest.raises(ValueError, match="nan"):
        compression.to_bfloat16({"nan": np.array([np.nan], np.float32)})
    with pytest.raises(DecodeError, match=r"\['w'\] must be bfloat16 bits"):
        compression.from_bfloat16({"w": np.zeros(3, np.float32)})
    with pytest.raises(DecodeError, match=r"\['w'\] holds a value that is not finite"):
        compression.from_bfloat16({"w": np.array([0x3F80, 0x7F80], np.uint16)})


def test_a_bfloat16_model_message_decodes_to_float32_and_a_float32_one_keeps_its_old_wire_form():
    from fedmq.shared.messages import ModelVersion

    params = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)}
    plain = ModelVersion(version=1, params=params, spec={}, run_id="r")
    assert "dtype" not in codec.unpack(encode(plain), LIMIT)  # as before: older workers read it
    assert decode(encode(plain)).dtype == "float32"
    rounded = ModelVersion(version=1, params=compression.to_bfloat16(params), spec={}, run_id="r", dtype="bfloat16")
    got = decode(encode(rounded))
    assert isinstance(got, ModelVersion) and got.dtype == "bfloat16" and got.params["w"].dtype == np.float32
    np.testing.assert_allclose(got.params["w"], params["w"], rtol=2.0**-8)
    forged = ModelVersion(version=1, params=params, spec={}, run_id="r", dtype="bfloat16")  # float32 arrays
    with pytest.raises(DecodeError, match="must be bfloat16 bits"):
        decode(encode(forged))
    with pytest.raises(DecodeError, match="dtype"):
        decode(encode(dataclasses.replace(rounded, dtype="float8")))


@pytest.mark.parametrize("n", [1024 * 600 + 77, 1024 * 256, 5])
def test_int8_decodes_to_the_bits_of_the_reference_formula(n: int) -> None:
    # the decoder widens and scales in place, a run of blocks at a time (2x faster than one mixed
    # int8 x float32 ufunc): the same bits as float32(q) x its block's scale, with a partial last
    # block and across runs
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * rng.uniform(0.01, 10, n)).astype(np.float32)
    layer = compression._int8(x)
    q, scale, block = layer["q"], layer["scale"], layer["block"]
    reference = np.repeat(scale, block)[:n] * q.astype(np.float32)
    out = compression.decode_params({"w": layer}, compression.parse("int8"), max_bytes=8 * n)["w"]
    assert out.dtype == np.float32 and out.shape == (n,)
    assert np.array_equal(out.view(np.uint32), reference.view(np.uint32))


# ------------------------------------------------------------------ int8 model versions


def test_an_int8_model_message_is_a_quarter_of_the_bytes_and_decodes_to_float32_within_half_a_scale():
    from fedmq.shared.messages import ModelVersion

    rng = np.random.default_rng(11)
    params = {"W": (rng.standard_normal((300, 70)) * 0.05).astype(np.float32), "b": np.zeros(7, np.float32)}
    wire = compression.model_wire(params, "int8")
    msg = ModelVersion(version=3, params=wire, spec={}, run_id="r", dtype="int8")
    body = encode(msg)
    assert len(body) < 0.27 * sum(x.nbytes for x in params.values()) + 512
    got = decode(body)
    assert isinstance(got, ModelVersion) and got.dtype == "int8" and got.version == 3
    for name, x in params.items():
        back = got.params[name]
        assert back.dtype == np.float32 and back.shape == x.shape and back.flags.writeable
        scale = np.repeat(wire[name]["scale"], INT8_BLOCK)[: x.size].reshape(x.shape)
        assert np.all(np.abs(back - x) <= scale / 2 * (1 + 1e-6))
    assert np.all(got.params["b"] == 0.0)


def test_an_int8_model_refuses_what_it_cannot_carry_and_a_forged_one_does_not_decode():
    from fedmq.shared.messages import ModelVersion

    with pytest.raises(ValueError, match="'?bad'? holds values that are not finite"):
        compression.model_wire({"ok": np.ones(3, np.float32), "bad": np.array([1.0, np.inf], np.float32)}, "int8")
    with pytest.raises(ValueError, match="nan"):
        compression.model_wire({"w": np.array([np.nan], np.float32)}, "int8")
    good = compression.model_wire({"w": np.linspace(-1, 1, 2000, dtype=np.float32)}, "int8")
    minus_128 = {"w": {**good["w"], "q": np.full(2000, -128, np.int8)}}
    negative = {"w": {**good["w"], "scale": -good["w"]["scale"]}}
    short = {"w": {**good["w"], "scale": good["w"]["scale"][:1]}}
    extra = {"w": {**good["w"], "values": np.zeros(2, np.float32)}}
    plain = {"w": np.zeros(2000, np.float32)}  # float32 arrays in a message that says int8
    for params, reason in [(minus_128, "-128"), (negative, "scale"), (short, "scales"), (extra, "keys"),
                           (plain, "not a int8 layer")]:
        forged = ModelVersion(version=1, params=params, spec={}, run_id="r", dtype="int8")
        with pytest.raises(DecodeError, match=reason):
            decode(encode(forged))
    # widened to float32, an int8 model is checked against the limit before it is allocated
    body = encode(ModelVersion(version=1, params=good, spec={}, run_id="r", dtype="int8"))
    with pytest.raises(DecodeError, match="decompresses to 8000 bytes, over the limit of 7999"):
        decode(body, max_bytes=len(body), max_decompressed_bytes=7999)
