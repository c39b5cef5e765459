"""The engine: one step loop over the scheduler, the LM runner and the codec running beside it.

`EngineCore.step()` is three calls: `scheduler.schedule()` plans the LM rows and the codec chunks of the step,
`_execute()` runs them (the chunks are handed to the codec thread first, so they decode while the LM step runs) and
collects what the codec finished, and `scheduler.update()` takes the sampled tokens and the decoded chunks. Step
and codec times are measured as they run and feed the scheduler's cost model. A request that raises while
sampling or decoding fails alone: the step is retried row by row (the codec batch chunk by chunk) and only the
rows that still raise fail. In-process convenience (stream, result, generate) is `engine/local.py`.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from streamvox.batch import AudioChunk, StepBatch, StepOutput
from streamvox.config import EngineConfig, SamplingParams
from streamvox.engine.codec_pipeline import CodecPipeline
from streamvox.engine.requests import check_request, codec_seed_for
from streamvox.engine.text_streams import TextStreams
from streamvox.engine.warm_up import warm_up
from streamvox.layers.attention import resolve_backend
from streamvox.models.base import Prepared, SpeechModel
from streamvox.protocol import Failure
from streamvox.runner.codec_runner import CodecRunner, audio_plan
from streamvox.runner.graphs import Capture
from streamvox.runner.lm_runner import LMRunner
from streamvox.runner.memory import kv_blocks
from streamvox.sched.kv_blocks import BlockPool
from streamvox.sched.playback import PlaybackTracker
from streamvox.sched.request import FinishReason, Request
from streamvox.sched.scheduler import QueueFullError, Scheduler
from streamvox.sched.timing import StepTimer

__all__ = ["EngineCore", "EngineLoad", "QueueFullError", "RequestFailure", "StepEvents"]

logger = logging.getLogger(__name__)
CAPACITY_EVERY_S = 0.5


@dataclass(frozen=True)
class RequestFailure:
    """A request that failed inside the engine; nothing more will come for it."""

    request_id: str
    message: str
    failure: Failure = Failure.ENGINE_ERROR
    retry_after_s: float = 0.0  # AT_CAPACITY: when the engine expects room


@dataclass(frozen=True)
class EngineLoad:
    """What the engine holds, for reports and the serving loop."""

    num_waiting: int
    num_running: int
    num_held: int  # running but paused (slow reader, or waiting for text)
    num_free_blocks: int
    num_blocks: int
    capacity: int  # streams the policy predicts it can keep ahead of playback


@dataclass
class StepEvents:
    """What one step produced."""

    chunks: list[AudioChunk] = field(default_factory=list)
    failures: list[RequestFailure] = field(default_factory=list)
    finish_reasons: dict[str, FinishReason] = field(default_factory=dict)  # LM finished during this step
    num_output_tokens: dict[str, int] = field(default_factory=dict)  # of the requests in finish_reasons
    num_prompt_tokens: dict[str, int] = field(default_factory=dict)  # of the requests in finish_reasons
    sampled: list[tuple[str, object]] = field(default_factory=list)  # (request_id, step token) sampled this step
    num_rows: int = 0  # requests in the LM step
    step_s: float = 0.0  # wall time of the LM step


class EngineCore:
    def __init__(self, model: SpeechModel, config: EngineConfig | None = None,
                 clock: Callable[[], float] = time.monotonic, is_wait_bounded: bool = True) -> None:
        """`is_wait_bounded`: refuse a request that cannot start within `max_queue_wait_s` (serving); else every
        request waits its turn (in-process and batch use)."""
        config = config or EngineConfig()
        self.model = model
        self.config = config
        self.clock = clock
        # LM steps and codec calls run at once on two threads: on a CPU, each gets its share of the cores
        # (measured on 2 cores: 2 shared threads made both ~1.5x slower than 1 thread each)
        torch.set_num_threads(config.num_threads or max(1, (os.cpu_count() or 2) // 2))
        num_blocks = kv_blocks(model, config.cache, config.scheduler)
        self.pool = BlockPool(num_blocks, config.cache.block_size)
        sched = config.scheduler
        self.timer = StepTimer()
        playback = PlaybackTracker(audio_plan(model), sched.ttfa_target_s, sched.client_prebuffer_s)
        self.scheduler = Scheduler(sched, self.pool, playback, self.timer,
                                   sched.max_queue_wait_s if is_wait_bounded else None)
        attention = resolve_backend(config.attention, model.device, config.cache.block_size)
        graph_rows = sched.max_num_seqs if config.cuda_graphs and attention == "triton" and \
            model.device.type == "cuda" else 0
        max_context = sched.max_prompt_tokens + model.timing.lm_steps_per_frame * math.ceil(
            sched.max_audio_s * model.timing.frame_rate_hz)
        self.lm_runner = LMRunner(model, num_blocks, config.cache.block_size, model.dtype, attention=attention,
                                  graph_rows=graph_rows, max_context=max_context)
        self.graph_capture: Capture | None = None  # what capturing the decode graphs cost (warm_up)
        self.codec_runner = CodecRunner(model)
        self.codec = CodecPipeline(self.codec_runner, self.timer, config.scheduler.max_codec_frames)
        self.text_streams = TextStreams(self)
        self._last_step: tuple[float, float] | None = None  # (perf_counter at its start, its LM seconds)
        self._lock = threading.RLock()
        self._capacity = (-math.inf, 0)  # (when, streams) of the last capacity computed for load()
        self.lm_busy_s = 0.0  # total LM step time since start (the codec's: self.codec.busy_s)

    # -- requests ----------------------------------------------------------------------------------------

    def check_request(self, text: str, voice: str | None, sampling: SamplingParams | dict | None) -> SamplingParams:
        return check_request(self.model, text, voice, sampling, self.config.scheduler.max_audio_s)

    def add_request(self, request_id: str, prepared: Prepared, sampling: SamplingParams, expected_tokens: int = 0,
                    is_text_complete: bool = True) -> None:
        """Queue a prepared request (see SpeechModel.prepare_request). ValueError if it cannot be served;
        QueueFullError when it cannot start within the queue bound."""
        with self._lock:
            if request_id in self.codec_runner.requests or request_id in self.scheduler.requests or \
                    request_id in self.codec.in_flight_ids():
                raise ValueError(f"request id {request_id!r} is still in use; pick another")
            limit = self.config.scheduler.max_prompt_tokens
            if len(prepared.prompt) > limit:
                raise ValueError(f"the prompt is {len(prepared.prompt)} tokens; the limit is {limit}: shorten the "
                                 "text or split it into several requests")
            codec_seed = codec_seed_for(sampling.seed)
            plan = audio_plan(self.model, prepared.chunking) if prepared.chunking is not None else None
            request = Request(request_id, tuple(prepared.prompt), sampling, codec_seed, expected_tokens,
                              text_ids=list(prepared.text_ids), is_text_complete=is_text_complete, plan=plan,
                              num_lanes=prepared.num_lanes, runner_inputs=(prepared.prompt_embeds, prepared.guidance))
            self.codec_runner.add(request_id, codec_seed, prepared.conditioning, plan)
            try:
                self.scheduler.add_request(request, self.clock())
            except Exception:
                self.codec_runner.drop(request_id)
                raise

    def open_text_stream(self, request_id: str, text: str, voice: str | None,
                         sampling: SamplingParams | dict | None, instructions: str | None = None) -> None:
        """Start a request whose text comes in pieces: `text` is the first (it may be blank); see TextStreams.
        `sampling` as for `check_request`; `instructions`: a style prompt, for a model that takes one. ValueError
        for bad input or a family that needs the whole text; QueueFullError when it cannot be queued."""
        stream = self.model.open_text_stream()
        if stream is None:
            raise ValueError(f"the {self.model.family} family needs the whole text at once")
        sampling = self.check_request(text if text.strip() else "-", voice, sampling)
        with self._lock:
            if request_id in self.text_streams or request_id in self.scheduler.requests:
                raise ValueError(f"request id {request_id!r} is still in use; pick another")
            self.text_streams.open(request_id, stream, voice, sampling, instructions)
            self.append_text(request_id, text, is_final=False)

    def append_text(self, request_id: str, text: str, is_final: bool = False) -> None:
        """The next piece of a streamed text (`is_final` with the last). KeyError for a request that takes no
        more text (unknown, ended, or its text complete). ValueError if the whole text turns out empty, and
        QueueFullError when it cannot be queued: the request is dropped then."""
        with self._lock:
            self.text_streams.append(request_id, text, is_final)

    def cancel(self, request_id: str) -> bool:
        """Stop a request now: its KV blocks return to the pool at once and its codec state is dropped.
        False for ids the engine does not hold."""
        return self.cancel_core(request_id)

    def cancel_core(self, request_id: str) -> bool:
        """`cancel` of this class whatever a subclass adds (failures and text streams use it)."""
        with self._lock:
            is_known = self.scheduler.cancel(request_id) | (request_id in self.codec_runner.requests)
            is_known |= self.text_streams.discard(request_id)
            self.codec_runner.drop(request_id)
            return is_known

    def set_paused(self, request_id: str, is_paused: bool) -> bool:
        """Pause a request's generation (its client is behind in reading) or resume it; False if it is gone."""
        with self._lock:
            return self.scheduler.set_paused(request_id, is_paused)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.codec_runner.requests)

    def load(self) -> EngineLoad:
        """What the engine holds now; its capacity is recomputed at most every CAPACITY_EVERY_S (it walks the
        running streams' futures, too much for every step)."""
        scheduler = self.scheduler
        active = [r for r in scheduler.running if not r.is_held]
        now = self.clock()
        if now - self._capacity[0] >= CAPACITY_EVERY_S:
            self._capacity = (now, scheduler.policy.capacity(active))
        return EngineLoad(len(scheduler.waiting), len(scheduler.running), len(scheduler.running) - len(active),
                          self.pool.num_free_blocks, self.pool.num_blocks, self._capacity[1])

    @property
    def num_requests(self) -> int:
        """Requests the engine holds: queued, generating, or with audio still to decode."""
        return len(set(self.scheduler.requests) | set(self.codec_runner.requests) | set(self.lm_runner.requests))

    def warm_up(self) -> None:
        """Capture the decode graphs (CUDA), then measure what steps and codec calls cost before any load comes
        (engine/warm_up.py)."""
        self.graph_capture = self.lm_runner.capture_graphs()
        warm_up(self)

    def close(self) -> None:
        self.codec.close()

    # -- the step loop -----------------------------------------------------------------------------------

    def step(self) -> StepEvents:
        """Schedule, execute, update. Waits for the codec only when the LM has nothing to do."""
        with self._lock:
            events = StepEvents()
            batch = self.scheduler.schedule(self.clock(), self.codec.ready())
            output, chunks = self._execute(batch, events)
            self._update(batch, output, chunks, events)
            return events

    def _execute(self, batch: StepBatch | None, events: StepEvents) -> tuple[StepOutput, list[AudioChunk]]:
        """Hand the planned chunks to the codec thread, run the LM rows, and collect the decoded chunks."""
        if batch is not None:
            self.codec.dispatch(batch.codec_request_ids)
        output = StepOutput((), (), ())
        if batch is not None and batch.has_lm_work:
            output = self._run_lm(batch, events)
        chunks, failures = self.codec.collect(wait=not events.num_rows and self.codec.is_busy)
        for request_id, message in failures:
            self._fail(request_id, message, events)
        return output, chunks

    def _run_lm(self, batch: StepBatch, events: StepEvents) -> StepOutput:
        started = time.perf_counter()
        if self._last_step is not None and started - self._last_step[0] < 1.0:  # back to back: a busy loop
            self.timer.observe_period(started - self._last_step[0], self._last_step[1])
        output = self._execute_isolated(batch, events)
        events.step_s = time.perf_counter() - started
        self.lm_busy_s += events.step_s
        if batch.rows:
            self.timer.observe_step(len(batch.rows), batch.num_tokens, batch.num_context_tokens, events.step_s)
        self._last_step = (started, events.step_s) if batch.rows else None
        events.num_rows = len(batch.rows)
        return output

    def _update(self, batch: StepBatch | None, output: StepOutput, chunks: list[AudioChunk],
                events: StepEvents) -> None:
        """The scheduler takes the step's tokens and chunks; the codec runner takes the tokens."""
        finished = self.scheduler.update(batch, output, chunks, self.clock())
        for request_id, step_token in zip(output.request_ids, output.step_tokens, strict=True):
            self.codec_runner.push(request_id, step_token)
            events.sampled.append((request_id, step_token))
        for request in finished:
            if request.finish_reason is FinishReason.REFUSED:
                self._fail(request.request_id, f"the server is at capacity: this request waited "
                           f"{self.scheduler.max_wait_s:g} s without starting; retry shortly", events,
                           Failure.AT_CAPACITY, self.scheduler.start_wait_s(request))
                continue
            events.finish_reasons[request.request_id] = request.finish_reason
            events.num_output_tokens[request.request_id] = request.num_output_tokens
            events.num_prompt_tokens[request.request_id] = len(request.prompt_token_ids)
            self.codec_runner.mark_complete(request.request_id)
            self.text_streams.discard(request.request_id)  # it ended on its own: more text has nowhere to go
        events.chunks += chunks

    def _execute_isolated(self, batch: StepBatch, events: StepEvents) -> StepOutput:
        """Run the step; if it raises, run each row alone and fail only the requests whose rows still raise."""
        try:
            return self.lm_runner.execute(batch)
        except Exception:
            logger.exception("LM step failed; retrying its %d rows one by one", len(batch.rows))
        outputs = []
        for row in batch.rows:
            news = tuple(n for n in batch.new_requests if n.request_id == row.request_id)
            try:
                outputs.append(self.lm_runner.execute(StepBatch(news, (row,), ())))
            except Exception as error:  # noqa: BLE001 - the request fails, the engine goes on
                self._fail(row.request_id, f"generation failed: {error}", events)
        return StepOutput(*(tuple(x for o in outputs for x in getattr(o, name))
                            for name in ("request_ids", "step_tokens", "is_stop")))

    def _fail(self, request_id: str, message: str, events: StepEvents, failure: Failure = Failure.ENGINE_ERROR,
              retry_after_s: float = 0.0) -> None:
        logger.warning("request %s failed: %s", request_id, message)
        self.cancel_core(request_id)
        events.failures.append(RequestFailure(request_id, message, failure, retry_after_s))
