"""Per-row sampling: parameters, seeds and repetition history stay with their own request."""

import pytest
import torch

from streamvox.config import SamplingParams
from streamvox.runner.sampler import Sampler, _mix32


def new_sampler(vocab=50, capacity=2):
    return Sampler(vocab, torch.device("cpu"), capacity=capacity)


def open_state(sampler, history=(), **params):
    state = sampler.open(SamplingParams(seed=params.pop("seed", 0), **params))
    for token in history:  # as if it had drawn these
        commit(sampler, [state], torch.tensor([token]))
    return state


def alone(logits, **params):
    """One row sampled by a sampler of its own."""
    sampler = new_sampler(logits.shape[1])
    return sample(sampler, logits, [open_state(sampler, **params)])


def batch_of(sampler, states):
    return sampler.batch(states, [torch.tensor(a, dtype=torch.int64) for a in sampler.stage(states)])


def commit(sampler, states, tokens):
    sampler.commit(batch_of(sampler, states), tokens, tokens.tolist())


def sample(sampler, logits, states):
    """One step: draw a token per row, and let the draws stand."""
    batch = batch_of(sampler, states)
    tokens = sampler.sample(logits, batch)
    sampler.commit(batch, tokens, tokens.tolist())
    return tokens.tolist()


def test_repetition_penalty_touches_only_its_own_row():
    sampler = new_sampler(4)
    logits = torch.tensor([[4.0, 3.9, 0.0, -1.0], [4.0, 3.9, 0.0, -1.0]])
    penalised = open_state(sampler, [0], temperature=0.0, repetition_penalty=2.0)
    clean = open_state(sampler, temperature=0.0)
    assert sample(sampler, logits.clone(), [penalised, clean]) == [1, 0]
    # the clean row alone gives the same token as inside the batch
    assert alone(logits[1:].clone(), temperature=0.0) == [0]


def test_repetition_window_forgets_old_tokens():
    sampler = new_sampler(3)
    windowed = open_state(sampler, [0, 2], temperature=0.0, repetition_penalty=2.0, repetition_window=1)
    assert sample(sampler, torch.tensor([[4.0, 3.9, 0.0]]), [windowed]) == [0]  # 0 is outside the window of 1
    assert sample(sampler, torch.tensor([[4.0, 3.9, 0.0]]), [windowed]) == [1]  # now 0 is inside it


def test_negative_logits_are_pushed_down_by_the_penalty():
    sampler = new_sampler(3)
    penalised = open_state(sampler, [0], temperature=0.0, repetition_penalty=2.0)
    assert sample(sampler, torch.tensor([[-1.0, -1.5, -9.0]]), [penalised]) == [1]  # -1 * 2 = -2 < -1.5


def test_a_freed_slot_forgets_its_request():
    sampler = new_sampler(3, capacity=1)
    old = open_state(sampler, [0, 0, 0], temperature=0.0, repetition_penalty=2.0, repetition_window=2)
    sampler.close(old)
    fresh = open_state(sampler, temperature=0.0, repetition_penalty=2.0)
    assert fresh.slot == old.slot
    assert sample(sampler, torch.tensor([[4.0, 3.9, 0.0]]), [fresh]) == [0]  # no penalty, no stale count-down
    assert sample(sampler, torch.tensor([[4.0, 3.9, 0.0]]), [fresh]) == [1]


def test_tables_grow_past_their_first_capacity():
    sampler = new_sampler(50, capacity=1)
    states = [open_state(sampler, seed=i) for i in range(5)]
    assert sorted(s.slot for s in states) == [0, 1, 2, 3, 4]
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    together = sample(sampler, logits, states)
    assert together == [alone(logits[i:i + 1], seed=i)[0] for i in range(5)]


def test_same_seed_same_tokens_and_batch_neighbours_do_not_matter():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    by_itself = alone(logits[1:2], seed=42)
    sampler = new_sampler()
    together = sample(sampler, logits, [open_state(sampler, seed=1), open_state(sampler, seed=42),
                                        open_state(sampler, seed=3, temperature=0.0)])
    assert together[1] == by_itself[0]
    runs = []
    for _ in range(2):
        sampler = new_sampler()
        s = open_state(sampler, seed=5)
        runs.append([sample(sampler, logits[:1], [s])[0] for _ in range(30)])
    assert runs[0] == runs[1]
    sampler = new_sampler()
    other = open_state(sampler, seed=6)
    assert [sample(sampler, logits[:1], [other])[0] for _ in range(30)] != runs[0]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    sampler = new_sampler(4)
    s = open_state(sampler, seed=11)
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[sample(sampler, probs.log()[None], [s])[0]] += 1
    assert torch.allclose(counts / 4000, probs, atol=0.03)


def test_top_k_top_p_min_p_cut_the_tail():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    for params, allowed in [
        (dict(top_k=2), {0, 1}),
        (dict(top_p=0.5), {0}),
        (dict(top_p=0.8), {0, 1}),
        (dict(min_p=0.3), {0, 1}),
        (dict(top_k=2, top_p=0.7), {0}),  # top-p acts on the renormalised top-2 (0.73, 0.27), not on 0.64
        (dict(top_k=2, top_p=0.8), {0, 1}),
    ]:
        sampler = new_sampler(5)
        s = open_state(sampler, seed=3, temperature=1.0, **params)
        seen = {sample(sampler, logits, [s])[0] for _ in range(300)}
        assert seen == allowed, params


def test_invalid_parameters_are_named():
    for bad, field in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                       (dict(max_tokens=0), "max_tokens"), (dict(min_p=1.5), "min_p")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**bad).validate()


def test_a_row_samples_the_same_alone_or_beside_rows_that_need_the_whole_vocabulary():
    # 5000 tokens, the top 1024 hold ~90 % of the mass: top_p=0.85 fits inside the candidates, top_p=1 does not
    torch.manual_seed(0)
    logits = torch.cat([torch.randn(1024) * 0.1 + 4.0, torch.randn(3976) * 0.1])[None]
    alone_sampler, beside_sampler = new_sampler(5000), new_sampler(5000)
    nucleus_row = open_state(alone_sampler, seed=9, top_p=0.85)
    full_row, forcing_row = open_state(beside_sampler, seed=9, top_p=0.85), open_state(beside_sampler, seed=1)
    alone = [sample(alone_sampler, logits.clone(), [nucleus_row])[0] for _ in range(300)]
    beside = [sample(beside_sampler, torch.cat([logits, logits]), [full_row, forcing_row])[0] for _ in range(300)]
    assert alone == beside
    probs = logits[0].softmax(-1)
    order = probs.argsort(descending=True)
    nucleus_size = int((probs[order].cumsum(0) - probs[order] <= 0.85).sum())
    ranks = {int((order == t).nonzero()) for t in alone}
    assert max(ranks) < nucleus_size and max(ranks) > 0.9 * nucleus_size  # the cut is at the true 85 %


@pytest.mark.parametrize("spread", [2.5, 1.0, 0.3])  # nucleus within 64, within 512, past 4096 tokens
def test_the_cpu_draws_from_its_fewest_candidates_what_a_whole_sort_draws(spread):
    # The CPU filters the top 64 tokens when every row's filter fits in them, else 8x more, else all of them.
    torch.manual_seed(1)
    logits = torch.randn(4, 8000) * spread
    host, sorting = new_sampler(8000, 8), new_sampler(8000, 8)
    sorting.checks_on_host = False  # sorts vocabularies under 4096 whole; `exact` makes it sort this one too
    params = [dict(seed=i, temperature=1.0, top_p=0.8, min_p=0.01 * (i == 3), top_k=40 * (i == 2)) for i in range(4)]
    for _ in range(20):
        expected_states, states = [open_state(sorting, **p) for p in params], [open_state(host, **p) for p in params]
        batch = batch_of(sorting, expected_states)
        assert sample(host, logits.clone(), states) == sorting.sample(logits.clone(), batch, exact=True).tolist()
        logits = logits.roll(1, dims=1)


def test_a_last_bit_change_in_the_logits_almost_never_changes_the_pick():
    # Batching moves logits by ~1e-6; a seeded request must still pick the same tokens under load.
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, 4000, generator=generator) * 0.5
    noise = torch.randn(logits.shape, generator=generator) * 2e-5

    picks = [alone(logits[i:i + 1], seed=i, temperature=0.6, top_p=0.8) for i in range(2000)]
    nudged = [alone((logits + noise)[i:i + 1], seed=i, temperature=0.6, top_p=0.8) for i in range(2000)]
    assert sum(a != b for a, b in zip(picks, nudged, strict=True)) <= 2  # an inverse-CDF draw changed 87


# -- the incremental repetition state against the sampler that rebuilt it from the whole history each step --

def reference_sample(logits, params, histories):
    """The earlier sampler: penalty rebuilt from each history, filters and draw on the rows that sample."""
    penalised = [(i, p) for i, p in enumerate(params) if p.repetition_penalty != 1.0 and histories[i]]
    if penalised:
        seen = torch.zeros_like(logits, dtype=torch.bool)
        penalty = torch.ones(logits.shape[0], 1)
        for i, p in penalised:
            window = histories[i][-p.repetition_window:] if p.repetition_window else histories[i]
            seen[i, torch.tensor(window)] = True
            penalty[i] = p.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    tokens = logits.argmax(dim=-1).tolist()
    rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if rows:
        keys = [_step_key(params[i].seed, len(histories[i])) for i in rows]
        drawn = reference_filtered(logits[torch.tensor(rows)], [params[i] for i in rows], keys)
        for row, token in zip(rows, drawn, strict=True):
            tokens[row] = token
    return tokens


def reference_filtered(logits, params, keys):
    vocab = logits.shape[1]
    scaled = logits / torch.tensor([p.temperature for p in params])[:, None]
    top_k = torch.tensor([min(p.top_k or vocab, vocab) for p in params])[:, None]
    top_p = torch.tensor([p.top_p for p in params])[:, None]
    min_p = torch.tensor([p.min_p for p in params])[:, None]
    log_total = scaled.logsumexp(dim=-1, keepdim=True)
    sorted_logits, order = scaled.topk(min(1024, vocab), dim=-1)
    sorted_probs = (sorted_logits - log_total).exp()
    is_top_k_off = top_k >= vocab
    is_contained = (top_k <= sorted_probs.shape[1]) | (
        is_top_k_off & (top_p < 1.0) & (sorted_probs.sum(-1, keepdim=True) >= top_p))
    if not is_contained.all():
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        sorted_probs = (sorted_logits - log_total).exp()
    rank = torch.arange(sorted_probs.shape[1])[None, :]
    sorted_probs = sorted_probs.masked_fill(rank >= top_k, 0.0)
    sorted_probs = sorted_probs / torch.where(is_top_k_off, 1.0, sorted_probs.sum(dim=-1, keepdim=True))
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = (mass_before > top_p) | (sorted_probs < min_p * sorted_probs[:, :1])
    drop[:, 0] = False
    kept = sorted_probs.masked_fill(drop, 0.0)
    keys = torch.tensor(keys, dtype=torch.int64)[:, None]
    uniform = ((_mix32(_mix32(keys ^ order) ^ keys) >> 8).to(torch.float32) + 0.5) / 2**24
    return order.gather(1, (kept / -uniform.log()).argmax(dim=-1, keepdim=True))[:, 0].tolist()


def _step_key(seed, step):
    return _mix32(_mix32((seed ^ _mix32(seed >> 32)) & 0xFFFFFFFF) ^ step)


@pytest.mark.parametrize("vocab", [64, 3000])
def test_incremental_repetition_state_gives_the_earlier_samplers_tokens(vocab):
    params = [SamplingParams(seed=1, temperature=0.8, repetition_penalty=1.5),
              SamplingParams(seed=2, temperature=1.0, top_p=0.9, repetition_penalty=2.0, repetition_window=4),
              SamplingParams(seed=3, temperature=0.0, repetition_penalty=1.3, repetition_window=7),
              SamplingParams(seed=4, temperature=0.7, top_k=20, min_p=0.05),
              SamplingParams(seed=5, temperature=1.2, top_k=8, top_p=0.8, repetition_penalty=0.7,
                             repetition_window=3)]
    sampler = Sampler(vocab, torch.device("cpu"), capacity=2)
    states = [sampler.open(p) for p in params]
    histories: list[list[int]] = [[] for _ in params]
    generator = torch.Generator().manual_seed(vocab)
    ours, theirs = [], []
    for step in range(80):
        rows = [i for i in range(len(params)) if (step + i) % 4]  # requests come and go between steps
        logits = torch.randn(len(rows), vocab, generator=generator) * 2.0
        logits[:, :6] += 3.0  # a few likely tokens, so the penalties and windows decide often
        expected = reference_sample(logits.clone(), [params[i] for i in rows], [histories[i] for i in rows])
        got = sample(sampler, logits.clone(), [states[i] for i in rows])
        for i, token in zip(rows, expected, strict=True):
            histories[i].append(token)
        ours.append(got)
        theirs.append(expected)
    assert ours == theirs
    assert len({t for step in ours for t in step}) > 6  # the draws moved about


def test_the_gpu_way_of_sampling_gives_the_same_tokens():
    """On a GPU the sampler never looks at device values mid-step: small vocabularies are sorted whole, large ones
    filtered over the candidates with the rows that might reach past them flagged and drawn again exactly. Run that
    way on the CPU, it draws what the CPU way draws."""
    generator = torch.Generator().manual_seed(3)
    for vocab in (3000, 6000):
        logits = torch.randn(6, vocab, generator=generator)
        logits[:3, :1500] += 4.0  # rows 0-2: the top 1024 hold 91 % of the mass; rows 3-5 (flat): 56 %
        params = [dict(seed=i, temperature=0.9, top_p=0.95 if i % 2 else 0.6, repetition_penalty=1.2) for i in range(6)]
        host, device_like = new_sampler(vocab, 8), new_sampler(vocab, 8)
        device_like.checks_on_host = False
        for _ in range(5):
            expected = sample(host, logits.clone(), [open_state(host, **p) for p in params])
            states = [open_state(device_like, **p) for p in params]
            batch = batch_of(device_like, states)
            tokens = device_like.sample(logits.clone(), batch)
            flagged = None if batch.inexact is None else batch.inexact.nonzero()[:, 0].tolist()
            if flagged:
                tokens = device_like.sample(logits.clone(), batch, exact=True)
            assert tokens.tolist() == expected
            # a nucleus wider than the candidates (top-p 0.95 everywhere, 0.6 in the flat rows) is flagged
            assert flagged == (None if vocab <= 4096 else [1, 3, 4, 5])
