"""A few threads that share large numpy loops (numpy lets go of the GIL inside its loops).

A sync round is averaged, and its next model quantised, while every worker waits; a worker
quantises its update while the broker waits for it. The other cores are free then, and a loop
over tens of megabytes finishes up to LANES times sooner when its blocks are dealt to them.
Every element is still computed by one thread, the same way: results do not depend on the
number of lanes.

``FEDMQ_LANES`` (read by the ``fedmq`` commands at start-up, :func:`configure`) caps the threads:
``1`` keeps every loop on its calling thread, for a machine whose cores are busy anyway.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from fedmq.shared.errors import ConfigError

#: the most FEDMQ_LANES may ask for
MAX_LANES = 64


def _valid(value: str | None) -> int | None:
    """``value`` as a number of lanes, or None if it is not an integer from 1 to MAX_LANES."""
    try:
        wanted = int(value or "")
    except ValueError:
        return None
    return wanted if 1 <= wanted <= MAX_LANES else None


#: threads a large loop is shared between (the calling thread is one of them): FEDMQ_LANES if it
#: is valid (so processes a command spawns, e.g. the pool processes of ``fedmq workers``, follow
#: it too), else min(4, cores); the commands reject an invalid one (:func:`configure`)
LANES = _valid(os.environ.get("FEDMQ_LANES")) or max(1, min(4, os.cpu_count() or 1))

#: below this many elements a loop runs on the calling thread alone (handing blocks to the pool
#: would cost more than it saves: a 100k model)
PARALLEL_MIN = 1 << 22

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_idle: threading.Semaphore | None = None  # helpers not running a lane now


def _helpers() -> tuple[ThreadPoolExecutor, threading.Semaphore]:
    global _pool, _idle
    with _pool_lock:
        if _pool is None or _idle is None:
            _pool = ThreadPoolExecutor(max(1, LANES - 1), thread_name_prefix="fedmq-lane")
            _idle = threading.Semaphore(max(1, LANES - 1))
        return _pool, _idle


def configure(value: str | None) -> None:
    """Set :data:`LANES` from ``FEDMQ_LANES`` (None or empty: the default, min(4, cores)).
    :class:`ConfigError` unless it is an integer from 1 to :data:`MAX_LANES`. Call it before the
    first loop (the pool is made with the lanes of its first use)."""
    global LANES
    if value is None or not value.strip():
        return
    wanted = _valid(value)
    if wanted is None:
        raise ConfigError(f"FEDMQ_LANES must be an integer from 1 to {MAX_LANES} (1: no threads of "
                          f"fedmq's own for large numpy loops), got {value!r}")
    LANES = wanted


def lanes_for(elements: int, items: int) -> int:
    """How many lanes a loop over ``elements`` in ``items`` independent pieces gets."""
    return max(1, min(LANES, items)) if elements >= PARALLEL_MIN else 1


def run_lanes(lane: Callable[[int, int], None], lanes: int) -> None:
    """Call ``lane(k, lanes)`` for k in 0..lanes-1; ``lane(k, n)`` takes the pieces k, k+n, k+2n, ...

    Lane 0 runs on this thread, the others on helpers that are idle now; a lane no helper is free
    for runs on this thread too, after lane 0 (several threads of one process, e.g. the workers
    of ``fedmq workers``, never queue behind each other's lanes). Re-raises the first error once
    every lane is done."""
    if lanes <= 1:
        lane(0, 1)
        return
    pool, idle = _helpers()
    helped = [k for k in range(1, lanes) if idle.acquire(blocking=False)]

    def helper(k: int) -> None:
        try:
            lane(k, lanes)
        finally:
            idle.release()

    others = [pool.submit(helper, k) for k in helped]
    try:
        for k in [0, *(k for k in range(1, lanes) if k not in helped)]:
            lane(k, lanes)
    finally:
        errors = [f.exception() for f in others]
    for error in errors:
        if error is not None:
            raise error
