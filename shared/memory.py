"""The memory budget: refuse a model too big for this machine up front, in one line.

A process that runs out of memory half-way through a round is killed by the kernel with no
word of why; a model that cannot fit is better refused before the run starts. The budget is
``--memory-budget``: a size (``8G``, ``512M``, ``1073741824``), ``auto`` (the default: the memory
this process can still get, the smaller of the host's ``MemAvailable`` and its cgroup's
``memory.max`` less what the cgroup already uses, plus what the process holds already) or
``off``. The need is a multiple of the model's size that each process states (the aggregator's
depends on its strategy: see :func:`fedmq.aggregator.policy.memory_factor`); the multiples are
the peaks measured by ``bench/large_model.py`` rounded up, so the check refuses what would
certainly not fit rather than predict a peak to the byte.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from fedmq.shared.errors import ConfigError

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_budget(text: str | int | None) -> int | str | None:
    """``auto`` (None also means auto), ``off``, or a size in bytes (binary units: 1G = 2**30)."""
    if text is None:
        return "auto"
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ConfigError(f"--memory-budget must be positive, got {text}")
        return text
    value = str(text).strip().lower()
    if value in ("auto", "off"):
        return value
    m = _SIZE.match(value)
    if m is None:
        raise ConfigError(f"--memory-budget must be auto, off or a size such as 8G or 512M, got {text!r}")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise ConfigError(f"--memory-budget must be positive, got {text!r}")
    return size


def _meminfo(key: str, path: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """What this process's cgroup (v2) still allows: memory.max - memory.current; None if unlimited."""
    try:
        rel = next(line.split("::", 1)[1] for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if line.startswith("0::"))
        where = root / rel.strip().lstrip("/")
        limit = (where / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((where / "memory.current").read_text().strip()))
    except (OSError, ValueError, StopIteration):
        return None


def _own_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def available_bytes() -> int | None:
    """The memory this process can still get plus what it holds (None where nothing says)."""
    room = [r for r in (_meminfo("MemAvailable"), _cgroup_room()) if r is not None]
    return min(room) + _own_rss() if room else None


def describe(nbytes: float) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{int(nbytes)} B"


def resolve_budget(budget: int | str | None) -> tuple[int | None, str]:
    """(the budget in bytes, where it comes from); None where there is no limit (``off``, or
    ``auto`` on a system that says nothing of its memory)."""
    budget = parse_budget(budget)
    if budget == "off":
        return None, "off"
    if budget == "auto":
        return available_bytes(), "the memory available to it now"
    assert isinstance(budget, int)
    return budget, "set by --memory-budget"


def check_fits(model_bytes: int, factor: float, budget: int | str | None, *, who: str, why: str) -> None:
    """Raise :class:`ConfigError` (one line, naming the sizes and the options) if ``factor`` x
    ``model_bytes`` is over the budget; ``why`` says what the factor counts."""
    budget, source = resolve_budget(budget)
    if budget is None:
        return
    need = int(model_bytes * factor)
    if need > budget:
        raise ConfigError(
            f"the model ({describe(model_bytes)}) is too big for the {who}'s memory: it needs about "
            f"{describe(need)} ({factor:g} x the model: {why}) but its budget is {describe(budget)} ({source}); "
            "use a smaller model, a machine with more memory, or set --memory-budget (off: no check)")


#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: buffers from this size on get their own map, given back to the kernel when freed: above the
#: 1 MiB a socket read asks for (fedmq.broker.frames.RECV_BYTES: a map per read would cost a
#: syscall and page faults per read), below a 1M-parameter model's 4 MB message
MMAP_THRESHOLD_BYTES = 2 * 1024 * 1024


def give_back_large_buffers(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold so that every buffer of ``threshold`` bytes or more is its own
    map, returned to the kernel the moment it is freed. True if set (glibc only). A FedBuff or
    FedAsync aggregator's setting (for its peak memory; a sync one's: :func:`keep_large_buffers`).

    By default glibc raises the threshold after each large free, up to 32 MiB: from then on the
    aggregator's message bodies (a few MB each, allocated by the I/O thread in its own malloc
    arena, freed by the main thread once applied) are carved from heap arenas that are rarely
    trimmed, and stay in its resident memory: measured ~1.5 models at 10M parameters
    (``bench/scale.py``: 8 MiB chunks). The price: a fresh map's page faults on every large
    buffer, 0.42 s of kernel time per GB on warm memory and ~2.4 s per GB where a virtual
    machine's host has taken freed pages back (see :func:`keep_large_buffers`).
    """
    # the heap's free top is kept up to twice the threshold, as glibc's dynamic setting does
    # (fixing the threshold leaves it at 128 KiB: freed heap memory faulted in again and again)
    return _mallopt(threshold, 2 * int(threshold))


#: buffers up to this size come from the heap and are reused once freed (see :func:`keep_large_buffers`);
#: larger ones (issue 11's 100M+ parameter models, which must stay a few times the model) still get
#: their own map, given back when freed
KEEP_BUFFER_BYTES = 256 * 1024 * 1024
#: free memory at the heap's top kept for reuse: mallopt's largest (a C int); the process's own
#: high-water mark bounds it
_KEEP_FREE_BYTES = 2**31 - 1


def keep_large_buffers(largest: int = KEEP_BUFFER_BYTES) -> bool:
    """Have glibc serve buffers up to ``largest`` bytes from its heaps and keep freed heap memory
    for reuse, where by default it maps every buffer over 32 MiB on its own and unmaps it when
    freed. True if set (glibc only). The workers' setting, and a sync aggregator's.

    Why: a worker's task and a sync round allocate model-sized arrays afresh (a worker: the model
    widened from bfloat16, the trained weights, the delta, its int8 form; the aggregator: each
    update's chunks, assembly and decoding, the average, evaluation), at 10M parameters each
    over 32 MiB, so each task and round page-faulted them in again: 0.42 s of kernel time per
    GB on this machine's warm memory, ~2.4 s per GB where a virtual machine's host has taken the
    freed pages back (free page reporting, as on the machines this is measured on); 80-90 ms of
    the aggregator's CPU per 10M-parameter update. Kept, the next task or round reuses the same
    pages. The price: the process keeps its high-water mark of memory between tasks and rounds.
    (FedBuff and FedAsync aggregators give large buffers back instead, for their peak memory.)
    """
    return _mallopt(largest, _KEEP_FREE_BYTES)


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    libc = _libc()
    if libc is None:
        return False
    try:
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))
                    and libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
    except AttributeError:  # a C library without mallopt (not glibc)
        return False


@functools.cache
def _libc() -> Any:
    """The C library, looked up once per process: ``find_library`` runs ``ldconfig`` (~1.5 ms),
    and every worker of a ``fedmq workers`` pool sets the allocator as it starts."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None
