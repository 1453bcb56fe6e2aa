"""Flower, run on fedmq's round-time workload in the same run: the peer in ``round_time.py --peers flower``.

Not run by CI. ``python bench/peers/flower.py --setup`` creates ``bench/peers/.venv-flower``
(git-ignored) with the pinned :data:`REQUIREMENTS`; nothing of Flower is installed into
fedmq's own environment and this module never imports ``flwr``: it starts Flower's programs
from that environment as child processes, each in its own process group, and kills every
group at the end (also on failure or timeout). Every wait is bounded.

The workload is ``bench/round_time.py``'s: the parameters of an MLP 784 -> h -> 10 (h from
``bench._common.MODEL_SIZES``: ~100k / 1M / 10M float32 parameters), "training" = the weights
plus a slice of one pre-drawn N(0, 1e-3^2) vector and 32 examples (``bench.standin.NoiseTrainer``),
FedAvg over all N clients every round, no federated evaluation. The app is
``bench/peers/flower_app/`` (``fedmq_flower_bench/task.py`` says what each part does).

Two engines:

* ``simulation``: Flower's Simulation Engine in one process (``flwr.simulation.run_simulation``,
  Ray backend; ``flower_app/simulate.py``): the ServerApp in the driver, the ClientApps in Ray
  actors with 1 CPU each (so 2 run at a time on 2 cores). Models move through Ray's object store.
* ``deployment``: Flower's Deployment Engine on localhost, insecure: one ``flower-superlink``
  (subprocess isolation: it starts the ServerApp), N ``flower-supernode`` processes (each starts
  a ``flwr-clientapp`` process per message, Flower's default isolation), and ``flwr run
  flower_app bench --stream`` to submit the run. In flwr 1.42 the Fleet, Control and
  Runtime APIs are protobuf over HTTP (FastAPI/uvicorn), no longer gRPC.

Per-round seconds are the deltas of the ServerApp's round-end stamps (Flower calls the
strategy's ``evaluate_fn`` before round 1 and after every round; ours only records the time),
median over rounds 2..R: round 1 includes Ray's start or the nodes connecting.

Run alone: ``python bench/peers/flower.py [--setup] [--engines simulation,deployment]
[--workers 4] [--sizes 100k,1M] [--rounds 8] [--deployment-rounds 4]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import MODEL_SIZES, loadavg, median, mlp_param_count, table, write_result  # noqa: E402

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-flower"
APP = HERE / "flower_app"
FLWR_VERSION = "1.42.0"
#: what pip resolves for flwr[simulation]==1.42.0 on Python 3.11, pinned so reruns get the same Ray
RAY_VERSION = "2.55.1"
REQUIREMENTS = (f"flwr[simulation]=={FLWR_VERSION}", f"ray=={RAY_VERSION}")
ENGINES = ("simulation", "deployment")
SETUP_TIMEOUT_S = 900.0
READY_TIMEOUT_S = 120.0
#: no usage telemetry, no update check: the run must not reach outside the machine
QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
             "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ------------------------------------------------------------------ environment
def venv_bin(name: str) -> Path:
    return VENV / "bin" / name


def installed_versions() -> dict[str, str] | None:
    """flwr, ray, numpy and Python versions in the peer environment (None if it is missing or broken)."""
    python = venv_bin("python")
    if not python.exists():
        return None
    code = ("import json, platform, flwr, ray, numpy; print(json.dumps({'flwr': flwr.__version__, "
            "'ray': ray.__version__, 'numpy': numpy.__version__, 'python': platform.python_version()}))")
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120,
                             env={**os.environ, **QUIET_ENV})
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        return None
    doc: dict[str, str] = json.loads(out.stdout.strip().splitlines()[-1])
    return doc


def ensure_venv(create: bool) -> dict[str, str]:
    """The peer environment's versions; creates it (pip, pinned) when missing or off-pin and ``create``."""
    found = installed_versions()
    if found and found["flwr"] == FLWR_VERSION and found["ray"] == RAY_VERSION:
        return found
    if not create:
        raise RuntimeError(f"no Flower {FLWR_VERSION} environment in {VENV} (found {found}); "
                           "create it with: python bench/peers/flower.py --setup")
    print(f"creating {VENV} with {' '.join(REQUIREMENTS)} (a few minutes)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True, timeout=120)
    subprocess.run([str(venv_bin("python")), "-m", "pip", "install", "-q", *REQUIREMENTS], check=True,
                   timeout=SETUP_TIMEOUT_S)
    found = installed_versions()
    if not found or found["flwr"] != FLWR_VERSION or found["ray"] != RAY_VERSION:
        raise RuntimeError(f"{VENV} does not import the pinned versions after pip install: {found}")
    return found


# ------------------------------------------------------------------ process groups
class Group:
    """Flower's programs, each started in a new session (its own process group) and killed as a group.

    Flower's processes start their own children (superexec, serverapp, clientapp processes,
    Ray's raylet and workers); killing the group of each process we started reaches them.
    """

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.procs: list[subprocess.Popen[bytes]] = []
        self._files: list[IO[bytes]] = []

    def spawn(self, name: str, argv: Sequence[str], *, cwd: Path, watch_for: bytes | None = None
              ) -> tuple[subprocess.Popen[bytes], threading.Event]:
        """Start ``argv``; its output goes to ``<log_dir>/<name>.log``. The event is set once a
        line containing ``watch_for`` is printed (or at once when there is nothing to watch for)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (closed in stop_all)
        self._files.append(log)
        seen = threading.Event()
        proc = subprocess.Popen(list(argv), cwd=cwd, env=self.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE if watch_for else log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        if watch_for is None:
            seen.set()
        else:
            threading.Thread(target=_copy_lines, args=(proc.stdout, log, watch_for, seen), daemon=True).start()
        return proc, seen

    def stop_all(self, timeout: float = 10.0) -> None:
        """SIGTERM every group, wait up to ``timeout``, SIGKILL what is left."""
        for proc in self.procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            _signal_group(proc, signal.SIGKILL)  # children that outlived their parent
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self.procs = []
        for f in self._files:
            with contextlib.suppress(Exception):
                f.close()
        self._files = []


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # the group is the one start_new_session made for this child


def _copy_lines(stream: IO[bytes], out: IO[bytes], needle: bytes, seen: threading.Event) -> None:
    for line in iter(stream.readline, b""):
        out.write(line)
        out.flush()
        if needle in line:
            seen.set()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ------------------------------------------------------------------ engines
def _result(engine: str, n: int, label: str, rounds: int, stamps_file: Path, wall: float, load: float,
            extra: dict[str, Any]) -> dict[str, Any]:
    doc = json.loads(stamps_file.read_text())
    ends = [float(t) for t in doc["round_end_s"]]
    if len(ends) != rounds + 1:
        raise RuntimeError(f"{engine}: expected {rounds + 1} round stamps, got {len(ends)}")
    per_round = [ends[r] - ends[r - 1] for r in range(1, rounds + 1)]
    return {"engine": engine, "workers": n, "model": label, "hidden": MODEL_SIZES[label],
            "params": mlp_param_count(MODEL_SIZES[label]), "rounds": rounds, "per_round_s": per_round,
            "median_s": median(per_round[1:]), "wall_s": wall, "loadavg": load, **extra}


def run_simulation(n: int, label: str, rounds: int, work: Path, *, cpus_per_client: float = 1.0,
                   timeout: float | None = None) -> dict[str, Any]:
    """One point on the Simulation Engine (a child process: the driver plus Ray's processes)."""
    out = work / f"sim-n{n}-{label}.json"
    timeout = timeout or 180 + rounds * n * (1 + mlp_param_count(MODEL_SIZES[label]) * 4 / 20e6)
    group = Group(work / "logs", {**os.environ, **QUIET_ENV, "PYTHONPATH": str(APP)})
    load = loadavg()
    started = time.monotonic()
    try:
        proc, _ = group.spawn(f"simulation-n{n}-{label}", [
            str(venv_bin("python")), str(APP / "simulate.py"), "--hidden", str(MODEL_SIZES[label]),
            "--rounds", str(rounds), "--nodes", str(n), "--cpus-per-client", str(cpus_per_client),
            "--out", str(out)], cwd=work)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"Flower simulation N={n} {label} did not finish in {timeout:.0f} s; "
                               f"see {work / 'logs'}") from None
        if code != 0 or not out.exists():
            raise RuntimeError(f"Flower simulation N={n} {label} exited with {code}; see {work / 'logs'}")
    finally:
        group.stop_all()
    return _result("simulation", n, label, rounds, out, time.monotonic() - started, load,
                   {"cpus_per_client": cpus_per_client})


def run_deployment(n: int, label: str, rounds: int, work: Path, *, timeout: float | None = None) -> dict[str, Any]:
    """One point on the Deployment Engine: superlink + N supernodes on localhost, ``flwr run``."""
    out = work / f"deployment-n{n}-{label}.json"
    model_mb = mlp_param_count(MODEL_SIZES[label]) * 4 / 1e6
    timeout = timeout or 300 + rounds * n * (20 + model_mb)
    home = work / f"flwr-home-n{n}-{label}"  # FLWR_HOME: config, installed app, state; not the user's ~/.flwr
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, **QUIET_ENV, "FLWR_HOME": str(home),
           "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    group = Group(work / "logs", env)
    load = loadavg()
    started = time.monotonic()
    try:
        _, ready = group.spawn(f"superlink-n{n}-{label}", [
            str(venv_bin("flower-superlink")), "--insecure", "--isolation", "subprocess",
            "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)],
            cwd=work, watch_for=b"Uvicorn running on")
        if not ready.wait(READY_TIMEOUT_S):
            raise RuntimeError(f"flower-superlink was not ready in {READY_TIMEOUT_S:.0f} s; see {work / 'logs'}")
        for i in range(n):
            group.spawn(f"supernode-n{n}-{label}-{i}", [
                str(venv_bin("flower-supernode")), "--insecure", "--superlink", f"127.0.0.1:{port}",
                "--port", str(free_port()), "--node-config", f"partition-id={i} num-partitions={n}"], cwd=work)
        run_config = (f'hidden={MODEL_SIZES[label]} num-rounds={rounds} num-nodes={n} '
                      f'round-timeout={float(timeout)} out="{out}"')
        submit, _ = group.spawn(f"flwr-run-n{n}-{label}", [
            str(venv_bin("flwr")), "run", str(APP), "bench", "--run-config", run_config, "--stream"], cwd=work)
        try:
            code = submit.wait(timeout)  # --stream: returns when the run has finished
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"Flower deployment N={n} {label} did not finish in {timeout:.0f} s; "
                               f"see {work / 'logs'}") from None
        if code != 0 or not out.exists():
            raise RuntimeError(f"Flower deployment N={n} {label}: flwr run exited with {code} and "
                               f"{'a' if out.exists() else 'no'} result; see {work / 'logs'}")
    finally:
        group.stop_all()
    return _result("deployment", n, label, rounds, out, time.monotonic() - started, load,
                   {"isolation": "subprocess", "transport": "HTTP (protobuf), insecure, localhost"})


def run_point(engine: str, n: int, label: str, rounds: int, work: Path) -> dict[str, Any]:
    if engine == "simulation":
        return run_simulation(n, label, rounds, work)
    if engine == "deployment":
        return run_deployment(n, label, rounds, work)
    raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")


# ------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help=f"create {VENV.name} (pinned) if needed, then exit")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of simulation,deployment")
    parser.add_argument("--workers", default="4", help="comma-separated N values")
    parser.add_argument("--sizes", default="100k,1M", help="comma-separated subset of 100k,1M,10M")
    parser.add_argument("--rounds", type=int, default=8, help="simulation rounds per point")
    parser.add_argument("--deployment-rounds", type=int, default=4, help="deployment rounds per point")
    parser.add_argument("--json", type=Path, default=None, help="output (default bench/results/flower.json)")
    args = parser.parse_args(argv)
    if args.setup:
        print(json.dumps(ensure_venv(create=True)))
        return 0
    engines = [e for e in args.engines.split(",") if e]
    sizes = [s for s in args.sizes.split(",") if s]
    if any(e not in ENGINES for e in engines) or any(s not in MODEL_SIZES for s in sizes):
        parser.error("engines among simulation,deployment; sizes among 100k, 1M, 10M")
    if min(args.rounds, args.deployment_rounds) < 3:
        parser.error("at least 3 rounds (round 1 is excluded from the median)")
    versions = ensure_venv(create=False)
    work = Path(tempfile.mkdtemp(prefix="fedmq-bench-flower-"))
    rows = []
    try:
        for n in (int(x) for x in args.workers.split(",")):
            for label in sizes:
                for engine in engines:
                    rounds = args.deployment_rounds if engine == "deployment" else args.rounds
                    rows.append(run_point(engine, n, label, rounds, work))
                    print(f"  {engine} N={n} {label}: {rows[-1]['median_s']:.3f} s/round", file=sys.stderr)
    except BaseException:
        print(f"logs kept in {work / 'logs'}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    print(table(["engine", "N", "model", "s/round", "rounds", "loadavg"],
                [[r["engine"], r["workers"], r["model"], r["median_s"], r["rounds"], r["loadavg"]] for r in rows]))
    out = write_result("flower", {"flower": versions, "rows": rows}, args.json)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
