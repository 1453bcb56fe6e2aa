"""Checkpoint cost against the length of the run: a base commit and this checkout, in one run.

What is timed is ``Aggregator._checkpoint`` itself (the shell's durability step: ledger fsync,
history.jsonl fsync where there is one, the state meta and strategy, ``state.npz`` written
atomically, history.json written atomically), on a real :class:`Coordinator` driven through its
inputs to V versions (async FedBuff, K = 3, so 3 updates and 3 task ids per version; one worker;
a small 64-32-10 model, so that what grows with the run is not hidden behind the model's bytes).
No broker: publishes are not part of a checkpoint's cost, and the lock check is skipped.

Each measured checkpoint follows one more version (3 updates recorded in the ledger), as in a
run; the first checkpoint (which also makes the whole history.jsonl durable once) is not timed.
Bytes: ``state.npz`` and ``history.json`` as written by each checkpoint (history.jsonl only grows
by the new version's line). history.json in full is written once more when the aggregator leaves;
that is not a per-checkpoint cost and is not timed.

The base runs from a temporary ``git worktree`` of ``--base`` (removed afterwards), imported
through a link tree with the installed layout (``scripts/typecheck.py``); each (V, tree) is a
child process, base and this checkout alternating, twice. The load average is printed with
every figure: the machine is shared.

Run: ``python bench/checkpoint.py [--versions 100,1000,3333] [--repeat 15] [--base aba9db9]``;
prints a table of ratios and writes ``bench/results/checkpoint.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"dense_0/W": (64, 32), "dense_0/b": (32,), "dense_1/W": (32, 10), "dense_1/b": (10,)}


# ------------------------------------------------------------------ child: one tree, one V
def child(versions: int, repeat: int, out: Path) -> dict[str, Any]:
    """Drive a coordinator to ``versions`` versions and time ``repeat`` checkpoints after it.

    Runs against whichever fedmq ``sys.path`` finds (the parent sets PYTHONPATH to a link tree).
    """
    import numpy as np

    from fedmq.aggregator import durable
    from fedmq.aggregator.config import AggregatorConfig
    from fedmq.aggregator.core import (
        Coordinator,
        Decision,
        Evaluate,
        RunState,
        Settle,
        VersionEvaluated,
    )
    from fedmq.aggregator.policy import make_policy
    from fedmq.aggregator.service import Aggregator
    from fedmq.aggregator.strategies import make_strategy
    from fedmq.broker.settings import BrokerSettings
    from fedmq.broker.topology import Topology
    from fedmq.shared import messages

    cfg = AggregatorConfig(test_data="unused.npz", out=str(out), mode="async", strategy="fedbuff", buffer_size=3,
                           concurrency=3, max_updates=10**9, join_grace=0.0).validate()
    params = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    strategy = make_strategy("fedbuff", buffer_size=3)
    core = Coordinator(cfg, strategy, make_policy(cfg), params, incarnation="bench01",
                       run_id="20260101T000000Z-000000")
    agg = Aggregator(cfg, BrokerSettings(), Topology("bench-checkpoint"))
    out.mkdir(parents=True, exist_ok=True)
    agg.core, agg.spec = core, {"layers": [64, 32, 10]}
    agg.ledger = durable.Ledger(out / "updates.jsonl")
    history = None
    try:
        from fedmq.aggregator.history import History  # this checkout only
    except ImportError:
        pass
    else:
        history = History(out)
    if history is not None:
        agg.history = history  # type: ignore[attr-defined]  # unknown to the base
    agg._guard = lambda: None  # type: ignore[method-assign]  # no broker, no lock to check
    agg.client = _NoBroker()  # type: ignore[assignment]  # nothing to ack: no deliveries
    delta = {k: np.full(s, 1e-3, np.float32) for k, s in SHAPES.items()}
    clock = {"now": 0.0, "n": 0}

    def carry(decisions: list[Decision]) -> None:
        for d in decisions:
            if isinstance(d, Settle):
                agg.ledger.record(d.entry)
            elif isinstance(d, Evaluate):
                carry(core.evaluated(d.version, 0.3, 0.9, clock["now"]))
            elif isinstance(d, VersionEvaluated) and history is not None:
                history.record(d.entry)

    def hello() -> None:
        carry(core.presence(messages.Control(kind="hello", worker_id="w0", sent_s=0.0), clock["now"]))

    def one_version() -> None:
        target = core.state.version + 1
        while core.state.version < target:
            clock["now"] += 1e-3
            clock["n"] += 1
            if clock["n"] % 1000 == 0:
                hello()  # stays live (--presence-timeout counts core time)
            task = next(iter(core.state.outstanding))
            update = messages.Update(task_id=task, worker_id="w0", base_version=core.state.version, num_samples=10,
                                     params=delta, kind=strategy.update_kind, train_loss=0.1, train_accuracy=0.9,
                                     duration_s=0.01, round=None, run_id=core.run_id)
            carry(core.receive(clock["n"], update, clock["now"], message_id=f"m{clock['n']}"))

    carry(core.start(0.0))
    hello()
    t0 = time.perf_counter()
    while core.state.version < versions:
        one_version()
    drive_s = time.perf_counter() - t0
    agg._checkpoint(force=True)  # not timed: makes what the drive recorded durable
    ms, cpu_ms = [], []
    for _ in range(repeat):
        one_version()
        t, c = time.perf_counter(), time.process_time()
        agg._checkpoint(force=True)
        ms.append(1e3 * (time.perf_counter() - t))
        cpu_ms.append(1e3 * (time.process_time() - c))
    state_bytes = (out / durable.CHECKPOINT_DIR / durable.CHECKPOINT_FILE).stat().st_size
    hist_bytes = (out / "history.json").stat().st_size
    meta, _ = durable.load_checkpoint(out) or ({}, {})
    return {"versions": core.state.version, "updates": core.state.counts["applied"], "ms": ms, "cpu_ms": cpu_ms,
            "drive_s": drive_s,
            "state_npz_bytes": state_bytes, "history_json_bytes": hist_bytes,
            "meta_bytes": len(json.dumps(meta)),
            "applied_ids": len(RunState.from_meta(meta["state"], 0.0).applied_tasks),
            "has_history_list": "history" in meta["state"]}


class _NoBroker:
    """Stands in for the broker client: a checkpoint acks what it made durable (nothing here)."""

    def ack(self, delivery: Any) -> None:
        raise AssertionError("no delivery to ack in this benchmark")


# ------------------------------------------------------------------ parent
def run_child(tree: Path, versions: int, repeat: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedmq-ckpt-") as tmp:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        proc = subprocess.run([sys.executable, __file__, "--child", str(versions), "--repeat", str(repeat),
                               "--out", str(Path(tmp) / "run")], env=env, cwd=tmp, capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"child ({tree}, {versions}) failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--versions", default="100,1000,3333")
    ap.add_argument("--repeat", type=int, default=15, help="timed checkpoints per child (two children per tree)")
    ap.add_argument("--base", default="aba9db9", help="the commit to compare against")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.repeat, Path(args.out))))
        return 0

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "scripts"))
    from typecheck import link_tree  # type: ignore[import-not-found]

    from bench._common import loadavg, table, write_result

    work = Path(tempfile.mkdtemp(prefix="fedmq-bench-checkpoint-"))
    base_dir = work / "base"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base_dir), args.base],
                   check=True, capture_output=True)
    try:
        trees = {"base": link_tree(work / "tree-base", base_dir).parent,
                 "this": link_tree(work / "tree-this", ROOT).parent}
        results: dict[str, dict[int, list[dict[str, Any]]]] = {"base": {}, "this": {}}
        loads: dict[int, list[float]] = {}
        for v in (int(x) for x in args.versions.split(",")):
            loads[v] = [loadavg()]
            for order in (("base", "this"), ("this", "base")):
                for name in order:
                    results[name].setdefault(v, []).append(run_child(trees[name], v, args.repeat))
                    loads[v].append(loadavg())
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_dir)], check=False,
                       capture_output=True)
    rows, doc_rows = [], []
    for v in loads:
        b, t = results["base"][v], results["this"][v]
        b_ms = statistics.median(m for r in b for m in r["ms"])
        t_ms = statistics.median(m for r in t for m in r["ms"])
        b_cpu = statistics.median(m for r in b for m in r["cpu_ms"])
        t_cpu = statistics.median(m for r in t for m in r["cpu_ms"])
        b_bytes = b[-1]["state_npz_bytes"] + b[-1]["history_json_bytes"]
        t_bytes = t[-1]["state_npz_bytes"] + t[-1]["history_json_bytes"]
        load = f"{min(loads[v]):.2f}-{max(loads[v]):.2f}"
        rows.append([v, round(b_ms, 2), round(t_ms, 2), f"{b_ms / t_ms:.1f}x", round(b_cpu, 2), round(t_cpu, 2),
                     f"{b_cpu / t_cpu:.1f}x", b_bytes, t_bytes,
                     f"{b_bytes / t_bytes:.1f}x", b[-1]["applied_ids"], t[-1]["applied_ids"], load])
        doc_rows.append({"versions": v, "base": b, "this": t, "base_ms": b_ms, "this_ms": t_ms,
                         "base_cpu_ms": b_cpu, "this_cpu_ms": t_cpu,
                         "base_bytes": b_bytes, "this_bytes": t_bytes, "loadavg": loads[v]})
    print(table(["versions", "base ms", "this ms", "base/this", "base cpu ms", "this cpu ms", "base/this",
                 "base bytes", "this bytes", "base/this",
                 "base ids", "this ids", "load avg"], rows))
    print("ms: median checkpoint wall time (fsyncs included); cpu ms: its process CPU time; bytes: state.npz + history.json written per checkpoint; ids: settled task "
          "ids in the checkpoint")
    path = write_result("checkpoint", {"base": args.base, "repeat": args.repeat, "rows": doc_rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
