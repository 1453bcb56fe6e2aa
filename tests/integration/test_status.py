"""`fedmq status` on real runs: the numbers of the ledger, --json, --follow to the end of a run."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmq.broker.admin import delete_namespace
from tests.conftest import new_namespace
from tests.helpers import Procs, fedmq_argv, read_history, read_ledger, split, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def clean_env(amqp_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_")}
    env["FEDMQ_AMQP_URL"] = amqp_url
    return env


@pytest.fixture(scope="module")
def finished_run(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A short async run whose namespace is kept (so that its dead-letter queues can be read)."""
    out = tmp_path_factory.mktemp("status") / "run"
    ns = new_namespace("st")
    try:
        proc = subprocess.run(fedmq_argv("run", "--workers", "3", "--mode", "async", "--max-updates", "30",
                                         "--namespace", ns, "--display", "plain", "--out", str(out)),
                              capture_output=True, text=True, env=clean_env(amqp_url), timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield out
    finally:
        delete_namespace(amqp_url, ns)


def status(*args: str, amqp_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fedmq_argv("status", *args), capture_output=True, text=True, env=clean_env(amqp_url),
                          timeout=60)


def test_status_of_a_finished_run_shows_the_ledgers_numbers(finished_run: Path, amqp_url: str) -> None:
    proc = status(str(finished_run), amqp_url=amqp_url)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    ledger = read_ledger(finished_run)
    final = read_history(finished_run)["final"]
    assert f"run {finished_run}: finished (async / fedbuff)" in out
    assert f"updates applied {final['updates_applied']} in" in out
    fates = Counter(e["fate"] for e in ledger)
    assert f"applied {fates['applied']}, stale {fates['stale']}" in out
    ns = read_history(finished_run)["namespace"]
    assert f"dead letters: {ns}.tasks.dlq 0, {ns}.updates.dlq 0" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  w") and "applied" not in line}
    assert set(rows) == {"w0", "w1", "w2"}
    for wid, cols in rows.items():
        assert int(cols[1]) == sum(1 for e in ledger if e.get("worker_id") == wid and e["fate"] == "applied"), out


def test_status_json_is_one_document_with_the_same_numbers(finished_run: Path, amqp_url: str) -> None:
    proc = status(str(finished_run), "--json", amqp_url=amqp_url)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    ledger = read_ledger(finished_run)
    final = read_history(finished_run)["final"]
    assert doc["state"] == "finished" and doc["version"] == final["version"]
    assert doc["updates_applied"] == final["updates_applied"] == sum(w["applied"] for w in doc["workers"])
    assert doc["ledger_entries"] == len(ledger) == sum(doc["fates"].values())
    assert doc["dead_letters"]["known"] is True and set(doc["dead_letters"]["queues"].values()) == {0}


def test_status_skips_an_unreachable_broker(finished_run: Path) -> None:
    proc = status(str(finished_run), amqp_url="amqp://guest:s3cret@127.0.0.1:1/")
    assert proc.returncode == 0, proc.stderr
    assert "dead letters: unknown (cannot reach RabbitMQ" in proc.stdout and "s3cret" not in proc.stdout


def test_follow_refreshes_until_the_run_finishes(amqp_url: str, namespace: str, tmp_path: Path) -> None:
    shards = split(tmp_path / "shards", 2)
    out = tmp_path / "run"
    procs = Procs(tmp_path / "logs")
    common = ["--amqp-url", amqp_url, "--namespace", namespace]
    follower: subprocess.Popen[str] | None = None
    try:
        procs.start("aggregator", "aggregator", "--test-data", str(shards / "test.npz"), "--out", str(out),
                    "--mode", "async", "--max-updates", "12", "--min-workers", "1", "--log-format", "json", *common)
        wait_for(lambda: procs.events("aggregator", "waiting_for_workers"), 60, "the aggregator to wait for workers")
        follower = subprocess.Popen(fedmq_argv("status", str(out), "--follow", "--json", "--interval", "0.2",
                                               "--no-broker"), stdout=subprocess.PIPE, text=True)
        assert follower.stdout is not None
        first = json.loads(follower.stdout.readline())  # it shows the run before any worker exists
        assert first["state"] in ("starting", "running")
        assert follower.poll() is None, "--follow left before the run finished"
        procs.start("worker", "worker", "--data", str(shards / "worker-0.npz"), "--worker-id", "w0", *common)
        rest, _ = follower.communicate(timeout=120)
        assert follower.returncode == 0
        docs = [first] + [json.loads(line) for line in rest.splitlines()]
        assert docs[-1]["state"] == "finished" and docs[-1]["updates_applied"] == 12
        assert procs.wait("aggregator", 60) == 0
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
        procs.close()
