"""CosyVoice2 (streamvox.models.cosyvoice2) against the publisher's code, cosyvoice-minicpmo 0.1.0 (test-only), on the
tiny checkpoint `make-tiny cosyvoice2` writes, loaded by each side its own way (tests/models/cosyvoice_reference.py
says how the reference is imported and loaded, and what is stood in for).

Greedy decoding on the reference: Qwen2LM.inference with its sampling swapped for argmax. Its incremental decode
(`Qwen2Encoder.forward_one_step`) passes a 2-D attention mask covering only the new positions. transformers before
its 4.53 masking rewrite dropped such an all-ones mask (`_ignore_causal_mask_sdpa`), so every cached position was
attended; 4.57 (ours) pads it with zeros over the cache, so each decode step attends to the first position only
and the reference repeats one token. The reference's decode is therefore given a mask that spans cache + new
positions (the older result); see `full_attention_decode`.

The engines here give the codec one hop (25 frames) per request and call, so their streamed chunks are the
publisher's one for one; with the family's own codec budget a chunk may cover several hops, which decode_chunks
splits into the publisher's hops (checked below), so the PCM is the same either way.
"""

from __future__ import annotations

import functools
import math
import re

import numpy as np
import pytest
import torch

from streamvox.batch import NewRequest, ScheduledRow, StepBatch
from streamvox.config import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig
from streamvox.engine.local import Engine
from streamvox.engine.requests import codec_seed_for
from streamvox.models.base import ChunkJob, Reference
from streamvox.models.cosyvoice2 import CosyConditioning, CosyVoice2Model, read_hyperparameters
from streamvox.models.tiny.cosyvoice2 import write_tiny
from tests.models.cosyvoice_reference import (
    frontend_model_input,
    greedy_inference,
    import_reference,
    load_reference,
    official_frontend_module,
    speechlike,
    stream_schedule,
    stream_token2wav,
)

TEXT = "Hello there, parity check."
TRANSCRIPT = "A short clip of speech."
SPEECH_VOCAB = 6561  # speech tokens [0, 6561), 6561 the end, 6562 and 6563 fillers the head never draws here
STEPS = 30
LOGITS_TOL = 1e-4  # max |ours - reference| / max |reference|
# ||ours - reference|| / ||reference||. The tiny HiFT turns float32 rounding in the mel into much larger PCM
# differences (its F0-driven source: mel noise of 1e-6 moves the PCM by ~6e-5 of its norm); measured up to 6.1e-5.
AUDIO_TOL = 2e-4
BATCH_TOL = 2e-4  # the flow's padded batch moves the mel by ~2e-6 (rounding), the PCM by up to ~5e-5 of its norm
SAMPLES_PER_TOKEN = 960

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # the reference packages' own deprecations
    pytest.mark.filterwarnings("ignore:`torch.cuda.amp.autocast:FutureWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`LoRACompatibleLinear` is deprecated:FutureWarning"),
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("tiny-cosyvoice2"), seed=0)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return CosyVoice2Model.load(tiny_dir, None, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def ref_modules():
    return import_reference()


@pytest.fixture(scope="module")
def reference(ref_modules, tiny_dir):
    loaded = load_reference(ref_modules, tiny_dir)
    full_attention_decode(loaded.llm)
    return loaded


def full_attention_decode(llm) -> None:
    """Make the reference's forward_one_step attend every cached position, as it did under older transformers
    (see the module doc): the mask it slices (`masks[:, -1, :]`) is given the length cache + new positions."""
    encoder = llm.llm
    forward_one_step = type(encoder).forward_one_step.__get__(encoder)

    def attend_all(xs, masks, cache=None):
        past = 0 if cache is None else cache.get_seq_length()
        return forward_one_step(xs, torch.ones(1, 1, past + xs.shape[1], dtype=torch.bool), cache)

    encoder.forward_one_step = attend_all


@pytest.fixture(scope="module")
def clip():
    return Reference(TRANSCRIPT, speechlike(1.5, 24000, seed=0))  # 1.5 s: 37 prompt tokens, so a padded 1st chunk


def one_hop_codec_budget(model) -> int:
    """The max_codec_frames under which one codec call takes 25 frames (one hop) at most."""
    budgets = [m for m in range(1, 200) if int(m / model.codec_cost_per_frame) == 25]
    assert budgets, f"no codec budget gives 25 frames a call at a cost of {model.codec_cost_per_frame} a frame"
    return budgets[0]


@pytest.fixture
def make_engine(model):
    """make_engine(**scheduler options) -> an fcfs Engine whose codec takes one hop per request and call."""
    engines = []

    def make(**options):
        scheduler = SchedulerConfig(policy="fcfs", max_codec_frames=one_hop_codec_budget(model), **options)
        engines.append(Engine(model, EngineConfig(cache=CacheConfig(block_size=16, num_blocks=128),
                                                  scheduler=scheduler)))
        assert engines[-1].codec.max_frames == 25
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


def greedy(num_steps: int, seed: int = 0) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=num_steps, seed=seed, ignore_eos=True)


def submit(engine, text: str, voice: str | None, sampling: SamplingParams, reference: Reference | None = None,
           **extra):
    """engine.submit, with reference audio and prepare_request's `extra` arguments (instructions, options) when
    given (Engine.submit takes none of them: prepare_request gets them here)."""
    if reference is None and not extra:
        return engine.submit(text, voice, sampling)
    model = engine.model
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model, "prepare_request", functools.partial(type(model).prepare_request, model,
                                                               reference=reference, **extra))
        return engine.submit(text, voice, sampling)


def conditioning_of(model, kind: str, clip: Reference) -> CosyConditioning:
    if kind == "clone":
        return model.prepare_request(TEXT, None, clip).conditioning
    return model.prepare_request(TEXT, "tiny_a" if kind == "voice" else None).conditioning


def decompose(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """Our prompt as the reference builds its LM input: (text ids between the start and task markers, speech
    tokens after the task marker)."""
    start, task = model.backbone.text_vocab, model.backbone.text_vocab + 1
    assert prompt[0] == start and prompt.count(task) == 1 and prompt.count(start) == 1
    split = prompt.index(task)
    speech = torch.tensor(prompt[split + 1 :], dtype=torch.int64) - (start + 2)
    assert all(0 <= i < start for i in prompt[1:split]) and bool((speech >= 0).all())
    return prompt[1:split], speech


def rel_norm(ours, expected) -> float:
    ours, expected = torch.as_tensor(ours), torch.as_tensor(expected)
    assert ours.shape == expected.shape, (ours.shape, expected.shape)
    return ((ours - expected).norm() / expected.norm()).item()


def speech_only(tokens) -> list[int]:
    """Step tokens -> frames: the end token (drawn past the end under ignore_eos) makes no frame."""
    return [t for t in tokens if t < SPEECH_VOCAB]


# -- 1. loading ----------------------------------------------------------------------------------------------------


def test_tiny_layout_loads_in_the_publishers_loader(reference, ref_modules, tiny_dir, model):
    """hyperpyyaml builds the publisher's classes from cosyvoice2.yaml and llm.pt, flow.pt and hift.pt load into
    them strictly (the fixture); only the encoder's two layers whose width the publisher hard-codes misfit."""
    from safetensors.torch import load_file

    llm_module, model_module = ref_modules.llm, ref_modules.model
    assert type(reference.llm) is llm_module.Qwen2LM and type(reference.llm.llm) is llm_module.Qwen2Encoder
    assert type(reference.flow).__name__ == "CausalMaskedDiffWithXvec"
    assert type(reference.hift).__name__ == "HiFTGenerator"
    assert isinstance(reference.model, model_module.CosyVoice2Model)
    assert reference.llm.sampling.func is ref_modules.common.ras_sampling
    assert reference.llm.sampling.keywords == {"top_p": 0.8, "top_k": 25, "win_size": 10, "tau_r": 0.1}
    assert reference.flow_misfits and all(
        key.startswith(("encoder.pre_lookahead_layer.", "encoder.up_layer.")) for key in reference.flow_misfits)
    # the Qwen2 body in CosyVoice-BlankEN/ is llm.pt's (its tied head included)
    blank = load_file(tiny_dir / "CosyVoice-BlankEN" / "model.safetensors")
    llm_pt = torch.load(tiny_dir / "llm.pt", weights_only=True)
    assert {"llm.model." + k for k in blank} | {"llm.model.lm_head.weight"} == {k for k in llm_pt
                                                                                if k.startswith("llm.model.")}
    assert all(torch.equal(blank[k], llm_pt["llm.model." + k]) for k in blank)
    # what both sides read from the yaml
    params = read_hyperparameters(tiny_dir / "cosyvoice2.yaml")
    assert params["llm"]["speech_token_size"] == reference.llm.speech_token_size == model.speech_vocab
    assert reference.flow.pre_lookahead_len == model.flow.pre_lookahead_len == model.chunking.lookahead_frames
    assert reference.flow.token_mel_ratio == model.flow.token_mel_ratio == 2
    assert reference.model.token_hop_len == model.chunking.frames_per_chunk == model.chunking.first_chunk_frames
    assert reference.hift.sampling_rate == model.timing.sample_rate == 24000
    assert reference.hift.sampling_rate // reference.flow.input_frame_rate == model.timing.samples_per_frame
    # the same tensors on both sides
    assert torch.equal(reference.llm.llm_decoder.weight, model.backbone.llm_decoder.weight)
    assert torch.equal(reference.llm.speech_embedding.weight, model.backbone.speech_embedding.weight)
    assert torch.equal(reference.llm.llm_embedding.weight, model.backbone.llm_embedding.weight)


# -- 2. prompt and LM logits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [TEXT, "Numbers 1234 and 56, mixed: CASE, spaces  and\nlines!",
                                  "Café naïve – déjà vu…"])
def test_text_ids_are_the_publishers_tokenizer(model, reference, text):
    ids, speech = decompose(model, model.prepare_request(text, None).prompt)
    assert ids == reference.tokenizer.encode(text) and speech.numel() == 0
    assert model.prepare_request(text, "tiny_b").prompt == model.prepare_request(text, None).prompt


@pytest.mark.parametrize("kind", ["plain", "clone"])
def test_lm_logits_match_the_reference(model, reference, clip, make_engine, kind):
    """Scores of the reference's llm_decoder, seen while Qwen2LM.inference runs on the ids our prompt holds, equal
    ours at the prefill's last position and at the decode step after the first token."""
    prepared = model.prepare_request(TEXT, None, clip if kind == "clone" else None)
    prompt = prepared.prompt
    text_ids, speech = decompose(model, prompt)
    prompt_text = reference.tokenizer.encode(TRANSCRIPT) if kind == "clone" else []
    assert text_ids == prompt_text + reference.tokenizer.encode(TEXT)
    assert torch.equal(speech, prepared.conditioning.prompt_tokens)
    assert (speech.numel() > 0) == (kind == "clone")
    tokens, expected = greedy_inference(reference.llm, reference.tokenizer.encode(TEXT), prompt_text, speech, 2)
    assert len(tokens) == len(expected) == 2 and expected[0].shape == (SPEECH_VOCAB + 3,)

    engine = make_engine()
    runner, pool = engine.lm_runner, engine.pool
    blocks = tuple(pool.allocate(pool.blocks_for(len(prompt) + 2)))
    runner.execute(StepBatch((NewRequest("p", tuple(prompt), greedy(4), 0),), (), ()))
    with torch.inference_mode():
        prefill = runner.logits(ScheduledRow("p", 0, len(prompt), blocks, True))[-1]
        runner.requests["p"].unfed.append(tokens[0])
        runner.requests["p"].feed(model)
        decode = runner.logits(ScheduledRow("p", len(prompt), 1, blocks, True))[-1]
    for ours, ref in zip((prefill, decode), expected, strict=True):
        assert ours.shape == (SPEECH_VOCAB + 1,)  # speech tokens and the end; the fillers are never drawn
        ref = ref[: SPEECH_VOCAB + 1]
        assert ref.std() > 0.1
        assert ((ours - ref).abs().max() / ref.abs().max()).item() <= LOGITS_TOL
    assert int(prefill.argmax()) == tokens[0] and int(decode.argmax()) == tokens[1]


# -- 3. greedy speech tokens ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "voice", "clone"])
def test_greedy_speech_tokens_match_the_reference(model, reference, clip, make_engine, kind):
    """Qwen2LM.inference, argmax in place of its sampling, against our engine's greedy steps (ignore_eos)."""
    reference_audio = clip if kind == "clone" else None
    prepared = model.prepare_request(TEXT, "tiny_a" if kind == "voice" else None, reference_audio)
    _, speech = decompose(model, prepared.prompt)
    prompt_text = reference.tokenizer.encode(TRANSCRIPT) if kind == "clone" else []
    expected, _ = greedy_inference(reference.llm, reference.tokenizer.encode(TEXT), prompt_text, speech, STEPS)
    engine = make_engine()
    ours = list(engine.result(submit(engine, TEXT, "tiny_a" if kind == "voice" else None, greedy(STEPS),
                                     reference_audio)).step_tokens)
    assert len(ours) == STEPS and len(expected) >= 10
    assert ours[: len(expected)] == expected
    if len(expected) < STEPS:  # the reference drew the end there (and stopped); ours, ignoring it, drew it too
        assert ours[len(expected)] == SPEECH_VOCAB


# -- 4. streamed audio ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def greedy_tokens(model):
    """Our greedy speech tokens for TEXT without a clip: {steps: tokens} for 45, 60 and 80 steps."""
    engine = Engine(model, EngineConfig(cache=CacheConfig(num_blocks=128), scheduler=SchedulerConfig(policy="fcfs")))
    try:
        return {num: speech_only(engine.result(engine.submit(TEXT, None, greedy(num))).step_tokens)
                for num in (45, 60, 80)}
    finally:
        engine.close()


def decode_in_chunks(model, tokens, conditioning, seed, schedule):
    """Our decode_chunks, one call per chunk of `schedule` [(start, end, is_last)], every known frame given."""
    state = model.new_codec_state(conditioning, seed)
    frames = torch.tensor(tokens, dtype=torch.int64)[:, None]
    return [model.decode_chunks([ChunkJob(frames, start, end, is_last, seed, state)])[0]
            for start, end, is_last in schedule]


@pytest.mark.parametrize("kind", ["plain", "voice", "clone"])
def test_streamed_audio_matches_the_publishers_token2wav_loop(model, reference, tiny_dir, clip, make_engine, kind):
    """The publisher's tts(stream=True) token2wav loop (hop 25 plus the prompt's pad first, lookahead 3, the
    last call finalizing) on a fixed token sequence (what our engine speaks greedily for the request), against our
    decode_chunks on the same chunks and against what our engine streams for that request. The reference's
    conditioning comes from the sources the publisher's frontend reads: spk2info.pt's embedding for a stored
    speaker (frontend_sft), the clip's features for a clone (their parity: tests/codecs/test_cosyvoice_frontend.py),
    a zero x-vector and no prompt for no voice (which the publisher does not have)."""
    voice, reference_audio = ("tiny_a" if kind == "voice" else None), (clip if kind == "clone" else None)
    conditioning = conditioning_of(model, kind, clip)  # ours: what prepare_request makes
    if kind == "voice":
        spk2info = torch.load(tiny_dir / "spk2info.pt", weights_only=True)
        theirs = CosyConditioning(spk2info["tiny_a"]["embedding"].reshape(-1))
    elif kind == "clone":
        features = model.frontend(clip.pcm, 24000)
        theirs = CosyConditioning(features.speaker_embedding, features.prompt_tokens, features.prompt_mel)
    else:
        theirs = CosyConditioning(torch.zeros(192))
    num_steps = 80 if kind == "clone" else 60  # the clone's padded first chunk is 38: three chunks either way
    engine = make_engine()
    tokens = speech_only(engine.result(submit(engine, TEXT, voice, greedy(num_steps, seed=3),
                                              reference_audio)).step_tokens)
    streamed = list(engine.stream(submit(engine, TEXT, voice, greedy(num_steps, seed=3), reference_audio)))
    seed = codec_seed_for(3)  # what the engine seeds the codec of a request of sampling seed 3 with
    state = model.new_codec_state(conditioning, seed)
    assert state.vocoder.generator.initial_seed() == seed  # the contract: torch.manual_seed(seed) on the reference
    expected = stream_token2wav(reference.model, tokens, theirs.prompt_tokens, theirs.prompt_mel,
                                theirs.speaker_embedding, seed)
    schedule = stream_schedule(len(tokens), theirs.prompt_tokens.numel())
    assert [(start, end) for start, end, _ in expected] == [(start, end) for start, end, _ in schedule]
    assert len(schedule) == 3
    if kind == "clone":
        assert schedule[0][1] == 25 + (-theirs.prompt_tokens.numel()) % 25 != 25

    ours = decode_in_chunks(model, tokens, conditioning, seed, schedule)
    for chunk, (start, end, pcm) in zip(ours, expected, strict=True):
        assert pcm.abs().max() > 1e-3
        assert rel_norm(chunk, pcm) <= AUDIO_TOL, (start, end)
    whole = torch.cat([pcm for _, _, pcm in expected])
    assert whole.shape == (len(tokens) * SAMPLES_PER_TOKEN,)

    assert [(c.start_frame, c.end_frame) for c in streamed] == [(start, end) for start, end, _ in schedule]
    for chunk, mine in zip(streamed, ours, strict=True):
        assert np.abs(chunk.pcm - mine.numpy()).max() <= 1e-6
    assert rel_norm(np.concatenate([c.pcm for c in streamed]), whole) <= AUDIO_TOL


def test_a_tail_shorter_than_hop_plus_lookahead_is_one_final_chunk(model, reference, greedy_tokens, make_engine):
    """52 tokens: the publisher decodes 0..25, then 25..52 as its final chunk (27 < 25 + 3 left)."""
    tokens = greedy_tokens[60][:52]  # 0..25, then 27 tokens: fewer than 25 + 3, so the publisher finalizes them
    schedule = stream_schedule(len(tokens), 0)
    assert [(s, e) for s, e, _ in schedule] == [(0, 25), (25, 52)]
    expected = stream_token2wav(reference.model, tokens, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 80),
                                torch.zeros(192), codec_seed_for(3))
    ours = decode_in_chunks(model, tokens, None, codec_seed_for(3), schedule)
    for chunk, (_, _, pcm) in zip(ours, expected, strict=True):
        assert rel_norm(chunk, pcm) <= AUDIO_TOL  # decode_chunks itself is right on the publisher's chunks
    engine = make_engine()
    streamed = list(engine.stream(engine.submit(TEXT, None, greedy(52, seed=3))))
    assert [(c.start_frame, c.end_frame) for c in streamed] == [(0, 25), (25, 52)]
    assert rel_norm(np.concatenate([c.pcm for c in streamed]), torch.cat([p for _, _, p in expected])) <= AUDIO_TOL


@pytest.mark.parametrize("grouping", [[(0, 25, False), (25, 60, True)], [(0, 50, False), (50, 60, True)],
                                      [(0, 60, True)]])
def test_a_chunk_of_several_hops_decodes_as_the_publishers_hops(model, reference, greedy_tokens, grouping):
    """The engine hands the codec every hop that is ready (up to its budget: 100 frames with the family's cost);
    the PCM must still be the publisher's, which decodes hop by hop."""
    tokens, seed = greedy_tokens[60], codec_seed_for(4)
    expected = stream_token2wav(reference.model, tokens, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 80),
                                torch.zeros(192), seed)
    assert [(s, e) for s, e, _ in expected] == [(0, 25), (25, 50), (50, 60)]
    ours = decode_in_chunks(model, tokens, None, seed, grouping)
    assert sum(len(pcm) for pcm in ours) == len(tokens) * SAMPLES_PER_TOKEN
    assert rel_norm(torch.cat(ours), torch.cat([pcm for _, _, pcm in expected])) <= AUDIO_TOL


# -- 5. batching is invisible --------------------------------------------------------------------------------------


def test_requests_decoded_together_equal_each_alone(model, clip, greedy_tokens):
    """Three requests of different lengths and conditionings (none, a stored speaker, a clip), their chunks in
    shared decode_chunks calls (a last chunk beside others' middle ones), equal each decoded alone."""
    cases = [(None, greedy_tokens[60], 11), (conditioning_of(model, "voice", clip), greedy_tokens[45], 12),
             (conditioning_of(model, "clone", clip), greedy_tokens[80], 13)]
    schedules = [stream_schedule(len(tokens), 0 if cond is None else cond.prompt_tokens.numel())
                 for cond, tokens, _ in cases]
    assert [len(s) for s in schedules] == [3, 2, 3]
    alone = [decode_in_chunks(model, tokens, cond, seed, schedule)
             for (cond, tokens, seed), schedule in zip(cases, schedules, strict=True)]
    states = [model.new_codec_state(cond, seed) for cond, _, seed in cases]
    together = [[] for _ in cases]
    for chunk in range(3):
        rows = [i for i, schedule in enumerate(schedules) if chunk < len(schedule)][::-1 if chunk % 2 else 1]
        jobs = [ChunkJob(torch.tensor(cases[i][1])[:, None], *schedules[i][chunk], cases[i][2], states[i])
                for i in rows]
        for i, pcm in zip(rows, model.decode_chunks(jobs), strict=True):
            together[i].append(pcm)
    for mine, theirs in zip(together, alone, strict=True):
        assert len(mine) == len(theirs)
        for a, b in zip(mine, theirs, strict=True):
            assert rel_norm(a, b) <= BATCH_TOL


def test_engine_batching_is_invisible(make_engine, model, clip):
    """Requests of different texts, voices, a clip, greedy and sampled, joining a running batch under a small
    token budget, speak exactly what each speaks alone. (These engines give the codec one chunk a call, so the
    codec's cross-request batching is the previous test's.)"""
    texts = ["Hi.", "A somewhat longer sentence to make the prompt grow.", "Okay!", "Numbers: one, two, three."]
    voices = [None, "tiny_a", None, "tiny_b"]
    clips = [None, None, clip, None]
    samplings = [greedy(30 + 10 * i, seed=i) if i % 2 else model.default_sampling.replace(
        max_tokens=30 + 10 * i, seed=i, ignore_eos=True) for i in range(4)]
    engine = make_engine(max_num_batched_tokens=24)
    ids = [submit(engine, texts[i], voices[i], samplings[i], clips[i]) for i in range(2)]
    for _ in range(3):
        engine.step()
    ids += [submit(engine, texts[i], voices[i], samplings[i], clips[i]) for i in range(2, 4)]
    batched = [engine.result(i) for i in ids]
    for i, result in enumerate(batched):
        alone_engine = make_engine()
        alone = alone_engine.result(submit(alone_engine, texts[i], voices[i], samplings[i], clips[i]))
        assert result.step_tokens == alone.step_tokens and len(result.step_tokens) == samplings[i].max_tokens
        num_frames = len(speech_only(result.step_tokens))
        assert result.pcm.shape == alone.pcm.shape == (num_frames * SAMPLES_PER_TOKEN,)
        assert rel_norm(result.pcm, alone.pcm) <= BATCH_TOL


# -- 6. cloning from a clip ----------------------------------------------------------------------------------------


def test_a_clip_becomes_prompt_tokens_and_flow_conditioning(model, reference, clip):
    """prepare_request with reference audio: the frontend's prompt tokens follow the task marker, its features
    are the conditioning, the transcript's ids come before the text's, and the first chunk covers the pad."""
    prepared = model.prepare_request(TEXT, None, clip)
    features = model.frontend(clip.pcm, 24000)
    cond = prepared.conditioning
    assert torch.equal(cond.prompt_tokens, features.prompt_tokens)
    assert torch.equal(cond.prompt_mel, features.prompt_mel)
    assert torch.equal(cond.speaker_embedding, features.speaker_embedding)
    num_prompt = cond.prompt_tokens.numel()
    assert num_prompt == 37 and cond.prompt_mel.shape == (2 * num_prompt, 80) and cond.speaker_embedding.shape == (192,)
    assert cond.speaker_embedding.abs().max() > 0 and len(set(cond.prompt_tokens.tolist())) > 5
    start = model.backbone.text_vocab
    assert prepared.prompt == [start, *reference.tokenizer.encode(TRANSCRIPT), *reference.tokenizer.encode(TEXT),
                               start + 1, *(start + 2 + cond.prompt_tokens).tolist()]
    assert prepared.chunking.first_chunk_frames == math.ceil(num_prompt / 25) * 25 - num_prompt + 25
    assert (prepared.chunking.frames_per_chunk, prepared.chunking.lookahead_frames) == (25, 3)
    again = model.prepare_request(TEXT, None, Reference(TRANSCRIPT, clip.pcm.clone()))
    assert again.prompt == prepared.prompt
    for name in ("prompt_tokens", "prompt_mel", "speaker_embedding"):
        assert torch.equal(getattr(again.conditioning, name), getattr(cond, name))
    other = model.prepare_request(TEXT, None, Reference(TRANSCRIPT, speechlike(1.5, 24000, seed=5)))
    assert not torch.equal(other.conditioning.speaker_embedding, cond.speaker_embedding)
    with pytest.raises(ValueError, match="transcript"):
        model.prepare_request(TEXT, None, Reference("  ", clip.pcm))


def test_a_clip_changes_the_audio_and_a_seed_reproduces_it(model, clip, greedy_tokens, make_engine):
    """The same tokens decoded with and without the clip's conditioning differ; the same seed reproduces them
    exactly, another seed moves them (HiFT's source noise); end to end the same holds for the engine."""
    tokens = greedy_tokens[60]
    schedule = stream_schedule(len(tokens), 0)
    cloned = conditioning_of(model, "clone", clip)
    schedule_clone = stream_schedule(len(tokens), cloned.prompt_tokens.numel())
    plain = torch.cat(decode_in_chunks(model, tokens, None, 5, schedule))
    with_clip = torch.cat(decode_in_chunks(model, tokens, cloned, 5, schedule_clone))
    again = torch.cat(decode_in_chunks(model, tokens, cloned, 5, schedule_clone))
    other_seed = torch.cat(decode_in_chunks(model, tokens, cloned, 6, schedule_clone))
    assert plain.shape == with_clip.shape == (len(tokens) * SAMPLES_PER_TOKEN,)
    assert torch.equal(with_clip, again)
    assert rel_norm(plain, with_clip) > 0.1
    assert rel_norm(other_seed, with_clip) > 1e-3
    engine = make_engine()  # end to end: the prompt changes too, so the tokens do
    first = engine.result(submit(engine, TEXT, None, greedy(40, seed=9), clip))
    second = engine.result(submit(engine, TEXT, None, greedy(40, seed=9), clip))
    without = engine.result(submit(engine, TEXT, None, greedy(40, seed=9)))
    assert first.step_tokens == second.step_tokens and np.array_equal(first.pcm, second.pcm)
    assert first.step_tokens != without.step_tokens
    common = min(len(first.pcm), len(without.pcm))  # an end token drawn (and ignored) makes no frame
    assert common >= 30 * SAMPLES_PER_TOKEN and rel_norm(first.pcm[:common], without.pcm[:common]) > 0.1


# -- 7. the publisher's other modes: instruct2 and cross-lingual ----------------------------------------------------

INSTRUCT = "Speak slowly, in a whisper."
MODES = {"instruct2": {"instructions": INSTRUCT}, "cross_lingual": {"options": {"cross_lingual": 1.0}}}


@pytest.fixture(scope="module")
def publisher_frontend():
    with official_frontend_module() as module:
        yield module


@pytest.mark.parametrize("mode", list(MODES))
def test_instruct2_and_cross_lingual_match_the_publisher(model, reference, publisher_frontend, clip, make_engine,
                                                         mode):
    """The publisher's frontend_instruct2 / frontend_cross_lingual (run for real, the clip's features given) against
    our prompt and conditioning; then its LM greedy on those inputs against our engine's tokens, and its streaming
    token2wav loop, whose first chunk is padded by the *flow's* prompt tokens while the LM got none, against what
    our engine streams."""
    features = model.frontend(clip.pcm, 24000)
    theirs = frontend_model_input(publisher_frontend, reference.tokenizer, features, mode, TEXT,
                                  instruct_text=INSTRUCT)
    prepared = model.prepare_request(TEXT, None, clip, **MODES[mode])
    text_ids, speech = decompose(model, prepared.prompt)
    prompt_text = theirs["prompt_text"][0].tolist() if "prompt_text" in theirs else []
    assert "llm_prompt_speech_token" not in theirs and speech.numel() == 0
    assert text_ids == prompt_text + theirs["text"][0].tolist()
    if mode == "instruct2":  # the style prompt, then the publisher's <|endofprompt|> marker
        assert prompt_text[-1] == reference.tokenizer.encode("<|endofprompt|>")[0] and len(prompt_text) > 5
    else:
        assert not prompt_text
    cond = prepared.conditioning
    assert torch.equal(cond.prompt_tokens, theirs["flow_prompt_speech_token"][0].long())
    assert torch.equal(cond.prompt_mel, theirs["prompt_speech_feat"][0])
    assert torch.equal(cond.speaker_embedding, theirs["flow_embedding"][0])
    assert prepared.chunking.first_chunk_frames == 25 + (-cond.prompt_tokens.numel()) % 25 == 38

    engine = make_engine()
    expected, _ = greedy_inference(reference.llm, theirs["text"][0].tolist(), prompt_text, speech, STEPS)
    ours = list(engine.result(submit(engine, TEXT, None, greedy(STEPS), clip, **MODES[mode])).step_tokens)
    assert len(expected) >= 10 and ours[: len(expected)] == expected

    tokens = speech_only(engine.result(submit(engine, TEXT, None, greedy(80, seed=3), clip,
                                              **MODES[mode])).step_tokens)
    streamed = list(engine.stream(submit(engine, TEXT, None, greedy(80, seed=3), clip, **MODES[mode])))
    expected_pcm = stream_token2wav(reference.model, tokens, theirs["flow_prompt_speech_token"][0],
                                    theirs["prompt_speech_feat"][0], theirs["flow_embedding"][0], codec_seed_for(3))
    assert [(c.start_frame, c.end_frame) for c in streamed] == [(start, end) for start, end, _ in expected_pcm]
    assert streamed[0].end_frame == 38
    for chunk, (start, end, pcm) in zip(streamed, expected_pcm, strict=True):
        assert pcm.abs().max() > 1e-3
        assert rel_norm(chunk.pcm, pcm) <= AUDIO_TOL, (start, end)


def test_modes_change_the_speech_and_bad_combinations_say_what_to_change(model, clip, make_engine):
    """Each mode speaks differently from plain cloning (its LM prompt differs), and reproducibly; a style prompt
    also works with a stored voice or none. What cannot be spoken is refused, saying what to change."""
    engine = make_engine()
    runs = {mode: [list(engine.result(submit(engine, TEXT, None, greedy(20, seed=2), clip, **extra)).step_tokens)
                   for _ in range(2)] for mode, extra in {"zero_shot": {}, **MODES}.items()}
    assert all(first == again for first, again in runs.values())
    assert len({tuple(first) for first, _ in runs.values()}) == 3
    styled = model.prepare_request(TEXT, "tiny_a", instructions=INSTRUCT)
    assert torch.equal(styled.conditioning.speaker_embedding, conditioning_of(model, "voice", clip).speaker_embedding)
    assert styled.prompt[: -1] != model.prepare_request(TEXT, "tiny_a").prompt[: -1]
    refusals = {"0 (off) or 1 (on)": dict(reference=clip, options={"cross_lingual": 0.5}),
                "send one": dict(options={"cross_lingual": 1.0}),
                "leave cross_lingual out": dict(reference=clip, options={"cross_lingual": 1.0},
                                                instructions=INSTRUCT)}
    for message, arguments in refusals.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            model.prepare_request(TEXT, None, **arguments)
    # a style prompt or cross_lingual needs no transcript; plain cloning does
    assert model.prepare_request(TEXT, None, Reference("", clip.pcm), instructions=INSTRUCT).prompt
    assert model.prepare_request(TEXT, None, Reference("", clip.pcm), options={"cross_lingual": 1.0}).prompt
