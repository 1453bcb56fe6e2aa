"""Synchronous FedAvg round time with the stand-in trainer, against Flower's published anchors.

For N = 4 and 16 workers and MLP 784->h->10 models of ~100k, ~1M and ~10M float32 parameters
it runs the real processes -- ``fedmq aggregator --mode sync --rounds 8 --workers-per-round N
--min-workers N --trainer bench.standin:NoiseTrainer`` and N ``fedmq worker`` *processes*
(one BLAS thread each; 16 processes on 2 cores are heavy but realistic) -- on a synthetic
784-feature dataset (test set 64 samples, 32 per worker). Per-round seconds are the deltas of
``history.json`` ``time_s`` (median over rounds 2..8); each round includes the model
publish to the stream, N decodes + "training" (a Gaussian perturbation) + encodes in the
workers, N updates into the aggregator, the float64 FedAvg, and the per-round checkpoint
(model written with fsync), reported as is.

From the ledger (``updates.jsonl``, receive time of every update) each round is split into
*collect* (round start -> last update received) and *close* (-> round evaluated: decode,
average, evaluate, checkpoint).

Reports median s/round, MB/s moved (2 x N x model bytes per round / s) and the ratios to
Flower's anchors (median s/round): Deployment Engine N=4 6.27/7.29/11.28, N=16
20.33/21.27/32.50; Simulation Engine N=4 0.10/0.20/0.59, N=16 0.16/0.31/1.59.
Goals: >= 20x faster than Deployment and <= Simulation's time at every point.
Run: ``python bench/round_time.py [--quick] [--workers 4,16] [--sizes 100k,1M,10M] [--profile DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402
    AMQP_URL,
    MODEL_SIZES,
    SINGLE_THREAD_ENV,
    Children,
    CpuSnapshots,
    EventReader,
    delete_namespace,
    fedmq_argv,
    loadavg,
    median,
    mlp_param_count,
    new_namespace,
    pyspy_argv,
    table,
    write_result,
    write_synthetic,
)

DEPLOYMENT = {4: {"100k": 6.27, "1M": 7.29, "10M": 11.28}, 16: {"100k": 20.33, "1M": 21.27, "10M": 32.50}}
SIMULATION = {4: {"100k": 0.10, "1M": 0.20, "10M": 0.59}, 16: {"100k": 0.16, "1M": 0.31, "10M": 1.59}}
SPEEDUP_GOAL = 20.0


def run_point(children: Children, work: Path, namespace: str, n: int, label: str, rounds: int,
              profile: Path | None) -> dict[str, Any]:
    hidden = MODEL_SIZES[label]
    run_dir = work / f"run-n{n}-{label}"
    argv = fedmq_argv(
        "aggregator", "--mode", "sync", "--rounds", str(rounds), "--workers-per-round", str(n),
        "--min-workers", str(n), "--hidden", str(hidden), "--trainer", "bench.standin:NoiseTrainer",
        "--test-data", str(work / "data" / "test.npz"), "--out", str(run_dir), "--round-timeout", "300",
        "--namespace", namespace, "--amqp-url", AMQP_URL, "--log-format", "json",
    )
    if profile is not None:
        argv = pyspy_argv(argv, profile / f"round_time-n{n}-{label}.txt")
    load = loadavg()
    cpu = CpuSnapshots()
    marks: dict[int, dict[str, float]] = {}

    def on_event(doc: dict[str, Any], _now: float) -> None:
        if doc["event"] == "version_evaluated" and doc.get("round") in (1, rounds):
            marks[int(doc["round"])] = cpu.snapshot()

    agg = children.spawn(f"aggregator-n{n}-{label}", argv, pipe_stderr=True)
    cpu.watch("aggregator", agg.pid)
    reader = EventReader(agg.stderr, children.log_dir / f"aggregator-n{n}-{label}.jsonl", on_event)
    for i in range(n):
        wargv = fedmq_argv("worker", "--data", str(work / "data" / f"worker-{i}.npz"), "--worker-id", f"w{i}",
                           "--trainer", "bench.standin:NoiseTrainer", "--namespace", namespace,
                           "--amqp-url", AMQP_URL, "--log-format", "json")
        if profile is not None and i == 0:
            wargv = pyspy_argv(wargv, profile / f"round_time-n{n}-{label}-worker0.txt")
        cpu.watch("workers", children.spawn(f"worker-n{n}-{label}-{i}", wargv, env=SINGLE_THREAD_ENV).pid)
    started = time.monotonic()
    code = agg.wait(timeout=60 + rounds * (5 + n * mlp_param_count(hidden) * 4 / 20e6))
    wall = time.monotonic() - started
    reader.join()
    if code != 0:
        raise RuntimeError(f"aggregator exited with {code}; see {children.log_dir}")
    doc = json.loads((run_dir / "history.json").read_text())
    history = [h for h in doc["history"] if h.get("round")]
    if len(history) != rounds:
        raise RuntimeError(f"expected {rounds} rounds in history.json, got {len(history)}")
    ledger = [json.loads(x) for x in (run_dir / "updates.jsonl").read_text().splitlines() if x.strip()]
    ends = [0.0] + [float(h["time_s"]) for h in history]
    per_round = [ends[r] - ends[r - 1] for r in range(1, rounds + 1)]
    collect, close = [], []
    for r in range(1, rounds + 1):
        arrivals = [float(e["time_s"]) for e in ledger if e.get("fate") == "applied" and ends[r - 1] <= e["time_s"] <= ends[r]]
        if arrivals:
            collect.append(max(arrivals) - ends[r - 1])
            close.append(ends[r] - max(arrivals))
    fates: dict[str, int] = {}
    for e in ledger:
        fates[e["fate"]] = fates.get(e["fate"], 0) + 1
    shutil.rmtree(run_dir, ignore_errors=True)
    model_bytes = mlp_param_count(hidden) * 4
    steady = per_round[1:]  # rounds 2..R
    s_round = median(steady)
    dep, sim = DEPLOYMENT[n][label], SIMULATION[n][label]
    cpu_per_round: dict[str, float] = {}
    if 1 in marks and rounds in marks:
        d = CpuSnapshots.delta(marks[1], marks[rounds])
        cpu_per_round = {k: v / (rounds - 1) for k, v in d.items() if k not in ("machine_total", "wall", "cores")}
    return {
        "workers": n, "model": label, "hidden": hidden, "params": mlp_param_count(hidden), "model_bytes": model_bytes,
        "rounds": rounds, "per_round_s": per_round, "median_s": s_round, "mean_s": sum(steady) / len(steady),
        "collect_median_s": median(collect[1:]), "close_median_s": median(close[1:]),
        "mb_per_s": 2 * n * model_bytes / s_round / 1e6,
        "deployment_s": dep, "speedup_vs_deployment": dep / s_round, "simulation_s": sim,
        "ratio_to_simulation": s_round / sim,
        "pass_deployment": dep / s_round >= SPEEDUP_GOAL, "pass_simulation": s_round <= sim,
        "fates": fates, "aggregator_wall_s": wall, "loadavg": load,
        "cpu_s_per_round": cpu_per_round,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=4 only, 4 rounds (well under a minute)")
    parser.add_argument("--workers", default=None, help="comma-separated N values (default 4,16; quick: 4)")
    parser.add_argument("--sizes", default="100k,1M,10M", help="comma-separated subset of 100k,1M,10M")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per point (default 8; quick: 4)")
    parser.add_argument("--profile", type=Path, default=None, help="record the aggregator and worker 0 with py-spy into DIR")
    parser.add_argument("--json", type=Path, default=None, help="output (default bench/results/round_time.json)")
    args = parser.parse_args(argv)
    workers = [int(x) for x in (args.workers or ("4" if args.quick else "4,16")).split(",")]
    rounds = args.rounds or (4 if args.quick else 8)
    if rounds < 3:
        parser.error("--rounds must be at least 3 (round 1 is excluded from the median)")
    sizes = [s for s in args.sizes.split(",") if s]
    if any(n not in DEPLOYMENT for n in workers) or any(s not in MODEL_SIZES for s in sizes):
        parser.error("workers must be 4 or 16 and sizes among 100k, 1M, 10M (the anchors' points)")

    namespace = new_namespace("round-time")
    work = Path(tempfile.mkdtemp(prefix="fedmq-bench-round-time-"))
    write_synthetic(work / "data", shards=max(workers), per_shard=32, test=64)
    children = Children(work / "logs")
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for n in workers:
            for label in sizes:
                ns = f"{namespace}-n{n}-{label}"
                try:
                    row = run_point(children, work, ns, n, label, rounds, args.profile)
                finally:
                    children.stop_all()
                    delete_namespace(ns)
                rows.append(row)
                print(f"  N={n} {label}: {row['median_s']:.3f} s/round", file=sys.stderr)
    except BaseException:
        print(f"logs kept in {work / 'logs'}", file=sys.stderr)
        raise
    finally:
        children.stop_all()
        delete_namespace(namespace)
    shutil.rmtree(work, ignore_errors=True)

    headers = ["N", "model", "s/round", "collect", "close", "MB/s", "Deploy s", "speedup", ">=20x", "Sim s",
               "ours/Sim", "<=Sim"]
    body = [
        [r["workers"], r["model"], r["median_s"], r["collect_median_s"], r["close_median_s"], r["mb_per_s"],
         r["deployment_s"], r["speedup_vs_deployment"], "PASS" if r["pass_deployment"] else "MISS",
         r["simulation_s"], r["ratio_to_simulation"], "PASS" if r["pass_simulation"] else "MISS"]
        for r in rows
    ]
    print(table(headers, body))
    print("\nCPU seconds per round (rounds 2..R), by process group; machine = 2 cores x s/round available")
    cpu_headers = ["N", "model", "s/round", "aggregator", "workers", "rabbitmq", "other", "machine busy", "busy %"]
    cpu_body = []
    for r in rows:
        c = r["cpu_s_per_round"]
        if c:
            cpu_body.append([r["workers"], r["model"], r["median_s"], c.get("aggregator", 0.0), c.get("workers", 0.0),
                             c.get("rabbitmq", float("nan")), c["other"], c["machine_busy"],
                             100 * c["machine_busy"] / (r["mean_s"] * (os.cpu_count() or 1))])
    print(table(cpu_headers, cpu_body))
    out = write_result("round_time", {"quick": args.quick, "rounds": rounds, "worker_hosting": "processes",
                                      "wall_s": time.monotonic() - started, "rows": rows}, args.json)
    print(f"wrote {out}")
    return 0 if all(r["pass_deployment"] and r["pass_simulation"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
