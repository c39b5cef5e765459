"""`--dtype bfloat16` on the CPU: the server speaks with a bf16 backbone (fp32 codec), and a client gets exactly
what the in-process engine makes in that precision."""

import httpx
import numpy as np
import pytest

from streamvox.runner.weights import load_model


@pytest.fixture(scope="module")
def bf16_reference(tiny_dir, engine_reference):
    yield from engine_reference(load_model(str(tiny_dir), dtype="bfloat16", device="cpu"))


def test_a_bf16_server_streams_the_bf16_engines_audio(start_server, bf16_reference, same_audio):
    server = start_server("--dtype", "bfloat16", "--device", "cpu")
    texts = ["Half precision on the processor.", "A second voice beside it."]
    bodies = [{"model": "tiny-orpheus", "input": text, "response_format": "pcm", "seed": 20 + i, "max_tokens": 70}
              for i, text in enumerate(texts)]
    with httpx.Client(base_url=server.url, timeout=120) as client:
        got = [client.post("/v1/audio/speech", json=body) for body in bodies]
    for response, body in zip(got, bodies, strict=True):
        assert response.status_code == 200, response.text
        assert same_audio(response.content, bf16_reference(body["input"], body["seed"], 70))
        assert len(response.content) >= 8 * 2048 * 2  # 70 tokens: up to 10 frames (the tiny may draw a non-audio id)
        assert np.abs(np.frombuffer(response.content, np.int16)).max() > 100
