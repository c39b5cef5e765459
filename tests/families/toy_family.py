"""A toy SpeechLM family that exists only in the tests: the proof that a family is one file.

It is registered by naming this module in STREAMVOX_FAMILIES (no edit in streamvox/), and it uses what interface
v2 offers that the built-in families do not all use: a checkpoint layout of its own (toy.json +
backbone.safetensors, no config.json), conditioning made at prepare time (the voice picks the oscillator's base
pitch), a chunk plan per request (the text's length picks the first chunk), and a stateful codec.

Text is UTF-8 bytes (ids 0-255); the prompt is BOS, the bytes, SOS. A frame takes two steps: an amplitude code,
then a pitch code (each token's id modulo NUM_CODES). The codec is an oscillator: frame (a, p) is
SAMPLES_PER_FRAME samples of a sine at base_hz + PITCH_STEP_HZ * p with amplitude (a + 1) / (2 * NUM_CODES),
its phase carried from frame to frame and chunk to chunk in the request's codec state.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from streamvox.config import SamplingParams
from streamvox.models.base import Chunking, ChunkJob, Prepared, Reference, SpeechModel, TimingFacts
from streamvox.models.llama import LlamaConfig, LlamaForCausalLM
from streamvox.models.params import on_meta
from streamvox.models.registry import Family
from streamvox.models.tiny import write_atomically

SAMPLE_RATE = 24000
SAMPLES_PER_FRAME = 480  # 50 frames a second
NUM_CODES = 16
PITCH_STEP_HZ = 10.0
VOICE_BASE_HZ = {"low": 180.0, "high": 360.0}
BOS, SOS = 256, 257
VOCAB = 258 + 2 * NUM_CODES


class ToyFrameBuilder:
    def __init__(self) -> None:
        self._codes: list[int] = []

    def push(self, token: int) -> tuple[int, ...] | None:
        self._codes.append(token % NUM_CODES)
        if len(self._codes) < 2:
            return None
        frame, self._codes = tuple(self._codes), []
        return frame


class ToyModel(SpeechModel):
    family = "toy"
    voices = tuple(VOICE_BASE_HZ)
    default_voice = "low"
    codes_per_frame = 2
    default_sampling = SamplingParams(temperature=1.0, max_tokens=400)
    chunking = Chunking(first_chunk_frames=2, frames_per_chunk=4, lookahead_frames=0, is_stateful=True)
    stop_token_ids = frozenset()  # it speaks until max_tokens
    is_random_weights = True
    timing = TimingFacts(SAMPLE_RATE, SAMPLES_PER_FRAME, lm_steps_per_frame=2)
    options = {"pitch_shift_hz": (0.0, -100.0, 100.0)}  # a family option: moves the oscillator's base pitch

    def __init__(self, backbone: LlamaForCausalLM) -> None:
        self.backbone = backbone

    @classmethod
    def detect(cls, path: Path, name: str) -> bool:
        return (path / "toy.json").exists()

    @classmethod
    def load(cls, path: Path, codec_dir: Path | None, dtype: torch.dtype, device: torch.device) -> ToyModel:
        with on_meta():
            backbone = LlamaForCausalLM(LlamaConfig.from_json(json.loads((path / "toy.json").read_text())))
        backbone.load_weights(load_file(str(path / "backbone.safetensors")), device, dtype)
        return cls(backbone)

    def prepare(self, text: str, voice: str | None) -> list[int]:
        return [BOS, *text.encode(), SOS]

    def prepare_request(self, text: str, voice: str | None, reference: Reference | None = None,
                        options: dict[str, float] | None = None) -> Prepared:
        if reference is not None:
            raise ValueError("the toy family does not take reference audio; leave it out")
        base_hz = VOICE_BASE_HZ[self.resolve_voice(voice)] + (options or {}).get("pitch_shift_hz", 0.0)
        return Prepared(self.prepare(text, voice), conditioning=base_hz,
                        chunking=Chunking(first_chunk_frames(text), 4, 0, is_stateful=True))

    def new_frame_builder(self) -> ToyFrameBuilder:
        return ToyFrameBuilder()

    def new_codec_state(self, conditioning=None, seed: int = 0) -> dict:
        return {"base_hz": conditioning or VOICE_BASE_HZ[self.default_voice], "phase": 0.0}

    def decode_chunks(self, jobs: list[ChunkJob]) -> list[torch.Tensor]:
        return [oscillate(job.frames[job.start_frame : job.end_frame].tolist(), job.state) for job in jobs]


def first_chunk_frames(text: str) -> int:
    """The request's own first chunk: 1 frame for texts of even length, 2 for odd ones."""
    return 1 + len(text) % 2


def oscillate(frames: list[list[int]], state: dict) -> torch.Tensor:
    """PCM of `frames` [(amplitude, pitch) codes], continuing the oscillator in `state` (phase in cycles)."""
    t = torch.arange(1, SAMPLES_PER_FRAME + 1, dtype=torch.float64)
    pieces = []
    for amplitude, pitch in frames:
        cycles_per_sample = (state["base_hz"] + PITCH_STEP_HZ * pitch) / SAMPLE_RATE
        pieces.append((amplitude + 1) / (2 * NUM_CODES) * torch.sin(2 * math.pi * (state["phase"] +
                                                                                  cycles_per_sample * t)))
        state["phase"] = (state["phase"] + cycles_per_sample * SAMPLES_PER_FRAME) % 1.0
    return torch.cat(pieces).float() if pieces else torch.zeros(0)


def write_tiny(path: str | Path, seed: int = 0, num_shards: int = 1) -> Path:
    """toy.json + backbone.safetensors with random weights."""
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
              "head_dim": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
              "tie_word_embeddings": False}

    def fill(work: Path) -> None:
        (work / "toy.json").write_text(json.dumps(config))
        generator = torch.Generator().manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig.from_json(config))
        tensors = {name: torch.ones(t.shape) if "norm" in name else torch.randn(t.shape, generator=generator) * 0.2
                   for name, t in model.state_dict().items()}
        save_file(tensors, str(work / "backbone.safetensors"))

    return write_atomically(path, fill)


FAMILY = Family("toy", ToyModel, write_tiny)
