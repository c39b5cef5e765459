"""The Qwen3-TTS 12 Hz tokenizer's decoder (16 codebooks, 12.5 frames/s, 24 kHz), decoded chunk by chunk.

Codes [num_frames, 16] -> split RVQ (codebook 0, then 1..15, each group summed and projected by a 1x1 conv) ->
causal conv -> transformer at the frame rate (sliding window, RMSNorm, gated MLP, layer scales) -> two
(transposed conv x2, ConvNeXt) upsamplers -> conv, four (SnakeBeta, transposed conv, 3 residual units)
blocks upsampling x8 x5 x4 x3 -> SnakeBeta, conv -> PCM clamped to [-1, 1], 1920 samples per frame.

Every layer is causal; each request's chunks continue its own `StreamState` (streamvox.codecs.streaming), so
a chunked decode equals the whole-utterance decode. Weights are the `decoder.` tensors of the checkpoint's
`speech_tokenizer/` directory (config.json + model.safetensors, Qwen3TTSTokenizerV2 layout).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from streamvox.codecs import mimi
from streamvox.codecs.streaming import (
    CausalConv1d,
    CausalConvTranspose1d,
    ScaledTransformerLayer,
    StateBatch,
    StreamingCodec,
    random_tensors,
)
from streamvox.config import random_init_seed
from streamvox.layers.mlp import GatedMLP
from streamvox.layers.norm import RMSNorm
from streamvox.layers.rotary import RotaryEmbedding

DECODER_PREFIX = "decoder."
MODEL_TYPE = "qwen3_tts_tokenizer_12hz"


class SnakeBeta(nn.Module):
    """x + sin^2(x * e^alpha) / e^beta, per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T]
        alpha, beta = self.alpha.exp()[:, None], self.beta.exp()[:, None]
        return x + (1.0 / (beta + 1e-9)) * torch.sin(x * alpha).pow(2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, slots, dim: int) -> None:
        super().__init__()
        self.dwconv = CausalConv1d(next(slots), dim, dim, 7, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, batch: StateBatch) -> torch.Tensor:  # [B, C, T]
        h = self.dwconv(x, batch).transpose(1, 2)
        h = self.pwconv2(F.gelu(self.pwconv1(self.norm(h))))
        return x + (self.gamma * h).transpose(1, 2)


class ResidualUnit(nn.Module):
    def __init__(self, slots, dim: int, dilation: int) -> None:
        super().__init__()
        self.act1 = SnakeBeta(dim)
        self.conv1 = CausalConv1d(next(slots), dim, dim, 7, dilation)
        self.act2 = SnakeBeta(dim)
        self.conv2 = CausalConv1d(next(slots), dim, dim, 1)

    def forward(self, x: torch.Tensor, batch: StateBatch) -> torch.Tensor:
        return x + self.conv2(self.act2(self.conv1(self.act1(x), batch)), batch)


class DecoderBlock(nn.Module):
    def __init__(self, slots, in_dim: int, out_dim: int, rate: int) -> None:
        super().__init__()
        self.block = nn.ModuleList([SnakeBeta(in_dim), CausalConvTranspose1d(next(slots), in_dim, out_dim, 2 * rate,
                                                                             rate)])
        self.block.extend(ResidualUnit(slots, out_dim, dilation) for dilation in (1, 3, 9))

    def forward(self, x: torch.Tensor, batch: StateBatch) -> torch.Tensor:
        x = self.block[1](self.block[0](x), batch)
        for unit in self.block[2:]:
            x = unit(x, batch)
        return x


class Transformer(nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        hidden = config["hidden_size"]
        self.input_proj = nn.Linear(config["latent_dim"], hidden)
        self.output_proj = nn.Linear(hidden, config["latent_dim"])
        eps = config.get("rms_norm_eps", 1e-5)
        self.layers = nn.ModuleList(
            ScaledTransformerLayer(config, i, lambda n: RMSNorm(n, eps), GatedMLP(hidden, config["intermediate_size"]))
            for i in range(config["num_hidden_layers"]))
        self.norm = RMSNorm(hidden, eps)
        head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
        self.rotary = RotaryEmbedding(head_dim, config.get("rope_theta", 10000.0), None)

    def forward(self, x: torch.Tensor, batch: StateBatch) -> torch.Tensor:  # [B, T, latent]
        x = self.input_proj(x)
        for layer in self.layers:
            x = layer(x, self.rotary, batch)
        return self.output_proj(self.norm(x))


class _Upsample(nn.Module):
    def __init__(self, slots, dim: int, factor: int) -> None:
        super().__init__()
        self.transpose = CausalConvTranspose1d(next(slots), dim, dim, factor, factor)
        self.convnext = ConvNeXtBlock(slots, dim)


class _DecoderNet(nn.Module):
    """The modules after the quantizer, in checkpoint order (names are mapped in `_checkpoint_names`)."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        slots = iter(range(10_000))
        latent, dim = config["latent_dim"], config["decoder_dim"]
        self.pre_conv = CausalConv1d(next(slots), config["codebook_dim"], latent, 3)
        self.pre_transformer = Transformer(config)
        self.upsample = nn.ModuleList(_Upsample(slots, latent, factor) for factor in config["upsampling_ratios"])
        rates = config["upsample_rates"]
        self.first = CausalConv1d(next(slots), latent, dim, 7)
        self.blocks = nn.ModuleList(DecoderBlock(slots, dim // 2**i, dim // 2 ** (i + 1), rate)
                                    for i, rate in enumerate(rates))
        out_dim = dim // 2 ** len(rates)
        self.final_act = SnakeBeta(out_dim)
        self.last = CausalConv1d(next(slots), out_dim, 1, 7)

    def forward(self, x: torch.Tensor, batch: StateBatch) -> torch.Tensor:  # [B, codebook_dim, T] -> [B, T*1920]
        x = self.pre_conv(x, batch)
        x = self.pre_transformer(x.transpose(1, 2), batch).transpose(1, 2)
        for stage in self.upsample:
            x = stage.convnext(stage.transpose(x, batch), batch)
        x = self.first(x, batch)
        for block in self.blocks:
            x = block(x, batch)
        return self.last(self.final_act(x), batch)[:, 0].clamp(-1.0, 1.0)


def _checkpoint_names(net: _DecoderNet, num_blocks: int) -> dict[str, str]:
    """Our parameter name -> the checkpoint's (`decoder.` prefix stripped): the upsamplers are numbered pairs
    there, and the output stack one list `decoder.{0..num_blocks + 2}`."""
    names = {}
    for ours in net.state_dict():
        head, rest = ours.split(".", 1)
        if head == "upsample":
            index, part, rest = rest.split(".", 2)
            theirs = f"upsample.{index}.{0 if part == 'transpose' else 1}.{rest}"
        elif head == "blocks":
            index, rest = rest.split(".", 1)
            theirs = f"decoder.{int(index) + 1}.{rest}"
        elif head in ("first", "final_act", "last"):
            theirs = f"decoder.{ {'first': 0, 'final_act': num_blocks + 1, 'last': num_blocks + 2}[head]}.{rest}"
        else:
            theirs = ours
        names[ours] = theirs
    return names


class Qwen12HzCodec(StreamingCodec):
    """16-codebook 12.5 Hz codes -> 24 kHz PCM, batched across requests, each continuing its own state."""

    name = "12 Hz"

    def __init__(self, config: dict, decoder_tensors: dict[str, torch.Tensor]) -> None:
        decoder = config.get("decoder_config", config)
        self.config = decoder
        self.sample_rate = int(config.get("output_sample_rate", 24000))
        self.samples_per_frame = int(config.get("decode_upsample_rate", 1920))
        hop = math.prod(decoder["upsample_rates"]) * math.prod(decoder["upsampling_ratios"])
        if hop != self.samples_per_frame:
            raise ValueError(f"12 Hz decoder upsamples by {hop}, the config says {self.samples_per_frame} per frame")
        self.num_codebooks = decoder["num_quantizers"]
        self.codebook_size = decoder["codebook_size"]
        self.net = _DecoderNet(decoder).eval()
        names = _checkpoint_names(self.net, len(decoder["upsample_rates"]))
        missing = sorted(theirs for theirs in names.values() if theirs not in decoder_tensors)
        if missing:
            raise ValueError(f"12 Hz decoder weights lack {missing[:3]}; is this a Qwen3-TTS 12 Hz speech tokenizer?")
        self.net.load_state_dict({ours: decoder_tensors[theirs] for ours, theirs in names.items()})
        self.codebooks, self.projections = _quantizer_tables(decoder_tensors, self.num_codebooks)
        self.dtype = next(self.net.parameters()).dtype

    @classmethod
    def load(cls, path: str | Path) -> Qwen12HzCodec:
        """A `speech_tokenizer/` directory: config.json (model_type qwen3_tts_tokenizer_12hz) + model.safetensors.
        A config with `streamvox_random_init` ({"seed": N}) has no weights file: they are drawn from the seed."""
        path = Path(path)
        config_path, weights = path / "config.json", path / "model.safetensors"
        if not config_path.is_file():
            raise FileNotFoundError(f"12 Hz speech tokenizer file {config_path} is missing")
        config = json.loads(config_path.read_text())
        if config.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{path} holds a {config.get('model_type')!r} tokenizer, not {MODEL_TYPE}")
        if (seed := random_init_seed(config)) is not None:
            tensors = tiny_tensors(config, seed, with_encoder=False)
        elif weights.is_file():
            tensors = load_file(str(weights))
        else:
            raise FileNotFoundError(f"12 Hz speech tokenizer file {weights} is missing")
        return cls(config, {k[len(DECODER_PREFIX) :]: v for k, v in tensors.items() if k.startswith(DECODER_PREFIX)})

    @torch.inference_mode()
    def _decode_batch(self, codes: torch.Tensor, batch: StateBatch) -> torch.Tensor:  # [B, T, 16] -> [B, T * 1920]
        codes = codes.long()
        first = F.embedding(codes[..., 0], self.codebooks[0])
        rest = sum(F.embedding(codes[..., i], self.codebooks[i]) for i in range(1, self.num_codebooks))
        latent = first @ self.projections[0].T + rest @ self.projections[1].T  # [B, T, codebook_dim]
        pcm = self.net(latent.transpose(1, 2).to(self.dtype), batch).float()
        batch.advance(codes.shape[1])
        return pcm


def _quantizer_tables(tensors: dict, num_codebooks: int):
    """Codebook vectors (embedding_sum / usage) of the first and the other codebooks, and the two output
    projections."""
    codebooks, projections = [], []
    for group, first, count in (("rvq_first", 0, 1), ("rvq_rest", 1, num_codebooks - 1)):
        base = f"quantizer.{group}."
        for i in range(count):
            try:
                usage = tensors[f"{base}vq.layers.{i}._codebook.cluster_usage"]
                total = tensors[f"{base}vq.layers.{i}._codebook.embedding_sum"]
            except KeyError as error:
                raise ValueError(f"12 Hz decoder weights lack {error.args[0]} (codebook {first + i})") from None
            codebooks.append((total / usage.clamp(min=1e-5)[:, None]).float())
        projections.append(tensors[f"{base}output_proj.weight"][..., 0].float())
    return codebooks, projections


# -- tiny random-weight speech tokenizer in the Qwen3-TTS layout ----------------------------------------------

TINY_DECODER = {
    "codebook_size": 2048, "codebook_dim": 32, "hidden_size": 64, "latent_dim": 64, "num_attention_heads": 4,
    "num_key_value_heads": 4, "head_dim": 16, "intermediate_size": 128, "num_hidden_layers": 2,
    "sliding_window": 72, "max_position_embeddings": 8000, "rope_theta": 10000, "rms_norm_eps": 1e-5,
    "hidden_act": "silu", "layer_scale_initial_scale": 0.01, "attention_bias": False, "attention_dropout": 0.0,
    "num_quantizers": 16, "upsample_rates": [8, 5, 4, 3], "upsampling_ratios": [2, 2], "decoder_dim": 64,
}
TINY_CONFIG = {
    "architectures": ["Qwen3TTSTokenizerV2Model"], "model_type": MODEL_TYPE,
    "encoder_config": {k: v for k, v in {**mimi.TINY_CONFIG, "codebook_size": 2048}.items()
                       if k not in ("architectures", "torch_dtype")},
    "decoder_config": TINY_DECODER, "encoder_valid_num_quantizers": 16, "input_sample_rate": 24000,
    "output_sample_rate": 24000, "decode_upsample_rate": 1920, "encode_downsample_rate": 1920,
}


def tiny_tensors(config: dict, seed: int, with_encoder: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of a 12 Hz speech tokenizer (its Mimi-style encoder too, unless not `with_encoder`), seeded
    random. Snake activations
    and codebooks are random and layer scales 1, so every stage of the decoder shapes the PCM."""
    generator = torch.Generator().manual_seed(seed)
    decoder = config["decoder_config"]
    net = _DecoderNet(decoder)
    names = _checkpoint_names(net, len(decoder["upsample_rates"]))
    shapes = {names[name]: tuple(t.shape) for name, t in net.state_dict().items()}
    tensors = random_tensors(shapes, generator, ones=("layer_scale.scale", "layernorm.weight", "norm.weight",
                                                      ".gamma"), small=(".bias", ".alpha", ".beta"))
    for name in tensors:  # residual branches start small, as in a trained decoder: activations keep their scale
        if name.endswith(".conv2.conv.weight"):
            tensors[name] *= 0.1
    last = f"decoder.{len(decoder['upsample_rates']) + 2}.conv.weight"
    tensors[last] *= 0.4  # keeps the noise mostly inside [-1, 1], so the final clamp rarely acts
    size, dim = decoder["codebook_size"], decoder["codebook_dim"]
    for group, count in (("rvq_first", 1), ("rvq_rest", decoder["num_quantizers"] - 1)):
        base = f"quantizer.{group}."
        tensors[f"{base}input_proj.weight"] = torch.randn(dim // 2, dim, 1, generator=generator) * dim**-0.5
        tensors[f"{base}output_proj.weight"] = torch.randn(dim, dim // 2, 1, generator=generator) * (dim // 2)**-0.5
        for i in range(count):
            codebook = f"{base}vq.layers.{i}._codebook."
            tensors[codebook + "cluster_usage"] = torch.rand(size, generator=generator) * 1.5 + 0.5
            tensors[codebook + "embedding_sum"] = torch.randn(size, dim // 2, generator=generator)
    decoder_tensors = {DECODER_PREFIX + k: v for k, v in tensors.items()}
    if not with_encoder:
        return decoder_tensors
    encoder = {k: v for k, v in mimi.tiny_tensors(config["encoder_config"], seed).items()
               if not k.startswith(mimi.DECODER_PREFIXES)}
    return {**decoder_tensors, **{"encoder." + k: v for k, v in encoder.items()}}
