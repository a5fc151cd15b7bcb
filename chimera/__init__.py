"""chimera: distributed, real-time, multimodal data collection on Trio."""

from ._blocking import Manager, Worker
from ._data import DataChunk, DecodeError
from ._errors import CommitGraphError, NodeError
from ._graph import Graph
from ._manager import AsyncManager
from ._node import Node, NodeState
from ._version import __version__
from ._worker import AsyncWorker

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
    "__version__",
]
