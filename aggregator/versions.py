"""Version numbers across restarts: a number, once published, stands for one set of parameters.

A synchronous aggregator publishes a round's new version while the checkpoint that holds it is
still being written (on another thread): the workers train from it meanwhile. Before it
publishes, the version's history entry, with the CRC-32 of its parameters
(:func:`params_digest`), is on disk (``history.jsonl``, fsync'd). If the aggregator dies before
the checkpoint lands, a resumed one starts from the checkpoint before, and closes that round
again. The entries past its checkpoint's ``history_offset`` are the versions it may have
published (:func:`lost_versions`); :func:`renumber` keeps a version's number only if it comes
out with the same parameters (the same updates, averaged in the same order: the usual case),
and otherwise gives it the next number no lost version used. So a worker that fetched the lost
version can never take it for the new one, and an update trained from it is stale.

An asynchronous aggregator publishes versions between checkpoints too; their entries carry no
digest, and a resumed one makes versions under those numbers again, as it always did (async
updates are weighted by staleness, not tied to a version's bits). Pure functions, no I/O.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from fedmq.shared.files import json_objects

#: the history entry's field that holds :func:`params_digest`
DIGEST_FIELD = "params_crc32"


def params_digest(params: Mapping[str, np.ndarray]) -> str:
    """CRC-32 of the parameters' names and bytes, in name order, as 8 hex digits. It tells two
    versions apart, not an attacker's forgery: it is never sent anywhere."""
    crc = 0
    for name in sorted(params):
        arr = np.ascontiguousarray(params[name])
        crc = zlib.crc32(f"{name}:{arr.dtype.str}:{arr.shape}".encode(), crc)
        crc = zlib.crc32(arr.reshape(-1).view(np.uint8).data, crc)
    return f"{crc:08x}"


def entries_in(tail: bytes) -> list[dict[str, Any]]:
    """The history entries in ``tail`` (bytes of history.jsonl), complete lines only: a line the
    process was writing when it died is not an entry."""
    return json_objects(tail.split(b"\n")[:-1])  # the last piece has no newline: cut short, or empty


def lost_versions(entries: Iterable[Mapping[str, Any]], checkpoint_version: int) -> dict[int, str]:
    """Version -> digest of the sync versions in ``entries`` (history past the checkpoint) newer
    than the checkpoint's: published, perhaps, by the aggregator that died. Entries without a
    digest (async versions) are not counted."""
    lost: dict[int, str] = {}
    for e in entries:
        version, digest = e.get("version"), e.get(DIGEST_FIELD)
        if type(version) is int and version > checkpoint_version and isinstance(digest, str):
            lost[version] = digest
    return lost


def renumber(version: int, digest: str | None, lost: Mapping[int, str]) -> tuple[int, dict[int, str]]:
    """The number for a new version that would be ``version`` (``digest``: its parameters'), and
    the lost versions still to compare against.

    The same number when no lost version has it, or the lost one had the same parameters; past
    every lost version otherwise (and then none is left to compare: the run has moved on)."""
    if not lost:
        return version, {}
    if version in lost and digest is not None and lost[version] == digest:
        return version, {v: d for v, d in lost.items() if v > version}
    if version > max(lost):
        return version, {}
    return max(lost) + 1, {}
