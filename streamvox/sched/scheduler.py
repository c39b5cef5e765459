"""Continuous-batching scheduler: decides which positions of which requests the next LM step computes.

Pure Python. Each step, running requests get rows in the policy's order (chunked prefill or one decode token),
under the batch size, the token budget and the policy's step-time cap; then waiting requests are admitted in
arrival order while the policy agrees and the KV pool can commit the blocks the policy reserves for them. The
pool is never over-committed: the blocks held or reserved by running requests never exceed its size. When a
running request needs a block beyond its reservation and none is uncommitted, the policy's victim is preempted:
its blocks return to the pool and it recomputes its positions when admitted again (the runner keeps its tokens).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from streamvox.batch import AudioChunk, NewRequest, ScheduledRow, StepBatch, StepOutput
from streamvox.config import SchedulerConfig
from streamvox.sched.kv_blocks import BlockPool
from streamvox.sched.playback import PlaybackTracker
from streamvox.sched.policy import POLICIES
from streamvox.sched.request import FinishReason, Request, RequestStatus
from streamvox.sched.timing import StepTimer

MIN_PREFILL_CHUNK = 16  # prompt tokens a capped step still takes for a request that must make progress


class QueueFullError(Exception):
    """The engine cannot start this request within its queue bound; the client should retry after
    `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class _StepPlan:
    """The step being planned: its rows and new requests so far, the token budget left, the step-time cap."""

    budget: int
    cap_s: float
    rows: list[ScheduledRow] = field(default_factory=list)
    new_requests: list[NewRequest] = field(default_factory=list)
    num_tokens: int = 0
    num_context: int = 0  # positions the rows attend over

    def add(self, row: ScheduledRow) -> None:
        self.rows.append(row)
        self.budget -= row.num_tokens
        self.num_tokens += row.num_tokens
        self.num_context += row.start_position + row.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool, playback: PlaybackTracker,
                 timer: StepTimer | None = None, max_wait_s: float | None = None) -> None:
        config.validate()
        self.config = config
        self.pool = pool
        self.playback = playback
        self.timer = timer or StepTimer()
        self.policy = POLICIES[config.policy](config, playback, self.timer)
        self.max_wait_s = max_wait_s  # None: requests wait as long as it takes (in-process and batch use)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_ids: list[str] = []  # not yet reported to the runners
        self._newly_finished: list[Request] = []  # not yet returned by update() (cancelled ones never are)
        self._text_updates: list[tuple[str, tuple[int, ...], bool]] = []  # not yet sent to the runner

    # -- requests in and out ---------------------------------------------------------------------------

    def add_request(self, request: Request, now: float) -> None:
        """Queue a request. ValueError if it can never fit; QueueFullError when the queue is at its bound, or
        when the policy predicts it cannot start within `max_wait_s`."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if self._blocks_for(request, len(request.prompt_token_ids) + 1) > self.pool.num_blocks:
            raise ValueError(
                f"prompt of {len(request.prompt_token_ids)} tokens does not fit the KV cache "
                f"({self.pool.num_blocks} blocks of {self.pool.block_size}); shorten the text"
            )
        if len(self.waiting) >= self.config.max_queue_len:
            raise QueueFullError(f"{len(self.waiting)} requests are already waiting", self.start_wait_s(request))
        if self.max_wait_s is not None and (wait_s := self.start_wait_s(request)) > self.max_wait_s:
            raise QueueFullError(f"it could not start within {self.max_wait_s:g} s", wait_s)
        request.arrival_s = now
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self.playback.add(request.request_id, now)

    def start_wait_s(self, request: Request) -> float:
        """Predicted seconds before `request`, queued now behind the waiting ones, could start."""
        active = [r for r in self.running if not r.is_held]
        return self.policy.start_wait_s(request, [r for r in self.waiting if r is not request], active)

    def cancel(self, request_id: str) -> bool:
        """Finish a request now and free its blocks. False if it is unknown or already finished."""
        request = self.requests.get(request_id)
        if request is None or request.is_finished:
            return False
        if request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        else:
            self.running.remove(request)
        self._finish(request, FinishReason.CANCELLED)
        return True

    def add_text(self, request_id: str, text_ids: list[int], is_final: bool) -> bool:
        """More text for a request whose text is streamed in; a paused request resumes. False if it is gone."""
        request = self.requests.get(request_id)
        if request is None or request.is_finished:
            return False
        request.text_ids.extend(text_ids)
        request.is_text_complete |= is_final
        if request.is_known_to_runner:
            self._text_updates.append((request_id, tuple(text_ids), is_final))
        return True

    def set_paused(self, request_id: str, is_paused: bool) -> bool:
        """Pause a request whose client is behind in reading (it keeps its KV, takes no rows), or resume it.
        False if it is gone."""
        request = self.requests.get(request_id)
        if request is None or request.is_finished:
            return False
        request.is_paused = is_paused
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._finished_ids)

    @property
    def num_committed_blocks(self) -> int:
        return sum(r.num_committed_blocks for r in self.running)

    # -- one step --------------------------------------------------------------------------------------

    def schedule(self, now: float, codec_ready: Sequence[tuple[str, int, bool]] = ()) -> StepBatch | None:
        """The next step's work, or None when there is nothing to do. `codec_ready`: (request_id, frames ready,
        is_complete) of the requests whose next chunk could be decoded now; the policy picks and orders those
        that are due."""
        self.policy.begin_step(self.running)
        self._expire_waiting(now)
        active = [r for r in self.running if not r.is_held]  # a held request is nobody's deadline
        step = _StepPlan(self.config.max_num_batched_tokens, self.policy.step_cap_s(active, now))
        is_preempted = self._schedule_running(step, active, now)
        if not is_preempted:
            self._admit_waiting(step, active, now)
        finished_ids, self._finished_ids = tuple(self._finished_ids), []
        text_updates, self._text_updates = tuple(self._text_updates), []
        due = [request_id for request_id, num_frames, is_complete in codec_ready
               if self._is_held(request_id) or self.policy.is_codec_due(request_id, num_frames, is_complete, now)]
        codec_ids = tuple(self.policy.codec_order(due, now))
        if not step.rows and not finished_ids and not text_updates and not codec_ids:
            return None
        return StepBatch(tuple(step.new_requests), tuple(step.rows), finished_ids, text_updates, codec_ids)

    def _schedule_running(self, step: _StepPlan, active: list[Request], now: float) -> bool:
        """Rows for running requests in the policy's order; True if one had to be preempted."""
        is_preempted = False
        for request in self.policy.rank(active, now):
            if request not in self.running:  # preempted earlier in this loop
                continue
            if len(step.rows) >= self.config.max_num_seqs or step.budget == 0:
                break
            num_tokens = self._fit(request, step, now)
            if num_tokens == 0:
                continue
            if not self._grow(request, num_tokens, now, {row.request_id for row in step.rows}):
                is_preempted = True
                continue
            step.add(self._row(request, num_tokens))
        return is_preempted

    def _admit_waiting(self, step: _StepPlan, active: list[Request], now: float) -> None:
        """Admit waiting requests in order while the policy agrees and their KV can be committed."""
        for request in list(self.waiting):
            if step.budget <= 0 or len(active) >= self.config.max_num_seqs:
                break
            if request.is_held:
                continue  # an evicted held request comes back once it can run
            if not self.policy.can_admit(request, active, now):
                break
            reserved = min(self._blocks_for(request, self.policy.reserved_tokens(request)), self.pool.num_blocks)
            num_tokens = self._fit(request, step, now, is_new=True)
            if num_tokens == 0 or not self._commit(request, max(reserved, self._blocks_for(request, num_tokens))):
                break  # the head of the queue waits; later requests wait behind it
            self.waiting.remove(request)
            request.status = RequestStatus.RUNNING
            request.num_reserved_blocks = reserved
            self.running.append(request)
            active.append(request)
            self._grow(request, num_tokens, now, set())  # never preempts: the blocks were committed
            if not request.is_known_to_runner:
                request.is_known_to_runner = True
                step.new_requests.append(NewRequest(
                    request.request_id, request.prompt_token_ids, request.sampling, request.codec_seed,
                    tuple(request.text_ids), request.is_text_complete, *request.runner_inputs))
            step.add(self._row(request, num_tokens))

    def _is_held(self, request_id: str) -> bool:
        """Held requests make no frames for now: what is ready decodes at once rather than wait to grow."""
        request = self.requests.get(request_id)
        return request is not None and request.is_held

    def _commit(self, request: Request, num_blocks: int) -> bool:
        """Whether `num_blocks` can be committed to `request`; held requests are evicted to make room."""
        while self.num_committed_blocks + num_blocks > self.pool.num_blocks and (
                held := [r for r in self.running if r.is_held]):
            self._preempt(held[-1], requeue_at=self.waiting.index(request) + 1)  # idle KV makes room
        return self.num_committed_blocks + num_blocks <= self.pool.num_blocks

    def _expire_waiting(self, now: float) -> None:
        """Refuse requests that never started and have waited past the bound (the prediction at their arrival
        was wrong: running requests took longer than expected)."""
        if self.max_wait_s is None:
            return
        for request in list(self.waiting):
            if not request.is_known_to_runner and now - request.arrival_s > self.max_wait_s:
                self.waiting.remove(request)
                self._finish(request, FinishReason.REFUSED)

    def update(self, batch: StepBatch | None, output: StepOutput, chunks: Sequence[AudioChunk] = (),
               now: float = 0.0) -> list[Request]:
        """Advance counts after a step ran, and playback by the chunks decoded (sent at `now`); returns every
        request finished since the last update, except cancelled ones (the canceller already knows)."""
        for chunk in chunks:
            duration_s = (chunk.end_frame - chunk.start_frame) * self.playback.plan.frame_s
            self.playback.on_chunk(chunk.request_id, duration_s, now)
            if chunk.is_last:
                self.playback.drop(chunk.request_id)
        for row in batch.rows if batch is not None else ():
            request = self.requests.get(row.request_id)
            if request is not None and request.status is RequestStatus.RUNNING:
                request.num_computed_tokens = row.start_position + row.num_tokens
        for request_id, is_stop in zip(output.request_ids, output.is_stop, strict=True):
            request = self.requests.get(request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue  # cancelled while its step ran
            request.num_output_tokens += 1
            if is_stop or request.num_output_tokens >= request.sampling.max_tokens:
                plan = request.plan or self.playback.plan
                self.playback.on_speech_made(request_id, request.num_output_tokens // plan.lm_steps_per_frame, plan)
                self.running.remove(request)
                self._finish(request, FinishReason.STOP if is_stop else FinishReason.LENGTH)
        finished, self._newly_finished = self._newly_finished, []
        return finished

    # -- helpers ---------------------------------------------------------------------------------------

    def _fit(self, request: Request, step: _StepPlan, now: float, is_new: bool = False) -> int:
        """Tokens of `request` this step takes: all pending within the budget, fewer when the step-time cap
        binds; 0 when an optional row does not fit under the cap."""
        num_tokens = min(request.num_pending_tokens, step.budget)
        rows, tokens, cap_s = len(step.rows) + 1, step.num_tokens, step.cap_s
        context = step.num_context + request.num_computed_tokens

        def period_s(num_tokens: int) -> float:
            return self.timer.period_s(rows, tokens + num_tokens, context + num_tokens)

        if num_tokens == 0 or math.isinf(cap_s) or period_s(num_tokens) <= cap_s:
            return num_tokens
        if is_new and tokens and period_s(MIN_PREFILL_CHUNK) > cap_s:
            return 0  # the step is full: admit it next step
        if not is_new and self.policy.is_optional(request, now):
            return 0
        if num_tokens == 1:
            return 1  # an urgent decode row always runs
        fitting = 1
        while fitting < num_tokens and period_s(fitting * 2) <= cap_s:
            fitting *= 2
        return min(num_tokens, max(fitting, MIN_PREFILL_CHUNK))

    def _row(self, request: Request, num_tokens: int) -> ScheduledRow:
        start = request.num_computed_tokens
        return ScheduledRow(
            request_id=request.request_id,
            start_position=start,
            num_tokens=num_tokens,
            block_ids=tuple(request.block_ids),
            is_sampled=start + num_tokens == request.num_tokens,
        )

    def _grow(self, request: Request, num_tokens: int, now: float, scheduled_ids: set[str]) -> bool:
        """Give a running `request` blocks for `num_tokens` more positions, preempting others if needed (never
        one that already has a row in this step: its blocks are being written).

        False when it cannot run this step: it was itself preempted (or finished for capacity).
        """
        needed = self._blocks_for(request, request.num_computed_tokens + num_tokens) - len(request.block_ids)
        beyond = max(0, len(request.block_ids) + needed - request.num_committed_blocks)  # past its reservation
        while beyond and self.num_committed_blocks + beyond > self.pool.num_blocks:
            if len(self.running) == 1:
                self.running.remove(request)
                self._finish(request, FinishReason.CAPACITY)
                return False
            candidates = [r for r in self.running if r.request_id not in scheduled_ids and r is not request]
            held = [r for r in candidates if r.is_held]  # cheapest to evict: nothing to play soon
            victim = held[-1] if held else self.policy.victim(candidates, now) if candidates else request
            self._preempt(victim)
            if victim is request:
                return False
        request.block_ids.extend(self.pool.allocate(needed) or [])
        return True

    def _blocks_for(self, request: Request, num_tokens: int) -> int:
        """KV blocks `num_tokens` positions of `request` take: a block per row a position has (block b of row r
        is the request's block b * num_lanes + r)."""
        return self.pool.blocks_for(num_tokens) * request.num_lanes

    def _preempt(self, request: Request, requeue_at: int = 0) -> None:
        self.running.remove(request)
        self.pool.free(request.block_ids)
        request.block_ids = []
        request.num_reserved_blocks = 0
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.insert(requeue_at, request)

    def _finish(self, request: Request, reason: FinishReason) -> None:
        self.pool.free(request.block_ids)
        request.block_ids = []
        request.num_reserved_blocks = 0
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self.requests[request.request_id]
        self._finished_ids.append(request.request_id)
        if reason in (FinishReason.CANCELLED, FinishReason.REFUSED):
            self.playback.drop(request.request_id)  # no audio will go out for it
        if reason is not FinishReason.CANCELLED:
            self._newly_finished.append(request)
