"""Code using chimera as its docs and examples show: it must type-check (see
``test_typing.py``). Never run."""

from __future__ import annotations

import numpy as np
import trio

import chimera as cp


class Counter(cp.Node):
    def prep(self) -> None:
        self.count = 0

    def step(self) -> int:
        self.count += 1
        return self.count


class Camera(cp.Node):
    async def prep(self) -> None:
        await trio.sleep(0.001)

    def step(self) -> cp.DataChunk:
        chunk = cp.DataChunk()
        chunk.add("frame", np.zeros((4, 4, 3), dtype=np.uint8), "image")
        return chunk

    async def teardown(self) -> None:
        await trio.sleep(0.001)


class Doubler(cp.Node):
    def step(self, data_chunks: dict[str, cp.DataChunk]) -> cp.DataChunk:
        value = data_chunks["counter"].get("default")["value"]
        chunk = cp.DataChunk()
        chunk.add("doubled", value * 2)
        return chunk


class Printer(cp.Node):
    async def step(self, data_chunks: dict[str, cp.DataChunk]) -> None:
        self.logger.info("%s", data_chunks)


class Untyped(cp.Node):
    def step(self, data_chunks):  # type: ignore[no-untyped-def]
        return data_chunks["counter"]


def blocking(logdir: str) -> bool:
    counter, doubler, printer = Counter("counter"), Doubler("doubler"), Printer("printer")
    graph = cp.Graph()
    graph.add_nodes_from([counter, doubler, printer])
    graph.add_edges_from([(counter, doubler), [doubler, printer]])
    graph.add_edge(counter, printer, delivery="latest")
    manager = cp.Manager(logdir, port=0, host="127.0.0.1", transport="tcp")
    worker = cp.Worker("local", port=0)
    worker.connect(manager.host, manager.port)
    ok = manager.commit_graph(graph, {"local": ("counter", "doubler", "printer")})
    info: dict[str, cp.WorkerInfo] = manager.workers
    ok = ok and manager.start() and manager.stop() and manager.collect()
    for node in graph.nodes:
        print(node.name, node.state)
    manager.shutdown()
    worker.shutdown()
    return ok and bool(info)


async def trio_native(logdir: str) -> bool:
    graph = cp.Graph()
    graph.add_edge(Camera("camera"), Printer("printer"), follow=True)
    async with cp.AsyncManager(logdir, port=0) as manager, cp.AsyncWorker("local") as worker:
        await worker.connect(manager.host, manager.port)
        committed: bool = await manager.commit_graph(graph, {"local": ["camera", "printer"]})
        return committed and await manager.start()
