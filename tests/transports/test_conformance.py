"""The rules every backend follows, pinned once and run on each of them."""

from __future__ import annotations

import collections
import errno
import logging
import math
import os
import re
import socket
from functools import partial

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import transports
import transports._link
from transports import Delivery
from transports._framing import MAX_CAPACITY, MAX_KEY, MAX_LINK_BYTES


async def receive_all(inlet: transports.Inlet) -> list[list[bytes]]:
    """Every message until the end of stream, frames as bytes."""
    return [[bytes(frame) for frame in frames] async for frames in inlet]


async def send_all_then_close(outlet: transports.Outlet, messages: list[list[bytes]]) -> None:
    for message in messages:
        await outlet.send(message)
    await outlet.aclose()


def payload(index: int, size: int) -> bytes:
    """A frame whose content tells which message it belongs to."""
    stamp = index.to_bytes(4, "little")
    return (stamp * (size // 4 + 1))[:size]


async def test_lossless_in_order_with_mixed_sizes(address):
    sizes = [0, 1, 1000, 65536, 65537, 1 << 20, 6_200_000, 64 << 20, 3]
    messages = [[b"h%d" % i, payload(i, size)] for i, size in enumerate(sizes)]
    messages.append([b"many frames"] + [payload(i, i * 100) for i in range(50)])
    messages.append([b"many 64 KiB frames"] + [payload(i, 65536) for i in range(20)])
    with trio.fail_after(60):
        async with (
            await transports.bind(address) as outlet,
            await transports.connect(outlet.address, capacity=2) as inlet,
        ):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all_then_close, outlet, messages)
                received = await receive_all(inlet)
    assert received == messages
    assert inlet.stats.messages_received == len(messages)
    assert inlet.stats.bytes_received == sum(len(f) for m in messages for f in m)
    assert inlet.stats.messages_dropped == 0


async def test_one_bytes_object_and_numpy_arrays_are_messages(address):
    np = pytest.importorskip("numpy")
    image = np.arange(2 * 3 * 4, dtype=np.uint16).reshape(2, 3, 4)
    with trio.fail_after(10):
        async with await transports.bind(address) as outlet:
            inlet = await transports.connect(outlet.address)
            await outlet.send(b"just bytes")
            await outlet.send([b"header", image])
            assert await inlet.receive() == [b"just bytes"]
            header, data = await inlet.receive()
            assert bytes(header) == b"header"
            restored = np.frombuffer(data, dtype=np.uint16).reshape(2, 3, 4)
            assert (restored == image).all()
            await inlet.aclose()


async def test_any_sequence_of_frames_is_a_message(address):
    with trio.fail_after(10):
        async with await transports.bind(address) as outlet:
            inlet = await transports.connect(outlet.address)
            await outlet.wait_for_inlets(1)
            await outlet.send(collections.deque([b"header", bytearray(b"body")]))
            assert await inlet.receive() == [b"header", b"body"]
            await inlet.aclose()


async def test_a_frame_that_views_part_of_a_buffer_sends_only_that_part(address):
    whole = payload(1, 300_000)
    parts = [memoryview(whole)[1000:201_000], memoryview(whole)[:10]]
    with trio.fail_after(10):
        async with await transports.bind(address) as outlet:
            inlet = await transports.connect(outlet.address)
            await outlet.wait_for_inlets(1)
            await outlet.send(parts)
            assert await inlet.receive() == [whole[1000:201_000], whole[:10]]
            await inlet.aclose()


async def test_a_frame_of_any_format_and_shape_is_received_as_flat_bytes(address):
    grid = memoryview(bytes(range(24))).cast("H", shape=[3, 4])
    with trio.fail_after(10):
        async with await transports.bind(address) as outlet:
            inlet = await transports.connect(outlet.address)
            await outlet.wait_for_inlets(1)
            await outlet.send([grid])
            (frame,) = await inlet.receive()
            assert (frame.format, frame.ndim, len(frame)) == ("B", 1, 24)
            assert frame == bytes(range(24))
            await inlet.aclose()


async def test_fan_out_reaches_every_inlet(address):
    count = 40
    with trio.fail_after(20):
        async with await transports.bind(address) as outlet:
            inlets = [await transports.connect(outlet.address, capacity=3) for _ in range(3)]
            await outlet.wait_for_inlets(3)
            results: dict[int, list[list[bytes]]] = {}
            async with trio.open_nursery() as nursery:
                for index, inlet in enumerate(inlets):

                    async def consume(index=index, inlet=inlet):
                        results[index] = await receive_all(inlet)

                    nursery.start_soon(consume)
                for i in range(count):
                    await outlet.send([b"%d" % i, payload(i, 5000)])
                await outlet.aclose()
    expected = [[b"%d" % i, payload(i, 5000)] for i in range(count)]
    assert results == {0: expected, 1: expected, 2: expected}
    stats = outlet.stats
    assert stats.messages_sent == count
    assert stats.bytes_sent == sum(len(f) for m in expected for f in m)
    assert [link.messages_sent for link in stats.links] == [count] * 3
    assert [link.capacity for link in stats.links] == [3] * 3


async def test_frames_the_application_holds_stay_intact(address):
    # Large frames arrive in buffers that a reader may use again: never while
    # the application still holds any view of them.
    count, size = 24, 200_000
    with trio.fail_after(30):
        async with await transports.bind(address) as outlet:
            inlet = await transports.connect(outlet.address, capacity=2)
            held = []
            async with trio.open_nursery() as nursery:

                async def produce():
                    for i in range(count):
                        await outlet.send([b"%d" % i, payload(i, size)])
                    await outlet.aclose()

                nursery.start_soon(produce)
                async for _, frame in inlet:
                    # Keep every other frame whole, and of the rest only a slice.
                    held.append(frame if len(held) % 2 == 0 else frame[size - 100 :])
                    del frame
    for i, frame in enumerate(held):
        whole = payload(i, size)
        assert bytes(frame) == (whole if i % 2 == 0 else whole[size - 100 :]), i


async def test_latest_keeps_the_newest_and_counts_the_rest(address):
    capacity, count = 3, 200
    with trio.fail_after(20):
        async with await transports.bind(address) as outlet:
            latest = await transports.connect(
                outlet.address, delivery=Delivery.LATEST, capacity=capacity
            )
            # A LATEST link never makes send wait, even while nobody reads.
            for i in range(count):
                await outlet.send(b"%d" % i)
            await outlet.aclose()
            received = [int(bytes(frames[0])) async for frames in latest]
    assert received == list(range(count - capacity, count))
    assert latest.stats.messages_received == capacity
    assert latest.stats.messages_dropped == count - capacity
    (link,) = outlet.stats.links
    assert link.delivery is Delivery.LATEST
    assert link.messages_sent == count
    assert link.messages_dropped == count - capacity
    assert outlet.stats.messages_dropped == count - capacity


async def test_latest_drops_after_the_last_credit_are_counted_at_both_ends(address):
    # Capacity 4: credit goes back 2 at a time, so the inlet's drop of the 5th
    # message reaches the outlet only at the end of stream (over a network:
    # with the inlet's acknowledgement of it).
    with trio.fail_after(10):
        async with await transports.bind(address) as outlet:
            latest = await transports.connect(outlet.address, delivery=Delivery.LATEST, capacity=4)
            await outlet.wait_for_inlets(1)
            for i in range(5):
                await outlet.send(b"%d" % i)
            await outlet.aclose()
            assert await receive_all(latest) == [[b"1"], [b"2"], [b"3"], [b"4"]]
            await latest.aclose()
    assert latest.stats.messages_dropped == 1
    assert outlet.stats.links[0].messages_dropped == 1
    assert outlet.stats.messages_dropped == 1


async def test_latest_bound_in_bytes_keeps_the_newest_while_nobody_reads(address):
    # Messages larger than the bound: the outlet sends one at a time, and the
    # inlet must credit each as it comes (not wait for the application).
    capacity, count = 8, 100
    with trio.fail_after(20):
        async with await transports.bind(address) as outlet:
            latest = await transports.connect(
                outlet.address, delivery=Delivery.LATEST, capacity=capacity, max_bytes=1000
            )
            await outlet.wait_for_inlets(1)
            for i in range(count):
                await outlet.send([b"%d" % i, bytes(2000)])
            await trio.testing.wait_all_tasks_blocked(0.05)  # (all that may move has)
            first = int(bytes((await latest.receive())[0]))
            second = int(bytes((await latest.receive())[0]))
            await latest.aclose()
    assert count - capacity <= first < second


async def test_latest_link_does_not_slow_a_reliable_one(address):
    with trio.fail_after(20):
        async with await transports.bind(address) as outlet:
            reliable = await transports.connect(outlet.address, capacity=2)
            stalled = await transports.connect(outlet.address, delivery=Delivery.LATEST, capacity=1)
            async with trio.open_nursery() as nursery:
                got: list[list[bytes]] = []

                async def consume():
                    got.extend(await receive_all(reliable))

                nursery.start_soon(consume)
                for i in range(100):
                    await outlet.send(b"%d" % i)
                await outlet.aclose()
            assert [int(m[0]) for m in got] == list(range(100))
            assert [bytes(f) for f in await stalled.receive()] == [b"99"]
            with pytest.raises(trio.EndOfChannel):
                await stalled.receive()


@pytest.mark.parametrize("takes", ["slowly", "quickly"])
async def test_reliable_link_applies_backpressure(address, takes, monkeypatch):
    # An application that takes messages slowly has each credited at once
    # while the outlet waits; one that takes them quickly, in batches.
    monkeypatch.setattr(transports._link, "SLOW_TAKES", 0.0 if takes == "slowly" else math.inf)
    batch = 1 if takes == "slowly" else 2
    capacity = 4
    sent = 0
    with trio.fail_after(20):
        async with await transports.bind(address) as outlet:
            inlet = await transports.connect(outlet.address, capacity=capacity)
            async with trio.open_nursery() as nursery:

                async def produce():
                    nonlocal sent
                    for i in range(100):
                        await outlet.send(b"%d" % i)
                        sent += 1

                nursery.start_soon(produce)
                await trio.testing.wait_all_tasks_blocked(0.05)
                assert sent == capacity  # the link is full: send waits
                # Room made by receiving reaches the outlet *batch* messages at a time.
                for received in range(1, 7):
                    assert await inlet.receive() == [b"%d" % (received - 1)]
                    await trio.testing.wait_all_tasks_blocked(0.05)
                    assert sent == capacity + received // batch * batch
                nursery.cancel_scope.cancel()
            await inlet.aclose()


async def test_close_delivers_everything_then_end_of_channel(address):
    capacity = 5
    with trio.fail_after(20):
        outlet = await transports.bind(address)
        inlet = await transports.connect(outlet.address, capacity=capacity)
        for i in range(capacity):
            await outlet.send([b"%d" % i, payload(i, 100_000)])
        # The inlet has read nothing yet; close returns once its endpoint took everything in.
        await outlet.aclose()
        for i in range(capacity):
            assert [bytes(f) for f in await inlet.receive()] == [b"%d" % i, payload(i, 100_000)]
        for _ in range(2):
            with pytest.raises(trio.EndOfChannel):
                await inlet.receive()
        await inlet.aclose()
    assert outlet.stats.links[0].messages_sent == capacity


async def test_an_inlet_that_received_then_stopped_still_takes_in_the_end_of_stream(address):
    # Its last receive waited, and so read the connection itself (see _NetInlet):
    # its own task must go on reading once that receive has returned.
    with trio.fail_after(10):
        outlet = await transports.bind(address, close_timeout=60)
        inlet = await transports.connect(outlet.address)
        await outlet.wait_for_inlets(1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outlet.send, b"only")
            assert await inlet.receive() == [b"only"]
        await outlet.aclose()  # returns once the inlet has acknowledged the end
        with pytest.raises(trio.EndOfChannel):
            await inlet.receive()
        await inlet.aclose()


async def test_closed_endpoints_raise_closed_resource_error(address):
    with trio.fail_after(10):
        outlet = await transports.bind(address)
        inlet = await transports.connect(outlet.address, capacity=1)
        await outlet.send(b"fills the link")
        async with trio.open_nursery() as nursery:

            async def blocked_send():
                with pytest.raises(trio.ClosedResourceError):
                    await outlet.send(b"waits for room")

            async def blocked_receive(other):
                with pytest.raises(trio.ClosedResourceError):
                    await other.receive()

            other = await transports.connect(outlet.address)
            nursery.start_soon(blocked_send)
            nursery.start_soon(blocked_receive, other)
            await trio.testing.wait_all_tasks_blocked(0.05)
            await other.aclose()  # wakes blocked_receive
            await outlet.aclose()  # wakes blocked_send
        with pytest.raises(trio.ClosedResourceError):
            await outlet.send(b"after close")
        with pytest.raises(trio.ClosedResourceError):
            await outlet.wait_for_inlets(1)
        await outlet.aclose()  # closing twice is fine
        await inlet.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await inlet.receive()
        await inlet.aclose()


@pytest.mark.parametrize("how", ["leaves", "is cut"])
async def test_an_inlet_that_leaves_or_is_cut_frees_the_outlet(address, how, caplog):
    with trio.fail_after(10):
        async with await transports.bind(address) as outlet:
            gone = await transports.connect(outlet.address, capacity=1, label="sink")
            staying = await transports.connect(outlet.address, capacity=100, label="logger")
            await outlet.wait_for_inlets(2)
            await outlet.send(b"0")  # fills `gone`'s link
            async with trio.open_nursery() as nursery:
                nursery.start_soon(outlet.send, b"1")  # waits for `gone`
                await trio.testing.wait_all_tasks_blocked(0.05)
                if how == "leaves":
                    await gone.aclose()
                else:  # connected, reading nothing (its process frozen): only cut() frees it
                    assert outlet.cut("nobody") == 0
                    await trio.testing.wait_all_tasks_blocked(0.05)
                    assert nursery.child_tasks  # still waiting
                    assert outlet.cut("sink") == 1
            await outlet.send(b"2")
            await outlet.aclose()  # (nor does the end of stream wait for it)
            assert await receive_all(staying) == [[b"0"], [b"1"], [b"2"]]
        assert sorted(link.label for link in outlet.stats.links) == ["logger", "sink"]
        if how == "is cut":
            assert outlet.cut("sink") == 0
            # What had arrived is received; then the link is broken, not ended.
            assert await gone.receive() == [b"0"]
            with pytest.raises(trio.BrokenResourceError):
                await gone.receive()
            await gone.aclose()
        else:  # leaving is no news
            assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_cutting_the_empty_label_cuts_only_the_inlets_without_one(address):
    with trio.fail_after(10):
        async with await transports.bind(address) as outlet:
            unnamed = await transports.connect(outlet.address)
            named = await transports.connect(outlet.address, label="logger")
            await outlet.wait_for_inlets(2)
            assert outlet.cut("") == 1
            await outlet.send(b"after the cut")
            assert await named.receive() == [b"after the cut"]
            with pytest.raises(trio.BrokenResourceError):
                await unnamed.receive()
            await unnamed.aclose()
            await named.aclose()


async def test_an_outlet_with_a_key_lets_in_only_inlets_that_present_it(address, caplog):
    with trio.fail_after(10):
        async with await transports.bind(address, key=b"k" * 16) as outlet:
            for key in (None, b"wrong"):  # a stranger, or a mistake
                with pytest.raises(trio.BrokenResourceError):
                    await transports.connect(outlet.address, label="stranger", key=key)
            inlet = await transports.connect(outlet.address, label="sink", key=b"k" * 16)
            await outlet.wait_for_inlets(1)
            await outlet.send(b"for the sink only")
            assert await inlet.receive() == [b"for the sink only"]
            assert [link.label for link in outlet.stats.links] == ["sink"]
            await inlet.aclose()
        for key in (b"", b"k" * 65, "text"):
            with pytest.raises(ValueError, match="key must be None or 1 to 64 bytes"):
                await transports.bind(address, key=key)
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    if not address.startswith("memory"):  # (in memory, the connect itself says so)
        assert [m.rsplit(": ", 1)[1] for m in refused] == ["no key", "a wrong key"]


async def test_a_key_may_be_as_long_as_64_bytes_and_connect_checks_it_too(address):
    with trio.fail_after(10):
        async with await transports.bind(address, key=b"k" * MAX_KEY) as outlet:
            for key in (b"", b"k" * (MAX_KEY + 1), "k" * MAX_KEY):
                with pytest.raises(ValueError, match="key must be None or 1 to 64 bytes"):
                    await transports.connect(outlet.address, key=key)
            inlet = await transports.connect(outlet.address, key=b"k" * MAX_KEY)
            await outlet.wait_for_inlets(1)
            await outlet.send(b"let in")
            assert await inlet.receive() == [b"let in"]
            await inlet.aclose()


async def test_both_ends_of_a_link_name_its_inlets_label(address):
    with trio.fail_after(10):
        async with await transports.bind(address) as outlet:
            async with await transports.connect(outlet.address, label="sink") as inlet:
                await outlet.wait_for_inlets(1)
                assert [link.label for link in outlet.stats.links] == ["sink"]
                assert [link.label for link in inlet.stats.links] == ["sink"]


async def test_a_bad_label_is_refused(address):
    with trio.fail_after(10):
        async with await transports.bind(address) as outlet:
            for label, problem in [
                (b"sink", "must be a str"),
                ("x" * 1025, "over 1024"),
                ("\ud800", "UTF-8"),
            ]:
                with pytest.raises(ValueError, match=problem):
                    await transports.connect(outlet.address, label=label)
            inlet = await transports.connect(outlet.address, label="é" * 512)  # 1024 bytes
            await outlet.wait_for_inlets(1)
            assert outlet.stats.links[0].label == "é" * 512
            await inlet.aclose()


async def test_wait_for_inlets_and_late_inlets(address):
    with trio.fail_after(10):
        async with await transports.bind(address) as outlet:
            await outlet.send(b"before anyone listens")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(outlet.wait_for_inlets, 2)
                first = await transports.connect(outlet.address)
                await trio.testing.wait_all_tasks_blocked(0.05)
                assert nursery.child_tasks  # still waiting for the second
                second = await transports.connect(outlet.address)
            await outlet.send(b"after")
            await outlet.aclose()
            assert await receive_all(first) == [[b"after"]]
            assert await receive_all(second) == [[b"after"]]
        assert outlet.stats.messages_sent == 2


async def test_waiting_for_inlets_ends_when_the_outlet_closes(address):
    with trio.fail_after(10):
        outlet = await transports.bind(address)
        async with trio.open_nursery() as nursery:

            async def wait_for_one():
                with pytest.raises(trio.ClosedResourceError):
                    await outlet.wait_for_inlets(1)

            nursery.start_soon(wait_for_one)
            await trio.testing.wait_all_tasks_blocked()
            await outlet.aclose()


async def test_wait_for_inlets_counts_those_that_came_and_went(address):
    with trio.fail_after(10):
        async with await transports.bind(address) as outlet:
            first = await transports.connect(outlet.address)
            await outlet.wait_for_inlets(1)
            await first.aclose()
            await trio.testing.wait_all_tasks_blocked(0.05)  # (the outlet saw it go)
            async with await transports.connect(outlet.address):
                await outlet.wait_for_inlets(2)  # (the first has gone: it counts)


async def test_cancelled_receive_leaves_the_inlet_usable(address):
    with trio.fail_after(10):
        async with await transports.bind(address) as outlet:
            inlet = await transports.connect(outlet.address)
            with trio.move_on_after(0.05) as scope:
                await inlet.receive()
            assert scope.cancelled_caught
            await outlet.send(b"still here")
            assert await inlet.receive() == [b"still here"]
            await inlet.aclose()


async def test_receives_cancelled_midway_through_large_messages_lose_nothing(net_address):
    # Each receive is cut short, at whatever point it has reached: often
    # midway through a message's large frame, which the next receive goes on with.
    sent = [[b"%d" % i, payload(i, 3_000_000)] for i in range(4)]
    received = []
    attempts = 0
    with trio.fail_after(30):
        async with await transports.bind(net_address) as outlet:
            inlet = await transports.connect(outlet.address, capacity=2)
            async with trio.open_nursery() as nursery:

                async def send():
                    for message in sent:
                        await outlet.send(message)

                nursery.start_soon(send)
                while len(received) < len(sent):
                    attempts += 1
                    with trio.move_on_after(0.0002):
                        received.append([bytes(f) for f in await inlet.receive()])
            await inlet.aclose()
    assert received == sent
    assert attempts > len(sent)  # some receives were indeed cut short


async def test_concurrent_receivers_share_the_messages(address):
    # Each message goes to exactly one of them, in order for each.
    count = 300
    got: dict[str, list[int]] = {"a": [], "b": []}
    with trio.fail_after(20):
        outlet = await transports.bind(address)
        inlet = await transports.connect(outlet.address)
        async with trio.open_nursery() as nursery:

            async def receiver(name):
                async for frames in inlet:
                    got[name].append(int(bytes(frames[0])))
                    if len(got[name]) % 7 == 0:
                        await trio.lowlevel.checkpoint()  # let the other one take a turn

            nursery.start_soon(receiver, "a")
            nursery.start_soon(receiver, "b")
            for i in range(count):
                await outlet.send(b"%d" % i)
            await outlet.aclose()
        await inlet.aclose()
    assert sorted(got["a"] + got["b"]) == list(range(count))
    assert got["a"] == sorted(got["a"]) and got["b"] == sorted(got["b"])
    assert got["a"] and got["b"]


async def test_bad_arguments_are_rejected(address):
    with trio.fail_after(10):
        async with await transports.bind(address) as outlet:
            for capacity in (0, -1, 1.5, True):
                with pytest.raises(ValueError, match="capacity"):
                    await transports.connect(outlet.address, capacity=capacity)
            for max_bytes in (0, -1, 1.5, True, 2**64):
                with pytest.raises(ValueError, match="max_bytes"):
                    await transports.connect(outlet.address, max_bytes=max_bytes)
            with pytest.raises(ValueError, match="delivery"):
                await transports.connect(outlet.address, delivery="latest")
            with pytest.raises(ValueError, match="at least one frame"):
                await outlet.send([])
            with pytest.raises(ValueError, match="4097 frames: at most 4096"):
                await outlet.send([b"x"] * 4097)  # (the inlets would break the link)
            with pytest.raises(TypeError, match="bytes-like"):
                await outlet.send(["text"])
            np = pytest.importorskip("numpy")
            with pytest.raises(ValueError, match="C-contiguous"):
                await outlet.send(np.zeros((4, 4))[:, 1])


async def test_the_largest_capacity_and_max_bytes_are_accepted(address):
    with trio.fail_after(10):
        async with await transports.bind(address) as outlet:
            inlet = await transports.connect(
                outlet.address, capacity=MAX_CAPACITY, max_bytes=MAX_LINK_BYTES
            )
            await outlet.wait_for_inlets(1)
            await outlet.send(b"fits")
            assert await inlet.receive() == [b"fits"]
            (link,) = outlet.stats.links
            assert (link.capacity, link.max_bytes) == (MAX_CAPACITY, MAX_LINK_BYTES)
            await inlet.aclose()
            with pytest.raises(ValueError, match="capacity"):
                await transports.connect(outlet.address, capacity=MAX_CAPACITY + 1)


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("zmq://127.0.0.1:5", "the scheme must be one of memory://, tcp://"),
        ("127.0.0.1:5", "an address looks like 'tcp://127.0.0.1:5555'"),
        ("tcp://127.0.0.1", "expected tcp://HOST:PORT"),
        ("tcp://127.0.0.1:\u0663", "expected tcp://HOST:PORT"),  # (an Arabic-Indic 3)
        ("unix://relative/path", "the path must be absolute"),
    ],
)
async def test_a_bad_address_says_what_is_wrong(address, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        await transports.bind(address)


@pytest.mark.parametrize("scheme", ["unix", "nng+ipc"])
async def test_a_path_with_a_nul_byte_is_refused_not_bound_cut_short(scheme, short_dir):
    # (The socket layer would take the path up to the NUL.)
    with pytest.raises(ValueError, match="the path must be absolute"):
        await transports.bind(f"{scheme}://{short_dir}/outlet\0.sock")
    assert os.listdir(short_dir) == []


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
@pytest.mark.parametrize("scheme", ["tcp", "nng+tcp"])
async def test_an_ipv6_address_is_bound_named_and_reached_in_brackets(scheme):
    with trio.fail_after(10):
        async with await transports.bind(f"{scheme}://[::1]:0") as outlet:
            assert re.fullmatch(rf"{re.escape(scheme)}://\[::1\]:\d+", outlet.address)
            inlet = await transports.connect(outlet.address)
            await outlet.wait_for_inlets(1)
            await outlet.send(b"over IPv6")
            assert await inlet.receive() == [b"over IPv6"]
            if scheme == "tcp":  # (an nng link is named after the socket opened for it)
                assert outlet.stats.links[0].peer.startswith("[::1]:")
            await inlet.aclose()


async def test_frame_over_the_outlets_maximum_is_refused(address):
    with trio.fail_after(10):
        async with await transports.bind(address, max_frame_size=1000) as outlet:
            with pytest.raises(ValueError, match="max_frame_size"):
                await outlet.send([b"ok", bytes(1001)])
            assert outlet.stats.messages_sent == 0


async def test_a_message_at_the_limits_is_sent_whole(address):
    # A frame of max_frame_size bytes, and MAX_FRAMES frames, are within the limits.
    frames = [bytes(1000)] + [b"%d" % i for i in range(transports.MAX_FRAMES - 1)]
    with trio.fail_after(10):
        async with await transports.bind(address, max_frame_size=1000) as outlet:
            inlet = await transports.connect(outlet.address)
            await outlet.wait_for_inlets(1)
            await outlet.send(frames)
            assert [bytes(frame) for frame in await inlet.receive()] == frames
            await inlet.aclose()


async def test_frame_over_an_inlets_maximum_breaks_only_that_link(address, caplog):
    with trio.fail_after(20):
        async with await transports.bind(address) as outlet:
            small = await transports.connect(outlet.address, max_frame_size=100_000)
            large = await transports.connect(outlet.address)
            await outlet.send(b"fits")
            await outlet.send(bytes(100_001))
            await outlet.send(b"after")
            assert await small.receive() == [b"fits"]
            if address.startswith("memory"):
                pytest.skip("one process: the outlet's limit is the only one")
            with pytest.raises(trio.BrokenResourceError):
                await small.receive()
            await outlet.aclose()
            assert [len(m[0]) for m in await receive_all(large)] == [4, 100_001, 5]
            await small.aclose()


async def test_an_inlets_max_frame_size_bounds_each_frame_not_the_message(address):
    frames = [payload(i, 50_000) for i in range(20)]  # 1 MB in frames of 50 KB
    with trio.fail_after(10):
        async with await transports.bind(address) as outlet:
            inlet = await transports.connect(outlet.address, max_frame_size=100_000)
            await outlet.wait_for_inlets(1)
            await outlet.send(frames)
            assert [bytes(frame) for frame in await inlet.receive()] == frames
            await inlet.aclose()


async def test_connecting_to_nothing_raises_oserror(address):
    with trio.fail_after(10):
        outlet = await transports.bind(address)
        gone = outlet.address
        await outlet.aclose()
        with pytest.raises(OSError):
            await transports.connect(gone)


async def test_address_in_use_raises_oserror(address):
    with trio.fail_after(10):
        async with await transports.bind(address) as outlet:  # (port 0 made concrete)
            with pytest.raises(OSError) as in_use:
                await transports.bind(outlet.address)
    assert in_use.value.errno == errno.EADDRINUSE


async def test_an_address_can_be_bound_again_once_its_outlet_has_closed(address):
    with trio.fail_after(10):
        outlet = await transports.bind(address)
        inlet = await transports.connect(outlet.address)
        await outlet.wait_for_inlets(1)
        await outlet.send(b"before")
        await outlet.aclose()
        assert await receive_all(inlet) == [[b"before"]]
        await inlet.aclose()
        async with await transports.bind(outlet.address) as again:
            assert again.address == outlet.address
            inlet = await transports.connect(again.address)
            await again.send(b"after")
            assert await inlet.receive() == [b"after"]
            await inlet.aclose()


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(ValueError, match="'memory', 'tcp', 'nng'"):
        transports.get("zeromq")
    with pytest.raises(ValueError, match="unknown transport"):
        transports.get(["tcp"])
    for name in ("memory", "tcp", "nng"):
        assert transports.get(name).name == name


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "127.0.0.1:80",
        "tcp://",
        "tcp://host",
        "tcp://host:99999",
        "tcp://127.0.0.1:65536",
        "tcp://:80",
        "unix://relative",
        "smtp://x:1",
        None,
    ],
)
async def test_malformed_addresses_raise_value_error(bad):
    with pytest.raises(ValueError):
        await transports.bind(bad)
    with pytest.raises(ValueError):
        await transports.connect(bad)


async def test_logs_name_the_outlet(net_address, caplog):
    caplog.set_level(logging.DEBUG, logger="transports")
    with trio.fail_after(10):
        async with await transports.bind(net_address) as outlet:
            inlet = await transports.connect(outlet.address, delivery=Delivery.LATEST)
            await outlet.wait_for_inlets(1)
        await inlet.aclose()
    assert any(
        outlet.address in r.getMessage() and "latest" in r.getMessage() for r in caplog.records
    )


def all_tasks() -> set[trio.lowlevel.Task]:
    """Every task of this Trio run, system tasks included."""
    found, todo = set(), [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        found.add(task)
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return found


async def test_closing_leaves_nothing_running(address, caplog):
    before = all_tasks()
    with trio.fail_after(10):
        outlet = await transports.bind(address)
        inlets = [
            await transports.connect(outlet.address),
            await transports.connect(outlet.address, delivery=Delivery.LATEST),
        ]
        await outlet.send(b"x")
        assert len(all_tasks()) >= len(before)
        await outlet.aclose()
        for inlet in inlets:
            await inlet.aclose()
    assert all_tasks() == before
    if address.startswith("unix://"):
        assert not os.path.exists(address[len("unix://") :])
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_closing_under_cancellation_still_leaves_nothing_running(address):
    before = all_tasks()
    with trio.fail_after(10):
        outlet = await transports.bind(address)
        inlet = await transports.connect(outlet.address)
        await outlet.wait_for_inlets(1)
        for endpoint in (outlet, inlet):
            with trio.CancelScope() as scope:
                scope.cancel()
                await endpoint.aclose()
    assert all_tasks() == before
    if address.startswith("unix://"):
        assert not os.path.exists(address[len("unix://") :])


async def test_busy_send_and_receive_loops_let_other_tasks_run(address):
    """Neither loop yields on every call, but neither starves the other tasks."""
    ticks = 0

    async def tick_forever(task_status=trio.TASK_STATUS_IGNORED):
        nonlocal ticks
        task_status.started()
        while True:
            await trio.lowlevel.checkpoint()
            ticks += 1

    count = 64
    with trio.fail_after(10):
        async with await transports.bind(address) as outlet:
            inlet = await transports.connect(outlet.address, capacity=count)
            await outlet.wait_for_inlets(1)
            async with trio.open_nursery() as nursery:
                await nursery.start(tick_forever)
                ticks = 0
                for index in range(count):
                    await outlet.send(b"%d" % index)
                assert ticks >= 3
                ticks = 0
                received = [bytes((await inlet.receive())[0]) for _ in range(count)]
                assert ticks >= 3
                nursery.cancel_scope.cancel()
            await inlet.aclose()
    assert received == [b"%d" % index for index in range(count)]


async def test_receive_with_messages_waiting_and_send_with_room_are_still_cancel_points(address):
    with trio.fail_after(10):
        async with await transports.bind(address) as outlet:
            inlet = await transports.connect(outlet.address, capacity=4)
            await outlet.wait_for_inlets(1)
            for index in range(3):
                await outlet.send(b"%d" % index)
            assert bytes((await inlet.receive())[0]) == b"0"
            for step in (inlet.receive, partial(outlet.send, b"not sent")):  # (there is room)
                with trio.CancelScope() as scope:
                    scope.cancel()
                    await step()
                assert scope.cancelled_caught
            assert [bytes((await inlet.receive())[0]) for _ in range(2)] == [b"1", b"2"]
            assert outlet.stats.messages_sent == 3
            await inlet.aclose()


@pytest.mark.parametrize("max_bytes", [None, 1_500_000, 2_000_000])
async def test_max_bytes_bounds_the_bytes_buffered_on_a_link(address, max_bytes):
    big = payload(7, 1_000_000)
    with trio.fail_after(20):
        async with await transports.bind(address) as outlet:
            inlet = await transports.connect(outlet.address, capacity=8, max_bytes=max_bytes)
            await outlet.wait_for_inlets(1)
            await outlet.send(big)
            await outlet.send(big)  # 1 MB buffered: under the bound, so there is room
            third_sent = trio.Event()

            async def send_third():
                await outlet.send(big)
                third_sent.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_third)
                await trio.testing.wait_all_tasks_blocked()
                # 2 MB buffered: a bounded link is full until the inlet takes some
                # (also when that is its bound exactly).
                assert third_sent.is_set() == (max_bytes is None)
                received = [bytes((await inlet.receive())[0]) for _ in range(3)]
            assert received == [big] * 3
            assert inlet.stats.links[0].max_bytes == max_bytes
            await inlet.aclose()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=40),
    capacity=st.integers(1, 6),
    max_bytes=st.integers(1, 8000),
    pauses=st.lists(st.integers(0, 3), max_size=40),
)
def test_a_link_bounded_in_bytes_never_leaves_its_outlet_waiting(
    sizes, capacity, max_bytes, pauses
):
    # Credit goes back in batches, and at once only when the bytes owed
    # could hold the outlet up: whatever the sizes and the reader's pace,
    # everything arrives, in order.
    messages = [payload(i, size) for i, size in enumerate(sizes)]

    async def main() -> list[bytes]:
        with trio.fail_after(10):
            async with await transports.bind("memory://") as outlet:
                inlet = await transports.connect(
                    outlet.address, capacity=capacity, max_bytes=max_bytes
                )
                received: list[bytes] = []

                async def take() -> None:
                    for index in range(len(messages)):
                        for _ in range(pauses[index] if index < len(pauses) else 0):
                            await trio.lowlevel.checkpoint()
                        received.append(bytes((await inlet.receive())[0]))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(take)
                    for message in messages:
                        await outlet.send(message)
                await inlet.aclose()
                return received

    assert trio.run(main) == messages


async def test_wait_send_might_not_block_returns_once_a_full_link_has_room(address):
    with trio.fail_after(10):
        async with await transports.bind(address) as outlet:
            inlet = await transports.connect(outlet.address, capacity=2)
            await outlet.wait_for_inlets(1)
            await outlet.wait_send_might_not_block()  # empty: returns at once
            await outlet.send(b"1")
            await outlet.send(b"2")
            ready = trio.Event()

            async def wait_for_room():
                await outlet.wait_send_might_not_block()
                ready.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_for_room)
                await trio.testing.wait_all_tasks_blocked()
                assert not ready.is_set()  # full
                received = [bytes((await inlet.receive())[0]) for _ in range(2)]
                await ready.wait()
            assert received == [b"1", b"2"]
            assert outlet.stats.messages_sent == 2  # waiting sent nothing
            await inlet.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await outlet.wait_send_might_not_block()
