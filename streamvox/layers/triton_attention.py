"""Attention read straight from the paged KV cache: one Triton kernel for decode rows and prefill chunks.

A program takes one KV head and either one decode row or up to PREFILL_TOKENS consecutive tokens of a prefill
chunk. It loads the queries of the query heads that share its KV head (rows padded to 16, the least a `tl.dot`
takes), walks the sequence's context one KV block at a time through its block table (a block's address is one
scalar, which keeps the program to about 100 registers at head size 128), and keeps a running softmax (max,
sum, weighted values) in fp32 per query row, each row masked to its own causal context. Nothing is
gathered into a contiguous copy, and the work follows each sequence's own context length. The loop bound is read
on the device, so a captured graph replays any mix of lengths. Only long-standing Triton features are used (the
GPU machines run triton 3.6); on the CPU the kernel runs under Triton's interpreter (`TRITON_INTERPRET=1`), which
is how the tests check it.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from streamvox.layers.attention import PREFILL_TOKENS

MIN_DOT = 16  # tl.dot's smallest dimension


# a step's metadata comes as views of one staged buffer: their addresses and the table width change from step to
# step, and specialising on them would compile new variants while serving
@triton.jit(do_not_specialize=["block_tables_ptr", "context_lens_ptr", "tiles_ptr", "stride_table_row"])
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, context_lens_ptr, tiles_ptr, scale,
    stride_q_row, stride_q_head, stride_o_row, stride_o_head,
    stride_c_block, stride_c_slot, stride_c_head, stride_table_row,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, NATIVE: tl.constexpr,
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
                mask=io_mask, other=0.0)
    if not NATIVE:
        q = q.to(tl.float32)
    row_context = first_context + tl.where(token < num_tokens, token, 0)  # causal: a token sees itself
    context = first_context + num_tokens - 1  # the tile's longest
    running_max = tl.full([TOKENS * GROUP_PAD], float("-inf"), tl.float32)
    running_sum = tl.zeros([TOKENS * GROUP_PAD], tl.float32)
    acc = tl.zeros([TOKENS * GROUP_PAD, DIM_PAD], tl.float32)
    slot_offsets = tl.arange(0, BLOCK_SIZE)
    local = slot_offsets[:, None] * stride_c_slot + dims[None, :]  # int32 within a block
    head_base = kv_head * stride_c_head
    table = block_tables_ptr + seq.to(tl.int64) * stride_table_row
    for index in range(0, tl.cdiv(context, BLOCK_SIZE)):  # a KV block an iteration, from its scalar address
        block = tl.load(table + index).to(tl.int64)
        base = block * stride_c_block + head_base
        positions = index * BLOCK_SIZE + slot_offsets  # those past the context are read, and masked below
        if DIM_PAD == HEAD_DIM:
            k = tl.load(k_cache_ptr + base + local)
            v = tl.load(v_cache_ptr + base + local)
        else:
            k = tl.load(k_cache_ptr + base + local, mask=dim_ok[None, :], other=0.0)
            v = tl.load(v_cache_ptr + base + local, mask=dim_ok[None, :], other=0.0)
        if NATIVE:  # 16-bit operands on the tensor cores, fp32 sums
            scores = tl.dot(q, tl.trans(k)) * scale  # [rows, BLOCK_SIZE] fp32
        else:
            scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
        scores = tl.where(positions[None, :] < row_context[:, None], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        correction = tl.exp(running_max - new_max)
        weights = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(weights, axis=1)
        if NATIVE:
            acc = acc * correction[:, None] + tl.dot(weights.to(v.dtype), v)
        else:
            acc = acc * correction[:, None] + tl.dot(weights, v.to(tl.float32), input_precision="ieee")
        running_max = new_max
    out = acc / running_sum[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_o_row + q_heads[:, None] * stride_o_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=io_mask)


def kernel_takes(block_size: int) -> bool:
    """Whether the kernel reads caches of this block size (a block is one tl.dot's worth of positions)."""
    return block_size >= MIN_DOT and not block_size & (block_size - 1)


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
    if q.stride(2) != 1 or out.stride(2) != 1 or k_cache.stride(3) != 1 or k_cache.stride() != v_cache.stride() \
            or block_tables.stride(1) != 1 or not context_lens.is_contiguous() or not tiles.is_contiguous():
        raise ValueError("paged attention wants the head dimension and the tables contiguous, K and V alike")
    if not kernel_takes(block_size):
        raise ValueError(f"the paged attention kernel wants a power-of-two block size of at least {MIN_DOT}, got "
                         f"{block_size}")
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    # Triton launches on the current device, which need not be the tensors' (cuda:N)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _paged_attention_kernel[(programs, num_kv_heads)](
            q, k_cache, v_cache, out, block_tables, context_lens, tiles, scale,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
            GROUP=group, GROUP_PAD=max(group_pad, MIN_DOT // tokens), TOKENS=tokens, HEAD_DIM=head_dim,
            DIM_PAD=max(MIN_DOT, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size,
            # 16-bit caches multiply natively on a GPU (the weights rounded to 16 bits, as flash attention does);
            # fp32 caches, and the interpreter (whose 16-bit dot is wrong), multiply in fp32
            NATIVE=k_cache.dtype != torch.float32 and q.is_cuda,
            num_warps=4 if tokens == 1 else 8,
        )
