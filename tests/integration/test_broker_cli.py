"""`fedmq broker ...` against a real broker, and the refusal of a second aggregator."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedmq.broker.client import Client
from fedmq.broker.settings import BrokerSettings
from fedmq.broker.topology import Topology
from fedmq.cli import main
from fedmq.shared import messages
from tests.helpers import Procs, fedmq_argv, split, wait_for

pytestmark = pytest.mark.broker


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_setup_is_idempotent_and_status_lists_every_queue(amqp_url: str, namespace: str) -> None:
    for _ in range(2):
        code, out = invoke("broker", "setup", "--amqp-url", amqp_url, "--namespace", namespace)
        assert code == 0, out
    code, out = invoke("broker", "status", "--amqp-url", amqp_url, "--namespace", namespace, "--json")
    assert code == 0, out
    doc = json.loads(out)
    names = {q["name"] for q in doc["queues"]}
    assert names == set(Topology(namespace).queues)
    assert all(q["exists"] for q in doc["queues"])
    assert doc["dead_lettered"] == {f"{namespace}.tasks.dlq": 0, f"{namespace}.updates.dlq": 0}


def test_status_shows_workers_heard_from_and_dead_letters(amqp_url: str, namespace: str) -> None:
    topology = Topology(namespace)
    with Client(BrokerSettings.from_url(amqp_url), topology) as client:
        hello = messages.Control(kind="hello", worker_id="w-status", sent_s=time.time(), info={"samples": 3})
        client.publish(topology.presence, messages.encode(hello))
        client.publish("updates", b"junk", exchange=topology.dlx, message_id="dl-1",
                       headers={"x-fedmq-reason": "not msgpack", "x-first-death-reason": "rejected"})
    code, out = invoke("broker", "status", "--amqp-url", amqp_url, "--namespace", namespace)
    assert code == 0, out
    assert "w-status" in out and "hello" in out
    assert f"{namespace}.updates.dlq 1" in out
    code, out = invoke("broker", "dlq", "--show", "--amqp-url", amqp_url, "--namespace", namespace)
    assert code == 0 and "dl-1" in out and "rejected: not msgpack" in out, out
    # --show does not consume
    code, out = invoke("broker", "dlq", "--purge", "--amqp-url", amqp_url, "--namespace", namespace)
    assert code == 0 and "purged 0 from" in out and "1 from" in out, out
    code, out = invoke("broker", "dlq", "--show", "--amqp-url", amqp_url, "--namespace", namespace)
    assert "0 dead-lettered" in out


def test_unreachable_broker_is_one_line_and_fast() -> None:
    proc = subprocess.run(fedmq_argv("broker", "status", "--amqp-url", "amqp://guest:guest@127.0.0.1:1/"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "cannot reach RabbitMQ" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_refused_credentials_are_one_line_without_the_password(amqp_url: str) -> None:
    bad = amqp_url.replace("guest:guest@", "guest:wrong-secret@")
    proc = subprocess.run(fedmq_argv("broker", "status", "--amqp-url", bad), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "refused the credentials" in proc.stderr and "wrong-secret" not in proc.stderr


def test_a_second_aggregator_is_refused(amqp_url: str, namespace: str, tmp_path: Path) -> None:
    shards = split(tmp_path / "s", 2)
    procs = Procs(tmp_path / "logs")
    common = ["--amqp-url", amqp_url, "--namespace", namespace]
    try:
        procs.start("agg1", "aggregator", "--test-data", str(shards / "test.npz"), "--out", str(tmp_path / "r1"),
                    "--min-workers", "2", "--log-format", "json", *common)
        waiting = wait_for(lambda: procs.events("agg1", "waiting_for_workers"), 30, "the first aggregator to start")
        assert waiting[0]["need"] == 2
        ledger = tmp_path / "r1" / "updates.jsonl"
        ledger.write_bytes(b"")  # the first aggregator's ledger, as it is now
        before = ledger.stat()
        # the worst case: the same run directory, with --resume
        procs.start("agg2", "aggregator", "--test-data", str(shards / "test.npz"), "--out", str(tmp_path / "r1"),
                    "--resume", *common)
        assert procs.wait("agg2", 60) == 1
        assert "another aggregator is running" in procs.log("agg2")
        assert procs.procs["agg1"].poll() is None, "the first aggregator must be unaffected"
        after = ledger.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert not (tmp_path / "r1" / "checkpoint").exists()
    finally:
        procs.close()


def test_deleting_a_namespace_that_does_not_exist_says_so(amqp_url: str, namespace: str) -> None:
    code, out = invoke("broker", "delete", "--yes", "--amqp-url", amqp_url, "--namespace", namespace)
    assert code == 0, out
    assert f"namespace {namespace!r} does not exist" in out and "deleted" not in out.replace("nothing to delete", "")
    assert "guest:guest@" not in out  # the URL it names is masked
    code, out = invoke("broker", "setup", "--amqp-url", amqp_url, "--namespace", namespace)
    assert code == 0, out
    code, out = invoke("broker", "delete", "--yes", "--amqp-url", amqp_url, "--namespace", namespace)
    assert code == 0 and f"namespace {namespace!r} deleted" in out, out


def test_dlq_show_says_the_true_total_when_it_stops_at_its_limit(amqp_url: str, namespace: str) -> None:
    topology = Topology(namespace)
    with Client(BrokerSettings.from_url(amqp_url), topology) as client:
        for i in range(5):
            client.publish("updates", b"junk", exchange=topology.dlx, message_id=f"dl-{i}",
                           headers={"x-fedmq-reason": "not msgpack", "x-first-death-reason": "rejected"})
    code, out = invoke("broker", "dlq", "--show", "--limit", "2", "--amqp-url", amqp_url, "--namespace", namespace)
    assert code == 0, out
    assert out.splitlines()[0].startswith("5 dead-lettered message(s) (showing 2"), out
    assert sum(1 for line in out.splitlines() if "dl-" in line) == 2
    code, out = invoke("broker", "dlq", "--show", "--json", "--amqp-url", amqp_url, "--namespace", namespace)
    doc = json.loads(out)
    assert doc["total"] == 5 and doc["shown"] == 5 and len(doc["messages"]) == 5
