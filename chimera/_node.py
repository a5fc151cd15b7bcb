"""What users subclass: :class:`Node`, and the states a node goes through.

A node is user code -- a camera reader, a detector, a logger -- that the
cluster runs: ``prep()`` once, then ``step()`` again and again, then
``teardown()`` once. This module holds only the user's side of it; the node
runtime calls these methods (in a thread: they may block; or, if they are
``async def``, on its event loop).
"""

from __future__ import annotations

import enum
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import trio

from ._data import DataChunk
from ._recording import Recorder, check_name

__all__ = ["Node", "NodeState"]

#: The values of ``Node(debug=...)``.
_DEBUG_MODES = (None, "step", "stream")

#: The parent of every node's logger. Nodes log at INFO and above unless its
#: level is set otherwise (ChimeraPy's nodes did: ``logging_level=20``).
NODE_LOGGER = "chimera.node"
if logging.getLogger(NODE_LOGGER).level == logging.NOTSET:
    logging.getLogger(NODE_LOGGER).setLevel(logging.INFO)
#: The ids of the Workers running in this process. Each logs its nodes'
#: records here (under :data:`NODE_LOGGER`): a Manager in this process does
#: not log them a second time.
WORKERS_HERE: set[str] = set()


class NodeState(str, enum.Enum):
    """Where a node is in its life, as the Manager reports it.

    A node goes INITIALIZED -> CONNECTED -> READY -> RUNNING -> STOPPED ->
    (SAVED) -> SHUTDOWN; FAILED can follow any of them, with a reason.
    """

    #: Created on its Worker; its outlet (if any) is bound.
    INITIALIZED = "INITIALIZED"
    #: Its inlets are connected to the outlets of its inputs.
    CONNECTED = "CONNECTED"
    #: ``prep()`` returned.
    READY = "READY"
    #: Stepping.
    RUNNING = "RUNNING"
    #: Stepping ended; ``teardown()`` returned.
    STOPPED = "STOPPED"
    #: Its recordings are complete on disk.
    SAVED = "SAVED"
    #: Gone, and everything it held released.
    SHUTDOWN = "SHUTDOWN"
    #: ``prep``, ``step`` or ``teardown`` raised, or its process died.
    FAILED = "FAILED"


def _run_by_hand(method: Callable[[], Any]) -> Any:
    """Call one of a node's methods outside a cluster, in a Trio run of its
    own if it is ``async def``; what it returns."""
    if inspect.iscoroutinefunction(method):
        return trio.run(method)
    return method()


class Node:
    """A step of a pipeline: override :meth:`prep`, :meth:`step` and :meth:`teardown`.

    A node without inputs (a source) steps in a loop, as fast as ``step``
    returns: sleep in ``step`` to set a rate. A node with inputs steps when its
    followed input (see :meth:`chimera.Graph.add_edge`) delivers a new chunk,
    once every input has delivered at least one. Whatever ``step`` returns is
    sent to the node's outputs: a :class:`~chimera.DataChunk` as it is, any
    other value as the record ``"default"`` of a new chunk, ``None`` nothing.

    ``prep``, ``step`` and ``teardown`` run in a thread of their own, so they
    may block (on a camera, a model, a file). Each of them (and ``main``) may
    instead be ``async def``: it then runs on the node's Trio event loop,
    with no hand-off to a thread (the lowest latency), and must never block.

    Args:
        name: the node's name, unique in its graph; it names the node's
            folder in a session, so it must be able to name a file.
        debug: ChimeraPy's debug mode, ``None``, ``"step"`` or ``"stream"``.
            With ``"step"`` the node is to be run by hand, and the
            constructor runs :meth:`prep` (as ChimeraPy's did): then call
            :meth:`step`, then :meth:`shutdown`. ``"stream"`` is accepted
            and does nothing.
        debug_port: kept for compatibility.

    Raises:
        TypeError: *name* is not a str, or *debug_port* not an int.
        ValueError: *name* cannot name a file (empty, ``.``, ``..``, or with
            ``/``, ``\\`` or NUL), or *debug* is not one of the modes above.
        Exception: with ``debug="step"``, whatever :meth:`prep` raised.
    """

    def __init__(
        self,
        name: str,
        debug: Literal["step", "stream"] | None = None,
        debug_port: int | None = None,
    ) -> None:
        check_name(name, "node name")
        if debug not in _DEBUG_MODES:
            raise ValueError(f"debug must be one of {list(_DEBUG_MODES)}, not {debug!r}")
        if debug_port is not None and (
            not isinstance(debug_port, int) or isinstance(debug_port, bool)
        ):
            raise TypeError(f"debug_port is an int or None, not {type(debug_port).__name__}")
        self._name = name
        self._id = uuid.uuid4().hex
        self.debug = debug
        self.debug_port = debug_port
        #: Where the node is in its life (set by the runtime).
        self.state = NodeState.INITIALIZED
        #: The node's logger: what it logs reaches its Worker and the Manager.
        self.logger = logging.getLogger(f"{NODE_LOGGER}.{name}")
        #: For a node that overrides :meth:`main`: whether it should go on,
        #: the latest chunk of each input, and whether a new one came.
        self.running = False
        self.in_bound_data: dict[str, DataChunk] = {}
        self.new_data_available = False
        #: Where save_* goes (set by the node's runtime), and whether it records now.
        self._recorder: Recorder | None = None
        self._recording = False
        #: Whether it said that a save was not recorded (once).
        self._said_unrecorded = False
        #: Whether it steps offline (``manager.step()``) now: what it saves is not
        #: recorded, which is said as a warning (a ChimeraPy script may expect it).
        self._offline = False
        #: Whether a runtime runs the node (in a cluster); else it is run by hand.
        self._in_cluster = False
        if debug == "step":
            _run_by_hand(self.prep)

    @property
    def id(self) -> str:
        """A unique id, made when the node is created."""
        return self._id

    @property
    def name(self) -> str:
        return self._name

    def get_logger(self) -> logging.Logger:
        """The node's logger (as :attr:`logger`; ChimeraPy's spelling)."""
        return self.logger

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name!r} {self.state.value}>"

    # --- what users override -------------------------------------------------

    # (Typed so that every documented override checks: ``def`` or ``async
    # def``, and ``step`` with or without ``data_chunks``.)

    def prep(self) -> Awaitable[None] | None:
        """Set up: open devices and files, load models. Runs once, before any step."""

    def step(self, *args: Any, **kwargs: Any) -> Any:
        """Produce (a source) or process (a node with inputs) one chunk.

        A source overrides ``step(self)``; a node with inputs
        ``step(self, data_chunks)``: ``data_chunks`` maps each input node's
        name to its latest chunk (a ``dict[str, DataChunk]``).

        Returns:
            A :class:`~chimera.DataChunk`, another value (sent as the record
            ``"default"``), or ``None`` (nothing is sent).
        """
        return None

    def teardown(self) -> Awaitable[None] | None:
        """Release what :meth:`prep` opened. Runs once, after the last step."""

    def main(self) -> Awaitable[None] | None:
        """Override to run a loop of your own instead of :meth:`step`.

        A node that overrides ``main`` is not stepped: ``main`` runs once, in
        the node's thread, between ``prep`` and ``teardown``, and should
        return once :attr:`running` is False -- when the node is asked to stop
        (a source), its followed input has ended, or the cluster shuts down.
        Each chunk of the followed input replaces :attr:`in_bound_data` (the
        latest chunk of each input, by name) and sets :attr:`new_data_available`,
        which ``main`` clears once it has used the data. Nothing ``main`` does
        is sent to the node's outputs; it records (``save_*``) or acts.
        """

    def shutdown(self, msg: dict | None = None) -> None:
        """End a node run by hand, outside a cluster (ChimeraPy's standalone
        use: ``prep()``, then ``step()`` calls, then ``shutdown()``): runs
        :meth:`teardown` once and sets :attr:`running` False. *msg* is
        ChimeraPy's, and ignored.

        Raises:
            RuntimeError: the node runs in a cluster (its Manager's
                ``shutdown`` ends it there).
        """
        if self._in_cluster:
            raise RuntimeError(
                f"node {self._name!r} runs in a cluster: the Manager's shutdown() ends it"
            )
        self.running = False
        if self.state is NodeState.SHUTDOWN:
            return
        self.state = NodeState.SHUTDOWN
        _run_by_hand(self.teardown)

    # --- recording --------------------------------------------------------------
    #
    # Each call queues the data for the stream's writer (a thread of its own) in
    # the node's folder on its Worker, stamped with cluster time; see
    # chimera._recording for the files. While the cluster previews (not
    # recording), the calls save nothing.

    def save_video(self, name: str, data: Any, fps: float) -> None:
        """Append a frame (uint8 HxWx3 BGR, or HxW) to ``NAME.mp4`` (H.264).

        Raises:
            ValueError: the frame is not such an array, or not of the first
                frame's size; *fps* is not a number in (0, 1000], or not the
                first save's; *name* cannot be a file name.
        """
        self._save("video", name, data, fps=fps)

    def save_audio(
        self, name: str, data: Any, channels: int, format: int | None, rate: int
    ) -> None:
        """Append a block of samples -- (frames, channels), interleaved, or
        PyAudio's bytes -- to ``NAME.wav``. *format* is a PyAudio sample format
        (paInt16 = 8, paInt24 = 4, paInt32 = 2, paFloat32 = 1), or None for
        the array's dtype; *rate* in Hz.

        Raises:
            ValueError: the block does not fit *channels* or the format, or
                the settings are not the first save's.
        """
        self._save("audio", name, data, channels=channels, format=format, rate=rate)

    def save_image(self, name: str, data: Any) -> None:
        """Save an image (uint8 HxW, HxWx3 BGR or HxWx4) as the next of
        ``NAME/000000.png``, ``NAME/000001.png``, ..."""
        self._save("image", name, data)

    def save_tabular(self, name: str, data: Any) -> None:
        """Append rows -- a DataFrame, or one row as a Series or a dict -- to
        ``NAME.csv``, after a ``timestamp_ns`` column.

        Raises:
            ValueError: the columns differ from the first rows'.
        """
        self._save("table", name, data)

    def save_json(self, name: str, data: Any) -> None:
        """Append one JSON value as a line of ``NAME.jsonl``."""
        self._save("json", name, data)

    def save_text(self, name: str, data: str, suffix: str = "txt") -> None:
        """Append *data* to ``NAME.SUFFIX``."""
        self._save("text", name, data, suffix=suffix)

    def _save(self, kind: str, name: str, data: Any, **params: Any) -> None:
        recorder = self._recorder
        if recorder is None:
            raise RuntimeError(f"node {self._name!r}: save_* works once the node runs in a cluster")
        if self._recording:
            recorder.save(kind, name, data, **params)
        elif not self._said_unrecorded:
            self._said_unrecorded = True
            self.logger.log(
                logging.WARNING if self._offline else logging.INFO,
                "%s %r is not recorded: saves are recorded in prep, and from start() (or "
                "record()) until stop(); not after prep until then, while previewing, or in "
                "step() (said once)",
                kind,
                name,
            )
