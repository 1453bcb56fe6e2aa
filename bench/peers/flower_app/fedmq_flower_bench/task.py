"""The workload of fedmq's ``bench/round_time.py``, written against Flower's Message API.

* Model and "training": ``workload.py`` (numpy only): the parameters of an MLP 784 -> hidden
  -> 10 drawn like ``bench.standin.NoiseTrainer.init_params``, and ``NoiseTrainer.fit``'s
  perturbation (the weights plus a slice of one pre-drawn N(0, 1e-3^2) float32 vector), with
  32 examples reported (the shard size round_time.py uses).
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

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedmq_flower_bench.workload import init_arrays


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
