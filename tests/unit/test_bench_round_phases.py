"""bench/round_time.py: where a round goes, read from the aggregator's and the workers' events."""

from __future__ import annotations

from typing import Any

import pytest

from bench.round_time import PHASES, round_phases


def ev(name: str, ts: float, **fields: Any) -> dict[str, Any]:
    return {"event": name, "ts": ts, **fields}


def one_round(r: int, t0: float, workers: int = 2) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Round ``r`` closes at t0 + 1.0; the round before it closed at t0 (its checkpoint at +0.05)."""
    agg = [ev("checkpoint_written", t0 + 0.05, version=r - 1, acked=workers), ev("round_closed", t0 + 1.0, round=r, version=r, updates=workers)]
    wk = []
    for i in range(workers):
        wk.append(ev("task_started", t0 + 0.2 + 0.1 * i, task_id=f"r{r:05d}-{i:03d}", worker_id=f"w{i}", version=r - 1))
        wk.append(ev("update_confirmed", t0 + 0.6 + 0.1 * i, task_id=f"r{r:05d}:w{i}", message_id="m", worker_id=f"w{i}",
                     ticket=f"r{r:05d}-{i:03d}"))
    return agg, wk


def test_each_phase_is_the_gap_between_the_last_events_of_the_chain() -> None:
    agg = [ev("round_closed", 0.0, round=1, version=1, updates=2)]
    wk: list[dict[str, Any]] = []
    for r in (2, 3, 4):
        a, w = one_round(r, float(r - 2))
        agg += a
        wk += w
    got = round_phases(agg, wk, rounds=4)
    assert list(got) == list(PHASES)
    # close -> checkpoint 50 ms, -> last start (0.3) 250 ms, -> last confirm (0.7) 400 ms, -> close (1.0) 300 ms
    assert got == pytest.approx({"checkpoint": 50.0, "to workers": 250.0, "work": 400.0, "in": 300.0})


def test_no_checkpoint_events_no_phases() -> None:
    agg = [ev("round_closed", 0.0, round=1, version=1, updates=2)]
    wk: list[dict[str, Any]] = []
    for r in (2, 3):
        a, w = one_round(r, float(r - 2))
        agg += [e for e in a if e["event"] != "checkpoint_written"]  # an aggregator at info level
        wk += w
    assert round_phases(agg, wk, rounds=3) == {}
