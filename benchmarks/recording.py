#!/usr/bin/env python3
"""Benchmark of recording on one Worker: video, audio and a table at once, then collect.

Everything runs as a user would run it: an ``AsyncManager`` and one
``AsyncWorker`` in this process (one Trio run), each node in a child process of
its own, the ``tcp`` transport on loopback. Three source nodes, defined here,
record at the same time for ``--seconds``:

- **video**: a 1920x1080 BGR uint8 frame at 30 fps (``save_video``): a
  gradient with a fixed noise texture, panning 8 px a frame, so that H.264
  has motion to encode;
- **audio**: 48 kHz stereo int16 (``save_audio``, ``format=8``), a block of
  480 samples every 10 ms;
- **table**: 1,000 rows a second, a ``save_tabular`` of a dict each, in
  steps of ``--table-rows`` rows (10: a step every 10 ms; a chimera source's
  step costs ~0.2 ms of CPU on a 2-core VM, so ``--table-rows 1``, a step a
  millisecond, measures stepping as much as recording).

Each source paces itself with ``time.sleep`` and skips the turns it missed (as
``chimera.nodes`` does: no burst to catch up), and writes at teardown what it
offered (frames, samples, rows passed to ``save_*``), its process CPU time
(``time.process_time``, from its first step to its teardown: one node per
process, so that is the CPU of the stream, its writer thread and H.264's
threads included; the writer's drain of its queue after teardown is not), the
seconds it spent inside ``save_*`` calls, the seconds it waited for a full
writer queue (the recorder's ``waited_s``), and the turns it missed. A writer
that cannot keep up fills its bounded queue and then makes its node wait,
longer and longer: the node falls behind its pace and misses more turns in the
second half of the run than in the first. (A source also misses turns for
want of CPU, with no writer lag: then it never waits.) Nothing should ever be
lost: only slowed.

After ``stop()``, ``collect()`` (``unzip=True``) is timed. Then what is in the
collected session folder is counted with the standard readers (PyAV decodes
every frame, soundfile reads the samples, pandas the rows) and compared with
what was offered; ``meta.json``'s per-stream rate and largest gap are shown
too. Collect throughput is compared with a plain file copy of the same bytes
on the same disk: the Worker's temporary folder is gone once it exits, so the
baseline is ``shutil.copytree`` of the collected Worker folder to another
folder beside it (the median of 3 copies). Neither syncs to disk; collect's
time includes its checks and writing ``meta.json``, as a user waits for them.
Every file is hashed (SHA-256) when its node's recorder closes, in ``stop``,
whose time is shown too; ``collect`` uses those hashes for files unchanged
since (see ``chimera/_manifest.py``).

Usage::

    python benchmarks/recording.py            # 30 s of recording (~35 s in all)
    python benchmarks/recording.py --quick    # 5 s: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import trio
from _cluster import Cluster, children, read_result  # (this script's folder)

import chimera as cp

WIDTH, HEIGHT, FPS = 1920, 1080, 30
AUDIO_RATE, AUDIO_CHANNELS, AUDIO_BLOCK = 48_000, 2, 480
TABLE_RATE = 1000
#: A stream may miss this share of its turns (a 2-core VM's scheduler makes a
#: 1 ms source late now and then) and still count as keeping its pace.
MISSED_SHARE = 0.01

# --- the nodes (pickled by value into their processes) ------------------------------


class PacedSource(cp.Node):
    """Steps *rate* times a second; counts what it offers, its CPU, its lateness."""

    unit = ""

    def __init__(self, name: str, folder: str, rate: float) -> None:
        super().__init__(name)
        self.folder, self.rate = folder, rate

    def prep(self) -> None:
        self.period = 1 / self.rate
        self.offered = 0  # frames, samples or rows passed to save_*
        self.calls = 0
        self.in_save = 0.0
        self.missed = 0
        self.missed_by_second: list[int] = []
        self.max_late = 0.0
        self.next: float | None = None

    def _wait_for_turn(self) -> None:
        now = time.perf_counter()
        if self.next is None:
            self.started, self.cpu_started, self.next = now, time.process_time(), now
            return
        self.next += self.period
        delay = self.next - now
        if delay > 0:
            time.sleep(delay)
            self.max_late = max(self.max_late, time.perf_counter() - self.next)
            return
        self.max_late = max(self.max_late, -delay)
        if delay < -self.period:  # turns missed: go on from now, not in a burst
            missed = int(-delay / self.period)
            self.missed += missed
            second = int(now - self.started)
            self.missed_by_second += [0] * (second + 1 - len(self.missed_by_second))
            self.missed_by_second[second] += missed
            self.next = now

    def _timed_save(self, save: Any, *args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        save(*args, **kwargs)
        self.in_save += time.perf_counter() - started
        self.calls += 1

    def teardown(self) -> None:
        if self.next is None:
            return
        recorder = getattr(self, "_recorder", None)  # chimera's; for waited_s only
        waited = sum(s.waited_s for s in recorder.streams()) if recorder is not None else None
        result = {
            "offered": self.offered,
            "calls": self.calls,
            "unit": self.unit,
            "rate": self.rate,
            "cpu_s": time.process_time() - self.cpu_started,
            "wall_s": time.perf_counter() - self.started,
            "in_save_s": self.in_save,
            "waited_s": waited,
            "missed": self.missed,
            "missed_by_second": self.missed_by_second,
            "max_late_s": self.max_late,
        }
        Path(self.folder, f"{self.name}.json").write_text(json.dumps(result))


class VideoSource(PacedSource):
    """1080p BGR frames at *rate* fps: a textured gradient panning 8 px a frame."""

    unit = "frames"

    def prep(self) -> None:
        super().prep()
        y, x = np.mgrid[0:HEIGHT, 0 : 2 * WIDTH]
        texture = np.random.default_rng(0).integers(0, 32, (HEIGHT, 2 * WIDTH, 3))  # + 223 <= 255
        self.wide = (
            np.stack([x * 223 // (2 * WIDTH), y * 223 // HEIGHT, (x + y) // 4 % 224], axis=-1)
            + texture
        ).astype(np.uint8)

    def step(self) -> None:
        self._wait_for_turn()
        offset = self.offered * 8 % WIDTH
        frame = self.wide[:, offset : offset + WIDTH]  # a view: save_video copies it
        self._timed_save(self.save_video, "video", frame, fps=self.rate)
        self.offered += 1


class AudioSource(PacedSource):
    """48 kHz stereo int16: a block of 480 samples (10 ms) a turn."""

    unit = "samples"

    def prep(self) -> None:
        super().prep()
        t = np.arange(AUDIO_RATE) / AUDIO_RATE  # one second, played in a loop
        tone = 0.3 * np.sin(2 * np.pi * 440 * t)
        self.second = (np.stack([tone, -tone], axis=1) * 32767).astype(np.int16)

    def step(self) -> None:
        self._wait_for_turn()
        start = self.offered % AUDIO_RATE
        block = self.second[start : start + AUDIO_BLOCK]
        self._timed_save(
            self.save_audio, "audio", block, channels=AUDIO_CHANNELS, format=8, rate=AUDIO_RATE
        )
        self.offered += len(block)


class TableSource(PacedSource):
    """Rows of an index and three floats, *rows* a turn (each its own ``save_tabular``)."""

    unit = "rows"

    def __init__(self, name: str, folder: str, rate: float, rows: int = 1) -> None:
        super().__init__(name, folder, rate)
        self.rows = rows

    def prep(self) -> None:
        super().prep()
        self.random = np.random.default_rng(0)

    def step(self) -> None:
        self._wait_for_turn()
        for _ in range(self.rows):
            x, y, z = self.random.random(3).tolist()
            row = {"i": self.offered, "x": x, "y": y, "z": z}
            self._timed_save(self.save_tabular, "table", row)
            self.offered += 1


# --- reading what the nodes wrote -------------------------------------------------------


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- reading back what was saved ------------------------------------------------------


def count_frames(path: Path) -> dict[str, Any]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = 0
        for frame in container.decode(stream):
            frames += 1
            size = (frame.width, frame.height)
    return {"saved": frames, "size": f"{size[0]}x{size[1]}" if frames else "?"}


def count_samples(path: Path) -> dict[str, Any]:
    import soundfile

    samples, rate = soundfile.read(path, dtype="int16", always_2d=True)
    return {"saved": len(samples), "size": f"{rate} Hz x {samples.shape[1]}"}


def count_rows(path: Path) -> dict[str, Any]:
    import pandas

    table = pandas.read_csv(path)
    consecutive = bool((table["i"].diff().dropna() == 1).all())
    return {"saved": len(table), "size": f"{len(table.columns)} columns", "in_order": consecutive}


#: Each node: the file it saves, and how to count what that holds.
STREAMS = {
    "video": ("video.mp4", count_frames),
    "audio": ("audio.wav", count_samples),
    "table": ("table.csv", count_rows),
}


def make_nodes(folder: str, table_rows: int) -> list[cp.Node]:
    return [
        VideoSource("video", folder, FPS),
        AudioSource("audio", folder, AUDIO_RATE / AUDIO_BLOCK),
        TableSource("table", folder, TABLE_RATE / table_rows, rows=table_rows),
    ]


# --- the measurement ----------------------------------------------------------------


async def record_and_collect(folder: str, seconds: float, table_rows: int) -> dict[str, Any]:
    nodes = make_nodes(folder, table_rows)
    graph = cp.Graph()
    graph.add_nodes_from(nodes)
    result: dict[str, Any] = {"seconds": seconds}
    async with Cluster(folder, 1) as manager:
        await manager.commit_graph(graph, {"w0": [node.name for node in nodes]})
        print(f"recording for {seconds:g} s", file=sys.stderr, flush=True)
        cpu, wall = time.process_time(), time.perf_counter()
        await manager.start()
        await trio.sleep(seconds)
        result["manager_worker_cpu"] = (time.process_time() - cpu) / (time.perf_counter() - wall)
        started = time.perf_counter()
        await manager.stop()
        result["stop_s"] = time.perf_counter() - started
        started = time.perf_counter()
        await manager.collect(unzip=True)
        result["collect_s"] = time.perf_counter() - started
        session = manager.session_folder()
        await manager.shutdown()
    result["session"] = str(session)
    return result


def measure(folder: str, seconds: float, table_rows: int) -> dict[str, Any]:
    result = trio.run(record_and_collect, folder, seconds, table_rows)
    # (meta.json's summaries come from the nodes: collect should not need pandas)
    result["collect_imported_pandas"] = "pandas" in sys.modules
    result["table_rows_per_step"] = table_rows
    left = [pid for zygote in children(os.getpid()) for pid in [zygote, *children(zygote)]]
    result["processes_left"] = left
    session = Path(result["session"])
    worker = session / "w0"
    result["collected_bytes"] = _size(worker)
    copies = []
    for index in range(3):
        started = time.perf_counter()
        shutil.copytree(worker, Path(folder, f"copy{index}"))
        copies.append(time.perf_counter() - started)
    result["copy_s"] = statistics.median(copies)
    result["copies_s"] = copies
    meta = json.loads((session / "meta.json").read_text())
    result["streams"] = {}
    for name, (file, count) in STREAMS.items():
        print(f"reading {name}", file=sys.stderr, flush=True)
        node_folder = worker / name
        stream = {**read_result(folder, name), **count(node_folder / file)}
        stream["bytes"] = _size(node_folder)
        summaries = meta["streams"][f"w0/{name}"]["streams"]
        stream["meta"] = next((s for s in summaries if s["file"] == file), None)
        stream["state"] = meta["streams"][f"w0/{name}"]["state"]
        result["streams"][name] = stream
    return result


# --- the report -----------------------------------------------------------------------


def _halves(stream: dict[str, Any]) -> tuple[int, int]:
    """Turns missed in the first and the last *k* whole seconds, 2 *k* <= the run."""
    seconds = int(stream["wall_s"])
    by_second = stream["missed_by_second"][:seconds] + [0] * seconds
    half = seconds // 2
    return sum(by_second[:half]), sum(by_second[seconds - half : seconds])


def summarize(result: dict[str, Any]) -> tuple[str, list[str]]:
    table = [
        "| stream | offered | saved | saved/offered | turns missed (1st/2nd half) | max late "
        "| in save_* (waited) | CPU % of a core | output MB | MB/s | meta rate, max gap |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    all_saved, on_pace, no_lag = True, True, True
    for name, s in result["streams"].items():
        turns = s["rate"] * s["wall_s"]
        first, second = _halves(s)
        on_pace &= s["missed"] <= MISSED_SHARE * turns
        # A writer falling behind fills its queue: its node waits, more and more.
        waited = s["waited_s"] if s["waited_s"] is not None else 0.0
        no_lag &= waited <= MISSED_SHARE * s["wall_s"] and second <= first + MISSED_SHARE * turns
        all_saved &= s["saved"] == s["offered"] and s.get("in_order", True)
        meta = s["meta"] or {}
        gap = meta.get("max_gap_ns")
        waited = f"{s['waited_s']:.2f}" if s["waited_s"] is not None else "?"
        table.append(
            f"| {name} ({s['size']}) | {s['offered']:,} {s['unit']} | {s['saved']:,} "
            f"| {s['saved'] / s['offered']:.2%} "
            f"| {s['missed']:,} of {turns:,.0f} ({first:,}/{second:,}) "
            f"| {s['max_late_s'] * 1e3:,.0f} ms "
            f"| {s['in_save_s']:.2f} s ({waited} s) "
            f"| {100 * s['cpu_s'] / s['wall_s']:.0f} % "
            f"| {s['bytes'] / 1e6:,.1f} | {s['bytes'] / 1e6 / s['wall_s']:.2f} "
            f"| {meta.get('rate') or 0:,.1f}/s, {gap / 1e6 if gap else 0:,.0f} ms |"
        )
    megabytes = result["collected_bytes"] / 1e6
    collect_rate, copy_rate = megabytes / result["collect_s"], megabytes / result["copy_s"]
    ratio = collect_rate / copy_rate
    cpu_total = sum(100 * s["cpu_s"] / s["wall_s"] for s in result["streams"].values())
    table += [
        "",
        "| measure | value |",
        "|---|---:|",
        f"| Manager + Worker process CPU | {100 * result['manager_worker_cpu']:.1f} % of a core |",
        f"| all node processes CPU | {cpu_total:.0f} % of a core ({os.cpu_count()} cores) |",
        f"| stop (sources end, writers drain, files hashed) | {result['stop_s']:.2f} s |",
        f"| bytes collected | {megabytes:,.1f} MB |",
        f"| collect (unzip=True) | {result['collect_s']:.3f} s: {collect_rate:,.0f} MB/s |",
        f"| plain copy (copytree, median of 3) | {result['copy_s']:.3f} s: {copy_rate:,.0f} MB/s |",
        f"| collect / copy | {ratio:.0%} |",
        f"| collect imported pandas | {'yes' if result['collect_imported_pandas'] else 'no'} |",
    ]
    checks = [
        ("all frames/samples/rows saved", all_saved),
        ("no growing writer lag (no wait for a full writer queue)", no_lag),
        (f"every source kept its pace (<= {MISSED_SHARE:.0%} of its turns missed)", on_pace),
        ("collect >= 70% of a plain copy", ratio >= 0.7),
        ("no process left", not result["processes_left"]),
    ]
    return "\n".join(table), [f"- {name}: {'ok' if ok else 'MISSED'}" for name, ok in checks]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the recording")
    parser.add_argument("--quick", action="store_true", help="5 s of recording")
    parser.add_argument(
        "--table-rows",
        type=int,
        default=10,
        help="rows of the 1 kHz table saved a step (1: a step a millisecond)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the raw results to PATH")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 5.0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="chimera-bench-") as folder:
        result = measure(folder, args.seconds, args.table_rows)
    table, checks = summarize(result)
    print(table)
    print("\nTargets:")
    print("\n".join(checks))
    elapsed = time.perf_counter() - started
    print(f"\n(total {elapsed:.0f} s, {args.seconds:g} s of recording)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
