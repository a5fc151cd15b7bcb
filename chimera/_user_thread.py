"""The thread a node's code runs on, and the loop its steps run in there.

A node's ``prep``, ``step`` and ``teardown`` may block (a camera, a model, a
file), so they never run on the Trio thread. They run, in order, on one
thread of the node's own (:class:`UserThread`): code that needs the same
thread every time (OpenCV windows, some camera SDKs) works, and handing a
step over costs no thread start-up. A round trip to a thread costs ~90 µs on
a 2-core VM (``trio.to_thread.run_sync``: ~110-180 µs), more than a 1 KB
chunk's whole journey, so steps are not handed over one by one: they run in
a loop on the thread (:class:`StepLoop`), which takes in and hands back as
many at once as are ready, and wakes the Trio thread through a socket of its
own rather than ``run_sync_soon`` (which costs one more pass of the scheduler:
1 KB paced at 1 kHz, p50 ~470 -> ~400 µs node to node). Waking the loop
while it waits, the Trio thread then gives up the CPU and the GIL for a
moment (:data:`_hand_over`), so the step runs now rather than once the
event loop goes idle (same measure: ~400 -> ~350 µs).
"""

from __future__ import annotations

import contextvars
import os
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from typing import Any

import trio

__all__ = ["StepLoop", "UserThread"]

#: A pulled step (see :class:`StepLoop`) that takes less than this many
#: seconds, on average, is quick: its result may wait for the next steps'.
QUICK_STEP = 0.0001

#: What a call on the thread gives back: (value, None) or (None, exception).
Result = tuple[Any, BaseException | None]

#: Called by the Trio thread right after it woke a step loop that was
#: waiting: gives up the CPU, and with it the GIL, for a moment. Otherwise the
#: woken thread (often queued on the waker's CPU) waits for both until the
#: event loop has gone idle. Not done the other way (a step's result waking
#: the Trio thread): measured no faster, and a source's burst rate fell by
#: 40%, its thread yielding at every step.
_hand_over = getattr(os, "sched_yield", None)


class UserThread:
    """Runs calls in order on one thread of its own; each result comes back to Trio.

    Start it from the Trio thread (:meth:`start`); :meth:`close` lets it end
    once the calls queued before are done.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"chimera-node-{name}", daemon=True)
        #: The context the calls run in: that of the task that started the thread.
        self._context: contextvars.Context | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._closed = False

    def start(self) -> None:
        """Start the thread; its calls run in a copy of the current context (its
        context variables: the Worker's clock, for nodes inline)."""
        self._token = trio.lowlevel.current_trio_token()
        self._context = contextvars.copy_context()
        self._thread.start()

    def submit(self, fn: Callable[..., Any], args: tuple, done: Callable[[Result], None]) -> None:
        """Queue ``fn(*args)``; *done* gets its result, in the Trio thread.

        Raises:
            RuntimeError: the thread was closed (it would never run the call).
        """
        if self._closed:
            raise RuntimeError("the node is closed: its code runs no more")
        self._jobs.put((fn, args, done))

    async def call(self, fn: Callable[..., Any], *args: Any, abandon: bool = False) -> Any:
        """``fn(*args)`` on the thread, once the calls queued before are done; its result.

        Not cancellable (the call finishes first), unless *abandon*: then a
        cancellation returns at once and leaves the call to finish alone.

        Raises:
            RuntimeError: the thread was closed.
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
        self._closed = True
        self._jobs.put(None)

    async def join(self) -> None:
        """Wait for the thread to end after :meth:`close` (cancellable)."""
        if self._thread.ident is not None:
            await trio.to_thread.run_sync(self._thread.join, abandon_on_cancel=True)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called: it takes no more calls."""
        return self._closed

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        assert self._context is not None  # (set by start(), which starts the thread)
        self._context.run(self._work)

    def _work(self) -> None:
        token = self._token
        assert token is not None  # (set by start(), which starts the thread)
        while (job := self._jobs.get()) is not None:
            fn, args, done = job
            try:
                outcome: Result = (fn(*args), None)
            except BaseException as exc:  # handed to the Trio thread, which raises it
                outcome = (None, exc)
            try:
                token.run_sync_soon(done, outcome)
            except trio.RunFinishedError:
                return


class StepLoop:
    """A node's steps, run one after another by a loop on its :class:`UserThread`.

    The Trio side :meth:`put`-s steps' arguments; the loop (:meth:`run`, a
    call on the thread) takes in every step put so far, steps on each in
    order and hands back each one's :data:`Result`; :meth:`results` takes
    every result ready at once. Steps that come fast thus cost one wake-up
    and one lock of each thread per batch, not per step (a round trip to a
    thread costs more than a 1 KB chunk's whole journey). The loop ends once
    :meth:`close`-d and done with what was put, or right after a step raised.
    :meth:`release` frees its wake-up socket once the Trio side is done.

    *finish*, if given, is called on the thread with each step's value before
    the next step runs, and what it returns is the step's result: the node's
    code may change what it returned once it steps again. A raise in *finish*
    counts as the step's.

    With *pull*, the loop gets its steps itself instead: whenever it has none,
    and fewer than ``ahead()`` steps are :attr:`unsent`, it calls ``pull()``
    on the thread, which waits for the next steps' arguments (a list, maybe
    empty) or returns None once there will be none (the loop then ends).
    What it gets thus needs no hand-over from the Trio side. Its steps still
    end up unsent until the Trio side says it sent them (:meth:`sent`), so
    the loop runs at most about ``ahead()`` steps ahead of what was sent.
    While steps are quick (:data:`QUICK_STEP`), the Trio side is then told
    of results once per pull's steps, not as soon as the first is ready: it
    has nothing else to do, and would wake for nearly every step, each time
    taking the GIL from the loop (1 KB chunks as fast as they come, ~60 a
    pull: 78k -> ~110k steps a second). A result thus waits for the rest of
    its pull's steps, all quick but maybe one.

    :attr:`seconds` says how long a step takes (with its *finish*), so that
    the Trio side can put in as many as keep the thread busy, and no more.
    """

    #: How much the steps of each batch count in :attr:`seconds` (the rest is
    #: the batches' before).
    _WEIGHT = 0.25

    def __init__(
        self,
        step: Callable[..., Any],
        finish: Callable[[Any], Any] | None = None,
        *,
        pull: Callable[[], list[tuple] | None] | None = None,
        ahead: Callable[[], int] | None = None,
    ) -> None:
        if (pull is None) != (ahead is None):
            raise ValueError("pull and ahead go together")
        self._step = step
        self._finish = finish
        self._pull = pull
        self._ahead = ahead
        #: The loop writes a byte to ``_wake_out`` when there is news; the
        #: Trio side waits for ``_wake_in`` to be readable. Each side closes its own.
        self._wake_in, self._wake_out = socket.socketpair()
        self._wake_in.setblocking(False)
        self._wake_out.setblocking(False)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._inbox: deque[tuple] = deque()
        self._outbox: deque[Result] = deque()
        self._closed = False
        #: Set (once) to make the loop end after its current step.
        self._discard = False
        #: Whether the loop waits for steps (then :meth:`put` hands it the CPU).
        self._waiting = False
        self._ended = False
        #: Whether the Trio side has been told of results it has not taken yet.
        self._told = False
        #: Steps put or pulled, and not yet said sent (see :meth:`sent`).
        self._unsent = 0
        #: About how long a step takes, in seconds (a moving average over the
        #: batches of steps taken in at once; written by the thread, read by
        #: the Trio side); None until a batch is done.
        self.seconds: float | None = None

    # --- the Trio side ----------------------------------------------------------

    @property
    def unsent(self) -> int:
        """Steps put or pulled whose results the Trio side has not said it
        sent (see :meth:`sent`)."""
        return self._unsent

    def put(self, steps: Collection[tuple]) -> None:
        """Queue a step on each tuple of arguments in *steps* (never blocks)."""
        with self._work:
            self._inbox.extend(steps)
            self._unsent += len(steps)
            self._work.notify()
            woke = self._waiting
        if woke and _hand_over is not None:
            _hand_over()

    def sent(self, count: int) -> None:
        """The results of *count* more steps are sent on (never blocks)."""
        with self._work:
            self._unsent -= count
            self._work.notify()

    def close(self, *, discard: bool = False) -> None:
        """Let the loop end once done with what was put, or, with *discard*,
        once done with its current step."""
        with self._work:
            if discard:
                self._discard = True
                self._inbox.clear()
            self._closed = True
            self._work.notify()

    async def results(self) -> list[Result]:
        """Every result ready, in order, once there is one; ``[]`` once the
        loop has ended and every result was taken.

        Raises:
            trio.ClosedResourceError: after :meth:`release`.
        """
        while True:
            with self._lock:
                if self._outbox or self._ended:
                    taken = list(self._outbox)
                    self._outbox.clear()
                    self._told = False
                    return taken
            if self._wake_in.fileno() < 0:
                raise trio.ClosedResourceError("the step loop was released")
            await trio.lowlevel.wait_readable(self._wake_in)
            try:
                self._wake_in.recv(4096)  # (a closed write end reads as b"")
            except BlockingIOError:
                pass

    def release(self) -> None:
        """Free the Trio side's end of the wake-up socket (no :meth:`results`
        may be waiting); the loop may still be running, and frees its own."""
        self._wake_in.close()

    # --- the thread's side ------------------------------------------------------

    def run(self) -> None:
        """Step on what is put until closed, or on what *pull* gets until it
        says there is no more (call it on the node's thread)."""
        try:
            while (taken := self._next_steps()) is not None:
                started = time.perf_counter()
                for done, args in enumerate(taken, 1):
                    if self._discard:
                        return
                    try:
                        value = self._step(*args)
                        if self._finish is not None:
                            value = self._finish(value)
                        outcome: Result = (value, None)
                    except BaseException as exc:  # handed to the Trio side, which raises it
                        outcome = (None, exc)
                    last = done == len(taken) or outcome[1] is not None
                    if done == len(taken):  # (before the Trio side hears of it)
                        self._took((time.perf_counter() - started) / done)
                    self._hand_out(outcome, tell=last or not self._quick())
                    if outcome[1] is not None:
                        return
        finally:
            with self._lock:
                self._ended = True
            self._wake_out.close()  # which wakes the Trio side for good

    def _next_steps(self) -> list[tuple] | None:
        """The next steps to run, once there are any (see :meth:`run`); None
        once the loop ends."""
        with self._work:
            while not self._inbox and not self._closed and not self._may_pull():
                self._waiting = True
                self._work.wait()
                self._waiting = False
            if self._inbox:
                taken = list(self._inbox)
                self._inbox.clear()
                return taken
            if self._closed:
                return None
        assert self._pull is not None  # (_may_pull)
        pulled = self._pull()
        if pulled is not None:
            with self._lock:
                self._unsent += len(pulled)
        return pulled

    def _quick(self) -> bool:
        """Whether the Trio side may be told of a result only at the end of
        its pull's steps: they are pulled, and quick (:data:`QUICK_STEP`)."""
        seconds = self.seconds
        return self._pull is not None and seconds is not None and seconds < QUICK_STEP

    def _may_pull(self) -> bool:
        return self._ahead is not None and self._unsent < self._ahead()

    def _took(self, seconds: float) -> None:
        """Count a batch whose steps took *seconds* each in :attr:`seconds`."""
        before = self.seconds
        self.seconds = seconds if before is None else before + (seconds - before) * self._WEIGHT

    def _hand_out(self, outcome: Result, tell: bool) -> None:
        """Hand *outcome* to the Trio side; wake it if *tell* and it was not
        woken for results it has yet to take."""
        with self._lock:
            self._outbox.append(outcome)
            if self._told or not tell:
                return  # the Trio side has yet to take the results before this one
            self._told = True
        self._tell()

    def _tell(self) -> None:
        try:
            self._wake_out.send(b"\0")
        except OSError:  # full (so a wake-up is on its way), or the Trio side is gone
            pass
