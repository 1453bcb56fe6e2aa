"""Many workers in one process: each with its own broker connection and training thread.

Simulating a large federation on a small machine needs more workers than it has cores for
processes. Training threads share the interpreter (numpy releases the GIL in its kernels),
while each worker keeps its own connection, task consumer and delivery guarantees.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from fedmq.broker.settings import BrokerSettings
from fedmq.broker.topology import Topology
from fedmq.shared.chunking import DEFAULT_CHUNK_BYTES
from fedmq.shared.errors import DataError, FedmqError
from fedmq.shared.signing import PRIVATE_SUFFIX
from fedmq.worker.service import Worker, WorkerConfig

log = logging.getLogger("fedmq.worker.pool")


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
    id_prefix: str = "w",
    trainer: str,
    slowdown: float = 1.0,
    slow: int = 0,
    heartbeat_s: float = 5.0,
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
    """Run one worker per shard until ``stop`` is set or every worker stopped.

    0 if all ended well; 2 if the only trouble was workers that refused a run (their shard or
    trainer does not fit the model, :class:`~fedmq.shared.errors.WorkerRefused`); 1 otherwise.
    With ``serve`` each worker serves run after run until ``stop`` is set. ``signing_keys``: a
    directory of ``<worker id>.key`` files, one per worker; ``aggregator_key``: the public key the
    workers accept models, tasks and stops from (see :mod:`fedmq.shared.signing`). The first
    ``attackers`` workers mount ``attack`` (see :mod:`fedmq.worker.attack`).
    """
    files = shard_files(shards_dir)[:count]
    workers = []
    for i, path in enumerate(files):
        straggler = i >= len(files) - slow
        worker_id = f"{id_prefix}{i}"
        key = str(Path(signing_keys) / f"{worker_id}{PRIVATE_SUFFIX}") if signing_keys else None
        hostile = attack is not None and i < attackers
        cfg = WorkerConfig(data=str(path), worker_id=worker_id, trainer=trainer,
                           slowdown=slowdown if straggler else 1.0, heartbeat_s=heartbeat_s, serve=serve,
                           signing_key=key, aggregator_key=aggregator_key,
                           attack=attack if hostile else None, attack_scale=attack_scale,
                           chunk_bytes=chunk_bytes, max_model_bytes=max_model_bytes,
                           consumer_timeout_s=consumer_timeout_s)
        workers.append(Worker(cfg, settings, topology))
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
    if len(codes) < len(workers) or any(c not in (0, 2) for c in codes.values()):
        return 1
    return max(codes.values(), default=0)
