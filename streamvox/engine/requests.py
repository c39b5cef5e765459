"""What the engine checks and derives for a request before it is queued (no engine state)."""

from __future__ import annotations

import math
import secrets

from streamvox.config import SamplingParams
from streamvox.models.base import SpeechModel

CHARS_PER_SECOND = 14.0  # speaking rate used to size a request's KV reservation from its text


def codec_seed_for(seed: int) -> int:
    """The codec-noise seed of a request, derived from its sampling seed (so one seed fixes all its audio)."""
    return (seed * 6364136223846793005 + 1442695040888963407) % 2**63


def expected_tokens(model: SpeechModel, text: str) -> int:
    """LM steps the speech of `text` is expected to take, with a margin (sizes its KV reservation)."""
    timing = model.timing
    seconds = 1.0 + 1.25 * len(text) / CHARS_PER_SECOND
    return int(seconds * timing.frame_rate_hz * timing.lm_steps_per_frame)


def check_request(model: SpeechModel, text: str, voice: str | None, sampling: SamplingParams | dict | None,
                  max_audio_s: float = math.inf) -> SamplingParams:
    """Validate a request before it is prepared; returns its sampling with a seed. `sampling` is complete, or
    a dict of fields over the model's defaults, or None for the defaults; `max_audio_s` bounds the audio its
    max_tokens may ask for. ValueError says what to change."""
    if not text or not text.strip():
        raise ValueError("text is empty; give at least one word to speak")
    model.resolve_voice(voice)
    if isinstance(sampling, dict):
        sampling = model.default_sampling.replace(**sampling)
    sampling = sampling or model.default_sampling
    sampling.validate()
    timing = model.timing
    max_tokens = int(max_audio_s * timing.frame_rate_hz) * timing.lm_steps_per_frame if max_audio_s < math.inf else 0
    if max_tokens and sampling.max_tokens > max_tokens:
        asked_s = sampling.max_tokens / timing.lm_steps_per_frame / timing.frame_rate_hz
        raise ValueError(f"max_tokens {sampling.max_tokens} asks for {asked_s:.0f} s of audio; this server makes at "
                         f"most {max_audio_s:g} s per request (max_tokens {max_tokens}): split the text")
    if sampling.max_tokens < timing.lm_steps_per_frame:
        raise ValueError(f"max_tokens {sampling.max_tokens} makes no audio: one frame of this model takes "
                         f"{timing.lm_steps_per_frame} steps; send at least that")
    if sampling.seed is None:
        sampling = sampling.replace(seed=secrets.randbelow(2**63))
    return sampling
