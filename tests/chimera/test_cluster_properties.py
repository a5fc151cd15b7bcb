"""Whole-cluster properties (hypothesis): random DAGs, mappings, stop and cancellation points.

The cluster runs in one ``trio.run`` on the memory transport (nodes inline), so
the nodes report what they did through this module's globals.
"""

from __future__ import annotations

import itertools
import threading
from collections import defaultdict

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chimera as cp
from chimera._manager import AsyncManager
from chimera._worker import AsyncWorker

#: Per node name: the followed input's values it stepped on, its teardowns, its emissions.
STEPPED: dict[str, list[int]] = defaultdict(list)
TEARDOWNS: dict[str, int] = defaultdict(int)
PREPPED: set[str] = set()
EMITTED: dict[str, int] = defaultdict(int)
SOURCES_DONE: dict[str, threading.Event] = {}

_runs = itertools.count()


class Source(cp.Node):
    """Emits 1..n, then idles."""

    def __init__(self, name: str, n: int) -> None:
        super().__init__(name)
        self.n = n

    def prep(self):
        PREPPED.add(self.name)

    def step(self):
        if EMITTED[self.name] == self.n:
            SOURCES_DONE[self.name].set()
            threading.Event().wait(0.001)
            return None
        EMITTED[self.name] += 1
        return EMITTED[self.name]

    def teardown(self):
        TEARDOWNS[self.name] += 1


class Relay(cp.Node):
    """Steps on its followed input; emits its own step count."""

    def __init__(self, name: str, follow: str) -> None:
        super().__init__(name)
        self.follow = follow

    def prep(self):
        PREPPED.add(self.name)

    def step(self, data_chunks):
        STEPPED[self.name].append(data_chunks[self.follow].get("default")["value"])
        EMITTED[self.name] += 1
        return EMITTED[self.name]

    def teardown(self):
        TEARDOWNS[self.name] += 1


@st.composite
def clusters(draw):
    """(graph, nodes by name, {node: followed input}, mapping, workers, sources' n)."""
    run = next(_runs)
    count = draw(st.integers(2, 5))
    names = [f"r{run}n{i}" for i in range(count)]
    inputs: dict[str, list[str]] = {name: [] for name in names}
    for j in range(1, count):
        for i in range(j):
            if draw(st.booleans()):
                inputs[names[j]].append(names[i])
    follows = {name: draw(st.sampled_from(sources)) for name, sources in inputs.items() if sources}
    nodes = {}
    ns = {}
    for name in names:
        if inputs[name]:
            nodes[name] = Relay(name, follows[name])
        else:
            ns[name] = draw(st.integers(1, 6))
            nodes[name] = Source(name, ns[name])
    graph = cp.Graph()
    graph.add_nodes_from(nodes.values())
    for name in names:
        for src in inputs[name]:
            graph.add_edge(nodes[src], nodes[name], follow=follows[name] == src)
    workers = [f"w{i}" for i in range(draw(st.integers(1, 3)))]
    mapping: dict[str, list[str]] = {}
    for name in names:
        mapping.setdefault(draw(st.sampled_from(workers)), []).append(name)
    return graph, nodes, follows, mapping, workers, ns


async def _serve_worker(worker, manager, task_status=trio.TASK_STATUS_IGNORED):
    async with worker:
        assert await worker.connect(manager.host, manager.port)
        task_status.started()
        await trio.sleep_forever()


async def _run_cluster(tmp_path, graph, mapping, workers, sources, cancel_after):
    with trio.fail_after(60):
        return await _run_cluster_unbounded(
            tmp_path, graph, mapping, workers, sources, cancel_after
        )


async def _run_cluster_unbounded(tmp_path, graph, mapping, workers, sources, cancel_after):
    async with AsyncManager(tmp_path, port=0, transport="memory") as manager:
        async with trio.open_nursery() as nursery:
            for name in workers:
                await nursery.start(_serve_worker, AsyncWorker(name), manager)
            await manager.wait_for_workers(len(workers))
            with trio.CancelScope() as scope:
                if cancel_after is not None:

                    async def cancel_later():
                        for _ in range(cancel_after):
                            await trio.lowlevel.checkpoint()
                        scope.cancel()

                    nursery.start_soon(cancel_later)
                await manager.commit_graph(graph, mapping)
                await manager.start()
                for name in sources:
                    await trio.to_thread.run_sync(SOURCES_DONE[name].wait, 10)
                await manager.stop()
                await manager.shutdown()
            nursery.cancel_scope.cancel()
    return scope.cancelled_caught


def _chimera_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("chimera-")]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(cluster=clusters(), cancel_after=st.none() | st.integers(0, 400))
def test_every_chunk_is_stepped_once_in_order_and_every_teardown_runs_once(
    tmp_path, cluster, cancel_after
):
    graph, nodes, follows, mapping, workers, sources = cluster
    for name in sources:
        SOURCES_DONE[name] = threading.Event()
    cancelled = trio.run(_run_cluster, tmp_path, graph, mapping, workers, sources, cancel_after)
    for name in nodes:
        # teardown runs exactly once for a node whose prep ran, never otherwise.
        assert TEARDOWNS[name] == (1 if name in PREPPED else 0), name
    if not cancelled:
        # Stopped, not cancelled: under RELIABLE, every chunk of the followed
        # input was stepped on, once, in order.
        for name, follow in follows.items():
            assert STEPPED[name] == list(range(1, EMITTED[follow] + 1)), name
    assert _chimera_threads() == []
