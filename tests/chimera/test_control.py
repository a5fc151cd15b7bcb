"""Manager and Worker over the control WebSocket: check-in, clock, bad messages, tokens."""

from __future__ import annotations

import errno
import io
import itertools
import json
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

from chimera import _protocol as protocol
from chimera._manager import AsyncManager
from chimera._worker import AsyncWorker
from chimera._worker import _can_listen_on as can_bind

from .records import on_record


def port_is_closed(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


async def test_a_worker_checks_in_and_learns_the_managers_clock(tmp_path):
    with trio.fail_after(20):
        async with AsyncManager(tmp_path, port=0) as manager:
            async with AsyncWorker("lab-pc") as worker:
                assert await worker.connect(manager.host, manager.port)
                await manager.wait_for_workers(1)
                assert [w.name for w in manager.workers.values()] == ["lab-pc"]
                assert worker.id in manager.workers
                await worker.wait_for_clock(samples=3)
                estimate = worker.clock.estimate()
                # One machine, one clock: the offset is zero within the error bound.
                assert abs(estimate.offset_ns) <= estimate.error_ns + 1_000
                async with httpx.AsyncClient() as client:
                    answer = await client.get(f"http://127.0.0.1:{manager.port}/api/state")
                assert answer.status_code == 200
                assert [w["name"] for w in answer.json()["workers"]] == ["lab-pc"]
            await manager.wait_for_workers(0)  # the worker left: the manager forgets it
            port = manager.port
    assert port_is_closed(port)


# A WebSocket upgrade with a frame right behind it, unmasked: hypercorn's
# own server ended at it, every connection with it (pgjones/hypercorn#225).
MALFORMED_UPGRADE = (
    b"GET /ws/worker HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    b"\x81\x05hello"
)


async def test_a_malformed_request_ends_only_its_own_connection(tmp_path):
    with trio.fail_after(30):
        async with AsyncManager(tmp_path, port=0, token="s3cret") as manager:
            async with AsyncWorker("lab-pc", token="s3cret") as worker:
                assert await worker.connect(manager.host, manager.port)
                for _ in range(5):  # (it broke hypercorn's server 4 times in 5)
                    async with await trio.open_tcp_stream("127.0.0.1", manager.port) as bad:
                        await bad.send_all(MALFORMED_UPGRADE)
                        while await bad.receive_some():  # until the Manager closes it
                            pass
                assert worker.connected
                async with AsyncWorker("other", token="s3cret") as other:
                    assert await other.connect(manager.host, manager.port)
                    await manager.wait_for_workers(2)


async def test_a_bad_message_gets_an_error_and_the_connection_stays(tmp_path):
    with trio.fail_after(20):
        async with AsyncManager(tmp_path, port=0) as manager:
            url = f"ws://127.0.0.1:{manager.port}/ws/worker"
            async with trio_websocket.open_websocket_url(url) as ws:
                deep = "[" * 100_000 + "]" * 100_000
                for bad in ["not json", "[1, 2]", '{"v": 99, "type": "hello"}', '{"v": 1}', deep]:
                    await ws.send_message(bad)
                    answer = protocol.parse(await ws.get_message())
                    assert answer["type"] == "error"
                await ws.send_message(protocol.make("clock", t0=1))
                answer = protocol.parse(await ws.get_message())
                assert answer["type"] == "clock_ack" and answer["t0"] == 1


async def test_a_worker_that_falls_silent_is_taken_as_gone(tmp_path, monkeypatch, caplog):
    # As a frozen process, or a machine asleep: nothing closes its connection.
    monkeypatch.setattr(protocol, "SILENCE_TIMEOUT", 0.5)
    with trio.fail_after(20):
        async with AsyncManager(tmp_path, port=0) as manager:
            url = f"ws://127.0.0.1:{manager.port}/ws/worker"
            async with trio_websocket.open_websocket_url(url) as ws:
                assert (await check_in(ws, "frozen", "f"))["type"] == "welcome"
                await manager.wait_for_workers(1)
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws.get_message()  # says nothing more: the manager closes
                assert closed.value.reason.code == 1001
            assert manager.workers == {}
    said = [r.getMessage() for r in caplog.records if "no word" in r.getMessage()]
    assert said == ["worker 'frozen': no word for 0.5 s: taken as gone"]


async def welcomed(
    request: trio_websocket.WebSocketRequest,
) -> trio_websocket.WebSocketConnection:
    """Check a Worker in as a Manager without a token does; its connection."""
    ws = await request.accept()
    await ws.get_message()  # hello
    await ws.send_message(protocol.make("challenge", nonce="n", proof=None))
    await ws.get_message()  # auth
    await ws.send_message(protocol.make("welcome", worker_id="w"))
    return ws


@asynccontextmanager
async def worker_of(handler: Any) -> AsyncIterator[AsyncWorker]:
    """A Worker, "lab-pc", connected to a stand-in Manager: *handler* serves it."""
    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
        async with AsyncWorker("lab-pc") as worker:
            assert await worker.connect("127.0.0.1", server.port)
            yield worker
        nursery.cancel_scope.cancel()


async def test_a_manager_that_falls_silent_is_taken_as_gone(monkeypatch, caplog):
    monkeypatch.setattr(protocol, "SILENCE_TIMEOUT", 0.5)

    async def silent_manager(request: trio_websocket.WebSocketRequest) -> None:
        await welcomed(request)
        await trio.sleep_forever()

    with trio.fail_after(20):
        async with worker_of(silent_manager) as worker:
            await worker.wait_for_disconnect()
    said = [r.getMessage() for r in caplog.records if "no word" in r.getMessage()]
    assert said == ["worker 'lab-pc': no word from the manager for 0.5 s: taken as gone"]


async def test_a_worker_without_the_token_is_refused_clearly(tmp_path, monkeypatch):
    monkeypatch.delenv("CHIMERA_TOKEN", raising=False)
    with trio.fail_after(20):
        async with AsyncManager(tmp_path, port=0, token="s3cret") as manager:
            async with AsyncWorker("intruder") as worker:
                with pytest.raises(PermissionError) as refused:
                    await worker.connect(manager.host, manager.port)
            assert str(refused.value) == (
                "the manager refused worker 'intruder': wrong or missing token (give the Worker "
                "the Manager's token: Worker(..., token=...), chimera worker --token, or the "
                "CHIMERA_TOKEN environment variable)"
            )
            async with AsyncWorker("friend", token="s3cret") as worker:
                assert await worker.connect(manager.host, manager.port)
            assert all(w.name != "intruder" for w in manager.workers.values())


@pytest.mark.parametrize("token", ["s3cret", ""], ids=["a-token", "empty"])
async def test_a_manager_and_a_worker_both_take_the_token_from_the_environment(
    tmp_path, monkeypatch, token
):
    monkeypatch.setenv("CHIMERA_TOKEN", token)
    with trio.fail_after(20):
        async with AsyncManager(tmp_path, port=0) as manager:
            async with AsyncWorker("friend") as worker:
                assert await worker.connect(manager.host, manager.port)
            async with httpx.AsyncClient() as client:
                answer = await client.get(f"http://127.0.0.1:{manager.port}/api/state")
    # An empty token is none: the API answers whoever asks.
    assert answer.status_code == (401 if token else 200)


async def check_in(
    ws: trio_websocket.WebSocketConnection, name: str, worker_id: str, proof: str | None = None
) -> dict[str, Any]:
    """Check in by hand as a Worker named *name* (with *proof* as its proof of
    the token); the Manager's last answer (a welcome, or an error)."""
    await ws.send_message(protocol.make("hello", name=name, worker_id=worker_id, nonce="n"))
    answer = protocol.parse(await ws.get_message())
    if answer["type"] == "challenge":
        await ws.send_message(protocol.make("auth", proof=proof))
        answer = protocol.parse(await ws.get_message())
    return answer


async def test_a_worker_with_a_wrong_proof_or_a_replayed_one_is_refused(tmp_path):
    with trio.fail_after(20):
        async with AsyncManager(tmp_path, port=0, token="s3cret") as manager:
            url = f"ws://127.0.0.1:{manager.port}/ws/worker"
            # A proof for another challenge (as one overheard would be) is of no use.
            replayed = protocol.proof("s3cret", "worker", "n", "an earlier nonce")
            for proof in ["s3cret", replayed, None]:
                async with trio_websocket.open_websocket_url(url) as ws:
                    answer = await check_in(ws, "intruder", "i", proof)
                    assert answer == {**answer, "type": "error"}
                    assert "wrong or missing token" in answer["error"]
            assert manager.workers == {}


async def fake_manager(
    heard: list[str], proof: str | None, task_status=trio.TASK_STATUS_IGNORED
) -> None:
    """A "Manager" that does not know the token: it keeps what Workers send
    and challenges them with *proof*."""

    async def handle(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        heard.append(await ws.get_message())
        await ws.send_message(protocol.make("challenge", nonce="m", proof=proof))
        try:
            while True:
                heard.append(await ws.get_message())
        except trio_websocket.ConnectionClosed:
            pass

    await trio_websocket.serve_websocket(handle, "127.0.0.1", 0, None, task_status=task_status)


async def not_a_manager(answer: str | None, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A WebSocket server that answers a hello with *answer*, or closes (None)."""

    async def handle(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.get_message()
        if answer is None:
            await ws.aclose()
        else:
            await ws.send_message(answer)
            await trio.sleep_forever()

    await trio_websocket.serve_websocket(handle, "127.0.0.1", 0, None, task_status=task_status)


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        ("not json", "not a chimera manager"),
        (json.dumps({"type": "welcome", "v": 99}), "not a chimera manager"),
        (None, "closed the connection during check-in"),
    ],
    ids=["junk", "another-version", "closes"],
)
async def test_connecting_to_what_is_not_a_manager_returns_false_saying_why(answer, why, caplog):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(not_a_manager, answer)
            async with AsyncWorker("lab-pc") as worker:
                assert await worker.connect("127.0.0.1", server.port) is False
                assert not worker.connected
            nursery.cancel_scope.cancel()
    assert why in caplog.text


@pytest.mark.parametrize("proof", [None, "0" * 64])
async def test_a_worker_tells_its_token_to_no_manager_that_cannot_prove_it_knows_it(proof):
    # Else whoever a Worker is pointed at learns the token, and runs code on it.
    heard: list[str] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(fake_manager, heard, proof)
            async with AsyncWorker("lab-pc", token="s3cret") as worker:
                with pytest.raises(PermissionError, match="runs no code for it"):
                    await worker.connect("127.0.0.1", server.port)
                assert not worker.connected
            nursery.cancel_scope.cancel()
    assert heard and not any("s3cret" in message for message in heard)
    said = [protocol.parse(message) for message in heard]
    if proof is None:  # (a Manager with no token)
        assert [message["type"] for message in said] == ["hello"]
    else:  # (one with another token: it hears that the Worker has no proof for it)
        assert [(m["type"], m.get("proof")) for m in said] == [("hello", None), ("auth", None)]


async def test_a_worker_and_a_manager_with_different_tokens_both_say_so(tmp_path):
    refused = trio.Event()  # (set in this thread: the Manager's loop is this one)
    with on_record("chimera.manager", "'lab-pc' refused: wrong or missing token", refused.set):
        with trio.fail_after(20):
            async with AsyncManager(tmp_path, port=0, token="ours") as manager:
                async with AsyncWorker("lab-pc", token="theirs") as worker:
                    with pytest.raises(PermissionError, match="has another token than worker"):
                        await worker.connect(manager.host, manager.port)
                await refused.wait()  # (the Manager logs it as the Worker's word arrives)


async def test_a_second_worker_of_the_same_name_or_id_is_refused(tmp_path):
    # Their files would be collected into one folder, one over the other.
    with trio.fail_after(20):
        async with AsyncManager(tmp_path, port=0) as manager:
            async with AsyncWorker("lab-pc") as first, AsyncWorker("lab-pc") as second:
                assert await first.connect(manager.host, manager.port)
                with pytest.raises(PermissionError, match="named 'lab-pc' is connected already"):
                    await second.connect(manager.host, manager.port)
                url = f"ws://127.0.0.1:{manager.port}/ws/worker"
                for name, worker_id, problem in [
                    ("other", first.id, f"a worker with id {first.id!r} is connected already"),
                    ("a\nb", "x", "worker name 'a\\nb' cannot name its folder in a session"),
                    ("meta.json", "y", "worker name 'meta.json' cannot name its folder"),
                    ("../up", "z", "it holds '/'"),
                ]:
                    async with trio_websocket.open_websocket_url(url) as ws:
                        answer = await check_in(ws, name, worker_id)
                        assert answer["type"] == "error" and problem in answer["error"]
                assert [w.name for w in manager.workers.values()] == ["lab-pc"]
                assert first.connected


async def test_a_second_connect_while_one_is_under_way_is_refused_clearly(tmp_path):
    with trio.fail_after(20):
        async with AsyncManager(tmp_path, port=0) as manager:
            async with AsyncWorker("lab-pc") as worker:
                outcomes = []

                async def connect() -> None:
                    try:
                        outcomes.append(await worker.connect(manager.host, manager.port))
                    except RuntimeError as exc:
                        outcomes.append(str(exc))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(connect)
                    nursery.start_soon(connect)
                assert sorted(outcomes, key=str) == [True, "the worker is connecting already"]
                assert [w.name for w in manager.workers.values()] == ["lab-pc"]


async def test_a_worker_shut_down_connects_again_at_once(tmp_path):
    # Its last session may still be ending as the next one begins.
    with trio.fail_after(20):
        async with AsyncManager(tmp_path, port=0) as manager, AsyncWorker("lab-pc") as worker:
            assert await worker.connect(manager.host, manager.port)
            await worker.shutdown()
            await worker.wait_for_disconnect()
            await manager.wait_for_workers(0)  # (else it may refuse a second "lab-pc")
            assert await worker.connect(manager.host, manager.port)
            assert [w.name for w in manager.workers.values()] == ["lab-pc"]


async def test_an_unreachable_manager_is_false_not_an_exception():
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        port = spare.getsockname()[1]
    with trio.fail_after(20):
        async with AsyncWorker("alone") as worker:
            assert not await worker.connect("127.0.0.1", port, timeout=5)


async def test_a_worker_says_why_it_cannot_reach_a_manager(caplog):
    async def not_a_manager(stream):
        await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    async def silent(stream):
        await trio.sleep_forever()

    async def not_http(stream):
        await stream.send_all(b"\x00\xffGARBAGE\r\n" * 100)
        await trio.sleep_forever()

    async def hangs_up(stream):  # (as a service that does not take what it is sent)
        await stream.receive_some()
        await stream.aclose()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ports = []
            for handler in (not_a_manager, silent, not_http, hangs_up):
                listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
                ports.append(listeners[0].socket.getsockname()[1])
                nursery.start_soon(trio.serve_listeners, handler, listeners)
            async with AsyncWorker("w") as worker:
                assert not await worker.connect("127.0.0.1", ports[0], timeout=5)
                assert not await worker.connect("127.0.0.1", ports[1], timeout=0.5)
                assert not await worker.connect("127.0.0.1", ports[2], timeout=5)
                with trio.fail_after(5):  # (said at once, not after its 60 s)
                    assert not await worker.connect("127.0.0.1", ports[3], timeout=60)
            nursery.cancel_scope.cancel()
    said = [r.getMessage() for r in caplog.records if "cannot reach" in r.getMessage()]
    assert said[:2] == [
        f"worker 'w': cannot reach the manager at 127.0.0.1:{ports[0]}: "
        "what answers there is not a chimera manager (HTTP 404)",
        f"worker 'w': cannot reach the manager at 127.0.0.1:{ports[1]}: no answer within 0.5 s",
    ]
    assert said[2].startswith(
        f"worker 'w': cannot reach the manager at 127.0.0.1:{ports[2]}: "
        "what answers there is not a chimera manager (it does not speak HTTP: "
    )
    assert said[3] == (
        f"worker 'w': cannot reach the manager at 127.0.0.1:{ports[3]}: what answers there "
        "ended the connection before it answered the WebSocket handshake: not a chimera "
        "manager, or a tunnel with no manager behind it"
    )


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_a_worker_that_cannot_reach_a_manager_keeps_no_socket_open():
    import gc

    async def hangs_up(stream):
        await stream.receive_some()
        await stream.aclose()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            nursery.start_soon(trio.serve_listeners, hangs_up, listeners)
            async with AsyncWorker("w") as worker:
                assert not await worker.connect("127.0.0.1", port, timeout=5)
                before = len(os.listdir("/proc/self/fd"))
                gc.disable()  # (closed by the Worker, not when collected)
                try:
                    for _ in range(5):
                        assert not await worker.connect("127.0.0.1", port, timeout=5)
                    assert len(os.listdir("/proc/self/fd")) == before
                finally:
                    gc.enable()
            nursery.cancel_scope.cancel()


async def test_a_manager_on_a_port_in_use_raises_oserror_naming_it(tmp_path):
    kept = tmp_path / "kept"  # a logdir that was there: kept, with what it holds
    kept.mkdir()
    (kept / "nodes.log").write_text("an earlier session's line\n")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        said = f"cannot listen on 127.0.0.1:{port}: Address already"
        for logdir in (tmp_path / "new" / "logs", kept):
            with pytest.raises(OSError, match=said):
                async with AsyncManager(logdir, port=port):
                    pass
    # Nothing is left of a Manager that could not start but what was there.
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "kept",
        "kept/nodes.log",
    ]
    assert (kept / "nodes.log").read_text() == "an earlier session's line\n"


@pytest.mark.parametrize("kind", [AsyncManager, AsyncWorker])
def test_the_async_api_under_asyncio_says_what_to_use(tmp_path, kind):
    # (A Jupyter notebook's top-level ``await`` runs under asyncio.)
    import asyncio

    async def main() -> None:
        async with kind(tmp_path) if kind is AsyncManager else kind("w"):
            pass

    with pytest.raises(RuntimeError, match=r"runs under Trio, not this .*the blocking API"):
        asyncio.run(main())
    assert list(tmp_path.iterdir()) == []


async def test_a_call_from_another_threads_trio_run_is_refused(tmp_path):
    # (As from a GUI's callback: it would corrupt the Manager's run, and hang.)
    with trio.fail_after(20):
        async with AsyncManager(tmp_path, port=0) as manager, AsyncWorker("w") as worker:
            assert await worker.connect(manager.host, manager.port)
            for call in (manager.start, worker.shutdown):
                with pytest.raises(RuntimeError, match=r"\(\) called outside the Trio run that"):
                    await trio.to_thread.run_sync(trio.run, call)
            await manager.wait_for_workers(1)  # (nothing changed)


async def test_a_logdir_that_cannot_be_written_in_is_named(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(NotADirectoryError) as caught:
        async with AsyncManager(tmp_path / "a-file" / "logs", port=0):
            pass
    assert str(caught.value) == (
        f"[Errno 20] the manager cannot write in its logdir {tmp_path}/a-file/logs: Not a directory"
    )


async def test_a_worker_used_after_its_block_says_it_is_not_running(tmp_path):
    async with AsyncWorker("w") as worker:
        pass
    connect = partial(worker.connect, "127.0.0.1", 9)
    for call in (connect, partial(trio.to_thread.run_sync, trio.run, connect)):  # (any run)
        with pytest.raises(RuntimeError, match=r"the worker is not running: use `async with"):
            await call()


def test_an_unknown_transport_is_refused_when_the_manager_is_made(tmp_path):
    with pytest.raises(ValueError, match="transport='tpc': the known ones are 'tcp', 'nng', 'me"):
        AsyncManager(tmp_path, port=0, transport="tpc")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


async def test_unknown_paths_are_404_and_other_methods_on_the_state_405(tmp_path):
    with trio.fail_after(20):
        async with AsyncManager(tmp_path, port=0) as manager:
            async with httpx.AsyncClient() as client:
                answer = await client.get(f"http://127.0.0.1:{manager.port}/nothing")
                other = await client.post(f"http://127.0.0.1:{manager.port}/api/state")
    assert answer.status_code == 404
    assert other.status_code == 405
    assert other.headers["allow"] == "GET"
    assert other.json() == {"error": "POST /api/state: only GET"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{", "not JSON"),
        ('"hello"', "JSON object"),
        ('{"v": 1, "type": "clock", "t0": 1}', "version 1"),
        ('{"v": 2, "type": "dance"}', "unknown message type"),
        ('{"v": 2, "type": "clock"}', "without 't0'"),
        ('{"v": 2, "type": "clock", "t0": true}', "'t0' of type bool"),
        ('{"v": 2, "type": "request", "id": 1, "command": "rm", "args": {}}', "command 'rm'"),
    ],
)
def test_parse_says_what_is_wrong(text, problem):
    with pytest.raises(protocol.ProtocolError, match=problem):
        protocol.parse(text)


def test_parse_refuses_a_message_longer_than_the_longest(monkeypatch):
    text = '{"v":2,"type":"clock","t0":1}'
    monkeypatch.setattr(protocol, "MAX_MESSAGE", len(text))
    assert protocol.parse(text)["t0"] == 1
    with pytest.raises(protocol.ProtocolError, match=r"message of 30 characters \(at most 29\)"):
        protocol.parse(text + " ")


def test_a_proof_made_by_one_side_is_no_proof_for_the_other():
    # (Else a Manager's proof, overheard, would serve a Worker for the same nonces.)
    managers = protocol.proof("s3cret", "manager", "a", "b")
    assert protocol.proves(managers, "s3cret", "manager", "a", "b")
    assert not protocol.proves(managers, "s3cret", "worker", "a", "b")
    assert not protocol.proves(managers, "s3cret", "manager", "b", "a")


async def test_an_api_client_without_the_token_is_refused(tmp_path):
    with trio.fail_after(20):
        async with AsyncManager(tmp_path, port=0, token="s3cret") as manager:
            base = f"http://127.0.0.1:{manager.port}/api/state"
            async with httpx.AsyncClient() as client:
                assert (await client.get(base)).status_code == 401
                assert (await client.get(base, params={"token": "nope"})).status_code == 401
                assert (await client.get(base, params={"token": "s3cret"})).status_code == 200
                for twice in (["nope", "s3cret"], ["s3cret", "nope"], ["s3cret", "s3cret"]):
                    tokens = [("token", token) for token in twice]
                    assert (await client.get(base, params=tokens)).status_code == 401
                bearer = {"Authorization": "Bearer s3cret"}
                assert (await client.get(base, headers=bearer)).status_code == 200
            url = f"ws://127.0.0.1:{manager.port}/ws/events"
            with pytest.raises(trio_websocket.HandshakeError):
                async with trio_websocket.open_websocket_url(url):
                    pass


@asynccontextmanager
async def following_events(
    tmp_path,
) -> AsyncIterator[tuple[AsyncManager, Any, trio_websocket.WebSocketConnection]]:
    """A Manager (memory transport) with Worker 'local', a graph count -> double
    for it, and a /ws/events client connected once the Worker is."""
    import chimera as cp

    from .test_runtime import Count, Double

    graph = cp.Graph()
    graph.add_edge(Count("count", 10**9), Double("double"))
    async with AsyncManager(tmp_path, port=0, transport="memory") as manager:
        async with AsyncWorker("local") as worker:
            assert await worker.connect(manager.host, manager.port)
            await manager.wait_for_workers(1)
            url = f"ws://127.0.0.1:{manager.port}/ws/events"
            async with trio_websocket.open_websocket_url(url) as events:
                yield manager, graph, events


async def test_events_push_every_node_state_and_the_steps(tmp_path):
    with trio.fail_after(30):
        async with following_events(tmp_path) as (manager, graph, events):
            first = json.loads(await events.get_message())
            assert [w["name"] for w in first["workers"]] == ["local"]
            await manager.commit_graph(graph, {"local": ["count", "double"]})
            await manager.start()
            seen: dict[str, list[str]] = {"count": [], "double": []}
            while True:
                event = json.loads(await events.get_message())
                if event["type"] == "node_state":
                    seen[event["name"]].append(event["state"])
                if event["type"] == "node_stats":
                    double = {n["name"]: n for n in event["nodes"]}["double"]
                    if double["steps"] > 0:
                        break
            assert seen["double"][:4] == ["INITIALIZED", "CONNECTED", "READY", "RUNNING"]
            async with httpx.AsyncClient() as client:
                state = (await client.get(f"http://{manager.host}:{manager.port}/api/state")).json()
            nodes = {n["name"]: n for n in state["nodes"]}
            assert nodes["double"]["worker"] == "local"
            assert nodes["double"]["state"] == "RUNNING"
            assert nodes["double"]["steps"] > 0 and nodes["double"]["dropped"] == 0
            await manager.stop()


async def test_node_stats_are_pushed_only_when_a_figure_changes(tmp_path):
    # (A Worker's reports of figures, as the Manager takes them: stop() brings
    # the last ones, and its next report the same again.)
    with trio.fail_after(30):
        async with following_events(tmp_path) as (manager, graph, events):
            await manager.commit_graph(graph, {"local": ["count", "double"]})
            ids = [node["id"] for node in manager.state()["nodes"]]
            for steps in (0, 5, 5, 5, 7):
                figures = {"steps": steps, "dropped": 0, "writer_wait_ms": 0, "at_ns": steps}
                manager._set_node_stats(dict.fromkeys(ids, figures))
            manager._publish({"type": "end"})  # (a mark: every event before it is in)
            pushed = []
            while (event := json.loads(await events.get_message()))["type"] != "end":
                if event["type"] == "node_stats":
                    pushed.append([node["steps"] for node in event["nodes"]])
    assert pushed == [[5, 5], [7, 7]]


@pytest.fixture
def log_levels():
    """Puts back the levels of chimera's loggers after the test."""

    names = ("chimera", "chimera.node")
    saved = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


async def test_debug_shows_what_nodes_log_at_debug_from_their_processes(tmp_path, log_levels):
    import pynng

    import chimera as cp

    class Whisper(cp.Node):
        def step(self):
            self.logger.debug("psst")
            threading.Event().wait(0.01)

    cp.debug()  # (ChimeraPy's), before the nodes are made
    graph = cp.Graph()
    graph.add_node(Whisper("whisper"))
    with trio.fail_after(30):
        async with AsyncManager(tmp_path, port=0, publish_logs_via_zmq=True) as manager:
            with pynng.Sub0(dial=manager.logs_address, topics=b"") as subscriber:
                async with AsyncWorker("local") as worker:
                    assert await worker.connect(manager.host, manager.port)
                    await manager.wait_for_workers(1)
                    await manager.commit_graph(graph, {"local": ["whisper"]})
                    assert manager.graph is graph
                    await manager.start()
                    line = (await subscriber.arecv()).decode()
                    await manager.stop()
    assert line.endswith(" DEBUG local/whisper: psst\n")


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_node_logs_reach_the_manager_its_logdir_and_its_publisher(
    tmp_path, transport, caplog
):

    import pynng

    import chimera as cp

    class Chatty(cp.Node):
        def prep(self):
            self.frame = 0

        def step(self):
            # From the node's thread (inline: not the Worker's Trio thread), at
            # moments when the Worker waits for something to send: none is lost.
            self.logger.info("frame %d is late", self.frame)  # (INFO: shown by default)
            self.frame += 1
            threading.Event().wait(0.01)

    caplog.set_level(logging.INFO, logger="chimera")  # (as basicConfig(level=INFO))
    graph = cp.Graph()
    graph.add_node(Chatty("chatty"))
    with trio.fail_after(30):
        async with AsyncManager(
            tmp_path, port=0, transport=transport, publish_logs_via_zmq=True
        ) as manager:
            with pynng.Sub0(dial=manager.logs_address, topics=b"") as subscriber:
                async with AsyncWorker("local") as worker:
                    assert await worker.connect(manager.host, manager.port)
                    await manager.wait_for_workers(1)
                    await manager.commit_graph(graph, {"local": ["chatty"]})
                    await manager.start()
                    lines = [(await subscriber.arecv()).decode() for _ in range(10)]
                    # In the file already, as they are published (`tail -f` shows them).
                    running = (tmp_path / "nodes.log").read_text()
                    await manager.stop()
    # Logged once in this process: by the node's logger (the Manager does
    # not log again what a Worker of this process logged).
    logged = [(r.name, r.getMessage()) for r in caplog.records if "chatty" in r.name]
    for frame, line in enumerate(lines):
        assert line.endswith(f" INFO local/chatty: frame {frame} is late\n")
        assert logged[frame] == ("chimera.node.chatty", f"frame {frame} is late")
        assert line in running
    assert not [name for name, _ in logged if name.startswith("chimera.manager")]
    handlers = logging.getLogger("chimera.node").handlers
    assert not [h for h in handlers if type(h).__name__ == "_ForwardNodeLogs"]


async def test_a_nodes_fps_shows_from_its_first_figures_and_is_0_once_it_stops(tmp_path):
    with trio.fail_after(30):
        async with following_events(tmp_path) as (manager, graph, events):
            await events.get_message()  # the state
            await manager.commit_graph(graph, {"local": ["count", "double"]})
            await manager.start()
            while True:  # until the first figures of both nodes stepping
                event = json.loads(await events.get_message())
                if event["type"] == "node_stats" and all(n["steps"] for n in event["nodes"]):
                    break
            assert all(node["fps"] > 0 for node in event["nodes"]), event
            await manager.stop()  # (their last figures come with it)
            assert [n["fps"] for n in manager.state()["nodes"]] == [0.0, 0.0]
            await manager.shutdown()
            assert [n["fps"] for n in manager.state()["nodes"]] == [0.0, 0.0]


async def test_fps_is_over_the_time_between_readings_not_between_arrivals(tmp_path):
    # Steps are read in the node's process (every 0.5 s) and forwarded by its
    # Worker (every 1 s): their arrivals are not evenly spaced.
    with trio.fail_after(30):
        async with following_events(tmp_path) as (manager, graph, _):
            await manager.commit_graph(graph, {"local": ["count", "double"]})
            await manager.start()
            await manager.wait_for_node_state("count", "RUNNING")
            count = graph.get_id_by_name("count")
            manager._set_node_stats({count: {"steps": 0, "dropped": 0, "at_ns": 10**9}})
            manager._set_node_stats({count: {"steps": 300, "dropped": 0, "at_ns": 3 * 10**9}})
            fps = {node["name"]: node["fps"] for node in manager.state()["nodes"]}
            # A node that fails steps no more, whatever its last figures said.
            manager._set_node_state(count, "FAILED", "step raised ValueError()")
            failed = {node["name"]: node["fps"] for node in manager.state()["nodes"]}
            await manager.stop()
    assert fps["count"] == 150.0  # 300 steps in 2 s, whenever they arrived
    assert failed["count"] == 0.0


async def test_a_worker_speaks_only_for_its_own_nodes(tmp_path):
    # Another Worker (a bug, or a forgery) has no say on the nodes of 'local'.
    with trio.fail_after(30):
        async with following_events(tmp_path) as (manager, graph, _):
            await manager.commit_graph(graph, {"local": ["count", "double"]})
            count = graph.get_id_by_name("count")
            url = f"ws://127.0.0.1:{manager.port}/ws/worker"
            async with trio_websocket.open_websocket_url(url) as ws:
                assert (await check_in(ws, "other", "o"))["type"] == "welcome"
                for forged in [
                    protocol.make("node_state", node_id=count, state="FAILED", reason="forged"),
                    protocol.make("node_stats", stats={count: {"steps": 10**12, "dropped": 9}}),
                    protocol.make(
                        "log", node="count", level=40, logger="x", text="forged", time_ns=10**30
                    ),
                ]:
                    await ws.send_message(forged)
                await ws.send_message(protocol.make("clock", t0=1))  # (once it is answered,
                assert (
                    protocol.parse(await ws.get_message())["type"] == "clock_ack"
                )  # all was read)
            entry = {node["name"]: node for node in manager.state()["nodes"]}["count"]
            await manager.shutdown()
    assert (entry["state"], entry["reason"], entry["steps"]) == ("READY", None, 0)
    assert not (tmp_path / "nodes.log").exists()  # no line written, the forged one neither


def follow(picture: dict, event: dict) -> None:
    """Update *picture* (what a dashboard shows) with one ``/ws/events`` event,
    as docs/nodes.md says."""
    kind = event.pop("type")
    if kind == "state":
        picture.clear()
        picture.update(event)
    elif kind in ("graph", "node_stats"):
        picture["nodes"] = event["nodes"]
    elif kind in ("node_state", "node_address"):
        others = [node for node in picture["nodes"] if node["id"] != event["id"]]
        if len(others) == len(picture["nodes"]):
            picture["nodes"].append(event)
        else:
            picture["nodes"] = [event if n["id"] == event["id"] else n for n in picture["nodes"]]
    elif kind == "worker_joined":
        picture["workers"].append(event)
    elif kind == "worker_left":
        picture["workers"] = [w for w in picture["workers"] if w["id"] != event["id"]]


def without_figures(nodes: list[dict]) -> list[dict]:
    figures = ("steps", "dropped", "writer_wait_ms", "fps")
    return [{key: value for key, value in node.items() if key not in figures} for node in nodes]


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_a_client_following_the_events_sees_what_api_state_says(tmp_path, transport):
    import chimera as cp

    from .test_runtime import Count, Double

    first = cp.Graph()
    first.add_edge(Count("count", 10**9), Double("double"))
    second = cp.Graph()
    second.add_edge(Count("again", 10**9), Double("twice"))
    with trio.fail_after(30):
        async with AsyncManager(tmp_path, port=0, transport=transport) as manager:
            url = f"ws://127.0.0.1:{manager.port}/ws/events"
            async with trio_websocket.open_websocket_url(url) as events:
                snapshot = json.loads(await events.get_message())
                assert snapshot == {"type": "state", "workers": [], "nodes": []}
                picture: dict = {}
                follow(picture, snapshot)
                async with AsyncWorker("local") as worker:
                    assert await worker.connect(manager.host, manager.port)
                    await manager.commit_graph(first, {"local": ["count", "double"]})
                    await manager.start()
                    await manager.stop()
                    await manager.shutdown()
                    # Step by step: the nodes of the first graph leave the state,
                    # and the new one's address comes with its creation.
                    manager.register_graph(second)
                    manager.map_graph({"local": ["again", "twice"]})
                    await manager.create_p2p_network()
                    published: dict[str, list] = {}
                    while picture != manager.state():
                        event = json.loads(await events.get_message())
                        if event["type"] == "worker_joined":
                            assert set(event) == {"type", "id", "name", "connected_ns"}
                        if event["type"] in ("node_state", "node_address"):
                            assert set(event) == {"type", *manager.state()["nodes"][0]}
                        if event["type"] == "node_stats":  # only the figures are new
                            assert without_figures(event["nodes"]) == without_figures(
                                picture["nodes"]
                            )
                        if event["type"] == "node_state":
                            published.setdefault(event["name"], []).append(
                                (event["state"], event["reason"])
                            )
                        follow(picture, event)
    for name, changes in published.items():  # each a change
        assert all(a != b for a, b in itertools.pairwise(changes)), (name, changes)
    assert published["count"][-1] == ("SHUTDOWN", None)


async def test_events_clients_hear_that_the_manager_goes_away(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            async with AsyncManager(tmp_path, port=0) as manager:
                url = f"ws://127.0.0.1:{manager.port}/ws/events"
                events = await trio_websocket.connect_websocket_url(nursery, url)
                await events.get_message()  # the state
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await events.get_message()
            assert closed.value.reason.code == 1001  # going away (not 1006: abnormal)


async def test_a_refused_events_client_learns_why(tmp_path):
    async def handshake(url: str, headers=()) -> int:
        try:
            async with trio_websocket.open_websocket_url(url, extra_headers=list(headers)):
                return 101
        except trio_websocket.ConnectionRejected as refused:
            assert json.loads(refused.body)["error"]
            return refused.status_code

    with trio.fail_after(20):
        async with AsyncManager(tmp_path, port=0, token="s3cret") as manager:
            base = f"ws://127.0.0.1:{manager.port}"
            assert await handshake(f"{base}/ws/events") == 401
            assert await handshake(f"{base}/ws/events?token=nope") == 401
            assert await handshake(f"{base}/ws/nothing?token=s3cret") == 404
            assert await handshake(f"{base}/ws/events?token=s3cret") == 101
            # An authentication scheme is case-insensitive (RFC 9110).
            for scheme in ("Bearer", "bearer", "BEARER"):
                authorization = (b"Authorization", f"{scheme} s3cret".encode())
                assert await handshake(f"{base}/ws/events", [authorization]) == 101
                async with httpx.AsyncClient() as client:
                    answer = await client.get(
                        f"http://127.0.0.1:{manager.port}/api/state",
                        headers={"Authorization": f"{scheme} s3cret"},
                    )
                assert answer.status_code == 200


async def test_a_log_record_of_several_lines_stays_one_record(tmp_path):
    import datetime
    import re
    import time

    import pynng

    import chimera as cp

    class Verbose(cp.Node):
        def step(self):
            self.logger.warning("two\nlines\r\nand three\n")
            threading.Event().wait(0.01)

    graph = cp.Graph()
    graph.add_node(Verbose("verbose"))
    with trio.fail_after(30):
        async with AsyncManager(
            tmp_path, port=0, transport="memory", publish_logs_via_zmq=True
        ) as manager:
            with pynng.Sub0(dial=manager.logs_address, topics=b"") as subscriber:
                async with AsyncWorker("local") as worker:
                    assert await worker.connect(manager.host, manager.port)
                    await manager.commit_graph(graph, {"local": ["verbose"]})
                    await manager.start()
                    record = (await subscriber.arecv()).decode()
                    await manager.stop()
    stamp, rest = record.split(" ", 1)
    assert rest == "WARNING local/verbose: two\n    lines\n    and three\n"
    # ISO 8601 with the UTC offset, to the millisecond.
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", stamp)
    assert abs(datetime.datetime.fromisoformat(stamp).timestamp() - time.time()) < 60
    assert record in (tmp_path / "nodes.log").read_text()


#: Set once the Manager says that it cannot write node logs.
SAID = threading.Event()


class _FullDisk(io.StringIO):
    """``nodes.log`` on a disk that just filled up."""

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


async def test_node_logs_that_cannot_be_written_cost_only_the_log_file(tmp_path, caplog):
    import chimera as cp

    from .nodes import Talker

    graph = cp.Graph()
    graph.add_node(Talker("talker"))
    with trio.fail_after(30):
        async with AsyncManager(tmp_path, port=0, transport="memory") as manager:
            async with AsyncWorker("local") as worker:
                assert await worker.connect(manager.host, manager.port)
                await manager.commit_graph(graph, {"local": ["talker"]})
                manager._log_file = _FullDisk()  # (the disk fills up)
                with on_record("chimera.manager", "cannot be written", SAID.set):
                    await manager.start()
                    await trio.to_thread.run_sync(SAID.wait, 20)
                assert await manager.stop()
                assert worker.connected
                assert list(manager.nodes.values()) == ["STOPPED"]
                assert await manager.collect()
    said = [r.getMessage() for r in caplog.records if "cannot be written" in r.getMessage()]
    assert said == [
        f"node logs cannot be written to {tmp_path / 'nodes.log'} ([Errno 28] No space left "
        "on device): they are no longer written there"
    ]


async def test_a_burst_of_node_logs_waits_for_a_subscriber_that_reads_afterwards(tmp_path):
    import pynng

    import chimera as cp

    class Burst(cp.Node):
        def step(self):
            for line in range(5000):
                self.logger.info("line %d", line)
            raise RuntimeError("done")  # (one step: the node fails, and says so)

    graph = cp.Graph()
    graph.add_node(Burst("burst"))
    with trio.fail_after(60):
        async with AsyncManager(
            tmp_path, port=0, transport="memory", publish_logs_via_zmq=True
        ) as manager:
            # (A subscriber's own queue holds 128 records unless told more.)
            with pynng.Sub0(
                dial=manager.logs_address, topics=b"", recv_buffer_size=8192
            ) as subscriber:
                async with AsyncWorker("local") as worker:
                    assert await worker.connect(manager.host, manager.port)
                    await manager.commit_graph(graph, {"local": ["burst"]})
                    await manager.start()
                    await manager.wait_for_node_state("burst", "FAILED")
                    lines = []
                    while not lines or "RuntimeError" not in lines[-1]:
                        lines.append((await subscriber.arecv()).decode())
                    await manager.stop()
    said = [line.split(": ", 1)[1] for line in lines if "local/burst: line " in line]
    assert said == [f"line {i}\n" for i in range(5000)]
    # The failure too, with the traceback of the node's code.
    failure = lines[-1].split(" local/burst: ", 1)[1]
    assert failure.startswith("node 'burst' failed: step raised RuntimeError('done')\n")
    assert 'raise RuntimeError("done")' in failure


@pytest.mark.parametrize(
    ("host", "dialed"),
    [("0.0.0.0", "127.0.0.1"), ("::", "[::1]"), ("10.0.0.5", "10.0.0.5"), ("::1", "[::1]")],
)
def test_logs_are_published_at_an_address_a_client_can_dial(host, dialed):
    from chimera._manager import _dialable

    assert _dialable(host) == dialed


@pytest.mark.parametrize("host", ["lab-pc", "LAB-PC.local.", "münchen", "10.0.0.5", "fe80::1%eth0"])
def test_a_host_is_a_name_of_any_script_or_an_ip_address(tmp_path, host):
    assert AsyncManager(tmp_path, port=0, host=host).host == host


BAD_HOSTS = [
    ("", "'' (every interface is '0.0.0.0', or '::')"),
    ("localhost:9000", "'localhost:9000' (without its port: the port is given on its own)"),
    ("[::1]:9000", "'[::1]:9000' (without its port: the port is given on its own)"),
    ("http://localhost", "'http://localhost' (a host, not a URL)"),
    ("[127.0.0.1]", "'[127.0.0.1]' (only an IPv6 address goes in brackets)"),
    ("[::1", "'[::1'"),
    ("::1]", "'::1]'"),
    ("lab pc", "'lab pc'"),
]


@pytest.mark.parametrize(("host", "said"), BAD_HOSTS)
def test_a_manager_refuses_a_host_that_is_not_one(tmp_path, host, said):
    # (An empty one would listen on every interface, unsaid.)
    with pytest.raises(ValueError) as raised:
        AsyncManager(tmp_path, port=0, host=host)
    assert str(raised.value) == f"not a host name or IP address: {said}"


@pytest.mark.parametrize(("host", "said"), BAD_HOSTS)
async def test_a_worker_refuses_to_connect_to_a_host_that_is_not_one(host, said):
    async with AsyncWorker("lab-pc") as worker:
        with pytest.raises(ValueError) as raised:
            await worker.connect(host, 9000, timeout=5)
        assert str(raised.value) == f"not a host name or IP address: {said}"
        assert not worker.connected


@pytest.mark.skipif(not can_bind("::1"), reason="no IPv6 loopback")
@pytest.mark.parametrize("given", ["::1", "[::1]"])
async def test_an_ipv6_host_in_brackets_or_not_is_reached_as_the_manager_says(tmp_path, given):
    with trio.fail_after(20):
        async with AsyncManager(tmp_path, port=0, host=given) as manager:
            assert manager.host == "::1"
            async with AsyncWorker("lab-pc") as worker:
                assert await worker.connect(given, manager.port)
                (info,) = manager.workers.values()
                assert (info.ip, info.reached) == ("::1", "::1")


async def test_a_clock_exchange_that_cannot_be_is_dropped_and_the_worker_stays(caplog):
    # As when a clock steps during an exchange: its answer seems to take less
    # time than the Manager spent on it. Then a good exchange.

    async def stepping_manager(request: trio_websocket.WebSocketRequest) -> None:
        ws = await welcomed(request)
        t0 = protocol.parse(await ws.get_message())["t0"]
        await ws.send_message(protocol.make("clock_ack", t0=t0, t1=t0, t2=t0 + 10**10))
        t0 = protocol.parse(await ws.get_message())["t0"]
        await ws.send_message(protocol.make("clock_ack", t0=t0, t1=t0, t2=t0))
        await trio.sleep_forever()

    with trio.fail_after(20):
        async with worker_of(stepping_manager) as worker:
            await worker.wait_for_clock(1)  # (the answers are read in order)
            assert worker.connected
            assert worker.clock.estimate().samples == 1
            assert abs(worker.clock.estimate().offset_ns) < 10**9
    said = [r.getMessage() for r in caplog.records if "cannot be" in r.getMessage()]
    assert said == ["worker 'lab-pc': a clock exchange that cannot be (a clock stepped?): dropped"]
