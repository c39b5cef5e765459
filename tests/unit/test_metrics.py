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


def test_a_rate_summary_counts_stalls_errors_and_the_slo():
    from streamvox.bench.serve import LoadSpec, summarise

    spec = LoadSpec(rates=(1.0,), slo_s=0.5)
    smooth = StreamTimeline((0.2, 0.25, 0.3), (0.1, 0.2, 0.4))
    gap = StreamTimeline((0.3, 1.1, 1.2), (0.5, 0.5, 0.5))  # the player waits 0.3 s before the second piece
    row = summarise(1.0, [smooth] * 8 + [gap, None], ["HTTP 429: busy"], spec)
    assert row["requests"] == 10 and row["errors"] == 1
    assert row["viable_share"] == 0.8  # the stalled one and the failed one are not viable
    assert math.isclose(row["underrun_s_max"], 0.3) and math.isclose(row["chunk_stall_rate"], 1 / 18)
    assert row["ttfa_p50_s"] == 0.2 and row["ttfa_p99_s"] == math.inf  # a failed request never started playing
    assert not row["meets_slo"]
    assert summarise(1.0, [smooth] * 10, [], spec)["meets_slo"]
    assert not summarise(1.0, [StreamTimeline((0.7,), (1.0,))] * 10, [], spec)["meets_slo"]  # p90 TTFA 0.7 s


def test_goodput_is_the_highest_rate_that_meets_the_slo():
    from streamvox.bench.serve import goodput

    rows = [{"rate_rps": r, "meets_slo": ok} for r, ok in [(0.5, True), (1.0, False), (2.0, True), (3.0, False)]]
    assert goodput(rows) == 2.0
    assert goodput([{"rate_rps": 0.5, "meets_slo": False}]) == 0.0


def test_percentiles_of_failed_requests_stay_infinite():
    from streamvox.bench.metrics import percentile

    inf = float("inf")
    assert percentile([0.2, 0.3, inf, inf], 90) == inf and percentile([0.2, inf, inf, inf], 50) == inf
    assert percentile([0.1, 0.3], 50) == 0.2


def test_arrivals_are_seeded_gamma_with_the_rate_as_mean():
    from streamvox.bench.serve import LoadSpec, schedule

    spec = LoadSpec(rates=(2.0,), num_requests=4000, window_s=1e9, burstiness=0.5)
    plan = schedule(spec, 2.0)
    assert plan == schedule(spec, 2.0)  # every system gets the same requests at the same moments
    gaps = [b.send_s - a.send_s for a, b in zip(plan, plan[1:], strict=False)]
    mean = sum(gaps) / len(gaps)
    cv2 = sum((g - mean) ** 2 for g in gaps) / len(gaps) / mean**2
    assert abs(mean - 0.5) < 0.03 and abs(cv2 - 2.0) < 0.3  # Gamma shape 0.5: squared variation 1/shape
    assert all(p.max_tokens == max(7, round(len(p.text) / 14 * 82)) for p in plan)
    assert LoadSpec(rates=(0.05,)).requests_at(0.05) == 15 and LoadSpec(rates=(0.01,)).requests_at(0.01) == 10
