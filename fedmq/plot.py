"""``fedmq plot``: learning curves of one or more runs, against wall time and against updates."""

from __future__ import annotations

import json
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


def label_of(run_dir: str, doc: dict[str, Any]) -> str:
    cfg = doc.get("config", {})
    return f"{Path(run_dir).name}: {cfg.get('strategy', '?')} ({cfg.get('mode', '?')})"


def plot_runs(run_dirs: list[str], output: str, *, target: float | None = 0.9) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = [(d, load_history(d)) for d in run_dirs]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharey="row")
    for run_dir, doc in docs:
        hist = doc.get("history", [])
        if not hist:
            continue
        t = [h["time_s"] for h in hist]
        u = [h["updates_applied"] for h in hist]
        acc = [h["accuracy"] for h in hist]
        loss = [h["loss"] for h in hist]
        label = label_of(run_dir, doc)
        axes[0][0].plot(t, acc, label=label)
        axes[0][1].plot(u, acc, label=label)
        axes[1][0].plot(t, loss, label=label)
        axes[1][1].plot(u, loss, label=label)
    for ax in axes[0]:
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=0.8)
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
    for ax in axes[1]:
        ax.set_ylabel("test loss")
    for row in axes:
        row[0].set_xlabel("wall time (s)")
        row[1].set_xlabel("updates applied")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.suptitle("fedmq: accuracy and loss against wall time and updates")
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
