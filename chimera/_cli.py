"""The ``chimera`` command: ``chimera manager`` and ``chimera worker``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial

import trio

from ._recording import check_name
from ._version import __version__


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
    """``HOST:PORT``, the port 1 to 65535: the host and the port (an argparse type).

    Raises:
        argparse.ArgumentTypeError: *text* is not such an address (a URL, no port, ...).
    """
    host, _, port = text.rpartition(":")
    if not host or "/" in host or not port.isdecimal() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, a port 1 to 65535, not {text!r}")
    return host, int(port)


def _worker_name(text: str) -> str:
    """*text*, if it can name a Worker (an argparse type).

    Raises:
        argparse.ArgumentTypeError: it cannot name the Worker's folder in a session.
    """
    try:
        return check_name(text, "worker name")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
        "manager", help="run a Manager until Ctrl-C", description="Run a Manager until Ctrl-C."
    )
    manager.add_argument(
        "--port", type=_port, default=9000, help="default: %(default)s; 0 picks a free port"
    )
    manager.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (default: %(default)s)"
    )
    manager.add_argument(
        "--logdir", default="chimera-logs", help="where sessions are written (default: %(default)s)"
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
    )
    demo.add_argument("--seconds", type=float, default=10.0, help="how long to record")
    demo.add_argument("--logdir", default="chimera-sessions", help="where the session goes")
    demo.add_argument("--camera", type=int, default=None, metavar="INDEX", help="a real camera")
    demo.add_argument(
        "--microphone",
        default=None,
        metavar="DEVICE",
        help="a real input device, or 'default' (needs: pip install sounddevice)",
    )
    return parser


async def _until(signals: AsyncIterator[int]) -> None:
    """Return at the first signal *signals* receives."""
    async for signum in signals:
        print(f"chimera: {signal.Signals(signum).name}, stopping", file=sys.stderr, flush=True)
        return


async def _run_manager(args: argparse.Namespace, signals: AsyncIterator[int]) -> int:
    from ._manager import AsyncManager

    token = args.token if args.token is not None else os.environ.get("CHIMERA_TOKEN")
    try:
        manager = AsyncManager(args.logdir, args.port, host=args.host, token=token or None)
        async with manager:
            print(f"chimera manager listening on {manager.host}:{manager.port}", flush=True)
            await _until(signals)
    except OSError as exc:  # the port is taken, or the host is not this machine's
        print(f"chimera manager: {exc}", file=sys.stderr)
        return 1
    return 0


async def _run_worker(args: argparse.Namespace, signals: AsyncIterator[int]) -> int:
    from ._worker import AsyncWorker

    host, port = args.manager
    manager = f"{host}:{port}"
    async with AsyncWorker(args.name, delete_temp=not args.keep_temp, token=args.token) as worker:
        try:
            connected = await worker.connect(host, port)
        except PermissionError as exc:
            print(f"chimera worker: {exc}", file=sys.stderr)
            return 1
        if not connected:
            print(f"chimera worker: no manager at {manager}", file=sys.stderr)
            return 1
        print(f"chimera worker {args.name!r} connected to {manager}", flush=True)
        async with trio.open_nursery() as nursery:

            async def until(event: Callable[[], Awaitable[None]]) -> None:
                await event()
                nursery.cancel_scope.cancel()

            nursery.start_soon(until, partial(_until, signals))
            nursery.start_soon(until, worker.wait_for_disconnect)
        if not worker.connected:
            print("chimera worker: the manager left", flush=True)
    return 0


async def _run_demo(args: argparse.Namespace, signals: AsyncIterator[int]) -> int:
    from ._demo import run_demo
    from ._errors import NodeError

    microphone = args.microphone
    if microphone is not None and microphone.isdigit():
        microphone = int(microphone)
    async with trio.open_nursery() as nursery:
        enough = trio.Event()

        async def interrupt() -> None:
            await _until(signals)  # the first: stop recording, collect what was recorded
            enough.set()
            await _until(signals)  # the second: stop at once
            print("chimera demo: interrupted; the session is not collected", file=sys.stderr)
            nursery.cancel_scope.cancel()

        nursery.start_soon(interrupt)
        try:
            await run_demo(args.seconds, args.logdir, args.camera, microphone, enough=enough)
        except (NodeError, ValueError, OSError) as exc:
            print(f"chimera demo: {exc}", file=sys.stderr)
            nursery.cancel_scope.cancel()
            return 1
        nursery.cancel_scope.cancel()
        return 0
    return 1  # interrupted


async def _run(args: argparse.Namespace) -> int:
    # Ctrl-C and SIGTERM are received as events from the start, so that they
    # end the run by leaving its blocks, never as a KeyboardInterrupt in
    # whatever task happens to run.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        run = {"manager": _run_manager, "worker": _run_worker, "demo": _run_demo}[args.command]
        return await run(args, signals)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 after Ctrl-C or SIGTERM too)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    # The demo says how it goes itself: only warnings and errors from the log,
    # and how collecting goes.
    level = logging.WARNING if args.command == "demo" else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("chimera.collect").setLevel(logging.INFO)
    return trio.run(_run, args)


if __name__ == "__main__":
    raise SystemExit(main())
