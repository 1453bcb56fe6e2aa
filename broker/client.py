"""One RabbitMQ connection owned by one I/O thread, safe to use from any other thread.

pika is not thread-safe. A :class:`Client` runs its ``BlockingConnection`` in a private I/O
thread; every other thread talks to it only through :meth:`publish`, :meth:`ack`,
:meth:`reject`, :meth:`pause` and :meth:`resume`, which queue an operation and wake the I/O
thread with ``add_callback_threadsafe`` (the one cross-thread call pika allows). Consumer
handlers run on the I/O thread and must only hand the delivery over (put it on a queue).

Delivery guarantees:

* every publish is persistent, ``mandatory`` and confirmed; :meth:`publish` returns only once
  the broker confirmed it. The I/O thread sends whatever is queued without waiting for earlier
  confirms, which come back while it goes on (:mod:`fedmq.broker.confirms`). A publish that was
  in flight when the connection died is sent again after reconnecting (at-least-once; consumers
  dedupe on ids);
* acks are manual; a :class:`Delivery` remembers the channel generation it came from, and
  an ack or reject for a delivery of a dead channel is dropped (the broker redelivers it);
* on connection loss the I/O thread backs off (1 s doubling to 30 s), reconnects, redeclares
  the topology and resubscribes.

Errors (see :mod:`fedmq.shared.errors` for the taxonomy) are typed from AMQP reply codes,
never from the broker's wording, and a permanent one is never retried in a loop:

* a publish the broker refuses for good (406 PRECONDITION_FAILED: over ``max_message_size``;
  403 ACCESS_REFUSED; 404 NOT_FOUND: a missing exchange) fails that publish only (its
  :meth:`PendingPublish.wait` raises :class:`~fedmq.shared.errors.MessageTooLarge`,
  ``AccessRefused`` or ``NotFound``); the broker closed the channel, so the client opens a new
  one on the same connection for the rest of its work (a new generation: deliveries of the
  old channel come again) and does not send that message again. The close names
  ``basic.publish`` as its cause but not which publish: with several in flight, they are sent
  again one at a time, so that the refusal then has one culprit. A close caused by anything
  else (e.g. an ack of an unknown delivery tag) fails no publish;
* a body over the maximum message size (see :mod:`fedmq.broker.settings`) is refused by
  :meth:`publish_nowait` before anything is sent;
* waiting for a confirm has a deadline (``BrokerSettings.confirm_timeout_s`` unless given)
  and ends early on :meth:`close` or the caller's stop event
  (:class:`~fedmq.shared.errors.NotConfirmed`);
* declaring the topology or subscribing fails for good on 403, 404, 405 and 406: from
  :meth:`start` at once, and after a reconnect by giving up (the I/O thread stops, every
  waiter gets the error, :attr:`Client.failure` holds it and ``on_failure`` is called), except
  a refused login and a queue held exclusively by another connection, which may be left over
  from our own previous connection and are retried for ``refused_retry_s`` first;
* everything else (a lost socket, a missed heartbeat, 320 CONNECTION_FORCED, 541
  INTERNAL_ERROR, a channel the broker closed for its own reasons) is a
  :class:`~fedmq.shared.errors.ConnectionLost`: reconnect (or reopen the channel) with backoff.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pika
import pika.exceptions as pex

from fedmq.broker import frames
from fedmq.broker.confirms import InFlight
from fedmq.broker.failover import connect_first
from fedmq.broker.settings import (
    MAX_MESSAGE_BYTES_ENV,
    RABBITMQ3_MAX_MESSAGE_BYTES,
    BrokerSettings,
    default_max_message_bytes,
    format_bytes,
    mask_text,
    mask_url,
)
from fedmq.broker.tls import describe_tls_failure, find_ssl_error, ssl_context
from fedmq.broker.topology import Topology
from fedmq.shared.errors import (
    AccessRefused,
    BrokerError,
    ConnectionLost,
    LoginRefused,
    MessageTooLarge,
    NamespaceLocked,
    NotConfirmed,
    NotFound,
    PreconditionFailed,
    PublishRefused,
    ResourceLocked,
    TLSRefused,
    Unroutable,
)

log = logging.getLogger("fedmq.broker")

#: a stream consumer's start offset (argument), and each stream message's offset (header)
STREAM_OFFSET = "x-stream-offset"

# the connection (not only a channel) is gone
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    pex.AMQPConnectionError,
    pex.ConnectionWrongStateError,
    pex.StreamLostError,
    pex.ConnectionClosed,
    OSError,
)
# a channel is gone; the connection may be fine
_CHANNEL_ERRORS: tuple[type[BaseException], ...] = (pex.ChannelClosed, pex.ChannelWrongStateError)

# AMQP reply codes that no retry can fix; every other code is a ConnectionLost
_PERMANENT_CODES: dict[int, type[BrokerError]] = {
    311: MessageTooLarge,  # CONTENT_TOO_LARGE
    403: AccessRefused,  # ACCESS_REFUSED
    404: NotFound,  # NOT_FOUND
    405: ResourceLocked,  # RESOURCE_LOCKED
    406: PreconditionFailed,  # PRECONDITION_FAILED
    530: AccessRefused,  # NOT_ALLOWED (e.g. a vhost that does not exist)
}


class SetupError(ConnectionLost):
    """Connected, but declaring the topology or subscribing failed for a reason that may pass
    (e.g. RabbitMQ 3.10 answers a consume on a quorum queue whose replica is not up yet with
    541 INTERNAL_ERROR). Permanent setup failures raise their own classes."""


#: how long close() lets the confirms of publishes sent before it come in
_CLOSE_CONFIRM_S = 2.0
#: the most body bytes sent and not yet confirmed at once (a publish is always sent when nothing
#: is in flight): each is copied into the connection's output as it is sent
IN_FLIGHT_BYTES = 16 * 1024 * 1024


class _ChannelReset(Exception):
    """The broker closed the channel because of a publish: with the error it was failed with when
    that publish is known, or with None when it was one of several in flight, which are then sent
    again one at a time (see ``Client._refused``)."""


def reply_code(exc: BaseException) -> int | None:
    """The AMQP reply code of a pika channel or connection close, else None."""
    if isinstance(exc, pex.ChannelClosed | pex.ConnectionClosed):
        return int(exc.reply_code)
    return None


def describe(exc: BaseException) -> str:
    """A pika failure in a few words: the broker's reply where it sent one, passwords masked."""
    if isinstance(exc, pex.ChannelClosed | pex.ConnectionClosed):
        return mask_text(f"{exc.reply_code} {exc.reply_text}")
    return mask_text(str(exc) or type(exc).__name__)


#: RabbitMQ's 404 for a durable queue whose node is not up yet ("home node 'n@h' of durable queue
#: 'q' in vhost '/' is down or inaccessible"): seen while a restarted node starts its queues
_NODE_DOWN = "is down or inaccessible"


def classify(
    exc: BaseException,
    doing: str,
    *,
    hints: Mapping[int, str] | None = None,
    transient: type[ConnectionLost] = ConnectionLost,
) -> BrokerError:
    """The typed error for a pika failure while ``doing`` something (e.g. "declaring ...").

    The class comes from the AMQP reply code alone (see ``_PERMANENT_CODES``); a failure
    without a code (a lost socket, a missed heartbeat) or with another code is ``transient``.
    ``hints`` adds what to do for a code.
    """
    if isinstance(exc, BrokerError):
        return exc
    code = reply_code(exc)
    cls: type[BrokerError] = _PERMANENT_CODES.get(code, transient) if code is not None else transient
    if code == 404 and _NODE_DOWN in describe(exc):
        # a durable queue whose home node (or stream member) is restarting: it comes back; retry
        cls = transient
    message = f"{doing} failed: {describe(exc)}"
    hint = (hints or {}).get(code) if code is not None else None
    if hint:
        message += f"; {hint}"
    return cls(message, reply_code=code)


@dataclass(frozen=True)
class Delivery:
    """A message handed to a consumer handler.

    ``body`` is ``bytes``, or for a body over :data:`fedmq.broker.frames.LARGE_BODY_BYTES` a
    read-only ``memoryview`` of the buffer it was received into: this delivery's own, never
    reused or written by the client once handed over.
    """

    queue: str
    body: bytes | memoryview
    delivery_tag: int
    redelivered: bool
    generation: int
    message_id: str | None
    headers: Mapping[str, Any]
    timestamp: int | None = None
    user_id: str | None = None  # validated by RabbitMQ: the publisher's user name, when it set one
    #: a chunked payload's SHA-256, computed from its bytes as it was put together (the chunks of
    #: a signed payload carry one), so that its signature's check need not hash it again; else b""
    sha256: bytes = b""


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
    expires_s: float | None = None  # a private queue that outlives its connection for this long
    consumer_tag: str | None = None
    # a stream: the offset after the last message handled, where a resubscription resumes
    next_offset: int | None = None
    # consumed on a channel of its own, closed to stop (a stream consumer attached on demand: a
    # basic.cancel makes pika reject the deliveries it still holds, which a stream refuses by
    # closing the connection)
    own_channel: bool = False
    channel: Any = None


@dataclass(eq=False)
class _Publish:
    exchange: str
    routing_key: str
    body: bytes | memoryview  # a memoryview: a chunk of a payload (fedmq.broker.chunked), not copied
    properties: pika.BasicProperties
    mandatory: bool
    done: threading.Event = field(default_factory=threading.Event)
    error: BrokerError | None = None
    sending: bool = False  # the I/O thread is sending it now
    withdrawn: bool = False  # its waiter gave up: do not send it (again)

    @property
    def target(self) -> str:
        return f"exchange {self.exchange!r}" if self.exchange else f"queue {self.routing_key!r}"

    def key(self) -> tuple[str, str, str | None]:
        """What a ``basic.return`` names: exchange, routing key, message id."""
        return self.exchange, self.routing_key, self.properties.message_id

    def size(self) -> int:
        return len(self.body)


class PendingPublish:
    """A publish handed to the I/O thread; :meth:`wait` returns once the broker confirmed it."""

    def __init__(self, pub: _Publish, client: Client) -> None:
        self._pub = pub
        self._client = client

    @property
    def done(self) -> bool:
        return self._pub.done.is_set()

    def wait(self, timeout: float | None = None, *, stop: threading.Event | None = None) -> None:
        """Return once the broker confirmed the publish; raise if it did not.

        Raises the publish's own error (:class:`~fedmq.shared.errors.MessageTooLarge`,
        ``Unroutable``, ``PublishRefused``, ``AccessRefused``, ``NotFound``), the client's
        failure if it gave up, or :class:`~fedmq.shared.errors.NotConfirmed` once ``timeout``
        seconds passed (``BrokerSettings.confirm_timeout_s`` when None), ``stop`` was set, or
        the client was closed. The publish itself stays queued after a NotConfirmed (a later
        wait may still see it confirmed); :meth:`cancel` withdraws it.
        """
        pub, client = self._pub, self._client
        limit = client.settings.confirm_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        while not pub.done.wait(max(0.0, min(0.25, deadline - time.monotonic()))):
            if client.failure is not None:
                raise client.failure
            if client.closing:
                raise NotConfirmed(f"the client closed before the broker confirmed the publish to {pub.target}")
            if stop is not None and stop.is_set():
                raise NotConfirmed(f"stopped before the broker confirmed the publish to {pub.target}")
            if time.monotonic() >= deadline:
                raise NotConfirmed(
                    f"the broker did not confirm the publish to {pub.target} within {limit:g} s "
                    f"(is RabbitMQ at {client.settings.masked_url} up? see the warnings before this one)"
                )
        if pub.error is not None:
            raise pub.error

    def cancel(self) -> bool:
        """Withdraw the publish unless it is being sent or was sent; True if withdrawn."""
        return self._client._withdraw(self._pub)


def translate_connect_error(settings: BrokerSettings, exc: BaseException, url: str | None = None) -> BrokerError:
    """Turn a pika connection failure into one clear sentence of the right class."""
    where = mask_url(url) if url else settings.masked_url
    tls_error = find_ssl_error(exc)
    if tls_error is not None:
        return TLSRefused(describe_tls_failure(tls_error, where, settings))
    if isinstance(exc, pex.ProbableAuthenticationError | pex.AuthenticationError):
        how = ("the client certificate (EXTERNAL: is there a user named like the certificate's subject?)"
               if settings.tls_external else f"the credentials of user {settings.username!r}")
        return LoginRefused(
            f"RabbitMQ at {where} refused {how} (check the user, password and vhost in --amqp-url)",
            reply_code=403,
        )
    if isinstance(exc, pex.ProbableAccessDeniedError):
        return LoginRefused(
            f"RabbitMQ at {where} refused user {settings.username!r} access to the vhost "
            "(check the vhost in --amqp-url, and the user's permissions on it)",
            reply_code=530,
        )
    if isinstance(exc, pex.IncompatibleProtocolError):
        # also what pika says when a broker drops the socket while starting or stopping
        return ConnectionLost(f"{where} did not answer AMQP 0-9-1 (is it a RabbitMQ port?)")
    return ConnectionLost(f"cannot reach RabbitMQ at {where}: {_root_cause(exc)}")


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


def connection_parameters(settings: BrokerSettings, name: str, url: str | None = None) -> pika.URLParameters:
    """pika's parameters for one address (``url``, default: the first of ``settings``)."""
    url = url or settings.urls[0]
    parts = urlsplit(url)
    if settings.tls_external and parts.username and parts.password is None:
        # EXTERNAL: the user comes from the certificate; pika cannot parse a user without password
        params = pika.URLParameters(urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])))
    else:
        params = pika.URLParameters(url)
    params.heartbeat = settings.heartbeat_s
    params.blocked_connection_timeout = settings.blocked_connection_timeout_s
    params.connection_attempts = 1
    params.socket_timeout = settings.connect_timeout_s
    params.stack_timeout = settings.connect_timeout_s * 2
    params.client_properties = {"connection_name": name}
    frames.ask_frame_max(params)  # the broker's frame_max caps it (see fedmq.broker.frames)
    if parts.scheme == "amqps":
        params.ssl_options = pika.SSLOptions(ssl_context(settings), server_hostname=parts.hostname)
        if settings.tls_external:
            params.credentials = pika.credentials.ExternalCredentials()
    return params


def open_connection(settings: BrokerSettings, name: str = "fedmq") -> pika.BlockingConnection:
    """Open a blocking connection or raise a :class:`BrokerError` subclass with a clear message."""
    return open_connection_at(settings, name)[0]


def open_connection_at(settings: BrokerSettings, name: str = "fedmq",
                       start: int = 0) -> tuple[pika.BlockingConnection, int]:
    """Connect to the first of ``settings.urls`` that accepts us, trying them from ``start``
    (see :mod:`fedmq.broker.failover`); the connection and the index of its address."""

    def connect(url: str) -> pika.BlockingConnection:
        try:
            conn = pika.BlockingConnection(connection_parameters(settings, name, url))
        except (pex.AMQPError, OSError) as exc:
            raise translate_connect_error(settings, exc, url) from None
        frames.tune(conn)  # large bodies straight from the socket into one buffer
        return conn

    return connect_first(settings.urls, start, connect, mask_url)


def server_properties(conn: pika.BlockingConnection) -> dict[str, Any]:
    """What the broker announced in ``connection.start`` (product, version, ...)."""
    props = getattr(getattr(conn, "_impl", None), "server_properties", None)
    return dict(props) if isinstance(props, Mapping) else {}


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
        self._identity = settings.identity  # parsed from the URL once, not per publish
        self.declare = declare
        self._subs: dict[str, _Subscription] = {}
        self._ops: collections.deque[Callable[[], None]] = collections.deque()
        self._publishes: collections.deque[_Publish] = collections.deque()
        # sent on the current channel, not confirmed yet (see fedmq.broker.confirms)
        self._inflight: InFlight[_Publish] = InFlight(_Publish.key, _Publish.size)
        # how many of the queued publishes to send one at a time (after a channel close that
        # refused one of several in flight: the next refusal then has one culprit)
        self._careful = 0
        #: the most publishes sent and not yet confirmed at once (sent together, confirmed as they come)
        self.most_in_flight = 0
        self._lock = threading.Lock()
        # a wake is on its way to the I/O thread that will drain everything queued so far (see _queue)
        self._woken = False
        self._conn: pika.BlockingConnection | None = None
        self._chan: Any = None
        self._generation = 0
        self._closing = threading.Event()
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BrokerError | None = None
        self._broker_max_bytes: int | None = None
        self._qos: int | None = None  # the prefetch the channel gives new consumers (one RPC less per consume)
        self._broker_version = ""
        self._backoff = settings.reconnect_initial_s
        self.reconnects = 0
        # which of settings.urls we are (or were last) connected to, and where to start next
        self._node = 0
        self._next_node = 0
        #: called on the I/O thread with the new generation after a reconnect or a reopened channel
        self.on_reconnect: Callable[[int], None] | None = None
        #: called on the I/O thread once the client gave up on a permanent error
        self.on_failure: Callable[[BrokerError], None] | None = None

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
        expires_s: float | None = None,
        own_channel: bool = False,
    ) -> None:
        """Consume ``queue`` (now if connected, and after every reconnect).

        ``arguments`` may be a callable, evaluated at every (re)subscription (e.g. a stream
        offset). With ``settle_on_return`` the client acks each delivery as soon as the
        handler returns: for streams, whose acks are only flow-control credit.
        With ``bind_exchange`` the queue is a private one, declared and bound to that exchange
        at every (re)connection and consumed exclusively: exclusive and auto-delete, or, with
        ``expires_s``, durable and kept by the broker while unused for up to ``expires_s``
        seconds (``x-expires``, a quorum queue, so that a cluster node's loss does not take it), so that what is sent to it while the connection is down (a
        broker restart included) waits for the reconnect; :meth:`close` deletes it. With
        ``own_channel`` (a stream paused and resumed often) the consumer has a channel of its own,
        opened by :meth:`resume` and closed by :meth:`pause`: closing drops the deliveries in
        flight, where cancelling would reject them and a stream closes the connection on a reject.
        """
        args = arguments if callable(arguments) or arguments is None else (lambda a=arguments: a)
        sub = _Subscription(
            # a quorum queue (expires_s) takes no exclusive consumer; its name is ours alone anyway
            queue, handler, prefetch, args, exclusive or (bool(bind_exchange) and expires_s is None), paused,
            settle_on_return, bind_exchange, expires_s, own_channel=own_channel,
        )
        self._subs[queue] = sub
        if self._thread is not None:
            self._submit(lambda: self._consume(sub))

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> Client:
        """Connect, then run; raise a :class:`BrokerError` subclass if that fails.

        Setting up can fail transiently while queues are being created by other processes
        (:class:`SetupError`; also a quorum queue answering 541 INTERNAL_ERROR to a consume when
        a thousand workers subscribe at once), and a queue held exclusively may still belong to
        a connection the broker is closing (:class:`~fedmq.shared.errors.ResourceLocked`, e.g. a
        killed aggregator's lock); those are retried, backing off with jitter (so that a herd
        of clients spreads out), for up to ``refused_retry_s``. Anything else is raised at once:
        an unreachable broker, a refused login, missing permissions, a namespace declared with
        other arguments, another aggregator holding the namespace's lock.
        """
        deadline = time.monotonic() + self.settings.refused_retry_s
        backoff = 0.2
        while True:
            try:
                self._connect()
                break
            except (SetupError, ResourceLocked) as exc:
                pause = backoff * random.uniform(0.5, 1.0)
                if time.monotonic() + pause > deadline:
                    raise
                log.info("%s; retrying", exc)
                time.sleep(pause)  # backing off before reconnecting: nothing to wait on
                backoff = min(backoff * 2, self.settings.reconnect_max_s)
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-io", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        self._closing.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._fail_pending(NotConfirmed("the client closed before the broker confirmed the publish"))

    def __enter__(self) -> Client:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def node_url(self) -> str:
        """The address (password masked) of the node we are, or were last, connected to."""
        return mask_url(self.settings.urls[self._node % len(self.settings.urls)])

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    @property
    def failure(self) -> BrokerError | None:
        """The permanent error the client gave up on, or None while it works (or retries)."""
        return self._failure

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def max_message_bytes(self) -> int:
        """The largest body :meth:`publish` sends (see :mod:`fedmq.broker.settings`)."""
        return self.settings.max_message_bytes or self._broker_max_bytes or RABBITMQ3_MAX_MESSAGE_BYTES

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    # ---------------------------------------------------------------- thread-safe API
    def publish(
        self,
        routing_key: str,
        body: bytes | memoryview,
        *,
        exchange: str = "",
        message_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
        mandatory: bool = True,
        timeout: float | None = None,
        stop: threading.Event | None = None,
        sign: bool = False,
    ) -> None:
        """Publish persistently and return once the broker confirmed it.

        With ``sign`` the message carries ``user_id`` = our user name, which RabbitMQ checks
        against the connection's user: consumers can trust who sent it.

        Raises what :meth:`publish_nowait` and :meth:`PendingPublish.wait` raise; a publish
        not confirmed in time (``timeout``, default ``confirm_timeout_s``) or before ``stop``
        is set is withdrawn if it was not sent yet. Never call from a handler.
        """
        pending = self.publish_nowait(
            routing_key, body, exchange=exchange, message_id=message_id, headers=headers,
            mandatory=mandatory, sign=sign,
        )
        try:
            pending.wait(timeout, stop=stop)
        except NotConfirmed:
            pending.cancel()
            raise

    def publish_nowait(
        self,
        routing_key: str,
        body: bytes | memoryview,
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
        Raises :class:`~fedmq.shared.errors.MessageTooLarge` at once for a body over
        :attr:`max_message_bytes`, and the client's failure if it gave up.
        """
        if self._failure is not None:
            raise self._failure
        if self._closing.is_set():
            raise NotConfirmed("the client is closed: nothing more is published")
        target = f"exchange {exchange!r}" if exchange else f"queue {routing_key!r}"
        limit = self.max_message_bytes
        if len(body) > limit:
            raise MessageTooLarge(
                f"a {format_bytes(len(body))} message for {target} is over the maximum message size "
                f"of {format_bytes(limit)} ({self._limit_source()}); raise RabbitMQ's max_message_size "
                f"(rabbitmq.conf; at most 512 MiB) and set {MAX_MESSAGE_BYTES_ENV} to the same value, "
                "or send less (a smaller model)"
            )
        props = pika.BasicProperties(
            delivery_mode=2,
            message_id=message_id,
            headers=dict(headers) if headers else None,
            timestamp=int(time.time()),
            content_type="application/msgpack",
            user_id=self._identity if sign else None,
        )
        pub = _Publish(exchange, routing_key, body, props, mandatory)
        self._queue(self._publishes, pub)
        return PendingPublish(pub, self)

    def ack(self, delivery: Delivery) -> None:
        self._settle(delivery, lambda ch: ch.basic_ack(delivery.delivery_tag))

    def reject(self, delivery: Delivery, *, requeue: bool) -> None:
        """Reject: ``requeue=False`` dead-letters, ``True`` returns it to the queue."""
        self._settle(
            delivery, lambda ch: ch.basic_reject(delivery.delivery_tag, requeue=requeue)
        )

    def pause(self, queue: str) -> None:
        """Stop receiving from ``queue`` (deliveries already received stay unacked).

        Called by a handler of an ``own_channel`` subscription (on the I/O thread), its channel is
        closed at once: the delivery being handled is not acked (no credit for another one) and
        nothing more is dispatched to it.
        """
        sub = self._subs[queue]
        sub.paused = True
        if sub.own_channel and threading.current_thread() is self._thread:
            self._cancel(sub)
        else:
            self._submit(lambda: self._cancel(sub))

    def resume(self, queue: str, *, fresh: bool = False) -> None:
        """Receive from ``queue`` again. A stream resumes after the last message handled, unless
        ``fresh``: then from the offset its subscription's ``arguments`` name (e.g. ``last``)."""
        sub = self._subs[queue]
        if sub.paused:
            sub.paused = False

            def op() -> None:
                if fresh:
                    sub.next_offset = None
                self._consume(sub)

            self._submit(op)

    def call(self, fn: Callable[[Any], Any], timeout: float = 30.0) -> Any:
        """Run ``fn(channel)`` on the I/O thread and return its result (admin operations).

        A broker refusal comes back typed (e.g. :class:`~fedmq.shared.errors.NotFound` for a
        purge of a missing queue); the client then reopens its channel by itself.
        """
        if self._failure is not None:
            raise self._failure
        box: dict[str, Any] = {}
        done = threading.Event()

        def op() -> None:
            try:
                if self._chan is None:
                    raise ConnectionLost(f"not connected to {self.settings.masked_url}")
                box["value"] = fn(self._chan)
            except (pex.AMQPError, OSError) as exc:
                box["error"] = classify(exc, "a broker operation")
            except BaseException as exc:  # handed back to the caller
                box["error"] = exc
            done.set()

        self._submit(op)
        deadline = time.monotonic() + timeout
        while not done.wait(max(0.0, min(0.25, deadline - time.monotonic()))):
            if self._failure is not None:
                raise self._failure
            if time.monotonic() >= deadline or self._closing.is_set():
                raise ConnectionLost(f"broker operation did not finish within {timeout:.0f} s")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    # ---------------------------------------------------------------- internals
    def _limit_source(self) -> str:
        if self.settings.max_message_bytes:
            return f"max_message_bytes / {MAX_MESSAGE_BYTES_ENV}"
        if self._broker_version:
            return f"the default of RabbitMQ {self._broker_version}"
        return "the default of RabbitMQ 3.x"

    def _settle(self, delivery: Delivery, action: Callable[[Any], None]) -> None:
        def op() -> None:
            if delivery.generation != self._generation or self._chan is None:
                log.info(
                    "dropping settle of delivery %s from a dead channel; the broker redelivers it",
                    delivery.delivery_tag,
                )
                return
            action(self._chan)

        self._submit(op)

    def _submit(self, op: Callable[[], None]) -> None:
        self._queue(self._ops, op)

    def _queue(self, where: collections.deque[Any], item: Any) -> None:
        """Queue an op or a publish for the I/O thread, waking it only if no wake is on its way.

        A wake costs a pipe write here and a read there, and an aggregator queues several acks
        and publishes per update: once woken, the I/O thread :meth:`_drain` s both queues to empty,
        and it clears ``_woken`` under the lock *before* it looks at them, so an item queued
        before the clear is drained by that pass, and one queued after it wakes the thread again.
        """
        with self._lock:
            where.append(item)
            wake = self._claim_wake(True)
        if wake:
            self._wake()

    def _claim_wake(self, needed: bool) -> bool:
        """Under ``_lock``: whether to wake the I/O thread (``needed`` and no wake on its way yet)."""
        wake = needed and not self._woken
        self._woken = self._woken or wake
        return wake

    def _wake(self) -> None:
        conn = self._conn
        if conn is None:
            return
        with contextlib.suppress(Exception):  # closed connection: the op runs after reconnect
            conn.add_callback_threadsafe(lambda: None)

    def _withdraw(self, pub: _Publish) -> bool:
        with self._lock:
            pub.withdrawn = True
            if pub.sending or pub.done.is_set():
                return False
            with contextlib.suppress(ValueError):
                self._publishes.remove(pub)
        pub.error = pub.error or NotConfirmed(f"the publish to {pub.target} was withdrawn")
        pub.body = b""
        pub.done.set()
        return True

    def _connect(self) -> None:
        conn, self._node = open_connection_at(self.settings, self.name, self._next_node)
        self._next_node = self._node
        props = server_properties(conn)
        self._broker_max_bytes = default_max_message_bytes(props)
        version = props.get("version", b"")
        self._broker_version = version.decode(errors="replace") if isinstance(version, bytes) else str(version)
        try:
            self._setup_channel(conn)
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        self._conn = conn
        self._connected.set()

    def _setup_channel(self, conn: pika.BlockingConnection) -> None:
        """Open a confirming channel on ``conn``, declare the topology and subscribe.

        Starts a new generation. Raises a typed error (see :func:`classify`) and leaves no
        channel behind if any step fails.
        """
        self._chan = None
        try:
            chan = conn.channel()
            frames.tune_channel(chan)
            inflight = self._confirm_on(chan)
            chan.add_on_cancel_callback(self._on_broker_cancel)
        except (pex.AMQPError, OSError) as exc:
            raise classify(exc, "opening a channel", transient=SetupError) from None
        ns = self.topology.namespace
        user = self.settings.username
        try:
            if self.declare:
                try:
                    self.topology.declare(chan)
                except (pex.AMQPError, OSError) as exc:
                    raise classify(exc, f"declaring namespace {ns!r}", transient=SetupError, hints={
                        403: f"give user {user!r} configure permission on the namespace's names "
                             f"('^{ns}\\.'), or declare it with another user and use --no-declare",
                        406: "an entity of that name exists with other arguments "
                             f"(`fedmq broker delete --namespace {ns}` removes the namespace)",
                    }) from None
            self._generation += 1
            self._chan = chan
            self._inflight = inflight
            self._qos = None
            for sub in self._subs.values():
                sub.consumer_tag = None
                sub.channel = None
                if not sub.paused:
                    self._consume(sub)
        except BaseException:
            self._chan = None
            with contextlib.suppress(Exception):
                chan.close()
            raise
        self._connected.set()

    def _consume(self, sub: _Subscription) -> None:
        if self._chan is None or sub.consumer_tag is not None or sub.paused:
            return
        generation = self._generation
        chan = self._chan
        if sub.own_channel:
            if sub.channel is None or not sub.channel.is_open:
                try:
                    sub.channel = chan.connection.channel()
                    sub.channel.add_on_cancel_callback(self._on_broker_cancel)
                except (pex.AMQPError, OSError) as exc:
                    raise classify(exc, f"opening a channel for queue {sub.queue!r}", transient=SetupError) from None
            chan = sub.channel

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
                offset = delivery.headers.get(STREAM_OFFSET)
                # an int (pika's own ``long`` subclass of it for AMQP long-longs)
                if isinstance(offset, int) and not isinstance(offset, bool) and (
                        sub.next_offset is None or offset >= sub.next_offset):
                    sub.next_offset = int(offset) + 1
                if sub.own_channel and not ch.is_open:
                    return  # dispatched after we closed its channel (detached): nothing to settle
                ch.basic_ack(method.delivery_tag)

        try:
            if sub.bind_exchange:
                if sub.expires_s is None:
                    chan.queue_declare(sub.queue, exclusive=True, auto_delete=True, durable=False)
                else:  # replicated, so that it outlives the loss of a cluster node too
                    chan.queue_declare(sub.queue, durable=True, arguments={
                        "x-queue-type": "quorum", "x-expires": max(1000, int(sub.expires_s * 1000))})
                chan.queue_bind(sub.queue, sub.bind_exchange)
            if sub.own_channel:
                chan.basic_qos(prefetch_count=sub.prefetch)
            elif self._qos != sub.prefetch:  # a consumer paused and resumed (sync tasks) repeats it
                chan.basic_qos(prefetch_count=sub.prefetch)
                self._qos = sub.prefetch
            arguments = dict(sub.arguments()) if sub.arguments else None
            start = arguments.get(STREAM_OFFSET) if arguments is not None else None
            explicit = isinstance(start, int) and not isinstance(start, bool)
            if arguments is not None and start is not None and not explicit and sub.next_offset is not None:
                # a resubscription (after a reconnect, possibly to another node): go on after
                # the last message handled, so that none is skipped or handled twice; an offset
                # number the subscriber asks for is its own choice (a stream follower reading a
                # chunked payload again from its first chunk), and is honoured
                arguments[STREAM_OFFSET] = sub.next_offset
            sub.consumer_tag = chan.basic_consume(
                sub.queue,
                on_message,
                auto_ack=False,
                exclusive=sub.exclusive,
                arguments=arguments,
            )
        except (pex.AMQPError, OSError) as exc:
            raise self._consume_error(exc, sub, chan) from None

    def _consume_error(self, exc: BaseException, sub: _Subscription, chan: Any) -> BrokerError:
        code = reply_code(exc)
        ns, queue = self.topology.namespace, sub.queue
        locked = code == 405 or (code == 403 and sub.exclusive and self._held_by_another(chan, queue))
        if locked and queue == self.topology.lock:
            return NamespaceLocked(
                f"another aggregator is running on namespace {ns!r} (it holds the lock queue "
                f"{queue!r}); stop it first, or use another --namespace",
                reply_code=code,
            )
        if locked:
            return ResourceLocked(
                f"queue {queue!r} is held exclusively by another connection ({describe(exc)})",
                reply_code=code,
            )
        return classify(exc, f"subscribing to queue {queue!r}", transient=SetupError, hints={
            403: f"give user {self.settings.username!r} read permission on it",
            404: f"declare namespace {ns!r} first (start the aggregator, or run "
                 f"`fedmq broker setup --namespace {ns}`), or check --namespace",
        })

    @staticmethod
    def _held_by_another(chan: Any, queue: str) -> bool:
        """Whether ``queue`` has a consumer (a 403 on an exclusive consume then means: taken)."""
        try:
            probe = chan.connection.channel()
            try:
                ok = probe.queue_declare(queue, passive=True)
            finally:
                with contextlib.suppress(Exception):
                    probe.close()
        except Exception:  # noqa: BLE001 (no answer: not known to be held)
            return False
        return int(ok.method.consumer_count) > 0

    def _on_broker_cancel(self, frame: Any) -> None:
        """The broker cancelled one of our consumers (e.g. its queue's leader or the stream
        replica it read went away with a cluster node): subscribe again (streams from the
        offset their ``arguments`` give). If that fails, the channel is reopened with backoff."""
        tag = getattr(getattr(frame, "method", None), "consumer_tag", None)
        for sub in self._subs.values():
            if sub.consumer_tag is not None and sub.consumer_tag == tag:
                log.warning("the broker cancelled our consumer on %s; subscribing again", sub.queue)
                sub.consumer_tag = None
                self._submit(functools.partial(self._consume, sub))

    def _cancel(self, sub: _Subscription) -> None:
        if sub.own_channel:
            self._close_own(sub)
        elif self._chan is not None and sub.consumer_tag is not None:
            self._chan.basic_cancel(sub.consumer_tag)
        sub.consumer_tag = None

    @staticmethod
    def _close_own(sub: _Subscription) -> None:
        """Close a subscription's own channel without cancelling its consumer first.

        BlockingChannel.close() cancels its consumers, rejecting (requeue) the deliveries it holds
        undispatched, and a stream answers a reject by closing the connection (540 NOT_IMPLEMENTED):
        closing the underlying channel sends no reject; its deliveries then go nowhere.
        """
        chan, sub.channel = sub.channel, None
        impl = getattr(chan, "_impl", None)
        if impl is not None and impl.is_open:
            with contextlib.suppress(Exception):
                impl.close()

    def _check_channel(self) -> None:
        """Raise the broker's reason if it closed our channel (pika only notes it)."""
        chan = self._chan
        if chan is not None and chan.is_closed:
            reason = getattr(chan, "_closing_reason", None)
            if isinstance(reason, pex.ChannelClosedByBroker) and len(self._inflight):
                self._refused(reason)
            if isinstance(reason, pex.ChannelClosed):
                raise reason
            raise pex.ChannelWrongStateError("the channel is closed")

    def _drain(self) -> None:
        with self._lock:
            self._woken = False  # from here on, whatever is queued is drained now or wakes us again
        while True:
            with self._lock:
                op = self._ops.popleft() if self._ops else None
            if op is None:
                break
            op()
            self._check_channel()
        chan = self._chan
        while chan is not None:
            with self._lock:
                pub = None
                while self._publishes and pub is None:
                    head = self._publishes[0]
                    if head.withdrawn:  # its waiter gave up before we sent it
                        self._publishes.popleft()
                        head.error = head.error or NotConfirmed(f"the publish to {head.target} was withdrawn")
                        head.body = b""
                        head.done.set()
                    elif self._held_back(head):
                        return  # sent once confirms come in (_on_confirm wakes us)
                    else:
                        pub = self._publishes.popleft()
                        pub.sending = True
            if pub is None:
                return
            try:
                # sent without waiting for its confirm (see fedmq.broker.confirms): it comes to
                # _on_confirm while we go on
                chan._impl.basic_publish(
                    pub.exchange,
                    pub.routing_key,
                    # pika takes bytes only: a chunk (a view) is copied here, one at a time
                    pub.body if isinstance(pub.body, bytes) else bytes(pub.body),
                    properties=pub.properties,
                    mandatory=pub.mandatory,
                )
            except BaseException:
                with self._lock:  # not sent: first again on the next channel
                    pub.sending = False
                    self._publishes.appendleft(pub)
                raise
            self._inflight.sent(pub)
            self.most_in_flight = max(self.most_in_flight, len(self._inflight))

    def _held_back(self, pub: _Publish) -> bool:
        """Whether ``pub`` waits for confirms of what is in flight: one at a time after a refusal
        (see :meth:`_refused`), and at most :data:`IN_FLIGHT_BYTES` of bodies at once, so that a
        chunked model queued whole is not copied into the connection's output all at once."""
        inflight = self._inflight
        if not len(inflight):
            return False
        return bool(self._careful) or inflight.bytes + pub.size() > IN_FLIGHT_BYTES

    def _confirm_on(self, chan: Any) -> InFlight[_Publish]:
        """Put ``chan`` in confirm mode, its confirms and returns kept by a new :class:`InFlight`.

        Not ``BlockingChannel.confirm_delivery``: its ``basic_publish`` then waits for each
        confirm before it returns, so publishes would go one broker round trip at a time.
        """
        impl = chan._impl
        inflight: InFlight[_Publish] = InFlight(_Publish.key, _Publish.size)
        # no callback: Confirm.Select is sent without waiting for its SelectOk; the broker takes
        # the channel's frames in order, so every publish after it is confirmed
        impl.confirm_delivery(ack_nack_callback=functools.partial(self._on_confirm, inflight))
        impl.add_on_return_callback(functools.partial(self._on_return, inflight))

        def on_close(frame: Any) -> None:  # beside pika's own handler: it keeps only code and text
            inflight.closed_by = (int(frame.method.class_id), int(frame.method.method_id))

        impl.callbacks.add(impl.channel_number, pika.spec.Channel.Close, on_close, True)
        return inflight

    def _on_confirm(self, inflight: InFlight[_Publish], frame: Any) -> None:
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        for done in inflight.settle(method.delivery_tag, multiple=bool(method.multiple), acked=acked):
            pub = done.publish
            if not done.acked:
                error: BrokerError | None = PublishRefused(
                    f"the broker refused a message for {pub.target} (is the queue full?)")
            elif done.returned:
                error = Unroutable(
                    f"the broker could not route a message to {pub.target} (is the topology declared?)",
                    reply_code=312,
                )
            else:
                error = None
            self._settled_in_flight(pub, error)
        # publishes held back (see _held_back) go now; close() waits for the last confirm
        with self._lock:
            wake = self._claim_wake(bool(self._publishes) or (self._closing.is_set() and not len(inflight)))
        if wake:
            self._wake()

    def _on_return(self, inflight: InFlight[_Publish], _channel: Any, method: Any, props: Any, _body: Any) -> None:
        if inflight.returned(method.exchange, method.routing_key, props.message_id) is None:
            log.warning("the broker returned a message to %r / %r that we have no publish for",
                        method.exchange, method.routing_key)

    def _refused(self, exc: pex.ChannelClosedByBroker) -> None:
        """The broker closed the channel with publishes in flight: fail the one it refused.

        Raises :class:`_ChannelReset` once the culprit is failed, or when the close refused one of
        several publishes: those are then sent again one at a time on the next channel. A close
        for something else (see :mod:`fedmq.broker.confirms`) returns: the caller reopens the
        channel and sends every unconfirmed publish again.
        """
        culprit = self._inflight.culprit()
        if culprit is not None:
            error = self._publish_error(exc, culprit)
            if error.retryable:
                return
            log.error("%s", error)
            self._inflight.forget(culprit)
            self._settled_in_flight(culprit, error)
            raise _ChannelReset(error) from None
        if self._inflight.refused_a_publish:
            self._careful = len(self._inflight)
            log.warning("the broker refused one of %d publishes in flight (%s); sending them again one at a time",
                        len(self._inflight), describe(exc))
            raise _ChannelReset(None) from None

    def _publish_error(self, exc: pex.ChannelClosedByBroker, pub: _Publish) -> BrokerError:
        code = reply_code(exc)
        if code in (406, 311):
            # A 406 on basic.publish is over max_message_size, or a user_id that is not the
            # connection's user: we only ever set our own user name, so it is the size.
            return MessageTooLarge(
                f"RabbitMQ refused a {format_bytes(len(pub.body))} message for {pub.target} "
                f"({describe(exc)}); raise its max_message_size (rabbitmq.conf; at most 512 MiB) "
                f"and set {MAX_MESSAGE_BYTES_ENV} to the same value so that fedmq refuses such a "
                "message before sending it, or send less (a smaller model)",
                reply_code=code,
            )
        return classify(exc, f"publishing to {pub.target}", hints={
            403: f"give user {self.settings.username!r} write permission on it",
            404: "declare the namespace first, or check --namespace",
        })

    def _settled_in_flight(self, pub: _Publish, error: BrokerError | None) -> None:
        """A publish that was in flight is settled: one fewer to send one at a time (see _refused)."""
        self._settle_publish(pub, error)
        if self._careful:
            self._careful -= 1

    def _settle_publish(self, pub: _Publish, error: BrokerError | None) -> None:
        with self._lock:
            pub.sending = False
        pub.error = error
        pub.body = b""  # confirmed (or refused): free it even if a handle outlives it
        pub.done.set()

    def _ensure_channel(self) -> None:
        """Reconnect, or reopen the channel, if either is gone."""
        if self._conn is None:
            self._connect()
            self.reconnects += 1
            log.warning("reconnected to %s", self.node_url)
        elif self._chan is None:
            self._setup_channel(self._conn)
            log.warning("reopened the channel to %s", self.node_url)
        else:
            return
        self._backoff = self.settings.reconnect_initial_s
        if self.on_reconnect is not None:
            self.on_reconnect(self._generation)

    def _run(self) -> None:
        refused_since: float | None = None
        while not self._closing.is_set():
            try:
                self._ensure_channel()
                refused_since = None
                self._drain()
                assert self._conn is not None
                self._conn.process_data_events(time_limit=1.0)
                self._check_channel()
                self._drain()
                continue
            except _ChannelReset:
                # that publish failed for good, and took the channel with it: open a new one now
                self._drop_channel(None)
                continue
            except BrokerError as exc:  # typed by setting up: maybe permanent
                error = exc
            except (*_CONNECTION_ERRORS, *_CHANNEL_ERRORS, pex.AMQPError) as exc:
                # at work (not set-up): the channel or connection died under us
                error = ConnectionLost(describe(exc), reply_code=reply_code(exc))
            except Exception as exc:  # a bug: fail loudly rather than leave waiters hanging
                log.exception("the broker client's I/O thread failed")
                self._give_up(BrokerError(f"internal error in the broker client: {exc!r}"))
                break
            if not error.retryable:
                now = time.monotonic()
                refused_since = refused_since or now
                leftover = isinstance(error, ResourceLocked | LoginRefused)
                if not leftover or now - refused_since >= self.settings.refused_retry_s:
                    self._give_up(error)
                    break
                log.warning("%s; retrying for up to %.0f s (our previous connection may still hold it)",
                            error, self.settings.refused_retry_s - (now - refused_since))
            if self._conn is not None and self._conn.is_open:
                self._drop_channel(error)
            else:
                self._lost(error)
            if self._closing.wait(self._backoff):
                break
            self._backoff = min(self._backoff * 2, self.settings.reconnect_max_s)
        self._shutdown()

    def _void_generation(self) -> None:
        """Deliveries of the current channel can no longer be settled: start a new generation."""
        self._connected.clear()
        self._chan = None
        self._generation += 1
        unconfirmed = self._inflight.take_all()
        with self._lock:  # sent again on the next channel, first and in their order
            for pub in reversed(unconfirmed):
                pub.sending = False
                self._publishes.appendleft(pub)
        for sub in self._subs.values():
            sub.consumer_tag = None
            self._close_own(sub)  # the connection may live on: no orphan channel
        with self._lock:
            # settles of the dead channel would be dropped anyway; keep only generic ops
            pending = list(self._ops)
            self._ops.clear()
        for op in pending:
            with contextlib.suppress(Exception):
                op()  # settle ops see the new generation and drop themselves

    def _drop_channel(self, error: BrokerError | None) -> None:
        if error is not None:
            log.warning("the broker closed the channel (%s); reopening it", error)
        chan = self._chan
        self._void_generation()
        if chan is not None and chan.is_open:
            with contextlib.suppress(Exception):
                chan.close()

    def _lost(self, error: BrokerError) -> None:
        if self._conn is not None:
            log.warning("lost the connection to %s (%s); reconnecting", self.node_url, error)
            # the node that went away is tried last (see fedmq.broker.failover)
            self._next_node = self._node + 1
        else:
            log.info("reconnect to %s failed: %s", self.settings.masked_url, error)
        conn, self._conn = self._conn, None
        self._void_generation()
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _give_up(self, error: BrokerError) -> None:
        log.error("giving up on RabbitMQ at %s: %s", self.settings.masked_url, error)
        self._failure = error
        conn, self._conn = self._conn, None
        self._void_generation()
        self._fail_pending(error)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
        if self.on_failure is not None:
            try:
                self.on_failure(error)
            except Exception:
                log.exception("the on_failure callback failed")

    def _shutdown(self) -> None:
        if self._conn is not None and self._chan is not None:
            with contextlib.suppress(Exception):
                self._drain()  # flush acks and publishes queued before close()
                # and let their confirms come (_on_confirm wakes us once the last one is in)
                deadline = time.monotonic() + _CLOSE_CONFIRM_S
                while len(self._inflight) and (left := deadline - time.monotonic()) > 0:
                    self._conn.process_data_events(time_limit=left)
                    self._check_channel()
            for sub in self._subs.values():
                if sub.bind_exchange and sub.expires_s is not None:
                    with contextlib.suppress(Exception):
                        self._chan.queue_delete(sub.queue)  # ours alone, and no longer wanted
        self._connected.clear()
        conn, self._conn, self._chan = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _fail_pending(self, error: BrokerError) -> None:
        with self._lock:
            pubs = [*self._inflight, *self._publishes]
            self._publishes.clear()
        for pub in pubs:
            pub.error = pub.error or error
            pub.body = b""
            pub.done.set()
