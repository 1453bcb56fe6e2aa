"""`fedmq broker list`: the namespaces on a real broker (AMQP cannot list queues: the
management API or a local rabbitmqctl does)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fedmq.broker.admin import Admin, delete_namespace, namespaces_of
from fedmq.broker.provision import free_port
from fedmq.broker.settings import BrokerSettings
from fedmq.broker.topology import Topology
from fedmq.cli import main
from tests.conftest import new_namespace
from tests.helpers import fedmq_argv

NEEDS_MANAGEMENT = "listing namespaces needs the RabbitMQ management plugin"


def listed(amqp_url: str) -> dict[str, dict[str, Any]]:
    """`fedmq broker list --json`: namespace -> its row (skips where no way to list answers,
    e.g. a container broker whose management port is not published)."""
    result = CliRunner().invoke(main, ["broker", "list", "--json", "--amqp-url", amqp_url])
    if result.exit_code == 1 and NEEDS_MANAGEMENT in result.output:
        pytest.skip(result.output.strip())
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["source"] in ("management API", "rabbitmqctl")
    return {row["namespace"]: row for row in doc["namespaces"]}


@pytest.mark.broker
def test_list_shows_declared_namespaces_and_not_deleted_ones(amqp_url: str, namespace: str) -> None:
    other = new_namespace("list")
    try:
        for ns in (namespace, other):
            with Admin(BrokerSettings.from_url(amqp_url), Topology(ns)) as admin:
                admin.setup()
        rows = listed(amqp_url)
        for ns in (namespace, other):
            assert ns in rows, sorted(rows)
            assert rows[ns]["queues"] == list(Topology(ns).queues) and rows[ns]["missing"] == []
        result = CliRunner().invoke(main, ["broker", "list", "--amqp-url", amqp_url])
        assert result.exit_code == 0 and namespace in result.output and other in result.output, result.output
        result = CliRunner().invoke(main, ["broker", "delete", "--yes", "--amqp-url", amqp_url, "--namespace", other])
        assert result.exit_code == 0, result.output
        rows = listed(amqp_url)
        assert other not in rows and namespace in rows
    finally:
        delete_namespace(amqp_url, other)


@pytest.mark.broker
def test_without_a_way_to_list_queues_it_says_so_in_one_line(amqp_url: str, tmp_path: Path) -> None:
    """No management API at --management-url and no rabbitmqctl on the PATH: exit 1, one line."""
    env = {**os.environ, "PATH": str(tmp_path)}  # the interpreter is named by its full path
    proc = subprocess.run(
        fedmq_argv("broker", "list", "--amqp-url", amqp_url, "--management-url", f"http://127.0.0.1:{free_port()}"),
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and NEEDS_MANAGEMENT in proc.stderr, proc.stderr
    assert "no rabbitmqctl" in proc.stderr and "Traceback" not in proc.stderr and proc.stdout == ""


def test_namespaces_are_the_prefixes_of_fedmq_queue_names() -> None:
    def rows(*names: str) -> list[dict[str, Any]]:
        return [{"name": n, "messages": 1, "consumers": 0} for n in names]

    full = list(Topology("a.tasks").queues)  # a namespace whose name ends like a queue's
    found = namespaces_of(rows(*full, "b.tasks.dlq", "b.models", "c.control.w0.1234abcd", "unrelated", ".models"))
    assert [n.namespace for n in found] == ["a.tasks", "b"]
    assert found[0].queues == full and found[0].missing == [] and found[0].messages == len(full)
    assert found[1].queues == ["b.models", "b.tasks.dlq"] and "b.lock" in found[1].missing
