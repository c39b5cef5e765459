"""Requests whose text arrives in pieces: held until their first text id is settled, then queued, then fed.

A request is queued once its first text id is settled (that id makes its prompt); after that each piece's
settled ids ride along with its generated steps, and it pauses, holding its place, while the next one has not
come. Used by EngineCore under its lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from streamvox.config import SamplingParams
from streamvox.engine.requests import expected_tokens
from streamvox.models.base import Prepared, TextStream

if TYPE_CHECKING:
    from streamvox.engine.core import EngineCore


@dataclass
class _TextStream:
    stream: TextStream
    voice: str | None
    sampling: SamplingParams
    instructions: str | None = None
    num_chars: int = 0
    has_words: bool = False  # some text that is not whitespace has come
    held: list[int] = field(default_factory=list)  # settled text ids before the request is queued
    is_added: bool = False  # its prompt is known and the request queued


class TextStreams:
    def __init__(self, engine: EngineCore) -> None:
        self.engine = engine
        self._streams: dict[str, _TextStream] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._streams

    def __len__(self) -> int:
        return len(self._streams)

    def open(self, request_id: str, stream: TextStream, voice: str | None, sampling: SamplingParams,
             instructions: str | None = None) -> None:
        self._streams[request_id] = _TextStream(stream, voice, sampling, instructions)

    def discard(self, request_id: str) -> bool:
        """Take no more text for the request; False if it took none."""
        return self._streams.pop(request_id, None) is not None

    def append(self, request_id: str, text: str, is_final: bool) -> None:
        """See EngineCore.append_text. On any error the request is dropped (and cancelled if it was queued)."""
        state = self._streams.get(request_id)
        if state is None:
            raise KeyError(f"request {request_id!r} takes no more text (unknown, ended, or its text complete)")
        try:
            self._take(request_id, state, text, is_final)
        except Exception:
            self._streams.pop(request_id, None)
            if state.is_added:
                self.engine.cancel_core(request_id)
            raise

    def _take(self, request_id: str, state: _TextStream, text: str, is_final: bool) -> None:
        text_ids = state.stream.feed(text, is_final)
        state.num_chars += len(text)
        state.has_words |= bool(text.strip())
        if is_final:
            del self._streams[request_id]
        engine = self.engine
        if state.is_added:
            engine.scheduler.add_text(request_id, text_ids, is_final)
            return
        state.held += text_ids
        if state.has_words and (len(state.held) >= 2 or (state.held and not is_final)):
            style = {"instructions": state.instructions} if state.instructions else {}  # for models that take it
            prompt = engine.model.prompt_for(state.held[0], state.voice, **style)  # the first text id makes it
            expected = expected_tokens(engine.model, "x" * max(state.num_chars, 40))
            engine.add_request(request_id, Prepared(prompt, state.held[1:]), state.sampling, expected, is_final)
            state.is_added = True
        elif is_final:
            raise ValueError("text is empty; give at least one word to speak")
