"""Large models through a broker with RabbitMQ 4's message limit: chunked sync FedAvg vs a raw-pika floor.

A private RabbitMQ node with ``max_message_size = 16777216`` (a stock RabbitMQ 4) runs
``fedmq aggregator --mode sync --rounds R --trainer bench.standin:NoiseTrainer`` with a one-hidden-
layer MLP 784 -> h -> 10 sized to the requested parameter count, and N ``fedmq worker`` processes,
on a synthetic 784-feature dataset (32 samples per worker). Reported per point:

* s/round: the median of the per-round deltas of ``history.json`` ``time_s``, rounds 2..R when R >= 3
  (round 1 includes the workers' start; each round: the model
  to the stream, N workers read it, perturb it, send N updates to the quorum queue, the aggregator
  puts them together in spill files, averages, evaluates and checkpoints);
* the raw-pika floor (``bench/floor.py``), measured against the same node in the same run: the same
  bytes moved the same way with bare pika and nothing else -- one model in messages of the chunk
  size into a stream read by N attached worker processes, each publishing one model's bytes in
  such messages into a quorum queue with confirms as soon as it has the model, while one consumer
  reads them all; the median of rounds 2..R (at least 2) -- and the ratio s/round / floor (goal <= 1.25);
* peak RSS (VmHWM) of the aggregator and of worker 0, as multiples of the model's size
  (goals: aggregator <= 4x, worker <= 3x, whatever N), and the peak of their anonymous memory
  (RssAnon: RSS without file pages, e.g. the spill files the aggregator averages from).

``--unchunked`` also runs each point with ``--chunk-bytes`` above the model's size (one message per
model and update; needs a node whose limit allows it: the node is then configured with 512 MiB), to
show what chunking costs where it is not needed.

Run: ``python bench/large_model.py --points 10M:2,100M:2,100M:4 [--rounds 2] [--unchunked]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402
    SINGLE_THREAD_ENV,
    Children,
    fedmq_argv,
    loadavg,
    median,
    status_kb,
    table,
    write_result,
    write_synthetic,
)
from bench.floor import round_floor  # noqa: E402

MiB = 1024 * 1024
CHUNK = 8 * MiB
INPUTS, CLASSES = 784, 10


def hidden_for(params: int) -> int:
    """h such that 784*h + h + h*10 + 10 is about ``params``."""
    return max(1, round((params - CLASSES) / (INPUTS + 1 + CLASSES)))


def param_count(h: int) -> int:
    return INPUTS * h + h + h * CLASSES + CLASSES


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1], 1)
    return int(float(text[:-1] if text[-1] in "KMG" else text) * scale)


# ------------------------------------------------------------------ one fedmq point
class PeakRss:
    """Samples VmHWM (peak RSS) and the peak of RssAnon (anonymous memory: RSS without file pages
    such as the aggregator's spill files, which the kernel can write out) of some pids until stopped."""

    def __init__(self) -> None:
        self.peak: dict[str, int] = {}
        self.peak_anon: dict[str, int] = {}
        self._pids: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, name: str, pid: int) -> None:
        self._pids[name] = pid

    def start(self) -> PeakRss:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for name, pid in self._pids.items():
                kb, anon = status_kb(pid, "VmHWM"), status_kb(pid, "RssAnon")
                if kb:
                    self.peak[name] = max(self.peak.get(name, 0), kb * 1024)
                if anon:
                    self.peak_anon[name] = max(self.peak_anon.get(name, 0), anon * 1024)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_point(url: str, work: Path, params: int, n: int, rounds: int, chunk_bytes: int) -> dict[str, Any]:
    h = hidden_for(params)
    model_bytes = param_count(h) * 4
    ns = f"large-{params // 10**6}m-n{n}-{time.time_ns() % 10**6}"
    run_dir = work / ns
    children = Children(work / "logs")
    rss = PeakRss().start()
    common = ["--namespace", ns, "--amqp-url", url, "--log-format", "json", "--chunk-bytes", str(chunk_bytes)]
    try:
        agg = children.spawn(f"{ns}-agg", fedmq_argv(
            "aggregator", "--mode", "sync", "--rounds", str(rounds), "--workers-per-round", str(n),
            "--min-workers", str(n), "--hidden", str(h), "--trainer", "bench.standin:NoiseTrainer",
            "--test-data", str(work / "data" / "test.npz"), "--out", str(run_dir), "--round-timeout", "1800",
            "--join-grace", "0", *common), env=SINGLE_THREAD_ENV)
        rss.watch("aggregator", agg.pid)
        for i in range(n):
            w = children.spawn(f"{ns}-w{i}", fedmq_argv(
                "worker", "--data", str(work / "data" / f"worker-{i}.npz"), "--worker-id", f"w{i}",
                "--trainer", "bench.standin:NoiseTrainer", *common), env=SINGLE_THREAD_ENV)
            if i == 0:
                rss.watch("worker", w.pid)
        code = agg.wait(timeout=600 + rounds * n * model_bytes / 20e6)
        if code != 0:
            raise RuntimeError(f"aggregator exited with {code}; see {children.log_dir}")
    finally:
        rss.stop()
        children.stop_all()
    doc = json.loads((run_dir / "history.json").read_text())
    ends = [0.0] + [float(e["time_s"]) for e in doc["history"] if e.get("round")]
    per_round = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    fates: dict[str, int] = {}
    for line in (run_dir / "updates.jsonl").read_text().splitlines():
        if line.strip():
            fate = json.loads(line)["fate"]
            fates[fate] = fates.get(fate, 0) + 1
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"params": param_count(h), "hidden": h, "model_bytes": model_bytes, "workers": n, "rounds": rounds,
            "chunk_bytes": chunk_bytes, "per_round_s": per_round,
            "median_s": median(per_round[1:] if len(per_round) >= 3 else per_round),  # round 1 waits for workers
            "peak_rss": dict(rss.peak), "aggregator_x_model": rss.peak.get("aggregator", 0) / model_bytes,
            "worker_x_model": rss.peak.get("worker", 0) / model_bytes, "peak_anon": dict(rss.peak_anon),
            "aggregator_anon_x_model": rss.peak_anon.get("aggregator", 0) / model_bytes,
            "worker_anon_x_model": rss.peak_anon.get("worker", 0) / model_bytes, "fates": fates, "loadavg": loadavg()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", default="10M:2,100M:2,100M:4", help="PARAMS:N,... (e.g. 100M:4,250M:2)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--chunk-bytes", type=int, default=CHUNK)
    parser.add_argument("--unchunked", action="store_true", help="also run each point as one message per model")
    parser.add_argument("--json", type=Path, default=None, help="output (default bench/results/large_model.json)")
    args = parser.parse_args(argv)
    points = [(parse_size(p.split(":")[0]), int(p.split(":")[1])) for p in args.points.split(",") if p]

    from fedmq.broker.provision import PrivateNode

    work = Path(tempfile.mkdtemp(prefix="fedmq-bench-large-"))
    write_synthetic(work / "data", shards=max(n for _, n in points), per_shard=32, test=64)
    rows: list[dict[str, Any]] = []
    limits = [16 * MiB] + ([512 * MiB] if args.unchunked else [])
    try:
        for limit in limits:
            node = PrivateNode(config={"max_message_size": str(limit)}).start(timeout=240)
            try:
                for params, n in points:
                    model_bytes = param_count(hidden_for(params)) * 4
                    chunk = args.chunk_bytes if limit == 16 * MiB else model_bytes + MiB
                    if chunk + 64 * 1024 > limit:
                        continue
                    print(f"  {params / 1e6:g}M params, N={n}, chunks of {chunk / MiB:.1f} MiB: fedmq ...", file=sys.stderr)
                    row = run_point(node.url, work, params, n, args.rounds, chunk)
                    print(f"    {row['median_s']:.2f} s/round; raw-pika floor ...", file=sys.stderr)
                    row["floor"] = round_floor(node.url, row["model_bytes"], n, chunk_bytes=chunk,
                                               rounds=max(2, args.rounds))
                    row["ratio_to_floor"] = row["median_s"] / row["floor"]["total_s"]
                    row["broker_limit"] = limit
                    print(f"    floor {row['floor']['total_s']:.2f} s, ratio {row['ratio_to_floor']:.2f}; peak RSS "
                          f"agg {row['aggregator_x_model']:.2f}x, worker {row['worker_x_model']:.2f}x", file=sys.stderr)
                    rows.append(row)
            finally:
                node.remove()  # its namespaces go with it
    finally:
        shutil.rmtree(work, ignore_errors=True)
    headers = ["params", "N", "MB/model", "chunk MiB", "s/round", "floor s", "ratio", "agg RSS/model",
               "agg anon/model", "worker RSS/model", "worker anon/model"]
    body = [[f"{r['params'] / 1e6:.0f}M", r["workers"], r["model_bytes"] / 1e6, r["chunk_bytes"] / MiB, r["median_s"],
             r["floor"]["total_s"], r["ratio_to_floor"], r["aggregator_x_model"], r["aggregator_anon_x_model"],
             r["worker_x_model"], r["worker_anon_x_model"]] for r in rows]
    print(table(headers, body))
    out = write_result("large_model", {"rounds": args.rounds, "rows": rows}, args.json)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
