"""The ``nng`` backend: pynng Pair1 sockets.

``nng+tcp://HOST:PORT`` and ``nng+ipc:///PATH``. The outlet listens on a
polyamorous Pair1 socket and talks to each inlet over its own pipe; each
inlet dials with a Pair1 socket of its own. Records are nng messages: a
MESSAGE is a header message followed by one message per frame. pynng sends
only ``bytes``, so each frame is copied once on the way out.

nng's ``asend`` returning does not mean delivered: as on every backend, the
outlet's close waits for each inlet's acknowledgement of the end of stream.
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Awaitable, Callable
from functools import partial

import pynng
import trio

from ._abc import (
    DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_MAX_FRAME_SIZE,
    Delivery,
    Inlet,
    Outlet,
    Transport,
)
from ._address import Address, check_connect_args, parse_address
from ._background import _Background
from ._framing import (
    KIND_MESSAGE,
    MAX_FRAMES,
    ProtocolError,
    body_struct,
    check_frame_count,
    decode_lengths,
    encode_message_header,
)
from ._net import Record, _Conduit, _NetInlet, _NetOutlet

log = logging.getLogger("transports")


def _nng_url(address: Address) -> str:
    if address.scheme == "nng+ipc":
        return f"ipc://{address.path}"
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"tcp://{host}:{address.port}"


def _recv_max_size(max_frame_size: int) -> int:
    return max_frame_size + 64 + 8 * MAX_FRAMES


def _os_error(exc: pynng.NNGException, address: str) -> OSError:
    if isinstance(exc, pynng.AddressInUse):
        return OSError(errno.EADDRINUSE, f"{address}: address in use")
    if isinstance(exc, pynng.ConnectionRefused):
        return ConnectionRefusedError(errno.ECONNREFUSED, f"{address}: connection refused")
    return OSError(errno.EIO, f"{address}: {exc}")


async def _read_record(
    next_message: Callable[[], Awaitable[bytes | None]], max_frame_size: int
) -> Record | None:
    """Parse one record from a sequence of nng messages."""
    data = await next_message()
    if data is None:
        return None
    if not data:
        raise ProtocolError("empty record")
    kind = data[0]
    body = body_struct(kind)
    if len(data) < 1 + body.size:
        raise ProtocolError(f"record of kind {kind} too short ({len(data)} bytes)")
    fixed = body.unpack_from(data, 1)
    if kind != KIND_MESSAGE:
        if len(data) != 1 + body.size:
            raise ProtocolError(f"record of kind {kind} has {len(data)} bytes")
        return kind, fixed, []
    count = fixed[1]
    check_frame_count(count)
    if len(data) != 1 + body.size + 8 * count:
        raise ProtocolError(f"message header of {len(data)} bytes for {count} frames")
    lengths = decode_lengths(count, memoryview(data)[1 + body.size :], max_frame_size)
    frames = []
    for length in lengths:
        frame = await next_message()
        if frame is None:
            raise ProtocolError("the connection ended inside a message")
        if len(frame) != length:
            raise ProtocolError(f"frame of {len(frame)} bytes, announced {length}")
        frames.append(memoryview(frame))
    return kind, fixed, frames


async def _send_messages(
    send: Callable[[bytes], Awaitable[None]], batch: list[tuple[int, list[memoryview], int]]
) -> None:
    for seq, frames, _ in batch:
        await send(encode_message_header(seq, frames))
        for frame in frames:
            await send(
                frame.obj
                if type(frame.obj) is bytes and frame.nbytes == len(frame.obj)
                else frame.tobytes()
            )


class _PipeConduit(_Conduit):
    """The outlet's side of one pipe; its incoming messages arrive through *inbox*."""

    def __init__(
        self, pipe: pynng.Pipe, inbox: trio.MemoryReceiveChannel[bytes], max_frame_size: int
    ) -> None:
        self._pipe = pipe
        self._inbox = inbox
        self._max_frame_size = max_frame_size
        try:
            self.peer = f"nng+{pipe.remote_address}"
        except pynng.NNGException:
            self.peer = f"nng-pipe-{pipe.id}"

    async def _send(self, data: bytes) -> None:
        try:
            await self._pipe.asend(data)
        except pynng.NNGException as exc:
            raise trio.BrokenResourceError(f"{self.peer}: {exc}") from exc

    async def _next(self) -> bytes | None:
        try:
            return await self._inbox.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return None

    async def send_messages(self, batch: list[tuple[int, list[memoryview], int]]) -> None:
        await _send_messages(self._send, batch)

    async def send_record(self, data: bytes) -> None:
        await self._send(data)

    async def receive_handshake(self, size: int) -> bytes:
        data = await self._next()
        if data is None or len(data) != size:
            raise ProtocolError("not a transports handshake")
        return data

    async def receive_record(self) -> Record | None:
        return await _read_record(self._next, self._max_frame_size)

    async def aclose(self) -> None:
        self._inbox.close()
        try:
            self._pipe.close()
        except pynng.NNGException:
            pass
        await trio.lowlevel.checkpoint()


class _SocketConduit(_Conduit):
    """An inlet's Pair1 socket, dialed to one outlet."""

    def __init__(self, socket: pynng.Pair1, peer: str, max_frame_size: int) -> None:
        self._socket = socket
        self.peer = peer
        self._max_frame_size = max_frame_size

    async def _send(self, data: bytes) -> None:
        try:
            await self._socket.asend(data)
        except pynng.NNGException as exc:
            raise trio.BrokenResourceError(f"{self.peer}: {exc}") from exc

    async def _next(self) -> bytes | None:
        try:
            return await self._socket.arecv()
        except pynng.Closed:
            return None
        except pynng.NNGException as exc:
            raise trio.BrokenResourceError(f"{self.peer}: {exc}") from exc

    async def send_messages(self, batch: list[tuple[int, list[memoryview], int]]) -> None:
        await _send_messages(self._send, batch)

    async def send_record(self, data: bytes) -> None:
        await self._send(data)

    async def receive_handshake(self, size: int) -> bytes:
        data = await self._next()
        if data is None or len(data) != size:
            raise ProtocolError("not a transports handshake")
        return data

    async def receive_record(self) -> Record | None:
        return await _read_record(self._next, self._max_frame_size)

    async def aclose(self) -> None:
        self._socket.close()
        await trio.lowlevel.checkpoint()


def _call_soon(token: trio.lowlevel.TrioToken, fn: Callable[..., object], *args: object) -> None:
    """Run ``fn(*args)`` in the Trio thread (called from nng's threads)."""
    try:
        token.run_sync_soon(fn, *args)
    except trio.RunFinishedError:
        pass


class _NngOutlet(_NetOutlet):
    def __init__(
        self,
        address: str,
        max_frame_size: int,
        close_timeout: float,
        background: _Background,
        socket: pynng.Pair1,
    ) -> None:
        super().__init__(address, max_frame_size, close_timeout, background)
        self._socket = socket
        #: Per live pipe, where the dispatcher puts the messages it receives from it.
        self._inboxes: dict[int, trio.MemorySendChannel[bytes]] = {}
        #: Every pipe ever served (a pipe id is not reused for a new link).
        self._seen: set[int] = set()
        token = trio.lowlevel.current_trio_token()
        socket.add_post_pipe_remove_cb(lambda pipe: _call_soon(token, self._pipe_gone, pipe.id))

    def _pipe_gone(self, pipe_id: int) -> None:
        inbox = self._inboxes.pop(pipe_id, None)
        if inbox is not None:
            inbox.close()

    async def _dispatch_forever(self) -> None:
        """Route each incoming message to its pipe's link; a new pipe is a new inlet."""
        while True:
            try:
                message = await self._socket.arecv_msg()
            except pynng.Closed:
                return
            pipe = message.pipe
            if pipe is None:
                continue
            inbox = self._inboxes.get(pipe.id)
            if inbox is None:
                if pipe.id in self._seen:
                    continue  # a pipe whose link already ended
                self._seen.add(pipe.id)
                inbox, link_side = trio.open_memory_channel[bytes](math.inf)
                self._inboxes[pipe.id] = inbox
                self._background.start_soon(
                    self._serve_link, _PipeConduit(pipe, link_side, self._max_frame_size)
                )
            try:
                inbox.send_nowait(message.bytes)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._inboxes.pop(pipe.id, None)  # the link ended

    async def _release(self) -> None:
        self._socket.close()
        await trio.lowlevel.checkpoint()


class NngTransport(Transport):
    """The wire protocol over nng (pynng) Pair1 sockets: ``nng+tcp://`` and ``nng+ipc://``."""

    name = "nng"
    schemes = ("nng+tcp", "nng+ipc")

    async def bind(
        self,
        address: str,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> Outlet:
        parsed = parse_address(address, self.schemes)
        socket = pynng.Pair1(polyamorous=True, recv_max_size=_recv_max_size(max_frame_size))
        try:
            try:
                listener = socket.listen(_nng_url(parsed))
            except pynng.NNGException as exc:
                raise _os_error(exc, address) from exc
            if parsed.scheme == "nng+tcp":
                # pynng 0.9's local_address.port is byte-swapped: read the string form.
                port = int(str(listener.local_address).rsplit(":", 1)[1])
                parsed = Address(parsed.scheme, host=parsed.host, port=port)
            background = await _Background.open(f"outlet {parsed}")
        except BaseException:
            socket.close()
            raise
        outlet = _NngOutlet(str(parsed), max_frame_size, close_timeout, background, socket)
        background.start_soon(outlet._dispatch_forever)
        return outlet

    async def connect(
        self,
        address: str,
        *,
        delivery: Delivery = Delivery.RELIABLE,
        capacity: int = 8,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> Inlet:
        check_connect_args(delivery, capacity)
        parsed = parse_address(address, self.schemes)
        socket = pynng.Pair1(recv_max_size=_recv_max_size(max_frame_size))
        token = trio.lowlevel.current_trio_token()
        # The outlet vanished: close the socket, so that a pending receive ends.
        socket.add_post_pipe_remove_cb(lambda pipe: _call_soon(token, socket.close))
        try:
            await trio.to_thread.run_sync(partial(socket.dial, _nng_url(parsed), block=True))
        except pynng.NNGException as exc:
            socket.close()
            raise _os_error(exc, address) from exc
        except BaseException:
            socket.close()
            raise
        conduit = _SocketConduit(socket, str(parsed), max_frame_size)
        return await _NetInlet.open(conduit, str(parsed), delivery, capacity)
