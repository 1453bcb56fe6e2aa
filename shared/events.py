"""The events fedmq processes emit: one documented schema, carried by JSON log lines.

A process emits an event with :func:`emit`; the text formatter prints the human message, the
JSON formatter (``--log-format json``) prints one object per line holding ``event`` and the
event's fields at the top level beside ``ts``, ``level``, ``logger`` and ``msg``. Readers
(``fedmq run``'s live view, the benchmarks, the tests) use :func:`parse` and the field names
below, never the human message, which may change.

=====================  ===========================================================================
event                  fields (required; ``?`` = optional)
=====================  ===========================================================================
waiting_for_workers    namespace, have, need
worker_joined          worker_id
worker_left            worker_id, reason ("bye" or "silent")
worker_refused         worker_id, reason                       (its shard or trainer cannot fit the model)
round_waiting          round, have, wanted, waited_s, failed?  (a round still open after a while)
update_settled         message_id, fate (applied|stale|duplicate|rejected|late|failed|incomplete),
                       task_id?,
                       worker_id?, reason?, staleness?, weight?
version_evaluated      version, accuracy, loss, updates_applied, staleness_mean, time_s, round?,
                       dp_epsilon?, dp_delta?, dp_steps? (differential privacy: spent so far),
                       params_crc32? (sync: the version's parameters, see fedmq.aggregator.versions)
round_closed           round, version, updates
checkpoint_written     version, acked                          (debug level: the state is on disk, that many
                       deliveries acked)
finished               version, accuracy, updates_applied, updates_rejected, updates_stale,
                       updates_duplicate, updates_late, reached_target, interrupted, time_s,
                       loss?, rounds?, dp_epsilon?, dp_delta?
standby                namespace                               (a --standby aggregator waits for the lock)
took_over              namespace, incarnation, version, previous?  (a standby took the run over)
task_started           task_id, worker_id, version?, task_version?  (worker; the model it trains from,
                       and the version its task names)
update_confirmed       task_id, message_id, worker_id, ticket? (worker; the update is on the broker)
task_failed            task_id, worker_id, reason              (worker; the task goes back or dies)
=====================  ===========================================================================
"""

from __future__ import annotations

import json
import logging
from typing import Any

FATES = ("applied", "stale", "duplicate", "rejected", "late", "failed", "incomplete")

SCHEMA: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # name: (required fields, optional fields)
    "waiting_for_workers": (frozenset({"namespace", "have", "need"}), frozenset()),
    "worker_joined": (frozenset({"worker_id"}), frozenset()),
    "worker_left": (frozenset({"worker_id", "reason"}), frozenset()),
    "worker_refused": (frozenset({"worker_id", "reason"}), frozenset()),
    "round_waiting": (frozenset({"round", "have", "wanted", "waited_s"}), frozenset({"failed"})),
    "update_settled": (
        frozenset({"message_id", "fate"}),
        frozenset({"task_id", "worker_id", "reason", "staleness", "weight"}),
    ),
    "version_evaluated": (
        frozenset({"version", "accuracy", "loss", "updates_applied", "staleness_mean", "time_s"}),
        frozenset({"round", "dp_epsilon", "dp_delta", "dp_steps", "params_crc32"}),
    ),
    "round_closed": (frozenset({"round", "version", "updates"}), frozenset()),
    "checkpoint_written": (frozenset({"version", "acked"}), frozenset()),
    "finished": (
        frozenset({"version", "accuracy", "updates_applied", "updates_rejected", "updates_stale",
                   "updates_duplicate", "updates_late", "reached_target", "interrupted", "time_s"}),
        frozenset({"loss", "rounds", "dp_epsilon", "dp_delta"}),
    ),
    "standby": (frozenset({"namespace"}), frozenset()),
    "took_over": (frozenset({"namespace", "incarnation", "version"}), frozenset({"previous"})),
    "task_started": (frozenset({"task_id", "worker_id"}), frozenset({"version", "task_version"})),
    "update_confirmed": (frozenset({"task_id", "message_id", "worker_id"}), frozenset({"ticket"})),
    "task_failed": (frozenset({"task_id", "worker_id", "reason"}), frozenset()),
}

# LogRecord attributes an event field must not shadow
_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "event"}


def check(name: str, fields: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``fields`` match the schema of event ``name``."""
    if name not in SCHEMA:
        raise ValueError(f"unknown event {name!r}; known: {', '.join(sorted(SCHEMA))}")
    required, optional = SCHEMA[name]
    missing = required - fields.keys()
    unknown = fields.keys() - required - optional
    if missing or unknown:
        raise ValueError(f"event {name!r}: missing {sorted(missing)}, unknown {sorted(unknown)}")
    if name == "update_settled" and fields["fate"] not in FATES:
        raise ValueError(f"event 'update_settled': fate {fields['fate']!r} is not one of {FATES}")
    clash = _RESERVED & fields.keys()
    if clash:
        raise ValueError(f"event {name!r}: field(s) {sorted(clash)} clash with log record attributes")


def emit(logger: logging.Logger, name: str, message: str, *args: Any, level: int = logging.INFO,
         **fields: Any) -> None:
    """Log ``message % args`` carrying event ``name`` and its ``fields`` (checked against SCHEMA)."""
    check(name, fields)
    logger.log(level, message, *args, extra={"event": name, **fields})


def parse(line: str) -> dict[str, Any] | None:
    """The event in one JSON log line, or None for any other line (text, non-event JSON)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("event") not in SCHEMA:
        return None
    return doc
