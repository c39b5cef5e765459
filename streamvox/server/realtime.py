"""WebSocket text-in, audio-out streaming: `WS /v1/audio/speech/stream`, for every family.

A client sends text as it is written, an LLM's tokens say, and hears the speech of it as it comes. Families that
can speak before their text is complete (Qwen3-TTS) take it piece by piece into one request. For the others
(Orpheus, CSM, ...) the text is cut into segments at sentence ends (or at a clause end once a segment is long) as it
arrives; each segment is a request of its own, started as soon as it is cut, so it generates while the previous
one plays, and its audio follows the previous one's without a gap. A family that keeps context (CSM) gets the
previous segment's audio and text as the context of the next, so the voice carries on from piece to piece; such a
segment starts once the previous one's audio is all made (well before it has played). The protocol, JSON text
frames in:

1. `{"model", "voice", "response_format", ...}`: the fields of `POST /v1/audio/speech` except `input`
   (optional here: the first piece of text), `speed` and `stream_format`; `instructions` and the family's own
   options hold for every request of the session;
2. `{"text": "more words"}`, as many as wanted, then `{"text": "...", "final": true}` or `{"final": true}`;
   `{"type": "flush"}` speaks what has arrived without waiting for a sentence end; `{"type": "cancel"}` (barge-in)
   stops the audio at once (the engine drops the requests within a step), answers
   `{"type": "speech.audio.cancelled"}` and keeps the session for new text.

Out: binary frames with the audio in `response_format` as it is made, then `{"type": "speech.audio.done", "usage",
"finish_reason"}`, and the socket closes. Text that runs dry just pauses the audio. Errors: `{"type": "error",
"error": {"message", "code"}}`, then the socket closes (1008 for a client's mistake, 1011 otherwise); leaving
cancels everything.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ConfigDict

from streamvox.engine.client import EngineUnavailableError
from streamvox.server.audio_format import StreamEncoder
from streamvox.server.auth import is_origin_allowed
from streamvox.server.errors import ApiError
from streamvox.server.openai import SpeechRequest, check_instructions, check_model, response_encoder
from streamvox.server.streaming import check_options, check_speech_input, check_stream_limit, stored_voice
from streamvox.server.ws_sessions import PieceSession, SegmentSession, close_with_error, receive

router = APIRouter()


class StreamStart(SpeechRequest):
    model_config = ConfigDict(extra="allow", strict=True)  # extras: the family's own options, checked as on POST

    input: str = ""
    response_format: str = "pcm"


@router.websocket("/v1/audio/speech/stream")
async def speech_stream(websocket: WebSocket) -> None:
    if not is_origin_allowed(websocket.headers, websocket.app.state.config.cors_origins):
        websocket.state.status = 403
        await websocket.close(code=1008)  # before accepting: the handshake is refused with a 403
        return
    await websocket.accept()
    client = websocket.app.state.engine
    start_timeout_s = websocket.app.state.config.ws_start_timeout_s
    try:
        start = await asyncio.wait_for(receive(websocket, StreamStart), start_timeout_s)
        encoder, options = _check_start(websocket, start)
        voice, reference = stored_voice(websocket, start.voice, None)
        voice = check_speech_input(websocket, start.input if start.input.strip() else "-", voice, start.sampling())
        check_stream_limit(websocket)
        if client.info is None:
            raise EngineUnavailableError("the engine is starting; retry shortly")
        kind = PieceSession if client.info.takes_text_stream else SegmentSession
        session = kind(websocket, start, voice, reference, encoder, options)
        session.begin()
    except ApiError as error:
        await close_with_error(websocket, error.status, str(error))
        return
    except EngineUnavailableError as error:
        await close_with_error(websocket, 503, str(error))
        return
    except TimeoutError:  # a connection that never starts would be held for good
        await close_with_error(websocket, 408, f"no start message came within {start_timeout_s:g} s; send it "
                                "as soon as the socket opens")
        return
    except WebSocketDisconnect:
        websocket.state.status = 499
        return
    await session.run()


def _check_start(websocket: WebSocket, start: StreamStart) -> tuple[StreamEncoder, dict[str, float] | None]:
    """The session's encoder and the family's options it asks for; ApiError for what cannot be served."""
    check_model(websocket, start.model)
    if start.speed != 1.0 or start.stream_format != "audio":
        raise ApiError(400, "speed and stream_format are not taken on this route; leave them out")
    if start.reference_audio is not None or start.reference_text is not None:
        raise ApiError(400, "reference_audio is not taken on this route: store the voice (POST /v1/audio/voices) "
                            "and name it as `voice`", "reference_audio")
    check_instructions(websocket, start.instructions)
    return response_encoder(websocket, start), check_options(websocket, start.model_extra or {})
