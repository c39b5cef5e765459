"""Attention read straight from the paged KV cache: one Triton kernel for decode rows and prefill chunks.

A program takes one KV head and either one decode row or up to PREFILL_TOKENS consecutive tokens of a prefill
chunk. It loads the queries of the query heads that share its KV head (rows padded to 16, the least a `tl.dot`
takes), walks the sequence's context a tile of positions at a time through its block table, and keeps a running
softmax (max, sum, weighted values) in fp32 per query row, each row masked to its own causal context. Nothing is
gathered into a contiguous copy, and the work follows each sequence's own context length. The loop bound is read
on the device, so a captured graph replays any mix of lengths. Only long-standing Triton features are used (the
GPU machines run triton 3.6); on the CPU the kernel runs under Triton's interpreter (`TRITON_INTERPRET=1`), which
is how the tests check it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from streamvox.layers.attention import PREFILL_TOKENS

TILE_POSITIONS = 32  # context positions one loop iteration reads at least (KV blocks, for memory parallelism)
MIN_DOT = 16  # tl.dot's smallest dimension


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, context_lens_ptr, tiles_ptr, scale,
    stride_q_row, stride_q_head, stride_o_row, stride_o_head,
    stride_c_block, stride_c_slot, stride_c_head, stride_table_row,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: the query heads of one KV head for TOKENS consecutive tokens of one sequence (a decode row
    when TOKENS is 1; a piece of a prefill chunk, its tokens at consecutive positions, otherwise)."""
    program = tl.program_id(0)
    kv_head = tl.program_id(1)
    if TOKENS == 1:  # decode: program r is row r of the batch and of the block tables
        first_token = program
        num_tokens = 1
        seq = program
        first_context = tl.load(context_lens_ptr + program)
    else:  # tiles [N, 4]: first token in the batch, tokens, block-table row, context of the first token
        first_token = tl.load(tiles_ptr + program * 4)
        num_tokens = tl.load(tiles_ptr + program * 4 + 1)
        seq = tl.load(tiles_ptr + program * 4 + 2)
        first_context = tl.load(tiles_ptr + program * 4 + 3)
    rows = tl.arange(0, TOKENS * GROUP_PAD)  # token-major: row = token * GROUP_PAD + head
    token = rows // GROUP_PAD
    head = rows % GROUP_PAD
    row_ok = (token < num_tokens) & (head < GROUP)
    dims = tl.arange(0, DIM_PAD)
    dim_ok = dims < HEAD_DIM
    io_mask = row_ok[:, None] & dim_ok[None, :]
    q_rows = (first_token + token).to(tl.int64)
    q_heads = kv_head * GROUP + head
    q = tl.load(q_ptr + q_rows[:, None] * stride_q_row + q_heads[:, None] * stride_q_head + dims[None, :],
                mask=io_mask, other=0.0).to(tl.float32)
    row_context = first_context + tl.where(token < num_tokens, token, 0)  # causal: a token sees itself
    context = first_context + num_tokens - 1  # the tile's longest
    running_max = tl.full([TOKENS * GROUP_PAD], float("-inf"), tl.float32)
    running_sum = tl.zeros([TOKENS * GROUP_PAD], tl.float32)
    acc = tl.zeros([TOKENS * GROUP_PAD, DIM_PAD], tl.float32)
    offsets = tl.arange(0, TILE)
    table = block_tables_ptr + seq.to(tl.int64) * stride_table_row
    for start in range(0, context, TILE):
        positions = start + offsets
        in_context = positions < context
        blocks = tl.load(table + positions // BLOCK_SIZE, mask=in_context, other=0).to(tl.int64)
        slots = blocks * stride_c_block + (positions % BLOCK_SIZE) * stride_c_slot + kv_head * stride_c_head
        kv_mask = in_context[:, None] & dim_ok[None, :]
        k = tl.load(k_cache_ptr + slots[:, None] + dims[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_cache_ptr + slots[:, None] + dims[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [rows, TILE] fp32
        scores = tl.where(positions[None, :] < row_context[:, None], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        correction = tl.exp(running_max - new_max)
        weights = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(weights, axis=1)
        acc = acc * correction[:, None] + tl.dot(weights, v, input_precision=PRECISION)
        running_max = new_max
    out = acc / running_sum[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_o_row + q_heads[:, None] * stride_o_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=io_mask)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """q [R, Hq, D] (one query per row), caches [blocks, block_size, Hkv, D], block_tables [R, width] (a row's
    block ids in order), context_lens [R] (positions row r attends: 0 .. context_lens[r] - 1) -> [R, Hq, D]
    (into `out` when given)."""
    out = torch.empty_like(q) if out is None else out
    if q.shape[0]:
        _launch(q, k_cache, v_cache, out, block_tables, context_lens, context_lens, q.shape[0], 1, scale)
    return out


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  tiles: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    """Prefill tokens of q [T, Hq, D] attend causally over their sequences' cached context, written into `out`
    [T, Hq, D]: tiles [N, 4] int64 (first token, tokens <= PREFILL_TOKENS, block-table row, context of the first
    token, i.e. its position + 1), block_tables [S, width]. Rows of q outside every tile are left alone."""
    if tiles.shape[0]:
        _launch(q, k_cache, v_cache, out, block_tables, tiles, tiles, tiles.shape[0], PREFILL_TOKENS, scale)


def _launch(q, k_cache, v_cache, out, block_tables, context_lens, tiles, programs: int, tokens: int,
            scale: float) -> None:
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if q.stride(2) != 1 or out.stride(2) != 1 or k_cache.stride(3) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("paged attention wants the head dimension contiguous and K and V laid out alike")
    if block_size & (block_size - 1):
        raise ValueError(f"paged attention wants a power-of-two block size, got {block_size}")
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    _paged_attention_kernel[(programs, num_kv_heads)](
        q, k_cache, v_cache, out, block_tables, context_lens, tiles, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(group_pad, MIN_DOT // tokens), TOKENS=tokens, HEAD_DIM=head_dim,
        DIM_PAD=max(MIN_DOT, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size,
        TILE=max(TILE_POSITIONS, block_size),
        # the tiles are fp32 in registers; tf32 keeps 16-bit queries and K/V exact
        PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
        num_warps=4 if tokens == 1 else 8,
    )
