"""Records a node produces, :class:`DataChunk`, and their codec: chunks to frames and back.

A chunk travels as a list of frames. Frame 0 is a msgpack envelope; every numpy
buffer (an array, a table column) and every pickled object follows as a frame
of its own, so that arrays are not pickled, nor copied into the envelope
(encoding copies each writeable array once: see :func:`encode_chunk`)::

    {"version": 1,
     "records": [{"name": str, "type": content type, "timestamp": int ns,
                  "value": storage}, ...]}

where a *storage* is one of:

==========  ============================================================
kind        fields
==========  ============================================================
``inline``  ``value``: the value itself, in msgpack (``json`` records)
``array``   ``frame``: index of the frame holding the raw bytes (C order),
            ``dtype``: ``numpy.dtype.str`` (``"<f4"``), ``shape``: list
``scalar``  as ``array``, for a numpy scalar (shape ``[]``)
``table``   ``rows``: row count, ``columns``: list of ``{"name", "data"}``
            where ``data`` is an ``array`` or ``list`` storage, ``index``:
            ``null`` for the default ``RangeIndex`` or ``{"name", "data"}``
            where ``data`` is an ``array``, ``list`` or ``range`` storage
``list``    ``dtype``: ``"object"``, ``"str"`` or ``"string"``, ``values``:
            msgpack list (string and object columns of a table)
``range``   ``start``, ``stop``, ``step`` (a non-default ``RangeIndex``)
``pickle``  ``frame``: index of the frame holding ``cloudpickle`` bytes
==========  ============================================================

Every frame after the envelope is referenced exactly once. Decoding checks all
of this and raises :class:`DecodeError` on anything else; it unpickles only
when the caller allows objects.
"""

from __future__ import annotations

import contextvars
import math
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

import cloudpickle
import msgpack
import numpy

if TYPE_CHECKING:
    import pandas

__all__ = [
    "CONTENT_TYPES",
    "DataChunk",
    "DecodeError",
    "cluster_time_ns",
    "decode_chunk",
    "encode_chunk",
    "set_clock",
    "use_clock",
]

#: The version of the envelope this module writes and reads.
VERSION = 1

#: The content types a record may have (``DataChunk.add``'s *content_type*).
ContentType = Literal["image", "audio", "array", "table", "json", "object", "other"]
CONTENT_TYPES = frozenset(get_args(ContentType))

#: Deepest nesting of lists and dicts a ``json`` value may have.
MAX_JSON_DEPTH = 100

#: Most dimensions an encoded array may have (numpy's own limit).
MAX_DIMS = 64

#: numpy dtype kinds whose buffers travel raw: bool, integers, floats, complex,
#: timedelta, datetime, bytes and unicode strings (not objects, not structured).
_RAW_KINDS = frozenset("biufcmMSU")
_NUMERIC_KINDS = frozenset("iufc")
_ARRAY_KINDS = frozenset("biufc")

#: What ``numpy.dtype(...).str`` looks like for the raw kinds; checked before
#: numpy parses a dtype from the wire (some strings numpy parses with a warning).
_DTYPE_PATTERN = re.compile(r"[<>|][biufcmMSU][0-9]{1,9}(\[[0-9]{0,9}[A-Za-z]{1,2}\])?")
#: The dtypes decoding has allowed already, by their text (parsing one costs
#: more than the rest of a small chunk's decoding); at most this many.
_ALLOWED_DTYPES: dict[str, numpy.dtype] = {}
_MAX_ALLOWED_DTYPES = 1024
#: A field that is not there.
_MISSING = object()

#: The dtypes of table columns that travel inline, as msgpack lists.
_LIST_DTYPES = frozenset({"object", "str", "string"})

Frame = bytes | memoryview


class DecodeError(ValueError):
    """Frames that are not a valid encoded :class:`DataChunk`."""


# --- the clock -------------------------------------------------------------------

_clock: Callable[[], int] = time.time_ns
#: The clock of the Worker whose tasks and node threads run in this context
#: (see :func:`use_clock`); None: the process's, :data:`_clock`.
_context_clock: contextvars.ContextVar[Callable[[], int] | None] = contextvars.ContextVar(
    "chimera_cluster_clock", default=None
)


def set_clock(fn: Callable[[], int] | None) -> None:
    """Use *fn* (no arguments, returns cluster time in ns) to stamp new records
    in this process (a node's process: its Worker's offset-corrected clock).

    ``None`` restores the default, :func:`time.time_ns`.
    """
    global _clock
    _clock = time.time_ns if fn is None else fn


def use_clock(fn: Callable[[], int]) -> None:
    """Use *fn* as :func:`set_clock` does, but only in the current context: this
    Trio task, the tasks it starts from now on, and the node threads they
    start. A Worker plugs in its clock so: the nodes it runs inline (the
    ``memory`` transport) follow it, whatever other Workers share the process.
    """
    _context_clock.set(fn)


def cluster_time_ns() -> int:
    """Cluster time now, in ns: the Manager's wall clock as this process estimates it.

    Records are stamped with it when they are added to a :class:`DataChunk`,
    so a node measures a chunk's age, or stamps events of its own, with it.
    Outside a cluster (and until a Worker knows its offset) it is
    :func:`time.time_ns`.
    """
    clock = _context_clock.get()
    return int(clock() if clock is not None else _clock())


# --- validation ------------------------------------------------------------------


def _check_json(value: Any, where: str = "value", depth: int = 0) -> None:
    """Raise TypeError or ValueError unless msgpack round-trips *value* exactly.

    Exact types only: None, bool, int (64-bit), float, str, bytes, list, dict
    with scalar keys. A tuple, a subclass (``numpy.float64``) or a bytearray
    would come back as another type, so they are refused.
    """
    kind = type(value)
    if value is None or kind in (bool, float, bytes):
        return
    if kind is str:
        _check_utf8(value, where)
        return
    if kind is int:
        if not -(2**63) <= value < 2**64:
            raise ValueError(f"{where} is an integer out of the 64-bit range msgpack can encode")
        return
    if kind not in (list, dict):
        name = kind.__qualname__ if kind.__module__ == "builtins" else str(kind)[8:-2]
        raise TypeError(
            f"{where} is of type {name}; only None, bool, int, float, str, bytes, list and "
            f"dict are sent as they are{numpy_hint(kind)}"
        )
    if depth >= MAX_JSON_DEPTH:
        raise ValueError(f"{where} nests lists and dicts deeper than {MAX_JSON_DEPTH} levels")
    if kind is list:
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]", depth + 1)
    else:
        for key, item in value.items():
            if type(key) in (list, dict):
                raise TypeError(f"{where} has a key that is a {type(key).__name__}")
            _check_json(key, f"key {key!r} of {where}", depth + 1)
            _check_json(item, f"{where}[{key!r}]", depth + 1)


def numpy_hint(kind: type) -> str:
    """What to do with a value of type *kind* where plain Python values are
    asked for, if it is numpy's (the commonest case); else ``""``."""
    return (
        " (a numpy value: .item(), or .tolist() for an array)" if kind.__module__ == "numpy" else ""
    )


def _check_utf8(text: str, where: str) -> None:
    """Raise ValueError unless *text* can be encoded as UTF-8 (no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{where} is a str with {text[exc.start : exc.end]!r} at {exc.start}, "
            "which UTF-8 cannot encode (a lone surrogate)"
        ) from None


def _is_json(value: Any) -> bool:
    try:
        _check_json(value)
    except (TypeError, ValueError):
        return False
    return True


def _pandas() -> Any:
    """pandas, imported on first use: it costs ~0.25 s and ~40 MB, and most nodes never need it."""
    import pandas

    return pandas


def _is_dataframe(value: Any) -> bool:
    # A DataFrame exists only once pandas is imported.
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(value, pandas.DataFrame)


def _require_array(value: Any, content_type: str) -> numpy.ndarray:
    if type(value) is not numpy.ndarray:
        if isinstance(value, numpy.ndarray):  # what makes it one (a mask...) would not travel
            raise TypeError(
                f"{content_type} records hold plain numpy arrays, not a "
                f"{type(value).__name__}: pass numpy.asarray(value) if its data is all it needs"
            )
        raise TypeError(f"{content_type} records hold numpy arrays, not {type(value).__name__}")
    return value


def _check_frame_dtype(dtype: Any, where: str) -> None:
    """Raise ValueError unless a table column or index of *dtype* can be encoded."""
    if isinstance(dtype, numpy.dtype):
        if dtype.kind in _RAW_KINDS or dtype.kind == "O":
            return
    elif isinstance(dtype, _pandas().StringDtype):
        return
    raise ValueError(
        f"{where} has dtype {dtype}: tables hold numeric, bool, string, object, "
        "datetime64 and timedelta64 columns"
    )


def _check_table(value: Any) -> None:
    if not _is_dataframe(value):
        raise TypeError(f"table records hold pandas DataFrames, not {type(value).__name__}")
    pandas = _pandas()
    if isinstance(value.columns, pandas.MultiIndex) or isinstance(value.index, pandas.MultiIndex):
        raise ValueError("table records cannot hold a DataFrame with a MultiIndex")
    for name in value.columns:
        _check_json(name, f"column name {name!r}")
        if type(name) in (list, dict):
            raise TypeError(f"column name {name!r} is not a scalar")
    for position, dtype in enumerate(value.dtypes):
        where = f"column {value.columns[position]!r}"
        _check_frame_dtype(dtype, where)
        if dtype == numpy.dtype(object):
            _check_object_column(value.iloc[:, position].tolist(), where)
    _check_json(value.index.name, "the index name")
    _check_json(value.columns.name, "the columns' name")
    if not isinstance(value.index, pandas.RangeIndex):
        _check_frame_dtype(value.index.dtype, "the index")
        if value.index.dtype == numpy.dtype(object):
            _check_object_column(value.index.tolist(), "the index")


def _check_object_column(items: list[Any], where: str) -> None:
    """Raise TypeError or ValueError unless a table's object column of *items*
    can travel (as a msgpack list)."""
    try:
        _check_json(items, where)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{exc} (object columns travel as msgpack lists)") from None


def _check_value(value: Any, content_type: str) -> None:
    """Raise TypeError or ValueError unless *value* fits *content_type*."""
    if content_type == "image":
        array = _require_array(value, "image")
        if array.dtype != numpy.uint8:
            raise TypeError(f"image records hold uint8 arrays, not {array.dtype}")
        if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))):
            raise ValueError(
                f"image records hold HxW, HxWx1, HxWx3 or HxWx4 arrays, not shape {array.shape}"
            )
    elif content_type == "audio":
        array = _require_array(value, "audio")
        if array.dtype.kind not in _NUMERIC_KINDS:
            raise TypeError(f"audio records hold numeric arrays, not {array.dtype}")
        if array.ndim not in (1, 2):
            raise ValueError(
                f"audio records hold 1-D or 2-D (frames x channels) arrays, not shape {array.shape}"
            )
    elif content_type == "array":
        array = _require_array(value, "array")
        if array.dtype.kind not in _ARRAY_KINDS:
            raise TypeError(f"array records hold numeric or bool arrays, not {array.dtype}")
    elif content_type == "table":
        _check_table(value)
    elif content_type == "json":
        _check_json(value)
    elif content_type not in CONTENT_TYPES:
        raise ValueError(
            f"unknown content type {content_type!r} (expected one of {sorted(CONTENT_TYPES)})"
        )


def _values_equal(a: Any, b: Any) -> bool:
    if isinstance(a, numpy.ndarray) or isinstance(b, numpy.ndarray):
        if type(a) is not type(b):  # (a masked array is not its data)
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        return bool(numpy.array_equal(a, b, equal_nan=a.dtype.kind in "fcmM"))
    if _is_dataframe(a) or _is_dataframe(b):
        if not (_is_dataframe(a) and _is_dataframe(b)):
            return False
        return (
            bool(a.equals(b))
            and a.index.names == b.index.names
            and a.columns.names == b.columns.names
        )
    if _is_nan(a) and _is_nan(b):
        return True
    try:
        return bool(a == b)
    except Exception:
        return a is b


# --- DataChunk -------------------------------------------------------------------


class DataChunk:
    """Named records, each ``{"value": ..., "content-type": ..., "timestamp": ns}``.

    What a node's ``step`` returns and receives (ChimeraPy's ``DataChunk``).
    Timestamps are cluster time in ns, taken from the clock :func:`set_clock`
    installs when a record is added.
    """

    def __init__(self) -> None:
        self._records: dict[str, dict[str, Any]] = {}

    def add(self, name: str, value: Any, content_type: ContentType = "other") -> None:
        """Store *value* as record *name*, stamped with the current cluster time.

        Replaces a record of the same name. ``"other"`` accepts anything; the
        codec then decides how it travels (see :func:`encode_chunk`).

        Raises:
            TypeError: *name* is not a str, or *value* is not of a type
                *content_type* holds (an image that is not a uint8 array...).
            ValueError: *content_type* is unknown, or *value* is of the right
                type but not fit for it (an image of shape HxWx2...).
        """
        self._store(name, value, content_type, cluster_time_ns())

    def update(self, name: str, record: Mapping[str, Any]) -> None:
        """Set record *name* to *record* (keys ``value``, ``content-type``, ``timestamp``).

        A missing ``timestamp`` is filled with the current cluster time.

        Raises:
            TypeError: *name* is not a str, *record* is not a mapping, its
                timestamp is not an int, or its value is not of a type its
                content type holds.
            ValueError: *record* lacks ``value`` or ``content-type``, has other
                keys, or its content type is unknown or does not fit the value.
        """
        if not isinstance(record, Mapping):
            raise TypeError(f"a record is a dict, not {type(record).__name__}")
        missing = [key for key in ("value", "content-type") if key not in record]
        if missing:
            raise ValueError(f"record {name!r} lacks {' and '.join(map(repr, missing))}")
        extra = set(record) - {"value", "content-type", "timestamp"}
        if extra:
            raise ValueError(f"record {name!r} has unknown keys {sorted(map(str, extra))}")
        timestamp = record.get("timestamp")
        if timestamp is None:
            timestamp = cluster_time_ns()
        elif type(timestamp) is not int:
            raise TypeError(f"a timestamp is an int (ns), not {type(timestamp).__name__}")
        elif not -(2**63) <= timestamp < 2**64:
            raise ValueError(f"timestamp {timestamp} is out of the 64-bit range a chunk holds")
        self._store(name, record["value"], record["content-type"], timestamp)

    def _store(self, name: str, value: Any, content_type: str, timestamp: int) -> None:
        if not isinstance(name, str):
            raise TypeError(f"a record name is a str, not {type(name).__name__}")
        _check_utf8(name, "the record name")
        if not isinstance(content_type, str):
            raise TypeError(f"a content type is a str, not {type(content_type).__name__}")
        _check_value(value, content_type)
        self._records[name] = {"value": value, "content-type": content_type, "timestamp": timestamp}

    def get(self, name: str) -> dict[str, Any]:
        """Record *name*: a new dict with keys ``value``, ``content-type``, ``timestamp``.

        Changing the dict does not change the chunk; use :meth:`update`.

        Raises:
            KeyError: there is no record *name*.
        """
        try:
            return dict(self._records[name])
        except KeyError:
            raise KeyError(f"no record named {name!r} in this DataChunk") from None

    def contains(self, name: str) -> bool:
        """Whether there is a record *name*."""
        return name in self._records

    def __contains__(self, name: object) -> bool:
        return name in self._records

    def names(self) -> list[str]:
        """The names of the records, in the order they were first added."""
        return list(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._records))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DataChunk):
            return NotImplemented
        if self._records.keys() != other._records.keys():
            return False
        for name, mine in self._records.items():
            theirs = other._records[name]
            if (
                mine["content-type"] != theirs["content-type"]
                or mine["timestamp"] != theirs["timestamp"]
                or not _values_equal(mine["value"], theirs["value"])
            ):
                return False
        return True

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __copy__(self) -> DataChunk:
        """A chunk of its own with the same records (their values shared, not copied)."""
        chunk = DataChunk()
        chunk._records = {name: dict(record) for name, record in self._records.items()}
        return chunk

    def __repr__(self) -> str:
        parts = []
        for name, record in self._records.items():
            value = record["value"]
            if isinstance(value, numpy.ndarray):
                summary = f"{value.dtype}{list(value.shape)}"
            elif _is_dataframe(value):
                summary = f"DataFrame[{value.shape[0]}x{value.shape[1]}]"
            else:
                summary = type(value).__name__
            parts.append(f"{name!r}: {record['content-type']} {summary}")
        return f"DataChunk({{{', '.join(parts)}}})"


# --- encoding --------------------------------------------------------------------


def _read_only(array: numpy.ndarray) -> bool:
    """Whether nothing can change *array*'s data without making an array
    writeable again: it and every array it views are read-only, down to
    memory of their own or ``bytes``."""
    base: object = array
    while isinstance(base, numpy.ndarray):
        if base.flags.writeable:
            return False
        base = base.base
    return base is None or type(base) is bytes


#: Arrays up to this many bytes are copied into ``bytes``, the quickest way;
#: larger ones into a numpy array, which numpy copies without holding the GIL.
SMALL_ARRAY = 64 * 1024


class _Encoder:
    """Builds the envelope of one chunk, collecting the frames it references."""

    def __init__(self, allow_objects: bool) -> None:
        self.allow_objects = allow_objects
        self.frames: list[Frame] = []

    def add_frame(self, frame: Frame) -> int:
        self.frames.append(frame)
        return len(self.frames)  # frame 0 is the envelope

    def array(self, array: numpy.ndarray, kind: str = "array") -> dict[str, Any]:
        # The node may change its array once its step has returned (a buffer it
        # reuses), and a receiver in the same process (the memory transport)
        # must not change what the others receive: the frame is a read-only
        # copy, unless the array is read-only itself.
        frame: Frame
        if array.flags.c_contiguous and _read_only(array):
            frame = self.view(array)
        elif array.nbytes <= SMALL_ARRAY:
            frame = array.tobytes()  # (C order; a 1 KB array's in ~0.2 µs)
        else:  # (numpy copies it without holding the GIL: the event loop goes on)
            copy = numpy.array(array, order="C")  # (ascontiguousarray makes 0-d 1-d)
            copy.flags.writeable = False
            frame = self.view(copy)
        return {
            "kind": kind,
            "frame": self.add_frame(frame),
            "dtype": array.dtype.str,
            "shape": list(array.shape),
        }

    @staticmethod
    def view(array: numpy.ndarray) -> memoryview:
        """The bytes of *array* (C-contiguous), without a copy."""
        # (type: ignore: an ndarray is a buffer, which numpy's hints say on Python 3.12+ only)
        try:
            return memoryview(array).cast("B")  # type: ignore[arg-type]
        except (TypeError, ValueError):  # memoryview refuses some dtypes (datetime64)
            # and casts of empty arrays: view them as bytes
            return memoryview(array.reshape(-1).view(numpy.uint8))  # type: ignore[arg-type]

    def pickle(self, name: str, value: Any) -> dict[str, Any]:
        if not self.allow_objects:
            raise ValueError(
                f"it needs pickling ({type(value).__name__}): objects travel "
                "only if the cluster allows them (Manager(..., allow_objects=True))"
            )
        try:
            data = cloudpickle.dumps(value)
        except Exception as exc:  # (PicklingError, a __reduce__ that raises, RecursionError...)
            raise ValueError(f"it cannot be pickled: {exc!r}") from exc
        return {"kind": "pickle", "frame": self.add_frame(data)}

    def column(self, where: str, values: pandas.Series | pandas.Index) -> dict[str, Any]:
        pandas = _pandas()
        dtype = values.dtype
        if isinstance(dtype, numpy.dtype) and dtype.kind in _RAW_KINDS:
            return self.array(values.to_numpy())
        if isinstance(dtype, pandas.StringDtype):
            name = "str" if _is_nan(dtype.na_value) else "string"
            items = [None if pandas.isna(item) else item for item in values.tolist()]
        elif dtype == numpy.dtype(object):  # (its items checked by _check_table)
            name = "object"
            items = values.tolist()
        else:
            raise ValueError(f"{where} has dtype {dtype}, which tables cannot hold")
        return {"kind": "list", "dtype": name, "values": items}

    def table(self, name: str, frame: pandas.DataFrame) -> dict[str, Any]:
        """The storage of *frame*, which :func:`_check_table` passed."""
        pandas = _pandas()
        columns = [
            {"name": column, "data": self.column(f"column {column!r}", frame.iloc[:, position])}
            for position, column in enumerate(frame.columns)
        ]
        index: dict[str, Any] | None
        frame_index = frame.index
        if isinstance(frame_index, pandas.RangeIndex):
            if (frame_index.start, frame_index.step) == (0, 1) and frame_index.name is None:
                index = None
            else:
                data = {
                    "kind": "range",
                    "start": frame_index.start,
                    "stop": frame_index.stop,
                    "step": frame_index.step,
                }
                index = {"name": frame_index.name, "data": data}
        else:
            index = {"name": frame_index.name, "data": self.column("the index", frame_index)}
        table = {"kind": "table", "rows": len(frame), "columns": columns, "index": index}
        if frame.columns.name is not None:
            table["columns_name"] = frame.columns.name
        return table

    def value(self, name: str, value: Any, content_type: str) -> dict[str, Any]:
        if content_type in ("image", "audio", "array"):
            return self.array(value)
        if content_type == "table":
            _check_table(value)  # again: it may have changed since it was added
            return self.table(name, value)
        if content_type == "json":
            _check_json(value)  # again: it may have changed since it was added
            return {"kind": "inline", "value": value}
        if content_type == "object":
            return self.pickle(name, value)
        # "other": whatever fits best
        if type(value) is numpy.ndarray and value.dtype.kind in _RAW_KINDS:
            return self.array(value)
        if isinstance(value, numpy.generic) and value.dtype.kind in _RAW_KINDS:
            return self.array(numpy.asarray(value), kind="scalar")
        if _is_dataframe(value):
            try:
                _check_table(value)
            except (TypeError, ValueError):
                return self.pickle(name, value)
            return self.table(name, value)
        if _is_json(value):
            return {"kind": "inline", "value": value}
        return self.pickle(name, value)


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def encode_chunk(chunk: DataChunk, *, allow_objects: bool = False) -> list[bytes | memoryview]:
    """The frames of *chunk*: a msgpack envelope, then one frame per buffer.

    Arrays are copied, once each, so the caller may change an array as soon
    as this returns; their frames are byte views of the copies. A read-only
    array (and every array it views read-only, down to memory of its own or
    ``bytes``) is not copied: its frame is a view of it, and it must not be made
    writeable again while the frames are in use. ``other`` records travel as json
    if msgpack round-trips them exactly, as arrays if they are numpy arrays or
    scalars, as tables if they are DataFrames a table can hold, else pickled.

    Raises:
        ValueError: a record must be pickled (content type ``object``, or an
            ``other`` value that fits nothing else) and *allow_objects* is
            false, or it cannot be pickled; a ``table`` or ``json`` record
            holds what msgpack cannot encode (a value changed since it was
            added, say).
        TypeError: likewise, for a value of a type its record cannot hold.
        Each names its record.
    """
    encoder = _Encoder(allow_objects)
    records = []
    for name, record in chunk._records.items():
        content_type = record["content-type"]
        try:
            value = encoder.value(name, record["value"], content_type)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"record {name!r}: {exc}") from exc
        records.append(
            {"name": name, "type": content_type, "timestamp": record["timestamp"], "value": value}
        )
    envelope = _packer().pack({"version": VERSION, "records": records})
    return [envelope, *encoder.frames]


#: Each thread's msgpack packer: making one per chunk (what ``msgpack.packb``
#: does) costs as much as packing a small chunk's envelope. A packer starts
#: afresh after each ``pack``, and after one that raised.
_packers = threading.local()


def _packer() -> msgpack.Packer:
    try:
        return _packers.packer
    except AttributeError:
        _packers.packer = msgpack.Packer(use_bin_type=True)
        return _packers.packer


# --- decoding --------------------------------------------------------------------


class _Decoder:
    """Rebuilds the values of one envelope from its frames, checking everything."""

    def __init__(self, frames: Sequence[Frame], allow_objects: bool) -> None:
        self.frames = frames
        self.used: set[int] = set()
        self.allow_objects = allow_objects

    def frame(self, storage: dict[str, Any], where: str) -> memoryview:
        index = _field(storage, "frame", int, where)
        if not 1 <= index < len(self.frames):
            raise DecodeError(
                f"{where} refers to frame {index}, out of range (1..{len(self.frames) - 1})"
            )
        if index in self.used:
            raise DecodeError(f"{where} refers to frame {index}, already used by another value")
        self.used.add(index)
        try:
            view = memoryview(self.frames[index])
        except TypeError:
            raise DecodeError(f"frame {index} is not bytes-like") from None
        if not view.c_contiguous:
            raise DecodeError(f"frame {index} is not C-contiguous")
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        return view

    def array(self, storage: dict[str, Any], where: str) -> numpy.ndarray:
        dtype = _dtype(_field(storage, "dtype", str, where), where)
        shape = _field(storage, "shape", list, where)
        if len(shape) > MAX_DIMS or not all(type(n) is int and n >= 0 for n in shape):
            raise DecodeError(f"{where} has an invalid shape {shape!r}")
        view = self.frame(storage, where)
        count = math.prod(shape)
        if count * dtype.itemsize != view.nbytes:
            raise DecodeError(
                f"{where}: shape {shape} of {dtype} needs {count * dtype.itemsize} bytes, "
                f"its frame has {view.nbytes}"
            )
        try:
            return numpy.ndarray(shape, dtype, view)  # (one call: not frombuffer, then reshape)
        except (TypeError, ValueError) as exc:
            raise DecodeError(f"{where}: {exc}") from None

    def list_column(self, storage: dict[str, Any], where: str) -> pandas.Series:
        pandas = _pandas()
        dtype = _field(storage, "dtype", str, where)
        if dtype not in _LIST_DTYPES:
            raise DecodeError(f"{where} has list dtype {dtype!r} (one of {sorted(_LIST_DTYPES)})")
        values = _field(storage, "values", list, where)
        _check_inline(values, where)
        if dtype != "object" and not all(v is None or type(v) is str for v in values):
            raise DecodeError(f"{where} is a {dtype} column holding values that are not str")
        return pandas.Series(values, dtype=dtype)

    def column(self, storage: Any, where: str, rows: int, allowed: tuple[str, ...]) -> Any:
        pandas = _pandas()
        kind = _kind(storage, where, allowed)
        if kind == "array":
            values = self.array(storage, where)
            if values.ndim != 1:
                raise DecodeError(f"{where} is an array of {values.ndim} dimensions, not 1")
            if values.dtype.kind not in _RAW_KINDS:
                raise DecodeError(f"{where} has dtype {values.dtype}")
            result: Any = pandas.Series(values, copy=True)
        elif kind == "list":
            result = self.list_column(storage, where)
        else:  # range
            start, stop, step = (
                _field(storage, key, int, where) for key in ("start", "stop", "step")
            )
            if step == 0:
                raise DecodeError(f"{where} is a range of step 0")
            result = pandas.RangeIndex(start, stop, step)
        if len(result) != rows:
            raise DecodeError(f"{where} has {len(result)} rows, the table {rows}")
        return result

    def table(self, storage: dict[str, Any], where: str) -> pandas.DataFrame:
        pandas = _pandas()
        rows = _field(storage, "rows", int, where)
        if not 0 <= rows < 2**48:
            raise DecodeError(f"{where} has {rows} rows")
        names, columns = [], {}
        for position, column in enumerate(_field(storage, "columns", list, where)):
            here = f"{where}, column {position}"
            if not isinstance(column, dict):
                raise DecodeError(f"{here} is not a map")
            names.append(_scalar_name(_field(column, "name", object, here), f"{here} name"))
            columns[position] = self.column(
                _field(column, "data", dict, here), here, rows, ("array", "list")
            )
        frame = pandas.DataFrame(columns, index=pandas.RangeIndex(rows))
        frame.columns = pandas.Index(names) if names else pandas.RangeIndex(0)
        frame.columns.name = _scalar_name(storage.get("columns_name"), f"{where} columns' name")
        index = _field(storage, "index", (dict, type(None)), where)
        if index is not None:
            here = f"{where}, index"
            data = self.column(
                _field(index, "data", dict, here), here, rows, ("array", "list", "range")
            )
            name = _scalar_name(_field(index, "name", object, here), f"{here} name")
            if isinstance(data, pandas.RangeIndex):
                frame.index = data.rename(name)
            else:
                frame.index = pandas.Index(data, name=name)
        return frame

    def value(self, storage: Any, content_type: str, where: str) -> Any:
        allowed = {
            "image": ("array",),
            "audio": ("array",),
            "array": ("array",),
            "table": ("table",),
            "json": ("inline",),
            "object": ("pickle",),
            "other": ("inline", "array", "scalar", "table", "pickle"),
        }[content_type]
        kind = _kind(storage, where, allowed)
        if kind == "inline":
            value = _field(storage, "value", object, where)
            _check_inline(value, where)
            return value
        if kind == "array":
            return self.array(storage, where)
        if kind == "scalar":
            value = self.array(storage, where)
            if value.ndim != 0:
                raise DecodeError(f"{where} is a scalar of shape {value.shape}")
            return value[()]
        if kind == "table":
            return self.table(storage, where)
        # pickle
        if not self.allow_objects:
            raise DecodeError(
                f"{where} is a pickled object, and objects are not allowed (allow_objects=False)"
            )
        view = self.frame(storage, where)
        try:
            return cloudpickle.loads(view)
        except Exception as exc:
            raise DecodeError(f"{where}: unpickling failed: {exc!r}") from None


def _field(storage: dict[str, Any], key: str, kind: Any, where: str) -> Any:
    """``storage[key]``, checked to be of type *kind* (bool is not an int here)."""
    value = storage.get(key, _MISSING)
    if type(value) is kind:  # the common case, checked first: decoding is per chunk
        return value
    if value is _MISSING:
        raise DecodeError(f"{where} lacks {key!r}")
    if kind is not object:
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DecodeError(f"{where} has {key!r} of type {type(value).__name__}")
    return value


def _kind(storage: Any, where: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(storage, dict):
        raise DecodeError(f"{where} is stored as a {type(storage).__name__}, not a map")
    kind = storage.get("kind")
    if kind not in allowed:
        raise DecodeError(f"{where} is stored as {kind!r}, expected one of {list(allowed)}")
    return kind


def _dtype(text: str, where: str) -> numpy.dtype:
    dtype = _ALLOWED_DTYPES.get(text)
    if dtype is not None:
        return dtype
    if not _DTYPE_PATTERN.fullmatch(text):
        raise DecodeError(f"{where} has dtype {text!r}, which is not allowed")
    try:
        dtype = numpy.dtype(text)
    except Exception:
        raise DecodeError(f"{where} has dtype {text!r}, which numpy cannot parse") from None
    if dtype.kind not in _RAW_KINDS or dtype.str != text or dtype.itemsize == 0:
        raise DecodeError(f"{where} has dtype {text!r}, which is not allowed")
    if dtype.kind in "mM" and numpy.datetime_data(dtype)[1] == 0:  # ("M8[0s]": unusable)
        raise DecodeError(f"{where} has dtype {text!r}, a time unit of 0")
    if len(_ALLOWED_DTYPES) < _MAX_ALLOWED_DTYPES:
        _ALLOWED_DTYPES[text] = dtype
    return dtype


def _scalar_name(value: Any, where: str) -> Any:
    """*value*, the name of a table's column, columns or index; raises
    DecodeError unless it is a scalar msgpack round-trips."""
    _check_inline(value, where)
    if type(value) in (list, dict):
        raise DecodeError(f"{where} is not a scalar")
    return value


def _check_inline(value: Any, where: str) -> None:
    try:
        _check_json(value, where)
    except (TypeError, ValueError) as exc:
        raise DecodeError(str(exc)) from None


def decode_chunk(frames: Sequence[Frame], *, allow_objects: bool = False) -> DataChunk:
    """Rebuild the chunk :func:`encode_chunk` made *frames* from, with its timestamps.

    Arrays are not copied: each is a view of its frame, read-only when the
    frame is (``bytes``), and keeps the frame alive. Copy an array to change
    it. Table columns are copied (a DataFrame of read-only views breaks on
    assignment). Pickled records are unpickled only if *allow_objects* is true:
    unpickling runs code chosen by the sender.

    Raises:
        DecodeError: *frames* are not a valid encoding: frame 0 is not a
            msgpack envelope of this version, a record lacks a field or has
            one of the wrong type, a frame index is out of range or a frame is
            referenced twice or never, a dtype is not allowed (objects,
            structured, unparsable), a shape does not match its frame's size,
            a value does not fit its content type, or a record is a pickled
            object and *allow_objects* is false. Never any other exception.
    """
    try:
        return _decode(frames, allow_objects)
    except DecodeError:
        raise
    except Exception as exc:  # a check this module forgot: still a DecodeError
        raise DecodeError(f"malformed chunk: {exc!r}") from None


def _decode(frames: Sequence[Frame], allow_objects: bool) -> DataChunk:
    if len(frames) == 0:
        raise DecodeError("no frames: a chunk has at least its envelope")
    try:
        envelope = msgpack.unpackb(frames[0], strict_map_key=False)  # (raw=False: the default)
    except Exception as exc:
        raise DecodeError(f"frame 0 is not a msgpack envelope: {exc}") from None
    if not isinstance(envelope, dict):
        raise DecodeError(f"the envelope is a {type(envelope).__name__}, not a map")
    version = _field(envelope, "version", int, "the envelope")
    if version != VERSION:
        raise DecodeError(f"envelope version {version}, this side reads version {VERSION}")
    chunk = _decode_arrays(envelope.get("records"), frames)
    if chunk is not None:
        return chunk
    decoder = _Decoder(frames, allow_objects)
    chunk = DataChunk()
    for position, record in enumerate(_field(envelope, "records", list, "the envelope")):
        where = f"record {position}"
        if not isinstance(record, dict):
            raise DecodeError(f"{where} is not a map")
        name = _field(record, "name", str, where)
        where = f"record {name!r}"
        if name in chunk._records:
            raise DecodeError(f"{where} appears twice")
        content_type = _field(record, "type", str, where)
        if content_type not in CONTENT_TYPES:
            raise DecodeError(f"{where} has unknown content type {content_type!r}")
        timestamp = _field(record, "timestamp", int, where)
        value = decoder.value(_field(record, "value", object, where), content_type, where)
        try:
            _check_value(value, content_type)
        except (TypeError, ValueError) as exc:
            raise DecodeError(f"{where}: {exc}") from None
        chunk._records[name] = {
            "value": value,
            "content-type": content_type,
            "timestamp": timestamp,
        }
    if len(decoder.used) != len(frames) - 1:  # each frame used once: some are not
        unused = sorted(set(range(1, len(frames))) - decoder.used)
        raise DecodeError(f"frames {unused} are not referenced by the envelope")
    return chunk


#: Content types whose records may take the quick path of :func:`_decode_arrays`.
_ARRAY_CONTENT_TYPES = frozenset({"image", "audio", "array", "other"})


def _decode_arrays(records: Any, frames: Sequence[Frame]) -> DataChunk | None:
    """The chunk, if every record is an array exactly as :func:`encode_chunk`
    writes it (the usual sensor chunk); else None, and the checking path
    decodes the chunk or says what is wrong with it.

    It accepts only what that path would accept, unchanged, and checks it at
    the cost of a few lookups: frames referenced in order, each once; dtypes
    that path allowed before; no names or content types out of place.
    """
    if type(records) is not list:
        return None
    chunk = DataChunk()
    stored = chunk._records
    index = 0
    for record in records:
        if type(record) is not dict:
            return None
        name, content_type = record.get("name"), record.get("type")
        timestamp, value = record.get("timestamp"), record.get("value")
        if (
            type(name) is not str
            or name in stored
            or type(timestamp) is not int
            or type(content_type) is not str
            or content_type not in _ARRAY_CONTENT_TYPES
            or type(value) is not dict
            or value.get("kind") != "array"
        ):
            return None
        index += 1
        frame, text, shape = value.get("frame"), value.get("dtype"), value.get("shape")
        if type(frame) is not int or frame != index or index >= len(frames):
            return None
        if type(text) is not str:
            return None
        dtype = _ALLOWED_DTYPES.get(text)
        if dtype is None or type(shape) is not list or len(shape) > MAX_DIMS:
            return None
        count = 1
        for size in shape:
            if type(size) is not int or size < 0:
                return None
            count *= size
        view = frames[index]
        if (
            type(view) is not memoryview
            or view.ndim != 1
            or view.format != "B"
            or not view.c_contiguous
            or view.nbytes != count * dtype.itemsize
        ):
            return None
        try:
            array: numpy.ndarray = numpy.ndarray(shape, dtype, view)  # (as the checking path does)
            _check_value(array, content_type)
        except (TypeError, ValueError):
            return None
        stored[name] = {"value": array, "content-type": content_type, "timestamp": timestamp}
    if index != len(frames) - 1:
        return None
    return chunk
