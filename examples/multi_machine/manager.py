"""The Manager's side of a pipeline across machines: a camera-like source on one
Worker, a processing node and a sink on another; what they record is collected
into one session folder here.

Start it first; it waits for the two Workers (see README.md)::

    python manager.py --host 0.0.0.0 --port 9000 --workers lab-pc,analysis-pc

then run ``chimera worker --name lab-pc --manager MANAGER_HOST:9000`` on one
machine and ``chimera worker --name analysis-pc ...`` on the other.

Nodes are defined in this file; they travel to the Workers by value
(cloudpickle), so the Workers need chimera and numpy, not this file.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import chimera as cp


class Camera(cp.Node):
    """A stand-in camera: a 480p frame 30 times a second."""

    def prep(self):
        self.index = 0
        self.next = time.perf_counter()

    def step(self):
        self.next += 1 / 30  # 30 frames a second, however long the rest takes
        time.sleep(max(0.0, self.next - time.perf_counter()))
        self.index += 1
        frame = np.full((480, 640, 3), self.index % 256, dtype=np.uint8)
        self.save_video("camera", frame, fps=30)  # on the camera's machine, until collect
        chunk = cp.DataChunk()
        chunk.add("frame", frame, "image")
        return chunk


class Brightness(cp.Node):
    """Mean brightness of each frame."""

    def step(self, data_chunks):
        value = float(data_chunks["camera"].get("frame")["value"].mean())
        self.save_tabular("brightness", {"brightness": value})
        return value


class Report(cp.Node):
    """Logs the brightness once a second (in the Manager's nodes.log)."""

    def prep(self):
        self.count = 0

    def step(self, data_chunks):
        self.count += 1
        if self.count % 30 == 0:
            record = data_chunks["brightness"].get("default")
            self.logger.info("brightness %.1f at %d ns", record["value"], record["timestamp"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on: 0.0.0.0 for other machines"
    )
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--token", default=None, help="a secret the Workers must present")
    parser.add_argument("--workers", default="lab-pc,analysis-pc", help="two Worker names")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--logdir", default="chimera-sessions", help="where the session goes")
    args = parser.parse_args()
    first, second = args.workers.split(",")

    camera, brightness, report = Camera("camera"), Brightness("brightness"), Report("report")
    graph = cp.Graph()
    graph.add_nodes_from([camera, brightness, report])
    graph.add_edges_from([(camera, brightness), (brightness, report)])

    manager = cp.Manager(logdir=args.logdir, port=args.port, host=args.host, token=args.token)
    try:
        print(f"manager on port {manager.port}; waiting for workers {first!r} and {second!r}")
        while {w.name for w in manager.workers.values()} < {first, second}:
            time.sleep(0.5)
        manager.commit_graph(graph, {first: ["camera"], second: ["brightness", "report"]})
        manager.start()
        time.sleep(args.seconds)
        manager.stop()
        if not manager.collect():  # every node's files, from every machine, verified
            print("a Worker left before its nodes' files were collected (see meta.json)")
        print(f"session: {manager.session_folder()}; node logs: {manager.logdir / 'nodes.log'}")
    finally:
        manager.shutdown()


if __name__ == "__main__":
    main()
