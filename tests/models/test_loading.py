"""Checkpoints load from directories in the publisher's layout; broken ones fail with clear messages."""

import json
import shutil

import pytest
import torch

from streamvox.config import SamplingParams
from streamvox.engine.local import Engine
from streamvox.models.checkpoint import read_state_dict
from streamvox.models.tiny.orpheus import write_tiny
from streamvox.runner.weights import load_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=30, seed=1, ignore_eos=True)


def test_sharded_checkpoint_loads_the_same_model(tmp_path, tiny_dir, tiny_model):
    sharded = write_tiny(tmp_path / "sharded", seed=0, num_shards=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert not (sharded / "model.safetensors").exists()
    single, split = read_state_dict(tiny_dir), read_state_dict(sharded)
    assert single.keys() == split.keys()
    assert all(torch.equal(single[name], split[name]) for name in single)
    assert _tokens(tiny_model) == _tokens(load_model(str(sharded)))


def _tokens(model):
    engine = Engine(model)
    return engine.result(engine.submit("same weights", None, GREEDY)).step_tokens


def test_make_tiny_is_deterministic(tmp_path, tiny_dir):
    again = write_tiny(tmp_path / "again", seed=0)
    for name in ("config.json", "tokenizer.json", "model.safetensors", "snac_24khz/config.json"):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    assert json.loads((again / "config.json").read_text())["streamvox_random_weights"] is True


@pytest.mark.parametrize("missing, message", [
    ("config.json", "no config.json"),
    ("tokenizer.json", "no tokenizer.json"),
    ("model.safetensors", "neither model.safetensors"),
    ("snac_24khz/pytorch_model.bin", "pytorch_model.bin"),
])
def test_missing_file_is_named(tmp_path, tiny_dir, missing, message):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / missing).unlink()
    with pytest.raises(FileNotFoundError, match=message):
        load_model(str(broken))


def test_missing_shard_is_named(tmp_path):
    sharded = write_tiny(tmp_path / "sharded", seed=0, num_shards=2)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_model(str(sharded))


@pytest.mark.parametrize("changes, message", [
    (dict(architectures=["BertModel"], model_type="bert"), "LlamaForCausalLM"),  # wrong architecture
    (dict(num_hidden_layers=9), "missing"),  # a config that disagrees with the weights
    (dict(hidden_size=64), "missing|shape"),
])
def test_config_that_does_not_fit_is_rejected(tmp_path, tiny_dir, changes, message):
    broken = tmp_path / "edited"
    shutil.copytree(tiny_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(ValueError, match=message):
        load_model(str(broken))


def test_hub_id_without_network_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="local directory"):
        load_model("canopylabs/orpheus-3b-0.1-ft")


def test_unknown_name_lists_the_choices():
    with pytest.raises(FileNotFoundError, match="tiny-orpheus"):
        load_model("./no-such-checkpoint")
