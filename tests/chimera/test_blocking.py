"""The blocking API: a ChimeraPy script, unchanged but for its import, runs and cleans up."""

from __future__ import annotations

import runpy
import socket
import threading
from pathlib import Path

import pytest

import chimera as cp

RECEIVED: list[int] = []
GOT_TEN = threading.Event()


class Source(cp.Node):
    def prep(self):
        self.n = 0

    def step(self):
        if self.n == 10:
            threading.Event().wait(0.001)
            return None
        self.n += 1
        return self.n


class Sink(cp.Node):
    def step(self, data_chunks):
        RECEIVED.append(data_chunks["source"].get("default")["value"])
        if len(RECEIVED) == 10:
            GOT_TEN.set()


def chimera_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("chimera-")]


def test_manager_and_worker_run_a_graph_and_leave_nothing_behind(tmp_path):
    RECEIVED.clear()
    source, sink = Source("source"), Sink("sink")
    graph = cp.Graph()
    graph.add_edge(source, sink)
    manager = cp.Manager(logdir=tmp_path, port=0)
    worker = cp.Worker(name="local", port=0)
    try:
        assert worker.connect(host=manager.host, port=manager.port)
        assert manager.commit_graph(graph, mapping={worker.id: ["source", "sink"]})
        assert manager.start()
        assert GOT_TEN.wait(20)
        assert manager.stop()
        assert worker.nodes == {source.id: cp.NodeState.STOPPED, sink.id: cp.NodeState.STOPPED}
    finally:
        manager.shutdown()
        worker.shutdown()
    assert RECEIVED == list(range(1, 11))
    assert chimera_threads() == []
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", manager.port)) != 0
    manager.shutdown()  # twice is harmless
    with pytest.raises(RuntimeError, match="shut down"):
        manager.start()


def test_the_simple_pipeline_example_runs(capsys):
    example = Path(__file__).parents[2] / "examples" / "simple_pipeline.py"
    runpy.run_path(str(example))["main"](seconds=0.5)
    lines = capsys.readouterr().out.splitlines()
    assert lines and lines[0] == "printer got 2"
    assert [int(line.split()[-1]) for line in lines] == [2 * i for i in range(1, len(lines) + 1)]
    assert chimera_threads() == []
