"""``bench/update_path.py`` of a base commit against this tree, interleaved in one session.

The base runs from a ``git worktree`` of ``--base`` (created under ``--base-dir`` if missing)
with this interpreter and its packages. This tree's editable install would supply
``fedmq.broker`` & co. to any process that finds the base's top-level ``fedmq/`` folder
(``bench/_common.Children`` starts the aggregator in the repository root), so the base's
``fedmq/`` gets links to its own ``shared/``, ``broker/``, ``worker/`` and ``aggregator/``,
and the base's root goes first on ``PYTHONPATH``: every base process imports base code only
(checked before measuring). Each repeat runs
``update_path.py --repeat 1`` once per side, alternating which side goes first; each run
measures its own raw-pika floor, so every ratio is paired with a floor of the same minute.
Reported per size: the median ratio to raw pika of each side (aggregator and pipeline), and
after / before = median(this tree's ratio) / median(the base's ratio); and, steadier on a
loaded machine than any rate, the median CPU time per update of the aggregator process
(``aggregator_cpu_s_per_update``) and of the pipeline's consumer (``consumer_cpu_s`` / M).
Run: ``python bench/update_path_ab.py [--base aba9db9] [--repeat 3] [--sizes 100k,1M,10M] [--quick]``;
``--from-json FILE`` renders a previous run's tables again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import loadavg, median, table, write_result  # noqa: E402

PACKAGES = ("shared", "broker", "worker", "aggregator")


def base_tree(base: str, where: Path) -> Path:
    """The base's worktree, its ``fedmq/`` linked to its own subpackages (created if missing)."""
    if not (where / ".git").exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), base], check=True)
    for name in PACKAGES:
        link = where / "fedmq" / name
        if not link.exists():
            link.symlink_to(Path("..") / name, target_is_directory=True)
    code = "import fedmq.broker.client as c, fedmq.aggregator.service as a; print(c.__file__); print(a.__file__)"
    for cwd in (where, Path(tempfile.gettempdir())):
        out = subprocess.run([sys.executable, "-c", code], env=base_env(where), cwd=cwd, check=True,
                             capture_output=True, text=True).stdout
        if any(not Path(line).resolve().is_relative_to(where.resolve()) for line in out.split()):
            raise RuntimeError(f"the base's processes would import code from outside {where}: {out}")
    return where


def base_env(where: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(where)}


def run_side(tree: Path, base: bool, sizes: str, quick: bool, out: Path) -> dict[str, Any]:
    env = base_env(tree) if base else dict(os.environ)
    argv = [sys.executable, str(tree / "bench" / "update_path.py"), "--repeat", "1", "--sizes", sizes, "--json", str(out)]
    if quick:
        argv.append("--quick")
    proc = subprocess.run(argv, env=env, cwd=tempfile.gettempdir(), check=False, capture_output=True, text=True)
    if not out.exists():
        raise RuntimeError(f"update_path.py in {tree} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="aba9db9")
    parser.add_argument("--base-dir", type=Path, default=Path(tempfile.gettempdir()) / "fedmq-update-path-base")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sizes", default="100k,1M,10M")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="output (default bench/results/update_path_ab.json)")
    parser.add_argument("--from-json", type=Path, default=None, help="only render this earlier output")
    args = parser.parse_args(argv)
    if args.from_json:
        doc = json.loads(args.from_json.read_text())
        show(summarize(doc["runs"]))
        return 0
    tree = base_tree(args.base, args.base_dir)
    sides = {"before": (tree, True), "after": (ROOT, False)}
    work = Path(tempfile.mkdtemp(prefix="fedmq-ab-"))
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        order = ["before", "after"] if rep % 2 == 0 else ["after", "before"]
        for side in order:
            load = loadavg()
            doc = run_side(*sides[side], args.sizes, args.quick, work / f"{side}-{rep}.json")
            runs.append({"side": side, "repeat": rep, "loadavg_before": load, "rows": doc["rows"]})
            print(f"  repeat {rep} {side}: " + ", ".join(
                f"{r['model']} {r['path']} {r['ratio']:.2f}" for r in doc["rows"] if r["path"] != "floor")
                + f" (load {load:.2f})", file=sys.stderr)
    rows = summarize(runs)
    show(rows)
    out = write_result("update_path_ab", {"base": args.base, "repeat": args.repeat, "quick": args.quick,
                                          "loadavg": [r["loadavg_before"] for r in runs], "rows": rows, "runs": runs},
                       args.json)
    print(f"wrote {out}")
    return 0


def cpu_ms_per_update(row: dict[str, Any]) -> float | None:
    if row.get("aggregator_cpu_s_per_update") is not None:
        return 1e3 * float(row["aggregator_cpu_s_per_update"])
    if row.get("consumer_cpu_s") is not None:
        return 1e3 * float(row["consumer_cpu_s"]) / int(row["messages"])
    return None


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, path): medians over repeats of each side's ratio to raw pika and CPU per update."""
    got: dict[tuple[str, str, str, str], list[float]] = {}
    keys: list[tuple[str, str]] = []
    for run in runs:
        for row in run["rows"]:
            if row["path"] == "floor":
                continue
            if (row["model"], row["path"]) not in keys:
                keys.append((row["model"], row["path"]))
            got.setdefault((run["side"], row["model"], row["path"], "ratio"), []).append(row["ratio"])
            cpu = cpu_ms_per_update(row)
            if cpu is not None:
                got.setdefault((run["side"], row["model"], row["path"], "cpu"), []).append(cpu)
    rows = []
    for model, path in keys:
        out: dict[str, Any] = {"model": model, "path": path}
        for what in ("ratio", "cpu"):
            before, after = got.get(("before", model, path, what), []), got.get(("after", model, path, what), [])
            if before and after:
                out[what] = {"before": median(before), "after": median(after),
                             "after_over_before": median(after) / median(before),
                             "before_runs": before, "after_runs": after}
        rows.append(out)
    return rows


def show(rows: list[dict[str, Any]]) -> None:
    def runs(d: dict[str, Any], side: str) -> str:
        return " ".join(f"{x:.2f}" for x in d[f"{side}_runs"])

    body = []
    for r in rows:
        for what, label in (("ratio", "x raw pika"), ("cpu", "CPU ms/update")):
            if what in r:
                d = r[what]
                body.append([r["model"], r["path"], label, d["before"], d["after"], d["after_over_before"],
                             runs(d, "before"), runs(d, "after")])
    print(table(["model", "path", "metric", "before (median)", "after (median)", "after/before", "before runs",
                 "after runs"], body))


if __name__ == "__main__":
    sys.exit(main())
