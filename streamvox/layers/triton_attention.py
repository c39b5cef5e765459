"""Decode attention read straight from the paged KV cache: a Triton kernel, one program per (row, KV head).

Each program loads the queries of the query heads that share its KV head (padded to 16 rows, the least a
`tl.dot` takes), walks the row's context a tile of positions at a time through its block table, and keeps a
running softmax (max, sum, weighted values) in fp32, so nothing is gathered into a contiguous copy and the
work per row follows its own context length. The loop bound is read on the device, so a captured graph
replays any mix of lengths. Only long-standing Triton features are used (the GPU machines run triton 3.6); on
the CPU the kernel runs under Triton's interpreter (`TRITON_INTERPRET=1`), which is how the tests check it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE_POSITIONS = 32  # context positions one loop iteration reads at least (KV blocks, for memory parallelism)
MIN_DOT = 16  # tl.dot's smallest dimension


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, context_lens_ptr, scale,
    stride_q_row, stride_q_head, stride_o_row, stride_o_head,
    stride_c_block, stride_c_slot, stride_c_head, stride_table_row,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr,
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    context = tl.load(context_lens_ptr + row)
    heads = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, DIM_PAD)
    head_ok = heads < GROUP
    dim_ok = dims < HEAD_DIM
    q_heads = kv_head * GROUP + heads
    q = tl.load(q_ptr + row * stride_q_row + q_heads[:, None] * stride_q_head + dims[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
    running_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    running_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    offsets = tl.arange(0, TILE)
    table = block_tables_ptr + row.to(tl.int64) * stride_table_row
    for start in range(0, context, TILE):
        positions = start + offsets
        visible = positions < context
        blocks = tl.load(table + positions // BLOCK_SIZE, mask=visible, other=0).to(tl.int64)
        slots = blocks * stride_c_block + (positions % BLOCK_SIZE) * stride_c_slot + kv_head * stride_c_head
        kv_mask = visible[:, None] & dim_ok[None, :]
        k = tl.load(k_cache_ptr + slots[:, None] + dims[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_cache_ptr + slots[:, None] + dims[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, TILE] fp32
        scores = tl.where(visible[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        correction = tl.exp(running_max - new_max)
        weights = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(weights, axis=1)
        acc = acc * correction[:, None] + tl.dot(weights, v, input_precision=PRECISION)
        running_max = new_max
    out = acc / running_sum[:, None]
    tl.store(out_ptr + row * stride_o_row + q_heads[:, None] * stride_o_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & dim_ok[None, :])


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [R, Hq, D] (one query per row), caches [blocks, block_size, Hkv, D], block_tables [R, width] (a row's
    block ids in order), context_lens [R] (positions row r attends: 0 .. context_lens[r] - 1) -> [R, Hq, D]."""
    rows, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("paged_decode wants the head dimension contiguous and K and V laid out alike")
    if block_size & (block_size - 1):
        raise ValueError(f"paged_decode wants a power-of-two block size, got {block_size}")
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    if rows == 0:
        return out
    _paged_decode_kernel[(rows, num_kv_heads)](
        q, k_cache, v_cache, out, block_tables, context_lens, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(MIN_DOT, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        DIM_PAD=max(MIN_DOT, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size,
        TILE=max(TILE_POSITIONS, block_size),
        # the tiles are fp32 in registers; tf32 keeps 16-bit queries and K/V exact
        PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
    )
    return out
