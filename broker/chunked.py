"""Chunked payloads over a :class:`~fedmq.broker.client.Client`: publish, and follow a stream.

The mechanism is :mod:`fedmq.shared.chunking` (pure); this module is its broker side:

* :func:`publish_payload` sends a body as one message when it fits in ``chunk_bytes`` (unchanged
  on the wire), else as chunks, views of the body (no copy), each with the caller's headers and
  the chunk headers; :func:`wait_confirms` waits for all of them. :func:`send_payload` does both
  with at most ``window`` chunks unconfirmed (a worker's update). A chunk size the broker cannot
  take fails at once with one line naming the sizes and ``--chunk-bytes``, before anything is sent.
* :class:`StreamFollower` reads a stream of possibly chunked payloads (the model stream) and hands
  its handler whole payloads only, as one :class:`~fedmq.broker.client.Delivery` with the
  payload's own headers. A consumer that attaches at ``last`` may land in the middle of a chunked
  payload: the follower reads the chunk's index and the delivery's ``x-stream-offset`` and
  attaches again at ``offset - index`` (the chunks of one payload are published consecutively
  by one publisher), so a late joiner gets the newest complete payload without reading the
  stream from the start. A payload whose chunks stop, or whose digest does not match, is
  logged and skipped, never handed over. A follower may stay attached (every payload as it is
  published), or read on demand: :meth:`StreamFollower.attach` (at ``last``) until the reader
  has what it needs, then :meth:`StreamFollower.detach`, so that the payloads published while it
  is detached are never delivered to it (a worker fetching the model its task needs).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeGuard

from fedmq.broker.client import Client, Delivery, PendingPublish
from fedmq.broker.settings import format_bytes
from fedmq.shared import chunking
from fedmq.shared.errors import ConfigError, FedmqError, MessageTooLarge, NotConfirmed

log = logging.getLogger("fedmq.broker")

#: a delivery header RabbitMQ sets on every message read from a stream: its offset
STREAM_OFFSET_HEADER = "x-stream-offset"


def check_chunk_size(client: Client, chunk_bytes: int) -> None:
    """Raise :class:`~fedmq.shared.errors.MessageTooLarge` (one line) if ``chunk_bytes`` cannot pass
    the broker's maximum message size."""
    why = chunking.check_chunk_bytes(chunk_bytes, client.max_message_bytes)
    if why is not None:
        raise MessageTooLarge(why) if chunk_bytes >= chunking.MIN_CHUNK_BYTES else ConfigError(why)


def publish_payload(
    client: Client,
    routing_key: str,
    body: bytes | bytearray | memoryview,
    *,
    chunk_bytes: int,
    message_id: str,
    headers: dict[str, Any] | None = None,
    exchange: str = "",
    sign: bool = False,
    sha256: bytes | None = None,
) -> list[PendingPublish]:
    """Queue ``body`` for publishing as one message or as chunks; wait with :func:`wait_confirms`.

    A chunk's message id is ``<message_id>:<index>``; the payload's id is ``message_id``.
    ``sha256``: the body's SHA-256 when the caller computed it already (for its signature).
    """
    chunks = chunking.split(body, chunk_bytes, message_id, headers, sha256=sha256)
    if len(chunks) == 1:
        return [client.publish_nowait(routing_key, chunks[0].data, exchange=exchange, message_id=message_id,
                                      headers=headers, sign=sign)]
    check_chunk_size(client, chunk_bytes)
    pending: list[PendingPublish] = []
    try:
        for c in chunks:
            pending.append(client.publish_nowait(routing_key, c.data, exchange=exchange,
                                                 message_id=f"{message_id}:{c.index}", headers=c.headers, sign=sign))
    except FedmqError:
        for p in pending:
            p.cancel()
        raise
    return pending


def wait_confirms(pending: list[PendingPublish], timeout: float | None = None, *,
                  stop: threading.Event | None = None, chunk_bytes: int | None = None) -> None:
    """Wait for every publish of a payload (the caller withdraws them if this raises).

    A chunk the broker refused as too large names ``--chunk-bytes`` in the error.
    """
    for p in pending:
        _wait(p, timeout, stop, None, chunk_bytes if len(pending) > 1 else None)


def send_payload(
    client: Client,
    routing_key: str,
    body: bytes | bytearray | memoryview | list[Any],
    *,
    chunk_bytes: int,
    message_id: str,
    headers: dict[str, Any] | None = None,
    window: int = 2,
    timeout: float | None = None,
    stop: threading.Event | None = None,
    grace_s: float | None = None,
    on_confirm: Callable[[int, int], None] | None = None,
    sign: bool = False,
    sha256: bytes | None = None,
) -> None:
    """Publish ``body`` (one message or chunks) and return once the broker confirmed all of it.

    At most ``window`` chunks are queued unconfirmed at a time, so a chunked payload holds no
    more than that beyond the body in the client. ``body`` may be a list of pieces
    (:func:`fedmq.shared.messages.encode_pieces`): the payload is then never joined into one
    buffer, each chunk is cut from the pieces as it is sent. ``on_confirm(index, count)`` is called after
    each chunk's confirm. ``stop`` ends a wait early (:class:`~fedmq.shared.errors.NotConfirmed`),
    unless ``grace_s`` is given: then a publish already sent gets that much longer to be confirmed.
    On any failure every unconfirmed chunk is withdrawn and the error raised. With ``sign`` every
    message carries ``user_id`` = our broker user (see :meth:`Client.publish_nowait`).
    ``sha256``: the body's SHA-256 when the caller computed it already (for its signature).
    """
    if isinstance(body, list):
        count, chunks = chunking.split_pieces(body, chunk_bytes, message_id, headers, sha256=sha256)
    else:
        listed = chunking.split(body, chunk_bytes, message_id, headers, sha256=sha256)
        count, chunks = len(listed), iter(listed)
    if count > 1:
        check_chunk_size(client, chunk_bytes)
    inflight: collections.deque[tuple[int, PendingPublish]] = collections.deque()
    hint = chunk_bytes if count > 1 else None

    def settle_one() -> None:
        index, p = inflight[0]
        _wait(p, timeout, stop, grace_s, hint, client)
        inflight.popleft()
        if on_confirm is not None:
            on_confirm(index, count)

    try:
        for c in chunks:
            mid = message_id if count == 1 else f"{message_id}:{c.index}"
            inflight.append((c.index, client.publish_nowait(routing_key, c.data, message_id=mid, headers=c.headers,
                                                                 sign=sign)))
            while len(inflight) >= max(1, window):
                settle_one()
        while inflight:
            settle_one()
    except FedmqError:
        for _, p in inflight:
            p.cancel()
        raise


def _wait(p: PendingPublish, timeout: float | None, stop: threading.Event | None, grace_s: float | None,
          chunk_bytes: int | None, client: Client | None = None) -> None:
    try:
        try:
            p.wait(timeout, stop=stop)
        except NotConfirmed:
            if grace_s is None or stop is None or not stop.is_set() or (client is not None and client.closing):
                raise
            p.wait(grace_s)  # the work is done: let its confirm arrive
    except MessageTooLarge as exc:
        if chunk_bytes is None:
            raise
        raise MessageTooLarge(f"{exc}; the chunks are --chunk-bytes {chunk_bytes} ({format_bytes(chunk_bytes)}): "
                              "lower it", reply_code=exc.reply_code) from None


class StreamFollower:
    """Hands ``handler`` the whole payloads read from stream ``queue`` (on the client's I/O thread).

    Subscribe with ``handler=follower.on_delivery`` and ``arguments=follower.arguments``; with
    ``attached=False`` when the subscription is made ``paused`` (then :meth:`attach` starts it).
    """

    def __init__(self, client: Client, queue: str, handler: Callable[[Delivery], None], *,
                 max_payload_bytes: int, timeout_s: float = 600.0, max_open: int = 2,
                 clock: Callable[[], float] = time.monotonic, attached: bool = True) -> None:
        self.client = client
        self.queue = queue
        self.handler = handler
        self.clock = clock
        self.reassembler: chunking.Reassembler[None] = chunking.Reassembler(
            max_payload_bytes=max_payload_bytes, timeout_s=timeout_s, max_open=max_open)
        self._rewind: int | None = None
        self._rewound: set[str] = set()
        self._lock = threading.Lock()  # orders attach / detach (caller) against a rewind (I/O thread)
        self._detached = not attached  # attached=False: the subscription is made ``paused``
        self._until: Callable[[], bool] | None = None
        self.satisfied = False  # it detached itself: ``until`` was true
        self.skipped = 0
        self.rewinds = 0  # times it attached again at a payload's first chunk
        self.attaches = 0  # times :meth:`attach` subscribed
        self.first_offset: int | None = None  # the stream offset of the first message read since attach
        self.deliveries = 0  # messages (whole payloads or chunks) read from the stream
        self.bytes_read = 0  # their bodies' bytes

    def attach(self, *, fresh: bool = True, offset: int | None = None, until: Callable[[], bool] | None = None) -> None:
        """Subscribe (the subscription was made ``paused``): at ``offset``, else ``fresh`` at ``last``
        (rewound to the first chunk of a payload it lands in), else after the last message read.

        ``until``: asked on the I/O thread after each whole payload is handed over; once it is
        true the follower detaches itself there and then (:attr:`satisfied`), so that versions
        published while its reader moves on are not delivered (at 256 workers a fetch that
        waited for the worker thread's detach read five models for the one it needed).
        """
        with self._lock:
            self._detached = False
            self._until = until
            self.satisfied = False
            self._rewind = offset
            self.first_offset = None
            self.attaches += 1
            self.client.resume(self.queue, fresh=fresh)

    @property
    def attached(self) -> bool:
        """Whether it reads the stream now: attached, and not detached since (by itself or by a caller)."""
        return not self._detached

    @property
    def fetching(self) -> bool:
        """Whether it is attached with an ``until`` (reading for a caller that waits), not reading on."""
        return not self._detached and self._until is not None

    def detach(self) -> None:
        """Cancel the consumer (idempotent): nothing published from now on is delivered. Messages
        already in flight still arrive and are handled."""
        with self._lock:
            self._until = None
            self._detached = True
            self.client.pause(self.queue)

    def _handed(self) -> None:
        """A whole payload was handed over: detach if ``until`` says so."""
        until = self._until
        if until is not None and until():
            self.satisfied = True
            self.detach()

    def arguments(self) -> dict[str, Any]:
        """The consumer arguments of the next (re)subscription: a pending rewind once, else ``last``."""
        offset, self._rewind = self._rewind, None
        return {"x-stream-offset": offset if offset is not None else "last"}

    def on_delivery(self, delivery: Delivery) -> None:
        self.deliveries += 1
        self.bytes_read += len(delivery.body)
        headers = delivery.headers
        if self.first_offset is None and _is_int(headers.get(STREAM_OFFSET_HEADER)):
            self.first_offset = int(headers[STREAM_OFFSET_HEADER])
        if not chunking.is_chunk(headers):
            self.handler(delivery)
            self._handed()
            return
        now = self.clock()
        for gone in self.reassembler.expire(now):
            self._skip(f"payload {gone.payload_id}: {gone.reason}")
        pid, index, offset = (headers.get(chunking.ID_HEADER), headers.get(chunking.INDEX_HEADER),
                              headers.get(STREAM_OFFSET_HEADER))
        if (isinstance(pid, str) and _is_int(index) and index > 0 and _is_int(offset)
                and offset - index >= 0 and not self.reassembler.seen(pid) and pid not in self._rewound):
            # attached in the middle of a payload: read it again from its first chunk
            with self._lock:
                if self._detached:
                    return  # a chunk in flight after detach: nothing more is wanted
                if len(self._rewound) > 64:
                    self._rewound.clear()
                self._rewound.add(pid)
                self._rewind = int(offset - index)
                self.rewinds += 1
                log.info("stream %s: attached at chunk %d of payload %s; reading it again from offset %d",
                         self.queue, index, pid, offset - index)
                self.client.pause(self.queue)
                self.client.resume(self.queue)
            return
        for out in self.reassembler.offer(headers, delivery.body, None, now, redelivered=delivery.redelivered):
            if isinstance(out, chunking.Complete):
                self.handler(dataclasses.replace(delivery, body=out.body, headers=out.headers,
                                                 message_id=out.payload_id, sha256=out.sha256))
                self._handed()
            elif isinstance(out, chunking.Refused | chunking.Incomplete):
                self._skip(f"payload {out.payload_id}: {out.reason}")

    def _skip(self, what: str) -> None:
        self.skipped += 1
        if self.skipped <= 20 or self.skipped % 100 == 0:
            log.warning("stream %s: skipping %s", self.queue, what)


def _is_int(value: Any) -> TypeGuard[int]:
    """An integer header (AMQP long ints decode to a subclass of int), not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)
