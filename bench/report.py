"""Render the Markdown tables of BENCHMARKS.md from bench/results/*.json (no measuring).

Run: ``python bench/report.py [--results DIR]``; paste the output into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import RESULTS, markdown  # noqa: E402


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("**PASS**" if ok else "**MISS**")


def codec(d: dict[str, Any]) -> str:
    rows = [[r["model"], r["params"], r["op"], r["floor_s"] * 1e3, r["floor_gbps"], r["ours_s"] * 1e3, r["ours_gbps"],
             r["ratio"], f">= {r['goal']}", verdict(r["pass"])] for r in d["rows"]]
    return markdown(["model", "params", "op", "floor ms", "floor GB/s", "ours ms", "ours GB/s", "ratio", "goal", "result"], rows)


def update_path(d: dict[str, Any]) -> str:
    def ms(r: dict[str, Any], key: str, scale: float = 1.0) -> Any:
        return "-" if r.get(key) is None else r[key] * scale

    rows = [[r["model"], r["params"], r["wire_bytes"] / 1e6, r["messages"], r["path"], r["updates_per_s"], r["mb_per_s"],
             " / ".join(f"{x:.2f}" for x in r["run_ratios"]), r["ratio"],
             "-" if r["goal"] is None else f">= {r['goal']}", verdict(r["pass"]),
             ms(r, "aggregator_cpu_s_per_update", 1e3), ms(r, "broker_cpu_ms_per_update"),
             ms(r, "machine_cpu_ms_per_update"), ms(r, "confirm_p50_ms")]
            for r in d["rows"]]
    return markdown(["model", "params", "wire MB", "msgs", "path", "best upd/s", "MB/s", "ratio per repeat",
                     "ratio (median)", "goal", "result", "aggregator CPU ms/upd", "broker CPU ms/upd",
                     "machine CPU ms/upd", "confirm p50 ms"], rows)


def round_time(d: dict[str, Any]) -> str:
    rows = [[r["workers"], r["model"], r["median_s"], r["collect_median_s"], r["close_median_s"], r["mb_per_s"],
             r.get("loadavg", float("nan"))] for r in d["rows"]]
    out = markdown(["N", "model", "median s/round", "collect s", "close s", "MB/s moved", "loadavg"], rows)
    if any(r.get("peers") for r in d["rows"]):
        out += "\n\nSame run, same workload on Flower (median s/round, rounds 2..R; load = 1-minute load average):\n\n"
        out += peer_rows(d)
    cpu = [[r["workers"], r["model"], r["median_s"], r["cpu_s_per_round"].get("aggregator"),
            r["cpu_s_per_round"].get("workers"), r["cpu_s_per_round"].get("rabbitmq"), r["cpu_s_per_round"].get("other"),
            r["cpu_s_per_round"].get("machine_busy"),
            f"{100 * r['cpu_s_per_round']['machine_busy'] / (2 * r['mean_s']):.0f} %"] for r in d["rows"]]
    return out + "\n\nCPU seconds per round (rounds 2-8):\n\n" + markdown(
        ["N", "model", "s/round", "aggregator", "N workers", "RabbitMQ", "other", "machine busy", "of 2 cores"], cpu)


def peer_rows(d: dict[str, Any]) -> str:
    """fedmq against Flower's Simulation and Deployment engines, measured in the same run."""
    rows = []
    for r in d["rows"]:
        sim, dep = r.get("peers", {}).get("simulation", {}), r.get("peers", {}).get("deployment", {})
        row: list[Any] = [r["workers"], r["model"], r["median_s"], r.get("loadavg", float("nan"))]
        if "median_s" in sim:
            ratio = r["median_s"] / sim["median_s"]
            row += [sim["median_s"], sim["loadavg"], f"{ratio:.2f}x", verdict(ratio <= 1.0)]
        else:
            row += ["failed" if sim else "-", "-", "-", "-"]
        if "median_s" in dep:
            speedup = dep["median_s"] / r["median_s"]
            row += [dep["median_s"], dep["loadavg"], f"{speedup:.1f}x" if speedup < 10 else f"{speedup:.0f}x",
                    verdict(speedup >= 20)]
        else:
            row += ["failed" if dep else "-", "-", "-", "-"]
        rows.append(row)
    return markdown(["N", "model", "fedmq s", "load", "Flower Simulation s", "load", "fedmq / Simulation", "<= Sim",
                     "Flower Deployment s", "load", "Deployment / fedmq", ">= 20x"], rows)


def stragglers(d: dict[str, Any]) -> str:
    rows = []
    for name, s in d["summary"].items():
        rows.append([name, " / ".join(f"{x:.2f}" for x in s["t90_runs"]), s["t90_s"], s["updates_at_90"],
                     f"{s['t90_ratio']:.2f}x", f"{100 * s['final_accuracy']:.1f} %", f"{s['final_diff_points']:+.1f}",
                     s["wall_s"], f"{100 * s['straggler_share']:.0f} %", s["mean_staleness"], verdict(s["passed"])])
    main = markdown(["strategy", "t90 per run s", "t90 median s", "updates at 90 %", "t90 / sync", "final acc",
                     "vs sync (pts)", "wall s (400 upd)", "updates from stragglers", "mean staleness", "result"], rows)
    cpu = [[n, s["cpu_ms_per_update"]["wall_ms"], s["cpu_ms_per_update"]["aggregator"], s["cpu_ms_per_update"]["workers"],
            s["cpu_ms_per_update"]["rabbitmq"], s["cpu_ms_per_update"]["machine_busy"],
            f"{s['cpu_ms_per_update']['machine_busy_pct']:.0f} %"] for n, s in d["summary"].items()]
    return main + "\n\nPer applied update (ms):\n\n" + markdown(
        ["strategy", "wall", "aggregator CPU", "10 workers CPU", "RabbitMQ CPU", "machine busy", "busy %"], cpu)


def scale(d: dict[str, Any]) -> str:
    rows = [[r["sweep"] + (" `" + " ".join(r["extra_args"]) + "`" if r["extra_args"] else ""), r["workers"], r["model"],
             r["window_updates"], r["cpu_ms_per_update"], f"{r['cpu_vs_n4']:.2f}x", verdict(r["flat_pass"]),
             r["updates_per_s"], r["peak_mb"], r["mem_budget_mb"],
             "base" if r["model"] == "100k" else f"{r['mem_ratio']:.1f}", 7, verdict(r["mem_pass"]),
             r["system_cpu_ms_per_update"].get("workers"), r["system_cpu_ms_per_update"].get("rabbitmq")]
            for r in d["rows"]]
    return markdown(["sweep", "N", "model", "updates", "aggregator CPU ms/upd", "vs N=4", "flat", "upd/s", "peak MB",
                     "budget MB", "(peak-base)/model", "K+4", "memory", "pool CPU ms/upd", "RabbitMQ CPU ms/upd"], rows)


def hotspots(d: dict[str, Any]) -> str:
    return markdown(["case", "variant", "ms"], [[r["case"], r["variant"], r["ms"]] for r in d["rows"]])


RENDER = {"codec": codec, "update_path": update_path, "round_time": round_time, "stragglers": stragglers,
          "stragglers-single-thread-aggregator": stragglers, "scale": scale, "hotspots": hotspots}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for name, fn in RENDER.items():
        path = args.results / f"{name}.json"
        if path.exists():
            print(f"### {name}\n\n{fn(json.loads(path.read_text()))}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
