"""A federation on a three-node RabbitMQ cluster that loses a node mid-run.

One private cluster per module (three ``rabbitmq-server`` nodes on this machine, joined with
``join_cluster``; see :class:`fedmq.broker.provision.PrivateCluster`). The namespace is
declared through node 1, so node 1 leads its queues; the workers list the nodes from node 1,
the aggregator from node 2. One test stops the node that leads ``<ns>.updates`` (the workers'
node), the other the aggregator's node. Each run must reach its target with the ledger
invariant, and the stopped node must rejoin once started again. The stall (the longest pause
between applied updates from the stop on) is printed and recorded as a test property, never
asserted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from fedmq.broker.admin import delete_namespace
from fedmq.broker.provision import PrivateCluster, PrivateNode
from tests.conftest import new_namespace
from tests.helpers import (
    Procs,
    assert_ledger_invariant,
    confirmed_updates,
    read_history,
    read_ledger,
    wait_for,
)

# the module's first test also starts the cluster (a minute or two on a busy 2-core machine)
pytestmark = [pytest.mark.broker, pytest.mark.fault, pytest.mark.slow, pytest.mark.timeout(900)]

WORKERS = 3


@pytest.fixture(scope="module")
def cluster(private_cluster: PrivateCluster) -> PrivateCluster:
    return private_cluster


def urls_from(cluster: PrivateCluster, first: int) -> str:
    """All nodes' URLs, comma-separated, starting with node ``first``."""
    urls = cluster.urls
    return ",".join(urls[first:] + urls[:first])


def applied_times(procs: Procs, name: str) -> list[float]:
    """Wall-clock times of the aggregator's applied updates (from its JSON event lines)."""
    return [float(e["ts"]) for e in procs.events(name, "update_settled") if e.get("fate") == "applied"]


def stall_after(procs: Procs, name: str, stopped_at: float) -> float:
    """The longest pause between two applied updates of the aggregator from the node stop on
    (the last one before the stop counts as the start of the first pause)."""
    times = sorted(applied_times(procs, name))
    before = [t for t in times if t < stopped_at][-1:]
    after = [t for t in times if t >= stopped_at]
    assert after, "no update was applied after the node stopped"
    points = before + after
    return max(b - a for a, b in zip(points, points[1:], strict=False)) if len(points) > 1 else 0.0


def all_confirmed(procs: Procs) -> list[dict[str, Any]]:
    return [c for name in procs.procs if name.startswith("w") for c in confirmed_updates(procs.log(name))]


def federate(cluster: PrivateCluster, shards: Path, procs: Procs, run: Path, ns: str, agg_args: list[str]) -> None:
    """Declare the namespace through node 1, start the aggregator (nodes 2, 3, 1) and workers (1, 2, 3)."""
    procs.start("setup", "broker", "setup", "--amqp-url", cluster.urls[0], "--namespace", ns)
    assert procs.wait("setup", 60) == 0, procs.log("setup")
    procs.start("agg", "aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run), "--log-format", "json",
                "--amqp-url", urls_from(cluster, 1), "--namespace", ns, "--min-workers", str(WORKERS), *agg_args)
    for i in range(WORKERS):
        procs.start(f"w{i}", "worker", "--data", str(shards / f"worker-{i}.npz"), "--worker-id", f"w{i}",
                    "--log-format", "json", "--slowdown", "4", "--amqp-url", urls_from(cluster, 0), "--namespace", ns)


def lose_node_mid_run(cluster: PrivateCluster, procs: Procs, run: Path, victim: PrivateNode,
                      record_property: Any, what: str) -> None:
    """Stop ``victim`` once the run is under way, let the run finish, start it again: it rejoins."""
    wait_for(lambda: sum(e["fate"] == "applied" for e in read_ledger(run)) >= 6, 120, "six applied updates")
    stopped_at = time.time()
    victim.stop()
    try:
        assert procs.wait("agg", 300) == 0, procs.dump()
        stall = stall_after(procs, "agg", stopped_at)
        record_property(f"stall_s_{what}", round(stall, 2))
        print(f"\n{what}: stall after stopping {victim.name}: {stall:.1f} s")  # noqa: T201 (the figure)
    finally:
        cluster.start_node(victim)
    assert victim.name in cluster.running_nodes(via=cluster.nodes[0] if victim is not cluster.nodes[0] else None)


def node_of_aggregator(cluster: PrivateCluster, procs: Procs) -> PrivateNode:
    for line in procs.log("agg").splitlines():
        if line.startswith("{") and "aggregator connected to" in line:
            msg = json.loads(line).get("msg", "")
            for node in cluster.nodes:
                if f":{node.port}/" in msg:
                    return node
    raise AssertionError("the aggregator did not say which node it connected to")


def test_async_fedbuff_survives_losing_the_updates_queue_leader(cluster: PrivateCluster, shards: Path, procs: Procs,
                                                                 tmp_path: Path, record_property: Any) -> None:
    ns, run = new_namespace("cl-a"), tmp_path / "run"
    try:
        federate(cluster, shards, procs, run, ns, ["--mode", "async", "--strategy", "fedbuff", "--buffer-size", "2",
                                                   "--max-updates", "40", "--checkpoint-every", "2"])
        leader = cluster.leader_of(f"{ns}.updates")
        assert leader is cluster.nodes[0]  # declared through node 1
        lose_node_mid_run(cluster, procs, run, leader, record_property, "async-leader")
        hist = read_history(run)
        assert hist["final"]["updates_applied"] >= 40
        assert_ledger_invariant(run, all_confirmed(procs))
    finally:
        delete_namespace(cluster.urls[1], ns)


def test_sync_fedavg_survives_losing_the_aggregators_node(cluster: PrivateCluster, shards: Path, procs: Procs,
                                                          tmp_path: Path, record_property: Any) -> None:
    ns, run = new_namespace("cl-s"), tmp_path / "run"
    try:
        federate(cluster, shards, procs, run, ns, ["--mode", "sync", "--rounds", "8", "--checkpoint-every", "1"])
        wait_for(lambda: "aggregator connected to" in procs.log("agg"), 60, "the aggregator to connect")
        victim = node_of_aggregator(cluster, procs)
        assert victim is cluster.nodes[1] and victim is not cluster.leader_of(f"{ns}.updates")
        lose_node_mid_run(cluster, procs, run, victim, record_property, "sync-aggregator-node")
        hist = read_history(run)
        assert hist["final"]["version"] == 8 and hist["final"]["finished"]
        assert_ledger_invariant(run, all_confirmed(procs))
    finally:
        delete_namespace(cluster.urls[0], ns)
