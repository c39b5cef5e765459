"""Per-request token sampling for a batch of logits rows.

Every row has its own parameters, its own torch.Generator and its own token history, so one request's
seed or history never changes another's result, and a row samples the same token alone or in any batch.
"""

from __future__ import annotations

import torch

from streamvox.config import SamplingParams


class SamplingState:
    """One request's sampling parameters, random stream and generated-token history."""

    def __init__(self, params: SamplingParams) -> None:
        assert params.seed is not None, "the engine resolves seeds before requests reach the runner"
        self.params = params
        self.generator = torch.Generator().manual_seed(params.seed)
        self.history: list[int] = []

    def penalised_ids(self) -> list[int]:
        window = self.params.repetition_window
        return self.history[-window:] if window else self.history


def sample(logits: torch.Tensor, states: list[SamplingState]) -> list[int]:
    """logits: [B, V] fp32, one row per state -> one token id per row. Appends to each state's history."""
    logits = _apply_repetition_penalty(logits, states)
    greedy = logits.argmax(dim=-1)  # [B]
    token_ids = greedy.tolist()
    sampled_rows = [i for i, state in enumerate(states) if not state.params.is_greedy]
    if sampled_rows:
        rows = torch.tensor(sampled_rows)
        probs = _filtered_probs(logits[rows], [states[i].params for i in sampled_rows])  # [S, V]
        # Exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. draws index i with probability p_i.
        race = torch.stack([torch.empty(probs.shape[1]).exponential_(generator=states[i].generator)
                            for i in sampled_rows])
        for row, token in zip(sampled_rows, (probs / race).argmax(dim=-1).tolist(), strict=True):
            token_ids[row] = token
    for state, token in zip(states, token_ids, strict=True):
        state.history.append(token)
    return token_ids


def _apply_repetition_penalty(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    penalised = [(i, s) for i, s in enumerate(states) if s.params.repetition_penalty != 1.0 and s.history]
    if not penalised:
        return logits
    rows = torch.cat([torch.full((len(s.penalised_ids()),), i) for i, s in penalised])
    cols = torch.cat([torch.tensor(s.penalised_ids()) for _, s in penalised])
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[rows, cols] = True  # each row marks only its own history
    penalty = torch.ones(logits.shape[0], 1)
    for i, s in penalised:
        penalty[i] = s.params.repetition_penalty
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p filtering, per row. [S, V] -> probabilities [S, V]."""
    vocab = logits.shape[1]
    temperature = torch.tensor([p.temperature for p in params])[:, None]
    top_k = torch.tensor([p.top_k or vocab for p in params])[:, None]
    top_p = torch.tensor([p.top_p for p in params])[:, None]
    min_p = torch.tensor([p.min_p for p in params])[:, None]
    sorted_logits, order = (logits / temperature).sort(dim=-1, descending=True)
    rank = torch.arange(vocab)[None, :]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k, float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = (mass_before > top_p) | (sorted_probs < min_p * sorted_probs[:, :1])
    drop[:, 0] = False  # the most likely token always survives
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    probs = torch.zeros_like(sorted_probs).scatter_(1, order, sorted_probs)
    return probs / probs.sum(dim=-1, keepdim=True)
