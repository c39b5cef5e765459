"""Find a checkpoint (directory, hub id, or tiny-* name) and load it into a SpeechModel.

A directory is in its publisher's layout; the family that recognises it loads it (models/registry.py). No
`transformers` at run time.
"""

from __future__ import annotations

import os
from pathlib import Path

from streamvox.models.base import SpeechModel
from streamvox.models.registry import Family, detect_family, families
from streamvox.runner.device import resolve_device, resolve_dtype

TINY_PREFIX = "tiny-"


def cache_dir() -> Path:
    return Path(os.environ.get("STREAMVOX_CACHE", Path.home() / ".cache" / "streamvox"))


def resolve_checkpoint(name: str) -> Path:
    """A local directory for `name`: itself, a tiny checkpoint built on first use, or a hub download."""
    tiny = families().get(name[len(TINY_PREFIX) :]) if name.startswith(TINY_PREFIX) else None
    if tiny is not None:
        path = cache_dir() / name
        if not path.is_dir():  # written atomically: a directory is a whole checkpoint
            tiny.write_tiny(path)
        return path
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{name} is a file; pass the checkpoint directory that holds config.json")
        return path
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return _download(name)
    raise FileNotFoundError(f"no checkpoint directory {name!r}; pass a directory, a hub id, or one of: "
                            + ", ".join(TINY_PREFIX + family for family in families()))


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as error:  # network, auth and missing-repo errors all reach the user the same way
        raise FileNotFoundError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(error).__name__}: {error}). "
            "Without a network, download the checkpoint elsewhere and pass its local directory instead."
        ) from None


def load_model(name: str, codec: str | None = None, dtype: str = "auto", device: str = "auto") -> SpeechModel:
    """Build the SpeechModel for checkpoint `name` on `device` (auto: CUDA when present), its backbone in `dtype`
    (auto: bf16 on CUDA, fp32 on the CPU); `codec` overrides the family's codec location."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    path = resolve_checkpoint(name)
    family = detect_family(path, name)
    codec_dir = resolve_checkpoint(codec) if codec else default_codec_dir(path, family)
    return family.model.load(path, codec_dir, torch_dtype, torch_device)


def default_codec_dir(path: Path, family: Family) -> Path | None:
    """The family's codec: a subdirectory of the checkpoint if it has one, else the publisher's hub id (None
    for a family whose checkpoint carries its detokenizer)."""
    if family.model.codec_location is None:
        return None
    subdir, hub_id = family.model.codec_location
    local = path / subdir
    return local if local.is_dir() else resolve_checkpoint(hub_id)
