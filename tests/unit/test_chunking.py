"""The pure chunking module: split without copies, reassemble into one buffer, and every bad
chunk (missing, duplicated, reordered, foreign, oversized, corrupt, malformed) rejected or
recorded with a reason. Includes a seeded fuzz over random chunk streams."""

from __future__ import annotations

import dataclasses
import random

import pytest

from fedmq.shared import chunking as ch


def body(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def feed(r: ch.Reassembler, chunks: list[ch.Chunk], now: float = 0.0) -> list:
    out = []
    for c in chunks:
        out += r.offer(c.headers, c.data, token=c.index, now=now)
    return out


def test_small_payload_is_one_message_unchanged() -> None:
    b = body(100)
    chunks = ch.split(b, 100, "p", {"x-sig": "s"})
    assert len(chunks) == 1
    assert bytes(chunks[0].data) == b and chunks[0].headers == {"x-sig": "s"}
    assert not ch.is_chunk(chunks[0].headers)


def test_split_makes_views_not_copies_and_carries_the_payload_headers() -> None:
    b = bytearray(body(1000))
    chunks = ch.split(b, 300, "p1", {"x-sig": "abc"})
    assert [len(c.data) for c in chunks] == [300, 300, 300, 100]
    b[0] = (b[0] + 1) % 256  # a view sees the change: nothing was copied
    assert chunks[0].data[0] == b[0]
    for c in chunks:
        assert c.headers["x-sig"] == "abc" and c.headers[ch.ID_HEADER] == "p1"
        assert ch.payload_headers(c.headers) == {"x-sig": "abc"}


def test_reordered_and_duplicated_chunks_reassemble_with_every_token() -> None:
    b = body(10_000, 1)
    chunks = ch.split(b, 1024, "p", {"x-h": 1})
    order = list(reversed(chunks)) + [chunks[3], chunks[0]]
    r: ch.Reassembler[int] = ch.Reassembler(max_payload_bytes=1 << 20, timeout_s=10)
    out = []
    for c in order[:-2]:
        out += r.offer(c.headers, c.data, token=c.index, now=0)
    done = [o for o in out if isinstance(o, ch.Complete)]
    assert len(done) == 1 and bytes(done[0].body) == b and done[0].headers == {"x-h": 1}
    assert sorted(done[0].tokens) == list(range(len(chunks)))
    # chunks of a completed payload, arriving again: duplicates to settle with it
    again = feed(r, order[-2:])
    assert all(isinstance(o, ch.Duplicate) and o.payload_id == "p" for o in again)


def test_a_repeated_index_before_completion_is_kept_as_a_token_only() -> None:
    chunks = ch.split(body(3000), 1000, "p")
    r: ch.Reassembler[str] = ch.Reassembler(max_payload_bytes=1 << 20, timeout_s=10)
    r.offer(chunks[0].headers, chunks[0].data, "a", 0)
    bad = bytes(len(chunks[0].data))  # a repeat with other bytes: the first copy wins
    assert isinstance(r.offer(chunks[0].headers, bad, "b", 0)[0], ch.Stored)
    r.offer(chunks[1].headers, chunks[1].data, "c", 0)
    (done,) = r.offer(chunks[2].headers, chunks[2].data, "d", 0)
    assert isinstance(done, ch.Complete) and done.tokens == ["a", "b", "c", "d"]


def test_missing_chunk_times_out_as_incomplete_with_its_tokens() -> None:
    chunks = ch.split(body(5000), 1000, "p", {"x-fedmq-worker": "w1"})
    r: ch.Reassembler[int] = ch.Reassembler(max_payload_bytes=1 << 20, timeout_s=30)
    feed(r, chunks[:3], now=0.0)
    assert r.expire(29.0) == [] and r.next_deadline() == 30.0
    (gone,) = r.expire(30.0)
    assert isinstance(gone, ch.Incomplete) and gone.tokens == [0, 1, 2]
    assert "3 of 5 chunks" in gone.reason and gone.headers == {"x-fedmq-worker": "w1"}
    assert r.open_payloads == 0
    # the rest arriving later: duplicates of a payload already settled
    assert all(isinstance(o, ch.Duplicate) for o in feed(r, chunks[3:], now=31.0))


def test_timeout_counts_from_the_last_chunk() -> None:
    chunks = ch.split(body(3000), 1000, "p")
    r: ch.Reassembler[int] = ch.Reassembler(max_payload_bytes=1 << 20, timeout_s=10)
    feed(r, chunks[:1], now=0.0)
    feed(r, chunks[1:2], now=8.0)
    assert r.expire(12.0) == []
    assert len(r.expire(18.0)) == 1


def test_corrupt_payload_is_refused_whole() -> None:
    chunks = ch.split(body(3000), 1000, "p")
    flipped = bytearray(chunks[1].data)
    flipped[5] ^= 1
    r: ch.Reassembler[int] = ch.Reassembler(max_payload_bytes=1 << 20, timeout_s=10)
    r.offer(chunks[0].headers, chunks[0].data, 0, 0)
    r.offer(chunks[1].headers, flipped, 1, 0)
    (out,) = r.offer(chunks[2].headers, chunks[2].data, 2, 0)
    assert isinstance(out, ch.Refused) and out.whole and "corrupt" in out.reason and out.tokens == [0, 1, 2]


def test_oversized_and_short_chunks_are_refused_alone() -> None:
    chunks = ch.split(body(3000), 1000, "p")
    r: ch.Reassembler[str] = ch.Reassembler(max_payload_bytes=1 << 20, timeout_s=10)
    (big,) = r.offer(chunks[0].headers, bytes(1001), "big", 0)
    (short,) = r.offer(chunks[2].headers, bytes(10), "short", 0)
    assert isinstance(big, ch.Refused) and "oversized" in big.reason and big.tokens == ["big"]
    assert isinstance(short, ch.Refused) and "short" in short.reason
    assert r.open_payloads == 0  # nothing allocated for them


def test_a_payload_over_the_limit_is_refused_before_allocating() -> None:
    allocated = []
    r: ch.Reassembler[int] = ch.Reassembler(max_payload_bytes=2000, timeout_s=10,
                                            allocate=lambda n: allocated.append(n) or bytearray(n))
    chunks = ch.split(body(3000), 1000, "p")
    (out,) = r.offer(chunks[0].headers, chunks[0].data, 0, 0)
    assert isinstance(out, ch.Refused) and "over the limit" in out.reason and allocated == []


def test_a_foreign_chunk_under_an_existing_id_is_refused() -> None:
    mine = ch.split(body(3000, 1), 1000, "p")
    other = ch.split(body(4000, 2), 1000, "p")  # same id, another payload
    r: ch.Reassembler[str] = ch.Reassembler(max_payload_bytes=1 << 20, timeout_s=10)
    r.offer(mine[0].headers, mine[0].data, "m0", 0)
    (out,) = r.offer(other[1].headers, other[1].data, "o1", 0)
    assert isinstance(out, ch.Refused) and "foreign" in out.reason and out.tokens == ["o1"]
    r.offer(mine[1].headers, mine[1].data, "m1", 0)
    (done,) = r.offer(mine[2].headers, mine[2].data, "m2", 0)
    assert isinstance(done, ch.Complete) and bytes(done.body) == body(3000, 1)


@pytest.mark.parametrize("change, words", [
    ({ch.INDEX_HEADER: 7}, "not in 0..2"),
    ({ch.COUNT_HEADER: 1}, "at least 2"),
    ({ch.COUNT_HEADER: 5}, "has 3 chunks"),
    ({ch.CRC_HEADER: "zz"}, "must be 8 hex digits"),
    ({ch.CRC_HEADER: "0" * 64}, "must be 8 hex digits"),
    ({ch.DIGEST_HEADER: "0" * 64}, "two digests"),
    ({ch.INDEX_HEADER: "1"}, "must be an integer"),
    ({ch.INDEX_HEADER: True}, "must be an integer"),
    ({ch.ID_HEADER: ""}, "payload id"),
    ({ch.SIZE_HEADER: 0}, "positive"),
])
def test_malformed_chunk_headers_are_refused_with_the_reason(change: dict, words: str) -> None:
    c = ch.split(body(3000), 1000, "p")[1]
    r: ch.Reassembler[int] = ch.Reassembler(max_payload_bytes=1 << 20, timeout_s=10)
    (out,) = r.offer({**c.headers, **change}, c.data, 1, 0)
    assert isinstance(out, ch.Refused) and words in out.reason and not out.whole


def test_a_missing_chunk_header_is_named() -> None:
    c = ch.split(body(3000), 1000, "p")[0]
    headers = {k: v for k, v in c.headers.items() if k != ch.TOTAL_HEADER}
    (out,) = ch.Reassembler(max_payload_bytes=1 << 20, timeout_s=10).offer(headers, c.data, 0, 0)
    assert isinstance(out, ch.Refused) and ch.TOTAL_HEADER in out.reason


def test_max_open_pushes_out_the_oldest_partial_payload() -> None:
    r: ch.Reassembler[str] = ch.Reassembler(max_payload_bytes=1 << 20, timeout_s=100, max_open=2)
    for pid in ("a", "b", "c"):
        c = ch.split(body(2000), 1000, pid)[0]
        out = r.offer(c.headers, c.data, pid, 0)
    assert isinstance(out[0], ch.Incomplete) and out[0].payload_id == "a"
    assert r.open_payloads == 2


def test_chunk_bytes_check_names_the_option_and_sizes() -> None:
    assert ch.check_chunk_bytes(8 * ch.MiB, 16 * ch.MiB) is None
    why = ch.check_chunk_bytes(16 * ch.MiB, 16 * ch.MiB)
    assert why is not None and "--chunk-bytes" in why and "16.0 MiB" in why
    assert ch.check_chunk_bytes(10, 16 * ch.MiB) is not None


def test_fuzz_random_chunk_streams_never_raise_and_only_good_payloads_complete() -> None:
    rng = random.Random(1234)
    for trial in range(300):
        payloads = {f"p{i}": body(rng.randint(1, 5000), trial * 10 + i) for i in range(rng.randint(1, 4))}
        size = rng.randint(100, 1500)
        stream: list[tuple[dict, bytes, str]] = []
        for pid, b in payloads.items():
            for c in ch.split(b, size, pid):
                stream.append((c.headers, bytes(c.data), pid))
        mutated = set()
        for _ in range(rng.randint(0, 4)):
            if not stream:
                break
            i = rng.randrange(len(stream))
            h, d, pid = stream[i]
            kind = rng.choice(["drop", "dup", "flip", "grow", "header", "foreign"])
            if kind == "drop":
                stream.pop(i)
            elif kind == "dup":
                stream.insert(rng.randrange(len(stream) + 1), (h, d, pid))
                continue  # harmless
            elif kind == "flip" and d:
                d = bytes([d[0] ^ 0xFF]) + d[1:]
                stream[i] = (h, d, pid)
            elif kind == "grow":
                stream[i] = (h, d + b"x", pid)
            elif kind == "header" and ch.is_chunk(h):
                key = rng.choice(sorted(ch.CHUNK_HEADERS))
                stream[i] = ({**h, key: rng.choice([None, -1, 10**9, "x", b"y"])}, d, pid)
            elif kind == "foreign" and ch.is_chunk(h):
                target = rng.choice(list(payloads))
                stream[i] = ({**h, ch.ID_HEADER: target}, d, pid)
                mutated.add(target)  # the first chunk under an id defines it: the target may not complete
            mutated.add(pid)
        rng.shuffle(stream)
        r: ch.Reassembler[int] = ch.Reassembler(max_payload_bytes=4000, timeout_s=5)
        completed = {}
        for n, (h, d, _pid) in enumerate(stream):
            if not ch.is_chunk(h):
                continue
            for o in r.offer(h, d, n, 0.0):
                if isinstance(o, ch.Complete):
                    completed[o.payload_id] = bytes(o.body)
        for o in r.expire(10.0):
            assert isinstance(o, ch.Incomplete) and o.reason
        for pid, got in completed.items():
            assert got == payloads[pid], (trial, pid)  # whatever arrives, a completed payload is the sent one
        for pid, b in payloads.items():
            if pid not in mutated and len(b) > size and len(b) <= 4000:
                assert pid in completed, (trial, pid)


def test_split_pieces_gives_the_chunks_of_the_joined_body() -> None:
    import numpy as np

    from fedmq.shared import messages

    rng = np.random.default_rng(5)
    update = messages.Update(task_id="t1", worker_id="w1", base_version=3, params={
        "a": rng.standard_normal((300, 70), dtype=np.float32), "b": rng.standard_normal(9, dtype=np.float32)},
        num_samples=10, train_loss=0.5, train_accuracy=0.5, duration_s=1.0, kind="weights", round=None,
        run_id="r")
    pieces = messages.encode_pieces(update)
    whole = messages.encode(update)
    assert b"".join(pieces) == whole
    for size in (1000, 4096, 30_000, len(whole), len(whole) + 1):
        count, chunks = ch.split_pieces(pieces, size, "p", {"x-h": "v"})
        got = list(chunks)
        want = ch.split(whole, size, "p", {"x-h": "v"})
        assert count == len(want) == len(got)
        assert [bytes(c.data) for c in got] == [bytes(c.data) for c in want]
        assert [c.headers for c in got] == [c.headers for c in want]


def test_each_stretch_is_hashed_and_released_once_in_order_whatever_the_arrival_order() -> None:
    """The digest is folded in as chunks arrive (no second read of the whole payload at the end),
    and each stretch is handed to ``release`` once it is in the digest: a spill file's pages then
    leave the process while the rest of the payload is still coming."""
    b = body(10_000, 3)
    chunks = ch.split(b, 1024, "p", {})
    released: list[bytes] = []
    r: ch.Reassembler[int] = ch.Reassembler(max_payload_bytes=1 << 20, timeout_s=10,
                                            release=lambda view: released.append(bytes(view)))
    order = [chunks[2], chunks[0], chunks[0], chunks[1], *chunks[4:], chunks[3]]
    out = feed(r, order[:3])
    assert released == [b[:1024]]  # chunk 2 waits for chunk 1 before it can be hashed
    out += feed(r, order[3:])
    assert released == [b[i:i + 1024] for i in range(0, len(b), 1024)]
    assert [o for o in out if isinstance(o, ch.Complete)][0].body == b


def test_a_corrupt_chunk_still_fails_the_incremental_digest() -> None:
    b = body(5000, 4)
    chunks = ch.split(b, 1000, "p", {})
    bad = bytearray(chunks[2].data)
    bad[7] ^= 1
    chunks[2] = dataclasses.replace(chunks[2], data=memoryview(bytes(bad)))
    r: ch.Reassembler[int] = ch.Reassembler(max_payload_bytes=1 << 20, timeout_s=10)
    refused = [o for o in feed(r, chunks) if isinstance(o, ch.Refused)]
    assert len(refused) == 1 and refused[0].whole and "corrupt" in refused[0].reason


def test_released_spill_pages_leave_the_process_and_keep_their_bytes(tmp_path) -> None:
    import numpy as np

    from fedmq.shared.files import release_pages, spill_allocator

    def rss_file_kb() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))

    size = 64 << 20
    view = memoryview(spill_allocator(tmp_path)(size)).cast("B")
    view[:] = b"\x07" * size
    before = rss_file_kb()
    arr = np.frombuffer(view, dtype=np.float32)[1000:]  # an array that views the buffer, as a decoded update
    release_pages(arr)
    assert rss_file_kb() < before - (size >> 10) // 2  # most of the 64 MiB left this process
    assert bytes(view[:4]) == b"\x07" * 4 and int(np.frombuffer(view, dtype=np.uint8)[-1]) == 7
    release_pages(memoryview(bytearray(10)))  # not a spill buffer: nothing happens
    release_pages(np.zeros(3))


def test_a_put_together_payload_carries_the_digest_it_was_checked_against() -> None:
    import hashlib

    b = body(5000, 5)
    given = hashlib.sha256(b).digest()
    count, pieces = ch.split_pieces([b[:1234], b[1234:]], 1000, "p", sha256=given)
    chunks = list(pieces)
    assert count == 5 and chunks[0].headers[ch.DIGEST_HEADER] == given.hex()
    r: ch.Reassembler[int] = ch.Reassembler(max_payload_bytes=1 << 20, timeout_s=10)
    done = [o for o in feed(r, chunks) if isinstance(o, ch.Complete)]
    assert len(done) == 1 and done[0].sha256 == given and bytes(done[0].body) == b


def test_an_unsigned_payload_carries_a_crc32_and_a_signed_one_its_sha256() -> None:
    """The chunk digest: CRC-32 (a third of SHA-256's CPU) unless the sender signs, whose
    signature covers the SHA-256 it computed anyway; either is checked, and a signed payload's
    SHA-256 comes out with it for the signature's check."""
    import hashlib
    import zlib

    b = body(5000, 6)
    for chunks in (ch.split(b, 1000, "p"), list(ch.split_pieces([b[:1234], b[1234:]], 1000, "p")[1])):
        assert all(ch.DIGEST_HEADER not in c.headers for c in chunks)
        assert {c.headers[ch.CRC_HEADER] for c in chunks} == {f"{zlib.crc32(b):08x}"}
        r: ch.Reassembler[int] = ch.Reassembler(max_payload_bytes=1 << 20, timeout_s=10)
        (done,) = [o for o in feed(r, chunks) if isinstance(o, ch.Complete)]
        assert bytes(done.body) == b and done.sha256 == b""  # no SHA-256 was computed
    signed = list(ch.split_pieces([b], 1000, "s", sha256=hashlib.sha256(b).digest())[1])
    assert all(ch.CRC_HEADER not in c.headers and c.headers[ch.DIGEST_HEADER] == hashlib.sha256(b).hexdigest()
               for c in signed)


@pytest.mark.parametrize("header", ["crc32", "sha256"])
def test_a_chunk_altered_in_flight_fails_either_digest(header: str) -> None:
    import hashlib

    b = body(3000, 7)
    given = hashlib.sha256(b).digest() if header == "sha256" else None
    chunks = list(ch.split_pieces([b], 1000, "p", sha256=given)[1])
    flipped = bytearray(chunks[1].data)
    flipped[10] ^= 0x01
    chunks[1] = ch.Chunk(memoryview(bytes(flipped)), chunks[1].headers, 1, 3)
    r: ch.Reassembler[int] = ch.Reassembler(max_payload_bytes=1 << 20, timeout_s=10)
    (refused,) = [o for o in feed(r, chunks) if isinstance(o, ch.Refused)]
    name = "SHA-256" if header == "sha256" else "CRC-32"
    assert refused.whole and f"corrupt: its {name} is" in refused.reason


def test_a_chunk_without_any_digest_is_refused() -> None:
    c = ch.split(body(3000), 1000, "p")[1]
    headers = {k: v for k, v in c.headers.items() if k != ch.CRC_HEADER}
    r: ch.Reassembler[int] = ch.Reassembler(max_payload_bytes=1 << 20, timeout_s=10)
    (out,) = r.offer(headers, c.data, 1, 0)
    assert isinstance(out, ch.Refused) and f"{ch.DIGEST_HEADER} or {ch.CRC_HEADER}" in out.reason


def test_payloads_go_to_memory_up_to_its_bytes_then_to_spill_files(tmp_path) -> None:
    """A buffer in memory counts until its last view goes; beyond the bytes allowed, buffers
    spill; whichever they are, the reassembler puts the same bytes together."""
    import gc
    import mmap

    import numpy as np

    from fedmq.shared.files import payload_allocator, release_pages

    allocate = payload_allocator(tmp_path, 100_000)
    first, second = allocate(60_000), allocate(60_000)
    assert isinstance(first, np.ndarray) and isinstance(second, mmap.mmap)
    view = memoryview(first).cast("B")
    del first
    assert isinstance(allocate(40_000), np.ndarray)  # 60k + 40k: still within (the 40k is freed at once)
    assert isinstance(allocate(50_000), mmap.mmap)  # the first is alive through its view
    del view
    gc.collect()
    assert isinstance(allocate(100_000), np.ndarray)
    second.close()
    body = bytes(random.Random(5).randbytes(5000))
    for budget in (0, 10_000):
        r: ch.Reassembler[int] = ch.Reassembler(max_payload_bytes=10_000, timeout_s=60,
                                                 allocate=payload_allocator(tmp_path, budget), release=release_pages)
        out = [o for i, c in enumerate(ch.split(body, 1024, "p")) for o in r.offer(c.headers, c.data, i, 0.0)]
        assert isinstance(out[-1], ch.Complete) and bytes(out[-1].body) == body


def test_a_resumed_reassembler_takes_chunks_of_payloads_settled_before_it_as_duplicates() -> None:
    """After a restart acked only some chunks of an applied update, the rest come again: a
    reassembler told the ledger's message ids knows them (never an 'incomplete' update)."""
    chunks = ch.split(body(10_000, 2), 1024, "settled")
    fresh: ch.Reassembler[int] = ch.Reassembler(max_payload_bytes=1 << 20, timeout_s=10)
    assert all(isinstance(o, ch.Stored) for o in feed(fresh, chunks[5:]))  # the old behaviour: a new payload
    resumed: ch.Reassembler[int] = ch.Reassembler(max_payload_bytes=1 << 20, timeout_s=10)
    resumed.remember(["other", "settled"])
    assert all(isinstance(o, ch.Duplicate) and o.payload_id == "settled" for o in feed(resumed, chunks[5:]))
    assert resumed.expire(100.0) == []
