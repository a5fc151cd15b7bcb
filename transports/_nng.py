"""The ``nng`` backend: pynng sockets.

``nng+tcp://HOST:PORT`` and ``nng+ipc:///PATH``. Each link is a pair of
Pair1 sockets of its own: the outlet's address is a Rep0 socket where an
inlet asks for a link, and gets the port (or path) of a Pair1 socket the
outlet opened for it alone. (Pair1's polyamorous mode would serve every
inlet from one socket, but it is deprecated and, measured here, drops
messages when a pipe is busy.) Records are nng messages. A MESSAGE is one
nng message holding its header and its small frames (see :func:`_inline`),
followed by one nng message per large frame. pynng sends only ``bytes``, so
each frame is copied once on the way out.

nng's ``asend`` returning does not mean delivered: as on every backend, the
outlet's close waits for each inlet's acknowledgement of the end of stream.
"""

from __future__ import annotations

import errno
import itertools
import logging
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
from ._address import Address, check_connect_args, check_key, parse_address
from ._background import _Background
from ._framing import (
    KIND_MESSAGE,
    MAGIC,
    MAX_FRAMES,
    SMALL_FRAME,
    ProtocolError,
    body_struct,
    check_frame_count,
    decode_lengths,
    encode_message_header,
)
from ._net import HANDSHAKE_TIMEOUT, Record, _Conduit, _NetInlet, _NetOutlet

log = logging.getLogger("transports")


def _nng_url(address: Address) -> str:
    if address.scheme == "nng+ipc":
        return f"ipc://{address.path}"
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"tcp://{host}:{address.port}"


#: Small frames travel in their record's first nng message up to this many bytes in all.
INLINE_LIMIT = 1 << 20


def _inline(lengths: tuple[int, ...] | list[int]) -> list[bool]:
    """Which frames of a message travel in its first nng message, after the header.

    Small frames do, while they add up to at most :data:`INLINE_LIMIT`; the
    others follow, one nng message each. One nng message costs as much as
    another whatever its size, and a large frame is copied once either way.
    """
    inline, total = [], 0
    for length in lengths:
        fits = length <= SMALL_FRAME and total + length <= INLINE_LIMIT
        if fits:
            total += length
        inline.append(fits)
    return inline


def _recv_max_size(max_frame_size: int) -> int:
    return max(max_frame_size, INLINE_LIMIT) + 64 + 8 * MAX_FRAMES


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
    position = 1 + body.size + 8 * count
    if len(data) < position:
        raise ProtocolError(f"message header of {len(data)} bytes for {count} frames")
    view = memoryview(data)
    lengths = decode_lengths(count, view[1 + body.size : position], max_frame_size)
    inline = _inline(lengths)
    if len(data) != position + sum(length for length, i in zip(lengths, inline, strict=True) if i):
        raise ProtocolError(f"message header of {len(data)} bytes for frames of {lengths}")
    frames = []
    for length, in_header in zip(lengths, inline, strict=True):
        if in_header:
            frames.append(view[position : position + length])
            position += length
            continue
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
        inline = _inline([frame.nbytes for frame in frames])
        first: list[bytes | memoryview] = [encode_message_header(seq, frames)]
        first += [frame for frame, in_header in zip(frames, inline, strict=True) if in_header]
        await send(b"".join(first))
        for frame, in_header in zip(frames, inline, strict=True):
            if not in_header:
                await send(
                    frame.obj
                    if type(frame.obj) is bytes and frame.nbytes == len(frame.obj)
                    else frame.tobytes()
                )


class _SocketConduit(_Conduit):
    """One end of a link: a Pair1 socket with (at most) one peer."""

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


def _pair_socket(max_frame_size: int) -> pynng.Pair1:
    """A Pair1 socket that closes itself when its peer goes away.

    Closing ends a pending receive (as end of file), so a vanished peer is
    noticed at once; nng would otherwise wait for it to come back.
    """
    socket = pynng.Pair1(recv_max_size=_recv_max_size(max_frame_size))
    token = trio.lowlevel.current_trio_token()
    socket.add_post_pipe_remove_cb(lambda pipe: _call_soon(token, socket.close))
    return socket


#: What an inlet asks the outlet's Rep0 socket for, and the answer's prefix.
_LINK_REQUEST = MAGIC + b"link?"
_LINK_ANSWER = MAGIC + b"link="


class _NngOutlet(_NetOutlet):
    def __init__(
        self,
        address: Address,
        max_frame_size: int,
        close_timeout: float,
        background: _Background,
        socket: pynng.Rep0,
        key: bytes | None = None,
    ) -> None:
        super().__init__(str(address), max_frame_size, close_timeout, background, key)
        self._parsed = address
        self._socket = socket
        self._links_opened = itertools.count(1)

    async def _answer_forever(self) -> None:
        """Open a Pair1 socket for each inlet that asks, and serve the link on it."""
        while True:
            try:
                request = await self._socket.arecv()
            except pynng.Closed:
                return
            if request != _LINK_REQUEST:
                log.warning(
                    "%s: a peer that is not a transports inlet asked for a link", self._address
                )
                await self._socket.asend(b"error: not a transports request")
                continue
            if self._parsed.scheme == "nng+ipc":
                where = f"{self._parsed.path}.{next(self._links_opened)}"
                url = f"ipc://{where}"
            else:
                host = f"[{self._parsed.host}]" if ":" in self._parsed.host else self._parsed.host
                url = f"tcp://{host}:0"
            socket = _pair_socket(self._max_frame_size)
            try:
                listener = socket.listen(url)
                if self._parsed.scheme == "nng+tcp":
                    where = str(listener.local_address).rsplit(":", 1)[1]
            except pynng.NNGException as exc:
                socket.close()
                log.warning("%s: cannot open a link: %s", self._address, exc)
                await self._socket.asend(b"error: " + str(exc).encode())
                continue
            conduit = _SocketConduit(socket, f"nng-link-{where}", self._max_frame_size)
            self._background.start_soon(self._serve_link, conduit)
            await self._socket.asend(_LINK_ANSWER + where.encode())

    async def _release(self) -> None:
        self._socket.close()
        await trio.lowlevel.checkpoint()


def _link_url(parsed: Address, answer: bytes) -> str:
    """The URL of the Pair1 socket the outlet opened for this inlet.

    Raises:
        ProtocolError: the answer is not the outlet's.
    """
    if not answer.startswith(_LINK_ANSWER):
        raise ProtocolError(f"not a transports outlet (answer {answer[:40]!r})")
    where = answer[len(_LINK_ANSWER) :].decode("utf-8", "replace")
    if parsed.scheme == "nng+ipc":
        if not where.startswith(parsed.path + "."):
            raise ProtocolError(f"link path {where!r} outside {parsed.path!r}")
        return f"ipc://{where}"
    if not where.isdigit() or not 0 < int(where) < 65536:
        raise ProtocolError(f"link port {where!r} is not a port")
    host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
    return f"tcp://{host}:{where}"


async def _dial(socket: pynng.Socket, url: str, address: str) -> None:
    try:
        await trio.to_thread.run_sync(partial(socket.dial, url, block=True))
    except pynng.NNGException as exc:
        raise _os_error(exc, address) from exc


class NngTransport(Transport):
    """The wire protocol over nng (pynng) sockets: ``nng+tcp://`` and ``nng+ipc://``."""

    name = "nng"
    schemes = ("nng+tcp", "nng+ipc")

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
        socket = pynng.Rep0(recv_max_size=1024)
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
        outlet = _NngOutlet(parsed, max_frame_size, close_timeout, background, socket, key)
        background.start_soon(outlet._answer_forever)
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
        with pynng.Req0(recv_max_size=1024) as request:
            await _dial(request, _nng_url(parsed), address)
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    await request.asend(_LINK_REQUEST)
                    url = _link_url(parsed, await request.arecv())
            except trio.TooSlowError as exc:
                raise trio.BrokenResourceError(f"{address}: no answer to the handshake") from exc
            except ProtocolError as exc:
                raise trio.BrokenResourceError(f"{address}: {exc}") from exc
        socket = _pair_socket(max_frame_size)
        try:
            await _dial(socket, url, address)
        except BaseException:
            socket.close()
            raise
        conduit = _SocketConduit(socket, str(parsed), max_frame_size)
        return await _NetInlet.open(conduit, str(parsed), delivery, capacity, max_bytes, label, key)
