"""What a node saved, listed once its recorder has closed: its manifest.

When a node's recorder closes (at ``stop``), it hashes every file it wrote
(SHA-256, on every core) and writes a manifest beside the node's folder
(``<node folder>.saved.json``, outside the folder, so that it is not collected
as one of the node's files)::

    {"version": 1,
     "files": {"camera.mp4": {"size": ..., "sha256": ..., "ino": ..., "mtime_ns": ...}, ...},
     "streams": [{"stream", "file", "count", "first_ns", "last_ns", "rate", "max_gap_ns"}, ...]}

Collection then needs no second pass over the bytes: a file whose size,
inode and modification time are still those the manifest holds is the file
that was hashed. One that changed since (or a node killed before its
recorder closed: no manifest) is hashed again. The stream summaries are
counted as the streams were written, so ``meta.json`` needs no pass over the
timestamps either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "PARTIAL",
    "FileEntry",
    "Manifest",
    "files_under",
    "hash_file",
    "manifest_path",
    "partial_path",
    "stream_summary",
    "written_whole",
]

log = logging.getLogger("chimera.collect")

VERSION = 1
#: How much of a file is hashed at a time, in bytes. Reads of 8 MiB were no
#: quicker (~1.3 GB/s either way), and each hashing thread's buffers stayed in
#: its process after: hashing 4 files on 2 threads left RSS 32 MB higher with
#: 8 MiB reads, 4 MB with 1 MiB (a node's RSS grew ~17 MB at stop).
HASH_CHUNK = 1 << 20
#: A folder this large takes seconds to hash (~1.4 GB/s a core): it is logged.
SAY_HASHING_BYTES = 1 << 30


@dataclass(frozen=True)
class FileEntry:
    """A file's size and SHA-256 (hex), and, where known, its identity then
    (inode, modification time): while these are unchanged, so is the file."""

    size: int
    sha256: str
    ino: int | None = None
    mtime_ns: int | None = None

    def describes(self, stat: os.stat_result) -> bool:
        """Whether *stat* (of the file now) is the file this entry hashed."""
        return self.ino is not None and (self.size, self.ino, self.mtime_ns) == (
            stat.st_size,
            stat.st_ino,
            stat.st_mtime_ns,
        )


def hash_file(path: Path) -> FileEntry:
    """*path*'s size, SHA-256 and identity (blocking; hashlib lets other
    threads run meanwhile).

    Raises:
        OSError: it cannot be read.
    """
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as file:
        before = os.fstat(file.fileno())
        while chunk := file.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        after = os.fstat(file.fileno())
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        return FileEntry(size, digest.hexdigest())  # written meanwhile: no identity
    return FileEntry(size, digest.hexdigest(), after.st_ino, after.st_mtime_ns)


#: How the name of a file a writer has not finished ends (a node killed while
#: it wrote an image leaves one, a Worker killed while its files were being
#: collected too): not a file of the recording, never collected.
PARTIAL = ".partial"


def partial_path(path: Path) -> Path:
    """Where a file for *path* is written until it is whole (then renamed to
    *path*): a hidden name in the same folder, ending in :data:`PARTIAL`."""
    return path.with_name(f".{path.name}{PARTIAL}")


@contextmanager
def written_whole(path: Path) -> Iterator[Path]:
    """Where to write the file *path* in the ``with`` block (its
    :func:`partial_path`): renamed *path* once the block ends, removed if it
    raises. A kill or an error leaves the file whole under its name, or not
    there. Blocking.

    Raises:
        OSError: it could not be renamed (it is removed).
    """
    partial = partial_path(path)
    try:
        yield partial
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def files_under(folder: Path) -> list[Path]:
    """Every file under *folder* but unfinished ones (:data:`PARTIAL`), in order
    (none if it does not exist). Blocking."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(PARTIAL))


def manifest_path(folder: Path) -> Path:
    """Where the manifest of the node folder *folder* is: beside it."""
    return folder.with_name(f"{folder.name}.saved.json")


@dataclass
class Manifest:
    """Every file of a node's folder (by path relative to it, with ``/``) and
    every stream's summary."""

    files: dict[str, FileEntry]
    streams: list[dict[str, Any]]

    @classmethod
    def make(cls, folder: Path, streams: list[dict[str, Any]]) -> Manifest:
        """Hash every file under *folder*, the largest first, on every core (blocking).

        Raises:
            OSError: a file cannot be read.
        """
        sized = sorted(((p.stat().st_size, p) for p in files_under(folder)), reverse=True)
        paths = [path for _, path in sized]
        total = sum(size for size, _ in sized)
        started = time.monotonic()
        if total >= SAY_HASHING_BYTES:  # seconds of work: say so
            log.info("%s: hashing %d files, %.1f GB", folder.name, len(paths), total / 1e9)
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            entries = list(pool.map(hash_file, paths))
        if total >= SAY_HASHING_BYTES:
            log.info("%s: hashed in %.1f s", folder.name, time.monotonic() - started)
        files = {p.relative_to(folder).as_posix(): e for p, e in zip(paths, entries, strict=True)}
        return cls(dict(sorted(files.items())), streams)

    def write(self, folder: Path) -> None:
        """Write it as the manifest of *folder* (blocking)."""
        data = {
            "version": VERSION,
            "files": {path: asdict(entry) for path, entry in self.files.items()},
            "streams": self.streams,
        }
        manifest_path(folder).write_text(json.dumps(data))

    @classmethod
    def read(cls, folder: Path) -> Manifest | None:
        """The manifest of *folder*; None if there is none, or it cannot be
        read (then every file is hashed again, and the streams summarized
        from their files). Blocking."""
        path = manifest_path(folder)
        try:
            data = json.loads(path.read_text())
            if data.get("version") != VERSION:
                raise ValueError(f"version {data.get('version')!r}")
            files = {str(p): FileEntry(**entry) for p, entry in data["files"].items()}
            return cls(files, list(data["streams"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("%s cannot be read (%s): its files are hashed again", path, exc)
            return None

    def entry_for(self, relative: str, path: Path) -> FileEntry:
        """The entry of the file *path* (*relative* to the folder): this
        manifest's if the file is unchanged since, else a new hash (blocking)."""
        entry = self.files.get(relative)
        if entry is None:
            log.warning("%s was not there when its node's recorder closed", path)
        elif entry.describes(path.stat()):
            return entry
        else:
            log.warning("%s changed after its node's recorder closed", path)
        return hash_file(path)


def stream_summary(
    stream: str, file: str, count: int, first_ns: int | None, last_ns: int | None, max_gap_ns: Any
) -> dict[str, Any]:
    """A stream's summary in ``meta.json``: of *count* saves, the first at
    *first_ns*, the last at *last_ns* (None if there were none)."""
    if count > 1:
        assert first_ns is not None and last_ns is not None
        span = (last_ns - first_ns) / 1e9
    else:
        span = 0.0
    return {
        "stream": stream,
        "file": file,
        "count": count,
        "first_ns": first_ns,
        "last_ns": last_ns,
        "rate": round((count - 1) / span, 3) if span > 0 else None,
        "max_gap_ns": int(max_gap_ns) if count > 1 and max_gap_ns is not None else None,
    }
