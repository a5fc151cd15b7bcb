"""Outlets and inlets that talk the wire protocol over a :class:`_Conduit`.

The tcp and nng backends differ only in their conduit (how records cross)
and in how an outlet accepts connections; everything else is here.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import trio

from ._abc import Delivery, Inlet, LentInlet, Message
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
    decode_label,
    decode_welcome,
    encode_ack,
    encode_credit,
    encode_end,
    encode_hello,
    encode_label,
    encode_welcome,
)
from ._link import _InletBuffer, _LinkQueue
from ._outlet import _as_frames, _OutletBase
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

    #: Whether :meth:`receive_record` may be cancelled and called again, from
    #: any task, losing nothing; :meth:`wait_readable` is available then.
    resumable_reads = False

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

    async def wait_readable(self) -> None:
        """Wait until :meth:`receive_record` has bytes to go on with."""
        raise NotImplementedError

    #: Whether :meth:`fileno` and :meth:`receive_record_blocking` are
    #: available: a thread may read and write the connection while no task
    #: does (an inlet lent to it).
    lendable = False

    def fileno(self) -> int:
        """The connection's file descriptor (-1 once closed)."""
        raise NotImplementedError

    def receive_record_blocking(self, wait: Callable[[], None]) -> Record | None:
        """:meth:`receive_record` for a thread that is not Trio's, calling
        *wait* to wait for the connection to be readable (see
        :meth:`StreamReader.read_record_blocking`)."""
        raise NotImplementedError

    @abstractmethod
    async def aclose(self) -> None:
        """Close the connection (at once; must not block)."""


async def _close_conduit(conduit: _Conduit) -> None:
    with trio.CancelScope(shield=True):
        try:
            await conduit.aclose()
        except Exception:  # already broken: nothing more to release
            log.debug("closing %s", conduit.peer, exc_info=True)


class _Writer(ABC):
    """Writes one side's records on a conduit: from a task of its own, or at once.

    The task (:meth:`run`) writes whatever there is, then waits to be poked.
    While it waits, :meth:`poke` -- called by whichever task made something
    writable -- writes at once, as far as the connection takes it without
    waiting, if the conduit can (``eager``): small messages and credit then
    cost no task wake-up. What the connection did not take is left to the
    task, which writes it before anything else.
    """

    def __init__(self, conduit: _Conduit) -> None:
        self._conduit = conduit
        #: Whether the task waits to be poked (so nothing else is being written).
        self._idle = False
        self._rest: list[memoryview] = []
        self._wake = trio.lowlevel.ParkingLot()
        #: Where :meth:`wait_quiet` waits, and whether the task has ended.
        self._quiet = trio.lowlevel.ParkingLot()
        self._ended = False

    def poke(self) -> None:
        """Something may have become writable: write it now, or wake the task for it."""
        if not self._idle:
            return  # the task is busy and looks again when done
        if self._conduit.eager:
            self._rest = self._write_now()
        if self._rest or self._has_work():
            self._idle = False
            self._wake.unpark_all()

    async def run(self) -> None:
        """Write until cancelled."""
        try:
            while True:
                if self._rest:
                    rest, self._rest = self._rest, []
                    await self._conduit.send_rest(rest)
                elif not await self._write_next():
                    self._idle = True
                    self._quiet.unpark_all()
                    try:
                        await self._wake.park()
                    finally:
                        self._idle = False
        finally:
            self._ended = True
            self._quiet.unpark_all()

    async def wait_quiet(self) -> None:
        """Wait until the task waits to be poked with nothing left to write,
        or has ended: until it is poked again, someone else may write the
        conduit."""
        while not self._ended and (not self._idle or self._rest):
            await self._quiet.park()

    def resume(self, rest: list[memoryview]) -> None:
        """Go on after someone else wrote the conduit (see :meth:`wait_quiet`),
        writing *rest*, the end of their last record, first."""
        if rest:
            self._rest = rest
            self._idle = False
            self._wake.unpark_all()
        else:
            self.poke()

    @abstractmethod
    def _write_now(self) -> list[memoryview]:
        """Write what should go at once with the conduit's ``write_*_now``; return the rest."""

    @abstractmethod
    def _has_work(self) -> bool:
        """Whether :meth:`_write_next` has something to write."""

    @abstractmethod
    async def _write_next(self) -> bool:
        """Write the next thing, if any; whether there was one."""


class _Transmitter(_Writer):
    """Moves the messages of one link onto its conduit, then the end of stream.

    A small message (:data:`EAGER_LIMIT`) put on an idle link goes at once,
    and the link's task is woken anyway: messages put before it runs -- that
    is, before the sending task's next schedule point -- gather, and the task
    writes them together. A paced message thus leaves without waiting for a
    task switch, while a burst of small messages costs one write per few
    messages instead of one each, and wakes the receiver less often
    (measured at 1 KB: a quarter less CPU per message on each side). Larger
    messages, and the end of stream, always go from the task.

    Another thread may write a message at once too (:meth:`write_at_once`),
    while the task waits. Whatever changes the link, or writes, holds the
    outlet's lock then: :meth:`poke` is called by the link's changes, which
    do.
    """

    def __init__(self, conduit: _Conduit) -> None:
        super().__init__(conduit)
        self.link: _LinkQueue | None = None
        #: Set by a write at once, until the task has run.
        self._wrote_now = False
        self._token = trio.lowlevel.current_trio_token()

    @property
    def writes_at_once(self) -> bool:
        """Whether :meth:`write_at_once` may write now: the conduit can, and
        the task waits with nothing left to write."""
        return self._idle and self._conduit.eager

    def write_at_once(self, message: tuple[int, list[memoryview], int]) -> None:
        """Write *message* (taken off the link) now, from any thread, if
        :attr:`writes_at_once`; what the connection does not take, the task
        writes next."""
        rest = self._conduit.write_messages_now([message])
        if rest:
            self._rest = rest
            self._idle = False
            try:
                self._token.run_sync_soon(self._wake.unpark_all)
            except trio.RunFinishedError:  # (the link is gone with its event loop)
                pass

    def _write_now(self) -> list[memoryview]:
        link = self.link
        if link is None or link.closing or not link.can_transmit():
            return []
        if link.pending_bytes > EAGER_LIMIT:
            return []
        self._wrote_now = True
        return self._conduit.write_messages_now(link.take(BATCH))

    def _has_work(self) -> bool:
        link = self.link
        return self._wrote_now or (link is not None and (link.closing or link.can_transmit()))

    async def _write_next(self) -> bool:
        self._wrote_now = False
        link = self.link
        assert link is not None  # (set before the task runs)
        if batch := link.take(BATCH):
            await self._conduit.send_messages(batch)
            return True
        if link.closing:
            await self._conduit.send_record(encode_end(link.next_seq))
            await trio.sleep_forever()  # until the inlet acknowledges
        return False


class _CreditWriter(_Writer):
    """Returns an inlet's credit to its outlet, then acknowledges the end of stream."""

    def __init__(self, conduit: _Conduit) -> None:
        super().__init__(conduit)
        self.buffer: _InletBuffer | None = None
        #: Set once the end of stream has been taken in.
        self.ack_due = False

    def _write_now(self) -> list[memoryview]:
        buffer = self.buffer
        if buffer is None or not (count := buffer.take_credit()):
            return []
        return self._conduit.write_record_now(encode_credit(count, buffer.own_dropped))

    def _has_work(self) -> bool:
        return self.buffer is not None and (self.buffer.credit_due or self.ack_due)

    async def _write_next(self) -> bool:
        buffer = self.buffer
        assert buffer is not None  # (set before the task runs)
        if count := buffer.take_credit():
            await self._conduit.send_record(encode_credit(count, buffer.own_dropped))
        elif self.ack_due:
            self.ack_due = False
            await self._conduit.send_record(encode_ack(buffer.own_dropped))
        else:
            return False
        return True


class _NetOutlet(_OutletBase):
    """An outlet serving each connected inlet from its background tasks."""

    def __init__(
        self,
        address: str,
        max_frame_size: int,
        close_timeout: float,
        background: _Background,
        key: bytes | None = None,
    ) -> None:
        super().__init__(address, max_frame_size, close_timeout, key)
        self._background = background
        #: Each link's transmitter, for :meth:`send_now`.
        self._transmitters: dict[_LinkQueue, _Transmitter] = {}

    def send_now(self, message: Message) -> bool:
        frames, nbytes = _as_frames(message, self._max_frame_size)
        if nbytes > EAGER_LIMIT:
            return False
        with self._lock:
            if self._closed or not self._links:
                return False
            writers = []
            for link in self._links:
                writer = self._transmitters.get(link)
                if writer is None or not writer.writes_at_once or not link.can_take_now():
                    return False
                writers.append(writer)
            for link, writer in zip(self._links, writers, strict=True):
                writer.write_at_once(link.take_now(frames, nbytes))
            self._messages_sent += 1
            self._bytes_sent += nbytes
        return True

    async def _serve_link(self, conduit: _Conduit) -> None:
        """Handshake with a new connection, then run its link until it ends (or is cut)."""
        link = None
        label = ""
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                delivery, capacity, max_bytes, label_size, key_size = decode_hello(
                    await conduit.receive_handshake(HELLO_SIZE)
                )
                if label_size:
                    label = decode_label(await conduit.receive_handshake(label_size))
                key = None
                if key_size:
                    key = bytes(await conduit.receive_handshake(key_size))
            if self._closed:
                return
            if not self._admits(key):
                log.warning(
                    "%s: inlet %s (%r) refused: %s",
                    self._address,
                    conduit.peer,
                    label,
                    "a wrong key" if key else "no key",
                )
                return
            transmitter = _Transmitter(conduit)
            running = trio.CancelScope()  # cancelled by cut()
            link = self._new_link(
                conduit.peer,
                delivery,
                capacity,
                max_bytes,
                transmitter.poke,
                label=label,
                on_cut=running.cancel,
            )
            transmitter.link = link
            self._transmitters[link] = transmitter
            with running:
                await conduit.send_record(encode_welcome())
                log.debug(
                    "%s: inlet %s %r connected (%s, %d)",
                    self._address,
                    conduit.peer,
                    label,
                    delivery.value,
                    capacity,
                )
                await first_completed(transmitter.run, partial(self._take_credit, link, conduit))
        except trio.TooSlowError:
            log.warning("%s: %s did not complete the handshake", self._address, conduit.peer)
        except _LINK_ERRORS as exc:
            # (While the outlet closes, its inlets may be closing too: no news.)
            log.log(
                logging.DEBUG if self._closed else logging.WARNING,
                "%s: link to %s%s ended: %s",
                self._address,
                conduit.peer,
                f" ({label!r})" if label else "",
                exc or repr(exc),
            )
        finally:
            if link is not None:
                self._drop_link(link)
                self._transmitters.pop(link, None)
            await _close_conduit(conduit)

    async def _take_credit(self, link: _LinkQueue, conduit: _Conduit) -> None:
        while True:
            record = await conduit.receive_record()
            if record is None:
                log.debug("%s: inlet %s left", self._address, conduit.peer)
                return
            kind, fixed, _ = record
            if kind == KIND_CREDIT:
                with self._lock:
                    link.credit(*fixed)
            elif kind == KIND_ACK and link.closing:
                with self._lock:
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
    """An inlet whose background tasks read records and send credit.

    On a ``RELIABLE`` link over a conduit with resumable reads, a task that
    waits in :meth:`receive` reads the connection itself, so that a message
    reaches it without a task switch (1 KB paced at 1 kHz between two
    ``async def`` nodes: p50 ~260 -> ~240 µs). The background task reads
    while no receiver does, so the end of stream is taken in and
    acknowledged whether or not the application receives. The two take
    turns: a receiver reads only while the background task waits for data
    (which it then stops doing at once), never while it is midway through a
    record. A ``LATEST`` link is always read by the background task: only a
    reader that keeps taking in knows which messages are the newest.

    Lent to a thread (:meth:`lend`), the inlet's tasks neither read nor
    write: the thread reads records and writes credit (:meth:`_receive_lent`);
    the buffer's word that credit is due reaches no task meanwhile.
    """

    def __init__(self, conduit: _Conduit, background: _Background, counters: _Counters) -> None:
        self._conduit = conduit
        self._background = background
        self._credit = _CreditWriter(conduit)
        self._buffer = _InletBuffer(counters, self._credit_due)
        self._credit.buffer = self._buffer
        self._closed = False
        self._direct = conduit.resumable_reads and counters.delivery is Delivery.RELIABLE
        #: Which task is reading a record: a receiver, or the background task.
        self._receiver_reads = False
        self._background_reads = False
        #: The background task's wait for data, which a receiver cancels.
        self._waiting = trio.CancelScope()
        #: Where the background task waits while a receiver reads, or the inlet is lent.
        self._turn = trio.lowlevel.ParkingLot()
        #: The thread's side of the loan, while the inlet is lent (see :meth:`lend`).
        self._loan: _Loan | None = None
        #: Tasks in :meth:`receive`.
        self._receivers = 0
        #: Where :meth:`lend` waits for the background task to finish its record.
        self._between = trio.lowlevel.ParkingLot()

    @classmethod
    async def open(
        cls,
        conduit: _Conduit,
        address: str,
        delivery: Delivery,
        capacity: int,
        max_bytes: int | None = None,
        label: str = "",
        key: bytes | None = None,
    ) -> _NetInlet:
        """Handshake over *conduit* and start the inlet's tasks.

        Raises:
            trio.BrokenResourceError: the peer does not speak the protocol, or
                did not answer within :data:`HANDSHAKE_TIMEOUT`.
        """
        try:
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    hello = encode_hello(delivery, capacity, max_bytes, label, key or b"")
                    await conduit.send_record(hello)
                    if label:
                        await conduit.send_record(encode_label(label))
                    if key:
                        await conduit.send_record(key)
                    decode_welcome(await conduit.receive_handshake(WELCOME_SIZE))
            except ProtocolError as exc:
                raise trio.BrokenResourceError(
                    f"{address}: {exc} (not an outlet, or one that refused this inlet: a key?)"
                ) from exc
            except trio.TooSlowError as exc:
                raise trio.BrokenResourceError(f"{address}: no answer to the handshake") from exc
            background = await _Background.open(f"inlet from {address}")
        except BaseException:
            await _close_conduit(conduit)
            raise
        counters = _Counters(address, delivery, capacity, max_bytes, label=label)
        inlet = cls(conduit, background, counters)
        background.start_soon(inlet._run)
        return inlet

    @property
    def stats(self) -> Stats:
        return _inlet_stats(self._buffer.counters)

    async def receive(self) -> list[memoryview]:
        if self._loan is not None:
            raise trio.BusyResourceError("this inlet is lent to a thread")
        self._receivers += 1
        try:
            return await self._buffer.receive(self._read_record if self._direct else None)
        finally:
            self._receivers -= 1

    @property
    def lendable(self) -> bool:
        return self._direct and self._conduit.lendable

    @asynccontextmanager
    async def lend(self) -> AsyncIterator[LentInlet]:
        if not self.lendable:
            raise NotImplementedError(
                "only a RELIABLE inlet of the tcp backend can be lent to a thread"
            )
        if self._closed:
            raise trio.ClosedResourceError("this inlet is closed")
        if self._loan is not None or self._receivers:
            raise trio.BusyResourceError("this inlet is lent, or a task receives from it")
        loan = self._loan = _Loan(self)
        try:
            self._waiting.cancel()  # (if the background task waits for data, it stops)
            while self._background_reads:
                await self._between.park()
            await self._credit.wait_quiet()
            yield loan
        finally:
            await self._end_loan(loan)

    async def _end_loan(self, loan: _Loan) -> None:
        """End *loan*, once its thread is out of :meth:`_Loan.receive`, and
        give the connection back to the inlet's tasks."""
        if self._loan is not loan:
            return  # (ended already)
        with trio.CancelScope(shield=True):
            with trio.move_on_after(LOAN_END_TIMEOUT):
                await loan.end()
        if not loan.ended:
            # (Never seen: receive waits for nothing but the connection and
            # the interruption.) The connection stays the thread's.
            log.error(
                "inlet from %s: the thread it was lent to did not give it back",
                self._buffer.counters.peer,
            )
            return
        self._loan = None
        self._credit.resume(loan.unwritten)
        self._turn.unpark_all()

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        if self._loan is not None:
            await self._end_loan(self._loan)
        self._buffer.close()
        await self._background.aclose()

    def _credit_due(self) -> None:
        """Credit is owed (or the end of stream's acknowledgement): for the
        credit writer to write, or, while the inlet is lent, the thread."""
        if self._loan is None:
            self._credit.poke()

    def _receive_lent(self, loan: _Loan) -> list[memoryview] | None:
        """:meth:`_Loan.receive`, on the thread the inlet is lent to."""
        buffer = self._buffer
        try:
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("this inlet is closed")
                frames = buffer.take()
                self._write_due(loan)
                if frames is not None:
                    return frames
                buffer.raise_if_over()
                buffer.flush_before_waiting()
                self._write_due(loan)
                try:
                    self._take(self._conduit.receive_record_blocking(loan.wait_readable))
                except _LINK_ERRORS as exc:
                    self._broken(exc)
        except _Interrupted:
            if self._closed:
                raise trio.ClosedResourceError("this inlet is closed") from None
            return None

    def _write_due(self, loan: _Loan) -> None:
        """Write the credit and acknowledgement due, on the thread the inlet
        is lent to (or, once it is interrupted, leave them to the credit
        writer: see :attr:`_Loan.unwritten`)."""
        buffer = self._buffer
        try:
            if count := buffer.take_credit():
                loan.write(encode_credit(count, buffer.own_dropped))
            if self._credit.ack_due:
                self._credit.ack_due = False
                loan.write(encode_ack(buffer.own_dropped))
        except _Interrupted:  # (a message taken is still returned)
            pass
        except OSError as exc:
            self._broken(exc)

    async def _run(self) -> None:
        try:
            await first_completed(self._take_in, self._credit.run)
        except _LINK_ERRORS as exc:
            self._broken(exc)
        finally:
            await _close_conduit(self._conduit)

    def _broken(self, exc: BaseException) -> None:
        peer = self._buffer.counters.peer
        if self._buffer.ended:  # only the acknowledgement was lost
            log.debug("inlet from %s: after the end of stream: %r", peer, exc)
        elif not self._closed:
            log.warning("inlet from %s: link broken: %s", peer, exc or repr(exc))
            self._buffer.fail(exc)

    async def _take_in(self) -> None:
        """Read records until the connection ends (in turns with receivers)."""
        while not self._buffer.failed:
            if self._receiver_reads or self._loan is not None:
                await self._turn.park()
                continue
            if self._direct:
                with trio.CancelScope() as self._waiting:
                    await self._conduit.wait_readable()
                if self._waiting.cancel_called:
                    continue  # a receiver took the turn (and may have read what came)
            self._background_reads = True
            try:
                record = await self._conduit.receive_record()
            finally:
                self._background_reads = False
                self._between.unpark_all()  # (a lend() waits, or the loan it waited for ended)
            if not self._take(record):
                return

    async def _read_record(self) -> bool:
        """Read a record in this task (a receiver's), if it is its turn;
        whether it was (if not, the background task is reading one)."""
        if self._receiver_reads or self._background_reads:
            return False
        self._receiver_reads = True
        self._waiting.cancel()  # if the background task waits for data, it stops at once
        try:
            self._take(await self._conduit.receive_record())
        except _LINK_ERRORS as exc:
            self._broken(exc)
        finally:
            self._receiver_reads = False
            self._turn.unpark_all()
        return True

    def _take(self, record: Record | None) -> bool:
        """Take in a record read; False once the connection has ended after the stream.

        Raises:
            trio.BrokenResourceError: the connection ended before the stream.
            ProtocolError: the record is not one an outlet sends.
        """
        buffer = self._buffer
        if record is None:
            if buffer.ended:
                return False
            raise trio.BrokenResourceError("the outlet went away without ending the stream")
        kind, fixed, frames = record
        if kind == KIND_MESSAGE:
            buffer.deliver(fixed[0], frames, sum([frame.nbytes for frame in frames]))
        elif kind == KIND_END:
            buffer.end(fixed[0])
            self._credit.ack_due = True
            self._credit_due()
        else:
            raise ProtocolError(f"unexpected record of kind {kind} from an outlet")
        return True


#: Longest wait, when a loan ends, for the thread to return from receive.
LOAN_END_TIMEOUT = 5.0


class _Interrupted(Exception):
    """A lent inlet's thread was interrupted while it waited (see :class:`_Loan`)."""


class _Loan(LentInlet):
    """The thread's side of a lent :class:`_NetInlet`: it waits for the
    connection with ``poll``, alongside a wake-up socket that
    :meth:`interrupt` writes to."""

    def __init__(self, inlet: _NetInlet) -> None:
        self._inlet = inlet
        self._wake_in, self._wake_out = socket.socketpair()
        self._wake_in.setblocking(False)
        self._wake_out.setblocking(False)
        self._lock = threading.Lock()
        #: Whether the thread is in receive, and whether the loan is over.
        self._inside = False
        self._over = False
        self._interrupted = False
        #: Set once the thread is out of receive, the loan over.
        self._left = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        #: Waiting for the connection to be readable, and writable (made on first use).
        self._readable: select.poll | None = None
        self._writable: select.poll | None = None
        #: What the thread, interrupted, did not write of its records (in order).
        self.unwritten: list[memoryview] = []

    def receive(self) -> list[memoryview] | None:
        with self._lock:
            if self._over:
                if self._inlet._closed:
                    raise trio.ClosedResourceError("this inlet is closed")
                return None
            self._inside = True
        try:
            return self._inlet._receive_lent(self)
        finally:
            with self._lock:
                self._inside = False
                over = self._over
            if over:
                try:
                    self._token.run_sync_soon(self._left.set)
                except trio.RunFinishedError:  # (nobody waits any more)
                    pass

    def interrupt(self) -> None:
        self._interrupted = True
        try:
            self._wake_out.send(b"\0")
        except OSError:  # full (so it is readable already), or the loan is over
            pass

    @property
    def ended(self) -> bool:
        """Whether :meth:`end` is done: the thread is out of receive for good."""
        return self._left.is_set()

    async def end(self) -> None:
        """End the loan: interrupt the thread, and wait until it is out of receive."""
        with self._lock:
            self._over = True
            inside = self._inside
        self.interrupt()
        if not inside:
            self._left.set()
        await self._left.wait()
        self._wake_in.close()
        self._wake_out.close()

    def wait_readable(self) -> None:
        """Wait until the connection is readable (on the thread).

        Raises:
            _Interrupted: :meth:`interrupt` was called.
        """
        if self._readable is None:
            self._readable = self._poll(select.POLLIN)
        self._wait(self._readable)

    def write(self, data: bytes) -> None:
        """Write *data*, a record, on the connection, waiting for room if it
        must (on the thread).

        Raises:
            _Interrupted: :meth:`interrupt` was called while it waited; the
                rest is in :attr:`unwritten`.
            OSError: the connection broke.
        """
        view = memoryview(data)
        if self.unwritten:  # (after what is left of the record before)
            self.unwritten.append(view)
            raise _Interrupted
        fd = self._inlet._conduit.fileno()
        while True:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                pass
            if not view:
                return
            if self._writable is None:
                self._writable = self._poll(select.POLLOUT)
            try:
                self._wait(self._writable)
            except _Interrupted:
                self.unwritten.append(view)
                raise

    def _poll(self, events: int) -> select.poll:
        poll = select.poll()
        poll.register(self._inlet._conduit.fileno(), events)
        poll.register(self._wake_in, select.POLLIN)
        return poll

    def _wait(self, poll: select.poll) -> None:
        if self._interrupted:
            raise _Interrupted
        wake = self._wake_in.fileno()
        for fd, _ in poll.poll():
            if fd == wake:
                raise _Interrupted
