"""What ``fedmq run`` shows while it runs: a rich live table on a terminal, log lines otherwise.

It is fed the aggregator's events (:mod:`fedmq.shared.events`, as returned by
``events.parse``) and reads only their documented fields, never the human log message:
``worker_joined`` / ``worker_left`` keep the set of live workers, ``update_settled`` counts
each update message once by its fate, ``version_evaluated`` is the row shown,
``waiting_for_workers`` and ``round_waiting`` say what the run waits for (said once in plain
mode). The live table is redrawn on every event (and a few times a second, so that its clock
runs); the aggregator's warnings are printed above it.

Where the run goes: ``round x/y`` (sync; ``y`` is ``--rounds``, or the aggregator's default
of 20 when nothing else stops the run) or ``updates x/y`` (``--max-updates``), and an
estimate of the time left: the mean round time so far times the rounds left (the mean time
per update for ``--max-updates``), capped by ``--time-limit``, the earliest of them. Run time
is the aggregator's (``time_s`` of the last evaluated version) plus the time since that event.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from fedmq.shared.events import FATES

#: the rounds a sync run makes when nothing else stops it (AggregatorConfig.effective_rounds)
DEFAULT_SYNC_ROUNDS = 20


def format_duration(seconds: float) -> str:
    """``8 s``, ``2 min 05 s``, ``1 h 02 min``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _clock_text(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else format_duration(seconds)


class Progress:
    """Fed with the aggregator's events; renders live or as plain lines."""

    def __init__(self, options: dict[str, Any], *, total_workers: int, mode: str = "auto", console: Any = None,
                 clock: Callable[[], float] = time.monotonic, auto_refresh: bool = True) -> None:
        """``console``: the rich console of the live table (default: stdout's); ``clock``: what
        measures the time since the last evaluated version; ``auto_refresh``: also redraw the
        live table 4 times a second (not only on events), so that its clock runs."""
        self.options = options
        self.total_workers = total_workers
        self.live_mode = mode == "live" or (mode == "auto" and sys.stdout.isatty())
        self.last: dict[str, Any] = {}  # the latest version_evaluated event
        self.final: dict[str, Any] = {}  # the finished event, once it came
        self.workers: set[str] = set()
        self.counts: Counter[str] = Counter({fate: 0 for fate in FATES})
        self.waiting: tuple[int, int] | None = None  # (have, need) while the aggregator waits
        self.round_wait: dict[str, Any] | None = None  # the latest round_waiting, until the round closes
        self.clock = clock
        self.started = clock()
        self._last_at = self.started  # when the latest version_evaluated came (self.clock)
        self._lock = threading.Lock()
        self._console = console
        self._auto_refresh = auto_refresh
        self._live: Any = None

    # ------------------------------------------------------------------ events
    def event(self, event: dict[str, Any]) -> None:
        """Take one event (a dict from ``events.parse``); unknown kinds change nothing but the
        live table is redrawn on every event."""
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
                self._last_at = self.clock()
                self.waiting = None
                if self.round_wait is not None and event.get("round") is not None \
                        and int(event["round"]) >= int(self.round_wait["round"]):
                    self.round_wait = None
            elif name == "waiting_for_workers":
                first = self.waiting is None
                self.waiting = (int(event["have"]), int(event["need"]))
                if first:
                    say = f"  waiting for {self.waiting[1]} worker(s) to say hello"
            elif name == "round_waiting":
                first = self.round_wait is None or self.round_wait["round"] != event["round"]
                self.round_wait = dict(event)
                if first:
                    say = "  " + self._round_wait_text()
            elif name == "round_closed":
                self.round_wait = None
            elif name == "finished":
                self.final = dict(event)
        live = self._live
        if live is not None:
            live.refresh()
        elif name == "version_evaluated":
            click.echo(self._line())
        elif say is not None:
            click.echo(say)

    def notice(self, level: str, text: str) -> None:
        """A warning or error the aggregator logged: printed above the live table, or as a line
        on stderr in plain mode."""
        live = self._live
        if live is not None:
            from rich.text import Text

            live.console.print(Text(f"aggregator {level}: ", style="bold red" if level != "warning" else "yellow")
                               + Text(text))  # Text: a message's [brackets] are not markup
        else:
            click.echo(f"  aggregator {level}: {text}", err=True)

    # ------------------------------------------------------------------ where the run goes
    def rounds_total(self) -> int | None:
        """``y`` of ``round x/y``: --rounds, or the sync default when nothing else stops the run."""
        o = self.options
        if o.get("rounds"):
            return int(o["rounds"])
        if o.get("mode") == "sync" and not (o.get("max_updates") or o.get("target_accuracy") or o.get("time_limit")):
            return DEFAULT_SYNC_ROUNDS
        return None

    def run_time_s(self) -> float:
        """The aggregator's run time: the last evaluated version's ``time_s`` plus the time since
        it came (0 before the first)."""
        if self.final.get("time_s") is not None:
            return float(self.final["time_s"])
        if not self.last:
            return 0.0
        return float(self.last.get("time_s") or 0.0) + max(0.0, self.clock() - self._last_at)

    def remaining_s(self) -> float | None:
        """Estimated seconds left (None when nothing bounds the run, or before the first
        evaluated version): the earliest of the rounds left times the mean round time so far,
        the updates left at the mean time per update so far, and --time-limit."""
        d = self.last
        if self.final:
            return 0.0
        if not d:
            return None
        t = float(d.get("time_s") or 0.0)
        since = max(0.0, self.clock() - self._last_at)
        left: list[float] = []
        total, done = self.rounds_total(), d.get("round")
        if total is not None and done and t > 0:
            left.append((total - int(done)) * t / int(done) - since)
        max_updates, applied = self.options.get("max_updates"), int(d.get("updates_applied") or 0)
        if max_updates and applied > 0 and t > 0:
            left.append((int(max_updates) - applied) * t / applied - since)
        if self.options.get("time_limit"):
            left.append(float(self.options["time_limit"]) - t - since)
        return max(0.0, min(left)) if left else None

    def where(self) -> str:
        """``round 2/10``, ``round 2``, ``updates 30/200``, ``version 7``."""
        d = self.last
        if d.get("round") is not None:
            total = self.rounds_total()
            return f"round {d['round']}" + (f"/{total}" if total else "")
        if self.options.get("max_updates"):
            return f"updates {d.get('updates_applied', 0)}/{self.options['max_updates']}"
        return f"version {d.get('version', 0)}"

    def _round_wait_text(self) -> str:
        w = self.round_wait or {}
        failed = f", {w['failed']} failed" if w.get("failed") else ""
        return f"round {w.get('round')} waits for updates: {w.get('have')}/{w.get('wanted')}{failed} after {float(w.get('waited_s', 0)):.0f} s"

    # ------------------------------------------------------------------ rendering
    def _rate(self) -> float:
        t = float(self.last.get("time_s") or 0.0)
        return float(self.last.get("updates_applied", 0)) / t if t > 0 else 0.0

    def _eta(self) -> str:
        if self.final:
            return "done"
        left = self.remaining_s()
        return "-" if left is None else "~" + format_duration(left)

    def _line(self) -> str:
        d = self.last
        if d.get("round") is not None:
            total = self.rounds_total()
            where = f"round {d['round']:3d}" + (f"/{total}" if total else "")
        else:
            where = f"version {d.get('version', 0):4d}"
        left = self.remaining_s()
        return (f"{where}  acc {d.get('accuracy', 0):.4f}  loss {d.get('loss', 0):.4f}  "
                f"updates {d.get('updates_applied', 0)} ({self._rate():.1f}/s)  staleness {d.get('staleness_mean', 0):.2f}  "
                f"workers {len(self.workers)}/{self.total_workers}  "
                f"stale {self.counts['stale']}  dead-lettered {self.counts['rejected']}  t={d.get('time_s', 0):.1f}s"
                + (f"  left ~{format_duration(left)}" if left is not None else ""))

    def _table(self) -> Any:
        from rich.table import Table

        with self._lock:
            d = dict(self.last)
            strategy = self.options.get("strategy") or ("fedbuff" if self.options.get("mode") == "async" else "fedavg")
            table = Table(title=f"fedmq run: {self.options.get('mode', '?')} / {strategy}", caption=self._caption())
            by_round = d.get("round") is not None
            for col in ("round" if by_round else "version", "accuracy", "loss", "updates/s", "mean staleness",
                        "workers", "stale", "dead-lettered", "time", "left"):
                table.add_column(col, justify="right")
            if by_round:
                total = self.rounds_total()
                where = f"{d['round']}/{total}" if total else str(d["round"])
            else:
                where = str(d.get("version", "-"))
            table.add_row(
                where, f"{d.get('accuracy', 0):.4f}", f"{d.get('loss', 0):.4f}", f"{self._rate():.1f}",
                f"{d.get('staleness_mean', 0):.2f}", f"{len(self.workers)}/{self.total_workers}",
                str(self.counts["stale"]), str(self.counts["rejected"]), _clock_text(self.run_time_s()),
                self._eta(),
            )
        return table

    def _caption(self) -> str | None:
        if self.final:
            return "finished"
        if self.waiting is not None:
            return f"waiting for workers to say hello: {self.waiting[0]}/{self.waiting[1]}"
        if self.round_wait is not None:
            return self._round_wait_text()
        if not self.last:
            return f"starting: {self.counts['applied']} update(s) so far"
        return None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self.live_mode:
            from rich.live import Live

            # get_renderable: every refresh (each event, and 4 times a second) draws the state
            self._live = Live(get_renderable=self._table, console=self._console, refresh_per_second=4,
                              auto_refresh=self._auto_refresh, transient=False)
            self._live.start(refresh=True)
        else:
            click.echo(f"fedmq run: {self.total_workers} workers, {self.options['mode']} mode; progress per evaluated version")

    def stop(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.refresh()
            live.stop()

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
            ("privacy spent", f"epsilon = {final['dp_epsilon']:.4g} at delta = {final.get('dp_delta'):g} (user-level)"
             if final.get("dp_epsilon") is not None else None),
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
            (self._console or Console()).print(table)
        else:
            for k, v in rows:
                if v is not None:
                    click.echo(f"  {k:<30} {v}")
