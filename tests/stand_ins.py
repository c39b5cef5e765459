"""What the parity tests share to load the publishers' code: module stand-ins for packages that cannot be installed
here (torchaudio, whisper, perth), and a speech-like test clip."""

import math
import types

import torch


def stub_module(name: str, **attrs) -> types.ModuleType:
    """A module named `name` holding `attrs`: stands in for one that cannot be installed."""
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def refuse(*args, **kwargs):
    """A stand-in function the code under test must never call."""
    raise NotImplementedError("a stand-in for the test: not part of the code under test")


def speechlike(seconds: float, sample_rate: int, seed: int = 0) -> torch.Tensor:
    """[S] float32: a gliding harmonic tone with a syllable-rate envelope plus a little noise, peak 0.5."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * sample_rate), dtype=torch.float64) / sample_rate
    f0 = 140 + 30 * torch.sin(2 * math.pi * 0.7 * t)  # Hz
    phase = 2 * math.pi * torch.cumsum(f0, 0) / sample_rate
    voiced = sum((0.3 / k) * torch.sin(k * phase) for k in range(1, 12))
    envelope = 0.5 + 0.5 * torch.sin(2 * math.pi * 2.3 * t).clamp(min=0)
    x = voiced * envelope + 0.01 * torch.randn(t.shape, generator=g, dtype=torch.float64)
    return (0.5 * x / x.abs().max()).to(torch.float32)
