"""`fedmq run` is the aggregator plus workers, nothing less: its config file, --resume, a CSV's
label column, and a broker that refuses the login."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fedmq.broker.admin import delete_namespace
from tests.conftest import new_namespace
from tests.helpers import digits_csv, fedmq_argv, read_history, read_ledger, readme_config

pytestmark = pytest.mark.broker


def run(*args: str, amqp_url: str, timeout: float = 180, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_")}
    full_env.update({"FEDMQ_AMQP_URL": amqp_url, **(env or {})})
    proc = subprocess.run(fedmq_argv("run", "--display", "plain", *args), capture_output=True, text=True,
                          env=full_env, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def leftovers(marker: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def test_refused_credentials_are_an_error_not_a_reason_to_start_a_broker(amqp_url: str, tmp_path: Path) -> None:
    bad = amqp_url.replace("guest:guest@", "guest:wrong-secret@")
    assert bad != amqp_url, "the test broker's URL has no guest:guest@ to spoil"
    code, out, err = run("--workers", "2", "--rounds", "2", "--out", str(tmp_path / "r"), amqp_url=bad, timeout=60)
    assert code == 1, out + err
    assert err.strip().count("\n") == 0, err
    assert "refused the credentials" in err and "guest:***@" in err and "wrong-secret" not in out + err
    assert "private" not in (out + err).lower() and "container" not in (out + err).lower()
    assert not leftovers("fedmq-rabbit-"), leftovers("fedmq-rabbit-")
    assert not (tmp_path / "r").exists(), "nothing is split or started before the broker let us in"


@pytest.mark.slow
def test_a_csv_with_the_label_first_trains_on_the_label(amqp_url: str, tmp_path: Path) -> None:
    csv = digits_csv(tmp_path / "digits.csv")
    out = tmp_path / "r"
    code, stdout, err = run("--data", str(csv), "--label-column", "digit", "--workers", "2", "--mode", "sync",
                            "--rounds", "3", "--out", str(out), amqp_url=amqp_url)
    assert code == 0, stdout + err
    assert "label column 'digit'" in stdout and "10 classes" in stdout
    hist = read_history(out)
    assert hist["spec"]["num_classes"] == 10 and hist["spec"]["input_dim"] == 64
    assert hist["final"]["accuracy"] > 0.5  # chance is 0.1


@pytest.mark.slow
def test_the_readmes_config_file_makes_run_use_fedbuff(amqp_url: str, tmp_path: Path) -> None:
    cfg = tmp_path / "fedmq.toml"
    cfg.write_text(readme_config() + "\n[run]\nworkers = 2\nmax-updates = 12\n")
    ns = new_namespace("cfg")  # flags win over the file's namespace = "lab"
    out = tmp_path / "r"
    try:
        code, stdout, err = run("--config", str(cfg), "--namespace", ns, "--out", str(out), amqp_url=amqp_url,
                                env={"FEDMQ_RUN_MAX_UPDATES": "9"})
    finally:
        delete_namespace(amqp_url, ns)
    assert code == 0, stdout + err
    cfg_used = read_history(out)["config"]
    assert (cfg_used["mode"], cfg_used["strategy"], cfg_used["buffer_size"]) == ("async", "fedbuff", 4)
    assert cfg_used["hidden"] == [64, 32] and cfg_used["target_accuracy"] == 0.95
    assert cfg_used["max_updates"] == 9  # the environment over the file
    assert len(list((out / "shards").glob("worker-*.npz"))) == 2  # `workers` from [run]


@pytest.mark.slow
def test_resume_continues_the_previous_run(amqp_url: str, tmp_path: Path) -> None:
    out = tmp_path / "r"
    code, stdout, err = run("--workers", "2", "--mode", "sync", "--rounds", "2", "--out", str(out), amqp_url=amqp_url)
    assert code == 0, stdout + err
    first = read_ledger(out)
    code, stdout, err = run("--workers", "2", "--mode", "sync", "--rounds", "4", "--resume", "--out", str(out),
                            amqp_url=amqp_url)
    assert code == 0, stdout + err
    hist = read_history(out)
    assert hist["final"]["rounds"] == 4
    assert [h["round"] for h in hist["history"]] == [1, 2, 3, 4]
    assert hist["final"]["updates_applied"] == 8
    assert read_ledger(out)[: len(first)] == first  # continued, not started over


def test_resume_of_a_directory_without_a_checkpoint_starts_nothing(amqp_url: str, tmp_path: Path) -> None:
    code, out, err = run("--workers", "2", "--resume", "--out", str(tmp_path / "none"), amqp_url=amqp_url, timeout=60)
    assert code == 1 and "no checkpoint" in err and err.strip().count("\n") == 0, out + err
    assert not (tmp_path / "none").exists()
