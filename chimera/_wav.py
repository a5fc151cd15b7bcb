"""WAV files that say what they hold at every flush, and grow past 4 GiB.

libsndfile (soundfile) writes a WAV file's sizes when it closes it, so a file
left by a kill said it held nothing (Python's ``wave`` found no samples in
it); and the sizes are 32-bit fields, which it filled with the largest value
once the samples passed 4 GiB: readers then read the first 4 GiB and no more
(8-channel float32 at 48 kHz: after 46 minutes).

:class:`WavWriter` writes the sizes at each :meth:`~WavWriter.flush`, and
keeps a ``JUNK`` chunk after the RIFF header, room for a ``ds64`` chunk: once
the file passes 4 GiB it becomes an RF64 file (EBU Tech 3306, as BWF
recorders do), which soundfile, ffmpeg and sox read whole. A smaller file is
a plain WAV file, which every reader reads (Python's ``wave`` too, for
integer samples)::

    RIFF size WAVE | JUNK 28 (ds64's room) | fmt 16 ... | [fact 4 frames] | data size samples...
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy

__all__ = ["SUBTYPES", "WavWriter"]

#: The sample formats, by soundfile's names: (WAV format tag, bits per sample).
SUBTYPES = {
    "PCM_U8": (1, 8),  # (unsigned: silence is 128)
    "PCM_16": (1, 16),
    "PCM_24": (1, 24),  # (int32 samples at full scale: their top three bytes)
    "PCM_32": (1, 32),
    "FLOAT": (3, 32),
    "DOUBLE": (3, 64),
}
_FLOAT_TAG = 3
#: The largest size a RIFF field holds; past it, the file is RF64.
LIMIT = 0xFFFF_FFFF
#: What an RF64 file has in its 32-bit size fields (ds64 holds the sizes).
_IN_DS64 = 0xFFFF_FFFF
_U32 = struct.Struct("<I")
#: The ds64 chunk's payload: RIFF size, data size, frames, table length (none).
_DS64 = struct.Struct("<QQQI")
#: Where the JUNK (then ds64) chunk's payload is.
_DS64_AT = 20


class WavWriter:
    """Writes samples to a new WAV file at *path*: *channels* channels at *rate*
    Hz, in the sample format *subtype* (a key of :data:`SUBTYPES`).

    Raises:
        ValueError: *subtype* is not one of :data:`SUBTYPES`.
        OSError: the file cannot be made.
    """

    def __init__(self, path: Path, rate: int, channels: int, subtype: str) -> None:
        if subtype not in SUBTYPES:
            raise ValueError(f"a WAV sample format is one of {sorted(SUBTYPES)}, not {subtype!r}")
        tag, bits = SUBTYPES[subtype]
        self._bits = bits
        self._align = channels * bits // 8
        self._frames = 0
        self._rf64 = False
        fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * self._align, self._align, bits)
        header = b"RIFF" + _U32.pack(0) + b"WAVE"
        header += b"JUNK" + _U32.pack(_DS64.size) + bytes(_DS64.size)
        header += b"fmt " + _U32.pack(len(fmt)) + fmt
        #: Where the fact chunk's frame count is (float samples only).
        self._fact_at: int | None = None
        if tag == _FLOAT_TAG:
            self._fact_at = len(header) + 8
            header += b"fact" + _U32.pack(4) + _U32.pack(0)
        #: Where the data chunk's size is; its samples follow.
        self._data_size_at = len(header) + 4
        header += b"data" + _U32.pack(0)
        # Unbuffered: what write() returns from is in the file whole, or not at
        # all (see _append), so the file never holds part of a block.
        self._file = open(path, "wb", buffering=0)  # (closed by close())
        try:
            self._append(header)
        except BaseException:
            self._file.close()
            raise

    def write(self, block: numpy.ndarray) -> None:
        """Append *block*, a (frames, channels) array of the file's samples
        (uint8, int16, int32 for PCM_24 and PCM_32, float32, float64).

        Raises:
            OSError: it could not be written (a full disk): none of it is in the file.
        """
        if not block.size:
            return
        block = numpy.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<"))
        data: bytes | memoryview
        if self._bits == 24:
            data = block.view(numpy.uint8).reshape(-1, 4)[:, 1:].tobytes()
        else:
            data = block.data.cast("B")
        self._append(data)
        self._frames += len(block)

    def flush(self) -> None:
        """Write the sizes of what was written in the header.

        Raises:
            OSError: they could not be written.
        """
        self._write_sizes(self._end())

    def close(self) -> None:
        """Flush, pad the samples to an even size (as RIFF wants), and close.

        Raises:
            OSError: it could not be written (the file is closed anyway, and
                its header says what it holds, unpadded if the pad could not
                be written).
        """
        try:
            end = self._end()
            self._write_sizes(end)
            if end % 2:
                self._append(b"\0")
                self._write_sizes(end + 1)
        finally:
            self._file.close()

    def _append(self, data: bytes | memoryview) -> None:
        """Write *data* at the end of the file, whole.

        Raises:
            OSError: it could not be written whole (a full disk): what was
                written of it is cut off again.
        """
        end = self._file.tell()
        try:
            written = 0
            with memoryview(data) as view:
                while written < len(view):  # (a write may be short: the disk is full)
                    written += self._file.write(view[written:])
        except OSError:
            self._file.truncate(end)
            self._file.seek(end)
            raise

    def _end(self) -> int:
        """Where the samples written end (the file's size, but a pad byte)."""
        return self._data_size_at + 4 + self._frames * self._align

    def _write_sizes(self, end: int) -> None:
        """Write the sizes of a file of *end* bytes in its header, in place.

        In an order that leaves a readable file if killed between two writes:
        the ds64 payload before the names that make the file RF64.
        """
        fd = self._file.fileno()
        data = self._frames * self._align
        if not self._rf64 and max(end - 8, data) > LIMIT:
            self._rf64 = True
        if self._rf64:
            os.pwrite(fd, _DS64.pack(end - 8, data, self._frames, 0), _DS64_AT)
            os.pwrite(fd, b"ds64", _DS64_AT - 8)
            os.pwrite(fd, _U32.pack(_IN_DS64), self._data_size_at)
            if self._fact_at is not None:
                os.pwrite(fd, _U32.pack(_IN_DS64), self._fact_at)
            os.pwrite(fd, b"RF64" + _U32.pack(_IN_DS64), 0)
            return
        if self._fact_at is not None:
            os.pwrite(fd, _U32.pack(self._frames), self._fact_at)
        os.pwrite(fd, _U32.pack(data), self._data_size_at)
        os.pwrite(fd, _U32.pack(end - 8), 4)
