"""PCM conversion and WAV writing (stdlib only)."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np


def to_int16(pcm: np.ndarray) -> np.ndarray:
    """float32 [-1, 1] -> int16, clipping anything outside."""
    return (np.clip(pcm, -1.0, 1.0) * 32767.0).astype(np.int16)


def write_wav(path: str | Path, pcm: np.ndarray, sample_rate: int) -> None:
    """Mono 16-bit WAV."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(to_int16(pcm).tobytes())
