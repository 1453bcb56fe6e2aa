"""End to end: an aggregator and worker processes train digits together over RabbitMQ."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import (
    Procs,
    assert_ledger_invariant,
    confirmed_updates,
    history_len,
    read_history,
    read_ledger,
    wait_for,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]

WORKERS = 4


def start_workers(procs: Procs, shards: Path, common: list[str], n: int = WORKERS, extra: dict[int, list[str]] | None = None) -> None:
    for i in range(n):
        procs.start(f"w{i}", "worker", "--data", str(shards / f"worker-{i}.npz"), "--worker-id", f"w{i}",
                    "--log-format", "json", *(extra or {}).get(i, []), *common)


@pytest.mark.parametrize(
    "mode_args",
    [
        ["--mode", "sync", "--strategy", "fedavg", "--workers-per-round", "4", "--min-workers", "4"],
        ["--mode", "async", "--strategy", "fedasync", "--mixing", "0.6", "--min-workers", "4"],
        ["--mode", "async", "--strategy", "fedbuff", "--buffer-size", "2", "--min-workers", "4"],
    ],
    ids=["fedavg", "fedasync", "fedbuff"],
)
def test_federation_reaches_90_percent(amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path, mode_args: list[str]) -> None:
    run = tmp_path / "run"
    common = ["--amqp-url", amqp_url, "--namespace", namespace]
    procs.start("agg", "aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run),
                "--target-accuracy", "0.9", "--time-limit", "120", *mode_args, *common)
    start_workers(procs, shards, common)
    code = procs.wait("agg", 150)
    assert code == 0, procs.dump()
    hist = read_history(run)
    assert hist["final"]["reached_target"], hist["final"]
    assert hist["final"]["accuracy"] >= 0.9
    for entry in hist["history"]:
        assert {"version", "time_s", "accuracy", "loss", "updates_applied", "staleness_mean"} <= set(entry)
    for i in range(WORKERS):
        assert procs.wait(f"w{i}", 30) == 0, procs.log(f"w{i}")
    confirmed = [c for i in range(WORKERS) for c in confirmed_updates(procs.log(f"w{i}"))]
    ledger = assert_ledger_invariant(run, confirmed)
    applied = [e for e in ledger if e["fate"] == "applied"]
    assert len(applied) == hist["final"]["updates_applied"]
    assert {e["worker_id"] for e in applied} == {f"w{i}" for i in range(WORKERS)}
    with np.load(run / "model.npz", allow_pickle=False) as z:
        assert set(z.files) == {"dense_0/W", "dense_0/b", "dense_1/W", "dense_1/b"}


def test_late_worker_joins_and_contributes(amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["--amqp-url", amqp_url, "--namespace", namespace]
    procs.start("agg", "aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run),
                "--mode", "async", "--strategy", "fedasync", "--min-workers", "2", "--max-updates", "40",
                "--checkpoint-every", "1", *common)
    # slow early workers: the run is still young when the late one arrives
    start_workers(procs, shards, common, n=2, extra={0: ["--slowdown", "30"], 1: ["--slowdown", "30"]})
    wait_for(lambda: history_len(run) >= 5, 60, "five versions before the late worker starts")
    procs.start("w3", "worker", "--data", str(shards / "worker-3.npz"), "--worker-id", "w3", "--log-format", "json", *common)
    assert procs.wait("agg", 120) == 0, procs.dump()
    applied = [e for e in read_ledger(run) if e["fate"] == "applied"]
    late = [e for e in applied if e["worker_id"] == "w3"]
    assert late, "the late worker's updates were not applied"
    assert min(e["version"] for e in late) >= 5


def test_killed_worker_does_not_stall_the_run(amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["--amqp-url", amqp_url, "--namespace", namespace]
    procs.start("agg", "aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run),
                "--mode", "async", "--strategy", "fedbuff", "--buffer-size", "2", "--min-workers", "4",
                "--max-updates", "40", *common)
    # w0 is slow, so a SIGKILL lands while it trains
    start_workers(procs, shards, common, extra={0: ["--slowdown", "200"]})
    wait_for(lambda: "task a" in procs.log("w0") or history_len(run) >= 2, 60, "the run to start")
    wait_for(lambda: history_len(run) >= 2, 60, "two versions")
    procs.kill("w0")
    assert procs.wait("agg", 120) == 0, procs.dump()
    hist = read_history(run)
    assert hist["final"]["updates_applied"] >= 40
    confirmed = [c for i in range(1, WORKERS) for c in confirmed_updates(procs.log(f"w{i}"))]
    assert_ledger_invariant(run, confirmed)


def test_long_task_survives_short_heartbeat(amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path) -> None:
    """A task that trains for several AMQP heartbeat intervals keeps its connection."""
    run = tmp_path / "run"
    common = ["--amqp-url", amqp_url, "--namespace", namespace]
    # the model names its trainer (spec["trainer"]) and a worker refuses a model for another one
    procs.start("agg", "aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run),
                "--mode", "sync", "--rounds", "2", "--min-workers", "1", "--workers-per-round", "1",
                "--trainer", "tests.trainers:SleepyTrainer", *common)
    # each fit blocks for 4 s, four intervals of a 1 s AMQP heartbeat
    procs.start("w0", "worker", "--data", str(shards / "worker-0.npz"), "--worker-id", "w0", "--log-format", "json",
                "--amqp-heartbeat", "1", "--trainer", "tests.trainers:SleepyTrainer", *common,
                env={"FEDMQ_TEST_SLEEP_S": "4"})
    assert procs.wait("agg", 120) == 0, procs.dump()
    log = procs.log("w0")
    assert "lost the connection" not in log, log
    assert len(confirmed_updates(log)) == 2
    assert procs.wait("w0", 30) == 0
    assert read_history(run)["final"]["updates_applied"] == 2


def test_worker_trusting_the_aggregator_ignores_forged_models_and_tasks(amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path) -> None:
    import pika

    from fedmq.broker.admin import Admin
    from fedmq.broker.settings import BrokerSettings
    from fedmq.broker.topology import Topology
    from fedmq.shared import messages

    topology = Topology(namespace)
    with Admin(BrokerSettings.from_url(amqp_url), topology) as admin:
        admin.setup()
    forged_params = {"dense_0/W": np.zeros((64, 64), np.float32), "dense_0/b": np.zeros(64, np.float32),
                     "dense_1/W": np.zeros((64, 10), np.float32), "dense_1/b": np.zeros(10, np.float32)}
    forged_model = messages.ModelVersion(version=999, params=forged_params, spec={"input_dim": 64, "num_classes": 10})
    forged_task = messages.Task(task_id="forged-1", version=None, mode="async", epochs=1, batch_size=32, lr=0.1, mu=0.0, seed=1)
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    ch.confirm_delivery()
    props = pika.BasicProperties(delivery_mode=2, headers={"x-fedmq-version": 999}, message_id="forged-model")
    ch.basic_publish("", topology.models, messages.encode(forged_model), properties=props, mandatory=True)
    ch.basic_publish("", topology.tasks, messages.encode(forged_task),
                     properties=pika.BasicProperties(delivery_mode=2, message_id="forged-1"), mandatory=True)
    conn.close()
    run = tmp_path / "run"
    common = ["--amqp-url", amqp_url, "--namespace", namespace]
    procs.start("w0", "worker", "--data", str(shards / "worker-0.npz"), "--worker-id", "w0", "--trust-user", "guest",
                "--log-format", "json", *common)
    procs.start("agg", "aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run), "--mode", "async",
                "--strategy", "fedasync", "--max-updates", "10", *common)
    assert procs.wait("agg", 90) == 0, procs.dump()
    ledger = read_ledger(run)
    assert sum(e["fate"] == "applied" for e in ledger) >= 10
    assert not any(e["fate"] == "rejected" for e in ledger), "the worker trained on the forged model"
    with Admin(BrokerSettings.from_url(amqp_url), topology) as admin:
        dead = admin.dead_letters()
    assert [d.message_id for d in dead if d.queue == topology.tasks_dlq] == ["forged-1"]


def test_a_sync_run_writes_one_checkpoint_per_round(amqp_url: str, namespace: str, shards: Path, procs: Procs,
                                                    tmp_path: Path) -> None:
    """history.json is rewritten at most once a second; a write put off until its time came used
    to take a whole checkpoint (the model, the ledger, three fsyncs) with nothing new to make
    durable, in the middle of the next round: in a run of rounds under a second, about once a
    second. Now every checkpoint but the one the aggregator takes as it leaves acks a round's
    updates, and history.json is still complete at the end."""
    run = tmp_path / "run"
    common = ["--amqp-url", amqp_url, "--namespace", namespace]
    procs.start("agg", "aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run), "--mode", "sync",
                "--rounds", "80", "--min-workers", "2", "--workers-per-round", "2", "--log-format", "json",
                "--log-level", "debug", *common)
    start_workers(procs, shards, common, n=2)
    assert procs.wait("agg", 240) == 0, procs.dump()
    hist = read_history(run)
    assert hist["final"]["rounds"] == 80 and hist["history_complete"]
    assert hist["final"]["time_s"] > 2.0, "rounds of a second or more never owe a history.json write"
    written = procs.events("agg", "checkpoint_written")
    idle = [e["version"] for e in written[:-1] if e["acked"] == 0]  # the last: the aggregator leaves
    assert idle == [], f"{len(idle)} of {len(written)} checkpoints made nothing durable (at versions {idle})"
    assert len(written) <= 80 + 1, len(written)
