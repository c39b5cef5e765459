"""Reading a checkpoint in the Hugging Face layout: config.json, model.safetensors or shards listed in
model.safetensors.index.json. Families whose publishers ship that layout load through `load_hf_layout`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from streamvox.config import RANDOM_INIT_KEY


def read_config(path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{path} has no config.json; is it a checkpoint directory?")
    return json.loads(config_path.read_text())


def read_config_if_any(path: Path) -> dict | None:
    """config.json of a checkpoint directory, or None when it has none (a family that ships another layout)."""
    return read_config(path) if (path / "config.json").exists() else None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards named by model.safetensors.index.json."""
    index_path = path / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        missing = [shard for shard in shards if not (path / shard).exists()]
        if missing:
            raise FileNotFoundError(f"{path}: shards listed in model.safetensors.index.json are missing: {missing}")
        state_dict: dict[str, torch.Tensor] = {}
        for shard in shards:
            state_dict.update(load_file(str(path / shard)))
        absent = sorted(set(weight_map) - set(state_dict))
        if absent:
            raise ValueError(f"{path}: tensors listed in the index are not in their shards: {absent[:5]}")
        return state_dict
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    return load_file(str(single))


def load_hf_layout(family, path: Path, codec_dir: Path | None, dtype: torch.dtype, device: torch.device):
    """`family.from_parts(...)` for a checkpoint in the Hugging Face layout (tokenizer.json, or vocab.json +
    merges.txt, beside config.json)."""
    config = read_config(path)
    tokenizer_path = path / "tokenizer.json"
    if not tokenizer_path.exists() and not (path / "vocab.json").exists():
        raise FileNotFoundError(f"{path} has no tokenizer.json (nor vocab.json + merges.txt); the tokenizer is "
                                "read with `tokenizers`")
    state_dict = None if RANDOM_INIT_KEY in config else read_state_dict(path)
    return family.from_parts(config, state_dict, tokenizer_path, codec_dir, dtype, device)
