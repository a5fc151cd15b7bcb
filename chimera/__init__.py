"""chimera: distributed, real-time, multimodal data collection on Trio."""

from ._version import __version__

__all__ = ["__version__"]
