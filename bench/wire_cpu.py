"""Client CPU per byte of pika's own frame I/O against fedmq's (``fedmq.broker.frames``).

For bodies the size of an encoded 100k / 1M / 10M parameter update, in one process and
on the same broker, interleaved per repeat:

* ``receive``: a classic queue is filled with M messages first (~400 MB), then one
  BlockingConnection consumes them all (prefetch 12, a manual ack per message); measured
  is the consuming thread's CPU time (``time.thread_time``) per MB. The broker is idle
  apart from serving the consumer, so this is the client's cost, not the broker's.
* ``publish``: the same M messages published with confirms (``confirm_delivery``); the
  publishing thread's CPU time per MB.

Modes: ``pika`` (pika as it is) and ``fedmq`` (the same connection after
``frames.tune`` / ``frames.tune_channel``, and ``frame_max`` asked for as fedmq does:
the broker's ``frame_max`` decides; ``--private-frame-max`` runs on a private node configured
with a larger one). Reported: median CPU ms/MB per mode and the ratio fedmq / pika.
Run: ``python bench/wire_cpu.py [--quick] [--repeat N] [--url URL | --private-frame-max BYTES]``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import AMQP_URL, loadavg, median, table, write_result  # noqa: E402

SIZES = {"100k": 407_000, "1M": 4_040_000, "10M": 40_320_000}  # ~ the encoded updates' sizes
TOTAL_BYTES = 400_000_000
QUICK_TOTAL_BYTES = 80_000_000
PREFETCH = 12


def connect(url: str, mode: str) -> Any:
    import pika

    from fedmq.broker import frames

    params = pika.URLParameters(url)
    if mode == "fedmq":
        frames.ask_frame_max(params)
    conn = pika.BlockingConnection(params)
    if mode == "fedmq" and not frames.tune(conn):
        raise RuntimeError("fedmq.broker.frames does not support this pika")
    return conn


def channel(conn: Any, mode: str) -> Any:
    from fedmq.broker import frames

    ch = conn.channel()
    if mode == "fedmq":
        frames.tune_channel(ch)
    return ch


def publish(url: str, mode: str, qname: str, body: bytes, count: int) -> float:
    """Publish ``count`` confirmed messages; the thread's CPU seconds."""
    import pika

    conn = connect(url, mode)
    try:
        ch = channel(conn, mode)
        ch.confirm_delivery()
        props = pika.BasicProperties(delivery_mode=1)
        cpu0 = time.thread_time()
        for _ in range(count):
            ch.basic_publish("", qname, body, properties=props, mandatory=True)
        return time.thread_time() - cpu0
    finally:
        conn.close()


def receive(url: str, mode: str, qname: str, size: int, count: int, timeout: float) -> float:
    """Consume and ack ``count`` messages; the thread's CPU seconds."""
    conn = connect(url, mode)
    try:
        ch = channel(conn, mode)
        ch.basic_qos(prefetch_count=PREFETCH)
        state = {"n": 0, "bad": 0}

        def on_message(chan: Any, method: Any, _props: Any, body: Any) -> None:
            state["bad"] += len(body) != size
            chan.basic_ack(method.delivery_tag)
            state["n"] += 1

        cpu0 = time.thread_time()
        ch.basic_consume(qname, on_message, auto_ack=False)
        deadline = time.monotonic() + timeout
        while state["n"] < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{state['n']}/{count} messages in {timeout:.0f} s")
            conn.process_data_events(time_limit=0.5)
        cpu = time.thread_time() - cpu0
        if state["bad"]:
            raise RuntimeError(f"{state['bad']} bodies of the wrong size")
        return cpu
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sizes", default="100k,1M,10M")
    parser.add_argument("--url", default=AMQP_URL, help="broker")
    parser.add_argument("--private-frame-max", type=int, default=None,
                        help="start a private RabbitMQ node with this frame_max (rabbitmq.conf) and use it")
    parser.add_argument("--json", type=Path, default=None, help="output (default bench/results/wire_cpu.json)")
    args = parser.parse_args(argv)
    total = QUICK_TOTAL_BYTES if args.quick else TOTAL_BYTES
    node = None
    if args.private_frame_max:
        from fedmq.broker.provision import PrivateNode

        node = PrivateNode(config={"frame_max": str(args.private_frame_max)}).start()
        args.url = node.url
    try:
        rows = run(args, total)
    finally:
        if node is not None:
            node.remove()
    headers = ["size", "body MB", "msgs", "side", "pika CPU ms/MB", "fedmq CPU ms/MB", "fedmq/pika", "frame_max",
               "load"]
    print(table(headers, [[r["size"], r["body_bytes"] / 1e6, r["messages"], r["side"], r["pika_cpu_ms_per_mb"],
                           r["fedmq_cpu_ms_per_mb"], r["ratio"], r["frame_max"]["fedmq"],
                           " ".join(f"{x:.2f}" for x in r["loadavg"])] for r in rows]))
    out = write_result("wire_cpu", {"quick": args.quick, "repeat": args.repeat,
                                    "broker_frame_max": args.private_frame_max or 131072, "rows": rows}, args.json)
    print(f"wrote {out}")
    return 0


def run(args: argparse.Namespace, total: int) -> list[dict[str, Any]]:
    import pika

    admin = pika.BlockingConnection(pika.URLParameters(args.url))
    rows: list[dict[str, Any]] = []
    try:
        admin_ch = admin.channel()
        for label in [s for s in args.sizes.split(",") if s]:
            size = SIZES[label]
            count = max(3, total // size)
            body = os.urandom(size)
            cpu: dict[tuple[str, str], list[float]] = {}
            loads: list[float] = []
            frame_max = {}
            for rep in range(args.repeat):
                loads.append(loadavg())
                modes = ("pika", "fedmq") if rep % 2 == 0 else ("fedmq", "pika")
                for mode in modes:
                    qname = f"wire-cpu-{secrets.token_hex(4)}"
                    admin_ch.queue_declare(qname, auto_delete=False, arguments={"x-queue-type": "classic"})
                    try:
                        pub = publish(args.url, mode, qname, body, count)
                        rec = receive(args.url, mode, qname, size, count, timeout=60 + count * size / 5e6)
                    finally:
                        admin_ch.queue_delete(qname)
                    mb = count * size / 1e6
                    cpu.setdefault((mode, "publish"), []).append(pub / mb)
                    cpu.setdefault((mode, "receive"), []).append(rec / mb)
                    probe = connect(args.url, mode)
                    frame_max[mode] = probe._impl.params.frame_max
                    probe.close()
            for side in ("receive", "publish"):
                base, ours = median(cpu[("pika", side)]), median(cpu[("fedmq", side)])
                rows.append({"size": label, "body_bytes": size, "messages": count, "side": side,
                             "pika_cpu_ms_per_mb": base * 1e3, "fedmq_cpu_ms_per_mb": ours * 1e3,
                             "ratio": ours / base, "frame_max": frame_max, "loadavg": loads,
                             "runs": {m: cpu[(m, side)] for m in ("pika", "fedmq")}})
            print(f"  {label}: done (load {loads})", file=sys.stderr)
    finally:
        admin.close()
    return rows


if __name__ == "__main__":
    sys.exit(main())
