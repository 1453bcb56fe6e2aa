"""How work is handed out and closed: synchronous rounds or asynchronous updates.

Both implement :class:`fedmq.aggregator.core.Policy` and are pure (no I/O, no clock: ``now``
comes in with every call). The coordinator calls them; they change its state through its
helpers and return decisions.

* :class:`SyncRounds` (FedAvg): a round publishes the model and ``--workers-per-round`` tasks
  (default: every live worker) once ``--min-workers`` are live, holds the round's updates
  unacked, and closes when every task answered, or after ``--round-timeout`` with at least
  ``--min-workers`` updates. A run that stops mid-round closes it if it has ``--min-workers``
  updates, and otherwise records them ``late`` (abandons it).
* :class:`AsyncUpdates` (FedAsync, FedBuff): keeps ``--concurrency`` tasks outstanding (default:
  one per live worker), replaces a task not answered within ``--task-timeout``, and offers each
  update to the strategy as it arrives; one staler than ``--max-staleness`` is ``stale``.
"""

from __future__ import annotations

from fedmq.aggregator.config import AggregatorConfig
from fedmq.aggregator.core import (
    Candidate,
    Checkpoint,
    Coordinator,
    Decision,
    Policy,
    RoundClosed,
    RoundOpened,
    RunState,
    TaskExpired,
)
from fedmq.aggregator.strategies import Contribution

#: the update bodies an asynchronous run holds unacked: about this many bytes
IN_FLIGHT_BYTES = 128 * 1024 * 1024


class SyncRounds:
    """Synchronous rounds: every update of a round is trained from the same version."""

    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self._held: dict[str, Candidate] = {}  # worker id -> its update for the current round
        self._open = False
        self._wanted = 0
        self._deadline = 0.0

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
            if not run.workers_ready():
                return run.wait_for_workers()
            run.start_clock(now)
            out += self._open_round(run, now)
        got, cfg = len(self._held), self.config
        if got >= self._wanted or (now >= self._deadline and got >= cfg.min_workers):
            out += self._close(run)
        return out

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
        return []

    def holds(self, task_id: str) -> bool:
        return any(c.update.task_id == task_id for c in self._held.values())

    def evaluated(self, run: Coordinator, now: float) -> list[Decision]:
        return [Checkpoint()]  # every round is durable before the next one starts

    def wind_down(self, run: Coordinator, now: float) -> list[Decision]:
        if self._open and len(self._held) >= self.config.min_workers:
            return self._close(run)
        self._open = False
        out: list[Decision] = [
            run.settle(c.token, c.entry, "late", "the run stopped before the round closed")
            for c in self._held.values()
        ]
        self._held = {}
        return out

    def deadlines(self, run: Coordinator, now: float) -> list[float]:
        return [self._deadline] if self._open and self._deadline > now else []

    def _open_round(self, run: Coordinator, now: float) -> list[Decision]:
        cfg, st = self.config, run.state
        r = st.round + 1
        self._wanted = cfg.workers_per_round or max(run.live_workers(), cfg.min_workers)
        self._deadline = now + cfg.round_timeout
        self._open = True
        seed = cfg.seed * 1_000_003 + r
        return [
            run.model(r),
            *(run.task(f"r{r:05d}-{i:03d}", version=st.version, round_=r, seed=seed) for i in range(self._wanted)),
            RoundOpened(r, st.version, self._wanted),
        ]

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
        self._held, self._open = {}, False
        st.round += 1
        evaluate = run.new_version(result.params)
        return [*out, RoundClosed(st.round, st.version, len(ordered)), evaluate]


class AsyncUpdates:
    """Asynchronous updates: each one is offered to the strategy as it arrives."""

    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self._started = False

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
            if not run.workers_ready():
                return run.wait_for_workers()
            self._started = True
            run.start_clock(now)
        out: list[Decision] = []
        for task_id, issued in list(st.outstanding.items()):
            if now - issued > cfg.task_timeout:
                del st.outstanding[task_id]
                out.append(TaskExpired(task_id, cfg.task_timeout))
        want = cfg.concurrency or max(run.live_workers(), cfg.min_workers)
        while len(st.outstanding) < want:
            st.task_seq += 1
            task_id = f"a{st.task_seq:06d}-{run.incarnation}"
            out.append(run.task(task_id, version=None, round_=None, seed=cfg.seed * 1_000_003 + st.task_seq))
            st.outstanding[task_id] = now
        return out

    def accept(self, run: Coordinator, candidate: Candidate, now: float) -> list[Decision]:
        cfg, st, update, tau = self.config, run.state, candidate.update, candidate.staleness
        st.applied_tasks.add(update.task_id)  # a stale one is not applied, nor retried
        if cfg.max_staleness is not None and tau > cfg.max_staleness:
            return [run.settle(candidate.token, candidate.entry, "stale",
                               f"staleness {tau} > --max-staleness {cfg.max_staleness}")]
        result = run.strategy.aggregate(run.params, [Contribution(update.params, update.num_samples, tau)])
        st.staleness_since_version.append(tau)
        candidate.entry["weight"] = round(result.weights[0], 6)
        out: list[Decision] = [run.settle(candidate.token, candidate.entry, "applied")]
        if result.params is not None:
            evaluate = run.new_version(result.params)
            out += [run.model(), evaluate]
        return out

    def holds(self, task_id: str) -> bool:
        return False

    def evaluated(self, run: Coordinator, now: float) -> list[Decision]:
        return []

    def wind_down(self, run: Coordinator, now: float) -> list[Decision]:
        return []

    def deadlines(self, run: Coordinator, now: float) -> list[float]:
        return [issued + self.config.task_timeout for issued in run.state.outstanding.values()]


def make_policy(config: AggregatorConfig) -> Policy:
    """The policy of ``config.mode``."""
    return SyncRounds(config) if config.synchronous else AsyncUpdates(config)
