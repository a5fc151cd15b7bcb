#!/usr/bin/env python3
"""What the shape of a node's path costs, without chimera: paced 1 KB one-way latency.

A 1 KB message goes from one process to another over a Unix stream socket, at
1 kHz (paced as ``pipeline.py``'s ``SmallSource``: ``time.sleep``, or
``trio.sleep`` on an event loop, until the next deadline). No framework, no
encoding: only the hand-offs between threads that each kind of node makes.
Each shape is named sender / receiver:

- ``socket / socket``: the thread that paces writes to a blocking socket; the
  receiving thread reads it (Lab Streaming Layer's shape).
- ``loop / loop``: a Trio event loop paces and writes (giving up the CPU after
  the write, as ``transports`` does); the receiver's event loop reads: the
  shape of chimera's ``async def step``.
- ``thread / loop`` and ``loop / thread``: one side hands over between a
  thread and its event loop.
- ``thread / thread``: a thread paces and hands each message to its event
  loop (a socket pair wakes it, as chimera's ``StepLoop`` does), which
  writes; the receiver's event loop reads and hands the message to a thread
  (a condition, then it gives up the CPU): the shape of chimera's
  ``def step`` until its 20th session (still that of chunks that come in
  bursts).
- ``socket / thread`` and ``socket / loop``: the thread that paces writes to
  the socket itself (what a ``def step`` node's thread does with a chunk
  that comes alone, since the 20th session).

Each message carries ``time.perf_counter_ns()`` (CLOCK_MONOTONIC, one clock for
every process on Linux) from the moment it is made; the receiving thread (or
task) subtracts it from its clock once it holds the message. The shapes run
``--rounds`` times each, interleaved, with Lab Streaming Layer's paced latency
(``_lsl.py``, if ``pylsl`` is installed) in each round: the table gives the
median p50 and p99 over the rounds, and each p50 against LSL's.

Usage::

    python benchmarks/hand_offs.py [--rounds 3] [--seconds 3] [--quick]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import trio

RATE = 1000.0
#: Length prefix, then the time the message was made; 1 KB in all.
HEADER = struct.Struct("<Iq")
PAYLOAD = bytes(1024 - HEADER.size)
#: The stamp of the message that ends a run.
END = -1
SHAPES = [
    ("socket", "socket"),
    ("loop", "loop"),
    ("thread", "loop"),
    ("loop", "thread"),
    ("thread", "thread"),
    ("socket", "thread"),
    ("socket", "loop"),
]
#: Gives up the CPU after a write or a hand-over, as chimera does (see _user_thread.py).
_yield = getattr(os, "sched_yield", lambda: None)


def _message(stamp: int) -> bytes:
    return HEADER.pack(HEADER.size - 4 + len(PAYLOAD), stamp) + PAYLOAD


def _paced(seconds: float) -> Iterator[None]:
    """Yield at each deadline, ``RATE`` times a second, for *seconds* (the
    thread sleeps until each)."""
    deadline = time.perf_counter()
    end = deadline + seconds
    while deadline < end:
        deadline += 1 / RATE
        delay = deadline - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        yield


def send(shape: str, path: str, seconds: float) -> None:
    """Connect to the receiver at *path* and send paced messages, then the end."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    if shape == "socket":
        for _ in _paced(seconds):
            sock.sendall(_message(time.perf_counter_ns()))
        sock.sendall(_message(END))
    elif shape == "loop":
        trio.run(_send_from_loop, sock, seconds)
    else:
        trio.run(_send_from_thread, sock, seconds)
    sock.close()


async def _send_from_loop(sock: socket.socket, seconds: float) -> None:
    stream = trio.socket.from_stdlib_socket(sock)
    deadline = time.perf_counter()
    end = deadline + seconds
    while deadline < end:
        deadline += 1 / RATE
        await trio.sleep(max(0.0, deadline - time.perf_counter()))
        await stream.send(_message(time.perf_counter_ns()))
        _yield()
    await stream.send(_message(END))


async def _send_from_thread(sock: socket.socket, seconds: float) -> None:
    """A thread makes the messages; the event loop, woken through a socket
    pair, writes them."""
    stream = trio.socket.from_stdlib_socket(sock)
    box: collections.deque[bytes] = collections.deque()
    wake_in, wake_out = socket.socketpair()
    wake_in.setblocking(False)
    wake_out.setblocking(False)

    def hand_over(stamp: int) -> None:
        box.append(_message(stamp))  # (deque.append is atomic)
        try:
            wake_out.send(b"\0")
        except BlockingIOError:
            pass  # (a wake-up is on its way)

    def make() -> None:
        for _ in _paced(seconds):
            hand_over(time.perf_counter_ns())
        hand_over(END)

    threading.Thread(target=make, daemon=True).start()
    while True:
        await trio.lowlevel.wait_readable(wake_in)
        wake_in.recv(4096)
        while box:
            message = box.popleft()
            await stream.send(message)
            _yield()
            if HEADER.unpack_from(message)[1] == END:
                wake_in.close()
                wake_out.close()
                return


def _split(buffer: bytearray) -> list[bytes]:
    """Take every whole message out of *buffer*."""
    messages = []
    while len(buffer) >= HEADER.size:
        size = 4 + HEADER.unpack_from(buffer)[0]
        if len(buffer) < size:
            break
        messages.append(bytes(buffer[:size]))
        del buffer[:size]
    return messages


def receive(shape: str, path: str) -> list[int]:
    """Listen at *path*, say ``ready`` on stdout, and take one sender's
    messages until the end: each one's latency in ns."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    print("ready", flush=True)
    sock, _ = listener.accept()
    listener.close()
    latencies: list[int] = []

    def took(message: bytes) -> bool:
        """Count *message*'s latency; False at the end."""
        now = time.perf_counter_ns()
        stamp = HEADER.unpack_from(message)[1]
        if stamp == END:
            return False
        latencies.append(now - stamp)
        return True

    if shape == "socket":
        buffer = bytearray()
        while data := sock.recv(65536):
            buffer += data
            if not all(map(took, _split(buffer))):
                break
    elif shape == "loop":
        trio.run(_receive_on_loop, sock, lambda messages: all(map(took, messages)))
    else:
        _receive_on_thread(sock, took)
    sock.close()
    return latencies


async def _receive_on_loop(sock: socket.socket, take: Callable[[list[bytes]], bool]) -> None:
    """Read *sock* until *take* (given each read's whole messages) says the end came."""
    stream = trio.socket.from_stdlib_socket(sock)
    buffer = bytearray()
    while data := await stream.recv(65536):
        buffer += data
        if (messages := _split(buffer)) and not take(messages):
            return


def _receive_on_thread(sock: socket.socket, took: Callable[[bytes], bool]) -> None:
    """The event loop reads; a thread, woken through a condition, takes each message."""
    box: collections.deque[bytes] = collections.deque()
    work = threading.Condition()

    def take_all() -> None:
        while True:
            with work:
                while not box:
                    work.wait()
                messages = list(box)
                box.clear()
            if not all(map(took, messages)):
                return

    thread = threading.Thread(target=take_all)
    thread.start()

    def hand_over(messages: list[bytes]) -> bool:
        with work:
            box.extend(messages)
            work.notify()
        _yield()
        return all(HEADER.unpack_from(m)[1] != END for m in messages)

    trio.run(_receive_on_loop, sock, hand_over)
    thread.join()


def measure(sender: str, receiver: str, seconds: float) -> dict[str, float]:
    """One run of a shape, in two processes of this script: p50 and p99 in µs.

    Raises:
        SystemExit: a process failed (what it printed is shown).
    """
    with tempfile.TemporaryDirectory(prefix="chimera-hand-offs-") as folder:
        path = os.path.join(folder, "socket")
        script = os.path.abspath(__file__)
        reader = subprocess.Popen(
            [sys.executable, script, "--receive", receiver, path],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert reader.stdout is not None
            if reader.stdout.readline().strip() != "ready":
                raise SystemExit(f"the {receiver} receiver did not start")
            command = [sys.executable, script, "--send", sender, path, "--seconds", str(seconds)]
            subprocess.run(command, check=True)
            out, _ = reader.communicate(timeout=30)
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
    if reader.returncode != 0:
        raise SystemExit(f"the {receiver} receiver failed ({reader.returncode})")
    latencies = sorted(json.loads(out))
    return {
        "p50_us": latencies[len(latencies) // 2] / 1e3,
        "p99_us": latencies[len(latencies) * 99 // 100] / 1e3,
    }


def measure_lsl(seconds: float) -> dict[str, float] | None:
    """Lab Streaming Layer's paced p50 and p99 in µs, as ``pipeline.py`` measures
    them; None where it cannot be measured (no pylsl, or no liblsl).

    Raises:
        SystemExit: ``_lsl.py`` failed.
    """
    # (Imported here: pipeline imports chimera, which the measured processes need not.)
    from pipeline import lsl_missing, measure_lsl  # (this script's folder)

    if lsl_missing() is not None:
        return None
    return trio.run(measure_lsl, RATE, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="one round of 1 s")
    parser.add_argument("--send", nargs=2, metavar=("SHAPE", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--receive", nargs=2, metavar=("SHAPE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.send:
        send(*args.send, args.seconds)
        return
    if args.receive:
        print(json.dumps(receive(*args.receive)))
        return
    rounds, seconds = (1, 1.0) if args.quick else (args.rounds, args.seconds)
    results: dict[tuple[str, str], list[dict[str, float]]] = collections.defaultdict(list)
    for round_ in range(rounds):
        for shape in SHAPES:
            print(f"round {round_ + 1}/{rounds}: {shape[0]} / {shape[1]}", file=sys.stderr)
            results[shape].append(measure(*shape, seconds))
        if (lsl := measure_lsl(seconds)) is not None:
            results[("LSL", "")].append(lsl)
    lsl = results.get(("LSL", ""))
    lsl_p50 = statistics.median(r["p50_us"] for r in lsl) if lsl else None
    print(f"\n1 KB paced at {RATE:,.0f} Hz, one-way, {rounds} x {seconds:g} s (median of rounds)\n")
    print("| sender / receiver | p50 | p99 | p50 / LSL's |")
    print("|---|---:|---:|---:|")
    for (sender, receiver), runs in results.items():
        p50 = statistics.median(r["p50_us"] for r in runs)
        p99 = statistics.median(r["p99_us"] for r in runs)
        name = "Lab Streaming Layer 1.18" if sender == "LSL" else f"{sender} / {receiver}"
        ratio = f"{p50 / lsl_p50:.2f}x" if lsl_p50 else "(no pylsl)"
        print(f"| {name} | {p50:,.0f} µs | {p99:,.0f} µs | {ratio} |")


if __name__ == "__main__":
    main()
