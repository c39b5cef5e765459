"""The cloning families (CosyVoice2, Chatterbox) through a real server: concurrent streams that keep playing,
zero-shot cloning from a clip (over /generate and the OpenAI route), and bad clips refused with what to change."""

import asyncio
import base64
import io
import json
import time
import wave

import httpx
import numpy as np
import pytest
from websockets.sync.client import connect

from streamvox.bench.metrics import StreamTimeline, stalls
from streamvox.models.registry import family_named
from streamvox.runner.weights import load_model

SAMPLE_RATE = 24000
STEPS = 60  # speech tokens per request: 2.4 s of audio
PREBUFFER_S = 0.2  # the test client shares two cores with the server


@pytest.fixture(scope="module", params=["cosyvoice2", "chatterbox"])
def family(request, tmp_path_factory):
    name = request.param
    return name, family_named(name).write_tiny(tmp_path_factory.mktemp(name) / f"tiny-{name}", seed=0)


@pytest.fixture(scope="module")
def clone_server(family, start_server):
    name, path = family
    return start_server(model_dir=path, name=f"tiny-{name}")


@pytest.fixture(scope="module")
def clone_reference(family, engine_reference):
    yield from engine_reference(load_model(str(family[1])))


def _clip(seconds: float, sample_rate: int = 16000, amplitude: float = 3000.0) -> bytes:
    """A voiced-sounding clip (a wobbling tone with noise) as a WAV file."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    rng = np.random.default_rng(1)
    signal = np.sin(2 * np.pi * (140 + 30 * np.sin(2 * np.pi * 3 * t)) * t) + 0.1 * rng.standard_normal(t.size)
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes((signal * amplitude).astype("<i2").tobytes())
    return out.getvalue()


def _wav_pcm(data: bytes) -> bytes:
    with wave.open(io.BytesIO(data)) as wav:
        assert wav.getframerate() == SAMPLE_RATE
        return wav.readframes(10**9)


def test_eight_concurrent_streams_keep_playing_and_match_the_engine(family, clone_server, clone_reference,
                                                                     same_audio):
    model = f"tiny-{family[0]}"
    texts = [f"Stream number {i} speaks now." for i in range(8)]

    async def one(client, i):
        body = {"model": model, "input": texts[i], "seed": 30 + i, "max_tokens": STEPS,
                "response_format": "pcm"}
        sent = time.monotonic()
        arrivals, durations, data = [], [], b""
        async with client.stream("POST", "/v1/audio/speech", json=body) as response:
            assert response.status_code == 200, await response.aread()
            async for part in response.aiter_raw():
                arrivals.append(time.monotonic() - sent)
                durations.append(len(part) / 2 / SAMPLE_RATE)
                data += part
        return data, StreamTimeline(tuple(arrivals), tuple(durations))

    async def run():
        async with httpx.AsyncClient(base_url=clone_server.url, timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(8)))

    underruns = []
    for i, (pcm, timeline) in enumerate(asyncio.run(run())):
        assert len(pcm) > STEPS * 960, i  # most of the steps' tokens are audio
        if stalls(timeline, PREBUFFER_S)[0]:
            underruns.append((i, stalls(timeline, PREBUFFER_S)[1], timeline))
        sampling = {"seed": 30 + i, "max_tokens": STEPS}
        expected = clone_reference(texts[i], sampling["seed"], sampling["max_tokens"])
        assert same_audio(pcm, expected), i
    assert not underruns, underruns


def test_a_cloned_voice_changes_the_audio_and_is_reproducible(family, clone_server):
    url = f"{clone_server.url}/generate"
    form = {"text": "Say it in the voice of the clip.", "seed": "5", "max_tokens": "40", "streaming": "false"}
    clip = {"audio": ("clip.wav", _clip(5.0))}
    voiced = [httpx.post(url, data={**form, "audio_text": "What the clip says, more or less."}, files=clip,
                         timeout=120) for _ in range(2)]
    plain = httpx.post(url, data=form, timeout=120)
    assert [r.status_code for r in (*voiced, plain)] == [200] * 3, [r.text for r in (*voiced, plain)]
    cloned, again, unvoiced = (_wav_pcm(r.content) for r in (*voiced, plain))
    assert cloned == again and cloned != unvoiced


def test_the_openai_route_takes_a_reference_clip(family, clone_server):
    model = f"tiny-{family[0]}"
    body = {"model": model, "input": "Cloned through the OpenAI route.", "seed": 5, "max_tokens": 40,
            "response_format": "pcm", "reference_audio": base64.b64encode(_clip(5.0)).decode(),
            "reference_text": "What the clip says, more or less."}
    cloned = httpx.post(f"{clone_server.url}/v1/audio/speech", json=body, timeout=120)
    plain = httpx.post(f"{clone_server.url}/v1/audio/speech", json={
        k: v for k, v in body.items() if not k.startswith("reference")}, timeout=120)
    assert cloned.status_code == plain.status_code == 200, cloned.text
    assert len(cloned.content) > 0 and cloned.content != plain.content
    missing = httpx.post(f"{clone_server.url}/v1/audio/speech", json={**body, "reference_text": None}, timeout=60)
    assert missing.status_code == 400 and "reference_text" in missing.json()["error"]["message"]


def test_bad_clips_get_a_400_that_says_what_to_change(family, clone_server):
    url = f"{clone_server.url}/generate"
    form = {"text": "Say it.", "seed": "1", "max_tokens": "10", "streaming": "false"}
    refused = {
        "not audio": httpx.post(url, data={**form, "audio_text": "x"}, files={"audio": ("a.wav", b"RIFF" * 10)},
                                timeout=60),
        "too long": httpx.post(url, data={**form, "audio_text": "x"}, files={"audio": ("a.wav", _clip(31))},
                               timeout=60),
        "silent": httpx.post(url, data={**form, "audio_text": "x"},
                             files={"audio": ("a.wav", _clip(5.0, amplitude=0.0))}, timeout=60),
        "no transcript": httpx.post(url, data=form, files={"audio": ("a.wav", _clip(5.0))}, timeout=60),
    }
    messages = {name: r.json()["error"]["message"] for name, r in refused.items()}
    assert {name: r.status_code for name, r in refused.items()} == dict.fromkeys(refused, 400), messages
    assert "could not be decoded" in messages["not audio"] and "longer than 30" in messages["too long"]
    assert "silent" in messages["silent"] and "audio_text" in messages["no transcript"]
    after = httpx.post(url, data=form, timeout=60)  # nothing else was affected
    assert after.status_code == 200


def test_chatterbox_takes_its_guidance_and_exaggeration_options(family, clone_server):
    name, _ = family
    url = f"{clone_server.url}/v1/audio/speech"
    body = {"model": f"tiny-{name}", "input": "Options change the voice.", "seed": 2, "max_tokens": 30,
            "response_format": "pcm"}
    if name != "chatterbox":
        refused = httpx.post(url, json={**body, "cfg_weight": 0.3}, timeout=60)
        assert refused.status_code == 422 and "cfg_weight" in refused.json()["error"]["message"]
        return
    answers = [httpx.post(url, json={**body, **options}, timeout=120) for options in
               ({}, {"cfg_weight": 0.0}, {"exaggeration": 0.0}, {"cfg_weight": 0.5, "exaggeration": 0.5})]
    assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
    default, unguided, exaggerated, explicit = (r.content for r in answers)
    assert default == explicit and unguided != default and exaggerated != default  # the defaults are 0.5 / 0.5
    too_much = httpx.post(url, json={**body, "cfg_weight": 5}, timeout=60)
    assert too_much.status_code == 400 and "from 0 to 2" in too_much.json()["error"]["message"]


def test_cosyvoice2_takes_instructions_and_cross_lingual(family, clone_server):
    """CosyVoice2's instruct2 (`instructions`) and cross-lingual (`cross_lingual: 1`) modes over the OpenAI route:
    each speaks differently from plain cloning, a seed reproduces it, and misuse gets a 400 saying what to change.
    Chatterbox takes no style prompt and says which families do."""
    name, _ = family
    url = f"{clone_server.url}/v1/audio/speech"
    body = {"model": f"tiny-{name}", "input": "Modes change the speech.", "seed": 2, "max_tokens": 30,
            "response_format": "pcm", "reference_audio": base64.b64encode(_clip(5.0)).decode(),
            "reference_text": "What the clip says, more or less."}
    styled = {**body, "instructions": "Speak slowly, in a whisper."}
    if name != "cosyvoice2":
        refused = httpx.post(url, json=styled, timeout=60)
        assert refused.status_code == 400 and "cosyvoice2" in refused.json()["error"]["message"]
        return
    answers = [httpx.post(url, json=b, timeout=120) for b in (body, styled, styled, {**body, "cross_lingual": 1})]
    assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
    cloned, instructed, again, cross_lingual = (r.content for r in answers)
    assert instructed == again and len({cloned, instructed, cross_lingual}) == 3
    no_clip = {k: v for k, v in body.items() if not k.startswith("reference")}
    refusals = {"reference_audio": {**no_clip, "cross_lingual": 1}, "0 (off) or 1 (on)": {**body, "cross_lingual": 0.5},
                "leave cross_lingual out": {**styled, "cross_lingual": 1}}
    for message, refused_body in refusals.items():
        refused = httpx.post(url, json=refused_body, timeout=60)
        assert refused.status_code == 400 and message in refused.json()["error"]["message"], refused.text
    models = httpx.get(f"{clone_server.url}/v1/models", timeout=10).json()["data"]
    assert models[0]["options"]["cross_lingual"] == {"default": 0.0, "min": 0.0, "max": 1.0}


def test_a_websocket_session_takes_the_familys_options_and_instructions(family, clone_server, same_audio):
    """The start message's family options (Chatterbox's cfg_weight) or instructions (CosyVoice2's) hold for every
    sentence of a WebSocket session: the audio is what POST gives with them, sentence by sentence, seed by seed."""
    name, _ = family
    extra = {"cfg_weight": 0.0} if name == "chatterbox" else {"instructions": "Speak slowly, in a whisper."}
    sentences = ["The first sentence is here.", "And a second one."]
    start = {"model": f"tiny-{name}", "response_format": "pcm", "seed": 7, "max_tokens": 30, **extra}
    url = clone_server.url.replace("http://", "ws://") + "/v1/audio/speech/stream"
    audio = b""
    with connect(url, open_timeout=10, close_timeout=5) as ws:
        ws.send(json.dumps(start))
        ws.send(json.dumps({"text": " ".join(sentences), "final": True}))
        while isinstance(message := ws.recv(timeout=120), bytes):
            audio += message
    assert json.loads(message)["type"] == "speech.audio.done", message

    def posted(fields: dict) -> bytes:
        answers = [httpx.post(f"{clone_server.url}/v1/audio/speech", json={
            **fields, "input": text, "seed": 7 + i}, timeout=120) for i, text in enumerate(sentences)]
        assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
        return b"".join(r.content for r in answers)

    plain = {k: v for k, v in start.items() if k not in extra}
    assert same_audio(audio, posted(start)) and not same_audio(audio, posted(plain))


def test_an_openai_client_with_a_voice_agents_defaults_gets_audio(clone_server, speaks_to_openai_defaults):
    speaks_to_openai_defaults(clone_server)
