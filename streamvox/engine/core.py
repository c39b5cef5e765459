"""The in-process engine: submit texts, step, and iterate each request's audio chunks as they are produced.

One step is `scheduler.schedule() -> lm_runner.execute() -> scheduler.update()`, then the codec decodes every
chunk that became ready. New requests join between steps and finished ones leave (continuous batching).
"""

from __future__ import annotations

import secrets
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from streamvox.config import EngineConfig, SamplingParams
from streamvox.models.base import SpeechModel
from streamvox.runner.codec_runner import AudioChunk, CodecRunner
from streamvox.runner.lm_runner import LMRunner
from streamvox.runner.weights import load_model
from streamvox.sched.kv_blocks import BlockPool
from streamvox.sched.request import FinishReason, Request
from streamvox.sched.scheduler import Scheduler

__all__ = ["AudioChunk", "Engine", "SpeechResult"]


@dataclass
class _Output:
    """What the engine keeps for a request until its last chunk has been consumed."""

    chunks: deque[AudioChunk] = field(default_factory=deque)
    token_ids: list[int] = field(default_factory=list)  # sampled so far
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class SpeechResult:
    """All audio of one finished request."""

    request_id: str
    pcm: np.ndarray  # [num_samples] float32
    sample_rate: int
    num_frames: int
    token_ids: tuple[int, ...]  # every sampled token, one per backbone step
    finish_reason: str


def codec_seed_for(seed: int) -> int:
    """The codec-noise seed of a request, derived from its sampling seed (so one seed fixes all its audio)."""
    return (seed * 6364136223846793005 + 1442695040888963407) % 2**63


class Engine:
    def __init__(self, model: SpeechModel, config: EngineConfig | None = None) -> None:
        config = config or EngineConfig()
        self.model = model
        self.config = config
        dtype = getattr(torch, config.dtype)
        cache = config.cache
        num_blocks = cache.num_blocks or max(
            1, cache.kv_cache_mb * 2**20 // LMRunner.kv_bytes_per_block(model, cache.block_size, dtype)
        )
        self.pool = BlockPool(num_blocks, cache.block_size)
        self.scheduler = Scheduler(config.scheduler, self.pool)
        self.lm_runner = LMRunner(model, num_blocks, cache.block_size, dtype)
        self.codec_runner = CodecRunner(model)
        self._outputs: dict[str, _Output] = {}
        self._lock = threading.RLock()

    @classmethod
    def from_pretrained(cls, model: str = "tiny-orpheus", **overrides) -> Engine:
        """Load `model` (directory, hub id or tiny-* name); `overrides` are EngineConfig fields."""
        config = EngineConfig(model=model, **overrides)
        return cls(load_model(config.model, config.codec, config.dtype), config)

    # -- requests ----------------------------------------------------------------------------------------

    def submit(self, text: str, voice: str | None = None, sampling: SamplingParams | None = None,
               request_id: str | None = None) -> str:
        """Queue `text`; returns its request id. ValueError (with what to change) for bad input."""
        if not text or not text.strip():
            raise ValueError("text is empty; give at least one word to speak")
        sampling = sampling or self.model.default_sampling
        sampling.validate()
        if sampling.seed is None:
            sampling = sampling.replace(seed=secrets.randbelow(2**63))
        prompt = self.model.prepare(text, voice)
        with self._lock:
            request_id = request_id or f"req-{secrets.token_hex(8)}"
            if request_id in self._outputs or request_id in self.scheduler.requests:
                raise ValueError(f"request id {request_id!r} is still in use; pick another or consume it first")
            codec_seed = codec_seed_for(sampling.seed)
            self.scheduler.add_request(Request(request_id, tuple(prompt), sampling, codec_seed))
            self.codec_runner.add(request_id, codec_seed)
            self._outputs[request_id] = _Output()
        return request_id

    def cancel(self, request_id: str) -> bool:
        """Stop a request now: its KV blocks return to the pool at once, its codec state and any audio not yet
        consumed are dropped. Also releases a finished request nobody will consume. False for unknown ids."""
        with self._lock:
            is_running = self.scheduler.cancel(request_id)
            self.codec_runner.drop(request_id)
            output = self._outputs.pop(request_id, None)
            if output is not None and output.finish_reason is None:
                output.finish_reason = FinishReason.CANCELLED
            return is_running or output is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.codec_runner.requests)

    # -- the step loop -----------------------------------------------------------------------------------

    def step(self) -> list[AudioChunk]:
        """Run one engine step; returns the chunks it produced (also queued for `stream`)."""
        with self._lock:
            batch = self.scheduler.schedule()
            if batch is not None:
                output = self.lm_runner.execute(batch)
                finished = self.scheduler.update(batch, output)
                for request_id, token_id in zip(output.request_ids, output.token_ids, strict=True):
                    self._outputs[request_id].token_ids.append(token_id)
                    self.codec_runner.push(request_id, token_id)
                for request in finished:
                    self._outputs[request.request_id].finish_reason = request.finish_reason
                    self.codec_runner.finish(request.request_id)
            chunks = self.codec_runner.decode_ready()
            for chunk in chunks:
                self._outputs[chunk.request_id].chunks.append(chunk)
            return chunks

    def stream(self, request_id: str) -> Iterator[AudioChunk]:
        """Yield the request's chunks in order, stepping the engine while none is ready.

        KeyError for an id the engine does not hold; a stream cancelled while it is read just ends.
        """
        if request_id not in self._outputs:
            raise KeyError(f"no request {request_id!r} (unknown, cancelled, or already consumed)")
        while True:
            with self._lock:
                output = self._outputs.get(request_id)
                if output is None:
                    return  # cancelled, or already fully consumed
                chunk = output.chunks.popleft() if output.chunks else None
                if chunk is not None and chunk.is_last:
                    del self._outputs[request_id]
            if chunk is None:
                self.step()
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
        while self.has_unfinished():
            self.step()
        return [self.result(request_id) for request_id in request_ids]
