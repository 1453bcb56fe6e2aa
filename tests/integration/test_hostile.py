"""Hostile participants end to end over RabbitMQ: `fedmq run` on digits with 10 workers, 2 of them
attacking, plain FedAvg against the robust rules; and differential privacy with its accountant.

Seed 2 (split and initial model) throughout; the in-process simulation in bench/robust.py gives
the same figures for these settings (see BENCHMARKS.md, "Robust aggregation").
"""

from __future__ import annotations

from pathlib import Path

import dp_accounting
import pytest

from tests.helpers import fedmq_run_ok, read_history

pytestmark = [pytest.mark.broker, pytest.mark.slow]

COMMON = ["--workers", "10", "--dataset", "digits", "--partition", "iid", "--seed", "2", "--in-process-workers",
          "--display", "plain"]
SYNC = ["--mode", "sync", "--rounds", "30"]


def fedmq_run(amqp_url: str, namespace: str, out: Path, *args: str) -> str:
    return fedmq_run_ok(amqp_url, namespace, out, *COMMON, *args)


# (name, attack flags, [(rule flags, lowest accuracy or None, highest accuracy or None)], mode flags)
SCENARIOS = [
    ("sync-sign-flip", ["--attack", "sign-flip", "--attack-scale", "10"], [
        ([], None, 0.5),  # plain FedAvg collapses (simulation: 10%)
        (["--robust", "multi-krum", "--byzantine", "2"], 0.93, None),
        (["--robust", "trimmed-mean", "--trim-fraction", "0.2"], 0.93, None),
    ], SYNC),
    ("sync-gauss", ["--attack", "gauss", "--attack-scale", "30"], [
        ([], None, 0.85),  # plain FedAvg is dragged down (simulation: 76%), though not to chance
        (["--robust", "trimmed-mean", "--trim-fraction", "0.2"], 0.93, None),
    ], SYNC),
    ("async-fedbuff-sign-flip", ["--attack", "sign-flip", "--attack-scale", "10"], [
        (["--robust", "norm-clip"], 0.90, None),  # adaptive clip: the median norm of recent deltas
    ], ["--mode", "async", "--strategy", "fedbuff", "--buffer-size", "10", "--target-accuracy", "0.9",
        "--max-updates", "800"]),
]


@pytest.mark.parametrize(("name", "attack", "runs", "mode"), SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_two_of_ten_attackers_beat_the_mean_but_not_the_robust_rules(
    amqp_url: str, namespace: str, tmp_path: Path, name: str, attack: list[str],
    runs: list[tuple[list[str], float | None, float | None]], mode: list[str],
) -> None:
    for i, (rule, low, high) in enumerate(runs):
        out = tmp_path / f"run{i}"
        fedmq_run(amqp_url, f"{namespace}-{i}", out, *mode, "--attackers", "0.2", *attack, *rule)
        hist = read_history(out)
        acc = hist["final"]["accuracy"]
        label = f"{name} {' '.join(rule) or 'mean'}: accuracy {acc}"
        if low is not None:
            assert acc >= low, label
        if high is not None:
            assert acc < high, label
        config = hist["config"]
        assert config["robust"] == (rule[1] if rule else "none")
        # the runner recorded who attacked; the aggregator was never told
        assert config["attack"] == {"kind": attack[1], "scale": float(attack[3]), "fraction": 0.2,
                                    "workers": ["w0", "w1"]}
        assert hist["counts"]["rejected"] == 0  # attacks are well-formed updates: only the rule stops them
        agg_log = (out / "logs" / "aggregator.log").read_text()
        assert "attack" not in agg_log
        workers_log = (out / "logs" / "workers.log").read_text()
        assert workers_log.count(f"attacks: --attack {attack[1]}") == 2


def test_dp_fedavg_reaches_90_percent_and_reports_the_accountants_epsilon(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    output = fedmq_run(amqp_url, namespace, out, "--mode", "sync", "--rounds", "50", "--dp-clip", "0.5",
                       "--dp-noise", "1", "--dp-delta", "1e-5")
    hist = read_history(out)
    assert hist["final"]["accuracy"] >= 0.90, hist["final"]
    assert len(hist["history"]) == 50
    for entry in hist["history"]:  # every version says what it spent so far
        accountant = dp_accounting.rdp.RdpAccountant()
        accountant.compose(dp_accounting.GaussianDpEvent(1.0), entry["version"])
        assert entry["dp_epsilon"] == accountant.get_epsilon(1e-5), entry
        assert entry["dp_steps"] == entry["version"] and entry["dp_delta"] == 1e-5
    assert hist["final"]["dp_epsilon"] == hist["history"][-1]["dp_epsilon"]
    assert f"epsilon = {hist['final']['dp_epsilon']:.4g} at delta = 1e-05" in output
