"""How often the data plane lets other tasks run when it need not wait."""

from __future__ import annotations

import trio

#: Calls in a row that did not wait, after which one yields anyway.
CALLS_PER_YIELD = 16


class _SchedulePoints:
    """Makes one in :data:`CALLS_PER_YIELD` calls a schedule point, and every call that waits.

    A Trio schedule point costs a pass through the scheduler (measured ~9 µs
    on a 2-core VM), which for 1 KB messages is a third of the cost of
    sending or receiving one. ``send``, ``receive`` and the socket reader
    therefore yield only when they wait, or once in :data:`CALLS_PER_YIELD`
    calls that did not wait, so that a busy loop still lets the other tasks
    run. Every call stays a cancel point.
    """

    __slots__ = ("_calls",)

    def __init__(self) -> None:
        self._calls = 0

    def waited(self) -> None:
        """The call waited (so it was a schedule point)."""
        self._calls = 0

    async def maybe_yield(self) -> None:
        """Yield if this is the :data:`CALLS_PER_YIELD`-th call in a row that did not wait.

        Shielded: call it once the call's work is done and must not be undone.
        """
        self._calls += 1
        if self._calls >= CALLS_PER_YIELD:
            self._calls = 0
            await trio.lowlevel.cancel_shielded_checkpoint()
