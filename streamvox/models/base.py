"""The model-execution abstraction every SpeechLM family implements (interface v2).

Stages, in order: prepare (text [+ reference audio] -> a `Prepared`: prompt, text riding along, the
detokenizer's conditioning, the request's chunk plan; CPU) -> forward (ragged batch over the paged KV cache) ->
sample (per-row parameters) -> frame bookkeeping (tokens -> frames, end of speech) -> decode chunk (frames ->
PCM through the detokenizer: a codec, or flow matching + a vocoder; batched across requests). A family knows
nothing of requests, queues or HTTP: it is the backbone wiring, the prompt format, the frame layout, the
detokenizer and the loader of its publisher's checkpoint layout. Its registry entry (models/registry.py) says
how a checkpoint is recognised and how a tiny one is written.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from streamvox.config import SamplingParams
from streamvox.models.checkpoint import load_hf_layout


@dataclass(frozen=True)
class TimingFacts:
    """Audio timing the scheduler plans with."""

    sample_rate: int  # Hz of the PCM the codec returns
    samples_per_frame: int  # PCM samples one codec frame becomes
    lm_steps_per_frame: int  # backbone steps that produce one frame

    @property
    def frame_rate_hz(self) -> float:
        return self.sample_rate / self.samples_per_frame


@dataclass(frozen=True)
class Chunking:
    """How frames are grouped into decoded chunks."""

    first_chunk_frames: int  # small, so the first audio comes fast
    frames_per_chunk: int  # every later chunk
    lookahead_frames: int  # frames past a chunk that must exist before it can be decoded (waived at the end)
    is_stateful: bool  # the codec carries per-request state from chunk to chunk
    # a detokenizer that reruns over the whole prefix for each chunk: the prompt frames it starts from (a chunk
    # ending at frame e reruns over this + e + lookahead); None: a chunk costs its own frames only
    codec_prefix_frames: int | None = None


@dataclass(frozen=True)
class ChunkJob:
    """Decode frames [start_frame, end_frame) of one request."""

    frames: torch.Tensor  # [num_known_frames, codes_per_frame] int64: every frame of the request so far
    start_frame: int
    end_frame: int
    is_last: bool  # the request's last chunk: no frame will follow `frames`
    seed: int  # makes any codec noise a function of the request alone
    state: Any = None  # the request's codec state (a stateful codec's; None otherwise)

    def hops(self, chunking: Chunking) -> list[tuple[int, int, bool]]:
        """(start, end, is_last) of the chunks of `chunking` this job covers (a job may cover several when the
        codec caught up): each ends at a chunk boundary, and the last takes the rest when no boundary with its
        lookahead is left. A detokenizer whose output depends on where chunks end decodes these, one by one, so
        that its audio does not depend on timing."""
        hops, start = [], self.start_frame
        while True:
            first, every = chunking.first_chunk_frames, chunking.frames_per_chunk
            boundary = first if start < first else first + ((start - first) // every + 1) * every
            if boundary >= self.end_frame or (self.is_last and len(self.frames) < boundary + chunking.lookahead_frames):
                return [*hops, (start, self.end_frame, self.is_last)]
            hops.append((start, boundary, False))
            start = boundary


# What one backbone step produces for a request: a token id (one codebook per step, as Orpheus), or a frame of
# codes (a backbone + depth decoder family, as CSM). A backbone input position is a token id or a row of ids.
StepToken = int | tuple[int, ...]


class FrameBuilder(Protocol):
    """Per-request frame bookkeeping: turns sampled step outputs into codec frames."""

    def push(self, token: StepToken) -> tuple[int, ...] | None:
        """Take one step's output; return a completed frame's codes, or None."""


@dataclass(frozen=True)
class Reference:
    """A clip of the voice to speak in and what is said in it."""

    text: str
    pcm: torch.Tensor  # float32 mono at the model's sample rate


@dataclass(frozen=True)
class Guidance:
    """More backbone rows per position for one request, each with its own KV, whose logits are mixed before a
    token is drawn; the drawn token feeds every row. Classifier-free guidance with weight w: one unconditioned
    row of weight -w (the main row's weight is then 1 + w)."""

    prompts: tuple[list[StepToken], ...]  # each extra row's prompt, as long as the main prompt
    weights: tuple[float, ...]  # each extra row's logit weight; the main row's is 1 - sum(weights)


@dataclass(frozen=True)
class Prepared:
    """What `prepare_request` makes of one request, off the step loop."""

    prompt: list[StepToken]  # backbone inputs, one per position
    text_ids: list[int] = field(default_factory=list)  # text riding along with the generated steps (empty: none)
    conditioning: Any = None  # the detokenizer's per-request input (speaker embedding, prompt tokens/features)
    chunking: Chunking | None = None  # this request's chunk plan; None: the family's `chunking`
    # [P, hidden]: the backbone's input vectors of the first P positions, in place of what their ids embed to
    # (every row of the request); the backbone's forward then takes `embeds` (see SpeechModel.backbone)
    prompt_embeds: torch.Tensor | None = None
    guidance: Guidance | None = None  # more rows per position (classifier-free guidance); None: one row

    @property
    def num_lanes(self) -> int:
        """Backbone rows per position."""
        return 1 + (len(self.guidance.prompts) if self.guidance is not None else 0)


class TextStream(Protocol):
    """One request's text arriving in pieces."""

    def feed(self, text: str, is_final: bool) -> list[int]:
        """Take the next piece; return the text ids that are now settled (with the family's end marker after
        the final piece)."""


# sample(logits [S, V] fp32, index) -> token ids [S] int64 on the logits' device: draws a depth decoder's
# `index`-th codebook with each row's own sampling parameters and random stream
ExtraSampler = Callable[[torch.Tensor, int], torch.Tensor]



class SpeechModel(ABC):
    """A loaded SpeechLM: backbone, prompt format, frame layout and codec of one family."""

    family: str
    timing: TimingFacts
    chunking: Chunking
    default_sampling: SamplingParams
    codes_per_frame: int  # codes in one codec frame
    voices: tuple[str, ...]
    default_voice: str | None
    stop_token_ids: frozenset[int]
    # forward(inputs [T] or [T, C], positions [T], meta, kv_caches[, embeds]) -> [T, H]; compute_logits. `embeds`
    # (index [K] int64, values [K, H]) replaces the input vectors of those tokens: passed only for families whose
    # Prepared has prompt_embeds
    backbone: torch.nn.Module
    is_random_weights: bool  # a tiny test checkpoint: its audio is noise
    min_steps: int = 0  # the stop tokens are not drawn before this many steps
    takes_reference_audio: bool = False  # prepare_request accepts a Reference
    # a Reference may be the conversation's previous turn, spoken by the same speaker: text streamed piece by piece
    # keeps its prosody from piece to piece (CSM's context turns)
    keeps_context: bool = False
    # a style prompt (OpenAI's `instructions`): prepare_request takes `instructions: str` when this is true;
    # `style_prompt` says which checkpoints of the family take one (for the message to those that do not)
    takes_instructions: bool = False
    style_prompt: str = ""
    # what decoding one frame costs, in units of the engine's codec batch budget (`max_codec_frames`): 1 for a
    # codec whose frames cost alike; more for a detokenizer whose frames cost more (flow matching + vocoder)
    codec_cost_per_frame: float = 1.0
    # request options of the family's own: name -> (default, lowest, highest); prepare_request takes them as
    # `options` (the server checks names and ranges first)
    options: dict[str, tuple[float, float, float]] = {}

    # -- the checkpoint: each family recognises and loads its publisher's layout -----------------------------

    # (subdirectory of the checkpoint, hub id used when it is absent) of a codec shipped apart from the model;
    # None when the checkpoint carries its detokenizer itself
    codec_location: tuple[str, str] | None = None

    @classmethod
    @abstractmethod
    def detect(cls, path: Path, name: str) -> bool:
        """Whether checkpoint directory `path` (which the user called `name`) belongs to this family. ValueError,
        saying why, for one of this family that cannot be served."""

    @classmethod
    def load(cls, path: Path, codec_dir: Path | None, dtype: torch.dtype, device: torch.device) -> SpeechModel:
        """Build from checkpoint directory `path` in the publisher's layout, the backbone in `dtype` on `device`;
        `codec_dir`: where the codec is (see `codec_location`). The default reads the Hugging Face layout."""
        return load_hf_layout(cls, path, codec_dir, dtype, device)

    @classmethod
    def from_parts(cls, config: dict, state_dict: dict | None, tokenizer_path, codec_dir, dtype: torch.dtype,
                   device: torch.device) -> SpeechModel:
        """Build from a Hugging Face layout's config.json, its tensors, its tokenizer.json and its codec
        directory. `state_dict` None: the config asks for random weights (config.RANDOM_INIT_KEY), drawn on the
        device."""
        raise NotImplementedError(f"{cls.__name__} loads its checkpoint with its own `load`")

    @property
    def device(self) -> torch.device:
        """Where the backbone (and, but for encoders of reference audio, the codec) runs."""
        return next(self.backbone.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The backbone's precision: the KV cache holds what it computes."""
        return next(self.backbone.parameters()).dtype

    @abstractmethod
    def prepare(self, text: str, voice: str | None) -> list[StepToken]:
        """Prompt inputs (one per position) for `text` spoken by `voice` (None = the default voice). CPU only."""

    def prepare_request(self, text: str, voice: str | None, reference: Reference | None = None) -> Prepared:
        """Everything the engine needs to run one request. `reference`: audio of the voice to speak in, with its
        transcript, for families that take one (ValueError for the others). A family that declares `options`
        also takes `options: dict[str, float]` (checked names and ranges; absent ones keep their defaults), one
        that `takes_instructions` also `instructions: str`. CPU only; ValueError, with what to change, for input
        the family cannot speak."""
        if reference is not None:
            raise ValueError(f"the {self.family} family does not take reference audio; leave it out")
        return Prepared(self.prepare(text, voice))

    def open_text_stream(self) -> TextStream | None:
        """A tokenizer for text arriving in pieces, for families that can start speaking before the text is
        complete; None for the others."""
        return None

    def prompt_for(self, first_text_id: int, voice: str | None) -> list[StepToken]:
        """The prompt of a request whose text streams in, from its first text id (families with text streams); one
        that `takes_instructions` also takes `instructions: str`."""
        raise NotImplementedError(f"{self.family} cannot take text in pieces")

    @abstractmethod
    def new_frame_builder(self) -> FrameBuilder:
        """Fresh frame bookkeeping for one request."""

    @abstractmethod
    def decode_chunks(self, jobs: list[ChunkJob]) -> list[torch.Tensor]:
        """Decode many requests' chunks in one batch -> float32 PCM [num_samples] per job.

        A stateful codec never receives two jobs of the same request in one call.
        """

    def complete_step(self, hidden: torch.Tensor, tokens: torch.Tensor, sample: ExtraSampler) -> torch.Tensor:
        """What each sampled row produced, on the device: from its final hidden state [S, H] and the token the
        backbone's head drew ([S] int64), token ids [S] (single-codebook families return `tokens`) or frames
        [S, num_codebooks] (a depth decoder completes them here, for all rows of the step at once)."""
        return tokens

    def next_input(self, token: StepToken, text_id: int | None, step: int = 0) -> StepToken:
        """The backbone input that feeds a step's output back in; `text_id` is the text that rides along with
        this step (families that take text during generation), None past the end of the text; `step`: how many
        outputs came before this one."""
        return token

    def is_stop(self, token: StepToken) -> bool:
        """Whether a step's output ends the speech."""
        return token in self.stop_token_ids

    # -- the detokenizer contract: per-request state, batched decode of chunks, a declared cost ----------------

    def new_codec_state(self, conditioning: Any = None, seed: int = 0) -> Any:
        """Fresh per-request detokenizer state from the request's conditioning (`Prepared.conditioning`) and its
        seed, handed back in every ChunkJob (None for a stateless codec)."""
        return None

    def release_codec_state(self, state: Any) -> None:
        """A request's stream is over (no chunk of it is decoding): what its state holds may serve another."""
        return None

    def resolve_voice(self, voice: str | None) -> str | None:
        """The voice to use; ValueError listing the choices when `voice` is unknown."""
        if voice is None:
            return self.default_voice
        if voice not in self.voices:
            raise ValueError(f"unknown voice {voice!r}; choose one of: {', '.join(self.voices)}")
        return voice
