"""The attacks a hostile worker mounts (fedmq.worker.attack), alone and in the task path."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedmq.shared import messages
from fedmq.shared.errors import ConfigError
from fedmq.shared.trainer import FitResult, MLPTrainer
from fedmq.worker.attack import ATTACKS, Attack, make_attack
from fedmq.worker.task import Done, TaskRunner

SPEC = {"input_dim": 8, "num_classes": 3, "hidden": [5]}


def model() -> messages.ModelVersion:
    return messages.ModelVersion(version=2, params=MLPTrainer(SPEC).init_params(), spec=SPEC)


def task(kind: str) -> messages.Task:
    return messages.Task(task_id="t1", version=None, mode="async", epochs=1, batch_size=16, lr=0.1, mu=0.0, seed=3,
                         run_id="run-7", update_kind=kind)


class Recorder:
    """A trainer factory: fit adds 1 to every weight and remembers the labels it was given."""

    def __init__(self) -> None:
        self.labels: list[np.ndarray] = []

    def __call__(self, spec: dict) -> Any:
        outer = self

        class T:
            def fit(self, params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray, **kw: Any) -> FitResult:
                outer.labels.append(y)
                return FitResult({k: v + np.float32(1) for k, v in params.items()}, len(y), 0.5, 0.75)

        return T()


def run(attack: Attack | None, kind: str, factory: Any = None) -> tuple[messages.Update, messages.ModelVersion]:
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((40, 8)).astype(np.float32), rng.integers(0, 3, 40).astype(np.int64)
    m = model()
    out = TaskRunner(factory or Recorder(), X, y, "w0", attack=attack).run(task(kind), m)
    assert isinstance(out, Done)
    return out.update, m


@pytest.mark.parametrize("kind", ["delta", "weights"])
def test_sign_flip_and_scale_send_a_multiple_of_the_honest_delta(kind: str) -> None:
    for attack, factor in [(Attack("sign-flip", 10.0), -10.0), (Attack("scale", 3.0), 3.0)]:
        update, m = run(attack, kind)
        for name, base in m.params.items():
            delta = update.params[name] if kind == "delta" else update.params[name] - base
            np.testing.assert_allclose(delta, factor * np.ones_like(base), rtol=1e-5, atol=1e-5)
            assert update.params[name].dtype == np.float32 and update.params[name].shape == base.shape
        assert update.num_samples == 40 and update.kind == kind  # it looks like any other update


def test_gauss_sends_seeded_noise_of_the_given_spread() -> None:
    a, _ = run(Attack("gauss", 2.0), "delta")
    b, _ = run(Attack("gauss", 2.0), "delta")
    values = np.concatenate([v.ravel() for v in a.params.values()])
    assert abs(values.std() - 2.0) < 0.4 and abs(values.mean()) < 0.4
    for name in a.params:  # the same task gives the same update
        np.testing.assert_array_equal(a.params[name], b.params[name])


def test_label_flip_trains_on_flipped_labels() -> None:
    rec = Recorder()
    update, m = run(Attack("label-flip"), "delta", rec)
    honest = Recorder()
    run(None, "delta", honest)
    np.testing.assert_array_equal(rec.labels[0], 2 - honest.labels[0])
    for name, base in m.params.items():
        np.testing.assert_allclose(update.params[name], np.ones_like(base))  # the trained delta, untouched


def test_an_honest_worker_is_untouched_and_inputs_are_never_changed() -> None:
    base = {"w": np.arange(4, dtype=np.float32)}
    trained = {"w": np.arange(4, dtype=np.float32) + 1}
    for v in (*base.values(), *trained.values()):
        v.flags.writeable = False
    for kind in ATTACKS:
        out = Attack(kind).tamper(trained, base, delta=False, seed=1)
        assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(Attack("sign-flip", 1.0).tamper(trained, base, delta=False, seed=1)["w"],
                                  base["w"] - 1)
    update, m = run(None, "weights")
    for name, base_value in m.params.items():
        np.testing.assert_allclose(update.params[name], base_value + 1)


def test_bad_attacks_are_config_errors() -> None:
    assert make_attack(None) is None
    with pytest.raises(ConfigError, match="unknown attack 'flip'"):
        make_attack("flip")
    with pytest.raises(ConfigError, match="--attack-scale must be a positive number"):
        make_attack("scale", 0.0)


def test_run_picks_the_first_workers_as_attackers_and_checks_its_flags() -> None:
    import click

    from fedmq.runner import attackers

    assert attackers({"attackers": 0.2, "attack": "sign-flip"}, 10) == [0, 1]
    assert attackers({"attackers": 0.25, "attack": "gauss"}, 4) == [0]
    assert attackers({"attackers": 0.0, "attack": None}, 10) == []
    with pytest.raises(click.UsageError, match="--attackers needs --attack KIND"):
        attackers({"attackers": 0.2, "attack": None}, 10)
    with pytest.raises(click.UsageError, match="--attack needs --attackers FRACTION"):
        attackers({"attackers": 0.0, "attack": "scale"}, 10)


def test_run_records_who_attacked_in_history(tmp_path: Any) -> None:
    import json

    from fedmq.runner import record_attack

    (tmp_path / "history.json").write_text(json.dumps({"config": {"robust": "median"}, "final": {}}))
    record_attack({"attackers": 0.2, "attack": "sign-flip", "attack_scale": 10.0}, tmp_path, 10)
    doc = json.loads((tmp_path / "history.json").read_text())
    assert doc["config"] == {"robust": "median", "attack": {"kind": "sign-flip", "scale": 10.0, "fraction": 0.2,
                                                            "workers": ["w0", "w1"]}}
