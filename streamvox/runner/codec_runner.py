"""Turns each request's sampled tokens into frames, and ready runs of frames into PCM chunks, batched.

Chunk readiness: a chunk of n frames (first_chunk_frames for the first, frames_per_chunk after) is ready when
n + lookahead_frames frames past the last emitted one exist; at the end of speech whatever is left is ready.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from streamvox.models.base import ChunkJob, FrameBuilder, SpeechModel


@dataclass(frozen=True)
class AudioChunk:
    """PCM for frames [start_frame, end_frame) of one request."""

    request_id: str
    pcm: np.ndarray  # [num_samples] float32 in [-1, 1]
    start_frame: int
    end_frame: int
    is_last: bool  # no more audio will follow for this request


@dataclass
class _CodecRequest:
    builder: FrameBuilder
    seed: int
    frames: list[tuple[int, ...]] = field(default_factory=list)
    num_emitted_frames: int = 0
    is_final: bool = False


class CodecRunner:
    def __init__(self, model: SpeechModel) -> None:
        self.model = model
        self.requests: dict[str, _CodecRequest] = {}

    def add(self, request_id: str, seed: int) -> None:
        self.requests[request_id] = _CodecRequest(self.model.new_frame_builder(), seed)

    def push(self, request_id: str, token_id: int) -> None:
        request = self.requests.get(request_id)
        if request is not None:
            frame = request.builder.push(token_id)
            if frame is not None:
                request.frames.append(frame)

    def finish(self, request_id: str) -> None:
        """No more tokens will come: the tail becomes decodable."""
        if request_id in self.requests:
            self.requests[request_id].is_final = True

    def drop(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def decode_ready(self) -> list[AudioChunk]:
        """Decode every ready chunk (at most one per request) in one batch; finished requests are released."""
        jobs: list[tuple[str, ChunkJob]] = []
        for request_id, request in self.requests.items():
            end = self._ready_end(request)
            if end is not None:
                frames = torch.tensor(request.frames, dtype=torch.int64).reshape(len(request.frames), -1)
                is_last = request.is_final and end == len(request.frames)
                jobs.append((request_id, ChunkJob(frames, request.num_emitted_frames, end, is_last, request.seed)))
        decodable = [(rid, job) for rid, job in jobs if job.end_frame > job.start_frame]
        pcm = self.model.decode_chunks([job for _, job in decodable]) if decodable else []
        pcm_by_id = {rid: samples for (rid, _), samples in zip(decodable, pcm, strict=True)}
        chunks = []
        for request_id, job in jobs:
            samples = pcm_by_id.get(request_id)
            samples = samples.numpy() if samples is not None else np.zeros(0, dtype=np.float32)
            chunks.append(AudioChunk(request_id, samples, job.start_frame, job.end_frame, job.is_final))
            self.requests[request_id].num_emitted_frames = job.end_frame
            if job.is_final:
                del self.requests[request_id]
        return chunks

    def _ready_end(self, request: _CodecRequest) -> int | None:
        """End frame of the request's next ready chunk, or None."""
        start, known = request.num_emitted_frames, len(request.frames)
        if request.is_final:
            return known  # the tail (possibly empty: the closing chunk)
        chunking = self.model.chunking
        size = chunking.first_chunk_frames if start == 0 else chunking.frames_per_chunk
        return start + size if known >= start + size + chunking.lookahead_frames else None
