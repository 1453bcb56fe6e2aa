"""The worker's ModelBox without a broker: versions per run, and nothing on the stream raises."""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import pytest

from fedmq.broker.client import Delivery
from fedmq.broker.topology import RUN_HEADER, VERSION_HEADER
from fedmq.shared import messages
from fedmq.worker.service import ModelBox, Unusable

SPEC = {"input_dim": 4, "num_classes": 2}
NEVER = threading.Event()


def body(version: int, run: str, spec: dict[str, Any] = SPEC) -> bytes:
    params = {"w": np.full((4, 2), version, np.float32)}
    return messages.encode(messages.ModelVersion(version=version, params=params, spec=spec, run_id=run))


def delivery(data: bytes, headers: dict[str, Any] | None = None) -> Delivery:
    return Delivery(queue="ns.models", body=data, delivery_tag=1, redelivered=False, generation=1, message_id=None,
                    headers=headers or {})


def offer(box: ModelBox, version: int, run: str, *, headers: bool = True, **kw: Any) -> None:
    box.offer(delivery(body(version, run, **kw), {VERSION_HEADER: version, RUN_HEADER: run} if headers else None))


def get(box: ModelBox, run: str, version: int | None = None, **kw: Any) -> Any:
    return box.get(run, version, 0.0, NEVER, **kw)


def test_versions_are_kept_per_run_and_a_task_gets_its_runs() -> None:
    box = ModelBox()
    for v in range(6):
        offer(box, v, "A")
    offer(box, 0, "B", headers=False)  # without headers: decoded to learn its run and version
    assert box.latest("A") == 5 and box.latest("B") == 0 and box.last_run == "B"
    m = get(box, "B")
    assert isinstance(m, messages.ModelVersion) and (m.run_id, m.version) == ("B", 0)
    assert get(box, "A").version == 5 and get(box, "A", 4).version == 4
    assert get(box, "C") is None  # no model of that run (yet)


def test_only_the_last_few_runs_are_kept() -> None:
    box = ModelBox(runs=2)
    for run in ("A", "B", "C"):
        offer(box, 0, run)
    assert box.latest("A") is None and list(box.known()) == ["B", "C"]


def test_bad_model_messages_are_skipped_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    box = ModelBox()
    offer(box, 0, "A")
    box.offer(delivery(b"\x00garbage"))
    box.offer(delivery(b"\x00garbage", {VERSION_HEADER: 1, RUN_HEADER: "A"}))  # believable headers, junk body
    box.offer(delivery(body(2, "Z"), {VERSION_HEADER: 2, RUN_HEADER: "A"}))  # headers that lie
    offer(box, 10**6, "A")  # absurdly far ahead of run A
    assert box.latest("A") == 2 and box.skipped == 2
    with caplog.at_level(logging.WARNING, "fedmq.worker"):
        m = get(box, "A")
    assert isinstance(m, messages.ModelVersion) and m.version == 0  # 2 and 1 found bad, dropped
    assert box.skipped == 4 and box.latest("A") == 0
    assert any("does not decode" in r.getMessage() for r in caplog.records)
    assert any("body version 2 of run Z" in r.getMessage() for r in caplog.records)


def test_a_forged_version_read_first_is_dropped_when_the_runs_next_version_follows(
        caplog: pytest.LogCaptureFixture) -> None:
    """A worker that joins right after a forged far-ahead version reads it first ("last" chunk of
    the stream): it must not train on it once the run's real versions come."""
    box = ModelBox()
    offer(box, 10**6, "A")
    assert box.latest("A") == 10**6  # nothing to compare it with yet
    assert get(box, "A").version == 10**6
    with caplog.at_level(logging.WARNING, "fedmq.worker"):
        offer(box, 7, "A")  # the aggregator's next version
    assert box.latest("A") == 7 and get(box, "A").version == 7 and box.skipped == 1
    assert any("1000000 of run A is more than 1000 versions ahead of version 7" in r.getMessage()
               for r in caplog.records)
    offer(box, 8, "A")
    offer(box, 10**6, "A")  # forged again: now skipped as it arrives
    assert box.latest("A") == 8 and box.skipped == 2


def test_a_version_asked_for_that_is_bad_is_unusable_with_the_reason() -> None:
    box = ModelBox()
    offer(box, 3, "A", spec={**SPEC, "kind": "nonsense"})
    out = get(box, "A", 3, check=lambda m: "cannot build" if "kind" in m.spec else None)
    assert isinstance(out, Unusable) and "version 3 of run A: cannot build" in out.reason
    assert box.latest("A") is None


def test_a_newer_version_of_the_run_or_a_new_run_wakes_a_waiting_sync_worker() -> None:
    box = ModelBox()
    offer(box, 3, "A")
    woken: list[str] = []
    box.when_newer_than("A", 3, lambda: woken.append("x"))
    offer(box, 3, "A")  # the same version again: no
    assert not woken
    offer(box, 0, "B")  # the next run
    assert woken == ["x"]
    box.when_newer_than("A", 3, lambda: woken.append("y"))  # at once: a newer run was read since
    assert woken == ["x", "y"]


def test_a_waiting_get_returns_when_the_model_arrives() -> None:
    box = ModelBox()
    waits: list[int] = []
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(box.get("A", 0, 30.0, NEVER, on_wait=lambda: waits.append(1))))
    t.start()
    offer(box, 0, "A")
    t.join(30)
    assert isinstance(got[0], messages.ModelVersion) and got[0].version == 0
    assert len(waits) <= 1


def test_a_stopped_run_is_forgotten() -> None:
    box = ModelBox()
    offer(box, 0, "A")
    box.forget("A")
    assert box.latest("A") is None and get(box, "A") is None


def test_with_the_aggregators_key_only_versions_it_signed_are_kept(caplog: pytest.LogCaptureFixture) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedmq.shared.signing import AGGREGATOR_ID, Claims, sign_headers

    key, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    box = ModelBox(aggregator_key=key.public_key())

    def signed(version: int, run: str, signer: Ed25519PrivateKey = key, **headers: Any) -> None:
        data = body(version, run)
        claims = Claims("model", run, AGGREGATOR_ID, "", version)
        box.offer(delivery(data, {VERSION_HEADER: version, RUN_HEADER: run, **sign_headers(signer, claims, data),
                                  **headers}))

    signed(0, "A")
    with caplog.at_level(logging.WARNING, logger="fedmq.worker"):
        offer(box, 1, "A")  # unsigned
        signed(2, "A", signer=stranger)
        signed(3, "A", **{RUN_HEADER: "B"})  # signed as version 3 of run A, presented as run B's
        good = body(4, "A")
        headers = {VERSION_HEADER: 4, RUN_HEADER: "A",
                   **sign_headers(key, Claims("model", "A", AGGREGATOR_ID, "", 4), good)}
        box.offer(delivery(good[:-1] + bytes([good[-1] ^ 1]), headers))  # one byte altered
        box.offer(delivery(good, {**headers, VERSION_HEADER: 0}))  # presented as version 0: replaces nothing
    assert box.known() == {"A": 0} and box.skipped == 5
    said = caplog.text
    assert "version 1 of run A: unsigned" in said and "version 2 of run A: bad signature" in said
    assert "version 3 of run B: bad signature" in said and "version 4 of run A: bad signature" in said
    assert np.all(get(box, "A").params["w"] == 0)  # the genuine version 0, not the one presented as it
    signed(1, "A")
    assert box.known() == {"A": 1}


def test_a_version_far_ahead_of_the_tasks_is_refused_even_as_the_first_of_its_run() -> None:
    """The task names its version: a forged far-ahead version read first (a worker joining just
    after it) is not stored, so not even one task trains on it (README "Limits", closed)."""
    box = ModelBox()
    box.expect("A", 5)
    offer(box, 5 + 1000 + 1, "A")  # forged, first of its run
    assert box.latest("A") is None and box.skipped == 1
    offer(box, 5 + 1000, "A")  # as far ahead as the run may be by now: believed
    assert box.latest("A") == 1005


def test_an_async_get_takes_the_newest_from_the_tasks_version_and_waits_for_one() -> None:
    box = ModelBox()
    offer(box, 3, "A")
    assert get(box, "A", minimum=4) is None  # version 3 is too old for a task that names 4
    offer(box, 4, "A")
    offer(box, 6, "A")
    assert get(box, "A", minimum=4).version == 6
    assert box.has("A", 4, 4) and not box.has("A", 7)


def test_a_sync_get_gives_up_at_once_when_a_newer_version_passed_the_one_it_wants() -> None:
    """Read from the stream's end, version 5 of a sync task is behind the reader: no waiting."""
    box = ModelBox()
    offer(box, 3, "A")
    offer(box, 6, "A")
    waits: list[int] = []
    assert box.get("A", 5, 1.0, NEVER, on_wait=lambda: waits.append(1)) is None and not waits


def test_a_signed_chunked_version_is_verified_with_the_digest_it_was_put_together_with(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker hashes a signed chunked model once: the SHA-256 its reassembly computed from the
    bytes (``Delivery.sha256``) is the one the signature's check uses."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedmq.shared import signing
    from fedmq.shared.signing import AGGREGATOR_ID, Claims, sign_headers

    key = Ed25519PrivateKey.generate()
    box = ModelBox(aggregator_key=key.public_key())
    data = body(0, "A")
    headers = {VERSION_HEADER: 0, RUN_HEADER: "A", **sign_headers(key, Claims("model", "A", AGGREGATOR_ID, "", 0), data)}
    digest = hashlib.sha256(data).digest()

    class NoHashing:
        @staticmethod
        def sha256(*_args: Any) -> Any:
            raise AssertionError("the body was hashed again")

    monkeypatch.setattr(signing, "hashlib", NoHashing)
    box.offer(Delivery(queue="ns.models", body=data, delivery_tag=1, redelivered=False, generation=1,
                       message_id=None, headers=headers, sha256=digest))
    assert box.known() == {"A": 0}
