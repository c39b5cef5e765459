"""Run inside a private network namespace by test_ray.py: two Ray Serve replicas of the tiny model, eight
concurrent streams through the official openai client, then a clean shutdown.

    python tests/deploy/ray_serve_scenario.py MODEL_DIR OUT_DIR
"""

import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
import openai
import ray
from ray import serve
from websockets.sync.client import connect

from streamvox.config import EngineConfig, SchedulerConfig, ServerConfig
from streamvox.deploy.ray_serve import application

PORT = 8765
TEXT = "Keep talking while things break around you."
NUM_STREAMS = 8


async def speak(client: openai.AsyncOpenAI, seed: int) -> tuple[bytes, float]:
    started = time.monotonic()
    async with client.audio.speech.with_streaming_response.create(
            model="tiny-orpheus", voice="tara", input=TEXT, response_format="pcm",
            extra_body={"seed": seed, "max_tokens": 140}) as response:
        return b"".join([data async for data in response.iter_bytes()]), time.monotonic() - started


async def streams() -> list[tuple[bytes, float]]:
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="unused", max_retries=0,
                                timeout=120)
    return await asyncio.gather(*(speak(client, seed) for seed in range(NUM_STREAMS)))


def over_websocket(text: str, seed: int) -> tuple[bytes, dict]:
    """One sentence sent over the WebSocket: its audio and the closing message."""
    audio, message = b"", {}
    with connect(f"ws://127.0.0.1:{PORT}/v1/audio/speech/stream", open_timeout=30, close_timeout=5) as ws:
        ws.send(json.dumps({"model": "tiny-orpheus", "response_format": "pcm", "seed": seed, "max_tokens": 70}))
        ws.send(json.dumps({"text": text, "final": True}))
        while message.get("type") != "speech.audio.done":
            received = ws.recv(timeout=60)
            if isinstance(received, bytes):
                audio += received
            else:
                message = json.loads(received)
    return audio, message


def main(model_dir: str, out_dir: str) -> None:
    out = Path(out_dir)
    started = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    engine = EngineConfig(model=model_dir, scheduler=SchedulerConfig(max_queue_wait_s=600))
    serve.run(application(engine, ServerConfig(served_model_name="tiny-orpheus"), num_replicas=2), name="speech")
    up_s = time.monotonic() - started
    ready = httpx.get(f"http://127.0.0.1:{PORT}/ready", timeout=10).json()
    voices = httpx.get(f"http://127.0.0.1:{PORT}/v1/audio/voices", timeout=10).json()
    results = asyncio.run(streams())
    for seed, (pcm, _) in enumerate(results):
        (out / f"{seed}.pcm").write_bytes(pcm)
    (out / "ws.pcm").write_bytes(over_websocket("Something else.", 20)[0])
    replicas = serve.status().applications["speech"].deployments["streamvox"].replica_states
    serve.shutdown()
    ray.shutdown()
    (out / "summary.json").write_text(json.dumps({
        "up_s": up_s, "stream_s": [s for _, s in results], "ready": ready["ready"], "voices": voices,
        "replicas": {str(state): count for state, count in replicas.items()},
        "total_s": time.monotonic() - started}))


if __name__ == "__main__":
    main(*sys.argv[1:])
