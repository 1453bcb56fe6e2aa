"""bench/update_path.py's per-path figures: confirm percentiles and CPU over the path's own window."""

from __future__ import annotations

import pytest

from bench.update_path import CpuSampler, confirm_percentiles


def test_confirm_percentiles_are_the_p50_and_p90_in_ms() -> None:
    got = confirm_percentiles([i / 1000 for i in range(1, 11)])  # 1..10 ms
    assert got == {"confirm_p50_ms": pytest.approx(6.0), "confirm_p90_ms": pytest.approx(10.0)}


def snap(wall: float, broker: float, busy: float, total: float) -> dict[str, float]:
    return {"wall": wall, "rabbitmq": broker, "machine_busy": busy, "machine_total": total}


def test_the_window_counts_only_the_snapshots_inside_it_and_scales_to_its_share_of_messages() -> None:
    sampler = CpuSampler()
    sampler.snaps = [
        snap(0.0, 0.0, 0.0, 0.0),  # start-up: left out
        snap(10.0, 5.0, 10.0, 20.0),
        snap(11.0, 5.5, 11.5, 22.0),  # 1 s of 2 cores: broker 0.5 s, machine 1.5 s busy
        snap(30.0, 9.0, 30.0, 60.0),  # teardown: left out
    ]
    # 200 messages from t=10 to t=12: the window (10..11) saw half of them
    got = sampler.window(10.0, 12.0, 200)
    assert got["broker_cpu_ms_per_update"] == pytest.approx(5.0)
    assert got["machine_cpu_ms_per_update"] == pytest.approx(15.0)
    assert got["machine_busy"] == pytest.approx(0.75)


def test_a_window_with_fewer_than_two_snapshots_reports_nothing() -> None:
    sampler = CpuSampler()
    sampler.snaps = [snap(10.0, 5.0, 10.0, 20.0)]
    assert set(sampler.window(10.0, 12.0, 100).values()) == {None}
