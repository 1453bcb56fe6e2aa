"""Publisher confirms in flight on one channel: which publish a broker's ack, nack or return is for.

The broker client sends every queued publish at once and lets their confirms come back while it
goes on reading, instead of waiting for each confirm before it sends the next publish (pika's
``BlockingChannel.basic_publish`` in confirm mode does that: a sync round's N task publishes then
cost N broker round trips, a quorum queue's write each, one after the other, and deliveries wait
behind them). This module is that bookkeeping, without I/O:

* publishes on a channel are numbered 1, 2, … in the order they are sent (the delivery tags the
  broker's ``basic.ack`` / ``basic.nack`` name; ``multiple`` settles every number up to the tag);
* a ``mandatory`` publish that reached no queue comes back as a ``basic.return`` *before* its ack:
  the return names the exchange and routing key (and carries the properties), and returns come in
  the order of the publishes, so it belongs to the oldest unconfirmed publish with that target and
  message id not already returned;
* a publish the broker refuses for good (406 over ``max_message_size`` or a foreign ``user_id``,
  403, 404) closes the channel. The ``channel.close`` names the method that caused it (class 60,
  method 40: ``basic.publish``) but not which publish: with one in flight, :meth:`InFlight.culprit`
  is that one; with several, every unconfirmed publish is sent again on the next channel one at a
  time until each is settled, so that a refusal then has one culprit. A close caused by anything
  else (e.g. an ack of an unknown delivery tag) is no publish's fault: unconfirmed publishes are
  sent again, as after a reconnect (at least once; consumers dedupe).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

P = TypeVar("P")

#: AMQP's ``basic.publish`` as (class id, method id): what a ``channel.close`` names as its cause
BASIC_PUBLISH = (60, 40)


@dataclass
class Settled(Generic[P]):
    """One publish the broker answered: ``acked`` (else nacked), ``returned`` (routed nowhere)."""

    publish: P
    acked: bool
    returned: bool


class InFlight(Generic[P]):
    """The unconfirmed publishes of one confirming channel, by delivery tag.

    ``target(p)`` gives a publish's ``(exchange, routing_key, message_id)``, which a return is
    matched against; ``size(p)`` its body's bytes, summed in :attr:`bytes`.
    """

    def __init__(self, target: Any, size: Any) -> None:
        self._target = target
        self._size = size
        #: the body bytes of the unconfirmed publishes
        self.bytes = 0
        self._next = 1
        #: delivery tag -> (publish, its body's bytes), oldest first
        self._sent: collections.OrderedDict[int, tuple[P, int]] = collections.OrderedDict()
        self._returned: set[int] = set()
        #: the (class id, method id) the broker's ``channel.close`` named as its cause, once closed
        self.closed_by: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self._sent)

    def __iter__(self) -> Iterator[P]:
        """The unconfirmed publishes, oldest first."""
        return iter([pub for pub, _ in self._sent.values()])

    def sent(self, publish: P) -> int:
        """Note a publish just sent; return its delivery tag."""
        tag = self._next
        self._next += 1
        size = self._size(publish)
        self._sent[tag] = (publish, size)
        self.bytes += size
        return tag

    def returned(self, exchange: str, routing_key: str, message_id: str | None) -> P | None:
        """Note a ``basic.return``; return the publish it is for (None if none matches)."""
        for tag, (pub, _) in self._sent.items():
            ex, key, mid = self._target(pub)
            if tag not in self._returned and ex == exchange and key == routing_key and mid == message_id:
                self._returned.add(tag)
                return pub
        return None

    def settle(self, tag: int, *, multiple: bool, acked: bool) -> list[Settled[P]]:
        """Note a ``basic.ack`` (``acked``) or ``basic.nack``; return the publishes it settles."""
        if multiple:
            tags = [t for t in self._sent if t <= tag]
        else:
            tags = [tag] if tag in self._sent else []
        done = []
        for t in tags:
            pub, size = self._sent.pop(t)
            self.bytes -= size
            returned = t in self._returned
            self._returned.discard(t)
            done.append(Settled(pub, acked, returned))
        return done

    def forget(self, publish: P) -> None:
        """Drop one publish (the broker refused it by closing the channel)."""
        for tag, (pub, size) in list(self._sent.items()):
            if pub is publish:
                del self._sent[tag]
                self.bytes -= size
                self._returned.discard(tag)

    def take_all(self) -> list[P]:
        """Forget every unconfirmed publish (the channel is gone) and return them, oldest first."""
        pubs = [pub for pub, _ in self._sent.values()]
        self._sent.clear()
        self._returned.clear()
        self.bytes = 0
        return pubs

    @property
    def refused_a_publish(self) -> bool:
        """The broker closed the channel because of a publish (and some are in flight)."""
        return self.closed_by == BASIC_PUBLISH and bool(self._sent)

    def culprit(self) -> P | None:
        """The publish the channel close refused, when that can be known: the only one in flight."""
        if self.refused_a_publish and len(self._sent) == 1:
            return next(iter(self._sent.values()))[0]
        return None
