"""A tiny random-weight CosyVoice2 checkpoint in the publisher's layout (`streamvox make-tiny cosyvoice2`).

cosyvoice2.yaml with the publisher's tags (so hyperpyyaml builds the publisher's own classes from it), llm.pt,
flow.pt, hift.pt, campplus.onnx, speech_tokenizer_v2.onnx, spk2info.pt and CosyVoice-BlankEN/ (a tiny Qwen2:
config.json, model.safetensors, vocab.json, merges.txt, tokenizer_config.json). The data-pipeline and training
sections of the publisher's yaml are left out: serving reads none of them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from streamvox.codecs.cosyvoice_flow import TINY_FLOW_PARAMS, write_tiny_flow
from streamvox.codecs.cosyvoice_onnx_tiny import write_tiny_checkpoint as write_tiny_onnx
from streamvox.codecs.hift import TINY_HIFT_PARAMS, write_tiny_hift
from streamvox.models.cosyvoice2 import QWEN_SUBDIR, CosyLM
from streamvox.models.llama import LlamaConfig
from streamvox.models.tiny import save_tensors, write_atomically
from streamvox.models.tiny.qwen3_tts import write_tiny_tokenizer

SPEECH_VOCAB = 6561
TINY_QWEN = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 640, "hidden_size": 64,
             "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
             "tie_word_embeddings": True, "torch_dtype": "float32", "use_sliding_window": False,
             "bos_token_id": 512, "eos_token_id": 512}
TINY_SPEAKERS = ("tiny_a", "tiny_b")
TINY_NOTE = (
    "Random-weight tiny CosyVoice2 made by `streamvox make-tiny cosyvoice2`: same file layout as "
    "FunAudioLLM/CosyVoice2-0.5B, but it produces noise, not speech. For real speech serve a real checkpoint: "
    "`streamvox serve --model /path/to/CosyVoice2-0.5B`."
)
# which publisher class each section of the yaml builds (hyperpyyaml tags)
TAGS = {
    ("llm",): "!new:cosyvoice.llm.llm.Qwen2LM",
    ("llm", "llm"): "!new:cosyvoice.llm.llm.Qwen2Encoder",
    ("llm", "sampling"): "!name:cosyvoice.utils.common.ras_sampling",
    ("flow",): "!new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec",
    ("flow", "encoder"): "!new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder",
    ("flow", "decoder"): "!new:cosyvoice.flow.flow_matching.CausalConditionalCFM",
    ("flow", "decoder", "cfm_params"): "!new:omegaconf.DictConfig",
    ("flow", "decoder", "estimator"): "!new:cosyvoice.flow.decoder.CausalConditionalDecoder",
    ("hift",): "!new:cosyvoice.hifigan.generator.HiFTGenerator",
    ("hift", "f0_predictor"): "!new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor",
}


def write_tiny(path: str | Path, seed: int = 0, num_shards: int = 1) -> Path:
    """Write a deterministic tiny CosyVoice2 checkpoint to `path` (`num_shards` applies to the Qwen2 weights)."""
    return write_atomically(path, lambda tmp: _write_tiny_files(tmp, seed, num_shards))


def hyperparameters() -> dict:
    """The tiny's cosyvoice2.yaml as plain data."""
    hidden = TINY_QWEN["hidden_size"]
    return {
        "sample_rate": 24000, "llm_input_size": hidden, "llm_output_size": hidden, "spk_embed_dim": 192,
        "qwen_pretrain_path": "", "token_frame_rate": 25, "token_mel_ratio": 2, "chunk_size": 25,
        "num_decoding_left_chunks": -1,
        "llm": {"llm_input_size": hidden, "llm_output_size": hidden, "speech_token_size": SPEECH_VOCAB,
                "length_normalized_loss": True, "lsm_weight": 0, "mix_ratio": [5, 15],
                "llm": {"pretrain_path": "<qwen_pretrain_path>"},
                "sampling": {"top_p": 0.8, "top_k": 25, "win_size": 10, "tau_r": 0.1}},
        "flow": TINY_FLOW_PARAMS, "hift": TINY_HIFT_PARAMS,
        "streamvox_random_weights": True, "streamvox_note": TINY_NOTE,
    }


def _write_tiny_files(path: Path, seed: int, num_shards: int) -> None:
    (path / "cosyvoice2.yaml").write_text(to_hyperpyyaml(hyperparameters()))
    qwen_dir = path / QWEN_SUBDIR
    qwen_dir.mkdir()
    write_tiny_tokenizer(qwen_dir)
    (qwen_dir / "config.json").write_text(json.dumps(TINY_QWEN, indent=2))
    lm = _random_lm(seed)
    body = {name: tensor for name, tensor in lm.state_dict().items()
            if not name.startswith(("llm_embedding", "speech_embedding", "llm_decoder"))}
    save_tensors(qwen_dir, {"model." + name: tensor for name, tensor in body.items()}, num_shards)  # head: tied
    torch.save(publisher_lm_tensors(lm), path / "llm.pt")
    write_tiny_flow(path, TINY_FLOW_PARAMS, seed=seed)
    write_tiny_hift(path / "hift.pt", TINY_HIFT_PARAMS, seed=seed)
    if importlib.util.find_spec("onnx") is not None:  # a machine without it gets a tiny that cannot clone
        write_tiny_onnx(path, seed=seed)
    generator = torch.Generator().manual_seed(seed + 7)
    torch.save({name: {"embedding": torch.randn(1, 192, generator=generator)} for name in TINY_SPEAKERS},
               path / "spk2info.pt")
    (path / "README.md").write_text(TINY_NOTE + "\n")


def _random_lm(seed: int) -> CosyLM:
    qwen = LlamaConfig.from_fields(TINY_QWEN, "Qwen2", attention_bias=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        lm = CosyLM(qwen, SPEECH_VOCAB)
        for name, param in lm.named_parameters():
            if "norm" in name:
                continue
            std = 0.1 if "embed" in name or name.endswith("bias") else param.shape[-1] ** -0.5
            torch.nn.init.normal_(param, std=std)
    return lm


def publisher_lm_tensors(lm: CosyLM) -> dict[str, torch.Tensor]:
    """CosyLM's tensors under llm.pt's names (the Qwen2 body under `llm.model.model.`, its tied head too)."""
    tensors = {}
    for name, tensor in lm.state_dict().items():
        is_own = name.startswith(("llm_embedding", "speech_embedding", "llm_decoder"))
        tensors[name if is_own else "llm.model.model." + name] = tensor.clone()
    tensors["llm.model.lm_head.weight"] = tensors["llm.model.model.embed_tokens.weight"]
    return tensors


def to_hyperpyyaml(data: dict) -> str:
    """`data` as hyperpyyaml text: sections tagged with the publisher's classes (TAGS), the Qwen path a reference."""
    return "\n".join(_yaml_lines(data, (), 0)) + "\n"


def _yaml_lines(data: dict, where: tuple[str, ...], indent: int) -> list[str]:
    lines = []
    for key, value in data.items():
        here = (*where, key)
        pad = " " * indent
        if isinstance(value, dict):
            tag = TAGS.get(here)
            lines.append(f"{pad}{key}:" + (f" {tag}" if tag else ""))
            if here == ("flow", "decoder", "cfm_params"):
                lines.append(f"{pad}    content:")
                lines += _yaml_lines(value, here, indent + 8)
            else:
                lines += _yaml_lines(value, here, indent + 4)
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return lines


def _scalar(value) -> str:
    if isinstance(value, str) and value.startswith("<") and value.endswith(">"):
        return f"!ref {value}"
    if isinstance(value, float):
        return f"{value:.10f}".rstrip("0") if abs(value) < 1e-3 else repr(value)
    return json.dumps(value)
