"""``fedmq run``: a whole federation on one machine, as real processes behind a real broker.

``fedmq run`` is ``fedmq aggregator`` plus workers: every aggregator option (``--resume``
included) reaches its aggregator, and its ``--config`` file is read the same way. It splits
the data, finds or starts a broker (see :mod:`fedmq.broker.provision`), starts the
aggregator, waits for it to be up (its first event, see :mod:`fedmq.shared.events`), then
starts N workers as child processes, shows progress from the aggregator's events, and on the
way out stops every child (and any broker it started), writes ``curves.png`` and prints a
summary. The aggregator's settings are validated before anything starts.

A broker is started only when nothing answers at ``--amqp-url``: one that refuses the login
is an error (one line, exit 1), never a reason to start another broker.

Ctrl-C (SIGINT) or SIGTERM stops the aggregator first, with SIGTERM, so that it checkpoints
(the run can be continued with ``--resume``); then the workers; then ``curves.png`` and the
summary are written as for a finished run, and the exit code is 128 + the signal (130 for
Ctrl-C). A second Ctrl-C stops everything at once. A failing child stops everything within
seconds with exit code 1 and the reason on one line (for a failed aggregator, its own last
error line).
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
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import click

from fedmq.broker.admin import delete_namespace
from fedmq.broker.client import open_connection
from fedmq.broker.provision import ProvidedBroker, provide_broker
from fedmq.broker.settings import BrokerSettings, mask_url
from fedmq.options import (
    aggregator_argv,
    aggregator_config,
    csv_header,
    mask_secrets,
    parse_label_column,
)
from fedmq.progress import Progress
from fedmq.shared import events
from fedmq.shared.errors import AccessRefused, BrokerError, ConfigError, FedmqError

log = logging.getLogger("fedmq.run")


def fedmq_argv(*args: str) -> list[str]:
    """The fedmq CLI run by this interpreter (children use the same environment as we do)."""
    return [sys.executable, "-m", "fedmq.cli", *args]


#: how long workers wait for the aggregator's first event before they are started anyway
AGGREGATOR_UP_TIMEOUT_S = 30.0
#: how long the aggregator may take to checkpoint and leave after SIGTERM (beyond its drain)
AGGREGATOR_STOP_GRACE_S = 20.0
#: how long to ask the broker at --amqp-url whether it answers
PROBE_TIMEOUT_S = 3.0


def last_line(path: Path, limit: int = 64 * 1024) -> str | None:
    """The last non-empty line of a log file (read from its last ``limit`` bytes), or None."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
            lines = [x for x in f.read().decode(errors="replace").splitlines() if x.strip()]
    except OSError:
        return None
    return lines[-1].strip() if lines else None


class Federation:
    """The child processes of one run and how to stop them."""

    def __init__(self, out: Path, env: dict[str, str] | None = None) -> None:
        self.out = out
        self.env = env
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self._files: list[IO[bytes]] = []

    def spawn(self, name: str, argv: list[str], *, capture_stderr: bool = False) -> subprocess.Popen[bytes]:
        logf = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (closed in close())
        self._files.append(logf)
        proc = subprocess.Popen(
            argv, env=self.env, stdout=subprocess.PIPE if capture_stderr else logf,
            stderr=subprocess.PIPE if capture_stderr else logf, stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
        )
        self.children[name] = proc
        return proc

    def failed_worker(self) -> str | None:
        """Why a worker process failed (its exit code and last log line), or None."""
        for name, proc in self.children.items():
            if name != "aggregator" and proc.poll() not in (None, 0):
                path = self.logs / f"{name}.log"
                said = last_line(path)
                return (f"{name} exited with code {proc.returncode}" + (f": {mask_secrets(said)}" if said else "")
                        + f" (log: {path})")
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

    def stop_one(self, name: str, grace_s: float, sig: int = signal.SIGTERM) -> None:
        """Signal one child, wait up to ``grace_s`` for it to leave, then kill it."""
        proc = self.children[name]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s of %s; killing it", name, grace_s, signal.Signals(sig).name)
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
    """Split the data into ``shards`` (on --resume, keep the shards the run already has)."""
    from fedmq.shared.data import load_dataset
    from fedmq.shared.split import split_dataset

    manifest_path = shards / "manifest.json"
    if options.get("resume") and manifest_path.exists():
        with contextlib.suppress(OSError, ValueError):
            manifest = json.loads(manifest_path.read_text())
            if len(manifest.get("workers", [])) == options["num_workers"] and (shards / "test.npz").exists():
                log.info("--resume: using the shards in %s", shards)
                return dict(manifest)
    dataset = options.get("dataset")
    data_file = options.get("data_file")
    if dataset and data_file:
        raise click.UsageError("give only one of --dataset and --data")
    column = parse_label_column(options.get("label_column"), data_file)
    ds = load_dataset(None if data_file else (dataset or "digits"), data_file, seed=options["seed"],
                      label_column=column, image=bool(options.get("image")))
    if data_file and data_file.lower().endswith(".csv"):
        header = csv_header(data_file)
        name = header[column] if isinstance(column, int) and -len(header) <= column < len(header) else column
        how = "" if options.get("label_column") is not None else " (the last column; --label-column to choose another)"
        click.echo(f"fedmq run: {data_file}: label column {name!r}{how}: {ds.num_classes} classes, "
                   f"{ds.num_features} features")
        if ds.num_classes > max(50, len(ds.y_train) // 10):
            log.warning("the label column %r has %d distinct values: is it really the label? "
                        "(--label-column NAME|INDEX chooses it)", name, ds.num_classes)
    return split_dataset(ds, str(shards), num_workers=options["num_workers"], method=options["partition"],
                         alpha=options["alpha"], shards_per_worker=options["shards_per_worker"], seed=options["seed"])


def probe_broker(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True if a RabbitMQ at ``url`` accepts our login, False if nothing answers there.

    Raises :class:`AccessRefused` (one line, the URL masked) if one answers but refuses the
    credentials or the vhost: starting a private broker then would hide the mistake.
    """
    settings = BrokerSettings.from_url(url, connect_timeout_s=timeout_s)
    try:
        conn = open_connection(settings, "fedmq-run-probe")
    except AccessRefused:
        raise
    except BrokerError:
        return False
    with contextlib.suppress(Exception):
        conn.close()
    return True


@contextlib.contextmanager
def run_broker(url: str, answers: bool) -> Iterator[ProvidedBroker]:
    """The broker at ``url`` when it answers (``answers``, from :func:`probe_broker`); a
    container or private node only when nothing answers there (see
    :mod:`fedmq.broker.provision`)."""
    if answers:
        yield ProvidedBroker(url, "given")
        return
    with provide_broker(url, try_given_first=False) as provided:
        yield provided


def child_env(amqp_url: str) -> dict[str, str]:
    """The environment of the processes `run` starts: ours, with the broker URL, and without
    ``FEDMQ_AGGREGATOR_*`` (the aggregator gets every option from `run`, which validated them;
    a variable meant for `fedmq aggregator` must not change it behind `run`'s back)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_AGGREGATOR_")}
    env["FEDMQ_AMQP_URL"] = amqp_url
    return env


def _check_resume(options: dict[str, Any], out: Path) -> None:
    if options.get("resume") and not (out / "checkpoint").is_dir():
        raise ConfigError(f"--resume: {out} has no checkpoint/ to continue from "
                          "(--out must name the previous run's directory)")


def run_federation(options: dict[str, Any], *, namespace_given: bool) -> int:
    """Run one federation from ``fedmq run``'s options; the exit code.

    ``namespace_given``: the user chose the namespace (it is used and kept); otherwise a fresh
    one is made up and deleted afterwards. Raises ConfigError before starting anything when
    the aggregator's settings do not validate.
    """
    from fedmq.shared.logs import setup_logging

    setup_logging(options["log_level"], options["log_format"])
    out = Path(options["out"])
    n = options["num_workers"]
    if options["mode"] == "sync":
        options["workers_per_round"] = options.get("workers_per_round") or n
        options["min_workers"] = max(options["min_workers"], options["workers_per_round"])
    elif options["min_workers"] == 1:
        options["min_workers"] = n
    attackers(options, n)  # --attackers without --attack (or the other way): said before anything starts
    # the aggregator would refuse these settings: say so before splitting or starting anything
    aggregator_config(options, test_data=str(out / "shards" / "test.npz"), out=str(out))
    _check_resume(options, out)
    answers = probe_broker(options["amqp_url"])  # refused credentials: an error, before anything starts
    out.mkdir(parents=True, exist_ok=True)
    namespace = options["namespace"] if namespace_given else f"run-{time.strftime('%H%M%S')}-{secrets.token_hex(3)}"
    manifest = _split(options, out / "shards")
    stop = Stop()
    old = {s: signal.signal(s, stop.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    fed = Federation(out)
    code = 1
    try:
        with run_broker(options["amqp_url"], answers) as broker:
            if broker.kind != "given":
                log.info("nothing answers at %s: using a %s broker at %s", mask_url(options["amqp_url"]),
                         broker.kind, mask_url(broker.url))
            # the URL (and its password) travels in the environment, not on command lines
            fed.env = child_env(broker.url)
            common = ["--namespace", namespace]
            code = _drive(options, fed, common, manifest, stop, n)
            if not namespace_given:
                delete_namespace(broker.url, namespace)
    except FedmqError as exc:
        stop.reasons.append(mask_secrets(str(exc)))
        code = 1
    except KeyboardInterrupt:  # the second Ctrl-C
        stop.reasons.append("interrupted twice: stopped at once")
        code = 130
    finally:
        fed.stop(grace_s=10.0)
        fed.close()
        for s, handler in old.items():
            signal.signal(s, handler)
    if code != 0:
        click.echo(f"fedmq run: stopped: {stop.reasons[0] if stop.reasons else 'a process failed'}", err=True)
    return code


class Stop:
    """The first SIGINT or SIGTERM asks for an orderly stop; a second SIGINT interrupts."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.signum: int | None = None
        self.reasons: list[str] = []

    def on_signal(self, signum: int, _frame: Any) -> None:
        if self.requested.is_set():
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        self.reasons.append("interrupted by " + signal.Signals(signum).name)
        self.requested.set()

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)


def run_keys(out: Path, n: int) -> Path:
    """``run --sign``: the run's key pairs, made where missing (kept for ``--resume``).

    ``RUN_DIR/keys/aggregator.{key,pub}``, and ``RUN_DIR/keys/workers/w<i>.{key,pub}``, the
    directory the aggregator reads as ``--worker-keys``.
    """
    from fedmq.shared.signing import AGGREGATOR_ID, PRIVATE_SUFFIX, PUBLIC_SUFFIX, write_key_pair

    keys = out / "keys"
    for directory, key_id in [(keys, AGGREGATOR_ID), *((keys / "workers", f"w{i}") for i in range(n))]:
        if not ((directory / f"{key_id}{PRIVATE_SUFFIX}").exists() and (directory / f"{key_id}{PUBLIC_SUFFIX}").exists()):
            for suffix in (PRIVATE_SUFFIX, PUBLIC_SUFFIX):
                (directory / f"{key_id}{suffix}").unlink(missing_ok=True)  # half a pair: make a new one
            write_key_pair(directory, key_id)
    return keys


def _aggregator_key_argv(options: dict[str, Any]) -> list[str]:
    if not options.get("sign"):
        return []
    keys = Path(options["out"]) / "keys"
    return ["--signing-key", str(keys / "aggregator.key"), "--worker-keys", str(keys / "workers")]


def _drive(options: dict[str, Any], fed: Federation, common: list[str], manifest: dict[str, Any],
           stop: Stop, n: int) -> int:
    out = Path(options["out"])
    shards = out / "shards"
    if options.get("sign"):
        run_keys(out, n)
    agg = fed.spawn(
        "aggregator",
        fedmq_argv("aggregator", "--test-data", str(shards / "test.npz"), "--out", str(out), *aggregator_argv(options),
                   *_aggregator_key_argv(options), *common, "--log-format", "json", "--log-level", "info"),
        capture_stderr=True,
    )
    progress = Progress(options, total_workers=n, mode=options.get("display", "auto"))
    agg_log = AggregatorLog(agg.stderr, fed.logs / "aggregator.log", progress)
    agg_log.start()
    progress.start()
    worker_failed: str | None = None
    try:
        # workers start once the aggregator is up, so that one that cannot start starts nothing
        deadline = time.monotonic() + AGGREGATOR_UP_TIMEOUT_S
        while not agg_log.up.wait(0.1):
            if agg.poll() is not None or stop.requested.is_set():
                break
            if time.monotonic() > deadline:
                log.warning("the aggregator has not reported for %.0f s; starting the workers anyway",
                            AGGREGATOR_UP_TIMEOUT_S)
                break
        if agg.poll() is None and not stop.requested.is_set():
            _spawn_workers(options, fed, common, n)
        while agg.poll() is None:
            if stop.requested.wait(0.2):
                break
            worker_failed = fed.failed_worker()
            if worker_failed:
                stop.reasons.append(worker_failed)
                break
        if agg.poll() is None:
            # interrupted, or a worker failed: the aggregator checkpoints and leaves first
            fed.stop_one("aggregator", grace_s=float(options.get("drain_timeout") or 0) + AGGREGATOR_STOP_GRACE_S)
    finally:
        progress.stop()
    agg_log.join(timeout=5)
    final_lines = agg.stdout.read().decode(errors="replace").strip().splitlines() if agg.stdout else []
    final = _final_of(final_lines)
    interrupted = stop.requested.is_set()
    record_attack(options, out, n)
    if interrupted or worker_failed:
        fed.stop(grace_s=10.0)  # the workers
        if final is not None or (out / "history.json").exists():
            _plot(out)
            progress.summary(final or {}, out)
        return stop.exit_code if interrupted else 1
    if agg.returncode != 0:
        said = agg_log.last_error()
        stop.reasons.append(f"the aggregator exited with code {agg.returncode}"
                            + (f": {mask_secrets(said)}" if said else "") + f" (log: {fed.logs / 'aggregator.log'})")
        return 1
    fed.wait_workers(timeout_s=15.0)
    _plot(out)
    progress.summary(final or {}, out)
    return 0


def attackers(options: dict[str, Any], n: int) -> list[int]:
    """The workers (by index) that attack: the first round(--attackers x n); UsageError when
    --attackers and --attack do not come together."""
    fraction, kind = float(options.get("attackers") or 0.0), options.get("attack")
    if fraction > 0 and kind is None:
        raise click.UsageError("--attackers needs --attack KIND")
    if kind is not None and fraction == 0:
        raise click.UsageError("--attack needs --attackers FRACTION (of the workers)")
    return list(range(round(fraction * n))) if kind is not None else []


def record_attack(options: dict[str, Any], out: Path, n: int) -> None:
    """Write who attacked, and how, into history.json's ``config`` (the aggregator never knew)."""
    hostile = attackers(options, n)
    path = out / "history.json"
    if not hostile or not path.exists():
        return
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("could not record the attack in %s: %s", path, exc)
        return
    doc.setdefault("config", {})["attack"] = {
        "kind": options["attack"], "scale": options["attack_scale"], "fraction": options["attackers"],
        "workers": [f"w{i}" for i in hostile],
    }
    from fedmq.aggregator.durable import atomic_write_json

    atomic_write_json(path, doc)


def _final_of(lines: list[str]) -> dict[str, Any] | None:
    """The aggregator's result document: the last line of its stdout, if it is one."""
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict):
                return doc
    return None


def _spawn_workers(options: dict[str, Any], fed: Federation, common: list[str], n: int) -> None:
    shards = Path(options["out"]) / "shards"
    keys = Path(options["out"]) / "keys"
    n_slow = round(n * options["slow_workers"])
    signed = ["--aggregator-key", str(keys / "aggregator.pub")] if options.get("sign") else []
    hostile = attackers(options, n)
    attack = ["--attack", str(options.get("attack")), "--attack-scale", str(options.get("attack_scale"))]
    if options.get("chunk_bytes"):  # workers chunk their updates as the aggregator chunks its models
        common = ["--chunk-bytes", str(options["chunk_bytes"]), *common]
    if options.get("in_process_workers"):
        if signed:
            signed += ["--signing-keys", str(keys / "workers")]
        argv = fedmq_argv("workers", "--shards", str(shards), "--slow", str(n_slow), "--slowdown", str(options["slowdown"]),
                          "--trainer", options["trainer"], *signed, *common)
        if hostile:
            argv += ["--attackers", str(len(hostile)), *attack]
        fed.spawn("workers", argv)
        return
    for i in range(n):
        slow = ["--slowdown", str(options["slowdown"])] if i >= n - n_slow else []
        key = ["--signing-key", str(keys / "workers" / f"w{i}.key")] if signed else []
        fed.spawn(f"worker-{i}", fedmq_argv("worker", "--data", str(shards / f"worker-{i}.npz"), "--worker-id", f"w{i}",
                                            "--trainer", options["trainer"], *slow, *signed, *key,
                                            *(attack if i in hostile else []), *common))


class AggregatorLog:
    """Follows the aggregator's stderr on a thread: copies it to its log file, feeds its events
    (:func:`fedmq.shared.events.parse`) to the display, and keeps its last error lines.

    ``up`` is set at the aggregator's first event: it has loaded its data and holds the
    namespace. An error line is any line that is not JSON (a command-line error, a
    traceback) or a JSON record at level error; the text is shown, never interpreted.
    """

    def __init__(self, stream: IO[bytes] | None, log_path: Path, progress: Progress) -> None:
        self.stream = stream
        self.log_path = log_path
        self.progress = progress
        self.up = threading.Event()
        self.errors: deque[str] = deque(maxlen=20)
        self._thread = threading.Thread(target=self._run, name="aggregator-log", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout=timeout)

    def last_error(self) -> str | None:
        return self.errors[-1] if self.errors else None

    def _run(self) -> None:
        if self.stream is None:
            return
        with open(self.log_path, "ab") as f:
            for raw in self.stream:
                f.write(raw)
                f.flush()
                self.line(raw.decode(errors="replace"))

    def line(self, text: str) -> None:
        """Handle one line of the aggregator's stderr."""
        text = text.strip()
        if not text:
            return
        event = events.parse(text)
        if event is not None:
            self.up.set()
            self.progress.event(event)
            record: Any = event
        else:
            try:
                record = json.loads(text)
            except ValueError:
                self.errors.append(text)
                return
            if not isinstance(record, dict):
                self.errors.append(text)
                return
        level = str(record.get("level", ""))
        if level in ("warning", "error", "critical"):
            self.progress.notice(level, mask_secrets(str(record.get("msg", ""))))
            if level != "warning":
                self.errors.append(str(record.get("msg", "")))


def _plot(out: Path) -> None:
    try:
        from fedmq.plot import plot_runs

        plot_runs([str(out)], str(out / "curves.png"))
    except Exception as exc:  # noqa: BLE001 (a plot never fails a run)
        log.warning("could not draw curves.png: %s", exc)
