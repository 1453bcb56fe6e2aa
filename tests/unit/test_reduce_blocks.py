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
