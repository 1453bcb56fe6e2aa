"""A stand-in trainer for benchmarks that measures the framework, not the model.

:class:`NoiseTrainer` has MLP-shaped parameters (same names and shapes as
:class:`fedmq.shared.nn.MLP` for the given layer sizes) but its ``fit`` only adds a small
float32 Gaussian perturbation (scale ``1e-3``) to the incoming weights, so benchmark
time goes to encoding, messaging and aggregation rather than numerical training.

Its spec is ``{"layers": [784, 126, 10], "seed": 0}`` (see :func:`noise_spec`); an
:func:`fedmq.shared.trainer.mlp_spec` dict is accepted too, so the stand-in can replace the
default trainer without changing the spec the aggregator publishes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedmq.shared.errors import ConfigError
from fedmq.shared.nn import check_layer_sizes, check_params, mlp_param_shapes
from fedmq.shared.trainer import FitResult, MLPTrainer, parse_mlp_spec

NOISE_SCALE = 1e-3
_POOL_SLACK = 4096  # per-fit offsets into one pre-drawn noise vector
_KEYS = ("layers", "seed")


def noise_spec(layers: Sequence[int], seed: int = 0) -> dict[str, Any]:
    """A JSON-able spec for :class:`NoiseTrainer`."""
    spec = {"layers": [int(s) for s in layers], "seed": int(seed)}
    parse_noise_spec(spec)
    return spec


def parse_noise_spec(spec: Mapping[str, Any]) -> tuple[tuple[int, ...], int]:
    """Validate a noise spec; returns ``(layer_sizes, seed)`` or raises ConfigError naming the key."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"noise spec must be a dict, got {type(spec).__name__}")
    if "layers" not in spec and "input_dim" in spec:  # an MLP spec: same parameter shapes
        config = parse_mlp_spec(spec)
        return config.layer_sizes, config.seed
    unknown = sorted(k for k in spec if k not in _KEYS)
    if unknown:
        raise ConfigError(
            f"noise spec has unknown key {unknown[0]!r}; allowed keys are layers, seed"
        )
    if "layers" not in spec:
        raise ConfigError("noise spec is missing required key 'layers' (e.g. [784, 126, 10])")
    seed = spec.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"noise spec key 'seed' must be a non-negative integer, got {seed!r}")
    return check_layer_sizes(spec["layers"]), int(seed)


class NoiseTrainer:
    """:class:`fedmq.shared.trainer.Trainer` whose ``fit`` returns ``params + N(0, 1e-3^2)`` noise."""

    #: a run's --hidden/--activation/--loss reach it as they reach the MLP (see spec_from)
    SHORTHANDS = MLPTrainer.SHORTHANDS

    @classmethod
    def spec_from(cls, config: dict, *, input_shape: tuple[int, ...], num_classes: int, seed: int) -> dict:
        """In a run (``--trainer bench.standin:NoiseTrainer --hidden H``): the MLP's spec, so the
        stand-in has the parameters the MLP would have."""
        return MLPTrainer.spec_from(config, input_shape=input_shape, num_classes=num_classes, seed=seed)

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.layers, self.seed = parse_noise_spec(spec)
        self.shapes = mlp_param_shapes(self.layers)

    def init_params(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        return {
            name: (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01))
            for name, shape in self.shapes.items()
        }

    def fit(
        self,
        params: dict[str, np.ndarray],
        X: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int = 1,
        batch_size: int = 32,
        lr: float = 0.1,
        mu: float = 0.0,
        seed: int = 0,
    ) -> FitResult:
        check_params(params, self.shapes)
        total = sum(int(np.prod(s)) for s in self.shapes.values())
        if getattr(self, "_pool", None) is None:
            # drawn once: generating 10M normals costs ~80 ms, far more than the framework's work
            pool = np.random.default_rng(self.seed).standard_normal(total + _POOL_SLACK, dtype=np.float32)
            pool *= np.float32(NOISE_SCALE)
            self._pool = pool
        offset = int(np.random.default_rng([self.seed, seed]).integers(_POOL_SLACK))
        noise = self._pool[offset : offset + total]
        out: dict[str, np.ndarray] = {}
        start = 0
        for name, shape in self.shapes.items():
            size = int(np.prod(shape))
            out[name] = np.asarray(params[name], dtype=np.float32) + noise[
                start : start + size
            ].reshape(shape)
            start += size
        return FitResult(out, int(np.shape(X)[0]), 0.0, 0.0)

    def evaluate(
        self, params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray
    ) -> tuple[float, float]:
        return 0.0, 0.0
