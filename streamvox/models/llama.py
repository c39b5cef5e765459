"""Llama decoder backbone over a paged KV cache. Parameter names match the Hugging Face checkpoint layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from streamvox.layers.attention import AttentionMetadata, paged_attention
from streamvox.layers.linear import Linear
from streamvox.layers.mlp import GatedMLP
from streamvox.layers.norm import RMSNorm
from streamvox.layers.rotary import RotaryEmbedding
from streamvox.models.params import load_checked


@dataclass(frozen=True)
class LlamaConfig:
    """The fields of a Llama config.json the backbone uses."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3)
    attention_bias: bool = False  # biases on the query, key and value projections (Qwen2)

    @classmethod
    def from_json(cls, config: dict) -> LlamaConfig:
        architectures = config.get("architectures") or []
        if "LlamaForCausalLM" not in architectures and config.get("model_type") != "llama":
            raise ValueError(
                f"expected a Llama checkpoint (architectures: LlamaForCausalLM), got architectures={architectures} "
                f"model_type={config.get('model_type')!r}"
            )
        return cls.from_fields(config)

    @classmethod
    def from_fields(cls, config: dict, what: str = "Llama", **overrides) -> LlamaConfig:
        """The Llama fields of any Llama-shaped config (a CSM backbone's or depth decoder's too); `overrides`
        replace fields."""
        try:
            heads = config["num_attention_heads"]
            fields = dict(
                vocab_size=config["vocab_size"],
                hidden_size=config["hidden_size"],
                intermediate_size=config["intermediate_size"],
                num_hidden_layers=config["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=config.get("num_key_value_heads", heads),
                head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                rms_norm_eps=config.get("rms_norm_eps", 1e-5),
                rope_theta=config.get("rope_theta", 10000.0),
                rope_scaling=config.get("rope_scaling"),
                tie_word_embeddings=config.get("tie_word_embeddings", False),
            )
        except KeyError as missing:
            raise ValueError(f"config.json lacks the {what} field {missing}") from None
        return cls(**{**fields, **overrides})


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, q_dim, kv_dim = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = Linear(hidden, q_dim, bias=config.attention_bias)
        self.k_proj = Linear(hidden, kv_dim, bias=config.attention_bias)
        self.v_proj = Linear(hidden, kv_dim, bias=config.attention_bias)
        self.o_proj = Linear(q_dim, hidden, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def project(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding):
        """x [T, hidden] -> q [T, heads, D], k and v [T, kv_heads, D], positioned."""
        tokens = x.shape[0]
        q = self.q_proj(x).view(tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(q, k, positions)
        return q, k, v

    def forward(self, x, positions, rotary, meta: AttentionMetadata, kv: tuple[torch.Tensor, torch.Tensor]):
        q, k, v = self.project(x, positions, rotary)
        out = paged_attention(q, k, v, kv[0], kv[1], meta, scale=self.head_dim**-0.5)
        return self.o_proj(out.reshape(x.shape[0], -1))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, positions, rotary, meta, kv):
        x = x + self.self_attn(self.input_layernorm(x), positions, rotary, meta, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)


class LlamaForCausalLM(nn.Module):
    """Backbone + LM head; `forward` runs a ragged batch, `compute_logits` only the rows that sample."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, meta: AttentionMetadata, kv_caches, embeds=None) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden]; `embeds` (index [K], vectors [K, hidden])
        replaces the input vectors of those tokens."""
        x = self.model.embed_tokens(input_ids)
        if embeds is not None:
            x = x.index_copy(0, embeds[0], embeds[1].to(x.dtype))
        for layer, kv in zip(self.model.layers, kv_caches, strict=True):
            x = layer(x, positions, self.model.rotary, meta, kv)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in fp32."""
        return self.lm_head(hidden).float()

    def load_weights(self, state_dict: dict[str, torch.Tensor], device: torch.device | str = "cpu",
                     dtype: torch.dtype | None = None) -> None:
        """Load a Hugging Face LlamaForCausalLM state dict; errors name the missing or unexpected tensors."""
        state_dict = {k: v for k, v in state_dict.items() if "rotary_emb" not in k}
        if self.config.tie_word_embeddings:  # one tensor under both names
            state_dict.pop("lm_head.weight", None)
            if "model.embed_tokens.weight" in state_dict:
                state_dict["lm_head.weight"] = state_dict["model.embed_tokens.weight"]
        load_checked(self, state_dict, "the Llama config", device, dtype)
