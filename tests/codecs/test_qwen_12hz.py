"""The 12 Hz decoder against the qwen-tts reference package, on a tiny speech tokenizer our writer makes."""

import json

import pytest
import torch
from safetensors.torch import save_file

from streamvox.codecs.qwen_12hz import TINY_CONFIG, Qwen12HzCodec, tiny_tensors

SPF = 1920
K = 16


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("speech_tokenizer")
    (path / "config.json").write_text(json.dumps(TINY_CONFIG))
    save_file(tiny_tensors(TINY_CONFIG, seed=0), str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def reference(tiny_dir, qwen_tts):
    from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Model

    model, info = Qwen3TTSTokenizerV2Model.from_pretrained(tiny_dir, output_loading_info=True)
    assert not any(info.values()), info  # our writer's layout is the reference's, tensor for tensor
    return model.eval()


@pytest.fixture(scope="module")
def codec(tiny_dir):
    return Qwen12HzCodec.load(tiny_dir)


def _codes(num_frames: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 2048, (num_frames, K), generator=torch.Generator().manual_seed(seed))


def _decode_in_chunks(codec, codes, sizes):
    state, pieces, start = codec.new_state(), [], 0
    for size in sizes:
        pieces.append(codec.decode([codes[start : start + size]], [state])[0])
        start += size
    return torch.cat(pieces)


def test_chunked_stateful_decode_equals_the_reference_whole_utterance(codec, reference):
    """100 frames: past the 72-frame attention window, so the kept keys really slide."""
    codes = _codes(100, seed=1)
    with torch.no_grad():
        expected = reference.decode(codes[None])[0][0]  # the package's public decode: one pass up to 300 frames
    assert expected.shape == (100 * SPF,) and expected.std() > 0.05
    assert (expected.abs() >= 1).float().mean() < 0.05  # not a clipped square wave: differences would hide
    whole = codec.decode([codes], [codec.new_state()])[0]
    assert _relative_error(whole, expected) < 1e-4
    for sizes in ([1] * 100, [3, 1, 30, 2, 64], [71, 1, 28]):
        assert _relative_error(_decode_in_chunks(codec, codes, sizes), expected) < 1e-4, sizes


def test_requests_at_different_points_batch_like_alone(codec):
    streams = [_codes(n, seed=10 + n) for n in (9, 12, 80)]
    starts = [0, 5, 76]
    alone = [_decode_in_chunks(codec, s, [start, len(s) - start] if start else [len(s)]) for s, start in
             zip(streams, starts, strict=True)]
    states = [codec.new_state() for _ in streams]
    heads = [codec.decode([s[:start]], [state])[0] for s, start, state in zip(streams, starts, states, strict=True)]
    tails = codec.decode([s[start:] for s, start in zip(streams, starts, strict=True)], states)
    for expected, head, tail in zip(alone, heads, tails, strict=True):
        assert (torch.cat([head, tail]) - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_dropping_the_state_changes_the_audio(codec):
    codes = _codes(10, seed=2)
    whole = codec.decode([codes], [codec.new_state()])[0]
    restarted = torch.cat([codec.decode([codes[:5]], [codec.new_state()])[0],
                           codec.decode([codes[5:]], [codec.new_state()])[0]])
    assert _relative_error(restarted, whole) > 1e-2


def test_bad_input_is_refused(codec, tmp_path):
    with pytest.raises(ValueError, match=r"\[num_frames, 16\]"):
        codec.decode([torch.zeros(3, 8, dtype=torch.long)], [codec.new_state()])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mimi"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="qwen3_tts_tokenizer_12hz"):
        Qwen12HzCodec.load(tmp_path)


def test_a_call_failing_in_its_second_group_commits_no_state(codec, monkeypatch):
    """Chunks of different lengths decode as separate groups; when a later group fails, the earlier group's
    requests must not have moved on, or the engine's chunk-by-chunk retry would decode them twice."""
    short, long = _codes(2, seed=20), _codes(5, seed=21)
    states = [codec.new_state(), codec.new_state()]
    real, calls = codec._decode_batch, []

    def second_fails(codes, batch):
        calls.append(codes.shape)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return real(codes, batch)

    with monkeypatch.context() as patch:
        patch.setattr(codec, "_decode_batch", second_fails)
        with pytest.raises(RuntimeError, match="injected"):
            codec.decode([short, long], states)
    assert len(calls) == 2 and all(state.num_positions == 0 and not state.kept for state in states)
    retried = codec.decode([short], [states[0]])[0]
    assert torch.equal(retried, codec.decode([short], [codec.new_state()])[0])
