"""What a platform team runs the server with: Prometheus metrics, against a real server process and real clients."""

import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamvox.bench.metrics import StreamTimeline, stalls
from streamvox.server.metrics import Metrics

MODEL = "tiny-orpheus"


def scrape(server) -> dict:
    return server.metrics()


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset({"model": MODEL, **labels}.items())), 0.0)


def test_metrics_count_what_clients_got_and_what_the_engine_did(server):
    from websockets.sync.client import connect

    before = scrape(server)
    received, late = [], 0
    for seed in (1, 2, 3):
        body = {"model": MODEL, "input": "Metrics for everyone.", "response_format": "pcm", "seed": seed,
                "max_tokens": 70}
        started, arrivals, durations = time.monotonic(), [], []
        with httpx.stream("POST", f"{server.url}/v1/audio/speech", json=body, timeout=60) as response:
            assert response.status_code == 200
            for part in response.iter_raw():
                arrivals.append(time.monotonic() - started)
                durations.append(len(part) / 2 / 24000)
        received.append(round(sum(durations) * 24000))
        late += stalls(StreamTimeline(tuple(arrivals), tuple(durations)))[0]  # as this client played it
    assert httpx.post(f"{server.url}/v1/audio/speech", json={"model": MODEL, "input": " "}).status_code == 400
    assert httpx.get(f"{server.url}/no/such/path").status_code == 404
    with connect(server.url.replace("http://", "ws://") + "/v1/audio/speech/stream") as ws:
        ws.send(json.dumps({"model": MODEL, "voice": "nobody"}))
        assert json.loads(ws.recv(timeout=30))["error"]["code"] == 400
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the gauges follow the engine's reports (twice a second when idle)
        after = scrape(server)
        if value(after, "streamvox_running_streams") == 0:
            break
        time.sleep(0.2)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    speech = {"route": "/v1/audio/speech"}
    assert delta("streamvox_requests_total", **speech, status="200", outcome="completed") == 3
    assert delta("streamvox_requests_total", **speech, status="400", outcome="rejected") == 1
    assert delta("streamvox_requests_total", route="unmatched", status="404", outcome="rejected") == 1
    assert delta("streamvox_requests_total", route="/v1/audio/speech/stream", status="400", outcome="rejected") == 1
    assert delta("streamvox_ttfa_seconds_count") == 3
    assert 0 < delta("streamvox_ttfa_seconds_sum") < 3 * 10
    assert delta("streamvox_chunk_gap_seconds_count") >= 3  # 10 frames each come in several pieces
    assert delta("streamvox_audio_seconds_total") == pytest.approx(sum(received) / 24000, rel=1e-6)
    assert delta("streamvox_late_chunks_total") == late
    steps = delta("streamvox_lm_step_seconds_count")
    assert steps >= 70 and delta("streamvox_lm_batch_size_count") == steps
    assert delta("streamvox_lm_batch_size_sum") >= 3 * 70  # every row of every step
    assert delta("streamvox_codec_batch_seconds_count") > 0
    assert delta("streamvox_codec_batch_frames_sum") * 2048 == sum(received)  # a frame is 2048 samples
    engine = httpx.get(f"{server.url}/ready").json()["engine"]
    assert value(after, "streamvox_kv_blocks_used") + value(after, "streamvox_kv_blocks_free") == engine["num_blocks"]
    assert value(after, "streamvox_queue_depth") == 0 and value(after, "streamvox_capacity_streams") >= 1


def test_a_piece_sent_after_the_client_ran_dry_is_late_and_its_wait_is_underrun():
    metrics = Metrics(MODEL, prebuffer_s=0.0)
    timing = metrics.stream({})
    timing.sent(240, 24000)  # 10 ms of audio
    time.sleep(0.06)
    timing.sent(240, 24000)  # 50 ms or more after the player ran dry
    timing.sent(240, 24000)  # at once: the player is 10 ms behind the 20 ms it has, still not on time
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(metrics.render().decode()) for s in family.samples}
    assert value(samples, "streamvox_late_chunks_total") == 2
    assert 0.05 <= value(samples, "streamvox_underrun_seconds_total") < 0.5
    assert value(samples, "streamvox_ttfa_seconds_count") == 1
    assert value(samples, "streamvox_chunk_gap_seconds_count") == 2


@pytest.fixture(scope="module")
def guarded(start_server):
    """Keys from the flag (twice) and the environment, one allowed browser origin, one stream at a time."""
    return start_server("--api-key", "key-one", "--api-key", "key-two", "--cors-origin", "http://allowed.example",
                        "--max-concurrent-streams", "1", "--voice-alias", "Alloy=leo", "--voice-alias", "narrator=zoe",
                        env={"STREAMVOX_API_KEYS": " key-three , "},
                        headers=bearer("key-three"))


def speech_body(**more) -> dict:
    return {"model": MODEL, "input": "Keys for everyone.", "response_format": "pcm", "seed": 1, "max_tokens": 70,
            **more}


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_every_route_but_health_needs_a_key_and_a_refusal_never_reaches_the_engine(guarded):
    import openai

    before = scrape_with(guarded, bearer("key-one"))
    for headers in ({}, bearer("wrong"), {"Authorization": "key-one"}, {"Authorization": "Basic a2V5LW9uZQ=="}):
        response = httpx.post(f"{guarded.url}/v1/audio/speech", json=speech_body(), headers=headers, timeout=30)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
        error = response.json()["error"]
        assert error["code"] == 401 and error["type"] == "invalid_request_error" and "API key" in error["message"]
    for path in ("/v1/models", "/v1/audio/voices", "/ready", "/metrics"):
        assert httpx.get(f"{guarded.url}{path}").status_code == 401, path
    assert httpx.get(f"{guarded.url}/health").status_code == 200
    after = scrape_with(guarded, bearer("key-one"))
    assert value(after, "streamvox_lm_step_seconds_count") == value(before, "streamvox_lm_step_seconds_count")
    assert value(after, "streamvox_requests_total", route="/v1/audio/speech", status="401", outcome="rejected") == 4
    for key in ("key-one", "key-two", "key-three"):  # the official client sends its key as a bearer token
        client = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=key, max_retries=0)
        with client.audio.speech.with_streaming_response.create(model=MODEL, voice="tara", input="Keys for everyone.",
                                                                response_format="pcm") as response:
            assert len(response.read()) > 0, key


def scrape_with(server, headers: dict) -> dict:
    return server.metrics(headers)


def test_websockets_need_a_key_and_an_allowed_origin(guarded):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    url = guarded.url.replace("http://", "ws://") + "/v1/audio/speech/stream"
    with pytest.raises(InvalidStatus) as refused:
        connect(url, open_timeout=10)
    assert refused.value.response.status_code == 401
    for origin in ("http://elsewhere.example", "http://allowed.example.evil"):
        with pytest.raises(InvalidStatus) as refused:
            connect(f"{url}?api_key=key-one", origin=origin, open_timeout=10)
        assert refused.value.response.status_code == 403, origin
    own = guarded.url  # a page the server itself served (the playground) may connect, as may a listed origin
    for origin in (None, "http://allowed.example", own):
        with connect(f"{url}?api_key=key-two", origin=origin, open_timeout=10) as ws:
            ws.send(json.dumps({"model": MODEL, "voice": "nobody"}))  # through: the route itself answers
            assert "unknown voice" in json.loads(ws.recv(timeout=30))["error"]["message"], origin


def test_cors_preflight_answers_only_listed_origins(guarded):
    def preflight(origin):
        return httpx.options(f"{guarded.url}/v1/audio/speech", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})

    allowed = preflight("http://allowed.example")
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://allowed.example"
    assert "access-control-allow-origin" not in preflight("http://elsewhere.example").headers
    response = httpx.post(f"{guarded.url}/v1/audio/speech", json=speech_body(),
                          headers=bearer("key-one") | {"Origin": "http://allowed.example"}, timeout=60)
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "http://allowed.example"


def test_streams_beyond_the_concurrent_limit_get_a_429_at_once(guarded):
    body = speech_body(max_tokens=700, ignore_eos=True)  # 8 s of audio, held open while the client reads slowly
    with httpx.stream("POST", f"{guarded.url}/v1/audio/speech", json=body, headers=bearer("key-one"),
                      timeout=60) as first:
        assert first.status_code == 200
        started = time.monotonic()
        second = httpx.post(f"{guarded.url}/v1/audio/speech", json=speech_body(), headers=bearer("key-two"),
                            timeout=60)
        assert time.monotonic() - started < 2
        assert second.status_code == 429 and "at most 1 streams at once" in second.json()["error"]["message"]
        assert int(second.headers["retry-after"]) >= 1
        first.read()
    assert httpx.post(f"{guarded.url}/v1/audio/speech", json=speech_body(), headers=bearer("key-two"),
                      timeout=60).status_code == 200


def pcm_of(server, voice: str, headers: dict | None = None) -> bytes:
    response = httpx.post(f"{server.url}/v1/audio/speech", json=speech_body(voice=voice), headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response.content


def test_an_openai_client_with_its_default_voice_and_model_gets_audio(server, same_audio, speaks_to_openai_defaults):
    import openai

    speaks_to_openai_defaults(server)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input="Keys for everyone.",
                                                            response_format="pcm",
                                                            extra_body={"seed": 1, "max_tokens": 70}) as response:
        alloy = response.read()
    assert same_audio(alloy, pcm_of(server, "tara"))  # OpenAI's first voice is the model's first
    assert not same_audio(alloy, pcm_of(server, "leo"))
    assert same_audio(pcm_of(server, "Echo"), pcm_of(server, "dan"))  # the 5th is the 5th, whatever the case
    assert same_audio(pcm_of(server, "verse"), pcm_of(server, "jess"))  # the 11th of 13 wraps round the 8: the 3rd
    listed = httpx.get(f"{server.url}/v1/audio/voices").json()
    assert listed["aliases"]["alloy"] == "tara" and listed["aliases"]["ash"] == "leah" and len(listed["aliases"]) == 13


def test_configured_aliases_override_the_default_table(guarded, same_audio):
    key = bearer("key-one")
    assert same_audio(pcm_of(guarded, "alloy", key), pcm_of(guarded, "leo", key))
    assert same_audio(pcm_of(guarded, "narrator", key), pcm_of(guarded, "zoe", key))
    assert same_audio(pcm_of(guarded, "ash", key), pcm_of(guarded, "leah", key))  # the rest of the table stays
    aliases = httpx.get(f"{guarded.url}/v1/audio/voices", headers=key).json()["aliases"]
    assert aliases["alloy"] == "leo" and aliases["narrator"] == "zoe"


def test_telephony_and_browser_rates(server):
    import wave
    from io import BytesIO

    native = pcm_of(server, "tara")
    for rate in (8000, 16000, 22050, 44100, 48000):
        body = speech_body(sample_rate=rate, response_format="wav")
        response = httpx.post(f"{server.url}/v1/audio/speech", json=body, timeout=60)
        with wave.open(BytesIO(response.content)) as wav:
            assert wav.getframerate() == rate
        num_frames = (len(response.content) - 44) // 2  # a streamed WAV leaves its length open
        assert abs(num_frames * 24000 / rate - len(native) // 2) < 0.002 * 24000, rate  # as long as the native
    for fmt in ("mulaw", "alaw"):
        response = httpx.post(f"{server.url}/v1/audio/speech", json=speech_body(response_format=fmt), timeout=60)
        assert response.status_code == 200 and abs(len(response.content) - len(native) // 2 // 3) <= 16
        assert response.headers["content-type"].startswith({"mulaw": "audio/basic", "alaw": "audio/x-alaw"}[fmt])
    for body, says in (({"response_format": "mulaw", "sample_rate": 16000}, "mulaw is 8 kHz telephony audio"),
                       ({"sample_rate": 11025}, "sample_rate 11025 is not offered; choose one of: 8000, 16000")):
        response = httpx.post(f"{server.url}/v1/audio/speech", json=speech_body(**body), timeout=60)
        assert response.status_code == 400 and says in response.json()["error"]["message"], response.text
    assert httpx.post(f"{server.url}/v1/audio/speech", json=speech_body(sample_rate="16000")).status_code == 422


@pytest.fixture(scope="module")
def restartable(start_server):
    # 1024 KV positions (about 12 s of audio); requests must arrive within 3 s, with no pause over 1.5 s
    return start_server("--num-blocks", "64", "--read-timeout-s", "3", "--read-idle-timeout-s", "1.5")


@pytest.mark.parametrize("first, trickle", [
    (b"", b""),  # connects, sends nothing
    (b"POST /v1/audio/speech HTTP/1.1\r\nHost: a\r\n", b"X-Slow: a\r\n"),  # slowloris: a header line a second
    (b"POST /v1/audio/speech HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 900\r\n\r\n"
     b'{"model": "tiny-orpheus", "input": "', b"a"),  # a body that never completes, a byte a second
    (b"POST /v1/audio/speech HTTP/1.1\r\nHost: a\r\nContent-Length: 900\r\n\r\n{", b""),  # a body that stops
])
def test_half_sent_requests_are_closed_with_a_408(restartable, first, trickle):
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(restartable.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(first)
        opened, answer = time.monotonic(), b""
        sock.settimeout(1.0)
        while time.monotonic() - opened < 15:
            try:
                data = sock.recv(4096)
            except TimeoutError:
                if trickle:
                    try:
                        sock.sendall(trickle)
                    except OSError:
                        break
                continue
            except OSError:
                break
            if not data:
                break
            answer += data
        closed_s = time.monotonic() - opened
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive in time" in answer, answer[:200]
    assert closed_s <= (4.5 if trickle else 3.0), closed_s  # 3 s in all, or 1.5 s of silence
    assert httpx.get(f"{restartable.url}/health").status_code == 200


def test_a_response_cut_short_says_why(restartable):
    server = restartable

    def done(max_tokens):
        body = speech_body(max_tokens=max_tokens, ignore_eos=True, stream_format="sse")
        with httpx.stream("POST", f"{server.url}/v1/audio/speech", json=body, timeout=120) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
        return events[-1]

    assert done(70)["finish_reason"] == "length"
    cut = done(2000)  # more than the KV cache holds
    assert cut["type"] == "speech.audio.done" and cut["finish_reason"] == "capacity"
    assert cut["usage"]["output_tokens"] < 1024
    whole = httpx.post(f"{server.url}/generate", data={"text": "Keys for everyone.", "max_tokens": "70",
                                                       "ignore_eos": "true", "streaming": "false"}, timeout=60)
    assert whole.status_code == 200 and whole.headers["x-finish-reason"] == "length"


def test_a_hung_engine_fails_its_streams_within_seconds_and_is_replaced(restartable):
    import os
    import signal

    server = restartable
    old_pid = server.ready()["engine_pid"]
    body = speech_body(max_tokens=2800, ignore_eos=True, stream_format="sse")  # 33 s of audio
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # audio is flowing
        os.kill(old_pid, signal.SIGSTOP)  # hung: alive, silent
        stopped = time.monotonic()
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    noticed_s = time.monotonic() - stopped
    assert events[-1]["type"] == "error" and "the engine stopped" in events[-1]["error"]["message"]
    assert 4 <= noticed_s <= 8, noticed_s  # the 5 s hang timeout, not the stream's 33 s
    assert httpx.get(f"{server.url}/ready").status_code == 503
    body = server.wait_ready(timeout_s=120)
    assert body["engine_pid"] != old_pid and body["restarts"] == 1
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)  # the hung process is gone, not left stopped
    assert len(pcm_of(server, "tara")) > 0


@pytest.fixture(scope="module")
def csm_dir(tmp_path_factory):
    from streamvox.models.tiny import csm

    return csm.write_tiny(tmp_path_factory.mktemp("tiny-csm"), seed=0)


def test_a_stored_voice_speaks_like_its_clip_survives_a_restart_and_can_be_deleted(csm_dir, start_server,
                                                                                   tmp_path_factory, server,
                                                                                   same_audio, noise_wav):
    import base64

    data = tmp_path_factory.mktemp("data")
    first = start_server("--data-dir", str(data), model_dir=csm_dir, name="tiny-csm")
    url = f"{first.url}/v1/audio/voices"
    clip, words = noise_wav(1.2), "Some words of mine."
    stored = httpx.post(url, data={"name": "narrator", "text": words}, files={"audio": ("me.wav", clip)}, timeout=60)
    assert stored.status_code == 201 and stored.json() == {"name": "narrator", "duration_s": 1.2}
    assert httpx.get(url).json()["stored"] == ["narrator"]

    def speak(srv, **fields):
        body = {"model": "tiny-csm", "input": "Say it in this voice.", "response_format": "pcm", "seed": 4,
                "max_tokens": 6, **fields}
        response = httpx.post(f"{srv.url}/v1/audio/speech", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.content

    cloned = speak(first, reference_audio=base64.b64encode(clip).decode(), reference_text=words)
    assert same_audio(speak(first, voice="narrator"), cloned) and same_audio(speak(first, voice="NARRATOR"), cloned)
    assert not same_audio(speak(first), cloned)
    generated = httpx.post(f"{first.url}/generate", data={"text": "Say it in this voice.", "seed": "4",
                                                          "max_tokens": "6", "speaker": "narrator",
                                                          "streaming": "false"}, timeout=120)
    assert same_audio(generated.content[44:], cloned)

    refusals = [
        ({"name": "narrator", "text": words}, clip, 409, "is taken"),
        ({"name": "0", "text": words}, clip, 409, "is taken"),  # a built-in voice of the model
        ({"name": "alloy", "text": words}, clip, 409, "is taken"),  # an OpenAI alias
        ({"name": "../up", "text": words}, clip, 400, "name must be"),
        ({"name": "long", "text": words}, noise_wav(31), 400, "longer than 30 s"),
        ({"name": "junk", "text": words}, b"RIFF" * 10, 400, "could not be decoded"),
        ({"name": "mute", "text": " "}, clip, 400, "the transcript of what is said"),
    ]
    for form, audio, status, says in refusals:
        response = httpx.post(url, data=form, files={"audio": ("a.wav", audio)}, timeout=60)
        assert response.status_code == status and says in response.json()["error"]["message"], (form, response.text)
    assert httpx.post(url, data={"name": "x"}, files={"audio": ("a.wav", clip)}).status_code == 422  # no text
    assert httpx.get(url).json()["stored"] == ["narrator"]
    assert httpx.post(f"{server.url}/v1/audio/voices", data={"name": "x", "text": words},
                      files={"audio": ("a.wav", clip)}).status_code == 400  # Orpheus takes no reference audio

    first.process.terminate()
    first.process.wait(timeout=30)
    second = start_server("--data-dir", str(data), model_dir=csm_dir, name="tiny-csm")
    assert httpx.get(f"{second.url}/v1/audio/voices").json()["stored"] == ["narrator"]
    assert same_audio(speak(second, voice="narrator"), cloned)
    assert httpx.delete(f"{second.url}/v1/audio/voices/narrator").json() == {"deleted": "narrator"}
    assert httpx.delete(f"{second.url}/v1/audio/voices/narrator").status_code == 404
    body = {"model": "tiny-csm", "input": "Hi.", "voice": "narrator"}
    assert httpx.post(f"{second.url}/v1/audio/speech", json=body).status_code == 400
    assert not list(data.glob("voices/*/*")), "its files are gone"
