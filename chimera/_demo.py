"""``chimera demo``: a Manager and a Worker on this machine record a multimodal session.

A camera (a test pattern unless ``--camera INDEX``), a microphone (a tone
unless ``--microphone DEVICE``), a 100 Hz sensor, and the motion energy of the
camera's frames; recorded for ``--seconds``, collected, and summed up.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

__all__ = ["run_demo"]


async def run_demo(
    seconds: float = 10.0,
    logdir: str | Path = "chimera-sessions",
    camera: int | None = None,
    microphone: int | str | None = None,
    say: Callable[[str], None] = print,
    enough: trio.Event | None = None,
) -> Path | None:
    """Record a session of *seconds* (less if *enough* is set meanwhile); say
    how it goes; return the session's folder (None if *enough* was set
    before the recording began: nothing is recorded then).

    Raises:
        NodeError: a node failed to start (no such camera, no sounddevice, ...).
        ValueError: *seconds* is not positive.
    """
    from . import nodes
    from ._graph import Graph
    from ._manager import AsyncManager
    from ._worker import AsyncWorker

    if not seconds > 0:
        raise ValueError(f"seconds is positive, not {seconds!r}")
    graph = Graph()
    graph.add_edge(nodes.Camera("camera", index=camera), nodes.MotionEnergy("motion", "camera"))
    graph.add_nodes_from(
        [nodes.Microphone("microphone", device=microphone), nodes.Sensor("sensor")]
    )
    mapping = {"local": ["camera", "motion", "microphone", "sensor"]}
    async with AsyncManager(Path(logdir), port=0, transport="tcp") as manager:
        async with AsyncWorker("local") as worker:
            if not await worker.connect(manager.host, manager.port):
                raise RuntimeError("the demo's Worker could not reach its Manager")
            await manager.wait_for_workers(1)
            await worker.wait_for_clock(8)
            say(f"manager on {manager.host}:{manager.port}, worker 'local': starting 4 nodes")
            await manager.commit_graph(graph, mapping)
            enough = trio.Event() if enough is None else enough
            if enough.is_set():
                await manager.shutdown()
                say("stopped before the recording began: nothing recorded")
                return None
            await manager.start()
            started = time.monotonic()
            while (elapsed := time.monotonic() - started) < seconds:
                with trio.move_on_after(min(1.0, seconds - elapsed)):
                    await enough.wait()
                elapsed = time.monotonic() - started
                if enough.is_set():  # (not a progress line: that second's was said)
                    say(f"stopped after {elapsed:.1f} s")
                    break
                say(_progress(manager.state()["nodes"], min(elapsed, seconds), seconds))
            await manager.stop()
            say("collecting ...")
            await manager.collect()
            session = manager.session_folder()
            await manager.shutdown()  # before the Worker leaves: it leaves no nodes behind
    meta = json.loads((session / "meta.json").read_text())
    for line in summary(meta, session):
        say(line)
    say(f"session: {session}")
    return session


def _progress(states: list[dict[str, Any]], elapsed: float, seconds: float) -> str:
    parts = [f"{n['name']} {n['steps']} steps ({n['fps']:.0f}/s)" for n in states if n["fps"]]
    return f"recording {elapsed:4.0f}/{seconds:.0f} s: " + (", ".join(parts) or "starting")


def summary(meta: dict[str, Any], session: Path) -> list[str]:
    """A table of the streams of a collected session: node, stream, file,
    count, rate, size, drops."""
    rows = [("node", "stream", "file", "count", "rate /s", "MB", "drops")]
    for node, info in sorted(meta["streams"].items()):
        for stream in info["streams"]:
            size = _size(session / node / stream["file"])  # a file, or a folder of images
            rate = f"{stream['rate']:.1f}" if stream["rate"] else "-"
            rows.append(
                (
                    node,
                    stream["stream"],
                    stream["file"],
                    str(stream["count"]),
                    rate,
                    f"{size / 1e6:.2f}",
                    str(info["dropped"]),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(map(str.ljust, row, widths)) for row in rows]


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0
