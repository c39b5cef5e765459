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
        ready = [(rid, r, end) for rid, r in self.requests.items() if (end := self._ready_end(r)) is not None]
        jobs = [
            ChunkJob(torch.tensor(r.frames, dtype=torch.int64), r.num_emitted_frames, end, r.is_final, r.seed)
            for _, r, end in ready if end > r.num_emitted_frames
        ]
        decoded = iter(self.model.decode_chunks(jobs) if jobs else [])
        chunks = []
        for request_id, request, end in ready:
            start = request.num_emitted_frames
            pcm = next(decoded).numpy() if end > start else np.zeros(0, dtype=np.float32)  # empty: closing chunk
            chunks.append(AudioChunk(request_id, pcm, start, end, request.is_final))
            request.num_emitted_frames = end
            if request.is_final:
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
