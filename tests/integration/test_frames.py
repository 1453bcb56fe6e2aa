"""fedmq's frame I/O (fedmq.broker.frames) against a real RabbitMQ: large bodies received into
buffers of their own, multi-frame bodies, bodies that are exact multiples of the frame
payload, empty bodies, both directions with a stock pika peer, and a larger negotiated
``frame_max`` on a private node configured for it."""

from __future__ import annotations

import os
import queue
from collections.abc import Iterator
from typing import Any

import numpy as np
import pika
import pytest

from fedmq.broker import frames
from fedmq.broker.client import Client, Delivery
from fedmq.broker.provision import PrivateNode
from fedmq.broker.settings import BrokerSettings
from fedmq.broker.topology import Topology
from tests.conftest import new_namespace, skip_or_fail

pytestmark = [pytest.mark.broker]

DEFAULT_PAYLOAD = 131072 - 8  # RabbitMQ's default frame_max less a frame's header and end octet


def sizes(payload: int) -> list[int]:
    large = frames.LARGE_BODY_BYTES
    return [0, 1, large, large + 1, payload - 1, payload, payload + 1, 3 * payload, 3 * payload + 1,
            5_000_000]


def subscribe(client: Client, queue_name: str) -> queue.Queue[Delivery]:
    got: queue.Queue[Delivery] = queue.Queue()
    client.subscribe(queue_name, got.put, prefetch=20)
    return got


def tuned(client: Client) -> bool:
    conn = client._conn
    assert conn is not None
    reader = getattr(conn._impl._on_data_available, "__self__", None)
    return isinstance(reader, frames.FrameReader)


def roundtrip(url: str, payload: int) -> None:
    topology = Topology(new_namespace("frames"))
    client = Client(BrokerSettings.from_url(url), topology, name="frames-test")
    got = subscribe(client, topology.updates)
    with client:
        assert tuned(client)
        assert client._conn._impl.params.frame_max == payload + 8
        sent = [os.urandom(n) for n in sizes(payload)]
        for body in sent:
            client.publish(topology.updates, body)
        received = [got.get(timeout=60) for _ in sent]
        for d, body in zip(received, sent, strict=True):
            assert len(d.body) == len(body) and bytes(d.body) == body
            if len(body) > frames.LARGE_BODY_BYTES:
                assert isinstance(d.body, memoryview) and d.body.readonly
            else:
                assert isinstance(d.body, bytes)
            client.ack(d)
        client.call(lambda ch: ch.queue_purge(topology.updates))
    from fedmq.broker.admin import delete_namespace

    delete_namespace(url, topology.namespace)


def test_bodies_of_every_size_round_trip(amqp_url: str) -> None:
    roundtrip(amqp_url, DEFAULT_PAYLOAD)


def test_large_bodies_keep_their_own_buffers(amqp_url: str, namespace: str) -> None:
    """Arrays decoded from one delivery stay intact while later deliveries arrive."""
    topology = Topology(namespace)
    client = Client(BrokerSettings.from_url(amqp_url), topology)
    got = subscribe(client, topology.updates)
    arrays = [np.full(300_000, i, np.float32) for i in range(6)]
    with client:
        for a in arrays:
            client.publish(topology.updates, a.tobytes())
        first = got.get(timeout=30)
        kept = np.frombuffer(first.body, np.float32)
        rest = [got.get(timeout=30) for _ in arrays[1:]]
        assert np.array_equal(kept, arrays[0])
        for d, a in zip(rest, arrays[1:], strict=True):
            assert np.array_equal(np.frombuffer(d.body, np.float32), a)
            assert not np.shares_memory(np.frombuffer(d.body, np.uint8), np.frombuffer(first.body, np.uint8))
        for d in [first, *rest]:
            client.ack(d)


def test_a_stock_pika_peer_reads_and_writes_what_we_do(amqp_url: str, namespace: str) -> None:
    """Our sender's frames read by pika's own code, and pika's frames read by ours."""
    topology = Topology(namespace)
    bodies = [os.urandom(n) for n in (0, 100, 3 * DEFAULT_PAYLOAD, 2_000_001)]
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))  # pika as it is
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        with Client(BrokerSettings.from_url(amqp_url), topology) as client:
            got = subscribe(client, topology.tasks)
            for body in bodies:  # pika -> us
                ch.basic_publish("", topology.tasks, body, pika.BasicProperties(delivery_mode=2), mandatory=True)
            for body in bodies:
                d = got.get(timeout=30)
                assert bytes(d.body) == body
                client.ack(d)
        with Client(BrokerSettings.from_url(amqp_url), topology) as client:
            for body in bodies:  # us -> pika
                client.publish(topology.tasks, body)
        for body in bodies:
            method, _props, data = ch.basic_get(topology.tasks, auto_ack=False)
            assert method is not None and data == body
            ch.basic_ack(method.delivery_tag)
    finally:
        conn.close()


def test_pika_frame_io_stays_available(amqp_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(frames.FRAMES_ENV, "pika")
    topology = Topology(namespace)
    client = Client(BrokerSettings.from_url(amqp_url), topology)
    got = subscribe(client, topology.updates)
    with client:
        assert not tuned(client)
        body = os.urandom(1_000_000)
        client.publish(topology.updates, body)
        d = got.get(timeout=30)
        assert type(d.body) is bytes and d.body == body
        client.ack(d)


# ---------------------------------------------------------------- a broker with larger frames
BIG_FRAME = 1024 * 1024


@pytest.fixture(scope="module")
def big_frame_broker() -> Iterator[PrivateNode]:
    if not PrivateNode.available():
        skip_or_fail("rabbitmq-server is not installed: this test needs a private node")
    node = PrivateNode(config={"frame_max": str(BIG_FRAME)}).start()
    try:
        yield node
    finally:
        node.remove()


@pytest.mark.slow
def test_a_larger_frame_max_is_negotiated_where_the_broker_allows_it(big_frame_broker: PrivateNode) -> None:
    roundtrip(big_frame_broker.url, BIG_FRAME - 8)  # the client asks for more: the broker's 1 MiB wins
    plain: Any = pika.BlockingConnection(pika.URLParameters(big_frame_broker.url))
    try:  # pika alone cannot ask for more than 128 KiB
        assert plain._impl.params.frame_max == 131072
    finally:
        plain.close()
