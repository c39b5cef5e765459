"""Scheduling policies: what the LM step runs first, what it may skip, whom it admits and whom it preempts.

The scheduler applies one policy through the same few questions, so features are policies, not branches:
- `streaming`: every request has a playback deadline (DESIGN.md §5). Rows run earliest-slack first; rows with
  plenty of slack ride along only while the step stays short enough for the most urgent ones; a new request is
  admitted only while the predicted step time keeps every stream faster than real time and KV blocks for its
  prompt plus expected audio are free; under memory pressure the request with the most slack is paused.
- `offline`: throughput. Every row runs, admission reserves KV for prompt plus expected audio, no deadlines.
- `fcfs`: plain first-come first-served continuous batching, kept to compare against.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from streamvox.batch import AudioPlan
from streamvox.config import SchedulerConfig
from streamvox.sched.playback import PlaybackTracker
from streamvox.sched.request import Request
from streamvox.sched.timing import StepTimer

DEFAULT_PROMPT, DEFAULT_CONTEXT = 20, 1000  # streaming: a stream's prompt and steps when none runs to compare
FIRST_CHUNK_GRACE = 0.3  # streaming: a playing stream's chunk goes to the codec before a first chunk due up to
# this share of the TTFA target sooner


class _Load(NamedTuple):
    """What a stream costs the engine. The LM: the positions it attends over now and the steps it is expected
    still to take (0 once its speech is made). The codec: its plan, and the frames decoded so far and still to
    decode (expected): a stream costs the codec until its audio is all out, long after the LM is done with it
    when the LM runs faster than real time."""

    positions: int
    steps_left: int
    plan: AudioPlan
    frames_done: int
    frames_left: int

    def after(self, steps: int, frames: int) -> _Load:
        """The stream `steps` LM steps and `frames` frames of playback on."""
        steps, frames = min(steps, self.steps_left), min(frames, self.frames_left)
        return _Load(self.positions + steps, self.steps_left - steps, self.plan, self.frames_done + frames,
                     self.frames_left - frames)


class Policy:
    """First-come first-served: rows in admission order, no step-time cap, no reservation."""

    name = "fcfs"

    def __init__(self, config: SchedulerConfig, playback: PlaybackTracker, timer: StepTimer) -> None:
        self.config = config
        self.playback = playback
        self.timer = timer

    def rank(self, running: list[Request], now: float) -> list[Request]:
        """LM rows in the order they get the step's batch slots and token budget."""
        return list(running)

    def step_cap_s(self, running: list[Request], now: float) -> float:
        """The longest step that keeps the urgent requests on time (inf: no limit)."""
        return math.inf

    def is_optional(self, request: Request, now: float) -> bool:
        """True when the row may be left out of this step if the step would get too long."""
        return False

    def can_admit(self, request: Request, running: list[Request], now: float) -> bool:
        """Whether one more running request keeps the policy's promises (KV is checked separately)."""
        return True

    def begin_step(self, running: list[Request]) -> None:
        """A new schedule() starts over these running requests: counts may have changed since the last one."""

    def capacity(self, running: list[Request]) -> int:
        """Streams the engine can keep ahead of playback (the batch limit, for a policy without deadlines)."""
        return self.config.max_num_seqs

    def start_wait_s(self, request: Request, ahead: list[Request], running: list[Request]) -> float:
        """Predicted seconds before `request`, queued behind `ahead`, can start."""
        return 0.0

    def reserved_tokens(self, request: Request) -> int:
        """KV positions set aside for a request when it is admitted."""
        return 0

    def victim(self, running: list[Request], now: float) -> Request:
        """The running request to pause when the KV pool runs out."""
        return running[-1]

    def codec_order(self, request_ids: list[str], now: float) -> list[str]:
        """Which requests' ready chunks the codec decodes first."""
        return request_ids

    def is_codec_due(self, request_id: str, num_ready_frames: int, is_complete: bool, now: float) -> bool:
        """Whether a request's ready frames should be decoded now rather than left to grow into a bigger chunk."""
        return True


class OfflinePolicy(Policy):
    """Throughput: everything runs, admission reserves each request's expected length so nobody is preempted."""

    name = "offline"

    def reserved_tokens(self, request: Request) -> int:
        return len(request.prompt_token_ids) + request.expected_tokens


class StreamingPolicy(OfflinePolicy):
    name = "streaming"
    _timings: dict[str, tuple[float, float]] = {}
    _num_starting = 0  # running streams with no audio out yet
    _full_period_s = 0.0  # predicted loop period with every running stream in the step
    _frame_rereads = (0.0, 0.0)  # mean AudioPlan.codec_load of the running streams: what a frame costs to rerun

    def begin_step(self, running: list[Request]) -> None:
        self._timings: dict[str, tuple[float, float]] = {}
        streams = self.playback.streams
        self._num_starting = sum(1 for r in running if r.request_id in streams and
                                 streams[r.request_id].first_chunk_s is None)
        active = [r for r in running if not r.is_held]
        self._full_period_s = self.timer.period_s(len(active), len(active), sum(r.num_tokens for r in active))
        loads = [s.plan.codec_load(s.frames_done) for s in self._loads(running)] or [(0.0, 0.0)]
        self._frame_rereads = (sum(x for x, _ in loads) / len(loads), sum(y for _, y in loads) / len(loads))

    def _timing(self, request: Request, now: float) -> tuple[float, float]:
        """(slack, tolerance) of a request, computed once per step. Slack: seconds to spare before its next
        chunk is late at the measured step and codec times. Tolerance: the longest step that still gets that
        chunk out on time."""
        timing = self._timings.get(request.request_id)
        if timing is None:
            covered, steps = (request.plan or self.playback.plan).next_chunk(request.num_output_tokens)
            steps += request.num_pending_tokens > 1  # prefill still to run: one more step
            time_left_s = self.playback.deadline_s(request.request_id, covered) - now - 2 * self.timer.codec_s
            timing = (time_left_s - steps * (self.timer.recent_period_s or self.timer.period_s(1)), time_left_s / steps)
            self._timings[request.request_id] = timing
        return timing

    def slack_s(self, request: Request, now: float) -> float:
        return self._timing(request, now)[0]

    def rank(self, running: list[Request], now: float) -> list[Request]:
        return sorted(running, key=lambda r: self.slack_s(r, now))

    def step_cap_s(self, running: list[Request], now: float) -> float:
        urgent = [r for r in running if not self.is_optional(r, now)]
        if not urgent or not self.timer.has_steps:
            return math.inf
        floor = self.timer.period_s(sum(min(r.num_pending_tokens, 1) for r in urgent))
        return max(floor, min(self._timing(r, now)[1] for r in urgent))

    def is_optional(self, request: Request, now: float) -> bool:
        return self.slack_s(request, now) >= self.config.urgent_slack_s

    def _state(self, request: Request) -> _Load:
        plan = request.plan or self.playback.plan
        done = self.playback.frames_sent(request.request_id)
        return _Load(request.num_tokens, max(0, request.expected_tokens - request.num_output_tokens), plan, done,
                     max(0, request.expected_tokens // plan.lm_steps_per_frame - done))

    def _loads(self, running: list[Request]) -> list[_Load]:
        """The loads of the running requests and of the streams whose speech is made but not all sent."""
        ids = {r.request_id for r in running}
        loads = [self._state(r) for r in running]
        for request_id, stream in self.playback.streams.items():
            if request_id not in ids and stream.frames_made is not None and stream.plan is not None:
                done = self.playback.frames_sent(request_id)
                loads.append(_Load(0, 0, stream.plan, done, max(0, stream.frames_made - done)))
        return loads

    def _lm_keeps_up(self, rows: list[_Load]) -> bool:
        """Whether the predicted loop period over `rows` (streams in the LM) is within `realtime_headroom` of
        real time."""
        limit, plan = self.config.realtime_headroom, self.playback.plan
        return self.timer.period_s(len(rows), len(rows), sum(s.positions for s in rows)) <= \
            limit * plan.realtime_step_s

    def _codec_keeps_up(self, streams: list[_Load]) -> bool:
        """Whether the codec thread decodes `streams` within `codec_headroom` of its time. Each stream needs
        a frame per frame_s; they are decoded in calls of up to max_codec_frames frames, at most a chunk of every
        stream (a few streams of one-frame chunks pay a call each), and a detokenizer that reruns over the
        prefix costs more the further each stream is (AudioPlan.codec_load)."""
        plan = self.playback.plan
        per_call = min(sum(s.plan.frames_per_chunk for s in streams),
                       plan.frames_per_call(self.config.max_codec_frames))
        loads = [s.plan.codec_load(s.frames_done) for s in streams]
        share = per_call / len(streams)  # frames of each stream in one call
        rereads = (share * sum(load[0] for load in loads), share * sum(load[1] for load in loads))
        codec_s = self.timer.codec_call_s(per_call, rereads) * len(streams) / per_call  # per frame_s
        return codec_s <= self.config.codec_headroom * plan.frame_s

    def _fits(self, streams: list[_Load], new: _Load) -> bool:
        """Whether `streams` and a new one keep up until the new one ends: the LM checked as each of them
        leaves it and as the new one does, the codec as each stream's audio is all decoded, grown by then."""
        ends = sorted({s.steps_left for s in streams if 0 < s.steps_left < new.steps_left} | {new.steps_left})
        for t in ends:  # the streams in the LM until t, as they are then
            if not self._lm_keeps_up([s.after(t, 0) for s in streams if s.steps_left >= max(t, 1)] +
                                     [new.after(t, 0)]):
                return False
        ends = sorted({s.frames_left for s in streams if 0 < s.frames_left < new.frames_left} | {new.frames_left})
        for f in ends:  # the streams still decoding until f, as they are then
            if not self._codec_keeps_up([s.after(0, f) for s in streams if s.frames_left >= max(f, 1)] +
                                        [new.after(0, f)]):
                return False
        return True

    def can_admit(self, request: Request, running: list[Request], now: float) -> bool:
        """Admit while the streams already running or still decoding and this one all stay ahead of playback
        until it ends."""
        streams = self._loads(running)
        if not streams or not self.timer.has_steps:
            return True
        return self._fits(streams, self._state(request))

    def _typical(self, running: list[Request]) -> _Load:
        """A stream like the running ones (of DEFAULT_CONTEXT steps when none runs), about to start."""
        plan, prompt, steps = self.playback.plan, DEFAULT_PROMPT, DEFAULT_CONTEXT
        if running:
            prompt = sum(len(r.prompt_token_ids) for r in running) // len(running)
            steps = sum(r.expected_tokens for r in running) // len(running)
        return _Load(prompt, steps, plan, 0, steps // plan.lm_steps_per_frame)

    def capacity(self, running: list[Request]) -> int:
        """Streams the engine keeps ahead of playback: the running ones plus as many more like them as fit (0 on
        an idle engine too slow for even one: it would still start one, but a router should look elsewhere)."""
        typical, streams = self._typical(running), self._loads(running)
        num_streams = len(running)
        while num_streams < self.config.max_num_seqs and self._fits(streams, typical):
            streams.append(typical)
            num_streams += 1
        return num_streams

    def start_wait_s(self, request: Request, ahead: list[Request], running: list[Request]) -> float:
        """Predicted seconds before `request`, queued behind `ahead`, can start: the queue is admitted in order
        as streams leave the LM (expected steps at the measured period) or have their audio all decoded."""
        period_s = self.timer.recent_period_s or self.timer.period_s(max(1, len(running)))
        frame_s = self.playback.plan.frame_s
        streams = self._loads(running)
        queue = [self._state(r) for r in [*ahead, request]]
        elapsed_s = 0.0
        while True:
            while queue and (not streams or self._fits(streams, queue[0])):
                streams.append(queue.pop(0))
                if not queue:
                    return elapsed_s
            # on to the next end: of a stream's steps in the LM, or of its decoding
            dt = min([s.steps_left * period_s for s in streams if s.steps_left > 0] +
                     [s.frames_left * frame_s for s in streams if s.frames_left > 0])
            elapsed_s += dt
            streams = [s.after(max(1, round(dt / period_s)), max(1, round(dt / frame_s))) for s in streams]
            streams = [s for s in streams if s.steps_left > 0 or s.frames_left > 0]

    def victim(self, running: list[Request], now: float) -> Request:
        return max(running, key=lambda r: self.slack_s(r, now))

    def _full_call_s(self) -> float:
        """Predicted seconds of a full codec call of the running streams' chunks."""
        per_call = self.playback.plan.frames_per_call(self.config.max_codec_frames)
        rereads = (per_call * self._frame_rereads[0], per_call * self._frame_rereads[1])
        return self.timer.codec_call_s(per_call, rereads)

    def codec_order(self, request_ids: list[str], now: float) -> list[str]:
        """Deadline order, with playing streams first where it matters: a late start costs the TTFA percentile a
        little, a stall makes a stream unusable. A playing stream's chunk due within two full codec calls (one
        may be in flight ahead of it) goes before every first chunk; otherwise a first chunk goes after a
        playing stream's chunk due up to FIRST_CHUNK_GRACE of the TTFA target later. A late first chunk keeps
        its deadline, so it moves up as it waits instead of starving behind streams that run close to theirs."""
        streams, grace_s = self.playback.streams, FIRST_CHUNK_GRACE * self.config.ttfa_target_s
        urgent_s = 2 * self._full_call_s()

        def key(request_id: str) -> tuple[bool, float]:
            stream, deadline = streams.get(request_id), self.playback.deadline_s(request_id)
            if stream is not None and stream.first_chunk_s is None:
                return True, deadline + grace_s
            return deadline - now > urgent_s, deadline
        return sorted(request_ids, key=key)

    def is_codec_due(self, request_id: str, num_ready_frames: int, is_complete: bool, now: float) -> bool:
        """Chunks sized by deadlines. A first chunk must play for as long as the next one takes to make, or the
        client stalls at once, so it waits until it does, counting the streams starting at the same moment (their
        first chunks share codec batches); not even a TTFA deadline sends it shorter: a late start costs the TTFA
        percentile a little, a stall makes the stream unusable. Later chunks are held while the client is well
        ahead, so the codec makes fewer, larger calls: the target grows with the time the client has left (half
        of what is over the margin, up to `max_chunk_s`) and shrinks as it falls; within the margin anything
        ready goes."""
        stream = self.playback.streams.get(request_id)
        if is_complete or stream is None:
            return True
        plan = self.playback.plan
        ready_s = num_ready_frames * plan.frame_s
        if stream.first_chunk_s is None:
            per_call = plan.frames_per_call(self.config.max_codec_frames)
            codec_batches = 1 + math.ceil(self._num_starting * plan.first_chunk_frames / per_call)
            # the step as it is now, or as predicted with every running stream in it (streams just admitted
            # have not shown in the measured period yet)
            step_s = max(self.timer.recent_period_s, self.timer.recent_step_s * self.timer.overhead,
                         self._full_period_s)
            # the next chunk goes to the codec at the step after its last frame is made: one step more
            next_chunk_s = (plan.frames_per_chunk * plan.lm_steps_per_frame + 1) * step_s
            # and it may wait for a full batch in flight to finish, then for the step that collects it
            jitter_s = self._full_call_s() + step_s
            return ready_s >= next_chunk_s + codec_batches * self.timer.codec_s + jitter_s
        left_s = self.playback.deadline_s(request_id) - now
        margin_s = 2 * self.timer.codec_s + self.config.codec_hold_margin_s
        return left_s <= margin_s or ready_s >= min(self.config.max_chunk_s, max(plan.frame_s, (left_s - margin_s) / 2))


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (Policy, OfflinePolicy, StreamingPolicy)}
