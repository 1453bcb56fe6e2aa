"""A private node asked for more open files gets them (bench/scale.py --private-node at N = 1,000).

As root the node runs through ``su rabbitmq``, whose PAM session resets the soft open-files limit
(1024 here, whatever ours is); ``PrivateNode(open_files=...)`` raises it in the node's own startup
shell. Checked on the node's Erlang VM itself (/proc/PID/limits) and by the node's own report.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmq.broker.provision import PrivateNode
from tests.conftest import skip_or_fail

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def soft_open_files(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no open-files line in /proc/{pid}/limits")


@pytest.fixture(scope="module")
def wanted() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)


@pytest.fixture(scope="module")
def node(wanted: int) -> Iterator[PrivateNode]:
    if not PrivateNode.available():
        skip_or_fail("rabbitmq-server is not installed: this test needs a private node")
    started = PrivateNode(open_files=wanted).start(timeout=240)
    try:
        yield started
    finally:
        started.remove()


def test_the_nodes_vm_has_the_open_files_limit_asked_for(node: PrivateNode, wanted: int) -> None:
    pid = node.beam_pid()
    assert pid is not None, "the node's beam.smp was not found under its process"
    assert soft_open_files(pid) == wanted
    status = node.ctl("status")
    assert "Sockets:" in status  # the node sizes its socket limit from the descriptors it has


def test_the_node_still_keeps_its_distribution_on_loopback(node: PrivateNode) -> None:
    """The system rabbitmq-env.conf (here: ERL_FLAGS binding the distribution to 127.0.0.1) is still read."""
    system = Path("/etc/rabbitmq/rabbitmq-env.conf")
    if not system.exists() or "inet_dist_use_interface" not in system.read_text():
        pytest.skip("this machine's rabbitmq-env.conf does not bind the distribution")
    pid = node.beam_pid()
    assert pid is not None
    assert "inet_dist_use_interface" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
