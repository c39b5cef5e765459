"""Per-row sampling: parameters, seeds and repetition history stay with their own request."""

import torch

from streamvox.config import SamplingParams
from streamvox.runner.sampler import SamplingState, sample


def state(**params):
    return SamplingState(SamplingParams(seed=params.pop("seed", 0), **params))


def test_repetition_penalty_touches_only_its_own_row():
    logits = torch.tensor([[4.0, 3.9, 0.0, -1.0], [4.0, 3.9, 0.0, -1.0]])
    penalised = state(temperature=0.0, repetition_penalty=2.0)
    penalised.history = [0]
    clean = state(temperature=0.0)
    assert sample(logits.clone(), [penalised, clean]) == [1, 0]
    # the clean row alone gives the same token as inside the batch
    assert sample(logits[1:].clone(), [state(temperature=0.0)]) == [0]


def test_repetition_window_forgets_old_tokens():
    logits = torch.tensor([[4.0, 3.9, 0.0]])
    windowed = state(temperature=0.0, repetition_penalty=2.0, repetition_window=1)
    windowed.history = [0, 2]  # token 0 is outside the window of 1
    assert sample(logits, [windowed]) == [0]


def test_negative_logits_are_pushed_down_by_the_penalty():
    logits = torch.tensor([[-1.0, -1.5, -9.0]])
    penalised = state(temperature=0.0, repetition_penalty=2.0)
    penalised.history = [0]
    assert sample(logits, [penalised]) == [1]  # -1 * 2 = -2 < -1.5


def test_same_seed_same_tokens_and_batch_neighbours_do_not_matter():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    alone = [sample(logits[1:2], [s])[0] for s in [state(seed=42)] for _ in range(1)]
    a, b, c = state(seed=1), state(seed=42), state(seed=3, temperature=0.0)
    together = sample(logits, [a, b, c])
    assert together[1] == alone[0]
    runs = []
    for _ in range(2):
        s = state(seed=5)
        runs.append([sample(logits[:1], [s])[0] for _ in range(30)])
    assert runs[0] == runs[1]
    other = state(seed=6)
    assert [sample(logits[:1], [other])[0] for _ in range(30)] != runs[0]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    s = state(seed=11)
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[sample(probs.log()[None], [s])[0]] += 1
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
        s = state(seed=3, temperature=1.0, **params)
        seen = {sample(logits, [s])[0] for _ in range(300)}
        assert seen == allowed, params


def test_invalid_parameters_are_named():
    import pytest

    for bad, field in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                       (dict(max_tokens=0), "max_tokens"), (dict(min_p=1.5), "min_p")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**bad).validate()


def test_a_row_samples_the_same_alone_or_beside_rows_that_need_the_whole_vocabulary():
    # 5000 tokens, the top 1024 hold ~90 % of the mass: top_p=0.85 fits inside the candidates, top_p=1 does not
    torch.manual_seed(0)
    logits = torch.cat([torch.randn(1024) * 0.1 + 4.0, torch.randn(3976) * 0.1])[None]
    nucleus_row, full_row = state(seed=9, top_p=0.85), state(seed=9, top_p=0.85)
    forcing_row = state(seed=1, top_p=1.0)
    alone = [sample(logits.clone(), [nucleus_row])[0] for _ in range(300)]
    beside = [sample(torch.cat([logits, logits]), [full_row, forcing_row])[0] for _ in range(300)]
    assert alone == beside
    probs = logits[0].softmax(-1)
    order = probs.argsort(descending=True)
    nucleus_size = int((probs[order].cumsum(0) - probs[order] <= 0.85).sum())
    ranks = {int((order == t).nonzero()) for t in alone}
    assert max(ranks) < nucleus_size and max(ranks) > 0.9 * nucleus_size  # the cut is at the true 85 %


def test_a_last_bit_change_in_the_logits_almost_never_changes_the_pick():
    # Batching moves logits by ~1e-6; a seeded request must still pick the same tokens under load.
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, 4000, generator=generator) * 0.5
    noise = torch.randn(logits.shape, generator=generator) * 2e-5
    picks = [sample(logits[i:i + 1], [state(seed=i, temperature=0.6, top_p=0.8)]) for i in range(2000)]
    nudged = [sample((logits + noise)[i:i + 1], [state(seed=i, temperature=0.6, top_p=0.8)]) for i in range(2000)]
    assert sum(a != b for a, b in zip(picks, nudged, strict=True)) <= 2  # an inverse-CDF draw changed 87
