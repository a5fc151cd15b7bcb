"""Runs one :class:`~chimera.Node`: its outlet, its inlets, and its user code.

:class:`NodeRuntime` is the node's side of the lifecycle the Worker drives::

    async with NodeRuntime(node, inputs=[...], outputs=2) as runtime:
        runtime.address                      # where the node's outputs connect
        await runtime.connect({...})         # inlets to the inputs' outlets
        await runtime.prep()
        await runtime.run()                  # until stopped, or its inputs end

It runs in the caller's Trio loop: inline in a Worker (the ``memory``
transport, tests) or as the whole of a node's child process. The user's
``prep``, ``step`` and ``teardown`` run on the node's thread (they may block),
or, written ``async def``, on the loop itself (no hand-off to a thread: the
lowest latency).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import (
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import trio

import transports

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

from ._batch import pack_batch, unpack_batch
from ._data import DataChunk, DecodeError, Frame, decode_chunk, encode_chunk
from ._errors import NodeError
from ._node import Node, NodeState
from ._recording import Recorder, StreamInfo
from ._service import run_all, single_exception, unwrapped
from ._user_thread import Result, StepLoop, UserThread

__all__ = ["Input", "NodeRuntime"]

log = logging.getLogger("chimera.runtime")

#: Longest wait for a node's ``teardown`` when its run is cancelled.
TEARDOWN_TIMEOUT = 10.0
#: How often a node with an ``async def step`` checks that its event loop is
#: not held up, and from how long a hold-up it says so, in seconds.
LOOP_CHECK = 0.25
LOOP_HELD = 1.0
#: Steps a node keeps in flight (queued on its thread, or done and not yet
#: sent) while its chunks are small: they then travel in batches...
STEPS_IN_FLIGHT = 64
#: ...and once they are larger than this many bytes...
LARGE_CHUNK = 256 * 1024
#: ...a source steps only once its last chunk has left, so that each is fresh...
LARGE_SOURCE_STEPS = 1
#: ...and a node with inputs keeps a few of their chunks in hand.
LARGE_INPUT_STEPS = 4
#: A node following a LATEST input takes its next chunk once its step is
#: done: it steps on the newest, not on chunks queued while it stepped.
LATEST_STEPS = 1
#: Steps queued on a node's thread only spare it waiting for the event loop
#: between short steps; behind a slow node they are a backlog. So a node
#: whose steps take long keeps fewer in flight: about this many seconds of
#: steps, and at least two (one stepping, one on its way). With 64, a 30 fps
#: camera feeding a 5 Hz detector stood still ~13 s at a time (its frames
#: queued at both ends), then made 64 frames at once.
STEPS_AHEAD_SECONDS = 0.002
MIN_STEPS_IN_FLIGHT = 2
#: A node whose sending waited for room in its links for at least this share
#: of this many seconds says so in its log, once: it steps at the pace of a
#: slower node it feeds.
HELD_WINDOW = 5.0
HELD_SHARE = 0.5
#: A ``def step``'s chunk made at least this many seconds after the one
#: before goes from the node's thread at once, when it can (see
#: :meth:`NodeRuntime._finish_step`): 1 KB paced at 1 kHz, 16-47 µs less
#: from step to step, in runs that switched it every 100 ms. Chunks that
#: come faster go through the event loop, which sends those ready together
#: in one message: a source as fast as it can go made less than half as
#: many chunks a second when its thread sent each one alone.
ALONE_SECONDS = 0.0002
#: Longest wait for a node's thread to end once the node is closed.
THREAD_JOIN_TIMEOUT = 5.0

#: Each link between two nodes holds at most this many messages (batches of
#: chunks: 1 KB chunks from a source as fast as it can go reach the same rate
#: with 8 as with 64, and wait ~12 ms in the links instead of ~85)...
LINK_CAPACITY = 8
#: ...and at most about this many bytes (one message always fits): large
#: chunks stay fresh (a link holds at most two 1080p frames). Measured with
#: 1080p frames from a source as fast as it can go: ~340 fps, p50 ~4.3 ms;
#: with 8 chunks and no bound in bytes, ~315 fps, 22 ms.
LINK_MAX_BYTES = 8 * 1024 * 1024
#: A LATEST link holds only the newest message: what its node steps on is fresh.
LATEST_CAPACITY = 1
#: How many chunks of its followed input a node keeps waiting until each of
#: its other inputs has sent one (their oldest are dropped beyond)...
WAITING_CHUNKS = 256
#: ...and about how many bytes of them (ten 1080p frames).
WAITING_BYTES = 64 * 1024 * 1024

#: The bind address of a node's outlet, by transport.
_BIND = {"memory": "memory://", "tcp": "tcp://127.0.0.1:0", "nng": "nng+tcp://127.0.0.1:0"}


#: What an input's receive raises once the input has ended, or was closed
#: here (see :meth:`NodeRuntime._ended`).
_ENDS = (trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError)


def _nothing() -> None:
    pass


def _ended(outcome: Result) -> None:
    """A step loop's call returned: it tells its end itself, and raises
    nothing of the steps'; anything else is a bug, logged."""
    if outcome[1] is not None:
        log.error("a step loop broke", exc_info=outcome[1])


def _batches(chunks: list[list[Frame]]) -> Iterator[list[list[Frame]]]:
    """*chunks* (each its frames), in order, in groups that each fit one
    message: at most :data:`transports.MAX_FRAMES` frames with the batch's
    header (a chunk has fewer: see :meth:`NodeRuntime._output`)."""
    batch: list[list[Frame]] = []
    frames = 1  # (the header)
    for chunk in chunks:
        if batch and frames + len(chunk) > transports.MAX_FRAMES:
            yield batch
            batch, frames = [], 1
        batch.append(chunk)
        frames += len(chunk)
    if batch:
        yield batch


class _Waits:
    """The share of the time spent waiting, over windows of :data:`HELD_WINDOW` seconds."""

    __slots__ = ("_since", "_waited")

    def __init__(self) -> None:
        self._since: float | None = None
        self._waited = 0.0

    def add(self, started: float, ended: float) -> float | None:
        """Count a wait from *started* to *ended* (``time.perf_counter()``);
        the share of the window it ends that was spent waiting, if it ends one."""
        if self._since is None:
            self._since = started
        self._waited += ended - started
        window = ended - self._since
        if window < HELD_WINDOW:
            return None
        share = self._waited / window
        self._since, self._waited = ended, 0.0
        return share


@dataclass(frozen=True)
class _Unsendable:
    """What a step returned cannot be sent, for *error*."""

    error: Exception


@dataclass(frozen=True)
class _Sent:
    """A step's chunk, of these *frames*, that the node's thread sent itself
    (see :meth:`NodeRuntime._finish_step`)."""

    frames: list[Frame]


#: What a step's value sends (:meth:`NodeRuntime._output`): its frames, nothing
#: (None), or why it cannot be sent; or that it was sent (:class:`_Sent`).
Output = list[Frame] | _Sent | _Unsendable | None


@dataclass(frozen=True)
class Input:
    """One input of a node: the in-bound node's name and how it delivers."""

    name: str
    delivery: str = "reliable"


class NodeRuntime:
    """Runs *node* with the given *inputs* (in-bound nodes) and number of *outputs*.

    Args:
        node: the user's node.
        inputs: the node's inputs, in the order of the graph's edges.
        follow: the name of the input whose chunks make the node step; the
            first input when None.
        outputs: how many nodes receive this node's chunks; it binds an outlet
            if there is at least one, and waits for them all to connect before
            it runs, so that no chunk is sent before every output listens.
        transport: ``"memory"``, ``"tcp"`` or ``"nng"``.
        bind: the outlet's bind address (default: a fresh one on loopback).
        allow_objects: whether chunks may carry pickled objects.
        link_key: what the node's outlet requires of the inlets that connect,
            and its inlets present (see :func:`transports.bind`); None: nothing.
        folder: where the node's ``save_*`` calls write (see
            :mod:`chimera._recording`); it records once :meth:`set_recording`
            says so. Without a folder, ``save_*`` raises.
        on_state: called with the node's new state and a reason (for FAILED)
            whenever it changes.

    Raises:
        ValueError: *follow* is not one of the inputs, or *transport* unknown.
    """

    def __init__(
        self,
        node: Node,
        *,
        inputs: Sequence[Input] = (),
        follow: str | None = None,
        outputs: int = 0,
        transport: str = "memory",
        bind: str | None = None,
        allow_objects: bool = False,
        link_key: bytes | None = None,
        folder: str | None = None,
        on_state: Callable[[NodeState, str | None], None] | None = None,
    ) -> None:
        names = [i.name for i in inputs]
        if follow is not None and follow not in names:
            raise ValueError(f"follow={follow!r} is not one of the inputs {names}")
        if transport not in _BIND:
            raise ValueError(f"unknown transport {transport!r}; known: {list(_BIND)}")
        self.node = node
        node._in_cluster = True
        self._inputs = list(inputs)
        #: The inputs' names, as each step's ``data_chunks`` knows them.
        self._input_names = tuple(names)
        self._follow = follow if follow is not None else (names[0] if names else None)
        self._outputs = outputs
        self._transport = transport
        self._bind = bind or _BIND[transport]
        self._allow_objects = allow_objects
        self._link_key = link_key
        self._recorder = Recorder(Path(folder)) if folder is not None else None
        #: What each stream saved, once the recorder is closed.
        self.saved: list[StreamInfo] | None = None
        self._on_state = on_state
        self._outlet: transports.Outlet | None = None
        self._inlets: dict[str, transports.Inlet] = {}
        #: The inputs :meth:`forget` took as gone.
        self._gone: set[str] = set()
        self._delivery = {i.name: transports.Delivery(i.delivery) for i in inputs}
        #: Cancelled when a source is asked to stop (for async steps: the
        #: current step's; each step has its own).
        self._feeding = trio.CancelScope()
        self._stop_requested = False
        #: Whether ``step`` is a coroutine function: it runs on the event loop.
        self._inline = inspect.iscoroutinefunction(node.step)
        self._thread = UserThread(node.name)
        #: The most steps there may be in the loop and not yet sent on
        #: (:attr:`StepLoop.unsent`), by the chunks' size and delivery (see
        #: :meth:`_most_in_flight`).
        self._limit = STEPS_IN_FLIGHT
        #: The loop the node's steps run in, while they do.
        self._steps: StepLoop | None = None
        #: How long sending waited for room in the links.
        self._held = _Waits()
        self._said_held = False
        self._room = trio.lowlevel.ParkingLot()
        self._prepped = self._torn_down = False
        self._preparing = trio.Lock()
        #: The latest chunk of each input, and the chunks received not yet
        #: stepped on, in offline mode (:meth:`step_once`).
        self._offline_latest: dict[str, DataChunk] = {}
        self._offline_pending: deque[tuple[DataChunk, int]] = deque()
        #: The inputs found ended in offline mode.
        self._offline_ended: set[str] = set()
        #: Whether the node said it drops chunks waiting for its other inputs' first.
        self._warned_waiting = False
        #: Chunks stepped and sent, for the Manager's statistics.
        self.steps = 0
        #: Chunks of its LATEST inputs it never stepped on: the links dropped
        #: them, or a newer one came with them.
        self.dropped = 0
        #: The number of the next chunk expected from each input (a node
        #: numbers what it sends: see chimera._batch), and of the next it sends.
        self._next_chunk: dict[str, int] = {}
        self._chunks_sent = 0
        #: The number of the next chunk a ``def step`` makes on the node's
        #: thread (which alone counts it). The thread sends a chunk itself
        #: only once every chunk before it has been sent: ``_chunks_sent``
        #: changes holding ``_order``.
        self._chunks_made = 0
        self._order = threading.Lock()
        #: When the node's thread made its last chunk (``time.perf_counter()``).
        self._made_at = 0.0
        #: The frames of the last chunk a step returned.
        self._latest: list[Frame] | None = None
        #: Whether the node's record said the error that left its block, with its
        #: traceback (its process need not say it again).
        self.crash_said = False
        #: What the node's code raised that made it FAILED, if it did.
        self._raised_by: BaseException | None = None

    # --- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> NodeRuntime:
        self.node._recorder, self.node._recording = self._recorder, False
        self._thread.start()
        if self._outputs:
            self._outlet = await transports.bind(self._bind, key=self._link_key)
        self._set_state(NodeState.INITIALIZED)
        return self

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        # An error leaving the block (a KeyboardInterrupt in the node's
        # process, say) ends the node: FAILED, not SHUTDOWN.
        if isinstance(exc, BaseExceptionGroup):
            rest = exc.split(trio.Cancelled)[1]  # (a cancellation is no error)
            exc = None if rest is None else single_exception(rest) or rest
        if (
            exc is not None
            and not isinstance(exc, trio.Cancelled)
            and self.node.state is not NodeState.FAILED
        ):
            text = "".join(traceback.format_exception(type(exc), exc, _from_users_code(exc)))
            self._fail(f"crashed: {exc!r}", text)
            self.crash_said = True
        await self.aclose()

    @property
    def state(self) -> NodeState:
        """Where the node is in its life."""
        return self.node.state

    @property
    def address(self) -> str | None:
        """The address of the node's outlet; None for a node without outputs."""
        return self._outlet.address if self._outlet is not None else None

    async def connect(self, addresses: Mapping[str, str]) -> None:
        """Connect an inlet to the outlet of each input, by the input's name
        (but those connected already: a second link would hold its input up).

        Raises:
            KeyError: an input has no address in *addresses*.
            OSError: an input's outlet cannot be reached.
        """
        for spec in self._inputs:
            if spec.name in self._inlets:
                continue
            self._inlets[spec.name] = await transports.connect(
                addresses[spec.name],
                delivery=self._delivery[spec.name],
                capacity=(
                    LINK_CAPACITY
                    if self._delivery[spec.name] is transports.Delivery.RELIABLE
                    else LATEST_CAPACITY
                ),
                max_bytes=LINK_MAX_BYTES,
                label=self.node.name,  # (what its input's outlet may cut: see forget)
                key=self._link_key,
            )
        self._set_state(NodeState.CONNECTED)

    async def prep(self) -> None:
        """Run the node's ``prep``.

        Raises:
            NodeError: ``prep`` raised (the node is FAILED).
        """
        async with self._preparing:
            # What prep saves (a calibration, a device's settings) is recorded.
            self.node._recording = self._recorder is not None
            try:
                await self._call("prep", self.node.prep)
            finally:
                self.node._recording = False
            self._prepped = True
        self._set_state(NodeState.READY)

    async def run(self, stopped: bool = False) -> None:
        """Step until stopped (a source) or until the followed input ends, then
        end the node's stream, run ``teardown``, and return. *stopped*: stop
        at once (a source does not step; a node with inputs steps on what they
        sent until its followed input ends): how nodes stepped offline, or
        never run, end.

        A node stepped offline (:meth:`step_once`) first steps on the chunks
        of its followed input it has not stepped on, with the latest of the
        others. One that failed there runs no more: it only ends.

        Every chunk the followed input delivers under RELIABLE is stepped once,
        in order. A ``step`` that raises makes the node FAILED and ends its
        stream; :meth:`run` still runs ``teardown`` and returns normally.
        Once it ends, failed or not, its inlets are closed: the outlets
        feeding it go on without it (a failed node does not hold up its
        sources, nor their other consumers).
        ``teardown`` runs once whatever happens, cancellation included (for at
        most :data:`TEARDOWN_TIMEOUT` seconds then).

        Raises:
            NodeError: ``teardown`` raised.
        """
        failed = self.state is NodeState.FAILED
        errors: list[NodeError] = []
        if stopped:
            self.request_stop()
        try:
            if not failed:
                await self._wait_for_outputs()
                self._set_state(NodeState.RUNNING)
                # (unwrapped: an error of chimera's own comes out as itself)
                with unwrapped():
                    async with trio.open_nursery() as nursery:
                        if self._inline:
                            nursery.start_soon(self._watch_the_loop)
                        try:
                            if type(self.node).main is not Node.main:
                                await self._run_main()
                            elif self._inputs:
                                await self._step_on_inputs()
                            else:
                                await self._step_as_source()
                        except NodeError:  # (here, not out of the nursery: no group)
                            failed = True
                        nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                # It takes in nothing more: its inputs' outlets forget it at
                # once, rather than wait for room it would never make.
                for inlet in self._inlets.values():
                    await inlet.aclose()
                if self._outlet is not None:
                    await self._outlet.aclose()  # the end of stream flows downstream
                errors = await self._finish()
        if errors:
            raise errors[0]
        if not failed:
            self._set_state(NodeState.STOPPED)
            if self.saved:
                self._set_state(NodeState.SAVED)

    async def _watch_the_loop(self) -> None:
        """Say (once) when the event loop was held up: an ``async def step``
        that blocks (``time.sleep``, a blocking read) holds up everything
        else of the node, its links and its stop included."""
        while True:
            before = trio.current_time()
            await trio.sleep(LOOP_CHECK)
            held = trio.current_time() - before - LOOP_CHECK
            if held >= LOOP_HELD:
                # (Inline, with the memory transport, the loop is its Worker's, and
                # every inline node's: the step that held it may be another's.)
                whose = (
                    "the event loop it shares with its Worker's nodes (memory transport) was "
                    "held up for %.1f s: an async def step, its own or another's,"
                    if self._transport == "memory"
                    else "its event loop was held up for %.1f s: its async def step"
                )
                self.node.logger.warning(
                    f"node %r: {whose} ran that long without awaiting (time.sleep, or a "
                    "blocking call?). Await (trio.sleep, trio.to_thread.run_sync), or write "
                    "a plain def step, which runs on a thread of its own (said once)",
                    self.node.name,
                    held,
                )
                return

    async def set_recording(self, on: bool) -> None:
        """Whether the node's ``save_*`` calls save (they do nothing otherwise)."""
        self.node._recording = on and self._recorder is not None

    async def _close_recorder(self) -> None:
        """Let the node's writers write what is queued, and close its files (once).

        Raises:
            NodeError: a writer failed (the node is FAILED).
        """
        if self._recorder is None or self.saved is not None:
            return
        self.node._recording = False
        try:
            self.saved = await trio.to_thread.run_sync(self._recorder.close)
        except OSError as exc:
            self.saved = self._recorder.streams()
            if exc is self._raised_by:  # (the save that raised it failed the node: said)
                return
            self._fail(f"recording failed: {exc}")
            raise NodeError(self.node.name, f"recording failed: {exc}") from exc

    async def _finish(self) -> list[NodeError]:
        """Run ``teardown`` (see :meth:`_teardown`), then close what the node
        saved, even if it raised; what each raised."""
        errors = []
        for finish in (self._teardown, self._close_recorder):
            try:
                await finish()
            except NodeError as exc:
                errors.append(exc)
        return errors

    async def _teardown(self) -> None:
        """Run ``teardown`` if ``prep`` ran and it has not yet (at most
        :data:`TEARDOWN_TIMEOUT` seconds when cancelled). Raises NodeError."""
        if not self._prepped or self._torn_down:
            return
        self._torn_down = True
        with trio.move_on_after(TEARDOWN_TIMEOUT) as waited:
            await self._call("teardown", self.node.teardown, abandon=True)
        if waited.cancelled_caught:
            self.node.logger.warning(
                "node %r: its teardown did not return within %g s, or did not begin, its "
                "thread being still in an earlier call (a step that does not return): "
                "its thread is left running",
                self.node.name,
                TEARDOWN_TIMEOUT,
            )

    def stats(self) -> dict[str, int]:
        """``steps`` (steps done), ``dropped`` (chunks its inputs dropped, LATEST)
        and ``writer_wait_ms`` (how long its ``save_*`` calls waited for writers
        that could not keep up)."""
        streams = self._recorder.streams() if self._recorder is not None else []
        waited = round(sum(stream.waited_s for stream in streams) * 1000)
        return {"steps": self.steps, "dropped": self.dropped, "writer_wait_ms": waited}

    async def gather(self) -> list[Frame] | None:
        """The frames of the last chunk the node's ``step`` returned (as it was
        when the step returned); None if none yet."""
        return self._latest

    async def step_once(self) -> None:
        """Step once (ChimeraPy's offline mode): a source steps and sends; a node
        with inputs reads one message of each input, then steps on the oldest
        chunk of its followed input not yet stepped on and the latest chunk of
        each other input, and sends.

        Each call sends one message, whatever happens: the chunk, or a batch
        of none when there is none (the step returned None, the node did not
        step, or it failed). So a node with inputs, stepped with its inputs'
        nodes, reads the chunks they sent in the same round, and never waits
        for one that will not come. It does not step when its followed input
        sent nothing, or another input has yet to send its first chunk.

        A node that failed steps no more, and takes in nothing more (its
        inputs go on without it).

        Raises:
            NodeError: ``step`` raised, or returned what cannot be sent, or a
                chunk received cannot be decoded; or the node overrides
                ``main``, which cannot be stepped (it is not FAILED for that).
            trio.EndOfChannel: an input ended before sending a chunk, or the
                followed input ended and no chunk of it is left to step on.
        """
        await self._wait_for_outputs()
        sent = self._chunks_sent
        failure: Exception | None = None
        self.node._offline = True
        try:
            if self.state is NodeState.FAILED:
                pass
            elif type(self.node).main is not Node.main:
                raise NodeError(
                    self.node.name,
                    "it overrides main(), which runs until it returns: step() steps nodes "
                    "that override step() (start() runs main)",
                )
            elif not self._inputs:
                await self._send([self._output(await self._call("step", self.node.step))])
            else:
                assert self._follow is not None  # (a node with inputs follows one)
                await run_all([partial(self._read_offline, name) for name in self._inlets])
                if not self._offline_missing():
                    self._offline_latest[self._follow] = self._offline_pending.popleft()[0]
                    inputs = Inputs(self._offline_latest, self._input_names)
                    value = await self._call("step", self.node.step, inputs)
                    await self._send([self._output(value)])
        except Exception as exc:  # (not a cancellation: then the nodes downstream stop too)
            failure = exc
        finally:
            self.node._offline = False
        if self._chunks_sent == sent and self._outlet is not None:
            await self._outlet.send(pack_batch([], sent))
        if self.state is NodeState.FAILED:
            with trio.CancelScope(shield=True):
                for inlet in self._inlets.values():  # (it takes in nothing more)
                    await inlet.aclose()
        if failure is not None:
            raise failure

    async def _wait_for_outputs(self) -> None:
        """Wait until every node this one sends to has connected (so that
        nothing it sends is lost), or connected and gone since (failed)."""
        if self._outlet is not None:
            await self._outlet.wait_for_inlets(self._outputs)

    async def _read_offline(self, name: str) -> None:
        """Read one message of input *name* (see :meth:`step_once`), unless it ended.

        Raises:
            NodeError: a chunk in it cannot be decoded.
            trio.EndOfChannel: the input ended before sending a chunk, or (the
                followed input) with no chunk left to step on.
        """
        if name not in self._offline_ended:
            if (message := await self._receive(name)) is None:
                self._offline_ended.add(name)
            elif name == self._follow:
                self._keep_waiting(self._offline_pending, message)
            elif chunks := self._unpack(message, name):
                self._offline_latest[name] = chunks[-1]
        if name in self._offline_ended:
            if name == self._follow and not self._offline_pending:
                raise trio.EndOfChannel(f"input {name!r} ended")
            if name != self._follow and name not in self._offline_latest:
                raise trio.EndOfChannel(f"input {name!r} ended before sending a chunk")

    def _offline_missing(self) -> bool:
        """Whether the followed input has no chunk to step on, or another has
        yet to send its first."""
        return not self._offline_pending or any(
            name not in self._offline_latest for name in self._inlets if name != self._follow
        )

    async def forget(self, names: Collection[str]) -> None:
        """The nodes *names* are gone without closing their connections (their
        Worker fell silent: a frozen process, a machine asleep): stop waiting
        for them.

        The links of this node's output to them are cut, with what they had
        not taken in, so that sending goes on for the others (a full link to a
        frozen node would hold it up forever). The input from each of them is
        taken as ended, its messages not yet taken in dropped: a node they
        fed ends as when its input ends. Names of nodes that are neither
        inputs nor outputs of this one are ignored.
        """
        for name in names:
            if self._outlet is not None and self._outlet.cut(name):
                self.node.logger.warning(
                    "node %r is gone: its link is cut, with what it had not taken in", name
                )
            inlet = self._inlets.get(name)
            if inlet is not None and name not in self._gone:
                self._gone.add(name)
                self.node.logger.warning("input %r is gone: its stream is taken as ended", name)
                await inlet.aclose()

    def request_stop(self) -> None:
        """Ask a source to stop after its current step (others stop when their
        followed input ends)."""
        self._stop_requested = True
        self._feeding.cancel()

    async def aclose(self) -> None:
        """Close the node's endpoints (at once; what is in flight is dropped),
        run ``teardown`` if the node was prepared but never run (offline mode),
        and let its thread end."""
        with trio.CancelScope(shield=True):
            # A prep still running (closed from another task) finishes first:
            # then its teardown runs too.
            with trio.move_on_after(TEARDOWN_TIMEOUT) as waiting:
                await self._preparing.acquire()
            if waiting.cancelled_caught:
                log.warning("node %r: prep still running; no teardown", self.node.name)
            else:
                self._preparing.release()
                for error in await self._finish():
                    log.error("node %r: %s", self.node.name, error.message)
            for inlet in self._inlets.values():
                await inlet.aclose()
            if self._outlet is not None:
                await self._outlet.aclose()
            self._thread.close()
            with trio.move_on_after(THREAD_JOIN_TIMEOUT):
                await self._thread.join()
            if self._thread.alive:
                log.warning("node %r: its code is still running; left behind", self.node.name)
        if self.node.state is not NodeState.FAILED:
            self._set_state(NodeState.SHUTDOWN)

    # --- a node's own main ------------------------------------------------------

    async def _run_main(self) -> None:
        """Run the node's own ``main`` instead of stepping, until it returns.

        ``running`` goes False once the node is asked to stop (a source), its
        followed input ended, or its run is cancelled; meanwhile each chunk of
        the followed input refreshes ``in_bound_data`` (the latest chunk of
        each input, a new dict each time) and sets ``new_data_available``.

        Raises:
            NodeError: ``main`` raised, or a chunk received could not be decoded.
        """
        node = self.node
        node.running, node.in_bound_data, node.new_data_available = True, {}, False
        failures: list[NodeError] = []
        failure: NodeError | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._until_main_should_end, failures)
                try:
                    # Abandoned if cancelled: main sees ``running`` go False and
                    # ends on its own; teardown runs on the same thread after it.
                    await self._call("main", node.main, abandon=True)
                except NodeError as exc:  # here, not out of the nursery: no exception group
                    failure = exc
                nursery.cancel_scope.cancel()
        finally:
            node.running = False
        if failure is not None or failures:
            raise failure or failures[0]

    async def _until_main_should_end(self, failures: list[NodeError]) -> None:
        """Feed ``main`` its inputs until they end (or a source until it is
        asked to stop); then ``running`` goes False. A chunk that cannot be
        decoded ends it too, its NodeError added to *failures*."""
        if not self._inputs:
            with self._feeding:
                await trio.sleep_forever()
        else:
            assert self._follow is not None  # (a node with inputs follows one)
            latest: dict[str, DataChunk] = {}

            def publish() -> None:
                self.node.in_bound_data = Inputs(latest, self._input_names)
                self.node.new_data_available = True

            def stop_main(exc: NodeError) -> None:
                failures.append(exc)
                self.node.running = False

            async with trio.open_nursery() as nursery:
                for name in self._inlets:
                    if name != self._follow:
                        nursery.start_soon(self._keep_latest, name, latest, _nothing, stop_main)
                await self._keep_latest(self._follow, latest, publish, stop_main)
                nursery.cancel_scope.cancel()
        self.node.running = False

    # --- stepping --------------------------------------------------------------
    #
    # The node's steps run in a loop on its thread (StepLoop). A feeding task
    # puts each step's arguments in (a source: none; a node with inputs: the
    # latest chunk of each), at most ``self._limit`` ahead of what was sent;
    # the sending task takes every result ready at once and sends the chunks
    # in one message (a batch). A chunk that comes alone the node's thread
    # sends itself, when the links take it at once (see _finish_step); the
    # sending task then only counts its step. A node with one "reliable"
    # input over tcp needs no feeding task: its thread reads the input itself
    # (see _step_on_lent_input). An ``async def step`` runs on the event loop
    # instead, in the feeding task, and each result is sent at once.

    async def _step_as_source(self) -> None:
        if self._inline:
            await self._step_inline_as_source()
            return
        self._limit = LARGE_SOURCE_STEPS  # until the first chunk's size is known
        await self._stepping(self._feed_source)

    async def _step_inline_as_source(self) -> None:
        """Step a source's ``async def step`` in a loop until asked to stop;
        a stop cancels the step at its next await (its result is not sent).

        Raises:
            NodeError: a step raised, or returned what cannot be sent.
        """
        while not self._stop_requested:
            self._feeding = trio.CancelScope()
            with self._feeding:
                if self._outlet is not None:
                    await self._outlet.wait_send_might_not_block()  # fresh, as above
                else:  # (that is a schedule point:) a step that never awaits
                    await trio.lowlevel.checkpoint()  # must not starve the loop
                value = await self._call("step", self.node.step)
            if self._feeding.cancelled_caught:
                return
            await self._send([self._output(value)])

    async def _feed_source(self, loop: StepLoop, fail: Callable[[NodeError], None]) -> None:
        with self._feeding:  # cancelled by request_stop
            while not self._stop_requested:
                await self._wait_for_room()
                if self._outlet is not None:
                    # Step once the chunk can leave at once: it is sent fresh, not
                    # aged in a full link (1080p: p50 ~7 -> ~4.3 ms).
                    await self._outlet.wait_send_might_not_block()
                self._put(loop, [()] * (self._most_in_flight() - loop.unsent))
        # Steps not started yet are not taken: a source stops after its current step.
        loop.close(discard=True)

    async def _step_on_inputs(self) -> None:
        if not self._inline:
            if self._reads_on_its_thread():
                await self._step_on_lent_input()
            else:
                await self._stepping(self._feed_inputs_to_loop)
            return
        failures: list[NodeError] = []
        with trio.CancelScope() as scope:

            def fail(exc: NodeError) -> None:
                failures.append(exc)
                scope.cancel()

            await self._feed_inputs(self._step_inline, fail)
        if failures:
            raise failures[0]

    def _reads_on_its_thread(self) -> bool:
        """Whether the node's thread reads its input itself (see
        :meth:`_step_on_lent_input`): it has one, ``"reliable"``, whose inlet
        can be lent (tcp), and offline mode left no chunk of it to step on.
        (With more inputs, the others' latest chunks would be shared between
        threads; a ``"latest"`` input is read by its event loop, which alone
        knows which chunk is the newest.)"""
        if len(self._inlets) != 1 or self._offline_pending:
            return False
        assert self._follow is not None  # (a node with inputs follows one)
        return (
            self._delivery[self._follow] is transports.Delivery.RELIABLE
            and self._follow not in self._gone
            and self._inlets[self._follow].lendable
        )

    async def _step_on_lent_input(self) -> None:
        """Step on each chunk of the node's one input, which its thread reads
        itself (:meth:`transports.Inlet.lend`), decodes and steps on, at most
        as many steps ahead of what was sent as with the event loop feeding
        it: a chunk reaches ``step`` without waking the event loop, nor a
        hand-over from it (1 KB paced at 1 kHz between two ``def step``
        nodes: p50 180-230 -> 90-115 µs in interleaved runs). The event loop sends
        the results on, as ever.

        Raises:
            NodeError: a step raised, or returned what cannot be sent, or a
                chunk received could not be decoded.
        """
        name = self._follow
        assert name is not None  # (a node with inputs follows one)
        #: Why the thread stopped reading: the input ended, or a chunk could not be decoded.
        stopped: list[BaseException] = []

        def pull() -> list[tuple] | None:  # (on the node's thread)
            try:
                message = lent.receive()
                if message is None:  # (the loan is over: the node stops)
                    return None
                chunks = self._decode(message, name)
            except (*_ENDS, DecodeError) as exc:
                stopped.append(exc)
                return None
            return [(Inputs({name: chunk}, self._input_names),) for chunk in chunks]

        async with self._inlets[name].lend() as lent:
            await self._stepping(pull=pull)
        if stopped and isinstance(stopped[0], DecodeError):
            raise self._undecodable(stopped[0]) from stopped[0]
        if stopped:
            self._ended(name, stopped[0])

    async def _step_inline(self, steps: list[tuple]) -> None:
        """Run ``async def step`` on each of *steps* (emptying the list),
        sending each result at once.

        Raises:
            NodeError: a step raised, or returned what cannot be sent.
        """
        taken = list(steps)
        steps.clear()
        for args in taken:
            await self._send([self._output(await self._call("step", self.node.step, *args))])

    async def _stepping(
        self,
        feed: Callable[[StepLoop, Callable[[NodeError], None]], Awaitable[None]] | None = None,
        *,
        pull: Callable[[], list[tuple] | None] | None = None,
    ) -> None:
        """Step on what *feed* puts in, or on what the loop gets with *pull*
        (see :class:`StepLoop`), while the results are sent on.

        Raises:
            NodeError: a step raised, or returned what cannot be sent, or a
                chunk received could not be decoded.
        """
        failures: list[NodeError] = []
        self._chunks_made = self._chunks_sent  # (offline mode's steps may have sent some)
        ahead = None if pull is None else self._most_in_flight
        loop = self._steps = StepLoop(self.node.step, self._finish_step, pull=pull, ahead=ahead)
        self._thread.submit(loop.run, (), _ended)
        try:
            async with trio.open_nursery() as nursery:

                def fail(exc: NodeError) -> None:
                    failures.append(exc)
                    nursery.cancel_scope.cancel()

                if feed is not None:
                    nursery.start_soon(feed, loop, fail)
                try:
                    await self._send_results(loop)
                except NodeError as exc:  # here, not out of the nursery: no exception group
                    fail(exc)
                nursery.cancel_scope.cancel()
        finally:
            loop.close(discard=True)
            loop.release()
        if failures:
            raise failures[0]

    async def _send_results(self, loop: StepLoop) -> None:
        """Send what the steps return, until the loop ends (or a step fails:
        the chunks before it are sent, then NodeError)."""
        while results := await loop.results():
            outputs: list[Output] = []
            failure: NodeError | None = None
            for output, error in results:
                if error is not None:  # (SystemExit too: the node fails, not its process)
                    failure = self._raised("step", error)
                    break
                outputs.append(output)
            await self._send(outputs)
            if failure is not None:
                raise failure
            loop.sent(len(results))
            self._room.unpark_all()

    async def _send(self, outputs: list[Output]) -> None:
        """Count a step for each of *outputs* (see :meth:`_output`) and send
        their frames in one message.

        Raises:
            NodeError: an output cannot be sent (the ones before it are sent;
                the node is FAILED).
        """
        chunks: list[list[Frame]] = []  # (to send: those sent already come first)
        latest: list[Frame] | None = None
        unsendable: _Unsendable | None = None
        for output in outputs:
            self.steps += 1
            if isinstance(output, _Unsendable):
                unsendable = output
                break
            if isinstance(output, _Sent):
                latest = output.frames
            elif output is not None:
                latest = output
                chunks.append(output)
        if latest is not None:
            self._latest = latest
            if not self._inputs:
                # A source making large chunks makes the next only once the last
                # has left, so that it is fresh (1080p p50: ~8 ms with 4 steps in
                # flight, ~5.5 with 1).
                large = sum(map(len, latest)) > LARGE_CHUNK  # (flat bytes: len is the size)
                self._limit = LARGE_SOURCE_STEPS if large else STEPS_IN_FLIGHT
        if chunks and self._outlet is not None:
            for batch in _batches(chunks):
                first = self._chunks_sent
                started = time.perf_counter()
                await self._outlet.send(pack_batch(batch, first))
                with self._order:
                    self._chunks_sent = first + len(batch)
                share = self._held.add(started, time.perf_counter())
                if share is not None and share >= HELD_SHARE and not self._said_held:
                    self._said_held = True
                    self._say_held(share)
        if unsendable is not None:
            reason = f"step returned what cannot be sent: {unsendable.error}"
            self._fail(reason)
            raise NodeError(self.node.name, reason) from unsendable.error

    def _put(self, loop: StepLoop, steps: list[tuple]) -> None:
        """Put *steps* in the loop, and empty the list."""
        if steps:
            loop.put(steps)
            steps.clear()

    def _most_in_flight(self) -> int:
        """How many steps may be in flight: :attr:`_limit`, or fewer if the
        node's steps take long (:data:`STEPS_AHEAD_SECONDS`); until one is
        done, :data:`MIN_STEPS_IN_FLIGHT`."""
        seconds = None if self._steps is None else self._steps.seconds
        if seconds is None:
            return min(self._limit, MIN_STEPS_IN_FLIGHT)
        ahead = math.ceil(STEPS_AHEAD_SECONDS / max(seconds, 1e-9))
        return min(self._limit, max(MIN_STEPS_IN_FLIGHT, ahead))

    async def _wait_for_room(self) -> None:
        """Wait while the steps in flight are the most there may be (never,
        for an ``async def step``: it has no loop)."""
        while self._steps is not None and self._steps.unsent >= self._most_in_flight():
            await self._room.park()

    def _say_held(self, share: float) -> None:
        """Say (in the node's log) that its sending waited *share* of the time
        for the nodes it feeds on reliable links."""
        assert self._outlet is not None  # (only a node that sends waits to)
        reliable = {
            link.label
            for link in self._outlet.stats.links
            if link.delivery is transports.Delivery.RELIABLE and link.label
        }
        names = ", ".join(map(repr, sorted(reliable))) or "the nodes it feeds"
        self.node.logger.warning(
            "it waited %.0f%% of the time for %s to take its chunks: it steps at "
            "their pace, so that they miss none (with delivery='latest' on the edge, "
            "it would keep its own pace, and they would skip chunks)",
            share * 100,
            names,
        )

    async def _feed_inputs_to_loop(self, loop: StepLoop, fail: Callable[[NodeError], None]) -> None:
        async def put(steps: list[tuple]) -> None:
            self._put(loop, steps)

        await self._feed_inputs(put, fail)
        loop.close()  # every chunk received is stepped

    async def _feed_inputs(
        self,
        take: Callable[[list[tuple]], Awaitable[None]],
        fail: Callable[[NodeError], None],
    ) -> None:
        """Hand *take* a step for each chunk of the followed input, with the
        latest chunk of every input, until the followed input ends."""
        # (What the inputs sent in offline mode's steps, if any, is taken first.)
        latest = {name: c for name, c in self._offline_latest.items() if name != self._follow}
        #: The inputs that ended without sending a chunk.
        silent: set[str] = set()
        #: Cancelled once each input but the followed one has sent a chunk, or ended.
        every_input = trio.CancelScope()

        def all_in() -> None:
            if len((latest.keys() - {self._follow}) | silent) == len(self._inlets) - 1:
                every_input.cancel()

        async def keep(name: str) -> None:
            await self._keep_latest(name, latest, all_in, fail)
            if name not in latest:  # it will send nothing: do not wait for it
                silent.add(name)
                all_in()

        async with trio.open_nursery() as nursery:
            all_in()
            for name in self._inlets:
                if name != self._follow:
                    nursery.start_soon(keep, name)
            try:
                await self._feed_followed(take, latest, every_input)
            except NodeError as exc:  # here, not out of the nursery: no exception group
                fail(exc)
            nursery.cancel_scope.cancel()

    async def _feed_followed(
        self,
        take: Callable[[list[tuple]], Awaitable[None]],
        latest: dict[str, DataChunk],
        every_input: trio.CancelScope,
    ) -> None:
        """Hand *take* a step for each chunk of the followed input, until it
        ends: those of one message at once (so at most one message's chunks
        more than the limit are in flight). *take* empties the list.

        Its chunks wait until every other input has sent one, or ended
        (*every_input* is cancelled then): see :meth:`_wait_for_every_input`.
        """
        assert self._follow is not None  # (a node with inputs follows one)
        # The chunks offline mode's steps left (none if it did not step).
        waiting, self._offline_pending = self._offline_pending, deque()
        ended = await self._wait_for_every_input(waiting, every_input)
        missing = sorted(set(self._inlets) - {self._follow} - set(latest))
        if missing:  # (they ended: the node cannot step)
            self.node.logger.warning("inputs %s ended without sending: it is not stepped", missing)
        steps: list[tuple] = []
        chunks: Iterable[DataChunk] = [chunk for chunk, _ in waiting]
        inlet = self._inlets[self._follow]
        while True:
            for chunk in chunks:
                latest[self._follow] = chunk
                if missing:
                    self.dropped += 1  # (never stepped on)
                else:
                    steps.append((Inputs(latest, self._input_names),))
            await take(steps)
            if ended:
                return
            # Room first, then the message: a LATEST input's is the newest.
            await self._wait_for_room()
            try:  # (not _receive: one coroutine less per message, on the hot path)
                message = await inlet.receive()
            except _ENDS as exc:
                self._ended(self._follow, exc)
                return
            chunks = self._unpack(message, self._follow)

    def _keep_waiting(
        self, waiting: deque[tuple[DataChunk, int]], message: list[memoryview]
    ) -> None:
        """Add the chunks of *message*, from the followed input, to those
        *waiting* for the other inputs' first (each with its share of its
        message's bytes): at most :data:`WAITING_CHUNKS`, or about
        :data:`WAITING_BYTES`; beyond, the oldest are dropped, counted
        (``dropped``) and said once in the node's log. Following a LATEST
        input, only the newest waits (the others count as dropped, as its
        link's do).

        Raises:
            NodeError: a chunk cannot be decoded (see :meth:`_unpack`).
        """
        assert self._follow is not None  # (a node with inputs follows one)
        chunks = self._unpack(message, self._follow)
        share = sum(frame.nbytes for frame in message) // max(len(chunks), 1)
        waiting.extend((chunk, share) for chunk in chunks)
        latest = self._delivery[self._follow] is transports.Delivery.LATEST
        limit = 1 if latest else WAITING_CHUNKS
        size = sum(nbytes for _, nbytes in waiting)
        while len(waiting) > limit or size > WAITING_BYTES:
            size -= waiting.popleft()[1]
            self.dropped += 1
            if not self._warned_waiting and not latest:
                self._warned_waiting = True
                self.node.logger.warning(
                    "its inputs %s have sent nothing yet: the oldest chunks of %r "
                    "waiting for them are dropped (counted)",
                    sorted(set(self._inlets) - {self._follow}),
                    self._follow,
                )

    async def _wait_for_every_input(
        self, waiting: deque[tuple[DataChunk, int]], every_input: trio.CancelScope
    ) -> bool:
        """Until *every_input* is cancelled (every other input has sent a
        chunk, or ended), read the followed input on, its chunks waiting in
        *waiting* (each with its share of its message's bytes); whether the
        followed input ended meanwhile.

        Read on, so that a node never holds up the one it follows when
        another input sends nothing yet (a detector that has found nothing):
        else that node, held up, holds up whatever else it feeds. At most
        :data:`WAITING_CHUNKS` chunks, or :data:`WAITING_BYTES`, wait: beyond,
        the oldest are dropped, counted (``dropped``) and logged once.
        """
        assert self._follow is not None  # (a node with inputs follows one)
        inlet = self._inlets[self._follow]
        ended = False
        with every_input:
            while True:
                try:
                    message = await inlet.receive()
                except _ENDS as exc:
                    self._ended(self._follow, exc)
                    ended = True
                    await trio.sleep_forever()  # (the others end in turn)
                self._keep_waiting(waiting, message)
        return ended

    async def _receive(self, name: str) -> list[memoryview] | None:
        """The next message of input *name*; None once the input has ended:
        closed by its node, taken as gone (:meth:`forget`), or broken (logged).

        Raises:
            trio.ClosedResourceError: the input was closed here (the node closes).
        """
        try:
            return await self._inlets[name].receive()
        except _ENDS as exc:
            self._ended(name, exc)
            return None

    def _ended(self, name: str, exc: BaseException) -> None:
        """Input *name*'s receive raised *exc* (one of :data:`_ENDS`): return
        if that is the input's end -- closed by its node, taken as gone
        (:meth:`forget`), or broken (logged) -- else raise it (the input was
        closed here: the node closes)."""
        if isinstance(exc, trio.BrokenResourceError):
            self.node.logger.warning("input %r broke: %s", name, exc)
        elif isinstance(exc, trio.ClosedResourceError) and name not in self._gone:
            raise exc

    async def _keep_latest(
        self,
        name: str,
        latest: dict[str, DataChunk],
        received: Callable[[], None],
        fail: Callable[[NodeError], None],
    ) -> None:
        """Keep the latest chunk of input *name* in *latest* until the input
        ends, calling *received* after each message that holds one; *fail* gets the
        NodeError of a chunk that cannot be decoded (and it stops)."""
        try:
            while (message := await self._receive(name)) is not None:
                chunks = self._unpack(message, name, newest=True)
                if chunks:  # (none: a step of offline mode had nothing)
                    latest[name] = chunks[-1]
                    received()
        except NodeError as exc:
            fail(exc)

    def _unpack(
        self, message: list[memoryview], name: str, *, newest: bool = False
    ) -> list[DataChunk]:
        """:meth:`_decode`, on the event loop.

        Raises:
            NodeError: the message or a chunk in it cannot be decoded (the node is FAILED).
        """
        try:
            return self._decode(message, name, newest=newest)
        except DecodeError as exc:
            raise self._undecodable(exc) from exc

    def _undecodable(self, exc: DecodeError) -> NodeError:
        """A chunk received cannot be decoded, for *exc*: the node is FAILED; the error to raise."""
        self._fail(f"a chunk it received cannot be decoded: {exc}")
        return NodeError(self.node.name, str(exc))

    def _decode(
        self, message: list[memoryview], name: str, *, newest: bool = False
    ) -> list[DataChunk]:
        """The chunks in a message from input *name*: all of them, or only the
        newest when *newest* or the input is LATEST (a LATEST input's others,
        and those its link dropped, count as dropped). Sets the steps in
        flight by the chunks' size. Changes only what concerns input *name*,
        so the node's thread may call it for an input it reads itself.

        Raises:
            DecodeError: the message or a chunk in it cannot be decoded.
        """
        first, batch = unpack_batch(message)
        expected = self._next_chunk.get(name, 0)
        if first < expected:
            raise DecodeError(f"chunk {first} came after chunk {expected - 1}")
        self._next_chunk[name] = first + len(batch)
        latest = self._delivery[name] is transports.Delivery.LATEST
        if latest:
            self.dropped += first - expected
        if not batch:  # (a step of offline mode had nothing: see chimera._batch)
            return []
        if name == self._follow:
            large = sum(frame.nbytes for frame in message) > LARGE_CHUNK * len(batch)
            if latest:
                self._limit = LATEST_STEPS
            else:
                self._limit = LARGE_INPUT_STEPS if large else STEPS_IN_FLIGHT
        if newest or latest:
            if latest:
                self.dropped += len(batch) - 1
            batch = batch[-1:]
        return [decode_chunk(frames, allow_objects=self._allow_objects) for frames in batch]

    def _finish_step(self, value: Any) -> Output:
        """What a ``def step``'s *value* sends (see :meth:`_output`), called
        on the node's thread after the step. A chunk goes from here at once,
        with no hand-off to the event loop, when it comes alone (made at
        least :data:`ALONE_SECONDS` after the one before), every chunk before
        it has been sent, and the outlet can send it without waiting
        (:meth:`transports.Outlet.send_now`: it is small, the links have
        room); it comes back as :class:`_Sent`, for the event loop to count.
        """
        output = self._output(value)
        if self._outlet is None or not isinstance(output, list):
            return output
        made_at, self._made_at = self._made_at, time.perf_counter()
        number = self._chunks_made
        self._chunks_made += 1
        if self._made_at - made_at < ALONE_SECONDS:
            return output  # (one of many: the event loop sends them together)
        with self._order:
            if number == self._chunks_sent and self._outlet.send_now(pack_batch([output], number)):
                self._chunks_sent += 1
                return _Sent(output)
        return output

    def _output(self, value: Any) -> Output:
        """What *value*, a step's, sends: its frames (a value not a DataChunk is
        wrapped as record "default"; see :class:`~chimera.Node`), None for
        None, or why it cannot be sent. Arrays are copied: the node's code may
        change them once it steps again. Changes nothing of the runtime's, so
        the node's thread calls it, before its next step.
        """
        if value is None:
            return None
        try:
            if not isinstance(value, DataChunk):
                chunk = DataChunk()
                chunk.add("default", value)
                value = chunk
            frames = encode_chunk(value, allow_objects=self._allow_objects)
        except Exception as exc:  # (TypeError, ValueError; anything else is a codec bug)
            return _Unsendable(exc)
        if len(frames) >= transports.MAX_FRAMES:  # (a message's batch header is one more)
            return _Unsendable(
                ValueError(
                    f"a chunk of {len(frames) - 1} arrays, table columns and pickled "
                    f"values: at most {transports.MAX_FRAMES - 2}"
                )
            )
        largest = max(map(len, frames))  # (flat bytes: len is the size)
        if largest > transports.DEFAULT_MAX_FRAME_SIZE:
            return _Unsendable(
                ValueError(
                    f"an array or pickled value of {largest} bytes: "
                    f"at most {transports.DEFAULT_MAX_FRAME_SIZE} bytes"
                )
            )
        return frames

    # --- helpers ---------------------------------------------------------------

    async def _call(
        self, what: str, fn: Callable[..., Any], *args: Any, abandon: bool = False
    ) -> Any:
        """Run user code on the node's thread, or, if it is a coroutine
        function, on the event loop; a raise makes the node FAILED and a NodeError.

        With *abandon*, a cancellation returns at once and leaves the thread
        to finish on its own (a coroutine is cancelled).
        """
        # (Whether step is a coroutine function is known: not asked at every step.)
        coroutine = self._inline if what == "step" else inspect.iscoroutinefunction(fn)
        if coroutine:
            try:
                return await fn(*args)
            except (Exception, SystemExit) as exc:  # (not a KeyboardInterrupt: Ctrl-C's)
                raise self._raised(what, exc) from exc
        if self._thread.closed:  # (closed while this call was on its way)
            raise NodeError(self.node.name, f"{what}: the node is closed")
        try:
            return await self._thread.call(fn, *args, abandon=abandon)
        except trio.Cancelled:  # (abandon: the call goes on alone)
            raise
        except BaseException as exc:  # what the node's code raised, SystemExit included
            raise self._raised(what, exc) from exc

    def _raised(self, what: str, exc: BaseException) -> NodeError:
        """The node's *what* (user code) raised *exc*: the node is FAILED; the error to raise."""
        text = "".join(traceback.format_exception(type(exc), exc, _from_users_code(exc)))
        self._raised_by = exc
        self._fail(f"{what} raised {exc!r}", text)
        return NodeError(self.node.name, f"{what} raised {exc!r}", text)

    def _fail(self, reason: str, traceback_text: str = "") -> None:
        """The node is FAILED for *reason*: logged by the node's logger (so
        that it reaches the Manager's ``nodes.log``), with the traceback of its
        code if given."""
        logger = self.node.logger
        if traceback_text:
            logger.error("node %r failed: %s\n%s", self.node.name, reason, traceback_text.rstrip())
        else:
            logger.error("node %r failed: %s", self.node.name, reason)
        self._set_state(NodeState.FAILED, reason)

    def _set_state(self, state: NodeState, reason: str | None = None) -> None:
        self.node.state = state
        if self._on_state is not None:
            self._on_state(state, reason)


class Inputs(dict[str, DataChunk]):
    """``data_chunks`` (and ``in_bound_data``): the latest chunk of each input
    of the node, by the input node's name. A missing name is a KeyError that
    says why: not an input's (and which are), or one that sent nothing yet."""

    def __init__(self, chunks: Mapping[str, DataChunk], inputs: Collection[str]) -> None:
        super().__init__(chunks)
        self._inputs = inputs  # (names: it may be pickled, copied, sent on)

    def __missing__(self, key: str) -> DataChunk:
        if key in self._inputs:
            raise KeyError(f"{key!r}: that input has sent no chunk yet")
        names = ", ".join(map(repr, sorted(self._inputs)))
        raise KeyError(f"{key!r} is not an input of this node: its inputs are {names}")


#: The folders of chimera's own code (and its data plane's), and the files
#: of what runs it (Trio, ``with`` blocks): the frames that call the user's code.
_OURS = (
    *(
        str(Path(module.__file__).parent) + os.sep  # type: ignore[arg-type]
        for module in (sys.modules[__package__], transports, trio)
    ),
    contextlib.__file__,
)
#: The file of chimera's own nodes (``chimera.nodes``): a node's code.
_NODES = str(Path(__file__).with_name("nodes.py"))


def _from_users_code(exc: BaseException) -> TracebackType | None:
    """*exc*'s traceback from its first frame in the user's code on: the
    frames of chimera (and Trio) that called that code say nothing to its user. The
    whole traceback if no frame is the user's (an error of chimera's own)."""
    tb = exc.__traceback__
    while tb is not None and _calls_the_nodes_code(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return tb if tb is not None else exc.__traceback__


def _calls_the_nodes_code(filename: str) -> bool:
    """Whether a frame of *filename* is one that calls a node's code: chimera's
    (but its nodes', ``chimera.nodes``, which are a node's code), its data
    plane's, Trio's, or a ``with`` block's."""
    return filename.startswith(_OURS) and filename != _NODES
