"""One heartbeat thread for every worker of a process, and pooled heartbeats.

A worker says it is alive by publishing a heartbeat to the presence stream every
``--heartbeat`` seconds. With a thread per worker, a pool of 1,000 in-process workers ran 1,000
heartbeat threads beside their 1,000 broker I/O threads and 1,000 task threads; they starved
each other of the GIL, heartbeats went unconfirmed and the aggregator took live workers for gone.
A :class:`Pulse` beats for every worker added to it: each beat publishes the heartbeats without
waiting, then waits for their confirms together (``confirm_timeout_s`` in all), and logs those
that failed. A worker run alone gets a pulse of its own.

``pooled``: the workers of one process beat together, one heartbeat per :data:`POOLED_BATCH`
workers, published by one of them and naming the others (``info["workers"]``, see
docs/protocol.md). 1,000 workers at the default 5 s sent the aggregator 200 presence messages
a second; pooled, 16 processes send about 3. Only workers whose connection is up are named (a
worker cut off from the broker must look gone, as it would alone), and a pooled heartbeat that
fails is sent again as one heartbeat per worker. Signed workers never pool: a signature speaks
for its signer only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from fedmq.broker.client import PendingPublish
from fedmq.shared.errors import BrokerError

log = logging.getLogger("fedmq.worker")

CONFIRM_TIMEOUT_S = 10.0  # a heartbeat not confirmed by then is reported (the next one may do better)
POOLED_BATCH = 256  # workers per pooled heartbeat (a few KiB: far under the presence limit of 64 KiB)


class Beating(Protocol):
    """What a pulse needs of a worker."""

    @property
    def name(self) -> str: ...

    @property
    def connected(self) -> bool: ...

    def heartbeat_nowait(self, also: Sequence[str] = ()) -> PendingPublish | None:
        """Publish one heartbeat (for itself and the workers ``also`` names); its pending
        confirm, or None if it could not be sent (logged)."""


class Pulse:
    """A thread that publishes a heartbeat for each of its workers every ``interval_s``."""

    def __init__(self, interval_s: float, *, pooled: bool = False,
                 confirm_timeout_s: float = CONFIRM_TIMEOUT_S) -> None:
        self.interval_s = interval_s
        self.pooled = pooled
        self.confirm_timeout_s = confirm_timeout_s
        self._workers: dict[int, Beating] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.beats = 0  # rounds of heartbeats sent so far
        self.messages = 0  # heartbeat messages published so far

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
        """One heartbeat for every worker (pooled where asked), then their confirms (bounded)."""
        with self._lock:
            workers = list(self._workers.values())
        deadline = time.monotonic() + self.confirm_timeout_s
        if self.pooled:
            up = [w for w in workers if w.connected]
            for start in range(0, len(up), POOLED_BATCH):
                batch = up[start:start + POOLED_BATCH]
                carrier, others = batch[0], [w.name for w in batch[1:]]
                if not self._confirmed(carrier, carrier.heartbeat_nowait(others), deadline):
                    self._singly(batch, time.monotonic() + self.confirm_timeout_s)
        else:
            self._singly(workers, deadline)
        self.beats += 1

    def _singly(self, workers: list[Beating], deadline: float) -> None:
        for worker, pending in [(w, w.heartbeat_nowait()) for w in workers]:
            self._confirmed(worker, pending, deadline)

    def _confirmed(self, worker: Beating, pending: PendingPublish | None, deadline: float) -> bool:
        if pending is None:
            return False
        self.messages += 1
        try:
            pending.wait(max(0.0, deadline - time.monotonic()), stop=self._stop)
        except BrokerError as exc:
            pending.cancel()
            if not self._stop.is_set():
                log.info("worker %s: could not publish heartbeat: %s", worker.name, exc)
            return False
        return True
