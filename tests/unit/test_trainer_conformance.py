"""The conformance suite every trainer passes: the numpy MLP, fedmq.torch, fedmq.sklearn and the
custom numpy trainer of examples/numpy-custom.

Each trainer is built the way a run builds it: its factory's ``spec_from`` (or the default)
makes the spec from a configuration and the data's sample shape and classes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmq.shared.spec import build_spec, resolve_ref
from fedmq.shared.trainer import FitResult, MLPTrainer, Trainer
from tests.helpers import require_torch

ROOT = Path(__file__).resolve().parents[2]
CNN = f"{ROOT}/examples/pytorch-cnn/model.py:make_cnn"
CUSTOM = f"{ROOT}/examples/numpy-custom/trainer.py:SoftmaxRegression"


def toy(shape: tuple[int, ...], n: int = 240, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A separable problem: each class is a well separated blob, samples of ``shape``."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    centres = rng.standard_normal((classes, d)) * 3.0
    y = rng.integers(0, classes, n)
    X = centres[y] + rng.standard_normal((n, d)) * 0.5
    return X.reshape(n, *shape).astype(np.float32), y.astype(np.int64)


def _torch_factory() -> Any:
    require_torch()
    from fedmq.torch import TorchTrainer

    return TorchTrainer


def _sklearn_factory() -> Any:
    from fedmq.sklearn import SklearnTrainer

    return SklearnTrainer


#: name -> (factory loader, its --trainer-config, sample shape, lr)
TRAINERS: dict[str, tuple[Callable[[], Any], dict[str, Any], tuple[int, ...], float]] = {
    "numpy-mlp": (lambda: MLPTrainer, {"hidden": [16]}, (8,), 0.1),
    "numpy-mlp-images": (lambda: MLPTrainer, {"hidden": [16]}, (1, 8, 8), 0.1),
    "torch-cnn": (_torch_factory, {"module": CNN, "module_kwargs": {"channels": 4}}, (1, 8, 8), 0.05),
    "sklearn-sgd": (_sklearn_factory, {}, (8,), 0.01),
    "numpy-custom": (lambda: resolve_ref(CUSTOM, "trainer"), {}, (8,), 0.1),
}


@pytest.fixture(params=list(TRAINERS))
def case(request: pytest.FixtureRequest) -> tuple[Trainer, dict, tuple[int, ...], float]:
    load, config, shape, lr = TRAINERS[request.param]
    factory = load()
    spec = build_spec(factory, config, input_shape=shape, num_classes=3, seed=7)
    return factory(spec), spec, shape, lr


def fit(trainer: Trainer, params: dict, X: np.ndarray, y: np.ndarray, lr: float, seed: int = 1, mu: float = 0.0,
        epochs: int = 3) -> FitResult:
    return trainer.fit(params, X, y, epochs=epochs, batch_size=16, lr=lr, mu=mu, seed=seed)


def test_init_is_deterministic_from_the_spec(case: Any) -> None:
    trainer, spec, _, _ = case
    first = trainer.init_params()
    again = type(trainer)(dict(spec)).init_params()  # a new trainer from the same spec (another process)
    assert list(first) == list(again) and first
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
        assert first[name].dtype == np.float32


def test_fit_does_not_mutate_its_inputs_and_keeps_names_shapes_dtypes(case: Any) -> None:
    trainer, _, shape, lr = case
    X, y = toy(shape)
    params = trainer.init_params()
    for arr in params.values():
        arr.flags.writeable = False  # as decoded from the wire
    before = {k: v.copy() for k, v in params.items()}
    X_before, y_before = X.copy(), y.copy()
    result = fit(trainer, params, X, y, lr)
    for name, value in before.items():
        np.testing.assert_array_equal(params[name], value)
    np.testing.assert_array_equal(X, X_before)
    np.testing.assert_array_equal(y, y_before)
    assert isinstance(result, FitResult) and result.num_samples == len(y)
    assert list(result.params) == list(params)
    for name, value in params.items():
        assert result.params[name].shape == value.shape and result.params[name].dtype == value.dtype == np.float32
        assert np.all(np.isfinite(result.params[name]))


def test_evaluate_is_finite_and_a_fit_on_a_separable_toy_improves_accuracy(case: Any) -> None:
    trainer, _, shape, lr = case
    X, y = toy(shape)
    X_test, y_test = toy(shape, n=120, seed=0)  # the same blobs: seed 0 draws the same centres
    params = trainer.init_params()
    loss0, acc0 = trainer.evaluate(params, X_test, y_test)
    assert np.isfinite(loss0) and 0.0 <= acc0 <= 1.0
    result = fit(trainer, params, X, y, lr)
    loss1, acc1 = trainer.evaluate(result.params, X_test, y_test)
    assert np.isfinite(loss1) and acc1 >= 0.9 and (acc1 > acc0 or loss1 < loss0), (acc0, acc1, loss0, loss1)
    assert np.isfinite(result.loss) and 0.0 <= result.accuracy <= 1.0


def test_fit_is_reproducible_from_its_seed(case: Any) -> None:
    trainer, _, shape, lr = case
    X, y = toy(shape)
    params = trainer.init_params()
    a = fit(trainer, params, X, y, lr, seed=5)
    a_params = {k: v.copy() for k, v in a.params.items()}
    b = fit(trainer, params, X, y, lr, seed=5)
    for name in a_params:
        np.testing.assert_array_equal(a_params[name], b.params[name])


def test_a_fedprox_mu_pulls_the_weights_towards_the_reference(case: Any) -> None:
    trainer, spec, shape, lr = case
    if "estimator" in spec:
        pytest.skip("the scikit-learn trainer has no FedProx term (it fails a task with mu > 0)")
    X, y = toy(shape)
    params = trainer.init_params()

    def moved(mu: float) -> float:
        out = fit(trainer, params, X, y, lr, mu=mu, epochs=5).params
        return float(sum(np.sum((out[k].astype(np.float64) - params[k]) ** 2) for k in params))

    free, prox = moved(0.0), moved(2.0)
    assert prox < 0.7 * free, (free, prox)


def test_the_sklearn_trainer_refuses_mu_rather_than_ignoring_it() -> None:
    trainer = _sklearn_factory()(build_spec(_sklearn_factory(), {}, input_shape=(8,), num_classes=3, seed=0))
    X, y = toy((8,))
    with pytest.raises(ValueError, match="no FedProx term"):
        fit(trainer, trainer.init_params(), X, y, 0.01, mu=0.1)
