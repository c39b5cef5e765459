"""The Qwen2 byte-level BPE tokenizer as Qwen publishers ship it (Qwen3-TTS, CosyVoice2's Qwen2 LM), read with
`tokenizers` alone."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

PRETOKENIZE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def load_tokenizer(path: Path) -> Tokenizer:
    """tokenizer.json if the checkpoint has one, else the Qwen2 BPE from vocab.json + merges.txt with the
    special tokens of tokenizer_config.json (how the publisher ships it)."""
    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    vocab, merges = path / "vocab.json", path / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise FileNotFoundError(f"{path} has neither tokenizer.json nor vocab.json + merges.txt")
    tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    config_path = path / "tokenizer_config.json"
    added = json.loads(config_path.read_text()).get("added_tokens_decoder", {}) if config_path.is_file() else {}
    for token_id, token in sorted(added.items(), key=lambda item: int(item[0])):
        tokenizer.add_special_tokens([token["content"]])
        if tokenizer.token_to_id(token["content"]) != int(token_id):
            raise ValueError(f"tokenizer_config.json puts {token['content']!r} at {token_id}, the vocabulary does not")
    return tokenizer
