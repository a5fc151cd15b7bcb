"""chimera: distributed, real-time, multimodal data collection on Trio."""

from ._data import DataChunk, DecodeError
from ._errors import CommitGraphError, NodeError
from ._graph import Graph
from ._node import Node, NodeState
from ._version import __version__

__all__ = [
    "CommitGraphError",
    "DataChunk",
    "DecodeError",
    "Graph",
    "Node",
    "NodeError",
    "NodeState",
    "__version__",
]
