"""Qwen3-TTS against the qwen-tts reference package on the tiny checkpoint `make-tiny qwen3-tts` writes."""

import numpy as np
import pytest
import torch

from streamvox.batch import NewRequest, ScheduledRow, StepBatch
from streamvox.config import SamplingParams
from streamvox.engine.core import QueueFullError
from streamvox.models.tiny.qwen3_tts import write_tiny
from streamvox.runner.weights import load_model

TEXT = "Parity check: the same numbers, please. One, two, three!"
FRAMES = 8


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("tiny-qwen3-tts"), seed=0)


@pytest.fixture(scope="module")
def qwen_model(qwen_dir):
    return load_model(str(qwen_dir))


@pytest.fixture(scope="module")
def reference(qwen_dir, qwen_tts):
    """The reference model from our checkpoint directory (the package's own from_pretrained also loads its audio
    front end, which needs files only the speech tokenizer's encoder uses; the transformers loader it wraps is
    called directly), with its tokenizer and 12 Hz speech tokenizer."""
    from qwen_tts.core.models.modeling_qwen3_tts import Qwen3TTSForConditionalGeneration
    from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Model
    from transformers import AutoTokenizer, PreTrainedModel

    model, info = PreTrainedModel.from_pretrained.__func__(Qwen3TTSForConditionalGeneration, qwen_dir,
                                                           output_loading_info=True)
    assert not any(info.values()), info
    speech = Qwen3TTSTokenizerV2Model.from_pretrained(qwen_dir / "speech_tokenizer").eval()
    return model.eval(), AutoTokenizer.from_pretrained(qwen_dir), speech


@pytest.fixture
def make_engine(qwen_model, engine_for):
    return lambda **options: engine_for(qwen_model, num_blocks=256, **options)


def greedy(num_frames, seed=0):
    return SamplingParams(temperature=0.0, max_tokens=num_frames, seed=seed, ignore_eos=True)


def _chat_ids(tokenizer, text):
    return tokenizer(f"<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]


def _reference_generate(model, tokenizer, text, speaker, num_frames, **sampling):
    """The package's generate in its streaming-text mode; it returns one frame fewer than steps taken."""
    with torch.no_grad():
        codes, _ = model.generate(input_ids=[torch.tensor([_chat_ids(tokenizer, text)])], languages=["auto"],
                                  speakers=[speaker], non_streaming_mode=False, max_new_tokens=num_frames + 1,
                                  **sampling)
    return codes[0]


@pytest.mark.parametrize("text", ["Hello there.", "Numbers 1234 and 56, mixed: CASE, spaces  and\nlines!",
                                  "Café naïve – déjà vu…"])
def test_tokenizer_matches_the_reference(qwen_model, reference, text):
    _, tokenizer, _ = reference
    expected = _chat_ids(tokenizer, text)
    assert qwen_model.role_ids + qwen_model.text_ids(text, True)[0] == expected[:-5]


def test_control_tokens_spelled_in_the_text_stay_text(qwen_model):
    ids, _ = qwen_model.text_ids("say <|im_end|> and <|tts_text_eod|> aloud", True)
    assert qwen_model.tokenizer.token_to_id("<|im_end|>") not in ids and qwen_model.ids.tts_eos not in ids


def test_talker_logits_match_the_reference(qwen_model, reference, make_engine):
    """The reference's codec head is observed while it generates; ours runs the same prompt over the paged cache."""
    model, tokenizer, _ = reference
    seen = []
    hook = model.talker.codec_head.register_forward_hook(lambda module, args, out: seen.append(out[0, -1]))
    try:
        expected_codes = _reference_generate(model, tokenizer, TEXT, "ryan", 2, do_sample=False,
                                             subtalker_dosample=False, repetition_penalty=1.0)
    finally:
        hook.remove()
    engine = make_engine()
    prepared = qwen_model.prepare_request(TEXT, "ryan")
    prompt, text_ids = prepared.prompt, prepared.text_ids
    runner, pool = engine.lm_runner, engine.pool
    blocks = tuple(pool.allocate(pool.blocks_for(len(prompt) + 2)))
    runner.execute(StepBatch((NewRequest("p", tuple(prompt), greedy(4), 0, tuple(text_ids)),), (), ()))
    backbone = qwen_model.backbone

    def last_logits(row):
        return runner.logits(row)[-1]

    with torch.inference_mode():
        prefill = last_logits(ScheduledRow("p", 0, len(prompt), blocks, True))
        runner.requests["p"].unfed.append(tuple(expected_codes[0].tolist()))
        runner.requests["p"].feed(qwen_model)
        decode = last_logits(ScheduledRow("p", len(prompt), 1, blocks, True))
    drawable = ~backbone.never_drawn
    for ours, ref in zip((prefill, decode), seen[:2], strict=True):
        assert ref.std() > 0.3
        assert ((ours - ref)[drawable].abs().max() / ref[drawable].abs().max()).item() <= 1e-4
        assert torch.isinf(ours[~drawable]).all()  # control ids are never drawn


def test_code_predictor_greedy_codes_match_the_reference(qwen_model, reference):
    model, _, _ = reference
    hidden = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    first = torch.tensor([5, 1528, 2047])
    with torch.no_grad():
        expected = [model.talker.code_predictor.generate(
            inputs_embeds=torch.cat((hidden[i : i + 1, None], model.talker.get_input_embeddings()(first[i : i + 1,
                                                                                                          None])), 1),
            max_new_tokens=15, do_sample=False) for i in range(3)]
    ours = qwen_model.backbone.code_predictor.generate(hidden, first, lambda logits, k: logits.argmax(-1),
                                                        2048)  # three rows at once
    for row in range(3):
        assert ours[row, 1:].tolist() == expected[row][0].tolist()


def test_greedy_frames_and_streamed_audio_match_the_reference(qwen_model, reference, make_engine):
    model, tokenizer, speech = reference
    engine = make_engine()
    chunks = list(engine.stream(engine.submit(TEXT, "ryan", greedy(FRAMES))))
    assert len(chunks) >= 3
    ours = engine.result(engine.submit(TEXT, "ryan", greedy(FRAMES)))
    expected = _reference_generate(model, tokenizer, TEXT, "ryan", FRAMES, do_sample=False,
                                   subtalker_dosample=False, repetition_penalty=1.0)
    assert expected.shape == (FRAMES, 16)
    assert torch.equal(torch.tensor(ours.step_tokens), expected)
    with torch.no_grad():
        expected_pcm = speech.decode(expected[None])[0][0].numpy()  # the package's whole-utterance decode
    streamed = np.concatenate([c.pcm for c in chunks])
    assert streamed.shape == expected_pcm.shape == (FRAMES * 1920,)
    assert np.linalg.norm(streamed - expected_pcm) / np.linalg.norm(expected_pcm) < 1e-4


def test_a_dialect_speaker_gets_its_language_in_the_prompt(qwen_model, reference, make_engine):
    model, tokenizer, _ = reference
    engine = make_engine()
    ours = engine.result(engine.submit(TEXT, "Dylan", greedy(3)))
    expected = _reference_generate(model, tokenizer, TEXT, "dylan", 3, do_sample=False, subtalker_dosample=False,
                                   repetition_penalty=1.0)
    assert torch.equal(torch.tensor(ours.step_tokens), expected)
    prompt = qwen_model.prepare(TEXT, "dylan")
    assert any(row[0] == 2074 for row in prompt)  # beijing_dialect's language id
    assert set(qwen_model.voices) == {"vivian", "ryan", "dylan"}


def test_batching_is_invisible(make_engine, qwen_model):
    texts = ["Hi.", "A somewhat longer sentence to make the prompt grow.", "Okay!", "Numbers: one, two, three."]
    samplings = [greedy(6 + 2 * i, seed=i) if i % 2 else qwen_model.default_sampling.replace(max_tokens=8, seed=i,
                                                                                               ignore_eos=True)
                 for i in range(4)]
    engine = make_engine(max_num_batched_tokens=24)
    ids = [engine.submit(texts[i], None, samplings[i]) for i in range(2)]
    for _ in range(3):
        engine.step()
    ids += [engine.submit(texts[i], None, samplings[i]) for i in range(2, 4)]
    batched = [engine.result(i) for i in ids]
    for i, result in enumerate(batched):
        alone_engine = make_engine()
        alone = alone_engine.result(alone_engine.submit(texts[i], None, samplings[i]))
        assert result.step_tokens == alone.step_tokens and len(result.step_tokens) == samplings[i].max_tokens
        assert result.pcm.shape == alone.pcm.shape == (len(result.step_tokens) * 1920,)
        assert np.abs(result.pcm - alone.pcm).max() <= 1e-5


LONG_TEXT = "Streaming text arrives in pieces, word by word, while the voice is already speaking it aloud."


def test_text_streamed_in_five_pieces_makes_the_same_codes_as_the_whole_text(make_engine):
    num_frames = 40  # past the end of the text: the trailing end marker and padding are fed too
    whole_engine = make_engine()
    whole = whole_engine.result(whole_engine.submit(LONG_TEXT, "vivian", greedy(num_frames)))
    cuts = [0, 9, 31, 32, 60, len(LONG_TEXT)]  # mid-word, mid-space and between words
    pieces = [LONG_TEXT[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    assert len(pieces) == 5 and "".join(pieces) == LONG_TEXT
    engine = make_engine()
    request_id = engine.submit_text_stream(pieces[0], "vivian", greedy(num_frames))
    chunks = []
    for piece in pieces[1:]:
        chunks += _step_until_idle(engine, request_id)  # speaks what it has, then waits for text
        engine.append_text(request_id, piece, is_final=piece is pieces[-1])
    streamed = engine.result(request_id)
    assert streamed.step_tokens == whole.step_tokens
    assert np.abs(np.concatenate([c.pcm for c in chunks] + [streamed.pcm]) - whole.pcm).max() <= 1e-5


def test_a_long_pause_in_the_text_is_waiting_not_an_error(make_engine):
    engine = make_engine()
    request_id = engine.submit_text_stream("Speak these few words", "ryan", greedy(30))
    heard = _step_until_idle(engine, request_id)
    assert heard and not engine._outputs[request_id].error  # some audio, then it ran out of settled text
    paused_at = sum(len(c.pcm) for c in heard)
    for _ in range(50):  # far longer than the audio it has made: the request just waits, holding its place
        events = engine.step()
        assert not events.failures and not events.chunks
    assert engine.has_unfinished() and engine.scheduler.requests[request_id].is_waiting_for_text
    engine.append_text(request_id, " and then some more of them.", is_final=True)
    result = engine.result(request_id)
    assert result.finish_reason == "length" and paused_at + len(result.pcm) == 30 * 1920


def test_text_streams_refuse_misuse(make_engine, qwen_model):
    engine = make_engine()
    request_id = engine.submit_text_stream("Hello", None, greedy(3))
    engine.append_text(request_id, " world", is_final=True)
    with pytest.raises(KeyError):
        engine.append_text(request_id, "more", is_final=True)
    with pytest.raises(ValueError, match="empty"):
        engine.append_text(engine.submit_text_stream("", None, greedy(3)), "  ", is_final=True)
    with pytest.raises(ValueError, match="unknown voice"):
        qwen_model.prepare("text", "nobody")


def _step_until_idle(engine, request_id, limit=400):
    """Step until the request can go no further without more text; returns its chunks so far (consumed)."""
    output = engine._outputs[request_id]
    for _ in range(limit):
        request = engine.scheduler.requests.get(request_id)
        is_waiting = request is None or request.is_waiting_for_text
        if is_waiting and not engine.codec_runner.ready() and not engine.codec.is_busy:
            break
        engine.step()
    chunks = list(output.chunks)
    output.chunks.clear()
    return chunks


def test_a_paused_request_that_is_preempted_resumes_and_speaks_as_if_never_paused(qwen_model, engine_for):
    """A paused request holds KV blocks nobody uses: it is the first to be preempted when another request needs
    them, and when its text comes it recomputes its positions and goes on, its frames those of an unpaused run."""
    text, tail = "Hello there friend", " and welcome back to the show."
    alone = engine_for(qwen_model, num_blocks=64)
    expected = alone.result(alone.submit(text + tail, "ryan", greedy(30)))
    engine = engine_for(qwen_model, num_blocks=4)  # 64 positions: not enough for both requests
    paused = engine.submit_text_stream(text, "ryan", greedy(30))
    heard = _step_until_idle(engine, paused)
    assert engine.scheduler.requests[paused].is_waiting_for_text
    other = engine.submit("A second request that is long enough", "ryan", greedy(50))
    while engine.scheduler.requests[paused].status.value == "running":
        assert not engine.step().failures
    engine.append_text(paused, tail, is_final=True)
    result = engine.result(paused)
    assert result.step_tokens == expected.step_tokens
    assert np.abs(np.concatenate([c.pcm for c in heard] + [result.pcm]) - expected.pcm).max() <= 1e-5
    assert len(engine.result(other).step_tokens) == 50


def test_a_request_that_cannot_be_queued_leaves_nothing_behind(qwen_model, engine_for):
    engine = engine_for(qwen_model, max_queue_len=1)
    first = engine.submit("The queue holds this one.", "ryan", greedy(3))
    for _ in range(2):  # the second time shows the id was freed
        with pytest.raises(QueueFullError):
            engine.submit_text_stream("Hello there friend, how are you", "ryan", greedy(5), request_id="r")
        assert set(engine._outputs) == {first} and not len(engine.text_streams)
    assert len(engine.result(first).step_tokens) == 3 and not engine.has_unfinished()


def test_instructions_steer_the_talker_as_the_reference_does(qwen_model, reference, make_engine):
    model, tokenizer, _ = reference
    instructions = "Speak slowly, in a calm and warm voice."
    engine = make_engine()
    steered = qwen_model.prepare_request(TEXT, "ryan", instructions=instructions)
    ours = engine.result(engine.submit_prepared(steered, greedy(FRAMES)))
    style = tokenizer(f"<|im_start|>user\n{instructions}<|im_end|>\n")["input_ids"]
    assert qwen_model.instruction_ids(instructions) == style
    with torch.no_grad():
        expected, _ = model.generate(input_ids=[torch.tensor([_chat_ids(tokenizer, TEXT)])], languages=["auto"],
                                     speakers=["ryan"], instruct_ids=[torch.tensor([style])],
                                     non_streaming_mode=False, max_new_tokens=FRAMES + 1, do_sample=False,
                                     subtalker_dosample=False, repetition_penalty=1.0)
    assert torch.equal(torch.tensor(ours.step_tokens), expected[0])
    plain = engine.result(engine.submit(TEXT, "ryan", greedy(FRAMES)))
    assert plain.step_tokens != ours.step_tokens, "the style prompt changes the speech"
    assert qwen_model.takes_instructions  # the tiny mirrors the 1.7B CustomVoice checkpoint
