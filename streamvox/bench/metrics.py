"""Streaming metrics with one definition everywhere (DESIGN.md §8). Pure Python.

For one request: t0 = sent, a_i = arrival of audio piece i, d_i = its duration. TTFA = a_0 - t0. Piece i >= 1
stalls when p + sum(d_j, j < i) < a_i - a_0 (p = client prebuffer); underrun_s is the total gap time
(streamvox.playout, shared with the server's metrics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from streamvox.playout import Playout


@dataclass(frozen=True)
class StreamTimeline:
    """What a client saw of one request: arrival times (s after sending) and durations (s) of audio pieces."""

    arrivals_s: tuple[float, ...]
    durations_s: tuple[float, ...]

    @property
    def ttfa_s(self) -> float:
        return self.arrivals_s[0] if self.arrivals_s else math.inf


def stalls(timeline: StreamTimeline, prebuffer_s: float = 0.0) -> tuple[int, float]:
    """(pieces that stall, underrun seconds), as streamvox.playout defines them."""
    playout = Playout(prebuffer_s)
    for arrival, duration in zip(timeline.arrivals_s, timeline.durations_s, strict=True):
        playout.add(arrival, duration)
    return playout.num_late, playout.underrun_s


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
