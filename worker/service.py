"""A fedmq worker: pulls tasks, fetches the model each needs, trains on its shard, publishes updates.

This module is the plumbing around :mod:`fedmq.worker.task` (which turns a model, a task and
the shard into an update, a skip or a failure): the trust check and decoding of tasks,
waiting for the model of the task's run, backoff after failures, publishing the update or the
failure report and settling the task with the broker. The protocol is docs/protocol.md.

Runs: streams outlive runs, so the worker keeps the newest model versions per run id (of the
last few runs, :class:`ModelBox`) and trains a task on the model of the task's run: the exact
version of a synchronous task, the newest it holds from the version an asynchronous task names
(the one current when it was issued). It does not follow the model stream: a task whose model
it does not hold attaches it at ``last``, reads until that model is complete and valid, and
detaches, so the versions it has no use for are never delivered to it (issue 15: bytes per
update flat in the number of workers). A sync worker that trains round after round reads on
instead: after its update it stays attached for the run's next version, until a second version
comes with no task for it (:meth:`Worker._read_on`). A model that has not arrived is waited for, up to
``model_wait_s`` (logged once), then the task goes back to the queue. A stop names its run: the worker leaves after the stop of the run it serves
(the run of its last task), or with ``serve`` forgets that run and waits for the next one; a
stop for another run is ignored. Nothing read from the model stream stops a worker: a message
that does not decode, whose spec the trainer cannot build, or whose version is absurdly far
ahead of its run's is logged and skipped.

Signatures (:mod:`fedmq.shared.signing`): with ``aggregator_key`` a model version, task or stop
the aggregator did not sign is skipped (models, stops; logged) or dead-lettered (tasks), like
one from an untrusted broker user (``trust_user``); with ``signing_key`` every update, failure
report and presence message carries this worker's signature headers.

Threads: the broker client's I/O thread only hands deliveries over (tasks into a queue, model
versions into a :class:`ModelBox`); the worker's own thread trains. A task is acked only after
its update (or its failure report) is confirmed by the broker, so a crash at any point leaves
the task to be redelivered, and a duplicate update (crash between confirm and ack) is
recognised by the aggregator from its task id.

Failures: a task the trainer cannot do (it raises, returns a result that does not fit the
model, or the task's model is unusable) is reported to the aggregator on the updates queue,
``Control(kind="failed", info={"task_id", "reason"})``, then acked: the aggregator decides
what happens next. A task whose update or report is not confirmed, or whose model does not
arrive in time, is rejected back to the queue. Either way the worker pauses (doubling
backoff) before taking the next task. A permanent broker error (an update over the maximum
message size, a permission the worker lacks, a client that gave up) stops the worker with that
error. A shard or trainer that does not fit a run's model (checked on the first task of each
run) makes the worker refuse: ``Control(kind="refused")`` on the presence stream, the task
back to the queue, and :class:`~fedmq.shared.errors.WorkerRefused` (exit code 2).

In synchronous mode a worker trains at most once per model version: it cancels its task
consumer before acking, reads the model stream on from where it stopped, and resumes (and
detaches the stream) when a newer version of that run, or a model of another run, appears.

Events (:mod:`fedmq.shared.events`): ``task_started``, ``update_confirmed``, ``task_failed``.
:meth:`Worker.at` is called at the points of the same names; it does nothing and is there to
be overridden (instrumentation, fault injection).
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedmq.broker.chunked import StreamFollower, send_payload
from fedmq.broker.client import Client, Delivery, PendingPublish
from fedmq.broker.settings import BrokerSettings
from fedmq.broker.topology import CONSUMER_TIMEOUT_ARG, RUN_HEADER, VERSION_HEADER, Topology
from fedmq.shared import events, memory, messages, signing
from fedmq.shared.chunking import DEFAULT_CHUNK_BYTES
from fedmq.shared.data import load_shard, scaling_warning
from fedmq.shared.errors import BrokerError, ConfigError, DecodeError, FedmqError, WorkerRefused
from fedmq.shared.trainer import DEFAULT_TRAINER, load_trainer_factory
from fedmq.worker.attack import DEFAULT_ATTACK_SCALE, make_attack
from fedmq.worker.hub import ControlHub
from fedmq.worker.pulse import CONFIRM_TIMEOUT_S as PRESENCE_CONFIRM_S
from fedmq.worker.pulse import Pulse
from fedmq.worker.task import Failed, TaskRunner, derive_seed

log = logging.getLogger("fedmq.worker")

MAX_TASK_BYTES = 64 * 1024
#: after a stop request, how much longer an update already published may take to be confirmed
STOP_CONFIRM_GRACE_S = 10.0
#: how long the broker keeps a worker's control queue (and the stop in it) while the worker is away
CONTROL_QUEUE_EXPIRES_S = 600.0
#: a model version further ahead than this of the newest known of its run is not believed
MAX_VERSION_JUMP = 1000
#: a model version larger than this is the only one of its run the worker keeps
LARGE_MODEL_BYTES = 64 * 1024 * 1024
#: what a worker holds besides its trainer, in model sizes: the model, its update, chunks in flight
WORKER_MEMORY_FACTOR = 3.0
#: bad model messages logged one by one; later ones are counted
BAD_MODEL_LOG_LIMIT = 20
#: model stream messages in flight to a worker: a chunked version streams, a detach wastes at most this many
MODEL_PREFETCH = 2
#: a fetch that read messages from ``last`` but found no model for its task after this long reads
#: from further back (messages after the run's version that are not its: forged, junk, another run's)
FETCH_STEP_S = 2.0
#: how many stream messages the first step back goes (then 4x more each time)
FETCH_BACK = 8

__all__ = ["MAX_TASK_BYTES", "MAX_VERSION_JUMP", "ModelBox", "Unusable", "Worker", "WorkerConfig",
           "default_worker_id", "derive_seed"]


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def run_name(run_id: str) -> str:
    """A run id for a log line ("(none)" for the empty one of messages that name no run)."""
    return run_id or "(none)"


@dataclass(frozen=True)
class WorkerConfig:
    data: str
    worker_id: str
    slowdown: float = 1.0
    trainer: str = DEFAULT_TRAINER
    heartbeat_s: float = 5.0
    model_wait_s: float = 60.0  # how long a task waits for the model of its run
    failure_backoff_s: float = 1.0
    declare: bool = True  # declare the namespace's topology on connect (needs configure rights)
    trust_user: str | None = None  # accept models, tasks and stops only from this broker user
    signing_key: str | None = None  # Ed25519 private key (PEM): sign updates, reports and presence
    aggregator_key: str | None = None  # Ed25519 public key (PEM): accept only models, tasks, stops it signed
    max_model_bytes: int = 2 * 1024**3  # the largest model accepted (one message, or put together from chunks)
    memory_budget: str = "auto"  # --memory-budget: refuse a run whose model this process cannot hold
    chunk_bytes: int = DEFAULT_CHUNK_BYTES  # updates larger than this travel as chunks
    consumer_timeout_s: float = 86400.0  # how long the broker lets a task stay unacked (RabbitMQ 3.12+)
    serve: bool = False  # after a run's stop, wait for the next run instead of exiting
    idle_log_s: float = 30.0  # while no task comes, say so this often
    attack: str | None = None  # --attack: poison this worker's updates (tests, benchmarks, research)
    attack_scale: float = DEFAULT_ATTACK_SCALE


@dataclass(frozen=True)
class Unusable:
    """A model version that arrived but cannot be trained on; ``reason`` says why."""

    reason: str


ModelCheck = Callable[[messages.ModelVersion], "str | None"]


class ModelBox:
    """The newest model versions of the last few runs read from the stream, kept as raw bytes.

    Per run id (``runs`` of them at most, the least recently seen dropped) the ``keep`` newest
    versions. A message is indexed by its headers (:data:`~fedmq.broker.topology.VERSION_HEADER`,
    :data:`~fedmq.broker.topology.RUN_HEADER`) or, without them, by decoding it, and decoded in
    full when a task needs it. One that does not decode, whose headers disagree with its body,
    that fails the caller's check, or whose version is more than ``max_jump`` ahead of the
    newest of its run is logged and skipped: nothing read from the stream raises. A version
    that was the first of its run read (a worker joining just after it was forged) is dropped as
    soon as a version more than ``max_jump`` below it follows: the run's own versions only grow.
    A task names the version current when it was issued; :meth:`expect` records it, and a
    version more than ``max_jump`` ahead of that is refused even when it is the first of its
    run read (so a forged far-ahead version is never trained on, whenever the worker joined).
    """

    def __init__(self, keep: int = 3, max_bytes: int = messages.DEFAULT_MAX_MESSAGE_BYTES,
                 trust_user: str | None = None, *, runs: int = 4, max_jump: int = MAX_VERSION_JUMP,
                 aggregator_key: Ed25519PublicKey | None = None) -> None:
        self.keep = keep
        self.max_bytes = max_bytes
        self.trust_user = trust_user
        self.aggregator_key = aggregator_key  # with it, only versions the aggregator signed are kept
        self.max_runs = runs
        self.max_jump = max_jump
        self.skipped = 0  # bad model messages so far
        self.last_run: str | None = None  # the run of the last model stored (the newest run seen)
        self._runs: collections.OrderedDict[str, dict[int, bytes | memoryview]] = collections.OrderedDict()
        self._expected: collections.OrderedDict[str, int] = collections.OrderedDict()  # run -> a task's version
        self._decoded: tuple[tuple[str, int], messages.ModelVersion] | None = None
        self._cond = threading.Condition()
        self._watch: tuple[str, int, Callable[[], None]] | None = None

    def latest(self, run: str) -> int | None:
        """The newest version of ``run`` known (not yet checked), or None."""
        with self._cond:
            stored = self._runs.get(run)
            return max(stored) if stored else None

    def expect(self, run: str, version: int) -> None:
        """A task of ``run`` names ``version``: versions more than ``max_jump`` ahead are not believed."""
        with self._cond:
            self._expected[run] = max(version, self._expected.get(run, version))
            self._expected.move_to_end(run)
            while len(self._expected) > self.max_runs:
                self._expected.popitem(last=False)

    def has(self, run: str, lo: int, hi: int | None = None) -> bool:
        """Whether a version of ``run`` in ``[lo, hi]`` is stored (not yet checked)."""
        with self._cond:
            return any(lo <= v and (hi is None or v <= hi) for v in self._runs.get(run, ()))

    def known(self) -> dict[str, int]:
        """Run id -> newest version known, least recently seen run first."""
        with self._cond:
            return {run: max(stored) for run, stored in self._runs.items() if stored}

    def _skip(self, what: str) -> None:
        self.skipped += 1
        if self.skipped < BAD_MODEL_LOG_LIMIT:
            log.warning("skipping a model message: %s", what)
        elif self.skipped == BAD_MODEL_LOG_LIMIT:
            log.warning("skipping a model message: %s (further bad model messages are counted, not logged)", what)
        elif self.skipped % 100 == 0:
            log.warning("%d bad model messages skipped so far; the latest: %s", self.skipped, what)

    def offer(self, delivery: Delivery) -> None:
        """I/O thread: remember a version read from the stream (or skip it, logged)."""
        if self.trust_user is not None and delivery.user_id != self.trust_user:
            log.warning("ignoring a model version not published by %r (user_id %r)", self.trust_user, delivery.user_id)
            return
        version, run = delivery.headers.get(VERSION_HEADER), delivery.headers.get(RUN_HEADER)
        if isinstance(run, bytes):
            run = run.decode("utf-8", "replace")
        if type(version) is not int or version < 0 or not isinstance(run, str):
            try:
                msg = messages.decode(delivery.body, expect=messages.ModelVersion, max_bytes=self.max_bytes)
            except DecodeError as exc:
                self._skip(f"it does not decode: {exc}")
                return
            assert isinstance(msg, messages.ModelVersion)
            version, run = msg.version, msg.run_id
        if self.aggregator_key is not None:
            claims = signing.Claims("model", run, signing.AGGREGATOR_ID, "", version)
            # a chunked version's SHA-256 was computed from its bytes as it was put together
            reason = signing.verify(delivery.headers, delivery.body, claims, lambda _signer: self.aggregator_key,
                                    digest=delivery.sha256 or None)
            if reason is not None:
                self._skip(f"version {version} of run {run_name(run)}: {reason}")
                return
        fire = None
        forged: list[int] = []
        with self._cond:
            stored = self._runs.get(run)
            newest = max(stored) if stored else None
            expected = self._expected.get(run)
            if expected is not None:
                newest = expected if newest is None else max(newest, expected)
            if newest is None or version <= newest + self.max_jump:
                stored = self._runs.setdefault(run, {})
                self._runs.move_to_end(run)
                stored[version] = delivery.body  # a version published again replaces the first
                # a version far ahead of one that came after it was never the run's: a worker that
                # joined just after a forged one read it first, and the run has moved on since
                forged = [v for v in stored if v > version + self.max_jump]
                for v in forged:
                    del stored[v]
                if self._decoded is not None and self._decoded[0][0] == run and (
                        self._decoded[0][1] == version or self._decoded[0][1] in forged):
                    self._decoded = None
                # large models: only the newest is kept (memory bounded by the model, not by versions)
                keep = self.keep if len(delivery.body) <= LARGE_MODEL_BYTES else 1
                for old in sorted(stored)[:-keep]:
                    del stored[old]
                while len(self._runs) > self.max_runs:
                    self._runs.popitem(last=False)
                self.last_run = run
                if self._watch is not None and (self._watch[0] != run or version > self._watch[1]):
                    fire, self._watch = self._watch[2], None
                self._cond.notify_all()
        if newest is not None and version > newest + self.max_jump:
            self._skip(f"version {version} of run {run_name(run)} is more than {self.max_jump} versions ahead "
                       f"of the newest of that run ({newest}, known from its versions or its tasks)")
            return
        for v in forged:
            self._skip(f"version {v} of run {run_name(run)} is more than {self.max_jump} versions ahead of "
                       f"version {version}, which came after it")
        if fire is not None:
            fire()

    def forget(self, run: str) -> None:
        """Drop every version of ``run`` (a run that stopped)."""
        with self._cond:
            self._runs.pop(run, None)
            self._expected.pop(run, None)
            if self._decoded is not None and self._decoded[0][0] == run:
                self._decoded = None

    def when_newer_than(self, run: str, version: int, fn: Callable[[], None]) -> None:
        """Call ``fn`` once a version of ``run`` newer than ``version``, or a model of another run,
        is read (at once if it was)."""
        with self._cond:
            stored = self._runs.get(run)
            if (stored and max(stored) > version) or (self.last_run is not None and self.last_run != run):
                newer = True
            else:
                newer, self._watch = False, (run, version, fn)
        if newer:
            fn()

    def _validate(self, run: str, version: int, body: bytes | memoryview, check: ModelCheck | None) -> messages.ModelVersion | str:
        """The decoded model, or why it cannot be used."""
        try:
            msg = messages.decode(body, expect=messages.ModelVersion, max_bytes=self.max_bytes)
        except DecodeError as exc:
            return f"it does not decode: {exc}"
        assert isinstance(msg, messages.ModelVersion)
        if (msg.version, msg.run_id) != (version, run):
            return (f"its headers say version {version} of run {run_name(run)}, its body version {msg.version} "
                    f"of run {run_name(msg.run_id)}")
        problem = check(msg) if check is not None else None
        return msg if problem is None else problem

    def _usable(self, run: str, version: int, body: bytes | memoryview, check: ModelCheck | None) -> messages.ModelVersion | str:
        """Decode and check (once: the last good one is cached); a bad version is dropped, logged."""
        with self._cond:
            cached = self._decoded
        if cached is not None and cached[0] == (run, version):
            return cached[1]
        out = self._validate(run, version, body, check)
        with self._cond:
            stored = self._runs.get(run)
            if isinstance(out, messages.ModelVersion):
                if stored is not None and stored.get(version) is body:
                    self._decoded = ((run, version), out)
                return out
            if stored is not None and stored.get(version) is body:
                del stored[version]
        reason = f"version {version} of run {run_name(run)}: {out}"
        self._skip(reason)
        return reason

    def newer_usable(self, run: str, version: int, check: ModelCheck | None = None) -> int | None:
        """The newest usable version of ``run`` newer than ``version``, or None."""
        while True:
            with self._cond:
                stored = self._runs.get(run, {})
                newer = max((v for v in stored if v > version), default=None)
                if newer is None:
                    return None
                body = stored[newer]
            if isinstance(self._usable(run, newer, body, check), messages.ModelVersion):
                return newer

    def get(self, run: str, version: int | None, timeout: float, stop: threading.Event, *,
            check: ModelCheck | None = None, minimum: int | None = None,
            on_wait: Callable[[], None] | None = None,
            on_unusable: Callable[[], None] | None = None) -> messages.ModelVersion | Unusable | None:
        """Version ``version`` of ``run`` (``None``: the newest usable one, and with ``minimum`` one
        of ``minimum`` to ``minimum + max_jump``), waiting up to ``timeout`` seconds; ``on_wait``
        is called once if it has to wait.

        ``on_unusable`` is called (on this thread) each time the newest held turns out unusable
        and is dropped. Returns the model; :class:`Unusable` if the version asked for (or, for the newest, the
        last one tried before the deadline) cannot be used; None if none came (or the version
        is not held and a newer one is: it is gone, or was published before the reader attached),
        or ``stop`` was set.
        """
        deadline = time.monotonic() + timeout
        waiting = False
        unusable: str | None = None
        while True:
            with self._cond:
                while True:
                    stored = self._runs.get(run, {})
                    if version is not None:
                        want: int | None = version
                    else:
                        lo = minimum if minimum is not None else -1
                        hi = minimum + self.max_jump if minimum is not None else None
                        want = max((v for v in stored if v >= lo and (hi is None or v <= hi)), default=None)
                    if want is not None and want in stored:
                        body = stored[want]
                        break
                    if version is not None and stored and max(stored) > version:
                        return None  # gone, or passed by: the stream holds versions in order
                    left = deadline - time.monotonic()
                    if left <= 0 or stop.is_set():
                        return Unusable(unusable) if unusable is not None else None
                    if not waiting:
                        waiting = True
                        if on_wait is not None:
                            on_wait()
                    self._cond.wait(min(left, 0.5))
            out = self._usable(run, want, body, check)
            if isinstance(out, messages.ModelVersion):
                return out
            if version is not None:
                return Unusable(out)
            unusable = out  # the newest is bad: try the one before it, or wait for another
            if on_unusable is not None:
                on_unusable()


class Worker:
    """One federated worker. :meth:`run` blocks until stopped; several may share a process."""

    def __init__(
        self,
        config: WorkerConfig,
        settings: BrokerSettings,
        topology: Topology,
        stop: threading.Event | None = None,
        pulse: Pulse | None = None,
        hub: ControlHub | None = None,
    ) -> None:
        self.config = config
        self._pulse = pulse  # the heartbeat thread shared by a pool's workers; None: one of its own
        self._hub = hub  # the control queue shared by a pool's workers; None: one of its own
        self.settings = settings
        self.topology = topology
        self.stop = stop or threading.Event()
        self._signing_key = signing.load_private_key(config.signing_key) if config.signing_key else None
        self._aggregator_key = signing.load_public_key(config.aggregator_key) if config.aggregator_key else None
        self._bad_stops = 0  # stop messages that did not verify (logged up to BAD_MODEL_LOG_LIMIT)
        self.models = ModelBox(max_bytes=config.max_model_bytes, trust_user=config.trust_user,
                               aggregator_key=self._aggregator_key)
        self.inbox: queue.Queue[Delivery | None] = queue.Queue()
        self.tasks_done = 0
        self.client: Client | None = None
        self.follower: StreamFollower | None = None  # the model stream's reader; counts what it read
        self.runner: TaskRunner | None = None
        self.serving: str | None = None  # the run of the last task taken; None before one, and after its stop
        self._joined: set[str] = set()  # runs whose model this worker checked it fits (bounded)
        self._fits: set[str] = set()  # runs whose model's size this worker checked it can hold (bounded)
        self._failures = 0
        self._fatal: FedmqError | None = None  # why the worker stopped on its own
        self._leaving = False  # the task consumer is cancelled: the worker stops (see _stop_taking_tasks)
        self._started: tuple[str, int] | None = None  # (run, model version) of the last task it started training

    # ------------------------------------------------------------------ hook
    def at(self, point: str, task_id: str) -> None:
        """Called when handling task ``task_id`` reaches ``point``; does nothing here.

        Points: ``"task_started"`` (the task is decoded and its model is at hand, training is
        next), ``"half_published"`` (a chunked update: about half of its chunks are confirmed, and at least one of the rest is not sent yet when it has 3 or more) and
        ``"update_confirmed"`` (the broker confirmed the update; the ack is next).
        Subclasses may override it to observe or instrument a worker.
        """

    # ------------------------------------------------------------------ I/O-thread handlers
    def _on_task(self, delivery: Delivery) -> None:
        self.inbox.put(delivery)

    def _on_control(self, delivery: Delivery) -> None:
        cfg = self.config
        try:
            msg = messages.decode(delivery.body, expect=messages.Control, max_bytes=MAX_TASK_BYTES)
        except DecodeError as exc:
            log.warning("ignoring a bad control message: %s", exc)
            return
        assert isinstance(msg, messages.Control)
        if cfg.trust_user is not None and delivery.user_id != cfg.trust_user:
            log.warning("ignoring a %s message not sent by %r", msg.kind, cfg.trust_user)
            return
        if msg.kind != "stop":
            return
        unverified = self._unverified(delivery, msg)
        if unverified is not None:
            self._bad_stops += 1
            if self._bad_stops <= BAD_MODEL_LOG_LIMIT:
                log.warning("worker %s: ignoring a stop message of run %s: %s", cfg.worker_id, run_name(msg.run_id),
                            unverified)
            return
        # the run this worker serves: its last task's, or before any task the newest run read
        serving = self.serving if self.serving is not None else self.models.last_run
        if msg.run_id and serving is not None and msg.run_id != serving:
            log.info("worker %s: ignoring the stop of run %s; this worker serves run %s", cfg.worker_id,
                     run_name(msg.run_id), run_name(serving))
            return
        if not cfg.serve:
            log.info("worker %s: stop of run %s requested by the aggregator", cfg.worker_id,
                     run_name(msg.run_id or serving or ""))
            self.request_stop()
            return
        if msg.run_id:
            self.models.forget(msg.run_id)
        self.serving = None
        log.info("worker %s: run %s stopped; waiting for the next run on namespace %s", cfg.worker_id,
                 run_name(msg.run_id), self.topology.namespace)
        if self.follower is not None:
            self.follower.detach()  # a sync worker watching for a newer version: no more
        if self.client is not None:
            self._take_tasks()  # a sync worker waiting for a newer version

    def _unverified(self, delivery: Delivery, msg: messages.Task | messages.Control) -> str | None:
        """With --aggregator-key: why ``msg`` (a task or a stop) is not the aggregator's, or None."""
        key = self._aggregator_key
        if key is None:
            return None
        claims = signing.claims_of(msg, signer=signing.AGGREGATOR_ID)
        return signing.verify(delivery.headers, delivery.body, claims, lambda _signer: key)

    def _signed(self, msg: messages.Message, body: signing.Body, digest: bytes | None = None) -> dict[str, str]:
        """The signature headers of what this worker publishes (--signing-key), or none."""
        key = self._signing_key
        return {} if key is None else signing.sign_headers(key, signing.claims_of(msg), body, digest=digest)

    def _on_client_failure(self, error: BrokerError) -> None:
        """The broker client gave up (a permanent error while reconnecting): stop with it."""
        self._stop_with(error)

    def request_stop(self) -> None:
        self.stop.set()
        self.inbox.put(None)

    def _stop_with(self, error: FedmqError) -> None:
        if self._fatal is None:
            self._fatal = error
        self.request_stop()

    # ------------------------------------------------------------------ main
    def run(self) -> int:
        """Work until stopped; 0 when stopped on request, raises the error that stopped it otherwise
        (:class:`~fedmq.shared.errors.WorkerRefused` when its shard or trainer does not fit a run)."""
        cfg = self.config
        memory.keep_large_buffers()  # each task reuses the memory of the last (see there)
        X, y = load_shard(cfg.data)
        unscaled = scaling_warning(X, f"worker {cfg.worker_id}: shard {cfg.data}")
        if unscaled:
            log.warning("%s", unscaled)
        attack = make_attack(cfg.attack, cfg.attack_scale)
        if attack is not None:
            log.warning("worker %s attacks: --attack %s --attack-scale %g", cfg.worker_id, attack.kind, attack.scale)
        self.runner = TaskRunner(load_trainer_factory(cfg.trainer), X, y, cfg.worker_id, trainer_ref=cfg.trainer,
                                 attack=attack)
        client = Client(self.settings, self.topology, name=f"fedmq-worker-{cfg.worker_id}", declare=cfg.declare)
        client.on_failure = self._on_client_failure
        self.client = client
        control_queue = f"{self.topology.control}.{cfg.worker_id}.{uuid.uuid4().hex[:8]}"
        # whole model versions only: chunked ones put together, a late joiner re-reads from the first chunk;
        # read on demand (a task's model not at hand), not as versions are published
        follower = StreamFollower(client, self.topology.models, self.models.offer, max_payload_bytes=cfg.max_model_bytes,
                                  attached=False)
        self.follower = follower
        client.subscribe(
            self.topology.models,
            follower.on_delivery,
            prefetch=MODEL_PREFETCH,
            arguments=follower.arguments,  # "last", or the first chunk of the version it landed in
            settle_on_return=True,
            paused=True,  # attached by a task that needs a model this worker does not hold
            own_channel=True,  # detached by closing it: a cancel would reject what is in flight
        )
        # a task stays unacked while it trains: longer than the broker's default consumer timeout (30 min)
        client.subscribe(self.topology.tasks, self._on_task, prefetch=1,
                         arguments={CONSUMER_TIMEOUT_ARG: int(cfg.consumer_timeout_s * 1000)})
        if self._hub is None:  # a control queue of its own (in a pool: the process's, see ControlHub)
            client.subscribe(
                control_queue,
                self._on_control,
                prefetch=10,
                exclusive=True,
                settle_on_return=True,
                bind_exchange=self.topology.control,
                expires_s=CONTROL_QUEUE_EXPIRES_S,  # a stop sent while we reconnect is not lost
            )
        client.start()
        if self._hub is not None:
            self._hub.add(self, self._on_control)
        log.info("worker %s: %d samples from %s; connected to %s, namespace %s; waiting for a model and a task%s",
                 cfg.worker_id, len(y), cfg.data, self.settings.masked_url, self.topology.namespace,
                 " (serving run after run until stopped)" if cfg.serve else "")
        pulse = self._pulse or Pulse(cfg.heartbeat_s)
        self._presence("hello", samples=int(len(y)))
        pulse.add(self)
        try:
            while not self.stop.is_set():
                try:
                    delivery = self.inbox.get(timeout=cfg.idle_log_s)
                except queue.Empty:
                    self._still_waiting()
                    continue
                if delivery is None or self.stop.is_set():
                    self._stop_taking_tasks()
                    if delivery is not None:
                        client.reject(delivery, requeue=True)
                    break
                self._handle(delivery)
        finally:
            if self._hub is not None:
                self._hub.remove(self)
            pulse.remove(self)
            if pulse is not self._pulse:
                pulse.stop()
            self._stop_taking_tasks()
            self._return_unstarted()
            self._presence("bye", tasks_done=self.tasks_done)
            client.close()
        if isinstance(self._fatal, WorkerRefused):
            raise self._fatal  # logged when it refused
        if self._fatal is not None:
            log.error("worker %s: stopped after %d tasks: %s", cfg.worker_id, self.tasks_done, self._fatal)
            raise self._fatal
        log.info("worker %s: stopped after %d tasks", cfg.worker_id, self.tasks_done)
        return 0

    def _still_waiting(self) -> None:
        known = self.models.known()
        models = ", ".join(f"run {run_name(r)} version {v}" for r, v in known.items()) or "none yet"
        log.info("worker %s: still waiting for a task on namespace %s (models read: %s)", self.config.worker_id,
                 self.topology.namespace, models)

    def _stop_taking_tasks(self) -> None:
        """Cancel the task consumer of a worker that stops, before it hands tasks back.

        Otherwise the broker gives a task handed back straight back to it while its connection
        is still open, and every return counts towards the task queue's delivery limit
        (``x-delivery-limit`` 3): a task bounced a few times is dead-lettered, never trained.
        The cancel is queued on the client before the rejects, so the broker sees it first."""
        assert self.client is not None
        if not self._leaving:
            self._leaving = True
            self.client.pause(self.topology.tasks)

    def _take_tasks(self) -> None:
        """Take tasks again after a pause, unless the worker is leaving."""
        assert self.client is not None
        if not self._leaving:
            self.client.resume(self.topology.tasks)

    def _return_unstarted(self) -> None:
        assert self.client is not None
        while True:
            try:
                delivery = self.inbox.get_nowait()
            except queue.Empty:
                return
            if delivery is not None:
                self.client.reject(delivery, requeue=True)

    @property
    def name(self) -> str:
        return self.config.worker_id

    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.connected

    def heartbeat_nowait(self, also: Sequence[str] = ()) -> PendingPublish | None:
        """Publish a heartbeat without waiting for its confirm (for the :class:`Pulse`), for this
        worker and the workers ``also`` names (its pool process's); None if it could not be sent
        (logged)."""
        if also:
            return self._presence_nowait("heartbeat", tasks_done=self.tasks_done, workers=list(also))
        return self._presence_nowait("heartbeat", tasks_done=self.tasks_done)

    def _presence_message(self, kind: str, run_id: str, info: dict[str, object]) -> tuple[bytes, dict[str, str] | None]:
        """The body of a presence message of ours, and its signature headers (None unsigned)."""
        msg = messages.Control(kind=kind, worker_id=self.config.worker_id, sent_s=time.time(), info=info,
                               run_id=run_id)
        body = messages.encode(msg)
        return body, self._signed(msg, body) or None

    def _presence_nowait(self, kind: str, run_id: str = "", **info: object) -> PendingPublish | None:
        assert self.client is not None
        body, headers = self._presence_message(kind, run_id, info)
        try:
            return self.client.publish_nowait(self.topology.presence, body, headers=headers)
        except BrokerError as exc:
            log.info("worker %s: could not publish %s: %s", self.config.worker_id, kind, exc)
            return None

    def _presence(self, kind: str, run_id: str = "", **info: object) -> bool:
        """Publish a presence message and wait for its confirm; False (logged) if it failed."""
        assert self.client is not None
        body, headers = self._presence_message(kind, run_id, info)
        try:
            self.client.publish(self.topology.presence, body, timeout=PRESENCE_CONFIRM_S, headers=headers)
        except BrokerError as exc:
            log.info("worker %s: could not publish %s: %s", self.config.worker_id, kind, exc)
            return False
        return True

    # ------------------------------------------------------------------ one task
    def _handle(self, delivery: Delivery) -> None:
        cfg, client, runner = self.config, self.client, self.runner
        assert client is not None and runner is not None
        if cfg.trust_user is not None and delivery.user_id != cfg.trust_user:
            self._dead_letter(delivery, delivery.message_id or "?",
                              f"not published by {cfg.trust_user!r} (user_id {delivery.user_id!r})")
            return
        try:
            task = messages.decode(delivery.body, expect=messages.Task, max_bytes=MAX_TASK_BYTES)
        except DecodeError as exc:
            self._dead_letter(delivery, delivery.message_id or "?", f"undecodable: {exc}")
            return
        assert isinstance(task, messages.Task)
        unverified = self._unverified(delivery, task)
        if unverified is not None:
            self._dead_letter(delivery, task.task_id, unverified)
            return
        run, sync = task.run_id, task.mode == "sync"
        too_big = self._too_big(task)
        if too_big is not None:
            self._refuse(run, too_big, delivery)
            return
        self.serving = run
        if task.version is not None:
            self.models.expect(run, task.version)  # a version far ahead of the task's is not believed

        def check(m: messages.ModelVersion) -> str | None:
            # a model this worker does not fit is refused below (_joins), not skipped as a bad one
            return None if runner.misfit(m.spec) is not None else runner.spec_problem(m.spec)

        if self._stale(task, check, delivery):
            return
        model = self._model_for(task, check)
        if model is None and sync and not self.stop.is_set() and self._stale(task, check, delivery):
            return  # the fetch found the round over
        if model is None:
            if self.stop.is_set():
                client.reject(delivery, requeue=True)
            else:
                what = f"model version {task.version} of run {run_name(run)} did not arrive" if sync \
                    else f"no model of run {run_name(run)}" + (
                        f" from version {task.version} to {task.version + self.models.max_jump}"
                        if task.version is not None else "") + " arrived"
                self._give_back(delivery, task.task_id, f"{what} within {cfg.model_wait_s:.0f} s")
            return
        if isinstance(model, Unusable):
            self._report_failure(delivery, task, f"the model cannot be used: {model.reason}")
            return
        if not self._joins(run, model, delivery):
            return
        started = time.monotonic()
        events.emit(log, "task_started", "worker %s: task %s started on version %d of run %s", cfg.worker_id,
                    task.task_id, model.version, run_name(run), task_id=task.task_id, worker_id=cfg.worker_id,
                    version=model.version, task_version=task.version)
        self.at("task_started", task.task_id)
        self._started = (run, model.version)
        outcome = runner.run(task, model)
        if isinstance(outcome, Failed):
            self._report_failure(delivery, task, outcome.reason)
            return
        if cfg.slowdown > 1 and self.stop.wait((cfg.slowdown - 1) * outcome.compute_s):
            log.info("worker %s: stopping; returning task %s", cfg.worker_id, task.task_id)
            client.reject(delivery, requeue=True)
            return
        update = replace(outcome.update, duration_s=time.monotonic() - started)
        if sync:
            client.pause(self.topology.tasks)  # before the ack: no second task for this version
        message_id = uuid.uuid4().hex
        try:
            self._publish(update, task, message_id)
        except FedmqError as exc:
            self._give_back(delivery, task.task_id, f"update not confirmed: {exc}", fatal=self._permanent(exc))
            return
        self._failures = 0
        runner.confirmed(outcome)
        events.emit(
            log, "update_confirmed", "worker %s: task %s on version %d done in %.2fs (loss %.4f); update confirmed",
            cfg.worker_id, task.task_id, model.version, time.monotonic() - started, update.train_loss,
            task_id=update.task_id, ticket=task.task_id, worker_id=cfg.worker_id, message_id=message_id,
        )
        self.at("update_confirmed", task.task_id)
        client.ack(delivery)
        self.tasks_done += 1
        if sync:
            self._read_on(run, model.version)

    def _read_on(self, run: str, version: int) -> None:
        """After a sync update of ``version``: read the model stream on for the run's next version, the
        next thing published, and take tasks again once it is held.

        The worker stays attached from round to round while it trains each round: attaching anew
        costs the broker a channel and a stream reader (about 9 ms of its CPU for a 4 MB version on
        this machine's RabbitMQ 3.10, against 3 ms read by a consumer that stays). It detaches once
        a second version arrives with no task started since ``version`` (a worker left out of a
        round), so an idle worker reads at most two versions it has no task for."""
        follower = self.follower
        assert follower is not None
        if not follower.attached:
            follower.attach(fresh=False)  # from where the last read stopped

        def idle() -> None:
            started = self._started
            if follower.fetching:  # a task came before its version and waits for it: the fetch detaches when done
                return
            if started is None or started[0] != run or started[1] <= version:
                follower.detach()

        def newer() -> None:
            self._take_tasks()
            # replaced when this worker's next sync update registers its own watch
            self.models.when_newer_than(run, version + 1, idle)

        self.models.when_newer_than(run, version, newer)

    def _stale(self, task: messages.Task, check: ModelCheck, delivery: Delivery) -> bool:
        """A synchronous task whose round is over (a newer usable version is held): ack it, True."""
        assert self.client is not None and self.runner is not None
        latest = self.models.latest(task.run_id)
        if task.mode == "sync" and task.version is not None and latest is not None and latest > task.version:
            latest = self.models.newer_usable(task.run_id, task.version, check)  # not fooled by a bad newer message
        skip = self.runner.skip_reason(task, latest)
        if skip is None:
            return False
        log.info("worker %s: %s: skipped", self.config.worker_id, skip)
        self.client.ack(delivery)
        return True

    def _model_for(self, task: messages.Task, check: ModelCheck) -> messages.ModelVersion | Unusable | None:
        """The model ``task`` trains from: held already, or fetched from the stream.

        A sync task needs its exact version, an async one a version from the one it names up to
        ``max_jump`` ahead (the newest of those held; a task of an aggregator that names none: the
        newest). If none is held, the worker attaches to the model stream at ``last`` (rewound to
        a chunked version's first chunk), reads until the version is complete and valid, and
        detaches: the versions published meanwhile are never delivered to it. Waits up to
        ``model_wait_s``; None if nothing came (or stop).
        """
        cfg, follower = self.config, self.follower
        assert follower is not None
        run, sync, v = task.run_id, task.mode == "sync", task.version
        exact = v if sync else None
        minimum = None if sync else v

        def get(timeout: float, on_wait: Callable[[], None] | None = None,
                on_unusable: Callable[[], None] | None = None) -> messages.ModelVersion | Unusable | None:
            return self.models.get(run, exact, timeout, self.stop, check=check, minimum=minimum, on_wait=on_wait,
                                   on_unusable=on_unusable)

        if v is not None and self.models.has(run, v, v if sync else v + self.models.max_jump):
            held = get(0.0)
            if isinstance(held, messages.ModelVersion):
                return held  # no fetch

        def waiting() -> None:
            what = f"model version {v}" if sync else ("a model" if v is None else f"a model from version {v}")
            log.info("worker %s: task %s waits for %s of run %s (up to %.0f s)", cfg.worker_id, task.task_id, what,
                     run_name(run), cfg.model_wait_s)

        deadline = time.monotonic() + cfg.model_wait_s
        back = FETCH_BACK
        on_wait: Callable[[], None] | None = waiting
        lo, hi = v or 0, (v if sync else None if v is None else v + self.models.max_jump)

        def fetched() -> bool:
            """Asked on the I/O thread after each version read: stop reading, a version for this
            task is at hand? (Not decoded there: a trainer is built to check a model, user code
            that runs on the task thread only.)"""
            return self.models.has(run, lo, hi)

        def read_on() -> None:  # the version it stopped at is unusable (dropped): read on from there
            if follower.satisfied:
                follower.attach(fresh=False, until=fetched)

        follower.attach(fresh=True, until=fetched)
        try:
            while True:
                out = get(max(0.0, min(FETCH_STEP_S, deadline - time.monotonic())), on_wait, read_on)
                on_wait = None
                done = isinstance(out, messages.ModelVersion) or (sync and out is not None)
                if done or self.stop.is_set() or time.monotonic() >= deadline:
                    return out
                start = follower.first_offset
                if start is None or start == 0:
                    continue  # nothing read yet, or read from the stream's start: wait on
                # what follows the run's version is not a model for this task: read from further back
                log.info("worker %s: task %s: no model for it from the stream's last messages; reading from "
                         "offset %d", cfg.worker_id, task.task_id, max(0, start - back))
                follower.detach()
                follower.attach(offset=max(0, start - back))
                back *= 4
        finally:
            follower.detach()

    def _joins(self, run: str, model: messages.ModelVersion, delivery: Delivery) -> bool:
        """On the first task of a run: whether this shard and trainer fit its model; if not, refuse.

        Refusing publishes ``Control(kind="refused")`` on the presence stream, returns the task
        to the queue (another worker may fit) and stops the worker with :class:`WorkerRefused`.
        """
        runner = self.runner
        assert runner is not None
        key = f"{run}\0{sorted(model.spec.items())!r}"
        if key in self._joined:
            return True
        reason = runner.misfit(model.spec)
        if reason is None:
            if len(self._joined) >= 16:
                self._joined.clear()
            self._joined.add(key)
            return True
        self._refuse(run, reason, delivery)
        return False

    def _too_big(self, task: messages.Task) -> str | None:
        """Why this worker cannot hold the model ``task`` names the size of (checked before any of it
        is read: --max-model-bytes, then --memory-budget), or None."""
        cfg, size = self.config, task.model_bytes
        if not size or task.run_id in self._fits:
            return None
        if size > cfg.max_model_bytes:
            return (f"the model ({memory.describe(size)}) is over --max-model-bytes "
                    f"({memory.describe(cfg.max_model_bytes)})")
        try:
            memory.check_fits(size, WORKER_MEMORY_FACTOR, cfg.memory_budget, who="worker",
                              why="the model, its update and the chunks in flight, beyond the trainer's own needs")
        except ConfigError as exc:
            return str(exc)
        if len(self._fits) >= 16:
            self._fits.clear()
        self._fits.add(task.run_id)
        return None

    def _refuse(self, run: str, reason: str, delivery: Delivery) -> None:
        """Refuse ``run`` for good: say why (one log line, and ``Control(kind="refused")`` on the
        presence stream), return the task to the queue (another worker may do it) and stop the
        worker with :class:`WorkerRefused`."""
        assert self.client is not None
        text = f"worker {self.config.worker_id} refuses run {run_name(run)}: {reason}"
        log.error("%s", text)
        self._presence("refused", run_id=run, reason=reason)
        self._stop_taking_tasks()
        self.client.reject(delivery, requeue=True)
        self._stop_with(WorkerRefused(text))

    @staticmethod
    def _permanent(exc: FedmqError) -> FedmqError | None:
        """``exc`` if no retry can help (the worker stops with it), else None."""
        return None if isinstance(exc, BrokerError) and exc.retryable else exc

    def _publish(self, msg: messages.Update | messages.Control, task: messages.Task, message_id: str) -> None:
        """Publish an update (or failure report) for ``task`` to the updates queue, signed with
        --signing-key, and wait for its confirm; a stop request leaves it a short grace."""
        client = self.client
        assert client is not None
        # pieces, not one buffer: a chunked update is cut from views of the trained arrays
        body = messages.encode_pieces(msg)

        def confirmed(index: int, count: int) -> None:
            # about half-way, and at least one chunk not handed to the broker yet (window 2)
            if count > 1 and index == max(0, count // 2 - 1):
                self.at("half_published", task.task_id)

        # one SHA-256 of the body where both need it: the signature and the chunks' digest header
        digest = signing.body_digest(body) if self._signing_key is not None else None
        # over --chunk-bytes: chunks, views of ``body``, at most two unconfirmed at a time; user_id:
        # RabbitMQ vouches for our broker user (aggregator --require-user-id)
        send_payload(client, self.topology.updates, body, chunk_bytes=self.config.chunk_bytes, message_id=message_id,
                     headers={"x-fedmq-task": task.task_id, "x-fedmq-worker": self.config.worker_id,
                              **self._signed(msg, body, digest)},
                     stop=self.stop, grace_s=STOP_CONFIRM_GRACE_S, on_confirm=confirmed, sign=True, sha256=digest)

    def _report_failure(self, delivery: Delivery, task: messages.Task, reason: str) -> None:
        """Tell the aggregator this worker cannot do ``task`` (a ``failed`` control on the updates
        queue), then ack the task and pause; if the report is not confirmed, return the task."""
        cfg, client = self.config, self.client
        assert client is not None
        report = messages.Control(kind="failed", worker_id=cfg.worker_id, sent_s=time.time(), run_id=task.run_id,
                                  info={"task_id": task.task_id, "reason": reason[:2000]})
        try:
            self._publish(report, task, f"failed-{task.task_id}-{cfg.worker_id}")
        except FedmqError as exc:
            self._give_back(delivery, task.task_id, f"{reason}; the failure report was not confirmed: {exc}",
                            fatal=self._permanent(exc))
            return
        client.ack(delivery)
        self._failures += 1
        backoff = self._backoff()
        events.emit(log, "task_failed", "worker %s: task %s failed: %s; reported it, pausing %.1f s", cfg.worker_id,
                    task.task_id, reason, backoff, level=logging.ERROR, task_id=task.task_id, worker_id=cfg.worker_id,
                    reason=reason)
        self._pause(backoff)

    def _backoff(self) -> float:
        return min(self.config.failure_backoff_s * 2.0 ** min(self._failures - 1, 5), 30.0)

    def _pause(self, seconds: float) -> None:
        """Take no task for ``seconds`` (so that another worker gets the next ones)."""
        assert self.client is not None
        self.client.pause(self.topology.tasks)
        if not self.stop.wait(seconds):
            self._take_tasks()

    def _give_back(self, delivery: Delivery, task_id: str, reason: str, *, fatal: FedmqError | None = None) -> None:
        """Return a task this worker could not do to the queue, then pause (or stop with ``fatal``).

        The task consumer is paused first, so that the returned task goes to another worker
        if there is one; a task returned everywhere is dead-lettered by the broker past the
        delivery limit.
        """
        cfg, client = self.config, self.client
        assert client is not None
        self._failures += 1
        backoff = self._backoff()
        then = "returning it and stopping" if fatal else f"returning it and pausing {backoff:.1f} s"
        events.emit(log, "task_failed", "worker %s: task %s failed: %s; %s", cfg.worker_id, task_id, reason, then,
                    level=logging.ERROR, task_id=task_id, worker_id=cfg.worker_id, reason=reason)
        client.pause(self.topology.tasks)
        client.reject(delivery, requeue=True)
        if fatal is not None:
            self._stop_with(fatal)
        elif not self.stop.wait(backoff):
            self._take_tasks()

    def _dead_letter(self, delivery: Delivery, task_id: str, reason: str) -> None:
        """A task no worker can do (untrusted, undecodable): off to the dead-letter queue."""
        cfg, client = self.config, self.client
        assert client is not None
        events.emit(log, "task_failed", "worker %s: dead-lettering task %s: %s", cfg.worker_id, task_id, reason,
                    level=logging.WARNING, task_id=task_id, worker_id=cfg.worker_id, reason=reason)
        client.reject(delivery, requeue=False)
