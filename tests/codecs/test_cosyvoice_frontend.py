"""CosyVoice2 clone features (streamvox.codecs.cosyvoice_frontend) against reference implementations.

References (test-only, each skipped when absent):
- kaldi-native-fbank: Kaldi fbank (torchaudio, whose kaldi.fbank the publisher calls, has no build for torch 2.13);
- librosa: Slaney mel filters;
- s3tokenizer 0.3.0 (installed --no-deps): Whisper log-mel (its copy of whisper.audio) and the speech tokenizer's
  torch model, loaded from our tiny ONNX file by its own onnx2torch;
- cosyvoice-minicpmo 0.1.0 (installed --no-deps): matcha.utils.audio.mel_spectrogram and the official
  CosyVoiceFrontEnd. Stubbed for the latter, since they cannot be installed here or are not exercised:
  ``torchaudio`` (compliance.kaldi.fbank -> our kaldi_fbank, checked above against kaldi-native-fbank;
  transforms.Resample -> our resample, checked above against a direct sinc sum), ``whisper`` (log_mel_spectrogram
  -> s3tokenizer's copy of it) and ``inflect`` (unused by the code under test).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from functools import cache, partial
from pathlib import Path

import numpy as np
import pytest
import torch

from streamvox.codecs import cosyvoice_frontend as cvf
from streamvox.codecs.cosyvoice_onnx_tiny import TINY_HEADS, TINY_LAYERS, TINY_STATE, write_tiny_checkpoint
from tests.models.cosyvoice_reference import official_frontend_module
from tests.stand_ins import refuse as _refuse
from tests.stand_ins import speechlike as _speechlike
from tests.stand_ins import stub_module as _stub

ort = pytest.importorskip("onnxruntime")
MATCHA_ARGS = dict(n_fft=1920, num_mels=80, sampling_rate=24000, hop_size=480, win_size=1920, fmin=0, fmax=8000)

speechlike = cache(_speechlike)  # one clip per arguments, shared: callers must not modify it


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("cosyvoice2_tiny"), seed=0)


@pytest.fixture(scope="module")
def frontend(tiny_dir):
    return cvf.CosyVoiceFrontend(tiny_dir)


@pytest.fixture(scope="module")
def s3tokenizer():
    """s3tokenizer imports torchaudio at import time (for load_audio only): give it a stub while importing."""
    with pytest.MonkeyPatch.context() as mp:
        if importlib.util.find_spec("torchaudio") is None:
            mp.setitem(sys.modules, "torchaudio", _stub("torchaudio", load=_refuse))
        return pytest.importorskip("s3tokenizer")


def _load_matcha_audio():
    """matcha.utils.audio from the cosyvoice-minicpmo wheel, loaded by path (matcha.utils' __init__ pulls in
    hydra/lightning, which the function under test never uses)."""
    spec = importlib.util.find_spec("matcha")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("cosyvoice-minicpmo (matcha) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "audio.py"
    module_spec = importlib.util.spec_from_file_location("_matcha_audio_reference", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------------
# Signal processing pieces
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sample_rate,n_fft,n_mels,fmax", [(16000, 400, 128, None), (24000, 1920, 80, 8000)])
def test_slaney_filters_equal_librosa(sample_rate, n_fft, n_mels, fmax):
    librosa = pytest.importorskip("librosa")
    ref = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=0, fmax=fmax)
    mine = cvf.slaney_mel_filters(sample_rate, n_fft, n_mels, 0.0, fmax).numpy()
    assert mine.shape == ref.shape
    assert np.abs(mine - ref).max() < 1e-8  # measured 3.7e-9 (entries up to 0.042): float32 rounding


def test_whisper_filters_equal_shipped_asset(s3tokenizer):
    asset = Path(s3tokenizer.__file__).parent / "assets" / "mel_filters.npz"
    with np.load(asset) as shipped:  # Whisper's own librosa-made filters
        assert np.abs(cvf.slaney_mel_filters(16000, 400, 128).numpy() - shipped["mel_128"]).max() < 1e-8


def test_kaldi_fbank_matches_kaldi_native_fbank():
    knf = pytest.importorskip("kaldi_native_fbank")
    pcm = speechlike(3.0, 16000)
    options = knf.FbankOptions()
    options.frame_opts.dither = 0.0
    options.frame_opts.samp_freq = 16000
    options.mel_opts.num_bins = 80
    fbank = knf.OnlineFbank(options)
    fbank.accept_waveform(16000, pcm.tolist())
    fbank.input_finished()
    ref = np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])  # [T, 80]
    mine = cvf.kaldi_fbank(pcm[None], sample_rate=16000, num_mel_bins=80).numpy()
    assert mine.shape == ref.shape == (1 + (pcm.shape[0] - 400) // 160, 80)
    assert np.abs(mine - ref).max() < 2e-4  # measured 9.8e-5 on log energies of magnitude ~10


def _numpy_kaldi_fbank(x: np.ndarray, bins: int = 80) -> np.ndarray:
    """Kaldi's documented fbank in float64 (16 kHz, 25/10 ms, snip edges, DC removal, pre-emphasis 0.97, Povey
    window, 512-point power spectrum, mel = 1127 ln(1 + f/700) triangles from 20 Hz to Nyquist, log >= FLT_EPSILON)."""
    frames = np.lib.stride_tricks.sliding_window_view(x, 400)[::160]
    frames = frames - frames.mean(axis=1, keepdims=True)
    frames = frames - 0.97 * np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    povey = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 399)) ** 0.85
    power = np.abs(np.fft.rfft(frames * povey, 512)) ** 2  # [T, 257]
    mel = lambda hz: 1127.0 * np.log(1.0 + hz / 700.0)  # noqa: E731
    low, step = mel(20.0), (mel(8000.0) - mel(20.0)) / (bins + 1)
    fft_mel = mel(np.arange(256) * 16000 / 512)
    banks = np.zeros((bins, 257))
    for m in range(bins):
        left, centre, right = low + m * step, low + (m + 1) * step, low + (m + 2) * step
        rising, falling = (fft_mel - left) / (centre - left), (right - fft_mel) / (right - centre)
        banks[m, :256] = np.maximum(0, np.minimum(rising, falling))
    return np.log(np.maximum(power @ banks.T, np.finfo(np.float32).eps))


def test_kaldi_fbank_matches_float64_transcription():
    pcm = speechlike(3.0, 16000)
    ref = _numpy_kaldi_fbank(pcm.double().numpy())
    mine = cvf.kaldi_fbank(pcm).numpy()
    assert mine.shape == ref.shape
    assert np.abs(mine - ref).max() < 2e-4  # measured 8.9e-5 (kaldi-native-fbank: 9.3e-5): float32 rounding


def test_whisper_log_mel_matches_reference(s3tokenizer):
    for pcm in (speechlike(3.0, 16000), speechlike(1.2345, 16000, seed=1)):
        ref = s3tokenizer.log_mel_spectrogram(pcm, n_mels=128)
        mine = cvf.whisper_log_mel(pcm, 128)
        assert mine.shape == ref.shape == (128, pcm.shape[0] // 160)
        assert (mine - ref).abs().max() < 1e-5  # measured 1.2e-7


def test_matcha_mel_matches_reference():
    matcha_audio = _load_matcha_audio()
    for pcm in (speechlike(3.0, 24000), speechlike(1.2345, 24000, seed=1)):
        ref = matcha_audio.mel_spectrogram(pcm[None], center=False, **MATCHA_ARGS)  # [1, 80, T]
        mine = cvf.matcha_mel(pcm[None])
        assert mine.shape == ref.shape == (1, 80, pcm.shape[0] // 480)
        assert (mine - ref).abs().max() < 1e-5  # measured 4.8e-7


def _direct_sinc_resample(x: np.ndarray, from_hz: int, to_hz: int, zeros: int = 6, rolloff: float = 0.99):
    """y[j] = sum_i x[i] h(i / from - j / to): the Hann-windowed sinc low-pass, evaluated per output sample."""
    cutoff = min(from_hz, to_hz) * rolloff  # Hz
    n_out = math.ceil(len(x) * to_hz / from_hz)
    lag = np.arange(len(x))[None, :] / from_hz - np.arange(n_out)[:, None] / to_hz  # seconds, [n_out, n_in]
    u = np.clip(lag * cutoff, -zeros, zeros)  # in zero crossings
    taps = np.sinc(u) * np.cos(np.pi * u / (2 * zeros)) ** 2 * cutoff / from_hz
    return taps @ x


@pytest.mark.parametrize("from_hz,to_hz", [(16000, 24000), (44100, 16000), (48000, 16000), (22050, 16000)])
def test_resample_matches_direct_sinc_sum(from_hz, to_hz):
    x = speechlike(0.07, from_hz, seed=2).double()
    ref = _direct_sinc_resample(x.numpy(), from_hz, to_hz)
    mine = cvf.resample(x, from_hz, to_hz).numpy()
    assert mine.shape == ref.shape
    assert np.abs(mine - ref).max() < 1e-6  # float32 kernel applied in float64


def test_resample_keeps_a_tone_and_batches():
    t24 = torch.arange(24000, dtype=torch.float64) / 24000
    tone16 = torch.sin(2 * math.pi * 1000 * torch.arange(16000, dtype=torch.float64) / 16000).float()
    up = cvf.resample(tone16, 16000, 24000)
    assert up.shape == (24000,)
    assert (up - torch.sin(2 * math.pi * 1000 * t24).float())[200:-200].abs().max() < 2e-3  # interior
    batch = torch.stack([tone16, -tone16])
    assert torch.allclose(cvf.resample(batch, 16000, 24000)[1], -up)
    assert cvf.resample(tone16, 16000, 16000) is tone16


def test_trim_rule_keeps_two_mel_frames_per_token():
    tokens, mel = cvf.trim_to_common_length(torch.arange(10), torch.zeros(17, 80))
    assert tokens.shape == (8,) and mel.shape == (16, 80)
    tokens, mel = cvf.trim_to_common_length(torch.arange(5), torch.zeros(17, 80))
    assert tokens.shape == (5,) and mel.shape == (10, 80)


# ---------------------------------------------------------------------------------------------------------------
# ONNX networks (tiny, random weights, published interfaces)
# ---------------------------------------------------------------------------------------------------------------


def test_tiny_onnx_interfaces(tiny_dir):
    def describe(session):
        return ([(a.name, a.type, len(a.shape)) for a in session.get_inputs()],
                [(a.name, a.type, len(a.shape)) for a in session.get_outputs()])

    campplus = ort.InferenceSession(str(tiny_dir / "campplus.onnx"), providers=["CPUExecutionProvider"])
    tokenizer = ort.InferenceSession(str(tiny_dir / "speech_tokenizer_v2.onnx"), providers=["CPUExecutionProvider"])
    assert describe(campplus) == ([("input", "tensor(float)", 3)], [("output", "tensor(float)", 2)])
    assert describe(tokenizer) == ([("feats", "tensor(float)", 3), ("feats_length", "tensor(int32)", 1)],
                                   [("indices", "tensor(int32)", 2)])


def _reference_tokenizer(s3tokenizer, tiny_dir):
    from s3tokenizer.model_v2 import ModelConfig, S3TokenizerV2

    config = ModelConfig(n_mels=128, n_audio_state=TINY_STATE, n_audio_head=TINY_HEADS, n_audio_layer=TINY_LAYERS)
    model = S3TokenizerV2("speech_tokenizer_v2_25hz", config)
    model.init_from_onnx(str(tiny_dir / "speech_tokenizer_v2.onnx"))  # s3tokenizer's onnx2torch, strict load
    return model.eval()


@pytest.mark.parametrize("seconds", [5.0, 1.37])
def test_speech_tokens_match_s3tokenizer_torch_model(s3tokenizer, tiny_dir, frontend, seconds):
    reference = _reference_tokenizer(s3tokenizer, tiny_dir)
    pcm = speechlike(seconds, 16000)
    mel = s3tokenizer.log_mel_spectrogram(pcm, n_mels=128)  # [128, T] at 100 Hz
    codes, code_lens = reference.quantize(mel[None], torch.tensor([mel.shape[1]]))
    tokens = frontend.speech_tokens(pcm)
    assert tokens.dtype == torch.int64
    assert tokens.shape[0] == int(code_lens[0]) == math.ceil(math.ceil(mel.shape[1] / 2) / 2)  # 25 Hz
    assert torch.equal(tokens, codes[0].long())
    assert int(tokens.max()) < cvf.SPEECH_TOKEN_VOCAB and len(set(tokens.tolist())) > 5


def test_tiny_tokenizer_honours_feats_length(s3tokenizer, tiny_dir):
    """A padded batch: the ONNX graph's length masks agree with s3tokenizer's on the valid tokens."""
    reference = _reference_tokenizer(s3tokenizer, tiny_dir)
    mels = [s3tokenizer.log_mel_spectrogram(speechlike(s, 16000, seed=i)) for i, s in enumerate((2.0, 1.3))]
    feats, lengths = s3tokenizer.padding(mels)  # [2, 128, 200], int32 [2]
    codes, code_lens = reference.quantize(feats, lengths)
    session = ort.InferenceSession(str(tiny_dir / "speech_tokenizer_v2.onnx"), providers=["CPUExecutionProvider"])
    (indices,) = session.run(None, {"feats": feats.numpy(), "feats_length": lengths.numpy()})
    for row in range(2):
        valid = int(code_lens[row])
        assert np.array_equal(indices[row, :valid], codes[row, :valid].numpy())


def test_speaker_embedding_is_campplus_of_normalised_fbank(tiny_dir, frontend):
    import onnx
    from onnx import numpy_helper

    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tiny_dir / "campplus.onnx")).graph.initializer}
    pcm = speechlike(2.0, 16000)
    feats = cvf.kaldi_fbank(pcm).numpy().astype(np.float64)
    feats -= feats.mean(axis=0, keepdims=True)
    expected = np.maximum(feats @ weights["campplus.proj.weight"] + weights["campplus.proj.bias"], 0).mean(axis=0)
    embedding = frontend.speaker_embedding(pcm)
    assert embedding.shape == (192,) and embedding.dtype == torch.float32
    assert np.abs(embedding.numpy() - expected).max() < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# The whole triple against the publisher's CosyVoiceFrontEnd
# ---------------------------------------------------------------------------------------------------------------


class _FakeTextTokenizer:
    def encode(self, text, allowed_special="all"):
        return [ord(c) % 100 for c in text]


def _stub_fbank(waveform, num_mel_bins=23, dither=0.0, sample_frequency=16000.0, **others):
    assert dither == 0.0 and not others, "the frontend is expected to call fbank(num_mel_bins, dither=0, rate) only"
    return cvf.kaldi_fbank(waveform, sample_rate=sample_frequency, num_mel_bins=num_mel_bins)


@pytest.fixture(scope="module")
def official_frontend(s3tokenizer, tiny_dir):
    matcha_audio = _load_matcha_audio()
    with official_frontend_module(_stub_fbank, cvf.resample, s3tokenizer.log_mel_spectrogram) as official:
        feat_extractor = partial(matcha_audio.mel_spectrogram, center=False, **MATCHA_ARGS)
        yield official.CosyVoiceFrontEnd(_FakeTextTokenizer, feat_extractor, str(tiny_dir / "campplus.onnx"),
                                         str(tiny_dir / "speech_tokenizer_v2.onnx"))


@pytest.mark.parametrize("seconds", [5.0, 3.33])
def test_features_match_official_frontend(official_frontend, frontend, seconds):
    pcm16 = speechlike(seconds, 16000, seed=3)
    model_input = official_frontend.frontend_zero_shot("hello", "prompt", pcm16[None], 24000, "")
    features = frontend(pcm16, 16000)
    assert torch.equal(features.prompt_tokens, model_input["llm_prompt_speech_token"][0].long())
    assert torch.equal(features.prompt_tokens, model_input["flow_prompt_speech_token"][0].long())
    assert features.prompt_mel.shape == model_input["prompt_speech_feat"][0].shape
    assert (features.prompt_mel - model_input["prompt_speech_feat"][0]).abs().max() < 1e-5
    assert (features.speaker_embedding - model_input["llm_embedding"][0]).abs().max() < 1e-5
    assert features.prompt_mel.shape == (2 * features.prompt_tokens.shape[0], 80)


def test_features_of_a_44k_clip(frontend):
    pcm = speechlike(5.0, 44100, seed=4)
    features = frontend(pcm.numpy(), 44100)
    again = frontend(cvf.resample(pcm, 44100, 16000), 16000)
    assert features.prompt_tokens.shape == (125,) and features.prompt_mel.shape == (250, 80)
    assert features.prompt_tokens.dtype == torch.int64 and features.prompt_mel.dtype == torch.float32
    assert torch.equal(features.prompt_tokens, again.prompt_tokens)
    assert torch.equal(features.speaker_embedding, again.speaker_embedding)
    with pytest.raises(AttributeError):
        features.prompt_tokens = None  # frozen


# ---------------------------------------------------------------------------------------------------------------
# Bad clips
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pcm,sample_rate,message", [
    (torch.full((16000 * 31,), 0.1), 16000, r"31\.00 s long.*at most 30 s: trim it"),
    (torch.zeros(16000 * 3), 16000, r"silent.*audible speech"),
    (torch.full((16000,), 1e-6), 16000, r"silent"),
    (torch.rand(2, 16000) - 0.5, 16000, r"mono.*got shape \(2, 16000\).*mix channels down"),
    (torch.rand(1, 1, 16000) - 0.5, 16000, r"mono"),
    (torch.randint(-1000, 1000, (16000,), dtype=torch.int16), 16000, r"float PCM.*int16.*32768"),
    (torch.tensor([0.1, float("nan")] * 8000), 16000, r"NaN or infinite"),
    (torch.rand(8000) - 0.5, 8000, r"sample rate.*>= 16000 Hz.*got 8000"),
    (torch.rand(1600) - 0.5, 16000, r"0\.100 s long.*at least 0\.25 s"),
])
def test_bad_clips_raise_value_error(frontend, pcm, sample_rate, message):
    with pytest.raises(ValueError, match=message):
        frontend(pcm, sample_rate)


def test_missing_model_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="campplus.onnx, speech_tokenizer_v2.onnx"):
        cvf.CosyVoiceFrontend(tmp_path)
