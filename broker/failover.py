"""Which broker node to try next: the order of a comma-separated ``--amqp-url``.

A client tries the addresses in the order given, starting with the first; once connected to
node ``i``, a reconnect after losing it starts with node ``i + 1`` and wraps around, so the
node that just went away is tried last, not first. Every client of a federation therefore
prefers the first address while all nodes are up (easy to reason about, and the order a user
wrote is the order of preference), and moves on at once when its node is lost. Quorum queues
and streams are reached from any node, so which node a client sits on decides nothing but
where its socket goes.

Pure: no pika, no sockets; :func:`connect_first` takes the function that opens one address.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from fedmq.shared.errors import BrokerError, ConnectionLost

T = TypeVar("T")


def attempt_order(count: int, start: int) -> list[int]:
    """Indexes ``start, start+1, ..., count-1, 0, ..., start-1`` (every address once)."""
    if count <= 0:
        return []
    start %= count
    return [(start + k) % count for k in range(count)]


def connect_first(
    urls: Sequence[str], start: int, connect: Callable[[str], T], describe: Callable[[str], str]
) -> tuple[T, int]:
    """Open the first address (in :func:`attempt_order` from ``start``) that accepts us.

    Returns what ``connect`` returned and the index of that address. With one address its
    error is raised as it is. With several and none accepting, raises one error naming every
    address and why it failed: a :class:`~fedmq.shared.errors.LoginRefused` (or another
    permanent error) if any node refused us for good, since every node of a cluster shares its
    users; else a :class:`~fedmq.shared.errors.ConnectionLost`.
    """
    if len(urls) == 1:
        return connect(urls[0]), 0
    errors: list[tuple[str, BrokerError]] = []
    for i in attempt_order(len(urls), start):
        try:
            return connect(urls[i]), i
        except BrokerError as exc:
            errors.append((urls[i], exc))
    why = "; ".join(f"{describe(url)}: {exc}" for url, exc in errors)
    permanent = next((exc for _, exc in errors if not exc.retryable), None)
    if permanent is not None:
        raise type(permanent)(f"none of the {len(urls)} broker nodes accepted us: {why}",
                              reply_code=permanent.reply_code)
    raise ConnectionLost(f"none of the {len(urls)} broker nodes answered: {why}")
