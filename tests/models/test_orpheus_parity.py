"""The backbone matches transformers' LlamaForCausalLM on the same checkpoint directory."""

import pytest
import torch
import transformers

from streamvox.config import SamplingParams


@pytest.fixture(scope="module")
def reference(tiny_dir):
    return transformers.LlamaForCausalLM.from_pretrained(tiny_dir, torch_dtype=torch.float32).eval()


def test_logits_match_transformers(tiny_model, reference, make_engine):
    prompt = tiny_model.prepare("Parity check: the same numbers, please.", "leo")
    engine = make_engine(block_size=4)  # several blocks per request: exercises the block tables
    from streamvox.batch import NewRequest, ScheduledRow, StepBatch

    sampling = SamplingParams(temperature=0.0, seed=0)
    runner = engine.lm_runner
    blocks = tuple(engine.pool.allocate(engine.pool.blocks_for(len(prompt) + 1)))
    runner.execute(StepBatch((NewRequest("p", tuple(prompt), sampling, 0),),
                             (ScheduledRow("p", 0, len(prompt), blocks, True),), ()))

    def last_logits(row):  # our paged forward of one scheduled row -> logits of its last position
        return runner.logits(row)[-1]

    with torch.inference_mode():
        prefill = (last_logits(ScheduledRow("p", 0, len(prompt), blocks, True)),
                   reference(torch.tensor([prompt])).logits[0, -1])
        next_token = runner.requests["p"].inputs[-1]
        decode = (last_logits(ScheduledRow("p", len(prompt), 1, blocks, True)),
                  reference(torch.tensor([prompt + [next_token]])).logits[0, -1])
    for ours, ref in (prefill, decode):
        relative = ((ours - ref).abs().max() / ref.abs().max()).item()
        assert relative <= 1e-4, relative
        assert ref.std() > 0.5  # logits are spread: the comparison is not of near-constant vectors


def test_64_step_greedy_stream_matches_transformers_generate(tiny_model, reference, make_engine):
    engine = make_engine()
    text = "A sixty four step greedy run."
    sampling = SamplingParams(temperature=0.0, max_tokens=64, seed=0, ignore_eos=True)
    ours = engine.result(engine.submit(text, "tara", sampling)).step_tokens
    prompt = torch.tensor([tiny_model.prepare(text, "tara")])
    with torch.inference_mode():
        generated = reference.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)
    assert list(ours) == generated[0, prompt.shape[1]:].tolist()
    assert len(set(ours)) > 4  # a real token stream, not one repeated id
