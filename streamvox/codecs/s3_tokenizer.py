"""The S3 speech tokenizer v2 (CosyVoice2's `speech_tokenizer_v2_25hz`) in plain PyTorch: 16 kHz audio -> 25 Hz
speech tokens in [0, 6561).

The computation of s3tokenizer's `S3TokenizerV2.quantize` (model_v2.py), which Chatterbox's S3Gen subclasses
(`chatterbox.models.s3tokenizer.S3Tokenizer`, weights under `tokenizer.` in s3gen.safetensors):

    log-mel [B, 128, T] (Whisper's, 100 Hz) -> GELU(conv3 stride 2) -> GELU(conv3 stride 2)     # [B, T/4, D]
    -> n_layer pre-norm blocks: x + Attn(LN(x)) + FSMN(v), x + MLP(LN(x))   (rotary positions, padding masked)
    -> FSQ: 8 projections, tanh, rounded to {-1, 0, 1}, read as a base-3 number   -> tokens [B, T/4]

Attention scales q and k by head_dim^-1/4 each and rotates them with a 64-channel rotary table (rotate-half
layout, base 10000); the FSMN memory is a depthwise conv (kernel 31, centred) over the masked values plus those
values. Parameter names are the publisher's (`encoder.blocks.N.attn.query`, `quantizer._codebook.project_down`,
...); `_mel_filters` [128, 201] and `window` [400], which Chatterbox keeps as buffers, are persistent here too.

API
    S3TokenizerV2(n_mels=128, n_state=1280, n_head=20, n_layer=6)      S3_TOKENIZER_PARAMS / TINY_S3_TOKENIZER_PARAMS
    tokenizer.log_mel(pcm16 [S]) -> [n_mels, S // 160]                  with the module's own filters and window
    tokenizer.quantize(mel [B, n_mels, T], mel_len [B]) -> (tokens [B, ceil(T / 4)] int64, lengths [B] int64)
    tokenizer.tokenize(pcm16 [S]) -> tokens [ceil((S // 160) / 4)] int64
Clips up to 30 s (3000 mel frames); the publisher's sliding window for longer ones is not implemented.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from streamvox.codecs.cosyvoice_frontend import SPEECH_SAMPLE_RATE, slaney_mel_filters, whisper_log_mel

S3_TOKENIZER_PARAMS = {"n_mels": 128, "n_state": 1280, "n_head": 20, "n_layer": 6}
TINY_S3_TOKENIZER_PARAMS = {"n_mels": 128, "n_state": 128, "n_head": 2, "n_layer": 2}
ROTARY_DIM = 64  # the publisher's rotary table is built for 64 channels whatever the head size
FSMN_KERNEL = 31
FSQ_DIM, FSQ_LEVELS = 8, 3
MAX_MEL_FRAMES = 3000  # 30 s
_MASKED = -1.0e10  # the publisher's additive bias for padded keys


def rotary_cos_sin(length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, 64] of angle t * 10000^(-2i/64), the 32 frequencies repeated twice (rotate-half)."""
    freq = 1.0 / (10000.0 ** (torch.arange(0, ROTARY_DIM, 2, device=device)[: ROTARY_DIM // 2].float() / ROTARY_DIM))
    angle = torch.outer(torch.arange(length, device=device).float(), freq)  # [T, 32]
    angle = torch.cat([angle, angle], dim=-1)
    return angle.cos(), angle.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, d] -> x cos + rotate_half(x) sin, cos/sin [T, d]."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[None, :, None] + turned * sin[None, :, None]


class FsmnAttention(nn.Module):
    """Self-attention with rotary q/k plus an FSMN memory over v (names as the publisher's FSMNMultiHeadAttention)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.fsmn_block = nn.Conv1d(dim, dim, FSMN_KERNEL, groups=dim, bias=False)

    def _memory(self, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """v [B, T, D], valid [B, T, 1] float -> (v + depthwise_conv(v)) on valid frames."""
        v = v * valid
        left = (FSMN_KERNEL - 1) // 2
        h = self.fsmn_block(F.pad(v.transpose(1, 2), (left, FSMN_KERNEL - 1 - left))).transpose(1, 2)
        return (h + v) * valid

    def forward(self, x: torch.Tensor, bias: torch.Tensor, valid: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], bias [B, 1, 1, T] (0 or -1e10 per key), valid [B, T, 1] -> [B, T, D]."""
        B, T, D = x.shape
        q, k, v = (lin(x).view(B, T, self.heads, -1) for lin in (self.query, self.key, self.value))
        scale = (D // self.heads) ** -0.25
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        memory = self._memory(v.reshape(B, T, D), valid)
        scores = (q.permute(0, 2, 1, 3) * scale) @ (k.permute(0, 2, 3, 1) * scale) + bias  # [B, H, T, T]
        mixed = torch.softmax(scores.float(), dim=-1) @ v.permute(0, 2, 1, 3)  # [B, H, T, d]
        return self.out(mixed.permute(0, 2, 1, 3).flatten(2)) + memory


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = FsmnAttention(dim, heads)
        self.attn_ln = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.mlp_ln = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, valid: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x), bias, valid, cos, sin)
        return x + self.mlp(self.mlp_ln(x))


def _strided_length(length: torch.Tensor | int) -> torch.Tensor | int:
    """Frames after a kernel-3, stride-2, padding-1 conv: ceil(length / 2)."""
    return (length - 1) // 2 + 1


class AudioEncoder(nn.Module):
    def __init__(self, n_mels: int, n_state: int, n_head: int, n_layer: int) -> None:
        super().__init__()
        if n_state // n_head != ROTARY_DIM:
            raise ValueError(f"head size must be {ROTARY_DIM} (the rotary table's), got {n_state // n_head}")
        self.conv1 = nn.Conv1d(n_mels, n_state, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList(Block(n_state, n_head) for _ in range(n_layer))

    def forward(self, mel: torch.Tensor, mel_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, n_mels, T], mel_len [B] -> (hidden [B, ceil(T / 4), D], lengths [B])."""
        x, length = mel, mel_len
        for conv in (self.conv1, self.conv2):
            valid = torch.arange(x.shape[2], device=x.device)[None, :] < length[:, None]  # [B, T]
            x = F.gelu(conv(x * valid[:, None].to(x.dtype)))
            length = _strided_length(length)
        T = x.shape[2]
        valid = torch.arange(T, device=x.device)[None, :] < length[:, None]  # [B, T']
        bias = (1.0 - valid.to(x.dtype)) * _MASKED
        cos, sin = rotary_cos_sin(T, x.device)
        x = x.transpose(1, 2)  # [B, T', D]
        for block in self.blocks:
            x = block(x, bias[:, None, None, :], valid[..., None].to(x.dtype), cos, sin)
        return x, length


class FsqCodebook(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.project_down = nn.Linear(dim, FSQ_DIM)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, T] int64 codes: sum_i 3^i (round(0.999 tanh(W h)_i) + 1)."""
        digits = (torch.tanh(self.project_down(hidden).float()) * 0.9990000128746033).round() + 1  # [B, T, 8]
        powers = FSQ_LEVELS ** torch.arange(FSQ_DIM, device=hidden.device, dtype=digits.dtype)
        return (digits * powers).sum(dim=-1).long()


class Quantizer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self._codebook = FsqCodebook(dim)


class S3TokenizerV2(nn.Module):
    def __init__(self, n_mels: int = 128, n_state: int = 1280, n_head: int = 20, n_layer: int = 6) -> None:
        super().__init__()
        self.encoder = AudioEncoder(n_mels, n_state, n_head, n_layer)
        self.quantizer = Quantizer(n_state)
        filters, window = torch.empty(n_mels, 201), torch.empty(400)  # on the default device (meta: left empty)
        if not filters.is_meta:
            filters, window = slaney_mel_filters(SPEECH_SAMPLE_RATE, 400, n_mels), torch.hann_window(400)
        self.register_buffer("_mel_filters", filters)  # [n_mels, 201], librosa's Slaney filters
        self.register_buffer("window", window)  # [400] periodic Hann

    @torch.inference_mode()
    def log_mel(self, pcm16: torch.Tensor) -> torch.Tensor:
        """[S] at 16 kHz -> [n_mels, S // 160]: Whisper's log-mel with this module's filters and window."""
        return whisper_log_mel(pcm16, self._mel_filters.shape[0], filters=self._mel_filters, window=self.window)

    @torch.inference_mode()
    def quantize(self, mel: torch.Tensor, mel_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, n_mels, T] (zeros past each row's length), mel_len [B] -> (tokens [B, T'], lengths [B])."""
        if int(mel_len.max()) > MAX_MEL_FRAMES:
            raise ValueError(f"clips longer than 30 s ({MAX_MEL_FRAMES} mel frames) are not supported")
        hidden, lengths = self.encoder(mel.to(self.window.dtype), mel_len.to(mel.device))
        return self.quantizer._codebook(hidden), lengths.long()

    @torch.inference_mode()
    def tokenize(self, pcm16: torch.Tensor) -> torch.Tensor:
        """[S] at 16 kHz -> [T'] int64 tokens (25 Hz)."""
        mel = self.log_mel(pcm16.to(self.window.device))  # [n_mels, T]
        tokens, _ = self.quantize(mel[None], torch.tensor([mel.shape[1]], device=mel.device))
        return tokens[0]
