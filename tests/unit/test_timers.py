"""Stamps: expiry of workers and tasks without a scan of the table per event (issue 15, scale).

At N = 1,000 workers the aggregator scanned every live worker and every outstanding task on
each presence message, update and tick: its CPU per applied update was 3.8x that at N = 4.
"""

from __future__ import annotations

import random

from fedmq.aggregator.timers import Stamps
from fedmq.shared import messages
from tests.unit.test_core import Driver, IssueTask, TaskExpired, WorkerLeft, config, coordinator, of


def naive_expired(table: dict[str, float], now: float, timeout: float) -> list[str]:
    old = [k for k, t in table.items() if now - t > timeout]
    for k in old:
        del table[k]
    return old


def test_expired_matches_a_full_scan_under_random_refreshes_and_removals() -> None:
    rng = random.Random(7)
    stamps, plain = Stamps(5.0), {}
    now = 0.0
    for _ in range(20_000):
        now += rng.random() * 0.05
        key = f"k{rng.randrange(200)}"
        op = rng.random()
        if op < 0.6:
            stamps[key] = plain[key] = now
        elif op < 0.7:
            stamps.pop(key, None)
            plain.pop(key, None)
        else:
            assert stamps.expired(now) == naive_expired(plain, now, 5.0)
        assert dict(stamps) == plain
        expiry = stamps.next_expiry()
        if plain:
            assert expiry is not None and expiry <= min(plain.values()) + 5.0  # never after the first expiry
        else:
            assert expiry is None


def test_an_expiry_exactly_at_the_timeout_is_not_yet_one() -> None:
    stamps = Stamps(2.0, {"a": 1.0})
    assert stamps.expired(3.0) == [] and "a" in stamps
    assert stamps.expired(3.0001) == ["a"] and not stamps
    assert stamps.next_expiry() is None


def test_refreshing_every_key_scans_once_per_timeout_not_once_per_event() -> None:
    stamps = Stamps(20.0)
    n, period = 1_000, 5.0  # 1,000 workers, a heartbeat each every 5 s
    now = 0.0
    for i in range(n):
        stamps[f"w{i}"] = now
    events = 0
    for beat in range(n * 60):  # 5 minutes of heartbeats, round robin
        now = beat * period / n
        stamps[f"w{beat % n}"] = now
        assert stamps.expired(now) == []
        events += 1
    assert len(stamps) == n
    assert stamps.scans <= 300 / 15 + 1  # the oldest is refreshed 15 s before it would expire
    assert stamps.scans * 100 < events


def test_the_core_tracks_a_thousand_workers_without_scanning_them_per_message() -> None:
    run = Driver(coordinator(config(mode="async", strategy="fedbuff", buffer_size=3, min_workers=4,
                                    presence_timeout=20.0, task_timeout=300.0)))
    run.start(0.0)
    n = 1_000
    issued: list[str] = []
    for i in range(n):
        issued += [d.task.task_id for d in of(IssueTask, run.hello(f"w{i}", 0.001 * i))]
    assert len(issued) == n  # one task per live worker
    for beat in range(10 * n):  # 50 s of heartbeats: every worker beats every 5 s
        now = 1.0 + beat * 5.0 / n
        got = run.core.presence(messages.Control(kind="heartbeat", worker_id=f"w{beat % n}"), now)
        assert not of(WorkerLeft, got) and not of(TaskExpired, got)
        run.core.next_wake(now)
    assert run.core.live_workers() == n
    assert run.core.live.scans <= 5  # was a scan of 1,000 workers on every message
    assert run.core.outstanding.scans == 0  # no task is near its 300 s timeout
    # and expiry still happens: silence for longer than the timeout
    left = of(WorkerLeft, run.tick(1.0 + 10 * 5.0 + 20.5))
    assert len(left) == n

