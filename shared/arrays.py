"""Large buffers lent again once nothing refers to them: the aggregator's model-sized arrays.

Each update the aggregator receives is put together in a buffer of its size and decompressed into
float32 arrays of the model's size; a sync round holds N of them until it closes, FedBuff K. With
glibc's default (and the aggregator's own setting, :func:`fedmq.shared.memory.give_back_large_buffers`)
every such buffer is a fresh map, unmapped when freed, so each round page-faults all of them in
again: 0.42 s of kernel time per GB on warm memory, ~2.4 s per GB where a virtual machine's host
has taken the freed pages back (free page reporting), i.e. 80-90 ms of CPU per 10M-parameter
update. :class:`ArrayPool` keeps the buffers it lent and lends one again once its reference count
shows that nothing else holds it (no array, view or memoryview of it is left anywhere), so the
next round reuses the same pages.

The pool never holds more than ``max_bytes``, nor more than it once had lent at the same time:
after lending a new buffer it lets go of free ones (oldest first) until it is back under both, and
a buffer that would not fit is an ordinary one. Whoever makes a pool sets ``max_bytes`` to what it
holds at its peak anyway (the aggregator: a sync round's updates), so that buffers kept free add
nothing to the process's peak memory.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

#: ``empty(shape, dtype)``: where a decoder takes the arrays it fills (``np.empty`` by default)
Empty = Callable[[tuple[int, ...], Any], np.ndarray]

#: buffers under this size come from numpy directly: malloc keeps and reuses them already
MIN_POOLED_BYTES = 4 * 1024 * 1024

# a pooled buffer nobody else holds: the pool's list, the local name and getrefcount's argument
_FREE_REFS = 3


class ArrayPool:
    """Lends ``np.empty``-like arrays (contents undefined) as views of pooled byte buffers; thread-safe.

    A lent array is a view of a pooled buffer, so the buffer is in use exactly as long as that array,
    any view or slice of it, or any memoryview of it lives (CPython's reference count says so).
    """

    def __init__(self, max_bytes: int = 0, min_bytes: int = MIN_POOLED_BYTES) -> None:
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes
        self._buffers: list[np.ndarray] = []  # uint8, oldest first
        self._lock = threading.Lock()
        self._peak_lent = 0
        self.reused = 0  # buffers lent again (for the tests and benchmarks)
        self.allocated = 0

    def empty(self, shape: tuple[int, ...] | int, dtype: Any = np.float32) -> np.ndarray:
        dt = np.dtype(dtype)
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = math.prod(dims) * dt.itemsize
        if not self.min_bytes <= nbytes <= self.max_bytes:
            return np.empty(dims, dt)
        with self._lock:
            buffer = self._free_buffer(nbytes)
            if buffer is not None:
                self.reused += 1
                return buffer.view(dt).reshape(dims)
            lent = self._lent_bytes()
            if lent + nbytes > self.max_bytes:
                return np.empty(dims, dt)
            buffer = np.empty(nbytes, np.uint8)
            self._buffers.append(buffer)
            self.allocated += 1
            self._peak_lent = max(self._peak_lent, lent + nbytes)
            self._trim()
            return buffer.view(dt).reshape(dims)

    @property
    def bytes_held(self) -> int:
        with self._lock:
            return sum(b.nbytes for b in self._buffers)

    def _free_buffer(self, nbytes: int) -> np.ndarray | None:
        for i in range(len(self._buffers)):
            buffer = self._buffers[i]
            if buffer.nbytes == nbytes and sys.getrefcount(buffer) == _FREE_REFS:
                return buffer
        return None

    def _lent_bytes(self) -> int:
        total = 0
        for i in range(len(self._buffers)):
            buffer = self._buffers[i]
            if sys.getrefcount(buffer) > _FREE_REFS:
                total += buffer.nbytes
        return total

    def _trim(self) -> None:
        """Let free buffers go, oldest first, until the pool holds no more than its high-water mark."""
        held = sum(b.nbytes for b in self._buffers)
        limit = min(self._peak_lent, self.max_bytes)
        i = 0
        while held > limit and i < len(self._buffers):
            buffer = self._buffers[i]
            if sys.getrefcount(buffer) == _FREE_REFS:
                held -= buffer.nbytes
                del self._buffers[i]
            else:
                i += 1
