"""What ``fedmq run`` shows while it runs: a rich live table on a terminal, log lines otherwise.

It is fed the aggregator's events (:mod:`fedmq.shared.events`, as returned by
``events.parse``) and reads only their documented fields, never the human log message:
``worker_joined`` / ``worker_left`` keep the set of live workers, ``update_settled`` counts
each update message once by its fate, ``version_evaluated`` is the row shown, and
``waiting_for_workers`` is said once in plain mode.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click

from fedmq.shared.events import FATES


class Progress:
    """Fed with the aggregator's events; renders live or as plain lines."""

    def __init__(self, options: dict[str, Any], *, total_workers: int, mode: str = "auto") -> None:
        self.options = options
        self.total_workers = total_workers
        self.live_mode = mode == "live" or (mode == "auto" and sys.stdout.isatty())
        self.last: dict[str, Any] = {}  # the latest version_evaluated event
        self.final: dict[str, Any] = {}  # the finished event, once it came
        self.workers: set[str] = set()
        self.counts: Counter[str] = Counter({fate: 0 for fate in FATES})
        self.waiting: tuple[int, int] | None = None  # (have, need) while the aggregator waits
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._live: Any = None

    # ------------------------------------------------------------------ events
    def event(self, event: dict[str, Any]) -> None:
        """Take one event (a dict from ``events.parse``); unknown kinds are ignored."""
        name = event.get("event")
        say: str | None = None
        with self._lock:
            if name == "worker_joined":
                self.workers.add(str(event["worker_id"]))
            elif name == "worker_left":
                self.workers.discard(str(event["worker_id"]))
            elif name == "update_settled":
                self.counts[str(event["fate"])] += 1
            elif name == "version_evaluated":
                self.last = dict(event)
                self.waiting = None
            elif name == "waiting_for_workers":
                first = self.waiting is None
                self.waiting = (int(event["have"]), int(event["need"]))
                if first:
                    say = f"  waiting for {self.waiting[1]} worker(s) to say hello"
            elif name == "finished":
                self.final = dict(event)
            else:
                return
        if self._live is not None:
            self._live.update(self._table())
        elif name == "version_evaluated":
            click.echo(self._line())
        elif say is not None:
            click.echo(say)

    def notice(self, level: str, text: str) -> None:
        """A warning or error the aggregator logged: shown as is in plain mode."""
        if not self.live_mode:
            click.echo(f"  aggregator {level}: {text}", err=True)

    # ------------------------------------------------------------------ rendering
    def _rate(self) -> float:
        t = float(self.last.get("time_s") or 0.0)
        return float(self.last.get("updates_applied", 0)) / t if t > 0 else 0.0

    def _line(self) -> str:
        d = self.last
        where = f"round {d['round']:3d}" if d.get("round") is not None else f"version {d.get('version', 0):4d}"
        return (f"{where}  acc {d.get('accuracy', 0):.4f}  loss {d.get('loss', 0):.4f}  "
                f"updates {d.get('updates_applied', 0)} ({self._rate():.1f}/s)  staleness {d.get('staleness_mean', 0):.2f}  "
                f"workers {len(self.workers)}/{self.total_workers}  "
                f"stale {self.counts['stale']}  dead-lettered {self.counts['rejected']}  t={d.get('time_s', 0):.1f}s")

    def _table(self) -> Any:
        from rich.table import Table

        d = self.last
        strategy = self.options.get("strategy") or ("fedavg" if self.options["mode"] == "sync" else "fedbuff")
        table = Table(title=f"fedmq run: {self.options['mode']} / {strategy}")
        by_round = d.get("round") is not None
        for col in ("round" if by_round else "version", "accuracy", "loss", "updates/s", "mean staleness",
                    "workers", "stale", "dead-lettered", "time"):
            table.add_column(col, justify="right")
        table.add_row(
            str(d["round"] if by_round else d.get("version", "-")), f"{d.get('accuracy', 0):.4f}",
            f"{d.get('loss', 0):.4f}", f"{self._rate():.1f}", f"{d.get('staleness_mean', 0):.2f}",
            f"{len(self.workers)}/{self.total_workers}", str(self.counts["stale"]), str(self.counts["rejected"]),
            f"{d.get('time_s', 0):.1f}s",
        )
        return table

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self.live_mode:
            from rich.live import Live

            self._live = Live(self._table(), refresh_per_second=4, transient=False)
            self._live.start()
        else:
            click.echo(f"fedmq run: {self.total_workers} workers, {self.options['mode']} mode; progress per evaluated version")

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def summary(self, final: dict[str, Any], out: Path) -> None:
        """Print the run's result: ``final`` is the aggregator's result document (default: its
        ``finished`` event)."""
        final = final or self.final
        rows = [
            ("final version", final.get("version")), ("rounds", final.get("rounds")),
            ("accuracy", f"{final['accuracy']:.4f}" if final.get("accuracy") is not None else "-"),
            ("loss", f"{final['loss']:.4f}" if final.get("loss") is not None else "-"),
            ("time", f"{final.get('time_s', 0):.1f} s"), ("updates applied", final.get("updates_applied")),
            ("rejected / stale / duplicate", f"{final.get('updates_rejected')} / {final.get('updates_stale')} / {final.get('updates_duplicate')}"),
            ("reached target", final.get("reached_target")),
            ("interrupted", "yes: continue with --resume --out " + str(out) if final.get("interrupted") else None),
            ("run directory", str(out)),
        ]
        if self.live_mode:
            from rich.console import Console
            from rich.table import Table

            table = Table(title="fedmq run: summary", show_header=False)
            for k, v in rows:
                if v is not None:
                    table.add_row(k, str(v))
            Console().print(table)
        else:
            for k, v in rows:
                if v is not None:
                    click.echo(f"  {k:<30} {v}")
