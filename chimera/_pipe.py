"""Messages between a Worker and a node's child process, over its pipes.

Each message is a pickled Python value after its length (4 bytes,
little-endian). Both ends are this package's own code, started by the
Worker for its own nodes, so pickle is safe here; nothing else reads or
writes these pipes.

The child reads with plain blocking calls (in its lifeline thread); the
Worker reads and writes with Trio streams.
"""

from __future__ import annotations

import os
import pickle
import struct
from io import RawIOBase
from typing import Any, BinaryIO

import trio

_LENGTH = struct.Struct("<I")
#: Largest message either side accepts (a pickled node can be large: models).
MAX_MESSAGE = 1 << 30


class PipeError(Exception):
    """The other end sent something that is not a message."""


def encode(value: Any) -> bytes:
    """*value* as one framed message."""
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


def _check_length(length: int) -> int:
    if length > MAX_MESSAGE:
        raise PipeError(f"a message of {length} bytes (at most {MAX_MESSAGE})")
    return length


def _decode(data: bytes) -> Any:
    try:
        return pickle.loads(data)
    except Exception as exc:
        raise PipeError(f"a message that does not unpickle: {exc!r}") from exc


def read_blocking(stream: BinaryIO | RawIOBase) -> Any | None:
    """The next message from a blocking binary *stream* (a file, or a
    socket's unbuffered ``makefile("rb", buffering=0)``); None at end of file.

    Raises:
        PipeError: the stream ended inside a message, or it does not unpickle.
    """
    header = _read_exactly(stream, _LENGTH.size)
    if header is None:
        return None
    length = _check_length(_LENGTH.unpack(header)[0])
    data = _read_exactly(stream, length)
    if data is None:
        raise PipeError("the pipe ended inside a message")
    return _decode(data)


def _read_exactly(stream: BinaryIO | RawIOBase, count: int) -> bytes | None:
    chunks: list[bytes] = []
    while count:
        chunk = stream.read(count)
        if not chunk:
            if chunks:
                raise PipeError("the pipe ended inside a message")
            return None
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def write_blocking(fd: int, data: bytes) -> None:
    """Write all of *data* to the file descriptor *fd* (blocking)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class MessageReader:
    """Reads framed messages from a Trio receive stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def _fill(self, count: int) -> bool:
        while len(self._buffer) < count:
            data = await self._stream.receive_some()
            if not data:
                if self._buffer:
                    raise PipeError("the pipe ended inside a message")
                return False
            self._buffer += data
        return True

    async def read(self) -> Any | None:
        """The next message; None at end of file.

        Raises:
            PipeError: the stream ended inside a message, or it does not unpickle.
        """
        if not await self._fill(_LENGTH.size):
            return None
        length = _check_length(_LENGTH.unpack_from(self._buffer)[0])
        await self._fill(_LENGTH.size + length)
        data = bytes(self._buffer[_LENGTH.size : _LENGTH.size + length])
        del self._buffer[: _LENGTH.size + length]
        return _decode(data)
