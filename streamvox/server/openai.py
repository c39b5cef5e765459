"""OpenAI-compatible routes: POST /v1/audio/speech, GET /v1/models, GET /v1/audio/voices.

`/v1/audio/speech` always streams: audio bytes in the requested format as each chunk is produced
(`stream_format="audio"`), or server-sent events `speech.audio.delta` (base64 audio) ending in
`speech.audio.done` with usage (`stream_format="sse"`). Extension fields set sampling per request.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict

from streamvox import protocol
from streamvox.server import voices as voice_names
from streamvox.server.audio_format import FORMATS, SAMPLE_RATES, StreamEncoder, UnsupportedFormat, media_type
from streamvox.server.errors import ROUTE_ERRORS, ApiError, error_responses
from streamvox.server.streaming import SpeechStream, StreamFailedError, check_options
from streamvox.server.voice_store import NAME
from streamvox.server.voxserve import read_clip, reference_clip

logger = logging.getLogger("streamvox.server")
router = APIRouter()
OPENAI_MODEL_NAMES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")  # accepted as the served model, for drop-in use


class SpeechRequest(BaseModel):
    # strict: a number must be sent as a JSON number (not "0.5" or true); a family's own options (e.g. cfg_weight)
    # are extra fields, others a 422
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    input: str
    voice: str | None = None  # None: the model's default voice
    response_format: str = "mp3"
    speed: float = 1.0
    stream_format: Literal["audio", "sse"] = "audio"
    instructions: str | None = None
    # extensions
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    repetition_window: int | None = None
    max_tokens: int | None = None
    ignore_eos: bool | None = None
    reference_audio: str | None = None  # base64 of a voice clip (wav, flac, mp3, ogg) to clone, for families that can
    reference_text: str | None = None  # what is said in reference_audio
    sample_rate: int | None = None  # of the response (SAMPLE_RATES), resampled from the model's; None: the model's

    def sampling(self) -> protocol.SamplingOverrides:
        names = protocol.SamplingOverrides.__struct_fields__
        return protocol.SamplingOverrides(**{name: getattr(self, name) for name in names})


def response_encoder(request: Request, body: SpeechRequest) -> StreamEncoder:
    """The encoder of the response body asks for; ApiError 400 for a format or rate it cannot have."""
    if body.response_format not in FORMATS:
        raise ApiError(400, f"unknown response_format {body.response_format!r}; choose one of: "
                       f"{', '.join(FORMATS)}", "response_format")
    if body.sample_rate is not None and body.sample_rate not in SAMPLE_RATES:
        raise ApiError(400, f"sample_rate {body.sample_rate} is not offered; choose one of: "
                       f"{', '.join(map(str, SAMPLE_RATES))}", "sample_rate")
    info = request.app.state.engine.info
    try:
        return StreamEncoder(body.response_format, info.sample_rate if info is not None else 24000, body.sample_rate)
    except UnsupportedFormat as error:
        raise ApiError(400, str(error), "sample_rate" if body.sample_rate else "response_format") from None


def check_instructions(request: Request, instructions: str | None) -> None:
    """ApiError 400 for instructions (a style prompt) over the input limit, or to a model that takes none (naming
    the families that do)."""
    limit_chars = request.app.state.config.max_input_chars
    if instructions and len(instructions) > limit_chars:
        raise ApiError(400, f"instructions are {len(instructions)} characters; the limit is {limit_chars}",
                       "instructions")
    info = request.app.state.engine.info
    if not instructions or info is None or info.takes_instructions:
        return
    takers = ", ".join(info.style_families) or "none yet"
    raise ApiError(400, f"this {info.family} model takes no instructions; leave them out (families that take a "
                        f"style prompt: {takers})", "instructions")


def check_model(request: Request, model: str) -> None:
    served = request.app.state.model_name
    if model not in request.app.state.model_aliases and model not in OPENAI_MODEL_NAMES:
        raise ApiError(400, f"unknown model {model!r}; this server serves {served!r} (GET /v1/models)", "model")


@router.post("/v1/audio/speech", responses=ROUTE_ERRORS)
async def speech(body: SpeechRequest, request: Request):
    check_model(request, body.model)
    if body.speed != 1.0:
        raise ApiError(400, f"speed {body.speed} is not supported; this model speaks at its own pace, send 1.0",
                       "speed")
    check_instructions(request, body.instructions)
    encoder = response_encoder(request, body)
    options = check_options(request, body.model_extra or {})
    reference = await _reference(request, body)
    speech_stream = await SpeechStream.open(request, body.input, body.voice, body.sampling(), reference,
                                            options=options, instructions=body.instructions or None)
    if body.stream_format == "sse":
        return StreamingResponse(_sse(speech_stream, encoder), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return StreamingResponse(_audio(speech_stream, encoder), media_type=media_type(body.response_format),
                             headers={"Cache-Control": "no-cache"})


async def _reference(request: Request, body: SpeechRequest) -> tuple[bytes, str] | None:
    """The request's voice clip (extension fields reference_audio + reference_text), decoded; None without one."""
    if body.reference_audio is None:
        if body.reference_text is not None:
            raise ApiError(400, "reference_text is the transcript of a clip: send the clip as reference_audio "
                                "(base64) too, or leave reference_text out", "reference_text")
        return None
    limit = int(request.app.state.config.max_upload_mb * 2**20)
    if len(body.reference_audio) > limit * 4 // 3 + 4:
        raise ApiError(413, f"reference_audio is larger than {limit} bytes; send a shorter clip", "reference_audio")
    try:
        data = base64.b64decode(body.reference_audio, validate=True)
    except ValueError:
        raise ApiError(400, "reference_audio is not base64; send the clip's file bytes base64-encoded",
                       "reference_audio") from None
    return await reference_clip(request, data, body.reference_text, ("reference_audio", "reference_text"))


async def _audio(speech_stream: SpeechStream, encoder: StreamEncoder):
    async for pcm in speech_stream.pcm():  # a failure midway raises, which aborts the response: the client sees it
        if data := encoder.encode(pcm):
            yield data
    if data := encoder.finish():
        yield data


async def _sse(speech_stream: SpeechStream, encoder: StreamEncoder):
    def event(payload: dict) -> bytes:
        return f"data: {json.dumps(payload)}\n\n".encode()

    try:
        async for pcm in speech_stream.pcm():
            if data := encoder.encode(pcm):
                yield event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
        if data := encoder.finish():
            yield event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
        yield event({"type": "speech.audio.done", "usage": speech_stream.usage,
                     "finish_reason": speech_stream.finish_reason})
    except StreamFailedError as error:
        yield event({"type": "error", "error": {"message": str(error), "type": "server_error"}})


@router.get("/v1/models")
async def models(request: Request):
    info = request.app.state.engine.info
    entry = {"id": request.app.state.model_name, "object": "model", "owned_by": "streamvox"}
    if info is not None:
        entry |= {"family": info.family, "sample_rate": info.sample_rate, "voices": info.voices,
                  "random_weights": info.is_random_weights, "takes_reference_audio": info.takes_reference_audio,
                  "takes_text_stream": info.takes_text_stream,
                  "options": {name: {"default": default, "min": low, "max": high}
                              for name, (default, low, high) in info.options.items()}}
    return {"object": "list", "data": [entry]}


@router.get("/v1/audio/voices")
async def voices(request: Request):
    info = request.app.state.engine.info
    if info is None:
        raise ApiError(503, "the engine is starting; retry shortly")
    aliases = voice_names.alias_table(info.voices, request.app.state.voice_aliases)
    return {"voices": info.voices, "default": info.default_voice,
            "aliases": {name: voice or info.default_voice for name, voice in aliases.items()
                        if voice is None or voice in info.voices},
            "stored": request.app.state.voice_store.names()}


@router.post("/v1/audio/voices", status_code=201, responses=error_responses(400, 409, 413, 422, 503))
async def store_voice(request: Request, name: Annotated[str, Form()], text: Annotated[str, Form()],
                      audio: Annotated[UploadFile, File()]):
    """Store a voice clip and its transcript under `name`, for families that clone from reference audio."""
    info = request.app.state.engine.info
    if info is None:
        raise ApiError(503, "the engine is starting; retry shortly")
    if not NAME.fullmatch(name):
        raise ApiError(400, "name must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit",
                       "name")
    store = request.app.state.voice_store
    found, _ = voice_names.resolve(name, info.voices, request.app.state.voice_aliases)
    if found or store.get(name) is not None:
        raise ApiError(409, f"the voice name {name!r} is taken (a built-in voice, an alias or a stored voice); "
                            "choose another, or DELETE the stored one first", "name")
    pcm, transcript = await read_clip(request, audio, text, ("audio", "text"))
    record = store.add(name, pcm, transcript, info.sample_rate)
    return {"name": record["name"], "duration_s": record["duration_s"]}


@router.delete("/v1/audio/voices/{name}", responses=error_responses(404))
async def delete_voice(request: Request, name: str):
    if not request.app.state.voice_store.remove(name):
        raise ApiError(404, f"no stored voice is named {name!r} (built-in voices cannot be deleted)", "name")
    return {"deleted": name}
