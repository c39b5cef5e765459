"""The naive baseline (`streamvox serve --engine naive`) behind the same HTTP API: one request at a time."""

import asyncio
import json
import time

import httpx
import pytest
from websockets.sync.client import connect

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def naive_server(start_server):
    return start_server("--engine", "naive")


def test_naive_engine_streams_frames_and_serves_one_request_at_a_time(naive_server):
    assert naive_server.ready()["policy"] == "naive"
    body = {"model": "tiny-orpheus", "input": "One after the other.", "response_format": "pcm", "max_tokens": 140,
            "ignore_eos": True, "seed": 1}

    async def one(client, delay):
        await asyncio.sleep(delay)
        started, arrivals, data = time.monotonic(), [], b""
        async with client.stream("POST", "/v1/audio/speech", json=body) as response:
            assert response.status_code == 200
            async for part in response.aiter_raw():
                arrivals.append(time.monotonic())
                data += part
        return started, arrivals, data

    async def run():
        async with httpx.AsyncClient(base_url=naive_server.url, timeout=120) as client:
            return await asyncio.gather(one(client, 0.0), one(client, 0.05))

    (_, first_arrivals, first), (_, second_arrivals, second) = asyncio.run(run())
    samples_per_frame = 2048
    for data, arrivals in [(first, first_arrivals), (second, second_arrivals)]:
        num_samples = len(data) // 2
        assert 0 < num_samples <= 20 * samples_per_frame and num_samples % samples_per_frame == 0
        assert len(arrivals) >= 3  # frame by frame, as decoded
    assert first == second  # same seed, same tokens: requests run alone, so nothing disturbs them
    assert second_arrivals[0] >= first_arrivals[-1] - 0.01  # the second waited for the first to finish


def test_naive_engine_rejects_bad_input_like_the_engine(naive_server):
    response = httpx.post(f"{naive_server.url}/v1/audio/speech", timeout=30,
                          json={"model": "tiny-orpheus", "input": "hi", "voice": "nobody"})
    assert response.status_code == 400 and "unknown voice" in response.json()["error"]["message"]


def test_naive_engine_speaks_streamed_text_by_sentences_and_refuses_reference_audio(naive_server):
    with connect(naive_server.url.replace("http://", "ws://") + "/v1/audio/speech/stream", open_timeout=10) as ws:
        ws.send(json.dumps({"model": "tiny-orpheus", "input": "Hi there.", "max_tokens": 35}))
        ws.send(json.dumps({"text": " Bye.", "final": True}))
        messages = []
        while not messages or isinstance(messages[-1], bytes):
            messages.append(ws.recv(timeout=60))
    assert json.loads(messages[-1])["type"] == "speech.audio.done" and len(b"".join(messages[:-1])) > 0
    response = httpx.post(f"{naive_server.url}/generate", data={"text": "Hi", "audio_text": "x"},
                          files={"audio": ("a.wav", b"RIFF" * 10)})
    assert response.status_code == 400 and "reference audio" in response.json()["error"]["message"]
    assert naive_server.ready()["restarts"] == 0
