"""Crash-safe files: atomic writes (temp file, fsync, rename), the checkpoint and the ledger.

The aggregator acks an update only after the state that contains it is on disk, and that
state is always one complete file: a reader sees the old checkpoint or the new one, never a
torn mix. ``updates.jsonl`` is append-only; the checkpoint records its committed length, and
``--resume`` truncates anything written after it (those updates come back from the queue).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.shared.errors import ConfigError, LockLost
from fedmq.shared.files import atomic_write_bytes, json_objects

LOCK_FILE = "aggregator.lock"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.npz"
_META = "__meta__"


def atomic_write_json(path: Path, doc: Mapping[str, Any]) -> None:
    data = readable_json(doc).encode()
    atomic_write_bytes(path, lambda f: f.write(data))


def readable_json(doc: Mapping[str, Any]) -> str:
    """``doc`` as JSON for people: one top-level key per line, and one line per item of a list or
    map under it (a history entry, a worker). Each piece is encoded by json's C encoder:
    ``indent=2`` uses the pure-Python one, ~3x slower, and history.json holds one entry per
    worker (1,000 in a pooled simulation), rewritten once a second."""
    def one(value: Any) -> str:
        return json.dumps(value, default=_json_default)

    parts = []
    for key, value in doc.items():
        if isinstance(value, Mapping) and value:
            inner = ",\n".join(f"    {one(str(k))}: {one(v)}" for k, v in value.items())
            parts.append(f"  {one(str(key))}: {{\n{inner}\n  }}")
        elif isinstance(value, list) and value:
            inner = ",\n".join(f"    {one(v)}" for v in value)
            parts.append(f"  {one(str(key))}: [\n{inner}\n  ]")
        else:
            parts.append(f"  {one(str(key))}: {one(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def save_params(path: Path, params: Mapping[str, np.ndarray]) -> None:
    """Write parameters as a plain .npz (loadable with allow_pickle=False)."""
    atomic_write_bytes(path, lambda f: write_npz(f, params))


def write_npz(f: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """The file ``np.savez(f, **arrays)`` writes (stored .npy members; ``np.load`` reads it), each
    array written straight from its memory: ``np.savez`` copies an array into a zip member through
    ``tobytes`` (16 MiB at a time: a whole layer of a 1M-parameter model), which at a checkpoint
    was a model's worth on the aggregator's peak memory."""
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in arrays.items():
            arr = value if isinstance(value, np.ndarray) and value.flags.c_contiguous else np.array(value, order="C")
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, np.lib.format.header_data_from_array_1_0(arr))
                member.write(arr.reshape(-1).view(np.uint8).data)


def meta_json(meta: Mapping[str, Any]) -> bytes:
    """A checkpoint's meta as :func:`save_checkpoint` stores it (taking it is taking a snapshot)."""
    return json.dumps(meta, default=_json_default).encode()


def save_checkpoint(run_dir: Path, meta: Mapping[str, Any] | bytes, arrays: Mapping[str, np.ndarray], *,
                    before_replace: Callable[[], object] | None = None) -> None:
    """``meta`` (or :func:`meta_json` of it) and ``arrays`` as the run's one checkpoint file;
    ``before_replace`` (e.g. :meth:`RunDirLock.check`) may still stop it just before the rename."""
    blob = np.frombuffer(meta if isinstance(meta, bytes) else meta_json(meta), dtype=np.uint8)
    atomic_write_bytes(
        run_dir / CHECKPOINT_DIR / CHECKPOINT_FILE,
        lambda f: write_npz(f, {_META: blob, **arrays}),
        before_replace=before_replace,
    )


def load_checkpoint(run_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    path = run_dir / CHECKPOINT_DIR / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop(_META).tobytes())
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"checkpoint {path} is unreadable: {exc}") from None
    return meta, arrays


def split_prefix(arrays: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


class RunDirLock:
    """``aggregator.lock`` in the run directory: the incarnation of the aggregator that owns it.

    An aggregator claims the directory (writes its incarnation, atomically) once it holds the
    namespace's lock and before it reads the checkpoint; it :meth:`check` s the file before it
    flushes the ledger and writes each checkpoint, and again just before the checkpoint's
    rename (a sync checkpoint is written behind, while the run goes on), and stops
    (:class:`LockLost`) if another
    incarnation claimed it since. So even while the broker's view lags (an old aggregator that
    has not noticed its connection, and the token with it, is gone) two aggregators never
    both write the directory: the newer claim wins, the older one stops at its next write.
    """

    def __init__(self, run_dir: Path, incarnation: str) -> None:
        self.path = run_dir / LOCK_FILE
        self.incarnation = incarnation

    def holder(self) -> dict[str, Any] | None:
        """What the lock file says (None: no file, or unreadable)."""
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def claim(self) -> dict[str, Any] | None:
        """Write our incarnation; return the previous holder's record (None if none)."""
        import socket
        import time

        previous = self.holder()
        atomic_write_json(self.path, {"incarnation": self.incarnation, "pid": os.getpid(),
                                      "host": socket.gethostname(), "claimed_at": time.time()})
        return previous

    def check(self) -> None:
        """Raise :class:`LockLost` unless the file still names our incarnation."""
        doc = self.holder()
        if doc is None or doc.get("incarnation") != self.incarnation:
            other = (doc or {}).get("incarnation", "nobody")
            where = f" (pid {doc.get('pid')} on {doc.get('host')})" if doc else ""
            raise LockLost(f"run directory {self.path.parent} was taken over by aggregator incarnation "
                           f"{other}{where}; this one ({self.incarnation}) stops without writing")


class AppendLog:
    """An append-only JSON-lines file: ``updates.jsonl`` (the ledger: one line per update message
    received, with its fate) or ``history.jsonl`` (one line per evaluated version).

    :meth:`commit` returns the committed length, which the checkpoint records; a resumed run
    opens it with ``truncate_to`` that length (what was written after it is done again), a new
    run without (the file starts empty).
    """

    def __init__(self, path: Path, truncate_to: int | None = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_to is not None and path.exists():
            with open(path, "r+b") as f:
                f.truncate(truncate_to)
        elif truncate_to is None and path.exists():
            path.unlink()
        self._f: io.BufferedWriter = open(path, "ab")  # noqa: SIM115 (held open for the run)

    def record(self, entry: Mapping[str, Any]) -> None:
        self._f.write(json.dumps(entry, default=_json_default).encode() + b"\n")

    def tail(self, max_bytes: int = 1 << 20) -> list[dict[str, Any]]:
        """The entries in the last ``max_bytes`` of what is written (a resumed run: what the
        checkpoint committed), oldest first; a line cut by the window or unreadable is skipped."""
        self._f.flush()
        with open(self.path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - max_bytes))
            lines = f.read().split(b"\n")
        if size > max_bytes:
            lines = lines[1:]  # the first is likely cut
        return json_objects(lines)

    def commit(self) -> int:
        """Flush and fsync; return the committed length in bytes."""
        self._f.flush()
        os.fsync(self._f.fileno())
        return self._f.tell()

    def close(self) -> None:
        self._f.close()

    def abandon(self) -> None:
        """Close without flushing what was recorded since the last commit (we lost the run)."""
        with contextlib.suppress(OSError, ValueError):
            os.close(self._f.fileno())
        with contextlib.suppress(OSError, ValueError):
            self._f.close()


#: the ledger's name for it
Ledger = AppendLog


def read_ledger(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
