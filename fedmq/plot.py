"""``fedmq plot``: learning curves of one or more runs, against wall time and against updates,
the staleness of the updates each run applied, and per run a timeline of its workers.

The timeline has one row per worker id: each update message the aggregator settled (a line
of ``updates.jsonl``) is a marker at its arrival (``time_s``), coloured by its fate, with a
line back to when its training started (``time_s - duration_s``) where the update says how
long it trained. A row's label gives the worker's applied / total updates and their mean
staleness, so stragglers stand out (fewer markers, more staleness).

Each run's target accuracy line comes from its own configuration (``history.json``
``config.target_accuracy``; none for a run without one) unless ``target`` is given.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedmq.rundir import complete_history, read_jsonl
from fedmq.shared.errors import ConfigError


def load_history(run_dir: str) -> dict[str, Any]:
    path = Path(run_dir) / "history.json"
    try:
        return complete_history(Path(run_dir), json.loads(path.read_text()))
    except FileNotFoundError:
        raise ConfigError(f"{run_dir} has no history.json (is it a fedmq run directory?)") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None


def read_ledger(run_dir: str) -> list[dict[str, Any]]:
    """The entries of ``updates.jsonl`` (a line being written, or not JSON, is skipped)."""
    return read_jsonl(Path(run_dir) / "updates.jsonl")


#: marker colour of each fate on the timeline (the fates of fedmq.shared.events.FATES)
FATE_COLOURS = {
    "applied": "tab:green", "stale": "tab:orange", "late": "tab:grey", "duplicate": "tab:purple",
    "rejected": "tab:red", "failed": "black", "incomplete": "tab:brown",
}


def worker_rows(entries: list[dict[str, Any]]) -> list[str]:
    """The worker ids of the timeline, one row each, in natural order (w2 before w10)."""
    import re

    ids = {str(e["worker_id"]) for e in entries if e.get("worker_id") is not None}
    return sorted(ids, key=lambda w: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", w)])


def draw_timeline(ax: Any, entries: list[dict[str, Any]], title: str) -> None:
    """One row per worker: each settled update at its arrival time, coloured by fate."""
    rows = worker_rows(entries)
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel("wall time (s): an update's arrival at the aggregator, a line back to its training start")
    ax.grid(alpha=0.3, axis="x")
    if not rows:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no updates.jsonl (or no update with a worker id)", ha="center", va="center",
                transform=ax.transAxes, color="grey")
        return
    y_of = {w: i for i, w in enumerate(rows)}
    mine = [e for e in entries if e.get("worker_id") is not None]
    placed = [e for e in mine if isinstance(e.get("time_s"), int | float)]
    spans = [(y_of[str(e["worker_id"])], float(e["time_s"]) - float(e["duration_s"]), float(e["time_s"]))
             for e in placed if isinstance(e.get("duration_s"), int | float) and e["duration_s"] > 0]
    if spans:
        ax.hlines([s[0] for s in spans], [s[1] for s in spans], [s[2] for s in spans], color="grey", alpha=0.5,
                  linewidth=1.0, zorder=1)
    for fate, colour in FATE_COLOURS.items():
        pts = [e for e in placed if e.get("fate") == fate]
        if pts:
            ax.scatter([float(e["time_s"]) for e in pts], [y_of[str(e["worker_id"])] for e in pts], s=18,
                       color=colour, edgecolors="none", zorder=2, label=f"{fate} ({len(pts)})")
    labels = []
    for w in rows:
        ups = [e for e in mine if str(e["worker_id"]) == w]
        applied = [e for e in ups if e.get("fate") == "applied"]
        taus = [int(e["staleness"]) for e in applied if e.get("staleness") is not None]
        mean = f", staleness {sum(taus) / len(taus):.1f}" if taus else ""
        labels.append(f"{w}: {len(applied)}/{len(ups)}{mean}")
    ax.set_yticks(range(len(rows)), labels, fontsize=8 if len(rows) > 12 else 9)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # the first worker on top
    ax.set_ylabel("worker: applied/updates")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, framealpha=0.9, title="fate",
                  title_fontsize=8, borderaxespad=0)


def applied_staleness(run_dir: str) -> list[int]:
    """The staleness of every update the run applied (from ``updates.jsonl``; [] without one)."""
    return [int(e["staleness"]) for e in read_ledger(run_dir)
            if e.get("fate") == "applied" and e.get("staleness") is not None]


def label_of(run_dir: str, doc: dict[str, Any]) -> str:
    cfg = doc.get("config", {})
    return f"{Path(run_dir).name}: {cfg.get('strategy', '?')} ({cfg.get('mode', '?')})"


def supported_extensions() -> list[str]:
    """File extensions matplotlib can write (``.png``, ``.pdf``, ``.svg``, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return sorted("." + ext for ext in FigureCanvasBase.get_supported_filetypes())


def check_output(output: str) -> None:
    """A ConfigError (one line) unless ``output`` has an extension matplotlib can write."""
    ext = Path(output).suffix.lower()
    supported = supported_extensions()
    if ext not in supported:
        what = f"extension {ext!r}" if ext else "no extension"
        raise ConfigError(f"cannot write a plot to {output}: {what}; use one of {', '.join(supported)}")


def targets_of(docs: Sequence[tuple[str, dict[str, Any]]], target: float | None) -> list[float]:
    """The target accuracy lines to draw: ``target`` if given, else each run's own (distinct)."""
    if target is not None:
        return [target]
    found: list[float] = []
    for _, doc in docs:
        value = (doc.get("config") or {}).get("target_accuracy")
        if value is not None and float(value) not in found:
            found.append(float(value))
    return found


def build_figure(run_dirs: list[str], *, target: float | None = None) -> Any:
    """The figure ``fedmq plot`` writes: accuracy and loss against wall time and updates (two
    rows), a histogram of the staleness of applied updates (third row), and one worker
    timeline per run below (axes labelled ``timeline: <run>``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = [(d, load_history(d)) for d in run_dirs]
    ledgers = [read_ledger(d) for d in run_dirs]
    heights = [min(6.0, 1.2 + 0.28 * len(worker_rows(entries))) for entries in ledgers]
    fig = plt.figure(figsize=(12, 10 + sum(heights)), layout="constrained")
    grid = fig.add_gridspec(3 + len(docs), 2, height_ratios=[3, 3, 2.4, *heights])
    acc_t = fig.add_subplot(grid[0, 0])
    acc_u = fig.add_subplot(grid[0, 1], sharey=acc_t)
    loss_t = fig.add_subplot(grid[1, 0])
    loss_u = fig.add_subplot(grid[1, 1], sharey=loss_t)
    for i, ((run_dir, doc), entries) in enumerate(zip(docs, ledgers, strict=True)):
        ax = fig.add_subplot(grid[3 + i, :])
        ax.set_label(f"timeline: {run_dir}")
        draw_timeline(ax, entries, f"workers of {label_of(run_dir, doc)}")
    stale = fig.add_subplot(grid[2, :])  # added last: fig.axes[-1]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run_dir, doc) in enumerate(docs):
        colour = colours[i % len(colours)]
        label = label_of(run_dir, doc)
        hist = doc.get("history", [])
        if hist:
            t = [h["time_s"] for h in hist]
            u = [h["updates_applied"] for h in hist]
            acc_t.plot(t, [h["accuracy"] for h in hist], color=colour, label=label)
            acc_u.plot(u, [h["accuracy"] for h in hist], color=colour, label=label)
            loss_t.plot(t, [h["loss"] for h in hist], color=colour, label=label)
            loss_u.plot(u, [h["loss"] for h in hist], color=colour, label=label)
        taus = applied_staleness(run_dir)
        if taus:
            stale.hist(taus, bins=range(0, max(taus) + 2), histtype="step", linewidth=1.5, color=colour,
                       align="left", label=f"{label}: {len(taus)} updates, mean {sum(taus) / len(taus):.2f}")
    for value in targets_of(docs, target):
        for ax in (acc_t, acc_u):
            ax.axhline(value, color="grey", linestyle="--", linewidth=0.9, label=f"target accuracy {value:g}")
    for ax in (acc_t, acc_u):
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
    for ax in (loss_t, loss_u):
        ax.set_ylabel("test loss")
    for ax in (acc_t, loss_t):
        ax.set_xlabel("wall time (s)")
    for ax in (acc_u, loss_u):
        ax.set_xlabel("updates applied")
    from matplotlib.ticker import MaxNLocator

    stale.xaxis.set_major_locator(MaxNLocator(integer=True))
    stale.set_xlabel("staleness of an applied update (versions behind)")
    stale.set_ylabel("updates")
    for ax in (acc_t, acc_u, loss_t, loss_u, stale):
        ax.grid(alpha=0.3)
    if acc_t.get_legend_handles_labels()[0]:
        acc_t.legend(loc="lower right", fontsize=9, framealpha=0.9)
    if stale.get_legend_handles_labels()[0]:
        stale.legend(loc="upper right", fontsize=9, framealpha=0.9)
    else:
        stale.text(0.5, 0.5, "no updates.jsonl", ha="center", va="center", transform=stale.transAxes, color="grey")
    fig.suptitle("fedmq: accuracy and loss against wall time and updates; staleness of applied updates; "
                 "which worker sent what, when")
    return fig


def plot_runs(run_dirs: list[str], output: str, *, target: float | None = None) -> None:
    """Write the figure of ``run_dirs`` to ``output`` (its extension picks the format)."""
    check_output(output)
    fig = build_figure(run_dirs, target=target)
    import matplotlib.pyplot as plt

    try:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(output, dpi=110)
    except OSError as exc:
        raise ConfigError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
