"""A family defined only under tests/ (tests/families/toy_family.py), registered through STREAMVOX_FAMILIES and
served end to end: a family is one file."""

import asyncio
import os
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

FAMILIES_DIR = Path(__file__).parent.parent / "families"
STEPS = 40  # 20 frames: 0.4 s of audio


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy family's module, registered in this process too."""
    sys.path.insert(0, str(FAMILIES_DIR))
    previous = os.environ.get("STREAMVOX_FAMILIES")
    os.environ["STREAMVOX_FAMILIES"] = "toy_family"
    import toy_family

    yield toy_family
    sys.path.remove(str(FAMILIES_DIR))
    if previous is None:
        del os.environ["STREAMVOX_FAMILIES"]
    else:
        os.environ["STREAMVOX_FAMILIES"] = previous


@pytest.fixture(scope="module")
def toy_dir(toy, tmp_path_factory):
    return toy.write_tiny(tmp_path_factory.mktemp("toy") / "tiny-toy", seed=0)


@pytest.fixture(scope="module")
def toy_server(toy, toy_dir, start_server):
    path = os.pathsep.join(filter(None, [str(FAMILIES_DIR), os.environ.get("PYTHONPATH")]))
    return start_server(model_dir=toy_dir, name="tiny-toy", env={"STREAMVOX_FAMILIES": "toy_family",
                                                                 "PYTHONPATH": path})


@pytest.fixture(scope="module")
def toy_engine(toy, toy_dir):
    from streamvox.config import EngineConfig, SchedulerConfig
    from streamvox.engine.local import Engine
    from streamvox.runner.weights import load_model

    engine = Engine(load_model(str(toy_dir)), EngineConfig(scheduler=SchedulerConfig(policy="fcfs")))
    yield engine
    engine.close()


def test_the_registry_finds_the_family_by_its_own_layout(toy, toy_dir):
    from streamvox.models.registry import detect_family, families

    assert "toy" in families() and not (toy_dir / "config.json").exists()
    assert detect_family(toy_dir, str(toy_dir)).name == "toy"


def test_chunk_plan_and_codec_state_are_per_request(toy, toy_engine):
    assert (toy.first_chunk_frames("even"), toy.first_chunk_frames("odd")) == (1, 2)
    sampling = toy.ToyModel.default_sampling.replace(max_tokens=STEPS, seed=3)
    for text, voice in [("even", "low"), ("odd", "high")]:
        request_id = toy_engine.submit(text, voice, sampling)
        chunks = list(toy_engine.stream(request_id))
        assert chunks[0].end_frame == toy.first_chunk_frames(text)  # "even": 1 frame, the family's default 2
        assert all((c.end_frame - c.start_frame) % 4 == 0 for c in chunks[1:-1])
        frames, builder = [], toy.ToyFrameBuilder()
        result = toy_engine.result(toy_engine.submit(text, voice, sampling))
        for token in result.step_tokens:
            if (frame := builder.push(token)) is not None:
                frames.append(frame)
        # one oscillator over every frame at once: equal only if the engine carried the state between chunks
        expected = toy.oscillate(frames, {"base_hz": toy.VOICE_BASE_HZ[voice], "phase": 0.0}).numpy()
        streamed = np.concatenate([c.pcm for c in chunks])
        assert len(streamed) == 20 * toy.SAMPLES_PER_FRAME and np.abs(streamed - expected).max() < 1e-6


def test_a_real_server_streams_eight_toy_requests(toy, toy_engine, toy_server, same_audio):
    from streamvox.audio import to_int16

    models = httpx.get(f"{toy_server.url}/v1/models", timeout=10).json()["data"][0]
    assert models["family"] == "toy" and models["voices"] == ["low", "high"]
    texts = [f"Toy stream {i}" + "!" * (i % 2) for i in range(8)]
    voices = ["low", "high"] * 4

    async def one(client, i):
        body = {"model": "tiny-toy", "input": texts[i], "voice": voices[i], "seed": 20 + i, "max_tokens": STEPS,
                "response_format": "pcm"}
        async with client.stream("POST", "/v1/audio/speech", json=body) as response:
            assert response.status_code == 200, await response.aread()
            return b"".join([part async for part in response.aiter_raw()])

    async def run():
        async with httpx.AsyncClient(base_url=toy_server.url, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(8)))

    for i, pcm in enumerate(asyncio.run(run())):
        sampling = toy.ToyModel.default_sampling.replace(max_tokens=STEPS, seed=20 + i)
        expected = to_int16(toy_engine.result(toy_engine.submit(texts[i], voices[i], sampling)).pcm).tobytes()
        assert len(pcm) == 20 * toy.SAMPLES_PER_FRAME * 2 and same_audio(pcm, expected), i


def test_a_family_option_reaches_prepare_and_bad_ones_are_refused(toy, toy_server):
    body = {"model": "tiny-toy", "input": "Pitch", "seed": 1, "max_tokens": 8, "response_format": "pcm"}
    url = f"{toy_server.url}/v1/audio/speech"
    plain, shifted = (httpx.post(url, json={**body, **extra}, timeout=60) for extra in ({}, {"pitch_shift_hz": 40}))
    assert plain.status_code == shifted.status_code == 200 and plain.content != shifted.content
    form = {"text": "Pitch", "seed": "1", "max_tokens": "8", "streaming": "false"}
    generated = httpx.post(f"{toy_server.url}/generate", data={**form, "pitch_shift_hz": "40"}, timeout=60)
    assert generated.status_code == 200 and generated.content[44:] == shifted.content
    refused = {"out of range": (url, {**body, "pitch_shift_hz": 500}), "not a number": (url, {**body,
               "pitch_shift_hz": "high"}), "unknown": (url, {**body, "cfg_weight": 0.5})}
    answers = {name: httpx.post(target, json=json, timeout=60) for name, (target, json) in refused.items()}
    assert {name: r.status_code for name, r in answers.items()} == {"out of range": 400, "not a number": 422,
                                                                   "unknown": 422}
    assert "from -100 to 100" in answers["out of range"].json()["error"]["message"]
    assert "also takes: pitch_shift_hz" in answers["unknown"].json()["error"]["message"]
    bad_form = httpx.post(f"{toy_server.url}/generate", data={**form, "pitch_shift_hz": "high"}, timeout=60)
    assert bad_form.status_code == 422
