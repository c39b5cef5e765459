"""Qwen3-TTS (12 Hz): a Qwen3 talker over 16-codebook frames, a code predictor for codebooks 1-15, text riding
along with the generated frames, and the 12 Hz tokenizer's stateful decoder.

Every talker position is the sum of a text track and a codec track, carried as a row of 17 ids (16 codec
columns, then the text id; -1 where a track is empty):
- text: text_projection(text_embedding(id)), an MLP from the text model's width to the talker's;
- codec: codebook 0 through the talker's codec embedding (also used for its special ids: think, language,
  speaker, pad, bos), codebooks 1-15 through the code predictor's tables.

Prompt (the publisher's streaming-text layout): the role tokens `<|im_start|>assistant\\n` (text only); then
the codec prefix (nothink, think_bos, think_eos; or think, think_bos, language, think_eos), the speaker's id,
codec_pad, each with the text track tts_pad (tts_bos on the last); then the first text token over codec_bos.
Generated step t feeds back its frame plus text token t + 1 of the input, then tts_eos, then tts_pad: the
text trails the audio by one token a frame, so text may arrive while audio is made, and a request whose
next text token has not arrived yet pauses. Codebook 0 = codec_eos ends the speech (that frame is silent).
The talker's head never draws its special ids other than codec_eos, nor codec_eos in the first 2 steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn
from torch.nn import functional as F

from streamvox.codecs.qwen_12hz import Qwen12HzCodec
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
from streamvox.models.qwen_tokenizer import load_tokenizer

CODEC_SUBDIR = "speech_tokenizer"
CODEC_HUB_ID = "Qwen/Qwen3-TTS-Tokenizer-12Hz"
HEAD = "assistant\n"  # after <|im_start|>: the role tokens the prompt starts with
NUM_ROLE_TOKENS = 3
SPECIAL_SPAN = 1024  # the talker's top ids are control ids, never drawn (codec_eos aside)
MIN_STEPS = 2  # codec_eos is not drawn before this many frames


@dataclass(frozen=True)
class QwenTtsIds:
    tts_bos: int
    tts_eos: int
    tts_pad: int
    codec_eos: int
    codec_pad: int
    codec_bos: int
    think: int
    nothink: int
    think_bos: int
    think_eos: int

    @classmethod
    def from_config(cls, config: dict) -> QwenTtsIds:
        talker = config["talker_config"]
        return cls(config.get("tts_bos_token_id", 151672), config.get("tts_eos_token_id", 151673),
                   config.get("tts_pad_token_id", 151671), talker["codec_eos_token_id"], talker["codec_pad_id"],
                   talker["codec_bos_id"], talker["codec_think_id"], talker["codec_nothink_id"],
                   talker["codec_think_bos_id"], talker["codec_think_eos_id"])


class _TalkerModel(nn.Module):
    def __init__(self, config: LlamaConfig, text_vocab_size: int, text_hidden_size: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, None)
        self.codec_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.text_embedding = nn.Embedding(text_vocab_size, text_hidden_size)


class _TextProjection(nn.Module):
    def __init__(self, text_hidden_size: int, hidden_size: int) -> None:
        super().__init__()
        self.linear_fc1 = Linear(text_hidden_size, text_hidden_size, bias=True)
        self.linear_fc2 = Linear(text_hidden_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.silu(self.linear_fc1(x)))


class _PredictorModel(nn.Module):
    def __init__(self, config: LlamaConfig, num_codebooks: int, talker_hidden: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, None)
        self.codec_embedding = nn.ModuleList(nn.Embedding(config.vocab_size, talker_hidden)
                                             for _ in range(num_codebooks - 1))


class QwenCodePredictor(DepthDecoder):
    """Codebooks 1..15: a table and a head per codebook; codebook 0 enters through the talker's table."""

    def __init__(self, config: LlamaConfig, num_codebooks: int, talker_hidden: int,
                 first_embedding: nn.Embedding) -> None:
        super().__init__()
        self.config = config
        self.num_codebooks = num_codebooks
        self.model = _PredictorModel(config, num_codebooks, talker_hidden)
        self.lm_head = nn.ModuleList(Linear(config.hidden_size, config.vocab_size, bias=False)
                                     for _ in range(num_codebooks - 1))
        self.small_to_mtp_projection = (Linear(talker_hidden, config.hidden_size, bias=True)
                                        if talker_hidden != config.hidden_size else nn.Identity())
        self._first_embedding = (first_embedding,)  # the talker's: not a parameter of this module

    def embed_code(self, index: int, codes: torch.Tensor) -> torch.Tensor:
        return self._first_embedding[0](codes) if index == 0 else self.model.codec_embedding[index - 1](codes)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.small_to_mtp_projection(x)

    def code_logits(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head[index - 1](hidden)


class QwenTalker(nn.Module):
    """The talker over the paged KV cache, with its code predictor; names are the checkpoint's under `talker.`."""

    def __init__(self, config: LlamaConfig, predictor_config: LlamaConfig, num_codebooks: int,
                 text_vocab_size: int, text_hidden_size: int, codec_eos: int) -> None:
        super().__init__()
        self.config = config
        self.num_codebooks = num_codebooks
        self.model = _TalkerModel(config, text_vocab_size, text_hidden_size)
        self.text_projection = _TextProjection(text_hidden_size, config.hidden_size)
        self.codec_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.code_predictor = QwenCodePredictor(predictor_config, num_codebooks, config.hidden_size,
                                                self.model.codec_embedding)
        never = torch.zeros(config.vocab_size, dtype=torch.bool, device="cpu")
        never[max(0, config.vocab_size - SPECIAL_SPAN) :] = True
        never[codec_eos] = False
        self.register_buffer("never_drawn", never, persistent=False)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs [T, 17] -> [T, hidden]: the text track plus every codec column present."""
        codes, text = inputs[:, : self.num_codebooks], inputs[:, self.num_codebooks]
        has_text, has_codec, is_frame = (text >= 0)[:, None], (codes[:, :1] >= 0), (codes[:, 1:2] >= 0)
        known = codes.clamp(min=0)  # -1 (an empty track) looks up any id; masks keep it out of the sum
        x = torch.where(has_text, self.text_projection(self.model.text_embedding(text.clamp(min=0))), 0.0)
        x = x + torch.where(has_codec, self.model.codec_embedding(known[:, 0]), 0.0)
        tables = self.code_predictor.model.codec_embedding
        frames = sum(tables[k - 1](known[:, k]) for k in range(1, self.num_codebooks))
        return x + torch.where(is_frame, frames, 0.0)

    def forward(self, inputs, positions, meta: AttentionMetadata, kv_caches) -> torch.Tensor:
        x = self.embed(inputs)
        for layer, kv in zip(self.model.layers, kv_caches, strict=True):
            x = layer(x, positions, self.model.rotary, meta, kv)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.codec_head(hidden).float()
        return logits.masked_fill(self.never_drawn, float("-inf"))


class QwenFrameBuilder:
    def __init__(self, codec_eos: int) -> None:
        self._eos = codec_eos

    def push(self, frame: tuple[int, ...]) -> tuple[int, ...] | None:
        return None if frame[0] == self._eos else frame


class QwenTextStream:
    """Text of one request arriving in pieces -> text ids, each given out once it can no longer change.

    The text is tokenized whole each time, as the reference tokenizes the whole input; ids inside the last two
    pre-tokenizer pieces (a word still being typed, the space before it) are held back until more text or the
    end comes. The end adds the rest and tts_eos."""

    def __init__(self, model: Qwen3TtsModel) -> None:
        self._model = model
        self._text = ""
        self._given = 0
        self.is_complete = False

    def feed(self, text: str, is_final: bool) -> list[int]:
        if self.is_complete:
            raise ValueError("the text of this request is already complete")
        self._text += text
        self.is_complete = is_final
        ids, stable = self._model.text_ids(self._text, is_final)
        new = ids[self._given : stable]
        self._given = max(self._given, stable)
        return new + [self._model.ids.tts_eos] if is_final else new


class Qwen3TtsModel(SpeechModel):
    family = "qwen3-tts"
    # the publisher's defaults: top-k 50, temperature 0.9 (talker and code predictor), repetition penalty 1.05
    default_sampling = SamplingParams(temperature=0.9, top_k=50, repetition_penalty=1.05, max_tokens=2048)
    chunking = Chunking(first_chunk_frames=1, frames_per_chunk=1, lookahead_frames=0, is_stateful=True)
    min_steps = MIN_STEPS
    codec_location = (CODEC_SUBDIR, CODEC_HUB_ID)
    style_prompt = "its CustomVoice checkpoints above 0.6B"

    def __init__(self, config: dict, talker: QwenTalker, tokenizer: Tokenizer, codec: Qwen12HzCodec) -> None:
        self.ids = QwenTtsIds.from_config(config)
        talker_config = config["talker_config"]
        self.backbone = talker
        self.tokenizer = tokenizer
        self.tokenizer.encode_special_tokens = True  # user text that spells a control token stays text
        self.codec = codec
        self.num_codebooks = self.codes_per_frame = talker.num_codebooks
        if codec.num_codebooks != self.num_codebooks:
            raise ValueError(f"the speech tokenizer has {codec.num_codebooks} codebooks, the talker "
                             f"{self.num_codebooks}")
        self.speakers = {name.lower(): spk for name, spk in (talker_config.get("spk_id") or {}).items()}
        self.dialects = {name.lower(): d for name, d in (talker_config.get("spk_is_dialect") or {}).items()}
        self.languages = {name.lower(): i for name, i in (talker_config.get("codec_language_id") or {}).items()}
        self.voices = tuple(self.speakers)
        self.default_voice = self.voices[0] if self.voices else None
        self.stop_token_ids = frozenset({self.ids.codec_eos})
        self.timing = TimingFacts(codec.sample_rate, codec.samples_per_frame, lm_steps_per_frame=1)
        self.is_random_weights = bool(config.get("streamvox_random_weights", False))
        im_start = self.tokenizer.token_to_id("<|im_start|>")
        self.num_head_ids = len(self.tokenizer.encode(HEAD, add_special_tokens=False).ids)
        if im_start is None or 1 + self.num_head_ids != NUM_ROLE_TOKENS:
            raise ValueError("the tokenizer does not make <|im_start|>assistant\\n 3 tokens: it is not the Qwen "
                             "tokenizer this prompt format expects")
        self.role_ids = [im_start, *self.tokenizer.encode(HEAD, add_special_tokens=False).ids]
        self.im_end = self.tokenizer.token_to_id("<|im_end|>")
        # as the publisher's inference: its 0.6B checkpoints leave instructions out
        self.takes_instructions = config.get("tts_model_size") != "0b6"

    @classmethod
    def detect(cls, path: Path, name: str) -> bool:
        config = read_config_if_any(path) or {}
        if config.get("model_type") != "qwen3_tts":
            return False
        if config.get("tokenizer_type", "qwen3_tts_tokenizer_12hz") != "qwen3_tts_tokenizer_12hz":
            raise ValueError(f"{name}: only the 12 Hz Qwen3-TTS models are supported, this one uses "
                             f"{config.get('tokenizer_type')}")
        return True

    @classmethod
    def from_parts(cls, config: dict, state_dict: dict | None, tokenizer_path: Path, codec_dir: Path,
                   dtype: torch.dtype, device: torch.device) -> Qwen3TtsModel:
        talker_config = config["talker_config"]
        rope = talker_config.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"Qwen3-TTS rope_scaling {rope} is not supported (default RoPE, with or without "
                             "M-RoPE sections, is)")
        # M-RoPE sections all see the same position for text and codec tokens: it is plain RoPE here
        talker_llama = LlamaConfig.from_fields(talker_config, "Qwen3-TTS talker", rope_scaling=None, qk_norm=True)
        predictor = talker_config.get("code_predictor_config") or {}
        predictor_llama = LlamaConfig.from_fields(predictor, "Qwen3-TTS code predictor", rope_scaling=None,
                                                  qk_norm=True)
        with on_meta():
            talker = QwenTalker(talker_llama, predictor_llama, talker_config.get("num_code_groups", 16),
                                talker_config["text_vocab_size"], talker_config["text_hidden_size"],
                                talker_config["codec_eos_token_id"])
        if state_dict is None:
            random_init(talker, random_init_seed(config), device, dtype)
        else:
            _load_talker(talker, state_dict, device, dtype)
        codec = Qwen12HzCodec.load(codec_dir).to(device)  # fp32, as the publisher decodes
        return cls(config, talker, load_tokenizer(tokenizer_path.parent), codec)

    # -- prompt and text ---------------------------------------------------------------------------------

    def resolve_voice(self, voice: str | None) -> str | None:
        return super().resolve_voice(voice.lower() if voice else voice)

    def text_ids(self, text: str, is_final: bool) -> tuple[list[int], int]:
        """The ids of `text` in the chat template, as the publisher cuts them out of
        `<|im_start|>assistant\\n{text}<|im_end|>...` (the template's markers split the text, so tokenizing
        `assistant\\n{text}` alone gives the same ids), and how many are final: all when the text is complete,
        else those before its last two pre-tokenizer pieces. Control tokens spelled in the text stay text."""
        encoding = self.tokenizer.encode(HEAD + text, add_special_tokens=False)
        ids = encoding.ids[self.num_head_ids :]
        if is_final:
            return ids, len(ids)
        pieces = self.tokenizer.pre_tokenizer.pre_tokenize_str(self.tokenizer.normalizer.normalize_str(text))
        cut = len(HEAD) + (pieces[-2][1][0] if len(pieces) >= 2 else 0)  # where the unsettled text starts
        return ids, sum(1 for start, end in encoding.offsets[self.num_head_ids :] if end <= cut)

    def open_text_stream(self) -> QwenTextStream:
        return QwenTextStream(self)

    def instruction_ids(self, instructions: str) -> list[int]:
        """A style prompt as the publisher puts it before the prompt: `<|im_start|>user\\n{instructions}<|im_end|>\\n`,
        its control tokens as such and the text between them as text."""
        user = self.tokenizer.encode("user\n" + instructions, add_special_tokens=False).ids
        return [self.role_ids[0], *user, self.im_end, *self.tokenizer.encode("\n", add_special_tokens=False).ids]

    def prompt_for(self, first_text_id: int, voice: str | None, instructions: str | None = None) -> list[StepToken]:
        """The prompt rows up to and including the first text token (see the module docstring), after the style
        prompt's text rows when there is one."""
        if instructions and not self.takes_instructions:
            raise ValueError("this Qwen3-TTS checkpoint (0.6B) takes no instructions; leave them out")
        voice = self.resolve_voice(voice)
        ids, blank = self.ids, (-1,) * self.num_codebooks
        language = self.languages.get(self.dialects.get(voice) or "") if voice else None
        prefix = ([ids.think, ids.think_bos, language, ids.think_eos] if language is not None
                  else [ids.nothink, ids.think_bos, ids.think_eos])
        if voice is not None:
            prefix.append(self.speakers[voice])
        prefix.append(ids.codec_pad)
        style = self.instruction_ids(instructions) if instructions else []
        rows: list[StepToken] = [(*blank, token) for token in [*style, *self.role_ids]]
        for i, codec_id in enumerate(prefix):
            text = ids.tts_bos if i == len(prefix) - 1 else ids.tts_pad
            rows.append((codec_id, *blank[1:], text))
        rows.append((ids.codec_bos, *blank[1:], first_text_id))
        return rows

    def prepare_request(self, text: str, voice: str | None, reference: Reference | None = None,
                        instructions: str | None = None) -> Prepared:
        if reference is not None:
            raise ValueError("voice cloning from reference audio is not supported for Qwen3-TTS yet; choose a "
                             "speaker")
        stream = self.open_text_stream()
        text_ids = stream.feed(text, True)
        if len(text_ids) < 2:
            raise ValueError("text is empty; give at least one word to speak")
        return Prepared(self.prompt_for(text_ids[0], voice, instructions), text_ids[1:])

    def prepare(self, text: str, voice: str | None) -> list[StepToken]:
        return self.prepare_request(text, voice).prompt

    # -- steps and audio ---------------------------------------------------------------------------------

    def complete_step(self, hidden: torch.Tensor, tokens: torch.Tensor, sample: ExtraSampler) -> torch.Tensor:
        predictor = self.backbone.code_predictor
        return predictor.generate(hidden, tokens, sample, predictor.config.vocab_size)

    def next_input(self, token: StepToken, text_id: int | None, step: int = 0) -> StepToken:
        return (*token, self.ids.tts_pad if text_id is None else text_id)

    def is_stop(self, token: StepToken) -> bool:
        return token[0] == self.ids.codec_eos

    def new_frame_builder(self) -> QwenFrameBuilder:
        return QwenFrameBuilder(self.ids.codec_eos)

    def new_codec_state(self, conditioning=None, seed: int = 0):
        return self.codec.new_state()

    def release_codec_state(self, state) -> None:
        self.codec.release(state)

    def decode_chunks(self, jobs: list[ChunkJob]) -> list[torch.Tensor]:
        codes = [job.frames[job.start_frame : job.end_frame].clamp(0, self.codec.codebook_size - 1) for job in jobs]
        return self.codec.decode(codes, [job.state for job in jobs])


def _load_talker(talker: QwenTalker, state_dict: dict, device: torch.device, dtype: torch.dtype) -> None:
    tensors = {k[len("talker.") :]: v for k, v in state_dict.items() if k.startswith("talker.")}
    load_checked(talker, tensors, "the Qwen3-TTS talker config", device, dtype)
