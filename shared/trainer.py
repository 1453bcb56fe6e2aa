"""The plug-in trainer interface: how users bring their own model to fedmq.

A *trainer factory* is any callable ``factory(spec: dict) -> Trainer``. ``spec`` is a
JSON-like dict describing the architecture; it travels with every model version so that
each worker and the aggregator build the same model. A trainer only ever sees and returns
full parameter sets (``name -> ndarray``), which the framework averages (FedAvg,
McMahan et al. 2017) or mixes asynchronously. ``mu`` is the FedProx proximal coefficient
(Li et al. 2020); trainers that do not support it may ignore it when it is 0.

Factories are referenced as ``"package.module:attr"`` strings (``attr`` may be a class or
a function, dotted for nested attributes; the module may also be a ``path/file.py``) and
resolved by :func:`load_trainer_factory`. A factory builds its spec from its own
configuration and the data's shape (``spec_from``, see :mod:`fedmq.shared.spec`).
``X`` has any rank: ``(n, d)`` vectors or, e.g., ``(n, 1, 8, 8)`` images; a trainer that
takes vectors flattens it (the MLP does).
The default is :class:`MLPTrainer`, a thin adapter around :class:`fedmq.shared.nn.MLP`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fedmq.shared.defaults import DEFAULT_TRAINER as DEFAULT_TRAINER  # re-exported
from fedmq.shared.errors import ConfigError
from fedmq.shared.nn import MLP, check_activation, check_loss
from fedmq.shared.spec import DEVICE_KEY, check_device, check_keys, resolve_ref


@dataclass(frozen=True)
class FitResult:
    """Outcome of one local fit: the new full weights, how many samples produced them, and training metrics."""

    params: dict[str, np.ndarray]
    num_samples: int
    loss: float
    accuracy: float


@runtime_checkable
class Trainer(Protocol):
    """What a worker needs from a model. Implementations must not mutate input arrays."""

    def init_params(self) -> dict[str, np.ndarray]:
        """Initial parameters (deterministic from the spec)."""
        ...

    def fit(
        self,
        params: dict[str, np.ndarray],
        X: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        mu: float,
        seed: int,
    ) -> FitResult:
        """Train starting from ``params`` and return the new full weights."""
        ...

    def evaluate(
        self, params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray
    ) -> tuple[float, float]:
        """``(loss, accuracy)`` of ``params`` on ``(X, y)``."""
        ...


TrainerFactory = Callable[[dict], Trainer]


# ---------------------------------------------------------------------------------------
# The default MLP trainer
# ---------------------------------------------------------------------------------------

_MLP_REQUIRED = ("input_dim", "num_classes")
_MLP_DEFAULTS: dict[str, Any] = {
    "hidden": [64],
    "activation": "relu",
    "loss": "cross-entropy",
    "momentum": 0.0,
    "seed": 0,
}


def mlp_spec(
    input_dim: int,
    num_classes: int,
    hidden: Sequence[int] = (64,),
    activation: str = "relu",
    loss: str = "cross-entropy",
    momentum: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """A JSON-able spec for :class:`MLPTrainer` (validated, lists instead of tuples)."""
    spec = {
        "input_dim": int(input_dim),
        "num_classes": int(num_classes),
        "hidden": [int(h) for h in hidden],
        "activation": activation,
        "loss": loss,
        "momentum": float(momentum),
        "seed": int(seed),
    }
    parse_mlp_spec(spec)
    return spec


@dataclass(frozen=True)
class MLPConfig:
    """A validated MLP spec."""

    layer_sizes: tuple[int, ...]
    activation: str
    loss: str
    momentum: float
    seed: int


def _positive_int(spec: Mapping[str, Any], key: str) -> int:
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"MLP spec key {key!r} must be a positive integer, got {value!r}")
    return int(value)


def parse_mlp_spec(spec: Mapping[str, Any]) -> MLPConfig:
    """Validate an MLP spec dict; ConfigError names an unknown, missing or invalid key."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"MLP spec must be a dict, got {type(spec).__name__}")
    allowed = set(_MLP_REQUIRED) | set(_MLP_DEFAULTS)
    unknown = sorted(k for k in spec if k not in allowed)
    if unknown:
        raise ConfigError(
            f"MLP spec has unknown key {unknown[0]!r}; allowed keys are {', '.join(sorted(allowed))}"
        )
    missing = [k for k in _MLP_REQUIRED if k not in spec]
    if missing:
        raise ConfigError(f"MLP spec is missing required key {missing[0]!r}")
    full = {**_MLP_DEFAULTS, **spec}
    hidden = full["hidden"]
    if (
        isinstance(hidden, (str, bytes))
        or not isinstance(hidden, Sequence)
        or any(isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h < 1 for h in hidden)
    ):
        raise ConfigError(
            f"MLP spec key 'hidden' must be a list of positive integers, got {hidden!r}"
        )
    momentum = full["momentum"]
    if (
        isinstance(momentum, bool)
        or not isinstance(momentum, (int, float))
        or not 0 <= momentum < 1
    ):
        raise ConfigError(f"MLP spec key 'momentum' must be a number in [0, 1), got {momentum!r}")
    seed = full["seed"]
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"MLP spec key 'seed' must be a non-negative integer, got {seed!r}")
    sizes = (
        _positive_int(full, "input_dim"),
        *(int(h) for h in hidden),
        _positive_int(full, "num_classes"),
    )
    return MLPConfig(
        layer_sizes=sizes,
        activation=check_activation(full["activation"]),
        loss=check_loss(full["loss"]),
        momentum=float(momentum),
        seed=int(seed),
    )


class MLPTrainer:
    """:class:`Trainer` backed by :class:`fedmq.shared.nn.MLP`; reported metrics are measured on the local data after training."""

    #: the --trainer-config keys of the numpy MLP (--hidden, --activation, --loss set the first three)
    CONFIG_KEYS = ("hidden", "activation", "loss", "momentum", "seed", DEVICE_KEY)
    #: the run options that set its keys of the same names (see fedmq.shared.spec.run_trainer_config)
    SHORTHANDS = ("hidden", "activation", "loss")

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.config = parse_mlp_spec(spec)
        self._mlp: MLP | None = None

    @classmethod
    def spec_from(cls, config: dict, *, input_shape: tuple[int, ...], num_classes: int, seed: int) -> dict:
        """The MLP's spec from its --trainer-config (``hidden=64,32``, ``activation``, ``loss``,
        ``momentum``, ``seed``); samples of any shape are flattened (``input_dim`` is their size)."""
        check_keys(config, cls.CONFIG_KEYS, "the numpy MLP (fedmq.shared.trainer:MLPTrainer)")
        check_device(config.get(DEVICE_KEY, "auto"), "the numpy MLP", ("auto", "cpu"))
        hidden = config.get("hidden", _MLP_DEFAULTS["hidden"])
        if isinstance(hidden, str):
            try:
                hidden = [int(h) for h in hidden.strip("[]() ").split(",") if h.strip()]
            except ValueError:
                raise ConfigError(f"--trainer-config hidden must be layer sizes like 64,32, got {hidden!r}") from None
        elif isinstance(hidden, int) and not isinstance(hidden, bool):
            hidden = [hidden]
        size = 1
        for n in input_shape:
            size *= int(n)
        spec = {
            "input_dim": size, "num_classes": int(num_classes), "hidden": hidden,
            "activation": config.get("activation", _MLP_DEFAULTS["activation"]),
            "loss": config.get("loss", _MLP_DEFAULTS["loss"]),
            "momentum": config.get("momentum", _MLP_DEFAULTS["momentum"]),
            "seed": config.get("seed", seed),
        }
        parse_mlp_spec(spec)  # ConfigError naming a bad key, before any conversion
        return mlp_spec(**spec)

    def _build(self) -> MLP:
        c = self.config
        return MLP(c.layer_sizes, c.activation, c.loss, c.seed)

    def _model(self) -> MLP:
        """One MLP per trainer, built on first use: set_params replaces its weights each call."""
        if self._mlp is None:
            self._mlp = self._build()
        return self._mlp

    def init_params(self) -> dict[str, np.ndarray]:
        return self._build().get_params()  # a fresh model: the seeded initial weights

    def fit(
        self,
        params: dict[str, np.ndarray],
        X: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        mu: float = 0.0,
        seed: int = 0,
    ) -> FitResult:
        model = self._model()
        model.set_params(params)  # stores copies: the caller's arrays are never touched
        X = _flat(X)
        model.fit(
            X,
            y,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            momentum=self.config.momentum,
            mu=mu,
            ref=params if mu > 0 else None,
            seed=seed,
        )
        loss, accuracy = model.evaluate(X, y)
        return FitResult(model.get_params(), int(np.shape(y)[0]), loss, accuracy)

    def evaluate(
        self, params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray
    ) -> tuple[float, float]:
        model = self._model()
        model.set_params(params)
        return model.evaluate(_flat(X), y)


def _flat(X: np.ndarray) -> np.ndarray:
    """``X`` as ``(n, features)``: a view for samples of any shape (images become vectors)."""
    return X if X.ndim == 2 else np.reshape(X, (X.shape[0], -1))


# ---------------------------------------------------------------------------------------
# Resolving "package.module:attr" references
# ---------------------------------------------------------------------------------------


def load_trainer_factory(ref: str) -> Callable[[dict], Trainer]:
    """Resolve ``"package.module:attr"`` (or ``"path/file.py:attr"``) to a trainer factory;
    ConfigError with one sentence on any failure."""
    obj = resolve_ref(ref, "trainer")
    if not callable(obj):
        raise ConfigError(
            f"trainer factory {ref!r} is a {type(obj).__name__}, not a class or function taking a spec dict"
        )
    return obj
