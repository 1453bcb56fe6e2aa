"""fedmq.shared.lanes: large numpy loops dealt to a few threads; no caller ever waits behind
another caller's lanes (the workers of one ``fedmq workers`` process quantise side by side)."""

from __future__ import annotations

import threading

import pytest

from fedmq.shared import lanes


@pytest.fixture
def two_lanes(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(lanes, "LANES", 2)
    monkeypatch.setattr(lanes, "_pool", None)
    monkeypatch.setattr(lanes, "_idle", None)
    yield
    if lanes._pool is not None:
        lanes._pool.shutdown(wait=False)


def test_every_lane_runs_once_and_errors_come_back(two_lanes: None) -> None:
    ran: list[tuple[int, str]] = []
    lanes.run_lanes(lambda k, n: ran.append((k, threading.current_thread().name)), 2)
    assert sorted(k for k, _ in ran) == [0, 1]
    assert dict(ran)[0] == threading.current_thread().name and dict(ran)[1].startswith("fedmq-lane")

    def broken(k: int, n: int) -> None:
        if k == 1:
            raise ValueError("lane 1 failed")

    with pytest.raises(ValueError, match="lane 1 failed"):
        lanes.run_lanes(broken, 2)


def test_a_caller_does_its_lanes_itself_while_the_helpers_are_busy(two_lanes: None) -> None:
    release, busy = threading.Event(), threading.Event()

    def slow(k: int, n: int) -> None:
        if k == 1:
            busy.set()
            release.wait(30)

    first = threading.Thread(target=lanes.run_lanes, args=(slow, 2))
    first.start()
    try:
        assert busy.wait(10), "the helper never took lane 1"
        ran: list[tuple[int, str]] = []
        second = threading.Thread(target=lanes.run_lanes, args=(lambda k, n: ran.append((k, threading.current_thread().name)), 2))
        second.start()
        second.join(10)
        assert not second.is_alive(), "a caller waited for a helper another caller holds"
        assert sorted(k for k, _ in ran) == [0, 1] and {name for _, name in ran} == {second.name}
    finally:
        release.set()
        first.join(10)
