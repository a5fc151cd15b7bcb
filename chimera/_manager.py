"""The Manager: the cluster's one port (HTTP + WebSocket), where Workers check in.

:class:`AsyncManager` serves, on one port (hypercorn, see :mod:`chimera._http`):

- ``/ws/worker``: the control connection of each Worker (see
  :mod:`chimera._protocol`): a ``hello`` registers it, ``clock`` requests are
  answered with the Manager's clock;
- ``GET /api/state``: the cluster's state as JSON;
- ``/ws/events``: that state, then each change of it (see :meth:`AsyncManager._events_session`);
- ``GET /packages/NAME.zip``: a package :meth:`AsyncManager.distribute_packages`
  ships, for the Workers to download;
- ``POST /uploads/KEY``: what a Worker sends back for a request that named KEY
  (:meth:`AsyncManager.gather`);
- ``POST /collect/KEY/NODE/PATH``: a file a Worker sends during
  :meth:`AsyncManager.collect`.

Everything it starts lives in its nursery: leaving ``async with`` closes the
port and every connection.
"""

from __future__ import annotations

import base64
import datetime
import inspect
import ipaddress
import itertools
import json
import logging
import math
import secrets
import shutil
import time
import urllib.parse
import uuid
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from functools import partial, wraps
from pathlib import Path
from typing import Any, Literal, TextIO, TypeVar, cast, get_args

import hypercorn.config
import msgpack
import pynng
import trio

from . import _http
from . import _protocol as protocol
from ._collect import Incoming, Progress, files_under, read_body, summarize, verify
from ._data import DataChunk, DecodeError, decode_chunk
from ._errors import SAID_WHOLE, CommitGraphError, NodeError, WorkerLeftError
from ._graph import Graph
from ._manifest import written_whole
from ._mapping import resolve_mapping, resolve_placement
from ._node import WORKERS_HERE, Node
from ._packages import Package, pack
from ._recording import check_name
from ._service import Service, run_all, unwrapped
from ._shipping import pickle_node, unpicklable_part

__all__ = ["AsyncManager", "WorkerInfo"]

#: The data planes a cluster may use (``transport=``).
TransportName = Literal["tcp", "nng", "memory"]
TRANSPORTS = get_args(TransportName)
#: How often a commit, or a stop, logs the nodes it still waits for, in seconds.
PROGRESS_EVERY = 10.0
#: After how long that log line is a warning, in seconds.
SLOW = 60.0
#: The most nodes that line names (it counts the others).
PROGRESS_NAMES = 10
#: Log records queued for each subscriber of the published logs (nng's
#: largest): beyond, nng drops the newest for that subscriber, uncounted.
LOG_QUEUE = 8192
#: Longest wait for closing the nodes of a commit that failed, in seconds.
COMMIT_CLEANUP_TIMEOUT = 30.0
#: The largest node, pickled: it travels in base64 within one control message.
MAX_NODE_BYTES = protocol.MAX_MESSAGE // 2
#: The largest upload a Worker may send, in bytes.
MAX_UPLOAD = 1 << 30
#: Longest wait, as the Manager closes, for its ``/ws/events`` clients to
#: answer its close frame, in seconds.
EVENTS_CLOSE_TIMEOUT = 2.0

log = logging.getLogger("chimera.manager")
#: The Manager logs each node's records under ``chimera.manager.node.NAME``.
NODE_LOGS = "chimera.manager.node"
#: What starts each line after the first of a record in ``nodes.log`` (and as published).
CONTINUATION = "    "

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


#: Node states after which a node's Worker may leave without failing it.
_ENDED = frozenset({"STOPPED", "SAVED", "SHUTDOWN", "FAILED"})


@dataclass
class WorkerInfo:
    """A Worker connected to the Manager."""

    id: str
    name: str
    #: When it checked in (the Manager's clock, ns).
    connected_ns: int
    #: The address it connected from.
    ip: str = ""
    #: The Manager's address as it reached it (this machine's, as it sees it).
    reached: str = ""
    #: The state of each of its nodes, by node id (see :attr:`AsyncManager.nodes`).
    nodes: dict[str, str] = field(default_factory=dict)
    _send: Send | None = field(default=None, repr=False)
    _pending: dict[int, Any] = field(default_factory=dict, repr=False)


class _Pending:
    """A request waiting for its reply."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: dict[str, Any] | None = None


_Method = TypeVar("_Method", bound=Callable[..., Awaitable[Any]])


def _one_at_a_time(
    *, shutdown_ends_it: bool = False, ends_the_others: bool = False
) -> Callable[[_Method], _Method]:
    """Run a lifecycle method of :class:`AsyncManager` while no other runs:
    a call from another task (or thread, through the blocking Manager)
    waits its turn, in order, and its checks then see what the call before
    it did (else both pass them, and interleave at their first await).

    A call made by the call under way (``commit_graph`` closing what it
    made, with ``shutdown``) runs at once. With *shutdown_ends_it*, a call
    that may wait on the nodes' own code for ever (a ``prep`` or a ``step``
    that does not return) is ended by :meth:`AsyncManager.shutdown` from
    another task: it cleans up as on any cancellation, then raises
    RuntimeError. *ends_the_others*: that is :meth:`AsyncManager.shutdown`.
    """

    def decorate(method: _Method) -> _Method:
        @wraps(method)
        async def in_turn(self: AsyncManager, *args: Any, **kwargs: Any) -> Any:
            self._check_run(method.__name__)
            if self._turn.statistics().owner is trio.lowlevel.current_task():
                return await method(self, *args, **kwargs)
            if ends_the_others and self._turn_scope is not None:
                self._turn_scope.cancel()
            try:  # (free: the call begins at once, as it did before it took turns)
                self._turn.acquire_nowait()
            except trio.WouldBlock:
                await self._turn.acquire()
            try:
                scope = trio.CancelScope()
                self._turn_scope = scope if shutdown_ends_it else None
                with scope:
                    try:
                        return await method(self, *args, **kwargs)
                    except SAID_WHOLE as exc:
                        raise exc.with_traceback(None)  # noqa: B904 (itself, cause kept)
                raise RuntimeError(f"{method.__name__}(): ended by shutdown()")
            finally:
                self._turn_scope = None
                self._turn.release()

        return cast(_Method, in_turn)

    return decorate


class AsyncManager(Service):
    """The cluster's coordinator, as an async context manager.

    Args:
        logdir: where sessions are written (created if missing);
            ``chimera-sessions`` in the current folder when None.
        port: the port to serve on; 0 picks a free one (see :attr:`port`).
        max_num_of_workers: the most Workers a graph may be mapped to.
        publish_logs_via_zmq: whether to publish node logs on an nng PUB socket
            (:attr:`logs_address`; the name is ChimeraPy's, the socket nng's:
            subscribe with pynng, or any nng/NNG-compatible SUB socket). It
            checks no token: whoever reaches *host* reads the logs.
        dashboard_api: whether ``/api/state`` is served.
        logs_port: the port of the log PUB socket (with *publish_logs_via_zmq*);
            0 picks a free one (see :attr:`logs_address`).
        host: the address to listen on (loopback by default).
        token: if set, a Worker must present it to check in, and an API
            client (``/api/state``, ``/ws/events``) to be answered. Default:
            the ``CHIMERA_TOKEN`` environment variable; an empty one is none.
        transport: the data plane between nodes: ``"tcp"``, ``"nng"``, or
            ``"memory"`` (every Worker in this Trio run: for tests).
        allow_objects: whether chunks may carry any Python object, pickled
            (what fits no content type: tuples, sets, dataclasses...). Off by
            default: unpickling a chunk runs code its sender chose.

    Raises:
        ValueError: *transport* is none of the known ones, or *host* is not a
            host name or IP address (an IPv6 one may be in brackets).
    """

    def __init__(
        self,
        logdir: str | Path | None = None,
        port: int = 9000,
        max_num_of_workers: int = 50,
        publish_logs_via_zmq: bool = False,
        dashboard_api: bool = True,
        *,
        host: str = "127.0.0.1",
        token: str | None = None,
        transport: TransportName = "tcp",
        allow_objects: bool = False,
        logs_port: int = 0,
    ) -> None:
        if transport not in TRANSPORTS:
            known = ", ".join(map(repr, TRANSPORTS))
            raise ValueError(f"transport={transport!r}: the known ones are {known}")
        self.logdir = Path(logdir) if logdir is not None else Path.cwd() / "chimera-sessions"
        self._logs_port = logs_port
        self.host = protocol.checked_host(host)
        self.port = port
        self.max_num_of_workers = max_num_of_workers
        self.publish_logs_via_zmq = publish_logs_via_zmq
        self.dashboard_api = dashboard_api
        self._token = protocol.token_or_default(token)
        self.transport = transport
        self.allow_objects = allow_objects
        self._request_ids = itertools.count(1)
        self._mapping: dict[str, list[str]] = {}
        self._graph: Graph | None = None
        self._node_names: dict[str, str] = {}
        #: Each node of the registered graph, pickled (see register_graph).
        self._pickled: dict[str, bytes] = {}
        self._addresses: dict[str, str | None] = {}
        #: The state of every node of the graph mapped now (see map_graph), by node id.
        self.nodes: dict[str, str] = {}
        self._node_ids: dict[str, str] = {}
        self._nodes_changed = trio.lowlevel.ParkingLot()
        self._workers: dict[str, WorkerInfo] = {}
        #: The names of mapped Workers that left, by id (their nodes are gone).
        self._left: dict[str, str] = {}
        #: The key the nodes of the graph mapped now present to each other (hex).
        self._link_key: str | None = None
        #: Where the Manager runs tasks of its own (while it serves).
        self._tasks: trio.Nursery | None = None
        #: The cluster's clock (tests move it to check that Workers follow).
        self._clock = time.time_ns
        #: What the dashboard shows of each committed node, by node id.
        self._node_info: dict[str, dict[str, Any]] = {}
        #: When each node's steps were last reported, and how many (for its fps).
        self._steps_sampled: dict[str, tuple[int, int]] = {}
        self._log_file: TextIO | None = None
        self._log_publisher: pynng.Pub0 | None = None
        #: Where node logs are published (``publish_logs_via_zmq=True``), once
        #: running: ``tcp://HOST:PORT``, HOST loopback if *host* is every
        #: interface (from another machine, dial the Manager's address and PORT).
        self.logs_address: str | None = None
        #: Subscribers to the events (``/ws/events``).
        self._subscribers: set[trio.MemorySendChannel[str]] = set()
        self._subscribers_changed = trio.lowlevel.ParkingLot()
        #: Whether the Manager is closing (its ``/ws/events`` clients are told so).
        self._closing = False
        self._workers_changed = trio.lowlevel.ParkingLot()
        #: The packages shipped to the Workers, by name.
        self._packages: dict[str, Package] = {}
        #: The uploads expected from Workers (None until it came), by key.
        self._uploads: dict[str, bytes | None] = {}
        #: The keys of the uploads being read (one at a time each).
        self._uploading: set[str] = set()
        #: The collections under way, by key.
        self._collections: dict[str, Incoming] = {}
        #: The session's folder name in the logdir, once there is one.
        self._session: str | None = None
        #: Held by the lifecycle call under way (see :func:`_one_at_a_time`),
        #: and the scope that shutdown() cancels to end it.
        self._turn = trio.Lock()
        self._turn_scope: trio.CancelScope | None = None
        self._started_ns: int | None = None
        self._stopped_ns: int | None = None
        #: Whether collect() ended this session's nodes (they run no more).
        self._ended = False
        #: What collect() took of each Worker's nodes, this session, by Worker name.
        self._collected: dict[str, dict[str, Any]] = {}

    @property
    def workers(self) -> dict[str, WorkerInfo]:
        """The Workers connected now, by id, each with the states of its nodes now."""
        return {
            worker_id: replace(
                info,
                nodes={
                    node_id: self.nodes[node_id]
                    for node_id in self._mapping.get(worker_id, [])
                    if node_id in self.nodes
                },
            )
            for worker_id, info in self._workers.items()
        }

    @property
    def graph(self) -> Graph | None:
        """The graph registered (by :meth:`commit_graph` or :meth:`register_graph`), if any."""
        return self._graph

    async def wait_for_workers(self, count: int) -> None:
        """Return once exactly *count* Workers are connected."""
        while len(self._workers) != count:
            await self._workers_changed.park()

    async def wait_for_node_state(self, node: str, *states: str) -> str:
        """Return the state of *node* (an id or a name) once it is one of *states*.

        Raises:
            KeyError: no committed node has that id or name.
        """
        node_id = self._node_ids.get(node, node)
        if node_id not in self._node_ids.values():
            raise KeyError(f"no committed node {node!r}")
        while self.nodes.get(node_id) not in states:
            await self._nodes_changed.park()
        return self.nodes[node_id]

    def state(self) -> dict[str, Any]:
        """The cluster's state, as ``GET /api/state`` returns it: the Workers, and
        each committed node (its Worker, state, the reason of a failure, steps
        done, chunks its inputs dropped, steps per second (0 unless it is
        RUNNING), and the address its outlet listens on once it is created:
        None for a node without outputs)."""
        return {
            "workers": [_worker_entry(info) for info in self._workers.values()],
            "nodes": [self._node_entry(node_id) for node_id in self._node_info],
        }

    def _node_entry(self, node_id: str) -> dict[str, Any]:
        """What :meth:`state` says of a node of the mapped graph."""
        return {"id": node_id, **self._node_info[node_id], "address": self._addresses.get(node_id)}

    def _publish(self, event: dict[str, Any]) -> None:
        """Push *event* to every ``/ws/events`` subscriber (a slow one is dropped)."""
        if not self._subscribers:
            return
        text = json.dumps(event)
        for subscriber in list(self._subscribers):
            try:
                subscriber.send_nowait(text)
            except trio.WouldBlock:
                log.warning("an events subscriber is too slow: disconnected")
                subscriber.close()
                self._subscribers.discard(subscriber)

    def _set_node_state(self, node_id: str, state: str, reason: str | None) -> None:
        """Record a node's state, and publish its entry if that or the reason changed."""
        info = self._node_info.get(node_id)
        if info is None:  # a node of a graph mapped before (a late word): forgotten
            return
        if self.nodes.get(node_id) == state and info["reason"] == reason:
            return
        self.nodes[node_id] = state
        self._nodes_changed.unpark_all()
        info["state"], info["reason"] = state, reason
        if state == "RUNNING":  # (its first figures' fps: since now)
            self._steps_sampled[node_id] = (self._clock(), info["steps"])
        else:  # it steps no more
            info["fps"] = 0.0
        self._publish({"type": "node_state", **self._node_entry(node_id)})

    def _set_node_addresses(self, addresses: Mapping[str, str | None]) -> None:
        """Record where nodes listen, and publish the entry of each whose address changed."""
        for node_id, address in addresses.items():
            changed = self._addresses.get(node_id) != address
            self._addresses[node_id] = address
            if changed and node_id in self._node_info:
                self._publish({"type": "node_address", **self._node_entry(node_id)})

    def _node_log(self, info: WorkerInfo, message: dict[str, Any]) -> None:
        """A node's log record: log it here (unless its Worker runs in this
        process, and has), append it to ``nodes.log``, publish it (``TIME
        LEVEL WORKER/NODE: message``, each line of the message after the first
        starting with :data:`CONTINUATION`; see :func:`_log_time`)."""
        worker = info.name
        if info.id not in WORKERS_HERE:
            # Not under the node's own logger: a Worker in this process
            # forwards that one's records here, and would again.
            logging.getLogger(f"{NODE_LOGS}.{message['node']}").log(
                message["level"], "[%s/%s] %s", worker, message["node"], message["text"]
            )
        level = logging.getLevelName(message["level"])
        text = f"\n{CONTINUATION}".join(message["text"].splitlines())
        try:
            when = _log_time(message["time_ns"])
        except (OverflowError, OSError, ValueError):  # (no date: a broken clock, or a forgery)
            when = _log_time(self._clock())
        line = f"{when} {level} {worker}/{message['node']}: {text}\n"
        if self._log_file is not None:
            try:
                self._log_file.write(line)
                self._log_file.flush()
            except OSError as exc:  # (a full disk): the nodes go on, their logs go elsewhere
                self._close_log_file()
                log.error(
                    "node logs cannot be written to %s (%s): they are no longer written there",
                    self.logdir / "nodes.log",
                    exc,
                )
        if self._log_publisher is not None:
            try:
                self._log_publisher.send(line.encode(), block=False)
            except pynng.exceptions.TryAgain:  # nobody keeps up: the line is dropped
                pass

    def _close_log_file(self) -> None:
        """Close ``nodes.log``; what it could not write is lost (a full disk)."""
        log_file, self._log_file = self._log_file, None
        if log_file is not None:
            try:
                log_file.close()
            except OSError:  # (its last lines could not be written: said already)
                pass

    def _worker_left(self, info: WorkerInfo, silent: bool) -> None:
        """A Worker left: its nodes are gone. Those that had not ended are
        FAILED; requests to it from now on skip it (see :meth:`_request`).
        If it fell *silent*, its connections to other Workers' nodes may stay
        open for ever (a frozen process, a machine asleep): those nodes are
        told to stop waiting for its nodes (see :meth:`_forget_nodes`)."""
        node_ids = self._mapping.get(info.id)
        if not node_ids:
            log.info("worker %r (%s) left", info.name, info.id)
            return
        self._left[info.id] = info.name
        names = ", ".join(repr(self._node_names.get(node, node)) for node in node_ids)
        ended = all(self.nodes.get(node) in _ENDED for node in node_ids)
        # (Or the Manager is closing, cancelled: a timeout around its block.)
        closing = self._tasks is None or trio.current_effective_deadline() == -math.inf
        # Files its nodes saved, which it keeps (it said where, in its own log).
        uncollected = self._started_ns is not None and info.name not in self._collected
        log.log(  # (news only if some of them were still at work, or their files are to collect)
            logging.INFO if (ended and not uncollected) or closing else logging.WARNING,
            "worker %r left, and with it its nodes %s%s",
            info.name,
            names,
            " (what they saved is not collected: the worker keeps it)" if uncollected else "",
        )
        for node_id in node_ids:
            if self.nodes.get(node_id) not in _ENDED:
                self._set_node_state(node_id, "FAILED", f"its worker {info.name!r} left")
        if silent and self._tasks is not None:
            gone = [self._node_names[node] for node in node_ids if node in self._node_names]
            self._tasks.start_soon(self._forget_nodes, gone)

    async def _forget_nodes(self, names: list[str]) -> None:
        """Tell every Worker still here that the nodes *names* are gone: the
        links to them are cut and their streams taken as ended, so that a
        source sending to one of them, or a node it fed, can still stop."""
        try:
            await self._broadcast("forget_nodes", without_left=True, names=names)
        except Exception as exc:  # (a Worker that fails this fails the next request too)
            log.warning("telling the workers that nodes %s are gone failed: %s", names, exc)

    def _set_node_stats(self, stats: dict[str, Any]) -> None:
        """Take a Worker's figures of its nodes (see ``AsyncWorker._node_stats``);
        each node's fps is over the time between two readings of its steps
        (``at_ns``, where they were read), not between their arrivals here.
        Published (``node_stats``) only if a figure changed."""
        changed = False
        for node_id, values in stats.items():
            info = self._node_info.get(node_id)
            if info is None or not isinstance(values, dict):
                continue
            steps, dropped = values.get("steps"), values.get("dropped")
            waited = values.get("writer_wait_ms", 0)
            now = values.get("at_ns", self._clock())
            if not (
                isinstance(steps, int)
                and isinstance(dropped, int)
                and isinstance(waited, int)
                and isinstance(now, int)
            ):
                continue
            last = self._steps_sampled.get(node_id)
            fps_before = info.get("fps")
            if info.get("state") != "RUNNING":  # (its last figures, which stop() brings)
                info["fps"] = 0.0
            elif last is not None and now > last[0]:
                info["fps"] = round((steps - last[1]) * 1e9 / (now - last[0]), 1)
            self._steps_sampled[node_id] = (now, steps)
            figures = (info.get("steps"), info.get("dropped"), info.get("writer_wait_ms"))
            changed = changed or figures != (steps, dropped, waited) or info["fps"] != fps_before
            info["steps"], info["dropped"], info["writer_wait_ms"] = steps, dropped, waited
        if changed and self._subscribers:  # (the figures of every node: not made for nobody)
            self._publish({"type": "node_stats", "nodes": self.state()["nodes"]})

    # --- the graph ----------------------------------------------------------------

    @_one_at_a_time(shutdown_ends_it=True)
    async def commit_graph(
        self,
        graph: Graph,
        mapping: Mapping[str, Sequence[str]],
        send_packages: list[dict[str, Any]] | None = None,
    ) -> bool:
        """Create every node of *graph* on the Worker *mapping* gives it, connect
        them, and run their ``prep``.

        Returns:
            True.

        *send_packages*, a list of ``{"name": ..., "path": ...}``, ships local
        packages to every Worker first (see :meth:`distribute_packages`).

        Raises:
            CommitGraphError: the graph, the mapping or a package is not valid
                (nothing is started).
            NodeError: a node's ``prep`` raised (every node created is closed again).
            RuntimeError: the nodes of a graph committed before are not shut
                down; a Worker failed otherwise, or left (every node created
                is closed again).
        """
        # Nodes made and not shut down yet (shutdown() forgets the mapping;
        # a node that failed keeps its state FAILED).
        if live := [
            node for nodes in self._mapping.values() for node in nodes if node in self.nodes
        ]:
            raise RuntimeError(
                f"the {len(live)} nodes of the graph committed before are not shut down: "
                "shut them down before committing a graph again (AsyncManager.shutdown(); "
                "the blocking Manager's shutdown() ends the Manager too: make a new one)"
            )
        # Every problem of the graph and of the mapping at once, before anything starts.
        _check_graph(graph)
        resolve_mapping(graph, self._names(), mapping, self.max_num_of_workers)
        self.register_graph(graph)
        self.map_graph(mapping)
        if send_packages:
            try:
                await self.distribute_packages(send_packages)
            except ValueError as exc:
                raise CommitGraphError([str(exc)]) from exc
        try:
            with unwrapped():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._log_what_commit_waits_for)
                    await self.create_p2p_network()
                    await self.setup_p2p_connections()
                    nursery.cancel_scope.cancel()
        except BaseException:
            # Leave nothing running: close what was created (shielded, bounded).
            with trio.CancelScope(shield=True), trio.move_on_after(COMMIT_CLEANUP_TIMEOUT):
                try:
                    await self.shutdown()
                except Exception:
                    log.exception("closing the nodes of a failed commit")
            raise
        return True

    async def _log_what_commit_waits_for(self) -> None:
        doing = {None: "being made", "INITIALIZED": "connecting", "CONNECTED": "in prep"}
        await self._log_what_waits(
            "commit_graph", "ready", lambda info: doing.get(info["state"]), "prep has no time limit"
        )

    async def _log_what_stop_waits_for(self, call: str) -> None:
        #: Each node's steps at the last line.
        before: dict[str, int] = {}

        def doing(info: dict[str, Any]) -> str | None:
            if info["state"] != "RUNNING":
                return None
            steps, last = info["steps"], before.get(info["name"])
            before[info["name"]] = steps
            if steps != last:
                return f"running, {steps} steps so far"
            return (
                f"running, {steps} steps so far, none in the last {PROGRESS_EVERY:g} s: "
                "a step, or its teardown, takes that long"
            )

        await self._log_what_waits(
            call,
            "stopped",
            doing,
            "every chunk sent before stop is stepped first; a step that never returns keeps "
            f"{call} waiting" + ("; shutdown() ends the wait" if call == "stop" else ""),
        )

    async def _log_what_waits(
        self, call: str, done: str, doing: Callable[[dict[str, Any]], str | None], slow: str
    ) -> None:
        """Every :data:`PROGRESS_EVERY` seconds, log the nodes that *call*
        still waits for (a warning the first time, so that it shows without
        logging configured, and, saying *slow*, once it has waited
        :data:`SLOW`): each with what *doing* says of its info, those for
        which it says something (the first :data:`PROGRESS_NAMES`; the
        others counted)."""
        started = trio.current_time()
        for number in itertools.count():
            await trio.sleep(PROGRESS_EVERY)
            waited = trio.current_time() - started
            waiting = [
                f"{info['name']!r} ({what})"
                for info in self._node_info.values()
                if (what := doing(info)) is not None
            ]
            log.log(
                logging.WARNING if waited >= SLOW or number == 0 else logging.INFO,
                "%s: %d of %d nodes not %s after %.0f s: %s%s%s",
                call,
                len(waiting),
                len(self._node_info),
                done,
                waited,
                ", ".join(waiting[:PROGRESS_NAMES]),
                f", and {more} more" if (more := len(waiting) - PROGRESS_NAMES) > 0 else "",
                f" ({slow})" if waited >= SLOW else "",
            )

    # ChimeraPy's commit, step by step: register_graph, map_graph,
    # create_p2p_network (request_node_creation), request_node_server_data,
    # setup_p2p_connections (request_connection_creation).

    def register_graph(self, graph: Graph) -> None:
        """Check *graph* and keep it for :meth:`map_graph` and the steps after.

        Every node is pickled here, as it will be sent to its Worker.

        Raises:
            CommitGraphError: the graph cannot run (see :meth:`Graph.problems`),
                has no nodes, or holds what is not a :class:`chimera.Node`, or
                a node cannot be pickled.
            TypeError: *graph* is not a :class:`chimera.Graph`.
        """
        _check_graph(graph)
        problems = graph.problems()
        if not graph.G.nodes:
            problems.append("the graph has no nodes")
        for node_id, node in graph.G.nodes.items():
            if not isinstance(node["object"], Node):
                problems.append(
                    f"node {node['name']!r} is a {type(node['object']).__name__}, "
                    "not a chimera.Node: a Worker could not run it"
                )
            else:
                inputs = [graph.G.nodes[i]["name"] for i in graph.G.predecessors(node_id)]
                problems.extend(_step_problems(node["object"], inputs))
        if problems:
            raise CommitGraphError(problems)
        pickled: dict[str, bytes] = {}
        for node_id, node in graph.G.nodes(data="object"):
            try:
                pickled[node_id] = pickle_node(node)
            except Exception as exc:
                problems.append(
                    f"node {node.name!r} cannot be pickled to be sent to its worker: {exc}, "
                    f"in {unpicklable_part(node)} (make what cannot be, such as a lock, a "
                    "socket or a device, in prep())"
                )
                continue
            if len(pickled[node_id]) > MAX_NODE_BYTES:
                problems.append(
                    f"node {node.name!r} is {len(pickled[node_id]) / 1e6:.1f} MB pickled, over "
                    f"{MAX_NODE_BYTES / 1e6:.1f} MB: it travels to its worker in one control "
                    "message (load large data, such as a model, in prep())"
                )
        if problems:
            raise CommitGraphError(problems)
        self._graph = graph
        self._pickled = pickled
        names = {node_id: name for node_id, name in graph.G.nodes(data="name")}
        self._node_names = names
        self._node_ids = {name: node_id for node_id, name in names.items()}

    def map_graph(self, worker_graph_map: Mapping[str, Sequence[str]]) -> None:
        """Say which Worker runs which nodes of the registered graph: these are
        the nodes :meth:`state` shows from now on (``/ws/events`` publishes a
        ``graph`` event).

        Raises:
            CommitGraphError: see :meth:`commit_graph`.
            RuntimeError: no graph is registered.
        """
        graph = self._registered()
        self._mapping = resolve_mapping(
            graph, self._names(), worker_graph_map, self.max_num_of_workers
        )
        workers = self._names()
        self._left = {}
        # A graph mapped anew is a new session (its own folder, start and stop).
        self._session, self._started_ns, self._stopped_ns = None, None, None
        self._ended = False
        self._collected = {}
        self._steps_sampled = {}
        self._addresses = {}
        self._link_key = secrets.token_hex(16)
        self.nodes.clear()  # (those of the graph before: shut down)
        self._node_info = {
            node_id: {
                "name": self._node_names[node_id],
                "worker": workers[worker_id],
                "state": None,
                "reason": None,
                "steps": 0,
                "dropped": 0,
                "writer_wait_ms": 0,
                "fps": 0.0,
            }
            for worker_id, node_ids in self._mapping.items()
            for node_id in node_ids
        }
        self._publish({"type": "graph", "nodes": self.state()["nodes"]})

    @_one_at_a_time(shutdown_ends_it=True)
    async def create_p2p_network(self) -> bool:
        """Create every mapped node on its Worker (each Worker's in parallel). Returns True.

        Raises:
            NodeError: a node cannot be made where it runs.
            RuntimeError: no graph is mapped, or a Worker failed or left.
        """
        self._registered()
        if not self._mapping:
            raise RuntimeError("no graph is mapped: call map_graph (or commit_graph)")
        await self._on_every_worker(self._create_on)
        return True

    @_one_at_a_time(shutdown_ends_it=True)
    async def request_node_creation(self, worker_id: str, node_id: str) -> bool:
        """Create one node of the mapped graph on the Worker it is mapped to
        (each given by its id or its name). Returns True.

        Raises:
            NodeError: the node cannot be made there.
            CommitGraphError: no such Worker or node, or the node is not
                mapped to that Worker.
            RuntimeError: no graph is registered, or the Worker failed or left.
        """
        graph = self._registered()
        worker, node = resolve_placement(graph, self._names(), self._mapping, worker_id, node_id)
        await self._create_on(worker, [node])
        return True

    async def _create_on(self, worker_id: str, node_ids: list[str]) -> None:
        """Create the nodes *node_ids* on *worker_id*, but those created already."""
        graph = self._registered()
        node_ids = [node_id for node_id in node_ids if node_id not in self._addresses]
        if not node_ids:
            return
        specs = [self._spec(graph, node_id, worker_id) for node_id in node_ids]
        result = await self._request(worker_id, "create_nodes", nodes=specs)
        # (Only those asked for: a Worker does not say where another's nodes are.)
        self._set_node_addresses({node: result["addresses"].get(node) for node in node_ids})

    def request_node_server_data(self, worker_id: str) -> bool:
        """Whether the address of every node of *worker_id* is known (nodes
        report it when they are created)."""
        return all(node in self._addresses for node in self._mapping.get(worker_id, []))

    @_one_at_a_time(shutdown_ends_it=True)
    async def setup_p2p_connections(self) -> bool:
        """Connect every node to its inputs, then run every ``prep``. Returns True.

        Raises:
            NodeError: a node's ``prep`` raised.
            RuntimeError: the nodes are not created, or a Worker failed or left.
        """
        await self._on_every_worker(lambda worker_id, _: self._connect_on(worker_id))
        await self._broadcast("prep_nodes")
        return True

    @_one_at_a_time(shutdown_ends_it=True)
    async def request_connection_creation(self, worker_id: str) -> bool:
        """Connect the nodes of one Worker to their inputs. Returns True.

        Raises:
            RuntimeError: one of them or of their inputs is not created yet, or
                the Worker failed or left.
        """
        await self._connect_on(worker_id)
        return True

    async def _connect_on(self, worker_id: str) -> None:
        """:meth:`request_connection_creation` (in the turn of the call that runs it)."""
        graph = self._registered()
        wiring = {}
        for node_id in self._mapping.get(worker_id, []):
            inputs = graph.inputs(node_id)
            for src in (node_id, *inputs):
                if src not in self._addresses:
                    raise RuntimeError(f"node {self._node_names[src]!r} is not created yet")
            wiring[node_id] = {self._node_names[src]: self._addresses[src] for src in inputs}
        await self._request(worker_id, "connect_nodes", addresses=wiring)

    def save_meta(self) -> Path:
        """Write the session's ``meta.json`` now, in its folder (see
        :meth:`session_folder`), as :meth:`start` and :meth:`collect` do: the
        graph, the mapping, the Workers, the nodes' states and what was
        collected so far. Returns its path. Blocking (a small file).

        Raises:
            RuntimeError: no graph is mapped (committed, or ``map_graph``-ed):
                there is no session yet.
            OSError: it cannot be written.
        """
        self._check_committed("save_meta()")
        return self._write_session_meta()

    def _write_session_meta(self) -> Path:
        """Write the session's ``meta.json`` (blocking); its path.

        Raises:
            OSError: it cannot be written (the message names it).
        """
        path = self.session_folder() / "meta.json"
        meta = self._session_meta(path.parent, self._collected)
        try:
            path.write_text(json.dumps(meta, indent=2))
        except OSError as exc:
            raise OSError(exc.errno, f"cannot write {path}: {exc.strerror}") from exc
        return path

    def _meta(self) -> dict[str, Any]:
        """The graph, the mapping, the Workers and the nodes' states.

        Raises:
            RuntimeError: no graph is registered.
        """
        graph = self._registered()
        names = self._node_names
        workers = self._names()
        meta = {
            "written_ns": self._clock(),
            "nodes": [{"id": node_id, "name": name} for node_id, name in names.items()],
            "edges": [
                {
                    "src": names[src],
                    "dst": names[dst],
                    "delivery": graph.edge_delivery(src, dst),
                    "followed": graph.followed_input(dst) == src,
                }
                for src, dst in graph.G.edges
            ],
            "mapping": {
                workers.get(worker_id, worker_id): [names[node] for node in node_ids]
                for worker_id, node_ids in self._mapping.items()
            },
            "workers": [{"id": info.id, "name": info.name} for info in self._workers.values()],
            "states": {names[node]: state for node, state in self.nodes.items() if node in names},
        }
        return meta

    def _registered(self) -> Graph:
        if self._graph is None:
            raise RuntimeError("no graph is registered: call register_graph (or commit_graph)")
        return self._graph

    @_one_at_a_time(shutdown_ends_it=True)
    async def step(self) -> bool:
        """Step every node once (ChimeraPy's offline mode, instead of :meth:`start`):
        sources step and send, then each node steps on what its inputs sent.
        Returns True once every node has stepped (its steps counted in
        :meth:`state`). What ``save_*`` saves in these steps is not recorded.

        A node that failed (its ``step`` raised) steps no more, and takes in
        nothing more.

        Raises:
            NodeError: a node's ``step`` raised, or it overrides ``main``
                (which only :meth:`start` runs).
            RuntimeError: no graph is committed; the nodes run (or ran: they
                are stopped, by :meth:`stop` or :meth:`collect`).
        """
        self._check_not_started("step()")
        await self._broadcast("step_nodes")
        return True

    @_one_at_a_time()
    async def start(self) -> bool:
        """Start every node stepping, and recording (what ``save_*`` saves). Returns True.

        Raises:
            RuntimeError: the nodes run already, or ran and stopped (shut
                them down and commit the graph again to run it again).
        """
        self._check_not_started("start()")
        await self._start_nodes(record=True)
        return True

    @_one_at_a_time()
    async def preview(self) -> bool:
        """Start every node stepping, without recording (``save_*`` saves nothing
        until :meth:`record`). Returns True.

        Raises:
            RuntimeError: as :meth:`start`.
        """
        self._check_not_started("preview()")
        await self._start_nodes(record=False)
        return True

    async def _start_nodes(self, *, record: bool) -> None:
        """Start every node: the session starts now (unless it did before).
        Cancelled before any node runs, it has not started."""
        started = self._started_ns or self._clock()
        try:
            await self._broadcast("start_nodes", record=record)
        except BaseException:
            if "RUNNING" in self._mapped_states():
                self._started_ns = started
            raise
        self._started_ns = started
        await self._write_first_meta()

    async def _write_first_meta(self) -> None:
        """Write the session's ``meta.json`` as it starts: what runs where, and
        each node's id, which names the folder its Worker keeps its files in,
        should this Manager not live to collect them (:meth:`collect` writes
        it again). A failure is logged: the nodes run on."""
        try:
            await trio.to_thread.run_sync(self._write_session_meta)
        except OSError as exc:
            log.warning("%s", exc)

    def _mapped_states(self) -> set[str | None]:
        """The states of the nodes of the graph mapped now (those of a graph
        before may keep their last state)."""
        return {self.nodes.get(node) for nodes in self._mapping.values() for node in nodes}

    def _nodes_run(self) -> bool:
        """Whether the nodes run: started (or previewed) and not stopped since,
        or RUNNING (as the Workers say: a moment after :meth:`start` returns)."""
        started = self._started_ns is not None and self._stopped_ns is None
        return started or "RUNNING" in self._mapped_states()

    def _check_committed(self, call: str) -> None:
        """Raise RuntimeError, naming *call*, if no graph is committed."""
        if not self._mapping:
            raise RuntimeError(f"{call}: no graph is committed (commit_graph() first)")

    def _check_not_started(self, call: str) -> None:
        """Raise RuntimeError, naming *call*, if no graph is committed, or
        its nodes run or have run."""
        self._check_committed(call)
        if self._nodes_run():
            raise RuntimeError(f"{call}: the nodes run already (stop() them first)")
        if (
            self._stopped_ns is not None
            or self._ended
            or self._mapped_states() & {"STOPPED", "SAVED"}
        ):
            raise RuntimeError(
                f"{call}: the nodes ran and stopped; a graph runs once per commit: "
                "shut its nodes down and commit it again (AsyncManager.shutdown(); "
                "a Manager's shutdown() closes it: make a new one)"
            )

    @_one_at_a_time()
    async def record(self) -> bool:
        """Start recording on a previewing cluster (on a recording one, it
        changes nothing). Returns True.

        Raises:
            RuntimeError: the nodes do not run (``preview()`` them first).
        """
        self._check_committed("record()")
        if not self._nodes_run():
            self._check_not_started("record()")  # (ran and stopped: it says so)
            raise RuntimeError(
                "record(): the nodes do not run: preview() them first "
                "(start() runs them and records)"
            )
        await self._broadcast("record_nodes")
        return True

    @_one_at_a_time(shutdown_ends_it=True)
    async def stop(self) -> bool:
        """Stop the sources; every chunk they sent is stepped downstream before
        each node's ``teardown``. Returns once every node has stopped: True.
        Every :data:`PROGRESS_EVERY` seconds it logs the nodes it waits for,
        with the steps each has taken (a warning after :data:`SLOW`).

        The nodes of a Worker that left are gone (FAILED): the others stop.

        Raises:
            RuntimeError: a Worker failed.
        """
        self._check_committed("stop()")
        await self._stop(ending=False)
        return True

    async def _stop(self, *, ending: bool) -> None:
        """:meth:`stop`; with *ending*, the nodes never started end too (see
        :meth:`collect`)."""
        with unwrapped():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._log_what_stop_waits_for, "collect" if ending else "stop")
                await self._broadcast("stop_nodes", without_left=True, ending=ending)
                nursery.cancel_scope.cancel()
        self._ended = self._ended or ending
        if self._started_ns is not None and self._stopped_ns is None:
            self._stopped_ns = self._clock()  # (the session's end: a stop after it is none)

    @_one_at_a_time()
    async def collect(self, unzip: bool = True) -> bool:
        """Bring what every node saved into this session's folder,
        ``LOGDIR/SESSION/WORKER/NODE/``, each file verified against the SHA-256
        its Worker computed; write ``meta.json`` there. Returns True; False if
        a Worker left, so that its nodes' files could not be collected
        (logged; ``meta.json`` says which nodes: ``"collected": false``).

        It ends the session first, so that every file is whole: the nodes that
        run are stopped (see :meth:`stop`), and those never started (stepped
        with :meth:`step`, or only prepared) end too: each steps on what its
        inputs sent and it has not stepped on, then its ``teardown`` runs
        and its files are closed (STOPPED, or SAVED).

        Nodes that failed are collected like the others. With *unzip* False,
        each Worker's folder ends as ``WORKER.zip`` instead (added to, if an
        earlier ``collect`` made it); with *unzip*, such an archive is
        unpacked into the folder. Progress (files, MB) goes to the log every
        few seconds.

        Raises:
            ValueError: a file did not arrive whole (each named). ``meta.json``
                is written first: the nodes of a Worker whose files did not
                all arrive whole are ``"collected": false`` there.
            RuntimeError: a Worker's files could not be collected (the
                Manager's disk is full, say; each Worker named, after
                ``meta.json`` is written, as above: call again once the
                problem is solved, its files are kept); or no graph is
                committed (none yet, or it was shut down: collect before
                :meth:`shutdown`).
            OSError: ``meta.json`` cannot be written.
        """
        self._check_committed("collect()")
        await self._stop(ending=True)
        session = self.session_folder()
        progress = Progress()
        workers: dict[str, dict[str, Any]] = {}
        #: What each Worker sent that did not arrive whole (its nodes count as not collected).
        broken: list[str] = []
        #: Why each Worker whose collection failed did (its nodes count as not collected).
        failed: list[str] = []

        async def collect_from(worker_id: str, node_ids: list[str]) -> None:
            try:
                await collect_files(worker_id)
            except WorkerLeftError:
                raise
            except RuntimeError as exc:  # (the Worker's command failed: it says why)
                failed.append(str(exc))

        async def collect_files(worker_id: str) -> None:
            name = self._workers[worker_id].name
            key = uuid.uuid4().hex
            root = session / check_name(name, "worker name")
            incoming = self._collections[key] = Incoming(root, progress.update(name))
            # A Worker that can read this probe shares the folder: it moves its files in.
            probe = root / f".chimera-probe-{key}"
            try:
                try:
                    root.mkdir(parents=True, exist_ok=True)
                    probe.write_text(key)
                except OSError as exc:
                    raise RuntimeError(
                        f"worker {name!r}: the manager cannot write in {root}: {exc}"
                    ) from exc
                local = {"folder": str(root), "probe": probe.name, "key": key}
                result = await self._request(
                    worker_id, "collect_nodes", upload=f"/collect/{key}", local=local
                )
            finally:
                del self._collections[key]
                probe.unlink(missing_ok=True)
            if result["moved"]:
                await trio.to_thread.run_sync(incoming.hash_moved, result["files"])
            try:
                verify(name, result["files"], incoming.received)
            except ValueError as exc:
                broken.append(str(exc))
                return
            workers[name] = self._collected[name] = {
                "clock": result["clock"],
                "files": len(result["files"]),
                "streams": result.get("streams") or {},
            }

        left = await self._on_every_worker(collect_from, without_left=True)
        log.info("%s, into %s", progress.line(), session)
        for name in left:
            log.error("worker %r left: the files of its nodes are not collected", name)
        await trio.to_thread.run_sync(self._write_session_meta)
        for name in workers:
            pack = _zip_folder if not unzip else _unzip_archive
            await trio.to_thread.run_sync(pack, session / name)
        # (After meta.json: what did arrive whole is described.)
        if failed:
            raise RuntimeError("; ".join(failed))
        if broken:
            raise ValueError("; ".join(broken))
        return not left

    def session_folder(self) -> Path:
        """This session's folder in the logdir: ``YYYY-MM-DD_HH-MM-SS`` of the
        first start (or of now, if asked before), with a suffix if that
        exists already. Before a graph is committed there is no session:
        where one would go if it started now (not made)."""
        if self._session is None and not self._mapping:
            return self.logdir / self._free_session_name(self._clock())
        if self._session is None:
            self._session = self._free_session_name(self._started_ns or self._clock())
        folder = self.logdir / self._session
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _free_session_name(self, when_ns: int) -> str:
        """``YYYY-MM-DD_HH-MM-SS`` of *when_ns*, with a suffix if the logdir has it already."""
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(when_ns / 1e9))
        name, suffix = stamp, 1
        while (self.logdir / name).exists():
            suffix += 1
            name = f"{stamp}-{suffix}"
        return name

    def _session_meta(self, session: Path, workers: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The session's ``meta.json``, *workers* being what was collected of
        each Worker's nodes (blocking: the streams of a node whose Worker sent
        no summaries are summarized from its collected files, if any)."""
        meta = self._meta()
        meta["session"] = session.name
        meta["start_ns"], meta["stop_ns"] = self._started_ns, self._stopped_ns
        meta["clocks"] = {name: info["clock"] for name, info in workers.items()}
        meta["streams"] = {
            f"{info['worker']}/{info['name']}": {
                "state": info["state"],
                "reason": info["reason"],
                "dropped": info["dropped"],
                "writer_wait_ms": info["writer_wait_ms"],
                "collected": info["worker"] in workers,
                "streams": self._streams_of(session, workers, info["worker"], info["name"]),
            }
            for info in self._node_info.values()
        }
        return meta

    @staticmethod
    def _streams_of(
        session: Path, workers: dict[str, dict[str, Any]], worker: str, node: str
    ) -> list[dict[str, Any]]:
        """A node's stream summaries: from its manifest, as its Worker sent
        them, else from its collected files (blocking)."""
        streams = workers.get(worker, {}).get("streams", {}).get(node)
        return streams if streams is not None else summarize(session / worker / node)

    @_one_at_a_time(ends_the_others=True)
    async def shutdown(self) -> None:
        """Close every node on every Worker (stopping those that run).

        The Workers stay connected; leaving ``async with`` closes the Manager.
        The nodes of a Worker that left are gone already.

        Raises:
            RuntimeError: a Worker failed.
        """
        if self._mapping:
            await self._broadcast("shutdown_nodes", without_left=True)
            self._mapping = {}

    async def gather(self) -> dict[str, DataChunk | None]:
        """The last chunk each committed node's ``step`` returned, by node id
        (None for a node that returned none yet, or whose process or Worker is gone).

        Raises:
            RuntimeError: a Worker failed.
            DecodeError: a Worker sent a chunk that cannot be decoded.
        """
        gathered: dict[str, DataChunk | None] = {
            node_id: None for node_ids in self._mapping.values() for node_id in node_ids
        }

        async def gather_from(worker_id: str, node_ids: list[str]) -> None:
            key = uuid.uuid4().hex
            self._uploads[key] = None
            try:
                await self._request(worker_id, "gather_nodes", upload=f"/uploads/{key}")
                data = self._uploads[key]
            finally:
                del self._uploads[key]
            if data is None:
                raise RuntimeError(f"worker {self._workers[worker_id].name!r} sent nothing")
            gathered.update(_decode_gathered(data, self.allow_objects))

        await self._on_every_worker(gather_from, without_left=True)
        return gathered

    async def broadcast_request(
        self,
        htype: str,
        route: str,
        data: Any = None,
        timeout: float = 55,  # noqa: ASYNC109 (ChimeraPy's signature)
    ) -> bool:
        """Carry out one of ChimeraPy's Worker routes on every Worker.

        ChimeraPy's Workers served HTTP, and this sent each the same request;
        here Workers serve nothing, and each route that had a meaning for a
        whole cluster runs the Manager method that does it:

        ==========================  ============================================
        ``post /nodes/start``       :meth:`start`
        ``post /nodes/stop``        :meth:`stop`
        ``post /nodes/step``        :meth:`step`
        ``get /nodes/gather``       :meth:`gather`
        ``post /packages/load``     :meth:`distribute_packages` (*data*: the
                                    packages, or ``{"packages": [...]}``)
        ``post /shutdown``          :meth:`shutdown`, then every Worker leaves
                                    (as ChimeraPy's Workers ended then)
        ==========================  ============================================

        Returns:
            True once every Worker has done it; False after *timeout* seconds
            (what was under way is cancelled).

        Raises:
            ValueError: *htype* and *route* name none of the routes above.
            Exception: whatever the method raises.
        """
        packages = data.get("packages", []) if isinstance(data, Mapping) else data
        routes: dict[tuple[str, str], Callable[[], Awaitable[Any]]] = {
            ("post", "/nodes/start"): self.start,
            ("post", "/nodes/stop"): self.stop,
            ("post", "/nodes/step"): self.step,
            ("get", "/nodes/gather"): self.gather,
            ("post", "/packages/load"): partial(self.distribute_packages, packages),
            ("post", "/shutdown"): self._shut_workers_down,
        }
        call = routes.get((htype, route))
        if call is None:
            known = ", ".join(f"{h} {r}" for h, r in routes)
            raise ValueError(f"no route {htype} {route}; the routes are: {known}")
        with trio.move_on_after(timeout):
            await call()
            return True
        log.error("broadcast_request %s %s: no answer within %s s", htype, route, timeout)
        return False

    @_one_at_a_time()
    async def _shut_workers_down(self) -> None:
        """Close every node, then have every connected Worker leave; return once all left."""
        await self.shutdown()

        async def leave(worker_id: str) -> None:
            with suppress(WorkerLeftError):  # (it leaves: it does not answer)
                await self._request(worker_id, "leave")

        await run_all([partial(leave, worker_id) for worker_id in list(self._workers)])

    @_one_at_a_time()
    async def distribute_packages(self, packages_meta: Sequence[Mapping[str, Any]]) -> bool:
        """Ship local packages to every connected Worker, where its nodes import
        them (ChimeraPy's ``send_packages``). Returns True once every Worker has them.

        Each package is ``{"name": its import name, "path": its folder or .py
        file}``; the Workers download it from ``GET /packages/NAME.zip`` and
        check its SHA-256. A package shipped again replaces the earlier one
        (for nodes created afterwards).

        Raises:
            ValueError: a package is not valid (see :func:`chimera._packages.pack`);
                nothing is shipped.
            RuntimeError: a Worker could not load a package, or left.
        """
        packages = [await trio.to_thread.run_sync(pack, meta) for meta in packages_meta]
        for package in packages:
            self._packages[package.name] = package
            log.info("package %r: %d bytes to ship", package.name, len(package.data))
        args = [{"name": p.name, "sha256": p.sha256} for p in packages]
        await run_all(
            [
                partial(self._request, worker_id, "load_packages", packages=args)
                for worker_id in self._workers
            ]
        )
        return True

    def _names(self) -> dict[str, str]:
        return {worker_id: info.name for worker_id, info in self._workers.items()}

    def _names_on(self, worker_id: str) -> set[str]:
        """The names of the nodes mapped to *worker_id*."""
        return {self._node_names[node] for node in self._mapping.get(worker_id, [])}

    def _spec(self, graph: Graph, node_id: str, worker_id: str) -> dict[str, Any]:
        """What Worker *worker_id* needs to make node *node_id*."""
        names, local = self._node_names, set(self._mapping.get(worker_id, []))
        node = graph.G.nodes[node_id]["object"]
        followed = graph.followed_input(node_id)
        outputs = graph.outputs(node_id)
        return {
            "id": node_id,
            "name": node.name,
            "node": base64.b64encode(self._pickled[node_id]).decode("ascii"),
            "inputs": [
                [names[src], graph.edge_delivery(src, node_id)] for src in graph.inputs(node_id)
            ],
            "follow": names[followed] if followed is not None else None,
            "outputs": len(outputs),
            # Every node it sends to runs on the same Worker: its outlet may be a Unix socket.
            "local_outputs": bool(outputs) and all(dst in local for dst in outputs),
            "transport": self.transport,
            "allow_objects": self.allow_objects,
            # What its inputs' outlets ask of it, and its outlet of its outputs: only
            # the nodes of this graph link to each other (see transports.bind).
            "link_key": self._link_key,
            # Where its outlet listens, if not where its Worker reached the Manager.
            "bind_host": self._bind_host(graph, worker_id, node_id),
        }

    def _bind_host(self, graph: Graph, worker_id: str, node_id: str) -> str | None:
        """Where the outlet of *node_id*, on *worker_id*, must listen for the
        Workers it sends to, if not where its Worker reached the Manager (None).

        A Worker that reached the Manager over loopback (it runs on the
        Manager's machine: ``connect(manager.host, ...)`` with ``host="0.0.0.0"``)
        would listen on loopback, which a Worker on another machine cannot
        reach: it listens where such a Worker reached the Manager, an address
        of this same machine.
        """
        info = self._workers.get(worker_id)
        if info is None or not _is_loopback(info.ip):
            return None
        outputs = set(graph.outputs(node_id))
        for receiver_id, node_ids in self._mapping.items():
            receiver = self._workers.get(receiver_id)
            if receiver is None or not outputs.intersection(node_ids):
                continue
            if not _is_loopback(receiver.ip) and _bindable_elsewhere(receiver.reached):
                return receiver.reached
        return None

    async def _on_every_worker(
        self, fn: Callable[[str, list[str]], Awaitable[Any]], *, without_left: bool = False
    ) -> list[str]:
        """Run *fn(worker id, its node ids)* for every mapped Worker, concurrently.

        With *without_left*, Workers that left (their nodes are gone) are
        skipped, before the call or during it; the names of those are returned.

        Raises:
            Exception: the first one a call raised (after every call ended).
        """
        left = []

        async def call(worker_id: str, node_ids: list[str]) -> None:
            if without_left and worker_id in self._left:
                left.append(self._left[worker_id])
                return
            try:
                await fn(worker_id, node_ids)
            except WorkerLeftError:
                if not without_left:
                    raise
                left.append(self._left.get(worker_id, worker_id))

        await run_all([partial(call, *item) for item in self._mapping.items()])
        return left

    async def _broadcast(self, command: str, *, without_left: bool = False, **args: Any) -> None:
        """Ask every mapped Worker to carry out *command*, concurrently (see
        :meth:`_on_every_worker` for *without_left*)."""
        await self._on_every_worker(
            lambda worker_id, _: self._request(worker_id, command, **args),
            without_left=without_left,
        )

    async def _request(self, worker_id: str, command: str, **args: Any) -> Any:
        """Ask a Worker to carry out *command*; its result.

        Raises:
            NodeError: a node's code raised.
            RuntimeError: the command failed otherwise, or the Worker left.
        """
        info = self._workers.get(worker_id)
        if info is None or info._send is None:
            if worker_id in self._left:
                raise WorkerLeftError(f"worker {self._left[worker_id]!r} left")
            raise RuntimeError(f"worker {worker_id} is not connected")
        request_id = next(self._request_ids)
        pending = info._pending[request_id] = _Pending()
        text = protocol.make("request", id=request_id, command=command, args=args)
        sent = time.perf_counter()
        log.debug("asking worker %r: %s (request %d)", info.name, command, request_id)
        await info._send({"type": "websocket.send", "text": text})
        await pending.done.wait()
        reply = pending.reply
        if reply is None:
            raise WorkerLeftError(f"worker {info.name!r} left before it answered ({command})")
        log.debug(
            "worker %r answered %s (request %d) in %.0f ms: %s",
            info.name,
            command,
            request_id,
            (time.perf_counter() - sent) * 1000,
            "ok" if reply["ok"] else reply["error"],
        )
        if not reply["ok"]:
            if reply["node"] is not None:
                raise NodeError(reply["node"], reply["error"], reply["traceback"] or "")
            raise RuntimeError(f"worker {info.name!r}: {reply['error']}")
        return reply["result"]

    # --- lifecycle -------------------------------------------------------------

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[AsyncManager]:
        # (Made before listening: an unwritable logdir is said at once. A
        # Manager that cannot listen removes what it made here, if still empty.)
        made = _missing_folders(self.logdir)
        log_path = self.logdir / "nodes.log"
        try:
            self.logdir.mkdir(parents=True, exist_ok=True)
            new_log = not log_path.exists()
            self._log_file = open(log_path, "a", encoding="utf-8")
        except OSError as exc:
            raise OSError(
                exc.errno, f"the manager cannot write in its logdir {self.logdir}: {exc.strerror}"
            ) from None
        self._url_host = protocol.in_url(self.host)
        started = False
        try:
            if self.publish_logs_via_zmq:
                # Each subscriber's queue: nng's largest (its default, 16, drops
                # records at the first burst of a few hundred lines).
                self._log_publisher = pynng.Pub0(send_buffer_size=LOG_QUEUE)
                try:
                    self._log_publisher.listen(f"tcp://{self._url_host}:{self._logs_port}")
                except pynng.NNGException as exc:
                    raise OSError(
                        "the manager cannot publish logs on "
                        f"{self._url_host}:{self._logs_port}: {exc}"
                    ) from None
                # pynng 0.9's local_address.port is byte-swapped: read the string form.
                port = str(self._log_publisher.listeners[0].local_address).rsplit(":", 1)[1]
                self.logs_address = f"tcp://{_dialable(self.host)}:{port}"
            async with self._serving():
                started = True
                yield self
        finally:
            self._close_log_file()
            if self._log_publisher is not None:
                self._log_publisher.close()
            # (An empty nodes.log made here says nothing; a start that failed
            # leaves no folder it made either.)
            _remove_if_empty([log_path] if new_log else [], [] if started else made)

    @asynccontextmanager
    async def _serving(self) -> AsyncIterator[None]:
        """Serve HTTP and WebSockets on :attr:`port` while in the block.

        Raises:
            OSError: the port cannot be listened on.
        """
        config = hypercorn.config.Config()
        config.bind = [f"{self._url_host}:{self.port}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("chimera.manager.http")
        async with trio.open_nursery() as nursery:
            try:
                self.port = await nursery.start(_http.serve, self._app, config)
            except OSError as error:
                raise OSError(
                    error.errno,
                    f"the manager cannot listen on {self._url_host}:{self.port}: {error.strerror}",
                ) from None
            log.info("manager serving on %s:%d", self._url_host, self.port)
            self._tasks = nursery
            try:
                yield
            finally:
                self._tasks = None
                with trio.CancelScope(shield=True), trio.move_on_after(EVENTS_CLOSE_TIMEOUT):
                    await self._close_events()
                nursery.cancel_scope.cancel()  # closes the port and every connection

    # --- the ASGI application ----------------------------------------------------

    async def _app(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            if scope["path"] == "/ws/worker":
                await self._worker_session(scope, receive, send)
            elif scope["path"] == "/ws/events" and self.dashboard_api:
                await self._events_session(scope, receive, send)
            else:
                await receive()  # websocket.connect
                await _refuse_websocket(send, 404, {"error": f"no WebSocket {scope['path']}"})

    async def _close_events(self) -> None:
        """Close every ``/ws/events`` connection with code 1001 (going away),
        after the events already published; return once they are closed."""
        self._closing = True
        for subscriber in self._subscribers:
            subscriber.close()
        while self._subscribers:
            await self._subscribers_changed.park()

    def _authorized(self, scope: dict[str, Any]) -> bool:
        """Whether an API client presents the token (if the Manager has one):
        ``Authorization: Bearer TOKEN`` (the scheme in any case), or ``?token=TOKEN``."""
        if self._token is None:
            return True
        headers = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization", b"").decode(errors="replace")
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and protocol.same_secret(
            credentials.lstrip(" "), self._token
        ):
            return True
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode(errors="replace"))
        tokens = query.get("token", [])
        return len(tokens) == 1 and protocol.same_secret(tokens[0], self._token)

    async def _events_session(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """``/ws/events``: the state (``"type": "state"``), then every change of
        it as it happens (JSON texts: ``graph``, ``node_state``,
        ``node_address``, ``node_stats``, ``worker_joined``, ``worker_left``;
        see docs/nodes.md). Closed with code 1001 when the Manager closes,
        1008 if the client reads too slowly to keep up."""
        if (await receive())["type"] != "websocket.connect":
            return
        if not self._authorized(scope):
            await _refuse_websocket(send, 401, {"error": "refused: wrong or missing token"})
            return
        await send({"type": "websocket.accept"})
        sender, events = trio.open_memory_channel[str](1000)
        self._subscribers.add(sender)
        if self._closing:
            sender.close()
        try:
            snapshot = {"type": "state", **self.state()}
            await send({"type": "websocket.send", "text": json.dumps(snapshot)})
            async with trio.open_nursery() as nursery:

                async def until_disconnect() -> None:
                    while (await receive())["type"] != "websocket.disconnect":
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(until_disconnect)
                async for text in events:
                    await send({"type": "websocket.send", "text": text})
                # The channel was closed: the Manager closes, or the client is too slow.
                await send({"type": "websocket.close", "code": 1001 if self._closing else 1008})
                # Until the client answers (until_disconnect), or for EVENTS_CLOSE_TIMEOUT.
                nursery.cancel_scope.deadline = trio.current_time() + EVENTS_CLOSE_TIMEOUT
        finally:
            self._subscribers.discard(sender)
            self._subscribers_changed.unpark_all()

    async def _http(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        package = self._packages.get(path.removeprefix("/packages/").removesuffix(".zip"))
        if method == "GET" and path == "/api/state" and self.dashboard_api:
            if not self._authorized(scope):
                await _respond(send, 401, {"error": "refused: wrong or missing token"})
                return
            await _respond(send, 200, self.state())
        elif method == "POST" and path.removeprefix("/uploads/") in self._uploads:
            key = path.removeprefix("/uploads/")
            if not self._authorized(scope):
                await _respond(send, 401, {"error": "refused: wrong or missing token"})
                return
            if self._uploads[key] is not None or key in self._uploading:
                await _respond(send, 409, {"error": "this upload came already"})
                return
            self._uploading.add(key)
            try:
                data = await _read_body(receive, MAX_UPLOAD)
            finally:
                self._uploading.discard(key)
            if data is None:
                await _respond(send, 413, {"error": f"larger than {MAX_UPLOAD} bytes"})
                return
            if key in self._uploads:  # (still expected: the request did not give up)
                self._uploads[key] = data
            await _respond(send, 200, {})
        elif method == "POST" and path.startswith("/collect/"):
            key, _, member = path.removeprefix("/collect/").partition("/")
            incoming = self._collections.get(key)
            if incoming is None:
                await _respond(send, 404, {"error": f"no collection {key!r} under way"})
            elif not self._authorized(scope):
                await _respond(send, 401, {"error": "refused: wrong or missing token"})
            else:
                try:  # (the path is decoded already: once is all)
                    written = await incoming.write(member, read_body(receive))
                except ValueError as exc:
                    log.error("collect: refused %r: %s", member, exc)
                    await _respond(send, 400, {"error": str(exc)})
                    return
                await _respond(send, 200, {"sha256": written.sha256})
        elif method == "GET" and path.startswith("/packages/") and package is not None:
            if not self._authorized(scope):
                await _respond(send, 401, {"error": "refused: wrong or missing token"})
                return
            await _respond_bytes(send, package.data, b"application/zip")
        elif path == "/api/state" and self.dashboard_api:
            error = {"error": f"{method} {path}: only GET"}
            await _respond(send, 405, error, headers=[(b"allow", b"GET")])
        else:
            await _respond(send, 404, {"error": f"no {method} {path}"})

    async def _worker_session(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """One Worker's control connection, from its ``hello`` until it leaves."""
        if (await receive())["type"] != "websocket.connect":
            return
        sending = trio.Lock()  # requests and answers go out from several tasks

        async def send_locked(event: dict[str, Any]) -> None:
            async with sending:
                await send(event)

        await send_locked({"type": "websocket.accept"})

        async def reply(type_: str, **fields: Any) -> None:
            await send_locked({"type": "websocket.send", "text": protocol.make(type_, **fields)})

        info = None
        #: The Worker's hello, and the nonce of the challenge it was sent.
        hello: dict[str, Any] | None = None
        nonce = ""
        silent = False
        try:
            while True:
                with trio.move_on_after(protocol.SILENCE_TIMEOUT) as silence:
                    event = await receive()
                if silence.cancelled_caught:
                    silent = True
                    name = repr(info.name) if info is not None else "(not checked in)"
                    log.warning(
                        "worker %s: no word for %g s: taken as gone",
                        name,
                        protocol.SILENCE_TIMEOUT,
                    )
                    with trio.move_on_after(1):
                        await send_locked({"type": "websocket.close", "code": 1001})
                    return
                if event["type"] == "websocket.disconnect":
                    return
                received_ns = self._clock()
                try:
                    message = protocol.parse(event.get("text") or event.get("bytes") or "")
                except protocol.ProtocolError as exc:
                    log.warning("a worker sent a bad message: %s", exc)
                    await reply("error", error=str(exc), re=None)
                    continue
                kind = message["type"]
                if kind == "clock":
                    await reply("clock_ack", t0=message["t0"], t1=received_ns, t2=self._clock())
                elif kind == "hello" and info is None and hello is None:
                    hello, nonce = message, protocol.new_nonce()
                    proof = None
                    if self._token is not None:
                        proof = protocol.proof(self._token, "manager", nonce, hello["nonce"])
                    await reply("challenge", nonce=nonce, proof=proof)
                elif kind == "auth" and info is None and hello is not None:
                    workers = list(self._workers.values())
                    proven = self._token is None or protocol.proves(
                        message["proof"], self._token, "worker", hello["nonce"], nonce
                    )
                    if refusal := _hello_refusal(hello, proven, workers):
                        log.warning("worker %r refused: %s", hello["name"], refusal)
                        await reply("error", error=refusal, re="auth")
                        await send_locked({"type": "websocket.close", "code": 4403})
                        return
                    info = WorkerInfo(
                        hello["worker_id"],
                        hello["name"],
                        received_ns,
                        ip=(scope.get("client") or ("",))[0],
                        reached=_unmapped((scope.get("server") or ("",))[0]),
                        _send=send_locked,
                    )
                    self._workers[info.id] = info
                    self._workers_changed.unpark_all()
                    log.info("worker %r (%s) connected", info.name, info.id)
                    self._publish({"type": "worker_joined", **_worker_entry(info)})
                    await reply("welcome", worker_id=info.id)
                elif kind == "log" and info is not None:
                    if message["node"] in self._names_on(info.id):
                        self._node_log(info, message)
                elif kind == "node_stats" and info is not None:
                    mapped = self._mapping.get(info.id, [])
                    stats = message["stats"]
                    self._set_node_stats({node: stats[node] for node in mapped if node in stats})
                elif kind == "reply" and info is not None and message["id"] in info._pending:
                    pending = info._pending.pop(message["id"])
                    pending.reply = message
                    pending.done.set()
                elif kind == "node_state" and info is not None:
                    if message["node_id"] not in self._mapping.get(info.id, []):
                        continue  # (not its node: an old graph's, or a forgery)
                    # (Why a node failed is a record of its own, or the
                    # NodeError of the call that failed it: not said here again.)
                    self._set_node_state(message["node_id"], message["state"], message["reason"])
                else:
                    await reply("error", error=f"unexpected {kind} message", re=kind)
        finally:
            if info is not None:
                for pending in info._pending.values():
                    pending.done.set()  # no reply will come: the request fails
                del self._workers[info.id]  # (its id was not taken: see _hello_refusal)
                self._workers_changed.unpark_all()
                self._publish({"type": "worker_left", **_worker_entry(info)})
                self._worker_left(info, silent)


def _hello_refusal(
    message: dict[str, Any], proven: bool, workers: Sequence[WorkerInfo]
) -> str | None:
    """Why a Worker's ``hello`` is refused, if it is; *proven*: whether it
    proved it knows the token (or the Manager has none)."""
    if not proven:
        return protocol.TOKEN_REFUSED
    name = message["name"]
    try:
        check_name(name, "worker name")
    except ValueError as exc:
        return str(exc)
    if any(not character.isprintable() for character in name) or name == "meta.json":
        return f"worker name {name!r} cannot name its folder in a session"
    if any(worker.id == message["worker_id"] for worker in workers):
        return f"a worker with id {message['worker_id']!r} is connected already"
    if any(worker.name == name for worker in workers):
        return (
            f"a worker named {name!r} is connected already: give each worker a name of "
            "its own (its files are collected in a folder of that name)"
        )
    return None


def _check_graph(graph: object) -> None:
    """Raise TypeError unless *graph* is a :class:`Graph`."""
    if not isinstance(graph, Graph):
        raise TypeError(f"the graph must be a chimera.Graph, not {type(graph).__name__}")


def _unmapped(address: str) -> str:
    """*address* (an IP address, as a socket's) as IPv4 if it is an IPv4 one
    mapped into IPv6 (``::ffff:10.0.0.5``, on a Manager listening on ``::``)."""
    try:
        mapped = getattr(ipaddress.ip_address(address), "ipv4_mapped", None)
    except ValueError:
        return address
    return str(mapped) if mapped is not None else address


def _bindable_elsewhere(address: str) -> bool:
    """Whether *address*, the Manager's as a Worker reached it, names this
    machine to other Workers as it does to that one: an IP address, not
    link-local (its zone, an interface, is lost, and names another one on
    each machine)."""
    try:
        return not ipaddress.ip_address(address).is_link_local
    except ValueError:
        return False


def _is_loopback(address: str) -> bool:
    """Whether *address* (an IP address, as a peer's) is a loopback one
    (``::ffff:127.0.0.1`` too); False for anything else."""
    try:
        return ipaddress.ip_address(_unmapped(address)).is_loopback
    except ValueError:
        return False


def _dialable(host: str) -> str:
    """How a client on this machine names, in a URL, a socket listening on
    *host*: every interface (``0.0.0.0``, ``::``) as loopback, an IPv6
    address in brackets."""
    return protocol.in_url({"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host))


def _step_problems(node: Node, inputs: list[str]) -> list[str]:
    """What is wrong with *node*'s ``step`` for a node with *inputs*: a
    source's is called with no argument, another's with ``data_chunks``."""
    if type(node).step is Node.step or type(node).main is not Node.main:
        return []  # (not stepped, or runs main instead)
    try:
        # (What the runtime calls: a decorator's wrapper, not what it wraps.)
        parameters = inspect.signature(node.step, follow_wrapped=False).parameters.values()
    except (TypeError, ValueError):  # (no signature to read: it is called as it is)
        return []
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p.name for p in positional if p.default is p.empty]
    takes_any = any(p.kind is p.VAR_POSITIONAL for p in parameters)
    if not inputs and required:
        return [
            f"node {node.name!r} has no inputs: its step() is called with no argument, "
            f"but it takes {', '.join(map(repr, required))} (a source's is step(self))"
        ]
    if inputs and not positional and not takes_any:
        names = ", ".join(map(repr, inputs))
        return [
            f"node {node.name!r} has inputs ({names}): its step() is called with their "
            "chunks, but it takes no argument (step(self, data_chunks))"
        ]
    if len(required) > 1:
        return [
            f"node {node.name!r}: its step() takes {', '.join(map(repr, required))}, but is "
            "called with data_chunks alone"
        ]
    return []


def _missing_folders(folder: Path) -> list[Path]:
    """*folder* and those of its parents that do not exist, deepest first."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def _remove_if_empty(files: list[Path], folders: list[Path]) -> None:
    """Remove each of *files* that is empty, then each of *folders* (deepest
    first) that is: what the Manager made, unless something was put there."""
    for path in files:
        with suppress(OSError):
            if path.stat().st_size == 0:
                path.unlink()
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # (not empty, or gone): leave it, and its parents
            return


def _log_time(time_ns: int) -> str:
    """*time_ns* (cluster time) as ``nodes.log`` says it: ISO 8601, local time
    with its UTC offset, to the millisecond (``2025-05-01T14:03:07.123+02:00``)."""
    local = datetime.datetime.fromtimestamp(time_ns / 1e9).astimezone()
    return local.isoformat(timespec="milliseconds")


def _worker_entry(info: WorkerInfo) -> dict[str, Any]:
    """What :meth:`AsyncManager.state` says of a Worker."""
    return {"id": info.id, "name": info.name, "connected_ns": info.connected_ns}


def _zip_folder(folder: Path) -> None:
    """Move *folder*'s files into ``FOLDER.zip`` (stored: media files are
    compressed already), then remove it. An archive there already (an earlier
    ``collect``) is added to; a file it holds already is kept as it is."""
    target = folder.with_suffix(".zip")
    with zipfile.ZipFile(target, "a" if target.exists() else "w", zipfile.ZIP_STORED) as archive:
        held = set(archive.namelist())
        for path in files_under(folder):
            name = path.relative_to(folder.parent).as_posix()
            if name not in held:
                archive.write(path, name)
    shutil.rmtree(folder)


def _unzip_archive(folder: Path) -> None:
    """Move the files of ``FOLDER.zip`` (an earlier ``collect(unzip=False)``),
    if there is one, into *folder*, then remove it. A file *folder* holds
    already is kept as it is.

    Raises:
        OSError: a file cannot be written, or a member would land outside
            *folder* (the archive is then kept).
    """
    archive_path = folder.with_suffix(".zip")
    if not archive_path.exists():
        return
    root = folder.parent.resolve()
    with zipfile.ZipFile(archive_path) as archive:
        for member in archive.infolist():
            target = (root / member.filename).resolve()
            if not target.is_relative_to(folder.resolve()):
                raise OSError(f"{archive_path}: {member.filename!r} is not in {folder.name}/")
            if member.is_dir() or target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with (
                written_whole(target) as partial,  # (renamed once the copy is closed)
                archive.open(member) as source,
                open(partial, "wb") as copy,
            ):
                shutil.copyfileobj(source, copy, 1 << 20)
    archive_path.unlink()


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """An HTTP request's body; None if it is longer than *limit* bytes, or the
    client went away before its end."""
    parts, size = [], 0
    try:
        async for part in read_body(receive):
            size += len(part)
            if size > limit:
                return None
            parts.append(part)
    except ConnectionError:
        return None
    return b"".join(parts)


def _decode_gathered(data: bytes, allow_objects: bool) -> dict[str, DataChunk | None]:
    """What a Worker's ``gather_nodes`` uploaded: node id to chunk (or None);
    pickled records are unpickled if *allow_objects*.

    Raises:
        DecodeError: *data* is not such a map, or a chunk cannot be decoded.
    """
    try:
        gathered = msgpack.unpackb(data, raw=False)
    except Exception as exc:
        raise DecodeError(f"a gather upload is not msgpack: {exc}") from None
    if not isinstance(gathered, dict) or not all(isinstance(k, str) for k in gathered):
        raise DecodeError("a gather upload is not a map of node ids")
    return {
        node_id: None if frames is None else decode_chunk(frames, allow_objects=allow_objects)
        for node_id, frames in gathered.items()
    }


async def _refuse_websocket(send: Send, status: int, body: Any) -> None:
    """Refuse a WebSocket handshake with an HTTP response: *status*, and *body*
    as JSON (the ASGI extension ``websocket.http.response``, which hypercorn has)."""
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
    await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": data})


async def _respond(
    send: Send, status: int, body: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await _respond_bytes(send, json.dumps(body).encode(), b"application/json", status, headers)


async def _respond_bytes(
    send: Send,
    data: bytes,
    content_type: bytes,
    status: int = 200,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", b"%d" % len(data)),
        *(headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
