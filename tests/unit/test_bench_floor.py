"""bench/floor.py: the raw-pika floor moves bodies of the sizes fedmq sends, in the messages fedmq cuts them into."""

from __future__ import annotations

import numpy as np
import pytest

from bench._common import MODEL_SIZES, mlp_param_count, mlp_shapes
from bench.floor import body_bytes, chunk_spans
from fedmq.shared import chunking, compression, messages

MiB = 1024 * 1024


@pytest.mark.parametrize("total", [1, 64 * 1024, 8 * MiB - 1, 8 * MiB, 8 * MiB + 1, 40_001_593, 3 * 8 * MiB])
@pytest.mark.parametrize("chunk", [64 * 1024, 8 * MiB])
def test_spans_are_the_messages_fedmq_sends(total: int, chunk: int) -> None:
    sent = chunking.split(bytes(total), chunk, "p")
    spans = chunk_spans(total, chunk)
    assert [b - a for a, b in spans] == [len(c.data) for c in sent]
    assert spans[0][0] == 0 and spans[-1][1] == total
    assert all(a == b_prev for (a, _), (_, b_prev) in zip(spans[1:], spans, strict=False))


def test_a_model_that_fits_is_one_message_and_10m_is_five() -> None:
    model_1m, _ = body_bytes(mlp_shapes(MODEL_SIZES["1M"]))
    model_10m, _ = body_bytes(mlp_shapes(MODEL_SIZES["10M"]))
    assert len(chunk_spans(model_1m, chunking.DEFAULT_CHUNK_BYTES)) == 1
    assert len(chunk_spans(model_10m, chunking.DEFAULT_CHUNK_BYTES)) == 5


@pytest.mark.parametrize("scheme", ["none", "fp16", "int8", "topk:0.1"])
def test_update_bytes_are_those_of_a_real_update(scheme: str) -> None:
    """The size does not depend on the values: a trained-looking delta encodes to the same length."""
    shapes = mlp_shapes(MODEL_SIZES["100k"])
    model, update = body_bytes(shapes, scheme)
    rng = np.random.default_rng(0)
    delta = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    parsed = compression.parse(scheme)
    wire = compression.encode_params(delta, parsed) if parsed.lossy else delta
    real = messages.encode(messages.Update(
        task_id="0123456789abcdef0123456789abcdef", worker_id="w0", base_version=7, num_samples=32,
        params=wire, kind="delta", train_loss=0.25, train_accuracy=0.5, duration_s=0.1, round=7,  # type: ignore[arg-type]
        run_id="fedcba9876543210fedcba9876543210", compression=parsed.text))
    raw = mlp_param_count(MODEL_SIZES["100k"]) * 4
    assert abs(update - len(real)) < 64  # the envelope's small numbers differ, the params do not
    assert raw < model < raw + 1024
    share = {"none": 1.0, "fp16": 0.5, "int8": 0.25, "topk:0.1": 0.2}[scheme]
    assert share * raw <= update < share * raw * 1.02 + 1024


def test_a_bfloat16_model_is_half_the_bytes_of_a_float32_one() -> None:
    shapes = mlp_shapes(MODEL_SIZES["100k"])
    raw = mlp_param_count(MODEL_SIZES["100k"]) * 4
    model, update = body_bytes(shapes, "int8", "bfloat16")
    assert raw // 2 < model < raw // 2 + 1024
    assert update == body_bytes(shapes, "int8")[1]  # the update does not depend on the model's dtype
    quarter, _ = body_bytes(shapes, "int8", "int8")  # a byte a weight and a float32 scale per 1024
    assert raw // 4 < quarter < raw // 4 + raw // 1024 + 1024


@pytest.mark.broker
def test_the_floor_reports_its_rounds_and_the_machines_cpu_per_round(amqp_url: str) -> None:
    from bench.floor import round_floor

    # rounds long enough (tens of ms) for /proc/stat's 10 ms ticks to see the CPU they cost
    got = round_floor(amqp_url, 4 * MiB, 2, update_bytes=4 * MiB, rounds=3, timeout_s=60)
    assert len(got["per_round_s"]) == 3 and got["total_s"] > 0
    assert got["model_s"] <= got["total_s"]
    # busy CPU seconds of the whole machine per round: something (the broker moved the bytes),
    # and no more than every core busy for the slowest round
    import os

    assert 0 < got["machine_cpu_s"] <= (os.cpu_count() or 1) * max(got["per_round_s"]) + 0.05
    assert 0 < got["machine_busy_share"] <= 1
    # the shared broker's own share of it (None on another broker: its process is not known)
    assert got["broker_cpu_s"] is None or 0 <= got["broker_cpu_s"] <= got["machine_cpu_s"] + 0.05
