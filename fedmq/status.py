"""``fedmq status``: where a run stands, from its run directory (and the broker, if it answers).

Everything comes from the files the aggregator writes (``history.json``, ``updates.jsonl``:
see README, "The run directory"); the broker is asked only for the depth of the namespace's
dead-letter queues, and a broker that does not answer is skipped with a note. The per-worker
table reads the ledger's ``worker_id``, ``fate`` (``other``: duplicate, late, incomplete) and
``staleness``, and ``train_loss``,
``train_accuracy`` and ``duration_s`` where the ledger lines carry them.

A run's state: ``starting`` (no history.json yet), ``running``, ``interrupted`` (its final
figures say so: it can be resumed) or ``finished``. A run is finished when history.json's
``final`` says so (``finished: true``) or, for aggregators that do not write that field, when
the final ``model.npz`` was written after the last history.json (the aggregator writes it
once, on the way out).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmq.rundir import complete_history
from fedmq.shared.events import FATES

DONE_STATES = ("finished", "interrupted")


@dataclass
class LedgerReader:
    """Reads ``updates.jsonl`` incrementally (a live ledger grows; only new lines are parsed).

    A ledger truncated by ``--resume`` (shorter than what was read) is read again from the start.
    """

    path: Path
    entries: list[dict[str, Any]] = field(default_factory=list)
    _offset: int = 0

    def read(self) -> list[dict[str, Any]]:
        try:
            size = self.path.stat().st_size
        except OSError:
            self.entries, self._offset = [], 0
            return self.entries
        if size < self._offset:
            self.entries, self._offset = [], 0
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read(size - self._offset)
        end = chunk.rfind(b"\n") + 1  # a line being written waits for its newline
        for raw in chunk[:end].splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(raw)
                if isinstance(entry, dict):
                    self.entries.append(entry)
        self._offset += end
        return self.entries


def read_history(run_dir: Path) -> dict[str, Any] | None:
    """history.json, or None while it does not exist (or is being replaced)."""
    try:
        doc = json.loads((run_dir / "history.json").read_text())
    except (OSError, ValueError):
        return None
    return complete_history(run_dir, doc) if isinstance(doc, dict) else None


def run_state(run_dir: Path, history: dict[str, Any] | None) -> str:
    """``starting``, ``running``, ``interrupted`` or ``finished`` (see the module's doc)."""
    if history is None:
        return "starting"
    final = history.get("final") or {}
    if final.get("interrupted"):
        return "interrupted"
    if final.get("finished") is True:
        return "finished"
    if "finished" not in final:
        try:
            model = (run_dir / "model.npz").stat().st_mtime_ns
            hist = (run_dir / "history.json").stat().st_mtime_ns
        except OSError:
            return "running"
        if model >= hist:
            return "finished"
    return "running"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def worker_rows(ledger: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per worker id in the ledger (updates without one, e.g. undecodable: ``?``)."""
    by_worker: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in ledger:
        by_worker[str(e.get("worker_id") or "?")].append(e)
    rows = []
    for wid in sorted(by_worker, key=lambda w: (w == "?", _natural(w))):
        entries = by_worker[wid]
        fates = Counter(str(e.get("fate")) for e in entries)
        applied = [e for e in entries if e.get("fate") == "applied"]
        last = entries[-1]
        with_loss = [e for e in entries if e.get("train_loss") is not None]
        durations = [float(e["duration_s"]) for e in entries if e.get("duration_s") is not None]
        counts = {fate: fates[fate] for fate in (*FATES, *sorted(set(fates) - set(FATES)))}
        rows.append({
            "worker_id": wid,
            "updates": len(entries),
            **counts,
            # the worker's trainer failed the task (fate failed), or the aggregator refused its update
            "failures": fates["failed"] + fates["rejected"],
            "other": sum(n for fate, n in counts.items() if fate not in ("applied", "stale", "rejected", "failed")),
            "mean_staleness": _mean([float(e["staleness"]) for e in applied if e.get("staleness") is not None]),
            "last_train_loss": float(with_loss[-1]["train_loss"]) if with_loss else None,
            "last_train_accuracy": (float(with_loss[-1]["train_accuracy"])
                                    if with_loss and with_loss[-1].get("train_accuracy") is not None else None),
            "mean_duration_s": _mean(durations),
            "last_seen_s": last.get("time_s"),
        })
    return rows


def _natural(worker_id: str) -> tuple[Any, ...]:
    """w2 before w10."""
    import re

    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", worker_id))


def dead_letters(amqp_url: str | None, namespace: str | None, timeout_s: float = 2.0) -> dict[str, Any]:
    """The depth of the namespace's dead-letter queues, or why it is unknown (never raises)."""
    if not amqp_url or not namespace:
        return {"known": False, "why": "no namespace"}
    from fedmq.broker.admin import Admin
    from fedmq.broker.settings import BrokerSettings, mask_text
    from fedmq.broker.topology import Topology
    from fedmq.shared.errors import FedmqError

    try:
        settings = BrokerSettings.from_url(amqp_url, connect_timeout_s=timeout_s)
        topology = Topology(namespace)
        with Admin(settings, topology) as admin:
            dlqs = set(topology.dead_letter_queues.values())
            rows = [q for q in admin.queue_status() if q.name in dlqs]
    except FedmqError as exc:
        return {"known": False, "why": mask_text(str(exc))}
    except Exception as exc:  # noqa: BLE001 (a status view never fails on the broker)
        return {"known": False, "why": mask_text(f"{type(exc).__name__}: {exc}")}
    if not any(q.exists for q in rows):
        return {"known": False, "why": f"namespace {namespace!r} is not on the broker (deleted after the run?)"}
    return {"known": True, "queues": {q.name: q.ready for q in rows if q.exists}}


def collect(run_dir: Path, *, ledger: LedgerReader | None = None, amqp_url: str | None = None,
            namespace: str | None = None, broker: bool = True) -> dict[str, Any]:
    """The status document of ``run_dir`` (what ``--json`` prints)."""
    run_dir = Path(run_dir)
    history = read_history(run_dir)
    entries = (ledger or LedgerReader(run_dir / "updates.jsonl")).read()
    state = run_state(run_dir, history)
    doc: dict[str, Any] = {"run_dir": str(run_dir), "state": state}
    config = (history or {}).get("config") or {}
    final = (history or {}).get("final") or {}
    evaluated = (history or {}).get("history") or []
    last = evaluated[-1] if evaluated else {}
    time_s = final.get("time_s") if state in DONE_STATES else last.get("time_s")
    applied = final.get("updates_applied", last.get("updates_applied", 0)) or 0
    fates = Counter({fate: 0 for fate in FATES})
    fates.update(str(e.get("fate")) for e in entries if e.get("fate"))
    doc.update({
        "mode": config.get("mode"), "strategy": config.get("strategy"),
        "target_accuracy": config.get("target_accuracy"),
        "namespace": namespace or (history or {}).get("namespace"),
        "version": final.get("version", last.get("version")),
        "round": final.get("rounds") if final.get("rounds") is not None else last.get("round"),
        "accuracy": last.get("accuracy"), "loss": last.get("loss"),
        "best_accuracy": max((h["accuracy"] for h in evaluated if "accuracy" in h), default=None),
        "evaluations": len(evaluated),
        "time_s": time_s,
        "updates_applied": applied,
        "updates_per_s": (applied / time_s) if time_s else None,
        "reached_target": final.get("reached_target"),
        "fates": dict(fates),
        "ledger_entries": len(entries),
        "workers": worker_rows(entries),
    })
    doc["dead_letters"] = dead_letters(amqp_url, doc["namespace"]) if broker else {"known": False, "why": "not asked"}
    return doc


def _fmt(value: Any, spec: str = "", none: str = "-") -> str:
    if value is None:
        return none
    return format(value, spec) if spec else str(value)


def render(doc: dict[str, Any]) -> str:
    """The status document for a human: a few lines about the run, then one row per worker."""
    lines = [f"run {doc['run_dir']}: {doc['state']}"
             + (f" ({doc['mode']} / {doc['strategy']})" if doc.get("mode") else "")]
    if doc["state"] == "starting":
        lines.append("  no history.json yet: the aggregator has not checkpointed")
    where = f"round {doc['round']}, version {_fmt(doc['version'])}" if doc.get("round") is not None \
        else f"version {_fmt(doc['version'])}"
    target = f" (target {doc['target_accuracy']:g}{', reached' if doc.get('reached_target') else ''})" \
        if doc.get("target_accuracy") is not None else ""
    lines.append(f"  {where}, {doc['evaluations']} evaluated")
    lines.append(f"  accuracy {_fmt(doc['accuracy'], '.4f')}{target}  best {_fmt(doc['best_accuracy'], '.4f')}"
                 f"  loss {_fmt(doc['loss'], '.4f')}")
    lines.append(f"  updates applied {doc['updates_applied']} in {_fmt(doc['time_s'], '.1f')} s"
                 f" ({_fmt(doc['updates_per_s'], '.1f')}/s)")
    lines.append("  fates: " + ", ".join(f"{k} {v}" for k, v in doc["fates"].items())
                 + f"  ({doc['ledger_entries']} ledger lines)")
    dl = doc["dead_letters"]
    if dl.get("known"):
        lines.append("  dead letters: " + ", ".join(f"{q} {n}" for q, n in dl["queues"].items()))
    else:
        lines.append(f"  dead letters: unknown ({dl.get('why')})")
    rows = doc["workers"]
    if not rows:
        lines.append("  no update in the ledger yet")
        return "\n".join(lines)
    header = (f"  {'worker':<14} {'applied':>7} {'stale':>5} {'rejected':>8} {'failed':>6} {'other':>5} {'staleness':>9} "
              f"{'train loss':>10} {'train acc':>9} {'fit s':>6} {'last at':>8}")
    lines += ["", header]
    for r in rows:
        lines.append(
            f"  {r['worker_id']:<14} {r['applied']:>7} {r['stale']:>5} {r['rejected']:>8} {r['failed']:>6} "
            f"{r['other']:>5} {_fmt(r['mean_staleness'], '.2f'):>9} "
            f"{_fmt(r['last_train_loss'], '.4f'):>10} {_fmt(r['last_train_accuracy'], '.4f'):>9} "
            f"{_fmt(r['mean_duration_s'], '.2f'):>6} {_fmt(r['last_seen_s'], '.1f'):>8}"
        )
    return "\n".join(lines)


def find_run_dir(given: str | None) -> Path:
    """``given``, or the current directory if it is a run directory, or the newest run under
    ``runs/``; a ConfigError otherwise."""
    from fedmq.shared.errors import ConfigError

    if given:
        path = Path(given)
        if not path.is_dir():
            raise ConfigError(f"{given} is not a directory (give a run directory, e.g. runs/demo)")
        return path
    here = Path.cwd()
    if (here / "history.json").exists() or (here / "updates.jsonl").exists():
        return here
    candidates = [p.parent for p in Path("runs").glob("*/history.json")]
    if not candidates:
        raise ConfigError("no run directory given, and none under ./runs: give one, e.g. `fedmq status runs/demo`")
    return max(candidates, key=lambda p: (p / "history.json").stat().st_mtime)


def signature(run_dir: Path) -> tuple[Any, ...]:
    """What changes when the run moves on: the sizes and times of its two files."""
    out: list[Any] = []
    for name in ("history.json", "updates.jsonl", "model.npz"):
        try:
            st = os.stat(run_dir / name)
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)
