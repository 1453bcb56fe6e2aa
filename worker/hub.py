"""One control queue for every worker of a pool process.

The aggregator broadcasts its stop on the control exchange, and each worker binds a queue of its
own to it: a durable quorum queue with ``x-expires``, so that a stop sent while the worker
reconnects is not lost. A quorum queue is a Raft cluster of its own on the broker; 1,000 pooled
workers made 1,000 of them (broker CPU per update at N = 1,000 was 3.3x that at N = 4), and their
1,000 deletions when the pool stopped crashed RabbitMQ 3.10's quorum-queue log writer
(``ra_log_segment_writer``, ``{badmatch,{error,enoent}}``: every quorum queue of the node went
down). A :class:`ControlHub` holds the one control queue of a process, on a connection of its
own, and hands every control message to each worker added to it; each worker still decides for
itself (its run, the signature) as it would with its own queue.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

from fedmq.broker.client import Client, Delivery
from fedmq.broker.settings import BrokerSettings
from fedmq.broker.topology import Topology
from fedmq.shared.errors import BrokerError

log = logging.getLogger("fedmq.worker")


class ControlHub:
    """A control queue shared by the workers of one process. Start it before the workers."""

    def __init__(self, settings: BrokerSettings, topology: Topology, *, name: str, expires_s: float,
                 declare: bool = True) -> None:
        self.queue = f"{topology.control}.{name}.{uuid.uuid4().hex[:8]}"
        self.client = Client(settings, topology, name=f"fedmq-{name}-control", declare=declare)
        self._handlers: dict[int, Callable[[Delivery], None]] = {}
        self._lock = threading.Lock()
        self.failure: BrokerError | None = None
        self.on_failure: Callable[[BrokerError], None] | None = None
        self.client.on_failure = self._failed
        self.client.subscribe(self.queue, self._deliver, prefetch=10, settle_on_return=True,
                              bind_exchange=topology.control, expires_s=expires_s)

    def start(self) -> ControlHub:
        self.client.start()
        return self

    def close(self) -> None:
        self.client.close()  # deletes the queue

    def add(self, key: object, handler: Callable[[Delivery], None]) -> None:
        """Hand ``handler`` every control message from now on (on the hub's I/O thread)."""
        with self._lock:
            self._handlers[id(key)] = handler

    def remove(self, key: object) -> None:
        with self._lock:
            self._handlers.pop(id(key), None)

    def _deliver(self, delivery: Delivery) -> None:
        with self._lock:
            handlers = list(self._handlers.values())
        for handler in handlers:
            try:
                handler(delivery)
            except Exception:  # one worker's failure must not keep the stop from the others
                log.exception("a worker failed to handle a control message")

    def _failed(self, error: BrokerError) -> None:
        self.failure = error
        if self.on_failure is not None:
            self.on_failure(error)
