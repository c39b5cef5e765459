"""SnacCodec against the reference snac package, on tiny seeded checkpoints written to disk."""

import json

import pytest
import torch
from snac import SNAC

from streamvox.codecs.snac import SnacCodec, split_levels

W = 4  # frames per window
SPF = 2048  # samples per frame of snac_24khz


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("snac_tiny")
    SnacCodec.write_tiny(path, seed=0)
    return path


@pytest.fixture(scope="module")
def codec(tiny_dir):
    return SnacCodec.load(tiny_dir)


def random_windows(num_windows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4096, (num_windows, W, 7), generator=g)  # [N, W, 7]


def reference_model(path) -> SNAC:
    model = SNAC.from_config(str(path / "config.json"))
    model.load_state_dict(torch.load(path / "pytorch_model.bin", weights_only=True))
    return model.eval()


def test_split_levels_time_order():
    windows = torch.arange(2 * 3 * 7).reshape(2, 3, 7)  # frame f of row n holds 21n + 7f + k
    l0, l1, l2 = split_levels(windows)
    assert l0.shape == (2, 3) and l1.shape == (2, 6) and l2.shape == (2, 12)
    assert l1[1, 2 * 2 + 1].item() == 21 + 14 + 2  # row 1, frame 2, second level-1 code
    assert l2[0, 4 * 1 + 3].item() == 7 + 6  # row 0, frame 1, fourth level-2 code


def test_decode_shape_and_audible(codec):
    assert codec.sample_rate == 24000 and codec.samples_per_frame == SPF
    pcm = codec.decode_windows(random_windows(5), seeds=[0, 1, 2, 3, 4])
    assert pcm.shape == (5, W * SPF) and pcm.dtype == torch.float32
    assert torch.isfinite(pcm).all()
    assert pcm.pow(2).mean().sqrt() > 1e-3


def test_parity_with_reference_package(codec, tiny_dir):
    windows = random_windows(1, seed=7)
    seed = 1234
    ours = codec.decode_windows(windows, seeds=[seed])[0]
    model = reference_model(tiny_dir)
    l0, l1, l2 = (torch.tensor(x) for x in _levels_by_hand(windows[0]))
    torch.manual_seed(seed)
    with torch.inference_mode():
        ref = model.decode([l0[None], l1[None], l2[None]])[0, 0]  # codes [1, 4], [1, 8], [1, 16]
    assert ref.shape == ours.shape == (W * SPF,)
    assert (ours - ref).abs().max() <= 1e-5
    assert (ours[SPF : 2 * SPF] - ref[SPF : 2 * SPF]).abs().max() <= 1e-5
    torch.manual_seed(seed + 1)
    with torch.inference_mode():
        other = model.decode([l0[None], l1[None], l2[None]])[0, 0]
    assert (ours - other).abs().max() > 1e-3  # the seed matters, so parity above is not vacuous


def _levels_by_hand(window: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
    frames = window.tolist()  # [W][7]
    return (
        [f[0] for f in frames],
        [c for f in frames for c in f[1:3]],
        [c for f in frames for c in f[3:7]],
    )


def test_batching_invariance(codec):
    windows = random_windows(4, seed=3)
    seeds = [11, 22, 33, 44]
    together = codec.decode_windows(windows, seeds)
    for b in range(4):
        alone = codec.decode_windows(windows[b : b + 1], seeds[b : b + 1])[0]
        assert (together[b] - alone).abs().max() <= 1e-5
    shuffled = codec.decode_windows(windows[[2, 0]], [seeds[2], seeds[0]])
    assert (shuffled[0] - together[2]).abs().max() <= 1e-5


def test_noise_is_a_function_of_the_seed(codec):
    window = random_windows(1, seed=5)
    same = codec.decode_windows(window.repeat(2, 1, 1), seeds=[9, 9])
    assert torch.equal(same[0], same[1])
    assert torch.equal(codec.decode_windows(window, [9])[0], codec.decode_windows(window, [9])[0])
    diff = codec.decode_windows(window.repeat(2, 1, 1), seeds=[9, 10])
    assert (diff[0] - diff[1]).abs().max() > 1e-3


def test_global_rng_untouched(codec):
    torch.manual_seed(42)
    before = torch.get_rng_state()
    codec.decode_windows(random_windows(3), seeds=[1, 2, 3])
    assert torch.equal(before, torch.get_rng_state())


def test_old_weight_norm_names_load(codec, tiny_dir, tmp_path):
    state_dict = torch.load(tiny_dir / "pytorch_model.bin", weights_only=True)
    old = {
        key.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): value
        for key, value in state_dict.items()
    }
    assert any(key.endswith("weight_g") for key in old) and not any("original0" in key for key in old)
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    torch.save(old, tmp_path / "pytorch_model.bin")
    windows = random_windows(2, seed=8)
    expected = codec.decode_windows(windows, [5, 6])
    assert torch.equal(SnacCodec.load(tmp_path).decode_windows(windows, [5, 6]), expected)


def test_missing_weights_file(tiny_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        SnacCodec.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        SnacCodec.load(tmp_path / "nowhere")


def test_four_level_config_rejected(tiny_dir, tmp_path):
    config = json.loads((tiny_dir / "config.json").read_text())
    config["vq_strides"] = [8, 4, 2, 1]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "pytorch_model.bin").write_bytes((tiny_dir / "pytorch_model.bin").read_bytes())
    with pytest.raises(ValueError, match="vq_strides"):
        SnacCodec.load(tmp_path)


def test_bad_window_shape_and_seed_count(codec):
    with pytest.raises(ValueError, match="one seed per window"):
        codec.decode_windows(random_windows(2), seeds=[1])
    with pytest.raises(ValueError, match="windows must be"):
        codec.decode_windows(torch.zeros(2, 4, 6, dtype=torch.long), seeds=[1, 2])


def test_hashed_noise_as_cuda_draws_it(tiny_dir):
    """The CUDA way (noise hashed from the seed, batches padded to a bucket), run on the CPU: a window's PCM
    does not depend on its batch or its padding, the noise follows the seed, and it is noise of the reference's
    strength (the PCM stays as far from a noiseless decode as the reference's is)."""
    codec = SnacCodec.load(tiny_dir)
    codec.hashed_noise = True
    windows, seeds = random_windows(5, seed=7), [3, 1_000_003 * 5 + 2, 2**62 + 17, 8, 9]
    together = codec.decode_windows(windows, seeds)  # 5 windows: padded to 8
    assert together.shape == (5, W * SPF)
    for b in range(5):
        alone = codec.decode_windows(windows[b : b + 1], seeds[b : b + 1])[0]
        assert (together[b] - alone).abs().max() <= 1e-5
    again = codec.decode_windows(windows[:1].repeat(2, 1, 1), [3, 4])
    assert (again[0] - together[0]).abs().max() <= 1e-5 and (again[0] - again[1]).abs().max() > 1e-3
    reference = SnacCodec.load(tiny_dir)
    noisy = reference.decode_windows(windows[:1], [3])[0]
    for block in reference.noise_blocks:  # the same window with every noise block silenced
        block.forward = lambda x: x
    quiet = reference.decode_windows(windows[:1], [3])[0]
    want, got = (noisy - quiet).pow(2).mean().sqrt(), (together[0] - quiet).pow(2).mean().sqrt()
    assert 0.5 < got / want < 2.0
