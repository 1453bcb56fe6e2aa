"""Summarise a py-spy ``record --format raw [--threads]`` file: the hottest functions.

The bench scripts record the aggregator with ``--profile DIR``; this prints, per thread,
the share of samples each function is on the stack (inclusive) and on top (self), so that
BENCHMARKS.md can cite where the time goes.
Run: ``python bench/pyspy_top.py FILE [--top 15] [--match SUBSTRING]``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^:()]*)(?::(?P<line>\d+))?\)$")


def short(frame: str) -> str:
    """``fn (path/to/module.py:123)`` -> ``module.py:fn``."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    parts = Path(path).parts
    where = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{where}:{m.group('fn')}"


def load(path: Path) -> dict[str, list[tuple[list[str], int]]]:
    """thread -> [(frames root first, count)]"""
    threads: dict[str, list[tuple[list[str], int]]] = defaultdict(list)
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = "all"
        if frames and frames[0].startswith(("thread (", "process ")):
            while frames and frames[0].startswith(("thread (", "process ")):
                head = frames.pop(0)
                if head.startswith("thread ("):
                    thread = head
        threads[thread].append(([short(f) for f in frames], int(count)))
    return threads


def summarise(path: Path, top: int = 15, match: str | None = None) -> str:
    out = []
    threads = load(path)
    grand = sum(c for rows in threads.values() for _, c in rows)
    out.append(f"{path.name}: {grand} samples")
    for thread, rows in sorted(threads.items(), key=lambda kv: -sum(c for _, c in kv[1])):
        total = sum(c for _, c in rows)
        if total < 0.02 * grand:
            continue
        incl: Counter[str] = Counter()
        self_: Counter[str] = Counter()
        for frames, count in rows:
            for fn in set(frames):
                incl[fn] += count
            if frames:
                self_[frames[-1]] += count
        out.append(f"\n{thread}: {total} samples ({100 * total / grand:.0f}% of all)")
        out.append("  inclusive:")
        shown = 0
        for fn, c in incl.most_common():
            if match and match not in fn:
                continue
            out.append(f"    {100 * c / total:5.1f}%  {fn}")
            shown += 1
            if shown >= top:
                break
        out.append("  self:")
        for fn, c in self_.most_common(10):
            out.append(f"    {100 * c / total:5.1f}%  {fn}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--match", default=None, help="only inclusive entries containing this text")
    args = parser.parse_args(argv)
    print(summarise(args.file, args.top, args.match))
    return 0


if __name__ == "__main__":
    sys.exit(main())
