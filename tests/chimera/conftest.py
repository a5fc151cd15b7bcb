"""The tests of chimera run with a temporary folder of their own, and each
leaves no Worker's temporary folder behind. Ctrl-C raises KeyboardInterrupt
in them, and the scripts they start take Ctrl-C and hang-ups, as from a
terminal (even when the tests run in the background or under nohup)."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _own_temporary_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # Workers (and the processes the tests start) make their folders in
    # TMPDIR: not /tmp, where another chimera on this machine makes its own.
    tmp_path_factory.getbasetemp()  # (pytest's own stays where it is)
    folder = Path(tempfile.mkdtemp(prefix="chimera-tests-"))
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(folder)
    tempfile.tempdir = None  # (read from TMPDIR again)
    try:
        yield folder
    finally:
        if before is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = before
        tempfile.tempdir = None
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _stop_signals_as_in_a_terminal() -> None:
    # A shell starts a background job with SIGINT ignored, and Python then
    # raises no KeyboardInterrupt (nor do the scripts the tests start, which
    # inherit the ignoring): the tests of Ctrl-C would fail for that alone.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # Under nohup, SIGHUP is ignored, and so it is by the `chimera worker`
    # the tests start, as it should be: the tests of SIGHUP would fail. A
    # handler that does nothing keeps the test run alive through a hang-up, as
    # nohup means it to be, and is not inherited (exec resets it).
    if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
        signal.signal(signal.SIGHUP, lambda signum, frame: None)


@pytest.fixture
def take_worker_folders() -> Iterator[Callable[[], dict[Path, list[str]]]]:
    """For a test in which a Worker keeps its folder (files never collected):
    a call removes the Worker folders made since the test began, and returns
    the files each held (paths relative to it)."""
    temp = Path(tempfile.gettempdir())
    before = set(temp.glob("chimera-worker-*"))

    def take() -> dict[Path, list[str]]:
        taken = {}
        for folder in sorted(set(temp.glob("chimera-worker-*")) - before):
            files = (p for p in folder.rglob("*") if p.is_file())
            taken[folder] = sorted(p.relative_to(folder).as_posix() for p in files)
            shutil.rmtree(folder)
        return taken

    yield take


@pytest.fixture(autouse=True)
def _no_worker_folder_left() -> Iterator[None]:
    # (The tests' temporary folder: a test that sets TMPDIR checks its own.)
    temp = Path(tempfile.gettempdir())
    before = set(temp.glob("chimera-worker-*"))
    yield
    left = sorted(set(temp.glob("chimera-worker-*")) - before)
    assert not left, f"the test left Worker folders: {left}"
