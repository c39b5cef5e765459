"""Where each stream's client is in its playback, and so when its next chunk is due (DESIGN.md §5, §8).

A client starts playing the first chunk on arrival and runs dry at
`deadline = first_chunk_s + client_prebuffer_s + audio_sent_s`; before any audio the deadline is the TTFA
target after arrival. Pure Python: the engine reports chunks as they go out; the scheduler reads deadlines.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AudioPlan:
    """The served model's timing and chunking, as plain numbers."""

    lm_steps_per_frame: int
    frame_s: float  # seconds of audio in one frame
    first_chunk_frames: int
    frames_per_chunk: int
    lookahead_frames: int  # frames past a chunk that must exist before it decodes

    @property
    def realtime_step_s(self) -> float:
        """The LM step time at which one stream generates exactly as fast as it plays."""
        return self.frame_s / self.lm_steps_per_frame

    def next_chunk(self, num_output_tokens: int) -> tuple[int, int]:
        """(frames already covered by decodable chunks, LM steps until the next chunk is decodable)."""
        usable = num_output_tokens // self.lm_steps_per_frame - self.lookahead_frames
        if usable < self.first_chunk_frames:
            covered, end = 0, self.first_chunk_frames
        else:
            covered = usable - (usable - self.first_chunk_frames) % self.frames_per_chunk
            end = covered + self.frames_per_chunk
        steps = (end + self.lookahead_frames) * self.lm_steps_per_frame - num_output_tokens
        return covered, max(1, steps)


@dataclass
class Playback:
    arrival_s: float
    first_chunk_s: float | None = None
    audio_sent_s: float = 0.0


class PlaybackTracker:
    def __init__(self, plan: AudioPlan, ttfa_target_s: float, client_prebuffer_s: float) -> None:
        self.plan = plan
        self.ttfa_target_s = ttfa_target_s
        self.client_prebuffer_s = client_prebuffer_s
        self.streams: dict[str, Playback] = {}

    def add(self, request_id: str, arrival_s: float) -> None:
        self.streams[request_id] = Playback(arrival_s)

    def drop(self, request_id: str) -> None:
        self.streams.pop(request_id, None)

    def on_chunk(self, request_id: str, num_samples_s: float, now: float) -> None:
        """A chunk of `num_samples_s` seconds of audio went out at `now`."""
        stream = self.streams.get(request_id)
        if stream is None or num_samples_s <= 0:
            return
        if stream.first_chunk_s is None:
            stream.first_chunk_s = now
        stream.audio_sent_s += num_samples_s

    def deadline_s(self, request_id: str, covered_frames: int | None = None) -> float:
        """When the client runs dry; with `covered_frames`, after also playing that many frames (counted from
        the start of the stream, including those sent)."""
        stream = self.streams.get(request_id)
        if stream is None:
            return float("inf")
        if stream.first_chunk_s is None and not covered_frames:
            return stream.arrival_s + self.ttfa_target_s
        start = stream.first_chunk_s if stream.first_chunk_s is not None else stream.arrival_s + self.ttfa_target_s
        audio_s = max(stream.audio_sent_s, (covered_frames or 0) * self.plan.frame_s)
        return start + self.client_prebuffer_s + audio_s
