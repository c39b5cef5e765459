"""One speech request from the server's side: validate, send to the engine, then relay its audio in order.

Nothing is sent to the client until the engine has produced the first chunk or refused the request, so a refusal
is still a proper HTTP status. After that, a failure can only end the stream (the route decides how to say so).
A client that goes away, before or after the first chunk, cancels the request in the engine.
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
from streamvox.server.errors import ApiError

DISCONNECT_POLL_S = 0.2


class StreamFailedError(Exception):
    """The request failed after its audio had started."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def check_speech_input(request: Request, text: str, voice: str | None,
                       sampling: protocol.SamplingOverrides) -> str | None:
    """The voice as the model names it (matched without regard to case); ApiError (400) naming what to change
    for text, voice or sampling values the model cannot take."""
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
    if info is not None and voice is not None and voice not in info.voices:
        matches = [name for name in info.voices if name.casefold() == voice.casefold()]
        if len(matches) != 1:
            raise ApiError(400, f"unknown voice {voice!r}; choose one of: {', '.join(info.voices)} "
                           "(GET /v1/audio/voices lists them)", "voice")
        voice = matches[0]
    try:
        SamplingParams(**{k: v for k, v in msgspec.structs.asdict(sampling).items() if v is not None}).validate()
    except (TypeError, ValueError) as error:
        raise ApiError(400, str(error)) from None
    return voice


class SpeechStream:
    """A request whose first event has arrived; iterate `pcm()` for its audio."""

    def __init__(self, client: EngineClient, http_request: Request, stream: RequestStream) -> None:
        self.client = client
        self.http_request = http_request
        self.stream = stream
        self.finished: protocol.Finished | None = None
        self.num_samples = 0
        self._first: protocol.Audio | protocol.Finished | None = None
        self._is_done = False

    @classmethod
    async def open(cls, http_request: Request, text: str, voice: str | None, sampling: protocol.SamplingOverrides,
                   reference: tuple[bytes, str] | None = None) -> SpeechStream:
        """Send the request and wait for its first event. ApiError if it is refused or fails before audio."""
        voice = check_speech_input(http_request, text, voice, sampling)
        client: EngineClient = http_request.app.state.engine
        request_id = f"speech-{secrets.token_hex(8)}"
        speech = cls(client, http_request, client.open(request_id, text, voice, sampling, reference=reference))
        try:
            while True:  # until audio or a failure: a Finished can come first, and commits to nothing
                try:
                    first = await asyncio.wait_for(speech.stream.queue.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    if await http_request.is_disconnected():
                        raise ApiError(499, "client closed the request") from None
                    continue
                if not isinstance(first, protocol.Finished):
                    break
                speech.finished = first
        except BaseException:
            client.close(request_id, cancel=True)
            raise
        if isinstance(first, protocol.Failed):
            raise ApiError(first.status, first.message, retry_after_s=5 if first.status in (429, 503) else None)
        speech._first = first
        return speech

    async def pcm(self) -> AsyncIterator[bytes]:
        """The request's int16 PCM chunk by chunk; StreamFailedError if it fails midway."""
        try:
            event = self._first
            while True:
                if isinstance(event, protocol.Failed):
                    raise StreamFailedError(event.message, event.status)
                if isinstance(event, protocol.Finished):
                    self.finished = event
                elif isinstance(event, protocol.Audio):
                    self.num_samples += len(event.pcm) // 2
                    if event.pcm:
                        yield event.pcm
                    if event.is_last:
                        self._is_done = True
                        return
                event = await self.stream.queue.get()
        finally:
            self.client.close(self.stream.request_id, cancel=not self._is_done)

    @property
    def usage(self) -> dict:
        finished = self.finished
        prompt = finished.num_prompt_tokens if finished else 0
        output = finished.num_output_tokens if finished else 0
        return {"input_tokens": prompt, "output_tokens": output, "total_tokens": prompt + output}
