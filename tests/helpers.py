"""Helpers for tests that run real fedmq processes against a real broker.

What a process did is read from its events (``--log-format json``, :mod:`fedmq.shared.events`)
with :func:`events_in` / :func:`confirmed_updates`, or from the run directory; never from the
human log messages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmq.rundir import (
    confirmed_updates,
    events_in,
    history_len,
    ledger_problems,
    read_history,
    read_ledger,
)
from fedmq.runner import fedmq_argv

__all__ = [  # what the tests import from here, some of it from fedmq.runner and fedmq.rundir
    "REPO", "Procs", "assert_ledger_invariant", "confirmed_updates", "digits_csv", "events_in", "fedmq_argv",
    "history_len", "read_history", "read_ledger", "readme_config", "require_torch", "split", "wait_for",
]

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

    def events(self, name: str, event: str | None = None) -> list[dict[str, Any]]:
        """The events (of kind ``event``, if given) in ``name``'s log (a ``--log-format json`` process)."""
        return events_in(self.log(name), event)

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


def fedmq_run_ok(amqp_url: str, namespace: str, out: Path, *args: str, timeout: float = 300) -> str:
    """``fedmq run ARGS`` on ``namespace`` into ``out`` (one BLAS thread); its output, asserting exit 0."""
    env = {**os.environ, "FEDMQ_AMQP_URL": amqp_url, "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run(fedmq_argv("run", *args, "--namespace", namespace, "--out", str(out)),
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Wait for ``predicate()`` to be truthy, failing with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)  # observing other processes' files: nothing to block on
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def assert_ledger_invariant(run_dir: Path, confirmed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every update the broker confirmed is in updates.jsonl with a fate; no task id applied twice.

    See :func:`fedmq.rundir.ledger_problems`; returns the ledger.
    """
    problems = ledger_problems(run_dir, confirmed)
    assert not problems, "; ".join(problems)
    return read_ledger(run_dir)


def split(out: Path, workers: int, *, partition: str = "dirichlet", seed: int = 0) -> Path:
    subprocess.run(fedmq_argv("data", "split", "--dataset", "digits", "--workers", str(workers),
                              "--partition", partition, "--alpha", "0.5", "--seed", str(seed), "--out", str(out)),
                   check=True, capture_output=True)
    return out


def digits_csv(path: Path, label: str = "digit") -> Path:
    """scikit-learn's digits as a CSV whose first column is the label (named ``label``)."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    lines = [",".join([label] + [f"p{i}" for i in range(X.shape[1])])]
    lines += [",".join([str(int(t))] + [str(int(v)) for v in row]) for row, t in zip(X, y, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def readme_config() -> str:
    """The TOML example of the README's Configuration section."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Configuration"):]
    return section[section.index("```toml") + len("```toml"):].split("```", 1)[0]


class CapturedLogs(logging.Handler):
    """Records an in-process logger emits during a test: its events and its messages."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [dict(r.__dict__) for r in list(self.records) if getattr(r, "event", None) == name]

    def saying(self, words: str) -> list[str]:
        return [text for r in list(self.records) if words in (text := r.getMessage())]



def require_torch() -> Any:
    """``torch``: skips the test where PyTorch is not installed, but fails it in CI (``CI`` set),
    where ``make test`` installs it, so that the PyTorch tests cannot be skipped silently there."""
    import importlib

    import pytest

    if os.environ.get("CI"):
        return importlib.import_module("torch")
    return pytest.importorskip("torch")
