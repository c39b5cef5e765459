"""Failure behaviour of a real server: a dying engine, a failing request, clients that vanish."""

import asyncio
import os
import random
import signal
import time

import httpx
import pytest

TEXT = "Keep talking while things break around you."


def speech(fmt="pcm", seed=1, max_tokens=140, text=TEXT, **extra):
    return {"model": "tiny-orpheus", "input": text, "response_format": fmt, "seed": seed, "max_tokens": max_tokens,
            **extra}


def wait_idle(server, timeout_s=10.0) -> dict:
    """Wait until the engine holds no request and every KV block is free; returns its last stats."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = server.ready()["engine"]
        if stats and stats["num_requests"] == 0 and stats["num_free_blocks"] == stats["num_blocks"]:
            return stats
        time.sleep(0.1)
    return stats


def test_killed_engine_fails_streams_within_2s_then_restarts(start_server):
    server = start_server()
    pid = server.ready()["engine_pid"]

    async def stream(client, i):
        started = time.monotonic()
        try:
            async with client.stream("POST", "/v1/audio/speech", json=speech(seed=i, max_tokens=1200)) as response:
                if response.status_code != 200:  # still queued when the engine died: refused with a status
                    return time.monotonic() - started, response.status_code
                async for _ in response.aiter_raw():
                    pass
        except httpx.HTTPError as error:
            return time.monotonic() - started, error
        return time.monotonic() - started, None

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            tasks = [asyncio.create_task(stream(client, i)) for i in range(4)]
            await asyncio.sleep(1.5)  # audio is flowing
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            results = await asyncio.gather(*tasks)
            return killed_at, results, time.monotonic()

    killed_at, results, ended_at = asyncio.run(run())
    assert all(error is not None for _, error in results), "every in-flight stream must end in an error"
    assert ended_at - killed_at < 2.0
    during = httpx.post(f"{server.url}/v1/audio/speech", json=speech())
    assert during.status_code == 503 and "Retry-After" in during.headers
    assert server.ready()["ready"] is False
    body = server.wait_ready(timeout_s=60)
    assert body["restarts"] == 1 and body["engine_pid"] != pid
    after = httpx.post(f"{server.url}/v1/audio/speech", json=speech(max_tokens=70), timeout=60)
    assert after.status_code == 200 and len(after.content) > 0


@pytest.fixture(scope="module")
def faulty_server(start_server):
    return start_server(env={"STREAMVOX_FAULT_INJECTION": "prepare=FAIL-PREPARE,decode=FAIL-DECODE"})


def test_a_request_whose_preparation_raises_disturbs_no_healthy_stream(faulty_server, reference, same_audio):
    texts = [f"Healthy stream {i} keeps going." for i in range(8)]

    async def healthy(client, i):
        async with client.stream("POST", "/v1/audio/speech", json=speech(seed=i, text=texts[i])) as response:
            assert response.status_code == 200
            return b"".join([part async for part in response.aiter_raw()])

    async def run():
        async with httpx.AsyncClient(base_url=faulty_server.url, timeout=120) as client:
            tasks = [asyncio.create_task(healthy(client, i)) for i in range(8)]
            await asyncio.sleep(0.5)
            bad = await client.post("/v1/audio/speech", json=speech(text="FAIL-PREPARE now"))
            return bad, await asyncio.gather(*tasks)

    bad, streams = asyncio.run(run())
    assert bad.status_code == 500 and "preparing the text failed" in bad.json()["error"]["message"]
    for i, data in enumerate(streams):
        assert same_audio(data, reference(texts[i], i, 140)), f"healthy stream {i} was disturbed"
    assert wait_idle(faulty_server)["num_requests"] == 0


def test_a_request_whose_decoding_raises_ends_with_an_error_and_others_finish(faulty_server, reference, same_audio):
    with httpx.stream("POST", f"{faulty_server.url}/v1/audio/speech", timeout=60,
                      json=speech(text="FAIL-DECODE please", stream_format="sse")) as response:
        assert response.status_code == 200  # the first chunk went out before decoding failed
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert '"speech.audio.delta"' in events[0]
    assert '"type": "error"' in events[-1] and "audio decoding failed" in events[-1]
    with pytest.raises(httpx.RemoteProtocolError):  # a plain audio stream is cut off: the client sees an error
        with httpx.stream("POST", f"{faulty_server.url}/v1/audio/speech", timeout=60,
                          json=speech(text="FAIL-DECODE again")) as response:
            assert response.status_code == 200
            for _ in response.iter_raw():
                pass
    good = httpx.post(f"{faulty_server.url}/v1/audio/speech", json=speech(seed=2, max_tokens=70), timeout=60)
    assert same_audio(good.content, reference(TEXT, 2, 70))


def test_two_hundred_random_disconnects_leave_nothing_behind(server):
    rng = random.Random(11)
    plans = [(rng.choice(["before", "during"]), rng.uniform(0.0, 1.2)) for _ in range(200)]

    async def client_that_leaves(client, i, when, after_s):
        body = speech(seed=i, max_tokens=rng_tokens[i])
        try:
            if when == "before":  # gone before any audio: possibly still queued or preparing
                await asyncio.wait_for(client.post("/v1/audio/speech", json=body), timeout=after_s)
                return
            async with client.stream("POST", "/v1/audio/speech", json=body) as response:
                started = time.monotonic()
                async for _ in response.aiter_raw():
                    if time.monotonic() - started > after_s:
                        return  # leaving the block closes the connection mid-stream
        except (TimeoutError, httpx.HTTPError):
            return

    rng_tokens = [rng.randint(70, 600) for _ in range(200)]

    async def run():
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            gate = asyncio.Semaphore(16)

            async def gated(i, plan):
                async with gate:
                    await client_that_leaves(client, i, *plan)

            await asyncio.gather(*(gated(i, plan) for i, plan in enumerate(plans)))

    asyncio.run(run())
    stats = wait_idle(server, timeout_s=15)
    assert stats["num_requests"] == 0 and stats["num_free_blocks"] == stats["num_blocks"]
    assert server.ready()["open_streams"] == 0


def test_overload_beyond_the_queue_bound_gets_429_with_retry_after(start_server):
    server = start_server("--max-num-seqs", "1", "--max-queue-len", "2")

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/audio/speech", json=speech(seed=i, max_tokens=140))
                                          for i in range(8)))

    responses = asyncio.run(run())
    refused = [r for r in responses if r.status_code == 429]
    served = [r for r in responses if r.status_code == 200]
    assert len(refused) + len(served) == 8 and len(refused) >= 3 and len(served) >= 1
    assert all(r.headers["Retry-After"] and "capacity" in r.json()["error"]["message"] for r in refused)
    assert all(len(r.content) > 0 for r in served)


def test_a_server_whose_engine_cannot_start_exits_with_the_reason(tmp_path):
    """A wrong --model is not retried forever: the server stops at once, non-zero, saying what was wrong."""
    import subprocess
    import sys

    missing = tmp_path / "no-such-checkpoint"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "streamvox.cli", "serve", "--model", str(missing), "--port", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and time.monotonic() - started < 60
    assert f"no checkpoint directory '{missing}'" in result.stderr
    assert "stopping the server" in result.stderr
