"""Per-request token sampling for a batch of logits rows.

Every row has its own parameters, its own random stream and its own token history, so one request's seed or
history never changes another's result, and a row samples the same token alone or in any batch.

The draw is an exponential race: every kept token gets its own uniform number, a hash of (seed, step, token
id), and the token with the largest p / -log(u) wins, which picks each token with probability p. A batch
changes float sums in the last bits; with an inverse-CDF draw those errors add up along the cumulative sum and
the ordering of near-equal logits, so a seeded request would pick another token now and then under load. With
the race a tiny error changes the pick only when the two best scores nearly tie, which is far rarer.
"""

from __future__ import annotations

import torch

from streamvox.config import SamplingParams


class SamplingState:
    """One request's sampling parameters, random stream and generated-token history."""

    def __init__(self, params: SamplingParams) -> None:
        assert params.seed is not None, "the engine resolves seeds before requests reach the runner"
        self.params = params
        self.history: list[int] = []

    def step_key(self) -> int:
        """The 32-bit key of this request's next draw: its seed and how many tokens it has sampled."""
        seed = self.params.seed
        return _mix32(_mix32((seed ^ _mix32(seed >> 32)) & _MASK32) ^ len(self.history))

    def penalised_ids(self) -> list[int]:
        window = self.params.repetition_window
        return self.history[-window:] if window else self.history


def sample(logits: torch.Tensor, states: list[SamplingState]) -> list[int]:
    """logits: [B, V] fp32, one row per state -> one token id per row. Appends to each state's history."""
    logits = _apply_repetition_penalty(logits, states)
    token_ids = logits.argmax(dim=-1).tolist()  # greedy rows keep these
    _draw_sampled_rows(logits, states, [s.step_key() for s in states], token_ids)
    for state, token in zip(states, token_ids, strict=True):
        state.history.append(token)
    return token_ids


def sample_extra(logits: torch.Tensor, states: list[SamplingState], index: int) -> list[int]:
    """Draw the `index`-th extra token of each row's current step (a depth decoder's codebooks): same filters,
    no repetition penalty, a key of its own, and no change to the history. logits: [B, V] fp32."""
    token_ids = logits.argmax(dim=-1).tolist()
    _draw_sampled_rows(logits, states, [_mix32(s.step_key() ^ _mix32(index + 1)) for s in states], token_ids)
    return token_ids


def _draw_sampled_rows(logits: torch.Tensor, states: list[SamplingState], keys: list[int],
                       token_ids: list[int]) -> None:
    """Replace the greedy picks in `token_ids` by draws for the rows that sample."""
    sampled_rows = [i for i, state in enumerate(states) if not state.params.is_greedy]
    if sampled_rows:
        rows = torch.tensor(sampled_rows)
        sampled = _sample_filtered(logits[rows], [states[i].params for i in sampled_rows],
                                   [keys[i] for i in sampled_rows])
        for row, token in zip(sampled_rows, sampled, strict=True):
            token_ids[row] = token


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


CANDIDATES = 1024  # filtering works on this many top tokens when no row's filter can reach past them


def _sample_filtered(logits: torch.Tensor, params: list[SamplingParams], keys: list[int]) -> list[int]:
    """Temperature, then top-k, top-p and min-p (each row its own), then one draw per row keyed by `keys`.
    logits: [S, V]."""
    vocab = logits.shape[1]
    scaled = logits / torch.tensor([p.temperature for p in params])[:, None]
    top_k = torch.tensor([min(p.top_k or vocab, vocab) for p in params])[:, None]  # [S, 1]
    top_p = torch.tensor([p.top_p for p in params])[:, None]
    min_p = torch.tensor([p.min_p for p in params])[:, None]
    log_total = scaled.logsumexp(dim=-1, keepdim=True)
    sorted_logits, order = scaled.topk(min(CANDIDATES, vocab), dim=-1)  # [S, K], descending
    sorted_probs = (sorted_logits - log_total).exp()  # true probabilities of the candidates
    # Filtering the candidates alone is exact only if a row keeps no token beyond them: a top-k inside them, or
    # no top-k and a top-p whose nucleus they already cover. Otherwise every row is filtered over the vocabulary.
    is_top_k_off = top_k >= vocab
    is_contained = (top_k <= sorted_probs.shape[1]) | (
        is_top_k_off & (top_p < 1.0) & (sorted_probs.sum(-1, keepdim=True) >= top_p)
    )
    if not is_contained.all():
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        sorted_probs = (sorted_logits - log_total).exp()
    rank = torch.arange(sorted_probs.shape[1])[None, :]
    sorted_probs = sorted_probs.masked_fill(rank >= top_k, 0.0)
    # top-p sees the distribution left by top-k; with top-k off that is the whole (already normalised) one,
    # which the candidates alone do not sum to
    top_k_mass = torch.where(is_top_k_off, 1.0, sorted_probs.sum(dim=-1, keepdim=True))
    sorted_probs = sorted_probs / top_k_mass
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = (mass_before > top_p) | (sorted_probs < min_p * sorted_probs[:, :1])  # top-k cut is zero already
    drop[:, 0] = False  # the most likely token always survives
    kept = sorted_probs.masked_fill(drop, 0.0)
    keys = torch.tensor(keys, dtype=torch.int64)[:, None]
    uniform = ((_mix32(_mix32(keys ^ order) ^ keys) >> 8).to(torch.float32) + 0.5) / 2**24  # (0, 1), per token id
    position = (kept / -uniform.log()).argmax(dim=-1, keepdim=True)
    return order.gather(1, position)[:, 0].tolist()


_MASK32 = 0xFFFFFFFF


def _mix32(x):
    """A 32-bit integer hash (xor-shift-multiply rounds) of an int or int64 tensor holding values below 2**32.

    The multiplier is under 2**27, so products stay inside int64."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)
