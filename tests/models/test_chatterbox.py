"""Chatterbox (streamvox.models.chatterbox) through our engine against the publisher's code, chatterbox-tts 0.1.7
(test-only: `pip install --no-deps -c constraints.txt chatterbox-tts==0.1.7`), on the tiny checkpoint
`make-tiny chatterbox` writes, loaded by each side its own way (the publisher's: ChatterboxTTS.from_local with
its constructors at the tiny sizes; see tests/models/chatterbox_reference.py for what is stood in for).

What is compared:
- T3: the guided logits our engine mixes from its two backbone rows (cond weight 1 + w, uncond -w) against
  cond + w (cond - uncond) of the publisher's T3 forward, at the prefill's last position and two decode steps;
  and the greedy tokens against T3.inference with its multinomial draw swapped for argmax.
- S3Gen: our whole-utterance decode against the publisher's S3Gen.inference (same x_0 and HiFT noise: the
  publisher draws both from the global RNG, ours from a generator seeded alike); what the engine streams
  (chunks of 25, then 50 tokens, each seeing 3 tokens of lookahead) against the whole-utterance decode with the
  request's own noise (its NoiseTape and HiFT generator).
- Cloning: prepare_request(text, None, Reference) against the publisher's prepare_conditionals. The publisher
  resamples the clip 24 -> 16 kHz for T3 (voice encoder, prompt tokens) with librosa (soxr); ours with a sinc
  resampler. Run with its librosa.resample swapped for our resampler, the publisher's path gives our conditioning
  to float rounding; with librosa itself the difference is measured and bounded. (S3Gen's own 16 kHz copy
  goes through torchaudio's Resample in the publisher's code, stood in for by our resampler: see test_s3gen.)

The engines here decode at most 50 frames a codec call (max_codec_frames 4 at Chatterbox's 0.08 a frame), so a
request's chunks come out as [0, 25), [25, 75), ... whatever the codec thread's timing; with the default budget
(100 frames a call) a codec that falls behind takes [25, 125) as one job, which the family decodes as the plan's
chunks [25, 75) + [75, 125) (ChunkJob.hops), so the audio is the same (test_audio_does_not_depend_on_codec_timing).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamvox.codecs.cosyvoice_frontend import resample
from streamvox.codecs.s3gen import CHUNK_TOKENS, FIRST_CHUNK_TOKENS, SAMPLES_PER_TOKEN
from streamvox.config import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig
from streamvox.engine.local import Engine
from streamvox.engine.requests import codec_seed_for
from streamvox.models.base import ChunkJob, Reference
from streamvox.models.chatterbox import AUDIO_TOKENS, CLIP_CACHE_SIZE
from streamvox.models.tiny.chatterbox import write_tiny
from streamvox.runner.weights import load_model
from tests.codecs.test_s3gen import speechlike
from tests.models import chatterbox_reference as cr

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*sdp_kernel.*:FutureWarning"),  # the publisher's Perceiver
    pytest.mark.filterwarnings("ignore:.*output_attentions.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:`LoRACompatibleLinear` is deprecated:FutureWarning"),
]

TEXT = "Hello world, this is a streaming test."
SHORT = "Short one."
LONG = "A longer sentence, spoken by the built-in voice, with a few more words to say."
TRANSCRIPT = "A clip of the voice to speak in."
LOGIT_TOL = 1e-4  # relative to the largest logit: fp32, different kernels (paged attention vs HF sdpa)
PCM_TOL = 1e-4  # as tests/codecs/test_s3gen.py
CODEC_BUDGET = 4  # max_codec_frames: 50 frames a call (see the module docstring)
GREEDY_STEPS = 30


def greedy(steps: int, seed: int = 0) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=steps, seed=seed, ignore_eos=True, repetition_penalty=1.0)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return ((got - want).abs().max() / want.abs().max()).item()


def rel_rms(got, want) -> float:
    got, want = torch.as_tensor(np.asarray(got)), torch.as_tensor(np.asarray(want))
    assert got.shape == want.shape, (got.shape, want.shape)
    return ((got - want).norm() / want.norm()).item()


# -------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ref():
    return cr.load_reference()


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("chatterbox") / "tiny", seed=3)


@pytest.fixture(scope="module")
def model(checkpoint_dir):
    return load_model(str(checkpoint_dir))


@pytest.fixture(scope="module")
def official(ref, checkpoint_dir):
    """The publisher's ChatterboxTTS from the tiny directory (its from_local)."""
    return cr.from_local(ref, checkpoint_dir)


@pytest.fixture(scope="module")
def clip() -> Reference:
    """6.5 s at 24 kHz: more than the 6 s T3 takes (150 prompt tokens), an odd number of 50 Hz mel frames."""
    return Reference(TRANSCRIPT, speechlike(6.5, 24000, seed=3))


def builtin_conds(ref, checkpoint_dir):
    return ref.Conditionals.load(checkpoint_dir / "conds.pt")


def official_clone(ref, official, pcm: torch.Tensor, path, sinc: bool):
    """The publisher's prepare_conditionals on a WAV of `pcm` -> its Conditionals; `sinc`: its librosa.resample
    swapped for our resampler (so both sides resample alike)."""

    def ours(y, orig_sr, target_sr, **_):
        return resample(torch.from_numpy(y), orig_sr, target_sr).numpy()

    builtin = official.conds
    with pytest.MonkeyPatch.context() as mp:
        if sinc:
            mp.setattr(ref.tts.librosa, "resample", ours)
        official.prepare_conditionals(str(cr.write_clip(path, pcm)), exaggeration=0.5)
    conds, official.conds = official.conds, builtin
    return conds


@pytest.fixture(scope="module")
def clone_conds(ref, official, clip, tmp_path_factory):
    """The publisher's conditioning of the clip, its resampling swapped for ours."""
    return official_clone(ref, official, clip.pcm, tmp_path_factory.mktemp("clip") / "clip.wav", sinc=True)


def engine_config(max_codec_frames: int = CODEC_BUDGET) -> EngineConfig:
    return EngineConfig(cache=CacheConfig(block_size=16, num_blocks=256),
                        scheduler=SchedulerConfig(policy="fcfs", max_codec_frames=max_codec_frames))


@pytest.fixture
def make_engine(model):
    """make_engine() -> an fcfs Engine whose codec takes at most 50 frames a call, closed after the test."""
    engines = []

    def make():
        engines.append(Engine(model, engine_config()))
        assert engines[-1].codec.max_frames == CHUNK_TOKENS
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


def run(engine, prepared, sampling):
    """-> (every step's token, the streamed chunks) of one request."""
    request_id = engine.submit_prepared(prepared, sampling)
    output = engine._outputs[request_id]  # its tokens, kept while the stream is read
    chunks = list(engine.stream(request_id))
    return list(output.step_tokens), chunks


def pcm_of(chunks) -> np.ndarray:
    return np.concatenate([chunk.pcm for chunk in chunks])


def audio_tokens(tokens) -> list[int]:
    return [t for t in tokens if t < AUDIO_TOKENS]


def whole_decode(model, tokens: list[int], cond, seed: int) -> torch.Tensor:
    """The whole-utterance decode with the noise a request of codec seed `seed` draws (its NoiseTape for x_0,
    its second generator for HiFT) -> pcm [n]."""
    s3gen = model.s3gen
    noise = s3gen.new_stream(cond, seed).noise.take(2 * (cond.prompt_tokens.shape[0] + len(tokens)))
    mel = s3gen.mel(torch.tensor(tokens), cond, noise)
    pcm, _ = s3gen.mel2wav.inference(mel[None], None, [torch.Generator().manual_seed(seed + 1)])
    pcm = pcm[0].clone()
    pcm[: s3gen.trim_fade.shape[0]] *= s3gen.trim_fade
    return pcm


def expected_samples(cond, num_tokens: int) -> int:
    """The publisher's output length: 480 samples a mel frame past the prompt's."""
    return 480 * (2 * (cond.prompt_tokens.shape[0] + num_tokens) - cond.prompt_mel.shape[0])


# --------------------------------------------------------------------------------------------------------- loading


def test_tiny_checkpoint_loads_in_the_official_loaders(ref, official, checkpoint_dir, model):
    """from_local read every publisher file of the directory (T3 and the voice encoder strictly; it loads S3Gen
    with strict=False, so that is checked strictly here); our loader read the same files."""
    from safetensors.torch import load_file

    assert {p.name for p in checkpoint_dir.iterdir()} == {
        "t3_cfg.safetensors", "s3gen.safetensors", "ve.safetensors", "tokenizer.json", "conds.pt",  # the publisher's
        "streamvox_tiny.json", "README.md"}
    result = official.s3gen.load_state_dict(load_file(str(checkpoint_dir / "s3gen.safetensors")), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(load_file(str(checkpoint_dir / "t3_cfg.safetensors"))) == set(official.t3.state_dict())
    assert set(load_file(str(checkpoint_dir / "ve.safetensors"))) == set(official.ve.state_dict())
    assert len(official.tokenizer.tokenizer.get_vocab()) == 704
    conds = official.conds  # from_local's Conditionals.load of conds.pt
    assert tuple(conds.t3.speaker_emb.shape) == (1, 256) and tuple(conds.t3.cond_prompt_speech_tokens.shape) == (1, 150)
    assert float(conds.t3.emotion_adv[0, 0, 0]) == 0.5
    # ours: the built-in voice is conds.pt's, the heads and tables are the file's
    assert model.voices == ("default",) and model.is_random_weights
    voice = model.builtin["default"]
    assert torch.equal(voice.t3.speaker_emb, conds.t3.speaker_emb[0])
    assert torch.equal(voice.t3.prompt_tokens, conds.t3.cond_prompt_speech_tokens[0])
    assert torch.equal(voice.gen.prompt_tokens, conds.gen["prompt_token"][0])
    assert torch.equal(voice.gen.prompt_mel, conds.gen["prompt_feat"][0])
    assert torch.equal(voice.gen.speaker_embedding, conds.gen["embedding"][0])
    assert torch.equal(model.backbone.speech_head.weight, official.t3.speech_head.weight)


# ------------------------------------------------------------------------------------------------------------ T3


def spy_logits(engine, model, monkeypatch) -> tuple[list, list]:
    """Record what the engine's sampler draws from (the guided logits, [1, V] a step for one request) and what
    the backbone's head gave each row ([rows, V])."""
    mixed, rows = [], []
    sample, head = engine.lm_runner.sampler.sample, model.backbone.compute_logits

    def spy_sample(logits, batch, exact=False):
        if not exact:
            mixed.append(logits.detach().clone())
        return sample(logits, batch, exact)

    def spy_head(hidden):
        logits = head(hidden)
        rows.append(logits.detach().clone())
        return logits

    monkeypatch.setattr(engine.lm_runner.sampler, "sample", spy_sample)
    monkeypatch.setattr(model.backbone, "compute_logits", spy_head)
    return mixed, rows


@pytest.mark.parametrize(("voice", "cfg", "exaggeration"), [
    ("builtin", 0.5, 0.5), ("builtin", 0.5, 0.9), ("clone", 0.5, 0.5), ("clone", 0.5, 0.9),
    ("builtin", 0.0, 0.5), ("clone", 0.0, 0.9),  # one conditioned row
])
def test_guided_logits_match_the_official_t3(ref, official, checkpoint_dir, model, clip, clone_conds, make_engine,
                                             monkeypatch, voice, cfg, exaggeration):
    prepared = model.prepare_request(TEXT, None, clip if voice == "clone" else None,
                                     {"cfg_weight": cfg, "exaggeration": exaggeration})
    assert prepared.num_lanes == (2 if cfg else 1)
    engine = make_engine()
    mixed, rows = spy_logits(engine, model, monkeypatch)
    tokens, _ = run(engine, prepared, greedy(3))
    assert len(mixed) == len(rows) == 3
    base = clone_conds if voice == "clone" else builtin_conds(ref, checkpoint_dir)
    cond = cr.with_exaggeration(ref, base.t3, exaggeration)
    want = cr.t3_logits(official.t3, cond, cr.text_tokens(ref, official, TEXT, cfg > 0), tokens[:2], cfg)
    errors = []
    for step, (got, got_rows, theirs) in enumerate(zip(mixed, rows, want, strict=True)):
        assert theirs[0].std() > 0.1  # lively logits
        guided = theirs[0] + cfg * (theirs[0] - theirs[1]) if cfg else theirs[0]
        errors.append(rel_err(got[0], guided))
        assert rel_err(got_rows, theirs) <= LOGIT_TOL  # each row on its own
        assert int(guided.argmax()) == tokens[step]
    print(f"guided logits, {voice} cfg {cfg} exaggeration {exaggeration}: relative error per step {errors}")
    assert max(errors) <= LOGIT_TOL, errors
    if cfg:  # the unconditioned row matters
        assert rel_err(mixed[0][0], want[0][0]) > 10 * LOGIT_TOL


@pytest.mark.parametrize("voice", ["builtin", "clone"])
def test_greedy_tokens_match_official_inference(ref, official, checkpoint_dir, model, clip, clone_conds, make_engine,
                                               voice):
    prepared = model.prepare_request(TEXT, None, clip if voice == "clone" else None, {"cfg_weight": 0.5})
    tokens, _ = run(make_engine(), prepared, greedy(GREEDY_STEPS))
    base = clone_conds if voice == "clone" else builtin_conds(ref, checkpoint_dir)
    expected = cr.greedy_inference(ref, official.t3, cr.with_exaggeration(ref, base.t3, 0.5),
                                   cr.text_tokens(ref, official, TEXT, True), GREEDY_STEPS, 0.5)
    assert len(expected) == GREEDY_STEPS  # no end token drawn: the whole run is compared
    assert tokens == expected
    assert len(set(tokens)) > GREEDY_STEPS // 2  # not one token repeated


# ---------------------------------------------------------------------------------------------------------- audio


@pytest.fixture(scope="module")
def builtin_run(model):
    """A guided greedy request of the built-in voice through an engine: (tokens, chunks, conditioning)."""
    prepared = model.prepare_request(TEXT, None, None, {"cfg_weight": 0.5})
    engine = Engine(model, engine_config())
    try:
        tokens, chunks = run(engine, prepared, greedy(100))
    finally:
        engine.close()
    return tokens, chunks, prepared.conditioning


@pytest.mark.parametrize("voice", ["builtin", "clone"])
def test_whole_utterance_audio_matches_official_inference(ref, official, checkpoint_dir, model, clip, clone_conds,
                                                          builtin_run, voice):
    """Our S3Gen.inference on the engine's tokens against the publisher's, both given the same noise."""
    tokens = audio_tokens(builtin_run[0])
    if voice == "clone":
        cond, gen = model.prepare_request(TEXT, None, clip).conditioning, clone_conds.gen
    else:
        cond, gen = builtin_run[2], builtin_conds(ref, checkpoint_dir).gen
    speech = ref.drop_invalid_tokens(torch.tensor([builtin_run[0]]))
    assert speech[speech < AUDIO_TOKENS].tolist() == tokens  # what generate() hands S3Gen
    torch.manual_seed(11)
    expected, _ = official.s3gen.inference(speech_tokens=torch.tensor([tokens]), ref_dict=cr.gen_dict(gen))
    got, _ = model.s3gen.inference(torch.tensor(tokens), cond, generator=torch.Generator().manual_seed(11))
    assert got.shape == expected.shape == (1, expected_samples(cond, len(tokens)))
    error = (got - expected).abs().max().item()
    print(f"whole-utterance audio, {voice}: {len(tokens)} tokens, max |ours - official| {error:.2e}, "
          f"peak {expected.abs().max().item():.3f}")
    assert error <= PCM_TOL
    assert expected[0, 960:].abs().max() > 1e-2  # not silence


def test_streamed_audio_against_the_whole_utterance(model, builtin_run):
    """The engine's chunks ([0, 25), [25, 75), ..., each decoded seeing 3 tokens past its end; Chatterbox's flow
    attends everywhere and was not trained chunk-causal) against the whole-utterance decode with the request's
    own noise. Measured 0.121 overall (0.133, 0.118, 0.111 over the three chunks) on these random tiny weights;
    the bound is twice that. (The last chunk's mel is the whole decode's, but HiFT's streamed source and
    cross-fade still differ.)"""
    tokens, chunks, cond = builtin_run
    speech = audio_tokens(tokens)
    second = FIRST_CHUNK_TOKENS + CHUNK_TOKENS
    assert [(c.start_frame, c.end_frame) for c in chunks][:2] == [(0, FIRST_CHUNK_TOKENS), (FIRST_CHUNK_TOKENS, second)]
    assert chunks[-1].is_last and chunks[-1].end_frame == len(speech)
    streamed = pcm_of(chunks)
    assert np.isfinite(streamed).all() and streamed.dtype == np.float32
    assert streamed.shape == (expected_samples(cond, len(speech)),) == (len(speech) * SAMPLES_PER_TOKEN,)
    whole = whole_decode(model, speech, cond, codec_seed_for(0))
    error = rel_rms(streamed, whole)
    ends = np.cumsum([len(c.pcm) for c in chunks])
    per_chunk = [rel_rms(streamed[a:b], whole[a:b]) for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    print(f"streamed vs whole: relative RMS {error:.3f}; per chunk {[round(e, 3) for e in per_chunk]}")
    assert 0.02 < error < 0.25


def test_a_single_chunk_request_is_the_whole_utterance_decode(model, make_engine):
    """Fewer than 25 + 3 audio tokens: one (last) chunk, which is exactly the whole-utterance decode."""
    prepared = model.prepare_request(SHORT, None, None, {"cfg_weight": 0.5})
    tokens, chunks = run(make_engine(), prepared, greedy(24, seed=4))
    speech = audio_tokens(tokens)
    assert len(chunks) == 1 and chunks[0].is_last
    whole = whole_decode(model, speech, prepared.conditioning, codec_seed_for(4))
    error = np.abs(chunks[0].pcm - whole.numpy()).max()
    print(f"single chunk vs whole: max abs {error:.2e}")
    assert error <= 1e-6


def test_audio_does_not_depend_on_codec_timing(model, builtin_run):
    """A job covering several of the plan's chunks (a codec that fell behind) decodes as those chunks one by one;
    an engine with the default codec budget (100 frames a call) streams the same audio."""
    tokens, chunks, cond = builtin_run
    frames = torch.tensor(audio_tokens(tokens))[:, None]
    n, seed = frames.shape[0], codec_seed_for(0)
    assert n > FIRST_CHUNK_TOKENS + CHUNK_TOKENS + 3

    def decode(plan):
        state = model.new_codec_state(cond, seed)
        return torch.cat([model.decode_chunks([ChunkJob(frames[: n if last else end + 3], start, end, last, seed,
                                                        state)])[0] for start, end, last in plan])

    merged = decode([(0, n, True)])
    split = decode([(0, 25, False), (25, 75, False), (75, n, True)])
    assert torch.equal(merged, split)
    assert np.abs(split.numpy() - pcm_of(chunks)).max() <= 1e-6
    lumped = model.s3gen.new_stream(cond, seed)  # what one S3Gen call over [25, n) would give instead
    first = model.s3gen.decode_chunk(lumped, frames[:28, 0], 0, 25, False)
    rest = model.s3gen.decode_chunk(lumped, frames[:, 0], 25, n, True)
    lumped_error = rel_rms(torch.cat([first, rest]), split)
    print(f"one S3Gen call over [25, {n}) against the plan's chunks: relative RMS {lumped_error:.3f}")
    assert lumped_error > 0.01
    engine = Engine(model, engine_config(SchedulerConfig().max_codec_frames))  # the default budget
    assert engine.codec.max_frames == 2 * CHUNK_TOKENS
    try:
        again, streamed = run(engine, model.prepare_request(TEXT, None, None, {"cfg_weight": 0.5}), greedy(100))
    finally:
        engine.close()
    assert again == tokens and np.abs(pcm_of(streamed) - pcm_of(chunks)).max() <= 1e-6


# -------------------------------------------------------------------------------------------------------- cloning


def test_clone_conditioning_matches_prepare_conditionals(ref, official, model, clip, clone_conds):
    """With its librosa.resample swapped for our resampler, the publisher's prepare_conditionals (VE embedding of
    the 16 kHz clip, S3 tokens of its first 6 s cut to 150, S3Gen's ref dict of its first 10 s) is ours."""
    prepared = model.prepare_request(TEXT, None, clip, {"exaggeration": 0.5})
    voice = model._clone(clip)
    theirs = clone_conds.t3
    assert voice.t3.prompt_tokens.shape == (150,)
    assert torch.equal(voice.t3.prompt_tokens, theirs.cond_prompt_speech_tokens[0])
    assert len(set(voice.t3.prompt_tokens.tolist())) > 10  # the tiny tokenizer does not give one token
    assert (voice.t3.speaker_emb - theirs.speaker_emb[0]).abs().max() <= 2e-5
    gen = clone_conds.gen
    cond = prepared.conditioning
    assert torch.equal(cond.prompt_tokens, gen["prompt_token"][0]) and cond.prompt_tokens.shape == (162,)
    assert cond.prompt_mel.shape == gen["prompt_feat"][0].shape == (325, 80)
    assert (cond.prompt_mel - gen["prompt_feat"][0]).abs().max() <= 1e-5
    assert (cond.speaker_embedding - gen["embedding"][0]).abs().max() <= 1e-5
    with torch.inference_mode():
        want = official.t3.prepare_conditioning(cr.with_exaggeration(ref, theirs, 0.5))[0]
    assert prepared.prompt_embeds.shape == want.shape == (34, 64)
    assert (prepared.prompt_embeds - want).abs().max() <= 2e-5


def test_clone_conditioning_against_librosa_resampling(ref, official, model, clip, clone_conds, tmp_path):
    """The publisher's own path (librosa's soxr resampler for T3's 16 kHz clip) against ours (sinc): S3Gen's
    conditioning does not go through librosa (equal); the voice-encoder embedding, prompt tokens and conditioning
    vectors differ by what the resamplers do (bounds: measured, with headroom)."""
    import librosa

    genuine = official_clone(ref, official, clip.pcm, tmp_path / "clip.wav", sinc=False)
    for key in ("prompt_token", "prompt_feat", "embedding"):
        assert torch.equal(genuine.gen[key], clone_conds.gen[key])
    at16 = librosa.resample(clip.pcm.numpy(), orig_sr=24000, target_sr=16000)
    ours16 = resample(clip.pcm, 24000, 16000).numpy()
    clip_error = rel_rms(ours16, at16)
    voice = model._clone(clip)
    speaker = genuine.t3.speaker_emb[0]
    cosine = torch.nn.functional.cosine_similarity(voice.t3.speaker_emb, speaker, dim=0).item()
    same = (voice.t3.prompt_tokens == genuine.t3.cond_prompt_speech_tokens[0]).float().mean().item()
    with torch.inference_mode():
        want = official.t3.prepare_conditioning(cr.with_exaggeration(ref, genuine.t3, 0.5))[0]
    got = model.prepare_request(TEXT, None, clip).prompt_embeds
    edges = rel_err(got[[0, -1]], want[[0, -1]])  # speaker (VE) and exaggeration rows
    perceiver = rel_err(got[1:-1], want[1:-1])  # the prompt tokens through the Perceiver
    print(f"librosa vs sinc: 16 kHz clip relative RMS {clip_error:.2e}, VE cosine {cosine:.7f} (max abs "
          f"{(voice.t3.speaker_emb - speaker).abs().max().item():.2e}), prompt tokens equal {same:.1%}, "
          f"conditioning vectors relative error: speaker/exaggeration rows {edges:.2e}, Perceiver rows "
          f"{perceiver:.2e}")
    # measured: 7.4e-3, cosine 1 - 1e-7 (max abs 4.5e-6), 86% of the tokens, 3e-6 and 0.09
    assert clip_error < 2e-2
    assert cosine > 0.9999
    assert same > 0.7
    assert edges < 1e-4
    assert perceiver < 0.2


def test_a_clip_is_conditioned_once(model, monkeypatch):
    """The same clip (by content) twice: one conditioning, computed once."""
    pcm = speechlike(3.0, 24000, seed=9)
    calls = []
    voice_of = model._voice_of
    monkeypatch.setattr(model, "_voice_of", lambda clip_pcm: calls.append(1) or voice_of(clip_pcm))
    first = model.prepare_request(TEXT, None, Reference(TRANSCRIPT, pcm))
    second = model.prepare_request(SHORT, None, Reference("Another transcript.", pcm.clone()))
    assert len(calls) == 1
    assert second.conditioning is first.conditioning and torch.equal(second.prompt_embeds, first.prompt_embeds)
    other = model.prepare_request(TEXT, None, Reference(TRANSCRIPT, 0.5 * pcm))
    assert len(calls) == 2 and not torch.equal(other.prompt_embeds, first.prompt_embeds)
    assert len(model._clips) <= CLIP_CACHE_SIZE


def test_options_shape_the_request(model, official, clip):
    """exaggeration changes the last conditioning vector (emotion_adv_fc) only; cfg_weight 0 gives one row; the
    unconditioned row is the same prompt with its text ids moved past the text vocabulary."""
    low = model.prepare_request(TEXT, None, clip, {"exaggeration": 0.5, "cfg_weight": 0.5})
    high = model.prepare_request(TEXT, None, clip, {"exaggeration": 0.9, "cfg_weight": 0.5})
    assert torch.equal(low.prompt_embeds[:-1], high.prompt_embeds[:-1])
    delta = high.prompt_embeds[-1] - low.prompt_embeds[-1]
    torch.testing.assert_close(delta, 0.4 * official.t3.cond_enc.emotion_adv_fc.weight[:, 0].detach(), atol=1e-5,
                               rtol=1e-5)
    assert low.prompt == high.prompt and low.num_lanes == 2 and low.guidance.weights == (-0.5,)
    unconditioned = low.guidance.prompts[0]
    vocab, conditioning = model.backbone.text_vocab, low.prompt_embeds.shape[0]
    assert len(unconditioned) == len(low.prompt)
    text = slice(conditioning, len(low.prompt) - 2)  # the conditioning's positions, the text, two starts of speech
    assert all(ours[0] < vocab for ours in low.prompt[text])
    assert unconditioned[text] == [(ours[0] + vocab, ours[1]) for ours in low.prompt[text]]
    assert unconditioned[: conditioning] == low.prompt[: conditioning]
    assert unconditioned[-2:] == low.prompt[-2:]
    single = model.prepare_request(TEXT, None, clip, {"cfg_weight": 0.0})
    assert single.num_lanes == 1 and single.guidance is None and single.prompt == low.prompt
    default = model.prepare_request(TEXT, None, clip)  # the publisher's defaults: 0.5 and 0.5
    assert torch.equal(default.prompt_embeds, low.prompt_embeds) and default.guidance == low.guidance


def test_a_clip_changes_the_audio_and_a_seed_reproduces_it(model, clip, make_engine):
    engine = make_engine()
    cloned = model.prepare_request(TEXT, None, clip)
    first, first_chunks = run(engine, cloned, greedy(40, seed=7))
    again, again_chunks = run(engine, model.prepare_request(TEXT, None, clip), greedy(40, seed=7))
    other, other_chunks = run(engine, cloned, greedy(40, seed=8))
    plain, plain_chunks = run(engine, model.prepare_request(TEXT, None), greedy(40, seed=7))
    pcm = pcm_of(first_chunks)
    assert pcm.shape == (expected_samples(cloned.conditioning, len(audio_tokens(first))),)  # odd prompt mel
    assert again == first and np.array_equal(pcm_of(again_chunks), pcm)
    assert other == first and rel_rms(pcm_of(other_chunks), pcm) > 0.05  # greedy tokens, other codec noise
    assert plain != first
    # the same tokens in another voice
    speech = audio_tokens(first)
    seed = codec_seed_for(7)
    builtin = whole_decode(model, speech, model.builtin["default"].gen, seed)
    voiced = whole_decode(model, speech, cloned.conditioning, seed)
    assert builtin.shape[0] == voiced.shape[0] + 480 and rel_rms(voiced, builtin[:-480]) > 0.1


# ------------------------------------------------------------------------------------------------------- batching


def test_batching_is_invisible(model, clip, make_engine):
    """Guided and unguided requests of different prompts, voices and lengths in one engine: each one's tokens and
    audio are what it gets alone."""
    cases = [
        (model.prepare_request(LONG, None, None, {"cfg_weight": 0.5}), greedy(90, seed=1)),
        (model.prepare_request(SHORT, None, clip, {"cfg_weight": 0.0, "exaggeration": 0.7}), greedy(40, seed=2)),
        (model.prepare_request(TEXT, None, clip, {"cfg_weight": 0.8, "exaggeration": 0.9}), greedy(60, seed=3)),
    ]
    assert len({len(p.prompt) for p, _ in cases}) == 3 and [p.num_lanes for p, _ in cases] == [2, 1, 2]
    alone = [run(make_engine(), prepared, sampling) for prepared, sampling in cases]
    engine = make_engine()
    ids = [engine.submit_prepared(prepared, sampling) for prepared, sampling in cases]
    outputs = [engine._outputs[request_id] for request_id in ids]
    streamed = [list(engine.stream(request_id)) for request_id in ids]
    errors = []
    for (tokens, chunks), output, together in zip(alone, outputs, streamed, strict=True):
        assert list(output.step_tokens) == tokens
        assert pcm_of(together).shape == pcm_of(chunks).shape
        errors.append(float(np.abs(pcm_of(together) - pcm_of(chunks)).max()))
    print(f"batched vs alone: max |pcm difference| per request {errors}")
    assert max(errors) <= PCM_TOL
