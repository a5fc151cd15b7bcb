"""Nodes in child processes (the tcp transport): lifecycle, crashes, stopping, leftovers."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import trio
import trio.testing

import chimera as cp
from chimera import _process
from chimera import _protocol as protocol
from chimera._child import ORPHAN_GRACE
from chimera._manager import AsyncManager
from chimera._worker import AsyncWorker
from chimera._worker import _can_listen_on as can_bind

from .nodes import (
    AsyncCounter,
    AsyncSink,
    BlocksItsLoop,
    BlocksItsLoopForever,
    BrokenPrep,
    Camera,
    Counter,
    Doubler,
    EndsOnSigterm,
    ExecsAHelper,
    Interrupted,
    Pairs,
    Raises,
    RaisesInTeardown,
    Recording,
    Sink,
    SlowPrep,
    SlowTeardown,
    StampSink,
    Stubborn,
    WithAHelper,
    WithASpawnedHelper,
)
from .records import on_record


@asynccontextmanager
async def notifications() -> AsyncIterator[tuple[int, trio.MemoryReceiveChannel]]:
    """A loopback port nodes can notify (see nodes.notify), and what they sent."""
    send, receive = trio.open_memory_channel(100)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def accept(stream: trio.SocketStream) -> None:
        async with stream:
            await send.send(await stream.receive_some())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, accept, listeners)
        yield listeners[0].socket.getsockname()[1], receive
        nursery.cancel_scope.cancel()


def counter_to_sink(tmp_path, port: int, count: int, source: type = Counter) -> cp.Graph:
    """counter (1..count, a *source*) -> sink, which writes sink.json at teardown
    and notifies *port*."""
    graph = cp.Graph()
    graph.add_edge(
        source("counter", limit=count),
        Sink("sink", str(tmp_path), source="counter", expect=count, port=port),
    )
    return graph


def addresses_of(manager: AsyncManager) -> dict[str, str | None]:
    """Where each node's outlet listens, by node name, as ``/api/state`` says."""
    return {node["name"]: node["address"] for node in manager.state()["nodes"]}


def alive(pid: int) -> bool:
    """Whether process *pid* exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children_of(pid: int) -> list[int]:
    """The processes whose parent is *pid* (zombies included)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


@asynccontextmanager
async def cluster(
    tmp_path, *names: str, allow_objects: bool = False
) -> AsyncIterator[AsyncManager]:
    """A Manager and Workers (nodes in processes)."""
    async with AsyncManager(
        tmp_path / "logs", port=0, transport="tcp", allow_objects=allow_objects
    ) as manager:
        async with trio.open_nursery() as nursery:
            workers = []
            for name in names:
                worker = AsyncWorker(name)
                await nursery.start(_serve_worker, worker, manager)
                workers.append(worker)
            await manager.wait_for_workers(len(names))
            yield manager
            nursery.cancel_scope.cancel()


async def _serve_worker(worker, manager, task_status=trio.TASK_STATUS_IGNORED):
    async with worker:
        assert await worker.connect(manager.host, manager.port)
        await worker.wait_for_clock()
        task_status.started()
        await trio.sleep_forever()


@pytest.mark.parametrize(
    ("counter_type", "sink_type"),
    [(Counter, Sink), (AsyncCounter, AsyncSink)],
    ids=["def", "async-def"],
)
async def test_a_pipeline_over_two_workers_in_processes_loses_nothing(
    tmp_path, counter_type, sink_type
):
    before = set(children_of(os.getpid()))
    async with notifications() as (port, notified):
        counter = counter_type("counter", limit=200)
        doubler = Doubler("doubler", source="counter")
        sink = sink_type("sink", str(tmp_path), source="doubler", expect=200, port=port)
        graph = cp.Graph()
        graph.add_edges_from([(counter, doubler), (doubler, sink)])
        with trio.fail_after(60):
            async with cluster(tmp_path, "local", "remote") as manager:
                mapping = {"local": ["counter", "doubler"], "remote": ["sink"]}
                assert await manager.commit_graph(graph, mapping)
                # A link within a Worker is a Unix socket; between Workers, TCP.
                addresses = addresses_of(manager)
                assert addresses["counter"].startswith("unix://")
                assert addresses["doubler"].startswith("tcp://127.0.0.1:")
                assert addresses["sink"] is None
                pid = int((tmp_path / "sink.pid").read_text())
                assert pid != os.getpid() and alive(pid)
                assert await manager.start()
                assert await notified.receive() == b"x"
                assert await manager.stop()
                assert set(manager.nodes.values()) == {"STOPPED"}
                # Each node's last statistics arrive with stop(), not up to a second later.
                steps = {node["name"]: node["steps"] for node in manager.state()["nodes"]}
                assert steps["doubler"] == steps["sink"] == 200
                await manager.shutdown()
    assert json.loads((tmp_path / "sink.json").read_text()) == [2 * i for i in range(1, 201)]
    assert not alive(pid)
    assert set(children_of(os.getpid())) <= before


async def test_gather_brings_each_nodes_last_chunk_from_its_process(tmp_path):
    async with notifications() as (port, notified):
        graph = counter_to_sink(tmp_path, port, 50)
        doubler = Doubler("doubler", source="counter")
        graph.add_edge(graph.G.nodes[graph.get_id_by_name("counter")]["object"], doubler)
        with trio.fail_after(60):
            async with cluster(tmp_path, "local", "remote") as manager:
                mapping = {"local": ["counter", "sink"], "remote": ["doubler"]}
                assert await manager.commit_graph(graph, mapping)
                assert await manager.gather() == dict.fromkeys(graph.G.nodes)  # nothing yet
                assert await manager.start()
                assert await notified.receive() == b"x"
                await manager.stop()  # every chunk stepped: the last ones are known
                gathered = await manager.gather()
    assert gathered[graph.get_id_by_name("counter")].get("default")["value"] == 50
    assert gathered[doubler.id].get("default")["value"] == 100
    assert gathered[graph.get_id_by_name("sink")] is None


async def test_gathers_at_once_and_during_a_commit_all_return(tmp_path):
    # As from two threads of a blocking Manager: a monitor gathering while the
    # script commits, then gathers at once.
    async with notifications() as (port, notified):
        graph = counter_to_sink(tmp_path, port, 50)
        with trio.fail_after(60):
            async with cluster(tmp_path, "local") as manager:
                gathered = []

                async def gather_during_commit(done: trio.Event) -> None:
                    while not done.is_set():
                        gathered.append(await manager.gather())

                committed = trio.Event()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(gather_during_commit, committed)
                    assert await manager.commit_graph(graph, {"local": ["counter", "sink"]})
                    committed.set()
                assert gathered and all(g == {} or set(g.values()) == {None} for g in gathered)
                assert await manager.start()
                assert await notified.receive() == b"x"
                await manager.stop()
                at_once: list[dict] = []

                async def gather() -> None:
                    at_once.append(await manager.gather())

                async with trio.open_nursery() as nursery:
                    for _ in range(8):
                        nursery.start_soon(gather)
    counter = graph.get_id_by_name("counter")
    assert [g[counter].get("default")["value"] for g in at_once] == [50] * 8


async def test_a_stranger_cannot_link_to_a_node(tmp_path):
    # Whoever reaches a node's port (listed in /api/state) could read its stream,
    # or link and never read, holding the node up: only the graph's nodes link.
    import transports

    async with notifications() as (port, notified):
        graph = counter_to_sink(tmp_path, port, 50)
        with trio.fail_after(60):
            async with cluster(tmp_path, "local") as manager:
                await manager.commit_graph(graph, {"local": ["counter", "sink"]})
                with pytest.raises(trio.BrokenResourceError, match="refused this inlet"):
                    await transports.connect(addresses_of(manager)["counter"], capacity=1)
                await manager.start()
                assert await notified.receive() == b"x"
                await manager.stop()
                await manager.shutdown()
    assert json.loads((tmp_path / "sink.json").read_text()) == list(range(1, 51))


async def test_a_killed_node_fails_and_the_others_go_on(tmp_path):
    async with notifications() as (port, notified):
        counter = Counter("counter", limit=10)
        first = Sink("first", str(tmp_path), source="counter", expect=10, port=port)
        second = Sink("second", str(tmp_path), source="counter", expect=10, port=port)
        graph = cp.Graph()
        graph.add_edges_from([(counter, first), (counter, second)])
        with trio.fail_after(60):
            async with cluster(tmp_path, "local") as manager:
                await manager.commit_graph(graph, {"local": ["counter", "first", "second"]})
                await manager.start()
                assert [await notified.receive() for _ in range(2)] == [b"x", b"x"]
                first_pid = int((tmp_path / "first.pid").read_text())
                # (what top and ps -o comm show: Linux keeps 15 bytes)
                assert Path(f"/proc/{first_pid}/comm").read_text() == "chimera:first\n"
                os.kill(first_pid, signal.SIGKILL)
                assert await manager.wait_for_node_state("first", "FAILED") == "FAILED"
                assert await manager.stop()
                gathered = await manager.gather()  # still works, without the dead node
                assert gathered[first.id] is None
                assert gathered[counter.id].get("default")["value"] == 10
                await manager.shutdown()
    assert json.loads((tmp_path / "second.json").read_text()) == list(range(1, 11))
    assert not (tmp_path / "first.json").exists()  # killed: no teardown


@asynccontextmanager
async def running_a_helped_node(tmp_path, node_type: type) -> AsyncIterator[AsyncManager]:
    """A cluster of one Worker where a counter feeds a *node_type* node,
    ``helped``, once that node has started its helper process."""
    async with notifications() as (port, notified):
        helped = node_type("helped", str(tmp_path), source="counter", expect=5, port=port)
        graph = cp.Graph()
        graph.add_edge(Counter("counter", limit=5), helped)
        async with cluster(tmp_path, "local") as manager:
            await manager.commit_graph(graph, {"local": ["counter", "helped"]})
            await manager.start()
            assert await notified.receive() == b"x"
            yield manager


@pytest.mark.parametrize("kill", [True, False], ids=["killed", "closed"])
async def test_a_node_whose_helper_process_holds_its_pipes_still_ends(tmp_path, kill):
    # Its helper, forked, holds the node's pipes: the node's end is still seen,
    # the helper killed with it, and the node below ends as its input does.
    before = set(children_of(os.getpid()))
    with trio.fail_after(60):
        async with running_a_helped_node(tmp_path, WithAHelper) as manager:
            helper = int((tmp_path / "helped.helper").read_text())
            if kill:
                os.kill(int((tmp_path / "helped.pid").read_text()), signal.SIGKILL)
                assert await manager.wait_for_node_state("helped", "FAILED") == "FAILED"
            assert await manager.stop()
            await manager.shutdown()
    assert not alive(helper)
    assert set(children_of(os.getpid())) <= before


async def test_a_killed_nodes_helper_process_that_holds_none_of_its_pipes_ends_with_it(tmp_path):
    # Started by "spawn" (or "forkserver"), not forked: it is killed as the node's
    # process exits, not left running until the cluster shuts down.
    with trio.fail_after(60):
        async with running_a_helped_node(tmp_path, WithASpawnedHelper) as manager:
            helper = os.pidfd_open(int((tmp_path / "helped.helper").read_text()))
            try:
                os.kill(int((tmp_path / "helped.pid").read_text()), signal.SIGKILL)
                assert await manager.wait_for_node_state("helped", "FAILED") == "FAILED"
                with trio.fail_after(20):
                    await trio.lowlevel.wait_readable(helper)  # it ended
            finally:
                os.close(helper)
            assert await manager.stop()
            await manager.shutdown()


async def test_a_program_a_node_starts_does_not_hold_its_events_pipe(tmp_path, caplog):
    graph = cp.Graph()
    graph.add_node(ExecsAHelper("helped", limit=0))
    with trio.fail_after(60):
        async with cluster(tmp_path, "local") as manager:
            await manager.commit_graph(graph, {"local": ["helped"]})
            await manager.start()
            assert await manager.stop()
            await manager.shutdown()
    assert [m for m in caplog.messages if "hold its pipes" in m] == []


async def test_a_node_process_that_dies_after_its_node_stopped_leaves_it_stopped(tmp_path):
    # Killed idle, between stop() and shutdown() (the OOM killer, say): its
    # run had ended, its teardown ran, its files were closed.
    said = _Said("after it had ended")
    logging.getLogger("chimera.worker").addHandler(said)
    try:
        async with notifications() as (port, notified):
            graph = counter_to_sink(tmp_path, port, 5)
            with trio.fail_after(60):
                async with cluster(tmp_path, "local") as manager:
                    await manager.commit_graph(graph, {"local": ["counter", "sink"]})
                    await manager.start()
                    assert await notified.receive() == b"x"
                    assert await manager.stop()
                    os.kill(int((tmp_path / "sink.pid").read_text()), signal.SIGKILL)
                    await said.said.wait()
                    states = {node["name"]: node["state"] for node in manager.state()["nodes"]}
                    assert await manager.collect()
                    await manager.shutdown()
    finally:
        logging.getLogger("chimera.worker").removeHandler(said)
    assert states == {"counter": "STOPPED", "sink": "STOPPED"}
    assert said.message == (
        "node 'sink': its process was killed by SIGKILL after it had ended (STOPPED): it stays so"
    )
    assert json.loads((tmp_path / "sink.json").read_text()) == [1, 2, 3, 4, 5]


async def test_stop_returns_after_a_node_failed_under_a_source_that_runs_on(tmp_path):
    # The sink fails at its first chunk; the source's 9th does not fit in
    # the link (8 messages), so the source waits to send it when asked to stop.
    async with notifications() as (port, notified):
        graph = cp.Graph()
        camera, sink = Camera("camera", port, made=9), Raises("sink")
        graph.add_edge(camera, sink)
        with trio.fail_after(60):
            async with cluster(tmp_path, "local") as manager:
                await manager.commit_graph(graph, {"local": ["camera", "sink"]})
                await manager.start()
                assert await manager.wait_for_node_state("sink", "FAILED") == "FAILED"
                assert await notified.receive() == b"x"
                with trio.fail_after(10):
                    assert await manager.stop()
                assert manager.nodes == {camera.id: "STOPPED", sink.id: "FAILED"}
                await manager.shutdown()


@pytest.mark.parametrize(
    ("how", "said"),
    [
        ("step", "node 'sink' failed: step raised KeyError("),
        ("teardown", "node 'sink' failed: teardown raised OSError('the device is gone')"),
        ("killed", "node 'sink' failed: its process was killed by SIGKILL"),
        # (a BaseException out of an async def step ends the process: its crash)
        ("crashed", "node 'sink' failed: crashed: KeyboardInterrupt()"),
    ],
)
async def test_a_nodes_failure_is_said_once_as_its_own_record(tmp_path, caplog, capfd, how, said):
    # Not again by its Worker, its process or the Manager; into the Manager's nodes.log.
    async with notifications() as (port, notified):
        if how in ("step", "crashed"):
            sink = {"step": Raises, "crashed": Interrupted}[how]("sink")
        else:
            kind = {"teardown": RaisesInTeardown, "killed": Sink}[how]
            sink = kind("sink", str(tmp_path), "camera", 3, port)
        graph = cp.Graph()
        graph.add_edge(Camera("camera", port, made=3), sink)
        with trio.fail_after(60):
            async with cluster(tmp_path, "local") as manager:
                await manager.commit_graph(graph, {"local": ["camera", "sink"]})
                await manager.start()
                if how == "killed":
                    assert await notified.receive() == b"x"  # (from each node)
                    assert await notified.receive() == b"x"
                    os.kill(int((tmp_path / "sink.pid").read_text()), signal.SIGKILL)
                if how != "teardown":
                    assert await manager.wait_for_node_state("sink", "FAILED") == "FAILED"
                assert await manager.stop()
                assert manager.nodes[sink.id] == "FAILED"
                await manager.shutdown()
    # (Not counted: the camera's outlet may say that its link to the sink
    # broke, if the sink left chunks unread as it died.)
    failures = [
        r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("chimera")
    ]
    assert [(r.name, r.getMessage().startswith(said)) for r in failures] == [
        ("chimera.node.sink", True)
    ]
    if how != "killed":  # (its traceback, from the node's own code on)
        traceback_text = failures[0].getMessage().partition("\n")[2]
        assert traceback_text.startswith("Traceback (most recent call last):\n")
        first_frame = traceback_text.splitlines()[1]
        assert first_frame.startswith(f'  File "{inspect.getsourcefile(type(sink))}"')
    assert f"ERROR local/sink: {said}" in (tmp_path / "logs" / "nodes.log").read_text()
    assert "Traceback" not in capfd.readouterr().err  # (the node's process printed none)


@pytest.mark.parametrize("how", ["raised", "sigint"])
async def test_a_node_process_ended_by_keyboardinterrupt_is_failed_not_shut_down(tmp_path, how):
    # Raised by its step, or by a SIGINT to its process (its zygote ignores
    # SIGINT: the node's process must not inherit that).
    async with notifications() as (port, notified):
        if how == "raised":
            graph = cp.Graph()
            graph.add_edge(Counter("counter", limit=3), Interrupted("sink"))
        else:
            graph = counter_to_sink(tmp_path, port, 3)
        with trio.fail_after(60):
            async with cluster(tmp_path, "local") as manager:
                await manager.commit_graph(graph, {"local": ["counter", "sink"]})
                await manager.start()
                if how == "sigint":
                    assert await notified.receive() == b"x"
                    os.kill(int((tmp_path / "sink.pid").read_text()), signal.SIGINT)
                assert await manager.wait_for_node_state("sink", "FAILED", "SHUTDOWN") == "FAILED"
                (sink,) = [n for n in manager.state()["nodes"] if n["name"] == "sink"]
                assert "KeyboardInterrupt" in sink["reason"]
                assert await manager.stop()
                await manager.shutdown()


async def test_a_prep_that_raises_in_its_process_is_a_node_error(tmp_path):
    graph = cp.Graph()
    graph.add_edge(BrokenPrep("camera"), cp.Node("fine"))
    with trio.fail_after(60):
        async with cluster(tmp_path, "local") as manager:
            with pytest.raises(cp.NodeError) as caught:
                await manager.commit_graph(graph, {"local": ["camera", "fine"]})
    assert caught.value.node_name == "camera"
    assert "no such camera" in str(caught.value)
    assert "OSError: no such camera" in caught.value.traceback
    # Unhandled, it prints the node's own traceback above itself.
    printed = "".join(traceback.format_exception(caught.value))
    assert printed.index("OSError: no such camera") < printed.index(
        "chimera.NodeError: node 'camera'"
    )
    # The node's traceback begins in the user's code; the error, raised at the
    # user's call, went through no frame of chimera's but the one raising it.
    frames = re.findall(r'File "([^"]+)", line \d+, in (\w+)', caught.value.traceback)
    assert frames == [(str(Path(__file__).with_name("nodes.py")), "prep")]
    package = str(Path(cp.__file__).parent) + os.sep
    ours = [f for f in traceback.extract_tb(caught.value.__traceback__) if package in f.filename]
    assert [(Path(f.filename).name, f.name) for f in ours] == [("_manager.py", "in_turn")]


async def commit_error(tmp_path, node: cp.Node) -> cp.NodeError:
    """The error ``commit_graph`` raises for a graph of *node* alone on one Worker."""
    graph = cp.Graph()
    graph.add_node(node)
    with trio.fail_after(60):
        async with cluster(tmp_path, "local") as manager:
            with pytest.raises(cp.NodeError) as caught:
                await manager.commit_graph(graph, {"local": [node.name]})
    return caught.value


async def test_a_node_whose_module_its_process_cannot_import_is_a_node_error(
    tmp_path, monkeypatch, caplog
):
    # A node class from a module that this process imported from a folder the
    # node's process does not search (as if the module were on another machine).
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "only_here.py").write_text("import chimera\nclass Camera(chimera.Node): pass\n")
    monkeypatch.syspath_prepend(str(folder))
    module = importlib.import_module("only_here")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(folder)])
    monkeypatch.setitem(sys.modules, "only_here", module)
    error = await commit_error(tmp_path, module.Camera("ghost"))
    assert error.node_name == "ghost"
    reason = (
        "the node cannot be made: ModuleNotFoundError(\"No module named 'only_here'\") "
        "(install 'only_here' where the node runs, or ship it: commit_graph(..., "
        "send_packages=[{'name': 'only_here', 'path': ...}]))"
    )
    assert str(error) == f"node 'ghost': {reason}"
    # Raised, it is not said again on the console (nor how its process exited).
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert said == []


async def test_a_node_shipped_by_value_names_its_file_and_line_in_the_traceback(
    tmp_path, monkeypatch
):
    # As a class defined in the user's script is shipped: by value (cloudpickle).
    script = tmp_path / "my_script.py"
    script.write_text(
        "import chimera\n"
        "def open_camera(index):\n"
        "    raise OSError(f'no camera {index}')\n"
        "class Camera(chimera.Node):\n"
        "    def prep(self):\n"
        "        self.device = open_camera(3)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("my_script")
    monkeypatch.setitem(sys.modules, "my_script", module)
    cloudpickle.register_pickle_by_value(module)
    try:
        error = await commit_error(tmp_path, module.Camera("camera"))
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    assert f'File "{script}", line 6, in prep\n    self.device = open_camera(3)' in error.traceback
    assert f'File "{script}", line 3, in open_camera' in error.traceback


class _Said(logging.Handler):
    """Sets :attr:`said` once a record says *text*; keeps what it said."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text, self.said, self.message = text, trio.Event(), ""

    def emit(self, record: logging.LogRecord) -> None:  # (in the Worker's Trio thread)
        if self.text in record.getMessage():
            self.message = record.getMessage()
            self.said.set()


async def test_a_slow_close_says_what_it_waits_for_and_killing_the_nodes_ends_it(
    tmp_path, monkeypatch, caplog
):
    from chimera import _worker

    monkeypatch.setattr(_worker, "CLOSE_PATIENCE", 0.2)
    caplog.set_level(logging.INFO, logger="chimera.worker")
    said = _Said("still closing")
    logging.getLogger("chimera.worker").addHandler(said)
    graph = cp.Graph()
    graph.add_node(Stubborn("stubborn"))  # its teardown never ends; it ignores SIGTERM
    try:
        with trio.fail_after(60):
            async with AsyncManager(tmp_path / "logs", port=0) as manager:
                async with AsyncWorker("local") as worker:
                    assert await worker.connect(manager.host, manager.port)
                    await manager.commit_graph(graph, {"local": ["stubborn"]})
                    await manager.start()
                    with trio.fail_after(5):  # not EXIT_GRACE + TERM_GRACE (14 s)
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(manager.shutdown)
                            await said.said.wait()
                            worker.kill_nodes()
                    (node,) = manager.state()["nodes"]
                    assert (node["state"], node["reason"]) == (
                        "FAILED",
                        "its process was killed by SIGKILL",
                    )
    finally:
        logging.getLogger("chimera.worker").removeHandler(said)
    assert said.message == (
        "worker 'local': still closing 'stubborn' after 0.2 s (a teardown gets 10 s, then the "
        "node's process is ended)"
    )


async def test_a_node_that_ignores_close_and_sigterm_is_killed(tmp_path, monkeypatch):
    monkeypatch.setattr(_process, "EXIT_GRACE", 0.5)
    monkeypatch.setattr(_process, "TERM_GRACE", 0.5)
    before = set(children_of(os.getpid()))
    graph = cp.Graph()
    graph.add_node(Stubborn("stubborn"))
    with trio.fail_after(60):
        async with cluster(tmp_path, "local") as manager:
            await manager.commit_graph(graph, {"local": ["stubborn"]})
            await manager.start()
            with trio.fail_after(10):
                await manager.shutdown()
    assert set(children_of(os.getpid())) <= before


async def test_a_node_whose_teardown_does_not_end_gets_sigterm_before_sigkill(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(_process, "EXIT_GRACE", 0.5)
    graph = cp.Graph()
    graph.add_node(EndsOnSigterm("stuck", str(tmp_path)))
    with trio.fail_after(60):
        async with cluster(tmp_path, "local") as manager:
            await manager.commit_graph(graph, {"local": ["stuck"]})
            await manager.start()
            await manager.shutdown()
    assert (tmp_path / "stuck.term").read_text() == "cleaned up"


@asynccontextmanager
async def cli_worker(
    manager: cp.AsyncManager, name: str, *options: str, **process: Any
) -> AsyncIterator[trio.Process]:
    """``chimera worker --name NAME OPTIONS`` for *manager*, once checked in;
    killed at the end if it still runs (its temporary folder then stays: stop
    it in the block). *process*: ``open_process``'s options."""
    command = [sys.executable, "-m", "chimera", "worker", "--name", name, *options]
    worker = await trio.lowlevel.open_process(
        [*command, "--manager", f"127.0.0.1:{manager.port}"], **process
    )
    try:
        await manager.wait_for_workers(1)
        yield worker
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()


def killed_worker_env(tmp_path) -> dict[str, str]:
    """The environment of a Worker that is killed: it leaves its temporary
    folder, which is then in *tmp_path*."""
    return {**os.environ, "TMPDIR": str(tmp_path)}


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd_open (Linux)")
async def test_nodes_end_when_their_worker_process_dies(tmp_path):
    # With the processes they started: the sink's helper process too.
    async with notifications() as (port, notified):
        graph = cp.Graph()
        graph.add_edge(
            Counter("counter", limit=5),
            WithAHelper("sink", str(tmp_path), source="counter", expect=5, port=port),
        )
        with trio.fail_after(60):
            async with (
                AsyncManager(tmp_path / "logs", port=0) as manager,
                cli_worker(manager, "doomed", env=killed_worker_env(tmp_path)) as worker,
            ):
                await manager.commit_graph(graph, {"doomed": ["counter", "sink"]})
                await manager.start()
                assert await notified.receive() == b"x"
                node = os.pidfd_open(int((tmp_path / "sink.pid").read_text()))
                helper = os.pidfd_open(int((tmp_path / "sink.helper").read_text()))
                worker.kill()
                await trio.lowlevel.wait_readable(node)  # the node's process exited
                await trio.lowlevel.wait_readable(helper)  # and its helper
                os.close(node)
                os.close(helper)
    # Its teardown ran before it exited.
    assert json.loads((tmp_path / "sink.json").read_text()) == [1, 2, 3, 4, 5]


@pytest.mark.slow  # (~20 s: the grace a node whose Worker died gets to end by itself)
@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd_open (Linux)")
async def test_a_node_whose_worker_died_and_whose_loop_never_comes_back_is_ended(tmp_path):
    async with notifications() as (port, notified):
        graph = cp.Graph()
        graph.add_node(BlocksItsLoopForever("stuck", str(tmp_path), port))
        with trio.fail_after(ORPHAN_GRACE + 40):
            async with (
                AsyncManager(tmp_path / "logs", port=0) as manager,
                cli_worker(manager, "doomed", env=killed_worker_env(tmp_path)) as worker,
            ):
                await manager.commit_graph(graph, {"doomed": ["stuck"]})
                await manager.start()
                node = os.pidfd_open(int((tmp_path / "stuck.pid").read_text()))
                try:
                    assert await notified.receive() == b"x"  # its loop is stuck from now
                    worker.kill()
                    await trio.lowlevel.wait_readable(node)  # the node's process was ended
                finally:
                    with suppress(ProcessLookupError):  # (if it was not)
                        signal.pidfd_send_signal(node, signal.SIGKILL)
                    os.close(node)


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd_open (Linux)")
async def test_the_zygote_of_a_worker_that_died_without_nodes_ends_too(tmp_path):
    graph = cp.Graph()
    graph.add_node(BrokenPrep("camera"))
    with trio.fail_after(60):
        async with (
            AsyncManager(tmp_path / "logs", port=0) as manager,
            cli_worker(
                manager, "doomed", env=killed_worker_env(tmp_path), stderr=subprocess.DEVNULL
            ) as worker,
        ):
            with pytest.raises(cp.NodeError):  # (its node made, then closed: none left)
                await manager.commit_graph(graph, {"doomed": ["camera"]})
            (zygote,) = [os.pidfd_open(pid) for pid in children_of(worker.pid)]
            worker.kill()
            await trio.lowlevel.wait_readable(zygote)  # it exited
            os.close(zygote)


def descendants_of(pid: int) -> list[int]:
    """The processes under *pid*: its children, theirs, and so on."""
    found = []
    for child in children_of(pid):
        found += [child, *descendants_of(child)]
    return found


async def test_stop_returns_when_a_worker_froze_with_its_nodes(tmp_path, monkeypatch):
    # As a laptop gone to sleep mid-session: its Worker and nodes answer no
    # more, and their connections stay open. A source sending to a node there,
    # and a node fed by one, would wait for them for ever, and stop() with them.
    monkeypatch.setattr(protocol, "SILENCE_TIMEOUT", 3.0)  # (the Manager's: this process)
    async with notifications() as (port, notified):
        counter = Counter("counter", limit=10**9)
        far_sink = Sink("far_sink", str(tmp_path), source="counter", expect=20, port=port)
        camera = Camera("camera", port, made=10**9)
        near_sink = Sink("near_sink", str(tmp_path), source="camera", expect=5, port=port)
        graph = cp.Graph()
        graph.add_edges_from([(counter, far_sink), (camera, near_sink)])
        mapping = {"awake": ["counter", "near_sink"], "asleep": ["far_sink", "camera"]}
        with trio.fail_after(60):
            async with (
                AsyncManager(tmp_path / "logs", port=0, transport="tcp") as manager,
                AsyncWorker("awake") as awake,
            ):
                assert await awake.connect(manager.host, manager.port)
                command = [sys.executable, "-m", "chimera", "worker", "--name", "asleep"]
                command += ["--manager", f"{manager.host}:{manager.port}"]
                env = {**os.environ, "TMPDIR": str(tmp_path)}  # (frozen, then killed)
                worker = await trio.lowlevel.open_process(command, env=env)
                frozen = [worker.pid]
                try:
                    await manager.wait_for_workers(2)
                    await manager.commit_graph(graph, mapping)
                    await manager.start()
                    assert [await notified.receive() for _ in range(2)] == [b"x", b"x"]
                    frozen += descendants_of(worker.pid)
                    for pid in frozen:
                        os.kill(pid, signal.SIGSTOP)
                    assert await manager.stop()
                    states = {node["name"]: node["state"] for node in manager.state()["nodes"]}
                    await manager.shutdown()
                finally:
                    for pid in frozen:
                        os.kill(pid, signal.SIGKILL)
                    await worker.wait()
    assert states == {
        "counter": "STOPPED",
        "near_sink": "STOPPED",
        "far_sink": "FAILED",
        "camera": "FAILED",
    }
    # What the frozen camera sent before is there, in order (its last, not
    # yet taken in, may be lost): at least the 5 stepped before it froze.
    seen = json.loads((tmp_path / "near_sink.json").read_text())
    assert len(seen) >= 5 and seen == list(range(1, len(seen) + 1))


ZYGOTE_KILLED = "its Worker's process starter died (killed by SIGKILL)"


def no_graces_to_wait_out(monkeypatch) -> None:
    """Make each grace a node's process has to exit longer than the 10 s these
    tests give what follows a zygote's death: waiting one out fails them."""
    for grace in ("EXIT_GRACE", "TERM_GRACE", "KILL_GRACE"):
        monkeypatch.setattr(_process, grace, 20.0)


@asynccontextmanager
async def one_worker(tmp_path) -> AsyncIterator[tuple[AsyncManager, AsyncWorker]]:
    """A Manager (nodes in processes) and one Worker, 'local', connected to it."""
    async with (
        AsyncManager(tmp_path / "logs", port=0, transport="tcp") as manager,
        AsyncWorker("local") as worker,
    ):
        assert await worker.connect(manager.host, manager.port)
        await manager.wait_for_workers(1)
        yield manager, worker


async def test_a_worker_tells_each_state_of_a_node_in_a_process_once(tmp_path, caplog):
    # Its runtime and its process both say SHUTDOWN at the end: said once.
    caplog.set_level(logging.DEBUG, logger="chimera.worker")
    async with notifications() as (port, notified):
        with trio.fail_after(60):
            async with one_worker(tmp_path) as (manager, _):
                graph = counter_to_sink(tmp_path, port, 5)
                await manager.commit_graph(graph, {"local": ["counter", "sink"]})
                await manager.start()
                assert await notified.receive() == b"x"
                await manager.stop()
                await manager.shutdown()
    told = [
        r.getMessage().removeprefix("worker 'local': node 'sink' is ")
        for r in caplog.records
        if r.getMessage().startswith("worker 'local': node 'sink' is ")
    ]
    assert told == ["INITIALIZED", "CONNECTED", "READY", "RUNNING", "STOPPED", "SHUTDOWN"]


async def test_a_worker_keeps_nothing_of_the_nodes_it_shut_down(tmp_path):
    # A lab script commits graph after graph for hours: the Worker must not grow.
    import gc
    import weakref

    async with notifications() as (port, notified):
        with trio.fail_after(60):
            async with one_worker(tmp_path) as (manager, worker):
                for _ in range(2):
                    graph = counter_to_sink(tmp_path, port, 5)
                    await manager.commit_graph(graph, {"local": ["counter", "sink"]})
                    nodes = [weakref.ref(runtime) for runtime in worker._runtimes.values()]
                    await manager.start()
                    assert await notified.receive() == b"x"
                    await manager.stop()
                    await manager.shutdown()
                    gc.collect()
                    assert [node() for node in nodes] == [None, None]


async def test_a_node_process_start_cancelled_once_asked_still_gets_its_own_pid():
    # Cancelled once the zygote has the request: the start completes (an answer
    # left unread would be the next start's, and that node would be given the
    # pid of another process).
    def holds(pid: int, fd: int) -> bool:
        """Whether process *pid* holds the pipe of *fd* (as its stdin, or about to)."""
        pipe = f"pipe:[{os.fstat(fd).st_ino}]"
        for n in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{n}") == pipe:
                    return True
            except (
                FileNotFoundError
            ):  # (closed meanwhile: the new process closes what it inherited)
                pass
        return False

    zygote = _process.Zygote("test")
    pipes = [os.pipe() for _ in range(4)]  # (two node processes: stdin, events)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(zygote.run)
                send_all = zygote._stream.send_all
                with trio.CancelScope() as scope:

                    async def send_all_then_cancel(data):
                        await send_all(data)
                        scope.cancel()

                    zygote._stream.send_all = send_all_then_cancel
                    first = await zygote.start(pipes[0][0], pipes[1][1])
                zygote._stream.send_all = send_all
                second = await zygote.start(pipes[2][0], pipes[3][1])
                # (each process waits for its node on its stdin: still there)
                assert holds(first, pipes[0][0]) and not holds(first, pipes[2][0])
                assert holds(second, pipes[2][0]) and not holds(second, pipes[0][0])
                nursery.cancel_scope.cancel()
    finally:
        for fd in (fd for pipe in pipes for fd in pipe):
            os.close(fd)


#: A Manager's script: it listens at argv[1]'s port (and says so), commits a
#: graph to the Worker 'w', starts it, and dies. Its source's teardown writes argv[2].
DIES_AFTER_ITS_COMMIT = """
import os, sys, time, trio
import chimera as cp

class Source(cp.Node):
    def __init__(self, name, path):
        super().__init__(name)
        self.path = path

    def step(self):
        time.sleep(0.01)
        return 1

    def teardown(self):
        with open(self.path, "w") as file:
            file.write("torn down")

async def main():
    async with cp.AsyncManager(sys.argv[3], port=int(sys.argv[1])) as manager:
        print("listening", flush=True)
        await manager.wait_for_workers(1)
        graph = cp.Graph()
        graph.add_node(Source("source", sys.argv[2]))
        await manager.commit_graph(graph, {"w": ["source"]})
        await manager.start()
        os._exit(0)

trio.run(main)
"""


async def test_a_worker_closes_the_nodes_of_a_manager_that_died(tmp_path):
    # Nobody is left to stop them: they would run for ever (and the next
    # Manager's commit would take them in).
    with trio.socket.socket() as probe:  # (a free port for the Manager)
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torn_down = tmp_path / "torn-down"
    script = [DIES_AFTER_ITS_COMMIT, str(port), str(torn_down), str(tmp_path / "logs")]
    with trio.fail_after(60):
        async with AsyncWorker("w") as worker:
            manager = await trio.lowlevel.open_process(
                [sys.executable, "-c", *script], stdout=subprocess.PIPE
            )
            try:
                said = b""
                while b"listening" not in said:
                    said += await manager.stdout.receive_some()
                assert await worker.connect("127.0.0.1", port)
                await worker.wait_for_disconnect()  # (its nodes closed)
                assert await manager.wait() == 0
            finally:
                if manager.returncode is None:
                    manager.kill()
                    await manager.wait()
            assert worker.nodes == {}
            assert torn_down.read_text() == "torn down"
            assert children_of(os.getpid()) == [worker._zygote.pid]


async def test_a_zygote_killed_while_nodes_run_fails_them_and_the_worker_goes_on(
    tmp_path, monkeypatch
):
    from .test_recording import read_streams, saved_count  # (it imports this module)

    no_graces_to_wait_out(monkeypatch)
    before = set(children_of(os.getpid()))
    async with notifications() as (port, notified), notifications() as (saving, saved):
        graph = counter_to_sink(tmp_path, port, 5)
        recorder = Recording("recorder", saving)
        graph.add_node(recorder)
        with trio.fail_after(60):
            async with one_worker(tmp_path) as (manager, worker):
                await manager.commit_graph(graph, {"local": ["counter", "sink", "recorder"]})
                await manager.start()
                assert await notified.receive() == b"x"
                await saved_count(saved, 10)
                nodes = [runtime.pid for runtime in worker._runtimes.values()]
                zygote = worker._zygote
                os.kill(zygote.pid, signal.SIGKILL)
                with trio.fail_after(10):
                    for name in ("counter", "sink", "recorder"):
                        await manager.wait_for_node_state(name, "FAILED")
                    reasons = {node["reason"] for node in manager.state()["nodes"]}
                    assert reasons == {ZYGOTE_KILLED}
                    assert await manager.stop()
                    assert await manager.collect()
                    assert set(manager.nodes.values()) == {"FAILED"}
                    await manager.shutdown()
                assert worker.connected and len(manager.workers) == 1
                assert not any(alive(pid) for pid in nodes)
                # Each node was closed: the sink's teardown ran, the recorder's files are whole.
                assert json.loads((tmp_path / "sink.json").read_text()) == [1, 2, 3, 4, 5]
                counts = read_streams(manager.session_folder() / "local" / "recorder")
                assert len(set(counts.values())) == 1 and counts["json"] >= 10, counts
                # A new commit starts a new zygote.
                graph = counter_to_sink(tmp_path, port, 3)
                await manager.commit_graph(graph, {"local": ["counter", "sink"]})
                assert worker._zygote is not zygote and worker._zygote.running
                await manager.start()
                assert await notified.receive() == b"x"
                assert await manager.stop()
                # (manager.nodes keeps the last graph's nodes too)
                assert {node["state"] for node in manager.state()["nodes"]} == {"STOPPED"}
                await manager.shutdown()
    assert json.loads((tmp_path / "sink.json").read_text()) == [1, 2, 3]
    assert set(children_of(os.getpid())) <= before


async def run_counter_to_sink(manager, tmp_path, port, notified) -> None:
    """Commit and run counter -> sink (3 chunks) on Worker 'local', then shut it down;
    check what the sink saw."""
    graph = counter_to_sink(tmp_path, port, 3)
    await manager.commit_graph(graph, {"local": ["counter", "sink"]})
    await manager.start()
    assert await notified.receive() == b"x"
    assert await manager.stop()
    await manager.shutdown()
    assert json.loads((tmp_path / "sink.json").read_text()) == [1, 2, 3]


async def test_a_zygote_killed_during_a_commit_fails_it_and_the_next_commit_works(
    tmp_path, monkeypatch
):
    no_graces_to_wait_out(monkeypatch)
    before = set(children_of(os.getpid()))
    async with notifications() as (port, notified):
        graph = cp.Graph()
        graph.add_node(SlowPrep("slow", port))
        with trio.fail_after(60):
            async with one_worker(tmp_path) as (manager, worker):

                async def commit() -> None:
                    with pytest.raises(cp.NodeError) as caught:
                        await manager.commit_graph(graph, {"local": ["slow"]})
                    assert str(caught.value) == f"node 'slow': {ZYGOTE_KILLED}"

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(commit)
                    assert await notified.receive() == b"prep"
                    os.kill(worker._zygote.pid, signal.SIGKILL)
                await run_counter_to_sink(manager, tmp_path, port, notified)
    assert set(children_of(os.getpid())) <= before


async def test_a_commit_cancelled_while_its_nodes_are_made_closes_them(tmp_path, monkeypatch):
    before = set(children_of(os.getpid()))
    starting = trio.Event()  # (the Worker starts its process starter: the first node is made)
    start_zygote = AsyncWorker._start_zygote

    async def start_zygote_slowly(self):
        starting.set()
        await trio.sleep(0.5)
        return await start_zygote(self)

    monkeypatch.setattr(AsyncWorker, "_start_zygote", start_zygote_slowly)
    made = trio.Event()  # (the Worker's request to make the nodes has ended)
    create_nodes = AsyncWorker._do_create_nodes

    async def create_nodes_and_say_so(self, nodes):
        try:
            return await create_nodes(self, nodes)
        finally:
            made.set()

    monkeypatch.setattr(AsyncWorker, "_do_create_nodes", create_nodes_and_say_so)
    graph = cp.Graph()
    graph.add_node(Counter("counter", limit=0))
    with trio.fail_after(10):  # (the node was left running, until ended at exit: 19 s)
        async with one_worker(tmp_path) as (manager, worker):
            with trio.CancelScope() as commit:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(manager.commit_graph, graph, {"local": ["counter"]})
                    await starting.wait()
                    commit.cancel()
            # (The commit's clean-up has ended: the Worker closed what it had made.)
            await made.wait()
            assert worker.nodes == {}  # (closed once made, not left running)
    assert set(children_of(os.getpid())) <= before


async def test_shutdown_from_another_task_ends_a_commit_waiting_on_a_prep(tmp_path, monkeypatch):
    monkeypatch.setattr(_process, "EXIT_GRACE", 0.5)  # (the prep never returns: it is ended)
    before = set(children_of(os.getpid()))
    async with notifications() as (port, notified):
        graph = cp.Graph()
        graph.add_node(SlowPrep("slow", port, seconds=3600))
        with trio.fail_after(60):
            async with one_worker(tmp_path) as (manager, _):

                async def commit() -> None:
                    with pytest.raises(RuntimeError, match=r"commit_graph\(\): ended by shutdown"):
                        await manager.commit_graph(graph, {"local": ["slow"]})

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(commit)
                    assert await notified.receive() == b"prep"
                    await manager.shutdown()
                await run_counter_to_sink(manager, tmp_path, port, notified)  # (it goes on)
    assert set(children_of(os.getpid())) <= before


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd_open (Linux)")
@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polled"])
async def test_nodes_that_stopped_before_their_zygote_died_stay_stopped(
    tmp_path, monkeypatch, pidfd
):
    no_graces_to_wait_out(monkeypatch)
    if not pidfd:  # as where there are none: the Worker polls for the exits
        monkeypatch.setattr(_process, "_open_pidfd", lambda pid: None)
    before = set(children_of(os.getpid()))
    async with notifications() as (port, notified):
        graph = counter_to_sink(tmp_path, port, 3)
        with trio.fail_after(60):
            async with one_worker(tmp_path) as (manager, worker):
                await manager.commit_graph(graph, {"local": ["counter", "sink"]})
                await manager.start()
                assert await notified.receive() == b"x"
                assert await manager.stop()
                nodes = [os.pidfd_open(runtime.pid) for runtime in worker._runtimes.values()]
                os.kill(worker._zygote.pid, signal.SIGKILL)
                with trio.fail_after(10):
                    for node in nodes:  # its process is ended
                        await trio.lowlevel.wait_readable(node)
                        os.close(node)
                    assert set(manager.nodes.values()) == {"STOPPED"}
                    assert await manager.collect()
                    await manager.shutdown()
                assert set(manager.nodes.values()) == {"SHUTDOWN"}
                assert worker.connected
    assert set(children_of(os.getpid())) <= before


async def test_a_node_of_a_few_megabytes_travels_to_its_worker(tmp_path):
    big = Counter("big", limit=0)
    big.weights = bytes(3_000_000)  # (the largest is 8 MB, pickled)
    graph = cp.Graph()
    graph.add_node(big)
    with trio.fail_after(60):
        async with cluster(tmp_path, "local") as manager:
            assert await manager.commit_graph(graph, {"local": ["big"]})
            assert list(manager.nodes.values()) == ["READY"]
            await manager.shutdown()


async def test_objects_travel_between_node_processes_when_the_cluster_allows_them(tmp_path):
    async with notifications() as (port, notified):
        graph = counter_to_sink(tmp_path, port, 5, source=Pairs)
        with trio.fail_after(60):
            async with cluster(tmp_path, "local", allow_objects=True) as manager:
                await manager.commit_graph(graph, {"local": ["counter", "sink"]})
                await manager.start()
                assert await notified.receive() == b"x"
                await manager.stop()
    assert json.loads((tmp_path / "sink.json").read_text()) == [[n, -n] for n in range(1, 6)]


@pytest.mark.parametrize("steps", [False, True], ids=["from-the-start", "steps-once-made"])
async def test_chunks_from_node_processes_are_stamped_with_cluster_time(tmp_path, steps):
    # The Manager's clock is 1000 s ahead of this machine's: from the start, or
    # from a step once the nodes are made (their processes follow it).
    ahead = 1000 * 10**9
    async with notifications() as (port, notified):
        graph = cp.Graph()
        graph.add_edge(
            Counter("counter", limit=5),
            StampSink("stamps", str(tmp_path), source="counter", expect=5, port=port),
        )
        with trio.fail_after(60):
            async with (
                AsyncManager(tmp_path / "logs", port=0) as manager,
                AsyncWorker("local") as worker,
            ):
                if not steps:
                    manager._clock = lambda: time.time_ns() + ahead
                assert await worker.connect(manager.host, manager.port)
                await worker.wait_for_clock()
                await manager.commit_graph(graph, {"local": ["counter", "stamps"]})
                if steps:
                    manager._clock = lambda: time.time_ns() + ahead
                    while worker.clock.estimate().offset_ns < ahead // 2:  # (its next exchange)
                        await worker._clock_changed.park()
                await manager.start()
                assert await notified.receive() == b"x"
                await manager.stop()
                await manager.shutdown()
    for stamp, local_now in json.loads((tmp_path / "stamps.json").read_text()):
        # Stamped in cluster time, received a little later (in local time).
        # (A little: a chunk may take less time to arrive than the error of
        # the estimated offset, some tens of µs on one machine.)
        assert -(10**7) <= local_now + ahead - stamp < 10**9


@pytest.mark.parametrize("transport", ["memory", "tcp"])
@pytest.mark.parametrize(
    ("counter_type", "sink_type"),
    [(Counter, Sink), (AsyncCounter, AsyncSink)],
    ids=["def", "async-def"],
)
async def test_step_runs_one_step_of_every_node(tmp_path, transport, counter_type, sink_type):
    async with notifications() as (port, notified):
        graph = cp.Graph()
        counter = counter_type("counter", limit=100)
        doubler = Doubler("doubler", source="counter")
        sink = sink_type("sink", str(tmp_path), source="doubler", expect=3, port=port)
        graph.add_edges_from([(counter, doubler), (doubler, sink)])
        with trio.fail_after(60):
            async with AsyncManager(tmp_path / "logs", port=0, transport=transport) as manager:
                async with AsyncWorker("local") as worker:
                    assert await worker.connect(manager.host, manager.port)
                    await manager.wait_for_workers(1)
                    await manager.commit_graph(graph, {"local": ["counter", "doubler", "sink"]})
                    for _ in range(3):
                        assert await manager.step()
                    # Counted as soon as step() returns.
                    assert {n["name"]: n["steps"] for n in manager.state()["nodes"]} == {
                        "counter": 3,
                        "doubler": 3,
                        "sink": 3,
                    }
                    assert await notified.receive() == b"x"
                    # It ends the nodes (the sources do not step again): teardown
                    # runs, and the sink writes what it saw.
                    assert await manager.collect()
                    assert set(manager.nodes.values()) == {"STOPPED"}
                    assert json.loads((tmp_path / "sink.json").read_text()) == [2, 4, 6]
                    await manager.shutdown()


async def test_cancelling_a_worker_with_running_nodes_ends_them_at_once(tmp_path):
    before = set(children_of(os.getpid()))
    async with notifications() as (port, notified):
        graph = counter_to_sink(tmp_path, port, 3)
        # Well under the 12 s a node has to exit once asked: nothing waits for a grace.
        with trio.fail_after(_process.EXIT_GRACE - 2):
            async with cluster(tmp_path, "local") as manager:
                await manager.commit_graph(graph, {"local": ["counter", "sink"]})
                await manager.start()
                assert await notified.receive() == b"x"
                # Leave the block with the nodes running: the Workers are cancelled.
    # Each node was asked to close, so the sink's teardown ran.
    assert json.loads((tmp_path / "sink.json").read_text()) == [1, 2, 3]
    assert set(children_of(os.getpid())) <= before


@pytest.mark.parametrize(
    ("manager_host", "listens_on"),
    [
        pytest.param(
            "::1",
            "[::1]",
            marks=pytest.mark.skipif(not can_bind("::1"), reason="no IPv6 loopback"),
            id="ipv6",
        ),
        # A Manager on 127.0.0.2 is reached from 127.0.0.1, as one on another
        # machine is reached from this machine's address toward it.
        pytest.param(
            "127.0.0.2",
            "127.0.0.1",
            marks=pytest.mark.skipif(not can_bind("127.0.0.2"), reason="only 127.0.0.1 here"),
            id="the-workers-end",
        ),
    ],
)
async def test_nodes_listen_where_their_worker_reached_the_manager_from(
    tmp_path, manager_host, listens_on
):
    async with notifications() as (port, notified):
        graph = counter_to_sink(tmp_path, port, 3)
        with trio.fail_after(60):
            async with (
                AsyncManager(tmp_path / "logs", port=0, host=manager_host) as manager,
                AsyncWorker("here") as worker,
                AsyncWorker("other") as other,
            ):
                assert await worker.connect(manager_host, manager.port)
                assert await other.connect(manager_host, manager.port)
                await manager.wait_for_workers(2)
                await manager.commit_graph(graph, {"here": ["counter"], "other": ["sink"]})
                meta = json.loads(manager.save_meta().read_text())
                assert meta["mapping"] == {"here": ["counter"], "other": ["sink"]}
                assert addresses_of(manager)["counter"].startswith(f"tcp://{listens_on}:")
                await manager.start()
                assert await notified.receive() == b"x"
                await manager.stop()
                await manager.shutdown()
    assert json.loads((tmp_path / "sink.json").read_text()) == [1, 2, 3]


TUNNEL = (
    "worker 'here': it reached the manager over loopback, but it is not on the manager's "
    "machine (a tunnel?): the nodes it runs that others read listen on 127.0.0.1, which "
    "Workers on other machines may not reach"
)


@pytest.mark.parametrize(
    ("reached", "listens", "said"),
    [
        pytest.param(
            "127.0.0.2",  # (this machine's, as the other machine reached it)
            "127.0.0.2",
            None,
            marks=pytest.mark.skipif(not can_bind("127.0.0.2"), reason="only 127.0.0.1 here"),
        ),
        # Not this machine's: the Worker on loopback is not on the Manager's (a tunnel).
        ("192.0.2.99", "127.0.0.1", TUNNEL),
        ("fe80::1", "127.0.0.1", None),  # (link-local: names another interface on each machine)
    ],
)
async def test_a_node_read_from_another_machine_listens_where_that_one_reached_the_manager(
    tmp_path, caplog, reached, listens, said
):
    # A Worker on the Manager's machine reached it over loopback (as
    # connect(manager.host, ...) does with host="0.0.0.0"): its node, read by
    # a Worker on another machine, cannot listen on loopback, but where that
    # Worker reached the Manager, an address of this same machine -- if it is.
    # (Loopback only here: the other machine is the Manager's record of "there".)
    async with notifications() as (port, notified):
        graph = counter_to_sink(tmp_path, port, 3)
        with trio.fail_after(60):
            async with (
                AsyncManager(tmp_path / "logs", port=0) as manager,
                AsyncWorker("here") as here,
                AsyncWorker("there") as there,
            ):
                assert await here.connect(manager.host, manager.port)
                assert await there.connect(manager.host, manager.port)
                await manager.wait_for_workers(2)
                record = manager._workers[there.id]
                record.ip, record.reached = "192.0.2.7", reached
                await manager.commit_graph(graph, {"here": ["counter"], "there": ["sink"]})
                assert addresses_of(manager)["counter"].startswith(f"tcp://{listens}:")
                await manager.start()
                assert await notified.receive() == b"x"
                await manager.stop()
                await manager.shutdown()
    assert json.loads((tmp_path / "sink.json").read_text()) == [1, 2, 3]
    warned = [r.getMessage() for r in caplog.records if "loopback" in r.getMessage()]
    assert warned == ([said] if said else [])


async def test_nodes_of_one_worker_link_by_tcp_where_a_unix_socket_path_is_too_long(
    tmp_path, monkeypatch
):
    deep = tmp_path / ("d" * 100)  # (a long TMPDIR, as on macOS, and longer)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    async with notifications() as (port, notified):
        graph = counter_to_sink(tmp_path, port, 3)
        with trio.fail_after(60):
            async with cluster(tmp_path, "w") as manager:
                await manager.commit_graph(graph, {"w": ["counter", "sink"]})
                addresses = addresses_of(manager)
                assert addresses["counter"].startswith("tcp://127.0.0.1:")
                await manager.start()
                assert await notified.receive() == b"x"
                await manager.stop()
                await manager.shutdown()
    assert json.loads((tmp_path / "sink.json").read_text()) == [1, 2, 3]


async def test_closings_at_the_same_time_say_once_what_they_wait_for(tmp_path, monkeypatch, caplog):
    from chimera import _worker

    monkeypatch.setattr(_worker, "CLOSE_PATIENCE", 0.2)
    caplog.set_level(logging.INFO, logger="chimera.worker")
    graph = cp.Graph()
    graph.add_node(SlowTeardown("slow"))
    with trio.fail_after(30):
        async with AsyncManager(tmp_path / "logs", port=0, transport="tcp") as manager:
            async with AsyncWorker("local") as worker:
                assert await worker.connect(manager.host, manager.port)
                assert await manager.commit_graph(graph, {"local": ["slow"]})
                assert await manager.start()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(worker.shutdown)
                    nursery.start_soon(worker.shutdown)  # (as a Ctrl-C's, during another)
    said = [m for m in caplog.messages if "still closing" in m]
    assert said == [
        "worker 'local': still closing 'slow' after 0.2 s (a teardown gets 10 s, then the "
        "node's process is ended)"
    ]


async def test_a_timeout_around_a_cluster_is_one_cancellation_not_a_tree(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(_process, "EXIT_GRACE", 0.5)  # (the prep never returns: it is ended)
    async with notifications() as (port, notified):
        graph = cp.Graph()
        graph.add_node(SlowPrep("slow", port, seconds=3600))
        with pytest.raises(trio.TooSlowError) as caught:
            with trio.fail_after(60) as scope:
                async with AsyncManager(tmp_path / "logs", port=0, transport="tcp") as manager:
                    async with AsyncWorker("local") as worker:
                        assert await worker.connect(manager.host, manager.port)
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(manager.commit_graph, graph, {"local": ["slow"]})
                            assert await notified.receive() == b"prep"
                            scope.deadline = trio.current_time()  # (the timeout, now)
    # What the user sees under the timeout: one cancellation, not every task's.
    assert isinstance(caught.value.__context__, trio.Cancelled)
    # Nor is a Worker that a cancelled Manager closes news.
    assert [
        r for r in caplog.records if r.levelno >= logging.WARNING and "left" in r.getMessage()
    ] == []


async def test_a_node_whose_async_step_blocks_its_loop_says_so(tmp_path, caplog):
    said = trio.Event()
    graph = cp.Graph()
    graph.add_node(BlocksItsLoop("blocker"))
    with trio.fail_after(60), on_record("chimera.node.blocker", "held up", said.set):
        async with cluster(tmp_path, "local") as manager:
            assert await manager.commit_graph(graph, {"local": ["blocker"]})
            assert await manager.start()
            await said.wait()
            assert await manager.stop()
    [warned] = [m for m in caplog.messages if "held up" in m]
    assert re.match(
        r"node 'blocker': its event loop was held up for \d+\.\d s: its async def step ran that "
        r"long without awaiting",
        warned,
    )


# --- the pipes' messages (chimera._pipe), between a Worker, its zygote and its nodes' processes


async def read_each_way(data: bytes) -> list:
    """What the blocking reader and the Trio one each read from a pipe that
    carried *data*, then ended: each one's messages, then the error that
    ended the reading, or None for the pipe's end."""
    from chimera import _pipe

    async def with_trio() -> list:
        send, receive = trio.testing.memory_stream_one_way_pair()
        await send.send_all(data)
        await send.aclose()
        reader = _pipe.MessageReader(receive)
        read = []
        try:
            while (message := await reader.read()) is not None:
                read.append(message)
        except _pipe.PipeError as exc:
            return [*read, exc]
        return [*read, None]

    def blocking() -> list:
        import io

        stream = io.BytesIO(data)
        read = []
        try:
            while (message := _pipe.read_blocking(stream)) is not None:
                read.append(message)
        except _pipe.PipeError as exc:
            return [*read, exc]
        return [*read, None]

    return [blocking(), await with_trio()]


async def test_a_pipe_that_ends_inside_a_message_is_an_error_not_its_end():
    from chimera import _pipe

    first, second = _pipe.encode({"a": 1}), _pipe.encode(("stop", ()))
    assert await read_each_way(first + second) == [[{"a": 1}, ("stop", ()), None]] * 2
    for cut in range(1, len(second)):  # in its length, right after it, in its body
        for read in await read_each_way(first + second[:cut]):
            assert read[0] == {"a": 1}
            assert isinstance(read[1], _pipe.PipeError), cut
            assert "ended inside a message" in str(read[1])


async def test_a_message_that_does_not_unpickle_is_a_pipe_error():
    from chimera import _pipe

    garbage = b"\x80\x05not a pickle"
    for read in await read_each_way(len(garbage).to_bytes(4, "little") + garbage):
        assert isinstance(read[0], _pipe.PipeError)
        assert "does not unpickle" in str(read[0])


async def test_a_message_longer_than_the_longest_is_refused_before_it_is_read(monkeypatch):
    from chimera import _pipe

    longest = _pipe.encode("x" * 100)
    monkeypatch.setattr(_pipe, "MAX_MESSAGE", len(longest) - 4)
    assert await read_each_way(longest) == [["x" * 100, None]] * 2
    # One byte more is refused from its length alone (its body never comes).
    too_long = _pipe.encode("x" * 101)[:4]
    for read in await read_each_way(too_long):
        assert isinstance(read[0], _pipe.PipeError)
        assert str(read[0]) == f"a message of {len(longest) - 3} bytes (at most {len(longest) - 4})"


def test_a_message_the_pipe_takes_in_parts_arrives_whole(monkeypatch):
    # (A write to a pipe may take part of the data: a signal, a full pipe.)
    from chimera import _pipe

    read_end, write_end = os.pipe()
    write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: write(fd, bytes(data[:7])))
    try:
        _pipe.write_blocking(write_end, _pipe.encode("x" * 100))
    finally:
        monkeypatch.undo()
        os.close(write_end)
    with os.fdopen(read_end, "rb", buffering=0) as stream:
        assert _pipe.read_blocking(stream) == "x" * 100
        assert _pipe.read_blocking(stream) is None
