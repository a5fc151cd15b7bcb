"""The errors the cluster raises to its user."""

from __future__ import annotations

__all__ = ["SAID_WHOLE", "CommitGraphError", "NodeError", "WorkerLeftError"]


class NodeError(Exception):
    """A node's own code raised: ``prep``, ``step`` or ``teardown``.

    Attributes:
        node_name: the node's name.
        message: what went wrong (the text after the node's name).
        traceback: the traceback of the exception, as text (it may come from
            another process or machine).
    """

    def __init__(self, node_name: str, message: str, traceback: str = "") -> None:
        super().__init__(f"node {node_name!r}: {message}")
        self.node_name = node_name
        self.message = message
        self.traceback = traceback
        if traceback:
            # Printed above this error, as its cause, when it goes unhandled
            # (raised ``from`` the exception itself where that is at hand).
            self.__cause__ = RemoteTraceback(traceback)

    def __reduce__(self):  # keep the attributes across pickling
        return (type(self), (self.node_name, self.message, self.traceback))


class RemoteTraceback(Exception):
    """The traceback of a node's exception, as text: the cause of a
    :class:`NodeError` from a node's process or another machine."""

    def __str__(self) -> str:
        return f'\n"""\n{self.args[0].rstrip()}\n"""'


class WorkerLeftError(RuntimeError):
    """A Worker left -- it shut down, or its connection was lost -- while a
    call needed it (its nodes are gone: FAILED, or SHUTDOWN if it closed them)."""


class CommitGraphError(ValueError):
    """``commit_graph`` was given a graph or a mapping it cannot run; nothing was started.

    Attributes:
        problems: one sentence per problem found.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("cannot commit the graph: " + "; ".join(problems))
        self.problems = list(problems)

    def __reduce__(self):
        return (type(self), (self.problems,))


#: The errors whose message says all there is for the user (with, for a
#: NodeError, the node's own traceback): a public call raises them without
#: the frames of chimera they came through.
SAID_WHOLE = (CommitGraphError, NodeError, WorkerLeftError)
