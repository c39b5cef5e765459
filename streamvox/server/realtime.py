"""WebSocket text-in, audio-out streaming: `WS /v1/audio/speech/stream`.

For families that can speak before their text is complete (Qwen3-TTS), a client can send text as it is
written, an LLM's tokens say, and hear the speech of the words so far. The protocol, JSON text frames in:

1. `{"model", "voice", "response_format", ...}`: the fields of `POST /v1/audio/speech` except `input`
   (optional here: the first piece of text), `speed` and `stream_format`;
2. `{"text": "more words"}`, as many as wanted, then `{"text": "...", "final": true}` or `{"final": true}`.

Out: binary frames with the audio in `response_format` as it is made, then `{"type": "speech.audio.done",
"usage": {...}}`, and the socket closes. A request whose text runs dry pauses (the client just hears
nothing until more text comes). Errors: `{"type": "error", "error": {"message", "code"}}`, then the socket
closes (1008 for a client's mistake, 1011 otherwise); the request is cancelled when the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, ValidationError

from streamvox import protocol
from streamvox.engine.client import EngineUnavailableError
from streamvox.server.audio_format import FORMATS, StreamEncoder, UnsupportedFormat
from streamvox.server.errors import ApiError, from_failure
from streamvox.server.openai import SpeechRequest, check_model
from streamvox.server.streaming import check_speech_input

router = APIRouter()
TEXT_IDLE_TIMEOUT_S = 120.0  # a stream whose text stops coming (before final) is ended, freeing its KV


class StreamStart(SpeechRequest):
    model_config = ConfigDict(extra="forbid", strict=True)

    input: str = ""
    response_format: str = "pcm"


class TextPiece(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    text: str = ""
    final: bool = False


@router.websocket("/v1/audio/speech/stream")
async def speech_stream(websocket: WebSocket) -> None:
    await websocket.accept()
    request_id = f"stream-{secrets.token_hex(8)}"
    client = websocket.app.state.engine
    start_timeout_s = websocket.app.state.config.ws_start_timeout_s
    try:
        start = await asyncio.wait_for(_receive(websocket, StreamStart), start_timeout_s)
        encoder = _check_start(websocket, start)
        info = client.info
        if info is not None and not info.takes_text_stream:
            raise ApiError(400, f"the {info.family} family needs the whole text at once; use POST "
                                "/v1/audio/speech")
        voice = check_speech_input(websocket, start.input if start.input.strip() else "-", start.voice,
                                   start.sampling())
        stream = client.open(request_id, start.input, voice, start.sampling(), text_complete=False)
    except ApiError as error:
        await _close_with_error(websocket, error.status, str(error))
        return
    except EngineUnavailableError as error:
        await _close_with_error(websocket, 503, str(error))
        return
    except TimeoutError:  # a connection that never starts would be held for good
        await _close_with_error(websocket, 408, f"no start message came within {start_timeout_s:g} s; send it "
                                "as soon as the socket opens")
        return
    except WebSocketDisconnect:
        return
    limit = websocket.app.state.config.max_input_chars
    reader = asyncio.create_task(_forward_text(websocket, client, request_id, len(start.input), limit))
    try:
        await _send_audio(websocket, stream, encoder, reader)
    except WebSocketDisconnect:
        pass
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        client.close(request_id, cancel=True)  # a no-op once the request has ended


def _check_start(websocket: WebSocket, start: StreamStart) -> StreamEncoder:
    check_model(websocket, start.model)
    if start.response_format not in FORMATS:
        raise ApiError(400, f"unknown response_format {start.response_format!r}; choose one of: "
                       f"{', '.join(FORMATS)}", "response_format")
    if start.speed != 1.0 or start.stream_format != "audio" or start.instructions:
        raise ApiError(400, "speed, stream_format and instructions are not taken on this route; leave them out")
    info = websocket.app.state.engine.info
    try:
        return StreamEncoder(start.response_format, info.sample_rate if info is not None else 24000)
    except UnsupportedFormat as error:
        raise ApiError(400, str(error), "response_format") from None


async def _receive(websocket: WebSocket, model: type[BaseModel]) -> BaseModel:
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


async def _forward_text(websocket: WebSocket, client, request_id: str, num_chars: int,
                        limit: int) -> ApiError | None:
    """Client text pieces -> the engine until the final one (then None); an ApiError for a bad message, a text
    over the length limit, or silence past TEXT_IDLE_TIMEOUT_S. Only the audio side sends and closes."""
    is_final = False
    while True:
        try:
            if is_final:
                piece = await _receive(websocket, TextPiece)
            else:
                piece = await asyncio.wait_for(_receive(websocket, TextPiece), TEXT_IDLE_TIMEOUT_S)
        except ApiError as error:
            return error
        except TimeoutError:
            return ApiError(408, f"no text came for {TEXT_IDLE_TIMEOUT_S:g} s; send the rest, or final")
        if is_final:
            return ApiError(400, "the text was already complete (final was sent); send nothing more")
        num_chars += len(piece.text)
        if num_chars > limit:
            return ApiError(400, f"the text is over {limit} characters; the limit is {limit}: split it into "
                                 "several requests")
        is_final = piece.final
        client.append_text(request_id, piece.text, piece.final)


async def _send_audio(websocket: WebSocket, stream, encoder: StreamEncoder, reader: asyncio.Task) -> None:
    finished: protocol.Finished | None = None
    client = websocket.app.state.engine
    while True:
        getter = asyncio.ensure_future(client.take(stream))
        done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
        if getter not in done:  # the client's side ended: a bad message, or it went away
            getter.cancel()
            error = reader.result()  # raises WebSocketDisconnect if it went away
            if error is not None:
                await _close_with_error(websocket, error.status, str(error))
                return
            reader = asyncio.get_running_loop().create_future()  # the text is complete: only audio remains
            continue
        event = getter.result()
        if isinstance(event, protocol.Failed):
            await _close_with_error(websocket, from_failure(event).status, event.message)
            return
        if isinstance(event, protocol.Finished):
            finished = event
            continue
        if isinstance(event, protocol.Accepted):
            continue
        if event.pcm and (data := encoder.encode(event.pcm)):
            await websocket.send_bytes(data)
        if event.is_last:
            if data := encoder.finish():
                await websocket.send_bytes(data)
            prompt = finished.num_prompt_tokens if finished else 0
            output = finished.num_output_tokens if finished else 0
            usage = {"input_tokens": prompt, "output_tokens": output, "total_tokens": prompt + output}
            await websocket.send_json({"type": "speech.audio.done", "usage": usage})
            await websocket.close()
            return


async def _close_with_error(websocket: WebSocket, status: int, message: str) -> None:
    with contextlib.suppress(Exception):  # the client may be gone already
        await websocket.send_json({"type": "error", "error": {"message": message, "code": status}})
        await websocket.close(code=1008 if 400 <= status < 500 else 1011)
