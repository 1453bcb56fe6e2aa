"""Finding or starting a RabbitMQ for ``fedmq run`` and the test suite.

Order (``fedmq run``): the broker at the given URL if it answers; a throwaway container where a
Docker engine answers (testcontainers); a private ``rabbitmq-server`` node in a temp dir where
the binary exists; otherwise one clear error that says how to get a broker. A broker we
started, we stop. A private node can also be stopped and started again with its data intact,
which is how the fault-injection tests restart "the broker" without touching a shared one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmq.broker.client import open_connection
from fedmq.broker.settings import BrokerSettings, mask_url
from fedmq.shared.errors import BrokerError

log = logging.getLogger("fedmq.broker.provision")

HOW_TO_GET_A_BROKER = (
    "no RabbitMQ found: start one (e.g. `docker run -d -p 5672:5672 rabbitmq:3.13-management`, "
    "or install the rabbitmq-server package) and pass --amqp-url / FEDMQ_AMQP_URL"
)


def broker_answers(url: str, timeout: float = 3.0) -> bool:
    """True if an AMQP handshake with ``url`` succeeds within ``timeout`` seconds."""
    settings = BrokerSettings.from_url(url, connect_timeout_s=timeout)
    try:
        conn = open_connection(settings, "fedmq-probe")
    except BrokerError:
        return False
    with contextlib.suppress(Exception):
        conn.close()
    return True


def wait_until_answers(url: str, deadline_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise BrokerError(f"the broker process exited with code {proc.returncode} while starting")
        if _port_open(url) and broker_answers(url, timeout=2.0):
            return
        time.sleep(0.25)  # waiting for an external process: nothing to block on
    raise BrokerError(f"RabbitMQ at {mask_url(url)} did not answer within {deadline_s:.0f} s")


def _port_open(url: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with contextlib.suppress(OSError), socket.create_connection((parts.hostname, parts.port or 5672), 0.5):
        return True
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def docker_available() -> bool:
    """A Docker engine answers (not only the client binary)."""
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
        return True
    except Exception:  # noqa: BLE001 (any failure means: no engine)
        return False


@dataclass
class PrivateNode:
    """A RabbitMQ node of our own, in a temp dir, on ports away from 5672/25672."""

    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fedmq-rabbit-")))
    name: str = ""
    proc: subprocess.Popen[bytes] | None = None
    #: extra ``rabbitmq.conf`` settings, e.g. ``{"max_message_size": "1048576"}``
    config: dict[str, str] = field(default_factory=dict)
    #: plugins to enable, e.g. ``["rabbitmq_auth_mechanism_ssl"]`` (EXTERNAL login)
    plugins: list[str] = field(default_factory=list)
    #: the node's soft open-files limit (None: what it inherits). As root the Debian wrapper runs
    #: the node through ``su rabbitmq``, whose PAM session resets the soft limit (to 1024 here),
    #: whatever ours is; every connection and queue file takes a descriptor, so ~1,000 clients
    #: need more. The limit is raised inside the node's own startup shell (see :meth:`_prepare`),
    #: up to the hard limit, which ``su`` keeps.
    open_files: int | None = None

    def __post_init__(self) -> None:
        self.name = self.name or f"fedmq{self.port}@localhost"

    @staticmethod
    def available() -> bool:
        return shutil.which("rabbitmq-server") is not None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq"),
            **({"RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf")} if self.open_files else {}),
        }

    def _prepare(self) -> None:
        for sub in ("mnesia", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        (self.base / "enabled_plugins").write_text(f"[{','.join(self.plugins)}].\n")
        settings = {
            "listeners.tcp.default": str(self.port),
            "loopback_users": "none",
            "consumer_timeout": "3600000",
            **self.config,
        }
        (self.base / "rabbitmq.conf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        if self.open_files:
            (self.base / "rabbitmq-env.conf").write_text(env_conf(self.open_files))
        if os.geteuid() == 0:  # the Debian wrapper runs the node as user rabbitmq
            with contextlib.suppress(KeyError, OSError):
                shutil.chown(self.base, "rabbitmq", "rabbitmq")
                for path in self.base.rglob("*"):
                    shutil.chown(path, "rabbitmq", "rabbitmq")

    def start(self, timeout: float = 60.0) -> PrivateNode:
        self.launch()
        wait_until_answers(self.url, timeout, self.proc)
        return self

    def launch(self) -> None:
        """Start the node's process without waiting for it to answer."""
        self._prepare()
        logf = open(self.base / "server.out", "ab")  # noqa: SIM115 (owned by the child)
        self.proc = subprocess.Popen(
            ["rabbitmq-server"], env=self._env(), stdout=logf, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.info("starting a private RabbitMQ node %s on port %d", self.name, self.port)

    def beam_pid(self) -> int | None:
        """The pid of this node's Erlang VM (beam.smp), e.g. to read its CPU time; None if not running.

        Found by ancestry (the wrapper, ``su`` and the startup shell sit between it and
        :attr:`proc`), so another node on the machine is never taken for this one.
        """
        if self.proc is None:
            return None
        parents: dict[int, int] = {}
        beams: list[int] = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                comm = stat[stat.index("(") + 1:stat.rindex(")")]
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                if comm == "beam.smp":
                    beams.append(int(entry.name))
        for pid in beams:
            seen, up = 0, pid
            while up > 1 and seen < 64:
                if up == self.proc.pid:
                    return pid
                up, seen = parents.get(up, 0), seen + 1
        return None

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl`` against this node (e.g. ``ctl("add_user", "u", "p")``); its stdout.

        Raises :class:`BrokerError` with rabbitmqctl's own words if it fails.
        """
        try:
            proc = subprocess.run(["rabbitmqctl", "-n", self.name, *args], env=self._env(), timeout=timeout,
                                  capture_output=True, text=True, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            raise BrokerError(f"rabbitmqctl {args[0] if args else ''} failed: {exc}") from None
        if proc.returncode != 0:
            raise BrokerError(f"rabbitmqctl {' '.join(args[:1])} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
        return proc.stdout

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the node (its data stays in the temp dir, so :meth:`start` brings it back)."""
        if self.proc is None:
            return
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["rabbitmqctl", "-n", self.name, "stop"], env=self._env(), timeout=timeout,
                           capture_output=True, check=False)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                self.proc.wait(timeout=10)
        # the wrapper's children run as another user in the same session
        subprocess.run(["pkill", "-9", "-f", f"-sname {self.name}|{self.name}"], check=False, capture_output=True)
        self.proc = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def env_conf(open_files: int) -> str:
    """A ``rabbitmq-env.conf`` that keeps the system one's settings and raises the soft open-files
    limit of the shell that starts the node (``rabbitmq-env`` sources the file; the VM inherits
    the limit). The system file (``$SYS_PREFIX/etc/rabbitmq/rabbitmq-env.conf``, e.g. the Erlang
    distribution bound to 127.0.0.1) is read only when no other file is named, so this one reads it."""
    system = '"${SYS_PREFIX}/etc/rabbitmq/rabbitmq-env.conf"'
    return (f'[ -f {system} ] && . {system}\n'
            f'ulimit -S -n {int(open_files)} || echo "fedmq: could not raise the open-files limit to {int(open_files)}" >&2\n')


@dataclass
class PrivateCluster:
    """Several :class:`PrivateNode` s joined into one RabbitMQ cluster (three by default).

    The nodes share the Erlang cookie of the user that runs them (the Debian wrapper runs every
    node as user ``rabbitmq``, whose home holds the cookie); nodes 2.. leave their own
    one-node cluster and ``join_cluster`` the first. Stopping a node keeps its data, and
    starting it again rejoins the cluster. Every ``rabbitmqctl`` call names its node
    (``-n``): the machine's own broker is never touched.
    """

    size: int = 3
    config: dict[str, str] = field(default_factory=dict)
    nodes: list[PrivateNode] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """All nodes' URLs, comma-separated (what ``--amqp-url`` takes)."""
        return ",".join(self.urls)

    def start(self, timeout: float = 240.0) -> PrivateCluster:
        self.nodes = self.nodes or [PrivateNode(config=dict(self.config)) for _ in range(self.size)]
        try:
            for node in self.nodes:  # booting is mostly waiting: start them side by side
                node.launch()
            for node in self.nodes:
                wait_until_answers(node.url, timeout, node.proc)
            seed = self.nodes[0]
            for node in self.nodes[1:]:
                node.ctl("stop_app")
                node.ctl("join_cluster", seed.name)
                node.ctl("start_app")
            self.wait_running(timeout)
        except BaseException:
            self.remove()
            raise
        return self

    def running_nodes(self, via: PrivateNode | None = None) -> set[str]:
        """The node names the cluster reports as running (asked of ``via`` or a live node)."""
        asked = via or next(n for n in self.nodes if n.proc is not None)
        out = asked.ctl("eval", "rabbit_nodes:all_running().")
        return set(re.findall(r"'?([A-Za-z0-9_.-]+@[A-Za-z0-9_.-]+)'?", out))

    def wait_running(self, timeout: float = 120.0) -> None:
        """Return once every started node is up and sees every other started node."""
        want = {n.name for n in self.nodes if n.proc is not None}
        end = time.monotonic() + timeout
        seen: set[str] = set()
        while time.monotonic() < end:
            with contextlib.suppress(BrokerError):
                seen = self.running_nodes()
                if want <= seen:
                    for node in self.nodes:
                        if node.proc is not None:
                            wait_until_answers(node.url, max(1.0, end - time.monotonic()), node.proc)
                    return
            time.sleep(0.5)  # waiting for external processes: nothing to block on
        raise BrokerError(f"cluster nodes {sorted(want - seen)} did not join within {timeout:.0f} s")

    def node_named(self, name: str) -> PrivateNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def leader_of(self, queue: str, vhost: str = "/") -> PrivateNode:
        """The node that leads quorum queue (or stream) ``queue``."""
        live = next(n for n in self.nodes if n.proc is not None)
        out = live.ctl("list_queues", "-p", vhost, "--no-table-headers", "--quiet", "name", "leader")
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == queue:
                return self.node_named(parts[1])
        raise BrokerError(f"queue {queue!r} has no leader listed by {live.name}")

    def stop_node(self, node: PrivateNode) -> None:
        node.stop()

    def start_node(self, node: PrivateNode, timeout: float = 120.0) -> None:
        """Start a stopped node again: it rejoins with its data."""
        node.start(timeout)
        self.wait_running(timeout)

    def remove(self) -> None:
        for node in reversed(self.nodes):
            node.remove()


@dataclass
class ProvidedBroker:
    url: str
    kind: str  # "given" | "container" | "private-node"
    handle: Any = None

    def close(self) -> None:
        if self.kind == "container":
            with contextlib.suppress(Exception):
                self.handle.stop()
        elif self.kind == "private-node":
            self.handle.remove()


def start_container() -> ProvidedBroker:
    from testcontainers.rabbitmq import RabbitMqContainer

    container = RabbitMqContainer("rabbitmq:3.13-management")
    container.start()
    host = container.get_container_host_ip()
    port = container.get_exposed_port(5672)
    url = f"amqp://guest:guest@{host}:{port}/"
    wait_until_answers(url, 60)
    return ProvidedBroker(url, "container", container)


@contextlib.contextmanager
def provide_broker(url: str | None, *, try_given_first: bool = True) -> Iterator[ProvidedBroker]:
    """Yield a broker per the module's order, and stop it afterwards if we started it."""
    provided: ProvidedBroker | None = None
    if url and try_given_first and broker_answers(url):
        provided = ProvidedBroker(url, "given")
    elif docker_available():
        log.info("starting a throwaway RabbitMQ container")
        provided = start_container()
    elif PrivateNode.available():
        provided = ProvidedBroker("", "private-node", PrivateNode())
        provided.handle.start()
        provided.url = provided.handle.url
    else:
        raise BrokerError(HOW_TO_GET_A_BROKER if not url else f"RabbitMQ at {mask_url(url)} does not answer; {HOW_TO_GET_A_BROKER}")
    try:
        yield provided
    finally:
        provided.close()
