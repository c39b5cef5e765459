"""Full-size random-weight models (`make-tiny --size full`): the real model's config, no weights on disk, the
weights drawn where the model loads."""

import json
import time

import pytest
import torch

from streamvox.config import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig
from streamvox.engine.local import Engine
from streamvox.models.full_size import write_full
from streamvox.runner.weights import load_model


def unique_params(*modules) -> int:
    seen, total = set(), 0
    for module in modules:
        for name, param in module.named_parameters():
            key = (id(module), name) if param.device.type == "meta" else param.untyped_storage().data_ptr()
            if name == "lm_head.weight" and getattr(module, "config", None) is not None and \
                    module.config.tie_word_embeddings:
                continue  # one tensor with the input embedding
            if key not in seen:
                seen.add(key)
                total += param.numel()
    return total


@pytest.mark.parametrize("family, low, high", [("orpheus", 3.2e9, 3.4e9), ("csm", 1.5e9, 1.7e9),
                                               ("qwen3-tts", 1.8e9, 2.0e9)])
def test_full_size_configs_build_the_real_model_on_the_meta_device(tmp_path, family, low, high):
    path = write_full(family, tmp_path / family)
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) < 10 * 2**20  # no weights written
    model = load_model(str(path), device="meta", dtype="bfloat16")
    modules = [model.backbone] + ([model.depth] if family == "csm" else [])
    assert low < unique_params(*modules) < high
    assert all(p.device.type == "meta" for p in model.backbone.parameters())
    assert model.is_random_weights
    config = model.backbone.config
    expected = {"orpheus": (28, 3072, 156940), "csm": (16, 2048, 2051), "qwen3-tts": (28, 2048, 3072)}[family]
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == expected


def test_random_full_weights_speak_audio_codes(tmp_path):
    """The full Orpheus vocabulary (text + 7 x 4096 audio codes) with small layers, drawn on the CPU: greedy and
    sampled draws are audio codes, as a trained model's are, so every step feeds a frame."""
    path = write_full("orpheus", tmp_path / "orpheus")
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64)
    (path / "config.json").write_text(json.dumps(config))
    started = time.perf_counter()
    model = load_model(str(path), device="cpu", dtype="float32")
    assert time.perf_counter() - started < 30
    assert model.backbone.lm_head.weight.std() > 0  # drawn, not left empty
    engine = Engine(model, EngineConfig(cache=CacheConfig(num_blocks=128), scheduler=SchedulerConfig(policy="fcfs")))
    try:
        for sampling in (model.default_sampling.replace(seed=1), SamplingParams(temperature=0.0, seed=0)):
            result = engine.result(engine.submit("Hello there.", None, sampling.replace(max_tokens=70)))
            assert all(t >= model.ids.audio_offset for t in result.step_tokens)
            assert result.num_frames == 10 and len(result.pcm) == 10 * 2048
    finally:
        engine.close()
    again = load_model(str(path), device="cpu", dtype="float32")  # the seed fixes every weight
    assert torch.equal(again.backbone.lm_head.weight, model.backbone.lm_head.weight)
