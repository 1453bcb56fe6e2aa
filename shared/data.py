"""Datasets for fedmq: bundled scikit-learn sets, a synthetic XOR, user ``.npz``/``.csv`` files and worker shards.

Every loader returns float32 features and int64 labels in ``0..k-1``. Features are
standardised with the mean and standard deviation of the *training* part only (a zero
standard deviation is replaced by 1), so no test statistics leak into training.
Files are read without pickle (``np.load(..., allow_pickle=False)``); every malformed
input raises :class:`fedmq.shared.errors.DataError` with one line saying what is wrong.

The bundled sets (``digits``, ``breast_cancer``, ``wine``, ``iris``) ship inside
scikit-learn and need no download; scikit-learn is imported only when one is requested.
"""

from __future__ import annotations

import csv
import math
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedmq.shared.errors import DataError

XOR_SIZE = 1000
SPLIT_KEYS: tuple[str, ...] = ("x_train", "y_train", "x_test", "y_test")
WHOLE_KEYS: tuple[str, ...] = ("X", "y")


@dataclass(frozen=True)
class Dataset:
    """A train/test split with standardised float32 features and int64 labels in ``0..num_classes-1``."""

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def num_features(self) -> int:
        """Number of features per sample (the product of the sample shape)."""
        return int(np.prod(self.X_train.shape[1:]))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample: ``(d,)`` for vectors, e.g. ``(1, 8, 8)`` for images."""
        return tuple(int(n) for n in self.X_train.shape[1:])


# ---------------------------------------------------------------------------------------
# Built-in datasets
# ---------------------------------------------------------------------------------------


def _sklearn_loader(fn_name: str) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
    """A loader for one bundled scikit-learn dataset (imported lazily)."""

    def load(seed: int) -> tuple[np.ndarray, np.ndarray]:
        from sklearn import datasets  # lazy: importing scikit-learn is slow

        X, y = getattr(datasets, fn_name)(return_X_y=True)
        return np.asarray(X), np.asarray(y)

    return load


def make_xor(seed: int = 0, n: int = XOR_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points uniform in the unit square, label ``(x0 > 0.5) xor (x1 > 0.5)``."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(0.0, 1.0, size=(n, 2))
    y = ((X[:, 0] > 0.5) ^ (X[:, 1] > 0.5)).astype(np.int64)
    return X, y


BUILTINS: dict[str, Callable[[int], tuple[np.ndarray, np.ndarray]]] = {
    "digits": _sklearn_loader("load_digits"),
    "breast_cancer": _sklearn_loader("load_breast_cancer"),
    "wine": _sklearn_loader("load_wine"),
    "iris": _sklearn_loader("load_iris"),
    "xor": make_xor,
}
#: the built-in sets that are images, and their sample shape (channels, height, width)
IMAGE_SHAPES: dict[str, tuple[int, ...]] = {"digits": (1, 8, 8)}


# ---------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------


def check_test_fraction(test_fraction: float) -> float:
    """Return ``test_fraction`` if it is strictly between 0 and 1; DataError otherwise."""
    try:
        value = float(test_fraction)
    except (TypeError, ValueError):
        raise DataError(
            f"test_fraction must be a number between 0 and 1, got {test_fraction!r}"
        ) from None
    if not 0.0 < value < 1.0:
        raise DataError(f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}")
    return value


def stratified_split(
    y: np.ndarray, test_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split into (train indices, test indices), ``ceil(test_fraction*n)`` test samples.

    The test budget is shared among classes by largest remainder so each class is
    represented in proportion; both parts must end up non-empty.
    """
    n = int(y.shape[0])
    rng = np.random.default_rng(seed)
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    if n < 2:
        raise DataError(f"need at least 2 samples to split into train and test, got {n}")
    n_test = min(max(math.ceil(test_fraction * n), 1), n - 1)
    quota = counts * (n_test / n)
    take = np.floor(quota).astype(np.int64)
    remainder = n_test - int(take.sum())
    if remainder > 0:
        order = np.argsort(-(quota - take), kind="stable")
        take[order[:remainder]] += 1
    train_parts, test_parts = [], []
    for c in range(len(classes)):
        idx = rng.permutation(np.flatnonzero(inverse == c))
        test_parts.append(idx[: take[c]])
        train_parts.append(idx[take[c] :])
    train = rng.permutation(np.concatenate(train_parts))
    test = rng.permutation(np.concatenate(test_parts))
    if train.size == 0 or test.size == 0:
        raise DataError(
            f"cannot split {n} samples with test_fraction={test_fraction}: one side would be empty"
        )
    return train, test


def standardise(X_train: np.ndarray, X_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale both parts with the training mean/std (std 0 -> 1); returns float32 arrays."""
    mean = X_train.mean(axis=0, dtype=np.float64)
    std = X_train.std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0
    return (
        ((X_train - mean) / std).astype(np.float32),
        ((X_test - mean) / std).astype(np.float32),
    )


def standardise_one(X: np.ndarray) -> np.ndarray:
    """Scale ``X`` with its own mean/std (std 0 -> 1): what a site without shared statistics can do."""
    return standardise(X, X[:0])[0]


# A feature whose mean is this many of its standard deviations away from 0, or whose standard
# deviation is this far from 1 (either way), is "far from standardised".
_FAR_MEAN, _FAR_STD = 3.0, 10.0


def scaling_warning(X: np.ndarray, what: str) -> str | None:
    """One line when ``X``'s features are far from standardised, else None.

    The network is trained with plain SGD and a learning rate chosen for standardised features;
    raw features (pixel values 0-255, money, counts) stall it at the majority class. Each site
    must scale its features the same way (``fedmq data split --scale``; see the README).
    """
    if X.ndim != 2 or X.shape[0] < 2:
        return None
    mean = X.mean(axis=0, dtype=np.float64)
    std = X.std(axis=0, dtype=np.float64)
    varying = std > 0
    if not varying.any():
        return None
    far_mean = np.abs(mean[varying]) > _FAR_MEAN * np.maximum(std[varying], 1.0)
    far_std = (std[varying] > _FAR_STD) | (std[varying] < 1.0 / _FAR_STD)
    bad = int(np.count_nonzero(far_mean | far_std))
    if bad == 0:
        return None
    return (
        f"{what}: {bad} of {X.shape[1]} features look unscaled (mean up to {np.abs(mean).max():.3g}, "
        f"std from {std[varying].min():.3g} to {std[varying].max():.3g}); standardise every site's "
        "features the same way (fedmq data split --scale), or training may stall at the majority class"
    )


def encode_labels(*parts: np.ndarray) -> tuple[list[np.ndarray], int]:
    """Map labels of any kind (ints, floats, strings) jointly to ``0..k-1`` via ``np.unique``."""
    joined = np.concatenate(parts)
    if joined.dtype.kind == "f" and not np.all(np.isfinite(joined)):
        raise DataError("labels contain NaN or Inf; every row needs a valid label")
    classes, inverse = np.unique(joined, return_inverse=True)
    inverse = inverse.reshape(-1).astype(np.int64)
    out, start = [], 0
    for p in parts:
        out.append(inverse[start : start + len(p)])
        start += len(p)
    return out, int(len(classes))


def check_features(X: np.ndarray, what: str) -> np.ndarray:
    """Validate a feature array (numeric, finite, ``(n, d)`` or flattenable); return it as float64 2-D."""
    X = np.asarray(X)
    if X.dtype.kind not in "biuf":
        raise DataError(f"{what} must be numeric, got dtype {X.dtype}")
    if X.ndim < 2:
        raise DataError(f"{what} must be 2-D (samples x features), got shape {X.shape}")
    if X.shape[0] == 0:
        raise DataError(f"{what} is empty (shape {X.shape}); need at least one sample")
    X = X.reshape(X.shape[0], -1)
    if X.shape[1] == 0:
        raise DataError(f"{what} has no feature columns (shape {X.shape})")
    if X.dtype.kind == "f" and not np.all(np.isfinite(X)):
        bad = int(np.argwhere(~np.isfinite(X))[0][0])
        raise DataError(
            f"{what} contains NaN or Inf values (first in row {bad}); clean the data first"
        )
    return X.astype(np.float64, copy=False)


def check_labels(y: np.ndarray, n: int, what: str) -> np.ndarray:
    """Validate a label vector of length ``n`` (any dtype without objects); return it 1-D."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{what} must be 1-D (one label per sample), got shape {y.shape}")
    if y.shape[0] != n:
        raise DataError(
            f"{what} has {y.shape[0]} labels but the features have {n} rows; they must match"
        )
    if y.dtype.kind not in "biufUS":
        raise DataError(f"{what} must hold numbers or strings, got dtype {y.dtype}")
    return y


# ---------------------------------------------------------------------------------------
# File readers
# ---------------------------------------------------------------------------------------


def _check_file(path: str, extensions: tuple[str, ...]) -> str:
    """Return the lower-case extension of an existing file, or raise DataError."""
    if not os.path.exists(path):
        raise DataError(f"data file {path!r} does not exist")
    if not os.path.isfile(path):
        raise DataError(f"data path {path!r} is not a file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in extensions:
        raise DataError(
            f"unsupported data file extension {ext or '(none)'!r} for {path!r}; use one of {', '.join(extensions)}"
        )
    return ext


def read_npz(path: str) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file, loaded without pickle; DataError for unreadable files."""
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path!r} is not an .npz archive; save it with numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataError(
                f"{path!r} contains object arrays, which need pickle and are refused; save plain numeric arrays"
            ) from None
        raise DataError(f"cannot read {path!r} as .npz: {exc}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"cannot read {path!r} as .npz: {exc}") from None


def _npz_arrays(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(X, y, X_test, y_test)`` from an npz in either key style (test parts None for ``X``/``y``)."""
    arrays = read_npz(path)
    found = sorted(arrays)
    if all(k in arrays for k in SPLIT_KEYS):
        return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]
    if all(k in arrays for k in WHOLE_KEYS):
        return arrays["X"], arrays["y"], None, None
    raise DataError(f"{path!r} has keys {found}; expected {list(WHOLE_KEYS)} or {list(SPLIT_KEYS)}")


def _parse_label_column(header: list[str], label_column: str | int, path: str) -> int:
    """Index of the label column chosen by name or (possibly negative) index."""
    if isinstance(label_column, str):
        if label_column not in header:
            raise DataError(
                f"label column {label_column!r} not in the header of {path!r}; columns are {header}"
            )
        return header.index(label_column)
    if isinstance(label_column, bool) or not isinstance(label_column, (int, np.integer)):
        raise DataError(f"label_column must be a column name or index, got {label_column!r}")
    if not -len(header) <= label_column < len(header):
        raise DataError(
            f"label column index {label_column} is out of range for {len(header)} columns in {path!r}"
        )
    return int(label_column) % len(header)


def read_csv(path: str, label_column: str | int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Features (float64) and raw labels from a CSV with a header row and numeric feature columns."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r and any(cell.strip() for cell in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path!r} as CSV: {exc}") from None
    if not rows:
        raise DataError(f"{path!r} is empty; expected a header row and data rows")
    header = [h.strip() for h in rows[0]]
    if len(header) < 2:
        raise DataError(
            f"{path!r} has {len(header)} column; need at least one feature and a label column"
        )
    body = rows[1:]
    if not body:
        raise DataError(f"{path!r} has a header but no data rows")
    label_idx = _parse_label_column(header, label_column, path)
    features = np.empty((len(body), len(header) - 1), dtype=np.float64)
    labels: list[str] = []
    for r, row in enumerate(body):
        line = r + 2
        if len(row) != len(header):
            raise DataError(
                f"{path!r} line {line} has {len(row)} columns, the header has {len(header)}"
            )
        labels.append(row[label_idx].strip())
        values = row[:label_idx] + row[label_idx + 1 :]
        names = header[:label_idx] + header[label_idx + 1 :]
        for c, (cell, name) in enumerate(zip(values, names, strict=True)):
            try:
                features[r, c] = float(cell)
            except ValueError:
                raise DataError(
                    f"{path!r} line {line} column {name!r} has non-numeric value {cell.strip()!r}"
                ) from None
            if not math.isfinite(features[r, c]):
                raise DataError(
                    f"{path!r} line {line} column {name!r} is {cell.strip()!r}; NaN/Inf are not allowed"
                )
    return features, _csv_labels(labels, path)


def _csv_labels(labels: list[str], path: str) -> np.ndarray:
    """Labels as numbers when all parse as finite numbers, otherwise as strings."""
    if any(lab == "" for lab in labels):
        raise DataError(f"{path!r} has rows with an empty label")
    try:
        numeric = np.array([float(lab) for lab in labels])
    except ValueError:
        return np.array(labels)
    if not np.all(np.isfinite(numeric)):
        raise DataError(f"{path!r} has NaN or Inf labels")
    return numeric


# ---------------------------------------------------------------------------------------
# Public loaders
# ---------------------------------------------------------------------------------------


def sample_shape_of(X: np.ndarray) -> tuple[int, ...]:
    """The shape of one sample of ``X`` (``X.shape[1:]``), or ``(1,)`` for a 1-D array."""
    shape = np.shape(X)
    return tuple(int(n) for n in shape[1:]) if len(shape) >= 2 else (1,)


def _build(
    name: str,
    X: np.ndarray,
    y: np.ndarray,
    X_test: np.ndarray | None,
    y_test: np.ndarray | None,
    test_fraction: float,
    seed: int,
) -> Dataset:
    """Validate, split (if needed), encode labels and standardise into a Dataset.

    Samples keep their shape (``N x C x H x W`` images stay images); validation and the
    per-feature standardisation work on the flattened view.
    """
    shape = sample_shape_of(X)
    if X_test is not None and np.ndim(X_test) >= 2 and sample_shape_of(X_test) != shape:
        raise DataError(
            f"x_test has samples of shape {sample_shape_of(X_test)} but x_train has {shape}; they must match"
        )
    X = check_features(X, "X" if X_test is None else "x_train")
    y = check_labels(y, X.shape[0], "y" if X_test is None else "y_train")
    if X_test is None or y_test is None:
        train_idx, test_idx = stratified_split(y, test_fraction, seed)
        X_tr, y_tr, X_te, y_te = X[train_idx], y[train_idx], X[test_idx], y[test_idx]
    else:
        X_te = check_features(X_test, "x_test")
        y_te = check_labels(y_test, X_te.shape[0], "y_test")
        if X_te.shape[1] != X.shape[1]:
            raise DataError(
                f"x_test has {X_te.shape[1]} features but x_train has {X.shape[1]}; they must match"
            )
        X_tr, y_tr = X, y
    if y_tr.dtype.kind != y_te.dtype.kind and {y_tr.dtype.kind, y_te.dtype.kind} & {"U", "S"}:
        raise DataError("train and test labels mix strings and numbers; use one kind")
    (y_tr_enc, y_te_enc), num_classes = encode_labels(y_tr, y_te)
    X_tr32, X_te32 = standardise(X_tr, X_te)
    X_tr32, X_te32 = X_tr32.reshape(-1, *shape), X_te32.reshape(-1, *shape)
    return Dataset(name, X_tr32, y_tr_enc, X_te32, y_te_enc, num_classes)


def load_dataset(
    name: str | None = None,
    path: str | None = None,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    label_column: str | int = -1,
    image: bool = False,
) -> Dataset:
    """Load a built-in dataset by ``name`` or a ``.npz``/``.csv`` file by ``path`` (exactly one of them).

    ``.npz`` files hold ``X``/``y`` (split here by ``test_fraction``) or
    ``x_train``/``y_train``/``x_test``/``y_test``; ``.csv`` files have a header row and
    the label in ``label_column`` (name or index, default last). Features keep the shape
    they have (an ``.npz`` ``X`` of shape ``N x 1 x 8 x 8`` stays so); ``image=True`` loads a
    built-in image set as images (``digits``: ``N x 1 x 8 x 8``) instead of flat vectors.
    """
    test_fraction = check_test_fraction(test_fraction)
    if (name is None) == (path is None):
        raise DataError(
            f"give exactly one of a dataset name ({', '.join(BUILTINS)}) or a file path"
        )
    if name is not None:
        if name not in BUILTINS:
            raise DataError(f"unknown dataset {name!r}; known datasets are {', '.join(BUILTINS)}")
        X, y = BUILTINS[name](seed)
        if image:
            if name not in IMAGE_SHAPES:
                raise DataError(
                    f"dataset {name!r} has no images; --image works with {', '.join(IMAGE_SHAPES)}"
                )
            X = X.reshape(-1, *IMAGE_SHAPES[name])
        return _build(name, X, y, None, None, test_fraction, seed)
    if image:
        raise DataError("--image reshapes a built-in dataset; a file's X keeps the shape it is saved with")
    assert path is not None
    path = os.fspath(path)
    ext = _check_file(path, (".npz", ".csv"))
    stem = os.path.splitext(os.path.basename(path))[0]
    if ext == ".npz":
        X, y, X_test, y_test = _npz_arrays(path)
        return _build(stem, X, y, X_test, y_test, test_fraction, seed)
    X, y = read_csv(path, label_column)
    return _build(stem, X, y, None, None, test_fraction, seed)


def load_shard(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A worker shard: float32 ``X`` of shape ``(n, ...)`` (any sample shape, kept as saved) and
    int64 labels ``y`` in ``0..k-1`` from an ``.npz``."""
    path = os.fspath(path)
    _check_file(path, (".npz",))
    arrays = read_npz(path)
    if not all(k in arrays for k in WHOLE_KEYS):
        raise DataError(f"shard {path!r} has keys {sorted(arrays)}; expected {list(WHOLE_KEYS)}")
    shape = sample_shape_of(arrays["X"])
    X = check_features(arrays["X"], f"X of shard {path!r}").reshape(-1, *shape)
    y = check_labels(arrays["y"], X.shape[0], f"y of shard {path!r}")
    if y.dtype.kind not in "biuf":
        raise DataError(f"y of shard {path!r} must hold integer class labels, got dtype {y.dtype}")
    if y.dtype.kind == "f" and not np.all(np.isfinite(y) & (y == np.round(y))):
        raise DataError(f"y of shard {path!r} must hold whole-number class labels")
    if y.min() < 0:
        raise DataError(f"y of shard {path!r} has negative labels; labels must be 0..k-1")
    return X.astype(np.float32), y.astype(np.int64)


def load_num_classes(path: str) -> int | None:
    """The optional scalar ``num_classes`` stored in a shard, or None when absent."""
    path = os.fspath(path)
    _check_file(path, (".npz",))
    arrays = read_npz(path)
    if "num_classes" not in arrays:
        return None
    value = arrays["num_classes"]
    if value.shape != () or value.dtype.kind not in "iu" or int(value) < 1:
        raise DataError(f"num_classes in {path!r} must be a positive integer scalar, got {value!r}")
    return int(value)
