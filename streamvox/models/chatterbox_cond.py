"""Chatterbox (ResembleAI/chatterbox) T3 input side: the conditioning encoder, the learned positions, and the exact
input embeddings the publisher's ``T3.inference`` feeds its Llama backbone.

Module and parameter names are the publisher's keys in ``t3_cfg.safetensors`` (``cond_enc.*``, ``text_emb``,
``speech_emb``, ``text_pos_emb.emb``, ``speech_pos_emb.emb``), so ``T3Embeddings`` loads the matching subset of that
file strictly (``t3_embedding_state``). The backbone (``tfmr.*``, HF LlamaModel names) and the heads (``text_head``,
``speech_head``, no bias) are left to the model.

What one request's prefill is (``T3.prepare_input_embeds`` + the extra start-of-speech the inference loop appends),
for the conditioned row and, with classifier-free guidance, the unconditioned row:

    [ cond (P rows) | text (T rows) | SOS @ position 0 | SOS @ position 0 ]        -> [rows, P + T + 2, hidden]

- cond = [spkr_enc(speaker_emb) | perceiver(speech_emb(prompt) + speech_pos(0..N-1)) | emotion_adv_fc(exaggeration)]
  (P = 1 + 32 + 1 with the publisher's weights; P = 2 without prompt tokens). Both CFG rows get the same cond.
- text = text_emb(ids) + text_pos(0..T-1), ids = [255] + tokens + [0]; the unconditioned row's text_emb is zeroed
  but its position embeddings are still added.
- SOS = speech_emb(6561) + speech_pos(0): once from prepare_input_embeds, once more from the inference loop.
- Decode: the token sampled at step i (0-based) enters as speech_emb(token) + speech_pos(i + 1), in both rows.
- Logits: speech_head(tfmr(...).last_hidden_state[:, -1]); guided = cond + w * (cond - uncond) (``cfg_combine``).
  The publisher's loop needs w > 0 (with w = 0 its batch shapes do not match); one conditioned row is the w = 0 case.

API:

    T3EmbeddingConfig(hidden_size=1024, text_vocab=704, speech_vocab=8194, text_positions=2050,
                      speech_positions=4100, speaker_embed_size=256, perceiver_queries=32, perceiver_heads=4)
        .from_state_dict(state) -> T3EmbeddingConfig            sizes read from t3_cfg tensors (heads: 4, fixed)
    T3Embeddings(config): cond_enc, text_emb, speech_emb, text_pos_emb, speech_pos_emb
        .from_state_dict(state) -> T3Embeddings                 strict load of t3_embedding_state(state), eval mode
        .conditioning(speaker_emb, prompt_speech_tokens, emotion_adv) -> [P, hidden]
        .prefill(cond [P, hidden], text_ids [T], cfg=True) -> [2 | 1, P + T + 2, hidden]
        .speech_input(tokens [B] | int, step) -> [B, hidden]     token generated at decode step `step`
    conditioning_embeddings(cond_modules, speaker_emb [256], prompt_speech_tokens [<=150] | None, emotion_adv: float,
                            speech_emb, speech_pos_emb) -> [P, hidden]
    text_embeddings(text_emb, text_pos_emb, text_ids [T], is_uncond: bool) -> [T, hidden]
    speech_embedding(speech_emb, speech_pos_emb, tokens [B] | int, position: int) -> [B, hidden]
    prefill_embeddings(cond, text_emb, text_pos_emb, speech_emb, speech_pos_emb, text_ids, cfg=True)
        -> [2 | 1, P + T + 2, hidden]
    cfg_combine(cond_logits, uncond_logits, weight) -> cond + weight * (cond - uncond)
    t3_embedding_state(state) -> the cond_enc / embedding / position tensors of a t3_cfg state dict
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

START_TEXT_TOKEN = 255
STOP_TEXT_TOKEN = 0
START_SPEECH_TOKEN = 6561
STOP_SPEECH_TOKEN = 6562
SPEECH_COND_PROMPT_LEN = 150  # the publisher cuts prompt speech tokens to this many (6 s at 25 Hz)
EMBEDDING_PREFIXES = ("cond_enc.", "text_emb.", "speech_emb.", "text_pos_emb.", "speech_pos_emb.")


@dataclass(frozen=True)
class T3EmbeddingConfig:
    """Sizes of T3's input side (defaults: the publisher's English model)."""

    hidden_size: int = 1024
    text_vocab: int = 704
    speech_vocab: int = 8194
    text_positions: int = 2048 + 2  # max_text_tokens + start/stop
    speech_positions: int = 4096 + 4  # max_speech_tokens + 2 + 2
    speaker_embed_size: int = 256
    perceiver_queries: int = 32
    perceiver_heads: int = 4  # not recorded in the weights; the publisher's Perceiver default

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], perceiver_heads: int = 4) -> T3EmbeddingConfig:
        """Read the sizes off t3_cfg.safetensors' tensors."""
        query = state["cond_enc.perceiver.pre_attention_query"]  # [1, queries, hidden]
        return cls(
            hidden_size=query.shape[2], text_vocab=state["text_emb.weight"].shape[0],
            speech_vocab=state["speech_emb.weight"].shape[0],
            text_positions=state["text_pos_emb.emb.weight"].shape[0],
            speech_positions=state["speech_pos_emb.emb.weight"].shape[0],
            speaker_embed_size=state["cond_enc.spkr_enc.weight"].shape[1], perceiver_queries=query.shape[1],
            perceiver_heads=perceiver_heads,
        )

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ---------------------------------------------------------------------------------------------------------------
# Modules (publisher's names)
# ---------------------------------------------------------------------------------------------------------------


class PerceiverAttention(nn.Module):
    """Pre-norm multi-head attention with a residual: x + proj_out(attn(q(norm x), k(norm ctx), v(norm ctx)))."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"perceiver width {channels} is not divisible by {heads} heads")
        self.heads = heads
        self.norm = nn.LayerNorm(channels)  # shared by queries and context
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.proj_out = nn.Linear(channels, channels)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, C] -> [B, heads, L, C / heads]
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, Lq, C], context [B, Lk, C] -> [B, Lq, C]."""
        xn, cn = self.norm(x), self.norm(context)
        q, k, v = self._split(self.to_q(xn)), self._split(self.to_k(cn)), self._split(self.to_v(cn))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1 / sqrt(head_dim), no mask
        return x + self.proj_out(out.transpose(1, 2).flatten(2))


class PerceiverResampler(nn.Module):
    """Learned queries cross-attend to the prompt, then attend to themselves (same block): [B, N, C] -> [B, Q, C]."""

    def __init__(self, queries: int, channels: int, heads: int) -> None:
        super().__init__()
        self.pre_attention_query = nn.Parameter(torch.zeros(1, queries, channels))
        self.attn = PerceiverAttention(channels, heads)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        query = self.pre_attention_query.expand(h.shape[0], -1, -1)
        resampled = self.attn(query, h)
        return self.attn(resampled, resampled)


class T3CondEncoder(nn.Module):
    """``cond_enc``: speaker projection, Perceiver over the prompt speech embeddings, exaggeration projection."""

    def __init__(self, config: T3EmbeddingConfig) -> None:
        super().__init__()
        self.spkr_enc = nn.Linear(config.speaker_embed_size, config.hidden_size)
        self.emotion_adv_fc = nn.Linear(1, config.hidden_size, bias=False)
        self.perceiver = PerceiverResampler(config.perceiver_queries, config.hidden_size, config.perceiver_heads)


class LearnedPositions(nn.Module):
    """``*_pos_emb``: a learned table of absolute positions (``emb.weight`` [positions, hidden])."""

    def __init__(self, positions: int, hidden: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(positions, hidden)

    def forward(self, positions: torch.Tensor | int) -> torch.Tensor:
        """Position indices (any shape, or an int: checked) -> [..., hidden]."""
        if not isinstance(positions, torch.Tensor) and not 0 <= int(positions) < self.emb.num_embeddings:
            raise ValueError(f"position {positions} is out of range for a table of {self.emb.num_embeddings}")
        return self.emb(torch.as_tensor(positions, dtype=torch.long, device=self.emb.weight.device))

    def first(self, length: int) -> torch.Tensor:
        """Positions 0..length-1 -> [length, hidden]."""
        return self(torch.arange(length, device=self.emb.weight.device))


class T3Embeddings(nn.Module):
    """T3's input side under the publisher's names; see the module docstring for what each method builds."""

    def __init__(self, config: T3EmbeddingConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or T3EmbeddingConfig()
        self.cond_enc = T3CondEncoder(config)
        self.text_emb = nn.Embedding(config.text_vocab, config.hidden_size)
        self.speech_emb = nn.Embedding(config.speech_vocab, config.hidden_size)
        self.text_pos_emb = LearnedPositions(config.text_positions, config.hidden_size)
        self.speech_pos_emb = LearnedPositions(config.speech_positions, config.hidden_size)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> T3Embeddings:
        """From a whole t3_cfg state dict (other keys ignored): built at its sizes, loaded strictly, eval mode."""
        model = cls(T3EmbeddingConfig.from_state_dict(state))
        model.load_state_dict(t3_embedding_state(state), strict=True)
        return model.eval()

    def conditioning(self, speaker_emb: torch.Tensor, prompt_speech_tokens: torch.Tensor | None,
                     emotion_adv: float) -> torch.Tensor:
        return conditioning_embeddings(self.cond_enc, speaker_emb, prompt_speech_tokens, emotion_adv,
                                       self.speech_emb, self.speech_pos_emb)

    def prefill(self, cond: torch.Tensor, text_ids, cfg: bool = True) -> torch.Tensor:
        return prefill_embeddings(cond, self.text_emb, self.text_pos_emb, self.speech_emb, self.speech_pos_emb,
                                  text_ids, cfg)

    def speech_input(self, tokens, step: int) -> torch.Tensor:
        """The token sampled at decode step `step` (0-based) -> [B, hidden] (position step + 1)."""
        return speech_embedding(self.speech_emb, self.speech_pos_emb, tokens, step + 1)


def t3_embedding_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a t3_cfg state dict that ``T3Embeddings`` holds (cond_enc, embeddings, positions)."""
    return {name: tensor for name, tensor in state.items() if name.startswith(EMBEDDING_PREFIXES)}


# ---------------------------------------------------------------------------------------------------------------
# Embedding functions
# ---------------------------------------------------------------------------------------------------------------


def _token_ids(ids, vocab: int, what: str, device: torch.device, check: bool = True) -> torch.Tensor:
    """list / tensor of token ids -> [N] long on device; ValueError when not 1-D or (check) out of range."""
    index = torch.as_tensor(ids, dtype=torch.long, device=device)
    if index.dim() == 2 and index.shape[0] == 1:
        index = index[0]
    if index.dim() != 1:
        raise ValueError(f"{what} must be a 1-D sequence of ids, got shape {tuple(index.shape)}")
    if check and index.numel() and (int(index.min()) < 0 or int(index.max()) >= vocab):
        raise ValueError(f"{what} must lie in [0, {vocab}), got {int(index.min())}..{int(index.max())}")
    return index


def conditioning_embeddings(cond_modules: T3CondEncoder, speaker_emb: torch.Tensor,
                            prompt_speech_tokens: torch.Tensor | None, emotion_adv: float,
                            speech_emb: nn.Embedding, speech_pos_emb: LearnedPositions) -> torch.Tensor:
    """One request's conditioning rows (= ``T3.prepare_conditioning(T3Cond(...))[0]``) -> [P, hidden].

    speaker_emb: [256] (or [1, 256]) voice-encoder embedding; prompt_speech_tokens: [N <= 150] S3 tokens (< 6561)
    or None (then P = 2); emotion_adv: the exaggeration (0.5 is neutral).
    """
    weight = cond_modules.spkr_enc.weight  # [hidden, 256]
    speaker = torch.as_tensor(speaker_emb, device=weight.device).to(weight.dtype).reshape(-1)
    if speaker.shape[0] != weight.shape[1]:
        raise ValueError(f"speaker_emb must have {weight.shape[1]} values, got {speaker.shape[0]}")
    parts = [cond_modules.spkr_enc(speaker)[None]]  # [1, hidden]
    if prompt_speech_tokens is not None:
        tokens = _token_ids(prompt_speech_tokens, START_SPEECH_TOKEN, "prompt_speech_tokens", weight.device)
        if not 0 < tokens.shape[0] <= SPEECH_COND_PROMPT_LEN:
            raise ValueError(f"prompt_speech_tokens must hold 1..{SPEECH_COND_PROMPT_LEN} tokens, got "
                             f"{tokens.shape[0]}; cut the prompt to its first {SPEECH_COND_PROMPT_LEN} (6 s)")
        prompt = speech_emb(tokens) + speech_pos_emb.first(tokens.shape[0])  # [N, hidden]
        parts.append(cond_modules.perceiver(prompt[None])[0])  # [Q, hidden]
    adv = torch.full((1, 1), float(emotion_adv), dtype=weight.dtype, device=weight.device)
    parts.append(cond_modules.emotion_adv_fc(adv))  # [1, hidden]
    return torch.cat(parts, dim=0)


def text_embeddings(text_emb: nn.Embedding, text_pos_emb: LearnedPositions, text_ids,
                    is_uncond: bool) -> torch.Tensor:
    """[T] text ids (with start/stop) -> [T, hidden]: token embedding (zeros for the CFG unconditioned row) plus
    the position embedding of 0..T-1 (added in both rows)."""
    ids = _token_ids(text_ids, text_emb.num_embeddings, "text_ids", text_emb.weight.device)
    tokens = text_emb(ids)
    if is_uncond:
        tokens = torch.zeros_like(tokens)
    return tokens + text_pos_emb.first(ids.shape[0])


def speech_embedding(speech_emb: nn.Embedding, speech_pos_emb: LearnedPositions, tokens,
                     position: int) -> torch.Tensor:
    """Speech tokens [B] (or one int) at one position -> [B, hidden]: speech_emb(token) + speech_pos(position).

    The start-of-speech token sits at position 0; the token sampled at decode step i enters at position i + 1.
    Python ids are range-checked; a tensor is trusted (no device sync on the decode path).
    """
    trusted = isinstance(tokens, torch.Tensor)
    ids = _token_ids(torch.as_tensor(tokens).reshape(-1), speech_emb.num_embeddings, "speech tokens",
                     speech_emb.weight.device, check=not trusted)
    return speech_emb(ids) + speech_pos_emb(position)[None]


def prefill_embeddings(cond: torch.Tensor, text_emb: nn.Embedding, text_pos_emb: LearnedPositions,
                       speech_emb: nn.Embedding, speech_pos_emb: LearnedPositions, text_ids,
                       cfg: bool = True) -> torch.Tensor:
    """The whole prefill of ``T3.inference``: [cond | text | SOS@0 | SOS@0] -> [2, P + T + 2, hidden] with CFG
    (row 0 conditioned, row 1 with zeroed text embeddings), [1, P + T + 2, hidden] without."""
    sos = speech_embedding(speech_emb, speech_pos_emb, START_SPEECH_TOKEN, 0)  # [1, hidden]
    rows = []
    for uncond in (False, True) if cfg else (False,):
        text = text_embeddings(text_emb, text_pos_emb, text_ids, is_uncond=uncond)  # [T, hidden]
        rows.append(torch.cat([cond.to(text.dtype), text, sos, sos], dim=0))
    return torch.stack(rows)


def cfg_combine(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, weight: float) -> torch.Tensor:
    """Classifier-free guidance as the publisher combines the two rows: cond + weight * (cond - uncond)."""
    return cond_logits + weight * (cond_logits - uncond_logits)
