"""The Worker: runs nodes on one machine, under a Manager it connects out to.

:class:`AsyncWorker` keeps one WebSocket to the Manager for the whole
session (so the Worker needs no open port of its own for control), and over
it estimates the offset from its clock to the Manager's (see
:mod:`chimera._clock`).
"""

from __future__ import annotations

import base64
import errno
import importlib
import itertools
import logging
import math
import os
import resource
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import cloudpickle
import h11  # (trio-websocket's HTTP: what it raises when what answers is not HTTP)
import httpx
import msgpack
import trio
import trio_websocket

from . import _protocol as protocol
from ._clock import ClockEstimator
from ._collect import move_folder, sees_probe, send_folder
from ._data import cluster_time_ns, use_clock
from ._errors import NodeError
from ._manifest import Manifest, files_under, manifest_path
from ._node import NODE_LOGGER, WORKERS_HERE, NodeState
from ._packages import extract
from ._process import NodeProcess, Zygote
from ._recording import check_name
from ._runtime import TEARDOWN_TIMEOUT, Input, NodeRuntime
from ._service import Service, run_all
from ._websocket import HandshakeEnded, open_websocket

__all__ = ["AsyncWorker"]

log = logging.getLogger("chimera.worker")

#: Clock exchanges at check-in, 50 ms apart, then one every CLOCK_PERIOD seconds.
CLOCK_BURST = 8
CLOCK_PERIOD = 1.0
#: Seconds between reports of node statistics to the Manager.
STATS_PERIOD = 1.0
#: Longest wait for a download from the Manager, or an upload to it, in seconds.
HTTP_TIMEOUT = 60.0
#: After closing its nodes for this many seconds, a Worker logs those not closed yet.
CLOSE_PATIENCE = 2.0
#: Leaving, the longest wait for what it has to tell the Manager (its nodes' last states).
FLUSH_TIMEOUT = 2.0
#: Longest path a Unix socket may have (``sun_path``: 108 bytes on Linux, 104 on macOS).
_UNIX_PATH_MAX = 100


class _ShutDownWhileConnecting(Exception):
    """:meth:`AsyncWorker.shutdown` ended a session before its check-in was done."""


def _why_unreachable(exc: BaseException, timeout: float) -> str:
    """Why connecting to a manager failed, in words (the exceptions' own texts are often empty)."""
    if isinstance(exc, trio.TooSlowError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, trio_websocket.ConnectionRejected):
        return f"what answers there is not a chimera manager (HTTP {exc.status_code})"
    if isinstance(exc, protocol.ProtocolError):
        return f"what answers there is not a chimera manager of this version ({exc})"
    if isinstance(exc, h11.ProtocolError):
        return f"what answers there is not a chimera manager (it does not speak HTTP: {exc})"
    if isinstance(exc, HandshakeEnded):
        return f"{exc}: not a chimera manager, or a tunnel with no manager behind it"
    if isinstance(exc, trio_websocket.ConnectionClosed):
        return f"it closed the connection during check-in ({exc.reason})"
    cause = exc.__cause__ if isinstance(exc, trio_websocket.HandshakeError) else exc
    text = str(cause) if cause is not None else ""
    return f"{text or type(exc).__name__} (is the manager running, on that host and port?)"


def _can_listen_on(host: str) -> bool:
    """Whether a TCP socket can listen on *host* (an IP address) here."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, 0))
    except OSError:
        return False
    return True


def _hint(exc: Exception) -> str:
    """What to do about *exc*, a command's failure, if there is a known remedy."""
    if isinstance(exc, OSError) and exc.errno == errno.EMFILE:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return (
            f" (the worker may have {limit} files open, sockets and pipes included, and each "
            "node takes a few: raise the limit where it starts, e.g. `ulimit -n 4096`)"
        )
    return ""


def _remove_emptied_folders(folders: list[Path]) -> None:
    """Remove the node folders that hold no file (a collect moved them into
    its session folder), with their manifests: a Worker that runs graph after
    graph keeps nothing of them. Removes folders only, never a file.
    Blocking: run it in a thread."""
    for folder in folders:
        if not folder.is_dir() or files_under(folder):
            continue
        for inside, _, _ in os.walk(folder, topdown=False):
            os.rmdir(inside)
        manifest_path(folder).unlink(missing_ok=True)


def _how_many(files: list[Path]) -> str:
    """*files* counted, in words: ``"3 files (1.2 MB)"``."""
    return f"{len(files)} files ({sum(path.stat().st_size for path in files) / 1e6:.1f} MB)"


class _ForwardNodeLogs(logging.Handler):
    """Sends the log records of this Worker's nodes to the Manager.

    Create it in the Worker's Trio thread; records may come from any thread
    (inline nodes log from their own threads).
    """

    def __init__(self, worker: AsyncWorker) -> None:
        super().__init__(logging.DEBUG)
        self._worker = worker
        self._token = trio.lowlevel.current_trio_token()

    def emit(self, record: logging.LogRecord) -> None:
        node = record.name.removeprefix(NODE_LOGGER + ".")
        if node not in self._worker._node_names.values():
            return  # (another Worker's node, in this process: that one's handler takes it)
        self._as_if_unhandled(record, node)
        if not self._worker.connected:
            return
        try:
            message = protocol.make(
                "log",
                node=node,
                level=record.levelno,
                logger=record.name,
                text=self.format(record),  # the message, then the traceback if any
                time_ns=self._worker.clock.now(),
            )
            # A Trio channel is not thread-safe: the Trio thread sends it, in
            # the order records came from every thread (a record of the Trio
            # thread too: a node's failure comes after what its thread logged).
            self._token.run_sync_soon(self._worker._tell, message)
        except trio.RunFinishedError:
            pass  # the Worker is gone
        except Exception:
            self.handleError(record)

    def _as_if_unhandled(self, record: logging.LogRecord, node: str) -> None:
        """Show *record*, of this Worker's *node*, as Python does one that no
        handler takes (WARNING and above, on stderr: :data:`logging.lastResort`),
        if no handler but the Workers' takes it: these must not hide the nodes'
        warnings, which Python's default shows (those of a Manager's Workers in
        another process show)."""
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            if any(not isinstance(handler, _ForwardNodeLogs) for handler in logger.handlers):
                return
            logger = logger.parent if logger.propagate else None
        last = logging.lastResort
        if last is not None and record.levelno >= last.level:
            # Named as the Manager names the records of its Workers' nodes.
            named = logging.makeLogRecord(record.__dict__)
            named.msg, named.args = f"[{self._worker.name}/{node}] {record.getMessage()}", None
            last.handle(named)


class AsyncWorker(Service):
    """A Worker, as an async context manager.

    Args:
        name: the Worker's name (mappings may use it).
        port: kept for ChimeraPy compatibility (a Worker opens no control port).
        delete_temp: whether its temporary folder goes when it shuts down. It
            stays, and the Worker logs where, while it holds files its nodes
            saved that were never collected.
        id: its id; a fresh one when None.
        token: what to present to a Manager that asks for one (default: the
            ``CHIMERA_TOKEN`` environment variable; an empty one is none).

    Raises:
        ValueError: *name* cannot name a folder (it names the Worker's in a
            session): empty, ``.``, ``..``, or with ``/``, ``\\`` or NUL.
    """

    def __init__(
        self,
        name: str,
        port: int = 10000,
        delete_temp: bool = True,
        id: str | None = None,
        *,
        token: str | None = None,
    ) -> None:
        self.name = check_name(name, "worker name")
        self.port = port
        self.delete_temp = delete_temp
        #: Whether nodes may have saved files since the last collect.
        self._uncollected = False
        self.id = id or uuid.uuid4().hex
        self._token = protocol.token_or_default(token)
        #: The offset from this Worker's clock to the Manager's.
        self.clock = ClockEstimator()
        #: Woken by each clock sample, and when the connection ends.
        self._clock_changed = trio.lowlevel.ParkingLot()
        self._nursery: trio.Nursery | None = None
        self._connected = False
        #: Whether a connect() is under way (a second one at once is refused).
        self._connecting = False
        self._runtimes: dict[str, NodeRuntime | NodeProcess] = {}
        #: Requests making nodes under way, and woken as each ends.
        self._creating = 0
        self._created = trio.lowlevel.ParkingLot()
        #: Where the Manager serves HTTP, and a client for it while connected.
        self._manager_url: str | None = None
        self._http: httpx.AsyncClient | None = None
        #: This Worker's temporary folder, once it needs one.
        self._temp: Path | None = None
        #: Numbers the Unix sockets of node outlets in the temporary folder.
        self._socket_numbers = itertools.count()
        self._runs: dict[str, trio.Event] = {}
        self._run_scopes: list[trio.CancelScope] = []
        self._session_scope: trio.CancelScope | None = None
        #: The name of each node this Worker runs, by id (their logs go to the Manager).
        self._node_names: dict[str, str] = {}
        #: The state last told of each node, with its reason.
        self._reported: dict[str, tuple[NodeState, str | None]] = {}
        #: The closings of the nodes under way (_close_nodes), and their one timer.
        self._closings = 0
        self._closing_timer = trio.CancelScope()
        #: Set once the Worker closes its nodes to leave: it answers no more requests.
        self._leaving = False
        #: Set when the Manager closed the connection, or fell silent, while
        #: this Worker stayed: what the nodes saved is then kept (see
        #: _remove_temp_folder).
        self._manager_gone = False
        #: The folder each node this Worker runs saves into, by id.
        self._node_folders: dict[str, Path] = {}
        #: The name of the node of each folder made under ``nodes/`` (folders
        #: are named by node id): what a warning of kept files says.
        self._folder_nodes: dict[str, str] = {}
        self._zygote: Zygote | None = None
        #: The scope of each zygote's task (one, and those of zygotes that died
        #: while their node processes have not all exited).
        self._zygote_scopes: list[trio.CancelScope] = []
        self._shared_offset = 0
        #: The address this Worker reached the Manager from, once connected.
        self._host: str | None = None
        #: The addresses the Manager asked nodes to listen on that are not this
        #: machine's (said once each).
        self._not_here: set[str] = set()
        self._zygote_lock = trio.Lock()
        self._events_in, self._events_out = trio.open_memory_channel[str](math.inf)
        #: The messages told (:meth:`_tell`) and not yet sent, or given up on:
        #: one taken from the channel counts until its send has ended (a
        #: waiting sender is handed it at once: the channel's buffer never
        #: holds it). Woken when it falls to 0.
        self._unsent = 0
        self._sent_all = trio.lowlevel.ParkingLot()

    @property
    def nodes(self) -> dict[str, NodeState]:
        """The state of each node this Worker runs, by node id."""
        return {node_id: runtime.state for node_id, runtime in self._runtimes.items()}

    @property
    def connected(self) -> bool:
        """Whether the Worker is connected to a Manager."""
        return self._connected

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[AsyncWorker]:
        handler = _ForwardNodeLogs(self)
        logging.getLogger(NODE_LOGGER).addHandler(handler)
        WORKERS_HERE.add(self.id)
        try:
            async with self._nursery_running():
                yield self
        finally:
            WORKERS_HERE.discard(self.id)
            logging.getLogger(NODE_LOGGER).removeHandler(handler)

    @asynccontextmanager
    async def _nursery_running(self) -> AsyncIterator[None]:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                yield
            finally:
                self._leaving = True
                with trio.CancelScope(shield=True):
                    await self._close_nodes()
                    await self._flush_events()  # the Manager hears they were closed
                for scope in self._zygote_scopes:
                    scope.cancel()
                with trio.CancelScope(shield=True):
                    await self._remove_temp_folder()
                self._nursery = None
                nursery.cancel_scope.cancel()

    async def shutdown(self) -> None:
        """Close every node (stopping those that run) and leave the Manager.

        Raises:
            RuntimeError: called outside the Trio run that entered the Worker.
        """
        self._check_run("shutdown")
        self._leaving = True
        await self._close_nodes()
        await self._flush_events()  # the Manager hears they were closed
        if self._session_scope is not None:
            self._session_scope.cancel()

    async def connect(
        self,
        host: str,
        port: int,
        timeout: float = 10.0,  # noqa: ASYNC109 (ChimeraPy's signature)
    ) -> bool:
        """Connect to the Manager at *host*:*port* and check in.

        Returns:
            True once the Manager welcomed the Worker; False if it could not be
            reached within *timeout* seconds, or what answers is not a chimera
            Manager of this protocol version, or it closed the connection
            during check-in, or :meth:`shutdown` was called meanwhile (the
            reason is logged).

        Raises:
            PermissionError: the Manager refused the Worker, saying why: a wrong
                or missing token, or a Worker of the same name (or id) is
                connected already, or the name cannot name a folder there.
            RuntimeError: the Worker is not running (use ``async with``), or
                is connected already, or connecting (another call is under way).
            ValueError: *host* is not a host name or IP address (an IPv6 one
                may be in brackets): a URL, say, or ``HOST:PORT``.
        """
        self._check_run("connect")
        host = protocol.checked_host(host)
        if self._nursery is None:
            raise RuntimeError("the worker is not running: use `async with AsyncWorker(...)`")
        if self._connected:
            raise RuntimeError("the worker is connected already")
        if self._connecting:
            raise RuntimeError("the worker is connecting already")
        url = f"ws://{protocol.in_url(host)}:{port}/ws/worker"
        self._manager_url = f"http://{protocol.in_url(host)}:{port}"
        self._connecting = True
        try:
            with trio.fail_after(timeout):
                await self._nursery.start(self._session, host, port)
        except PermissionError:
            raise
        except _ShutDownWhileConnecting:
            log.warning("worker %r: shut down while connecting to %s", self.name, url)
            return False
        except (
            trio.TooSlowError,
            OSError,
            trio_websocket.HandshakeError,
            trio_websocket.ConnectionClosed,
            protocol.ProtocolError,
            h11.ProtocolError,
        ) as exc:
            log.error(
                "worker %r: cannot reach the manager at %s:%s: %s",
                self.name,
                protocol.in_url(host),
                port,
                _why_unreachable(exc, timeout),
            )
            return False
        finally:
            self._connecting = False
        return True

    async def wait_for_disconnect(self) -> None:
        """Return once the Worker is not connected to a Manager (at once if it is not)."""
        while self._connected:
            await self._clock_changed.park()

    async def wait_for_clock(self, samples: int = 1) -> None:
        """Return once the clock offset is estimated from at least *samples* exchanges."""
        while (estimate := self.clock.estimate()) is None or estimate.samples < samples:
            await self._clock_changed.park()

    async def _session(
        self, host: str, port: int, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        # A new Manager, a new clock to follow: the last one's samples go. The
        # tasks of the session, and the nodes they run inline, stamp with it.
        self.clock.reset()
        use_clock(self.clock.now)
        # (This session's: a connect() after shutdown() starts the next one
        # while this one may still be ending.)
        checked_in = trio.Event()
        with trio.CancelScope() as self._session_scope:
            await self._talk(host, port, task_status, checked_in)
        if not checked_in.is_set():  # (cancelled by shutdown(): connect() still waits)
            raise _ShutDownWhileConnecting

    async def _talk(self, host: str, port: int, task_status: Any, checked_in: trio.Event) -> None:
        """Talk with the Manager until either side ends; *checked_in* is set
        once the Manager has welcomed this Worker (``connect`` returns then)."""
        async with open_websocket(
            host, port, "/ws/worker", max_message_size=protocol.MAX_MESSAGE
        ) as (ws, local):
            await self._check_in(ws)
            self._connected, self._leaving, self._manager_gone = True, False, False
            # Nodes listen where this machine reached the Manager: other Workers
            # reach it there too (and a cluster on loopback stays on loopback).
            self._host = local
            where = f"ws://{protocol.in_url(host)}:{port}/ws/worker"
            log.info("worker %r connected to %s", self.name, where)
            # One HTTP client for the session: making one costs ~50 ms (it
            # loads the CA certificates, even for http).
            headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
            assert self._manager_url is not None  # (set by connect, which started the session)
            self._http = httpx.AsyncClient(
                base_url=self._manager_url, headers=headers, timeout=HTTP_TIMEOUT
            )
            checked_in.set()
            task_status.started()
            try:
                async with self._http, trio.open_nursery() as nursery:
                    nursery.start_soon(self._keep_clock, ws)
                    nursery.start_soon(self._send_events, ws)
                    nursery.start_soon(self._report_stats)
                    await self._read(ws, nursery)
                    nursery.cancel_scope.cancel()
            finally:
                if self._manager_gone and self._runtimes:
                    # Nobody is left to stop, collect or shut down the nodes of
                    # its graph: they are closed (their teardown runs; what they
                    # saved stays, see _remove_temp_folder) before the Worker
                    # takes another Manager.
                    log.warning(
                        "worker %r: the manager left without shutting down its nodes: "
                        "they are closed",
                        self.name,
                    )
                    with trio.CancelScope(shield=True):
                        await self._close_nodes()
                self._connected = False
                self._clock_changed.unpark_all()  # wakes wait_for_disconnect
                self._sent_all.unpark_all()  # (and _flush_events: nothing more is sent)

    async def _check_in(self, ws: trio_websocket.WebSocketConnection) -> None:
        """Say hello, check the Manager's proof of the token (if this Worker
        has one), prove it in turn, and wait for the welcome.

        Raises:
            PermissionError: the Manager refused the Worker, or could not
                prove it knows this Worker's token (nothing is sent to it then).
            protocol.ProtocolError: the Manager answered out of protocol.
        """
        nonce = protocol.new_nonce()
        await ws.send_message(
            protocol.make("hello", name=self.name, worker_id=self.id, nonce=nonce)
        )
        challenge = await self._check_in_answer(ws, "challenge")
        proof = None
        if self._token is not None:
            if challenge["proof"] is None:
                raise PermissionError(
                    f"worker {self.name!r} has a token (token= or CHIMERA_TOKEN), but the "
                    f"manager at {self._manager_url} asks for none: it may not be the "
                    "manager meant, and the worker runs no code for it"
                )
            if not protocol.proves(
                challenge["proof"], self._token, "manager", challenge["nonce"], nonce
            ):
                # (No proof: the Manager logs the refusal too, and learns nothing.)
                await ws.send_message(protocol.make("auth", proof=None))
                raise PermissionError(
                    f"the manager at {self._manager_url} has another token than worker "
                    f"{self.name!r} (token= or CHIMERA_TOKEN): it may not be the manager "
                    "meant, and the worker runs no code for it"
                )
            proof = protocol.proof(self._token, "worker", nonce, challenge["nonce"])
        await ws.send_message(protocol.make("auth", proof=proof))
        await self._check_in_answer(ws, "welcome")

    async def _check_in_answer(
        self, ws: trio_websocket.WebSocketConnection, expected: str
    ) -> dict[str, Any]:
        """The Manager's next message, which must be of type *expected*.

        Raises:
            PermissionError: it is an error (the Manager refused the Worker).
            protocol.ProtocolError: it is of another type, or not valid.
        """
        answer = protocol.parse(await ws.get_message())
        if answer["type"] == "error":
            hint = ""
            if answer["error"] == protocol.TOKEN_REFUSED:
                hint = (
                    " (give the Worker the Manager's token: Worker(..., token=...), "
                    "chimera worker --token, or the CHIMERA_TOKEN environment variable)"
                )
            raise PermissionError(
                f"the manager refused worker {self.name!r}: {answer['error']}{hint}"
            )
        if answer["type"] != expected:
            raise protocol.ProtocolError(f"expected {expected}, got {answer['type']}")
        return answer

    async def _keep_clock(self, ws: trio_websocket.WebSocketConnection) -> None:
        try:
            for exchange in range(CLOCK_BURST):
                await ws.send_message(protocol.make("clock", t0=time.time_ns()))
                await trio.sleep(0.05 if exchange < CLOCK_BURST - 1 else CLOCK_PERIOD)
            while True:
                await ws.send_message(protocol.make("clock", t0=time.time_ns()))
                await trio.sleep(CLOCK_PERIOD)
        except trio_websocket.ConnectionClosed:
            pass  # (_read says why, and ends the session)

    async def _report_stats(self) -> None:
        """Send the Manager each node's statistics, once a second while they change."""
        last: dict[str, dict[str, int | None]] = {}
        while True:
            await trio.sleep(STATS_PERIOD)
            stats = self._node_stats()
            counts = {node: {**values, "at_ns": None} for node, values in stats.items()}
            if counts and counts != last:
                self._send_stats(stats)
                last = counts

    def _node_stats(self) -> dict[str, dict[str, int]]:
        """Each node's statistics (see :meth:`NodeRuntime.stats`), by id, with
        ``at_ns``: when they were read (cluster time; in its process, for a
        node in a process of its own)."""
        now = cluster_time_ns()
        return {
            node_id: {"at_ns": now, **runtime.stats()}
            for node_id, runtime in self._runtimes.items()
        }

    def _send_stats(self, stats: dict[str, dict[str, int]]) -> None:
        self._tell(protocol.make("node_stats", stats=stats))

    def _tell(self, text: str) -> None:
        """Queue *text* for the Manager (sent in order, by :meth:`_send_events`)."""
        self._unsent += 1
        self._events_in.send_nowait(text)

    async def _send_events(self, ws: trio_websocket.WebSocketConnection) -> None:
        async for text in self._events_out:
            try:
                await ws.send_message(text)
            except trio_websocket.ConnectionClosed:
                return  # (_read says why, and ends the session)
            finally:
                self._unsent -= 1
                if not self._unsent:
                    self._sent_all.unpark_all()

    async def _flush_events(self) -> None:
        """Wait until what was queued for the Manager is sent (its nodes' last
        states, say), while connected, for at most :data:`FLUSH_TIMEOUT`."""
        with trio.move_on_after(FLUSH_TIMEOUT):
            while self._connected and self._unsent:
                await self._sent_all.park()

    async def _read(self, ws: trio_websocket.WebSocketConnection, nursery: trio.Nursery) -> None:
        """Handle the Manager's messages until the connection closes."""
        while True:
            try:
                with trio.move_on_after(protocol.SILENCE_TIMEOUT) as silence:
                    text = await ws.get_message()
            except trio_websocket.ConnectionClosed:
                log.info("worker %r: the manager closed the connection", self.name)
                self._manager_gone = not self._leaving
                return
            if silence.cancelled_caught:
                self._manager_gone = True
                log.warning(
                    "worker %r: no word from the manager for %g s: taken as gone",
                    self.name,
                    protocol.SILENCE_TIMEOUT,
                )
                return
            received_ns = time.time_ns()
            try:
                message = protocol.parse(text)
            except protocol.ProtocolError as exc:
                log.warning("worker %r: bad message from the manager: %s", self.name, exc)
                await ws.send_message(protocol.make("error", error=str(exc), re=None))
                continue
            if message["type"] == "clock_ack":
                if not self.clock.add(message["t0"], message["t1"], message["t2"], received_ns):
                    log.warning(
                        "worker %r: a clock exchange that cannot be (a clock stepped?): dropped",
                        self.name,
                    )
                    continue
                self._clock_changed.unpark_all()
                self._share_clock()
            elif message["type"] == "request":
                if not self._leaving:  # (leaving, it answers nothing more)
                    nursery.start_soon(self._answer, message)
            elif message["type"] == "error":
                log.warning("worker %r: the manager says: %s", self.name, message["error"])
            else:
                await ws.send_message(
                    protocol.make("error", error="unexpected message", re=message["type"])
                )

    # --- the Manager's commands ------------------------------------------------

    async def _answer(self, request: dict) -> None:
        """Carry out one request and reply to it (a failure is a reply too)."""
        reply: dict[str, Any] = {"result": None, "error": None, "traceback": None, "node": None}
        try:
            log.debug("worker %r: the manager asks %s", self.name, request["command"])
            handler = getattr(self, f"_do_{request['command']}")
            reply["result"] = await handler(**request["args"])
            reply["ok"] = True
        except NodeError as exc:
            reply.update(ok=False, error=exc.message, traceback=exc.traceback, node=exc.node_name)
        except Exception as exc:
            log.exception("worker %r: %s failed", self.name, request["command"])
            reply.update(ok=False, error=f"{request['command']}: {exc!r}{_hint(exc)}")
        if self._leaving:
            # Its nodes are being closed, whatever the command did: no answer
            # (the Manager hears that the Worker left: WorkerLeftError).
            return
        # Behind the events this request caused (node states): the Manager
        # sees them before the reply.
        self._tell(protocol.make("reply", id=request["id"], **reply))

    def _report(self, node_id: str, state: NodeState, reason: str | None) -> None:
        """Tell the Manager a node's state, unless it was the last told (a node
        in a process ends SHUTDOWN by its runtime's word and by its process's)."""
        if self._reported.get(node_id) == (state, reason):
            return
        self._reported[node_id] = (state, reason)
        log.debug(
            "worker %r: node %r is %s%s",
            self.name,
            self._node_names.get(node_id, node_id),
            state.value,
            f" ({reason})" if reason else "",
        )
        self._tell(protocol.make("node_state", node_id=node_id, state=state.value, reason=reason))

    async def _do_load_packages(self, packages: list[dict[str, str]]) -> None:
        """Download each package from the Manager, check it, and put it where
        this Worker and the nodes it creates from now on import from."""
        folder = self._temp_folder() / "packages"
        assert self._http is not None  # (made at check-in, before any request)
        for package in packages:
            response = await self._http.get(f"/packages/{package['name']}.zip")
            protocol.check_answer(response)
            await trio.to_thread.run_sync(
                extract, package["name"], response.content, package["sha256"], folder
            )
            log.info("worker %r: package %r loaded", self.name, package["name"])
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
        importlib.invalidate_caches()

    def _temp_folder(self) -> Path:
        """This Worker's temporary folder (made on first use; see ``delete_temp``)."""
        if self._temp is None:
            self._temp = Path(tempfile.mkdtemp(prefix="chimera-worker-"))
            self._say_if_not_where_asked(self._temp.parent)
        return self._temp

    def _say_if_not_where_asked(self, where: Path) -> None:
        """Warn if the temporary folder is not where ``TMPDIR`` (or ``TEMP``,
        ``TMP``: the first set) asks: Python goes on to the next candidate, at
        last ``/tmp``, without a word when that folder cannot be written in."""
        for variable in ("TMPDIR", "TEMP", "TMP"):
            if asked := os.environ.get(variable):
                if os.path.realpath(asked) != os.path.realpath(where):
                    log.warning(
                        "worker %r: %s=%s cannot be written in (or does not exist): "
                        "what its nodes save goes to %s instead",
                        self.name,
                        variable,
                        asked,
                        where,
                    )
                return

    def _new_node_folder(self, node_id: str) -> Path:
        """Where a node made now writes what its ``save_*`` calls save: in the
        temporary folder, by node id; a node made again (a graph committed
        again) gets a folder of its own, and the last one's files stay."""
        folder, number = self._temp_folder() / "nodes" / node_id, 1
        while folder.exists() or manifest_path(folder).exists():
            number += 1
            folder = folder.with_name(f"{node_id}-{number}")
        return folder

    async def _remove_temp_folder(self) -> None:
        """Forget the packages loaded; remove the temporary folder unless kept,
        or unless it holds files the nodes saved that were never collected."""
        if self._temp is None:
            return
        packages = str(self._temp / "packages")
        if packages in sys.path:
            sys.path.remove(packages)
        files = files_under(self._temp / "nodes") if self._uncollected else []
        if files:
            # Never deleted: they may be the session's only copy (a Ctrl-C, an
            # exception, a script that ended without collect(), a Manager gone).
            why = (
                "the manager left before collecting them"
                if self._manager_gone
                else "they were never collected (the Manager's collect() brings them "
                "into the session folder)"
            )
            inside = (file.relative_to(self._temp / "nodes").parts for file in files)
            folders = sorted({parts[0] for parts in inside if len(parts) > 1})  # (not manifests)
            log.warning(
                "worker %r: %s its nodes saved are kept in %s (%s): %s",
                self.name,
                _how_many(files),
                self._temp,
                ", ".join(
                    f"nodes/{folder}: {self._folder_nodes.get(folder, '?')!r}" for folder in folders
                ),
                why,
            )
        elif self.delete_temp:
            # (On a thread: after an upload, it may hold gigabytes.)
            await trio.to_thread.run_sync(partial(shutil.rmtree, self._temp, ignore_errors=True))
        else:
            log.info("worker %r: its temporary folder %s is kept", self.name, self._temp)
        self._temp = None

    async def _do_create_nodes(self, nodes: list[dict[str, Any]]) -> dict[str, Any]:
        """Make every node (in parallel); the address of each one's outlet."""
        if self._uncollected and not self._runtimes and files_under(self._temp_folder() / "nodes"):
            log.warning(
                "worker %r: the files the nodes of the last graph saved were never "
                "collected; they stay in %s (and are kept when this Worker shuts down)",
                self.name,
                self._temp_folder() / "nodes",
            )
        self._creating += 1
        try:
            await run_all([partial(self._create_node, spec) for spec in nodes])
            return {"addresses": {spec["id"]: self._runtimes[spec["id"]].address for spec in nodes}}
        finally:
            self._creating -= 1
            self._created.unpark_all()

    async def _create_node(self, spec: dict[str, Any]) -> None:
        node_id = spec["id"]
        if node_id in self._runtimes:  # (a second would leave the first running, unowned)
            raise RuntimeError(f"node {spec['name']!r} exists already on this worker")
        check_name(node_id, "node id")  # (it names the node's folder)
        self._node_names[node_id] = spec["name"]
        folder = self._node_folders[node_id] = self._new_node_folder(node_id)
        self._folder_nodes[folder.name] = spec["name"]

        def report(state: NodeState, reason: str | None) -> None:
            self._report(node_id, state, reason)

        settings = {
            "inputs": [Input(name, delivery) for name, delivery in spec["inputs"]],
            "follow": spec["follow"],
            "outputs": spec["outputs"],
            "transport": spec["transport"],
            "bind": self._bind_address(
                spec["transport"], spec.get("local_outputs", False), spec.get("bind_host")
            ),
            "folder": str(folder),
            "allow_objects": spec.get("allow_objects", False),
            "link_key": bytes.fromhex(spec["link_key"]) if spec.get("link_key") else None,
        }
        pickled = base64.b64decode(spec["node"])
        runtime: NodeRuntime | NodeProcess
        if spec["transport"] == "memory":  # in this Trio loop: memory links live here
            runtime = NodeRuntime(cloudpickle.loads(pickled), **settings, on_state=report)
            self._runtimes[node_id] = runtime
            await runtime.__aenter__()
        else:
            runtime = NodeProcess(
                spec["name"],
                pickled,
                zygote=await self._start_zygote(),
                runtime=settings,
                clock_offset_ns=self._offset_ns(),
                on_state=report,
            )
            self._runtimes[node_id] = runtime
            assert self._nursery is not None  # (requests are answered while it runs)
            await runtime.open(self._nursery)

    def _bind_address(self, transport: str, local: bool, host: str | None = None) -> str | None:
        """Where a node's outlet listens: a Unix socket in this Worker's temporary
        folder if every node it sends to runs here (*local*; the ``tcp``
        transport), which carries 1080p frames ~35% faster than TCP on loopback;
        else on *host* if the Manager gave one (this Worker reached it over
        loopback, and a Worker on another machine reads the node) and it is
        this machine's, else the address this Worker reached the Manager from."""
        if transport == "memory":
            return None
        if transport == "tcp" and local and hasattr(socket, "AF_UNIX"):
            folder = self._temp_folder() / "sockets"
            path = folder / f"{next(self._socket_numbers)}.sock"
            if len(os.fsencode(path)) <= _UNIX_PATH_MAX:
                folder.mkdir(exist_ok=True)
                return f"unix://{path}"
        if host is not None and not _can_listen_on(host):
            if host not in self._not_here:
                self._not_here.add(host)
                log.warning(
                    "worker %r: it reached the manager over loopback, but it is not on the "
                    "manager's machine (a tunnel?): the nodes it runs that others read listen "
                    "on %s, which Workers on other machines may not reach",
                    self.name,
                    self._host,
                )
            host = None
        host = host or self._host
        if host is None:
            return None
        scheme = "nng+tcp" if transport == "nng" else "tcp"
        return f"{scheme}://{protocol.in_url(host)}:0"

    def _offset_ns(self) -> int:
        estimate = self.clock.estimate()
        return estimate.offset_ns if estimate is not None else 0

    def _share_clock(self) -> None:
        """Tell the node processes a new clock offset (nodes inline share this process's)."""
        offset = self._offset_ns()
        if offset != self._shared_offset:
            self._shared_offset = offset
            for runtime in self._runtimes.values():
                if isinstance(runtime, NodeProcess):
                    runtime.follow_clock(offset)

    async def _start_zygote(self) -> Zygote:
        """The zygote that forks this Worker's node processes (started on first
        use, and again after it died)."""
        async with self._zygote_lock:
            if self._zygote is None or not self._zygote.running:
                zygote = Zygote(f"worker {self.name!r}")
                assert self._nursery is not None  # (requests are answered while it runs)
                await self._nursery.start(self._run_zygote, zygote)
                self._zygote = zygote
        return self._zygote

    async def _run_zygote(self, zygote: Zygote, task_status: Any) -> None:
        # Shielded: the node processes report their exit through the zygote, so
        # it must outlive them even when the Worker is cancelled; the Worker
        # ends it once they are gone (see _running).
        with trio.CancelScope(shield=True) as scope:
            self._zygote_scopes.append(scope)
            try:
                await zygote.run(task_status=task_status)
            finally:
                self._zygote_scopes.remove(scope)

    async def _do_connect_nodes(self, addresses: dict[str, dict[str, str]]) -> None:
        connects = [partial(self._runtimes[node].connect, to) for node, to in addresses.items()]
        await run_all(connects)

    async def _do_prep_nodes(self) -> None:
        self._uncollected = True  # (what prep saves is recorded)
        await run_all([runtime.prep for runtime in self._runtimes.values()])

    async def _do_step_nodes(self) -> None:
        try:
            await run_all([runtime.step_once for runtime in self._runtimes.values()])
        finally:
            self._send_stats(self._node_stats())  # (ahead of the reply: the steps counted)

    async def _do_start_nodes(self, record: bool = True) -> None:
        """Run every node; their ``save_*`` calls save if *record*."""
        self._uncollected = self._uncollected or record
        for runtime in self._runtimes.values():
            await runtime.set_recording(record)
        self._run_nodes(self._runtimes)

    def _run_nodes(
        self, runtimes: Mapping[str, NodeRuntime | NodeProcess], stopped: bool = False
    ) -> None:
        """Run each of *runtimes*, by id (see :meth:`NodeRuntime.run` for *stopped*)."""
        assert self._nursery is not None  # (requests are answered while it runs)
        for node_id, runtime in runtimes.items():
            done = self._runs[node_id] = trio.Event()
            # Made here, not in the task: closing the nodes before the task
            # runs still cancels the run.
            scope = trio.CancelScope()
            self._run_scopes.append(scope)
            self._nursery.start_soon(self._run_node, runtime, scope, done, stopped)

    async def _run_node(
        self,
        runtime: NodeRuntime | NodeProcess,
        scope: trio.CancelScope,
        done: trio.Event,
        stopped: bool,
    ) -> None:
        try:
            with scope:
                await runtime.run(stopped)
        except NodeError as exc:
            # A node FAILED has said why, under its own logger (into the
            # Manager's nodes.log): said once.
            level = logging.DEBUG if runtime.state is NodeState.FAILED else logging.ERROR
            log.log(level, "worker %r: %s", self.name, exc)
        finally:
            done.set()

    async def _do_shutdown_nodes(self) -> None:
        # Not cancelled halfway when the Manager leaves meanwhile: the nodes
        # half closed would stay this Worker's, and the next graph's commit
        # would find them. (Bounded: each teardown is, and each close.)
        with trio.CancelScope(shield=True):
            await self._close_nodes()

    async def _do_leave(self) -> None:
        # No reply: the Manager hears the Worker left (ChimeraPy's Workers
        # ended at its ``post /shutdown``).
        await self.shutdown()

    def kill_nodes(self) -> None:
        """Kill every node that runs in a process of its own, now: SIGKILL to
        its process group.

        For a stop that cannot wait (a second Ctrl-C): the nodes' ``teardown``
        does not run, what they were saving ends where it was, and they go
        FAILED ("its process was killed by SIGKILL"). Closing them then
        (:meth:`shutdown`, leaving ``async with``) waits for no teardown.
        Nodes that run inline (the ``memory`` transport) are not killed.
        """
        for runtime in self._runtimes.values():
            if isinstance(runtime, NodeProcess):
                runtime.kill()

    async def _close_nodes(self) -> None:
        """Stop what runs (at once), then close every node's endpoints; log
        the nodes not closed yet after :data:`CLOSE_PATIENCE` seconds."""
        # The timer is a task of the Worker's nursery, not of a nursery here
        # (whose exit would let other tasks run before closing returns);
        # shielded, as the closing may be, until closing ends.
        # One timer for the closings under way (a commit cancelled, and a shutdown).
        if not self._closings:
            self._closing_timer = trio.CancelScope(shield=True)
            if self._nursery is not None:
                self._nursery.start_soon(self._log_what_closing_waits_for, self._closing_timer)
        self._closings += 1
        try:
            await self._stop_and_close_nodes()
        finally:
            self._closings -= 1
            if not self._closings:
                self._closing_timer.cancel()

    async def _log_what_closing_waits_for(self, timer: trio.CancelScope) -> None:
        with timer:
            await trio.sleep(CLOSE_PATIENCE)
            closing = [
                repr(self._node_names.get(node_id, node_id))
                for node_id, runtime in self._runtimes.items()
                if runtime.state not in (NodeState.SHUTDOWN, NodeState.FAILED)
            ]
            if closing:
                log.info(
                    "worker %r: still closing %s after %g s (a teardown gets %g s, then the "
                    "node's process is ended)",
                    self.name,
                    ", ".join(closing),
                    CLOSE_PATIENCE,
                    TEARDOWN_TIMEOUT,
                )

    async def _stop_and_close_nodes(self) -> None:
        # Nodes being made are closed too, once made (a commit cancelled
        # meanwhile closes what it made: else they are left running, unowned).
        while self._creating:
            await self._created.park()
        # Until no run is left: a start request may add runs meanwhile.
        while running := [done for done in self._runs.values() if not done.is_set()]:
            for scope in self._run_scopes:
                scope.cancel()
            for done in running:
                await done.wait()  # teardown runs, shielded, for at most TEARDOWN_TIMEOUT
        async with trio.open_nursery() as nursery:
            for runtime in self._runtimes.values():
                nursery.start_soon(runtime.aclose)
        try:
            await trio.to_thread.run_sync(
                _remove_emptied_folders, list(self._node_folders.values())
            )
        except OSError as exc:  # (only room on disk is at stake)
            log.warning("worker %r: cleaning up its node folders: %s", self.name, exc)
        self._runtimes.clear()
        self._node_names.clear()
        self._reported.clear()
        self._node_folders.clear()
        self._runs.clear()
        self._run_scopes.clear()

    async def _do_record_nodes(self) -> None:
        """From now on, the nodes' ``save_*`` calls save."""
        self._uncollected = True
        for runtime in self._runtimes.values():
            await runtime.set_recording(True)

    async def _do_collect_nodes(
        self, upload: str, local: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Hand every file the nodes saved to the Manager, as ``NODE NAME/PATH``:
        moved into its session folder if this Worker sees it (*local*: the
        folder, and a probe file there holding a key), else POSTed to its
        *upload* path. What was sent, whether it was moved, each node's stream
        summaries from its manifest (None without one), and this Worker's
        clock estimate."""
        folders = [
            (self._node_folders[node_id], check_name(name, "node name"))
            for node_id, name in self._node_names.items()
        ]
        manifests = await trio.to_thread.run_sync(
            lambda: [Manifest.read(folder) for folder, _ in folders]
        )
        moved = local is not None and await trio.to_thread.run_sync(
            sees_probe, local["folder"], local["probe"], local["key"]
        )
        sent: list[dict[str, Any]] = []
        whole = True  # (a file the Manager got otherwise stays uncollected: kept, or warned of)
        if moved and local is not None:  # (moved: local was given)
            target = Path(local["folder"])
            sent = await trio.to_thread.run_sync(
                lambda: [
                    item
                    for (folder, name), manifest in zip(folders, manifests, strict=True)
                    for item in move_folder(folder, target, name, manifest)
                ]
            )
        else:
            assert self._http is not None  # (made at check-in, before any request)
            for folder, name in folders:
                sent_here, whole_here = await send_folder(self._http, upload, folder, name)
                sent += sent_here
                whole = whole and whole_here
        estimate = self.clock.estimate()
        clock = (
            None
            if estimate is None
            else {"offset_ns": estimate.offset_ns, "error_ns": estimate.error_ns}
        )
        streams = {
            name: manifest.streams if manifest is not None else None
            for (_, name), manifest in zip(folders, manifests, strict=True)
        }
        self._uncollected = not whole
        return {"files": sent, "moved": moved, "clock": clock, "streams": streams}

    async def _do_gather_nodes(self, upload: str) -> None:
        """POST the last chunk of every node to the Manager's *upload* path: a
        msgpack map of node id to the chunk's frames, or None (no chunk yet,
        or the node's process is gone)."""
        gathered: dict[str, list[bytes] | None] = {}

        async def gather(node_id: str, runtime: NodeRuntime | NodeProcess) -> None:
            try:
                frames = await runtime.gather()
            except NodeError as exc:
                log.warning("worker %r: cannot gather node %s: %s", self.name, node_id, exc)
                frames = None
            gathered[node_id] = None if frames is None else [bytes(f) for f in frames]

        await run_all([partial(gather, *item) for item in self._runtimes.items()])
        await self._upload(upload, msgpack.packb(gathered, use_bin_type=True))

    async def _upload(self, path: str, data: bytes) -> None:
        """POST *data* to the Manager's *path*.

        Raises:
            httpx.HTTPError: the Manager could not be reached or refused it.
        """
        assert self._http is not None  # (made at check-in, before any request)
        response = await self._http.post(path, content=data)
        protocol.check_answer(response)

    async def _do_forget_nodes(self, names: list[str]) -> None:
        """The nodes *names* of another Worker are gone, that Worker silent:
        this Worker's nodes stop waiting for them (see :meth:`NodeRuntime.forget`)."""
        await run_all([partial(runtime.forget, names) for runtime in self._runtimes.values()])

    async def _do_stop_nodes(self, ending: bool = False) -> dict[str, str]:
        """Stop the nodes that run; with *ending*, end those never run too
        (stepped offline, or only prepared): each steps on what its inputs
        sent, runs ``teardown`` and closes its files. The state of each node, by id."""
        for node_id, runtime in self._runtimes.items():
            if node_id in self._runs:  # (a node never run is left alone: it may run next)
                runtime.request_stop()
        if ending:
            # (Not recording, as in offline mode's steps.)
            self._run_nodes(
                {i: runtime for i, runtime in self._runtimes.items() if i not in self._runs},
                stopped=True,
            )
        for done in list(self._runs.values()):
            await done.wait()
        if self._runtimes:  # the last ones (ahead of the reply): what meta.json says
            self._send_stats(self._node_stats())
        return {node_id: state.value for node_id, state in self.nodes.items()}
