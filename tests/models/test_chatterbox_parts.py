"""Chatterbox's parts around T3 (voice encoder, conditioning, text front end, prefill/step embeddings) against the
publisher's modules (chatterbox-tts 0.1.7, test-only), on the tiny files of streamvox.models.tiny.chatterbox_parts.

The publisher's package __init__ imports its whole TTS stack (S3Gen and the S3 tokenizer need torchaudio, which has
no build for torch 2.13; the watermarker ``perth`` is not installed). The test loads the submodules it needs under a
bare ``chatterbox`` package with stand-ins for ``perth``, ``chatterbox.models.s3gen`` and
``chatterbox.models.s3tokenizer`` (tts.py only takes two constants and a class name from them), then takes every
``chatterbox*``/``perth`` entry it added back out of sys.modules. The tiny reference T3 is the publisher's class with
a tiny entry added to its LLAMA_CONFIGS and its Perceiver (hard-coded 1024 wide) rebuilt at width 64.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

from streamvox.codecs.voice_encoder import VoiceEncoder as OurVoiceEncoder
from streamvox.codecs.voice_encoder import trim_silence, voice_mel
from streamvox.models.chatterbox_cond import (
    START_SPEECH_TOKEN,
    STOP_SPEECH_TOKEN,
    T3Embeddings,
    cfg_combine,
    conditioning_embeddings,
    speech_embedding,
    text_embeddings,
)
from streamvox.models.chatterbox_text import ChatterboxTextTokenizer, punc_norm
from streamvox.models.tiny.chatterbox_parts import TINY_EMBEDDINGS, TINY_VE_HIDDEN, write_tiny
from tests.models.chatterbox_reference import tiny_t3

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*sdp_kernel.*:FutureWarning"),  # the publisher's Perceiver
    pytest.mark.filterwarnings("ignore:.*output_attentions.*:UserWarning"),  # T3.inference asks sdpa for attentions
]
TOL = 2e-5
CFG = 0.5
TINY_LLAMA_NAME = "streamvox_tiny"
TEXTS = (
    "Hello world",
    "hello there... how are you?",
    "  Numbers: one; two - three \u2014 four \u2026 five  ",
    "\u201cQuoted\u201d and \u2018single\u2019 quotes , plus caf\u00e9 and \u00fcber",
    "",
    "Already ends with a comma,",
)


def _load_reference() -> types.SimpleNamespace:
    """The publisher's modules, loaded without its package __init__ (see the module docstring)."""
    spec = importlib.util.find_spec("chatterbox")
    before = {name for name in sys.modules if name.startswith(("chatterbox", "perth"))}
    stubs = {"perth": {"PerthImplicitWatermarker": object},
             "chatterbox.models.s3gen": {"S3GEN_SR": 24000, "S3Gen": object},
             "chatterbox.models.s3tokenizer": {"S3_SR": 16000, "drop_invalid_tokens": None}}
    try:
        if "chatterbox" not in sys.modules:
            package = types.ModuleType("chatterbox")
            package.__path__ = list(spec.submodule_search_locations)
            sys.modules["chatterbox"] = package
        for name, attrs in stubs.items():
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                vars(sys.modules[name]).update(attrs)
        tts = importlib.import_module("chatterbox.tts")
        t3 = importlib.import_module("chatterbox.models.t3.t3")
        ns = types.SimpleNamespace(
            tts=tts, t3=t3, punc_norm=tts.punc_norm, Conditionals=tts.Conditionals, T3=t3.T3,
            T3Cond=importlib.import_module("chatterbox.models.t3.modules.cond_enc").T3Cond,
            T3Config=importlib.import_module("chatterbox.models.t3.modules.t3_config").T3Config,
            Perceiver=importlib.import_module("chatterbox.models.t3.modules.perceiver").Perceiver,
            LLAMA_CONFIGS=importlib.import_module("chatterbox.models.t3.llama_configs").LLAMA_CONFIGS,
            ve=importlib.import_module("chatterbox.models.voice_encoder.voice_encoder"),
            melspec=importlib.import_module("chatterbox.models.voice_encoder.melspec"),
            EnTokenizer=importlib.import_module("chatterbox.models.tokenizers.tokenizer").EnTokenizer,
        )
    finally:
        for name in [name for name in sys.modules if name.startswith(("chatterbox", "perth"))]:
            if name not in before:
                del sys.modules[name]
    return ns


@pytest.fixture(scope="module")
def ref():
    if importlib.util.find_spec("chatterbox") is None:  # its __init__ cannot run here: look, do not import
        pytest.skip("the reference package chatterbox-tts is not installed")
    for name in ("transformers", "librosa", "tqdm", "scipy", "einops"):
        pytest.importorskip(name)
    return _load_reference()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("chatterbox") / "tiny", seed=3)


@pytest.fixture(scope="module")
def t3_state(tiny_dir):
    from safetensors.torch import load_file

    return load_file(str(tiny_dir / "t3_cfg.safetensors"))


@pytest.fixture(scope="module")
def ref_t3(ref, t3_state):
    """The publisher's T3 at the tiny config, loaded strictly from the tiny t3_cfg.safetensors."""
    model = tiny_t3(ref)
    model.load_state_dict(t3_state, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def ours(t3_state):
    return T3Embeddings.from_state_dict(t3_state)


@pytest.fixture(scope="module")
def ref_ve(ref, tiny_dir):
    from safetensors.torch import load_file

    class TinyVoiceConfig(ref.ve.VoiceEncConfig):
        ve_hidden_size = TINY_VE_HIDDEN

    model = ref.ve.VoiceEncoder(hp=TinyVoiceConfig())
    model.load_state_dict(load_file(str(tiny_dir / "ve.safetensors")), strict=True)
    return model.eval()


def _clip(seconds: float, seed: int, lead: float = 0.3, tail: float = 0.25) -> np.ndarray:
    """A voiced-ish 16 kHz clip (harmonics, vibrato, syllable envelope, noise) between near-silent margins."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    f0 = 140 + 25 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    voiced = sum(np.sin(k * phase + rng.uniform(0, 6)) / k for k in range(1, 12))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.1 * t) ** 2
    speech = 0.15 * envelope * voiced + 0.02 * rng.standard_normal(t.size)
    margins = [1e-4 * rng.standard_normal(int(s * 16000)) for s in (lead, tail)]
    return np.concatenate([margins[0], speech, margins[1]]).astype(np.float32)


def _cond(ref, speaker, tokens, emotion):
    return ref.T3Cond(speaker_emb=speaker[None], cond_prompt_speech_tokens=None if tokens is None else tokens[None],
                      emotion_adv=emotion * torch.ones(1, 1, 1))


def _speaker(seed: int) -> torch.Tensor:
    v = torch.randn(256, generator=torch.Generator().manual_seed(seed)).abs()
    return v / v.norm()


def _prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, START_SPEECH_TOKEN, (n,), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def test_tiny_files_load_in_official_loaders(ref, ref_t3, ref_ve, tiny_dir, t3_state, ours):
    assert set(t3_state) == set(ref_t3.state_dict())  # strict load already passed in the fixture
    cond_keys = {k for k in ref_t3.state_dict() if not k.startswith(("tfmr.", "text_head", "speech_head"))}
    assert set(ours.state_dict()) == cond_keys
    assert set(OurVoiceEncoder.from_file(tiny_dir).state_dict()) == set(ref_ve.state_dict())
    conds = ref.Conditionals.load(tiny_dir / "conds.pt").to("cpu")
    assert tuple(conds.t3.speaker_emb.shape) == (1, 256)
    assert tuple(conds.t3.cond_prompt_speech_tokens.shape) == (1, 150)
    assert float(conds.t3.emotion_adv[0, 0, 0]) == 0.5
    gen = conds.gen
    n = gen["prompt_token"].shape[1]
    assert gen["prompt_token_len"].tolist() == [n] and tuple(gen["prompt_feat"].shape) == (1, 2 * n, 80)
    assert tuple(gen["embedding"].shape) == (1, 192) and gen["prompt_feat_len"] is None
    tokenizer = ref.EnTokenizer(str(tiny_dir / "tokenizer.json"))
    vocab = tokenizer.tokenizer.get_vocab()
    assert len(vocab) == 704 and vocab["[START]"] == 255 and vocab["[STOP]"] == 0 and vocab["[SPACE]"] == 2
    # the built-in voice through both conditioning paths
    want = ref_t3.prepare_conditioning(conds.t3)[0]
    got = ours.conditioning(conds.t3.speaker_emb[0], conds.t3.cond_prompt_speech_tokens[0], 0.5)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Voice encoder
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "seed", "kwargs"), [
    (2.3, 0, {}),  # a few overlapping windows at the default rate 1.3/s
    (0.6, 1, {}),  # shorter than one window: zero-padded
    (4.1, 2, {"rate": None, "overlap": 0.5}),  # step from the overlap
    (3.0, 3, {"min_coverage": 0.5, "trim_top_db": 30}),
])
def test_voice_encoder_matches_embeds_from_wavs(ref, ref_ve, tiny_dir, seconds, seed, kwargs):
    wav = _clip(seconds, seed)
    want = torch.from_numpy(ref_ve.embeds_from_wavs([wav], sample_rate=16000, **kwargs))[0]
    model = OurVoiceEncoder.from_file(tiny_dir)
    got = model.embed(torch.from_numpy(wav), 16000, **kwargs)
    assert got.shape == (256,)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_voice_features_match_librosa(ref):
    import librosa

    wav = _clip(1.7, 4)
    trimmed, (start, end) = librosa.effects.trim(wav, top_db=20)
    ours = trim_silence(torch.from_numpy(wav), 20)
    assert ours.shape[0] == end - start
    torch.testing.assert_close(ours, torch.from_numpy(trimmed), atol=0, rtol=0)
    mel = ref.melspec.melspectrogram(trimmed, ref.ve.VoiceEncConfig()).T  # [T, 40]
    got = voice_mel(torch.from_numpy(trimmed))
    assert got.shape == mel.shape
    scale = float(np.abs(mel).max())
    torch.testing.assert_close(got / scale, torch.from_numpy(np.ascontiguousarray(mel)) / scale, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", [
    lambda: (np.zeros((2, 16000), np.float32), 16000),  # stereo
    lambda: ((np.ones(16000) * 1000).astype(np.int16), 16000),  # integer PCM
    lambda: (np.full(16000, np.nan, np.float32), 16000),  # NaN
    lambda: (np.zeros(16000, np.float32), 16000),  # silent
    lambda: (np.zeros(0, np.float32), 16000),  # empty
    lambda: (_clip(1.0, 0), 0),  # bad rate
    lambda: (_clip(1.0, 0), 16000.5),  # fractional rate
    lambda: (_clip(0.018, 0, lead=0, tail=0), 16000),  # 288 samples: shorter than one STFT window
])
def test_voice_encoder_rejects_bad_clips(tiny_dir, bad):
    pcm, rate = bad()
    with pytest.raises(ValueError):
        OurVoiceEncoder.from_file(tiny_dir).embed(pcm, rate)


# ---------------------------------------------------------------------------------------------------------------
# Conditioning, text, prefill
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("prompt_len", "emotion"), [(150, 0.5), (37, 0.9), (None, 0.3)])
def test_conditioning_matches_prepare_conditioning(ref, ref_t3, ours, prompt_len, emotion):
    speaker = _speaker(prompt_len or 0)
    tokens = None if prompt_len is None else _prompt(prompt_len, 5)
    with torch.inference_mode():
        want = ref_t3.prepare_conditioning(_cond(ref, speaker, tokens, emotion))[0]
        got = conditioning_embeddings(ours.cond_enc, speaker, tokens, emotion, ours.speech_emb, ours.speech_pos_emb)
    rows = 2 if prompt_len is None else 2 + TINY_EMBEDDINGS.perceiver_queries
    assert got.shape == (rows, TINY_EMBEDDINGS.hidden_size)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_conditioning_rejects_bad_inputs(ours):
    with pytest.raises(ValueError):
        ours.conditioning(torch.zeros(255), _prompt(10, 0), 0.5)
    with pytest.raises(ValueError):
        ours.conditioning(_speaker(0), _prompt(151, 0), 0.5)
    with pytest.raises(ValueError):
        ours.conditioning(_speaker(0), torch.tensor([START_SPEECH_TOKEN]), 0.5)
    with pytest.raises(ValueError):
        ours.conditioning(_speaker(0), torch.tensor([], dtype=torch.long), 0.5)


def test_text_ids_match_en_tokenizer(ref, tiny_dir):
    theirs = ref.EnTokenizer(str(tiny_dir / "tokenizer.json"))
    mine = ChatterboxTextTokenizer(tiny_dir)
    for text in TEXTS:
        assert punc_norm(text) == ref.punc_norm(text)
        want = [255, *theirs.text_to_tokens(ref.punc_norm(text))[0].tolist(), 0]
        assert mine.text_ids(text) == want
        assert mine.encode(text) == theirs.encode(text)
    assert 1 in mine.text_ids("caf\u00e9")  # an unknown character is [UNK]
    assert mine.decode(mine.encode("Hello world.")) == theirs.decode(theirs.encode("Hello world."))


def test_text_embeddings_keep_positions_in_uncond_row(ours):
    ids = [255, 40, 2, 41, 0]
    uncond = text_embeddings(ours.text_emb, ours.text_pos_emb, ids, is_uncond=True)
    torch.testing.assert_close(uncond, ours.text_pos_emb.emb.weight[:5], atol=0, rtol=0)
    assert not torch.equal(text_embeddings(ours.text_emb, ours.text_pos_emb, ids, is_uncond=False), uncond)


def test_prefill_matches_prepare_input_embeds(ref, ref_t3, ours, tiny_dir):
    ids = ChatterboxTextTokenizer(tiny_dir).text_ids(TEXTS[1])
    speaker, tokens = _speaker(7), _prompt(150, 8)
    text = torch.tensor([ids, ids])
    sos = torch.full((2, 1), START_SPEECH_TOKEN)
    with torch.inference_mode():
        want, len_cond = ref_t3.prepare_input_embeds(t3_cond=_cond(ref, speaker, tokens, 0.5), text_tokens=text,
                                                     speech_tokens=sos, cfg_weight=CFG)
        got = ours.prefill(ours.conditioning(speaker, tokens, 0.5), ids, cfg=True)
        bos = ref_t3.speech_emb(torch.tensor([[START_SPEECH_TOKEN]])) + ref_t3.speech_pos_emb.get_fixed_embedding(0)
    assert len_cond == 2 + TINY_EMBEDDINGS.perceiver_queries
    assert got.shape == (2, want.shape[1] + 1, want.shape[2])
    torch.testing.assert_close(got[:, :-1], want, atol=TOL, rtol=0)
    torch.testing.assert_close(got[:, -1], bos[0].expand(2, -1), atol=TOL, rtol=0)
    single = ours.prefill(ours.conditioning(speaker, tokens, 0.5), ids, cfg=False)
    torch.testing.assert_close(single[0], got[0], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Against T3.inference: the prefill, its logits, CFG, and the decode-step inputs
# ---------------------------------------------------------------------------------------------------------------


def _record_inference(ref, ref_t3, monkeypatch, t3_cond, text, steps):
    """Run the publisher's T3.inference greedily (multinomial -> argmax), recording every backbone call."""
    calls = []

    class Recording(ref.t3.T3HuggingfaceBackend):
        def forward(self, inputs_embeds, past_key_values=None, **kwargs):
            out = super().forward(inputs_embeds, past_key_values=past_key_values, **kwargs)
            calls.append((inputs_embeds.clone(), out.logits.clone()))
            return out

    monkeypatch.setattr(ref.t3, "T3HuggingfaceBackend", Recording)
    monkeypatch.setattr(torch, "multinomial", lambda probs, num_samples: probs.argmax(dim=-1, keepdim=True))
    monkeypatch.setattr(ref.t3, "tqdm", lambda iterable, **_: iterable)
    tokens = ref_t3.inference(t3_cond=t3_cond, text_tokens=text, max_new_tokens=steps, cfg_weight=CFG,
                              temperature=0.8, top_p=1.0, min_p=0.05, repetition_penalty=1.2)
    return calls, tokens[0].tolist()


def test_inference_prefill_logits_and_steps(ref, ref_t3, ours, tiny_dir, monkeypatch):
    ids = ChatterboxTextTokenizer(tiny_dir).text_ids(TEXTS[0])
    speaker, prompt = _speaker(11), _prompt(150, 12)
    text = torch.tensor([ids, ids])
    calls, generated = _record_inference(ref, ref_t3, monkeypatch, _cond(ref, speaker, prompt, 0.5), text, 4)
    # the prefill, then one call per sampled token fed back (all of them, unless the last is the stop token)
    assert len(calls) == 1 + len(generated) - (generated[-1] == STOP_SPEECH_TOKEN)

    with torch.inference_mode():
        prefill = ours.prefill(ours.conditioning(speaker, prompt, 0.5), ids, cfg=True)  # [2, L, D]
        torch.testing.assert_close(prefill, calls[0][0], atol=TOL, rtol=0)
        out = ref_t3.tfmr(inputs_embeds=prefill, use_cache=True)
        logits = ref_t3.speech_head(out.last_hidden_state[:, -1])  # [2, V]: both rows
        want = calls[0][1][:, -1]
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)
        guided = cfg_combine(logits[0], logits[1], CFG)
        torch.testing.assert_close(guided, want[0] + CFG * (want[0] - want[1]), atol=1e-4, rtol=0)
        past = out.past_key_values
        for step, token in enumerate(generated[:len(calls) - 1]):  # sampled at `step`: enters at step + 1
            step_in = ours.speech_input(torch.tensor([token, token]), step)[:, None]  # [2, 1, D]
            torch.testing.assert_close(step_in, calls[step + 1][0], atol=TOL, rtol=0)
            out = ref_t3.tfmr(inputs_embeds=step_in, past_key_values=past, use_cache=True)
            past = out.past_key_values
            torch.testing.assert_close(ref_t3.speech_head(out.last_hidden_state[:, -1]), calls[step + 1][1][:, -1],
                                       atol=1e-4, rtol=0)
        sos = speech_embedding(ours.speech_emb, ours.speech_pos_emb, START_SPEECH_TOKEN, 0)
        torch.testing.assert_close(sos[0], prefill[0, -1], atol=0, rtol=0)
