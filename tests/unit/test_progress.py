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


# ------------------------------------------------------------------ where the run goes, and the live table
class Clock:
    """A clock the test moves (what Progress measures the time since the last event with)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def rounds_of(n: int, seconds: float) -> list[dict[str, Any]]:
    """Sync rounds 1..n of ``seconds`` each (the aggregator's run time at each evaluation)."""
    return [evaluated(r, round=r, time_s=r * seconds, updates_applied=2 * r) for r in range(1, n + 1)]


def test_sync_shows_round_of_rounds_and_the_time_left_from_the_mean_round_time(capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    progress = Progress({"mode": "sync", "rounds": 10}, total_workers=2, mode="plain", clock=clock)
    assert progress.remaining_s() is None  # nothing to go by before the first round
    for event in rounds_of(2, 1.0):
        progress.event(event)
    assert progress.where() == "round 2/10"
    assert progress.remaining_s() == pytest.approx(8.0)  # 8 rounds left at 1 s each
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("round   2/10  acc") and out[-1].endswith("left ~8 s"), out
    clock.now += 3.0  # 3 s into round 3: the estimate counts down
    assert progress.remaining_s() == pytest.approx(5.0) and progress.run_time_s() == pytest.approx(5.0)
    clock.now += 60.0  # slower than the mean: never below zero
    assert progress.remaining_s() == 0.0


def test_the_estimate_is_capped_by_the_time_limit_and_uses_max_updates_in_async() -> None:
    clock = Clock()
    capped = Progress({"mode": "sync", "rounds": 10, "time_limit": 5.0}, total_workers=2, mode="plain", clock=clock)
    unbounded = Progress({"mode": "sync", "target_accuracy": 0.9}, total_workers=2, mode="plain", clock=clock)
    default = Progress({"mode": "sync"}, total_workers=2, mode="plain", clock=clock)
    for event in rounds_of(2, 1.0):
        for p in (capped, unbounded, default):
            p.event(event)
    assert capped.remaining_s() == pytest.approx(3.0)  # the time limit comes before round 10
    assert unbounded.where() == "round 2" and unbounded.remaining_s() is None
    assert default.where() == "round 2/20" and default.remaining_s() == pytest.approx(18.0)  # the aggregator's default
    progress = Progress({"mode": "async", "max_updates": 200}, total_workers=2, mode="plain", clock=clock)
    progress.event(evaluated(10, updates_applied=30, time_s=3.0))
    assert progress.where() == "updates 30/200" and progress.remaining_s() == pytest.approx(17.0)


def frames(console: Any) -> int:
    """How many times the live table was drawn on ``console``."""
    return str(console.file.getvalue()).count("fedmq run: sync / fedavg")


def test_live_table_is_redrawn_on_every_event_and_warnings_print_above_it() -> None:
    from io import StringIO

    from rich.console import Console

    console = Console(file=StringIO(), force_terminal=True, width=160, color_system=None)
    clock = Clock()
    progress = Progress({"mode": "sync", "rounds": 10}, total_workers=2, mode="live", console=console, clock=clock,
                        auto_refresh=False)  # drawn only when something happens
    progress.start()
    try:
        assert frames(console) == 1
        stream = [
            {"event": "waiting_for_workers", "namespace": "ns", "have": 0, "need": 2},
            {"event": "worker_joined", "worker_id": "w0"},
            {"event": "worker_joined", "worker_id": "w1"},
            settled("m1", "applied", task_id="t1", worker_id="w0", staleness=0),
            {"event": "round_closed", "round": 1, "version": 1, "updates": 2},
            *rounds_of(2, 1.0),
            {"event": "round_waiting", "round": 3, "have": 1, "wanted": 2, "waited_s": 12.0},
            {"event": "something_new"},  # unknown: nothing changes, but it is drawn again
        ]
        for i, event in enumerate(stream, start=2):
            progress.event(event)
            assert frames(console) == i, event  # one more drawing per event
        last = str(console.file.getvalue()).rsplit("fedmq run: sync / fedavg", 1)[1]
        assert "2/10" in last and "~8 s" in last and "2/2" in last  # round 2 of 10, 8 s left, both workers
        assert "round 3 waits for updates: 1/2 after 12 s" in last
        progress.notice("warning", "worker w1 is [slow]")
        text = str(console.file.getvalue())
        assert "aggregator warning: worker w1 is [slow]" in text  # not read as markup
        assert text.index("worker w1 is [slow]") < text.rindex("fedmq run: sync / fedavg")  # above the table
        clock.now += 30.0
        progress.event({"event": "finished", "version": 3, "accuracy": 0.9, "updates_applied": 6, "updates_rejected": 0,
                        "updates_stale": 0, "updates_duplicate": 0, "updates_late": 0, "reached_target": False,
                        "interrupted": False, "time_s": 3.0})
        last = str(console.file.getvalue()).rsplit("fedmq run: sync / fedavg", 1)[1]
        assert "3.0 s" in last and "done" in last  # the run's own time, not the clock's
    finally:
        progress.stop()
    assert progress._live is None
