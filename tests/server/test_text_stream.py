"""WS /v1/audio/speech/stream against a real server: text goes in piece by piece, audio comes out as it is made."""

import json
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from streamvox.bench.metrics import StreamTimeline, stalls
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


def _speak(server, start: dict, pieces: list[tuple[str, float]], sizes: list | None = None,
           sent: list | None = None):
    """Send the start message and the pieces (each after a pause); return (audio bytes, arrival times, last
    JSON message); `sizes` gets each audio message's length, `sent` each piece's time. Receiving runs between the
    pieces, so audio made while text is pending is seen arriving."""
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
                    if sizes is not None:
                        sizes.append(len(message))
                else:
                    last = json.loads(message)
                    return True
            return False

        for text, pause in pieces:
            if drain(time.monotonic() + pause):
                break
            ws.send(json.dumps({"text": text, "final": text is pieces[-1][0]}))
            if sent is not None:
                sent.append(time.monotonic() - started)
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
    assert last["type"] == "speech.audio.done" and last["usage"]["output_tokens"] == FRAMES
    assert last["finish_reason"] == "length"
    assert same_audio(audio, qwen_reference(TEXT, 3, FRAMES, "ryan"))
    assert len(audio) == FRAMES * 1920 * 2
    assert arrivals[0] < 1.5, "the first words are heard before the rest of the text is sent"
    assert arrivals[-1] - arrivals[0] > 4.0, "audio kept coming as the text came, across the pauses"


def test_instructions_hold_for_text_that_streams_in(qwen_server, same_audio):
    """A style prompt in the start message steers the request that takes the text piece by piece: its audio is
    what the whole text with the same instructions gives over POST, and not what it gives without them."""
    style = "Speak slowly and warmly."
    pieces = [TEXT[:31], TEXT[31:60], TEXT[60:]]
    start = {"model": "tiny-qwen3-tts", "voice": "Ryan", "response_format": "pcm", "seed": 4, "max_tokens": FRAMES,
             "input": pieces[0], "instructions": style}
    audio, _, last = _speak(qwen_server, start, [(piece, 0.2) for piece in pieces[1:]])
    assert last["type"] == "speech.audio.done", last
    fields = dict(voice="Ryan", seed=4, max_tokens=FRAMES)
    styled, plain = _posted(qwen_server, TEXT, instructions=style, **fields), _posted(qwen_server, TEXT, **fields)
    assert same_audio(audio, styled) and not same_audio(audio, plain)


@pytest.mark.parametrize("start, says, code", [
    ({"model": "nope"}, "unknown model", 400),
    ({"model": "tiny-qwen3-tts", "voice": "nobody"}, "unknown voice", 400),
    ({"model": "tiny-qwen3-tts", "response_format": "ogg"}, "unknown response_format", 400),
    ({"model": "tiny-qwen3-tts", "temperature": -1}, "temperature must be 0 (greedy) or in [0.001, 1000]", 400),
    ({"model": "tiny-qwen3-tts", "speed": 1.5}, "speed and stream_format are not taken", 400),
    ({"model": "tiny-qwen3-tts", "reference_audio": "UklGRg=="}, "store the voice", 400),
    ({"model": "tiny-qwen3-tts", "instructions": "x" * 4097}, "instructions are 4097 characters", 400),
    ({"model": "tiny-qwen3-tts", "colour": "blue"}, "unknown field 'colour'", 422),  # as on POST
])
def test_a_bad_start_is_an_error_message_and_a_1008_close(qwen_server, start, says, code):
    with connect(_ws_url(qwen_server), open_timeout=10) as ws:
        ws.send(json.dumps(start))
        error = json.loads(ws.recv(timeout=10))
        assert error["type"] == "error" and says in error["error"]["message"] and error["error"]["code"] == code
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


def _wait_until_idle(server, within_s: float = 10.0) -> None:
    """The server holds no stream and the engine no request, within `within_s`."""
    deadline = time.monotonic() + within_s
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


@pytest.fixture(scope="module")
def orpheus_server(start_server):
    return start_server()


@pytest.fixture(scope="module")
def csm_server(start_server, tmp_path_factory):
    return start_server(model_dir=csm.write_tiny(tmp_path_factory.mktemp("tiny-csm"), seed=0), name="tiny-csm")


def _posted(server, text: str, **fields) -> bytes:
    body = {"model": server_model(server), "input": text, "response_format": "pcm", **fields}
    response = httpx.post(f"{server.url}/v1/audio/speech", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.content


def server_model(server) -> str:
    return httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]


def test_orpheus_hears_text_word_by_word_sentence_by_sentence_without_a_gap(orpheus_server, same_audio):
    first, second = "The first sentence is here.", "And the second one follows it, to the end."
    words = (first + " " + second).split(" ")
    start = {"model": "tiny-orpheus", "response_format": "pcm", "seed": 5, "max_tokens": 140, "ignore_eos": True}
    sizes, sent = [], []
    pauses = (0.05, 0.1, 0.15)  # a producer writing a word every 50-150 ms
    audio, arrivals, last = _speak(orpheus_server, start, [(w if i == 0 else " " + w, pauses[i % 3])
                                                           for i, w in enumerate(words)], sizes, sent)
    assert last["type"] == "speech.audio.done" and last["usage"]["output_tokens"] == 2 * 140
    expected = _posted(orpheus_server, first, seed=5, max_tokens=140, ignore_eos=True) + \
        _posted(orpheus_server, second, seed=6, max_tokens=140, ignore_eos=True)
    assert same_audio(audio, expected), "each sentence is a request of its own, heard in order"
    durations = [n / 2 / 24000 for n in sizes]
    assert stalls(StreamTimeline(tuple(arrivals), tuple(durations)), 0.2)[0] == 0, "no gap at the join"
    assert arrivals[0] < sent[-1], "the first sentence is heard before the text is all sent"


def test_flush_speaks_what_has_arrived_and_cancel_stops_it_but_keeps_the_session(orpheus_server, same_audio):
    expected = _posted(orpheus_server, "No full stop here yet", seed=9, max_tokens=70, ignore_eos=True)
    with connect(_ws_url(orpheus_server), open_timeout=10, close_timeout=5) as ws:
        ws.send(json.dumps({"model": "tiny-orpheus", "response_format": "pcm", "seed": 9, "max_tokens": 70,
                            "ignore_eos": True, "input": "No full stop here yet"}))
        with pytest.raises(TimeoutError):
            ws.recv(timeout=1.0)  # an open sentence waits for its end
        ws.send(json.dumps({"type": "flush"}))
        flushed, _ = _audio_until(ws, lambda m: len(m[0]) >= len(expected))
        assert same_audio(flushed, expected)

        ws.send(json.dumps({"text": "A long sentence that goes on and on. "}))
        ws.send(json.dumps({"text": "And on, for a long while yet. "}))
        assert isinstance(ws.recv(timeout=30), bytes)  # it is speaking
        cancelled_at = time.monotonic()
        ws.send(json.dumps({"type": "cancel"}))
        _, message = _audio_until(ws, lambda m: m[1] is not None)
        assert message == {"type": "speech.audio.cancelled"} and time.monotonic() - cancelled_at < 1.0
        _wait_until_idle(orpheus_server, within_s=1.0)  # the engine dropped both sentences

        ws.send(json.dumps({"text": "Something else.", "final": True}))
        after, done = _audio_until(ws, lambda m: m[1] is not None)
        assert done["type"] == "speech.audio.done" and len(after) > 0
        assert same_audio(after, _posted(orpheus_server, "Something else.", seed=12, max_tokens=70, ignore_eos=True))


def _audio_until(ws, is_enough) -> tuple[bytes, dict | None]:
    audio, message = b"", None
    while not is_enough((audio, message)):
        received = ws.recv(timeout=30)
        if isinstance(received, bytes):
            audio += received
        else:
            message = json.loads(received)
    return audio, message


def test_csm_keeps_its_context_from_sentence_to_sentence(csm_server, same_audio):
    import base64
    import io
    import wave

    first, second = "First part here.", "Second part there."
    start = {"model": "tiny-csm", "response_format": "pcm", "seed": 7, "max_tokens": 6, "ignore_eos": True}
    audio, _, last = _speak(csm_server, start, [(first + " " + second, 0.0)])
    assert last["type"] == "speech.audio.done"
    one = _posted(csm_server, first, seed=7, max_tokens=6, ignore_eos=True)
    clip = io.BytesIO()
    with wave.open(clip, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(24000)
        wav.writeframes(one)
    two = _posted(csm_server, second, seed=8, max_tokens=6, ignore_eos=True,
                  reference_audio=base64.b64encode(clip.getvalue()).decode(), reference_text=first)
    assert same_audio(audio, one + two), "the second sentence is spoken with the first as its context"
    assert not same_audio(audio[len(one):], _posted(csm_server, second, seed=8, max_tokens=6, ignore_eos=True))


def test_text_is_cut_at_sentence_ends_and_a_long_run_at_its_last_clause_end():
    from streamvox.server.ws_sessions import cut_segments

    assert cut_segments("One. Two! Three") == (["One.", "Two!"], "Three")
    assert cut_segments("Pi is 3.") == ([], "Pi is 3.")  # the next piece may be "14"
    assert cut_segments("Pi is 3.14 and more") == ([], "Pi is 3.14 and more")
    assert cut_segments("Pi is 3.", is_settled=True) == (["Pi is 3."], "")
    assert cut_segments("First line\nsecond") == (["First line"], "second")
    # a full stop after a title, an initial or a dotted short form is not a sentence end
    assert cut_segments("Dr. Smith and J. K. Rowling met. Then") == (["Dr. Smith and J. K. Rowling met."], "Then")
    assert cut_segments("Ask (Mrs. Jones) first. Then") == (["Ask (Mrs. Jones) first."], "Then")
    assert cut_segments("Take e.g. this one. Next") == (["Take e.g. this one."], "Next")
    assert cut_segments("Take e.g. ") == ([], "Take e.g. ")  # the next word says whether a sentence ended
    assert cut_segments("It is 5 p.m. We go. Now") == (["It is 5 p.m.", "We go."], "Now")
    assert cut_segments("Pears, etc. and more. So") == (["Pears, etc. and more."], "So")
    assert cut_segments("Say no. Now") == (["Say no."], "Now")
    assert cut_segments("Option A.\nOption B.\nMore") == (["Option A.", "Option B."], "More")  # lines still cut
    segments, rest = cut_segments("one, two; " * 8 + "three four five")  # 95 + 15 characters: not long yet
    assert segments == [] and len(rest) == 95
    segments, rest = cut_segments("one, two; " * 12 + "three four five")  # long: cut after its last "two; "
    assert segments == ["one, two; " * 11 + "one, two;"] and rest == "three four five"
