"""The ``chimera`` command: ``chimera manager``, ``chimera worker`` and ``chimera demo``."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager

import trio

from ._protocol import checked_host, in_url
from ._recording import check_name
from ._version import __version__

#: The signals that stop a command: Ctrl-C, what ``kill`` and service managers
#: send, and what a terminal that closes sends.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: After a second signal, the exit status is this plus the signal's number.
FORCED = 128


def _port(text: str) -> int:
    """A port to listen on, 0 to 65535 (an argparse type).

    Raises:
        argparse.ArgumentTypeError: *text* is not such a number.
    """
    if not text.isdecimal() or int(text) > 65535:
        raise argparse.ArgumentTypeError(
            f"expected a port 0 to 65535 (0 picks a free one), not {text!r}"
        )
    return int(text)


def _address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, the port 1 to 65535 (an IPv6 host in brackets, or not):
    the host, without brackets, and the port (an argparse type).

    Raises:
        argparse.ArgumentTypeError: *text* is not such an address (a URL, no port, ...).
    """
    host, _, port = text.rpartition(":")
    try:
        if not port.isdecimal() or not 1 <= int(port) <= 65535:
            raise ValueError(port)
        return checked_host(host), int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT ([::1]:9000 for an IPv6 address), a port 1 to 65535, not {text!r}"
        ) from None


def _host(text: str) -> str:
    """A host name or IP address, without brackets (an argparse type).

    Raises:
        argparse.ArgumentTypeError: *text* is neither, saying why.
    """
    try:
        return checked_host(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    """A duration in seconds, finite and above 0 (an argparse type).

    Raises:
        argparse.ArgumentTypeError: *text* is not such a number.
    """
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, not {text!r}")
    return seconds


def _camera(text: str) -> int:
    """A camera's index, 0 or more (an argparse type).

    Raises:
        argparse.ArgumentTypeError: *text* is not such a number.
    """
    if not text.isdecimal():
        raise argparse.ArgumentTypeError(f"expected a camera index, 0 or more, not {text!r}")
    return int(text)


def _worker_name(text: str) -> str:
    """*text*, if it can name a Worker (an argparse type).

    Raises:
        argparse.ArgumentTypeError: it cannot name the Worker's folder in a session.
    """
    try:
        return check_name(text, "worker name")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _ChimeraPysAddress(argparse.Action):
    """ChimeraPy's ``cp-worker --ip HOST --port PORT``: a usage error saying what to give."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        option = args[-1]
        parser.error(
            f"{option} is ChimeraPy's cp-worker's: give the Manager as --manager HOST:PORT "
            "(for example --manager 127.0.0.1:9000)"
        )


#: What each command's help says of Ctrl-C.
_SIGNALS_HELP = (
    "Ctrl-C, SIGTERM or SIGHUP stops it cleanly (exit status 0); a second one stops it at "
    "once (exit status 128 + the signal's number: 130, 143, 129)."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chimera",
        description=(
            "Distributed, real-time, multimodal data collection on Trio: "
            "a Manager, Workers, and Nodes in a Graph."
        ),
    )
    parser.add_argument("--version", action="version", version=f"chimera {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    manager = commands.add_parser(
        "manager",
        help="run a Manager until Ctrl-C",
        description="Run a Manager until Ctrl-C.",
        epilog=_SIGNALS_HELP,
    )
    manager.add_argument(
        "--port", type=_port, default=9000, help="default: %(default)s; 0 picks a free port"
    )
    manager.add_argument(
        "--host",
        type=_host,
        default="127.0.0.1",
        help="the address to listen on (default: %(default)s; every interface: 0.0.0.0 or ::)",
    )
    manager.add_argument(
        "--logdir",
        default="chimera-sessions",
        help="where sessions are written (default: %(default)s)",
    )
    manager.add_argument(
        "--token",
        default=None,
        help=(
            "a token Workers must present, and API clients too (/api/state, /ws/events): "
            "'Authorization: Bearer TOKEN' or ?token=TOKEN (default: $CHIMERA_TOKEN; "
            "empty: none)"
        ),
    )

    worker = commands.add_parser(
        "worker",
        help="run a Worker for a Manager until Ctrl-C",
        description="Run a Worker connected to a Manager until Ctrl-C or the Manager leaves.",
        epilog=_SIGNALS_HELP,
    )
    worker.add_argument(
        "--name", required=True, type=_worker_name, help="the Worker's name in mappings"
    )
    worker.add_argument(
        "--manager", required=True, type=_address, metavar="HOST:PORT", help="the Manager"
    )
    worker.add_argument(
        "--token", default=None, help="the Manager's token, if it has one (default: $CHIMERA_TOKEN)"
    )
    for chimerapys in ("--ip", "--port"):
        worker.add_argument(chimerapys, action=_ChimeraPysAddress, help=argparse.SUPPRESS)
    worker.add_argument(
        "--keep-temp",
        action="store_true",
        help="keep the Worker's temporary folder, with what its nodes saved, when it stops "
        "(its path is logged)",
    )

    demo = commands.add_parser(
        "demo",
        help="record a multimodal session on this machine",
        description=(
            "Start a Manager and a Worker here, record a camera, a microphone and a sensor "
            "(test signals unless devices are given) and the camera's motion energy, "
            "collect the session, and print a summary of its streams."
        ),
        epilog="Ctrl-C, SIGTERM or SIGHUP stops the recording and collects it; a second one "
        "stops at once (exit status 128 + the signal's number: 130, 143, 129).",
    )
    demo.add_argument(
        "--seconds", type=_seconds, default=10.0, help="how long to record (default: %(default)g)"
    )
    demo.add_argument(
        "--logdir", default="chimera-sessions", help="where the session goes (default: %(default)s)"
    )
    demo.add_argument("--camera", type=_camera, default=None, metavar="INDEX", help="a real camera")
    demo.add_argument(
        "--microphone",
        default=None,
        metavar="DEVICE",
        help="a real input device, or 'default' (needs: pip install sounddevice)",
    )
    return parser


class _Stop:
    """What Ctrl-C, SIGTERM and SIGHUP do to a command: the first stops it
    gracefully, a second at once; *stopping* says what the first does.

    The first sets :attr:`requested` and cancels the blocks run in
    :meth:`until_requested`: the command then ends as it would by itself (a
    Worker closes its nodes, their ``teardown`` runs). A second calls what
    :meth:`on_force` was given (killing node processes), cancels
    :attr:`scope` (the whole command's), and sets :attr:`forced` to its number.
    """

    def __init__(self, command: str, stopping: str) -> None:
        self._command = command
        self._stopping = stopping
        #: Set by the first signal.
        self.requested = trio.Event()
        #: The number of the second signal, once it came.
        self.forced: int | None = None
        #: Cancelled by the second signal: run the command in it.
        self.scope = trio.CancelScope()
        self._until_requested: set[trio.CancelScope] = set()
        self._on_force: list[Callable[[], None]] = []

    @contextmanager
    def until_requested(self) -> Iterator[None]:
        """Run the block until a stop is requested: it is cancelled then (at
        once if a stop was requested already)."""
        with trio.CancelScope() as scope:
            if self.requested.is_set():
                scope.cancel()
            self._until_requested.add(scope)
            try:
                yield
            finally:
                self._until_requested.discard(scope)

    def on_force(self, kill: Callable[[], None]) -> None:
        """Call *kill* (it must not block) when a stop is forced."""
        self._on_force.append(kill)

    def take(self, signum: int) -> None:
        """Act on one of :data:`STOP_SIGNALS`, and say so."""
        name = signal.Signals(signum).name
        if not self.requested.is_set():
            again = "Ctrl-C" if signum == signal.SIGINT else name
            self._say(f"{name}, {self._stopping}; {again} again stops at once")
            self.requested.set()
            for scope in self._until_requested:
                scope.cancel()
        elif self.forced is None:
            self._say(f"{name} again, stopping at once (exit status {FORCED + signum})")
            self.forced = signum
            for kill in self._on_force:
                kill()
            self.scope.cancel()

    async def watch(self, signals: AsyncIterator[int]) -> None:
        """Take every signal *signals* receives."""
        async for signum in signals:
            self.take(signum)

    def _say(self, text: str) -> None:
        try:
            print(f"chimera {self._command}: {text}", file=sys.stderr, flush=True)
        except OSError:  # (SIGHUP: its terminal may be gone)
            pass


async def _run_manager(args: argparse.Namespace, stop: _Stop) -> int:
    from ._manager import AsyncManager

    try:
        manager = AsyncManager(args.logdir, args.port, host=args.host, token=args.token)
        async with manager:
            where = f"{in_url(manager.host)}:{manager.port}"  # ([::1]:9000: as a Worker takes it)
            print(f"chimera manager listening on {where}", flush=True)
            await stop.requested.wait()
    except OSError as exc:  # the port is taken, or the host is not this machine's
        print(f"chimera manager: {exc}", file=sys.stderr)
        return 1
    return 0


async def _run_worker(args: argparse.Namespace, stop: _Stop) -> int:
    from ._worker import AsyncWorker

    host, port = args.manager
    manager = f"{in_url(host)}:{port}"
    async with AsyncWorker(args.name, delete_temp=not args.keep_temp, token=args.token) as worker:
        stop.on_force(worker.kill_nodes)
        with stop.until_requested():  # connecting included
            try:
                connected = await worker.connect(host, port)
            except PermissionError as exc:
                print(f"chimera worker: {exc}", file=sys.stderr)
                return 1
            if not connected:
                print(f"chimera worker: no manager at {manager}", file=sys.stderr)
                return 1
            print(f"chimera worker {args.name!r} connected to {manager}", flush=True)
            await worker.wait_for_disconnect()
            print("chimera worker: the manager left", flush=True)
    return 0


async def _run_demo(args: argparse.Namespace, stop: _Stop) -> int:
    from ._demo import run_demo
    from ._errors import NodeError

    microphone = args.microphone
    if microphone is not None and microphone.isdigit():
        microphone = int(microphone)
    try:
        await run_demo(args.seconds, args.logdir, args.camera, microphone, enough=stop.requested)
    except (NodeError, ValueError, OSError) as exc:
        print(f"chimera demo: {exc}", file=sys.stderr)
        return 1
    return 0


#: What a command does at the first signal, unless it just stops.
_STOPPING = {"demo": "stopping the recording, then collecting it"}


async def _run(args: argparse.Namespace, taken: list[int], early: list[int]) -> int:
    """Run the command; its exit status. *taken*: the stop signals it acts on;
    *early*: those that came before this run."""
    run = {"manager": _run_manager, "worker": _run_worker, "demo": _run_demo}[args.command]
    stop = _Stop(args.command, _STOPPING.get(args.command, "stopping"))
    # Stop signals are received as events (the ones before this run
    # too), so that they end the command by leaving its blocks, never as a
    # KeyboardInterrupt in whatever task happens to run.
    with trio.open_signal_receiver(*taken) as signals:
        for signum in early:
            stop.take(signum)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop.watch, signals)
            with stop.scope:
                status = await run(args, stop)
            nursery.cancel_scope.cancel()
    return status if stop.forced is None else FORCED + stop.forced


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; its exit status.

    0 when the command ends as it should, after a first Ctrl-C, SIGTERM or
    SIGHUP too (it stops gracefully); 1 when it fails; 2 for bad arguments (or none);
    after a second one, which stops at once, :data:`FORCED` + the signal's
    number (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP, as shells report).

    These signals (:data:`STOP_SIGNALS`) are the command's from the call on, and ignored once
    it returns (for the rest of the process, which is about to exit): they
    never raise KeyboardInterrupt. One ignored when the call begins stays
    ignored: ``nohup`` ignores SIGHUP (a Worker started with it outlives its
    terminal), and a shell its background jobs' Ctrl-C.
    """
    taken: list[int] = [s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]
    early: list[int] = []
    for signum in taken:
        signal.signal(signum, lambda signum, frame: early.append(signum))
    try:
        parser = _parser()
        args = parser.parse_args(argv)
        if args.command is None:  # (a usage error, with the help to say what to give)
            parser.print_help(sys.stderr)
            return 2
        # The demo says how it goes itself: only warnings and errors from the
        # log, and how collecting goes.
        level = logging.WARNING if args.command == "demo" else logging.INFO
        logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        logging.getLogger("chimera.collect").setLevel(logging.INFO)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # (a line per file collected)
        return trio.run(_run, args, taken, early)
    finally:
        # Not a handler: as it finalizes, Python resets the signals it handles
        # to their default (a Ctrl-C then kills the process), but not ignored ones.
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


if __name__ == "__main__":
    raise SystemExit(main())
