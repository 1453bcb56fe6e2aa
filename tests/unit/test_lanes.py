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


@pytest.mark.parametrize("value", ["0", "-1", "65", "two", "1.5"])
def test_fedmq_lanes_must_be_a_small_positive_integer(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    from fedmq.shared.errors import ConfigError

    monkeypatch.setattr(lanes, "LANES", 2)
    with pytest.raises(ConfigError, match="FEDMQ_LANES must be an integer from 1 to 64"):
        lanes.configure(value)
    assert lanes.LANES == 2


def test_fedmq_lanes_sets_the_lanes_and_one_keeps_loops_on_their_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lanes, "LANES", 2)
    lanes.configure(None)
    lanes.configure("")
    assert lanes.LANES == 2  # unset: the default
    lanes.configure("1")
    assert lanes.LANES == 1 and lanes.lanes_for(10 * lanes.PARALLEL_MIN, 100) == 1
    lanes.configure("3")
    assert lanes.lanes_for(lanes.PARALLEL_MIN, 100) == 3 and lanes.lanes_for(lanes.PARALLEL_MIN - 1, 100) == 1


def test_a_bad_fedmq_lanes_stops_any_command_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from fedmq.cli import main

    monkeypatch.setattr(lanes, "LANES", lanes.LANES)  # restored after the good value below
    result = CliRunner().invoke(main, ["data", "--help"], env={"FEDMQ_LANES": "zero"})
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "fedmq: error: FEDMQ_LANES must be an integer from 1 to 64 (1: no threads of fedmq's own for large "
        "numpy loops), got 'zero'"]
    good = CliRunner().invoke(main, ["data", "--help"], env={"FEDMQ_LANES": "1"})
    assert good.exit_code == 0 and lanes.LANES == 1


def test_a_process_started_with_fedmq_lanes_follows_it_without_the_cli() -> None:
    """The pool processes of `fedmq workers` are spawned Python processes that never run the CLI."""
    import os
    import subprocess
    import sys

    code = "from fedmq.shared import lanes; print(lanes.LANES)"
    env = {**os.environ, "FEDMQ_LANES": "3"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "3"
