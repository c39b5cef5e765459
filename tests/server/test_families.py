"""Every family through a real server: concurrent streams of the multi-codebook families, their voices listed."""

import asyncio
import io
import wave

import httpx
import pytest

from streamvox.models.tiny import csm, qwen3_tts
from streamvox.runner.weights import load_model

FAMILIES = {"csm": csm.write_tiny, "qwen3-tts": qwen3_tts.write_tiny}
FRAMES = 20  # frames per request: 1.6 s of 12.5 Hz audio


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    return name, FAMILIES[name](tmp_path_factory.mktemp(f"tiny-{name}"), seed=0)


@pytest.fixture(scope="module")
def family_server(family, start_server):
    name, path = family
    return start_server(model_dir=path, name=f"tiny-{name}")


@pytest.fixture(scope="module")
def family_reference(family, engine_reference):
    yield from engine_reference(load_model(str(family[1])))


def _pcm_bytes(fmt: str, data: bytes) -> bytes:
    if fmt == "pcm":
        return data
    with wave.open(io.BytesIO(data)) as wav:  # a streamed wav: its header cannot know the length
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 24000)
        return wav.readframes(10**9)


def test_voices_are_listed(family, family_server):
    name, _ = family
    voices = httpx.get(f"{family_server.url}/v1/audio/voices", timeout=10).json()
    model = httpx.get(f"{family_server.url}/v1/models", timeout=10).json()["data"][0]
    assert model["family"] == name and model["voices"] == voices["voices"] and voices["default"] in voices["voices"]


def test_eight_concurrent_streams_in_wav_and_pcm_get_their_whole_audio(family, family_server, family_reference,
                                                                       same_audio):
    name, _ = family
    voices = httpx.get(f"{family_server.url}/v1/audio/voices", timeout=10).json()["voices"]
    texts = [f"Stream {i} of the {name} family speaks." for i in range(8)]

    async def one(client, i):
        fmt = ("wav", "pcm")[i % 2]
        voice = voices[i % len(voices)]
        body = {"model": f"tiny-{name}", "input": texts[i], "voice": voice.title() if i % 4 == 1 else voice,
                "seed": 10 + i,
                "max_tokens": FRAMES, "response_format": fmt}
        pieces = 0
        data = b""
        async with client.stream("POST", "/v1/audio/speech", json=body) as response:
            assert response.status_code == 200, await response.aread()
            async for part in response.aiter_raw():
                data += part
                pieces += 1
        return fmt, data, pieces

    async def run():
        async with httpx.AsyncClient(base_url=family_server.url, timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(8)))

    for i, (fmt, data, pieces) in enumerate(asyncio.run(run())):
        pcm = _pcm_bytes(fmt, data)
        assert len(pcm) == FRAMES * 1920 * 2, f"stream {i} ({fmt}): {len(pcm) // 2} samples"
        assert same_audio(pcm, family_reference(texts[i], 10 + i, FRAMES, voices[i % len(voices)])), i
        assert pieces >= 2, "audio must arrive as it is made"


def test_reference_audio_steers_csm_and_is_refused_by_others(family, family_server, noise_wav):
    name, _ = family
    url = f"{family_server.url}/generate"
    form = {"text": "Say it in this voice.", "seed": "4", "max_tokens": "6", "streaming": "false"}
    clip = {"audio": ("clip.wav", noise_wav(1.2))}
    with_clip = httpx.post(url, data={**form, "audio_text": "Some words."}, files=clip, timeout=120)
    if name != "csm":
        assert with_clip.status_code == 400 and "reference audio" in with_clip.json()["error"]["message"]
        return
    assert with_clip.status_code == 200, with_clip.text
    plain = httpx.post(url, data=form, timeout=120)
    voiced, unvoiced = (_pcm_bytes("wav", r.content) for r in (with_clip, plain))
    assert len(voiced) == len(unvoiced) == 6 * 1920 * 2 and voiced != unvoiced  # the clip changed the voice
    refused = [httpx.post(url, data=form, files=clip, timeout=60),  # no transcript
               httpx.post(url, data={**form, "audio_text": "x"}, files={"audio": ("a.wav", b"RIFF" * 10)},
                          timeout=60),
               httpx.post(url, data={**form, "audio_text": "x"}, files={"audio": ("a.wav", noise_wav(31))},
                          timeout=60),
               httpx.post(url, data={**form, "audio_text": "a transcript but no clip"}, timeout=60),
               httpx.post(url, data={**form, "audio_text": "x" * 5000}, files=clip, timeout=60)]
    messages = [r.json()["error"]["message"] for r in refused]
    assert [r.status_code for r in refused] == [400] * 5
    assert "audio_text" in messages[0] and "could not be decoded" in messages[1] and "longer than 30" in messages[2]
    assert "send the clip" in messages[3] and "the limit is 4096" in messages[4]


def test_an_openai_client_with_a_voice_agents_defaults_gets_audio(family_server, speaks_to_openai_defaults):
    speaks_to_openai_defaults(family_server)


def test_instructions_steer_a_family_that_takes_them_and_others_name_it(family, family_server, same_audio):
    name, _ = family
    url = f"{family_server.url}/v1/audio/speech"
    body = {"model": f"tiny-{name}", "input": "Say it calmly.", "response_format": "pcm", "seed": 2,
            "max_tokens": 10, "ignore_eos": True}
    steered = httpx.post(url, json={**body, "instructions": "Speak slowly and calmly."}, timeout=60)
    if name != "qwen3-tts":
        message = steered.json()["error"]["message"]
        assert steered.status_code == 400 and "takes no instructions" in message
        assert "qwen3-tts (its CustomVoice checkpoints above 0.6B)" in message
        return
    plain = httpx.post(url, json=body, timeout=60)
    assert steered.status_code == plain.status_code == 200 and len(steered.content) == len(plain.content)
    assert not same_audio(steered.content, plain.content), "the style prompt changes the speech"
