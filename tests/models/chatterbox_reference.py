"""The publisher's Chatterbox (chatterbox-tts 0.1.7, test-only, installed --no-deps) for test_chatterbox.py: its
modules imported without the package __init__, its own loader (`ChatterboxTTS.from_local`) run on a tiny
checkpoint directory at the tiny sizes, and its T3 driven the way `T3.inference` drives it.

Import: as tests/models/test_chatterbox_parts.py and tests/codecs/test_s3gen.py do it, for the whole stack at once
(tts.py, T3, S3Gen, the voice encoder, the tokenizer). Stand-ins, in sys.modules only while the publisher's modules
are imported (the modules keep them; whatever this loader added under ``chatterbox*``/``perth`` is taken back out of
sys.modules, and what another test file already put there is left as it is):
- ``torchaudio`` (no build for torch 2.13): test_s3gen's stand-ins, kaldi fbank -> our kaldi_fbank and
  transforms.Resample -> our sinc `resample` (S3Gen's embed_ref resamples 24 -> 16 kHz with it).
- ``perth`` (the watermarker, not installed): a PerthImplicitWatermarker that returns the audio unchanged.
transformers and diffusers are imported first: they probe torchaudio with importlib.util.find_spec, which a
stand-in breaks.

Tiny sizes: the publisher's constructors hard-code the real sizes, so `from_local` runs with `T3`, `S3Gen` and
`VoiceEncoder` swapped for factories of the same classes at the tiny sizes (T3: a tiny LLAMA_CONFIGS entry and the
Perceiver rebuilt 64 wide, as test_chatterbox_parts does; S3Gen: test_s3gen's `build_reference`; the voice encoder:
its config with the tiny LSTM width). The loading itself (load_file, load_state_dict, EnTokenizer,
Conditionals.load) is the publisher's.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from streamvox.models.chatterbox_cond import START_SPEECH_TOKEN
from streamvox.models.tiny.chatterbox_parts import TINY_EMBEDDINGS, TINY_T3_LLAMA, TINY_VE_HIDDEN
from tests.codecs.test_s3gen import _torchaudio_stubs, build_reference

TINY_LLAMA_NAME = "streamvox_tiny"
NEEDED = ("chatterbox", "s3tokenizer", "librosa", "diffusers", "conformer", "omegaconf", "einops", "scipy",
          "transformers", "soundfile")


class _Watermarker:
    """Stand-in for perth.PerthImplicitWatermarker: no watermark."""

    def apply_watermark(self, wav, sample_rate=None):
        return wav


def _is_installed(name: str) -> bool:
    """Whether a top-level package can be imported (a bare stand-in another test file left in sys.modules has no
    __spec__, on which find_spec raises)."""
    return name in sys.modules or importlib.util.find_spec(name) is not None


def load_reference() -> types.SimpleNamespace:
    """The publisher's modules as a namespace (pytest.skip when a package they need is missing)."""
    for name in NEEDED:
        if not _is_installed(name):
            pytest.skip(f"the Chatterbox reference needs {name}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("diffusers.models.attention", "diffusers.models.lora", "transformers.models.llama",
                     "transformers.generation.logits_process"):
            importlib.import_module(name)  # before torchaudio is stood in for (see the module docstring)
    before = {name for name in sys.modules if name.startswith(("chatterbox", "perth"))}
    stand_ins = {"perth": types.ModuleType("perth")}
    stand_ins["perth"].PerthImplicitWatermarker = _Watermarker
    if not _is_installed("torchaudio"):
        stand_ins.update(_torchaudio_stubs())
    try:
        with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if "chatterbox" not in sys.modules:  # skip the package __init__ (vc, multilingual, gradio front ends)
                package = types.ModuleType("chatterbox")
                package.__path__ = list(importlib.util.find_spec("chatterbox").submodule_search_locations)
                mp.setitem(sys.modules, "chatterbox", package)
            for name, module in stand_ins.items():
                if name not in sys.modules:
                    mp.setitem(sys.modules, name, module)

            def load(name: str) -> types.ModuleType:
                return importlib.import_module(f"chatterbox.{name}")

            ns = types.SimpleNamespace(
                tts=load("tts"), t3=load("models.t3.t3"), s3gen=load("models.s3gen.s3gen"),
                upsample_encoder=load("models.s3gen.transformer.upsample_encoder"),
                model_v2=importlib.import_module("s3tokenizer.model_v2"),
                ve=load("models.voice_encoder.voice_encoder"),
                T3Config=load("models.t3.modules.t3_config").T3Config,
                T3Cond=load("models.t3.modules.cond_enc").T3Cond,
                Perceiver=load("models.t3.modules.perceiver").Perceiver,
                LLAMA_CONFIGS=load("models.t3.llama_configs").LLAMA_CONFIGS,
                drop_invalid_tokens=load("models.s3tokenizer").drop_invalid_tokens,
            )
    finally:
        for name in [name for name in sys.modules if name.startswith(("chatterbox", "perth"))]:
            if name not in before:
                del sys.modules[name]
    ns.ChatterboxTTS, ns.Conditionals, ns.punc_norm = ns.tts.ChatterboxTTS, ns.tts.Conditionals, ns.tts.punc_norm
    ns.T3 = ns.t3.T3
    return ns


def tiny_t3(ref: types.SimpleNamespace):
    """The publisher's T3 at the tiny sizes (random weights until loaded)."""
    ref.LLAMA_CONFIGS[TINY_LLAMA_NAME] = dict(TINY_T3_LLAMA)
    hp = ref.T3Config.english_only()
    hp.llama_config_name = TINY_LLAMA_NAME
    model = ref.T3(hp)
    cfg = TINY_EMBEDDINGS
    model.cond_enc.perceiver = ref.Perceiver(cfg.perceiver_queries, cfg.hidden_size, cfg.hidden_size,
                                             cfg.perceiver_heads)
    return model


def tiny_voice_encoder(ref: types.SimpleNamespace):
    class TinyVoiceConfig(ref.ve.VoiceEncConfig):
        ve_hidden_size = TINY_VE_HIDDEN

    return ref.ve.VoiceEncoder(hp=TinyVoiceConfig())


def from_local(ref: types.SimpleNamespace, path: Path):
    """The publisher's `ChatterboxTTS.from_local(path, "cpu")`, its constructors at the tiny sizes."""
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        mp.setattr(ref.tts, "T3", lambda: tiny_t3(ref))
        mp.setattr(ref.tts, "S3Gen", lambda: build_reference(ref, tiny=True))
        mp.setattr(ref.tts, "VoiceEncoder", lambda: tiny_voice_encoder(ref))
        return ref.ChatterboxTTS.from_local(path, "cpu")


def with_exaggeration(ref, cond, exaggeration: float):
    """A fresh T3Cond of `cond`'s speaker at another exaggeration (as ChatterboxTTS.generate makes it)."""
    return ref.T3Cond(speaker_emb=cond.speaker_emb, cond_prompt_speech_tokens=cond.cond_prompt_speech_tokens,
                      emotion_adv=exaggeration * torch.ones(1, 1, 1))


def text_tokens(ref, tts, text: str, cfg: bool) -> torch.Tensor:
    """[B, T] as ChatterboxTTS.generate makes them: normalised, tokenized, doubled for CFG, start/stop added."""
    tokens = tts.tokenizer.text_to_tokens(ref.punc_norm(text))
    if cfg:
        tokens = torch.cat([tokens, tokens], dim=0)
    tokens = F.pad(tokens, (1, 0), value=tts.t3.hp.start_text_token)
    return F.pad(tokens, (0, 1), value=tts.t3.hp.stop_text_token)


@torch.inference_mode()
def t3_logits(t3, cond, tokens: torch.Tensor, fed: list[int], cfg_weight: float) -> list[torch.Tensor]:
    """The publisher's T3 forward as T3.inference runs it: prepare_input_embeds (conditioning, text, start of
    speech), the loop's extra start of speech, tfmr, speech_head; then each token of `fed` at speech position
    i + 1. -> logits [B, V] of every row at the prefill's last position and after each fed token."""
    rows = tokens.shape[0]
    sos = torch.full((rows, 1), START_SPEECH_TOKEN, dtype=torch.long)
    embeds, _ = t3.prepare_input_embeds(t3_cond=cond, text_tokens=tokens, speech_tokens=sos, cfg_weight=cfg_weight)
    bos = t3.speech_emb(sos[:1]) + t3.speech_pos_emb.get_fixed_embedding(0)
    out = t3.tfmr(inputs_embeds=torch.cat([embeds, bos.expand(rows, -1, -1)], dim=1), use_cache=True)
    logits = [t3.speech_head(out.last_hidden_state[:, -1]).float()]
    for step, token in enumerate(fed):
        step_in = t3.speech_emb(torch.tensor([[token]])) + t3.speech_pos_emb.get_fixed_embedding(step + 1)
        out = t3.tfmr(inputs_embeds=step_in.expand(rows, -1, -1), past_key_values=out.past_key_values, use_cache=True)
        logits.append(t3.speech_head(out.last_hidden_state[:, -1]).float())
    return logits


def greedy_inference(ref, t3, cond, tokens: torch.Tensor, steps: int, cfg_weight: float) -> list[int]:
    """The publisher's T3.inference with torch.multinomial swapped for argmax, repetition penalty 1, min-p 0,
    top-p 1, temperature 1 (so its sampling is the argmax of the guided logits). Stops at its end token."""
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sdpa asked for attentions
        mp.setattr(torch, "multinomial", lambda probs, num_samples: probs.argmax(dim=-1, keepdim=True))
        mp.setattr(ref.t3, "tqdm", lambda iterable, **_: iterable)
        out = t3.inference(t3_cond=cond, text_tokens=tokens, max_new_tokens=steps, temperature=1.0, top_p=1.0,
                           min_p=0.0, repetition_penalty=1.0, cfg_weight=cfg_weight)
    return out[0].tolist()


def write_clip(path: Path, pcm: torch.Tensor, sample_rate: int = 24000) -> Path:
    """A float WAV that librosa.load(path, sr=sample_rate) reads back bit for bit."""
    import soundfile

    soundfile.write(str(path), pcm.numpy().astype(np.float32), sample_rate, subtype="FLOAT")
    return path


def gen_dict(gen: dict) -> dict:
    """A fresh copy of an S3Gen reference dict (the publisher's forward casts it in place)."""
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in gen.items()}
