"""The numpy half of the workload: the model's arrays and the stand-in "training" (no Flower import).

These mirror ``bench.standin.NoiseTrainer`` exactly (``tests/unit/test_peer_workload.py`` checks
it by loading this file beside fedmq): the MLP 784 -> hidden -> 10 as W1, b1, W2, b2 drawn as
normal x 0.01 with seed 0, and ``fit`` = the weights plus a slice of one N(0, 1e-3^2) float32
vector drawn once per process, at an offset chosen per call.
"""

from __future__ import annotations

import numpy as np

NOISE_SCALE = 1e-3
POOL_SLACK = 4096
#: the samples each worker shard has in bench/round_time.py (FedAvg weights by it)
SHARD_EXAMPLES = 32
_POOL: dict[int, np.ndarray] = {}


def layer_shapes(hidden: int, inputs: int = 784, classes: int = 10) -> list[tuple[int, ...]]:
    """W1, b1, W2, b2 of the MLP inputs -> hidden -> classes (fedmq.shared.nn's order and shapes)."""
    return [(inputs, hidden), (hidden,), (hidden, classes), (classes,)]


def init_arrays(hidden: int, seed: int = 0) -> list[np.ndarray]:
    """The initial model, as ``NoiseTrainer.init_params`` draws it."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s, dtype=np.float32) * np.float32(0.01) for s in layer_shapes(hidden)]


def perturb(arrays: list[np.ndarray], call_seed: int, seed: int = 0) -> list[np.ndarray]:
    """``arrays`` plus N(0, 1e-3^2) float32 noise, as ``NoiseTrainer.fit(..., seed=call_seed)`` computes it."""
    total = sum(int(a.size) for a in arrays)
    pool = _POOL.get(total)
    if pool is None:  # drawn once per process, like NoiseTrainer's pool
        pool = np.random.default_rng(seed).standard_normal(total + POOL_SLACK, dtype=np.float32)
        pool *= np.float32(NOISE_SCALE)
        _POOL[total] = pool
    offset = int(np.random.default_rng([seed, call_seed]).integers(POOL_SLACK))
    out, start = [], offset
    for a in arrays:
        out.append(np.asarray(a, dtype=np.float32) + pool[start : start + a.size].reshape(a.shape))
        start += a.size
    return out
