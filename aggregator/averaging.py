"""The plain weighted mean every aggregation rule builds on (no strategy, no rule: a leaf module)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Params = dict[str, np.ndarray]


def weighted_average(updates: Sequence[tuple[Mapping[str, np.ndarray], float]]) -> Params:
    """Σ w_k·p_k / Σ w_k, accumulated in float64 in the given order, returned as float32."""
    if not updates:
        raise ValueError("weighted_average needs at least one update")
    total = float(sum(w for _, w in updates))
    if total <= 0:
        raise ValueError("weighted_average needs a positive total weight")
    names = list(updates[0][0])
    out: Params = {}
    for name in names:
        shape = updates[0][0][name].shape
        acc = np.zeros(shape, dtype=np.float64)
        tmp = np.empty(shape, dtype=np.float64)
        for params, weight in updates:
            np.multiply(params[name], weight, out=tmp, dtype=np.float64)
            acc += tmp
        acc /= total
        out[name] = acc.astype(np.float32)
    return out
