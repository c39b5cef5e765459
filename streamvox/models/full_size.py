"""Full-size random-weight checkpoints, for measuring real-model speed where no weights can be downloaded.

`make-tiny --size full FAMILY DIR` writes the publisher's config.json with the real model's dimensions
(Orpheus-3B, CSM-1B, Qwen3-TTS-12Hz-1.7B-CustomVoice, and their codecs' configs) plus a small tokenizer, and no
weights: the configs carry RANDOM_INIT_KEY, so the loader draws every weight on the device from the seed. A 3B
model is ready in seconds and nothing of gigabytes is written. Its audio is noise, as with the tiny models, but
every matrix has the real shape, so its timings are the real model's. The configs in `full/` are the published
ones (vocabulary and special ids included); only the tokenizer is small, so prompts are short token lists.
"""

from __future__ import annotations

import json
from pathlib import Path

from streamvox.config import RANDOM_INIT_KEY
from streamvox.models import orpheus
from streamvox.models.tiny import build_tiny_tokenizer, write_atomically
from streamvox.models.tiny import qwen3_tts as tiny_qwen3_tts

CONFIGS = Path(__file__).parent / "full"
NOTE = ("Full-size random-weight {family} made by `streamvox make-tiny --size full`: the real model's config, a "
        "small tokenizer and no weights (drawn on the device from a seed at load). It makes noise, not speech; "
        "it is for measuring speed.")


def write_full(family: str, path: str | Path, seed: int = 0) -> Path:
    """Write the full-size config of `family` (orpheus, csm, qwen3-tts) to `path`."""
    writers = {"orpheus": _orpheus, "csm": _csm, "qwen3-tts": _qwen3_tts}
    if family not in writers:
        raise ValueError(f"no full-size config for {family!r}; choose one of: {', '.join(writers)}")
    return write_atomically(path, lambda tmp: writers[family](tmp, seed))


def _config(name: str, seed: int, family: str | None = None) -> dict:
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    config[RANDOM_INIT_KEY] = {"seed": seed}
    if family is not None:
        config.update(streamvox_random_weights=True, streamvox_note=NOTE.format(family=family))
    return config


def _write_json(path: Path, config: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))


def _orpheus(path: Path, seed: int) -> None:
    _write_json(path, _config("orpheus", seed, "Orpheus-3B"))
    build_tiny_tokenizer(512, 16, []).save(str(path / "tokenizer.json"))  # text ids only; the special ids are fixed
    _write_json(path / orpheus.CODEC_SUBDIR, _config("orpheus-snac", seed))


def _csm(path: Path, seed: int) -> None:
    _write_json(path, _config("csm", seed, "CSM-1B"))  # Mimi's config rides in codec_config
    build_tiny_tokenizer(512, 16, []).save(str(path / "tokenizer.json"))


def _qwen3_tts(path: Path, seed: int) -> None:
    _write_json(path, _config("qwen3-tts", seed, "Qwen3-TTS-12Hz-1.7B-CustomVoice"))
    tiny_qwen3_tts.write_tiny_tokenizer(path)
    _write_json(path / tiny_qwen3_tts.CODEC_SUBDIR, _config("qwen3-tts-tokenizer", seed))
