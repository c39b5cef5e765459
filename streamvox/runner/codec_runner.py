"""Turns each request's sampled tokens into frames, and ready runs of frames into PCM chunks, batched.

Chunk readiness: chunk boundaries fall after `first_chunk_frames`, then every `frames_per_chunk` frames; a run of
frames up to a boundary is ready when `lookahead_frames` more frames exist. A request's next chunk covers every
boundary that is ready (so a codec that falls behind catches up in bigger chunks); at the end of speech whatever
is left is ready. A request has at most one chunk in flight, so a stateful codec never sees two of its chunks in
one batch. `take_ready` -> `decode` (any thread) -> `complete` lets the codec run beside the LM.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from streamvox.batch import AudioChunk, AudioPlan
from streamvox.models.base import Chunking, ChunkJob, FrameBuilder, SpeechModel, StepToken


@dataclass(frozen=True)
class PendingChunk:
    """A chunk taken for decoding; `job` is None for the empty closing chunk of a request with no frames left."""

    request_id: str
    start_frame: int
    end_frame: int
    is_last: bool
    job: ChunkJob | None
    rereads: tuple[float, float] = (0.0, 0.0)  # AudioPlan.codec_rereads of the chunk


@dataclass
class _CodecRequest:
    builder: FrameBuilder
    seed: int
    state: Any  # the model's per-request codec state (None for a stateless codec)
    plan: AudioPlan  # its chunk plan
    frames: list[tuple[int, ...]] = field(default_factory=list)
    num_taken_frames: int = 0  # frames handed to the codec so far
    is_complete: bool = False  # no more tokens will come: the tail is decodable
    is_in_flight: bool = False


def audio_plan(model: SpeechModel, chunking: Chunking | None = None) -> AudioPlan:
    """The plan of a request chunked by `chunking` (None: the family's)."""
    timing, chunking = model.timing, chunking or model.chunking
    return AudioPlan(timing.lm_steps_per_frame, timing.samples_per_frame / timing.sample_rate,
                     chunking.first_chunk_frames, chunking.frames_per_chunk, chunking.lookahead_frames,
                     model.codec_cost_per_frame, chunking.codec_prefix_frames)


class CodecRunner:
    def __init__(self, model: SpeechModel) -> None:
        self.model = model
        self.plan = audio_plan(model)
        self.requests: dict[str, _CodecRequest] = {}
        self._orphans: dict[str, Any] = {}  # codec states of requests dropped while a chunk of theirs decodes
        self._pinned: torch.Tensor | None = None  # CUDA: page-locked host buffer the codec's PCM is copied into
        # CUDA: the codec's own stream, so its kernels overlap the LM step running on the default one (codec
        # state is made and used on this stream only; its inputs come from the host)
        self._stream = torch.cuda.Stream(model.device) if model.device.type == "cuda" else None

    def add(self, request_id: str, seed: int, conditioning: Any = None, plan: AudioPlan | None = None) -> None:
        """Take a request: its codec state is made from its conditioning (Prepared.conditioning) and seed."""
        state = self.model.new_codec_state(conditioning, seed)
        self.requests[request_id] = _CodecRequest(self.model.new_frame_builder(), seed, state, plan or self.plan)

    def push(self, request_id: str, token: StepToken) -> None:
        request = self.requests.get(request_id)
        if request is not None:
            frame = request.builder.push(token)
            if frame is not None:
                request.frames.append(frame)

    def mark_complete(self, request_id: str) -> None:
        """No more tokens will come: the tail becomes decodable."""
        if request_id in self.requests:
            self.requests[request_id].is_complete = True

    def drop(self, request_id: str) -> None:
        """Forget a request (cancelled, or failed); a chunk of it still decoding is then ignored (and its codec
        state released once that chunk is back)."""
        request = self.requests.pop(request_id, None)
        if request is not None and request.is_in_flight:
            self._orphans[request_id] = request.state
        elif request is not None:
            self.model.release_codec_state(request.state)

    def fail(self, request_id: str) -> None:
        """Forget a request whose chunk failed to decode (the call is over: its codec state is released now)."""
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.model.release_codec_state(request.state)

    def ready(self) -> list[tuple[str, int, bool]]:
        """(request_id, frames ready to decode, is_complete) of every request with a chunk ready and none in
        flight."""
        ready = []
        for request_id, request in self.requests.items():
            if not request.is_in_flight and (end := self._ready_end(request)) is not None:
                ready.append((request_id, end - request.num_taken_frames, request.is_complete))
        return ready

    def take_ready(self, request_ids: list[str], max_frames: int | None = None) -> list[PendingChunk]:
        """Mark the next chunk of each given ready request as in flight and describe its decode.

        With `max_frames`, the batch stops at that many frames (a request may get a shorter chunk, ending on a
        chunk boundary, and the rest of its frames stay ready); the first request always gets one chunk. A
        request's first chunk is never shortened behind another request's: the policy sized it so that it plays
        until the next one is made, so it waits for the next batch instead."""
        pending = []
        budget = max_frames if max_frames is not None else float("inf")
        for request_id in request_ids:
            request = self.requests[request_id]
            start = request.num_taken_frames
            end = self._ready_end(request)
            if request.plan.codec_prefix_frames is not None:
                # a detokenizer that reruns over the prefix decodes a job of several chunks pass after pass, each
                # as long as a batch of every request's next chunk: the others' chunks would wait that long
                end = self._cut(request, request.plan.next_boundary(start), end)
            if end - start > budget:
                capped = request.plan.boundary_at_most(start + budget)
                if pending and (capped <= start or start == 0):
                    break
                if capped <= start:
                    capped = min(end, request.plan.next_boundary(start))  # the first request always gets a chunk
                end = self._cut(request, capped, end)
            budget -= end - start
            is_last = request.is_complete and end == len(request.frames)
            job = None
            if end > start:
                frames = torch.tensor(request.frames, dtype=torch.int64)  # [num_known_frames, codes_per_frame]
                job = ChunkJob(frames, start, end, is_last, request.seed, request.state)
            pending.append(PendingChunk(request_id, start, end, is_last, job, request.plan.codec_rereads(start, end)))
            request.num_taken_frames = end
            request.is_in_flight = True
        return pending

    def decode(self, pending: list[PendingChunk]) -> list[np.ndarray]:
        """Run the codec on taken chunks (safe on another thread: touches no runner state but its own host
        buffer and stream, and one codec call runs at a time). The batch's PCM reaches the host in one copy."""
        jobs = [p.job for p in pending if p.job is not None]
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            decoded = self.model.decode_chunks(jobs) if jobs else []
            pcm = self._to_host(torch.cat([d.reshape(-1).float() for d in decoded])) if decoded else \
                np.zeros(0, np.float32)
        pieces = iter(np.split(pcm, np.cumsum([d.numel() for d in decoded])[:-1]) if decoded else [])
        return [next(pieces) if p.job is not None else np.zeros(0, np.float32) for p in pending]

    def _to_host(self, pcm: torch.Tensor) -> np.ndarray:
        """[N] float32 on the codec's device -> a numpy array of its own."""
        if pcm.device.type != "cuda":
            return pcm.numpy()
        if self._pinned is None or self._pinned.numel() < pcm.numel():
            self._pinned = torch.empty(2 * pcm.numel(), dtype=torch.float32, pin_memory=True)
        host = self._pinned[: pcm.numel()]
        host.copy_(pcm, non_blocking=True)
        torch.cuda.current_stream(pcm.device).synchronize()
        return host.numpy().copy()  # the buffer is reused by the next batch

    def complete(self, pending: list[PendingChunk], pcms: list[np.ndarray]) -> list[AudioChunk]:
        """Chunks for decoded work; requests whose last chunk this was (or that were dropped) are released."""
        chunks = []
        for chunk, pcm in zip(pending, pcms, strict=True):
            request = self.requests.get(chunk.request_id)
            if request is None:  # dropped while it was decoding
                if (state := self._orphans.pop(chunk.request_id, None)) is not None:
                    self.model.release_codec_state(state)
                continue
            request.is_in_flight = False
            chunks.append(AudioChunk(chunk.request_id, pcm, chunk.start_frame, chunk.end_frame, chunk.is_last))
            if chunk.is_last:
                del self.requests[chunk.request_id]
                self.model.release_codec_state(request.state)
        return chunks

    @staticmethod
    def _cut(request: _CodecRequest, boundary: int, end: int) -> int:
        """The end of a chunk of frames up to `end` cut at `boundary`: `end` itself when the boundary is not
        before it, or when the request is complete and fewer than its lookahead frames follow the boundary (no
        place to split: the rest is the last chunk)."""
        if boundary >= end or (request.is_complete and len(request.frames) - boundary < request.plan.lookahead_frames):
            return end
        return boundary

    def _ready_end(self, request: _CodecRequest) -> int | None:
        """End frame of the request's next chunk if one is ready, else None (the closing chunk of a complete
        request may be empty)."""
        end = request.plan.decodable_end(len(request.frames), request.is_complete)
        return end if end > request.num_taken_frames or request.is_complete else None
