"""Chatterbox (ResembleAI/chatterbox): the T3 Llama backbone over 25 Hz S3 speech tokens with classifier-free
guidance, conditioned on a speaker (voice-encoder embedding, the clip's speech tokens through a Perceiver, an
emotion exaggeration), made audible by S3Gen (flow matching + HiFT, codecs/s3gen.py).

Layout: t3_cfg.safetensors (backbone under `tfmr.`, HF Llama names; conditioning encoder, embeddings, heads),
s3gen.safetensors, ve.safetensors (voice encoder), tokenizer.json, conds.pt (the built-in voice, `default`).

Backbone inputs are rows (id, local position): text ids [0, 704) enter as text_emb + text_pos; ids [704, 1408)
are the unconditioned guidance row's text (its text embedding zeroed, its position kept); ids from 1408 are speech
tokens (speech_emb + speech_pos). The conditioning's P positions enter as input vectors (Prepared.prompt_embeds).
Prompt: conditioning, [start] text [stop], start-of-speech twice (both at speech position 0, as the publisher
feeds it); the token drawn at step i enters at speech position i + 1. With `cfg_weight` w > 0 a request runs a
second, unconditioned row and draws from cond + w (cond - uncond). Speech tokens >= 6561 are not audio (6562 ends).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from streamvox.codecs.cosyvoice_frontend import SPEECH_SAMPLE_RATE, resample
from streamvox.codecs.s3gen import (
    CHUNK_TOKENS,
    FIRST_CHUNK_TOKENS,
    LOOKAHEAD_TOKENS,
    S3GEN_PARAMS,
    SAMPLE_RATE,
    SAMPLES_PER_TOKEN,
    TINY_S3GEN_PARAMS,
    S3Gen,
    S3GenChunk,
    S3GenConditioning,
)
from streamvox.codecs.voice_encoder import VoiceEncoder
from streamvox.config import SamplingParams
from streamvox.layers.attention import AttentionMetadata
from streamvox.layers.linear import Linear
from streamvox.layers.norm import RMSNorm
from streamvox.layers.rotary import RotaryEmbedding
from streamvox.models.base import Chunking, ChunkJob, Guidance, Prepared, Reference, SpeechModel, TimingFacts
from streamvox.models.chatterbox_cond import (
    SPEECH_COND_PROMPT_LEN,
    START_SPEECH_TOKEN,
    STOP_SPEECH_TOKEN,
    T3Embeddings,
)
from streamvox.models.chatterbox_text import ChatterboxTextTokenizer
from streamvox.models.clips import CLIP_CACHE_SIZE, ClipCache  # noqa: F401 - CLIP_CACHE_SIZE: the tests read it here
from streamvox.models.llama import LlamaConfig, LlamaDecoderLayer
from streamvox.models.params import load_checked, on_meta

FILES = ("t3_cfg.safetensors", "s3gen.safetensors", "ve.safetensors", "tokenizer.json")
HEAD_DIM = 64  # the publisher's Llama_520M: heads of 64, rope and norms below
LLAMA_FIXED = {"rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                                "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}}
AUDIO_TOKENS = 6561  # speech tokens below this are audio
VOICE_CLIP_S = 6.0  # the publisher conditions T3 on the clip's first 6 s (16 kHz), S3Gen on its first 10 s
TINY_MARKER = "streamvox_tiny.json"  # written by `make-tiny chatterbox`: random weights at the tiny sizes


@dataclass(frozen=True)
class T3Conditioning:
    """T3's per-speaker inputs (before the exaggeration, which is per request)."""

    speaker_emb: torch.Tensor  # [256] voice-encoder embedding
    prompt_tokens: torch.Tensor | None  # [<= 150] the clip's speech tokens


@dataclass(frozen=True)
class _Voice:
    t3: T3Conditioning
    gen: S3GenConditioning


class T3Backbone(nn.Module):
    """T3's Llama over the paged KV cache with its input tables and speech head; `config.vocab_size` is the
    speech head's width."""

    def __init__(self, llama: LlamaConfig, embeddings: T3Embeddings) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.text_vocab = embeddings.config.text_vocab
        self.config = LlamaConfig(**{**llama.__dict__, "vocab_size": embeddings.config.speech_vocab})
        self.layers = nn.ModuleList(LlamaDecoderLayer(llama) for _ in range(llama.num_hidden_layers))
        self.norm = RMSNorm(llama.hidden_size, llama.rms_norm_eps)
        self.rotary = RotaryEmbedding(llama.head_dim, llama.rope_theta, llama.rope_scaling)
        self.speech_head = Linear(llama.hidden_size, embeddings.config.speech_vocab, bias=False)

    def embed(self, rows: torch.Tensor) -> torch.Tensor:
        """[T, 2] (id, local position) -> [T, hidden]."""
        emb, ids, local = self.embeddings, rows[:, 0], rows[:, 1]
        vocab = self.text_vocab
        is_text, is_speech = ids < 2 * vocab, ids >= 2 * vocab
        text = emb.text_emb(ids.clamp(0, vocab - 1)) * (ids < vocab)[:, None] + \
            emb.text_pos_emb(local.clamp(0, emb.text_pos_emb.emb.num_embeddings - 1))
        speech = emb.speech_emb((ids - 2 * vocab).clamp(0, emb.speech_emb.num_embeddings - 1)) + \
            emb.speech_pos_emb(local.clamp(0, emb.speech_pos_emb.emb.num_embeddings - 1))
        return torch.where(is_speech[:, None], speech, torch.where(is_text[:, None], text, 0.0))

    def forward(self, rows: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_caches,
                embeds=None) -> torch.Tensor:
        x = self.embed(rows)
        if embeds is not None:
            x = x.index_copy(0, embeds[0], embeds[1].to(x.dtype))
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            x = layer(x, positions, self.rotary, meta, kv)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.speech_head(hidden).float()


class ChatterboxFrameBuilder:
    def push(self, token: int) -> tuple[int, ...] | None:
        return (token,) if token < AUDIO_TOKENS else None


class ChatterboxModel(SpeechModel):
    family = "chatterbox"
    # the publisher's generate(): temperature 0.8, min-p 0.05, top-p 1, repetition penalty 1.2, 1000 tokens
    default_sampling = SamplingParams(temperature=0.8, min_p=0.05, repetition_penalty=1.2, max_tokens=1000)
    # each chunk reruns S3Gen's flow over the voice's prompt tokens and every token so far (the request's plan
    # says how many prompt tokens its voice has)
    chunking = Chunking(FIRST_CHUNK_TOKENS, CHUNK_TOKENS, LOOKAHEAD_TOKENS, is_stateful=True, codec_prefix_frames=0)
    codes_per_frame = 1
    takes_reference_audio = True
    codec_cost_per_frame = 8 / (2 * CHUNK_TOKENS)  # about two chunks a call (measured like CosyVoice2's)
    options = {"exaggeration": (0.5, 0.0, 2.0), "cfg_weight": (0.5, 0.0, 2.0)}  # the publisher's defaults
    stop_token_ids = frozenset({STOP_SPEECH_TOKEN})
    timing = TimingFacts(SAMPLE_RATE, SAMPLES_PER_TOKEN, lm_steps_per_frame=1)

    def __init__(self, backbone: T3Backbone, tokenizer: ChatterboxTextTokenizer, s3gen: S3Gen,
                 voice_encoder: VoiceEncoder, voices: dict[str, _Voice]) -> None:
        self.backbone, self.tokenizer, self.s3gen, self.voice_encoder = backbone, tokenizer, s3gen, voice_encoder
        self.builtin = voices
        self.voices = tuple(voices)
        self.default_voice = self.voices[0] if self.voices else None
        self.is_random_weights = False
        self._clips = ClipCache()  # a clip's voice, once per distinct clip

    # -- checkpoint ----------------------------------------------------------------------------------------

    @classmethod
    def detect(cls, path: Path, name: str) -> bool:
        return (path / "t3_cfg.safetensors").is_file() and (path / "s3gen.safetensors").is_file()

    @classmethod
    def load(cls, path: Path, codec_dir: Path | None, dtype: torch.dtype, device: torch.device) -> ChatterboxModel:
        missing = [name for name in FILES if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} lacks {', '.join(missing)} of the Chatterbox layout")
        state = load_file(str(path / "t3_cfg.safetensors"))
        embeddings = T3Embeddings.from_state_dict(state)
        with on_meta():
            backbone = T3Backbone(t3_llama_config(state), T3Embeddings(embeddings.config))
        tensors = {name[len("tfmr.") :]: t for name, t in state.items() if name.startswith("tfmr.")
                   and name != "tfmr.embed_tokens.weight" and "rotary_emb" not in name}
        tensors |= {f"embeddings.{name}": t for name, t in embeddings.state_dict().items()}
        tensors["speech_head.weight"] = state["speech_head.weight"]
        load_checked(backbone, tensors, "Chatterbox's T3", device, dtype)
        # the publisher's code fixes S3Gen's sizes; a tiny checkpoint says it has the tiny ones
        is_tiny = (path / TINY_MARKER).is_file()
        s3gen = S3Gen.from_safetensors(path / "s3gen.safetensors", TINY_S3GEN_PARAMS if is_tiny else S3GEN_PARAMS,
                                       device=device)
        voice_encoder = VoiceEncoder.from_file(path / "ve.safetensors")
        voices = {"default": _builtin_voice(path / "conds.pt")} if (path / "conds.pt").is_file() else {}
        model = cls(backbone, ChatterboxTextTokenizer(path / "tokenizer.json"), s3gen, voice_encoder, voices)
        model.is_random_weights = is_tiny
        return model

    # -- prompt ------------------------------------------------------------------------------------------------

    def prepare(self, text: str, voice: str | None) -> list:
        return self.prepare_request(text, voice).prompt

    def prepare_request(self, text: str, voice: str | None, reference: Reference | None = None,
                        options: dict[str, float] | None = None) -> Prepared:
        """The conditioning (a cloned clip's, or a built-in voice's) as input vectors, the text, and with
        cfg_weight > 0 the unconditioned guidance row."""
        chosen = {name: (options or {}).get(name, default) for name, (default, _, _) in self.options.items()}
        speaker = self._clone(reference) if reference is not None else self._builtin(voice)
        with torch.inference_mode():
            cond = self.backbone.embeddings.conditioning(speaker.t3.speaker_emb.to(self.device),
                                                         speaker.t3.prompt_tokens, chosen["exaggeration"])
        text_ids = self.tokenizer.text_ids(text)
        vocab = self.backbone.text_vocab
        start = (2 * vocab + START_SPEECH_TOKEN, 0)
        blank = [(0, 0)] * cond.shape[0]  # their input vectors come from prompt_embeds
        prompt = [*blank, *[(i, p) for p, i in enumerate(text_ids)], start, start]
        guidance = None
        if chosen["cfg_weight"] > 0:
            unconditioned = [*blank, *[(vocab + i, p) for p, i in enumerate(text_ids)], start, start]
            guidance = Guidance((unconditioned,), (-chosen["cfg_weight"],))
        chunking = dataclasses.replace(self.chunking, codec_prefix_frames=speaker.gen.prompt_tokens.shape[0])
        return Prepared(prompt, conditioning=speaker.gen, chunking=chunking, prompt_embeds=cond.float().cpu(),
                        guidance=guidance)

    def _builtin(self, voice: str | None) -> _Voice:
        voice = self.resolve_voice(voice)
        if voice is None:
            raise ValueError("this checkpoint has no built-in voice (conds.pt): send a reference clip and its "
                             "transcript")
        return self.builtin[voice]

    def _clone(self, reference: Reference) -> _Voice:
        """A clip's voice (T3 and S3Gen conditioning), computed once per distinct clip."""
        if not reference.text.strip():
            raise ValueError("reference audio needs its transcript (what is said in it): send audio_text")
        return self._clips.get(reference.pcm, self._voice_of)

    def _voice_of(self, pcm: torch.Tensor) -> _Voice:
        gen = self.s3gen.embed_ref(pcm, SAMPLE_RATE)  # ValueError for a silent or unusable clip
        clip16 = resample(pcm.float(), SAMPLE_RATE, SPEECH_SAMPLE_RATE)
        with torch.inference_mode():
            speaker = self.voice_encoder.embed(clip16, SPEECH_SAMPLE_RATE)
            head = clip16[: int(VOICE_CLIP_S * SPEECH_SAMPLE_RATE)].to(self.s3gen_device)
            tokens = self.s3gen.tokenizer.tokenize(head).cpu()[:SPEECH_COND_PROMPT_LEN]
        return _Voice(T3Conditioning(speaker, tokens), gen)

    @property
    def s3gen_device(self) -> torch.device:
        return next(self.s3gen.parameters()).device

    # -- steps and audio ---------------------------------------------------------------------------------------

    def next_input(self, token: int, text_id: int | None, step: int = 0) -> tuple[int, int]:
        return (2 * self.backbone.text_vocab + token, step + 1)

    def new_frame_builder(self) -> ChatterboxFrameBuilder:
        return ChatterboxFrameBuilder()

    def new_codec_state(self, conditioning: Any = None, seed: int = 0):
        if conditioning is None:
            conditioning = self._builtin(None).gen
        return self.s3gen.new_stream(conditioning, seed)

    def decode_chunks(self, jobs: list[ChunkJob]) -> list[torch.Tensor]:
        """Chunk by chunk of the family's plan (S3Gen's audio depends on where chunks end), one chunk of every
        job a round."""
        plans = [job.hops(self.chunking) for job in jobs]
        pieces: list[list[torch.Tensor]] = [[] for _ in jobs]
        for round_index in range(max(len(plan) for plan in plans)):
            active = [(i, plan[round_index]) for i, plan in enumerate(plans) if round_index < len(plan)]
            chunks = [S3GenChunk(jobs[i].state, jobs[i].frames[:, 0], start, end, is_last)
                      for i, (start, end, is_last) in active]
            for (i, _), pcm in zip(active, self.s3gen.decode_chunks(chunks), strict=True):
                pieces[i].append(pcm)
        return [torch.cat(parts) for parts in pieces]


def t3_llama_config(state: dict[str, torch.Tensor]) -> LlamaConfig:
    """The backbone's sizes from its tensors (the publisher ships no config: heads of 64, Llama 3 rope)."""
    hidden = state["text_emb.weight"].shape[1]
    layers = 1 + max(int(name.split(".")[2]) for name in state if name.startswith("tfmr.layers."))
    fields = {"vocab_size": state["speech_head.weight"].shape[0], "hidden_size": hidden, "num_hidden_layers": layers,
              "intermediate_size": state["tfmr.layers.0.mlp.gate_proj.weight"].shape[0],
              "num_attention_heads": hidden // HEAD_DIM, "head_dim": HEAD_DIM,
              "num_key_value_heads": state["tfmr.layers.0.self_attn.k_proj.weight"].shape[0] // HEAD_DIM,
              **LLAMA_FIXED}
    return LlamaConfig.from_fields(fields, "Chatterbox T3")


def _builtin_voice(path: Path) -> _Voice:
    """conds.pt: the publisher's Conditionals (T3 speaker embedding and prompt tokens; S3Gen reference)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    t3, gen = saved["t3"], saved["gen"]
    tokens = t3.get("cond_prompt_speech_tokens")
    prompt = gen["prompt_token"].reshape(-1).long()
    mel = gen["prompt_feat"].reshape(-1, gen["prompt_feat"].shape[-1]).float()
    return _Voice(T3Conditioning(t3["speaker_emb"].reshape(-1).float(), None if tokens is None else
                                 tokens.reshape(-1).long()),
                  S3GenConditioning(prompt, mel, gen["embedding"].reshape(-1).float()))
