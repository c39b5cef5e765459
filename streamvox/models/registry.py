"""The SpeechLM families this build serves: one entry each, found by walking the list (no family names elsewhere).

An entry pairs a family's model class (which recognises, loads and describes its publisher's checkpoints) with
its tiny-checkpoint writer. Families outside this package register themselves: a module named in the
STREAMVOX_FAMILIES environment variable (comma-separated), or an installed package's `streamvox.families` entry
point, that defines `FAMILY = Family(...)`. They are tried before the built-in ones.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path

from streamvox.models import chatterbox, cosyvoice2, csm, orpheus, qwen3_tts
from streamvox.models.base import SpeechModel
from streamvox.models.tiny import chatterbox as tiny_chatterbox
from streamvox.models.tiny import cosyvoice2 as tiny_cosyvoice2
from streamvox.models.tiny import csm as tiny_csm
from streamvox.models.tiny import orpheus as tiny_orpheus
from streamvox.models.tiny import qwen3_tts as tiny_qwen3_tts

PLUGINS_ENV = "STREAMVOX_FAMILIES"
ENTRY_POINT_GROUP = "streamvox.families"


@dataclass(frozen=True)
class Family:
    """One SpeechLM family: its model class and the writer of its tiny random-weight checkpoint."""

    name: str  # as users write it: `make-tiny NAME`, `--model tiny-NAME`
    model: type[SpeechModel]  # detect(path, name), load(path, codec_dir, dtype, device), voices, codec_location
    write_tiny: Callable[..., Path]  # write_tiny(path, seed=0, num_shards=1) -> path


BUILT_IN = (
    Family("csm", csm.CsmModel, tiny_csm.write_tiny),
    Family("qwen3-tts", qwen3_tts.Qwen3TtsModel, tiny_qwen3_tts.write_tiny),
    Family("cosyvoice2", cosyvoice2.CosyVoice2Model, tiny_cosyvoice2.write_tiny),
    Family("chatterbox", chatterbox.ChatterboxModel, tiny_chatterbox.write_tiny),
    Family("orpheus", orpheus.OrpheusModel, tiny_orpheus.write_tiny),  # last: it claims big-vocabulary Llamas
)


def families() -> dict[str, Family]:
    """Every family by name: registered ones first, then the built-in ones."""
    return _families(os.environ.get(PLUGINS_ENV, ""))


@cache
def _families(plugin_modules: str) -> dict[str, Family]:
    found = [ep.load() for ep in entry_points(group=ENTRY_POINT_GROUP)]
    for module_name in filter(None, (name.strip() for name in plugin_modules.split(","))):
        module = importlib.import_module(module_name)
        if not isinstance(getattr(module, "FAMILY", None), Family):
            raise ValueError(f"{PLUGINS_ENV} names {module_name!r}, which defines no FAMILY = Family(...)")
        found.append(module.FAMILY)
    return {family.name: family for family in [*found, *BUILT_IN]}


def family_named(name: str) -> Family:
    known = families()
    if name not in known:
        raise ValueError(f"unknown family {name!r}; choose one of: {', '.join(known)}")
    return known[name]


def detect_family(path: Path, name: str) -> Family:
    """The family of checkpoint directory `path` (`name`: what the user called it, for publisher layouts that do
    not say). ValueError when no family claims it, or one claims it and cannot serve it."""
    for family in families().values():
        if family.model.detect(path, name):
            return family
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json, nor the files of another layout a family knows; is it "
                                "a checkpoint directory?")
    raise ValueError(f"cannot tell which SpeechLM family {name!r} is; supported families: "
                     f"{', '.join(families())}")
