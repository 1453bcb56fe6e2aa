"""The aggregator: publishes model versions and tasks, applies updates, evaluates, checkpoints.

One thread does all the work; the broker client's I/O thread only puts deliveries on
``self.inbox``. Every update message gets exactly one line in ``updates.jsonl`` with its fate
(applied, stale, duplicate, rejected, late) and is acked only after a checkpoint that contains
its effect is on disk. A crash therefore loses nothing (unacked updates are redelivered) and
applies nothing twice (the checkpoint holds the set of applied task ids, and the ledger is
truncated back to the checkpoint on ``--resume``).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.aggregator import durable
from fedmq.aggregator.config import AggregatorConfig
from fedmq.aggregator.strategies import FedAsync, FedAvg, FedBuff, make_strategy
from fedmq.aggregator.validate import check_update, expected_update_bytes
from fedmq.broker.client import Client, Delivery, PendingPublish, SetupError
from fedmq.broker.settings import BrokerSettings
from fedmq.broker.topology import Topology
from fedmq.shared import messages
from fedmq.shared.data import load_num_classes, load_shard
from fedmq.shared.errors import BrokerError, DecodeError, ValidationError
from fedmq.shared.trainer import Trainer, load_trainer_factory, mlp_spec

log = logging.getLogger("fedmq.aggregator")

IN_FLIGHT_BYTES = 128 * 1024 * 1024


@dataclass
class _RoundUpdate:
    update: messages.Update
    delivery: Delivery
    entry: dict[str, Any]


@dataclass
class RunState:
    """Everything a checkpoint holds (besides arrays)."""

    version: int = 0
    round: int = 0
    elapsed_s: float = 0.0
    applied_tasks: set[str] = field(default_factory=set)
    round_workers: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: {"applied": 0, "rejected": 0, "stale": 0, "duplicate": 0, "late": 0})
    history: list[dict[str, Any]] = field(default_factory=list)
    outstanding: dict[str, float] = field(default_factory=dict)
    task_seq: int = 0
    ledger_offset: int = 0
    reached_target: bool = False
    staleness_since_version: list[int] = field(default_factory=list)

    def to_meta(self) -> dict[str, Any]:
        return {
            "version": self.version, "round": self.round, "elapsed_s": self.elapsed_s,
            "applied_tasks": sorted(self.applied_tasks), "counts": self.counts,
            "history": self.history, "outstanding": self.outstanding, "task_seq": self.task_seq,
            "ledger_offset": self.ledger_offset, "reached_target": self.reached_target,
            "staleness_since_version": self.staleness_since_version,
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> RunState:
        st = cls()
        st.version, st.round, st.elapsed_s = int(meta["version"]), int(meta["round"]), float(meta["elapsed_s"])
        st.applied_tasks = set(meta["applied_tasks"])
        st.counts.update(meta["counts"])
        st.history = list(meta["history"])
        st.outstanding = {k: float(v) for k, v in meta["outstanding"].items()}
        st.task_seq, st.ledger_offset = int(meta["task_seq"]), int(meta["ledger_offset"])
        st.reached_target = bool(meta["reached_target"])
        st.staleness_since_version = list(meta.get("staleness_since_version", []))
        return st


class Aggregator:
    """Run one federation to its stopping condition. See :meth:`run`."""

    def __init__(
        self,
        config: AggregatorConfig,
        settings: BrokerSettings,
        topology: Topology,
        stop: threading.Event | None = None,
    ) -> None:
        self.cfg = config
        self.settings = settings
        self.topology = topology
        self.stop = stop or threading.Event()
        self.inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.out = Path(config.out)
        self.live: dict[str, float] = {}
        self.state = RunState()
        self.params: dict[str, np.ndarray] = {}
        self.pending: list[Delivery] = []
        self.round_updates: dict[str, _RoundUpdate] = {}
        self.current_round = 0
        self.incarnation = secrets.token_hex(3)
        self.client: Client | None = None
        self._clock_start: float | None = None
        self._last_checkpoint = time.monotonic()
        self._finishing = False
        self.interrupted = False
        # model and task publishes whose confirms we have not waited for yet: the next
        # checkpoint waits for them before it acks anything
        self._unconfirmed: list[PendingPublish] = []

    # ------------------------------------------------------------------ I/O-thread handlers
    def _on_update(self, delivery: Delivery) -> None:
        self.inbox.put(("update", delivery))

    def _on_presence(self, delivery: Delivery) -> None:
        try:
            msg = messages.decode(delivery.body, expect=messages.Control, max_bytes=64 * 1024)
        except DecodeError:
            return
        self.inbox.put(("presence", msg))

    def request_stop(self) -> None:
        """Checkpoint and leave (e.g. on SIGTERM); the run can be resumed."""
        self.interrupted = True
        self.stop.set()
        self.inbox.put(("wake", None))

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg = self.cfg.validate()
        X, y = load_shard(cfg.test_data)
        self.X_test, self.y_test = X, y
        classes = load_num_classes(cfg.test_data) or int(y.max()) + 1
        self.strategy: FedAvg | FedAsync | FedBuff = make_strategy(
            cfg.strategy_name, mixing=cfg.mixing, staleness=cfg.staleness, staleness_a=cfg.staleness_a,
            staleness_b=cfg.staleness_b, buffer_size=cfg.buffer_size, server_lr=cfg.server_lr,
        )
        self.spec = mlp_spec(
            int(X.shape[1]), classes, hidden=list(cfg.hidden), activation=cfg.activation, loss=cfg.loss, seed=cfg.seed
        )
        self.trainer: Trainer = load_trainer_factory(cfg.trainer)(self.spec)
        model_bytes = sum(int(v.nbytes) for v in self.trainer.init_params().values())
        if cfg.synchronous:  # a round's updates stay unacked until it closes
            self.prefetch = (cfg.workers_per_round or 64) + 8
        else:  # bound the update bodies in flight to ~128 MiB, and checkpoint before the window fills
            self.prefetch = max(2, min(cfg.checkpoint_every + 2, IN_FLIGHT_BYTES // max(1, model_bytes)))
        self.checkpoint_every = min(cfg.checkpoint_every, max(1, self.prefetch - 1))

    def _restore(self) -> None:
        """Open the run directory: only once we hold the namespace's aggregator lock."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        restored = durable.load_checkpoint(self.out) if cfg.resume else None
        if cfg.resume and restored is None:
            log.warning("--resume: no checkpoint in %s, starting a new run", self.out)
        if restored is not None:
            meta, arrays = restored
            self.state = RunState.from_meta(meta["state"])
            self.params = durable.split_prefix(arrays, "model/")
            self.strategy_state_restore(meta.get("strategy", {}), durable.split_prefix(arrays, "strategy/"))
            self.ledger = durable.Ledger(self.out / "updates.jsonl", truncate_to=self.state.ledger_offset)
            log.info("resumed from checkpoint: version %d, round %d, %d updates applied",
                     self.state.version, self.state.round, self.state.counts["applied"])
        else:
            self.params = self.trainer.init_params()
            self.ledger = durable.Ledger(self.out / "updates.jsonl")
        self.shapes = {k: v.shape for k, v in self.params.items()}
        self.max_update_bytes = cfg.max_update_bytes or expected_update_bytes(self.params)

    def strategy_state_restore(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        if isinstance(self.strategy, FedAsync | FedBuff):
            self.strategy.restore(meta, arrays)

    def _connect(self) -> None:
        prefetch = self.prefetch
        client = Client(self.settings, self.topology, name="fedmq-aggregator")
        since = time.time() - self.cfg.presence_timeout
        client.subscribe(
            self.topology.presence, self._on_presence, prefetch=200, settle_on_return=True,
            arguments=lambda: {"x-stream-offset": _stream_timestamp(since)},
        )
        client.subscribe(self.topology.updates, self._on_update, prefetch=prefetch)
        # one aggregator per namespace: a second one is refused instead of racing the first
        client.subscribe(self.topology.lock, lambda d: None, prefetch=1, exclusive=True)
        try:
            self.client = client.start()
        except SetupError as exc:
            if "exclusive" in str(exc).lower() or "ACCESS_REFUSED" in str(exc):
                raise BrokerError(
                    f"another aggregator is running on namespace {self.topology.namespace!r}; "
                    "stop it first, or use another --namespace"
                ) from None
            raise
        log.info("aggregator connected to %s, namespace %s, %s/%s", self.settings.masked_url,
                 self.topology.namespace, self.cfg.mode, self.cfg.strategy_name)

    # ------------------------------------------------------------------ main
    def run(self) -> dict[str, Any]:
        self._setup()
        self._connect()
        try:
            self._restore()
        except BaseException:
            assert self.client is not None
            self.client.close()
            raise
        try:
            if not self.cfg.synchronous:  # a sync round publishes its model when it starts
                self._publish_model()
            if self.cfg.synchronous:
                self._run_sync()
            else:
                self._run_async()
            if not self.interrupted:
                self._finish()
        finally:
            self._checkpoint(force=True)
            durable.save_params(self.out / "model.npz", self.params)  # history.json: by the checkpoint
            assert self.client is not None
            self.client.close()
            self.ledger.close()
        return self.final()

    # ------------------------------------------------------------------ time and stopping
    def elapsed(self) -> float:
        if self._clock_start is None:
            return self.state.elapsed_s
        return self.state.elapsed_s + (time.monotonic() - self._clock_start)

    def _start_clock(self) -> None:
        if self._clock_start is None:
            self._clock_start = time.monotonic()

    def _done(self) -> bool:
        st, cfg = self.state, self.cfg
        if self.stop.is_set() or st.reached_target:
            return True
        rounds = cfg.effective_rounds
        if rounds is not None and (st.round if cfg.synchronous else st.version) >= rounds:
            return True
        max_updates = cfg.effective_max_updates
        if max_updates is not None and st.counts["applied"] >= max_updates:
            return True
        return cfg.time_limit is not None and self.elapsed() >= cfg.time_limit

    def _live_workers(self) -> int:
        now = time.monotonic()
        return sum(1 for seen in self.live.values() if now - seen <= self.cfg.presence_timeout)

    def _wait_for_workers(self) -> None:
        announced = False
        while not self.stop.is_set() and self._live_workers() < self.cfg.min_workers:
            if not announced:
                log.info("waiting for %d worker(s) to say hello", self.cfg.min_workers)
                announced = True
            self._pump(timeout=1.0)

    # ------------------------------------------------------------------ inbox
    def _pump(self, timeout: float) -> None:
        """Handle inbox items for up to ``timeout`` seconds (returns after the first batch)."""
        try:
            kind, item = self.inbox.get(timeout=max(0.0, timeout))
        except queue.Empty:
            self._checkpoint()
            return
        while True:
            if kind == "update":
                self._receive(item)
            elif kind == "presence":
                self._presence(item)
            if self._done() and not self._finishing:
                break  # what is left in the inbox is recorded as late by _finish
            try:
                kind, item = self.inbox.get_nowait()
            except queue.Empty:
                break
        self._checkpoint()

    def _presence(self, msg: messages.Control) -> None:
        if not msg.worker_id:
            return
        if msg.kind == "bye":
            self.live.pop(msg.worker_id, None)
        elif msg.kind in ("hello", "heartbeat") and time.time() - msg.sent_s <= self.cfg.presence_timeout:
            if msg.worker_id not in self.live:
                log.info("worker %s joined", msg.worker_id)
            self.live[msg.worker_id] = time.monotonic() - max(0.0, time.time() - msg.sent_s)

    # ------------------------------------------------------------------ publishing
    def _publish_model(self) -> None:
        assert self.client is not None
        st = self.state
        msg = messages.ModelVersion(
            version=st.version, params=self.params, spec=self.spec,
            round=self.current_round if self.cfg.synchronous else None, created_s=time.time(),
        )
        self._unconfirmed.append(self.client.publish_nowait(
            self.topology.models, messages.encode(msg), message_id=f"model-{st.version}",
            headers={"x-fedmq-version": st.version}, sign=True,
        ))

    def _task(self, task_id: str, *, version: int | None, round_: int | None, seed: int) -> None:
        assert self.client is not None
        cfg = self.cfg
        task = messages.Task(
            task_id=task_id, version=version, mode=cfg.mode, epochs=cfg.epochs, batch_size=cfg.batch_size,
            lr=cfg.lr, mu=cfg.proximal_mu, seed=seed, round=round_, update_kind=self.strategy.update_kind,
        )
        self._unconfirmed.append(
            self.client.publish_nowait(self.topology.tasks, messages.encode(task), message_id=task_id, sign=True)
        )

    # ------------------------------------------------------------------ synchronous FedAvg
    def _run_sync(self) -> None:
        cfg, st = self.cfg, self.state
        while not self._done():
            # updates for this round may arrive before it (re)starts: redelivered after a resume
            self.current_round = r = st.round + 1
            self._wait_for_workers()
            if self.stop.is_set():
                return
            self._start_clock()
            wanted = cfg.workers_per_round or max(self._live_workers(), cfg.min_workers)
            self._publish_model()
            for i in range(wanted):
                self._task(f"r{r:05d}-{i:03d}", version=st.version, round_=r, seed=cfg.seed * 1_000_003 + r)
            log.debug("round %d: %d tasks on version %d", r, wanted, st.version)
            deadline = time.monotonic() + cfg.round_timeout
            while not self.stop.is_set():
                got = len(self.round_updates)
                if got >= wanted or (time.monotonic() >= deadline and got >= cfg.min_workers):
                    break
                if cfg.time_limit is not None and self.elapsed() >= cfg.time_limit:
                    break
                left = deadline - time.monotonic()
                self._pump(timeout=left if left > 0 else 1.0)
            if self.interrupted:
                return  # the round's updates stay unacked and come back after --resume
            if len(self.round_updates) < cfg.min_workers:
                self._abandon_round()
                return
            self._close_round()

    def _close_round(self) -> None:
        st = self.state
        ordered = [self.round_updates[w] for w in sorted(self.round_updates)]
        assert isinstance(self.strategy, FedAvg)
        self.params = self.strategy.aggregate([(ru.update.params, ru.update.num_samples) for ru in ordered])
        total = sum(ru.update.num_samples for ru in ordered)
        for ru in ordered:
            ru.entry.update(fate="applied", weight=ru.update.num_samples / total)
            self.ledger.record(ru.entry)
            st.applied_tasks.add(ru.update.task_id)
            self.pending.append(_ack_handle(ru.delivery))
        st.counts["applied"] += len(ordered)
        st.staleness_since_version = [0] * len(ordered)
        st.version += 1
        st.round = self.current_round
        self.round_updates = {}
        self._evaluate()
        self._checkpoint(force=True)

    def _abandon_round(self) -> None:
        """The run stops mid-round: the round's updates were never applied."""
        for ru in self.round_updates.values():
            ru.entry.update(fate="late", reason="the run stopped before the round closed")
            self.state.counts["late"] += 1
            self.ledger.record(ru.entry)
            self.pending.append(_ack_handle(ru.delivery))
        self.round_updates = {}

    # ------------------------------------------------------------------ asynchronous
    def _run_async(self) -> None:
        cfg, st = self.cfg, self.state
        self._wait_for_workers()
        self._start_clock()
        while not self._done():
            now = time.time()
            for task_id, issued in list(st.outstanding.items()):
                if now - issued > cfg.task_timeout:
                    log.warning("task %s not answered in %.0f s; issuing a replacement", task_id, cfg.task_timeout)
                    del st.outstanding[task_id]
            want = cfg.concurrency or max(self._live_workers(), cfg.min_workers)
            while len(st.outstanding) < want:
                st.task_seq += 1
                task_id = f"a{st.task_seq:06d}-{self.incarnation}"
                self._task(task_id, version=None, round_=None, seed=cfg.seed * 1_000_003 + st.task_seq)
                st.outstanding[task_id] = time.time()
            self._pump(timeout=self._next_wake())

    def _next_wake(self) -> float:
        wake = max(0.05, self.cfg.checkpoint_interval - (time.monotonic() - self._last_checkpoint))
        if self.cfg.time_limit is not None:
            wake = min(wake, max(0.05, self.cfg.time_limit - self.elapsed()))
        return min(wake, 2.0)

    # ------------------------------------------------------------------ one update message
    def _receive(self, delivery: Delivery) -> None:
        st = self.state
        entry: dict[str, Any] = {
            "message_id": delivery.message_id, "time_s": round(self.elapsed(), 3),
            "version": st.version, "redelivered": delivery.redelivered,
        }
        try:
            update = self._decode(delivery)
            entry.update(task_id=update.task_id, worker_id=update.worker_id, base_version=update.base_version,
                         num_samples=update.num_samples)
            st.outstanding.pop(update.task_id, None)
            tau = st.version - update.base_version
            entry["staleness"] = tau
        except (DecodeError, ValidationError) as exc:
            self._reject(delivery, entry, str(exc))
            return
        if self.stop.is_set() or self._finishing:
            self._settle(delivery, entry, "late", "arrived after the run stopped")
        elif update.task_id in st.applied_tasks or update.task_id in {ru.update.task_id for ru in self.round_updates.values()}:
            self._settle(delivery, entry, "duplicate", f"task {update.task_id} was already applied")
        elif self.cfg.synchronous:
            self._receive_sync(update, delivery, entry)
        else:
            self._receive_async(update, delivery, entry, tau)

    def _decode(self, delivery: Delivery) -> messages.Update:
        if len(delivery.body) > self.max_update_bytes:
            raise ValidationError(
                f"update of {len(delivery.body)} bytes is over the limit of {self.max_update_bytes} bytes"
            )
        msg = messages.decode(delivery.body, expect=messages.Update, max_bytes=self.max_update_bytes)
        assert isinstance(msg, messages.Update)
        check_update(msg, self.shapes, expected_kind=self.strategy.update_kind, current_version=self.state.version)
        return msg

    def _receive_sync(self, update: messages.Update, delivery: Delivery, entry: dict[str, Any]) -> None:
        st = self.state
        if update.round != self.current_round or update.base_version != st.version:
            self._settle(delivery, entry, "stale", f"for round {update.round}, the aggregator is in round {self.current_round}")
        elif update.worker_id in self.round_updates:
            self._settle(delivery, entry, "duplicate", f"worker {update.worker_id} already contributed to round {self.current_round}")
        else:
            entry["weight"] = None
            self.round_updates[update.worker_id] = _RoundUpdate(update, delivery, entry)

    def _receive_async(self, update: messages.Update, delivery: Delivery, entry: dict[str, Any], tau: int) -> None:
        st, cfg = self.state, self.cfg
        if cfg.max_staleness is not None and tau > cfg.max_staleness:
            self._settle(delivery, entry, "stale", f"staleness {tau} > --max-staleness {cfg.max_staleness}")
            st.applied_tasks.add(update.task_id)
            return
        assert isinstance(self.strategy, FedAsync | FedBuff)
        result = self.strategy.apply(self.params, update.params, update.num_samples, tau)
        st.applied_tasks.add(update.task_id)
        st.counts["applied"] += 1
        st.staleness_since_version.append(tau)
        entry["weight"] = round(result.weight, 6)
        self._settle(delivery, entry, "applied", None, count=False)
        if result.params is not None:
            self.params = result.params
            st.version += 1
            self._publish_model()
            self._evaluate()

    def _settle(self, delivery: Delivery, entry: dict[str, Any], fate: str, reason: str | None, count: bool = True) -> None:
        entry["fate"] = fate
        if reason:
            entry["reason"] = reason
        if count:
            self.state.counts[fate] += 1
        self.ledger.record(entry)
        self.pending.append(_ack_handle(delivery))
        if fate != "applied":
            log.info("update %s from %s: %s (%s)", entry.get("task_id", "?"), entry.get("worker_id", "?"), fate, reason)

    def _reject(self, delivery: Delivery, entry: dict[str, Any], reason: str) -> None:
        """Dead-letter a bad update with its reason, then ack it with the next checkpoint."""
        assert self.client is not None
        log.warning("rejecting update message %s: %s", delivery.message_id, reason)
        try:
            self.client.publish(
                "updates", delivery.body, exchange=self.topology.dlx, message_id=delivery.message_id,
                headers={"x-fedmq-reason": reason[:500], "x-first-death-reason": "rejected",
                         "x-first-death-queue": self.topology.updates},
            )
        except BrokerError as exc:
            log.error("could not dead-letter message %s: %s", delivery.message_id, exc)
        self._settle(delivery, entry, "rejected", reason)

    # ------------------------------------------------------------------ evaluation and durability
    def _evaluate(self) -> None:
        st = self.state
        loss, acc = self.trainer.evaluate(self.params, self.X_test, self.y_test)
        taus = st.staleness_since_version
        entry = {
            "version": st.version, "time_s": round(self.elapsed(), 3), "accuracy": float(acc), "loss": float(loss),
            "updates_applied": st.counts["applied"],
            "staleness_mean": float(np.mean(taus)) if taus else 0.0,
        }
        if self.cfg.synchronous:
            entry["round"] = st.round
        st.staleness_since_version = []
        st.history.append(entry)
        where = f"round {st.round:3d}" if self.cfg.synchronous else f"version {st.version:4d}"
        log.info("%s  accuracy %.4f  loss %.4f  updates %d  staleness %.2f  t=%.1fs", where, acc, loss,
                 st.counts["applied"], entry["staleness_mean"], entry["time_s"],
                 extra={"event": "evaluated", **entry})
        if self.cfg.target_accuracy is not None and acc >= self.cfg.target_accuracy:
            st.reached_target = True

    def _checkpoint(self, force: bool = False) -> None:
        if not self.pending and not force:
            return
        due = (
            force
            or len(self.pending) >= self.checkpoint_every
            or time.monotonic() - self._last_checkpoint >= self.cfg.checkpoint_interval
        )
        if not due:
            return
        st = self.state
        self._confirm_publishes()
        st.ledger_offset = self.ledger.commit()
        elapsed = self.elapsed()
        strat_meta: dict[str, Any] = {}
        arrays = {f"model/{k}": v for k, v in self.params.items()}
        if isinstance(self.strategy, FedAsync | FedBuff):
            strat_meta, strat_arrays = self.strategy.state()
            arrays.update({f"strategy/{k}": v for k, v in strat_arrays.items()})
        meta = {"state": {**st.to_meta(), "elapsed_s": elapsed}, "strategy": strat_meta, "config": self.cfg.to_json()}
        durable.save_checkpoint(self.out, meta, arrays)
        self._write_history()
        assert self.client is not None
        for delivery in self.pending:
            self.client.ack(delivery)
        self.pending = []
        self._last_checkpoint = time.monotonic()

    def _confirm_publishes(self) -> None:
        """Wait for every outstanding model and task publish (before acking anything)."""
        pending, self._unconfirmed = self._unconfirmed, []
        for pub in pending:
            pub.wait()

    def final(self) -> dict[str, Any]:
        st = self.state
        last = st.history[-1] if st.history else {}
        return {
            "version": st.version, "accuracy": last.get("accuracy"), "loss": last.get("loss"),
            "time_s": round(self.elapsed(), 3), "updates_applied": st.counts["applied"],
            "updates_rejected": st.counts["rejected"], "updates_stale": st.counts["stale"],
            "updates_duplicate": st.counts["duplicate"], "updates_late": st.counts["late"],
            "reached_target": st.reached_target, "interrupted": self.interrupted,
            "rounds": st.round if self.cfg.synchronous else None,
        }

    def _write_history(self) -> None:
        doc = {"config": self.cfg.to_json(), "spec": self.spec, "namespace": self.topology.namespace,
               "history": self.state.history, "final": self.final()}
        durable.atomic_write_json(self.out / "history.json", doc)

    # ------------------------------------------------------------------ the end of a run
    def _finish(self) -> None:
        """Tell workers to stop, record what they still send, and clear the task queue."""
        assert self.client is not None
        self._finishing = True
        stop = messages.Control(kind="stop", worker_id="", sent_s=time.time(), info={"version": self.state.version})
        try:
            self.client.publish("", messages.encode(stop), exchange=self.topology.control, mandatory=False, sign=True)
        except BrokerError as exc:
            log.warning("could not broadcast stop: %s", exc)
        deadline = time.monotonic() + self.cfg.drain_timeout
        while self.live and time.monotonic() < deadline:
            self._pump(timeout=min(0.5, deadline - time.monotonic()))
        try:
            self.client.call(lambda ch: ch.queue_purge(self.topology.tasks))
        except Exception as exc:  # noqa: BLE001 (best effort clean-up)
            log.info("could not purge the task queue: %s", exc)
        st = self.state
        log.info("finished: version %d, accuracy %s, %d applied, %d rejected, %d stale, %d duplicate",
                 st.version, st.history[-1]["accuracy"] if st.history else None, st.counts["applied"],
                 st.counts["rejected"], st.counts["stale"], st.counts["duplicate"])


def _ack_handle(delivery: Delivery) -> Delivery:
    """The delivery without its body: all an ack needs, so bodies are freed once applied."""
    return dataclasses.replace(delivery, body=b"")


def _stream_timestamp(epoch_s: float) -> Any:
    import datetime as dt

    return dt.datetime.fromtimestamp(epoch_s, tz=dt.timezone.utc).replace(tzinfo=None)

