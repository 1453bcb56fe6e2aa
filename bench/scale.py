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

``--fetch`` runs the model-fetch sweep instead (issue 15, "bytes per async update flat in N"):
N = 4, 16, 64, 256, 1000 pooled workers (``fedmq workers``: 64 threads per process), ~100k model, and with ``--base DIR`` (a checkout of
an older commit, e.g. ``git worktree add /tmp/base aba9db9``) the same points for that code
interleaved in the same run (N = 4 and 64 by default, ``--base-n``). Per applied update, over the
same window: aggregator CPU (ratio to N=4), the bytes the worker pool process read (``rchar``
of /proc/PID/io: its sockets, i.e. model versions plus small tasks) as multiples of the model
size, and the CPU of the shared RabbitMQ node (the oldest ``beam.smp``; other users of the
broker add to it).
Run: ``python bench/scale.py [--quick] [--profile DIR]`` or ``python bench/scale.py --fetch
[--base DIR] [--updates N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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
    fedmq_argv,
    loadavg,
    mlp_param_count,
    new_namespace,
    process_tree,
    pyspy_argv,
    status_kb,
    table,
    torn_down,
    write_result,
    write_synthetic,
)
from bench._common import broker_pid as shared_broker_pid  # noqa: E402 (the shared node: the oldest beam.smp)

K = 3
UPDATES = {"100k": 240, "1M": 90, "10M": 30}
QUICK_UPDATES = {"100k": 90, "1M": 45, "10M": 15}
FLAT_TOLERANCE = 1.25  # "flat": within 25% of the N=4 cost


def bytes_read(pid: int) -> dict[str, int] | None:
    """Bytes received so far by each TCP socket of process ``pid`` and its descendants (the pool's
    processes), by local address (``ss -tin``: the kernel's ``bytes_received``; /proc/PID/io does
    not count recv(2)). None if ss fails."""
    try:
        out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    owners = {f"pid={p}," for p in process_tree(pid)}
    got: dict[str, int] = {}
    local = None
    for line in out.splitlines():
        if not line.startswith(("\t", " ")):
            fields = line.split()
            local = fields[3] if len(fields) > 3 and any(o in line for o in owners) else None
        elif local is not None:
            m = re.search(r"bytes_received:(\d+)", line)
            got[local] = int(m.group(1)) if m else 0
    return got


def read_between(a: dict[str, int] | None, b: dict[str, int] | None) -> float:
    """Bytes read between two :func:`bytes_read` snapshots (a socket opened since counts from 0;
    one closed since is not counted: a reconnecting worker reads a little more than this)."""
    if a is None or b is None:
        return float("nan")
    return float(sum(v - a.get(k, 0) for k, v in b.items()))


def cli_argv(root: Path | None, *args: str) -> list[str]:
    """The fedmq CLI of this checkout, or of the checkout at ``root`` (its fedmq/ must hold links
    shared, broker, worker, aggregator -> ../NAME, so that it imports as installed)."""
    if root is None:
        return fedmq_argv(*args)
    code = (f"import os, runpy, sys; os.chdir({str(root)!r}); sys.path.insert(0, {str(root)!r}); "
            "sys.argv[0] = 'fedmq'; runpy.run_module('fedmq.cli', run_name='__main__')")
    return [sys.executable, "-c", code, *args]


def run_point(children: Children, work: Path, namespace: str, n: int, label: str, updates: int,
              extra: list[str], tag: str, profile: Path | None, root: Path | None = None,
              broker_pid: int | None = None, url: str = AMQP_URL, pool_args: tuple[str, ...] = ()) -> dict[str, Any]:
    hidden = MODEL_SIZES[label]
    run_dir = work / f"run-{tag}"
    argv = cli_argv(
        root,
        "aggregator", "--mode", "async", "--strategy", "fedbuff", "--buffer-size", str(K),
        "--max-updates", str(updates), "--min-workers", str(n), "--hidden", str(hidden),
        "--trainer", "bench.standin:NoiseTrainer", "--test-data", str(work / "data" / "test.npz"),
        "--out", str(run_dir), "--drain-timeout", "5", "--namespace", namespace, "--amqp-url", url,
        "--log-format", "json", *extra,
    )
    if profile is not None:
        argv = pyspy_argv(argv, profile / f"scale-{tag}.txt")
    load = loadavg()
    agg = children.spawn(f"aggregator-{tag}", argv, pipe_stderr=True)
    cpu = CpuSnapshots()
    broker = broker_pid or shared_broker_pid()
    if broker is not None:
        cpu.groups["rabbitmq"] = [broker]
    cpu.watch("aggregator", agg.pid)
    marks: list[tuple[int, float, float | None, dict[str, float]]] = []
    pool_pid: list[int] = []
    pool_read: dict[int, dict[str, int] | None] = {}  # mark index -> the pool's bytes read then, per socket

    def on_event(doc: dict[str, Any], _now: float) -> None:
        if doc["event"] == "version_evaluated":
            # the window: from the first version to the one at 90 % of the run (at the very end the
            # workers are already closing their connections on the stop, and ss no longer counts them)
            end = int(0.9 * updates)
            if pool_pid and (not pool_read or (int(doc["updates_applied"]) >= end and len(pool_read) < 2)):
                pool_read[len(marks)] = bytes_read(pool_pid[0])
            marks.append((int(doc["updates_applied"]), float(doc["ts"]), cpu_seconds(agg.pid), cpu.snapshot()))

    reader = EventReader(agg.stderr, children.log_dir / f"aggregator-{tag}.jsonl", on_event)
    pool = children.spawn(
        f"workers-{tag}",
        cli_argv(root, "workers", "--shards", str(work / "data"), "--count", str(n), "--trainer",
                   "bench.standin:NoiseTrainer", "--namespace", namespace, "--amqp-url", url,
                   "--log-format", "json", *pool_args),
        env=SINGLE_THREAD_ENV,
    )
    cpu.watch("workers", pool.pid, tree=True)  # its processes (fedmq workers --processes)
    pool_pid.append(pool.pid)
    hwm_kb = 0
    maxrss_kb = 0
    deadline = time.monotonic() + 120 + n * 0.5 + updates * mlp_param_count(hidden) * 4 / 2e6
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
    taus = [float(e.get("staleness") or 0) for e in ledger if e.get("fate") == "applied"]
    fates = {f: sum(1 for e in ledger if e.get("fate") == f) for f in {str(e.get("fate")) for e in ledger}}
    shutil.rmtree(run_dir, ignore_errors=True)
    valid = [i for i, m in enumerate(marks) if m[2] is not None and i in pool_read]
    i0, i1 = valid[0], valid[-1]
    first, last = marks[i0], marks[i1]
    span = last[0] - first[0]
    read_per_update = read_between(pool_read.get(i0), pool_read.get(i1)) / span if span else float("nan")
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
        "worker_bytes_per_update": read_per_update, "fates": fates,
        "staleness_mean": sum(taus) / len(taus) if taus else float("nan"),
        "worker_models_per_update": read_per_update / (mlp_param_count(hidden) * 4),
    }


PointFn = Callable[[Children, Path, str, str], dict[str, Any]]


def run_all(name: str, shards: int, per_shard: int, points: list[tuple[str, dict[str, Any], PointFn]],
            note: Callable[[dict[str, Any]], str], url: str = AMQP_URL) -> list[dict[str, Any]]:
    """Run each point (tag, fields added to its row, fn(children, work, namespace, tag)) on its
    own namespace over one synthetic dataset; every process stopped and namespace deleted (on the
    broker at ``url``) after each."""
    namespace = new_namespace(name)
    work = Path(tempfile.mkdtemp(prefix=f"fedmq-bench-{name}-"))
    write_synthetic(work / "data", shards=shards, per_shard=per_shard, test=64)
    children = Children(work / "logs")
    rows: list[dict[str, Any]] = []
    with torn_down(children, namespace, url=url):
        for i, (tag, fields, fn) in enumerate(points):
            ns = f"{namespace}-{i}"
            with torn_down(children, ns, say_logs=False, url=url):
                row = fn(children, work, ns, tag)
            row.update(fields)
            rows.append(row)
            print(f"  {tag}: {row['cpu_ms_per_update']:.2f} ms CPU/update, {row['updates_per_s']:.1f} upd/s, "
                  f"{note(row)}", file=sys.stderr)
    if os.environ.get("FEDMQ_BENCH_KEEP_LOGS"):
        print(f"logs kept in {work / 'logs'}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer updates, no 1M worker sweep, no diagnostic row")
    parser.add_argument("--profile", type=Path, default=None, help="record each aggregator with py-spy into DIR")
    parser.add_argument("--json", type=Path, default=None, help="output (default bench/results/scale.json)")
    parser.add_argument("--only", default=None,
                        help="comma-separated point tags to run, e.g. workers-n4-100k,workers-n64-100k (experiments)")
    parser.add_argument("--fetch", action="store_true", help="the model-fetch sweep: N = 4 ... 1000, 100k model")
    parser.add_argument("--base", type=Path, default=None, help="with --fetch: also run this checkout (same points)")
    parser.add_argument("--base-n", default="4,64", help="with --base: the N to run the base at")
    parser.add_argument("--n", default="4,16,64,256,1000", help="with --fetch: the N to run")
    parser.add_argument("--updates", type=int, default=240, help="with --fetch: applied updates per point")
    parser.add_argument("--pool-slowdown", type=float, default=None,
                        help="with --fetch (a diagnostic): every pooled worker waits (F - 1) x its compute time per "
                             "task, to pace a small N to the update rate a large one reaches on this machine")
    parser.add_argument("--broker-pid", type=int, default=None,
                        help="the beam.smp of the node at FEDMQ_BENCH_AMQP_URL (default: the oldest one)")
    parser.add_argument("--private-node", action="store_true",
                        help="with --fetch: run against a private RabbitMQ node of our own with a raised open-files "
                             "limit (the shared one's 1024 cannot hold ~1,000 workers), its own beam.smp measured")
    parser.add_argument("--node-open-files", type=int, default=None,
                        help="with --private-node: the node's open-files limit (default: our hard limit)")
    args = parser.parse_args(argv)
    if args.fetch:
        return fetch_sweep(args)
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

    started = time.monotonic()
    rows = run_all("scale", max(n for _, n, _, _ in points), 32, [
        (f"{sweep}-n{n}-{label}", {"sweep": sweep},
         lambda ch, work, ns, tag, n=n, label=label, extra=extra: run_point(
             ch, work, ns, n, label, counts[label], extra, tag, args.profile))
        for sweep, n, label, extra in points
    ], lambda row: f"peak {row['peak_mb']:.0f} MB")

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


def open_files_limit(pid: int | None) -> int | None:
    """The soft open-files limit of process ``pid`` (/proc/PID/limits), None if unreadable."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
    return None


def fetch_sweep(args: argparse.Namespace) -> int:
    """The fetch sweep on the shared broker, or each point on a private node of its own.

    One fresh node per point: RabbitMQ 3.10's quorum-queue log (Ra) crashed on a node reused
    across points (``ra_log_segment_writer`` ``{badmatch,{error,enoent}}`` soon after a point's
    namespace, and the pool's 64 control queues, were deleted: every quorum queue of the node
    went down with ``wal_down``, 541 INTERNAL_ERROR to clients), so that a later point
    measured a broken broker.
    """
    started = time.monotonic()
    points = fetch_points(args)
    if not args.private_node:
        pid = args.broker_pid or shared_broker_pid()
        return fetch_report(args, fetch_rows(args, points, AMQP_URL, args.broker_pid),
                            {"broker": "shared", "broker_open_files": open_files_limit(pid)}, started)
    import resource

    from fedmq.broker.provision import PrivateNode

    wanted = args.node_open_files or resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    rows: list[dict[str, Any]] = []
    limit = None
    for point in points:
        node = PrivateNode(open_files=wanted).start(timeout=240)
        try:
            pid = node.beam_pid()
            if pid is None:
                raise RuntimeError("the private node's beam.smp was not found (its CPU cannot be measured)")
            limit = open_files_limit(pid)
            print(f"  private node {node.name} (beam.smp {pid}), open files {limit} (asked {wanted})", file=sys.stderr)
            rows += fetch_rows(args, [point], node.url, pid)
        finally:
            node.remove()  # its namespaces go with it
    return fetch_report(args, rows, {"broker": "private node (one per point)", "broker_open_files": limit}, started)


def fetch_points(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(code, N) of each point: this checkout's, and the base's where asked, interleaved."""
    base_ns = {int(x) for x in args.base_n.split(",")} if args.base is not None else set()
    points: list[tuple[str, int]] = []
    for n in (int(x) for x in args.n.split(",")):
        if n in base_ns:
            points.append(("base", n))
        points.append(("this", n))
    return points


def fetch_rows(args: argparse.Namespace, points: list[tuple[str, int]], url: str,
               broker_pid: int | None) -> list[dict[str, Any]]:
    """Issue 15: model bytes read by workers, aggregator and broker CPU per update, at each point."""
    return run_all("fetch", max(n for _, n in points), 8, [
        (f"fetch-{code}-n{n}", {"code": code},
         lambda ch, work, ns, tag, n=n, code=code: run_point(
             ch, work, ns, n, "100k", args.updates, [], tag, args.profile, args.base if code == "base" else None,
             broker_pid, url, () if args.pool_slowdown is None else
             ("--slowdown", str(args.pool_slowdown), "--slow", str(n))))
        for code, n in points
    ], lambda row: f"{row['worker_models_per_update']:.2f} models read/update, load {row['loadavg']:.1f}", url)


def fetch_report(args: argparse.Namespace, rows: list[dict[str, Any]], broker: dict[str, Any], started: float) -> int:
    smallest = min(r["workers"] for r in rows)
    for r in rows:
        ref = next((x for x in rows if x["code"] == r["code"] and x["workers"] == smallest), r)
        r["cpu_vs_n4"] = r["cpu_ms_per_update"] / ref["cpu_ms_per_update"]
        r["flat_pass"] = bool(r["cpu_vs_n4"] <= FLAT_TOLERANCE)
        r["bytes_pass"] = bool(r["worker_models_per_update"] <= 2.0)
    headers = ["code", "N", "upd", "agg CPU ms/upd", "vs N=4", "flat", "models read/upd", "<= 2", "broker CPU ms/upd",
               "pool CPU ms/upd", "upd/s", "staleness", "not applied", "load"]
    print(table(headers, [[r["code"], r["workers"], r["window_updates"], r["cpu_ms_per_update"], r["cpu_vs_n4"],
                           "PASS" if r["flat_pass"] else "MISS", r["worker_models_per_update"],
                           "PASS" if r["bytes_pass"] else "MISS",
                           r["system_cpu_ms_per_update"].get("rabbitmq", float("nan")),
                           r["system_cpu_ms_per_update"].get("workers", float("nan")), r["updates_per_s"],
                           r["staleness_mean"], sum(v for f, v in r["fates"].items() if f != "applied"),
                           r["loadavg"]] for r in rows]))
    print(f"broker: {broker['broker']}, open-files limit {broker['broker_open_files']}")
    out = write_result("scale_fetch", {**broker, "k": K, "base": str(args.base) if args.base else None, "updates": args.updates,
                                       "wall_s": time.monotonic() - started, "rows": rows}, args.json)
    print(f"wrote {out}")
    return 0 if all(r["flat_pass"] and r["bytes_pass"] for r in rows if r["code"] == "this") else 1


if __name__ == "__main__":
    sys.exit(main())
