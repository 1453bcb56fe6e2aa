"""When a checkpoint also rewrites history.json (:class:`SnapshotSchedule`): at most once per
interval, and a write put off is owed until a later checkpoint pays it. Pure, no broker."""

from __future__ import annotations

from fedmq.aggregator.history import SnapshotSchedule


def test_first_checkpoint_writes_history_json() -> None:
    s = SnapshotSchedule(1.0)
    assert s.deadline() is None and not s.owed(100.0)
    assert s.offer(100.0)
    assert s.deadline() is None


def test_checkpoints_within_the_interval_write_once_and_owe_one() -> None:
    s = SnapshotSchedule(1.0)
    assert s.offer(10.0)
    written = [s.offer(10.0 + 0.1 * i) for i in range(1, 10)]  # nine more checkpoints in 0.9 s
    assert written == [False] * 9
    assert s.deadline() == 11.0
    assert not s.owed(10.95)
    assert s.owed(11.0)  # the main loop takes a checkpoint now, which offers again
    assert s.offer(11.0)
    assert s.deadline() is None and not s.owed(50.0)  # paid: nothing owed while the run is quiet


def test_a_checkpoint_after_the_interval_writes_at_once() -> None:
    s = SnapshotSchedule(1.0)
    assert s.offer(0.0)
    assert not s.offer(0.5)
    assert s.offer(1.7)  # pays the owed write too
    assert s.deadline() is None
