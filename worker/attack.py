"""Model-poisoning attacks a worker can mount, for tests, benchmarks and research (pure numpy).

``fedmq worker --attack KIND [--attack-scale S]`` makes an honest worker hostile; the aggregator
is not told. Let Δ = w − w₀ be the honest update's delta from the model it was trained from:

* ``sign-flip``: send −S·Δ (Fang et al., "Local Model Poisoning Attacks to Byzantine-Robust
  Federated Learning", USENIX Security 2020, the "full knowledge"-free variant);
* ``scale``: send S·Δ (boosting, Bagdasaryan et al. 2020);
* ``gauss``: send a delta of independent N(0, S²) values, whatever was learned (Blanchard et al. 2017);
* ``label-flip``: train honestly on labels mapped y → C − 1 − y (C classes); S plays no part.

The update keeps its kind (full weights or delta), shapes, float32 dtype and honest sample count,
so it passes every check an honest update passes. ``gauss`` draws from the task's training seed:
a task replayed gives the same update.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedmq.shared.defaults import ATTACK_KINDS as ATTACKS
from fedmq.shared.defaults import DEFAULT_ATTACK_SCALE
from fedmq.shared.errors import ConfigError

__all__ = ["ATTACKS", "DEFAULT_ATTACK_SCALE", "Attack", "make_attack"]


@dataclass(frozen=True)
class Attack:
    """One attack: its ``kind`` (one of :data:`ATTACKS`) and ``scale`` S."""

    kind: str
    scale: float = DEFAULT_ATTACK_SCALE

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ConfigError(f"unknown attack {self.kind!r}; choose one of {', '.join(ATTACKS)}")
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"--attack-scale must be a positive number, got {self.scale}")

    def labels(self, y: np.ndarray, classes: int) -> np.ndarray:
        """The labels to train on: flipped for ``label-flip``, ``y`` itself otherwise."""
        if self.kind != "label-flip":
            return y
        return (classes - 1 - np.asarray(y)).astype(y.dtype, copy=False)

    def tamper(self, params: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], *, delta: bool,
               seed: int) -> dict[str, np.ndarray]:
        """The update to send instead of ``params`` (a delta if ``delta``, else full weights trained
        from ``base``); new float32 arrays, the inputs are not changed."""
        if self.kind == "label-flip":
            return dict(params)
        rng = np.random.default_rng(seed)
        out = {}
        for name, value in params.items():
            honest = np.asarray(value, dtype=np.float32) if delta else np.subtract(value, base[name], dtype=np.float32)
            if self.kind == "sign-flip":
                bad = honest * np.float32(-self.scale)
            elif self.kind == "scale":
                bad = honest * np.float32(self.scale)
            else:
                bad = rng.normal(0.0, self.scale, np.shape(value)).astype(np.float32)
            out[name] = bad if delta else np.add(base[name], bad, dtype=np.float32)
        return out


def make_attack(kind: str | None, scale: float = DEFAULT_ATTACK_SCALE) -> Attack | None:
    """The attack of ``--attack``/``--attack-scale``; None for an honest worker."""
    return None if kind is None else Attack(kind, scale)
