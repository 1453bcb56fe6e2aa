"""A model over the broker's message limit fails the run at once, in one line, instead of looping.

A model version or update bigger than ``--chunk-bytes`` travels as chunks (tests/fault/test_chunked.py);
one under ``--chunk-bytes`` but over RabbitMQ's ``max_message_size`` (a chunk size above the broker's
limit) cannot travel. The broker answers such a publish with 406
PRECONDITION_FAILED and closes the channel; the client used to take that for a lost
connection and republish forever (242 reconnects in 300 s, nothing said).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmq.broker.provision import PrivateNode
from fedmq.runner import fedmq_argv
from tests.conftest import skip_or_fail

pytestmark = [pytest.mark.broker, pytest.mark.slow]

LIMIT = 1024 * 1024  # the private node's max_message_size


@pytest.fixture(scope="module")
def small_limit_broker() -> Iterator[PrivateNode]:
    if not PrivateNode.available():
        skip_or_fail("rabbitmq-server is not installed: this test needs a private node")
    node = PrivateNode(config={"max_message_size": str(LIMIT)}).start()
    try:
        yield node
    finally:
        node.remove()


def run(tmp_path: Path, url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "FEDMQ_AMQP_URL": url, **(env or {})}
    full_env.pop("FEDMQ_MAX_MESSAGE_BYTES", None) if env is None else None
    return subprocess.run(
        fedmq_argv("run", "--workers", "2", "--dataset", "digits", "--rounds", "2", "--out", str(tmp_path / "run"), *args),
        capture_output=True, text=True, timeout=180, env=full_env, stdin=subprocess.DEVNULL,
    )


def last_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.mark.parametrize("hidden", ["2048,256"])  # ~658k parameters: a 2.6 MB model version
def test_a_model_over_the_brokers_limit_fails_in_one_line(small_limit_broker: PrivateNode, tmp_path: Path,
                                                          hidden: str) -> None:
    proc = run(tmp_path, small_limit_broker.url, "--hidden", hidden, "--namespace", "limit-broker")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    line = last_line(proc)
    assert "max_message_size" in line or "message size" in line, out[-3000:]
    assert str(LIMIT) in line or "1.0 MiB" in line or "1 MiB" in line, line
    assert "Traceback" not in out


def test_a_model_over_the_configured_limit_is_refused_before_it_is_sent(small_limit_broker: PrivateNode,
                                                                      tmp_path: Path) -> None:
    proc = run(tmp_path, small_limit_broker.url, "--hidden", "2048,256", "--namespace", "limit-client",
               env={"FEDMQ_MAX_MESSAGE_BYTES": str(LIMIT)})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    line = last_line(proc)
    assert "FEDMQ_MAX_MESSAGE_BYTES" in line or "max_message_size" in line, line
    assert "Traceback" not in out
