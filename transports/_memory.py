"""The ``memory`` backend: endpoints in one Trio run, linked in memory.

No task and no thread: a link moves messages from its outlet half to its
inlet half as soon as credit allows, so everything is deterministic (and
runs under :class:`trio.testing.MockClock`). Frames are passed by reference.
"""

from __future__ import annotations

import errno
import itertools

import trio

from ._abc import (
    DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_MAX_FRAME_SIZE,
    Delivery,
    Inlet,
    Outlet,
    Transport,
)
from ._address import check_connect_args, check_key, parse_address
from ._link import _InletBuffer, _LinkQueue
from ._outlet import _OutletBase
from ._stats import Stats, _Counters, _inlet_stats

#: The outlets bound in the current Trio run, by name.
_REGISTRY: trio.lowlevel.RunVar[dict[str, _MemoryOutlet]] = trio.lowlevel.RunVar("registry")
_anonymous = itertools.count(1)


def _registry() -> dict[str, _MemoryOutlet]:
    try:
        return _REGISTRY.get()
    except LookupError:
        registry: dict[str, _MemoryOutlet] = {}
        _REGISTRY.set(registry)
        return registry


class _Wire:
    """Moves the messages of one link from its outlet half to its inlet half."""

    def __init__(self, outlet: _MemoryOutlet, buffer: _InletBuffer) -> None:
        self._outlet = outlet
        self.buffer = buffer
        self.queue: _LinkQueue | None = None
        self._moving = False

    def move(self) -> None:
        queue = self.queue
        if queue is None or self._moving:
            return
        self._moving = True
        try:
            while True:
                batch = queue.take(queue.capacity)
                for seq, frames, nbytes in batch:
                    self.buffer.deliver(seq, frames, nbytes)
                if batch:
                    continue
                if queue.closing and not queue.pending and not queue.done.is_set():
                    self.buffer.end(queue.next_seq)
                    # What the inlet dropped since its last credit, as the net
                    # backends' acknowledgement of the end of stream says it.
                    queue.credit(0, self.buffer.own_dropped)
                    self._outlet._drop_link(queue)
                break
        finally:
            self._moving = False

    def credit(self) -> None:
        if self.queue is not None:
            self.queue.credit(self.buffer.take_credit(), self.buffer.own_dropped)


class _MemoryOutlet(_OutletBase):
    async def _connect(
        self,
        delivery: Delivery,
        capacity: int,
        max_bytes: int | None,
        peer: str,
        label: str,
        key: bytes | None,
    ) -> _MemoryInlet:
        if not self._admits(key):
            raise trio.BrokenResourceError(
                f"{self._address}: refused: {'a wrong key' if key else 'no key'}"
            )
        counters = _Counters(self._address, delivery, capacity, max_bytes, label=label)
        wire = _Wire(self, _InletBuffer(counters, lambda: wire.credit()))

        def cut() -> None:
            wire.buffer.fail(trio.BrokenResourceError("the outlet cut this link"))

        wire.queue = self._new_link(
            peer, delivery, capacity, max_bytes, on_change=wire.move, label=label, on_cut=cut
        )
        return _MemoryInlet(wire)

    async def _shutdown(self) -> None:
        registry = _registry()
        name = parse_address(self._address).path
        if registry.get(name) is self:
            del registry[name]
        for link in list(self._links):
            self._drop_link(link)


class _MemoryInlet(Inlet):
    def __init__(self, wire: _Wire) -> None:
        self._wire = wire

    @property
    def stats(self) -> Stats:
        return _inlet_stats(self._wire.buffer.counters)

    async def receive(self) -> list[memoryview]:
        return await self._wire.buffer.receive()

    async def aclose(self) -> None:
        self._wire.buffer.close()
        queue = self._wire.queue
        if queue is not None:
            self._wire._outlet._drop_link(queue)
        await trio.lowlevel.checkpoint()


class MemoryTransport(Transport):
    """Endpoints within one Trio run: ``memory://NAME``, or ``memory://`` for a fresh name."""

    name = "memory"
    schemes = ("memory",)

    async def bind(
        self,
        address: str,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        key: bytes | None = None,
    ) -> Outlet:
        check_key(key)
        name = parse_address(address, self.schemes).path or f"anonymous-{next(_anonymous)}"
        registry = _registry()
        if name in registry:
            raise OSError(errno.EADDRINUSE, f"memory://{name} is already bound")
        outlet = _MemoryOutlet(f"memory://{name}", max_frame_size, close_timeout, key)
        registry[name] = outlet
        await trio.lowlevel.checkpoint()
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
        name = parse_address(address, self.schemes).path
        await trio.lowlevel.checkpoint()
        outlet = _registry().get(name)
        if outlet is None or outlet._closed:
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"nothing is bound at {address}")
        peer = f"memory-inlet-{next(_anonymous)}"
        return await outlet._connect(delivery, capacity, max_bytes, peer=peer, label=label, key=key)
