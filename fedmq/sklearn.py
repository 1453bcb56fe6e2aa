"""scikit-learn linear models as fedmq trainers: :class:`SklearnTrainer`.

Any linear classifier with ``partial_fit``, ``coef_`` and ``intercept_`` works
(``SGDClassifier`` by default, ``Perceptron``, ``PassiveAggressiveClassifier``); fedmq imports
this module only when a run names it (``--trainer fedmq.sklearn:SklearnTrainer``). Its
``--trainer-config`` keys:

``estimator``
    ``sgd`` (default: ``sklearn.linear_model.SGDClassifier``) or a ``module:attr`` reference to
    an estimator class.
``estimator_kwargs``
    A JSON object of its settings (default for ``sgd``: ``{"loss": "log_loss"}``). fedmq sets
    ``random_state`` (from each task's seed) and, for SGD, the learning rate: a constant
    ``eta0`` equal to the task's ``--lr``.
``seed``
    Initialisation seed (default ``--seed``); linear models start at zero, so it only matters
    to estimators that draw.

The model travels as ``coef`` (``classes x features``; ``1 x features`` for two classes, as
scikit-learn keeps it) and ``intercept``, float32. Samples of any shape are flattened. ``fit``
runs ``epochs`` passes of ``partial_fit`` over the shuffled shard in mini-batches, with every
class declared, so a shard that lacks some classes still trains the whole model. The FedProx
term is not supported (``mu > 0`` fails the task with a reason).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedmq.shared.errors import ConfigError
from fedmq.shared.spec import DEVICE_KEY, check_device, check_keys, resolve_ref
from fedmq.shared.trainer import FitResult

TRAINER = "fedmq.sklearn:SklearnTrainer"
CONFIG_KEYS = ("estimator", "estimator_kwargs", "seed", DEVICE_KEY)
SPEC_KEYS = ("estimator", "estimator_kwargs", "seed", "input_shape", "num_classes")
DEFAULT_KWARGS: dict[str, dict[str, Any]] = {"sgd": {"loss": "log_loss"}}


def _estimator_class(name: str) -> Any:
    if name == "sgd":
        from sklearn.linear_model import SGDClassifier

        return SGDClassifier
    cls = resolve_ref(name, "estimator")
    if not isinstance(cls, type) or not hasattr(cls, "partial_fit"):
        raise ConfigError(f"estimator {name!r} is not an estimator class with partial_fit")
    return cls


class SklearnTrainer:
    """A fedmq trainer around a scikit-learn linear classifier (see the module doc)."""

    @classmethod
    def spec_from(cls, config: dict, *, input_shape: tuple[int, ...], num_classes: int, seed: int) -> dict:
        """The spec of a run from its configuration and the data."""
        check_keys(config, CONFIG_KEYS, TRAINER)
        check_device(config.get(DEVICE_KEY, "auto"), "scikit-learn", ("auto", "cpu"))
        estimator = config.get("estimator", "sgd")
        return {
            "estimator": estimator,
            "estimator_kwargs": config.get("estimator_kwargs", DEFAULT_KWARGS.get(estimator, {})),
            "seed": config.get("seed", seed),
            "input_shape": [int(n) for n in input_shape],
            "num_classes": int(num_classes),
        }

    def __init__(self, spec: dict) -> None:
        check_keys(spec, SPEC_KEYS, TRAINER, required=("input_shape", "num_classes"))
        self.spec = spec
        shape, classes = spec["input_shape"], spec["num_classes"]
        if not isinstance(shape, list) or not all(isinstance(n, int) and n > 0 for n in shape):
            raise ConfigError(f"spec input_shape must be a list of positive integers, got {shape!r}")
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
            raise ConfigError(f"a classifier needs at least 2 classes, the data has {classes!r}")
        self.num_features = int(np.prod(shape))
        self.classes = np.arange(classes)
        self.rows = 1 if classes == 2 else classes
        self.name = spec.get("estimator", "sgd")
        self.cls = _estimator_class(self.name)
        kwargs = spec.get("estimator_kwargs", {})
        if not isinstance(kwargs, dict):
            raise ConfigError(f"--trainer-config estimator_kwargs must be a JSON object, got {kwargs!r}")
        self.kwargs = dict(kwargs)
        try:
            self._estimator(lr=0.01, seed=0)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"estimator {self.name!r} does not take {self.kwargs}: {exc}") from None

    def _estimator(self, *, lr: float, seed: int) -> Any:
        kwargs: dict[str, Any] = {**self.kwargs, "random_state": seed}
        if self.name == "sgd":
            kwargs.setdefault("learning_rate", "constant")
            kwargs["eta0"] = lr
        est = self.cls(**kwargs)
        est._validate_params()  # unknown values fail here, not in the first fit
        return est

    def init_params(self) -> dict[str, np.ndarray]:
        """Zero weights (a linear model's loss is convex: the start does not matter)."""
        return {"coef": np.zeros((self.rows, self.num_features), np.float32),
                "intercept": np.zeros(self.rows, np.float32)}

    def _flat(self, X: np.ndarray) -> np.ndarray:
        flat = np.reshape(X, (X.shape[0], -1))
        if flat.shape[1] != self.num_features:
            raise ConfigError(f"samples have {flat.shape[1]} features, the model takes {self.num_features}")
        return flat

    def fit(self, params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray, *, epochs: int,
            batch_size: int, lr: float, mu: float = 0.0, seed: int = 0) -> FitResult:
        """``epochs`` shuffled passes of ``partial_fit`` in mini-batches, from ``params``."""
        if mu > 0:
            raise ValueError("the scikit-learn trainer has no FedProx term; run with --proximal-mu 0")
        est = self._estimator(lr=lr, seed=seed)
        # partial_fit continues from coef_/intercept_ when they are set before its first call
        est.coef_ = np.array(params["coef"], dtype=np.float64, order="C")  # copies: inputs stay
        est.intercept_ = np.array(params["intercept"], dtype=np.float64)
        flat = self._flat(X).astype(np.float64)  # the dtype of coef_: scikit-learn's SGD wants them equal
        rng = np.random.default_rng(seed)
        n = flat.shape[0]
        for _ in range(epochs):
            order = rng.permutation(n)
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                est.partial_fit(flat[idx], y[idx], classes=self.classes)
        new = {"coef": est.coef_.astype(np.float32), "intercept": est.intercept_.astype(np.float32)}
        loss, accuracy = self._measure(new, flat, y)
        return FitResult(new, int(n), loss, accuracy)

    def evaluate(self, params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Cross-entropy of the softmax of the decision values, and accuracy."""
        return self._measure(params, self._flat(X), y)

    def _measure(self, params: Mapping[str, np.ndarray], flat: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        if flat.shape[0] == 0:
            return 0.0, 0.0
        scores = flat.astype(np.float64) @ params["coef"].T.astype(np.float64) + params["intercept"]
        if self.rows == 1:
            scores = np.concatenate([np.zeros_like(scores), scores], axis=1)
        scores -= scores.max(axis=1, keepdims=True)
        log_probs = scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))
        loss = float(-log_probs[np.arange(len(y)), y].mean())
        accuracy = float((scores.argmax(axis=1) == y).mean())
        return (loss if math.isfinite(loss) else float("inf")), accuracy
