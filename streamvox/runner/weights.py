"""Find a checkpoint (directory, hub id, or tiny-* name) and load it into a SpeechModel.

A directory is in the publisher's Hugging Face layout: config.json, model.safetensors or shards listed in
model.safetensors.index.json, tokenizer.json. No `transformers` at run time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from streamvox.config import RANDOM_INIT_KEY
from streamvox.models.base import SpeechModel
from streamvox.models.registry import CODEC_DEFAULTS, FAMILIES, TINY_WRITERS, detect_family
from streamvox.runner.device import resolve_device, resolve_dtype

TINY_PREFIX = "tiny-"


def cache_dir() -> Path:
    return Path(os.environ.get("STREAMVOX_CACHE", Path.home() / ".cache" / "streamvox"))


def resolve_checkpoint(name: str) -> Path:
    """A local directory for `name`: itself, a tiny checkpoint built on first use, or a hub download."""
    if name.startswith(TINY_PREFIX) and name[len(TINY_PREFIX) :] in TINY_WRITERS:
        path = cache_dir() / name
        if not (path / "config.json").exists():
            TINY_WRITERS[name[len(TINY_PREFIX) :]](path)
        return path
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{name} is a file; pass the checkpoint directory that holds config.json")
        return path
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return _download(name)
    raise FileNotFoundError(f"no checkpoint directory {name!r}; pass a directory, a hub id, or one of: "
                            + ", ".join(TINY_PREFIX + family for family in TINY_WRITERS))


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as error:  # network, auth and missing-repo errors all reach the user the same way
        raise FileNotFoundError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(error).__name__}: {error}). "
            "Without a network, download the checkpoint elsewhere and pass its local directory instead."
        ) from None


def read_config(path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{path} has no config.json; is it a checkpoint directory?")
    return json.loads(config_path.read_text())


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


def load_model(name: str, codec: str | None = None, dtype: str = "auto", device: str = "auto") -> SpeechModel:
    """Build the SpeechModel for checkpoint `name` on `device` (auto: CUDA when present), its backbone in `dtype`
    (auto: bf16 on CUDA, fp32 on the CPU); `codec` overrides the family's codec location."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    path = resolve_checkpoint(name)
    config = read_config(path)
    family = detect_family(config, name)
    tokenizer_path = path / "tokenizer.json"
    if not tokenizer_path.exists() and not (path / "vocab.json").exists():
        raise FileNotFoundError(f"{path} has no tokenizer.json (nor vocab.json + merges.txt); the tokenizer is "
                                "read with `tokenizers`")
    codec_dir = resolve_checkpoint(codec) if codec else default_codec_dir(path, family)
    state_dict = None if RANDOM_INIT_KEY in config else read_state_dict(path)
    return FAMILIES[family].from_parts(config, state_dict, tokenizer_path, codec_dir, torch_dtype, torch_device)


def default_codec_dir(path: Path, family: str) -> Path:
    """The family's codec: a subdirectory of the checkpoint if it has one, else the publisher's hub id."""
    subdir, hub_id = CODEC_DEFAULTS[family]
    local = path / subdir
    return local if local.is_dir() else resolve_checkpoint(hub_id)
