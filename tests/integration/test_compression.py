"""Update compression over RabbitMQ: `fedmq run --compress` (sync FedAvg with int8, async FedBuff with
top-k and error feedback) completes, learns and records the scheme; `--model-dtype bfloat16` models
travel at half size and `--model-dtype int8` ones at a quarter; malformed compressed updates from a hostile participant are rejected with
their reasons and dead-lettered.
"""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

import numpy as np
import pika
import pytest

from fedmq.broker.admin import Admin
from fedmq.broker.client import Client, Delivery
from fedmq.broker.settings import BrokerSettings
from fedmq.broker.topology import Topology
from fedmq.shared import compression, messages
from tests.helpers import (
    Procs,
    assert_ledger_invariant,
    confirmed_updates,
    fedmq_run_ok,
    read_history,
    read_ledger,
    wait_for,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]

COMMON = ["--workers", "4", "--dataset", "digits", "--partition", "iid", "--seed", "2", "--in-process-workers",
          "--display", "plain"]
LAYERS = {"dense_0/W": (64, 64), "dense_0/b": (64,), "dense_1/W": (64, 10), "dense_1/b": (10,)}


def fedmq_run(amqp_url: str, namespace: str, out: Path, *args: str) -> str:
    return fedmq_run_ok(amqp_url, namespace, out, *COMMON, *args)


@pytest.mark.parametrize(("scheme", "mode"), [
    ("int8", ["--mode", "sync", "--rounds", "15"]),
    ("topk:0.1", ["--mode", "async", "--strategy", "fedbuff", "--max-updates", "120"]),
    ("int8", ["--mode", "async", "--strategy", "fedbuff", "--max-updates", "120"]),
], ids=["sync-fedavg-int8", "async-fedbuff-topk", "async-fedbuff-int8"])
def test_a_compressed_run_learns_and_records_its_compression(amqp_url: str, namespace: str, tmp_path: Path,
                                                             scheme: str, mode: list[str]) -> None:
    out = tmp_path / "run"
    fedmq_run(amqp_url, namespace, out, *mode, "--compress", scheme)
    hist = read_history(out)
    assert hist["config"]["compress"] == scheme
    assert hist["final"]["accuracy"] >= 0.9, hist["final"]  # uncompressed, the same runs reach 0.96-0.98
    ledger = read_ledger(out)
    applied = [e for e in ledger if e["fate"] == "applied"]
    assert len(applied) >= 60 and all(e["compression"] == scheme for e in ledger), ledger[:3]


def test_compressed_updates_larger_than_a_chunk_travel_in_chunks(amqp_url: str, namespace: str, tmp_path: Path) -> None:
    hidden = 1024  # 76,810 parameters: an int8 update of ~77 KB, two chunks of 64 KiB
    delta = {"W": np.zeros((64 * hidden + hidden + hidden * 10 + 10,), np.float32)}
    layers = compression.encode_params(delta, compression.parse("int8"))
    assert sum(layer["q"].nbytes for layer in layers.values()) > 65536
    out = tmp_path / "run"
    fedmq_run(amqp_url, namespace, out, "--mode", "sync", "--rounds", "3", "--hidden", str(hidden),
              "--chunk-bytes", "65536", "--compress", "int8")
    ledger = read_ledger(out)
    assert [e["fate"] for e in ledger] == ["applied"] * 12 and {e["compression"] for e in ledger} == {"int8"}
    assert read_history(out)["final"]["rounds"] == 3


@pytest.mark.parametrize(("scheme", "mode", "dtype", "share"), [
    ("int8", ["--mode", "sync", "--rounds", "15"], "bfloat16", 0.55),
    ("none", ["--mode", "async", "--strategy", "fedbuff", "--max-updates", "120"], "bfloat16", 0.55),
    ("int8", ["--mode", "sync", "--rounds", "15"], "int8", 0.3),
], ids=["sync-fedavg-int8", "async-fedbuff-uncompressed", "sync-fedavg-int8-int8-models"])
def test_rounded_models_travel_at_a_fraction_of_their_size_and_the_run_learns(
        amqp_url: str, namespace: str, tmp_path: Path, scheme: str, mode: list[str], dtype: str, share: float) -> None:
    """--model-dtype bfloat16 (int8): every model version on the stream is bfloat16 bits (int8
    blocks), half (a quarter) of the bytes of its float32 form; workers send deltas from it; the
    aggregator's model stays float32."""
    topology = Topology(namespace)
    seen: queue.Queue[Delivery] = queue.Queue()
    watcher = Client(BrokerSettings.from_url(amqp_url), topology, name="watcher")
    watcher.subscribe(topology.models, seen.put, arguments={"x-stream-offset": "first"}, settle_on_return=True)
    out = tmp_path / "run"
    with watcher:
        fedmq_run(amqp_url, namespace, out, *mode, "--compress", scheme, "--model-dtype", dtype)
        first = seen.get(timeout=10)
    hist = read_history(out)
    assert hist["config"]["model_dtype"] == dtype
    assert hist["final"]["accuracy"] >= 0.9, hist["final"]  # float32 models: 0.96-0.98 on the same runs
    model = messages.decode(first.body, expect=messages.ModelVersion)
    assert isinstance(model, messages.ModelVersion) and model.dtype == dtype
    assert all(v.dtype == np.float32 and v.shape == LAYERS[k] for k, v in model.params.items())
    float32_bytes = sum(int(np.prod(s)) * 4 for s in LAYERS.values())
    assert len(first.body) < share * float32_bytes, (len(first.body), float32_bytes)
    ledger = read_ledger(out)
    assert sum(e["fate"] == "applied" for e in ledger) >= 60, ledger[:3]
    with np.load(out / "model.npz") as saved:
        assert all(saved[k].dtype == np.float32 for k in LAYERS)


# ------------------------------------------------------------------ hostile compressed updates


def _publish_raw(url: str, queue: str, body: bytes, message_id: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish("", queue, body, properties=pika.BasicProperties(delivery_mode=2, message_id=message_id),
                         mandatory=True)
    finally:
        conn.close()


def _hostile(scheme: str, run_id: str, task_id: str, tamper: Any = None) -> bytes:
    delta = {k: np.full(s, 0.01, np.float32) for k, s in LAYERS.items()}
    if scheme == "none":
        params: Any = delta
    else:
        params = compression.encode_params(delta, compression.parse(scheme))
        if tamper is not None:
            tamper(params["dense_0/W"])
    return messages.encode(messages.Update(
        task_id=task_id, worker_id="mallory", base_version=0, num_samples=100, params=params, kind="delta",
        train_loss=0.1, train_accuracy=0.9, duration_s=0.1, run_id=run_id, compression=scheme))


def _set(key: str, value: Any) -> Any:
    def tamper(layer: dict[str, Any]) -> None:
        layer[key] = value(layer[key]) if callable(value) else value
    return tamper


def test_malformed_compressed_updates_are_rejected_with_reasons(amqp_url: str, namespace: str, shards: Path,
                                                                procs: Procs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["--amqp-url", amqp_url, "--namespace", namespace]
    trainer = ["--trainer", "tests.trainers:SleepyTrainer"]  # 0.3 s a task: the run outlasts the hostile sends
    procs.start("agg", "aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run), "--mode", "async",
                "--strategy", "fedbuff", "--min-workers", "2", "--max-updates", "40", "--compress", "int8",
                *trainer, *common)
    for i in range(2):
        procs.start(f"w{i}", "worker", "--data", str(shards / f"worker-{i}.npz"), "--worker-id", f"w{i}",
                    "--log-format", "json", *trainer, *common, env={"FEDMQ_TEST_SLEEP_S": "0.3"})
    wait_for(lambda: any(e["fate"] == "applied" for e in read_ledger(run)), 90, "a first applied update")
    run_id = read_history_run_id(run)
    hostile = {
        "int8-minus-128": _hostile("int8", run_id, "evil-1", _set("q", lambda q: np.full_like(q, -128))),
        "int8-negative-scale": _hostile("int8", run_id, "evil-2", _set("scale", lambda s: -s)),
        "int8-nan-scale": _hostile("int8", run_id, "evil-3", _set("scale", lambda s: np.full_like(s, np.nan))),
        "int8-scales-short": _hostile("int8", run_id, "evil-4", _set("scale", lambda s: s[:1])),
        "topk-duplicate-indices": _hostile("topk:0.1", run_id, "evil-5",
                                           _set("indices", lambda i: np.zeros_like(i))),
        "topk-valid-but-not-asked": _hostile("topk:0.1", run_id, "evil-6"),
        "uncompressed": _hostile("none", run_id, "evil-7"),
    }
    topology = Topology(namespace)
    for name, body in hostile.items():
        _publish_raw(amqp_url, topology.updates, body, f"hostile-{name}")
    assert procs.wait("agg", 180) == 0, procs.dump()
    ledger = {e["message_id"]: e for e in read_ledger(run) if str(e.get("message_id")).startswith("hostile-")}
    assert set(ledger) == {f"hostile-{n}" for n in hostile}
    reasons = {name[len("hostile-"):]: e["reason"] for name, e in ledger.items()}
    assert all(e["fate"] == "rejected" for e in ledger.values()), ledger
    assert "-128" in reasons["int8-minus-128"]
    assert "scale" in reasons["int8-negative-scale"]
    assert "NaN" in reasons["int8-nan-scale"]
    assert "scales" in reasons["int8-scales-short"]
    assert "strictly increasing" in reasons["topk-duplicate-indices"]
    assert "compressed with topk:0.1, this run asked for int8" in reasons["topk-valid-but-not-asked"]
    assert "compressed with none, this run asked for int8" in reasons["uncompressed"]
    with Admin(BrokerSettings.from_url(amqp_url), topology) as admin:
        dead = {d.message_id for d in admin.dead_letters()}
    assert {f"hostile-{n}" for n in hostile} <= dead
    hist = read_history(run)
    assert hist["final"]["updates_applied"] >= 40
    confirmed = [c for name in procs.procs if name.startswith("w") for c in confirmed_updates(procs.log(name))]
    assert_ledger_invariant(run, confirmed)


def read_history_run_id(run: Path) -> str:
    """The run's id, from history.json (written once the first version is evaluated)."""
    wait_for(lambda: (run / "history.json").exists(), 30, "history.json")
    return str(read_history(run)["run_id"])
