"""VoxServe-compatible POST /generate: a multipart form (`text`, optional `audio`, `streaming`).

Streaming responses send a 44-byte WAV header (length unknown) as their own first write as soon as the engine has
accepted the request (a refusal before that is still an HTTP status), then raw PCM as each chunk is produced, so
VoxServe's clients and benchmark scripts, which drop the first piece they read as the header, work unchanged;
otherwise one complete WAV.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import Response, StreamingResponse

from streamvox import protocol
from streamvox.server.audio_format import decode_upload, encode_whole, wav_header
from streamvox.server.errors import ROUTE_ERRORS, ApiError
from streamvox.server.streaming import SpeechStream, StreamFailedError, check_options

router = APIRouter()
MAX_REFERENCE_S = 30.0  # a voice prompt; longer clips fill the context without helping
FORM_FIELDS = ("text", "audio", "audio_text", "streaming", "speaker", "seed", "max_tokens", "ignore_eos")


@router.post("/generate", responses=ROUTE_ERRORS)
async def generate(request: Request, text: Annotated[str, Form()], audio: Annotated[UploadFile | None, File()] = None,
                   audio_text: Annotated[str | None, Form()] = None,
                   streaming: Annotated[bool, Form()] = True, speaker: Annotated[str | None, Form()] = None,
                   seed: Annotated[int | None, Form()] = None, max_tokens: Annotated[int | None, Form()] = None,
                   ignore_eos: Annotated[bool | None, Form()] = None):
    reference = None
    if audio is not None:
        reference = await read_clip(request, audio, audio_text, ("audio", "audio_text"))
    elif audio_text is not None:
        raise ApiError(400, "audio_text is the transcript of a reference clip: send the clip as `audio` too, or "
                            "leave audio_text out", "audio_text")
    sampling = protocol.SamplingOverrides(seed=seed, max_tokens=max_tokens, ignore_eos=ignore_eos)
    options = check_options(request, await _option_fields(request))
    speech_stream = await SpeechStream.open(request, text, speaker, sampling, reference, until_audio=not streaming,
                                            options=options)
    sample_rate = request.app.state.engine.info.sample_rate
    if streaming:
        async def body():
            yield wav_header(sample_rate, None)
            async for pcm in speech_stream.pcm():
                yield pcm

        headers = {"Cache-Control": "no-cache", "Content-Disposition": "attachment; filename=speech.wav"}
        return StreamingResponse(body(), media_type="audio/wav", headers=headers)
    try:
        pcm = b"".join([chunk async for chunk in speech_stream.pcm()])
    except StreamFailedError as error:
        raise ApiError(error.status, str(error)) from None
    return Response(encode_whole("wav", sample_rate, pcm), media_type="audio/wav",
                    headers={"X-Finish-Reason": speech_stream.finish_reason})


async def _option_fields(request: Request) -> dict[str, float | str]:
    """The form's fields beyond /generate's own (a family's options), as numbers where they read as one."""
    fields = {}
    for name, value in (await request.form()).items():
        if name not in FORM_FIELDS and isinstance(value, str):
            try:
                fields[name] = float(value)
            except ValueError:
                fields[name] = value  # not a number: check_options says so
    return fields


async def read_clip(request: Request, audio: UploadFile, transcript: str | None,
                    fields: tuple[str, str]) -> tuple[bytes, str]:
    """An uploaded voice clip as int16 PCM at the model's rate, and its transcript (`fields`: the form's names
    for them)."""
    limit = int(request.app.state.config.max_upload_mb * 2**20)
    data = await audio.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, f"{fields[0]} upload is larger than {limit} bytes; send a shorter clip", fields[0])
    return await reference_clip(request, data, transcript, fields)


async def reference_clip(request: Request, data: bytes, transcript: str | None,
                         fields: tuple[str, str]) -> tuple[bytes, str]:
    """A voice clip (any container ffmpeg reads) as int16 PCM at the model's rate, and its transcript; `fields`
    names the request's clip and transcript fields in the errors."""
    audio_field, text_field = fields
    info = request.app.state.engine.info
    if info is not None and not info.takes_reference_audio:
        raise ApiError(400, f"this {info.family} model does not take reference audio; leave out the `{audio_field}` "
                            "field", audio_field)
    if not transcript or not transcript.strip():
        raise ApiError(400, f"reference audio needs `{text_field}`, the transcript of what is said in it", text_field)
    limit_chars = request.app.state.config.max_input_chars
    if len(transcript) > limit_chars:
        raise ApiError(400, f"{text_field} is {len(transcript)} characters; the limit is {limit_chars}", text_field)
    try:
        pcm = await asyncio.to_thread(decode_upload, data, info.sample_rate if info else 24000, MAX_REFERENCE_S)
    except ValueError as error:
        raise ApiError(400, str(error), audio_field) from None
    return pcm, transcript
