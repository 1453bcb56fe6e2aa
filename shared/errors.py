"""The one error hierarchy of fedmq.

Every error a user can cause (bad bytes, bad files, bad options, an unreachable broker)
is a ``FedmqError`` whose message says what is wrong and, where possible, what to do.
Library errors (pika, msgpack, numpy) are translated at the module boundary that sees them.

Broker errors say whether trying again can help (:attr:`BrokerError.retryable`) and carry the
AMQP reply code behind them where the broker gave one (:attr:`BrokerError.reply_code`):

==========================  ===========================================  ==========================
class                       AMQP reply code / cause                      what the client does
==========================  ===========================================  ==========================
``ConnectionLost``          320 CONNECTION_FORCED, 541 INTERNAL_ERROR,    reconnect with backoff
                            any other code, socket errors, missed
                            heartbeats (``SetupError`` is one, raised
                            while declaring or subscribing)
``NotConfirmed``            no confirm before the deadline, the stop      fail the wait; the caller
                            event or ``close()``                          may retry
``Unroutable``              312 NO_ROUTE (a mandatory publish returned)  fail that publish
``PublishRefused``          basic.nack (e.g. a full queue)               fail that publish
``AccessRefused``           403 ACCESS_REFUSED, 530 NOT_ALLOWED          give up
``LoginRefused``            the login itself refused (user, password,    give up
                            vhost)
``NotFound``                404 NOT_FOUND (a missing exchange or queue)  give up
``ResourceLocked``          405 RESOURCE_LOCKED, or 403 on an exclusive  give up (after a grace
                            consume of a queue another connection holds  period when reconnecting)
``NamespaceLocked``         that, on the namespace's lock queue:         give up
                            another aggregator is running
``PreconditionFailed``      406 PRECONDITION_FAILED (e.g. a queue that   give up
                            exists with other arguments)
``MessageTooLarge``         406 on a publish, 311 CONTENT_TOO_LARGE, or  fail that publish
                            over the client-side limit before sending
==========================  ===========================================  ==========================

"Give up" means the operation fails with a message that says what to fix; a client never
reconnect-loops on one of them.
"""

from __future__ import annotations


class FedmqError(Exception):
    """Root of every error fedmq raises on purpose.

    ``exit_code`` is the status a command exits with when this error stops it.
    """

    exit_code: int = 1


class DecodeError(FedmqError):
    """Bytes that are not a valid fedmq message (wrong schema, fields, dtypes, shapes, values, size)."""


class DataError(FedmqError):
    """A dataset, shard or partition request that cannot be honoured."""


class ConfigError(FedmqError):
    """An option, configuration file or plug-in reference that is invalid."""


class WorkerRefused(ConfigError):
    """A worker cannot take part in a run: its shard or trainer does not fit the announced
    model (feature count, classes, the trainer the model's spec names). Exit code 2."""

    exit_code = 2


class ValidationError(FedmqError):
    """A well-formed message whose content does not fit the model (shapes, version, values)."""


class BrokerError(FedmqError):
    """The broker cannot be reached, refused us, or dropped the connection.

    ``reply_code`` is the AMQP reply code the broker gave (None where it gave none);
    ``retryable`` says whether the same operation can succeed later without a change
    by the user.
    """

    retryable: bool = False

    def __init__(self, message: str = "", *, reply_code: int | None = None) -> None:
        super().__init__(message)
        self.reply_code = reply_code


class ConnectionLost(BrokerError):
    """The connection or channel went away (or never came up); reconnecting can help."""

    retryable = True


class TLSRefused(BrokerError):
    """The TLS handshake with the broker failed: an unknown CA, a certificate for another
    host, an expired one, or a refused client certificate. Permanent: the files or the
    host name need changing."""


class NotConfirmed(BrokerError):
    """Waiting for a publish confirm ended without one (deadline, stop or close).

    The message may or may not have reached the broker; publishing it again is safe for
    consumers that dedupe.
    """

    retryable = True


class Unroutable(BrokerError):
    """The broker returned a mandatory publish: no queue is bound for it (312 NO_ROUTE)."""

    retryable = True


class PublishRefused(BrokerError):
    """The broker nacked a publish (a full queue with ``reject-publish``, or an internal error)."""

    retryable = True


class AccessRefused(BrokerError):
    """The broker user may not do this (403 ACCESS_REFUSED, 530 NOT_ALLOWED)."""


class LoginRefused(AccessRefused):
    """The broker refused the login: wrong user or password, or no access to the vhost."""


class NotFound(BrokerError):
    """An exchange or queue does not exist (404 NOT_FOUND)."""


class ResourceLocked(BrokerError):
    """A queue is held exclusively by another connection (405 RESOURCE_LOCKED, or 403 on an
    exclusive consume of a queue that already has a consumer)."""


class NamespaceLocked(ResourceLocked):
    """Another aggregator holds the namespace's lock queue."""


class PreconditionFailed(BrokerError):
    """The broker refused an operation whose precondition does not hold (406 PRECONDITION_FAILED)."""


class MessageTooLarge(PreconditionFailed):
    """A message over the broker's (or the configured) maximum message size."""


class TrainingError(FedmqError):
    """A trainer raised while fitting or evaluating."""


class LockLost(FedmqError):
    """This aggregator no longer holds its namespace (another took over) or its run directory
    (another aggregator's incarnation is in its lock file): it stops without writing."""

