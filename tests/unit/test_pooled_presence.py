"""Pooled heartbeats: one presence message for the workers of a ``fedmq workers`` process.

1,000 pooled workers beating every 5 s sent the aggregator 200 presence messages a second, which
it decoded, acked and fed to its core one by one: its CPU per applied update was 1.6x that at
N = 4. A pooled heartbeat names the process's other workers (``info["workers"]``).
"""

from __future__ import annotations

from fedmq.shared import messages
from tests.unit.test_core import (
    Driver,
    IssueTask,
    WorkerJoined,
    WorkerLeft,
    config,
    coordinator,
    of,
)


def pooled(worker: str, others: object) -> messages.Control:
    return messages.Control(kind="heartbeat", worker_id=worker, info={"tasks_done": 0, "workers": others})


def test_a_pooled_heartbeat_keeps_every_worker_it_names_alive() -> None:
    run = Driver(coordinator(config(mode="async", strategy="fedbuff", buffer_size=3, min_workers=3,
                                    presence_timeout=20.0)))
    run.start(0.0)
    got = run.core.presence(pooled("w0", ["w1", "w2"]), 1.0)
    assert [d.worker_id for d in of(WorkerJoined, got)] == ["w0", "w1", "w2"]
    assert len(of(IssueTask, got)) == 3  # three live workers: three tasks
    for t in range(2, 60, 5):  # only w0's process beats, for all three
        assert not of(WorkerLeft, run.core.presence(pooled("w0", ["w1", "w2"]), float(t)))
    assert run.core.live_workers() == 3
    # the process stops naming w2 (its connection is down): it goes silent like a lone worker
    for t in range(62, 90, 5):
        left = of(WorkerLeft, run.core.presence(pooled("w0", ["w1"]), float(t)))
        if left:
            assert [d.worker_id for d in left] == ["w2"]
    assert sorted(run.core.live) == ["w0", "w1"]


def test_a_malformed_pooled_list_counts_for_its_sender_only_and_revives_no_refused_worker() -> None:
    run = Driver(coordinator(config(mode="async", strategy="fedbuff", buffer_size=3, min_workers=1)))
    run.start(0.0)
    for bad in ("w1", [1, 2], ["w1", ""], ["x" * 201], [f"w{i}" for i in range(2000)]):
        got = run.core.presence(pooled("w0", bad), 1.0)
        assert {d.worker_id for d in of(WorkerJoined, got)} <= {"w0"}
    assert sorted(run.core.live) == ["w0"]
    run.core.presence(messages.Control(kind="refused", worker_id="w5", info={"reason": "no fit"}), 2.0)
    run.core.presence(pooled("w0", ["w5"]), 3.0)
    assert "w5" not in run.core.live
