"""A tiny random-weight Orpheus checkpoint in the publisher's layout (`streamvox make-tiny`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from streamvox.codecs.snac import SnacCodec
from streamvox.models.llama import LlamaConfig, LlamaForCausalLM
from streamvox.models.orpheus import CODEC_SUBDIR, TOKENS_PER_FRAME, OrpheusTokenIds
from streamvox.models.tiny import build_tiny_tokenizer, save_tensors, write_atomically

TINY_TEXT_VOCAB = 512
TINY_RESERVED = 16
TINY_CODEBOOK = 1024
# Sizes chosen for the 2-core CPU the tests and benchmarks run on (see README, "The tiny checkpoint"): small
# enough that about 16 streams of 13 s run in real time at once, so that scheduling near and beyond capacity can
# be measured (with hidden 256 and 4 layers one engine kept only 2 or 3 streams).
TINY_LLAMA = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
)
TINY_SNAC_DIM = 48  # decoder width of the tiny's SNAC (the real one is 1024)
TINY_NOTE = (
    "Random-weight tiny Orpheus made by `streamvox make-tiny orpheus`: same architecture and file layout as "
    "canopylabs/orpheus-3b-0.1-ft, but it produces noise, not speech. For real speech serve a real checkpoint: "
    "`streamvox serve --model /path/to/orpheus-3b-0.1-ft` (or a hub id when a network is available)."
)


def write_tiny(path: str | Path, seed: int = 0, num_shards: int = 1) -> Path:
    """Write a deterministic tiny Orpheus checkpoint (LM + tokenizer + SNAC codec subdirectory) to `path`."""
    return write_atomically(path, lambda tmp: _write_tiny_files(tmp, seed, num_shards))


def _write_tiny_files(path: Path, seed: int, num_shards: int) -> None:
    custom = TINY_TEXT_VOCAB + TINY_RESERVED  # the tiny's counterpart of id 128256
    ids = OrpheusTokenIds(
        start_of_human=custom + 3, end_of_text=TINY_TEXT_VOCAB + 9, end_of_human=custom + 4,
        start_of_ai=custom + 5, start_of_speech=custom + 1, end_of_speech=custom + 2,
        audio_offset=custom + 10, codebook_size=TINY_CODEBOOK,
    )
    num_custom = 10 + TOKENS_PER_FRAME * TINY_CODEBOOK
    tokenizer = build_tiny_tokenizer(TINY_TEXT_VOCAB, TINY_RESERVED, [f"<custom_token_{i}>" for i in range(num_custom)])
    tokenizer.save(str(path / "tokenizer.json"))
    config = _tiny_config(custom + num_custom, ids)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig.from_json(config))
        for name, param in model.named_parameters():
            if "norm" not in name:
                torch.nn.init.normal_(param, std=0.1 if "embed" in name else param.shape[-1] ** -0.5)
        # logits of spread ~2.3 rather than ~1.1: a trained model's next-token distribution is peaked, and a
        # flat one makes top-p keep thousands of tokens (a full sort of the vocabulary every step)
        model.model.norm.weight.data.fill_(2.0)
    save_tensors(path, {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, num_shards)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": TINY_TEXT_VOCAB, "do_sample": True,
                                                              "temperature": 0.6, "top_p": 0.8}, indent=2))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                            "eos_token": "<|eot_id|>", "model_max_length": 8192}))
    (path / "README.md").write_text(TINY_NOTE + "\n")
    SnacCodec.write_tiny(path / CODEC_SUBDIR, seed=seed, decoder_dim=TINY_SNAC_DIM, codebook_size=TINY_CODEBOOK)


def _tiny_config(vocab_size: int, ids: OrpheusTokenIds) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
        **TINY_LLAMA, "head_dim": TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"],
        "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        "bos_token_id": TINY_TEXT_VOCAB, "eos_token_id": ids.end_of_speech,
        "orpheus_token_ids": dataclasses.asdict(ids), "streamvox_random_weights": True, "streamvox_note": TINY_NOTE,
    }
