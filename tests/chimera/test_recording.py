"""What nodes save: every writer round-trips through its standard reader."""

from __future__ import annotations

import csv
import errno
import itertools
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import zipfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import trio

import chimera as cp
from chimera._recording import _WRITERS, Recorder, check_name

from .nodes import Recording, RecordingWithSetup
from .records import on_record
from .test_process import cluster, notifications


def stamps(path):
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    return [int(row["index"]) for row in rows], [int(row["timestamp_ns"]) for row in rows]


def increasing(values):
    return all(a <= b for a, b in itertools.pairwise(values))


def test_video_frames_come_back_from_the_mp4_with_their_timestamps(tmp_path):
    import av

    recorder = Recorder(tmp_path)
    frame = np.empty((120, 160, 3), dtype=np.uint8)
    for i in range(45):  # (into one buffer, as a camera library fills it: saved as it was)
        frame[:] = i * 5
        recorder.save("video", "camera", frame, fps=30)
    (info,) = recorder.close()
    with av.open(str(tmp_path / "camera.mp4")) as container:
        frames = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    assert len(frames) == 45 and frames[0].shape == (120, 160, 3)
    # The content, through H.264 (BGR -> YUV 4:2:0 -> BGR shifts grays a little).
    assert [round(frames[i].mean() / 50) for i in (0, 10, 20, 40)] == [0, 1, 2, 4]
    index, times = stamps(tmp_path / "camera.timestamps.csv")
    assert index == list(range(45)) and increasing(times)
    assert (info.kind, info.path, info.count) == ("video", "camera.mp4", 45)
    assert (info.first_ns, info.last_ns) == (times[0], times[-1])


@pytest.mark.parametrize("save", ["first", "next"])
def test_a_save_is_stamped_with_the_time_of_the_call(tmp_path, monkeypatch, save):
    # Not once its stream is set up (the first save of a video opens an encoder).
    from chimera._data import cluster_time_ns

    prepare = _WRITERS["video"].prepare

    def slow_prepare(self, *args, **kwargs):
        threading.Event().wait(0.5)
        return prepare(self, *args, **kwargs)

    recorder = Recorder(tmp_path)
    frame = np.zeros((120, 160, 3), dtype=np.uint8)
    if save == "next":
        recorder.save("video", "camera", frame, fps=30)
    monkeypatch.setattr(_WRITERS["video"], "prepare", slow_prepare)
    called = cluster_time_ns()
    recorder.save("video", "camera", frame, fps=30)
    recorder.close()
    _, times = stamps(tmp_path / "camera.timestamps.csv")
    assert times[-1] - called < 0.5e9


def test_a_video_frame_of_another_size_is_an_error_naming_both(tmp_path):
    recorder = Recorder(tmp_path)
    recorder.save("video", "camera", np.zeros((120, 160, 3), np.uint8), fps=30)
    with pytest.raises(ValueError, match="a frame of 320x240, the first was 160x120"):
        recorder.save("video", "camera", np.zeros((240, 320, 3), np.uint8), fps=30)
    with pytest.raises(ValueError, match="even width and height, not 161x120"):
        recorder.save("video", "odd", np.zeros((120, 161, 3), np.uint8), fps=30)
    with pytest.raises(ValueError, match="fps"):
        recorder.save("video", "nofps", np.zeros((120, 160, 3), np.uint8), fps=0)
    recorder.close()


def test_frames_of_other_numbers_in_0_255_are_taken_as_chimerapy_took_them(tmp_path):
    import av
    import cv2

    recorder = Recorder(tmp_path)
    for i in range(10):  # floats, as np.random.rand(h, w, 3) * 255 makes them
        recorder.save("video", "camera", np.full((120, 160, 3), 200.7), fps=30)
        recorder.save("image", "still", np.full((40, 60), i * 20, dtype=np.int64))
    with pytest.raises(ValueError, match=r"float64 values from -1.0 to 300.0; uint8 frames"):
        recorder.save(
            "video", "camera", np.linspace(-1, 300, 120 * 160 * 3).reshape(120, 160, 3), fps=30
        )
    with pytest.raises(ValueError, match="values from nan"):
        recorder.save("image", "still", np.full((40, 60), np.nan))
    recorder.close()
    with av.open(str(tmp_path / "camera.mp4")) as container:
        frames = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    assert len(frames) == 10 and abs(frames[0].mean() - 200) < 3
    image = cv2.imread(str(tmp_path / "still" / "000009.png"), cv2.IMREAD_UNCHANGED)
    assert image.dtype == np.uint8 and (image == 180).all()


def test_audio_samples_that_do_not_fit_the_format_are_refused_not_rounded_to_silence(tmp_path):
    import soundfile

    recorder = Recorder(tmp_path)
    floats = np.random.default_rng(0).uniform(-1, 1, 1024)
    with pytest.raises(ValueError, match="float64 samples for a format of int16 samples"):
        recorder.save("audio", "mic", floats, channels=2, format=8, rate=44100)  # paInt16
    with pytest.raises(ValueError, match="int32 samples out of the format's int16 range"):
        recorder.save("audio", "mic", np.full(4, 40_000, np.int32), channels=2, format=8, rate=8000)
    # What fits is taken: int32 samples in int16's range, float64 for paFloat32.
    recorder.save("audio", "mic", np.arange(-4, 4, dtype=np.int32), channels=2, format=8, rate=8000)
    recorder.save("audio", "float", floats, channels=2, format=1, rate=44100)  # paFloat32
    recorder.close()
    assert soundfile.read(tmp_path / "mic.wav", dtype="int16")[0].ravel().tolist() == list(
        range(-4, 4)
    )
    assert np.allclose(soundfile.read(tmp_path / "float.wav")[0].ravel(), floats, atol=1e-6)


@pytest.mark.parametrize(
    ("fmt", "dtype", "subtype"),
    [(8, np.int16, "PCM_16"), (1, np.float32, "FLOAT"), (None, np.int32, "PCM_32")],
)
def test_audio_blocks_come_back_from_the_wav(tmp_path, fmt, dtype, subtype):
    import soundfile

    rng = np.random.default_rng(0)
    scale = 1000 if np.issubdtype(dtype, np.integer) else 0.5
    blocks = [(rng.standard_normal((480, 2)) * scale).astype(dtype) for _ in range(50)]
    recorder = Recorder(tmp_path)
    for block in blocks:
        recorder.save("audio", "mic", block, channels=2, format=fmt, rate=48000)
    (info,) = recorder.close()
    samples, rate = soundfile.read(tmp_path / "mic.wav", dtype=dtype)
    assert rate == 48000 and soundfile.info(tmp_path / "mic.wav").subtype == subtype
    assert np.array_equal(samples, np.concatenate(blocks))
    index, times = stamps(tmp_path / "mic.timestamps.csv")
    assert index == [480 * i for i in range(50)] and increasing(times)
    assert (info.count, info.samples) == (50, 24000)


def test_audio_as_pyaudio_bytes_is_taken_with_its_format(tmp_path):
    import soundfile

    recorder = Recorder(tmp_path)
    block = np.arange(960, dtype=np.int16)
    recorder.save("audio", "mic", block.tobytes(), channels=2, format=8, rate=16000)
    recorder.close()
    samples, _ = soundfile.read(tmp_path / "mic.wav", dtype="int16")
    assert np.array_equal(samples, block.reshape(-1, 2))
    with pytest.raises(ValueError, match="paInt16"):
        Recorder(tmp_path / "x").save("audio", "mic", block, channels=2, format=3, rate=16000)


@pytest.mark.parametrize(
    ("format", "samples"),
    [
        (16, np.array([-128, -1, 0, 1, 127], np.int8)),  # paInt8, as PyAudio's bytes
        (32, np.array([0, 127, 128, 129, 255], np.uint8)),  # paUInt8, as PyAudio's bytes
        (None, np.array([-128, -1, 0, 1, 127], np.int8)),  # an int8 array
    ],
    ids=["paInt8", "paUInt8", "int8"],
)
def test_8_bit_audio_is_saved_as_a_wav_files_unsigned_8_bit_samples(tmp_path, format, samples):
    import soundfile

    recorder = Recorder(tmp_path)
    data = samples if format is None else samples.tobytes()
    recorder.save("audio", "mic", data, channels=1, format=format, rate=8000)
    recorder.close()
    info = soundfile.info(tmp_path / "mic.wav")
    assert (info.subtype, info.frames) == ("PCM_U8", 5)
    read, _ = soundfile.read(tmp_path / "mic.wav", dtype="int16")  # (8-bit samples, scaled)
    signed = samples.astype(np.int16) - (128 if samples.dtype == np.uint8 else 0)
    assert read.tolist() == (signed * 256).tolist()


def test_images_come_back_from_their_pngs(tmp_path):
    import cv2

    recorder = Recorder(tmp_path)
    images = [np.full((40, 60, 3), 10 * i, np.uint8) for i in range(12)]
    for image in images:
        recorder.save("image", "snapshots", image)
    recorder.close()
    files = sorted((tmp_path / "snapshots").iterdir())
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(12)]
    for file, image in zip(files, images, strict=True):
        assert np.array_equal(cv2.imread(str(file)), image)
    index, times = stamps(tmp_path / "snapshots.timestamps.csv")
    assert index == list(range(12)) and increasing(times)


def test_table_rows_come_back_from_the_csv_with_a_timestamp_column(tmp_path):
    recorder = Recorder(tmp_path)
    recorder.save("table", "sensor", {"x": 1.5, "label": "a"})
    recorder.save("table", "sensor", pd.Series({"x": 2.5, "label": "b"}))
    recorder.save("table", "sensor", pd.DataFrame({"x": [3.5, 4.5], "label": ["c", "d"]}))
    with pytest.raises(ValueError, match=r"columns \['y'\], the first had \['x', 'label'\]"):
        recorder.save("table", "sensor", {"y": 1})
    (info,) = recorder.close()
    table = pd.read_csv(tmp_path / "sensor.csv")
    assert list(table.columns) == ["timestamp_ns", "x", "label"]
    assert table["x"].tolist() == [1.5, 2.5, 3.5, 4.5]
    assert table["label"].tolist() == ["a", "b", "c", "d"]
    assert increasing(table["timestamp_ns"].tolist())
    assert (info.count, info.samples) == (3, 4)


def test_a_table_row_holds_what_its_cells_were_at_the_call(tmp_path):
    # A node that reuses an array, a list and a dict as cells, changing them
    # before each save (as a pose tracker filling one buffer).
    joints, tags, pose = np.zeros(3), [], {}
    recorder = Recorder(tmp_path)
    saved = []
    for i in range(200):
        joints[:] = i
        tags[:] = [i]
        pose["i"] = i
        saved.append([str(joints), str(tags), str(pose)])
        row = {"joints": joints, "tags": tags, "pose": pose}
        recorder.save(
            "table", "pose", row if i % 2 else pd.DataFrame({k: [v] for k, v in row.items()})
        )
    recorder.close()
    table = pd.read_csv(tmp_path / "pose.csv")
    assert table[["joints", "tags", "pose"]].to_numpy().tolist() == saved


def test_json_values_and_text_come_back_line_by_line(tmp_path):
    recorder = Recorder(tmp_path)
    values = [{"event": "start", "n": 1}, [1, 2, 3], "plain", None]
    for value in values:
        recorder.save("json", "events", value)
    recorder.save("text", "notes", "first line\n", suffix="md")
    recorder.save("text", "notes", "second line\n", suffix="md")
    with pytest.raises(ValueError, match=r"NaN|Out of range"):
        recorder.save("json", "events", float("nan"))
    with pytest.raises(ValueError) as caught:
        recorder.save("json", "events", {"gain": np.float32(2)})
    assert str(caught.value) == (
        "json 'events': a value of type float32 is not JSON (a numpy value: .item(), or "
        ".tolist() for an array)"
    )
    recorder.close()
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == values
    assert (tmp_path / "notes.md").read_text() == "first line\nsecond line\n"
    assert stamps(tmp_path / "notes.timestamps.csv")[0] == [0, 1]


def test_whenever_a_line_of_text_is_on_disk_so_is_its_timestamp(tmp_path, monkeypatch):
    """Every time a file of the recording grows (a kill may come right after),
    each json value or text line in it already has its row in the timestamps."""
    from chimera import _recording

    seen: list[tuple[int, int]] = []  # (lines of data, rows of timestamps) after each write
    flush = _recording._AppendFile.flush

    def flush_and_look(self):
        flush(self)
        for name, data in (("events", "events.jsonl"), ("notes", "notes.txt")):
            timestamps = tmp_path / f"{name}.timestamps.csv"
            if (tmp_path / data).exists() and timestamps.exists():
                lines = (tmp_path / data).read_text().count("\n")
                seen.append((lines, len(stamps(timestamps)[0])))

    monkeypatch.setattr(_recording._AppendFile, "flush", flush_and_look)
    recorder = Recorder(tmp_path)
    for n in range(5):
        recorder.save("json", "events", {"n": n})
        recorder.save("text", "notes", f"line {n}\n")
    recorder.close()
    assert (5, 5) in seen  # (it looked at the files whole)
    assert all(lines <= rows for lines, rows in seen), seen


def test_a_str_utf8_cannot_encode_is_refused_at_the_call_and_what_came_before_is_kept(tmp_path):
    # A lone surrogate, as os.fsdecode makes of a file name that is not UTF-8.
    bad = "bad \udcff name"
    recorder = Recorder(tmp_path)
    for i in range(10):
        if i == 5:
            with pytest.raises(ValueError, match=r"text 'log' is a str with '\\udcff' at 4, wh"):
                recorder.save("text", "log", f"{bad}\n")
            with pytest.raises(
                ValueError, match=r"table 'tab': column 's' is a str with '\\udcff'"
            ):
                recorder.save("table", "tab", {"i": i, "s": bad})
            with pytest.raises(ValueError, match="UTF-8 cannot encode"):
                recorder.save("table", "tab", pd.DataFrame({"i": [i], "s": [bad]}))
            with pytest.raises(ValueError, match=r"name 'bad \\udcff name' is a str with"):
                recorder.save("text", bad, "x")
        recorder.save("text", "log", f"line {i}\n")
        recorder.save("table", "tab", {"i": i, "s": f"line {i}"})
    recorder.save("json", "events", bad)  # (the json module writes it as the ASCII \\udcff)
    counts = {info.name: info.count for info in recorder.close()}
    assert (tmp_path / "log.txt").read_text() == "".join(f"line {i}\n" for i in range(10))
    assert pd.read_csv(tmp_path / "tab.csv")["s"].tolist() == [f"line {i}" for i in range(10)]
    assert json.loads((tmp_path / "events.jsonl").read_text()) == bad
    assert counts == {"log": 10, "tab": 10, "events": 1}  # (what meta.json says)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "events.jsonl",
        "events.timestamps.csv",
        "log.timestamps.csv",
        "log.txt",
        "tab.csv",
    ]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../escape", "a\\b", "nul\0"])
def test_a_name_that_could_leave_the_nodes_folder_is_refused(tmp_path, name):
    with pytest.raises(ValueError, match="is not a valid file name"):
        Recorder(tmp_path / "node").save("json", name, 1)
    with pytest.raises(ValueError, match="is not a valid file name"):
        Recorder(tmp_path / "node").save("text", "notes", "x", suffix=name or ".")
    assert not any(tmp_path.rglob("*.jsonl"))


def test_a_stream_keeps_its_kind_and_a_closed_recorder_saves_nothing(tmp_path):
    recorder = Recorder(tmp_path)
    recorder.save("json", "data", 1)
    with pytest.raises(ValueError, match="already a json stream, not a table one"):
        recorder.save("table", "data", {"x": 1})
    recorder.close()
    with pytest.raises(RuntimeError, match="closed"):
        recorder.save("json", "data", 2)
    assert check_name("camera-1.left") == "camera-1.left"


def test_a_video_at_a_rate_that_is_not_a_whole_number_is_recorded_at_that_rate(tmp_path):
    import av

    recorder = Recorder(tmp_path)
    for _ in range(30):
        recorder.save("video", "ntsc", np.zeros((48, 64, 3), np.uint8), fps=29.97)
    recorder.close()
    with av.open(str(tmp_path / "ntsc.mp4")) as container:
        stream = container.streams.video[0]
        assert abs(float(stream.average_rate) - 29.97) < 0.01
        assert sum(1 for _ in container.decode(stream)) == 30


@pytest.mark.parametrize(
    ("kind", "first", "then", "problem"),
    [
        ("video", {"fps": 20}, {"fps": 5}, "fps=5 after fps=20"),
        (
            "audio",
            {"channels": 2, "format": 8, "rate": 48000},
            {"channels": 1, "format": 8, "rate": 48000},
            "channels=1 after channels=2",
        ),
        (
            "audio",
            {"channels": 1, "format": 8, "rate": 48000},
            {"channels": 1, "format": 8, "rate": 16000},
            "rate=16000 after rate=48000",
        ),
        ("text", {"suffix": "md"}, {"suffix": "txt"}, "suffix='txt' after suffix='md'"),
    ],
)
def test_a_stream_keeps_the_settings_of_its_first_save(tmp_path, kind, first, then, problem):
    data = {"video": np.zeros((48, 64, 3), np.uint8), "audio": np.zeros(1024, np.int16)}
    data["text"] = "x"
    recorder = Recorder(tmp_path)
    recorder.save(kind, "s", data[kind], **first)
    with pytest.raises(ValueError, match=re.escape(f"{kind} 's': {problem}: a stream keeps")):
        recorder.save(kind, "s", data[kind], **then)
    recorder.save(kind, "s", data[kind], **first)
    (info,) = recorder.close()
    assert info.count == 2


def test_a_stream_whose_first_save_is_refused_does_not_begin(tmp_path):
    recorder = Recorder(tmp_path)
    with pytest.raises(ValueError, match="even width and height"):
        recorder.save("video", "odd", np.zeros((5, 5, 3), np.uint8), fps=30)
    with pytest.raises(ValueError, match="not a whole number of 2-byte samples"):
        recorder.save("audio", "mic", b"\0\0\0", channels=1, format=8, rate=8000)
    recorder.save("json", "fine", 1)
    assert [info.name for info in recorder.close()] == ["fine"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fine.jsonl", "fine.timestamps.csv"]


PCM16 = {"channels": 1, "format": 8, "rate": 8000}  # (format 8: pyaudio's paInt16)


@pytest.mark.parametrize(
    ("saves", "error", "problem"),
    [
        (
            [
                ("audio", np.zeros(8, np.int16), {**PCM16, "format": None}),
                ("audio", np.zeros(8, np.float32), {**PCM16, "format": None}),
            ],
            ValueError,
            "float32 samples after int16 ones",
        ),
        ([("audio", np.array([-40_000], np.int32), PCM16)], ValueError, "out of the format's"),
        ([("audio", np.zeros(8, np.int16), {**PCM16, "channels": 0})], ValueError, "not 0"),
        ([("table", {"timestamp_ns": 1}, {})], ValueError, "'timestamp_ns' is the column"),
        ([("image", np.array([[-1, 3]], np.int16), {})], ValueError, "int16 values from -1 to 3"),
        ([("video", np.full((4, 4, 3), -1, np.int16), {"fps": 30})], ValueError, "from -1 to -1"),
        ([("video", np.zeros((4, 4, 3), np.uint8), {"fps": 1001})], ValueError, "not 1001"),
        ([("text", b"x", {})], TypeError, "a str, not bytes"),
    ],
    ids=[
        "audio-dtype",
        "audio-range",
        "audio-channels",
        "table-column",
        "image-negative",
        "video-negative",
        "video-fps",
        "text-bytes",
    ],
)
def test_a_save_that_does_not_fit_its_stream_is_refused_at_the_call(
    tmp_path, saves, error, problem
):
    recorder = Recorder(tmp_path)
    *fine, (kind, data, params) = saves
    for each_kind, each_data, each_params in fine:
        recorder.save(each_kind, "s", each_data, **each_params)
    with pytest.raises(error, match=re.escape(problem)):
        recorder.save(kind, "s", data, **params)
    assert [info.count for info in recorder.close()] == [1] * len(fine)


def test_a_save_after_its_writer_failed_raises_the_writers_error(tmp_path, monkeypatch):
    def no_room(self, data, stamp):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_WRITERS["text"], "write", no_room)
    failed = threading.Event()
    with on_record("chimera.recording", "the text writer of 'notes' failed", failed.set):
        recorder = Recorder(tmp_path)
        recorder.save("text", "notes", "first\n")
        assert failed.wait(10)  # (the writer's thread said so)
    problem = "the text writer of 'notes' failed: [Errno 28] No space left on device"
    with pytest.raises(OSError, match=re.escape(problem)):
        recorder.save("text", "notes", "second\n")
    recorder.save("json", "other", 1)  # (the other streams go on)
    with pytest.raises(OSError, match=re.escape(problem)):
        recorder.close()


@pytest.mark.parametrize("kind", ["video", "image"])
def test_an_empty_frame_is_refused_at_the_call(tmp_path, kind):
    recorder = Recorder(tmp_path)
    params = {"fps": 30} if kind == "video" else {}
    with pytest.raises(ValueError, match=r"non-empty uint8 .* not uint8 of shape \(0, 0\)"):
        recorder.save(kind, "v", np.zeros((0, 0), np.uint8), **params)
    assert recorder.close() == []


def test_two_streams_cannot_share_a_file(tmp_path):
    recorder = Recorder(tmp_path)
    recorder.save("video", "v", np.zeros((48, 64, 3), np.uint8), fps=30)
    taken = re.escape("its file 'v.timestamps.csv' is the 'v' stream's")
    with pytest.raises(ValueError, match=taken):
        recorder.save("table", "v.timestamps", {"x": 1})
    with pytest.raises(ValueError, match=re.escape("its file 'v.mp4' is the 'v' stream's")):
        recorder.save("image", "v.mp4", np.zeros((4, 4), np.uint8))
    recorder.close()
    index, _ = stamps(tmp_path / "v.timestamps.csv")
    assert index == [0]


def test_float_frames_in_0_1_are_said_to_be_black(tmp_path, caplog):
    recorder = Recorder(tmp_path)
    for _ in range(3):
        recorder.save("video", "v", np.full((48, 64, 3), 0.5), fps=30)
    recorder.close()
    said = [r.getMessage() for r in caplog.records if "[0, 1]" in r.getMessage()]
    assert said == [
        "video 'v': float values in [0, 1] are saved as 0 or 1 (black): scale them to [0, 255]"
    ]


def test_pyaudio_int24_audio_comes_back_as_its_24_bit_samples(tmp_path):
    import soundfile

    samples = np.array([-(1 << 23), -1, 0, 1, 12345, (1 << 23) - 1], dtype=np.int32)
    packed = b"".join(int(v).to_bytes(3, "little", signed=True) for v in samples)
    recorder = Recorder(tmp_path)
    recorder.save("audio", "packed", packed, channels=1, format=4, rate=8000)  # as PyAudio reads
    recorder.save("audio", "array", samples, channels=1, format=4, rate=8000)
    with pytest.raises(ValueError, match="out of paInt24's range"):
        recorder.save("audio", "array", samples * 2, channels=1, format=4, rate=8000)
    recorder.close()
    for name in ("packed", "array"):
        assert soundfile.info(tmp_path / f"{name}.wav").subtype == "PCM_24"
        read, _ = soundfile.read(tmp_path / f"{name}.wav", dtype="int32")
        assert (read.ravel() >> 8).tolist() == samples.tolist()


def test_a_media_timestamp_is_in_its_file_before_its_frame_is_written(tmp_path):
    # What a node killed at any moment leaves: a timestamp for every frame.
    from chimera._recording import _WRITERS

    writer = _WRITERS["video"](tmp_path, "v", fps=30)
    frame = writer.prepare(np.zeros((48, 64, 3), np.uint8))
    writer.open()
    writer.write(frame, 123)
    assert stamps(tmp_path / "v.timestamps.csv") == ([0], [123])
    writer.close()


@pytest.mark.parametrize(
    ("kind", "data", "file", "columns"),
    [
        ("table", {"x": 1}, "s.csv", ["timestamp_ns", "x"]),
        ("json", {"x": 1}, "s.timestamps.csv", ["index", "timestamp_ns"]),
        ("text", "x\n", "s.timestamps.csv", ["index", "timestamp_ns"]),
    ],
)
def test_a_csv_file_has_its_header_as_soon_as_its_stream_is_open(
    tmp_path, kind, data, file, columns
):
    # What a node killed before its stream's first flush leaves: a table of no
    # rows, which pandas reads (an empty file it cannot).
    from chimera._recording import _WRITERS

    writer = _WRITERS[kind](tmp_path, "s")
    item = writer.prepare(data)
    writer.open()
    writer.write(item, 123)
    table = pd.read_csv(tmp_path / file)
    assert list(table.columns) == columns and len(table) == 0
    writer.close()


# Writes a table and a text, flushing every 10 rows, past a file size limit
# (RLIMIT_FSIZE: a write that reaches it is short, the next fails with EFBIG,
# as on a full disk); prints the error the writer raises.
_FILL_UP_TO_THE_LIMIT = """
import resource, sys
from pathlib import Path
from chimera._recording import _WRITERS

resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, resource.RLIM_INFINITY))
writers = [_WRITERS["table"](Path(sys.argv[1]), "tab"), _WRITERS["text"](Path(sys.argv[1]), "tx")]
items = [{"i": 0, "pad": "p" * 100}, "q" * 100 + "\\n"]
for writer, item in zip(writers, items):
    writer.prepare(item)
    writer.open()
try:
    for i in range(200):
        for writer, item in zip(writers, items):
            writer.write(writer.prepare(item), i)
        if i % 10 == 9:
            for writer in writers:
                writer.flush()
except OSError as exc:
    print(type(exc).__name__, exc.errno)
"""


async def test_a_full_disk_leaves_whole_lines_and_is_an_error(tmp_path):
    with trio.fail_after(30):
        done = await trio.run_process(
            [sys.executable, "-c", _FILL_UP_TO_THE_LIMIT, str(tmp_path)], capture_stdout=True
        )
    assert done.stdout.decode().split() == ["OSError", str(errno.EFBIG)]
    table = pd.read_csv(tmp_path / "tab.csv")
    assert 50 <= len(table) < 200  # what fitted, every row whole
    assert table["timestamp_ns"].tolist() == list(range(len(table)))
    assert (table["pad"] == "p" * 100).all()
    lines = (tmp_path / "tx.txt").read_text().split("\n")
    assert lines[-1] == "" and set(lines[:-1]) == {"q" * 100} and len(lines) > 50


# Saves rows and texts through a Recorder past a file size limit (as on a
# full disk), its writers flushing every millisecond or so; prints what it
# counted (the manifest's streams) once its close raised the writer's error.
_COUNT_PAST_THE_LIMIT = """
import json, resource, sys, time
import chimera._recording as recording
from chimera._manifest import Manifest

recording.FLUSH_PERIOD = 0.001
resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, resource.RLIM_INFINITY))
recorder = recording.Recorder(sys.argv[1])
try:
    for i in range(300):
        recorder.save("table", "tab", {"i": i, "pad": "p" * 100})
        recorder.save("text", "tx", "q" * 100 + "\\n")
        if i % 10 == 9:
            time.sleep(0.003)  # (pacing: some flushes succeed before one fails)
except OSError:
    pass  # (a save after the writer failed says so)
try:
    recorder.close()
except OSError as exc:
    print(json.dumps(Manifest.read(recorder.folder).streams))
"""


async def streams_counted_past_the_limit(script: str, folder) -> dict[str, dict]:
    """Run *script* (saving in *folder* past a file size limit); the streams
    its manifest counted, by name."""
    done = await trio.run_process([sys.executable, "-c", script, str(folder)], capture_stdout=True)
    return {stream["stream"]: stream for stream in json.loads(done.stdout)}


async def test_a_full_disk_counts_only_what_its_files_hold(tmp_path):
    with trio.fail_after(30):
        streams = await streams_counted_past_the_limit(_COUNT_PAST_THE_LIMIT, tmp_path)
    rows = pd.read_csv(tmp_path / "tab.csv")
    assert streams["tab"]["count"] == len(rows)  # one row a save
    if len(rows):
        assert streams["tab"]["last_ns"] == rows["timestamp_ns"].iloc[-1]
    texts = (tmp_path / "tx.txt").read_text().count("\n")
    assert streams["tx"]["count"] == texts
    assert texts < 300 and len(rows) < 300


# Saves video frames (a keyframe, so a fragment, nearly every frame) and audio
# blocks through a Recorder past a file size limit (as on a full disk); prints
# what it counted (the manifest's streams) once its close raised the error.
_MEDIA_PAST_THE_LIMIT = """
import json, resource, sys, time
import numpy as np
import chimera._recording as recording
from chimera._manifest import Manifest

recording.FLUSH_PERIOD = 0.001
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
recorder = recording.Recorder(sys.argv[1])
noise = np.random.default_rng(0)
saves = {
    "cam": lambda i: ("video", noise.integers(0, 256, (120, 160), dtype=np.uint8), {"fps": 30}),
    "mic": lambda i: ("audio", np.full(4001, i, np.int16), {"channels": 1, "rate": 8000}),
}
for i in range(100):
    for name, make in list(saves.items()):
        kind, data, params = make(i)
        try:
            recorder.save(kind, name, data, **params)
        except OSError:
            del saves[name]  # (a save after the writer failed says so)
    time.sleep(0.002)  # (pacing: some are written before one fails)
try:
    recorder.close()
except OSError as exc:
    print(json.dumps(Manifest.read(recorder.folder).streams))
"""


async def test_a_full_disk_leaves_media_files_that_read_whole_and_are_counted(tmp_path):
    import av
    import soundfile

    with trio.fail_after(60):
        streams = await streams_counted_past_the_limit(_MEDIA_PAST_THE_LIMIT, tmp_path)
    # Every frame the file holds decodes (a fragment cut short raised InvalidDataError).
    with av.open(str(tmp_path / "cam.mp4")) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert 0 < frames < 100 and streams["cam"]["count"] == frames
    assert streams["cam"]["last_ns"] == stamps(tmp_path / "cam.timestamps.csv")[1][frames - 1]
    # The WAV holds whole blocks, all the header says, and nothing after them.
    samples, _ = soundfile.read(tmp_path / "mic.wav", dtype="int16")
    blocks = len(samples) // 4001
    assert 0 < blocks < 100 and len(samples) == blocks * 4001
    assert samples.tolist() == [i for i in range(blocks) for _ in range(4001)]
    assert streams["mic"]["count"] == blocks
    riff_size = int.from_bytes((tmp_path / "mic.wav").read_bytes()[4:8], "little")
    assert (tmp_path / "mic.wav").stat().st_size == riff_size + 8


# Saves a small image, then a large one, in a process that the kernel kills
# (SIGXFSZ, whose default is to end the process) once a file it writes passes
# 1 MB: in the middle of the large one.
_KILLED_WRITING_AN_IMAGE = """
import resource, signal, sys
import numpy as np
from chimera._recording import Recorder

resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
recorder = Recorder(sys.argv[1])
recorder.save("image", "shot", np.full((40, 60, 3), 7, np.uint8))
noise = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
recorder.save("image", "shot", noise)  # ~3 MB as PNG
recorder.close()
"""


async def test_a_node_killed_while_it_writes_an_image_leaves_whole_images(tmp_path):
    import cv2

    with trio.fail_after(30):
        done = await trio.run_process(
            [sys.executable, "-c", _KILLED_WRITING_AN_IMAGE, str(tmp_path)],
            check=False,
            cwd=tmp_path,
        )
    assert done.returncode == -signal.SIGXFSZ
    pngs = sorted((tmp_path / "shot").glob("*.png"))
    assert [p.name for p in pngs] == ["000000.png"]
    assert (cv2.imread(str(pngs[0])) == 7).all()
    # The large one is not counted: meta.json counts a killed node's timestamps.
    assert stamps(tmp_path / "shot.timestamps.csv")[0] == [0]


def test_a_video_saved_slower_than_its_fps_has_a_keyframe_a_second_so_a_kill_loses_one(
    tmp_path,
):
    # A node that declares its camera's 30 fps, but saves 5 frames a second.
    import av

    from chimera._recording import _WRITERS

    writer = _WRITERS["video"](tmp_path, "v", fps=30)
    frames = [writer.prepare(np.full((48, 64, 3), 10 * i, np.uint8)) for i in range(16)]
    writer.open()
    for i, frame in enumerate(frames):
        writer.write(frame, i * 200_000_000)  # 3 s of frames
    # What a kill now leaves: the fragments up to the last keyframe or the one before.
    with av.open(str(tmp_path / "v.mp4")) as container:
        left = sum(1 for _ in container.decode(video=0))
    writer.close()
    with av.open(str(tmp_path / "v.mp4")) as container:
        keyframes = [i for i, packet in enumerate(container.demux(video=0)) if packet.is_keyframe]
    assert keyframes == [0, 5, 10, 15]
    assert left >= 10  # (at most 6 frames lost: 1.2 s)


def test_a_video_whose_cluster_clock_steps_back_still_has_a_keyframe_a_second(tmp_path):
    import av

    from chimera._recording import _WRITERS

    writer = _WRITERS["video"](tmp_path, "v", fps=5)
    frames = [writer.prepare(np.full((48, 64, 3), 10 * i, np.uint8)) for i in range(12)]
    writer.open()
    for i, frame in enumerate(frames):  # 5 frames a second, the clock set 10 s back at frame 3
        writer.write(frame, i * 200_000_000 - (10_000_000_000 if i >= 3 else 0))
    writer.close()
    with av.open(str(tmp_path / "v.mp4")) as container:
        keyframes = [i for i, packet in enumerate(container.demux(video=0)) if packet.is_keyframe]
    assert keyframes == [0, 3, 8]


# Saves ten audio blocks of int16 (or stereo float32), flushes (as the writer
# does each second), saves one more, and is killed.
_KILLED_AFTER_AN_AUDIO_FLUSH = """
import os, signal, sys
from pathlib import Path
import numpy as np
from chimera._recording import _WRITERS

dtype = np.dtype(sys.argv[2])
channels = 1 if dtype == np.int16 else 2
writer = _WRITERS["audio"](Path(sys.argv[1]), "mic", channels=channels, format=None, rate=8000)
block = writer.prepare(np.arange(800, dtype=dtype))
writer.open()
for i in range(10):
    writer.write(block, i)
writer.flush()
writer.write(block, 10)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("dtype", ["int16", "float32"])
async def test_a_wav_left_by_a_kill_says_how_many_samples_it_holds(tmp_path, dtype):
    # Its header's sizes are written at each flush (libsndfile writes them at close).
    import wave

    import soundfile

    with trio.fail_after(30):
        done = await trio.run_process(
            [sys.executable, "-c", _KILLED_AFTER_AN_AUDIO_FLUSH, str(tmp_path), dtype],
            check=False,
        )
    assert done.returncode == -signal.SIGKILL
    # The flushed blocks (the header says so); the one after the flush is
    # lost, but for its timestamp.
    samples, rate = soundfile.read(tmp_path / "mic.wav", dtype=dtype)
    assert rate == 8000 and samples.ravel().tolist() == list(range(800)) * 10
    frames = 800 if dtype == "int16" else 400  # (a block's)
    assert stamps(tmp_path / "mic.timestamps.csv")[0] == [frames * i for i in range(11)]
    if dtype == "int16":
        with wave.open(str(tmp_path / "mic.wav")) as file:
            assert file.getnframes() == 8000
            assert np.frombuffer(file.readframes(8000), np.int16).tolist() == list(range(800)) * 10


# --- in a cluster, nodes in processes ------------------------------------------------


async def saved_count(notified, at_least: int) -> int:
    """Wait until the Recording node says it saved at least *at_least* steps; how many."""
    while True:
        words = (await notified.receive()).split()
        if words[0] == b"pid":
            continue
        if max(map(int, words)) >= at_least:
            return max(map(int, words))


def node_folder(node: cp.Node) -> Path:
    """Where the node's Worker keeps what it saves (its temporary folder, by node
    id); a path that does not exist if there is none."""
    found = list(Path(tempfile.gettempdir()).glob(f"chimera-worker-*/nodes/{node.id}"))
    assert len(found) <= 1
    return found[0] if found else Path(tempfile.gettempdir(), "chimera-none", "nodes", node.id)


def read_streams(folder: Path) -> dict[str, int]:
    """How many frames, audio blocks, rows and values each file holds (its standard reader)."""
    import av
    import soundfile

    with av.open(str(folder / "camera.mp4")) as container:
        frames = sum(1 for _ in container.decode(video=0))
    samples, _ = soundfile.read(folder / "mic.wav", dtype="int16")
    rows = pd.read_csv(folder / "sensor.csv")
    values = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    # Every step from the first recorded, in order (each stream flushes on its
    # own: after a kill, one may hold a few more than another).
    for steps in (rows["n"].tolist(), [value["n"] for value in values]):
        assert steps == list(range(steps[0], steps[0] + len(steps)))
    for stream in ("camera", "mic", "events"):
        assert increasing(pd.read_csv(folder / f"{stream}.timestamps.csv")["timestamp_ns"])
    return {"video": frames, "audio": len(samples) // 1600, "rows": len(rows), "json": len(values)}


async def test_preview_saves_nothing_record_does_and_stop_leaves_the_node_saved(
    tmp_path, take_worker_folders
):
    async with notifications() as (port, notified):
        node = Recording("recorder", port)
        graph = cp.Graph()
        graph.add_node(node)
        with trio.fail_after(60):
            async with cluster(tmp_path, "local") as manager:
                await manager.commit_graph(graph, {"local": ["recorder"]})
                assert await manager.preview()
                previewed = await saved_count(notified, 20)
                assert not node_folder(node).exists() or not any(node_folder(node).iterdir())
                assert await manager.record()
                await saved_count(notified, previewed + 30)
                assert await manager.stop()
                assert manager.nodes == {node.id: "SAVED"}
                counts = read_streams(node_folder(node))
    assert len(take_worker_folders()) == 1  # (kept: never collected)
    assert len(set(counts.values())) == 1, counts  # every stream saved every recorded step
    assert 30 <= counts["video"] < previewed + 60
    # What was not recorded is said, once.
    said = [
        line.split("local/recorder: ", 1)[1]
        for line in (tmp_path / "logs" / "nodes.log").read_text().splitlines()
        if "is not recorded" in line
    ]
    assert said == [
        "video 'camera' is not recorded: saves are recorded in prep, and from start() (or "
        "record()) until stop(); not after prep until then, while previewing, or in step() "
        "(said once)"
    ]


async def test_a_recording_node_killed_with_sigkill_loses_at_most_two_seconds(tmp_path):
    async with notifications() as (port, notified):
        node = Recording("recorder", port, rate=30)
        graph = cp.Graph()
        graph.add_node(node)
        with trio.fail_after(60):
            async with cluster(tmp_path, "local") as manager:
                await manager.commit_graph(graph, {"local": ["recorder"]})
                pid = int((await notified.receive()).split()[1])
                await manager.start()
                saved = await saved_count(notified, 100)  # over 3 s of saving
                os.kill(pid, signal.SIGKILL)
                await manager.wait_for_node_state("recorder", "FAILED")
                counts = read_streams(node_folder(node))
                # Collected like the others; with no manifest, summarized from its files.
                assert await manager.collect()
                session = manager.session_folder()
    for stream, count in counts.items():
        assert saved - 2 * 30 <= count <= saved + 30, (stream, count, saved)
    assert read_streams(session / "local" / "recorder") == counts
    meta = json.loads((session / "meta.json").read_text())
    assert meta["streams"]["local/recorder"]["state"] == "FAILED"
    streams = {s["stream"]: s for s in meta["streams"]["local/recorder"]["streams"]}
    # (the video's last fragment may be lost with up to a second of frames its timestamps list)
    assert counts["video"] <= streams["camera"]["count"] <= counts["video"] + 30
    assert counts["audio"] <= streams["mic"]["count"]  # every block saved has its timestamp
    assert streams["sensor"]["count"] == counts["rows"]


async def test_what_prep_saves_is_recorded_and_a_graph_committed_again_keeps_the_last_files(
    tmp_path, caplog
):
    async with notifications() as (port, notified):
        node = RecordingWithSetup("recorder", port)
        graph = cp.Graph()
        graph.add_node(node)
        pids = []
        with trio.fail_after(60):
            async with cluster(tmp_path, "local") as manager:
                for _ in range(2):  # the second time, the first one's files are not collected
                    await manager.commit_graph(graph, {"local": ["recorder"]})
                    while not (said := await notified.receive()).startswith(b"pid"):
                        pass  # (what the last session's node said)
                    pids.append(int(said.split()[1]))
                    await manager.start()
                    await saved_count(notified, 10)
                    await manager.stop()
                    if len(pids) == 1:
                        first = node_folder(node)
                        first_events = (first / "events.jsonl").read_text()
                        await manager.shutdown()
                assert await manager.collect()
                second = manager.session_folder() / "local" / "recorder"
                # Still where the first session left them, until the Worker shuts down.
                assert (first / "events.jsonl").read_text() == first_events
                assert json.loads((first / "setup.jsonl").read_text()) == {"pid": pids[0]}
    assert json.loads((second / "setup.jsonl").read_text()) == {"pid": pids[1]}
    assert stamps(second / "setup.timestamps.csv")[0] == [0]
    said = [r.getMessage() for r in caplog.records if "last graph" in r.getMessage()]
    assert len(said) == 1 and "never collected" in said[0]


# --- collection --------------------------------------------------------------------


async def _run_worker_process(port: int, name: str, task_status=trio.TASK_STATUS_IGNORED):
    """``chimera worker`` in a process of its own, until cancelled."""
    command = [sys.executable, "-m", "chimera", "worker", "--name", name]
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            partial(trio.run_process, [*command, "--manager", f"127.0.0.1:{port}"], check=False)
        )
        task_status.started(process)


async def test_collect_brings_every_nodes_files_from_two_workers_verified(tmp_path, monkeypatch):
    # The Worker in this process sends its files over HTTP (as if on another
    # machine); the one in a process of its own moves them (it sees the folder).
    monkeypatch.setattr("chimera._worker.sees_probe", lambda *args: False)
    async with notifications() as (port, notified):
        here, there = Recording("here", port, every=30), Recording("there", port, every=30)
        graph = cp.Graph()
        graph.add_nodes_from([here, there])
        with trio.fail_after(90):
            async with cluster(tmp_path, "local") as manager, trio.open_nursery() as nursery:
                process = await nursery.start(_run_worker_process, manager.port, "remote")
                await manager.wait_for_workers(2)
                await manager.commit_graph(graph, {"local": ["here"], "remote": ["there"]})
                await manager.start()
                await saved_count(notified, 60)
                await saved_count(notified, 60)  # both have saved two seconds or so
                assert await manager.collect()  # stops the cluster first
                session = manager.session_folder()
                process.terminate()
    meta = json.loads((session / "meta.json").read_text())
    for worker, node in (("local", "here"), ("remote", "there")):
        folder = session / worker / node
        counts = read_streams(folder)
        assert len(set(counts.values())) == 1 and counts["video"] >= 60
        streams = {s["stream"]: s for s in meta["streams"][f"{worker}/{node}"]["streams"]}
        assert streams["camera"]["count"] == counts["video"]
        assert streams["sensor"]["count"] == counts["rows"]
        assert streams["camera"]["file"] == "camera.mp4"
        assert 20 < streams["camera"]["rate"] < 40
        assert meta["streams"][f"{worker}/{node}"]["state"] == "SAVED"
        assert meta["streams"][f"{worker}/{node}"]["writer_wait_ms"] >= 0
        assert meta["clocks"][worker]["error_ns"] >= 0
    assert meta["start_ns"] < meta["stop_ns"]
    assert sorted(meta["mapping"]) == ["local", "remote"]


@asynccontextmanager
async def recording_a_second(tmp_path) -> AsyncIterator[cp.AsyncManager]:
    """A cluster of one Worker whose one node, ``recorder``, has recorded about a second."""
    async with notifications() as (port, notified):
        graph = cp.Graph()
        graph.add_node(Recording("recorder", port))
        async with cluster(tmp_path, "local") as manager:
            await manager.commit_graph(graph, {"local": ["recorder"]})
            await manager.start()
            await saved_count(notified, 30)
            yield manager


async def test_collect_without_unzip_keeps_one_archive_per_worker(tmp_path):
    with trio.fail_after(60):
        async with recording_a_second(tmp_path) as manager:
            await manager.stop()
            assert await manager.collect(unzip=False)
            assert await manager.collect(unzip=False)  # (once more: nothing is lost)
            session = manager.session_folder()
    assert sorted(p.name for p in session.iterdir()) == ["local.zip", "meta.json"]
    with zipfile.ZipFile(session / "local.zip") as archive:
        names = archive.namelist()
    assert "local/recorder/camera.mp4" in names and "local/recorder/sensor.csv" in names


async def test_collect_after_collect_without_unzip_unpacks_the_archive(tmp_path):
    # The files went into local.zip; collecting again as folders (the
    # default) takes them out of it, and leaves no archive beside the folder.
    with trio.fail_after(60):
        async with recording_a_second(tmp_path) as manager:
            await manager.stop()
            assert await manager.collect(unzip=False)
            assert await manager.collect()
            session = manager.session_folder()
    assert sorted(p.name for p in session.iterdir()) == ["local", "meta.json"]
    recorder = session / "local" / "recorder"
    assert {"camera.mp4", "sensor.csv"} <= {p.name for p in recorder.iterdir()}
    import av

    with av.open(str(recorder / "camera.mp4")) as video:
        assert sum(1 for _ in video.decode(video=0)) >= 20


def test_an_archive_whose_files_would_land_outside_its_folder_is_not_unpacked(tmp_path):
    from chimera._manager import _unzip_archive

    with zipfile.ZipFile(tmp_path / "local.zip", "w") as archive:
        archive.writestr("local/recorder/sensor.csv", "t,x\n")
        archive.writestr("local/../outside.txt", "no")
    with pytest.raises(OSError, match="not in local/"):
        _unzip_archive(tmp_path / "local")
    assert not (tmp_path / "outside.txt").exists()
    assert (tmp_path / "local.zip").exists()


async def test_shutting_down_without_collecting_keeps_the_files_and_says_where(
    tmp_path, caplog, take_worker_folders
):
    with trio.fail_after(60):
        async with recording_a_second(tmp_path) as manager:
            await manager.stop()
            await manager.shutdown()
    kept = take_worker_folders()
    assert len(kept) == 1
    [(folder, files)] = kept.items()
    assert any(file.endswith("/camera.mp4") for file in files), files
    warnings = [r.getMessage() for r in caplog.records if "never collected" in r.getMessage()]
    assert len(warnings) == 1
    [node_folder] = {file.split("/")[1] for file in files if file.count("/") == 2}  # (its id)
    assert (
        f"its nodes saved are kept in {folder} (nodes/{node_folder}: 'recorder'): "
        "they were never collected"
    ) in warnings[0]


async def test_a_worker_whose_manager_left_before_collecting_keeps_the_files(tmp_path, caplog):
    # The Manager's script ended (or crashed) before collect(): the files may be
    # the session's only copy.
    async with notifications() as (port, notified):
        node = Recording("recorder", port)
        graph = cp.Graph()
        graph.add_node(node)
        with trio.fail_after(60):
            async with cp.AsyncWorker("local") as worker:
                async with cp.AsyncManager(tmp_path, port=0, transport="tcp") as manager:
                    assert await worker.connect(manager.host, manager.port)
                    await manager.commit_graph(graph, {"local": ["recorder"]})
                    await manager.start()
                    await saved_count(notified, 10)
                    await manager.stop()
                await worker.wait_for_disconnect()
    kept = node_folder(node)
    assert kept.exists(), "the Worker deleted its folder"
    temp = kept.parent.parent  # the Worker's temporary folder: removed below, so checked first
    assert temp.parent == Path(tempfile.gettempdir()) and temp.name.startswith("chimera-worker-")
    try:
        assert read_streams(kept)["video"] >= 10
        said = [
            r.getMessage() for r in caplog.records if "left before collecting" in r.getMessage()
        ]
        assert len(said) == 1 and str(temp) in said[0]
    finally:
        shutil.rmtree(temp)


@pytest.mark.parametrize("way", ["sent", "moved"])
async def test_nothing_is_said_of_what_was_collected(tmp_path, caplog, monkeypatch, way):
    from chimera import _worker

    if way == "sent":  # (the files stay in the Worker's folder)
        monkeypatch.setattr(_worker, "sees_probe", lambda *args: False)
    with trio.fail_after(60):
        async with recording_a_second(tmp_path) as manager:
            assert await manager.collect()
            (node,) = manager.graph.nodes
            folder = node_folder(node)
            saved = folder.with_name(f"{folder.name}.saved.json")
            assert saved.exists()
            await manager.shutdown()
            # Moved out, its folder is gone with its node (not kept for each graph
            # run until the Worker ends); sent, its files stay until then.
            assert folder.is_dir() == saved.exists() == (way == "sent")
    assert not [r for r in caplog.records if "never collected" in r.getMessage()]


@pytest.mark.parametrize("way", ["sent", "moved"])
async def test_a_file_changed_on_its_way_fails_the_collection_naming_it(
    tmp_path, monkeypatch, way, take_worker_folders
):
    from chimera import _collect, _worker

    if way == "sent":
        original = _collect._FileBody.__aiter__

        async def tampered(self):
            async for chunk in original(self):
                yield chunk
            if self.path.name == "sensor.csv":
                yield b"9,9\n"  # sent, not hashed: as if changed on the way

        monkeypatch.setattr(_worker, "sees_probe", lambda *args: False)
        monkeypatch.setattr(_collect._FileBody, "__aiter__", tampered)
    else:
        original_move = _collect.move_folder

        def tampered_move(folder, target, prefix, manifest):
            moved = original_move(folder, target, prefix, manifest)
            with open(target / prefix / "sensor.csv", "a") as file:
                file.write("9,9\n")  # changed after the Worker hashed it
            return moved

        monkeypatch.setattr(_worker, "move_folder", tampered_move)
    with trio.fail_after(60):
        async with recording_a_second(tmp_path) as manager:
            with pytest.raises(ValueError, match=r"recorder/sensor.csv differs from what"):
                await manager.collect()
            # The session is described all the same, that node not collected.
            meta = json.loads((manager.session_folder() / "meta.json").read_text())
    assert meta["streams"]["local/recorder"]["collected"] is False
    # Sent (not moved), the files stay with their Worker: the only whole copy.
    kept = [sorted(files) for files in take_worker_folders().values()]
    if way == "sent":
        assert len(kept) == 1 and any(f.endswith("/sensor.csv") for f in kept[0]), kept
    else:
        assert kept == []


@pytest.mark.parametrize(
    "path", ["../escape", "node/../../escape", "/etc/escape", "node/a\\b", "", "node//x"]
)
async def test_the_manager_never_writes_outside_the_session_folder(tmp_path, path):
    from chimera._collect import Incoming

    async def body():
        yield b"data"

    incoming = Incoming(tmp_path / "session" / "worker")
    with pytest.raises(ValueError):
        await incoming.write(path, body())
    (tmp_path / "session" / "worker").mkdir(parents=True)
    (tmp_path / "session" / "worker" / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="outside the session folder"):
        await incoming.write("link/escape", body())
    assert not list(tmp_path.rglob("escape"))


def test_a_writer_that_cannot_keep_up_slows_the_node_says_so_and_loses_nothing(
    tmp_path, monkeypatch, caplog
):
    import time

    from chimera import _recording

    original = _recording._TableWriter.write

    def slow_write(self, rows, stamp):
        time.sleep(0.002)
        original(self, rows, stamp)

    monkeypatch.setattr(_recording._TableWriter, "write", slow_write)
    monkeypatch.setitem(_recording.QUEUE_SIZES, "table", 4)
    recorder = Recorder(tmp_path)
    started = time.perf_counter()
    for n in range(100):
        recorder.save("table", "fast", {"n": n})
    waited = time.perf_counter() - started
    (info,) = recorder.close()
    assert pd.read_csv(tmp_path / "fast.csv")["n"].tolist() == list(range(100))
    assert 0.1 < info.waited_s <= waited  # ~96 rows x 2 ms waited for
    assert caplog.text.count("the table writer of 'fast' cannot keep up: its node waits") == 1
