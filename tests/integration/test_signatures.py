"""End-to-end signatures over a real RabbitMQ: an aggregator and worker processes with keys, and
a test that forges what an attacker with write access to the namespace could publish.

* The aggregator (``--worker-keys``) dead-letters, with the reason, every update (and failure
  report) that is unsigned, signed with a key not the named worker's, signed by another worker
  than the one it names, signed by an unknown worker, altered by one byte, or a real signed
  update of another run replayed into this one; each is recorded ``rejected`` in the ledger,
  and the run still completes on the genuine signed updates.
* Workers (``--aggregator-key``) skip forged models and stops (unsigned, wrong key, altered)
  with the reason logged, and dead-letter forged tasks; none of it stops or stalls them.
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmq.broker.admin import Admin
from fedmq.broker.client import Client, Delivery
from fedmq.broker.settings import BrokerSettings
from fedmq.broker.topology import RUN_HEADER, VERSION_HEADER, Topology
from fedmq.shared import messages
from fedmq.shared.signing import (
    AGGREGATOR_ID,
    SIGNER_HEADER,
    PublicKeys,
    claims_of,
    load_private_key,
    sign_headers,
    verify,
    write_key_pair,
)
from fedmq.shared.trainer import MLPTrainer, mlp_spec
from fedmq.worker.service import Worker, WorkerConfig
from tests.helpers import Procs, read_history, read_ledger, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]

SPEC = mlp_spec(64, 10, hidden=[64])  # the aggregator's default model on digits
RUN_OLD = "20250101T000000Z-0ld0ld"


class Keys:
    """A key set in a directory: the aggregator's, and ``workers/<id>.{key,pub}``."""

    def __init__(self, root: Path, workers: list[str]) -> None:
        self.root = root
        write_key_pair(root, AGGREGATOR_ID)
        for w in workers:
            write_key_pair(root / "workers", w)

    @property
    def aggregator_args(self) -> list[str]:
        return ["--signing-key", str(self.root / "aggregator.key"), "--worker-keys", str(self.root / "workers")]

    def worker_args(self, worker_id: str) -> list[str]:
        return ["--signing-key", str(self.root / "workers" / f"{worker_id}.key"),
                "--aggregator-key", str(self.root / "aggregator.pub")]

    def private(self, key_id: str) -> Ed25519PrivateKey:
        return load_private_key(self.root / ("aggregator.key" if key_id == AGGREGATOR_ID else f"workers/{key_id}.key"))


class Forger:
    """Publishes what the test forges, straight to the namespace's queues and exchanges."""

    def __init__(self, url: str, namespace: str) -> None:
        self.topology = Topology(namespace)
        self.settings = BrokerSettings.from_url(url)
        with Admin(self.settings, self.topology) as admin:
            admin.setup()
        self.client = Client(self.settings, self.topology).start()

    def close(self) -> None:
        self.client.close()

    def update(self, body: bytes, headers: dict[str, Any], message_id: str) -> None:
        self.client.publish(self.topology.updates, body, headers=headers or None, message_id=message_id, timeout=10)

    def model(self, body: bytes, headers: dict[str, Any]) -> None:
        self.client.publish(self.topology.models, body, headers=headers, timeout=10)

    def task(self, body: bytes, headers: dict[str, Any], message_id: str) -> None:
        self.client.publish(self.topology.tasks, body, headers=headers or None, message_id=message_id, timeout=10)

    def stop(self, body: bytes, headers: dict[str, Any]) -> None:
        self.client.publish("", body, exchange=self.topology.control, headers=headers or None, mandatory=False,
                            timeout=10)

    def take_update(self, timeout: float) -> Delivery:
        """The next message of the updates queue, read (and acked) by a consumer of its own that
        leaves at once: the queue has a single active consumer, the aggregator's later."""
        got: queue.Queue[Delivery] = queue.Queue()
        reader = Client(self.settings, self.topology, name="fedmq-test-reader")
        reader.subscribe(self.topology.updates, got.put, settle_on_return=True)
        reader.start()
        try:
            return got.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"nothing arrived on the updates queue within {timeout:.0f} s") from None
        finally:
            reader.close()


@pytest.fixture
def forger(amqp_url: str, namespace: str) -> Iterator[Forger]:
    f = Forger(amqp_url, namespace)
    yield f
    f.close()


def params(seed: int = 0) -> messages.Params:
    return MLPTrainer({**SPEC, "seed": seed}).init_params()


def flip_a_payload_byte(body: bytes, arr: np.ndarray) -> bytes:
    """``body`` with the lowest bit of the first byte of ``arr``'s data flipped (still finite)."""
    at = body.find(arr.tobytes())
    assert at >= 0
    out = bytearray(body)
    out[at] ^= 0x01
    return bytes(out)


def run_id_of(procs: Procs, name: str) -> str:
    found = wait_for(lambda: re.search(r"run (\S+) starts", procs.log(name)), 60, f"{name} to start its run")
    return str(found.group(1))


def in_logs(procs: Procs, names: list[str], words: str) -> bool:
    return any(words in procs.log(n) for n in names)


# ---------------------------------------------------------------------------------- the aggregator's side
def test_the_aggregator_dead_letters_every_update_not_signed_by_its_worker_for_this_run(
        amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path, forger: Forger) -> None:
    keys = Keys(tmp_path / "keys", ["w0", "w1"])
    common = ["--amqp-url", amqp_url, "--namespace", namespace]
    run = tmp_path / "run"

    # A real signed update of an earlier run, to replay: the test plays that run's aggregator.
    agg_key = keys.private(AGGREGATOR_ID)
    old_model = messages.ModelVersion(version=0, params=params(), spec=SPEC, run_id=RUN_OLD)
    body = messages.encode(old_model)
    forger.model(body, {VERSION_HEADER: 0, RUN_HEADER: RUN_OLD, **sign_headers(agg_key, claims_of(old_model), body)})
    old_task = messages.Task(task_id="old-1", version=None, mode="async", epochs=1, batch_size=32, lr=0.1, mu=0.0,
                             seed=1, update_kind="delta", run_id=RUN_OLD)
    body = messages.encode(old_task)
    forger.task(body, sign_headers(agg_key, claims_of(old_task), body), "old-1")
    procs.start("w0", "worker", "--data", str(shards / "worker-0.npz"), "--worker-id", "w0",
                *keys.worker_args("w0"), "--log-format", "json", *common)
    captured = forger.take_update(60)  # w0's signed update of the old run
    replayed_body, replayed_headers = captured.body, dict(captured.headers)
    assert replayed_headers[SIGNER_HEADER] == "w0"

    # This run waits for a second worker while the forgeries arrive.
    procs.start("agg", "aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run), "--mode", "async",
                "--strategy", "fedasync", "--max-updates", "10", "--min-workers", "2", *keys.aggregator_args,
                "--log-format", "json", *common)
    run_id = run_id_of(procs, "agg")
    w0, w1 = keys.private("w0"), keys.private("w1")
    stranger = Ed25519PrivateKey.generate()
    good = messages.Update(task_id="forged", worker_id="w0", base_version=0, num_samples=100, params=params(1),
                           kind="weights", train_loss=0.1, train_accuracy=0.9, duration_s=0.1, run_id=run_id)

    def signed(msg: messages.Update | messages.Control, key: Ed25519PrivateKey, signer: str | None = None) \
            -> tuple[bytes, dict[str, Any]]:
        body = messages.encode(msg)
        return body, sign_headers(key, claims_of(msg, signer=signer), body)

    # a signed pooled heartbeat speaks for its signer only: it cannot make w1 or a ghost live
    vouching = messages.Control(kind="heartbeat", worker_id="w0", info={"workers": ["w1", "ghost"]})
    body, headers = signed(vouching, w0)
    forger.client.publish(forger.topology.presence, body, headers=headers, timeout=10)
    body = messages.encode(replace(good, task_id="unsigned"))
    forger.update(body, {}, "unsigned")
    forger.update(*signed(replace(good, task_id="wrong-key"), stranger), "wrong-key")
    forger.update(*signed(replace(good, task_id="unknown-key", worker_id="w9"), stranger), "unknown-key")
    forger.update(*signed(replace(good, task_id="other-id"), w1, signer="w1"), "other-id")  # names w0, signed by w1
    body, headers = signed(replace(good, task_id="flipped"), w0)
    forger.update(flip_a_payload_byte(body, good.params["dense_0/W"]), headers, "flipped")
    report = messages.Control(kind="failed", worker_id="w0", run_id=run_id, info={"task_id": "t", "reason": "forged"})
    forger.update(messages.encode(report), {}, "unsigned-report")
    forger.update(replayed_body, replayed_headers, "replayed")
    expected = {
        "unsigned": "unsigned: no x-fedmq-signature header",
        "wrong-key": "bad signature: it does not verify with 'w0'",
        "unknown-key": "unknown signer: no public key for 'w9'",
        "other-id": "wrong signer: signed by 'w1', but the update is from 'w0'",
        "flipped": "bad signature",
        "unsigned-report": "failed report for task t claiming worker 'w0': unsigned",
        "replayed": f"signed for run {RUN_OLD}, not this run {run_id}",
    }

    def rejected() -> dict[str, str]:
        return {e["message_id"]: e["reason"] for e in read_ledger(run) if e["fate"] == "rejected"}

    wait_for(lambda: set(expected) <= set(rejected()), 60, "the forged updates to be rejected")
    procs.start("w1", "worker", "--data", str(shards / "worker-1.npz"), "--worker-id", "w1",
                *keys.worker_args("w1"), "--log-format", "json", *common)
    assert procs.wait("agg", 120) == 0, procs.dump()
    for name in ("w0", "w1"):
        assert procs.wait(name, 30) == 0, procs.log(name)

    reasons = rejected()
    assert set(reasons) == set(expected), reasons  # nothing genuine was rejected
    for message_id, words in expected.items():
        assert words in reasons[message_id], (message_id, reasons[message_id])
    ledger = read_ledger(run)
    applied = [e for e in ledger if e["fate"] == "applied"]
    assert len(applied) == read_history(run)["final"]["updates_applied"] >= 10
    assert {e["worker_id"] for e in applied} == {"w0", "w1"}  # both signed workers' updates count
    assert {e["worker_id"] for e in procs.events("agg", "worker_joined")} == {"w0", "w1"}  # no ghost
    with Admin(forger.settings, forger.topology) as admin:
        dead = {d.message_id: d.detail for d in admin.dead_letters() if d.queue == forger.topology.updates_dlq}
    assert set(dead) == set(expected), dead
    for message_id, words in expected.items():
        assert words in dead[message_id], (message_id, dead[message_id])  # the x-fedmq-reason header


# ---------------------------------------------------------------------------------- the workers' side
def test_workers_skip_forged_models_tasks_and_stops_and_the_run_completes(
        amqp_url: str, namespace: str, shards: Path, procs: Procs, tmp_path: Path, forger: Forger) -> None:
    keys = Keys(tmp_path / "keys", ["w0", "w1", "w2"])
    common = ["--amqp-url", amqp_url, "--namespace", namespace]
    run = tmp_path / "run"
    procs.start("agg", "aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run), "--mode", "async",
                "--strategy", "fedasync", "--max-updates", "10", "--min-workers", "3", *keys.aggregator_args,
                "--log-format", "json", *common)
    run_id = run_id_of(procs, "agg")
    early = ["w0", "w1"]
    for i, name in enumerate(early):
        procs.start(name, "worker", "--data", str(shards / f"worker-{i}.npz"), "--worker-id", name,
                    *keys.worker_args(name), "--log-format", "json", *common)
    for name in early:
        wait_for(lambda n=name: "waiting for a model and a task" in procs.log(n), 60, f"{name} to be up")
    agg_key, stranger = keys.private(AGGREGATOR_ID), Ed25519PrivateKey.generate()

    # models: believable next versions of this run
    for version, how in [(1, "unsigned"), (2, "wrong-key"), (3, "altered")]:
        model = messages.ModelVersion(version=version, params=params(version), spec=SPEC, run_id=run_id)
        body = messages.encode(model)
        signature = {} if how == "unsigned" else sign_headers(stranger if how == "wrong-key" else agg_key,
                                                              claims_of(model), body)
        if how == "altered":
            body = flip_a_payload_byte(body, model.params["dense_1/W"])
        forger.model(body, {VERSION_HEADER: version, RUN_HEADER: run_id, **signature})
    # tasks
    task = messages.Task(task_id="t", version=None, mode="async", epochs=1, batch_size=32, lr=0.1, mu=0.0, seed=1,
                         update_kind="weights", run_id=run_id)
    for how in ("unsigned", "wrong-key", "altered"):
        t = replace(task, task_id=f"forged-{how}")
        body = messages.encode(t)
        signature = {} if how == "unsigned" else sign_headers(stranger if how == "wrong-key" else agg_key,
                                                              claims_of(t), body)
        if how == "altered":
            body = messages.encode(replace(t, epochs=500))  # the signed task, with more work asked
        forger.task(body, signature, f"forged-{how}")
    # stops of this run
    stop = messages.Control(kind="stop", run_id=run_id, info={"version": 0})
    for how in ("unsigned", "wrong-key", "altered"):
        body = messages.encode(stop)
        signature = {} if how == "unsigned" else sign_headers(stranger if how == "wrong-key" else agg_key,
                                                              claims_of(stop), body)
        if how == "altered":
            body = messages.encode(replace(stop, info={"version": 1}))
        forger.stop(body, signature)

    model_skips = [f"skipping a model message: version 1 of run {run_id}: unsigned",
                   f"skipping a model message: version 2 of run {run_id}: bad signature",
                   f"skipping a model message: version 3 of run {run_id}: bad signature"]
    stop_skips = [f"ignoring a stop message of run {run_id}: unsigned",
                  f"ignoring a stop message of run {run_id}: bad signature"]
    task_dead = ["dead-lettering task forged-unsigned: unsigned", "dead-lettering task forged-wrong-key: bad signature",
                 "dead-lettering task forged-altered: bad signature"]
    for name in early:
        for words in stop_skips:  # models are read only when a task needs one (issue 15): see below
            wait_for(lambda n=name, w=words: w in procs.log(n), 60, f"{name} to log {words!r}")
        wait_for(lambda n=name: procs.log(n).count("ignoring a stop message") == 3, 60,
                 f"{name} to ignore the three forged stops")
    for words in task_dead:
        wait_for(lambda w=words: in_logs(procs, early, w), 60, f"a worker to log {words!r}")
    for name in early:
        assert procs.procs[name].poll() is None, procs.log(name)  # neither stopped by a forged stop

    procs.start("w2", "worker", "--data", str(shards / "worker-2.npz"), "--worker-id", "w2", *keys.worker_args("w2"),
                "--log-format", "json", *common)
    assert procs.wait("agg", 120) == 0, procs.dump()
    for name in ("w0", "w1", "w2"):
        assert procs.wait(name, 30) == 0, procs.log(name)
    # the forged versions follow the run's version 0 on the stream: a worker fetching its first
    # task's model reads them (from `last`, then further back), skips each, and trains on version 0
    for words in model_skips:
        assert in_logs(procs, ["w0", "w1", "w2"], words), words
    ledger = read_ledger(run)
    assert not [e for e in ledger if e["fate"] == "rejected"], "a worker trained on a forged model or task"
    assert sum(e["fate"] == "applied" for e in ledger) >= 10
    with Admin(forger.settings, forger.topology) as admin:
        dead = sorted(d.message_id or "" for d in admin.dead_letters() if d.queue == forger.topology.tasks_dlq)
    assert dead == ["forged-altered", "forged-unsigned", "forged-wrong-key"]


def test_run_sign_makes_keys_and_a_signed_run_completes(amqp_url: str, namespace: str, tmp_path: Path,
                                                        procs: Procs) -> None:
    out = tmp_path / "run"
    procs.start("run", "run", "--workers", "2", "--sign", "--rounds", "2", "--partition", "iid", "--out", str(out),
                "--display", "plain", "--amqp-url", amqp_url, "--namespace", namespace)
    assert procs.wait("run", 120) == 0, procs.log("run") + (out / "logs" / "aggregator.log").read_text()
    assert sorted(p.name for p in (out / "keys" / "workers").iterdir()) == ["w0.key", "w0.pub", "w1.key", "w1.pub"]
    assert (out / "keys" / "aggregator.key").stat().st_mode & 0o077 == 0
    assert "accepting only updates signed by the worker they name (2 key(s)" in (out / "logs" / "aggregator.log").read_text()
    hist = read_history(out)
    assert hist["final"]["updates_applied"] == 4 and hist["final"]["updates_rejected"] == 0


def test_a_signed_run_with_chunked_models_and_updates_completes(amqp_url: str, namespace: str, tmp_path: Path,
                                                                 procs: Procs) -> None:
    """Signatures over chunks: each side hashes a payload once (the worker signs the digest it also
    puts in the chunk headers; the aggregator verifies with the digest it checked the chunks
    against). digits 64 -> 256 -> 10 is 19,210 parameters, 76,840 bytes: two 64 KiB chunks."""
    out = tmp_path / "run"
    procs.start("run", "run", "--workers", "2", "--sign", "--rounds", "2", "--partition", "iid", "--out", str(out),
                "--hidden", "256", "--chunk-bytes", "65536", "--display", "plain", "--amqp-url", amqp_url,
                "--namespace", namespace)
    assert procs.wait("run", 120) == 0, procs.log("run") + (out / "logs" / "aggregator.log").read_text()
    hist = read_history(out)
    assert hist["final"]["updates_applied"] == 4 and hist["final"]["updates_rejected"] == 0


def test_a_worker_signs_its_updates_failure_reports_and_presence(amqp_url: str, namespace: str, shards: Path,
                                                                   tmp_path: Path, forger: Forger) -> None:
    keys = Keys(tmp_path / "keys", ["w0", "wf"])
    ring = PublicKeys(keys.root / "workers")
    updates: queue.Queue[Delivery] = queue.Queue()
    presence: queue.Queue[Delivery] = queue.Queue()
    reader = Client(forger.settings, forger.topology, name="fedmq-test-reader")
    reader.subscribe(forger.topology.updates, updates.put, settle_on_return=True)
    reader.subscribe(forger.topology.presence, presence.put, arguments={"x-stream-offset": "first"}, prefetch=50,
                     settle_on_return=True)
    reader.start()
    agg_key = keys.private(AGGREGATOR_ID)
    model = messages.ModelVersion(version=0, params=params(), spec=SPEC, run_id=RUN_OLD)
    body = messages.encode(model)
    forger.model(body, {VERSION_HEADER: 0, RUN_HEADER: RUN_OLD, **sign_headers(agg_key, claims_of(model), body)})
    for task_id in ("t-0", "t-1"):
        task = messages.Task(task_id=task_id, version=None, mode="async", epochs=1, batch_size=32, lr=0.1, mu=0.0,
                             seed=1, update_kind="delta", run_id=RUN_OLD)
        body = messages.encode(task)
        forger.task(body, sign_headers(agg_key, claims_of(task), body), task_id)
    stop = threading.Event()
    workers = [Worker(WorkerConfig(data=str(shards / f"worker-{i}.npz"), worker_id=wid, trainer=trainer,
                                   failure_backoff_s=0.05, signing_key=str(keys.root / "workers" / f"{wid}.key"),
                                   aggregator_key=str(keys.root / "aggregator.pub")),
                      forger.settings, forger.topology, stop=stop)
               for i, (wid, trainer) in enumerate([("w0", "fedmq.shared.trainer:MLPTrainer"),
                                                    ("wf", "tests.trainers:FailingTrainer")])]
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    for t in threads:
        t.start()
    try:
        got: dict[str, messages.Update | messages.Control] = {}
        while {"update", "failed"} - set(got):
            try:
                delivery = updates.get(timeout=60)
            except queue.Empty:
                raise AssertionError(f"only {sorted(got)} arrived on the updates queue") from None
            msg = messages.decode(delivery.body, expect=(messages.Update, messages.Control))
            assert isinstance(msg, messages.Update | messages.Control)
            claims = claims_of(msg)
            assert verify(delivery.headers, delivery.body, claims, ring) is None
            other = replace(claims, signer="wf" if claims.signer == "w0" else "w0")
            assert verify(delivery.headers, delivery.body, other, ring) is not None  # its own worker's, no other's
            got["update" if isinstance(msg, messages.Update) else msg.kind] = msg
        assert (got["update"].worker_id, got["failed"].worker_id) == ("w0", "wf")
        hellos: set[str] = set()
        while hellos != {"w0", "wf"}:
            delivery = presence.get(timeout=30)
            hello = messages.decode(delivery.body, expect=messages.Control)
            assert isinstance(hello, messages.Control)
            assert verify(delivery.headers, delivery.body, claims_of(hello), ring) is None, hello
            if hello.kind == "hello":
                hellos.add(hello.worker_id)
    finally:
        stop.set()
        for w in workers:
            w.request_stop()
        for t in threads:
            t.join(30)
        reader.close()
