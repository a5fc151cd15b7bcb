"""``Outlet.send_now``: sending at once from another thread, in order with ``send``."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

import transports
from transports import Delivery

from .test_conformance import payload, receive_all

#: The backends whose outlets send at once from any thread.
AT_ONCE = ("tcp", "unix")


def send_from_thread(outlet: transports.Outlet, messages: list[list[bytes]]) -> int:
    """Send *messages* from this thread (not Trio's): at once when the outlet
    can, else through the event loop; how many went at once."""
    at_once = 0
    for message in messages:
        if outlet.send_now(message):
            at_once += 1
        else:
            trio.from_thread.run(outlet.send, message)
    return at_once


@pytest.mark.parametrize("capacity", [1, 2, 8])
async def test_messages_sent_at_once_from_a_thread_arrive_in_order_with_the_rest(
    backend, address, capacity
):
    sizes = [10, 1000, 65536, 65537, 200_000, 3, 1024] * 30
    messages = [[b"%d" % i, payload(i, size)] for i, size in enumerate(sizes)]
    with trio.fail_after(60):
        async with (
            await transports.bind(address) as outlet,
            await transports.connect(outlet.address, capacity=capacity) as inlet,
            await transports.connect(outlet.address, capacity=capacity, max_bytes=100_000) as other,
        ):
            await outlet.wait_for_inlets(2)
            async with trio.open_nursery() as nursery:
                results: dict[str, list] = {}

                async def take(name: str, inlet: transports.Inlet) -> None:
                    results[name] = await receive_all(inlet)

                nursery.start_soon(take, "inlet", inlet)
                nursery.start_soon(take, "other", other)
                at_once = await trio.to_thread.run_sync(send_from_thread, outlet, messages)
                await outlet.aclose()
    assert results == {"inlet": messages, "other": messages}
    assert outlet.stats.messages_sent == len(messages)
    assert [link.messages_sent for link in outlet.stats.links] == [len(messages)] * 2
    if backend in AT_ONCE:  # (the small ones, while the links keep up)
        assert 0 < at_once < len(messages)
    else:
        assert at_once == 0


async def test_what_the_connection_does_not_take_at_once_is_written_next(net_address):
    # The inlet's event loop (in a thread of its own) is held up: messages
    # sent at once fill the socket's buffers, one is written in part, and
    # the link's task writes the rest, then the messages sent after it.
    messages = [[payload(i, 60_000)] for i in range(400)]
    connected, go = threading.Event(), threading.Event()
    received: list[list[bytes]] = []

    def hold_up_the_inlet(address: str) -> None:
        async def main() -> None:
            inlet = await transports.connect(address, capacity=len(messages))
            connected.set()
            go.wait(30)  # (blocks this thread's event loop: nothing is read)
            received.extend(await receive_all(inlet))
            await inlet.aclose()

        trio.run(main)

    with trio.fail_after(60):
        async with await transports.bind(net_address) as outlet:
            reader = threading.Thread(target=hold_up_the_inlet, args=(outlet.address,))
            reader.start()
            try:
                await trio.to_thread.run_sync(connected.wait, 10)
                await outlet.wait_for_inlets(1)
                at_once = await trio.to_thread.run_sync(send_from_thread, outlet, messages)
            finally:
                go.set()
            await outlet.aclose()  # (returns once the inlet took in the end of stream)
            await trio.to_thread.run_sync(reader.join)
    assert received == messages
    if not net_address.startswith("nng"):
        assert 0 < at_once < len(messages)


async def test_send_now_sends_nothing_when_it_would_wait(backend, address):
    with trio.fail_after(10):
        async with await transports.bind(address) as outlet:
            assert not outlet.send_now(b"no inlet")
            inlet = await transports.connect(outlet.address, capacity=1)
            await outlet.wait_for_inlets(1)
            assert not outlet.send_now(b"x" * 65537)  # larger than 64 KiB
            await outlet.send(b"1")
            await trio.testing.wait_all_tasks_blocked()
            assert not outlet.send_now(b"full")  # one in flight: the link is full
            assert bytes((await inlet.receive())[0]) == b"1"
            await trio.testing.wait_all_tasks_blocked()  # (the credit comes back)
            assert outlet.send_now(b"2") == (backend in AT_ONCE)
            if backend not in AT_ONCE:
                await outlet.send(b"2")
            assert bytes((await inlet.receive())[0]) == b"2"
            assert outlet.stats.messages_sent == 2
            await outlet.aclose()
            assert not outlet.send_now(b"closed")
            with pytest.raises(trio.EndOfChannel):
                await inlet.receive()
            await inlet.aclose()


async def test_send_now_leaves_a_link_half_full_to_the_batches_of_its_task(backend, address):
    with trio.fail_after(10):
        async with await transports.bind(address) as outlet:
            inlet = await transports.connect(outlet.address, capacity=4)
            await outlet.wait_for_inlets(1)
            await outlet.send(b"1")
            await trio.testing.wait_all_tasks_blocked()
            assert outlet.send_now(b"2") == (backend in AT_ONCE)  # one in flight of four
            if backend not in AT_ONCE:
                await outlet.send(b"2")
            await trio.testing.wait_all_tasks_blocked()
            # Room for two more, but half its capacity in flight: a link under
            # pressure is left to the batches its task writes.
            assert not outlet.send_now(b"3")
            await outlet.send(b"3")
            await outlet.aclose()
            assert [bytes(frames[0]) async for frames in inlet] == [b"1", b"2", b"3"]
            await inlet.aclose()


async def test_send_now_refuses_what_send_refuses(address):
    async with await transports.bind(address, max_frame_size=100) as outlet:
        with pytest.raises(TypeError, match="bytes-like"):
            outlet.send_now(["text"])
        with pytest.raises(ValueError, match="max_frame_size"):
            outlet.send_now(b"x" * 101)
        with pytest.raises(ValueError, match="at least one frame"):
            outlet.send_now([])


async def test_latest_links_take_a_message_at_once_only_when_it_can_go(address):
    with trio.fail_after(10):
        async with await transports.bind(address) as outlet:
            inlet = await transports.connect(outlet.address, delivery=Delivery.LATEST, capacity=1)
            await outlet.wait_for_inlets(1)
            await outlet.send(b"1")  # in flight until the inlet credits it
            await outlet.send(b"2")  # waits on the link; dropped by the next
            sent = outlet.send_now(b"3")
            assert not sent  # (behind one waiting: it would skip it)
            await outlet.send(b"3")
            await outlet.aclose()
            received = [bytes(frames[0]) async for frames in inlet]
            await inlet.aclose()
    assert received[-1] == b"3"
    assert inlet.stats.messages_dropped == 3 - len(received)


def test_send_now_and_credit_from_two_threads_keep_the_links_bound():
    # The link's counts change in both threads (a message taken at once,
    # credit coming back): a count lost would overflow the inlet (which
    # breaks the link) or leave the outlet waiting forever.
    messages = [[b"%d" % i] for i in range(3000)]

    async def main() -> list[list[bytes]]:
        with trio.fail_after(60):
            async with await transports.bind("tcp://127.0.0.1:0") as outlet:
                inlet = await transports.connect(outlet.address, capacity=2)
                await outlet.wait_for_inlets(1)
                async with trio.open_nursery() as nursery:
                    got: list[list[bytes]] = []

                    async def take() -> None:
                        got.extend(await receive_all(inlet))

                    nursery.start_soon(take)
                    await trio.to_thread.run_sync(send_from_thread, outlet, messages)
                    await outlet.aclose()
                await inlet.aclose()
                return got

    assert trio.run(main) == messages


@pytest.mark.parametrize("how", ["is cut", "leaves", "closes"])
async def test_links_that_end_while_a_thread_sends_at_once_leave_the_others_whole(net_address, how):
    # The thread's writes and the links' ends meet under the outlet's lock: a
    # message goes to every link there is, and an ended link is written no
    # more (its socket is closed, and its number may be another file's).
    messages = [[b"%d" % i] for i in range(2000)]
    with trio.fail_after(60):
        async with await transports.bind(net_address) as outlet:
            kept = await transports.connect(outlet.address, capacity=8)
            doomed = await transports.connect(outlet.address, capacity=8, label="doomed")
            await outlet.wait_for_inlets(2)
            async with trio.open_nursery() as nursery:
                got: list[list[bytes]] = []

                async def take() -> None:
                    got.extend(await receive_all(kept))

                async def end_the_doomed_one() -> None:
                    for _ in range(300):
                        await doomed.receive()
                    if how == "is cut":
                        assert outlet.cut("doomed") == 1
                    elif how == "leaves":
                        await doomed.aclose()
                    else:
                        await outlet.aclose()

                nursery.start_soon(take)
                nursery.start_soon(end_the_doomed_one)
                sent = 0
                try:
                    for message in messages:
                        await trio.to_thread.run_sync(send_from_thread, outlet, [message])
                        sent += 1
                except trio.ClosedResourceError:
                    assert how == "closes"
                await outlet.aclose()
            await doomed.aclose()
            await kept.aclose()
    assert got == messages[:sent]
    assert sent == len(messages) or how == "closes"
