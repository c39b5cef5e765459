"""A tiny random-weight Chatterbox checkpoint in the publisher's layout (`streamvox make-tiny chatterbox`):
t3_cfg.safetensors, s3gen.safetensors, ve.safetensors, tokenizer.json, conds.pt, and streamvox_tiny.json (the
publisher's code fixes S3Gen's sizes, so the tiny says it has the tiny ones; it also marks the weights random)."""

from __future__ import annotations

import json
from pathlib import Path

from streamvox.codecs.s3gen import write_tiny_s3gen
from streamvox.models.chatterbox import TINY_MARKER
from streamvox.models.tiny import write_atomically
from streamvox.models.tiny.chatterbox_parts import write_tiny_parts

TINY_NOTE = (
    "Random-weight tiny Chatterbox made by `streamvox make-tiny chatterbox`: same file layout as "
    "ResembleAI/chatterbox at tiny sizes, but it produces noise, not speech. For real speech serve a real "
    "checkpoint: `streamvox serve --model /path/to/chatterbox`."
)


def write_tiny(path: str | Path, seed: int = 0, num_shards: int = 1) -> Path:
    """Write a deterministic tiny Chatterbox checkpoint to `path` (one file per part: `num_shards` is ignored)."""
    return write_atomically(path, lambda tmp: _write_tiny_files(tmp, seed))


def _write_tiny_files(path: Path, seed: int) -> None:
    write_tiny_parts(path, seed)
    write_tiny_s3gen(path / "s3gen.safetensors", seed=seed)
    (path / TINY_MARKER).write_text(json.dumps({"sizes": "tiny", "random_weights": True, "note": TINY_NOTE}))
    (path / "README.md").write_text(TINY_NOTE + "\n")
