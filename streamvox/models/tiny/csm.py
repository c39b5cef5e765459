"""A tiny random-weight CSM checkpoint in the publisher's layout (`streamvox make-tiny`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from streamvox.codecs.mimi import TINY_CONFIG as TINY_MIMI_CONFIG
from streamvox.codecs.mimi import tiny_tensors as tiny_mimi_tensors
from streamvox.models.csm import CODEC_PREFIX, CsmBackbone, CsmDepthDecoder
from streamvox.models.llama import LlamaConfig
from streamvox.models.tiny import build_tiny_tokenizer, save_tensors, write_atomically

TINY_TEXT_VOCAB = 512
TINY_RESERVED = 16
TINY_CODES = 64  # the tiny Mimi's codebook size; the heads see 3 more ids, as the published 2048 + 3
TINY_BACKBONE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64)
TINY_DEPTH = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32)
TINY_NOTE = (
    "Random-weight tiny CSM made by `streamvox make-tiny csm`: same architecture and file layout as the "
    "transformers version of sesame/csm-1b (Mimi codec included), but it produces noise, not speech. For real "
    "speech serve a real checkpoint: `streamvox serve --model /path/to/csm-1b`."
)


def write_tiny(path: str | Path, seed: int = 0, num_shards: int = 1) -> Path:
    """Write a deterministic tiny CSM checkpoint (backbone, depth decoder, Mimi, tokenizer) to `path`."""
    return write_atomically(path, lambda tmp: _write_tiny_files(tmp, seed, num_shards))


def tiny_config() -> dict:
    vocab = TINY_CODES + 3
    rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    bos = TINY_TEXT_VOCAB  # <|begin_of_text|>, as 128000 in the published vocabulary
    return {
        "architectures": ["CsmForConditionalGeneration"], "model_type": "csm", "num_codebooks": 32,
        "vocab_size": vocab, "text_vocab_size": TINY_TEXT_VOCAB + TINY_RESERVED, **TINY_BACKBONE,
        "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 500000,
        "rope_scaling": {**rope, "original_max_position_embeddings": 1024},
        "bos_token_id": bos, "pad_token_id": bos + 2, "audio_token_id": bos + 2, "audio_eos_token_id": bos + 3,
        "codebook_pad_token_id": vocab - 1, "codebook_eos_token_id": 0, "tie_codebooks_embeddings": True,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        "depth_decoder_config": {
            "model_type": "csm_depth_decoder_model", "num_codebooks": 32, "backbone_hidden_size":
            TINY_BACKBONE["hidden_size"], "vocab_size": vocab, **TINY_DEPTH, "hidden_act": "silu",
            "max_position_embeddings": 33, "rms_norm_eps": 1e-5, "rope_theta": 500000,
            "rope_scaling": {**rope, "original_max_position_embeddings": 16}, "attention_bias": False,
            "mlp_bias": False,
        },
        "codec_config": {**TINY_MIMI_CONFIG, "codebook_size": TINY_CODES},
        "streamvox_random_weights": True, "streamvox_note": TINY_NOTE,
    }


def _write_tiny_files(path: Path, seed: int, num_shards: int) -> None:
    config = tiny_config()
    tokenizer = build_tiny_tokenizer(TINY_TEXT_VOCAB, TINY_RESERVED, [])
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    backbone_config = LlamaConfig.from_fields(config)
    depth_config = LlamaConfig.from_fields(config["depth_decoder_config"])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        backbone = CsmBackbone(backbone_config, config["text_vocab_size"], 32)
        depth = CsmDepthDecoder(depth_config, 32, backbone_config.hidden_size)
        tensors = {**backbone.state_dict(), **{"depth_decoder." + k: v for k, v in depth.state_dict().items()}}
        for name, tensor in tensors.items():
            if "norm" not in name:
                fan_in = tensor.shape[-2 if "codebooks_head" in name else -1]
                torch.nn.init.normal_(tensor, std=0.1 if "embed" in name else fan_in**-0.5)
    # the ids past the codebook are never drawn, as with a trained model: their head weights are zero
    tensors["lm_head.weight"][TINY_CODES:] = 0
    tensors["depth_decoder.codebooks_head.weight"][..., TINY_CODES:] = 0
    del tensors["backbone_model.embed_tokens.embed_audio_tokens.weight"]  # tied; stored under the depth name
    mimi = tiny_mimi_tensors(config["codec_config"], seed)
    save_tensors(path, {**tensors, **{CODEC_PREFIX + k: v for k, v in mimi.items()}}, num_shards)
    (path / "generation_config.json").write_text(json.dumps({
        "bos_token_id": config["bos_token_id"], "do_sample": True, "temperature": 0.9, "top_k": 50,
        "max_length": 1125, "depth_decoder_do_sample": True, "depth_decoder_temperature": 0.9,
        "depth_decoder_top_k": 50}, indent=2))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|reserved_special_token_2|>",
        "model_max_length": 2048}))
    (path / "README.md").write_text(TINY_NOTE + "\n")
