"""A real server near and beyond its capacity: admitted streams keep playing, the rest get a fast, honest 429;
requests are bounded in tokens and audio seconds; a client that stops reading pauses its request."""

import asyncio
import socket
import time

import httpx
import pytest

from streamvox.bench.metrics import StreamTimeline, stalls
from tests.server.test_failures import speech, wait_idle

SAMPLE_RATE = 24000
PREBUFFER_S = 0.2  # the test client shares two cores with the server: it may itself read a little late


async def _timed(client: httpx.AsyncClient, body: dict) -> tuple[int, float, dict, StreamTimeline | None]:
    """(status, seconds to the response head, headers, the audio's timeline for a 200)."""
    sent = time.monotonic()
    async with client.stream("POST", "/v1/audio/speech", json=body) as response:
        head_s = time.monotonic() - sent
        if response.status_code != 200:
            await response.aread()
            return response.status_code, head_s, dict(response.headers), None
        arrivals, durations = [], []
        async for data in response.aiter_raw():
            arrivals.append(time.monotonic() - sent)
            durations.append(len(data) / 2 / SAMPLE_RATE)
    return 200, head_s, dict(response.headers), StreamTimeline(tuple(arrivals), tuple(durations))


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(is_patient=False)


def test_an_overload_gets_streams_that_never_stall_or_a_fast_429(server):
    """Forty simultaneous requests of 4 s of audio, more than twice what the tiny engine keeps real-time on two
    cores: each is a stream that starts within 2 s and never stalls, or a 429 with Retry-After within 2 s."""

    async def run():
        limits = httpx.Limits(max_connections=48)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(_timed(client, speech(seed=i, max_tokens=350)) for i in range(40)))

    results = asyncio.run(run())
    served = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(served) + len(refused) == 40 and len(served) >= 4 and refused, [r[0] for r in results]
    for _, head_s, headers, _ in refused:
        assert head_s < 2.0 and int(headers["retry-after"]) >= 1
    for _, _, _, timeline in served:
        assert timeline.ttfa_s < 2.0, timeline.ttfa_s
        assert stalls(timeline, PREBUFFER_S)[0] == 0, stalls(timeline, PREBUFFER_S)
    stats = wait_idle(server)
    assert stats["num_requests"] == 0 and stats["num_free_blocks"] == stats["num_blocks"]


def test_generate_sends_its_wav_header_as_soon_as_the_request_is_accepted(server):
    """VoxServe's client drops the first piece it reads as the header: the header must come alone, before audio."""

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            form = {"text": "Header first, then the audio.", "streaming": "true", "max_tokens": "140", "seed": "3"}
            sent = time.monotonic()
            async with client.stream("POST", "/generate", data=form) as response:
                assert response.status_code == 200
                pieces = [(time.monotonic() - sent, data) async for data in response.aiter_raw()]
        return pieces

    pieces = asyncio.run(run())
    assert pieces[0][1][:4] == b"RIFF" and len(pieces[0][1]) == 44, "the first read must be the header alone"
    assert len(pieces) > 2 and sum(len(p) for _, p in pieces[1:]) > 0


def test_requests_over_the_token_and_audio_limits_are_a_400_naming_the_limit(server):
    too_long = httpx.post(f"{server.url}/v1/audio/speech", json=speech(max_tokens=200_000), timeout=30)
    assert too_long.status_code == 400 and "at most 120 s" in too_long.json()["error"]["message"]
    emoji = httpx.post(f"{server.url}/v1/audio/speech", json=speech(text="\U0001f600" * 4096), timeout=30)
    assert emoji.status_code == 400, emoji.text
    assert "tokens; the limit is 2048" in emoji.json()["error"]["message"]


def test_a_client_that_stops_reading_pauses_its_request_and_is_cancelled_when_it_goes(server):
    body = httpx.Request("POST", f"{server.url}/v1/audio/speech", json=speech(max_tokens=4000, ignore_eos=True))
    host, port = server.url.removeprefix("http://").split(":")
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's writes block
        sock.connect((host, int(port)))
        head = (f"POST /v1/audio/speech HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body.content)}\r\n\r\n").encode()
        sock.sendall(head + body.content)
        deadline, stats = time.monotonic() + 30, {}
        while time.monotonic() < deadline:
            stats = server.ready()["engine"]
            if stats["num_held"] == 1:
                break
            time.sleep(0.2)
        assert stats["num_held"] == 1, f"the unread request was never paused: {stats}"
    stats = wait_idle(server)
    assert stats["num_requests"] == 0 and stats["num_free_blocks"] == stats["num_blocks"]
