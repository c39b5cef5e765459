"""Step messages between the scheduler and the runners, and the audio plan both read. Pure Python, no tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streamvox.config import SamplingParams


@dataclass(frozen=True)
class NewRequest:
    """A request the runners have not seen yet; sent once, in the first step that schedules it."""

    request_id: str
    prompt_token_ids: tuple[int | tuple[int, ...], ...]  # one backbone input per position: a token id or a row
    sampling: SamplingParams  # resolved: seed is never None here
    codec_seed: int  # seeds the codec's noise for this request
    text_ids: tuple[int, ...] = ()  # text paired with the generated steps, one id a step (known so far)
    is_text_complete: bool = True  # no more text will come; past its end the steps get the family's padding
    prompt_embeds: Any = None  # the runner's: input vectors of the first positions (Prepared.prompt_embeds)
    guidance: Any = None  # the runner's: more rows per position (Prepared.guidance)


@dataclass(frozen=True)
class ScheduledRow:
    """Compute KV for positions [start_position, start_position + num_tokens) of one request."""

    request_id: str
    start_position: int
    num_tokens: int
    block_ids: tuple[int, ...]  # the request's whole block table, covering every position computed so far
    is_sampled: bool  # the row reaches the request's last known token, so a new token is sampled


@dataclass(frozen=True)
class StepBatch:
    """One engine step: new requests, rows to run, and requests whose runner state must be dropped."""

    new_requests: tuple[NewRequest, ...]
    rows: tuple[ScheduledRow, ...]
    finished_request_ids: tuple[str, ...]
    text_updates: tuple[tuple[str, tuple[int, ...], bool], ...] = ()  # (request_id, more text ids, is_final)
    codec_request_ids: tuple[str, ...] = ()  # whose next chunk the codec decodes now, most urgent first

    @property
    def has_lm_work(self) -> bool:
        """Rows to run, or runner state to add, drop or feed."""
        return bool(self.rows or self.new_requests or self.finished_request_ids or self.text_updates)

    @property
    def num_tokens(self) -> int:
        return sum(row.num_tokens for row in self.rows)

    @property
    def num_context_tokens(self) -> int:
        """Positions the step's rows attend over."""
        return sum(row.start_position + row.num_tokens for row in self.rows)


@dataclass(frozen=True)
class StepOutput:
    """Tokens sampled in one step, one entry per row with `is_sampled`, in row order."""

    request_ids: tuple[str, ...]
    step_tokens: tuple[int | tuple[int, ...], ...]  # a token id, or a whole frame of codes for depth-decoder models
    is_stop: tuple[bool, ...]  # the sampled token ends the request's speech


@dataclass(frozen=True)
class AudioChunk:
    """PCM for frames [start_frame, end_frame) of one request, decoded."""

    request_id: str
    pcm: Any  # numpy [num_samples] float32 in [-1, 1] (this module stays free of numpy)
    start_frame: int
    end_frame: int
    is_last: bool  # no more audio will follow for this request


@dataclass(frozen=True)
class AudioPlan:
    """The served model's timing and chunking, as plain numbers. Chunk boundaries fall after
    `first_chunk_frames`, then every `frames_per_chunk` frames; the run of frames up to a boundary can be decoded
    once `lookahead_frames` more frames exist (at the end of speech, whatever is left can). A detokenizer that reruns
    over the whole prefix for each chunk (flow matching over prompt + every token so far, as CosyVoice2 streams) has
    `codec_prefix_frames` set: each chunk then reruns over L = prefix + chunk end + lookahead frames, so what a
    stream costs the codec grows as it plays (`codec_rereads`, `codec_load`)."""

    lm_steps_per_frame: int
    frame_s: float  # seconds of audio in one frame
    first_chunk_frames: int
    frames_per_chunk: int
    lookahead_frames: int
    codec_cost_per_frame: float = 1.0  # a frame's share of the codec batch budget (SpeechModel.codec_cost_per_frame)
    codec_prefix_frames: int | None = None  # prompt frames a chunk's rerun starts from; None: no rerun

    def codec_rereads(self, start_frame: int, end_frame: int) -> tuple[float, float]:
        """(sum of L, sum of L^2) over the chunks of the plan that [start_frame, end_frame) covers, L being the
        frames each reruns over; (0, 0) for a detokenizer without reruns."""
        if self.codec_prefix_frames is None:
            return 0.0, 0.0
        total, squares, start = 0.0, 0.0, start_frame
        while start < end_frame:
            start = min(end_frame, self.next_boundary(start))
            rerun = self.codec_prefix_frames + start + self.lookahead_frames
            total, squares = total + rerun, squares + rerun * rerun
        return total, squares

    def codec_load(self, num_frames: int) -> tuple[float, float]:
        """`codec_rereads` per frame of audio for a stream that has made `num_frames` frames (its next chunk's
        rerun, shared by the chunk's frames)."""
        if self.codec_prefix_frames is None:
            return 0.0, 0.0
        rerun = self.codec_prefix_frames + num_frames + self.frames_per_chunk + self.lookahead_frames
        return rerun / self.frames_per_chunk, rerun * rerun / self.frames_per_chunk

    def frames_per_call(self, budget: int) -> int:
        """Frames one codec call takes under a budget of `budget` (max_codec_frames): at least one."""
        return max(1, int(budget / self.codec_cost_per_frame))

    @property
    def realtime_step_s(self) -> float:
        """The LM step time at which one stream generates exactly as fast as it plays."""
        return self.frame_s / self.lm_steps_per_frame

    def boundary_at_most(self, frame: int) -> int:
        """The last chunk boundary at or before `frame`, or 0."""
        first, step = self.first_chunk_frames, self.frames_per_chunk
        return 0 if frame < first else first + (frame - first) // step * step

    def next_boundary(self, frame: int) -> int:
        """The first chunk boundary after `frame`."""
        return self.first_chunk_frames if frame < self.first_chunk_frames else self.boundary_at_most(frame) + \
            self.frames_per_chunk

    def decodable_end(self, num_frames: int, is_complete: bool) -> int:
        """The last boundary whose frames can be decoded when `num_frames` exist (all of them once complete)."""
        return num_frames if is_complete else self.boundary_at_most(num_frames - self.lookahead_frames)

    def next_chunk(self, num_output_tokens: int) -> tuple[int, int]:
        """(frames already covered by decodable chunks, LM steps until the next chunk is decodable)."""
        covered = self.decodable_end(num_output_tokens // self.lm_steps_per_frame, is_complete=False)
        end = self.next_boundary(covered)
        steps = (end + self.lookahead_frames) * self.lm_steps_per_frame - num_output_tokens
        return covered, max(1, steps)
