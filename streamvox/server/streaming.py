"""One speech request from the server's side: validate, send to the engine, then relay its audio in order.

Nothing is sent to the client until the engine has produced the first chunk (or, for routes that start with a
header, accepted the request) or refused it, so a refusal is still a proper HTTP status. After that, a failure can
only end the stream (the route decides how to say so). A client that goes away, before or after the first chunk,
cancels the request in the engine. Audio is taken from the engine's queue one piece at a time, each once the
previous one was written, which is what paces a request to its reader (see EngineClient).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import msgspec
from fastapi import Request

from streamvox import protocol
from streamvox.config import SamplingParams
from streamvox.engine.client import EngineClient, RequestStream
from streamvox.server import voices
from streamvox.server.errors import ApiError, from_failure

DISCONNECT_POLL_S = 0.2


class StreamFailedError(Exception):
    """The request failed after its audio had started."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def check_speech_input(request: Request, text: str, voice: str | None,
                       sampling: protocol.SamplingOverrides) -> str | None:
    """The voice as the model names it (matched without regard to case, or through the alias table: None for the
    model's default); ApiError (400) naming what to change for text, voice or sampling values the model cannot
    take."""
    config = request.app.state.config
    if not text.strip():
        raise ApiError(400, "input is empty; give the text to speak", "input")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "input is not valid Unicode text (it holds a lone surrogate); fix its encoding",
                       "input") from None
    if len(text) > config.max_input_chars:
        raise ApiError(400, f"input is {len(text)} characters; the limit is {config.max_input_chars}: split the "
                       "text into several requests", "input")
    info = request.app.state.engine.info
    if info is not None and voice is not None:
        found, model_voice = voices.resolve(voice, info.voices, request.app.state.voice_aliases)
        if not found:
            raise ApiError(400, f"unknown voice {voice!r}; choose one of: {', '.join(info.voices) or '(none)'}, "
                           "or one of OpenAI's names (GET /v1/audio/voices lists them all)", "voice")
        voice = model_voice
    try:
        SamplingParams(**{k: v for k, v in msgspec.structs.asdict(sampling).items() if v is not None}).validate()
    except (TypeError, ValueError) as error:
        raise ApiError(400, str(error)) from None
    return voice


def stored_voice(request: Request, voice: str | None,
                 reference: tuple[bytes, str] | None) -> tuple[str | None, tuple[bytes, str] | None]:
    """(voice, reference) to send: a stored voice's name becomes its clip, in the model's default voice."""
    stored = request.app.state.voice_store.get(voice) if voice else None
    if stored is None:
        return voice, reference
    if reference is not None:
        raise ApiError(400, f"voice {voice!r} is a stored clip; send it or reference audio, not both", "voice")
    return None, stored


def check_stream_limit(request: Request) -> None:
    """ApiError 429 when the server already holds `max_concurrent_streams` streams open."""
    limit = request.app.state.config.max_concurrent_streams
    if limit and request.app.state.engine.num_open_streams >= limit:
        raise ApiError(429, f"the server holds at most {limit} streams at once; retry shortly", retry_after_s=1)


def check_options(request: Request, fields: dict) -> dict[str, float] | None:
    """The family's own request options among `fields` (what a request sent beyond the standard fields), as
    floats; ApiError 422 for a field the served family does not take or a value that is not a number, 400 for one
    out of range."""
    if not fields:
        return None
    info = request.app.state.engine.info
    declared = info.options if info is not None else {}
    options = {}
    for name, value in fields.items():
        if name not in declared:
            takes = f"; this {info.family} model also takes: {', '.join(declared)}" if info and declared else ""
            raise ApiError(422, f"unknown field {name!r}{takes}", name)
        _, low, high = declared[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ApiError(422, f"{name} must be a number from {low:g} to {high:g}", name)
        if not low <= value <= high:
            raise ApiError(400, f"{name} must be a number from {low:g} to {high:g}", name)
        options[name] = float(value)
    return options


class SpeechStream:
    """A request whose first event has arrived; iterate `pcm()` for its audio."""

    def __init__(self, client: EngineClient, http_request: Request, stream: RequestStream) -> None:
        self.client = client
        self.http_request = http_request
        self.stream = stream
        self.finished: protocol.Finished | None = None
        self.num_samples = 0
        self._first: protocol.Accepted | protocol.Audio | None = None
        self._is_done = False
        self.timing = http_request.app.state.metrics.stream(http_request.scope)

    @classmethod
    async def open(cls, http_request: Request, text: str, voice: str | None, sampling: protocol.SamplingOverrides,
                   reference: tuple[bytes, str] | None = None, until_audio: bool = True,
                   options: dict[str, float] | None = None, instructions: str | None = None) -> SpeechStream:
        """Send the request and wait for its first audio (`until_audio`), or only until the engine accepts it.
        ApiError if it is refused, or fails before that."""
        voice, reference = stored_voice(http_request, voice, reference)
        voice = check_speech_input(http_request, text, voice, sampling)
        check_stream_limit(http_request)
        client: EngineClient = http_request.app.state.engine
        request_id = f"speech-{secrets.token_hex(8)}"
        speech = cls(client, http_request, client.open(request_id, text, voice, sampling, reference=reference,
                                                       options=options, instructions=instructions))
        try:
            while True:  # until audio (or acceptance) or a failure; a Finished can come first, and commits to nothing
                try:
                    first = await asyncio.wait_for(client.take(speech.stream), DISCONNECT_POLL_S)
                except TimeoutError:
                    if await http_request.is_disconnected():
                        raise ApiError(499, "client closed the request") from None
                    continue
                if isinstance(first, protocol.Finished):
                    speech.finished = first
                elif not isinstance(first, protocol.Accepted) or not until_audio:
                    break
        except BaseException:
            client.close(request_id, cancel=True)
            raise
        if isinstance(first, protocol.Failed):
            raise from_failure(first)
        speech._first = first
        return speech

    async def pcm(self) -> AsyncIterator[bytes]:
        """The request's int16 PCM chunk by chunk; StreamFailedError if it fails midway."""
        try:
            event = self._first
            while True:
                if isinstance(event, protocol.Failed):
                    status = self.http_request.state.status = from_failure(event).status
                    raise StreamFailedError(event.message, status)
                if isinstance(event, protocol.Finished):
                    self.finished = event
                elif isinstance(event, protocol.Audio):
                    self.num_samples += len(event.pcm) // 2
                    if event.pcm:
                        self.timing.sent(len(event.pcm) // 2, self.client.info.sample_rate)
                        yield event.pcm
                    if event.is_last:
                        self._is_done = True
                        return
                event = await self.client.take(self.stream)
        finally:
            if not self._is_done and not hasattr(self.http_request.state, "status"):
                self.http_request.state.status = 499  # the client went away
            self.client.close(self.stream.request_id, cancel=not self._is_done)

    @property
    def finish_reason(self) -> str:
        """Why the audio ended: stop (the model ended its speech), length (max_tokens), capacity (the KV cache
        holds no more of it: the audio is cut short)."""
        return self.finished.reason if self.finished is not None else "stop"

    @property
    def usage(self) -> dict:
        finished = self.finished
        prompt = finished.num_prompt_tokens if finished else 0
        output = finished.num_output_tokens if finished else 0
        return {"input_tokens": prompt, "output_tokens": output, "total_tokens": prompt + output}
