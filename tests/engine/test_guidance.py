"""Rows per request (classifier-free guidance) and prompt input vectors, through the real engine on the tiny
Orpheus: guided logits are the weighted mix of each row's own logits, every row keeps its own KV, and input
vectors stand in for ids exactly."""

import pytest
import torch

from streamvox.batch import NewRequest, ScheduledRow, StepBatch
from streamvox.config import SamplingParams
from streamvox.models.base import Guidance, Prepared

TEXT = "Guidance mixes two rows of the same request."
UNCOND = "A different prompt for the other row, same length?"
STEPS = 14  # two frames


def greedy(steps: int = STEPS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=steps, seed=0, ignore_eos=True)


def _prompts(model) -> tuple[list[int], list[int]]:
    cond, uncond = model.prepare(TEXT, "tara"), model.prepare(UNCOND, "tara")
    size = min(len(cond), len(uncond))
    return cond[:size], uncond[:size]


def _tokens(engine, prepared: Prepared, steps: int = STEPS) -> list[int]:
    return list(engine.result(engine.submit_prepared(prepared, greedy(steps))).step_tokens)


def _greedy_mixed(model, engine, cond, uncond, weight) -> list[int]:
    """The reference: two unguided requests stepped by hand, their last logits mixed, the argmax fed to both."""
    runner, pool = engine.lm_runner, engine.pool
    prompts = {"c": cond, "u": uncond}
    tables = {name: tuple(pool.allocate(pool.blocks_for(len(cond) + STEPS))) for name in prompts}
    runner.execute(StepBatch(tuple(NewRequest(name, tuple(prompt), greedy(), 0) for name, prompt in prompts.items()),
                             (), ()))
    tokens = []
    with torch.inference_mode():
        logits = {name: runner.logits(ScheduledRow(name, 0, len(prompt), tables[name], True))[-1]
                  for name, prompt in prompts.items()}
        for step in range(STEPS):
            tokens.append(int(((1 + weight) * logits["c"] - weight * logits["u"]).argmax()))
            for name in prompts:
                runner.requests[name].unfed.append(tokens[-1])
                runner.requests[name].feed(model)
                row = ScheduledRow(name, len(cond) + step, 1, tables[name], True)
                logits[name] = runner.logits(row)[-1]
    return tokens


@pytest.mark.parametrize("weight", [0.0, 0.7])
def test_guided_greedy_tokens_are_the_mix_of_each_rows_logits(tiny_model, make_engine, weight):
    cond, uncond = _prompts(tiny_model)
    expected = _greedy_mixed(tiny_model, make_engine(), cond, uncond, weight)
    guided = _tokens(make_engine(), Prepared(cond, guidance=Guidance((uncond,), (-weight,))))
    assert guided == expected
    plain = _tokens(make_engine(), Prepared(cond))
    assert (plain == guided) == (weight == 0.0)  # with weight 0 the other row has no say


def test_guided_rows_take_their_own_blocks_and_give_them_all_back(tiny_model, make_engine):
    cond, uncond = _prompts(tiny_model)
    engine = make_engine(num_blocks=64)
    free = engine.pool.num_free_blocks
    request_id = engine.submit_prepared(Prepared(cond, guidance=Guidance((uncond,), (-0.5,))), greedy(70))
    engine.step()
    held = free - engine.pool.num_free_blocks
    assert held >= 2 * engine.pool.blocks_for(len(cond) + 1) and held % 2 == 0
    result = engine.result(request_id)
    assert len(result.step_tokens) == 70 and engine.pool.num_free_blocks == free


def test_guided_and_plain_requests_batch_without_touching_each_other(tiny_model, make_engine):
    cond, uncond = _prompts(tiny_model)
    guided = Prepared(cond, guidance=Guidance((uncond,), (-0.7,)))
    alone = [_tokens(make_engine(), guided), _tokens(make_engine(), Prepared(uncond))]
    engine = make_engine()
    ids = [engine.submit_prepared(guided, greedy()), engine.submit_prepared(Prepared(uncond), greedy())]
    assert [list(engine.result(i).step_tokens) for i in ids] == alone


def test_prompt_vectors_equal_to_the_embedding_change_nothing_and_others_do(tiny_model, make_engine):
    cond, _ = _prompts(tiny_model)
    table = tiny_model.backbone.model.embed_tokens.weight.detach()
    same = table[torch.tensor(cond[:6])].clone()  # the first 6 positions' own vectors
    plain = _tokens(make_engine(), Prepared(cond))
    assert _tokens(make_engine(), Prepared(cond, prompt_embeds=same)) == plain
    assert _tokens(make_engine(), Prepared(cond, prompt_embeds=-3.0 * same)) != plain
