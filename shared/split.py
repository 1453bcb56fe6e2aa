"""Write a dataset as per-worker shards plus a held-out test file and a JSON manifest.

Layout of ``out_dir``::

    worker-0.npz ... worker-<N-1>.npz   X float32 (n, d), y int64 (n,), num_classes int64 scalar
    test.npz                            the global test set, same keys
    manifest.json                       dataset, method, alpha, seed, sizes, label histograms

Each file is written to a temporary name in ``out_dir`` and renamed into place, so a
reader never sees a half-written shard. Partitioning schemes are in :mod:`fedmq.shared.partition`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from fedmq.shared.data import Dataset, standardise_one
from fedmq.shared.errors import DataError
from fedmq.shared.files import atomic_write_bytes
from fedmq.shared.partition import label_histograms, partition

MANIFEST = "manifest.json"
TEST_FILE = "test.npz"
_WORKER_FILE = re.compile(r"^worker-(\d+)\.npz$")


SCALES = ("central", "per-shard")


def worker_file(index: int) -> str:
    """File name of worker ``index``'s shard."""
    return f"worker-{index}.npz"


def write_shard(path: str, X: np.ndarray, y: np.ndarray, num_classes: int) -> None:
    """Atomically write one shard file (``X`` float32, ``y`` int64, ``num_classes`` int64 scalar)."""
    arrays = {
        "X": np.ascontiguousarray(X, dtype=np.float32),
        "y": np.ascontiguousarray(y, dtype=np.int64),
        "num_classes": np.int64(num_classes),
    }
    atomic_write_bytes(path, lambda f: np.savez(f, **arrays))


def _remove_stale_shards(out_dir: str, num_workers: int) -> None:
    """Delete ``worker-<i>.npz`` files left by an earlier split with more workers."""
    for name in os.listdir(out_dir):
        m = _WORKER_FILE.match(name)
        if m and int(m.group(1)) >= num_workers:
            os.unlink(os.path.join(out_dir, name))


def build_manifest(
    ds: Dataset,
    parts: list[np.ndarray],
    *,
    method: str,
    alpha: float,
    shards_per_worker: int,
    seed: int,
) -> dict[str, Any]:
    """The JSON-able description of a split (pure; no files touched)."""
    hists = label_histograms(ds.y_train, parts, ds.num_classes)
    return {
        "dataset": ds.name,
        "method": method,
        "alpha": float(alpha),
        "shards_per_worker": int(shards_per_worker),
        "seed": int(seed),
        "num_workers": len(parts),
        "num_classes": int(ds.num_classes),
        "num_features": ds.num_features,
        "sample_shape": list(ds.sample_shape),
        "train_size": int(ds.y_train.shape[0]),
        "test_size": int(ds.y_test.shape[0]),
        "test_file": TEST_FILE,
        "workers": [
            {"worker": i, "file": worker_file(i), "size": int(p.size), "label_histogram": h}
            for i, (p, h) in enumerate(zip(parts, hists, strict=True))
        ],
    }


def split_dataset(
    ds: Dataset,
    out_dir: str | os.PathLike[str],
    *,
    num_workers: int,
    method: str = "iid",
    alpha: float = 0.5,
    shards_per_worker: int = 2,
    seed: int = 0,
    scale: str = "central",
) -> dict[str, Any]:
    """Partition ``ds``'s training set among ``num_workers`` shards in ``out_dir``; returns the manifest.

    ``scale``: ``central`` keeps the dataset's standardisation (statistics of the whole training
    set, which a real federation does not have); ``per-shard`` re-standardises every shard with
    its own mean and standard deviation, as sites that prepare their data alone would.
    """
    if scale not in SCALES:
        raise DataError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    parts = partition(
        ds.y_train, num_workers, method, alpha=alpha, shards_per_worker=shards_per_worker, seed=seed
    )
    out = os.fspath(out_dir)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create output directory {out!r}: {exc}") from None
    manifest = build_manifest(
        ds, parts, method=method, alpha=alpha, shards_per_worker=shards_per_worker, seed=seed
    )
    manifest["scale"] = scale
    for i, idx in enumerate(parts):
        X = ds.X_train[idx]
        if scale == "per-shard":
            X = standardise_one(X)
        write_shard(os.path.join(out, worker_file(i)), X, ds.y_train[idx], ds.num_classes)
    write_shard(os.path.join(out, TEST_FILE), ds.X_test, ds.y_test, ds.num_classes)
    _remove_stale_shards(out, num_workers)
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write_bytes(os.path.join(out, MANIFEST), lambda f: f.write(text.encode("utf-8")))
    return manifest


def _format_histogram(hist: list[int], limit: int = 20) -> str:
    """Counts separated by spaces, truncated after ``limit`` classes."""
    shown = " ".join(str(c) for c in hist[:limit])
    return shown + (" ..." if len(hist) > limit else "")


def format_table(manifest: dict[str, Any]) -> str:
    """A short fixed-width table: one row per worker with its sample count and label histogram."""
    workers = manifest["workers"]
    width = max([len("samples")] + [len(str(w["size"])) for w in workers])
    head = (
        f"{manifest['dataset']}: {manifest['num_workers']} workers, method={manifest['method']}"
        + (f" alpha={manifest['alpha']}" if manifest["method"] == "dirichlet" else "")
        + f", {manifest['num_classes']} classes, test={manifest['test_size']}"
    )
    lines = [head, f"{'worker':>6}  {'samples':>{width}}  label histogram"]
    for w in workers:
        lines.append(
            f"{w['worker']:>6}  {w['size']:>{width}}  {_format_histogram(w['label_histogram'])}"
        )
    return "\n".join(lines)
