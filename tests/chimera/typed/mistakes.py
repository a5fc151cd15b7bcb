"""Mistakes in code using chimera that a type checker must report: each line
that must be reported ends with ``# error: CODE`` (mypy's error code)."""

from __future__ import annotations

import chimera as cp


async def main() -> None:
    graph = cp.Grpah()  # error: attr-defined
    async with cp.AsyncManager("logs", port=0) as manager:
        await manager.comit_graph(graph, {})  # error: attr-defined
    cp.Manager("logs", hots="0.0.0.0")  # error: call-arg
    cp.Manager("logs", transport="tpc")  # error: arg-type
    cp.Graph().add_edge(cp.Node("a"), cp.Node("b"), delivery="lastest")  # error: arg-type
    worker = cp.Worker("w", port=0)
    connected: str = worker.connect("127.0.0.1", 9000)  # error: assignment
    del connected
    cp.DataChunk().add("frame", b"", "imgae")  # error: arg-type
