"""The sessions of `WS /v1/audio/speech/stream` (protocol in realtime.py): text in as it is written, audio out in
order, one engine request per utterance.

A session has two halves. The reader takes the client's messages (text, flush, cancel, final) and turns them into
engine requests; the writer sends the requests' audio, oldest request first, and is the only one that sends. A
`PieceSession` streams text into one request (families that take text piece by piece); a `SegmentSession` cuts it
into sentences, each a request of its own (the other families).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import msgspec
from fastapi import WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, ValidationError

from streamvox import protocol
from streamvox.engine.client import RequestStream
from streamvox.server.audio_format import StreamEncoder
from streamvox.server.errors import ApiError, from_failure
from streamvox.server.voxserve import MAX_REFERENCE_S

TEXT_IDLE_TIMEOUT_S = 120.0  # a session whose text stops coming (before final) is ended, freeing its KV
SENTENCE_END = re.compile(r"[.!?…。！？]+[\"'”’)\]]*(\s|$)|\n")
CLAUSE_END = re.compile(r"[,;:，；：]\s")
LONG_SEGMENT_CHARS = 120  # a segment this long is cut at its last clause end (or space), so its audio starts sooner
# full stops that end a short form rather than a sentence: a title or a single letter before a name, or a dotted
# short form ("e.g.", "U.S.", "etc.") unless a capitalised word follows
TITLES = frozenset("mr mrs ms dr prof st mt sr jr vs rev capt lt sgt".split())
DOTTED = re.compile(r"(?:[^\W\d_]\.){2,}|(?:etc|approx|incl|esp|cf)\.", re.IGNORECASE)


class TextPiece(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text", "flush", "cancel"] = "text"
    text: str = ""
    final: bool = False


def cut_segments(buffer: str, is_settled: bool = False) -> tuple[list[str], str]:
    """The complete segments at the start of `buffer` (sentences; a long run without a sentence end is cut at its
    last clause end, or last space), and the rest, still open. A sentence end counts once whitespace follows it, or
    at the very end of the buffer when `is_settled` (else the next piece may go on with it: "3." then "5 apples"),
    and not after a short form ("Dr. Smith": a segment cut there would be spoken as a sentence of its own)."""
    segments = []
    while True:
        end = next((m.end() for m in SENTENCE_END.finditer(buffer) if (buffer[m.end() - 1].isspace() or is_settled)
                    and not _ends_short_form(buffer, m)), None)
        if end is None and len(buffer) >= LONG_SEGMENT_CHARS:
            cuts = [m.end() for m in CLAUSE_END.finditer(buffer)] or [m.end() for m in re.finditer(r"\s", buffer)]
            end = cuts[-1] if cuts else None
        if end is None:
            return segments, buffer
        piece, buffer = buffer[:end].strip(), buffer[end:]
        if piece:
            segments.append(piece)


def _ends_short_form(buffer: str, match: re.Match) -> bool:
    """Whether the full stop `match` found in `buffer` ends a short form, not a sentence ("Dr. Smith", "J. K.
    Rowling", "e.g. this"); a dotted short form with nothing after it yet waits for the next word."""
    if match.group().rstrip(" \t") != ".":  # a line break after it still cuts
        return False
    word = buffer[: match.start() + 1].rsplit(None, 1)[-1].lstrip("(\"'[“‘")
    if word[:-1].lower() in TITLES or (len(word) == 2 and word[0].isalpha()):
        return True
    following = buffer[match.end() :].lstrip()
    return DOTTED.fullmatch(word) is not None and not following[:1].isupper()


@dataclass(eq=False)
class _Utterance:
    """One engine request whose audio goes out in its turn."""

    stream: RequestStream
    text: str
    timing: object  # metrics.StreamMetrics
    pcm: list[bytes] = field(default_factory=list)  # its audio, kept when it becomes the next one's context


class Session:
    def __init__(self, websocket: WebSocket, start, voice: str | None, reference: tuple[bytes, str] | None,
                 encoder: StreamEncoder, options: dict[str, float] | None = None) -> None:
        self.websocket = websocket
        self.start = start
        self.options = options  # the family's own, checked; with `start.instructions`, for every request
        self.voice = voice
        self.reference = reference
        self.encoder = encoder
        self.client = websocket.app.state.engine
        self.limit = websocket.app.state.config.max_input_chars
        self.queue: deque[_Utterance] = deque()  # audio goes out in this order
        self.wake = asyncio.Event()  # the reader has news for the writer
        self.num_chars = 0
        self.num_requests = 0
        self.is_final = self.is_gone = self.is_cancelled = False
        self.error: ApiError | None = None
        self.usage = [0, 0]
        self.finish_reason = "stop"

    # -- the reader's side -------------------------------------------------------------------------------------

    def begin(self) -> None:
        """The start message's text."""

    def on_text(self, text: str, is_final: bool) -> None:
        raise NotImplementedError

    def on_flush(self) -> None:
        """Speak what has arrived."""

    def on_cancel(self) -> None:
        """Barge-in: every request of the session is dropped, in the engine within a step."""
        for utterance in self.queue:
            self.client.close(utterance.stream.request_id, cancel=True)
        self.queue.clear()
        self.num_chars = 0
        self.is_cancelled = True

    def on_done(self, utterance: _Utterance) -> None:
        """An utterance's audio is all out."""

    def is_drained(self) -> bool:
        """Whether no more audio can come once the queue is empty (after final)."""
        return True

    def _open(self, text: str, is_complete: bool = True, reference: tuple[bytes, str] | None = None) -> _Utterance:
        sampling = self.start.sampling()
        if sampling.seed is not None:  # each utterance its own seed, reproducibly
            sampling = msgspec.structs.replace(sampling, seed=sampling.seed + self.num_requests)
        request_id = f"stream-{secrets.token_hex(8)}"
        stream = self.client.open(request_id, text, self.voice, sampling, text_complete=is_complete,
                                  reference=reference, options=self.options,
                                  instructions=self.start.instructions or None)
        self.num_requests += 1
        utterance = _Utterance(stream, text, self.websocket.app.state.metrics.stream(self.websocket.scope))
        self.queue.append(utterance)
        return utterance

    async def _read(self) -> None:
        try:
            while True:
                timeout_s = None if self.is_final else TEXT_IDLE_TIMEOUT_S
                try:
                    piece = await asyncio.wait_for(receive(self.websocket, TextPiece), timeout_s)
                except TimeoutError:
                    raise ApiError(408, f"no text came for {TEXT_IDLE_TIMEOUT_S:g} s; send the rest, or final") \
                        from None
                self._take(piece)
                self.wake.set()
        except ApiError as error:
            self.error = error
        except WebSocketDisconnect:
            self.is_gone = True
        self.wake.set()

    def _take(self, piece: TextPiece) -> None:
        if piece.type == "cancel":
            self.on_cancel()
            return
        if self.is_final:
            raise ApiError(400, "the text was already complete (final was sent); send nothing more, or cancel")
        if piece.type == "flush":
            self.on_flush()
            return
        self.num_chars += len(piece.text)
        if self.num_chars > self.limit:
            raise ApiError(400, f"the text is over {self.limit} characters; the limit is {self.limit}: split it "
                                "into several sessions, or cancel between utterances")
        self.is_final = piece.final
        self.on_text(piece.text, piece.final)

    # -- the writer's side -------------------------------------------------------------------------------------

    async def run(self) -> None:
        reader = asyncio.create_task(self._read())
        try:
            await self._write()
        except WebSocketDisconnect:
            self.websocket.state.status = 499
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            for utterance in self.queue:  # a no-op for requests that have ended
                self.client.close(utterance.stream.request_id, cancel=True)

    async def _write(self) -> None:
        while True:
            self.wake.clear()
            if self.is_gone:
                raise WebSocketDisconnect(1000)
            if self.error is not None:
                await close_with_error(self.websocket, self.error.status, str(self.error))
                return
            if self.is_cancelled:
                self.is_cancelled = False
                await self.websocket.send_json({"type": "speech.audio.cancelled"})
                continue
            if not self.queue:
                if self.is_final and self.is_drained():
                    await self._finish()
                    return
                await self.wake.wait()
                continue
            utterance = self.queue[0]
            event = await self._next(utterance.stream)
            if event is not None and utterance in self.queue:  # not dropped by a cancel meanwhile
                if isinstance(event, protocol.Failed):
                    await close_with_error(self.websocket, from_failure(event).status, event.message)
                    return
                await self._relay(utterance, event)

    async def _next(self, stream: RequestStream):
        """The stream's next event, or None if the reader has news first."""
        getter = asyncio.ensure_future(self.client.take(stream))
        waker = asyncio.ensure_future(self.wake.wait())
        await asyncio.wait({getter, waker}, return_when=asyncio.FIRST_COMPLETED)
        waker.cancel()
        if getter.done():
            return getter.result()
        getter.cancel()
        return None

    async def _relay(self, utterance: _Utterance, event) -> None:
        if isinstance(event, protocol.Finished):
            self.usage[0] += event.num_prompt_tokens
            self.usage[1] += event.num_output_tokens
            self.finish_reason = event.reason
        if not isinstance(event, protocol.Audio):
            return
        if event.pcm:
            utterance.timing.sent(len(event.pcm) // 2, self.client.info.sample_rate)
            if self.client.info.keeps_context:  # only a context-keeping family needs it again
                utterance.pcm.append(event.pcm)
            if data := self.encoder.encode(event.pcm):
                await self.websocket.send_bytes(data)
        if event.is_last:
            self.queue.popleft()
            self.client.close(utterance.stream.request_id, cancel=False)
            self.on_done(utterance)

    async def _finish(self) -> None:
        if data := self.encoder.finish():
            await self.websocket.send_bytes(data)
        prompt, output = self.usage
        usage = {"input_tokens": prompt, "output_tokens": output, "total_tokens": prompt + output}
        await self.websocket.send_json({"type": "speech.audio.done", "usage": usage,
                                        "finish_reason": self.finish_reason})
        await self.websocket.close()


class PieceSession(Session):
    """One request takes the text as it comes (Qwen3-TTS); after a cancel, the next text opens another."""

    current: _Utterance | None = None

    def begin(self) -> None:
        self.num_chars = len(self.start.input)
        self.current = self._open(self.start.input, is_complete=False, reference=self.reference)

    def on_text(self, text: str, is_final: bool) -> None:
        if self.current is not None:
            self.client.append_text(self.current.stream.request_id, text, is_final)
        elif text.strip():
            self.current = self._open(text, is_complete=is_final, reference=self.reference)

    def on_cancel(self) -> None:
        super().on_cancel()
        self.current = None


class SegmentSession(Session):
    """Sentences, each a request, started as soon as it is cut (a context-keeping family: once the previous one's
    audio is all made, with that audio and text as its context)."""

    def begin(self) -> None:
        self.buffer = ""
        self.pending: deque[str] = deque()
        self.keeps_context = self.client.info.keeps_context
        self.context = self.reference  # the first segment's: the client's voice clip, if any
        if self.start.input:
            self.num_chars = len(self.start.input)
            self.on_text(self.start.input, False)

    def on_text(self, text: str, is_final: bool) -> None:
        segments, self.buffer = cut_segments(self.buffer + text, is_settled=is_final)
        if is_final and self.buffer.strip():
            segments.append(self.buffer.strip())
            self.buffer = ""
        self.pending.extend(segments)
        self._submit()

    def on_flush(self) -> None:
        segments, rest = cut_segments(self.buffer, is_settled=True)
        self.pending.extend(segments + ([rest.strip()] if rest.strip() else []))
        self.buffer = ""
        self._submit()

    def on_cancel(self) -> None:
        super().on_cancel()
        self.buffer = ""
        self.pending.clear()

    def on_done(self, utterance: _Utterance) -> None:
        if self.keeps_context:
            pcm = b"".join(utterance.pcm)
            if len(pcm) / 2 <= MAX_REFERENCE_S * self.client.info.sample_rate:
                self.context = (pcm, utterance.text)
            self._submit()

    def _submit(self) -> None:
        while self.pending and not (self.keeps_context and self.queue):
            self._open(self.pending.popleft(), reference=self.context if self.keeps_context else self.reference)

    def is_drained(self) -> bool:
        return not self.pending and not self.buffer.strip()


async def receive(websocket: WebSocket, model: type[BaseModel]) -> BaseModel:
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    text = message.get("text")
    if text is None:
        raise ApiError(400, "send JSON text frames, not binary ones")
    try:
        return model.model_validate_json(text)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}" for e in error.errors())
        raise ApiError(400, f"invalid message: {problems}") from None


async def close_with_error(websocket: WebSocket, status: int, message: str) -> None:
    websocket.state.status = status
    with contextlib.suppress(Exception):  # the client may be gone already
        await websocket.send_json({"type": "error", "error": {"message": message, "code": status}})
        await websocket.close(code=1008 if 400 <= status < 500 else 1011)
