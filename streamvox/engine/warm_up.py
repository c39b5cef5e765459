"""The engine's warm-up: requests through the LM and the codec, alone and in batches, short and with long
contexts, so that the first real request is not slow and the step-cost model knows what more streams cost before
any load comes (what it measures is kept as the model's prior)."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import torch

from streamvox.models.base import ChunkJob
from streamvox.sched.policy import POLICIES

if TYPE_CHECKING:
    from streamvox.engine.core import EngineCore

WARM_UP_LONG_WORDS = 150  # words of the warm-up's long prompts, so it measures what context costs
WARM_UP_ROWS = 16  # the warm-up's largest batch: the cost model extrapolates from here
WARM_UP_FRAMES = 12  # per request: long enough for the codec to run beside the LM as it does under load
# the warm-up runs alone; serving, the API server and its clients take their part of the cores (measured on 2
# cores: 20-30 %, and one warm-up differs from the next by 10 % or more), so until live steps and codec calls
# say otherwise they are taken to cost this much more than it measured
SERVING_BIAS = 1.3
WARM_UP_RERUN_FRAMES = 200  # a detokenizer that reruns over the prefix is timed chunk by chunk this far in


def warm_up(engine: EngineCore) -> None:
    """Warm `engine` up and keep what its step timer measured as the timer's prior."""
    num_frames = engine.model.chunking.first_chunk_frames + engine.model.chunking.lookahead_frames + WARM_UP_FRAMES
    sampling = engine.model.default_sampling.replace(
        max_tokens=num_frames * engine.model.timing.lm_steps_per_frame, ignore_eos=True, seed=0)
    short = engine.model.prepare_request("warm up", None)
    long = engine.model.prepare_request("warm up " * WARM_UP_LONG_WORDS, None)
    long = dataclasses.replace(long, prompt=long.prompt[: engine.config.scheduler.max_prompt_tokens])
    scheduler = engine.scheduler
    config, policy, max_wait_s = scheduler.config, scheduler.policy, scheduler.max_wait_s
    # each round's prompts in one step, so that every decode step measured runs all of its rows (steps
    # taken while the others still prefill are slower than steady decoding, and would skew the fit)
    scheduler.config = dataclasses.replace(config, max_num_batched_tokens=max(
        config.max_num_batched_tokens, WARM_UP_ROWS * len(long.prompt)), max_queue_len=max(config.max_queue_len,
                                                                                           WARM_UP_ROWS))
    scheduler.policy = POLICIES["fcfs"](scheduler.config, scheduler.playback, engine.timer)
    scheduler.max_wait_s = None
    try:
        for is_kept in (False, True):  # the first pass meets every shape cold: it is not what they cost
            if is_kept:
                engine.timer.begin_prior()
            for num_rows, prepared in [(1, short), (4, short), (WARM_UP_ROWS, short), (WARM_UP_ROWS, long)]:
                for index in range(min(num_rows, scheduler.config.max_num_seqs)):
                    engine.add_request(f"warm-up-{index}", prepared, sampling, 0)
                while engine.has_unfinished():
                    engine.step()
        _time_reruns(engine)
    finally:
        scheduler.config, scheduler.policy, scheduler.max_wait_s = config, policy, max_wait_s
    engine.timer.keep_as_prior(bias=SERVING_BIAS)


def _time_reruns(engine: EngineCore) -> None:
    """A detokenizer that reruns over the whole prefix for each chunk costs more the further a stream is: one
    stream's chunks up to WARM_UP_RERUN_FRAMES are decoded and timed one by one, so that the codec fit knows by
    how much before any long stream plays (the requests above stop after a chunk or two)."""
    model, plan = engine.model, engine.codec_runner.plan
    if plan.codec_prefix_frames is None:
        return
    frames = torch.zeros(WARM_UP_RERUN_FRAMES + plan.lookahead_frames, model.codes_per_frame, dtype=torch.int64)
    state, start = model.new_codec_state(None, 0), 0
    try:
        with torch.inference_mode():
            while (end := plan.next_boundary(start)) <= WARM_UP_RERUN_FRAMES:
                started = time.perf_counter()
                model.decode_chunks([ChunkJob(frames[: end + plan.lookahead_frames], start, end, False, 0, state)])
                if model.device.type == "cuda":
                    torch.cuda.synchronize(model.device)
                engine.timer.observe_codec_frames(end - start, time.perf_counter() - started,
                                                  plan.codec_rereads(start, end))
                start = end
    finally:
        model.release_codec_state(state)
