"""The raw-pika floor of one synchronous round: the same bytes moved the same way, with bare pika and nothing else.

One fedmq sync round moves the model once into a stream, N workers read it from the stream at
once, and N updates go through a quorum queue to one consumer (the aggregator), which takes them
as they come: the workers publish while the aggregator consumes. :func:`round_floor` times that
with bare pika (no decoding, no training, no averaging, no checkpoint):

* N worker processes (one connection each) attach to the model stream before round 1 and stay
  attached, as fedmq's sync workers do between rounds (``worker/service.py``: after its update is
  confirmed a sync worker reads on for the next version); one consumer (this process) consumes
  the updates queue from the start, as the aggregator does;
* each round this process publishes the model's body into the stream (publisher confirms); each
  worker, as soon as it has the whole model, publishes its update body into the quorum queue
  (persistent, confirms) -- nothing computed in between; the round ends when the last update is
  consumed. The workers publish while the consumer consumes, and a fast worker's update goes
  while a slow one still reads the model, as in fedmq.

The floor is the median round over rounds 2..R (round 1 warms the new stream and queue up, as
fedmq's round 1 is left out of its median). Beside it: the whole machine's CPU seconds per round
over the same rounds (``machine_cpu_s``, a mean; ``machine_busy_share``: of all cores), which
on a machine of few cores bounds how close a round that does more work per byte can come to it,
and the shared broker's share of it (``broker_cpu_s``; None on a private node).

Bodies travel as fedmq sends them: in messages of ``chunk_bytes`` (fedmq's ``--chunk-bytes``,
default :data:`fedmq.shared.chunking.DEFAULT_CHUNK_BYTES`), a body that fits being one message.
:func:`body_bytes` gives the sizes fedmq's messages have for an MLP and a ``--compress`` scheme
(the model, and an update in that scheme's wire form), so a compressed round's floor moves the
bytes that scheme moves.

Used by ``bench/round_time.py --floor`` (the shared broker) and ``bench/large_model.py`` (a
private node). pika appears here because the floor is raw pika by definition.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from bench._common import AMQP_URL, CpuSnapshots
from fedmq.shared.chunking import DEFAULT_CHUNK_BYTES, chunk_count


def chunk_spans(total: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """(start, end) of each message a body of ``total`` bytes travels as: one message when it fits
    in ``chunk_bytes``, else ``chunk_bytes`` pieces and a shorter last one (fedmq's chunking)."""
    count = chunk_count(total, chunk_bytes)
    return [(i * chunk_bytes, min(total, (i + 1) * chunk_bytes)) for i in range(count)]


def body_bytes(shapes: Mapping[str, tuple[int, ...]], compress: str = "none",
               model_dtype: str = "float32") -> tuple[int, int]:
    """(model message, update message) sizes in bytes, as fedmq encodes them, for parameters of
    ``shapes``, models in ``model_dtype`` (``float32``, ``bfloat16``, ``int8``) and updates compressed with
    ``compress`` (e.g. ``none``, ``int8``, ``topk:0.1``)."""
    from fedmq.shared import compression, messages

    params = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    wire_model = compression.model_wire(params, model_dtype)
    model = messages.encode(messages.ModelVersion(version=1, params=wire_model, spec={"layers": list(shapes)},
                                                  round=1, run_id="r" * 32, dtype=model_dtype))
    scheme = compression.parse(compress)
    wire = compression.encode_params(params, scheme) if scheme.lossy else params
    update = messages.encode(messages.Update(
        task_id="t" * 32, worker_id="w0", base_version=1, num_samples=32, params=wire,  # type: ignore[arg-type]
        kind="delta", train_loss=0.0, train_accuracy=0.0, duration_s=0.0, round=1, run_id="r" * 32,
        compression=scheme.text))
    return len(model), len(update)


def _params(url: str) -> Any:
    """Bare pika parameters without heartbeats: at 1 GB a floor connection waits minutes between
    its own calls (while the others move bytes), and a BlockingConnection only answers heartbeats
    inside pika calls, so the broker would drop it ("missed heartbeats from client")."""
    import pika

    params = pika.URLParameters(url)
    params.heartbeat = 0
    return params


def _worker(url: str, stream: str, work: str, model_count: int, update_spans: list[tuple[int, int]], rounds: int,
            timeout_s: float, ready: Any) -> None:
    """One bare-pika worker on one connection: attached to the (empty) model stream from the start,
    as fedmq's sync workers stay attached between rounds; each round it reads the model's
    ``model_count`` messages as they are published, puts the time it had them on ``ready``, and
    publishes its update's messages into the quorum queue (persistent, confirms)."""
    import pika

    conn = pika.BlockingConnection(_params(url))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=4)
    pub = conn.channel()
    pub.confirm_delivery()
    bodies = [bytes(b - a) for a, b in update_spans]  # made before any clock starts (pika takes bytes, not views)
    props = pika.BasicProperties(delivery_mode=2)
    got = 0

    def on_chunk(chan: Any, method: Any, _props: Any, _body: bytes) -> None:
        nonlocal got
        chan.basic_ack(method.delivery_tag)
        got += 1

    ch.basic_consume(stream, on_chunk, arguments={"x-stream-offset": "first"})  # empty: what comes next
    ready.put(0.0)
    deadline = time.monotonic() + timeout_s
    for r in range(1, rounds + 1):
        while got < r * model_count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"floor worker: {got} of {r * model_count} model messages in {timeout_s:.0f} s")
            conn.process_data_events(time_limit=min(left, 1.0))  # blocks until data or the limit
        ready.put(time.monotonic())
        for body in bodies:
            pub.basic_publish("", work, body, properties=props, mandatory=True)
    conn.close()


def _run_together(ctx: Any, target: Any, args: tuple[Any, ...], n: int, timeout_s: float) -> tuple[list[Any], Any]:
    """Start ``n`` processes of ``target(*args, timeout_s, ready)``; return (them, ``ready``) once
    every one is connected (said on ``ready``, where they put their times later)."""
    ready = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, timeout_s, ready), daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    _collect(ready, procs, timeout_s, "connect")
    return procs, ready


def _collect(ready: Any, procs: list[Any], timeout_s: float, what: str) -> list[float]:
    """One value from each process on ``ready``; raises if one dies first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    got: list[float] = []
    while len(got) < len(procs):
        dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
        if dead:
            raise RuntimeError(f"floor: {len(dead)} of {len(procs)} processes failed (exit codes {dead}) before they {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"floor: {len(procs) - len(got)} processes did not {what} in {timeout_s:.0f} s")
        with contextlib.suppress(queue.Empty):
            got.append(ready.get(timeout=1.0))  # blocks; wakes to look for failed processes
    return got


def _join(procs: list[Any], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    late = [p for p in procs if p.is_alive()]
    for p in late:
        p.kill()
        p.join(5)
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if late or bad:
        raise RuntimeError(f"floor: {len(late)} {what} did not finish in {timeout_s:.0f} s; exit codes {bad}")


def round_floor(url: str, model_bytes: int, n: int, *, update_bytes: int | None = None, rounds: int = 8,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES, timeout_s: float = 600.0) -> dict[str, Any]:
    """Seconds raw pika takes to move one sync round's bytes the way fedmq moves them (module doc):
    the median over rounds 2..``rounds`` (round 1 warms the new stream and queue up, as fedmq's
    round 1 is left out of its median), with its split into model (publish until the last worker
    has it) and updates (from then until the last update is consumed).

    ``update_bytes`` defaults to ``model_bytes`` (an uncompressed update). Every wait is bounded
    by ``timeout_s``; queues are deleted afterwards.
    """
    import pika

    update_bytes = model_bytes if update_bytes is None else update_bytes
    model_spans, update_spans = chunk_spans(model_bytes, chunk_bytes), chunk_spans(update_bytes, chunk_bytes)
    tag = f"floor-{time.time_ns()}"
    stream, work = f"{tag}.models", f"{tag}.updates"
    conn = pika.BlockingConnection(_params(url))
    ch = conn.channel()
    ch.queue_declare(stream, durable=True, arguments={"x-queue-type": "stream"})
    ch.queue_declare(work, durable=True, arguments={"x-queue-type": "quorum"})
    ch.confirm_delivery()
    ctx = mp.get_context("spawn")
    procs: list[Any] = []
    per_round: list[tuple[float, float]] = []
    cpu = CpuSnapshots()  # the machine's and the shared broker's CPU seconds
    snaps: list[dict[str, float]] = []  # at each round's start, and at the end
    try:
        got = 0

        def on_update(chan: Any, method: Any, _props: Any, _body: bytes) -> None:
            nonlocal got
            chan.basic_ack(method.delivery_tag)
            got += 1

        procs, ready = _run_together(ctx, _worker, (url, stream, work, len(model_spans), update_spans, rounds), n,
                                     timeout_s)
        ch.basic_qos(prefetch_count=16)
        ch.basic_consume(work, on_update)  # consuming before they publish, as the aggregator is
        bodies = [bytes(b - a) for a, b in model_spans]
        props = pika.BasicProperties(delivery_mode=2)
        for r in range(1, rounds + 1):
            snaps.append(cpu.snapshot())
            t0 = time.monotonic()
            for body in bodies:
                ch.basic_publish("", stream, body, properties=props)
            deadline = t0 + timeout_s
            while got < r * n * len(update_spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"floor: round {r}: {got} update messages in {timeout_s:.0f} s")
                conn.process_data_events(time_limit=min(left, 1.0))  # blocks until data or the limit
            t_end = time.monotonic()
            t_model = max(_collect(ready, procs, timeout_s, "read the model")) - t0
            per_round.append((t_end - t0, t_model))
        snaps.append(cpu.snapshot())
        _join(procs, "floor workers", timeout_s)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        ch.queue_delete(stream)
        ch.queue_delete(work)
        conn.close()
    steady = per_round[1:] or per_round
    total = float(np.median([t for t, _ in steady]))
    model = float(np.median([m for _, m in steady]))
    # the whole machine's CPU per round over rounds 2..R (1..R when only one), as round_time's
    first = 1 if rounds > 1 else 0
    used = CpuSnapshots.delta(snaps[first], snaps[-1])
    machine_cpu = used["machine_busy"] / (rounds - first)
    machine_share = used["machine_busy"] / max(1e-9, used["machine_total"])
    # the shared broker's share: not known for a private node (its process is another beam)
    broker_cpu = used["rabbitmq"] / (rounds - first) if url == AMQP_URL and "rabbitmq" in used else None
    return {"total_s": total, "model_s": model, "updates_s": total - model, "per_round_s": [t for t, _ in per_round],
            "model_per_round_s": [m for _, m in per_round], "rounds": rounds, "model_bytes": model_bytes,
            "update_bytes": update_bytes, "chunk_bytes": chunk_bytes, "model_messages": len(model_spans),
            "update_messages": len(update_spans), "workers": n, "machine_cpu_s": machine_cpu,
            "machine_busy_share": machine_share,
            "broker_cpu_s": broker_cpu}
