"""A row's Linear output must not depend on how many rows share the call (batch invariance)."""

import torch

from streamvox.layers.linear import Linear


def test_each_row_gets_the_same_bits_alone_and_in_any_batch():
    # with one intra-op thread, as the engine runs the LM on a 2-core machine; more threads split rows
    # differently for some batch sizes, and no padding makes that invariant
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer = Linear(256, 768, bias=False)
    x = torch.randn(40, 256)
    with torch.inference_mode():
        together = layer(x)
        for rows in range(1, 13):
            assert torch.equal(layer(x[:rows]), together[:rows]), rows
    torch.set_num_threads(threads)
