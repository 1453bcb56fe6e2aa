"""FedAvg's weighted average reduces a layer block by block (float64 scratch bounded whatever the
layer's size) and gives the very bits of a whole-layer float64 sum in the same order."""

from __future__ import annotations

import numpy as np
import pytest

from fedmq.aggregator import averaging


def whole_layer(updates: list[tuple[dict[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    total = sum(w for _, w in updates)
    out = {}
    for name in updates[0][0]:
        acc = np.zeros(updates[0][0][name].shape, dtype=np.float64)
        for params, w in updates:
            acc += np.multiply(params[name], w, dtype=np.float64)
        out[name] = (acc / total).astype(np.float32)
    return out


def test_blocked_average_is_bit_identical_to_a_whole_layer_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(averaging, "REDUCE_BLOCK", 1000)  # many blocks, the last one short
    rng = np.random.default_rng(7)
    updates = [({"W": rng.standard_normal((123, 77), dtype=np.float32), "b": rng.standard_normal(5, dtype=np.float32)},
                float(rng.integers(1, 500))) for _ in range(4)]
    got, want = averaging.weighted_average(updates), whole_layer(updates)
    for name in want:
        assert got[name].dtype == np.float32 and got[name].shape == want[name].shape
        assert got[name].tobytes() == want[name].tobytes()


def test_an_average_shared_between_threads_has_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """A large average is dealt block by block to the lanes (fedmq.shared.lanes); each element is
    still summed by one thread in the given order, so the bits are those of one whole-layer sum."""
    import threading

    from fedmq.shared import lanes

    monkeypatch.setattr(averaging, "REDUCE_BLOCK", 1000)
    monkeypatch.setattr(lanes, "PARALLEL_MIN", 0)
    monkeypatch.setattr(lanes, "LANES", 3)
    monkeypatch.setattr(lanes, "_pool", None)  # a pool of 2 helpers for this test
    monkeypatch.setattr(lanes, "_idle", None)
    seen: set[str] = set()
    monkeypatch.setattr(averaging, "release_pages", lambda block: seen.add(threading.current_thread().name))
    rng = np.random.default_rng(11)
    updates = [({"W": rng.standard_normal((97, 131), dtype=np.float32), "b": rng.standard_normal(7, dtype=np.float32),
                 "empty": np.zeros((0, 3), dtype=np.float32)}, float(rng.integers(1, 500))) for _ in range(5)]
    try:
        got = averaging.weighted_average(updates)
    finally:
        if lanes._pool is not None:
            lanes._pool.shutdown()
    want = whole_layer(updates)
    for name in want:
        assert got[name].shape == want[name].shape and got[name].tobytes() == want[name].tobytes()
    # this thread and the helpers took blocks (which helper thread runs which lane is the pool's choice)
    assert threading.current_thread().name in seen and any(n.startswith("fedmq-lane") for n in seen), seen
