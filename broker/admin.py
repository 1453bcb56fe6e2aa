"""Operator views of a namespace: queue status, workers heard from, dead letters; and the
namespaces on a broker.

These are short-lived, single-threaded sessions (CLI commands, tests), so they use a plain
blocking connection rather than the threaded :class:`fedmq.broker.client.Client`.

AMQP 0-9-1 cannot list queues, so :func:`list_namespaces` asks the management HTTP API when
it answers, else a local ``rabbitmqctl`` (only for a loopback URL, and only when that node
is the one listening on the URL's port), else fails with one line saying so.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import ipaddress
import json
import shutil
import subprocess
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
from fedmq.shared.errors import BrokerError, ConfigError, DecodeError


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
        try:
            rows = management_queues(self.settings, timeout_s=1.0)
        except ManagementUnavailable:
            return {}
        return {r["name"]: int(r.get("messages_unacknowledged") or 0) for r in rows}

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


# ---------------------------------------------------------------------- listing namespaces
class ManagementUnavailable(Exception):
    """The management HTTP API did not answer with a queue list; ``str()`` says why."""


def management_api(settings: BrokerSettings, management_url: str | None = None) -> tuple[str, str, str]:
    """The management API's base URL (``management_url``, else http://<the AMQP host>:15672)
    without credentials, and the user and password to log in with (those of
    ``management_url`` if it has them, else the AMQP URL's)."""
    amqp = urllib.parse.urlsplit(settings.urls[0])
    user, password = amqp.username or "guest", amqp.password or "guest"
    if management_url:
        parts = urllib.parse.urlsplit(management_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"--management-url must be http(s)://host:port (the management API), "
                              f"not {parts.scheme or 'a URL without a scheme'}://...")
        if parts.username:
            user, password = parts.username, parts.password or ""
        netloc = parts.netloc.rpartition("@")[2]
        base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    else:
        host = amqp.hostname or "localhost"
        base = f"http://{'[' + host + ']' if ':' in host else host}:15672"
    return base, urllib.parse.unquote(user), urllib.parse.unquote(password)


def management_queues(settings: BrokerSettings, management_url: str | None = None,
                      timeout_s: float = 3.0) -> list[dict[str, Any]]:
    """Every queue of the URL's vhost as the management API lists it (``name``, ``messages``,
    ``consumers``, ``messages_unacknowledged``); :class:`ManagementUnavailable` otherwise."""
    url = urllib.parse.urlsplit(settings.urls[0])
    vhost = urllib.parse.quote(urllib.parse.unquote(url.path[1:] or "/"), safe="")
    base, user, password = management_api(settings, management_url)
    api = f"{base}/api/queues/{vhost}?columns=name,messages,consumers,messages_unacknowledged"
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    req = urllib.request.Request(api, headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 (http(s) only)
            rows = json.load(resp)
    except urllib.error.HTTPError as exc:
        why = {401: "refused the login (a wrong user or password, or a user without the 'monitoring' or 'management' tag)",
               404: "has no such vhost"}.get(exc.code, f"answered HTTP {exc.code}")
        raise ManagementUnavailable(f"the management API at {base} {why}") from None
    except (OSError, ValueError) as exc:
        reason = str(getattr(exc, "reason", None) or exc)
        raise ManagementUnavailable(f"no management API answers at {base} ({reason})") from None
    if not isinstance(rows, list):
        raise ManagementUnavailable(f"the management API at {base} did not answer a queue list")
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("name"), str)]


def is_loopback(host: str | None) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def rabbitmqctl_queues(settings: BrokerSettings, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Every queue of the URL's vhost from a local ``rabbitmqctl`` (which talks to the node of
    this machine, or ``$RABBITMQ_NODENAME``): only for a loopback URL, and only when that node
    listens on the URL's port. :class:`ManagementUnavailable` says why not otherwise."""
    parts = urllib.parse.urlsplit(settings.urls[0])
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        raise ManagementUnavailable("no rabbitmqctl on this machine")
    if not is_loopback(parts.hostname):
        raise ManagementUnavailable(f"rabbitmqctl reaches only this machine's node, not {parts.hostname}")
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    status = _ctl_json([ctl, "-q", "status", "--formatter", "json"], timeout_s)
    listeners = status.get("listeners", []) if isinstance(status, dict) else []
    ports = {int(x.get("port", 0)) for x in listeners if isinstance(x, dict) and str(x.get("protocol", "")).startswith("amqp")}
    if port not in ports:
        node = next((str(x["node"]) for x in listeners if isinstance(x, dict) and x.get("node")), "?")
        raise ManagementUnavailable(f"the node rabbitmqctl reaches ({node}) does not listen on port {port}")
    vhost = urllib.parse.unquote(parts.path[1:] or "/")
    rows = _ctl_json([ctl, "-q", "list_queues", "-p", vhost, "--formatter", "json", "name", "messages", "consumers"],
                     timeout_s)
    if not isinstance(rows, list):
        raise ManagementUnavailable("rabbitmqctl list_queues did not answer a queue list")
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("name"), str)]


def _ctl_json(argv: list[str], timeout_s: float) -> Any:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ManagementUnavailable(f"`rabbitmqctl {argv[2]}` failed: {exc}") from None
    if proc.returncode != 0:
        said = next((x.strip() for x in (proc.stderr + proc.stdout).splitlines() if x.strip()), "")
        raise ManagementUnavailable(f"`rabbitmqctl {argv[2]}` exited with code {proc.returncode}"
                                    + (f": {said[:200]}" if said else ""))
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise ManagementUnavailable(f"`rabbitmqctl {argv[2]}` did not print JSON") from None


@dataclass(frozen=True)
class NamespaceInfo:
    namespace: str
    queues: list[str]  # its fedmq queues that exist
    missing: list[str]  # those that do not (a namespace half deleted, or declared by an older fedmq)
    messages: int
    consumers: int


#: ".models", ".tasks.dlq", ...: what follows the namespace in the name of each of its queues,
#: longest first, so that "<ns>.tasks.dlq" is read as namespace "<ns>", not "<ns>.tasks"
_SUFFIXES = sorted((q[len("x"):] for q in Topology("x").queues), key=len, reverse=True)


def namespaces_of(rows: list[dict[str, Any]]) -> list[NamespaceInfo]:
    """Group queue rows (``name``, ``messages``, ``consumers``) by fedmq namespace: the prefix
    of every queue named ``<ns>.models``, ``<ns>.tasks``, ``<ns>.updates``... Workers'
    control queues (``<ns>.control.*``, which expire by themselves) do not make a namespace."""
    found: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        name = str(row["name"])
        for suffix in _SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                found.setdefault(name[: -len(suffix)], []).append(row)
                break
    out = []
    for ns, mine in sorted(found.items()):
        try:
            expected = Topology(ns).queues
        except ConfigError:
            continue  # not a name fedmq would give a namespace
        names = {str(r["name"]) for r in mine}
        out.append(NamespaceInfo(
            ns, [q for q in expected if q in names], [q for q in expected if q not in names],
            sum(int(r.get("messages") or 0) for r in mine), sum(int(r.get("consumers") or 0) for r in mine),
        ))
    return out


def list_namespaces(settings: BrokerSettings, management_url: str | None = None) -> tuple[list[NamespaceInfo], str]:
    """The fedmq namespaces on the broker (in the URL's vhost) and where the list came from
    ("management API" or "rabbitmqctl"). Raises :class:`BrokerError` when the broker does not
    answer AMQP, or neither way of listing queues works (one line saying why)."""
    conn = open_connection(settings, "fedmq-admin")  # the usual one-line error if it does not answer
    with contextlib.suppress(Exception):
        conn.close()
    reasons = []
    try:
        return namespaces_of(management_queues(settings, management_url)), "management API"
    except ManagementUnavailable as exc:
        reasons.append(str(exc))
    try:
        return namespaces_of(rabbitmqctl_queues(settings)), "rabbitmqctl"
    except ManagementUnavailable as exc:
        reasons.append(str(exc))
    raise BrokerError("listing namespaces needs the RabbitMQ management plugin, as AMQP cannot list queues "
                      "(`rabbitmq-plugins enable rabbitmq_management`; --management-url if its API is not at "
                      "port 15672 of the AMQP host): " + "; ".join(reasons))


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
