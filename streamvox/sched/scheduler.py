"""Continuous-batching scheduler: decides which positions of which requests the next LM step computes.

Pure Python. Each step: running requests first (decode rows, or the rest of a chunked prefill), then waiting
requests are admitted while the token budget, the batch size and the KV pool allow. When a running request
needs a block and none is free, the most recently admitted request is preempted: its blocks go back to the pool
and it recomputes its positions when it is admitted again (the runner keeps its tokens and sampling state).
"""

from __future__ import annotations

from collections import deque

from streamvox.batch import NewRequest, ScheduledRow, StepBatch, StepOutput
from streamvox.config import SchedulerConfig
from streamvox.sched.kv_blocks import BlockPool
from streamvox.sched.request import FinishReason, Request, RequestStatus


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool) -> None:
        if config.max_num_seqs < 1 or config.max_num_batched_tokens < 1:
            raise ValueError(f"a step must take >= 1 request and >= 1 token, got {config}")
        self.config = config
        self.pool = pool
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_ids: list[str] = []  # not yet reported to the runners
        self._newly_finished: list[Request] = []  # not yet returned by update() (cancelled ones never are)

    # -- requests in and out ---------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if self.pool.blocks_for(len(request.prompt_token_ids) + 1) > self.pool.num_blocks:
            raise ValueError(
                f"prompt of {len(request.prompt_token_ids)} tokens does not fit the KV cache "
                f"({self.pool.num_blocks} blocks of {self.pool.block_size}); shorten the text"
            )
        self.requests[request.request_id] = request
        self.waiting.append(request)

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

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._finished_ids)

    # -- one step --------------------------------------------------------------------------------------

    def schedule(self) -> StepBatch | None:
        """The next step's work, or None when there is nothing to do."""
        budget = self.config.max_num_batched_tokens
        rows: list[ScheduledRow] = []
        new_requests: list[NewRequest] = []
        is_preempted = False

        for request in list(self.running):
            if request not in self.running:  # preempted earlier in this loop
                continue
            num_tokens = min(request.num_pending_tokens, budget)
            if num_tokens == 0:
                continue
            if not self._grow(request, num_tokens):
                is_preempted = True
                continue
            rows.append(self._row(request, num_tokens))
            budget -= num_tokens

        while self.waiting and budget > 0 and not is_preempted:
            if len(self.running) >= self.config.max_num_seqs:
                break
            request = self.waiting[0]
            num_tokens = min(request.num_pending_tokens, budget)
            if not self._grow(request, num_tokens):
                break  # the head of the queue waits for blocks; later requests wait behind it
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if not request.is_known_to_runner:
                request.is_known_to_runner = True
                new_requests.append(
                    NewRequest(request.request_id, request.prompt_token_ids, request.sampling, request.codec_seed)
                )
            rows.append(self._row(request, num_tokens))
            budget -= num_tokens

        finished_ids, self._finished_ids = tuple(self._finished_ids), []
        if not rows and not finished_ids:
            return None
        return StepBatch(tuple(new_requests), tuple(rows), finished_ids)

    def update(self, batch: StepBatch, output: StepOutput) -> list[Request]:
        """Advance counts after a step ran; returns every request finished since the last update, except
        cancelled ones (the canceller already knows)."""
        for row in batch.rows:
            request = self.requests.get(row.request_id)
            if request is not None and not request.is_finished:
                request.num_computed_tokens = row.start_position + row.num_tokens
        for request_id, is_stop in zip(output.request_ids, output.is_stop, strict=True):
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue  # cancelled while its step ran
            request.num_output_tokens += 1
            if is_stop or request.num_output_tokens >= request.sampling.max_tokens:
                self.running.remove(request)
                self._finish(request, FinishReason.STOP if is_stop else FinishReason.LENGTH)
        finished, self._newly_finished = self._newly_finished, []
        return finished

    # -- helpers ---------------------------------------------------------------------------------------

    def _row(self, request: Request, num_tokens: int) -> ScheduledRow:
        start = request.num_computed_tokens
        return ScheduledRow(
            request_id=request.request_id,
            start_position=start,
            num_tokens=num_tokens,
            block_ids=tuple(request.block_ids),
            is_sampled=start + num_tokens == request.num_tokens,
        )

    def _grow(self, request: Request, num_tokens: int) -> bool:
        """Give `request` blocks for `num_tokens` more positions, preempting later running requests if needed.

        False when it cannot run this step: it was itself preempted, or (when waiting) the pool is short.
        """
        needed = self.pool.blocks_for(request.num_computed_tokens + num_tokens) - len(request.block_ids)
        while not self.pool.can_allocate(needed):
            if request.status is RequestStatus.WAITING:
                return False
            victim = self.running[-1]
            if victim is request and len(self.running) == 1:
                self.running.remove(request)
                self._finish(request, FinishReason.CAPACITY)
                return False
            self._preempt(victim)
            if victim is request:
                return False
        request.block_ids.extend(self.pool.allocate(needed) or [])
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.pool.free(request.block_ids)
        request.block_ids = []
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def _finish(self, request: Request, reason: FinishReason) -> None:
        self.pool.free(request.block_ids)
        request.block_ids = []
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self.requests[request.request_id]
        self._finished_ids.append(request.request_id)
        if reason is not FinishReason.CANCELLED:
            self._newly_finished.append(request)
