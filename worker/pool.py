"""Many workers on one machine: threads in a few processes, each worker with its own connection.

Simulating a large federation on a small machine needs more workers than it has cores for
processes. Training threads share an interpreter (numpy releases the GIL in its kernels),
while each worker keeps its own connection, task consumer and delivery guarantees. The
workers of a process share one heartbeat thread (:class:`~fedmq.worker.pulse.Pulse`: one
heartbeat message names them all, unless they sign) and one control queue for the
aggregator's stop (:class:`~fedmq.worker.hub.ControlHub`, on a connection of its own).

One interpreter does not carry 1,000 workers: with 3,000 threads waiting on one GIL, heartbeats
and AMQP heartbeats went unanswered and the aggregator took live workers for gone. So the pool
runs at most :data:`WORKERS_PER_PROCESS` workers per process (``--processes`` overrides): the
command's process starts the others (``spawn``: no threads or sockets are forked), each with its
share of the shards, round robin, and ends them by closing a pipe: a child stops its workers
(each says bye and hands back what it had not started) when told, when the parent dies, or on
its own SIGTERM / SIGINT.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from fedmq.broker.settings import BrokerSettings
from fedmq.broker.topology import Topology
from fedmq.shared.chunking import DEFAULT_CHUNK_BYTES
from fedmq.shared.errors import DataError, FedmqError
from fedmq.shared.signing import PRIVATE_SUFFIX
from fedmq.worker.hub import ControlHub
from fedmq.worker.pulse import Pulse
from fedmq.worker.service import CONTROL_QUEUE_EXPIRES_S, Worker, WorkerConfig

log = logging.getLogger("fedmq.worker.pool")

#: workers one process hosts when --processes is not given (N = 1,000 on 2 cores: 16 processes)
WORKERS_PER_PROCESS = 64
MAX_AUTO_PROCESSES = 16


def auto_processes(workers: int) -> int:
    """How many processes host ``workers`` in-process workers by default."""
    return max(1, min(MAX_AUTO_PROCESSES, math.ceil(workers / WORKERS_PER_PROCESS)))


def shard_files(shards_dir: str) -> list[Path]:
    files = sorted(Path(shards_dir).glob("worker-*.npz"), key=lambda p: int(p.stem.split("-")[1]))
    if not files:
        raise DataError(f"{shards_dir} holds no worker-<i>.npz shards (write them with `fedmq data split`)")
    return files


def run_pool(
    shards_dir: str,
    settings: BrokerSettings,
    topology: Topology,
    *,
    stop: threading.Event,
    count: int | None = None,
    processes: int | None = None,
    setup_logging: Callable[[], None] | None = None,
    **options: Any,
) -> int:
    """Run one worker per shard until ``stop`` is set or every worker stopped.

    0 if all ended well; 2 if the only trouble was workers that refused a run (their shard or
    trainer does not fit the model, :class:`~fedmq.shared.errors.WorkerRefused`); 1 otherwise.
    ``processes``: how many processes host the workers (None: :func:`auto_processes`);
    ``setup_logging``: a picklable callable that configures logging in each child process.
    ``options`` are :func:`run_workers`' (trainer, signing keys, attackers, ...).
    """
    files = shard_files(shards_dir)[:count]
    shards = list(enumerate(files))
    wanted = processes if processes is not None else auto_processes(len(shards))
    parts = [shards[k::wanted] for k in range(min(wanted, len(shards)))]
    if len(parts) <= 1:
        return run_workers(shards, len(shards), settings, topology, stop=stop, **options)
    ctx = multiprocessing.get_context("spawn")
    children = []
    for k, part in enumerate(parts):
        # the child reads its end until we close ours (or die): then it stops
        child_end, our_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, name=f"fedmq-workers-{k}",
                           args=(part, len(shards), settings, topology, options, setup_logging, child_end))
        proc.start()
        child_end.close()
        children.append((proc, our_end))
    log.info("running %d workers in %d processes (pids %s)", len(shards), len(children),
             ", ".join(str(p.pid) for p, _ in children))
    for proc, _ in children:
        while proc.is_alive() and not stop.is_set():
            proc.join(timeout=1.0)
        if stop.is_set():
            break
    for _, pipe in children:
        pipe.close()  # every child still running stops its workers
    codes = []
    for proc, _ in children:
        proc.join()
        codes.append(proc.exitcode if proc.exitcode is not None and proc.exitcode >= 0 else 1)
    if any(c not in (0, 2) for c in codes):
        return 1
    return max(codes, default=0)


def _child(part: list[tuple[int, Path]], total: int, settings: BrokerSettings, topology: Topology,
           options: dict[str, Any], setup_logging: Callable[[], None] | None, parent: Connection) -> None:
    """A child process of the pool: its share of the workers, until the parent closes the pipe."""
    if setup_logging is not None:
        setup_logging()
    stop = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # Ctrl-C reaches the whole process group

    def parent_gone() -> None:
        with contextlib.suppress(EOFError, OSError):
            parent.recv()  # nothing is ever sent: EOF when the parent closes it or dies
        stop.set()

    threading.Thread(target=parent_gone, name="fedmq-pool-parent", daemon=True).start()
    log.info("process %d: workers %s", os.getpid(), ", ".join(str(i) for i, _ in part))
    try:
        code = run_workers(part, total, settings, topology, stop=stop, **options)
    except FedmqError as exc:  # e.g. the broker refused this process's control queue: one line, not a traceback
        log.error("process %d: %s", os.getpid(), exc)
        code = exc.exit_code
    raise SystemExit(code)


def run_workers(
    shards: list[tuple[int, Path]],
    total: int,
    settings: BrokerSettings,
    topology: Topology,
    *,
    stop: threading.Event,
    id_prefix: str = "w",
    trainer: str,
    slowdown: float = 1.0,
    slow: int = 0,
    heartbeat_s: float = 5.0,
    failure_backoff_s: float = 1.0,
    serve: bool = False,
    signing_keys: str | None = None,
    aggregator_key: str | None = None,
    attackers: int = 0,
    attack: str | None = None,
    attack_scale: float = 10.0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    max_model_bytes: int = 2 * 1024**3,
    consumer_timeout_s: float = 86400.0,
) -> int:
    """Run the workers of ``shards`` (index, shard file) in this process; the exit code of :func:`run_pool`.

    ``total``: the pool's size (the last ``slow`` indices are stragglers). With ``serve`` each
    worker serves run after run until ``stop`` is set. ``signing_keys``: a directory of
    ``<worker id>.key`` files, one per worker; ``aggregator_key``: the public key the workers
    accept models, tasks and stops from (see :mod:`fedmq.shared.signing`). The first
    ``attackers`` workers mount ``attack`` (see :mod:`fedmq.worker.attack`).
    """
    pulse = Pulse(heartbeat_s, pooled=signing_keys is None)  # signed heartbeats speak for their signer only
    hub = ControlHub(settings, topology, name=f"pool-{socket.gethostname()}-{os.getpid()}",
                     expires_s=CONTROL_QUEUE_EXPIRES_S)

    def hub_failed(error: FedmqError) -> None:  # no stop could reach these workers any more: stop them
        log.error("the control queue of this process failed: %s; stopping its workers", error)
        stop.set()

    hub.on_failure = hub_failed
    hub.start()
    workers = []
    for i, path in shards:
        straggler = i >= total - slow
        worker_id = f"{id_prefix}{i}"
        key = str(Path(signing_keys) / f"{worker_id}{PRIVATE_SUFFIX}") if signing_keys else None
        hostile = attack is not None and i < attackers
        cfg = WorkerConfig(data=str(path), worker_id=worker_id, trainer=trainer,
                           slowdown=slowdown if straggler else 1.0, heartbeat_s=heartbeat_s,
                           failure_backoff_s=failure_backoff_s, serve=serve,
                           signing_key=key, aggregator_key=aggregator_key,
                           attack=attack if hostile else None, attack_scale=attack_scale,
                           chunk_bytes=chunk_bytes, max_model_bytes=max_model_bytes,
                           consumer_timeout_s=consumer_timeout_s)
        workers.append(Worker(cfg, settings, topology, pulse=pulse, hub=hub))
    codes: dict[str, int] = {}

    def body(w: Worker) -> None:
        try:
            codes[w.config.worker_id] = w.run()
        except FedmqError as exc:
            log.error("worker %s stopped: %s", w.config.worker_id, exc)
            codes[w.config.worker_id] = exc.exit_code
        except Exception:
            log.exception("worker %s failed", w.config.worker_id)
            codes[w.config.worker_id] = 1

    threads = [threading.Thread(target=body, args=(w,), name=w.config.worker_id, daemon=True) for w in workers]
    for t in threads:
        t.start()
    log.info("running %d workers in this process", len(threads))

    def stop_all() -> None:
        stop.wait()
        for w in workers:
            w.request_stop()

    watcher = threading.Thread(target=stop_all, daemon=True)
    watcher.start()
    for t in threads:
        while t.is_alive():
            t.join(timeout=1.0)
    pulse.stop()
    hub.close()
    if hub.failure is not None or len(codes) < len(workers) or any(c not in (0, 2) for c in codes.values()):
        return 1
    return max(codes.values(), default=0)
