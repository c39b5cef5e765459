"""What the engine does differently on a GPU that can be checked on the CPU: the sampler never looks at device
values mid-step (large vocabularies draw from candidates, flag the rows that may need the whole vocabulary, and
draw those again exactly), and the step's outputs come back in one copy with those flags."""

import pytest

from streamvox.config import SamplingParams


def counting(sample, redraws):
    def counted(logits, batch, exact=False):
        redraws.append(exact)
        return sample(logits, batch, exact)
    return counted


@pytest.mark.parametrize("family", ["orpheus", "csm"])
def test_sampling_without_looking_mid_step_gives_the_same_tokens(family, tiny_model, engine_for, tmp_path):
    if family == "orpheus":
        model = tiny_model
    else:
        from streamvox.models.tiny.csm import write_tiny
        from streamvox.runner.weights import load_model

        model = load_model(str(write_tiny(tmp_path / "csm")))
    steps = 42 if family == "orpheus" else 8
    samplings = [model.default_sampling.replace(seed=7, max_tokens=steps, ignore_eos=True),
                 SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.2, repetition_window=6, seed=8,
                                max_tokens=steps, ignore_eos=True)]
    runs = []
    for checks_on_host in (True, False):
        engine = engine_for(model)
        engine.lm_runner.sampler.checks_on_host = checks_on_host
        redraws = []
        engine.lm_runner.sampler.sample = counting(engine.lm_runner.sampler.sample, redraws)
        ids = [engine.submit("Compare the two ways.", None, s) for s in samplings]
        runs.append([engine.result(i).step_tokens for i in ids])
        if family == "orpheus" and not checks_on_host:
            assert any(redraws), "a tiny model's flat logits reach past the candidates: some rows were drawn again"
    assert runs[0] == runs[1]
