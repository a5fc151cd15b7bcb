"""Bringing what the nodes saved to the Manager (``collect``), file by file, verified.

A Worker that sees the Manager's session folder (on the same machine: the
Manager leaves a probe file there, and the Worker reads it) moves each file
into it (:func:`move_folder`; a copy across file systems). Each file's
SHA-256 is the one its node's manifest holds (computed when its recorder
closed; see :mod:`chimera._manifest`) if the file is unchanged since, else
computed then. A file moved by a rename keeps its inode and modification
time: the Manager accepts it as the file the Worker hashed if they are the
same in the session folder, and hashes it otherwise (a copy, a file changed
after it was hashed) (:meth:`Incoming.hash_moved`). Otherwise,
each Worker sends every file of its nodes' folders as one HTTP request,
``POST /collect/KEY/NODE/PATH``, reading it in :data:`CHUNK` pieces and
hashing it as it goes (:func:`send_folder`); then it answers the Manager's
request with what it sent: each file's path, size and SHA-256. The Manager
writes each body where the path says -- refusing any path that would leave
the session folder -- hashing it too (:class:`Incoming`), and compares the two
(:func:`verify`): a file that differs is an error naming it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import trio

from ._manifest import (
    FileEntry,
    Manifest,
    files_under,
    hash_file,
    partial_path,
    stream_summary,
    written_whole,
)
from ._protocol import check_answer
from ._recording import check_name

__all__ = [
    "CHUNK",
    "Incoming",
    "move_folder",
    "read_body",
    "sees_probe",
    "send_folder",
    "verify",
]

log = logging.getLogger("chimera.collect")

#: How much of a file is read, sent and written at a time, in bytes.
CHUNK = 1 << 20
#: Seconds between two progress lines of a collection.
PROGRESS_PERIOD = 2.0


def member_path(path: str) -> PurePosixPath:
    """*path* (``NODE/...`` relative, with ``/``), if every part of it can be a file name.

    Raises:
        ValueError: it is empty or absolute, or a part is empty, ``.``, ``..``,
            or holds ``\\`` or NUL.
    """
    if not path or path.startswith("/"):
        raise ValueError(f"{path!r} is not a relative path")
    parts = path.split("/")
    for part in parts:
        check_name(part, "path part")
    return PurePosixPath(*parts)


class Incoming:
    """The files one Worker sends into *root*, as they arrive."""

    def __init__(self, root: Path, progress: Callable[[int, int], None] | None = None) -> None:
        self.root = root
        self.received: dict[str, FileEntry] = {}
        self._progress = progress
        self._bytes = 0

    def _target(self, path: str) -> tuple[str, Path]:
        relative = member_path(path)
        target = self.root / relative
        if not target.resolve().is_relative_to(self.root.resolve()):  # a symlink on the way
            raise ValueError(f"{path!r} leads outside the session folder")
        return str(relative), target

    def hash_moved(self, sent: list[dict[str, Any]]) -> None:
        """Take in the files a Worker says it moved here: each is the file
        the Worker hashed if it has the inode and modification time the
        Worker saw, else it is hashed (blocking: run it in a thread).

        Raises:
            ValueError: a path would not be inside *root*.
        """
        for entry in sent:
            relative, target = self._target(entry["path"])
            if target.is_file():
                moved = FileEntry(
                    entry["size"], entry["sha256"], entry.get("ino"), entry.get("mtime_ns")
                )
                self._add(relative, moved if moved.describes(target.stat()) else hash_file(target))

    def _add(self, relative: str, received: FileEntry) -> None:
        self.received[relative] = received
        self._bytes += received.size
        if self._progress is not None:
            self._progress(len(self.received), self._bytes)

    async def write(self, path: str, body: AsyncIterator[bytes]) -> FileEntry:
        """Write *body* to ``root/path``, hashing it; what was written.

        Raises:
            ValueError: *path* would not be inside *root*.
            OSError: the file cannot be written.
        """
        relative, target = self._target(path)
        partial = partial_path(target)
        digest, size = hashlib.sha256(), 0
        await trio.to_thread.run_sync(lambda: target.parent.mkdir(parents=True, exist_ok=True))
        file = await trio.to_thread.run_sync(open, partial, "wb")
        whole = False
        try:
            pending, pending_size = [], 0
            async for chunk in body:
                pending.append(chunk)
                pending_size += len(chunk)
                if pending_size >= CHUNK:  # hashed and written off the event loop, a MiB at a time
                    await trio.to_thread.run_sync(_hash_and_write, digest, file, pending)
                    size, pending, pending_size = size + pending_size, [], 0
            await trio.to_thread.run_sync(_hash_and_write, digest, file, pending)
            size += pending_size
            whole = True
        finally:
            # Under its name once whole: a transfer cut short leaves no file
            # that looks like the recording's.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_finish, file, partial, target if whole else None)
        entry = FileEntry(size, digest.hexdigest())
        self._add(relative, entry)
        return entry


def _finish(file: Any, partial: Path, target: Path | None) -> None:
    """Close *file*, written at *partial*; rename it *target*, or remove it if None."""
    try:
        file.close()
    finally:
        if target is None:
            partial.unlink(missing_ok=True)
    if target is not None:
        partial.replace(target)


def _hash_and_write(digest: Any, file: Any, pieces: list[bytes]) -> None:
    for piece in pieces:
        digest.update(piece)
        file.write(piece)


def sees_probe(folder: str, probe: str, key: str) -> bool:
    """Whether the Manager's probe file *probe* in *folder* holds *key* (then this
    process sees the session folder: it is on the Manager's machine). Blocking."""
    try:
        return (Path(folder) / probe).read_text() == key
    except (OSError, ValueError):
        return False


def move_folder(
    folder: Path, target: Path, prefix: str, manifest: Manifest | None
) -> list[dict[str, Any]]:
    """Move every file under *folder* to ``target/prefix/RELATIVE PATH`` (a copy
    across file systems); what was moved: ``{"path", "size", "sha256"}`` per
    file, and for a file moved by a rename its ``"ino"`` and ``"mtime_ns"``
    when hashed. The SHA-256 is *manifest*'s (the folder's) for a file
    unchanged since its recorder closed, else computed now. Blocking: run it
    in a thread.

    Raises:
        OSError: a file could not be put in *target* (a full disk): the
            message names the file and *target*; the files not moved yet
            stay in *folder*.
    """
    moved = []
    for path in files_under(folder):
        inside = path.relative_to(folder).as_posix()
        entry = manifest.entry_for(inside, path) if manifest is not None else hash_file(path)
        relative = f"{prefix}/{inside}"
        destination = target / relative
        item = {"path": relative, "size": entry.size, "sha256": entry.sha256}
        try:
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(path, destination)
                item.update(ino=entry.ino, mtime_ns=entry.mtime_ns)
            except OSError:  # another file system: the Manager hashes the copy
                with written_whole(destination) as partial:
                    shutil.copyfile(path, partial)
        except OSError as exc:
            raise OSError(exc.errno, f"{exc.strerror}: putting {relative} in {target}") from exc
        moved.append(item)
    return moved


def verify(worker: str, sent: list[dict[str, Any]], received: dict[str, FileEntry]) -> None:
    """Check that every file *worker* says it *sent* arrived, whole.

    Raises:
        ValueError: a file is missing, or its size or SHA-256 differs (each named).
    """
    problems = []
    for entry in sent:
        got = received.get(entry["path"])
        if got is None:
            problems.append(f"{entry['path']} did not arrive")
        elif (got.size, got.sha256) != (entry["size"], entry["sha256"]):
            problems.append(
                f"{entry['path']} differs from what the Worker sent "
                f"({got.size} bytes, SHA-256 {got.sha256[:12]}...; "
                f"sent {entry['size']} bytes, {entry['sha256'][:12]}...)"
            )
    if problems:
        raise ValueError(f"collecting from worker {worker!r} failed: " + "; ".join(problems))


async def send_folder(
    client: httpx.AsyncClient, url: str, folder: Path, prefix: str
) -> tuple[list[dict[str, Any]], bool]:
    """POST every file under *folder* to ``url/prefix/RELATIVE PATH`` (the path
    percent-encoded: any name travels); what was sent, ``{"path", "size",
    "sha256"}`` per file, and whether the Manager received each as it was sent
    (its answer names the SHA-256 of what it wrote).

    Raises:
        httpx.HTTPError: the Manager could not be reached, or refused a file.
    """
    sent = []
    whole = True
    for path in await trio.to_thread.run_sync(files_under, folder):
        relative = f"{prefix}/{path.relative_to(folder).as_posix()}"
        body = _FileBody(path)
        response = await client.post(f"{url}/{urllib.parse.quote(relative)}", content=body)
        check_answer(response)
        digest = body.digest.hexdigest()
        whole = whole and response.json().get("sha256") == digest
        sent.append({"path": relative, "size": body.size, "sha256": digest})
    return sent, whole


class _FileBody:
    """A file's content, read in :data:`CHUNK` pieces as it is sent, hashed and
    counted (read and hashed off the event loop)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.digest = hashlib.sha256()
        self.size = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        file = await trio.to_thread.run_sync(open, self.path, "rb")
        try:
            while chunk := await trio.to_thread.run_sync(self._read_and_hash, file):
                self.size += len(chunk)
                yield chunk
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(file.close)

    def _read_and_hash(self, file: Any) -> bytes:
        chunk = file.read(CHUNK)
        self.digest.update(chunk)
        return chunk


class Progress:
    """Logs a collection's progress (files, bytes, rate) at most every
    :data:`PROGRESS_PERIOD` seconds, and once at the end."""

    def __init__(self, say: Callable[[str], None] = log.info) -> None:
        self._say = say
        self._started = self._said = time.monotonic()
        self._files: dict[str, tuple[int, int]] = {}

    def update(self, worker: str) -> Callable[[int, int], None]:
        def progress(files: int, size: int) -> None:
            self._files[worker] = (files, size)
            if time.monotonic() - self._said >= PROGRESS_PERIOD:
                self._said = time.monotonic()
                self._say(self.line())

        return progress

    def line(self) -> str:
        files = sum(f for f, _ in self._files.values())
        size = sum(s for _, s in self._files.values())
        seconds = max(time.monotonic() - self._started, 1e-9)
        return f"collect: {files} files, {size / 1e6:.1f} MB ({size / 1e6 / seconds:.1f} MB/s)"


async def read_body(receive: Callable[[], Awaitable[dict[str, Any]]]) -> AsyncIterator[bytes]:
    """An ASGI request's body, piece by piece.

    Raises:
        ConnectionError: the client went away before the end.
    """
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ConnectionError("the sender went away")
        if body := message.get("body", b""):
            yield body
        if not message.get("more_body", False):
            return


def summarize(folder: Path) -> list[dict[str, Any]]:
    """What each stream in a collected node *folder* holds, from its timestamps:
    ``{"stream", "file", "count", "first_ns", "last_ns", "rate", "max_gap_ns"}``.
    A file of a node killed before its first flush may be empty: its stream
    counts 0. Blocking: run it in a thread."""
    summaries = []
    for stamps in sorted(folder.glob("*.timestamps.csv")):
        stream = stamps.name.removesuffix(".timestamps.csv")
        files = [p for p in folder.iterdir() if p.stem == stream and p != stamps] or [stamps]
        times = _stamps_in(stamps)
        if times is not None:
            summaries.append(_summary(stream, files[0].name, times))
    for table in sorted(folder.glob("*.csv")):
        if table.name.endswith(".timestamps.csv"):
            continue
        times = _stamps_in(table)
        if times is not None:  # (a table with no timestamp_ns column is not a stream)
            summaries.append(_summary(table.stem, table.name, times.drop_duplicates()))
    return summaries


def _stamps_in(path: Path) -> Any:
    """The ``timestamp_ns`` column of the CSV at *path*, whole rows only: an
    empty one if the file is empty (its writer never flushed); None if it has
    no such column."""
    import pandas

    if path.stat().st_size == 0:
        return pandas.Series([], dtype="int64")
    try:
        rows = pandas.read_csv(path, usecols=["timestamp_ns"], on_bad_lines="skip")
    except ValueError:  # no such column
        return None
    return rows["timestamp_ns"].dropna().astype("int64")


def _summary(stream: str, file: str, times: Any) -> dict[str, Any]:
    count = len(times)
    first = int(times.iloc[0]) if count else None
    last = int(times.iloc[-1]) if count else None
    return stream_summary(stream, file, count, first, last, times.diff().max())
