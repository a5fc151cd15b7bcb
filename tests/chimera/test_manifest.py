"""A node's manifest: written as its recorder closes, used by collect in place of a rehash."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os

import pytest

from chimera._collect import Incoming, move_folder, summarize, verify
from chimera._data import set_clock
from chimera._manifest import (
    FileEntry,
    Manifest,
    files_under,
    hash_file,
    manifest_path,
    written_whole,
)
from chimera._recording import Recorder


@pytest.fixture(autouse=True)
def _default_clock():
    yield
    set_clock(None)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record(folder):
    """Three saves of a table 30 and 10 ms apart, and one json value."""
    stamps = iter([1_000_000_000, 1_030_000_000, 1_040_000_000, 2_000_000_000])
    set_clock(lambda: next(stamps))
    recorder = Recorder(folder)
    for n in range(3):
        recorder.save("table", "sensor", {"n": n})
    recorder.save("json", "events", {"x": 1})
    recorder.close()


def test_a_closed_recorder_lists_every_file_with_its_hash_and_every_stream(tmp_path):
    folder = tmp_path / "node"
    record(folder)
    manifest = Manifest.read(folder)
    assert manifest_path(folder).parent == tmp_path  # beside the folder, not in it
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(manifest.files) == files
    for name, entry in manifest.files.items():
        assert (entry.size, entry.sha256) == ((folder / name).stat().st_size, sha256(folder / name))
    streams = {s["stream"]: s for s in manifest.streams}
    assert streams["sensor"] == {
        "stream": "sensor",
        "file": "sensor.csv",
        "count": 3,
        "first_ns": 1_000_000_000,
        "last_ns": 1_040_000_000,
        "rate": 50.0,
        "max_gap_ns": 30_000_000,  # (the largest gap, not the last)
    }
    assert streams["events"]["count"] == 1 and streams["events"]["rate"] is None


def test_a_manifest_that_is_missing_or_unreadable_is_none(tmp_path, caplog):
    folder = tmp_path / "node"
    assert Manifest.read(folder) is None
    for text in ("not json", json.dumps({"version": 99, "files": {}, "streams": []})):
        manifest_path(folder).write_text(text)
        with caplog.at_level(logging.WARNING):
            assert Manifest.read(folder) is None
        assert "hashed again" in caplog.text


def test_moved_files_carry_their_recorded_hash_and_a_changed_one_its_new_hash(tmp_path, caplog):
    folder, session = tmp_path / "node", tmp_path / "session"
    record(folder)
    changed = folder / "sensor.csv"
    changed.write_text(changed.read_text().replace("0", "7"))  # same size, new content
    os.utime(changed, ns=(1, 1))
    want = {p.name: sha256(p) for p in folder.iterdir()}
    with caplog.at_level(logging.WARNING):
        moved = move_folder(folder, session, "node", Manifest.read(folder))
    assert "sensor.csv changed after its node's recorder closed" in caplog.text
    assert {item["path"]: item["sha256"] for item in moved} == {
        f"node/{name}": digest for name, digest in want.items()
    }
    incoming = Incoming(session)
    incoming.hash_moved(moved)
    verify("w", moved, incoming.received)  # all arrived whole


def test_the_manager_hashes_a_moved_file_that_is_not_the_one_the_worker_hashed(tmp_path):
    folder, session = tmp_path / "node", tmp_path / "session"
    record(folder)
    moved = move_folder(folder, session, "node", Manifest.read(folder))
    target = session / "node" / "sensor.csv"
    target.write_text(target.read_text().replace("1", "9"))  # same size...
    os.utime(target, ns=(5, 5))  # ...and whatever the clock's granularity, a new mtime
    incoming = Incoming(session)
    incoming.hash_moved(moved)
    with pytest.raises(ValueError, match=r"node/sensor.csv differs from what the Worker sent"):
        verify("w", moved, incoming.received)


def test_a_file_entry_describes_only_the_file_it_hashed(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    entry = hash_file(path)
    assert entry.describes(path.stat())
    os.utime(path, ns=(7, 7))
    assert not entry.describes(path.stat())
    assert not FileEntry(entry.size, entry.sha256).describes(path.stat())  # no identity
    copy = tmp_path / "g"
    copy.write_bytes(path.read_bytes())
    os.utime(copy, ns=(7, 7))
    assert not entry.describes(copy.stat())  # another inode


def test_an_entry_never_vouches_for_bytes_other_than_those_it_hashed(tmp_path, monkeypatch):
    """A file rewritten in place while it is hashed: the entry's digest is of
    a mix of old and new bytes, so it must not describe the file as it is now
    (collect then hashes it again)."""
    from chimera import _manifest

    path = tmp_path / "f"
    path.write_bytes(b"old old ")
    real_sha256 = hashlib.sha256

    class RewrittenAfterFirstRead:
        def __init__(self):
            self._digest, self._reads = real_sha256(), 0

        def update(self, data):
            self._reads += 1
            if self._reads == 1:  # the writer rewrites the file while it is hashed
                with open(path, "r+b") as file:
                    file.write(b"new new ")
                os.utime(path, ns=(10**18, 10**18))
            self._digest.update(data)

        def hexdigest(self):
            return self._digest.hexdigest()

    monkeypatch.setattr(_manifest, "HASH_CHUNK", 4)
    monkeypatch.setattr(_manifest.hashlib, "sha256", RewrittenAfterFirstRead)
    entry = hash_file(path)
    monkeypatch.undo()
    assert entry.sha256 != sha256(path)  # a digest of "old new " ...
    assert not entry.describes(path.stat())  # ... said to be of no file as it is


def test_every_file_is_hashed_whatever_its_size(tmp_path):
    folder = tmp_path / "node"
    folder.mkdir()
    for i, size in zip(itertools.count(), (5, 3_000_000, 0, 70_000), strict=False):
        (folder / f"{i}.bin").write_bytes(os.urandom(size))
    manifest = Manifest.make(folder, [])
    assert {name: e.sha256 for name, e in manifest.files.items()} == {
        p.name: sha256(p) for p in folder.iterdir()
    }


def test_hashing_a_large_folder_says_so(tmp_path, monkeypatch, caplog):
    from chimera import _manifest

    folder = tmp_path / "node"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"x" * 1000)
    monkeypatch.setattr(_manifest, "SAY_HASHING_BYTES", 1000)
    with caplog.at_level(logging.INFO, logger="chimera.collect"):
        Manifest.make(folder, [])
    assert "node: hashing 1 files, 0.0 GB" in caplog.text
    assert "node: hashed in" in caplog.text


def test_the_files_of_a_node_killed_before_its_first_flush_are_summarized(tmp_path):
    for empty in ("camera.mp4", "camera.timestamps.csv", "readings.csv"):
        (tmp_path / empty).write_bytes(b"")
    (tmp_path / "mic.wav").write_bytes(b"RIFF")
    (tmp_path / "mic.timestamps.csv").write_text("index,timestamp_ns\n0,1000\n480,2000\n")
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")  # not a stream: no timestamp_ns
    summaries = {s["stream"]: (s["file"], s["count"], s["first_ns"]) for s in summarize(tmp_path)}
    assert summaries == {
        "camera": ("camera.mp4", 0, None),
        "mic": ("mic.wav", 2, 1000),
        "readings": ("readings.csv", 0, None),
    }


def test_a_file_left_unfinished_is_no_file_of_the_recording(tmp_path):
    # As the image a node was writing when it was killed.
    (tmp_path / "shot").mkdir()
    (tmp_path / "shot" / "000000.png").write_bytes(b"whole")
    (tmp_path / "shot" / ".000001.png.partial").write_bytes(b"half")
    assert files_under(tmp_path) == [tmp_path / "shot" / "000000.png"]


@pytest.mark.parametrize("fails", [False, True], ids=["whole", "fails"])
def test_a_file_written_whole_is_there_under_its_name_or_not_at_all(tmp_path, fails):
    with pytest.raises(OSError) if fails else contextlib.nullcontext():
        with written_whole(tmp_path / "frame.png") as partial:
            partial.write_bytes(b"half")
            if fails:
                raise OSError("no space left on device")
            partial.write_bytes(b"whole")
    assert [(p.name, p.read_bytes()) for p in tmp_path.iterdir()] == (
        [] if fails else [("frame.png", b"whole")]
    )
