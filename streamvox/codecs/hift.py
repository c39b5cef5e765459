"""CosyVoice2's HiFT vocoder: 80-bin mel at 50 Hz -> 24 kHz waveform, in plain PyTorch.

HiFT = a neural source-filter excitation (F0 predicted from the mel, turned into harmonics) that is fed, through
an STFT, into a HiFi-GAN-style upsampler (transposed convolutions + residual blocks with Snake activations),
whose output is a magnitude/phase spectrogram inverted by an iSTFT. This module computes what
`cosyvoice.hifigan.generator.HiFTGenerator.inference(speech_feat, cache_source)` computes (24 kHz variant,
i.e. the `SineGen2` harmonic source), with no dependency on the cosyvoice package. With
`params["harmonic_source"] = "sine_gen"` it computes the older `SineGen` source instead (phase integrated per sample,
initial phases uniform in [-pi, pi)), which Chatterbox's S3Gen vocoder uses at 24 kHz
(`chatterbox.models.s3gen.hifigan.HiFTGenerator`); the default, "sine_gen2", is CosyVoice2's.

API
- `HiftVocoder.from_config(params)`: build from a dict equal to the `hift:` section of cosyvoice2.yaml (nested
  `f0_predictor` and `istft_params` dicts; see `COSYVOICE2_HIFT_PARAMS`). Parameters are named as in the
  publisher's `hift.pt`, with every weight-normed convolution holding one folded `weight`.
- `load_hift(path_or_state_dict, params, device)`: read a publisher `hift.pt` (weight norm stored as
  `parametrizations.weight.original0/1`, as the real file, or legacy `weight_g`/`weight_v`; an optional
  `generator.` prefix is stripped like cosyvoice's loader does), fold the weight norm, strict-load, eval.
- `HiftVocoder.inference(speech_feat [B, 80, T], cache_source [B, 1, C] | None, generators) ->
  (speech [B, 480 T], source [B, 1, 480 T])`; `HiftVocoder.vocode(...)` for requests of different lengths.
- `HiftStream(vocoder, generator).step(mel_chunk, is_last) -> pcm`: the vocoder half of
  `CosyVoice2Model.token2wav` (mel cache of 8 frames, source cache of 8 * 480 samples, Hamming cross-fade).
- `write_tiny_hift(path, params, seed)` / `TINY_HIFT_PARAMS`: random weights in the publisher's layout;
  `tiny_hift_state_dict(params, seed)` returns them as a state dict.

Randomness contract: the harmonic source draws, per call and in this order, a uniform initial phase
`rand(B, H + 1)` ("sine_gen" draws it as [B, H + 1, 1]: the same values), the additive noise N(0, 1) of shape
[B, L, H + 1] filled in [B, H + 1, L] memory order (the reference's randn_like of a transposed view, or of the
[B, H + 1, L] sines for "sine_gen") and an unused noise-branch draw `randn(B, L, 1)` (L = 480 T samples,
H = nb_harmonics), exactly as the reference draws them from the global RNG. With
`generators=[g_0, ..., g_{B-1}]`, row b makes these draws with shape 1 in place of B from g_b alone, so a request's
audio depends only on its generator, never on its batch neighbours. For one request, `torch.manual_seed(s)`
before the reference call and a generator seeded with `s` (on the same device) here give the same waveform; the
same holds for a whole stream (one seed before the reference's chunk loop, one generator for the stream).
`generators=None` draws from the global RNG, like the reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

COSYVOICE2_HIFT_PARAMS: dict = {
    "in_channels": 80,
    "base_channels": 512,
    "nb_harmonics": 8,
    "sampling_rate": 24000,
    "nsf_alpha": 0.1,
    "nsf_sigma": 0.003,
    "nsf_voiced_threshold": 10,
    "upsample_rates": [8, 5, 3],
    "upsample_kernel_sizes": [16, 11, 7],
    "istft_params": {"n_fft": 16, "hop_len": 4},
    "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "source_resblock_kernel_sizes": [7, 7, 11],
    "source_resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "lrelu_slope": 0.1,
    "audio_limit": 0.99,
    "f0_predictor": {"num_class": 1, "in_channels": 80, "cond_channels": 512},
}

TINY_HIFT_PARAMS: dict = {
    **COSYVOICE2_HIFT_PARAMS,
    "base_channels": 32,
    "f0_predictor": {"num_class": 1, "in_channels": 80, "cond_channels": 32},
}

# (gain, direction) key suffixes of a weight-normed `weight`: torch's parametrization, then legacy weight_norm
WEIGHT_NORM_SUFFIXES = (
    ("parametrizations.weight.original0", "parametrizations.weight.original1"),
    ("weight_g", "weight_v"),
)
CHECKPOINT_PREFIX = "generator."  # cosyvoice's loader strips it (checkpoints saved from a HiFiGan wrapper)
MEL_CACHE_FRAMES = 8  # CosyVoice2Model.mel_cache_len


def _weight_normed(conv: nn.Module) -> nn.Module:
    """Mark a layer whose checkpoint weight is stored weight-normed (norm over all dims but 0)."""
    conv.hift_weight_norm = True
    return conv


def _same_padding(kernel_size: int, dilation: int) -> int:
    return (kernel_size * dilation - dilation) // 2


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha, one alpha per channel (linear scale). x: [B, C, T]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))  # [C]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]  # [1, C, 1]
        return x + (1.0 / (alpha + 1e-9)) * torch.sin(x * alpha).pow(2)


class ResBlock(nn.Module):
    """Per dilation d: x += conv(snake(conv_d(snake(x)))); length-preserving. x: [B, C, T]."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]) -> None:
        super().__init__()

        def conv(dilation: int) -> nn.Module:
            padding = _same_padding(kernel_size, dilation)
            return _weight_normed(nn.Conv1d(channels, channels, kernel_size, dilation=dilation, padding=padding))

        self.convs1 = nn.ModuleList(conv(d) for d in dilations)
        self.convs2 = nn.ModuleList(conv(1) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, conv2, act1, act2 in zip(self.convs1, self.convs2, self.activations1, self.activations2,
                                            strict=True):
            x = conv2(act2(conv1(act1(x)))) + x
        return x


class ConvRNNF0Predictor(nn.Module):
    """Mel [B, in_channels, T] -> F0 in Hz [B, T] (non-negative): five conv3+ELU layers, then a linear head."""

    def __init__(self, num_class: int = 1, in_channels: int = 80, cond_channels: int = 512) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers.append(_weight_normed(nn.Conv1d(in_channels if i == 0 else cond_channels, cond_channels, 3,
                                                   padding=1)))
            layers.append(nn.ELU())
        self.condnet = nn.Sequential(*layers)  # conv layers at indices 0, 2, 4, 6, 8 (checkpoint names)
        self.classifier = nn.Linear(cond_channels, num_class)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        hidden = self.condnet(mel).transpose(1, 2)  # [B, T, cond]
        return self.classifier(hidden).squeeze(-1).abs()  # [B, T] (num_class == 1)


def _check_rows(generators: Sequence[torch.Generator], batch: int) -> None:
    if len(generators) != batch:
        raise ValueError(f"need one generator per row: {len(generators)} for a batch of {batch}")


def _uniform(batch: int, width: int, generators: Sequence[torch.Generator] | None,
             device: torch.device) -> torch.Tensor:
    """U[0, 1) of [batch, width]: the global RNG in one draw, or row b from generators[b] alone."""
    if generators is None:
        return torch.rand(batch, width, device=device)
    _check_rows(generators, batch)
    return torch.cat([torch.rand(1, width, generator=g, device=device) for g in generators])


def _normal_like(template: torch.Tensor, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    """N(0, 1) shaped like template [B, ...] *and laid out like it* (randn_like keeps strides, and the values a
    generator yields depend on the memory layout filled): the global RNG, or row b from generators[b] alone."""
    if generators is None:
        return torch.randn_like(template)
    _check_rows(generators, template.shape[0])
    return torch.cat([torch.empty_like(template[b:b + 1]).normal_(generator=g) for b, g in enumerate(generators)])


HARMONIC_SOURCES = ("sine_gen2", "sine_gen")


class HarmonicSource(nn.Module):
    """NSF excitation: sample-rate F0 -> one source channel. Variant "sine_gen2" (the reference's
    SourceModuleHnNSF2 + SineGen2, CosyVoice2) or "sine_gen" (SourceModuleHnNSF + SineGen, Chatterbox's S3Gen).

    "sine_gen2" integrates harmonic k's phase at the mel frame rate (linear down-sampling by `upsample_scale`,
    cumulative sum, linear up-sampling); "sine_gen" integrates it per sample (cumulative sum of k F0 / sr, wrapped
    to one cycle) and adds a uniform initial phase. Then voiced samples (F0 > threshold) carry alpha * sin(phase) +
    sigma * noise and unvoiced ones alpha / 3 * noise; a linear layer + tanh merges the H + 1 harmonics."""

    def __init__(self, sampling_rate: int, upsample_scale: int, nb_harmonics: int, alpha: float, sigma: float,
                 voiced_threshold: float, variant: str = "sine_gen2") -> None:
        super().__init__()
        if variant not in HARMONIC_SOURCES:
            raise ValueError(f"unknown harmonic source {variant!r}: one of {', '.join(HARMONIC_SOURCES)}")
        self.sampling_rate = sampling_rate
        self.upsample_scale = upsample_scale
        self.num_sines = nb_harmonics + 1
        self.alpha, self.sigma, self.voiced_threshold = alpha, sigma, voiced_threshold
        self.variant = variant
        self.l_linear = nn.Linear(self.num_sines, 1)

    def _sines(self, f0: torch.Tensor, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
        """f0 [B, L, 1] Hz -> sin(phase), laid out as the reference's noise template (a generator's values depend
        on the layout it fills): "sine_gen" [B, H + 1, L] contiguous, "sine_gen2" a [B, L, H + 1] view of
        [B, H + 1, L] memory. Draws the initial phases."""
        if self.variant == "sine_gen":
            return self._sines_per_sample(f0, generators)
        return self._sines_per_frame(f0, generators)

    def _sines_per_sample(self, f0: torch.Tensor, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
        """SineGen: phase = 2 pi frac(sum_{s <= t} k f0_s / sr) + phi_k, phi_k ~ U[-pi, pi) (phi_1 = 0)."""
        harmonics = torch.arange(1, self.num_sines + 1, dtype=torch.float32, device=f0.device)
        cycles = f0.transpose(1, 2) * harmonics[None, :, None] / self.sampling_rate  # [B, H + 1, L]
        phase = 2 * math.pi * (torch.cumsum(cycles, dim=-1) % 1)
        low, high = torch.tensor(-math.pi, device=f0.device), torch.tensor(math.pi, device=f0.device)
        initial = low + _uniform(f0.shape[0], self.num_sines, generators, f0.device) * (high - low)  # [B, H + 1]
        initial[:, 0] = 0  # the fundamental starts at phase 0
        return torch.sin(phase + initial[:, :, None])  # [B, H + 1, L]

    def _sines_per_frame(self, f0: torch.Tensor, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
        """SineGen2: the phase integrated at the frame rate and interpolated back to samples."""
        harmonics = torch.arange(1, self.num_sines + 1, dtype=torch.float32, device=f0.device)
        cycles = (f0 * harmonics / self.sampling_rate) % 1  # [B, L, H + 1] cycles per sample
        initial = _uniform(f0.shape[0], self.num_sines, generators, f0.device)  # [B, H + 1]
        initial[:, 0] = 0  # the fundamental starts at phase 0
        cycles[:, 0, :] = cycles[:, 0, :] + initial  # only sample 0, which the down-sampling below never reads
        per_frame = F.interpolate(cycles.transpose(1, 2), scale_factor=1 / self.upsample_scale, mode="linear")
        phase = torch.cumsum(per_frame.transpose(1, 2), dim=1) * 2 * math.pi  # [B, T, H + 1]
        phase = F.interpolate(phase.transpose(1, 2) * self.upsample_scale, scale_factor=self.upsample_scale,
                              mode="linear")  # [B, H + 1, L]
        return torch.sin(phase.transpose(1, 2))  # a transposed view: memory order [B, H + 1, L]

    def forward(self, f0: torch.Tensor, generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """f0 [B, L, 1] Hz at the sample rate -> source [B, L, 1] in (-1, 1)."""
        per_sample = self.variant == "sine_gen"
        sines = self._sines(f0, generators) * self.alpha  # [B, L, H + 1], or [B, H + 1, L] per sample
        voiced = (f0 > self.voiced_threshold).to(torch.float32)  # [B, L, 1]
        gate = voiced.transpose(1, 2) if per_sample else voiced
        noise_scale = gate * self.sigma + (1 - gate) * self.alpha / 3
        noise = noise_scale * _normal_like(sines, generators)
        excitation = sines * gate + noise
        if per_sample:
            excitation = excitation.transpose(1, 2)  # [B, L, H + 1]
        _normal_like(voiced, generators)  # the reference's noise branch: unused, drawn to keep the RNG in step
        return torch.tanh(self.l_linear(excitation))


class HiftVocoder(nn.Module):
    """HiFTGenerator of CosyVoice2 (module and parameter names as in the publisher's checkpoint)."""

    def __init__(self, params: Mapping) -> None:
        super().__init__()
        if params["sampling_rate"] == 22050:
            raise NotImplementedError("22050 Hz HiFT (CosyVoice 1) uses the SineGen source, not implemented")
        rates, kernels = list(params["upsample_rates"]), list(params["upsample_kernel_sizes"])
        self.n_fft, self.hop = params["istft_params"]["n_fft"], params["istft_params"]["hop_len"]
        self.samples_per_frame = math.prod(rates) * self.hop  # 480 for CosyVoice2
        self.sampling_rate = params["sampling_rate"]
        self.lrelu_slope, self.audio_limit = params["lrelu_slope"], params["audio_limit"]
        self.num_kernels = len(params["resblock_kernel_sizes"])
        self.f0_predictor = ConvRNNF0Predictor(**params["f0_predictor"])
        self.m_source = HarmonicSource(self.sampling_rate, self.samples_per_frame, params["nb_harmonics"],
                                       params["nsf_alpha"], params["nsf_sigma"], params["nsf_voiced_threshold"],
                                       params.get("harmonic_source", "sine_gen2"))
        base = params["base_channels"]
        self.conv_pre = _weight_normed(nn.Conv1d(params["in_channels"], base, 7, padding=3))
        self.ups = nn.ModuleList(
            _weight_normed(nn.ConvTranspose1d(base >> i, base >> (i + 1), k, u, padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(rates, kernels, strict=True))
        )
        self._build_source_branch(params, base, rates)
        self.resblocks = nn.ModuleList(
            ResBlock(base >> (i + 1), k, d)
            for i in range(len(rates))
            for k, d in zip(params["resblock_kernel_sizes"], params["resblock_dilation_sizes"], strict=True)
        )
        self.conv_post = _weight_normed(nn.Conv1d(base >> len(rates), self.n_fft + 2, 7, padding=3))
        window = torch.hann_window(self.n_fft, periodic=True, dtype=torch.float64).to(torch.float32)
        self.register_buffer("stft_window", window, persistent=False)  # [n_fft], periodic Hann

    def _build_source_branch(self, params: Mapping, base: int, rates: list[int]) -> None:
        """source_downs[i]: source STFT [B, n_fft + 2, 120 T + 1] -> the length after ups[i] (strided conv)."""
        strides = [math.prod(rates[i + 1:]) for i in range(len(rates))]  # [15, 3, 1] for [8, 5, 3]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (stride, k, d) in enumerate(zip(strides, params["source_resblock_kernel_sizes"],
                                               params["source_resblock_dilation_sizes"], strict=True)):
            channels = base >> (i + 1)
            if stride == 1:
                self.source_downs.append(nn.Conv1d(self.n_fft + 2, channels, 1))
            else:
                self.source_downs.append(nn.Conv1d(self.n_fft + 2, channels, 2 * stride, stride, padding=stride // 2))
            self.source_resblocks.append(ResBlock(channels, k, d))

    @classmethod
    def from_config(cls, params: Mapping) -> HiftVocoder:
        return cls(params)

    def source(self, speech_feat: torch.Tensor, generators: Sequence[torch.Generator] | None = None
               ) -> torch.Tensor:
        """mel [B, 80, T] -> excitation [B, 1, 480 T] (makes this call's random draws)."""
        f0 = self.f0_predictor(speech_feat)  # [B, T] Hz
        f0 = f0.repeat_interleave(self.samples_per_frame, dim=1)[:, :, None]  # [B, L, 1], nearest up-sampling
        return self.m_source(f0, generators).transpose(1, 2)

    def _stft(self, signal: torch.Tensor) -> torch.Tensor:
        """[B, L] -> real and imaginary parts stacked on channels: [B, n_fft + 2, L / hop + 1]."""
        spec = torch.stft(signal, self.n_fft, self.hop, self.n_fft, window=self.stft_window, return_complex=True)
        spec = torch.view_as_real(spec)  # [B, n_fft / 2 + 1, frames, 2]
        return torch.cat([spec[..., 0], spec[..., 1]], dim=1)

    def _istft(self, magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """magnitude, phase [B, n_fft / 2 + 1, frames] -> [B, (frames - 1) * hop]."""
        magnitude = magnitude.clamp(max=1e2)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.istft(spec, self.n_fft, self.hop, self.n_fft, window=self.stft_window)

    def _upsample_stage(self, i: int, x: torch.Tensor, source_spec: torch.Tensor) -> torch.Tensor:
        x = self.ups[i](F.leaky_relu(x, self.lrelu_slope))  # [B, C_i, T * prod(rates[:i + 1])]
        if i == len(self.ups) - 1:
            x = F.pad(x, (1, 0), mode="reflect")  # one more sample: the STFT frame count
        x = x + self.source_resblocks[i](self.source_downs[i](source_spec))
        out = self.resblocks[i * self.num_kernels](x)
        for j in range(1, self.num_kernels):
            out = out + self.resblocks[i * self.num_kernels + j](x)
        return out / self.num_kernels

    def decode(self, speech_feat: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """mel [B, 80, T], source [B, 1, 480 T] -> speech [B, 480 T] clamped to +-audio_limit."""
        source_spec = self._stft(source.squeeze(1))  # [B, n_fft + 2, 120 T + 1]
        x = self.conv_pre(speech_feat)  # [B, base, T]
        for i in range(len(self.ups)):
            x = self._upsample_stage(i, x, source_spec)
        x = self.conv_post(F.leaky_relu(x))  # [B, n_fft + 2, 120 T + 1]; default slope 0.01 here
        bins = self.n_fft // 2 + 1
        speech = self._istft(torch.exp(x[:, :bins]), torch.sin(x[:, bins:]))
        return speech.clamp(-self.audio_limit, self.audio_limit)

    @torch.inference_mode()
    def inference(self, speech_feat: torch.Tensor, cache_source: torch.Tensor | None = None,
                  generators: Sequence[torch.Generator] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, 80, T] (+ the previous chunk's source tail [B, 1, C], C <= 480 T, overwriting the start of
        this call's source) -> (speech [B, 480 T], source [B, 1, 480 T]). See the module doc for `generators`."""
        source = self.source(speech_feat, generators)
        if cache_source is not None and cache_source.shape[2] != 0:
            source[:, :, :cache_source.shape[2]] = cache_source
        return self.decode(speech_feat, source), source

    def vocode(self, mels: Sequence[torch.Tensor], generators: Sequence[torch.Generator] | None = None,
               cache_sources: Sequence[torch.Tensor | None] | None = None
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Requests of any lengths: mels[i] [1, 80, T_i] -> [(speech [1, 480 T_i], source [1, 1, 480 T_i])].

        Requests with equal (T, cache length) run as one batch, others in separate calls. Rows never mix (a row's
        result equals its single call up to float rounding: batched convolutions may use other kernels, ~1e-5).
        generators[i] is request i's RNG (without generators, rows share the global RNG)."""
        caches = list(cache_sources) if cache_sources is not None else [None] * len(mels)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (mel, cache) in enumerate(zip(mels, caches, strict=True)):
            groups.setdefault((mel.shape[2], 0 if cache is None else cache.shape[2]), []).append(i)
        out: list = [None] * len(mels)
        for (_, cache_len), rows in groups.items():
            mel = torch.cat([mels[i] for i in rows])  # [b, 80, T]
            cache = torch.cat([caches[i] for i in rows]) if cache_len else None
            gens = None if generators is None else [generators[i] for i in rows]
            speech, source = self.inference(mel, cache, gens)
            for k, i in enumerate(rows):
                out[i] = (speech[k:k + 1], source[k:k + 1])
        return out


# ---------------------------------------------------------------------------------------------- checkpoints


def _strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(CHECKPOINT_PREFIX): v for k, v in state_dict.items()}


def fold_weight_norm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Publisher keys -> plain keys: each (gain, direction) pair becomes `weight` = g * v / ||v|| (norm over all
    dims but 0, torch's weight_norm default), computed with the op torch's own weight norm uses."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for gain_suffix, direction_suffix in WEIGHT_NORM_SUFFIXES:
            if key.endswith(direction_suffix):
                break
            if key.endswith(gain_suffix):
                base = key[: -len(gain_suffix)]
                direction = state_dict[base + direction_suffix]
                out[base + "weight"] = torch._weight_norm(direction, value, 0)
                break
        else:
            out[key] = value
    return out


def load_hift(path_or_state_dict: str | Path | Mapping[str, torch.Tensor], params: Mapping,
              device: str | torch.device = "cpu") -> HiftVocoder:
    """A publisher `hift.pt` (or its state dict) -> HiftVocoder in eval mode on `device`, weight norm folded."""
    if isinstance(path_or_state_dict, Mapping):
        state_dict = dict(path_or_state_dict)
    else:
        state_dict = torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
    model = HiftVocoder.from_config(params)
    model.load_state_dict(fold_weight_norm(_strip_prefix(state_dict)), strict=True)
    return model.to(device).eval()


def publisher_state_dict(model: HiftVocoder, direction_scales: Mapping[str, torch.Tensor] | None = None
                         ) -> dict[str, torch.Tensor]:
    """Plain model -> the publisher's layout (`parametrizations.weight.original0/1`). A weight-normed weight w
    [C0, ...] is stored as gain g = ||w|| per row and direction v = w * direction_scales[name] (one positive
    scale per row, default 1: any scale gives the same folded weight)."""
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for pname, param in module.named_parameters(recurse=False):
            weight = param.detach()
            if pname == "weight" and getattr(module, "hift_weight_norm", False):
                row_shape = (-1,) + (1,) * (weight.dim() - 1)
                scale = direction_scales.get(name, 1.0) if direction_scales is not None else 1.0
                out[prefix + WEIGHT_NORM_SUFFIXES[0][0]] = weight.flatten(1).norm(dim=1).view(row_shape)  # [C0,1,1]
                out[prefix + WEIGHT_NORM_SUFFIXES[0][1]] = weight * scale
            else:
                out[prefix + pname] = weight.clone()
    return out


def _randomize(model: HiftVocoder, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Seeded random weights giving a lively tiny vocoder (F0 |N(60, 60)| Hz: ~10% unvoiced frames,
    log-magnitudes of order 1, no clipping). Returns random per-row scales of the stored weight-norm directions
    (for publisher_state_dict), so that folding has real work to do."""
    direction_scales = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d, nn.Linear)):
            fan_in = module.weight[0].numel()  # Conv1d: in * k; Linear: in
            if isinstance(module, nn.ConvTranspose1d):  # weight [in, out, k]: in * k / stride taps per output
                fan_in = module.weight.shape[0] * module.weight.shape[2] // module.stride[0]
            scale = 0.3 if ".convs" in name else 1.0  # residual branches: keep the activations from growing
            module.weight.data = torch.randn(module.weight.shape, generator=generator) * scale / math.sqrt(fan_in)
            module.bias.data = torch.randn(module.bias.shape, generator=generator) * 0.1
            if getattr(module, "hift_weight_norm", False):
                direction_scales[name] = 0.5 + 1.5 * torch.rand(module.weight.shape[0], 1, 1, generator=generator)
        elif isinstance(module, Snake):
            module.alpha.data = 0.5 + torch.rand(module.alpha.shape, generator=generator)
    model.conv_post.weight.data *= 0.1
    model.conv_post.bias.data[: model.n_fft // 2 + 1] -= 0.5  # log-magnitudes around -0.5
    _calibrate_f0(model, generator)
    return direction_scales


def _calibrate_f0(model: HiftVocoder, generator: torch.Generator, mean_hz: float = 60.0, std_hz: float = 60.0
                  ) -> None:
    """Affine-fix the F0 head so that, on a random log-mel-like probe, its pre-abs output has mean/std
    mean_hz/std_hz."""
    probe = torch.randn(1, model.f0_predictor.condnet[0].in_channels, 200, generator=generator) * 2 - 5
    with torch.no_grad():
        hidden = model.f0_predictor.condnet(probe).transpose(1, 2)  # [1, 200, cond]
        raw = model.f0_predictor.classifier(hidden)  # [1, 200, 1]
        classifier = model.f0_predictor.classifier
        gain = std_hz / raw.std()
        classifier.bias.copy_(mean_hz - gain * (raw.mean() - classifier.bias))  # W h has mean raw.mean() - b
        classifier.weight.mul_(gain)


def tiny_hift_state_dict(params: Mapping = TINY_HIFT_PARAMS, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights for `params` as a publisher-layout state dict (weight norm as original0/1)."""
    model = HiftVocoder.from_config(params)
    direction_scales = _randomize(model, torch.Generator().manual_seed(seed))
    return publisher_state_dict(model, direction_scales)


def write_tiny_hift(path: Path, params: Mapping = TINY_HIFT_PARAMS, seed: int = 0) -> Path:
    """Save seeded random weights for `params` as a publisher-layout state dict (torch.save) at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_hift_state_dict(params, seed), path)
    return path


# ---------------------------------------------------------------------------------------------- streaming


def hamming_window(length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """numpy.hamming(length) (symmetric) in float64: 0.54 + 0.46 cos(pi n / (length - 1)), n = 1-length..length-1."""
    n = torch.arange(1 - length, length, 2, dtype=torch.float64, device=device)
    return 0.54 + 0.46 * torch.cos(math.pi * n / (length - 1))


def fade_in_out(fade_in: torch.Tensor, fade_out: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Cross-fade: the first len(window) / 2 samples of fade_in become fade_in * window[:half] + the last half
    samples of fade_out * window[half:], computed in float64 (as cosyvoice's numpy window makes it). [.., N]."""
    half = window.shape[0] // 2
    out = fade_in.clone()
    mixed = fade_in[..., :half].double() * window[:half] + fade_out[..., -half:].double() * window[half:]
    out[..., :half] = mixed.to(out.dtype)
    return out


class HiftStream:
    """One request's vocoder state across chunks, as `CosyVoice2Model.token2wav` keeps it: the last 8 mel frames
    (re-vocoded with the next chunk), their source samples (forced into the next call's source) and the last
    8 * 480 output samples (held back and cross-faded into the next chunk with a Hamming window).

    `step(mel_chunk [1, 80, t], is_last)` returns the PCM that token2wav returns for that chunk ([1, n]): with
    `is_last=False` the chunk's audio minus the held-back tail; with `is_last=True` everything left. The stream's
    random draws come from `generator` (see the module doc); None uses the global RNG like the reference."""

    def __init__(self, vocoder: HiftVocoder, generator: torch.Generator | None = None,
                 mel_cache_frames: int = MEL_CACHE_FRAMES) -> None:
        self.vocoder, self.generator = vocoder, generator
        self.mel_cache_frames = mel_cache_frames
        self.source_cache_samples = mel_cache_frames * vocoder.samples_per_frame  # 3840
        device = vocoder.stft_window.device
        self.window = hamming_window(2 * self.source_cache_samples, device)  # [7680] float64
        self.mel = self.source = self.speech = None  # caches: [1, 80, 8], [1, 1, 3840], [1, 3840]
        self.finished = False

    def step(self, mel_chunk: torch.Tensor, is_last: bool, speed: float = 1.0) -> torch.Tensor:
        if self.finished:
            raise RuntimeError("HiftStream.step after the last chunk")
        cached = self.mel is not None
        mel, cache_source = mel_chunk, None
        if cached:
            mel, cache_source = torch.cat([self.mel, mel_chunk], dim=2), self.source
        if is_last and speed != 1.0:
            if cached:
                raise ValueError("speed change only works on a single-chunk (non-streaming) request")
            mel = F.interpolate(mel, size=int(mel.shape[2] / speed), mode="linear")
        gens = None if self.generator is None else [self.generator]
        speech, source = self.vocoder.inference(mel, cache_source, gens)  # [1, N], [1, 1, N]
        if cached:
            speech = fade_in_out(speech, self.speech, self.window.to(speech.device))
        if is_last:
            self.finished = True
            return speech
        self.mel = mel[:, :, -self.mel_cache_frames:]
        self.source = source[:, :, -self.source_cache_samples:]
        self.speech = speech[:, -self.source_cache_samples:]
        return speech[:, :-self.source_cache_samples]
