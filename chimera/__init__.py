"""chimera: distributed, real-time, multimodal data collection on Trio.

The Manager, the Worker and the Graph are imported on first use (PEP 562):
they pull in hypercorn and networkx, which a node's process never needs, and
a node's process starts faster without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._data import DataChunk, DecodeError, cluster_time_ns
from ._errors import CommitGraphError, NodeError, WorkerLeftError
from ._logging import debug
from ._node import Node, NodeState
from ._version import __version__

# Tracebacks name the errors as they are imported: chimera.NodeError, not
# chimera._errors.NodeError (pickles too: chimera has them).
for _error in (CommitGraphError, DecodeError, NodeError, WorkerLeftError):
    _error.__module__ = __name__
del _error

if TYPE_CHECKING:
    from ._blocking import Manager, Worker
    from ._graph import Graph
    from ._manager import AsyncManager, WorkerInfo
    from ._worker import AsyncWorker

#: Public names imported on first use, and their modules.
_LAZY = {
    "AsyncManager": "._manager",
    "AsyncWorker": "._worker",
    "Graph": "._graph",
    "Manager": "._blocking",
    "Worker": "._blocking",
    "WorkerInfo": "._manager",
}

__all__ = [
    "AsyncManager",
    "AsyncWorker",
    "CommitGraphError",
    "DataChunk",
    "DecodeError",
    "Graph",
    "Manager",
    "Node",
    "NodeError",
    "NodeState",
    "Worker",
    "WorkerInfo",
    "WorkerLeftError",
    "__version__",
    "cluster_time_ns",
    "debug",
]


if not TYPE_CHECKING:  # (type checkers see the imports above: a misspelt name is an error)

    def __getattr__(name: str) -> Any:
        try:
            module = _LAZY[name]
        except KeyError:
            raise AttributeError(f"module 'chimera' has no attribute {name!r}") from None
        value = getattr(importlib.import_module(module, __name__), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted(__all__)
