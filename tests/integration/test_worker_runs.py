"""The worker side of run identity and failure reports (docs/protocol.md), against a real broker.

No aggregator: each test publishes models, tasks and stops itself (with the topology's names
and headers, as the aggregator does) and reads what the worker publishes on the updates queue
and the presence stream. Workers run in-process in a thread, or as ``fedmq worker`` processes
where the exit code or a ``--trainer`` reference is what is tested.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmq.broker.client import Client, Delivery
from fedmq.broker.settings import BrokerSettings
from fedmq.broker.topology import RUN_HEADER, VERSION_HEADER, Topology
from fedmq.shared import messages
from fedmq.shared.errors import WorkerRefused
from fedmq.shared.trainer import MLPTrainer, mlp_spec
from fedmq.worker.service import Worker, WorkerConfig
from tests.helpers import CapturedLogs, Procs, events_in, wait_for

pytestmark = [pytest.mark.broker]

SPEC = mlp_spec(64, 10, hidden=[16])
RUN_A, RUN_B = "20250101T000000Z-aaaaaa", "20250102T000000Z-bbbbbb"


def write_shard(path: Path, features: int = 64, n: int = 64, classes: int = 10) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, X=rng.standard_normal((n, features)).astype(np.float32), y=rng.integers(0, classes, n))
    return path


class Bench:
    """The aggregator's side of a namespace, played by the test: publishes models, tasks and
    stops, and collects what workers publish (updates queue, presence stream)."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.topology = Topology(namespace)
        self.settings = BrokerSettings.from_url(url)
        self.client = Client(self.settings, self.topology)
        self.updates: queue.Queue[Delivery] = queue.Queue()
        self.presence: queue.Queue[messages.Control] = queue.Queue()
        self.client.subscribe(self.topology.updates, self.updates.put, settle_on_return=True)
        self.client.subscribe(self.topology.presence, self._on_presence, arguments={"x-stream-offset": "first"},
                              prefetch=50, settle_on_return=True)
        self.client.start()

    def _on_presence(self, delivery: Delivery) -> None:
        msg = messages.decode(delivery.body, expect=messages.Control)
        assert isinstance(msg, messages.Control)
        self.presence.put(msg)

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------------ publishing
    def model(self, version: int, run: str, *, spec: dict[str, Any] = SPEC, seed: int = 0) -> messages.ModelVersion:
        architecture = {k: v for k, v in spec.items() if k != "trainer"}  # the trainer's name is no part of it
        params = MLPTrainer({**architecture, "seed": seed}).init_params()
        msg = messages.ModelVersion(version=version, params=params, spec=spec, run_id=run)
        self.raw_model(messages.encode(msg), {VERSION_HEADER: version, RUN_HEADER: run})
        return msg

    def raw_model(self, body: bytes, headers: dict[str, Any] | None = None) -> None:
        self.client.publish(self.topology.models, body, headers=headers, timeout=10)

    def task(self, task_id: str, run: str, *, version: int | None = None, mode: str = "async",
             round: int | None = None, model_bytes: int = 0) -> None:
        msg = messages.Task(task_id=task_id, version=version, mode=mode, epochs=1, batch_size=32, lr=0.05, mu=0.0,
                            seed=1, round=round, run_id=run, model_bytes=model_bytes)
        self.client.publish(self.topology.tasks, messages.encode(msg), message_id=task_id, timeout=10)

    def stop(self, run: str) -> None:
        msg = messages.Control(kind="stop", run_id=run, info={"version": 0})
        self.client.publish("", messages.encode(msg), exchange=self.topology.control, mandatory=False, timeout=10)

    # ------------------------------------------------------------------ reading
    def next_update(self, timeout: float = 30.0) -> tuple[Delivery, messages.Update | messages.Control]:
        try:
            delivery = self.updates.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"nothing arrived on the updates queue within {timeout:.0f} s") from None
        msg = messages.decode(delivery.body, expect=(messages.Update, messages.Control))
        assert isinstance(msg, messages.Update | messages.Control)
        return delivery, msg

    def next_presence(self, kind: str, timeout: float = 30.0) -> messages.Control:
        return wait_for(lambda: self._presence_of(kind), timeout, f"a {kind!r} presence message")

    def _presence_of(self, kind: str) -> messages.Control | None:
        while True:
            try:
                msg = self.presence.get_nowait()
            except queue.Empty:
                return None
            if msg.kind == kind:
                return msg

    def count(self, queue_name: str) -> int:
        """Messages in ``queue_name`` (ready only: unacked ones are not counted)."""
        return int(self.client.call(lambda ch: ch.queue_declare(queue_name, passive=True).method.message_count))


@pytest.fixture
def bench(amqp_url: str, namespace: str) -> Iterator[Bench]:
    b = Bench(amqp_url, namespace)
    yield b
    b.close()




class Running:
    """An in-process worker in a thread; ``outcome`` gets its exit code or the error it raised."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.outcome: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._body, daemon=True)
        self.thread.start()

    def _body(self) -> None:
        try:
            self.outcome["code"] = self.worker.run()
        except BaseException as exc:  # noqa: BLE001 (examined by the test)
            self.outcome["error"] = exc

    def alive(self) -> bool:
        return self.thread.is_alive() and not self.outcome

    def finish(self, timeout: float = 30.0) -> dict[str, Any]:
        self.worker.request_stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the worker did not stop"
        return self.outcome

    def join(self, timeout: float) -> dict[str, Any]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the worker still runs after {timeout:.0f} s"
        return self.outcome


def start_worker(bench: Bench, shard: Path, **config: Any) -> Running:
    cfg = WorkerConfig(data=str(shard), worker_id=config.pop("worker_id", "w0"), failure_backoff_s=0.05, **config)
    return Running(Worker(cfg, bench.settings, bench.topology))


@pytest.fixture
def running() -> Iterator[list[Running]]:
    """Workers a test started: stopped at its end whatever happens."""
    started: list[Running] = []
    yield started
    for r in started:
        r.worker.request_stop()
        r.thread.join(30)


def expect_update(bench: Bench, timeout: float = 30.0) -> messages.Update:
    _, msg = bench.next_update(timeout)
    assert isinstance(msg, messages.Update), msg
    return msg


# ---------------------------------------------------------------------------------- (a) run identity
def test_a_task_of_a_new_run_is_trained_on_that_runs_model_not_the_highest_version(
        bench: Bench, tmp_path: Path, running: list[Running]) -> None:
    """The bug: a worker that had read run A's version 5 kept "the highest version" and skipped
    (sync) or mis-based (async) every task of the next run, whose versions start at 0."""
    for v in range(6):
        bench.model(v, RUN_A)
    w = start_worker(bench, write_shard(tmp_path / "s.npz"))
    running.append(w)
    bench.task("a-1", RUN_A)  # async: the newest of run A
    u = expect_update(bench)
    assert (u.run_id, u.base_version) == (RUN_A, 5)

    bench.model(0, RUN_B, seed=1)
    bench.task("b-1", RUN_B, version=0, mode="sync", round=0)
    u = expect_update(bench)
    assert (u.run_id, u.base_version, u.round, u.task_id) == (RUN_B, 0, 0, "r00000:w0")
    bench.model(1, RUN_B, seed=2)
    bench.task("b-2", RUN_B, mode="async")  # async: the newest of run B, though run A's is higher
    u = expect_update(bench)
    assert (u.run_id, u.base_version) == (RUN_B, 1)
    assert w.alive()
    assert w.finish() == {"code": 0}


def test_a_task_whose_model_does_not_come_goes_back_after_a_bounded_wait(
        bench: Bench, tmp_path: Path, running: list[Running], worker_logs: CapturedLogs) -> None:
    bench.model(3, RUN_A)
    w = start_worker(bench, write_shard(tmp_path / "s.npz"), model_wait_s=1.0)
    running.append(w)
    bench.task("b-1", RUN_B, version=0, mode="sync", round=0)
    failed = wait_for(lambda: worker_logs.events("task_failed"), 30, "the task to fail")[0]
    assert failed["task_id"] == "b-1" and RUN_B in failed["reason"] and "did not arrive" in failed["reason"]
    # returned, not lost: once run B's model is there the same task is trained
    bench.model(0, RUN_B)
    assert worker_logs.saying(f"waits for model version 0 of run {RUN_B}")
    u = expect_update(bench)
    assert (u.run_id, u.base_version) == (RUN_B, 0)
    assert w.finish() == {"code": 0}


# ---------------------------------------------------------------------------------- (b) failure reports
def test_a_failing_trainer_reports_the_failure_and_acks_the_task(
        amqp_url: str, namespace: str, bench: Bench, tmp_path: Path, procs: Procs) -> None:
    shard = write_shard(tmp_path / "s.npz")
    bench.model(0, RUN_A)
    bench.task("t1", RUN_A)
    procs.start("wf", "worker", "--data", str(shard), "--worker-id", "wf", "--trainer", "tests.trainers:FailingTrainer",
                "--failure-backoff", "0.05", "--amqp-url", amqp_url, "--namespace", namespace, "--log-format", "json")
    delivery, report = bench.next_update(60)
    assert isinstance(report, messages.Control), report
    assert (report.kind, report.worker_id, report.run_id) == ("failed", "wf", RUN_A)
    assert report.info["task_id"] == "t1" and "this trainer always fails" in report.info["reason"]
    assert delivery.message_id == "failed-t1-wf"
    failed = wait_for(lambda: events_in(procs.log("wf"), "task_failed"), 30, "the task_failed event")
    assert failed[0]["task_id"] == "t1" and "this trainer always fails" in failed[0]["reason"]
    procs.kill("wf", signal.SIGTERM)
    assert procs.wait("wf", 30) == 0, procs.log("wf")
    # acked: not back in the queue once the worker is gone, and not dead-lettered
    assert bench.count(bench.topology.tasks) == 0
    assert bench.count(bench.topology.tasks_dlq) == 0
    assert bench.updates.empty(), "one report, not one per redelivery"


def test_an_async_fetch_that_stops_at_an_unusable_version_reads_on_to_the_next(
        bench: Bench, tmp_path: Path, running: list[Running], worker_logs: CapturedLogs) -> None:
    """A fetch closes its stream consumer at the first version its task can use, before that
    version is decoded (the check builds a trainer: user code, on the task thread only). If it
    is unusable, the fetch reads on from it: it trains on the next good version, not on an older
    one read again from further back."""
    bench.model(0, RUN_A)
    bad_spec = {**SPEC, "activation": "no-such-activation"}
    bad = messages.ModelVersion(version=1, params=MLPTrainer(SPEC).init_params(), spec=bad_spec, run_id=RUN_A)
    bench.raw_model(messages.encode(bad), {VERSION_HEADER: 1, RUN_HEADER: RUN_A})
    w = start_worker(bench, write_shard(tmp_path / "s.npz"))
    running.append(w)
    bench.task("t1", RUN_A, version=0)
    wait_for(lambda: worker_logs.saying("version 1 of run"), 30, "the unusable version to be read and dropped")
    bench.model(2, RUN_A)
    assert expect_update(bench).base_version == 2
    assert w.alive()


def test_a_task_on_an_unusable_model_version_is_reported(
        bench: Bench, tmp_path: Path, running: list[Running]) -> None:
    bad_spec = {**SPEC, "activation": "no-such-activation"}
    msg = messages.ModelVersion(version=0, params=MLPTrainer(SPEC).init_params(), spec=bad_spec, run_id=RUN_A)
    bench.raw_model(messages.encode(msg), {VERSION_HEADER: 0, RUN_HEADER: RUN_A})
    w = start_worker(bench, write_shard(tmp_path / "s.npz"))
    running.append(w)
    bench.task("t1", RUN_A, version=0, mode="sync", round=0)
    _, report = bench.next_update()
    assert isinstance(report, messages.Control) and report.kind == "failed", report
    assert report.info["task_id"] == "t1" and "no-such-activation" in report.info["reason"]
    assert w.alive()


# ---------------------------------------------------------------------------------- (c) join check
def test_a_worker_whose_shard_does_not_fit_the_model_refuses_the_run(
        bench: Bench, tmp_path: Path, running: list[Running], worker_logs: CapturedLogs) -> None:
    bench.model(0, RUN_A)
    bench.task("t1", RUN_A)
    w = start_worker(bench, write_shard(tmp_path / "s13.npz", features=13))
    running.append(w)
    outcome = w.join(60)
    error = outcome.get("error")
    assert isinstance(error, WorkerRefused) and error.exit_code == 2, outcome
    assert "13 features" in str(error) and "64" in str(error)
    refused = bench.next_presence("refused")
    assert (refused.worker_id, refused.run_id) == ("w0", RUN_A) and "13 features" in refused.info["reason"]
    assert not worker_logs.events("task_started"), "refused before training, not by a crash in numpy"
    assert bench.updates.empty()
    # back for a worker that fits (the broker requeues it a moment after the reject or the close)
    wait_for(lambda: bench.count(bench.topology.tasks) == 1, 30, "the task back in the queue")


class _SlowToLeave(Worker):
    """Counts the task deliveries it gets, and takes half a second to say bye: what a worker on
    a busy machine may take between handing its tasks back and closing its connection."""

    deliveries = 0

    def _on_task(self, delivery: Delivery) -> None:
        self.deliveries += 1
        super()._on_task(delivery)

    def _presence(self, kind: str, run_id: str = "", **info: object) -> bool:
        if kind == "bye":
            time.sleep(0.5)
        return super()._presence(kind, run_id, **info)


def test_a_worker_that_refuses_a_run_stops_taking_tasks_before_it_hands_its_task_back(
        bench: Bench, tmp_path: Path, running: list[Running]) -> None:
    """The bug (a CI failure of the test above): the refusing worker handed its task back while
    its consumer was still on, so the broker gave it straight back, and each return counts
    towards the task queue's delivery limit (3: then dead-lettered, never trained)."""
    bench.model(0, RUN_A)
    bench.task("t1", RUN_A)
    cfg = WorkerConfig(data=str(write_shard(tmp_path / "s13.npz", features=13)), worker_id="w0", failure_backoff_s=0.05)
    w = Running(_SlowToLeave(cfg, bench.settings, bench.topology))
    running.append(w)
    assert isinstance(w.join(60).get("error"), WorkerRefused)
    assert w.worker.deliveries == 1  # type: ignore[attr-defined]
    wait_for(lambda: bench.count(bench.topology.tasks) == 1, 30, "the task back in the queue")
    assert bench.count(bench.topology.tasks_dlq) == 0


def test_a_worker_whose_trainer_is_not_the_models_refuses_the_run(
        bench: Bench, tmp_path: Path, running: list[Running]) -> None:
    bench.model(0, RUN_A, spec={**SPEC, "trainer": "somebody.else:Trainer"})
    bench.task("t1", RUN_A)
    w = start_worker(bench, write_shard(tmp_path / "s.npz"))
    running.append(w)
    error = w.join(60).get("error")
    assert isinstance(error, WorkerRefused), error
    refused = bench.next_presence("refused")
    assert "somebody.else:Trainer" in refused.info["reason"]


@pytest.mark.parametrize(("limits", "option"), [
    ({"memory_budget": "512K"}, "--memory-budget"),  # 3 x 300 kB is over 512 KiB
    ({"max_model_bytes": 100_000}, "--max-model-bytes"),
])
def test_a_worker_that_cannot_hold_the_model_refuses_the_run_before_reading_it(
        bench: Bench, tmp_path: Path, running: list[Running], limits: dict[str, Any], option: str) -> None:
    """The task says the model's size: a worker over its limits says so in one line and stops,
    before it reads any of the model (it used to skip the model and give the task back forever)."""
    bench.model(0, RUN_A)
    bench.task("t1", RUN_A, model_bytes=300_000)
    w = start_worker(bench, write_shard(tmp_path / "s.npz"), **limits)
    running.append(w)
    error = w.join(60).get("error")
    assert isinstance(error, WorkerRefused) and error.exit_code == 2, error
    assert option in str(error) and "\n" not in str(error)
    refused = bench.next_presence("refused")
    assert (refused.worker_id, refused.run_id) == ("w0", RUN_A) and option in refused.info["reason"]
    assert w.worker.follower is not None and w.worker.follower.deliveries == 0, "refused before reading the model"
    assert bench.updates.empty()
    wait_for(lambda: bench.count(bench.topology.tasks) == 1, 30, "the task back for a worker that can hold it")


def test_a_worker_that_can_hold_the_model_trains_it(bench: Bench, tmp_path: Path, running: list[Running]) -> None:
    bench.model(0, RUN_A)
    bench.task("t1", RUN_A, model_bytes=300_000)
    w = start_worker(bench, write_shard(tmp_path / "s.npz"), memory_budget="64M")
    running.append(w)
    assert expect_update(bench).base_version == 0


def test_a_model_that_names_the_workers_trainer_is_trained(
        bench: Bench, tmp_path: Path, running: list[Running]) -> None:
    """The spec's "trainer" entry names the trainer; it is no part of the architecture."""
    bench.model(0, RUN_A, spec={**SPEC, "trainer": "fedmq.shared.trainer : MLPTrainer"})
    bench.task("t1", RUN_A)
    w = start_worker(bench, write_shard(tmp_path / "s.npz"))
    running.append(w)
    assert expect_update(bench).base_version == 0
    assert w.finish() == {"code": 0}


def test_a_refusing_worker_process_exits_with_code_2(
        amqp_url: str, namespace: str, bench: Bench, tmp_path: Path, procs: Procs) -> None:
    bench.model(0, RUN_A)
    bench.task("t1", RUN_A)
    procs.start("w13", "worker", "--data", str(write_shard(tmp_path / "s13.npz", features=13)), "--worker-id", "w13",
                "--amqp-url", amqp_url, "--namespace", namespace, "--log-format", "json")
    assert procs.wait("w13", 60) == 2, procs.log("w13")
    assert "13 features" in bench.next_presence("refused").info["reason"]


# ---------------------------------------------------------------------------------- (d) hostile stream
def test_a_worker_survives_any_model_message(bench: Bench, tmp_path: Path, running: list[Running]) -> None:
    bench.model(0, RUN_A)
    w = start_worker(bench, write_shard(tmp_path / "s.npz"))
    running.append(w)
    bench.task("t0", RUN_A)
    assert expect_update(bench).base_version == 0  # the worker reads the stream from here on
    junk = os.urandom(3000)
    bench.raw_model(junk, {VERSION_HEADER: 1, RUN_HEADER: RUN_A})  # random bytes with believable headers
    bench.raw_model(junk)  # random bytes, no headers
    bench.model(10**6, RUN_A)  # a valid model, absurdly far ahead of its run
    bench.task("t1", RUN_A)  # async: the newest usable version of run A is still 0
    u = expect_update(bench)
    assert (u.task_id, u.run_id, u.base_version) == ("t1", RUN_A, 0)
    bench.model(1, RUN_A)  # the real next version replaces the junk one
    bench.task("t2", RUN_A, version=1, mode="sync", round=1)
    u = expect_update(bench)
    assert (u.run_id, u.base_version) == (RUN_A, 1)
    assert w.alive()
    assert w.finish() == {"code": 0}


# ---------------------------------------------------------------------------------- (e) stops name their run
def test_a_serving_worker_trains_the_next_run_after_a_stop(
        bench: Bench, tmp_path: Path, running: list[Running]) -> None:
    bench.model(0, RUN_A)
    w = start_worker(bench, write_shard(tmp_path / "s.npz"), serve=True)
    running.append(w)
    bench.task("a-1", RUN_A, version=0, mode="sync", round=0)
    assert expect_update(bench).run_id == RUN_A
    assert w.worker.serving == RUN_A
    bench.stop(RUN_A)
    wait_for(lambda: w.worker.serving is None, 30, "the worker to take run A's stop")
    assert w.alive()
    bench.model(0, RUN_B)
    bench.task("b-1", RUN_B, version=0, mode="sync", round=0)  # the sync worker was waiting for a newer version
    u = expect_update(bench)
    assert (u.run_id, u.base_version) == (RUN_B, 0)
    assert w.alive()
    assert w.finish() == {"code": 0}


def test_a_worker_ignores_the_stop_of_another_run_and_leaves_after_its_own(
        bench: Bench, tmp_path: Path, running: list[Running], worker_logs: CapturedLogs) -> None:
    bench.model(0, RUN_A)
    w = start_worker(bench, write_shard(tmp_path / "s.npz"))
    running.append(w)
    bench.task("a-1", RUN_A)
    assert expect_update(bench).run_id == RUN_A
    bench.stop(RUN_B)
    wait_for(lambda: worker_logs.saying(f"ignoring the stop of run {RUN_B}"), 30, "the other run's stop to be ignored")
    assert w.alive()
    bench.stop(RUN_A)
    assert w.join(30) == {"code": 0}


def test_a_worker_says_where_it_waits(
        bench: Bench, tmp_path: Path, running: list[Running], worker_logs: CapturedLogs) -> None:
    w = start_worker(bench, write_shard(tmp_path / "s.npz"), idle_log_s=0.2)
    running.append(w)
    ns = bench.topology.namespace
    wait_for(lambda: worker_logs.saying(f"still waiting for a task on namespace {ns}"), 30, "the idle line")
    start = worker_logs.saying("connected to")[0]
    assert f"namespace {ns}" in start and "guest:guest" not in start and "waiting for a model" in start
    assert w.finish() == {"code": 0}


def test_a_worker_with_unscaled_features_says_so(amqp_url: str, namespace: str, tmp_path: Path, procs: Procs) -> None:
    """A site that did not standardise its features is warned at start, before any training."""
    rng = np.random.default_rng(0)
    shard = tmp_path / "raw.npz"
    np.savez(shard, X=rng.uniform(0, 255, size=(50, 64)).astype(np.float32), y=rng.integers(0, 10, 50).astype(np.int64),
             num_classes=np.int64(10))
    procs.start("w0", "worker", "--data", str(shard), "--worker-id", "w0", "--amqp-url", amqp_url,
                "--namespace", namespace)
    wait_for(lambda: "look unscaled" in procs.log("w0"), 30, "the unscaled-features warning")
    assert "64 of 64 features look unscaled" in procs.log("w0")


# ---------------------------------------------------------------------------------- model fetch (issue 15)
def counting_offers(worker: Worker) -> list[int]:
    """Count the model stream's messages a worker hands its ModelBox (its version each)."""
    seen: list[int] = []
    offer = worker.models.offer

    def counted(delivery: Delivery) -> None:
        seen.append(int(delivery.headers.get(VERSION_HEADER, -1)))
        offer(delivery)

    worker.models.offer = counted  # type: ignore[method-assign]
    return seen


def test_a_worker_reads_only_the_version_its_task_needs_not_every_version_published(
        bench: Bench, tmp_path: Path, running: list[Running]) -> None:
    """Issue 15: versions published while a worker has no use for them are never delivered to it;
    a task naming version 30 is trained from version 30 (the worker held only 0)."""
    w = start_worker(bench, write_shard(tmp_path / "s.npz"))
    seen = counting_offers(w.worker)
    running.append(w)
    bench.next_presence("hello")
    bench.model(0, RUN_A)
    bench.task("t1", RUN_A, version=0)
    assert expect_update(bench).base_version == 0
    for v in range(1, 31):
        bench.model(v, RUN_A)
    bench.task("t2", RUN_A, version=30)
    assert expect_update(bench).base_version == 30
    # per task: the version it needs, and at most the messages in flight when it detached
    assert len(seen) <= 2 * 3, seen
    assert w.worker.follower is not None and w.worker.follower.attaches == 2
    bench.task("t3", RUN_A, version=29)  # held already (a version from 29 on): no fetch at all
    assert expect_update(bench).base_version == 30
    assert w.worker.follower.attaches == 2 and len(seen) <= 6
    assert w.finish() == {"code": 0}


def test_a_sync_worker_reads_each_round_on_one_attachment_and_leaves_the_stream_when_left_out(
        bench: Bench, tmp_path: Path, running: list[Running]) -> None:
    """A sync worker that trains every round stays attached to the model stream from round to
    round (attaching anew costs the broker a channel and a stream reader per worker per round);
    one left out of rounds detaches after the second version it has no task for."""
    w = start_worker(bench, write_shard(tmp_path / "s.npz"))
    seen = counting_offers(w.worker)
    running.append(w)
    bench.next_presence("hello")
    bench.model(0, RUN_A)
    follower = w.worker.follower
    assert follower is not None
    for r in range(5):
        bench.task(f"t{r}", RUN_A, version=r, mode="sync", round=r)
        assert expect_update(bench).base_version == r
        bench.model(r + 1, RUN_A)
        wait_for(lambda r=r: r + 1 in seen, 30, f"version {r + 1} read")
    # one fetch for the first task, then one attachment that reads each next version
    assert follower.attaches == 2 and follower.attached
    assert seen == [0, 1, 2, 3, 4, 5]
    bench.model(6, RUN_A)  # no task for this worker in rounds 5 and 6
    wait_for(lambda: not follower.attached, 30, "the worker to leave the stream")
    assert seen == [0, 1, 2, 3, 4, 5, 6]
    bench.model(7, RUN_A)
    bench.model(8, RUN_A)
    bench.task("t8", RUN_A, version=8, mode="sync", round=8)  # fetched: attached at `last` again
    assert expect_update(bench).base_version == 8
    # `last` is the stream's last chunk, which may hold version 7 too (published together)
    assert seen[:7] == [0, 1, 2, 3, 4, 5, 6] and set(seen[7:]) <= {7, 8}
    wait_for(lambda: follower.attaches == 4, 30, "the worker to read on after its update")  # 3: the fetch
    assert w.finish() == {"code": 0}


def test_a_forged_version_far_ahead_of_the_tasks_is_never_trained_on_by_a_late_joiner(
        bench: Bench, tmp_path: Path, running: list[Running]) -> None:
    """README "Limits" (closed): a worker joining just after a forged far-ahead version reads it
    first; its task names version 5, so the forged one is refused and the run's next is used."""
    bench.model(5, RUN_A)
    bench.model(10**6, RUN_A)  # forged, the last thing on the stream
    w = start_worker(bench, write_shard(tmp_path / "s.npz"))
    running.append(w)
    bench.next_presence("hello")
    bench.task("t1", RUN_A, version=5)
    wait_for(lambda: w.worker.models.skipped >= 1, 30, "the forged version refused")
    bench.model(6, RUN_A)  # the run's next version
    assert expect_update(bench).base_version == 6
    assert w.finish() == {"code": 0}


def test_fetching_while_versions_stream_in_keeps_the_connection(
        bench: Bench, tmp_path: Path, running: list[Running]) -> None:
    """A worker detaches from the model stream with versions still in flight to it: a stream
    refuses the reject a plain consumer cancel sends for them by closing the connection, which
    would return the task unacked (a reconnect, and the task answered twice)."""
    w = start_worker(bench, write_shard(tmp_path / "s.npz"))
    running.append(w)
    bench.next_presence("hello")
    publisher = Client(bench.settings, bench.topology, name="publisher").start()
    stop = threading.Event()
    published = [0]

    def publish() -> None:
        architecture = {k: v for k, v in SPEC.items() if k != "trainer"}
        body_of = {}
        while not stop.is_set():
            v = published[0]
            params = MLPTrainer({**architecture, "seed": 0}).init_params() if not body_of else body_of["p"]
            body_of["p"] = params
            msg = messages.ModelVersion(version=v, params=params, spec=SPEC, run_id=RUN_A)
            publisher.publish(bench.topology.models, messages.encode(msg), headers={VERSION_HEADER: v, RUN_HEADER: RUN_A},
                              timeout=10)
            published[0] = v + 1

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    try:
        for i in range(12):
            wait_for(lambda i=i: published[0] > 3 * i + 1, 30, "versions published")
            v = published[0] - 1
            bench.task(f"t{i}", RUN_A, version=v)
            assert expect_update(bench).base_version >= v
    finally:
        stop.set()
        thread.join(30)
        publisher.close()
    assert w.worker.client is not None and w.worker.client.reconnects == 0
    assert w.worker.follower is not None and w.worker.follower.attaches >= 1
    assert w.finish() == {"code": 0}
