"""fedmq.broker.frames without a broker: frame parsing at every split point, large bodies into
their own buffers, socket reads straight into them, and the frames the sender makes."""

from __future__ import annotations

import random
import socket
from typing import Any

import numpy as np
import pytest
from pika import exceptions as pex
from pika import frame, spec

from fedmq.broker import frames

PAYLOAD = 4096 - 8  # a small frame_max keeps the multi-frame cases small


class FakeChannel:
    def __init__(self) -> None:
        self._content_assembler = frames.BodyAssembler()
        self.delivered: list[tuple[int, Any]] = []


class FakeConnection:
    """The parts of ``pika.connection.Connection`` the reader and the sender touch."""

    def __init__(self, channels: int = 1) -> None:
        self._frame_buffer = b""
        self.bytes_received = 0
        self._channels = {n: FakeChannel() for n in range(1, channels + 1)}
        self.heartbeats = 0
        self._body_max_length = PAYLOAD
        self.sent: list[bytes] = []

    def _process_frame(self, value: Any) -> None:  # pika's routing, reduced to what matters here
        if isinstance(value, frame.Heartbeat):
            self.heartbeats += 1
            return
        chan = self._channels[value.channel_number]
        out = chan._content_assembler.process(value)
        if out:
            chan.delivered.append((out[0].method.delivery_tag, out[2]))

    def _output_marshaled_frames(self, marshaled: list[bytes]) -> None:
        self.sent.extend(marshaled)


def message(channel: int, tag: int, body: bytes, payload: int = PAYLOAD) -> bytes:
    """The wire bytes of one delivery as the broker sends it: method, header, body frames."""
    deliver = spec.Basic.Deliver(consumer_tag="c", delivery_tag=tag, exchange="", routing_key="q")
    out = [frame.Method(channel, deliver).marshal(), frame.Header(channel, len(body), spec.BasicProperties()).marshal()]
    out += [frame.Body(channel, body[i:i + payload]).marshal() for i in range(0, len(body), payload)]
    return b"".join(out)


def sizes() -> list[int]:
    large = frames.LARGE_BODY_BYTES
    return [0, 1, PAYLOAD, PAYLOAD + 1, large, large + 1, 17 * PAYLOAD, 17 * PAYLOAD - 1, 17 * PAYLOAD + 1,
            200_000]


def bodies(seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(n) for n in sizes()]


def feed_in_pieces(reader: frames.FrameReader, wire: bytes, rng: random.Random, max_piece: int) -> None:
    pos = 0
    while pos < len(wire):
        n = rng.randint(1, max_piece)
        reader.feed(wire[pos:pos + n])
        pos += n


@pytest.mark.parametrize("max_piece", [1, 7, 8, 4096, 70_000, 10**9])
def test_reader_reassembles_every_body_at_any_split(max_piece: int) -> None:
    conn = FakeConnection()
    reader = frames.FrameReader(conn)
    sent = bodies()
    wire = b"".join(message(1, tag, body) for tag, body in enumerate(sent, 1))
    wire += frame.Heartbeat().marshal()
    rng = random.Random(max_piece)
    if max_piece == 1:  # byte by byte is slow in Python: the first messages are enough
        wire = b"".join(message(1, tag, body) for tag, body in enumerate(sent[:6], 1))
        sent = sent[:6]
    feed_in_pieces(reader, wire, rng, max_piece)
    got = conn._channels[1].delivered
    assert [tag for tag, _ in got] == list(range(1, len(sent) + 1))
    for (_, body), want in zip(got, sent, strict=True):
        assert bytes(body) == want
        if len(want) > frames.LARGE_BODY_BYTES:
            assert isinstance(body, memoryview) and body.readonly
        else:
            assert isinstance(body, bytes)
    assert conn.bytes_received == len(wire)
    assert not reader._buf and not reader._left and not reader._end


def test_frames_of_two_channels_interleave() -> None:
    conn = FakeConnection(channels=2)
    reader = frames.FrameReader(conn)
    a, b = random.Random(1).randbytes(150_000), random.Random(2).randbytes(90_000)
    wa = [frame.Method(1, spec.Basic.Deliver("c", 1, False, "", "q")).marshal(),
          frame.Header(1, len(a), spec.BasicProperties()).marshal()]
    wa += [frame.Body(1, a[i:i + PAYLOAD]).marshal() for i in range(0, len(a), PAYLOAD)]
    wb = [frame.Method(2, spec.Basic.Deliver("c", 7, False, "", "q")).marshal(),
          frame.Header(2, len(b), spec.BasicProperties()).marshal()]
    wb += [frame.Body(2, b[i:i + PAYLOAD]).marshal() for i in range(0, len(b), PAYLOAD)]
    wire = bytearray()
    for i in range(max(len(wa), len(wb))):  # the broker interleaves channels frame by frame
        wire += (wa[i] if i < len(wa) else b"") + (wb[i] if i < len(wb) else b"")
    feed_in_pieces(reader, bytes(wire), random.Random(3), 10_000)
    assert [(t, bytes(x)) for t, x in conn._channels[1].delivered] == [(1, a)]
    assert [(t, bytes(x)) for t, x in conn._channels[2].delivered] == [(7, b)]


def test_each_large_body_owns_its_buffer() -> None:
    """A body handed out is never written again: later messages land in buffers of their own,
    and arrays decoded from an earlier body keep their values."""
    conn = FakeConnection()
    reader = frames.FrameReader(conn)
    first = np.arange(50_000, dtype=np.float32)
    reader.feed(message(1, 1, first.tobytes()))
    body = conn._channels[1].delivered[0][1]
    view = np.frombuffer(body, np.float32)
    for tag in range(2, 6):
        reader.feed(message(1, tag, np.full(50_000, -tag, np.float32).tobytes()))
    later = [b for _, b in conn._channels[1].delivered[1:]]
    assert np.array_equal(view, first)
    assert all(not np.shares_memory(np.frombuffer(b, np.uint8), np.frombuffer(body, np.uint8)) for b in later)
    with pytest.raises(TypeError):
        body[0] = 1  # read-only: no consumer can change what another one sees either


def test_a_corrupt_frame_end_and_an_overlong_body_are_refused() -> None:
    wire = bytearray(message(1, 1, bytes(100_000)))
    wire[len(message(1, 1, b"")) + 7 + PAYLOAD] = 0  # the first body frame's end octet
    with pytest.raises(pex.InvalidFrameError):
        frames.FrameReader(FakeConnection()).feed(bytes(wire))
    liar = frame.Method(1, spec.Basic.Deliver("c", 1, False, "", "q")).marshal()
    liar += frame.Header(1, 70_000, spec.BasicProperties()).marshal()  # says 70,000 bytes, sends 70,001
    liar += frame.Body(1, bytes(70_001)).marshal()
    with pytest.raises(pex.BodyTooLongError):
        frames.FrameReader(FakeConnection()).feed(liar)


def test_receive_reads_large_bodies_straight_from_the_socket() -> None:
    conn = FakeConnection()
    reader = frames.FrameReader(conn)
    sent = bodies(seed=5)
    wire = b"".join(message(1, tag, body) for tag, body in enumerate(sent, 1))
    a, b = socket.socketpair()
    try:
        b.setblocking(False)
        pos, reads, direct = 0, 0, 0
        while len(conn._channels[1].delivered) < len(sent):
            if pos < len(wire):
                pos += a.send(wire[pos:pos + 50_000])
            while True:
                streaming = bool(reader._left and not reader._buf)
                try:
                    n = reader.receive(b)
                except BlockingIOError:
                    break
                assert n > 0
                reads += 1
                direct += streaming
    finally:
        a.close()
        b.close()
    assert [bytes(x) for _, x in conn._channels[1].delivered] == sent
    assert conn.bytes_received == len(wire)
    assert direct > 0  # some reads went straight into a body's buffer


@pytest.mark.parametrize("kind", [bytes, bytearray, "view of bytes"])
def test_sender_frames_decode_to_the_same_message(kind: object) -> None:
    conn = FakeConnection()
    sender = frames.Sender(conn)
    for data in bodies(seed=9):
        conn.sent.clear()
        body = memoryview(data)[:] if kind == "view of bytes" else kind(data)  # type: ignore[operator]
        publish = spec.Basic.Publish(exchange="", routing_key="q")
        sender.send(3, publish, (spec.BasicProperties(message_id="m"), body))
        wire = b"".join(conn.sent)
        pos, pieces = 0, []
        while pos < len(wire):
            used, value = frame.decode_frame(wire[pos:])
            assert value is not None
            pos += used
            pieces.append(value)
        assert isinstance(pieces[0].method, spec.Basic.Publish) and pieces[1].body_size == len(body)
        assert len(pieces) == 2 + -(-len(body) // PAYLOAD)  # method, header, ceil(len / payload) bodies
        assert b"".join(p.fragment for p in pieces[2:]) == data
        assert all(p.channel_number == 3 for p in pieces)


def test_sender_sends_an_immutable_body_as_views_and_copies_any_other() -> None:
    """An encoded model (bytes) costs no second copy in frames; a body that may change after the
    call (a bytearray, a view of an array) is copied, so what was sent is what was given."""
    conn = FakeConnection()
    sender = frames.Sender(conn)
    data = random.Random(3).randbytes(3 * PAYLOAD + 5)
    sender.send(1, spec.Basic.Publish(exchange="", routing_key="q"), (spec.BasicProperties(), data))
    views = [x for x in conn.sent if isinstance(x, memoryview)]
    assert b"".join(views) == data and all(v.obj is data for v in views)
    conn.sent.clear()
    mutable = bytearray(data)
    sender.send(1, spec.Basic.Publish(exchange="", routing_key="q"), (spec.BasicProperties(), mutable))
    mutable[:] = bytes(len(mutable))
    assert not any(isinstance(x, memoryview) for x in conn.sent)
    wire = b"".join(conn.sent)
    assert all(data[i:i + PAYLOAD] in wire for i in range(0, len(data), PAYLOAD))  # the bytes as given


def test_unknown_pika_or_the_escape_hatch_keeps_pikas_frame_io(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(frames.FRAMES_ENV, "pika")
    assert not frames.enabled()
    monkeypatch.delenv(frames.FRAMES_ENV)
    assert frames.enabled()
    monkeypatch.setattr(frames.pika, "__version__", "2.0.0")
    assert not frames.enabled()
    assert not frames.supported(object())


def test_a_body_size_too_large_to_trust_is_collected_as_pika_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """No allocation up front for a header's say-so beyond MAX_PREALLOCATED_BYTES."""
    monkeypatch.setattr(frames, "MAX_PREALLOCATED_BYTES", 100_000)
    conn = FakeConnection()
    reader = frames.FrameReader(conn)
    body = random.Random(4).randbytes(150_000)
    reader.feed(message(1, 1, body))
    [(tag, got)] = conn._channels[1].delivered
    assert tag == 1 and type(got) is bytes and got == body
