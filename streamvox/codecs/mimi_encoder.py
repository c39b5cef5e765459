"""Mimi's encoder half: 24 kHz audio -> [num_frames, 32] codes at 12.5 Hz (reference audio for CSM's context).

SEANet encoder (causal convolutions, downsampling x4 x5 x6 x8) -> causal transformer at 25 Hz (the decoder's
window) -> stride-2 convolution to 12.5 Hz -> split residual quantization: codebook 0 from the semantic
group, 1-31 from the acoustic one, each group projecting the same latent and taking the nearest codebook
vector, then quantizing what is left. A whole clip at a time (it is a prompt, not a stream).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from streamvox.codecs.mimi import QUANTIZER_PREFIX, Transformer, _quantizer_tables
from streamvox.codecs.streaming import StateBatch, StatePool, StreamState

ENCODER_PREFIXES = ("encoder.", "encoder_transformer.", "downsample.")


class _Conv(nn.Module):
    """A causal convolution over a whole clip: left padding (zeros or the first sample repeated) and as much right
    padding as the last stride needs, as the publisher's encoder pads."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                 bias: bool = True, pad_mode: str = "constant") -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation, bias=bias)
        self.stride, self.span = stride, (kernel_size - 1) * dilation + 1
        self.pad_mode = pad_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T]
        left = self.span - self.stride
        num_frames = math.ceil((x.shape[-1] - self.span + left) / self.stride + 1) - 1
        right = num_frames * self.stride + self.span - left - x.shape[-1]
        return self.conv(F.pad(x, (left, right), mode=self.pad_mode))


class _Residual(nn.Module):
    def __init__(self, dim: int, hidden: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.block = nn.ModuleList([nn.ELU(), _Conv(dim, hidden, kernel_size, dilation=dilation), nn.ELU(),
                                    _Conv(hidden, dim, 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in self.block:
            h = layer(h)
        return x + h


class _Seanet(nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        filters = config["num_filters"]
        layers: list[nn.Module] = [_Conv(config["audio_channels"], filters, config["kernel_size"])]
        channels = filters
        for ratio in reversed(config["upsampling_ratios"]):
            for j in range(config["num_residual_layers"]):
                layers.append(_Residual(channels, channels // config["compress"], config["residual_kernel_size"],
                                        config["dilation_growth_rate"] ** j))
            layers += [nn.ELU(), _Conv(channels, 2 * channels, 2 * ratio, stride=ratio)]
            channels *= 2
        layers += [nn.ELU(), _Conv(channels, config["hidden_size"], config["last_kernel_size"])]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class _EncoderHalf(nn.Module):
    def __init__(self, config: dict, downsample_stride: int) -> None:
        super().__init__()
        hidden = config["hidden_size"]
        self.encoder = _Seanet(config)
        self.encoder_transformer = Transformer(config)
        self.downsample = _Conv(hidden, hidden, 2 * downsample_stride, stride=downsample_stride, bias=False,
                                pad_mode="replicate")


class MimiEncoder:
    """24 kHz mono audio -> Mimi codes, with the weights of a kyutai/mimi checkpoint (or a CSM's codec_model.)."""

    def __init__(self, config: dict, state_dict: dict[str, torch.Tensor]) -> None:
        if config.get("use_causal_conv", True) is not True or config.get("audio_channels", 1) != 1:
            raise ValueError("only the causal, mono Mimi encoder is supported")
        self.sample_rate = int(config["sampling_rate"])
        hop = math.prod(config["upsampling_ratios"])
        frame_rate = config.get("frame_rate") or config.get("_frame_rate") or self.sample_rate / (2 * hop)
        self.samples_per_frame = round(self.sample_rate / frame_rate)
        self.num_codebooks = config["num_quantizers"]
        self.num_semantic = config.get("num_semantic_quantizers", 1)
        self.net = _EncoderHalf(config, self.samples_per_frame // hop).eval()
        own = {k: v for k, v in state_dict.items() if k.startswith(ENCODER_PREFIXES)}
        missing = sorted(set(self.net.state_dict()) - set(own))
        if missing:
            raise ValueError(f"Mimi weights lack the encoder tensors {missing[:3]}; this checkpoint cannot encode "
                             "reference audio")
        self.net.load_state_dict(own)
        self.net.float()  # a prompt clip is short: full precision, whatever the checkpoint stores
        self.codebooks, _ = _quantizer_tables(state_dict, self.num_codebooks, self.num_semantic)
        self.input_projections = []
        for group in ("semantic", "acoustic"):
            projection = state_dict.get(f"{QUANTIZER_PREFIX}{group}_residual_vector_quantizer.input_proj.weight")
            self.input_projections.append(None if projection is None else projection[..., 0].float())

    @torch.inference_mode()
    def encode(self, pcm: torch.Tensor) -> torch.Tensor:
        """float PCM [num_samples] at `sample_rate` -> codes [ceil(num_samples / 1920), num_codebooks] int64."""
        if pcm.dim() != 1 or pcm.numel() == 0:
            raise ValueError("reference audio must be a non-empty mono clip")
        x = self.net.encoder(pcm.float()[None, None])  # [1, hidden, T at 25 Hz]
        whole = StateBatch([StreamState()], StatePool(x.device))  # one stream, no past
        x = self.net.encoder_transformer(x.transpose(1, 2), whole).transpose(1, 2)
        latent = self.net.downsample(x)[0].T  # [frames, hidden]
        groups = ((0, self.num_semantic), (self.num_semantic, self.num_codebooks))
        codes = []
        for (first, end), projection in zip(groups, self.input_projections, strict=True):
            residual = latent if projection is None else latent @ projection.T
            for index in range(first, end):
                chosen = torch.cdist(residual[None], self.codebooks[index][None])[0].argmin(dim=-1)
                codes.append(chosen)
                residual = residual - F.embedding(chosen, self.codebooks[index])
        return torch.stack(codes, dim=1)
