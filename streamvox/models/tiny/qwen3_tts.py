"""A tiny random-weight Qwen3-TTS checkpoint in the publisher's layout (`streamvox make-tiny`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from streamvox.codecs.qwen_12hz import TINY_CONFIG as TINY_CODEC_CONFIG
from streamvox.codecs.qwen_12hz import tiny_tensors as tiny_codec_tensors
from streamvox.models.llama import LlamaConfig
from streamvox.models.qwen3_tts import CODEC_SUBDIR, QwenTalker
from streamvox.models.tiny import save_tensors, train_tiny_bpe, write_atomically

TINY_TEXT_VOCAB = 512
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|tts_pad|>", "<|tts_text_bos|>",
                 "<|tts_text_eod|>"]
TINY_SPEAKERS = {"vivian": 3066, "ryan": 3061, "dylan": 3063}
TINY_NOTE = (
    "Random-weight tiny Qwen3-TTS made by `streamvox make-tiny qwen3-tts`: same architecture and file layout as "
    "Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice (speech_tokenizer/ included), but it produces noise, not speech. For "
    "real speech serve a real checkpoint: `streamvox serve --model /path/to/Qwen3-TTS-12Hz-0.6B-CustomVoice`."
)


def write_tiny(path: str | Path, seed: int = 0, num_shards: int = 1) -> Path:
    """Write a deterministic tiny Qwen3-TTS CustomVoice checkpoint (talker, code predictor, tokenizer files,
    speech tokenizer) to `path`."""
    return write_atomically(path, lambda tmp: _write_tiny_files(tmp, seed, num_shards))


def tiny_config() -> dict:
    first_special = TINY_TEXT_VOCAB
    special = {name: first_special + i for i, name in enumerate(TINY_SPECIALS)}
    predictor = {
        "vocab_size": 2048, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu",
        "max_position_embeddings": 65536, "rms_norm_eps": 1e-6, "rope_theta": 1000000, "num_code_groups": 16,
        "use_sliding_window": False, "attention_bias": False, "model_type": "qwen3_tts_talker_code_predictor",
    }
    talker = {
        "model_type": "qwen3_tts_talker", "vocab_size": 3072, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
        "rope_scaling": {"interleaved": True, "mrope_section": [6, 5, 5], "rope_type": "default"},
        "attention_bias": False, "use_sliding_window": False, "num_code_groups": 16,
        "text_hidden_size": 96, "text_vocab_size": TINY_TEXT_VOCAB + len(TINY_SPECIALS),
        "codec_eos_token_id": 2150, "codec_think_id": 2154, "codec_nothink_id": 2155, "codec_think_bos_id": 2156,
        "codec_think_eos_id": 2157, "codec_pad_id": 2148, "codec_bos_id": 2149,
        "codec_language_id": {"english": 2050, "chinese": 2055, "beijing_dialect": 2074},
        "spk_id": TINY_SPEAKERS, "spk_is_dialect": {"vivian": False, "ryan": False, "dylan": "beijing_dialect"},
        "code_predictor_config": predictor,
    }
    return {
        "architectures": ["Qwen3TTSForConditionalGeneration"], "model_type": "qwen3_tts",
        "tokenizer_type": "qwen3_tts_tokenizer_12hz", "tts_model_size": "1b7", "tts_model_type": "custom_voice",
        "im_start_token_id": special["<|im_start|>"], "im_end_token_id": special["<|im_end|>"],
        "tts_pad_token_id": special["<|tts_pad|>"], "tts_bos_token_id": special["<|tts_text_bos|>"],
        "tts_eos_token_id": special["<|tts_text_eod|>"], "talker_config": talker,
        "speaker_encoder_config": {"enc_dim": 128, "sample_rate": 24000}, "torch_dtype": "float32",
        "streamvox_random_weights": True, "streamvox_note": TINY_NOTE,
    }


def _write_tiny_files(path: Path, seed: int, num_shards: int) -> None:
    config = tiny_config()
    talker_config = config["talker_config"]
    write_tiny_tokenizer(path)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    talker_llama = LlamaConfig.from_fields(talker_config, rope_scaling=None, qk_norm=True)
    predictor_llama = LlamaConfig.from_fields(talker_config["code_predictor_config"], rope_scaling=None,
                                              qk_norm=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        talker = QwenTalker(talker_llama, predictor_llama, 16, talker_config["text_vocab_size"],
                            talker_config["text_hidden_size"], talker_config["codec_eos_token_id"])
        tensors = talker.state_dict()
        for name, tensor in tensors.items():
            if "norm" not in name:
                torch.nn.init.normal_(tensor, std=0.1 if "embed" in name else tensor.shape[-1] ** -0.5)
    save_tensors(path, {"talker." + k: v for k, v in tensors.items()}, num_shards)
    codec_dir = path / CODEC_SUBDIR
    codec_dir.mkdir()
    (codec_dir / "config.json").write_text(json.dumps(TINY_CODEC_CONFIG, indent=2))
    save_tensors(codec_dir, tiny_codec_tensors(TINY_CODEC_CONFIG, seed))
    (path / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "top_k": 50, "top_p": 1.0, "temperature": 0.9, "repetition_penalty": 1.05,
        "subtalker_dosample": True, "subtalker_top_k": 50, "subtalker_top_p": 1.0, "subtalker_temperature": 0.9,
        "max_new_tokens": 2048}, indent=2))
    (path / "README.md").write_text(TINY_NOTE + "\n")


def write_tiny_tokenizer(path: Path) -> None:
    """vocab.json + merges.txt + tokenizer_config.json, as the publisher ships its Qwen2 tokenizer."""
    # byte-level BPE (Qwen2's pre-tokenizer on load) in which "assistant", like in Qwen's vocabulary, is one token
    train_tiny_bpe(TINY_TEXT_VOCAB, ("assistant " * 50,)).model.save(str(path))
    added = {str(TINY_TEXT_VOCAB + i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": True}
             for i, name in enumerate(TINY_SPECIALS)}
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "bos_token": None,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": 32768,
        "clean_up_tokenization_spaces": False, "errors": "replace", "split_special_tokens": False}, indent=2))
