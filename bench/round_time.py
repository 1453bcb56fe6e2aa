"""Synchronous FedAvg round time with the stand-in trainer; with ``--peers flower``, Flower in the same run.

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

Reports median s/round and MB/s moved (2 x N x model bytes per round / s; with ``--compress`` the
updates move fewer bytes, and MB/s stays in model-sized units so that it compares with ``none``). No peer figure is
written in this file: with ``--peers flower`` each point is followed, in the same run, by the
same workload on Flower's Simulation Engine and Deployment Engine (``bench/peers/flower.py``,
in its own pinned environment: ``python bench/peers/flower.py --setup`` creates it, and
``--peers flower`` does too when it is missing), and the table adds their s/round, the ratio
fedmq / Simulation and the speedup over Deployment, with the 1-minute load average at each
point. Goals (issue 15): >= 20x faster than Deployment, <= Simulation's time at every point.
The exit status is 1 when a peer failed to run or a goal was missed, else 0.
``--compress none,int8`` runs every point once per scheme, one after the other (the table has a row
each; Flower runs once per point and is compared with each); ``--model-dtype float32,bfloat16,int8``
crosses them with the models' wire dtype.
``--floor`` follows each row, on the same broker once the fedmq processes are gone, with the raw-pika floor of
one round (``bench/floor.py``: the model into a stream, N readers, N writers into a quorum queue while one
consumer takes them, bodies as fedmq encodes them for that row's ``--compress`` and ``--model-dtype``, in fedmq's
default chunk size; median round over rounds 2..R, like fedmq's) and the ratio s/round / floor (goal <= 1.1 for
lossless rows, issue 15).
Run: ``python bench/round_time.py [--quick] [--workers 4,16] [--sizes 100k,1M,10M] [--compress none,int8]
[--model-dtype float32,bfloat16,int8] [--profile DIR] [--floor] [--peers flower [--peer-engines simulation,deployment]
[--deployment-rounds 4]]``.
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
    fedmq_argv,
    loadavg,
    median,
    mlp_param_count,
    mlp_shapes,
    new_namespace,
    pyspy_argv,
    table,
    torn_down,
    write_result,
    write_synthetic,
)
from bench.floor import body_bytes, round_floor  # noqa: E402
from fedmq.rundir import events_in  # noqa: E402
from fedmq.shared.compression import MODEL_DTYPES  # noqa: E402
from fedmq.shared.compression import parse as parse_compression  # noqa: E402

SPEEDUP_GOAL = 20.0
FLOOR_GOAL = 1.1  # issue 15: a lossless sync round within 1.1x the raw-pika floor moving the same bytes


def variant(compress: str, model_dtype: str) -> str:
    """A row's label: the --compress scheme, and the models' dtype where they are not float32."""
    return compress if model_dtype == "float32" else f"{compress}, {model_dtype} models"
PEERS = ("flower",)


def run_point(children: Children, work: Path, namespace: str, n: int, label: str, rounds: int,
              profile: Path | None, compress: str = "none", model_dtype: str = "float32") -> dict[str, Any]:
    hidden = MODEL_SIZES[label]
    run_dir = work / f"run-n{n}-{label}"
    argv = fedmq_argv(
        "aggregator", "--mode", "sync", "--rounds", str(rounds), "--workers-per-round", str(n),
        "--min-workers", str(n), "--hidden", str(hidden), "--trainer", "bench.standin:NoiseTrainer",
        "--test-data", str(work / "data" / "test.npz"), "--out", str(run_dir), "--round-timeout", "300",
        "--namespace", namespace, "--amqp-url", AMQP_URL, "--log-format", "json", "--log-level", "debug",
        "--compress", compress, "--model-dtype", model_dtype,
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
    worker_logs = [children.log_dir / f"worker-n{n}-{label}-{i}.log" for i in range(n)]
    worker_events = [e for log in worker_logs if log.exists() for e in events_in(log.read_text(errors="replace"))]
    phases = round_phases(reader.seen, worker_events, rounds)
    model_bytes = mlp_param_count(hidden) * 4
    steady = per_round[1:]  # rounds 2..R
    s_round = median(steady)
    cpu_per_round: dict[str, float] = {}
    if 1 in marks and rounds in marks:
        d = CpuSnapshots.delta(marks[1], marks[rounds])
        cpu_per_round = {k: v / (rounds - 1) for k, v in d.items() if k not in ("machine_total", "wall", "cores")}
    return {
        "workers": n, "model": label, "compress": variant(compress, model_dtype), "model_dtype": model_dtype, "hidden": hidden, "params": mlp_param_count(hidden), "model_bytes": model_bytes,
        "rounds": rounds, "per_round_s": per_round, "median_s": s_round, "mean_s": sum(steady) / len(steady),
        "collect_median_s": median(collect[1:]), "close_median_s": median(close[1:]),
        "mb_per_s": 2 * n * model_bytes / s_round / 1e6,
        "fates": fates, "aggregator_wall_s": wall, "loadavg": load,
        "cpu_s_per_round": cpu_per_round, "phases_ms": phases,
    }


#: where a round goes, from the events of the aggregator and the workers (each a median over rounds 2..R, ms)
PHASES = {
    "checkpoint": "the last round closed -> its checkpoint written (the average is before: the close column)",
    "to workers": "-> the last worker started its task (model published, fetched, decoded; task delivered)",
    "work": "-> the last worker's update confirmed (training, encoding, publish, the broker's confirm)",
    "in": "-> the round closed (the updates received and decoded, the average)",
}


def round_phases(agg: list[dict[str, Any]], workers: list[dict[str, Any]], rounds: int) -> dict[str, float]:
    """Median ms per phase (:data:`PHASES`) over rounds 2..``rounds``: the chain from one round's
    close to the next, read from event timestamps (ms resolution). Empty if an event is missing
    (an aggregator not at debug level writes no ``checkpoint_written``)."""
    closed = {int(e["round"]): float(e["ts"]) for e in agg if e["event"] == "round_closed"}
    written = sorted(float(e["ts"]) for e in agg if e["event"] == "checkpoint_written")
    started: dict[int, list[float]] = {}
    confirmed: dict[int, list[float]] = {}
    for e in workers:
        version = e.get("version")
        if e["event"] == "task_started" and isinstance(version, int):
            started.setdefault(version + 1, []).append(float(e["ts"]))  # round r trains on version r - 1
        elif e["event"] == "update_confirmed" and str(e.get("ticket", "")).startswith("r"):
            confirmed.setdefault(int(str(e["ticket"])[1:].split("-")[0]), []).append(float(e["ts"]))
    per: dict[str, list[float]] = {k: [] for k in PHASES}
    for r in range(2, rounds + 1):
        if r - 1 not in closed or r not in closed or r not in started or r not in confirmed:
            continue
        t0 = closed[r - 1]
        ck = next((t for t in written if t >= t0), None)
        if ck is None or ck > closed[r]:
            continue
        marks = [t0, ck, max(started[r]), max(confirmed[r]), closed[r]]
        for name, a, b in zip(PHASES, marks, marks[1:], strict=False):
            per[name].append((b - a) * 1e3)
    return {k: median(v) for k, v in per.items() if v}


def floor_of(n: int, label: str, scheme: str, rounds: int, model_dtype: str = "float32") -> dict[str, Any]:
    """The raw-pika floor of this point (the model, in ``model_dtype``, and ``scheme``'s update
    bodies as fedmq encodes them, fedmq's default chunk size): median round over rounds
    2..``rounds``, as fedmq's s/round."""
    model_msg, update_msg = body_bytes(mlp_shapes(MODEL_SIZES[label]), scheme, model_dtype)
    load = loadavg()
    floor = round_floor(AMQP_URL, model_msg, n, update_bytes=update_msg, rounds=rounds)
    floor["loadavg"] = load
    print(f"  N={n} {label} {variant(scheme, model_dtype)}: floor {floor['total_s']:.3f} s/round", file=sys.stderr)
    return floor


def floor_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]], bool]:
    """s/round against the raw-pika floor per row, and whether every lossless row met the goal."""
    headers = ["N", "model", "compress", "s/round", "floor s", "model to N", "N updates in", "ratio",
               f"<={FLOOR_GOAL}", "machine CPU s/round", "floor's", "CPU ratio", "broker CPU s/round", "floor's",
               "floor busy %", "load"]
    body: list[list[Any]] = []
    met = True
    for r in rows:
        f = r["floor"]
        ok = r["ratio_to_floor"] <= FLOOR_GOAL
        lossless = r.get("compress", "none") == "none"
        met &= ok or not lossless
        # the CPU both rounds cost the whole machine: on few cores, s/round cannot fall much below
        # the floor's s/round x this CPU ratio
        cpu, floor_cpu = r.get("cpu_s_per_round", {}).get("machine_busy"), f.get("machine_cpu_s")
        cpu_ratio = cpu / floor_cpu if cpu is not None and floor_cpu else None
        body.append([r["workers"], r["model"], r.get("compress", "none"), r["median_s"], f["total_s"], f["model_s"],
                     f["updates_s"], r["ratio_to_floor"],
                     ("PASS" if ok else "MISS") if lossless else ("yes" if ok else "no"),
                     "-" if cpu is None else cpu, "-" if floor_cpu is None else floor_cpu,
                     "-" if cpu_ratio is None else cpu_ratio,
                     r.get("cpu_s_per_round", {}).get("rabbitmq", "-"),
                     "-" if f.get("broker_cpu_s") is None else f["broker_cpu_s"],
                     "-" if f.get("machine_busy_share") is None else 100 * f["machine_busy_share"], f["loadavg"]])
    return headers, body, met


def run_peers(engines: list[str], n: int, label: str, rounds: int, deployment_rounds: int, work: Path,
              s_round: float) -> dict[str, Any]:
    """Flower's engines on the point just measured; a failed engine is recorded, not raised."""
    from bench.peers import flower

    out: dict[str, Any] = {}
    for engine in engines:
        try:
            peer = flower.run_point(engine, n, label, deployment_rounds if engine == "deployment" else rounds, work)
        except Exception as exc:  # noqa: BLE001 (fedmq's figures stand; the failure is reported)
            out[engine] = {"error": str(exc)}
            print(f"  Flower {engine} N={n} {label} failed: {exc}", file=sys.stderr)
            continue
        peer["fedmq_over_peer"] = s_round / peer["median_s"]
        out[engine] = peer
        print(f"  Flower {engine} N={n} {label}: {peer['median_s']:.3f} s/round", file=sys.stderr)
    return out


def peer_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]], bool]:
    """The side-by-side table, and whether every goal was met (>= 20x Deployment, <= Simulation)."""
    headers = ["N", "model", "compress", "fedmq s", "load", "Flower Sim s", "load", "fedmq/Sim", "<=Sim", "Flower Deploy s",
               "load", "Deploy/fedmq", ">=20x"]
    body: list[list[Any]] = []
    met = True
    for r in rows:
        sim, dep = r["peers"].get("simulation", {}), r["peers"].get("deployment", {})
        cells: list[Any] = [r["workers"], r["model"], r.get("compress", "none"), r["median_s"], r["loadavg"]]
        if "median_s" in sim:
            ok = r["median_s"] <= sim["median_s"]
            cells += [sim["median_s"], sim["loadavg"], r["median_s"] / sim["median_s"], "PASS" if ok else "MISS"]
            met &= ok
        else:
            cells += ["failed" if sim else "-", "-", "-", "-"]
            met &= not sim
        if "median_s" in dep:
            ok = dep["median_s"] / r["median_s"] >= SPEEDUP_GOAL
            cells += [dep["median_s"], dep["loadavg"], dep["median_s"] / r["median_s"], "PASS" if ok else "MISS"]
            met &= ok
        else:
            cells += ["failed" if dep else "-", "-", "-", "-"]
            met &= not dep
        body.append(cells)
    return headers, body, met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=4 only, 4 rounds (well under a minute)")
    parser.add_argument("--workers", default=None, help="comma-separated N values (default 4,16; quick: 4)")
    parser.add_argument("--sizes", default="100k,1M,10M", help="comma-separated subset of 100k,1M,10M")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per point (default 8; quick: 4)")
    parser.add_argument("--profile", type=Path, default=None, help="record the aggregator and worker 0 with py-spy into DIR")
    parser.add_argument("--json", type=Path, default=None, help="output (default bench/results/round_time.json)")
    parser.add_argument("--compress", default="none",
                        help="comma-separated --compress schemes, each run at every point in turn (e.g. none,int8)")
    parser.add_argument("--model-dtype", default="float32",
                        help="comma-separated --model-dtype values (float32,bfloat16,int8), crossed with --compress")
    parser.add_argument("--peers", choices=PEERS, default=None,
                        help="after each point, run the same workload on this peer (bench/peers/) and print the ratios")
    parser.add_argument("--peer-engines", default="simulation,deployment",
                        help="with --peers flower: comma-separated subset of simulation,deployment")
    parser.add_argument("--deployment-rounds", type=int, default=4,
                        help="rounds per point on Flower's Deployment Engine (default 4: its rounds take seconds)")
    parser.add_argument("--floor", action="store_true",
                        help="after each row, the raw-pika floor of one round's bytes (bench/floor.py) on the same broker, "
                             "and s/round / floor (goal <= 1.1)")
    args = parser.parse_args(argv)
    workers = [int(x) for x in (args.workers or ("4" if args.quick else "4,16")).split(",")]
    rounds = args.rounds or (4 if args.quick else 8)
    if rounds < 3 or args.deployment_rounds < 3:
        parser.error("--rounds and --deployment-rounds must be at least 3 (round 1 is excluded from the median)")
    sizes = [s for s in args.sizes.split(",") if s]
    schemes = [s for s in args.compress.split(",") if s]
    for scheme in schemes:
        try:
            parse_compression(scheme)
        except ValueError as exc:
            parser.error(f"--compress: {exc}")
    dtypes = [d for d in args.model_dtype.split(",") if d]
    if not dtypes or any(d not in MODEL_DTYPES for d in dtypes):
        parser.error(f"--model-dtype: comma-separated among {', '.join(MODEL_DTYPES)}")
    variants = [(scheme, dtype) for dtype in dtypes for scheme in schemes]
    if any(n < 1 for n in workers) or any(s not in MODEL_SIZES for s in sizes):
        parser.error("workers must be positive and sizes among 100k, 1M, 10M")
    engines = [e for e in args.peer_engines.split(",") if e] if args.peers else []
    peer_versions: dict[str, str] = {}
    if args.peers == "flower":
        from bench.peers import flower

        if any(e not in flower.ENGINES for e in engines):
            parser.error(f"--peer-engines must be among {', '.join(flower.ENGINES)}")
        peer_versions = flower.ensure_venv(create=True)

    namespace = new_namespace("round-time")
    work = Path(tempfile.mkdtemp(prefix="fedmq-bench-round-time-"))
    write_synthetic(work / "data", shards=max(workers), per_shard=32, test=64)
    children = Children(work / "logs")
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    with torn_down(children, namespace):
        for n in workers:
            for label in sizes:
                point = []
                for scheme, dtype in variants:  # side by side: the variants of one point run one after another
                    ns = f"{namespace}-n{n}-{label}-{scheme.replace(':', '')}-{dtype}"
                    with torn_down(children, ns, say_logs=False):
                        row = run_point(children, work, ns, n, label, rounds, args.profile, scheme, dtype)
                    if args.floor:  # the fedmq processes are gone: the floor has the broker to itself
                        row["floor"] = floor_of(n, label, scheme, rounds, dtype)
                        row["ratio_to_floor"] = row["median_s"] / row["floor"]["total_s"]
                    point.append(row)
                    print(f"  N={n} {label} {row['compress']}: {row['median_s']:.3f} s/round", file=sys.stderr)
                rows += point
                if engines:  # the peers once per point, compared with each scheme's row
                    peers = run_peers(engines, n, label, rounds, args.deployment_rounds, work / "peers",
                                      point[0]["median_s"])
                    for row in point:
                        row["peers"] = peers
    failed = any("error" in p for r in rows for p in r.get("peers", {}).values())
    if failed:
        print(f"peer logs kept in {work / 'peers' / 'logs'}", file=sys.stderr)
    elif os.environ.get("FEDMQ_BENCH_KEEP_LOGS"):
        print(f"logs kept in {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)

    headers = ["N", "model", "compress", "s/round", "collect", "close", "MB/s", "loadavg"]
    body = [[r["workers"], r["model"], r["compress"], r["median_s"], r["collect_median_s"], r["close_median_s"], r["mb_per_s"],
             r["loadavg"]] for r in rows]
    print(table(headers, body))
    if any(r["phases_ms"] for r in rows):
        print("\nWhere a round goes (median ms over rounds 2..R, from the processes' events): "
              + "; ".join(f"{k}: {v}" for k, v in PHASES.items()))
        print(table(["N", "model", "compress", *PHASES],
                    [[r["workers"], r["model"], r["compress"], *(r["phases_ms"].get(k, float("nan")) for k in PHASES)]
                     for r in rows]))
    met = True
    if args.floor:
        floor_headers, floor_body, met = floor_table(rows)
        print(f"\nSame run, same broker: the raw-pika floor of one round (bench/floor.py; median of rounds 2..{rounds}); "
              f"goal s/round / floor <= {FLOOR_GOAL} (lossless rows)")
        print(table(floor_headers, floor_body))
    if engines:
        peer_headers, peer_body, peers_met = peer_table(rows)
        met &= peers_met
        print(f"\nSame run, same workload on Flower {peer_versions.get('flwr', '?')} (Ray {peer_versions.get('ray', '?')}): "
              f"median s/round over rounds 2..R; load = 1-minute load average when the point started")
        print(table(peer_headers, peer_body))
    print("\nCPU seconds per round (rounds 2..R), by process group; machine = 2 cores x s/round available")
    cpu_headers = ["N", "model", "compress", "s/round", "aggregator", "workers", "rabbitmq", "other", "machine busy", "busy %"]
    cpu_body = []
    for r in rows:
        c = r["cpu_s_per_round"]
        if c:
            cpu_body.append([r["workers"], r["model"], r["compress"], r["median_s"], c.get("aggregator", 0.0), c.get("workers", 0.0),
                             c.get("rabbitmq", float("nan")), c["other"], c["machine_busy"],
                             100 * c["machine_busy"] / (r["mean_s"] * (os.cpu_count() or 1))])
    print(table(cpu_headers, cpu_body))
    out = write_result("round_time", {"quick": args.quick, "rounds": rounds, "worker_hosting": "processes",
                                      "peers": args.peers, "peer_versions": peer_versions,
                                      "deployment_rounds": args.deployment_rounds if "deployment" in engines else None,
                                      "wall_s": time.monotonic() - started, "rows": rows}, args.json)
    print(f"wrote {out}")
    return 0 if met and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
