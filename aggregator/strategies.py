"""Aggregation strategies: pure functions of numpy arrays (no pika, no click).

* FedAvg — McMahan et al., "Communication-Efficient Learning of Deep Networks from
  Decentralized Data", AISTATS 2017: w = Σ n_k w_k / Σ n_k over a round's updates.
* FedAsync — Xie, Koyejo and Gupta, "Asynchronous Federated Optimization", 2019:
  α_t = α·s(τ), x ← (1 − α_t)·x + α_t·x_new, with s constant, polynomial (τ+1)^−a or hinge.
* FedBuff — Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation",
  AISTATS 2022: buffer K deltas, x ← x + η·(1/K)·Σ s(τ_i)·Δ_i with s(τ) = 1/√(1+τ).

τ (staleness) is the current model version minus the version an update was trained from.
Strategies never mutate the arrays they are given; FedBuff keeps its buffer as a running
weighted sum (one model-sized accumulator, not K copies).

Every strategy implements :class:`Strategy`: ``aggregate(current, contributions)`` folds
updates into the model, ``state()``/``restore()`` carry what it buffers through a checkpoint.
The aggregator never asks which strategy it holds; the mode (synchronous rounds or
asynchronous updates) decides how many contributions go into one call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fedmq.aggregator.averaging import Params, weighted_average
from fedmq.aggregator.privacy import GaussianDP
from fedmq.aggregator.robust import (
    ClippedMean,
    RecentNorms,
    RobustResult,
    RobustRule,
    clip_scale,
    update_norm,
)
from fedmq.shared.errors import ConfigError

__all__ = ["Params", "weighted_average"]  # re-exported: they lived here first

Staleness = Callable[[int], float]


# ------------------------------------------------------------------ staleness functions
def constant_staleness() -> Staleness:
    return lambda tau: 1.0


def polynomial_staleness(a: float = 0.5) -> Staleness:
    return lambda tau: float((tau + 1) ** -a)


def hinge_staleness(a: float = 10.0, b: float = 4.0) -> Staleness:
    return lambda tau: 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)


def fedbuff_staleness() -> Staleness:
    return lambda tau: 1.0 / math.sqrt(1.0 + tau)


STALENESS_DEFAULT_A = {"constant": None, "polynomial": 0.5, "hinge": 10.0}


def make_staleness(name: str, a: float | None = None, b: float | None = None) -> Staleness:
    """Build a staleness function by name (``constant``, ``polynomial``, ``hinge``)."""
    if name == "constant":
        return constant_staleness()
    if name == "polynomial":
        return polynomial_staleness(0.5 if a is None else a)
    if name == "hinge":
        return hinge_staleness(10.0 if a is None else a, 4.0 if b is None else b)
    raise ConfigError(f"unknown staleness function {name!r}; choose constant, polynomial or hinge")


# ------------------------------------------------------------------ the protocol
@dataclass(frozen=True)
class Contribution:
    """One update offered to a strategy: weights or delta, its sample count and staleness τ."""

    params: Mapping[str, np.ndarray]
    num_samples: int
    staleness: int = 0


@dataclass(frozen=True)
class Aggregated:
    """The outcome of :meth:`Strategy.aggregate`."""

    params: Params | None  # the new model, or None when the model did not change (yet)
    weights: tuple[float, ...]  # the weight each contribution received, in order


class Strategy(Protocol):
    """What the aggregator needs from an aggregation rule."""

    @property
    def name(self) -> str: ...

    @property
    def update_kind(self) -> str:
        """What an update must carry: ``"weights"`` or ``"delta"``."""
        ...

    def aggregate(self, current: Mapping[str, np.ndarray], contributions: Sequence[Contribution]) -> Aggregated:
        """Fold ``contributions`` (in order) into ``current``; never mutates its inputs."""
        ...

    def state(self) -> tuple[dict[str, object], Params]:
        """What the strategy holds between calls, as (JSON-like meta, arrays) for a checkpoint."""
        ...

    def restore(self, meta: Mapping[str, object], arrays: Mapping[str, np.ndarray]) -> None:
        """Take back what :meth:`state` returned."""
        ...

    def report(self) -> dict[str, object]:
        """Figures for the history entry of the newest version (e.g. the privacy spent so far)."""
        ...


# ------------------------------------------------------------------ FedAvg
@dataclass
class FedAvg:
    """Synchronous FedAvg: average a round's full weights by sample count.

    With a robust ``rule`` other than ``none``, the rule aggregates the round's updates instead
    (they are all held for the round anyway, so rules that need all of them cost no more memory
    than the round itself). With ``dp``, each update's delta from ``current`` is clipped to S and
    the clipped deltas are averaged uniformly (not by sample count: a participant's weight must
    not depend on what it claims), and Gaussian noise of std z·S/K is added to the average.
    """

    robust: RobustRule = field(default_factory=RobustRule)
    dp: GaussianDP | None = None
    name: str = field(default="fedavg", init=False)
    synchronous: bool = field(default=True, init=False)
    update_kind: str = field(default="weights", init=False)
    steps: int = field(default=0, init=False)  # rounds aggregated (the DP noise's step)

    def __post_init__(self) -> None:
        check_defences(self.name, self.robust, self.dp)

    def aggregate(self, current: Mapping[str, np.ndarray], contributions: Sequence[Contribution]) -> Aggregated:
        """The sample-weighted average of the contributions (``current`` plays no part), or what the
        robust rule or the DP mechanism makes of them (``current`` is the model they start from)."""
        self.steps += 1
        counts = [c.num_samples for c in contributions]
        total = sum(counts)
        if self.dp is not None:
            clipped = ClippedMean(self.dp.clip, reference=current)
            for c in contributions:
                clipped.add(c.params, 1.0)
            params = self.dp.add_noise(clipped.result().params, len(contributions), self.steps)
            return Aggregated(params, tuple(1.0 / len(contributions) for _ in contributions))
        if self.robust.name == "none":
            params = weighted_average([(c.params, float(c.num_samples)) for c in contributions])
            return Aggregated(params, tuple(n / total for n in counts))
        result = self.robust.aggregate([c.params for c in contributions], [float(n) for n in counts],
                                       reference=current)
        return Aggregated(result.params, shares(result, counts))

    def state(self) -> tuple[dict[str, object], Params]:
        return _defence_state(self.dp, self.steps, self.robust, None), {}

    def restore(self, meta: Mapping[str, object], arrays: Mapping[str, np.ndarray]) -> None:
        del arrays
        self.steps = int(meta.get("steps", 0))  # type: ignore[call-overload]

    def report(self) -> dict[str, object]:
        return privacy_report(self.dp, self.steps)


def shares(result: RobustResult, counts: Sequence[float]) -> tuple[float, ...]:
    """The weight each update got in a robust aggregate, for the ledger: its share of the sample
    count among those averaged (Multi-Krum: 0 for the left out; norm clipping: scaled by its clip);
    1/K each for median and trimmed mean, which weigh coordinates, not updates."""
    k = len(counts)
    if result.selected is not None:
        kept = sum(counts[i] for i in result.selected)
        return tuple((counts[i] / kept if i in result.selected and kept else 0.0) for i in range(k))
    if result.norms is not None and result.clip is not None:
        total = sum(counts)
        return tuple(n / total * min(1.0, result.clip / norm) if norm > 0 else n / total
                     for n, norm in zip(counts, result.norms, strict=True))
    return tuple(1.0 / k for _ in range(k))


def _defence_state(dp: GaussianDP | None, steps: int, robust: RobustRule,
                   recent: RecentNorms | None) -> dict[str, object]:
    """What a checkpoint must hold of the defences: DP's step count (the noise's seed), and the
    recent norms an adaptive clip follows."""
    meta: dict[str, object] = {}
    if dp is not None:
        meta["steps"] = steps
    if recent is not None and robust.name == "norm-clip" and robust.clip_norm is None:
        meta["recent_norms"] = list(recent.norms)
    return meta


def privacy_report(dp: GaussianDP | None, steps: int) -> dict[str, object]:
    """``dp_epsilon`` (at ``dp_delta``) after ``steps`` noisy steps; nothing without DP."""
    if dp is None:
        return {}
    return {"dp_epsilon": dp.epsilon(steps), "dp_delta": dp.delta, "dp_steps": steps}


def check_defences(strategy: str, robust: RobustRule, dp: GaussianDP | None) -> None:
    """ConfigError for a robust rule or DP the strategy cannot apply."""
    if dp is not None and robust.name != "none":
        raise ConfigError(f"--dp-noise and {robust.options} do not combine: DP clips every delta and "
                          "calibrates its noise to the plain mean of them (choose one)")
    if strategy == "fedasync":
        if robust.needs_all:
            raise ConfigError(f"{robust.options} needs several updates at once; fedasync applies each alone "
                              "(use --strategy fedbuff, which applies it to each buffer, or --robust norm-clip)")
        if dp is not None:
            raise ConfigError("--dp-noise works with fedavg and fedbuff, not fedasync (its mixing weight "
                              "has no fixed number of participants to calibrate the noise to)")


# ------------------------------------------------------------------ asynchronous strategies
@dataclass(frozen=True)
class Applied:
    """The outcome of offering one update to an asynchronous strategy."""

    params: Params | None  # the new model, or None when the model did not change yet
    weight: float  # the weight the update received


@dataclass
class FedAsync:
    """FedAsync: mix every update into the model as it arrives."""

    mixing: float = 0.6
    staleness: Staleness = field(default_factory=polynomial_staleness)
    robust: RobustRule = field(default_factory=RobustRule)  # none or norm-clip
    name: str = field(default="fedasync", init=False)
    synchronous: bool = field(default=False, init=False)
    update_kind: str = field(default="weights", init=False)
    recent: RecentNorms = field(default_factory=RecentNorms, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.mixing <= 1.0:
            raise ConfigError(f"--mixing must be in (0, 1], got {self.mixing}")
        check_defences(self.name, self.robust, None)

    def apply(self, current: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray], num_samples: int, tau: int) -> Applied:
        """x ← (1 − α_t)·x + α_t·x_new; with norm clipping α_t is also scaled by min(1, C/‖x_new − x‖),
        which clips the update's delta to C (x + α_t·s·(x_new − x))."""
        alpha = self.mixing * self.staleness(tau)
        if self.robust.name == "norm-clip":
            norm = update_norm(update, current)
            clip = self.robust.clip_for(norm, self.recent)
            alpha *= clip / norm if norm > clip else 1.0
        new = {k: ((1.0 - alpha) * v + alpha * update[k]).astype(np.float32, copy=False) for k, v in current.items()}
        return Applied(new, alpha)

    def aggregate(self, current: Mapping[str, np.ndarray], contributions: Sequence[Contribution]) -> Aggregated:
        """Mix the contributions in one after another (:meth:`apply` each)."""
        return _one_by_one(self.apply, current, contributions)

    def state(self) -> tuple[dict[str, object], Params]:
        return _defence_state(None, 0, self.robust, self.recent), {}

    def restore(self, meta: Mapping[str, object], arrays: Mapping[str, np.ndarray]) -> None:
        del arrays
        self.recent = RecentNorms(meta.get("recent_norms", []))  # type: ignore[arg-type]

    def report(self) -> dict[str, object]:
        return {}


@dataclass
class FedBuff:
    """FedBuff: accumulate staleness-weighted deltas, step the model every K of them.

    Defences compose with the buffer:

    * ``--robust norm-clip`` and DP clip each delta as it arrives, folding the factor
      min(1, C/‖Δ‖) into its weight in the running sum (no extra memory);
      DP then adds N(0, (z·S/K)²) to the buffer's average before the step.
    * ``--robust trimmed-mean|median|multi-krum`` need the buffer's K deltas at once: they are held
      (K × model size) and the step is x ← x + η·s̄·R(Δ_1..Δ_K), where R is the rule (weights
      s(τ_i) where it uses weights) and s̄ the mean staleness weight; for the plain mean this is
      exactly FedBuff's η·(1/K)·Σ s(τ_i)·Δ_i.
    """

    buffer_size: int = 3
    server_lr: float = 1.0
    staleness: Staleness = field(default_factory=fedbuff_staleness)
    robust: RobustRule = field(default_factory=RobustRule)
    dp: GaussianDP | None = None
    name: str = field(default="fedbuff", init=False)
    synchronous: bool = field(default=False, init=False)
    update_kind: str = field(default="delta", init=False)
    count: int = field(default=0, init=False)
    steps: int = field(default=0, init=False)  # model steps taken (the DP noise's step)
    recent: RecentNorms = field(default_factory=RecentNorms, init=False, repr=False)
    _acc: Params = field(default_factory=dict, init=False, repr=False)
    _held: list[tuple[Mapping[str, np.ndarray], float]] = field(default_factory=list, init=False, repr=False)
    _scratch: Params = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.buffer_size < 1:
            raise ConfigError(f"--buffer-size must be at least 1, got {self.buffer_size}")
        if self.server_lr <= 0:
            raise ConfigError(f"--server-lr must be positive, got {self.server_lr}")
        check_defences(self.name, self.robust, self.dp)
        if self.robust.needs_all:
            self.robust.check(self.buffer_size, given="--buffer-size")

    def apply(self, current: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], num_samples: int, tau: int) -> Applied:
        weight = np.float32(self.staleness(tau))
        if self.robust.needs_all:
            self._held.append((delta, float(weight)))  # not copied: inputs are never changed
        else:
            factor = weight * np.float32(self._clip_factor(delta))
            if not self._acc:
                self._acc = {k: np.zeros_like(v, dtype=np.float32) for k, v in current.items()}
            for name, acc in self._acc.items():
                _accumulate(acc, delta[name], factor, self._chunk(acc.size))
        self.count += 1
        if self.count < self.buffer_size:
            return Applied(None, weight)
        self.steps += 1
        step = self._robust_step() if self.robust.needs_all else self._buffered_step()
        # a fresh model each step, not a spare one kept for the next: the model stepped from is
        # freed once the caller lets go of it, so between steps only the model and the accumulator
        # are held (a kept spare was a third model's worth, always; a fresh one costs a few page
        # faults per step where the kernel gives numpy huge pages)
        new = {k: np.empty_like(v, dtype=np.float32) for k, v in current.items()}
        for name, value in current.items():
            np.add(value, step[name], out=new[name])
        for acc in self._acc.values():
            acc.fill(0.0)
        self.count = 0
        return Applied(new, weight)

    def _clip_factor(self, delta: Mapping[str, np.ndarray]) -> float:
        """min(1, C/‖Δ‖) for norm clipping, times min(1, S/‖Δ‖) for DP; 1 without either."""
        factor = 1.0
        if self.robust.name == "norm-clip":
            norm = update_norm(delta)
            clip = self.robust.clip_for(norm, self.recent)
            factor *= clip / norm if norm > clip else 1.0
        if self.dp is not None:
            factor *= clip_scale(delta, self.dp.clip)[0]
        return factor

    def _buffered_step(self) -> Params:
        """η·(1/K)·Σ s_i·c_i·Δ_i, plus η·N(0, (z·S/K)²) with DP: computed in the accumulator itself
        (the caller clears it once the step is taken)."""
        if self.dp is None:
            step = np.float32(self.server_lr / self.buffer_size)
            for acc in self._acc.values():
                acc *= step
            return self._acc
        noise = self.dp.draw(self._acc, self.buffer_size, self.steps)
        for name, acc in self._acc.items():
            acc *= np.float32(1.0 / self.buffer_size)
            np.add(acc, noise[name], out=acc, casting="unsafe")
            acc *= np.float32(self.server_lr)
        return self._acc

    def _robust_step(self) -> Params:
        """η·s̄·R(Δ_1..Δ_K) over the held deltas, which are then let go."""
        held, self._held = self._held, []
        weights = [w for _, w in held]
        result = self.robust.aggregate([d for d, _ in held], weights)
        scale = np.float32(self.server_lr * float(np.mean(weights)))
        return {name: value * scale for name, value in result.params.items()}

    def aggregate(self, current: Mapping[str, np.ndarray], contributions: Sequence[Contribution]) -> Aggregated:
        """Buffer the deltas one after another (:meth:`apply` each); a model when a buffer fills."""
        return _one_by_one(self.apply, current, contributions)

    def _chunk(self, size: int) -> np.ndarray:
        """A scratch of at most _CHUNK elements (not a model-sized one: memory is the budget)."""
        n = min(size, _CHUNK)
        scratch = self._scratch.get("chunk")
        if scratch is None or scratch.size < n:
            scratch = self._scratch["chunk"] = np.empty(n, dtype=np.float32)
        return scratch

    def state(self) -> tuple[dict[str, object], Params]:
        meta: dict[str, object] = {"count": self.count, **_defence_state(self.dp, self.steps, self.robust, self.recent)}
        if self.robust.needs_all:
            meta["held_weights"] = [w for _, w in self._held]
            arrays = {f"held{i}/{k}": v for i, (d, _) in enumerate(self._held) for k, v in d.items()}
            return meta, arrays
        return meta, dict(self._acc) if self.count else {}

    def restore(self, meta: Mapping[str, object], arrays: Mapping[str, np.ndarray]) -> None:
        self.count = int(meta.get("count", 0))  # type: ignore[call-overload]
        self.steps = int(meta.get("steps", 0))  # type: ignore[call-overload]
        self.recent = RecentNorms(meta.get("recent_norms", []))  # type: ignore[arg-type]
        held_weights = meta.get("held_weights")
        if isinstance(held_weights, list):
            self._held = []
            for i, w in enumerate(held_weights):
                prefix = f"held{i}/"
                delta = {k[len(prefix):]: np.array(v, dtype=np.float32) for k, v in arrays.items() if k.startswith(prefix)}
                self._held.append((delta, float(w)))
        elif self.count:
            self._acc = {k: np.array(v, dtype=np.float32) for k, v in arrays.items()}

    def report(self) -> dict[str, object]:
        return privacy_report(self.dp, self.steps)


_CHUNK = 1 << 18  # elements per step of the buffered accumulation (1 MiB of float32)


def _accumulate(acc: np.ndarray, delta: np.ndarray, weight: np.float32, scratch: np.ndarray) -> None:
    """acc += weight * delta, in place, chunk by chunk through a small scratch buffer."""
    flat_acc, flat_delta = acc.reshape(-1), np.asarray(delta).reshape(-1)
    for start in range(0, flat_acc.size, scratch.size):
        stop = min(start + scratch.size, flat_acc.size)
        part = scratch[: stop - start]
        np.multiply(flat_delta[start:stop], weight, out=part)
        flat_acc[start:stop] += part


def _one_by_one(
    apply: Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray], int, int], Applied],
    current: Mapping[str, np.ndarray],
    contributions: Sequence[Contribution],
) -> Aggregated:
    """Offer each contribution in turn to a one-update ``apply``; the last model it returned."""
    model, latest, weights = current, None, []
    for c in contributions:
        res = apply(model, c.params, c.num_samples, c.staleness)
        weights.append(float(res.weight))
        if res.params is not None:
            model = latest = res.params
    return Aggregated(latest, tuple(weights))


STRATEGIES = ("fedavg", "fedasync", "fedbuff")


def make_strategy(
    name: str,
    *,
    mixing: float = 0.6,
    staleness: str = "polynomial",
    staleness_a: float | None = None,
    staleness_b: float | None = None,
    buffer_size: int = 3,
    server_lr: float = 1.0,
    robust: RobustRule | None = None,
    dp: GaussianDP | None = None,
) -> Strategy:
    """Build a strategy by name (``fedavg``, ``fedasync``, ``fedbuff``), with its defences."""
    rule = robust or RobustRule()
    if name == "fedavg":
        return FedAvg(rule, dp)
    if name == "fedasync":
        check_defences(name, rule, dp)
        return FedAsync(mixing, make_staleness(staleness, staleness_a, staleness_b), rule)
    if name == "fedbuff":
        return FedBuff(buffer_size, server_lr, robust=rule, dp=dp)
    raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
