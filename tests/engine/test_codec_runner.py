"""Codec batches are capped in frames; a capped request keeps the rest of its frames for the next batch."""

import numpy as np
import torch

from streamvox.runner.codec_runner import CodecRunner


def push_frames(runner, request_id, model, num_frames):
    ids = model.ids
    for frame in range(num_frames):
        for k in range(7):
            runner.push(request_id, ids.audio_offset + k * ids.codebook_size + (frame * 7 + k) % ids.codebook_size)


def test_a_frame_budget_splits_chunks_and_the_pieces_make_the_same_audio(tiny_model):
    whole, capped = CodecRunner(tiny_model), CodecRunner(tiny_model)
    for runner in (whole, capped):
        runner.add("a", seed=1)
        runner.add("b", seed=2)
        push_frames(runner, "a", tiny_model, 10)
        push_frames(runner, "b", tiny_model, 3)
        runner.mark_complete("a")
        runner.mark_complete("b")
    pending = whole.take_ready(["a", "b"])
    expected = {p.request_id: pcm for p, pcm in zip(pending, whole.decode(pending), strict=True)}
    pieces = {"a": [], "b": []}
    batches = []
    while capped.requests:
        ready = [request_id for request_id, _, _ in capped.ready()]
        pending = capped.take_ready(ready, max_frames=4)
        batches.append([(p.request_id, p.start_frame, p.end_frame, p.is_last) for p in pending])
        assert sum(p.end_frame - p.start_frame for p in pending) <= 4
        for chunk in capped.complete(pending, capped.decode(pending)):
            pieces[chunk.request_id].append(chunk.pcm)
    assert batches[0] == [("a", 0, 4, False)]  # b waits: a's 10 frames already fill the batch
    b_chunks = [chunk for batch in batches for chunk in batch if chunk[0] == "b"]
    assert b_chunks[0] == ("b", 0, 3, True)  # b's first chunk is never cut short behind a's
    assert ("a", 8, 10, True) in batches[-1] or ("a", 8, 10, True) in batches[-2]
    for request_id in ("a", "b"):
        np.testing.assert_allclose(np.concatenate(pieces[request_id]), expected[request_id], atol=1e-5)


def test_a_batch_waits_behind_the_one_decoding_only_once_it_is_full(tiny_model):
    """Frames made while a batch decodes go out together once it is done (a call costs much the same for one
    frame as for several), unless they already fill a batch."""
    import threading

    from streamvox.engine.codec_pipeline import CodecPipeline
    from streamvox.sched.timing import StepTimer

    runner = CodecRunner(tiny_model)
    pipeline = CodecPipeline(runner, StepTimer(), max_frames=4)
    release = threading.Event()
    pipeline.before_decode = lambda pending: release.wait(10)  # the first batch decodes until released
    try:
        for request_id in ("a", "b"):
            runner.add(request_id, seed=1)
        push_frames(runner, "a", tiny_model, 4)  # a first chunk is ready once its lookahead is known
        pipeline.dispatch(tuple(r for r, _, _ in pipeline.ready()))
        assert pipeline.is_busy and not runner.ready()
        push_frames(runner, "b", tiny_model, 4)
        assert runner.ready() and not pipeline.ready(), "too few frames to wait behind the batch decoding"
        push_frames(runner, "b", tiny_model, 4)
        assert sum(n for _, n, _ in pipeline.ready()) >= 4, "a full batch may wait behind it"
    finally:
        release.set()
        pipeline.collect(wait=True)
        pipeline.close()


def test_codec_state_rows_come_back_from_failed_dropped_and_finished_streams(tmp_path):
    """Mimi keeps each stream's context in a pooled row. A stream whose chunk fails to decode, one dropped while
    a chunk of it decodes, and one that finishes all give their row back."""
    from streamvox.engine.codec_pipeline import CodecPipeline
    from streamvox.models.tiny.csm import write_tiny
    from streamvox.runner.weights import load_model
    from streamvox.sched.timing import StepTimer

    model = load_model(str(write_tiny(tmp_path / "csm")))
    runner = CodecRunner(model)
    pipeline = CodecPipeline(runner, StepTimer(), 64)
    failing = set()

    def before(pending):
        if any(chunk.request_id in failing for chunk in pending):
            raise RuntimeError("injected")

    pipeline.before_decode = before
    frame = tuple([1] * model.codes_per_frame)
    plan = runner.plan
    try:
        for request_id in ("fails", "dropped", "finishes"):
            runner.add(request_id, seed=0)
            runner.requests[request_id].frames.extend([frame] * (plan.first_chunk_frames + plan.lookahead_frames))
        pipeline.dispatch(("fails", "dropped", "finishes"))  # first chunks: every stream takes a row
        chunks, failures = pipeline.collect(wait=True)
        assert len(chunks) == 3 and not failures and model.codec.pool.num_free == model.codec.pool.capacity - 3
        for request_id in ("fails", "dropped", "finishes"):
            runner.requests[request_id].frames.extend([frame] * 4)
            runner.mark_complete(request_id)
        failing.add("fails")
        pipeline.dispatch(("fails",))  # alone, so the retry chunk by chunk fails it too
        chunks, failures = pipeline.collect(wait=True)
        assert [request_id for request_id, _ in failures] == ["fails"]
        pipeline.dispatch(("dropped", "finishes"))
        runner.drop("dropped")  # while its chunk is decoding
        chunks, failures = pipeline.collect(wait=True)
        assert [chunk.request_id for chunk in chunks] == ["finishes"] and chunks[0].is_last
        assert not runner.requests and model.codec.pool.num_free == model.codec.pool.capacity
    finally:
        pipeline.close()


def test_a_detokenizer_that_reruns_the_prefix_gets_one_chunk_a_job(tmp_path):
    """A rerunning detokenizer decodes a job of several chunks one pass after another, holding the codec thread
    as long as several calls: a request that caught up gets its next chunk alone, and the rest go in later
    jobs (the last chunk takes what is left), with the same audio as one job of everything."""
    import dataclasses
    import importlib.util
    from pathlib import Path

    from streamvox.runner.codec_runner import audio_plan

    spec = importlib.util.spec_from_file_location("toy_family", Path(__file__).parents[1] / "families/toy_family.py")
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    model = toy.ToyModel.load(toy.write_tiny(tmp_path / "toy"), None, torch.float32, torch.device("cpu"))
    rerunning = dataclasses.replace(audio_plan(model), codec_prefix_frames=0, lookahead_frames=2)
    runner, whole = CodecRunner(model), CodecRunner(model)
    runner.add("a", seed=1, plan=rerunning)
    whole.add("a", seed=1)
    for step in range(2 * 11):  # 11 frames: chunks end at 2, 6, 10 and 11
        runner.push("a", step % 7)
        whole.push("a", step % 7)
    for r in (runner, whole):
        r.mark_complete("a")
    jobs, pieces = [], []
    while runner.requests:
        pending = runner.take_ready(["a"])
        jobs += [(p.start_frame, p.end_frame) for p in pending]
        pieces += [c.pcm for c in runner.complete(pending, runner.decode(pending))]
    assert jobs == [(0, 2), (2, 6), (6, 11)]  # frame 10's boundary has no lookahead to spare: the rest is one
    pending = whole.take_ready(["a"])
    assert [(p.start_frame, p.end_frame) for p in pending] == [(0, 11)]
    np.testing.assert_allclose(np.concatenate(pieces), whole.decode(pending)[0], atol=1e-6)
