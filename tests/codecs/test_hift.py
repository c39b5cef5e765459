"""HiftVocoder against the official cosyvoice HiFTGenerator (cosyvoice-minicpmo 0.1.0), on tiny seeded weights.

The reference is test-only: installed with `pip install --no-deps cosyvoice-minicpmo==0.1.0`; its generator
module needs only torch, numpy and scipy. Every comparison seeds the global RNG with s before the reference and
gives ours a generator seeded with s (the randomness contract of streamvox.codecs.hift)."""

import copy

import numpy as np
import pytest
import torch

from streamvox.codecs.hift import (
    TINY_HIFT_PARAMS,
    HiftStream,
    fold_weight_norm,
    load_hift,
    write_tiny_hift,
)

reference_generator = pytest.importorskip("cosyvoice.hifigan.generator")
reference_f0 = pytest.importorskip("cosyvoice.hifigan.f0_predictor")
reference_common = pytest.importorskip("cosyvoice.utils.common")

ATOL = 1e-4
SAMPLES_PER_FRAME = 480
MEL_CACHE = 8  # CosyVoice2Model.mel_cache_len
SOURCE_CACHE = MEL_CACHE * SAMPLES_PER_FRAME

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hift_path(tmp_path_factory):
    return write_tiny_hift(tmp_path_factory.mktemp("hift_tiny") / "hift.pt", TINY_HIFT_PARAMS, seed=0)


def build_reference(state_dict: dict):
    """HiFTGenerator from the yaml-shaped params, loaded as cosyvoice/cli/model.py `load` does (strict)."""
    params = copy.deepcopy(TINY_HIFT_PARAMS)
    f0_predictor = reference_f0.ConvRNNF0Predictor(**params.pop("f0_predictor"))
    model = reference_generator.HiFTGenerator(**params, f0_predictor=f0_predictor)
    model.load_state_dict({k.replace("generator.", ""): v for k, v in state_dict.items()}, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def reference(hift_path):
    return build_reference(torch.load(hift_path, map_location="cpu"))


@pytest.fixture(scope="module")
def vocoder(hift_path):
    return load_hift(hift_path, TINY_HIFT_PARAMS, "cpu")


def random_mel(frames: int, seed: int) -> torch.Tensor:
    return torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(seed)) * 2 - 5  # [1, 80, T]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def test_checkpoint_layout_is_the_publishers(hift_path, reference):
    saved = torch.load(hift_path, map_location="cpu")
    assert set(saved) == set(reference.state_dict())  # parametrizations.weight.original0/1, like hift.pt
    assert "conv_pre.parametrizations.weight.original0" in saved
    assert "f0_predictor.condnet.0.parametrizations.weight.original1" in saved
    assert "source_resblocks.0.activations1.0.alpha" in saved and "source_downs.0.weight" in saved
    folded = fold_weight_norm(saved)
    assert not any("parametrizations" in k for k in folded)
    ref_conv = reference.conv_pre.weight.detach()  # the reference's weight-norm parametrization, evaluated
    assert torch.equal(folded["conv_pre.weight"], ref_conv)


def test_single_call_parity(reference, vocoder):
    mel = random_mel(100, seed=1)
    torch.manual_seed(3)
    ref_speech, ref_source = reference.inference(mel)
    speech, source = vocoder.inference(mel, generators=[seeded(3)])
    assert speech.shape == (1, 100 * SAMPLES_PER_FRAME) and source.shape == (1, 1, 100 * SAMPLES_PER_FRAME)
    assert max_diff(source, ref_source) <= ATOL
    assert max_diff(speech, ref_speech) <= ATOL
    assert ref_speech.abs().max() > 1e-2  # not a silent vocoder
    f0 = reference.f0_predictor(mel)
    assert (f0 > 10).any() and (f0 <= 10).any()  # voiced and unvoiced frames both exercised
    torch.manual_seed(3)  # generators=None: the global RNG, like the reference
    speech_global, _ = vocoder.inference(mel)
    assert max_diff(speech_global, ref_speech) <= ATOL


def test_cache_source_parity(reference, vocoder):
    mel = random_mel(40, seed=2)
    cache = torch.randn(1, 1, SOURCE_CACHE, generator=seeded(9)) * 0.1  # [1, 1, 3840]
    torch.manual_seed(5)
    ref_speech, ref_source = reference.inference(mel, cache_source=cache)
    speech, source = vocoder.inference(mel, cache, generators=[seeded(5)])
    assert torch.equal(source[:, :, :SOURCE_CACHE], cache)
    assert max_diff(source, ref_source) <= ATOL
    assert max_diff(speech, ref_speech) <= ATOL


def test_legacy_weight_norm_keys_and_prefix(hift_path, reference, vocoder):
    """Old-style weight_g/weight_v keys under a `generator.` prefix load in both loaders, to the same model."""
    saved = torch.load(hift_path, map_location="cpu")
    legacy = {
        "generator." + k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"): v
        for k, v in saved.items()
    }
    legacy_reference = build_reference(legacy)
    legacy_ours = load_hift(legacy, TINY_HIFT_PARAMS)
    for name, value in vocoder.state_dict().items():
        assert torch.equal(legacy_ours.state_dict()[name], value), name
    mel = random_mel(30, seed=4)
    torch.manual_seed(1)
    ref_speech, _ = legacy_reference.inference(mel)
    speech, _ = legacy_ours.inference(mel, generators=[seeded(1)])
    assert max_diff(speech, ref_speech) <= ATOL


def reference_token2wav_loop(reference, chunks, seed: int) -> list[torch.Tensor]:
    """CosyVoice2Model.token2wav's vocoder part, chunk by chunk (finalize on the last), on the reference."""
    window = np.hamming(2 * SOURCE_CACHE)  # float64 numpy, as in CosyVoice2Model
    cache = None
    out = []
    torch.manual_seed(seed)
    for i, mel in enumerate(chunks):
        finalize = i == len(chunks) - 1
        if cache is not None:
            mel = torch.concat([cache["mel"], mel], dim=2)
            cache_source = cache["source"]
        else:
            cache_source = torch.zeros(1, 1, 0)
        speech, source = reference.inference(speech_feat=mel, cache_source=cache_source)
        if cache is not None:
            speech = reference_common.fade_in_out(speech, cache["speech"], window)
        if not finalize:
            cache = {"mel": mel[:, :, -MEL_CACHE:], "source": source[:, :, -SOURCE_CACHE:],
                     "speech": speech[:, -SOURCE_CACHE:]}
            speech = speech[:, :-SOURCE_CACHE]
        out.append(speech)
    return out


def mel_chunks(lengths, seed: int) -> list[torch.Tensor]:
    whole = random_mel(sum(lengths), seed)
    return list(torch.split(whole, lengths, dim=2))


def test_streaming_loop_parity(reference, vocoder):
    chunks = mel_chunks([56, 50, 50, 23], seed=6)
    expected = reference_token2wav_loop(reference, chunks, seed=11)
    stream = HiftStream(vocoder, seeded(11))
    got = [stream.step(mel, is_last=i == len(chunks) - 1) for i, mel in enumerate(chunks)]
    for ours, ref in zip(got, expected, strict=True):
        assert max_diff(ours, ref) <= ATOL
    total = sum(c.shape[2] for c in chunks) * SAMPLES_PER_FRAME
    assert sum(p.shape[1] for p in got) == total  # every sample comes out exactly once
    with pytest.raises(RuntimeError):
        stream.step(chunks[0], is_last=True)


def test_single_chunk_stream_with_speed(reference, vocoder):
    mel = random_mel(60, seed=8)
    torch.manual_seed(2)
    slowed = torch.nn.functional.interpolate(mel, size=int(60 / 0.8), mode="linear")
    ref_speech, _ = reference.inference(slowed)
    speech = HiftStream(vocoder, seeded(2)).step(mel, is_last=True, speed=0.8)
    assert max_diff(speech, ref_speech) <= ATOL


def test_seed_isolation(vocoder):
    mel = random_mel(50, seed=3)
    first, _ = vocoder.inference(mel, generators=[seeded(1)])
    other, _ = vocoder.inference(mel, generators=[seeded(2)])
    assert max_diff(first, other) > 1e-3  # the seed matters
    torch.manual_seed(123)
    torch.rand(1000)  # global RNG moved, other requests ran
    vocoder.inference(random_mel(20, seed=5), generators=[seeded(1)])
    again, _ = vocoder.inference(mel, generators=[seeded(1)])
    assert torch.equal(first, again)


def test_batched_requests_match_single(vocoder):
    """Rows of one batch and requests of different lengths in one vocode() call equal their single calls."""
    mels = [random_mel(t, seed=10 + i) for i, t in enumerate([30, 45, 30, 12])]
    singles = [vocoder.inference(mel, generators=[seeded(100 + i)])[0] for i, mel in enumerate(mels)]
    results = vocoder.vocode(mels, [seeded(100 + i) for i in range(len(mels))])
    for (speech, source), single in zip(results, singles, strict=True):
        assert source.shape[2] == speech.shape[1]
        assert max_diff(speech, single) <= ATOL  # batched convolutions may pick other kernels: ~1e-5
    batch = torch.cat([mels[0], mels[2]])  # same length: one [2, 80, 30] call
    speech, _ = vocoder.inference(batch, generators=[seeded(100), seeded(102)])
    assert max_diff(speech[0:1], singles[0]) <= ATOL and max_diff(speech[1:2], singles[2]) <= ATOL
