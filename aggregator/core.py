"""The aggregator's decision core: the run's state and every decision about it, and no I/O.

A :class:`Coordinator` is fed what happens (a decoded update message, a worker's presence
message, the answer to an evaluation, a stop request, the passing of time) and returns
*decisions*: small frozen dataclasses that the shell (:mod:`fedmq.aggregator.service`) carries
out in order, before it feeds the next input. The core never touches the broker, a file, a
clock or a thread: time comes in as ``now``, monotonic seconds, with every input; deliveries
are opaque tokens it hands back in :class:`Settle`.

What it decides:

* the fate of each update message, exactly once: ``rejected`` (undecodable or does not fit
  the model), ``late`` (the run is stopping), ``duplicate`` (its task was applied already, or
  its worker already contributed to the round), ``stale`` (for another round, or older than
  ``--max-staleness``) or ``applied``;
* when a version or a round closes, which tasks go out and when (delegated to a
  :class:`Policy`: :class:`~fedmq.aggregator.policy.SyncRounds` or
  :class:`~fedmq.aggregator.policy.AsyncUpdates`);
* which workers are live: those whose last hello or heartbeat *arrived* (by ``now``) less
  than ``--presence-timeout`` seconds ago; a worker's own clock plays no part;
* when the run stops (rounds, max updates, target accuracy, time limit, a stop request), the
  drain that follows, and what a checkpoint holds (:meth:`Coordinator.to_meta`,
  :meth:`Coordinator.from_meta`).

A round or version that closes yields :class:`Evaluate`; the shell answers it with
:meth:`Coordinator.evaluated` before anything else, and the run only moves on (next round, stop
rules) once it has.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

import numpy as np

from fedmq.aggregator.config import AggregatorConfig
from fedmq.aggregator.strategies import Params, Strategy
from fedmq.aggregator.validate import check_update
from fedmq.shared import messages
from fedmq.shared.errors import ValidationError
from fedmq.shared.events import FATES

Token: TypeAlias = Any  # a delivery handle, opaque to the core

#: once every worker left a stopping run, how long it still takes in what they sent before
DRAIN_GRACE_S = 1.0
#: while workers are still live in a stopping run, the stop broadcast is repeated this often
STOP_REPEAT_S = 2.0


# ====================================================================== inputs
@dataclass(frozen=True)
class Undecodable:
    """An update message the shell could not decode (or that was too large), and why."""

    reason: str


@dataclass
class Candidate:
    """A valid, new, timely update, handed to the policy to apply, hold or call stale."""

    token: Token
    update: messages.Update
    entry: dict[str, Any]  # its ledger line so far
    staleness: int


# ====================================================================== decisions
@dataclass(frozen=True)
class Settle:
    """Record ``entry`` in the ledger, then ack ``token`` once a checkpoint holds it.

    A ``rejected`` update is dead-lettered with ``reason`` before it is recorded.
    """

    token: Token
    fate: str
    reason: str | None
    entry: Mapping[str, Any]


@dataclass(frozen=True)
class IssueTask:
    """Publish a task."""

    task: messages.Task


@dataclass(frozen=True)
class PublishModel:
    """Publish model ``version`` (``round`` set in synchronous mode)."""

    version: int
    round: int | None
    params: Params = field(compare=False, repr=False)


@dataclass(frozen=True)
class Evaluate:
    """Evaluate ``params`` (model ``version``) and answer with :meth:`Coordinator.evaluated`."""

    version: int
    params: Params = field(compare=False, repr=False)


@dataclass(frozen=True)
class Checkpoint:
    """Make everything settled so far durable now, then ack it."""


@dataclass(frozen=True)
class BroadcastStop:
    """Tell every worker to stop; the run drains what they still send."""

    version: int


@dataclass(frozen=True)
class PurgeTasks:
    """The drain is over: clear the task queue (the run is done)."""


# notes: things to report, nothing to do
@dataclass(frozen=True)
class WaitingForWorkers:
    have: int
    need: int


@dataclass(frozen=True)
class WorkerJoined:
    worker_id: str


@dataclass(frozen=True)
class WorkerLeft:
    worker_id: str
    reason: str  # "bye" or "silent"


@dataclass(frozen=True)
class TaskExpired:
    """An asynchronous task went unanswered for ``after_s`` seconds; a replacement goes out."""

    task_id: str
    after_s: float


@dataclass(frozen=True)
class RoundOpened:
    round: int
    version: int
    tasks: int


@dataclass(frozen=True)
class RoundClosed:
    round: int
    version: int
    updates: int


@dataclass(frozen=True)
class VersionEvaluated:
    """A version's history entry (the same dict history.json holds)."""

    entry: Mapping[str, Any]


Decision: TypeAlias = (
    Settle | IssueTask | PublishModel | Evaluate | Checkpoint | BroadcastStop | PurgeTasks
    | WaitingForWorkers | WorkerJoined | WorkerLeft | TaskExpired | RoundOpened | RoundClosed | VersionEvaluated
)


# ====================================================================== state
@dataclass
class RunState:
    """Everything a checkpoint holds about the run (besides the model and strategy arrays)."""

    version: int = 0
    round: int = 0
    elapsed_s: float = 0.0  # run time before the clock last started
    applied_tasks: set[str] = field(default_factory=set)  # applied, or stale by --max-staleness
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FATES, 0))
    history: list[dict[str, Any]] = field(default_factory=list)
    outstanding: dict[str, float] = field(default_factory=dict)  # async task id -> issued at (core clock)
    task_seq: int = 0
    ledger_offset: int = 0
    reached_target: bool = False
    staleness_since_version: list[int] = field(default_factory=list)

    def to_meta(self, now: float) -> dict[str, Any]:
        """JSON-like; outstanding tasks are stored by age, so no clock value leaves the process."""
        return {
            "version": self.version, "round": self.round, "elapsed_s": self.elapsed_s,
            "applied_tasks": sorted(self.applied_tasks), "counts": dict(self.counts),
            "history": list(self.history),
            "outstanding_age_s": {k: max(0.0, now - v) for k, v in self.outstanding.items()},
            "task_seq": self.task_seq, "ledger_offset": self.ledger_offset,
            "reached_target": self.reached_target,
            "staleness_since_version": list(self.staleness_since_version),
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], now: float) -> RunState:
        st = cls()
        st.version, st.round, st.elapsed_s = int(meta["version"]), int(meta["round"]), float(meta["elapsed_s"])
        st.applied_tasks = set(meta["applied_tasks"])
        st.counts.update(meta["counts"])
        st.history = list(meta["history"])
        if "outstanding_age_s" in meta:
            st.outstanding = {k: now - float(v) for k, v in meta["outstanding_age_s"].items()}
        else:  # an older checkpoint held wall-clock issue times: count them from now
            st.outstanding = dict.fromkeys(meta.get("outstanding", {}), now)
        st.task_seq, st.ledger_offset = int(meta["task_seq"]), int(meta["ledger_offset"])
        st.reached_target = bool(meta["reached_target"])
        st.staleness_since_version = list(meta.get("staleness_since_version", []))
        return st


class Phase(enum.Enum):
    RUNNING = "running"  # waiting for workers, collecting, applying
    FINISHING = "finishing"  # stop broadcast; every update is late; waiting for workers to leave
    DONE = "done"


# ====================================================================== the policy seam
class Policy(Protocol):
    """How work is handed out and closed: synchronous rounds or asynchronous updates.

    Implementations (:mod:`fedmq.aggregator.policy`) get the coordinator with every call and
    use its helpers (:meth:`Coordinator.settle`, :meth:`Coordinator.task`, ...).
    """

    def round_of(self, state: RunState) -> int | None:
        """The round the run has completed; None where the policy has no rounds."""
        ...

    def prefetch(self, model_bytes: int) -> int:
        """How many update messages the shell may hold unacked at once."""
        ...

    def start(self, run: Coordinator, now: float) -> list[Decision]:
        """The run (or resumed run) begins."""
        ...

    def advance(self, run: Coordinator, now: float) -> list[Decision]:
        """After every input while running: open or close rounds, expire and issue tasks."""
        ...

    def accept(self, run: Coordinator, candidate: Candidate, now: float) -> list[Decision]:
        """Apply, hold or settle an update that is valid, not a duplicate task and not late."""
        ...

    def holds(self, task_id: str) -> bool:
        """Whether an update for ``task_id`` is held unsettled (a duplicate of it is one)."""
        ...

    def evaluated(self, run: Coordinator, now: float) -> list[Decision]:
        """A version's evaluation came back."""
        ...

    def wind_down(self, run: Coordinator, now: float) -> list[Decision]:
        """The run stops (not interrupted): settle or apply whatever is held."""
        ...

    def deadlines(self, run: Coordinator, now: float) -> list[float]:
        """Moments after ``now`` at which :meth:`advance` may have something to do unprompted."""
        ...


# ====================================================================== the coordinator
class Coordinator:
    """The run's state and its decisions. Every input returns the decisions it caused."""

    def __init__(
        self,
        config: AggregatorConfig,
        strategy: Strategy,
        policy: Policy,
        params: Params,
        *,
        state: RunState | None = None,
        incarnation: str = "0",
    ) -> None:
        self.config = config
        self.strategy = strategy
        self.policy = policy
        self.params = params
        self.state = state if state is not None else RunState()
        self.incarnation = incarnation  # makes async task ids unique across restarts
        self.phase = Phase.RUNNING
        self.interrupted = False
        self.live: dict[str, float] = {}  # worker id -> when its last hello/heartbeat arrived
        self._clock_start: float | None = None
        self._awaiting: int | None = None  # the version whose evaluation is outstanding
        self._announced = False
        self._stop_requested = False
        self._drain_until = 0.0
        self._last_left = False
        self._stop_sent = 0.0

    @classmethod
    def from_meta(
        cls,
        meta: Mapping[str, Any],
        *,
        config: AggregatorConfig,
        strategy: Strategy,
        policy: Policy,
        params: Params,
        now: float,
        incarnation: str = "0",
    ) -> Coordinator:
        """A coordinator resumed from :meth:`to_meta` (``strategy`` restored by the caller)."""
        return cls(config, strategy, policy, params, state=RunState.from_meta(meta, now), incarnation=incarnation)

    def to_meta(self, now: float, *, ledger_offset: int | None = None) -> dict[str, Any]:
        """The run state for a checkpoint taken at ``now`` (with the ledger's committed length)."""
        meta = self.state.to_meta(now)
        meta["elapsed_s"] = self.elapsed(now)
        if ledger_offset is not None:
            meta["ledger_offset"] = ledger_offset
        return meta

    # ------------------------------------------------------------------ inputs
    def start(self, now: float) -> list[Decision]:
        """The run begins (fresh or resumed)."""
        return self.policy.start(self, now) + self._advance(now)

    def presence(self, msg: messages.Control, now: float) -> list[Decision]:
        """A presence message arrived at ``now``. Its ``sent_s`` (the worker's clock) is ignored."""
        out: list[Decision] = []
        wid = msg.worker_id
        if wid and msg.kind == "bye":
            if self.live.pop(wid, None) is not None:
                out.append(WorkerLeft(wid, "bye"))
        elif wid and msg.kind in ("hello", "heartbeat"):
            if wid not in self.live:
                out.append(WorkerJoined(wid))
            self.live[wid] = now
        return out + self._advance(now)

    def receive(
        self,
        token: Token,
        update: messages.Update | Undecodable,
        now: float,
        *,
        message_id: str | None,
        redelivered: bool = False,
    ) -> list[Decision]:
        """An update message: decide its fate (or hold it for the round).

        After an interrupt nothing is settled: the message stays unacked, for the broker to
        deliver again to the resumed aggregator. After a finished run it is late.
        """
        if self.phase is Phase.DONE and self.interrupted:
            return []
        st = self.state
        entry: dict[str, Any] = {
            "message_id": message_id, "time_s": round(self.elapsed(now), 3),
            "version": st.version, "redelivered": redelivered,
        }
        if isinstance(update, Undecodable):
            return [self.settle(token, entry, "rejected", update.reason)] + self._advance(now)
        try:
            check_update(update, self._shapes(), expected_kind=self.strategy.update_kind, current_version=st.version)
        except ValidationError as exc:
            return [self.settle(token, entry, "rejected", str(exc))] + self._advance(now)
        entry.update(task_id=update.task_id, worker_id=update.worker_id, base_version=update.base_version,
                     num_samples=update.num_samples)
        st.outstanding.pop(update.task_id, None)
        tau = st.version - update.base_version
        entry["staleness"] = tau
        out: list[Decision]
        if self.phase is not Phase.RUNNING or self._stop_due(now):
            out = [self.settle(token, entry, "late", "arrived after the run stopped")]
        elif update.task_id in st.applied_tasks or self.policy.holds(update.task_id):
            out = [self.settle(token, entry, "duplicate", f"task {update.task_id} was already applied")]
        else:
            out = self.policy.accept(self, Candidate(token, update, entry, tau), now)
        return out + self._advance(now)

    def evaluated(self, version: int, loss: float, accuracy: float, now: float) -> list[Decision]:
        """The answer to :class:`Evaluate`: record the version's history entry, then move on."""
        st = self.state
        taus = st.staleness_since_version
        entry: dict[str, Any] = {
            "version": version, "time_s": round(self.elapsed(now), 3), "accuracy": float(accuracy),
            "loss": float(loss), "updates_applied": st.counts["applied"],
            "staleness_mean": float(np.mean(taus)) if taus else 0.0,
        }
        round_ = self.policy.round_of(st)
        if round_ is not None:
            entry["round"] = round_
        st.staleness_since_version = []
        st.history.append(entry)
        if self.config.target_accuracy is not None and accuracy >= self.config.target_accuracy:
            st.reached_target = True
        if self._awaiting == version:
            self._awaiting = None
        return [VersionEvaluated(dict(entry)), *self.policy.evaluated(self, now), *self._advance(now)]

    def tick(self, now: float) -> list[Decision]:
        """Time passed without input (timeouts, deadlines, the time limit, silent workers)."""
        return self._advance(now)

    def stop(self, now: float, *, interrupted: bool = False) -> list[Decision]:
        """Stop the run. Interrupted: leave at once (held updates stay unacked, for --resume).
        Otherwise: close or abandon what is open, broadcast stop, drain, purge."""
        if self.phase is Phase.DONE:
            return []
        if interrupted:
            self.interrupted = True
            self.phase = Phase.DONE
            return []
        self._stop_requested = True
        return self._advance(now)

    # ------------------------------------------------------------------ queries
    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE

    def elapsed(self, now: float) -> float:
        """Run time: the checkpointed time plus the time since the clock (re)started."""
        if self._clock_start is None:
            return self.state.elapsed_s
        return self.state.elapsed_s + (now - self._clock_start)

    def live_workers(self) -> int:
        return len(self.live)

    def next_wake(self, now: float) -> float | None:
        """The next moment :meth:`tick` may have something to do; None when nothing is timed."""
        cfg = self.config
        times = [seen + cfg.presence_timeout for seen in self.live.values()]
        times += self.policy.deadlines(self, now)
        if cfg.time_limit is not None and self._clock_start is not None:
            times.append(self._clock_start + cfg.time_limit - self.state.elapsed_s)
        if self.phase is Phase.FINISHING:
            times.append(self._drain_until)
            if self.live:
                times.append(self._stop_sent + STOP_REPEAT_S)
        return min(times) if times else None

    def summary(self, now: float) -> dict[str, Any]:
        """The final figures (what ``run()`` returns and history.json's ``final`` holds)."""
        st = self.state
        last = st.history[-1] if st.history else {}
        return {
            "version": st.version, "accuracy": last.get("accuracy"), "loss": last.get("loss"),
            "time_s": round(self.elapsed(now), 3), "updates_applied": st.counts["applied"],
            "updates_rejected": st.counts["rejected"], "updates_stale": st.counts["stale"],
            "updates_duplicate": st.counts["duplicate"], "updates_late": st.counts["late"],
            "reached_target": st.reached_target, "interrupted": self.interrupted,
            "rounds": self.policy.round_of(st),
        }

    # ------------------------------------------------------------------ helpers for policies
    def settle(self, token: Token, entry: dict[str, Any], fate: str, reason: str | None = None) -> Settle:
        """Give an update its fate: counted, and recorded in ``entry``."""
        entry["fate"] = fate
        if reason:
            entry["reason"] = reason
        self.state.counts[fate] += 1
        return Settle(token, fate, reason, dict(entry))

    def task(self, task_id: str, *, version: int | None, round_: int | None, seed: int) -> IssueTask:
        cfg = self.config
        return IssueTask(messages.Task(
            task_id=task_id, version=version, mode=cfg.mode, epochs=cfg.epochs, batch_size=cfg.batch_size,
            lr=cfg.lr, mu=cfg.proximal_mu, seed=seed, round=round_, update_kind=self.strategy.update_kind,
        ))

    def model(self, round_: int | None = None) -> PublishModel:
        """Publish the current model."""
        return PublishModel(self.state.version, round_, self.params)

    def new_version(self, params: Params) -> Evaluate:
        """``params`` become the next version; its evaluation is due before the run moves on."""
        self.params = params
        self.state.version += 1
        self._awaiting = self.state.version
        return Evaluate(self.state.version, params)

    def workers_ready(self) -> bool:
        """At least --min-workers are live (and the next wait will be announced again)."""
        if self.live_workers() >= self.config.min_workers:
            self._announced = False
            return True
        return False

    def wait_for_workers(self) -> list[Decision]:
        """Too few workers: say so once per wait."""
        if self._announced:
            return []
        self._announced = True
        return [WaitingForWorkers(self.live_workers(), self.config.min_workers)]

    def start_clock(self, now: float) -> None:
        """Run time counts from the first moment there is work (not while waiting at first)."""
        if self._clock_start is None:
            self._clock_start = now

    # ------------------------------------------------------------------ internals
    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.params.items()}

    def _stop_due(self, now: float) -> bool:
        st, cfg = self.state, self.config
        if self._stop_requested or st.reached_target:
            return True
        rounds = cfg.effective_rounds
        round_ = self.policy.round_of(st)
        if rounds is not None and (st.version if round_ is None else round_) >= rounds:
            return True
        max_updates = cfg.effective_max_updates
        if max_updates is not None and st.counts["applied"] >= max_updates:
            return True
        return cfg.time_limit is not None and self.elapsed(now) >= cfg.time_limit

    def _advance(self, now: float) -> list[Decision]:
        """What time and the last input make due: the one place the run moves on."""
        out = self._expire_workers(now)
        if self.phase is Phase.DONE or self._awaiting is not None:
            return out
        if self.phase is Phase.FINISHING:
            return out + self._drain(now)
        if self._stop_due(now):
            return out + self._finish(now)
        return out + self.policy.advance(self, now)

    def _expire_workers(self, now: float) -> list[Decision]:
        timeout = self.config.presence_timeout
        silent = [w for w, seen in self.live.items() if now - seen > timeout]
        for wid in silent:
            del self.live[wid]
        return [WorkerLeft(w, "silent") for w in silent]

    def _finish(self, now: float) -> list[Decision]:
        out = self.policy.wind_down(self, now)
        if self._awaiting is not None:
            return out  # a last round closed: finish once its version is evaluated
        self.phase = Phase.FINISHING
        self._drain_until = now + self.config.drain_timeout
        self._stop_sent = now
        return [*out, BroadcastStop(self.state.version), *self._drain(now)]

    def _drain(self, now: float) -> list[Decision]:
        if not self.live and not self._last_left:
            # every worker said bye (or went silent): what they sent before it may still be on
            # its way through another queue; a short grace records it (late) too
            self._last_left = True
            self._drain_until = min(self._drain_until, now + DRAIN_GRACE_S)
        if now >= self._drain_until:
            self.phase = Phase.DONE
            return [PurgeTasks()]
        if self.live and now >= self._stop_sent + STOP_REPEAT_S:
            # a worker that was reconnecting missed the broadcast: say it again
            self._stop_sent = now
            return [BroadcastStop(self.state.version)]
        return []
