"""A ChimeraPy-style script: counter -> doubler -> printer, on one machine.

Run it with ``python examples/simple_pipeline.py``. The only change from a
ChimeraPy 0.0.10 script is the import.
"""

import tempfile
import time

import chimera as cp


class Counter(cp.Node):
    def prep(self):
        self.count = 0

    def step(self):
        time.sleep(0.1)  # a source sets its own rate
        self.count += 1
        return self.count


class Doubler(cp.Node):
    def step(self, data_chunks):
        return 2 * data_chunks["counter"].get("default")["value"]


class Printer(cp.Node):
    def step(self, data_chunks):
        print("printer got", data_chunks["doubler"].get("default")["value"], flush=True)


def main(seconds: float = 2.0) -> None:
    counter, doubler, printer = (
        Counter(name="counter"),
        Doubler(name="doubler"),
        Printer(name="printer"),
    )
    graph = cp.Graph()
    graph.add_nodes_from([counter, doubler, printer])
    graph.add_edges_from([(counter, doubler), (doubler, printer)])

    # The logdir (nodes.log; a session folder, had the nodes saved anything)
    # is a temporary one here: nothing is recorded.
    with tempfile.TemporaryDirectory(prefix="chimera-") as logdir:
        manager = cp.Manager(logdir=logdir, port=0)
        worker = cp.Worker(name="local", port=0)
        try:
            worker.connect(host=manager.host, port=manager.port)
            manager.commit_graph(graph, mapping={worker.id: ["counter", "doubler", "printer"]})
            manager.start()
            time.sleep(seconds)
            manager.stop()
        finally:
            manager.shutdown()
            worker.shutdown()


if __name__ == "__main__":
    main()
