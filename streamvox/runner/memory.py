"""How many KV blocks the cache gets: as configured, else 256 MB on the CPU, else on a GPU what is left of
`gpu_memory_utilization` of its memory once the weights are loaded and the largest step the engine will run (a
full prefill, sampling every row, a full codec batch) has been run once and its peak working memory measured."""

from __future__ import annotations

import math

import torch

from streamvox.batch import NewRequest, ScheduledRow, StepBatch
from streamvox.config import CacheConfig, SamplingParams, SchedulerConfig
from streamvox.models.base import ChunkJob, SpeechModel
from streamvox.runner.lm_runner import LMRunner

CPU_KV_CACHE_MB = 256  # the KV cache on the CPU unless configured
SORT_COPIES = 8  # [rows, vocab] fp32 temporaries sampling may hold at once (logits, filters, sort, keys)


def cuda_kv_blocks(model: SpeechModel, cache: CacheConfig, scheduler: SchedulerConfig, dtype: torch.dtype) -> int:
    device = model.device
    per_block = LMRunner.kv_bytes_per_block(model, cache.block_size, dtype)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    num_tokens = scheduler.max_num_batched_tokens
    profile_blocks = math.ceil(num_tokens / cache.block_size)
    _profile(model, num_tokens, profile_blocks, cache.block_size, dtype, scheduler.max_codec_frames)
    torch.cuda.synchronize(device)
    working = torch.cuda.max_memory_allocated(device) - before - profile_blocks * per_block
    working += scheduler.max_num_seqs * model.backbone.config.vocab_size * 4 * SORT_COPIES
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    budget = cache.gpu_memory_utilization * total - (total - free) - working
    num_blocks = int(budget // per_block)
    needed = math.ceil(num_tokens / cache.block_size) + scheduler.max_num_seqs
    if num_blocks < needed:
        raise ValueError(
            f"the KV cache would get {max(num_blocks, 0)} blocks of {cache.block_size} positions at "
            f"--gpu-memory-utilization {cache.gpu_memory_utilization} ({(total - free) / 2**30:.1f} GiB of "
            f"{total / 2**30:.1f} GiB in use, {working / 2**30:.1f} GiB for a step's work), fewer than one full "
            f"step needs ({needed}); raise --gpu-memory-utilization, or lower --max-num-batched-tokens or "
            "--max-num-seqs")
    return num_blocks


@torch.inference_mode()
def _profile(model: SpeechModel, num_tokens: int, num_blocks: int, block_size: int, dtype: torch.dtype,
             num_codec_jobs: int) -> None:
    runner = LMRunner(model, num_blocks, block_size, dtype)
    prompt = model.prepare_request("warm up", None).prompt
    prompt = (prompt * (num_tokens // len(prompt) + 1))[:num_tokens]
    sampling = SamplingParams(temperature=1.0, top_p=0.9, seed=0)
    row = ScheduledRow("profile", 0, num_tokens, tuple(range(num_blocks)), True)
    runner.execute(StepBatch((NewRequest("profile", tuple(prompt), sampling, 0),), (row,), ()))
    del runner
    frames = torch.zeros(1, model.codes_per_frame, dtype=torch.int64)
    jobs = [ChunkJob(frames, 0, 1, True, seed, model.new_codec_state(None, seed)) for seed in range(num_codec_jobs)]
    model.decode_chunks(jobs)
    for job in jobs:
        model.release_codec_state(job.state)


def kv_blocks(model: SpeechModel, cache: CacheConfig, scheduler: SchedulerConfig) -> int:
    """KV blocks of the cache: as configured, else 256 MB on the CPU, else what the GPU's memory fraction leaves."""
    cache.validate()
    if cache.num_blocks:
        return cache.num_blocks
    per_block = LMRunner.kv_bytes_per_block(model, cache.block_size, model.dtype)
    if cache.kv_cache_mb or model.device.type != "cuda":
        return max(1, (cache.kv_cache_mb or CPU_KV_CACHE_MB) * 2**20 // per_block)
    return cuda_kv_blocks(model, cache, scheduler, model.dtype)
