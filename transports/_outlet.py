"""What every outlet shares: fan-out, backpressure, closing, counters."""

from __future__ import annotations

import hmac
import logging
import threading
from abc import abstractmethod
from collections.abc import Callable

import trio

from ._abc import Delivery, Message, Outlet
from ._framing import MAX_FRAMES
from ._link import _LinkQueue
from ._schedule import _SchedulePoints
from ._stats import Stats, _Counters, _outlet_stats

log = logging.getLogger("transports")


def _as_frames(message: Message, max_frame_size: int) -> tuple[list[memoryview], int]:
    """The frames of *message* as flat byte views, and their total size.

    Raises:
        TypeError: a frame is not bytes-like.
        ValueError: no frames, more than :data:`MAX_FRAMES`, a frame not
            C-contiguous, or one over *max_frame_size*.
    """
    if isinstance(message, (list, tuple)):  # the usual case: no exception to catch
        parts = message
    else:
        try:  # one bytes-like object: a single frame
            # (type: ignore: a sequence of frames is tried too, and raises TypeError)
            parts = [memoryview(message)]  # type: ignore[arg-type]
        except TypeError:
            try:
                parts = list(message)
            except TypeError:
                raise TypeError(
                    f"a message is a bytes-like object or a sequence of them, "
                    f"not {type(message).__name__}"
                ) from None
    if not parts:
        raise ValueError("a message needs at least one frame")
    if len(parts) > MAX_FRAMES:
        raise ValueError(f"a message of {len(parts)} frames: at most {MAX_FRAMES}")
    frames = []
    total = 0
    for part in parts:
        try:
            view = memoryview(part)
        except TypeError:
            raise TypeError(
                f"a frame must be bytes-like (bytes, bytearray, memoryview, numpy array), "
                f"not {type(part).__name__}"
            ) from None
        if not view.c_contiguous:
            raise ValueError("a frame must be C-contiguous (use numpy.ascontiguousarray)")
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        if view.nbytes > max_frame_size:
            raise ValueError(f"frame of {view.nbytes} bytes over max_frame_size={max_frame_size}")
        frames.append(view)
        total += view.nbytes
    return frames, total


class _OutletBase(Outlet):
    """An outlet's links and the rules of sending; backends add binding and I/O.

    Its links change, and are written to, in the Trio thread, except by
    :meth:`send_now`, which any thread may call: what either side does to
    the links (and to their writers' state) it does holding :attr:`_lock`.
    """

    def __init__(
        self, address: str, max_frame_size: int, close_timeout: float, key: bytes | None = None
    ) -> None:
        self._address = address
        #: What an inlet must present to be let in, if anything.
        self._key = key
        self._max_frame_size = max_frame_size
        self._close_timeout = close_timeout
        self._links: list[_LinkQueue] = []
        #: What ends each link's I/O when it is cut.
        self._on_cut: dict[_LinkQueue, Callable[[], None] | None] = {}
        self._history: list[_Counters] = []
        self._messages_sent = 0
        self._bytes_sent = 0
        self._closed = False
        #: Held by whatever changes the links or writes to them (reentrant: a
        #: change calls its link's ``on_change``, which may change more).
        self._lock = threading.RLock()
        self._schedule = _SchedulePoints()
        #: Woken when a link gets room, a link goes away, or the outlet closes.
        self._room = trio.lowlevel.ParkingLot()
        #: Woken when an inlet connects, or the outlet closes.
        self._inlets_changed = trio.lowlevel.ParkingLot()

    @property
    def address(self) -> str:
        return self._address

    @property
    def stats(self) -> Stats:
        return _outlet_stats(self._messages_sent, self._bytes_sent, self._history)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._links)} inlets"
        return f"<{type(self).__name__} {self._address} {state}>"

    async def send(self, message: Message) -> None:
        frames, nbytes = _as_frames(message, self._max_frame_size)
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            with self._lock:  # (the room checked is the room used: see send_now)
                if self._has_room():
                    # No checkpoint from here on: the message reaches every link, or none.
                    for link in self._links:
                        link.put(frames, nbytes)
                    self._messages_sent += 1
                    self._bytes_sent += nbytes
                    break
            await self._room.park()
            waited = True
        if waited:
            self._schedule.waited()
        await self._schedule.maybe_yield()

    def send_now(self, message: Message) -> bool:
        """Always False: only a backend whose links can be written from any
        thread sends at once (see :meth:`Outlet.send_now`)."""
        _as_frames(message, self._max_frame_size)
        return False

    async def wait_send_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if not await self._wait_for_room():
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _wait_for_room(self) -> bool:
        """Wait until every link has room; whether it waited.

        Raises:
            trio.ClosedResourceError: the outlet is closed.
        """
        waited = False
        while not self._has_room():
            await self._room.park()
            waited = True
        return waited

    def _has_room(self) -> bool:
        """Whether every link has room.

        Raises:
            trio.ClosedResourceError: the outlet is closed.
        """
        if self._closed:
            raise trio.ClosedResourceError("the outlet is closed")
        return all(link.has_room() for link in self._links)

    async def wait_for_inlets(self, count: int = 1) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        while len(self._history) < count:  # (every inlet that connected, gone since or not)
            if self._closed:
                raise trio.ClosedResourceError("the outlet is closed")
            await self._inlets_changed.park()
        if self._closed:
            raise trio.ClosedResourceError("the outlet is closed")
        await trio.lowlevel.cancel_shielded_checkpoint()

    def _new_link(
        self,
        peer: str,
        delivery: Delivery,
        capacity: int,
        max_bytes: int | None = None,
        on_change: Callable[[], None] | None = None,
        *,
        label: str = "",
        on_cut: Callable[[], None] | None = None,
    ) -> _LinkQueue:
        """Make a link to a new inlet and count it (it receives what is sent from now on).

        *on_change* is called whenever the link changes (a message put or
        credited, the link closing); *on_cut*, once :meth:`cut` drops the
        link: it ends the link's I/O.
        """

        def changed() -> None:
            if self._room:  # a send waits for room
                self._room.unpark_all()
            if on_change is not None:
                on_change()

        counters = _Counters(peer, delivery, capacity, max_bytes, label=label)
        link = _LinkQueue(counters, changed)
        with self._lock:
            self._on_cut[link] = on_cut
            self._history.append(counters)
            self._links.append(link)
        self._inlets_changed.unpark_all()
        return link

    def _drop_link(self, link: _LinkQueue) -> None:
        """Forget a link that ended (acknowledged, closed by its inlet, or broken)."""
        with self._lock:  # (from here on, send_now leaves its connection alone)
            if link in self._links:
                self._links.remove(link)
            self._on_cut.pop(link, None)
        link.done.set()
        self._room.unpark_all()

    def _admits(self, key: bytes | None) -> bool:
        """Whether an inlet presenting *key* is let in."""
        return self._key is None or hmac.compare_digest(key or b"", self._key)

    def cut(self, label: str) -> int:
        links = [link for link in self._links if link.counters.label == label]
        for link in links:
            on_cut = self._on_cut.get(link)
            log.info("%s: link to %s (%r) cut", self._address, link.counters.peer, label)
            self._drop_link(link)
            if on_cut is not None:
                on_cut()
        return len(links)

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        with self._lock:
            self._closed = True
            links = list(self._links)
            for link in links:
                link.close()
        self._room.unpark_all()
        self._inlets_changed.unpark_all()
        try:
            with trio.move_on_after(self._close_timeout) as waiting:
                for link in links:
                    await link.done.wait()
            if waiting.cancelled_caught:
                late = sum(not link.done.is_set() for link in links)
                log.warning(
                    "%s: %d inlet(s) did not acknowledge the end of stream within %.1f s; "
                    "their links are cut",
                    self._address,
                    late,
                    self._close_timeout,
                )
        finally:
            await self._shutdown()

    @abstractmethod
    async def _shutdown(self) -> None:
        """Release the backend's resources; must finish even when cancelled."""
