"""Several encoded chunks in one transport message.

A link between two nodes carries batches: when a node's steps come faster
than its outlet sends, every chunk ready goes in the next message, so small
chunks cost one message (and one wake-up of each side) per batch, not per
chunk. A batch is the chunks' frames one after another, behind one frame
that numbers its first chunk and says how many frames each chunk has::

    [b"CHB2" + uint64 first + uint32 n + n x uint32 frames, chunk 1 frames..., ...]

A batch of no chunks (the header alone) says "nothing this step": in offline
mode (``Manager.step()``) every node sends one message per step, so that the
nodes downstream know not to wait for a chunk (see ``NodeRuntime.step_once``).

A node numbers the chunks it sends from 0, so that a node receiving them
over a LATEST link knows how many it never got (the link drops whole
messages, which may hold many chunks).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from ._data import DecodeError, Frame

__all__ = ["pack_batch", "unpack_batch"]

_MAGIC = b"CHB2"
_HEAD = struct.Struct("<QI")  # first, n
#: Most chunks in one batch (a sender never packs more than its steps in flight).
MAX_BATCH = 65536


def pack_batch(chunks: Sequence[Sequence[Frame]], first: int = 0) -> list[Frame]:
    """The frames of one message carrying *chunks* (each a chunk's frames), in
    order; *first* is the number of the first (see the module's docstring)."""
    counts = [len(frames) for frames in chunks]
    header = _MAGIC + _HEAD.pack(first, len(counts)) + struct.pack(f"<{len(counts)}I", *counts)
    message: list[Frame] = [header]
    for frames in chunks:
        message.extend(frames)
    return message


def unpack_batch(message: Sequence[Frame]) -> tuple[int, list[Sequence[Frame]]]:
    """The number of the first chunk :func:`pack_batch` put in *message*, and
    the chunks (each its frames).

    Raises:
        DecodeError: *message* is not a batch: its first frame lacks the
            header, the header's counts are impossible, or they do not add
            up to the frames that follow.
    """
    if not message:
        raise DecodeError("an empty message: a batch has at least its header")
    try:
        header = memoryview(message[0]).cast("B")
    except (TypeError, ValueError):  # not bytes-like, or not contiguous
        raise DecodeError("the message is not a batch of chunks (no batch header)") from None
    start = len(_MAGIC) + _HEAD.size
    if header.nbytes < start or header[:4] != _MAGIC:
        raise DecodeError("the message is not a batch of chunks (no batch header)")
    first, n = _HEAD.unpack_from(header, len(_MAGIC))
    if n > MAX_BATCH or header.nbytes != start + 4 * n:
        raise DecodeError(f"a batch header of {header.nbytes} bytes announcing {n} chunks")
    counts = struct.unpack_from(f"<{n}I", header, start)
    if 0 in counts or sum(counts) != len(message) - 1:
        raise DecodeError(
            f"the batch header counts {sum(counts)} frames in {n} chunks; "
            f"{len(message) - 1} follow it"
        )
    chunks: list[Sequence[Frame]] = []
    at = 1
    for count in counts:
        chunks.append(message[at : at + count])
        at += count
    return first, chunks
