"""Failover on one real broker: a dead address in the list is skipped, and a stream consumer
resumes after a lost connection from the message after the last one it handled (none skipped,
none handled twice)."""

from __future__ import annotations

import queue
from urllib.parse import urlsplit

import pytest

from fedmq.broker.client import Client, Delivery
from fedmq.broker.provision import free_port
from fedmq.broker.settings import BrokerSettings
from fedmq.broker.topology import Topology
from tests.helpers import wait_for

pytestmark = [pytest.mark.broker]


def test_a_stream_consumer_resumes_after_the_last_message_it_handled(amqp_url: str, namespace: str) -> None:
    parts = urlsplit(amqp_url)
    dead = f"{parts.scheme}://{parts.netloc.rpartition('@')[0]}@127.0.0.1:{free_port()}/"
    settings = BrokerSettings.from_url(f"{dead},{amqp_url}", reconnect_initial_s=0.2)
    topology = Topology(namespace)
    got: queue.Queue[bytes] = queue.Queue()

    def on_model(delivery: Delivery) -> None:
        got.put(delivery.body)

    client = Client(settings, topology)
    client.subscribe(topology.models, on_model, arguments={"x-stream-offset": "last"}, settle_on_return=True,
                     prefetch=10)
    with client:
        assert client.node_url.endswith(f":{parts.port}/")  # the dead first address was skipped
        for i in range(5):
            client.publish(topology.models, f"m{i}".encode())
        first = [got.get(timeout=30) for _ in range(5)]
        # the connection goes (as when its node stops); the client reconnects and resubscribes
        client.call(lambda ch: ch.connection.close())
        wait_for(lambda: client.reconnects >= 1 and client.connected, 60, "the client to reconnect")
        for i in range(5, 8):
            client.publish(topology.models, f"m{i}".encode())
        rest = [got.get(timeout=30) for _ in range(3)]
        with pytest.raises(queue.Empty):
            got.get(timeout=2)  # "last" again would have re-read the last chunk
    assert first + rest == [f"m{i}".encode() for i in range(8)]
