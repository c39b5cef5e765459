"""Putting weights into a module without a CPU copy: build it on the meta device, then load the checkpoint's
tensors (moved once, straight to their device and dtype) or draw them there from a seed.

Buffers a module computes for itself (RoPE frequencies, index tables) are made on the CPU in its constructor,
whatever the default device, and moved with the module; floating-point weights take the model's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def on_meta() -> Iterator[None]:
    """Modules built inside have their parameters on the meta device: no memory, no initialisation."""
    with torch.device("meta"):
        yield


def load_checked(module: nn.Module, tensors: dict[str, torch.Tensor], what: str,
                 device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> None:
    """Load `tensors` into `module` (built on the meta device or not) on `device`, floating-point ones in `dtype`
    (None: as stored); ValueError naming missing or unexpected tensors, or a shape that differs from `what` (the
    config they should match). A tensor given under two names (tied weights) stays one tensor."""
    own = module.state_dict(keep_vars=True)
    missing, unexpected = set(own) - set(tensors), set(tensors) - set(own)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match {what}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    moved: dict[int, torch.Tensor] = {}
    placed = {}
    for name, tensor in tensors.items():
        if own[name].shape != tensor.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != config shape {tuple(own[name].shape)}")
        if id(tensor) not in moved:
            moved[id(tensor)] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() and dtype else None)
        placed[name] = moved[id(tensor)]
    _assign(module, placed, device)


def random_init(module: nn.Module, seed: int, device: torch.device | str, dtype: torch.dtype,
                fan_in: Callable[[str, torch.Size], int] = lambda name, shape: shape[-1]) -> None:
    """Draw every weight of `module` on `device` from `seed`: norms and scales 1, biases 0, embeddings N(0, 0.1^2),
    other weights N(0, 1 / fan_in) so activations keep their scale through the layers. For full-size models
    with random weights (`make-tiny --size full`): no file, no CPU copy."""
    device = torch.device(device)
    generator = None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed)
    drawn: dict[int, torch.Tensor] = {}
    placed = {}
    for name, param in module.state_dict(keep_vars=True).items():
        if id(param) not in drawn:
            tensor = torch.empty(param.shape, device=device, dtype=dtype if param.is_floating_point() else param.dtype)
            if generator is not None:
                leaf = name.rsplit(".", 2)
                if "norm" in name or leaf[-1] in ("scale", "gamma") or (leaf[-1] == "weight" and "layer_scale" in name):
                    tensor.fill_(1.0)
                elif leaf[-1] == "bias":
                    tensor.zero_()
                else:
                    std = 0.1 if "embed" in name else fan_in(name, param.shape) ** -0.5
                    tensor.normal_(0.0, std, generator=generator)
            drawn[id(param)] = tensor
        placed[name] = drawn[id(param)]
    _assign(module, placed, device)


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device | str) -> None:
    module.load_state_dict(tensors, assign=True)
    module.to(device)  # the buffers it computed itself; parameters are there already
    module.eval()
