"""Chaos by hand: SIGKILL the aggregator and --resume it, restart the broker, reach the target.

Runs an asynchronous FedBuff federation (4 worker processes) on a private RabbitMQ node it
starts itself, injects both faults, and checks the ledger afterwards. What the processes did
is read from their events (JSON logs) and the run directory, never from log messages.

    python scripts/chaos_demo.py [WORK_DIR]
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmq.broker.provision import PrivateNode
from fedmq.rundir import confirmed_updates, history_len, ledger_problems, read_history, read_ledger
from fedmq.runner import fedmq_argv


class Children:
    """The demo's child processes, each logging to its own file (in its own session)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> None:
        with open(self.logs / f"{name}.log", "ab") as f:
            self.procs[name] = subprocess.Popen(fedmq_argv(*args), stdout=f, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self, name: str) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(timeout=10)

    def wait(self, name: str, timeout: float) -> int:
        return self.procs[name].wait(timeout=timeout)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)  # watching other processes' files
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def final_version(run: Path) -> int:
    try:
        return int(read_history(run)["final"]["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def main(base: Path) -> int:
    run = base / "run"
    for path in (run, base / "logs", base / "shards"):
        shutil.rmtree(path, ignore_errors=True)
    subprocess.run(fedmq_argv("data", "split", "--dataset", "digits", "--workers", "4", "--partition", "dirichlet",
                              "--alpha", "0.5", "--out", str(base / "shards")), check=True, capture_output=True)
    shards = base / "shards"
    node = PrivateNode().start()
    procs = Children(base / "logs")
    common = ["--amqp-url", node.url, "--namespace", "chaos", "--log-format", "json"]
    agg = ["aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run), "--mode", "async",
           "--strategy", "fedbuff", "--buffer-size", "2", "--min-workers", "4", "--target-accuracy", "0.95",
           "--checkpoint-every", "4", *common]
    t0 = time.time()

    def say(what: str) -> None:
        print(f"t={time.time() - t0:5.1f}s  {what}", flush=True)

    try:
        procs.start("agg", *agg)
        for i in range(4):
            procs.start(f"w{i}", "worker", "--data", str(shards / f"worker-{i}.npz"), "--worker-id", f"w{i}",
                        "--slowdown", "20", *common)
        wait_for(lambda: history_len(run) >= 3, 60, "3 versions")
        killed_at = final_version(run)
        say(f"version {killed_at}: SIGKILL the aggregator, start it with --resume")
        procs.kill("agg")
        procs.start("agg2", *agg, "--resume")
        wait_for(lambda: final_version(run) > killed_at, 60, "the resumed aggregator's next version")
        say(f"resumed: version {final_version(run)}")
        wait_for(lambda: history_len(run) >= 6, 60, "6 versions")
        say(f"version {final_version(run)}: stopping the broker")
        node.stop()
        say("broker stopped; starting it again")
        node.start()
        say("broker up")
        code = procs.wait("agg2", 180)
        codes = [procs.wait(f"w{i}", 60) for i in range(4)]
        say(f"aggregator exit {code}, worker exits {codes}")
        print("final:", json.dumps(read_history(run)["final"]))
        ledger = read_ledger(run)
        applied = Counter(e["task_id"] for e in ledger if e["fate"] == "applied")
        print(f"updates.jsonl: {len(ledger)} lines, fates {dict(Counter(e['fate'] for e in ledger))}, "
              f"most applications of one task id: {max(applied.values())}")
        confirmed = [c for i in range(4) for c in confirmed_updates(procs.log(f"w{i}"))]
        problems = ledger_problems(run, confirmed)
        if problems:
            print("ledger invariant broken: " + "; ".join(problems))
            return 1
        print(f"ledger invariant holds for {len(confirmed)} confirmed updates")
        return 0 if code == 0 and not any(codes) else 1
    finally:
        procs.close()
        node.remove()


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/fedmq-chaos")))
