"""A client playing one stream as its pieces arrive: the stall and underrun of DESIGN.md §8, one definition for the
server's metrics, the benchmarks and the tests. Pure Python.

Piece i >= 1 stalls when p + sum(d_j, j < i) < a_i - a_0 (p: the client's prebuffer, d_j: durations, a_i:
arrivals). A player that waits whenever it runs dry has waited, in all, for the largest lateness of any piece
against the uninterrupted schedule: that is the stream's underrun.
"""

from __future__ import annotations

LATE_EPSILON_S = 1e-9  # a piece exactly on time is not late


class Playout:
    def __init__(self, prebuffer_s: float = 0.0) -> None:
        self.first_s: float | None = None
        self.num_pieces = 0
        self.received_s = prebuffer_s  # audio the client had, prebuffer included, before the next piece
        self.num_late = 0
        self.underrun_s = 0.0

    def add(self, arrival_s: float, duration_s: float) -> float:
        """A piece of `duration_s` seconds arrived at `arrival_s`; returns what it added to the underrun."""
        if self.first_s is None:
            self.first_s = arrival_s
        lateness, added = arrival_s - self.first_s - self.received_s, 0.0
        if self.num_pieces and lateness > LATE_EPSILON_S:
            self.num_late += 1
            added = max(0.0, lateness - self.underrun_s)
            self.underrun_s += added
        self.num_pieces += 1
        self.received_s += duration_s
        return added
