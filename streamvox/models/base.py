"""The model-execution abstraction every SpeechLM family implements.

Stages, in order: prepare (text -> prompt tokens, CPU) -> forward (ragged batch over the paged KV cache) ->
sample (per-row parameters) -> frame bookkeeping (tokens -> codec frames, end of speech) -> decode chunk
(frames -> PCM, batched across requests). A family knows nothing of requests, queues or HTTP: it is the
backbone wiring, the prompt format, the frame layout and the codec.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from streamvox.config import SamplingParams


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


@dataclass(frozen=True)
class ChunkJob:
    """Decode frames [start_frame, end_frame) of one request."""

    frames: torch.Tensor  # [num_known_frames, codes_per_frame] int64: every frame of the request so far
    start_frame: int
    end_frame: int
    is_last: bool  # the request's last chunk: no frame will follow `frames`
    seed: int  # makes any codec noise a function of the request alone
    state: Any = None  # the request's codec state (a stateful codec's; None otherwise)


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
    backbone: torch.nn.Module  # forward(inputs [T] or [T, C], positions [T], meta, kv_caches) -> [T, H]; compute_logits
    is_random_weights: bool  # a tiny test checkpoint: its audio is noise
    min_steps: int = 0  # the stop tokens are not drawn before this many steps
    takes_reference_audio: bool = False  # prepare_request accepts a Reference

    @classmethod
    @abstractmethod
    def from_parts(cls, config: dict, state_dict: dict | None, tokenizer_path, codec_dir, dtype: torch.dtype,
                   device: torch.device) -> SpeechModel:
        """Build from a checkpoint's config.json, its tensors, its tokenizer.json and its codec directory, the
        backbone in `dtype` on `device`. `state_dict` None: the config asks for random weights
        (config.RANDOM_INIT_KEY), drawn on the device."""

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

    def prepare_request(self, text: str, voice: str | None,
                        reference: Reference | None = None) -> tuple[list[StepToken], list[int]]:
        """Prompt inputs, and the text ids that ride along with the generated steps (families that take text
        during generation; empty for the others). `reference`: audio of the voice to speak in, with its
        transcript, for families that take one (ValueError for the others)."""
        if reference is not None:
            raise ValueError(f"the {self.family} family does not take reference audio; leave it out")
        return self.prepare(text, voice), []

    def open_text_stream(self) -> TextStream | None:
        """A tokenizer for text arriving in pieces, for families that can start speaking before the text is
        complete; None for the others."""
        return None

    def prompt_for(self, first_text_id: int, voice: str | None) -> list[StepToken]:
        """The prompt of a request whose text streams in, from its first text id (families with text streams)."""
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

    def next_input(self, token: StepToken, text_id: int | None) -> StepToken:
        """The backbone input that feeds a step's output back in; `text_id` is the text that rides along with
        this step (families that take text during generation), None past the end of the text."""
        return token

    def is_stop(self, token: StepToken) -> bool:
        """Whether a step's output ends the speech."""
        return token in self.stop_token_ids

    def new_codec_state(self) -> Any:
        """Fresh per-request codec state, handed back in every ChunkJob (None for a stateless codec)."""
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
