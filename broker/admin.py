"""Operator views of a namespace: queue status, workers heard from, dead letters.

These are short-lived, single-threaded sessions (CLI commands, tests), so they use a plain
blocking connection rather than the threaded :class:`fedmq.broker.client.Client`.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any

import pika.exceptions as pex

from fedmq.broker.client import classify, open_connection
from fedmq.broker.settings import BrokerSettings, mask_text
from fedmq.broker.topology import Topology
from fedmq.shared import messages
from fedmq.shared.errors import DecodeError


@dataclass(frozen=True)
class QueueStatus:
    name: str
    kind: str
    ready: int | None
    unacked: int | None
    consumers: int | None
    exists: bool = True


@dataclass(frozen=True)
class WorkerSeen:
    worker_id: str
    last_kind: str
    last_seen_s_ago: float
    info: dict[str, Any]


@dataclass(frozen=True)
class DeadLetter:
    queue: str
    message_id: str | None
    reason: str
    detail: str
    count: int
    size: int


class Admin:
    """A blocking session for inspecting and managing one namespace."""

    def __init__(self, settings: BrokerSettings, topology: Topology) -> None:
        self.settings = settings
        self.topology = topology
        self._conn: Any = None

    def __enter__(self) -> Admin:
        self._conn = open_connection(self.settings, "fedmq-admin")
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()

    def _channel(self) -> Any:
        return self._conn.channel()

    # ------------------------------------------------------------------ topology
    def setup(self) -> None:
        chan = self._channel()
        ns = self.topology.namespace
        try:
            self.topology.declare(chan)
        except pex.ChannelClosedByBroker as exc:
            raise classify(exc, f"declaring namespace {ns!r}", hints={
                403: f"give user {self.settings.username!r} configure permission on '^{ns}\\.'",
                406: "an entity exists with other arguments; `fedmq broker delete` removes it",
            }) from None
        finally:
            with contextlib.suppress(Exception):
                chan.close()

    def delete(self) -> None:
        """Delete every queue and exchange of the namespace (streams hold disk)."""
        for name in self.topology.queues:
            chan = self._channel()
            with contextlib.suppress(pex.ChannelClosedByBroker):
                chan.queue_delete(name)
            with contextlib.suppress(Exception):
                chan.close()
        for ex in (self.topology.dlx, self.topology.control):
            chan = self._channel()
            with contextlib.suppress(pex.ChannelClosedByBroker):
                chan.exchange_delete(ex)
            with contextlib.suppress(Exception):
                chan.close()

    # ------------------------------------------------------------------ status
    def queue_status(self) -> list[QueueStatus]:
        unacked = self._management_unacked()
        out = []
        for name, args in self.topology.declarations():
            kind = str(args.get("x-queue-type", "classic"))
            chan = self._channel()
            try:
                ok = chan.queue_declare(name, passive=True)
            except pex.ChannelClosedByBroker:
                out.append(QueueStatus(name, kind, None, None, None, exists=False))
                continue
            out.append(
                QueueStatus(
                    name,
                    kind,
                    ok.method.message_count,
                    unacked.get(name),
                    ok.method.consumer_count,
                )
            )
            with contextlib.suppress(Exception):
                chan.close()
        return out

    def _management_unacked(self) -> dict[str, int]:
        """Unacked counts from the management API when it is enabled (AMQP does not tell)."""
        url = urllib.parse.urlsplit(self.settings.url)
        vhost = urllib.parse.quote(urllib.parse.unquote(url.path[1:] or "/"), safe="")
        api = f"http://{url.hostname}:15672/api/queues/{vhost}"
        token = base64.b64encode(
            f"{urllib.parse.unquote(url.username or 'guest')}:"
            f"{urllib.parse.unquote(url.password or 'guest')}".encode()
        ).decode()
        req = urllib.request.Request(api, headers={"Authorization": f"Basic {token}"})
        try:
            with urllib.request.urlopen(req, timeout=1.0) as resp:  # noqa: S310 (http only)
                rows = json.load(resp)
        except (OSError, ValueError, urllib.error.URLError):
            return {}
        return {
            r["name"]: int(r.get("messages_unacknowledged", 0))
            for r in rows
            if isinstance(r, dict) and "name" in r
        }

    def workers_seen(self, window_s: float = 120.0, idle_s: float = 0.5) -> list[WorkerSeen]:
        """Workers that published hello/heartbeat/bye on the presence stream recently."""
        chan = self._channel()
        since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=window_s)
        latest: dict[str, messages.Control] = {}
        chan.basic_qos(prefetch_count=500)
        try:
            for method, _props, body in chan.consume(
                self.topology.presence,
                auto_ack=False,
                arguments={"x-stream-offset": since.replace(tzinfo=None)},
                inactivity_timeout=idle_s,
            ):
                if method is None:
                    break
                chan.basic_ack(method.delivery_tag)
                try:
                    msg = messages.decode(body, expect=messages.Control)
                except DecodeError:
                    continue
                assert isinstance(msg, messages.Control)
                if msg.worker_id:
                    latest[msg.worker_id] = msg
        except pex.ChannelClosedByBroker:
            return []
        finally:
            with contextlib.suppress(Exception):
                chan.close()
        now = time.time()
        return sorted(
            (
                WorkerSeen(wid, m.kind, round(now - m.sent_s, 1), dict(m.info))
                for wid, m in latest.items()
                if now - m.sent_s <= window_s
            ),
            key=lambda w: w.worker_id,
        )

    # ------------------------------------------------------------------ dead letters
    def dead_letters(self, limit: int = 1000) -> list[DeadLetter]:
        """List dead-lettered messages without removing them."""
        out: list[DeadLetter] = []
        for queue in self.topology.dead_letter_queues.values():
            chan = self._channel()
            try:
                for _ in range(limit):
                    method, props, body = chan.basic_get(queue, auto_ack=False)
                    if method is None:
                        break
                    out.append(_dead_letter(queue, props, body))
            except pex.ChannelClosedByBroker:
                continue
            finally:
                with contextlib.suppress(Exception):
                    chan.close()  # closing the channel returns every message un-acked
        return out

    def purge_dead_letters(self) -> dict[str, int]:
        counts = {}
        for queue in self.topology.dead_letter_queues.values():
            chan = self._channel()
            try:
                counts[queue] = chan.queue_purge(queue).method.message_count
            except pex.ChannelClosedByBroker:
                counts[queue] = 0
            finally:
                with contextlib.suppress(Exception):
                    chan.close()
        return counts


def delete_namespace(url: str, namespace: str) -> bool:
    """Best-effort clean-up: delete a namespace's queues and exchanges; False if it failed."""
    try:
        with Admin(BrokerSettings.from_url(url), Topology(namespace)) as admin:
            admin.delete()
    except Exception:  # noqa: BLE001 (the broker may be gone, e.g. in a fault test)
        return False
    return True


def _dead_letter(queue: str, props: Any, body: bytes) -> DeadLetter:
    headers = props.headers or {}
    deaths = headers.get("x-death") or []
    first = deaths[0] if deaths else {}
    reason = _text(headers.get("x-first-death-reason") or first.get("reason") or "unknown")
    detail = _text(headers.get("x-fedmq-reason") or "")
    if not detail and reason == "delivery_limit":
        detail = "redelivered past the delivery limit (the consumer kept failing)"
    count = int(first.get("count", 1)) if isinstance(first, dict) else 1
    return DeadLetter(queue, props.message_id, reason, mask_text(detail), count, len(body))


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def as_json(rows: list[Any]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
