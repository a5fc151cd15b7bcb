"""The thread a node's code runs on, and the steps in flight on it.

A node's ``prep``, ``step`` and ``teardown`` may block (a camera, a model, a
file), so they never run on the Trio thread. They run, in order, on one
thread of the node's own (:class:`UserThread`): code that needs the same
thread every time (OpenCV windows, some camera SDKs) works, and handing a
step over costs no thread start-up. A round trip to a thread costs ~90 µs on
a 2-core VM (``trio.to_thread.run_sync``: ~110-180 µs), more than a 1 KB
chunk's whole journey, so steps do not wait for each other: up to
:data:`STEPS_IN_FLIGHT` are queued on the thread while the Trio thread
receives the next chunks and sends the results (:class:`Steps`; measured at
1 KB: 2.9k -> 4k chunks/s between two nodes).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

__all__ = ["STEPS_IN_FLIGHT", "Steps", "UserThread"]

#: Steps handed to a node's thread and not yet sent on, at most.
STEPS_IN_FLIGHT = 4

#: What a call on the thread gives back: (value, None) or (None, exception).
Result = tuple[Any, BaseException | None]


class UserThread:
    """Runs calls in order on one thread of its own; each result comes back to Trio.

    Start it from the Trio thread (:meth:`start`); :meth:`close` lets it end
    once the calls queued before are done.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=f"chimera-node-{name}", daemon=True)
        self._token: trio.lowlevel.TrioToken | None = None

    def start(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._thread.start()

    def submit(self, fn: Callable[..., Any], args: tuple, done: Callable[[Result], None]) -> None:
        """Queue ``fn(*args)``; *done* gets its result, in the Trio thread."""
        self._jobs.put((fn, args, done))

    async def call(self, fn: Callable[..., Any], *args: Any, abandon: bool = False) -> Any:
        """``fn(*args)`` on the thread, once the calls queued before are done; its result.

        Not cancellable (the call finishes first), unless *abandon*: then a
        cancellation returns at once and leaves the call to finish alone.

        Raises:
            Exception: whatever *fn* raised.
        """
        finished = trio.Event()
        result: list[Result] = []

        def done(outcome: Result) -> None:
            result.append(outcome)
            finished.set()

        self.submit(fn, args, done)
        if abandon:
            await finished.wait()
        else:
            with trio.CancelScope(shield=True):
                await finished.wait()
        value, error = result[0]
        if error is not None:
            raise error
        return value

    def close(self) -> None:
        """Let the thread end once the calls queued so far are done."""
        self._jobs.put(None)

    async def join(self) -> None:
        """Wait for the thread to end after :meth:`close` (cancellable)."""
        if self._thread.ident is not None:
            await trio.to_thread.run_sync(self._thread.join, abandon_on_cancel=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, done = job
            try:
                outcome: Result = (fn(*args), None)
            except BaseException as exc:  # handed to the Trio thread, which raises it
                outcome = (None, exc)
            try:
                self._token.run_sync_soon(done, outcome)
            except trio.RunFinishedError:
                return


class Steps:
    """Steps in flight on a :class:`UserThread`; their results handed on in order.

    :meth:`submit` waits only while :attr:`limit` steps are queued or done
    but not handed on; :meth:`hand_on` (a task) gives each result to
    *emit*, in order, and raises what a step raised.
    """

    def __init__(self, thread: UserThread, emit: Callable[[Result], Any]) -> None:
        self._thread = thread
        self._emit = emit
        #: Most steps in flight (may change between steps).
        self.limit = STEPS_IN_FLIGHT
        self._in_flight = 0
        self._results: deque[Result] = deque()
        self._changed = trio.lowlevel.ParkingLot()
        self._closed = False

    async def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue a step; waits while too many are in flight.

        Once :meth:`hand_on` has stopped (a step failed), does nothing: the
        failure is reported there.
        """
        while self._in_flight >= self.limit and not self._closed:
            await self._changed.park()
        if self._closed:
            return
        self._in_flight += 1
        self._thread.submit(fn, args, self._done)
        await trio.lowlevel.checkpoint()

    async def drain(self) -> None:
        """Return once every step submitted has been handed on (or one failed)."""
        while self._in_flight and not self._closed:
            await self._changed.park()

    def _done(self, result: Result) -> None:
        self._results.append(result)
        self._changed.unpark_all()

    async def hand_on(self) -> None:
        """Give each result to *emit*, in order, until cancelled (or *emit* raises)."""
        try:
            while True:
                while not self._results:
                    await self._changed.park()
                await self._emit(self._results.popleft())
                self._in_flight -= 1
                self._changed.unpark_all()
        finally:
            self._closed = True
            self._changed.unpark_all()
