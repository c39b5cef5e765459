"""Per-request token sampling for a batch of logits rows, on the logits' device.

Every request has its own parameters, its own random stream and its own token history, so one request's seed
or history never changes another's result, and a row samples the same token alone or in any batch. The
parameters live in device tables indexed by the request's slot; the repetition penalty reads per-slot token
counts that each step updates incrementally (+1 for the drawn token, -1 for the one leaving the window), never
rebuilt from the history. The host keeps each history (for the window and the draw's key) from the ids the
runner copies back once per step.

The draw is an exponential race: every kept token gets its own uniform number, a hash of (seed, step, token
id), and the token with the largest p / -log(u) wins, which picks each token with probability p. A batch
changes float sums in the last bits; with an inverse-CDF draw those errors add up along the cumulative sum and
the ordering of near-equal logits, so a seeded request would pick another token now and then under load. With
the race a tiny error changes the pick only when the two best scores nearly tie, which is far rarer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from streamvox.config import SamplingParams
from streamvox.layers.hashing import fold32, uniform
from streamvox.layers.hashing import mix32 as _mix32

CANDIDATES = 1024  # filtering works on this many top tokens when no row's filter can reach past them
CPU_LIKELY = 4.0  # the CPU first looks at the tokens this many times likelier than average (at least
CPU_MIN_CANDIDATES = 16  # this many), then at 8 times more until every row's filter fits
SMALL_VOCAB = 4096  # on a GPU, rows up to this long are sorted whole: one fast kernel, nothing to check


class SamplingState:
    """One request's sampling parameters, its slot in the sampler's tables, and the tokens it drew so far."""

    def __init__(self, params: SamplingParams, slot: int) -> None:
        assert params.seed is not None, "the engine resolves seeds before requests reach the runner"
        self.params = params
        self.slot = slot
        self.history: list[int] = []

    def step_key(self, ahead: int = 0) -> int:
        """The 32-bit key of the draw `ahead` steps after the next one: the seed and the tokens sampled by then."""
        seed = self.params.seed
        return _mix32(_mix32(fold32(seed)) ^ (len(self.history) + ahead))


@dataclass
class SampleBatch:
    """The rows one step samples: host facts, and their staged slots and keys on the device."""

    states: list[SamplingState]
    slots: torch.Tensor  # [S] int64
    keys: torch.Tensor  # [S] int64: each row's step key
    extra_keys: torch.Tensor  # [S] int64: the key the depth loop's draws derive from (the step after)
    is_all_greedy: bool
    has_greedy: bool
    has_penalty: bool  # some row's repetition penalty is not 1
    fits_candidates: bool  # every sampling row keeps at most CANDIDATES tokens by its top-k alone
    needs_whole_vocab: bool  # some sampling row has no top-k within the candidates and no top-p: sort it all
    # GPU, large vocabularies: [S] bool, rows whose draw from the candidates may differ from the whole vocabulary's
    # (set by `sample`; the runner copies it back with the tokens and, if any is set, samples again with `exact`)
    inexact: torch.Tensor | None = None
    # each row's (floats [S, 4], top_k [S]) already gathered from the tables (a captured graph's static copy);
    # None: read the tables at `slots`
    params: tuple[torch.Tensor, torch.Tensor] | None = None


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, capacity: int = 16) -> None:
        self.vocab_size = vocab_size
        self.device = device
        # the CPU may look at device values mid-step at no cost; a GPU would wait (tests may turn this off on a CPU)
        self.checks_on_host = device.type == "cpu"
        self._free: list[int] = []
        self._pending: list[tuple[int, int]] = []  # (slot, token) leaving a window: counted down next step
        self._one = torch.ones((), dtype=torch.int32, device=device)
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        old = getattr(self, "floats", None)
        floats = torch.zeros(capacity, 4, device=self.device)  # temperature, top_p, min_p, repetition_penalty
        top_k = torch.zeros(capacity, dtype=torch.int64, device=self.device)
        counts = torch.zeros(capacity, self.vocab_size, dtype=torch.int32, device=self.device)  # in the window
        if old is not None:
            floats[: len(old)], top_k[: len(old)], counts[: len(old)] = old, self.top_k, self.counts
        self._free += range(capacity - 1, -1 if old is None else len(old) - 1, -1)  # lowest first
        self.floats, self.top_k, self.counts = floats, top_k, counts

    def open(self, params: SamplingParams) -> SamplingState:
        """A slot for a new request, its parameters written to the tables (one small copy each)."""
        if not self._free:
            self._grow(2 * len(self.top_k))
        slot = self._free.pop()
        values = [params.temperature, params.top_p, params.min_p, params.repetition_penalty]
        self.floats[slot] = torch.tensor(values, dtype=torch.float32)
        self.top_k[slot] = min(params.top_k or self.vocab_size, self.vocab_size)
        self.counts[slot].zero_()
        return SamplingState(params, slot)

    def close(self, state: SamplingState) -> None:
        self._pending = [(slot, token) for slot, token in self._pending if slot != state.slot]
        self._free.append(state.slot)

    def stage(self, states: list[SamplingState]) -> list[list[int]]:
        """Host arrays of one step's sampled rows, for the runner to copy to the device with its metadata."""
        pending, self._pending = self._pending, []
        return [[s.slot for s in states], [s.step_key() for s in states], [s.step_key(1) for s in states],
                [slot for slot, _ in pending], [token for _, token in pending]]

    def batch(self, states: list[SamplingState], staged: list[torch.Tensor]) -> SampleBatch:
        """The step's rows from the tensors `stage` made (in order); leaving tokens are counted down now."""
        slots, keys, extra_keys, leaving_slots, leaving_tokens = staged
        if leaving_slots.numel():
            self.counts.index_put_((leaving_slots, leaving_tokens), -self._one, accumulate=True)
        params = [s.params for s in states]
        sampling = [p for p in params if not p.is_greedy]
        fits = all(0 < p.top_k <= CANDIDATES for p in sampling) or self.vocab_size <= CANDIDATES
        whole = any(not 0 < p.top_k <= CANDIDATES and p.top_p >= 1.0 for p in sampling)
        return SampleBatch(states, slots, keys, extra_keys, not sampling, len(sampling) < len(params),
                           any(p.repetition_penalty != 1.0 for p in params), fits, whole)

    def params(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampling parameters of the rows at `slots`: floats [S, 4] (temperature, top_p, min_p, repetition
        penalty) and top_k [S]."""
        return self.floats.index_select(0, slots), self.top_k.index_select(0, slots)

    def sample(self, logits: torch.Tensor, batch: SampleBatch, exact: bool = False) -> torch.Tensor:
        """logits [S, V] fp32, one row per state -> token ids [S] int64 on the device (histories are unchanged
        until `commit`). `exact`: filter over the whole vocabulary, never over the candidates alone."""
        if batch.has_penalty:
            seen = self.counts.index_select(0, batch.slots) > 0  # [S, V]: each row's own window
            penalty = self.floats[:, 3].index_select(0, batch.slots)[:, None]
            scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(seen, scaled, logits)
        tokens, batch.inexact = self._pick(logits, batch, batch.keys, exact)
        return tokens

    def sample_extra(self, logits: torch.Tensor, batch: SampleBatch, index: int) -> torch.Tensor:
        """Draw the `index`-th extra token of each row's current step (a depth decoder's codebooks): same filters,
        no repetition penalty, a key of its own. logits: [S, V] fp32 -> [S] int64."""
        tokens, inexact = self._pick(logits, batch, _mix32(batch.extra_keys ^ _mix32(index + 1)), exact=False)
        assert inexact is None, "extra draws come from vocabularies a GPU sorts whole"
        return tokens

    def commit(self, batch: SampleBatch, tokens: torch.Tensor, token_ids: list[int]) -> None:
        """The step's draws stand: `tokens` [S] (device) and `token_ids` (the same, on the host) join the
        histories and the counts."""
        self.counts.index_put_((batch.slots, tokens), self._one, accumulate=True)
        for state, token in zip(batch.states, token_ids, strict=True):
            state.history.append(token)
            window = state.params.repetition_window
            if window and len(state.history) > window:
                self._pending.append((state.slot, state.history[-window - 1]))

    def _pick(self, logits: torch.Tensor, batch: SampleBatch, keys: torch.Tensor,
              exact: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids [S], and the rows that need an exact redo (GPU only; None when none can)."""
        if batch.is_all_greedy:
            return logits.argmax(dim=-1), None
        floats, top_k = batch.params or self.params(batch.slots)  # [S, 4], [S]
        is_greedy = floats[:, 0] == 0.0
        temperature = torch.where(is_greedy, 1.0, floats[:, 0])  # greedy rows draw too, and are overruled
        vocab = logits.shape[1]
        if self.checks_on_host:
            mode = "check"  # look at the nucleus on the spot
        elif vocab <= SMALL_VOCAB or exact or batch.needs_whole_vocab:
            mode = "whole"
        else:
            mode = "candidates" if batch.fits_candidates else "flag"
        drawn, inexact = _sample_filtered(logits, temperature, top_k, floats[:, 1], floats[:, 2], keys, is_greedy,
                                          mode)
        return (torch.where(is_greedy, logits.argmax(dim=-1), drawn) if batch.has_greedy else drawn), inexact


def _sample_filtered(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                     min_p: torch.Tensor, keys: torch.Tensor, is_greedy: torch.Tensor,
                     mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Temperature, then top-k, top-p and min-p (each row its own), then one draw per row keyed by `keys`.
    logits: [S, V]; the per-row parameters [S] -> token ids [S], and for mode "flag" the rows whose filter may
    keep tokens beyond the candidates ([S] bool; else None).

    Filtering the CANDIDATES most likely tokens alone is exact only if a row keeps no token beyond them: a top-k
    inside them, or no top-k and a top-p whose nucleus they already cover. Modes: "candidates" (the top-k
    guarantees it), "whole" (sort every token), "check" (CPU: look for the nucleus among the tokens CPU_LIKELY
    times likelier than average, then among 8 times more until it fits, sorting everything last), "flag" (GPU: use
    the candidates and report the rows to redo, since looking would wait for the device). A full sort of a
    vocabulary this large is one slow kernel a row on a GPU; on a CPU even the top 1024 of 8k tokens cost a tenth
    of a small step."""
    vocab = logits.shape[1]
    scaled = logits / temperature[:, None]
    top_k, top_p, min_p = top_k[:, None], top_p[:, None], min_p[:, None]  # [S, 1]
    log_total = scaled.logsumexp(dim=-1, keepdim=True)
    sorted_probs, order, inexact = _candidates(scaled, log_total, top_k, top_p, is_greedy, mode)
    rank = torch.arange(sorted_probs.shape[1], device=logits.device)[None, :]
    sorted_probs = sorted_probs.masked_fill(rank >= top_k, 0.0)
    # top-p sees the distribution left by top-k; with top-k off that is the whole (already normalised) one,
    # which the candidates alone do not sum to
    top_k_mass = torch.where(top_k >= vocab, 1.0, sorted_probs.sum(dim=-1, keepdim=True))
    sorted_probs = sorted_probs / top_k_mass
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = (mass_before > top_p) | (sorted_probs < min_p * sorted_probs[:, :1])  # top-k cut is zero already
    drop[:, 0] = False  # the most likely token always survives
    kept = sorted_probs.masked_fill(drop, 0.0)
    keys = keys[:, None]
    draws = uniform(_mix32(keys ^ order) ^ keys)  # (0, 1), per token id
    position = (kept / -draws.log()).argmax(dim=-1, keepdim=True)
    return order.gather(1, position)[:, 0], inexact


def _candidates(scaled: torch.Tensor, log_total: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                is_greedy: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The most likely tokens of each row that `mode` filters over (see `_sample_filtered`): their true
    probabilities [S, K] (descending), their ids [S, K], and for "flag" the rows that may reach past them."""
    vocab = scaled.shape[1]
    if mode == "check":
        likely = int((scaled >= log_total + math.log(CPU_LIKELY / vocab)).sum(dim=-1).max())
        num_candidates = max(CPU_MIN_CANDIDATES, likely)
    else:
        num_candidates = vocab if mode == "whole" else CANDIDATES
    while True:
        if num_candidates >= vocab:
            sorted_logits, order = scaled.sort(dim=-1, descending=True)
        else:
            sorted_logits, order = scaled.topk(num_candidates, dim=-1)  # [S, K], descending
        sorted_probs = (sorted_logits - log_total).exp()
        if mode not in ("check", "flag") or num_candidates >= vocab:
            return sorted_probs, order, None
        is_contained = (top_k <= num_candidates) | (
            (top_k >= vocab) & (top_p < 1.0) & (sorted_probs.sum(-1, keepdim=True) > top_p)
        ) | is_greedy[:, None]
        if mode == "flag":
            return sorted_probs, order, ~is_contained[:, 0]
        if bool(is_contained.all()):
            return sorted_probs, order, None
        num_candidates *= 8
