"""Attention over a paged KV cache for a ragged batch of prefill chunks and decode rows.

The cache of one layer is a pair of tensors [num_blocks, block_size, num_kv_heads, head_dim]. A batch is T
flattened tokens; each new token's K/V is written to its slot (block * block_size + offset) and every query
attends to its own request's positions 0..its own position, gathered through the request's block table.

Decode rows are attended in groups planned once per step (`plan_decode`, on the host) and shared by every
layer: rows of similar context length, on the CPU few enough that a group's gathered K/V stays in the CPU
cache between the gather and the attention that reads it. Each row gathers only the blocks its context covers,
so a step costs about the sum of its rows' context lengths rather than batch size times the longest one.

Two backends (`ATTENTION_BACKENDS`): `gather` (the decode groups above, and prefill chunks through SDPA over
their gathered context; plain PyTorch, the CPU's) and `triton`, whose decode rows and prefill chunks read the
cache in place through their block tables (`PagedDecode`, `PagedPrefill`: the kernel in triton_attention.py on
CUDA or under Triton's interpreter, else the same sums in PyTorch).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from streamvox.config import ATTENTION_BACKENDS

# Bytes of K+V one decode group gathers on the CPU (2048 positions of one 128-dim fp32 KV head): the copy must
# still be in the core's own cache when attention reads it. Measured on 2 cores (2 MB L2 each), 16 rows of 922
# positions: 16.7 ms a step in one 8 MB group, 8.6 ms in 2 MB groups; 0.5-1 MB groups were no faster. On a GPU,
# groups only bound the gather's size.
CPU_GROUP_BYTES = 2 * 2**20
GPU_GROUP_BYTES = 2**30


@dataclass(frozen=True)
class PrefillSpan:
    """A run of >1 consecutive tokens of one request inside the flattened batch."""

    token_start: int  # index of its first token in the batch
    num_tokens: int
    start_position: int  # position of its first token within the request
    block_table: torch.Tensor  # [num_blocks_of_request] int64, on the device


@dataclass(frozen=True)
class DecodePlan:
    """Single-token rows to attend together over one padded gather of their contexts (host lists, staged for
    the device by the runner)."""

    token_index: list[int]  # batch index of each row
    block_ids: list[int]  # each row's first num_blocks blocks, padded with block 0
    num_blocks: int
    context_len: int  # positions attended per row: the longest row's context (incl. itself)
    context_lens: list[int] | None  # each row's context; None when all equal context_len


@dataclass(frozen=True)
class DecodeGroup:
    """A DecodePlan on the device."""

    token_index: torch.Tensor  # [R] int64
    block_ids: torch.Tensor  # [R * num_blocks] int64
    num_blocks: int
    context_len: int
    mask: torch.Tensor | None  # [R, 1, 1, context_len] fp32: 0 visible, -inf past a row's context; None: all see all

    @classmethod
    def on_device(cls, plan: DecodePlan, token_index: torch.Tensor, block_ids: torch.Tensor,
                  context_lens: torch.Tensor) -> DecodeGroup:
        """The group of `plan` from its staged arrays; the mask is built once a step, on the device."""
        mask = None if plan.context_lens is None else _past_context_mask(plan.context_len, context_lens)
        return cls(token_index, block_ids, plan.num_blocks, plan.context_len, mask)


@dataclass(frozen=True)
class PagedDecode:
    """Decode rows that read the cache in place through their block tables (the `triton` backend)."""

    num_rows: int  # R: the batch's first R tokens are these rows
    block_tables: torch.Tensor  # [R, width] int64: each row's block ids (entries past its context unread)
    context_lens: torch.Tensor  # [R] int64: positions each row attends, itself included


PREFILL_TOKENS = 16  # triton: prefill tokens one kernel program takes


@dataclass(frozen=True)
class PagedPrefill:
    """Prefill chunks that read the cache in place (the `triton` backend), cut in tiles of PREFILL_TOKENS."""

    block_tables: torch.Tensor  # [S, width] int64: each chunk's sequence's block ids
    tiles: torch.Tensor  # [N, 4] int64: first token in the batch, tokens, block-table row, first token's position + 1


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each batch token's K/V goes and what each query may see."""

    slot_mapping: torch.Tensor  # [T] int64: flat cache slot of every batch token
    decode_groups: tuple[DecodeGroup, ...]
    prefills: tuple[PrefillSpan, ...]
    paged: PagedDecode | None = None
    paged_prefill: PagedPrefill | None = None


def resolve_backend(name: str, device: torch.device, block_size: int = 16) -> str:
    """The backend `name` asks for on `device` with KV blocks of `block_size`; ValueError for an unknown name, or
    for triton where it cannot run (no triton package, a block size the kernel does not take)."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; use one of: {', '.join(ATTENTION_BACKENDS)}")
    if name == "gather" or (name == "auto" and device.type != "cuda"):
        return "gather"
    try:
        from streamvox.layers.triton_attention import MIN_DOT, kernel_takes
    except ImportError:
        if name == "triton":
            raise ValueError("--attention triton needs the triton package (it comes with CUDA builds of torch)") \
                from None
        return "gather"
    if not kernel_takes(block_size):
        if name == "triton":
            raise ValueError(f"--attention triton needs a power-of-two --block-size of at least {MIN_DOT}, got "
                             f"{block_size}")
        return "gather"
    return "triton"


def _past_context_mask(num_positions: int, context_lens: torch.Tensor) -> torch.Tensor:
    """[R, 1, 1, num_positions] fp32: 0 where row r may look (positions below context_lens[r]), -inf past it."""
    hidden = torch.arange(num_positions, device=context_lens.device)[None, :] >= context_lens[:, None]
    return torch.zeros(hidden.shape, device=hidden.device).masked_fill_(hidden, float("-inf"))[:, None, None]


def flat_tables(tables: Sequence[Sequence[int]], num_blocks: Sequence[int], pad: int) -> tuple[int, list[int]]:
    """Block tables cut to each row's `num_blocks` and padded with `pad` to the longest, end to end -> (width,
    flat ids): the [rows, width] layout paged kernels read."""
    width = max(num_blocks)
    flat: list[int] = []
    for table, count in zip(tables, num_blocks, strict=True):
        flat += list(table[:count]) + [pad] * (width - count)
    return width, flat


def plan_decode(token_index: Sequence[int], block_tables: Sequence[Sequence[int]], context_lens: Sequence[int],
                block_size: int, position_bytes: int, group_bytes: int = CPU_GROUP_BYTES) -> list[DecodePlan]:
    """Group decode rows by context length, longest first, each group within `group_bytes` of padded K+V.

    `position_bytes` is the K+V of one position in one layer. A row starts a new group when it would overflow
    the budget or when its context is under half the group's longest, so a group pads at most 2x.
    """
    max_positions = group_bytes // position_bytes
    order = sorted(range(len(token_index)), key=lambda i: -context_lens[i])
    groups, start = [], 0
    for end in range(1, len(order) + 1):
        longest = context_lens[order[start]]
        if end < len(order):
            length = context_lens[order[end]]
            if (end - start + 1) * longest <= max_positions and 2 * length >= longest:
                continue
        groups.append(_decode_plan([order[i] for i in range(start, end)], token_index, block_tables,
                                   context_lens, block_size))
        start = end
    return groups


def _decode_plan(rows: list[int], token_index: Sequence[int], block_tables: Sequence[Sequence[int]],
                 context_lens: Sequence[int], block_size: int) -> DecodePlan:
    context_len = context_lens[rows[0]]
    num_blocks = -(-context_len // block_size)
    block_ids = []
    for row in rows:
        table = list(block_tables[row][:num_blocks])
        block_ids.extend(table + [0] * (num_blocks - len(table)))
    lens = None if context_lens[rows[-1]] == context_len else [context_lens[row] for row in rows]
    return DecodePlan([token_index[row] for row in rows], block_ids, num_blocks, context_len, lens)


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D] (rotated)
    k: torch.Tensor,  # [T, Hkv, D] (rotated)
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, Hq, D]
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim)[meta.slot_mapping] = k
    v_cache.view(-1, num_kv_heads, head_dim)[meta.slot_mapping] = v
    out = torch.empty_like(q)
    if (paged := meta.paged) is not None:
        rows = paged.num_rows
        paged_decode(q[:rows], k_cache, v_cache, paged.block_tables, paged.context_lens, scale, out[:rows])
    if (chunks := meta.paged_prefill) is not None:
        paged_prefill(q, k_cache, v_cache, chunks.block_tables, chunks.tiles, out, scale)
    for group in meta.decode_groups:
        out[group.token_index] = _decode(q[group.token_index], k_cache, v_cache, group, scale)
    for span in meta.prefills:
        rows = slice(span.token_start, span.token_start + span.num_tokens)
        out[rows] = _prefill(q[rows], k_cache, v_cache, span, scale)
    return out


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[num_blocks, bs, H, D] gathered by [R * nb] block ids -> [R, H, nb * bs, D]."""
    blocks = cache.view(cache.shape[0], -1).index_select(0, block_ids)  # [R * nb, bs * H * D]
    return blocks.view(num_rows, -1, cache.shape[2], cache.shape[3]).transpose(1, 2)


def _decode(q, k_cache, v_cache, group: DecodeGroup, scale: float) -> torch.Tensor:
    rows, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    keys = _gather(k_cache, group.block_ids, rows)[:, :, :group.context_len]  # [R, Hkv, L, D]
    values = _gather(v_cache, group.block_ids, rows)[:, :, :group.context_len]
    # The query heads sharing a KV head attend as that head's queries, so K/V are read once per KV head.
    grouped = q.view(rows, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [R, Hkv, Hq / Hkv, D]
    mask = None if group.mask is None else group.mask.to(q.dtype)  # SDPA wants a float mask in q's dtype
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(rows, num_heads, head_dim)  # SDPA may return it strided (CUDA)


def _prefill(q, k_cache, v_cache, span: PrefillSpan, scale: float) -> torch.Tensor:
    context_len = span.start_position + span.num_tokens
    num_blocks = -(-context_len // k_cache.shape[1])
    keys = _gather(k_cache, span.block_table[:num_blocks], 1)[:, :, :context_len]  # [1, Hkv, C, D]
    values = _gather(v_cache, span.block_table[:num_blocks], 1)[:, :, :context_len]
    query_positions = torch.arange(span.start_position, context_len, device=q.device)
    visible = torch.arange(context_len, device=q.device)[None, :] <= query_positions[:, None]  # [n, C]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys, values, attn_mask=visible, scale=scale,
        enable_gqa=q.shape[1] != keys.shape[1],
    )  # [1, Hq, n, D]
    return out[0].transpose(0, 1)


def _runs_kernel(q: torch.Tensor) -> bool:
    """Whether the Triton kernel runs for `q`: on CUDA, or on the CPU under TRITON_INTERPRET=1."""
    return q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """One query per row over its context read through its block table: [R, Hq, D] -> [R, Hq, D] (into `out`
    when given). The Triton kernel where it runs, else a PyTorch gather with the same result."""
    if _runs_kernel(q):
        from streamvox.layers import triton_attention

        return triton_attention.paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale, out)
    result = paged_decode_torch(q, k_cache, v_cache, block_tables, context_lens, scale)
    return result if out is None else out.copy_(result)


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  tiles: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    """Each tile's tokens attend causally over their sequence's cache, written into `out` (PagedPrefill); the
    kernel where it runs, else each tile through SDPA over its gathered context."""
    if _runs_kernel(q):
        from streamvox.layers import triton_attention

        triton_attention.paged_prefill(q, k_cache, v_cache, block_tables, tiles, out, scale)
        return
    for first, count, seq, context in tiles.tolist():  # the CPU: reading the tiles costs nothing
        rows = slice(first, first + count)
        out[rows] = _prefill(q[rows], k_cache, v_cache, PrefillSpan(first, count, context - 1, block_tables[seq]),
                             scale)


def paged_decode_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                       context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """paged_decode in PyTorch: every row gathers its table's blocks, and a mask hides what lies past its
    context."""
    rows, width = block_tables.shape
    block_size = k_cache.shape[1]
    keys = _gather(k_cache, block_tables.reshape(-1), rows)  # [R, Hkv, width * bs, D]
    values = _gather(v_cache, block_tables.reshape(-1), rows)
    mask = _past_context_mask(width * block_size, context_lens).to(q.dtype)
    grouped = q.view(rows, keys.shape[1], -1, q.shape[2])
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(q.shape)
