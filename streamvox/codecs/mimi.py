"""Mimi decoder (the 12.5 Hz, 32-codebook codec of Sesame CSM), decoded chunk by chunk with per-request state.

Codes [num_frames, num_codebooks] -> sum of codebook vectors (codebook 0 semantic, the rest acoustic, each
group through its own 1x1 projection) -> depthwise transposed conv, 12.5 -> 25 Hz -> causal transformer ->
SEANet decoder (x960) -> 24 kHz PCM, 1920 samples per frame.

Every layer is causal, so a request decoded in chunks equals the whole utterance decoded at once, provided
each layer carries its left context from one chunk to the next (`MimiState`):
- a causal convolution keeps its last (kernel - 1) * dilation input samples (zeros before the first chunk,
  which is the constant padding of the whole-utterance decode);
- a transposed convolution keeps the kernel - stride output samples that overlap the next chunk's output,
  bias excluded (it is added once, to the finished samples);
- the transformer keeps the keys and values of its last `sliding_window` - 1 positions, the attention context
  of the publisher's streaming decoder, and the number of positions seen (for RoPE).

Weights are read from the Hugging Face layout of `kyutai/mimi` (config.json + model.safetensors), or from the
`codec_model.` tensors of a CSM checkpoint; only the decoder half is loaded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from streamvox.layers.rotary import RotaryEmbedding

DECODER_PREFIXES = ("upsample.", "decoder_transformer.", "decoder.")
QUANTIZER_PREFIX = "quantizer."


@dataclass
class MimiState:
    """The left context of one request's decode, updated in place by each of its chunks (one at a time)."""

    tensors: dict[int, torch.Tensor] = field(default_factory=dict)  # per streaming layer slot: [C, context]
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # per transformer layer: [H, num_kept, D]
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    num_positions: int = 0  # transformer (25 Hz) positions decoded so far


class _Batch:
    """The states of the requests decoded together (rows in batch order). Layers read the old context and stage
    the new one; `commit` applies it only once the whole batch has decoded, so a failed batch leaves every
    state as it was and its chunks can be retried."""

    def __init__(self, states: list[MimiState]) -> None:
        self.states = states
        self._staged: list[tuple[str, int, list[torch.Tensor]]] = []  # (state field, slot, one tensor per row)

    def past(self, slot: int, channels: int, length: int, like: torch.Tensor) -> torch.Tensor:
        """[B, channels, length] context of one layer; zeros for a request's first chunk."""
        zeros = None
        rows = []
        for state in self.states:
            row = state.tensors.get(slot)
            if row is None:
                zeros = like.new_zeros(channels, length) if zeros is None else zeros
                row = zeros
            rows.append(row)
        return torch.stack(rows)

    def keep(self, slot: int, context: torch.Tensor) -> None:
        self._staged.append(("tensors", slot, list(context.clone().unbind(0))))

    def keep_kv(self, layer_index: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self._staged += [("keys", layer_index, keys), ("values", layer_index, values)]

    def commit(self, num_positions: int) -> None:
        for name, slot, rows in self._staged:
            for state, row in zip(self.states, rows, strict=True):
                getattr(state, name)[slot] = row
        for state in self.states:
            state.num_positions += num_positions
        self._staged = []


class CausalConv1d(nn.Module):
    """Conv1d over a stream: left context from the previous chunk instead of zero padding."""

    def __init__(self, slot: int, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1,
                 groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.slot = slot
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation, groups=groups, bias=bias)
        self.context = (kernel_size - 1) * dilation

    def forward(self, x: torch.Tensor, batch: _Batch) -> torch.Tensor:  # [B, C, T] -> [B, C', T]
        if self.context:
            x = torch.cat([batch.past(self.slot, x.shape[1], self.context, x), x], dim=-1)
            batch.keep(self.slot, x[..., -self.context :])
        return self.conv(x)


class CausalConvTranspose1d(nn.Module):
    """ConvTranspose1d over a stream: each chunk's overlapping tail is added to the next chunk's head."""

    def __init__(self, slot: int, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        if kernel_size < stride:
            raise ValueError(f"transposed conv kernel {kernel_size} shorter than its stride {stride}")
        self.slot = slot
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias)
        self.tail = kernel_size - stride

    def forward(self, x: torch.Tensor, batch: _Batch) -> torch.Tensor:  # [B, C, T] -> [B, C', T * stride]
        conv = self.conv
        y = F.conv_transpose1d(x, conv.weight, None, conv.stride, groups=conv.groups)  # [B, C', T*s + tail]
        num_out = x.shape[-1] * conv.stride[0]
        if self.tail:
            y = torch.cat([y[..., : self.tail] + batch.past(self.slot, y.shape[1], self.tail, y), y[..., self.tail :]],
                          dim=-1)
            batch.keep(self.slot, y[..., num_out:])
        y = y[..., :num_out]
        return y if conv.bias is None else y + conv.bias[:, None]


class ResnetBlock(nn.Module):
    """SEANet residual unit: ELU, causal conv (kernel k, dilation d), ELU, 1x1 conv; plus the input."""

    def __init__(self, slots, dim: int, hidden: int, kernel_size: int, dilation: int, use_shortcut: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList([nn.ELU(), CausalConv1d(next(slots), dim, hidden, kernel_size, dilation),
                                    nn.ELU(), CausalConv1d(next(slots), hidden, dim, 1)])
        self.shortcut = CausalConv1d(next(slots), dim, dim, 1) if use_shortcut else None

    def forward(self, x: torch.Tensor, batch: _Batch) -> torch.Tensor:
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

    def forward(self, x: torch.Tensor, batch: _Batch) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x) if isinstance(layer, nn.ELU) else layer(x, batch)
        return x


class LayerScale(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class Attention(nn.Module):
    def __init__(self, config: dict, layer_index: int) -> None:
        super().__init__()
        hidden, bias = config["hidden_size"], config.get("attention_bias", False)
        self.num_heads, self.num_kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        self.head_dim = config.get("head_dim") or hidden // self.num_heads
        self.layer_index = layer_index
        self.window = config["sliding_window"]
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, batch: _Batch) -> torch.Tensor:
        """x: [B, T, hidden]; each row continues its own request's positions and keys."""
        num_rows, num_new, _ = x.shape
        q = self.q_proj(x).view(num_rows, num_new, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(num_rows, num_new, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(num_rows, num_new, self.num_kv_heads, self.head_dim)
        starts = torch.tensor([state.num_positions for state in batch.states])
        positions = (starts[:, None] + torch.arange(num_new)[None, :]).reshape(-1)  # [B*T]
        q, k = rotary(q.reshape(-1, self.num_heads, self.head_dim), k.reshape(-1, self.num_kv_heads, self.head_dim),
                      positions)
        q = q.view(num_rows, num_new, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(num_rows, num_new, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.transpose(1, 2)
        pasts = [state.keys.get(self.layer_index) for state in batch.states]
        kept = [0 if past is None else past.shape[1] for past in pasts]
        num_past = max(kept)
        if num_past:  # left-pad every row's kept keys to the longest
            k = torch.cat([self._padded(batch, "keys", kept, num_past, k), k], dim=2)
            v = torch.cat([self._padded(batch, "values", kept, num_past, v), v], dim=2)
        # key column j sits (num_past + i - j) positions before query i; it is visible if that distance is in
        # [0, window) and the column holds a real key of this row
        distance = num_past + torch.arange(num_new)[:, None] - torch.arange(num_past + num_new)[None, :]  # [T, K]
        visible = (distance >= 0) & (distance < self.window)
        is_real = torch.arange(num_past + num_new)[None, :] >= num_past - torch.tensor(kept)[:, None]  # [B, K]
        mask = visible[None] & is_real[:, None, :]  # [B, T, K]
        repeat = self.num_heads // self.num_kv_heads
        keys, values = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = torch.matmul(q, keys.transpose(2, 3)) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        out = torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), values)  # [B, H, T, D]
        num_keeps = [min(self.window - 1, num_kept + num_new) for num_kept in kept]
        batch.keep_kv(self.layer_index, [k[row, :, k.shape[2] - n :].clone() for row, n in enumerate(num_keeps)],
                      [v[row, :, v.shape[2] - n :].clone() for row, n in enumerate(num_keeps)])
        return self.o_proj(out.transpose(1, 2).reshape(num_rows, num_new, -1))

    def _padded(self, batch: _Batch, name: str, kept: list[int], num_past: int, like: torch.Tensor) -> torch.Tensor:
        rows = []
        for state, num_kept in zip(batch.states, kept, strict=True):
            row = getattr(state, name).get(self.layer_index)
            pad = like.new_zeros(self.num_kv_heads, num_past - num_kept, self.head_dim)
            rows.append(pad if row is None else torch.cat([pad, row], dim=1))
        return torch.stack(rows)


class MLP(nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        if config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"Mimi hidden_act {config['hidden_act']!r} is not supported (gelu is)")
        self.fc1 = nn.Linear(config["hidden_size"], config["intermediate_size"], bias=False)
        self.fc2 = nn.Linear(config["intermediate_size"], config["hidden_size"], bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerLayer(nn.Module):
    def __init__(self, config: dict, layer_index: int) -> None:
        super().__init__()
        hidden, eps = config["hidden_size"], config.get("norm_eps", 1e-5)
        self.self_attn = Attention(config, layer_index)
        self.mlp = MLP(config)
        self.input_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.self_attn_layer_scale = LayerScale(hidden)
        self.mlp_layer_scale = LayerScale(hidden)

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, batch: _Batch) -> torch.Tensor:
        x = x + self.self_attn_layer_scale(self.self_attn(self.input_layernorm(x), rotary, batch))
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        self.layers = nn.ModuleList([TransformerLayer(config, i) for i in range(config["num_hidden_layers"])])
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        self.rotary = RotaryEmbedding(head_dim, config.get("rope_theta", 10000.0), None)

    def forward(self, x: torch.Tensor, batch: _Batch) -> torch.Tensor:  # [B, T, hidden]
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


class MimiCodec:
    """Mimi codes -> 24 kHz PCM, batched across requests, each request's chunks continuing its own state."""

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
        weights = path / "model.safetensors"
        if config is None:
            config_path = path / "config.json"
            if not config_path.is_file():
                raise FileNotFoundError(f"Mimi codec file {config_path} is missing (a kyutai/mimi directory holds "
                                        "config.json and model.safetensors)")
            config = json.loads(config_path.read_text())
        files = sorted(path.glob("model-*.safetensors")) or [weights]
        if not all(file.is_file() for file in files):
            raise FileNotFoundError(f"Mimi codec weights {weights} are missing")
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            tensors.update({k[len(prefix) :]: v for k, v in load_file(str(file)).items() if k.startswith(prefix)})
        return cls(config, tensors)

    def new_state(self) -> MimiState:
        return MimiState()

    def decode(self, codes: list[torch.Tensor], states: list[MimiState]) -> list[torch.Tensor]:
        """Decode the next chunk of each request: codes [num_frames, num_codebooks] per request, each with its
        own state (a request appears at most once) -> float32 PCM [num_frames * 1920] per request.

        Chunks of the same length run as one batch."""
        if len(codes) != len(states) or len({id(state) for state in states}) != len(states):
            raise ValueError("decode needs one distinct state per chunk: a request's chunks go one call at a time")
        out: list[torch.Tensor | None] = [None] * len(codes)
        by_length: dict[int, list[int]] = {}
        for index, chunk in enumerate(codes):
            if chunk.dim() != 2 or chunk.shape[1] != self.num_codebooks:
                raise ValueError(f"Mimi codes must be [num_frames, {self.num_codebooks}], got {list(chunk.shape)}")
            by_length.setdefault(chunk.shape[0], []).append(index)
        for num_frames, indices in by_length.items():
            if num_frames == 0:
                for index in indices:
                    out[index] = torch.zeros(0)
                continue
            pcm = self._decode_batch(torch.stack([codes[i] for i in indices]), _Batch([states[i] for i in indices]))
            for row, index in enumerate(indices):
                out[index] = pcm[row]
        return out

    @torch.inference_mode()
    def _decode_batch(self, codes: torch.Tensor, batch: _Batch) -> torch.Tensor:  # [B, T, K] -> [B, T * 1920]
        codes = codes.long()
        semantic = sum(F.embedding(codes[..., i], self.codebooks[i]) for i in range(self.num_semantic))
        acoustic = sum(F.embedding(codes[..., i], self.codebooks[i]) for i in range(self.num_semantic,
                                                                                     self.num_codebooks))
        latent = semantic @ self.projections[0].T + acoustic @ self.projections[1].T  # [B, T, hidden]
        x = self.net.upsample(latent.transpose(1, 2).to(self.dtype), batch)  # [B, hidden, 2T]
        num_positions = x.shape[-1]
        x = self.net.decoder_transformer(x.transpose(1, 2), batch).transpose(1, 2)
        pcm = self.net.decoder(x, batch)[:, 0].float()
        batch.commit(num_positions)
        return pcm


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
    tensors = {}
    for name, shape in sorted(shapes.items()):
        if name.endswith("layer_scale.scale") or name.endswith("layernorm.weight"):
            tensors[name] = torch.ones(shape)
        elif name.endswith(".bias"):
            tensors[name] = torch.randn(shape, generator=generator) * 0.01
        else:
            fan_in = math.prod(shape[1:])
            tensors[name] = torch.randn(shape, generator=generator) * fan_in**-0.5
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
