"""WAV files: every reader reads what was flushed, before and after close, and past 4 GiB."""

from __future__ import annotations

import shutil
import wave

import numpy as np
import pytest
import soundfile
from hypothesis import given, settings
from hypothesis import strategies as st

from chimera import _wav
from chimera._wav import SUBTYPES, WavWriter

#: soundfile's reading dtype for each sample format (PCM_24 comes back as int32, full
#: scale; PCM_U8 as int16, full scale).
DTYPES = {"PCM_U8": "int16", "PCM_16": "int16", "PCM_24": "int32", "PCM_32": "int32"}
DTYPES["FLOAT"], DTYPES["DOUBLE"] = "float32", "float64"


def samples(subtype: str, frames: int, channels: int, start: int = 0) -> np.ndarray:
    """Samples counting up (PCM_24: in the top three bytes of int32; PCM_U8: modulo 256)."""
    values = np.arange(start, start + frames * channels).reshape(frames, channels)
    if subtype == "PCM_24":
        return (values << 8).astype(np.int32)
    if subtype == "PCM_U8":
        return (values % 256).astype(np.uint8)
    return values.astype(DTYPES[subtype])


def as_read(subtype: str, written: np.ndarray) -> np.ndarray:
    """What soundfile reads of *written* samples (PCM_U8: signed, full scale)."""
    if subtype == "PCM_U8":
        return (written.astype(np.int16) - 128) * 256
    return written


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(sorted(SUBTYPES)),
    st.integers(1, 3),
    st.lists(st.integers(0, 50), min_size=1, max_size=5),
)
def test_any_blocks_come_back_from_the_closed_file(tmp_path_factory, subtype, channels, blocks):
    path = tmp_path_factory.mktemp("wav") / "a.wav"
    writer = WavWriter(path, 8000, channels, subtype)
    written, at = [], 0
    for frames in blocks:
        written.append(samples(subtype, frames, channels, at))
        writer.write(written[-1])
        at += frames * channels
    writer.close()
    read, rate = soundfile.read(path, dtype=DTYPES[subtype], always_2d=True)
    assert rate == 8000 and read.shape == (sum(blocks), channels)
    assert np.array_equal(read, as_read(subtype, np.concatenate(written)))
    # Its header holds the sizes a strict reader checks, each chunk padded to an even size.
    riff_size, chunks = riff_chunks(path.read_bytes())
    assert riff_size == path.stat().st_size - 8
    assert len(chunks[b"data"]) == sum(blocks) * channels * SUBTYPES[subtype][1] // 8
    if subtype in ("FLOAT", "DOUBLE"):  # (a fact chunk: the count of frames)
        assert int.from_bytes(chunks[b"fact"], "little") == sum(blocks)
    else:
        assert b"fact" not in chunks


def riff_chunks(data: bytes) -> tuple[int, dict[bytes, bytes]]:
    """The size a RIFF file gives itself, and its chunks' payloads by name
    (read as a strict reader does: each chunk where the last one's padded size ends)."""
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    chunks, at = {}, 12
    while at < len(data):
        size = int.from_bytes(data[at + 4 : at + 8], "little")
        chunks[data[at : at + 4]] = data[at + 8 : at + 8 + size]
        at += 8 + size + size % 2
    assert at == len(data)
    return int.from_bytes(data[4:8], "little"), chunks


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32"])
def test_pythons_wave_reads_integer_samples(tmp_path, subtype):
    writer = WavWriter(tmp_path / "a.wav", 16000, 2, subtype)
    writer.write(samples(subtype, 101, 2))
    writer.close()
    with wave.open(str(tmp_path / "a.wav")) as file:
        assert (file.getnchannels(), file.getframerate(), file.getnframes()) == (2, 16000, 101)
        assert file.getsampwidth() == SUBTYPES[subtype][1] // 8


@pytest.mark.parametrize("subtype", sorted(SUBTYPES))
def test_a_file_not_closed_says_what_was_flushed(tmp_path, subtype):
    # As a node killed after a flush leaves it: a copy taken before close.
    writer = WavWriter(tmp_path / "a.wav", 8000, 2, subtype)
    writer.write(samples(subtype, 300, 2))
    writer.flush()
    shutil.copy(tmp_path / "a.wav", tmp_path / "left.wav")
    writer.write(samples(subtype, 10, 2))
    writer.close()
    read, _ = soundfile.read(tmp_path / "left.wav", dtype=DTYPES[subtype])
    assert np.array_equal(read, as_read(subtype, samples(subtype, 300, 2)))
    if subtype.startswith("PCM"):
        with wave.open(str(tmp_path / "left.wav")) as file:
            assert file.getnframes() == 300


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "FLOAT"])
def test_past_the_riff_limit_the_file_becomes_rf64_and_reads_whole(tmp_path, monkeypatch, subtype):
    # As a file past 4 GiB, with the limit made small.
    monkeypatch.setattr(_wav, "LIMIT", 1000)
    writer = WavWriter(tmp_path / "a.wav", 8000, 1, subtype)
    writer.write(samples(subtype, 200, 1))
    writer.flush()
    assert soundfile.info(tmp_path / "a.wav").format == "WAV"  # (not past it yet)
    writer.write(samples(subtype, 301, 1, 200))
    writer.flush()
    shutil.copy(tmp_path / "a.wav", tmp_path / "left.wav")
    writer.close()
    for name in ("left.wav", "a.wav"):
        assert soundfile.info(tmp_path / name).format == "RF64"
        read, _ = soundfile.read(tmp_path / name, dtype=DTYPES[subtype], always_2d=True)
        assert np.array_equal(read, samples(subtype, 501, 1))


def test_a_file_whose_samples_fit_a_riff_field_but_not_the_whole_file_is_rf64(
    tmp_path, monkeypatch
):
    # (The RIFF size counts the header too: near 4 GiB, it overflows first.)
    monkeypatch.setattr(_wav, "LIMIT", 2 * 500 + 10)
    writer = WavWriter(tmp_path / "a.wav", 8000, 1, "PCM_16")
    writer.write(samples("PCM_16", 500, 1))
    writer.close()
    assert soundfile.info(tmp_path / "a.wav").format == "RF64"
    read, _ = soundfile.read(tmp_path / "a.wav", dtype="int16", always_2d=True)
    assert np.array_equal(read, samples("PCM_16", 500, 1))
