"""Codec batches are capped in frames; a capped request keeps the rest of its frames for the next batch."""

import numpy as np

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
