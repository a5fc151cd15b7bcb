"""Nodes for the tests that run nodes in child processes (they import this module).

They report through files in a folder the test gives them, and through a
TCP connection to the test (:func:`notify`), since they run in other processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import trio

import chimera as cp


def notify(port: int, message: bytes = b"x") -> None:
    """Tell the test listening on *port* (loopback) something happened."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(message)


class Counter(cp.Node):
    """A source: 1, 2, ... *limit*, then nothing more."""

    def __init__(self, name: str, limit: int) -> None:
        super().__init__(name)
        self.limit = limit

    def prep(self):
        self.n = 0

    def step(self):
        if self.n == self.limit:
            threading.Event().wait(0.001)
            return None
        self.n += 1
        return self.n


class Pairs(Counter):
    """:class:`Counter` of (n, -n) tuples: values that travel pickled."""

    def step(self):
        n = super().step()
        return None if n is None else (n, -n)


class Camera(cp.Node):
    """A source that makes a chunk every 10 ms, forever; notifies *port*
    once it has made *made*."""

    def __init__(self, name: str, port: int, made: int) -> None:
        super().__init__(name)
        self.port, self.made = port, made

    def prep(self):
        self.n = 0

    def step(self):
        threading.Event().wait(0.01)
        self.n += 1
        if self.n == self.made:
            notify(self.port)
        return self.n


class Raises(cp.Node):
    """Its first step raises, as a step that names an input wrongly does."""

    def step(self, data_chunks):
        return data_chunks["no such input"]


class Interrupted(cp.Node):
    """An ``async def step`` that raises KeyboardInterrupt, as a SIGINT to its process does."""

    async def step(self, data_chunks):
        raise KeyboardInterrupt


class Talker(cp.Node):
    """A source that logs a warning every 10 ms, and sends nothing."""

    def step(self):
        self.logger.warning("talking")
        threading.Event().wait(0.01)


class SaysHello(cp.Node):
    """Logs a warning in its prep."""

    def prep(self):
        self.logger.warning("hello from my process")


class Doubler(cp.Node):
    def __init__(self, name: str, source: str) -> None:
        super().__init__(name)
        self.source = source

    def step(self, data_chunks):
        return 2 * data_chunks[self.source].get("default")["value"]


class Sink(cp.Node):
    """Keeps what its input sends; writes ``NAME.pid`` in prep and ``NAME.json`` in teardown.

    Notifies the test on *port* once it has *expect* values.
    """

    def __init__(self, name: str, folder: str, source: str, expect: int, port: int) -> None:
        super().__init__(name)
        self.folder, self.source, self.expect, self.port = folder, source, expect, port

    def prep(self):
        self.seen = []
        Path(self.folder, f"{self.name}.pid").write_text(str(os.getpid()))

    def step(self, data_chunks):
        self.seen.append(data_chunks[self.source].get("default")["value"])
        if len(self.seen) == self.expect:
            notify(self.port)

    def teardown(self):
        Path(self.folder, f"{self.name}.json").write_text(json.dumps(self.seen))


class RaisesInTeardown(Sink):
    """A :class:`Sink` whose ``teardown`` raises."""

    def teardown(self):
        raise OSError("the device is gone")


class WithAHelper(Sink):
    """A :class:`Sink` with a helper process forked by ``multiprocessing`` (as
    device and model libraries start them), which holds every file the node's
    process had open; writes its pid in ``NAME.helper``."""

    #: How ``multiprocessing`` starts it.
    start_method = "fork"

    def prep(self):
        import multiprocessing

        super().prep()
        self.helper = multiprocessing.get_context(self.start_method).Process(
            target=time.sleep, args=(600,), daemon=True
        )
        self.helper.start()
        Path(self.folder, f"{self.name}.helper").write_text(str(self.helper.pid))


class WithASpawnedHelper(WithAHelper):
    """A :class:`WithAHelper` whose helper is a fresh Python (``spawn``, as
    ``forkserver``'s are): it holds none of the node's pipes."""

    start_method = "spawn"


class ExecsAHelper(Counter):
    """A :class:`Counter` that starts a helper program, as some libraries do,
    that keeps every file descriptor it may (``close_fds=False``)."""

    def prep(self):
        import subprocess
        import sys

        super().prep()
        command = [sys.executable, "-c", "import time; time.sleep(600)"]
        self.helper = subprocess.Popen(command, close_fds=False)


class AsyncCounter(Counter):
    """:class:`Counter` with ``async def`` methods (on its process's event loop)."""

    async def prep(self):
        self.n = 0

    async def step(self):
        if self.n == self.limit:
            await trio.sleep_forever()  # until asked to stop
        self.n += 1
        return self.n


class AsyncSink(Sink):
    """:class:`Sink` with an ``async def step``."""

    async def step(self, data_chunks):
        await trio.lowlevel.checkpoint()
        Sink.step(self, data_chunks)


class Stubborn(cp.Node):
    """A source whose teardown never ends, and whose process ignores SIGTERM."""

    def __setstate__(self, state):  # unpickled in its process's main thread
        self.__dict__.update(state)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def step(self):
        time.sleep(0.01)

    def teardown(self):
        threading.Event().wait()


class EndsOnSigterm(cp.Node):
    """A source whose teardown never ends, and whose process, on SIGTERM,
    writes ``NAME.term`` in *folder* and exits (as a program cleans up)."""

    def __init__(self, name: str, folder: str) -> None:
        super().__init__(name)
        self.folder = folder

    def __setstate__(self, state):  # unpickled in its process's main thread
        self.__dict__.update(state)

        def clean_up(signum, frame):
            Path(self.folder, f"{self.name}.term").write_text("cleaned up")
            os._exit(0)

        signal.signal(signal.SIGTERM, clean_up)

    def step(self):
        time.sleep(0.01)

    def teardown(self):
        threading.Event().wait()


class SlowTeardown(cp.Node):
    """A source whose teardown takes a second."""

    def step(self):
        time.sleep(0.01)

    def teardown(self):
        time.sleep(1)


class BlocksItsLoop(cp.Node):
    """An async def step that blocks its event loop (the mistake: time.sleep)."""

    async def step(self):
        time.sleep(1.3)
        return 1


class StuckInTeardown(cp.Node):
    """A source whose teardown never ends (its process ends on SIGTERM)."""

    def step(self):
        time.sleep(0.01)

    def teardown(self):
        threading.Event().wait()


class BlocksItsLoopForever(cp.Node):
    """An ``async def step`` that never gives its event loop back (a blocking
    call that never returns): notifies the test on *port* as it begins; writes
    its process's pid in ``NAME.pid``."""

    def __init__(self, name: str, folder: str, port: int) -> None:
        super().__init__(name)
        self.folder, self.port = folder, port

    def prep(self):
        Path(self.folder, f"{self.name}.pid").write_text(str(os.getpid()))

    async def step(self):
        notify(self.port)
        threading.Event().wait()


class BrokenPrep(cp.Node):
    def prep(self):
        raise OSError("no such camera")


class SlowPrep(cp.Node):
    """Notifies the test on *port* (``b"prep"``) as its ``prep`` begins, which
    then takes *seconds*."""

    def __init__(self, name: str, port: int, seconds: float = 1.0) -> None:
        super().__init__(name)
        self.port, self.seconds = port, seconds

    def prep(self):
        notify(self.port, b"prep")
        threading.Event().wait(self.seconds)


class StampSink(cp.Node):
    """Writes the timestamps of the records it receives, and its clock then, to ``NAME.json``."""

    def __init__(self, name: str, folder: str, source: str, expect: int, port: int) -> None:
        super().__init__(name)
        self.folder, self.source, self.expect, self.port = folder, source, expect, port

    def prep(self):
        self.stamps = []

    def step(self, data_chunks):
        record = data_chunks[self.source].get("default")
        self.stamps.append([record["timestamp"], time.time_ns()])
        if len(self.stamps) == self.expect:
            Path(self.folder, f"{self.name}.json").write_text(json.dumps(self.stamps))
            notify(self.port)


class Recording(cp.Node):
    """Saves, about *rate* times a second, a 64x48 video frame, an audio block
    (1/rate s of 48 kHz mono), a table row and a JSON value; tells the test on
    *port* how many steps it has saved (``b"N "``) every *every* steps."""

    def __init__(self, name: str, port: int, rate: int = 30, every: int = 10) -> None:
        super().__init__(name)
        self.port, self.rate, self.every = port, rate, every

    def prep(self):
        self.n = 0
        self.next = time.monotonic()
        notify(self.port, b"pid %d " % os.getpid())

    def step(self):
        import numpy as np

        self.next += 1 / self.rate
        time.sleep(max(0.0, self.next - time.monotonic()))
        self.save_video("camera", np.full((48, 64, 3), self.n % 256, np.uint8), fps=self.rate)
        block = np.full((48000 // self.rate, 1), self.n % 1000, np.int16)
        self.save_audio("mic", block, channels=1, format=8, rate=48000)
        self.save_tabular("sensor", {"n": self.n})
        self.save_json("events", {"n": self.n})
        self.n += 1
        if self.n % self.every == 0:
            notify(self.port, b"%d " % self.n)


class RecordingWithSetup(Recording):
    """:class:`Recording` that also saves its process id from ``prep`` (``setup.jsonl``)."""

    def prep(self):
        self.save_json("setup", {"pid": os.getpid()})
        super().prep()
