"""The conditioning of reference clips, computed once per distinct clip: families that clone a voice keep the last
few clips' results, so a voice used again costs nothing to prepare."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

CLIP_CACHE_SIZE = 64  # distinct clips whose conditioning is kept


class ClipCache:
    """What `make` computed for each of the last `size` distinct clips (by their samples), least recently used
    first out; safe across the threads that prepare requests."""

    def __init__(self, size: int = CLIP_CACHE_SIZE) -> None:
        self.size = size
        self._kept: OrderedDict[bytes, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._kept)

    def get(self, pcm: torch.Tensor, make: Callable[[torch.Tensor], Any]) -> Any:
        """make(pcm) for a clip not seen lately (its errors reach the caller and nothing is kept), else the kept
        result."""
        key = hashlib.sha256(pcm.float().numpy().tobytes()).digest()
        with self._lock:
            if key in self._kept:
                self._kept.move_to_end(key)
                return self._kept[key]
        made = make(pcm)  # outside the lock: another clip may be prepared meanwhile
        with self._lock:
            self._kept[key] = made
            while len(self._kept) > self.size:
                self._kept.popitem(last=False)
        return made
