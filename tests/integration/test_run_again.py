"""Two `fedmq run`s one after the other on one namespace the user gave: the second trains too
(it once hung: the namespace kept the first run's models, tasks and lock)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import fedmq_argv, read_history

pytestmark = [pytest.mark.broker, pytest.mark.slow]

#: a run here takes seconds; the second run of the bug never finished
RUN_TIMEOUT_S = 150

MODES = {
    "sync": ["--mode", "sync", "--rounds", "3"],
    "async": ["--mode", "async", "--strategy", "fedbuff", "--max-updates", "40"],
}


def run_once(amqp_url: str, namespace: str, out: Path, mode_args: list[str]) -> dict[str, Any]:
    """One `fedmq run` with 2 workers on ``namespace``; its history.json. A run that does not
    finish in time (the bug this guards against was a hang) is stopped with SIGTERM, so that
    it stops its aggregator and workers, and the test fails."""
    env = {**os.environ, "FEDMQ_AMQP_URL": amqp_url}
    proc = subprocess.Popen(
        fedmq_argv("run", "--workers", "2", "--dataset", "digits", "--partition", "iid", *mode_args,
                   "--namespace", namespace, "--display", "plain", "--out", str(out)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, stdin=subprocess.DEVNULL,
    )
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        pytest.fail(f"fedmq run into {out.name} did not finish within {RUN_TIMEOUT_S} s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"fedmq run into {out.name} exited {proc.returncode}:\n{output[-4000:]}"
    return read_history(out)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_second_run_on_the_same_namespace_trains(amqp_url: str, namespace: str, tmp_path: Path, mode: str) -> None:
    first = run_once(amqp_url, namespace, tmp_path / "first", MODES[mode])
    second = run_once(amqp_url, namespace, tmp_path / "second", MODES[mode])
    assert first["namespace"] == second["namespace"] == namespace
    assert second["run_id"] != first["run_id"]
    for doc in (first, second):
        assert doc["history"], "no version was evaluated"
        assert doc["final"]["accuracy"] > 0.5 and not doc["final"]["interrupted"], doc["final"]
    if mode == "sync":
        assert second["final"]["rounds"] == 3 and second["final"]["updates_applied"] == 6, second["final"]
    else:
        assert second["final"]["updates_applied"] >= 40, second["final"]
