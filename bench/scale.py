"""Aggregator cost per update and peak memory as workers grow (4, 16, 64) and models grow (100k -> 10M).

Every point runs the real ``fedmq aggregator --mode async --strategy fedbuff --buffer-size 3
--trainer bench.standin:NoiseTrainer --min-workers N`` and one ``fedmq workers --shards DIR
--count N`` process hosting N in-process workers (threads, one connection each), on a
synthetic 784-feature dataset. Two sweeps:

* workers: N = 4, 16, 64 with the ~100k model (and N = 4, 16, 64 with the ~1M model unless
  ``--quick``);
* models: ~100k, ~1M, ~10M parameters (784->h->10) with N = 4.

Measured on the aggregator process only (its pid, read from /proc):

* CPU per applied update: utime+stime at its first ``version_evaluated`` event (3 updates
  applied) and at its last, divided by the updates applied in between (start-up and
  shutdown excluded); wall updates/s over the same window;
* peak memory: VmHWM from /proc/<pid>/status polled every 0.1 s, and ``ru_maxrss`` of the
  aggregator alone from ``os.wait4(pid)`` when it exits (the larger is reported).

Goals: CPU per update flat in N (reported as the ratio to N=4); peak <= (K + 4) x model bytes
+ base, where base is the peak with the 100k model at N=4; the ratio (peak - base) /
model bytes is reported against K + 4 = 7. A diagnostic row repeats the 10M point with
``--checkpoint-every 1`` (acks after every update) to show how much of the peak is held
update bodies awaiting their checkpoint.
Run: ``python bench/scale.py [--quick] [--profile DIR]``.
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
    cpu_seconds,
    delete_namespace,
    fedmq_argv,
    loadavg,
    mlp_param_count,
    new_namespace,
    pyspy_argv,
    status_kb,
    table,
    write_result,
    write_synthetic,
)

K = 3
UPDATES = {"100k": 240, "1M": 90, "10M": 30}
QUICK_UPDATES = {"100k": 90, "1M": 45, "10M": 15}
FLAT_TOLERANCE = 1.25  # "flat": within 25% of the N=4 cost


def run_point(children: Children, work: Path, namespace: str, n: int, label: str, updates: int,
              extra: list[str], tag: str, profile: Path | None) -> dict[str, Any]:
    hidden = MODEL_SIZES[label]
    run_dir = work / f"run-{tag}"
    argv = fedmq_argv(
        "aggregator", "--mode", "async", "--strategy", "fedbuff", "--buffer-size", str(K),
        "--max-updates", str(updates), "--min-workers", str(n), "--hidden", str(hidden),
        "--trainer", "bench.standin:NoiseTrainer", "--test-data", str(work / "data" / "test.npz"),
        "--out", str(run_dir), "--drain-timeout", "5", "--namespace", namespace, "--amqp-url", AMQP_URL,
        "--log-format", "json", *extra,
    )
    if profile is not None:
        argv = pyspy_argv(argv, profile / f"scale-{tag}.txt")
    load = loadavg()
    agg = children.spawn(f"aggregator-{tag}", argv, pipe_stderr=True)
    cpu = CpuSnapshots()
    cpu.watch("aggregator", agg.pid)
    marks: list[tuple[int, float, float | None, dict[str, float]]] = []

    def on_event(doc: dict[str, Any], _now: float) -> None:
        if doc["event"] == "version_evaluated":
            marks.append((int(doc["updates_applied"]), float(doc["ts"]), cpu_seconds(agg.pid), cpu.snapshot()))

    reader = EventReader(agg.stderr, children.log_dir / f"aggregator-{tag}.jsonl", on_event)
    pool = children.spawn(
        f"workers-{tag}",
        fedmq_argv("workers", "--shards", str(work / "data"), "--count", str(n), "--trainer",
                   "bench.standin:NoiseTrainer", "--namespace", namespace, "--amqp-url", AMQP_URL,
                   "--log-format", "json"),
        env=SINGLE_THREAD_ENV,
    )
    cpu.watch("workers", pool.pid)
    hwm_kb = 0
    maxrss_kb = 0
    deadline = time.monotonic() + 120 + updates * mlp_param_count(hidden) * 4 / 2e6
    while True:
        pid, status, usage = os.wait4(agg.pid, os.WNOHANG)
        if pid == agg.pid:
            agg.returncode = os.waitstatus_to_exitcode(status)
            maxrss_kb = usage.ru_maxrss
            break
        hwm_kb = max(hwm_kb, status_kb(agg.pid, "VmHWM") or 0)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{tag}: the aggregator did not finish in time")
        if pool.poll() not in (None, 0):
            raise RuntimeError(f"{tag}: the worker pool exited with {pool.returncode}")
        time.sleep(0.1)
    reader.join()
    if agg.returncode != 0:
        raise RuntimeError(f"{tag}: aggregator exited with {agg.returncode}; see {children.log_dir}")
    ledger = [json.loads(x) for x in (run_dir / "updates.jsonl").read_text().splitlines() if x.strip()]
    applied = sum(1 for e in ledger if e.get("fate") == "applied")
    shutil.rmtree(run_dir, ignore_errors=True)
    valid = [m for m in marks if m[2] is not None]
    first, last = valid[0], valid[-1]
    span = last[0] - first[0]
    peak_kb = max(hwm_kb, maxrss_kb)
    system = CpuSnapshots.delta(first[3], last[3])
    return {
        "workers": n, "model": label, "hidden": hidden, "params": mlp_param_count(hidden),
        "model_bytes": mlp_param_count(hidden) * 4, "extra_args": extra, "updates_applied": applied,
        "window_updates": span, "cpu_ms_per_update": 1e3 * (last[2] - first[2]) / span,  # type: ignore[operator]
        "updates_per_s": span / (last[1] - first[1]), "peak_mb": peak_kb / 1024,
        "vmhwm_polled_mb": hwm_kb / 1024, "ru_maxrss_mb": maxrss_kb / 1024, "loadavg": load,
        "system_cpu_ms_per_update": {k: 1e3 * system[k] / span for k in ("workers", "rabbitmq", "other", "machine_busy")
                                     if k in system},
        "machine_busy_pct": 100 * system["machine_busy"] / system["machine_total"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer updates, no 1M worker sweep, no diagnostic row")
    parser.add_argument("--profile", type=Path, default=None, help="record each aggregator with py-spy into DIR")
    parser.add_argument("--json", type=Path, default=None, help="output (default bench/results/scale.json)")
    parser.add_argument("--only", default=None,
                        help="comma-separated point tags to run, e.g. workers-n4-100k,workers-n64-100k (experiments)")
    args = parser.parse_args(argv)
    counts = QUICK_UPDATES if args.quick else UPDATES
    # (sweep, N, model, extra aggregator args)
    points: list[tuple[str, int, str, list[str]]] = [
        ("workers", 4, "100k", []), ("workers", 16, "100k", []), ("workers", 64, "100k", []),
    ]
    if not args.quick:
        points += [("workers", 4, "1M", []), ("workers", 16, "1M", []), ("workers", 64, "1M", [])]
    else:
        points += [("models", 4, "1M", [])]
    points += [("models", 4, "10M", [])]
    if not args.quick:
        points += [("diagnostic", 4, "10M", ["--checkpoint-every", "1"])]

    if args.only:
        wanted = set(args.only.split(","))
        points = [p for p in points if f"{p[0]}-n{p[1]}-{p[2]}" in wanted]
        if not any(p[1] == 4 and p[2] == "100k" and not p[3] for p in points):
            parser.error("--only must include workers-n4-100k (the memory base)")

    namespace = new_namespace("scale")
    work = Path(tempfile.mkdtemp(prefix="fedmq-bench-scale-"))
    write_synthetic(work / "data", shards=max(n for _, n, _, _ in points), per_shard=32, test=64)
    children = Children(work / "logs")
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for i, (sweep, n, label, extra) in enumerate(points):
            ns = f"{namespace}-{i}"
            tag = f"{sweep}-n{n}-{label}"
            try:
                row = run_point(children, work, ns, n, label, counts[label], extra, tag, args.profile)
            finally:
                children.stop_all()
                delete_namespace(ns)
            row["sweep"] = sweep
            rows.append(row)
            print(f"  {tag}: {row['cpu_ms_per_update']:.2f} ms CPU/update, {row['updates_per_s']:.1f} upd/s, "
                  f"peak {row['peak_mb']:.0f} MB", file=sys.stderr)
    except BaseException:
        print(f"logs kept in {work / 'logs'}", file=sys.stderr)
        raise
    finally:
        children.stop_all()
        delete_namespace(namespace)
    shutil.rmtree(work, ignore_errors=True)

    base_row = next(r for r in rows if r["workers"] == 4 and r["model"] == "100k" and not r["extra_args"])
    base_mb = base_row["peak_mb"]
    for r in rows:
        ref = next((x for x in rows if x["workers"] == 4 and x["model"] == r["model"] and not x["extra_args"]), None)
        r["cpu_vs_n4"] = r["cpu_ms_per_update"] / ref["cpu_ms_per_update"] if ref else float("nan")
        r["flat_pass"] = bool(r["cpu_vs_n4"] <= FLAT_TOLERANCE) if r["sweep"] == "workers" and ref else None
        r["mem_ratio"] = (r["peak_mb"] - base_mb) * 2**20 / r["model_bytes"]
        r["mem_budget_mb"] = base_mb + (K + 4) * r["model_bytes"] / 2**20
        r["mem_pass"] = bool(r["peak_mb"] <= r["mem_budget_mb"]) if r["model"] != "100k" else None

    headers = ["sweep", "N", "model", "upd", "CPU ms/upd", "vs N=4", "flat", "upd/s", "peak MB", "budget MB",
               "(peak-base)/model", "K+4", "mem"]
    body = [
        [r["sweep"] + (" " + " ".join(r["extra_args"]) if r["extra_args"] else ""), r["workers"], r["model"],
         r["window_updates"], r["cpu_ms_per_update"], r["cpu_vs_n4"],
         "-" if r["flat_pass"] is None else ("PASS" if r["flat_pass"] else "MISS"), r["updates_per_s"],
         r["peak_mb"], r["mem_budget_mb"], r["mem_ratio"] if r["model"] != "100k" else "base", K + 4,
         "-" if r["mem_pass"] is None else ("PASS" if r["mem_pass"] else "MISS")]
        for r in rows
    ]
    print(table(headers, body))
    print(f"base (N=4, 100k) = {base_mb:.1f} MB")
    print("\nthe rest of the machine per applied update (CPU ms), for context")
    print(table(["sweep", "N", "model", "aggregator", "worker pool", "rabbitmq", "other", "machine busy %"],
                [[r["sweep"], r["workers"], r["model"], r["cpu_ms_per_update"],
                  r["system_cpu_ms_per_update"].get("workers", float("nan")),
                  r["system_cpu_ms_per_update"].get("rabbitmq", float("nan")),
                  r["system_cpu_ms_per_update"].get("other", float("nan")), r["machine_busy_pct"]] for r in rows]))
    out = write_result("scale", {"quick": args.quick, "k": K, "base_mb": base_mb, "worker_hosting": "in-process pool",
                                 "wall_s": time.monotonic() - started, "rows": rows}, args.json)
    print(f"wrote {out}")
    return 0 if all(r["flat_pass"] is not False and r["mem_pass"] is not False for r in rows
                    if r["sweep"] != "diagnostic") else 1


if __name__ == "__main__":
    sys.exit(main())
