"""The aggregator's shell: broker I/O, the inbox, evaluation and durability around the core.

Every decision is made by :class:`fedmq.aggregator.core.Coordinator`; this module feeds it
(update and presence messages, ticks, stop requests, evaluation results, each with the
monotonic time) and carries out what it returns: publishing models and tasks, dead-lettering
rejected updates, recording fates in ``updates.jsonl``, evaluating, checkpointing, emitting the
events of :mod:`fedmq.shared.events`.

One thread does all the work; the broker client's I/O thread only puts deliveries on
``self.inbox``. Every update message gets exactly one line in ``updates.jsonl`` and is acked
only after a checkpoint that contains its effect is on disk, in one order kept by
:meth:`Aggregator._checkpoint` alone: wait for the broker's confirms of model and task
publishes, fsync the ledger, write the checkpoint, ack. (A sync round's checkpoint is written
on a thread of its own while the next round's model goes out; see :meth:`_checkpoint` and
:mod:`fedmq.aggregator.versions`.) A crash therefore loses nothing
(unacked updates are redelivered) and applies nothing twice (the checkpoint holds the set of
applied task ids an update can still claim, and the ledger and ``history.jsonl`` are truncated
back to the checkpoint on ``--resume``).

Every run has an id (``YYYYmmddTHHMMSSZ-xxxxxx``, docs/protocol.md), made here when a run starts
and kept by the checkpoint (``--resume`` continues the run); models (body and the
:data:`~fedmq.broker.topology.RUN_HEADER`), tasks and the stop broadcast carry it, and the model
spec names the trainer (``spec["trainer"]``, the ``--trainer`` reference). A run that cannot
succeed (:class:`~fedmq.aggregator.core.RunFailed`) still stops its workers, drains and writes
its files; then :meth:`Aggregator.run` raises, so the command exits 1 with one line.

Signatures (:mod:`fedmq.shared.signing`, docs/protocol.md): with ``--signing-key`` every model,
task and stop carries the aggregator's signature headers; with ``--worker-keys`` an update or
failure report not signed by the worker it names, for this run, is rejected (dead-lettered
with the reason, recorded in the ledger) as if it did not decode, and presence that does not
verify is ignored.

Worker liveness is the arrival time of hello/heartbeat messages on this machine's monotonic
clock, never the worker's own clock. The presence stream is read from a timestamp offset
``--presence-timeout`` seconds back (the broker's clock filters old history), so that workers
already running are counted at once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
import queue
import secrets
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmq.aggregator import durable, versions
from fedmq.aggregator.config import AggregatorConfig
from fedmq.aggregator.core import (
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
    RoundOpened,
    RoundShort,
    RoundWaiting,
    RunFailed,
    Settle,
    TaskExpired,
    TaskRetried,
    Token,
    Undecodable,
    VersionEvaluated,
    WaitingForWorkers,
    WorkerJoined,
    WorkerKeepsFailing,
    WorkerLeft,
    WorkerRefused,
)
from fedmq.aggregator.export import check_export, export_model
from fedmq.aggregator.footprint import memory_factor, updates_in_memory_bytes
from fedmq.aggregator.history import HISTORY_LOG, History, SnapshotSchedule
from fedmq.aggregator.identity import IdentityBook
from fedmq.aggregator.policy import make_policy
from fedmq.aggregator.strategies import make_strategy
from fedmq.aggregator.tracking import SafeTracker, make_tracker
from fedmq.aggregator.validate import expected_update_bytes
from fedmq.broker.chunked import check_chunk_size, publish_payload
from fedmq.broker.client import Client, Delivery, PendingPublish
from fedmq.broker.lock import NamespaceLock
from fedmq.broker.settings import BrokerSettings
from fedmq.broker.topology import CONSUMER_TIMEOUT_ARG, RUN_HEADER, VERSION_HEADER, Topology
from fedmq.shared import chunking, compression, memory, messages, signing
from fedmq.shared.data import load_num_classes, load_shard
from fedmq.shared.errors import BrokerError, DecodeError, LockLost, MessageTooLarge
from fedmq.shared.events import SCHEMA, emit
from fedmq.shared.files import drop_resident_pages, payload_allocator, release_pages
from fedmq.shared.spec import build_spec, make_trainer, run_trainer_config
from fedmq.shared.trainer import Trainer, load_trainer_factory

log = logging.getLogger("fedmq.aggregator")

#: how long an aggregator that is not a standby waits for the namespace lock before refusing
LOCK_WAIT_S = 8.0
#: how long, after a reconnect, the lock token may take to come back before we give the run up
LOCK_REGAIN_S = 120.0
# the longest the main loop sleeps without looking at the stop flag and the clock
_MAX_WAIT_S = 2.0
#: the spec entry naming the trainer reference the model is for (the workers check it)
SPEC_TRAINER_KEY = "trainer"
#: the longest the broker client's I/O thread may keep the GIL from the main loop (Python's
#: default is 5 ms). Each blocking call of the main loop (an fsync, a rename, a log line) lets
#: the I/O thread take the GIL, and while that thread is busy reading updates the main loop
#: waited up to the whole interval to get it back: ~5 ms more per fsync, a checkpoint's four to
#: six of them included (measured on a loaded 2-core machine: write + fsync 3.6 ms alone, 8.3-8.8
#: ms beside a busy Python thread at 5 ms, 1.8-5.7 ms at 1 ms; BENCHMARKS.md, update path).
GIL_SWITCH_S = 0.001


def shorten_gil_switch(limit_s: float = GIL_SWITCH_S) -> float:
    """Lower the interpreter's GIL switch interval to ``limit_s`` (never raise it); return it."""
    if sys.getswitchinterval() > limit_s:
        sys.setswitchinterval(limit_s)
    return sys.getswitchinterval()


def new_run_id(now_s: float | None = None) -> str:
    """A fresh run id: UTC time and 6 hex digits, ``YYYYmmddTHHMMSSZ-xxxxxx``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now_s is None else now_s))
    return f"{stamp}-{secrets.token_hex(3)}"


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
        self.interrupted = False
        self.client: Client | None = None
        self.core: Coordinator | None = None
        # token -> the deliveries of an update awaiting its fate (one, or every chunk of a chunked one)
        self._deliveries: dict[Token, list[Delivery]] = {}
        self._payloads: dict[str, Token] = {}  # chunked update awaiting its fate -> its token
        self.assembler: chunking.Reassembler[Delivery] | None = None  # chunked updates: made in _restore
        self._pending: list[Delivery] = []  # settled, acked by the next checkpoint
        self._settled = 0  # updates settled since the last checkpoint (a chunked one is many deliveries)
        # model and task publishes whose confirms we have not waited for yet: the next
        # checkpoint waits for them before it acks anything
        self._unconfirmed: list[PendingPublish] = []
        self._tracker = SafeTracker(None)  # --track: made in run(), once the run id is known
        self._tokens = 0
        self._told = (False, False)  # (stop, interrupted) as passed to the core
        self._last_checkpoint = 0.0
        self._history_json = SnapshotSchedule()  # history.json: with a checkpoint, at most once a second
        self._signing_key: Ed25519PrivateKey | None = None  # --signing-key, loaded by _setup
        self._worker_keys: signing.PublicKeys | None = None  # --worker-keys
        self._unsigned_presence: set[str] = set()  # workers whose unverified presence was logged
        self.incarnation = secrets.token_hex(3)
        self._models_published = 0
        self._model_ahead: dict[int, _Ahead] = {}  # version -> its message, made while a checkpoint is written
        self._writing: _Writing | None = None  # a sync round's checkpoint, written on another thread
        self._takeovers: list[dict[str, Any]] = []  # standbys that took this run over (history.json)
        self.identities = IdentityBook()  # --require-user-id: worker id -> broker user
        self.lock: NamespaceLock | None = None
        self.dirlock = durable.RunDirLock(self.out, self.incarnation)
        self._took_over: dict[str, Any] | None = None  # set when a standby takes the run over
        self._fenced = False  # lost the namespace or the run directory: write nothing more

    # ------------------------------------------------------------------ I/O-thread handlers
    def _on_update(self, delivery: Delivery) -> None:
        self.inbox.put(("update", delivery))

    def _on_presence(self, delivery: Delivery) -> None:
        try:
            msg = messages.decode(delivery.body, expect=messages.Control, max_bytes=64 * 1024)
        except DecodeError:
            return
        assert isinstance(msg, messages.Control)
        if self._worker_keys is not None:  # --worker-keys: a worker's hello, heartbeat or refusal must be its own
            reason = signing.verify(delivery.headers, delivery.body, signing.claims_of(msg), self._worker_keys)
            if reason is not None:
                if len(self._unsigned_presence) < 100 and msg.worker_id not in self._unsigned_presence:
                    self._unsigned_presence.add(msg.worker_id)
                    log.warning("ignoring %s messages claiming worker %r: %s", msg.kind, msg.worker_id[:80], reason)
                return
            if "workers" in msg.info:  # a signature speaks for its signer only: no pooled heartbeats
                msg = dataclasses.replace(msg, info={k: v for k, v in msg.info.items() if k != "workers"})
        self.inbox.put(("presence", msg))

    def request_stop(self) -> None:
        """Checkpoint and leave (e.g. on SIGTERM); the run can be resumed."""
        self.interrupted = True
        self.stop.set()
        self.inbox.put(("wake", None))

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg = self.cfg.validate()
        # sync: a round holds its updates until it closes, and the next round reuses their memory
        # (its peak is the round's); FedBuff and FedAsync let each update go at once, and memory kept
        # for the next would add to their peak at a step (see fedmq.shared.memory)
        if cfg.synchronous:
            memory.keep_large_buffers()
        else:
            memory.give_back_large_buffers()
        X, y = load_shard(cfg.test_data)
        self.X_test, self.y_test = X, y
        classes = load_num_classes(cfg.test_data) or int(y.max()) + 1
        self.strategy = make_strategy(
            cfg.strategy_name, mixing=cfg.mixing, staleness=cfg.staleness, staleness_a=cfg.staleness_a,
            staleness_b=cfg.staleness_b, buffer_size=cfg.buffer_size, server_lr=cfg.server_lr,
            robust=cfg.robust_rule(), dp=cfg.dp_mechanism(),
        )
        rule, dp = cfg.robust_rule(), cfg.dp_mechanism()
        if rule.name != "none":
            held = "each round's" if cfg.synchronous else f"each buffer's {cfg.buffer_size}"
            log.info("robust aggregation: %s%s", rule.options,
                     f" (holds {held} updates at once)" if rule.needs_all and cfg.strategy_name != "fedasync" else "")
        if dp is not None:
            log.info("differential privacy: deltas clipped to %g, noise multiplier %g; epsilon at delta %g is "
                     "recorded for every version", dp.clip, dp.noise, dp.delta)
        if cfg.dp_clip is not None and cfg.dp_noise == 0:
            log.warning("--dp-clip %g with --dp-noise 0: differential privacy is off (no clipping, no noise)",
                        cfg.dp_clip)
        self.policy = make_policy(cfg)
        # the trainer owns its model: it makes the spec from its configuration and the data
        factory = load_trainer_factory(cfg.trainer)
        options = {"hidden": list(cfg.hidden), "activation": cfg.activation, "loss": cfg.loss}
        trainer_config = run_trainer_config(factory, cfg.trainer_config, device=cfg.device, mlp_options=options)
        architecture = build_spec(factory, trainer_config, input_shape=X.shape[1:], num_classes=classes, seed=cfg.seed)
        # what the models carry: the architecture and the trainer it is for (workers check it)
        self.spec = {**architecture, SPEC_TRAINER_KEY: cfg.trainer}
        self.trainer: Trainer = make_trainer(factory, architecture)
        if cfg.export:
            check_export(cfg.export)
        self._initial = self.trainer.init_params()
        model_bytes = self.model_bytes = sum(int(v.nbytes) for v in self._initial.values())
        factor, why = memory_factor(cfg)
        memory.check_fits(model_bytes, factor, cfg.memory_budget, who="aggregator", why=why)
        self._memory_factor = factor
        updates = self.policy.prefetch(model_bytes)
        self.checkpoint_every = min(cfg.checkpoint_every, max(1, updates - 1))
        # a chunked update is held as all its chunks: room for them, and for one more update arriving
        self.chunks_per_update = chunking.chunk_count(model_bytes + 64 * 1024, cfg.chunk_bytes)
        self.prefetch = updates if self.chunks_per_update == 1 else (updates + 1) * self.chunks_per_update
        if cfg.signing_key:
            self._signing_key = signing.load_private_key(cfg.signing_key)
        if cfg.worker_keys:
            self._worker_keys = signing.PublicKeys(cfg.worker_keys)
            log.info("accepting only updates signed by the worker they name (%d key(s) in %s)",
                     len(self._worker_keys.ids), cfg.worker_keys)

    def _restore(self) -> None:
        """Open the run directory: only once we hold the namespace's aggregator lock."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        previous = self.dirlock.claim()  # before reading the checkpoint: see RunDirLock
        resume = cfg.resume or self._took_over is not None
        restored = durable.load_checkpoint(self.out) if resume else None
        if resume and restored is None:
            log.warning("%s: no checkpoint in %s, starting a new run",
                        "taking over" if self._took_over is not None else "--resume", self.out)
        if self._took_over is not None:
            self._took_over["previous"] = (previous or {}).get("incarnation", "")
        incarnation = self.incarnation
        initial, self._initial = self._initial, {}
        if restored is not None:
            meta, arrays = restored
            self._takeovers = list(meta.get("takeovers") or [])
            self.identities = IdentityBook(meta.get("identities") or {})
            self.strategy.restore(meta.get("strategy", {}), durable.split_prefix(arrays, "strategy/"))
            self.core = Coordinator.from_meta(
                meta["state"], config=cfg, strategy=self.strategy, policy=self.policy,
                params=durable.split_prefix(arrays, "model/"), now=time.monotonic(), incarnation=incarnation,
                run_id=new_run_id(),  # only for a checkpoint without one
            )
            st = self.core.state
            self.ledger = durable.Ledger(self.out / "updates.jsonl", truncate_to=st.ledger_offset)
            self.history = History(self.out, truncate_to=st.history_offset, legacy=st.legacy_history)
            st.legacy_history = None
            self.core.lost = versions.lost_versions(self.history.past_checkpoint, st.version)
            if self.core.lost:
                log.warning("the aggregator before this one made version(s) %s after its last checkpoint (version %d); "
                            "a version made again with the same number keeps it only if its parameters are the same",
                            ", ".join(map(str, sorted(self.core.lost))), st.version)
            log.info("resumed run %s from checkpoint: version %d, round %d, %d updates applied",
                     st.run_id, st.version, st.round, st.counts["applied"])
        else:
            self.core = Coordinator(cfg, self.strategy, self.policy, initial, incarnation=incarnation,
                                    run_id=new_run_id())
            self.ledger = durable.Ledger(self.out / "updates.jsonl")
            self.history = History(self.out)
            log.info("run %s starts", self.core.run_id)
        self.max_update_bytes = cfg.max_update_bytes or expected_update_bytes(self.core.params)
        # a compressed update may not decompress to more than an uncompressed one of this model may be
        self.max_decompressed_bytes = expected_update_bytes(self.core.params)
        # chunked updates are put together in memory while that is cheap and fits, else in files
        # of the run directory (see fedmq.aggregator.footprint.updates_in_memory_bytes)
        budget, _ = memory.resolve_budget(cfg.memory_budget)
        in_memory = updates_in_memory_bytes(self.model_bytes, self.max_decompressed_bytes, self._memory_factor, budget,
                                            auto=memory.parse_budget(cfg.memory_budget) == "auto")
        if self.chunks_per_update > 1:
            log.info("chunked updates: up to %s of them put together in memory, the rest in spill files under %s",
                     memory.describe(in_memory), self.out / "spill")
        self.assembler = chunking.Reassembler(max_payload_bytes=self.max_update_bytes, timeout_s=cfg.chunk_timeout,
                                              allocate=payload_allocator(self.out / "spill", in_memory),
                                              release=release_pages)
        if restored is not None:  # chunks of an update settled before the restart are not a new update
            self.assembler.remember(e["message_id"] for e in self.ledger.tail(chunking.LEDGER_TAIL_BYTES)
                                    if isinstance(e.get("message_id"), str))
        assert self.client is not None
        if self.chunks_per_update > 1 or self.model_bytes + chunking.HEADROOM_BYTES > self.client.max_message_bytes:
            check_chunk_size(self.client, cfg.chunk_bytes)  # one line naming --chunk-bytes, before any publish

    def _connect(self) -> None:
        client = Client(self.settings, self.topology, name="fedmq-aggregator")
        # presence from --presence-timeout back, counted from when we start to listen (a
        # resubscription goes on from the last message read)
        client.subscribe(
            self.topology.presence, self._on_presence, prefetch=200, settle_on_return=True, paused=True,
            arguments=lambda: {"x-stream-offset": _stream_timestamp(time.time() - self.cfg.presence_timeout)},
        )
        # updates stay unacked until a checkpoint (a sync round: until it closes): the broker's
        # consumer timeout (30 min by default) must not cut them off
        client.subscribe(self.topology.updates, self._on_update, prefetch=self.prefetch, paused=True,
                         arguments={CONSUMER_TIMEOUT_ARG: int(self.cfg.consumer_timeout * 1000)})
        # one active aggregator per namespace (fedmq.broker.lock): a second one is refused
        # (NamespaceLocked), or with --standby waits to take over
        self.lock = NamespaceLock(client, self.topology.lock, f"{self.incarnation}")
        self.lock.subscribe()
        # a client that gives up (a permanent error) wakes the loop, which raises its error
        client.on_failure = lambda exc: self.inbox.put(("wake", None))
        self.client = client.start()
        try:
            self._acquire_lock()
        except BaseException:
            client.close()
            raise
        client.resume(self.topology.presence)
        client.resume(self.topology.updates)
        log.info("aggregator connected to %s, namespace %s, %s/%s", client.node_url,
                 self.topology.namespace, self.cfg.mode, self.cfg.strategy_name)

    def _acquire_lock(self) -> None:
        """Hold the namespace's lock, or wait for it (--standby), or refuse (NamespaceLocked)."""
        assert self.lock is not None
        ns = self.topology.namespace
        if not self.cfg.standby:
            if not self.lock.acquire(LOCK_WAIT_S, self.stop):
                raise self.lock.refused()
            return
        emit(log, "standby", "standby: waiting to take over namespace %s from the active aggregator", ns,
             namespace=ns)
        if not self.lock.acquire(None, self.stop):
            raise KeyboardInterrupt  # stopped while waiting: nothing was started
        # whether another one ran before us or not, a standby continues what is in --out
        self._took_over = {}

    # ------------------------------------------------------------------ main
    def run(self) -> dict[str, Any]:
        """Run to the end (or to :meth:`request_stop`) and return the final figures."""
        shorten_gil_switch()
        self._setup()
        try:
            self._connect()
        except KeyboardInterrupt:
            self.interrupted = True
            return {"interrupted": True}
        assert self.client is not None
        try:
            self._restore()
        except BaseException:
            self.client.close()
            raise
        core = self._core
        if self._took_over is not None and self._took_over.get("previous"):
            emit(log, "took_over", "took over run %s on namespace %s at version %d (incarnation %s, after %s)",
                 core.run_id, self.topology.namespace, core.state.version, self.incarnation,
                 self._took_over.get("previous") or "?", namespace=self.topology.namespace,
                 incarnation=self.incarnation, version=core.state.version,
                 previous=self._took_over.get("previous") or "")
            self._takeovers.append({"incarnation": self.incarnation, "version": core.state.version,
                                    "previous": self._took_over.get("previous") or "", "at": time.time()})
        self._last_checkpoint = time.monotonic()
        self._tracker = SafeTracker(make_tracker(self.cfg.track, self.out, self.cfg.track_uri))
        self._tracker.call("start", core.run_id, self.cfg.to_json())
        try:
            try:
                self._carry(core.start(time.monotonic()))
                while not core.done:
                    if self._stop_news():
                        self._told = (True, self.interrupted)
                        self._carry(core.stop(time.monotonic(), interrupted=self.interrupted))
                        continue
                    self._pump(self._wait_s())
                if not core.interrupted:
                    self._sweep()
                    self._carry(self._incomplete(self._assembler.give_up_all("the run ended first")))
            finally:
                if not self._fenced:
                    self._checkpoint(force=True)
                    durable.save_params(self.out / "model.npz", core.params)
                    self._write_history(full=True)  # every version, once, when the aggregator leaves
                    if self.cfg.export:
                        export_model(self.out, core.params, self.spec, self.trainer, self.cfg.export)
        finally:
            if self._writing is not None:  # fenced, or failed before the last checkpoint: nothing more is acked
                self._writing.job.wait()
            self.client.close()
            if self._fenced:
                self.ledger.abandon()
                self.history.abandon()
            else:
                self.ledger.close()
                self.history.close()
        final = self.final()
        self._tracker.call("finish", {**final, "failed": core.failure is not None}, dict(core.state.counts),
                           self.out / "model.npz")
        required, optional = SCHEMA["finished"]
        emit(log, "finished", "%s: version %d, accuracy %s, %d applied, %d rejected, %d stale, %d duplicate, %d late",
             "interrupted" if final["interrupted"] else "failed" if core.failure else "finished", final["version"],
             final["accuracy"], final["updates_applied"], final["updates_rejected"], final["updates_stale"],
             final["updates_duplicate"], final["updates_late"],
             **{k: v for k, v in final.items() if k in required | optional})
        if core.failure is not None and not core.interrupted:
            raise RunFailed(f"run {core.run_id} on namespace {self.topology.namespace} failed: {core.failure}")
        return final

    def _stop_news(self) -> bool:
        """A stop (or an interrupt) was requested that the core has not been told of."""
        return self.stop.is_set() and self._told != (True, self.interrupted)

    @property
    def _assembler(self) -> chunking.Reassembler[Delivery]:
        assert self.assembler is not None, "the run has not started"
        return self.assembler

    @property
    def _core(self) -> Coordinator:
        assert self.core is not None, "the run has not started"
        return self.core

    def _wait_s(self) -> float:
        """How long the inbox may stay quiet before the core or a checkpoint needs a look."""
        now = time.monotonic()
        wait = min(_MAX_WAIT_S, self._last_checkpoint + self.cfg.checkpoint_interval - now)
        for wake in (self._core.next_wake(now), self._assembler.next_deadline(), self._history_json.deadline()):
            if wake is not None:
                wait = min(wait, wake - now)
        return max(0.05, wait)

    # ------------------------------------------------------------------ inbox
    def _pump(self, timeout: float) -> None:
        """Handle inbox items for up to ``timeout`` seconds (returns after the first batch)."""
        core, client = self._core, self.client
        assert client is not None
        try:
            kind, item = self.inbox.get(timeout=max(0.0, timeout))
        except queue.Empty:
            kind, item = "wake", None
        if kind == "written":
            self._written(item)
            kind = "wake"
        if client.failure is not None:  # permanent: out of run(), so the command fails
            raise client.failure
        self._raise_refused_publishes()
        self._carry(self._incomplete(self._assembler.expire(time.monotonic())))
        if kind == "wake":
            self._carry(core.tick(time.monotonic()))
            self._checkpoint()
            return
        while True:
            if kind == "update":
                self._carry(self._receive(item))
            elif kind == "presence":
                self._carry(core.presence(item, time.monotonic()))
            elif kind == "written":
                self._written(item)
            # once done (or told to stop) what is left in the inbox stays unacked, or is
            # recorded as late while the run drains
            if core.done or self._stop_news():
                break
            try:
                kind, item = self.inbox.get_nowait()
            except queue.Empty:
                break
        self._checkpoint()

    def _sweep(self) -> None:
        """The run finished: record the updates already received as late (none is left unacked)."""
        while True:
            try:
                kind, item = self.inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "update":
                self._carry(self._receive(item))

    def _receive(self, delivery: Delivery) -> list[Decision]:
        if not chunking.is_chunk(delivery.headers):
            msg = self._decode(delivery.body, delivery.headers, delivery.user_id)
            return self._hand([delivery], msg, delivery.message_id, delivery.redelivered)
        out: list[Decision] = []
        handle = _ack_handle(delivery)  # the chunk's bytes go into the payload's buffer
        for o in self._assembler.offer(delivery.headers, delivery.body, handle, time.monotonic(),
                                       redelivered=delivery.redelivered):
            if isinstance(o, chunking.Complete):
                users = {t.user_id for t in o.tokens}
                msg = self._decode(o.body, o.headers, users.pop() if len(users) == 1 else None, digest=o.sha256)
                drop_resident_pages(o.body)  # checked and decoded: its pages wait in the spill file
                out += self._hand(o.tokens, msg, o.payload_id, o.redelivered, payload=o.payload_id)
            elif isinstance(o, chunking.Refused) and not o.whole:  # this chunk alone: dead-lettered with the reason
                out += self._hand([delivery], Undecodable(o.reason), delivery.message_id, delivery.redelivered)
            elif isinstance(o, chunking.Refused):
                out += self._hand(o.tokens, Undecodable(o.reason), o.payload_id, False, payload=o.payload_id)
            elif isinstance(o, chunking.Incomplete):
                out += self._incomplete([o])
            elif isinstance(o, chunking.Duplicate):
                self._late_chunk(o.payload_id, o.token)
        return out

    def _hand(self, deliveries: list[Delivery], msg: messages.Update | messages.Control | Undecodable,
              message_id: str | None, redelivered: bool, *, payload: str | None = None) -> list[Decision]:
        """Give the core one update message (one delivery, or every chunk of a chunked one)."""
        self._tokens += 1
        token = self._tokens
        self._deliveries[token] = deliveries
        if payload is not None:
            self._payloads[payload] = token
        return self._core.receive(token, msg, time.monotonic(), message_id=message_id, redelivered=redelivered)

    def _incomplete(self, gone: list[chunking.Incomplete[Delivery]]) -> list[Decision]:
        """Chunked updates whose chunks stopped arriving: one ledger line each, chunks acked with it."""
        out: list[Decision] = []
        for o in gone:
            self._tokens += 1
            token = self._tokens
            self._deliveries[token] = o.tokens
            self._payloads[o.payload_id] = token
            task, worker = o.headers.get("x-fedmq-task"), o.headers.get("x-fedmq-worker")
            decisions = self._core.incomplete(token, time.monotonic(), message_id=o.payload_id, reason=o.reason,
                                              task_id=task if isinstance(task, str) else None,
                                              worker_id=worker if isinstance(worker, str) else None)
            if not decisions:  # interrupted: left unacked, the broker delivers them again
                del self._deliveries[token]
                self._payloads.pop(o.payload_id, None)
            out += decisions
        return out

    def _late_chunk(self, payload_id: str, handle: Delivery) -> None:
        """A chunk of an update completed (or given up) before: settled with it, or acked at the next checkpoint."""
        token = self._payloads.get(payload_id)
        if token is not None and token in self._deliveries:
            self._deliveries[token].append(handle)
        else:
            self._pending.append(handle)

    def _decode(self, body: bytes | memoryview, headers: Mapping[str, Any], user_id: str | None, *,
                digest: bytes | None = None) -> messages.Update | messages.Control | Undecodable:
        """An update, or a control message (a worker's failure report), or why it is neither.

        ``headers`` and ``user_id`` are the message's (a chunked one's: its first chunk's headers,
        and the user every chunk was published by, None if they differ); ``digest``: a chunked
        one's SHA-256, computed from its bytes as they were put together (not hashed again)."""
        unsigned = IdentityBook.unsigned(user_id) if self.cfg.require_user_id else None
        if unsigned is not None:
            return Undecodable(unsigned)
        size = len(body)
        if size > self.max_update_bytes:
            return Undecodable(f"update of {size} bytes is over the limit of {self.max_update_bytes} bytes")
        try:
            msg = messages.decode(body, expect=(messages.Update, messages.Control),
                                  max_bytes=self.max_update_bytes, max_decompressed_bytes=self.max_decompressed_bytes)
        except DecodeError as exc:
            return Undecodable(str(exc))
        assert isinstance(msg, messages.Update | messages.Control)
        if self.cfg.require_user_id:
            refused = self.identities.refuse(msg.worker_id, user_id)
            if refused is not None:
                return Undecodable(refused)
        unverified = self._unverified(headers, body, msg, digest)
        return msg if unverified is None else Undecodable(unverified)

    def _unverified(self, headers: Mapping[str, Any], body: bytes | memoryview,
                    msg: messages.Update | messages.Control, digest: bytes | None = None) -> str | None:
        """With --worker-keys: why ``msg`` is not signed by the worker it names for this run, or None."""
        if self._worker_keys is None:
            return None
        claims = signing.claims_of(msg)
        reason = signing.verify(headers, body, claims, self._worker_keys, digest=digest or None)
        run = self._core.run_id
        if reason is None and msg.run_id != run:
            reason = f"signed for run {msg.run_id or '(none)'}, not this run {run} (a replay, or left from another run)"
        if reason is None:
            return None
        what = "update" if isinstance(msg, messages.Update) else f"{msg.kind} report"
        return f"{what} for task {claims.task_id[:80] or '?'} claiming worker {claims.signer[:80]!r}: {reason}"

    def _signed(self, msg: messages.Message, body: bytes, digest: bytes | None = None) -> dict[str, Any]:
        """The signature headers of ``msg`` (--signing-key; ``digest``: the body's SHA-256, if
        computed already), or none."""
        if self._signing_key is None:
            return {}
        return signing.sign_headers(self._signing_key, signing.claims_of(msg), body, digest=digest)

    # ------------------------------------------------------------------ carrying out decisions
    def _carry(self, decisions: list[Decision]) -> None:
        """Carry out the core's decisions, in order."""
        for i, d in enumerate(decisions):
            match d:
                case Settle():
                    self._settle(d)
                case IssueTask(task=task):
                    body = messages.encode(task)
                    self._publish(self.topology.tasks, body, message_id=task.task_id, headers=self._signed(task, body))
                case PublishModel():
                    prepared = self._model_ahead.pop(d.version, None)
                    msg, body, digest = prepared.result() if prepared is not None else self._model_message(d)
                    run_id = msg.run_id
                    # one id per publish: a version published again (by a resumed aggregator, or
                    # for a reopened round) is other bytes, and a reader holding the first chunks
                    # of a publish cut short by a kill would take the new ones as foreign
                    self._models_published += 1
                    mid = f"model-{run_id}-{d.version}-{self.incarnation}.{self._models_published}"
                    # a model larger than --chunk-bytes goes as chunks, each with these headers
                    self._publish(self.topology.models, body, message_id=mid, sha256=digest,
                                  headers={VERSION_HEADER: d.version, RUN_HEADER: run_id,
                                           **self._signed(msg, body, digest)})
                case Evaluate():
                    if d.renumbered_from is not None:
                        log.warning("version %d is numbered %d: the aggregator before the restart may have published "
                                    "a version %d with other parameters", d.renumbered_from, d.version,
                                    d.renumbered_from)
                    # a sync version is published before its checkpoint is written: its entry keeps
                    # its digest (fedmq.aggregator.versions), taken on another thread meanwhile
                    digest = (_Ahead(functools.partial(versions.params_digest, d.params), name="fedmq-digest")
                              if self.cfg.synchronous else None)
                    loss, acc = self.trainer.evaluate(d.params, self.X_test, self.y_test)
                    self._carry(self._core.evaluated(d.version, loss, acc, time.monotonic(),
                                                     digest=digest.result() if digest is not None else None))
                case Checkpoint():
                    # a sync round's next model is published right after this checkpoint is begun:
                    # its wire form (rounding, encoding) is made on another thread meanwhile, while
                    # this one fsyncs the ledger and history.jsonl; the checkpoint itself is
                    # written on a third while the workers train (see _checkpoint)
                    upcoming = next((x for x in decisions[i + 1:] if isinstance(x, PublishModel)), None)
                    if upcoming is not None and upcoming.version not in self._model_ahead:
                        self._model_ahead[upcoming.version] = _Ahead(functools.partial(self._model_message, upcoming),
                                                                       name="fedmq-model-ahead")
                    self._checkpoint(force=True, behind=True)
                case BroadcastStop():
                    self._broadcast_stop(d.version)
                case PurgeTasks():
                    self._purge_tasks()
                case VersionEvaluated(entry=e):
                    self.history.record(e)
                    where = f"round {e['round']:3d}" if "round" in e else f"version {e['version']:4d}"
                    emit(log, "version_evaluated", "%s  accuracy %.4f  loss %.4f  updates %d  staleness %.2f  t=%.1fs",
                         where, e["accuracy"], e["loss"], e["updates_applied"], e["staleness_mean"], e["time_s"], **e)
                    self._tracker.call("version", e)
                case RoundOpened():
                    log.debug("round %d: %d tasks on version %d", d.round, d.tasks, d.version)
                case RoundClosed():
                    emit(log, "round_closed", "round %d closed with %d updates: version %d", d.round, d.updates,
                         d.version, round=d.round, version=d.version, updates=d.updates)
                case WaitingForWorkers():
                    emit(log, "waiting_for_workers", "waiting for %d worker(s) to say hello on namespace %s (%d live)",
                         d.need, self.topology.namespace, d.have, namespace=self.topology.namespace, have=d.have,
                         need=d.need)
                case JoinGrace():
                    log.info("%d worker(s) live; waiting up to %.1f s for more to join before the first %s",
                             d.have, d.grace_s, "round" if self.cfg.synchronous else "task")
                case WorkerRefused():
                    emit(log, "worker_refused", "worker %s refused: %s", d.worker_id, d.reason, level=logging.WARNING,
                         worker_id=d.worker_id, reason=d.reason)
                case WorkerKeepsFailing():
                    log.warning("worker %s keeps failing: %s", d.worker_id, d.reason)
                case TaskRetried():
                    log.info("task %s failed; issuing %s (retry %d of %d)", d.failed_task, d.task_id, d.attempt,
                             d.retries)
                case RoundWaiting():
                    failed = f"; {len(d.failed)} task(s) failed: {'; '.join(d.failed)}" if d.failed else ""
                    fields: dict[str, Any] = {"failed": list(d.failed)} if d.failed else {}
                    emit(log, "round_waiting", "round %d: %d/%d updates after %.0f s%s", d.round, d.have, d.wanted,
                         d.waited_s, failed, level=logging.WARNING, round=d.round, have=d.have, wanted=d.wanted,
                         waited_s=d.waited_s, **fields)
                case RoundShort():
                    log.warning("round %d runs on %d worker(s); %d were live in this run (not live now: %s)",
                                d.round, d.tasks, d.seen, ", ".join(d.missing) or "none")
                case Failing():
                    log.error("the run cannot succeed and stops: %s", d.reason)
                case WorkerJoined():
                    emit(log, "worker_joined", "worker %s joined", d.worker_id, worker_id=d.worker_id)
                case WorkerLeft():
                    emit(log, "worker_left", "worker %s left (%s)", d.worker_id, d.reason, worker_id=d.worker_id,
                         reason=d.reason)
                case TaskExpired():
                    log.warning("task %s not answered in %.0f s; issuing a replacement", d.task_id, d.after_s)

    def _model_message(self, d: PublishModel) -> tuple[messages.ModelVersion, bytes, bytes | None]:
        """Version ``d`` as published: the message, its encoded body, and with --signing-key the
        body's SHA-256 (one digest for the signature and the chunks' digest header)."""
        dtype = self.cfg.model_dtype
        # --model-dtype bfloat16 or int8: rounded for the wire only; the core keeps float32
        params = compression.model_wire(d.params, dtype)
        msg = messages.ModelVersion(version=d.version, params=params, spec=self.spec, round=d.round,
                                    created_s=time.time(), run_id=self._core.run_id, dtype=dtype)
        body = messages.encode(msg)
        digest = signing.body_digest(body) if self._signing_key is not None else None
        return msg, body, digest

    def _publish(self, queue_name: str, body: bytes, *, message_id: str, headers: dict[str, Any] | None = None,
                 sha256: bytes | None = None) -> None:
        assert self.client is not None
        self._unconfirmed += publish_payload(self.client, queue_name, body, chunk_bytes=self.cfg.chunk_bytes,
                                             message_id=message_id, headers=headers, sign=True, sha256=sha256)

    def _settle(self, d: Settle) -> None:
        """Dead-letter a rejected update, record the fate, and ack with the next checkpoint."""
        deliveries = self._deliveries.pop(d.token)
        delivery = deliveries[0]
        entry = d.entry
        if isinstance(entry.get("message_id"), str):
            self._payloads.pop(entry["message_id"], None)
        if d.fate == "rejected" and delivery.body:  # a chunked update's bytes are gone: recorded, not dead-lettered
            self._dead_letter(delivery, d.reason or "rejected")
        self.ledger.record(entry)
        self._pending += [_ack_handle(x) for x in deliveries]
        self._settled += 1
        fields = {k: entry[k] for k in ("task_id", "worker_id", "reason", "staleness", "weight") if entry.get(k) is not None}
        mid = entry.get("message_id")
        if d.fate in ("rejected", "failed"):
            what = "rejecting update message %s: %s" if d.fate == "rejected" else "task failed (report %s): %s"
            emit(log, "update_settled", what, mid, d.reason,
                 level=logging.WARNING, message_id=mid, fate=d.fate, **fields)
        else:
            emit(log, "update_settled", "update %s from %s: %s%s", entry.get("task_id", "?"), entry.get("worker_id", "?"),
                 d.fate, f" ({d.reason})" if d.reason else "", message_id=mid, fate=d.fate, **fields)

    def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        assert self.client is not None
        try:
            self.client.publish(
                "updates", delivery.body, exchange=self.topology.dlx, message_id=delivery.message_id,
                headers={"x-fedmq-reason": reason[:500], "x-first-death-reason": "rejected",
                         "x-first-death-queue": self.topology.updates},
            )
        except BrokerError as exc:
            log.error("could not dead-letter message %s: %s", delivery.message_id, exc)

    def _broadcast_stop(self, version: int) -> None:
        assert self.client is not None
        stop = messages.Control(kind="stop", worker_id="", sent_s=time.time(), info={"version": version},
                                run_id=self._core.run_id)
        body = messages.encode(stop)
        try:
            # bounded well under the confirm timeout: the core sends it again while workers are live,
            # and a broker that confirms nothing (its quorum queues down) must not hold the loop 2 minutes
            self.client.publish("", body, exchange=self.topology.control, mandatory=False, sign=True,
                                headers=self._signed(stop, body) or None, timeout=STOP_CONFIRM_S)
        except BrokerError as exc:
            log.warning("could not broadcast stop: %s", exc)

    def _purge_tasks(self) -> None:
        assert self.client is not None
        try:
            self.client.call(lambda ch: ch.queue_purge(self.topology.tasks))
        except Exception as exc:  # noqa: BLE001 (best effort clean-up)
            log.info("could not purge the task queue: %s", exc)

    # ------------------------------------------------------------------ durability
    def _checkpoint(self, force: bool = False, *, behind: bool = False) -> None:
        """Publish confirms, ledger fsync, checkpoint, ack: the one durability order.

        ``behind`` (a sync round's close): the checkpoint file is written on another thread, and
        its deliveries acked once it is on disk (:meth:`_written`), while the next round's model
        goes out. That model is safe to publish first: its history entry, with its digest, is
        fsync'd here, so an aggregator resumed from the checkpoint before never publishes that
        version number with other parameters (:mod:`fedmq.aggregator.versions`). At most one
        checkpoint is being written: the next one waits for it.

        history.json is rewritten with it at most once a second (:class:`SnapshotSchedule`); one
        put off is written when its time comes (the main loop wakes for it): by a checkpoint if
        updates were settled since the last one, else alone. (It used to take a checkpoint
        whatever: in a sync run with rounds under a second, a second write of the whole model
        and three fsyncs about once a second, in the middle of a round.)
        """
        self._written(wait=False)
        owed = self._history_json.owed(time.monotonic())
        if not self._pending and not force:
            if owed:  # nothing settled since the last checkpoint, which holds all history.json shows
                self._guard()
                self._history_json.offer(time.monotonic())
                self._write_history()
            return
        due = (
            force
            or owed
            or self._settled >= self.checkpoint_every
            or time.monotonic() - self._last_checkpoint >= self.cfg.checkpoint_interval
        )
        if not due:
            return
        self._written()  # at most one is being written: this one waits for it
        core = self._core
        self._confirm_publishes()
        self._guard()
        offset = self.ledger.commit()
        history_offset = self.history.commit()
        now = time.monotonic()
        strategy_meta, strategy_arrays = core.strategy.state()
        # the model's arrays are never changed in place (a new version is new arrays); a
        # strategy's may be, so a checkpoint written behind gets copies of those
        arrays = {f"model/{k}": v for k, v in core.params.items()}
        arrays.update({f"strategy/{k}": v.copy() if behind else v for k, v in strategy_arrays.items()})
        meta = {"state": core.to_meta(now, ledger_offset=offset, history_offset=history_offset),
                "strategy": strategy_meta,
                "config": self.cfg.to_json(), "takeovers": self._takeovers,
                "identities": self.identities.to_meta()}
        blob = durable.meta_json(meta)  # a snapshot: the thread writing it shares nothing with us
        version, acks = core.state.version, self._pending
        self._pending = []
        self._settled = 0
        if self._history_json.offer(now):
            self._write_history()
        write = functools.partial(self._save_checkpoint, blob, arrays)
        if behind:
            job = _Ahead(write, name="fedmq-checkpoint", then=lambda done: self.inbox.put(("written", done)))
            self._writing = _Writing(version, acks, job)
        else:
            write()
            self._done_writing(version, acks)
        self._last_checkpoint = time.monotonic()

    def _save_checkpoint(self, blob: bytes, arrays: dict[str, Any]) -> None:
        """Write the checkpoint file (on the main thread, or behind); the run directory's lock is
        checked again just before the rename, since a checkpoint written behind takes a while."""
        try:
            durable.save_checkpoint(self.out, blob, arrays, before_replace=self.dirlock.check)
        except LockLost:
            self._fenced = True
            raise

    def _written(self, job: _Ahead | None = None, *, wait: bool = True) -> None:
        """Wait for the checkpoint being written, if one is (and it is ``job``, if given: the main
        loop hears of each when it is done, maybe after it waited for it; without ``wait``, only
        if it is done), and ack what it made durable; raises what writing it raised (its
        deliveries then stay unacked: the broker redelivers them)."""
        written = self._writing
        if written is None or (job is not None and written.job is not job) or not (wait or written.job.done):
            return
        self._writing = None
        written.job.result()
        self._done_writing(written.version, written.acks)

    def _done_writing(self, version: int, acks: list[Delivery]) -> None:
        emit(log, "checkpoint_written", "checkpoint of version %d written; %d deliveries acked", version,
             len(acks), level=logging.DEBUG, version=version, acked=len(acks))
        assert self.client is not None
        for delivery in acks:
            self.client.ack(delivery)

    def _guard(self) -> None:
        """Before the ledger is flushed and a checkpoint written: do we still own the run?

        The run directory's lock file must name our incarnation, and we must hold the
        namespace's lock token on the current channel (after a reconnect it must have come back
        to us). Otherwise stop at once, writing nothing (:class:`LockLost`): the aggregator
        that took over has every unacked update redelivered to it.
        """
        assert self.lock is not None and self.client is not None
        try:
            self.dirlock.check()
            self.lock.settle()
            if not self.lock.held:
                log.warning("reconnected: waiting up to %.0f s for the namespace lock to come back", LOCK_REGAIN_S)
                if not self.lock.regain(LOCK_REGAIN_S):
                    raise LockLost(f"lost the lock of namespace {self.topology.namespace!r} to another aggregator "
                                   f"while reconnecting; this one ({self.incarnation}) stops without writing")
                self.dirlock.check()
            self.lock.refresh()
        except LockLost:
            self._fenced = True
            raise

    def _raise_refused_publishes(self) -> None:
        """A model or task the broker refused for good (e.g. over its message size) ends the run now.

        Its confirm is otherwise only waited for at the next checkpoint, which a sync round whose
        model never reached the workers would not get to. A publish confirmed already is let go
        here: a model's encoded bytes (a model's size) are not held until the checkpoint.
        """
        kept: list[PendingPublish] = []
        for pub in self._unconfirmed:
            if not pub.done:
                kept.append(pub)
                continue
            try:
                pub.wait(0)  # raises the publish's own error, if it has one
            except MessageTooLarge as exc:
                raise self._too_large(exc) from None
            except BrokerError as exc:
                if not exc.retryable:
                    raise
                kept.append(pub)  # the checkpoint waits for it again
        self._unconfirmed = kept

    def _confirm_publishes(self) -> None:
        """Wait for every outstanding model and task publish (before acking anything)."""
        pending, self._unconfirmed = self._unconfirmed, []
        for pub in pending:
            try:
                pub.wait()
            except MessageTooLarge as exc:
                raise self._too_large(exc) from None

    def _too_large(self, exc: MessageTooLarge) -> MessageTooLarge:
        """The broker's refusal of a model or task, with the option that decides message sizes."""
        return MessageTooLarge(f"{exc}; or lower --chunk-bytes (now {self.cfg.chunk_bytes}): models larger than it "
                               "travel as chunks of that size", reply_code=exc.reply_code)

    def final(self) -> dict[str, Any]:
        """The run's final figures (also history.json's ``final``)."""
        return self._core.summary(time.monotonic())

    def _write_history(self, *, full: bool = False) -> None:
        """history.json: at a checkpoint with the newest versions only (a bounded cost), when the
        aggregator leaves with all of them (:mod:`fedmq.aggregator.history`)."""
        core = self._core
        final = {**self.final(), "finished": core.done and not core.interrupted}
        doc = {"config": self.cfg.to_json(), "spec": self.spec, "namespace": self.topology.namespace,
               "run_id": core.run_id, "history": self.history.entries(full=full), "history_complete": full,
               "evaluations": core.state.evaluations, "history_log": HISTORY_LOG,
               "final": final, "takeovers": self._takeovers,
               "counts": dict(core.state.counts), "workers": core.workers_report(), "failure": core.failure}
        durable.atomic_write_json(self.out / "history.json", doc)


#: how long a stop broadcast waits for its confirm (it is repeated while workers are live)
STOP_CONFIRM_S = 10.0


class _Ahead:
    """``make()`` run on a thread of its own now; :meth:`result` waits for it and returns what it
    returned or raises what it raised (on the caller's thread, as if called there). ``then(self)``
    is called on that thread once ``make()`` returned or raised."""

    def __init__(self, make: Callable[[], Any], *, name: str = "fedmq-ahead",
                 then: Callable[[_Ahead], None] | None = None) -> None:
        self._out: Any = None
        self._error: BaseException | None = None
        self._then = then
        self._thread = threading.Thread(target=self._run, args=(make,), name=name, daemon=True)
        self._thread.start()

    def _run(self, make: Callable[[], Any]) -> None:
        try:
            self._out = make()
        except BaseException as exc:  # noqa: BLE001 (handed to the caller by result())
            self._error = exc
        if self._then is not None:
            self._then(self)

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> None:
        """Wait for ``make()`` to return or raise, whatever it did."""
        self._thread.join()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._out


@dataclasses.dataclass
class _Writing:
    """A checkpoint of ``version`` being written (``job``), and the deliveries it makes durable."""

    version: int
    acks: list[Delivery]
    job: _Ahead


def _ack_handle(delivery: Delivery) -> Delivery:
    """The delivery without its body: all an ack needs, so bodies are freed once applied."""
    return dataclasses.replace(delivery, body=b"")


def _stream_timestamp(epoch_s: float) -> Any:
    return dt.datetime.fromtimestamp(epoch_s, tz=dt.timezone.utc).replace(tzinfo=None)
