"""A Linear layer whose result for a row does not depend on how many rows come with it."""

import torch
from torch import nn


class Linear(nn.Linear):
    """nn.Linear that runs at least MIN_ROWS rows.

    CPU GEMM takes another kernel for fewer than 4 rows, whose sums round differently in the last bits. Without
    padding a request's logits would shift slightly between running alone and in a batch (or in a different
    prefill chunk), and a seeded request could then sample another token under load. This makes rows exact
    with one intra-op thread (the LM's share on a 2-core machine); with more threads the GEMM splits some batch
    sizes differently, and the sampler's race draw is what keeps such last-bit changes from mattering. On a GPU
    the padding buys nothing (its kernels choose by shape anyway) and costs launches, so it is skipped there.
    """

    MIN_ROWS = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if x.dim() != 2 or rows >= self.MIN_ROWS or x.device.type != "cpu":
            return super().forward(x)
        padded = torch.cat([x, x.new_zeros(self.MIN_ROWS - rows, x.shape[1])])
        return super().forward(padded)[:rows]
