"""One heartbeat thread for every worker of a process.

A worker says it is alive by publishing a heartbeat to the presence stream every
``--heartbeat`` seconds. With a thread per worker, a pool of 1,000 in-process workers ran 1,000
heartbeat threads beside their 1,000 broker I/O threads and 1,000 task threads; they starved
each other of the GIL, heartbeats went unconfirmed and the aggregator took live workers for gone.
A :class:`Pulse` beats for every worker added to it: each beat publishes all the heartbeats
without waiting, then waits for their confirms together (``confirm_timeout_s`` in all), and logs
those that failed. A worker run alone gets a pulse of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

from fedmq.broker.client import PendingPublish
from fedmq.shared.errors import BrokerError

log = logging.getLogger("fedmq.worker")

CONFIRM_TIMEOUT_S = 10.0  # a heartbeat not confirmed by then is reported (the next one may do better)


class Beating(Protocol):
    """What a pulse needs of a worker."""

    @property
    def name(self) -> str: ...

    def heartbeat_nowait(self) -> PendingPublish | None:
        """Publish one heartbeat; its pending confirm, or None if it could not be sent (logged)."""


class Pulse:
    """A thread that publishes a heartbeat for each of its workers every ``interval_s``."""

    def __init__(self, interval_s: float, *, confirm_timeout_s: float = CONFIRM_TIMEOUT_S) -> None:
        self.interval_s = interval_s
        self.confirm_timeout_s = confirm_timeout_s
        self._workers: dict[int, Beating] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.beats = 0  # rounds of heartbeats sent so far

    def add(self, worker: Beating) -> None:
        """Beat for ``worker`` from the next beat on (starts the thread on first use)."""
        with self._lock:
            self._workers[id(worker)] = worker
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fedmq-pulse", daemon=True)
                self._thread.start()

    def remove(self, worker: Beating) -> None:
        with self._lock:
            self._workers.pop(id(worker), None)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.confirm_timeout_s + 1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()

    def beat(self) -> None:
        """Publish one heartbeat per worker, then wait for their confirms (bounded)."""
        with self._lock:
            workers = list(self._workers.values())
        sent = [(w, w.heartbeat_nowait()) for w in workers]
        deadline = time.monotonic() + self.confirm_timeout_s
        for worker, pending in sent:
            if pending is None:
                continue
            try:
                pending.wait(max(0.0, deadline - time.monotonic()), stop=self._stop)
            except BrokerError as exc:
                pending.cancel()
                log.info("worker %s: could not publish heartbeat: %s", worker.name, exc)
        self.beats += 1
