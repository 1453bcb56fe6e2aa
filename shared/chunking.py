"""Chunked payloads: split a body into broker-sized chunks and put it together again (pure).

Since RabbitMQ 4.0 a message may hold at most 16 MiB (``max_message_size``; 128 MiB on 3.x), far
less than a model of 25M float32 parameters. A payload longer than the chunk size therefore
travels as ``count`` messages. Each carries, besides the headers the sender gave the payload
(copied onto every chunk, so a receiver hands the application exactly the headers that were sent,
e.g. a signature over the whole body):

=========================  ===================================================================
:data:`ID_HEADER`          the payload's id (the sender's message id for it), str
:data:`INDEX_HEADER`       this chunk's index, 0 .. count-1
:data:`COUNT_HEADER`       how many chunks the payload has (>= 2)
:data:`TOTAL_HEADER`       the payload's length in bytes
:data:`SIZE_HEADER`        the length of every chunk but the last (chunk i starts at i * size)
:data:`DIGEST_HEADER`      SHA-256 of the whole payload, hex (a payload whose sender signs it)
:data:`CRC_HEADER`         or instead: CRC-32 of the whole payload, 8 hex digits (any other)
=========================  ===================================================================

Each chunk carries exactly one of the two digests. A signed payload's signature covers its
SHA-256 (:mod:`fedmq.shared.signing`), so its sender computes that once for both. For any
other payload the digest only has to catch corruption and chunks put together from different
payloads, not forgery (whoever can publish could equally send a consistent forged SHA-256), and
CRC-32 does that at a third of SHA-256's CPU (7 against 2 GB/s on the benchmark machine; at 10M
parameters SHA-256 was a fifth of the aggregator's and a third of a worker's CPU per round).

A payload that fits in one chunk is sent as one message, unchanged (no chunk headers).

:func:`split` makes the chunks as :class:`memoryview` slices of the body (no copy).
:class:`Reassembler` puts chunks back together, each payload into ONE buffer allocated once
at its full length when its first chunk arrives (``allocate``: RAM by default, a file-backed
map for a caller that spills to disk), checks the digest when the last chunk is in, and
decides, with the time passed in (no clock here):

* a chunk whose headers are malformed, contradict the payload's first chunk (another count,
  total, size or digest under the same id: a foreign chunk), or whose length is not the one its
  index implies (oversized or short): :class:`Refused`, the chunk alone, with the reason;
* a payload over ``max_payload_bytes``: refused at its first chunk, nothing allocated;
* a chunk whose index arrived already (a redelivery, a publish sent twice): kept as a token to
  settle with its payload, its bytes ignored (:class:`Stored`);
* a chunk of a payload completed recently: :class:`Duplicate` (settle it with that payload);
* the last chunk: :class:`Complete` with the body, the headers and every chunk's token, or
  :class:`Refused` for the whole payload if the digest does not match (corrupt);
* a payload that received no chunk for ``timeout_s``, or that is pushed out by a newer one
  beyond ``max_open``: :class:`Incomplete` from :meth:`Reassembler.expire` / :meth:`offer`,
  with every token, never applied.

Tokens are whatever the caller needs to settle a chunk later (a delivery, an ack handle).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

ID_HEADER = "x-fedmq-chunk-of"
INDEX_HEADER = "x-fedmq-chunk-index"
COUNT_HEADER = "x-fedmq-chunk-count"
TOTAL_HEADER = "x-fedmq-chunk-total"
SIZE_HEADER = "x-fedmq-chunk-size"
DIGEST_HEADER = "x-fedmq-chunk-sha256"
CRC_HEADER = "x-fedmq-chunk-crc32"
#: the digest headers, and the algorithm each names (a chunk carries exactly one)
DIGESTS = {DIGEST_HEADER: "sha256", CRC_HEADER: "crc32"}
_HEADER_OF = {algorithm: header for header, algorithm in DIGESTS.items()}
_REQUIRED = frozenset({ID_HEADER, INDEX_HEADER, COUNT_HEADER, TOTAL_HEADER, SIZE_HEADER})
CHUNK_HEADERS = _REQUIRED | frozenset(DIGESTS)

MiB = 1024 * 1024
#: the default chunk size: half of RabbitMQ 4's 16 MiB max_message_size (see BENCHMARKS.md)
DEFAULT_CHUNK_BYTES = 8 * MiB
#: the smallest chunk size accepted (smaller ones only multiply messages)
MIN_CHUNK_BYTES = 64 * 1024
#: room left in a message for its properties and headers beside a chunk
HEADROOM_BYTES = 64 * 1024
#: how many completed payload ids a reassembler remembers (to recognise their late chunks)
REMEMBER_DONE = 1024
#: how much of the ledger's end a resumed aggregator reads for settled payloads (1024 entries of
#: ~300 bytes: as many as :data:`REMEMBER_DONE`, more than any prefetch window leaves unacked)
LEDGER_TAIL_BYTES = 512 * 1024

_HEX_DIGITS = {"sha256": 64, "crc32": 8}
_HEX = {name: re.compile(f"[0-9a-f]{{{n}}}") for name, n in _HEX_DIGITS.items()}

T = TypeVar("T")


class ChunkError(ValueError):
    """A chunk whose headers cannot be those of a chunk (the reason is the message)."""


class Crc32:
    """A running CRC-32 (zlib's) with hashlib's ``update`` / ``digest`` / ``hexdigest``."""

    def __init__(self) -> None:
        self._value = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._value = zlib.crc32(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(4, "big")

    def hexdigest(self) -> str:
        return f"{self._value:08x}"


def new_hasher(algorithm: str) -> Any:
    """A running digest of ``algorithm`` (``sha256`` or ``crc32``)."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "crc32":
        return Crc32()
    raise ValueError(f"unknown payload digest {algorithm!r}")


def _payload_digest(views: Iterable[memoryview], sha256: bytes | None) -> tuple[str, str]:
    """(hex digest, algorithm) that the chunks of the concatenation of ``views`` carry: the
    ``sha256`` a signing sender computed, else the payload's CRC-32 (see the module docstring)."""
    if sha256 is not None:
        return sha256.hex(), "sha256"
    crc = Crc32()
    for v in views:
        crc.update(v)
    return crc.hexdigest(), "crc32"


@dataclass(frozen=True)
class ChunkMeta:
    """What a chunk's headers say about it and its payload."""

    payload_id: str
    index: int
    count: int
    total: int
    size: int
    digest: str  # hex, of ``algorithm``
    algorithm: str = "crc32"  # or "sha256" (a signed payload)

    @property
    def offset(self) -> int:
        return self.index * self.size

    @property
    def length(self) -> int:
        """The length chunk ``index`` must have."""
        return min(self.size, self.total - self.offset)

    def same_payload(self, other: ChunkMeta) -> str | None:
        """Why ``other`` (same id) cannot be a chunk of this payload, or None."""
        for name in ("count", "total", "size", "algorithm", "digest"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"its {name} is {theirs}, the payload's first chunk said {mine}"
        return None

    def headers(self) -> dict[str, Any]:
        return {ID_HEADER: self.payload_id, INDEX_HEADER: self.index, COUNT_HEADER: self.count,
                TOTAL_HEADER: self.total, SIZE_HEADER: self.size, _HEADER_OF[self.algorithm]: self.digest}


def is_chunk(headers: Mapping[str, Any] | None) -> bool:
    """Whether a message with these headers claims to be a chunk."""
    return bool(headers) and any(k in CHUNK_HEADERS for k in headers)  # type: ignore[union-attr]


def payload_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """The headers the sender gave the payload: a chunk's headers without the chunk headers."""
    return {k: v for k, v in (headers or {}).items() if k not in CHUNK_HEADERS}


def _int(headers: Mapping[str, Any], key: str) -> int:
    value = headers.get(key)
    if not isinstance(value, int) or isinstance(value, bool):  # AMQP long ints decode to an int subclass
        raise ChunkError(f"chunk header {key} must be an integer, got {type(value).__name__}")
    return int(value)


def parse(headers: Mapping[str, Any]) -> ChunkMeta:
    """The chunk metadata in ``headers``; raises :class:`ChunkError` naming what is wrong."""
    given = [h for h in DIGESTS if h in headers]
    missing = sorted(_REQUIRED - set(headers)) + ([] if given else [f"{DIGEST_HEADER} or {CRC_HEADER}"])
    if missing:
        raise ChunkError(f"a chunk without the header(s) {', '.join(missing)}")
    if len(given) > 1:
        raise ChunkError(f"a chunk with two digests ({', '.join(given)}): it must carry one")
    algorithm = DIGESTS[given[0]]
    pid, sha = headers[ID_HEADER], headers[given[0]]
    if isinstance(pid, bytes):
        pid = pid.decode("utf-8", "replace")
    if isinstance(sha, bytes):
        sha = sha.decode("ascii", "replace")
    if not isinstance(pid, str) or not pid or len(pid) > 200:
        raise ChunkError("chunk header x-fedmq-chunk-of must be a payload id of 1 to 200 characters")
    if not isinstance(sha, str) or not _HEX[algorithm].fullmatch(sha):
        raise ChunkError(f"chunk header {given[0]} must be {_HEX_DIGITS[algorithm]} hex digits")
    index, count, total, size = (_int(headers, k) for k in (INDEX_HEADER, COUNT_HEADER, TOTAL_HEADER, SIZE_HEADER))
    if count < 2:
        raise ChunkError(f"a chunked payload has at least 2 chunks, this one says {count}")
    if not 0 <= index < count:
        raise ChunkError(f"chunk index {index} is not in 0..{count - 1}")
    if size < 1 or total < 1:
        raise ChunkError(f"chunk size {size} and payload length {total} must be positive")
    if -(-total // size) != count:
        raise ChunkError(f"a payload of {total} bytes in chunks of {size} has {-(-total // size)} chunks, "
                         f"not {count}")
    return ChunkMeta(pid, index, count, total, size, sha, algorithm)


@dataclass(frozen=True)
class Chunk:
    """One message of a payload: a view into the body, and the headers to send it with."""

    data: memoryview
    headers: dict[str, Any]
    index: int
    count: int


def split(body: bytes | bytearray | memoryview, chunk_bytes: int, payload_id: str,
          headers: Mapping[str, Any] | None = None, *, sha256: bytes | None = None) -> list[Chunk]:
    """The messages that carry ``body``: one, unchanged, if it fits in ``chunk_bytes``; else
    views of ``chunk_bytes`` each (the last shorter), each with ``headers`` and the chunk headers.
    ``sha256``: the body's SHA-256, given by a caller that signs it (the chunks then carry it;
    without it, the body's CRC-32)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    view = memoryview(body).cast("B") if not isinstance(body, memoryview) or body.format != "B" else body
    base = dict(headers or {})
    clash = sorted(CHUNK_HEADERS & set(base))
    if clash:
        raise ValueError(f"a payload's own headers may not use the chunk headers ({', '.join(clash)})")
    total = len(view)
    if total <= chunk_bytes:
        return [Chunk(view, base, 0, 1)]
    count = -(-total // chunk_bytes)
    hexdigest, algorithm = _payload_digest([view], sha256)
    out = []
    for i in range(count):
        meta = ChunkMeta(payload_id, i, count, total, chunk_bytes, hexdigest, algorithm)
        out.append(Chunk(view[meta.offset: meta.offset + meta.length], {**base, **meta.headers()}, i, count))
    return out


def split_pieces(pieces: Sequence[bytes | bytearray | memoryview], chunk_bytes: int, payload_id: str,
                 headers: Mapping[str, Any] | None = None, *,
                 sha256: bytes | None = None) -> tuple[int, Iterator[Chunk]]:
    """:func:`split` of the concatenation of ``pieces``, without ever making it: (how many chunks,
    the chunks one by one). A chunk inside one piece is a view of it; one across pieces is the one
    copy made. Small payloads (one chunk) are joined. ``sha256``: the concatenation's SHA-256,
    given by a caller that signs the payload (the signature covers the same digest): the chunks
    then carry it; without it they carry the payload's CRC-32 (see the module docstring)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    views = [p if isinstance(p, memoryview) and p.format == "B" and p.ndim == 1 else memoryview(p).cast("B")
             for p in pieces]
    total = sum(len(v) for v in views)
    if total <= chunk_bytes:
        return 1, iter(split(b"".join(views), chunk_bytes, payload_id, headers))
    base = dict(headers or {})
    clash = sorted(CHUNK_HEADERS & set(base))
    if clash:
        raise ValueError(f"a payload's own headers may not use the chunk headers ({', '.join(clash)})")
    hexdigest, algorithm = _payload_digest(views, sha256)
    count = -(-total // chunk_bytes)
    first = ChunkMeta(payload_id, 0, count, total, chunk_bytes, hexdigest, algorithm)

    def chunks() -> Iterator[Chunk]:
        piece, at = 0, 0  # the piece the next byte comes from, and where in it
        for i in range(count):
            meta = dataclasses.replace(first, index=i)
            want, parts = meta.length, []
            while want:
                v = views[piece]
                take = min(want, len(v) - at)
                parts.append(v[at: at + take])
                want -= take
                at += take
                if at == len(v):
                    piece, at = piece + 1, 0
            data = parts[0] if len(parts) == 1 else memoryview(b"".join(parts))
            yield Chunk(data, {**base, **meta.headers()}, i, count)

    return count, chunks()


# ------------------------------------------------------------------------------ reassembly
@dataclass(frozen=True)
class Stored(Generic[T]):
    """The chunk is kept (or was a repeat of one kept); its token is settled with its payload."""

    payload_id: str


@dataclass(frozen=True)
class Complete(Generic[T]):
    """Every chunk arrived and the digest matches: the payload as if it had been one message."""

    payload_id: str
    body: memoryview
    headers: dict[str, Any]
    tokens: list[T]
    redelivered: bool
    # the body's SHA-256, computed here from its bytes, if its chunks carried one (a signed
    # payload: the signature covers the same); b"" if they carried a CRC-32
    sha256: bytes = b""


@dataclass(frozen=True)
class Refused(Generic[T]):
    """A chunk (``whole`` False) or a whole payload (``whole`` True) that cannot be used, and why."""

    payload_id: str | None
    reason: str
    tokens: list[T]
    headers: dict[str, Any]
    whole: bool = False


@dataclass(frozen=True)
class Incomplete(Generic[T]):
    """A payload whose chunks stopped arriving (or was pushed out): never applied."""

    payload_id: str
    reason: str
    tokens: list[T]
    headers: dict[str, Any]
    received: int
    count: int


@dataclass(frozen=True)
class Duplicate(Generic[T]):
    """A chunk of a payload completed (or settled) before: settle it with that payload."""

    payload_id: str
    token: T


Outcome = Stored[T] | Complete[T] | Refused[T] | Incomplete[T] | Duplicate[T]
Allocate = Callable[[int], Any]


def allocate_in_memory(size: int) -> bytearray:
    return bytearray(size)


@dataclass
class _Assembly(Generic[T]):
    meta: ChunkMeta
    buffer: Any
    view: memoryview
    have: bytearray
    received: int
    last_s: float
    tokens: list[T] = field(default_factory=list)
    headers: dict[str, Any] = field(default_factory=dict)
    redelivered: bool = False
    hasher: Any = None  # the running digest of the payload's algorithm
    hashed: int = 0  # chunks 0 .. hashed-1 are in the digest (hashed in order, as they arrive)


class Reassembler(Generic[T]):
    """Chunks in, whole payloads out. See the module docstring for every outcome.

    ``max_payload_bytes`` bounds what one payload may allocate; ``timeout_s`` is how long a
    payload may go without a new chunk; ``max_open`` how many payloads may be partial at once
    (the oldest is given up, :class:`Incomplete`, when another starts beyond it).
    """

    def __init__(self, *, max_payload_bytes: int, timeout_s: float, max_open: int = 1024,
                 allocate: Allocate = allocate_in_memory,
                 release: Callable[[memoryview], None] | None = None) -> None:
        self.max_payload_bytes = max_payload_bytes
        self.timeout_s = timeout_s
        self.max_open = max_open
        self.allocate = allocate
        # called with each stretch of a payload's buffer once it is written and in the digest:
        # a file-backed buffer (``allocate``) lets those pages leave the process's memory
        self.release = release
        self._open: OrderedDict[str, _Assembly[T]] = OrderedDict()
        self._done: OrderedDict[str, None] = OrderedDict()

    @property
    def open_payloads(self) -> int:
        return len(self._open)

    def open_bytes(self) -> int:
        """Bytes allocated for payloads still partial."""
        return sum(a.meta.total for a in self._open.values())

    def progress(self, payload_id: str) -> tuple[int, int] | None:
        """(chunks received, count) of a partial payload, or None."""
        a = self._open.get(payload_id)
        return None if a is None else (a.received, a.meta.count)

    def seen(self, payload_id: str) -> bool:
        """Whether any chunk of ``payload_id`` is held, or it completed recently."""
        return payload_id in self._open or payload_id in self._done

    def offer(self, headers: Mapping[str, Any], data: bytes | bytearray | memoryview, token: T, now: float, *,
              redelivered: bool = False) -> list[Outcome[T]]:
        """Take one chunk; returns what it caused (a payload pushed out, then this chunk's outcome)."""
        try:
            meta = parse(headers)
        except ChunkError as exc:
            pid = headers.get(ID_HEADER)
            return [Refused(pid if isinstance(pid, str) else None, str(exc), [token], payload_headers(headers))]
        where = f"chunk {meta.index} of payload {meta.payload_id}"
        if meta.payload_id in self._done:
            self._done.move_to_end(meta.payload_id)
            return [Duplicate(meta.payload_id, token)]
        if len(data) != meta.length:
            what = "oversized" if len(data) > meta.length else "short"
            return [Refused(meta.payload_id, f"{where} is {what}: {len(data)} bytes, its index implies "
                                             f"{meta.length}", [token], payload_headers(headers))]
        out: list[Outcome[T]] = []
        a = self._open.get(meta.payload_id)
        if a is None:
            if meta.total > self.max_payload_bytes:
                return [Refused(meta.payload_id, f"payload {meta.payload_id} of {meta.total} bytes is over the "
                                                 f"limit of {self.max_payload_bytes} bytes", [token],
                                payload_headers(headers))]
            while len(self._open) >= self.max_open:
                out.append(self._give_up(next(iter(self._open)), f"more than {self.max_open} payloads were partial"))
            buffer = self.allocate(meta.total)
            view = memoryview(buffer).cast("B") if not isinstance(buffer, bytearray) else memoryview(buffer)
            a = _Assembly(meta, buffer, view, bytearray(meta.count), 0, now, hasher=new_hasher(meta.algorithm))
            self._open[meta.payload_id] = a
        else:
            problem = a.meta.same_payload(meta)
            if problem is not None:
                return [Refused(meta.payload_id, f"{where} is foreign: {problem}", [token], payload_headers(headers))]
        a.tokens.append(token)
        a.last_s = now
        a.redelivered = a.redelivered or redelivered
        if meta.index == 0 or not a.headers:  # chunk 0's headers win; before it, the first chunk's
            a.headers = payload_headers(headers)
        if a.have[meta.index]:
            out.append(Stored(meta.payload_id))
            return out
        a.view[meta.offset: meta.offset + meta.length] = data
        a.have[meta.index] = 1
        a.received += 1
        self._hash_in_order(a)
        if a.received < meta.count:
            out.append(Stored(meta.payload_id))
            return out
        del self._open[meta.payload_id]
        self._remember(meta.payload_id)
        raw = a.hasher.digest()
        got = raw.hex()
        if got != meta.digest:
            name = "SHA-256" if meta.algorithm == "sha256" else "CRC-32"
            out.append(Refused(meta.payload_id, f"payload {meta.payload_id} is corrupt: its {name} is {got}, "
                                                f"its chunks say {meta.digest}", a.tokens, a.headers, whole=True))
            return out
        out.append(Complete(meta.payload_id, a.view, a.headers, a.tokens, a.redelivered,
                            raw if meta.algorithm == "sha256" else b""))
        return out

    def _hash_in_order(self, a: _Assembly[T]) -> None:
        """Fold the chunks that now follow the hashed prefix into the digest (in index order:
        chunks usually come in order, so each is hashed once, as it arrives), then release them."""
        size = a.meta.size
        while a.hashed < a.meta.count and a.have[a.hashed]:
            piece = a.view[a.hashed * size: min(a.meta.total, (a.hashed + 1) * size)]
            a.hasher.update(piece)
            if self.release is not None:
                self.release(piece)
            a.hashed += 1

    def expire(self, now: float) -> list[Incomplete[T]]:
        """Give up every payload that received no chunk for ``timeout_s``."""
        late = [pid for pid, a in self._open.items() if now - a.last_s >= self.timeout_s]
        return [self._give_up(pid, f"no chunk arrived for {self.timeout_s:g} s") for pid in late]

    def give_up_all(self, reason: str) -> list[Incomplete[T]]:
        """Give up every partial payload (e.g. the run ended)."""
        return [self._give_up(pid, reason) for pid in list(self._open)]

    def next_deadline(self) -> float | None:
        """When the next partial payload times out, or None."""
        return min((a.last_s + self.timeout_s for a in self._open.values()), default=None)

    def _give_up(self, payload_id: str, reason: str) -> Incomplete[T]:
        a = self._open.pop(payload_id)
        self._remember(payload_id)
        return Incomplete(payload_id, f"{a.received} of {a.meta.count} chunks arrived; {reason}", a.tokens,
                          a.headers, a.received, a.meta.count)

    def remember(self, payload_ids: Iterable[str]) -> None:
        """Payloads settled before this reassembler existed (a resumed aggregator: the message ids
        its ledger holds): their chunks, delivered again, are :class:`Duplicate`, not a new payload
        that never completes."""
        for payload_id in payload_ids:
            self._remember(payload_id)

    def _remember(self, payload_id: str) -> None:
        self._done[payload_id] = None
        while len(self._done) > REMEMBER_DONE:
            self._done.popitem(last=False)


def check_chunk_bytes(chunk_bytes: int, max_message_bytes: int, option: str = "--chunk-bytes") -> str | None:
    """Why ``chunk_bytes`` cannot work under a broker limit of ``max_message_bytes``, or None."""
    if chunk_bytes < MIN_CHUNK_BYTES:
        return f"{option} {chunk_bytes} is below the minimum of {MIN_CHUNK_BYTES} bytes"
    if chunk_bytes + HEADROOM_BYTES > max_message_bytes:
        return (f"{option} {chunk_bytes} ({chunk_bytes / MiB:.1f} MiB) plus {HEADROOM_BYTES // 1024} KiB for "
                f"headers is over the broker's maximum message size (max_message_size) of {max_message_bytes} bytes "
                f"({max_message_bytes / MiB:.1f} MiB); set {option} to at most "
                f"{max_message_bytes - HEADROOM_BYTES}")
    return None


def chunk_count(total: int, chunk_bytes: int) -> int:
    """How many messages a payload of ``total`` bytes takes."""
    return 1 if total <= chunk_bytes else -(-total // chunk_bytes)


__all__: Sequence[str] = (
    "CHUNK_HEADERS", "COUNT_HEADER", "CRC_HEADER", "DEFAULT_CHUNK_BYTES", "DIGESTS", "DIGEST_HEADER", "ID_HEADER",
    "INDEX_HEADER", "SIZE_HEADER", "TOTAL_HEADER", "Chunk", "ChunkError", "ChunkMeta", "Complete", "Crc32",
    "Duplicate", "Incomplete", "Outcome", "Reassembler", "Refused", "Stored", "check_chunk_bytes", "chunk_count",
    "is_chunk", "new_hasher", "parse", "payload_headers", "split", "split_pieces",
)
