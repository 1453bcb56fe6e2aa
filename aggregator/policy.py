"""How work is handed out and closed: synchronous rounds or asynchronous updates.

Both implement :class:`fedmq.aggregator.core.Policy` and are pure (no I/O, no clock: ``now``
comes in with every call). The coordinator calls them; they change its state through its
helpers and return decisions.

* :class:`SyncRounds` (FedAvg): a round publishes the model and ``--workers-per-round`` tasks
  (default: every live worker) once ``--min-workers`` are live (before round 1, after the join
  grace), holds the round's updates unacked, and closes when every task answered (or failed
  for good), or after ``--round-timeout`` with at least ``--min-workers`` updates. A task a
  worker reports failed is issued again, up to ``--task-retries`` times; a round that can no
  longer get ``--min-workers`` updates fails the run. A round still open is reported every
  :data:`~fedmq.aggregator.core.REPORT_EVERY_S` seconds. A run that stops mid-round closes it if
  it has ``--min-workers`` updates, and otherwise records them ``late`` (abandons it).

  The work of a round is its tasks ``r<round>-<slot>`` (a replacement: ``r<round>-<slot>-<n>``);
  a worker's update names its contribution to the round, ``r<round>:<worker id>`` (any ticket
  of the round entitles a worker to one), or the task it answers. Anything else, a round not
  yet issued or a task the round did not issue, is rejected.
* :class:`AsyncUpdates` (FedAsync, FedBuff): keeps ``--concurrency`` tasks outstanding (default:
  one per live worker), replaces a task not answered within ``--task-timeout`` or reported
  failed, and offers each update to the strategy as it arrives; one staler than
  ``--max-staleness`` is ``stale``. Only updates for task ids it issued count (a late answer to
  a task replaced after ``--task-timeout`` is still one, weighted by its staleness like any
  other); ``3 x concurrency`` failures in a row with nothing applied fail the run.
"""

from __future__ import annotations

import re

from fedmq.aggregator.config import AggregatorConfig
from fedmq.aggregator.core import (
    ASYNC_FAILURE_FACTOR,
    REPORT_EVERY_S,
    Candidate,
    Checkpoint,
    Coordinator,
    Decision,
    FailureReport,
    Policy,
    RoundClosed,
    RoundOpened,
    RoundShort,
    RoundWaiting,
    RunState,
    TaskExpired,
    TaskRetried,
    describe_failures,
)
from fedmq.aggregator.strategies import Contribution
from fedmq.aggregator.taskids import ASYNC_ID
from fedmq.shared import messages

#: the update bodies an asynchronous run holds unacked: about this many bytes
IN_FLIGHT_BYTES = 128 * 1024 * 1024

_ASYNC_TASK = ASYNC_ID  # a000042-<incarnation>
_TICKET = re.compile(r"r(\d{5,})-(\d{3,})(?:-(\d+))?")  # a task of a round: r00003-001, r00003-001-2
_CONTRIBUTION = re.compile(r"r(\d{5,}):(.+)", re.DOTALL)  # a worker's contribution: r00003:w1


def ticket_id(round_: int, slot: int, attempt: int = 0) -> str:
    """The id of task ``slot`` of round ``round_`` (``attempt`` > 0: its replacement)."""
    return f"r{round_:05d}-{slot:03d}" + (f"-{attempt}" if attempt else "")


class SyncRounds:
    """Synchronous rounds: every update of a round is trained from the same version."""

    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self._held: dict[str, Candidate] = {}  # worker id -> its update for the current round
        self._open = False
        self._wanted = 0
        self._deadline = 0.0
        self._opened_at = 0.0
        self._report_at = 0.0
        self._seed = 0
        self._tickets: dict[str, int] = {}  # task ids the open round issued -> their slot
        self._answered: set[str] = set()  # its task ids answered (by an update or a failure report)
        self._failures: dict[int, int] = {}  # slot -> failures reported
        self._exhausted: set[int] = set()  # slots that failed 1 + --task-retries times
        self._failed: list[tuple[str, str]] = []  # (worker, reason) of the round's failed tasks
        self._short: tuple[str, ...] = ()  # the missing workers last warned about

    def round_of(self, state: RunState) -> int | None:
        return state.round

    def prefetch(self, model_bytes: int) -> int:
        del model_bytes  # a round's updates stay unacked until it closes
        return (self.config.workers_per_round or 64) + 8

    def start(self, run: Coordinator, now: float) -> list[Decision]:
        return []  # a round publishes its model when it opens

    def advance(self, run: Coordinator, now: float) -> list[Decision]:
        out: list[Decision] = []
        if not self._open:
            if not run.workers_ready(now):
                return run.wait_for_workers(now)
            run.start_clock(now)
            out += self._open_round(run, now)
        got, cfg = len(self._held), self.config
        possible = self._wanted - len(self._exhausted)
        if got >= max(possible, 1) or (now >= self._deadline and got >= cfg.min_workers):
            out += self._close(run)
        elif now >= self._report_at:
            while self._report_at <= now:
                self._report_at += REPORT_EVERY_S
            out.append(RoundWaiting(run.state.round + 1, got, self._wanted, round(now - self._opened_at, 1),
                                    tuple(f"{w}: {r}" for w, r in self._failed[-10:])))
        return out

    def unissued(self, run: Coordinator, update: messages.Update) -> str | None:
        st = run.state
        r, task_id = st.round + 1, update.task_id
        ticket = _TICKET.fullmatch(task_id)
        contribution = _CONTRIBUTION.fullmatch(task_id)
        if contribution is not None and contribution.group(2) == update.worker_id:
            issued_round = int(contribution.group(1))
        elif ticket is not None:
            issued_round = int(ticket.group(1))
        else:
            return f"task {task_id!r} was never issued by run {run.run_id}"
        if update.round != issued_round:
            return f"task {task_id!r} is of round {issued_round}, the update says round {update.round}"
        if issued_round > r:
            return f"task {task_id!r} was never issued: round {issued_round} has not started (this is round {r})"
        if issued_round == r and ticket is not None and self._open:
            if task_id not in self._tickets:
                return f"task {task_id!r} was never issued by run {run.run_id} (round {r} has {len(self._tickets)})"
            if task_id in self._answered:
                return f"task {task_id!r} was reported failed"
        return None  # an earlier round's is stale (accept says so)

    def accept(self, run: Coordinator, candidate: Candidate, now: float) -> list[Decision]:
        # updates for the coming round are held even before it opens (redelivered after a resume)
        st, update = run.state, candidate.update
        r = st.round + 1
        if update.round != r or update.base_version != st.version:
            return [run.settle(candidate.token, candidate.entry, "stale",
                               f"for round {update.round}, the aggregator is in round {r}")]
        if update.worker_id in self._held:
            return [run.settle(candidate.token, candidate.entry, "duplicate",
                               f"worker {update.worker_id} already contributed to round {r}")]
        candidate.entry["weight"] = None
        self._held[update.worker_id] = candidate
        if update.task_id in self._tickets:
            self._answered.add(update.task_id)
        return []

    def failed(self, run: Coordinator, report: FailureReport, now: float) -> list[Decision]:
        cfg, st = self.config, run.state
        r, task_id = st.round + 1, report.task_id
        ticket = _TICKET.fullmatch(task_id)
        issued_round = int(ticket.group(1)) if ticket is not None else None
        if issued_round is None or issued_round > r or (self._open and issued_round == r and task_id not in self._tickets):
            return [run.settle(report.token, report.entry, "rejected",
                               f"a failure report for task {task_id!r}, which run {run.run_id} never issued")]
        if issued_round < r:
            return [run.settle(report.token, report.entry, "stale",
                               f"for round {issued_round}, the aggregator is in round {r}")]
        if task_id in self._answered:
            return [run.settle(report.token, report.entry, "duplicate", f"task {task_id} was answered already")]
        if not self._open:  # reported to an aggregator before a restart: the round is issued anew
            return run.task_failed(report)
        self._answered.add(task_id)
        slot = self._tickets[task_id]
        failures = self._failures[slot] = self._failures.get(slot, 0) + 1
        self._failed.append((report.worker_id, report.reason))
        out = run.task_failed(report)
        if failures <= cfg.task_retries:
            new = ticket_id(r, slot, failures)
            self._tickets[new] = slot
            out += [run.task(new, version=st.version, round_=r, seed=self._seed),
                    TaskRetried(task_id, new, failures, cfg.task_retries)]
            return out
        self._exhausted.add(slot)
        if self._wanted - len(self._exhausted) < cfg.min_workers:
            out += run.fail(
                f"round {r} cannot get --min-workers {cfg.min_workers} update(s): {len(self._exhausted)} of its "
                f"{self._wanted} task(s) failed {cfg.task_retries + 1} time(s) ({len(self._held)} update(s) "
                f"arrived); the workers said: {describe_failures(self._failed)}"
            )
        return out

    def holds(self, task_id: str) -> bool:
        return any(c.update.task_id == task_id for c in self._held.values())

    def forget(self, run: Coordinator) -> None:
        """Keep the applied ids of the last closed round only (a redelivery of one is a duplicate).

        Why dropping the others is safe: an update (or failure report) is taken only for a task
        of the round in progress, ``state.round + 1``. Ids of round ``k`` are only ever applied
        when round ``k`` closes, which makes ``state.round`` ``k``; rounds never go back (a resume
        restores the round of its checkpoint, and that checkpoint's set). So an update naming a
        round below ``state.round`` has ``update.round`` below it too (:meth:`unissued` rejects
        one whose round differs from its task's), and :meth:`accept` or :meth:`failed` settle it
        ``stale``: never applied, whatever the set holds.
        """
        st = run.state
        keep = set()
        for task_id in st.applied_tasks:
            m = _TICKET.fullmatch(task_id) or _CONTRIBUTION.fullmatch(task_id)
            if m is not None and int(m.group(1)) >= st.round:
                keep.add(task_id)
        st.applied_tasks = keep

    def evaluated(self, run: Coordinator, now: float) -> list[Decision]:
        return [Checkpoint()]  # every round is durable before the next one starts

    def wind_down(self, run: Coordinator, now: float) -> list[Decision]:
        if self._open and len(self._held) >= self.config.min_workers:
            return self._close(run)
        self._reset()
        out: list[Decision] = [
            run.settle(c.token, c.entry, "late", "the run stopped before the round closed")
            for c in self._held.values()
        ]
        self._held = {}
        return out

    def deadlines(self, run: Coordinator, now: float) -> list[float]:
        if not self._open:
            return []
        return [self._report_at] + ([self._deadline] if self._deadline > now else [])

    def _reset(self) -> None:
        self._open = False
        self._tickets, self._answered, self._failures, self._exhausted, self._failed = {}, set(), {}, set(), []

    def _open_round(self, run: Coordinator, now: float) -> list[Decision]:
        cfg, st = self.config, run.state
        r = st.round + 1
        self._reset()
        self._wanted = cfg.workers_per_round or max(run.live_workers(), cfg.min_workers)
        self._deadline = now + cfg.round_timeout
        self._opened_at, self._report_at = now, now + REPORT_EVERY_S
        self._open = True
        self._seed = cfg.seed * 1_000_003 + r
        self._tickets = {ticket_id(r, i): i for i in range(self._wanted)}
        self._answered = {c.update.task_id for c in self._held.values() if c.update.task_id in self._tickets}
        out: list[Decision] = [
            run.model(r),
            *(run.task(t, version=st.version, round_=r, seed=self._seed) for t in self._tickets),
            RoundOpened(r, st.version, self._wanted),
        ]
        missing = tuple(sorted(run.seen - set(run.live)))
        if cfg.workers_per_round is None and self._wanted < len(run.seen):
            if missing != self._short:
                out.append(RoundShort(r, self._wanted, len(run.seen), missing))
            self._short = missing
        else:
            self._short = ()
        return out

    def _close(self, run: Coordinator) -> list[Decision]:
        st = run.state
        ordered = [self._held[w] for w in sorted(self._held)]
        result = run.strategy.aggregate(
            run.params, [Contribution(c.update.params, c.update.num_samples) for c in ordered]
        )
        if result.params is None:
            raise RuntimeError(f"strategy {run.strategy.name} made no model from a round's updates")
        out: list[Decision] = []
        for c, weight in zip(ordered, result.weights, strict=True):
            c.entry["weight"] = weight
            st.applied_tasks.add(c.update.task_id)
            out.append(run.settle(c.token, c.entry, "applied"))
        st.staleness_since_version = [0] * len(ordered)
        self._held = {}
        self._reset()
        st.round += 1
        evaluate = run.new_version(result.params)
        return [*out, RoundClosed(st.round, st.version, len(ordered)), evaluate]


class AsyncUpdates:
    """Asynchronous updates: each one is offered to the strategy as it arrives."""

    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self._started = False
        self._streak = 0  # failures reported since the last applied update
        self._failed: list[tuple[str, str]] = []  # (worker, reason) of those, the last few

    def round_of(self, state: RunState) -> int | None:
        return None

    def prefetch(self, model_bytes: int) -> int:
        # bound the update bodies in flight, and checkpoint before the window fills
        return max(2, min(self.config.checkpoint_every + 2, IN_FLIGHT_BYTES // max(1, model_bytes)))

    def start(self, run: Coordinator, now: float) -> list[Decision]:
        return [run.model()]

    def advance(self, run: Coordinator, now: float) -> list[Decision]:
        cfg, st = self.config, run.state
        if not self._started:
            if not run.workers_ready(now):
                return run.wait_for_workers(now)
            self._started = True
            run.start_clock(now)
        out: list[Decision] = [TaskExpired(t, cfg.task_timeout) for t in run.outstanding.expired(now)]
        want = self._concurrency(run)
        while len(st.outstanding) < want:
            st.task_seq += 1
            task_id = f"a{st.task_seq:06d}-{run.incarnation}"
            # the version current now: the worker trains from it or a newer one of this run (it
            # fetches one if it holds none), and believes no version far ahead of it
            out.append(run.task(task_id, version=st.version, round_=None, seed=cfg.seed * 1_000_003 + st.task_seq))
            st.outstanding[task_id] = now
            run.remember_issued(task_id)
        return out

    def unissued(self, run: Coordinator, update: messages.Update) -> str | None:
        if update.task_id in run.state.issued:
            return None  # outstanding, or answered late (replaced after --task-timeout or a failure)
        if self._issued_unrecorded(run, update.task_id):
            run.remember_issued(update.task_id)
            return None
        if self._issued_long_ago(run, update.task_id):
            return (f"task {update.task_id!r} was issued too long ago: run {run.run_id} remembers only its last "
                    f"{run.issued_memory} task ids besides the outstanding ones (an answer to it may have been "
                    "applied already)")
        return f"task {update.task_id!r} was never issued by run {run.run_id} (or too long ago)"

    @staticmethod
    def _issued_long_ago(run: Coordinator, task_id: str) -> bool:
        """Whether ``task_id`` names a task this incarnation, or one it resumed from, did issue
        (and has since forgotten)."""
        m = _ASYNC_TASK.fullmatch(task_id)
        if m is None:
            return False
        seq, incarnation = int(m.group(1)), m.group(2)
        issued = [(run.incarnation, run.state.task_seq), *run.state.predecessors]
        return any(incarnation == inc and 0 < seq <= last for inc, last in issued)

    @staticmethod
    def _issued_unrecorded(run: Coordinator, task_id: str) -> bool:
        """Whether ``task_id`` was issued by an incarnation of this run after its last checkpoint
        (before a crash: the resumed run's checkpoint does not list it)."""
        m = _ASYNC_TASK.fullmatch(task_id)
        if m is None:
            return False
        seq, incarnation = int(m.group(1)), m.group(2)
        memory = run.issued_memory
        return any(incarnation == inc and last < seq <= last + memory for inc, last in run.state.predecessors)

    def accept(self, run: Coordinator, candidate: Candidate, now: float) -> list[Decision]:
        cfg, st, update, tau = self.config, run.state, candidate.update, candidate.staleness
        st.applied_tasks.add(update.task_id)  # a stale one is not applied, nor retried
        if cfg.max_staleness is not None and tau > cfg.max_staleness:
            return [run.settle(candidate.token, candidate.entry, "stale",
                               f"staleness {tau} > --max-staleness {cfg.max_staleness}")]
        result = run.strategy.aggregate(run.params, [Contribution(update.params, update.num_samples, tau)])
        st.staleness_since_version.append(tau)
        candidate.entry["weight"] = round(result.weights[0], 6)
        self._streak, self._failed = 0, []
        out: list[Decision] = [run.settle(candidate.token, candidate.entry, "applied")]
        if result.params is not None:
            evaluate = run.new_version(result.params)
            out += [run.model(), evaluate]
        return out

    def failed(self, run: Coordinator, report: FailureReport, now: float) -> list[Decision]:
        st, task_id = run.state, report.task_id
        status = st.issued.get(task_id)
        if status is None and self._issued_unrecorded(run, task_id):
            status = "open"
        if status is None:
            return [run.settle(report.token, report.entry, "rejected",
                               f"a failure report for task {task_id!r}, which run {run.run_id} never issued")]
        if status == "failed":
            return [run.settle(report.token, report.entry, "duplicate", f"task {task_id} was reported failed already")]
        st.issued[task_id] = "failed"
        st.outstanding.pop(task_id, None)  # advance issues another
        self._streak += 1
        self._failed = [*self._failed[-20:], (report.worker_id, report.reason)]
        out = run.task_failed(report)
        limit = ASYNC_FAILURE_FACTOR * self._concurrency(run)
        if self._streak >= limit:
            out += run.fail(f"{self._streak} tasks failed in a row with no update applied "
                            f"({ASYNC_FAILURE_FACTOR} x concurrency {limit // ASYNC_FAILURE_FACTOR}); "
                            f"the workers said: {describe_failures(self._failed)}")
        return out

    def holds(self, task_id: str) -> bool:
        return False

    def forget(self, run: Coordinator) -> None:
        """Keep the applied ids an update could still claim: those in ``state.issued`` and those
        a predecessor may have issued after its last checkpoint (:meth:`_issued_unrecorded`).

        Why dropping the others is safe: an update whose task id is not in ``applied_tasks``
        goes on to :meth:`unissued`, which takes it only if its id is in ``state.issued`` or
        in a predecessor's window, and rejects it otherwise ("never issued ... or too long
        ago"): never applied. A dropped id is in neither, and never will be again:
        ``state.issued`` only gains ids :meth:`advance` makes, whose sequence number is above
        every earlier one of this incarnation (incarnations are unique), and ids of a
        predecessor's window, which is fixed when the run resumes: the windows only change in
        :meth:`RunState.from_meta`, which adds the window *above* the checkpoint's ``task_seq``
        (ids never issued when that set was written) and drops the oldest. Its size is bounded
        by --issued-memory + outstanding + MAX_PREDECESSORS x --issued-memory, whatever the
        length of the run.
        """
        st = run.state
        st.applied_tasks = {t for t in st.applied_tasks if t in st.issued or self._issued_unrecorded(run, t)}

    def evaluated(self, run: Coordinator, now: float) -> list[Decision]:
        return []

    def wind_down(self, run: Coordinator, now: float) -> list[Decision]:
        return []

    def deadlines(self, run: Coordinator, now: float) -> list[float]:
        first = run.outstanding.next_expiry()
        return [] if first is None else [first]

    def _concurrency(self, run: Coordinator) -> int:
        return self.config.concurrency or max(run.live_workers(), self.config.min_workers)


def make_policy(config: AggregatorConfig) -> Policy:
    """The policy of ``config.mode``."""
    return SyncRounds(config) if config.synchronous else AsyncUpdates(config)
