"""Unit tests for shared.partition: a conformance suite over every registered partitioner."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.shared.errors import DataError
from fedmq.shared.partition import PARTITIONERS, label_histograms, partition


def _labels(n: int = 600, k: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, size=n)


def _check_partition(parts: list[np.ndarray], n: int, num_workers: int) -> None:
    assert len(parts) == num_workers
    assert all(p.size > 0 for p in parts), [p.size for p in parts]
    assert all(p.dtype == np.int64 for p in parts)
    joined = np.concatenate(parts)
    assert joined.size == n, "an index is missing or duplicated"
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


@pytest.mark.parametrize("method", sorted(PARTITIONERS))
@pytest.mark.parametrize("num_workers", [1, 3, 10, 37])
def test_conformance_disjoint_covering_non_empty(method, num_workers):
    y = _labels()
    _check_partition(partition(y, num_workers, method, seed=4), y.size, num_workers)


@pytest.mark.parametrize("method", sorted(PARTITIONERS))
def test_conformance_deterministic_for_a_seed_and_different_for_another(method):
    y = _labels()
    a = partition(y, 5, method, seed=1)
    b = partition(y, 5, method, seed=1)
    c = partition(y, 5, method, seed=2)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


@pytest.mark.parametrize("method", sorted(PARTITIONERS))
def test_conformance_as_many_workers_as_samples(method):
    y = _labels(n=12, k=3)
    _check_partition(partition(y, 12, method, shards_per_worker=1, seed=0), 12, 12)


@pytest.mark.parametrize("method", sorted(PARTITIONERS))
def test_conformance_errors(method):
    y = _labels(n=20)
    with pytest.raises(DataError, match="21 workers.*20 samples"):
        partition(y, 21, method)
    with pytest.raises(DataError, match="at least 1"):
        partition(y, 0, method)
    with pytest.raises(DataError, match="empty"):
        partition(np.array([], dtype=np.int64), 1, method)


@settings(max_examples=40, deadline=None)
@given(
    method=st.sampled_from(sorted(PARTITIONERS)),
    n=st.integers(1, 200),
    k=st.integers(1, 12),
    workers=st.integers(1, 30),
    alpha=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**31),
)
def test_conformance_property(method, n, k, workers, alpha, seed):
    workers = min(workers, n)
    spw = max(1, min(3, n // workers))
    y = np.random.default_rng(seed).integers(0, k, size=n)
    parts = partition(y, workers, method, alpha=alpha, shards_per_worker=spw, seed=seed)
    _check_partition(parts, n, workers)


def test_iid_sizes_are_near_equal():
    sizes = [p.size for p in partition(_labels(n=103), 10, "iid")]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_small_alpha_is_skewed():
    y = _labels(n=2000)
    skewed = label_histograms(y, partition(y, 10, "dirichlet", alpha=0.1, seed=0), 10)
    iid = label_histograms(y, partition(y, 10, "iid", seed=0), 10)

    def dominant_share(hists: list[list[int]]) -> float:
        return float(np.mean([max(h) / sum(h) for h in hists]))

    assert dominant_share(skewed) > 0.5
    assert dominant_share(iid) < 0.2
    # most workers miss at least one class entirely
    assert sum(1 for h in skewed if min(h) == 0) >= 5


def test_dirichlet_large_alpha_is_near_iid():
    y = _labels(n=5000)
    hists = np.array(label_histograms(y, partition(y, 5, "dirichlet", alpha=1000.0, seed=0), 10))
    shares = hists / hists.sum(axis=1, keepdims=True)
    assert np.all(np.abs(shares - 0.1) < 0.05)


def test_dirichlet_falls_back_when_resampling_cannot_fill_every_worker():
    y = np.zeros(30, dtype=np.int64)  # one class, tiny alpha: draws put nearly all on one worker
    _check_partition(partition(y, 30, "dirichlet", alpha=1e-3, seed=0), 30, 30)


def test_shards_give_few_labels_per_worker():
    y = np.repeat(np.arange(10), 100)
    hists = label_histograms(y, partition(y, 10, "shards", shards_per_worker=2, seed=0), 10)
    assert all(sum(1 for c in h if c > 0) <= 2 for h in hists)
    assert all(sum(h) == 100 for h in hists)


def test_alpha_and_shard_errors():
    y = _labels(n=20)
    for alpha in (0, -1.0, float("nan")):
        with pytest.raises(DataError, match="alpha"):
            partition(y, 2, "dirichlet", alpha=alpha)
    with pytest.raises(DataError, match="shards_per_worker must be an integer >= 1"):
        partition(y, 2, "shards", shards_per_worker=0)
    with pytest.raises(DataError, match="5 workers x 5 shards = 25 shards.*20 samples"):
        partition(y, 5, "shards", shards_per_worker=5)


def test_unknown_method_lists_known_ones():
    with pytest.raises(DataError, match="iid, dirichlet, shards"):
        partition(_labels(), 2, "pathological")


def test_string_labels_are_supported_by_label_based_methods():
    y = np.array(["a", "b", "c"] * 10)
    for method in PARTITIONERS:
        _check_partition(partition(y, 3, method, seed=0), 30, 3)
