"""Where the engine runs and in which precision: `--device` and `--dtype` resolved against this machine."""

from __future__ import annotations

import torch

from streamvox.config import DTYPES


def resolve_device(name: str = "auto") -> torch.device:
    """auto = the first CUDA device when there is one, else the CPU. ValueError for a device this machine lacks."""
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but this machine has no CUDA GPU that torch "
                             f"{torch.__version__} can use; pass --device cpu")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} asked for, but there are {torch.cuda.device_count()} CUDA devices")
        return torch.device("cuda", index)
    if device.type not in ("cpu", "meta"):
        raise ValueError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto = bfloat16 on CUDA, float32 elsewhere."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of: {', '.join(DTYPES)}")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def describe(device: torch.device) -> str:
    """The device as a person would name it (the GPU's model on CUDA)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
