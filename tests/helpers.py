"""Helpers for tests that run real fedmq processes against a real broker."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmq.runner import fedmq_argv  # noqa: E402,F401 (re-exported for the tests)

REPO = Path(__file__).resolve().parents[1]


class Procs:
    """Child processes of one test, each logging to its own file; all killed at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        f = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115
        full_env = {**os.environ, **(env or {})}
        proc = subprocess.Popen(fedmq_argv(*args), stdout=f, stderr=subprocess.STDOUT, env=full_env, cwd=REPO,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        f.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.procs[name].pid, sig)
        if sig == signal.SIGKILL:
            self.procs[name].wait(timeout=10)

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} did not exit within {timeout:.0f} s; its log:\n{self.log(name)[-4000:]}") from None

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def dump(self) -> str:
        return "\n".join(f"===== {n}\n{self.log(n)[-3000:]}" for n in self.procs)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Wait for ``predicate()`` to be truthy, failing with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)  # observing other processes' files: nothing to block on
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def read_ledger(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "updates.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_history(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "history.json").read_text())


def history_len(run_dir: Path) -> int:
    try:
        return len(read_history(run_dir)["history"])
    except (OSError, ValueError, KeyError):
        return 0


def confirmed_updates(log_text: str) -> list[dict[str, Any]]:
    """The updates a worker saw confirmed by the broker (from its JSON log)."""
    out = []
    for line in log_text.splitlines():
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict) and doc.get("event") == "update_confirmed":
                out.append(doc)
    return out


def assert_ledger_invariant(run_dir: Path, confirmed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every update the broker confirmed is in updates.jsonl with a fate; no task id applied twice.

    A message may appear more than once only as a redelivery whose first copy was already
    applied (e.g. after a broker restart voided the ack); such copies must be duplicates.
    """
    ledger = read_ledger(run_dir)
    assert all("fate" in e for e in ledger), "a ledger line without a fate"
    seen = Counter(e.get("message_id") for e in ledger)
    missing = [c for c in confirmed if seen[c["message_id"]] == 0]
    assert not missing, f"{len(missing)} confirmed update(s) missing from updates.jsonl: {missing[:3]}"
    applied = Counter(e["task_id"] for e in ledger if e["fate"] == "applied")
    twice = [t for t, n in applied.items() if n > 1]
    assert not twice, f"task ids applied twice: {twice}"
    for message_id, n in seen.items():
        if message_id is not None and n > 1:
            fates = [e["fate"] for e in ledger if e.get("message_id") == message_id]
            assert fates.count("applied") <= 1 and all(f in ("applied", "duplicate", "stale", "late") for f in fates), (
                f"message {message_id} recorded {n} times with fates {fates}"
            )
    return ledger


def split(out: Path, workers: int, *, partition: str = "dirichlet", seed: int = 0) -> Path:
    subprocess.run(fedmq_argv("data", "split", "--dataset", "digits", "--workers", str(workers),
                              "--partition", partition, "--alpha", "0.5", "--seed", str(seed), "--out", str(out)),
                   check=True, capture_output=True, )
    return out
