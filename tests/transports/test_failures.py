"""Peers that die, hang, or speak garbage: the link ends, nothing else does."""

from __future__ import annotations

import logging
import signal
import socket
import struct
import subprocess
import sys
import textwrap

import pynng
import pytest
import trio
import trio.testing

import transports
from transports._framing import (
    HELLO_SIZE,
    MAGIC,
    MAX_CAPACITY,
    MAX_KEY,
    VERSION,
    WELCOME_SIZE,
    ProtocolError,
    encode_ack,
    encode_end,
    encode_hello,
    encode_label,
    encode_message_header,
    encode_welcome,
)
from transports._nng import _read_record

from .conftest import BACKENDS

STREAM_BACKENDS = ["tcp", "unix"]


async def open_raw_stream(address: str) -> trio.SocketStream:
    """A plain socket connection to a tcp or unix transports address."""
    scheme, rest = address.split("://", 1)
    if scheme == "unix":
        return await trio.open_unix_socket(rest)
    host, port = rest.rsplit(":", 1)
    return await trio.open_tcp_stream(host, int(port))


async def receive_exactly(stream: trio.SocketStream, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = await stream.receive_some(count - len(data))
        assert chunk, "peer closed"
        data += chunk
    return data


class Child:
    """A Python child process running *code*; its first stdout line is read."""

    def __init__(self, code: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            stdout=subprocess.PIPE,
            text=True,
        )

    async def first_line(self) -> str:
        return (await trio.to_thread.run_sync(self.process.stdout.readline)).strip()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.process.stdout.close()


@pytest.fixture
def child_factory():
    children: list[Child] = []

    def make(code: str) -> Child:
        child = Child(code)
        children.append(child)
        return child

    yield make
    for child in children:
        if child.process.poll() is None:
            child.kill()


async def test_outlet_process_killed_breaks_the_inlet(net_address, child_factory):
    child = child_factory(
        f"""
        import trio, transports
        async def main():
            outlet = await transports.bind({net_address!r})
            print(outlet.address, flush=True)
            await outlet.wait_for_inlets(1)
            for i in range(3):
                await outlet.send(b"%d" % i)
            await trio.sleep_forever()
        trio.run(main)
        """
    )
    with trio.fail_after(20):
        inlet = await transports.connect(await child.first_line())
        for i in range(3):
            assert await inlet.receive() == [b"%d" % i]
        child.kill()
        with pytest.raises(trio.BrokenResourceError):
            await inlet.receive()
        with pytest.raises(trio.BrokenResourceError):
            await inlet.receive()  # stays broken
        await inlet.aclose()


async def test_inlet_process_killed_frees_the_outlet(net_address, child_factory, caplog):
    with trio.fail_after(20):
        async with await transports.bind(net_address) as outlet:
            child = child_factory(
                f"""
                import trio, transports
                async def main():
                    inlet = await transports.connect({outlet.address!r}, capacity=1)
                    print("connected", flush=True)
                    await trio.sleep_forever()
                trio.run(main)
                """
            )
            assert await child.first_line() == "connected"
            healthy = await transports.connect(outlet.address, capacity=10)
            await outlet.wait_for_inlets(2)
            await outlet.send(b"0")  # fills the child's link
            async with trio.open_nursery() as nursery:
                nursery.start_soon(outlet.send, b"1")  # waits for the child
                await trio.testing.wait_all_tasks_blocked(0.1)
                child.kill()  # ... until it dies
            await outlet.send(b"2")
            await outlet.aclose()
            received = [bytes(m[0]) async for m in healthy]
    assert received == [b"0", b"1", b"2"]
    assert [link.messages_sent for link in outlet.stats.links] == [1, 3]


@pytest.mark.parametrize("backend", STREAM_BACKENDS)
async def test_an_inlet_breaking_off_while_the_outlet_closes_is_no_warning(
    backend, short_dir, caplog
):
    # As a cluster shutting down: every node closes at once.
    caplog.set_level(logging.DEBUG, logger="transports")
    with trio.fail_after(10):
        outlet = await transports.bind(BACKENDS[backend].format(dir=short_dir), close_timeout=5)
        early, late = [await open_raw_stream(outlet.address) for _ in range(2)]
        for raw, label in ((early, "early"), (late, "")):
            hello = encode_hello(transports.Delivery.RELIABLE, 4, label=label)
            await raw.send_all(hello + encode_label(label))
            await receive_exactly(raw, WELCOME_SIZE)
        await outlet.wait_for_inlets(2)
        await outlet.send(b"unread")

        async def break_off(raw: trio.SocketStream) -> None:
            await raw.receive_some(1)  # the message is here, most of it unread...
            raw.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await raw.aclose()  # ... and the inlet breaks off (a reset)

        await break_off(early)  # while the outlet runs: news
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outlet.aclose)  # waits for the end of stream's acknowledgement
            await break_off(late)
    ended = [r for r in caplog.records if "ended:" in r.getMessage()]
    assert [r.levelname for r in ended] == ["WARNING", "DEBUG"]
    assert "('early') ended: " in ended[0].getMessage()  # (the inlet's label, if it gave one)


@pytest.mark.parametrize("backend", STREAM_BACKENDS)
async def test_garbage_from_an_inlet_ends_only_its_link(backend, short_dir, caplog):
    with trio.fail_after(10):
        async with await transports.bind(BACKENDS[backend].format(dir=short_dir)) as outlet:
            good = await transports.connect(outlet.address)
            raw = await open_raw_stream(outlet.address)
            await raw.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await raw.receive_some(100) == b""  # the outlet hangs up
            await outlet.send(b"still serving")
            assert await good.receive() == [b"still serving"]
            await raw.aclose()
            await good.aclose()
    assert any("not a transports peer" in r.getMessage() for r in caplog.records)


def hello_of(version=VERSION, code=0, capacity=4, label=b"", key=b""):
    """An inlet's HELLO, with any field's value (``max_bytes`` 0: none)."""
    fixed = struct.pack("<4sHBIQHH", MAGIC, version, code, capacity, 0, len(label), len(key))
    return fixed + label + key


def test_hello_of_makes_what_an_inlet_sends():
    assert hello_of() == encode_hello(transports.Delivery.RELIABLE, 4)


@pytest.mark.parametrize(
    ("hello", "problem"),
    [
        (hello_of(label=b"\xff\xfe"), "not UTF-8"),
        (hello_of(label=bytes(1025)), "a label of 1025 bytes, over 1024"),
        (hello_of(capacity=0), f"capacity 0 out of range 1..{MAX_CAPACITY}"),
        (hello_of(capacity=MAX_CAPACITY + 1), f"capacity {MAX_CAPACITY + 1} out of range"),
        (hello_of(version=VERSION - 1), f"version {VERSION - 1}, this side speaks {VERSION}"),
        (hello_of(code=7), "unknown delivery code 7"),
        (hello_of(key=bytes(MAX_KEY + 1)), f"a key of {MAX_KEY + 1} bytes, over {MAX_KEY}"),
    ],
    ids=["label-utf8", "label-size", "capacity-0", "capacity-max", "version", "code", "key"],
)
@pytest.mark.parametrize("backend", STREAM_BACKENDS)
async def test_a_bad_hello_ends_only_its_link_saying_why(
    backend, hello, problem, short_dir, caplog
):
    with trio.fail_after(10):
        async with await transports.bind(BACKENDS[backend].format(dir=short_dir)) as outlet:
            good = await transports.connect(outlet.address)
            raw = await open_raw_stream(outlet.address)
            await raw.send_all(hello)
            assert await raw.receive_some(100) == b""  # the outlet hangs up, no WELCOME
            await outlet.send(b"still serving")
            assert await good.receive() == [b"still serving"]
            assert len(outlet.stats.links) == 1
            await raw.aclose()
            await good.aclose()
    assert any(problem in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("backend", STREAM_BACKENDS)
async def test_credit_beyond_what_was_sent_ends_the_link(backend, short_dir, caplog):
    with trio.fail_after(10):
        async with await transports.bind(BACKENDS[backend].format(dir=short_dir)) as outlet:
            raw = await open_raw_stream(outlet.address)
            await raw.send_all(encode_hello(transports.Delivery.RELIABLE, 4))
            await receive_exactly(raw, WELCOME_SIZE)
            await raw.send_all(bytes([3]) + (1000).to_bytes(4, "little") + bytes(8))
            assert await raw.receive_some(100) == b""
            await raw.aclose()
    assert any("credit for 1000 messages" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("backend", STREAM_BACKENDS)
async def test_an_acknowledgement_before_the_end_of_stream_ends_the_link(
    backend, short_dir, caplog
):
    with trio.fail_after(10):
        async with await transports.bind(BACKENDS[backend].format(dir=short_dir)) as outlet:
            raw = await open_raw_stream(outlet.address)
            await raw.send_all(encode_hello(transports.Delivery.RELIABLE, 4))
            await receive_exactly(raw, WELCOME_SIZE)
            await raw.send_all(encode_ack(0))
            assert await raw.receive_some(100) == b""
            await raw.aclose()
    assert any("unexpected record of kind 4" in r.getMessage() for r in caplog.records)


async def test_an_inlet_acknowledges_the_end_of_stream_once():
    heard = []
    with trio.fail_after(10):
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listener.socket.getsockname()[1]

        async def fake_outlet() -> None:
            async with await listener.accept() as stream:
                await receive_exactly(stream, HELLO_SIZE)
                await stream.send_all(encode_welcome() + encode_end(0))
                data = b""
                while chunk := await stream.receive_some(100):  # until the inlet hangs up
                    data += chunk
                heard.append(data)

        async with listener, trio.open_nursery() as nursery:
            nursery.start_soon(fake_outlet)
            inlet = await transports.connect(f"tcp://127.0.0.1:{port}")
            with pytest.raises(trio.EndOfChannel):
                await inlet.receive()
            await trio.testing.wait_all_tasks_blocked()  # (the acknowledgement has gone)
            await inlet.aclose()
    assert heard == [encode_ack(0)]


async def test_nng_outlet_ignores_foreign_requests(short_dir):
    with trio.fail_after(10):
        async with await transports.bind("nng+tcp://127.0.0.1:0") as outlet:
            url = outlet.address.replace("nng+", "")
            with pynng.Req0(dial=url) as stranger:
                await stranger.asend(b"hello?")
                assert (await stranger.arecv()).startswith(b"error")
            inlet = await transports.connect(outlet.address)
            await outlet.send(b"fine")
            assert await inlet.receive() == [b"fine"]
            await inlet.aclose()


async def impostor_listeners(backend: str, short_dir: str) -> tuple[list[trio.SocketListener], str]:
    """Listeners for a server that is not an outlet, and the address inlets use for it."""
    if backend == "unix":
        path = f"{short_dir}/impostor.sock"
        sock = trio.socket.socket(trio.socket.AF_UNIX)
        await sock.bind(path)
        sock.listen()
        return [trio.SocketListener(sock)], f"unix://{path}"
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    return listeners, f"tcp://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


@pytest.mark.parametrize("backend", STREAM_BACKENDS)
async def test_a_server_that_is_not_an_outlet_is_refused(backend, short_dir):
    answers = [b"SSH-2.0-OpenSSH_9.2\r\n", b""]

    async def impostor(stream: trio.SocketStream) -> None:
        await stream.receive_some(100)
        await stream.send_all(answers[0])
        await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners, address = await impostor_listeners(backend, short_dir)
            await nursery.start(trio.serve_listeners, impostor, listeners)
            for answers[0] in (b"SSH-2.0-OpenSSH_9.2\r\n", b""):
                with pytest.raises(trio.BrokenResourceError):
                    await transports.connect(address)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("backend", STREAM_BACKENDS)
async def test_an_inlet_refused_at_the_handshake_hangs_up_before_it_raises(backend, short_dir):
    hung_up = trio.Event()

    async def impostor(stream: trio.SocketStream) -> None:
        await stream.receive_some(100)
        await stream.send_all(b"SSH-2.0-OpenSSH_9.2\r\n")
        while await stream.receive_some(100):
            pass
        hung_up.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners, address = await impostor_listeners(backend, short_dir)
            await nursery.start(trio.serve_listeners, impostor, listeners)
            with pytest.raises(trio.BrokenResourceError) as refused:
                await transports.connect(address)
            await hung_up.wait()  # (while the error, and all it refers to, is still held)
            assert "not an outlet" in str(refused.value)
            nursery.cancel_scope.cancel()


async def test_nng_server_that_is_not_an_outlet_is_refused():
    with trio.fail_after(10), pynng.Rep0(listen="tcp://127.0.0.1:0") as impostor:
        port = str(impostor.listeners[0].local_address).rsplit(":", 1)[1]
        async with trio.open_nursery() as nursery:

            async def answer():
                await impostor.arecv()
                await impostor.asend(b"whatever")

            nursery.start_soon(answer)
            with pytest.raises(trio.BrokenResourceError):
                await transports.connect(f"nng+tcp://127.0.0.1:{port}")


async def test_an_nng_outlet_offering_a_link_outside_its_path_is_refused(short_dir):
    path = f"{short_dir}/outlet"
    with trio.fail_after(10), pynng.Rep0(listen=f"ipc://{path}") as impostor:
        async with trio.open_nursery() as nursery:

            async def answer():
                await impostor.arecv()
                await impostor.asend(MAGIC + b"link=" + f"{short_dir}/elsewhere".encode())

            nursery.start_soon(answer)
            with pytest.raises(trio.BrokenResourceError, match="outside"):
                await transports.connect(f"nng+ipc://{path}")


@pytest.mark.parametrize("backend", STREAM_BACKENDS)
async def test_close_gives_up_on_an_inlet_that_never_acknowledges(backend, short_dir, caplog):
    with trio.fail_after(10):
        outlet = await transports.bind(BACKENDS[backend].format(dir=short_dir), close_timeout=0.2)
        silent = await open_raw_stream(outlet.address)
        await silent.send_all(encode_hello(transports.Delivery.RELIABLE, 4))
        await receive_exactly(silent, WELCOME_SIZE)
        good = await transports.connect(outlet.address)
        await outlet.wait_for_inlets(2)
        await outlet.send(b"last")
        await outlet.aclose()  # returns after close_timeout, not never
        assert await good.receive() == [b"last"]
        with pytest.raises(trio.EndOfChannel):
            await good.receive()
        # The silent peer got the end of stream too, then was cut off.
        data = b""
        while chunk := await silent.receive_some(1 << 16):
            data += chunk
        assert data.endswith(bytes([2]) + (1).to_bytes(8, "little"))
        await silent.aclose()
        await good.aclose()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        ": 1 inlet(s) did not acknowledge the end of stream within 0.2 s" in w for w in warnings
    )


@pytest.mark.parametrize("backend", STREAM_BACKENDS)
async def test_an_inlet_whose_handshake_ends_while_the_outlet_closes_is_turned_away(
    backend, short_dir
):
    hello = encode_hello(transports.Delivery.RELIABLE, 4)
    with trio.fail_after(10):
        outlet = await transports.bind(BACKENDS[backend].format(dir=short_dir))
        holding = await open_raw_stream(outlet.address)  # holds the close up: never acknowledges
        await holding.send_all(hello)
        await receive_exactly(holding, WELCOME_SIZE)
        await outlet.wait_for_inlets(1)
        late = await open_raw_stream(outlet.address)
        await late.send_all(hello[:-1])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outlet.aclose)
            assert await receive_exactly(holding, 9) == encode_end(0)  # the outlet is closing
            await late.send_all(hello[-1:])
            assert await late.receive_some(100) == b""  # hung up, no WELCOME
            await holding.aclose()  # (lets the close end)
        await late.aclose()
    assert len(outlet.stats.links) == 1


async def test_cancelled_close_still_closes(address):
    with trio.fail_after(10):
        outlet = await transports.bind(address)
        inlet = await transports.connect(outlet.address)
        with trio.CancelScope() as scope:
            scope.cancel()
            await outlet.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await outlet.send(b"x")
        # Abruptly: the inlet may or may not have seen the end of stream.
        with pytest.raises((trio.BrokenResourceError, trio.EndOfChannel)):
            await inlet.receive()
        await inlet.aclose()


@pytest.mark.parametrize(
    "cut", [-1, 1], ids=["header message one byte short", "header message one byte long"]
)
async def test_nng_message_whose_size_disagrees_with_its_header_is_refused(cut):
    frames = [memoryview(b"small"), memoryview(bytes(70_000))]  # inline, then a message of its own
    messages = [encode_message_header(0, frames) + b"small", bytes(70_000)]
    assert (await _read_record(iter_messages(messages), 1 << 20))[2] == frames
    messages[0] = messages[0][:cut] if cut < 0 else messages[0] + b"!"
    with pytest.raises(ProtocolError):
        await _read_record(iter_messages(messages), 1 << 20)


def iter_messages(messages):
    queue = list(messages)

    async def next_message():
        await trio.lowlevel.checkpoint()
        return queue.pop(0) if queue else None

    return next_message
