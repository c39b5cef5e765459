"""Sesame CSM: a Llama backbone over frames of 32 Mimi codes, plus a small depth decoder for codebooks 1-31.

One backbone step per 12.5 Hz frame. An input position is a text token (its own embedding table) or an audio
frame (the sum of its 32 codebook embeddings); we carry both as a row of 33 ids, codes first and the text id
last, -1 where unused. The backbone's head draws codebook 0; the depth decoder then runs 32 positions of its
own (the backbone's last hidden state, then codebooks 0..30 embedded) and draws codebooks 1..31, one head per
codebook. The whole frame is fed back as the next backbone input. A frame whose first 31 codes are all 0
(`codebook_eos_token_id`) ends the speech and is not voiced.

Prompt, per conversation segment: <|begin_of_text|> "[speaker]text" <|end_of_text|>, then, if the segment
has audio, its frames and a frame of zeros (the audio end). The text to speak is the last segment, with no
audio; generation continues from its end-of-text. The Mimi decoder is stateful: each request's chunks
continue its own decoder state (streamvox.codecs.mimi).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from streamvox.codecs.mimi import MimiCodec, read_tensors
from streamvox.codecs.mimi import tiny_tensors as tiny_mimi_tensors
from streamvox.codecs.mimi_encoder import ENCODER_PREFIXES, MimiEncoder
from streamvox.config import SamplingParams, random_init_seed
from streamvox.layers.attention import AttentionMetadata
from streamvox.layers.linear import Linear
from streamvox.layers.norm import RMSNorm
from streamvox.layers.rotary import RotaryEmbedding
from streamvox.models.base import (
    Chunking,
    ChunkJob,
    ExtraSampler,
    Prepared,
    Reference,
    SpeechModel,
    StepToken,
    TimingFacts,
)
from streamvox.models.checkpoint import read_config_if_any
from streamvox.models.depth import DepthDecoder
from streamvox.models.llama import LlamaConfig, LlamaDecoderLayer
from streamvox.models.params import load_checked, on_meta, random_init

CODEC_PREFIX = "codec_model."
CODEC_HUB_ID = "kyutai/mimi"
VOICES = ("0", "1")  # speaker ids of the conversation format


@dataclass(frozen=True)
class Segment:
    """One turn of conversational context: what `speaker` said, and optionally its Mimi codes [frames, 32]."""

    speaker: str
    text: str
    codes: torch.Tensor | None = None


@dataclass(frozen=True)
class CsmIds:
    num_codebooks: int
    audio_vocab_size: int  # per codebook, as the heads see it (codes + a few special ids)
    codebook_eos: int  # a frame of these ends the speech
    begin_of_text: int
    end_of_text: int

    @classmethod
    def from_config(cls, config: dict, tokenizer: Tokenizer) -> CsmIds:
        ids = [tokenizer.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>")]
        if None in ids:
            raise ValueError("the CSM tokenizer lacks <|begin_of_text|> or <|end_of_text|>")
        return cls(config.get("num_codebooks", 32), config["vocab_size"], config.get("codebook_eos_token_id", 0),
                   *ids)


class _AudioEmbeddings(nn.Module):
    def __init__(self, num_codebooks: int, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.embed_audio_tokens = nn.Embedding(num_codebooks * vocab_size, hidden_size)


class _BackboneModel(nn.Module):
    def __init__(self, config: LlamaConfig, num_codebooks: int) -> None:
        super().__init__()
        self.embed_tokens = _AudioEmbeddings(num_codebooks, config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)


class CsmBackbone(nn.Module):
    """The backbone over the paged KV cache; parameter names are the checkpoint's (minus depth and codec)."""

    def __init__(self, config: LlamaConfig, text_vocab_size: int, num_codebooks: int) -> None:
        super().__init__()
        self.config = config
        self.num_codebooks = num_codebooks
        self.backbone_model = _BackboneModel(config, num_codebooks)
        self.embed_text_tokens = nn.Embedding(text_vocab_size, config.hidden_size)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("offsets", torch.arange(num_codebooks, device="cpu") * config.vocab_size,
                             persistent=False)
        self.num_codes = config.vocab_size  # ids at or past it are never drawn (set to the codec's codebook size)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs [T, 33] -> [T, hidden]: a text row's token embedding, or an audio row's summed code embeddings."""
        text = inputs[:, self.num_codebooks]
        is_text = (text >= 0)[:, None]
        text_x = self.embed_text_tokens(text.clamp(min=0))
        codes = inputs[:, : self.num_codebooks].clamp(min=0)  # a text row's -1 codes: any id, its sum is unused
        audio_x = self.backbone_model.embed_tokens.embed_audio_tokens(codes + self.offsets).sum(dim=1)
        return torch.where(is_text, text_x, audio_x)

    def forward(self, inputs, positions, meta: AttentionMetadata, kv_caches) -> torch.Tensor:
        x = self.embed(inputs)
        for layer, kv in zip(self.backbone_model.layers, kv_caches, strict=True):
            x = layer(x, positions, self.backbone_model.rotary, meta, kv)
        return self.backbone_model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] fp32; ids the codec cannot decode (the heads' special ids) at -inf."""
        logits = self.lm_head(hidden).float()
        logits[:, self.num_codes :] = float("-inf")
        return logits


class _DepthModel(nn.Module):
    def __init__(self, config: LlamaConfig, num_codebooks: int, backbone_hidden: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(num_codebooks * config.vocab_size, backbone_hidden)
        self.inputs_embeds_projector = Linear(backbone_hidden, config.hidden_size, bias=False)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)


class _CodebooksHead(nn.Module):
    def __init__(self, num_codebooks: int, hidden_size: int, vocab_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_codebooks - 1, hidden_size, vocab_size))


class CsmDepthDecoder(DepthDecoder):
    """Codebooks 1..31: one embedding table for all codebooks (codebook k at offset k * vocab), a projection
    from the backbone's width, and a [31, hidden, vocab] head with one matrix per codebook."""

    def __init__(self, config: LlamaConfig, num_codebooks: int, backbone_hidden: int) -> None:
        super().__init__()
        self.config = config
        self.num_codebooks = num_codebooks
        self.model = _DepthModel(config, num_codebooks, backbone_hidden)
        self.codebooks_head = _CodebooksHead(num_codebooks, config.hidden_size, config.vocab_size)

    def embed_code(self, index: int, codes: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(codes + index * self.config.vocab_size)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.inputs_embeds_projector(x)

    def code_logits(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.codebooks_head.weight[index - 1]


class CsmFrameBuilder:
    """Every step's output is a whole frame; the end-of-speech frame is not voiced."""

    def __init__(self, codebook_eos: int) -> None:
        self._eos = codebook_eos

    def push(self, frame: tuple[int, ...]) -> tuple[int, ...] | None:
        return None if _is_eos(frame, self._eos) else frame


def _is_eos(frame: tuple[int, ...], eos: int) -> bool:
    return all(code == eos for code in frame[:-1])


class CsmModel(SpeechModel):
    family = "csm"
    voices = VOICES
    default_voice = "0"
    # the publisher's generator: temperature 0.9, top-k 50, at most 90 s of audio
    default_sampling = SamplingParams(temperature=0.9, top_k=50, max_tokens=1125)
    chunking = Chunking(first_chunk_frames=1, frames_per_chunk=1, lookahead_frames=0, is_stateful=True)
    stop_token_ids = frozenset()
    codec_location = (".", CODEC_HUB_ID)  # Mimi comes in the checkpoint's own tensors

    def __init__(self, config: dict, backbone: CsmBackbone, depth: CsmDepthDecoder, tokenizer: Tokenizer,
                 codec: MimiCodec, encoder: MimiEncoder | None = None) -> None:
        self.ids = CsmIds.from_config(config, tokenizer)
        self.backbone = backbone
        self.depth = depth
        self.tokenizer = tokenizer
        self.tokenizer.encode_special_tokens = True  # text that spells a control token stays text
        self.codec = codec
        # reference audio -> codes, on the CPU where prompts are prepared; None when the checkpoint lacks it
        self.encoder = encoder
        self.takes_reference_audio = self.keeps_context = encoder is not None
        if codec.num_codebooks != self.ids.num_codebooks:
            raise ValueError(f"the Mimi codec has {codec.num_codebooks} codebooks, the model {self.ids.num_codebooks}")
        self.codes_per_frame = self.ids.num_codebooks
        self.num_codes = min(codec.codebook_size, self.ids.audio_vocab_size)  # ids the codec can decode
        backbone.num_codes = self.num_codes
        self.timing = TimingFacts(codec.sample_rate, codec.samples_per_frame, lm_steps_per_frame=1)
        self.is_random_weights = bool(config.get("streamvox_random_weights", False))

    @classmethod
    def detect(cls, path: Path, name: str) -> bool:
        config = read_config_if_any(path) or {}
        return config.get("model_type") == "csm" or "CsmForConditionalGeneration" in (config.get("architectures")
                                                                                      or [])

    @classmethod
    def from_parts(cls, config: dict, state_dict: dict | None, tokenizer_path: Path, codec_dir: Path,
                   dtype: torch.dtype, device: torch.device) -> CsmModel:
        num_codebooks = config.get("num_codebooks", 32)
        backbone_config = LlamaConfig.from_fields(config, "CSM")
        depth_config = LlamaConfig.from_fields(config.get("depth_decoder_config") or {}, "CSM depth decoder")
        with on_meta():
            backbone = CsmBackbone(backbone_config, config["text_vocab_size"], num_codebooks)
            depth = CsmDepthDecoder(depth_config, num_codebooks, backbone_config.hidden_size)
        if state_dict is None:
            seed = random_init_seed(config)
            random_init(backbone, seed, device, dtype)
            random_init(depth, seed + 1, device, dtype, fan_in=_fan_in)
            codec_tensors = tiny_mimi_tensors(config["codec_config"], seed)
            state_dict = {CODEC_PREFIX + name: tensor for name, tensor in codec_tensors.items()}
        else:
            _load_csm_weights(backbone, depth, state_dict, config.get("tie_codebooks_embeddings", True), device, dtype)
        codec, encoder = _load_codec(config, state_dict, codec_dir)
        return cls(config, backbone, depth, Tokenizer.from_file(str(tokenizer_path)), codec.to(device), encoder)

    def prepare(self, text: str, voice: str | None) -> list[StepToken]:
        return self.prepare_conversation([], text, voice)

    def prepare_request(self, text: str, voice: str | None, reference: Reference | None = None) -> Prepared:
        """With a reference, its clip (Mimi-encoded) and transcript are a context turn of the same speaker, so the
        text is spoken in that voice."""
        if reference is None:
            return Prepared(self.prepare(text, voice))
        if self.encoder is None:
            raise ValueError("this checkpoint has no Mimi encoder, so it cannot take reference audio")
        if not reference.text.strip():
            raise ValueError("reference audio needs its transcript (what is said in it)")
        codes = self.encoder.encode(reference.pcm)
        speaker = self.resolve_voice(voice)
        return Prepared(self.prepare_conversation([Segment(speaker, reference.text, codes)], text, speaker))

    def prepare_conversation(self, context: list[Segment], text: str, voice: str | None) -> list[StepToken]:
        """Prompt rows for `text` spoken by `voice`, after the context segments (oldest first)."""
        rows: list[StepToken] = []
        for segment in [*context, Segment(self.resolve_voice(voice), text)]:
            rows += self._text_rows(f"[{segment.speaker}]{segment.text}")
            if segment.codes is not None:
                codes = segment.codes.tolist()
                if any(len(frame) != self.ids.num_codebooks for frame in codes):
                    raise ValueError(f"context audio codes must be [frames, {self.ids.num_codebooks}]")
                eos = [self.ids.codebook_eos] * self.ids.num_codebooks
                rows += [self.next_input(tuple(frame)) for frame in [*codes, eos]]
        return rows

    def _text_rows(self, text: str) -> list[StepToken]:
        ids = [self.ids.begin_of_text, *self.tokenizer.encode(text, add_special_tokens=False).ids,
               self.ids.end_of_text]
        blank = (-1,) * self.ids.num_codebooks
        return [(*blank, token) for token in ids]

    def complete_step(self, hidden: torch.Tensor, tokens: torch.Tensor, sample: ExtraSampler) -> torch.Tensor:
        return self.depth.generate(hidden.to(self.depth.model.embed_tokens.weight.dtype), tokens, sample,
                                   self.num_codes)

    def next_input(self, token: StepToken, text_id: int | None = None, step: int = 0) -> StepToken:
        return (*token, -1)

    def is_stop(self, token: StepToken) -> bool:
        return _is_eos(token, self.ids.codebook_eos)

    def new_frame_builder(self) -> CsmFrameBuilder:
        return CsmFrameBuilder(self.ids.codebook_eos)

    def new_codec_state(self, conditioning=None, seed: int = 0):
        return self.codec.new_state()

    def release_codec_state(self, state) -> None:
        self.codec.release(state)

    def decode_chunks(self, jobs: list[ChunkJob]) -> list[torch.Tensor]:
        codes = [job.frames[job.start_frame : job.end_frame].clamp(0, self.num_codes - 1) for job in jobs]
        return self.codec.decode(codes, [job.state for job in jobs])


def _fan_in(name: str, shape: torch.Size) -> int:
    return shape[-2] if "codebooks_head" in name else shape[-1]  # the head is [codebooks, hidden, vocab]


def _load_csm_weights(backbone: CsmBackbone, depth: CsmDepthDecoder, state_dict: dict, tie: bool,
                      device: torch.device, dtype: torch.dtype) -> None:
    """Load the backbone_model./embed_text_tokens./lm_head. and depth_decoder. tensors; tied codebook embeddings
    may be stored under either name."""
    audio_key = "backbone_model.embed_tokens.embed_audio_tokens.weight"
    depth_key = "depth_decoder.model.embed_tokens.weight"
    tensors = {k: v for k, v in state_dict.items() if not k.startswith(CODEC_PREFIX) and "rotary_emb" not in k}
    if tie:
        shared = tensors.get(audio_key, tensors.get(depth_key))
        if shared is not None:
            tensors[audio_key] = tensors[depth_key] = shared
    load_checked(backbone, {k: v for k, v in tensors.items() if not k.startswith("depth_decoder.")}, "the CSM config",
                 device, dtype)
    load_checked(depth, {k[len("depth_decoder.") :]: v for k, v in tensors.items() if k.startswith("depth_decoder.")},
                 "the CSM depth decoder config", device, dtype)


def _load_codec(config: dict, state_dict: dict, codec_dir: Path) -> tuple[MimiCodec, MimiEncoder | None]:
    """The Mimi inside the checkpoint (codec_model. tensors), or a separate kyutai/mimi directory; its encoder
    half too when the weights have it."""
    config_path = codec_dir / "config.json"
    if config_path.is_file() and json.loads(config_path.read_text()).get("model_type") == "mimi":
        codec_config = json.loads(config_path.read_text())
        codec_tensors = read_tensors(codec_dir)
    else:
        codec_config = config.get("codec_config")
        codec_tensors = {k[len(CODEC_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(CODEC_PREFIX)}
    if not codec_tensors or codec_config is None:
        raise FileNotFoundError(f"{codec_dir} holds no Mimi codec (neither codec_model. tensors with a codec_config, "
                                "nor a kyutai/mimi directory); pass --codec with a Mimi directory")
    has_encoder = any(k.startswith(ENCODER_PREFIXES) for k in codec_tensors)
    return (MimiCodec(codec_config, codec_tensors),
            MimiEncoder(codec_config, codec_tensors) if has_encoder else None)
