"""The depth loop of multi-codebook families: a small transformer that completes a frame from the backbone's
hidden state and its codebook 0, one codebook at a time, for every sampled request of a step at once.

Positions: 0 holds the backbone's last hidden state, k (k >= 1) the embedding of codebook k - 1; the output at
position k draws codebook k. Every row is at the same position, so keys and values are one dense
[rows, kv_heads, num_codebooks, head_dim] tensor per layer and no paging is needed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from streamvox.models.base import ExtraSampler
from streamvox.models.llama import LlamaConfig


class DepthDecoder(nn.Module):
    """A family's depth transformer: `model` holds `layers` (Llama layers), `norm` and `rotary`; the family
    says how codebooks are embedded, projected in and read out."""

    config: LlamaConfig
    num_codebooks: int
    model: nn.Module

    def embed_code(self, index: int, codes: torch.Tensor) -> torch.Tensor:
        """Input embedding [S, input_dim] of codebook `index` (0 .. num_codebooks - 2)."""
        raise NotImplementedError

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """[N, input_dim] (backbone width) -> [N, hidden]."""
        raise NotImplementedError

    def code_logits(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [S, vocab] of codebook `index` (1 .. num_codebooks - 1) from its position's hidden state."""
        raise NotImplementedError

    def generate(self, hidden: torch.Tensor, first: torch.Tensor, sample: ExtraSampler,
                 allowed: int) -> torch.Tensor:
        """hidden [S, backbone_hidden], first (codebook 0) [S] -> codes [S, num_codebooks], all on the device (the
        loop never waits for the host). Codebook k is drawn by sample(logits, k) among ids below `allowed`."""
        config, rows = self.config, hidden.shape[0]
        shape = (config.num_hidden_layers, rows, config.num_key_value_heads, self.num_codebooks, config.head_dim)
        keys, values = hidden.new_empty(shape), hidden.new_empty(shape)
        x = torch.stack([hidden, self.embed_code(0, first)], dim=1)  # positions 0 and 1
        codes = [first]
        for k in range(1, self.num_codebooks):
            out = self._run(x, 0 if k == 1 else k, keys, values)[:, -1]  # [S, hidden] at position k
            logits = self.code_logits(k, out).float()
            logits[:, allowed:] = float("-inf")
            codes.append(sample(logits, k))
            if k + 1 < self.num_codebooks:
                x = self.embed_code(k, codes[-1])[:, None]
        return torch.stack(codes, dim=1)

    def _run(self, x: torch.Tensor, start: int, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """x: [S, T, input_dim] at positions [start, start + T) -> normed hidden [S, T, hidden]."""
        model, config = self.model, self.config
        rows, num_new, _ = x.shape
        h = self.project(x.reshape(rows * num_new, -1))  # [S*T, hidden]
        positions = torch.arange(start, start + num_new, device=x.device).repeat(rows)
        end = start + num_new
        for index, layer in enumerate(model.layers):
            attn = layer.self_attn
            q, k, v = attn.project(layer.input_layernorm(h), positions, model.rotary)
            keys[index, :, :, start:end] = k.view(rows, num_new, -1, config.head_dim).transpose(1, 2)
            values[index, :, :, start:end] = v.view(rows, num_new, -1, config.head_dim).transpose(1, 2)
            q = q.view(rows, num_new, -1, config.head_dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, keys[index, :, :, :end], values[index, :, :, :end],
                                                 is_causal=num_new > 1, enable_gqa=True)
            h = h + attn.o_proj(out.transpose(1, 2).reshape(rows * num_new, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return model.norm(h).view(rows, num_new, -1)
