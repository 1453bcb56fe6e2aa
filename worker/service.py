"""A fedmq worker: follows the model stream, pulls tasks, trains on its shard, publishes updates.

Threads: the broker client's I/O thread only hands deliveries over (tasks into a queue, model
versions into a :class:`ModelBox`); the worker's own thread trains. A task is acked only after
its update is confirmed by the broker, so a crash at any point leaves the task to be
redelivered, and a duplicate update (crash between confirm and ack) is recognised by the
aggregator from its task id.

In synchronous mode a worker trains at most once per model version: it cancels its task
consumer before acking and resumes when a newer version appears on the stream.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedmq.broker.client import Client, Delivery
from fedmq.broker.settings import BrokerSettings
from fedmq.broker.topology import Topology
from fedmq.shared import messages
from fedmq.shared.data import load_shard
from fedmq.shared.errors import BrokerError, DecodeError, FedmqError
from fedmq.shared.trainer import DEFAULT_TRAINER, Trainer, load_trainer_factory

log = logging.getLogger("fedmq.worker")

MAX_TASK_BYTES = 64 * 1024


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def derive_seed(task_seed: int, worker_id: str) -> int:
    """A per-(task seed, worker) training seed, stable across processes and restarts."""
    digest = hashlib.blake2b(f"{task_seed}:{worker_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF


@dataclass(frozen=True)
class WorkerConfig:
    data: str
    worker_id: str
    slowdown: float = 1.0
    trainer: str = DEFAULT_TRAINER
    heartbeat_s: float = 5.0
    model_wait_s: float = 60.0
    failure_backoff_s: float = 1.0
    declare: bool = True  # declare the namespace's topology on connect (needs configure rights)
    trust_user: str | None = None  # accept models, tasks and stops only from this broker user
    max_model_bytes: int = messages.DEFAULT_MAX_MESSAGE_BYTES


class ModelBox:
    """The newest model versions read from the stream, kept as raw bytes, decoded on demand."""

    def __init__(self, keep: int = 3, max_bytes: int = messages.DEFAULT_MAX_MESSAGE_BYTES,
                 trust_user: str | None = None) -> None:
        self.keep = keep
        self.max_bytes = max_bytes
        self.trust_user = trust_user
        self._raw: dict[int, bytes] = {}
        self._decoded: tuple[int, messages.ModelVersion] | None = None
        self._cond = threading.Condition()
        self._watch: tuple[int, Callable[[], None]] | None = None

    @property
    def latest(self) -> int | None:
        with self._cond:
            return max(self._raw) if self._raw else None

    def offer(self, delivery: Delivery) -> None:
        """I/O thread: remember a version read from the stream."""
        if self.trust_user is not None and delivery.user_id != self.trust_user:
            log.warning("ignoring a model version not published by %r (user_id %r)", self.trust_user, delivery.user_id)
            return
        version = delivery.headers.get("x-fedmq-version")
        if not isinstance(version, int):
            try:
                msg = messages.decode(delivery.body, expect=messages.ModelVersion, max_bytes=self.max_bytes)
            except DecodeError as exc:
                log.warning("ignoring a bad message on the model stream: %s", exc)
                return
            assert isinstance(msg, messages.ModelVersion)
            version = msg.version
        fire = None
        with self._cond:
            if version in self._raw:
                return
            self._raw[version] = delivery.body
            for old in sorted(self._raw)[: -self.keep]:
                del self._raw[old]
            if self._watch is not None and version > self._watch[0]:
                fire, self._watch = self._watch[1], None
            self._cond.notify_all()
        if fire is not None:
            fire()

    def when_newer_than(self, version: int, fn: Callable[[], None]) -> None:
        """Call ``fn`` once a version newer than ``version`` is known (at once if it is)."""
        with self._cond:
            if self._raw and max(self._raw) > version:
                newer = True
            else:
                newer, self._watch = False, (version, fn)
        if newer:
            fn()

    def get(self, version: int | None, timeout: float, stop: threading.Event) -> messages.ModelVersion | None:
        """The model ``version`` (``None``: the newest), waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                want = version if version is not None else (max(self._raw) if self._raw else None)
                if want is not None and want in self._raw:
                    body = self._raw[want]
                    break
                if version is not None and self._raw and min(self._raw) > version:
                    return None  # it is gone: only newer versions are kept
                left = deadline - time.monotonic()
                if left <= 0 or stop.is_set():
                    return None
                self._cond.wait(min(left, 0.5))
        if self._decoded is not None and self._decoded[0] == want:
            return self._decoded[1]
        msg = messages.decode(body, expect=messages.ModelVersion, max_bytes=self.max_bytes)
        assert isinstance(msg, messages.ModelVersion)
        self._decoded = (want, msg)
        return msg


class Worker:
    """One federated worker. :meth:`run` blocks until stopped; several may share a process."""

    def __init__(
        self,
        config: WorkerConfig,
        settings: BrokerSettings,
        topology: Topology,
        stop: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.settings = settings
        self.topology = topology
        self.stop = stop or threading.Event()
        self.models = ModelBox(max_bytes=config.max_model_bytes, trust_user=config.trust_user)
        self.inbox: queue.Queue[Delivery | None] = queue.Queue()
        self.tasks_done = 0
        self.client: Client | None = None
        self._trainers: dict[str, Trainer] = {}
        self._failures = 0
        # fault injection for the crash-safety tests: SIGKILL ourselves at a named point
        self._crash_point = os.environ.get("FEDMQ_FAULT_CRASH", "")

    # ------------------------------------------------------------------ I/O-thread handlers
    def _on_task(self, delivery: Delivery) -> None:
        self.inbox.put(delivery)

    def _on_control(self, delivery: Delivery) -> None:
        try:
            msg = messages.decode(delivery.body, expect=messages.Control, max_bytes=MAX_TASK_BYTES)
        except DecodeError as exc:
            log.warning("ignoring a bad control message: %s", exc)
            return
        assert isinstance(msg, messages.Control)
        if self.config.trust_user is not None and delivery.user_id != self.config.trust_user:
            log.warning("ignoring a %s message not sent by %r", msg.kind, self.config.trust_user)
            return
        if msg.kind == "stop":
            log.info("worker %s: stop requested by the aggregator", self.config.worker_id)
            self.request_stop()

    def request_stop(self) -> None:
        self.stop.set()
        self.inbox.put(None)

    # ------------------------------------------------------------------ main
    def run(self) -> int:
        cfg = self.config
        X, y = load_shard(cfg.data)
        factory = load_trainer_factory(cfg.trainer)
        client = Client(self.settings, self.topology, name=f"fedmq-worker-{cfg.worker_id}", declare=cfg.declare)
        self.client = client
        control_queue = f"{self.topology.control}.{cfg.worker_id}.{uuid.uuid4().hex[:8]}"
        client.subscribe(
            self.topology.models,
            self.models.offer,
            prefetch=2,
            arguments=lambda: {"x-stream-offset": "last"},
            settle_on_return=True,
        )
        client.subscribe(self.topology.tasks, self._on_task, prefetch=1)
        client.subscribe(
            control_queue,
            self._on_control,
            prefetch=10,
            exclusive=True,
            settle_on_return=True,
            bind_exchange=self.topology.control,
        )
        client.start()
        log.info("worker %s: %d samples from %s, connected to %s", cfg.worker_id, len(y), cfg.data, self.settings.masked_url)
        beat = threading.Thread(target=self._heartbeat, name=f"{cfg.worker_id}-beat", daemon=True)
        self._presence("hello", samples=int(len(y)))
        beat.start()
        try:
            while not self.stop.is_set():
                delivery = self.inbox.get()
                if delivery is None or self.stop.is_set():
                    if delivery is not None:
                        client.reject(delivery, requeue=True)
                    break
                self._handle(delivery, X, y, factory)
        finally:
            self._return_unstarted()
            self._presence("bye", tasks_done=self.tasks_done)
            client.close()
        log.info("worker %s: stopped after %d tasks", cfg.worker_id, self.tasks_done)
        return 0

    def _return_unstarted(self) -> None:
        assert self.client is not None
        while True:
            try:
                delivery = self.inbox.get_nowait()
            except queue.Empty:
                return
            if delivery is not None:
                self.client.reject(delivery, requeue=True)

    def _heartbeat(self) -> None:
        while not self.stop.wait(self.config.heartbeat_s):
            self._presence("heartbeat", tasks_done=self.tasks_done)

    def _presence(self, kind: str, **info: object) -> None:
        assert self.client is not None
        msg = messages.Control(kind=kind, worker_id=self.config.worker_id, sent_s=time.time(), info=dict(info))
        try:
            self.client.publish(self.topology.presence, messages.encode(msg), timeout=10)
        except BrokerError as exc:
            log.info("worker %s: could not publish %s: %s", self.config.worker_id, kind, exc)

    def _trainer(self, spec: dict, factory: Callable[[dict], Trainer]) -> Trainer:
        key = repr(sorted(spec.items()))
        if key not in self._trainers:
            self._trainers.clear()
            self._trainers[key] = factory(spec)
        return self._trainers[key]

    def _handle(self, delivery: Delivery, X: np.ndarray, y: np.ndarray, factory: Callable[[dict], Trainer]) -> None:
        cfg = self.config
        client = self.client
        assert client is not None
        if cfg.trust_user is not None and delivery.user_id != cfg.trust_user:
            log.warning("worker %s: dead-lettering a task not published by %r (user_id %r)",
                        cfg.worker_id, cfg.trust_user, delivery.user_id)
            client.reject(delivery, requeue=False)
            return
        try:
            task = messages.decode(delivery.body, expect=messages.Task, max_bytes=MAX_TASK_BYTES)
        except DecodeError as exc:
            log.warning("worker %s: dead-lettering an undecodable task: %s", cfg.worker_id, exc)
            client.reject(delivery, requeue=False)
            return
        assert isinstance(task, messages.Task)
        sync = task.mode == "sync"
        latest = self.models.latest
        if sync and task.version is not None and latest is not None and task.version < latest:
            log.info("worker %s: task %s is for version %d, the model is at %d: skipped", cfg.worker_id, task.task_id, task.version, latest)
            client.ack(delivery)
            return
        model = self.models.get(task.version if sync else None, cfg.model_wait_s, self.stop)
        if model is None:
            if not self.stop.is_set():
                log.warning("worker %s: model version %s not available; returning task %s", cfg.worker_id, task.version, task.task_id)
            client.reject(delivery, requeue=True)
            return
        started = time.monotonic()
        log.info("worker %s: task %s started on version %d", cfg.worker_id, task.task_id, model.version,
                 extra={"event": "task_started", "task_id": task.task_id, "worker_id": cfg.worker_id})
        try:
            trainer = self._trainer(model.spec, factory)
            result = trainer.fit(
                model.params, X, y,
                epochs=task.epochs, batch_size=task.batch_size, lr=task.lr, mu=task.mu,
                seed=derive_seed(task.seed, cfg.worker_id),
            )
        except Exception as exc:  # a user trainer may raise anything
            self._failures += 1
            backoff = min(cfg.failure_backoff_s * 2.0 ** min(self._failures - 1, 5), 30.0)
            log.error("worker %s: trainer failed on task %s: %s: %s; returning it and pausing %.0f s",
                      cfg.worker_id, task.task_id, type(exc).__name__, exc, backoff)
            # pause first so that the returned task goes to another worker if there is one;
            # a task that fails everywhere is dead-lettered by the broker past the delivery limit
            client.pause(self.topology.tasks)
            client.reject(delivery, requeue=True)
            if not self.stop.wait(backoff):
                client.resume(self.topology.tasks)
            return
        self._failures = 0
        compute = time.monotonic() - started
        if cfg.slowdown > 1 and self.stop.wait((cfg.slowdown - 1) * compute):
            log.info("worker %s: stopping; returning task %s", cfg.worker_id, task.task_id)
            client.reject(delivery, requeue=True)
            return
        params = result.params
        if task.update_kind == "delta":
            params = {k: np.subtract(v, model.params[k], dtype=np.float32) for k, v in params.items()}
        # In a synchronous round a task is only a ticket to contribute; the unit of work (and the
        # dedupe key) is "this worker's contribution to round r", whichever ticket it drew.
        work_id = f"r{task.round:05d}:{cfg.worker_id}" if sync and task.round is not None else task.task_id
        update = messages.Update(
            task_id=work_id, worker_id=cfg.worker_id, base_version=model.version,
            num_samples=int(result.num_samples), params=params, kind=task.update_kind,
            train_loss=float(result.loss), train_accuracy=float(result.accuracy),
            duration_s=time.monotonic() - started, round=task.round,
        )
        if sync:
            client.pause(self.topology.tasks)  # before the ack: no second task for this version
        body = messages.encode(update)
        message_id = uuid.uuid4().hex
        try:
            client.publish(
                self.topology.updates, body, message_id=message_id,
                headers={"x-fedmq-task": task.task_id, "x-fedmq-worker": cfg.worker_id},
            )
        except FedmqError as exc:
            log.error("worker %s: update for %s not confirmed (%s); the task will be redelivered", cfg.worker_id, task.task_id, exc)
            if sync:
                client.resume(self.topology.tasks)
            return
        log.info(
            "worker %s: task %s on version %d done in %.2fs (loss %.4f); update confirmed",
            cfg.worker_id, task.task_id, model.version, time.monotonic() - started, result.loss,
            extra={"event": "update_confirmed", "task_id": work_id, "ticket": task.task_id, "worker_id": cfg.worker_id,
                   "message_id": message_id},
        )
        if self._crash_point == "after-confirm":
            os.kill(os.getpid(), signal.SIGKILL)
        client.ack(delivery)
        self.tasks_done += 1
        if sync:
            self.models.when_newer_than(model.version, lambda: client.resume(self.topology.tasks))

