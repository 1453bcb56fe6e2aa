"""The run's evaluated versions: ``history.jsonl``, append-only, and what ``history.json`` holds.

A checkpoint used to hold the whole history, and every checkpoint rewrote all of history.json:
its cost grew with the length of the run. Now each version's entry is appended to
``history.jsonl`` when it is evaluated, made durable with the checkpoint (which records the
committed length, ``history_offset``, as it does the ledger's) and cut back to it on
``--resume`` (the versions after it are made and evaluated again), so each version is in it
exactly once. The core keeps only the newest entry.

``history.json`` keeps its format for users and tools. During a run each checkpoint writes it
with the last :data:`HISTORY_TAIL` entries only (``"history_complete": false``, and
``"evaluations"``: how many there are), a bounded cost, and at most once per
:data:`HISTORY_JSON_INTERVAL_S` (:class:`SnapshotSchedule`): a fast run checkpoints many times a
second, and history.json is a view for people and tools, not part of what makes an ack safe
(that is the checkpoint, the ledger and history.jsonl). When the aggregator leaves (finished,
failed or interrupted) it is written with every entry (``"history_complete": true``).
:func:`fedmq.rundir.read_history` (used by ``fedmq status``, ``fedmq plot`` and the tests)
fills in the whole list from ``history.jsonl`` while a run is going.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmq.aggregator.durable import AppendLog, read_ledger
from fedmq.aggregator.versions import entries_in

HISTORY_LOG = "history.jsonl"
#: evaluated versions history.json holds while the run is going (the rest are in history.jsonl)
HISTORY_TAIL = 100
#: the least time between two writes of history.json while the run is going
HISTORY_JSON_INTERVAL_S = 1.0


class SnapshotSchedule:
    """When a checkpoint also rewrites history.json: at most once per ``interval_s``, and never
    more than ``interval_s`` behind the newest checkpoint.

    A checkpoint :meth:`offer` s a write: it is taken at once if the last one is ``interval_s``
    old (or there was none); otherwise it is owed, and :meth:`deadline` says when the main loop
    must pay it (:meth:`owed`): with a checkpoint if updates were settled since the last one,
    else alone, so history.json never stays behind a quiet run. Pure: the caller passes its
    monotonic clock.
    """

    def __init__(self, interval_s: float = HISTORY_JSON_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last: float | None = None
        self._owed = False

    def offer(self, now: float) -> bool:
        """A checkpoint was written at ``now``: write history.json with it? (If not, it is owed.)"""
        if self._last is None or now - self._last >= self.interval_s:
            self._last, self._owed = now, False
            return True
        self._owed = True
        return False

    def owed(self, now: float) -> bool:
        """A write was put off and its time has come: write it now (and :meth:`offer` it again)."""
        return self._owed and self._last is not None and now - self._last >= self.interval_s

    def deadline(self) -> float | None:
        """When the owed write is due (monotonic), or None if none is owed."""
        return self._last + self.interval_s if self._owed and self._last is not None else None


class History:
    """``history.jsonl`` of a run, and the newest :data:`HISTORY_TAIL` entries in memory."""

    def __init__(self, run_dir: Path, *, truncate_to: int | None = None,
                 legacy: list[dict[str, Any]] | None = None) -> None:
        """A new run (``truncate_to`` None), or a resumed one: cut back to the checkpoint's
        ``truncate_to``; ``legacy``: the history list of a checkpoint written before
        history.jsonl, which becomes its content."""
        self.path = run_dir / HISTORY_LOG
        if legacy is not None:
            truncate_to = None
        if truncate_to is not None and not self.path.exists():
            truncate_to = None  # nothing to cut back (e.g. the file was removed)
        #: the entries written after the checkpoint a resumed run starts from, cut away here:
        #: versions the aggregator before the restart made (and, in sync mode, published)
        self.past_checkpoint: list[dict[str, Any]] = []
        if truncate_to is not None:
            with open(self.path, "rb") as f:
                f.seek(truncate_to)
                self.past_checkpoint = entries_in(f.read())
        self._log = AppendLog(self.path, truncate_to=truncate_to)
        self.tail: deque[dict[str, Any]] = deque(maxlen=HISTORY_TAIL)
        if truncate_to is not None:
            self.tail.extend(read_ledger(self.path)[-HISTORY_TAIL:])  # once per resume
        for entry in legacy or []:
            self.record(entry)

    def record(self, entry: Mapping[str, Any]) -> None:
        """A version was evaluated (durable with the next :meth:`commit`)."""
        self._log.record(entry)
        self.tail.append(dict(entry))

    def commit(self) -> int:
        """Flush and fsync; return the committed length (the checkpoint's ``history_offset``)."""
        return self._log.commit()

    def entries(self, *, full: bool) -> list[dict[str, Any]]:
        """Every entry so far (read back from the file: call after :meth:`commit`), or the tail."""
        return read_ledger(self.path) if full else list(self.tail)

    def close(self) -> None:
        self._log.close()

    def abandon(self) -> None:
        """Close without flushing what was recorded since the last commit (we lost the run)."""
        self._log.abandon()
