"""The aggregator's decision core: the run's state and every decision about it, and no I/O.

A :class:`Coordinator` is fed what happens (a decoded update message, a worker's presence
message, the answer to an evaluation, a stop request, the passing of time) and returns
*decisions*: small frozen dataclasses that the shell (:mod:`fedmq.aggregator.service`) carries
out in order, before it feeds the next input. The core never touches the broker, a file, a
clock or a thread: time comes in as ``now``, monotonic seconds, with every input; deliveries
are opaque tokens it hands back in :class:`Settle`.

What it decides:

* the fate of each message on the updates queue, exactly once: ``stale`` (from another run, for
  another round, or older than ``--max-staleness``), ``rejected`` (undecodable, does not fit the
  model, or answers no task this run issued), ``late`` (the run is stopping), ``duplicate``
  (its task was applied or answered already, or its worker already contributed to the round),
  ``failed`` (a worker's failure report, ``Control(kind="failed")``: the work is issued again)
  or ``applied``;
* which work counts: an update or failure report must answer a task this run issued (async: the
  ids handed out, the last :data:`ISSUED_MEMORY` besides the outstanding ones, kept through a
  checkpoint; sync: the tasks of the current round, or a worker's contribution to it), once;
* when a version or a round closes, which tasks go out and when (delegated to a
  :class:`Policy`: :class:`~fedmq.aggregator.policy.SyncRounds` or
  :class:`~fedmq.aggregator.policy.AsyncUpdates`), and when no update can succeed any more
  (:attr:`Coordinator.failure`: the run stops and the shell raises :class:`RunFailed`);
* which workers are live: those whose last hello or heartbeat *arrived* (by ``now``) less
  than ``--presence-timeout`` seconds ago; a worker's own clock plays no part; a worker that
  refused the run is not live; before the first round or task, once ``--min-workers`` are live,
  a grace of ``--join-grace`` seconds (restarted by each new worker, :data:`JOIN_GRACE_MAX`
  times it at most) lets the others join;
* when the run stops (rounds, max updates, target accuracy, time limit (which also bounds the
  wait for the first workers), failure, a stop request), the drain that follows, and what a
  checkpoint holds (:meth:`Coordinator.to_meta`, :meth:`Coordinator.from_meta`), the run id
  included: ``--resume`` continues the same run.

Waits are reported: the wait for workers and an open round every :data:`REPORT_EVERY_S` seconds.

A round or version that closes yields :class:`Evaluate`; the shell answers it with
:meth:`Coordinator.evaluated` before anything else, and the run only moves on (next round, stop
rules) once it has.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

import numpy as np

from fedmq.aggregator import taskids, versions
from fedmq.aggregator.config import AggregatorConfig
from fedmq.aggregator.strategies import Params, Strategy
from fedmq.aggregator.timers import Stamps
from fedmq.aggregator.validate import as_weights, check_update
from fedmq.shared import messages
from fedmq.shared.errors import FedmqError, ValidationError
from fedmq.shared.events import FATES

Token: TypeAlias = Any  # a delivery handle, opaque to the core

#: once every worker left a stopping run, how long it still takes in what they sent before
DRAIN_GRACE_S = 1.0
#: while workers are still live in a stopping run, the stop broadcast is repeated this often
STOP_REPEAT_S = 2.0
#: a wait (for workers, for a round's updates) is reported this often
REPORT_EVERY_S = 30.0
#: the join grace restarts with each new worker, but lasts at most this many --join-grace in all
JOIN_GRACE_MAX = 3.0
#: asynchronous task ids remembered besides the outstanding ones (answers to older ones are rejected)
ISSUED_MEMORY = 4096
#: resumed incarnations of a run whose unrecorded task ids are still recognised
MAX_PREDECESSORS = 8
#: identical failures in a row from one worker before "keeps failing" is said (once)
KEEPS_FAILING_AFTER = 3
#: asynchronous runs fail after this many times --concurrency failures in a row, nothing applied
ASYNC_FAILURE_FACTOR = 3


class RunFailed(FedmqError):
    """The run cannot succeed (every task fails, no worker came within --time-limit); exit 1."""


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


@dataclass
class FailureReport:
    """A worker's report that it could not train task ``task_id`` (from this run, not late)."""

    token: Token
    task_id: str
    worker_id: str
    reason: str
    entry: dict[str, Any]  # its ledger line so far


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
    """Evaluate ``params`` (model ``version``) and answer with :meth:`Coordinator.evaluated`.

    ``renumbered_from``: the number this version would have had, had the aggregator before a
    restart not published a version with that number and other parameters
    (:mod:`fedmq.aggregator.versions`)."""

    version: int
    params: Params = field(compare=False, repr=False)
    renumbered_from: int | None = None


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
class WorkerRefused:
    """A worker refused the run (its shard or trainer does not fit the model); it is not live."""

    worker_id: str
    reason: str


@dataclass(frozen=True)
class WorkerKeepsFailing:
    """A worker reported the same failure ``times`` times in a row (said once per reason)."""

    worker_id: str
    reason: str
    times: int


@dataclass(frozen=True)
class JoinGrace:
    """``have`` workers are live, enough to start; the run waits up to ``grace_s`` for more."""

    have: int
    grace_s: float


@dataclass(frozen=True)
class RoundWaiting:
    """A synchronous round is still open after ``waited_s`` seconds (said every REPORT_EVERY_S)."""

    round: int
    have: int
    wanted: int
    waited_s: float
    failed: tuple[str, ...] = ()  # "worker: reason" of the round's failed tasks


@dataclass(frozen=True)
class RoundShort:
    """A round runs on ``tasks`` workers though ``seen`` were live in this run (``missing`` are not)."""

    round: int
    tasks: int
    seen: int
    missing: tuple[str, ...]


@dataclass(frozen=True)
class TaskRetried:
    """Task ``failed_task`` was reported failed; ``task_id`` replaces it (retry ``attempt`` of ``retries``)."""

    failed_task: str
    task_id: str
    attempt: int
    retries: int


@dataclass(frozen=True)
class Failing:
    """No update can succeed: the run stops, and ends with :class:`RunFailed` (``reason``)."""

    reason: str


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
    | WaitingForWorkers | WorkerJoined | WorkerLeft | WorkerRefused | WorkerKeepsFailing | JoinGrace
    | TaskExpired | TaskRetried | RoundOpened | RoundClosed | RoundWaiting | RoundShort | VersionEvaluated | Failing
)


# ====================================================================== state
#: a pooled heartbeat names at most this many other workers (docs/protocol.md, "Presence")
MAX_VOUCHED = 1024


def vouched_for(msg: messages.Control) -> list[str]:
    """The other workers a pooled heartbeat says are alive (``info["workers"]``): the workers of
    one ``fedmq workers`` process, beating together. Nothing if the list is malformed (not a
    list of at most :data:`MAX_VOUCHED` non-empty strings of at most 200 characters)."""
    ids = msg.info.get("workers")
    if not isinstance(ids, list) or len(ids) > MAX_VOUCHED:
        return []
    if not all(isinstance(w, str) and 0 < len(w) <= 200 for w in ids):
        return []
    return ids


def new_worker_stats() -> dict[str, Any]:
    """A worker's figures in the run (history.json's ``workers`` is made from them)."""
    return {"updates_applied": 0, "staleness_sum": 0.0, "failures": 0, "last_train_loss": None, "last_seen_s": None}


@dataclass
class RunState:
    """Everything a checkpoint holds about the run (besides the model and strategy arrays).

    Its size does not grow with the length of the run: the evaluated versions live in the
    append-only ``history.jsonl`` (the checkpoint records its committed length,
    ``history_offset``, as it does the ledger's), the state keeps only the last one; the
    settled task ids are only those an update could still claim (:meth:`Policy.forget`), and
    task ids are written as runs of consecutive ids (:mod:`fedmq.aggregator.taskids`).
    """

    version: int = 0
    round: int = 0
    elapsed_s: float = 0.0  # run time before the clock last started
    applied_tasks: set[str] = field(default_factory=set)  # applied, or stale by --max-staleness (bounded)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FATES, 0))
    last_evaluated: dict[str, Any] | None = None  # the newest history entry (the rest: history.jsonl)
    evaluations: int = 0  # history entries so far
    # async task id -> issued at (core clock); the coordinator makes it a Stamps (expiry without scans)
    outstanding: MutableMapping[str, float] = field(default_factory=dict)
    task_seq: int = 0
    ledger_offset: int = 0
    history_offset: int = 0
    reached_target: bool = False
    staleness_since_version: list[int] = field(default_factory=list)
    run_id: str = ""
    # async task ids issued, oldest first -> "open" or "failed" (the last ISSUED_MEMORY + outstanding)
    issued: dict[str, str] = field(default_factory=dict)
    # (incarnation, task_seq) of the checkpoints this run was resumed from: that incarnation may
    # have issued tasks after its last checkpoint, with higher sequence numbers
    predecessors: list[tuple[str, int]] = field(default_factory=list)
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)  # worker id -> new_worker_stats()
    # a checkpoint written before history.jsonl held the whole history: handed to the shell once
    legacy_history: list[dict[str, Any]] | None = None

    def to_meta(self, now: float) -> dict[str, Any]:
        """JSON-like; outstanding tasks are stored by age, so no clock value leaves the process."""
        return {
            "version": self.version, "round": self.round, "elapsed_s": self.elapsed_s,
            # applied ids still issued are marked in "issued_runs" (one pass, few runs); the others here
            "applied_runs": taskids.pack_set(self.applied_tasks.difference(self.issued)), "counts": dict(self.counts),
            "last_evaluated": self.last_evaluated, "evaluations": self.evaluations,
            "outstanding_age_s": {k: max(0.0, now - v) for k, v in self.outstanding.items()},
            "task_seq": self.task_seq, "ledger_offset": self.ledger_offset, "history_offset": self.history_offset,
            "reached_target": self.reached_target,
            "staleness_since_version": list(self.staleness_since_version),
            "run_id": self.run_id, "issued_runs": taskids.pack_marked(self.issued, self.applied_tasks),
            "predecessors": [list(p) for p in self.predecessors],
            "workers": {w: dict(v) for w, v in self.workers.items()},
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], now: float) -> RunState:
        st = cls()
        st.version, st.round, st.elapsed_s = int(meta["version"]), int(meta["round"]), float(meta["elapsed_s"])
        if "applied_runs" in meta:
            st.applied_tasks = taskids.unpack_set(meta["applied_runs"])
        else:  # written before the runs form
            st.applied_tasks = set(meta["applied_tasks"])
        if "issued_runs" in meta:
            st.issued, applied = taskids.unpack_marked(meta["issued_runs"])
            st.applied_tasks |= applied
        st.counts.update(meta["counts"])
        if "history" in meta:  # written before history.jsonl: the shell writes it from this list
            st.legacy_history = list(meta["history"])
            st.last_evaluated = dict(st.legacy_history[-1]) if st.legacy_history else None
            st.evaluations = len(st.legacy_history)
        else:
            st.last_evaluated = dict(meta["last_evaluated"]) if meta.get("last_evaluated") else None
            st.evaluations = int(meta.get("evaluations", 0))
        if "outstanding_age_s" in meta:
            st.outstanding = {k: now - float(v) for k, v in meta["outstanding_age_s"].items()}
        else:  # an older checkpoint held wall-clock issue times: count them from now
            st.outstanding = dict.fromkeys(meta.get("outstanding", {}), now)
        st.task_seq, st.ledger_offset = int(meta["task_seq"]), int(meta["ledger_offset"])
        st.history_offset = int(meta.get("history_offset", 0))
        st.reached_target = bool(meta["reached_target"])
        st.staleness_since_version = list(meta.get("staleness_since_version", []))
        st.run_id = str(meta.get("run_id", ""))
        # an older checkpoint did not record issued ids: its outstanding ones at least were
        if "issued_runs" not in meta:
            st.issued = {str(k): str(v) for k, v in meta.get("issued", dict.fromkeys(st.outstanding, "open")).items()}
        st.workers = {str(w): {**new_worker_stats(), **v} for w, v in meta.get("workers", {}).items()}
        predecessors = [(str(i), int(n)) for i, n in meta.get("predecessors", [])]
        if "incarnation" in meta:  # the incarnation that wrote this checkpoint
            predecessors.append((str(meta["incarnation"]), st.task_seq))
        st.predecessors = predecessors[-MAX_PREDECESSORS:]
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

    def unissued(self, run: Coordinator, update: messages.Update) -> str | None:
        """Why ``update`` answers no task this run issued (it is rejected); None if it answers one."""
        ...

    def accept(self, run: Coordinator, candidate: Candidate, now: float) -> list[Decision]:
        """Apply, hold or settle an update that is valid, issued, not a duplicate task and not late."""
        ...

    def failed(self, run: Coordinator, report: FailureReport, now: float) -> list[Decision]:
        """Settle a failure report of this run (not late, its task not applied); issue the work again."""
        ...

    def holds(self, task_id: str) -> bool:
        """Whether an update for ``task_id`` is held unsettled (a duplicate of it is one)."""
        ...

    def forget(self, run: Coordinator) -> None:
        """Drop from ``run.state.applied_tasks`` the ids no update can claim any more (an update
        for one is stale or rejected as unissued whatever the set says), so the set is bounded."""
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
        run_id: str = "",
    ) -> None:
        self.config = config
        self.strategy = strategy
        self.policy = policy
        self.params = params
        self.model_bytes = sum(int(v.nbytes) for v in params.values())  # tasks say it: workers check they can hold it
        self.state = state if state is not None else RunState()
        if not self.state.run_id:
            self.state.run_id = run_id  # a resumed run keeps its own
        self.incarnation = incarnation  # makes async task ids unique across restarts
        self.phase = Phase.RUNNING
        self.interrupted = False
        self.failure: str | None = None  # why no update can succeed: the run stops, and fails
        self.live = Stamps(config.presence_timeout)  # worker id -> when its last hello/heartbeat arrived
        self.state.outstanding = Stamps(config.task_timeout, self.state.outstanding)
        self.seen: set[str] = set()  # workers live at some point of this run (in this process)
        self.refused: set[str] = set()  # workers that refused the run (until they say hello again)
        self._started_at: float | None = None  # when start() was called: --time-limit counts from it
        self._clock_start: float | None = None
        self._awaiting: int | None = None  # the version whose evaluation is outstanding
        self._announced = False  # waiting for workers, and said so
        self._report_at = 0.0  # when to say it again
        self._released = False  # the first round or task went out (the join grace is over)
        self._quorum_since: float | None = None  # --min-workers live since, before the release
        self._grace_until = 0.0
        self._grace_said = False
        self._stop_requested = False
        self._drain_until = 0.0
        self._last_left = False
        self._stop_sent = 0.0
        self._failing: dict[str, tuple[str, int]] = {}  # worker -> (its last failure, how often in a row)
        self._said_failing: set[tuple[str, str]] = set()
        # sync versions an aggregator before a restart may have published past the checkpoint
        # this one resumed from -> their parameters' digest; see versions.renumber
        self.lost: dict[int, str] = {}

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
        run_id: str = "",
    ) -> Coordinator:
        """A coordinator resumed from :meth:`to_meta` (``strategy`` restored by the caller); it keeps
        the checkpoint's run id (``run_id`` only for a checkpoint that has none)."""
        return cls(config, strategy, policy, params, state=RunState.from_meta(meta, now), incarnation=incarnation,
                   run_id=run_id)

    def to_meta(self, now: float, *, ledger_offset: int | None = None,
                history_offset: int | None = None) -> dict[str, Any]:
        """The run state for a checkpoint taken at ``now`` (with the committed lengths of the
        ledger and of history.jsonl). Settled task ids that no update can claim any more are
        dropped first (:meth:`Policy.forget`): the checkpoint's size does not grow with the run."""
        self.policy.forget(self)
        meta = self.state.to_meta(now)
        meta["elapsed_s"] = self.elapsed(now)
        meta["incarnation"] = self.incarnation
        if ledger_offset is not None:
            meta["ledger_offset"] = ledger_offset
        if history_offset is not None:
            meta["history_offset"] = history_offset
        return meta

    @property
    def issued_memory(self) -> int:
        """Asynchronous task ids remembered besides the outstanding ones (--issued-memory)."""
        return self.config.issued_memory or ISSUED_MEMORY

    @property
    def run_id(self) -> str:
        return self.state.run_id

    @property
    def compression(self) -> str:
        """The run's --compress scheme, as tasks and updates name it."""
        return self.config.compression().text

    @property
    def update_kind(self) -> str:
        """What tasks ask for: the strategy's kind, or deltas when updates are compressed or models
        travel rounded (--model-dtype bfloat16: a delta from the rounded model, added to the
        float32 model, loses nothing to the rounding); :func:`as_weights` turns them back into
        weights for a strategy that wants those."""
        lossy_wire = self.compression != "none" or self.config.model_dtype != "float32"
        return "delta" if lossy_wire else self.strategy.update_kind

    # ------------------------------------------------------------------ inputs
    def start(self, now: float) -> list[Decision]:
        """The run begins (fresh or resumed)."""
        if self._started_at is None:
            self._started_at = now
        return self.policy.start(self, now) + self._advance(now)

    def presence(self, msg: messages.Control, now: float) -> list[Decision]:
        """A presence message arrived at ``now``. Its ``sent_s`` (the worker's clock) is ignored.

        A ``refused`` of this run takes the worker out of the live ones; its heartbeats are
        ignored until it says hello again (restarted, e.g. with the right trainer).
        """
        out: list[Decision] = []
        wid = msg.worker_id
        if wid and msg.kind == "refused":
            if not msg.run_id or msg.run_id == self.run_id:  # another run's refusal is history
                self.live.pop(wid, None)
                self.seen.discard(wid)
                self.refused.add(wid)
                out.append(WorkerRefused(wid, one_line(str(msg.info.get("reason") or "no reason given"))))
        elif wid and msg.kind == "bye":
            if self.live.pop(wid, None) is not None:
                out.append(WorkerLeft(wid, "bye"))
        elif wid and msg.kind == "hello":
            self.refused.discard(wid)
            out += self._alive(wid, now)
        elif wid and msg.kind == "heartbeat":
            for one in (wid, *vouched_for(msg)):
                if one not in self.refused:
                    out += self._alive(one, now)
        return out + self._advance(now)

    def _alive(self, wid: str, now: float) -> list[Decision]:
        """Worker ``wid`` said it is alive at ``now``."""
        out: list[Decision] = []
        if wid not in self.live:
            out.append(WorkerJoined(wid))
            self._extend_grace(now)
        self.live[wid] = now
        self.seen.add(wid)
        self._worker(wid)["last_seen_s"] = round(self.elapsed(now), 3)
        return out

    def receive(
        self,
        token: Token,
        update: messages.Update | messages.Control | Undecodable,
        now: float,
        *,
        message_id: str | None,
        redelivered: bool = False,
    ) -> list[Decision]:
        """A message from the updates queue (an update, or a worker's failure report): decide its
        fate (or hold it for the round).

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
        out: list[Decision]
        if isinstance(update, Undecodable):
            out = [self.settle(token, entry, "rejected", update.reason)]
        elif isinstance(update, messages.Control):
            out = self._report(token, update, entry, now)
        else:
            out = self._update(token, update, entry, now)
        return out + self._advance(now)

    def incomplete(self, token: Token, now: float, *, message_id: str, reason: str, task_id: str | None = None,
                   worker_id: str | None = None) -> list[Decision]:
        """A chunked update whose chunks stopped arriving: settled ``incomplete``, never applied.

        After an interrupt nothing is settled (its chunks come again to the resumed aggregator).
        """
        if self.phase is Phase.DONE and self.interrupted:
            return []
        entry: dict[str, Any] = {"message_id": message_id, "time_s": round(self.elapsed(now), 3),
                                 "version": self.state.version, "redelivered": False}
        if task_id:
            entry["task_id"] = task_id
        if worker_id:
            entry["worker_id"] = worker_id
        return [self.settle(token, entry, "incomplete", reason)]

    def evaluated(self, version: int, loss: float, accuracy: float, now: float, *,
                  digest: str | None = None) -> list[Decision]:
        """The answer to :class:`Evaluate`: record the version's history entry, then move on.

        ``digest``: :func:`versions.params_digest` of the version, kept in its entry (a sync
        version is published before its checkpoint is written: see :mod:`fedmq.aggregator.versions`)."""
        st = self.state
        taus = st.staleness_since_version
        entry: dict[str, Any] = {
            "version": version, "time_s": round(self.elapsed(now), 3), "accuracy": float(accuracy),
            "loss": float(loss), "updates_applied": st.counts["applied"],
            "staleness_mean": float(np.mean(taus)) if taus else 0.0,
        }
        if digest is not None:
            entry[versions.DIGEST_FIELD] = digest
        round_ = self.policy.round_of(st)
        if round_ is not None:
            entry["round"] = round_
        entry.update(self.strategy.report())  # e.g. the privacy spent so far
        st.staleness_since_version = []
        st.last_evaluated = dict(entry)
        st.evaluations += 1
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

    def limit_elapsed(self, now: float) -> float:
        """What ``--time-limit`` bounds: the run time, and in this process also the wait for the
        first workers (the run time starts with the first work)."""
        if self._started_at is None:
            return self.elapsed(now)
        return self.state.elapsed_s + (now - self._started_at)

    @property
    def outstanding(self) -> Stamps:
        """The state's outstanding async tasks, as the :class:`Stamps` the constructor made them."""
        stamps = self.state.outstanding
        assert isinstance(stamps, Stamps)
        return stamps

    def live_workers(self) -> int:
        return len(self.live)

    def next_wake(self, now: float) -> float | None:
        """The next moment :meth:`tick` may have something to do; None when nothing is timed."""
        cfg = self.config
        first = self.live.next_expiry()
        times = [] if first is None else [first]
        times += self.policy.deadlines(self, now)
        if self.phase is Phase.RUNNING:
            if cfg.time_limit is not None and self._started_at is not None:
                times.append(self._started_at + cfg.time_limit - self.state.elapsed_s)
            if self._announced:
                times.append(self._report_at)
            if not self._released and self._quorum_since is not None:
                times.append(self._grace_until)
        if self.phase is Phase.FINISHING:
            times.append(self._drain_until)
            if self.live:
                times.append(self._stop_sent + STOP_REPEAT_S)
        return min(times) if times else None

    def summary(self, now: float) -> dict[str, Any]:
        """The final figures (what ``run()`` returns and history.json's ``final`` holds)."""
        st = self.state
        last = st.last_evaluated or {}
        return {
            "version": st.version, "accuracy": last.get("accuracy"), "loss": last.get("loss"),
            "time_s": round(self.elapsed(now), 3), "updates_applied": st.counts["applied"],
            "updates_rejected": st.counts["rejected"], "updates_stale": st.counts["stale"],
            "updates_duplicate": st.counts["duplicate"], "updates_late": st.counts["late"],
            "reached_target": st.reached_target, "interrupted": self.interrupted,
            "rounds": self.policy.round_of(st),
            **{k: last[k] for k in ("dp_epsilon", "dp_delta") if k in last},
        }

    def workers_report(self) -> dict[str, dict[str, Any]]:
        """Per worker id: updates applied, their mean staleness, failures reported, the train loss
        of its last applied update, and when it was last seen (run time, seconds)."""
        out: dict[str, dict[str, Any]] = {}
        for wid in sorted(self.state.workers):
            w = self.state.workers[wid]
            n = int(w["updates_applied"])
            out[wid] = {
                "updates_applied": n,
                "mean_staleness": round(float(w["staleness_sum"]) / n, 4) if n else None,
                "failures": int(w["failures"]),
                "last_train_loss": w["last_train_loss"],
                "last_seen_s": w["last_seen_s"],
            }
        return out

    # ------------------------------------------------------------------ helpers for policies
    def settle(self, token: Token, entry: dict[str, Any], fate: str, reason: str | None = None) -> Settle:
        """Give an update its fate: counted, and recorded in ``entry`` (and the worker's figures)."""
        entry["fate"] = fate
        if reason:
            entry["reason"] = reason
        self.state.counts[fate] += 1
        wid = entry.get("worker_id")
        if wid and fate != "rejected":  # a rejected message may name anyone
            w = self._worker(str(wid))
            w["last_seen_s"] = max(float(w["last_seen_s"] or 0.0), float(entry["time_s"]))
            if fate == "applied":
                w["updates_applied"] += 1
                w["staleness_sum"] += float(entry.get("staleness") or 0)
                if entry.get("train_loss") is not None:
                    w["last_train_loss"] = entry["train_loss"]
                self._failing.pop(str(wid), None)
            elif fate == "failed":
                w["failures"] += 1
        return Settle(token, fate, reason, dict(entry))

    def task(self, task_id: str, *, version: int | None, round_: int | None, seed: int) -> IssueTask:
        cfg = self.config
        return IssueTask(messages.Task(
            task_id=task_id, version=version, mode=cfg.mode, epochs=cfg.epochs, batch_size=cfg.batch_size,
            lr=cfg.lr, mu=cfg.proximal_mu, seed=seed, round=round_, update_kind=self.update_kind,
            run_id=self.run_id, compression=self.compression, model_bytes=self.model_bytes,
        ))

    def remember_issued(self, task_id: str) -> None:
        """An asynchronous task went out: remember its id (the last ISSUED_MEMORY, and every outstanding one)."""
        st = self.state
        st.issued[task_id] = "open"
        excess = len(st.issued) - self.issued_memory - len(st.outstanding)
        if excess > 0:
            # the oldest ids not outstanding (stops after ``excess`` of them: no scan of every outstanding one)
            old = list(itertools.islice((t for t in st.issued if t not in st.outstanding), excess))
            for t in old:
                del st.issued[t]

    def task_failed(self, report: FailureReport) -> list[Decision]:
        """Settle a genuine failure report as ``failed`` (with the worker's reason); say once when
        a worker keeps failing the same way."""
        out: list[Decision] = [self.settle(report.token, report.entry, "failed", report.reason)]
        wid, reason = report.worker_id, report.reason
        last, times = self._failing.get(wid, ("", 0))
        times = times + 1 if last == reason else 1
        self._failing[wid] = (reason, times)
        if times >= KEEPS_FAILING_AFTER and (wid, reason) not in self._said_failing:
            self._said_failing.add((wid, reason))
            out.append(WorkerKeepsFailing(wid, reason, times))
        return out

    def fail(self, reason: str) -> list[Decision]:
        """No update can succeed: the run stops (and the shell raises :class:`RunFailed`)."""
        if self.failure is not None:
            return []
        self.failure = reason
        return [Failing(reason)]

    def model(self, round_: int | None = None) -> PublishModel:
        """Publish the current model."""
        return PublishModel(self.state.version, round_, self.params)

    def new_version(self, params: Params) -> Evaluate:
        """``params`` become the next version; its evaluation is due before the run moves on.

        Its number is the next one, unless a version with that number and other parameters may
        have been published before a restart (:attr:`lost`): then the next unused one."""
        self.params = params
        wanted = self.state.version + 1
        digest = versions.params_digest(params) if self.lost else None
        self.state.version, self.lost = versions.renumber(wanted, digest, self.lost)
        self._awaiting = self.state.version
        return Evaluate(self.state.version, params, renumbered_from=wanted if self.state.version != wanted else None)

    def workers_ready(self, now: float) -> bool:
        """At least --min-workers are live (and the next wait will be announced again), and,
        before the first round or task, the join grace is over.

        The grace (``--join-grace``) starts when --min-workers are live, restarts with every
        new worker, and lasts JOIN_GRACE_MAX times --join-grace at most; it is skipped when as
        many workers are live as the run can use (--workers-per-round, --concurrency).
        """
        cfg = self.config
        live = self.live_workers()
        if live < cfg.min_workers:
            if not self._released:
                self._quorum_since, self._grace_said = None, False
            return False
        if not self._released:
            usable = cfg.workers_per_round if cfg.synchronous else cfg.concurrency
            if cfg.join_grace > 0 and not (usable is not None and live >= usable):
                if self._quorum_since is None:
                    self._quorum_since, self._grace_until = now, now + cfg.join_grace
                if now < self._grace_until:
                    return False
            self._released = True
        self._announced = False
        return True

    def wait_for_workers(self, now: float) -> list[Decision]:
        """Too few workers (said when the wait starts, then every REPORT_EVERY_S), or the join grace
        (said once)."""
        live = self.live_workers()
        if live >= self.config.min_workers:
            if self._grace_said:
                return []
            self._grace_said = True
            return [JoinGrace(live, round(self._grace_until - now, 3))]
        if self._announced and now < self._report_at:
            return []
        self._announced = True
        self._report_at = now + REPORT_EVERY_S
        return [WaitingForWorkers(live, self.config.min_workers)]

    def start_clock(self, now: float) -> None:
        """Run time counts from the first moment there is work (not while waiting at first)."""
        if self._clock_start is None:
            self._clock_start = now

    # ------------------------------------------------------------------ internals
    def _worker(self, wid: str) -> dict[str, Any]:
        return self.state.workers.setdefault(wid, new_worker_stats())

    def _extend_grace(self, now: float) -> None:
        """A new worker during the join grace: the grace starts again (up to its maximum)."""
        if not self._released and self._quorum_since is not None:
            cap = self._quorum_since + JOIN_GRACE_MAX * self.config.join_grace
            self._grace_until = max(self._grace_until, min(now + self.config.join_grace, cap))

    def _other_run(self, run_id: str) -> str | None:
        if run_id == self.run_id:
            return None
        return f"from run {run_id or '(none)'}; this run is {self.run_id}"

    def _update(self, token: Token, update: messages.Update, entry: dict[str, Any], now: float) -> list[Decision]:
        st = self.state
        entry.update(task_id=update.task_id, worker_id=update.worker_id, base_version=update.base_version,
                     num_samples=update.num_samples)
        other = self._other_run(update.run_id)
        if other is not None:
            return [self.settle(token, entry, "stale", other)]
        if update.compression != "none" or self.compression != "none":
            entry["compression"] = update.compression
        try:
            check_update(update, self._shapes(), expected_kind=self.update_kind, current_version=st.version,
                         compression=self.compression)
        except ValidationError as exc:
            return [self.settle(token, entry, "rejected", str(exc))]
        if self.strategy.update_kind == "weights" and update.kind == "delta" and update.base_version == st.version:
            update = as_weights(update, self.params)
        entry.update(train_loss=update.train_loss, train_accuracy=update.train_accuracy,
                     duration_s=round(update.duration_s, 4))
        tau = st.version - update.base_version
        entry["staleness"] = tau
        if self.phase is not Phase.RUNNING or self._stop_due(now):
            return [self.settle(token, entry, "late", "arrived after the run stopped")]
        if update.task_id in st.applied_tasks or self.policy.holds(update.task_id):
            return [self.settle(token, entry, "duplicate", f"task {update.task_id} was already applied")]
        why = self.policy.unissued(self, update)
        if why is not None:
            return [self.settle(token, entry, "rejected", why)]
        st.outstanding.pop(update.task_id, None)
        return self.policy.accept(self, Candidate(token, update, entry, tau), now)

    def _report(self, token: Token, msg: messages.Control, entry: dict[str, Any], now: float) -> list[Decision]:
        """A control message on the updates queue: a worker's failure report, or out of place."""
        if msg.kind != "failed":
            return [self.settle(token, entry, "rejected", f"a {msg.kind!r} control message on the updates queue")]
        task_id, reason = msg.info.get("task_id"), msg.info.get("reason")
        if not msg.worker_id or not isinstance(task_id, str) or not task_id or not isinstance(reason, str):
            return [self.settle(token, entry, "rejected",
                                "a failure report needs a worker_id, info.task_id and info.reason")]
        entry.update(task_id=task_id, worker_id=msg.worker_id, report="failed")
        other = self._other_run(msg.run_id)
        if other is not None:
            return [self.settle(token, entry, "stale", other)]
        if self.phase is not Phase.RUNNING or self._stop_due(now):
            return [self.settle(token, entry, "late", "arrived after the run stopped")]
        if task_id in self.state.applied_tasks:
            return [self.settle(token, entry, "duplicate", f"task {task_id} was already applied")]
        report = FailureReport(token, task_id, msg.worker_id, one_line(reason) or "no reason given", entry)
        return self.policy.failed(self, report, now)

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.params.items()}

    def _stop_reason(self, now: float) -> str | None:
        st, cfg = self.state, self.config
        if self.failure is not None:
            return "failed"
        if self._stop_requested:
            return "stop requested"
        if st.reached_target:
            return "target accuracy"
        rounds = cfg.effective_rounds
        round_ = self.policy.round_of(st)
        if rounds is not None and (st.version if round_ is None else round_) >= rounds:
            return "rounds"
        max_updates = cfg.effective_max_updates
        if max_updates is not None and st.counts["applied"] >= max_updates:
            return "max updates"
        if cfg.time_limit is not None and self.limit_elapsed(now) >= cfg.time_limit:
            return "time limit"
        return None

    def _stop_due(self, now: float) -> bool:
        return self._stop_reason(now) is not None

    def _advance(self, now: float) -> list[Decision]:
        """What time and the last input make due: the one place the run moves on."""
        out = self._expire_workers(now)
        if self.phase is Phase.DONE or self._awaiting is not None:
            return out
        if self.phase is Phase.FINISHING:
            return out + self._drain(now)
        reason = self._stop_reason(now)
        if reason is not None:
            return out + self._finish(now, reason)
        return out + self.policy.advance(self, now)

    def _expire_workers(self, now: float) -> list[Decision]:
        return [WorkerLeft(w, "silent") for w in self.live.expired(now)]

    def _finish(self, now: float, reason: str) -> list[Decision]:
        out: list[Decision] = []
        if reason == "time limit" and self._clock_start is None:
            # no work ever started in this process: nobody came (or not enough)
            out += self.fail(f"--time-limit {self.config.time_limit:g} s passed while waiting for workers "
                             f"({self.live_workers()} of {self.config.min_workers} live)")
        out += self.policy.wind_down(self, now)
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


def one_line(text: str, limit: int = 500) -> str:
    """``text`` on one line (whitespace runs become one space), at most ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def describe_failures(failures: Iterable[tuple[str, str]], limit: int = 3) -> str:
    """``(worker, reason)`` pairs as one line: each distinct reason once, with its workers."""
    by_reason: dict[str, list[str]] = {}
    for worker, reason in failures:
        workers = by_reason.setdefault(reason, [])
        if worker not in workers:
            workers.append(worker)
    parts = [f"{reason} ({', '.join(workers)})" for reason, workers in list(by_reason.items())[:limit]]
    if len(by_reason) > limit:
        parts.append(f"and {len(by_reason) - limit} other reason(s)")
    return "; ".join(parts)
