"""Fault injection against a real broker: killed workers, a killed aggregator, a restarted
broker, hostile messages and a trainer that always fails. Every test ends with the ledger
invariant: each update the broker confirmed is in updates.jsonl with a fate, and no task id
is applied twice. Tests that stop the broker run on a private node of their own.
"""

from __future__ import annotations

import queue
import signal
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pika
import pytest

from fedmq.broker.admin import Admin
from fedmq.broker.client import Client, Delivery
from fedmq.broker.provision import PrivateNode
from fedmq.broker.settings import BrokerSettings
from fedmq.broker.topology import Topology
from fedmq.shared import messages
from tests.conftest import delete_namespace, new_namespace
from tests.helpers import (
    REPO,
    Procs,
    assert_ledger_invariant,
    confirmed_updates,
    events_in,
    history_len,
    read_history,
    read_ledger,
    wait_for,
)

pytestmark = [pytest.mark.broker, pytest.mark.fault, pytest.mark.slow]

WORKERS = 4


def worker(procs: Procs, shards: Path, i: int, common: list[str], *extra: str, env: dict[str, str] | None = None, name: str | None = None) -> None:
    procs.start(name or f"w{i}", "worker", "--data", str(shards / f"worker-{i}.npz"), "--worker-id", f"w{i}",
                "--log-format", "json", *extra, *common, env=env)


def start_crashing_worker(procs: Procs, shards: Path, i: int, common: list[str], crash_at: str) -> None:
    """Worker ``w<i>`` as ``python -m tests.crashing_worker``: it SIGKILLs itself at ``crash_at``.

    Registered with ``procs`` like any fedmq process (its log, kill and wait work the same).
    """
    name = f"w{i}"
    with open(procs.logs / f"{name}.log", "ab") as log:
        procs.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "tests.crashing_worker", "--crash-at", crash_at,
             "--data", str(shards / f"worker-{i}.npz"), "--worker-id", name, "--log-format", "json", *common],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, stdin=subprocess.DEVNULL, start_new_session=True,
        )


def all_confirmed(procs: Procs, prefix: str = "w") -> list[dict]:
    return [c for name in procs.procs if name.startswith(prefix) for c in confirmed_updates(procs.log(name))]


def started_tasks(log_text: str) -> list[str]:
    import json

    out = []
    for line in log_text.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("event") == "task_started":
            out.append(doc["task_id"])
    return out


# ---------------------------------------------------------------------------------- 1
def test_worker_killed_mid_task_its_task_is_redelivered_and_applied_once(amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["--amqp-url", amqp_url, "--namespace", namespace]
    procs.start("agg", "aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run), "--mode", "async",
                "--strategy", "fedasync", "--min-workers", "4", "--max-updates", "30", *common)
    worker(procs, shards, 0, common, "--trainer", "tests.trainers:SleepyTrainer", env={"FEDMQ_TEST_SLEEP_S": "30"})
    for i in range(1, WORKERS):
        worker(procs, shards, i, common)
    victim_task = wait_for(lambda: started_tasks(procs.log("w0")), 60, "w0 to start a task")[0]
    procs.kill("w0")
    assert procs.wait("agg", 120) == 0, procs.dump()
    ledger = assert_ledger_invariant(run, all_confirmed(procs))
    fates = [e for e in ledger if e.get("task_id") == victim_task]
    assert [e["fate"] for e in fates] == ["applied"], fates
    assert fates[0]["worker_id"] != "w0"


# ---------------------------------------------------------------------------------- 2
def test_worker_killed_between_confirm_and_ack_duplicate_is_not_applied(amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["--amqp-url", amqp_url, "--namespace", namespace]
    procs.start("agg", "aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run), "--mode", "async",
                "--strategy", "fedbuff", "--buffer-size", "2", "--min-workers", "4", "--max-updates", "30", *common)
    start_crashing_worker(procs, shards, 0, common, crash_at="update_confirmed")
    for i in range(1, WORKERS):
        worker(procs, shards, i, common)
    assert procs.wait("w0", 60) == -signal.SIGKILL, procs.log("w0")
    first = confirmed_updates(procs.log("w0"))
    assert len(first) == 1  # confirmed by the broker, never acked
    assert procs.wait("agg", 120) == 0, procs.dump()
    ledger = assert_ledger_invariant(run, all_confirmed(procs))
    task = first[0]["task_id"]
    fates = Counter(e["fate"] for e in ledger if e.get("task_id") == task)
    assert fates["applied"] == 1 and fates["duplicate"] >= 1, (task, fates)
    assert read_history(run)["final"]["updates_duplicate"] >= 1


# ---------------------------------------------------------------------------------- 3
SYNC = ["--mode", "sync", "--rounds", "10", "--workers-per-round", "4", "--min-workers", "4", "--seed", "7",
        "--checkpoint-every", "1"]


def _sync_run(amqp_url: str, shards: Path, procs: Procs, run: Path, prefix: str, faults: bool,
              agg_extra: tuple[str, ...] = (), worker_extra: tuple[str, ...] = ()) -> None:
    ns = new_namespace(prefix)
    common = ["--amqp-url", amqp_url, "--namespace", ns]
    agg_args = ["aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run), *SYNC, *agg_extra, *common]
    try:
        procs.start(f"{prefix}-agg", *agg_args)
        for i in range(WORKERS):
            worker(procs, shards, i, common, *worker_extra, name=f"w{prefix}{i}")
        if faults:
            wait_for(lambda: history_len(run) >= 3, 60, "round 3")
            procs.kill(f"{prefix}-agg")
            procs.start(f"{prefix}-agg2", *agg_args, "--resume")
            wait_for(lambda: history_len(run) >= 6, 60, "round 6 after the resume")
            procs.kill(f"w{prefix}1")
            worker(procs, shards, 1, common, *worker_extra, name=f"w{prefix}1b")
            assert procs.wait(f"{prefix}-agg2", 120) == 0, procs.dump()
        else:
            assert procs.wait(f"{prefix}-agg", 120) == 0, procs.dump()
    finally:
        delete_namespace(amqp_url, ns)


def test_sync_run_killed_aggregator_and_worker_is_bit_identical(amqp_url: str, shards: Path, procs: Procs, tmp_path: Path) -> None:
    ref, faulty = tmp_path / "ref", tmp_path / "faulty"
    _sync_run(amqp_url, shards, procs, ref, "ref", faults=False)
    _sync_run(amqp_url, shards, procs, faulty, "flt", faults=True)
    with np.load(ref / "model.npz", allow_pickle=False) as a, np.load(faulty / "model.npz", allow_pickle=False) as b:
        assert a.files == b.files
        for k in a.files:
            assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), f"{k} differs"
    h_ref, h_flt = read_history(ref), read_history(faulty)
    assert [h["accuracy"] for h in h_ref["history"]] == [h["accuracy"] for h in h_flt["history"]]
    assert h_flt["final"]["version"] == h_ref["final"]["version"] == 10
    assert_ledger_invariant(faulty, all_confirmed(procs, "wflt"))


def test_async_run_killed_aggregator_resumes_without_double_apply(amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["--amqp-url", amqp_url, "--namespace", namespace]
    agg = ["aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run), "--mode", "async", "--strategy",
           "fedbuff", "--buffer-size", "3", "--min-workers", "4", "--max-updates", "60", "--checkpoint-every", "4", *common]
    procs.start("agg", *agg)
    for i in range(WORKERS):
        worker(procs, shards, i, common, "--slowdown", "5")
    wait_for(lambda: history_len(run) >= 4, 60, "four versions")
    procs.kill("agg")
    before = read_history(run)["final"]["version"]
    procs.start("agg2", *agg, "--resume")
    assert procs.wait("agg2", 120) == 0, procs.dump()
    hist = read_history(run)
    assert hist["final"]["updates_applied"] >= 60
    assert hist["final"]["version"] > before
    versions = [h["version"] for h in hist["history"]]
    assert versions == sorted(set(versions)), "version numbers repeated or out of order after the resume"
    assert_ledger_invariant(run, all_confirmed(procs))


# ---------------------------------------------------------------------------------- 4
def test_broker_restart_mid_run(private_broker: PrivateNode, shards: Path, procs: Procs, tmp_path: Path) -> None:
    url = private_broker.url
    ns = new_namespace("restart")
    run = tmp_path / "run"
    common = ["--amqp-url", url, "--namespace", ns]
    procs.start("agg", "aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run), "--mode", "async",
                "--strategy", "fedbuff", "--buffer-size", "2", "--min-workers", "4", "--max-updates", "400",
                "--concurrency", "8", *common)
    for i in range(WORKERS):
        worker(procs, shards, i, common, "--slowdown", "10")
    wait_for(lambda: history_len(run) >= 3, 60, "three versions")
    # a dead letter too, so that every queue holds something when the broker goes down
    _publish_raw(url, Topology(ns).updates, b"not msgpack", "poison-1")
    wait_for(lambda: any(e["fate"] == "rejected" for e in read_ledger(run)), 30, "the poison message to be rejected")
    private_broker.stop()
    private_broker.start()
    assert procs.wait("agg", 180) == 0, procs.dump()
    for i in range(WORKERS):
        assert procs.wait(f"w{i}", 60) == 0, procs.log(f"w{i}")
    assert any("reconnected" in procs.log(n) for n in procs.procs), "nobody reconnected: was the broker restarted?"
    assert read_history(run)["final"]["updates_applied"] >= 400
    assert_ledger_invariant(run, all_confirmed(procs))
    with Admin(BrokerSettings.from_url(url), Topology(ns)) as admin:
        dead = admin.dead_letters()
    assert any(d.message_id == "poison-1" for d in dead), "a confirmed dead letter was lost in the restart"


# ---------------------------------------------------------------------------------- 5
def _publish_raw(url: str, queue: str, body: bytes, message_id: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish("", queue, body, properties=pika.BasicProperties(delivery_mode=2, message_id=message_id), mandatory=True)
    finally:
        conn.close()


def _update(params: dict[str, np.ndarray], task_id: str, base_version: int = 0, run_id: str = "") -> messages.Update:
    return messages.Update(task_id=task_id, worker_id="mallory", base_version=base_version, num_samples=100, params=params,
                           kind="weights", train_loss=0.1, train_accuracy=0.9, duration_s=0.1, run_id=run_id)


def _current_run(amqp_url: str, topology: Topology) -> str:
    """The run id of the newest model on the namespace's model stream (what any worker reads)."""
    got: queue.Queue[str] = queue.Queue()

    def on_model(delivery: Delivery) -> None:
        msg = messages.decode(delivery.body, expect=messages.ModelVersion)
        assert isinstance(msg, messages.ModelVersion)
        got.put(msg.run_id)

    client = Client(BrokerSettings.from_url(amqp_url), topology, declare=False)
    client.subscribe(topology.models, on_model, arguments={"x-stream-offset": "last"}, settle_on_return=True)
    with client:
        return got.get(timeout=30)


def test_hostile_updates_are_rejected_with_reasons(amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["--amqp-url", amqp_url, "--namespace", namespace]
    procs.start("agg", "aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run), "--mode", "async",
                "--strategy", "fedasync", "--min-workers", "4", "--target-accuracy", "0.9", "--time-limit", "120", *common)
    for i in range(WORKERS):
        worker(procs, shards, i, common, "--slowdown", "20")  # a run long enough to see every hostile message
    wait_for(lambda: any(e["fate"] == "applied" for e in read_ledger(run)), 60, "a first applied update")
    applied = next(e for e in read_ledger(run) if e["fate"] == "applied")
    run_id = _current_run(amqp_url, Topology(namespace))  # hostile, but knowing the run: checked on content
    good = {"dense_0/W": np.zeros((64, 64), np.float32), "dense_0/b": np.zeros(64, np.float32),
            "dense_1/W": np.zeros((64, 10), np.float32), "dense_1/b": np.zeros(10, np.float32)}
    wrong_shape = {**good, "dense_1/W": np.zeros((64, 9), np.float32)}
    marked = {**good, "dense_0/b": np.full(64, 1.25, np.float32)}
    nan_body = messages.encode(_update(marked, "evil-nan", run_id=run_id))
    at = nan_body.index(struct.pack("<f", 1.25) * 64)
    nan_body = nan_body[:at] + struct.pack("<f", float("nan")) + nan_body[at + 4:]
    hostile = {
        "corrupt": b"\x93\xc1\xff garbage",
        "shape": messages.encode(_update(wrong_shape, "evil-shape", run_id=run_id)),
        "nan": nan_body,
        "oversize": b"\x00" * 2_000_000,
        "future": messages.encode(_update(good, "evil-future", base_version=10**6, run_id=run_id)),
        "replay": messages.encode(_update(good, applied["task_id"], base_version=applied["base_version"], run_id=run_id)),
    }
    updates_queue = Topology(namespace).updates
    for name, body in hostile.items():
        _publish_raw(amqp_url, updates_queue, body, f"hostile-{name}")
    assert procs.wait("agg", 150) == 0, procs.dump()
    hist = read_history(run)
    assert hist["final"]["reached_target"], hist["final"]
    ledger = {e["message_id"]: e for e in read_ledger(run) if str(e.get("message_id")).startswith("hostile-")}
    assert set(ledger) == {f"hostile-{n}" for n in hostile}
    expect = {"corrupt": "rejected", "shape": "rejected", "nan": "rejected", "oversize": "rejected", "future": "rejected",
              "replay": "duplicate"}
    for name, fate in expect.items():
        assert ledger[f"hostile-{name}"]["fate"] == fate, ledger[f"hostile-{name}"]
    assert "shape" in ledger["hostile-shape"]["reason"] and "(64, 9)" in ledger["hostile-shape"]["reason"]
    assert "finite" in ledger["hostile-nan"]["reason"].lower() or "nan" in ledger["hostile-nan"]["reason"].lower()
    assert "over the limit" in ledger["hostile-oversize"]["reason"]
    assert "newer than the current version" in ledger["hostile-future"]["reason"]
    assert hist["final"]["updates_rejected"] >= 5 and hist["final"]["updates_duplicate"] >= 1
    with Admin(BrokerSettings.from_url(amqp_url), Topology(namespace)) as admin:
        dead = {d.message_id: d for d in admin.dead_letters()}
    for name in ("corrupt", "shape", "nan", "oversize", "future"):
        assert f"hostile-{name}" in dead and dead[f"hostile-{name}"].detail, name
    assert_ledger_invariant(run, all_confirmed(procs))


# ---------------------------------------------------------------------------------- 6
def _failed_tasks_dead_lettered(amqp_url: str, topology: Topology, failed_task_ids: set[str] | None = None) -> list:
    """Dead-lettered tasks (only those of ``failed_task_ids`` when given): reported tasks must be acked."""
    with Admin(BrokerSettings.from_url(amqp_url), topology) as admin:
        return [d for d in admin.dead_letters() if d.queue == topology.tasks_dlq
                and (failed_task_ids is None or d.message_id in failed_task_ids)]


def test_a_failing_trainer_is_reported_and_its_work_reissued(amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path) -> None:
    """docs/protocol.md, failure reports: the worker reports and acks; the aggregator, not the
    broker's delivery limit, records the failure and issues the work again."""
    run = tmp_path / "run"
    common = ["--amqp-url", amqp_url, "--namespace", namespace]
    topology = Topology(namespace)
    procs.start("agg", "aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run), "--mode", "async",
                "--strategy", "fedasync", "--min-workers", "4", "--concurrency", "4", "--max-updates", "40",
                "--task-timeout", "30", *common)
    worker(procs, shards, 1, common, "--trainer", "tests.trainers:FailingTrainer", "--failure-backoff", "0.02")
    for i in (0, 2, 3):
        worker(procs, shards, i, common)
    assert procs.wait("agg", 150) == 0, procs.dump()
    ledger = assert_ledger_invariant(run, all_confirmed(procs))
    failed = [e for e in ledger if e["fate"] == "failed"]
    assert failed and all(e["worker_id"] == "w1" and "this trainer always fails" in e["reason"] for e in failed), failed
    assert all(e["worker_id"] != "w1" for e in ledger if e["fate"] == "applied")
    assert read_history(run)["final"]["updates_applied"] >= 40
    reports = events_in(procs.log("w1"), "task_failed")
    assert reports and len(failed) <= len(reports)
    assert not _failed_tasks_dead_lettered(amqp_url, topology, {e["task_id"] for e in failed})  # acked after the report


def test_a_run_where_every_task_fails_stops_with_the_reason(amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["--amqp-url", amqp_url, "--namespace", namespace]
    topology = Topology(namespace)
    procs.start("agg", "aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run), "--mode", "async",
                "--strategy", "fedasync", "--min-workers", "1", "--concurrency", "2", "--max-updates", "40",
                "--task-timeout", "30", *common)
    worker(procs, shards, 1, common, "--trainer", "tests.trainers:FailingTrainer", "--failure-backoff", "0.02")
    assert procs.wait("agg", 120) == 1, procs.dump()
    assert "this trainer always fails" in procs.log("agg")
    assert [e["fate"] for e in read_ledger(run)] and all(e["fate"] == "failed" for e in read_ledger(run))
    assert not _failed_tasks_dead_lettered(amqp_url, topology)


# ---------------------------------------------------------------------------------- SIGTERM
def test_sigterm_mid_task_finishes_the_task_and_exits_cleanly(amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["--amqp-url", amqp_url, "--namespace", namespace]
    procs.start("agg", "aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run), "--mode", "async",
                "--strategy", "fedasync", "--min-workers", "1", "--max-updates", "20", *common)
    worker(procs, shards, 0, common, "--trainer", "tests.trainers:SleepyTrainer", env={"FEDMQ_TEST_SLEEP_S": "3"})
    task = wait_for(lambda: started_tasks(procs.log("w0")), 60, "w0 to start a task")[0]
    procs.kill("w0", signal.SIGTERM)
    assert procs.wait("w0", 30) == 0, procs.log("w0")
    assert [c["task_id"] for c in confirmed_updates(procs.log("w0"))] == [task]  # finished, not lost
    for i in (1, 2):
        worker(procs, shards, i, common)
    assert procs.wait("agg", 120) == 0, procs.dump()
    ledger = assert_ledger_invariant(run, all_confirmed(procs))
    assert [e["fate"] for e in ledger if e.get("task_id") == task] == ["applied"]
