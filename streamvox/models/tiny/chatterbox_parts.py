"""Tiny random-weight Chatterbox (ResembleAI/chatterbox) files around the T3 backbone, in the publisher's formats.

- ``t3_cfg.safetensors``: a tiny Llama under ``tfmr.`` (HF LlamaModel names, the publisher's Llama_520M settings
  at hidden 64, 2 layers, 1 head of 64: the publisher's head size, which the loader assumes), ``cond_enc.*``
  (Perceiver with the publisher's 32 queries and 4 heads at width 64), ``text_emb`` / ``speech_emb`` with the
  real vocabularies (704 / 8194), the real position tables (2050 / 4100) and the bias-free ``text_head`` /
  ``speech_head``.
- ``ve.safetensors``: the 3-layer LSTM voice encoder at LSTM width 32 (40 mels in, 256-d embedding out).
- ``tokenizer.json``: the publisher's layout (Whitespace pre-tokenizer, BPE with ``[UNK]``, added tokens
  ``[STOP]`` 0, ``[UNK]`` 1, ``[SPACE]`` 2, ``[START]`` 255, ``[PAD]``/``[SEP]``/``[CLS]``/``[MASK]`` 700-703),
  704 entries, a BPE trained on a few sentences over printable ASCII.
- ``conds.pt``: the built-in voice in ``Conditionals.save`` format: ``{"t3": T3Cond.__dict__, "gen": dict}`` with
  speaker_emb [1, 256], cond_prompt_speech_tokens [1, 150], emotion_adv [1, 1, 1] = 0.5, and S3Gen reference
  features of the right shapes (random): prompt_token [1, N], prompt_token_len [1], prompt_feat [1, 2N, 80],
  prompt_feat_len None (as S3Gen.embed_ref leaves it), embedding [1, 192].

API:

    TINY_T3_LLAMA: dict                           the tiny backbone's config in the publisher's LLAMA_CONFIGS style
    TINY_EMBEDDINGS: T3EmbeddingConfig
    TINY_VE_HIDDEN = 32
    t3_tensors(seed=0) -> dict[str, Tensor]      / write_tiny_t3(path, seed=0)         t3_cfg.safetensors
    ve_tensors(seed=0) -> dict[str, Tensor]      / write_tiny_ve(path, seed=0)         ve.safetensors
    tokenizer_json() -> dict                     / write_tiny_tokenizer(path)          tokenizer.json
    conds_dict(seed=0, gen_tokens=50) -> dict    / write_tiny_conds(path, seed=0)      conds.pt
    write_tiny_parts(directory, seed=0) -> Path   all four files into an existing directory
    write_tiny(path, seed=0) -> Path              a fresh directory with the four files (atomic)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from streamvox.codecs.voice_encoder import VoiceEncoder
from streamvox.models.chatterbox_cond import SPEECH_COND_PROMPT_LEN, START_SPEECH_TOKEN, T3EmbeddingConfig, T3Embeddings
from streamvox.models.tiny import write_atomically

TINY_HIDDEN = 64
TINY_T3_LLAMA = dict(
    vocab_size=8, max_position_embeddings=131072, hidden_size=TINY_HIDDEN, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=1, attn_implementation="sdpa", head_dim=64, tie_word_embeddings=False,
    hidden_act="silu", attention_bias=False, attention_dropout=0.0, initializer_range=0.02, mlp_bias=False,
    model_type="llama", num_key_value_heads=1, pretraining_tp=1, rms_norm_eps=1e-05,
    rope_scaling=dict(factor=8.0, high_freq_factor=4.0, low_freq_factor=1.0, original_max_position_embeddings=8192,
                      rope_type="llama3"),
    rope_theta=500000.0, torch_dtype="float32", use_cache=True,
)
TINY_EMBEDDINGS = T3EmbeddingConfig(hidden_size=TINY_HIDDEN)
TINY_VE_HIDDEN = 32
SPEAKER_EMBED_SIZE = 256
XVECTOR_SIZE = 192  # S3Gen's CAM++ speaker embedding
MEL_BINS = 80
TEXT_VOCAB = 704
EXTRA_SPECIALS = ("[PAD]", "[SEP]", "[CLS]", "[MASK]")  # the publisher's remaining special tokens, at 700..703
_CORPUS = (
    "The quick brown fox jumps over the lazy dog while the radio plays a song about the sea.",
    "Hello there! How are you today? I am fine, thank you, and I hope the weather stays warm and bright.",
    "Numbers like one, two, three, four, five, six, seven, eight, nine and ten are spoken every day.",
    "She sells sea shells by the sea shore; the shells she sells are surely from the shore.",
    "A voice agent listens, thinks, and answers: it should never stutter, stall or talk over the user.",
    "Please read this sentence slowly, with a calm voice, and pause briefly at every comma and period.",
    "Streaming speech needs the first sound quickly, and every later piece before the listener runs out.",
)


# ---------------------------------------------------------------------------------------------------------------
# t3_cfg.safetensors
# ---------------------------------------------------------------------------------------------------------------


def _tfmr_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """HF LlamaModel parameter names (under tfmr.) -> shapes."""
    hidden, inter, head_dim = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q_out, kv_out = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    shapes = {"tfmr.embed_tokens.weight": (cfg["vocab_size"], hidden), "tfmr.norm.weight": (hidden,)}
    for i in range(cfg["num_hidden_layers"]):
        layer = f"tfmr.layers.{i}."
        shapes.update({
            layer + "self_attn.q_proj.weight": (q_out, hidden), layer + "self_attn.k_proj.weight": (kv_out, hidden),
            layer + "self_attn.v_proj.weight": (kv_out, hidden), layer + "self_attn.o_proj.weight": (hidden, q_out),
            layer + "mlp.gate_proj.weight": (inter, hidden), layer + "mlp.up_proj.weight": (inter, hidden),
            layer + "mlp.down_proj.weight": (hidden, inter),
            layer + "input_layernorm.weight": (hidden,), layer + "post_attention_layernorm.weight": (hidden,),
        })
    return shapes


def _random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Weights that keep activations O(1): norms near 1, matrices ~ 1/sqrt(fan_in), embeddings ~ 0.5."""
    noise = torch.randn(shape, generator=generator)
    if name.endswith("norm.weight") or (name.endswith(".weight") and len(shape) == 1):
        return 1.0 + 0.1 * noise
    if name.endswith("bias"):
        return 0.05 * noise
    if "emb" in name.split(".")[0] or "pre_attention_query" in name:
        return 0.5 * noise
    return noise * shape[-1] ** -0.5


def t3_tensors(seed: int = 0, llama: dict | None = None, embeddings: T3EmbeddingConfig = TINY_EMBEDDINGS
               ) -> dict[str, torch.Tensor]:
    """Every tensor of a tiny t3_cfg.safetensors, under the publisher's names."""
    llama = llama or TINY_T3_LLAMA
    if llama["hidden_size"] != embeddings.hidden_size:
        raise ValueError("backbone and embedding widths differ")
    shapes = _tfmr_shapes(llama)
    shapes.update({name: tuple(t.shape) for name, t in T3Embeddings(embeddings).state_dict().items()})
    shapes["text_head.weight"] = (embeddings.text_vocab, embeddings.hidden_size)
    shapes["speech_head.weight"] = (embeddings.speech_vocab, embeddings.hidden_size)
    generator = torch.Generator().manual_seed(seed)
    return {name: _random_tensor(name, shape, generator) for name, shape in sorted(shapes.items())}


def write_tiny_t3(path: str | Path, seed: int = 0) -> Path:
    """t3_cfg.safetensors at `path` (a file name, or a directory to put it in)."""
    path = Path(path)
    path = path / "t3_cfg.safetensors" if path.is_dir() else path
    save_file(t3_tensors(seed), str(path))
    return path


# ---------------------------------------------------------------------------------------------------------------
# ve.safetensors
# ---------------------------------------------------------------------------------------------------------------


def ve_tensors(seed: int = 0, hidden: int = TINY_VE_HIDDEN) -> dict[str, torch.Tensor]:
    """A tiny voice encoder's tensors: PyTorch's default LSTM/Linear init (seeded), except that the first layer's
    input weights are scaled up 30x and the projection has no offset, so that the clip (its raw power mel is small,
    mostly < 1), not the biases, shapes the embedding."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VoiceEncoder(hidden_size=hidden, embed_size=SPEAKER_EMBED_SIZE)
    tensors = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
    tensors["lstm.weight_ih_l0"] *= 30.0
    tensors["proj.bias"].zero_()
    return tensors


def write_tiny_ve(path: str | Path, seed: int = 0) -> Path:
    path = Path(path)
    path = path / "ve.safetensors" if path.is_dir() else path
    save_file(ve_tensors(seed), str(path))
    return path


# ---------------------------------------------------------------------------------------------------------------
# tokenizer.json
# ---------------------------------------------------------------------------------------------------------------


def _trained_bpe(size: int) -> tuple[list[str], list[str]]:
    """(tokens in id order, merges as "a b") of a BPE over printable ASCII trained on _CORPUS, at most `size`."""
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = [chr(c) for c in range(33, 127)]
    trainer = trainers.BpeTrainer(vocab_size=size, initial_alphabet=alphabet, limit_alphabet=len(alphabet),
                                  show_progress=False)
    tokenizer.train_from_iterator(list(_CORPUS), trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    tokens = [token for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def _added(token_id: int, content: str) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def tokenizer_json() -> dict:
    """The tiny tokenizer.json as data (704 entries, the publisher's special ids)."""
    fixed = {"[STOP]": 0, "[UNK]": 1, "[SPACE]": 2, "[START]": 255}
    fixed.update({token: TEXT_VOCAB - len(EXTRA_SPECIALS) + i for i, token in enumerate(EXTRA_SPECIALS)})
    free = [i for i in range(TEXT_VOCAB) if i not in fixed.values()]  # 696 ids for ordinary tokens
    tokens, merges = _trained_bpe(len(free))
    tokens += [f"[PLACEHOLDER{i}]" for i in range(len(free) - len(tokens))]  # unreachable fillers
    vocab = dict(fixed)
    vocab.update(zip(tokens, free, strict=True))
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [_added(i, token) for token, i in sorted(fixed.items(), key=lambda item: item[1])],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "BPE", "dropout": None, "unk_token": "[UNK]", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": dict(sorted(vocab.items(), key=lambda item: item[1])), "merges": merges},
    }


def write_tiny_tokenizer(path: str | Path) -> Path:
    path = Path(path)
    path = path / "tokenizer.json" if path.is_dir() else path
    path.write_text(json.dumps(tokenizer_json(), indent=2, ensure_ascii=False))
    return path


# ---------------------------------------------------------------------------------------------------------------
# conds.pt
# ---------------------------------------------------------------------------------------------------------------


def conds_dict(seed: int = 0, gen_tokens: int = 50, prompt_tokens: int = SPEECH_COND_PROMPT_LEN) -> dict:
    """{"t3": T3Cond fields, "gen": S3Gen reference dict}, as Conditionals.save writes them."""
    generator = torch.Generator().manual_seed(seed + 11)
    speaker = torch.randn(1, SPEAKER_EMBED_SIZE, generator=generator).abs()  # a ReLU'd, unit-norm VE output
    t3 = {
        "speaker_emb": speaker / speaker.norm(dim=1, keepdim=True),
        "clap_emb": None,
        "cond_prompt_speech_tokens": torch.randint(0, START_SPEECH_TOKEN, (1, prompt_tokens), generator=generator),
        "cond_prompt_speech_emb": None,
        "emotion_adv": torch.full((1, 1, 1), 0.5),
    }
    gen = {
        "prompt_token": torch.randint(0, START_SPEECH_TOKEN, (1, gen_tokens), generator=generator),
        "prompt_token_len": torch.tensor([gen_tokens]),
        "prompt_feat": torch.randn(1, 2 * gen_tokens, MEL_BINS, generator=generator) - 5.0,  # log-mel-like
        "prompt_feat_len": None,
        "embedding": torch.randn(1, XVECTOR_SIZE, generator=generator),
    }
    return {"t3": t3, "gen": gen}


def write_tiny_conds(path: str | Path, seed: int = 0) -> Path:
    path = Path(path)
    path = path / "conds.pt" if path.is_dir() else path
    torch.save(conds_dict(seed), path)
    return path


def write_tiny_parts(directory: str | Path, seed: int = 0) -> Path:
    """t3_cfg.safetensors, ve.safetensors, tokenizer.json and conds.pt into an existing directory."""
    directory = Path(directory)
    write_tiny_t3(directory, seed)
    write_tiny_ve(directory, seed)
    write_tiny_tokenizer(directory)
    write_tiny_conds(directory, seed)
    return directory


def write_tiny(path: str | Path, seed: int = 0) -> Path:
    """A fresh directory at `path` holding the four tiny files (written aside, then moved into place)."""
    return write_atomically(path, lambda tmp: write_tiny_parts(tmp, seed))
