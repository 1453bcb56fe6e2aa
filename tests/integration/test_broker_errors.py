"""Broker errors against a real RabbitMQ: typed from reply codes, permanent ones never retried.

Tests that need a special broker (a lowered ``max_message_size``, extra users, a broker that
stops) run on a private node; the rest use the shared test broker.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pika.exceptions as pex
import pytest

from fedmq.broker.admin import Admin
from fedmq.broker.client import Client, classify
from fedmq.broker.lock import NamespaceLock
from fedmq.broker.provision import PrivateNode
from fedmq.broker.settings import BrokerSettings, MiB, default_max_message_bytes
from fedmq.broker.topology import Topology
from fedmq.shared import messages
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
    ResourceLocked,
)
from fedmq.shared.trainer import MLPTrainer
from fedmq.worker.service import Worker, WorkerConfig
from tests.conftest import new_namespace, skip_or_fail
from tests.helpers import CapturedLogs, wait_for

pytestmark = [pytest.mark.broker]

BROKER_LIMIT = 1 * MiB  # the private node's max_message_size
PASSWORD = "pw-secret"


def with_user(url: str, user: str, password: str = PASSWORD) -> str:
    parts = urlsplit(url)
    host = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    return urlunsplit((parts.scheme, f"{user}:{password}@{host}", parts.path, parts.query, parts.fragment))


@pytest.fixture(scope="module")
def limited_broker() -> Iterator[PrivateNode]:
    """A private node refusing messages over 1 MiB, with users of partial permissions."""
    if not PrivateNode.available():
        skip_or_fail("rabbitmq-server is not installed: these tests need a private node")
    node = PrivateNode(config={"max_message_size": str(BROKER_LIMIT)}).start()
    try:
        for user, perms in {"nobody": ("^$", "^$", "^$"), "reader": ("^$", "^$", ".*"),
                            "revoked": (".*", ".*", ".*")}.items():
            node.ctl("add_user", user, PASSWORD)
            node.ctl("set_permissions", "-p", "/", user, *perms)
        yield node
    finally:
        node.remove()


def collect(client: Client, queue_name: str) -> queue.Queue[bytes]:
    got: queue.Queue[bytes] = queue.Queue()
    client.subscribe(queue_name, lambda d: got.put(d.body), settle_on_return=True)
    return got


def message_count(client: Client, queue_name: str) -> int:
    return int(client.call(lambda ch: ch.queue_declare(queue_name, passive=True).method.message_count))


# ------------------------------------------------------------------------ the taxonomy
@pytest.mark.parametrize(
    ("exc", "cls", "retryable"),
    [
        (pex.ChannelClosedByBroker(403, "ACCESS_REFUSED - x"), AccessRefused, False),
        (pex.ChannelClosedByBroker(404, "NOT_FOUND - x"), NotFound, False),
        (pex.ChannelClosedByBroker(405, "RESOURCE_LOCKED - x"), ResourceLocked, False),
        (pex.ChannelClosedByBroker(406, "PRECONDITION_FAILED - x"), PreconditionFailed, False),
        (pex.ConnectionClosedByBroker(530, "NOT_ALLOWED - x"), AccessRefused, False),
        (pex.ConnectionClosedByBroker(320, "CONNECTION_FORCED - x"), ConnectionLost, True),
        (pex.ChannelClosedByBroker(541, "INTERNAL_ERROR - x"), ConnectionLost, True),
        (pex.StreamLostError("Transport indicated EOF"), ConnectionLost, True),
        (pex.AMQPHeartbeatTimeout("no heartbeat"), ConnectionLost, True),
    ],
)
def test_errors_are_typed_from_reply_codes_not_text(exc: Exception, cls: type, retryable: bool) -> None:
    err = classify(exc, "doing it")
    assert type(err) is cls and err.retryable is retryable
    assert err.reply_code == getattr(exc, "reply_code", None)
    # the wording does not matter: the same code with other text maps the same way
    if isinstance(exc, pex.ChannelClosedByBroker):
        assert type(classify(pex.ChannelClosedByBroker(exc.reply_code, "anything at all"), "x")) is cls


def test_the_default_limit_follows_the_brokers_version() -> None:
    assert default_max_message_bytes({"product": b"RabbitMQ", "version": b"3.10.8"}) == 128 * MiB
    assert default_max_message_bytes({"product": b"RabbitMQ", "version": b"4.0.5"}) == 16 * MiB
    assert default_max_message_bytes({}) == 128 * MiB


# ------------------------------------------------------------------------ message size
def test_a_publish_over_the_brokers_limit_fails_at_once_and_the_client_goes_on(limited_broker: PrivateNode) -> None:
    topology = Topology(new_namespace("big"))
    # the client allows more than the broker: the broker's 406 must not become a retry loop
    settings = BrokerSettings.from_url(limited_broker.url, max_message_bytes=64 * MiB)
    client = Client(settings, topology)
    got = collect(client, topology.tasks)
    with client:
        generation = client.generation
        with pytest.raises(MessageTooLarge) as info:  # a retry loop would end in NotConfirmed
            client.publish(topology.tasks, b"x" * (2 * MiB), timeout=30)
        assert info.value.reply_code == 406 and not info.value.retryable
        text = str(info.value)
        assert "2.0 MiB" in text and "max_message_size" in text and "FEDMQ_MAX_MESSAGE_BYTES" in text
        # a new channel, same connection; consumers are back, and the big message is not sent again
        client.publish(topology.tasks, b"small", timeout=10)
        assert got.get(timeout=10) == b"small"
        assert client.reconnects == 0 and client.generation > generation and client.failure is None
        with pytest.raises(queue.Empty):
            got.get(timeout=1.5)


def test_a_refused_publish_among_several_in_flight_fails_alone(limited_broker: PrivateNode) -> None:
    """The broker's 406 closes the channel without naming the publish: the client sends the
    unconfirmed ones again one at a time, fails the one refused and confirms the others."""
    topology = Topology(new_namespace("big"))
    settings = BrokerSettings.from_url(limited_broker.url, max_message_bytes=64 * MiB)
    client = Client(settings, topology)
    got = collect(client, topology.tasks)
    with client:
        busy, release = threading.Event(), threading.Event()
        client._submit(lambda: (busy.set(), release.wait(30)))  # hold the I/O thread inside an op
        assert busy.wait(30)
        bodies = [b"a", b"b", b"x" * (2 * MiB), b"c", b"d"]
        pending = [client.publish_nowait(topology.tasks, body, message_id=f"m{i}") for i, body in enumerate(bodies)]
        release.set()
        for i, pub in enumerate(pending):
            if i == 2:
                with pytest.raises(MessageTooLarge):
                    pub.wait(30)
            else:
                pub.wait(30)
        received = set()
        while len(received) < 4:
            received.add(got.get(timeout=10))
        assert received == {b"a", b"b", b"c", b"d"}  # at least once (dedupe is the consumers')
        assert client.reconnects == 0 and client.failure is None and client.most_in_flight >= 4


def test_a_body_over_the_configured_limit_is_refused_before_sending(amqp_url: str, namespace: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    topology = Topology(namespace)
    monkeypatch.setenv("FEDMQ_MAX_MESSAGE_BYTES", "1000")
    settings = BrokerSettings.from_url(amqp_url)
    assert settings.max_message_bytes == 1000
    with Client(settings, topology) as client:
        assert client.max_message_bytes == 1000
        with pytest.raises(MessageTooLarge) as info:
            client.publish_nowait(topology.tasks, b"x" * 1001)
        text = str(info.value)
        assert "1001 bytes" in text and "1000 bytes" in text and "FEDMQ_MAX_MESSAGE_BYTES" in text
        client.publish(topology.tasks, b"x" * 1000, timeout=10)  # at the limit: sent
        assert message_count(client, topology.tasks) == 1
    with Client(BrokerSettings.from_url(amqp_url, max_message_bytes=None), topology) as client:
        assert client.max_message_bytes in (16 * MiB, 128 * MiB)  # the broker's default


# ------------------------------------------------------------------------ missing things, refusals
def test_a_publish_to_a_missing_exchange_is_not_found_not_a_retry_loop(amqp_url: str, namespace: str) -> None:
    topology = Topology(namespace)
    with Client(BrokerSettings.from_url(amqp_url), topology) as client:
        with pytest.raises(NotFound) as info:  # a retry loop would end in NotConfirmed
            client.publish("k", b"x", exchange=f"{namespace}.no-such-exchange", mandatory=True, timeout=30)
        assert info.value.reply_code == 404 and "no-such-exchange" in str(info.value)
        client.publish(topology.tasks, b"after", timeout=10)
        assert client.reconnects == 0 and message_count(client, topology.tasks) == 1


def test_a_wrong_password_is_login_refused(amqp_url: str) -> None:
    user = urlsplit(amqp_url).username or "guest"
    bad = with_user(amqp_url, user, "wrong-secret")
    with pytest.raises(AccessRefused) as info:
        Client(BrokerSettings.from_url(bad), Topology(new_namespace())).start()
    assert isinstance(info.value, LoginRefused) and "wrong-secret" not in str(info.value)


def test_a_user_without_permissions_is_refused_at_start_without_retries(limited_broker: PrivateNode) -> None:
    settings = BrokerSettings.from_url(with_user(limited_broker.url, "nobody"))
    with pytest.raises(AccessRefused) as info:  # not ConnectionLost after five set-up attempts
        Client(settings, Topology(new_namespace("perm"))).start()
    assert info.value.reply_code == 403 and "configure permission" in str(info.value)


def test_a_publish_without_write_permission_fails_that_publish_only(limited_broker: PrivateNode) -> None:
    topology = Topology(new_namespace("ro"))
    with Admin(BrokerSettings.from_url(limited_broker.url), topology) as admin:
        admin.setup()
    settings = BrokerSettings.from_url(with_user(limited_broker.url, "reader"))
    client = Client(settings, topology, declare=False)
    collect(client, topology.tasks)
    with client:
        with pytest.raises(AccessRefused) as info:
            client.publish(topology.tasks, b"x", timeout=30)
        assert info.value.reply_code == 403 and "write permission" in str(info.value)
        assert message_count(client, topology.tasks) == 0  # the client still works
        assert client.reconnects == 0 and client.failure is None


def test_a_second_lock_holder_waits_and_gets_the_token_when_the_first_goes(amqp_url: str, namespace: str) -> None:
    topology = Topology(namespace)
    first = Client(BrokerSettings.from_url(amqp_url), topology, name="first")
    first_lock = NamespaceLock(first, topology.lock, "first")
    first_lock.subscribe()
    second = Client(BrokerSettings.from_url(amqp_url), topology, name="second")
    second_lock = NamespaceLock(second, topology.lock, "second")
    second_lock.subscribe()
    with first, second:
        assert first_lock.acquire(10)
        assert not second_lock.acquire(2)  # its offer went to the holder, which keeps one token
        refused = second_lock.refused()
        assert isinstance(refused, NamespaceLocked)
        assert "another aggregator is running" in str(refused) and namespace in str(refused)
        first.close()  # the holder's connection goes: its token goes to the waiting consumer
        assert second_lock.regain(30)
        assert second_lock.held


def test_a_permanent_error_after_a_reconnect_gives_up_instead_of_looping(limited_broker: PrivateNode) -> None:
    topology = Topology(new_namespace("revoke"))
    settings = BrokerSettings.from_url(with_user(limited_broker.url, "revoked"), reconnect_initial_s=0.2)
    failures: list[BrokerError] = []
    client = Client(settings, topology)
    client.on_failure = failures.append
    with client:
        limited_broker.ctl("set_permissions", "-p", "/", "revoked", "^$", "^$", "^$")
        limited_broker.ctl("close_all_user_connections", "revoked", "test: permissions revoked")
        wait_for(lambda: client.failure is not None, 20, "the client to give up")
        assert isinstance(client.failure, AccessRefused) and failures == [client.failure]
        assert client.reconnects == 0  # one reconnect attempt, refused: no loop
        with pytest.raises(AccessRefused):
            client.publish(topology.tasks, b"x", timeout=5)


# ------------------------------------------------------------------------ confirm deadlines
def test_confirm_waits_have_a_deadline_and_honour_stop_and_close(private_broker: PrivateNode) -> None:
    topology = Topology(new_namespace("down"))
    settings = BrokerSettings.from_url(private_broker.url, confirm_timeout_s=2, reconnect_initial_s=0.2)
    client = Client(settings, topology).start()
    try:
        private_broker.stop()
        wait_for(lambda: not client.connected, 30, "the client to notice the broker is gone")
        with pytest.raises(NotConfirmed, match="within 2 s"):
            client.publish(topology.tasks, b"x")  # the settings' deadline
        stop = threading.Event()
        pending = client.publish_nowait(topology.tasks, b"y")
        threading.Timer(0.5, stop.set).start()
        with pytest.raises(NotConfirmed, match="stopped before"):
            pending.wait(timeout=60, stop=stop)
        pending = client.publish_nowait(topology.tasks, b"z")
        threading.Timer(0.5, client.close).start()
        with pytest.raises(NotConfirmed, match="client closed before"):
            pending.wait(timeout=60)
    finally:
        client.close()


# ------------------------------------------------------------------------ the worker
SPEC = {"input_dim": 64, "num_classes": 10}




def start_worker(url: str, namespace: str, tmp_path: Path, settings: BrokerSettings | None = None,
                 before: Callable[[Any], None] | None = None,
                 **config: Any) -> tuple[Worker, threading.Thread, dict[str, Any]]:
    """Publish model 0 and task t1, call ``before(channel)``, then run a worker in a thread; its
    outcome lands in the dict."""
    topology = Topology(namespace)
    rng = np.random.default_rng(0)
    shard = tmp_path / "shard.npz"
    np.savez(shard, X=rng.standard_normal((64, 64)).astype(np.float32), y=rng.integers(0, 10, 64))
    model = messages.ModelVersion(version=0, params=MLPTrainer(SPEC).init_params(), spec=SPEC)
    task = messages.Task(task_id="t1", version=None, mode="async", epochs=1, batch_size=32, lr=0.1, mu=0.0, seed=1)
    with Client(BrokerSettings.from_url(url), topology) as client:
        client.publish(topology.models, messages.encode(model), headers={"x-fedmq-version": 0}, timeout=10)
        client.publish(topology.tasks, messages.encode(task), message_id="t1", timeout=10)
        if before is not None:
            client.call(before)
    worker = Worker(WorkerConfig(data=str(shard), worker_id="w0", failure_backoff_s=0.05, **config),
                    settings or BrokerSettings.from_url(url), topology)
    outcome: dict[str, Any] = {}

    def body() -> None:
        try:
            outcome["code"] = worker.run()
        except BaseException as exc:  # noqa: BLE001 (examined by the test)
            outcome["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return worker, thread, outcome


def test_a_worker_whose_update_is_not_routed_returns_the_task_and_goes_on(
        amqp_url: str, namespace: str, tmp_path: Path, worker_logs: CapturedLogs) -> None:
    topology = Topology(namespace)
    # no updates queue: an update goes nowhere (mandatory, so the broker returns it)
    worker, thread, outcome = start_worker(amqp_url, namespace, tmp_path, declare=False,
                                           before=lambda ch: ch.queue_delete(topology.updates))
    try:
        # the task comes back to the same worker: it was rejected to the queue, not left unacked
        wait_for(lambda: len(worker_logs.events("task_started")) >= 2, 30, "the task to be delivered again")
        failed = worker_logs.events("task_failed")
        assert failed and failed[0]["task_id"] == "t1" and "route" in failed[0]["reason"]
        assert thread.is_alive() and not outcome
    finally:
        worker.request_stop()
        thread.join(30)
    assert outcome == {"code": 0}


def test_a_worker_whose_update_is_too_large_returns_the_task_and_stops_with_the_reason(
        amqp_url: str, namespace: str, tmp_path: Path, worker_logs: CapturedLogs) -> None:
    settings = BrokerSettings.from_url(amqp_url, max_message_bytes=10_000)  # an update is ~19 KB
    worker, thread, outcome = start_worker(amqp_url, namespace, tmp_path, settings)
    try:
        thread.join(30)
        assert not thread.is_alive(), "the worker kept going after a permanent publish error"
    finally:
        worker.request_stop()
        thread.join(10)
    assert isinstance(outcome.get("error"), MessageTooLarge), outcome
    failed = worker_logs.events("task_failed")
    assert [f["task_id"] for f in failed] == ["t1"] and "FEDMQ_MAX_MESSAGE_BYTES" in failed[0]["reason"]
    assert not worker_logs.events("update_confirmed")
    topology = Topology(namespace)
    with Client(BrokerSettings.from_url(amqp_url), topology) as client:
        assert message_count(client, topology.tasks) == 1  # the task is back, for another worker


def test_a_channel_closed_for_something_else_fails_no_publish(amqp_url: str, namespace: str) -> None:
    """A 406 for an ack of an unknown delivery tag, with a publish in flight: the close names
    basic.ack as its cause, so the publish is sent again and confirmed (the code before blamed
    the publish waiting for its confirm and failed it as too large)."""
    topology = Topology(namespace)
    with Client(BrokerSettings.from_url(amqp_url), topology) as client:
        busy, release = threading.Event(), threading.Event()
        client._submit(lambda: (busy.set(), release.wait(30)))  # hold the I/O thread inside an op
        assert busy.wait(30)
        client._submit(lambda: client._chan.basic_ack(999_999))  # the broker closes the channel: 406
        pending = client.publish_nowait(topology.tasks, b"after a bad ack", message_id="m1")
        release.set()
        pending.wait(30)  # confirmed on the reopened channel, not failed
        assert message_count(client, topology.tasks) == 1
        assert client.failure is None
