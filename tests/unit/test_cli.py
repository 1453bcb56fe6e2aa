"""The command line without a broker: options, config files, environment, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from fedmq.broker.settings import BrokerSettings, mask_text, mask_url
from fedmq.cli import main
from fedmq.shared.errors import ConfigError
from tests.helpers import digits_csv


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


# ---------------------------------------------------------------------------------- fedmq run
def _run_namespace(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, args: list[str],
                   env: dict[str, str] | None = None) -> tuple[str, bool]:
    """What `fedmq run` hands the runner: (namespace, whether the user chose it)."""
    import fedmq.runner

    seen: list[tuple[str, bool]] = []

    def fake_run(options: dict, *, namespace_given: bool) -> int:
        seen.append((options["namespace"], namespace_given))
        return 0

    monkeypatch.setattr(fedmq.runner, "run_federation", fake_run)
    monkeypatch.delenv("FEDMQ_NAMESPACE", raising=False)
    result = CliRunner().invoke(main, ["run", "--out", str(tmp_path / "r"), *args], env=env)
    assert result.exit_code == 0, result.output
    return seen[0]


def test_run_honours_an_explicit_namespace_even_the_default_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert _run_namespace(monkeypatch, tmp_path, []) == ("fedmq", False)  # made up per run, then deleted
    assert _run_namespace(monkeypatch, tmp_path, ["--namespace", "fedmq"]) == ("fedmq", True)
    assert _run_namespace(monkeypatch, tmp_path, ["--namespace", "mine"]) == ("mine", True)
    assert _run_namespace(monkeypatch, tmp_path, [], env={"FEDMQ_NAMESPACE": "fedmq"}) == ("fedmq", True)
    cfg = tmp_path / "run.toml"
    cfg.write_text('[run]\nnamespace = "fedmq"\n')
    assert _run_namespace(monkeypatch, tmp_path, ["--config", str(cfg)]) == ("fedmq", True)


def test_run_refuses_an_invalid_aggregator_config_before_starting_anything(tmp_path: Path) -> None:
    out = tmp_path / "r"
    result = CliRunner().invoke(main, ["run", "--out", str(out), "--mode", "sync", "--strategy", "fedbuff",
                                       "--amqp-url", "amqp://guest:guest@127.0.0.1:1/"])
    assert result.exit_code == 1, result.output
    assert "fedbuff does not run in sync mode" in result.output and "Traceback" not in result.output
    assert not out.exists()  # no shards, no logs: nothing was started


def test_run_takes_label_column_and_resume(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import fedmq.runner

    seen: list[dict] = []
    monkeypatch.setattr(fedmq.runner, "run_federation", lambda options, namespace_given: seen.append(options) or 0)
    csv = tmp_path / "d.csv"
    csv.write_text("label,a\n1,2\n")
    result = CliRunner().invoke(main, ["run", "--out", str(tmp_path / "r"), "--data", str(csv), "--label-column", "label",
                                       "--resume"])
    assert result.exit_code == 0, result.output
    assert seen[0]["label_column"] == "label" and seen[0]["resume"] is True
    result = CliRunner().invoke(main, ["run", "--out", str(tmp_path / "r"), "--dataset", "digits", "--label-column", "0"])
    assert result.exit_code == 2 and "--label-column applies to a .csv file" in result.output


@pytest.mark.parametrize("column", ["digit", "0"])
def test_run_splits_a_csv_on_the_label_column_it_is_given(tmp_path: Path, column: str) -> None:
    from fedmq.runner import _split

    csv = digits_csv(tmp_path / "digits.csv")
    options = {"data_file": str(csv), "label_column": column, "seed": 0, "num_workers": 2, "partition": "iid",
               "alpha": 0.5, "shards_per_worker": 2}
    manifest = _split(options, tmp_path / "shards")
    assert manifest["num_classes"] == 10, "the label column was not the one given"
    assert manifest["num_features"] == 64


def test_data_split_label_column_by_name_or_index(tmp_path: Path) -> None:
    import json

    csv = digits_csv(tmp_path / "digits.csv")
    for column in ("digit", "0"):
        out = tmp_path / f"s-{column}"
        result = CliRunner().invoke(main, ["data", "split", "--data", str(csv), "--label-column", column,
                                           "--workers", "2", "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert json.loads((out / "manifest.json").read_text())["num_classes"] == 10
    result = CliRunner().invoke(main, ["data", "split", "--dataset", "iris", "--label-column", "0", "--workers", "2",
                                       "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--label-column" in result.output


def test_every_error_line_masks_url_passwords() -> None:
    """A URL of any scheme (mask_url knows only amqp:// and amqps://)."""
    result = CliRunner().invoke(main, ["broker", "status", "--amqp-url", "http://agg:s3cret@host/"])
    assert result.exit_code == 1 and "s3cret" not in result.output and "agg:***@host" in result.output, result.output


# ---------------------------------------------------------------------------------- fedmq plot
def fake_run(path: Path, target: float | None, staleness: list[int] | None = None) -> Path:
    import json

    path.mkdir(parents=True)
    hist = [{"version": v, "time_s": v / 10, "accuracy": 0.5 + v / 20, "loss": 1 / v, "updates_applied": 3 * v,
             "staleness_mean": 0.5} for v in range(1, 6)]
    (path / "history.json").write_text(json.dumps({"config": {"mode": "async", "strategy": "fedbuff",
                                                              "target_accuracy": target}, "history": hist,
                                                   "final": {"version": 5}}))
    if staleness is not None:
        (path / "updates.jsonl").write_text("".join(
            json.dumps({"worker_id": "w0", "fate": "applied", "staleness": s}) + "\n" for s in staleness))
    return path


def test_plot_to_an_unsupported_extension_is_one_line(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "r", None)
    result = CliRunner().invoke(main, ["plot", str(run), "-o", str(tmp_path / "z.txt")])
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and "'.txt'" in result.output and ".png" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "z.txt").exists()


def _target_lines(fig: object) -> list[tuple[float, str]]:
    ax = fig.axes[0]  # type: ignore[attr-defined]
    return [(line.get_ydata()[0], line.get_label()) for line in ax.get_lines() if line.get_linestyle() == "--"]


def test_plot_draws_each_runs_own_target_labelled_and_none_without_one(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    from fedmq.plot import build_figure

    with_target = fake_run(tmp_path / "a", 0.8, staleness=[0, 1, 1, 2])
    without = fake_run(tmp_path / "b", None)
    fig = build_figure([str(with_target)])
    assert _target_lines(fig) == [(0.8, "target accuracy 0.8")]
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "target accuracy 0.8" in labels and any("fedbuff" in x for x in labels)
    stale_ax = fig.axes[-1]
    assert "staleness" in stale_ax.get_xlabel() and stale_ax.patches, "no staleness histogram"
    plt.close(fig)
    fig = build_figure([str(without)])
    assert _target_lines(fig) == []
    plt.close(fig)
    fig = build_figure([str(without)], target=0.7)  # --target overrides
    assert _target_lines(fig) == [(0.7, "target accuracy 0.7")]
    plt.close(fig)
    result = CliRunner().invoke(main, ["plot", str(with_target), str(without), "-o", str(tmp_path / "c.svg")])
    assert result.exit_code == 0 and (tmp_path / "c.svg").stat().st_size > 1000, result.output
