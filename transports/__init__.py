"""transports: the data plane of chimera, a library of its own.

An :class:`Outlet` fans messages (sequences of bytes-like frames) out to every
:class:`Inlet` connected to it, each link with its own :class:`Delivery`::

    import transports

    async with await transports.bind("tcp://127.0.0.1:0") as outlet:
        inlet = await transports.connect(outlet.address, capacity=8)
        await outlet.send([header, memoryview(array)])
        frames = await inlet.receive()

Backends: ``memory`` (one Trio run), ``tcp`` (TCP and Unix sockets), ``nng`` (pynng).
"""

from ._abc import (
    DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_MAX_FRAME_SIZE,
    Delivery,
    Inlet,
    LentInlet,
    Outlet,
    Transport,
)
from ._framing import MAX_FRAMES
from ._registry import bind, connect, get
from ._stats import LinkStats, Stats

__all__ = [
    "DEFAULT_CLOSE_TIMEOUT",
    "DEFAULT_MAX_FRAME_SIZE",
    "MAX_FRAMES",
    "Delivery",
    "Inlet",
    "LentInlet",
    "LinkStats",
    "Outlet",
    "Stats",
    "Transport",
    "bind",
    "connect",
    "get",
]
