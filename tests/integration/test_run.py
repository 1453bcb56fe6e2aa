"""`fedmq run`: the whole federation from one command, and a clean exit on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from fedmq.broker.provision import PrivateNode
from tests.helpers import fedmq_argv, history_len, read_history, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def leftovers(marker: str) -> list[str]:
    """Processes whose command line mentions ``marker`` (our run directory or node name)."""
    out = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def run_cmd(tmp: Path, *args: str, amqp_url: str | None = None) -> subprocess.Popen[str]:
    env = dict(os.environ)
    if amqp_url:
        env["FEDMQ_AMQP_URL"] = amqp_url
    return subprocess.Popen(fedmq_argv("run", *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def test_run_trains_to_90_percent_and_draws_curves(amqp_url: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cmd(tmp_path, "--workers", "4", "--dataset", "digits", "--mode", "sync", "--rounds", "20",
                   "--target-accuracy", "0.9", "--out", str(out), amqp_url=amqp_url)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output
    hist = read_history(out)
    assert hist["final"]["accuracy"] >= 0.9
    assert (out / "curves.png").stat().st_size > 10_000
    assert "reached target" in output and "round" in output  # plain progress lines, then the summary
    assert not leftovers(str(out))


def test_sigint_exits_130_after_the_aggregator_checkpointed_and_still_plots(amqp_url: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cmd(tmp_path, "--workers", "4", "--mode", "async", "--strategy", "fedasync", "--max-updates", "100000",
                   "--slow-workers", "1.0", "--slowdown", "50", "--out", str(out), amqp_url=amqp_url)
    try:
        wait_for(lambda: history_len(out) >= 1 or proc.poll() is not None, 90, "the first evaluated version")
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    assert "interrupted by SIGINT" in output.splitlines()[-1]
    assert not leftovers(str(out)), leftovers(str(out))
    hist = json.loads((out / "history.json").read_text())  # consistent: a complete JSON document
    assert hist["final"]["interrupted"] is True
    assert (out / "checkpoint").is_dir() and (out / "model.npz").exists()  # the aggregator left in order
    assert (out / "curves.png").stat().st_size > 10_000
    assert "final version" in output and "--resume" in output  # the summary, as for a finished run


@pytest.mark.skipif(not PrivateNode.available(), reason="needs rabbitmq-server for a private node")
def test_run_starts_and_stops_its_own_broker_when_none_answers(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cmd(tmp_path, "--workers", "2", "--mode", "sync", "--rounds", "3", "--out", str(out),
                   amqp_url="amqp://guest:guest@127.0.0.1:1/")
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output
    assert read_history(out)["final"]["rounds"] == 3
    assert not leftovers("fedmq-rabbit-"), leftovers("fedmq-rabbit-")


def test_a_config_the_aggregator_refuses_starts_nothing(amqp_url: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cmd(tmp_path, "--workers", "2", "--mode", "sync", "--strategy", "fedbuff", "--out", str(out),
                   amqp_url=amqp_url)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, output
    assert "strategy fedbuff does not run in sync mode" in output and "Traceback" not in output
    assert not list(out.glob("logs/worker*")) and not (out / "shards").exists()
    assert not leftovers(str(out))


def test_a_failing_aggregator_says_why_and_no_worker_starts(amqp_url: str, tmp_path: Path) -> None:
    """The aggregator fails after `run` checked its settings: its own error line is shown."""
    out = tmp_path / "run"
    proc = run_cmd(tmp_path, "--workers", "2", "--rounds", "2", "--trainer", "nosuch_module_x:Thing", "--out", str(out),
                   amqp_url=amqp_url)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, output
    last = output.strip().splitlines()[-1]
    assert "the aggregator exited with code 1" in last and "nosuch_module_x" in last, output
    assert not list(out.glob("logs/worker*")), "workers started although the aggregator never came up"
    assert not leftovers(str(out))
