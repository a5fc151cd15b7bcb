"""A node in a child process of its own, driven from its Worker's Trio loop.

:class:`NodeProcess` has the lifecycle of :class:`~chimera._runtime.NodeRuntime`
(``address``, ``connect``, ``prep``, ``run``, ``request_stop``, ``aclose``,
``state``), carried out by a :class:`NodeRuntime` in the child
(:mod:`chimera._child`). The child runs under the Worker's nursery in a
process group of its own, and is stopped in steps: ``close`` (the node's
``teardown`` runs), then SIGTERM to its process group, then SIGKILL.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import trio

from . import _pipe
from ._errors import NodeError
from ._node import NodeState
from ._runtime import TEARDOWN_TIMEOUT

__all__ = ["NodeProcess"]

log = logging.getLogger("chimera.worker")

#: After ``close``, how long a node's process has to exit by itself (its teardown may run).
EXIT_GRACE = TEARDOWN_TIMEOUT + 2.0
#: After SIGTERM to a node's process group, how long before SIGKILL.
TERM_GRACE = 2.0


def _signal_group(process: trio.Process, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):  # already gone
        pass


def exit_reason(code: int) -> str:
    """How a process that exited with *code* (``Popen.returncode``) ended, in words."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"its process was killed by {name}"
    return f"its process exited with code {code}"


class _Pending:
    """A command sent to the child, until it answers (or dies)."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: tuple[str, str] | None = None


class NodeProcess:
    """Runs a node in a child process; its lifecycle is :class:`NodeRuntime`'s.

    Args:
        name: the node's name (for errors and logs).
        node: the node, pickled with cloudpickle (it is unpickled only in the child).
        runtime: the keywords of the child's :class:`NodeRuntime` (``inputs``,
            ``follow``, ``outputs``, ``transport``, ...).
        on_state: called with the node's new state and a reason (for FAILED)
            whenever it changes.
    """

    def __init__(
        self,
        name: str,
        node: bytes,
        *,
        runtime: dict[str, Any],
        on_state: Callable[[NodeState, str | None], None] | None = None,
    ) -> None:
        self.name = name
        self._spec = {
            "node": node,
            "runtime": runtime,
            "sys_path": list(sys.path),
            "log_level": logging.getLogger().getEffectiveLevel(),
        }
        self._on_state = on_state
        self.state = NodeState.INITIALIZED
        self._address: str | None = None
        self._process: trio.Process | None = None
        self._nursery: trio.Nursery | None = None
        self._kill_scope = trio.CancelScope()
        self._write_lock = trio.Lock()
        self._pending: dict[str, _Pending] = {}
        self._exited = trio.Event()
        self._closing = False
        #: Why the process died, once it has (None while it runs, or if asked to exit).
        self._death: str | None = None

    @property
    def address(self) -> str | None:
        """The address of the node's outlet; None for a node without outputs."""
        return self._address

    @property
    def pid(self) -> int | None:
        """The child's process id (and process group id), once started."""
        return self._process.pid if self._process is not None else None

    # --- lifecycle -------------------------------------------------------------

    async def open(self, nursery: trio.Nursery) -> None:
        """Start the child in *nursery* and make the node there (its outlet bound).

        Raises:
            NodeError: the node cannot be made in the child (its class does
                not import there, its ``__init__`` state does not unpickle, ...)
                or the child died.
        """
        self._nursery = nursery
        events, child_end = os.pipe()
        try:
            self._process = await nursery.start(self._run_process, child_end)
        except BaseException:
            os.close(events)
            raise
        finally:
            os.close(child_end)
        nursery.start_soon(self._read_events, trio.lowlevel.FdStream(events))
        pending = self._pending["create"] = _Pending()
        try:
            await self._send(_pipe.encode(self._spec))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # it died: _read_events says why
        await self._wait(pending)

    async def connect(self, addresses: dict[str, str]) -> None:
        """Connect the node's inlets to its inputs' outlets. Raises NodeError."""
        await self._command("connect", addresses)

    async def prep(self) -> None:
        """Run the node's ``prep``. Raises NodeError."""
        await self._command("prep")

    async def run(self) -> None:
        """Run the node until it stops (see :meth:`NodeRuntime.run`).

        A process that dies meanwhile makes the node FAILED; this returns then.

        Raises:
            NodeError: ``teardown`` raised.
        """
        try:
            await self._command("run")
        except NodeError:
            if self._death is None:
                raise

    def request_stop(self) -> None:
        """Ask a source to stop after its current step."""
        if self._nursery is not None and not self._exited.is_set():
            self._nursery.start_soon(self._send_quietly, ("stop", ()))

    async def aclose(self) -> None:
        """Close the node and end its process (see :meth:`_stop_process`).

        Returns within :data:`EXIT_GRACE` + :data:`TERM_GRACE` seconds; leaves
        no process of the node's group behind.
        """
        if self._process is None:
            return
        with trio.CancelScope(shield=True):
            self._kill_scope.cancel()
            await self._exited.wait()
            _signal_group(self._process, signal.SIGKILL)  # whatever the node started
        if self.state is not NodeState.FAILED:
            self._set_state(NodeState.SHUTDOWN, None)

    # --- the child -------------------------------------------------------------

    async def _run_process(
        self, events_fd: int, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        with self._kill_scope:
            await trio.run_process(
                [sys.executable, "-m", "chimera._child", str(events_fd)],
                stdin=subprocess.PIPE,
                pass_fds=(events_fd,),
                start_new_session=True,
                check=False,
                deliver_cancel=self._stop_process,
                task_status=task_status,
            )

    async def _stop_process(self, process: trio.Process) -> None:
        """End the child in steps (Trio runs this shielded when its task is cancelled).

        ``close`` -- the node's ``teardown`` runs -- and :data:`EXIT_GRACE`
        seconds to exit; then SIGTERM to its process group and
        :data:`TERM_GRACE` seconds; then SIGKILL.
        """
        self._closing = True
        await self._send_quietly(("close", ()))
        with trio.move_on_after(EXIT_GRACE):
            await process.wait()
            return
        log.warning("node %r did not exit %.1f s after close: terminating", self.name, EXIT_GRACE)
        _signal_group(process, signal.SIGTERM)
        with trio.move_on_after(TERM_GRACE):
            await process.wait()
            return
        log.warning("node %r ignored SIGTERM for %.1f s: killing", self.name, TERM_GRACE)
        _signal_group(process, signal.SIGKILL)

    async def _read_events(self, events: trio.lowlevel.FdStream) -> None:
        """Take the child's events until it exits, then tell how it ended.

        Shielded: closing relies on it, and it ends when the child does (the
        events pipe is the child's alone, so its end is the child's exit),
        which :meth:`_stop_process` makes sure of.
        """
        with trio.CancelScope(shield=True):
            async with events:
                await self._take_events(events)

    async def _take_events(self, events: trio.lowlevel.FdStream) -> None:
        reader = _pipe.MessageReader(events)
        crash: str | None = None
        try:
            while (event := await reader.read()) is not None:
                kind = event[0]
                if kind == "state":
                    self._set_state(NodeState(event[1]), event[2])
                elif kind == "log":
                    logging.getLogger(event[2]).log(event[1], "%s", event[3])
                elif kind == "created":
                    self._address = event[1]
                    self._answer("create", None)
                elif kind in ("done", "failed"):
                    self._answer(event[1], event[2:] if kind == "failed" else None)
                elif kind == "crashed":
                    crash = event[1]
                    log.error("node %r crashed:\n%s", self.name, event[2])
        except _pipe.PipeError as exc:
            log.error("node %r: bad message from its process: %s", self.name, exc)
            self._kill_scope.cancel()
        code = await self._process.wait()
        if not self._closing or code != 0:
            self._death = crash or exit_reason(code)
            if not self._closing:
                log.error("node %r: %s", self.name, self._death)
            if self.state not in (NodeState.FAILED, NodeState.SHUTDOWN):
                self._set_state(NodeState.FAILED, self._death)
        for name in list(self._pending):
            self._answer(name, (self._death or "its process exited", ""))
        self._exited.set()

    # --- helpers ---------------------------------------------------------------

    async def _command(self, name: str, *args: Any) -> None:
        pending = self._pending[name] = _Pending()
        await self._send_quietly((name, args))
        await self._wait(pending)

    async def _wait(self, pending: _Pending) -> None:
        await pending.done.wait()
        if pending.error is not None:
            message, text = pending.error
            raise NodeError(self.name, message, text or "")

    def _answer(self, name: str, error: tuple[str, str] | None) -> None:
        pending = self._pending.pop(name, None)
        if pending is not None:
            pending.error = error
            pending.done.set()

    async def _send(self, data: bytes) -> None:
        async with self._write_lock:
            await self._process.stdin.send_all(data)

    async def _send_quietly(self, command: tuple[str, tuple]) -> None:
        """Send *command*; if the child is gone, its death is reported elsewhere."""
        try:
            await self._send(_pipe.encode(command))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _set_state(self, state: NodeState, reason: str | None) -> None:
        self.state = state
        if self._on_state is not None:
            self._on_state(state, reason)
