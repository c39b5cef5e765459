"""The HTTP API against a real server process, with real clients: httpx and the official openai package."""

import asyncio
import base64
import io
import json
import time
import wave

import av
import httpx
import numpy as np
import openai
import pytest

from streamvox.server.audio_format import FORMATS, available_formats

TEXT = "Streaming speech for everyone."


def decoded_samples(fmt: str, data: bytes) -> int:
    """Number of mono samples a client decodes from a whole response body."""
    if fmt == "pcm":
        return len(data) // 2
    if fmt == "wav":
        with wave.open(io.BytesIO(data)) as wav:
            assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 24000)
            return len(wav.readframes(10**9)) // 2
    options = {"format": fmt, "options": {"sample_rate": "8000"}} if fmt in ("mulaw", "alaw") else {}  # headerless
    with av.open(io.BytesIO(data), **options) as container:
        return sum(frame.samples * 24000 // frame.sample_rate for frame in container.decode(audio=0))


@pytest.mark.parametrize("fmt", available_formats())
def test_openai_client_streams_decodable_audio_in_every_format(server, reference, same_audio, fmt):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    with client.audio.speech.with_streaming_response.create(
        model="tiny-orpheus", voice="tara", input=TEXT, response_format=fmt,
        extra_body={"seed": 3, "max_tokens": 70},
    ) as response:
        data = b"".join(response.iter_bytes())
    expected = len(reference(TEXT, 3, 70)) // 2
    if fmt in ("pcm", "wav", "flac"):
        assert decoded_samples(fmt, data) == expected
    else:  # lossy codecs pad by up to a few codec frames
        assert abs(decoded_samples(fmt, data) - expected) <= 4096


def test_formats_without_an_encoder_are_a_clear_400(server):
    missing = [fmt for fmt in FORMATS if fmt not in available_formats()]
    for fmt in missing:
        response = httpx.post(f"{server.url}/v1/audio/speech", json={"model": "tiny-orpheus", "input": TEXT,
                                                                      "response_format": fmt})
        assert response.status_code == 400 and fmt in response.json()["error"]["message"]
    assert {"pcm", "wav"} <= set(available_formats())


def test_sse_stream_carries_deltas_then_done_with_usage(server, reference, same_audio):
    body = {"model": "tiny-orpheus", "input": TEXT, "response_format": "pcm", "stream_format": "sse",
            "seed": 4, "max_tokens": 70}
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "speech.audio.done"
    assert events[-1]["usage"]["output_tokens"] == 70 and events[-1]["usage"]["input_tokens"] > 0
    assert same_audio(b"".join(base64.b64decode(e["audio"]) for e in events[:-1]), reference(TEXT, 4, 70))


def test_voxserve_generate_form_streams_header_then_pcm(server, reference, same_audio):
    with httpx.stream("POST", f"{server.url}/generate", data={"text": TEXT, "seed": "5", "max_tokens": "70"},
                      timeout=60) as response:
        parts = list(response.iter_raw())
    body = b"".join(parts)
    assert body[:4] == b"RIFF" and body[8:12] == b"WAVE"
    assert same_audio(body[44:], reference(TEXT, 5, 70))
    whole = httpx.post(f"{server.url}/generate", data={"text": TEXT, "seed": "5", "max_tokens": "70",
                                                       "streaming": "false"}, timeout=60)
    with wave.open(io.BytesIO(whole.content)) as wav:
        assert same_audio(wav.readframes(wav.getnframes()), reference(TEXT, 5, 70))


def test_sixteen_concurrent_streams_each_get_exactly_their_audio_as_it_is_made(server, reference, same_audio):
    texts = [f"Stream number {i} says something a little different." for i in range(16)]

    async def one(client, i):
        body = {"model": "tiny-orpheus", "input": texts[i], "response_format": "pcm", "seed": 100 + i,
                "max_tokens": 140}
        started, arrivals, data = time.monotonic(), [], b""
        async with client.stream("POST", "/v1/audio/speech", json=body) as response:
            assert response.status_code == 200
            async for part in response.aiter_raw():
                arrivals.append((time.monotonic() - started, len(part)))
                data += part
        return data, arrivals

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(16)))

    results = asyncio.run(run())
    for i, (data, arrivals) in enumerate(results):
        assert same_audio(data, reference(texts[i], 100 + i, 140)), f"stream {i} differs from the engine's audio"
        # the first chunk is one frame; later frames are held back while the client has over a second of audio,
        # so a 1.7 s stream may come in as few as three pieces
        assert len(arrivals) >= 3, "audio must arrive in several pieces, as it is made"
        assert arrivals[0][1] < 0.5 * len(data), "the first piece must hold only the start of the audio"
        # after the first chunk, the other ~110 of 140 steps take over 0.5 s even alone (5 ms a step at best)
        assert arrivals[-1][0] - arrivals[0][0] > 0.25, "the first chunk must arrive well before the last is made"


@pytest.mark.parametrize("body, status, says", [
    ({"voice": "nobody"}, 400, "unknown voice 'nobody'"),
    ({"model": "nope"}, 400, "unknown model 'nope'"),
    ({"response_format": "ogg"}, 400, "unknown response_format"),
    ({"speed": 1.5}, 400, "speed"),
    ({"input": "  "}, 400, "input is empty"),
    ({"input": "x" * 5000}, 400, "the limit is 4096"),
    ({"temperature": -1}, 400, "temperature must be 0 (greedy) or in [0.001, 1000]"),
    ({"temperature": 1e-300}, 400, "temperature must be 0 (greedy) or in [0.001, 1000]"),  # logits / t: inf
    ({"repetition_penalty": 1e308}, 400, "repetition_penalty must be in [0.001, 1000]"),
    ({"top_p": 0}, 400, "top_p"),
    ({"max_tokens": 0}, 400, "max_tokens must be in [1, 2**31]"),
    ({"max_tokens": 2**31 + 1}, 400, "max_tokens must be in [1, 2**31]"),
    ({"max_tokens": 6}, 400, "max_tokens 6 makes no audio: one frame of this model takes 7 steps"),
    ({"max_tokens": "20"}, 422, "max_tokens: Input should be a valid integer"),  # numbers are JSON numbers
    ({"max_tokens": True}, 422, "max_tokens: Input should be a valid integer"),
    ({"temperature": "0.5"}, 422, "temperature: Input should be a valid number"),
    ({"seed": 1.5}, 422, "seed"),
    ({"top_k": "many"}, 422, "top_k"),
    ({"stream_format": "chunks"}, 422, "stream_format"),
    ({"colour": "blue"}, 422, "colour"),
])
def test_bad_input_gets_a_4xx_that_says_what_to_change(server, body, status, says):
    response = httpx.post(f"{server.url}/v1/audio/speech", json={"model": "tiny-orpheus", "input": TEXT, **body})
    assert response.status_code == status
    assert says in response.json()["error"]["message"]


def test_a_wrong_method_says_which_is_allowed_and_the_schema_declares_the_errors(server):
    response = httpx.get(f"{server.url}/v1/audio/speech")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.json()["error"]["type"] == "invalid_request_error"  # the client's mistake, not the server's
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    for path in ("/v1/audio/speech", "/generate"):
        responses = paths[path]["post"]["responses"]
        assert {"400", "413", "422", "429", "500", "503"} <= set(responses), (path, list(responses))
        assert "ErrorBody" in responses["429"]["content"]["application/json"]["schema"]["$ref"]


def test_bad_forms_and_uploads_are_refused(server):
    response = httpx.post(f"{server.url}/generate", data={"text": TEXT}, files={"audio": ("a.wav", b"RIFF" * 10)})
    assert response.status_code == 400 and "reference audio" in response.json()["error"]["message"]
    big = b"\0" * (11 * 2**20)
    response = httpx.post(f"{server.url}/generate", data={"text": TEXT}, files={"audio": ("a.wav", big)})
    assert response.status_code == 413
    assert httpx.post(f"{server.url}/generate", data={}).status_code == 422
    chunked = (b"x" * 2**20 for _ in range(12))  # no Content-Length: counted as it arrives
    response = httpx.post(f"{server.url}/v1/audio/speech", content=chunked, timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]
    response = httpx.post(f"{server.url}/v1/audio/speech", content=b"{not json", timeout=10,
                          headers={"content-type": "application/json"})
    assert response.status_code == 422


def test_discovery_and_health_routes(server):
    models = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert models[0]["id"] == "tiny-orpheus" and models[0]["sample_rate"] == 24000 and models[0]["random_weights"]
    voices = httpx.get(f"{server.url}/v1/audio/voices").json()
    assert voices["default"] == "tara" and "leo" in voices["voices"]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert server.ready()["ready"] is True


def test_pcm_of_a_stream_is_int16_noise_not_silence(server):
    response = httpx.post(f"{server.url}/v1/audio/speech", timeout=60, json={
        "model": "tiny-orpheus", "input": TEXT, "response_format": "pcm", "seed": 9, "max_tokens": 70})
    samples = np.frombuffer(response.content, dtype=np.int16)
    assert response.headers["content-type"] == "audio/pcm" and samples.std() > 10


def test_text_that_is_not_valid_unicode_is_a_400(server):
    body = b'{"model": "tiny-orpheus", "input": "broken \\ud800 text"}'  # JSON escape of a lone surrogate
    response = httpx.post(f"{server.url}/v1/audio/speech", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid Unicode" in response.json()["error"]["message"]


@pytest.mark.parametrize("fmt", available_formats())
def test_httpx_streaming_gets_decodable_audio_in_every_format(server, reference, fmt):
    body = {"model": "tiny-orpheus", "input": TEXT, "response_format": fmt, "seed": 6, "max_tokens": 70}
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", json=body, timeout=60) as response:
        assert response.status_code == 200
        data = b"".join(response.iter_raw())
    expected = len(reference(TEXT, 6, 70)) // 2
    tolerance = 0 if fmt in ("pcm", "wav", "flac") else 4096
    assert abs(decoded_samples(fmt, data) - expected) <= tolerance


def test_a_websocket_that_never_sends_its_start_message_is_closed_with_a_408(server):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    url = server.url.replace("http://", "ws://") + "/v1/audio/speech/stream"
    opened = time.monotonic()
    with connect(url, open_timeout=10, close_timeout=5) as ws:  # and then silence
        error = json.loads(ws.recv(timeout=30))
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
    waited_s = time.monotonic() - opened
    assert error["error"]["code"] == 408 and "no start message came within 10 s" in error["error"]["message"]
    assert ws.close_code == 1008 and 9.5 <= waited_s <= 15, (ws.close_code, waited_s)
    assert httpx.get(f"{server.url}/health").status_code == 200
