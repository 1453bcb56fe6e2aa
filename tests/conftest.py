"""Test fixtures: a real RabbitMQ for every broker test, one namespace per test.

The broker comes from, in order: ``FEDMQ_TEST_AMQP_URL``; a testcontainers RabbitMQ where a
Docker engine answers; a broker already listening on 127.0.0.1:5672; a private
``rabbitmq-server`` node started in a temp dir. Fault tests that stop the broker always get a
private node (``private_broker``), never the shared one.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmq.broker.admin import delete_namespace
from fedmq.broker.provision import (
    PrivateCluster,
    PrivateNode,
    broker_answers,
    docker_available,
    start_container,
)
from tests.helpers import CapturedLogs, Procs, split

LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    url = os.environ.get("FEDMQ_TEST_AMQP_URL")
    if url:
        yield url
        return
    if docker_available():
        provided = start_container()
        try:
            yield provided.url
        finally:
            provided.close()
        return
    if broker_answers(LOCAL_URL):
        yield LOCAL_URL
        return
    if not PrivateNode.available():
        skip_or_fail("no RabbitMQ: set FEDMQ_TEST_AMQP_URL, start Docker, or install rabbitmq-server")
    node = PrivateNode().start()
    try:
        yield node.url
    finally:
        node.remove()


def skip_or_fail(reason: str) -> None:
    """Skip locally, but fail under CI: a green CI that skipped its broker tests proves nothing."""
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and {reason}", pytrace=False)
    pytest.skip(reason)


def new_namespace(prefix: str = "t") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


@pytest.fixture
def namespace(amqp_url: str) -> Iterator[str]:
    ns = new_namespace()
    yield ns
    delete_namespace(amqp_url, ns)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits split Dirichlet 0.5 into 4 shards, shared by a module's end-to-end tests."""
    return split(tmp_path_factory.mktemp("shards"), 4)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """fedmq child processes of one test, killed at its end whatever happens."""
    p = Procs(tmp_path / "logs")
    yield p
    p.close()


@pytest.fixture
def private_broker() -> Iterator[PrivateNode]:
    """A RabbitMQ node of this test's own, which the test may stop and start."""
    if not PrivateNode.available():
        skip_or_fail("rabbitmq-server is not installed: fault tests need a private node")
    node = PrivateNode().start()
    try:
        yield node
    finally:
        node.remove()


@pytest.fixture(scope="module")
def private_cluster() -> Iterator[PrivateCluster]:
    """Three private RabbitMQ nodes joined into one cluster, one cluster per test module (each
    start is heavy); tests may stop and start its nodes (``start_node`` waits for the rejoin)."""
    if not PrivateNode.available():
        skip_or_fail("rabbitmq-server is not installed: cluster tests need private nodes")
    cluster = PrivateCluster(size=3).start()
    try:
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def worker_logs() -> Iterator[CapturedLogs]:
    """What in-process workers (fedmq.worker) log during the test, at INFO and above."""
    logger = logging.getLogger("fedmq.worker")
    handler, level = CapturedLogs(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)

