"""A small, fast numpy multilayer perceptron (the default fedmq model).

The network is a stack of dense layers ``dense_0 ... dense_{L-1}``; hidden layers use a
sigmoid, tanh or ReLU activation, the output layer is either a softmax trained with
cross-entropy or an identity trained with mean squared error over one-hot targets
(``L = 1/(2n) * sum((y - y_hat)^2)``).  Parameters are float32 and travel as an ordered
mapping ``name -> ndarray`` (``dense_0/W`` of shape ``(in, out)``, ``dense_0/b`` of shape
``(out,)``, ...), which is the unit the federated protocol averages.

Initialisation is deterministic from a seed: He et al. 2015 ("Delving Deep into
Rectifiers") normal init for ReLU hidden layers, Glorot & Bengio 2010 ("Understanding the
difficulty of training deep feedforward neural networks") uniform init otherwise.

``loss_and_grads`` optionally adds the FedProx proximal term ``(mu/2) * ||w - w_ref||^2``
over all parameters (Li et al. 2020, "Federated Optimization in Heterogeneous Networks").

The numeric core (:func:`forward_backward`) is a pure function that preserves the dtype
of its inputs, so tests can run the very same code in float64 for gradient checks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedmq.shared.errors import ConfigError, DataError, TrainingError

ACTIVATIONS: tuple[str, ...] = ("sigmoid", "tanh", "relu")
LOSSES: tuple[str, ...] = ("cross-entropy", "mse")


# ---------------------------------------------------------------------------------------
# Pure helpers: names, shapes, validation, initialisation
# ---------------------------------------------------------------------------------------


def param_names(num_layers: int) -> list[str]:
    """Parameter names of a network with ``num_layers`` dense layers, in canonical order."""
    names: list[str] = []
    for i in range(num_layers):
        names += [f"dense_{i}/W", f"dense_{i}/b"]
    return names


def mlp_param_shapes(layer_sizes: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Ordered ``name -> shape`` of an MLP with the given layer sizes (input, hidden..., output)."""
    sizes = check_layer_sizes(layer_sizes)
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        shapes[f"dense_{i}/W"] = (fan_in, fan_out)
        shapes[f"dense_{i}/b"] = (fan_out,)
    return shapes


def check_layer_sizes(layer_sizes: Sequence[int]) -> tuple[int, ...]:
    """Validate layer sizes and return them as a tuple of ints; ConfigError otherwise."""
    if isinstance(layer_sizes, (str, bytes)) or not isinstance(layer_sizes, Sequence):
        raise ConfigError(
            f"layer_sizes must be a list of positive integers like [64, 64, 10], got {layer_sizes!r}"
        )
    sizes = tuple(layer_sizes)
    if len(sizes) < 2:
        raise ConfigError(
            f"layer_sizes needs at least an input and an output size, like [64, 10], got {list(sizes)}"
        )
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
            raise ConfigError(
                f"layer_sizes must contain positive integers, got {s!r} in {list(sizes)}"
            )
    return tuple(int(s) for s in sizes)


def check_activation(activation: str) -> str:
    """Return ``activation`` if it is a known hidden-layer activation; ConfigError otherwise."""
    if activation not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}")
    return activation


def check_loss(loss: str) -> str:
    """Return ``loss`` if it is a known loss; ConfigError otherwise."""
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; use one of {', '.join(LOSSES)}")
    return loss


def init_params(
    layer_sizes: Sequence[int], activation: str = "relu", seed: int = 0
) -> dict[str, np.ndarray]:
    """Deterministic float32 initial parameters: He normal for ReLU hidden layers, Glorot uniform otherwise; zero biases."""
    sizes = check_layer_sizes(layer_sizes)
    check_activation(activation)
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {}
    last = len(sizes) - 2
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if activation == "relu" and i < last:
            w = rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
        else:
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            w = rng.uniform(-limit, limit, size=(fan_in, fan_out))
        params[f"dense_{i}/W"] = w.astype(np.float32)
        params[f"dense_{i}/b"] = np.zeros(fan_out, dtype=np.float32)
    return params


def check_params(params: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Raise ConfigError unless ``params`` has exactly the expected names and shapes."""
    if not isinstance(params, Mapping):
        raise ConfigError(f"params must be a mapping name -> array, got {type(params).__name__}")
    missing = [k for k in expected if k not in params]
    unknown = [k for k in params if k not in expected]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unknown:
            parts.append(f"unexpected {unknown}")
        raise ConfigError(
            f"params do not match the model: {'; '.join(parts)} (model expects {list(expected)})"
        )
    for name, shape in expected.items():
        got = np.shape(params[name])
        if tuple(got) != tuple(shape):
            raise ConfigError(
                f"params has layer {name!r} of shape {tuple(got)}, model expects {tuple(shape)}"
            )


# ---------------------------------------------------------------------------------------
# Pure numeric core (dtype preserving)
# ---------------------------------------------------------------------------------------


def _activate(z: np.ndarray, activation: str) -> np.ndarray:
    """Apply a hidden-layer activation in place and return ``z``."""
    if activation == "relu":
        np.maximum(z, 0, out=z)
    elif activation == "tanh":
        np.tanh(z, out=z)
    else:  # sigmoid, written via tanh: numerically stable, no overflow warnings
        np.multiply(z, 0.5, out=z)
        np.tanh(z, out=z)
        z += 1
        z *= 0.5
    return z


def _activation_grad(h: np.ndarray, activation: str) -> np.ndarray:
    """Derivative of the activation, expressed through its output ``h``."""
    if activation == "relu":
        return (h > 0).astype(h.dtype)
    if activation == "tanh":
        return 1 - h * h
    return h * (1 - h)


def _forward(
    weights: Sequence[np.ndarray], biases: Sequence[np.ndarray], X: np.ndarray, activation: str
) -> list[np.ndarray]:
    """Layer inputs ``[X, h_1, ..., h_{L-1}]`` followed by the output pre-activation ``z_L``."""
    hs = [X]
    h = X
    last = len(weights) - 1
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        z = h @ w
        z += b
        h = z if i == last else _activate(z, activation)
        hs.append(h)
    return hs


def _output_loss(z: np.ndarray, y: np.ndarray, loss: str) -> tuple[float, np.ndarray]:
    """Mean loss and its gradient w.r.t. the output pre-activation ``z``."""
    n = z.shape[0]
    rows = np.arange(n)
    if loss == "cross-entropy":
        shifted = z - z.max(axis=1, keepdims=True)
        expz = np.exp(shifted)
        sums = expz.sum(axis=1, keepdims=True)
        logp_true = shifted[rows, y] - np.log(sums[:, 0])
        value = -float(np.mean(logp_true, dtype=np.float64))
        dz = expz / sums
        dz[rows, y] -= 1
    else:
        dz = z.copy()
        dz[rows, y] -= 1
        value = 0.5 * float(np.sum(np.square(dz, dtype=np.float64))) / n
    dz /= n
    return value, dz


def _output_probs(z: np.ndarray, loss: str) -> np.ndarray:
    """Softmax of ``z`` for cross-entropy; ``z`` itself (the regression output) for mse."""
    if loss != "cross-entropy":
        return z
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _backward(
    hs: Sequence[np.ndarray],
    dz: np.ndarray,
    weights: Sequence[np.ndarray],
    activation: str,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Gradients of all weights and biases given the output gradient ``dz``."""
    num = len(weights)
    gw: list[np.ndarray] = [None] * num  # type: ignore[list-item]
    gb: list[np.ndarray] = [None] * num  # type: ignore[list-item]
    for i in range(num - 1, -1, -1):
        gw[i] = hs[i].T @ dz
        gb[i] = dz.sum(axis=0)
        if i > 0:
            dz = (dz @ weights[i].T) * _activation_grad(hs[i], activation)
    return gw, gb


def _proximal(
    weights: Sequence[np.ndarray],
    biases: Sequence[np.ndarray],
    ref_w: Sequence[np.ndarray],
    ref_b: Sequence[np.ndarray],
    gw: list[np.ndarray],
    gb: list[np.ndarray],
    mu: float,
) -> float:
    """Add the FedProx gradient ``mu * (w - w_ref)`` in place and return ``(mu/2)*||w - w_ref||^2``."""
    total = 0.0
    for params, refs, grads in ((weights, ref_w, gw), (biases, ref_b, gb)):
        for k, (p, r) in enumerate(zip(params, refs, strict=True)):
            d = p - r
            total += float(np.sum(np.square(d, dtype=np.float64)))
            grads[k] = grads[k] + mu * d
    return 0.5 * mu * total


def forward_backward(
    params: Mapping[str, np.ndarray],
    X: np.ndarray,
    y: np.ndarray,
    *,
    activation: str = "relu",
    loss: str = "cross-entropy",
    mu: float = 0.0,
    ref: Mapping[str, np.ndarray] | None = None,
) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and gradients of an MLP given by ``params``; preserves the dtype of the inputs.

    ``params`` must be named ``dense_<i>/W`` / ``dense_<i>/b`` for consecutive ``i``;
    ``y`` are integer labels. With ``mu > 0`` the FedProx term ``(mu/2)||w - ref||^2`` is added.
    """
    num = len(params) // 2
    weights = [params[f"dense_{i}/W"] for i in range(num)]
    biases = [params[f"dense_{i}/b"] for i in range(num)]
    hs = _forward(weights, biases, X, activation)
    value, dz = _output_loss(hs[-1], y, loss)
    gw, gb = _backward(hs, dz, weights, activation)
    if mu > 0:
        if ref is None:
            raise ConfigError("mu > 0 needs ref, the reference (global) parameters of FedProx")
        ref_w = [ref[f"dense_{i}/W"] for i in range(num)]
        ref_b = [ref[f"dense_{i}/b"] for i in range(num)]
        value += _proximal(weights, biases, ref_w, ref_b, gw, gb, mu)
    grads: dict[str, np.ndarray] = {}
    for i in range(num):
        grads[f"dense_{i}/W"] = gw[i]
        grads[f"dense_{i}/b"] = gb[i]
    return value, grads


def _check_xy(
    X: np.ndarray, y: np.ndarray, num_inputs: int, num_outputs: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return float32 X (n, num_inputs) and int64 y (n,) or raise DataError naming the problem."""
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 2 or X.shape[1] != num_inputs:
        raise DataError(
            f"X has shape {X.shape}, model expects (n, {num_inputs}) (n samples of {num_inputs} features)"
        )
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise DataError(
            f"y has shape {y.shape}, expected ({X.shape[0]},): one integer label per row of X"
        )
    if X.shape[0] == 0:
        raise DataError("X and y are empty; need at least one sample")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"y must hold integer class labels, got dtype {y.dtype}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_outputs:
        raise DataError(
            f"labels must be in 0..{num_outputs - 1} for a model with {num_outputs} outputs, got range {lo}..{hi}"
        )
    return np.ascontiguousarray(X, dtype=np.float32), y.astype(np.int64, copy=False)


# ---------------------------------------------------------------------------------------
# The model object
# ---------------------------------------------------------------------------------------


class MLP:
    """Dense network with float32 parameters, trained by mini-batch SGD (optionally with momentum and FedProx)."""

    def __init__(
        self,
        layer_sizes: Sequence[int],
        activation: str = "relu",
        loss: str = "cross-entropy",
        seed: int = 0,
    ) -> None:
        self.layer_sizes = check_layer_sizes(layer_sizes)
        self.activation = check_activation(activation)
        self.loss = check_loss(loss)
        self.seed = seed
        params = init_params(self.layer_sizes, activation, seed)
        num = len(self.layer_sizes) - 1
        self._weights = [params[f"dense_{i}/W"] for i in range(num)]
        self._biases = [params[f"dense_{i}/b"] for i in range(num)]

    # -- parameters ---------------------------------------------------------------------

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Ordered ``name -> shape`` of the parameters."""
        return mlp_param_shapes(self.layer_sizes)

    @property
    def num_params(self) -> int:
        """Total number of scalar parameters."""
        return int(sum(w.size + b.size for w, b in zip(self._weights, self._biases, strict=True)))

    def _params_view(self) -> dict[str, np.ndarray]:
        """Parameters without copying (internal use only)."""
        out: dict[str, np.ndarray] = {}
        for i, (w, b) in enumerate(zip(self._weights, self._biases, strict=True)):
            out[f"dense_{i}/W"] = w
            out[f"dense_{i}/b"] = b
        return out

    def get_params(self) -> dict[str, np.ndarray]:
        """Copies of the parameters as an ordered ``name -> float32 array`` dict."""
        return {k: v.copy() for k, v in self._params_view().items()}

    def set_params(self, params: Mapping[str, np.ndarray]) -> None:
        """Replace the parameters with float32 copies of ``params`` (exact names and shapes required)."""
        check_params(params, self.param_shapes())
        num = len(self._weights)
        try:
            weights = [np.array(params[f"dense_{i}/W"], dtype=np.float32) for i in range(num)]
            biases = [np.array(params[f"dense_{i}/b"], dtype=np.float32) for i in range(num)]
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"params must hold numeric arrays: {exc}") from None
        self._weights, self._biases = weights, biases

    # -- training -----------------------------------------------------------------------

    def _ref_lists(
        self, ref: Mapping[str, np.ndarray]
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        check_params(ref, self.param_shapes())
        num = len(self._weights)
        ref_w = [np.asarray(ref[f"dense_{i}/W"], dtype=np.float32) for i in range(num)]
        ref_b = [np.asarray(ref[f"dense_{i}/b"], dtype=np.float32) for i in range(num)]
        return ref_w, ref_b

    def loss_and_grads(
        self,
        X: np.ndarray,
        y: np.ndarray,
        *,
        mu: float = 0.0,
        ref: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[float, dict[str, np.ndarray]]:
        """Mean loss over ``(X, y)`` (plus the FedProx term when ``mu > 0``) and its gradients."""
        X, y = _check_xy(X, y, self.layer_sizes[0], self.layer_sizes[-1])
        mu = _check_mu(mu, ref)
        if mu > 0:
            assert ref is not None
            ref_w, ref_b = self._ref_lists(ref)
            ref = {
                **{f"dense_{i}/W": w for i, w in enumerate(ref_w)},
                **{f"dense_{i}/b": b for i, b in enumerate(ref_b)},
            }
        return forward_backward(
            self._params_view(), X, y, activation=self.activation, loss=self.loss, mu=mu, ref=ref
        )

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        momentum: float = 0.0,
        mu: float = 0.0,
        ref: Mapping[str, np.ndarray] | None = None,
        seed: int = 0,
    ) -> float:
        """Mini-batch SGD in place; returns the mean data loss (without the FedProx term) of the last epoch.

        Each epoch visits the samples in a fresh permutation drawn from ``default_rng(seed)``.
        Momentum is the classical heavy ball: ``v = momentum*v + g; w -= lr*v``.
        """
        X, y = _check_xy(X, y, self.layer_sizes[0], self.layer_sizes[-1])
        if not np.all(np.isfinite(X)):
            raise DataError("X contains NaN or Inf values; clean or impute the features first")
        _check_sgd(epochs, batch_size, lr, momentum)
        mu = _check_mu(mu, ref)
        ref_w: list[np.ndarray] = []
        ref_b: list[np.ndarray] = []
        if mu > 0:
            assert ref is not None
            ref_w, ref_b = self._ref_lists(ref)
        rng = np.random.default_rng(seed)
        n = X.shape[0]
        weights, biases = self._weights, self._biases
        vel_w = [np.zeros_like(w) for w in weights] if momentum > 0 else []
        vel_b = [np.zeros_like(b) for b in biases] if momentum > 0 else []
        lr32 = np.float32(lr)
        epoch_loss = 0.0
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for epoch in range(epochs):
                total = 0.0
                for idx in _batches(rng.permutation(n), batch_size):
                    xb, yb = X[idx], y[idx]
                    hs = _forward(weights, biases, xb, self.activation)
                    value, dz = _output_loss(hs[-1], yb, self.loss)
                    if not math.isfinite(value):
                        raise TrainingError(
                            f"training diverged: the loss became {value} in epoch {epoch + 1}; "
                            f"lower lr (now {lr}) or standardise the features"
                        )
                    gw, gb = _backward(hs, dz, weights, self.activation)
                    if mu > 0:
                        _proximal(weights, biases, ref_w, ref_b, gw, gb, mu)
                    total += value * len(idx)
                    _sgd_step(weights, gw, vel_w, lr32, momentum)
                    _sgd_step(biases, gb, vel_b, lr32, momentum)
                epoch_loss = total / n
        return epoch_loss

    # -- inference ----------------------------------------------------------------------

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities (softmax) for cross-entropy models; raw outputs for mse models."""
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.layer_sizes[0]:
            raise DataError(f"X has shape {X.shape}, model expects (n, {self.layer_sizes[0]})")
        X = np.ascontiguousarray(X, dtype=np.float32)
        z = _forward(self._weights, self._biases, X, self.activation)[-1]
        return _output_probs(z, self.loss)

    def evaluate(self, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """``(mean loss, accuracy)`` on ``(X, y)``; the loss excludes any FedProx term."""
        X, y = _check_xy(X, y, self.layer_sizes[0], self.layer_sizes[-1])
        z = _forward(self._weights, self._biases, X, self.activation)[-1]
        value, _ = _output_loss(z, y, self.loss)
        accuracy = float(np.mean(np.argmax(z, axis=1) == y))
        return value, accuracy


def _batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Consecutive slices of ``order`` of at most ``batch_size`` indices."""
    return [order[i : i + batch_size] for i in range(0, order.shape[0], batch_size)]


def _sgd_step(
    params: list[np.ndarray],
    grads: list[np.ndarray],
    vel: list[np.ndarray],
    lr: np.float32,
    momentum: float,
) -> None:
    """One in-place SGD (or heavy-ball momentum) update."""
    if momentum > 0:
        m = np.float32(momentum)
        for p, g, v in zip(params, grads, vel, strict=True):
            v *= m
            v += g
            p -= lr * v
    else:
        for p, g in zip(params, grads, strict=True):
            p -= lr * g


def _check_mu(mu: float, ref: Mapping[str, np.ndarray] | None) -> float:
    """Validate the FedProx coefficient."""
    if not np.isfinite(mu) or mu < 0:
        raise ConfigError(f"mu (FedProx coefficient) must be a finite number >= 0, got {mu}")
    if mu > 0 and ref is None:
        raise ConfigError("mu > 0 needs ref, the reference (global) parameters of FedProx")
    return float(mu)


def _check_sgd(epochs: int, batch_size: int, lr: float, momentum: float) -> None:
    """Validate SGD hyper-parameters with messages saying what to fix."""
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ConfigError(f"epochs must be an integer >= 1, got {epochs!r}")
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < 1
    ):
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not np.isfinite(lr) or lr <= 0:
        raise ConfigError(f"lr must be a finite number > 0, got {lr!r}")
    if not np.isfinite(momentum) or not 0 <= momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {momentum!r}")
