#!/usr/bin/env python3
"""Benchmark of a chimera cluster on one machine: frames, small chunks, lifecycle.

Everything runs as a user would run it: an ``AsyncManager`` and ``AsyncWorker``s
in this process, each node in a child process of its own, the ``tcp``
transport on loopback. Measured:

1. **1080p frames**: a source sends 1920x1080x3 uint8 frames (``image``
   records) as fast as it can to a sink, for ``--seconds``. Delivered fps (at
   the sink, first to last frame), chunks lost (produced - received: both
   nodes count), and latency per frame (the sink's clock minus the record's
   timestamp, both cluster time): p50 and p99. The frame never changes and
   is read-only, so it travels without a copy; the same again with a
   writeable frame, which is copied as the step returns.
2. **1 KB chunks** between two nodes: the burst rate (the source as fast as
   it can), and one-way latency p50/p99 paced at 1 kHz: with nodes written
   as ChimeraPy's (``def step``: on the node's thread), and with ``async def
   step`` (on the node's event loop, no hand-off to a thread). If ``pylsl``
   is installed (``pip install -e ".[bench]"``), Lab Streaming Layer's
   latency is measured the same way in each round (``_lsl.py``), and the
   table gives chimera's p50 as a multiple of it.
3. **Lifecycle**: ``commit_graph`` for 2 nodes on one Worker and for 20 nodes
   (a chain) over 2 Workers, then ``stop`` and ``shutdown``; and the peak RSS
   (``VmHWM``) of every node process, read before ``shutdown``.

Each measurement runs ``--rounds`` times; the table shows the median of the
rounds (latency percentiles over all rounds' samples). Targets (issue #3) are
checked at the end. For comparison, ChimeraPy 0.0.10 on this kind of machine:
57-64 fps with more than 99% of frames dropped, p50 17-23 ms, commit 5.3-6.0 s,
shutdown 10.0 s; Lab Streaming Layer 1.18 (issue #3): 27.9k samples/s burst (256
float32 channels), 145/310 µs p50/p99 paced.

Usage::

    python benchmarks/pipeline.py            # everything (~1 minute)
    python benchmarks/pipeline.py --quick    # a smoke test
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import trio
from _cluster import Cluster, children, percentile, read_result  # (this script's folder)

import chimera as cp

_HERE = os.path.dirname(os.path.abspath(__file__))

# --- the nodes (pickled by value into their processes) ------------------------------


class FrameSource(cp.Node):
    """Sends the same 1080p frame as fast as it can; counts what it sent.

    The frame never changes: it is read-only, and travels without a copy.
    *writeable* leaves it writeable, as a frame a camera library hands over
    is: then each is copied as the step returns (the node might change it).
    """

    def __init__(self, name: str, folder: str, writeable: bool = False) -> None:
        super().__init__(name)
        self.folder, self.writeable = folder, writeable

    def prep(self) -> None:
        self.frame = np.random.default_rng(0).integers(0, 255, (1080, 1920, 3), dtype=np.uint8)
        self.frame.flags.writeable = self.writeable
        self.sent = 0

    def step(self) -> cp.DataChunk:
        chunk = cp.DataChunk()
        chunk.add("frame", self.frame, "image")
        self.sent += 1
        return chunk

    def teardown(self) -> None:
        Path(self.folder, f"{self.name}.json").write_text(json.dumps({"sent": self.sent}))


class SmallSource(cp.Node):
    """Sends 1 KB arrays: as fast as it can, or *rate* per second."""

    def __init__(self, name: str, folder: str, rate: float | None) -> None:
        super().__init__(name)
        self.folder, self.rate = folder, rate

    def prep(self) -> None:
        self.payload = np.zeros(256, dtype=np.float32)  # 1 KB
        self.sent = 0
        self.next = time.perf_counter()

    def step(self) -> cp.DataChunk:
        if self.rate:
            self.next += 1 / self.rate
            delay = self.next - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        chunk = cp.DataChunk()
        chunk.add("samples", self.payload, "array")
        self.sent += 1
        return chunk

    def teardown(self) -> None:
        Path(self.folder, f"{self.name}.json").write_text(json.dumps({"sent": self.sent}))


class AsyncSmallSource(SmallSource):
    """:class:`SmallSource` paced on the event loop (``async def step``)."""

    async def step(self) -> cp.DataChunk:
        self.next += 1 / self.rate
        await trio.sleep(max(0.0, self.next - time.perf_counter()))
        chunk = cp.DataChunk()
        chunk.add("samples", self.payload, "array")
        self.sent += 1
        return chunk


class TimingSink(cp.Node):
    """Counts chunks and their latency (now minus the record's timestamp)."""

    def __init__(self, name: str, folder: str, source: str, record: str) -> None:
        super().__init__(name)
        self.folder, self.source, self.record = folder, source, record

    def prep(self) -> None:
        self.latencies: list[int] = []
        self.first = self.last = 0.0

    def step(self, data_chunks: dict[str, cp.DataChunk]) -> None:
        stamp = data_chunks[self.source].get(self.record)["timestamp"]
        # Both stamps in cluster time: the Worker's clock offset cancels out.
        self.latencies.append(cp.cluster_time_ns() - stamp)
        self.last = time.perf_counter()
        if len(self.latencies) == 1:
            self.first = self.last

    def teardown(self) -> None:
        result = {
            "received": len(self.latencies),
            "seconds": self.last - self.first,
            "latencies_ns": self.latencies,
        }
        Path(self.folder, f"{self.name}.json").write_text(json.dumps(result))


class AsyncTimingSink(TimingSink):
    async def step(self, data_chunks: dict[str, cp.DataChunk]) -> None:
        super().step(data_chunks)


class Relay(cp.Node):
    def step(self, data_chunks: dict[str, cp.DataChunk]) -> None:
        return None


class Ticker(cp.Node):
    def step(self) -> int:
        time.sleep(0.01)
        return 1


# --- running a cluster ----------------------------------------------------------------


def node_peak_rss_mb() -> list[float]:
    """The peak RSS of every node process (children of this process's zygotes), in MB."""
    peaks = []
    for zygote in children(os.getpid()):
        for node in children(zygote):
            try:
                with open(f"/proc/{node}/status") as status:
                    for line in status:
                        if line.startswith("VmHWM:"):
                            peaks.append(int(line.split()[1]) / 1024)
            except OSError:
                continue
    return peaks


# --- the measurements ---------------------------------------------------------------


async def measure_stream(
    source: cp.Node, folder: str, record: str, seconds: float, sink_type: type = TimingSink
) -> dict:
    sink = sink_type("sink", folder, source=source.name, record=record)
    graph = cp.Graph()
    graph.add_edge(source, sink)
    async with Cluster(folder, 1) as manager:
        await manager.commit_graph(graph, {"w0": [source.name, "sink"]})
        await manager.start()
        await trio.sleep(seconds)
        rss = node_peak_rss_mb()
        await manager.stop()
        await manager.shutdown()
    sent, got = read_result(folder, source.name), read_result(folder, "sink")
    return {
        "sent": sent["sent"],
        "received": got["received"],
        "rate": got["received"] / got["seconds"] if got["seconds"] else 0.0,
        "latencies_ns": got["latencies_ns"],
        "rss_mb": rss,
    }


async def measure_lifecycle(folder: str, nodes: int, workers: int) -> dict:
    chain: list[cp.Node] = [Ticker("n0")] + [Relay(f"n{i}") for i in range(1, nodes)]
    graph = cp.Graph()
    graph.add_nodes_from(chain)
    for upstream, downstream in itertools.pairwise(chain):
        graph.add_edge(upstream, downstream)
    names = [node.name for node in chain]
    per_worker = -(-nodes // workers)
    mapping = {f"w{i}": names[i * per_worker : (i + 1) * per_worker] for i in range(workers)}
    async with Cluster(folder, workers) as manager:
        started = time.perf_counter()
        await manager.commit_graph(graph, mapping)
        commit = time.perf_counter() - started
        await manager.start()
        await trio.sleep(0.3)
        rss = node_peak_rss_mb()
        started = time.perf_counter()
        await manager.stop()
        stop = time.perf_counter() - started
        started = time.perf_counter()
        await manager.shutdown()
        shutdown = time.perf_counter() - started
    return {"commit": commit, "stop": stop, "shutdown": shutdown, "rss_mb": rss}


def lsl_missing() -> str | None:
    """Why Lab Streaming Layer cannot be measured here; None if it can."""
    try:
        import pylsl  # noqa: F401
    except (ImportError, RuntimeError) as exc:  # (RuntimeError: a pylsl without its liblsl)
        return f"{type(exc).__name__}: {exc}"
    return None


async def measure_lsl(rate: float, seconds: float) -> dict:
    """Lab Streaming Layer's paced latency, the same measure (``_lsl.py``, in processes).

    Raises:
        SystemExit: ``_lsl.py`` failed (what it printed is shown).
    """
    script = os.path.join(_HERE, "_lsl.py")
    command = [sys.executable, script, "--rate", str(rate), "--seconds", str(seconds)]
    done = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"_lsl.py failed ({done.returncode}):\n{done.stderr.decode()}")
    return json.loads(done.stdout)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    streams = ("frames", "frames_copied", "burst", "paced", "paced_async", "paced_lsl")
    results: dict[str, Any] = {key: [] for key in (*streams, "life2", "life20")}
    missing = lsl_missing()
    if missing is not None:
        print(f"Lab Streaming Layer is not measured: {missing}", file=sys.stderr)
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="chimera-bench-") as folder:
            results["frames"].append(
                await measure_stream(FrameSource("camera", folder), folder, "frame", args.seconds)
            )
        with tempfile.TemporaryDirectory(prefix="chimera-bench-") as folder:
            source = FrameSource("camera", folder, writeable=True)
            results["frames_copied"].append(
                await measure_stream(source, folder, "frame", args.seconds)
            )
        with tempfile.TemporaryDirectory(prefix="chimera-bench-") as folder:
            source = SmallSource("sensor", folder, rate=None)
            results["burst"].append(await measure_stream(source, folder, "samples", args.seconds))
        with tempfile.TemporaryDirectory(prefix="chimera-bench-") as folder:
            source = SmallSource("sensor", folder, rate=1000.0)
            results["paced"].append(await measure_stream(source, folder, "samples", args.seconds))
        with tempfile.TemporaryDirectory(prefix="chimera-bench-") as folder:
            source = AsyncSmallSource("sensor", folder, rate=1000.0)
            results["paced_async"].append(
                await measure_stream(source, folder, "samples", args.seconds, AsyncTimingSink)
            )
        if missing is None:
            results["paced_lsl"].append(await measure_lsl(1000.0, args.seconds))
        with tempfile.TemporaryDirectory(prefix="chimera-bench-") as folder:
            results["life2"].append(await measure_lifecycle(folder, 2, 1))
        with tempfile.TemporaryDirectory(prefix="chimera-bench-") as folder:
            results["life20"].append(await measure_lifecycle(folder, 20, 2))
    return results


def _lsl_rows(lsl: list[dict], paced: list[float], paced_async: list[float]) -> list[tuple]:
    """The rows of Lab Streaming Layer's paced latency, run between the others."""
    if not lsl:
        return [("Lab Streaming Layer, paced 1 kHz p50", "not run (no pylsl)", "")]
    p50 = statistics.median(r["p50_us"] for r in lsl)
    p99 = statistics.median(r["p99_us"] for r in lsl)
    ratios = f"{percentile(paced, 50) / p50:.2f}x / {percentile(paced_async, 50) / p50:.2f}x"
    return [
        ("Lab Streaming Layer, paced 1 kHz p50 / p99", f"{p50:,.0f} / {p99:,.0f} µs", ""),
        ("1 KB paced p50 / LSL's: def step / async def", ratios, ""),
    ]


def summarize(results: dict[str, Any]) -> tuple[str, list[str]]:
    def median(key: str, field: str) -> float:
        return statistics.median(r[field] for r in results[key])

    def latencies(key: str) -> list[float]:
        return [ns / 1e3 for r in results[key] for ns in r["latencies_ns"]]  # µs

    frames_lat, burst_lat, paced_lat = latencies("frames"), latencies("burst"), latencies("paced")
    async_lat = latencies("paced_async")
    copied_lat = latencies("frames_copied")
    streams = ("frames", "frames_copied", "burst", "paced", "paced_async")
    lost = [r["sent"] - r["received"] for key in streams for r in results[key]]
    rss = [mb for key in results for r in results[key] for mb in r.get("rss_mb", ())]
    rows = [
        ("1080p frames delivered", f"{median('frames', 'rate'):,.0f} fps", ">= 300 fps"),
        ("1080p latency p50", f"{percentile(frames_lat, 50) / 1e3:.2f} ms", "<= 5 ms"),
        ("1080p latency p99", f"{percentile(frames_lat, 99) / 1e3:.2f} ms", ""),
        ("1080p writeable frames (copied)", f"{median('frames_copied', 'rate'):,.0f} fps", ""),
        ("the same, latency p50", f"{percentile(copied_lat, 50) / 1e3:.2f} ms", ""),
        ("chunks lost (all streams)", f"{sum(lost)}", "0"),
        ("1 KB burst", f"{median('burst', 'rate'):,.0f} chunks/s", ">= 30,000/s"),
        ("1 KB paced 1 kHz p50", f"{percentile(paced_lat, 50):,.0f} µs", "<= 200 µs"),
        ("1 KB paced 1 kHz p99", f"{percentile(paced_lat, 99):,.0f} µs", ""),
        ("1 KB paced 1 kHz p50, async def", f"{percentile(async_lat, 50):,.0f} µs", "<= 200 µs"),
        ("1 KB paced 1 kHz p99, async def", f"{percentile(async_lat, 99):,.0f} µs", ""),
        ("1 KB burst latency p50", f"{percentile(burst_lat, 50):,.0f} µs", ""),
        *_lsl_rows(results["paced_lsl"], paced_lat, async_lat),
        ("commit_graph, 2 nodes", f"{median('life2', 'commit'):.2f} s", "<= 1 s"),
        ("commit_graph, 20 nodes / 2 workers", f"{median('life20', 'commit'):.2f} s", "<= 3 s"),
        ("stop, 20 nodes", f"{median('life20', 'stop'):.2f} s", ""),
        ("shutdown, 20 nodes", f"{median('life20', 'shutdown'):.2f} s", "<= 1 s"),
        ("node peak RSS (max)", f"{max(rss):.0f} MB" if rss else "?", "<= 120 MB"),
        (
            f"node peak RSS, each of {len(rss)} node processes",
            f"{min(rss):.0f}-{max(rss):.0f} MB" if rss else "?",
            "",
        ),
    ]
    table = ["| measure | chimera | target |", "|---|---:|---:|"]
    table += [f"| {name} | {value} | {target} |" for name, value, target in rows]
    checks = [
        ("1080p >= 300 fps", median("frames", "rate") >= 300),
        ("1080p p50 <= 5 ms", percentile(frames_lat, 50) <= 5000),
        ("nothing lost", sum(lost) == 0),
        ("1 KB burst >= 30k/s", median("burst", "rate") >= 30_000),
        ("1 KB paced p50 <= 200 µs", percentile(paced_lat, 50) <= 200),
        ("1 KB paced p50 <= 200 µs, async def", percentile(async_lat, 50) <= 200),
        ("commit 2 nodes <= 1 s", median("life2", "commit") <= 1),
        ("commit 20 nodes <= 3 s", median("life20", "commit") <= 3),
        ("shutdown <= 1 s", median("life20", "shutdown") <= 1),
        ("node RSS <= 120 MB", bool(rss) and max(rss) <= 120),
    ]
    return "\n".join(table), [f"- {name}: {'ok' if ok else 'MISSED'}" for name, ok in checks]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each stream")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s streams")
    parser.add_argument("--json", metavar="PATH", help="also write the raw results to PATH")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds = 1.0, 1
    started = time.perf_counter()
    results = trio.run(run, args)
    table, checks = summarize(results)
    print(table)
    print("\nTargets:")
    print("\n".join(checks))
    elapsed = time.perf_counter() - started
    print(f"\n(total {elapsed:.0f} s, {args.rounds} rounds of {args.seconds} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
