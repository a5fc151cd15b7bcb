#!/usr/bin/env python3
"""Lab Streaming Layer's one-way latency on this machine, for comparison (needs ``pylsl``).

The same measure as ``pipeline.py``'s paced 1 KB chunks: one process pushes a
sample of 256 float32 channels (1 KB) at *rate* per second, paced as
``SmallSource`` is (``time.sleep`` until the next deadline); another pulls
each sample and takes ``local_clock()`` minus the sample's timestamp (set at
``push_sample``, on the same clock). Prints one JSON object: ``received``,
``p50_us``, ``p99_us``.

Usage::

    python benchmarks/_lsl.py --rate 1000 --seconds 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import pylsl

CHANNELS = 256  # float32: 1 KB a sample
#: How long the pushing process waits for the puller to subscribe.
CONNECT_TIMEOUT = 10.0


def push(source_id: str, rate: float, seconds: float) -> None:
    info = pylsl.StreamInfo("chimera-bench", "bench", CHANNELS, rate, "float32", source_id)
    outlet = pylsl.StreamOutlet(info)
    if not outlet.wait_for_consumers(CONNECT_TIMEOUT):
        raise SystemExit("no inlet subscribed")
    time.sleep(0.5)  # (as the pipeline's streams: the link is up before the first sample)
    sample = np.zeros(CHANNELS, dtype=np.float32)
    deadline = time.perf_counter() + seconds
    next_ = time.perf_counter()
    while next_ < deadline:
        next_ += 1 / rate
        delay = next_ - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        outlet.push_sample(sample)
    time.sleep(0.5)  # until the inlet has pulled the last one


def pull(rate: float, seconds: float) -> dict[str, float]:
    source_id = f"chimera-bench-{time.monotonic_ns()}"
    command = [sys.executable, __file__, "--push", source_id, "--rate", str(rate)]
    pusher = subprocess.Popen([*command, "--seconds", str(seconds)], stderr=subprocess.DEVNULL)
    try:
        streams = pylsl.resolve_byprop("source_id", source_id, timeout=CONNECT_TIMEOUT)
        if not streams:
            raise SystemExit("the pushing process's stream was not found")
        inlet = pylsl.StreamInlet(streams[0])
        inlet.open_stream(timeout=CONNECT_TIMEOUT)
        latencies = []
        while True:
            _, timestamp = inlet.pull_sample(timeout=1.0)
            if timestamp is None:
                if latencies or pusher.poll() is not None:
                    break
                continue
            latencies.append(pylsl.local_clock() - timestamp)
    finally:
        pusher.kill()
        pusher.wait()
    if not latencies:
        raise SystemExit("no sample arrived")
    microseconds = np.array(latencies) * 1e6
    return {
        "received": len(latencies),
        "p50_us": float(np.percentile(microseconds, 50)),
        "p99_us": float(np.percentile(microseconds, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--push", metavar="SOURCE_ID", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.push:
        push(args.push, args.rate, args.seconds)
    else:
        print(json.dumps(pull(args.rate, args.seconds)))


if __name__ == "__main__":
    main()
