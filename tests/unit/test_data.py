"""Unit tests for shared.data (datasets, files, shards) and shared.split (writing worker shards)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fedmq.shared.data import BUILTINS, Dataset, load_dataset, load_num_classes, load_shard
from fedmq.shared.errors import DataError
from fedmq.shared.split import format_table, split_dataset

EXPECTED = {  # name -> (num_features, num_classes, total samples)
    "digits": (64, 10, 1797),
    "breast_cancer": (30, 2, 569),
    "wine": (13, 3, 178),
    "iris": (4, 3, 150),
    "xor": (2, 2, 1000),
}


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_loads(name):
    ds = load_dataset(name)
    features, classes, total = EXPECTED[name]
    assert ds.name == name
    assert ds.X_train.dtype == np.float32 and ds.X_test.dtype == np.float32
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert ds.X_train.shape[1] == ds.X_test.shape[1] == features == ds.num_features
    assert ds.num_classes == classes
    assert len(ds.y_train) + len(ds.y_test) == total
    assert len(ds.y_test) == int(np.ceil(0.2 * total))
    assert set(np.unique(ds.y_train)) == set(range(classes))
    np.testing.assert_allclose(ds.X_train.mean(axis=0), 0, atol=1e-4)


def test_digits_split_size_matches_sklearn_convention():
    ds = load_dataset("digits")
    assert ds.X_train.shape == (1437, 64)


def test_xor_labels_follow_the_rule():
    from fedmq.shared.data import make_xor

    X, y = make_xor(seed=3)
    assert X.shape == (1000, 2)
    assert np.all(y == ((X[:, 0] > 0.5) ^ (X[:, 1] > 0.5)))
    np.testing.assert_array_equal(make_xor(seed=3)[0], X)


def test_split_is_seeded():
    a, b, c = (
        load_dataset("iris", seed=1),
        load_dataset("iris", seed=1),
        load_dataset("iris", seed=2),
    )
    np.testing.assert_array_equal(a.X_train, b.X_train)
    assert not np.array_equal(a.X_train, c.X_train)


def test_split_is_stratified():
    ds = load_dataset("iris", test_fraction=0.2)
    assert np.bincount(ds.y_test).tolist() == [10, 10, 10]


def _raw_xy(n=50, d=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(5.0, 2.0, size=(n, d))
    y = rng.choice(np.array([3, 7, 9]), size=n)
    y[:3] = [3, 7, 9]
    return X, y


def test_npz_with_X_y(tmp_path):
    X, y = _raw_xy()
    path = tmp_path / "mine.npz"
    np.savez(path, X=X, y=y)
    ds = load_dataset(path=str(path), test_fraction=0.3, seed=0)
    assert ds.name == "mine"
    assert ds.num_classes == 3
    assert len(ds.y_train) + len(ds.y_test) == 50
    assert len(ds.y_test) == 15
    assert set(np.unique(np.concatenate([ds.y_train, ds.y_test]))) == {0, 1, 2}


def test_npz_with_train_test_keys_and_train_only_standardisation(tmp_path):
    X_tr, y_tr = _raw_xy(n=40, seed=1)
    X_te = np.full((5, 3), 100.0)
    y_te = np.array([3, 7, 9, 3, 7])
    path = tmp_path / "split.npz"
    np.savez(path, x_train=X_tr, y_train=y_tr, x_test=X_te, y_test=y_te)
    ds = load_dataset(path=str(path))
    assert ds.X_train.shape == (40, 3) and ds.X_test.shape == (5, 3)
    mean, std = X_tr.mean(axis=0), X_tr.std(axis=0)
    np.testing.assert_allclose(ds.X_test, ((X_te - mean) / std).astype(np.float32), rtol=1e-5)
    np.testing.assert_allclose(ds.X_train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(ds.X_train.std(axis=0), 1, atol=1e-4)
    assert ds.y_test.tolist() == [0, 1, 2, 0, 1]


def test_constant_feature_keeps_std_one(tmp_path):
    X, y = _raw_xy()
    X[:, 1] = 4.0
    path = tmp_path / "c.npz"
    np.savez(path, X=X, y=y)
    ds = load_dataset(path=str(path))
    assert np.all(ds.X_train[:, 1] == 0) and np.all(ds.X_test[:, 1] == 0)


def _write_csv(path, header, rows):
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for r in rows:
            f.write(",".join(str(c) for c in r) + "\n")


def test_csv_with_string_labels_by_name_and_index(tmp_path):
    rng = np.random.default_rng(0)
    rows = [
        [f"{v:.3f}" for v in rng.normal(size=2)] + [lab] + [f"{rng.normal():.3f}"]
        for lab in ["cat", "dog", "emu"] * 10
    ]
    path = tmp_path / "animals.csv"
    _write_csv(path, ["a", "b", "kind", "c"], rows)
    by_name = load_dataset(path=str(path), label_column="kind")
    by_index = load_dataset(path=str(path), label_column=2)
    assert by_name.num_classes == 3 and by_name.X_train.shape[1] == 3
    np.testing.assert_array_equal(by_name.X_train, by_index.X_train)
    np.testing.assert_array_equal(by_name.y_train, by_index.y_train)


def test_csv_default_label_is_last_column_and_numeric_labels_sort_numerically(tmp_path):
    labels = [2, 10] * 5
    rows = [[int(lab == 10), i, lab] for i, lab in enumerate(labels)]  # x1 marks label 10
    path = tmp_path / "n.csv"
    _write_csv(path, ["x1", "x2", "label"], rows)
    ds = load_dataset(path=str(path), test_fraction=0.2)
    assert ds.num_classes == 2
    assert ds.X_train.shape == (8, 2)
    # numeric order: 2 -> 0, 10 -> 1 (string order would give "10" -> 0)
    assert np.all(ds.X_train[ds.y_train == 1, 0] > ds.X_train[ds.y_train == 0, 0].max())


@pytest.mark.parametrize(
    ("maker", "match"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.with_suffix(".txt").write_text("x") and p.with_suffix(".txt"), "unsupported"),
        (
            lambda p: np.savez(p, features=np.zeros((3, 2)), labels=np.zeros(3)),
            r"\['features', 'labels'\].*\['X', 'y'\]",
        ),
        (
            lambda p: np.savez(p, X=np.array([["a", "b"], ["c", "d"]]), y=np.array([0, 1])),
            "numeric",
        ),
        (lambda p: np.savez(p, X=np.array([[1.0, np.nan], [2.0, 3.0]]), y=np.array([0, 1])), "NaN"),
        (lambda p: np.savez(p, X=np.array([[1.0, np.inf], [2.0, 3.0]]), y=np.array([0, 1])), "Inf"),
        (
            lambda p: np.savez(p, X=np.zeros((4, 2)), y=np.zeros(3)),
            "3 labels but the features have 4 rows",
        ),
        (lambda p: np.savez(p, X=np.zeros((0, 2)), y=np.zeros(0)), "empty"),
        (lambda p: np.savez(p, X=np.zeros(4), y=np.zeros(4)), "2-D"),
        (lambda p: np.savez(p, X=np.array([None, 1], dtype=object), y=np.zeros(2)), "pickle"),
        (lambda p: p.write_text("not a zip"), "not an .npz"),
    ],
)
def test_bad_npz_inputs(tmp_path, maker, match):
    path = tmp_path / "bad.npz"
    result = maker(path)
    if isinstance(result, os.PathLike):
        path = result
    with pytest.raises(DataError, match=match):
        load_dataset(path=str(path))


@pytest.mark.parametrize(
    ("content", "kwargs", "match"),
    [
        ("", {}, "empty"),
        ("a,b,label\n", {}, "no data rows"),
        ("a,b,label\n1,2,0\n3,x,1\n", {}, r"line 3 column 'b' has non-numeric value 'x'"),
        ("a,b,label\n1,2,0\n3,nan,1\n", {}, "NaN/Inf"),
        ("a,b,label\n1,2,0\n3,4\n", {}, "line 3 has 2 columns, the header has 3"),
        (
            "a,b,label\n1,2,0\n3,4,1\n",
            {"label_column": "target"},
            r"'target' not in the header.*\['a', 'b', 'label'\]",
        ),
        ("a,b,label\n1,2,0\n3,4,1\n", {"label_column": 5}, "out of range"),
    ],
)
def test_bad_csv_inputs(tmp_path, content, kwargs, match):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_dataset(path=str(path), **kwargs)


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(DataError, match="digits, breast_cancer, wine, iris, xor"):
        load_dataset("mnist-huge")


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_test_fraction_out_of_range(fraction):
    with pytest.raises(DataError, match="strictly between 0 and 1"):
        load_dataset("iris", test_fraction=fraction)


def test_name_and_path_are_exclusive(tmp_path):
    with pytest.raises(DataError, match="exactly one"):
        load_dataset()
    with pytest.raises(DataError, match="exactly one"):
        load_dataset("iris", path=str(tmp_path / "x.npz"))


def test_load_shard_and_num_classes(tmp_path):
    path = tmp_path / "s.npz"
    np.savez(
        path,
        X=np.ones((4, 2), dtype=np.float64),
        y=np.array([0, 1, 1, 0], dtype=np.int32),
        num_classes=np.int64(3),
    )
    X, y = load_shard(str(path))
    assert X.dtype == np.float32 and X.shape == (4, 2)
    assert y.dtype == np.int64 and y.tolist() == [0, 1, 1, 0]
    assert load_num_classes(str(path)) == 3
    np.savez(tmp_path / "t.npz", X=np.ones((2, 2)), y=np.array([0, 1]))
    assert load_num_classes(str(tmp_path / "t.npz")) is None


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"X": np.ones((2, 2))}, r"\['X'\].*\['X', 'y'\]"),
        ({"X": np.ones((2, 2)), "y": np.array([0.5, 1])}, "whole-number"),
        ({"X": np.ones((2, 2)), "y": np.array([-1, 1])}, "negative"),
        ({"X": np.ones((2, 2)), "y": np.array(["a", "b"])}, "integer"),
        ({"X": np.ones((3, 2)), "y": np.array([0, 1])}, "2 labels but the features have 3 rows"),
    ],
)
def test_bad_shards(tmp_path, arrays, match):
    path = tmp_path / "s.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=match):
        load_shard(str(path))


def test_bad_num_classes(tmp_path):
    path = tmp_path / "s.npz"
    np.savez(path, X=np.ones((2, 2)), y=np.array([0, 1]), num_classes=np.array([1, 2]))
    with pytest.raises(DataError, match="positive integer scalar"):
        load_num_classes(str(path))


def test_dataset_is_frozen():
    ds = load_dataset("iris")
    with pytest.raises(AttributeError):
        ds.name = "x"  # type: ignore[misc]
    assert isinstance(ds, Dataset)


# ---------------------------------------------------------------------------------------
# shared.split
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards"])
def test_split_dataset_writes_shards_and_manifest(tmp_path, method):
    ds = load_dataset("digits")
    out = tmp_path / "shards"
    manifest = split_dataset(
        ds, out, num_workers=5, method=method, alpha=0.3, shards_per_worker=2, seed=1
    )
    files = sorted(os.listdir(out))
    assert files == ["manifest.json", "test.npz"] + [f"worker-{i}.npz" for i in range(5)]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["num_classes"] == 10 and manifest["num_features"] == 64
    assert manifest["test_size"] == len(ds.y_test)
    assert sum(w["size"] for w in manifest["workers"]) == len(ds.y_train)
    seen = []
    for w in manifest["workers"]:
        assert sum(w["label_histogram"]) == w["size"]
        assert len(w["label_histogram"]) == 10
        X, y = load_shard(str(out / w["file"]))
        assert X.dtype == np.float32 and y.dtype == np.int64
        assert len(y) == w["size"]
        assert np.bincount(y, minlength=10).tolist() == w["label_histogram"]
        assert load_num_classes(str(out / w["file"])) == 10
        seen.append(X)
    X_test, y_test = load_shard(str(out / "test.npz"))
    np.testing.assert_array_equal(y_test, ds.y_test)
    all_rows = np.concatenate(seen)
    assert all_rows.shape == ds.X_train.shape
    # every training row lands in exactly one shard
    key = lambda a: np.lexsort(a.T[::-1])  # noqa: E731
    np.testing.assert_array_equal(all_rows[key(all_rows)], ds.X_train[key(ds.X_train)])
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temp file left behind


def test_split_removes_stale_worker_files(tmp_path):
    ds = load_dataset("iris")
    split_dataset(ds, tmp_path, num_workers=4, method="iid", alpha=0.5, shards_per_worker=2, seed=0)
    split_dataset(ds, tmp_path, num_workers=2, method="iid", alpha=0.5, shards_per_worker=2, seed=0)
    assert sorted(os.listdir(tmp_path)) == [
        "manifest.json",
        "test.npz",
        "worker-0.npz",
        "worker-1.npz",
    ]


def test_format_table(tmp_path):
    ds = load_dataset("iris")
    manifest = split_dataset(
        ds, tmp_path, num_workers=3, method="dirichlet", alpha=0.5, shards_per_worker=2, seed=0
    )
    table = format_table(manifest)
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    assert "worker" in lines[1] and "samples" in lines[1]
    for w, line in zip(manifest["workers"], lines[2:], strict=True):
        assert line.split()[:2] == [str(w["worker"]), str(w["size"])]
        assert " ".join(str(c) for c in w["label_histogram"]) in line


# ---------------------------------------------------------------- scaling of sites' own data
def test_scaling_warning_names_unscaled_features_and_is_quiet_on_standardised_ones():
    from fedmq.shared.data import scaling_warning, standardise_one

    rng = np.random.default_rng(0)
    raw = rng.uniform(0, 255, size=(200, 8)).astype(np.float32)  # pixel values
    line = scaling_warning(raw, "shard worker-3.npz")
    assert line is not None and line.startswith("shard worker-3.npz: 8 of 8 features look unscaled")
    assert "--scale" in line
    assert scaling_warning(standardise_one(raw), "shard") is None
    assert scaling_warning(np.ones((10, 3), dtype=np.float32), "constant") is None


def test_split_per_shard_standardises_each_shard_with_its_own_statistics(tmp_path):
    from fedmq.shared.split import split_dataset

    ds = load_dataset("digits")
    manifest = split_dataset(ds, tmp_path, num_workers=3, method="dirichlet", alpha=0.5, scale="per-shard")
    assert manifest["scale"] == "per-shard"
    for i in range(3):
        with np.load(tmp_path / f"worker-{i}.npz") as z:
            X = z["X"]
        varying = X.std(axis=0) > 0
        np.testing.assert_allclose(X.mean(axis=0), 0.0, atol=1e-4)
        np.testing.assert_allclose(X.std(axis=0)[varying], 1.0, atol=1e-3)
    with pytest.raises(DataError, match="scale must be one of central, per-shard"):
        split_dataset(ds, tmp_path, num_workers=3, scale="global")
