"""`--data-parallel 2`: two engine processes behind one real server, requests routed by each engine's headroom."""

import asyncio
import os
import signal
import time

import httpx
import pytest

from streamvox.bench.metrics import stalls
from tests.server.test_capacity import PREBUFFER_S, _timed
from tests.server.test_failures import speech

SLOW_STEP_S = 0.02  # engine 0's LM steps take this much longer: it cannot keep even one stream real-time
NUM_STREAMS = 4


def _run_streams(server, num_streams: int, max_tokens: int = 350) -> list:
    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(_timed(client, speech(seed=i, max_tokens=max_tokens))
                                          for i in range(num_streams)))

    return asyncio.run(run())


def _viable(result) -> bool:
    """Admitted, started within 2 s and never stalled (with the client's prebuffer)."""
    status, _, _, timeline = result
    return status == 200 and timeline.ttfa_s < 2.0 and stalls(timeline, PREBUFFER_S)[0] == 0


def _all_ready(server, timeout_s: float = 120.0) -> list[dict]:
    """Each engine's part of /ready once every one is ready (the server is ready as soon as one is)."""
    deadline = time.monotonic() + timeout_s
    while True:
        engines = server.ready()["engines"]
        if all(e["status"] == "ready" and e["engine"] is not None for e in engines):
            return engines
        assert time.monotonic() < deadline, engines
        time.sleep(0.2)


def _stop(server) -> None:
    server.process.terminate()
    server.process.wait(timeout=20)


def test_routing_by_headroom_keeps_every_stream_viable_where_round_robin_stalls_some(start_server):
    """Engine 0 is slowed (a test hook) below real time. Round robin sends it every other request and its streams
    stall; routing by headroom sends them all to engine 1, and every stream plays."""
    env = {"STREAMVOX_SLOW_ENGINE": f"0:{SLOW_STEP_S}"}
    outcomes = {}
    for routing in ("round-robin", "load"):
        server = start_server("--data-parallel", "2", "--data-parallel-routing", routing, env=env, is_patient=False)
        engines = _all_ready(server)
        assert engines[0]["engine"]["capacity"] < engines[1]["engine"]["capacity"], engines
        outcomes[routing] = _run_streams(server, NUM_STREAMS)
        _stop(server)
    blind = [(r[0], stalls(r[3], PREBUFFER_S)[0] if r[3] else None) for r in outcomes["round-robin"]]
    assert any(status == 200 and num_stalls for status, num_stalls in blind), blind
    routed = [(r[0], r[3].ttfa_s if r[3] else None, stalls(r[3], PREBUFFER_S) if r[3] else None)
              for r in outcomes["load"]]
    assert all(_viable(r) for r in outcomes["load"]), routed


@pytest.fixture(scope="module")
def two_engines(start_server):
    """Two engines that each hold at most one request waiting to start (beyond it they refuse: 429)."""
    server = start_server("--data-parallel", "2", "--max-queue-len", "1")
    _all_ready(server)
    return server


def test_ready_reports_each_engine_and_the_sum(two_engines):
    body = two_engines.ready()
    assert body["ready"] and body["status"] == "ready" and len(body["engines"]) == 2
    first, second = body["engines"]
    assert first["pid"] != second["pid"] and first["rank"] == 0 and second["rank"] == 1
    assert body["engine"]["num_blocks"] == first["engine"]["num_blocks"] + second["engine"]["num_blocks"]
    assert body["engine"]["capacity"] == first["engine"]["capacity"] + second["engine"]["capacity"]
    metrics = httpx.get(f"{two_engines.url}/metrics").text
    capacity = next(line for line in metrics.splitlines() if line.startswith("streamvox_capacity"))
    assert float(capacity.split()[-1]) == body["engine"]["capacity"]


def test_a_burst_fills_both_engines_and_the_rest_get_a_fast_429_with_retry_after(two_engines, reference):
    async def run():
        async with httpx.AsyncClient(base_url=two_engines.url, timeout=60) as client:
            return await asyncio.gather(*(_timed(client, speech(seed=i, max_tokens=70)) for i in range(12)))

    results = asyncio.run(run())
    served = [i for i, r in enumerate(results) if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(served) >= 2 and refused and len(served) + len(refused) == 12, [r[0] for r in results]
    for _, head_s, headers, _ in refused:
        assert head_s < 2.0 and int(headers["retry-after"]) >= 1
    for i in served:
        assert abs(sum(results[i][3].durations_s) - len(reference(speech()["input"], i, 70)) / 2 / 24000) < 1e-6


def test_killing_one_engine_fails_only_its_streams_and_the_other_keeps_serving(start_server, reference, same_audio):
    """Round robin, so that both engines surely hold streams: by headroom, an engine whose warm-up (sharing two
    cores with the other's) predicted no stream at all gets none, and in one CI run all ten went to the other."""
    server = start_server("--data-parallel", "2", "--max-queue-len", "1", "--data-parallel-routing", "round-robin")
    _all_ready(server)

    async def stream(client, i):
        try:
            async with client.stream("POST", "/v1/audio/speech", json=speech(seed=i, max_tokens=1400)) as response:
                assert response.status_code == 200
                return b"".join([data async for data in response.aiter_raw()])
        except httpx.HTTPError as error:
            return error

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            tasks = []
            while len(tasks) < 10:  # one at a time (each engine queues only one) until both hold a stream
                tasks.append(asyncio.create_task(stream(client, len(tasks))))
                await asyncio.sleep(0.5)
                engines = (await client.get("/ready")).json()["engines"]
                if all(e["open_streams"] for e in engines):
                    break
            victim = engines[0]
            os.kill(victim["pid"], signal.SIGKILL)
            await asyncio.sleep(0.3)
            during = await client.post("/v1/audio/speech", json=speech(seed=99, max_tokens=70))
            return victim, await asyncio.gather(*tasks), during

    victim, results, during = asyncio.run(run())
    on_victim = victim["open_streams"]
    failed = [i for i, r in enumerate(results) if isinstance(r, Exception)]
    assert 1 <= on_victim < len(results) and len(failed) == on_victim, (on_victim, results)
    for i, pcm in enumerate(results):
        if i not in failed:
            assert same_audio(pcm, reference(speech()["input"], i, 1400))
    assert during.status_code == 200 and same_audio(during.content, reference(speech()["input"], 99, 70))
    engines = _all_ready(server, timeout_s=60)
    assert engines[0]["restarts"] == 1 and engines[0]["pid"] != victim["pid"] and engines[1]["restarts"] == 0


def test_engines_that_would_share_a_device_are_warned_of(caplog):
    """Admission counts only an engine's own load, so engines sharing a device over-admit near capacity: the
    server says so at start (one engine per GPU gets no warning)."""
    from streamvox.engine.pool import warn_if_shared

    warn_if_shared(2, [])  # a CPU
    assert "2 engines share one device" in caplog.text
    caplog.clear()
    warn_if_shared(2, ["0", "1"])
    warn_if_shared(1, [])
    assert "share" not in caplog.text
    warn_if_shared(3, ["0", "1"])
    assert "3 engines share 2 GPUs" in caplog.text
