"""The Manager's HTTP and WebSocket server: hypercorn's, each connection contained.

``hypercorn.trio.serve`` runs every connection in one nursery, so that a
connection whose protocol handling raises ends the whole server, and every
other connection with it: one malformed WebSocket upgrade from anyone who can
reach the port was enough (pgjones/hypercorn#225, open as of hypercorn
0.18), before any token is asked for. :func:`serve` runs hypercorn's
connection handler for each connection, as ``hypercorn.trio.serve`` does,
but such an error ends only that connection (logged).

It serves plain HTTP/1.1 and HTTP/2 and WebSockets, and no TLS, like the
Manager's ``hypercorn.trio.serve`` before; ASGI's lifespan events are not
sent (the Manager's application needs none).
"""

from __future__ import annotations

import logging
from typing import Any

import hypercorn.config
import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ASGIFramework, ConnectionState

__all__ = ["serve"]

log = logging.getLogger("chimera.manager.http")


async def serve(
    app: ASGIFramework,
    config: hypercorn.config.Config,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve *app* where *config* binds (one address), until cancelled;
    ``task_status.started`` gets the port it listens on.

    Raises:
        OSError: it cannot listen there (the port is taken, the host is not
            this machine's, ...).
    """
    sockets = config.create_sockets().insecure_sockets
    try:
        for sock in sockets:
            sock.listen(config.backlog)
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    wrapped = ASGIWrapper(app)
    context = WorkerContext(None)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            state = ConnectionState({})
            # (type: ignore: hypercorn's hint says an SSLStream, but it serves a plain
            # SocketStream too, which its own hypercorn.trio.serve hands it)
            await TCPServer(wrapped, config, context, state, stream)  # type: ignore[arg-type]
        except Exception as exc:  # that connection broke the protocol: it alone ends
            log.warning("a connection from %s was closed: %r", _peer(stream), exc)

    task_status.started(sockets[0].getsockname()[1])
    await trio.serve_listeners(handle, listeners)


def _peer(stream: trio.SocketStream) -> Any:
    try:
        return stream.socket.getpeername()
    except OSError:
        return "?"
