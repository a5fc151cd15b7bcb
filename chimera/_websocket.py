"""The Worker's WebSocket to its Manager: trio-websocket's, opened so that a
peer that ends the connection during the opening handshake fails it at once.

``trio_websocket.open_websocket_url`` waits for the handshake's answer until
its caller's timeout, even once the peer has closed the connection, or has
answered what is not HTTP (an SSH server on the port given, say): its reader
ends, and nothing tells the handshake. :func:`open_websocket` hands the
connection a stream that says when it ends (:class:`_EndSaid`): ending before
the handshake is done fails the opening with :class:`HandshakeEnded`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio
import trio_websocket

from ._protocol import in_url
from ._service import unwrapped

__all__ = ["HandshakeEnded", "open_websocket"]

#: Seconds to close the WebSocket properly on leaving, unless cancelled
#: (then it is dropped).
CLOSE_TIMEOUT = 5.0


class HandshakeEnded(ConnectionResetError):
    """The peer ended the connection (or it was ended, not speaking HTTP)
    before it answered the WebSocket opening handshake."""


class _EndSaid(trio.abc.Stream):
    """*stream*, calling *on_end* once when it ends: the peer closed it, it
    broke, or it was closed here (the WebSocket gave up on what the peer said)."""

    def __init__(self, stream: trio.SocketStream, on_end: Callable[[], None]) -> None:
        self.stream = stream
        self._on_end: Callable[[], None] | None = on_end

    def forget_end(self) -> None:
        """Call *on_end* no more."""
        self._on_end = None

    def _ended(self) -> None:
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._ended()
            raise
        if not data:
            self._ended()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._ended()
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        self._ended()
        await self.stream.aclose()


@asynccontextmanager
async def open_websocket(
    host: str, port: int, resource: str, *, max_message_size: int
) -> AsyncIterator[tuple[trio_websocket.WebSocketConnection, str]]:
    """A WebSocket to ``ws://HOST:PORT/RESOURCE``, and the local address it
    was reached from (this machine's, as the peer sees it); closed on leaving.

    Raises:
        OSError: the connection could not be made (:class:`HandshakeEnded`:
            the peer ended it before it answered the opening handshake).
        trio_websocket.HandshakeError: the peer refused the WebSocket
            (:class:`trio_websocket.ConnectionRejected`).
    """
    stream = await trio.open_tcp_stream(host, port)
    local = str(stream.socket.getsockname()[0])
    try:
        with unwrapped():
            async with trio.open_nursery() as nursery:  # (the WebSocket's reader)
                with trio.CancelScope() as opening:
                    said = _EndSaid(stream, opening.cancel)
                    header = f"{in_url(host)}:{port}"
                    ws = await trio_websocket.wrap_client_stream(
                        nursery,
                        said,  # type: ignore[arg-type]  # (any trio.abc.Stream, its docs say)
                        header,
                        resource,
                        max_message_size=max_message_size,
                    )
                said.forget_end()
                if opening.cancelled_caught:
                    nursery.cancel_scope.cancel()
                    raise HandshakeEnded(
                        "what answers there ended the connection before it answered the "
                        "WebSocket handshake"
                    )
                try:
                    yield ws, local
                finally:
                    # (Not shielded: cancelled, the Worker leaves at once, as
                    # it would with trio_websocket's own.)
                    with trio.move_on_after(CLOSE_TIMEOUT):
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()
