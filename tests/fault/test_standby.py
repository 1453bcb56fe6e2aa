"""A standby aggregator takes a run over when the active one dies; the run directory's lock
file stops an aggregator that lost the run from writing to it.

Real broker (the shared one: nothing here stops it), real processes, SIGKILL.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedmq.aggregator.durable import LOCK_FILE, atomic_write_json
from tests.helpers import (
    Procs,
    assert_ledger_invariant,
    confirmed_updates,
    history_len,
    read_history,
    read_ledger,
    wait_for,
)

pytestmark = [pytest.mark.broker, pytest.mark.fault, pytest.mark.slow]

WORKERS = 3


def start_workers(procs: Procs, shards: Path, common: list[str]) -> None:
    for i in range(WORKERS):
        procs.start(f"w{i}", "worker", "--data", str(shards / f"worker-{i}.npz"), "--worker-id", f"w{i}",
                    "--log-format", "json", "--slowdown", "3", *common)


def all_confirmed(procs: Procs) -> list[dict[str, Any]]:
    return [c for name in procs.procs if name.startswith("w") for c in confirmed_updates(procs.log(name))]


def aggregator_args(shards: Path, run: Path, common: list[str]) -> list[str]:
    return ["aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run), "--mode", "async",
            "--strategy", "fedbuff", "--buffer-size", "2", "--min-workers", str(WORKERS), "--max-updates", "80",
            "--checkpoint-every", "2", "--log-format", "json", *common]


def test_standby_takes_over_from_a_killed_aggregator_and_applies_nothing_twice(
        amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["--amqp-url", amqp_url, "--namespace", namespace]
    procs.start("agg", *aggregator_args(shards, run, common))
    wait_for(lambda: procs.events("agg", "waiting_for_workers"), 60, "the first aggregator to start")
    procs.start("standby", *aggregator_args(shards, run, common), "--standby")
    wait_for(lambda: procs.events("standby", "standby"), 60, "the standby to wait")
    start_workers(procs, shards, common)
    wait_for(lambda: history_len(run) >= 4, 120, "four versions")
    assert not procs.events("standby", "took_over"), "the standby must wait while the active one runs"
    first = json.loads((run / LOCK_FILE).read_text())["incarnation"]
    procs.kill("agg")
    assert procs.wait("standby", 240) == 0, procs.dump()
    took = procs.events("standby", "took_over")
    assert len(took) == 1 and took[0]["previous"] == first and took[0]["version"] >= 1
    hist = read_history(run)
    assert [t["incarnation"] for t in hist["takeovers"]] == [took[0]["incarnation"]]
    assert hist["final"]["finished"] and hist["final"]["updates_applied"] >= 80
    versions = [h["version"] for h in hist["history"]]
    assert versions == sorted(set(versions)), "versions repeated or out of order after the takeover"
    ledger = assert_ledger_invariant(run, all_confirmed(procs))
    applied = [e["task_id"] for e in ledger if e["fate"] == "applied"]
    assert len(applied) == len(set(applied))


def test_an_aggregator_whose_run_directory_was_claimed_stops_without_writing(
        amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["--amqp-url", amqp_url, "--namespace", namespace]
    args = aggregator_args(shards, run, common)
    args[args.index("--max-updates") + 1] = "100000"
    procs.start("agg", *args)
    start_workers(procs, shards, common)
    wait_for(lambda: history_len(run) >= 2, 120, "two versions")
    # what a standby does when it takes over while this one still thinks it runs (atomically, as
    # DirLock.claim: a plain write_text let the aggregator read the file empty, "nobody")
    atomic_write_json(run / LOCK_FILE, {"incarnation": "someone-else", "pid": 1, "host": "elsewhere"})
    assert procs.wait("agg", 60) == 1, procs.dump()
    assert "taken over by aggregator incarnation someone-else" in procs.log("agg")
    assert not read_history(run)["final"]["finished"]
    assert json.loads((run / LOCK_FILE).read_text())["incarnation"] == "someone-else"
    assert read_ledger(run) is not None
