"""pika's AMQP frame I/O without its copies: large bodies go from the socket into one buffer.

pika 1.4 (``pika.connection.Connection``) receives 4 KiB per ``recv``, appends it to a
``bytes`` frame buffer (``_frame_buffer += data``: the whole buffer is copied per read, so a
128 KiB frame costs ~2 MB of copying), slices every frame out of it and re-slices the rest
(two more copies), and its ``ContentFrameAssembler`` joins a body's fragments at the end (one
more). On the way out, ``_send_message`` slices each body frame's payload, joins it and
concatenates header, payload and end octet (three copies). Measured in
``bench/update_path.py`` this held the aggregator at 0.65x raw pika at 1M and 10M
parameters; see BENCHMARKS.md, "Update path: CPU per byte".

:func:`tune` replaces, on one connection object and nothing global, three pieces:

* the connection's ``_on_data_available`` with :class:`FrameReader`: a bytearray buffer
  parsed in place, and the payload of a body frame that belongs to a large body streamed
  straight into that body's buffer as it arrives (no frame is ever accumulated);
* each channel's ``_content_assembler`` with :class:`BodyAssembler` (:func:`tune_channel`):
  a body over :data:`LARGE_BODY_BYTES` is received into one buffer preallocated from the
  content header's ``body_size`` (``np.empty``: no zero-fill pass, and huge pages where
  the kernel gives them; a ``bytearray`` would be zeroed first, ~4x the cost of the copy
  in), and handed to the consumer as a read-only ``memoryview`` of it. Every message gets a
  fresh buffer (none is ever reused or written once handed over), so a body stays valid as
  long as its holder keeps it; smaller bodies stay ``bytes`` as pika makes them;
* on a plain-TCP connection, the transport's ``_consume``: while a large body's frame is
  being received, ``recv_into`` reads the socket straight into that body's buffer (the one
  copy is the kernel's); other bytes are read :data:`RECV_BYTES` at a time (pika: 4 KiB;
  TLS connections keep pika's ``_consume`` with the larger reads);
* the connection's ``_send_message`` with one copy per body frame (header, payload slice
  and end octet joined once; pika makes three copies).

It also lifts pika's client-side cap on ``frame_max`` (:func:`ask_frame_max`; pika refuses
anything over 128 KiB in its setter): the broker's ``frame_max`` (rabbitmq.conf; RabbitMQ's
default is 131072) still decides, as the smaller of the two wins the negotiation.

These are pika internals: :func:`supported` checks the pika version (:data:`PIKA_VERSIONS`,
the range pinned in pyproject.toml) and that every attribute relied on exists; otherwise
nothing is replaced and pika's own code runs (slower, equally correct).
"""

from __future__ import annotations

import functools
import logging
import os
import struct
from typing import Any

import numpy as np
import pika
from pika import exceptions as pex
from pika import frame, spec
from pika.adapters.utils import io_services_utils

log = logging.getLogger("fedmq.broker")

#: pika releases whose internals this module was written against and tested with
PIKA_VERSIONS = ((1, 3), (1, 4))
#: a body larger than this is received into one preallocated buffer
LARGE_BODY_BYTES = 64 * 1024
#: a larger body_size (RabbitMQ's hard cap on a message is 512 MiB) is not trusted with an
#: allocation up front: its fragments are collected as pika does
MAX_PREALLOCATED_BYTES = 1 << 30
#: bytes asked of the socket per ``recv`` (pika: 4 KiB), and at most per readable event
RECV_BYTES = 1024 * 1024
CONSUME_BYTES = 8 * 1024 * 1024
#: what the client asks for; the broker's own frame_max (default 131072) caps it
CLIENT_FRAME_MAX = 4 * 1024 * 1024
#: ``FEDMQ_PIKA_FRAMES=pika`` keeps pika's own frame I/O (an escape hatch, and the A/B switch)
FRAMES_ENV = "FEDMQ_PIKA_FRAMES"

_HEADER = struct.Struct(">BHL")
_HEAD_SIZE = spec.FRAME_HEADER_SIZE
_END = spec.FRAME_END
_END_BYTE = bytes((spec.FRAME_END,))
_STREAMED = b""  # the Body frame a streamed body frame ends with: its payload is in the buffer already


def _version() -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in pika.__version__.split(".")[:2])
    except ValueError:
        return ()


def enabled() -> bool:
    """False where pika's version is not one this module knows, or :data:`FRAMES_ENV` says ``pika``."""
    return _version() in PIKA_VERSIONS and os.environ.get(FRAMES_ENV, "").strip().lower() != "pika"


def supported(conn: Any) -> bool:
    """Whether :func:`tune` may replace pika's frame I/O on ``conn`` (a BlockingConnection)."""
    if not enabled():
        return False
    impl = getattr(conn, "_impl", None)
    transport = getattr(impl, "_transport", None)
    needed = (
        (impl, ("_on_data_available", "_frame_buffer", "_process_frame", "_channels", "bytes_received",
                "_send_message", "_body_max_length", "_output_marshaled_frames")),
        (transport, ("_MAX_RECV_BYTES", "_MAX_CONSUME_BYTES")),
        (pika.channel.Channel, ("_handle_content_frame",)),
    )
    return all(hasattr(obj, name) for obj, names in needed for name in names)


class _WideFrameParameters(pika.URLParameters):
    """``URLParameters`` whose ``frame_max`` may exceed pika's 128 KiB (the broker's still caps
    it: the smaller of the two wins the negotiation, which goes through this setter too)."""

    __slots__ = ()

    @property
    def frame_max(self) -> int:
        return int(self._frame_max)

    @frame_max.setter
    def frame_max(self, value: int) -> None:
        if not isinstance(value, int) or not spec.FRAME_MIN_SIZE <= value <= CLIENT_FRAME_MAX:
            raise ValueError(f"frame_max must be an int from {spec.FRAME_MIN_SIZE} to {CLIENT_FRAME_MAX}, not {value!r}")
        self._frame_max = value  # type: ignore[misc]  # the slot is pika's Parameters'


def ask_frame_max(params: pika.URLParameters, size: int = CLIENT_FRAME_MAX) -> None:
    """Ask the broker for frames of up to ``size`` bytes (pika's own setter stops at 128 KiB)."""
    if enabled() and type(params) is pika.URLParameters and hasattr(params, "_frame_max"):
        params.__class__ = _WideFrameParameters  # the same slots: only the frame_max setter differs
        params.frame_max = min(max(spec.FRAME_MIN_SIZE, int(size)), CLIENT_FRAME_MAX)


def tune(conn: Any) -> bool:
    """Install the copy-free frame I/O on an open BlockingConnection; False if not supported."""
    if not supported(conn):
        if os.environ.get(FRAMES_ENV, "").strip().lower() == "pika":
            log.info("%s=pika: keeping pika's own frame I/O", FRAMES_ENV)
        else:
            log.info("pika %s: keeping pika's own frame I/O (fedmq's is written for %s)", pika.__version__,
                     ", ".join(f"{a}.{b}.x" for a, b in PIKA_VERSIONS))
        return False
    impl = conn._impl
    reader = FrameReader(impl)
    impl._on_data_available = reader.feed
    impl._send_message = Sender(impl).send
    transport = impl._transport
    transport._MAX_RECV_BYTES = max(transport._MAX_RECV_BYTES, RECV_BYTES)
    transport._MAX_CONSUME_BYTES = max(transport._MAX_CONSUME_BYTES, CONSUME_BYTES)
    if type(transport) is io_services_utils._AsyncPlaintextTransport and all(
            hasattr(transport, name) for name in ("_consume", "_sock", "_state", "_STATE_ACTIVE", "RxEndOfFile")):
        transport._consume = functools.partial(_consume, transport, reader)
    return True


def _consume(transport: Any, reader: FrameReader) -> None:
    """pika's ``_AsyncTransportBase._consume`` for a plain socket, reading through ``reader``:
    until the socket has nothing more (``recv`` raises EAGAIN, which pika's caller expects),
    the transport stops, or :data:`CONSUME_BYTES` were read in this readable event."""
    consumed = 0
    while transport._state == transport._STATE_ACTIVE and consumed < transport._MAX_CONSUME_BYTES:
        n = reader.receive(transport._sock)
        if not n:
            raise transport.RxEndOfFile()
        consumed += n


def tune_channel(chan: Any) -> bool:
    """Receive this BlockingChannel's large bodies into preallocated buffers."""
    impl: Any = getattr(chan, "_impl", None)
    if not enabled() or not hasattr(impl, "_content_assembler"):
        return False
    impl._content_assembler = BodyAssembler()
    return True


class BodyAssembler:
    """A channel's content assembler (pika's ``ContentFrameAssembler`` contract: ``process``
    takes the method, header and body frames of one message and returns ``(method, header,
    body)`` once the body is complete), receiving large bodies into one buffer."""

    __slots__ = ("_method", "_header", "_size", "_seen", "_fragments", "_body", "_view")

    def __init__(self) -> None:
        self._method: frame.Method | None = None
        self._header: frame.Header | None = None
        self._size = 0
        self._seen = 0
        self._fragments: list[bytes] = []
        self._body: np.ndarray | None = None
        self._view: memoryview | None = None

    @property
    def streaming(self) -> int:
        """Bytes still expected of the current large body (0: not receiving one)."""
        return self._size - self._seen if self._view is not None else 0

    def write(self, data: memoryview | bytes) -> None:
        """Copy the next piece of the current large body into its buffer."""
        n = len(data)
        if self._view is None or self._seen + n > self._size:
            raise pex.BodyTooLongError(self._seen + n, self._size)
        self._view[self._seen:self._seen + n] = data
        self._seen += n

    def tail(self, limit: int) -> memoryview:
        """Where the next bytes of the current large body go (at most ``limit``), for ``recv_into``."""
        assert self._view is not None
        return self._view[self._seen:self._seen + limit]

    def advance(self, n: int) -> None:
        """``n`` bytes were written at :meth:`tail`."""
        self._seen += n

    def process(self, value: frame.Frame) -> tuple[frame.Method, frame.Header, bytes | memoryview] | None:
        if isinstance(value, frame.Body):
            if self._view is not None:
                self.write(value.fragment)
            else:
                if self._header is None or self._seen + len(value.fragment) > self._size:
                    raise pex.UnexpectedFrameError(value) if self._header is None else pex.BodyTooLongError(
                        self._seen + len(value.fragment), self._size)
                self._fragments.append(value.fragment)
                self._seen += len(value.fragment)
            return self._finish() if self._seen == self._size else None
        if isinstance(value, frame.Method) and spec.has_content(value.method.INDEX):
            self._reset()
            self._method = value
            return None
        if isinstance(value, frame.Header):
            self._header = value
            self._size = value.body_size
            if LARGE_BODY_BYTES < self._size <= MAX_PREALLOCATED_BYTES:
                self._body = np.empty(self._size, np.uint8)  # not zeroed: every byte is written once
                self._view = self._body.data
            return self._finish() if self._size == 0 else None
        raise pex.UnexpectedFrameError(value)

    def _finish(self) -> tuple[frame.Method, frame.Header, bytes | memoryview]:
        body: bytes | memoryview
        if self._view is not None:
            body = self._view.toreadonly()  # the message's own from now on: nothing writes it again
        else:
            body = self._fragments[0] if len(self._fragments) == 1 else b"".join(self._fragments)
        assert self._method is not None and self._header is not None
        out = (self._method, self._header, body)
        self._reset()
        return out

    def _reset(self) -> None:
        self._method = self._header = None
        self._size = self._seen = 0
        self._fragments = []
        self._body = None
        self._view = None


class FrameReader:
    """Parses frames out of what the socket delivers (replaces ``Connection._on_data_available``).

    Bytes that do not belong to a large body wait in one bytearray, parsed in place; a body
    frame whose channel is receiving a large body (:class:`BodyAssembler`) has its payload
    copied into that body's buffer as it arrives, and ends with an empty Body frame handed to
    pika's ``_process_frame`` (so frame counting, channel lookup and delivery stay pika's).
    """

    def __init__(self, impl: Any) -> None:
        self._impl = impl
        self._buf = bytearray(impl._frame_buffer or b"")
        impl._frame_buffer = b""
        self._sink: BodyAssembler | None = None  # the body receiving the current frame's payload
        self._channel = 0
        self._left = 0  # payload bytes of the current streamed frame still to come
        self._end = False  # the streamed frame's end octet is still to come

    def receive(self, sock: Any) -> int:
        """Read once from ``sock`` and process what came; the number of bytes read (0: EOF).

        Inside a large body's frame, ``recv_into`` its buffer; right after such a frame, only
        its end octet and the next frame's header (so that the next payload goes straight
        into the buffer too); otherwise up to :data:`RECV_BYTES`.
        """
        if self._left and not self._buf:
            sink = self._sink
            assert sink is not None
            n = sock.recv_into(sink.tail(min(self._left, RECV_BYTES)))
            if n:
                sink.advance(n)
                self._impl.bytes_received += n
                self._left -= n
                self._end = not self._left
            return int(n)
        data = sock.recv(1 + _HEAD_SIZE if self._end and not self._buf else RECV_BYTES)
        if data:
            self.feed(data)
        return len(data)

    def feed(self, data: bytes) -> None:
        self._impl.bytes_received += len(data)  # what pika's heartbeat checker watches
        if self._buf:
            self._buf += data
            src: bytes | bytearray = self._buf
        else:
            src = data
        pos = self._parse(src)
        if src is self._buf:
            self._buf = self._buf[pos:] if pos else self._buf
        else:
            self._buf = bytearray(data[pos:]) if pos < len(data) else bytearray()

    def _parse(self, src: bytes | bytearray) -> int:
        """Process every complete frame in ``src``; the offset of the first unprocessed byte."""
        n, pos = len(src), 0
        with memoryview(src) as view:
            while pos < n:
                if self._left:
                    take = min(self._left, n - pos)
                    assert self._sink is not None
                    self._sink.write(view[pos:pos + take])
                    pos += take
                    self._left -= take
                    if self._left:
                        break
                    self._end = True
                    continue
                if self._end:
                    if src[pos] != _END:
                        raise pex.InvalidFrameError("Invalid FRAME_END marker")
                    pos += 1
                    self._end, self._sink = False, None
                    self._impl._process_frame(frame.Body(self._channel, _STREAMED))
                    continue
                if n - pos < _HEAD_SIZE:
                    break
                kind, channel, size = _HEADER.unpack_from(src, pos)
                if kind == spec.FRAME_BODY:
                    sink = self._sink_of(channel)
                    if sink is not None:
                        if size > sink.streaming:
                            raise pex.BodyTooLongError(size, sink.streaming)
                        self._sink, self._channel, self._left = sink, channel, size
                        pos += _HEAD_SIZE
                        self._end = size == 0
                        continue
                end = pos + _HEAD_SIZE + size + 1
                if end > n:
                    break
                consumed, value = frame.decode_frame(bytes(view[pos:end]))
                if value is None or consumed != end - pos:
                    raise pex.InvalidFrameError(f"undecodable frame of type {kind}")
                pos = end
                self._impl._process_frame(value)
        return pos

    def _sink_of(self, channel: int) -> BodyAssembler | None:
        chan = self._impl._channels.get(channel)
        asm = getattr(chan, "_content_assembler", None)
        return asm if isinstance(asm, BodyAssembler) and asm.streaming else None


class Sender:
    """``Connection._send_message`` with at most one copy of the body per frame (pika makes three).

    A body that cannot change (``bytes``, or a view of ``bytes``: an encoded model and its
    chunks) is not copied at all: each body frame goes out as its header and a view of its
    payload (the end octet rides with the next frame's header). The transport writes those views
    as they are, so a model being published costs no second model's worth of frames in memory;
    the body is kept alive by the views until the socket took it. Any other body (a worker's
    update pieces, views of arrays it may reuse once confirmed) is copied into its frames.
    """

    def __init__(self, impl: Any) -> None:
        self._impl = impl

    def send(self, channel_number: int, method: Any, content: tuple[spec.BasicProperties, bytes]) -> None:
        impl = self._impl
        props, body = content
        length = len(body)
        frames: list[bytes | memoryview] = [
            frame.Method(channel_number, method).marshal(),
            frame.Header(channel_number, length, props).marshal(),
        ]
        step = impl._body_max_length
        immutable = _immutable(body)
        view = memoryview(body).cast("B") if not isinstance(body, memoryview) or body.format != "B" else body
        end = b""
        for start in range(0, length, step):
            piece = view[start:start + step]
            head = _HEADER.pack(spec.FRAME_BODY, channel_number, len(piece))
            if immutable:
                frames += [end + head, piece]
                end = _END_BYTE
            else:
                frames.append(b"".join((head, piece, _END_BYTE)))  # the one copy of the payload
        if end:
            frames.append(end)
        impl._output_marshaled_frames(frames)


def _immutable(body: object) -> bool:
    """``bytes``, or a view whose buffer is ``bytes``: nothing can change it while it is sent."""
    return isinstance(body, bytes) or (isinstance(body, memoryview) and isinstance(body.obj, bytes))
