"""Decode rows and the depth loop through static buffers, one CUDA graph per batch-size bucket.

A step's decode rows are padded up to the next bucket and copied (one device copy) into buffers whose
addresses never change: input ids, positions, KV slots, context lengths and block tables. Padded rows are
harmless: each is one token at position 0 whose K/V goes to a scratch block no request owns, and which attends
to that block only. On CUDA each bucket's backbone forward is captured once (in the warm-up) and replayed; on
the CPU the same buffers run eagerly, which is how the tests check the padding and bucketing. Attention must
read the cache in place (the `triton` backend): a gather's shapes would change with the rows' contexts.

The depth loop of multi-codebook families (CSM's 31 small transformer steps a frame, Qwen3-TTS's 15) is captured
the same way, sampling included: each row's sampling parameters are copied into static buffers beside its
inputs, so a bucket's graph serves any mix of greedy and sampled rows however the sampler's tables grow, and
padded rows (greedy, key 0) draw codes nobody reads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from streamvox.layers.attention import AttentionMetadata, PagedDecode, flat_tables
from streamvox.models.base import SpeechModel
from streamvox.runner.sampler import SampleBatch, Sampler

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512)


@dataclass(frozen=True)
class Capture:
    """What capturing every bucket cost."""

    buckets: tuple[int, ...]
    seconds: float
    bytes: int  # device memory the graphs' pool holds


def buckets_up_to(max_rows: int) -> tuple[int, ...]:
    return tuple(b for b in BUCKETS if b < max_rows) + (max_rows,)


def _capture_all(buckets: tuple[int, ...], forward, device: torch.device) -> tuple[dict, Capture]:
    """Warm every bucket up eagerly on a side stream (kernels compiled, allocations settled), then capture each,
    largest first, into one memory pool -> ({bucket: (graph, output)}, what it cost)."""
    with torch.cuda.device(device):  # the capture stream is the current device's
        return _capture_on_device(buckets, forward, device)


def _capture_on_device(buckets: tuple[int, ...], forward, device: torch.device) -> tuple[dict, Capture]:
    started = time.perf_counter()
    before = torch.cuda.memory_reserved(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for bucket in reversed(buckets):
            forward(bucket)
    torch.cuda.current_stream(device).wait_stream(side)
    pool = torch.cuda.graph_pool_handle()
    graphs = {}
    for bucket in reversed(buckets):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = forward(bucket)
        graphs[bucket] = (graph, out)
    torch.cuda.synchronize(device)
    return graphs, Capture(buckets, time.perf_counter() - started, torch.cuda.memory_reserved(device) - before)


class DecodeGraphs:
    """The backbone's decode forward over static buffers, a graph per bucket once captured."""

    def __init__(self, backbone: nn.Module, kv_cache: torch.Tensor, scratch_block: int, max_rows: int,
                 max_blocks: int, input_width: int) -> None:
        """`kv_cache` [layers, 2, blocks, block_size, heads, dim]; `scratch_block` a block of it no request gets;
        `max_blocks` the most blocks one row's table holds; `input_width` codebooks per input (0: one id)."""
        self.backbone, self.kv_cache = backbone, kv_cache
        self.block_size = kv_cache.shape[3]
        self.scratch_block = scratch_block
        self.buckets = buckets_up_to(max_rows)
        self.input_width = input_width
        device = kv_cache.device
        ids_shape = (max_rows, input_width) if input_width else (max_rows,)
        self.input_ids = torch.zeros(ids_shape, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.slots = torch.full((max_rows,), scratch_block * self.block_size, dtype=torch.int64, device=device)
        self.context_lens = torch.ones(max_rows, dtype=torch.int64, device=device)
        self.block_tables = torch.full((max_rows, max_blocks), scratch_block, dtype=torch.int64, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @property
    def max_rows(self) -> int:
        return self.buckets[-1]

    @property
    def max_context(self) -> int:
        """The longest context a row's table can hold (longer rows run eagerly)."""
        return self.block_tables.shape[1] * self.block_size

    def bucket(self, num_rows: int) -> int:
        """The smallest bucket that holds `num_rows` (at most max_rows)."""
        return next(b for b in self.buckets if b >= num_rows)

    def layout(self, input_ids: Sequence[int], positions: Sequence[int], slots: Sequence[int],
               context_lens: Sequence[int], block_tables: Sequence[Sequence[int]]) -> tuple[int, int, list[int]]:
        """The rows' metadata padded to their bucket, flat as `run` takes it -> (bucket, table width, array)."""
        num_rows = len(positions)
        bucket = self.bucket(num_rows)
        pad = bucket - num_rows
        width, tables = flat_tables(block_tables, [-(-length // self.block_size) for length in context_lens],
                                    pad=self.scratch_block)
        flat = list(input_ids) + [0] * pad * max(1, self.input_width)
        flat += list(positions) + [0] * pad
        flat += list(slots) + [self.scratch_block * self.block_size] * pad
        flat += list(context_lens) + [1] * pad
        flat += tables + [self.scratch_block] * width * pad
        return bucket, width, flat

    def run(self, bucket: int, width: int, staged: torch.Tensor) -> torch.Tensor:
        """Copy a `layout` (on the device) into the static buffers and run the bucket -> hidden [bucket, H]."""
        ids_size = bucket * max(1, self.input_width)
        ids, positions, slots, lens, tables = staged.split([ids_size, bucket, bucket, bucket, bucket * width])
        self.input_ids[:bucket].copy_(ids.view(self.input_ids[:bucket].shape))
        self.positions[:bucket].copy_(positions)
        self.slots[:bucket].copy_(slots)
        self.context_lens[:bucket].copy_(lens)
        self.block_tables[:bucket, :width].copy_(tables.view(bucket, width))
        if (graph := self.graphs.get(bucket)) is not None:
            graph[0].replay()
            return graph[1]
        return self._forward(bucket)

    def _forward(self, bucket: int) -> torch.Tensor:
        # fresh views each call: the rotary cache keys on the positions tensor's identity, and a capture must
        # record the angles' computation rather than find it cached
        meta = AttentionMetadata(self.slots[:bucket], (), (),
                                 PagedDecode(bucket, self.block_tables[:bucket], self.context_lens[:bucket]))
        return self.backbone(self.input_ids[:bucket], self.positions[:bucket], meta, self.kv_cache)

    def capture(self) -> Capture:
        """Capture every bucket (CUDA only)."""
        self._pad_all()
        self.graphs, capture = _capture_all(self.buckets, self._forward, self.kv_cache.device)
        return capture

    def _pad_all(self) -> None:
        """Every row a padded row: warm-up and capture runs write only the scratch block."""
        self.input_ids.zero_()
        self.positions.zero_()
        self.slots.fill_(self.scratch_block * self.block_size)
        self.context_lens.fill_(1)
        self.block_tables.fill_(self.scratch_block)


class DepthGraphs:
    """A depth-decoder family's `complete_step` (the depth loop and its sampling) through static buffers."""

    def __init__(self, model: SpeechModel, sampler: Sampler, max_rows: int, hidden_size: int,
                 dtype: torch.dtype) -> None:
        self.model, self.sampler = model, sampler
        self.buckets = buckets_up_to(max_rows)
        device = sampler.device
        self.hidden = torch.zeros(max_rows, hidden_size, dtype=dtype, device=device)
        self.first = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.extra_keys = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.floats = torch.zeros(max_rows, 4, device=device)  # each row's sampling parameters (padded: greedy)
        self.top_k = torch.full((max_rows,), sampler.vocab_size, dtype=torch.int64, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @property
    def max_rows(self) -> int:
        return self.buckets[-1]

    def run(self, hidden: torch.Tensor, first: torch.Tensor, batch: SampleBatch) -> torch.Tensor:
        """Frames [S, num_codebooks] of the step's sampled rows, as complete_step would give them."""
        rows = hidden.shape[0]
        bucket = next(b for b in self.buckets if b >= rows)
        floats, top_k = self.sampler.params(batch.slots)
        for static, value in ((self.hidden, hidden), (self.first, first), (self.extra_keys, batch.extra_keys),
                              (self.floats, floats), (self.top_k, top_k)):
            static[:rows].copy_(value)
        for static in (self.hidden, self.first, self.extra_keys, self.floats):
            static[rows:bucket].zero_()
        self.top_k[rows:bucket].fill_(self.sampler.vocab_size)
        if (graph := self.graphs.get(bucket)) is not None:
            graph[0].replay()
            return graph[1][:rows]
        return self._forward(bucket)[:rows]

    def _forward(self, bucket: int) -> torch.Tensor:
        # every row draws and greedy rows are overruled, so one graph serves any mix of them
        keys = self.extra_keys[:bucket]
        batch = SampleBatch([], keys, keys, keys, is_all_greedy=False, has_greedy=True, has_penalty=False,
                            fits_candidates=True, needs_whole_vocab=True,
                            params=(self.floats[:bucket], self.top_k[:bucket]))
        return self.model.complete_step(self.hidden[:bucket], self.first[:bucket],
                                        lambda logits, index: self.sampler.sample_extra(logits, batch, index))

    def capture(self) -> Capture:
        """Capture every bucket (CUDA only)."""
        for static in (self.hidden, self.first, self.extra_keys, self.floats):
            static.zero_()
        self.top_k.fill_(self.sampler.vocab_size)
        self.graphs, capture = _capture_all(self.buckets, self._forward, self.sampler.device)
        return capture
