"""--require-user-id on a private node with one broker user per worker: an update without a
user_id, and updates from worker user A claiming worker B's id, are dead-lettered with their
reasons while the run goes on (to its time limit, so that the impostor has time to try)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from fedmq.broker.admin import Admin
from fedmq.broker.client import Client
from fedmq.broker.provision import PrivateNode
from fedmq.broker.settings import BrokerSettings
from fedmq.broker.topology import Topology
from tests.conftest import new_namespace, skip_or_fail
from tests.helpers import (
    Procs,
    assert_ledger_invariant,
    confirmed_updates,
    read_history,
    read_ledger,
    wait_for,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]

USERS = {"w0": "alice", "w1": "bob"}
PASSWORD = "per-worker-password"


def as_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, f"{user}:{PASSWORD}@{parts.hostname}:{parts.port}", parts.path, "", ""))


@pytest.fixture(scope="module")
def users_node() -> Iterator[PrivateNode]:
    if not PrivateNode.available():
        skip_or_fail("rabbitmq-server is not installed: this test needs a private node with its own users")
    node = PrivateNode().start(timeout=120)
    try:
        for user in USERS.values():
            node.ctl("add_user", user, PASSWORD)
            node.ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        yield node
    finally:
        node.remove()


def test_require_user_id_dead_letters_unsigned_and_impersonating_updates(users_node: PrivateNode, shards: Path,
                                                                         procs: Procs, tmp_path: Path) -> None:
    ns, run = new_namespace("uid"), tmp_path / "run"
    url = users_node.url
    procs.start("agg", "aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run), "--mode", "async",
                "--strategy", "fedbuff", "--buffer-size", "2", "--min-workers", "2", "--time-limit", "30",
                "--task-timeout", "10", "--require-user-id", "--amqp-url", url, "--namespace", ns)
    for worker_id, user in USERS.items():
        i = worker_id[1:]
        procs.start(worker_id, "worker", "--data", str(shards / f"worker-{i}.npz"), "--worker-id", worker_id,
                    "--log-format", "json", "--slowdown", "2", "--amqp-url", as_user(url, user), "--namespace", ns)
    wait_for(lambda: any(e.get("worker_id") == "w1" and e["fate"] == "applied" for e in read_ledger(run)), 120,
             "an update of w1 (user bob) to be applied")
    # an update without user_id (the body is never even decoded)
    topology = Topology(ns)
    with Client(BrokerSettings.from_url(url), topology, declare=False) as client:
        client.publish(topology.updates, b"anything", message_id="unsigned-1")
    # alice runs a second worker under w1's id
    procs.start("w1-impostor", "worker", "--data", str(shards / "worker-2.npz"), "--worker-id", "w1",
                "--log-format", "json", "--amqp-url", as_user(url, "alice"), "--namespace", ns)
    impostor = wait_for(lambda: [e for e in read_ledger(run) if "belongs to broker user 'bob'" in str(e.get("reason"))],
                        120, "an update of alice claiming w1 to be refused")
    procs.kill("w1-impostor")
    assert procs.wait("agg", 240) == 0, procs.dump()
    ledger = read_ledger(run)
    unsigned = [e for e in ledger if "no broker-validated user_id" in str(e.get("reason"))]
    assert unsigned and all(e["fate"] == "rejected" for e in unsigned + impostor)
    assert "published by user 'alice'" in impostor[0]["reason"]
    final = read_history(run)["final"]
    assert final["finished"] and final["updates_applied"] >= 10
    # both are dead-lettered, with their reasons
    with Admin(BrokerSettings.from_url(url), topology) as admin:
        reasons = [f"{d.reason} {d.detail}" for d in admin.dead_letters(limit=200)]
    assert any("no broker-validated user_id" in r for r in reasons), reasons
    assert any("belongs to broker user 'bob'" in r for r in reasons), reasons
    confirmed = [c for name in ("w0", "w1") for c in confirmed_updates(procs.log(name))]
    assert_ledger_invariant(run, confirmed)
