"""The interfaces of the data plane: :class:`Transport`, :class:`Outlet`, :class:`Inlet`.

Every backend implements these three classes with the same semantics; the
conformance suite in ``tests/transports`` pins them.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Union

import trio

if TYPE_CHECKING:
    from ._stats import Stats

#: A frame: any object supporting the buffer protocol (bytes, bytearray,
#: memoryview, a C-contiguous numpy array...).
Frame = Union[bytes, bytearray, memoryview]  # noqa: UP007  (kept readable on 3.10)

#: What :meth:`Outlet.send` accepts: one bytes-like object, or a sequence of them.
Message = Union[bytes, bytearray, memoryview, Sequence[Frame]]  # noqa: UP007

#: Default bound on the size of one frame, in bytes (256 MiB).
DEFAULT_MAX_FRAME_SIZE = 256 * 1024 * 1024

#: Default time :meth:`Outlet.aclose` waits for inlets to acknowledge the end of stream.
DEFAULT_CLOSE_TIMEOUT = 10.0


class Delivery(enum.Enum):
    """How a link delivers messages; chosen by the inlet when it connects.

    ``RELIABLE``
        Lossless and in order. At most ``capacity`` messages, and if the
        inlet set ``max_bytes``, about that many bytes (one message always
        fits), are buffered on the link; while it is full,
        :meth:`Outlet.send` waits (backpressure).
    ``LATEST``
        Real time. The link keeps the newest ``capacity`` messages; older ones
        are dropped and counted in :attr:`Stats.messages_dropped`.
        :meth:`Outlet.send` never waits on a ``LATEST`` link.
    """

    RELIABLE = "reliable"
    LATEST = "latest"


class Outlet(trio.abc.AsyncResource):
    """The sending end of a stream: fans each message out to every connected inlet.

    Made by :meth:`Transport.bind`. Use it as an async context manager, or call
    :meth:`aclose` when done: closing ends the stream for every inlet.
    """

    __slots__ = ()

    @property
    @abstractmethod
    def address(self) -> str:
        """The concrete address inlets connect to (a port 0 resolved to the real port)."""

    @property
    @abstractmethod
    def stats(self) -> Stats:
        """A snapshot of the counters: totals and one :class:`LinkStats` per link ever connected.

        ``messages_sent`` counts messages accepted by :meth:`send`, whatever the
        number of links; per link, the messages put on that link.
        ``messages_dropped`` counts the messages ``LATEST`` links dropped.
        """

    @abstractmethod
    async def send(self, message: Message) -> None:
        """Send one message to every connected inlet.

        *message* is a bytes-like object or a sequence of them (its frames). The
        frames are not copied: the caller must not change a buffer after
        passing it.

        Waits while a ``RELIABLE`` link is full. If cancelled, the message has
        been put on every ``RELIABLE`` link or on none. A message sent while no
        inlet is connected reaches nobody (and is still counted as sent).

        Always a cancel point; a schedule point when it waits, and otherwise
        once in 16 calls (a task switch per message would cost a third of a
        small message's time). A message may be written by the link's task,
        which runs at the caller's next schedule point: never block the event
        loop after sending.

        Raises:
            trio.ClosedResourceError: the outlet is closed, or is closed while
                this call waits.
            TypeError: a frame is not bytes-like.
            ValueError: a frame is not C-contiguous, is larger than the
                outlet's ``max_frame_size``, or the message has no frames.
        """

    @abstractmethod
    def send_now(self, message: Message) -> bool:
        """Send *message* at once, if it need not wait; whether it was sent.

        Unlike every other method, safe to call from any thread (it never
        waits, but for a lock the outlet's own tasks hold briefly): a thread
        that makes messages sends them without handing each to the event
        loop. The message is sent -- to every link, in order after what was
        sent before -- when it is small (at most 64 KiB), every link has room
        and credit for it with nothing queued and less than half its
        capacity in flight (a link fuller than that is better served by the
        batches its task writes), and no link's task is writing;
        what the connection does not take at once, the link's task writes
        next. Otherwise nothing is sent, and it returns False: :meth:`send` it
        (from the event loop). Always False with no inlet connected, on a
        closed outlet, and on backends whose connections only their event
        loop writes (``memory``, ``nng``).

        Two senders are ordered by the caller: a message sent while a
        :meth:`send` from another thread waits may go before it.

        Raises:
            TypeError: a frame is not bytes-like.
            ValueError: as :meth:`send`.
        """

    @abstractmethod
    async def wait_send_might_not_block(self) -> None:
        """Return once :meth:`send` might not wait: every ``RELIABLE`` link has room.

        Like :meth:`trio.abc.SendStream.wait_send_all_might_not_block`: a
        producer that makes its message only then (a camera grabbing a frame)
        sends it fresh instead of letting it age while ``send`` waits. Another
        task's ``send`` may take the room first.

        Raises:
            trio.ClosedResourceError: the outlet is closed, or is closed while
                this call waits.
        """

    @abstractmethod
    async def wait_for_inlets(self, count: int = 1) -> None:
        """Return once at least *count* inlets have connected, counting those
        that have gone since (a sender waiting for its receivers never waits
        for one that came and went).

        Raises:
            trio.ClosedResourceError: the outlet is closed.
        """

    @abstractmethod
    def cut(self, label: str) -> int:
        """End at once every link whose inlet connected with *label*; how many there were.

        For an inlet known to be gone while its connection stays open (its
        process frozen, its machine asleep), which would otherwise hold up
        :meth:`send` on a ``RELIABLE`` link forever: the messages its link
        holds are dropped, :meth:`send` no longer waits for it, and its
        connection is closed. The inlet, if it still reads, receives what had
        arrived, then :exc:`trio.BrokenResourceError`. Inlets with another
        label are unaffected; no inlet with *label* (or a closed outlet) is no
        error: nothing is cut.
        """

    @abstractmethod
    async def aclose(self) -> None:
        """End the stream.

        Every inlet receives every message sent to it under ``RELIABLE``, then
        :exc:`trio.EndOfChannel`. Returns once every inlet has acknowledged the
        end of stream (its endpoint has taken in everything, whether or not the
        application has read it yet), or after ``close_timeout`` seconds, which
        is logged and then ends the remaining links abruptly. If cancelled, the
        outlet is closed abruptly. Closing a closed outlet does nothing.
        """


class Inlet(trio.abc.AsyncResource):
    """The receiving end of one link to an :class:`Outlet`.

    Made by :meth:`Transport.connect`. ``async for frames in inlet:`` receives
    until the end of stream.
    """

    __slots__ = ()

    @property
    @abstractmethod
    def stats(self) -> Stats:
        """A snapshot of the counters of this inlet's link.

        ``messages_received`` counts messages returned by :meth:`receive`;
        ``messages_dropped`` counts every message of the stream this link
        dropped (``LATEST`` only), on either side.
        """

    @abstractmethod
    async def receive(self) -> list[memoryview]:
        """Receive the next message: its frames, in order.

        Always a cancel point; a schedule point when it waits for a message,
        and otherwise once in 16 calls.

        Raises:
            trio.EndOfChannel: the outlet closed the stream and every message
                has been received.
            trio.BrokenResourceError: the link broke (the outlet vanished, or
                spoke something that is not this protocol); the messages that
                arrived before are received first.
            trio.ClosedResourceError: this inlet is closed.
        """

    @property
    def lendable(self) -> bool:
        """Whether :meth:`lend` may lend this inlet to a thread: on a
        ``RELIABLE`` link of the ``tcp`` backend (TCP or Unix sockets), on
        POSIX. Other inlets need their event loop to read."""
        return False

    def lend(self) -> AbstractAsyncContextManager[LentInlet]:
        """Lend this inlet to a thread of the caller's for the ``async with``
        block, which gives the thread a :class:`LentInlet`.

        ``async with inlet.lend() as lent:`` -- meanwhile, the thread's
        :meth:`LentInlet.receive` reads the connection itself, and the
        inlet's own tasks neither read nor write it: a message reaches the
        thread without a wake-up of the event loop, nor a hand-over to the
        thread (1 KB paced at 1 kHz between two processes: about half the
        one-way latency). Credit and the end of stream's acknowledgement go
        back by the same rules, written by the thread.

        Entering waits until the inlet's tasks are between records. Leaving
        interrupts the thread's :meth:`LentInlet.receive` if it waits (it
        returns None), waits until it has returned, and gives the connection
        back to the inlet's tasks: what was read and not received is received
        next, in order, from the event loop. :meth:`aclose` during the block
        does the same first.

        Raises:
            NotImplementedError: the inlet is not :attr:`lendable`.
            trio.BusyResourceError: the inlet is lent, or a task waits in
                :meth:`receive` (and :meth:`receive` raises it while lent).
            trio.ClosedResourceError: the inlet is closed.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot be lent to a thread")

    def __aiter__(self) -> Inlet:
        return self

    async def __anext__(self) -> list[memoryview]:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    @abstractmethod
    async def aclose(self) -> None:
        """Close this inlet. The outlet forgets the link; others are unaffected."""


class LentInlet(ABC):
    """An :class:`Inlet` lent to a thread (see :meth:`Inlet.lend`)."""

    __slots__ = ()

    @abstractmethod
    def receive(self) -> list[memoryview] | None:
        """The next message, waiting for it (blocking the calling thread):
        its frames, in order; None once :meth:`interrupt` was called or the
        loan is over.

        Call it from one thread at a time, not Trio's. An interruption may
        come in the middle of a record: what was read of it is kept, and the
        next read, the thread's or (after the loan) the inlet's tasks',
        goes on with it.

        Raises:
            trio.EndOfChannel: as :meth:`Inlet.receive` (the end of stream
                was acknowledged).
            trio.BrokenResourceError: as :meth:`Inlet.receive`.
            trio.ClosedResourceError: the inlet was closed.
        """

    @abstractmethod
    def interrupt(self) -> None:
        """Make :meth:`receive` return None, now if it waits, and from now on
        (any thread)."""


class Transport(ABC):
    """Makes endpoints of one backend. Get one with :func:`transports.get`."""

    #: The backend's name, as given to :func:`transports.get`.
    name: str
    #: The URL schemes this backend accepts.
    schemes: tuple[str, ...]

    @abstractmethod
    async def bind(
        self,
        address: str,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        key: bytes | None = None,
    ) -> Outlet:
        """Make an :class:`Outlet` listening on *address*.

        With a *key*, only inlets that present the same key (see
        :meth:`connect`) are let in; others are refused at the handshake
        (logged), so that whoever reaches the address cannot read the stream
        nor hold it up. The key travels as it is: it keeps out those who do
        not know it, not those who can read the network.

        Raises:
            ValueError: *address* is malformed or not one of this backend's,
                or *key* is not None or 1 to 64 bytes.
            OSError: the address cannot be bound (in use, no permission...).
        """

    @abstractmethod
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
        """Make an :class:`Inlet` connected to the outlet at *address*.

        Returns once the outlet counts the link: a message sent after this
        returns reaches the inlet.

        *capacity* bounds the messages buffered on the link; *max_bytes*, if
        given, also bounds their bytes: the outlet puts a message on the link
        only while less than *max_bytes* are buffered there (so one message
        always fits). For large messages this keeps the link short, and so
        their latency low: 8 buffered 6 MB frames are 8 frames old.

        *label* names the inlet to the outlet: in its link's
        :class:`LinkStats`, and for :meth:`Outlet.cut`. Several inlets may
        share one. *key* is what the outlet requires, if it was bound with one.

        Raises:
            ValueError: *address* is malformed, *capacity* or *max_bytes* is
                not a positive integer, *delivery* is not a :class:`Delivery`,
                or *label* is not a str of at most 1024 bytes of UTF-8.
            OSError: nothing listens at *address*, or the connection failed.
            trio.BrokenResourceError: the peer does not speak this protocol, or
                refused the link (its key is not *key*).
        """
