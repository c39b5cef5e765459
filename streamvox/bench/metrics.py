"""Streaming metrics with one definition everywhere (DESIGN.md §8). Pure Python.

For one request: t0 = sent, a_i = arrival of audio piece i, d_i = its duration. TTFA = a_0 - t0. Piece i >= 1
stalls when p + sum(d_j, j < i) < a_i - a_0 (p = client prebuffer); underrun_s is the total gap time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class StreamTimeline:
    """What a client saw of one request: arrival times (s after sending) and durations (s) of audio pieces."""

    arrivals_s: tuple[float, ...]
    durations_s: tuple[float, ...]

    @property
    def ttfa_s(self) -> float:
        return self.arrivals_s[0] if self.arrivals_s else math.inf


def stalls(timeline: StreamTimeline, prebuffer_s: float = 0.0) -> tuple[int, float]:
    """(pieces that stall, underrun seconds). A player that waits whenever it runs dry has waited, in all,
    for the largest lateness of any piece against the uninterrupted schedule: that is the underrun."""
    if not timeline.arrivals_s:
        return 0, 0.0
    start, received_s, count, underrun_s = timeline.arrivals_s[0], prebuffer_s, 0, 0.0
    for i, (arrival, duration) in enumerate(zip(timeline.arrivals_s, timeline.durations_s, strict=True)):
        lateness = arrival - start - received_s
        if i and lateness > 1e-9:
            count += 1
            underrun_s = max(underrun_s, lateness)
        received_s += duration
    return count, underrun_s


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    if ordered[low] == ordered[high]:  # also keeps inf (failed requests) from turning into nan
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
