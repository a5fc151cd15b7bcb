"""Cluster time: a Worker's estimate of the offset from its clock to the Manager's.

Every timestamp chimera writes is the Manager's wall clock, in ns. A Worker
measures the offset of its own clock NTP-style over its control connection:
it stamps a request when it leaves (``t0``, its clock), the Manager stamps its
arrival and its answer (``t1``, ``t2``, the Manager's clock), the Worker
stamps the answer's arrival (``t3``)::

    offset = ((t1 - t0) + (t2 - t3)) / 2        Manager clock - Worker clock
    delay  = (t3 - t0) - (t2 - t1)              the round trip on the wire

The true offset lies within ``delay / 2`` of the measured one, whichever way
the delay splits. Samples that met a queue on the way are far off, so the
estimate keeps the samples with the lowest delays: the offset of the
lowest-delay sample among the recent ones, its error bound ``delay / 2``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ClockEstimate", "ClockEstimator"]


@dataclass(frozen=True)
class ClockEstimate:
    """The offset from a Worker's clock to the Manager's, and how sure it is."""

    #: Manager clock - Worker clock, in ns.
    offset_ns: int
    #: The true offset is within this many ns of :attr:`offset_ns`.
    error_ns: int
    #: How many samples the estimate is drawn from.
    samples: int


class ClockEstimator:
    """Estimates the offset to a reference clock from request/answer timestamps.

    Keeps the last *window* samples; the estimate is the lowest-delay one.

    Args:
        window: how many recent samples to choose from (a clock drifts, so old
            samples go).
        clock: the local clock, in ns (``time.time_ns`` by default).

    Raises:
        ValueError: *window* is not positive.
    """

    def __init__(self, window: int = 64, clock: Callable[[], int] = time.time_ns) -> None:
        if window < 1:
            raise ValueError(f"window must be positive, not {window}")
        self._samples: deque[tuple[int, int]] = deque(maxlen=window)  # (delay, offset)
        self._clock = clock

    def add(self, t0: int, t1: int, t2: int, t3: int) -> None:
        """Add one exchange: sent at *t0*, received at *t1*, answered at *t2*
        (the reference clock), answer received at *t3* (the local clock), all ns.

        Raises:
            ValueError: the timestamps are impossible (the answer came back
                before the request left, or was sent before it arrived).
        """
        if t3 < t0 or t2 < t1:
            raise ValueError(f"impossible exchange: t0={t0} t1={t1} t2={t2} t3={t3}")
        delay = (t3 - t0) - (t2 - t1)
        offset = ((t1 - t0) + (t2 - t3)) // 2
        self._samples.append((max(delay, 0), offset))

    def estimate(self) -> ClockEstimate | None:
        """The best estimate so far, or None before the first sample."""
        if not self._samples:
            return None
        delay, offset = min(self._samples)
        return ClockEstimate(
            offset_ns=offset, error_ns=(delay + 1) // 2, samples=len(self._samples)
        )

    def now(self) -> int:
        """Cluster time: the local clock plus the estimated offset, in ns (the
        local clock alone before the first sample)."""
        estimate = self.estimate()
        return self._clock() + (estimate.offset_ns if estimate is not None else 0)
