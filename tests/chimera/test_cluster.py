"""A whole cluster in one Trio run: Manager, Workers, nodes inline (the memory transport).

Nodes in child processes: test_process.py.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
import time
import traceback
import types
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial

import numpy as np
import pytest
import trio
import trio.testing

import chimera as cp
from chimera import _manager, _runtime
from chimera._clock import ClockEstimator
from chimera._manager import AsyncManager
from chimera._worker import AsyncWorker

from . import nodes
from .records import on_record

#: Set by the sink (in this process: nodes run inline) once it has seen enough.
SEEN: dict[str, list] = {}
ENOUGH = threading.Event()


class Counter(cp.Node):
    def prep(self):
        self.n = 0

    def step(self):
        if self.n == 30:
            threading.Event().wait(0.001)
            return None
        self.n += 1
        return self.n


class Doubler(cp.Node):
    def step(self, data_chunks):
        return 2 * data_chunks["counter"].get("default")["value"]


class Printer(cp.Node):
    def prep(self):
        SEEN[self.name] = []

    def step(self, data_chunks):
        SEEN[self.name].append(data_chunks["doubler"].get("default")["value"])
        if len(SEEN[self.name]) == 30:
            ENOUGH.set()


class BrokenPrep(cp.Node):
    def prep(self):
        raise OSError("no such camera")


def counter_doubler_printer() -> tuple[cp.Graph, Counter, Doubler, Printer]:
    ENOUGH.clear()
    counter, doubler, printer = Counter("counter"), Doubler("doubler"), Printer("printer")
    graph = cp.Graph()
    graph.add_edges_from([(counter, doubler), (doubler, printer)])
    return graph, counter, doubler, printer


@asynccontextmanager
async def cluster(tmp_path, *names: str) -> AsyncIterator[tuple[AsyncManager, list[AsyncWorker]]]:
    """A Manager (memory transport: nodes inline) and connected Workers of these names."""
    async with AsyncManager(tmp_path, port=0, transport="memory") as manager:
        async with AsyncExitStack() as stack:
            workers = [await stack.enter_async_context(AsyncWorker(name)) for name in names]
            for worker in workers:
                assert await worker.connect(manager.host, manager.port)
            await manager.wait_for_workers(len(names))
            yield manager, workers


async def test_a_worker_says_when_tmpdir_is_not_where_its_nodes_save(tmp_path, monkeypatch, caplog):
    # Python goes on to TEMP (then TMP, then /tmp) without a word.
    import tempfile

    monkeypatch.setenv("TMPDIR", str(tmp_path / "missing"))
    monkeypatch.setenv("TEMP", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # (read them again)
    graph = cp.Graph()
    graph.add_node(EveryOther("counter"))
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, _):
            assert await manager.commit_graph(graph, {"local": ["counter"]})
            assert list(tmp_path.glob("chimera-worker-*"))  # (where it went)
    said = [r.getMessage() for r in caplog.records if "TMPDIR" in r.getMessage()]
    assert said == [
        f"worker 'local': TMPDIR={tmp_path / 'missing'} cannot be written in (or does not "
        f"exist): what its nodes save goes to {tmp_path} instead"
    ]


async def test_a_pipeline_over_two_workers_delivers_everything_in_order(tmp_path):
    graph, counter, doubler, printer = counter_doubler_printer()
    with trio.fail_after(30):
        async with cluster(tmp_path, "local", "remote") as (manager, (_, remote)):
            mapping = {"local": ["counter", "doubler"], "remote": ["printer"]}
            assert await manager.commit_graph(graph, mapping)
            assert set(manager.nodes.values()) <= {"INITIALIZED", "CONNECTED", "READY"}
            assert await manager.start()
            await trio.to_thread.run_sync(ENOUGH.wait, 20)
            gathered = await manager.gather()
            assert await manager.stop()
            assert remote.nodes == {printer.id: cp.NodeState.STOPPED}
    assert SEEN["printer"] == [2 * i for i in range(1, 31)]
    # Each node's last chunk, decoded; None for the printer, which returns nothing.
    assert gathered.keys() == {counter.id, doubler.id, printer.id}
    assert gathered[counter.id].get("default")["value"] == 30
    assert gathered[doubler.id].get("default")["value"] == 60
    assert gathered[printer.id] is None


async def test_a_session_folder_says_what_runs_where_from_its_start(tmp_path):
    # Should the Manager die before collect: which Worker keeps which node's
    # files, in a folder named by the node's id.
    graph, counter, doubler, printer = counter_doubler_printer()
    with trio.fail_after(30):
        async with cluster(tmp_path, "local", "remote") as (manager, _):
            mapping = {"local": ["counter", "doubler"], "remote": ["printer"]}
            assert await manager.commit_graph(graph, mapping)
            assert not (manager.session_folder() / "meta.json").exists()  # (no session yet)
            assert await manager.start()
            meta = json.loads((manager.session_folder() / "meta.json").read_text())
            assert await manager.stop()
    assert meta["mapping"] == mapping
    assert {node["id"]: node["name"] for node in meta["nodes"]} == {
        counter.id: "counter",
        doubler.id: "doubler",
        printer.id: "printer",
    }
    assert not any(node["collected"] for node in meta["streams"].values())


async def test_save_meta_before_a_graph_is_mapped_says_there_is_no_session(tmp_path):
    graph, *_ = counter_doubler_printer()
    async with AsyncManager(tmp_path, port=0, transport="memory") as manager:
        manager.register_graph(graph)
        with pytest.raises(RuntimeError, match=r"save_meta\(\): no graph is committed"):
            manager.save_meta()
    assert not list(tmp_path.glob("*/meta.json"))


async def test_a_prep_that_raises_makes_commit_graph_raise_a_node_error(tmp_path):
    graph = cp.Graph()
    graph.add_edge(BrokenPrep("camera"), cp.Node("fine"))
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, (local,)):
            with pytest.raises(cp.NodeError) as caught:
                await manager.commit_graph(graph, {"local": ["camera", "fine"]})
            assert local.nodes == {}  # what was created is closed again
    assert caught.value.node_name == "camera"
    assert "no such camera" in str(caught.value)
    assert "OSError: no such camera" in caught.value.traceback


async def test_a_node_error_out_of_the_cluster_block_still_prints_the_nodes_traceback(tmp_path):
    graph = cp.Graph()
    graph.add_edge(BrokenPrep("camera"), cp.Node("fine"))
    with trio.fail_after(30), pytest.raises(cp.NodeError) as caught:
        async with cluster(tmp_path, "local") as (manager, _):
            await manager.commit_graph(graph, {"local": ["camera", "fine"]})
    printed = "".join(traceback.format_exception(caught.value))
    assert printed.index("OSError: no such camera") < printed.index("chimera.NodeError")


class Camera(cp.Node):
    """A chunk every 10 ms, forever; sets MADE at the 9th (more than a link holds)."""

    def prep(self):
        self.n = 0

    def step(self):
        threading.Event().wait(0.01)
        self.n += 1
        if self.n == 9:
            MADE.set()
        return self.n


MADE = threading.Event()


class RaisesAtOnce(cp.Node):
    def step(self, data_chunks):
        raise KeyError("cam")


async def test_stop_returns_after_a_node_failed_under_a_source_that_runs_on(tmp_path):
    # The sink fails at its first chunk; the source's 9th does not fit in
    # the link (8 messages), so the source waits to send it when asked to stop.
    MADE.clear()
    source, sink = Camera("camera"), RaisesAtOnce("sink")
    graph = cp.Graph()
    graph.add_edge(source, sink)
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, (local,)):
            assert await manager.commit_graph(graph, {"local": ["camera", "sink"]})
            assert await manager.start()
            await trio.to_thread.run_sync(MADE.wait, 20)
            with trio.fail_after(5):
                await manager.stop()
            assert local.nodes == {source.id: cp.NodeState.STOPPED, sink.id: cp.NodeState.FAILED}
            await manager.shutdown()
            # Shut down, failed nodes included: the graph commits again.
            graph = cp.Graph()
            graph.add_edge(Camera("camera"), RaisesAtOnce("sink"))
            assert await manager.commit_graph(graph, {"local": ["camera", "sink"]})


async def test_stop_gather_collect_and_shutdown_go_on_after_a_worker_left(tmp_path, caplog):
    graph, _, doubler, printer = counter_doubler_printer()
    with trio.fail_after(30):
        async with AsyncManager(tmp_path, port=0, transport="memory") as manager:
            async with AsyncWorker("local") as local:
                assert await local.connect(manager.host, manager.port)
                async with AsyncWorker("remote") as remote:
                    assert await remote.connect(manager.host, manager.port)
                    await manager.wait_for_workers(2)
                    mapping = {"local": ["counter", "doubler"], "remote": ["printer"]}
                    assert await manager.commit_graph(graph, mapping)
                    assert await manager.start()
                    await trio.to_thread.run_sync(ENOUGH.wait, 20)
                await manager.wait_for_workers(1)  # "remote" left, and its node with it
                assert manager.nodes[printer.id] == "SHUTDOWN"  # (it left cleanly: closed)
                assert await manager.stop()
                assert manager.nodes[doubler.id] == "STOPPED"
                gathered = await manager.gather()
                assert gathered[printer.id] is None
                assert gathered[doubler.id].get("default")["value"] == 60
                assert await manager.collect() is False
                await manager.shutdown()
                assert local.nodes == {}
    meta = json.loads((manager.session_folder() / "meta.json").read_text())
    assert {node: info["collected"] for node, info in meta["streams"].items()} == {
        "local/counter": True,
        "local/doubler": True,
        "remote/printer": False,
    }
    # Said as it left (it left cleanly, but with what its node saved), not at collect only.
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert (
        "worker 'remote' left, and with it its nodes 'printer' (what they saved is not "
        "collected: the worker keeps it)"
    ) in warned
    assert not any("worker 'local' left" in text for text in warned)  # (after collect)


@pytest.mark.parametrize("started", [True, False], ids=["collected", "never-started"])
async def test_a_worker_that_leaves_with_no_files_to_collect_is_no_news(tmp_path, caplog, started):
    caplog.set_level(logging.INFO, logger="chimera.manager")
    graph = cp.Graph()
    graph.add_node(EveryOther("counter"))
    with trio.fail_after(30):
        async with AsyncManager(tmp_path, port=0, transport="memory") as manager:
            async with AsyncWorker("local") as local:
                assert await local.connect(manager.host, manager.port)
                assert await manager.commit_graph(graph, {"local": ["counter"]})
                if started:
                    assert await manager.start()
                    assert await manager.collect()
            await manager.wait_for_workers(0)  # it left, its node with it
    said = [r for r in caplog.records if "worker 'local' left" in r.getMessage()]
    assert said and all(r.levelname == "INFO" for r in said)


class Pairs(cp.Node):
    """Sends (n, {"n": array}) tuples: values only pickling carries."""

    def prep(self):
        self.n = 0

    def step(self):
        threading.Event().wait(0.001)
        self.n += 1
        return (self.n, {"n": np.full(3, self.n)})


class KeepPairs(cp.Node):
    def prep(self):
        SEEN[self.name] = []

    def step(self, data_chunks):
        SEEN[self.name].append(data_chunks["pairs"].get("default")["value"])
        if len(SEEN[self.name]) == 5:
            ENOUGH.set()


@pytest.mark.parametrize("allowed", [True, False])
async def test_objects_travel_only_in_a_cluster_that_allows_them(tmp_path, allowed):
    ENOUGH.clear()
    graph = cp.Graph()
    graph.add_edge(Pairs("pairs"), KeepPairs("keep"))
    with trio.fail_after(30):
        async with AsyncManager(
            tmp_path, port=0, transport="memory", allow_objects=allowed
        ) as manager:
            async with AsyncWorker("local") as worker:
                assert await worker.connect(manager.host, manager.port)
                await manager.wait_for_workers(1)
                assert await manager.commit_graph(graph, {"local": ["pairs", "keep"]})
                assert await manager.start()
                if allowed:
                    await trio.to_thread.run_sync(ENOUGH.wait, 20)
                    gathered = await manager.gather()  # (a pair, pickled)
                    (last,) = [c for c in gathered.values() if c is not None]
                    assert isinstance(last.get("default")["value"], tuple)
                else:
                    assert await manager.wait_for_node_state("pairs", "FAILED") == "FAILED"
                    nodes = manager.state()["nodes"]
                    (reason,) = [node["reason"] for node in nodes if node["name"] == "pairs"]
                    assert "Manager(..., allow_objects=True)" in reason
                await manager.stop()
    if allowed:
        for n, (number, arrays) in enumerate(SEEN["keep"][:5], start=1):
            assert number == n and arrays["n"].tolist() == [n, n, n]


async def test_calls_out_of_order_say_so_and_change_nothing(tmp_path):
    graph = counter_doubler_printer()[0]
    mapping = {"local": ["counter", "doubler", "printer"]}
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, _):
            assert await manager.commit_graph(graph, mapping)
            with pytest.raises(RuntimeError, match=re.escape("record(): the nodes do not run")):
                await manager.record()
            assert await manager.stop()  # nothing runs: nothing to stop, and the run is intact
            assert await manager.start()
            assert await trio.to_thread.run_sync(ENOUGH.wait, 20)
            first_session = manager.session_folder()
            for call, problem in [
                (manager.start, "start(): the nodes run already"),
                (manager.step, "step(): the nodes run already"),
                (partial(manager.commit_graph, graph, mapping), "shut them down before committing"),
            ]:
                with pytest.raises(RuntimeError, match=re.escape(problem)):
                    await call()
            assert await manager.stop()
            with pytest.raises(RuntimeError, match=r"start\(\): the nodes ran and stopped"):
                await manager.start()
            with pytest.raises(RuntimeError, match=r"record\(\): the nodes ran and stopped"):
                await manager.record()  # (not "preview() them first": that is refused too)
            assert set(manager.nodes.values()) == {"STOPPED"}
            await manager.shutdown()
            # Shut down, the graph commits and runs again: a new session.
            graph = counter_doubler_printer()[0]
            assert await manager.commit_graph(graph, mapping)
            assert set(manager.nodes) == {node.id for node in graph.nodes}  # (not the last's)
            assert await manager.start()
            await trio.to_thread.run_sync(ENOUGH.wait, 20)
            assert await manager.stop()
            assert manager.session_folder() != first_session
    assert SEEN["printer"] == [2 * i for i in range(1, 31)]


async def test_the_session_folder_is_named_for_the_first_start(tmp_path):
    graph = counter_doubler_printer()[0]
    later = [0]
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, _):
            manager._clock = lambda: time.time_ns() + later[0]
            ahead = manager.session_folder()  # (no session yet: where one would go, not made)
            assert ahead.parent == manager.logdir and not ahead.exists()
            assert await manager.commit_graph(graph, {"local": ["counter", "doubler", "printer"]})
            assert await manager.start()
            await trio.to_thread.run_sync(ENOUGH.wait, 20)
            later[0] = 3600 * 10**9  # collected an hour later
            assert await manager.stop()
            later[0] = 7200 * 10**9
            assert await manager.stop()  # (stopped already: the session ended at the first)
            assert await manager.collect()
            meta = json.loads((manager.session_folder() / "meta.json").read_text())
    named = time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(meta["start_ns"] / 1e9))
    assert meta["session"] == named
    assert 3600 <= (meta["stop_ns"] - meta["start_ns"]) / 1e9 < 3700


async def test_a_graph_runs_again_after_a_worker_left_with_stopped_nodes(tmp_path):
    graph = counter_doubler_printer()[0]
    with trio.fail_after(30):
        async with AsyncManager(tmp_path, port=0, transport="memory") as manager:
            async with AsyncWorker("local") as local:
                assert await local.connect(manager.host, manager.port)
                async with AsyncWorker("remote") as remote:
                    assert await remote.connect(manager.host, manager.port)
                    await manager.wait_for_workers(2)
                    mapping = {"local": ["counter", "doubler"], "remote": ["printer"]}
                    assert await manager.commit_graph(graph, mapping)
                    assert await manager.start()
                    await trio.to_thread.run_sync(ENOUGH.wait, 20)
                    assert await manager.stop()
                await manager.wait_for_workers(1)  # "remote" left, its node STOPPED
                await manager.shutdown()
                graph = counter_doubler_printer()[0]
                assert await manager.commit_graph(
                    graph, {"local": ["counter", "doubler", "printer"]}
                )
                assert await manager.start()
                await trio.to_thread.run_sync(ENOUGH.wait, 20)
                assert await manager.stop()


async def test_a_bad_mapping_is_refused_before_anything_starts(tmp_path):
    a, b = cp.Node("a"), cp.Node("b")
    graph = cp.Graph()
    graph.add_edge(a, b)
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, (local,)):
            with pytest.raises(cp.CommitGraphError, match="nodes not mapped to any worker: 'b'"):
                await manager.commit_graph(graph, {"local": ["a"]})
            assert local.nodes == {}


async def test_what_is_not_a_graph_of_nodes_is_refused_saying_what_it_is(tmp_path):
    odd = cp.Graph()
    odd.add_edge(cp.Node("a"), types.SimpleNamespace(id="b-id", name="b"))
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, (local,)):
            with pytest.raises(cp.CommitGraphError, match="the graph has no nodes"):
                await manager.commit_graph(cp.Graph(), {})
            with pytest.raises(cp.CommitGraphError, match="'b' is a SimpleNamespace, not a"):
                await manager.commit_graph(odd, {"local": ["a", "b"]})
            with pytest.raises(TypeError, match=r"must be a chimera\.Graph, not DiGraph"):
                await manager.commit_graph(odd.G, {"local": ["a", "b"]})
            with pytest.raises(TypeError, match="must be a dict of"):
                await manager.commit_graph(odd, ["local"])
            assert local.nodes == {}
            assert manager.graph is None


GLOBAL_LOCK = threading.Lock()


def a_class_using_a_global_lock() -> type[cp.Node]:
    """A node class not importable by name (as one of a script's): pickled by value."""

    def step(self):
        with GLOBAL_LOCK:
            return 1

    return type("UsesALock", (cp.Node,), {"step": step})


def graph_of(*nodes: cp.Node) -> cp.Graph:
    graph = cp.Graph()
    graph.add_nodes_from(nodes)
    return graph


async def test_a_node_that_cannot_be_pickled_is_refused_before_anything_starts(tmp_path):
    a, b = cp.Node("a"), cp.Node("b")
    b.lock = threading.Lock()  # made in __init__ rather than in prep
    graph = cp.Graph()
    graph.add_edge(a, b)
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, (local,)):
            with pytest.raises(cp.CommitGraphError) as caught:
                await manager.commit_graph(graph, {"local": ["a", "b"]})
            assert local.nodes == {}
            assert caught.value.problems == [
                "node 'b' cannot be pickled to be sent to its worker: cannot pickle "
                "'_thread.lock' object, in its attribute 'lock' (make what cannot be, such "
                "as a lock, a socket or a device, in prep())"
            ]
            # A class of a script or notebook travels by value, with the globals it uses.
            c = a_class_using_a_global_lock()("c")
            with pytest.raises(cp.CommitGraphError) as caught:
                await manager.commit_graph(graph_of(c), {"local": ["c"]})
            assert caught.value.problems[0].endswith(
                "cannot pickle '_thread.lock' object, in what its class's code uses (a global "
                "of your script or notebook?) (make what cannot be, such as a lock, a socket or "
                "a device, in prep())"
            )
            del b.lock
            b.table = np.random.default_rng(0).bytes(9_000_000)  # (random: no compression)
            too_large = r"node 'b' is 9\.0 MB pickled, over 8\.4"
            with pytest.raises(cp.CommitGraphError, match=too_large):
                await manager.commit_graph(graph, {"local": ["a", "b"]})
            b.table = b.table[:2_000_000]  # over a WebSocket's default bound (1 MiB): fine
            assert await manager.commit_graph(graph, {"local": ["a", "b"]})
            await manager.shutdown()


#: Lets GatedPrep's prep return.
PREP_GATE = threading.Event()


class GatedPrep(cp.Node):
    def prep(self):
        assert PREP_GATE.wait(20)


async def test_a_worker_leaving_during_commit_makes_it_raise_not_return_true(tmp_path):
    PREP_GATE.clear()
    graph = cp.Graph()
    graph.add_edge(cp.Node("camera"), GatedPrep("model"))
    with trio.fail_after(30):
        async with cluster(tmp_path, "local", "remote") as (manager, (local, remote)):
            async with trio.open_nursery() as nursery:

                async def leave_once_in_prep() -> None:
                    await manager.wait_for_node_state("model", "CONNECTED")
                    nursery.start_soon(remote.shutdown)  # (Ctrl-C on `chimera worker`)
                    await trio.testing.wait_all_tasks_blocked()  # it waits for the prep
                    PREP_GATE.set()

                nursery.start_soon(leave_once_in_prep)
                with pytest.raises(cp.WorkerLeftError, match="worker 'remote' left"):
                    await manager.commit_graph(graph, {"local": ["camera"], "remote": ["model"]})
            assert local.nodes == {}  # what was created is closed again


#: Set once the Manager logs that a commit waits for a node in prep, and that a stop does.
SAID_PREP_WAITS, SAID_STOP_WAITS = threading.Event(), threading.Event()
#: Set as Slow's first step begins.
STEPPING = threading.Event()


class Slow(cp.Node):
    """A source whose prep, then whose steps, last until the Manager says it
    waits for them."""

    def prep(self):
        assert SAID_PREP_WAITS.wait(20)

    def step(self):
        STEPPING.set()
        assert SAID_STOP_WAITS.wait(20)


async def test_a_slow_commit_and_a_slow_stop_say_which_nodes_they_wait_for(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(_manager, "PROGRESS_EVERY", 0.05)
    monkeypatch.setattr(_manager, "PROGRESS_NAMES", 1)  # (the others counted)
    for event in (SAID_PREP_WAITS, SAID_STOP_WAITS, STEPPING):
        event.clear()
    graph = cp.Graph()
    graph.add_edge(Slow("slow"), cp.Node("sink"))
    with (
        trio.fail_after(30),
        on_record("chimera.manager", "'slow' (in prep)", SAID_PREP_WAITS.set),
        on_record("chimera.manager", "'slow' (running", SAID_STOP_WAITS.set),
    ):
        async with cluster(tmp_path, "local") as (manager, _):
            caplog.set_level(logging.INFO, logger="chimera.manager")
            assert await manager.commit_graph(graph, {"local": ["slow", "sink"]})
            await manager.start()
            await trio.to_thread.run_sync(STEPPING.wait, 20)  # (a stop before: no step)
            assert await manager.stop()
            await manager.shutdown()
    said = [r.getMessage() for r in caplog.records if r.name == "chimera.manager"]
    # The first line of each wait is a warning: it shows without logging configured.
    for waiting in ("not ready", "not stopped"):
        levels = [r.levelname for r in caplog.records if waiting in r.getMessage()]
        assert levels[0] == "WARNING" and set(levels[1:]) <= {"INFO"}, levels
    assert re.fullmatch(
        r"commit_graph: 1 of 2 nodes not ready after \d+ s: 'slow' \(in prep\)",
        [line for line in said if "not ready" in line][-1],
    )
    # (the sink runs until the end of its input)
    assert re.fullmatch(
        r"stop: 2 of 2 nodes not stopped after \d+ s: 'slow' \(running, 0 steps so far\), "
        r"and 1 more",
        next(line for line in said if "not stopped" in line),
    )


#: Set once the Manager says that a stop waits for a node that steps no more.
SAID_NO_STEPS = threading.Event()


class StuckInTeardown(cp.Node):
    """A source whose teardown lasts until the Manager says that it steps no more."""

    def step(self):
        time.sleep(0.001)

    def teardown(self):
        assert SAID_NO_STEPS.wait(20)


async def test_a_slow_stop_says_which_node_steps_no_more(tmp_path, monkeypatch, caplog):
    SAID_NO_STEPS.clear()
    monkeypatch.setattr(_manager, "PROGRESS_EVERY", 0.05)
    graph = cp.Graph()
    graph.add_node(StuckInTeardown("stuck"))
    with (
        trio.fail_after(30),
        on_record("chimera.manager", "none in the last", SAID_NO_STEPS.set),
    ):
        async with cluster(tmp_path, "local") as (manager, _):
            caplog.set_level(logging.INFO, logger="chimera.manager")
            assert await manager.commit_graph(graph, {"local": ["stuck"]})
            assert await manager.start()
            assert await manager.stop()  # (once its teardown has ended)
    said = [r.getMessage() for r in caplog.records if "not stopped" in r.getMessage()]
    assert "none in the last" not in said[0]  # (nothing to compare with yet)
    assert re.fullmatch(
        r"stop: 1 of 1 nodes not stopped after \d+ s: 'stuck' \(running, \d+ steps so far, "
        r"none in the last 0.05 s: a step, or its teardown, takes that long\)",
        said[-1],
    )


async def test_lifecycle_calls_from_several_tasks_take_turns(tmp_path):
    graph, *_ = counter_doubler_printer()
    names = ["counter", "doubler", "printer"]
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, _):
            outcomes: dict[str, object] = {}

            async def call(name: str, fn, *args) -> None:
                try:
                    outcomes[name] = await fn(*args)
                except RuntimeError as exc:
                    outcomes[name] = str(exc)

            # Two commits at once: one commits, the other finds it committed.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, "one", manager.commit_graph, graph, {"local": names})
                nursery.start_soon(call, "other", manager.commit_graph, graph, {"local": names})
            first, second = sorted(outcomes.values(), key=lambda outcome: outcome is not True)
            assert first is True
            assert second.startswith("the 3 nodes of the graph committed before")
            outcomes.clear()
            # A step under way, then a start: the step ends, then the nodes start.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, "step", manager.step)
                await trio.testing.wait_all_tasks_blocked()  # (the step is under way)
                nursery.start_soon(call, "start", manager.start)
            assert outcomes == {"step": True, "start": True}
            await trio.to_thread.run_sync(ENOUGH.wait, 20)
            assert await manager.stop()
            assert await manager.collect()
    assert SEEN["printer"][:3] == [2, 4, 6]  # (one chunk stepped offline, then the run's)


async def test_a_start_cancelled_before_the_nodes_run_can_be_called_again(tmp_path, monkeypatch):
    graph, *_ = counter_doubler_printer()
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, _):
            await manager.commit_graph(graph, {"local": ["counter", "doubler", "printer"]})
            telling = trio.Event()

            async def told_nobody(*args, **kwargs):  # (as if cancelled before the Workers hear)
                telling.set()
                await trio.sleep_forever()

            with monkeypatch.context() as patched:
                patched.setattr(manager, "_broadcast", told_nobody)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(manager.start)
                    await telling.wait()
                    nursery.cancel_scope.cancel()
            assert set(manager.nodes.values()) == {"READY"}
            assert await manager.start()
            await trio.to_thread.run_sync(ENOUGH.wait, 20)
            assert await manager.stop()
    assert SEEN["printer"] == [2 * i for i in range(1, 31)]


async def test_broadcast_request_runs_chimerapys_worker_routes_on_the_cluster(tmp_path):
    graph, *_ = counter_doubler_printer()
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, (local,)):
            await manager.commit_graph(graph, {"local": ["counter", "doubler", "printer"]})
            assert await manager.broadcast_request("post", "/nodes/start")
            await trio.to_thread.run_sync(ENOUGH.wait, 20)
            assert await manager.broadcast_request("post", "/nodes/stop")
            assert set(manager.nodes.values()) == {"STOPPED"}
            assert await manager.broadcast_request("get", "/nodes/gather", timeout=0) is False
            with pytest.raises(ValueError, match="no route get /nodes/start; the routes are: post"):
                await manager.broadcast_request("get", "/nodes/start")
            # As ChimeraPy's: the nodes are closed, and every Worker leaves.
            assert await manager.broadcast_request("post", "/shutdown")
            assert local.nodes == {}
            assert manager.workers == {}
            await local.wait_for_disconnect()
    assert SEEN["printer"] == [2 * i for i in range(1, 31)]


class ReusesItsBuffer(cp.Node):
    """Sends 1..30, each in the same array, changed in place at each step."""

    def prep(self):
        self.buffer = np.zeros(256, np.int64)

    def step(self):
        if self.buffer[0] == 30:
            threading.Event().wait(0.001)
            return None
        self.buffer += 1
        chunk = cp.DataChunk()
        chunk.add("count", self.buffer, "array")
        return chunk


class AsyncReusesItsBuffer(ReusesItsBuffer):
    async def step(self):
        await trio.lowlevel.checkpoint()
        return super().step()


class SlowCollector(cp.Node):
    """Keeps what it receives (first and last element), slower than its source."""

    def prep(self):
        SEEN[self.name] = []

    def step(self, data_chunks):
        threading.Event().wait(0.002)
        value = data_chunks["source"].get("count")["value"]
        SEEN[self.name].append((int(value[0]), int(value[-1])))
        if len(SEEN[self.name]) == 30:
            ENOUGH.set()


@pytest.mark.parametrize("source_class", [ReusesItsBuffer, AsyncReusesItsBuffer])
async def test_a_node_may_change_an_array_it_returned_once_it_steps_again(tmp_path, source_class):
    # As a camera reading into the same buffer does: what was sent stays as it was.
    ENOUGH.clear()
    source, collector = source_class("source"), SlowCollector("collector")
    graph = cp.Graph()
    graph.add_edge(source, collector)
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, _):
            assert await manager.commit_graph(graph, {"local": ["source", "collector"]})
            assert await manager.start()
            await trio.to_thread.run_sync(ENOUGH.wait, 20)
            assert await manager.stop()
    assert SEEN["collector"] == [(n, n) for n in range(1, 31)]


class StampsItsClock(cp.Node):
    """Keeps how far a record's timestamp is from this machine's clock (ns)."""

    def prep(self):
        SEEN[self.name] = []

    def step(self):
        chunk = cp.DataChunk()
        chunk.add("x", 1)
        SEEN[self.name].append(chunk.get("x")["timestamp"] - time.time_ns())
        ENOUGH.set()
        threading.Event().wait(0.001)


class AsyncStampsItsClock(StampsItsClock):
    async def step(self):
        await trio.lowlevel.checkpoint()
        super().step()


@pytest.mark.parametrize("node_class", [StampsItsClock, AsyncStampsItsClock])
async def test_nodes_inline_stamp_records_with_their_workers_clock(tmp_path, node_class):
    # As with a Worker whose clock is 5 s behind the Manager's: its offset applies.
    ENOUGH.clear()
    graph = cp.Graph()
    graph.add_node(node_class("stamper"))
    with trio.fail_after(30):
        async with AsyncManager(tmp_path, port=0, transport="memory") as manager:
            async with AsyncWorker("local") as worker:
                worker.clock = ClockEstimator(clock=lambda: time.time_ns() + 5 * 10**9)
                assert await worker.connect(manager.host, manager.port)
                assert await manager.commit_graph(graph, {"local": ["stamper"]})
                assert await manager.start()
                await trio.to_thread.run_sync(ENOUGH.wait, 20)
                assert await manager.stop()
    assert all(4.9e9 < ahead < 5.1e9 for ahead in SEEN["stamper"])


class Pair(cp.Node):
    """Keeps the values of its inputs "a" and "b" at each step."""

    def prep(self):
        SEEN[self.name] = []

    def step(self, data_chunks):
        SEEN[self.name].append(
            tuple(data_chunks[name].get("default")["value"] for name in ("a", "b"))
        )


async def step_offline(tmp_path, a: cp.Node, b: cp.Node, node: cp.Node, steps: int) -> None:
    """Commit *a* and *b* feeding *node* (following *a*), all on one Worker,
    and step them *steps* times (offline mode)."""
    graph = cp.Graph()
    graph.add_nodes_from([a, b, node])
    graph.add_edge(a, node, follow=True)
    graph.add_edge(b, node)
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, _):
            assert await manager.commit_graph(graph, {"local": [a.name, b.name, node.name]})
            for _ in range(steps):
                assert await manager.step()


async def test_offline_steps_take_what_every_input_sent_in_the_same_step(tmp_path):
    # More steps than a link holds: the input not followed is read at each step.
    await step_offline(tmp_path, Counter("a"), Counter("b"), Pair("pair"), 12)
    assert SEEN["pair"] == [(n, n) for n in range(1, 13)]


class EveryOther(cp.Node):
    """Sends 1, None, 3, None, ...: its odd steps only; raises at its 7th if *breaks*."""

    def __init__(self, name, breaks=False):
        super().__init__(name)
        self.breaks = breaks

    def prep(self):
        self.n = 0

    def step(self):
        self.n += 1
        if self.n == 7 and self.breaks:
            raise ValueError("no reading")
        return self.n if self.n % 2 else None


class Keep(cp.Node):
    """Keeps the value of each of its inputs, by name, at each step."""

    def prep(self):
        SEEN[self.name] = []

    def step(self, data_chunks):
        SEEN[self.name].append({k: v.get("default")["value"] for k, v in data_chunks.items()})


@pytest.mark.parametrize("breaks", [False, True], ids=["none", "raises"])
async def test_offline_a_step_that_sends_nothing_leaves_the_nodes_below_unstepped(tmp_path, breaks):
    source, doubler, keep = EveryOther("counter", breaks), Doubler("doubler"), Keep("keep")
    graph = cp.Graph()
    graph.add_edges_from([(source, doubler), (doubler, keep)])
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, _):
            assert await manager.commit_graph(graph, {"local": ["counter", "doubler", "keep"]})
            for n in range(1, 10):
                if n == 7 and breaks:
                    with pytest.raises(cp.NodeError, match="no reading"):
                        await manager.step()
                else:
                    assert await manager.step()
            # A node that failed stays so: it runs no more, and the others end.
            assert await manager.start()
            assert await manager.stop()
            states = {node["name"]: node["state"] for node in manager.state()["nodes"]}
    if breaks:  # (it failed at its 7th step: it steps no more)
        assert SEEN["keep"] == [{"doubler": 2 * n} for n in (1, 3, 5)]
        assert states == {"counter": "FAILED", "doubler": "STOPPED", "keep": "STOPPED"}
    else:
        assert SEEN["keep"][:5] == [{"doubler": 2 * n} for n in (1, 3, 5, 7, 9)]
        assert set(states.values()) == {"STOPPED"}


class Refuses(cp.Node):
    def step(self, data_chunks):
        raise ValueError("not this")


async def test_offline_a_node_that_failed_holds_up_nothing(tmp_path):
    source, keep, refuses = Counter("source"), Keep("keep"), Refuses("refuses")
    graph = cp.Graph()
    graph.add_edges_from([(source, keep), (source, refuses)])
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, _):
            assert await manager.commit_graph(graph, {"local": ["source", "keep", "refuses"]})
            with pytest.raises(cp.NodeError, match="not this"):
                await manager.step()
            assert await manager.step()
            assert await manager.collect()  # (it ends the nodes)
            states = {node["name"]: node["state"] for node in manager.state()["nodes"]}
    assert SEEN["keep"] == [{"source": 1}, {"source": 2}]
    assert states == {"source": "STOPPED", "keep": "STOPPED", "refuses": "FAILED"}


#: Set once Detector has stepped on 200 chunks.
SAW_200 = threading.Event()


class PacedCounter(nodes.Counter):
    """:class:`nodes.Counter` paced as a camera: its chunks travel one by one."""

    def step(self):
        threading.Event().wait(0.0005)
        return super().step()


class Detector(cp.Node):
    """Finds nothing until its step *found_from* (never if None), then its step's number."""

    def __init__(self, name, found_from):
        super().__init__(name)
        self.found_from = found_from

    def prep(self):
        self.n = 0

    def step(self, data_chunks):
        self.n += 1
        if self.n == 200:
            SAW_200.set()
        return self.n if self.found_from is not None and self.n >= self.found_from else None


@pytest.mark.parametrize("found_from", [None, 50], ids=["never", "late"])
async def test_an_input_that_sends_nothing_yet_holds_up_nothing(tmp_path, monkeypatch, found_from):
    # camera -> detector, and both -> fusion (following the camera): the
    # camera's chunks wait at the fusion node for the detector's first
    # (the newest 16 of them); the camera, and the detector, go on meanwhile.
    monkeypatch.setattr(_runtime, "WAITING_CHUNKS", 16)
    SAW_200.clear()
    camera, detector, fusion = (
        PacedCounter("camera", limit=200),
        Detector("detector", found_from),
        Keep("fusion"),
    )
    graph = cp.Graph()
    graph.add_edges_from([(camera, detector), (camera, fusion), (detector, fusion)])
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, _):
            assert await manager.commit_graph(graph, {"local": ["camera", "detector", "fusion"]})
            assert await manager.start()
            assert await trio.to_thread.run_sync(SAW_200.wait, 20)  # (the camera went on)
            assert await manager.stop()
            dropped = {n["name"]: n["dropped"] for n in manager.state()["nodes"]}["fusion"]
    stepped = [seen["camera"] for seen in SEEN["fusion"]]
    if found_from is None:
        assert stepped == [] and dropped == 200
    else:  # every chunk from the oldest one kept on, the others counted
        assert stepped == list(range(dropped + 1, 201))
        assert len(stepped) >= 16  # (at least the 16 waiting as the detector's first came)


class Late(cp.Node):
    """Sends nothing at its first step, then its step's number."""

    def prep(self):
        self.n = 0

    def step(self):
        self.n += 1
        return None if self.n == 1 else self.n


async def test_offline_a_node_steps_once_every_input_has_sent(tmp_path):
    # "a" (followed) sends from the first step, "b" from the second: a's first
    # chunk waits for b's, and is not lost.
    await step_offline(tmp_path, Counter("a"), Late("b"), Keep("keep"), 4)
    assert SEEN["keep"] == [{"a": 1, "b": 2}, {"a": 2, "b": 3}, {"a": 3, "b": 4}]


async def test_offline_chunks_not_stepped_on_yet_are_stepped_as_collect_ends_the_nodes(tmp_path):
    # "a" (followed) sends 1 and 2; "b" sends from its second step: a's 1 waited
    # for it; a's 2 waits for nothing more, and the step on it ends the session.
    graph = cp.Graph()
    a, b, keep = Counter("a"), Late("b"), Keep("keep")
    graph.add_nodes_from([a, b, keep])
    graph.add_edge(a, keep, follow=True)
    graph.add_edge(b, keep)
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, _):
            assert await manager.commit_graph(graph, {"local": ["a", "b", "keep"]})
            assert await manager.step()
            assert await manager.step()
            assert SEEN["keep"] == [{"a": 1, "b": 2}]
            assert await manager.collect()
            assert set(manager.nodes.values()) == {"STOPPED"}
            with pytest.raises(RuntimeError, match="ran and stopped"):
                await manager.step()
    assert SEEN["keep"] == [{"a": 1, "b": 2}, {"a": 2, "b": 2}]


class SavesInPrep(cp.Node):
    def prep(self):
        self.save_json("calibration", {"gain": 2})


@pytest.mark.parametrize("steps", [0, 2])
async def test_collect_takes_what_prep_saved_from_nodes_never_started(tmp_path, steps):
    graph = cp.Graph()
    graph.add_node(SavesInPrep("camera"))
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, _):
            assert await manager.commit_graph(graph, {"local": ["camera"]})
            for _ in range(steps):
                assert await manager.step()
            assert await manager.collect()
            saved = manager.session_folder() / "local" / "camera" / "calibration.jsonl"
            assert saved.read_text() == '{"gain": 2}\n'
            assert list(manager.nodes.values()) == ["SAVED"]


async def test_what_prep_saved_is_not_deleted(tmp_path, caplog, take_worker_folders):
    graph = cp.Graph()
    graph.add_node(SavesInPrep("camera"))
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, (worker,)):
            assert await manager.commit_graph(graph, {"local": ["camera"]})
            await worker.shutdown()  # (never collected)
    said = [r.getMessage() for r in caplog.records if "never collected" in r.getMessage()]
    assert len(said) == 1, caplog.messages
    [(folder, files)] = take_worker_folders().items()
    assert str(folder) in said[0] and files


@pytest.mark.parametrize("saves", [True, False])
async def test_a_worker_committed_to_again_says_if_files_were_never_collected(
    tmp_path, caplog, take_worker_folders, saves
):
    first = cp.Graph()
    first.add_node(SavesInPrep("camera") if saves else Main("camera"))
    second = cp.Graph()
    second.add_node(Main("other"))
    with trio.fail_after(30):
        async with AsyncWorker("local") as worker:
            for number, graph in enumerate((first, second)):
                async with AsyncManager(tmp_path / f"m{number}", port=0) as manager:
                    assert await worker.connect(manager.host, manager.port)
                    assert await manager.commit_graph(graph, {"local": [graph.nodes[0].name]})
                    await manager.shutdown()  # (never collected)
                await worker.wait_for_disconnect()
    said = [r.getMessage() for r in caplog.records if "last graph saved" in r.getMessage()]
    assert len(said) == (1 if saves else 0), said
    assert len(take_worker_folders()) == (1 if saves else 0)


#: Set once HeldInTeardown's teardown runs; it returns once TEARDOWN_GATE is set.
IN_TEARDOWN, TEARDOWN_GATE = threading.Event(), threading.Event()


class HeldInTeardown(cp.Node):
    def teardown(self):
        IN_TEARDOWN.set()
        assert TEARDOWN_GATE.wait(20)


async def test_a_worker_whose_manager_left_while_it_closed_its_nodes_serves_the_next(tmp_path):
    # The Manager's connection ends while the Worker closes the nodes it asked
    # it to: the closing still ends, and nothing of that graph stays.
    IN_TEARDOWN.clear()
    TEARDOWN_GATE.clear()
    first = cp.Graph()
    first.add_node(HeldInTeardown("held"))
    second = cp.Graph()
    second.add_node(cp.Node("fresh"))
    with trio.fail_after(30):
        async with AsyncWorker("local") as worker:
            async with AsyncManager(tmp_path / "m0", port=0, transport="memory") as manager:
                assert await worker.connect(manager.host, manager.port)
                assert await manager.commit_graph(first, {"local": ["held"]})
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(manager.shutdown)
                    await trio.to_thread.run_sync(IN_TEARDOWN.wait, 20)
                    nursery.cancel_scope.cancel()  # (the Manager leaves: its connection ends)
            TEARDOWN_GATE.set()
            await worker.wait_for_disconnect()
            async with AsyncManager(tmp_path / "m1", port=0, transport="memory") as manager:
                assert await worker.connect(manager.host, manager.port)
                assert await manager.commit_graph(second, {"local": ["fresh"]})
                assert list(worker.nodes.values()) == [cp.NodeState.READY]
                await manager.shutdown()


async def test_a_session_collected_runs_no_more_even_if_every_node_failed(tmp_path):
    graph = cp.Graph()
    graph.add_node(EveryOther("counter", breaks=True))
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, _):
            assert await manager.commit_graph(graph, {"local": ["counter"]})
            for _ in range(6):
                assert await manager.step()
            with pytest.raises(cp.NodeError):
                await manager.step()
            assert await manager.collect()
            for call in (manager.step, manager.start, manager.preview):
                with pytest.raises(RuntimeError, match="ran and stopped"):
                    await call()
            meta = json.loads((manager.session_folder() / "meta.json").read_text())
    # Why it failed is in meta.json, beside its state.
    node = meta["streams"]["local/counter"]
    assert node["state"] == "FAILED" and node["reason"] == "step raised ValueError('no reading')"


class Main(cp.Node):
    def main(self):
        pass


async def test_offline_mode_says_a_node_with_a_main_cannot_be_stepped(tmp_path):
    graph = cp.Graph()
    graph.add_node(Main("own"))
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, _):
            assert await manager.commit_graph(graph, {"local": ["own"]})
            with pytest.raises(cp.NodeError, match=r"overrides main\(\)"):
                await manager.step()
            assert list(manager.nodes.values()) == ["READY"]


async def test_calls_before_a_commit_say_so(tmp_path):
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, _):
            for call in (manager.step, manager.start, manager.preview, manager.stop):
                with pytest.raises(RuntimeError, match="no graph is committed"):
                    await call()
            for call in (manager.record, manager.collect):
                with pytest.raises(RuntimeError, match="no graph is committed"):
                    await call()
            assert not [path for path in tmp_path.iterdir() if path.is_dir()]  # (no session)
            # After a shutdown, as before a commit.
            graph = cp.Graph()
            graph.add_node(Counter("counter"))
            assert await manager.commit_graph(graph, {"local": ["counter"]})
            assert await manager.preview()
            await manager.shutdown()
            for call in (manager.record, manager.collect):
                with pytest.raises(RuntimeError, match="no graph is committed"):
                    await call()


class FindsNothing(cp.Node):
    def step(self):
        return None


async def test_offline_chunks_waiting_for_a_silent_input_are_bounded_and_said(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(_runtime, "WAITING_CHUNKS", 4)
    graph = cp.Graph()
    a, b, keep = Counter("a"), FindsNothing("b"), Keep("keep")
    graph.add_nodes_from([a, b, keep])
    graph.add_edge(a, keep, follow=True)
    graph.add_edge(b, keep)

    def dropped() -> int:
        return {n["name"]: n["dropped"] for n in manager.state()["nodes"]}["keep"]

    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, _):
            assert await manager.commit_graph(graph, {"local": ["a", "b", "keep"]})
            for _ in range(10):
                assert await manager.step()
            assert dropped() == 6  # (4 wait)
            assert await manager.collect()  # b ends, having sent nothing: none is stepped
            assert dropped() == 10
    assert SEEN["keep"] == []
    said = (tmp_path / "nodes.log").read_text()
    assert "local/keep: its inputs ['b'] have sent nothing yet" in said
    assert "local/keep: inputs ['b'] ended without sending" in said


async def test_offline_a_latest_input_waits_with_its_newest_chunk_only(tmp_path):
    graph = cp.Graph()
    a, b, keep = Counter("a"), Late("b"), Keep("keep")
    graph.add_nodes_from([a, b, keep])
    graph.add_edge(a, keep, follow=True, delivery="latest")
    graph.add_edge(b, keep)
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, _):
            assert await manager.commit_graph(graph, {"local": ["a", "b", "keep"]})
            for _ in range(3):
                assert await manager.step()
            dropped = {n["name"]: n["dropped"] for n in manager.state()["nodes"]}["keep"]
    # a's 1 waited for b's first (2), and was replaced by a's 2 meanwhile.
    assert SEEN["keep"] == [{"a": 2, "b": 2}, {"a": 3, "b": 3}]
    assert dropped == 1


async def test_the_step_by_step_commit_takes_names_and_says_what_is_missing(tmp_path):
    graph, *_ = counter_doubler_printer()
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, _):
            manager.register_graph(graph)
            with pytest.raises(RuntimeError, match="no graph is mapped"):
                await manager.create_p2p_network()
            manager.map_graph({"local": ["counter", "doubler", "printer"]})
            with pytest.raises(cp.CommitGraphError, match="no node 'nope'"):
                await manager.request_node_creation("local", "nope")
            assert await manager.request_node_creation("local", "counter")  # names
            with pytest.raises(RuntimeError, match="'doubler' is not created yet"):
                await manager.setup_p2p_connections()
            assert await manager.create_p2p_network()
            assert await manager.setup_p2p_connections()
            assert await manager.start()
            await trio.to_thread.run_sync(ENOUGH.wait, 20)
            assert await manager.stop()
    assert SEEN["printer"] == [2 * n for n in range(1, 31)]


async def test_a_worker_asked_to_make_a_node_it_has_refuses_and_keeps_the_one_it_has(tmp_path):
    # (The Manager never asks twice; a Worker does not trust that it will not.)
    graph, counter, *_ = counter_doubler_printer()
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, [worker]):
            assert await manager.commit_graph(graph, {"local": ["counter", "doubler", "printer"]})
            again = manager._spec(graph, counter.id, worker.id)
            with pytest.raises(RuntimeError, match="node 'counter' exists already on this worker"):
                await manager._request(worker.id, "create_nodes", nodes=[again])
            assert await manager.start()
            await trio.to_thread.run_sync(ENOUGH.wait, 20)
            assert await manager.stop()
    assert SEEN["printer"] == [2 * n for n in range(1, 31)]


async def test_debug_logs_show_each_request_its_answer_and_each_node_state(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="chimera")
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, _):
            assert await manager.commit_graph(graph_of(Main("own")), {"local": ["own"]})
    said = [m for m in caplog.messages if "create_nodes" in m or "node 'own' is" in m]
    assert said[:2] == [
        "asking worker 'local': create_nodes (request 1)",
        "worker 'local': the manager asks create_nodes",
    ]
    assert "worker 'local': node 'own' is INITIALIZED" in said
    assert any(
        re.fullmatch(r"worker 'local' answered create_nodes \(request 1\) in \d+ ms: ok", m)
        for m in said
    )


STEPPING, RELEASE = threading.Event(), threading.Event()


class StepNeverReturns(cp.Node):
    def step(self):
        STEPPING.set()
        RELEASE.wait(30)


async def test_a_step_that_never_returns_is_named_when_its_node_is_closed(
    tmp_path, caplog, monkeypatch
):
    from chimera import _runtime

    monkeypatch.setattr(_runtime, "TEARDOWN_TIMEOUT", 0.2)
    STEPPING.clear()
    RELEASE.clear()
    try:
        with trio.fail_after(30):
            async with cluster(tmp_path, "local") as (manager, (worker,)):
                assert await manager.commit_graph(
                    graph_of(StepNeverReturns("hung")), {"local": ["hung"]}
                )
                assert await manager.start()
                await trio.to_thread.run_sync(STEPPING.wait)
                await worker.shutdown()
    finally:
        RELEASE.set()
    said = [m for m in caplog.messages if "teardown did not return" in m]
    assert said == [
        "node 'hung': its teardown did not return within 0.2 s, or did not begin, its thread "
        "being still in an earlier call (a step that does not return): its thread is left running"
    ]


class SourceWithInput(cp.Node):
    def step(self, data_chunks):
        return 1


class SinkWithoutInput(cp.Node):
    def step(self):
        return 1


class TakesTwo(cp.Node):
    async def step(self, data_chunks, extra):
        return 1


async def test_a_step_that_cannot_take_what_it_is_given_is_refused_at_commit(tmp_path):
    source, sink, two = SourceWithInput("source"), SinkWithoutInput("sink"), TakesTwo("two")
    graph = cp.Graph()
    graph.add_edges_from([(source, sink), (source, two)])
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, (local,)):
            with pytest.raises(cp.CommitGraphError) as caught:
                await manager.commit_graph(graph, {"local": ["source", "sink", "two"]})
            assert local.nodes == {}
    assert sorted(caught.value.problems) == [
        "node 'sink' has inputs ('source'): its step() is called with their chunks, but it "
        "takes no argument (step(self, data_chunks))",
        "node 'source' has no inputs: its step() is called with no argument, but it takes "
        "'data_chunks' (a source's is step(self))",
        "node 'two': its step() takes 'data_chunks', 'extra', but is called with data_chunks alone",
    ]


class TakesAny(cp.Node):
    def step(self, *data_chunks):
        return len(data_chunks)


class RunsMain(cp.Node):
    def step(self):  # (not called: main runs instead)
        return 1

    def main(self):
        pass


async def test_a_step_of_any_arguments_or_a_node_that_runs_main_is_accepted_at_commit(tmp_path):
    source, any_, main = SinkWithoutInput("source"), TakesAny("any"), RunsMain("main")
    graph = cp.Graph()
    graph.add_edges_from([(source, any_), (source, main)])
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, _):
            assert await manager.commit_graph(graph, {"local": ["source", "any", "main"]})


class ReadsTheWrongInput(cp.Node):
    def step(self, data_chunks):
        return data_chunks["camera"]


async def test_reading_an_input_by_a_wrong_name_says_which_inputs_there_are(tmp_path):
    source, reader = SinkWithoutInput("cam"), ReadsTheWrongInput("reader")
    graph = cp.Graph()
    graph.add_edge(source, reader)
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, _):
            assert await manager.commit_graph(graph, {"local": ["cam", "reader"]})
            with pytest.raises(cp.NodeError) as caught:
                await manager.step()
    assert caught.value.message == (
        "step raised KeyError(\"'camera' is not an input of this node: its inputs are 'cam'\")"
    )


class BlocksItsLoop(cp.Node):
    async def step(self):
        time.sleep(0.3)  # (the mistake: not await trio.sleep)
        return 1


async def test_an_async_step_that_blocks_the_loop_is_said_once(tmp_path, caplog, monkeypatch):
    from chimera import _runtime

    monkeypatch.setattr(_runtime, "LOOP_CHECK", 0.05)
    monkeypatch.setattr(_runtime, "LOOP_HELD", 0.2)
    said = trio.Event()
    with trio.fail_after(30), on_record("chimera.node.blocker", "held up", said.set):
        async with cluster(tmp_path, "local") as (manager, _):
            assert await manager.commit_graph(
                graph_of(BlocksItsLoop("blocker")), {"local": ["blocker"]}
            )
            assert await manager.start()
            await said.wait()
            assert await manager.stop()
    warned = [m for m in caplog.messages if "held up" in m]
    assert len(warned) == 1
    assert re.fullmatch(
        r"node 'blocker': the event loop it shares with its Worker's nodes \(memory transport\) "
        r"was held up for \d+\.\d s: an async def step, its own or another's, ran that long "
        r"without awaiting \(time\.sleep, or a blocking call\?\)\. .* \(said once\)",
        warned[0],
    )


def checked(step):
    """A decorator, as users write them: what the runtime calls is the wrapper."""

    @functools.wraps(step)
    def wrapper(self, data_chunks):
        return step(self, data_chunks["cam"], len(data_chunks))

    return wrapper


class Decorated(cp.Node):
    @checked
    def step(self, chunk, count):
        return count


async def test_a_decorated_step_is_checked_as_what_is_called(tmp_path):
    graph = cp.Graph()
    graph.add_edge(SinkWithoutInput("cam"), Decorated("decorated"))
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, _):
            assert await manager.commit_graph(graph, {"local": ["cam", "decorated"]})
            assert await manager.step()
            gathered = await manager.gather()
    assert [chunk.get("default")["value"] for chunk in gathered.values()] == [1, 1]


class SaysGoodbye(cp.Node):
    def step(self):
        threading.Event().wait(0.01)

    def teardown(self):
        self.logger.warning("goodbye from %s", self.name)


@pytest.mark.parametrize("how", ["shutdown", "block"])
async def test_what_a_leaving_workers_nodes_say_last_reaches_the_manager(tmp_path, how):
    graph = cp.Graph()
    graph.add_nodes_from([SaysGoodbye(f"n{i}") for i in range(5)])
    with trio.fail_after(30):
        async with AsyncManager(tmp_path, port=0, transport="memory") as manager:
            async with AsyncWorker("local") as local:
                assert await local.connect(manager.host, manager.port)
                await manager.wait_for_workers(1)
                assert await manager.commit_graph(graph, {"local": [f"n{i}" for i in range(5)]})
                assert await manager.start()
                if how == "shutdown":
                    await local.shutdown()
            await manager.wait_for_workers(0)
            said = (tmp_path / "nodes.log").read_text()
            states = set(manager.nodes.values())
    assert [f"goodbye from n{i}" in said for i in range(5)] == [True] * 5
    assert states == {"SHUTDOWN"}


async def test_a_gathered_upload_over_the_managers_limit_is_refused_saying_so(
    tmp_path, monkeypatch
):
    graph, *_ = counter_doubler_printer()
    monkeypatch.setattr(_manager, "MAX_UPLOAD", 10)  # (1 GiB, as a test)
    with trio.fail_after(30):
        async with cluster(tmp_path, "local") as (manager, _):
            assert await manager.commit_graph(graph, {"local": ["counter", "doubler", "printer"]})
            assert await manager.start()
            await trio.to_thread.run_sync(ENOUGH.wait, 20)
            with pytest.raises(RuntimeError) as caught:
                await manager.gather()
            assert await manager.stop()
    # The Worker's upload of the chunks was refused: the Manager says why.
    assert "the manager answered 413 to POST /uploads/" in str(caught.value)
    assert ": larger than 10 bytes" in str(caught.value)
