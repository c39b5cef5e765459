"""MimiCodec against transformers' MimiModel, on a tiny seeded checkpoint saved in the kyutai/mimi layout."""

import json

import pytest
import torch
from safetensors.torch import save_file

from streamvox.codecs.mimi import TINY_CONFIG, MimiCodec, tiny_tensors

transformers = pytest.importorskip("transformers")

SPF = 1920  # samples per 12.5 Hz frame at 24 kHz
K = 32  # codebooks


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """Our tiny Mimi writer: the published config with small widths, every tensor of the kyutai/mimi layout, random
    codebooks and layer scales 1 (so every stage shapes the PCM). transformers loading it whole checks the layout."""
    path = tmp_path_factory.mktemp("mimi_tiny")
    (path / "config.json").write_text(json.dumps(TINY_CONFIG))
    save_file(tiny_tensors(TINY_CONFIG, seed=0), str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def reference(tiny_dir):
    model, info = transformers.MimiModel.from_pretrained(tiny_dir, output_loading_info=True)
    assert not any(info.values()), info  # every tensor present, named and shaped as transformers expects
    return model.eval()


@pytest.fixture(scope="module")
def codec(tiny_dir):
    return MimiCodec.load(tiny_dir)


def _codes(num_frames: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (num_frames, K), generator=torch.Generator().manual_seed(seed))  # [T, K]


def _decode_in_chunks(codec: MimiCodec, codes: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    state, pieces, start = codec.new_state(), [], 0
    for size in sizes:
        pieces.append(codec.decode([codes[start : start + size]], [state])[0])
        start += size
    return torch.cat(pieces)


def test_whole_and_chunked_decodes_match_the_reference_whole_utterance(codec, reference):
    codes = _codes(17, seed=1)
    with torch.no_grad():
        expected = reference.decode(codes.T[None]).audio_values[0, 0]  # [17 * 1920]
    assert expected.shape[0] == 17 * SPF and expected.std() > 1e-3
    whole = codec.decode([codes], [codec.new_state()])[0]
    assert whole.shape == expected.shape and _relative_error(whole, expected) < 1e-4
    for sizes in ([1] * 17, [1, 4, 2, 7, 3], [16, 1]):
        chunked = _decode_in_chunks(codec, codes, sizes)
        assert chunked.shape == expected.shape
        assert _relative_error(chunked, expected) < 1e-4, sizes


def test_dropping_any_carried_state_changes_the_audio(codec):
    """The state is what makes chunks continue: a fresh state at a chunk boundary sounds different."""
    codes = _codes(6, seed=2)
    whole = codec.decode([codes], [codec.new_state()])[0]
    restarted = torch.cat([codec.decode([codes[:3]], [codec.new_state()])[0],
                           codec.decode([codes[3:]], [codec.new_state()])[0]])
    assert _relative_error(restarted[3 * SPF :], whole[3 * SPF :]) > 1e-2


def test_batched_requests_at_different_points_decode_as_if_alone(codec):
    streams = [_codes(n, seed=10 + n) for n in (9, 5, 12)]
    starts = [4, 0, 7]  # how much of each request was decoded before the shared batch
    alone = [_decode_in_chunks(codec, s, [start, len(s) - start] if start else [len(s)]) for s, start in
             zip(streams, starts, strict=True)]
    states = [codec.new_state() for _ in streams]
    heads = [codec.decode([s[:start]], [state])[0] for s, start, state in zip(streams, starts, states, strict=True)]
    tails = codec.decode([s[start:] for s, start in zip(streams, starts, strict=True)], states)  # one call
    for expected, head, tail in zip(alone, heads, tails, strict=True):
        # random weights make PCM peaks of tens, not 1: compare against the peak
        assert (torch.cat([head, tail]) - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_attention_context_is_bounded_by_the_sliding_window(tiny_dir):
    """With a short window, chunked decoding still equals the whole decode under the same window."""
    config = json.loads((tiny_dir / "config.json").read_text()) | {"sliding_window": 6}
    codec = MimiCodec.load(tiny_dir, config=config)
    codes = _codes(11, seed=3)
    whole = codec.decode([codes], [codec.new_state()])[0]
    chunked = _decode_in_chunks(codec, codes, [2, 1, 5, 3])
    assert _relative_error(chunked, whole) < 1e-5
    state = codec.new_state()
    codec.decode([codes], [state])
    assert set(state.kept.values()) == {5}  # window - 1 positions kept, no more
    assert all(buffer.shape[2] == 5 for (name, _), buffer in codec.pool.buffers.items() if name == "keys")
    unbounded = MimiCodec.load(tiny_dir).decode([codes], [MimiCodec.load(tiny_dir).new_state()])[0]
    assert _relative_error(whole, unbounded) > 1e-3  # the window really limits what is attended


def test_a_failed_batch_leaves_the_states_untouched(codec, monkeypatch):
    """A decode that fails in its last layer (after every other layer has seen the chunk) changes no state,
    so the engine's chunk-by-chunk retry continues each stream correctly."""
    codes = _codes(7, seed=4)
    state = codec.new_state()
    head = codec.decode([codes[:3]], [state])[0]

    def fail(*args):
        raise RuntimeError("injected")

    with monkeypatch.context() as patch:
        patch.setattr(codec.net.decoder.layers[-1], "forward", fail)
        with pytest.raises(RuntimeError, match="injected"):
            codec.decode([codes[3:]], [state])
    tail = codec.decode([codes[3:]], [state])[0]
    whole = codec.decode([codes], [codec.new_state()])[0]
    assert _relative_error(torch.cat([head, tail]), whole) < 1e-5


def test_bad_codes_and_shared_states_are_refused(codec):
    state = codec.new_state()
    with pytest.raises(ValueError, match=r"\[num_frames, 32\]"):
        codec.decode([torch.zeros(3, 8, dtype=torch.long)], [state])
    with pytest.raises(ValueError, match="one distinct state per chunk"):
        codec.decode([_codes(2, 0), _codes(2, 1)], [state, state])


def test_a_config_that_cannot_stream_is_refused(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text()) | {"use_causal_conv": False}
    with pytest.raises(ValueError, match="use_causal_conv"):
        MimiCodec.load(tiny_dir, config=config)


@pytest.mark.parametrize("num_samples", [24000, 31111, 1920 * 5])
def test_encoder_codes_equal_the_reference(tiny_dir, reference, num_samples):
    """Reference audio for CSM's context: our encoder half gives transformers' codes exactly (any length, the
    last frame padded as the publisher pads it)."""
    from safetensors.torch import load_file

    from streamvox.codecs.mimi_encoder import MimiEncoder

    encoder = MimiEncoder(json.loads((tiny_dir / "config.json").read_text()),
                          load_file(str(tiny_dir / "model.safetensors")))
    pcm = torch.randn(num_samples, generator=torch.Generator().manual_seed(num_samples)) * 0.3
    with torch.no_grad():
        expected = reference.encode(pcm[None, None]).audio_codes[0].T  # [frames, 32]
    ours = encoder.encode(pcm)
    assert ours.shape == expected.shape == (-(-num_samples // SPF), K) and torch.equal(ours, expected)


def test_streams_keep_their_context_in_a_fixed_pool_of_rows(tiny_dir):
    """Eight streams decoding chunk after chunk use the same state buffers throughout (nothing reallocated per
    chunk), and once released their rows serve new streams, which start from silence like any fresh one."""
    codec = MimiCodec.load(tiny_dir)
    streams = [_codes(6, seed=30 + i) for i in range(8)]
    expected = [codec.decode([codes], [codec.new_state()])[0] for codes in streams]
    states = [codec.new_state() for _ in streams]
    pieces = [codec.decode([codes[:2] for codes in streams], states)]
    pool = codec.pool
    layout = {key: (buffer.data_ptr(), buffer.shape) for key, buffer in pool.buffers.items()}
    for start in (2, 4):
        pieces.append(codec.decode([codes[start : start + 2] for codes in streams], states))
    assert {key: (buffer.data_ptr(), buffer.shape) for key, buffer in pool.buffers.items()} == layout
    for i, want in enumerate(expected):
        assert _relative_error(torch.cat([piece[i] for piece in pieces]), want) < 1e-5
    capacity = pool.capacity
    for state in states:
        codec.release(state)
    again = [codec.new_state() for _ in streams]
    fresh = codec.decode([codes[:3] for codes in streams], again)  # on the rows the first streams left
    assert pool.capacity == capacity and {state.row for state in again} <= {state.row for state in states}
    for i, want in enumerate(expected):
        assert _relative_error(fresh[i], want[: 3 * SPF]) < 1e-5
