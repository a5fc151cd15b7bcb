"""ChimeraPy's ``cp.debug()``: chimera's own records, DEBUG and up, on the console."""

from __future__ import annotations

import logging

__all__ = ["debug"]


def debug(loggers: list[str] | None = None) -> None:
    """Log the DEBUG records of chimera's loggers (ChimeraPy's ``debug()``).

    Sets *loggers* (by default ``["chimera", "chimera.node"]``: the Manager's,
    the Workers' and the nodes') to DEBUG, and, if the root logger has no
    handler yet, gives it one to stderr. Node processes take their Worker's
    levels when each node is made: call this before ``commit_graph``.
    """
    for name in loggers if loggers is not None else ["chimera", "chimera.node"]:
        logging.getLogger(name).setLevel(logging.DEBUG)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
