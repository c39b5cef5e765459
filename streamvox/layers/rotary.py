"""Rotary position embedding, with the Llama-3 long-context frequency scaling."""

from __future__ import annotations

import math

import torch
from torch import nn


def llama3_scaled_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Stretch low frequencies by `factor`, keep high ones, blend linearly in between (Llama 3.1+ RoPE)."""
    factor = scaling["factor"]
    low_factor, high_factor = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original_len = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    stretched = torch.where(wavelength > original_len / low_factor, inv_freq / factor, inv_freq)
    blend = (original_len / wavelength - low_factor) / (high_factor - low_factor)
    blended = (1 - blend) * stretched / factor + blend * stretched
    is_between = (wavelength >= original_len / high_factor) & (wavelength <= original_len / low_factor)
    return torch.where(is_between, blended, stretched)


class RotaryEmbedding(nn.Module):
    """Rotates queries and keys by position. The frequency table stays fp32 whatever the module is cast to, and
    angles are computed in fp32: a bf16 table would put angles off by radians a thousand positions in."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None) -> None:
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        inv_freq = 1.0 / (theta**exponents)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind != "llama3":
                raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: llama3, or none)")
            inv_freq = llama3_scaled_inv_freq(inv_freq, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cached: tuple | None = None  # (positions, dtype, cos, sin) of the last call

    def _apply(self, fn, recurse=True):
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)  # moved with the module, never cast
        return self

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        """q: [T, Hq, D], k: [T, Hkv, D], positions: [T] -> rotated (q, k). Every layer of a forward passes the
        same positions tensor: its angles are computed once."""
        cached = self._cached
        if cached is None or cached[0] is not positions or cached[1] != q.dtype:
            freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
            angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
            cached = self._cached = (positions, q.dtype, angles.cos().to(q.dtype), angles.sin().to(q.dtype))
        cos, sin = cached[2], cached[3]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
