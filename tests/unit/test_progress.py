"""`fedmq run`'s display, fed a stream of events as the aggregator emits them (no broker)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedmq.progress import Progress
from fedmq.runner import AggregatorLog
from fedmq.shared import events

OPTIONS = {"mode": "async", "strategy": "fedbuff"}


def line(name: str, message: str = "human text that may change", level: str = "info", **fields: Any) -> str:
    """One JSON log line carrying event ``name``, as ``--log-format json`` prints it."""
    events.check(name, fields)
    return json.dumps({"ts": 1.0, "level": level, "logger": "fedmq.aggregator", "msg": message, "event": name, **fields})


def evaluated(version: int, **over: Any) -> dict[str, Any]:
    fields = {"version": version, "accuracy": 0.5 + version / 100, "loss": 1.0 / version, "updates_applied": 3 * version,
              "staleness_mean": 0.5, "time_s": float(version)}
    return {"event": "version_evaluated", **fields, **over}


def settled(message_id: str, fate: str, **over: Any) -> dict[str, Any]:
    return {"event": "update_settled", "message_id": message_id, "fate": fate, **over}


STREAM: list[dict[str, Any]] = [
    {"event": "waiting_for_workers", "namespace": "ns", "have": 0, "need": 3},
    {"event": "worker_joined", "worker_id": "w0"},
    {"event": "worker_joined", "worker_id": "w1"},
    {"event": "worker_joined", "worker_id": "w2"},
    {"event": "worker_joined", "worker_id": "w1"},  # a joined worker heard again: still three
    settled("m1", "applied", task_id="t1", worker_id="w0", staleness=0),
    settled("m2", "rejected", reason="not msgpack"),
    settled("m3", "stale", task_id="t3", worker_id="w1", staleness=9),
    settled("m4", "duplicate", task_id="t1", worker_id="w0"),
    evaluated(1),
    {"event": "worker_left", "worker_id": "w2", "reason": "silent"},
    {"event": "worker_left", "worker_id": "w9", "reason": "bye"},  # never joined: ignored
    settled("m5", "applied"),
    settled("m6", "late"),
    evaluated(2),
]


def test_every_event_in_the_stream_matches_the_schema() -> None:
    for event in STREAM:
        fields = {k: v for k, v in event.items() if k != "event"}
        events.check(event["event"], fields)


def test_counts_workers_and_fates_from_events(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress(OPTIONS, total_workers=3, mode="plain")
    for event in STREAM:
        progress.event(event)
    assert progress.workers == {"w0", "w1"}
    assert progress.counts["rejected"] == 1  # one update_settled per message: counted once
    assert dict(progress.counts) == {**dict.fromkeys(events.FATES, 0), "applied": 2, "rejected": 1, "stale": 1,
                                     "duplicate": 1, "late": 1}
    assert progress.last["version"] == 2 and progress.last["updates_applied"] == 6
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "  waiting for 3 worker(s) to say hello"
    assert out[1].startswith("version    1  acc 0.5100") and "workers 3/3" in out[1] and "dead-lettered 1" in out[1]
    assert out[2].startswith("version    2  acc 0.5200") and "workers 2/3" in out[2] and "stale 1" in out[2]
    assert len(out) == 3  # one line per evaluated version, nothing for the other events


def test_sync_rounds_show_the_round() -> None:
    progress = Progress({"mode": "sync"}, total_workers=2, mode="plain")
    progress.event(evaluated(4, round=2))
    assert progress._line().startswith("round   2")


def test_unknown_or_foreign_events_change_nothing() -> None:
    progress = Progress(OPTIONS, total_workers=1, mode="plain")
    progress.event({"event": "task_started", "task_id": "t", "worker_id": "w0"})  # a worker's event
    progress.event({"event": "something_new"})
    assert not progress.workers and sum(progress.counts.values()) == 0 and not progress.last


def test_live_table_renders() -> None:
    progress = Progress(OPTIONS, total_workers=2, mode="live")
    for event in STREAM:
        progress.event(event)
    table = progress._table()
    assert [c.header for c in table.columns][:2] == ["version", "accuracy"]


def test_summary_falls_back_to_the_finished_event(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress(OPTIONS, total_workers=2, mode="plain")
    progress.event({"event": "finished", "version": 7, "accuracy": 0.91, "updates_applied": 21, "updates_rejected": 1,
                    "updates_stale": 2, "updates_duplicate": 0, "updates_late": 0, "reached_target": True,
                    "interrupted": False, "time_s": 3.0})
    progress.summary({}, tmp_path)
    out = capsys.readouterr().out
    assert "final version                  7" in out and "0.9100" in out and "1 / 2 / 0" in out


def test_aggregator_log_feeds_events_only_once_and_keeps_error_lines(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The runner's reader of the aggregator's stderr: events by schema, not by message text."""
    progress = Progress(OPTIONS, total_workers=2, mode="plain")
    agg_log = AggregatorLog(None, tmp_path / "aggregator.log", progress)
    lines = [
        json.dumps({"ts": 1.0, "level": "info", "logger": "x", "msg": "worker w0 joined"}),  # text only: no event
        line("worker_joined", worker_id="w0"),
        line("update_settled", "rejecting update message m1: not msgpack", level="warning", message_id="m1",
             fate="rejected", reason="not msgpack"),
        json.dumps({"ts": 1.0, "level": "info", "logger": "x", "msg": "update t1 from w0: rejected (x)"}),
        line("version_evaluated", version=1, accuracy=0.5, loss=1.0, updates_applied=0, staleness_mean=0.0, time_s=1.0),
        json.dumps({"ts": 1.0, "level": "error", "logger": "x", "msg": "could not dead-letter message m2"}),
        "fedmq: error: strategy fedbuff does not run in sync mode",
    ]
    assert not agg_log.up.is_set()
    for text in lines:
        agg_log.line(text + "\n")
    assert agg_log.up.is_set()
    assert progress.workers == {"w0"} and progress.counts["rejected"] == 1
    assert agg_log.last_error() == "fedmq: error: strategy fedbuff does not run in sync mode"
    assert "could not dead-letter message m2" in agg_log.errors
    err = capsys.readouterr().err
    assert "aggregator warning: rejecting update message m1" in err  # warnings are shown, not parsed


def test_summary_of_an_interrupted_run_says_how_to_continue_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress(OPTIONS, total_workers=3, mode="plain")
    progress.summary({"version": 7, "accuracy": 0.8, "updates_applied": 21, "interrupted": True}, tmp_path)
    out = capsys.readouterr().out
    assert f"--resume --out {tmp_path}" in out
    progress.summary({"version": 7, "accuracy": 0.8, "updates_applied": 21, "interrupted": False}, tmp_path)
    assert "--resume" not in capsys.readouterr().out
