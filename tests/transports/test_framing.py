"""Properties of the byte-stream framing (the tcp backend's wire format)."""

from __future__ import annotations

import math
import select
import shutil
import tempfile
from collections.abc import Sequence
from functools import partial

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import transports
import transports._link
from transports._framing import (
    KIND_END,
    KIND_MESSAGE,
    MAX_FRAMES,
    SMALL_FRAME,
    WELCOME_SIZE,
    ProtocolError,
    StreamReader,
    encode_ack,
    encode_end,
    encode_hello,
    encode_messages,
    encode_welcome,
)
from transports._tcp import _advance

frames_strategy = st.lists(
    st.one_of(
        st.binary(max_size=64),
        st.integers(0, 3 * SMALL_FRAME).map(lambda n: bytes([n % 251]) * n),
    ),
    min_size=1,
    max_size=6,
)
messages_strategy = st.lists(frames_strategy, max_size=12)
fast = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def encode(messages: list[list[bytes]], first_seq: int = 0) -> bytes:
    batch = [
        (first_seq + i, [memoryview(f) for f in frames], sum(map(len, frames)))
        for i, frames in enumerate(messages)
    ]
    return b"".join(bytes(buffer) for buffer in encode_messages(batch))


def record_ends(messages: list[list[bytes]]) -> list[int]:
    """The byte offset where each encoded message ends."""
    ends, total = [], 0
    for i, frames in enumerate(messages):
        total += len(encode([frames], i))
        ends.append(total)
    return ends


async def read_stream(
    data: bytes, chunks: list[int], max_frame_size: int, cancels: Sequence[bool] = ()
) -> list:
    """Write *data* into a socket pair in pieces of *chunks* sizes; read records back.

    With *cancels*, once the reader waits after each piece, cancel its
    ``read_record`` if the next of *cancels* says so, and call it again.
    """
    left, right = trio.socket.socketpair()
    records = []
    error = None
    reading = trio.CancelScope()
    with left, right:

        async def write():
            position, sizes, cuts = 0, iter(chunks), iter(cancels)
            while position < len(data):
                size = max(1, next(sizes, len(data)))
                position += await left.send(data[position : position + size])
                if cancels:
                    await trio.testing.wait_all_tasks_blocked()
                    if next(cuts, False):
                        reading.cancel()
            left.shutdown(trio.socket.SHUT_WR)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            reader = StreamReader(right, max_frame_size, buffer_size=SMALL_FRAME * 2)
            try:
                while True:
                    with trio.CancelScope() as reading:
                        record = await reader.read_record()
                    if reading.cancelled_caught:
                        continue
                    if record is None:
                        break
                    records.append(record)
            except ProtocolError as exc:
                error = exc
    if error is not None:
        raise error
    return records


@fast
@given(messages=messages_strategy, chunks=st.lists(st.integers(1, 200_000), max_size=20))
def test_any_messages_round_trip_whatever_the_chunking(messages, chunks):
    data = encode(messages) + encode_end(len(messages))
    records = trio.run(read_stream, data, chunks, 1 << 20)
    assert [kind for kind, _, _ in records] == [KIND_MESSAGE] * len(messages) + [KIND_END]
    assert [fixed[0] for _, fixed, _ in records] == [*range(len(messages)), len(messages)]
    assert [[bytes(f) for f in frames] for _, _, frames in records[:-1]] == messages


@fast
@given(
    messages=messages_strategy,
    chunks=st.lists(st.integers(1, 100_000), max_size=30),
    cancels=st.lists(st.booleans(), max_size=30),
)
def test_a_read_cancelled_anywhere_loses_nothing(messages, chunks, cancels):
    # The inlet's application task reads the socket itself, and may be
    # cancelled midway through a record (even a large frame's): the next
    # read goes on with the same record.
    data = encode(messages) + encode_end(len(messages))
    records = trio.run(read_stream, data, chunks, 1 << 20, cancels)
    assert [kind for kind, _, _ in records] == [KIND_MESSAGE] * len(messages) + [KIND_END]
    assert [[bytes(f) for f in frames] for _, _, frames in records[:-1]] == messages


class _Interrupted(Exception):
    pass


async def read_stream_in_turns(
    data: bytes, chunks: list[int], turns: Sequence[bool], interrupts: Sequence[bool]
) -> list:
    """As :func:`read_stream`, each read by Trio or, where the next of
    *turns* says so, by a thread (``read_record_blocking``), whose waits
    for the socket are each interrupted where the next of *interrupts* says so."""
    left, right = trio.socket.socketpair()
    records = []
    who, cuts = iter(turns), iter(interrupts)

    def wait() -> None:  # (on the thread)
        if next(cuts, False):
            raise _Interrupted
        select.select([right.fileno()], [], [])

    with left, right:

        async def write():
            position, sizes = 0, iter(chunks)
            while position < len(data):
                size = max(1, next(sizes, len(data)))
                position += await left.send(data[position : position + size])
            left.shutdown(trio.socket.SHUT_WR)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            reader = StreamReader(right, 1 << 20, buffer_size=SMALL_FRAME * 2)
            while True:
                if next(who, False):
                    try:
                        record = await trio.to_thread.run_sync(reader.read_record_blocking, wait)
                    except _Interrupted:
                        continue
                else:
                    record = await reader.read_record()
                if record is None:
                    break
                records.append(record)
    return records


@fast
@given(
    messages=messages_strategy,
    chunks=st.lists(st.integers(1, 100_000), max_size=30),
    turns=st.lists(st.booleans(), max_size=30),
    interrupts=st.lists(st.booleans(), max_size=60),
)
def test_reads_by_a_thread_and_by_trio_in_turns_interrupted_anywhere_lose_nothing(
    messages, chunks, turns, interrupts
):
    # An inlet lent to a thread: the thread reads records, and stops where it
    # waits for the socket when the loan ends, maybe midway through a record
    # (a large frame's); the inlet's tasks then go on with the same record.
    data = encode(messages) + encode_end(len(messages))
    records = trio.run(read_stream_in_turns, data, chunks, turns, interrupts)
    assert [kind for kind, _, _ in records] == [KIND_MESSAGE] * len(messages) + [KIND_END]
    assert [[bytes(f) for f in frames] for _, _, frames in records[:-1]] == messages


def test_a_reader_buffer_must_hold_the_largest_message_header():
    left, right = trio.socket.socketpair()
    with left, right, pytest.raises(ValueError, match="header"):
        StreamReader(right, 1 << 20, buffer_size=1024)


async def test_a_message_of_small_frames_arriving_in_pieces_is_copied_once():
    # A batch of small chunks has hundreds of frames: once the message's size
    # is known it is read whole and copied once, not frame by frame.
    frames = [bytes([i % 251]) * 100 for i in range(300)]
    data = encode([frames])
    ((kind, _, received),) = await read_stream(data, [1000] * (len(data) // 1000 + 1), 1 << 20)
    assert kind == KIND_MESSAGE
    assert [bytes(frame) for frame in received] == frames
    assert len({id(frame.obj) for frame in received}) == 1


@fast
@given(messages=st.lists(frames_strategy, min_size=1, max_size=5), data=st.data())
def test_truncation_at_any_byte_is_an_error_never_a_message(messages, data):
    stream = encode(messages)
    cut = data.draw(st.integers(0, len(stream) - 1))
    ends = record_ends(messages)
    whole = sum(end <= cut for end in ends)
    if cut in ends or cut == 0:
        # Cut between records: a clean end of file after the whole ones.
        assert len(trio.run(read_stream, stream[:cut], [], 1 << 20)) == whole
    else:
        with pytest.raises(ProtocolError):
            trio.run(read_stream, stream[:cut], [], 1 << 20)


# --- the same rules seen from an inlet facing a fake outlet -------------------


async def inlet_facing(
    server_bytes: bytes | list[bytes],
    max_frame_size: int,
    *,
    pause_after: int | None = None,
    hang_up: bool = True,
) -> tuple[list, BaseException]:
    """Connect an inlet to a fake outlet that answers *server_bytes* and
    hangs up (or, without *hang_up*, keeps the connection open, reading nothing).

    *server_bytes* may come in parts, each sent once every task (the
    application's first) has waited after the one before. With
    *pause_after*, the application receives that many messages, then
    receives more only once the inlet has taken in what it could. Returns the
    messages received and the exception that ended the stream.
    """
    parts = [server_bytes] if isinstance(server_bytes, bytes) else server_bytes
    folder = tempfile.mkdtemp(prefix="trp", dir="/tmp")
    path = f"{folder}/fake.sock"
    try:
        with trio.fail_after(10):
            sock = trio.socket.socket(trio.socket.AF_UNIX)
            await sock.bind(path)
            sock.listen()
            listener = trio.SocketListener(sock)

            async def fake_outlet(task_status=trio.TASK_STATUS_IGNORED):
                async with listener:
                    task_status.started()
                    stream = await listener.accept()
                    async with stream:
                        await stream.receive_some(100)  # the inlet's hello
                        for i, part in enumerate(parts):
                            if i:
                                await trio.testing.wait_all_tasks_blocked(0.01)
                            await stream.send_all(part)
                        if not hang_up:
                            await trio.sleep_forever()

            async with trio.open_nursery() as nursery:
                await nursery.start(fake_outlet)
                received = []
                try:
                    inlet = await transports.connect(
                        f"unix://{path}", max_frame_size=max_frame_size
                    )
                    async with inlet:
                        while True:
                            if len(received) == pause_after:
                                await trio.testing.wait_all_tasks_blocked()
                            received.append([bytes(f) for f in await inlet.receive()])
                except (trio.BrokenResourceError, trio.EndOfChannel) as exc:
                    nursery.cancel_scope.cancel()
                    return received, exc
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@fast
@given(welcome=st.binary(min_size=0, max_size=12))
def test_a_wrong_handshake_is_refused(welcome):
    if welcome.startswith(encode_welcome()):
        welcome = b"x" + welcome
    received, error = trio.run(inlet_facing, welcome, 1 << 20)
    assert received == [] and isinstance(error, trio.BrokenResourceError)


@fast
@given(
    count=st.one_of(st.just(0), st.integers(MAX_FRAMES + 1, 2**32 - 1)),
    valid_first=st.booleans(),
)
def test_impossible_frame_counts_are_refused(count, valid_first):
    good = [[b"ok"]] if valid_first else []
    header = bytes([KIND_MESSAGE]) + len(good).to_bytes(8, "little") + count.to_bytes(4, "little")
    received, error = trio.run(inlet_facing, encode_welcome() + encode(good) + header, 1 << 20)
    assert received == good and isinstance(error, trio.BrokenResourceError)


def test_a_message_of_the_most_frames_is_read_and_of_one_more_refused():
    (record,) = trio.run(read_stream, encode([[b"x"] * MAX_FRAMES]), [], 1000)
    assert len(record[2]) == MAX_FRAMES
    with pytest.raises(ProtocolError, match=f"message of {MAX_FRAMES + 1} frames"):
        trio.run(read_stream, encode([[b"x"] * (MAX_FRAMES + 1)]), [], 1000)


@fast
@given(length=st.integers(1001, 2**64 - 1))
def test_frames_over_the_limit_are_refused_before_reading_them(length):
    header = (
        bytes([KIND_MESSAGE]) + bytes(8) + (1).to_bytes(4, "little") + length.to_bytes(8, "little")
    )
    received, error = trio.run(inlet_facing, encode_welcome() + header, 1000)
    assert received == [] and isinstance(error, trio.BrokenResourceError)
    assert "over the limit" in str(error)


@fast
@given(kind=st.integers(0, 255).filter(lambda k: k not in (KIND_MESSAGE, KIND_END)))
def test_unknown_or_misdirected_records_are_refused(kind):
    received, error = trio.run(inlet_facing, encode_welcome() + bytes([kind]) + bytes(20), 1000)
    assert received == [] and isinstance(error, trio.BrokenResourceError)


@fast
@given(messages=st.lists(frames_strategy, min_size=1, max_size=4), data=st.data())
def test_an_outlet_cut_mid_stream_delivers_whole_messages_then_breaks(messages, data):
    stream = encode(messages)
    cut = data.draw(st.integers(0, len(stream)))
    whole = sum(end <= cut for end in record_ends(messages))
    received, error = trio.run(inlet_facing, encode_welcome() + stream[:cut], 1 << 20)
    assert received == messages[:whole]
    assert isinstance(error, trio.BrokenResourceError)


def test_sequence_numbers_going_back_are_refused():
    stream = encode_welcome() + encode([[b"a"]], 5) + encode([[b"b"]], 5)
    received, error = trio.run(inlet_facing, stream, 1000)
    assert received == [[b"a"]] and isinstance(error, trio.BrokenResourceError)


def test_an_end_of_stream_before_a_message_seen_is_refused():
    stream = encode_welcome() + encode([[b"a"], [b"b"]]) + encode_end(1)
    received, error = trio.run(inlet_facing, stream, 1000)
    assert received == [[b"a"], [b"b"]] and isinstance(error, trio.BrokenResourceError)
    assert "end of stream at 1 after 2" in str(error)


def test_nothing_after_the_end_of_stream_is_received():
    stream = encode_welcome() + encode_end(0) + encode([[b"late"]])
    received, error = trio.run(partial(inlet_facing, stream, 1000, pause_after=0))
    assert received == [] and isinstance(error, trio.EndOfChannel)


def test_a_receiver_waits_while_the_inlet_is_midway_through_a_message():
    # The inlet's own task has started reading a large message when the
    # application starts receiving: the application waits for that task to
    # finish it (it does not read the connection too), then gets it whole.
    frame = bytes(range(256)) * 1024  # larger than SMALL_FRAME
    message = encode([[b"head", frame]])
    half = len(message) - len(frame) // 2
    parts = [encode_welcome() + message[:half], message[half:] + encode_end(1)]
    received, error = trio.run(partial(inlet_facing, parts, 1 << 20, pause_after=0))
    assert received == [[b"head", frame]] and isinstance(error, trio.EndOfChannel)


@pytest.mark.parametrize(
    ("pause_after", "takes", "accepted"),
    [(0, "slowly", 8), (2, "quickly", 8), (2, "slowly", 10)],
)
def test_an_outlet_overflowing_a_reliable_link_is_refused(
    pause_after, takes, accepted, monkeypatch
):
    # The outlet sends 11 messages on a link of capacity 8 without waiting for
    # credit. The application receives *pause_after* of them before the rest
    # arrive: a received message counts as in flight until it is credited.
    # Credit goes in batches of 4, or, to an application that takes slowly,
    # at once when 8 are in flight (the outlet then waits for it). So the 9th
    # is one too many, or, after 2 taken slowly, the 11th. (The outlet stays
    # connected: the inlet's credit finds it there.)
    monkeypatch.setattr(transports._link, "SLOW_TAKES", 0.0 if takes == "slowly" else math.inf)
    stream = encode_welcome() + encode([[b"%d" % i] for i in range(11)])
    facing = partial(inlet_facing, stream, 1000, pause_after=pause_after, hang_up=False)
    received, error = trio.run(facing)
    assert isinstance(error, trio.BrokenResourceError) and "overflowed" in str(error)
    assert received == [[b"%d" % i] for i in range(accepted)]


@fast
@given(
    buffers=st.lists(st.binary(max_size=300), max_size=8),
    writes=st.lists(st.integers(0, 400), max_size=12),
)
def test_partial_writes_leave_exactly_the_unwritten_bytes(buffers, writes):
    data = b"".join(buffers)
    views = [memoryview(buffer) for buffer in buffers]
    first = written = 0
    for size in writes:
        size = min(size, len(data) - written)  # a write never takes more than it is given
        first = _advance(views, first, size)
        written += size
        assert b"".join(bytes(view) for view in views[first:]) == data[written:]


async def test_an_inlet_that_reads_nothing_for_a_while_still_gets_every_byte():
    # The outlet writes small messages at once while the connection takes
    # them, and leaves the rest to its task once the socket buffers are full.
    count = 30_000
    expected = [[b"%d" % i, bytes([i % 251]) * 900] for i in range(count)]
    with trio.fail_after(60):
        async with await transports.bind("tcp://127.0.0.1:0") as outlet:
            host, port = outlet.address.removeprefix("tcp://").rsplit(":", 1)
            raw = await trio.open_tcp_stream(host, int(port))
            await raw.send_all(encode_hello(transports.Delivery.RELIABLE, count))
            assert len(await raw.receive_some(WELCOME_SIZE)) == WELCOME_SIZE
            await outlet.wait_for_inlets(1)
            for frames in expected:  # never waits: the link has room for all
                await outlet.send(frames)
            received = []
            reader = StreamReader(raw.socket, 1 << 20)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(outlet.aclose)
                while (record := await reader.read_record())[0] == KIND_MESSAGE:
                    received.append([bytes(frame) for frame in record[2]])
                assert record[:2] == (KIND_END, (count,))
                await raw.send_all(encode_ack(0))
            await raw.aclose()
    assert received == expected
