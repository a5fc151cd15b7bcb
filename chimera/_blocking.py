"""The blocking API of ChimeraPy: :class:`Manager` and :class:`Worker`.

Each object runs its async twin (:class:`~chimera.AsyncManager`,
:class:`~chimera.AsyncWorker`) in a Trio loop on a thread of its own, and each
method waits for the twin's coroutine to finish there. ``shutdown()`` stops
the loop and joins the thread; an object never shut down is shut down when the
interpreter exits.
"""

from __future__ import annotations

import atexit
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

import trio

from ._data import DataChunk
from ._errors import SAID_WHOLE
from ._graph import Graph
from ._manager import AsyncManager, TransportName, WorkerInfo
from ._node import NodeState
from ._worker import AsyncWorker

__all__ = ["Manager", "Worker"]

log = logging.getLogger("chimera.manager")

T = TypeVar("T")

#: Longest wait for a loop thread to finish its shutdown.
JOIN_TIMEOUT = 30.0
#: How long closing waits for the loop to end before it says that it waits.
CLOSE_QUIET = 1.0
#: How long a call waits, without saying so, for a cancelled call's clean-up.
CANCELLED_QUIET = 0.2


def _refuse_in_a_trio_run(blocking: str) -> None:
    """Raises RuntimeError in a Trio run: chimera's *blocking* class (its
    calls wait) would hold up the run's event loop."""
    if trio.lowlevel.in_trio_run():
        raise RuntimeError(
            f"chimera.{blocking} waits for its calls, which would hold up this Trio run "
            f"(an async function): use chimera.Async{blocking} here "
            f"(async with chimera.Async{blocking}(...) as ...)"
        )


def _past_the_hand_over(tb: TracebackType | None) -> TracebackType | None:
    """*tb* past its leading frames of the hand-over of a call to the loop's
    thread (:meth:`_LoopThread.call`'s own, Trio's and outcome's): those say
    nothing to the caller; the call's own frames, in the loop, follow."""
    while tb is not None:
        frame = tb.tb_frame
        module = frame.f_globals.get("__name__", "")
        ours = module == __name__ and frame.f_code.co_name in ("call", "call_sync", "run")
        if not (ours or module.startswith(("trio.", "outcome."))):
            break
        tb = tb.tb_next
    return tb


class _LoopThread(Generic[T]):
    """An async context manager entered in a Trio loop on a thread of its own.

    *hurry* (not async, run in the loop) makes leaving it quick: a Ctrl-C
    while it is being shut down (:meth:`finish`, :meth:`close`) calls it,
    as a second Ctrl-C does to ``chimera worker``.

    Raises (from the constructor) whatever entering it raised.
    """

    def __init__(
        self,
        resource: AbstractAsyncContextManager[T],
        name: str,
        hurry: Callable[[], None] | None = None,
        *,
        shut_down: str,
        logger: logging.Logger = log,
    ) -> None:
        #: What a call says once the loop has ended.
        self._shut_down = shut_down
        #: Where what it says about itself goes (its resource's logger).
        self._log = logger
        self._resource_cm = resource
        self._hurry = hurry
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        #: The call Ctrl-C cancelled last (its name; set once it has ended)
        #: until the next call has waited for it.
        self._cancelled: tuple[str, threading.Event] | None = None
        #: Whether closing said that it waits (once is enough).
        self._said_waiting = False
        self.resource: T | None = None
        #: Set once the loop has ended. (Waited for rather than the thread:
        #: before Python 3.13, a Ctrl-C that interrupts ``Thread.join`` can
        #: leave the thread counted as ended while it runs.)
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        try:
            self._ready.wait()
        except KeyboardInterrupt:  # (Ctrl-C): the loop must not be left running
            self._ready.wait()
            self.close()
            raise
        if self._error is not None:
            self._thread.join()
            raise self._error
        atexit.register(self._close_at_exit)

    @property
    def _alive(self) -> bool:
        return not self._ended.is_set()

    def _run(self) -> None:
        try:
            trio.run(self._main)
        finally:
            self._ended.set()

    async def _main(self) -> None:
        try:
            async with self._resource_cm as resource:
                self.resource = resource
                self._token = trio.lowlevel.current_trio_token()
                self._stop = trio.Event()
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
                return
            raise

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``await fn(*args)`` in the loop; its result.

        A KeyboardInterrupt (Ctrl-C) in the calling thread cancels the call in
        the loop -- it cleans up as on any cancellation -- and is raised at
        once. The next call waits, at most :data:`JOIN_TIMEOUT` seconds,
        until that clean-up is done (a commit cancelled closes the nodes it
        made), so that it starts clean; a Ctrl-C ends the wait.

        Raises:
            RuntimeError: the loop has stopped.
        """
        self._wait_for_cancelled()
        token = self._running_token()
        scope = trio.CancelScope()
        finished = threading.Event()

        async def run() -> Any:
            try:
                with scope:
                    return await fn(*args)
                raise RuntimeError("cancelled: Ctrl-C in the calling thread")  # (not read)
            finally:
                finished.set()

        try:
            return trio.from_thread.run(run, trio_token=token)
        except trio.RunFinishedError:  # (it stopped meanwhile)
            raise RuntimeError(self._shut_down) from None
        except SAID_WHOLE as exc:
            raise exc.with_traceback(None)  # noqa: B904 (itself: its cause and context stay)
        except KeyboardInterrupt as exc:
            self._cancelled = (getattr(fn, "__name__", "call"), finished)
            try:  # (if the call has not started yet, it ends as it starts)
                trio.from_thread.run_sync(scope.cancel, trio_token=token)
            except trio.RunFinishedError:
                pass
            # From here: the frames of the wait for the loop (Trio's) say nothing.
            raise exc.with_traceback(None)  # noqa: B904 (itself)
        except Exception as exc:
            raise exc.with_traceback(_past_the_hand_over(exc.__traceback__))  # noqa: B904

    def _wait_for_cancelled(self) -> None:
        """Wait until the call that Ctrl-C cancelled last has cleaned up."""
        if self._cancelled is None:
            return
        name, finished = self._cancelled
        if not finished.wait(CANCELLED_QUIET) and self._alive:
            self._log.warning(
                "%s: waiting for the %s that Ctrl-C cancelled to clean up (at most %.0f s)",
                self._thread.name,
                name,
                JOIN_TIMEOUT,
            )
            finished.wait(JOIN_TIMEOUT)
        self._cancelled = None

    def call_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` (not async) in the loop's thread; its result.

        Raises:
            RuntimeError: the loop has stopped.
        """
        try:
            return trio.from_thread.run_sync(fn, *args, trio_token=self._running_token())
        except trio.RunFinishedError:  # (it stopped meanwhile)
            raise RuntimeError(self._shut_down) from None
        except SAID_WHOLE as exc:
            raise exc.with_traceback(None)  # noqa: B904 (itself: its cause and context stay)
        except Exception as exc:
            raise exc.with_traceback(_past_the_hand_over(exc.__traceback__))  # noqa: B904

    def read(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, which reads the loop's objects: in the loop's thread while
        it runs (they change there), else here."""
        try:
            return self.call_sync(fn)
        except RuntimeError:
            if self._alive:
                raise
            return fn()

    def _running_token(self) -> trio.lowlevel.TrioToken:
        if self._token is None or not self._alive:
            raise RuntimeError(self._shut_down)
        return self._token

    def finish(self, fn: Callable[[], Any]) -> None:
        """Run ``await fn()`` in the loop unless it has stopped, then :meth:`close` it.

        A Ctrl-C meanwhile hurries the rest (see :class:`_LoopThread`), which
        still ends the loop, and is raised once it has ended. If ``fn`` takes
        more than :data:`CLOSE_QUIET` seconds, the log says that it waits.
        """
        try:
            if self._token is not None and self._alive:
                slow = threading.Timer(CLOSE_QUIET, self._say_waiting)
                slow.daemon = True
                slow.start()
                try:
                    self.call(fn)
                finally:
                    slow.cancel()
        except KeyboardInterrupt:
            self._close(hurried=True)
            raise
        finally:
            self.close()  # (at once if closed above)

    def close(self) -> None:
        """Leave the context manager and end the loop (once; later calls return).

        A Ctrl-C meanwhile hurries it (see :class:`_LoopThread`) and is
        raised once the loop has ended.
        """
        try:
            self._close(hurried=False)
        except KeyboardInterrupt:
            self._close(hurried=True)
            raise

    def _say_waiting(self, more: float | None = None) -> None:
        """Say (once) that shutting down waits for what the loop runs to end,
        for at most *more* seconds if given."""
        self._said_waiting = True
        bound = "" if more is None else f"at most {more:.0f} s more; "
        self._log.warning(
            "%s: shutting down: waiting for what it runs to end (%sCtrl-C stops waiting)",
            self._thread.name,
            bound,
        )

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except KeyboardInterrupt:  # (the loop has ended: the interpreter may too)
            pass

    def _close(self, *, hurried: bool) -> None:
        """End the loop and wait for it; *hurried*, call *hurry* first, if
        there is one, and let no Ctrl-C stop the wait (what is left is quick)."""
        atexit.unregister(self._close_at_exit)
        if not self._alive or self._token is None:
            return
        assert self._stop is not None  # (set with _token)
        hurry = self._hurry if hurried else None
        hurried = hurry is not None
        try:
            if hurry is not None:
                self._log.warning("%s: Ctrl-C, stopping at once", self._thread.name)
                trio.from_thread.run_sync(hurry, trio_token=self._token)
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        except trio.RunFinishedError:
            pass
        started = time.monotonic()
        deadline = started + JOIN_TIMEOUT
        said = hurried or self._said_waiting  # (a hurried close is said above)
        while True:
            try:
                until = deadline if said else min(deadline, started + CLOSE_QUIET)
                if self._ended.wait(max(0.0, until - time.monotonic())):
                    self._thread.join()  # (its loop has ended: at once)
                    return
                if said or time.monotonic() >= deadline:
                    return
                said = True
                self._say_waiting(deadline - time.monotonic())
            except KeyboardInterrupt:
                if not hurried:
                    raise


class Manager:
    """The cluster's coordinator, blocking (ChimeraPy's ``Manager``).

    Same arguments as :class:`~chimera.AsyncManager`; ``port=0`` picks a free
    port. ChimeraPy's settings of its log publisher are taken too:
    ``publisher_port`` is the log PUB socket's port (``logs_port``);
    ``publisher_transport`` and ``publisher_root_topic`` (ZMQ's) are logged
    and ignored.

    Raises:
        RuntimeError: made in a Trio run (an ``async`` function): use
            :class:`~chimera.AsyncManager` there.
        TypeError: an argument neither AsyncManager nor ChimeraPy's Manager takes.
        ValueError: *transport* is none of the known ones.
        OSError: the logdir cannot be written in, or the port (or the log PUB
            socket's) cannot be listened on.
    """

    def __init__(
        self,
        logdir: str | Path,
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
        publisher_port: int | None = None,
        publisher_transport: str | None = None,
        publisher_root_topic: str | None = None,
    ) -> None:
        _refuse_in_a_trio_run("Manager")
        if publisher_port is not None and logs_port == 0:
            logs_port = publisher_port
        ignored = {
            "publisher_transport": publisher_transport,
            "publisher_root_topic": publisher_root_topic,
        }
        for option, value in ignored.items():
            if value is not None:
                log.warning(
                    "Manager(%s=%r): ChimeraPy's ZMQ setting, ignored: logs are published "
                    "on an nng PUB socket over tcp (manager.logs_address), without a topic",
                    option,
                    value,
                )
        manager = AsyncManager(
            logdir,
            port,
            max_num_of_workers,
            publish_logs_via_zmq,
            dashboard_api,
            host=host,
            token=token,
            transport=transport,
            allow_objects=allow_objects,
            logs_port=logs_port,
        )
        self._loop = _LoopThread(
            manager,
            "chimera-manager",
            shut_down="this Manager has been shut down: make a new one to run a graph again "
            "(and collect() before shutdown(): what the nodes saved is collected from a "
            "running Manager)",
        )
        self._manager = manager

    @property
    def host(self) -> str:
        return self._manager.host

    @property
    def port(self) -> int:
        return self._manager.port

    @property
    def logdir(self) -> Path:
        return self._manager.logdir

    @property
    def workers(self) -> dict[str, WorkerInfo]:
        """The Workers connected now, by id."""
        return self._loop.read(lambda: self._manager.workers)

    @property
    def graph(self) -> Graph | None:
        """The graph registered (by :meth:`commit_graph` or :meth:`register_graph`), if any."""
        return self._manager.graph

    @property
    def nodes(self) -> dict[str, str]:
        """The state of every committed node, by node id."""
        return self._loop.read(lambda: dict(self._manager.nodes))

    @property
    def logs_address(self) -> str | None:
        """Where node logs are published (``publish_logs_via_zmq=True``): an nng PUB socket."""
        return self._manager.logs_address

    def commit_graph(
        self,
        graph: Graph,
        mapping: Mapping[str, Sequence[str]],
        send_packages: list[dict[str, Any]] | None = None,
    ) -> bool:
        """See :meth:`chimera.AsyncManager.commit_graph`."""
        return self._loop.call(self._manager.commit_graph, graph, mapping, send_packages)

    def broadcast_request(
        self, htype: str, route: str, data: Any = None, timeout: float = 55
    ) -> bool:
        """See :meth:`chimera.AsyncManager.broadcast_request`."""
        return self._loop.call(self._manager.broadcast_request, htype, route, data, timeout)

    def collect(self, unzip: bool = True) -> bool:
        """See :meth:`chimera.AsyncManager.collect`."""
        return self._loop.call(self._manager.collect, unzip)

    def session_folder(self) -> Path:
        """See :meth:`chimera.AsyncManager.session_folder`."""
        return self._loop.call_sync(self._manager.session_folder)

    def gather(self) -> dict[str, DataChunk | None]:
        """See :meth:`chimera.AsyncManager.gather`."""
        return self._loop.call(self._manager.gather)

    def distribute_packages(self, packages_meta: Sequence[Mapping[str, Any]]) -> bool:
        """See :meth:`chimera.AsyncManager.distribute_packages`."""
        return self._loop.call(self._manager.distribute_packages, packages_meta)

    def register_graph(self, graph: Graph) -> None:
        """See :meth:`chimera.AsyncManager.register_graph`."""
        self._loop.call_sync(self._manager.register_graph, graph)

    def map_graph(self, worker_graph_map: Mapping[str, Sequence[str]]) -> None:
        """See :meth:`chimera.AsyncManager.map_graph`."""
        self._loop.call_sync(self._manager.map_graph, worker_graph_map)

    def create_p2p_network(self) -> bool:
        """See :meth:`chimera.AsyncManager.create_p2p_network`."""
        return self._loop.call(self._manager.create_p2p_network)

    def request_node_creation(self, worker_id: str, node_id: str) -> bool:
        """See :meth:`chimera.AsyncManager.request_node_creation`."""
        return self._loop.call(self._manager.request_node_creation, worker_id, node_id)

    def request_node_server_data(self, worker_id: str) -> bool:
        """See :meth:`chimera.AsyncManager.request_node_server_data`."""
        return self._loop.call_sync(self._manager.request_node_server_data, worker_id)

    def setup_p2p_connections(self) -> bool:
        """See :meth:`chimera.AsyncManager.setup_p2p_connections`."""
        return self._loop.call(self._manager.setup_p2p_connections)

    def request_connection_creation(self, worker_id: str) -> bool:
        """See :meth:`chimera.AsyncManager.request_connection_creation`."""
        return self._loop.call(self._manager.request_connection_creation, worker_id)

    def save_meta(self) -> Path:
        """See :meth:`chimera.AsyncManager.save_meta`."""
        return self._loop.call_sync(self._manager.save_meta)

    def step(self) -> bool:
        """Step every node once (offline mode); see :meth:`AsyncManager.step`."""
        return self._loop.call(self._manager.step)

    def start(self) -> bool:
        """See :meth:`chimera.AsyncManager.start`."""
        return self._loop.call(self._manager.start)

    def preview(self) -> bool:
        """See :meth:`chimera.AsyncManager.preview`."""
        return self._loop.call(self._manager.preview)

    def record(self) -> bool:
        """See :meth:`chimera.AsyncManager.record`."""
        return self._loop.call(self._manager.record)

    def stop(self) -> bool:
        """See :meth:`chimera.AsyncManager.stop`."""
        return self._loop.call(self._manager.stop)

    def shutdown(self) -> None:
        """Close every node, then the Manager itself (its port, its connections)."""
        self._loop.finish(self._manager.shutdown)

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Leaving ``with cp.Manager(...) as manager:`` shuts it down."""
        self.shutdown()


class Worker:
    """Runs nodes on this machine, blocking (ChimeraPy's ``Worker``).

    Same arguments as :class:`~chimera.AsyncWorker` (``token=`` too).

    Raises:
        RuntimeError: made in a Trio run (an ``async`` function): use
            :class:`~chimera.AsyncWorker` there.
        ValueError: *name* cannot name a folder (see :class:`~chimera.AsyncWorker`).
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
        _refuse_in_a_trio_run("Worker")
        worker = AsyncWorker(name, port, delete_temp, id, token=token)
        self._loop = _LoopThread(
            worker,
            f"chimera-worker-{name}",
            hurry=worker.kill_nodes,
            shut_down=f"worker {name!r} has been shut down: make a new one",
            logger=logging.getLogger("chimera.worker"),
        )
        self._worker = worker

    @property
    def id(self) -> str:
        return self._worker.id

    @property
    def name(self) -> str:
        return self._worker.name

    @property
    def port(self) -> int:
        return self._worker.port

    @property
    def ip(self) -> str:
        """This machine's address as others see it (best effort)."""
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"

    @property
    def nodes(self) -> dict[str, NodeState]:
        """The state of each node this Worker runs, by node id."""
        return self._loop.read(lambda: self._worker.nodes)

    def connect(self, host: str, port: int, timeout: float = 10.0) -> bool:
        """See :meth:`chimera.AsyncWorker.connect`."""
        return self._loop.call(self._worker.connect, host, port, timeout)

    def idle(self) -> None:
        """Wait until this Worker is not connected any more: its Manager shut
        down or took it as gone (at once if it is not connected). ChimeraPy's
        ``cp-worker`` runs it between :meth:`connect` and :meth:`shutdown`.

        Raises:
            KeyboardInterrupt: Ctrl-C ended the wait.
        """
        self._loop.call(self._worker.wait_for_disconnect)

    def shutdown(self, msg: dict[str, Any] | None = None) -> None:
        """Close every node, leave the Manager, and end the Worker."""
        self._loop.finish(self._worker.shutdown)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Leaving ``with cp.Worker(...) as worker:`` shuts it down."""
        self.shutdown()
