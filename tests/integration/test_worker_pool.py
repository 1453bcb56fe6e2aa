"""``fedmq workers``: many workers on one machine, spread over processes (issue 15, scale).

One interpreter hosting 1,000 workers ran 3,000 threads (task, broker I/O, heartbeat per
worker); they starved each other of the GIL, heartbeats went unconfirmed, connections were
dropped for missed AMQP heartbeats and the aggregator took live workers for gone. The pool now
shares one heartbeat thread per process and spreads the workers over processes; these tests
run it against the real broker and kill its processes for real.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from fedmq.broker.client import Client, Delivery
from fedmq.broker.settings import BrokerSettings
from fedmq.broker.topology import Topology
from fedmq.shared import messages
from tests.conftest import LOCAL_URL
from tests.helpers import Procs, read_ledger, split, wait_for

pytestmark = [pytest.mark.broker]


def common(amqp_url: str, namespace: str) -> list[str]:
    return ["--amqp-url", amqp_url, "--namespace", namespace]


def child_pids(log: str) -> list[int]:
    m = re.search(r"running \d+ workers in \d+ processes \(pids ([\d, ]+)\)", log)
    return [int(p) for p in m.group(1).split(", ")] if m else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (not yet reaped by its dead parent's reaper) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def control_queues(amqp_url: str, namespace: str) -> list[str] | None:
    """The namespace's control queues, listed by the local rabbitmqctl; None where the broker is
    not the local node (a container, a URL given) or there is no rabbitmqctl."""
    if amqp_url != LOCAL_URL or shutil.which("rabbitmqctl") is None:
        return None
    out = subprocess.run(["rabbitmqctl", "list_queues", "name", "--no-table-headers", "-q"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return [q for q in out.split() if q.startswith(f"{namespace}.control.")]


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no Threads line for {pid}")


@pytest.fixture(scope="module")
def six(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return split(tmp_path_factory.mktemp("six"), 6)


@pytest.mark.slow
def test_six_workers_in_three_processes_all_serve_a_run_and_exit_with_it(
    amqp_url: str, namespace: str, six: Path, procs: Procs, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    procs.start("aggregator", "aggregator", "--mode", "async", "--strategy", "fedbuff", "--buffer-size", "3",
                "--min-workers", "6", "--max-updates", "60", "--test-data", str(six / "test.npz"), "--out", str(run),
                "--drain-timeout", "5", *common(amqp_url, namespace))
    procs.start("pool", "workers", "--shards", str(six), "--processes", "3", *common(amqp_url, namespace))
    assert procs.wait("aggregator", 180) == 0, procs.dump()
    assert procs.wait("pool", 60) == 0, procs.dump()
    pids = child_pids(procs.log("pool"))
    assert len(pids) == 3, procs.log("pool")
    assert not [p for p in pids if alive(p)]
    applied = [e for e in read_ledger(run) if e["fate"] == "applied"]
    assert len(applied) == 60
    assert {e["worker_id"] for e in applied} == {f"w{i}" for i in range(6)}  # every process's workers trained
    assert procs.log("pool").count("stopped after") == 6


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_the_pools_processes_stop_when_its_first_process_is_told_to_or_dies(
    amqp_url: str, namespace: str, six: Path, procs: Procs, how: str
) -> None:
    pool = procs.start("pool", "workers", "--shards", str(six), "--processes", "2", "--serve",
                       *common(amqp_url, namespace))
    wait_for(lambda: procs.log("pool").count("waiting for a model and a task") == 6, 60, "six workers connected")
    pids = child_pids(procs.log("pool"))
    assert len(pids) == 2
    # one control queue per process, not per worker (each is a quorum queue: a Raft cluster on the broker)
    queues = control_queues(amqp_url, namespace)
    assert queues is None or len(queues) == 2, queues
    if how == "sigterm":  # the parent alone, as `docker stop` or a supervisor would
        os.kill(pool.pid, signal.SIGTERM)
        assert procs.wait("pool", 60) == 0, procs.log("pool")
    else:  # the parent dies without a word: its children must not serve on, orphaned
        os.kill(pool.pid, signal.SIGKILL)
        pool.wait(timeout=10)
    wait_for(lambda: not [p for p in pids if alive(p)], 60, "the pool's processes to exit")
    assert procs.log("pool").count("stopped after 0 tasks") == 6, procs.log("pool")


def test_a_pools_workers_share_one_heartbeat_thread(amqp_url: str, namespace: str, six: Path, procs: Procs,
                                                     tmp_path: Path) -> None:
    many = tmp_path / "many"
    many.mkdir()
    for i in range(40):  # forty workers over six shards' files: links, no copies
        (many / f"worker-{i}.npz").symlink_to(six / f"worker-{i % 6}.npz")
    pool = procs.start("pool", "workers", "--shards", str(many), "--processes", "1", "--serve", "--heartbeat", "0.5",
                       *common(amqp_url, namespace))
    wait_for(lambda: procs.log("pool").count("waiting for a model and a task") == 40, 120, "forty workers connected")
    # per worker: its task thread and its broker client's I/O thread; no heartbeat thread each
    assert threads_of(pool.pid) <= 2 * 40 + 6
    # and one heartbeat message per beat names all forty (the aggregator reads 1, not 40)
    beats: queue.Queue[messages.Control] = queue.Queue()
    topology = Topology(namespace)

    def on_presence(d: Delivery) -> None:
        msg = messages.decode(d.body, expect=messages.Control)
        assert isinstance(msg, messages.Control)
        if msg.kind == "heartbeat":
            beats.put(msg)

    reader = Client(BrokerSettings.from_url(amqp_url), topology, name="test-presence", declare=False)
    reader.subscribe(topology.presence, on_presence, prefetch=100, settle_on_return=True)
    with reader:
        got = [beats.get(timeout=30) for _ in range(3)]
    for msg in got:
        assert {msg.worker_id, *msg.info["workers"]} == {f"w{i}" for i in range(40)}
    procs.kill("pool", signal.SIGTERM)
    assert procs.wait("pool", 60) == 0, procs.log("pool")[-3000:]
    assert "could not publish heartbeat" not in procs.log("pool")


def test_a_pool_whose_broker_refuses_it_fails_in_one_line_per_process(amqp_url: str, namespace: str, six: Path,
                                                                      procs: Procs) -> None:
    wrong = re.sub(r"//([^:@/]+):([^@/]*)@", r"//\1:not-the-password@", amqp_url)
    assert wrong != amqp_url
    pool = procs.start("pool", "workers", "--shards", str(six), "--processes", "2", "--amqp-url", wrong,
                       "--namespace", namespace)
    assert procs.wait("pool", 120) not in (0, 2), procs.log("pool")
    log = procs.log("pool")
    assert "Traceback" not in log, log
    assert log.count("login") >= 2 or log.count("refused") >= 2, log  # each process says why
    assert not [p for p in child_pids(log) if alive(p)]
    assert pool.returncode == 1
