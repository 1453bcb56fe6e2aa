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

from fedmq.shared.errors import ConfigError

Params = dict[str, np.ndarray]
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


# ------------------------------------------------------------------ FedAvg
#: elements of a layer averaged at a time (float64 scratch: 2 x 32 MiB)
REDUCE_BLOCK = 1 << 22


def weighted_average(updates: Sequence[tuple[Mapping[str, np.ndarray], float]]) -> Params:
    """Σ w_k·p_k / Σ w_k, accumulated in float64 in the given order, returned as float32."""
    if not updates:
        raise ValueError("weighted_average needs at least one update")
    total = float(sum(w for _, w in updates))
    if total <= 0:
        raise ValueError("weighted_average needs a positive total weight")
    names = list(updates[0][0])
    out: Params = {}
    for name in names:
        shape = updates[0][0][name].shape
        result = np.empty(shape, dtype=np.float32)
        flat = result.reshape(-1)
        # block by block: float64 scratch of REDUCE_BLOCK elements whatever the layer's size, and
        # every element summed in the same order as a whole-layer sum (the result is the same bits)
        for start in range(0, flat.size, REDUCE_BLOCK):
            stop = min(flat.size, start + REDUCE_BLOCK)
            acc = np.zeros(stop - start, dtype=np.float64)
            tmp = np.empty(stop - start, dtype=np.float64)
            for params, weight in updates:
                np.multiply(np.ravel(params[name])[start:stop], weight, out=tmp, dtype=np.float64)
                acc += tmp
            acc /= total
            flat[start:stop] = acc
        out[name] = result
    return out


@dataclass(frozen=True)
class FedAvg:
    """Synchronous FedAvg: average a round's full weights by sample count."""

    name: str = field(default="fedavg", init=False)
    synchronous: bool = field(default=True, init=False)
    update_kind: str = field(default="weights", init=False)

    def aggregate(self, current: Mapping[str, np.ndarray], contributions: Sequence[Contribution]) -> Aggregated:
        """The sample-weighted average of the contributions (``current`` plays no part)."""
        del current
        total = sum(c.num_samples for c in contributions)
        params = weighted_average([(c.params, float(c.num_samples)) for c in contributions])
        return Aggregated(params, tuple(c.num_samples / total for c in contributions))

    def state(self) -> tuple[dict[str, object], Params]:
        return {}, {}

    def restore(self, meta: Mapping[str, object], arrays: Mapping[str, np.ndarray]) -> None:
        del meta, arrays


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
    name: str = field(default="fedasync", init=False)
    synchronous: bool = field(default=False, init=False)
    update_kind: str = field(default="weights", init=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.mixing <= 1.0:
            raise ConfigError(f"--mixing must be in (0, 1], got {self.mixing}")

    def apply(self, current: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray], num_samples: int, tau: int) -> Applied:
        alpha = self.mixing * self.staleness(tau)
        new = {k: ((1.0 - alpha) * v + alpha * update[k]).astype(np.float32, copy=False) for k, v in current.items()}
        return Applied(new, alpha)

    def aggregate(self, current: Mapping[str, np.ndarray], contributions: Sequence[Contribution]) -> Aggregated:
        """Mix the contributions in one after another (:meth:`apply` each)."""
        return _one_by_one(self.apply, current, contributions)

    def state(self) -> tuple[dict[str, object], Params]:
        return {}, {}

    def restore(self, meta: Mapping[str, object], arrays: Mapping[str, np.ndarray]) -> None:
        del meta, arrays


@dataclass
class FedBuff:
    """FedBuff: accumulate staleness-weighted deltas, step the model every K of them."""

    buffer_size: int = 3
    server_lr: float = 1.0
    staleness: Staleness = field(default_factory=fedbuff_staleness)
    name: str = field(default="fedbuff", init=False)
    synchronous: bool = field(default=False, init=False)
    update_kind: str = field(default="delta", init=False)
    count: int = field(default=0, init=False)
    _acc: Params = field(default_factory=dict, init=False, repr=False)
    _scratch: Params = field(default_factory=dict, init=False, repr=False)
    # Models this strategy returned. A step writes into the older one unless it is the model
    # being stepped from: a returned model stays valid until the flush after the next one,
    # which saves a fresh model-sized allocation (and its page faults) per step.
    _owned: list[Params] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.buffer_size < 1:
            raise ConfigError(f"--buffer-size must be at least 1, got {self.buffer_size}")
        if self.server_lr <= 0:
            raise ConfigError(f"--server-lr must be positive, got {self.server_lr}")

    def apply(self, current: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], num_samples: int, tau: int) -> Applied:
        weight = np.float32(self.staleness(tau))
        if not self._acc:
            self._acc = {k: np.zeros_like(v, dtype=np.float32) for k, v in current.items()}
        for name, acc in self._acc.items():
            _accumulate(acc, delta[name], weight, self._chunk(acc.size))
        self.count += 1
        if self.count < self.buffer_size:
            return Applied(None, weight)
        step = np.float32(self.server_lr / self.buffer_size)
        new = self._spare(current)
        for name, value in current.items():
            acc = self._acc[name]
            acc *= step
            np.add(value, acc, out=new[name])
            acc.fill(0.0)
        self.count = 0
        self._owned = [*self._owned[-1:], new]
        return Applied(new, weight)

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

    def _spare(self, current: Mapping[str, np.ndarray]) -> Params:
        if len(self._owned) == 2 and self._owned[0] is not current and not any(
            np.may_share_memory(self._owned[0][k], v) for k, v in current.items()
        ):
            return self._owned[0]
        return {k: np.empty_like(v, dtype=np.float32) for k, v in current.items()}

    def state(self) -> tuple[dict[str, object], Params]:
        return {"count": self.count}, dict(self._acc) if self.count else {}

    def restore(self, meta: Mapping[str, object], arrays: Mapping[str, np.ndarray]) -> None:
        self.count = int(meta.get("count", 0))  # type: ignore[call-overload]
        if self.count:
            self._acc = {k: np.array(v, dtype=np.float32) for k, v in arrays.items()}


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
) -> Strategy:
    """Build a strategy by name (``fedavg``, ``fedasync``, ``fedbuff``)."""
    if name == "fedavg":
        return FedAvg()
    if name == "fedasync":
        return FedAsync(mixing, make_staleness(staleness, staleness_a, staleness_b))
    if name == "fedbuff":
        return FedBuff(buffer_size, server_lr)
    raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
