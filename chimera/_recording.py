"""What a node saves: one stream per name, each written by a thread of its own.

A :class:`Recorder` holds a node's streams, in the node's folder. The
``save_*`` methods of :class:`~chimera.Node` call :meth:`Recorder.save` on
the node's thread: it checks the data, stamps it with cluster time, and
queues it for the stream's writer. The queue is bounded: a writer that cannot
keep up makes the node wait (and says so in the log and in the stream's
``waited_s``); nothing is dropped. Each writer flushes at least every
:data:`FLUSH_PERIOD` seconds, so a node killed with SIGKILL loses at most
about two seconds of what it saved, and leaves files its standard reader opens.

=========  ==================================  ==========================================
kind       files                               written with
=========  ==================================  ==========================================
video      ``NAME.mp4``                        PyAV: H.264 in fragmented MP4, a fragment
                                               per second (readable after a crash)
audio      ``NAME.wav``                        :mod:`chimera._wav`: the header says what
                                               the file holds at each flush; RF64 past
                                               4 GiB
image      ``NAME/000000.png``, ...            OpenCV
table      ``NAME.csv`` (``timestamp_ns`` the  the csv module
           first column)
json       ``NAME.jsonl`` (a value per line)   the json module
text       ``NAME.SUFFIX``                     appended as it comes
=========  ==================================  ==========================================

Beside each video, audio, image, json and text stream, ``NAME.timestamps.csv``
says when each frame, audio block, image, value or text was saved
(``index,timestamp_ns``; for audio, the index of the block's first sample).
"""

from __future__ import annotations

import contextlib
import csv
import fractions
import io
import itertools
import json
import logging
import os
import queue
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy

from ._data import _check_utf8, cluster_time_ns, numpy_hint
from ._manifest import Manifest, stream_summary, written_whole
from ._wav import WavWriter

__all__ = ["FLUSH_PERIOD", "Recorder", "StreamInfo", "check_name"]

log = logging.getLogger("chimera.recording")

#: Longest time, in seconds, between two flushes of a stream that is written to.
FLUSH_PERIOD = 1.0
#: Items a stream's queue holds, by kind (a full queue makes the node wait).
QUEUE_SIZES = {"video": 16, "audio": 256, "image": 16, "table": 1024, "json": 1024, "text": 1024}
#: H.264 settings: fast enough for 1080p at 30 fps on two cores. libx264 makes
#: no keyframe of its own: the writer asks for one each :data:`FLUSH_PERIOD`.
VIDEO_OPTIONS = {"preset": "ultrafast", "threads": "2", "x264-params": "keyint=infinite"}

#: PyAudio's sample formats (as ChimeraPy takes them): sample format and dtype.
_AUDIO_FORMATS = {
    1: ("FLOAT", numpy.float32),  # paFloat32
    2: ("PCM_32", numpy.int32),  # paInt32
    4: ("PCM_24", numpy.int32),  # paInt24 (as int32 samples, full scale)
    8: ("PCM_16", numpy.int16),  # paInt16
    16: ("PCM_U8", numpy.int8),  # paInt8 (a WAV file's 8-bit samples are unsigned: shifted by 128)
    32: ("PCM_U8", numpy.uint8),  # paUInt8
}
_PA_INT24 = 4
#: With ``format=None``: the subtype for the array's dtype.
_AUDIO_DTYPES = {
    numpy.dtype(numpy.int8): "PCM_U8",
    numpy.dtype(numpy.uint8): "PCM_U8",
    numpy.dtype(numpy.int16): "PCM_16",
    numpy.dtype(numpy.int32): "PCM_32",
    numpy.dtype(numpy.float32): "FLOAT",
    numpy.dtype(numpy.float64): "DOUBLE",
}


def _as_uint8(
    array: numpy.ndarray, what: str, unit_floats: Callable[[], None] | None = None
) -> numpy.ndarray:
    """*array* as uint8: other numbers are taken if every value is in [0, 255]
    (floats truncated, as ChimeraPy's ``numpy.uint8(frame)`` did); floats
    all in [0, 1], not all 0 (which that makes black), call *unit_floats*.

    Anything but numbers comes back as it is, for the caller's check to refuse.

    Raises:
        ValueError: it holds numbers out of that range (or NaN).
    """
    if array.dtype == numpy.uint8:
        return array
    if array.dtype.kind not in "iuf" or array.size == 0:
        return array  # (refused by the caller's check, naming the dtype)
    low, high = array.min(), array.max()
    if not (0 <= low and high <= 255):  # (NaN fails too)
        raise ValueError(
            f"{what}: {array.dtype} values from {low} to {high}; "
            "uint8 frames, or numbers in [0, 255]"
        )
    if unit_floats is not None and array.dtype.kind == "f" and 0 < high <= 1:
        unit_floats()
    return array.astype(numpy.uint8)


def _from_pyaudio_bytes(data: Any, format: int, what: str) -> numpy.ndarray:
    """PyAudio's bytes of *format* as samples (paInt24's packed 3-byte ones as
    full-scale int32, their low byte 0).

    Raises:
        ValueError: the bytes are not a whole number of samples.
    """
    width = 3 if format == _PA_INT24 else numpy.dtype(_AUDIO_FORMATS[format][1]).itemsize
    raw = numpy.frombuffer(data, dtype=numpy.uint8)
    if raw.size % width:
        raise ValueError(f"{what}: {raw.size} bytes are not a whole number of {width}-byte samples")
    if format != _PA_INT24:
        return raw.view(_AUDIO_FORMATS[format][1])
    padded = numpy.zeros((raw.size // 3, 4), dtype=numpy.uint8)
    padded[:, 1:] = raw.reshape(-1, 3)  # little-endian: the 3 bytes on top
    return padded.view("<i4").ravel()


def _as_samples(block: numpy.ndarray, dtype: Any, what: str) -> numpy.ndarray:
    """*block* as samples of *dtype*: floats as floats, integers as integers if they fit.

    Raises:
        ValueError: floats for an integer format (they would round to
            silence), integers for a float format, or integers that do not fit.
    """
    dtype = numpy.dtype(dtype)
    if block.dtype == dtype:
        return block
    if block.dtype.kind == "f" and dtype.kind == "f":
        return block.astype(dtype)
    if block.dtype.kind in "iu" and dtype.kind in "iu":
        info = numpy.iinfo(dtype)
        if block.size == 0 or (info.min <= block.min() and block.max() <= info.max):
            return block.astype(dtype)
        raise ValueError(f"{what}: {block.dtype} samples out of the format's {dtype} range")
    raise ValueError(
        f"{what}: {block.dtype} samples for a format of {dtype} samples: give {dtype} "
        "samples, or format=None to save them as they are"
    )


def check_name(name: Any, what: str = "name") -> str:
    """*name*, if it can be a file name in a node's folder; *what* says what
    it names in the errors (``"worker name"``: "worker name 'a/b' is not a
    valid file name: it holds '/'").

    Raises:
        TypeError: *name* is not a str.
        ValueError: it is empty, ``.`` or ``..``, holds ``/``, ``\\`` or NUL,
            or UTF-8 cannot encode it (a lone surrogate).
    """
    if not isinstance(name, str):
        raise TypeError(f"a {what} is a str, not {type(name).__name__}")
    _check_utf8(name, f"{what} {name!r}")
    if not name:
        problem = "it is empty"
    elif name in (".", ".."):
        problem = "it means the folder itself" if name == "." else "it means the parent folder"
    elif bad := [c for c in "/\\\0" if c in name]:
        problem = f"it holds {bad[0]!r}"
    else:
        return name
    raise ValueError(f"{what} {name!r} is not a valid file name: {problem}")


@dataclass
class StreamInfo:
    """What one stream saved: for the session's metadata."""

    kind: str
    name: str
    #: The file (or folder, for images), relative to the node's folder.
    path: str
    #: Frames, audio blocks, images, rows, values or texts saved.
    count: int = 0
    #: Audio: samples saved (per channel).
    samples: int = 0
    first_ns: int | None = None
    last_ns: int | None = None
    #: The longest time between two saves, in ns.
    max_gap_ns: int | None = None
    #: Seconds the node waited for the writer (its queue was full).
    waited_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The stream's summary in ``meta.json``."""
        return stream_summary(
            self.name, self.path, self.count, self.first_ns, self.last_ns, self.max_gap_ns
        )


class Recorder:
    """The streams of one node, saved into *folder* (made on the first save).

    Call :meth:`save` from the node's thread, :meth:`close` once it saves no more.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._streams: dict[str, _Stream] = {}
        #: The stream each file (or image folder) of the node's folder is of.
        self._files: dict[str, str] = {}
        self._closed = False

    def save(self, kind: str, name: str, data: Any, **params: Any) -> None:
        """Queue *data* for the stream *name* of *kind* (see the module's table).

        Raises:
            TypeError, ValueError: *name* cannot be a file name, is a stream of
                another kind, or *data* does not fit the stream (a frame of
                another size than the first, a row of other columns, ...).
            RuntimeError: the recorder is closed.
            OSError: the stream's writer failed earlier (the reason).
        """
        now = cluster_time_ns()  # (the call's: a stream's first save takes a while to set up)
        if self._closed:
            raise RuntimeError("the recorder is closed: nothing more can be saved")
        check_name(name)
        stream = self._streams.get(name)
        if stream is None:  # a stream begins once its first save is accepted
            writer = _WRITERS[kind](self.folder, name, **params)
            for path in writer.files():
                if path in self._files:
                    raise ValueError(
                        f"{kind} {name!r}: its file {path!r} is the {self._files[path]!r} "
                        "stream's: give it another name"
                    )
            item = writer.prepare(data, **params)
            self.folder.mkdir(parents=True, exist_ok=True)
            stream = self._streams[name] = _Stream(writer, params)
            self._files.update(dict.fromkeys(writer.files(), name))
        else:
            if stream.writer.kind != kind:
                raise ValueError(
                    f"{name!r} is already a {stream.writer.kind} stream, not a {kind} one"
                )
            if params != stream.params:
                changed = ", ".join(
                    f"{key}={params.get(key)!r} after {key}={stream.params.get(key)!r}"
                    for key in sorted(params.keys() | stream.params.keys())
                    if params.get(key) != stream.params.get(key)
                )
                raise ValueError(
                    f"{kind} {name!r}: {changed}: a stream keeps the settings of its first "
                    "save (save under another name for others)"
                )
            item = stream.writer.prepare(data, **params)
        stream.put(item, now)

    def close(self) -> list[StreamInfo]:
        """Let every writer finish what is queued, close its files, and write
        the folder's manifest (every file hashed; see :mod:`chimera._manifest`);
        what each stream saved.

        Raises:
            OSError: a writer failed (the first failure; every stream is closed
                anyway), or a file could not be hashed.
        """
        self._closed = True
        for stream in self._streams.values():
            stream.finish()
        saved = self.streams()
        if self.folder.is_dir():
            Manifest.make(self.folder, [info.summary() for info in saved]).write(self.folder)
        errors = [stream.error for stream in self._streams.values() if stream.error is not None]
        if errors:
            raise errors[0]
        return saved

    def streams(self) -> list[StreamInfo]:
        """What each stream saved so far (from any thread: the node's may add a
        stream meanwhile, so the streams are copied first, at once)."""
        return [stream.writer.info for stream in list(self._streams.values())]


class _Stream:
    """A writer, its queue and its thread."""

    def __init__(self, writer: _Writer, params: dict[str, Any]) -> None:
        self.writer = writer
        #: The settings of the first save (``fps``, ``rate``, ...), which the others keep.
        self.params = params
        self.error: OSError | None = None
        self._queue: queue.Queue[tuple[Any, int] | None] = queue.Queue(QUEUE_SIZES[writer.kind])
        self._warned = False
        self._thread = threading.Thread(
            target=self._run, name=f"chimera-writer-{writer.kind}-{writer.info.name}", daemon=True
        )
        self._thread.start()

    def put(self, item: Any, stamp: int) -> None:
        if self.error is not None:
            raise self.error
        try:
            self._queue.put_nowait((item, stamp))
        except queue.Full:
            if not self._warned:
                self._warned = True
                log.warning(
                    "the %s writer of %r cannot keep up: its node waits",
                    self.writer.kind,
                    self.writer.info.name,
                )
            started = time.perf_counter()
            self._queue.put((item, stamp))
            self.writer.info.waited_s += time.perf_counter() - started

    def finish(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        writer, flushed, opened = self.writer, time.monotonic(), False
        try:
            while True:
                item: tuple[Any, int] | Literal[False] | None
                try:
                    item = self._queue.get(timeout=FLUSH_PERIOD)
                except queue.Empty:
                    item = False
                if item is None:
                    break
                if item is not False:
                    data, stamp = item
                    if not opened:  # once the first item is prepared: its size, its dtype
                        writer.open()
                        opened = True
                    writer.write(data, stamp)
                    info = writer.info
                    info.count += 1
                    if info.last_ns is None:
                        info.first_ns = stamp
                    else:
                        info.max_gap_ns = max(info.max_gap_ns or 0, stamp - info.last_ns)
                    info.last_ns = stamp
                if opened and time.monotonic() - flushed >= FLUSH_PERIOD:
                    writer.flush()
                    flushed = time.monotonic()
        except Exception as exc:  # reported to the node at its next save, and at close
            self.error = OSError(f"the {writer.kind} writer of {writer.info.name!r} failed: {exc}")
            log.exception("the %s writer of %r failed", writer.kind, writer.info.name)
            while self._queue.get() is not None:  # unblock the node until it finishes
                pass
        finally:
            try:
                writer.close()
            except Exception as exc:
                log.exception("closing the %s writer of %r", writer.kind, writer.info.name)
                if self.error is None:
                    self.error = OSError(f"closing {writer.info.name!r} failed: {exc}")
            if self.error is not None:
                writer.count_only_flushed()


# --- the writers ------------------------------------------------------------------


class _AppendFile:
    """A text file written whole lines at a time: what is added goes to the
    file at the next :meth:`flush`, in one write, so that a process killed at
    any moment leaves no half line (readers of csv and json lines choke on one).

    A CSV file's *header* is in the file once it is open: killed before its
    first flush, it leaves a table of no rows, which pandas reads (not an
    empty file, which it cannot)."""

    def __init__(self, path: Path, header: list[str] | None = None) -> None:
        self._file = open(path, "wb", buffering=0)
        #: Bytes in the file: whole lines.
        self._size = 0
        self._pending = io.StringIO()
        self.csv = csv.writer(self._pending, lineterminator="\n")
        if header is not None:
            self.csv.writerow(header)
            self.flush()

    def add(self, text: str) -> None:
        self._pending.write(text)

    def flush(self) -> None:
        """Write what was added since the last flush, every byte of it.

        Raises:
            OSError: it could not be written whole (a full disk): the file is
                cut back to the lines it held before, and what was added is
                kept, for the next flush to write.
        """
        data = self._pending.getvalue().encode()
        if not data:
            return
        try:
            written = 0
            while written < len(data):  # (a write may be short: the disk is full)
                written += self._file.write(data[written:])
        except OSError:
            self._file.truncate(self._size)  # no half line
            self._file.seek(self._size)
            raise
        self._size += len(data)
        self._pending.seek(0)
        self._pending.truncate()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._file.close()


class _Writer:
    """Writes one stream. ``prepare`` runs on the node's thread (checks, copies
    what the node may change); the rest on the writer's thread."""

    kind = ""
    suffix = ""
    #: Whether the stream has a ``NAME.timestamps.csv``.
    stamped = True
    #: Whether what is written waits in memory until :meth:`flush` (lines of
    #: text): a flush that fails cuts it off, so it is counted once flushed.
    buffered = False

    def __init__(self, folder: Path, name: str, **params: Any) -> None:
        self.folder, self.name = folder, name
        self.info = StreamInfo(self.kind, name, f"{name}{self.suffix}")
        #: The stream's file, once open (anything with flush and close), and
        #: its timestamps.
        self._file: Any = None
        self._stamps: _AppendFile | None = None
        self._warned_unit_floats = False
        #: A buffered stream's counts as of its last flush.
        self._flushed = self._counts()

    def prepare(self, data: Any, **params: Any) -> Any:
        return data

    def files(self) -> set[str]:
        """The paths, in the node's folder, of the files (or folder) it writes."""
        stamps = {f"{self.name}.timestamps.csv"} if self.stamped else set()
        return {self.info.path} | stamps

    def open(self) -> None:
        """Open the files (on the writer's thread)."""

    def write(self, data: Any, stamp: int) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        # The timestamps first: a kill in between leaves them covering the data.
        if self._stamps is not None:
            self._stamps.flush()
        if self._file is not None:
            self._file.flush()
        if self.buffered:
            self._flushed = self._counts()

    def count_only_flushed(self) -> None:
        """Count only what the last flush wrote (a flush failed: the lines
        written since were cut off)."""
        if self.buffered:
            info = self.info
            info.count, info.samples, info.first_ns, info.last_ns, info.max_gap_ns = self._flushed

    def _counts(self) -> tuple[int, int, int | None, int | None, int | None]:
        info = self.info
        return info.count, info.samples, info.first_ns, info.last_ns, info.max_gap_ns

    def close(self) -> None:
        try:
            if self.buffered:
                self.flush()  # (first: so that it counts)
            if self._file is not None:
                self._file.close()
        finally:
            if self._stamps is not None:
                self._stamps.close()

    def _as_uint8(self, array: numpy.ndarray) -> numpy.ndarray:
        """:func:`_as_uint8` for a frame or image of this stream; warns (once)
        of floats in [0, 1], which it truncates to 0 and 1: black."""
        return _as_uint8(array, f"{self.kind} {self.name!r}", self._warn_unit_floats)

    def _warn_unit_floats(self) -> None:
        if not self._warned_unit_floats:
            self._warned_unit_floats = True
            log.warning(
                "%s %r: float values in [0, 1] are saved as 0 or 1 (black): scale them to [0, 255]",
                self.kind,
                self.name,
            )

    def _open_stamps(self) -> None:
        path = self.folder / f"{self.name}.timestamps.csv"
        self._stamps = _AppendFile(path, ["index", "timestamp_ns"])

    def _stamp(self, index: int, stamp: int, *, at_once: bool = False) -> None:
        """Add the next timestamp, called before its data is written. *at_once*
        (for media, which their libraries write as it comes): to the file now,
        so that whatever a kill leaves of the stream, the timestamps cover it."""
        stamps = self._stamps
        assert stamps is not None  # (opened by open(), before any write)
        stamps.csv.writerow([index, stamp])
        if at_once:
            stamps.flush()


class _VideoWriter(_Writer):
    kind, suffix = "video", ".mp4"

    def __init__(self, folder: Path, name: str, fps: Any = None) -> None:
        super().__init__(folder, name)
        if isinstance(fps, bool) or not isinstance(fps, int | float) or not 0 < fps <= 1000:
            raise ValueError(f"video {name!r}: fps is a number in (0, 1000], not {fps!r}")
        self.fps = fps
        self._size: tuple[int, int] | None = None
        self._container: Any = None
        self._stream: Any = None
        #: The timestamp of the last keyframe's frame.
        self._keyframe_ns: int | None = None
        #: Whether a write failed (the file then ends in part of a fragment).
        self._failed = False

    def prepare(self, data: Any, **params: Any) -> numpy.ndarray:
        frame = self._as_uint8(numpy.asarray(data))
        if (
            frame.dtype != numpy.uint8
            or not (frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 3))
            or frame.size == 0
        ):
            raise ValueError(
                f"video {self.name!r}: frames are non-empty uint8 HxWx3 (BGR) or HxW "
                f"arrays, not {frame.dtype} of shape {frame.shape}"
            )
        size = (frame.shape[1], frame.shape[0])
        if self._size is None:
            if size[0] % 2 or size[1] % 2:
                raise ValueError(
                    f"video {self.name!r}: H.264 needs an even width and height, "
                    f"not {size[0]}x{size[1]}"
                )
            self._size = size
        elif size != self._size:
            raise ValueError(
                f"video {self.name!r}: a frame of {size[0]}x{size[1]}, "
                f"the first was {self._size[0]}x{self._size[1]}"
            )
        return numpy.array(frame, copy=True)  # the node may reuse its buffer

    def open(self) -> None:
        import av

        self._container = av.open(
            str(self.folder / f"{self.name}.mp4"),
            "w",
            format="mp4",
            # A fragment at each keyframe (one a second: see write), each
            # written at once: what a crash leaves is readable up to the last
            # fragment.
            options={
                "movflags": "frag_keyframe+empty_moov+default_base_moof",
                "flush_packets": "1",
            },
        )
        # (PyAV takes a whole number or a Fraction: 29.97 as 2997/100.)
        rate = fractions.Fraction(self.fps).limit_denominator(1001)
        self._stream = self._container.add_stream("libx264", rate=rate, options=VIDEO_OPTIONS)
        assert self._size is not None  # (the first frame's, prepared before open)
        self._stream.width, self._stream.height = self._size
        self._stream.pix_fmt = "yuv420p"
        self._open_stamps()

    def write(self, frame: numpy.ndarray, stamp: int) -> None:
        """Encode *frame*, a keyframe if it was saved :data:`FLUSH_PERIOD` or
        more after the last keyframe (whatever the rate the node declared), or
        before it (the cluster clock stepped back): a kill loses the frames
        since the last keyframe, about a second."""
        import av
        from av.video.frame import PictureType

        video_frame = av.VideoFrame.from_ndarray(
            frame, format="gray" if frame.ndim == 2 else "bgr24"
        )
        if self._keyframe_ns is None or not 0 <= stamp - self._keyframe_ns < FLUSH_PERIOD * 1e9:
            video_frame.pict_type = PictureType.I  # (libx264 makes it a keyframe)
            self._keyframe_ns = stamp
        self._stamp(self.info.count, stamp, at_once=True)
        try:
            self._container.mux(self._stream.encode(video_frame))
        except Exception:
            self._failed = True
            raise

    def close(self) -> None:
        """Encode the frames the encoder holds, and close the file; after a
        write failed (a full disk), cut the file back to its last whole
        fragment, and count the frames it holds.

        Raises:
            Exception: what closing raised, unless a write had failed before
                (that error was raised then).
        """
        try:
            if self._container is not None:
                failed_before = self._failed
                try:
                    if not failed_before:
                        self._container.mux(self._stream.encode(None))
                    self._container.close()
                except Exception:
                    self._failed = True
                    with contextlib.suppress(Exception):
                        self._container.close()  # (it frees the encoder; its file is cut below)
                    if not failed_before:
                        raise
                finally:
                    if self._failed:
                        self._count_first(_cut_to_whole_fragments(self.folder / self.info.path))
        finally:
            super().close()

    def _count_first(self, count: int) -> None:
        """Count only the first *count* frames saved (by their timestamps, in
        the file at once: see write)."""
        with open(self.folder / f"{self.name}.timestamps.csv", newline="") as file:
            stamps = [int(row[1]) for row in itertools.islice(csv.reader(file), 1, count + 1)]
        info = self.info
        info.count = len(stamps)
        info.first_ns, info.last_ns = (stamps[0], stamps[-1]) if stamps else (None, None)
        info.max_gap_ns = max((b - a for a, b in itertools.pairwise(stamps)), default=None)


def _cut_to_whole_fragments(path: Path) -> int:
    """Cut the fragmented MP4 file at *path* after its last whole fragment
    (a ``moof`` box and the ``mdat`` after it): a write cut short leaves a
    part of one, on which readers choke. How many frames the file holds then."""
    import av
    from av.error import FFmpegError

    with open(path, "r+b") as file:
        size = os.fstat(file.fileno()).st_size
        at = whole = 0
        while at + 8 <= size:
            file.seek(at)
            head = file.read(16)
            length, kind = struct.unpack(">I4s", head[:8])
            if length == 1 and len(head) == 16:  # (a 64-bit size follows the type)
                length = struct.unpack(">Q", head[8:])[0]
            if length < 8 or at + length > size:  # (0: "to the end", which a cut file is not)
                break
            at += length
            if kind != b"moof":  # (a moof is whole with the mdat after it)
                whole = at
        file.truncate(whole)
    try:
        with av.open(str(path)) as container:
            return sum(1 for packet in container.demux(video=0) if packet.size)
    except (FFmpegError, IndexError):  # (no fragment: no video stream to read)
        return 0


class _AudioWriter(_Writer):
    kind, suffix = "audio", ".wav"

    def __init__(
        self, folder: Path, name: str, channels: Any = None, format: Any = None, rate: Any = None
    ) -> None:
        super().__init__(folder, name)
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"audio {name!r}: channels is a positive int, not {channels!r}")
        if isinstance(rate, bool) or not isinstance(rate, int) or rate < 1:
            raise ValueError(f"audio {name!r}: rate is a positive int (Hz), not {rate!r}")
        if format is not None and format not in _AUDIO_FORMATS:
            raise ValueError(
                f"audio {name!r}: format {format!r} is not one of PyAudio's paFloat32 (1), "
                "paInt32 (2), paInt24 (4), paInt16 (8), paInt8 (16), paUInt8 (32), or None "
                "(the array's dtype)"
            )
        self.channels, self.format, self.rate = channels, format, rate
        self._subtype: str | None = None
        self._dtype: numpy.dtype | None = None

    def prepare(self, data: Any, **params: Any) -> numpy.ndarray:
        what = f"audio {self.name!r}"
        if isinstance(data, bytes | bytearray | memoryview):  # as PyAudio reads it
            if self.format is None:
                raise ValueError(f"{what}: bytes need a format (e.g. paInt16)")
            block = _from_pyaudio_bytes(data, self.format, what)
        elif self.format == _PA_INT24:  # int32 samples of 24-bit values
            block = _as_samples(numpy.asarray(data), numpy.int32, what)
            if block.size and not (-(1 << 23) <= block.min() and block.max() < 1 << 23):
                raise ValueError(f"{what}: samples out of paInt24's range [-2**23, 2**23)")
            block = block << 8  # (PCM_24 is written from int32 at full scale)
        else:
            block = numpy.asarray(data)
        if self.format is not None:
            subtype, dtype = _AUDIO_FORMATS[self.format]
            block = _as_samples(block, dtype, what)
        elif block.dtype in _AUDIO_DTYPES:
            subtype = _AUDIO_DTYPES[block.dtype]
        else:
            raise ValueError(
                f"audio {self.name!r}: samples of {block.dtype}; "
                "with format=None, int8, uint8, int16, int32, float32 or float64"
            )
        if block.ndim == 1:
            if block.size % self.channels:
                raise ValueError(
                    f"audio {self.name!r}: {block.size} interleaved samples "
                    f"are not a whole number of {self.channels}-channel frames"
                )
            block = block.reshape(-1, self.channels)
        if block.ndim != 2 or block.shape[1] != self.channels:
            raise ValueError(
                f"audio {self.name!r}: a block of shape {block.shape}, "
                f"not (frames, {self.channels}) or interleaved"
            )
        if self._subtype is None:
            self._subtype, self._dtype = subtype, block.dtype
        elif block.dtype != self._dtype:
            raise ValueError(f"audio {self.name!r}: {block.dtype} samples after {self._dtype} ones")
        if block.dtype == numpy.int8:  # (8-bit WAV samples are unsigned, silence at 128)
            return (block.astype(numpy.int16) + 128).astype(numpy.uint8)
        return numpy.array(block, copy=True)

    def open(self) -> None:
        assert self._subtype is not None  # (the first block's, prepared before open)
        self._file = WavWriter(
            self.folder / f"{self.name}.wav", self.rate, self.channels, self._subtype
        )
        self._open_stamps()

    def write(self, block: numpy.ndarray, stamp: int) -> None:
        self._stamp(self.info.samples, stamp, at_once=True)
        self._file.write(block)
        self.info.samples += len(block)


class _ImageWriter(_Writer):
    kind, suffix = "image", ""

    def prepare(self, data: Any, **params: Any) -> numpy.ndarray:
        image = self._as_uint8(numpy.asarray(data))
        if (
            image.dtype != numpy.uint8
            or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4)))
            or image.size == 0
        ):
            raise ValueError(
                f"image {self.name!r}: images are non-empty uint8 HxW, HxWx3 (BGR) or "
                f"HxWx4 arrays, not {image.dtype} of shape {image.shape}"
            )
        return numpy.array(image, copy=True)

    def open(self) -> None:
        (self.folder / self.name).mkdir(exist_ok=True)
        self._open_stamps()

    def write(self, image: numpy.ndarray, stamp: int) -> None:
        """Write the image whole under a temporary name, ``.NNNNNN.png.partial``
        (not a PNG's), then its timestamp, then rename it: a kill at any
        moment leaves the whole image with its timestamp, or neither (and
        maybe the temporary file, which is not collected).

        Raises:
            OSError: it cannot be encoded or written (no temporary file is left).
        """
        import cv2

        path = self.folder / self.name / f"{self.info.count:06d}.png"
        encoded, png = cv2.imencode(".png", image)
        if not encoded:
            raise OSError(f"cannot encode {path.name} as PNG")
        with written_whole(path) as partial:
            # (type: ignore: an ndarray is a buffer, which numpy's hints say on Python 3.12+ only)
            partial.write_bytes(png)  # type: ignore[arg-type]
            self._stamp(self.info.count, stamp, at_once=True)


def _is_pandas(value: Any, kind: str) -> bool:
    """Whether *value* is a pandas *kind* (without importing pandas if it is not loaded)."""
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(value, getattr(pandas, kind))


#: The cells a table keeps as they are, since they cannot change (numbers, numpy's
#: included, str, None); any other is taken as its text at the call.
_UNCHANGING_CELLS = (int, float, str, numpy.number, numpy.bool_, type(None))


class _TableWriter(_Writer):
    kind, suffix = "table", ".csv"
    stamped, buffered = False, True

    def __init__(self, folder: Path, name: str) -> None:
        super().__init__(folder, name)
        self._columns: list[str] | None = None

    def prepare(self, data: Any, **params: Any) -> list[list[Any]]:
        """The rows of *data*, each as it is now: a cell but a number, a str
        or None (a list, an array, a dict: the node may reuse it) is taken as
        its text, as the CSV holds it.

        Raises:
            TypeError: *data* is not a dict, a Series or a DataFrame.
            ValueError: it has a ``timestamp_ns`` column, other columns than
                the first rows, or a str (a name or a cell) UTF-8 cannot
                encode (a lone surrogate, which the writer could not write).
        """
        if isinstance(data, Mapping):  # one row; no pandas (its import takes ~0.3 s)
            columns, rows = [str(key) for key in data], [list(data.values())]
        elif _is_pandas(data, "DataFrame"):
            columns, rows = [str(c) for c in data.columns], data.to_numpy(dtype=object).tolist()
        elif _is_pandas(data, "Series"):
            columns, rows = [str(key) for key in data.index], [data.tolist()]
        else:
            raise TypeError(
                f"table {self.name!r}: rows are a DataFrame, a Series or a dict, "
                f"not {type(data).__name__}"
            )
        if "timestamp_ns" in columns:
            raise ValueError(f"table {self.name!r}: 'timestamp_ns' is the column chimera adds")
        if self._columns is None:
            for column in columns:
                _check_utf8(column, f"table {self.name!r}: the column name {column!r}")
            self._columns = columns
        elif columns != self._columns:
            raise ValueError(
                f"table {self.name!r}: rows with columns {columns}, the first had {self._columns}"
            )
        rows = [
            [cell if isinstance(cell, _UNCHANGING_CELLS) else str(cell) for cell in row]
            for row in rows
        ]
        for row in rows:
            for column, cell in zip(columns, row, strict=True):
                if isinstance(cell, str) and not cell.isascii():  # (ASCII is UTF-8)
                    _check_utf8(cell, f"table {self.name!r}: column {column!r}")
        return rows

    def open(self) -> None:
        assert self._columns is not None  # (the first rows', prepared before open)
        self._file = _AppendFile(self.folder / f"{self.name}.csv", ["timestamp_ns", *self._columns])

    def write(self, rows: list[list[Any]], stamp: int) -> None:
        self._file.csv.writerows([stamp, *row] for row in rows)
        self.info.samples += len(rows)


class _LinesWriter(_Writer):
    """JSON values, or texts: appended as they come, each stamped."""

    buffered = True

    def __init__(self, folder: Path, name: str, suffix: str = "jsonl") -> None:
        self.suffix = f".{check_name(suffix, 'suffix')}"
        super().__init__(folder, name)

    def open(self) -> None:
        self._file = _AppendFile(self.folder / f"{self.name}{self.suffix}")
        self._open_stamps()

    def write(self, text: str, stamp: int) -> None:
        self._stamp(self.info.count, stamp)
        self._file.add(text)


class _JsonWriter(_LinesWriter):
    kind = "json"

    def __init__(self, folder: Path, name: str) -> None:
        super().__init__(folder, name, "jsonl")

    def prepare(self, data: Any, **params: Any) -> str:
        try:
            return json.dumps(data, allow_nan=False, default=_not_json) + "\n"
        except (TypeError, ValueError) as exc:
            raise ValueError(f"json {self.name!r}: {exc}") from None


def _not_json(value: Any) -> Any:
    """json.dumps's *default*: raise TypeError naming *value*'s type, and what
    to do with a numpy value (the commonest)."""
    kind = type(value)
    raise TypeError(f"a value of type {kind.__name__} is not JSON{numpy_hint(kind)}")


class _TextWriter(_LinesWriter):
    kind = "text"

    def __init__(self, folder: Path, name: str, suffix: str = "txt") -> None:
        super().__init__(folder, name, suffix)

    def prepare(self, data: Any, **params: Any) -> str:
        """*data*, checked.

        Raises:
            TypeError: it is not a str.
            ValueError: UTF-8 cannot encode it (a lone surrogate, which the
                writer could not write).
        """
        if not isinstance(data, str):
            raise TypeError(f"text {self.name!r}: a str, not {type(data).__name__}")
        _check_utf8(data, f"text {self.name!r}")
        return data


_WRITERS: dict[str, Callable[..., _Writer]] = {
    "video": _VideoWriter,
    "audio": _AudioWriter,
    "image": _ImageWriter,
    "table": _TableWriter,
    "json": _JsonWriter,
    "text": _TextWriter,
}
