"""`fedmq status` computed from run-directory files (no broker: --no-broker)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from click.testing import CliRunner

from fedmq.cli import main
from fedmq.status import LedgerReader, collect, run_state, worker_rows


def entry(worker: str | None, fate: str, staleness: int = 0, **more: object) -> dict[str, object]:
    e: dict[str, object] = {"message_id": os.urandom(4).hex(), "fate": fate, "staleness": staleness, "time_s": 1.0}
    if worker:
        e["worker_id"] = worker
    return {**e, **more}


def write_run(run: Path, ledger: list[dict[str, object]], final: dict[str, object] | None = None) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    hist = [{"version": 1, "time_s": 1.0, "accuracy": 0.5, "loss": 1.0, "updates_applied": 2, "staleness_mean": 0.0},
            {"version": 2, "time_s": 2.0, "accuracy": 0.75, "loss": 0.5, "updates_applied": 4, "staleness_mean": 1.0}]
    doc = {"config": {"mode": "async", "strategy": "fedbuff", "target_accuracy": 0.9}, "namespace": "ns",
           "history": hist, "final": final or {"version": 2, "updates_applied": 4, "time_s": 2.0, "interrupted": False}}
    (run / "history.json").write_text(json.dumps(doc))
    (run / "updates.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ledger))
    return run


LEDGER = [
    entry("w10", "applied", 0, train_loss=0.9, train_accuracy=0.6, duration_s=0.2),
    entry("w2", "applied", 1),
    entry("w2", "applied", 3),
    entry("w10", "applied", 2, train_loss=0.4, train_accuracy=0.8, duration_s=0.4),
    entry("w2", "stale", 9),
    entry("w10", "duplicate", 0),
    entry(None, "rejected"),
]


def test_worker_rows_count_fates_and_use_training_figures_when_present() -> None:
    rows = {r["worker_id"]: r for r in worker_rows(LEDGER)}
    assert list(rows) == ["w2", "w10", "?"]  # natural order; an undecodable update has no worker
    assert (rows["w2"]["applied"], rows["w2"]["stale"], rows["w2"]["mean_staleness"]) == (2, 1, 2.0)
    assert rows["w2"]["last_train_loss"] is None
    assert (rows["w10"]["applied"], rows["w10"]["duplicate"], rows["w10"]["mean_staleness"]) == (2, 1, 1.0)
    assert (rows["w10"]["last_train_loss"], rows["w10"]["last_train_accuracy"]) == (0.4, 0.8)
    assert abs(rows["w10"]["mean_duration_s"] - 0.3) < 1e-9
    assert rows["?"]["rejected"] == rows["?"]["failures"] == 1


def test_state_from_the_files(tmp_path: Path) -> None:
    run = tmp_path / "r"
    assert run_state(run, None) == "starting"
    write_run(run, LEDGER)
    doc = json.loads((run / "history.json").read_text())
    assert run_state(run, doc) == "running"
    (run / "model.npz").write_bytes(b"x")  # the aggregator writes it once, after its last checkpoint
    assert run_state(run, doc) == "finished"
    doc["final"]["finished"] = False  # an aggregator that says so is believed
    assert run_state(run, doc) == "running"
    doc["final"]["interrupted"] = True
    assert run_state(run, doc) == "interrupted"


def test_ledger_reader_reads_new_complete_lines_and_starts_over_after_a_truncation(tmp_path: Path) -> None:
    path = tmp_path / "updates.jsonl"
    reader = LedgerReader(path)
    assert reader.read() == []
    path.write_text(json.dumps(LEDGER[0]) + "\n" + json.dumps(LEDGER[1])[:10])  # a line being written
    assert len(reader.read()) == 1
    with open(path, "w") as f:
        f.write("".join(json.dumps(e) + "\n" for e in LEDGER))
    assert len(reader.read()) == len(LEDGER)
    path.write_text(json.dumps(LEDGER[0]) + "\n")  # --resume truncated it back to a checkpoint
    assert len(reader.read()) == 1


def test_status_command_text_and_json(tmp_path: Path) -> None:
    run = write_run(tmp_path / "r", LEDGER)
    (run / "model.npz").write_bytes(b"x")
    result = CliRunner().invoke(main, ["status", str(run), "--no-broker"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "finished (async / fedbuff)" in out and "accuracy 0.7500 (target 0.9)" in out
    assert "applied 4, stale 1, duplicate 1, rejected 1, late 0" in out
    w10 = next(line for line in out.splitlines() if line.strip().startswith("w10"))
    assert w10.split()[1:3] == ["2", "0"] and "0.4000" in w10
    result = CliRunner().invoke(main, ["status", str(run), "--no-broker", "--json"])
    doc = json.loads(result.output)
    assert doc == collect(run, broker=False)
    assert doc["updates_per_s"] == 2.0 and doc["fates"]["stale"] == 1 and len(doc["workers"]) == 3


def test_status_follow_on_a_finished_run_prints_once_and_exits(tmp_path: Path) -> None:
    run = write_run(tmp_path / "r", LEDGER)
    (run / "model.npz").write_bytes(b"x")
    result = CliRunner().invoke(main, ["status", str(run), "--no-broker", "--follow", "--json"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["state"] for line in result.output.splitlines()] == ["finished"]


def test_status_of_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["status", str(tmp_path / "nope")])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "nope" in result.output


def test_a_workers_failed_tasks_are_its_failures(tmp_path: Path) -> None:
    rows = worker_rows([entry("w1", "failed"), entry("w1", "rejected"), entry("w1", "incomplete"), entry("w1", "late")])
    assert (rows[0]["failed"], rows[0]["failures"], rows[0]["other"]) == (1, 2, 2)
