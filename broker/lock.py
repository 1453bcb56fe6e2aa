"""The namespace's aggregator lock: one token on a replicated queue, held unacked.

``<ns>.lock`` is a quorum queue with single active consumer (so it lives on every node of a
cluster and survives any one of them). Every aggregator subscribes to it and offers a token;
RabbitMQ delivers messages only to the queue's *active* consumer, so:

* the active aggregator holds one token, unacked, for as long as its connection lives, and
  acks any other token it receives (the offers of the standbys);
* a standby (``--standby``) is a consumer that receives nothing; when the active one's
  connection dies (process killed, node lost), RabbitMQ returns its token to the queue and
  makes the next consumer active, which receives the token: it now holds the lock;
* an aggregator that is not a standby waits a few seconds for a token and, without one, is
  refused (:class:`~fedmq.shared.errors.NamespaceLocked`), as before.

A token is only as good as the channel it was delivered on: after a reconnect (e.g. to
another node) the token is back in the queue, and we hold the lock again only if it is
delivered to us again (:meth:`NamespaceLock.held`, :meth:`NamespaceLock.regain`). The run
directory has its own guard (``aggregator/durable.py``'s run-dir lock) for the moment the
broker's view and ours disagree.

A held token is an unacked delivery, which RabbitMQ's ``consumer_timeout`` (30 min by
default) would eventually reclaim by closing the channel: :meth:`NamespaceLock.refresh`
offers a new token and acks the old one, well within that.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from fedmq.broker.client import Client, Delivery
from fedmq.shared.errors import BrokerError, NamespaceLocked

log = logging.getLogger("fedmq.broker.lock")

#: how often the holder swaps its token for a fresh one (below any sane consumer_timeout)
REFRESH_S = 300.0


class NamespaceLock:
    """The token protocol of ``<ns>.lock`` for one aggregator (see the module docstring)."""

    def __init__(self, client: Client, queue_name: str, holder: str) -> None:
        self.client = client
        self.queue_name = queue_name
        self.holder = holder
        self._arrived: queue.Queue[Delivery] = queue.Queue()
        self._held: Delivery | None = None
        self._held_since = 0.0

    def subscribe(self) -> None:
        """Register the consumer (call before ``client.start()``)."""
        self.client.subscribe(self.queue_name, self._arrived.put, prefetch=2)

    def offer(self) -> None:
        """Put one token in the queue (it goes to whoever is active, perhaps us)."""
        self.client.publish(self.queue_name, self.holder.encode(), message_id=f"lock-{self.holder}-{time.time_ns()}")

    @property
    def held(self) -> bool:
        """We hold a token delivered on the client's current channel."""
        held = self._held
        return held is not None and held.generation == self.client.generation

    def acquire(self, timeout: float | None, stop: threading.Event | None = None) -> bool:
        """Offer a token and wait up to ``timeout`` seconds (None: until ``stop``) to hold one."""
        self.offer()
        return self.regain(timeout, stop)

    def regain(self, timeout: float | None, stop: threading.Event | None = None) -> bool:
        """Wait up to ``timeout`` s for a token on the current channel; True once one is held."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.settle()
            if self.held:
                return True
            if stop is not None and stop.is_set():
                return False
            left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if left <= 0:
                return False
            if self.client.failure is not None:
                raise self.client.failure
            try:
                delivery = self._arrived.get(timeout=left)
            except queue.Empty:
                continue
            self._arrived.put(delivery)  # handled by settle()

    def settle(self) -> None:
        """Take the tokens delivered so far: hold one (of the current channel), ack the rest."""
        while True:
            try:
                delivery = self._arrived.get_nowait()
            except queue.Empty:
                return
            if delivery.generation != self.client.generation:
                continue  # of a dead channel: the broker has it back already
            if not self.held:
                if self._held is None:
                    log.info("holding the namespace lock %s", self.queue_name)
                self._held, self._held_since = delivery, time.monotonic()
            else:
                self.client.ack(delivery)  # a standby's offer, or a spare: one token is enough

    def refresh(self, wait_s: float = 10.0) -> None:
        """Swap a token held for :data:`REFRESH_S` for a fresh one (see the module docstring)."""
        if not self.held or time.monotonic() - self._held_since < REFRESH_S:
            return
        try:
            self.offer()  # delivered to us, the active consumer
            fresh = self._arrived.get(timeout=wait_s)
        except (BrokerError, queue.Empty) as exc:
            log.warning("could not refresh the namespace lock token: %s", exc or "no token came back")
            return
        if fresh.generation != self.client.generation:
            return
        old, self._held, self._held_since = self._held, fresh, time.monotonic()
        assert old is not None
        self.client.ack(old)

    def refused(self) -> NamespaceLocked:
        ns = self.queue_name.removesuffix(".lock")
        return NamespaceLocked(
            f"another aggregator is running on namespace {ns!r} (it holds the lock queue "
            f"{self.queue_name!r}); stop it first, use another --namespace, or start this one "
            "with --standby to take over when it stops",
        )
