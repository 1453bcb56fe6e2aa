"""The command line without a broker: options, config files, environment, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from fedmq.broker.settings import BrokerSettings, mask_text, mask_url
from fedmq.cli import main
from fedmq.shared.errors import ConfigError


def test_mask_url_hides_passwords() -> None:
    assert mask_url("amqp://agg:s3cret@host:5672/fedmq") == "amqp://agg:***@host:5672/fedmq"
    assert "s3cret" not in mask_text("failed: amqps://u:s3cret@h/ (x)")
    assert mask_url("amqp://host/") == "amqp://host/"


def test_broker_settings_reject_other_schemes() -> None:
    with pytest.raises(ConfigError, match="amqp://"):
        BrokerSettings.from_url("http://x:y@host/")
    assert BrokerSettings.from_url("amqps://u:p@h:5671/v").url.startswith("amqps://")


def _aggregator_ctx(args: list[str], env: dict[str, str] | None = None) -> dict:
    """Parse `fedmq aggregator` options without running it."""
    cmd = main.commands["aggregator"]
    runner = CliRunner(env=env or {})
    with runner.isolation(env=env or {}):
        # the prefix the `fedmq` group gives this subcommand (FEDMQ + _AGGREGATOR)
        ctx = cmd.make_context("aggregator", list(args), obj=None, auto_envvar_prefix="FEDMQ_AGGREGATOR")
    return ctx.params


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    cfg = tmp_path / "fedmq.toml"
    cfg.write_text('[aggregator]\nrounds = 7\nlr = 0.05\nbuffer-size = 5\nhidden = [32, 16]\n')
    base = ["--config", str(cfg), "--test-data", "t.npz", "--out", "r"]
    p = _aggregator_ctx(base)
    assert (p["rounds"], p["lr"], p["buffer_size"], p["hidden"]) == (7, 0.05, 5, (32, 16))
    p = _aggregator_ctx(base, env={"FEDMQ_AGGREGATOR_ROUNDS": "9"})
    assert p["rounds"] == 9 and p["lr"] == 0.05
    p = _aggregator_ctx([*base, "--rounds", "11"], env={"FEDMQ_AGGREGATOR_ROUNDS": "9"})
    assert p["rounds"] == 11
    p = _aggregator_ctx(["--test-data", "t.npz", "--out", "r"])
    assert p["rounds"] is None and p["lr"] == 0.1


def test_amqp_url_and_namespace_from_env() -> None:
    p = _aggregator_ctx(["--test-data", "t", "--out", "r"], env={"FEDMQ_AMQP_URL": "amqp://a:b@h/", "FEDMQ_NAMESPACE": "n1"})
    assert p["amqp_url"] == "amqp://a:b@h/" and p["namespace"] == "n1"


def test_unknown_config_key_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[aggregator]\nrounds = 3\nroundz = 4\n")
    result = CliRunner().invoke(main, ["aggregator", "--config", str(cfg), "--test-data", "t", "--out", "r"])
    assert result.exit_code == 2
    assert "unknown key 'roundz'" in result.output


def test_missing_config_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["worker", "--config", str(tmp_path / "none.toml"), "--data", "x.npz"])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_bad_option_values_are_usage_errors() -> None:
    runner = CliRunner()
    for args in (["--mode", "semi"], ["--lr", "-1"], ["--hidden", "64,x"], ["--target-accuracy", "2"]):
        result = runner.invoke(main, ["aggregator", "--test-data", "t", "--out", "r", *args])
        assert result.exit_code == 2, (args, result.output)


def test_strategy_and_mode_must_agree(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["aggregator", "--test-data", "t", "--out", str(tmp_path), "--mode", "sync", "--strategy", "fedbuff"])
    assert result.exit_code == 1
    assert "fedbuff does not run in sync mode" in result.output


def test_missing_test_data_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["aggregator", "--test-data", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "nope.npz" in result.output


def test_worker_with_missing_shard_fails_cleanly(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["worker", "--data", str(tmp_path / "nope.npz")])
    assert result.exit_code == 1 and "nope.npz" in result.output and "Traceback" not in result.output


def test_worker_with_bad_trainer_fails_cleanly(tmp_path: Path) -> None:
    import numpy as np

    np.savez(tmp_path / "s.npz", X=np.zeros((4, 2), np.float32), y=np.zeros(4, np.int64))
    result = CliRunner().invoke(main, ["worker", "--data", str(tmp_path / "s.npz"), "--trainer", "nosuch.module:Thing"])
    assert result.exit_code == 1 and "nosuch" in result.output


def test_data_split_writes_shards_and_manifest(tmp_path: Path) -> None:
    import json

    out = tmp_path / "s"
    result = CliRunner().invoke(main, ["data", "split", "--dataset", "digits", "--workers", "10", "--partition", "dirichlet",
                                       "--alpha", "0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    sizes = [w["size"] for w in manifest["workers"]]
    assert sum(sizes) == 1437 and len(sizes) == 10
    hists = [w["label_histogram"] for w in manifest["workers"]]
    assert max(max(h) / max(1, sum(h)) for h in hists) > 0.3  # skewed, as Dirichlet 0.5 should be


@pytest.mark.parametrize("args,needle", [
    (["--dataset", "mnist"], "unknown dataset"),
    (["--data", "/nonexistent/file.npz"], "file.npz"),
    (["--dataset", "iris", "--workers", "500"], "worker"),
])
def test_data_split_bad_input(tmp_path: Path, args: list[str], needle: str) -> None:
    full = ["data", "split", "--workers", "2", "--out", str(tmp_path / "o"), *args]
    result = CliRunner().invoke(main, full)
    assert result.exit_code == 1, result.output
    assert needle in result.output.lower() and "Traceback" not in result.output
