"""Differential privacy for averaged deltas: the Gaussian mechanism, and its accounting.

DP-FedAvg — McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018: clip each participant's delta to an L2 norm of at most S, average
the n clipped deltas, and add Gaussian noise of standard deviation z·S/n to the average. With the
denominator fixed at n, adding or removing one participant's delta moves the average by at most
S/n, so each aggregation step is a Gaussian mechanism with noise multiplier z at the level of a
participant (a worker and its whole shard: user-level, not sample-level).

:class:`GaussianDP` holds the parameters and draws the noise for step ``t`` from a generator seeded
by ``(seed, t)``: the same run, resumed or not, adds the same noise at the same step (the step count
is part of the strategy's checkpointed state).

The privacy spent is computed by the ``dp-accounting`` library (Google's, maintained with
TensorFlow Privacy), imported only when asked: ``pip install 'fedmq[dp]'``. :func:`epsilon` composes
``steps`` Gaussian mechanisms of noise multiplier z with the Rényi-DP accountant and converts to
(ε, δ). Every participant is assumed to take part in every step (no sampling amplification): fedmq
does not sample workers uniformly at random, so it claims none.

``noise = 0`` is no privacy at all: the strategies then take their plain path (no clipping, no
noise), bit for bit; :func:`make_dp` returns None for it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmq.shared.errors import ConfigError

#: the accountant's (ε at δ) when no step has been taken
NO_STEPS_EPSILON = 0.0


@dataclass(frozen=True)
class GaussianDP:
    """Clip each delta to ``clip`` (S), add N(0, (z·S/n)²) to the average of n of them."""

    clip: float
    noise: float  # z, the noise multiplier
    delta: float = 1e-5
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"--dp-clip must be a positive number, got {self.clip}")
        if not (math.isfinite(self.noise) and self.noise > 0):
            raise ConfigError(f"--dp-noise must be a positive number, got {self.noise}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"--dp-delta must be in (0, 1), got {self.delta}")

    def std(self, count: int) -> float:
        """The noise's standard deviation on the average of ``count`` clipped deltas: z·S/count."""
        return self.noise * self.clip / count

    def draw(self, like: Mapping[str, np.ndarray], count: int, step: int) -> dict[str, np.ndarray]:
        """The noise of step ``step`` for an average of ``count`` deltas shaped like ``like``:
        float64 arrays of N(0, (z·S/count)²), drawn layer by layer from a generator seeded by
        (seed, step)."""
        rng = np.random.default_rng([self.seed, step])
        std = self.std(count)
        out = {}
        for name, value in like.items():
            noise = rng.standard_normal(np.shape(value), dtype=np.float64)
            noise *= std
            out[name] = noise
        return out

    def add_noise(self, average: Mapping[str, np.ndarray], count: int, step: int) -> dict[str, np.ndarray]:
        """``average`` (not changed) plus the noise of step ``step``, as new float32 arrays."""
        noise = self.draw(average, count, step)
        return {name: (noise[name] + np.asarray(value, dtype=np.float64)).astype(np.float32)
                for name, value in average.items()}

    def epsilon(self, steps: int) -> float:
        """ε at ``delta`` after ``steps`` steps (see :func:`epsilon`)."""
        return epsilon(self.noise, steps, self.delta)

    def describe(self) -> dict[str, Any]:
        return {"clip": self.clip, "noise": self.noise, "delta": self.delta}


def make_dp(clip: float | None, noise: float, delta: float, seed: int = 0) -> GaussianDP | None:
    """The mechanism of ``--dp-clip/--dp-noise/--dp-delta``; None when ``noise`` is 0 (no DP)."""
    if noise < 0 or not math.isfinite(noise):
        raise ConfigError(f"--dp-noise must be >= 0, got {noise}")
    if noise == 0:
        return None
    if clip is None:
        raise ConfigError("--dp-noise needs --dp-clip S: the noise is calibrated to the clip norm")
    return GaussianDP(clip, noise, delta, seed)


def epsilon(noise: float, steps: int, delta: float) -> float:
    """ε such that ``steps`` Gaussian mechanisms of noise multiplier ``noise`` are (ε, δ)-DP.

    Rényi-DP accounting by ``dp_accounting`` (every participant in every step).
    """
    if steps <= 0:
        return NO_STEPS_EPSILON
    try:
        import dp_accounting  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError("--dp-noise needs the dp-accounting library: pip install 'fedmq[dp]'") from None
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise), steps)
    return float(accountant.get_epsilon(delta))


def check_accountant() -> None:
    """ConfigError now, before a run starts, when the accountant library is missing."""
    epsilon(1.0, 1, 1e-5)
