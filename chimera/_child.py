"""A node's child process, forked by its Worker's zygote (:mod:`chimera._zygote`).

The Worker writes the node's spec, then commands, to the child's stdin; the
child answers on a pipe of its own (stdout and stderr stay the Worker's, for
what the node prints). ``python -m chimera._child FD`` runs one the same
way, FD being the events pipe.
Both carry :mod:`chimera._pipe` messages:

- stdin, Worker to child: the spec ``{"node": cloudpickled node, "runtime":
  NodeRuntime keywords, "sys_path": [...], "log_level": int,
  "clock_offset_ns": int}``, then commands ``(name, args)``: ``connect``,
  ``prep``, ``step``, ``run``, ``stop``, ``gather``, ``record`` (whether
  ``save_*`` saves), ``close``, and ``clock`` (a new offset from this
  machine's clock to the cluster's, in ns).
- the events pipe, child to Worker: ``("created", address)`` once the node's outlet is
  bound; ``("state", state, reason)`` at each change of the node's state;
  ``("done", command, result)`` or ``("failed", command, message, traceback)``
  when a command ends (``"create"`` when the node cannot even be made; the
  result of ``gather`` is the frames of the node's last chunk, as bytes, or
  None; of the others, None);
  ``("log", level, logger name, text)`` for each log record at or above the
  Worker's levels (of its root logger, ``chimera`` and ``chimera.node``);
  ``("stats", {"steps": n, "dropped": n})`` twice a second while they change;
  ``("crashed", message, traceback)`` before the child dies of an error of its own
  (the traceback None if the node's record said it).

The Trio loop owns the main thread; the node's code runs in worker threads
(see :class:`~chimera._runtime.NodeRuntime`). A daemon "lifeline" thread
reads stdin: at its end -- the Worker closed it, or died -- the node is
cancelled (its ``teardown`` still runs), and if the process has not exited
:data:`ORPHAN_GRACE` seconds later, the thread ends it.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import signal
import sys
import threading
import time
import traceback
from functools import partial
from typing import Any

import cloudpickle
import trio

from . import _pipe
from ._data import cluster_time_ns, set_clock
from ._errors import NodeError
from ._runtime import TEARDOWN_TIMEOUT, NodeRuntime

#: Seconds between reports of the node's statistics to the Worker.
STATS_PERIOD = 0.5
#: Seconds an orphaned child (its stdin ended) has to finish before it is ended.
ORPHAN_GRACE = TEARDOWN_TIMEOUT + 5.0


class _Events:
    """Sends messages to the Worker from any thread, in order, without blocking.

    A thread of its own writes them to the pipe, so a Worker slow to read
    never blocks the node's Trio loop or its code.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write, name="chimera-events", daemon=True)
        self._thread.start()

    def send(self, *message: Any) -> None:
        self._queue.put(_pipe.encode(message))

    def _write(self) -> None:
        while (data := self._queue.get()) is not None:
            try:
                _pipe.write_blocking(self._fd, data)
            except OSError:  # the Worker is gone: nobody to tell
                return

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (for at most *timeout* seconds), then stop."""
        self._queue.put(None)
        self._thread.join(timeout)


class _ForwardLogs(logging.Handler):
    """Sends each log record to the Worker, which logs it there."""

    def __init__(self, events: _Events, level: int) -> None:
        super().__init__(level)
        self._events = events

    def emit(self, record: logging.LogRecord) -> None:
        try:  # format(): the message, then the traceback if any
            self._events.send("log", record.levelno, record.name, self.format(record))
        except Exception:
            self.handleError(record)


def _cannot_be_made(exc: Exception) -> str:
    """Why the node could not be unpickled or given its runtime, in words."""
    reason = f"the node cannot be made: {exc!r}"
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        package = exc.name.split(".")[0]
        reason += (
            f" (install {package!r} where the node runs, or ship it: commit_graph(..., "
            f"send_packages=[{{'name': {package!r}, 'path': ...}}]))"
        )
    return reason


def _read_commands(stdin: Any, token: trio.lowlevel.TrioToken, send: Any) -> None:
    """The lifeline: forward each command into the Trio loop; at the end, end the process.

    It never waits for the loop (``run_sync_soon``, not ``trio.from_thread``):
    a loop held up for good (an ``async def step`` blocked in a call that never
    returns) must not keep it from ending the process."""

    def forward(command: tuple) -> None:
        try:
            send.send_nowait(command)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the node no longer reads commands: it is ending

    try:
        while (command := _pipe.read_blocking(stdin)) is not None:
            token.run_sync_soon(forward, command)
    except (_pipe.PipeError, OSError, ValueError):
        pass
    except trio.RunFinishedError:
        return
    WORKER_GONE.set()
    try:
        token.run_sync_soon(send.close)
    except trio.RunFinishedError:
        return
    time.sleep(ORPHAN_GRACE)
    end_group()


#: Set once the node's stdin has ended before a ``close`` command: its Worker is
#: gone (it would have killed the node's process group once the node exited).
WORKER_GONE = threading.Event()


def end_group() -> None:
    """End this process and every process it started (its process group: a
    node's process leads its own), with SIGKILL: what a Worker does once a
    node's process exits, for a node whose Worker is gone."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.killpg(0, signal.SIGKILL)


async def _report_stats(runtime: NodeRuntime, events: _Events) -> None:
    last = None
    while True:
        await trio.sleep(STATS_PERIOD)
        if (stats := runtime.stats()) != last:
            events.send("stats", {**stats, "at_ns": cluster_time_ns()})
            last = stats


async def _run_command(
    events: _Events, command: str, call: Any, *args: Any, stats_of: NodeRuntime | None = None
) -> None:
    """Run a command, then say how it ended; *stats_of*: after sending that
    runtime's last statistics (a run's: its Worker reports them once it ends)."""
    ended: tuple[str | None, ...]
    try:
        await call(*args)
    except NodeError as exc:
        ended = ("failed", command, exc.message, exc.traceback)
    except Exception as exc:
        ended = ("failed", command, f"{command}: {exc!r}", traceback.format_exc())
    else:
        ended = ("done", command, None)
    if stats_of is not None:
        events.send("stats", {**stats_of.stats(), "at_ns": cluster_time_ns()})
    events.send(*ended)


async def _serve(runtime: NodeRuntime, stdin: Any, events: _Events) -> None:
    send, commands = trio.open_memory_channel[tuple[str, tuple]](math.inf)
    threading.Thread(
        target=_read_commands,
        args=(stdin, trio.lowlevel.current_trio_token(), send),
        name="chimera-lifeline",
        daemon=True,
    ).start()
    async with runtime:
        events.send("created", runtime.address)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_report_stats, runtime, events)
            async for name, args in commands:
                if name == "close":
                    break
                if name == "stop":
                    runtime.request_stop()
                elif name == "clock":
                    _follow_clock(args[0])
                elif name == "record":
                    await runtime.set_recording(args[0])
                elif name == "forget":
                    await runtime.forget(args[0])
                elif name == "gather":
                    frames = await runtime.gather()
                    result = None if frames is None else [bytes(frame) for frame in frames]
                    events.send("done", name, result)
                elif name == "run":
                    nursery.start_soon(
                        partial(_run_command, events, name, runtime.run, *args, stats_of=runtime)
                    )
                elif name in ("connect", "prep"):
                    await _run_command(events, name, getattr(runtime, name), *args)
                elif name == "step":
                    nursery.start_soon(
                        partial(_run_command, events, name, runtime.step_once, stats_of=runtime)
                    )
                else:
                    events.send("failed", name, f"unknown command {name!r}", None)
            nursery.cancel_scope.cancel()  # a run still going: its teardown runs


def main(events_fd: int) -> None:
    """Run the node whose spec arrives on stdin, reporting on *events_fd*."""
    os.set_inheritable(events_fd, False)  # not for what the node starts
    events = _Events(events_fd)
    stdin = os.fdopen(0, "rb", buffering=0)
    try:
        spec = _pipe.read_blocking(stdin)
        if spec is None:
            return
        sys.path[:0] = [p for p in spec["sys_path"] if p not in sys.path]
        _follow_clock(spec["clock_offset_ns"])
        levels = spec["log_levels"]  # the Worker's, by logger name ("" the root)
        logging.getLogger().addHandler(_ForwardLogs(events, min(levels.values())))
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        try:
            node = cloudpickle.loads(spec["node"])
            _name_the_process(node.name)
            runtime = NodeRuntime(node, **spec["runtime"], on_state=_state_sender(events))
        except Exception as exc:
            events.send("failed", "create", _cannot_be_made(exc), traceback.format_exc())
            return
        try:
            trio.run(_serve, runtime, stdin, events)
        except BaseException as exc:
            said = runtime.crash_said  # (by the node's record: its traceback is not sent twice)
            events.send("crashed", f"{exc!r}", None if said else traceback.format_exc())
            # The Worker says it (nobody would see a traceback this process prints).
            raise SystemExit(1) from None
    finally:
        events.close()
        if WORKER_GONE.is_set():
            end_group()


def _name_the_process(name: str) -> None:
    """Name this process ``chimera:NAME`` where tools look for a process's
    name (``top``, ``ps -o comm``, ``pgrep``; Linux keeps its first 15 bytes);
    its command line stays the zygote's. Nothing where there is no
    ``/proc/self/comm``."""
    try:
        with open("/proc/self/comm", "wb") as comm:
            comm.write(f"chimera:{name}".encode()[:15])
    except OSError:
        pass


def _follow_clock(offset_ns: int) -> None:
    """Stamp chunks with cluster time: this clock plus the Worker's estimated offset."""
    set_clock(lambda: time.time_ns() + offset_ns)


def _state_sender(events: _Events) -> Any:
    def send_state(state: Any, reason: str | None) -> None:
        events.send("state", state.value, reason)

    return send_state


if __name__ == "__main__":
    main(int(sys.argv[1]))
