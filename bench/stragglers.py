"""Time to 90% accuracy with stragglers: sync FedAvg vs FedBuff (K=3) vs FedAsync (α=0.6, polynomial).

Setup: scikit-learn digits split with ``fedmq data split --partition dirichlet --alpha 0.5``
into 10 shards; 10 ``fedmq worker`` *processes* (realistic; one BLAS thread each), of which
the last 3 run with ``--slowdown 10`` (they sleep 9x their measured compute time after each
task: the intended straggler model); the real ``fedmq aggregator`` with the default
hyperparameters (MLP 64 hidden, lr 0.1, batch 32, 2 local epochs, seed 0) and
``--min-workers 10``, so every run's clock starts with all 10 workers connected.

Stopping rule (the same budget of client work): sync runs 40 rounds x 10 workers = 400
applied updates; FedBuff and FedAsync stop after the same number of *applied* updates
(``--max-updates 400``). Time to 90% is the first ``history.json`` entry with accuracy >= 0.9
(``time_s``, seconds since the aggregator's clock started); final accuracy is the last entry's.

Reports per strategy the median over ``--repeat`` runs of time to 90% and final accuracy, and
the ratios to sync. Goal: FedBuff and FedAsync reach 90% in <= 0.5x sync's time with a final
accuracy at most 1 point lower.
Run: ``python bench/stragglers.py [--quick] [--repeat N]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402
    AMQP_URL,
    SINGLE_THREAD_ENV,
    Children,
    CpuSnapshots,
    EventReader,
    fedmq_argv,
    loadavg,
    median,
    new_namespace,
    pyspy_argv,
    table,
    torn_down,
    write_result,
)

WORKERS = 10
SLOW = 3
SLOWDOWN = 10.0
TARGET = 0.9
TIME_GOAL = 0.5
ACC_GOAL_POINTS = 1.0
STRATEGIES: dict[str, list[str]] = {
    "sync-fedavg": ["--mode", "sync", "--strategy", "fedavg"],
    "fedbuff-k3": ["--mode", "async", "--strategy", "fedbuff", "--buffer-size", "3"],
    "fedasync-0.6": ["--mode", "async", "--strategy", "fedasync", "--mixing", "0.6", "--staleness", "polynomial"],
}


def run_one(children: Children, work: Path, namespace: str, name: str, rounds: int, tag: str,
            profile: Path | None = None, aggregator_env: dict[str, str] | None = None) -> dict[str, Any]:
    run_dir = work / f"run-{name}-{tag}"
    budget = ["--rounds", str(rounds), "--workers-per-round", str(WORKERS)] if name.startswith("sync") else [
        "--max-updates", str(rounds * WORKERS)]
    load = loadavg()
    argv = fedmq_argv("aggregator", *STRATEGIES[name], *budget, "--min-workers", str(WORKERS),
                      "--test-data", str(work / "shards" / "test.npz"), "--out", str(run_dir),
                      "--namespace", namespace, "--amqp-url", AMQP_URL, "--log-format", "json")
    if profile is not None:
        argv = pyspy_argv(argv, profile / f"stragglers-{name}-{tag}.txt")
    cpu = CpuSnapshots()
    marks: list[tuple[int, dict[str, float]]] = []

    def on_event(doc: dict[str, Any], _now: float) -> None:
        if doc["event"] == "version_evaluated":
            marks.append((int(doc["updates_applied"]), cpu.snapshot()))

    agg = children.spawn(f"aggregator-{name}-{tag}", argv, pipe_stderr=True, env=aggregator_env)
    cpu.watch("aggregator", agg.pid)
    reader = EventReader(agg.stderr, children.log_dir / f"aggregator-{name}-{tag}.jsonl", on_event)
    for i in range(WORKERS):
        slow = i >= WORKERS - SLOW
        worker = children.spawn(
            f"worker-{name}-{tag}-{i}",
            fedmq_argv("worker", "--data", str(work / "shards" / f"worker-{i}.npz"), "--worker-id", f"w{i}",
                       "--slowdown", str(SLOWDOWN if slow else 1.0), "--namespace", namespace,
                       "--amqp-url", AMQP_URL, "--log-format", "json"),
            env=SINGLE_THREAD_ENV,
        )
        cpu.watch("workers", worker.pid)
    code = agg.wait(timeout=600)
    reader.join()
    if code != 0:
        raise RuntimeError(f"{name}: aggregator exited with {code}; see {children.log_dir}")
    doc = json.loads((run_dir / "history.json").read_text())
    history = doc["history"]
    ledger = [json.loads(x) for x in (run_dir / "updates.jsonl").read_text().splitlines() if x.strip()]
    applied = [e for e in ledger if e.get("fate") == "applied"]
    by_worker = Counter(e["worker_id"] for e in applied)
    t90 = next((float(h["time_s"]) for h in history if h["accuracy"] >= TARGET), float("nan"))
    updates90 = next((int(h["updates_applied"]) for h in history if h["accuracy"] >= TARGET), None)
    shutil.rmtree(run_dir, ignore_errors=True)
    cpu_per_update: dict[str, float] = {}
    if len(marks) >= 2 and marks[-1][0] > marks[0][0]:
        d = CpuSnapshots.delta(marks[0][1], marks[-1][1])
        n = marks[-1][0] - marks[0][0]
        cpu_per_update = {k: 1e3 * v / n for k, v in d.items() if k not in ("machine_total", "wall", "cores")}
        cpu_per_update["machine_busy_pct"] = 100 * d["machine_busy"] / d["machine_total"]
        cpu_per_update["wall_ms"] = 1e3 * d["wall"] / n
    return {
        "strategy": name, "t90_s": t90, "updates_at_90": updates90, "final_accuracy": float(history[-1]["accuracy"]),
        "best_accuracy": max(float(h["accuracy"]) for h in history), "wall_s": float(doc["final"]["time_s"]),
        "updates_applied": len(applied), "versions": int(doc["final"]["version"]),
        "straggler_share": sum(by_worker[f"w{i}"] for i in range(WORKERS - SLOW, WORKERS)) / max(1, len(applied)),
        "mean_staleness": (sum(e.get("staleness", 0) for e in applied) / len(applied)) if applied else 0.0,
        "fates": dict(Counter(e["fate"] for e in ledger)), "loadavg": load,
        "cpu_ms_per_update": cpu_per_update,
        "curve": [(h["time_s"], h["updates_applied"], round(h["accuracy"], 4)) for h in history],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 rounds (200 updates), one run each")
    parser.add_argument("--rounds", type=int, default=None, help="sync rounds; async gets rounds x 10 updates (default 40)")
    parser.add_argument("--repeat", type=int, default=None, help="runs per strategy, medians reported (default 3; quick 1)")
    parser.add_argument("--json", type=Path, default=None, help="output (default bench/results/stragglers.json)")
    parser.add_argument("--profile", type=Path, default=None, help="record each aggregator with py-spy into DIR")
    parser.add_argument("--single-thread-aggregator", action="store_true",
                        help="diagnostic: run the aggregator with one BLAS thread too (workers always have one)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (20 if args.quick else 40)
    repeat = args.repeat or (1 if args.quick else 3)

    namespace = new_namespace("stragglers")
    work = Path(tempfile.mkdtemp(prefix="fedmq-bench-stragglers-"))
    children = Children(work / "logs")
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    with torn_down(children, namespace):
        subprocess.run(
            fedmq_argv("data", "split", "--dataset", "digits", "--workers", str(WORKERS), "--partition", "dirichlet",
                       "--alpha", "0.5", "--seed", "0", "--out", str(work / "shards")),
            cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
        )
        for rep in range(repeat):
            for name in STRATEGIES:
                ns = f"{namespace}-{name}-{rep}"
                with torn_down(children, ns, say_logs=False):
                    res = run_one(children, work, ns, name, rounds, str(rep), args.profile,
                                  SINGLE_THREAD_ENV if args.single_thread_aggregator else None)
                res["repeat"] = rep
                runs.append(res)
                print(f"  {name} #{rep}: t90 {res['t90_s']:.2f} s, final {res['final_accuracy']:.4f}, "
                      f"wall {res['wall_s']:.1f} s", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)

    summary: dict[str, dict[str, Any]] = {}
    for name in STRATEGIES:
        mine = [r for r in runs if r["strategy"] == name]
        summary[name] = {
            "t90_s": median([r["t90_s"] for r in mine]),
            "final_accuracy": median([r["final_accuracy"] for r in mine]),
            "wall_s": median([r["wall_s"] for r in mine]),
            "updates_at_90": median([r["updates_at_90"] for r in mine if r["updates_at_90"] is not None]),
            "straggler_share": median([r["straggler_share"] for r in mine]),
            "mean_staleness": median([r["mean_staleness"] for r in mine]),
            "t90_runs": [r["t90_s"] for r in mine],
            "cpu_ms_per_update": {k: median([r["cpu_ms_per_update"].get(k, float("nan")) for r in mine])
                                  for k in ("wall_ms", "aggregator", "workers", "rabbitmq", "other", "machine_busy",
                                            "machine_busy_pct")},
        }
    sync = summary["sync-fedavg"]
    rows = []
    for name, s in summary.items():
        ratio = s["t90_s"] / sync["t90_s"]
        diff = 100 * (s["final_accuracy"] - sync["final_accuracy"])
        is_sync = name == "sync-fedavg"
        ok = None if is_sync else bool(ratio <= TIME_GOAL and diff >= -ACC_GOAL_POINTS)
        s.update(t90_ratio=ratio, final_diff_points=diff, passed=ok)
        rows.append([name, s["t90_s"], s["updates_at_90"], ratio, s["final_accuracy"], diff, s["wall_s"],
                     s["straggler_share"], s["mean_staleness"],
                     "-" if ok is None else ("PASS" if ok else "MISS")])
    print(table(["strategy", "t90 s", "upd@90", "t90/sync", "final acc", "diff pts", "wall s", "slow share",
                 "staleness", "result"], rows))
    print("\nper applied update (first to last evaluation): wall ms and CPU ms by process group")
    print(table(["strategy", "wall ms", "aggregator", "workers", "rabbitmq", "other", "machine busy", "busy %"],
                [[name, c["wall_ms"], c["aggregator"], c["workers"], c["rabbitmq"], c["other"], c["machine_busy"],
                  c["machine_busy_pct"]] for name, c in ((n, s["cpu_ms_per_update"]) for n, s in summary.items())]))
    out = write_result("stragglers", {
        "quick": args.quick, "rounds": rounds, "updates_budget": rounds * WORKERS, "repeat": repeat,
        "workers": WORKERS, "slow": SLOW, "slowdown": SLOWDOWN, "worker_hosting": "processes",
        "stop_rule": "same number of applied updates as sync (rounds x workers)",
        "single_thread_aggregator": args.single_thread_aggregator,
        "wall_s": time.monotonic() - started, "summary": summary, "runs": runs,
    }, args.json)
    print(f"wrote {out}")
    return 0 if all(s["passed"] is not False for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
