"""CosyVoice2's token encoder (`UpsampleConformerEncoder`), batched with per-row lengths and streaming flags.

Embedded speech tokens [B, N, D_in] -> linear + LayerNorm, scaled by sqrt(D) -> pre-lookahead layer (each token
sees the next `lookahead` tokens, zeros past a row's last token) -> conformer layers (relative-position attention,
pre-norm, SiLU feed-forward; no macaron, no convolution module) -> upsample x stride in time (nearest, causal conv)
-> linear + LayerNorm, scaled -> 4 more conformer layers -> LayerNorm. Parameter names follow the publisher's
checkpoint (`encoder.` prefix of flow.pt).

A row encodes `num_encoded[b]` of its `num_tokens[b]` tokens: fewer when the last ones are lookahead context only
(a streaming chunk that is not final). Attention keys stop at each row's encoded length; a streaming row also
attends only to keys up to the end of its query's chunk (`static_chunk_size` tokens, times `stride` after the
upsampling), the static-chunk mask CosyVoice trains with. With `encode_lookahead=True` (Chatterbox's S3Gen, whose
flow drops the lookahead frames after its encoder) a row's lookahead tokens are encoded like the others, keys of
every layer included, and only their output frames are dropped.

API: `UpsampleConformerEncoder(...)(xs, num_tokens, num_encoded, streaming) -> [B, stride * max(num_encoded), D]`,
and `attention_mask(valid, streaming, chunk)`, shared with the flow decoder.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def lengths_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """[B] lengths -> [B, size] bool, True where the position is inside its row."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def attention_mask(valid: torch.Tensor, streaming: torch.Tensor, chunk: int) -> torch.Tensor:
    """Keys a query may attend to: [B, T, T] bool from valid [B, T] and streaming [B] bool. Every row masks keys
    past its length; a streaming row also masks keys past the end of the query's chunk (when chunk > 0)."""
    keys = valid[:, None, :]  # [B, 1, T]
    if chunk <= 0:
        return keys.expand(-1, valid.shape[1], -1)
    pos = torch.arange(valid.shape[1], device=valid.device)
    in_chunk = pos[None, :] < (pos[:, None] // chunk + 1) * chunk  # [T, T] key j visible from query i
    return keys & (in_chunk[None] | ~streaming[:, None, None])


def rel_position_table(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """ESPnet relative positional encoding: [2 * length - 1, dim] fp32, row k encodes the distance length-1-k
    (query minus key), sin in even and cos in odd channels."""
    pos = torch.arange(length, dtype=torch.float32, device=device)[:, None]  # [T, 1]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / dim))

    def encode(angle: torch.Tensor) -> torch.Tensor:  # [T, dim / 2] -> [T, dim]
        return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1)

    ahead = encode(pos * freq).flip(0)  # distances T-1 .. 0
    behind = encode(-1 * pos * freq)[1:]  # distances -1 .. -(T-1)
    return torch.cat([ahead, behind])


class LinearEmbed(nn.Module):
    """x -> LayerNorm(W x + b) * sqrt(dim): the 'linear' input layer with the ESPnet rel-pos scaling."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(in_dim, dim), nn.LayerNorm(dim, eps=1e-5))
        self.scale = math.sqrt(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, in_dim] -> [B, T, dim]
        return self.out(x) * self.scale


class RelPositionAttention(nn.Module):
    """Transformer-XL attention: score(i, j) = ((q_i + u) . k_j + (q_i + v) . W_pos r_{i-j}) / sqrt(d_head)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, self.head_dim))

    def forward(self, x: torch.Tensor, table: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], table [2T-1, D] (rel_position_table), allowed [B, T, T] bool -> [B, T, D]."""
        B, T, D = x.shape
        q = self.linear_q(x).view(B, T, self.heads, self.head_dim)  # [B, T, H, d]
        k, v = (lin(x).view(B, T, self.heads, self.head_dim).transpose(1, 2) for lin in (self.linear_k, self.linear_v))
        p = self.linear_pos(table).view(2 * T - 1, self.heads, self.head_dim).transpose(0, 1)  # [H, 2T-1, d]
        content = (q + self.pos_bias_u).transpose(1, 2) @ k.transpose(-2, -1)  # [B, H, T, T]
        by_distance = (q + self.pos_bias_v).transpose(1, 2) @ p.transpose(-2, -1)  # [B, H, T, 2T-1]
        pos = torch.arange(T, device=x.device)
        column = (T - 1) - pos[:, None] + pos[None, :]  # [T, T] table row of distance i - j
        position = by_distance.gather(-1, column.expand(B, self.heads, T, T))
        scores = (content + position) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v  # [B, H, T, d]
        return self.linear_out(out.transpose(1, 2).reshape(B, T, D))


class PositionwiseFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.w_2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Pre-norm block: x + MHA(LN(x)), then x + FFN(LN(x)) (LayerNorm eps 1e-12 as published)."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.self_attn = RelPositionAttention(dim, heads)
        self.feed_forward = PositionwiseFeedForward(dim, hidden)
        self.norm_mha = nn.LayerNorm(dim, eps=1e-12)
        self.norm_ff = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor, table: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), table, allowed)
        return x + self.feed_forward(self.norm_ff(x))


class PreLookaheadLayer(nn.Module):
    """x + conv2(leaky_relu(conv1(x))): conv1 reads tokens t .. t+lookahead (zeros past the end), conv2 is causal
    with kernel 3. Rows must be zero past their last token."""

    def __init__(self, dim: int, lookahead: int) -> None:
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(dim, dim, lookahead + 1)
        self.conv2 = nn.Conv1d(dim, dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, D] -> [B, N, D]
        h = F.leaky_relu(self.conv1(F.pad(x.transpose(1, 2), (0, self.lookahead))))
        h = self.conv2(F.pad(h, (2, 0)))
        return x + h.transpose(1, 2)


class Upsample(nn.Module):
    """Repeat each frame `stride` times, then a causal conv of kernel 2 * stride + 1."""

    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(dim, dim, 2 * stride + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, stride * T, D]
        h = x.transpose(1, 2).repeat_interleave(self.stride, dim=2)
        return self.conv(F.pad(h, (2 * self.stride, 0))).transpose(1, 2)


class UpsampleConformerEncoder(nn.Module):
    def __init__(self, input_size: int, output_size: int, attention_heads: int, linear_units: int, num_blocks: int,
                 static_chunk_size: int, lookahead: int = 3, stride: int = 2, num_up_blocks: int = 4,
                 encode_lookahead: bool = False) -> None:
        super().__init__()
        self.output_size, self.static_chunk_size, self.stride = output_size, static_chunk_size, stride
        self.encode_lookahead = encode_lookahead
        layer_args = (output_size, attention_heads, linear_units)
        self.embed = LinearEmbed(input_size, output_size)
        self.pre_lookahead_layer = PreLookaheadLayer(output_size, lookahead)
        self.encoders = nn.ModuleList(ConformerLayer(*layer_args) for _ in range(num_blocks))
        self.up_layer = Upsample(output_size, stride)
        self.up_embed = LinearEmbed(output_size, output_size)
        self.up_encoders = nn.ModuleList(ConformerLayer(*layer_args) for _ in range(num_up_blocks))
        self.after_norm = nn.LayerNorm(output_size, eps=1e-5)

    def forward(self, xs: torch.Tensor, num_tokens: list[int], num_encoded: list[int],
                streaming: torch.Tensor) -> torch.Tensor:
        """xs [B, N, input_size] embedded tokens (row b real for its first num_tokens[b]); row b encodes its first
        num_encoded[b] <= num_tokens[b] tokens, the rest are lookahead context; streaming [B] bool.
        -> [B, stride * T, output_size], T = max(num_encoded); row b is valid for stride * num_encoded[b] frames."""
        device, size = xs.device, max(num_encoded)
        tokens = torch.tensor(num_tokens, device=device)
        attended = tokens if self.encode_lookahead else torch.tensor(num_encoded, device=device)
        span = max(num_tokens) if self.encode_lookahead else size  # tokens the layers run over
        x = self.embed(xs) * lengths_mask(tokens, xs.shape[1])[..., None]  # [B, N, D], zeros past each row's end
        x = self.pre_lookahead_layer(x)[:, :span]  # [B, span, D]
        x = self._layers(self.encoders, x, lengths_mask(attended, span), streaming, self.static_chunk_size)
        x = self.up_embed(self.up_layer(x))  # [B, stride * span, D]
        valid = lengths_mask(attended * self.stride, self.stride * span)
        x = self._layers(self.up_encoders, x, valid, streaming, self.static_chunk_size * self.stride)
        return self.after_norm(x[:, :self.stride * size])

    @staticmethod
    def _layers(layers: nn.ModuleList, x: torch.Tensor, valid: torch.Tensor, streaming: torch.Tensor,
                chunk: int) -> torch.Tensor:  # x [B, T, D], valid [B, T] bool
        table = rel_position_table(x.shape[1], x.shape[2], x.device).to(x.dtype)  # [2T-1, D]
        allowed = attention_mask(valid, streaming, chunk)  # [B, T, T]
        for layer in layers:
            x = layer(x, table, allowed)
        return x
