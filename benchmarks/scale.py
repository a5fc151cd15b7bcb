#!/usr/bin/env python3
"""Benchmark of a chimera cluster as it grows: many nodes, deep chains, wide fan-out.

Everything runs as a user would run it: an ``AsyncManager`` and 3
``AsyncWorker``\\ s in this process, each node in a child process of its own,
the ``tcp`` transport on loopback. Measured:

1. **Many nodes**: for each size in ``--sizes`` (default 30, 60 and 150
   nodes), one source per 15 nodes, each at 100 Hz feeding a chain of 14
   relays, the nodes dealt round-robin over the 3 Workers (so most hops cross
   Workers). ``commit_graph``, ``stop`` and ``shutdown`` times; whether every
   chunk each source sent reached the end of its chain, in order; the
   end-to-end latency (chain's end minus the source's record timestamp, both
   cluster time) p50/p99, and per hop.
2. **Fan-out**: one source at 200 Hz sending 100 KB arrays to 25 sinks over
   the 3 Workers: chunks lost (sent x 25 - stepped), latency p50/p99 over
   all sinks, and the worst sink's p99.

A node process costs ~35-45 MB and a 2-core machine steps 150 of them at
100 Hz with little to spare: the figures say how the cluster degrades, not a
target. Issue #3's lifecycle targets (commit <= 3 s for 20 nodes) are
``pipeline.py``'s.

Usage::

    python benchmarks/scale.py               # everything (~2 minutes)
    python benchmarks/scale.py --quick       # a smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import trio
from _cluster import Cluster, percentile, read_result  # (this script's folder)

import chimera as cp

WORKERS = 3
CHAIN = 15  # a source and its 14 relays

# --- the nodes (pickled by value into their processes) ------------------------------


class Source(cp.Node):
    """Sends its sequence number (and *size* bytes of payload) *rate* times a second."""

    def __init__(self, name: str, folder: str, rate: float, size: int = 0) -> None:
        super().__init__(name)
        self.folder, self.rate, self.size = folder, rate, size

    def prep(self) -> None:
        self.payload = np.zeros(self.size, dtype=np.uint8)
        self.payload.flags.writeable = False  # (it never changes: sent without a copy)
        self.sent = 0
        self.next = time.perf_counter()

    def step(self) -> cp.DataChunk:
        self.next += 1 / self.rate
        delay = self.next - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        chunk = cp.DataChunk()
        chunk.add("seq", self.sent)
        if self.size:
            chunk.add("payload", self.payload, "array")
        self.sent += 1
        return chunk

    def teardown(self) -> None:
        Path(self.folder, f"{self.name}.json").write_text(json.dumps({"sent": self.sent}))


class Relay(cp.Node):
    """Passes on the chunk of its one input, as it came (its timestamps kept)."""

    def __init__(self, name: str, source: str) -> None:
        super().__init__(name)
        self.source = source

    def step(self, data_chunks: dict[str, cp.DataChunk]) -> cp.DataChunk:
        return data_chunks[self.source]


class End(cp.Node):
    """Keeps each chunk's sequence number and latency (now minus the record's timestamp)."""

    def __init__(self, name: str, folder: str, source: str) -> None:
        super().__init__(name)
        self.folder, self.source = folder, source

    def prep(self) -> None:
        self.seqs: list[int] = []
        self.latencies: list[int] = []

    def step(self, data_chunks: dict[str, cp.DataChunk]) -> None:
        record = data_chunks[self.source].get("seq")
        self.latencies.append(cp.cluster_time_ns() - record["timestamp"])
        self.seqs.append(record["value"])

    def teardown(self) -> None:
        result = {"seqs": self.seqs, "latencies_ns": self.latencies}
        Path(self.folder, f"{self.name}.json").write_text(json.dumps(result))


# --- the measurements ---------------------------------------------------------------


def _dealt(names: list[str]) -> dict[str, list[str]]:
    """*names* dealt round-robin over the Workers ``w0``, ``w1``, ..."""
    return {f"w{i}": names[i::WORKERS] for i in range(WORKERS)}


async def measure_size(folder: str, nodes: int, seconds: float) -> dict[str, Any]:
    graph = cp.Graph()
    names: list[str] = []
    chains = max(1, nodes // CHAIN)
    for c in range(chains):
        upstream: cp.Node = Source(f"s{c}", folder, rate=100.0)
        names.append(upstream.name)
        for k in range(1, CHAIN - 1):
            relay = Relay(f"s{c}r{k}", source=upstream.name)
            graph.add_edge(upstream, relay)
            names.append(relay.name)
            upstream = relay
        end = End(f"s{c}end", folder, source=upstream.name)
        graph.add_edge(upstream, end)
        names.append(end.name)
    async with Cluster(folder, WORKERS) as manager:
        started = time.perf_counter()
        await manager.commit_graph(graph, _dealt(names))
        commit = time.perf_counter() - started
        await manager.start()
        await trio.sleep(seconds)
        started = time.perf_counter()
        await manager.stop()
        stop = time.perf_counter() - started
        started = time.perf_counter()
        await manager.shutdown()
        shutdown = time.perf_counter() - started
    sent = [read_result(folder, f"s{c}")["sent"] for c in range(chains)]
    ends = [read_result(folder, f"s{c}end") for c in range(chains)]
    return {
        "nodes": chains * CHAIN,
        "commit": commit,
        "stop": stop,
        "shutdown": shutdown,
        "sent": sum(sent),
        "in_order": all(end["seqs"] == list(range(n)) for end, n in zip(ends, sent, strict=True)),
        "received": sum(len(end["seqs"]) for end in ends),
        "latencies_ns": [lat for end in ends for lat in end["latencies_ns"]],
    }


async def measure_fan_out(folder: str, sinks: int, seconds: float) -> dict[str, Any]:
    graph = cp.Graph()
    source = Source("source", folder, rate=200.0, size=100_000)
    ends = [End(f"sink{i}", folder, source="source") for i in range(sinks)]
    for end in ends:
        graph.add_edge(source, end)
    async with Cluster(folder, WORKERS) as manager:
        await manager.commit_graph(graph, _dealt(["source", *(end.name for end in ends)]))
        await manager.start()
        await trio.sleep(seconds)
        await manager.stop()
        await manager.shutdown()
    sent = read_result(folder, "source")["sent"]
    got = [read_result(folder, end.name) for end in ends]
    return {
        "sinks": sinks,
        "sent": sent,
        "lost": sent * sinks - sum(len(end["seqs"]) for end in got),
        "latencies_ns": [lat for end in got for lat in end["latencies_ns"]],
        "worst_p99_ns": max(percentile(end["latencies_ns"], 99) for end in got),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"sizes": [], "fan_out": None}
    for nodes in args.sizes:
        print(f"{nodes} nodes over {WORKERS} workers, {args.seconds:g} s ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="chimera-bench-") as folder:
            results["sizes"].append(await measure_size(folder, nodes, args.seconds))
    print(f"fan-out to {args.sinks} sinks, {args.seconds:g} s ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="chimera-bench-") as folder:
        results["fan_out"] = await measure_fan_out(folder, args.sinks, args.seconds)
    return results


def summarize(results: dict[str, Any]) -> str:
    rows = [
        "| nodes | commit | stop | shutdown | chunks sent / at the chains' ends | "
        "in order | end-to-end p50 / p99 | per hop p50 |",
        "|---:|---:|---:|---:|---:|:---:|---:|---:|",
    ]
    for size in results["sizes"]:
        p50 = percentile(size["latencies_ns"], 50) / 1e6
        p99 = percentile(size["latencies_ns"], 99) / 1e6
        rows.append(
            f"| {size['nodes']} | {size['commit']:.2f} s | {size['stop']:.2f} s | "
            f"{size['shutdown']:.2f} s | {size['sent']:,} / {size['received']:,} | "
            f"{'yes' if size['in_order'] else 'NO'} | {p50:.1f} / {p99:.1f} ms | "
            f"{p50 / (CHAIN - 1) * 1000:.0f} µs |"
        )
    fan = results["fan_out"]
    rows += [
        "",
        "| fan-out, 100 KB at 200 Hz | sent | lost | p50 / p99 (all sinks) | worst sink's p99 |",
        "|---|---:|---:|---:|---:|",
        f"| 1 source -> {fan['sinks']} sinks | {fan['sent']:,} | {fan['lost']:,} | "
        f"{percentile(fan['latencies_ns'], 50) / 1e6:.1f} / "
        f"{percentile(fan['latencies_ns'], 99) / 1e6:.1f} ms | "
        f"{fan['worst_p99_ns'] / 1e6:.1f} ms |",
    ]
    return "\n".join(rows)


def _sizes(text: str) -> list[int]:
    """``30,60,150``: node counts, each a multiple of 15 from 15 to 600."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(not (CHAIN <= n <= 600 and n % CHAIN == 0) for n in sizes):
        raise argparse.ArgumentTypeError(
            f"expected node counts, multiples of {CHAIN} from {CHAIN} to 600, not {text!r}"
        )
    return sizes


def _count(text: str) -> int:
    """A count from 1 to 200 (an argparse type)."""
    if not text.isdecimal() or not 1 <= int(text) <= 200:
        raise argparse.ArgumentTypeError(f"expected a count from 1 to 200, not {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=_sizes, default=[30, 60, 150], help="default: 30,60,150")
    parser.add_argument("--sinks", type=_count, default=25, help="fan-out sinks (default: 25)")
    parser.add_argument("--seconds", type=float, default=10.0, help="each run's length")
    parser.add_argument("--quick", action="store_true", help="30 nodes, 5 sinks, 2 s")
    parser.add_argument("--json", metavar="PATH", help="also write the raw results to PATH")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.sinks, args.seconds = [30], 5, 2.0
    started = time.perf_counter()
    results = trio.run(run, args)
    print(summarize(results))
    print(f"\n(total {time.perf_counter() - started:.0f} s, runs of {args.seconds:g} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
