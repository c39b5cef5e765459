"""Mimi decoder (the 12.5 Hz, 32-codebook codec of Sesame CSM), decoded chunk by chunk with per-request state.

Codes [num_frames, num_codebooks] -> sum of codebook vectors (codebook 0 semantic, the rest acoustic, each
group through its own 1x1 projection) -> depthwise transposed conv, 12.5 -> 25 Hz -> causal transformer ->
SEANet decoder (x960) -> 24 kHz PCM, 1920 samples per frame.

Every layer is causal, so a request decoded in chunks equals the whole utterance decoded at once, provided
each layer carries its left context from one chunk to the next (streamvox.codecs.streaming). The transformer
attends over the last `sliding_window` positions, the context of the publisher's streaming decoder.

Weights are read from the Hugging Face layout of `kyutai/mimi` (config.json + model.safetensors), or from the
`codec_model.` tensors of a CSM checkpoint; only the decoder half is loaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from streamvox.codecs.streaming import (
    CausalConv1d,
    CausalConvTranspose1d,
    ScaledTransformerLayer,
    StateBatch,
    StreamingCodec,
    random_tensors,
)
from streamvox.layers.rotary import RotaryEmbedding

DECODER_PREFIXES = ("upsample.", "decoder_transformer.", "decoder.")
QUANTIZER_PREFIX = "quantizer."


class ResnetBlock(nn.Module):
    """SEANet residual unit: ELU, causal conv (kernel k, dilation d), ELU, 1x1 conv; plus the input."""

    def __init__(self, slots, dim: int, hidden: int, kernel_size: int, dilation: int, use_shortcut: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList([nn.ELU(), CausalConv1d(next(slots), dim, hidden, kernel_size, dilation),
                                    nn.ELU(), CausalConv1d(next(slots), hidden, dim, 1)])
        self.shortcut = CausalConv1d(next(slots), dim, dim, 1) if use_shortcut else None

    def forward(self, x: torch.Tensor, batch: StateBatch) -> torch.Tensor:
        h = x
        for layer in self.block:
            h = layer(h, batch) if isinstance(layer, CausalConv1d) else layer(h)
        return (x if self.shortcut is None else self.shortcut(x, batch)) + h


class SeanetDecoder(nn.Module):
    def __init__(self, config: dict, slots) -> None:
        super().__init__()
        scale = 2 ** len(config["upsampling_ratios"])
        filters = config["num_filters"]
        layers: list[nn.Module] = [CausalConv1d(next(slots), config["hidden_size"], scale * filters,
                                                config["kernel_size"])]
        for ratio in config["upsampling_ratios"]:
            channels = scale * filters
            layers += [nn.ELU(), CausalConvTranspose1d(next(slots), channels, channels // 2, 2 * ratio, ratio)]
            for j in range(config["num_residual_layers"]):
                layers.append(ResnetBlock(slots, channels // 2, channels // 2 // config["compress"],
                                          config["residual_kernel_size"], config["dilation_growth_rate"] ** j,
                                          config["use_conv_shortcut"]))
            scale //= 2
        layers += [nn.ELU(), CausalConv1d(next(slots), filters, config["audio_channels"], config["last_kernel_size"])]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, batch: StateBatch) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x) if isinstance(layer, nn.ELU) else layer(x, batch)
        return x


class MLP(nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        if config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"Mimi hidden_act {config['hidden_act']!r} is not supported (gelu is)")
        self.fc1 = nn.Linear(config["hidden_size"], config["intermediate_size"], bias=False)
        self.fc2 = nn.Linear(config["intermediate_size"], config["hidden_size"], bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Transformer(nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        eps = config.get("norm_eps", 1e-5)
        self.layers = nn.ModuleList([
            ScaledTransformerLayer(config, i, lambda n: nn.LayerNorm(n, eps=eps), MLP(config))
            for i in range(config["num_hidden_layers"])])
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        self.rotary = RotaryEmbedding(head_dim, config.get("rope_theta", 10000.0), None)

    def forward(self, x: torch.Tensor, batch: StateBatch) -> torch.Tensor:  # [B, T, hidden]
        for layer in self.layers:
            x = layer(x, self.rotary, batch)
        return x


class _DecoderHalf(nn.Module):
    """The modules after the quantizer, named as in the checkpoint."""

    def __init__(self, config: dict, upsample_stride: int) -> None:
        super().__init__()
        slots = iter(range(1_000))
        hidden = config["hidden_size"]
        self.upsample = CausalConvTranspose1d(next(slots), hidden, hidden, 2 * upsample_stride, upsample_stride,
                                              groups=config.get("upsample_groups", hidden), bias=False)
        self.decoder_transformer = Transformer(config)
        self.decoder = SeanetDecoder(config, slots)


class MimiCodec(StreamingCodec):
    """Mimi codes -> 24 kHz PCM, batched across requests, each request's chunks continuing its own state."""

    name = "Mimi"

    def __init__(self, config: dict, state_dict: dict[str, torch.Tensor]) -> None:
        _check_streamable(config)
        self.config = config
        self.sample_rate = int(config["sampling_rate"])
        hop = math.prod(config["upsampling_ratios"])
        # older configs name the frame rate; newer ones derive it (the encoder downsamples the hop by 2)
        frame_rate = config.get("frame_rate") or config.get("_frame_rate") or self.sample_rate / (2 * hop)
        self.samples_per_frame = round(self.sample_rate / frame_rate)  # 1920
        self.upsample_stride = self.samples_per_frame // hop  # 2: 12.5 Hz frames -> 25 Hz transformer steps
        if self.upsample_stride * hop != self.samples_per_frame or self.upsample_stride < 2:
            raise ValueError(f"Mimi frame rate {frame_rate} is not the decoder's rate {self.sample_rate / hop} Hz "
                             "divided by an integer of at least 2")
        self.num_codebooks = config["num_quantizers"]
        self.num_semantic = config.get("num_semantic_quantizers", 1)
        self.net = _DecoderHalf(config, self.upsample_stride).eval()
        decoder_half = {k: v for k, v in state_dict.items() if k.startswith(DECODER_PREFIXES)}
        self.net.load_state_dict(decoder_half, strict=True)
        self.codebooks, self.projections = _quantizer_tables(state_dict, self.num_codebooks, self.num_semantic)
        self.codebook_size = self.codebooks[0].shape[0]
        self.dtype = next(self.net.parameters()).dtype

    @classmethod
    def load(cls, path: str | Path, prefix: str = "", config: dict | None = None) -> MimiCodec:
        """A directory in the layout of kyutai/mimi (config.json + model.safetensors), or a CSM checkpoint with
        `prefix="codec_model."` and its `codec_config`."""
        path = Path(path)
        if config is None:
            config_path = path / "config.json"
            if not config_path.is_file():
                raise FileNotFoundError(f"Mimi codec file {config_path} is missing (a kyutai/mimi directory holds "
                                        "config.json and model.safetensors)")
            config = json.loads(config_path.read_text())
        return cls(config, read_tensors(path, prefix))

    @torch.inference_mode()
    def _decode_batch(self, codes: torch.Tensor, batch: StateBatch) -> torch.Tensor:  # [B, T, K] -> [B, T * 1920]
        codes = codes.long()
        semantic = sum(F.embedding(codes[..., i], self.codebooks[i]) for i in range(self.num_semantic))
        acoustic = sum(F.embedding(codes[..., i], self.codebooks[i]) for i in range(self.num_semantic,
                                                                                     self.num_codebooks))
        latent = semantic @ self.projections[0].T + acoustic @ self.projections[1].T  # [B, T, hidden]
        x = self.net.upsample(latent.transpose(1, 2).to(self.dtype), batch)  # [B, hidden, 2T]
        num_positions = x.shape[-1]
        x = self.net.decoder_transformer(x.transpose(1, 2), batch).transpose(1, 2)
        pcm = self.net.decoder(x, batch)[:, 0].float()
        batch.advance(num_positions)
        return pcm


def read_tensors(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors under `prefix` (prefix removed) of model.safetensors, or of model-*.safetensors shards."""
    weights = path / "model.safetensors"
    files = sorted(path.glob("model-*.safetensors")) or [weights]
    if not all(file.is_file() for file in files):
        raise FileNotFoundError(f"Mimi codec weights {weights} are missing")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update({k[len(prefix) :]: v for k, v in load_file(str(file)).items() if k.startswith(prefix)})
    return tensors


def _quantizer_tables(state_dict: dict, num_codebooks: int, num_semantic: int):
    """Codebook vectors (embed_sum / usage, as the reference computes them) and the two output projections."""
    codebooks, projections = [], []
    groups = (("semantic", 0, num_semantic), ("acoustic", num_semantic, num_codebooks - num_semantic))
    for group, first, count in groups:
        base = f"{QUANTIZER_PREFIX}{group}_residual_vector_quantizer."
        for i in range(count):
            try:
                usage = state_dict[f"{base}layers.{i}.codebook.cluster_usage"]
                total = state_dict[f"{base}layers.{i}.codebook.embed_sum"]
            except KeyError as error:
                raise ValueError(f"Mimi weights lack {error.args[0]} (codebook {first + i}); is this a Mimi "
                                 "checkpoint with all its quantizers?") from None
            codebooks.append((total / usage.clamp(min=1e-5)[:, None]).float())
        projection = state_dict.get(f"{base}output_proj.weight")
        projections.append(torch.eye(codebooks[-1].shape[1]) if projection is None else projection[..., 0].float())
    return codebooks, projections


def _check_streamable(config: dict) -> None:
    required = {"use_causal_conv": True, "trim_right_ratio": 1.0, "pad_mode": "constant"}
    for key, value in required.items():
        if config.get(key, value) != value:
            raise ValueError(f"Mimi config {key}={config[key]!r} cannot be decoded as a stream (needs {value!r})")


# -- tiny random-weight Mimi in the kyutai/mimi layout ---------------------------------------------------------

# The published config with small widths (every structural setting kept: ratios, kernels, 32 codebooks, window)
TINY_CONFIG = {
    "model_type": "mimi", "architectures": ["MimiModel"], "sampling_rate": 24000, "frame_rate": 12.5,
    "audio_channels": 1, "hidden_size": 64, "num_filters": 8, "num_residual_layers": 1,
    "upsampling_ratios": [8, 6, 5, 4], "kernel_size": 7, "last_kernel_size": 3, "residual_kernel_size": 3,
    "dilation_growth_rate": 2, "use_causal_conv": True, "pad_mode": "constant", "compress": 2,
    "trim_right_ratio": 1.0, "codebook_size": 64, "codebook_dim": 16, "num_quantizers": 32,
    "use_conv_shortcut": False, "vector_quantization_hidden_dimension": 16, "upsample_groups": 64,
    "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4,
    "head_dim": 16, "hidden_act": "gelu", "max_position_embeddings": 8000, "norm_eps": 1e-5, "rope_theta": 10000.0,
    "sliding_window": 250, "layer_scale_initial_scale": 0.01, "attention_bias": False, "num_semantic_quantizers": 1,
    "use_cache": False, "torch_dtype": "float32",
}


def tiny_tensors(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of a Mimi checkpoint (encoder half included, so other tools load it whole), seeded random.

    Codebooks are random vectors and layer scales 1, so every stage of the decoder shapes the PCM."""
    generator = torch.Generator().manual_seed(seed)
    hop = math.prod(config["upsampling_ratios"])
    upsample_stride = round(config["sampling_rate"] / config["frame_rate"]) // hop
    decoder = _DecoderHalf(config, upsample_stride).state_dict()
    shapes = {name: tuple(t.shape) for name, t in decoder.items()}
    shapes.update({name.replace("decoder_transformer.", "encoder_transformer.", 1): shape
                   for name, shape in shapes.items() if name.startswith("decoder_transformer.")})
    hidden = config["hidden_size"]
    shapes["downsample.conv.weight"] = (hidden, hidden, 2 * upsample_stride)
    shapes.update(_encoder_shapes(config))
    tensors = random_tensors(shapes, generator, ones=("layer_scale.scale", "layernorm.weight"))
    size, dim = config["codebook_size"], config["codebook_dim"]
    num_semantic = config.get("num_semantic_quantizers", 1)
    for group, count in (("semantic", num_semantic), ("acoustic", config["num_quantizers"] - num_semantic)):
        base = f"{QUANTIZER_PREFIX}{group}_residual_vector_quantizer."
        tensors[f"{base}input_proj.weight"] = torch.randn(dim, hidden, 1, generator=generator) * hidden**-0.5
        tensors[f"{base}output_proj.weight"] = torch.randn(hidden, dim, 1, generator=generator) * dim**-0.5
        for i in range(count):
            tensors[f"{base}layers.{i}.codebook.initialized"] = torch.ones(1)
            tensors[f"{base}layers.{i}.codebook.cluster_usage"] = torch.rand(size, generator=generator) * 1.5 + 0.5
            tensors[f"{base}layers.{i}.codebook.embed_sum"] = torch.randn(size, dim, generator=generator)
    return tensors


def _encoder_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The SEANet encoder's tensors: the decoder's mirror image, downsampling by the reversed ratios."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, in_channels: int, out_channels: int, kernel: int) -> None:
        shapes[f"encoder.layers.{name}.conv.weight"] = (out_channels, in_channels, kernel)
        shapes[f"encoder.layers.{name}.conv.bias"] = (out_channels,)

    filters = config["num_filters"]
    conv("0", config["audio_channels"], filters, config["kernel_size"])
    index, channels = 1, filters
    for ratio in reversed(config["upsampling_ratios"]):
        for _ in range(config["num_residual_layers"]):
            hidden = channels // config["compress"]
            conv(f"{index}.block.1", channels, hidden, config["residual_kernel_size"])
            conv(f"{index}.block.3", hidden, channels, 1)
            if config["use_conv_shortcut"]:
                conv(f"{index}.shortcut", channels, channels, 1)
            index += 1
        conv(str(index + 1), channels, 2 * channels, 2 * ratio)  # after an ELU
        index, channels = index + 2, 2 * channels
    conv(str(index + 1), channels, config["hidden_size"], config["last_kernel_size"])  # after an ELU
    return shapes
