"""Update compression: digits accuracy and bytes per update for none / fp16 / int8 / top-k (with and
without error feedback), each also with bfloat16 or int8 model versions where listed, and the CPU cost of compressing and decompressing a large update.

An in-process simulation of the code a run executes, without the broker: each worker's
:class:`~fedmq.worker.task.TaskRunner` trains its shard of digits and compresses its delta as the
task asks (``--compress``), the update is encoded to its wire bytes (counted) and decoded by the
strict decoder (decompressed to float32), turned back into weights as the aggregator does
(:func:`~fedmq.aggregator.validate.as_weights`), and FedAvg averages the round. Error feedback is
what a worker does when the broker confirms its update (``TaskRunner.confirmed``); "without EF"
simply never confirms, so the residual is never carried.

    python bench/compress.py --quick     # 20 rounds, one seed (about half a minute)
    python bench/compress.py             # 50 rounds, seeds 0 1 2, and the 1M-parameter codec costs

Writes bench/results/compress.json and prints the tables BENCHMARKS.md shows. A benchmark, not a
test: nothing asserts on its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.robust import setup  # noqa: E402
from fedmq.aggregator.strategies import Contribution, make_strategy  # noqa: E402
from fedmq.aggregator.validate import as_weights  # noqa: E402
from fedmq.shared import compression, messages  # noqa: E402
from fedmq.shared.trainer import MLPTrainer  # noqa: E402
from fedmq.worker.task import Done, TaskRunner  # noqa: E402

RESULTS = ROOT / "bench" / "results"
# (label, --compress, error feedback)
#: (label, --compress, error feedback, --model-dtype)
VARIANTS = [("none", "none", True, "float32"), ("fp16", "fp16", True, "float32"), ("int8", "int8", True, "float32"),
            ("topk 10% + EF", "topk:0.1", True, "float32"), ("topk 10% no EF", "topk:0.1", False, "float32"),
            ("none, bfloat16 models", "none", True, "bfloat16"), ("int8, bfloat16 models", "int8", True, "bfloat16"),
            ("int8, int8 models", "int8", True, "int8")]


def simulate(scheme: str, feedback: bool, *, rounds: int, workers: int, seed: int,
             checkpoints: tuple[int, ...], model_dtype: str = "float32") -> dict[str, Any]:
    """Test accuracy at each round of ``checkpoints`` and the mean wire bytes of an update."""
    shards, (X_test, y_test), spec = setup(workers, "iid", seed)  # as bench/robust.py: the same split
    evaluator = MLPTrainer(spec)
    runners = [TaskRunner(MLPTrainer, X, y, f"w{i}") for i, (X, y) in enumerate(shards)]
    strategy = make_strategy("fedavg")
    params = evaluator.init_params()
    kind = "weights" if scheme == "none" and model_dtype == "float32" else "delta"
    acc: dict[int, float] = {}
    sizes: list[int] = []
    for r in range(1, rounds + 1):
        task = messages.Task(task_id=f"r{r}", version=r - 1, mode="sync", epochs=2, batch_size=32, lr=0.1, mu=0.0,
                             seed=seed * 1_000_003 + r, round=r, update_kind=kind, run_id="bench", compression=scheme)
        model = messages.ModelVersion(version=r - 1, params=params, spec=spec, run_id="bench")
        if model_dtype != "float32":  # what the workers get off the wire: the rounded model, as float32
            wire_model = messages.ModelVersion(version=r - 1, params=compression.model_wire(params, model_dtype), spec=spec,
                                               run_id="bench", dtype=model_dtype)
            model = messages.decode(messages.encode(wire_model), expect=messages.ModelVersion)  # type: ignore[assignment]
        contributions = []
        for runner in runners:
            out = runner.run(task, model)
            assert isinstance(out, Done), out
            wire = messages.encode(out.update)
            sizes.append(len(wire))
            if feedback:
                runner.confirmed(out)
            update = messages.decode(wire, expect=messages.Update)
            assert isinstance(update, messages.Update)
            if update.kind == "delta":
                update = as_weights(update, params)
            contributions.append(Contribution(update.params, update.num_samples))
        result = strategy.aggregate(params, contributions)
        assert result.params is not None
        params = result.params
        if r in checkpoints or r == rounds:
            acc[r] = round(float(evaluator.evaluate(params, X_test, y_test)[1]), 4)
    return {"accuracy": acc, "bytes_per_update": round(float(np.mean(sizes)), 1), "test_samples": len(y_test)}


def codec_costs(size: int, repeats: int = 5) -> list[dict[str, Any]]:
    """Seconds to compress + encode and to decode + decompress one ``size``-parameter delta (best of
    ``repeats``), and its wire bytes, per scheme."""
    rng = np.random.default_rng(0)
    delta = {"w": (rng.standard_normal(size) * 0.01).astype(np.float32)}
    rows = []
    for scheme in ("none", "fp16", "int8", "topk:0.1"):
        parsed = compression.parse(scheme)
        feedback = compression.ErrorFeedback()
        enc, dec = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            params: Any = delta if scheme == "none" else feedback.compress("bench", delta, parsed).layers
            wire = messages.encode(messages.Update(
                task_id="t", worker_id="w", base_version=0, num_samples=1, params=params, kind="delta",
                train_loss=0.0, train_accuracy=0.0, duration_s=0.0, run_id="bench", compression=scheme))
            t1 = time.perf_counter()
            messages.decode(wire, max_bytes=2 * size * 4 + (1 << 20))
            t2 = time.perf_counter()
            enc.append(t1 - t0)
            dec.append(t2 - t1)
        rows.append({"scheme": scheme, "params": size, "bytes": len(wire), "encode_ms": round(min(enc) * 1e3, 2),
                     "decode_ms": round(min(dec) * 1e3, 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="20 rounds, seed 0, no codec costs")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--workers", type=int, default=10)
    ap.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; --quick: 0)")
    ap.add_argument("--codec-params", type=int, default=1_000_000)
    ap.add_argument("--out", type=Path, default=RESULTS / "compress.json")
    args = ap.parse_args()
    rounds = args.rounds or (20 if args.quick else 50)
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    checkpoints = tuple(r for r in (10, 20, 50) if r <= rounds)
    load = os.getloadavg()
    started = time.perf_counter()
    rows = []
    for label, scheme, feedback, model_dtype in VARIANTS:
        runs = [simulate(scheme, feedback, rounds=rounds, workers=args.workers, seed=s, checkpoints=checkpoints,
                         model_dtype=model_dtype) for s in seeds]
        mean = {r: round(float(np.mean([run["accuracy"][r] for run in runs])), 4) for r in runs[0]["accuracy"]}
        rows.append({"variant": label, "compress": scheme, "error_feedback": feedback, "model_dtype": model_dtype,
                     "mean_accuracy": mean,
                     "per_seed": [run["accuracy"] for run in runs],
                     "bytes_per_update": runs[0]["bytes_per_update"], "test_samples": runs[0]["test_samples"]})
    base_bytes = rows[0]["bytes_per_update"]
    base_acc = rows[0]["mean_accuracy"]
    last = max(base_acc)
    print(f"digits, sync FedAvg, {args.workers} workers (iid), {rounds} rounds, seeds {seeds}; "
          f"{rows[0]['test_samples']} test samples (one sample = {100 / rows[0]['test_samples']:.2f} points); "
          f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| variant | " + " | ".join(f"accuracy @ {r}" for r in base_acc) + f" | Δ vs none @ {last} (points) | "
          "bytes / update | ratio to none |")
    print("|---|" + "---|" * (len(base_acc) + 3))
    for row in rows:
        accs = " | ".join(f"{100 * row['mean_accuracy'][r]:.2f}%" for r in base_acc)
        delta = 100 * (row["mean_accuracy"][last] - base_acc[last])
        print(f"| {row['variant']} | {accs} | {delta:+.2f} | {row['bytes_per_update']:.0f} | "
              f"{row['bytes_per_update'] / base_bytes:.3f} |")
    costs = [] if args.quick else codec_costs(args.codec_params)
    if costs:
        print(f"\none delta of {args.codec_params:,} parameters, best of 5 (compress + encode; decode + decompress):")
        print("| compress | bytes | ratio | encode ms | decode ms |")
        print("|---|---|---|---|---|")
        for c in costs:
            print(f"| {c['scheme']} | {c['bytes']} | {c['bytes'] / costs[0]['bytes']:.3f} | {c['encode_ms']} | "
                  f"{c['decode_ms']} |")
    elapsed = time.perf_counter() - started
    load_end = os.getloadavg()
    print(f"\n{elapsed:.0f} s; load average at the end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rounds": rounds, "workers": args.workers, "seeds": seeds, "rows": rows,
                                    "codec": costs, "load_start": load, "load_end": load_end,
                                    "seconds": round(elapsed, 1)}, indent=2))


if __name__ == "__main__":
    main()
