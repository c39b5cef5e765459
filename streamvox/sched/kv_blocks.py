"""A pool of fixed-size KV cache blocks handed out to requests."""

from __future__ import annotations

from collections import deque


class BlockPool:
    """Free list of block ids. Block `b` holds positions [b * block_size, (b + 1) * block_size) of one request."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV pool needs >= 1 block of >= 1 token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def is_full(self) -> bool:
        """Every block is back in the pool."""
        return len(self._free) == self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int] | None:
        """`num_blocks` fresh block ids, or None when the pool has too few."""
        if not self.can_allocate(num_blocks):
            return None
        return [self._free.popleft() for _ in range(num_blocks)]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(block_ids)
