"""The checkpoint's form of task-id collections: runs of consecutive asynchronous ids.

An asynchronous run issues ``a<seq>-<incarnation>`` ids with consecutive sequence numbers, and
applies most of them in order; a checkpoint holds up to --issued-memory of them, with a status
and whether they were applied. Written one by one that is ~50 KB per 1,000 ids at every
checkpoint; as runs ``[incarnation, first, last, status, digits]`` it is a few runs. The order of the
issued ids (oldest first: the memory drops the oldest) is kept exactly: a run only continues the
previous id. Ids of another form (synchronous tickets, anything else) stay as ``[id, status]``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Set
from typing import Any

#: ids whose parse is kept: a checkpoint's --issued-memory (default 4,096) and then some
PARSE_CACHE = 16384
#: an asynchronous task id: a<sequence number, 6 digits or more>-<incarnation>
ASYNC_ID = re.compile(r"a(\d{6,})-(.+)", re.DOTALL)


@functools.lru_cache(maxsize=PARSE_CACHE)
def _parse(task_id: str) -> tuple[str, int, int] | None:
    """``(incarnation, seq, digits)`` of an async id, None for any other (string operations, and
    cached: every checkpoint packs the same few thousand ids again, and parsing them was most of
    its cost: 3.7 of the 4.1 s a 3,000-update run spent in ``to_meta``)."""
    dash = task_id.find("-")
    digits = task_id[1:dash]
    if dash < 0 or task_id[:1] != "a" or len(digits) < 6 or not digits.isdigit() or not digits.isascii() or dash + 1 == len(task_id):
        return None
    return task_id[dash + 1:], int(digits), len(digits)


def pack(ids: Mapping[str, str]) -> list[list[Any]]:
    """``{task id: status}`` in its order, as runs: ``[incarnation, first, last, status, digits]``
    for consecutive async ids, ``[task id, status]`` for any other."""
    return _pack(ids, frozenset())


def _pack(ids: Mapping[str, str], applied: Set[str]) -> list[list[Any]]:
    """:func:`pack` of ``ids``, the status of each id in ``applied`` marked (one pass)."""
    runs: list[list[Any]] = []
    last: list[Any] | None = None
    parse = _parse
    for task_id, status in ids.items():
        if task_id in applied:
            status += APPLIED_MARK
        parsed = parse(task_id)
        if parsed is None:
            runs.append([task_id, status])
            last = None
            continue
        incarnation, seq, width = parsed
        if last is not None and last[2] + 1 == seq and last[3] == status and last[0] == incarnation and last[4] == width:
            last[2] = seq
        else:
            last = [incarnation, seq, seq, status, width]
            runs.append(last)
    return runs


def unpack(runs: Iterable[list[Any]]) -> dict[str, str]:
    """The inverse of :func:`pack` (ValueError for a malformed run)."""
    out: dict[str, str] = {}
    for run in runs:
        if len(run) == 2:
            out[str(run[0])] = str(run[1])
        elif len(run) == 5:
            incarnation, first, last, status, width = str(run[0]), int(run[1]), int(run[2]), str(run[3]), int(run[4])
            if last < first:
                raise ValueError(f"a run of task ids that ends before it starts: {run!r}")
            for seq in range(first, last + 1):
                out[f"a{seq:0{width}d}-{incarnation}"] = status
        else:
            raise ValueError(f"not a run of task ids: {run!r}")
    return out


def pack_set(ids: Iterable[str]) -> list[list[Any]]:
    """A set of task ids as runs (async ids in sequence order, then the others)."""
    parsed: list[tuple[str, int, int]] = []
    others: list[str] = []
    for task_id in ids:
        p = _parse(task_id)
        if p is None:
            others.append(task_id)
        else:
            parsed.append(p)
    parsed.sort()
    runs: list[list[Any]] = []
    for incarnation, seq, width in parsed:
        last = runs[-1] if runs else None
        if last is not None and last[2] + 1 == seq and last[0] == incarnation and last[4] == width:
            last[2] = seq
        else:
            runs.append([incarnation, seq, seq, "", width])
    return runs + [[t, ""] for t in sorted(others)]


def unpack_set(runs: Iterable[list[Any]]) -> set[str]:
    return set(unpack(runs))


#: appended to the status of an issued id that is also applied (:func:`pack_marked`)
APPLIED_MARK = "/applied"


def pack_marked(issued: Mapping[str, str], applied: Set[str]) -> list[list[Any]]:
    """``issued`` as runs, the status of each id also in ``applied`` marked: the applied ids of
    an async run are nearly all still issued, and packing them once with it is half the work."""
    return _pack(issued, applied)


def unpack_marked(runs: Iterable[list[Any]]) -> tuple[dict[str, str], set[str]]:
    """The inverse of :func:`pack_marked`: the issued ids with their statuses, and the applied ones."""
    issued: dict[str, str] = {}
    applied: set[str] = set()
    for task_id, status in unpack(runs).items():
        if status.endswith(APPLIED_MARK):
            applied.add(task_id)
            status = status[: -len(APPLIED_MARK)]
        issued[task_id] = status
    return issued, applied
