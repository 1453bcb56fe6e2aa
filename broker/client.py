"""One RabbitMQ connection owned by one I/O thread, safe to use from any other thread.

pika is not thread-safe. A :class:`Client` runs its ``BlockingConnection`` in a private I/O
thread; every other thread talks to it only through :meth:`publish`, :meth:`ack`,
:meth:`reject`, :meth:`pause` and :meth:`resume`, which queue an operation and wake the I/O
thread with ``add_callback_threadsafe`` (the one cross-thread call pika allows). Consumer
handlers run on the I/O thread and must only hand the delivery over (put it on a queue).

Delivery guarantees:

* every publish is persistent, ``mandatory`` and confirmed; :meth:`publish` returns only once
  the broker confirmed it. A publish that was in flight when the connection died is sent
  again after reconnecting (at-least-once; consumers dedupe on ids);
* acks are manual; a :class:`Delivery` remembers the connection generation it came from, and
  an ack or reject for a delivery of a dead connection is dropped (the broker redelivers it);
* on connection loss the I/O thread backs off (1 s doubling to 30 s), reconnects, redeclares
  the topology and resubscribes.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions as pex

from fedmq.broker.settings import BrokerSettings, mask_text
from fedmq.broker.topology import Topology
from fedmq.shared.errors import BrokerError

log = logging.getLogger("fedmq.broker")

_CONNECTION_ERRORS = (
    pex.AMQPConnectionError,
    pex.ConnectionWrongStateError,
    pex.StreamLostError,
    pex.ChannelClosed,
    pex.ChannelWrongStateError,
    pex.ConnectionClosed,
    OSError,
)


class SetupError(BrokerError):
    """Connected, but declaring the topology or subscribing failed."""


@dataclass(frozen=True)
class Delivery:
    """A message handed to a consumer handler."""

    queue: str
    body: bytes
    delivery_tag: int
    redelivered: bool
    generation: int
    message_id: str | None
    headers: Mapping[str, Any]
    timestamp: int | None = None
    user_id: str | None = None  # validated by RabbitMQ: the publisher's user name, when it set one


@dataclass
class _Subscription:
    queue: str
    handler: Callable[[Delivery], None]
    prefetch: int
    arguments: Callable[[], dict[str, Any]] | None
    exclusive: bool
    paused: bool = False
    settle_on_return: bool = False
    bind_exchange: str | None = None
    consumer_tag: str | None = None


@dataclass
class _Publish:
    exchange: str
    routing_key: str
    body: bytes
    properties: pika.BasicProperties
    mandatory: bool
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class PendingPublish:
    """A publish handed to the I/O thread; :meth:`wait` returns once the broker confirmed it."""

    def __init__(self, pub: _Publish, closing: threading.Event) -> None:
        self._pub = pub
        self._closing = closing

    @property
    def done(self) -> bool:
        return self._pub.done.is_set()

    def wait(self, timeout: float | None = None) -> None:
        pub = self._pub
        deadline = None if timeout is None else time.monotonic() + timeout
        while not pub.done.wait(0.5 if deadline is None else max(0.0, deadline - time.monotonic())):
            if self._closing.is_set():
                raise BrokerError("client closed before the broker confirmed the publish")
            if deadline is not None and time.monotonic() >= deadline:
                raise BrokerError(
                    f"publish to {pub.exchange or pub.routing_key!r} not confirmed within {timeout:.0f} s"
                )
        if pub.error is not None:
            raise pub.error if isinstance(pub.error, BrokerError) else BrokerError(str(pub.error))


def translate_connect_error(settings: BrokerSettings, exc: BaseException) -> BrokerError:
    """Turn a pika connection failure into one clear sentence."""
    where = settings.masked_url
    if isinstance(exc, pex.ProbableAuthenticationError | pex.ProbableAccessDeniedError):
        return BrokerError(
            f"RabbitMQ at {where} refused the credentials of user {settings.username!r} "
            "(check the user, password and vhost in --amqp-url)"
        )
    if isinstance(exc, pex.IncompatibleProtocolError):
        return BrokerError(f"{where} did not answer AMQP 0-9-1 (is it a RabbitMQ port?)")
    return BrokerError(f"cannot reach RabbitMQ at {where}: {_root_cause(exc)}")


def _root_cause(exc: BaseException) -> str:
    """The innermost reason pika wrapped (e.g. 'Connection refused'), passwords masked."""
    inner: object = exc
    while isinstance(inner, BaseException) and inner.args and isinstance(inner.args[0], BaseException):
        inner = inner.args[0]
    text = repr(inner) if isinstance(inner, BaseException) else str(inner)
    if "ConnectionRefusedError" in text:
        return "connection refused (is RabbitMQ running and listening there?)"
    if "gaierror" in text or "Name or service not known" in text:
        return "unknown host"
    if "timed out" in text.lower() or "Timeout" in text:
        return "timed out"
    return mask_text(text or type(exc).__name__)


def connection_parameters(settings: BrokerSettings, name: str) -> pika.URLParameters:
    params = pika.URLParameters(settings.url)
    params.heartbeat = settings.heartbeat_s
    params.blocked_connection_timeout = settings.blocked_connection_timeout_s
    params.connection_attempts = 1
    params.socket_timeout = settings.connect_timeout_s
    params.stack_timeout = settings.connect_timeout_s * 2
    params.client_properties = {"connection_name": name}
    return params


def open_connection(settings: BrokerSettings, name: str = "fedmq") -> pika.BlockingConnection:
    """Open a blocking connection or raise :class:`BrokerError` with a clear message."""
    try:
        return pika.BlockingConnection(connection_parameters(settings, name))
    except (pex.AMQPError, OSError) as exc:
        raise translate_connect_error(settings, exc) from None


class Client:
    """A reconnecting, confirm-everything RabbitMQ client run by its own I/O thread."""

    def __init__(
        self,
        settings: BrokerSettings,
        topology: Topology,
        *,
        name: str = "fedmq",
        declare: bool = True,
    ) -> None:
        self.settings = settings
        self.topology = topology
        self.name = name
        self.declare = declare
        self._subs: dict[str, _Subscription] = {}
        self._ops: collections.deque[Callable[[], None]] = collections.deque()
        self._publishes: collections.deque[_Publish] = collections.deque()
        self._lock = threading.Lock()
        self._conn: pika.BlockingConnection | None = None
        self._chan: Any = None
        self._generation = 0
        self._closing = threading.Event()
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self.reconnects = 0
        self.on_reconnect: Callable[[int], None] | None = None

    # ---------------------------------------------------------------- configuration
    def subscribe(
        self,
        queue: str,
        handler: Callable[[Delivery], None],
        *,
        prefetch: int = 1,
        arguments: Callable[[], dict[str, Any]] | dict[str, Any] | None = None,
        exclusive: bool = False,
        paused: bool = False,
        settle_on_return: bool = False,
        bind_exchange: str | None = None,
    ) -> None:
        """Consume ``queue`` (now if connected, and after every reconnect).

        ``arguments`` may be a callable, evaluated at every (re)subscription (e.g. a stream
        offset). With ``settle_on_return`` the client acks each delivery as soon as the
        handler returns: for streams, whose acks are only flow-control credit.
        With ``bind_exchange`` the queue is a private one (exclusive, auto-delete), declared
        and bound to that exchange at every (re)connection.
        """
        args = arguments if callable(arguments) or arguments is None else (lambda a=arguments: a)
        sub = _Subscription(
            queue, handler, prefetch, args, exclusive or bool(bind_exchange), paused,
            settle_on_return, bind_exchange,
        )
        self._subs[queue] = sub
        if self._thread is not None:
            self._submit(lambda: self._consume(sub))

    # ---------------------------------------------------------------- lifecycle
    def start(self, setup_attempts: int = 5) -> Client:
        """Connect (raising :class:`BrokerError` if the broker is unreachable), then run.

        Setting up can fail transiently while queues are being created by other processes
        (RabbitMQ 3.10 answers a consume on a quorum queue whose replica is not up yet with an
        internal error); that part is retried a few times.
        """
        for attempt in range(setup_attempts):
            try:
                self._connect()
                break
            except SetupError as exc:
                if attempt == setup_attempts - 1:
                    raise
                log.info("%s; retrying", exc)
                time.sleep(0.2 * 2**attempt)  # backing off before reconnecting: nothing to wait on
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-io", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        self._closing.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._fail_pending(BrokerError("client closed"))

    def __enter__(self) -> Client:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def generation(self) -> int:
        return self._generation

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    # ---------------------------------------------------------------- thread-safe API
    def publish(
        self,
        routing_key: str,
        body: bytes,
        *,
        exchange: str = "",
        message_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
        mandatory: bool = True,
        timeout: float | None = None,
        sign: bool = False,
    ) -> None:
        """Publish persistently and return once the broker confirmed it.

        With ``sign`` the message carries ``user_id`` = our user name, which RabbitMQ checks
        against the connection's user: consumers can trust who sent it.

        Raises :class:`BrokerError` if the broker returned (unroutable) or nacked it, or if
        it is not confirmed within ``timeout`` seconds. Never call from a handler.
        """
        self.publish_nowait(
            routing_key, body, exchange=exchange, message_id=message_id, headers=headers,
            mandatory=mandatory, sign=sign,
        ).wait(timeout)

    def publish_nowait(
        self,
        routing_key: str,
        body: bytes,
        *,
        exchange: str = "",
        message_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
        mandatory: bool = True,
        sign: bool = False,
    ) -> PendingPublish:
        """Queue a publish and return at once; ``.wait()`` on the result for its confirm.

        Lets a caller overlap its own work with the broker's confirm (the aggregator waits
        for its model and task publishes only before it acks, at the next checkpoint).
        """
        props = pika.BasicProperties(
            delivery_mode=2,
            message_id=message_id,
            headers=dict(headers) if headers else None,
            timestamp=int(time.time()),
            content_type="application/msgpack",
            user_id=self.settings.username if sign else None,
        )
        pub = _Publish(exchange, routing_key, body, props, mandatory)
        with self._lock:
            self._publishes.append(pub)
        self._wake()
        return PendingPublish(pub, self._closing)

    def ack(self, delivery: Delivery) -> None:
        self._settle(delivery, lambda ch: ch.basic_ack(delivery.delivery_tag))

    def reject(self, delivery: Delivery, *, requeue: bool) -> None:
        """Reject: ``requeue=False`` dead-letters, ``True`` returns it to the queue."""
        self._settle(
            delivery, lambda ch: ch.basic_reject(delivery.delivery_tag, requeue=requeue)
        )

    def pause(self, queue: str) -> None:
        """Stop receiving from ``queue`` (deliveries already received stay unacked)."""
        sub = self._subs[queue]
        sub.paused = True
        self._submit(lambda: self._cancel(sub))

    def resume(self, queue: str) -> None:
        sub = self._subs[queue]
        if sub.paused:
            sub.paused = False
            self._submit(lambda: self._consume(sub))

    def call(self, fn: Callable[[Any], Any], timeout: float = 30.0) -> Any:
        """Run ``fn(channel)`` on the I/O thread and return its result (admin operations)."""
        box: dict[str, Any] = {}
        done = threading.Event()

        def op() -> None:
            try:
                box["value"] = fn(self._chan)
            except BaseException as exc:  # handed back to the caller
                box["error"] = exc
            done.set()

        self._submit(op)
        if not done.wait(timeout):
            raise BrokerError(f"broker operation did not finish within {timeout:.0f} s")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    # ---------------------------------------------------------------- internals
    def _settle(self, delivery: Delivery, action: Callable[[Any], None]) -> None:
        def op() -> None:
            if delivery.generation != self._generation or self._chan is None:
                log.info(
                    "dropping settle of delivery %s from a dead connection; the broker redelivers it",
                    delivery.delivery_tag,
                )
                return
            action(self._chan)

        self._submit(op)

    def _submit(self, op: Callable[[], None]) -> None:
        with self._lock:
            self._ops.append(op)
        self._wake()

    def _wake(self) -> None:
        conn = self._conn
        if conn is None:
            return
        with contextlib.suppress(Exception):  # closed connection: the op runs after reconnect
            conn.add_callback_threadsafe(lambda: None)

    def _connect(self) -> None:
        conn = open_connection(self.settings, self.name)
        try:
            chan = conn.channel()
            chan.confirm_delivery()
            if self.declare:
                self.topology.declare(chan)
            self._generation += 1
            self._conn, self._chan = conn, chan
            for sub in self._subs.values():
                sub.consumer_tag = None
                if not sub.paused:
                    self._consume(sub)
        except (pex.AMQPError, OSError) as exc:
            self._conn = self._chan = None
            with contextlib.suppress(Exception):
                conn.close()
            raise SetupError(f"cannot set up the topology or consumers: {mask_text(str(exc) or type(exc).__name__)}") from None
        self._connected.set()

    def _consume(self, sub: _Subscription) -> None:
        if self._chan is None or sub.consumer_tag is not None or sub.paused:
            return
        generation = self._generation
        chan = self._chan

        def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
            delivery = Delivery(
                queue=sub.queue,
                body=body,
                delivery_tag=method.delivery_tag,
                redelivered=bool(method.redelivered),
                generation=generation,
                message_id=props.message_id,
                headers=props.headers or {},
                timestamp=props.timestamp,
                user_id=props.user_id,
            )
            try:
                sub.handler(delivery)
            except Exception:
                if sub.settle_on_return:  # streams cannot reject: skip the message
                    log.exception("handler for %s failed; skipping the message", sub.queue)
                else:
                    log.exception("handler for %s failed; returning the message", sub.queue)
                    ch.basic_reject(method.delivery_tag, requeue=True)
                    return
            if sub.settle_on_return:
                ch.basic_ack(method.delivery_tag)

        if sub.bind_exchange:
            chan.queue_declare(sub.queue, exclusive=True, auto_delete=True, durable=False)
            chan.queue_bind(sub.queue, sub.bind_exchange)
        chan.basic_qos(prefetch_count=sub.prefetch)
        sub.consumer_tag = chan.basic_consume(
            sub.queue,
            on_message,
            auto_ack=False,
            exclusive=sub.exclusive,
            arguments=sub.arguments() if sub.arguments else None,
        )

    def _cancel(self, sub: _Subscription) -> None:
        if self._chan is not None and sub.consumer_tag is not None:
            self._chan.basic_cancel(sub.consumer_tag)
        sub.consumer_tag = None

    def _drain(self) -> None:
        while True:
            with self._lock:
                op = self._ops.popleft() if self._ops else None
            if op is None:
                break
            op()
        while True:
            with self._lock:
                pub = self._publishes[0] if self._publishes else None
            if pub is None:
                return
            try:
                self._chan.basic_publish(
                    pub.exchange,
                    pub.routing_key,
                    pub.body,
                    properties=pub.properties,
                    mandatory=pub.mandatory,
                )
            except pex.UnroutableError:
                pub.error = BrokerError(
                    f"the broker could not route a message to {pub.exchange or pub.routing_key!r}"
                    " (is the topology declared?)"
                )
            except pex.NackError:
                pub.error = BrokerError(
                    f"the broker refused a message for {pub.exchange or pub.routing_key!r}"
                    " (queue full or message too large)"
                )
            # a connection error propagates: the publish stays queued and is sent again
            with self._lock:
                self._publishes.popleft()
            pub.body = b""  # confirmed (or refused): free it even if a handle outlives it
            pub.done.set()

    def _run(self) -> None:
        backoff = self.settings.reconnect_initial_s
        while not self._closing.is_set():
            try:
                if self._conn is None:
                    self._connect()
                    self.reconnects += 1
                    log.warning("reconnected to %s", self.settings.masked_url)
                    if self.on_reconnect is not None:
                        self.on_reconnect(self._generation)
                    backoff = self.settings.reconnect_initial_s
                self._drain()
                assert self._conn is not None
                self._conn.process_data_events(time_limit=1.0)
                self._drain()
            except (*_CONNECTION_ERRORS, BrokerError) as exc:
                self._lost(exc)
                if self._closing.wait(backoff):
                    break
                backoff = min(backoff * 2, self.settings.reconnect_max_s)
        self._shutdown()

    def _lost(self, exc: BaseException) -> None:
        if self._conn is not None:
            log.warning(
                "lost the connection to %s (%s); reconnecting",
                self.settings.masked_url,
                mask_text(str(exc) or type(exc).__name__),
            )
        else:
            log.info("reconnect to %s failed: %s", self.settings.masked_url, mask_text(str(exc)))
        self._connected.clear()
        conn, self._conn, self._chan = self._conn, None, None
        # delivery tags of the dead channel are void from here on
        self._generation += 1
        with self._lock:
            # settles of the dead channel would be dropped anyway; keep only generic ops
            pending = list(self._ops)
            self._ops.clear()
        for op in pending:
            with contextlib.suppress(Exception):
                op()  # settle ops see the new generation and drop themselves
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _shutdown(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(*_CONNECTION_ERRORS):
                self._drain()  # flush acks and publishes queued before close()
        self._connected.clear()
        conn, self._conn, self._chan = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _fail_pending(self, error: BrokerError) -> None:
        with self._lock:
            pubs = list(self._publishes)
            self._publishes.clear()
        for pub in pubs:
            pub.error = error
            pub.done.set()
