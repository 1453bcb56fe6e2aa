"""The one list of aggregator options: AggregatorConfig's fields, and the commands built from them."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest

from fedmq import options
from fedmq.aggregator import config as config_module
from fedmq.aggregator.config import AggregatorConfig
from fedmq.cli import main
from fedmq.options import (
    AGGREGATOR_ONLY,
    AGGREGATOR_OPTION_DETAILS,
    NOT_OPTIONS,
    aggregator_argv,
    config_fields,
)
from tests.helpers import readme_config

#: options every command that talks to a broker takes besides its own
COMMON = {"config", "amqp_url", "namespace", "log_level", "log_format",
          "tls_ca", "tls_cert", "tls_key", "tls_external", "tls_no_verify_hostname"}
FIELDS = {f.name for f in dataclasses.fields(AggregatorConfig)}


def params(command: str) -> dict[str, click.Parameter]:
    return {p.name: p for p in main.commands[command].params if p.name}


def parse(command: str, args: list[str]) -> dict[str, Any]:
    ctx = main.commands[command].make_context(command, list(args), auto_envvar_prefix=f"FEDMQ_{command.upper()}")
    return dict(ctx.params)


def test_every_field_is_an_aggregator_option_and_every_option_a_field() -> None:
    names = set(params("aggregator")) - COMMON
    assert names == FIELDS - NOT_OPTIONS, (
        f"fields without an option: {sorted(FIELDS - NOT_OPTIONS - names)}; "
        f"options without a field: {sorted(names - FIELDS)}"
    )


def test_run_takes_every_field_but_the_aggregator_only_ones() -> None:
    run = params("run")
    shared = FIELDS - NOT_OPTIONS - AGGREGATOR_ONLY
    assert shared <= set(run), f"fields `fedmq run` lacks: {sorted(shared - set(run))}"
    assert not (AGGREGATOR_ONLY - {"out"}) & set(run)
    assert "resume" in run and "resume" not in AGGREGATOR_ONLY  # `run --resume` continues --out
    names = [p.name for p in main.commands["run"].params]
    assert len(names) == len(set(names)), "an option defined twice"


def test_the_tables_name_only_real_fields() -> None:
    assert set(AGGREGATOR_OPTION_DETAILS) <= FIELDS, sorted(set(AGGREGATOR_OPTION_DETAILS) - FIELDS)
    assert NOT_OPTIONS <= FIELDS and AGGREGATOR_ONLY <= FIELDS


def test_option_defaults_are_the_dataclass_defaults() -> None:
    p = parse("aggregator", ["--test-data", "t.npz", "--out", "r"])
    fields = {k: v for k, v in p.items() if k in FIELDS}
    assert AggregatorConfig(**fields) == AggregatorConfig(test_data="t.npz", out="r")


def test_argv_round_trips_through_the_aggregator_command() -> None:
    values = {"mode": "async", "strategy": "fedasync", "rounds": 3, "max_updates": 50, "target_accuracy": 0.85,
              "time_limit": 12.5, "min_workers": 4, "mixing": 0.3, "staleness": "hinge", "staleness_a": 10.0,
              "staleness_b": 4.0, "max_staleness": 7, "hidden": (32, 16), "activation": "tanh", "lr": 0.05,
              "seed": 3, "trainer": "pkg.mod:Factory", "presence_timeout": 9.0, "max_update_bytes": 12345,
              "resume": True, "test_data": "ignored", "out": "ignored", "num_workers": 9}
    argv = aggregator_argv(values)
    assert "--resume" in argv  # `fedmq run --resume` reaches its aggregator
    assert "--test-data" not in argv and "--num-workers" not in argv
    p = parse("aggregator", ["--test-data", "t", "--out", "r", *argv])
    for key, value in values.items():
        if key in FIELDS and key not in AGGREGATOR_ONLY:
            assert p[key] == value, key


def test_bad_values_are_usage_errors_on_both_commands() -> None:
    for command, required in (("aggregator", ["--test-data", "t", "--out", "r"]), ("run", ["--out", "r"])):
        for bad in (["--mode", "semi"], ["--lr", "0"], ["--hidden", "64,x"], ["--strategy", "fedprox"],
                    ["--presence-timeout", "-1"]):
            with pytest.raises(click.UsageError):
                parse(command, [*required, *bad])


def test_a_new_field_becomes_an_option_on_both_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclasses.dataclass(frozen=True)
    class Grown(AggregatorConfig):
        new_knob: int | None = None
        fast_path: bool = False

    monkeypatch.setattr(config_module, "AggregatorConfig", Grown)
    for command in ("aggregator", "run"):
        built = {p.name: p for p in options.aggregator_params(command)}
        assert built["new_knob"].opts == ["--new-knob"] and built["new_knob"].type is click.INT
        assert built["fast_path"].is_flag  # type: ignore[attr-defined]
    assert aggregator_argv({"new_knob": 5, "fast_path": True}) == ["--new-knob", "5", "--fast-path"]


def test_a_field_the_command_line_cannot_express_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclasses.dataclass(frozen=True)
    class Odd(AggregatorConfig):
        weights: dict[str, float] = dataclasses.field(default_factory=dict)

    monkeypatch.setattr(config_module, "AggregatorConfig", Odd)
    with pytest.raises(TypeError, match="AggregatorConfig.weights"):
        config_fields()


def test_the_cli_loads_numpy_only_for_a_command_that_needs_it() -> None:
    """`fedmq` sets the BLAS thread variables before numpy loads; building the options must wait."""
    code = ("import sys; from click.testing import CliRunner; from fedmq.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output; "
            "r = CliRunner().invoke(main, ['broker', '--help']); assert r.exit_code == 0, r.output; "
            "print('numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---------------------------------------------------------------------------------- `run` reads like `aggregator`
def test_run_reads_the_readmes_config_like_the_aggregator_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("FEDMQ_")]:
        monkeypatch.delenv(key)
    cfg = tmp_path / "fedmq.toml"
    cfg.write_text(readme_config())
    agg = parse("aggregator", ["--config", str(cfg), "--test-data", "t", "--out", "r"])
    run = parse("run", ["--config", str(cfg), "--out", "r"])
    assert run["mode"] == "async" and run["strategy"] == "fedbuff", "fedmq run ignored the [aggregator] table"
    shared = FIELDS - NOT_OPTIONS - AGGREGATOR_ONLY
    assert {k: run[k] for k in shared} == {k: agg[k] for k in shared}
    assert run["namespace"] == agg["namespace"] == "lab"


def test_run_options_come_from_flags_env_run_table_aggregator_table_and_defaults_in_that_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("FEDMQ_")]:
        monkeypatch.delenv(key)
    cfg = tmp_path / "fedmq.toml"
    cfg.write_text("rounds = 2\nseed = 1\n"
                   "[aggregator]\nmode = 'async'\nstrategy = 'fedasync'\nrounds = 3\nlr = 0.05\ntest-data = 'x.npz'\n"
                   "[run]\nworkers = 6\ndata = 'my.csv'\nlabel-column = 'digit'\nrounds = 4\nresume = true\n")
    p = parse("run", ["--config", str(cfg), "--out", "r"])
    assert (p["num_workers"], p["data_file"], p["label_column"], p["resume"]) == (6, "my.csv", "digit", True)
    assert (p["mode"], p["strategy"], p["lr"], p["seed"]) == ("async", "fedasync", 0.05, 1)
    assert p["rounds"] == 4  # [run] over [aggregator] over the top level
    monkeypatch.setenv("FEDMQ_RUN_WORKERS", "7")
    monkeypatch.setenv("FEDMQ_RUN_DATA", "env.csv")
    monkeypatch.setenv("FEDMQ_RUN_ROUNDS", "5")
    p = parse("run", ["--config", str(cfg), "--out", "r"])
    assert (p["num_workers"], p["data_file"], p["rounds"]) == (7, "env.csv", 5)
    p = parse("run", ["--config", str(cfg), "--out", "r", "--workers", "8", "--rounds", "9"])
    assert (p["num_workers"], p["rounds"]) == (8, 9)
    for key in ("FEDMQ_RUN_WORKERS", "FEDMQ_RUN_DATA", "FEDMQ_RUN_ROUNDS"):
        monkeypatch.delenv(key)
    p = parse("run", ["--out", "r"])
    assert (p["num_workers"], p["data_file"], p["rounds"], p["resume"]) == (4, None, None, False)


def test_a_key_of_the_aggregator_table_that_no_command_takes_is_still_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "fedmq.toml"
    cfg.write_text("[aggregator]\nroundz = 3\n")
    with pytest.raises(click.BadParameter, match="unknown key 'roundz' in \\[aggregator\\]"):
        parse("run", ["--config", str(cfg), "--out", "r"])


def _all_commands(group: click.Group, path: str = "fedmq") -> list[tuple[str, click.Command]]:
    out: list[tuple[str, click.Command]] = []
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out += _all_commands(cmd, f"{path} {name}")
        else:
            out.append((f"{path} {name}", cmd))
    return out


def test_every_options_environment_variable_follows_its_flag() -> None:
    """`--workers` of `run` is FEDMQ_RUN_WORKERS, whatever the parameter is called in the code."""
    for path, cmd in _all_commands(main):
        for p in cmd.params:
            flag = options.long_flag(p)
            if flag and p.name != flag and p.envvar is None:
                assert isinstance(p, options.FlagEnvOption), f"{path} --{flag}: FEDMQ_..._{flag.upper()} would be ignored"


def test_data_split_reads_the_data_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("FEDMQ_")]:
        monkeypatch.delenv(key)
    cfg = tmp_path / "fedmq.toml"
    cfg.write_text("[data]\nworkers = 3\ndata = 'f.csv'\n")
    group = main.commands["data"]
    assert isinstance(group, click.Group)
    parent = click.Context(main, info_name="fedmq", auto_envvar_prefix="FEDMQ")
    data_ctx = click.Context(group, info_name="data", parent=parent)
    ctx = group.commands["split"].make_context("split", ["--config", str(cfg), "--out", "o"], parent=data_ctx)
    assert (ctx.params["workers"], ctx.params["data_file"]) == (3, "f.csv")
