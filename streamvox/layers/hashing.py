"""Counter-based randomness: numbers that are a pure function of integer keys, computed for whole tensors at
once on any device (no generator state, so no draw depends on batching or on what ran before)."""

from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF


def mix32(x):
    """A 32-bit integer hash (xor-shift-multiply rounds) of an int or int64 tensor holding values below 2**32.

    The multiplier is under 2**27, so products stay inside int64."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & MASK32
    return x ^ (x >> 16)


def fold32(value: int) -> int:
    """A 64-bit key folded into the 32 bits mix32 takes."""
    return (value ^ mix32(value >> 32)) & MASK32


def uniform(keys: torch.Tensor) -> torch.Tensor:
    """float32 in (0, 1) from each int64 key (values below 2**32)."""
    return ((mix32(keys) >> 8).to(torch.float32) + 0.5) / 2**24


def hashed_normal(keys: torch.Tensor, stream: int, length: int) -> torch.Tensor:
    """Standard normal noise [B, length] float32: sample t of row b a function of (keys[b], stream, t) alone."""
    base = mix32(keys[:, None] ^ mix32(stream & MASK32))  # [B, 1]
    t = torch.arange(length, device=keys.device)[None, :]
    u1, u2 = uniform(base ^ (2 * t)), uniform(base ^ (2 * t + 1))
    return (-2.0 * u1.log()).sqrt() * torch.cos(2 * math.pi * u2)  # Box-Muller
