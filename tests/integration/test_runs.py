"""End to end: run identity, failures that surface, only issued work counting, the join grace.

Real ``fedmq aggregator`` and ``fedmq worker`` processes against a real broker; what happened
is read from the run directory and the processes' events (``--log-format json``).
"""

from __future__ import annotations

import queue
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmq.broker.client import Client, Delivery
from fedmq.broker.settings import BrokerSettings
from fedmq.broker.topology import RUN_HEADER, VERSION_HEADER, Topology
from fedmq.rundir import events_in
from fedmq.shared import messages
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

SYNC = ["--mode", "sync", "--strategy", "fedavg"]
ASYNC = ["--mode", "async", "--strategy", "fedasync", "--mixing", "0.6"]


def common(amqp_url: str, namespace: str) -> list[str]:
    return ["--amqp-url", amqp_url, "--namespace", namespace]


def start_aggregator(procs: Procs, name: str, shards: Path, run: Path, *args: str) -> None:
    procs.start(name, "aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run), "--log-format", "json",
                *args)


def start_worker(procs: Procs, name: str, shards: Path, i: int, *args: str) -> None:
    procs.start(name, "worker", "--data", str(shards / f"worker-{i}.npz"), "--worker-id", f"w{i}", "--log-format",
                "json", *args)


def all_confirmed(procs: Procs, names: list[str]) -> list[dict[str, Any]]:
    return [c for n in names for c in confirmed_updates(procs.log(n))]


@pytest.mark.parametrize("mode_args", [SYNC, ASYNC], ids=["sync", "async"])
def test_two_runs_in_a_row_on_one_namespace_both_reach_their_target(
    amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path, mode_args: list[str]
) -> None:
    """The second run's workers read the first run's models on the stream; they must follow the
    run that issues their tasks (docs/protocol.md), and the first run's leftovers are stale."""
    ns = common(amqp_url, namespace)
    run_ids = []
    for attempt in (1, 2):
        run = tmp_path / f"run{attempt}"
        start_aggregator(procs, f"agg{attempt}", shards, run, "--target-accuracy", "0.85", "--time-limit", "120",
                         "--min-workers", "4", *mode_args, *ns)
        workers = [f"r{attempt}w{i}" for i in range(4)]
        for i, name in enumerate(workers):
            start_worker(procs, name, shards, i, *ns)
        assert procs.wait(f"agg{attempt}", 150) == 0, procs.dump()
        hist = read_history(run)
        assert hist["final"]["reached_target"], (attempt, hist["final"])
        run_ids.append(hist.get("run_id"))
        for name in workers:
            assert procs.wait(name, 30) == 0, procs.log(name)
        ledger = assert_ledger_invariant(run, all_confirmed(procs, workers))
        # every worker answered this run's tasks (none stuck on the other run's models); whether its
        # answer was applied or came after the target was reached (late) depends on the machine's speed
        answered = [e for e in ledger if e["fate"] in ("applied", "late")]
        assert {e["worker_id"] for e in answered} == {f"w{i}" for i in range(4)}
        assert len({e["worker_id"] for e in ledger if e["fate"] == "applied"}) >= 2
        assert not [e for e in ledger if e["fate"] == "rejected"], [e for e in ledger if e["fate"] == "rejected"][:3]
        other_run = [e["reason"] for e in ledger if e["fate"] == "stale" and e["reason"].startswith("from run")]
        assert all(r == f"from run {run_ids[0]}; this run is {run_ids[-1]}" for r in other_run), other_run
    assert None not in run_ids and run_ids[0] != run_ids[1]


@pytest.mark.parametrize("mode_args", [SYNC, ASYNC], ids=["sync", "async"])
def test_a_trainer_that_always_fails_ends_the_run_with_exit_1(
    amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path, mode_args: list[str]
) -> None:
    """Workers report their trainer's error; the aggregator retries, then gives up naming it."""
    ns = common(amqp_url, namespace)
    run = tmp_path / "run"
    # the aggregator keeps the default trainer; FailingTrainer derives from it, so the workers join
    start_aggregator(procs, "agg", shards, run, "--min-workers", "2", "--time-limit", "90", *mode_args, *ns)
    for i in range(2):
        start_worker(procs, f"w{i}", shards, i, "--failure-backoff", "0.1", "--trainer", "tests.trainers:FailingTrainer",
                     *ns)
    assert procs.wait("agg", 120) == 1, procs.dump()
    log = procs.log("agg")
    last = log.strip().splitlines()[-1]
    assert "failed" in last and "RuntimeError: this trainer always fails" in last, last
    hist = read_history(run)
    assert "this trainer always fails" in hist["failure"] and hist["final"]["finished"] is True
    assert hist["final"]["time_s"] < 90  # it gave up; the time limit did not end it
    ledger = read_ledger(run)
    failed = [e for e in ledger if e["fate"] == "failed"]
    assert failed and all("this trainer always fails" in e["reason"] for e in failed)
    assert hist["counts"]["failed"] == len(failed) and not [e for e in ledger if e["fate"] == "applied"]
    assert sum(w["failures"] for w in hist["workers"].values()) == len(failed)
    assert [e for e in procs.events("agg", "update_settled") if e["fate"] == "failed"]
    for i in range(2):  # told to stop
        assert procs.wait(f"w{i}", 30) == 0, procs.log(f"w{i}")


def forge(topology: Topology, amqp_url: str, bodies: dict[str, bytes]) -> None:
    client = Client(BrokerSettings.from_url(amqp_url), topology, name="forger").start()
    try:
        for message_id, body in bodies.items():
            client.publish(topology.updates, body, message_id=message_id, timeout=10)
    finally:
        client.close()


@pytest.mark.parametrize("mode_args", [SYNC, ASYNC], ids=["sync", "async"])
def test_forged_updates_for_tasks_never_issued_are_rejected(
    amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path, mode_args: list[str]
) -> None:
    """Well-formed updates of the right run and model, for task ids the run never issued (one a
    replay of a real update under a new id), are rejected; the run reaches its target."""
    ns = common(amqp_url, namespace)
    run = tmp_path / "run"
    start_aggregator(procs, "agg", shards, run, "--target-accuracy", "0.9", "--time-limit", "120",
                     "--min-workers", "4", *mode_args, *ns)
    workers = [f"w{i}" for i in range(4)]
    for i, name in enumerate(workers):
        start_worker(procs, name, shards, i, "--slowdown", "20", *ns)  # a run long enough to forge into
    wait_for(lambda: history_len(run) >= 1, 90, "a first version")
    hist = read_history(run)
    run_id, version = hist["run_id"], hist["final"]["version"]
    real = next(e for e in read_ledger(run) if e["fate"] == "applied")
    sync = mode_args == SYNC
    round_ = hist["final"]["rounds"] + 1 if sync else None
    rng = np.random.default_rng(1)
    poison = {k: rng.normal(0, 5, s).astype(np.float32) for k, s in
              {"dense_0/W": (64, 64), "dense_0/b": (64,), "dense_1/W": (64, 10), "dense_1/b": (10,)}.items()}

    def update(task_id: str, worker: str = "mallory", ahead: int = 0) -> bytes:
        return messages.encode(messages.Update(
            task_id=task_id, worker_id=worker, base_version=version, num_samples=10_000, params=poison,
            kind="weights", train_loss=0.1, train_accuracy=0.99, duration_s=0.1,
            round=None if round_ is None else round_ + ahead, run_id=run_id))

    forged = {
        "forged-garbage": update("forged-1"),
        "forged-replay": update(f"{real['task_id']}-again", real["worker_id"]),
        "forged-future": update(f"r{(round_ or 0) + 50:05d}:mallory", ahead=50) if sync else update("a999999-zzzzzz"),
        "forged-failure": messages.encode(messages.Control(
            kind="failed", worker_id="mallory", run_id=run_id, info={"task_id": "forged-2", "reason": "lies"})),
    }
    forge(Topology(namespace), amqp_url, forged)
    assert procs.wait("agg", 150) == 0, procs.dump()
    hist = read_history(run)
    assert hist["final"]["reached_target"], hist["final"]
    ledger = {e["message_id"]: e for e in read_ledger(run) if str(e.get("message_id")).startswith("forged-")}
    assert set(ledger) == set(forged)
    for entry in ledger.values():
        assert entry["fate"] == "rejected", entry
        assert "never issued" in entry["reason"] or "has not started" in entry["reason"], entry
    assert "mallory" not in hist["workers"]
    for name in workers:
        assert procs.wait(name, 30) == 0, procs.log(name)
    assert_ledger_invariant(run, all_confirmed(procs, workers))


@pytest.mark.parametrize("mode_args", [SYNC, ASYNC], ids=["sync", "async"])
def test_junk_and_far_ahead_models_on_the_stream_mid_run_stop_no_worker(
    amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path, mode_args: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model message of random bytes with believable headers, and a valid model of the run claiming
    version 10^6, published mid-run: every worker keeps running, one started afterwards (which reads
    the forged version first) takes part, and the run reaches its target."""
    ns = common(amqp_url, namespace)
    run = tmp_path / "run"
    # every task takes 2 s whatever the machine's speed, so the run is still going when w3 joins
    monkeypatch.setenv("FEDMQ_TEST_SLEEP_S", "2")
    trainer = ["--trainer", "tests.trainers:SleepyTrainer"]
    start_aggregator(procs, "agg", shards, run, "--target-accuracy", "0.9", "--time-limit", "150",
                     "--min-workers", "3", "--join-grace", "0", *trainer, *mode_args, *ns)
    for i in range(3):
        start_worker(procs, f"w{i}", shards, i, *trainer, *ns)
    wait_for(lambda: history_len(run) >= 1, 90, "a first version")
    hist = read_history(run)
    run_id, spec = hist["run_id"], hist["spec"]
    params = {k: np.zeros(s, np.float32) for k, s in
              {"dense_0/W": (64, 64), "dense_0/b": (64,), "dense_1/W": (64, 10), "dense_1/b": (10,)}.items()}
    far = messages.encode(messages.ModelVersion(version=10**6, params=params, spec=spec, run_id=run_id))
    topology = Topology(namespace)
    client = Client(BrokerSettings.from_url(amqp_url), topology, name="forger").start()
    try:
        client.publish(topology.models, np.random.default_rng(0).bytes(5000), message_id="junk-model",
                       headers={VERSION_HEADER: hist["final"]["version"] + 1, RUN_HEADER: run_id}, timeout=10)
        client.publish(topology.models, far, message_id="far-model", headers={VERSION_HEADER: 10**6, RUN_HEADER: run_id},
                       timeout=10)
    finally:
        client.close()
    start_worker(procs, "w3", shards, 3, *trainer, *ns)  # reads the stream from its last chunk
    wait_for(lambda: any(e.get("worker_id") == "w3" and e["fate"] == "applied" for e in read_ledger(run))
             or procs.procs["agg"].poll() is not None, 150, "an update of the late worker applied")
    assert procs.wait("agg", 150) == 0, procs.dump()
    hist = read_history(run)
    assert hist["final"]["reached_target"], hist["final"]
    ledger = read_ledger(run)
    assert [e for e in ledger if e.get("worker_id") == "w3" and e["fate"] == "applied"], "w3 never took part"
    # every task names its version (async: the one current when issued), and a version more than
    # 1000 ahead of it is never believed: not even a late joiner that read the forged one first
    # answers a task from it (this was README's "Limits" weakness)
    rejected = [e for e in ledger if e["fate"] == "rejected"]
    assert not rejected, rejected
    for name in ("w0", "w1", "w2", "w3"):  # told to stop, none died of what it read
        assert procs.wait(name, 30) == 0, procs.log(name)
    if mode_args is SYNC:  # async workers fetch at a task's start: they may never read the junk at all
        assert any("skipping a model message" in procs.log(n) for n in ("w0", "w1", "w2", "w3"))


def test_async_workers_train_from_the_version_their_task_names_or_newer(
    amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path
) -> None:
    """Issue 15: an async task names the version current when it was issued; a worker that has
    skipped versions (it reads the stream only when a task needs a model it lacks) trains from
    that version or a newer one of the run, never an older one it still holds."""
    ns = common(amqp_url, namespace)
    run = tmp_path / "run"
    start_aggregator(procs, "agg", shards, run, "--max-updates", "24", "--min-workers", "3", "--join-grace", "0",
                     "--mode", "async", "--strategy", "fedbuff", "--buffer-size", "2", *ns)
    workers = [f"w{i}" for i in range(3)]
    for i, name in enumerate(workers):
        start_worker(procs, name, shards, i, *ns)
    assert procs.wait("agg", 150) == 0, procs.dump()
    for name in workers:
        assert procs.wait(name, 30) == 0, procs.log(name)
    started = [e for n in workers for e in events_in(procs.log(n), "task_started")]
    assert started and all(e.get("task_version") is not None for e in started), started[:3]
    assert all(e["version"] >= e["task_version"] for e in started), started
    ledger = assert_ledger_invariant(run, all_confirmed(procs, workers))
    base_of = {e["task_id"]: e["version"] for e in started}
    applied = [e for e in ledger if e["fate"] == "applied"]
    assert applied and all(e["base_version"] == base_of[e["task_id"]] for e in applied)
    assert max(e["task_version"] for e in started) > 0  # the run moved on while workers trained


def test_a_late_answer_to_a_task_reissued_after_the_task_timeout_is_applied(
    amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path
) -> None:
    """A worker slower than --task-timeout: each of its tasks is replaced, and its late answer still
    counts as issued work (applied, weighted by its staleness like any other), never rejected."""
    ns = common(amqp_url, namespace)
    run = tmp_path / "run"
    # every task takes 4 s (SleepyTrainer), whatever the machine's speed: 4x --task-timeout
    trainer = ["--trainer", "tests.trainers:SleepyTrainer"]
    start_aggregator(procs, "agg", shards, run, "--max-updates", "2", "--time-limit", "120", "--task-timeout", "1",
                     "--concurrency", "1", "--join-grace", "0", *trainer, *ASYNC, *ns)
    start_worker(procs, "w0", shards, 0, *trainer, *ns)
    assert procs.wait("agg", 150) == 0, procs.dump()
    expired = {m.group(1) for m in re.finditer(r"task (a\d+-\w+) not answered in 1 s", procs.log("agg"))}
    ledger = read_ledger(run)
    applied = [e for e in ledger if e["fate"] == "applied"]
    late_answers = [e for e in applied if e["task_id"] in expired]
    assert late_answers, (expired, ledger)
    for e in applied:  # FedAsync: alpha = mixing x (staleness + 1)^-0.5
        assert e["weight"] == pytest.approx(0.6 * (e["staleness"] + 1) ** -0.5, rel=1e-5), e
    assert not [e for e in ledger if e["fate"] == "rejected"], ledger
    assert procs.wait("w0", 30) == 0, procs.log("w0")


def test_workers_started_by_hand_one_after_another_all_take_part_from_round_1(
    amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path
) -> None:
    """--min-workers 1 (the default): the first worker to say hello must not run the federation
    alone; the join grace lets the others in, and every round uses all of them."""
    ns = common(amqp_url, namespace)
    run = tmp_path / "run"
    start_aggregator(procs, "agg", shards, run, "--rounds", "3", *SYNC, *ns)
    for i in range(4):  # each after the aggregator saw the one before
        start_worker(procs, f"w{i}", shards, i, *ns)
        wait_for(lambda i=i: [e for e in procs.events("agg", "worker_joined") if e["worker_id"] == f"w{i}"], 60,
                 f"w{i} to join")
    assert procs.wait("agg", 120) == 0, procs.dump()
    ledger = read_ledger(run)
    round1 = [e for e in ledger if e["fate"] == "applied" and e["version"] == 0]
    assert sorted(e["worker_id"] for e in round1) == ["w0", "w1", "w2", "w3"], ledger
    closed = procs.events("agg", "round_closed")
    assert [(e["round"], e["updates"]) for e in closed] == [(1, 4), (2, 4), (3, 4)]
    hist = read_history(run)
    assert set(hist["workers"]) == {"w0", "w1", "w2", "w3"}
    for w in hist["workers"].values():
        assert w["updates_applied"] == 3 and w["mean_staleness"] == 0.0 and w["failures"] == 0
        assert w["last_train_loss"] is not None and w["last_seen_s"] is not None
    for e in (e for e in ledger if e["fate"] == "applied"):
        assert {"train_loss", "train_accuracy", "num_samples", "duration_s"} <= set(e)
    for i in range(4):
        assert procs.wait(f"w{i}", 30) == 0, procs.log(f"w{i}")


def test_a_time_limit_bounds_the_wait_for_workers(
    amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path
) -> None:
    """Nobody comes: the aggregator says what it waits for (and where), and gives up at
    --time-limit. What it publishes names its run: the model (body, header, and the trainer in
    its spec) and the stop."""
    topology = Topology(namespace)
    seen: queue.Queue[tuple[str, Delivery]] = queue.Queue()
    watcher = Client(BrokerSettings.from_url(amqp_url), topology, name="watcher")
    watcher.subscribe(topology.models, lambda d: seen.put(("model", d)), arguments={"x-stream-offset": "first"},
                      settle_on_return=True)
    watcher.subscribe(f"{topology.control}.watcher", lambda d: seen.put(("control", d)), settle_on_return=True,
                      bind_exchange=topology.control)
    with watcher:  # connects
        run = tmp_path / "run"
        start_aggregator(procs, "agg", shards, run, "--min-workers", "2", "--time-limit", "3", *ASYNC,
                         *common(amqp_url, namespace))
        assert procs.wait("agg", 60) == 1, procs.dump()
        got = {kind: d for kind, d in (seen.get(timeout=10) for _ in range(2))}
    [waiting] = procs.events("agg", "waiting_for_workers")
    assert (waiting["namespace"], waiting["have"], waiting["need"]) == (namespace, 0, 2)
    last = procs.log("agg").strip().splitlines()[-1]
    assert f"namespace {namespace} failed: --time-limit 3 s passed while waiting for workers (0 of 2 live)" in last
    hist = read_history(run)
    assert hist["final"]["finished"] is True and hist["spec"]["trainer"] == "fedmq.shared.trainer:MLPTrainer"
    run_id = hist["run_id"]
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", run_id) and run_id in last
    model = messages.decode(got["model"].body, expect=messages.ModelVersion)
    assert isinstance(model, messages.ModelVersion)
    assert (model.run_id, model.version, model.spec) == (run_id, 0, hist["spec"])
    assert (got["model"].headers[RUN_HEADER], got["model"].headers[VERSION_HEADER]) == (run_id, 0)
    stop = messages.decode(got["control"].body, expect=messages.Control)
    assert isinstance(stop, messages.Control) and (stop.kind, stop.run_id) == ("stop", run_id)


def test_a_worker_that_refuses_the_run_is_reported_and_not_counted(
    amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path
) -> None:
    """A worker whose trainer is not the model's refuses (exit 2); the aggregator says so and
    waits; the same worker restarted with the right trainer takes the round's task."""
    ns = common(amqp_url, namespace)
    run = tmp_path / "run"
    trainer = ["--trainer", "tests.trainers:SleepyTrainer"]
    start_aggregator(procs, "agg", shards, run, "--rounds", "2", "--join-grace", "0", *trainer, *SYNC, *ns)
    start_worker(procs, "wrong", shards, 0, *ns)  # the default MLPTrainer is not SleepyTrainer
    assert procs.wait("wrong", 60) == 2, procs.log("wrong")  # docs/protocol.md
    [refused] = wait_for(lambda: procs.events("agg", "worker_refused"), 30, "the refusal to be reported")
    assert refused["worker_id"] == "w0" and "tests.trainers:SleepyTrainer" in refused["reason"], refused
    assert f"worker w0 refused: {refused['reason']}" in refused["msg"]
    procs.start("right", "worker", "--data", str(shards / "worker-0.npz"), "--worker-id", "w0", "--log-format", "json",
                *trainer, *ns, env={"FEDMQ_TEST_SLEEP_S": "0"})
    assert procs.wait("agg", 90) == 0, procs.dump()
    applied = [e for e in read_ledger(run) if e["fate"] == "applied"]
    assert [e["worker_id"] for e in applied] == ["w0", "w0"]
    assert procs.wait("right", 30) == 0
