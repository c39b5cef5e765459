"""Chatterbox's voice encoder (ResembleAI/chatterbox ``ve.safetensors``): a reference clip -> [256] speaker embedding.

Our own torch implementation of what the publisher's ``VoiceEncoder.embeds_from_wavs([clip], 16000)`` returns for one
clip (``ChatterboxTTS.prepare_conditionals`` feeds it the 16 kHz clip and uses that utterance embedding as T3's
``speaker_emb``):

1. silence trim, librosa ``effects.trim(top_db=20)`` semantics: RMS over 2048-sample frames every 512 samples
   (zero-padded, centred); frames more than 20 dB below the loudest are silent; keep from the first loud frame's
   start to the end of the last loud frame;
2. mel: centred STFT (n_fft 400, hop 160, periodic Hann, reflect padding), power spectrum, 40 Slaney mel filters
   (0-8000 Hz), no log -> [T, 40] with T = 1 + S // 160;
3. partial windows of 160 frames every ``frame_step`` frames (rate 1.3 partials/s -> step 77 by default; with
   ``rate=None`` the step is 160 * (1 - overlap)); the last window is kept when it covers >= 80 % new frames; the mel
   is zero-padded or cut to exactly cover the windows;
4. each window -> 3-layer LSTM -> last layer's final hidden state -> Linear -> ReLU -> L2 norm;
   the windows' mean, L2-normalised again, is the embedding.

Weight names are the publisher's (``lstm.weight_ih_l0`` ..., ``proj.weight``, ``proj.bias``, ``similarity_weight``,
``similarity_bias``), so ``ve.safetensors`` loads strictly; sizes are read from the weights.

API (torch only):

    VoiceEncoder(num_mels=40, hidden_size=256, num_layers=3, embed_size=256)
        .forward(mels [B, 160, 40]) -> [B, embed_size]        L2-normalised partial embeddings
        .embed(pcm, sample_rate=16000, *, rate=1.3, overlap=0.5, min_coverage=0.8, trim_top_db=20) -> [embed_size]
    VoiceEncoder.from_state_dict(state) / VoiceEncoder.from_file(path) -> VoiceEncoder (eval mode)
    trim_silence(pcm [S], top_db=20.0) -> [S']
    voice_mel(pcm16 [S]) -> [1 + S // 160, 40]
    frame_step(rate=1.3, overlap=0.5) -> int
    partial_windows(n_frames, step, min_coverage=0.8) -> (count, covered_frames)
    prepare_voice_clip(pcm, sample_rate) -> [S16] float32     validated mono clip at 16 kHz (ValueError otherwise)

Clips at other rates are resampled with ``cosyvoice_frontend.resample`` (the publisher uses librosa's kaiser_fast
there, so only 16 kHz input is bit-for-bit the publisher's path).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from streamvox.codecs.cosyvoice_frontend import mono_clip, resample, slaney_mel_filters

SAMPLE_RATE = 16000
NUM_MELS = 40
N_FFT = 400
HOP = 160
FMAX = 8000.0
PARTIAL_FRAMES = 160  # frames per partial window (1.6 s)
DEFAULT_RATE = 1.3  # partial windows per second, Resemble's default for embeds_from_wavs
DEFAULT_OVERLAP = 0.5  # only used when rate is None
DEFAULT_MIN_COVERAGE = 0.8
DEFAULT_TRIM_DB = 20.0
TRIM_FRAME = 2048
TRIM_HOP = 512
SILENCE_PEAK = 1e-4  # a clip whose peak |x| is below this is silent
FILE_NAME = "ve.safetensors"


# ---------------------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------------------


def trim_silence(pcm: torch.Tensor, top_db: float = DEFAULT_TRIM_DB) -> torch.Tensor:
    """[S] -> [S']: drop leading/trailing frames more than top_db below the loudest (librosa.effects.trim)."""
    wave = pcm.to(torch.float64)
    half = TRIM_FRAME // 2
    frames = F.pad(wave, (half, half)).unfold(0, TRIM_FRAME, TRIM_HOP)  # [1 + S // 512, 2048]
    power = frames.pow(2).mean(dim=1)  # mean square per frame
    floor = 1e-10  # librosa's amin (1e-5) squared
    db = 10.0 * torch.log10(power.clamp(min=floor)) - 10.0 * torch.log10(power.max().clamp(min=floor))
    loud = torch.nonzero(db > -top_db).flatten()
    if loud.numel() == 0:
        return pcm[:0]
    start = int(loud[0]) * TRIM_HOP
    end = min(pcm.shape[0], (int(loud[-1]) + 1) * TRIM_HOP)
    return pcm[start:end]


def voice_mel(pcm16: torch.Tensor) -> torch.Tensor:
    """[S] float at 16 kHz -> [1 + S // 160, 40] power mel (no log), the voice encoder's input features."""
    wave = pcm16.to(torch.float32)
    window = torch.hann_window(N_FFT, dtype=torch.float32, device=wave.device)
    spec = torch.stft(wave, N_FFT, HOP, N_FFT, window=window, center=True, pad_mode="reflect",
                      return_complex=True)  # [201, T]
    filters = slaney_mel_filters(SAMPLE_RATE, N_FFT, NUM_MELS, 0.0, FMAX).to(wave.device)  # [40, 201]
    return (filters @ spec.abs().pow(2)).T.contiguous()  # [T, 40]


def frame_step(rate: float | None = DEFAULT_RATE, overlap: float = DEFAULT_OVERLAP) -> int:
    """Frames between two partial windows: from a rate (windows per second) or, when rate is None, an overlap."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if rate is None:
        step = round(PARTIAL_FRAMES * (1.0 - overlap))
    else:
        if rate <= 0:
            raise ValueError(f"rate must be positive (partial windows per second), got {rate}")
        step = round((SAMPLE_RATE / rate) / PARTIAL_FRAMES)  # numpy-style round half to even, as the publisher's
    if not 0 < step <= PARTIAL_FRAMES:
        raise ValueError(f"rate={rate}, overlap={overlap} give a step of {step} frames; it must be in "
                         f"1..{PARTIAL_FRAMES}")
    return step


def partial_windows(n_frames: int, step: int, min_coverage: float = DEFAULT_MIN_COVERAGE) -> tuple[int, int]:
    """(number of windows, frames they cover) for a mel of n_frames: the last, partly filled window is kept when the
    frames it adds cover at least min_coverage of a window (there is always at least one window)."""
    if n_frames <= 0:
        raise ValueError("the mel has no frames")
    if not 0.0 < min_coverage <= 1.0:
        raise ValueError(f"min_coverage must be in (0, 1], got {min_coverage}")
    count, remainder = divmod(max(n_frames - PARTIAL_FRAMES + step, 0), step)
    if count == 0 or (remainder + PARTIAL_FRAMES - step) / PARTIAL_FRAMES >= min_coverage:
        count += 1
    return count, PARTIAL_FRAMES + step * (count - 1)


def _partials(mel: torch.Tensor, step: int, min_coverage: float) -> torch.Tensor:
    """[T, M] -> [N, 160, M] overlapping windows (zero-padded or cut to cover exactly N windows)."""
    count, covered = partial_windows(mel.shape[0], step, min_coverage)
    if covered > mel.shape[0]:
        mel = F.pad(mel, (0, 0, 0, covered - mel.shape[0]))
    return mel[:covered].unfold(0, PARTIAL_FRAMES, step).transpose(1, 2)  # [N, 160, M]


def prepare_voice_clip(pcm, sample_rate: int) -> torch.Tensor:
    """Validate a reference clip and bring it to 16 kHz: [S] or [1, S] float PCM -> [S16] float32.

    ValueError (saying what to change) for non-mono or non-float audio, NaN/inf samples, a bad sample rate, or a
    silent clip.
    """
    wave = mono_clip(pcm)
    if isinstance(sample_rate, bool) or int(sample_rate) != sample_rate or sample_rate < 8000:
        raise ValueError(f"reference clip sample rate must be an integer >= 8000 Hz, got {sample_rate!r}")
    if wave.shape[0] == 0:
        raise ValueError("reference clip is empty; pass a few seconds of speech")
    peak = float(wave.abs().max())
    if peak < SILENCE_PEAK:
        raise ValueError(f"reference clip is silent (peak |x| = {peak:.2e}); pass a clip with audible speech, "
                         "scaled to [-1, 1]")
    return resample(wave.to(torch.float32), int(sample_rate), SAMPLE_RATE)


# ---------------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------------


class VoiceEncoder(nn.Module):
    """3-layer LSTM speaker encoder with the publisher's parameter names (see the module docstring)."""

    def __init__(self, num_mels: int = NUM_MELS, hidden_size: int = 256, num_layers: int = 3,
                 embed_size: int = 256) -> None:
        super().__init__()
        self.lstm = nn.LSTM(num_mels, hidden_size, num_layers=num_layers, batch_first=True)
        self.proj = nn.Linear(hidden_size, embed_size)
        # cosine-similarity scale/offset of the publisher's training loss: unused here, kept for a strict load
        self.similarity_weight = nn.Parameter(torch.tensor([10.0]))
        self.similarity_bias = nn.Parameter(torch.tensor([-5.0]))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> VoiceEncoder:
        """Build at the sizes of `state` (ve.safetensors' tensors) and load it strictly; eval mode."""
        if "lstm.weight_ih_l0" not in state or "proj.weight" not in state:
            raise ValueError("not a Chatterbox voice encoder state dict: lstm.weight_ih_l0 / proj.weight missing")
        num_layers = sum(1 for name in state if name.startswith("lstm.weight_ih_l"))
        gates, num_mels = state["lstm.weight_ih_l0"].shape  # [4 * hidden, mels]
        model = cls(num_mels, gates // 4, num_layers, state["proj.weight"].shape[0])
        model.load_state_dict(state, strict=True)
        return model.eval()

    @classmethod
    def from_file(cls, path: str | Path) -> VoiceEncoder:
        """ve.safetensors (or a directory holding it) -> VoiceEncoder."""
        from safetensors.torch import load_file

        path = Path(path)
        return cls.from_state_dict(load_file(str(path / FILE_NAME if path.is_dir() else path)))

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        """[B, T, num_mels] -> [B, embed_size] unit-norm embeddings of each window."""
        _, (hidden, _) = self.lstm(mels)  # hidden: [layers, B, H]
        raw = F.relu(self.proj(hidden[-1]))  # [B, E]
        return raw / torch.linalg.norm(raw, dim=1, keepdim=True)

    @torch.inference_mode()
    def embed(self, pcm, sample_rate: int = SAMPLE_RATE, *, rate: float | None = DEFAULT_RATE,
              overlap: float = DEFAULT_OVERLAP, min_coverage: float = DEFAULT_MIN_COVERAGE,
              trim_top_db: float | None = DEFAULT_TRIM_DB) -> torch.Tensor:
        """One reference clip ([S] or [1, S] float PCM at sample_rate) -> [embed_size] float32 unit-norm embedding
        (= the publisher's ``embeds_from_wavs([clip], sample_rate)[0]``). ValueError for an unusable clip."""
        wave = prepare_voice_clip(pcm, sample_rate)
        if trim_top_db:
            wave = trim_silence(wave, trim_top_db)
        if wave.shape[0] < N_FFT:
            raise ValueError(f"reference clip has {wave.shape[0]} samples of non-silent audio at 16 kHz after "
                             f"trimming silence; give at least {N_FFT} (a few seconds of speech works best)")
        step = frame_step(rate, overlap)
        param = self.proj.weight
        windows = _partials(voice_mel(wave.to(param.device)), step, min_coverage)  # [N, 160, M]
        partial = self(windows.to(param.dtype)).float()  # [N, E]
        mean = partial.mean(dim=0)
        norm = torch.linalg.norm(mean)
        if not math.isfinite(float(norm)) or float(norm) == 0.0:
            raise ValueError("the voice encoder produced no usable embedding for this clip; pass clean speech")
        return (mean / norm).cpu()
