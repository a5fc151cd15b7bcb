"""Starts node processes fast: ``python -m chimera._zygote``, one per Worker.

A fresh Python that imports Trio, numpy and chimera takes ~0.55 s of CPU; for
20 nodes on 2 cores that is seconds of ``commit_graph``. The zygote imports
them once, then forks a node process on each request (~10 ms). It never runs
Trio itself, so each fork starts its own ``trio.run`` afresh (Trio cannot run
in a fork of a process that runs it, which is why the Worker never forks).

The Worker talks to it over a Unix socket (the file descriptor in the
command's argument), with :mod:`chimera._pipe` messages:

- Worker to zygote: ``("start", None)``, then one byte carrying two file
  descriptors (``SCM_RIGHTS``): the node process's stdin and its events pipe
  (see :mod:`chimera._child`).
- zygote to Worker: ``("started", pid)`` in answer; ``("exited", pid,
  returncode)`` when a node process ends (``returncode`` as
  :attr:`subprocess.Popen.returncode`: negative for a signal).

Each node process leads a process group of its own. When the Worker's end of
the socket closes, the zygote exits; the node processes end by themselves
when their stdin does (their lifeline). If the zygote dies first (killed),
the Worker ends them itself, and sees them exit without it (see
:meth:`chimera._process.Zygote.run`).
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import sys
from io import RawIOBase
from typing import Any

# What every node process needs, imported once here.
import cloudpickle  # noqa: F401
import msgpack  # noqa: F401
import numpy  # noqa: F401
import trio  # noqa: F401

import transports  # noqa: F401

from . import _child, _pipe


def _send(sock: socket.socket, *message: object) -> None:
    sock.sendall(_pipe.encode(message))


def _receive(sock: socket.socket, stream: RawIOBase) -> tuple[Any, list[int]] | None:
    """The next request and the file descriptors that follow it; None at end of file.

    *stream* reads *sock* without buffering, so it never reads into the byte
    that carries the file descriptors.
    """
    request = _pipe.read_blocking(stream)
    if request is None:
        return None
    _, fds, _, _ = socket.recv_fds(sock, 1, 2)
    return request, fds


def _fork_node(own: list[int], stdin: int, events: int) -> int:
    """Fork a node process; its pid. *own* are the zygote's file descriptors."""
    pid = os.fork()
    if pid:
        return pid
    # The node process.
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.setsid()
        for fd in own:
            os.close(fd)
        os.dup2(stdin, 0)
        os.close(stdin)
        _child.main(events)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            return
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        _send(sock, "exited", pid, code)


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    stream = sock.makefile("rb", buffering=0)
    wakeup_read, wakeup_write = os.pipe()
    os.set_blocking(wakeup_write, False)
    signal.set_wakeup_fd(wakeup_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # delivered through the wakeup pipe
    # Ctrl-C in a terminal reaches the whole process group: the Worker handles
    # it, and ends the zygote once its nodes are gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wakeup_read, selectors.EVENT_READ)
    own = [sock.fileno(), wakeup_read, wakeup_write]
    if hasattr(selector, "fileno"):  # epoll, kqueue
        own.append(selector.fileno())
    try:
        while True:
            for key, _ in selector.select():
                if key.fileobj is sock:
                    request = _receive(sock, stream)
                    if request is None:
                        return  # the Worker is gone
                    (kind, _), fds = request
                    if kind != "start" or len(fds) != 2:
                        for fd in fds:
                            os.close(fd)
                        continue
                    stdin, events = fds
                    pid = _fork_node(own, stdin, events)
                    os.close(stdin)
                    os.close(events)
                    _send(sock, "started", pid)
                else:
                    os.read(wakeup_read, 4096)
            _reap(sock)
    except (BrokenPipeError, ConnectionResetError, _pipe.PipeError):
        return


if __name__ == "__main__":
    main()
