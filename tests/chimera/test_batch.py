"""Several chunks in one transport message: any batch round-trips; anything else is refused."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

import chimera as cp
from chimera._batch import pack_batch, unpack_batch
from chimera._data import encode_chunk

chunk_frames = st.lists(st.binary(max_size=16), min_size=1, max_size=4)


@given(st.lists(chunk_frames, max_size=8), st.integers(0, 2**64 - 1))
def test_any_batch_round_trips_with_the_number_of_its_first_chunk(chunks, first):
    message = [memoryview(bytes(frame)) for frame in pack_batch(chunks, first)]
    got_first, got = unpack_batch(message)
    assert (got_first, [[bytes(frame) for frame in frames] for frames in got]) == (first, chunks)


@given(st.lists(chunk_frames, min_size=1, max_size=8), st.data())
def test_a_batch_missing_frames_or_with_extra_ones_is_refused(chunks, data):
    message = pack_batch(chunks)
    cut = data.draw(st.integers(1, len(message) - 1))
    with pytest.raises(cp.DecodeError, match="frames"):
        unpack_batch(message[:cut])
    with pytest.raises(cp.DecodeError, match="frames"):
        unpack_batch([*message, b"extra"])


@given(st.binary(max_size=64), st.lists(st.binary(max_size=8), max_size=4))
def test_garbage_is_refused_with_a_decode_error(header, rest):
    try:
        _, chunks = unpack_batch([header, *rest])
    except cp.DecodeError:
        return
    # It parsed: then it was a well-formed header that counts exactly these frames.
    assert sum(len(frames) for frames in chunks) == len(rest)
    assert header[:4] == b"CHB2"


@pytest.mark.parametrize(
    "header",
    [
        b"CHB2" + struct.pack("<QI", 0, 0),  # no chunks, yet a frame follows
        b"CHB2" + struct.pack("<QIII", 0, 2, 0, 1),  # a chunk of no frames (the count adds up)
        b"CHB2" + struct.pack("<QII", 0, 2, 1),  # two chunks announced, one counted
        b"CHB2" + struct.pack("<QI", 0, 2**31) + b"\0" * 8,  # an impossible count
        b"CHB1" + struct.pack("<II", 1, 1),  # the batch of an earlier version
    ],
)
def test_impossible_headers_are_refused(header):
    with pytest.raises(cp.DecodeError):
        unpack_batch([header, b"x"])


def test_a_batch_of_the_most_chunks_round_trips_and_one_of_more_is_refused():
    from chimera._batch import MAX_BATCH

    most = [[b"x"]] * MAX_BATCH
    message = pack_batch(most, first=7)
    first, chunks = unpack_batch(message)
    assert first == 7 and len(chunks) == MAX_BATCH
    with pytest.raises(cp.DecodeError, match=f"announcing {MAX_BATCH + 1} chunks"):
        unpack_batch(pack_batch([*most, [b"x"]]))


@pytest.mark.parametrize("header", [None, "CHB2", 5, memoryview(b"CHB2" * 8)[::2]])
def test_a_header_that_is_not_contiguous_bytes_is_refused_with_a_decode_error(header):
    with pytest.raises(cp.DecodeError, match="not a batch"):
        unpack_batch([header, b"x"])


def test_a_lone_chunk_is_not_a_batch():
    chunk = cp.DataChunk()
    chunk.add("x", 1)
    with pytest.raises(cp.DecodeError, match="not a batch"):
        unpack_batch(encode_chunk(chunk))
    with pytest.raises(cp.DecodeError, match="empty"):
        unpack_batch([])
