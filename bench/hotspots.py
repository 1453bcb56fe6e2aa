"""Micro-benchmarks behind the findings in BENCHMARKS.md (no broker needed).

Each case times the code as it is in the repository against a proposed variant, in-process,
best of N after a warm-up, on the 784->12579->10 (~10M parameter) model unless noted:

* ``fedbuff_step``: ``FedBuff.apply`` for K=3 updates (the 3rd one steps the model, which
  allocates a new model: ``value + acc``) vs the same arithmetic stepping into a reused buffer
  (``np.add(value, acc, out=spare)``); and, in a fresh process, the first touch of a new
  model-sized array against reusing one;
* ``fedavg``: ``weighted_average`` of N=4 and 16 updates vs the same order of float64
  operations with one reused float64 scratch (bitwise identical result);
* ``mlp_evaluate``: ``MLPTrainer.evaluate`` (a new ``MLP`` with random init per call) vs
  reusing one ``MLP``, digits-sized (64->64->10, 360 test rows) and 784->1258->10;
* ``checkpoint_meta``: the JSON the aggregator writes at every checkpoint (state meta with the
  full history and sorted applied-task ids, plus history.json with indent=2) vs the number of
  versions so far: the cost per checkpoint grows with the length of the run;
* ``noise_fit``: ``NoiseTrainer.fit`` at 10M, and the share of it that is
  ``rng.standard_normal``.

Run: ``python bench/hotspots.py [--quick]``; prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench._common import MODEL_SIZES, mlp_shapes, table, write_result  # noqa: E402


def best(fn: Callable[[], Any], repeat: int) -> float:
    fn()
    out = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def model(hidden: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s, dtype=np.float32) * np.float32(0.01) for k, s in mlp_shapes(hidden).items()}


# ------------------------------------------------------------------ FedBuff
def fedbuff_step(repeat: int) -> list[dict[str, Any]]:
    from fedmq.aggregator.strategies import FedBuff

    params = model(MODEL_SIZES["10M"])
    deltas = [model(MODEL_SIZES["10M"], seed=s) for s in (1, 2, 3)]

    def current() -> None:
        fb = FedBuff(3)
        cur = params
        for i, d in enumerate(deltas):
            res = fb.apply(cur, d, 1, i)
            if res.params is not None:
                cur = res.params

    acc = {k: np.zeros_like(v) for k, v in params.items()}
    scratch = {k: np.empty_like(v) for k, v in params.items()}
    spare = {k: np.empty_like(v) for k, v in params.items()}

    def reused() -> None:  # the same arithmetic, stepping into a buffer that is reused
        for i, d in enumerate(deltas):
            w = np.float32(1.0 / np.sqrt(1.0 + i))
            for k, a in acc.items():
                np.multiply(d[k], w, out=scratch[k])
                a += scratch[k]
        step = np.float32(1.0 / 3)
        for k, v in params.items():
            a = acc[k]
            a *= step
            np.add(v, a, out=spare[k])
            a.fill(0.0)

    rows = [
        {"case": "fedbuff_step", "variant": "FedBuff.apply x3 (allocates the new model)", "ms": 1e3 * best(current, repeat)},
        {"case": "fedbuff_step", "variant": "same into a reused buffer (out=)", "ms": 1e3 * best(reused, repeat)},
    ]
    # first touch of fresh memory, in a fresh process (this VM backs guest pages lazily)
    code = (
        "import time, numpy as np\n"
        "a = np.ones(9_861_936, np.float32); out = np.empty_like(a); np.add(a, a, out=out)\n"
        "t = time.perf_counter(); c = a + a; t1 = time.perf_counter() - t; del c\n"
        "t = time.perf_counter(); c = a + a; t2 = time.perf_counter() - t; del c\n"
        "t = time.perf_counter(); np.add(a, a, out=out); t3 = time.perf_counter() - t\n"
        "print(t1, t2, t3)\n"
    )
    t1, t2, t3 = (float(x) for x in subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                   check=True).stdout.split())
    rows += [
        {"case": "first_touch", "variant": "fresh process: a + a into a new 39 MB array, 1st", "ms": 1e3 * t1},
        {"case": "first_touch", "variant": "fresh process: a + a into a new 39 MB array, 2nd", "ms": 1e3 * t2},
        {"case": "first_touch", "variant": "fresh process: np.add(a, a, out=existing)", "ms": 1e3 * t3},
    ]
    return rows


# ------------------------------------------------------------------ FedAvg
def weighted_average_scratch(updates: list[tuple[dict[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    total = float(sum(w for _, w in updates))
    out = {}
    for name in updates[0][0]:
        shape = updates[0][0][name].shape
        acc = np.zeros(shape, dtype=np.float64)
        tmp = np.empty(shape, dtype=np.float64)
        for params, weight in updates:
            np.multiply(params[name], weight, out=tmp, dtype=np.float64)
            acc += tmp
        acc /= total
        out[name] = acc.astype(np.float32)
    return out


def fedavg(repeat: int, sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    from fedmq.aggregator.strategies import weighted_average

    rows = []
    for n in sizes:
        ups = [(model(MODEL_SIZES["10M"], seed=i), 32.0 + i) for i in range(n)]
        a, b = weighted_average(ups), weighted_average_scratch(ups)
        same = all(np.array_equal(a[k], b[k]) for k in a)
        del a, b
        rows.append({"case": f"fedavg N={n}", "variant": "weighted_average", "ms": 1e3 * best(lambda ups=ups: weighted_average(ups), repeat)})
        rows.append({"case": f"fedavg N={n}", "variant": f"reused float64 scratch (identical: {same})",
                     "ms": 1e3 * best(lambda ups=ups: weighted_average_scratch(ups), repeat)})
    return rows


# ------------------------------------------------------------------ MLP evaluation
def mlp_evaluate(repeat: int) -> list[dict[str, Any]]:
    from fedmq.shared.trainer import MLPTrainer, mlp_spec

    rows = []
    for label, (features, hidden, n_test) in {"digits 64-64-10": (64, 64, 360), "784-1258-10": (784, 1258, 64)}.items():
        trainer = MLPTrainer(mlp_spec(features, 10, hidden=[hidden]))
        params = trainer.init_params()
        rng = np.random.default_rng(0)
        X = rng.standard_normal((n_test, features)).astype(np.float32)
        y = rng.integers(0, 10, n_test)
        cached = trainer._model()

        def reuse(cached: Any = cached, params: Any = params, X: Any = X, y: Any = y) -> tuple[float, float]:
            cached.set_params(params)
            return cached.evaluate(X, y)

        rows.append({"case": f"evaluate {label}", "variant": "MLPTrainer.evaluate (new MLP + random init)",
                     "ms": 1e3 * best(lambda t=trainer, p=params, X=X, y=y: t.evaluate(p, X, y), repeat)})
        rows.append({"case": f"evaluate {label}", "variant": "one MLP reused (set_params + evaluate)",
                     "ms": 1e3 * best(reuse, repeat)})
    return rows


# ------------------------------------------------------------------ checkpoint metadata
def checkpoint_meta(repeat: int, versions: tuple[int, ...]) -> list[dict[str, Any]]:
    rows = []
    for v in versions:
        history = [{"version": i, "time_s": i * 0.01, "accuracy": 0.9, "loss": 0.3, "updates_applied": 3 * i,
                    "staleness_mean": 1.5} for i in range(1, v + 1)]
        applied = {f"a{i:06d}-abc123" for i in range(3 * v)}

        def dump(history: Any = history, applied: Any = applied) -> None:
            meta = {"state": {"history": history, "applied_tasks": sorted(applied)}}
            json.dumps(meta)
            json.dumps({"history": history}, indent=2)

        rows.append({"case": "checkpoint_meta", "variant": f"{v} versions ({3 * v} updates) so far",
                     "ms": 1e3 * best(dump, repeat)})
    return rows


# ------------------------------------------------------------------ NoiseTrainer
def noise_fit(repeat: int) -> list[dict[str, Any]]:
    from bench.standin import NoiseTrainer
    from fedmq.shared.trainer import mlp_spec

    trainer = NoiseTrainer(mlp_spec(784, 10, hidden=[MODEL_SIZES["10M"]]))
    params = trainer.init_params()
    X = np.zeros((32, 784), np.float32)
    y = np.zeros(32, np.int64)
    rng = np.random.default_rng(0)
    n = sum(v.size for v in params.values())
    return [
        {"case": "noise_fit 10M", "variant": "NoiseTrainer.fit", "ms": 1e3 * best(lambda: trainer.fit(params, X, y), repeat)},
        {"case": "noise_fit 10M", "variant": "of which rng.standard_normal(float32)",
         "ms": 1e3 * best(lambda: rng.standard_normal(n, dtype=np.float32), repeat)},
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes")
    parser.add_argument("--json", type=Path, default=None, help="output (default bench/results/hotspots.json)")
    args = parser.parse_args(argv)
    repeat = 2 if args.quick else 5
    started = time.monotonic()
    rows = fedbuff_step(repeat)
    rows += fedavg(repeat, (4,) if args.quick else (4, 16))
    rows += mlp_evaluate(repeat * 4)
    rows += checkpoint_meta(repeat, (100, 1000) if args.quick else (100, 1000, 3333, 10000))
    rows += noise_fit(repeat)
    print(table(["case", "variant", "ms"], [[r["case"], r["variant"], r["ms"]] for r in rows]))
    out = write_result("hotspots", {"quick": args.quick, "repeat": repeat, "wall_s": time.monotonic() - started,
                                    "rows": rows}, args.json)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
