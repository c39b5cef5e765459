"""In-process use of the engine: submit texts, then iterate each request's chunks or wait for its whole result.

The caller's thread steps the engine while it waits for a chunk (`stream`, `result`, `generate`). Requests wait
in the queue as long as it takes: unlike a served engine, nothing is refused for a predicted wait.
"""

from __future__ import annotations

import secrets
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from streamvox.batch import AudioChunk
from streamvox.config import EngineConfig, SamplingParams
from streamvox.engine.core import EngineCore, QueueFullError, StepEvents
from streamvox.engine.requests import expected_tokens
from streamvox.models.base import Prepared, SpeechModel
from streamvox.runner.weights import load_model
from streamvox.sched.request import FinishReason


@dataclass(frozen=True)
class SpeechResult:
    """All audio of one finished request."""

    request_id: str
    pcm: np.ndarray  # [num_samples] float32
    sample_rate: int
    num_frames: int
    step_tokens: tuple  # every step's output: a token id (Orpheus), or a frame of codes (CSM, Qwen3-TTS)
    finish_reason: str


@dataclass
class _Output:
    """What the in-process engine keeps for a request until its last chunk has been consumed."""

    chunks: deque[AudioChunk] = field(default_factory=deque)
    step_tokens: list = field(default_factory=list)  # sampled so far: token ids, or frames of codes
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
        return self.submit_prepared(self.model.prepare_request(text, voice), sampling, request_id,
                                    expected_tokens(self.model, text))

    def submit_prepared(self, prepared: Prepared, sampling: SamplingParams, request_id: str | None = None,
                        expected: int = 0) -> str:
        """Queue a request the model has prepared (SpeechModel.prepare_request), with resolved `sampling`;
        returns its request id."""
        with self._lock:
            request_id = self._new_id(request_id)
            self.add_request(request_id, prepared, sampling, expected)
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
            for request_id, step_token in events.sampled:
                if (output := self._outputs.get(request_id)) is not None:
                    output.step_tokens.append(step_token)
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
                if not (events.num_rows or events.chunks or events.failures or self.codec.is_busy):
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
        return SpeechResult(request_id, pcm, self.model.timing.sample_rate, num_frames, tuple(output.step_tokens),
                            reason)

    def generate(self, texts: list[str], voice: str | None = None,
                 sampling: SamplingParams | None = None) -> list[SpeechResult]:
        """Synthesize many texts as one continuous batch."""
        request_ids = [self.submit(text, voice, sampling) for text in texts]
        return [self.result(request_id) for request_id in request_ids]  # each steps the whole batch
