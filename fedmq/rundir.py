"""Reading a run directory (``history.json``, ``updates.jsonl``) and checking its ledger.

Used by the tests, the benchmarks and ``scripts/``; none of them parse log messages for what
these files record.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedmq.shared import events
from fedmq.shared.files import json_objects


def read_ledger(run_dir: Path) -> list[dict[str, Any]]:
    """The entries of ``updates.jsonl`` (one per update message the aggregator settled)."""
    path = Path(run_dir) / "updates.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_history(run_dir: Path) -> dict[str, Any]:
    """``history.json``: the evaluated versions and the final result (while a run is going,
    with every version so far: :func:`complete_history`)."""
    return complete_history(Path(run_dir), json.loads((Path(run_dir) / "history.json").read_text()))


def complete_history(run_dir: Path, doc: Any) -> Any:
    """``doc`` (history.json) with its ``history`` list complete.

    While a run is going, the aggregator writes history.json with its newest versions only
    (``"history_complete": false``) and appends every version to ``history.jsonl``
    (:mod:`fedmq.aggregator.history`): the list is read from there (a line being written is
    skipped). A document without the flag (an older run) or complete is returned as it is.
    """
    if not isinstance(doc, dict) or doc.get("history_complete", True) is not False:
        return doc
    entries = read_jsonl(Path(run_dir) / str(doc.get("history_log") or "history.jsonl"))
    return {**doc, "history": entries} if len(entries) >= len(doc.get("history") or []) else doc


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file another process may be appending to: a line being
    written, or not JSON, is skipped; a missing file is empty."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    return json_objects(lines)


def history_len(run_dir: Path) -> int:
    """How many evaluated versions there are so far (0 while history.json does not exist)."""
    try:
        return len(read_history(run_dir)["history"])
    except (OSError, ValueError, KeyError):
        return 0


def events_in(log_text: str, name: str | None = None) -> list[dict[str, Any]]:
    """The events (``name`` only, if given) in a process's JSON log (``--log-format json``)."""
    found = (events.parse(line) for line in log_text.splitlines())
    return [e for e in found if e is not None and (name is None or e["event"] == name)]


def confirmed_updates(log_text: str) -> list[dict[str, Any]]:
    """The updates a worker saw confirmed by the broker: its ``update_confirmed`` events."""
    return events_in(log_text, "update_confirmed")


def ledger_problems(run_dir: Path, confirmed: Iterable[dict[str, Any]]) -> list[str]:
    """What breaks exactly-once-in-effect in ``updates.jsonl``; empty when nothing does.

    Every update the broker confirmed (``confirmed``: ``update_confirmed`` events) must be in
    the ledger with a fate, and no task id applied twice. A message may appear more than once
    only as a redelivery whose first copy was already applied (e.g. after a broker restart
    voided the ack); such copies must not be applied again.
    """
    ledger = read_ledger(run_dir)
    problems: list[str] = []
    if not all("fate" in e for e in ledger):
        problems.append("a ledger line without a fate")
    seen = Counter(e.get("message_id") for e in ledger)
    missing = [c for c in confirmed if seen[c["message_id"]] == 0]
    if missing:
        problems.append(f"{len(missing)} confirmed update(s) missing from updates.jsonl: {missing[:3]}")
    applied = Counter(e.get("task_id") for e in ledger if e.get("fate") == "applied")
    twice = [t for t, n in applied.items() if n > 1]
    if twice:
        problems.append(f"task ids applied twice: {twice}")
    for message_id, n in seen.items():
        if message_id is not None and n > 1:
            fates = [e.get("fate") for e in ledger if e.get("message_id") == message_id]
            if fates.count("applied") > 1 or not all(f in ("applied", "duplicate", "stale", "late") for f in fates):
                problems.append(f"message {message_id} recorded {n} times with fates {fates}")
    return problems
