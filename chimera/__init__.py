"""chimera: distributed, real-time, multimodal data collection on Trio."""

from ._graph import Graph
from ._version import __version__

__all__ = ["Graph", "__version__"]
