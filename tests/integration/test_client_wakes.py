"""The broker client wakes its I/O thread once per batch of queued work, not once per item,
and loses nothing by it: every publish queued while the I/O thread was busy is sent and
confirmed, every ack queued with them is sent. Real broker."""

from __future__ import annotations

import queue
import threading

import pytest

from fedmq.broker.client import Client, Delivery
from fedmq.broker.settings import BrokerSettings
from fedmq.broker.topology import Topology

pytestmark = [pytest.mark.broker]

COUNT = 40


def test_work_queued_while_the_io_thread_is_busy_takes_one_wake_and_all_of_it_is_done(
    amqp_url: str, namespace: str
) -> None:
    topology = Topology(namespace)
    got: queue.Queue[Delivery] = queue.Queue()
    client = Client(BrokerSettings.from_url(amqp_url), topology)
    client.subscribe(topology.updates, got.put, prefetch=COUNT)
    client.start()
    try:
        wakes = 0
        real_wake = client._wake

        def counting_wake() -> None:
            nonlocal wakes
            wakes += 1
            real_wake()

        client._wake = counting_wake  # type: ignore[method-assign]
        busy, release = threading.Event(), threading.Event()
        client._submit(lambda: (busy.set(), release.wait(30)))  # hold the I/O thread inside an op
        assert busy.wait(30)
        pending = [client.publish_nowait(topology.updates, b"x%d" % i, message_id=f"m{i}") for i in range(COUNT)]
        assert wakes <= 2  # the op's wake, and one for everything queued while the thread was held
        release.set()
        for pub in pending:
            pub.wait(30)  # confirmed: none was left behind in the queue
        deliveries = [got.get(timeout=30) for _ in range(COUNT)]
        assert sorted(d.body for d in deliveries) == sorted(b"x%d" % i for i in range(COUNT))
        busy.clear()
        release.clear()
        client._submit(lambda: (busy.set(), release.wait(30)))
        assert busy.wait(30)
        for d in deliveries:
            client.ack(d)
        release.set()
        client.close()  # after it drained what was queued: the acks reach the broker before the socket closes
        client = Client(BrokerSettings.from_url(amqp_url), topology).start()
        left = client.call(lambda ch: ch.queue_declare(topology.updates, passive=True).method.message_count)
        assert left == 0  # none came back to the queue unacked
    finally:
        client.close()


def test_publishes_queued_together_go_out_together_and_are_confirmed_as_they_come(
    amqp_url: str, namespace: str
) -> None:
    """Each publish used to wait for its confirm before the next went out (a broker round trip,
    a quorum queue's write, each): N task publishes of a round took N round trips in a row."""
    topology = Topology(namespace)
    got: queue.Queue[Delivery] = queue.Queue()
    client = Client(BrokerSettings.from_url(amqp_url), topology)
    client.subscribe(topology.tasks, got.put, prefetch=COUNT)
    with client:
        busy, release = threading.Event(), threading.Event()
        client._submit(lambda: (busy.set(), release.wait(30)))  # hold the I/O thread inside an op
        assert busy.wait(30)
        pending = [client.publish_nowait(topology.tasks, b"t%d" % i, message_id=f"t{i}") for i in range(COUNT)]
        release.set()
        for pub in pending:
            pub.wait(30)
        assert client.most_in_flight == COUNT  # all sent before the first confirm was read
        bodies = sorted(got.get(timeout=30).body for _ in range(COUNT))
        assert bodies == sorted(b"t%d" % i for i in range(COUNT))
        with pytest.raises(queue.Empty):
            got.get(timeout=0.5)  # each once


def test_large_publishes_queued_together_keep_at_most_the_byte_cap_in_flight(amqp_url: str, namespace: str) -> None:
    """A chunked model is queued whole: its chunks must not all be copied into the connection's
    output at once (each sent publish is), only IN_FLIGHT_BYTES of them."""
    from fedmq.broker.client import IN_FLIGHT_BYTES

    topology = Topology(namespace)
    size = IN_FLIGHT_BYTES // 4
    with Client(BrokerSettings.from_url(amqp_url), topology) as client:
        busy, release = threading.Event(), threading.Event()
        client._submit(lambda: (busy.set(), release.wait(30)))  # hold the I/O thread inside an op
        assert busy.wait(30)
        pending = [client.publish_nowait(topology.tasks, bytes([i]) * size, message_id=f"c{i}") for i in range(10)]
        release.set()
        for pub in pending:
            pub.wait(60)  # all confirmed: the ones held back went out as confirms came in
        assert client.most_in_flight == 4
        count = client.call(lambda ch: ch.queue_declare(topology.tasks, passive=True).method.message_count)
        assert count == 10
