"""A real `streamvox serve` process on 127.0.0.1 serving the session's tiny checkpoint."""

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest

from streamvox.audio import to_int16


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    headers: dict = field(default_factory=dict)  # an API key, for a server that wants one

    def ready(self) -> dict:
        return httpx.get(f"{self.url}/ready", headers=self.headers, timeout=5).json()

    def metrics(self, headers: dict | None = None) -> dict:
        """GET /metrics parsed: {(sample name, frozenset of its labels): value}; `headers` in place of the
        server's own (its API key)."""
        from prometheus_client.parser import text_string_to_metric_families

        response = httpx.get(f"{self.url}/metrics", headers=self.headers if headers is None else headers, timeout=10)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(response.text) for s in family.samples}

    def wait_ready(self, timeout_s: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "the server process exited"
            try:
                body = self.ready()
                if body["ready"]:
                    return body
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("server not ready")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def start_server(tiny_dir, tmp_path_factory):
    """start(*flags) serves the tiny Orpheus as `tiny-orpheus`; model_dir= and name= serve another checkpoint.
    Unless `is_patient` is false, a request waits as long as it takes to start instead of being refused when the
    engine predicts a wait over a second: tests of other behaviour send more at once than two cores keep
    real-time (tests/server/test_capacity.py covers the refusals)."""
    servers = []

    def start(*flags: str, env: dict | None = None, model_dir=None, name: str = "tiny-orpheus",
              is_patient: bool = True, headers: dict | None = None) -> Server:
        if is_patient:
            flags = ("--max-queue-wait-s", "600", *flags)
        port = free_port()
        log = open(tmp_path_factory.mktemp("server") / "server.log", "w")
        command = [sys.executable, "-m", "streamvox.cli", "serve", "--model", str(model_dir or tiny_dir), "--port",
                   str(port), "--host", "127.0.0.1", "--served-model-name", name, *flags]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        server = Server(f"http://127.0.0.1:{port}", process, headers or {})
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.process.terminate()
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()


@pytest.fixture(scope="module")
def server(start_server):
    return start_server()


@pytest.fixture(scope="module")
def reference(tiny_model):
    """The int16 PCM bytes the in-process engine makes for (text, seed, max_tokens) with the model's sampling."""
    yield from _engine_reference(tiny_model)


@pytest.fixture(scope="session")
def engine_reference():
    """engine_reference(model): a generator yielding the `reference` function of any model (yield from it)."""
    return _engine_reference


def _engine_reference(model):
    from streamvox.config import EngineConfig, SchedulerConfig
    from streamvox.engine.local import Engine

    engine = Engine(model, EngineConfig(scheduler=SchedulerConfig(policy="fcfs")))
    cache = {}

    def pcm(text: str, seed: int, max_tokens: int, voice: str | None = None) -> bytes:
        key = (text, seed, max_tokens, voice)
        if key not in cache:
            sampling = model.default_sampling.replace(seed=seed, max_tokens=max_tokens)
            result = engine.result(engine.submit(text, voice, sampling))
            cache[key] = to_int16(result.pcm).tobytes()
        return cache[key]

    yield pcm
    engine.close()


@pytest.fixture(scope="session")
def same_audio():
    return _same_audio


def _same_audio(got: bytes, expected: bytes) -> bool:
    """The same int16 PCM, sample for sample, up to one step of float rounding. Batching changes the float sums
    in the last bits, which can move a sample by one; a lost, repeated or reordered chunk or a different token
    moves thousands of samples by far more."""
    if len(got) != len(expected):
        return False
    diff = np.abs(np.frombuffer(got, np.int16).astype(np.int32) - np.frombuffer(expected, np.int16))
    return int(diff.max(initial=0)) <= 1


@pytest.fixture
def speaks_to_openai_defaults():
    return _speaks_to_openai_defaults


def _speaks_to_openai_defaults(server) -> None:
    """The official client as a voice-agent plugin drives it by default (model gpt-4o-mini-tts, OpenAI's voice
    names) gets audio, in pcm and mp3."""
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    for voice, fmt in (("alloy", "pcm"), ("ash", "mp3")):
        with client.audio.speech.with_streaming_response.create(
                model="gpt-4o-mini-tts", voice=voice, input="Hello from an agent.", response_format=fmt,
                extra_body={"max_tokens": 40, "seed": 1}) as response:
            assert response.status_code == 200 and len(response.read()) > 0, (voice, fmt)


@pytest.fixture
def noise_wav():
    return _noise_wav


def _noise_wav(seconds: float, sample_rate: int = 16000) -> bytes:
    """A noise clip as a 16 kHz WAV file (a server must resample it to the model's rate)."""
    import io
    import wave

    samples = (np.random.default_rng(0).standard_normal(int(seconds * sample_rate)) * 3000).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(samples.tobytes())
    return out.getvalue()
