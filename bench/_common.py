"""Helpers shared by the bench/ scripts (not a benchmark itself).

Child processes, namespaces on the shared broker, synthetic 784-feature data, machine facts,
JSON results and a reader for the aggregator's events (its JSON log). Every script in bench/ adds the
repository root to ``sys.path`` itself before importing this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

AMQP_URL = os.environ.get("FEDMQ_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
RESULTS = ROOT / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: one BLAS thread per process: many worker processes share 2 cores
SINGLE_THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ------------------------------------------------------------------ models
def mlp_param_count(hidden: int, inputs: int = 784, classes: int = 10) -> int:
    """Parameters of the MLP inputs -> hidden -> classes (weights and biases)."""
    return inputs * hidden + hidden + hidden * classes + classes


def mlp_shapes(hidden: int, inputs: int = 784, classes: int = 10) -> dict[str, tuple[int, ...]]:
    from fedmq.shared.nn import mlp_param_shapes

    return dict(mlp_param_shapes((inputs, hidden, classes)))


#: label -> hidden width of a 784-h-10 MLP (100k, 1M and 10M float32 parameters)
MODEL_SIZES: dict[str, int] = {"100k": 126, "1M": 1258, "10M": 12579}


# ------------------------------------------------------------------ namespaces
def new_namespace(name: str) -> str:
    return f"bench-{name}-{secrets.token_hex(3)}"


def broker_settings(namespace: str, url: str = AMQP_URL) -> tuple[Any, Any]:
    from fedmq.broker.settings import BrokerSettings
    from fedmq.broker.topology import Topology

    return BrokerSettings.from_url(url), Topology(namespace)


def delete_namespace(namespace: str, extra_queues: Sequence[str] = (), url: str = AMQP_URL) -> None:
    """Delete every queue and exchange of ``namespace`` (plus ``extra_queues``) on the broker at ``url``; best effort."""
    from fedmq.broker.admin import Admin

    settings, topology = broker_settings(namespace, url)
    try:
        with Admin(settings, topology) as admin:
            admin.delete()
            for name in extra_queues:
                chan = admin._channel()
                with contextlib.suppress(Exception):
                    chan.queue_delete(name)
                with contextlib.suppress(Exception):
                    chan.close()
    except Exception as exc:  # noqa: BLE001 (clean-up must not hide the result)
        print(f"warning: could not delete namespace {namespace}: {exc}", file=sys.stderr)


# ------------------------------------------------------------------ child processes
from fedmq.runner import fedmq_argv  # noqa: E402,F401 (the same CLI invocation fedmq run uses)


def pyspy_argv(argv: Sequence[str], output: Path, rate: int = 200) -> list[str]:
    """Wrap ``argv`` in ``py-spy record`` (raw collapsed stacks per thread; $FEDMQ_BENCH_PYSPY_ARGS adds options)."""
    import shutil

    output.parent.mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy") or "py-spy"
    extra = os.environ.get("FEDMQ_BENCH_PYSPY_ARGS", "").split()  # e.g. "--gil" or "--native"
    return [spy, "record", "--rate", str(rate), "--format", "raw", "--threads", *extra, "--output", str(output),
            "--", *argv]


def loadavg() -> float:
    """The 1-minute load average (other users of the machine add noise to timings)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


class Children:
    """Start child processes and make sure every one of them is gone at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self._files: list[Any] = []

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        pipe_stderr: bool = False,
        pipe_stdout: bool = False,
    ) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (closed in stop_all)
        self._files.append(logf)
        proc = subprocess.Popen(
            list(argv),
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe_stdout else logf,
            stderr=subprocess.PIPE if pipe_stderr else logf,
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        """SIGTERM, wait, then SIGKILL (this one process, by its pid)."""
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)

    def stop_all(self, timeout: float = 10.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        self.procs = []
        for f in self._files:
            with contextlib.suppress(Exception):
                f.close()
        self._files = []


@contextlib.contextmanager
def torn_down(children: Children, namespace: str, *, say_logs: bool = True, url: str = AMQP_URL) -> Iterator[None]:
    """Stop every child and delete ``namespace`` (on the broker at ``url``) when the block ends, however it ends.

    The one teardown of the bench run loops: around a whole sweep (``say_logs``: on an error or
    Ctrl-C, say where the children's logs were kept, then re-raise) and around each point on its
    own namespace (``say_logs=False``: the sweep around it says it once).
    """
    try:
        yield
    except BaseException:
        if say_logs:
            print(f"logs kept in {children.log_dir}", file=sys.stderr)
        raise
    finally:
        children.stop_all()
        delete_namespace(namespace, url=url)


class EventReader:
    """Read a child's JSON log from a pipe in a thread, copy it to a file, and hand on its events.

    Only events (:func:`fedmq.shared.events.parse`: the documented schema) reach ``on_event``
    and :meth:`wait_for`; other lines are copied and otherwise ignored. ``on_event(event,
    wall_time)`` runs on the reader thread.
    """

    def __init__(self, stream: Any, copy_to: Path, on_event: Callable[[dict[str, Any], float], None] | None = None) -> None:
        self.stream = stream
        self.copy_to = copy_to
        self.on_event = on_event
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from fedmq.shared import events

        with open(self.copy_to, "ab") as out:
            for raw in iter(self.stream.readline, b""):
                now = time.time()
                out.write(raw)
                event = events.parse(raw.decode(errors="replace"))
                if event is None:
                    continue
                self.seen.append(event)
                if self.on_event is not None:
                    self.on_event(event, now)
                self.events.put(event)

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the expected event did not come in time")
            try:
                doc = self.events.get(timeout=min(left, 0.5))
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the child's log ended before the expected event") from None
                continue
            if predicate(doc):
                return doc

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)


# ------------------------------------------------------------------ /proc
def cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` in seconds (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kb(pid: int, key: str) -> int | None:
    """A kB value from /proc/<pid>/status, e.g. VmHWM or VmRSS."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def system_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(values[:8])  # guest time is already in user
    idle = values[3] + values[4]
    return (total - idle) / CLK_TCK, total / CLK_TCK


def broker_pid() -> int | None:
    """The pid of the shared RabbitMQ node, to read its CPU time: the oldest beam.smp (started with
    the machine), not a private node that a test or another bench started since."""
    found: list[tuple[int, int]] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if (entry / "comm").read_text().strip() == "beam.smp":
                    stat = (entry / "stat").read_text()
                    found.append((int(stat.rsplit(")", 1)[1].split()[19]), int(entry.name)))
    return min(found)[1] if found else None


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants now (/proc/PID/task/TID/children), parents first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in (task / "children").read_text().split()]
    return out


class CpuSnapshots:
    """CPU seconds of groups of processes (and of the machine), taken at chosen moments."""

    def __init__(self) -> None:
        self.groups: dict[str, list[int]] = {}
        self.trees: set[int] = set()  # pids whose descendants count with them
        pid = broker_pid()
        if pid is not None:
            self.groups["rabbitmq"] = [pid]

    def watch(self, group: str, pid: int, *, tree: bool = False) -> None:
        """Count ``pid`` in ``group`` (with ``tree``, and the descendants it has at each snapshot)."""
        self.groups.setdefault(group, []).append(pid)
        if tree:
            self.trees.add(pid)

    def _pids(self, pids: list[int]) -> list[int]:
        return [q for p in pids for q in (process_tree(p) if p in self.trees else [p])]

    def snapshot(self) -> dict[str, float]:
        snap = {g: sum(cpu_seconds(p) or 0.0 for p in self._pids(pids)) for g, pids in self.groups.items()}
        snap["machine_busy"], snap["machine_total"] = system_cpu()
        snap["wall"] = time.time()
        return snap

    @staticmethod
    def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        """CPU seconds per group between two snapshots; ``other`` = machine busy minus the groups."""
        d = {k: b[k] - a[k] for k in a if k in b}
        mine = sum(v for k, v in d.items() if k not in ("machine_busy", "machine_total", "wall"))
        d["other"] = d["machine_busy"] - mine
        d["cores"] = d["machine_total"] / d["wall"] if d["wall"] > 0 else float("nan")
        return d


# ------------------------------------------------------------------ data
def write_synthetic(out: Path, *, shards: int, per_shard: int = 32, test: int = 64, features: int = 784,
                    classes: int = 10, seed: int = 0) -> Path:
    """test.npz (X float32 (test, features), y int64, num_classes) and worker-<i>.npz shards."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def save(path: Path, n: int) -> None:
        X = rng.standard_normal((n, features), dtype=np.float32)
        y = rng.integers(0, classes, n, dtype=np.int64)
        np.savez(path, X=X, y=y, num_classes=np.int64(classes))

    save(out / "test.npz", test)
    for i in range(shards):
        save(out / f"worker-{i}.npz", per_shard)
    return out / "test.npz"


# ------------------------------------------------------------------ facts and results
def machine() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = status_kb_meminfo("MemTotal")
    import pika

    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(mem_kb / 1024**2, 1) if mem_kb else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pika": pika.__version__,
        "kernel": platform.release(),
    }


def status_kb_meminfo(key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def write_result(name: str, doc: dict[str, Any], path: Path | None = None) -> Path:
    path = path or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "machine": machine(), "argv": sys.argv[1:], **doc}
    path.write_text(json.dumps(doc, indent=2, default=_default) + "\n")
    return path


def _default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64))) if values else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table (also valid as the body of a Markdown table when ``md``)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
