"""The base of chimera's async context managers that own a nursery."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager
from typing import Any, TypeVar

import trio

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["Service", "run_all", "single_exception", "unwrapped"]

_S = TypeVar("_S", bound="Service")


class Service:
    """An object used as ``async with Service(...) as service:``.

    A subclass defines :meth:`_running`: an async context manager that opens
    the object's nursery, yields the object, and stops everything on the way
    out. An exception raised in the ``async with`` body reaches the caller as
    itself, not wrapped in the nursery's exception group, so that ``except
    KeyboardInterrupt`` or ``except NodeError`` around the block work; so
    does the one exception that fails the start (``except OSError`` for a
    port in use).
    """

    _context: AbstractAsyncContextManager[Any] | None = None
    #: The Trio run it was entered in.
    _trio_token: trio.lowlevel.TrioToken | None = None

    def _running(self) -> AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    async def __aenter__(self: _S) -> _S:
        """Start it.

        Raises:
            RuntimeError: not under Trio (asyncio: a Jupyter notebook's
                top-level ``await``), or what the start raised.
        """
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            raise RuntimeError(
                f"{type(self).__name__} runs under Trio, not this event loop (asyncio?): use "
                "trio.run(), or the blocking API (chimera.Manager, chimera.Worker), which runs "
                "anywhere, Jupyter notebooks included"
            ) from None
        self._trio_token = trio.lowlevel.current_trio_token()
        self._context = self._running()
        with unwrapped():
            await self._context.__aenter__()  # (it yields self)
        return self

    def _check_run(self, call: str) -> None:
        """Raise RuntimeError if this is not the Trio run the object was
        entered in (a call from another thread's ``trio.run`` would corrupt
        it, and hang)."""
        if self._trio_token is None:
            return  # (not entered: the call says what it needs)
        try:
            here = trio.lowlevel.current_trio_token()
        except RuntimeError:
            here = None
        if here is not self._trio_token:
            raise RuntimeError(
                f"{type(self).__name__}.{call}() called outside the Trio run that entered it "
                f"(from another thread?): there, use trio.from_thread.run(obj.{call}, ..., "
                "trio_token=...) with the token of that run, or the blocking API "
                "(chimera.Manager, chimera.Worker), whose calls work from any thread"
            )

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        context, self._context = self._context, None
        self._trio_token = None  # (a call from now on says the object is not running)
        assert context is not None  # (async with exits only what __aenter__ entered)
        try:
            return await context.__aexit__(*exc_info)
        except BaseExceptionGroup as group:
            raised = exc_info[1]
            if raised is not None and list(group.exceptions) == [raised]:
                raise raised from raised.__cause__  # (its own cause kept; not the group)
            cancelled, others = group.split(trio.Cancelled)
            if cancelled is not None and others is None:
                # Only cancellations (a timeout around the block): one says it all,
                # not a tree of every task's, which would be printed under the timeout's.
                raise _first(cancelled) from None
            raise


def _first(group: BaseExceptionGroup) -> BaseException:
    """The first exception in *group*, looking into the groups nested in it."""
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


def single_exception(group: BaseExceptionGroup) -> BaseException | None:
    """The one exception in *group* and the groups nested in it, if only one; else None."""
    while len(group.exceptions) == 1:
        (only,) = group.exceptions
        if not isinstance(only, BaseExceptionGroup):
            return only
        group = only
    return None


@contextmanager
def unwrapped() -> Iterator[None]:
    """Raise the one exception of an exception group raised in the block as
    itself (its own cause kept), so that ``except NodeError`` around a call
    that opens a nursery works; a group of several stays as it is."""
    try:
        yield
    except BaseExceptionGroup as group:
        only = single_exception(group)
        if only is None:
            raise
        raise only from only.__cause__  # (its own cause kept; not the group)


async def run_all(calls: Sequence[Callable[[], Awaitable[Any]]]) -> None:
    """Run every call concurrently; let all of them finish, whatever one raises.

    Raises:
        Exception: the first one a call raised (as itself, not in a group).
    """
    errors: list[Exception] = []

    async def run(call: Callable[[], Awaitable[Any]]) -> None:
        try:
            await call()
        except Exception as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for call in calls:
            nursery.start_soon(run, call)
    if errors:
        raise errors[0]
