"""Outlets and inlets that talk the wire protocol over a :class:`_Conduit`.

The tcp and nng backends differ only in their conduit (how records cross)
and in how an outlet accepts connections; everything else is here.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from functools import partial

import trio

from ._abc import Delivery, Inlet
from ._background import _Background, first_completed
from ._framing import (
    HELLO_SIZE,
    KIND_ACK,
    KIND_CREDIT,
    KIND_END,
    KIND_MESSAGE,
    WELCOME_SIZE,
    ProtocolError,
    decode_hello,
    decode_welcome,
    encode_ack,
    encode_credit,
    encode_end,
    encode_hello,
    encode_welcome,
)
from ._link import _InletBuffer, _LinkQueue
from ._outlet import _OutletBase
from ._stats import Stats, _Counters, _inlet_stats

log = logging.getLogger("transports")

#: How long either side waits for the other's half of the handshake.
HANDSHAKE_TIMEOUT = 10.0
#: Most messages an outlet writes to a link in one go.
BATCH = 64
#: Messages pending on an idle link up to this many bytes in all are written
#: by ``send`` itself, as far as the connection takes them without waiting
#: (see :class:`_Transmitter`).
EAGER_LIMIT = 64 * 1024

#: What a broken link raises below the protocol: reported, never propagated.
_LINK_ERRORS = (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)

Record = tuple[int, tuple[int, ...], list[memoryview]]


class _Conduit(ABC):
    """One connection, carrying records of the wire protocol."""

    #: The other end, as a printable address.
    peer: str

    #: Whether the ``write_*_now`` methods are available: a conduit that
    #: can write without waiting, from any task, while no send is under way.
    eager = False

    @abstractmethod
    async def send_messages(self, batch: list[tuple[int, list[memoryview], int]]) -> None:
        """Write MESSAGE records for (seq, frames, nbytes) in *batch*."""

    def write_messages_now(
        self, batch: list[tuple[int, list[memoryview], int]]
    ) -> list[memoryview]:
        """Write what the connection takes of *batch* without waiting; return the rest.

        The rest, if any, must go to :meth:`send_rest` before anything else is
        sent. Never raises: a broken connection shows on the next send.
        """
        raise NotImplementedError

    def write_record_now(self, data: bytes) -> list[memoryview]:
        """Like :meth:`write_messages_now`, for one encoded record."""
        raise NotImplementedError

    async def send_rest(self, rest: list[memoryview]) -> None:
        """Write what a ``write_*_now`` method left."""
        raise NotImplementedError

    @abstractmethod
    async def send_record(self, data: bytes) -> None:
        """Write one encoded handshake or fixed-size record."""

    @abstractmethod
    async def receive_handshake(self, size: int) -> bytes:
        """Read the peer's handshake of *size* bytes. Raises ProtocolError otherwise."""

    @abstractmethod
    async def receive_record(self) -> Record | None:
        """Read the next record, or None when the peer closed the connection."""

    @abstractmethod
    async def aclose(self) -> None:
        """Close the connection (at once; must not block)."""


async def _close_conduit(conduit: _Conduit) -> None:
    with trio.CancelScope(shield=True):
        try:
            await conduit.aclose()
        except Exception:  # already broken: nothing more to release
            log.debug("closing %s", conduit.peer, exc_info=True)


class _Transmitter:
    """Moves the messages of one link onto its conduit.

    Its task (:meth:`run`) writes whatever credit lets through, then the end
    of stream. While the task is idle, a few small messages that become
    transmittable (put by ``send``, or let through by credit) are written at
    once by whoever changed the link, as far as the connection takes them
    without waiting: no task wakes up for them. What the connection did not
    take is left to the task, which writes it before anything else.
    """

    def __init__(self, conduit: _Conduit) -> None:
        self._conduit = conduit
        self.link: _LinkQueue | None = None
        #: Whether the task waits for work (so nothing else is being written).
        self._idle = False
        self._rest: list[memoryview] = []
        self._wake = trio.lowlevel.ParkingLot()

    def changed(self) -> None:
        """The link changed: write at once, wake the task, or leave it to the task."""
        link = self.link
        if not self._idle or link is None:
            return  # the task is busy and looks at the link again when done
        if link.closing:
            self._wake_task()
        elif link.can_transmit():
            if self._conduit.eager and link.pending_bytes <= EAGER_LIMIT:
                self._rest = self._conduit.write_messages_now(link.take(BATCH))
                if self._rest:
                    self._wake_task()
            else:
                self._wake_task()

    def _wake_task(self) -> None:
        self._idle = False
        self._wake.unpark_all()

    async def run(self) -> None:
        """Transmit until the end of stream is written, then wait to be cancelled."""
        link = self.link
        conduit = self._conduit
        while True:
            if self._rest:
                rest, self._rest = self._rest, []
                await conduit.send_rest(rest)
            elif batch := link.take(BATCH):
                await conduit.send_messages(batch)
            elif link.closing:
                await conduit.send_record(encode_end(link.next_seq))
                await trio.sleep_forever()  # until the inlet acknowledges
            else:
                self._idle = True
                try:
                    await self._wake.park()
                finally:
                    self._idle = False


class _NetOutlet(_OutletBase):
    """An outlet serving each connected inlet from its background tasks."""

    def __init__(
        self, address: str, max_frame_size: int, close_timeout: float, background: _Background
    ) -> None:
        super().__init__(address, max_frame_size, close_timeout)
        self._background = background

    async def _serve_link(self, conduit: _Conduit) -> None:
        """Handshake with a new connection, then run its link until it ends."""
        link = None
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                delivery, capacity = decode_hello(await conduit.receive_handshake(HELLO_SIZE))
            if self._closed:
                return
            transmitter = _Transmitter(conduit)
            link = self._new_link(conduit.peer, delivery, capacity, transmitter.changed)
            transmitter.link = link
            await conduit.send_record(encode_welcome())
            log.debug(
                "%s: inlet %s connected (%s, %d)",
                self._address,
                conduit.peer,
                delivery.value,
                capacity,
            )
            await first_completed(transmitter.run, partial(self._take_credit, link, conduit))
        except trio.TooSlowError:
            log.warning("%s: %s did not complete the handshake", self._address, conduit.peer)
        except _LINK_ERRORS as exc:
            log.warning("%s: link to %s ended: %s", self._address, conduit.peer, exc or repr(exc))
        finally:
            if link is not None:
                self._drop_link(link)
            await _close_conduit(conduit)

    async def _take_credit(self, link: _LinkQueue, conduit: _Conduit) -> None:
        while True:
            record = await conduit.receive_record()
            if record is None:
                log.debug("%s: inlet %s left", self._address, conduit.peer)
                return
            kind, fixed, _ = record
            if kind == KIND_CREDIT:
                link.credit(*fixed)
            elif kind == KIND_ACK and link.closing:
                link.credit(0, fixed[0])
                return
            else:
                raise ProtocolError(f"unexpected record of kind {kind} from an inlet")

    async def _shutdown(self) -> None:
        await self._background.aclose()
        await self._release()

    @abstractmethod
    async def _release(self) -> None:
        """Release the listening resources (after every task has stopped)."""


class _NetInlet(Inlet):
    """An inlet whose background tasks read records and send credit."""

    def __init__(self, conduit: _Conduit, background: _Background, counters: _Counters) -> None:
        self._conduit = conduit
        self._background = background
        self._buffer = _InletBuffer(counters, self._owe_credit)
        self._ack_due = False
        self._closed = False
        # Like an outlet's _Transmitter: credit is written at once by the task
        # that owes it while _give_credit waits; what the connection does not
        # take is left to _give_credit, which writes it before anything else.
        self._credit_idle = False
        self._credit_rest: list[memoryview] = []
        self._credit_due = trio.lowlevel.ParkingLot()

    @classmethod
    async def open(
        cls, conduit: _Conduit, address: str, delivery: Delivery, capacity: int
    ) -> _NetInlet:
        """Handshake over *conduit* and start the inlet's tasks.

        Raises:
            trio.BrokenResourceError: the peer does not speak the protocol, or
                did not answer within :data:`HANDSHAKE_TIMEOUT`.
        """
        try:
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    await conduit.send_record(encode_hello(delivery, capacity))
                    decode_welcome(await conduit.receive_handshake(WELCOME_SIZE))
            except ProtocolError as exc:
                raise trio.BrokenResourceError(f"{address}: {exc}") from exc
            except trio.TooSlowError as exc:
                raise trio.BrokenResourceError(f"{address}: no answer to the handshake") from exc
            background = await _Background.open(f"inlet from {address}")
        except BaseException:
            await _close_conduit(conduit)
            raise
        inlet = cls(conduit, background, _Counters(address, delivery, capacity))
        background.start_soon(inlet._run)
        return inlet

    @property
    def stats(self) -> Stats:
        return _inlet_stats(self._buffer.counters)

    async def receive(self) -> list[memoryview]:
        return await self._buffer.receive()

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._buffer.close()
        await self._background.aclose()

    async def _run(self) -> None:
        peer = self._buffer.counters.peer
        try:
            await first_completed(self._take_in, self._give_credit)
        except _LINK_ERRORS as exc:
            if self._buffer.ended:  # only the acknowledgement was lost
                log.debug("inlet from %s: after the end of stream: %r", peer, exc)
            else:
                log.warning("inlet from %s: link broken: %s", peer, exc or repr(exc))
                self._buffer.fail(exc)
        finally:
            await _close_conduit(self._conduit)

    async def _take_in(self) -> None:
        buffer = self._buffer
        while True:
            record = await self._conduit.receive_record()
            if record is None:
                if buffer.ended:
                    return
                raise trio.BrokenResourceError("the outlet went away without ending the stream")
            kind, fixed, frames = record
            if kind == KIND_MESSAGE:
                buffer.deliver(fixed[0], frames, sum([frame.nbytes for frame in frames]))
            elif kind == KIND_END:
                buffer.end(fixed[0])
                self._ack_due = True
                self._wake_credit_task()
            else:
                raise ProtocolError(f"unexpected record of kind {kind} from an outlet")

    def _owe_credit(self) -> None:
        """A batch of credit is owed: write it now, or have _give_credit write it."""
        if not self._credit_idle:
            return  # _give_credit is busy and looks again when done
        if self._conduit.eager:
            count = self._buffer.take_credit()
            if count:
                data = encode_credit(count, self._buffer.own_dropped)
                self._credit_rest = self._conduit.write_record_now(data)
                if not self._credit_rest:
                    return
        self._wake_credit_task()

    def _wake_credit_task(self) -> None:
        self._credit_idle = False
        self._credit_due.unpark_all()

    async def _give_credit(self) -> None:
        buffer = self._buffer
        conduit = self._conduit
        while True:
            if self._credit_rest:
                rest, self._credit_rest = self._credit_rest, []
                await conduit.send_rest(rest)
            elif count := buffer.take_credit():
                await conduit.send_record(encode_credit(count, buffer.own_dropped))
            elif self._ack_due:
                self._ack_due = False
                await conduit.send_record(encode_ack(buffer.own_dropped))
            else:
                self._credit_idle = True
                try:
                    await self._credit_due.park()
                finally:
                    self._credit_idle = False
