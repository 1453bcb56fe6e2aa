"""Crash-safe file writes shared by every package: temp file, fsync, rename, fsync the directory.

A reader sees the old file or the new one, never a torn mix, and a failed write leaves no
temp file behind.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object], *,
                       before_replace: Callable[[], object] | None = None) -> None:
    """Write ``path`` by calling ``write(fileobj)`` on a temp file beside it, then renaming.

    ``before_replace()`` is called once the temp file is on disk, just before the rename: if it
    raises, the temp file is removed and ``path`` is left as it was."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; run and shard files are read by other processes
        if before_replace is not None:
            before_replace()
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def spill_allocator(directory: str | os.PathLike[str]) -> Callable[[int], mmap.mmap]:
    """An allocator of ``size``-byte buffers backed by files in ``directory`` instead of RAM.

    Each buffer is a shared map of a new file that is unlinked at once: the kernel may write its
    pages out and drop them (they are page cache, not anonymous memory), and the space is freed
    when the last view of the buffer goes, or the process dies; nothing is left to clean up.
    """
    where = Path(directory)

    def allocate(size: int) -> mmap.mmap:
        where.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="payload-", suffix=".part", dir=where)
        try:
            os.unlink(path)
            os.ftruncate(fd, size)
            return mmap.mmap(fd, size)
        finally:
            os.close(fd)

    return allocate


def drop_resident_pages(view: memoryview) -> None:
    """Let the kernel take back the pages of a :func:`spill_allocator` buffer from this process.

    Its pages are a shared file mapping: they leave the process's resident set (RSS) and stay in
    the page cache or on disk; the next read faults them back in. Anything else is left alone.
    """
    owner = view.obj
    if isinstance(owner, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):
            owner.madvise(mmap.MADV_DONTNEED)


def release_pages(buffer: memoryview | np.ndarray) -> None:
    """Let the kernel take back, from this process, the pages under a stretch of a
    :func:`spill_allocator` buffer (a slice of it, or an array that views one) — the pages of the
    stretch and the partial pages at its ends; they stay in the page cache or on disk and fault
    back in on the next read, so nothing is lost (a shared file mapping). Anything else: no-op.
    """
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    owner: object = buffer
    while isinstance(owner, np.ndarray):
        owner = owner.base
    if isinstance(owner, memoryview):
        owner = owner.obj
    if not isinstance(owner, mmap.mmap) or owner.closed:
        return
    with contextlib.suppress(OSError, ValueError, TypeError):
        data = buffer if isinstance(buffer, np.ndarray) else np.frombuffer(buffer, dtype=np.uint8)
        if data.size == 0:
            return
        start = int(data.ctypes.data) - int(np.frombuffer(owner, dtype=np.uint8).ctypes.data)
        end = start + int(data.nbytes)
        if start < 0 or end > len(owner):
            return
        first = start - start % mmap.PAGESIZE
        owner.madvise(mmap.MADV_DONTNEED, first, end - first)


def payload_allocator(directory: str | os.PathLike[str], memory_bytes: int) -> Callable[[int], np.ndarray | mmap.mmap]:
    """An allocator that gives buffers in memory while those it gave and still live add up to at
    most ``memory_bytes``, and :func:`spill_allocator` buffers in ``directory`` beyond that.

    A memory buffer is ``np.empty`` (no zero-fill: its pages are only taken as they are written);
    it counts until the last view of it goes. ``memory_bytes`` = 0: every buffer spills.
    """
    spill = spill_allocator(directory)
    live = [0]  # bytes of memory buffers not yet freed (a finalizer runs on whichever thread frees one)
    lock = threading.Lock()

    def freed(size: int) -> None:
        with lock:
            live[0] -= size

    def allocate(size: int) -> np.ndarray | mmap.mmap:
        with lock:
            fits = live[0] + size <= memory_bytes
            if fits:
                live[0] += size
        if not fits:
            return spill(size)
        buffer = np.empty(size, dtype=np.uint8)
        weakref.finalize(buffer, freed, size)
        return buffer

    return allocate


def json_objects(lines: Iterable[str | bytes]) -> list[dict[str, Any]]:
    """The JSON objects among ``lines`` (of a JSON-lines file), in order; a line that is not one
    (cut short by a crash or a read window, or being written by another process) is skipped."""
    out: list[dict[str, Any]] = []
    for line in lines:
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out
