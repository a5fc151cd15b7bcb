"""Nodes in child processes of their own, driven from their Worker's Trio loop.

:class:`NodeProcess` has the lifecycle of :class:`~chimera._runtime.NodeRuntime`
(``address``, ``connect``, ``prep``, ``run``, ``request_stop``, ``aclose``,
``state``), carried out by a :class:`NodeRuntime` in the child
(:mod:`chimera._child`). Children are forked by the Worker's
:class:`Zygote` (:mod:`chimera._zygote`), each in a process group of its
own, and are stopped in steps: ``close`` (the node's ``teardown`` runs), then
SIGTERM to the process group, then SIGKILL -- when a node is closed, when
the Worker's nursery is cancelled, and when the zygote that forked them dies
(it reported their exits: see :meth:`Zygote.run`).
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import signal
import socket
import sys
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import trio

from . import _pipe
from ._errors import NodeError
from ._node import NODE_LOGGER, NodeState
from ._runtime import TEARDOWN_TIMEOUT

__all__ = ["NodeProcess", "Zygote", "ZygoteDied"]

log = logging.getLogger("chimera.worker")

#: After ``close``, how long a node's process has to exit by itself (its teardown may run).
EXIT_GRACE = TEARDOWN_TIMEOUT + 2.0
#: After SIGTERM to a node's process group, how long before SIGKILL.
TERM_GRACE = 2.0
#: After SIGKILL, how long to wait for the exit to be reported.
KILL_GRACE = 5.0
#: Once a node's process has exited, how long processes it started (a
#: ``multiprocessing`` helper forked from it) may hold its pipes open before
#: its process group is killed.
HELD_GRACE = 1.0
#: Seconds between looks at whether a process has exited, where there is no pidfd.
POLL_PERIOD = 0.05
#: How long the zygote may take to fork a node process (~10 ms): past it, it
#: is taken as stuck, and killed.
FORK_TIMEOUT = 10.0

#: The states of a node whose run has ended (not FAILED): its process may end then.
_ENDED = (NodeState.STOPPED, NodeState.SAVED, NodeState.SHUTDOWN)


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):  # already gone
        pass


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_reason(code: int | None) -> str:
    """How a process that exited with *code* (``Popen.returncode``) ended, in words."""
    if code is None:
        return "its process ended"
    if code < 0:
        return f"its process was killed by {_signal_name(-code)}"
    return f"its process exited with code {code}"


def _how_it_died(code: int) -> str:
    """How a process that exited with *code* (``Popen.returncode``) ended, briefly."""
    return f"killed by {_signal_name(-code)}" if code < 0 else f"exit code {code}"


def _zygote_death(code: int | None) -> str:
    """Why the nodes of a zygote that exited with *code* failed, in words."""
    died = "its Worker's process starter died"
    return died if code is None else f"{died} ({_how_it_died(code)})"


def _open_pidfd(pid: int) -> int | None:
    """A pidfd for process *pid* (readable once it exits); None where there are none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux >= 5.3, or it is gone already
        return None


def _reap(pidfd: int) -> int | None:
    """The return code of the exited process of *pidfd*, reaping it, if it is
    a child of this process (orphans come to a subreaper, or to PID 1 in a
    container); else None."""
    try:
        result = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
    except (AttributeError, OSError):  # init reaps it, as a rule (ChildProcessError)
        return None
    if result is None:
        return None
    return result.si_status if result.si_code == os.CLD_EXITED else -result.si_status


def _gone(pid: int) -> bool:
    """Whether process *pid* is gone (reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # its pid is another user's process now
        return True
    return False


class ZygoteDied(RuntimeError):
    """The zygote died: it forks no more node processes (its Worker starts another)."""


class _Child:
    """A node process the zygote forked, until its exit is known."""

    def __init__(self, pidfd: int | None, on_orphaned: Callable[[str], None] | None) -> None:
        self.exited = trio.Event()
        #: Its return code once it exited (None too if the zygote died first: unknown).
        self.code: int | None = None
        self.pidfd = pidfd
        self.on_orphaned = on_orphaned

    def close_pidfd(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class Zygote:
    """The Worker's end of its zygote: forks node processes, and says when they exit.

    Run :meth:`run` in the Worker's nursery (``await nursery.start(zygote.run)``);
    cancelling it ends the zygote (the node processes end by their lifeline).

    Args:
        owner: who it works for, in its log messages (``"worker 'w1'"``).
    """

    def __init__(self, owner: str = "the worker") -> None:
        self._owner = owner
        self._stream: trio.SocketStream | None = None
        self._lock = trio.Lock()
        self._started: trio.MemorySendChannel[int] | None = None
        self._next_pid: trio.MemoryReceiveChannel[int] | None = None
        self._children: dict[int, _Child] = {}
        #: The ``on_orphaned`` of the process being forked (one at a time: the lock).
        self._on_orphaned: Callable[[str], None] | None = None
        #: Its process id, once started.
        self.pid: int | None = None
        #: Why it died, once it has (see :meth:`run`).
        self.death: str | None = None

    @property
    def running(self) -> bool:
        """Whether it has started and not died: :meth:`start` may fork."""
        return self._stream is not None and self.death is None

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start the zygote, then relay what it says until cancelled, or until it dies.

        If it dies (killed, say), the exits of the node processes it forked can
        no longer be reported: it logs one error, sets :attr:`death`, calls
        the ``on_orphaned`` of each node process that has not exited (see
        :meth:`start`), and watches those processes itself (a pidfd where
        there is one, else polling) until every one has exited, and returns;
        :meth:`start` raises :class:`ZygoteDied` from then on.

        Raises:
            chimera._pipe.PipeError: the zygote sent something that is not a
                message (a bug).
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._started, self._next_pid = trio.open_memory_channel[int](1)
        try:
            async with trio.open_nursery() as nursery:
                process = await nursery.start(
                    partial(
                        trio.run_process,
                        [sys.executable, "-m", "chimera._zygote", str(theirs.fileno())],
                        pass_fds=(theirs.fileno(),),
                        check=False,
                    )
                )
                theirs.close()
                self.pid = process.pid
                self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
                task_status.started()
                await self._relay()
                self._died(await process.wait())
                for pid, child in self._children.items():
                    if not child.exited.is_set():
                        nursery.start_soon(self._watch, pid, child)
        finally:
            theirs.close()
            ours.close()
            for child in self._children.values():
                child.close_pidfd()

    async def _relay(self) -> None:
        """Take in what the zygote says, until it closes its end (it died).

        Raises:
            chimera._pipe.PipeError: it sent something that is not a message.
        """
        assert self._stream is not None and self._started is not None  # (run set them)
        reader = _pipe.MessageReader(self._stream)
        try:
            while (message := await reader.read()) is not None:
                if message[0] == "started":
                    pid = message[1]
                    self._children[pid] = _Child(_open_pidfd(pid), self._on_orphaned)
                    self._started.send_nowait(pid)
                elif message[0] == "exited":
                    self._exited(message[1], message[2])
        except trio.BrokenResourceError:  # it died with a request unread
            pass

    def _exited(self, pid: int, code: int | None) -> None:
        child = self._children.get(pid)
        if child is not None and not child.exited.is_set():
            child.code = code
            child.close_pidfd()
            child.on_orphaned = None  # (it cannot be orphaned now)
            child.exited.set()

    def _died(self, code: int) -> None:
        """Say that the zygote died with *code*; tell its orphans."""
        self.death = _zygote_death(code)
        assert self._started is not None  # (run set it)
        self._started.close()  # a start() waiting for a pid: it raises ZygoteDied
        orphans = [child for child in self._children.values() if not child.exited.is_set()]
        log.error(
            "%s: its node process starter (the zygote, pid %d) died (%s): the node "
            "processes it started that still run (%d) are ended, and the next node "
            "created starts a new one",
            self._owner,
            self.pid,
            _how_it_died(code),
            len(orphans),
        )
        for child in orphans:
            if child.on_orphaned is not None:
                child.on_orphaned(self.death)

    async def _watch(self, pid: int, child: _Child) -> None:
        """Wait for node process *pid*, whose zygote died, to exit; then say so."""
        code = None
        if child.pidfd is not None:
            await trio.lowlevel.wait_readable(child.pidfd)
            code = _reap(child.pidfd)
        else:
            while not _gone(pid):  # noqa: ASYNC110 (no event says a non-child exited)
                await trio.sleep(POLL_PERIOD)
        self._exited(pid, code)

    async def start(
        self, stdin: int, events: int, on_orphaned: Callable[[str], None] | None = None
    ) -> int:
        """Fork a node process with these pipe ends as its stdin and events pipe; its pid.

        *on_orphaned* is called with :attr:`death` if the zygote dies before
        the process exits (then :meth:`wait` still returns once it exits, its
        return code unknown: None).

        Raises:
            RuntimeError: the zygote has not started.
            ZygoteDied: the zygote died (before or while forking it).
        """
        if self._stream is None:
            raise RuntimeError("the zygote is not running")
        assert self._next_pid is not None  # (run set it before the stream)
        fds = array.array("i", [stdin, events])
        async with self._lock:
            if self.death is not None:
                raise ZygoteDied(self.death)
            self._on_orphaned = on_orphaned
            # The request and its answer are not cancelled halfway: half a
            # request, or an answer left unread, would put every later one
            # out of step (a node given its predecessor's pid).
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + FORK_TIMEOUT
                try:
                    await self._stream.send_all(_pipe.encode(("start", None)))
                    await self._stream.socket.sendmsg(
                        [b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
                    )
                    return await self._next_pid.receive()
                except (trio.BrokenResourceError, trio.EndOfChannel, OSError) as exc:
                    raise ZygoteDied(self.death or _zygote_death(None)) from exc
                finally:
                    self._on_orphaned = None
            assert self.pid is not None  # (set with the stream)
            log.error(
                "%s: its node process starter (the zygote, pid %d) did not answer in %g s: "
                "it is killed",
                self._owner,
                self.pid,
                FORK_TIMEOUT,
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            raise ZygoteDied(f"the zygote did not answer in {FORK_TIMEOUT:g} s")

    async def wait(self, pid: int) -> int | None:
        """The return code of node process *pid* (forked by :meth:`start`), once
        it has exited; None if the zygote died before it did (unknown).

        Raises:
            KeyError: *pid* was never forked, or was forgotten (:meth:`forget`).
        """
        child = self._children[pid]
        await child.exited.wait()
        return child.code

    def forget(self, pid: int) -> None:
        """Forget node process *pid*, which exited, once nothing waits for it
        any more (else a Worker would keep every node it ever ran)."""
        child = self._children.get(pid)
        if child is not None and child.exited.is_set():
            del self._children[pid]


class _Pending:
    """A command sent to the child, until it answers (or dies)."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: tuple[str, str] | None = None
        self.result: Any = None


class NodeProcess:
    """Runs a node in a child process; its lifecycle is :class:`NodeRuntime`'s.

    Args:
        name: the node's name (for errors and logs).
        node: the node, pickled with cloudpickle (it is unpickled only in the child).
        zygote: the Worker's zygote, which forks the child.
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
        zygote: Zygote,
        runtime: dict[str, Any],
        clock_offset_ns: int = 0,
        on_state: Callable[[NodeState, str | None], None] | None = None,
    ) -> None:
        self.name = name
        self._spec = {
            "node": node,
            "runtime": runtime,
            "sys_path": list(sys.path),
            # The Worker's levels, which the node's process takes: its root
            # logger's, chimera's own, and the nodes' (INFO by default).
            "log_levels": {
                name: logging.getLogger(name).getEffectiveLevel()
                for name in ("", "chimera", NODE_LOGGER)
            },
            "clock_offset_ns": clock_offset_ns,
        }
        self._zygote = zygote
        self._on_state = on_state
        #: The node's own logger, in this process: what is said here of its
        #: failure is the node's record (its Worker sends it to the Manager,
        #: into ``nodes.log``), said once, as its runtime says a raise.
        self._node_log = logging.getLogger(f"{NODE_LOGGER}.{name}")
        self.state = NodeState.INITIALIZED
        self._address: str | None = None
        self._pid: int | None = None
        self._stdin: trio.lowlevel.FdStream | None = None
        self._nursery: trio.Nursery | None = None
        self._kill_scope = trio.CancelScope()
        self._write_lock = trio.Lock()
        #: The commands sent and not yet answered, by name, oldest first (the
        #: child answers those of one name in order).
        self._pending: dict[str, deque[_Pending]] = {}
        #: Set once :meth:`open` is done (the node made, or not): no command
        #: goes to the child before its spec.
        self._opened = trio.Event()
        self._made = False
        #: Set once the child has exited and its events are all taken in.
        self._exited = trio.Event()
        #: Set once :meth:`_supervise` is done, the child ended.
        self._supervised = trio.Event()
        self._code: int | None = None
        #: What the child last said of its steps (``at_ns`` None: it said nothing yet).
        self._stats: dict[str, Any] = {"steps": 0, "dropped": 0, "at_ns": None}
        self._closing = False
        #: Why the process died, once it has (None while it runs, or if asked to exit).
        self._death: str | None = None
        #: Whether the zygote died before the process exited (see :meth:`_orphaned`).
        self._orphan = False

    @property
    def address(self) -> str | None:
        """The address of the node's outlet; None for a node without outputs."""
        return self._address

    @property
    def pid(self) -> int | None:
        """The child's process id (and process group id), once started."""
        return self._pid

    # --- lifecycle -------------------------------------------------------------

    async def open(self, nursery: trio.Nursery) -> None:
        """Start the child under *nursery* and make the node there (its outlet bound).

        Raises:
            NodeError: the node cannot be made in the child (its class does
                not import there, its ``__init__`` state does not unpickle, ...)
                or the child died, or the zygote did.
        """
        try:
            await self._open(nursery)
        finally:
            self._opened.set()

    async def _open(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        stdin, stdin_ours = os.pipe()
        try:
            events_ours, events = os.pipe()
        except OSError:  # (too many open files)
            os.close(stdin)
            os.close(stdin_ours)
            raise
        try:
            self._pid = await self._zygote.start(stdin, events, self._orphaned)
        except BaseException as exc:
            os.close(stdin_ours)
            os.close(events_ours)
            if isinstance(exc, ZygoteDied):
                raise NodeError(self.name, str(exc)) from None
            raise
        finally:
            os.close(stdin)
            os.close(events)
        self._stdin = trio.lowlevel.FdStream(stdin_ours)
        nursery.start_soon(self._supervise)
        nursery.start_soon(self._read_events, trio.lowlevel.FdStream(events_ours))
        pending = self._expect("create")
        await self._send_quietly(self._spec)
        await self._wait(pending)
        self._made = True

    async def connect(self, addresses: dict[str, str]) -> None:
        """Connect the node's inlets to its inputs' outlets. Raises NodeError."""
        await self._command("connect", addresses)

    async def prep(self) -> None:
        """Run the node's ``prep``. Raises NodeError."""
        await self._command("prep")

    async def run(self, stopped: bool = False) -> None:
        """Run the node until it stops (see :meth:`NodeRuntime.run`).

        A process that dies meanwhile makes the node FAILED; this returns then.

        Raises:
            NodeError: ``teardown`` raised.
        """
        try:
            await self._command("run", stopped)
        except NodeError:
            if self._death is None:
                raise

    def stats(self) -> dict[str, int]:
        """The node's ``steps`` and ``dropped``, as its process last reported them."""
        return dict(self._stats)

    async def gather(self) -> list[bytes] | None:
        """The frames of the node's last chunk (see :meth:`NodeRuntime.gather`).

        Raises:
            NodeError: the process is gone.
        """
        return await self._command("gather")

    async def step_once(self) -> None:
        """Step once (see :meth:`NodeRuntime.step_once`). Raises NodeError."""
        await self._command("step")

    async def set_recording(self, on: bool) -> None:
        """Whether the node's ``save_*`` calls save (see :meth:`NodeRuntime.set_recording`);
        told to the child before any command sent after this returns."""
        await self._send_once_made(("record", (on,)))

    async def forget(self, names: list[str]) -> None:
        """The nodes *names* are gone (see :meth:`NodeRuntime.forget`); told
        to the child before any command sent after this returns."""
        await self._send_once_made(("forget", (names,)))

    def request_stop(self) -> None:
        """Ask a source to stop after its current step."""
        self._tell(("stop", ()))

    def follow_clock(self, offset_ns: int) -> None:
        """From now on, stamp chunks with this machine's clock plus *offset_ns*."""
        self._spec["clock_offset_ns"] = offset_ns  # if the child is still to get it
        self._tell(("clock", (offset_ns,)))

    def _tell(self, command: tuple[str, tuple]) -> None:
        """Send *command* soon, once the child has its spec (else do nothing)."""
        if self._stdin is not None and not self._exited.is_set():
            assert self._nursery is not None  # (_open set it before _stdin)
            self._nursery.start_soon(self._send_quietly, command)

    def kill(self) -> None:
        """Kill the node's process group now (SIGKILL): its ``teardown`` does
        not run. Its exit is taken as any other: the node goes FAILED."""
        if self._pid is not None and not self._exited.is_set():
            _signal_group(self._pid, signal.SIGKILL)

    async def aclose(self) -> None:
        """Close the node and end its process (see :meth:`_stop_process`).

        Returns within about :data:`EXIT_GRACE` + :data:`TERM_GRACE` seconds;
        leaves no process of the node's group behind.
        """
        if self._pid is None:
            return
        with trio.CancelScope(shield=True):
            self._kill_scope.cancel()
            await self._exited.wait()
            # (Its exit is known; nothing waits for it once _supervise is done:
            # before, its _stop_process could still ask, and found it forgotten.)
            await self._supervised.wait()
            self._zygote.forget(self._pid)
            _signal_group(self._pid, signal.SIGKILL)  # whatever the node started
            assert self._stdin is not None  # (_open set it with _pid)
            await self._stdin.aclose()
        if self.state is not NodeState.FAILED:
            self._set_state(NodeState.SHUTDOWN, None)

    # --- the child -------------------------------------------------------------

    async def _supervise(self) -> None:
        """Wait for the child to exit; cancelled first, stop it in steps."""
        assert self._pid is not None  # (_open starts this task once it has the pid)
        try:
            with self._kill_scope:
                self._code = await self._zygote.wait(self._pid)
        finally:
            try:
                with trio.CancelScope(shield=True):
                    await self._stop_process()
            finally:
                self._supervised.set()

    def _orphaned(self, death: str) -> None:
        """The zygote died (*death* says how) before the child exited: nothing
        reports its exit now. End it in steps (:meth:`_stop_process`; its exit
        is seen without the zygote), and fail the node -- unless it had ended
        (STOPPED, SAVED) or is being closed. The commands it carries out then
        fail (once it has answered, or exited: a run returns once its
        ``teardown`` ran and its files are closed)."""
        self._orphan = True
        if not self._closing and self.state not in (*_ENDED, NodeState.FAILED):
            self._death = death
            self._node_log.error("node %r failed: %s", self.name, death)
            self._set_state(NodeState.FAILED, death)
        self._closing = True
        self._kill_scope.cancel()

    async def _stop_process(self) -> None:
        """End the child in steps, unless it has exited.

        ``close`` -- the node's ``teardown`` runs -- and :data:`EXIT_GRACE`
        seconds to exit; then SIGTERM to its process group and
        :data:`TERM_GRACE` seconds; then SIGKILL.
        """
        assert self._pid is not None  # (_supervise calls this, once _open has the pid)
        if self._code is not None:
            return
        self._closing = True
        await self._send_quietly(("close", ()))
        for grace, signum in ((EXIT_GRACE, signal.SIGTERM), (TERM_GRACE, signal.SIGKILL)):
            with trio.move_on_after(grace):
                self._code = await self._zygote.wait(self._pid)
                return
            log.warning("node %r did not exit within %.1f s: %s", self.name, grace, signum.name)
            _signal_group(self._pid, signum)
        with trio.move_on_after(KILL_GRACE):
            self._code = await self._zygote.wait(self._pid)
            return
        log.error("node %r (pid %d): no exit reported after SIGKILL", self.name, self._pid)

    async def _read_events(self, events: trio.lowlevel.FdStream) -> None:
        """Take the child's events until it exits, then tell how it ended.

        Shielded: closing relies on it, and it ends when the child does, which
        :meth:`_stop_process` makes sure of: the events pipe ends with the
        child, or, if a process it forked holds the pipe (a ``multiprocessing``
        helper), once :meth:`_end_holders` has killed its group.
        """
        assert self._pid is not None  # (_open starts this task once it has the pid)
        with trio.CancelScope(shield=True):
            crash: str | None = None
            crashed: str | None = None  # (its traceback)
            async with events, trio.open_nursery() as nursery:

                async def take() -> None:
                    nonlocal crash, crashed
                    crash, crashed = await self._take_events(events)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(take)
                nursery.start_soon(self._end_holders, nursery.cancel_scope)
            code = None
            with trio.move_on_after(KILL_GRACE):
                code = await self._zygote.wait(self._pid)
            if code is not None:
                # What it started ends with it, now: those that held its pipes
                # were killed above, but not those that never held them (a
                # helper of multiprocessing's "spawn" or "forkserver").
                _signal_group(self._pid, signal.SIGKILL)
            if self._orphan and crash is None:
                pass  # how it exited is unknown: _orphaned said what it means
            elif not self._closing or code != 0:
                self._death = crash or exit_reason(code)
                # A node whose run had ended (its teardown ran, its files are
                # closed) stays STOPPED or SAVED: its process ended idle. A
                # crash fails it even once SHUTDOWN: its runtime says so as
                # the error leaves it. A node FAILED already has said why.
                ended = crash is None and self.state in _ENDED
                if ended:
                    if not self._closing:
                        log.warning(
                            "node %r: %s after it had ended (%s): it stays so",
                            self.name,
                            self._death,
                            self.state.value,
                        )
                elif self.state is NodeState.FAILED:
                    if crashed is not None:  # (after its failure: chimera's own error)
                        log.error("node %r crashed:\n%s", self.name, crashed.rstrip())
                else:
                    if crashed is None:
                        self._node_log.error("node %r failed: %s", self.name, self._death)
                    else:
                        self._node_log.error(
                            "node %r failed: %s\n%s", self.name, self._death, crashed.rstrip()
                        )
                    self._set_state(NodeState.FAILED, self._death)
            for name in list(self._pending):
                while name in self._pending:
                    self._answer(name, (self._death or "its process exited", ""))
            self._exited.set()

    async def _end_holders(self, reading: trio.CancelScope) -> None:
        """Once the child has exited (as the zygote says), kill the processes
        it started that still hold its events pipe, after :data:`HELD_GRACE`:
        its process group (they would keep the node RUNNING for ever, and
        its links open). Cancel *reading* if the pipe stays open even then
        (a process that left the group). Nothing if the zygote died first."""
        assert self._pid is not None  # (_read_events calls this, once _open has the pid)
        try:
            if await self._zygote.wait(self._pid) is None:
                return  # the zygote died: the exit is unknown (see _orphaned)
        except KeyError:  # forgotten: it exited and was closed
            pass
        await trio.sleep(HELD_GRACE)
        log.warning(
            "node %r: its process exited, and processes it started hold its pipes: they are killed",
            self.name,
        )
        _signal_group(self._pid, signal.SIGKILL)
        await trio.sleep(KILL_GRACE)
        log.error("node %r: its events pipe is still open; it is taken as ended", self.name)
        reading.cancel()

    async def _take_events(self, events: trio.lowlevel.FdStream) -> tuple[str | None, str | None]:
        """Handle the child's events until the pipe ends; why it crashed, if
        it said, and the traceback of a crash of chimera's own there."""
        reader = _pipe.MessageReader(events)
        crash: str | None = None
        crashed: str | None = None
        try:
            while (event := await reader.read()) is not None:
                kind = event[0]
                if kind == "state":
                    if not self._orphan:  # (_orphaned said what it is)
                        self._set_state(NodeState(event[1]), event[2])
                elif kind == "stats":
                    self._stats = event[1]
                elif kind == "log":
                    logging.getLogger(event[2]).log(event[1], "%s", event[3])
                elif kind == "created":
                    self._address = event[1]
                    self._answer("create", self._orphan_failure())
                elif kind == "done":
                    self._answer(event[1], self._orphan_failure(), event[2])
                elif kind == "failed":
                    if event[1] == "create":  # never made: that is why its process ends
                        crash = event[2]
                        self._set_state(NodeState.FAILED, crash)
                    self._answer(event[1], event[2:])
                elif kind == "crashed":  # (said once it has exited, with how)
                    crash, crashed = event[1], event[2]
        except _pipe.PipeError as exc:
            log.error("node %r: bad message from its process: %s", self.name, exc)
            self._kill_scope.cancel()
        return crash, crashed

    # --- helpers ---------------------------------------------------------------

    def _orphan_failure(self) -> tuple[str, str] | None:
        """The error of a command the child carried out, if the zygote's death failed the node."""
        return (self._death, "") if self._orphan and self._death is not None else None

    async def _command(self, name: str, *args: Any) -> Any:
        """Have the child carry out *name*; its result. Raises NodeError."""
        await self._opened.wait()
        if self._exited.is_set():
            raise NodeError(self.name, self._death or "its process exited")
        if not self._made:
            raise NodeError(self.name, "the node was not made in its process")
        pending = self._expect(name)
        await self._send_quietly((name, args))
        return await self._wait(pending)

    def _expect(self, name: str) -> _Pending:
        """A command *name* about to be sent: its answer, to wait for."""
        pending = _Pending()
        self._pending.setdefault(name, deque()).append(pending)
        return pending

    async def _wait(self, pending: _Pending) -> Any:
        await pending.done.wait()
        if pending.error is not None:
            message, text = pending.error
            raise NodeError(self.name, message, text or "")
        return pending.result

    def _answer(self, name: str, error: tuple[str, str] | None, result: Any = None) -> None:
        waiting = self._pending.get(name)
        if waiting:
            pending = waiting.popleft()
            if not waiting:
                del self._pending[name]
            pending.error, pending.result = error, result
            pending.done.set()

    async def _send_once_made(self, message: Any) -> None:
        """Send *message* to the child once it has its spec (if the node was made)."""
        await self._opened.wait()
        if self._made:
            await self._send_quietly(message)

    async def _send_quietly(self, message: Any) -> None:
        """Send *message* to the child; if it is gone, its death is reported elsewhere."""
        assert self._stdin is not None  # (nothing is sent before _open set it)
        try:
            async with self._write_lock:
                await self._stdin.send_all(_pipe.encode(message))
        except (trio.BrokenResourceError, trio.ClosedResourceError, BrokenPipeError):
            pass

    def _set_state(self, state: NodeState, reason: str | None) -> None:
        self.state = state
        if self._on_state is not None:
            self._on_state(state, reason)
