"""End-to-end signatures: Ed25519 (the ``cryptography`` library) over what a message claims.

A signed message carries two AMQP headers, never anything in its body:

* :data:`SIGNER_HEADER` (``x-fedmq-signer``): who signed it, a worker id or
  :data:`AGGREGATOR_ID` (``"aggregator"``);
* :data:`SIGNATURE_HEADER` (``x-fedmq-signature``): the 64-byte Ed25519 signature, base64.

The signature is over a domain-separated *statement* (:func:`statement`), not over the body
alone: :data:`DOMAIN`, then the message type (``model``, ``task``, ``update``,
``control:<kind>``), the run id, the signer id, the task id, the (base) version, and the
SHA-256 of the whole encoded body, each field length-prefixed. The body already holds those
fields; binding them again explicitly means a signature checked against what the verifier
expects (this run, this worker, this version) fails for a message of another run, task,
worker or version, and a signature made for one message type never verifies as another. The
digest covers the whole body: a body sent in chunks is verified once reassembled.

:func:`claims_of` derives the claims from a decoded message; :func:`sign_headers` makes the
headers, :func:`verify` checks them and returns the reason a message must not be trusted
(unsigned, malformed, signed by someone else, unknown key, altered) or None.

Keys are PEM files: the private key PKCS#8 (``<id>.key``, mode 0600), the public key
SubjectPublicKeyInfo (``<id>.pub``), both written by :func:`write_key_pair`
(``fedmq keys generate``). A directory of ``<id>.pub`` files maps worker ids to keys
(:class:`PublicKeys`). A key file that is missing, unreadable or not an Ed25519 key raises a
:class:`~fedmq.shared.errors.ConfigError` with one line naming the file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias, cast

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedmq.shared import messages
from fedmq.shared.errors import ConfigError

__all__ = [
    "AGGREGATOR_ID",
    "DOMAIN",
    "PRIVATE_SUFFIX",
    "PUBLIC_SUFFIX",
    "SIGNATURE_HEADER",
    "SIGNER_HEADER",
    "Claims",
    "PublicKeys",
    "check_key_id",
    "claims_of",
    "load_private_key",
    "load_public_key",
    "sign_headers",
    "statement",
    "verify",
    "write_key_pair",
]

log = logging.getLogger("fedmq.signing")

SIGNATURE_HEADER = "x-fedmq-signature"
SIGNER_HEADER = "x-fedmq-signer"
#: the signer id of everything the aggregator publishes (models, tasks, stops)
AGGREGATOR_ID = "aggregator"
#: the first bytes of every signed statement (a signature made for anything else never verifies)
DOMAIN = b"fedmq-signature-v1"
PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"
#: a key id is also a file name: letters, digits, ".", "_", "-", "@"; not starting with "."
KEY_ID = re.compile(r"[A-Za-z0-9_@-][A-Za-z0-9._@-]{0,127}")
_SIGNATURE_BYTES = 64


@dataclass(frozen=True)
class Claims:
    """What a signature vouches for, besides the body: who sent what, for which run and task."""

    kind: str  # "model", "task", "update" or "control:<kind>"
    run_id: str
    signer: str  # a worker id, or AGGREGATOR_ID
    task_id: str = ""
    version: int | None = None  # a model's version, a task's version, an update's base version


def claims_of(msg: messages.Message, signer: str | None = None) -> Claims:
    """The claims a message makes: signed by ``signer`` (default: its worker id for an update or
    a worker's control message, :data:`AGGREGATOR_ID` for the rest)."""
    if isinstance(msg, messages.ModelVersion):
        return Claims("model", msg.run_id, signer or AGGREGATOR_ID, "", msg.version)
    if isinstance(msg, messages.Task):
        return Claims("task", msg.run_id, signer or AGGREGATOR_ID, msg.task_id, msg.version)
    if isinstance(msg, messages.Update):
        return Claims("update", msg.run_id, signer or msg.worker_id, msg.task_id, msg.base_version)
    task_id = msg.info.get("task_id")
    return Claims(f"control:{msg.kind}", msg.run_id, signer or msg.worker_id or AGGREGATOR_ID,
                  task_id if isinstance(task_id, str) else "", None)


Body: TypeAlias = "bytes | bytearray | memoryview | list[Any]"


def body_digest(body: Body) -> bytes:
    """SHA-256 of the body, given whole or as the pieces whose concatenation it is
    (:func:`fedmq.shared.messages.encode_pieces`: a large update is never joined into one buffer)."""
    if isinstance(body, bytes | bytearray | memoryview):
        return hashlib.sha256(body).digest()
    h = hashlib.sha256()
    for piece in cast(list[Any], body):
        h.update(piece)
    return h.digest()


def statement(claims: Claims, body: Body, digest: bytes | None = None) -> bytes:
    """The bytes signed: :data:`DOMAIN`, a zero byte, then the type, run, signer, task, version
    (decimal, empty for none) and SHA-256 of ``body``, each as a 4-byte big-endian length and
    the bytes (text in UTF-8). ``digest``: that SHA-256, where the caller has it already (a
    chunked payload's, checked when it was put together), so a large body is hashed once."""
    version = "" if claims.version is None else str(claims.version)
    parts = [p.encode("utf-8") for p in (claims.kind, claims.run_id, claims.signer, claims.task_id, version)]
    parts.append(body_digest(body) if digest is None else digest)
    out = bytearray(DOMAIN + b"\0")
    for part in parts:
        out += len(part).to_bytes(4, "big") + part
    return bytes(out)


def sign_headers(key: Ed25519PrivateKey, claims: Claims, body: Body, *, digest: bytes | None = None) -> dict[str, str]:
    """The signature headers for ``body`` (whose SHA-256 is ``digest``, if given) making ``claims``."""
    signature = key.sign(statement(claims, body, digest))
    return {SIGNER_HEADER: claims.signer, SIGNATURE_HEADER: base64.b64encode(signature).decode("ascii")}


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def verify(
    headers: Mapping[str, Any],
    body: bytes | bytearray | memoryview,
    claims: Claims,
    key_for: Callable[[str], Ed25519PublicKey | None],
    *,
    digest: bytes | None = None,
) -> str | None:
    """Why a message with these headers and body must not be trusted as making ``claims``, or
    None if its signature verifies with ``key_for(claims.signer)``.

    The reasons, in the order they are checked: unsigned (no signature header), a malformed
    header, signed by another id than the one the message claims, no public key for that id,
    and a signature that does not verify (the body, the run, the task or the version differ
    from what was signed, or another key signed it). ``digest``: the body's SHA-256 where the
    caller computed it from these very bytes already (a chunked payload's, checked when it was
    put together); never a digest a message merely claims.
    """
    raw_signature, raw_signer = headers.get(SIGNATURE_HEADER), headers.get(SIGNER_HEADER)
    if raw_signature is None:
        return f"unsigned: no {SIGNATURE_HEADER} header"
    signer = _text(raw_signer)
    if signer is None:
        return f"malformed signature: no {SIGNER_HEADER} header, or not text"
    if signer != claims.signer:
        return f"wrong signer: signed by {signer[:80]!r}, but the {claims.kind} is from {claims.signer[:80]!r}"
    text = _text(raw_signature)
    try:
        signature = base64.b64decode(text or "", validate=True)
    except (binascii.Error, ValueError):
        signature = b""
    if len(signature) != _SIGNATURE_BYTES:
        return f"malformed signature: {SIGNATURE_HEADER} is not {_SIGNATURE_BYTES} bytes in base64"
    key = key_for(signer)
    if key is None:
        return f"unknown signer: no public key for {signer[:80]!r}"
    try:
        key.verify(signature, statement(claims, body, digest))
    except InvalidSignature:
        what = (f"{claims.kind} of run {claims.run_id or '(none)'}"
                + (f", task {claims.task_id}" if claims.task_id else "")
                + (f", version {claims.version}" if claims.version is not None else ""))
        return (f"bad signature: it does not verify with {signer[:80]!r}'s key for this {what} "
                "(altered, signed with another key, or signed for another run, task or version)")
    return None


# ---------------------------------------------------------------------------------------- keys
def check_key_id(key_id: str) -> str:
    """``key_id`` if it can name a key file (and a worker); ConfigError otherwise."""
    if not KEY_ID.fullmatch(key_id) or key_id.endswith((PRIVATE_SUFFIX, PUBLIC_SUFFIX)):
        raise ConfigError(f"key id {key_id!r} must be 1-128 letters, digits, '.', '_', '-' or '@', "
                          f"not start with '.' nor end with {PRIVATE_SUFFIX} or {PUBLIC_SUFFIX}")
    return key_id


def write_key_pair(directory: str | Path, key_id: str) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair as ``DIR/<id>.key`` (PKCS#8 PEM, mode 0600) and
    ``DIR/<id>.pub`` (SubjectPublicKeyInfo PEM); refuse to overwrite either."""
    check_key_id(key_id)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out / f"{key_id}{PRIVATE_SUFFIX}", out / f"{key_id}{PUBLIC_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} exists; remove it first to make a new key (a key is never overwritten)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private_pem)
        os.chmod(private_path, 0o600)  # whatever the umask
        public_path.write_bytes(public_pem)
    except OSError as exc:
        raise ConfigError(f"cannot write a key pair to {out}: {exc.strerror or exc}") from None
    return private_path, public_path


def _read(path: str | Path, what: str) -> bytes:
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {p} does not exist (make one with `fedmq keys generate`)") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {p} is a directory, not a key file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {p}: {exc.strerror or exc}") from None


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in a PEM file; ConfigError (one line) if it is not one.

    A file others may read is used, with a warning.
    """
    data = _read(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"signing key {path} is encrypted; fedmq reads unencrypted PEM keys") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"signing key {path} is not a PEM private key "
                          "(write one with `fedmq keys generate`)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path} is a {type(key).__name__.lstrip('_')}, not an Ed25519 key")
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("signing key %s may be read by other users (mode %o); chmod 600 it", path, stat.S_IMODE(mode))
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """The Ed25519 public key in a PEM file; ConfigError (one line) if it is not one."""
    data = _read(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"public key {path} is not a PEM public key "
                          "(`fedmq keys generate` writes <id>.pub)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"public key {path} is a {type(key).__name__.lstrip('_')}, not an Ed25519 key")
    return key


class PublicKeys:
    """Worker id -> public key, from a directory of ``<id>.pub`` files.

    Every key is loaded (and checked) at once; a worker id met later that has no key yet is
    looked up in the directory again, so a worker whose key was added while the aggregator runs
    is accepted (at most one look per id; a key removed from the directory stays trusted until
    restart).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ConfigError(f"worker keys directory {self.directory} does not exist or is not a directory")
        self._keys: dict[str, Ed25519PublicKey] = {}
        for path in sorted(self.directory.glob(f"*{PUBLIC_SUFFIX}")):
            self._keys[path.name[: -len(PUBLIC_SUFFIX)]] = load_public_key(path)
        if not self._keys:
            raise ConfigError(f"worker keys directory {self.directory} holds no <worker id>{PUBLIC_SUFFIX} "
                              "public key (write them with `fedmq keys generate`)")
        self._looked: set[str] = set()

    @property
    def ids(self) -> list[str]:
        return sorted(self._keys)

    def __call__(self, key_id: str) -> Ed25519PublicKey | None:
        """The public key of ``key_id``, or None."""
        key = self._keys.get(key_id)
        if key is not None or key_id in self._looked or not KEY_ID.fullmatch(key_id):
            return key
        if len(self._looked) < 10_000:
            self._looked.add(key_id)
        path = self.directory / f"{key_id}{PUBLIC_SUFFIX}"
        if not path.is_file():
            return None
        try:
            key = load_public_key(path)
        except ConfigError as exc:
            log.warning("%s", exc)
            return None
        self._keys[key_id] = key
        return key
