"""The aggregator's decision core, fed by hand: no broker, no threads, no clock.

Time is whatever ``now`` the test passes (seconds, moved in milliseconds where it matters);
updates are built with :class:`fedmq.shared.messages.Update`; every ``Evaluate`` decision is
answered at once with a scripted accuracy, as the shell does.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fedmq.aggregator import versions
from fedmq.aggregator.config import AggregatorConfig
from fedmq.aggregator.core import (
    DRAIN_GRACE_S,
    STOP_REPEAT_S,
    BroadcastStop,
    Checkpoint,
    Coordinator,
    Decision,
    Evaluate,
    Failing,
    IssueTask,
    JoinGrace,
    PublishModel,
    PurgeTasks,
    RoundClosed,
    RoundShort,
    RoundWaiting,
    Settle,
    TaskExpired,
    TaskRetried,
    Undecodable,
    VersionEvaluated,
    WaitingForWorkers,
    WorkerJoined,
    WorkerKeepsFailing,
    WorkerLeft,
    WorkerRefused,
)
from fedmq.aggregator.policy import make_policy
from fedmq.aggregator.strategies import make_strategy
from fedmq.shared import messages

SHAPES = {"dense_0/W": (4, 3), "dense_0/b": (3,)}
RUN = "20260101T000000Z-abcdef"


def model(value: float = 0.0) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, np.float32) for k, s in SHAPES.items()}


def config(**kw: Any) -> AggregatorConfig:
    kw.setdefault("join_grace", 0.0)  # the tests of the join grace set it
    return AggregatorConfig(test_data="unused.npz", out="unused", **kw).validate()


def coordinator(cfg: AggregatorConfig, params: dict[str, np.ndarray] | None = None) -> Coordinator:
    strategy = make_strategy(cfg.strategy_name, mixing=cfg.mixing, buffer_size=cfg.buffer_size, server_lr=cfg.server_lr)
    return Coordinator(cfg, strategy, make_policy(cfg), params if params is not None else model(), incarnation="t",
                       run_id=RUN)


def update(task_id: str, worker: str = "w0", *, base: int = 0, round_: int | None = None, value: float = 1.0,
           n: int = 10, kind: str = "weights", params: dict[str, np.ndarray] | None = None, run: str = RUN,
           loss: float = 0.1) -> messages.Update:
    return messages.Update(task_id=task_id, worker_id=worker, base_version=base, num_samples=n,
                           params=params if params is not None else model(value), kind=kind, train_loss=loss,
                           train_accuracy=0.9, duration_s=0.01, round=round_, run_id=run)


def failure(task_id: str, worker: str = "w0", reason: str = "trainer raised RuntimeError: boom",
            run: str = RUN) -> messages.Control:
    """A worker's failure report, as docs/protocol.md has it."""
    return messages.Control(kind="failed", worker_id=worker, run_id=run, info={"task_id": task_id, "reason": reason})


def hello(worker: str, sent_s: float = 1e9, kind: str = "hello") -> messages.Control:
    return messages.Control(kind=kind, worker_id=worker, sent_s=sent_s)


class Driver:
    """Feeds a coordinator and answers its Evaluate decisions, like the shell does."""

    def __init__(self, core: Coordinator, accuracy: Callable[[int], float] = lambda v: 0.5) -> None:
        self.core = core
        self.accuracy = accuracy
        self.tokens = itertools.count(1)
        self.all: list[Decision] = []

    def _take(self, decisions: list[Decision], now: float) -> list[Decision]:
        out: list[Decision] = []
        for d in decisions:
            out.append(d)
            if isinstance(d, Evaluate):
                acc = self.accuracy(d.version)
                # a sync version's entry keeps its digest, as the shell has it
                digest = versions.params_digest(d.params) if self.core.config.synchronous else None
                out += self._take(self.core.evaluated(d.version, 1.0 - acc, acc, now, digest=digest), now)
        return out

    def _record(self, decisions: list[Decision], now: float) -> list[Decision]:
        out = self._take(decisions, now)
        self.all += out
        return out

    @property
    def history(self) -> list[dict[str, Any]]:
        """The versions evaluated while this driver fed the core (what history.jsonl gets)."""
        return [dict(d.entry) for d in self.all if isinstance(d, VersionEvaluated)]

    def start(self, now: float = 0.0) -> list[Decision]:
        return self._record(self.core.start(now), now)

    def hello(self, worker: str, now: float, **kw: Any) -> list[Decision]:
        return self._record(self.core.presence(hello(worker, **kw), now), now)

    def bye(self, worker: str, now: float) -> list[Decision]:
        return self._record(self.core.presence(hello(worker, kind="bye"), now), now)

    def send(self, msg: messages.Update | messages.Control | Undecodable, now: float, *, message_id: str | None = None,
             redelivered: bool = False, token: int | None = None) -> list[Decision]:
        token = next(self.tokens) if token is None else token
        decisions = self.core.receive(token, msg, now, message_id=message_id or f"m{token}", redelivered=redelivered)
        return self._record(decisions, now)

    def tick(self, now: float) -> list[Decision]:
        return self._record(self.core.tick(now), now)

    def stop(self, now: float, interrupted: bool = False) -> list[Decision]:
        return self._record(self.core.stop(now, interrupted=interrupted), now)


def of(kind: type, decisions: list[Decision]) -> list[Any]:
    return [d for d in decisions if isinstance(d, kind)]


def fates(decisions: list[Decision]) -> list[str]:
    return [d.fate for d in of(Settle, decisions)]


def tasks(decisions: list[Decision]) -> list[messages.Task]:
    return [d.task for d in of(IssueTask, decisions)]


def async_run(**kw: Any) -> Driver:
    kw.setdefault("strategy", "fedasync")
    kw.setdefault("max_updates", 1000)
    return Driver(coordinator(config(mode="async", **kw)))


def sync_run(**kw: Any) -> Driver:
    kw.setdefault("rounds", 100)
    return Driver(coordinator(config(mode="sync", **kw)))


# ====================================================================== fates
def test_async_fates_applied_duplicate_stale_rejected_late() -> None:
    run = async_run(max_staleness=0, concurrency=1)
    first = run.start(0.0)
    assert of(PublishModel, first) == [PublishModel(0, None, model())]
    assert of(WaitingForWorkers, first) == [WaitingForWorkers(0, 1)]
    got = run.hello("w0", 0.001)
    assert of(WorkerJoined, got) == [WorkerJoined("w0")]
    [task] = tasks(got)
    assert task.task_id == "a000001-t" and task.version == 0 and task.update_kind == "weights"

    # applied: a new version, published, then evaluated
    got = run.send(update(task.task_id), 0.002, message_id="m-a")
    assert fates(got) == ["applied"]
    [settle] = of(Settle, got)
    assert settle.entry["weight"] == pytest.approx(0.6) and settle.entry["fate"] == "applied"
    assert {"message_id", "time_s", "version", "redelivered", "task_id", "worker_id", "base_version", "num_samples",
            "staleness", "weight", "fate", "train_loss", "train_accuracy", "duration_s"} == set(settle.entry)
    assert [type(d) for d in got if isinstance(d, PublishModel | Evaluate | VersionEvaluated)] == [
        PublishModel, Evaluate, VersionEvaluated]
    assert run.core.state.version == 1

    # duplicate: the same message again, redelivered
    got = run.send(update(task.task_id), 0.003, message_id="m-a", redelivered=True)
    assert fates(got) == ["duplicate"] and of(Settle, got)[0].entry["redelivered"] is True
    # stale: staleness 1 > --max-staleness 0
    got = run.send(update("a000002-t", base=0), 0.004)
    assert fates(got) == ["stale"] and "max-staleness" in str(of(Settle, got)[0].reason)
    # rejected: undecodable, wrong shape, wrong kind, a future version
    assert fates(run.send(Undecodable("not msgpack"), 0.005)) == ["rejected"]
    bad_shape = {**model(), "dense_0/b": np.zeros(4, np.float32)}
    got = run.send(update("x1", params=bad_shape), 0.006)
    assert fates(got) == ["rejected"] and "(4,)" in str(of(Settle, got)[0].reason)
    assert fates(run.send(update("x2", kind="delta"), 0.007)) == ["rejected"]
    got = run.send(update("x3", base=7), 0.008)
    assert fates(got) == ["rejected"] and "newer than the current version" in str(of(Settle, got)[0].reason)
    # late: the run stopped
    got = run.stop(0.009)
    assert of(BroadcastStop, got) == [BroadcastStop(1)]
    got = run.send(update("a000003-t", base=1), 0.010)
    assert fates(got) == ["late"]
    summary = run.core.summary(0.011)
    assert (summary["updates_applied"], summary["updates_duplicate"], summary["updates_stale"],
            summary["updates_rejected"], summary["updates_late"]) == (1, 1, 1, 4, 1)


def test_sync_fates_and_a_round_closing_when_every_task_answered() -> None:
    run = sync_run(workers_per_round=2, min_workers=2)
    assert of(WaitingForWorkers, run.start(0.0)) == [WaitingForWorkers(0, 2)]
    assert not tasks(run.hello("w0", 0.001))
    got = run.hello("w1", 0.002)
    assert of(PublishModel, got) == [PublishModel(0, 1, model())]
    assert [t.task_id for t in tasks(got)] == ["r00001-000", "r00001-001"]
    assert {t.round for t in tasks(got)} == {1} and len({t.seed for t in tasks(got)}) == 1

    assert run.send(update("r00001-001", "w1", round_=1, value=3.0, n=30), 0.010) == []  # held
    # the same task again while it is held: a duplicate
    assert fates(run.send(update("r00001-001", "w1", round_=1, value=3.0, n=30), 0.011, redelivered=True)) == ["duplicate"]
    got = run.send(update("r00001-000", "w0", round_=1, value=1.0, n=10), 0.012)
    settles = of(Settle, got)
    assert [s.entry["worker_id"] for s in settles] == ["w0", "w1"]  # ordered by worker id
    assert [s.entry["weight"] for s in settles] == [0.25, 0.75]
    assert of(RoundClosed, got) == [RoundClosed(1, 1, 2)]
    [evaluated] = of(VersionEvaluated, got)
    assert evaluated.entry["round"] == 1 and evaluated.entry["version"] == 1 and evaluated.entry["staleness_mean"] == 0.0
    assert of(Checkpoint, got) == [Checkpoint()]
    np.testing.assert_allclose(run.core.params["dense_0/b"], 2.5)
    # the next round opens at once, on version 1
    assert [t.task_id for t in tasks(got)] == ["r00002-000", "r00002-001"]
    assert of(PublishModel, got) == [PublishModel(1, 2, model())]
    order = [type(d) for d in got if isinstance(d, Settle | RoundClosed | Evaluate | Checkpoint | PublishModel)]
    assert order == [Settle, Settle, RoundClosed, Evaluate, Checkpoint, PublishModel]

    # stale: for round 1, now in round 2
    got = run.send(update("r00001-000", "w2", round_=1), 0.020)
    assert fates(got) == ["duplicate"]  # its task was applied already
    got = run.send(update("r00001-009", "w2", round_=1), 0.021)
    assert fates(got) == ["stale"] and "round 1, the aggregator is in round 2" in str(of(Settle, got)[0].reason)
    # a worker contributes once per round
    assert run.send(update("r00002-000", "w0", base=1, round_=2), 0.022) == []
    got = run.send(update("r00002-001", "w0", base=1, round_=2), 0.023)
    assert fates(got) == ["duplicate"] and "already contributed" in str(of(Settle, got)[0].reason)


def test_every_update_message_is_settled_exactly_once() -> None:
    run = async_run(strategy="fedbuff", buffer_size=2, max_updates=6, concurrency=2)
    run.start(0.0)
    run.hello("w0", 0.0)
    sent = 0
    for i in range(1, 9):
        run.send(update(f"a{i:06d}-t", kind="delta", base=0), i * 0.001)
        sent += 1
    run.send(update("a000001-t", kind="delta"), 0.02, redelivered=True)
    run.send(Undecodable("garbage"), 0.03)
    sent += 2
    tokens = Counter(d.token for d in of(Settle, run.all))
    assert len(tokens) == sent and set(tokens.values()) == {1}
    # the redelivery comes after the stop: late before duplicate, as before
    assert Counter(fates(run.all)) == {"applied": 6, "late": 3, "rejected": 1}


# ====================================================================== rounds
def test_round_closes_after_the_timeout_only_with_min_workers() -> None:
    run = sync_run(workers_per_round=3, min_workers=2, round_timeout=10.0)
    run.start(0.0)
    for w in ("w0", "w1", "w2"):
        run.hello(w, 0.0)
    assert run.core.next_wake(0.0) == 10.0  # the round's deadline (before any presence expiry)
    assert run.send(update("r00001-000", "w0", round_=1), 1.0) == []
    assert run.tick(9.999) == []
    # past the deadline, one update is not enough: the round stays open
    assert not of(RoundClosed, run.tick(10.5))
    run.hello("w0", 10.6)
    run.hello("w1", 10.6)
    run.hello("w2", 10.6)
    got = run.send(update("r00001-001", "w1", round_=1), 11.0)
    assert of(RoundClosed, got) == [RoundClosed(1, 1, 2)]
    assert len(tasks(got)) == 3  # the next round


def test_round_with_min_workers_closes_at_its_deadline() -> None:
    run = sync_run(workers_per_round=3, min_workers=2, round_timeout=5.0)
    run.start(0.0)
    for w in ("w0", "w1", "w2"):
        run.hello(w, 0.0)
    run.send(update("r00001-000", "w0", round_=1), 0.5)
    run.send(update("r00001-002", "w2", round_=1), 0.6)
    assert run.tick(4.999) == []
    got = run.tick(5.0)
    assert of(RoundClosed, got) == [RoundClosed(1, 1, 2)]
    assert [s.entry["worker_id"] for s in of(Settle, got)] == ["w0", "w2"]


def test_a_round_waits_for_min_workers_and_announces_it_once() -> None:
    run = sync_run(workers_per_round=2, min_workers=2, presence_timeout=20.0)
    run.start(0.0)
    run.hello("w0", 0.0)
    run.hello("w1", 0.0)
    run.send(update("r00001-000", "w0", round_=1), 1.0)
    run.bye("w1", 1.5)
    got = run.send(update("r00001-001", "w1", round_=1), 2.0)
    assert of(RoundClosed, got) and of(WaitingForWorkers, got) == [WaitingForWorkers(1, 2)]
    assert not tasks(got)  # round 2 waits
    assert run.tick(3.0) == [] and run.hello("w0", 3.0) == []  # said once
    got = run.hello("w1", 4.0)
    assert [t.task_id for t in tasks(got)] == ["r00002-000", "r00002-001"]


def test_stopping_mid_round_abandons_it_unless_it_has_min_workers() -> None:
    run = sync_run(workers_per_round=3, min_workers=2)
    run.start(0.0)
    for w in ("w0", "w1", "w2"):
        run.hello(w, 0.0)
    run.send(update("r00001-000", "w0", round_=1), 1.0)
    got = run.stop(2.0)
    assert fates(got) == ["late"] and of(Settle, got)[0].reason == "the run stopped before the round closed"
    assert of(BroadcastStop, got) == [BroadcastStop(0)] and run.core.state.round == 0

    run = sync_run(workers_per_round=3, min_workers=2)
    run.start(0.0)
    for w in ("w0", "w1", "w2"):
        run.hello(w, 0.0)
    run.send(update("r00001-000", "w0", round_=1), 1.0)
    run.send(update("r00001-001", "w1", round_=1), 1.1)
    got = run.stop(2.0)
    assert fates(got) == ["applied", "applied"] and of(RoundClosed, got) == [RoundClosed(1, 1, 2)]
    assert of(BroadcastStop, got) == [BroadcastStop(1)] and not tasks(got)


def test_an_interrupt_leaves_held_updates_unsettled() -> None:
    run = sync_run(workers_per_round=2, min_workers=2)
    run.start(0.0)
    run.hello("w0", 0.0)
    run.hello("w1", 0.0)
    run.send(update("r00001-000", "w0", round_=1), 1.0)
    assert run.stop(2.0, interrupted=True) == []
    assert run.core.done and run.core.summary(2.0)["interrupted"] is True
    # nothing is settled after the end: the message stays unacked for the next aggregator
    assert run.send(update("r00001-001", "w1", round_=1), 3.0) == []
    assert not of(Settle, run.all)


# ====================================================================== stop rules
def drain(run: Driver, now: float, workers: tuple[str, ...]) -> None:
    """Every worker says bye; what they sent before still counts (late) for a short grace."""
    assert not run.core.done
    for w in workers:
        assert not of(PurgeTasks, run.bye(w, now))
    assert run.core.next_wake(now) == now + DRAIN_GRACE_S
    update_sent_before_bye = update("a999999-t", base=0)
    assert fates(run.send(update_sent_before_bye, now + DRAIN_GRACE_S / 2)) == ["late"]
    assert run.tick(now + DRAIN_GRACE_S) == [PurgeTasks()] and run.core.done
    # after a finished run, anything still received is late (nothing is left unacked)
    assert fates(run.send(update("a999998-t"), now + 5.0)) == ["late"]


def test_stop_after_rounds_then_drain_until_workers_leave() -> None:
    run = sync_run(rounds=2, workers_per_round=1, min_workers=1)
    run.start(0.0)
    run.hello("w0", 0.0)
    run.send(update("r00001-000", round_=1), 1.0)
    got = run.send(update("r00002-000", base=1, round_=2), 2.0)
    assert of(BroadcastStop, got) == [BroadcastStop(2)] and not tasks(got)
    assert fates(run.send(update("r00003-000", base=2, round_=3), 2.5)) == ["late"]
    assert run.core.summary(3.0)["rounds"] == 2
    drain(run, 3.0, ("w0",))


def test_drain_ends_at_the_drain_timeout() -> None:
    run = async_run(max_updates=1, drain_timeout=2.0)
    run.start(0.0)
    run.hello("w0", 0.0)
    assert of(BroadcastStop, run.send(update("a000001-t"), 1.0))
    assert run.core.next_wake(1.0) == 3.0
    assert run.tick(2.999) == []
    assert run.tick(3.0) == [PurgeTasks()] and run.core.done


def test_the_stop_broadcast_is_repeated_while_workers_stay() -> None:
    run = async_run(max_updates=1, drain_timeout=10.0)
    run.start(0.0)
    run.hello("w0", 0.0)
    assert of(BroadcastStop, run.send(update("a000001-t"), 1.0)) == [BroadcastStop(1)]
    assert run.core.next_wake(1.0) == 1.0 + STOP_REPEAT_S
    assert run.tick(1.0 + STOP_REPEAT_S - 0.001) == []
    assert run.tick(1.0 + STOP_REPEAT_S) == [BroadcastStop(1)]  # for a worker that was reconnecting
    run.bye("w0", 3.5)
    assert run.tick(3.5 + STOP_REPEAT_S) == [PurgeTasks()]  # gone: no repeat, only the grace


def test_stop_after_max_updates() -> None:
    run = async_run(strategy="fedbuff", buffer_size=2, max_updates=3, concurrency=1)
    run.start(0.0)
    run.hello("w0", 0.0)
    run.send(update("a000001-t", kind="delta"), 1.0)
    run.send(update("a000002-t", kind="delta"), 2.0)
    got = run.send(update("a000003-t", kind="delta", base=0), 3.0)
    assert fates(got) == ["applied"] and of(BroadcastStop, got) == [BroadcastStop(1)]
    assert fates(run.send(update("a000004-t", kind="delta", base=1), 4.0)) == ["late"]
    assert run.core.summary(4.0)["updates_applied"] == 3


def test_stop_at_the_target_accuracy() -> None:
    core = coordinator(config(mode="async", strategy="fedasync", target_accuracy=0.9, concurrency=1))
    run = Driver(core, accuracy=lambda v: 0.5 if v < 3 else 0.95)
    run.start(0.0)
    run.hello("w0", 0.0)
    for i in range(1, 3):
        assert not of(BroadcastStop, run.send(update(f"a{i:06d}-t", base=i - 1), float(i)))
    got = run.send(update("a000003-t", base=2), 3.0)
    assert of(BroadcastStop, got) == [BroadcastStop(3)]
    assert run.core.state.reached_target and run.core.summary(3.0)["accuracy"] == 0.95


def test_the_time_limit_counts_the_wait_for_workers_too() -> None:
    run = async_run(time_limit=5.0, max_updates=None)
    run.start(100.0)
    assert run.core.next_wake(100.0) == 105.0
    run.hello("w0", 102.0)
    assert run.core.elapsed(104.999) == pytest.approx(2.999)  # run time starts with the first work
    assert not of(BroadcastStop, run.tick(104.999))
    got = run.tick(105.0)
    assert of(BroadcastStop, got) == [BroadcastStop(0)] and run.core.failure is None


def test_sync_time_limit_closes_a_round_that_has_min_workers() -> None:
    run = sync_run(workers_per_round=3, min_workers=1, time_limit=5.0, rounds=None)
    run.start(0.0)
    for w in ("w0", "w1", "w2"):
        run.hello(w, 0.0)
    run.send(update("r00001-000", "w0", round_=1), 1.0)
    got = run.tick(5.0)
    assert of(RoundClosed, got) == [RoundClosed(1, 1, 1)] and of(BroadcastStop, got) == [BroadcastStop(1)]


# ====================================================================== presence
def test_liveness_uses_arrival_time_not_the_workers_clock() -> None:
    """A worker whose clock is an hour behind (or ahead) is live; silence makes it leave."""
    run = async_run(min_workers=2, presence_timeout=20.0)
    run.start(5000.0)
    now = 5000.0
    behind = now - 3600.0  # what the old `time.time() - sent_s <= presence_timeout` refused
    run.hello("slow-clock", now, sent_s=behind)
    got = run.hello("fast-clock", now + 0.001, sent_s=now + 3600.0)
    assert run.core.live_workers() == 2
    assert len(tasks(got)) == 2  # min_workers met: the run starts
    # heartbeats keep a worker in, whatever they say the time is
    run.core.presence(hello("slow-clock", sent_s=0.0, kind="heartbeat"), now + 15.0)
    got = run.tick(now + 20.002)
    assert of(WorkerLeft, got) == [WorkerLeft("fast-clock", "silent")]
    assert run.core.live_workers() == 1
    got = run.bye("slow-clock", now + 21.0)
    assert of(WorkerLeft, got) == [WorkerLeft("slow-clock", "bye")]
    assert run.core.live_workers() == 0


def test_presence_without_a_worker_id_or_of_another_kind_is_ignored() -> None:
    run = async_run()
    run.start(0.0)
    assert run.core.presence(messages.Control(kind="hello", worker_id=""), 1.0) == []
    assert run.core.presence(messages.Control(kind="stop", worker_id="w9"), 1.0) == []
    assert run.core.live_workers() == 0


# ====================================================================== async tasks
def test_async_keeps_concurrency_tasks_out_and_replaces_unanswered_ones() -> None:
    run = async_run(concurrency=3, task_timeout=10.0)
    run.start(0.0)
    got = run.hello("w0", 0.0)
    assert [t.task_id for t in tasks(got)] == ["a000001-t", "a000002-t", "a000003-t"]
    assert [t.seed for t in tasks(got)] == [1, 2, 3]  # seed 0 * 1_000_003 + task_seq
    # an answer frees a slot, and a new task goes out at once
    got = run.send(update("a000002-t"), 1.0)
    assert [t.task_id for t in tasks(got)] == ["a000004-t"]
    assert run.core.next_wake(1.0) == 10.0
    assert run.tick(9.999) == []  # no expiry, no new task; presence lasts 20 s
    run.hello("w0", 9.999)
    got = run.tick(10.001)
    assert of(TaskExpired, got) == [TaskExpired("a000001-t", 10.0), TaskExpired("a000003-t", 10.0)]
    assert [t.task_id for t in tasks(got)] == ["a000005-t", "a000006-t"]
    # a late answer to an expired task still counts (its replacement will be a new task)
    assert fates(run.send(update("a000001-t", base=0), 10.5)) == ["applied"]


def test_async_default_concurrency_follows_live_workers() -> None:
    run = async_run()
    run.start(0.0)
    assert len(tasks(run.hello("w0", 0.0))) == 1
    assert len(tasks(run.hello("w1", 0.1))) == 1
    assert len(tasks(run.hello("w2", 0.2))) == 1
    assert len(run.core.state.outstanding) == 3


# ====================================================================== resume
def checkpoint(core: Coordinator, now: float) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """What the shell writes: the state (through JSON), strategy meta, strategy and model arrays."""
    meta = json.loads(json.dumps(core.to_meta(now, ledger_offset=123)))
    strategy_meta, strategy_arrays = core.strategy.state()
    return meta, strategy_meta, {k: v.copy() for k, v in strategy_arrays.items()}, {k: v.copy() for k, v in core.params.items()}


def restore(cfg: AggregatorConfig, saved: tuple[Any, ...], now: float) -> Coordinator:
    meta, strategy_meta, strategy_arrays, params = saved
    strategy = make_strategy(cfg.strategy_name, buffer_size=cfg.buffer_size)
    strategy.restore(strategy_meta, strategy_arrays)
    return Coordinator.from_meta(meta, config=cfg, strategy=strategy, policy=make_policy(cfg), params=params, now=now,
                                 incarnation="t")


def comparable(decisions: list[Decision]) -> list[Any]:
    out: list[Any] = []
    for d in decisions:
        if isinstance(d, Settle):
            skip = ("time_s", "message_id", "redelivered")  # when, and as which delivery: not decisions
            out.append(("settle", d.fate, d.reason, {k: v for k, v in d.entry.items() if k not in skip}))
        elif isinstance(d, VersionEvaluated):
            out.append(("evaluated", {k: v for k, v in d.entry.items() if k != "time_s"}))
        elif not isinstance(d, WorkerJoined | WaitingForWorkers):
            out.append(d)
    return out


def test_async_resume_from_a_checkpoint_makes_the_same_decisions() -> None:
    cfg = config(mode="async", strategy="fedbuff", buffer_size=3, max_updates=12, concurrency=2, task_timeout=50.0)
    run = Driver(coordinator(cfg))
    run.start(0.0)
    run.hello("w0", 0.0)
    rng = np.random.default_rng(0)
    deltas = [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(10)]
    for i in range(4):  # version 1, and one delta buffered
        run.send(update(f"a{i + 1:06d}-t", kind="delta", params=deltas[i]), 1.0 + i)
    assert run.core.state.version == 1 and run.core.strategy.state()[0] == {"count": 1}
    saved = checkpoint(run.core, 10.0)
    assert saved[0]["ledger_offset"] == 123 and saved[0]["elapsed_s"] == pytest.approx(10.0)

    resumed = Driver(restore(cfg, saved, 1000.0))  # another process: another clock
    assert resumed.core.state.ledger_offset == 123 and resumed.core.elapsed(1000.0) == pytest.approx(10.0)
    resumed.start(1000.0)
    resumed.hello("w0", 1000.0)
    # both see the same updates; their decisions and models agree
    for i in range(4, 10):
        a = run.send(update(f"a{i + 1:06d}-t", kind="delta", params=deltas[i], base=run.core.state.version), 10.0 + i)
        b = resumed.send(update(f"a{i + 1:06d}-t", kind="delta", params=deltas[i], base=resumed.core.state.version),
                         1000.0 + i)
        assert comparable(a) == comparable(b)
    # a redelivered, already applied update is a duplicate in both
    assert fates(resumed.send(update("a000002-t", kind="delta", params=deltas[1]), 1020.0)) == ["duplicate"]
    assert run.core.state.version == resumed.core.state.version == 3
    for k in SHAPES:
        assert run.core.params[k].tobytes() == resumed.core.params[k].tobytes()
    # outstanding tasks kept their age: both expire them at the same run time
    assert run.core.next_wake(20.0) is not None and resumed.core.next_wake(1010.0) is not None
    assert sorted(run.core.state.outstanding) == sorted(resumed.core.state.outstanding)


def test_outstanding_tasks_keep_their_age_through_a_checkpoint() -> None:
    cfg = config(mode="async", strategy="fedasync", concurrency=1, task_timeout=30.0, max_updates=100)
    run = Driver(coordinator(cfg))
    run.start(0.0)
    run.hello("w0", 0.0)  # a000001 issued at 0
    saved = checkpoint(run.core, 20.0)  # 20 s old
    resumed = Driver(restore(cfg, saved, 500.0))
    resumed.start(500.0)
    resumed.hello("w0", 500.0)
    assert resumed.tick(509.9) == []
    got = resumed.tick(510.001)
    assert of(TaskExpired, got) == [TaskExpired("a000001-t", 30.0)]
    assert [t.task_id for t in tasks(got)] == ["a000002-t"]  # task_seq survived too


def test_sync_resume_replays_the_same_round() -> None:
    cfg = config(mode="sync", rounds=5, workers_per_round=2, min_workers=2, seed=3)
    run = Driver(coordinator(cfg))
    run.start(0.0)
    run.hello("w0", 0.0)
    run.hello("w1", 0.0)
    run.send(update("r00001-000", "w0", round_=1, value=1.0), 1.0)
    got = run.send(update("r00001-001", "w1", round_=1, value=2.0), 1.1)
    saved = checkpoint(run.core, 1.2)  # the checkpoint after round 1
    round2 = tasks(got)
    # round 2's first update arrives before the crash, and comes back after it
    run.send(update("r00002-000", "w0", base=1, round_=2, value=5.0), 1.5)

    resumed = Driver(restore(cfg, saved, 50.0))
    resumed.start(50.0)
    resumed.send(update("r00002-000", "w0", base=1, round_=2, value=5.0), 50.1, redelivered=True)  # held
    resumed.hello("w0", 50.2)
    got = resumed.hello("w1", 50.3)
    assert tasks(got) == round2  # the same ids, versions and seeds
    a = run.send(update("r00002-001", "w1", base=1, round_=2, value=7.0), 2.0)
    b = resumed.send(update("r00002-001", "w1", base=1, round_=2, value=7.0), 51.0)
    assert comparable(a) == comparable(b)
    assert saved[0]["last_evaluated"] == run.history[0] and saved[0]["evaluations"] == 1
    assert run.history[1:] and [h["accuracy"] for h in run.history[1:]] == [h["accuracy"] for h in resumed.history]
    for k in SHAPES:
        assert run.core.params[k].tobytes() == resumed.core.params[k].tobytes()


def test_a_resumed_run_that_had_reached_its_goal_just_finishes() -> None:
    cfg = config(mode="sync", rounds=1, workers_per_round=1)
    run = Driver(coordinator(cfg))
    run.start(0.0)
    run.hello("w0", 0.0)
    run.send(update("r00001-000", round_=1), 1.0)
    saved = checkpoint(run.core, 2.0)
    resumed = Driver(restore(cfg, saved, 0.0))
    assert resumed.start(0.0) == [BroadcastStop(1)]  # no worker to wait for: only the grace
    assert resumed.tick(DRAIN_GRACE_S) == [PurgeTasks()] and resumed.core.done


def test_prefetch_follows_the_policy() -> None:
    assert make_policy(config(mode="sync", workers_per_round=4)).prefetch(10**6) == 12
    assert make_policy(config(mode="async", checkpoint_every=10)).prefetch(10**6) == 12
    assert make_policy(config(mode="async", checkpoint_every=10)).prefetch(100 * 1024 * 1024) == 2


# ====================================================================== run identity
def test_tasks_name_the_run_and_updates_of_another_run_are_stale() -> None:
    run = async_run(concurrency=1)
    run.start(0.0)
    [task] = tasks(run.hello("w0", 0.0))
    assert task.run_id == RUN == run.core.run_id
    other = "20250101T000000Z-000000"
    got = run.send(update(task.task_id, run=other), 1.0)
    assert fates(got) == ["stale"]
    assert of(Settle, got)[0].reason == f"from run {other}; this run is {RUN}"
    got = run.send(update(task.task_id, run=""), 1.1)  # a message that names no run
    assert fates(got) == ["stale"] and "from run (none)" in str(of(Settle, got)[0].reason)
    # an update of another run is stale even where its model would not fit this one
    assert fates(run.send(update("a000001-t", run=other, base=50), 1.2)) == ["stale"]
    assert fates(run.send(failure(task.task_id, run=other), 1.3)) == ["stale"]
    assert fates(run.send(update(task.task_id), 2.0)) == ["applied"]


def test_tasks_name_the_models_size_so_a_worker_can_refuse_one_it_cannot_hold() -> None:
    run = async_run(concurrency=1)
    run.start(0.0)
    [task] = tasks(run.hello("w0", 0.0))
    assert task.model_bytes == sum(v.nbytes for v in run.core.params.values()) > 0


def test_a_checkpoint_keeps_the_run_id() -> None:
    cfg = config(mode="async", strategy="fedasync", concurrency=1)
    run = Driver(coordinator(cfg))
    run.start(0.0)
    run.hello("w0", 0.0)
    saved = checkpoint(run.core, 1.0)
    assert saved[0]["run_id"] == RUN
    meta, strategy_meta, strategy_arrays, params = saved
    resumed = Coordinator.from_meta(meta, config=cfg, strategy=make_strategy("fedasync"), policy=make_policy(cfg),
                                    params=params, now=0.0, incarnation="u", run_id="20990101T000000Z-ffffff")
    assert resumed.run_id == RUN  # the given id is only for a checkpoint without one
    legacy = {k: v for k, v in meta.items() if k not in ("run_id", "issued", "workers")}
    fresh = Coordinator.from_meta(legacy, config=cfg, strategy=make_strategy("fedasync"), policy=make_policy(cfg),
                                  params=params, now=0.0, incarnation="u", run_id="20990101T000000Z-ffffff")
    assert fresh.run_id == "20990101T000000Z-ffffff"


def test_new_run_ids_have_the_documented_form() -> None:
    import re

    from fedmq.aggregator.service import new_run_id

    assert new_run_id(0.0).startswith("19700101T000000Z-")
    ids = {new_run_id() for _ in range(20)}
    assert len(ids) > 1 and all(re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", i) for i in ids)


# ====================================================================== only issued work counts
def test_async_updates_for_tasks_never_issued_are_rejected() -> None:
    run = async_run(concurrency=2)
    run.start(0.0)
    out = [t.task_id for t in tasks(run.hello("w0", 0.0))]
    assert out == ["a000001-t", "a000002-t"]
    got = run.send(update("a000001-t"), 1.0)
    assert fates(got) == ["applied"]
    # a forged update, and a replay of the applied one under a task id nobody issued
    for forged in ("forged-1", "a000099-t", "a000001-x"):
        got = run.send(update(forged, base=1), 1.1)
        assert fates(got) == ["rejected"], forged
        assert of(Settle, got)[0].reason == f"task {forged!r} was never issued by run {RUN} (or too long ago)"
    # the replay under its own task id: at most once
    assert fates(run.send(update("a000001-t"), 1.2)) == ["duplicate"]
    assert run.core.state.counts["applied"] == 1 and run.core.state.version == 1
    assert fates(run.send(update("a000002-t"), 1.3)) == ["applied"]


def test_async_issued_ids_survive_a_resume_and_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedmq.aggregator.core as core_module

    monkeypatch.setattr(core_module, "ISSUED_MEMORY", 5)
    cfg = config(mode="async", strategy="fedasync", concurrency=2, max_updates=1000)
    run = Driver(coordinator(cfg))
    run.start(0.0)
    run.hello("w0", 0.0)  # a1, a2
    for i in range(1, 9):  # a1..a8 applied, a3..a10 issued
        assert fates(run.send(update(f"a{i:06d}-t", base=i - 1), float(i))) == ["applied"]
    st = run.core.state
    assert sorted(st.outstanding) == ["a000009-t", "a000010-t"]
    assert list(st.issued) == [f"a{i:06d}-t" for i in range(4, 11)]  # 5 + the 2 outstanding
    resumed = Driver(restore(cfg, checkpoint(run.core, 9.0), 100.0))
    resumed.start(100.0)
    resumed.hello("w0", 100.0)
    # a task issued before the checkpoint is answered after the resume: it counts
    assert fates(resumed.send(update("a000010-t", base=8), 101.0)) == ["applied"]
    # one remembered but answered already is a duplicate; one forgotten is rejected
    assert fates(resumed.send(update("a000004-t", base=3), 102.0)) == ["duplicate"]
    # applied, then forgotten with its issue: rejected as too long ago (an answer to it may have been applied)
    got = resumed.send(update("a000003-t", base=2), 103.0)
    assert fates(got) == ["rejected"] and "issued too long ago" in str(of(Settle, got)[0].reason)
    assert "never issued" in str(of(Settle, resumed.send(update("a000001-u", base=2), 104.0))[0].reason)


def test_tasks_issued_after_the_last_checkpoint_still_count_after_a_crash() -> None:
    cfg = config(mode="async", strategy="fedasync", concurrency=2, max_updates=1000)
    run = Driver(coordinator(cfg))
    run.start(0.0)
    run.hello("w0", 0.0)  # a1, a2
    saved = checkpoint(run.core, 1.0)
    run.send(update("a000001-t"), 2.0)  # a3 goes out; then the aggregator is killed before a checkpoint
    assert "a000003-t" in run.core.state.outstanding
    meta, strategy_meta, strategy_arrays, params = saved
    strategy = make_strategy(cfg.strategy_name)
    resumed = Driver(Coordinator.from_meta(meta, config=cfg, strategy=strategy, policy=make_policy(cfg), params=params,
                                           now=100.0, incarnation="u"))
    resumed.start(100.0)
    got = resumed.hello("w0", 100.0)
    assert not tasks(got)  # a1 and a2 are still outstanding
    assert fates(resumed.send(update("a000001-t"), 101.0)) == ["applied"]  # redelivered: not acked before the crash
    assert fates(resumed.send(update("a000003-t", base=1), 102.0)) == ["applied"]  # issued after the checkpoint
    assert fates(resumed.send(failure("a000004-t"), 103.0)) == ["failed"]  # likewise
    # another incarnation, or far beyond what the crashed one could have issued, was never issued
    assert fates(resumed.send(update("a000005-x", base=2), 104.0)) == ["rejected"]
    assert fates(resumed.send(update("a999999-t", base=2), 105.0)) == ["rejected"]
    # and the resumed incarnation's own checkpoint still knows both
    again = checkpoint(resumed.core, 106.0)[0]
    assert again["predecessors"] == [["t", 2]] and again["incarnation"] == "u"


def test_a_late_answer_to_a_reissued_task_counts_weighted_by_its_staleness() -> None:
    run = async_run(concurrency=1, task_timeout=10.0, mixing=0.5)
    run.start(0.0)
    run.hello("w0", 0.0)
    run.hello("w0", 10.0)
    got = run.tick(10.5)
    assert of(TaskExpired, got) == [TaskExpired("a000001-t", 10.0)] and [t.task_id for t in tasks(got)] == ["a000002-t"]
    assert fates(run.send(update("a000002-t"), 11.0)) == ["applied"]
    got = run.send(update("a000001-t", base=0), 12.0)  # the expired one, trained on version 0
    [settle] = of(Settle, got)
    assert settle.fate == "applied" and settle.entry["staleness"] == 1
    assert settle.entry["weight"] == pytest.approx(0.5 * 2 ** -0.5, abs=1e-6)  # mixing * (1 + tau) ** -0.5


def test_sync_only_the_current_rounds_work_counts() -> None:
    run = sync_run(workers_per_round=2, min_workers=2)
    run.start(0.0)
    run.hello("w0", 0.0)
    run.hello("w1", 0.0)
    # the worker's contribution id (docs/protocol.md: r<round>:<worker>) and the round's tasks count
    for forged, why in [
        (update("r00001:w9", "w0", round_=1), "was never issued"),  # another worker's contribution id
        (update("x-1", "w0", round_=1), "was never issued"),
        (update("r00001-007", "w0", round_=1), "was never issued"),  # round 1 has 2 tasks
        (update("r00002:w0", "w0", round_=2), "round 2 has not started"),
        (update("r00001:w0", "w0", round_=2), "of round 1, the update says round 2"),
    ]:
        got = run.send(forged, 0.5)
        assert fates(got) == ["rejected"] and why in str(of(Settle, got)[0].reason), (forged.task_id, got)
    assert run.send(update("r00001:w0", "w0", round_=1), 1.0) == []  # held
    assert fates(run.send(update("r00001:w0", "w0", round_=1), 1.1)) == ["duplicate"]
    got = run.send(update("r00001-001", "w1", round_=1), 1.2)
    assert fates(got) == ["applied", "applied"] and of(RoundClosed, got) == [RoundClosed(1, 1, 2)]
    # a late answer for round 1 is stale, not rejected: it was issued
    assert fates(run.send(update("r00001:w2", "w2", round_=1), 2.0)) == ["stale"]


# ====================================================================== failure reports
def test_async_failure_reports_reissue_the_work() -> None:
    run = async_run(concurrency=2)
    run.start(0.0)
    run.hello("w0", 0.0)
    run.hello("w1", 0.0)
    got = run.send(failure("a000001-t", "w1", "trainer raised ValueError: bad"), 1.0, message_id="failed-a000001-t-w1")
    [settle] = of(Settle, got)
    assert settle.fate == "failed" and settle.reason == "trainer raised ValueError: bad"
    assert settle.entry["task_id"] == "a000001-t" and settle.entry["worker_id"] == "w1"
    assert settle.entry["reason"] == "trainer raised ValueError: bad"
    assert [t.task_id for t in tasks(got)] == ["a000003-t"]  # the work goes out again
    assert sorted(run.core.state.outstanding) == ["a000002-t", "a000003-t"]
    assert run.core.state.counts["failed"] == 1
    # the same report again, one for a task never issued, and a control that has no business here
    assert fates(run.send(failure("a000001-t", "w1"), 1.1, redelivered=True)) == ["duplicate"]
    got = run.send(failure("nope-1", "w1"), 1.2)
    assert fates(got) == ["rejected"] and "never issued" in str(of(Settle, got)[0].reason)
    got = run.send(messages.Control(kind="hello", worker_id="w1", run_id=RUN), 1.3)
    assert fates(got) == ["rejected"] and "on the updates queue" in str(of(Settle, got)[0].reason)
    got = run.send(messages.Control(kind="failed", worker_id="w1", run_id=RUN, info={"reason": "x"}), 1.4)
    assert fates(got) == ["rejected"] and "info.task_id" in str(of(Settle, got)[0].reason)
    # a late answer to the failed task (its worker crashed after reporting, another one trained it) counts
    assert fates(run.send(update("a000001-t", "w0"), 2.0)) == ["applied"]
    assert fates(run.send(failure("a000001-t", "w0"), 2.1)) == ["duplicate"]  # applied already
    assert not run.core.failure


def test_a_worker_that_keeps_failing_is_named_once() -> None:
    run = async_run(concurrency=4)
    run.start(0.0)
    for w in ("w0", "w1", "w2", "w3"):
        run.hello(w, 0.0)
    seq = itertools.count(1)
    notes = []
    for i in range(5):
        notes += of(WorkerKeepsFailing, run.send(failure(f"a{next(seq):06d}-t", "w3", "trainer raised X"), 1.0 + i))
    assert notes == [WorkerKeepsFailing("w3", "trainer raised X", 3)]
    assert of(WorkerKeepsFailing, run.send(failure(f"a{next(seq):06d}-t", "w3", "another reason"), 7.0)) == []


def test_async_run_fails_after_3_x_concurrency_failures_in_a_row() -> None:
    run = async_run(concurrency=2)
    run.start(0.0)
    run.hello("w0", 0.0)
    run.hello("w1", 0.0)
    seq = itertools.count(1)
    for i in range(5):
        run.send(failure(f"a{next(seq):06d}-t", f"w{i % 2}", "trainer raised RuntimeError: always"), 1.0 + i)
    assert fates(run.send(update(f"a{next(seq):06d}-t"), 6.0)) == ["applied"]  # the streak starts again
    for i in range(5):
        got = run.send(failure(f"a{next(seq):06d}-t", f"w{i % 2}", "trainer raised RuntimeError: always"), 7.0 + i)
        assert not of(Failing, got) and not of(BroadcastStop, got)
    got = run.send(failure(f"a{next(seq):06d}-t", "w1", "trainer raised RuntimeError: always"), 12.0)
    [failing] = of(Failing, got)
    assert of(BroadcastStop, got) == [BroadcastStop(1)] and not tasks(got)
    assert failing.reason == run.core.failure
    assert failing.reason.startswith("6 tasks failed in a row with no update applied (3 x concurrency 2)")
    assert "trainer raised RuntimeError: always (w0, w1)" in failing.reason
    drain(run, 13.0, ("w0", "w1"))


def test_sync_failed_tasks_are_reissued_up_to_task_retries() -> None:
    run = sync_run(workers_per_round=2, min_workers=1, task_retries=2)
    run.start(0.0)
    run.hello("w0", 0.0)
    run.hello("w1", 0.0)
    assert run.send(update("r00001:w0", "w0", round_=1), 0.5) == []
    got = run.send(failure("r00001-001", "w1"), 1.0)
    assert fates(got) == ["failed"] and [t.task_id for t in tasks(got)] == ["r00001-001-1"]
    [task] = tasks(got)
    assert (task.round, task.version, task.run_id) == (1, 0, RUN)
    assert of(TaskRetried, got) == [TaskRetried("r00001-001", "r00001-001-1", 1, 2)]
    assert fates(run.send(failure("r00001-001", "w1"), 1.1)) == ["duplicate"]
    assert [t.task_id for t in tasks(run.send(failure("r00001-001-1", "w1"), 2.0))] == ["r00001-001-2"]
    # the last retry fails too: the round gives up on that task and closes with what it has
    got = run.send(failure("r00001-001-2", "w1"), 3.0)
    assert fates(got) == ["failed", "applied"] and of(RoundClosed, got) == [RoundClosed(1, 1, 1)]
    assert not run.core.failure and run.core.state.counts["failed"] == 3
    assert [t.task_id for t in tasks(got)] == ["r00002-000", "r00002-001"]  # round 2: both workers again
    # a report for round 1 now is stale
    assert fates(run.send(failure("r00001-000", "w1"), 4.0)) == ["stale"]


def test_sync_run_fails_when_a_round_cannot_reach_min_workers() -> None:
    run = sync_run(workers_per_round=2, min_workers=2, task_retries=1)
    run.start(0.0)
    run.hello("w0", 0.0)
    run.hello("w1", 0.0)
    assert run.send(update("r00001:w0", "w0", round_=1), 0.5) == []  # held
    run.send(failure("r00001-001", "w1", "trainer raised RuntimeError: this trainer always fails"), 1.0)
    got = run.send(failure("r00001-001-1", "w1", "trainer raised RuntimeError: this trainer always fails"), 2.0)
    [failing] = of(Failing, got)
    assert failing.reason == (
        "round 1 cannot get --min-workers 2 update(s): 1 of its 2 task(s) failed 2 time(s) (1 update(s) arrived); "
        "the workers said: trainer raised RuntimeError: this trainer always fails (w1)"
    )
    # the run stops: the held update is late, the workers are told, no task goes out
    assert fates(got) == ["failed", "late"] and of(BroadcastStop, got) == [BroadcastStop(0)] and not tasks(got)
    assert run.core.failure == failing.reason
    drain(run, 3.0, ("w0", "w1"))


def test_sync_round_waiting_is_reported_every_30_s() -> None:
    run = sync_run(workers_per_round=3, min_workers=3, round_timeout=1000.0, presence_timeout=1e6)
    run.start(0.0)
    for w in ("w0", "w1", "w2"):
        run.hello(w, 0.0)
    run.send(update("r00001:w0", "w0", round_=1), 1.0)
    run.send(failure("r00001-001", "w1", "trainer raised X"), 2.0)
    assert run.core.next_wake(2.0) == 30.0
    assert run.tick(29.9) == []
    assert run.tick(30.0) == [RoundWaiting(1, 1, 3, 30.0, ("w1: trainer raised X",))]
    assert run.tick(45.0) == [] and run.core.next_wake(45.0) == 60.0
    assert run.tick(61.0) == [RoundWaiting(1, 1, 3, 61.0, ("w1: trainer raised X",))]


def test_waiting_for_workers_is_said_again_every_30_s() -> None:
    run = sync_run(min_workers=2, presence_timeout=1e6)
    assert of(WaitingForWorkers, run.start(0.0)) == [WaitingForWorkers(0, 2)]
    run.hello("w0", 1.0)
    assert run.tick(29.9) == [] and run.core.next_wake(29.9) == 30.0
    assert run.tick(30.0) == [WaitingForWorkers(1, 2)]


def test_a_time_limit_reached_while_waiting_for_workers_fails_the_run() -> None:
    run = sync_run(min_workers=2, time_limit=60.0, rounds=None, presence_timeout=1e6)
    run.start(0.0)
    run.hello("w0", 1.0)
    got = run.tick(60.0)
    assert of(Failing, got) == [Failing("--time-limit 60 s passed while waiting for workers (1 of 2 live)")]
    assert of(BroadcastStop, got) == [BroadcastStop(0)]
    drain(run, 61.0, ("w0",))


def test_a_refusing_worker_is_not_live() -> None:
    run = sync_run(min_workers=2)
    run.start(0.0)
    run.hello("w0", 0.0)
    run.hello("w3", 0.0)  # the round opens with both
    refusal = messages.Control(kind="refused", worker_id="w3", run_id=RUN,
                               info={"reason": "the shard has 10 features per sample,\nthe model takes 64"})
    got = run.core.presence(refusal, 1.0)
    assert of(WorkerRefused, got) == [WorkerRefused("w3", "the shard has 10 features per sample, the model takes 64")]
    assert run.core.live_workers() == 1 and not of(WorkerLeft, got)
    assert not of(WorkerJoined, run.core.presence(hello("w3", kind="heartbeat"), 1.5))  # it is on its way out
    assert run.core.live_workers() == 1
    # another run's refusal (the presence stream is read from a while back) is history
    old = messages.Control(kind="refused", worker_id="w0", run_id="20200101T000000Z-000000", info={"reason": "x"})
    assert run.core.presence(old, 2.0) == [] and run.core.live_workers() == 1
    # restarted (say with the right trainer), it says hello and is live again
    assert of(WorkerJoined, run.core.presence(hello("w3"), 3.0)) == [WorkerJoined("w3")]


# ====================================================================== by-hand defaults: the join grace
def test_the_first_round_waits_for_more_workers_for_the_join_grace() -> None:
    run = sync_run(join_grace=5.0)  # min_workers 1
    run.start(0.0)
    got = run.hello("w0", 0.0)
    assert not tasks(got) and of(JoinGrace, got) == [JoinGrace(1, 5.0)]
    assert run.core.next_wake(0.0) == 5.0
    assert not tasks(run.hello("w1", 3.0))  # the grace starts again: until 8
    assert not tasks(run.hello("w2", 7.0))  # until 12
    assert run.tick(11.999) == []
    got = run.tick(12.0)
    assert [t.task_id for t in tasks(got)] == ["r00001-000", "r00001-001", "r00001-002"]
    run.hello("w3", 12.5)  # too late for round 1
    for i, w in enumerate(("w0", "w1", "w2")):
        got = run.send(update(f"r00001:{w}", w, round_=1), 13.0 + i)
    # later rounds: every live worker, at once
    assert [t.task_id for t in tasks(got)] == [f"r00002-{i:03d}" for i in range(4)]


def test_the_join_grace_is_bounded() -> None:
    run = async_run(join_grace=5.0)
    run.start(0.0)
    run.hello("w0", 0.0)
    for i in range(1, 4):  # a new worker every 4 s: without a bound the grace would never end
        assert not tasks(run.hello(f"w{i}", 4.0 * i))
    assert run.core.next_wake(12.0) == 15.0  # 3 x the grace after the first
    got = run.tick(15.0)
    assert len(tasks(got)) == 4


def test_no_join_grace_when_as_many_workers_are_live_as_a_round_uses() -> None:
    run = sync_run(join_grace=5.0, workers_per_round=2)
    run.start(0.0)
    assert not tasks(run.hello("w0", 0.0))
    assert len(tasks(run.hello("w1", 1.0))) == 2


def test_a_round_on_fewer_workers_than_were_seen_is_warned_about() -> None:
    run = sync_run(presence_timeout=10.0, round_timeout=15.0, min_workers=2)
    run.start(0.0)
    run.hello("w0", 0.0)
    run.hello("w1", 0.0)
    assert len(tasks(run.all)) == 2
    run.send(update("r00001:w0", "w0", round_=1), 1.0)
    run.hello("w0", 9.0)
    assert of(WorkerLeft, run.tick(10.5)) == [WorkerLeft("w1", "silent")]
    run.hello("w0", 14.0)
    run.hello("w2", 14.0)
    got = run.send(update("r00001:w1", "w1", round_=1), 14.5)  # sent before it went silent
    assert of(RoundClosed, got) == [RoundClosed(1, 1, 2)] and len(tasks(got)) == 2
    assert of(RoundShort, got) == [RoundShort(2, 2, 3, ("w1",))]
    # said once for the same missing workers
    run.send(update("r00002:w0", "w0", base=1, round_=2), 15.0)
    got = run.send(update("r00002:w2", "w2", base=1, round_=2), 15.5)
    assert of(RoundClosed, got) == [RoundClosed(2, 2, 2)] and not of(RoundShort, got)


# ====================================================================== per-worker figures
def test_per_worker_figures_and_ledger_lines() -> None:
    run = async_run(concurrency=2, strategy="fedasync")
    run.start(0.0)
    run.hello("w0", 0.0)
    run.hello("w1", 0.5)
    got = run.send(update("a000001-t", "w0", loss=0.7), 1.0)
    [entry] = [s.entry for s in of(Settle, got)]
    assert (entry["train_loss"], entry["train_accuracy"], entry["num_samples"], entry["duration_s"]) == (0.7, 0.9, 10, 0.01)
    run.send(update("a000002-t", "w0", loss=0.5, base=0), 2.0)  # staleness 1
    run.send(failure("a000003-t", "w1"), 3.0)
    run.send(update("forged", "w9"), 4.0)  # rejected: names nobody
    report = run.core.workers_report()
    assert report == {
        "w0": {"updates_applied": 2, "mean_staleness": 0.5, "failures": 0, "last_train_loss": 0.5, "last_seen_s": 2.0},
        "w1": {"updates_applied": 0, "mean_staleness": None, "failures": 1, "last_train_loss": None, "last_seen_s": 3.0},
    }
    cfg = run.core.config
    resumed = restore(cfg, checkpoint(run.core, 5.0), 0.0)
    assert resumed.workers_report() == report


# ====================================================================== update compression
def _compressed(task_id: str, worker: str, delta: dict[str, np.ndarray], scheme: str, **kw: Any) -> messages.Update:
    """An update as the aggregator decodes it: compressed on the wire, decompressed to float32."""
    from fedmq.shared import compression

    wire = messages.Update(task_id=task_id, worker_id=worker, base_version=kw.get("base", 0), num_samples=kw.get("n", 10),
                           params=compression.encode_params(delta, compression.parse(scheme)),  # type: ignore[arg-type]
                           kind="delta", train_loss=0.1, train_accuracy=0.9, duration_s=0.01,
                           round=kw.get("round_"), run_id=RUN, compression=scheme)
    decoded = messages.decode(messages.encode(wire))
    assert isinstance(decoded, messages.Update)
    return decoded


def test_a_compressed_fedavg_run_asks_for_deltas_and_averages_them_into_weights() -> None:
    run = Driver(coordinator(config(mode="sync", rounds=5, workers_per_round=2, min_workers=2, compress="int8"),
                             model(1.0)))
    run.start(0.0)
    run.hello("w0", 0.001)
    got = run.hello("w1", 0.002)
    assert {(t.update_kind, t.compression) for t in tasks(got)} == {("delta", "int8")}
    assert run.send(_compressed("r00001-000", "w0", model(0.5), "int8", round_=1, n=10), 0.01) == []
    got = run.send(_compressed("r00001-001", "w1", model(-0.25), "int8", round_=1, n=30), 0.02)
    assert fates(got) == ["applied", "applied"]
    assert {s.entry["compression"] for s in of(Settle, got)} == {"int8"}
    # FedAvg of the weights 1.5 and 0.75 by 10:30 samples, as without compression
    np.testing.assert_allclose(run.core.params["dense_0/W"], 1.0 + (0.5 * 10 - 0.25 * 30) / 40, rtol=1e-2)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_rounded_models_make_fedavg_ask_for_deltas_added_to_its_float32_model(dtype: str) -> None:
    """--model-dtype bfloat16 or int8: workers train on a rounded model, so tasks ask for deltas
    (the rounding then costs nothing); uncompressed deltas of the current version become weights."""
    run = Driver(coordinator(config(mode="sync", rounds=5, workers_per_round=2, min_workers=2,
                                    model_dtype=dtype), model(1.0)))
    run.start(0.0)
    run.hello("w0", 0.001)
    got = run.hello("w1", 0.002)
    assert {(t.update_kind, t.compression) for t in tasks(got)} == {("delta", "none")}
    assert run.send(update("r00001-000", "w0", round_=1, value=0.5, n=10, kind="delta"), 0.01) == []
    got = run.send(update("r00001-001", "w1", round_=1, value=-0.25, n=30, kind="delta"), 0.02)
    assert fates(got) == ["applied", "applied"]
    assert run.core.params["dense_0/W"].dtype == np.float32
    np.testing.assert_allclose(run.core.params["dense_0/W"], 1.0 + (0.5 * 10 - 0.25 * 30) / 40, rtol=1e-6)


def test_model_dtype_must_be_known_and_is_refused_for_fedasync() -> None:
    from fedmq.shared.errors import ConfigError

    with pytest.raises(ConfigError, match="fedasync"):
        config(mode="async", strategy="fedasync", model_dtype="bfloat16")
    with pytest.raises(ConfigError, match="fedasync"):
        config(mode="async", strategy="fedasync", model_dtype="int8")
    with pytest.raises(ConfigError, match="--model-dtype must be one of float32, bfloat16, int8"):
        config(model_dtype="float16")
    assert config(mode="async", strategy="fedbuff", model_dtype="bfloat16").to_json()["model_dtype"] == "bfloat16"


def test_an_update_compressed_otherwise_than_the_run_asked_is_rejected_with_a_reason() -> None:
    run = Driver(coordinator(config(mode="async", max_updates=10, concurrency=1, compress="topk:0.1")))
    run.start(0.0)
    [task] = tasks(run.hello("w0", 0.001))
    assert (task.update_kind, task.compression) == ("delta", "topk:0.1")
    got = run.send(_compressed(task.task_id, "w0", model(0.5), "int8"), 0.01)
    assert fates(got) == ["rejected"] and "compressed with int8, this run asked for topk:0.1" in str(got[0].reason)
    got = run.send(update(task.task_id, kind="delta"), 0.02)  # not compressed at all
    assert fates(got) == ["rejected"] and "compressed with none" in str(got[0].reason)
    got = run.send(_compressed(task.task_id, "w0", model(0.5), "topk:0.1"), 0.03)
    assert fates(got) == ["applied"] and got[0].entry["compression"] == "topk:0.1"

    plain = async_run(strategy="fedbuff", concurrency=1)
    plain.start(0.0)
    [task] = tasks(plain.hello("w0", 0.001))
    assert task.compression == "none"
    got = plain.send(_compressed(task.task_id, "w0", model(0.5), "fp16"), 0.01)
    assert fates(got) == ["rejected"] and "this run asked for none" in str(got[0].reason)


def test_compression_is_refused_for_fedasync_and_must_parse() -> None:
    from fedmq.shared.errors import ConfigError

    with pytest.raises(ConfigError, match="fedasync"):
        config(mode="async", strategy="fedasync", compress="int8")
    with pytest.raises(ConfigError, match="--compress"):
        config(compress="int4")
    assert config(compress="topk:0.10").to_json()["compress"] == "topk:0.10"
