"""`fedmq plot`'s worker timeline: one row per worker, each settled update where and when it
arrived, coloured by fate (on a run directory written by the test)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fedmq.cli import main
from fedmq.plot import build_figure

# (worker, arrival time_s, training duration_s, base_version, version at arrival, fate)
UPDATES = [
    ("w0", 0.5, 0.4, 0, 0, "applied"),
    ("w1", 0.6, 0.5, 0, 1, "applied"),
    ("w0", 1.0, 0.4, 1, 2, "applied"),
    ("w0", 1.5, 0.4, 2, 3, "applied"),
    ("w10", 4.0, 3.9, 0, 4, "stale"),  # the straggler: late and far behind
    ("w1", 4.2, 0.5, 3, 4, "applied"),
    ("w10", 8.0, 3.9, 4, 9, "late"),
]


def fake_run(path: Path, updates: list[tuple[str, float, float, int, int, str]] | None) -> Path:
    path.mkdir(parents=True)
    hist = [{"version": v, "time_s": v / 2, "accuracy": 0.5 + v / 20, "loss": 1 / v, "updates_applied": v,
             "staleness_mean": 0.0} for v in range(1, 5)]
    (path / "history.json").write_text(json.dumps({"config": {"mode": "async", "strategy": "fedasync"},
                                                   "history": hist, "final": {"version": 4}}))
    if updates is not None:
        lines = [json.dumps({"message_id": f"m{i}", "task_id": f"t{i}", "worker_id": w, "time_s": t, "duration_s": d,
                             "base_version": base, "version": v, "staleness": v - base, "fate": fate})
                 for i, (w, t, d, base, v, fate) in enumerate(updates)]
        (path / "updates.jsonl").write_text("\n".join(lines) + "\n" + '{"message_id": "m-half')  # a line being written
    return path


def timelines(fig: Any) -> list[Any]:
    return [ax for ax in fig.axes if ax.get_label().startswith("timeline: ")]


def points(ax: Any) -> list[tuple[float, float, str]]:
    """(time, row, fate) of every marker on the timeline, the fate read from its legend label."""
    out = []
    for coll in ax.collections:
        label = coll.get_label()
        if label.startswith("_"):
            continue  # the training spans
        out += [(float(x), float(y), label.split(" ")[0]) for x, y in coll.get_offsets()]
    return out


@pytest.fixture
def plt() -> Any:
    import matplotlib.pyplot as plt

    yield plt
    plt.close("all")


def test_the_timeline_has_one_row_per_worker_and_every_update_where_it_arrived(tmp_path: Path, plt: Any) -> None:
    run = fake_run(tmp_path / "r", UPDATES)
    fig = build_figure([str(run)])
    [ax] = timelines(fig)
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert [r.split(":")[0] for r in rows] == ["w0", "w1", "w10"]  # one row per worker id, in natural order
    assert rows[0] == "w0: 3/3, staleness 0.7" and rows[2].startswith("w10: 0/2")  # the straggler applied nothing
    row_of = {w: i for i, w in enumerate(["w0", "w1", "w10"])}
    expected = Counter((t, float(row_of[w]), fate) for w, t, _d, _b, _v, fate in UPDATES)
    assert Counter(points(ax)) == expected
    colours = {c.get_label().split(" ")[0]: tuple(c.get_facecolor()[0]) for c in ax.collections
               if not c.get_label().startswith("_")}
    assert set(colours) == {"applied", "stale", "late"} and len(set(colours.values())) == 3  # told apart
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["applied (5)", "stale (1)", "late (1)"]
    # the staleness histogram is kept, still the last axes
    assert "staleness" in fig.axes[-1].get_xlabel() and fig.axes[-1].patches


def test_one_timeline_per_run_and_a_run_without_a_ledger_says_so(tmp_path: Path, plt: Any) -> None:
    with_ledger = fake_run(tmp_path / "a", UPDATES[:3])
    without = fake_run(tmp_path / "b", None)
    fig = build_figure([str(with_ledger), str(without)])
    first, second = timelines(fig)
    assert first.get_label() == f"timeline: {with_ledger}" and second.get_label() == f"timeline: {without}"
    assert [t.get_text().split(":")[0] for t in first.get_yticklabels()] == ["w0", "w1"]
    assert not second.get_yticks().size and any("no updates.jsonl" in t.get_text() for t in second.texts)
    result = CliRunner().invoke(main, ["plot", str(with_ledger), str(without), "-o", str(tmp_path / "c.png")])
    assert result.exit_code == 0 and (tmp_path / "c.png").stat().st_size > 10_000, result.output
