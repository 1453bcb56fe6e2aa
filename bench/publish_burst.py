"""A burst of N confirmed publishes to a quorum queue: the broker client against bare pika.

A sync round opens with N task publishes (and the model's); an async aggregator publishes a task
per update. Each path publishes N task-sized bodies (persistent, ``mandatory``) to a quorum queue
and returns once the broker confirmed all of them; median ms per burst over ``--bursts``:

* ``pika, one at a time``: ``BlockingChannel.basic_publish`` in confirm mode, which waits for
  each confirm before it returns (what fedmq's client did until 2026-12-02);
* ``pika, all at once``: the N publishes written on the channel, then their confirms read as
  they come (pika's ``Channel`` under the ``BlockingConnection``);
* ``fedmq client``: N ``Client.publish_nowait`` calls, then a wait on each (a hand-over to the
  client's I/O thread and back, which bare pika in one thread does not pay).

The floor is the faster of the two bare-pika paths at each N.

Run: ``python bench/publish_burst.py [--n 1,4,16,64] [--bursts 40]`` against the broker of
``FEDMQ_AMQP_URL`` (default the local one); prints a table with fedmq / floor and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pika  # noqa: E402

from bench._common import table, write_result  # noqa: E402
from fedmq.broker.client import Client  # noqa: E402
from fedmq.broker.settings import BrokerSettings  # noqa: E402
from fedmq.broker.topology import Topology  # noqa: E402

BODY = b"t" * 300  # about an encoded task
PROPS = pika.BasicProperties(delivery_mode=2)


def median_ms(burst: Any, bursts: int) -> float:
    burst()
    times = []
    for _ in range(bursts):
        t = time.perf_counter()
        burst()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def pika_paths(url: str, queue: str, n: int, bursts: int) -> tuple[float, float]:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        serial = conn.channel()
        serial.confirm_delivery()

        def one_at_a_time() -> None:
            for _ in range(n):
                serial.basic_publish("", queue, BODY, properties=PROPS, mandatory=True)

        impl = conn.channel()._impl
        state = {"sent": 0, "acked": 0}

        def on_confirm(frame: Any) -> None:
            state["acked"] = frame.method.delivery_tag
            if state["acked"] >= state["sent"]:
                conn.add_callback_threadsafe(lambda: None)  # ends the process_data_events below

        impl.confirm_delivery(ack_nack_callback=on_confirm)

        def all_at_once() -> None:
            for _ in range(n):
                impl.basic_publish("", queue, BODY, properties=PROPS, mandatory=True)
            state["sent"] += n
            while state["acked"] < state["sent"]:
                conn.process_data_events(time_limit=5)

        return median_ms(one_at_a_time, bursts), median_ms(all_at_once, bursts)
    finally:
        conn.close()


def client_path(url: str, topology: Topology, n: int, bursts: int) -> float:
    with Client(BrokerSettings.from_url(url), topology, name="burst") as client:
        def burst() -> None:
            pending = [client.publish_nowait(topology.tasks, BODY, message_id=f"t{i}") for i in range(n)]
            for p in pending:
                p.wait(30)

        return median_ms(burst, bursts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="1,4,16,64", help="publishes per burst (comma-separated)")
    ap.add_argument("--bursts", type=int, default=40)
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "publish_burst.json"))
    args = ap.parse_args(argv)
    url = os.environ.get("FEDMQ_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    topology = Topology(f"bench-burst-{uuid.uuid4().hex[:8]}")
    rows: list[dict[str, Any]] = []
    try:
        with Client(BrokerSettings.from_url(url), topology, name="burst-setup"):
            pass  # declares the namespace: its task queue is a quorum queue
        for n in (int(x) for x in args.n.split(",")):
            serial, together = pika_paths(url, topology.tasks, n, args.bursts)
            fedmq = client_path(url, topology, n, args.bursts)
            floor = min(serial, together)
            rows.append({"n": n, "pika_one_at_a_time_ms": serial, "pika_all_at_once_ms": together,
                         "floor_ms": floor, "fedmq_ms": fedmq,
                         "fedmq_vs_floor": fedmq / floor, "one_at_a_time_vs_floor": serial / floor})
    finally:
        from fedmq.broker.admin import Admin

        with Admin(BrokerSettings.from_url(url), topology) as admin:
            admin.delete()
    print(f"{args.bursts} bursts each, median ms per burst of N confirmed publishes to a quorum queue")
    print(table(["N", "pika one at a time", "pika all at once", "fedmq client", "fedmq / floor",
                 "one at a time / floor"],
                [[r["n"], f"{r['pika_one_at_a_time_ms']:.2f}", f"{r['pika_all_at_once_ms']:.2f}", f"{r['fedmq_ms']:.2f}",
                  f"{r['fedmq_vs_floor']:.2f}", f"{r['one_at_a_time_vs_floor']:.2f}"] for r in rows]))
    out = write_result("publish_burst", {"bursts": args.bursts, "rows": rows}, Path(args.json))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
