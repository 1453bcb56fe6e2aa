"""Partition a labelled training set among N federated workers.

Three schemes, all deterministic from a seed, each returning one sorted int64 index
array per worker such that every index appears in exactly one part and no part is empty:

* ``iid`` - a seeded random permutation cut into near-equal parts.
* ``shards`` - the pathological non-IID split of McMahan et al. 2017 ("Communication-
  Efficient Learning of Deep Networks from Decentralized Data"): sort by label, cut into
  ``num_workers * shards_per_worker`` shards, give each worker ``shards_per_worker``
  random shards.
* ``dirichlet`` - label skew of Hsu et al. 2019 ("Measuring the Effects of Non-Identical
  Data Distribution for Federated Visual Classification"): for every class, draw worker
  proportions from ``Dir(alpha)`` and split that class's samples accordingly. Small
  ``alpha`` gives highly skewed label histograms, large ``alpha`` approaches IID.

Impossible requests raise :class:`fedmq.shared.errors.DataError` saying what to change.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedmq.shared.errors import DataError

Partitioner = Callable[..., list[np.ndarray]]

DIRICHLET_ATTEMPTS = 50


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------


def _check_common(y: np.ndarray, num_workers: int, seed: int) -> np.ndarray:
    """Validate labels, worker count and seed; return ``y`` as a 1-D array."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"labels must be a 1-D array, got shape {y.shape}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)):
        raise DataError(f"num_workers must be an integer, got {num_workers!r}")
    if num_workers < 1:
        raise DataError(f"num_workers must be at least 1, got {num_workers}")
    if y.shape[0] == 0:
        raise DataError("cannot partition an empty dataset")
    if num_workers > y.shape[0]:
        raise DataError(
            f"cannot give {num_workers} workers at least one sample each from {y.shape[0]} samples; use fewer workers"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    return y


def _finish(parts: list[np.ndarray]) -> list[np.ndarray]:
    """Sorted int64 copies of each part."""
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


# ---------------------------------------------------------------------------------------
# Partitioners
# ---------------------------------------------------------------------------------------


def partition_iid(
    y: np.ndarray, num_workers: int, *, seed: int = 0, **_unused: object
) -> list[np.ndarray]:
    """Seeded random permutation split into near-equal parts (sizes differ by at most one)."""
    y = _check_common(y, num_workers, seed)
    perm = np.random.default_rng(seed).permutation(y.shape[0])
    return _finish(np.array_split(perm, num_workers))


def partition_shards(
    y: np.ndarray,
    num_workers: int,
    *,
    shards_per_worker: int = 2,
    seed: int = 0,
    **_unused: object,
) -> list[np.ndarray]:
    """McMahan et al. 2017: sort by label, cut ``num_workers*k`` shards, deal ``k`` random shards to each worker."""
    y = _check_common(y, num_workers, seed)
    k = shards_per_worker
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise DataError(f"shards_per_worker must be an integer >= 1, got {k!r}")
    num_shards = num_workers * k
    if num_shards > y.shape[0]:
        raise DataError(
            f"{num_workers} workers x {k} shards = {num_shards} shards, but there are only "
            f"{y.shape[0]} samples; lower shards_per_worker or num_workers"
        )
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(y.shape[0])
    order = shuffled[np.argsort(y[shuffled], kind="stable")]
    shards = np.array_split(order, num_shards)
    deal = rng.permutation(num_shards).reshape(num_workers, k)
    return _finish([np.concatenate([shards[s] for s in row]) for row in deal])


def _dirichlet_once(
    class_indices: list[np.ndarray], num_workers: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """One Dirichlet draw: split each class's indices among workers by ``Dir(alpha)`` proportions."""
    buckets: list[list[np.ndarray]] = [[] for _ in range(num_workers)]
    for idx in class_indices:
        idx = rng.permutation(idx)
        props = rng.dirichlet(np.full(num_workers, alpha))
        cuts = (np.cumsum(props)[:-1] * idx.shape[0]).astype(np.int64)
        for w, part in enumerate(np.split(idx, cuts)):
            buckets[w].append(part)
    return [np.concatenate(b) for b in buckets]


def _fill_empty(parts: list[np.ndarray]) -> list[np.ndarray]:
    """Move single samples from the currently largest part into each empty part."""
    parts = list(parts)
    for w in range(len(parts)):
        if parts[w].size == 0:
            big = int(np.argmax([p.size for p in parts]))
            parts[w] = parts[big][-1:]
            parts[big] = parts[big][:-1]
    return parts


def partition_dirichlet(
    y: np.ndarray,
    num_workers: int,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    **_unused: object,
) -> list[np.ndarray]:
    """Hsu et al. 2019 label-skew split; redraws (bounded) until no worker is empty, then fills gaps."""
    y = _check_common(y, num_workers, seed)
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float, np.number))
        or not np.isfinite(alpha)
        or alpha <= 0
    ):
        raise DataError(
            f"alpha (Dirichlet concentration) must be a finite number > 0, got {alpha!r}"
        )
    _, inverse = np.unique(y, return_inverse=True)
    inverse = inverse.reshape(-1)
    class_indices = [np.flatnonzero(inverse == c) for c in range(int(inverse.max()) + 1)]
    parts: list[np.ndarray] = []
    for attempt in range(DIRICHLET_ATTEMPTS):
        rng = np.random.default_rng([seed, attempt])
        parts = _dirichlet_once(class_indices, num_workers, float(alpha), rng)
        if all(p.size > 0 for p in parts):
            return _finish(parts)
    return _finish(_fill_empty(parts))


PARTITIONERS: dict[str, Partitioner] = {
    "iid": partition_iid,
    "dirichlet": partition_dirichlet,
    "shards": partition_shards,
}


def partition(
    y: np.ndarray,
    num_workers: int,
    method: str = "iid",
    *,
    alpha: float = 0.5,
    shards_per_worker: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split sample indices of labels ``y`` among ``num_workers`` workers with the named method."""
    if method not in PARTITIONERS:
        raise DataError(
            f"unknown partition method {method!r}; use one of {', '.join(PARTITIONERS)}"
        )
    return PARTITIONERS[method](
        y, num_workers, alpha=alpha, shards_per_worker=shards_per_worker, seed=seed
    )


def label_histograms(y: np.ndarray, parts: list[np.ndarray], num_classes: int) -> list[list[int]]:
    """Per-part counts of each label ``0..num_classes-1`` (labels must be ints in that range)."""
    return [np.bincount(y[p], minlength=num_classes).astype(int).tolist() for p in parts]
