"""A custom numpy trainer: softmax regression written against fedmq's trainer protocol.

This is what a trainer that is not PyTorch or scikit-learn looks like: a class with
``spec_from`` (its --trainer-config keys and the data's shape -> the spec every model carries),
``init_params``, ``fit`` and ``evaluate``. Run it with
``--trainer examples/numpy-custom/trainer.py:SoftmaxRegression``.
"""

from __future__ import annotations

import numpy as np

from fedmq.shared.spec import check_device, check_keys
from fedmq.shared.trainer import FitResult

NAME = "examples/numpy-custom/trainer.py:SoftmaxRegression"


class SoftmaxRegression:
    """Multinomial logistic regression with an L2 penalty (``--trainer-config l2=0.001``)."""

    KEYS = ("l2", "seed", "device")

    @classmethod
    def spec_from(cls, config: dict, *, input_shape: tuple[int, ...], num_classes: int, seed: int) -> dict:
        check_keys(config, cls.KEYS, NAME)
        check_device(config.get("device", "auto"), "this numpy trainer", ("auto", "cpu"))
        l2 = config.get("l2", 1e-3)
        if isinstance(l2, bool) or not isinstance(l2, (int, float)) or l2 < 0:
            raise ValueError(f"l2 must be a number >= 0, got {l2!r}")
        return {"features": int(np.prod(input_shape)), "num_classes": int(num_classes), "l2": float(l2),
                "seed": int(config.get("seed", seed))}

    def __init__(self, spec: dict) -> None:
        self.features, self.classes = int(spec["features"]), int(spec["num_classes"])
        self.l2, self.seed = float(spec["l2"]), int(spec["seed"])

    def init_params(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        return {"W": (rng.standard_normal((self.features, self.classes)) * 0.01).astype(np.float32),
                "b": np.zeros(self.classes, np.float32)}

    @staticmethod
    def _probs(W: np.ndarray, b: np.ndarray, X: np.ndarray) -> np.ndarray:
        z = X @ W + b
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def fit(self, params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray, *, epochs: int,
            batch_size: int, lr: float, mu: float = 0.0, seed: int = 0) -> FitResult:
        W, b = params["W"].astype(np.float32), params["b"].astype(np.float32)  # copies: inputs stay as they are
        W0, b0 = params["W"], params["b"]
        flat = X.reshape(len(X), -1)
        onehot = np.eye(self.classes, dtype=np.float32)[y]
        rng = np.random.default_rng(seed)
        for _ in range(epochs):
            order = rng.permutation(len(flat))
            for start in range(0, len(flat), batch_size):
                idx = order[start:start + batch_size]
                err = (self._probs(W, b, flat[idx]) - onehot[idx]) / len(idx)
                W -= lr * (flat[idx].T @ err + self.l2 * W + mu * (W - W0))
                b -= lr * (err.sum(axis=0) + mu * (b - b0))
        loss, accuracy = self.evaluate({"W": W, "b": b}, X, y)
        return FitResult({"W": W, "b": b}, len(y), loss, accuracy)

    def evaluate(self, params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        p = self._probs(params["W"], params["b"], X.reshape(len(X), -1))
        loss = float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean()) if len(y) else 0.0
        return loss, float((p.argmax(axis=1) == y).mean()) if len(y) else 0.0
