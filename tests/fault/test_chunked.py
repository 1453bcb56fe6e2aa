"""Chunked transfer against a real RabbitMQ: models and updates over the broker's message limit.

The large-model runs use a private node configured like a stock RabbitMQ 4 (``max_message_size``
16 MiB) and a ~25M-parameter stand-in model (about 100 MB per model and per update). The fault
tests (a worker killed half-way through publishing, an aggregator killed with chunks in flight,
a late joiner, hostile chunks) force chunking on a small model with ``--chunk-bytes 65536`` on the
shared test broker. Every run ends with the ledger invariant.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedmq.broker.chunked import StreamFollower, publish_payload, send_payload, wait_confirms
from fedmq.broker.client import Client, Delivery
from fedmq.broker.provision import PrivateNode
from fedmq.broker.settings import BrokerSettings, MiB
from fedmq.broker.topology import VERSION_HEADER, Topology
from fedmq.shared import chunking
from tests.conftest import delete_namespace, new_namespace, skip_or_fail
from tests.fault.test_faults import _sync_run, all_confirmed
from tests.helpers import REPO, Procs, assert_ledger_invariant, read_history, read_ledger, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.fault, pytest.mark.slow]

RABBITMQ4_LIMIT = 16 * MiB
STANDIN = "bench.standin:NoiseTrainer"
#: 64 -> 5000 -> 5000 -> 10: 25.4M float32 parameters, about 101 MB
LARGE = ("--hidden", "5000,5000", "--trainer", STANDIN)
SMALL_CHUNKS = ("--chunk-bytes", "65536")
#: 64 -> 512 -> 10: 38k parameters, 3 chunks of 64 KiB
SMALL = ("--hidden", "512")


@pytest.fixture(scope="module")
def rabbitmq4_limits() -> Iterator[PrivateNode]:
    """A private node refusing messages over 16 MiB, as a stock RabbitMQ 4 does."""
    if not PrivateNode.available():
        skip_or_fail("rabbitmq-server is not installed: these tests need a private node")
    node = PrivateNode(config={"max_message_size": str(RABBITMQ4_LIMIT)}).start()
    try:
        yield node
    finally:
        node.remove()


def start_worker(procs: Procs, shards: Path, i: int, common: list[str], *extra: str, name: str | None = None) -> None:
    procs.start(name or f"w{i}", "worker", "--data", str(shards / f"worker-{i}.npz"), "--worker-id", f"w{i}",
                "--log-format", "json", *extra, *common)


def aggregator(procs: Procs, shards: Path, run: Path, common: list[str], *extra: str, name: str = "agg") -> list[str]:
    args = ["aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run), "--log-format", "json",
            "--join-grace", "0", *extra, *common]
    procs.start(name, *args)
    return args


# ------------------------------------------------------------------------ 25M parameters, 16 MiB
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_25m_parameter_model_trains_through_a_16mib_broker(rabbitmq4_limits: PrivateNode, shards: Path,
                                                              procs: Procs, tmp_path: Path, mode: str) -> None:
    url, ns = rabbitmq4_limits.url, new_namespace("big")
    common = ["--amqp-url", url, "--namespace", ns]
    run = tmp_path / "run"
    how = (["--mode", "sync", "--rounds", "2", "--min-workers", "2"] if mode == "sync" else
           ["--mode", "async", "--strategy", "fedbuff", "--buffer-size", "2", "--max-updates", "4", "--min-workers", "2"])
    try:
        aggregator(procs, shards, run, common, *how, *LARGE)
        for i in range(2):
            start_worker(procs, shards, i, common, "--trainer", STANDIN)
        assert procs.wait("agg", 400) == 0, procs.dump()
    finally:
        delete_namespace(url, ns)
    final = read_history(run)["final"]
    assert final["updates_applied"] >= 4 and final["version"] >= 2
    if mode == "sync":
        assert final["version"] == 2 and final["updates_applied"] == 4
    with np.load(run / "model.npz", allow_pickle=False) as model:
        assert sum(model[k].size for k in model.files) > 25_000_000  # the model really was over the limit
    ledger = assert_ledger_invariant(run, all_confirmed(procs))
    assert {e["fate"] for e in ledger} <= {"applied", "late"}  # async: answers to the last tasks come late


def test_a_chunk_size_over_the_broker_limit_fails_in_one_line(rabbitmq4_limits: PrivateNode, shards: Path,
                                                              procs: Procs, tmp_path: Path) -> None:
    url, ns = rabbitmq4_limits.url, new_namespace("lim")
    common = ["--amqp-url", url, "--namespace", ns]
    try:
        # the broker announces 3.10 (128 MiB by default) but enforces 16 MiB: refused when published
        aggregator(procs, shards, tmp_path / "run", common, "--rounds", "1", "--chunk-bytes", str(20 * MiB), *LARGE)
        start_worker(procs, shards, 0, common, "--trainer", STANDIN)
        assert procs.wait("agg", 120) == 1, procs.dump()
    finally:
        delete_namespace(url, ns)
    last = [line for line in procs.log("agg").splitlines() if line.startswith("fedmq: error")]
    assert len(last) == 1 and "--chunk-bytes" in last[0] and "20971520" in last[0], procs.log("agg")[-3000:]
    assert "reconnected" not in procs.log("agg")


def test_a_chunk_size_over_a_known_limit_is_refused_before_sending(amqp_url: str, namespace: str, shards: Path,
                                                                   procs: Procs, tmp_path: Path) -> None:
    common = ["--amqp-url", amqp_url, "--namespace", namespace]
    procs.start("agg", "aggregator", "--test-data", str(shards / "test.npz"), "--out", str(tmp_path / "run"),
                "--rounds", "1", "--chunk-bytes", str(2 * MiB), "--hidden", "256,2048", *common,
                env={"FEDMQ_MAX_MESSAGE_BYTES": str(1 * MiB)})
    assert procs.wait("agg", 60) == 1, procs.dump()
    err = [line for line in procs.log("agg").splitlines() if line.startswith("fedmq: error")]
    assert len(err) == 1 and "--chunk-bytes 2097152" in err[0] and "1048576" in err[0], procs.log("agg")


# ------------------------------------------------------------------------ faults, small chunks
def test_worker_killed_half_way_through_a_chunked_update_is_recorded_incomplete(
        amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["--amqp-url", amqp_url, "--namespace", namespace]
    aggregator(procs, shards, run, common, "--mode", "async", "--strategy", "fedbuff", "--buffer-size", "2",
               "--max-updates", "12", "--min-workers", "3", "--chunk-timeout", "3", *SMALL, *SMALL_CHUNKS)
    with open(procs.logs / "w0.log", "ab") as log:
        procs.procs["w0"] = subprocess.Popen(
            [sys.executable, "-m", "tests.crashing_worker", "--crash-at", "half_published", "--chunk-bytes", "65536",
             "--data", str(shards / "worker-0.npz"), "--worker-id", "w0", "--log-format", "json", *common],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, stdin=subprocess.DEVNULL, start_new_session=True)
    for i in (1, 2):
        start_worker(procs, shards, i, common, *SMALL_CHUNKS)
    assert procs.wait("w0", 60) == -9, procs.log("w0")
    assert procs.wait("agg", 120) == 0, procs.dump()
    ledger = assert_ledger_invariant(run, all_confirmed(procs))
    incomplete = [e for e in ledger if e["fate"] == "incomplete"]
    assert len(incomplete) == 1 and incomplete[0]["worker_id"] == "w0", incomplete
    assert "chunks arrived" in incomplete[0]["reason"]
    task = incomplete[0]["task_id"]
    assert not any(e["fate"] == "applied" and e.get("worker_id") == "w0" for e in ledger)
    # the killed worker's task went back to the queue and was done by another worker, once
    assert [e["worker_id"] for e in ledger if e.get("task_id") == task and e["fate"] == "applied"] in ([], ["w1"],
                                                                                                         ["w2"])
    assert read_history(run)["counts"]["incomplete"] == 1


def test_sync_run_killed_aggregator_with_chunks_in_flight_is_bit_identical(amqp_url: str, shards: Path, procs: Procs,
                                                                           tmp_path: Path) -> None:
    ref, faulty = tmp_path / "ref", tmp_path / "faulty"
    agg_extra, worker_extra = (*SMALL, *SMALL_CHUNKS), SMALL_CHUNKS
    _sync_run(amqp_url, shards, procs, ref, "cref", faults=False, agg_extra=agg_extra, worker_extra=worker_extra)
    _sync_run(amqp_url, shards, procs, faulty, "cflt", faults=True, agg_extra=agg_extra, worker_extra=worker_extra)
    with np.load(ref / "model.npz", allow_pickle=False) as a, np.load(faulty / "model.npz", allow_pickle=False) as b:
        assert a.files == b.files
        for k in a.files:
            assert a[k].tobytes() == b[k].tobytes(), f"{k} differs"
    assert read_history(faulty)["final"]["version"] == 10
    assert_ledger_invariant(faulty, all_confirmed(procs, "wcflt"))


def test_a_version_republished_after_a_kill_mid_publish_reaches_a_reader_of_the_partial_one(
        amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed aggregator publishes its current version again. Where its predecessor was killed
    with that version's chunks in flight, the stream holds a partial payload, then the whole new
    one. Both were ``model-<run>-<version>``: a worker holding the partial one's first chunks took
    the new ones as foreign and never saw the version (a sync round stalled in CI). Here the
    partial publish is the first one with its last chunk left out, as a kill before it would."""
    run = tmp_path / "run"
    common = ["--amqp-url", amqp_url, "--namespace", namespace]
    topo = Topology(namespace)
    monkeypatch.setenv("FEDMQ_TEST_SLEEP_S", "0.3")
    trainer = ("--trainer", "tests.trainers:SleepyTrainer")
    agg = aggregator(procs, shards, run, common, "--mode", "async", "--strategy", "fedasync", "--max-updates", "30",
                     "--min-workers", "1", "--checkpoint-every", "1", *SMALL, *SMALL_CHUNKS, *trainer)
    start_worker(procs, shards, 0, common, *SMALL_CHUNKS, *trainer)
    chunks: list[Delivery] = []
    client = Client(BrokerSettings.from_url(amqp_url), topo)
    client.subscribe(topo.models, chunks.append, prefetch=16, arguments={"x-stream-offset": "first"},
                     settle_on_return=True)

    def publishes() -> dict[int, list[list[Delivery]]]:
        """Version -> its publishes, each a list of chunks in stream order."""
        out: dict[int, list[list[Delivery]]] = {}
        for d in list(chunks):
            version = d.headers[VERSION_HEADER]
            if d.headers[chunking.INDEX_HEADER] == 0:
                out.setdefault(version, []).append([])
            if version in out:
                out[version][-1].append(d)
        return out

    def again() -> list[list[Delivery]] | None:
        return next((p for p in publishes().values() if len(p) >= 2 and len(p[1]) == 3), None)

    with client:
        wait_for(lambda: (run / "checkpoint").exists() and len(publishes()) >= 3, 60, "three versions and a checkpoint")
        procs.kill("agg")
        procs.start("agg2", *agg, "--resume")
        twice = wait_for(again, 60, "the checkpoint's version published again")
    first, second = twice[:2]
    assert [len(first), len(second)] == [3, 3]
    reader: chunking.Reassembler[None] = chunking.Reassembler(max_payload_bytes=1 << 20, timeout_s=600, max_open=2)
    whole = [out for d in first[:-1] + second for out in reader.offer(d.headers, d.body, None, 0.0)
             if isinstance(out, chunking.Complete)]
    assert len(whole) == 1, "the version published again never came whole to a reader of the partial one"
    assert whole[0].payload_id != first[0].headers[chunking.ID_HEADER]


def test_a_late_joiner_trains_on_a_complete_chunked_version(amqp_url: str, namespace: str, shards: Path, procs: Procs,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    common = ["--amqp-url", amqp_url, "--namespace", namespace]
    # every task takes 0.5 s whatever the machine's speed: the run outlasts the late worker's start
    monkeypatch.setenv("FEDMQ_TEST_SLEEP_S", "0.5")
    trainer = ("--trainer", "tests.trainers:SleepyTrainer")
    aggregator(procs, shards, run, common, "--mode", "async", "--strategy", "fedasync", "--max-updates", "40",
               "--min-workers", "1", "--concurrency", "2", *SMALL, *SMALL_CHUNKS, *trainer)
    start_worker(procs, shards, 0, common, *SMALL_CHUNKS, *trainer)
    wait_for(lambda: read_history(run)["final"]["version"] >= 5 if (run / "history.json").exists() else False, 90,
             "five versions")
    start_worker(procs, shards, 1, common, *SMALL_CHUNKS, *trainer)  # attaches at `last`: mid-version or its end
    assert procs.wait("agg", 180) == 0, procs.dump()
    late = procs.events("w1", "update_confirmed")
    assert late, procs.log("w1")[-3000:]
    ledger = assert_ledger_invariant(run, all_confirmed(procs))
    assert any(e["fate"] == "applied" and e["worker_id"] == "w1" for e in ledger)
    assert "skipping" not in procs.log("w1")


def test_hostile_chunks_are_rejected_or_recorded_incomplete_with_reasons(
        amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["--amqp-url", amqp_url, "--namespace", namespace]
    aggregator(procs, shards, run, common, "--mode", "async", "--strategy", "fedbuff", "--max-updates", "30",
               "--min-workers", "2", "--chunk-timeout", "3", *SMALL, *SMALL_CHUNKS)
    for i in range(2):
        start_worker(procs, shards, i, common, *SMALL_CHUNKS)
    wait_for(lambda: (run / "updates.jsonl").exists() and (run / "updates.jsonl").stat().st_size > 0, 60,
             "a first update")
    body = np.random.default_rng(0).bytes(200_000)  # 4 chunks of 64 KiB, under --max-update-bytes
    size = 65536
    client = Client(BrokerSettings.from_url(amqp_url), Topology(namespace), declare=False).start()
    try:
        def send(chunks: list[chunking.Chunk], pid: str) -> None:
            for c in chunks:
                client.publish(f"{namespace}.updates", c.data, message_id=f"{pid}:{c.index}", headers=c.headers)

        full = chunking.split(body, size, "missing")
        send(full[:2] + full[3:], "missing")  # chunk 2 never comes
        foreign = chunking.split(np.random.default_rng(1).bytes(180_000), size, "missing")  # another payload, same id
        send([foreign[1]], "foreign")
        bad = chunking.split(body, size, "corrupt")
        flipped = bytearray(bad[1].data)
        flipped[0] ^= 1
        send([bad[0], chunking.Chunk(memoryview(bytes(flipped)), bad[1].headers, 1, bad[1].count), *bad[2:]], "corrupt")
        dup = chunking.split(body, size, "garbage")  # complete, duplicated and reordered: not an update inside
        send([*reversed(dup), dup[0], dup[2]], "garbage")
        big = chunking.split(body, size, "oversized")
        send([chunking.Chunk(memoryview(bytes(size + 10)), big[0].headers, 0, big[0].count)], "oversized")
        huge = chunking.split(np.random.default_rng(2).bytes(1_000_000), size, "huge")  # over --max-update-bytes
        send(huge[:1], "huge")
        send([chunking.Chunk(memoryview(b"x" * 10), {chunking.ID_HEADER: "malformed", chunking.INDEX_HEADER: "1"},
                             0, 2)], "malformed")
    finally:
        client.close()
    assert procs.wait("agg", 120) == 0, procs.dump()
    ledger = read_ledger(run)
    by_id: dict[str, list[dict]] = {}
    for e in ledger:
        by_id.setdefault(str(e["message_id"]).split(":")[0], []).append(e)
    assert [e["fate"] for e in by_id["missing"]] == ["incomplete"]
    assert "3 of 4 chunks" in by_id["missing"][0]["reason"]
    assert [e["fate"] for e in by_id["foreign"]] == ["rejected"] and "foreign" in by_id["foreign"][0]["reason"]
    assert [e["fate"] for e in by_id["corrupt"]] == ["rejected"] and "corrupt" in by_id["corrupt"][0]["reason"]
    assert [e["fate"] for e in by_id["garbage"]] == ["rejected"]  # one line, however many copies of its chunks
    assert [e["fate"] for e in by_id["oversized"]] == ["rejected"] and "oversized" in by_id["oversized"][0]["reason"]
    assert [e["fate"] for e in by_id["malformed"]] == ["rejected"] and "header" in by_id["malformed"][0]["reason"]
    assert [e["fate"] for e in by_id["huge"]] == ["rejected"] and "over the limit" in by_id["huge"][0]["reason"]
    assert_ledger_invariant(run, all_confirmed(procs))
    assert read_history(run)["final"]["updates_applied"] >= 30


# ------------------------------------------------------------------------ the stream, directly
def test_a_stream_follower_attached_at_last_gets_the_newest_whole_payload(amqp_url: str, namespace: str) -> None:
    topo = Topology(namespace)
    settings = BrokerSettings.from_url(amqp_url)
    payloads = [np.random.default_rng(i).bytes(200_000 + i) for i in range(3)]
    with Client(settings, topo) as pub:
        for i, p in enumerate(payloads):  # one chunk at a time: `last` lands on v2's last chunk
            send_payload(pub, topo.models, p, chunk_bytes=65536, message_id=f"v{i}", headers={"x-fedmq-version": i},
                         window=1)
    got: list[Delivery] = []
    client = Client(settings, topo, declare=False)
    follower = StreamFollower(client, topo.models, got.append, max_payload_bytes=1 << 20)
    client.subscribe(topo.models, follower.on_delivery, prefetch=2, arguments=follower.arguments, settle_on_return=True)
    with client:
        wait_for(lambda: any(d.message_id == "v2" for d in got), 30, "the newest payload, whole")
    assert [d.message_id for d in got] == ["v2"]
    assert bytes(got[0].body) == payloads[2]
    assert {k: v for k, v in got[0].headers.items() if k != "x-stream-offset"} == {"x-fedmq-version": 2}
    assert follower.rewinds == 1 and follower.skipped == 0


def test_a_stream_follower_told_until_what_stops_reading_there(amqp_url: str, namespace: str) -> None:
    """A worker's fetch wants one version; with the stream's later versions already there (or
    published while its task thread comes back for the detach) it read them all: at 256 workers,
    five models per update. With ``until`` it closes its channel on the I/O thread at once."""
    topo = Topology(namespace)
    settings = BrokerSettings.from_url(amqp_url)
    with Client(settings, topo) as pub:
        for i in range(20):
            pub.publish(topo.models, f"model {i}".encode() * 1000, message_id=f"v{i}")
    got: list[Delivery] = []
    client = Client(settings, topo, declare=False)
    follower = StreamFollower(client, topo.models, got.append, max_payload_bytes=1 << 20, attached=False)
    client.subscribe(topo.models, follower.on_delivery, prefetch=1, arguments=follower.arguments,
                     settle_on_return=True, paused=True, own_channel=True)
    with client:
        assert not follower.attached
        follower.attach(offset=0, until=lambda: len(got) >= 3)
        assert follower.attached and follower.fetching
        wait_for(lambda: follower.satisfied, 30, "the third version")
        assert not follower.attached and not follower.fetching
        client.publish(topo.presence, b"a round trip on the connection", timeout=10)
        assert [d.message_id for d in got] == ["v0", "v1", "v2"]
        assert follower.deliveries == 3  # nothing more dispatched: no ack of v2 gave credit for v3
        follower.attach(fresh=False)  # and it reads on from there when asked
        assert follower.attached and not follower.fetching
        wait_for(lambda: len(got) == 20, 30, "the rest of the stream")
    assert [d.message_id for d in got] == [f"v{i}" for i in range(20)]


def test_update_headers_arrive_with_the_reassembled_payload(amqp_url: str, namespace: str, tmp_path: Path) -> None:
    """The contract payload signatures rely on: headers given to a payload come back with it whole."""
    topo = Topology(namespace)
    settings = BrokerSettings.from_url(amqp_url)
    body = np.random.default_rng(3).bytes(150_000)
    with Client(settings, topo) as pub:
        wait_confirms(publish_payload(pub, topo.updates, body, chunk_bytes=65536, message_id="u1",
                                      headers={"x-fedmq-signature": "sig", "x-fedmq-worker": "w9"}))
        seen: list[Delivery] = []
        pub.subscribe(topo.updates, seen.append, prefetch=10)
        wait_for(lambda: len(seen) == 3, 30, "three chunks")
    r: chunking.Reassembler[int] = chunking.Reassembler(max_payload_bytes=1 << 20, timeout_s=10)
    outs = [o for d in seen for o in r.offer(d.headers, d.body, d.delivery_tag, 0.0)]
    done = [o for o in outs if isinstance(o, chunking.Complete)]
    assert len(done) == 1 and bytes(done[0].body) == body
    assert done[0].headers == {"x-fedmq-signature": "sig", "x-fedmq-worker": "w9"}
    assert json.dumps(done[0].headers)  # plain values, as sent


# ------------------------------------------------------------------------ consumer timeouts
def test_task_and_update_consumers_carry_their_own_consumer_timeout(rabbitmq4_limits: PrivateNode, shards: Path,
                                                                    procs: Procs, tmp_path: Path) -> None:
    """A task trains while unacked, updates wait for the checkpoint unacked: both consumers set
    ``x-consumer-timeout`` (honoured by RabbitMQ 3.12+ and 4.x; the node-wide default is 30 min)."""
    url, ns = rabbitmq4_limits.url, new_namespace("cto")
    common = ["--amqp-url", url, "--namespace", ns]
    try:
        # it waits for a second worker that never comes: both consumers stay up while we look
        aggregator(procs, shards, tmp_path / "run", common, "--min-workers", "2", "--consumer-timeout", "7200")
        start_worker(procs, shards, 0, common, "--consumer-timeout", "5400")

        def consumers() -> dict[str, str]:
            out = rabbitmq4_limits.ctl("list_consumers", "-q", "queue_name", "arguments")
            return {line.split("\t")[0]: line for line in out.splitlines() if line.startswith(ns)}

        seen = wait_for(lambda: (c := consumers()) and f"{ns}.tasks" in c and f"{ns}.updates" in c and c, 180,
                        "the task and update consumers")
    finally:
        procs.kill("agg")
        procs.kill("w0")
        delete_namespace(url, ns)
    assert "x-consumer-timeout" in seen[f"{ns}.tasks"] and "5400000" in seen[f"{ns}.tasks"], seen
    assert "x-consumer-timeout" in seen[f"{ns}.updates"] and "7200000" in seen[f"{ns}.updates"], seen
