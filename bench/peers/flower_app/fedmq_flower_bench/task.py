"""The workload of fedmq's ``bench/round_time.py``, written against Flower's Message API.

* Model: the parameters of an MLP 784 -> hidden -> 10 (weights and biases, float32), drawn
  like ``bench.standin.NoiseTrainer.init_params`` (normal x 0.01, seed 0).
* "Training" (:func:`perturb`): the same stand-in as ``NoiseTrainer.fit``: the incoming weights
  plus a slice of one pre-drawn ``N(0, 1e-3^2)`` float32 vector (drawn once per process, at an
  offset chosen per call), and 32 examples reported (the shard size round_time.py uses).
* Aggregation: Flower's own ``FedAvg`` (weighted by ``num-examples``), every node every round,
  no federated evaluation. A centralised ``evaluate_fn`` that does no work stamps the end of
  each round (Flower calls it before round 1 and after every round), like fedmq's history.json.

Nothing here imports fedmq: this file runs in Flower's own virtual environment.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

NOISE_SCALE = 1e-3
POOL_SLACK = 4096
SHARD_EXAMPLES = 32
_POOL: dict[int, np.ndarray] = {}


def layer_shapes(hidden: int, inputs: int = 784, classes: int = 10) -> list[tuple[int, ...]]:
    """W1, b1, W2, b2 of the MLP inputs -> hidden -> classes (fedmq.shared.nn's order and shapes)."""
    return [(inputs, hidden), (hidden,), (hidden, classes), (classes,)]


def init_arrays(hidden: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s, dtype=np.float32) * np.float32(0.01) for s in layer_shapes(hidden)]


def perturb(arrays: list[np.ndarray], call_seed: int, seed: int = 0) -> list[np.ndarray]:
    """``arrays`` plus N(0, 1e-3^2) float32 noise, as ``NoiseTrainer.fit`` computes it."""
    total = sum(int(a.size) for a in arrays)
    pool = _POOL.get(total)
    if pool is None:
        pool = np.random.default_rng(seed).standard_normal(total + POOL_SLACK, dtype=np.float32)
        pool *= np.float32(NOISE_SCALE)
        _POOL[total] = pool
    offset = int(np.random.default_rng([seed, call_seed]).integers(POOL_SLACK))
    out, start = [], offset
    for a in arrays:
        out.append(np.asarray(a, dtype=np.float32) + pool[start : start + a.size].reshape(a.shape))
        start += a.size
    return out


def run_fedavg(grid: Grid, *, hidden: int, rounds: int, nodes: int, round_timeout: float, out: str) -> None:
    """Run ``rounds`` FedAvg rounds over ``nodes`` nodes; write the round-end stamps to ``out``."""
    stamps: list[float] = []

    def stamp(server_round: int, _arrays: ArrayRecord) -> MetricRecord | None:
        stamps.append(time.monotonic())
        return None

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=nodes,
                      min_available_nodes=nodes)
    started = time.monotonic()
    strategy.start(grid=grid, initial_arrays=ArrayRecord(init_arrays(hidden)), num_rounds=rounds,
                   timeout=round_timeout, evaluate_fn=stamp)
    if len(stamps) != rounds + 1:
        raise RuntimeError(f"expected {rounds + 1} round stamps, got {len(stamps)}")
    doc = {"hidden": hidden, "rounds": rounds, "nodes": nodes, "pid": os.getpid(),
           "round_end_s": [t - started for t in stamps]}
    if out:
        Path(out).write_text(json.dumps(doc) + "\n")
