"""The ``tcp`` backend: Trio socket streams, over TCP or Unix sockets.

``tcp://HOST:PORT`` (port 0 picks a free port) and ``unix:///PATH``. Between
processes on one host, Unix sockets are the faster choice.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket as stdlib_socket
from collections.abc import Callable

import trio

from ._abc import (
    DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_MAX_FRAME_SIZE,
    Delivery,
    Inlet,
    Outlet,
    Transport,
)
from ._address import Address, check_connect_args, check_key, parse_address
from ._background import _Background
from ._framing import _READV, StreamReader, encode_messages
from ._net import Record, _Conduit, _NetInlet, _NetOutlet

log = logging.getLogger("transports")

#: Socket buffer size asked for on both sides (the kernel may give less).
SOCKET_BUFFER = 4 * 1024 * 1024


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        name = stream.socket.getpeername()
    except OSError:
        return "?"
    if isinstance(name, tuple):
        host, port = name[0], name[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return name or "unix-peer"


def _tune(sock: trio.socket.SocketType) -> None:
    for option in (stdlib_socket.SO_SNDBUF, stdlib_socket.SO_RCVBUF):
        try:
            sock.setsockopt(stdlib_socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:  # not allowed: keep the default
            pass


#: Called right after messages are written at once: gives up the CPU for a
#: moment, so that the reader the write woke runs now. Linux often queues a
#: socket's woken reader on the writer's CPU ("sync" wake-ups; the 2-vCPU VMs
#: measured here always do), where it waits until the writer's event loop has
#: gone idle. Measured on such a VM, 1 KB messages paced at 1 kHz: a bare Trio
#: socket's one-way p50 ~180 -> ~110 µs, chimera's async nodes ~340 -> ~280 µs.
#: One system call per message written at once; none for messages the link's
#: task writes in bulk.
_hand_over = getattr(os, "sched_yield", None)

#: Most buffers one sendmsg or writev call takes (Linux's IOV_MAX).
_IOV_MAX = 1024


def _advance(views: list[memoryview], first: int, sent: int) -> int:
    """Drop *sent* written bytes from ``views[first:]``; return the first index left."""
    while sent:
        size = views[first].nbytes
        if sent >= size:
            sent -= size
            first += 1
        else:
            views[first] = views[first][sent:]
            sent = 0
    while first < len(views) and not views[first].nbytes:
        first += 1
    return first


class _StreamConduit(_Conduit):
    eager = hasattr(os, "writev")
    resumable_reads = True

    def __init__(self, stream: trio.SocketStream, max_frame_size: int) -> None:
        self._stream = stream
        self._reader = StreamReader(stream.socket, max_frame_size)
        self.peer = _peer_name(stream)

    async def send_messages(self, batch: list[tuple[int, list[memoryview], int]]) -> None:
        await self.send_rest([memoryview(buffer) for buffer in encode_messages(batch)])

    def write_messages_now(
        self, batch: list[tuple[int, list[memoryview], int]]
    ) -> list[memoryview]:
        rest = self._write_now(encode_messages(batch))
        if _hand_over is not None:
            _hand_over()
        return rest

    def write_record_now(self, data: bytes) -> list[memoryview]:
        return self._write_now([data])

    def _write_now(self, buffers: list[bytes | memoryview]) -> list[memoryview]:
        fd = self._stream.socket.fileno()  # -1 once closed
        views = [memoryview(buffer) for buffer in buffers]
        first = 0
        try:
            if len(views) == 1:  # the usual case for small messages and records
                first = _advance(views, first, os.write(fd, views[0]))
            while first < len(views):
                first = _advance(views, first, os.writev(fd, views[first : first + _IOV_MAX]))
        except OSError:  # it would block, or the connection broke: left to send_rest
            pass
        return views[first:]

    async def send_rest(self, rest: list[memoryview]) -> None:
        """Write *rest* in order with as few system calls as it can (``sendmsg``), no copy.

        Raises:
            trio.BrokenResourceError: the connection broke.
        """
        sock = self._stream.socket
        first = 0
        try:
            while first < len(rest):
                first = _advance(rest, first, await sock.sendmsg(rest[first : first + _IOV_MAX]))
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc

    async def send_record(self, data: bytes) -> None:
        await self.send_rest([memoryview(data)])

    async def receive_handshake(self, size: int) -> bytes:
        return bytes(await self._reader.read_handshake(size))

    async def receive_record(self) -> Record | None:
        return await self._reader.read_record()

    async def wait_readable(self) -> None:
        await self._reader.wait_readable()

    #: (``os.readv`` and ``select.poll``: POSIX.)
    lendable = _READV and hasattr(select, "poll")

    def fileno(self) -> int:
        return self._stream.socket.fileno()

    def receive_record_blocking(self, wait: Callable[[], None]) -> Record | None:
        return self._reader.read_record_blocking(wait)

    async def aclose(self) -> None:
        await self._stream.aclose()


class _TcpOutlet(_NetOutlet):
    def __init__(
        self,
        address: str,
        max_frame_size: int,
        close_timeout: float,
        background: _Background,
        listener: trio.SocketListener,
        unix_path: str | None,
        key: bytes | None = None,
    ) -> None:
        super().__init__(address, max_frame_size, close_timeout, background, key)
        self._listener = listener
        self._unix_path = unix_path

    async def _accept_forever(self) -> None:
        while True:
            try:
                stream = await self._listener.accept()
            except OSError as exc:  # out of file descriptors, or similar: retry soon
                log.warning("%s: accept failed: %s", self._address, exc)
                await trio.sleep(0.1)
                continue
            _tune(stream.socket)
            self._background.start_soon(
                self._serve_link, _StreamConduit(stream, self._max_frame_size)
            )

    async def _release(self) -> None:
        with trio.CancelScope(shield=True):
            await self._listener.aclose()
        if self._unix_path is not None:
            try:
                os.unlink(self._unix_path)
            except OSError:
                pass


async def _listen(address: Address) -> tuple[trio.socket.SocketType, str, str | None]:
    """A listening socket for *address*, the concrete address, and the Unix path if any."""
    if address.scheme == "unix":
        sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
        try:
            await sock.bind(address.path)
        except BaseException:
            sock.close()
            raise
        return sock, str(address), address.path
    infos = await trio.socket.getaddrinfo(
        address.host, address.port, type=stdlib_socket.SOCK_STREAM, flags=stdlib_socket.AI_PASSIVE
    )
    if not infos:
        raise OSError(errno.EADDRNOTAVAIL, f"cannot resolve {address.host}")
    family, type_, proto, _, sockaddr = infos[0]
    sock = trio.socket.socket(family, type_, proto)
    try:
        sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
        await sock.bind(sockaddr)
    except BaseException:
        sock.close()
        raise
    port = sock.getsockname()[1]
    return sock, str(Address("tcp", host=address.host, port=port)), None


class TcpTransport(Transport):
    """Length-prefixed multi-frame messages over TCP (``tcp://``) or Unix sockets (``unix://``)."""

    name = "tcp"
    schemes = ("tcp", "unix")

    async def bind(
        self,
        address: str,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        key: bytes | None = None,
    ) -> Outlet:
        check_key(key)
        parsed = parse_address(address, self.schemes)
        sock, concrete, unix_path = await _listen(parsed)
        try:
            sock.listen(128)
            _tune(sock)
            listener = trio.SocketListener(sock)
            background = await _Background.open(f"outlet {concrete}")
        except BaseException:
            sock.close()
            if unix_path is not None:
                os.unlink(unix_path)
            raise
        outlet = _TcpOutlet(
            concrete, max_frame_size, close_timeout, background, listener, unix_path, key
        )
        background.start_soon(outlet._accept_forever)
        return outlet

    async def connect(
        self,
        address: str,
        *,
        delivery: Delivery = Delivery.RELIABLE,
        capacity: int = 8,
        max_bytes: int | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        label: str = "",
        key: bytes | None = None,
    ) -> Inlet:
        check_connect_args(delivery, capacity, max_bytes, label, key)
        parsed = parse_address(address, self.schemes)
        if parsed.scheme == "unix":
            stream = await trio.open_unix_socket(parsed.path)
        else:
            stream = await trio.open_tcp_stream(parsed.host, parsed.port)
        _tune(stream.socket)
        return await _NetInlet.open(
            _StreamConduit(stream, max_frame_size),
            str(parsed),
            delivery,
            capacity,
            max_bytes,
            label,
            key,
        )
