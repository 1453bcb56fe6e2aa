"""``fedmq plot``: learning curves of one or more runs, against wall time and against updates,
and the staleness of the updates each run applied.

Each run's target accuracy line comes from its own configuration (``history.json``
``config.target_accuracy``; none for a run without one) unless ``target`` is given.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedmq.shared.errors import ConfigError


def load_history(run_dir: str) -> dict[str, Any]:
    path = Path(run_dir) / "history.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{run_dir} has no history.json (is it a fedmq run directory?)") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None


def applied_staleness(run_dir: str) -> list[int]:
    """The staleness of every update the run applied (from ``updates.jsonl``; [] without one)."""
    path = Path(run_dir) / "updates.jsonl"
    out: list[int] = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line being written
        if isinstance(entry, dict) and entry.get("fate") == "applied" and entry.get("staleness") is not None:
            out.append(int(entry["staleness"]))
    return out


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
    rows), and a histogram of the staleness of applied updates (third row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = [(d, load_history(d)) for d in run_dirs]
    fig = plt.figure(figsize=(12, 11), layout="constrained")
    grid = fig.add_gridspec(3, 2, height_ratios=[1, 1, 0.8])
    acc_t = fig.add_subplot(grid[0, 0])
    acc_u = fig.add_subplot(grid[0, 1], sharey=acc_t)
    loss_t = fig.add_subplot(grid[1, 0])
    loss_u = fig.add_subplot(grid[1, 1], sharey=loss_t)
    stale = fig.add_subplot(grid[2, :])
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
    fig.suptitle("fedmq: accuracy and loss against wall time and updates; staleness of applied updates")
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
