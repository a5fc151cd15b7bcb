"""``Inlet.lend``: an inlet read by a thread, then given back to its event loop."""

from __future__ import annotations

import logging
import socket
import threading

import pytest
import trio

import transports
from transports import Delivery

from .conftest import BACKENDS
from .test_conformance import payload, receive_all, send_all_then_close

#: The backends whose inlets can be lent.
LENDABLE = ("tcp", "unix")


@pytest.fixture(params=LENDABLE)
def lend_address(request, short_dir: str) -> str:
    return BACKENDS[request.param].format(dir=short_dir)


async def in_thread(fn, *args):
    """``fn(*args)`` on a thread, abandoned if cancelled (the loan's end then
    interrupts it): a test that fails then fails, rather than hang."""
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)


def take(lent: transports.LentInlet, count: int | None = None) -> tuple[list[list[bytes]], str]:
    """Receive from *lent* on this thread, *count* messages or until it
    stops; the messages, and why it stopped."""
    messages: list[list[bytes]] = []
    while count is None or len(messages) < count:
        try:
            frames = lent.receive()
        except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            return messages, type(exc).__name__
        if frames is None:
            return messages, "None"
        messages.append([bytes(frame) for frame in frames])
    return messages, "count"


@pytest.mark.parametrize("max_bytes", [None, 100_000])
async def test_a_lent_inlet_gets_every_message_then_the_end_acknowledged(
    lend_address, max_bytes, caplog
):
    # Capacity 4: the outlet goes on only with the credit the thread writes;
    # it closes at once only with the acknowledgement the thread writes.
    sizes = [0, 10, 1000, 65536, 65537, 1 << 20, 3, 300_000, 7] * 20
    messages = [[b"%d" % i, payload(i, size)] for i, size in enumerate(sizes)]
    with trio.fail_after(30):
        async with (
            await transports.bind(lend_address, close_timeout=60) as outlet,
            await transports.connect(outlet.address, capacity=4, max_bytes=max_bytes) as inlet,
        ):
            assert inlet.lendable
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all_then_close, outlet, messages)
                async with inlet.lend() as lent:
                    received, end = await in_thread(take, lent)
    assert (received, end) == (messages, "EndOfChannel")
    assert inlet.stats.messages_received == len(messages)
    assert [link.messages_sent for link in outlet.stats.links] == [len(messages)]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("capacity", [1, 2, 8])
async def test_turns_between_the_thread_and_the_event_loop_lose_nothing(lend_address, capacity):
    # Each turn, some messages are sent and taken: by the thread (which then
    # waits for more and is interrupted), or by the event loop. Every
    # message is received once, in order.
    sizes = [10, 70_000, 1000, 1 << 20, 5] * 7
    messages = [[payload(i, size)] for i, size in enumerate(sizes)]
    turns = [3, 7, 1, 11, 2, 9, 2]
    received: list[list[bytes]] = []
    with trio.fail_after(30):
        async with (
            await transports.bind(lend_address) as outlet,
            await transports.connect(outlet.address, capacity=capacity) as inlet,
        ):
            await outlet.wait_for_inlets()
            first = 0
            for turn, count in enumerate(turns):
                async with trio.open_nursery() as nursery:

                    async def send(some: list[list[bytes]]) -> None:
                        for message in some:
                            await outlet.send(message)

                    nursery.start_soon(send, messages[first : first + count])
                    first += count
                    if turn % 2:
                        for _ in range(count):
                            received.append([bytes(f) for f in await inlet.receive()])
                        continue
                    async with inlet.lend() as lent:
                        got, why = await in_thread(take, lent, count)
                        assert why == "count"
                        received.extend(got)
                        async with trio.open_nursery() as waiting:
                            # The thread waits for more, and is interrupted.
                            waiting.start_soon(in_thread, take, lent)
                            await trio.testing.wait_all_tasks_blocked()
                            lent.interrupt()
            await outlet.aclose()
            rest = await receive_all(inlet)
    assert received == messages[:first]
    assert rest == []


async def test_the_loan_ending_interrupts_the_thread_and_the_inlet_goes_on(lend_address):
    with trio.fail_after(10):
        async with (
            await transports.bind(lend_address) as outlet,
            await transports.connect(outlet.address, capacity=2) as inlet,
        ):
            await outlet.wait_for_inlets()
            results: list = []
            done = threading.Event()

            def thread_takes(lent: transports.LentInlet) -> None:
                results.append(take(lent))
                results.append(lent.receive())  # (the loan is over)
                done.set()

            async with trio.open_nursery() as lending:

                async def lend() -> None:
                    async with inlet.lend() as lent:
                        await outlet.send(b"first")
                        await in_thread(thread_takes, lent)

                lending.start_soon(lend)
                while not inlet.stats.messages_received:
                    await trio.testing.wait_all_tasks_blocked()
                lending.cancel_scope.cancel()  # (the loan ends: its thread returns None)
            await in_thread(done.wait)
            assert results == [([[b"first"]], "None"), None]
            await outlet.send(b"second")
            assert [bytes(f) for f in await inlet.receive()] == [b"second"]
            assert inlet.stats.messages_received == 2


async def test_closing_a_lent_inlet_stops_its_thread(lend_address):
    with trio.fail_after(10):
        async with await transports.bind(lend_address) as outlet:
            inlet = await transports.connect(outlet.address)
            async with inlet.lend() as lent:
                async with trio.open_nursery() as nursery:
                    results: list = []

                    async def thread_waits():
                        results.append(await in_thread(take, lent))

                    nursery.start_soon(thread_waits)
                    await trio.testing.wait_all_tasks_blocked()
                    await inlet.aclose()
            assert results == [([], "ClosedResourceError")]
            with pytest.raises(trio.ClosedResourceError):
                lent.receive()
            with pytest.raises(trio.ClosedResourceError):
                await inlet.receive()
            # The outlet forgets the inlet: sending does not wait for it.
            for _ in range(20):
                await outlet.send(b"x")


async def test_a_link_cut_while_lent_breaks_after_what_arrived(lend_address):
    with trio.fail_after(10):
        async with await transports.bind(lend_address) as outlet:
            async with await transports.connect(outlet.address, label="a") as inlet:
                await outlet.wait_for_inlets()
                await outlet.send(b"1")
                await outlet.send(b"2")
                async with inlet.lend() as lent:
                    got, _ = await in_thread(take, lent, 2)
                    assert outlet.cut("a") == 1
                    rest, why = await in_thread(take, lent)
    assert (got, rest, why) == ([[b"1"], [b"2"]], [], "BrokenResourceError")


async def test_what_cannot_be_lent_says_so(address, backend):
    with trio.fail_after(10):
        async with await transports.bind(address) as outlet:
            async with (
                await transports.connect(outlet.address) as inlet,
                await transports.connect(outlet.address, delivery=Delivery.LATEST) as latest,
            ):
                assert inlet.lendable is (backend in LENDABLE)
                assert not latest.lendable
                with pytest.raises(NotImplementedError):
                    async with latest.lend():
                        pass
                if not inlet.lendable:
                    with pytest.raises(NotImplementedError):
                        async with inlet.lend():
                            pass
                    return
                async with inlet.lend():
                    with pytest.raises(trio.BusyResourceError):
                        async with inlet.lend():
                            pass
                    with pytest.raises(trio.BusyResourceError):
                        await inlet.receive()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(inlet.receive)
                    await trio.testing.wait_all_tasks_blocked()
                    with pytest.raises(trio.BusyResourceError):
                        async with inlet.lend():
                            pass
                    nursery.cancel_scope.cancel()
            with pytest.raises(trio.ClosedResourceError):
                async with inlet.lend():
                    pass


async def test_an_inlet_lent_after_its_stream_ended_gives_what_is_left_then_the_end(lend_address):
    with trio.fail_after(10):
        async with await transports.bind(lend_address) as outlet:
            inlet = await transports.connect(outlet.address)
            await outlet.wait_for_inlets()
            await outlet.send(b"1")
            await outlet.send(b"2")
            await outlet.aclose()  # (acknowledged: the inlet's tasks took it all in)
            await trio.testing.wait_all_tasks_blocked()  # (and saw the connection end)
            async with inlet, inlet.lend() as lent:
                assert await in_thread(take, lent) == ([[b"1"], [b"2"]], "EndOfChannel")


async def test_a_thread_interrupted_as_it_waits_to_write_leaves_the_rest_in_order():
    # (The credit writer writes what the thread left, once the loan is over.)
    from transports._net import _Interrupted, _Loan

    left, right = socket.socketpair()
    left.setblocking(False)
    with left, right:
        while True:  # the connection takes no more for now
            try:
                left.send(bytes(65536))
            except BlockingIOError:
                break

        class Inlet:  # (what a loan uses of its inlet)
            _closed = False

            class _conduit:
                fileno = left.fileno

        loan = _Loan(Inlet())  # type: ignore[arg-type]
        raised: list[type] = []

        def write(record: bytes) -> None:
            try:
                loan.write(record)
            except _Interrupted:
                raised.append(_Interrupted)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(in_thread, write, b"credit")
                await trio.testing.wait_all_tasks_blocked()
                loan.interrupt()
        write(b"ack")  # (after an interruption, nothing more is written)
        assert raised == [_Interrupted, _Interrupted]
        assert [bytes(view) for view in loan.unwritten] == [b"credit", b"ack"]
        await loan.end()


async def test_an_inlet_closed_while_lend_waits_for_its_record_ends_the_loan(short_dir):
    # Its task is midway through a record that will not come whole (a
    # frozen outlet): lend() waits for it, until the inlet is closed.
    from transports._framing import encode_messages, encode_welcome

    record = b"".join(
        bytes(b) for b in encode_messages([(0, [memoryview(bytes(200_000))], 200_000)])
    )
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(f"{short_dir}/frozen.sock")
    sock.listen()
    results: list = []
    with trio.fail_after(10):
        async with trio.SocketListener(sock) as listener, trio.open_nursery() as nursery:

            async def frozen_outlet() -> None:
                stream = await listener.accept()
                await stream.receive_some(100)  # the inlet's hello
                await stream.send_all(encode_welcome() + record[:1000])
                await trio.sleep_forever()

            nursery.start_soon(frozen_outlet)
            inlet = await transports.connect(f"unix://{short_dir}/frozen.sock")
            await trio.testing.wait_all_tasks_blocked()  # (its task waits inside the record)

            async def lend() -> None:
                async with inlet.lend() as lent:
                    try:
                        await in_thread(lent.receive)
                    except trio.ClosedResourceError as exc:
                        results.append(exc)

            async with trio.open_nursery() as lending:
                lending.start_soon(lend)
                await trio.testing.wait_all_tasks_blocked()
                await inlet.aclose()
            nursery.cancel_scope.cancel()
    assert [type(exc) for exc in results] == [trio.ClosedResourceError]
