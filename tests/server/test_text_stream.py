"""WS /v1/audio/speech/stream against a real server: text goes in piece by piece, audio comes out as it is made."""

import json
import time

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from streamvox.models.tiny import csm, qwen3_tts
from streamvox.runner.weights import load_model

TEXT = "Streaming text arrives in pieces, word by word, while the voice is already speaking it aloud."
FRAMES = 40


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return qwen3_tts.write_tiny(tmp_path_factory.mktemp("tiny-qwen3-tts"), seed=0)


@pytest.fixture(scope="module")
def qwen_server(start_server, qwen_dir):
    return start_server(model_dir=qwen_dir, name="tiny-qwen3-tts")


@pytest.fixture(scope="module")
def qwen_reference(qwen_dir, engine_reference):
    yield from engine_reference(load_model(str(qwen_dir)))


def _ws_url(server) -> str:
    return server.url.replace("http://", "ws://") + "/v1/audio/speech/stream"


def _speak(server, start: dict, pieces: list[tuple[str, float]]):
    """Send the start message and the pieces (each after a pause); return (audio bytes, arrival times, last
    JSON message). Receiving runs between the pieces, so audio made while text is pending is seen arriving."""
    audio, arrivals, last = b"", [], None
    with connect(_ws_url(server), open_timeout=10, close_timeout=5) as ws:
        ws.send(json.dumps(start))
        started = time.monotonic()

        def drain(until: float) -> bool:
            nonlocal audio, last
            while (left := until - time.monotonic()) > 0:
                try:
                    message = ws.recv(timeout=left)
                except TimeoutError:
                    return False
                if isinstance(message, bytes):
                    audio += message
                    arrivals.append(time.monotonic() - started)
                else:
                    last = json.loads(message)
                    return True
            return False

        for text, pause in pieces:
            if drain(time.monotonic() + pause):
                break
            ws.send(json.dumps({"text": text, "final": text is pieces[-1][0]}))
        else:
            drain(time.monotonic() + 120)
    return audio, arrivals, last


def test_text_in_five_pieces_with_long_pauses_speaks_the_whole_texts_audio(qwen_server, qwen_reference,
                                                                           same_audio):
    cuts = [0, 25, 31, 32, 60, len(TEXT)]  # the first piece settles two words; later cuts split words and spaces
    pieces = [TEXT[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    start = {"model": "tiny-qwen3-tts", "voice": "Ryan", "response_format": "pcm", "seed": 3,
             "max_tokens": FRAMES, "input": pieces[0]}
    # each pause is far longer than the audio the pieces so far can make: the stream waits, it does not fail
    audio, arrivals, last = _speak(qwen_server, start, [(piece, 1.5) for piece in pieces[1:]])
    assert last == {"type": "speech.audio.done", "usage": last["usage"]} and last["usage"]["output_tokens"] == FRAMES
    assert same_audio(audio, qwen_reference(TEXT, 3, FRAMES, "ryan"))
    assert len(audio) == FRAMES * 1920 * 2
    assert arrivals[0] < 1.5, "the first words are heard before the rest of the text is sent"
    assert arrivals[-1] - arrivals[0] > 4.0, "audio kept coming as the text came, across the pauses"


@pytest.mark.parametrize("start, says", [
    ({"model": "nope"}, "unknown model"),
    ({"model": "tiny-qwen3-tts", "voice": "nobody"}, "unknown voice"),
    ({"model": "tiny-qwen3-tts", "response_format": "ogg"}, "unknown response_format"),
    ({"model": "tiny-qwen3-tts", "temperature": -1}, "temperature must be 0 (greedy) or in [0.001, 1000]"),
    ({"model": "tiny-qwen3-tts", "colour": "blue"}, "colour"),
])
def test_a_bad_start_is_an_error_message_and_a_1008_close(qwen_server, start, says):
    with connect(_ws_url(qwen_server), open_timeout=10) as ws:
        ws.send(json.dumps(start))
        error = json.loads(ws.recv(timeout=10))
        assert error["type"] == "error" and says in error["error"]["message"] and error["error"]["code"] == 400
    assert ws.close_code == 1008


def test_bad_pieces_and_text_after_the_end_are_refused_and_free_the_request(qwen_server):
    after_the_end = [json.dumps({"text": " more", "final": True}), json.dumps({"text": "too late"})]
    too_long = [json.dumps({"text": "word " * 1000})] * 2  # 10 000 characters in all, over the 4096 limit
    for bad in (["not json"], [json.dumps({"text": 5})], [json.dumps({"words": "x"})], after_the_end, too_long):
        with connect(_ws_url(qwen_server), open_timeout=10) as ws:
            ws.send(json.dumps({"model": "tiny-qwen3-tts", "input": "Hello there my", "max_tokens": 400}))
            try:
                for message in bad:
                    ws.send(message)
            except ConnectionClosed:  # the server may close on the first bad piece before the client sends all
                pass
            texts = [m for m in _until_closed(ws) if isinstance(m, str)]
        error = json.loads(texts[-1])
        assert error["type"] == "error" and error["error"]["code"] == 400 and ws.close_code == 1008, bad
    _wait_until_idle(qwen_server)


def _until_closed(ws) -> list:
    messages = []
    try:
        while True:
            messages.append(ws.recv(timeout=30))
    except ConnectionClosed:
        return messages


def _wait_until_idle(server) -> None:
    """The server holds no stream and the engine no request, within 10 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ready = server.ready()
        if not ready["open_streams"] and not ready["engine"]["num_requests"]:
            return
        time.sleep(0.1)
    raise AssertionError(f"requests left behind: {server.ready()}")


def test_a_client_that_leaves_mid_stream_frees_its_request(qwen_server):
    with connect(_ws_url(qwen_server), open_timeout=10) as ws:
        ws.send(json.dumps({"model": "tiny-qwen3-tts", "input": "Hello there my friend", "max_tokens": 400}))
        assert isinstance(ws.recv(timeout=30), bytes)
    _wait_until_idle(qwen_server)


def test_a_family_that_needs_the_whole_text_says_so(start_server, tmp_path_factory):
    server = start_server(model_dir=csm.write_tiny(tmp_path_factory.mktemp("tiny-csm"), seed=0), name="tiny-csm")
    with connect(_ws_url(server), open_timeout=10) as ws:
        ws.send(json.dumps({"model": "tiny-csm", "input": "Hello"}))
        error = json.loads(ws.recv(timeout=30))
    assert error["error"]["code"] == 400 and "needs the whole text" in error["error"]["message"]
