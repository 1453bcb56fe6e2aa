"""A few threads that share large numpy loops (numpy lets go of the GIL inside its loops).

A sync round is averaged, and its next model quantised, while every worker waits; a worker
quantises its update while the broker waits for it. The other cores are free then, and a loop
over tens of megabytes finishes up to LANES times sooner when its blocks are dealt to them.
Every element is still computed by one thread, the same way: results do not depend on the
number of lanes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

#: threads a large loop is shared between (the calling thread is one of them)
LANES = max(1, min(4, os.cpu_count() or 1))

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
