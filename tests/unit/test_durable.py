"""Crash-safe files: atomic checkpoints and a ledger that rewinds to the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedmq.aggregator import durable
from fedmq.shared.errors import ConfigError


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    arrays = {"model/dense_0/W": np.arange(6, dtype=np.float32).reshape(2, 3), "strategy/dense_0/W": np.ones((2, 3), np.float32)}
    durable.save_checkpoint(tmp_path, {"state": {"version": 3}, "x": [1, 2]}, arrays)
    loaded = durable.load_checkpoint(tmp_path)
    assert loaded is not None
    meta, back = loaded
    assert meta == {"state": {"version": 3}, "x": [1, 2]}
    assert durable.split_prefix(back, "model/").keys() == {"dense_0/W"}
    assert np.array_equal(back["model/dense_0/W"], arrays["model/dense_0/W"])


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    durable.save_checkpoint(tmp_path, {"v": 1}, {"a": np.zeros(3)})

    def explode(f: object) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        durable.atomic_write_bytes(tmp_path / durable.CHECKPOINT_DIR / durable.CHECKPOINT_FILE, explode)
    loaded = durable.load_checkpoint(tmp_path)
    assert loaded is not None and loaded[0] == {"v": 1}


def test_unreadable_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / durable.CHECKPOINT_DIR / durable.CHECKPOINT_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="unreadable"):
        durable.load_checkpoint(tmp_path)


def test_no_checkpoint_is_none(tmp_path: Path) -> None:
    assert durable.load_checkpoint(tmp_path) is None


def test_ledger_truncates_to_the_committed_offset(tmp_path: Path) -> None:
    path = tmp_path / "updates.jsonl"
    ledger = durable.Ledger(path)
    ledger.record({"task_id": "a", "fate": "applied"})
    offset = ledger.commit()
    ledger.record({"task_id": "b", "fate": "applied"})  # written after the checkpoint
    ledger.commit()
    ledger.close()
    resumed = durable.Ledger(path, truncate_to=offset)
    resumed.record({"task_id": "b", "fate": "applied"})
    resumed.commit()
    resumed.close()
    assert [e["task_id"] for e in durable.read_ledger(path)] == ["a", "b"]


def test_a_new_run_starts_a_new_ledger(tmp_path: Path) -> None:
    path = tmp_path / "updates.jsonl"
    path.write_text(json.dumps({"old": True}) + "\n")
    durable.Ledger(path).close()
    assert durable.read_ledger(path) == []


def test_saved_params_load_without_pickle(tmp_path: Path) -> None:
    durable.save_params(tmp_path / "model.npz", {"dense_0/W": np.ones((2, 2), np.float32)})
    with np.load(tmp_path / "model.npz", allow_pickle=False) as z:
        assert z.files == ["dense_0/W"]


def test_run_dir_lock_stops_the_older_claimant(tmp_path: Path) -> None:
    from fedmq.aggregator.durable import RunDirLock
    from fedmq.shared.errors import LockLost

    first, second = RunDirLock(tmp_path, "aaaaaa"), RunDirLock(tmp_path, "bbbbbb")
    assert first.claim() is None
    first.check()
    previous = second.claim()
    assert previous is not None and previous["incarnation"] == "aaaaaa"
    second.check()
    with pytest.raises(LockLost, match="taken over by aggregator incarnation bbbbbb"):
        first.check()
    (tmp_path / "aggregator.lock").unlink()
    with pytest.raises(LockLost, match="nobody"):
        second.check()


def test_a_checkpoint_finished_after_the_run_directory_was_claimed_is_not_put_in_place(tmp_path: Path) -> None:
    """A sync checkpoint is written behind, while the run goes on: the run directory's lock is
    checked again just before the rename, so an aggregator that lost the directory meanwhile
    leaves the new owner's checkpoint as it is, and no temp file behind."""
    from fedmq.aggregator.durable import RunDirLock
    from fedmq.shared.errors import LockLost

    old, new = RunDirLock(tmp_path, "aaaaaa"), RunDirLock(tmp_path, "bbbbbb")
    old.claim()
    durable.save_checkpoint(tmp_path, {"v": 1}, {"a": np.zeros(3)}, before_replace=old.check)
    new.claim()
    durable.save_checkpoint(tmp_path, {"v": 2}, {"a": np.ones(3)}, before_replace=new.check)
    with pytest.raises(LockLost, match="taken over by aggregator incarnation bbbbbb"):
        durable.save_checkpoint(tmp_path, {"v": 3}, {"a": np.full(3, 3.0)}, before_replace=old.check)
    loaded = durable.load_checkpoint(tmp_path)
    assert loaded is not None and loaded[0] == {"v": 2} and np.array_equal(loaded[1]["a"], np.ones(3))
    assert [p.name for p in (tmp_path / durable.CHECKPOINT_DIR).iterdir()] == [durable.CHECKPOINT_FILE]


def test_an_abandoned_ledger_keeps_only_what_was_committed(tmp_path: Path) -> None:
    from fedmq.aggregator.durable import Ledger, read_ledger

    ledger = Ledger(tmp_path / "updates.jsonl")
    ledger.record({"task_id": "t1", "fate": "applied"})
    ledger.commit()
    ledger.record({"task_id": "t2", "fate": "applied"})
    ledger.abandon()
    assert [e["task_id"] for e in read_ledger(tmp_path / "updates.jsonl")] == ["t1"]


def test_write_npz_is_what_savez_writes_without_copying_the_arrays(tmp_path: Path) -> None:
    """Same members, bytes and dtypes as np.savez (np.load reads both alike), and no array-sized
    temporary: a checkpoint of a model costs no second model in memory."""
    import io
    import tracemalloc

    rng = np.random.default_rng(0)
    arrays = {"model/W": rng.standard_normal((300, 1000)).astype(np.float32), "b": np.arange(7, dtype=np.int64),
              "scalar": np.float64(2.5) * np.ones(()), "fortran": np.asfortranarray(rng.random((3, 4))),
              "empty": np.zeros((0, 3), np.float32), "flags": np.array([True, False])}
    ours, theirs = io.BytesIO(), io.BytesIO()
    durable.write_npz(ours, arrays)
    np.savez(theirs, **arrays)  # type: ignore[arg-type]
    with np.load(io.BytesIO(ours.getvalue()), allow_pickle=False) as a, \
            np.load(io.BytesIO(theirs.getvalue()), allow_pickle=False) as b:
        assert a.files == b.files == list(arrays)
        for k in arrays:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and np.array_equal(a[k], b[k])
    big = {"W": arrays["model/W"]}  # 1.2 MB
    with open(tmp_path / "x.npz", "wb") as f:
        tracemalloc.start()
        durable.write_npz(f, big)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < big["W"].nbytes // 4


def test_the_ledger_tail_is_its_last_whole_entries(tmp_path: Path) -> None:
    ledger = durable.Ledger(tmp_path / "updates.jsonl")
    for i in range(100):
        ledger.record({"message_id": f"m{i:03d}", "fate": "applied"})
    ledger.commit()
    assert [e["message_id"] for e in ledger.tail()] == [f"m{i:03d}" for i in range(100)]
    short = ledger.tail(max_bytes=200)  # a cut first line is dropped, never half-read
    assert short and [e["message_id"] for e in short] == [f"m{i:03d}" for i in range(100 - len(short), 100)]
    ledger.close()
    resumed = durable.Ledger(tmp_path / "updates.jsonl", truncate_to=(tmp_path / "updates.jsonl").stat().st_size)
    assert len(resumed.tail()) == 100
    resumed.close()


def test_history_json_is_readable_and_the_same_document() -> None:
    """history.json is written one key, one entry, one worker per line (json's C encoder piece by
    piece: ``indent=2`` took the pure-Python encoder, ~3x slower, on a table of 1,000 workers
    rewritten once a second); what it holds is exactly what was given."""
    import json

    import numpy as np

    from fedmq.aggregator.durable import readable_json

    doc = {"config": {"mode": "async", "hidden": [64, 32]}, "history": [{"version": 1, "accuracy": np.float32(0.5)}],
           "workers": {f"w{i}": {"updates_applied": i, "last_train_loss": None} for i in range(3)},
           "empty": [], "none": {}, "final": None, "counts": {"applied": np.int64(3)}, "text": "a\nb \"q\""}
    text = readable_json(doc)
    back = json.loads(text)
    assert back == json.loads(json.dumps(doc, default=lambda v: v.item()))
    lines = text.splitlines()
    assert lines[0] == "{" and lines[-1] == "}"
    assert sum(1 for line in lines if line.startswith('    "w')) == 3  # one line per worker
