"""Where an endpoint's I/O tasks live, and how they end together."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

log = logging.getLogger("transports")

#: How long stopping an endpoint's tasks may take once they are cancelled.
STOP_GRACE = 5.0


class _Background:
    """A nursery for one endpoint's I/O tasks, running in a Trio system task.

    Endpoints are made by plain ``await`` calls (``bind``, ``connect``), like
    sockets, so their tasks cannot live in the caller's nursery. They live here
    instead, and :meth:`aclose` -- which the endpoint's own ``aclose`` calls --
    cancels them and waits until every one has finished. Tasks must handle
    their own errors: one that escapes is logged and stops the endpoint.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._started = trio.Event()
        self._finished = trio.Event()

    @classmethod
    async def open(cls, name: str) -> _Background:
        """A new one, its nursery open.

        Raises:
            trio.Cancelled: cancelled while it opened (its system task ends too).
        """
        self = cls(name)
        trio.lowlevel.spawn_system_task(self._run, name=f"transports:{name}")
        try:
            await self._started.wait()
        except BaseException:
            self._scope.cancel()  # (else the task would run until trio.run ends)
            raise
        return self

    async def _run(self) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self._started.set()
                    await trio.sleep_forever()
        except Exception:
            log.exception("%s: I/O task failed", self._name)
        finally:
            self._nursery = None
            self._started.set()
            self._finished.set()

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start ``fn(*args)`` here.

        Raises:
            trio.ClosedResourceError: the tasks were stopped.
        """
        if self._nursery is None or self._scope.cancel_called:
            raise trio.ClosedResourceError(f"{self._name} is closed")
        self._nursery.start_soon(fn, *args)

    async def aclose(self) -> None:
        """Cancel every task and wait (at most :data:`STOP_GRACE`) until all have finished."""
        self._scope.cancel()
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + STOP_GRACE
            await self._finished.wait()
        if not self._finished.is_set():
            log.error(
                "%s: I/O tasks still running %.0f s after cancellation", self._name, STOP_GRACE
            )


async def first_completed(*fns: Callable[[], Awaitable[Any]]) -> None:
    """Run *fns* concurrently until one returns or raises; then cancel the others.

    Raises the first exception raised (as itself, not in a group).
    """
    error: Exception | None = None
    async with trio.open_nursery() as nursery:

        async def run(fn: Callable[[], Awaitable[Any]]) -> None:
            nonlocal error
            try:
                await fn()
            except Exception as exc:
                if error is None:
                    error = exc
            nursery.cancel_scope.cancel()

        for fn in fns:
            nursery.start_soon(run, fn)
    if error is not None:
        raise error
