"""The in-process engine: batching is invisible, seeds reproduce, the KV pool always comes back full."""

import random

import numpy as np
import pytest
import torch
from snac import SNAC

from streamvox.config import SamplingParams
from streamvox.engine.requests import codec_seed_for
from streamvox.models.orpheus import frame_seed

TEXTS = [
    "Hi.",
    "Short one here.",
    "A somewhat longer sentence to make the prompt grow.",
    "Numbers: one, two, three, four, five.",
    "The quick brown fox jumps over the lazy dog while the radio plays.",
    "Okay!",
    "Please read this sentence slowly, with a calm voice, and pause at every comma.",
    "Streaming speech needs the first sound quickly.",
]


def greedy(max_tokens, seed):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, seed=seed, ignore_eos=True)


def run_alone(make_engine, text, sampling):
    engine = make_engine()
    return engine.result(engine.submit(text, None, sampling))


def assert_same(batched, alone):
    assert batched.step_tokens == alone.step_tokens
    assert batched.num_frames == alone.num_frames > 0
    assert batched.pcm.shape == alone.pcm.shape
    assert np.abs(batched.pcm - alone.pcm).max() <= 1e-5


def test_batch_of_8_equals_each_alone(make_engine):
    engine = make_engine()
    samplings = [greedy(7 * (6 + i), seed=i) for i in range(8)]  # different lengths too
    ids = [engine.submit(text, None, s) for text, s in zip(TEXTS, samplings, strict=True)]
    while engine.has_unfinished():
        engine.step()
    batched = [engine.result(i) for i in ids]
    for text, sampling, result in zip(TEXTS, samplings, batched, strict=True):
        assert_same(result, run_alone(make_engine, text, sampling))


def test_requests_joining_midway_equal_each_alone(make_engine):
    engine = make_engine(max_num_batched_tokens=32)  # long prompts are prefilled in chunks beside decodes
    samplings = [greedy(56, seed=10 + i) for i in range(8)]
    ids = [engine.submit(TEXTS[i], None, samplings[i]) for i in range(4)]
    for _ in range(9):
        engine.step()
    ids += [engine.submit(TEXTS[i], None, samplings[i]) for i in range(4, 8)]
    results = [engine.result(i) for i in ids]
    for i, result in enumerate(results):
        assert_same(result, run_alone(make_engine, TEXTS[i], samplings[i]))


def test_sampled_requests_are_the_same_alone_or_batched(make_engine, tiny_model):
    sampling = tiny_model.default_sampling.replace(max_tokens=35, seed=5)  # the family's top-p sampling
    alone = run_alone(make_engine, TEXTS[2], sampling)
    engine = make_engine()
    neighbours = [engine.submit(TEXTS[i], None, sampling.replace(seed=i, top_p=1.0)) for i in (0, 1)]
    batched = engine.result(engine.submit(TEXTS[2], None, sampling))
    assert batched.step_tokens == alone.step_tokens and np.abs(batched.pcm - alone.pcm).max() <= 1e-5
    assert all(engine.result(n).step_tokens for n in neighbours)


def test_same_seed_same_bytes_different_seed_differs(make_engine):
    sampling = SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.3, max_tokens=70, seed=1234)
    first = run_alone(make_engine, "seeded", sampling)
    again = run_alone(make_engine, "seeded", sampling)
    other = run_alone(make_engine, "seeded", sampling.replace(seed=4321))
    assert first.pcm.tobytes() == again.pcm.tobytes() and first.step_tokens == again.step_tokens
    assert first.step_tokens != other.step_tokens
    assert first.pcm.tobytes() != other.pcm.tobytes()


def test_chunked_decode_matches_the_snac_package(make_engine, tiny_model, tiny_dir):
    sampling = greedy(7 * 9, seed=77)
    chunks = []
    engine = make_engine()
    request_id = engine.submit("codec parity", None, sampling)
    chunks = list(engine.stream(request_id))
    assert len(chunks) > 2  # the audio really came in several chunks
    builder = tiny_model.new_frame_builder()
    token_ids = run_alone(make_engine, "codec parity", sampling).step_tokens
    frames = [frame for frame in map(builder.push, token_ids) if frame]
    frames = torch.tensor(frames)  # [F, 7] in SNAC order
    reference = SNAC.from_pretrained(str(tiny_dir / "snac_24khz")).eval()
    expected = []
    for k in range(len(frames)):
        window = frames[[max(k - 1, 0), k, min(k + 1, len(frames) - 1), min(k + 2, len(frames) - 1)]]
        codes = [window[:, 0][None], window[:, 1:3].reshape(1, -1), window[:, 3:7].reshape(1, -1)]
        torch.manual_seed(frame_seed(codec_seed_for(sampling.seed), k))
        with torch.inference_mode():
            expected.append(reference.decode(codes)[0, 0, 2048:4096])
    ours = np.concatenate([c.pcm for c in chunks])
    assert ours.shape == (len(frames) * 2048,)
    assert np.abs(ours - torch.cat(expected).numpy()).max() <= 1e-5


@pytest.mark.parametrize("policy", ["fcfs", "streaming"])
def test_hundred_random_requests_with_cancellations_leave_the_pool_full(make_engine, policy):
    rng = random.Random(3)
    engine = make_engine(num_blocks=48, block_size=8, max_num_seqs=16, max_num_batched_tokens=128, policy=policy)
    words = "the quick brown fox jumps over a lazy dog while music plays".split()
    submitted, cancel_after, steps, num_cancelled, waited_for_blocks = [], {}, 0, 0, False
    for i in range(100):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 25)))
        # at least a frame (7 steps): fewer make no audio and are refused
        sampling = SamplingParams(temperature=1.0, max_tokens=max(7, rng.randint(1, 60)), seed=i)
        submitted.append(engine.submit(text, None, sampling))
        if rng.random() < 0.25:
            cancel_after[submitted[-1]] = rng.randint(1, 30)
        for _ in range(rng.randint(0, 2)):
            engine.step()
            steps += 1
            for request_id, at in list(cancel_after.items()):
                if steps >= at + submitted.index(request_id):
                    num_cancelled += engine.cancel(request_id)
                    del cancel_after[request_id]
            scheduler = engine.scheduler
            waited_for_blocks |= bool(scheduler.waiting) and len(scheduler.running) < 16
    for _ in range(5000):
        if not engine.has_unfinished():
            break
        engine.step()
        scheduler = engine.scheduler
        waited_for_blocks |= bool(scheduler.waiting) and len(scheduler.running) < 16
    assert not engine.has_unfinished()
    assert num_cancelled >= 10, "some requests must be cancelled mid-way"
    assert waited_for_blocks, "the pool is sized so that requests have to wait for KV blocks"
    assert engine.pool.is_full
    assert not engine.lm_runner.requests and not engine.codec_runner.requests
    assert not engine.scheduler.requests


def test_request_too_long_for_the_whole_cache_ends_its_stream_with_capacity(make_engine):
    engine = make_engine(num_blocks=4, block_size=8)  # 32 positions in all
    doomed = engine.submit("fits as a prompt", None, greedy(200, seed=1))
    assert engine.result(doomed).finish_reason == "capacity"  # must end, not spin
    assert engine.pool.is_full and not engine.has_unfinished()
    healthy = engine.submit("next", None, greedy(7, seed=2))
    assert engine.result(healthy).finish_reason == "length"


def test_codec_state_rows_come_back_when_streams_end_or_are_cancelled(engine_for, tmp_path):
    """CSM's Mimi keeps each stream's context in a pooled row: finished and cancelled streams (some cancelled
    while a chunk of theirs is decoding) give their rows back, and later streams reuse them."""
    from streamvox.models.tiny.csm import write_tiny
    from streamvox.runner.weights import load_model

    model = load_model(str(write_tiny(tmp_path / "csm")))
    engine = engine_for(model, max_num_seqs=4)
    pool = model.codec.pool
    ids = []
    for i in range(12):
        ids.append(engine.submit(TEXTS[i % len(TEXTS)], None, model.default_sampling.replace(
            seed=i, max_tokens=4 + i % 5, ignore_eos=True)))
        for _ in range(2):
            engine.step()
        if i % 3 == 2:
            engine.cancel(ids[-2])
    while engine.has_unfinished():
        engine.step()
    assert pool.capacity <= 8 and pool.num_free == pool.capacity  # 4 at a time, every row back
    assert not engine.codec_runner.requests and not engine.codec_runner._orphans
