"""The wire protocol of the networked backends, and its byte-stream framing.

A link starts with a handshake: the inlet sends ``HELLO`` (magic, version,
delivery, capacity, u64 bound in bytes or 0 for none, u16 size of its
label, u16 size of its key), then its label (UTF-8) and its key, each if it
has one; the outlet answers ``WELCOME`` (magic, version) once it counts the
link, or closes the connection if the key is not its own. Then records, each
starting with a one-byte kind; integers are little-endian:

========  =========  ====================================================
kind      direction  body
========  =========  ====================================================
MESSAGE   out -> in  u64 sequence, u32 frame count *n*, *n* x u64 lengths,
                     then the frames' bytes
END       out -> in  u64 next sequence number (messages put on the link)
CREDIT    in -> out  u32 messages taken in, u64 messages the inlet dropped
ACK       in -> out  u64 messages the inlet dropped (end of stream taken in)
========  =========  ====================================================

On a byte stream (tcp) the frames follow their header directly; on a message
transport (nng) small frames share the header's message and each large frame
is a message of its own after it (see ``transports/_nng.py``).
Anything else -- a wrong magic, an unknown kind, a frame count or length over
the limits, a stream cut inside a record -- is a :class:`ProtocolError`.
"""

from __future__ import annotations

import functools
import os
import socket
import struct
import sys
from collections.abc import Callable

import numpy
import trio

from ._abc import Delivery
from ._schedule import _SchedulePoints

MAGIC = b"\x89TRP"
VERSION = 3

#: Most frames one message may have.
MAX_FRAMES = 4096
#: Largest capacity a link may ask for.
MAX_CAPACITY = 1 << 20
#: Largest label an inlet may give itself, in bytes of UTF-8.
MAX_LABEL = 1024
#: Largest key an outlet may require, in bytes.
MAX_KEY = 64
#: Largest bound in bytes a link may ask for (the handshake's 64 bits).
MAX_LINK_BYTES = (1 << 64) - 1

KIND_MESSAGE = 1
KIND_END = 2
KIND_CREDIT = 3
KIND_ACK = 4

_HELLO = struct.Struct("<4sHBIQHH")
_WELCOME = struct.Struct("<4sH")
_MESSAGE = struct.Struct("<BQI")
_END = struct.Struct("<BQ")
_CREDIT = struct.Struct("<BIQ")
_ACK = struct.Struct("<BQ")
#: The fixed part of each kind of record, after its kind byte.
_BODIES = {
    KIND_MESSAGE: struct.Struct("<QI"),
    KIND_END: struct.Struct("<Q"),
    KIND_CREDIT: struct.Struct("<IQ"),
    KIND_ACK: struct.Struct("<Q"),
}
_MESSAGE_BODY = _BODIES[KIND_MESSAGE]
#: Size of the largest MESSAGE header: kind, fixed part, a length per frame.
_LARGEST_HEADER = _MESSAGE.size + 8 * MAX_FRAMES
_DELIVERY_CODES = {Delivery.RELIABLE: 0, Delivery.LATEST: 1}
_DELIVERIES = {code: delivery for delivery, code in _DELIVERY_CODES.items()}

#: Frames up to this size are joined with their headers into one write, and
#: copied out of the receive buffer; larger ones travel as they are.
SMALL_FRAME = 64 * 1024

HELLO_SIZE = _HELLO.size
WELCOME_SIZE = _WELCOME.size


class ProtocolError(Exception):
    """The peer sent something that is not this protocol."""


# --- handshake -------------------------------------------------------------------


def encode_hello(
    delivery: Delivery,
    capacity: int,
    max_bytes: int | None = None,
    label: str = "",
    key: bytes = b"",
) -> bytes:
    """The fixed part of a HELLO; the label (:func:`encode_label`) and the key,
    if any, follow it."""
    code = _DELIVERY_CODES[delivery]
    label_size = len(encode_label(label))
    return _HELLO.pack(MAGIC, VERSION, code, capacity, max_bytes or 0, label_size, len(key))


def decode_hello(data: bytes | memoryview) -> tuple[Delivery, int, int | None, int, int]:
    """(delivery, capacity, max_bytes, size of the label and of the key that
    follow); raises ProtocolError unless *data* is a valid HELLO."""
    if len(data) != _HELLO.size:
        raise ProtocolError(f"handshake of {len(data)} bytes, expected {_HELLO.size}")
    magic, version, code, capacity, max_bytes, label_size, key_size = _HELLO.unpack(data)
    _check_magic(magic, version)
    if code not in _DELIVERIES:
        raise ProtocolError(f"unknown delivery code {code}")
    if not 1 <= capacity <= MAX_CAPACITY:
        raise ProtocolError(f"capacity {capacity} out of range 1..{MAX_CAPACITY}")
    if label_size > MAX_LABEL:
        raise ProtocolError(f"a label of {label_size} bytes, over {MAX_LABEL}")
    if key_size > MAX_KEY:
        raise ProtocolError(f"a key of {key_size} bytes, over {MAX_KEY}")
    return _DELIVERIES[code], capacity, max_bytes or None, label_size, key_size


def encode_label(label: str) -> bytes:
    return label.encode("utf-8")


def decode_label(data: bytes | memoryview) -> str:
    """The label an inlet gave; raises ProtocolError unless it is UTF-8."""
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("a label that is not UTF-8") from None


def encode_welcome() -> bytes:
    return _WELCOME.pack(MAGIC, VERSION)


def decode_welcome(data: bytes | memoryview) -> None:
    """Raises ProtocolError unless *data* is a valid WELCOME."""
    if len(data) != _WELCOME.size:
        raise ProtocolError(f"handshake answer of {len(data)} bytes, expected {_WELCOME.size}")
    _check_magic(*_WELCOME.unpack(data))


def _check_magic(magic: bytes, version: int) -> None:
    if magic != MAGIC:
        raise ProtocolError(f"not a transports peer (magic {magic!r})")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, this side speaks {VERSION}")


# --- records ---------------------------------------------------------------------


@functools.cache
def _lengths_struct(count: int) -> struct.Struct:
    return struct.Struct(f"<{count}Q")


@functools.cache
def _header_struct(count: int) -> struct.Struct:
    return struct.Struct(f"{_MESSAGE.format}{count}Q")


def encode_message_header(seq: int, frames: list[memoryview]) -> bytes:
    count = len(frames)
    return _header_struct(count).pack(KIND_MESSAGE, seq, count, *[f.nbytes for f in frames])


def encode_end(next_seq: int) -> bytes:
    return _END.pack(KIND_END, next_seq)


def encode_credit(count: int, dropped: int) -> bytes:
    return _CREDIT.pack(KIND_CREDIT, count, dropped)


def encode_ack(dropped: int) -> bytes:
    return _ACK.pack(KIND_ACK, dropped)


def body_struct(kind: int) -> struct.Struct:
    """The layout of the fixed part of a record of *kind*, after its kind byte."""
    try:
        return _BODIES[kind]
    except KeyError:
        raise ProtocolError(f"unknown record kind {kind}") from None


def decode_lengths(count: int, data: bytes | memoryview, max_frame_size: int) -> tuple[int, ...]:
    """The frame lengths of a MESSAGE header; checks them against the limits."""
    lengths = _lengths_struct(count).unpack(data)
    for length in lengths:
        if length > max_frame_size:
            raise ProtocolError(f"frame of {length} bytes over the limit of {max_frame_size}")
    return lengths


def check_frame_count(count: int) -> None:
    if not 1 <= count <= MAX_FRAMES:
        raise ProtocolError(f"message of {count} frames (1..{MAX_FRAMES} allowed)")


# --- byte streams ----------------------------------------------------------------


def encode_messages(batch: list[tuple[int, list[memoryview], int]]) -> list[bytes | memoryview]:
    """The buffers to write, in order, for a batch of (seq, frames, nbytes).

    Headers and small frames are joined into as few buffers as possible; large
    frames are passed through as they are (no copy).
    """
    buffers: list[bytes | memoryview] = []
    joined: list[bytes | memoryview] = []
    for seq, frames, _ in batch:
        joined.append(encode_message_header(seq, frames))
        for frame in frames:
            if frame.nbytes <= SMALL_FRAME:
                joined.append(frame)
            else:
                buffers.append(b"".join(joined))
                joined.clear()
                buffers.append(frame)
    if joined:
        buffers.append(b"".join(joined))
    return buffers


class _FramePool:
    """Buffers for large frames, each used again once nobody else holds it.

    A large frame is received into a buffer of its own, which the application
    then owns. Fresh memory is slow to fill: glibc maps every allocation of
    this size afresh, and the kernel zeroes each page on its first touch
    (measured: 15% of a receiver's CPU at 1 MB). So the reader keeps the last
    :attr:`KEEP` buffers it handed out and reuses one of the right size once
    its reference count says that the application has let go of every view
    of it. The buffers are uninitialised numpy arrays (a zero-filled
    bytearray costs one more pass over the frame).
    """

    #: Buffers kept for reuse (at most this many times the frame size idle).
    KEEP = 4
    #: References to a free buffer seen by ``sys.getrefcount`` in :meth:`get`:
    #: the pool's list, the loop variable, and the call's argument.
    _FREE = 3

    def __init__(self) -> None:
        self._buffers: list[numpy.ndarray] = []

    def get(self, size: int) -> memoryview:
        """A buffer of *size* bytes that nobody else holds."""
        # (type: ignore: an ndarray is a buffer, which numpy's hints say on Python 3.12+ only)
        if _REFCOUNTS:
            for buffer in self._buffers:
                if buffer.nbytes == size and sys.getrefcount(buffer) == self._FREE:
                    return memoryview(buffer)  # type: ignore[arg-type]
        buffer = numpy.empty(size, dtype=numpy.uint8)
        if len(self._buffers) >= self.KEEP:
            del self._buffers[0]
        self._buffers.append(buffer)
        return memoryview(buffer)  # type: ignore[arg-type]


#: Most bytes a reader asks for beyond the record it is reading.
READ_AHEAD = 64 * 1024
#: Whether reference counts tell when a buffer is free (CPython).
_REFCOUNTS = hasattr(sys, "getrefcount") and sys.implementation.name == "cpython"
#: Whether sockets can be read without Trio's wrapper (``os.readv``; POSIX).
_READV = hasattr(os, "readv")


class _Partial:
    """A record being read: its header is taken, its frames are coming in."""

    __slots__ = ("fixed", "frames", "got", "large", "lengths")

    def __init__(self, fixed: tuple[int, ...], lengths: tuple[int, ...]) -> None:
        self.fixed = fixed
        self.lengths = lengths
        self.frames: list[memoryview] = []
        #: The buffer of the large frame being received, and its bytes received.
        self.large: memoryview | None = None
        self.got = 0


class StreamReader:
    """Reads records from a connected socket, with as few copies as it can.

    Small pieces go through one reusable buffer; a frame larger than
    :data:`SMALL_FRAME` is received straight into a buffer of its own
    (``recv_into``). :meth:`read_record` may be cancelled and called again,
    from any task: nothing read is lost.
    """

    def __init__(
        self, sock: trio.socket.SocketType, max_frame_size: int, buffer_size: int = 256 * 1024
    ) -> None:
        self._sock = sock
        #: On TCP, ask for immediate ACKs while a large frame streams in: the
        #: credit records flowing back would otherwise switch Linux to delayed
        #: ACKs, which halves throughput at 1 MB (measured: 2.5-2.9k -> 3.8-4.1k
        #: msg/s on loopback).
        self._quickack = hasattr(socket, "TCP_QUICKACK") and sock.family in (
            socket.AF_INET,
            socket.AF_INET6,
        )
        if buffer_size < _LARGEST_HEADER:
            raise ValueError(f"a buffer of {buffer_size} bytes cannot hold a message header")
        self._max_frame_size = max_frame_size
        #: The record :meth:`read_record` was reading when it was cancelled.
        self._partial: _Partial | None = None
        self._schedule = _SchedulePoints()
        self._drained = False
        self._frames = _FramePool()
        self._buffer = bytearray(buffer_size)
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0

    async def _recv_into(self, view: memoryview) -> int:
        """``recv_into`` *view*, yielding only to wait for data (or once in a while).

        Trio's ``recv_into`` yields to the scheduler even when data was
        waiting; for a stream of small messages that is a task switch per
        message. Here the reader goes on while data is waiting, and yields
        once in a while (:class:`_SchedulePoints`) so that it never starves
        the other tasks.
        """
        if not _READV:
            return await self._sock.recv_into(view)
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._drained:  # the last read emptied the socket: wait, do not try first
            await trio.lowlevel.wait_readable(self._sock)
            self._schedule.waited()
        while True:
            try:
                received = os.readv(self._sock.fileno(), [view])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._sock)
                self._schedule.waited()
            else:
                self._drained = 0 < received < len(view)
                await self._schedule.maybe_yield()
                return received

    async def wait_readable(self) -> None:
        """Wait until :meth:`read_record` has bytes to go on with, buffered or
        in the socket (a schedule point either way)."""
        if self._start < self._end:
            await trio.lowlevel.checkpoint()
            return
        await trio.lowlevel.wait_readable(self._sock)
        self._drained = False  # so the next read tries at once

    def _room(self, count: int) -> memoryview:
        """Where to read bytes into so that, once they come, at least *count*
        are buffered (made room for first; not more than :data:`READ_AHEAD`
        past them: the rest of a large frame is better read straight into its
        own buffer)."""
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buffer) - self._start < count:
            held = self._end - self._start
            self._view[:held] = self._view[self._start : self._end]
            self._start, self._end = 0, held
        return self._view[self._end : self._start + max(count, READ_AHEAD)]

    def _got(self, received: int) -> bool:
        """*received* bytes were read into the view :meth:`_next` (or
        :meth:`_room`) gave; False if none, the stream having ended between
        records.

        Raises:
            ProtocolError: the stream ended inside a record.
        """
        partial = self._partial
        if partial is not None and partial.large is not None:
            if not received:
                raise ProtocolError("the stream ended inside a frame")
            partial.got += received
            return True
        if not received:
            if partial is None and self._end == self._start:
                return False
            raise ProtocolError("the stream ended inside a record")
        self._end += received
        return True

    def _next(self) -> tuple[int, tuple[int, ...], list[memoryview]] | memoryview:
        """The next record, if what was read holds the rest of it; else the
        view to read more bytes into (then call :meth:`_got`).

        What it took of a record it cannot finish yet is kept (:attr:`_partial`),
        so a reader may stop waiting for bytes at any time and go on later.

        Raises:
            ProtocolError: the bytes are not a valid record.
        """
        partial = self._partial
        if partial is None:
            record = self._parse_buffered()
            if isinstance(record, tuple):
                return record
            if record is not None:
                return self._room(record)
            partial = self._partial = self._take_header()  # (a large frame: piece by piece)
        frames = partial.frames
        while len(frames) < len(partial.lengths):
            length = partial.lengths[len(frames)]
            if length > SMALL_FRAME:  # into a buffer of its own
                if partial.large is None:
                    view = self._frames.get(length)
                    held = min(length, self._end - self._start)
                    view[:held] = self._view[self._start : self._start + held]
                    self._start += held
                    partial.large, partial.got = view, held
                if partial.got < length:
                    return partial.large[partial.got :]
                frames.append(partial.large)
                partial.large = None
            elif self._end - self._start < length:
                return self._room(length)
            else:
                frames.append(memoryview(bytes(self._view[self._start : self._start + length])))
                self._start += length
        self._partial = None
        return KIND_MESSAGE, partial.fixed, frames

    def _reading_large(self) -> bool:
        """Whether the view :meth:`_next` gave is a large frame's own buffer."""
        return self._partial is not None and self._partial.large is not None

    async def read_handshake(self, size: int) -> memoryview:
        while self._end - self._start < size:
            if not self._got(await self._recv_into(self._room(size))):
                raise ProtocolError("the peer closed the connection during the handshake")
        start = self._start
        self._start += size
        return self._view[start : start + size]

    def _parse_buffered(self) -> tuple[int, tuple[int, ...], list[memoryview]] | int | None:
        """The next record if it is wholly buffered and has no large frame;
        else how many bytes must be buffered to take it so, once that is known;
        None if it has a large frame or does not fit in the buffer (its
        header is buffered then).

        The fast path for small messages: one copy for all frames, however
        many there are (a batch of small chunks has hundreds).
        """
        start, available = self._start, self._end - self._start
        if not available:
            return 1
        kind = self._buffer[start]
        body = body_struct(kind)
        fixed_end = 1 + body.size
        if available < fixed_end:
            return fixed_end
        fixed = body.unpack_from(self._buffer, start + 1)
        if kind != KIND_MESSAGE:
            self._start += fixed_end
            return kind, fixed, []
        count = fixed[1]
        check_frame_count(count)
        lengths_end = fixed_end + 8 * count
        if available < lengths_end:
            return lengths_end
        lengths = decode_lengths(
            count, self._view[start + fixed_end : start + lengths_end], self._max_frame_size
        )
        total = sum(lengths)
        if max(lengths) > SMALL_FRAME or lengths_end + total > len(self._buffer):
            return None
        if available < lengths_end + total:
            return lengths_end + total
        block = memoryview(bytes(self._view[start + lengths_end : start + lengths_end + total]))
        frames, position = [], 0
        for length in lengths:
            frames.append(block[position : position + length])
            position += length
        self._start += lengths_end + total
        return kind, fixed, frames

    async def read_record(self) -> tuple[int, tuple[int, ...], list[memoryview]] | None:
        """The next record as (kind, fixed integers, frames), or None at end of file.

        Cancelling it loses nothing: the next call goes on with the same record.

        Raises:
            ProtocolError: the bytes are not a valid record.
        """
        while True:
            step = self._next()
            if isinstance(step, tuple):
                return step
            if self._reading_large():
                if self._quickack:
                    self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                # Trio's recv_into, which yields after each read: while a large
                # frame streams in, the application and the credit get to run
                # (reading it through _recv_into measured 2x slower at 1 MB).
                received = await self._sock.recv_into(step)
            else:
                received = await self._recv_into(step)
            if not self._got(received):
                return None

    def read_record_blocking(
        self, wait: Callable[[], None]
    ) -> tuple[int, tuple[int, ...], list[memoryview]] | None:
        """:meth:`read_record` for a thread that is not Trio's, while no task
        reads: it calls *wait* to wait until the socket is readable. What
        *wait* raises comes out, and loses nothing: the next read, either
        kind, goes on with the same record. (POSIX only: ``os.readv``.)

        Raises:
            ProtocolError: the bytes are not a valid record.
            OSError: the connection broke.
        """
        fd = self._sock.fileno()
        while True:
            step = self._next()
            if isinstance(step, tuple):
                return step
            if self._quickack and self._reading_large():
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            while True:
                if self._drained:  # the last read emptied the socket: wait, do not try first
                    wait()
                try:
                    received = os.readv(fd, [step])
                except BlockingIOError:
                    self._drained = True
                else:
                    self._drained = 0 < received < len(step)
                    break
            if not self._got(received):
                return None

    def _take_header(self) -> _Partial:
        """Take the buffered header of the next record, a MESSAGE (see :meth:`_parse_buffered`)."""
        start = self._start + 1
        fixed = _MESSAGE_BODY.unpack_from(self._buffer, start)
        start += _MESSAGE_BODY.size
        count = fixed[1]
        lengths = decode_lengths(count, self._view[start : start + 8 * count], self._max_frame_size)
        self._start = start + 8 * count
        return _Partial(fixed, lengths)
