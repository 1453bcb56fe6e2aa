"""What ``fedmq run`` shows while it runs: a rich live table on a terminal, log lines otherwise."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import click


class Progress:
    """Fed with the aggregator's JSON log events; renders live or as plain lines."""

    def __init__(self, options: dict[str, Any], *, total_workers: int, mode: str = "auto") -> None:
        self.options = options
        self.total_workers = total_workers
        self.live_mode = mode == "live" or (mode == "auto" and sys.stdout.isatty())
        self.last: dict[str, Any] = {}
        self.workers: set[str] = set()
        self.counts = {"rejected": 0, "stale": 0, "duplicate": 0}
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._live: Any = None

    # ------------------------------------------------------------------ events
    def event(self, doc: dict[str, Any]) -> None:
        msg = str(doc.get("msg", ""))
        with self._lock:
            if doc.get("event") == "evaluated":
                self.last = doc
            elif msg.startswith("worker ") and msg.endswith(" joined"):
                self.workers.add(msg.split()[1])
            elif msg.startswith("update ") and ": " in msg:
                fate = msg.split(": ", 1)[1].split(" ", 1)[0]
                if fate in self.counts:
                    self.counts[fate] += 1
            elif msg.startswith("rejecting update"):
                self.counts["rejected"] += 1
        if doc.get("level") in ("warning", "error") and not self.live_mode:
            click.echo(f"  aggregator {doc.get('level')}: {msg}", err=True)
        if doc.get("event") == "evaluated":
            if self._live is not None:
                self._live.update(self._table())
            else:
                click.echo(self._line())

    def _rate(self) -> float:
        t = float(self.last.get("time_s") or 0.0)
        return float(self.last.get("updates_applied", 0)) / t if t > 0 else 0.0

    def _line(self) -> str:
        d = self.last
        where = f"round {d['round']:3d}" if "round" in d else f"version {d.get('version', 0):4d}"
        return (f"{where}  acc {d.get('accuracy', 0):.4f}  loss {d.get('loss', 0):.4f}  "
                f"updates {d.get('updates_applied', 0)} ({self._rate():.1f}/s)  staleness {d.get('staleness_mean', 0):.2f}  "
                f"workers {len(self.workers)}/{self.total_workers}  dead-lettered {self.counts['rejected']}  t={d.get('time_s', 0):.1f}s")

    def _table(self) -> Any:
        from rich.table import Table

        d = self.last
        table = Table(title=f"fedmq run: {self.options['mode']} / {self.options.get('strategy') or ('fedavg' if self.options['mode'] == 'sync' else 'fedbuff')}")
        for col in ("round" if "round" in d else "version", "accuracy", "loss", "updates/s", "mean staleness",
                    "workers", "dead-lettered", "time"):
            table.add_column(col, justify="right")
        table.add_row(
            str(d.get("round", d.get("version", "-"))), f"{d.get('accuracy', 0):.4f}", f"{d.get('loss', 0):.4f}",
            f"{self._rate():.1f}", f"{d.get('staleness_mean', 0):.2f}", f"{len(self.workers)}/{self.total_workers}",
            str(self.counts["rejected"]), f"{d.get('time_s', 0):.1f}s",
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
        rows = [
            ("final version", final.get("version")), ("rounds", final.get("rounds")),
            ("accuracy", f"{final['accuracy']:.4f}" if final.get("accuracy") is not None else "-"),
            ("loss", f"{final['loss']:.4f}" if final.get("loss") is not None else "-"),
            ("time", f"{final.get('time_s', 0):.1f} s"), ("updates applied", final.get("updates_applied")),
            ("rejected / stale / duplicate", f"{final.get('updates_rejected')} / {final.get('updates_stale')} / {final.get('updates_duplicate')}"),
            ("reached target", final.get("reached_target")), ("run directory", str(out)),
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
