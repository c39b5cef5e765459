"""Where each stream's client is in its playback, and so when its next chunk is due (DESIGN.md §5, §8).

A client starts playing the first chunk on arrival and runs dry at
`deadline = first_chunk_s + client_prebuffer_s + audio_sent_s`; before any audio the deadline is the TTFA
target after arrival. Pure Python: the engine reports chunks as they go out; the scheduler reads deadlines.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamvox.batch import AudioPlan


@dataclass
class Playback:
    arrival_s: float
    first_chunk_s: float | None = None
    audio_sent_s: float = 0.0
    frames_made: int | None = None  # once its speech is all made (the LM is done with it): its frames
    plan: AudioPlan | None = None  # then: its chunk plan (what its codec chunks still cost)


class PlaybackTracker:
    def __init__(self, plan: AudioPlan, ttfa_target_s: float, client_prebuffer_s: float) -> None:
        self.plan = plan
        self.ttfa_target_s = ttfa_target_s
        self.client_prebuffer_s = client_prebuffer_s
        self.streams: dict[str, Playback] = {}

    def add(self, request_id: str, arrival_s: float) -> None:
        self.streams[request_id] = Playback(arrival_s)

    def on_speech_made(self, request_id: str, num_frames: int, plan: AudioPlan) -> None:
        """The LM made the request's last frame; the codec still has whatever was not sent."""
        stream = self.streams.get(request_id)
        if stream is not None:
            stream.frames_made, stream.plan = num_frames, plan

    def frames_sent(self, request_id: str) -> int:
        """Frames of the request's audio that went out."""
        stream = self.streams.get(request_id)
        return 0 if stream is None else round(stream.audio_sent_s / self.plan.frame_s)

    def drop(self, request_id: str) -> None:
        self.streams.pop(request_id, None)

    def on_chunk(self, request_id: str, duration_s: float, now: float) -> None:
        """A chunk of `duration_s` seconds of audio went out at `now`."""
        stream = self.streams.get(request_id)
        if stream is None or duration_s <= 0:
            return
        if stream.first_chunk_s is None:
            stream.first_chunk_s = now
        stream.audio_sent_s += duration_s

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
