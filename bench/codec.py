"""Benchmark of the fedmq wire codec against the memory-copy floor (a script, not a test).

For MLP-shaped float32 models of ~1M and ~10M parameters it times (best of N):

* encode floor: ``b"".join(a.tobytes() for a in arrays)``;
* ``fedmq.shared.messages.encode(Update(...))``;
* decode floor: ``np.frombuffer(raw, dtype, count, offset).copy()`` per array over the
  concatenated bytes;
* ``fedmq.shared.messages.decode(...)``: the full strict decode, finiteness check included.

It prints GB/s and ratio = floor_time / our_time (the goal is >= 0.8) and writes JSON.
Run from a checkout: ``python bench/codec.py [--repeat N] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402
import numpy as np  # noqa: E402

from fedmq.shared.messages import Update, decode, encode  # noqa: E402

GOAL = 0.8
#: name -> layer widths of an MLP; params = sum(W_i + b_i)
MODELS: dict[str, list[int]] = {
    "1M": [784, 1024, 192, 10],
    "10M": [3072, 2048, 1536, 100],
}
DEFAULT_JSON = ROOT / "bench" / "results" / "codec.json"


def mlp_params(widths: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights and biases of an MLP with the given layer widths."""
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        params[f"dense_{i}/W"] = rng.standard_normal((n_in, n_out), dtype=np.float32)
        params[f"dense_{i}/b"] = rng.standard_normal(n_out, dtype=np.float32)
    return params


def best_time(fn: Callable[[], Any], repeat: int) -> float:
    """The fastest of ``repeat`` timed calls, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def make_update(params: dict[str, np.ndarray]) -> Update:
    return Update(
        task_id="t-1",
        worker_id="w-1",
        base_version=3,
        num_samples=1000,
        params=params,
        kind="weights",
        train_loss=0.5,
        train_accuracy=0.9,
        duration_s=1.0,
    )


def decode_floor(raw: bytes, layout: list[tuple[np.dtype, int, tuple[int, ...]]]) -> None:
    offset = 0
    for dtype, count, shape in layout:
        np.frombuffer(raw, dtype, count, offset).copy().reshape(shape)
        offset += count * dtype.itemsize


def bench_model(name: str, widths: list[int], repeat: int) -> list[dict[str, Any]]:
    params = mlp_params(widths)
    arrays = list(params.values())
    nbytes = sum(a.nbytes for a in arrays)
    update = make_update(params)
    wire = encode(update)
    assert np.array_equal(decode(wire, expect=Update).params["dense_0/W"], params["dense_0/W"])
    raw = b"".join(a.tobytes() for a in arrays)
    layout = [(a.dtype, a.size, a.shape) for a in arrays]

    t_enc_floor = best_time(lambda: b"".join(a.tobytes() for a in arrays), repeat)
    t_enc = best_time(lambda: encode(update), repeat)
    t_dec_floor = best_time(lambda: decode_floor(raw, layout), repeat)
    t_dec = best_time(lambda: decode(wire, expect=Update), repeat)

    common = {"model": name, "params": nbytes // 4, "bytes": nbytes, "wire_bytes": len(wire)}
    rows = []
    for op, floor, ours in (("encode", t_enc_floor, t_enc), ("decode", t_dec_floor, t_dec)):
        ratio = floor / ours
        rows.append(
            {
                **common,
                "op": op,
                "floor_s": floor,
                "ours_s": ours,
                "floor_gbps": nbytes / floor / 1e9,
                "ours_gbps": nbytes / ours / 1e9,
                "ratio": ratio,
                "goal": GOAL,
                "pass": ratio >= GOAL,
            }
        )
    return rows


def tolist_path(widths: list[int]) -> dict[str, Any]:
    """For scale: the naive tolist() + msgpack round trip, timed once."""
    params = mlp_params(widths)
    nbytes = sum(a.nbytes for a in params.values())
    start = time.perf_counter()
    blob = msgpack.packb({k: a.tolist() for k, a in params.items()})
    t_enc = time.perf_counter() - start
    start = time.perf_counter()
    {k: np.asarray(v, np.float32) for k, v in msgpack.unpackb(blob).items()}
    t_dec = time.perf_counter() - start
    return {"encode_s": t_enc, "decode_s": t_dec, "bytes": nbytes, "wire_bytes": len(blob)}


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'model':>5} {'params':>10} {'op':>6} {'floor ms':>9} {'floor GB/s':>10} "
    head += f"{'ours ms':>8} {'ours GB/s':>9} {'ratio':>6} {'goal':>5} result"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['model']:>5} {r['params']:>10,} {r['op']:>6} {r['floor_s'] * 1e3:9.3f} "
            f"{r['floor_gbps']:10.2f} {r['ours_s'] * 1e3:8.3f} {r['ours_gbps']:9.2f} "
            f"{r['ratio']:6.2f} {r['goal']:5.1f} {'PASS' if r['pass'] else 'MISS'}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30, help="timed runs per case (best of N)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")

    rows = [row for name, w in MODELS.items() for row in bench_model(name, w, args.repeat)]
    print_table(rows)
    naive = tolist_path(MODELS["1M"])
    print(
        f"\nfor scale, tolist()+msgpack on the 1M model (once): encode "
        f"{naive['encode_s'] * 1e3:.1f} ms, decode {naive['decode_s'] * 1e3:.1f} ms "
        f"({naive['bytes'] / naive['encode_s'] / 1e9:.3f} / "
        f"{naive['bytes'] / naive['decode_s'] / 1e9:.3f} GB/s)"
    )
    result = {
        "repeat": args.repeat,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "machine": platform.machine(),
        "rows": rows,
        "tolist_1M": naive,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
