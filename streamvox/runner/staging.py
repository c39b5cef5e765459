"""Integer step metadata gathered on the host and sent to the device in one copy.

A step's arrays (token ids, positions, slots, block tables, context lengths, sampling keys ...) are laid end
to end in one int64 buffer. On CUDA the buffer is pinned host memory, so the copy is asynchronous; the next
step waits for that copy before it writes the buffer again.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import torch


class Staging:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    def upload(self, arrays: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """One int64 tensor on the device per array (views of one copy)."""
        sizes = [len(array) for array in arrays]
        host = torch.tensor(list(chain.from_iterable(arrays)), dtype=torch.int64)
        if self.device.type == "cuda":
            host = self._pin(host)
            on_device = host.to(self.device, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            on_device = host.to(self.device)
        return list(on_device.split(sizes))

    def _pin(self, host: torch.Tensor) -> torch.Tensor:
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copy has left the buffer
        if self._pinned is None or self._pinned.numel() < host.numel():
            self._pinned = torch.empty(max(4096, 2 * host.numel()), dtype=torch.int64, pin_memory=True)
        pinned = self._pinned[: host.numel()]
        pinned.copy_(host)
        return pinned
