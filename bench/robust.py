"""Robust aggregation under attack: accuracy at rounds 20 and 50, and time, for attack x rule.

An in-process simulation of the same code a run executes, without the broker: each worker's
:class:`~fedmq.worker.task.TaskRunner` (with its :mod:`~fedmq.worker.attack`, as ``fedmq worker
--attack`` builds it) trains on its shard of digits, and the aggregator's strategy
(:func:`~fedmq.aggregator.strategies.make_strategy` with the ``--robust`` rule) aggregates.

* sync: FedAvg rounds over every worker's update;
* async: FedBuff (K = --buffer-size) with the rule applied per buffer; workers take exponential
  times to train (mean 1, seeded), so updates arrive stale; "round r" is r x workers updates.

    python bench/robust.py --quick          # 10 workers, 20 rounds, 2 attacks, 4 rules (about a minute)
    python bench/robust.py                  # 50 rounds, every attack and rule, sync and async

Writes bench/results/robust.json and prints the table BENCHMARKS.md shows. A benchmark, not a
test: nothing asserts on its figures.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from fedmq.aggregator.robust import RobustRule  # noqa: E402
from fedmq.aggregator.strategies import Contribution, make_strategy  # noqa: E402
from fedmq.shared import messages  # noqa: E402
from fedmq.shared.data import load_dataset  # noqa: E402
from fedmq.shared.partition import PARTITIONERS  # noqa: E402
from fedmq.shared.trainer import MLPTrainer, mlp_spec  # noqa: E402
from fedmq.worker.attack import Attack  # noqa: E402
from fedmq.worker.task import Done, TaskRunner  # noqa: E402

RESULTS = ROOT / "bench" / "results"

RULES = {
    "mean": RobustRule("none"),
    "trimmed-mean 0.2": RobustRule("trimmed-mean", trim_fraction=0.2),
    "median": RobustRule("median"),
    "multi-krum f=2": RobustRule("multi-krum", byzantine=2),
    "norm-clip auto": RobustRule("norm-clip"),
}
ATTACKS = {"none": None, "sign-flip x10": Attack("sign-flip", 10.0), "gauss 10": Attack("gauss", 10.0),
           "scale x10": Attack("scale", 10.0), "label-flip": Attack("label-flip")}


def setup(workers: int, partition: str, seed: int = 0) -> tuple[list[tuple[np.ndarray, np.ndarray]], Any, dict]:
    ds = load_dataset("digits", seed=seed)
    parts = PARTITIONERS[partition](ds.y_train, workers, seed=seed, alpha=0.5)
    shards = [(ds.X_train[idx], ds.y_train[idx]) for idx in parts]
    spec = mlp_spec(ds.X_train.shape[1], ds.num_classes, hidden=[64], seed=seed)
    return shards, (ds.X_test, ds.y_test), spec


def simulate(rule: RobustRule, attack: Attack | None, *, mode: str, rounds: int, workers: int, attackers: int,
             partition: str = "iid", buffer_size: int = 10, checkpoints: tuple[int, ...] = (20, 50),
             seed: int = 0) -> dict[str, Any]:
    """Accuracy after each round in ``checkpoints`` (<= rounds) and the wall time of the run."""
    shards, (X_test, y_test), spec = setup(workers, partition, seed)
    evaluator = MLPTrainer(spec)
    runners = [TaskRunner(MLPTrainer, X, y, f"w{i}", attack=attack if i < attackers else None)
               for i, (X, y) in enumerate(shards)]
    if mode == "sync":
        strategy = make_strategy("fedavg", robust=rule)
    else:
        strategy = make_strategy("fedbuff", buffer_size=buffer_size, robust=rule)
    params = evaluator.init_params()
    kind = "weights" if mode == "sync" else "delta"
    acc: dict[int, float] = {}
    started = time.perf_counter()

    def train(i: int, version: int, model: dict[str, np.ndarray], task_seed: int) -> messages.Update:
        task = messages.Task(task_id=f"t{task_seed}", version=version, mode=mode, epochs=2, batch_size=32, lr=0.1,
                             mu=0.0, seed=task_seed, update_kind=kind)
        out = runners[i].run(task, messages.ModelVersion(version=version, params=model, spec=spec))
        assert isinstance(out, Done), out
        return out.update

    def measure(r: int) -> None:
        if r in checkpoints or r == rounds:
            acc[r] = round(float(evaluator.evaluate(params, X_test, y_test)[1]), 4)

    if mode == "sync":
        for r in range(1, rounds + 1):
            ups = [train(i, r - 1, params, seed * 1_000_003 + r) for i in range(workers)]
            res = strategy.aggregate(params, [Contribution(u.params, u.num_samples) for u in ups])
            assert res.params is not None
            params = res.params
            measure(r)
    else:
        rng = np.random.default_rng(seed)
        version, applied, task_seq = 0, 0, 0
        busy: list[tuple[float, int, int, int, dict[str, np.ndarray]]] = []
        for i in range(workers):
            task_seq += 1
            heapq.heappush(busy, (float(rng.exponential(1.0)), i, task_seq, version, params))
        while applied < rounds * workers:
            t, i, ts, base, model = heapq.heappop(busy)
            u = train(i, base, model, seed * 1_000_003 + ts)
            res = strategy.aggregate(params, [Contribution(u.params, u.num_samples, version - base)])
            applied += 1
            if res.params is not None:
                params, version = res.params, version + 1
            if applied % workers == 0:
                measure(applied // workers)
            task_seq += 1
            heapq.heappush(busy, (t + float(rng.exponential(1.0)), i, task_seq, version, params))
    return {"accuracy": acc, "time_s": round(time.perf_counter() - started, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="20 rounds, sign-flip and gauss, four rules")
    ap.add_argument("--workers", type=int, default=10)
    ap.add_argument("--attackers", type=int, default=2)
    ap.add_argument("--partition", default="iid", choices=sorted(PARTITIONERS))
    ap.add_argument("--modes", default="sync,async")
    ap.add_argument("--out", type=Path, default=RESULTS / "robust.json")
    args = ap.parse_args()
    rounds = 20 if args.quick else 50
    attacks = ["sign-flip x10", "gauss 10"] if args.quick else list(ATTACKS)
    rules = ["mean", "trimmed-mean 0.2", "multi-krum f=2", "norm-clip auto"] if args.quick else list(RULES)
    rows = []
    for mode in args.modes.split(","):
        for attack in attacks:
            for rule in rules:
                res = simulate(RULES[rule], ATTACKS[attack], mode=mode, rounds=rounds, workers=args.workers,
                               attackers=0 if attack == "none" else args.attackers, partition=args.partition,
                               checkpoints=(20, 50))
                row = {"mode": mode, "attack": attack, "rule": rule, **res}
                rows.append(row)
                a = res["accuracy"]
                print(f"| {mode} | {attack} | {rule} | {a.get(20, '-')} | {a.get(50, '-')} | {res['time_s']} |",
                      flush=True)
    doc = {"workers": args.workers, "attackers": args.attackers, "partition": args.partition, "rounds": rounds,
           "model": "MLP 64-64-10, lr 0.1, batch 32, 2 local epochs", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
