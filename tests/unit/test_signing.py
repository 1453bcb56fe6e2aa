"""End-to-end signatures, the pure part (fedmq.shared.signing): statements, sign/verify, key files."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmq.shared import messages
from fedmq.shared.errors import ConfigError
from fedmq.shared.signing import (
    AGGREGATOR_ID,
    DOMAIN,
    SIGNATURE_HEADER,
    SIGNER_HEADER,
    Claims,
    PublicKeys,
    check_key_id,
    claims_of,
    load_private_key,
    load_public_key,
    sign_headers,
    statement,
    verify,
    write_key_pair,
)
from tests.helpers import fedmq_argv

RUN = "20250101T000000Z-aaaaaa"


def update(**changes: object) -> messages.Update:
    u = messages.Update(task_id="t1", worker_id="w1", base_version=3, num_samples=10,
                        params={"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, kind="delta", train_loss=0.5,
                        train_accuracy=0.8, duration_s=0.1, run_id=RUN)
    return dataclasses.replace(u, **changes)  # type: ignore[arg-type]


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def signed(key: Ed25519PrivateKey, msg: messages.Message) -> tuple[bytes, dict[str, str]]:
    body = messages.encode(msg)
    return body, sign_headers(key, claims_of(msg), body)


# ------------------------------------------------------------------------------ claims and statement
def test_claims_bind_type_run_signer_task_and_version() -> None:
    model = messages.ModelVersion(version=7, params={}, spec={}, run_id=RUN)
    task = messages.Task(task_id="t9", version=None, mode="async", epochs=1, batch_size=8, lr=0.1, mu=0.0, seed=0,
                         run_id=RUN)
    stop = messages.Control(kind="stop", run_id=RUN)
    failed = messages.Control(kind="failed", worker_id="w2", run_id=RUN, info={"task_id": "t9", "reason": "x"})
    assert claims_of(model) == Claims("model", RUN, AGGREGATOR_ID, "", 7)
    assert claims_of(task) == Claims("task", RUN, AGGREGATOR_ID, "t9", None)
    assert claims_of(update()) == Claims("update", RUN, "w1", "t1", 3)
    assert claims_of(stop) == Claims("control:stop", RUN, AGGREGATOR_ID, "", None)
    assert claims_of(failed) == Claims("control:failed", RUN, "w2", "t9", None)
    assert claims_of(update(), signer="other").signer == "other"


def test_the_statement_is_domain_separated_and_length_prefixed() -> None:
    body = b"payload"
    s = statement(Claims("update", "r", "w1", "t", 3), body)
    assert s.startswith(DOMAIN + b"\0")
    assert s.endswith((32).to_bytes(4, "big") + hashlib.sha256(body).digest())
    # no two claims share a statement, even when their fields concatenate to the same text
    assert statement(Claims("update", "ab", "c", "", None), body) != statement(Claims("update", "a", "bc", "", None), body)
    assert statement(Claims("update", "r", "w", "t", None), body) != statement(Claims("update", "r", "w", "t", 0), body)


# ------------------------------------------------------------------------------ sign / verify
def test_round_trip(key: Ed25519PrivateKey) -> None:
    msg = update()
    body, headers = signed(key, msg)
    assert set(headers) == {SIGNER_HEADER, SIGNATURE_HEADER} and headers[SIGNER_HEADER] == "w1"
    assert len(base64.b64decode(headers[SIGNATURE_HEADER])) == 64
    assert verify(headers, body, claims_of(msg), {"w1": key.public_key()}.get) is None
    # pika may hand header values over as bytes
    as_bytes = {k: v.encode() for k, v in headers.items()}
    assert verify(as_bytes, body, claims_of(msg), {"w1": key.public_key()}.get) is None


def test_unsigned(key: Ed25519PrivateKey) -> None:
    msg = update()
    reason = verify({}, messages.encode(msg), claims_of(msg), {"w1": key.public_key()}.get)
    assert reason is not None and reason.startswith("unsigned")


def test_malformed_headers(key: Ed25519PrivateKey) -> None:
    msg = update()
    body, headers = signed(key, msg)
    keys = {"w1": key.public_key()}.get
    assert "malformed" in (verify({SIGNATURE_HEADER: headers[SIGNATURE_HEADER]}, body, claims_of(msg), keys) or "")
    for bad in ("not base64!", base64.b64encode(b"short").decode(), 12345, b"\xff\xfe"):
        reason = verify({**headers, SIGNATURE_HEADER: bad}, body, claims_of(msg), keys)
        assert reason is not None and reason.startswith("malformed"), (bad, reason)


def test_unknown_signer(key: Ed25519PrivateKey) -> None:
    msg = update()
    body, headers = signed(key, msg)
    reason = verify(headers, body, claims_of(msg), {"w2": key.public_key()}.get)
    assert reason == "unknown signer: no public key for 'w1'"


def test_wrong_key(key: Ed25519PrivateKey) -> None:
    msg = update()
    body, headers = signed(key, msg)
    other = Ed25519PrivateKey.generate()
    reason = verify(headers, body, claims_of(msg), {"w1": other.public_key()}.get)
    assert reason is not None and reason.startswith("bad signature")


def test_signed_by_another_worker_than_the_one_the_message_names(key: Ed25519PrivateKey) -> None:
    w2 = Ed25519PrivateKey.generate()
    msg = update()  # names worker w1 ...
    body = messages.encode(msg)
    headers = sign_headers(w2, claims_of(msg, signer="w2"), body)  # ... signed by w2 with its own key
    keys = {"w1": key.public_key(), "w2": w2.public_key()}.get
    assert verify(headers, body, claims_of(msg), keys) == "wrong signer: signed by 'w2', but the update is from 'w1'"
    # the same signature presented as w1's
    reason = verify({**headers, SIGNER_HEADER: "w1"}, body, claims_of(msg), keys)
    assert reason is not None and reason.startswith("bad signature")


def test_one_flipped_byte_anywhere_in_the_body_fails(key: Ed25519PrivateKey) -> None:
    msg = update()
    body, headers = signed(key, msg)
    keys = {"w1": key.public_key()}.get
    for at in (0, len(body) // 2, len(body) - 1):
        altered = bytearray(body)
        altered[at] ^= 0x01
        reason = verify(headers, bytes(altered), claims_of(msg), keys)
        assert reason is not None and reason.startswith("bad signature"), at


@pytest.mark.parametrize("change", [{"run_id": "another-run"}, {"task_id": "t2"}, {"base_version": 4}])
def test_a_signature_does_not_carry_over_to_another_run_task_or_version(key: Ed25519PrivateKey,
                                                                        change: dict[str, object]) -> None:
    msg = update()
    body, headers = signed(key, msg)
    claims = dataclasses.replace(claims_of(msg), **{"version" if k == "base_version" else k: v
                                                    for k, v in change.items()})  # type: ignore[arg-type]
    reason = verify(headers, body, claims, {"w1": key.public_key()}.get)
    assert reason is not None and reason.startswith("bad signature")


def test_a_signature_does_not_carry_over_to_another_message_type(key: Ed25519PrivateKey) -> None:
    body = b"the same bytes"
    headers = sign_headers(key, Claims("task", RUN, AGGREGATOR_ID, "t1", 3), body)
    reason = verify(headers, body, Claims("model", RUN, AGGREGATOR_ID, "t1", 3), lambda _: key.public_key())
    assert reason is not None and reason.startswith("bad signature")


# ------------------------------------------------------------------------------ key files
def test_write_and_load_a_key_pair(tmp_path: Path) -> None:
    private, public = write_key_pair(tmp_path / "keys", "w1")
    assert (private.name, public.name) == ("w1.key", "w1.pub")
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    sk, pk = load_private_key(private), load_public_key(public)
    body = b"x"
    headers = sign_headers(sk, Claims("update", RUN, "w1"), body)
    assert verify(headers, body, Claims("update", RUN, "w1"), PublicKeys(tmp_path / "keys")) is None
    assert verify(headers, body, Claims("update", RUN, "w1"), lambda _: pk) is None
    with pytest.raises(ConfigError, match="exists; remove it first"):
        write_key_pair(tmp_path / "keys", "w1")


@pytest.mark.parametrize("bad", ["", ".hidden", "a/b", "../x", "w1.pub", "a b", "x" * 129])
def test_key_ids_must_be_file_names(bad: str) -> None:
    with pytest.raises(ConfigError, match="key id"):
        check_key_id(bad)


def one_line(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_key_file_errors_are_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_private_key(tmp_path / "missing.key")
    assert "does not exist" in one_line(e) and "missing.key" in one_line(e)
    with pytest.raises(ConfigError) as e:
        load_private_key(tmp_path)
    assert "is a directory" in one_line(e)
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(os.urandom(100))
    with pytest.raises(ConfigError) as e:
        load_private_key(garbage)
    assert "not a PEM private key" in one_line(e)
    with pytest.raises(ConfigError) as e:
        load_public_key(garbage)
    assert "not a PEM public key" in one_line(e)
    _, public = write_key_pair(tmp_path, "w1")
    with pytest.raises(ConfigError) as e:
        load_private_key(public)  # the public half where the private key belongs
    assert "not a PEM private key" in one_line(e)
    ec = generate_private_key(SECP256R1())
    ec_file = tmp_path / "ec.key"
    ec_file.write_bytes(ec.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    with pytest.raises(ConfigError) as e:
        load_private_key(ec_file)
    assert "not an Ed25519 key" in one_line(e)
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")))
    with pytest.raises(ConfigError) as e:
        load_private_key(encrypted)
    assert "encrypted" in one_line(e)


def test_a_worker_keys_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist or is not a directory"):
        PublicKeys(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no <worker id>.pub"):
        PublicKeys(tmp_path / "empty")
    keys = tmp_path / "keys"
    write_key_pair(keys, "w1")
    (keys / "bad.pub").write_text("not a key")
    with pytest.raises(ConfigError, match="bad.pub is not a PEM public key"):
        PublicKeys(keys)
    (keys / "bad.pub").unlink()
    ring = PublicKeys(keys)
    assert ring.ids == ["w1"] and ring("../w1") is None
    assert ring("w2") is None
    write_key_pair(keys, "w2")
    assert ring("w2") is None  # one look per unknown id
    write_key_pair(keys, "w3")  # a worker whose key is added while the aggregator runs
    assert ring("w3") is not None

def test_keys_generate_command(tmp_path: Path) -> None:
    done = subprocess.run(fedmq_argv("keys", "generate", "--out", str(tmp_path / "k"), "--id", "aggregator",
                                     "--id", "w0"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["aggregator.key", "aggregator.pub", "w0.key", "w0.pub"]
    again = subprocess.run(fedmq_argv("keys", "generate", "--out", str(tmp_path / "k"), "--id", "w0"),
                           capture_output=True, text=True)
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "exists" in again.stderr
    bad = subprocess.run(fedmq_argv("keys", "generate", "--out", str(tmp_path / "k2"), "--id", "ok", "--id", "../x"),
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "key id '../x'" in bad.stderr
    assert not (tmp_path / "k2" / "ok.key").exists()  # nothing written when one id is bad


def test_a_digest_known_already_stands_for_the_body_and_is_not_hashed_again(key: Ed25519PrivateKey) -> None:
    """A chunked payload's SHA-256 is computed once per side: the worker signs the digest it also
    puts in the chunk headers, the aggregator verifies with the digest it checked the chunks
    against. The digest given is what is verified: the wrong one fails, whatever the body."""
    msg = update()
    body = messages.encode(msg)
    digest = hashlib.sha256(body).digest()
    headers = sign_headers(key, claims_of(msg), messages.encode_pieces(msg), digest=digest)
    assert headers == sign_headers(key, claims_of(msg), body)  # Ed25519 is deterministic
    keys = lambda _signer: key.public_key()  # noqa: E731
    assert verify(headers, body, claims_of(msg), keys, digest=digest) is None
    other = hashlib.sha256(body + b"x").digest()
    reason = verify(headers, body, claims_of(msg), keys, digest=other)
    assert reason is not None and reason.startswith("bad signature")
