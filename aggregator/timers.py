"""Keys stamped with a time, and which of them are older than a timeout, without a scan per event.

The coordinator keeps two such tables: live workers (stamped by their last hello or heartbeat)
and outstanding asynchronous tasks (stamped when issued). With N workers, every presence
message, update and tick asks "has anyone expired?" and "when is the next expiry?". A scan of
the whole table for each is O(N) per event, so the aggregator's CPU per update grew with N
(1,000 workers send 200 heartbeats a second). :class:`Stamps` keeps a lower bound of its oldest
stamp instead: nothing can have expired while ``now - bound <= timeout``, and only when that
bound passes is the table scanned (which sets the exact bound again). Refreshing or removing
the oldest key leaves the bound low, which costs one early scan, never a missed expiry.
"""

from __future__ import annotations

import math
from collections.abc import ItemsView, Iterator, KeysView, MutableMapping, ValuesView


class Stamps(MutableMapping[str, float]):
    """A ``dict`` of key -> time, with :meth:`expired` and :meth:`next_expiry` for a fixed ``timeout``."""

    def __init__(self, timeout: float, items: MutableMapping[str, float] | None = None) -> None:
        self.timeout = timeout
        self._at: dict[str, float] = {}
        self._bound = math.inf  # <= every stamp held
        self.scans = 0  # full scans so far (see the module's docstring)
        if items:
            self.update(items)

    def __getitem__(self, key: str) -> float:
        return self._at[key]

    def __setitem__(self, key: str, value: float) -> None:
        self._at[key] = value
        if value < self._bound:
            self._bound = value

    def __delitem__(self, key: str) -> None:
        del self._at[key]
        if not self._at:
            self._bound = math.inf

    def __iter__(self) -> Iterator[str]:
        return iter(self._at)

    def __len__(self) -> int:
        return len(self._at)

    # the dict's own views and lookups: Mapping's generic ones go through __getitem__ per key
    def __contains__(self, key: object) -> bool:
        return key in self._at

    def keys(self) -> KeysView[str]:
        return self._at.keys()

    def values(self) -> ValuesView[float]:
        return self._at.values()

    def items(self) -> ItemsView[str, float]:
        return self._at.items()

    def __repr__(self) -> str:
        return f"Stamps(timeout={self.timeout!r}, {self._at!r})"

    def expired(self, now: float) -> list[str]:
        """Remove and return the keys stamped more than ``timeout`` before ``now``, oldest order kept."""
        if now - self._bound <= self.timeout:
            return []
        self.scans += 1
        old = [k for k, t in self._at.items() if now - t > self.timeout]
        for k in old:
            del self._at[k]
        self._bound = min(self._at.values(), default=math.inf)
        return old

    def next_expiry(self) -> float | None:
        """A time at or before the first expiry (None when empty): wake then and call :meth:`expired`."""
        return None if not self._at else self._bound + self.timeout
