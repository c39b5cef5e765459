"""CosyVoice2: a Qwen2 LM that speaks 25 Hz speech tokens, made audible by chunked flow matching (tokens -> 50 Hz
mel, codecs/cosyvoice_flow.py) and the HiFT vocoder (mel -> 24 kHz PCM, codecs/hift.py), conditioned per request on
a speaker embedding, prompt speech tokens and a prompt mel (zero-shot cloning from a clip: codecs/cosyvoice_frontend).

Layout (FunAudioLLM/CosyVoice2-0.5B): cosyvoice2.yaml (hyper-parameters, hyperpyyaml tags), llm.pt, flow.pt,
hift.pt, campplus.onnx, speech_tokenizer_v2.onnx, spk2info.pt when present, CosyVoice-BlankEN/ (the Qwen2 config
and tokenizer; its weights are replaced by llm.pt).

Backbone inputs share one id space: [0, T) text (the Qwen2 embedding), T the start marker and T + 1 the task marker
(`llm_embedding`), T + 2 + s speech token s (`speech_embedding`). Prompt: start, the clip's transcript and the text,
task, the clip's speech tokens (with instructions: the style prompt and <|endofprompt|> in place of the transcript,
and no speech tokens; cross-lingual: neither). A step draws a speech token s < 6561, or 6561 = the end (the head's
two filler ids are never drawn). A frame is one token (40 ms). Chunks: the first covers 25 tokens plus what rounds
the flow's prompt tokens (the clip's, whatever the LM got) up to a multiple of 25, later ones 25, each once 3 more
tokens exist (the flow's lookahead); every chunk runs the flow over the prompt and all tokens so far and keeps the
new mel, as the publisher streams.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from streamvox.codecs.cosyvoice_flow import CosyVoiceFlow, FlowRequest
from streamvox.codecs.cosyvoice_frontend import EMBEDDING_DIM, CosyVoiceFrontend
from streamvox.codecs.hift import HiftStream, HiftVocoder, load_hift
from streamvox.config import SamplingParams
from streamvox.layers.attention import AttentionMetadata
from streamvox.layers.linear import Linear
from streamvox.layers.norm import RMSNorm
from streamvox.layers.rotary import RotaryEmbedding
from streamvox.models.base import Chunking, ChunkJob, Prepared, Reference, SpeechModel, TimingFacts
from streamvox.models.clips import ClipCache
from streamvox.models.llama import LlamaConfig, LlamaDecoderLayer
from streamvox.models.params import load_checked, on_meta
from streamvox.models.qwen_tokenizer import load_tokenizer

logger = logging.getLogger(__name__)
CONFIG_FILE = "cosyvoice2.yaml"
QWEN_SUBDIR = "CosyVoice-BlankEN"
SAMPLE_RATE = 24000
TOKEN_HZ = 25
TOKEN_HOP = 25  # tokens a chunk covers (the flow's training chunk)
# the publisher's tokenizer adds these after Qwen2's own (those already there keep their ids)
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endofprompt|>", "[breath]", "<strong>", "</strong>", "[noise]",
                  "[laughter]", "[cough]", "[clucking]", "[accent]", "[quick_breath]", "<laughter>", "</laughter>",
                  "[hissing]", "[sigh]", "[vocalized-noise]", "[lipsmack]", "[mn]")


@dataclass(frozen=True)
class CosyConditioning:
    """The flow's per-request input: who speaks, and the clip it continues (empty without one)."""

    speaker_embedding: torch.Tensor  # [192] float32
    prompt_tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))  # [Tp]
    prompt_mel: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 80))  # [2 Tp, 80]


@dataclass
class _CodecState:
    conditioning: CosyConditioning
    vocoder: HiftStream


class CosyLM(nn.Module):
    """Qwen2 over the paged KV cache, with CosyVoice2's input tables and speech-token head. `config.vocab_size`
    is what the head draws from (speech tokens and the end)."""

    def __init__(self, qwen: LlamaConfig, speech_vocab: int) -> None:
        super().__init__()
        self.text_vocab = qwen.vocab_size
        self.config = LlamaConfig(**{**qwen.__dict__, "vocab_size": speech_vocab + 1})
        self.embed_tokens = nn.Embedding(qwen.vocab_size, qwen.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(qwen) for _ in range(qwen.num_hidden_layers))
        self.norm = RMSNorm(qwen.hidden_size, qwen.rms_norm_eps)
        self.rotary = RotaryEmbedding(qwen.head_dim, qwen.rope_theta, qwen.rope_scaling)
        self.llm_embedding = nn.Embedding(2, qwen.hidden_size)  # start, task
        self.speech_embedding = nn.Embedding(speech_vocab + 3, qwen.hidden_size)
        self.llm_decoder = Linear(qwen.hidden_size, speech_vocab + 3)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[T] ids of the shared space -> [T, hidden]."""
        text, marker, speech = ids < self.text_vocab, ids - self.text_vocab, ids - self.text_vocab - 2
        x = self.embed_tokens(torch.where(text, ids, 0))
        x = torch.where((marker >= 0)[:, None] & (marker < 2)[:, None], self.llm_embedding(marker.clamp(0, 1)), x)
        return torch.where((speech >= 0)[:, None], self.speech_embedding(speech.clamp(min=0)), x)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_caches):
        x = self.embed(input_ids)
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            x = layer(x, positions, self.rotary, meta, kv)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, speech_vocab + 1] fp32 (the filler ids are left out: never drawn)."""
        return self.llm_decoder(hidden)[:, : self.config.vocab_size].float()


class CosyFrameBuilder:
    def __init__(self, speech_vocab: int) -> None:
        self._speech_vocab = speech_vocab

    def push(self, token: int) -> tuple[int, ...] | None:
        return (token,) if token < self._speech_vocab else None


class CosyVoice2Model(SpeechModel):
    family = "cosyvoice2"
    # the publisher samples with top-p 0.8 within the top 25 (and redraws repeated tokens: not done here)
    default_sampling = SamplingParams(temperature=1.0, top_k=25, top_p=0.8, max_tokens=1500)
    chunking = Chunking(first_chunk_frames=TOKEN_HOP, frames_per_chunk=TOKEN_HOP, lookahead_frames=3,
                        is_stateful=True, codec_prefix_frames=0)
    codes_per_frame = 1
    takes_reference_audio = True
    takes_instructions = True  # the publisher's instruct2 mode: "speak happily", "in a whisper", ...
    style_prompt = "every checkpoint"
    options = {"cross_lingual": (0.0, 0.0, 1.0)}  # 1: the clip only lends its voice (see prepare_request)
    # a call of the codec budget (8) takes 4 chunks of 25 frames: on the tiny (CPU) a chunk costs 97 ms alone
    # and 75 ms a chunk in 4 (80 ms in 8), and bigger calls would hold other streams' chunks back longer
    codec_cost_per_frame = 8 / (4 * TOKEN_HOP)

    def __init__(self, lm: CosyLM, tokenizer, flow: CosyVoiceFlow, vocoder: HiftVocoder,
                 frontend: CosyVoiceFrontend | None, speakers: dict[str, dict], is_random_weights: bool) -> None:
        self.backbone, self.tokenizer, self.flow, self.vocoder, self.frontend = lm, tokenizer, flow, vocoder, frontend
        self.tokenizer.encode_special_tokens = True  # text that spells a control token stays text
        self.speech_vocab = lm.config.vocab_size - 1
        self.stop_token_ids = frozenset({self.speech_vocab})
        self.speakers = speakers
        self.voices = tuple(speakers)
        self.default_voice = None
        self.timing = TimingFacts(SAMPLE_RATE, SAMPLE_RATE // TOKEN_HZ, lm_steps_per_frame=1)
        self.chunking = self._chunking(0)
        self.is_random_weights = is_random_weights
        self._clips = ClipCache()  # a clip's conditioning, once per distinct clip

    # -- checkpoint ----------------------------------------------------------------------------------------

    @classmethod
    def detect(cls, path: Path, name: str) -> bool:
        return (path / CONFIG_FILE).is_file()

    @classmethod
    def load(cls, path: Path, codec_dir: Path | None, dtype: torch.dtype, device: torch.device) -> CosyVoice2Model:
        missing = [name for name in (CONFIG_FILE, "llm.pt", "flow.pt", "hift.pt", QWEN_SUBDIR) if
                   not (path / name).exists()]
        if missing:
            raise FileNotFoundError(f"{path} lacks {', '.join(missing)} of the CosyVoice2 layout")
        params = read_hyperparameters(path / CONFIG_FILE)
        qwen_config = json.loads((path / QWEN_SUBDIR / "config.json").read_text())
        qwen = LlamaConfig.from_fields(qwen_config, "Qwen2", attention_bias=True)
        with on_meta():
            lm = CosyLM(qwen, params["llm"]["speech_token_size"])
        load_checked(lm, lm_tensors(torch.load(path / "llm.pt", map_location="cpu", weights_only=True)),
                     "the CosyVoice2 LM", device, dtype)
        flow = CosyVoiceFlow.from_checkpoint(path / "flow.pt", params["flow"], device)  # fp32, as published
        vocoder = load_hift(path / "hift.pt", params["hift"], device)
        tokenizer = load_tokenizer(path / QWEN_SUBDIR)
        tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
        frontend = _frontend(path)
        speakers = torch.load(path / "spk2info.pt", weights_only=True) if (path / "spk2info.pt").is_file() else {}
        return cls(lm, tokenizer, flow, vocoder, frontend, speakers, bool(params.get("streamvox_random_weights")))

    # -- prompt ------------------------------------------------------------------------------------------------

    def prepare(self, text: str, voice: str | None) -> list[int]:
        return self.prepare_request(text, voice).prompt

    def prepare_request(self, text: str, voice: str | None, reference: Reference | None = None,
                        options: dict[str, float] | None = None, instructions: str | None = None) -> Prepared:
        """The publisher's modes. Zero-shot with a reference: its transcript and speech tokens continue into the
        text. `instructions` (instruct2): the style prompt takes the transcript's place and the LM gets none of
        the clip's tokens. The `cross_lingual` option: the LM gets neither (for a clip in another language than
        the text). In every mode the clip's features condition the flow; without a clip, a stored speaker's
        embedding with a voice, else an unconditioned voice."""
        ids = self._text_ids(text)
        if not ids:
            raise ValueError("text is empty; give at least one word to speak")
        cross_lingual = self._cross_lingual(options, reference, instructions)
        if reference is not None:
            if self.frontend is None:
                raise ValueError("this server cannot clone CosyVoice2 voices: the checkpoint has no campplus.onnx "
                                 "or the server has no onnxruntime; send a voice instead")
            if not (instructions or cross_lingual or reference.text.strip()):
                raise ValueError("reference audio needs its transcript (what is said in it): send audio_text")
            conditioning = self._clone(reference.pcm)
        else:
            conditioning = self._speaker(self.resolve_voice(voice))
        prompt_text, lm_speech = [], []
        if instructions:
            prompt_text = [*self._text_ids(instructions), self.tokenizer.token_to_id("<|endofprompt|>")]
        elif reference is not None and not cross_lingual:
            prompt_text = self._text_ids(reference.text)
            lm_speech = conditioning.prompt_tokens.tolist()
        marker = self.backbone.text_vocab
        speech = [marker + 2 + int(token) for token in lm_speech]
        return Prepared([marker, *prompt_text, *ids, marker + 1, *speech], conditioning=conditioning,
                        chunking=self._chunking(conditioning.prompt_tokens.numel()))

    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    @staticmethod
    def _cross_lingual(options: dict[str, float] | None, reference: Reference | None,
                       instructions: str | None) -> bool:
        value = (options or {}).get("cross_lingual", 0.0)
        if value not in (0.0, 1.0):
            raise ValueError("cross_lingual is 0 (off) or 1 (on)")
        if value and reference is None:
            raise ValueError("cross_lingual speaks in the voice of a reference clip: send one (reference_audio on "
                             "the OpenAI route, audio on /generate)")
        if value and instructions:
            raise ValueError("instructions already keep the clip's words out of the prompt: leave cross_lingual "
                             "out when giving them")
        return bool(value)

    def _clone(self, pcm: torch.Tensor) -> CosyConditioning:
        """The conditioning of a clip, computed once per distinct clip (the last few are kept)."""
        return self._clips.get(pcm, self._conditioning_of)

    def _conditioning_of(self, pcm: torch.Tensor) -> CosyConditioning:
        features = self.frontend(pcm, SAMPLE_RATE)
        return CosyConditioning(features.speaker_embedding, features.prompt_tokens, features.prompt_mel)

    def _speaker(self, voice: str | None) -> CosyConditioning:
        if voice is None:
            return CosyConditioning(torch.zeros(EMBEDDING_DIM))
        embedding = self.speakers[voice].get("flow_embedding", self.speakers[voice].get("embedding"))
        return CosyConditioning(torch.as_tensor(embedding, dtype=torch.float32).reshape(-1))

    def _chunking(self, num_prompt_tokens: int) -> Chunking:
        """The first chunk also covers what rounds the prompt's tokens up to a multiple of the hop. Each chunk
        reruns the flow over the prompt's tokens and every one so far."""
        pad = math.ceil(num_prompt_tokens / TOKEN_HOP) * TOKEN_HOP - num_prompt_tokens
        return Chunking(TOKEN_HOP + pad, TOKEN_HOP, self.flow.pre_lookahead_len, is_stateful=True,
                        codec_prefix_frames=num_prompt_tokens)

    # -- steps and audio ---------------------------------------------------------------------------------------

    def next_input(self, token: int, text_id: int | None, step: int = 0) -> int:
        return self.backbone.text_vocab + 2 + token

    def new_frame_builder(self) -> CosyFrameBuilder:
        return CosyFrameBuilder(self.speech_vocab)

    def new_codec_state(self, conditioning: Any = None, seed: int = 0) -> _CodecState:
        generator = torch.Generator(self.flow.spk_embed_affine_layer.weight.device).manual_seed(seed)
        return _CodecState(conditioning or CosyConditioning(torch.zeros(EMBEDDING_DIM)),
                           HiftStream(self.vocoder, generator))

    def decode_chunks(self, jobs: list[ChunkJob]) -> list[torch.Tensor]:
        """Hop by hop, as the publisher streams (a job may cover several hops when the codec caught up): each
        round runs the flow for the next hop of every job in one padded batch, then each request's vocoder."""
        plans = [job.hops(self._chunking(job.state.conditioning.prompt_tokens.numel())) for job in jobs]
        pieces: list[list[torch.Tensor]] = [[] for _ in jobs]
        lookahead, ratio = self.flow.pre_lookahead_len, self.flow.token_mel_ratio
        for round_index in range(max(len(plan) for plan in plans)):
            active = [(i, plan[round_index]) for i, plan in enumerate(plans) if round_index < len(plan)]
            requests = []
            for i, (_, end, is_last) in active:
                cond = jobs[i].state.conditioning
                tokens = jobs[i].frames[: end if is_last else end + lookahead, 0]
                requests.append(FlowRequest(tokens, cond.prompt_tokens, cond.prompt_mel, cond.speaker_embedding,
                                            streaming=not is_last, finalize=is_last))
            for (i, (start, _, is_last)), mel in zip(active, self.flow.inference_batch(requests), strict=True):
                pieces[i].append(jobs[i].state.vocoder.step(mel[None, :, start * ratio :], is_last)[0])
        return [torch.cat(parts) for parts in pieces]


def _frontend(path: Path) -> CosyVoiceFrontend | None:
    """The clip encoders, or None (cloning is then refused, saying why): the checkpoint lacks them, or onnxruntime
    is not installed (a machine that only serves built-in voices may go without it)."""
    if not (path / "campplus.onnx").is_file():
        return None
    try:
        return CosyVoiceFrontend(path)
    except ImportError as missing:
        logger.warning("CosyVoice2 cloning is off: %s (pip install onnxruntime)", missing)
        return None


def lm_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llm.pt keys -> CosyLM's: the Qwen2 body's `llm.model.model.` prefix goes; its unused LM head is dropped."""
    tensors = {}
    for name, tensor in state_dict.items():
        if name.startswith("llm.model.model."):
            tensors[name[len("llm.model.model.") :]] = tensor
        elif not name.startswith("llm.model.") and "rotary_emb" not in name:
            tensors[name] = tensor
    return tensors


# -- cosyvoice2.yaml: hyperpyyaml read as plain data -------------------------------------------------------------

class _HyperLoader(yaml.SafeLoader):
    """`!new:` / `!name:` objects become their arguments (a mapping), `!apply:` calls are skipped, and `!ref`
    stays a marker resolved once the whole file is read."""


def _object(loader: _HyperLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        mapping = loader.construct_mapping(node, deep=True)
        return mapping.get("content", mapping) if suffix == "omegaconf.DictConfig" else mapping
    return loader.construct_sequence(node, deep=True) if isinstance(node, yaml.SequenceNode) else None


_HyperLoader.add_multi_constructor("!new:", _object)
_HyperLoader.add_multi_constructor("!name:", _object)
_HyperLoader.add_multi_constructor("!apply:", lambda loader, suffix, node: None)
_HyperLoader.add_constructor("!ref", lambda loader, node: _Ref(loader.construct_scalar(node)))


@dataclass(frozen=True)
class _Ref:
    expression: str  # "<name>" or arithmetic over several, e.g. "<chunk_size> * <token_mel_ratio>"


def read_hyperparameters(path: Path) -> dict:
    """cosyvoice2.yaml as nested plain data, references resolved."""
    try:
        raw = yaml.load(path.read_text(), Loader=_HyperLoader)
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not readable YAML: {error}") from None
    return _resolve(raw, raw)


def _resolve(value: Any, top: dict) -> Any:
    if isinstance(value, dict):
        return {key: _resolve(item, top) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve(item, top) for item in value]
    if isinstance(value, _Ref):
        names = re.findall(r"<([\w.]+)>", value.expression)
        values = {name: _resolve(top[name], top) for name in names}
        if value.expression.strip() == f"<{names[0]}>":
            return values[names[0]]
        arithmetic = re.sub(r"<([\w.]+)>", lambda match: repr(values[match.group(1)]), value.expression)
        if not re.fullmatch(r"[\d.\s+\-*/()]+", arithmetic):
            raise ValueError(f"cannot evaluate the reference {value.expression!r}")
        return eval(arithmetic, {"__builtins__": {}})  # digits and operators only (checked above)
    return value
