"""Collecting what nodes saved: over HTTP (as from another machine), and at once after start."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

import chimera as cp
from chimera._collect import Incoming, read_body, sees_probe, summarize, verify
from chimera._manager import AsyncManager
from chimera._manifest import FileEntry
from chimera._worker import AsyncWorker

#: Names a save accepts that a URL does not carry as they are.
ODD_NAMES = ["cam#1", "what?", "50%25", "two words", "café"]


class SavesUnderOddNames(cp.Node):
    def prep(self):
        for name in ODD_NAMES:
            self.save_text(name, f"{name} said")

    def step(self):
        threading.Event().wait(0.001)  # (a source with nothing to send)


@asynccontextmanager
async def running(tmp_path) -> AsyncIterator[AsyncManager]:
    """A Manager whose Worker, "remote", has started a :class:`SavesUnderOddNames`
    (inline: the memory transport), "odd", a moment ago."""
    graph = cp.Graph()
    graph.add_node(SavesUnderOddNames("odd"))
    async with AsyncManager(tmp_path, port=0, transport="memory") as manager:
        async with AsyncWorker("remote") as worker:
            assert await worker.connect(manager.host, manager.port)
            assert await manager.commit_graph(graph, {"remote": ["odd"]})
            assert await manager.start()
            yield manager


@pytest.mark.parametrize("way", ["sent", "moved"])
async def test_files_of_any_name_a_save_takes_are_collected(tmp_path, monkeypatch, way):
    if way == "sent":  # (as from a Worker on another machine)
        monkeypatch.setattr("chimera._worker.sees_probe", lambda *args: False)
    with trio.fail_after(60):
        async with running(tmp_path) as manager:
            # At once: the nodes have yet to say they run; collect stops them all the same.
            assert await manager.collect()
            folder = manager.session_folder() / "remote" / "odd"
            texts = {path.name: path.read_text() for path in folder.glob("*.txt")}
    assert texts == {f"{name}.txt": f"{name} said" for name in ODD_NAMES}


async def test_a_second_start_at_once_is_refused(tmp_path):
    with trio.fail_after(60):
        async with running(tmp_path) as manager:
            with pytest.raises(RuntimeError, match="the nodes run already"):
                await manager.start()
            assert await manager.collect()


async def test_files_that_did_not_arrive_whole_are_not_forgotten_by_their_worker(
    tmp_path, monkeypatch, caplog, take_worker_folders
):
    # Sent, then changed on the way: the Worker does not take them as collected.
    from chimera import _collect

    original = _collect._FileBody.__aiter__

    async def tampered(self):
        async for chunk in original(self):
            yield chunk
        yield b"!"  # sent, not hashed

    monkeypatch.setattr("chimera._worker.sees_probe", lambda *args: False)
    monkeypatch.setattr(_collect._FileBody, "__aiter__", tampered)
    with trio.fail_after(60):
        async with running(tmp_path) as manager:
            with pytest.raises(ValueError, match="differs from what"):
                await manager.collect()
    said = [r.getMessage() for r in caplog.records if "never collected" in r.getMessage()]
    assert len(said) == 1
    [(folder, files)] = take_worker_folders().items()  # kept, with its files
    assert str(folder) in said[0] and files


async def test_a_collection_the_managers_full_disk_stops_says_where_and_can_be_done_again(
    tmp_path, monkeypatch
):
    # The Worker moves its files into the Manager's folder (another file
    # system: by a copy), which is full.
    import errno
    import json
    import os

    class AnotherFileSystem:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(source, destination):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

    def full(source, destination):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("chimera._collect.os", AnotherFileSystem())
    monkeypatch.setattr("chimera._collect.shutil.copyfile", full)
    with trio.fail_after(60):
        async with running(tmp_path) as manager:
            with pytest.raises(RuntimeError) as failed:
                await manager.collect()
            session = manager.session_folder()
            # Said after collect wrote meta.json: the Worker's nodes are not collected.
            meta = json.loads((session / "meta.json").read_text())
            assert meta["stop_ns"] is not None  # (collect's, not the one written at start)
            assert meta["streams"]["remote/odd"]["collected"] is False
            monkeypatch.undo()  # (room made)
            assert await manager.collect()
            texts = {path.name for path in (session / "remote" / "odd").glob("*.txt")}
    said = str(failed.value)
    assert "worker 'remote'" in said and "No space left on device" in said
    assert str(session / "remote") in said
    assert texts == {f"{name}.txt" for name in ODD_NAMES}


@pytest.mark.parametrize("cut", [False, True], ids=["whole", "cut-short"])
async def test_a_file_arrives_under_its_name_only_whole(tmp_path, cut):
    # As a Worker killed while its files are collected over HTTP: what it had
    # sent of a file is not left in the session under the file's name.
    incoming = Incoming(tmp_path)

    async def body():
        yield b"x" * 1000
        if cut:
            raise ConnectionError("the worker left")
        yield b"y" * 10

    if cut:
        with pytest.raises(ConnectionError):
            await incoming.write("w1/cam/cam.mp4", body())
    else:
        assert (await incoming.write("w1/cam/cam.mp4", body())).size == 1010
    assert [p.name for p in (tmp_path / "w1" / "cam").iterdir()] == ([] if cut else ["cam.mp4"])


def test_a_file_a_worker_sent_that_did_not_arrive_fails_the_collection_naming_it():
    sent = [
        {"path": "w1/cam/cam.mp4", "size": 3, "sha256": "a" * 64},
        {"path": "w1/cam/cam.timestamps.csv", "size": 5, "sha256": "b" * 64},
    ]
    received = {"w1/cam/cam.mp4": FileEntry(3, "a" * 64)}
    with pytest.raises(ValueError, match=r"w1/cam/cam\.timestamps\.csv did not arrive$"):
        verify("w1", sent, received)
    verify("w1", sent[:1], received)  # (what came whole is fine)


async def test_a_request_whose_sender_went_away_is_no_whole_body():
    messages = iter(
        [{"type": "http.request", "body": b"abc", "more_body": True}, {"type": "http.disconnect"}]
    )

    async def receive():
        return next(messages)

    got = []
    with pytest.raises(ConnectionError, match="went away"):
        async for piece in read_body(receive):
            got.append(piece)
    assert got == [b"abc"]


def test_a_table_stream_counts_its_saves_not_its_rows(tmp_path):
    # (A DataFrame saved at once: its rows share their timestamp.)
    (tmp_path / "imu.csv").write_text("timestamp_ns,x\n10,1\n10,2\n10,3\n30,4\n30,5\n30,6\n")
    (summary,) = summarize(tmp_path)
    assert (summary["stream"], summary["count"]) == ("imu", 2)
    assert (summary["first_ns"], summary["last_ns"]) == (10, 30)


def test_a_probe_of_another_managers_key_is_not_this_managers(tmp_path):
    (tmp_path / ".probe").write_text("key-1")
    assert sees_probe(str(tmp_path), ".probe", "key-1")
    assert not sees_probe(str(tmp_path), ".probe", "key-2")
    assert not sees_probe(str(tmp_path), "missing", "key-1")
