"""Orpheus: a Llama-3 backbone that speaks in SNAC 24 kHz codes, 7 tokens per frame.

Prompt: start_of_human, tok("{voice}: {text}") (with BOS), eot, end_of_human, start_of_ai, start_of_speech.
Generated audio token t (t >= audio_offset) carries code (t - audio_offset) mod codebook_size; the k-th audio
token of a frame (k = 0..6) belongs to SNAC level 0 (k=0), 1 (k=1,4) or 2 (k=2,3,5,6). end_of_speech stops.
Frame f is decoded inside the 4-frame window [f-1, f+2] and keeps that window's second frame of samples,
as the publisher's streaming decoder does; the first and last windows repeat the edge frame, so every
generated frame is heard.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from streamvox.codecs.snac import SnacCodec
from streamvox.config import SamplingParams, random_init_seed
from streamvox.models.base import Chunking, ChunkJob, SpeechModel, TimingFacts
from streamvox.models.checkpoint import read_config_if_any
from streamvox.models.llama import LlamaConfig, LlamaForCausalLM
from streamvox.models.params import on_meta, random_init

VOICES = ("tara", "leah", "jess", "leo", "dan", "mia", "zac", "zoe")
CODEC_HUB_ID = "hubertsiuzdak/snac_24khz"
CODEC_SUBDIR = "snac_24khz"  # a codec directory inside the model directory is used before the hub
TOKENS_PER_FRAME = 7
_TO_SNAC_ORDER = (0, 1, 4, 2, 3, 5, 6)  # Orpheus order (l0, l1, l2, l2, l1, l2, l2) -> (l0, l1 x2, l2 x4)
_WINDOW_OFFSETS = torch.tensor([-1, 0, 1, 2])  # frames around the one being decoded


@dataclass(frozen=True)
class OrpheusTokenIds:
    """Special and audio token ids. Defaults are the publisher's; config.json key `orpheus_token_ids` overrides."""

    start_of_human: int = 128259
    end_of_text: int = 128009  # <|eot_id|>
    end_of_human: int = 128260
    start_of_ai: int = 128261
    start_of_speech: int = 128257
    end_of_speech: int = 128258
    audio_offset: int = 128266
    codebook_size: int = 4096

    @classmethod
    def from_config(cls, config: dict) -> OrpheusTokenIds:
        overrides = config.get("orpheus_token_ids", {})
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"config.json orpheus_token_ids has unknown keys {sorted(unknown)}")
        return cls(**overrides)


class OrpheusFrameBuilder:
    """Collects audio codes; every 7th completes a frame, returned in SNAC order."""

    def __init__(self, ids: OrpheusTokenIds) -> None:
        self._ids = ids
        self._codes: list[int] = []

    def push(self, token_id: int) -> tuple[int, ...] | None:  # one token per step
        offset = token_id - self._ids.audio_offset
        if not 0 <= offset < TOKENS_PER_FRAME * self._ids.codebook_size:
            return None  # not an audio token: nothing to voice
        self._codes.append(offset % self._ids.codebook_size)
        if len(self._codes) < TOKENS_PER_FRAME:
            return None
        frame, self._codes = self._codes, []
        return tuple(frame[i] for i in _TO_SNAC_ORDER)


class OrpheusModel(SpeechModel):
    family = "orpheus"
    voices = VOICES
    default_voice = "tara"
    codes_per_frame = TOKENS_PER_FRAME
    default_sampling = SamplingParams(temperature=0.6, top_p=0.8, repetition_penalty=1.3, max_tokens=1200)
    # One-frame chunks: a stream generated at exactly real time then never underruns a client with no prebuffer
    # (bigger chunks would need several times real time); a lagging codec catches up in bigger chunks anyway.
    chunking = Chunking(first_chunk_frames=1, frames_per_chunk=1, lookahead_frames=2, is_stateful=False)
    codec_location = (CODEC_SUBDIR, CODEC_HUB_ID)

    def __init__(self, config: dict, backbone: LlamaForCausalLM, tokenizer: Tokenizer, codec: SnacCodec) -> None:
        self.ids = OrpheusTokenIds.from_config(config)
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.tokenizer.encode_special_tokens = True  # text that spells a control token stays text
        self.codec = codec
        self.timing = TimingFacts(codec.sample_rate, codec.samples_per_frame, lm_steps_per_frame=TOKENS_PER_FRAME)
        self.stop_token_ids = frozenset({self.ids.end_of_speech})
        self.is_random_weights = bool(config.get("streamvox_random_weights", False))

    @classmethod
    def detect(cls, path: Path, name: str) -> bool:
        config = read_config_if_any(path)
        if config is None:
            return False
        if "orpheus_token_ids" in config or "orpheus" in name.lower():
            return True
        # Llama with the 7 x 4096 SNAC code tokens appended
        return "LlamaForCausalLM" in (config.get("architectures") or []) and config.get("vocab_size", 0) >= 156938

    @classmethod
    def from_parts(cls, config: dict, state_dict: dict | None, tokenizer_path: Path, codec_dir: Path,
                   dtype: torch.dtype, device: torch.device) -> OrpheusModel:
        with on_meta():
            backbone = LlamaForCausalLM(LlamaConfig.from_json(config))
        if state_dict is None:
            seed = random_init_seed(config)
            random_init(backbone, seed, device, dtype)
            _speak_audio_codes(backbone, OrpheusTokenIds.from_config(config), seed)
        else:
            backbone.load_weights(state_dict, device, dtype)
        codec = SnacCodec.load(codec_dir, device=device)  # fp32, as the publisher decodes
        return cls(config, backbone, Tokenizer.from_file(str(tokenizer_path)), codec)

    def prepare(self, text: str, voice: str | None) -> list[int]:
        voice = self.resolve_voice(voice)
        body = self.tokenizer.encode(f"{voice}: {text}" if voice else text).ids
        ids = self.ids
        return [ids.start_of_human, *body, ids.end_of_text, ids.end_of_human, ids.start_of_ai, ids.start_of_speech]

    def new_frame_builder(self) -> OrpheusFrameBuilder:
        return OrpheusFrameBuilder(self.ids)

    def decode_chunks(self, jobs: list[ChunkJob]) -> list[torch.Tensor]:
        windows, seeds, sizes = [], [], []
        for job in jobs:
            windows.append(decode_windows(job.frames, job.start_frame, job.end_frame))
            seeds.extend(frame_seed(job.seed, f) for f in range(job.start_frame, job.end_frame))
            sizes.append(job.end_frame - job.start_frame)
        spf = self.timing.samples_per_frame
        pcm = self.codec.decode_windows(torch.cat(windows), seeds)[:, spf : 2 * spf]  # [sum F, spf]
        return [rows.reshape(-1) for rows in pcm.split(sizes)]


@torch.no_grad()
def _speak_audio_codes(backbone: LlamaForCausalLM, ids: OrpheusTokenIds, seed: int) -> None:
    """Redraw random head rows so that, as with a trained model, the head draws audio tokens: text and control
    rows give logits near 0, audio rows logits of spread 2.5, so the audio rows hold almost all of the mass."""
    head = backbone.lm_head.weight  # [vocab, hidden]; the input embedding too when they are tied
    if head.device.type == "meta":
        return
    generator = torch.Generator(device=head.device).manual_seed(seed + 1)
    scale = head.shape[1] ** -0.5  # the final norm makes hidden states of norm sqrt(hidden)
    head[: ids.audio_offset].normal_(0.0, 0.1 * scale, generator=generator)
    head[ids.audio_offset :].normal_(0.0, 2.5 * scale, generator=generator)


def decode_windows(frames: torch.Tensor, start_frame: int, end_frame: int) -> torch.Tensor:
    """The 4-frame window [f-1, f+2] of each frame f in [start_frame, end_frame), edges repeated.

    frames: [num_known_frames, 7] -> [end_frame - start_frame, 4, 7]; frame f's audio is window sample range
    [samples_per_frame, 2 * samples_per_frame).
    """
    frame_ids = torch.arange(start_frame, end_frame)
    return frames[(frame_ids[:, None] + _WINDOW_OFFSETS).clamp(0, frames.shape[0] - 1)]


def frame_seed(request_seed: int, frame_index: int) -> int:
    """Codec noise seed of one frame: depends on the request and the frame only, never on batching."""
    return (request_seed * 1_000_003 + frame_index) % (2**63)
