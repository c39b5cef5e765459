"""Scheduling policies under load: a fake clock and a fake runner whose step time grows with the tokens in it.

The simulated client plays each stream from its first chunk on, with no prebuffer; a chunk that arrives after
the audio before it has finished playing is a stall (DESIGN.md §8).
"""

from dataclasses import dataclass, field

import pytest

from streamvox.batch import AudioChunk, AudioPlan, StepOutput
from streamvox.config import SamplingParams, SchedulerConfig
from streamvox.sched.kv_blocks import BlockPool
from streamvox.sched.playback import PlaybackTracker
from streamvox.sched.policy import StreamingPolicy
from streamvox.sched.request import Request
from streamvox.sched.scheduler import QueueFullError, Scheduler
from streamvox.sched.timing import StepTimer

PLAN = AudioPlan(lm_steps_per_frame=7, frame_s=2048 / 24000, first_chunk_frames=1, frames_per_chunk=1,
                 lookahead_frames=2)
CODEC_S = 0.004  # a fake codec call


@dataclass
class Stream:
    request: Request
    arrival_s: float
    plan: AudioPlan = PLAN
    chunk_times: list[float] = field(default_factory=list)
    chunk_frames: list[int] = field(default_factory=list)
    num_frames_sent: int = 0
    is_closed: bool = False  # its last chunk went out

    @property
    def ready_frames(self) -> int:
        frames = self.request.num_output_tokens // self.plan.lm_steps_per_frame
        return self.plan.decodable_end(frames, self.request.is_finished)

    @property
    def is_closing(self) -> bool:
        return self.request.is_finished and not self.is_closed

    @property
    def has_audio_left(self) -> bool:
        return not self.is_closed

    def decode(self, at_s: float) -> AudioChunk:
        """The codec decodes every ready frame, done at `at_s`."""
        start, end = self.num_frames_sent, self.ready_frames
        is_last = self.request.is_finished and end == self.request.num_output_tokens // self.plan.lm_steps_per_frame
        if end > start:
            self.chunk_times.append(at_s)
            self.chunk_frames.append(end - start)
        self.num_frames_sent, self.is_closed = end, is_last
        return AudioChunk(self.request.request_id, None, start, end, is_last)

    @property
    def ttfa_s(self) -> float:
        return self.chunk_times[0] - self.arrival_s

    def stalls(self) -> int:
        """Chunks that arrived after the audio received before them had played out."""
        played_s, count = 0.0, 0
        for i, at in enumerate(self.chunk_times):
            if i and played_s < at - self.chunk_times[0] - 1e-9:
                count += 1
            played_s += self.chunk_frames[i] * self.plan.frame_s
        return count


def simulate(policy: str, arrivals: list[tuple[float, int, int]], step_s, num_blocks=4096, max_wait_s=None,
             refused=None, plan=PLAN, **limits):
    """Run (arrival_s, prompt_len, num_tokens) requests to the end; returns the streams and the smallest time any
    stream with audio had left before its client ran dry, seen after each step. `step_s(num_tokens)`, or
    `step_s(num_tokens, num_context)` when it takes two arguments. The codec decodes what the scheduler plans,
    each chunk done CODEC_S after its step. With `max_wait_s`, requests refused at once or after waiting go to
    `refused` as (arrival_s, refused_at_s)."""
    config = SchedulerConfig(policy=policy, **{"max_queue_len": 1000, "ttfa_target_s": 1.0, **limits})
    playback = PlaybackTracker(plan, config.ttfa_target_s, config.client_prebuffer_s)
    timer = StepTimer()
    pool = BlockPool(num_blocks, 16)
    scheduler = Scheduler(config, pool, playback, timer, max_wait_s)
    cost = step_s if step_s.__code__.co_argcount == 2 else (lambda tokens, context: step_s(tokens))
    if max_wait_s is not None:  # as the engine's warm-up does: measure a few batch sizes and contexts first
        timer.begin_prior()
        for rows, context in [(1, 20), (4, 80), (8, 160), (4, 4000)]:
            for _ in range(10):
                timer.observe_step(rows, rows, context, cost(rows, context))
        timer.keep_as_prior()
    now, pending, streams, min_margin_s = 0.0, sorted(arrivals), {}, float("inf")
    max_committed = 0
    while pending or scheduler.has_unfinished() or any(s.has_audio_left for s in streams.values()):
        while pending and pending[0][0] <= now:
            at, prompt_len, num_tokens = pending.pop(0)
            request_id = f"r{len(streams)}"
            sampling = SamplingParams(max_tokens=num_tokens, ignore_eos=True, seed=0)
            stream = Stream(Request(request_id, tuple(range(prompt_len)), sampling, 0), at, plan)
            try:
                scheduler.add_request(stream.request, at)
            except QueueFullError:
                refused.append((at, at))
                continue
            streams[request_id] = stream
        ready = [(s.request.request_id, s.ready_frames - s.num_frames_sent, s.request.is_finished)
                 for s in streams.values() if s.ready_frames > s.num_frames_sent or s.is_closing]
        batch = scheduler.schedule(now, ready)
        if batch is None:
            now = pending[0][0] if pending else now + 0.01
            continue
        max_committed = max(max_committed, scheduler.num_committed_blocks)
        assert sum(len(r.block_ids) for r in scheduler.running) <= pool.num_blocks
        elapsed = cost(batch.num_tokens, batch.num_context_tokens) if batch.rows else 0.0
        now += elapsed
        if batch.rows:
            timer.observe_step(len(batch.rows), batch.num_tokens, batch.num_context_tokens, elapsed)
        chunks = [streams[request_id].decode(now + CODEC_S) for request_id in batch.codec_request_ids]
        timer.observe_codec(CODEC_S)
        sampled = [row.request_id for row in batch.rows if row.is_sampled]
        output = StepOutput(tuple(sampled), (0,) * len(sampled), (False,) * len(sampled))
        for request in scheduler.update(batch, output, chunks, now + CODEC_S):
            if request.finish_reason.value == "refused":
                refused.append((streams.pop(request.request_id).arrival_s, now))
        for stream in streams.values():
            if stream.chunk_times and stream.has_audio_left:
                played_until = stream.chunk_times[0] + stream.num_frames_sent * plan.frame_s
                min_margin_s = min(min_margin_s, played_until - now)
    assert max_committed <= num_blocks
    return list(streams.values()), min_margin_s


def linear(fixed_s, per_token_s):
    return lambda num_tokens: fixed_s + per_token_s * num_tokens


def test_a_burst_of_long_prompts_stalls_fcfs_but_not_streaming():
    # four streams have just started playing when four long prompts arrive at once
    arrivals = [(0.02 * i, 12, 420) for i in range(4)] + [(0.25, 300, 140) for _ in range(4)]
    step_s = linear(0.004, 0.00025)
    fcfs, _ = simulate("fcfs", arrivals, step_s, ttfa_target_s=1.5)
    streaming, min_margin_s = simulate("streaming", arrivals, step_s, ttfa_target_s=1.5)
    assert sum(s.stalls() for s in fcfs[:4]) > 0, "fcfs runs the whole burst in long steps"
    assert all(s.stalls() == 0 for s in streaming), [s.stalls() for s in streaming]
    assert min_margin_s >= 0, "a running stream's client ran dry"
    assert max(s.ttfa_s for s in streaming) <= 1.5, [round(s.ttfa_s, 3) for s in streaming]


def test_more_streams_than_real_time_allows_stall_fcfs_but_streaming_admits_what_it_can_sustain():
    # 2 ms + 1 ms per token: about 8 streams fit in real time (12.2 ms per step); 14 arrive within a second
    arrivals = [(0.07 * i, 12, 280) for i in range(14)]
    step_s = linear(0.002, 0.001)
    fcfs, _ = simulate("fcfs", arrivals, step_s)
    streaming, min_margin_s = simulate("streaming", arrivals, step_s, realtime_headroom=0.85)
    assert sum(s.stalls() > 0 for s in fcfs) >= 7, "fcfs admits everyone and nobody keeps up"
    assert all(s.stalls() == 0 for s in streaming), [s.stalls() for s in streaming]
    assert min_margin_s >= 0
    assert sum(s.ttfa_s <= 1.0 for s in streaming) >= 8, "the streams it can sustain start on time"


def test_sixty_at_once_get_a_stream_that_never_stalls_or_a_fast_refusal():
    """About ten times what the engine keeps real-time arrives at once (each ~13 s of audio), on a step whose
    cost grows with the context it attends over: those admitted never stall and start within 2 s; the others
    are refused within 2 s of arriving."""
    refused = []
    arrivals = [(0.001 * i, 12, 1200) for i in range(60)]
    streams, min_margin_s = simulate("streaming", arrivals, context_cost, max_wait_s=1.0, refused=refused)
    assert len(streams) + len(refused) == 60 and 3 <= len(streams) <= 12, (len(streams), len(refused))
    assert all(s.stalls() == 0 for s in streams), [s.stalls() for s in streams]
    assert min_margin_s >= 0 and max(s.ttfa_s for s in streams) <= 2.0
    assert all(at - arrived <= 2.0 for arrived, at in refused)


def context_cost(num_tokens, num_context):
    """About 7 streams of 1200 tokens fit real time (12.2 ms a step) at their end, where context costs most."""
    return 0.004 + 0.0004 * num_tokens + 0.0007 * num_context / 1000


@pytest.mark.parametrize("num_streams", [1, 3, 5])
def test_streams_up_to_most_of_capacity_all_start_at_once_and_never_stall(num_streams):
    """N simultaneous streams of ~13 s, N up to 80 % of what the step keeps real-time: all admitted at once,
    TTFA p90 within 0.5 s, no stall."""
    refused = []
    streams, min_margin_s = simulate("streaming", [(0.0, 12, 1200)] * num_streams, context_cost, max_wait_s=1.0,
                                     refused=refused, ttfa_target_s=0.5, realtime_headroom=0.85)
    assert not refused and len(streams) == num_streams
    assert all(s.stalls() == 0 for s in streams), [s.stalls() for s in streams]
    ttfas = sorted(s.ttfa_s for s in streams)
    assert min_margin_s >= 0 and ttfas[int(0.9 * (len(ttfas) - 1))] <= 0.5, ttfas


DEPTH_PLAN = AudioPlan(lm_steps_per_frame=1, frame_s=1920 / 24000, first_chunk_frames=1, frames_per_chunk=1,
                       lookahead_frames=0)  # CSM and Qwen3-TTS: one backbone step (and depth loop) per 80 ms frame


def test_eight_depth_family_streams_at_once_all_play_without_a_stall():
    """8 simultaneous CSM or Qwen3-TTS streams of 100 frames (short prompts), on a step (backbone + depth loop)
    whose cost grows per token: 8 rows take about half of real time, so all are admitted, start within 0.5 s and
    never stall."""
    def step_s(num_tokens, num_context):
        return 0.008 + 0.004 * num_tokens + 0.001 * num_context / 1000

    refused = []
    streams, min_margin_s = simulate("streaming", [(0.0, 6, 100)] * 8, step_s, max_wait_s=1.0, refused=refused,
                                     plan=DEPTH_PLAN)
    assert not refused and len(streams) == 8
    assert all(s.stalls() == 0 for s in streams), [s.stalls() for s in streams]
    assert min_margin_s >= 0 and max(s.ttfa_s for s in streams) <= 0.5, [round(s.ttfa_s, 3) for s in streams]


@pytest.mark.parametrize("policy", ["streaming", "offline", "fcfs"])
def test_admission_never_over_commits_kv_and_everyone_finishes(policy):
    arrivals = [(0.01 * i, 10 + 7 * i % 50, 50 + 13 * i % 200) for i in range(60)]
    streams, _ = simulate(policy, arrivals, linear(0.002, 0.0002), num_blocks=60)
    assert all(s.request.is_finished and s.request.num_output_tokens == s.request.sampling.max_tokens
               for s in streams)


def test_a_cancelled_request_returns_its_blocks_by_the_next_step():
    config = SchedulerConfig(policy="streaming")
    pool = BlockPool(64, 16)
    scheduler = Scheduler(config, pool, PlaybackTracker(PLAN, config.ttfa_target_s, 0.0))
    scheduler.add_request(Request("a", tuple(range(40)), SamplingParams(max_tokens=500, seed=0), 0, 500), 0.0)
    batch = scheduler.schedule(0.0)
    scheduler.update(batch, StepOutput(("a",), (0,), (False,)))
    assert pool.num_free_blocks < 64 and scheduler.num_committed_blocks > 3  # prompt plus expected audio
    scheduler.cancel("a")
    assert scheduler.schedule(0.01).finished_request_ids == ("a",)
    assert pool.is_full and scheduler.num_committed_blocks == 0


@pytest.mark.parametrize("max_tokens", range(17, 23))
def test_preemption_under_tied_slack_never_shares_blocks_within_a_step(max_tokens):
    config = SchedulerConfig(policy="streaming")
    pool = BlockPool(12, 4)
    scheduler = Scheduler(config, pool, PlaybackTracker(PLAN, config.ttfa_target_s, 0.0))
    for request_id, prompt_len in (("a", 6), ("b", 9)):  # admitted together, so their slack ties
        sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=0)
        scheduler.add_request(Request(request_id, tuple(range(prompt_len)), sampling, 0, 4), 0.0)
    for _ in range(500):
        if not scheduler.has_unfinished():
            break
        batch = scheduler.schedule(0.0)
        if batch is None:
            continue
        owned = [b for row in batch.rows for b in scheduler.requests[row.request_id].block_ids]
        assert len(owned) == len(set(owned)), "two rows of one step write the same KV block"
        assert all(scheduler.requests[row.request_id].status.value == "running" for row in batch.rows)
        sampled = [row.request_id for row in batch.rows if row.is_sampled]
        scheduler.update(batch, StepOutput(tuple(sampled), (0,) * len(sampled), (False,) * len(sampled)))
    assert not scheduler.has_unfinished() and pool.is_full


@pytest.mark.parametrize("policy", ["streaming", "offline"])
def test_a_reservation_larger_than_the_pool_does_not_block_the_queue(policy):
    config = SchedulerConfig(policy=policy)
    pool = BlockPool(64, 16)
    scheduler = Scheduler(config, pool, PlaybackTracker(PLAN, config.ttfa_target_s, 0.0))
    huge = SamplingParams(max_tokens=5000, ignore_eos=True, seed=0)
    scheduler.add_request(Request("huge", tuple(range(10)), huge, 0), 0.0)
    scheduler.add_request(Request("small", tuple(range(10)), SamplingParams(max_tokens=5, seed=0), 0), 0.0)
    finished = {}
    for _ in range(20_000):
        batch = scheduler.schedule(0.0)
        if batch is None:
            break
        sampled = [row.request_id for row in batch.rows if row.is_sampled]
        for request in scheduler.update(batch, StepOutput(tuple(sampled), (0,) * len(sampled),
                                                          (False,) * len(sampled))):
            finished[request.request_id] = request.finish_reason.value
    assert finished == {"huge": "capacity", "small": "length"} and pool.is_full


def test_codec_calls_are_fitted_as_a_cost_per_call_plus_a_cost_per_frame():
    timer = StepTimer()
    timer.observe_codec_frames(4, 0.020)
    assert timer.codec_call_s(8) == pytest.approx(0.040)  # one size seen: in proportion to the frames
    for num_frames in (1, 2, 4, 8) * 3:
        timer.observe_codec_frames(num_frames, 0.006 + 0.003 * num_frames)
    assert timer.codec_call_s(1) == pytest.approx(0.009, rel=0.05)
    assert timer.codec_call_s(8) == pytest.approx(0.030, rel=0.05)


def test_capacity_counts_streams_decoded_together_in_one_codec_call():
    """A codec call of 6 ms + 3 ms a frame: 8 frames cost 3.75 ms each, so the codec keeps 20 streams of 85 ms
    frames within 90 % of its time, where one call a frame (9 ms) would keep 8."""
    config = SchedulerConfig(policy="streaming", codec_headroom=0.9, max_codec_frames=8)
    timer = StepTimer()
    for rows in (1, 4, 16, 32):
        for _ in range(5):
            timer.observe_step(rows, rows, rows * 500, 0.001 + 0.0001 * rows)  # the LM keeps far more
    for num_frames in (1, 2, 4, 8) * 3:
        timer.observe_codec_frames(num_frames, 0.006 + 0.003 * num_frames)
    policy = StreamingPolicy(config, PlaybackTracker(PLAN, 1.0, 0.0), timer)
    assert policy.capacity([]) == 20


def test_a_warm_up_taken_as_optimistic_relaxes_as_live_codec_calls_come():
    timer = StepTimer()
    timer.begin_prior()
    for num_frames in (1, 2, 4, 8) * 3:
        timer.observe_codec_frames(num_frames, 0.006 + 0.003 * num_frames)
    timer.keep_as_prior(bias=1.3)
    assert timer.codec_call_s(8) == pytest.approx(1.3 * 0.030, rel=0.05)  # serving is taken to be slower
    for _ in range(100):  # but it is not
        timer.observe_codec_frames(8, 0.030)
    assert timer.codec_call_s(8) == pytest.approx(0.030, rel=0.05)


def test_a_playing_streams_chunk_goes_to_the_codec_before_a_first_chunk_due_a_little_sooner():
    config = SchedulerConfig(policy="streaming", ttfa_target_s=0.5)
    playback = PlaybackTracker(PLAN, config.ttfa_target_s, 0.0)
    policy = StreamingPolicy(config, playback, StepTimer())
    playback.add("playing", 0.0)
    playback.on_chunk("playing", 0.256, 0.3)  # runs dry at 0.556
    playback.add("starting", 0.0)  # its first chunk is due at 0.5
    playback.add("late", -0.4)  # due at 0.1
    assert policy.codec_order(["starting", "playing", "late"], now=0.35) == ["late", "playing", "starting"]


def test_a_first_chunk_moves_up_the_codec_queue_as_it_waits():
    """With the codec busy, playing streams run close to their deadlines; a first chunk that only ever counted
    as due now would wait behind them until the LM had made the whole stream."""
    config = SchedulerConfig(policy="streaming", ttfa_target_s=0.5)
    playback = PlaybackTracker(PLAN, config.ttfa_target_s, 0.0)
    policy = StreamingPolicy(config, playback, StepTimer())
    playback.add("playing", 0.0)
    playback.on_chunk("playing", 0.256, 0.3)  # runs dry at 0.556
    playback.add("waiting", -0.5)  # its first chunk was due at 0.0
    assert policy.codec_order(["playing", "waiting"], now=0.45) == ["waiting", "playing"]


HOP_PLAN = AudioPlan(lm_steps_per_frame=1, frame_s=0.04, first_chunk_frames=25, frames_per_chunk=25,
                     lookahead_frames=3, codec_cost_per_frame=0.08, codec_prefix_frames=10)  # as CosyVoice2


def test_a_rerunning_detokenizer_costs_each_chunk_its_whole_prefix():
    assert HOP_PLAN.codec_rereads(0, 25) == (38, 38**2)  # prefix 10 + 25 frames + lookahead 3
    assert HOP_PLAN.codec_rereads(25, 75) == (63 + 88, 63**2 + 88**2)  # two chunks, two passes
    assert HOP_PLAN.codec_load(50) == ((10 + 50 + 25 + 3) / 25, 88**2 / 25)  # the next chunk's, per frame
    assert PLAN.codec_rereads(0, 9) == (0, 0) and PLAN.codec_load(9) == (0, 0)


def hop_codec_s(num_frames, rereads):
    """A flow-matching detokenizer: 30 ms a call, 0.8 ms a frame, 1 ms per 1000 frames rerun, plus attention."""
    return 0.030 + 0.0008 * num_frames + 1.0 * rereads[0] / 1000 + 0.5 * rereads[1] / 1e6


def hop_timer():
    timer = StepTimer()
    for rows in (1, 4, 16):
        for _ in range(5):
            timer.observe_step(rows, rows, rows * 100, 0.001 + 0.0001 * rows)  # the LM is nearly free
    for streams in (1, 2, 4):  # calls of one chunk from each of 1-4 streams, near the start and further in
        for start in (0, 25, 100, 200):
            end = start + 25
            rereads = tuple(streams * x for x in HOP_PLAN.codec_rereads(start, end))
            timer.observe_codec_frames(streams * 25, hop_codec_s(streams * 25, rereads), rereads)
    return timer


def test_the_codec_fit_learns_what_a_chunk_further_in_costs():
    timer = hop_timer()
    for start, tolerance in ((0, 0.05), (300, 0.05), (700, 0.1)):  # beyond what it saw, too
        rereads = HOP_PLAN.codec_rereads(start, start + 25)
        assert timer.codec_call_s(25, rereads) == pytest.approx(hop_codec_s(25, rereads), rel=tolerance), start


def test_streams_whose_speech_is_made_count_for_the_codec_until_their_audio_is_out():
    """The LM makes a stream's speech far faster than it plays, so a stream leaves the LM long before its codec
    chunks are done: it still counts against the codec's time until its last frame is decoded, and a stream
    costs more the further it is in, where each chunk reruns a longer prefix."""
    config = SchedulerConfig(policy="streaming", codec_headroom=0.9, max_codec_frames=8)
    playback = PlaybackTracker(HOP_PLAN, 0.5, 0.0)
    policy = StreamingPolicy(config, playback, hop_timer())
    short, long = (Request(f"r{n}", tuple(range(10)), SamplingParams(max_tokens=n, ignore_eos=True, seed=0), 0)
                   for n in (100, 400))
    num_short, num_long = policy.capacity([short]), policy.capacity([long])
    assert num_short >= 4 and num_long < num_short / 2, (num_short, num_long)
    for i in range(3):
        playback.add(f"made-{i}", 0.0)
        playback.on_speech_made(f"made-{i}", 100, HOP_PLAN)  # nothing of it decoded yet
    assert policy.capacity([short]) == num_short - 3
    assert not policy.can_admit(short, [short] * (num_short - 3), 0.0)
    for i in range(3):
        playback.on_chunk(f"made-{i}", 100 * HOP_PLAN.frame_s, 0.1)  # all of it out
    assert policy.capacity([short]) == num_short
    assert policy.can_admit(short, [short] * (num_short - 3), 0.0)


def test_a_playing_streams_chunk_due_within_two_codec_calls_goes_before_any_first_chunk():
    timer = StepTimer()
    timer.observe_codec_frames(8, 0.150)  # a full call: 150 ms
    config = SchedulerConfig(policy="streaming", ttfa_target_s=0.5)
    playback = PlaybackTracker(PLAN, config.ttfa_target_s, 0.0)
    policy = StreamingPolicy(config, playback, timer)
    playback.add("playing", 0.0)
    playback.on_chunk("playing", 0.5, 0.3)  # runs dry at 0.8: within two calls of 0.55
    playback.add("waited", -2.0)  # queued for 2 s: its first chunk was due at -1.5
    assert policy.codec_order(["waited", "playing"], now=0.55) == ["playing", "waited"]
    assert policy.codec_order(["waited", "playing"], now=0.35) == ["waited", "playing"]  # 0.45 s to spare
