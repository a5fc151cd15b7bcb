#!/usr/bin/env python3
"""Benchmark of the ``transports`` data plane against a raw Trio stream, between two processes.

For each message size and each backend, the parent process binds (or listens)
and sends; a child process (this script, ``--role receiver``) connects over
loopback and receives. On a machine with two CPUs or more, the sender and the
receiver are pinned to one CPU each (``--no-pin`` to leave them to the
scheduler, which makes the numbers swing by 2x). Each measurement has phases:

1. warm-up: a few messages, not counted;
2. throughput: the parent sends as fast as it can for ``--seconds``; the
   receiver times the messages from the first to the last one it received:
   msg/s, and MB/s of payload (1 MB = 10^6 bytes);
3. drain: one marker message; the receiver says on its stdout when it has it,
   with the time per message it measured, so the next phase starts with an
   empty pipe;
4. latency: a few hundred messages, paced at max(1 ms, twice the time per
   message measured in phase 2), each stamped with ``time.perf_counter_ns()``
   (CLOCK_MONOTONIC, one clock for every process on Linux); the receiver
   subtracts the stamp from its clock once the whole message is in its hands:
   one-way latency, p50 and p99 in microseconds.

Then the parent ends the stream and the receiver prints its measurements as one
JSON line. Each cell is measured ``--rounds`` times, interleaved with the
other cells (sizes, then backends, innermost): the table shows the median rate
and the latency percentiles of all rounds' samples together.

The baselines are raw Trio streams over the same sockets (``raw-tcp``,
``raw-unix``): length prefix + header + payload written with ``send_all``,
read by a buffered reader that ``recv_into``-s each payload into one
preallocated ``bytearray``: the best a plain socket does. Both ends ask for
the same 4 MiB socket buffers as the ``tcp`` backend. Each transports row is
compared with the raw stream of its socket family: ``tcp`` and ``nng+tcp``
with ``raw-tcp``, ``unix`` and ``nng+ipc`` with ``raw-unix``; the baselines
a selected backend needs are always measured too.

Transports messages are ``[16-byte header, payload]``, on ``RELIABLE`` links of
capacity 8 (``--capacity``).

Usage::

    python benchmarks/data_plane.py                     # everything (~3 minutes)
    python benchmarks/data_plane.py --quick             # a smoke test (~20 s)
    python benchmarks/data_plane.py --sizes 1k,6.2m --backends tcp,unix --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import socket as stdlib_socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import trio

import transports

_HERE = os.path.dirname(os.path.abspath(__file__))

# --- the messages ----------------------------------------------------------------

#: The first frame of every message: send time (perf_counter_ns), sequence number, phase.
HEADER = struct.Struct("<QIHH")
#: Raw streams: each message is prefixed with the length of header + payload.
PREFIX = struct.Struct("<Q")

PHASE_WARMUP = 0
PHASE_THROUGHPUT = 1
#: One message after the throughput phase: the receiver says on its stdout when it has it,
#: so the latency phase starts with the pipe empty.
PHASE_DRAIN = 2
PHASE_LATENCY = 3
#: What the receiver prints when it has received the PHASE_DRAIN message, followed by
#: the nanoseconds per message it measured in the throughput phase (which sets the pace
#: of the latency phase).
DRAINED = "drained"

#: Socket buffers asked for on raw streams (the same as the tcp backend's).
SOCKET_BUFFER = 4 * 1024 * 1024
#: Raw sender: payloads up to this size are joined with their prefix into one write
#: (as the tcp backend does with small frames); larger ones are written as they are.
SMALL_PAYLOAD = 64 * 1024
#: Raw receiver: size of the reusable read buffer that prefixes and small payloads go through.
READ_BUFFER = 256 * 1024

#: Seconds to wait for the child to connect.
CONNECT_TIMEOUT = 20.0
#: Seconds the outlet's close waits for the inlet's acknowledgement.
CLOSE_TIMEOUT = 10.0
#: Seconds to wait for the receiver to take in the throughput phase, and for its report.
DRAIN_TIMEOUT = 30.0
#: Pause between the end of the drain and the first latency sample.
SETTLE = 0.05

# --- the rows --------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """One row of the table: how to make the address, and which raw stream it is compared with."""

    name: str
    #: ``"tcp"`` or ``"unix"``: the socket family, which picks the baseline.
    family: str
    #: True for the raw Trio streams (the baselines).
    raw: bool
    #: The bind address; ``{dir}`` is a short temporary folder, ``{tag}`` unique per cell.
    template: str

    def address(self, directory: str, tag: str) -> str:
        """The bind address for one cell."""
        return self.template.format(dir=directory, tag=tag)


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("raw-tcp", "tcp", True, "tcp://127.0.0.1:0"),
        Backend("raw-unix", "unix", True, "unix://{dir}/raw-{tag}.sock"),
        Backend("tcp", "tcp", False, "tcp://127.0.0.1:0"),
        Backend("unix", "unix", False, "unix://{dir}/tp-{tag}.sock"),
        Backend("nng+tcp", "tcp", False, "nng+tcp://127.0.0.1:0"),
        Backend("nng+ipc", "unix", False, "nng+ipc://{dir}/nng-{tag}.ipc"),
    )
}
#: The raw stream each socket family is compared with.
BASELINES = {"tcp": "raw-tcp", "unix": "raw-unix"}

DEFAULT_SIZES = "1k,100k,1m,6.2m"
#: Targets of the tcp backend's rate, relative to raw-tcp, by message size.
TCP_TARGETS = {1_000: 0.5, 1_000_000: 0.8, 6_200_000: 0.8}

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def parse_size(text: str) -> int:
    """``"1k"`` -> 1000, ``"6.2m"`` -> 6200000, ``"64ki"`` -> 65536 (a trailing ``b`` is allowed).

    Raises:
        ValueError: not a size.
    """
    s = text.strip().lower().removesuffix("b")
    number = s.rstrip("kmgi")
    suffix = s[len(number) :]
    try:
        if suffix not in _SUFFIXES:
            raise ValueError
        size = round(float(number) * _SUFFIXES[suffix])
    except ValueError:
        raise ValueError(f"not a size: {text!r} (examples: 1000, 1k, 6.2m, 64ki)") from None
    if size < 1:
        raise ValueError(f"size {text!r} is less than one byte")
    return size


def format_size(size: int) -> str:
    """A short, readable size: ``1 KB``, ``6.2 MB``, ``64 KiB``."""
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= factor and (size * 10) % factor == 0:
            return f"{size / factor:g} {unit}"
    for unit, factor in (("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"


def _tune(sock: trio.socket.SocketType) -> None:
    """Ask for the socket buffers the tcp backend asks for."""
    for option in (stdlib_socket.SO_SNDBUF, stdlib_socket.SO_RCVBUF):
        try:
            sock.setsockopt(stdlib_socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            pass


def _split_address(address: str) -> tuple[str, str, int]:
    """``tcp://HOST:PORT`` -> ("tcp", HOST, PORT); ``unix:///PATH`` -> ("unix", PATH, 0)."""
    scheme, _, rest = address.partition("://")
    if scheme == "unix":
        return scheme, rest, 0
    host, _, port = rest.rpartition(":")
    return scheme, host, int(port)


# --- the receiver (child process) ------------------------------------------------


class _Tally:
    """What the receiver measures: the throughput phase's span and the latencies."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.messages = 0
        self.throughput_messages = 0
        self.first_ns = 0
        self.last_ns = 0
        self.latencies_ns: list[int] = []

    def record(self, now_ns: int, header: bytes | memoryview, payload_size: int) -> None:
        """Count one message received at *now_ns*; say so on stdout if it is the drain marker.

        Raises:
            ValueError: the payload does not have the expected size.
        """
        if payload_size != self.size:
            raise ValueError(f"payload of {payload_size} bytes, expected {self.size}")
        sent_ns, _, phase, _ = HEADER.unpack(header)
        self.messages += 1
        if phase == PHASE_THROUGHPUT:
            if not self.throughput_messages:
                self.first_ns = now_ns
            self.last_ns = now_ns
            self.throughput_messages += 1
        elif phase == PHASE_LATENCY:
            self.latencies_ns.append(now_ns - sent_ns)
        elif phase == PHASE_DRAIN:
            spans = max(1, self.throughput_messages - 1)
            sys.stdout.write(f"{DRAINED} {(self.last_ns - self.first_ns) // spans}\n")
            sys.stdout.flush()

    def report(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "throughput_messages": self.throughput_messages,
            "throughput_ns": self.last_ns - self.first_ns,
            "latencies_ns": self.latencies_ns,
        }


class _RawReader:
    """Buffered reads from a socket: small pieces through one reusable buffer, large
    ones received straight into their destination."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._buffer = bytearray(READ_BUFFER)
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0

    async def read_into(self, out: memoryview) -> bool:
        """Fill *out*; False if the stream ended cleanly before its first byte.

        Raises:
            EOFError: the stream ended inside *out*.
        """
        wanted = len(out)
        got = min(wanted, self._end - self._start)
        if got:
            out[:got] = self._view[self._start : self._start + got]
            self._start += got
        while got < wanted:
            if wanted - got >= READ_BUFFER // 2:  # large: straight into place
                received = await self._sock.recv_into(out[got:])
                if not received:
                    raise EOFError("the stream ended inside a message")
                got += received
                continue
            received = await self._sock.recv_into(self._view)
            if not received:
                if got == 0:
                    return False
                raise EOFError("the stream ended inside a message")
            take = min(received, wanted - got)
            out[got : got + take] = self._view[:take]
            got += take
            self._start, self._end = take, received
        return True


async def _receive_raw(address: str, size: int, tally: _Tally) -> None:
    scheme, host, port = _split_address(address)
    if scheme == "unix":
        stream = await trio.open_unix_socket(host)
    else:
        stream = await trio.open_tcp_stream(host, port)
    async with stream:
        _tune(stream.socket)
        reader = _RawReader(stream.socket)
        head = bytearray(PREFIX.size + HEADER.size)
        head_view = memoryview(head)
        payload = memoryview(bytearray(size))
        header_view = head_view[PREFIX.size :]
        while await reader.read_into(head_view):
            (length,) = PREFIX.unpack_from(head)
            body = length - HEADER.size
            if not 0 <= body <= size:
                raise ValueError(f"message of {length} bytes, expected {size + HEADER.size}")
            await reader.read_into(payload[:body])
            tally.record(time.perf_counter_ns(), header_view, body)


async def _receive_transports(address: str, capacity: int, tally: _Tally) -> None:
    inlet = await transports.connect(
        address, delivery=transports.Delivery.RELIABLE, capacity=capacity
    )
    async with inlet:
        while True:
            try:
                frames = await inlet.receive()
            except trio.EndOfChannel:
                break
            now = time.perf_counter_ns()
            if len(frames) != 2:
                raise ValueError(f"message of {len(frames)} frames, expected 2")
            tally.record(now, frames[0], frames[1].nbytes)


async def receiver_main(args: argparse.Namespace) -> None:
    """The child: connect, receive until the end of stream, print one JSON line."""
    backend = BACKENDS[args.backend]
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    tally = _Tally(args.size)
    with trio.fail_after(args.timeout):
        if backend.raw:
            await _receive_raw(args.address, args.size, tally)
        else:
            await _receive_transports(args.address, args.capacity, tally)
    sys.stdout.write(json.dumps(tally.report()) + "\n")
    sys.stdout.flush()


# --- the sender (parent process) -------------------------------------------------


@dataclass
class Options:
    """The run's settings."""

    seconds: float
    latency_samples: int
    min_latency_samples: int
    capacity: int
    cell_timeout: float
    #: CPU the sender and the receiver are pinned to (None: not pinned).
    sender_cpu: int | None = None
    receiver_cpu: int | None = None


@dataclass
class Round:
    """One measurement of one backend at one size (one receiver process)."""

    #: Receiver's rate, first to last message of the throughput phase.
    msgs_per_s: float | None = None
    #: Sender's rate over the throughput phase (it runs ahead by what the pipe holds).
    sender_msgs_per_s: float | None = None
    throughput_messages: int = 0
    latency_interval_ms: float | None = None
    latencies_us: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    error: str | None = None


@dataclass
class Cell:
    """The result of one backend at one size: the median rate of its rounds, and the
    latency percentiles of all their samples together."""

    backend: str
    family: str
    size: int
    msgs_per_s: float | None = None
    mb_per_s: float | None = None
    p50_us: float | None = None
    p99_us: float | None = None
    latency_samples: int = 0
    rate_vs_raw: float | None = None
    #: The rate of each successful round, in msg/s.
    round_msgs_per_s: list[float] = field(default_factory=list)
    #: The rate of every round in order, None where it failed (to pair rounds).
    round_rates: list[float | None] = field(default_factory=list)
    #: Set if no round succeeded; otherwise the errors of failed rounds, if any.
    error: str | None = None
    round_errors: list[str] = field(default_factory=list)

    @classmethod
    def from_rounds(cls, backend: Backend, size: int, rounds: Sequence[Round]) -> Cell:
        cell = cls(backend.name, backend.family, size)
        good = [r for r in rounds if r.error is None and r.msgs_per_s is not None]
        cell.round_rates = [
            r.msgs_per_s if r.error is None and r.msgs_per_s is not None else None for r in rounds
        ]
        cell.round_errors = [r.error for r in rounds if r.error is not None]
        if not good:
            cell.error = cell.round_errors[0] if cell.round_errors else "no measurement"
            return cell
        cell.round_msgs_per_s = [round(r.msgs_per_s, 1) for r in good if r.msgs_per_s]
        cell.msgs_per_s = float(np.median([r.msgs_per_s for r in good]))
        cell.mb_per_s = cell.msgs_per_s * size / 1e6
        latencies = [x for r in good for x in r.latencies_us]
        cell.latency_samples = len(latencies)
        if latencies:
            cell.p50_us, cell.p99_us = (float(v) for v in np.percentile(latencies, [50, 99]))
        return cell


class _StreamSender:
    """Length-prefixed messages on a raw Trio stream."""

    def __init__(self, stream: trio.SocketStream, payload: memoryview) -> None:
        self._stream = stream
        self._payload = payload
        self._small = bytes(payload) if payload.nbytes <= SMALL_PAYLOAD else None
        self._prefix = PREFIX.pack(HEADER.size + payload.nbytes)

    async def send(self, seq: int, phase: int) -> None:
        head = self._prefix + HEADER.pack(time.perf_counter_ns(), seq, phase, 0)
        if self._small is not None:
            await self._stream.send_all(head + self._small)
        else:
            await self._stream.send_all(head)
            await self._stream.send_all(self._payload)

    async def finish(self) -> None:
        """Send the end of file, and wait until the receiver closes its end."""
        await self._stream.send_eof()
        while await self._stream.receive_some(65536):
            pass


class _OutletSender:
    """``[header, payload]`` messages on a transports outlet."""

    def __init__(self, outlet: transports.Outlet, payload: memoryview) -> None:
        self._outlet = outlet
        self._payload = payload

    async def send(self, seq: int, phase: int) -> None:
        await self._outlet.send([HEADER.pack(time.perf_counter_ns(), seq, phase, 0), self._payload])

    async def finish(self) -> None:
        """End the stream; returns once the inlet acknowledged it."""
        await self._outlet.aclose()


class _Lines:
    """Lines of text from a stream (the receiver's stdout)."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> str | None:
        """The next line, without its end; None at the end of the stream."""
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some()
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8", "replace")


async def _drive(
    sender: _StreamSender | _OutletSender, lines: _Lines, options: Options, result: Round
) -> None:
    """The sender's phases: warm-up, throughput, drain, paced latency samples."""
    seq = 0
    warmup_until = time.perf_counter() + max(0.02, options.seconds / 10)
    warmup_sent = 0
    while warmup_sent < 8 or time.perf_counter() < warmup_until:
        await sender.send(seq, PHASE_WARMUP)
        seq += 1
        warmup_sent += 1

    start = time.perf_counter()
    deadline = start + options.seconds
    sent = 0
    while True:
        await sender.send(seq, PHASE_THROUGHPUT)
        seq += 1
        sent += 1
        now = time.perf_counter()
        if now >= deadline:
            break
    result.sender_msgs_per_s = sent / (now - start)

    # Wait until the receiver has everything: the latency phase starts with an empty pipe.
    await sender.send(seq, PHASE_DRAIN)
    seq += 1
    with trio.fail_after(DRAIN_TIMEOUT):
        line = await lines.next()
    word, _, ns_per_message = (line or "").partition(" ")
    if word != DRAINED or not ns_per_message.isdigit():
        raise RuntimeError(f"the receiver said {line!r}, expected {DRAINED!r} and a number")
    await trio.sleep(SETTLE)

    # Latency: paced at twice the time one message took at the measured throughput, at
    # most about 2 * seconds of them (but at least min_latency_samples).
    interval = max(0.001, 2 * int(ns_per_message) / 1e9)
    budget = max(1.0, 2 * options.seconds)
    samples = min(options.latency_samples, max(options.min_latency_samples, int(budget / interval)))
    result.latency_interval_ms = interval * 1e3
    hard_stop = time.perf_counter() + 4 * budget + 5
    t0 = trio.current_time()
    for i in range(samples):
        await trio.sleep_until(t0 + i * interval)
        if time.perf_counter() > hard_stop:  # a very slow backend: keep what we have
            break
        await sender.send(seq, PHASE_LATENCY)
        seq += 1


async def _child(
    command: list[str],
    out: dict[str, Any],
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the receiver, its stdout a pipe (``Process.stdout``); its exit code goes to
    ``out["rc"]``.

    If it fails, *scope* (the sender's) is cancelled: nobody is listening any more.
    Cancelled, it kills the receiver. Either way, it returns once the receiver has exited.
    """
    done = await trio.run_process(
        command, stdout=subprocess.PIPE, check=False, task_status=task_status
    )
    out["rc"] = done.returncode
    if done.returncode != 0:
        scope.cancel()


async def _raw_listen(address: str) -> tuple[trio.SocketListener, str]:
    """A listener for a raw stream at *address*, and its concrete address."""
    scheme, host, port = _split_address(address)
    if scheme == "unix":
        sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    else:
        sock = trio.socket.socket(stdlib_socket.AF_INET, stdlib_socket.SOCK_STREAM)
        sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
    try:
        await sock.bind(host if scheme == "unix" else (host, port))
        sock.listen(1)
        _tune(sock)
    except BaseException:
        sock.close()
        raise
    if scheme != "unix":
        address = f"tcp://{host}:{sock.getsockname()[1]}"
    return trio.SocketListener(sock), address


def _child_command(backend: Backend, address: str, size: int, options: Options) -> list[str]:
    return [
        sys.executable,
        os.path.abspath(__file__),
        "--role",
        "receiver",
        "--backend",
        backend.name,
        "--address",
        address,
        "--size",
        str(size),
        "--capacity",
        str(options.capacity),
        "--timeout",
        str(options.cell_timeout),
        *(["--cpu", str(options.receiver_cpu)] if options.receiver_cpu is not None else []),
    ]


async def _measure(
    backend: Backend,
    address: str,
    payload: memoryview,
    result: Round,
    options: Options,
    child: dict[str, Any],
) -> None:
    """Bind, start the receiver, send; ``child["report"]`` gets the receiver's report."""
    size = payload.nbytes
    async with trio.open_nursery() as nursery:
        sender: _StreamSender | _OutletSender
        if backend.raw:
            listener, address = await _raw_listen(address)
            async with listener:
                command = _child_command(backend, address, size, options)
                process = await nursery.start(_child, command, child, nursery.cancel_scope)
                lines = _Lines(process.stdout)
                with trio.fail_after(CONNECT_TIMEOUT):
                    stream = await listener.accept()
            async with stream:
                _tune(stream.socket)
                sender = _StreamSender(stream, payload)
                await _drive(sender, lines, options, result)
                with trio.fail_after(CLOSE_TIMEOUT):
                    await sender.finish()
        else:
            outlet = await transports.bind(address, close_timeout=CLOSE_TIMEOUT)
            async with outlet:
                command = _child_command(backend, outlet.address, size, options)
                process = await nursery.start(_child, command, child, nursery.cancel_scope)
                lines = _Lines(process.stdout)
                with trio.fail_after(CONNECT_TIMEOUT):
                    await outlet.wait_for_inlets(1)
                sender = _OutletSender(outlet, payload)
                await _drive(sender, lines, options, result)
                with trio.fail_after(CLOSE_TIMEOUT + 5):
                    await sender.finish()
        with trio.fail_after(DRAIN_TIMEOUT):
            child["report"] = await lines.next()


async def measure(
    backend: Backend, payload: memoryview, options: Options, directory: str, tag: str
) -> Round:
    """Measure one backend at one message size, with a receiver process of its own."""
    result = Round()
    child: dict[str, Any] = {}
    began = time.perf_counter()
    try:
        with trio.fail_after(options.cell_timeout):
            address = backend.address(directory, tag)
            await _measure(backend, address, payload, result, options, child)
    except Exception as exc:
        result.error = _describe(exc)
        return result
    finally:
        result.wall_s = round(time.perf_counter() - began, 2)
    if child.get("rc") != 0:
        result.error = f"receiver exited with code {child.get('rc')}"
        return result
    try:
        report = json.loads(child.get("report") or "")
    except ValueError as exc:
        result.error = f"no report from the receiver: {exc}"
        return result
    count, span_ns = report["throughput_messages"], report["throughput_ns"]
    result.throughput_messages = count
    if count >= 2 and span_ns > 0:
        result.msgs_per_s = (count - 1) / (span_ns / 1e9)
    else:
        result.error = f"only {count} messages in the throughput phase"
    result.latencies_us = [ns / 1e3 for ns in report["latencies_ns"]]
    return result


def _describe(exc: BaseException) -> str:
    """A one-line description of *exc*, looking inside exception groups."""
    # (An exception group, without naming the class: Python 3.10 has it only as a backport.)
    while len(getattr(exc, "exceptions", ())) == 1:
        exc = exc.exceptions[0]  # type: ignore[attr-defined]
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


# --- the report ------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:,.{digits}f}"


def add_ratios(cells: Sequence[Cell]) -> None:
    """Set each transports cell's rate relative to the raw stream of its family, same size.

    The ratio is the median over rounds of the rate in that round divided by
    the raw stream's rate in the same round (measured seconds apart): the
    machine's drift from round to round, which is larger here than the
    differences measured, cancels out.
    """
    raw = {(c.backend, c.size): c for c in cells if BACKENDS[c.backend].raw}
    for cell in cells:
        if BACKENDS[cell.backend].raw:
            continue
        base = raw.get((BASELINES[cell.family], cell.size))
        if base is None:
            continue
        ratios = [
            rate / base_rate
            for rate, base_rate in zip(cell.round_rates, base.round_rates, strict=False)
            if rate and base_rate
        ]
        if ratios:
            cell.rate_vs_raw = float(np.median(ratios))


def markdown_table(cells: Sequence[Cell], options: Options, rounds: int) -> str:
    """The results as a Markdown table, with a note on what the columns mean."""
    pinned = ""
    if options.sender_cpu is not None:
        pinned = f" (sender on CPU {options.sender_cpu}, receiver on CPU {options.receiver_cpu})"
    lines = [
        f"Two processes over loopback{pinned}; msg/s and MB/s: median of {rounds} round(s) "
        f"of {options.seconds:g} s; transports: RELIABLE, capacity {options.capacity}.",
        "MB/s counts payload bytes (1 MB = 10^6 B). Latency is one-way, paced sends. "
        "`rate vs raw` = msg/s relative to the raw Trio stream of the same socket family "
        "(tcp, nng+tcp vs raw-tcp; unix, nng+ipc vs raw-unix), measured in the same round: "
        "median of the rounds' ratios.",
        "",
        "| backend | size | msg/s | MB/s | p50 µs | p99 µs | rate vs raw |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        if c.error:
            error = c.error.replace("|", "/")
            lines.append(f"| {c.backend} | {format_size(c.size)} | error: {error} ||||||")
            continue
        ratio = "baseline" if BACKENDS[c.backend].raw else _fmt_ratio(c.rate_vs_raw)
        lines.append(
            f"| {c.backend} | {format_size(c.size)} | {_fmt(c.msgs_per_s)} | "
            f"{_fmt(c.mb_per_s, 1)} | {_fmt(c.p50_us)} | {_fmt(c.p99_us)} | {ratio} |"
        )
    return "\n".join(lines)


def _fmt_ratio(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.0%}"


def target_checks(cells: Sequence[Cell]) -> list[str]:
    """The issue's targets: tcp vs raw-tcp by size; unix faster than tcp."""
    by_key = {(c.backend, c.size): c for c in cells}
    lines = []
    for size, target in TCP_TARGETS.items():
        tcp = by_key.get(("tcp", size))
        if tcp is None or tcp.rate_vs_raw is None:
            continue
        verdict = "ok" if tcp.rate_vs_raw >= target else "MISSED"
        lines.append(
            f"- tcp at {format_size(size)}: {tcp.rate_vs_raw:.0%} of raw-tcp "
            f"(target >= {target:.0%}): {verdict}"
        )
    for (name, size), unix in by_key.items():
        tcp = by_key.get(("tcp", size))
        if name != "unix" or tcp is None or not unix.msgs_per_s or not tcp.msgs_per_s:
            continue
        verdict = "ok" if unix.msgs_per_s > tcp.msgs_per_s else "MISSED"
        lines.append(
            f"- unix at {format_size(size)}: {unix.msgs_per_s / tcp.msgs_per_s:.2f}x the tcp "
            f"backend's rate (target > 1): {verdict}"
        )
    return lines


def noisy_cells(cells: Sequence[Cell], threshold: float = 0.3) -> list[str]:
    """The cells whose rounds' rates spread over more than *threshold* of their median."""
    lines = []
    for c in cells:
        rates = c.round_msgs_per_s
        if len(rates) >= 2 and c.msgs_per_s:
            spread = (max(rates) - min(rates)) / c.msgs_per_s
            if spread > threshold:
                shown = ", ".join(f"{r:,.0f}" for r in rates)
                lines.append(
                    f"- {c.backend} at {format_size(c.size)}: rounds {shown} msg/s "
                    f"(spread {spread:.0%} of the median)"
                )
    return lines


# --- the command line ------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark transports backends against a raw Trio stream, two processes.",
    )
    parser.add_argument("--quick", action="store_true", help="a run ~10x shorter (smoke test)")
    parser.add_argument(
        "--sizes", default=DEFAULT_SIZES, help=f"message sizes (default {DEFAULT_SIZES})"
    )
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help=f"rows, among {', '.join(BACKENDS)} (baselines are added as needed)",
    )
    parser.add_argument(
        "--seconds", type=float, help="throughput phase per cell (default 1.5, 0.15 with --quick)"
    )
    parser.add_argument(
        "--latency-samples",
        type=int,
        help="paced messages per cell (default 300, 30 with --quick; fewer if the pace is slow)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="measurements of each cell, interleaved; the table shows the median rate "
        "(default 3, 1 with --quick)",
    )
    parser.add_argument(
        "--capacity",
        type=int,
        default=8,
        help="capacity of the transports links (default 8); the sender may queue this many "
        "messages, which the receiver must take in before the latency phase",
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin the sender and the receiver to two different CPUs",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results to PATH")
    # The child's side.
    parser.add_argument(
        "--role", choices=["sender", "receiver"], default="sender", help=argparse.SUPPRESS
    )
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=120.0, help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "receiver":
        if args.backend not in BACKENDS or not args.address or not args.size:
            parser.error("--role receiver needs --backend, --address and --size")
        return args
    try:
        args.size_list = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError as exc:
        parser.error(str(exc))
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names or not args.size_list:
        parser.error(f"unknown backend(s) {unknown}; the known ones are {', '.join(BACKENDS)}")
    wanted = set(names) | {BASELINES[BACKENDS[n].family] for n in names}
    args.backend_list = [BACKENDS[n] for n in BACKENDS if n in wanted]
    if args.capacity < 1:
        parser.error("--capacity must be at least 1")
    if args.seconds is not None and not args.seconds > 0:
        parser.error("--seconds must be positive")
    if args.latency_samples is not None and args.latency_samples < 1:
        parser.error("--latency-samples must be at least 1")
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


class Terminated(Exception):
    """The run got SIGTERM (and cleaned up: receivers killed, temporary files removed)."""


async def sender_main(args: argparse.Namespace) -> list[Cell]:
    """Run every cell: rounds outermost, then sizes, then backends (so that each ratio
    compares measurements made close in time).

    Raises:
        Terminated: on SIGTERM.
    """
    seconds = args.seconds if args.seconds is not None else (0.15 if args.quick else 1.5)
    samples = args.latency_samples or (30 if args.quick else 300)
    options = Options(
        seconds=seconds,
        latency_samples=samples,
        min_latency_samples=min(samples, 20 if args.quick else 100),
        capacity=args.capacity,
        cell_timeout=60 + 10 * seconds,
    )
    if args.pin and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= 2:
            options.sender_cpu, options.receiver_cpu = cpus[0], cpus[1]
            os.sched_setaffinity(0, {options.sender_cpu})
    args.options = options
    total = args.rounds * len(args.size_list) * len(args.backend_list)
    rounds: dict[tuple[str, int], list[Round]] = {}
    directory = tempfile.mkdtemp(prefix="trb", dir="/tmp")
    rng = np.random.default_rng(0)
    payloads = {
        size: memoryview(rng.integers(0, 256, size, dtype=np.uint8)).cast("B")
        for size in args.size_list
    }
    done = 0
    terminated = False

    async def run_all(scope: trio.CancelScope) -> None:
        nonlocal done
        for round_index in range(args.rounds):
            for size, payload in payloads.items():
                for backend in args.backend_list:
                    done += 1
                    print(
                        f"[{done}/{total}] round {round_index + 1}/{args.rounds}: "
                        f"{backend.name} {format_size(size)} ...",
                        file=sys.stderr,
                        flush=True,
                    )
                    result = await measure(backend, payload, options, directory, str(done))
                    if result.error:
                        print(f"    error: {result.error}", file=sys.stderr, flush=True)
                    rounds.setdefault((backend.name, size), []).append(result)
        scope.cancel()

    try:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_all, nursery.cancel_scope)
                async for _ in signals:
                    terminated = True
                    nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if terminated:
        raise Terminated
    cells = [
        Cell.from_rounds(backend, size, rounds[backend.name, size])
        for size in args.size_list
        for backend in args.backend_list
    ]
    add_ratios(cells)
    return cells


def _git_commit() -> str | None:
    """The commit of the checkout this script is in, if any, with ``+dirty`` and a hash of
    the changes if files are changed (so that a change during a run shows)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_HERE, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=_HERE,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    if not dirty.stdout.strip():
        return head.stdout.strip()
    try:
        diff = subprocess.run(
            ["git", "diff", "HEAD"], cwd=_HERE, capture_output=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        diff = b""
    return f"{head.stdout.strip()}+dirty.{hashlib.sha1(diff).hexdigest()[:8]}"


def _interrupted(exc: BaseException) -> bool:
    """Whether *exc* is a KeyboardInterrupt, or a group of nothing else."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    inner = getattr(exc, "exceptions", None)
    return bool(inner) and all(_interrupted(e) for e in inner)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "receiver":
        try:
            trio.run(receiver_main, args)
        except BaseException as exc:
            if not _interrupted(exc):
                traceback.print_exc()
            return 1
        return 0
    began = time.perf_counter()
    commit = _git_commit()
    try:
        cells = trio.run(sender_main, args)
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except BaseException as exc:
        if not _interrupted(exc):
            raise
        print("interrupted", file=sys.stderr)
        return 130
    print(markdown_table(cells, args.options, args.rounds))
    checks = target_checks(cells)
    if checks:
        print("\nTargets:\n" + "\n".join(checks))
    noisy = noisy_cells(cells)
    if noisy:
        print("\nNoisy cells (the machine was busy, or the rate is unstable):\n" + "\n".join(noisy))
    print(f"\n(total {time.perf_counter() - began:.0f} s)", file=sys.stderr)
    if _git_commit() != commit:
        print("warning: the checkout changed during the run", file=sys.stderr)
    if args.json:
        document = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "trio": trio.__version__,
            "commit": commit,
            "rounds": args.rounds,
            "options": asdict(args.options),
            "cells": [asdict(c) for c in cells],
        }
        with open(args.json, "w") as f:
            json.dump(document, f, indent=2)
    return 0 if not any(c.error for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
