"""A checkpoint that does not grow with the run, against a real broker: an asynchronous run long
enough for applied task ids to expire (``--issued-memory 4``), its aggregator SIGKILLed and
resumed, then a copy of an early, already applied update published raw to the updates queue.
It must be rejected (never applied twice), and history.jsonl / history.json must hold each
version exactly once.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedmq.aggregator.core import RunState
from fedmq.aggregator.durable import load_checkpoint, split_prefix
from fedmq.broker.topology import Topology
from fedmq.shared import messages
from tests.fault.test_faults import _publish_raw, all_confirmed, worker
from tests.helpers import (
    Procs,
    assert_ledger_invariant,
    history_len,
    read_history,
    read_ledger,
    wait_for,
)

pytestmark = [pytest.mark.broker, pytest.mark.fault, pytest.mark.slow]

MEMORY = 4
SLEEPY = ["--trainer", "tests.trainers:SleepyTrainer"]
PACE = {"FEDMQ_TEST_SLEEP_S": "0.3"}  # each task: training, then 0.3 s


def _replay_of(run: Path, ledger: list[dict]) -> tuple[str, bytes]:
    """An update for the run's first applied task, as its worker sent it (the task id, worker,
    base version and run; parameters of the model's shapes)."""
    first = next(e for e in ledger if e.get("fate") == "applied")
    restored = load_checkpoint(run)
    assert restored is not None
    meta, arrays = restored
    params = {k: np.asarray(v, dtype=np.float32) for k, v in split_prefix(arrays, "model/").items()}
    update = messages.Update(task_id=first["task_id"], worker_id=first["worker_id"],
                             base_version=int(first["base_version"]), num_samples=int(first["num_samples"]),
                             params=params, kind="weights", train_loss=0.1, train_accuracy=0.9, duration_s=0.01,
                             round=None, run_id=meta["state"]["run_id"])
    return first["task_id"], messages.encode(update)


def test_an_expired_applied_update_replayed_after_kill_and_resume_is_never_applied_twice(
        amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["--amqp-url", amqp_url, "--namespace", namespace]
    agg = ["aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run), "--mode", "async",
           "--strategy", "fedasync", "--min-workers", "2", "--concurrency", "2", "--max-updates", "60",
           "--checkpoint-every", "5", "--issued-memory", str(MEMORY), *SLEEPY, *common]
    procs.start("agg", *agg, env=PACE)
    for i in range(2):
        worker(procs, shards, i, common, *SLEEPY, env=PACE)
    wait_for(lambda: history_len(run) >= 16, 120, "sixteen versions")
    procs.kill("agg")  # SIGKILL, between checkpoints or not
    before = read_history(run)
    assert before["final"]["version"] >= 10
    # the checkpoint on disk: no history list, and only the settled ids an update can still claim
    meta = load_checkpoint(run)
    assert meta is not None
    state = meta[0]["state"]
    assert "history" not in state and state["evaluations"] == state["version"]
    applied = RunState.from_meta(state, 0.0).applied_tasks
    assert len(applied) <= MEMORY + 2
    task_id, body = _replay_of(run, read_ledger(run))
    assert task_id not in applied  # expired

    procs.start("agg2", *agg, "--resume", env=PACE)
    resumed_at = state["version"]
    wait_for(lambda: history_len(run) > resumed_at + 2, 120, "versions made after the resume")
    _publish_raw(amqp_url, Topology(namespace).updates, body, "replayed-early-update")
    wait_for(lambda: any(e.get("message_id") == "replayed-early-update" for e in read_ledger(run)), 60,
             "the replayed update to get its fate")
    assert procs.wait("agg2", 180) == 0, procs.dump()

    ledger = assert_ledger_invariant(run, all_confirmed(procs))
    [replay] = [e for e in ledger if e.get("message_id") == "replayed-early-update"]
    assert replay["fate"] == "rejected" and "issued too long ago" in replay["reason"], replay
    assert Counter(e["fate"] for e in ledger if e.get("task_id") == task_id)["applied"] == 1
    hist = read_history(run)
    assert hist["history_complete"] is True and hist["final"]["updates_applied"] >= 60
    final_version = hist["final"]["version"]
    assert [h["version"] for h in hist["history"]] == list(range(1, final_version + 1))
    lines = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["version"] for h in lines] == list(range(1, final_version + 1))  # each version exactly once
