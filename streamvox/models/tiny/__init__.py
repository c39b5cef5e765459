"""What every tiny random-weight checkpoint writer shares: a small tokenizer, tensor files, an atomic write.

The tokenizer has the shape of a Llama-3 tokenizer: byte-level BPE trained deterministically, a block of
reserved special tokens after the text vocabulary, and a post-processor that puts <|begin_of_text|> in front
of every encoded text.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

_CORPUS = """
The quick brown fox jumps over the lazy dog while the radio plays a song about the sea.
Streaming speech needs the first sound quickly, and every later piece before the listener runs out.
Hello there! How are you today? I am fine, thank you, and I hope the weather stays warm and bright.
Numbers like one, two, three, four, five, six, seven, eight, nine and ten are spoken every day.
She sells sea shells by the sea shore; the shells she sells are surely from the shore.
A voice agent listens, thinks, and answers; it should never stutter, stall or talk over the user.
Please read this sentence slowly, with a calm voice, and pause briefly at every comma and period.
""".strip().splitlines()


def build_tiny_tokenizer(text_vocab_size: int, num_reserved: int, added_tokens: list[str]) -> Tokenizer:
    """BPE with `text_vocab_size` entries, then `num_reserved` special tokens, then `added_tokens`.

    Reserved token r is `<|reserved_special_token_r|>`, except r=0 `<|begin_of_text|>`, r=1 `<|end_of_text|>`
    and r=9 `<|eot_id|>`, mirroring Llama 3's ids 128000, 128001 and 128009.
    """
    tokenizer = train_tiny_bpe(text_vocab_size)
    named = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 9: "<|eot_id|>"}
    reserved = [named.get(r, f"<|reserved_special_token_{r}|>") for r in range(num_reserved)]
    tokenizer.add_special_tokens(reserved + added_tokens)
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)]
    )
    return tokenizer


def train_tiny_bpe(vocab_size: int, extra_lines: tuple[str, ...] = ()) -> Tokenizer:
    """A byte-level BPE of exactly `vocab_size` entries, trained deterministically on a few sentences (and
    `extra_lines`, to make sure words a prompt format relies on become single tokens)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(_CORPUS + list(extra_lines), trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tiny BPE trained to {tokenizer.get_vocab_size()} entries, wanted {vocab_size}")
    return tokenizer


def write_atomically(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Let `fill` write a checkpoint into a sibling directory, then move it to `path`: an interrupted build
    never leaves a half-written checkpoint behind."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        fill(work)
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], num_shards: int = 1) -> None:
    """model.safetensors, or Hugging Face-style shards plus model.safetensors.index.json."""
    tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}
    if num_shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(tensors)
    weight_map = {}
    for shard in range(num_shards):
        file_name = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[shard::num_shards]}
        save_file(part, str(path / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
