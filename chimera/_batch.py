"""Several encoded chunks in one transport message.

A link between two nodes carries batches: when a node's steps come faster
than its outlet sends, every chunk ready goes in the next message, so small
chunks cost one message (and one wake-up of each side) per batch, not per
chunk. A batch is the chunks' frames one after another, behind one frame
that says how many frames each chunk has::

    [b"CHB1" + uint32 n + n x uint32 frames, chunk 1 frames..., chunk 2 frames...]
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from ._data import DecodeError, Frame

__all__ = ["pack_batch", "unpack_batch"]

_MAGIC = b"CHB1"
_COUNT = struct.Struct("<I")
#: Most chunks in one batch (a sender never packs more than its steps in flight).
MAX_BATCH = 65536


def pack_batch(chunks: Sequence[Sequence[Frame]]) -> list[Frame]:
    """The frames of one message carrying *chunks* (each a chunk's frames), in order."""
    counts = [len(frames) for frames in chunks]
    header = _MAGIC + struct.pack(f"<I{len(counts)}I", len(counts), *counts)
    message: list[Frame] = [header]
    for frames in chunks:
        message.extend(frames)
    return message


def unpack_batch(message: Sequence[Frame]) -> list[Sequence[Frame]]:
    """The chunks (each its frames) that :func:`pack_batch` put in *message*.

    Raises:
        DecodeError: *message* is not a batch: its first frame lacks the
            header, the header's counts are impossible, or they do not add
            up to the frames that follow.
    """
    if not message:
        raise DecodeError("an empty message: a batch has at least its header")
    header = memoryview(message[0]).cast("B")
    if header.nbytes < 8 or header[:4] != _MAGIC:
        raise DecodeError("the message is not a batch of chunks (no batch header)")
    (n,) = _COUNT.unpack_from(header, 4)
    if not 1 <= n <= MAX_BATCH or header.nbytes != 8 + 4 * n:
        raise DecodeError(f"a batch header of {header.nbytes} bytes announcing {n} chunks")
    counts = struct.unpack_from(f"<{n}I", header, 8)
    if min(counts) < 1 or sum(counts) != len(message) - 1:
        raise DecodeError(
            f"the batch header counts {sum(counts)} frames in {n} chunks; "
            f"{len(message) - 1} follow it"
        )
    chunks: list[Sequence[Frame]] = []
    start = 1
    for count in counts:
        chunks.append(message[start : start + count])
        start += count
    return chunks
