"""Streaming metrics on hand-made timelines."""

import math

from streamvox.bench.metrics import StreamTimeline, percentile, stalls


def test_a_stream_that_keeps_ahead_never_stalls():
    timeline = StreamTimeline((0.2, 0.25, 0.3, 0.6), (0.1, 0.2, 0.4, 0.4))
    assert timeline.ttfa_s == 0.2 and stalls(timeline) == (0, 0.0)


def test_one_known_gap_is_one_stall_of_its_length():
    # 0.5 s of audio arrives at once, then the next piece comes 0.8 s later: the player waited 0.3 s
    timeline = StreamTimeline((1.0, 1.8, 1.9), (0.5, 0.5, 0.5))
    count, underrun_s = stalls(timeline)
    assert count == 1 and math.isclose(underrun_s, 0.3)
    assert stalls(timeline, prebuffer_s=0.3) == (0, 0.0)  # a client buffer of the gap's length hides it


def test_percentiles_interpolate():
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([5.0], 90) == 5.0 and math.isnan(percentile([], 50))
