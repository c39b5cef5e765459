"""The engine: one step loop over the scheduler, the LM runner and a codec running beside it.

`EngineCore.step()` is `scheduler.schedule() -> lm_runner.execute() -> scheduler.update()`; meanwhile the codec
decodes the previous step's ready chunks on its own thread (one batch in flight, at most one chunk per request in
it). Step and codec times are measured as they run and feed the scheduler's slack estimates. A request that
raises while sampling or decoding fails alone: the step is retried row by row (the codec batch chunk by chunk)
and only the rows that still raise are failed. `Engine` adds in-process convenience (stream, result, generate).
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from streamvox.batch import StepBatch, StepOutput
from streamvox.config import EngineConfig, SamplingParams
from streamvox.models.base import SpeechModel, TextStream
from streamvox.protocol import Failure
from streamvox.runner.codec_runner import AudioChunk, CodecRunner, PendingChunk
from streamvox.runner.lm_runner import LMRunner
from streamvox.runner.memory import cuda_kv_blocks
from streamvox.runner.weights import load_model
from streamvox.sched.kv_blocks import BlockPool
from streamvox.sched.playback import AudioPlan, PlaybackTracker
from streamvox.sched.policy import POLICIES
from streamvox.sched.request import FinishReason, Request
from streamvox.sched.scheduler import QueueFullError, Scheduler
from streamvox.sched.timing import StepTimer

__all__ = ["AudioChunk", "Engine", "EngineCore", "QueueFullError", "RequestFailure", "SpeechResult", "StepEvents"]

logger = logging.getLogger(__name__)
CHARS_PER_SECOND = 14.0  # speaking rate used to size a request's KV reservation from its text
CPU_KV_CACHE_MB = 256


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
    sampled: list[tuple[str, int]] = field(default_factory=list)  # (request_id, token_id) sampled this step
    num_rows: int = 0  # requests in the LM step
    step_s: float = 0.0  # wall time of the LM step


@dataclass(frozen=True)
class SpeechResult:
    """All audio of one finished request."""

    request_id: str
    pcm: np.ndarray  # [num_samples] float32
    sample_rate: int
    num_frames: int
    token_ids: tuple  # every step's output: a token id (Orpheus), or a frame of codes (CSM, Qwen3-TTS)
    finish_reason: str


@dataclass
class _CodecBatch:
    future: Future  # -> list[np.ndarray | Exception], one per pending chunk
    pending: list[PendingChunk]
    started_s: float


CODEC_BATCHES_IN_FLIGHT = 2
WARM_UP_LONG_WORDS = 150  # words of the warm-up's long prompts, so it measures what context costs
WARM_UP_FRAMES = 12  # per request: long enough for the codec to run beside the LM as it does under load


def codec_seed_for(seed: int) -> int:
    """The codec-noise seed of a request, derived from its sampling seed (so one seed fixes all its audio)."""
    return (seed * 6364136223846793005 + 1442695040888963407) % 2**63


def kv_blocks(model: SpeechModel, config: EngineConfig, dtype: torch.dtype) -> int:
    """KV blocks of the cache: as configured, else 256 MB on the CPU, else what the GPU's memory fraction leaves."""
    cache = config.cache
    cache.validate()
    if cache.num_blocks:
        return cache.num_blocks
    per_block = LMRunner.kv_bytes_per_block(model, cache.block_size, dtype)
    if cache.kv_cache_mb or model.device.type != "cuda":
        return max(1, (cache.kv_cache_mb or CPU_KV_CACHE_MB) * 2**20 // per_block)
    return cuda_kv_blocks(model, cache, config.scheduler, dtype)


def audio_plan(model: SpeechModel) -> AudioPlan:
    timing, chunking = model.timing, model.chunking
    return AudioPlan(timing.lm_steps_per_frame, timing.samples_per_frame / timing.sample_rate,
                     chunking.first_chunk_frames, chunking.frames_per_chunk, chunking.lookahead_frames)


def check_request(model: SpeechModel, text: str, voice: str | None, sampling: SamplingParams | dict | None,
                  max_audio_s: float = math.inf) -> SamplingParams:
    """Validate a request before it is prepared; returns its sampling with a seed. `sampling` is complete, or
    a dict of fields over the model's defaults, or None for the defaults; `max_audio_s` bounds the audio its
    max_tokens may ask for. ValueError says what to change."""
    if not text or not text.strip():
        raise ValueError("text is empty; give at least one word to speak")
    model.resolve_voice(voice)
    if isinstance(sampling, dict):
        sampling = model.default_sampling.replace(**sampling)
    sampling = sampling or model.default_sampling
    sampling.validate()
    timing = model.timing
    max_tokens = int(max_audio_s * timing.frame_rate_hz) * timing.lm_steps_per_frame if max_audio_s < math.inf else 0
    if max_tokens and sampling.max_tokens > max_tokens:
        asked_s = sampling.max_tokens / timing.lm_steps_per_frame / timing.frame_rate_hz
        raise ValueError(f"max_tokens {sampling.max_tokens} asks for {asked_s:.0f} s of audio; this server makes at "
                         f"most {max_audio_s:g} s per request (max_tokens {max_tokens}): split the text")
    if sampling.seed is None:
        sampling = sampling.replace(seed=secrets.randbelow(2**63))
    return sampling


@dataclass
class _TextStream:
    stream: TextStream
    voice: str | None
    sampling: SamplingParams
    num_chars: int = 0
    has_words: bool = False  # some text that is not whitespace has come
    held: list[int] = field(default_factory=list)  # settled text ids before the request is queued
    is_added: bool = False  # its prompt is known and the request queued


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
        num_blocks = kv_blocks(model, config, model.dtype)
        cache = config.cache
        self.pool = BlockPool(num_blocks, cache.block_size)
        sched = config.scheduler
        self.playback = PlaybackTracker(audio_plan(model), sched.ttfa_target_s, sched.client_prebuffer_s)
        self.timer = StepTimer()
        self.scheduler = Scheduler(sched, self.pool, self.playback, self.timer,
                                   sched.max_queue_wait_s if is_wait_bounded else None)
        self.lm_runner = LMRunner(model, num_blocks, cache.block_size, model.dtype)
        self.codec_runner = CodecRunner(model)
        self._codec_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codec")
        self._codec_batches: deque[_CodecBatch] = deque()  # dispatched, in order; the codec thread runs them
        self._last_step: tuple[float, float] | None = None  # (perf_counter at its start, its LM seconds)
        self._last_dispatch: tuple[float, float] | None = None  # (perf_counter, codec_busy_s) at the last dispatch
        self._lock = threading.RLock()
        self._text_streams: dict[str, _TextStream] = {}  # requests whose text is still coming
        self.lm_busy_s = 0.0  # totals since start: LM step time, and codec time (on its own thread)
        self.codec_busy_s = 0.0
        self.before_decode: Callable[[list[PendingChunk]], None] | None = None  # called on the codec thread

    # -- requests ----------------------------------------------------------------------------------------

    def check_request(self, text: str, voice: str | None, sampling: SamplingParams | dict | None) -> SamplingParams:
        return check_request(self.model, text, voice, sampling, self.config.scheduler.max_audio_s)

    def expected_tokens(self, text: str) -> int:
        """LM steps the speech of `text` is expected to take, with a margin (sizes its KV reservation)."""
        timing = self.model.timing
        seconds = 1.0 + 1.25 * len(text) / CHARS_PER_SECOND
        return int(seconds * timing.frame_rate_hz * timing.lm_steps_per_frame)

    def add_request(self, request_id: str, prompt_token_ids: list, sampling: SamplingParams,
                    expected_tokens: int = 0, text_ids: list[int] = (), is_text_complete: bool = True) -> None:
        """Queue a prepared request (`text_ids`: text riding along with its generated steps, see
        SpeechModel.prepare_request). ValueError if it cannot be served; QueueFullError at the queue bound."""
        with self._lock:
            in_flight = {c.request_id for b in self._codec_batches for c in b.pending}
            if request_id in self.codec_runner.requests or request_id in self.scheduler.requests or \
                    request_id in in_flight:
                raise ValueError(f"request id {request_id!r} is still in use; pick another")
            limit = self.config.scheduler.max_prompt_tokens
            if len(prompt_token_ids) > limit:
                raise ValueError(f"the prompt is {len(prompt_token_ids)} tokens; the limit is {limit}: shorten the "
                                 "text or split it into several requests")
            codec_seed = codec_seed_for(sampling.seed)
            request = Request(request_id, tuple(prompt_token_ids), sampling, codec_seed, expected_tokens,
                              text_ids=list(text_ids), is_text_complete=is_text_complete)
            self.scheduler.add_request(request, self.clock())
            self.codec_runner.add(request_id, codec_seed)

    # -- text that streams in ------------------------------------------------------------------------------

    def open_text_stream(self, request_id: str, text: str, voice: str | None,
                         sampling: SamplingParams | dict | None) -> None:
        """Start a request whose text comes in pieces: `text` is the first (it may be blank). It is queued once
        its first text id is settled, speaks what it has, and pauses while the next text id has not come.
        `sampling` as for `check_request`. ValueError for bad input or a family that needs the whole text;
        QueueFullError at the queue bound."""
        stream = self.model.open_text_stream()
        if stream is None:
            raise ValueError(f"the {self.model.family} family needs the whole text at once")
        sampling = self.check_request(text if text.strip() else "-", voice, sampling)
        with self._lock:
            if request_id in self._text_streams or request_id in self.scheduler.requests:
                raise ValueError(f"request id {request_id!r} is still in use; pick another")
            self._text_streams[request_id] = _TextStream(stream, voice, sampling)
            self.append_text(request_id, text, is_final=False)

    def append_text(self, request_id: str, text: str, is_final: bool = False) -> None:
        """The next piece of a streamed text (`is_final` with the last). KeyError for a request that takes no
        more text (unknown, ended, or its text complete). ValueError if the whole text turns out empty, and
        QueueFullError when it cannot be queued: the request is dropped then."""
        with self._lock:
            state = self._text_streams.get(request_id)
            if state is None:
                raise KeyError(f"request {request_id!r} takes no more text (unknown, ended, or its text complete)")
            try:
                self._take_text(request_id, state, text, is_final)
            except Exception:
                self._text_streams.pop(request_id, None)
                if state.is_added:
                    EngineCore.cancel(self, request_id)
                raise

    def _take_text(self, request_id: str, state: _TextStream, text: str, is_final: bool) -> None:
        text_ids = state.stream.feed(text, is_final)
        state.num_chars += len(text)
        state.has_words |= bool(text.strip())
        if is_final:
            del self._text_streams[request_id]
        if state.is_added:
            self.scheduler.add_text(request_id, text_ids, is_final)
            return
        state.held += text_ids
        if state.has_words and (len(state.held) >= 2 or (state.held and not is_final)):
            prompt = self.model.prompt_for(state.held[0], state.voice)  # the first text id makes the prompt
            expected = self.expected_tokens("x" * max(state.num_chars, 40))
            self.add_request(request_id, prompt, state.sampling, expected, state.held[1:], is_final)
            state.is_added = True
        elif is_final:
            raise ValueError("text is empty; give at least one word to speak")

    def cancel(self, request_id: str) -> bool:
        """Stop a request now: its KV blocks return to the pool at once and its codec state is dropped.
        False for ids the engine does not hold."""
        with self._lock:
            is_known = self.scheduler.cancel(request_id) | (request_id in self.codec_runner.requests)
            is_known |= self._text_streams.pop(request_id, None) is not None
            self.codec_runner.drop(request_id)
            self.playback.drop(request_id)
            return is_known

    def set_paused(self, request_id: str, is_paused: bool) -> bool:
        """Pause a request's generation (its client is behind in reading) or resume it; False if it is gone."""
        with self._lock:
            return self.scheduler.set_paused(request_id, is_paused)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.codec_runner.requests)

    def load(self) -> EngineLoad:
        scheduler = self.scheduler
        num_held = sum(r.is_held for r in scheduler.running)
        active = [r for r in scheduler.running if not r.is_held]
        return EngineLoad(len(scheduler.waiting), len(scheduler.running), num_held, self.pool.num_free_blocks,
                          self.pool.num_blocks, scheduler.policy.capacity(active))

    @property
    def num_requests(self) -> int:
        """Requests the engine holds: queued, generating, or with audio still to decode."""
        return len(set(self.scheduler.requests) | set(self.codec_runner.requests) | set(self.lm_runner.requests))

    def warm_up(self) -> None:
        """Run requests through the LM and the codec, alone and in batches, short and with long contexts, so the
        first real request is not slow and the step-cost model knows what more streams cost before any load
        comes (kept as its prior)."""
        chunking = self.model.chunking
        num_frames = chunking.first_chunk_frames + chunking.lookahead_frames + WARM_UP_FRAMES
        sampling = self.model.default_sampling.replace(
            max_tokens=num_frames * self.model.timing.lm_steps_per_frame, ignore_eos=True, seed=0)
        short = self.model.prepare_request("warm up", None)
        long = self.model.prepare_request("warm up " * WARM_UP_LONG_WORDS, None)
        long = (long[0][: self.config.scheduler.max_prompt_tokens], long[1])
        scheduler = self.scheduler
        policy, max_wait_s = scheduler.policy, scheduler.max_wait_s
        scheduler.policy, scheduler.max_wait_s = POLICIES["fcfs"](scheduler.config, self.playback, self.timer), None
        self.timer.begin_prior()
        try:
            for num_rows, (prompt, text_ids) in [(1, short), (4, short), (8, short), (4, long)]:
                for index in range(min(num_rows, scheduler.config.max_num_seqs)):
                    self.add_request(f"warm-up-{index}", prompt, sampling, 0, text_ids)
                while self.has_unfinished():
                    self.step()
        finally:
            scheduler.policy, scheduler.max_wait_s = policy, max_wait_s
        self.timer.keep_as_prior()

    def close(self) -> None:
        self._codec_thread.shutdown(wait=True, cancel_futures=True)

    # -- the step loop -----------------------------------------------------------------------------------

    def step(self) -> StepEvents:
        """Run one LM step and move codec work along; waits for the codec only when the LM has nothing to do."""
        with self._lock:
            events = StepEvents()
            self._collect_codec(events, wait=False)
            batch = self.scheduler.schedule(self.clock())
            if batch is not None:
                self._run_lm(batch, events)
            self._dispatch_codec()
            if (batch is None or not batch.rows) and self._codec_batches and not events.chunks:
                self._collect_codec(events, wait=True)
                self._dispatch_codec()
            for request_id in events.finish_reasons:
                self._text_streams.pop(request_id, None)  # it ended on its own: more text has nowhere to go
            return events

    def _run_lm(self, batch: StepBatch, events: StepEvents) -> None:
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
        for request in self.scheduler.update(batch, output):
            if request.finish_reason is FinishReason.REFUSED:
                self.codec_runner.drop(request.request_id)
                self.playback.drop(request.request_id)
                events.failures.append(RequestFailure(
                    request.request_id, f"the server is at capacity: this request waited {self.scheduler.max_wait_s:g}"
                    " s without starting; retry shortly", Failure.AT_CAPACITY, self.scheduler.start_wait_s()))
                continue
            events.finish_reasons[request.request_id] = request.finish_reason
            events.num_output_tokens[request.request_id] = request.num_output_tokens
            events.num_prompt_tokens[request.request_id] = len(request.prompt_token_ids)
        for request_id, token_id in zip(output.request_ids, output.token_ids, strict=True):
            self.codec_runner.push(request_id, token_id)
            events.sampled.append((request_id, token_id))
        for request_id in events.finish_reasons:
            self.codec_runner.finish(request_id)

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
                            for name in ("request_ids", "token_ids", "is_stop")))

    def _dispatch_codec(self) -> None:
        """Hand the ready chunks, most urgent first, to the codec thread. One batch may wait behind the one
        being decoded, so the codec thread goes from one to the next without waiting for the LM step to end."""
        if len(self._codec_batches) >= CODEC_BATCHES_IN_FLIGHT:
            return
        policy, now = self.scheduler.policy, self.clock()
        ready = [request_id for request_id, num_frames, is_final in self.codec_runner.ready()
                 if policy.is_codec_due(request_id, num_frames, is_final, now)]
        if not ready:
            return
        order = policy.codec_order(ready, now)
        pending = self.codec_runner.take_ready(order, self.config.scheduler.max_codec_frames)
        future = self._codec_thread.submit(self._decode_isolated, pending)
        started = time.perf_counter()
        if self._last_dispatch is not None:  # how busy the codec thread was since the last dispatch
            at, busy_s = self._last_dispatch
            self.timer.observe_codec_busy(self.codec_busy_s - busy_s, started - at)
        self._last_dispatch = (started, self.codec_busy_s)
        self._codec_batches.append(_CodecBatch(future, pending, started))

    def _decode_isolated(self, pending: list[PendingChunk]) -> list[np.ndarray | Exception]:
        started = time.perf_counter()
        try:
            return self._decode_each_on_error(pending)
        finally:
            self.codec_busy_s += time.perf_counter() - started  # only the codec thread writes it

    def _decode_each_on_error(self, pending: list[PendingChunk]) -> list[np.ndarray | Exception]:
        """Codec thread: decode the batch; if it raises, decode chunk by chunk so only the bad ones fail."""
        try:
            with torch.inference_mode():
                return self._decode(pending)
        except Exception:
            logger.exception("codec batch failed; retrying its %d chunks one by one", len(pending))
        results: list[np.ndarray | Exception] = []
        for chunk in pending:
            try:
                with torch.inference_mode():
                    results.extend(self._decode([chunk]))
            except Exception as error:  # noqa: BLE001 - the request fails, the engine goes on
                results.append(error)
        return results

    def _decode(self, pending: list[PendingChunk]) -> list[np.ndarray]:
        if self.before_decode is not None:
            self.before_decode(pending)  # a test's fault injection: it may raise
        return self.codec_runner.decode(pending)

    def _collect_codec(self, events: StepEvents, wait: bool) -> None:
        while self._codec_batches and (wait or self._codec_batches[0].future.done()):
            self._collect_batch(self._codec_batches.popleft(), events)
            wait = False

    def _collect_batch(self, codec_batch: _CodecBatch, events: StepEvents) -> None:
        results = codec_batch.future.result()
        self.timer.observe_codec(time.perf_counter() - codec_batch.started_s)
        good = [(p, r) for p, r in zip(codec_batch.pending, results, strict=True) if not isinstance(r, Exception)]
        for chunk, result in zip(codec_batch.pending, results, strict=True):
            if isinstance(result, Exception):
                self.codec_runner.release([chunk])
                self._fail(chunk.request_id, f"audio decoding failed: {result}", events)
        now = self.clock()
        sample_rate = self.model.timing.sample_rate
        for chunk in self.codec_runner.complete([p for p, _ in good], [r for _, r in good]):
            self.playback.on_chunk(chunk.request_id, len(chunk.pcm) / sample_rate, now)
            if chunk.is_last:
                self.playback.drop(chunk.request_id)
            events.chunks.append(chunk)

    def _fail(self, request_id: str, message: str, events: StepEvents) -> None:
        logger.warning("request %s failed: %s", request_id, message)
        EngineCore.cancel(self, request_id)  # not a subclass's: its own bookkeeping sees the failure
        events.failures.append(RequestFailure(request_id, message))


@dataclass
class _Output:
    """What the in-process engine keeps for a request until its last chunk has been consumed."""

    chunks: deque[AudioChunk] = field(default_factory=deque)
    token_ids: list[int] = field(default_factory=list)  # sampled so far
    finish_reason: FinishReason | None = None
    error: str | None = None


class Engine(EngineCore):
    """In-process use: submit texts, then iterate each request's chunks or wait for its whole result."""

    def __init__(self, model: SpeechModel, config: EngineConfig | None = None, **kwargs) -> None:
        super().__init__(model, config, **{"is_wait_bounded": False, **kwargs})
        self._outputs: dict[str, _Output] = {}
        self._text_arrived = threading.Condition(self._lock)

    @classmethod
    def from_pretrained(cls, model: str = "tiny-orpheus", **overrides) -> Engine:
        """Load `model` (directory, hub id or tiny-* name); `overrides` are EngineConfig fields."""
        config = EngineConfig(model=model, **overrides)
        return cls(load_model(config.model, config.codec, config.dtype, config.device), config)

    def submit(self, text: str, voice: str | None = None, sampling: SamplingParams | None = None,
               request_id: str | None = None) -> str:
        """Queue `text`; returns its request id. ValueError (with what to change) for bad input."""
        sampling = self.check_request(text, voice, sampling)
        prompt, text_ids = self.model.prepare_request(text, voice)
        with self._lock:
            request_id = self._new_id(request_id)
            self.add_request(request_id, prompt, sampling, self.expected_tokens(text), text_ids)
            self._outputs[request_id] = _Output()
        return request_id

    def submit_text_stream(self, text: str, voice: str | None = None, sampling: SamplingParams | None = None,
                           request_id: str | None = None) -> str:
        """Start a request whose text comes in pieces: `text` is the first, `append_text` adds the rest. It
        speaks what it has and pauses, holding its place, when it runs out of text before the last piece
        (`stream` and `result` then wait for another thread to add text). ValueError for a family that needs the
        whole text first; QueueFullError at the queue bound."""
        with self._lock:
            request_id = self._new_id(request_id)
            self._outputs[request_id] = _Output()
            try:
                self.open_text_stream(request_id, text, voice, sampling)
            except Exception:
                self._outputs.pop(request_id, None)
                raise
        return request_id

    def append_text(self, request_id: str, text: str, is_final: bool = False) -> None:
        with self._lock:
            try:
                super().append_text(request_id, text, is_final)
            except (ValueError, QueueFullError):  # the request was dropped
                self._outputs.pop(request_id, None)
                raise
            finally:
                self._text_arrived.notify_all()

    def _new_id(self, request_id: str | None) -> str:
        request_id = request_id or f"req-{secrets.token_hex(8)}"
        if request_id in self._outputs:
            raise ValueError(f"request id {request_id!r} is still in use; pick another or consume it first")
        return request_id

    def cancel(self, request_id: str) -> bool:
        """Also releases a finished request's unconsumed output."""
        with self._lock:
            is_known = super().cancel(request_id)
            output = self._outputs.pop(request_id, None)
            if output is not None and output.finish_reason is None:
                output.finish_reason = FinishReason.CANCELLED
            return is_known or output is not None

    def step(self) -> StepEvents:
        with self._lock:
            events = super().step()
            for request_id, token_id in events.sampled:
                if (output := self._outputs.get(request_id)) is not None:
                    output.token_ids.append(token_id)
            for request_id, reason in events.finish_reasons.items():
                if (output := self._outputs.get(request_id)) is not None:
                    output.finish_reason = reason
            for chunk in events.chunks:
                if (output := self._outputs.get(chunk.request_id)) is not None:
                    output.chunks.append(chunk)
            for failure in events.failures:
                if (output := self._outputs.get(failure.request_id)) is not None:
                    output.error = failure.message
            return events

    def stream(self, request_id: str) -> Iterator[AudioChunk]:
        """Yield the request's chunks in order, stepping the engine while none is ready.

        KeyError for an id the engine does not hold; RuntimeError if the request failed; a stream cancelled
        while it is read just ends.
        """
        if request_id not in self._outputs:
            raise KeyError(f"no request {request_id!r} (unknown, cancelled, or already consumed)")
        while True:
            with self._lock:
                output = self._outputs.get(request_id)
                if output is None:
                    return  # cancelled, or already fully consumed
                if output.error is not None and not output.chunks:
                    del self._outputs[request_id]
                    raise RuntimeError(output.error)
                chunk = output.chunks.popleft() if output.chunks else None
                if chunk is not None and chunk.is_last:
                    del self._outputs[request_id]
            if chunk is None:
                events = self.step()
                if not (events.num_rows or events.chunks or events.failures or self._codec_batches):
                    with self._lock:  # nothing can move until text comes (from another thread): wait for it
                        self._text_arrived.wait(timeout=0.05)
                continue
            yield chunk
            if chunk.is_last:
                return

    def result(self, request_id: str) -> SpeechResult:
        """Run a request to completion and return all of its audio."""
        output = self._outputs.get(request_id)
        chunks = list(self.stream(request_id))
        pcm = np.concatenate([c.pcm for c in chunks]) if chunks else np.zeros(0, np.float32)
        num_frames = chunks[-1].end_frame if chunks else 0
        reason = (output.finish_reason or FinishReason.CANCELLED).value
        return SpeechResult(request_id, pcm, self.model.timing.sample_rate, num_frames, tuple(output.token_ids), reason)

    def generate(self, texts: list[str], voice: str | None = None,
                 sampling: SamplingParams | None = None) -> list[SpeechResult]:
        """Synthesize many texts as one continuous batch."""
        request_ids = [self.submit(text, voice, sampling) for text in texts]
        return [self.result(request_id) for request_id in request_ids]  # each steps the whole batch
