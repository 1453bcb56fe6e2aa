"""``--require-user-id``: every update must carry the broker-validated user that sent it, and a
worker id belongs to the first user that used it.

RabbitMQ checks a message's ``user_id`` property against the user of the connection that
published it (and refuses the message if they differ) but only when the property is set, and a
user with the ``impersonator`` tag may set any. So with one broker user per worker and no
impersonators, ``user_id`` says who sent an update. This module decides, purely, whether an
update may count: it needs a ``user_id``, and its worker id must be bound to that user (the
first user seen with a worker id binds it; the binding is kept in the checkpoint, so it
survives ``--resume`` and a standby's takeover). The shell dead-letters a refused update with
the reason returned here.
"""

from __future__ import annotations

from collections.abc import Mapping


class IdentityBook:
    """Worker id -> the broker user bound to it."""

    def __init__(self, bound: Mapping[str, str] | None = None) -> None:
        self.bound: dict[str, str] = dict(bound or {})

    @staticmethod
    def unsigned(user_id: str | None) -> str | None:
        """Why a message without a ``user_id`` must not count (checked before decoding it)."""
        if user_id:
            return None
        return ("update carries no broker-validated user_id (--require-user-id: each worker "
                "publishes as its own RabbitMQ user)")

    def refuse(self, worker_id: str, user_id: str | None) -> str | None:
        """Why an update from ``worker_id`` published as ``user_id`` must not count, else None
        (binding ``worker_id`` to ``user_id`` if it was free)."""
        unsigned = self.unsigned(user_id)
        if unsigned is not None or user_id is None:
            return unsigned
        owner = self.bound.setdefault(worker_id, user_id)
        if owner != user_id:
            return (f"worker id {worker_id!r} belongs to broker user {owner!r}, but this update was "
                    f"published by user {user_id!r}")
        return None

    def to_meta(self) -> dict[str, str]:
        return dict(self.bound)
