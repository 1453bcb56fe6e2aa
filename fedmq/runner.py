"""``fedmq run``: a whole federation on one machine, as real processes behind a real broker.

It splits the data, finds or starts a broker (see :mod:`fedmq.broker.provision`), starts the
aggregator and N workers as child processes, shows progress from the aggregator's JSON log,
and on the way out stops every child (and any broker it started), writes ``curves.png`` and
prints a summary. Ctrl-C or a failing child stops everything within seconds, with a non-zero
exit code and the reason on one line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import click

from fedmq.broker.admin import delete_namespace
from fedmq.broker.provision import provide_broker
from fedmq.broker.settings import mask_url
from fedmq.progress import Progress
from fedmq.shared.errors import FedmqError

log = logging.getLogger("fedmq.run")


def fedmq_argv(*args: str) -> list[str]:
    """The fedmq CLI run by this interpreter (children use the same environment as we do)."""
    return [sys.executable, "-m", "fedmq.cli", *args]


def aggregator_args(options: dict[str, Any]) -> list[str]:
    out: list[str] = []
    from fedmq.cli import AGGREGATOR_KEYS  # the options `aggregator` and `run` share

    for key in AGGREGATOR_KEYS:
        value = options.get(key)
        if value is None:
            continue
        if key == "hidden":
            value = ",".join(str(v) for v in value)
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


class Federation:
    """The child processes of one run and how to stop them."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self._files: list[IO[bytes]] = []

    def spawn(self, name: str, argv: list[str], *, capture_stderr: bool = False) -> subprocess.Popen[bytes]:
        logf = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (closed in close())
        self._files.append(logf)
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE if capture_stderr else logf,
            stderr=subprocess.PIPE if capture_stderr else logf, stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
        )
        self.children[name] = proc
        return proc

    def failed_worker(self) -> str | None:
        for name, proc in self.children.items():
            if name != "aggregator" and proc.poll() not in (None, 0):
                return f"{name} exited with code {proc.returncode} (see {self.logs / (name + '.log')})"
        return None

    def stop(self, grace_s: float = 10.0, sig: int = signal.SIGTERM) -> None:
        """Signal every live child, wait up to ``grace_s``, then kill what is left."""
        for proc in self.children.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace_s
        for proc in self.children.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.children.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def wait_workers(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for name, proc in self.children.items():
            if name == "aggregator":
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        for f in self._files:
            with contextlib.suppress(Exception):
                f.close()


def _split(options: dict[str, Any], shards: Path) -> dict[str, Any]:
    from fedmq.shared.data import load_dataset
    from fedmq.shared.split import split_dataset

    dataset = options.get("dataset")
    data_file = options.get("data_file")
    if dataset and data_file:
        raise click.UsageError("give only one of --dataset and --data")
    ds = load_dataset(None if data_file else (dataset or "digits"), data_file, seed=options["seed"])
    return split_dataset(ds, str(shards), num_workers=options["num_workers"], method=options["partition"],
                         alpha=options["alpha"], shards_per_worker=options["shards_per_worker"], seed=options["seed"])


def run_federation(options: dict[str, Any], *, namespace_given: bool) -> int:
    from fedmq.shared.logs import setup_logging

    setup_logging(options["log_level"], options["log_format"])
    out = Path(options["out"])
    out.mkdir(parents=True, exist_ok=True)
    n = options["num_workers"]
    if options["mode"] == "sync":
        options.setdefault("workers_per_round", None)
        options["workers_per_round"] = options["workers_per_round"] or n
        options["min_workers"] = max(options["min_workers"], options["workers_per_round"])
    elif options["min_workers"] == 1:
        options["min_workers"] = n
    namespace = options["namespace"] if namespace_given else f"run-{time.strftime('%H%M%S')}-{secrets.token_hex(3)}"
    manifest = _split(options, out / "shards")
    stop_requested = threading.Event()
    reason: list[str] = []

    def on_signal(signum: int, _frame: Any) -> None:
        reason.append("interrupted by " + signal.Signals(signum).name)
        stop_requested.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    fed = Federation(out)
    code = 1
    try:
        with provide_broker(options["amqp_url"]) as broker:
            if broker.kind != "given":
                log.info("using a %s broker at %s", broker.kind, mask_url(broker.url))
            common = ["--amqp-url", broker.url, "--namespace", namespace]
            code = _drive(options, fed, common, manifest, stop_requested, reason, n)
            if not namespace_given:
                delete_namespace(broker.url, namespace)
    except FedmqError as exc:
        reason.append(str(exc))
        code = 1
    finally:
        fed.stop(grace_s=10.0)
        fed.close()
        for s, handler in old.items():
            signal.signal(s, handler)
    if code != 0:
        click.echo(f"fedmq run: stopped: {reason[0] if reason else 'a process failed'}", err=True)
    return code


def _drive(options: dict[str, Any], fed: Federation, common: list[str], manifest: dict[str, Any],
           stop_requested: threading.Event, reason: list[str], n: int) -> int:
    out = Path(options["out"])
    shards = out / "shards"
    agg = fed.spawn(
        "aggregator",
        fedmq_argv("aggregator", "--test-data", str(shards / "test.npz"), "--out", str(out), *aggregator_args(options),
               *common, "--log-format", "json", "--log-level", "info"),
        capture_stderr=True,
    )
    progress = Progress(options, total_workers=n, mode=options.get("display", "auto"))
    reader = threading.Thread(target=_follow, args=(agg.stderr, fed.logs / "aggregator.log", progress), daemon=True)
    reader.start()
    n_slow = round(n * options["slow_workers"])
    if options.get("in_process_workers"):
        argv = fedmq_argv("workers", "--shards", str(shards), "--slow", str(n_slow), "--slowdown", str(options["slowdown"]),
                      "--trainer", options["trainer"], *common)
        fed.spawn("workers", argv)
    else:
        for i in range(n):
            slow = ["--slowdown", str(options["slowdown"])] if i >= n - n_slow else []
            fed.spawn(f"worker-{i}", fedmq_argv("worker", "--data", str(shards / f"worker-{i}.npz"), "--worker-id", f"w{i}",
                                            "--trainer", options["trainer"], *slow, *common))
    progress.start()
    try:
        while agg.poll() is None:
            if stop_requested.wait(0.2):
                break
            failed = fed.failed_worker()
            if failed:
                reason.append(failed)
                break
    finally:
        progress.stop()
    if agg.poll() is None:  # interrupted or a worker failed: let the aggregator checkpoint
        fed.stop(grace_s=10.0)
        reader.join(timeout=2)
        return 1
    reader.join(timeout=5)
    final_line = agg.stdout.read().decode().strip().splitlines() if agg.stdout else []
    if agg.returncode != 0:
        reason.append(f"the aggregator exited with code {agg.returncode} (see {fed.logs / 'aggregator.log'})")
        return 1
    fed.wait_workers(timeout_s=15.0)
    _plot(out)
    progress.summary(json.loads(final_line[-1]) if final_line else {}, out)
    return 0


def _follow(stream: IO[bytes] | None, log_path: Path, progress: Progress) -> None:
    """Copy the aggregator's JSON log to its file and feed evaluated versions to the display."""
    if stream is None:
        return
    with open(log_path, "ab") as f:
        for raw in stream:
            f.write(raw)
            f.flush()
            try:
                doc = json.loads(raw)
            except ValueError:
                continue
            progress.event(doc)


def _plot(out: Path) -> None:
    try:
        from fedmq.plot import plot_runs

        plot_runs([str(out)], str(out / "curves.png"))
    except Exception as exc:  # noqa: BLE001 (a plot never fails a run)
        log.warning("could not draw curves.png: %s", exc)

