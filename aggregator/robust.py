"""Robust aggregation rules: pure numpy functions that bound what hostile participants can do.

* Coordinate-wise trimmed mean and median — Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust
  Distributed Learning: Towards Optimal Statistical Rates", ICML 2018: per coordinate, drop the
  b = ⌊β·K⌋ largest and b smallest of the K values and average the rest; or take their median.
* Krum and Multi-Krum — Blanchard, El Mhamdi, Guerraoui and Stainer, "Machine Learning with
  Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017: score each update by the sum
  of squared distances to its K − f − 2 nearest neighbours and average the m best scored
  (m = 1 is Krum). Needs K ≥ 2f + 3.
* Norm clipping — Sun, Kairouz, Suresh and McMahan, "Can You Really Backdoor Federated
  Learning?", 2019: scale each delta to an L2 norm of at most C, then average. C may follow the
  median of recent norms (:func:`adaptive_clip_norm`).

An update is a ``Params`` dict (float32 arrays keyed by layer name); the updates of one call
have the same layers and shapes. Distance and norm rules treat an update as one vector (all its
layers together); median and trimmed mean work coordinate by coordinate. Sums are accumulated
in float64 and results returned as float32, as in :func:`~fedmq.aggregator.strategies.weighted_average`.
No rule mutates the arrays it is given. Values are assumed finite (decoding rejects NaN and inf).

Memory: trimmed mean, median and Multi-Krum need all K updates at once — K × model size, held by
the caller (a round's updates, or a buffer of K deltas instead of FedBuff's one running sum) —
plus a float64 scratch of at most about 8 MiB per step, as they walk the model a chunk of
coordinates at a time. Norm clipping can fold one update at a time: :class:`ClippedMean` keeps
one float64 model-sized accumulator, and :func:`clip_scale` gives the factor a running weighted
sum (FedBuff's) can fold into an update's weight at no extra memory.

Weights (sample counts) are reported by the participants themselves, so a hostile one can inflate
its own. Multi-Krum and norm clipping use weights only to average what they kept (pass None for a
plain mean); median and trimmed mean ignore them (a weighted median lets one large claim decide).

Parameters that can never work (β outside [0, 0.5), f < 0, a negative clip) raise
:class:`~fedmq.shared.errors.ConfigError`; a set of updates a rule cannot aggregate (too few,
mismatched layers, bad weights) raises :class:`RobustAggregationError`. :meth:`RobustRule.check`
turns "too few" into a ConfigError at configuration time, before a run starts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedmq.aggregator.averaging import Params, weighted_average
from fedmq.shared.errors import ConfigError, FedmqError

Update = Mapping[str, np.ndarray]
Layers = list[tuple[str, tuple[int, ...]]]

ROBUST_RULES = ("none", "trimmed-mean", "median", "multi-krum", "norm-clip")

_SCRATCH = 1 << 20  # float64 elements of scratch per step (8 MiB), shared by the K rows of a chunk
_EPS = 1e-9  # slack in ⌊β·K⌋, so that e.g. 0.29 × 100 trims 29 and not 28


class RobustAggregationError(FedmqError, ValueError):
    """A set of updates a robust rule cannot aggregate: too few, mismatched layers, bad weights."""


@dataclass(frozen=True)
class RobustResult:
    """What a robust rule made of K updates, and what it left out, for the caller to log."""

    params: Params  # the aggregate, float32
    selected: tuple[int, ...] | None = None  # indices of the updates averaged (Multi-Krum); None: all
    clipped: int = 0  # how many updates norm clipping scaled down
    norms: tuple[float, ...] | None = None  # each update's L2 norm (norm clipping), for adaptive clips
    clip: float | None = None  # the norm bound norm clipping used


# ------------------------------------------------------------------ checks and helpers
def _layers(updates: Sequence[Update], rule: str, need: int, hint: str = "") -> Layers:
    """The (name, shape) of each layer, after checking there are ``need`` updates that agree."""
    if len(updates) < need:
        raise RobustAggregationError(
            f"{rule} needs at least {need} update{'s' if need != 1 else ''}, got {len(updates)}{hint}"
        )
    first = updates[0]
    layers = [(name, tuple(np.shape(first[name]))) for name in first]
    for i, update in enumerate(updates[1:], 1):
        if set(update) != set(first):
            raise RobustAggregationError(f"update {i} has layers {sorted(update)}; update 0 has {sorted(first)}")
        for name, shape in layers:
            if tuple(np.shape(update[name])) != shape:
                raise RobustAggregationError(
                    f"update {i} has layer {name!r} of shape {tuple(np.shape(update[name]))}; update 0 has {shape}"
                )
    return layers


def _weights(weights: Sequence[float] | None, k: int) -> np.ndarray:
    if weights is None:
        return np.ones(k, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (k,):
        raise RobustAggregationError(f"got {w.size} weights for {k} updates; give one weight per update")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise RobustAggregationError(f"weights must be finite and non-negative, got {w.tolist()}")
    return w


def _chunks(updates: Sequence[Update], layers: Layers) -> Iterator[tuple[str, slice, np.ndarray]]:
    """(layer, coordinate slice, K × n float64 copy of those coordinates of every update).

    The copy is a reused scratch: the consumer may overwrite it, but must not keep it.
    """
    k = len(updates)
    width = max(1, _SCRATCH // k)
    scratch = np.empty((k, width), dtype=np.float64)
    for name, _shape in layers:
        flats = [np.asarray(u[name]).reshape(-1) for u in updates]
        size = flats[0].size
        for start in range(0, size, width):
            stop = min(start + width, size)
            block = scratch[:, : stop - start]
            for row, flat in zip(block, flats, strict=True):
                row[...] = flat[start:stop]
            yield name, slice(start, stop), block


def _check_fraction(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and 0.0 <= beta < 0.5):
        raise ConfigError(f"--trim-fraction must be in [0, 0.5), got {beta}")


def _check_byzantine(f: int) -> None:
    if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f < 0:
        raise ConfigError(f"--byzantine must be a whole number >= 0, got {f!r}")


def _check_clip(clip: float) -> None:
    if not (isinstance(clip, (int, float, np.floating)) and math.isfinite(clip) and clip >= 0):
        raise ConfigError(f"--clip-norm must be a finite number >= 0, got {clip!r}")


def trim_count(beta: float, k: int) -> int:
    """b = ⌊β·K⌋: how many values trimmed mean drops at each end of every coordinate."""
    return math.floor(beta * k + _EPS)


def trimmed_mean_min_updates(beta: float) -> int:
    """The fewest updates with which trimming ``beta`` drops anything (1 for β = 0)."""
    _check_fraction(beta)
    if beta == 0:
        return 1
    k = max(1, math.ceil(1.0 / beta) - 1)
    while trim_count(beta, k) < 1:
        k += 1
    return k


# ------------------------------------------------------------------ coordinate-wise rules
def trimmed_mean(updates: Sequence[Update], beta: float) -> RobustResult:
    """Coordinate-wise β-trimmed mean (Yin et al. 2018): drop the b = ⌊β·K⌋ largest and smallest.

    With β > 0 it refuses a K so small that b = 0 (it would silently be the plain mean).
    """
    _check_fraction(beta)
    need = trimmed_mean_min_updates(beta)
    hint = f" (⌊{beta}·K⌋ must be at least 1 to drop anything)" if beta else ""
    layers = _layers(updates, f"trimmed mean with β={beta}", need, hint)
    k, b = len(updates), trim_count(beta, len(updates))
    out: Params = {name: np.empty(shape, dtype=np.float32) for name, shape in layers}
    for name, where, block in _chunks(updates, layers):
        block.sort(axis=0)
        out[name].reshape(-1)[where] = block[b : k - b].mean(axis=0)
    return RobustResult(out)


MEDIAN_MIN_UPDATES = 3  # the median of one or two values is their mean: no protection


def coordinate_median(updates: Sequence[Update]) -> RobustResult:
    """Coordinate-wise median (Yin et al. 2018); the mean of the two middle values for even K."""
    layers = _layers(updates, "coordinate median", MEDIAN_MIN_UPDATES,
                     " (the median of fewer than 3 is their mean)")
    out: Params = {name: np.empty(shape, dtype=np.float32) for name, shape in layers}
    for name, where, block in _chunks(updates, layers):
        out[name].reshape(-1)[where] = np.median(block, axis=0, overwrite_input=True)
    return RobustResult(out)


# ------------------------------------------------------------------ Krum
def pairwise_sq_distances(updates: Sequence[Update]) -> np.ndarray:
    """K × K squared L2 distances between whole updates, in float64, from exact differences."""
    layers = _layers(updates, "pairwise distances", 1)
    k = len(updates)
    dist = np.zeros((k, k), dtype=np.float64)
    for _name, _where, block in _chunks(updates, layers):
        for i in range(k - 1):
            diff = block[i + 1 :] - block[i]
            dist[i, i + 1 :] += np.einsum("ij,ij->i", diff, diff)
    return dist + dist.T


def krum_min_updates(f: int, m: int | None = None) -> int:
    """2f + 3, or m + f when more updates than K − f are to be selected."""
    _check_byzantine(f)
    return max(2 * f + 3, (m or 1) + f)


def multi_krum(
    updates: Sequence[Update], f: int, m: int | None = None, weights: Sequence[float] | None = None
) -> RobustResult:
    """Multi-Krum (Blanchard et al. 2017): the (weighted) mean of the m best-scored updates.

    An update's score is the sum of its squared distances to its K − f − 2 nearest neighbours;
    the m lowest scores are kept (ties go to the lower index). m defaults to K − f.
    ``selected`` lists the kept indices in ascending order.
    """
    _check_byzantine(f)
    if m is not None and (isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1):
        raise ConfigError(f"Multi-Krum's m (updates averaged) must be a whole number >= 1, got {m!r}")
    rule = f"Multi-Krum with f={f}" + (f", m={m}" if m is not None else "")
    why = " (2f+3)" if m is None or m + f <= 2 * f + 3 else " (m+f)"
    _layers(updates, rule, krum_min_updates(f, m), why)
    k = len(updates)
    w = _weights(weights, k)
    keep = k - f if m is None else m
    dist = pairwise_sq_distances(updates)
    neighbours = k - f - 2
    scores = np.empty(k, dtype=np.float64)
    for i in range(k):
        others = np.delete(dist[i], i)
        scores[i] = np.partition(others, neighbours - 1)[:neighbours].sum()
    selected = tuple(sorted(int(i) for i in np.argsort(scores, kind="stable")[:keep]))
    if not w[list(selected)].sum() > 0:
        raise RobustAggregationError(f"{rule} selected updates {list(selected)}, whose weights sum to 0")
    params = weighted_average([(updates[i], float(w[i])) for i in selected])
    return RobustResult(params, selected=selected)


def krum(updates: Sequence[Update], f: int) -> RobustResult:
    """Krum (Blanchard et al. 2017): the one update with the lowest score (Multi-Krum, m = 1)."""
    return multi_krum(updates, f, m=1)


# ------------------------------------------------------------------ norm clipping
def update_norm(update: Update, reference: Update | None = None) -> float:
    """‖update − reference‖₂ over all layers (reference None: ‖update‖₂), accumulated in float64."""
    total = 0.0
    for name, value in update.items():
        flat = np.asarray(value).reshape(-1)
        base = None if reference is None else np.asarray(reference[name]).reshape(-1)
        for start in range(0, flat.size, _SCRATCH):
            part = flat[start : start + _SCRATCH].astype(np.float64)
            if base is not None:
                part -= base[start : start + _SCRATCH]
            total += float(np.dot(part, part))
    return math.sqrt(total)


def clip_scale(update: Update, clip: float, *, reference: Update | None = None) -> tuple[float, float]:
    """(min(1, clip / ‖Δ‖), ‖Δ‖) for Δ = update − reference: the factor that clips Δ to ``clip``."""
    _check_clip(clip)
    norm = update_norm(update, reference)
    return (clip / norm if norm > clip else 1.0), norm


class ClippedMean:
    """Norm clipping one update at a time: Σ w_k·s_k·Δ_k / Σ w_k with s_k = min(1, C/‖Δ_k‖).

    Holds one float64 accumulator the size of the model, whatever the number of updates.
    With a ``reference`` (the model the updates were trained from), updates are full weights:
    Δ_k = update_k − reference, and :meth:`result` returns reference + the clipped mean.
    """

    def __init__(self, clip: float, *, reference: Update | None = None) -> None:
        _check_clip(clip)
        self.clip = float(clip)
        self.reference = reference
        self.norms: list[float] = []
        self.clipped = 0
        self._total = 0.0
        self._acc: dict[str, np.ndarray] = {}
        self._layers: Layers = (
            [(name, tuple(np.shape(v))) for name, v in reference.items()] if reference is not None else []
        )

    @property
    def count(self) -> int:
        return len(self.norms)

    def add(self, update: Update, weight: float = 1.0) -> float:
        """Fold in one update (it is not kept, nor changed); returns its norm before clipping."""
        if not (math.isfinite(weight) and weight >= 0):
            raise RobustAggregationError(f"weights must be finite and non-negative, got {weight}")
        if not self._layers:
            self._layers = [(name, tuple(np.shape(v))) for name, v in update.items()]
        if set(update) != {name for name, _ in self._layers}:
            raise RobustAggregationError(
                f"update {self.count} has layers {sorted(update)}; expected {sorted(n for n, _ in self._layers)}"
            )
        for name, shape in self._layers:
            if tuple(np.shape(update[name])) != shape:
                raise RobustAggregationError(
                    f"update {self.count} has layer {name!r} of shape {tuple(np.shape(update[name]))}; expected {shape}"
                )
        scale, norm = clip_scale(update, self.clip, reference=self.reference)
        coef = float(weight) * scale
        for name, shape in self._layers:
            acc = self._acc.get(name)
            if acc is None:
                acc = self._acc[name] = np.zeros(shape, dtype=np.float64)
            flat_acc = acc.reshape(-1)
            flat = np.asarray(update[name]).reshape(-1)
            base = None if self.reference is None else np.asarray(self.reference[name]).reshape(-1)
            for start in range(0, flat.size, _SCRATCH):
                part = flat[start : start + _SCRATCH].astype(np.float64)
                if base is not None:
                    part -= base[start : start + _SCRATCH]
                part *= coef
                flat_acc[start : start + _SCRATCH] += part
        self._total += float(weight)
        self.norms.append(norm)
        self.clipped += int(norm > self.clip)
        return norm

    def result(self) -> RobustResult:
        """The clipped (weighted) mean of everything added so far; the accumulator is left as is."""
        if not self.norms:
            raise RobustAggregationError("norm clipping needs at least 1 update, got 0")
        if not self._total > 0:
            raise RobustAggregationError("norm clipping needs a positive total weight, got 0")
        out: Params = {}
        for name, acc in self._acc.items():
            mean = acc / self._total
            if self.reference is not None:
                mean += np.asarray(self.reference[name], dtype=np.float64)
            out[name] = mean.astype(np.float32)
        return RobustResult(out, clipped=self.clipped, norms=tuple(self.norms), clip=self.clip)


def norm_clip(
    updates: Sequence[Update],
    clip: float,
    weights: Sequence[float] | None = None,
    *,
    reference: Update | None = None,
) -> RobustResult:
    """Norm clipping (Sun et al. 2019): scale each delta to norm ≤ ``clip``, then (weighted) mean.

    ``updates`` are deltas; or full weights with ``reference`` the model they were trained from
    (see :class:`ClippedMean`). ``clipped`` counts the updates scaled down.
    """
    _check_clip(clip)
    _layers(updates, "norm clipping", 1)
    w = _weights(weights, len(updates))
    acc = ClippedMean(clip, reference=reference)
    for update, weight in zip(updates, w, strict=True):
        acc.add(update, float(weight))
    return acc.result()


ADAPTIVE_CLIP_MIN_UPDATES = 3  # the median norm of one or two updates bounds nothing


def adaptive_clip_norm(recent_norms: Iterable[float]) -> float:
    """The median of recent update norms: a clip bound that follows the honest majority's scale."""
    norms = np.asarray(list(recent_norms), dtype=np.float64)
    if norms.size == 0:
        raise RobustAggregationError("an adaptive clip needs at least one recent norm, got none")
    if not np.all(np.isfinite(norms)) or np.any(norms < 0):
        raise RobustAggregationError(f"norms must be finite and non-negative, got {norms.tolist()}")
    return float(np.median(norms))


RECENT_NORMS = 32  # how many recent norms an adaptive clip of updates arriving one by one follows


class RecentNorms:
    """The norms of the last ``size`` updates, for an adaptive clip of updates that arrive alone
    (FedAsync, FedBuff's running sum): the bound is their median, the arriving update's included.

    The first updates of a run are clipped against few norms (the very first against its own,
    so not at all); from 3 on, a minority of outsized norms cannot move the median far.
    """

    def __init__(self, norms: Iterable[float] = (), size: int = RECENT_NORMS) -> None:
        self.size = size
        self.norms: list[float] = [float(n) for n in norms][-size:]

    def add(self, norm: float) -> None:
        self.norms = [*self.norms[-(self.size - 1):], float(norm)] if self.size > 1 else [float(norm)]


# ------------------------------------------------------------------ by name
@dataclass(frozen=True)
class RobustRule:
    """A robust rule chosen by name, with its parameters checked once, at configuration time.

    ``trim_fraction`` is β for ``trimmed-mean``; ``byzantine`` is f and ``select`` is m for
    ``multi-krum`` (None: K − f); ``clip_norm`` is C for ``norm-clip`` (None: adaptive, the median
    of the norms of the updates being aggregated). ``none`` is the plain (weighted) mean.
    """

    name: str = "none"
    trim_fraction: float = 0.1
    byzantine: int = 1
    clip_norm: float | None = None
    select: int | None = None

    def __post_init__(self) -> None:
        if self.name not in ROBUST_RULES:
            raise ConfigError(f"unknown robust rule {self.name!r}; choose one of {', '.join(ROBUST_RULES)}")
        if self.name == "trimmed-mean":
            _check_fraction(self.trim_fraction)
        if self.name == "multi-krum":
            _check_byzantine(self.byzantine)
            if self.select is not None and (
                isinstance(self.select, bool) or not isinstance(self.select, int) or self.select < 1
            ):
                raise ConfigError(f"--krum-select must be a whole number >= 1, got {self.select!r}")
        if self.name == "norm-clip" and self.clip_norm is not None:
            _check_clip(self.clip_norm)
            if self.clip_norm == 0:
                raise ConfigError("--clip-norm must be positive (or auto, the median of the updates' norms), got 0")

    @property
    def needs_all(self) -> bool:
        """Whether the rule needs every update of a call at once (K × model size in memory):
        trimmed mean, median and Multi-Krum; the plain mean and norm clipping fold one at a time."""
        return self.name in ("trimmed-mean", "median", "multi-krum")

    def clip_for(self, norm: float, recent: RecentNorms) -> float:
        """Norm clipping's bound for an update of norm ``norm`` arriving alone: ``--clip-norm``, or
        (adaptive) the median of ``recent`` once ``norm`` has joined them."""
        recent.add(norm)
        return self.clip_norm if self.clip_norm is not None else adaptive_clip_norm(recent.norms)

    @property
    def options(self) -> str:
        """The rule as command-line options, for messages."""
        extra = {
            "none": "",
            "trimmed-mean": f" --trim-fraction {self.trim_fraction}",
            "median": "",
            "multi-krum": f" --byzantine {self.byzantine}"
            + (f" --krum-select {self.select}" if self.select is not None else ""),
            "norm-clip": f" --clip-norm {'auto' if self.clip_norm is None else self.clip_norm}",
        }[self.name]
        return f"--robust {self.name}{extra}"

    def _need(self) -> tuple[int, str]:
        """(fewest updates per call, why) for this rule."""
        if self.name == "trimmed-mean":
            need = trimmed_mean_min_updates(self.trim_fraction)
            return need, f"⌊{self.trim_fraction}·K⌋ ≥ 1 to drop anything" if need > 1 else "at least one"
        if self.name == "median":
            return MEDIAN_MIN_UPDATES, "a median of fewer than 3 is their mean"
        if self.name == "multi-krum":
            f = self.byzantine
            need = krum_min_updates(f, self.select)
            return need, "2f+3" if need == 2 * f + 3 else "m+f"
        if self.name == "norm-clip" and self.clip_norm is None:
            return ADAPTIVE_CLIP_MIN_UPDATES, "an adaptive clip is the median of at least 3 norms"
        return 1, "at least one"

    def min_updates(self) -> int:
        """The fewest updates one :meth:`aggregate` call accepts."""
        return self._need()[0]

    def check(self, k: int, *, given: str = "updates") -> None:
        """ConfigError when ``k`` updates per call are too few for this rule.

        Call it when configuring, with what fixes K: ``given="--buffer-size"`` (FedBuff),
        ``"--workers-per-round"`` or ``"--min-workers"`` (synchronous rounds).
        """
        need, why = self._need()
        if k < need:
            got = f"{given} {k}" if given.startswith("--") else f"{k} {given}"
            hint = ""
            if self.name == "trimmed-mean" and k >= 3:
                hint = f"; or raise --trim-fraction to at least {math.ceil(1000 / k) / 1000} (1/K)"
            raise ConfigError(f"{self.options} needs at least {need} updates per round/buffer ({why}), got {got}{hint}")

    def aggregate(
        self,
        updates: Sequence[Update],
        weights: Sequence[float] | None = None,
        *,
        reference: Update | None = None,
    ) -> RobustResult:
        """Aggregate ``updates`` (weights: sample counts, used by none, multi-krum and norm-clip).

        ``reference`` is the model full-weight updates were trained from; only norm clipping needs
        it (the other rules commute with a shift of every update). Deltas need none.
        """
        if self.name == "none":
            _layers(updates, "the plain mean", 1)
            w = _weights(weights, len(updates))
            if not w.sum() > 0:
                raise RobustAggregationError("the plain mean needs a positive total weight, got 0")
            return RobustResult(weighted_average([(u, float(x)) for u, x in zip(updates, w, strict=True)]))
        if self.name == "trimmed-mean":
            return trimmed_mean(updates, self.trim_fraction)
        if self.name == "median":
            return coordinate_median(updates)
        if self.name == "multi-krum":
            return multi_krum(updates, self.byzantine, self.select, weights)
        clip = self.clip_norm
        if clip is None:
            _layers(updates, "norm clipping with --clip-norm auto", ADAPTIVE_CLIP_MIN_UPDATES,
                    " (the median of fewer than 3 norms bounds nothing)")
            clip = adaptive_clip_norm(update_norm(u, reference) for u in updates)
        return norm_clip(updates, clip, weights, reference=reference)


def make_robust(
    name: str,
    *,
    trim_fraction: float = 0.1,
    byzantine: int = 1,
    clip_norm: float | None = None,
    select: int | None = None,
) -> RobustRule:
    """Build a robust rule by name (``none``, ``trimmed-mean``, ``median``, ``multi-krum``, ``norm-clip``)."""
    return RobustRule(name, trim_fraction, byzantine, clip_norm, select)
