"""The Python API: what a caller can get wrong gets a clear error and disturbs no other request."""

import pytest

from streamvox.config import SamplingParams
from streamvox.models.orpheus import OrpheusFrameBuilder, OrpheusTokenIds
from streamvox.models.tiny.orpheus import TINY_TEXT_VOCAB


def test_frames_follow_the_publishers_unpacking():
    ids = OrpheusTokenIds()  # the publisher's layout: audio token = 128266 + position * 4096 + code
    codes = [11, 22, 33, 44, 55, 66, 77]
    tokens = [ids.audio_offset + k * 4096 + c for k, c in enumerate(codes)]
    # the publisher's decoder: level 1 <- positions 0; level 2 <- 1, 4; level 3 <- 2, 3, 5, 6
    level_1 = [tokens[0] - ids.audio_offset]
    level_2 = [tokens[1] - ids.audio_offset - 4096, tokens[4] - ids.audio_offset - 4 * 4096]
    level_3 = [tokens[k] - ids.audio_offset - k * 4096 for k in (2, 3, 5, 6)]
    builder = OrpheusFrameBuilder(ids)
    frames = [builder.push(t) for t in [ids.start_of_speech, *tokens]]
    assert frames[:-1] == [None] * 7  # a non-audio token is skipped, 6 codes do not make a frame
    assert frames[-1] == tuple(level_1 + level_2 + level_3)


@pytest.mark.parametrize("bad, field", [
    (dict(top_k=2**63), "top_k"), (dict(seed=1.5), "seed"), (dict(repetition_window=2.5), "repetition_window"),
    (dict(temperature=float("nan")), "temperature"), (dict(max_tokens=True), "max_tokens"),
])
def test_bad_sampling_is_rejected_at_submit_and_others_are_unharmed(make_engine, bad, field):
    engine = make_engine()
    healthy = engine.submit("healthy", None, SamplingParams(temperature=0.0, max_tokens=14, seed=1))
    with pytest.raises(ValueError, match=field):
        engine.submit("bad", None, SamplingParams(**{"max_tokens": 14, "seed": 2, **bad}))
    result = engine.result(healthy)
    assert len(result.step_tokens) == 14 and engine.pool.is_full


def test_request_ids_never_collide(make_engine):
    engine = make_engine()
    mine = engine.submit("mine", None, SamplingParams(max_tokens=7, seed=1), request_id="req-1")
    others = [engine.submit("other", None, SamplingParams(max_tokens=21, seed=2)) for _ in range(3)]
    with pytest.raises(ValueError, match="still in use"):
        engine.submit("again", None, SamplingParams(max_tokens=7), request_id="req-1")
    while engine.has_unfinished():
        engine.step()
    with pytest.raises(ValueError, match="still in use"):  # finished but not consumed yet
        engine.submit("again", None, SamplingParams(max_tokens=7), request_id="req-1")
    assert len(engine.result(mine).step_tokens) == 7
    assert all(len(engine.result(o).step_tokens) == 21 for o in others)


def test_unknown_ids_raise_and_cancel_releases_unconsumed_output(make_engine):
    engine = make_engine()
    with pytest.raises(KeyError, match="no-such-id"):
        list(engine.stream("no-such-id"))
    done = engine.submit("finished, never read", None, SamplingParams(max_tokens=7, seed=1))
    while engine.has_unfinished():
        engine.step()
    assert engine.cancel(done)  # the caller gives up on it: nothing is kept
    assert not engine._outputs and not engine.cancel(done)


def test_text_that_spells_a_control_token_stays_text(tiny_model):
    ids = tiny_model.ids
    prompt = tiny_model.prepare("hello <custom_token_2><custom_token_5>", None)
    bos, *body = prompt[1:-4]  # between start_of_human and the four closing control tokens
    assert bos == TINY_TEXT_VOCAB  # <|begin_of_text|>
    assert not {ids.end_of_speech, ids.start_of_ai} & set(body)
    assert body and all(token < TINY_TEXT_VOCAB for token in body)  # only text tokens


def test_empty_text_is_rejected(make_engine):
    with pytest.raises(ValueError, match="empty"):
        make_engine().submit("   ")
