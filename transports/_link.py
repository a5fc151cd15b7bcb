"""The two halves of a link, shared by every backend.

A link joins one outlet to one inlet. Its outlet half, :class:`_LinkQueue`,
holds the messages :meth:`Outlet.send` put on the link and not yet
transmitted; its inlet half, :class:`_InletBuffer`, holds the messages that
arrived and that the application has not received yet. Between them, the
inlet grants *credit*: the outlet transmits a message only while fewer than
``capacity`` messages it transmitted are uncredited.

- ``RELIABLE``: the inlet returns a credit when the application receives a
  message, and ``send`` waits while ``pending + in flight`` reaches
  ``capacity``. So at most ``capacity`` messages are buffered on the link, in
  total, wherever they are. (Credit travels in batches of ``capacity // 2``:
  a received message counts as buffered until its batch is returned.)
- ``LATEST``: the inlet returns a credit as soon as a message arrives and keeps
  only the newest ``capacity`` messages; the outlet keeps only the newest
  ``capacity`` messages it could not transmit yet. Both sides count what they
  drop; the inlet tells the outlet its count with every credit.

Sequence numbers (one per message put on the link, from 0) let the inlet count
the messages the outlet dropped, and the end-of-stream record carries the next
sequence number so that drops at the very end are counted too.

Nothing here does I/O: a backend moves messages from one half to the other.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable

import trio

from ._abc import Delivery
from ._framing import ProtocolError
from ._schedule import _SchedulePoints
from ._stats import _Counters

#: An application that takes a RELIABLE link's messages at least this many
#: seconds apart has each credited at once while the outlet waits for
#: credit: the outlet then sends at its pace, not in bursts of a batch (a 30
#: fps camera behind a 5 Hz detector: frames ~170 ms apart, not ~8 at once
#: every ~1.5 s). Faster, credit stays in batches: a sink bound by its CPU
#: took ~15% fewer 1 KB chunks a second with each message credited.
SLOW_TAKES = 0.005


class _LinkQueue:
    """The outlet half of a link.

    *on_change* is called (synchronously) whenever a message is put on the
    link, credit comes back, or the link starts closing.
    """

    def __init__(self, counters: _Counters, on_change: Callable[[], None] | None = None) -> None:
        self.counters = counters
        self.delivery = counters.delivery
        self.capacity = counters.capacity
        self.max_bytes = counters.max_bytes
        #: (sequence number, frames, size in bytes) of messages not yet transmitted.
        self.pending: deque[tuple[int, list[memoryview], int]] = deque()
        #: Their total size in bytes.
        self.pending_bytes = 0
        #: Messages transmitted and not yet credited by the inlet.
        self.in_flight = 0
        #: Their sizes in bytes, oldest first, and their total.
        self._in_flight_sizes: deque[int] = deque()
        self.in_flight_bytes = 0
        self.next_seq = 0
        #: Set by the outlet's close: transmit everything regardless of credit, then end.
        self.closing = False
        #: Set once the inlet has acknowledged the end of stream, or the link broke.
        self.done = trio.Event()
        self._own_dropped = 0
        self._on_change = on_change

    def has_room(self) -> bool:
        """Whether :meth:`put` keeps the link within its bound without dropping."""
        if self.delivery is Delivery.LATEST:
            return True
        if len(self.pending) + self.in_flight >= self.capacity:
            return False
        return self.max_bytes is None or self.pending_bytes + self.in_flight_bytes < self.max_bytes

    def put(self, frames: list[memoryview], nbytes: int) -> None:
        """Put a message on the link (never waits; LATEST drops the oldest pending)."""
        self._append(frames, nbytes)
        self._changed()

    def _append(self, frames: list[memoryview], nbytes: int) -> None:
        """Put a message on the link, saying it to nobody (see :meth:`put`)."""
        self.pending.append((self.next_seq, frames, nbytes))
        self.pending_bytes += nbytes
        self.next_seq += 1
        self.counters.messages_sent += 1
        self.counters.bytes_sent += nbytes
        if self.delivery is Delivery.LATEST and len(self.pending) > self.capacity:
            self.pending_bytes -= self.pending.popleft()[2]
            self._own_dropped += 1
            self.counters.messages_dropped += 1

    def can_transmit(self) -> bool:
        if not self.pending:
            return False
        if self.closing or not self.in_flight:
            return True
        if self.in_flight >= self.capacity:
            return False
        return self.max_bytes is None or self.in_flight_bytes < self.max_bytes

    def can_take_now(self) -> bool:
        """Whether a message may skip the queue: nothing is pending, the link
        is not closing, and :meth:`put` then :meth:`take` would transmit it
        at once, within the link's bound (so, for ``RELIABLE``, there is
        room), with less than half the link's capacity in flight. (A link
        more than half full is under pressure: its room is better spent on
        the batches its task sends. A source sending 1 KB messages as fast
        as its sink takes them made ~8% fewer a second when those sent
        after each wait for credit went alone.)"""
        return (
            not self.pending
            and not self.closing
            and 2 * self.in_flight < self.capacity
            and (self.max_bytes is None or self.in_flight_bytes < self.max_bytes)
        )

    def take_now(self, frames: list[memoryview], nbytes: int) -> tuple[int, list[memoryview], int]:
        """Put a message on the link and take it to transmit at once, as
        :meth:`put` then :meth:`take` would (only if :meth:`can_take_now`);
        *on_change* is not called: nothing waits for what this changes."""
        self._append(frames, nbytes)
        return self.take(1)[0]

    def take(self, limit: int) -> list[tuple[int, list[memoryview], int]]:
        """Take up to *limit* messages that credit allows to transmit now."""
        batch: list[tuple[int, list[memoryview], int]] = []
        while len(batch) < limit and self.can_transmit():
            message = self.pending.popleft()
            self.pending_bytes -= message[2]
            batch.append(message)
            self.in_flight += 1
            self.in_flight_bytes += message[2]
            self._in_flight_sizes.append(message[2])
        return batch

    def credit(self, count: int, inlet_dropped: int) -> None:
        """The inlet took in *count* messages and has dropped *inlet_dropped* in all.

        Raises:
            ProtocolError: the inlet credits more than was transmitted.
        """
        if count > self.in_flight or inlet_dropped < 0:
            raise ProtocolError(f"credit for {count} messages, {self.in_flight} in flight")
        self.in_flight -= count
        for _ in range(count):
            self.in_flight_bytes -= self._in_flight_sizes.popleft()
        self.counters.messages_dropped = self._own_dropped + inlet_dropped
        self._changed()

    def close(self) -> None:
        """Start ending the stream: flush regardless of credit, then end."""
        self.closing = True
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()


class _InletBuffer:
    """The inlet half of a link, and the receive logic of every inlet.

    *on_credit* is called (synchronously) whenever credit is owed to the
    outlet; the backend then calls :meth:`take_credit` and sends it.

    While no task waits in :meth:`receive`, the other methods may be called
    from a thread that is not Trio's (a lent inlet's: see
    :meth:`transports.Inlet.lend`): they then call nothing of Trio's.
    """

    def __init__(self, counters: _Counters, on_credit: Callable[[], None]) -> None:
        self.counters = counters
        self.delivery = counters.delivery
        self.capacity = counters.capacity
        self.max_bytes = counters.max_bytes
        self._on_credit = on_credit
        self._flush = False
        self._messages: deque[tuple[list[memoryview], int]] = deque()
        self._expected_seq = 0
        self._gap_dropped = 0
        self._own_dropped = 0
        self._credit_owed = 0
        #: The bytes of the messages owed credit.
        self._owed_bytes = 0
        #: Credit goes back in batches of this many messages, which halves (or
        #: better) the records and wake-ups it costs. While the application
        #: waits on an empty buffer, fewer than this -- fewer than ``capacity``
        #: -- are uncredited, so the outlet can always transmit. (On a link
        #: bound in bytes, they may hold the outlet up by their bytes: they are
        #: credited as the application waits only once they reach the bound.
        #: Fewer bytes hold it up only with more messages on their way here,
        #: which bring credit once taken. Between two nodes, 1 KB paced at
        #: 1 kHz and credited each as the application waited took ~18 µs
        #: more, in runs that changed the rule every 100 ms.) An
        #: application that takes slowly has its messages credited at once
        #: while the outlet waits for credit (see :meth:`_credit_at_once`).
        #: A LATEST link bound in bytes credits each message as it arrives: its
        #: outlet may wait for the bytes of a single one (and send the newest
        #: only once it may), while the application reads nothing.
        latest_in_bytes = self.delivery is Delivery.LATEST and self.max_bytes is not None
        self.credit_batch = 1 if latest_in_bytes else max(1, self.capacity // 2)
        #: When the application last took a message (at first, when the link
        #: was made; ``time.perf_counter()``), and whether that was at least SLOW_TAKES
        #: after the one before.
        self._taken_at = time.perf_counter()
        self._taking_slowly = False
        self._ended = False
        self._error: BaseException | None = None
        self._closed = False
        self._schedule = _SchedulePoints()
        self._waiters = trio.lowlevel.ParkingLot()

    # --- the backend's side -------------------------------------------------

    def deliver(self, seq: int, frames: list[memoryview], nbytes: int) -> None:
        """A message arrived.

        Raises:
            ProtocolError: the sequence number went back, the stream had ended,
                or a RELIABLE link overflowed its capacity.
        """
        if self._ended or seq < self._expected_seq:
            raise ProtocolError(f"message {seq} out of order (expected {self._expected_seq})")
        full = len(self._messages) >= self.capacity
        # Messages buffered or received, and not credited yet, are in flight
        # for the outlet, which may have at most ``capacity`` in flight.
        if (
            self.delivery is Delivery.RELIABLE
            and len(self._messages) + self._credit_owed >= self.capacity
        ):
            raise ProtocolError(f"the outlet overflowed a link of capacity {self.capacity}")
        self._gap_dropped += seq - self._expected_seq
        self._expected_seq = seq + 1
        if full:
            self._messages.popleft()
            self._own_dropped += 1
        self._messages.append((frames, nbytes))
        if self.delivery is Delivery.LATEST:
            self._owe_credit(nbytes)
        elif self._credit_owed and self._credit_at_once():
            self._on_credit()
        self._count_dropped()
        self._waiters.unpark_all()

    def end(self, next_seq: int) -> None:
        """The outlet ended the stream after putting *next_seq* messages on the link.

        Raises:
            ProtocolError: *next_seq* is lower than a sequence number seen.
        """
        if next_seq < self._expected_seq:
            raise ProtocolError(f"end of stream at {next_seq} after {self._expected_seq}")
        self._gap_dropped += next_seq - self._expected_seq
        self._expected_seq = next_seq
        self._ended = True
        self._count_dropped()
        self._waiters.unpark_all()

    def fail(self, error: BaseException) -> None:
        """The link broke: receive the messages that arrived, then raise *error*."""
        if not self._ended and self._error is None:
            self._error = error
        self._waiters.unpark_all()

    def close(self) -> None:
        self._closed = True
        self._waiters.unpark_all()

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def failed(self) -> bool:
        """Whether the link broke (see :meth:`fail`)."""
        return self._error is not None

    @property
    def own_dropped(self) -> int:
        return self._own_dropped

    @property
    def credit_due(self) -> bool:
        """Whether credit is due: a batch is owed, or some is and must go now
        (see :meth:`take_credit`)."""
        return self._credit_owed >= self.credit_batch or (
            self._credit_owed > 0 and (self._flush or self._credit_at_once())
        )

    def take_credit(self) -> int:
        """The credit due (then it is no longer owed), else 0."""
        if not self.credit_due:
            return 0
        owed, self._credit_owed = self._credit_owed, 0
        self._owed_bytes = 0
        self._flush = False
        return owed

    # --- the application's side ---------------------------------------------

    def take(self) -> list[memoryview] | None:
        """The next message if one arrived (then it is counted, and owed
        credit), else None."""
        if not self._messages:
            return None
        frames, nbytes = self._messages.popleft()
        self.counters.messages_received += 1
        self.counters.bytes_received += nbytes
        if self.delivery is Delivery.RELIABLE:
            now = time.perf_counter()
            self._taking_slowly = now - self._taken_at >= SLOW_TAKES
            self._taken_at = now
            self._owe_credit(nbytes)
        return frames

    def raise_if_over(self) -> None:
        """With no message left to take (see :meth:`take`): raise if none will come.

        Raises:
            trio.EndOfChannel: the stream ended.
            trio.BrokenResourceError: the link broke.
        """
        if self._ended:
            raise trio.EndOfChannel
        if self._error is not None:
            raise trio.BrokenResourceError(str(self._error)) from self._error

    def flush_before_waiting(self) -> None:
        """The application is about to wait for a message: what is owed is
        credited now if its bytes could hold the outlet up. (With fewer bytes
        owed, the outlet waits only if more messages are on their way here:
        credit goes once they are taken.)"""
        if self.max_bytes is not None and self._owed_bytes >= self.max_bytes:
            self._flush = True
            self._on_credit()

    async def receive(self, read: Callable[[], Awaitable[bool]] | None = None) -> list[memoryview]:
        """The next message.

        While there is none, *read*, if given, is called to read from the
        connection in this task; when it returns False (someone else is
        reading), or without *read*, this waits for the backend to deliver.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._closed:
                raise trio.ClosedResourceError("this inlet is closed")
            frames = self.take()
            if frames is not None:
                await self._schedule.maybe_yield()
                return frames
            self.raise_if_over()
            self.flush_before_waiting()
            if self._messages:  # (the memory backend moves the next one at once)
                continue
            if read is None or not await read():
                await self._waiters.park()
                self._schedule.waited()

    # --- helpers ---------------------------------------------------------------

    def _owe_credit(self, nbytes: int) -> None:
        self._credit_owed += 1
        self._owed_bytes += nbytes
        if self._credit_owed >= self.credit_batch or self._credit_at_once():
            self._on_credit()

    def _credit_at_once(self) -> bool:
        """Whether what is owed goes now, not in a batch: the application
        takes a RELIABLE link's messages slowly (:data:`SLOW_TAKES`), and
        the outlet has all it may have in flight (buffered here, or taken and
        not credited), so that it waits for credit."""
        return (
            self._taking_slowly
            and self.delivery is Delivery.RELIABLE
            and len(self._messages) + self._credit_owed >= self.capacity
        )

    def _count_dropped(self) -> None:
        self.counters.messages_dropped = self._gap_dropped + self._own_dropped
