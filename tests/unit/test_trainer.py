"""Unit tests for shared.trainer (interface, MLPTrainer, factory loading) and bench.standin."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest

from bench.standin import NoiseTrainer, noise_spec
from fedmq.shared.data import load_dataset
from fedmq.shared.errors import ConfigError
from fedmq.shared.nn import mlp_param_shapes
from fedmq.shared.trainer import (
    DEFAULT_TRAINER,
    FitResult,
    MLPTrainer,
    Trainer,
    load_trainer_factory,
    mlp_spec,
)


@pytest.fixture(scope="module")
def wine():
    return load_dataset("wine", seed=0)


def test_mlp_spec_is_json_able_with_lists():
    spec = mlp_spec(13, 3, hidden=(8, 4), activation="tanh", momentum=0.5, seed=2)
    assert json.loads(json.dumps(spec)) == spec
    assert spec["hidden"] == [8, 4]


def test_mlp_trainer_fit_improves_and_does_not_mutate_inputs(wine):
    trainer = MLPTrainer(mlp_spec(13, 3, hidden=[16], seed=0))
    assert isinstance(trainer, Trainer)
    params = trainer.init_params()
    before = {k: v.copy() for k, v in params.items()}
    X, y = wine.X_train.copy(), wine.y_train.copy()
    loss0, acc0 = trainer.evaluate(params, wine.X_test, wine.y_test)
    result = trainer.fit(params, X, y, epochs=20, batch_size=16, lr=0.1, mu=0.01, seed=0)
    assert isinstance(result, FitResult)
    assert result.num_samples == len(y)
    loss1, acc1 = trainer.evaluate(result.params, wine.X_test, wine.y_test)
    assert acc1 > acc0 and acc1 >= 0.9 and loss1 < loss0
    assert 0.0 <= result.accuracy <= 1.0 and np.isfinite(result.loss)
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
    np.testing.assert_array_equal(X, wine.X_train)
    np.testing.assert_array_equal(y, wine.y_train)
    assert set(result.params) == set(params)
    assert all(result.params[k].shape == params[k].shape for k in params)


def test_mlp_trainer_is_deterministic(wine):
    trainer = MLPTrainer(mlp_spec(13, 3, seed=1, momentum=0.9))
    p = trainer.init_params()
    a = trainer.fit(p, wine.X_train, wine.y_train, epochs=2, batch_size=8, lr=0.01, mu=0.0, seed=5)
    b = trainer.fit(p, wine.X_train, wine.y_train, epochs=2, batch_size=8, lr=0.01, mu=0.0, seed=5)
    for k in p:
        np.testing.assert_array_equal(a.params[k], b.params[k])


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"input_dim": 4, "num_classes": 3, "layers": [4]}, "unknown key 'layers'"),
        ({"num_classes": 3}, "missing required key 'input_dim'"),
        ({"input_dim": 4}, "missing required key 'num_classes'"),
        ({"input_dim": 0, "num_classes": 3}, "input_dim"),
        ({"input_dim": 4, "num_classes": 3, "hidden": "64"}, "hidden"),
        ({"input_dim": 4, "num_classes": 3, "activation": "gelu"}, "sigmoid, tanh, relu"),
        ({"input_dim": 4, "num_classes": 3, "momentum": 1.5}, "momentum"),
    ],
)
def test_mlp_trainer_rejects_bad_specs(spec, match):
    with pytest.raises(ConfigError, match=match):
        MLPTrainer(spec)


def test_load_default_trainer_factory():
    factory = load_trainer_factory(DEFAULT_TRAINER)
    assert factory is MLPTrainer
    assert isinstance(factory(mlp_spec(4, 3)), Trainer)


def test_load_function_factory(tmp_path, monkeypatch):
    (tmp_path / "my_plugin.py").write_text(
        "from bench.standin import NoiseTrainer\n"
        "def make(spec):\n    return NoiseTrainer(spec)\n"
        "class Holder:\n    make = staticmethod(make)\n"
        "NOT_CALLABLE = 3\n"
        "raise_on_import = False\n"
    )
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert isinstance(load_trainer_factory("my_plugin:make")(noise_spec([3, 2])), NoiseTrainer)
        assert load_trainer_factory("my_plugin:Holder.make") is not None
        with pytest.raises(ConfigError, match="not a class or function"):
            load_trainer_factory("my_plugin:NOT_CALLABLE")
        with pytest.raises(ConfigError, match="no attribute 'missing'"):
            load_trainer_factory("my_plugin:missing")
        with pytest.raises(ConfigError, match="RuntimeError: boom"):
            load_trainer_factory("broken_plugin:make")
    finally:
        sys.modules.pop("my_plugin", None)
        sys.modules.pop("broken_plugin", None)


@pytest.mark.parametrize(
    ("ref", "match"),
    [
        ("fedmq.shared.trainer.MLPTrainer", "must look like 'package.module:attr'"),
        ("a:b:c", "must look like"),
        (":MLPTrainer", "both a module and an attribute"),
        ("fedmq.shared.trainer:", "both a module and an attribute"),
        ("no_such_module_xyz:Thing", "cannot be imported"),
        ("fedmq.shared.trainer:NoSuchTrainer", "no attribute 'NoSuchTrainer'"),
        ("fedmq.shared.trainer:DEFAULT_TRAINER", "not a class or function"),
    ],
)
def test_load_trainer_factory_errors(ref, match):
    with pytest.raises(ConfigError, match=match):
        load_trainer_factory(ref)


def test_noise_trainer_shapes_and_perturbation():
    spec = noise_spec([784, 126, 10], seed=3)
    assert json.loads(json.dumps(spec)) == spec
    trainer = NoiseTrainer(spec)
    assert isinstance(trainer, Trainer)
    params = trainer.init_params()
    assert {k: v.shape for k, v in params.items()} == mlp_param_shapes([784, 126, 10])
    assert all(v.dtype == np.float32 for v in params.values())
    before = {k: v.copy() for k, v in params.items()}
    X, y = np.zeros((17, 784), dtype=np.float32), np.zeros(17, dtype=np.int64)
    result = trainer.fit(params, X, y, epochs=1, batch_size=32, lr=0.1, mu=0.0, seed=1)
    assert result.num_samples == 17 and result.loss == 0.0 and result.accuracy == 0.0
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
        assert result.params[k].shape == params[k].shape
        assert result.params[k].dtype == np.float32
        diff = result.params[k] - params[k]
        assert np.any(diff != 0)
        assert np.max(np.abs(diff)) < 1e-2
    again = trainer.fit(params, X, y, epochs=1, batch_size=32, lr=0.1, mu=0.0, seed=1)
    other = trainer.fit(params, X, y, epochs=1, batch_size=32, lr=0.1, mu=0.0, seed=2)
    np.testing.assert_array_equal(again.params["dense_0/W"], result.params["dense_0/W"])
    assert not np.array_equal(other.params["dense_0/W"], result.params["dense_0/W"])
    assert trainer.evaluate(params, X, y) == (0.0, 0.0)


def test_noise_trainer_is_fast():
    trainer = NoiseTrainer(noise_spec([784, 126, 10]))
    params = trainer.init_params()
    X, y = np.zeros((1, 784), dtype=np.float32), np.zeros(1, dtype=np.int64)
    trainer.fit(params, X, y, epochs=1, batch_size=1, lr=0.1, mu=0.0, seed=0)
    start = time.perf_counter()
    for i in range(20):
        trainer.fit(params, X, y, epochs=1, batch_size=1, lr=0.1, mu=0.0, seed=i)
    assert (time.perf_counter() - start) / 20 < 0.02


def test_noise_trainer_rejects_bad_spec_and_params():
    with pytest.raises(ConfigError, match="unknown key 'hidden'"):
        NoiseTrainer({"layers": [3, 2], "hidden": [4]})
    with pytest.raises(ConfigError, match="missing required key 'layers'"):
        NoiseTrainer({"seed": 0})
    trainer = NoiseTrainer(noise_spec([3, 2]))
    params = trainer.init_params()
    params["dense_0/W"] = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(ConfigError, match=r"dense_0/W.*\(2, 3\).*\(3, 2\)"):
        trainer.fit(
            params, np.zeros((1, 3)), np.zeros(1), epochs=1, batch_size=1, lr=0.1, mu=0.0, seed=0
        )


def test_noise_trainer_accepts_an_mlp_spec():
    trainer = NoiseTrainer(mlp_spec(64, 10, hidden=[32], seed=1))
    assert {k: v.shape for k, v in trainer.init_params().items()} == mlp_param_shapes([64, 32, 10])
