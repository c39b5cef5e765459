"""Attention over a paged KV cache for a ragged batch of prefill chunks and decode rows (plain PyTorch).

The cache of one layer is a pair of tensors [num_blocks, block_size, num_kv_heads, head_dim]. A batch is T
flattened tokens; each new token's K/V is written to its slot (block * block_size + offset) and every query
attends to its own request's positions 0..its own position, gathered through the request's block table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class PrefillSpan:
    """A run of >1 consecutive tokens of one request inside the flattened batch."""

    token_start: int  # index of its first token in the batch
    num_tokens: int
    start_position: int  # position of its first token within the request
    block_table: torch.Tensor  # [num_blocks_of_request] int64


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each batch token's K/V goes and what each query may see."""

    slot_mapping: torch.Tensor  # [T] int64: flat cache slot of every batch token
    decode_token_index: torch.Tensor  # [Bd] int64: batch index of each single-token row
    decode_block_tables: torch.Tensor  # [Bd, max_blocks] int64, padded with 0
    decode_context_lens: torch.Tensor  # [Bd] int64: positions visible to each decode row (incl. itself)
    prefills: tuple[PrefillSpan, ...]


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
    if meta.decode_token_index.numel():
        out[meta.decode_token_index] = _decode(q[meta.decode_token_index], k_cache, v_cache, meta, scale)
    for span in meta.prefills:
        rows = slice(span.token_start, span.token_start + span.num_tokens)
        out[rows] = _prefill(q[rows], k_cache, v_cache, span, scale)
    return out


def _gather(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[num_blocks, bs, H, D] gathered by [B, nb] -> [B, H, nb * bs, D]."""
    batch, num_blocks = block_tables.shape
    gathered = cache[block_tables]  # [B, nb, bs, H, D]
    return gathered.reshape(batch, num_blocks * cache.shape[1], cache.shape[2], cache.shape[3]).transpose(1, 2)


def _decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    keys = _gather(k_cache, meta.decode_block_tables)  # [Bd, Hkv, L, D]
    values = _gather(v_cache, meta.decode_block_tables)
    visible = torch.arange(keys.shape[2])[None, :] < meta.decode_context_lens[:, None]  # [Bd, L]
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], keys, values, attn_mask=visible[:, None, None, :], scale=scale,
        enable_gqa=q.shape[1] != keys.shape[1],
    )  # [Bd, Hq, 1, D]
    return out[:, :, 0, :]


def _prefill(q, k_cache, v_cache, span: PrefillSpan, scale: float) -> torch.Tensor:
    context_len = span.start_position + span.num_tokens
    keys = _gather(k_cache, span.block_table[None])[:, :, :context_len]  # [1, Hkv, C, D]
    values = _gather(v_cache, span.block_table[None])[:, :, :context_len]
    query_positions = torch.arange(span.start_position, context_len)
    visible = torch.arange(context_len)[None, :] <= query_positions[:, None]  # [n, C]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys, values, attn_mask=visible, scale=scale,
        enable_gqa=q.shape[1] != keys.shape[1],
    )  # [1, Hq, n, D]
    return out[0].transpose(0, 1)
