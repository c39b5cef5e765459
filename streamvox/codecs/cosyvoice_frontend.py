"""Zero-shot clone features for CosyVoice2 (FunAudioLLM/CosyVoice2-0.5B), computed from one reference clip.

Our own implementation of what the publisher's ``CosyVoiceFrontEnd`` derives from a prompt clip:

- ``speaker_embedding`` [192] float32: 16 kHz clip -> Kaldi fbank (80 bins, no dither) -> minus its time mean ->
  CAM++ (``campplus.onnx``, input ``input`` [1, T, 80] -> output ``output`` [1, 192]).
- ``prompt_tokens`` [N] int64 (25 Hz, ids < 6561): 16 kHz clip -> Whisper 128-bin log-mel (100 Hz) ->
  ``speech_tokenizer_v2.onnx`` (inputs ``feats`` [1, 128, T] float32 and ``feats_length`` [1] int32, output
  ``indices``; 4x downsampling inside).
- ``prompt_mel`` [2N, 80] float32 (50 Hz): the 16 kHz clip resampled to 24 kHz -> Matcha log-mel (n_fft 1920,
  hop 480, 80 bins, 0-8000 Hz), then tokens and mel are cut to a common length: N = min(mel_frames // 2, tokens).

API (torch only, except the class, which imports onnxruntime when built):

    resample(pcm, from_hz, to_hz) -> Tensor [..., S']          windowed-sinc (Hann), torchaudio's default kernel
    kaldi_fbank(pcm, sample_rate=16000, num_mel_bins=80) -> [frames, bins]
    whisper_log_mel(pcm16, n_mels=128, filters=None, window=None) -> [..., n_mels, S // 160]
    matcha_mel(pcm24) -> [..., 80, frames]                   (CosyVoice2 feat_extractor parameters by default)
    slaney_mel_filters(sample_rate, n_fft, n_mels, fmin, fmax) -> [n_mels, n_fft // 2 + 1]   (= librosa's)
    kaldi_mel_banks(num_bins, padded_window, sample_rate, low_freq, high_freq) -> [num_bins, padded_window // 2 + 1]
    trim_to_common_length(tokens [N0], mel [T0, 80]) -> (tokens [N], mel [2N, 80])
    mono_clip(pcm) -> Tensor [S]                              validated mono float clip (ValueError otherwise)
    prepare_clip(pcm, sample_rate) -> Tensor [S16] float32    validated mono clip at 16 kHz (ValueError otherwise)
    CosyVoiceFrontend(model_dir)(pcm, sample_rate) -> CloneFeatures

Resampling: the clip goes to 16 kHz for the embedding and the tokens, and that 16 kHz clip goes on to 24 kHz for
the mel, as the publisher does (load_wav at 16 kHz, then Resample(16000, 24000)). The resampler is the
band-limited windowed-sinc interpolator with a Hann window, 6 zero crossings and a 0.99 roll-off, i.e. the
kernel of ``torchaudio.transforms.Resample``'s defaults (``sinc_interp_hann``), computed in float64 and applied
in float32 with a strided conv1d.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SPEECH_SAMPLE_RATE = 16000  # Hz: embedding and speech tokens
MEL_SAMPLE_RATE = 24000  # Hz: prompt mel (CosyVoice2's flow decoder runs at 24 kHz)
MAX_PROMPT_SECONDS = 30.0  # the publisher refuses longer clips for the speech tokenizer
MIN_PROMPT_SECONDS = 0.25  # shorter clips give no usable token/mel pair (and Kaldi needs one 25 ms frame)
SILENCE_PEAK = 1e-4  # a clip whose peak |x| is below this is treated as silent
SPEECH_TOKEN_VOCAB = 3**8  # 6561 FSQ codes
EMBEDDING_DIM = 192
CAMPPLUS_FILE = "campplus.onnx"
SPEECH_TOKENIZER_FILE = "speech_tokenizer_v2.onnx"
_LOG_FLOOR_KALDI = float(torch.finfo(torch.float32).eps)  # Kaldi floors mel energies at FLT_EPSILON


# ---------------------------------------------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------------------------------------------


def _sinc_kernel(up: int, down: int, zero_crossings: int, rolloff: float) -> tuple[torch.Tensor, int]:
    """Polyphase windowed-sinc filters for a rate change down -> up (both reduced by their gcd).

    Returns (kernel [up, 1, 2 * half + down] float32, half). Row p holds the taps that produce output phase p.
    """
    cutoff = min(up, down) * rolloff  # low-pass edge, in units of the reduced rates
    half = math.ceil(zero_crossings * down / cutoff)  # input samples on each side of the centre
    taps = torch.arange(-half, half + down, dtype=torch.float64) / down  # input offsets, in input periods / down
    phase = -torch.arange(up, dtype=torch.float64)[:, None] / up  # output phase p sits at p / up
    x = ((taps[None, :] + phase) * cutoff).clamp(-zero_crossings, zero_crossings)  # [up, taps], in zero crossings
    window = torch.cos(x * math.pi / (2 * zero_crossings)) ** 2  # Hann taper reaching 0 at +-zero_crossings
    arg = x * math.pi
    sinc = torch.where(arg == 0, torch.ones_like(arg), torch.sin(arg) / torch.where(arg == 0, 1.0, arg))
    kernel = sinc * window * (cutoff / down)  # unit DC gain
    return kernel[:, None, :].to(torch.float32), half


def resample(pcm: torch.Tensor, from_hz: int, to_hz: int, *, zero_crossings: int = 6,
             rolloff: float = 0.99) -> torch.Tensor:
    """[..., S] float at from_hz -> [..., ceil(S * to_hz / from_hz)] at to_hz (band-limited sinc interpolation)."""
    if int(from_hz) != from_hz or int(to_hz) != to_hz or from_hz <= 0 or to_hz <= 0:
        raise ValueError(f"sample rates must be positive integers, got {from_hz} -> {to_hz}")
    if from_hz == to_hz:
        return pcm
    g = math.gcd(int(from_hz), int(to_hz))
    down, up = int(from_hz) // g, int(to_hz) // g
    kernel, half = _sinc_kernel(up, down, zero_crossings, rolloff)
    shape = pcm.shape
    flat = pcm.reshape(-1, shape[-1])  # [B, S]
    padded = F.pad(flat, (half, half + down))  # zeros outside the clip
    phases = F.conv1d(padded[:, None], kernel.to(pcm.dtype), stride=down)  # [B, up, blocks]
    out = phases.transpose(1, 2).reshape(flat.shape[0], -1)  # interleave phases: [B, up * blocks]
    length = math.ceil(up * shape[-1] / down)
    return out[:, :length].reshape(*shape[:-1], length)


# ---------------------------------------------------------------------------------------------------------------
# Mel filter banks
# ---------------------------------------------------------------------------------------------------------------


def _hz_to_slaney(hz: torch.Tensor) -> torch.Tensor:
    """Slaney's mel scale (librosa htk=False): linear below 1 kHz (200/3 Hz per mel), logarithmic above."""
    linear = hz / (200.0 / 3.0)
    log_part = 15.0 + torch.log(hz.clamp(min=1e-10) / 1000.0) / (math.log(6.4) / 27.0)
    return torch.where(hz >= 1000.0, log_part, linear)


def _slaney_to_hz(mel: torch.Tensor) -> torch.Tensor:
    linear = mel * (200.0 / 3.0)
    log_part = 1000.0 * torch.exp((math.log(6.4) / 27.0) * (mel - 15.0))
    return torch.where(mel >= 15.0, log_part, linear)


def slaney_mel_filters(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                       fmax: float | None = None) -> torch.Tensor:
    """Triangular, area-normalised ('slaney') mel filters on the Slaney scale: [n_mels, n_fft // 2 + 1] float32.

    Equal (to float32 rounding) to ``librosa.filters.mel(sr=..., n_fft=..., n_mels=..., fmin=..., fmax=...)``, which
    Whisper's shipped filters and Matcha's mel both use.
    """
    fmax = sample_rate / 2 if fmax is None else fmax
    bins_hz = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * (sample_rate / n_fft)  # [F] bin centres, Hz
    lo, hi = _hz_to_slaney(torch.tensor([float(fmin), float(fmax)], dtype=torch.float64))
    edges = _slaney_to_hz(torch.linspace(float(lo), float(hi), n_mels + 2, dtype=torch.float64))  # [M + 2] Hz
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # [M, 1] each
    rising = (bins_hz[None] - left) / (centre - left)
    falling = (right - bins_hz[None]) / (right - centre)
    tri = torch.clamp(torch.minimum(rising, falling), min=0.0)  # [M, F]
    area = 2.0 / (right - left)  # so that each triangle has unit area in Hz
    return (tri * area).to(torch.float32)


def _kaldi_mel(hz: torch.Tensor | float) -> torch.Tensor:
    return 1127.0 * torch.log1p(torch.as_tensor(hz, dtype=torch.float64) / 700.0)


def kaldi_mel_banks(num_bins: int, padded_window: int, sample_rate: float, low_freq: float = 20.0,
                    high_freq: float = 0.0) -> torch.Tensor:
    """Kaldi's triangular mel banks (mel = 1127 ln(1 + f/700), no area normalisation, no VTLN).

    Returns [num_bins, padded_window // 2 + 1] float32; the last column (Nyquist) is zero, as in Kaldi.
    ``high_freq <= 0`` means an offset from Nyquist.
    """
    nyquist = 0.5 * sample_rate
    high = high_freq + nyquist if high_freq <= 0.0 else high_freq
    mel_lo, mel_hi = _kaldi_mel(low_freq), _kaldi_mel(high)
    step = (mel_hi - mel_lo) / (num_bins + 1)  # bins overlap by half: num_bins + 1 steps
    index = torch.arange(num_bins, dtype=torch.float64)[:, None]
    left, centre, right = mel_lo + index * step, mel_lo + (index + 1) * step, mel_lo + (index + 2) * step
    fft_mel = _kaldi_mel(torch.arange(padded_window // 2, dtype=torch.float64) * (sample_rate / padded_window))
    tri = torch.clamp(torch.minimum((fft_mel - left) / (centre - left), (right - fft_mel) / (right - centre)), min=0)
    return F.pad(tri, (0, 1)).to(torch.float32)  # [num_bins, padded_window // 2 + 1]


# ---------------------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------------------


def _as_mono(pcm: torch.Tensor) -> torch.Tensor:
    if pcm.dim() == 2 and pcm.shape[0] == 1:
        return pcm[0]
    if pcm.dim() != 1:
        raise ValueError(f"expected mono PCM of shape [S] or [1, S], got {tuple(pcm.shape)}")
    return pcm


def kaldi_fbank(pcm: torch.Tensor, sample_rate: float = SPEECH_SAMPLE_RATE, num_mel_bins: int = 80, *,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0, preemphasis: float = 0.97,
                low_freq: float = 20.0, high_freq: float = 0.0) -> torch.Tensor:
    """Kaldi log mel filterbank (compute-fbank-feats defaults, dither 0): [S] or [1, S] -> [frames, num_mel_bins].

    Per 25 ms frame every 10 ms (snip edges: frames = 1 + (S - 400) // 160 at 16 kHz): remove the frame's mean,
    pre-emphasis 0.97 (the first sample against itself), Povey window (Hann ** 0.85), zero-pad to a power of two,
    power spectrum, Kaldi mel banks, log floored at FLT_EPSILON. Same arguments/output as torchaudio's fbank.
    """
    wave = _as_mono(pcm).to(torch.float32)
    size = int(sample_rate * frame_length_ms * 0.001)  # samples per frame (400)
    shift = int(sample_rate * frame_shift_ms * 0.001)  # samples per hop (160)
    if wave.shape[0] < size:
        raise ValueError(f"kaldi_fbank needs at least {size} samples (one frame), got {wave.shape[0]}")
    frames = wave.unfold(0, size, shift)  # [T, size]
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)  # x[i - 1], with x[-1] := x[0]
    frames = frames - preemphasis * previous
    window = torch.hann_window(size, periodic=False, dtype=torch.float32).pow(0.85)
    padded = 1 << (size - 1).bit_length()  # next power of two (512)
    power = torch.fft.rfft(frames * window, n=padded).abs().pow(2)  # [T, padded // 2 + 1]
    banks = kaldi_mel_banks(num_mel_bins, padded, sample_rate, low_freq, high_freq)  # [bins, padded // 2 + 1]
    return torch.clamp(power @ banks.T, min=_LOG_FLOOR_KALDI).log()  # [T, bins]


def whisper_log_mel(pcm: torch.Tensor, n_mels: int = 128, *, filters: torch.Tensor | None = None,
                    window: torch.Tensor | None = None) -> torch.Tensor:
    """Whisper's log-mel of 16 kHz audio: [..., S] -> [..., n_mels, S // 160] (100 Hz frames).

    Centred STFT (n_fft 400, hop 160, periodic Hann, reflect padding) with the last frame dropped, power spectrum,
    Slaney mel filters, log10 floored at 1e-10, clipped to 8 below the clip's maximum, then (x + 4) / 4. The maximum
    is taken per clip (Whisper takes it over the whole batch; the same for one clip). `filters` [n_mels, 201] and
    `window` [400] replace the computed ones (a checkpoint that ships its own, e.g. Chatterbox's S3 tokenizer).
    """
    wave = pcm.to(torch.float32)
    shape = wave.shape
    flat = wave.reshape(-1, shape[-1])  # [B, S]
    window = torch.hann_window(400, device=wave.device) if window is None else window.to(wave.device)
    spec = torch.stft(flat, 400, 160, window=window, center=True, pad_mode="reflect",
                      return_complex=True)  # [B, 201, S // 160 + 1]
    power = spec[..., :-1].abs() ** 2
    if filters is None:
        filters = slaney_mel_filters(SPEECH_SAMPLE_RATE, 400, n_mels)
    mel = filters.to(power.device) @ power  # [B, n_mels, frames]
    log_spec = torch.clamp(mel, min=1e-10).log10()
    ceiling = log_spec.amax(dim=(-2, -1), keepdim=True)
    log_spec = torch.maximum(log_spec, ceiling - 8.0)
    return ((log_spec + 4.0) / 4.0).reshape(*shape[:-1], n_mels, -1)


def matcha_mel(pcm: torch.Tensor, *, n_fft: int = 1920, num_mels: int = 80, sampling_rate: int = MEL_SAMPLE_RATE,
               hop_size: int = 480, win_size: int = 1920, fmin: float = 0.0, fmax: float = 8000.0) -> torch.Tensor:
    """Matcha-TTS log-mel (CosyVoice2's feat_extractor): [..., S] at 24 kHz -> [..., num_mels, frames] at 50 Hz.

    Reflect-pad (n_fft - hop) / 2 on each side, uncentred STFT with a periodic Hann window, magnitude
    sqrt(re^2 + im^2 + 1e-9), Slaney mel filters, natural log floored at 1e-5. frames = S // hop for these sizes.
    """
    wave = pcm.to(torch.float32)
    shape = wave.shape
    flat = wave.reshape(-1, 1, shape[-1])  # [B, 1, S]
    side = (n_fft - hop_size) // 2
    flat = F.pad(flat, (side, side), mode="reflect")[:, 0]  # [B, S + n_fft - hop]
    spec = torch.stft(flat, n_fft, hop_length=hop_size, win_length=win_size, window=torch.hann_window(win_size),
                      center=False, return_complex=True)  # [B, n_fft // 2 + 1, frames]
    magnitude = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)
    mel = slaney_mel_filters(sampling_rate, n_fft, num_mels, fmin, fmax) @ magnitude
    return torch.log(torch.clamp(mel, min=1e-5)).reshape(*shape[:-1], num_mels, -1)


def trim_to_common_length(tokens: torch.Tensor, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CosyVoice2's prompt rule: tokens [N0] (25 Hz), mel [T0, 80] (50 Hz) -> tokens [N], mel [2N, 80] with
    N = min(T0 // 2, N0), so the flow model sees exactly two mel frames per token."""
    count = min(mel.shape[0] // 2, tokens.shape[0])
    return tokens[:count], mel[: 2 * count]


# ---------------------------------------------------------------------------------------------------------------
# Clip validation and the ONNX front end
# ---------------------------------------------------------------------------------------------------------------


def _to_tensor(pcm) -> torch.Tensor:
    if isinstance(pcm, torch.Tensor):
        return pcm.detach().cpu()
    array = np.asarray(pcm)
    if array.dtype == object:
        raise ValueError("reference clip must be a numeric array or tensor of PCM samples")
    return torch.from_numpy(np.ascontiguousarray(array))


def _check_layout(pcm: torch.Tensor) -> torch.Tensor:
    """[S] or [1, S] float PCM -> [S]; anything else is a ValueError that says what to change."""
    if not pcm.is_floating_point():
        raise ValueError(f"reference clip must be float PCM in [-1, 1], got dtype {pcm.dtype}; "
                         "for int16 samples pass pcm / 32768.0")
    if pcm.dim() == 2 and pcm.shape[0] == 1:
        pcm = pcm[0]
    if pcm.dim() != 1:
        raise ValueError(f"reference clip must be mono PCM of shape [samples] or [1, samples], got shape "
                         f"{tuple(pcm.shape)}; mix channels down first (e.g. pcm.mean(dim=0) for [channels, samples])")
    if not bool(torch.isfinite(pcm).all()):
        raise ValueError("reference clip contains NaN or infinite samples; clean or re-decode the audio")
    return pcm


def mono_clip(pcm) -> torch.Tensor:
    """A reference clip as given (tensor or array, [S] or [1, S], float) -> [S] tensor on the CPU; ValueError (with
    what to change) for other layouts, non-float samples or non-finite values."""
    return _check_layout(_to_tensor(pcm))


def prepare_clip(pcm, sample_rate: int) -> torch.Tensor:
    """Validate a reference clip and bring it to 16 kHz: pcm [S] or [1, S] float at sample_rate -> [S16] float32.

    Raises ValueError (with what to change) for a non-mono or non-float clip, non-finite samples, a sample rate
    below 16 kHz, a clip longer than 30 s or shorter than 0.25 s, or a silent clip.
    """
    wave = mono_clip(pcm)
    if isinstance(sample_rate, bool) or int(sample_rate) != sample_rate or sample_rate < SPEECH_SAMPLE_RATE:
        raise ValueError(f"reference clip sample rate must be an integer >= {SPEECH_SAMPLE_RATE} Hz, got "
                         f"{sample_rate!r}; record or export the clip at 16 kHz or higher")
    seconds = wave.shape[0] / sample_rate
    if seconds > MAX_PROMPT_SECONDS:
        raise ValueError(f"reference clip is {seconds:.2f} s long; the CosyVoice2 speech tokenizer accepts at most "
                         f"{MAX_PROMPT_SECONDS:.0f} s: trim it (3-10 s of clean speech works best)")
    if seconds < MIN_PROMPT_SECONDS:
        raise ValueError(f"reference clip is {seconds:.3f} s long; give at least {MIN_PROMPT_SECONDS} s of speech "
                         "(3-10 s works best)")
    peak = float(wave.abs().max())
    if peak < SILENCE_PEAK:
        raise ValueError(f"reference clip is silent (peak |x| = {peak:.2e}); pass a clip with audible speech, "
                         "scaled to [-1, 1]")
    return resample(wave.to(torch.float32), int(sample_rate), SPEECH_SAMPLE_RATE)


@dataclass(frozen=True)
class CloneFeatures:
    """What CosyVoice2 needs from a reference clip for zero-shot cloning."""

    speaker_embedding: torch.Tensor  # [192] float32, CAM++ x-vector (llm_embedding and flow_embedding)
    prompt_tokens: torch.Tensor  # [N] int64, 25 Hz speech tokens, ids < 6561
    prompt_mel: torch.Tensor  # [2N, 80] float32, 50 Hz log-mel of the clip at 24 kHz


def _open_session(path: Path, num_threads: int):
    try:
        import onnxruntime
    except ImportError as error:  # pragma: no cover - onnxruntime is a runtime dependency
        raise ImportError("CosyVoiceFrontend needs onnxruntime: pip install onnxruntime") from error
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = num_threads
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class CosyVoiceFrontend:
    """CosyVoice2 clone-feature extractor over a checkpoint directory holding campplus.onnx and
    speech_tokenizer_v2.onnx (run with onnxruntime's CPU provider, one intra-op thread by default, as published).

    ``frontend(pcm, sample_rate) -> CloneFeatures``; pcm is mono float PCM ([S] or [1, S], tensor or array).
    """

    def __init__(self, model_dir: str | Path, *, num_threads: int = 1) -> None:
        model_dir = Path(model_dir)
        paths = {name: model_dir / name for name in (CAMPPLUS_FILE, SPEECH_TOKENIZER_FILE)}
        missing = [name for name, path in paths.items() if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"{model_dir} lacks {', '.join(missing)}: point model_dir at a CosyVoice2-0.5B "
                                    "checkpoint directory")
        self.campplus = _open_session(paths[CAMPPLUS_FILE], num_threads)
        self.tokenizer = _open_session(paths[SPEECH_TOKENIZER_FILE], num_threads)

    def speaker_embedding(self, pcm16: torch.Tensor) -> torch.Tensor:
        """[S] at 16 kHz -> [192] float32: CAM++ over the time-mean-normalised Kaldi fbank."""
        feats = kaldi_fbank(pcm16, SPEECH_SAMPLE_RATE, 80)  # [T, 80]
        feats = feats - feats.mean(dim=0, keepdim=True)
        name = self.campplus.get_inputs()[0].name
        out = self.campplus.run(None, {name: feats[None].numpy()})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(-1).copy())

    def speech_tokens(self, pcm16: torch.Tensor) -> torch.Tensor:
        """[S] at 16 kHz -> [ceil(S // 160 / 4)] int64 speech tokens (25 Hz)."""
        mel = whisper_log_mel(pcm16, 128)[None]  # [1, 128, T] at 100 Hz
        first, second = (arg.name for arg in self.tokenizer.get_inputs()[:2])
        feeds = {first: mel.numpy(), second: np.array([mel.shape[2]], dtype=np.int32)}
        out = self.tokenizer.run(None, feeds)[0]
        return torch.from_numpy(np.asarray(out).reshape(-1).astype(np.int64))

    def __call__(self, pcm, sample_rate: int) -> CloneFeatures:
        pcm16 = prepare_clip(pcm, sample_rate)  # [S16] float32
        pcm24 = resample(pcm16, SPEECH_SAMPLE_RATE, MEL_SAMPLE_RATE)  # [S24]
        mel = matcha_mel(pcm24).T.contiguous()  # [T, 80] at 50 Hz
        tokens, mel = trim_to_common_length(self.speech_tokens(pcm16), mel)
        return CloneFeatures(speaker_embedding=self.speaker_embedding(pcm16), prompt_tokens=tokens.contiguous(),
                             prompt_mel=mel.contiguous())
