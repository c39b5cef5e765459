"""Which family a checkpoint belongs to, and the tiny checkpoints `make-tiny` can write."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from streamvox.models import csm, orpheus, qwen3_tts
from streamvox.models.base import SpeechModel

FAMILIES: dict[str, type[SpeechModel]] = {"orpheus": orpheus.OrpheusModel, "csm": csm.CsmModel,
                                           "qwen3-tts": qwen3_tts.Qwen3TtsModel}
TINY_WRITERS: dict[str, Callable[..., Path]] = {"orpheus": orpheus.write_tiny, "csm": csm.write_tiny,
                                                "qwen3-tts": qwen3_tts.write_tiny}
# (subdirectory of the checkpoint, hub id used when it is absent); CSM carries its Mimi in its own tensors
CODEC_DEFAULTS: dict[str, tuple[str, str]] = {"orpheus": (orpheus.CODEC_SUBDIR, orpheus.CODEC_HUB_ID),
                                              "csm": (".", csm.CODEC_HUB_ID),
                                              "qwen3-tts": (qwen3_tts.CODEC_SUBDIR, qwen3_tts.CODEC_HUB_ID)}


def detect_family(config: dict, name_hint: str) -> str:
    """The family of a checkpoint from its config.json (and its name for publisher configs that do not say)."""
    if config.get("model_type") == "csm" or "CsmForConditionalGeneration" in (config.get("architectures") or []):
        return "csm"
    if config.get("model_type") == "qwen3_tts":
        if config.get("tokenizer_type", "qwen3_tts_tokenizer_12hz") != "qwen3_tts_tokenizer_12hz":
            raise ValueError(f"{name_hint}: only the 12 Hz Qwen3-TTS models are supported, this one uses "
                             f"{config.get('tokenizer_type')}")
        return "qwen3-tts"
    if "orpheus_token_ids" in config or "orpheus" in name_hint.lower():
        return "orpheus"
    if "LlamaForCausalLM" in (config.get("architectures") or []) and config.get("vocab_size", 0) >= 156938:
        return "orpheus"  # Llama with the 7 x 4096 SNAC code tokens appended
    raise ValueError(
        f"cannot tell which SpeechLM family {name_hint!r} is (architectures={config.get('architectures')}); "
        f"supported families: {', '.join(FAMILIES)}"
    )
