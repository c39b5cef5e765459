"""Scheduler and KV block pool, driven by a fake runner (no model)."""

import random

import pytest

from streamvox.batch import AudioPlan, StepBatch, StepOutput
from streamvox.config import SamplingParams, SchedulerConfig
from streamvox.sched.kv_blocks import BlockPool
from streamvox.sched.playback import PlaybackTracker
from streamvox.sched.request import FinishReason, Request
from streamvox.sched.scheduler import Scheduler

PLAN = AudioPlan(lm_steps_per_frame=7, frame_s=2048 / 24000, first_chunk_frames=1, frames_per_chunk=1,
                 lookahead_frames=2)


def make_scheduler(pool, policy="fcfs", **limits):
    config = SchedulerConfig(policy=policy, **{"max_queue_len": 1000, **limits})
    return Scheduler(config, pool, PlaybackTracker(PLAN, config.ttfa_target_s, config.client_prebuffer_s))


def make_request(request_id, prompt_len, max_tokens):
    return Request(request_id, tuple(range(prompt_len)), SamplingParams(max_tokens=max_tokens, seed=0), 0)


def fake_execute(batch: StepBatch, stop_ids=frozenset()) -> StepOutput:
    sampled = [row.request_id for row in batch.rows if row.is_sampled]
    return StepOutput(tuple(sampled), tuple(0 for _ in sampled), tuple(rid in stop_ids for rid in sampled))


def check_blocks(scheduler: Scheduler, pool: BlockPool):
    """No block is owned twice, and owned + free == all blocks; each running request owns enough blocks."""
    owned = [b for r in scheduler.requests.values() for b in r.block_ids]
    assert len(owned) == len(set(owned))
    assert len(owned) + pool.num_free_blocks == pool.num_blocks
    for request in scheduler.running:
        assert len(request.block_ids) * pool.block_size >= request.num_computed_tokens


def test_hundred_random_requests_with_cancellations_return_every_block():
    rng = random.Random(7)
    pool = BlockPool(num_blocks=24, block_size=4)
    scheduler = make_scheduler(pool, max_num_seqs=8, max_num_batched_tokens=32)
    pending = [make_request(f"r{i}", rng.randint(1, 40), rng.randint(1, 30)) for i in range(100)]
    cancel_at = {r.request_id: rng.randint(1, 20) for r in pending if rng.random() < 0.3}
    finished, steps = set(), 0
    while pending or scheduler.has_unfinished():
        steps += 1
        assert steps < 20_000, "scheduler made no progress"
        for _ in range(rng.randint(0, 3)):
            if pending:
                scheduler.add_request(pending.pop(0), 0.0)
        for request in list(scheduler.running):
            if cancel_at.get(request.request_id) == request.num_output_tokens:
                assert scheduler.cancel(request.request_id)
                finished.add(request.request_id)
        batch = scheduler.schedule(0.0)
        if batch is None:
            continue
        assert batch.num_tokens <= 32 and len(batch.rows) <= 8
        finished.update(r.request_id for r in scheduler.update(batch, fake_execute(batch)))
        check_blocks(scheduler, pool)
    assert len(finished) == 100
    assert pool.is_full and not scheduler.requests


def test_request_that_cannot_get_blocks_waits_then_runs():
    pool = BlockPool(num_blocks=4, block_size=4)
    scheduler = make_scheduler(pool, max_num_seqs=8, max_num_batched_tokens=64)
    scheduler.add_request(make_request("big", 12, 3), 0.0)  # 3 blocks for its prompt
    scheduler.add_request(make_request("next", 8, 3), 0.0)  # 2 blocks: must wait
    batch = scheduler.schedule(0.0)
    assert [row.request_id for row in batch.rows] == ["big"]
    assert [r.request_id for r in scheduler.waiting] == ["next"]
    while "big" in scheduler.requests:
        batch = scheduler.schedule(0.0)
        scheduler.update(batch, fake_execute(batch))
    batch = scheduler.schedule(0.0)
    assert [row.request_id for row in batch.rows] == ["next"]


def test_long_prompt_is_prefilled_in_chunks_under_the_token_budget():
    pool = BlockPool(num_blocks=64, block_size=4)
    scheduler = make_scheduler(pool, max_num_seqs=8, max_num_batched_tokens=16)
    scheduler.add_request(make_request("long", 40, 2), 0.0)
    scheduler.add_request(make_request("short", 3, 2), 0.0)
    spans = []
    while scheduler.has_unfinished():
        batch = scheduler.schedule(0.0)
        assert batch.num_tokens <= 16
        spans += [(r.request_id, r.start_position, r.num_tokens, r.is_sampled) for r in batch.rows]
        scheduler.update(batch, fake_execute(batch))
    long_prefill = [s for s in spans if s[0] == "long" and s[2] > 1]
    assert [s[1:3] for s in long_prefill] == [(0, 16), (16, 16), (32, 8)]
    assert [s[3] for s in long_prefill] == [False, False, True]


def test_preemption_recomputes_and_finishes_everyone():
    pool = BlockPool(num_blocks=6, block_size=2)
    scheduler = make_scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64)
    for i in range(3):
        scheduler.add_request(make_request(f"r{i}", 2, 6), 0.0)
    outputs = {f"r{i}": 0 for i in range(3)}
    preempted = False
    for _ in range(200):
        if not scheduler.has_unfinished():
            break
        batch = scheduler.schedule(0.0)
        if batch is None:
            continue
        preempted |= any(r.start_position == 0 and r.num_tokens > 2 for r in batch.rows)
        out = fake_execute(batch)
        for rid in out.request_ids:
            outputs[rid] += 1
        scheduler.update(batch, out)
        check_blocks(scheduler, pool)
    assert preempted, "the pool was sized to force a preemption"
    assert outputs == {"r0": 6, "r1": 6, "r2": 6}
    assert pool.is_full


def test_request_too_large_for_the_cache_alone_finishes_with_capacity():
    pool = BlockPool(num_blocks=2, block_size=2)
    scheduler = make_scheduler(pool)
    request = make_request("r", 3, 100)
    scheduler.add_request(request, 0.0)
    finished = []
    for _ in range(20):
        batch = scheduler.schedule(0.0)
        if batch is None:
            break
        finished += scheduler.update(batch, fake_execute(batch))
    assert not scheduler.has_unfinished() and pool.is_full
    assert finished == [request] and request.finish_reason is FinishReason.CAPACITY
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        scheduler.add_request(make_request("huge", 10, 1), 0.0)


def test_cancel_frees_blocks_immediately_and_reports_once():
    pool = BlockPool(num_blocks=16, block_size=4)
    scheduler = make_scheduler(pool)
    scheduler.add_request(make_request("a", 10, 50), 0.0)
    batch = scheduler.schedule(0.0)
    scheduler.update(batch, fake_execute(batch))
    assert not pool.is_full
    assert scheduler.cancel("a") and pool.is_full
    assert not scheduler.cancel("a")
    assert scheduler.schedule(0.0).finished_request_ids == ("a",)
    assert scheduler.schedule(0.0) is None


def test_limits_below_one_are_rejected():
    with pytest.raises(ValueError, match=">= 1 request"):
        make_scheduler(BlockPool(4, 4), max_num_batched_tokens=0)


def test_a_paused_request_neither_runs_nor_holds_back_the_others():
    """A request waiting for its text is no deadline to meet: its client running dry must not cap the step
    time or block admission (streaming policy), it gets no row, and it resumes when the text comes."""
    pool = BlockPool(num_blocks=64, block_size=16)
    scheduler = make_scheduler(pool, policy="streaming", max_num_seqs=8, max_num_batched_tokens=64)
    scheduler.timer.period_s = lambda rows, tokens=None, context=0: 0.001 + 0.0005 * (tokens or rows)  # slows by size
    busy, paused = make_request("busy", 8, 400), make_request("paused", 8, 400)
    paused.is_text_complete, paused.text_ids = False, [1, 2]
    now = 0.0
    for request in (busy, paused):
        scheduler.add_request(request, now)
    for _ in range(6):
        batch = scheduler.schedule(now)
        scheduler.update(batch, fake_execute(batch))
        scheduler.timer.observe_step(len(batch.rows), batch.num_tokens, batch.num_context_tokens,
                                     scheduler.timer.period_s(len(batch.rows), batch.num_tokens))
        now += 0.01
    assert paused.is_waiting_for_text and paused.num_output_tokens == 3 and busy.num_output_tokens == 6
    scheduler.playback.on_chunk("busy", 60.0, now)  # busy's client has a minute of audio in hand
    now += 5.0  # the paused client ran dry long ago
    late = make_request("late", 8, 10)
    scheduler.add_request(late, now)
    batch = scheduler.schedule(now)
    assert {row.request_id for row in batch.rows} == {"busy", "late"}  # no row dropped for the paused one's sake
    scheduler.update(batch, fake_execute(batch))
    assert scheduler.add_text("paused", [3, 4], is_final=True)
    batch = scheduler.schedule(now)
    assert "paused" in {row.request_id for row in batch.rows} and batch.text_updates == (("paused", (3, 4), True),)


def test_paused_requests_give_way_to_new_ones_and_come_back_with_their_text():
    """Requests waiting for text hold KV nobody uses: a new request that needs those blocks evicts them, and
    they are admitted again (recomputing their positions) only once their text has come."""
    pool = BlockPool(num_blocks=6, block_size=4)
    scheduler = make_scheduler(pool, max_num_seqs=2, max_num_batched_tokens=64)
    paused = [make_request(f"p{i}", 4, 4) for i in range(2)]  # 2 blocks each, with their reservation
    for request in paused:
        request.is_text_complete, request.text_ids = False, [1]
        scheduler.add_request(request, 0.0)
    for _ in range(2):
        batch = scheduler.schedule(0.0)
        scheduler.update(batch, fake_execute(batch))
    assert scheduler.schedule(0.0) is None  # both wait for text: nothing to run
    assert all(r.is_waiting_for_text and r in scheduler.running for r in paused)
    new = make_request("new", 10, 5)  # 4 blocks: only 2 are free
    scheduler.add_request(new, 0.0)
    batch = scheduler.schedule(0.0)
    assert [row.request_id for row in batch.rows] == ["new"] and new in scheduler.running
    assert paused[1] in scheduler.waiting and paused[0] in scheduler.running  # one evicted (not failed): room enough
    check_blocks(scheduler, pool)
    scheduler.update(batch, fake_execute(batch))
    scheduler.add_text("p0", [2, 3], is_final=True)
    while scheduler.has_unfinished() and not paused[0].is_finished:
        batch = scheduler.schedule(0.0)
        assert "p1" not in {row.request_id for row in batch.rows}  # still no text: stays out
        scheduler.update(batch, fake_execute(batch))
        check_blocks(scheduler, pool)
    assert paused[0].finish_reason is FinishReason.LENGTH and paused[0].num_output_tokens == 4
