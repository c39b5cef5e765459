"""Chatterbox's S3Gen detokenizer (ResembleAI/chatterbox `s3gen.safetensors`): 25 Hz S3 speech tokens -> 24 kHz PCM,
conditioned on a reference clip.

Ours, built from the CosyVoice2 pieces where the two agree (the official code is chatterbox-tts 0.1.7,
`chatterbox.models.s3gen.s3gen.S3Token2Wav`):

- `flow.`: CosyVoice2's flow (streamvox.codecs.cosyvoice_flow), with full attention everywhere: Chatterbox builds
  its encoder and estimator with static_chunk_size 0, so it is *not* trained for chunk-causal streaming. Its
  x_0 is fresh N(0, 1) noise per call (no fixed buffer); 10 Euler steps, CFG 0.7, cosine schedule (meanflow off).
- `mel2wav.`: CosyVoice2's HiFT vocoder (streamvox.codecs.hift) with the older `SineGen` harmonic source.
- `tokenizer.`: the S3 tokenizer v2 (streamvox.codecs.s3_tokenizer); `speaker_encoder.`: CAM++ (codecs.campplus).
- `embed_ref`: the clip at 24 kHz cut to 10 s (the official DEC_COND_LEN) -> Matcha log-mel (prompt mel, 50 Hz),
  and at 16 kHz -> S3 tokens (prompt tokens, cut to mel_frames // 2 when longer) and the CAM++ x-vector. Clips
  at other rates are brought to 24 kHz with cosyvoice_frontend.resample (torchaudio's kernel; the official
  prepare_conditionals loads them with librosa at 24 kHz instead), 24 kHz -> 16 kHz as the official does.
- `inference`: flow over prompt + tokens, HiFT, then the official fade-in: the first 20 ms silenced, the next
  20 ms raised-cosine faded in (against "spill-over" from the prompt).

Checkpoint: the published file holds the 2490 tensors of the official S3Gen().state_dict() (weight norm as
`parametrizations.weight.original0/1`, BatchNorm `num_batches_tracked` included; so third-party converters of the
published files read them), which `from_safetensors` loads strictly (weight norm folded). The official loader calls
load_state_dict(strict=False), which would pass over any missing or extra key silently; its class declares
`tokenizer._mel_filters` / `tokenizer.window` (buffers it recomputes at init, absent from some later checkpoints)
ignorable when missing. Here those two may be absent (then computed), nothing else.

Streaming (the decode of a request's tokens in chunks, as CosyVoice2's detokenizer streams): each chunk runs the
flow over prompt + all tokens so far; a chunk that is not the last also encodes the next LOOKAHEAD_TOKENS tokens
and drops their frames (the official flow's finalize=False, whose mask bug in 0.1.7 makes it raise: fixed here);
the chunk's new mel goes to a per-request `HiftStream` (mel/source caches, Hamming cross-fade). Per request: x_0
comes from a NoiseTape (frame by frame from the request's generator, so a frame's noise does not depend on the
chunking) and HiFT draws from a second generator. With full attention a chunk's frames see no tokens past its
lookahead, so chunked output differs from the whole-utterance decode: on tiny random weights the chunked mel is
off by 13% of the mel's std (RMS) with 25-token chunks, 12% with 25 then 50, 7% with 50 (see test_s3gen.py).
Hence FIRST_CHUNK_TOKENS = 25 (latency), then CHUNK_TOKENS = 50: fewer chunk ends decoded without right context,
and fewer flow passes over the growing prefix (each chunk re-runs the flow over prompt + all tokens so far).

API
    S3Gen(params=S3GEN_PARAMS); S3Gen.from_safetensors(path, params=S3GEN_PARAMS, device="cpu")
    s3gen.load_publisher_state(state_dict); s3gen.publisher_state_dict() -> the file's layout
    s3gen.embed_ref(pcm, sample_rate) -> S3GenConditioning(prompt_tokens [Tp], prompt_mel [Tm, 80], x-vector [192])
    s3gen.mel(tokens [T], conditioning, noise [80, >= F] | None, finalize=True) -> mel [80, 2 T' + 2 Tp - Tm]
    s3gen.inference(tokens [T], conditioning, noise=None, generator=None) -> (pcm [1, 480 F], source [1, 1, 480 F])
        with F = 2 (Tp + T) - Tm mel frames (2 T unless the prompt mel has an odd frame count)
    s3gen.new_stream(conditioning, seed) -> S3GenStream
    s3gen.decode_chunks([S3GenChunk(stream, tokens, start, end, is_last), ...]) -> [pcm [n] per chunk]
    s3gen.decode_chunk(stream, tokens, start, end, is_last) -> pcm [n]
    write_tiny_s3gen(path, seed=0, params=TINY_S3GEN_PARAMS) -> Path of a random s3gen.safetensors
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from streamvox.codecs.campplus import CAMPPLUS_PARAMS, TINY_CAMPPLUS_PARAMS, CAMPPlus
from streamvox.codecs.cosyvoice_flow import CosyVoiceFlow, FlowRequest, flow_params, tiny_flow_state_dict
from streamvox.codecs.cosyvoice_frontend import (
    MIN_PROMPT_SECONDS,
    SILENCE_PEAK,
    SPEECH_SAMPLE_RATE,
    matcha_mel,
    mono_clip,
    resample,
)
from streamvox.codecs.hift import (
    COSYVOICE2_HIFT_PARAMS,
    TINY_HIFT_PARAMS,
    HiftStream,
    HiftVocoder,
    fold_weight_norm,
    publisher_state_dict,
    tiny_hift_state_dict,
)
from streamvox.codecs.s3_tokenizer import S3_TOKENIZER_PARAMS, TINY_S3_TOKENIZER_PARAMS, S3TokenizerV2

SAMPLE_RATE = 24000
TOKEN_HZ = 25
TOKEN_MEL_RATIO = 2  # 50 Hz mel, 480 samples a frame
SAMPLES_PER_TOKEN = SAMPLE_RATE // TOKEN_HZ  # 960
SPEECH_VOCAB = 6561
NUM_MELS = 80
PROMPT_SAMPLES = 10 * SAMPLE_RATE  # the official DEC_COND_LEN: the clip is cut to 10 s at 24 kHz
FADE_SAMPLES = SAMPLE_RATE // 50  # 20 ms silenced, then 20 ms faded in
LOOKAHEAD_TOKENS = 3  # the flow's pre_lookahead_len
# chunking for streams (tokens): see tests/codecs/test_s3gen.py for what chunking costs against the whole decode
FIRST_CHUNK_TOKENS = 25
CHUNK_TOKENS = 50
IGNORABLE_MISSING = ("tokenizer._mel_filters", "tokenizer.window")  # the official S3Gen.ignore_state_dict_missing


def _s3gen_params(encoder: dict, estimator: dict, tokenizer: dict, speaker: dict, hift: dict) -> dict:
    full_attention = {"static_chunk_size": 0}
    flow = flow_params({**encoder, **full_attention, "encode_lookahead": True}, {**estimator, **full_attention})
    return {"tokenizer": tokenizer, "speaker_encoder": speaker, "flow": flow,
            "hift": {**hift, "harmonic_source": "sine_gen"}}


S3GEN_PARAMS = _s3gen_params(
    {"output_size": 512, "attention_heads": 8, "linear_units": 2048, "num_blocks": 6},
    {"channels": [256], "attention_head_dim": 64, "n_blocks": 4, "num_mid_blocks": 12, "num_heads": 8},
    S3_TOKENIZER_PARAMS, CAMPPLUS_PARAMS, COSYVOICE2_HIFT_PARAMS)
TINY_S3GEN_PARAMS = _s3gen_params(
    {"output_size": 64, "attention_heads": 2, "linear_units": 128, "num_blocks": 2},
    {"channels": [64], "attention_head_dim": 16, "n_blocks": 1, "num_mid_blocks": 2, "num_heads": 2},
    TINY_S3_TOKENIZER_PARAMS, TINY_CAMPPLUS_PARAMS, TINY_HIFT_PARAMS)


def fade_in_window(samples: int = FADE_SAMPLES) -> torch.Tensor:
    """[2 samples] float32: zeros, then a raised cosine rising from 0 to 1 (the official `trim_fade`)."""
    window = torch.zeros(2 * samples)
    window[samples:] = (torch.cos(torch.linspace(math.pi, 0, samples)) + 1) / 2
    return window


@dataclass(frozen=True)
class S3GenConditioning:
    """What the flow continues: the reference clip's tokens and mel, and its speaker x-vector."""

    prompt_tokens: torch.Tensor  # [Tp] int64, 25 Hz
    prompt_mel: torch.Tensor  # [Tm, 80] float32, 50 Hz (Tm is 2 Tp, or 2 Tp + 1 for an odd frame count)
    speaker_embedding: torch.Tensor  # [192] float32 CAM++ x-vector


class NoiseTape:
    """A request's flow noise x_0, frame by frame: frame f is the f-th [80] draw of N(0, 1) from the generator,
    whatever the chunking (draws of whole frames; the tape keeps what it has drawn)."""

    def __init__(self, generator: torch.Generator, channels: int = NUM_MELS) -> None:
        self.generator, self.channels = generator, channels
        self.frames = torch.zeros(0, channels, device=generator.device)  # [F, 80]

    def take(self, frames: int) -> torch.Tensor:
        """-> [80, frames] (a view of the tape)."""
        missing = frames - self.frames.shape[0]
        if missing > 0:
            more = torch.randn(missing, self.channels, generator=self.generator, device=self.generator.device)
            self.frames = torch.cat([self.frames, more])
        return self.frames[:frames].T


@dataclass
class S3GenStream:
    """One request's decode state across chunks."""

    conditioning: S3GenConditioning
    noise: NoiseTape
    vocoder: HiftStream
    emitted: int = 0  # samples returned so far (the fade-in covers the first 2 * FADE_SAMPLES)
    decoded: int = 0  # tokens decoded so far: the next chunk starts here


@dataclass
class S3GenChunk:
    """Decode tokens[start:end] of a stream. `tokens` [N] holds all of the request's tokens so far: N >= end +
    LOOKAHEAD_TOKENS unless is_last (then end = N); chunks of a stream come in order, start = previous end."""

    stream: S3GenStream
    tokens: torch.Tensor
    start: int
    end: int
    is_last: bool


class S3Gen(nn.Module):
    def __init__(self, params: Mapping = S3GEN_PARAMS) -> None:
        super().__init__()
        self.params = copy.deepcopy(dict(params))
        self.tokenizer = S3TokenizerV2(**self.params["tokenizer"])
        self.speaker_encoder = CAMPPlus(**self.params["speaker_encoder"])
        self.flow = CosyVoiceFlow.from_config(self.params["flow"])
        self.mel2wav = HiftVocoder.from_config(self.params["hift"])
        self.register_buffer("trim_fade", fade_in_window(), persistent=False)

    # -- checkpoint ----------------------------------------------------------------------------------------------

    @classmethod
    def from_safetensors(cls, path: str | Path, params: Mapping = S3GEN_PARAMS,
                         device: str | torch.device = "cpu") -> S3Gen:
        """A publisher s3gen.safetensors (or write_tiny_s3gen's) -> S3Gen in eval mode, fp32, on `device`."""
        from safetensors.torch import load_file

        model = cls(params)
        model.load_publisher_state(load_file(str(path)))
        return model.to(device).eval()

    def load_publisher_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Strict load of the file's tensors: every one used, none missing but the two IGNORABLE_MISSING buffers."""
        state = fold_weight_norm(state)
        for key in IGNORABLE_MISSING:
            if key not in state:
                state[key] = self.state_dict()[key]
        self.load_state_dict(state, strict=True)

    def publisher_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's tensors in the file's layout (weight norm as original0/1 with unit direction scales)."""
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("mel2wav.")}
        state.update({f"mel2wav.{k}": v for k, v in publisher_state_dict(self.mel2wav).items()})
        return state

    # -- reference clip ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def embed_ref(self, pcm, sample_rate: int) -> S3GenConditioning:
        """A mono float clip ([S] or [1, S], tensor or array) at `sample_rate` -> the flow's conditioning, as the
        official prepare_conditionals + embed_ref compute it (the clip resampled to 24 kHz, cut to 10 s)."""
        if isinstance(sample_rate, bool) or int(sample_rate) != sample_rate or sample_rate <= 0:
            raise ValueError(f"sample rate must be a positive integer, got {sample_rate!r}")
        wave = resample(mono_clip(pcm).to(torch.float32), int(sample_rate), SAMPLE_RATE)[:PROMPT_SAMPLES]
        if wave.shape[0] < MIN_PROMPT_SECONDS * SAMPLE_RATE:
            raise ValueError(f"reference clip is {wave.shape[0] / SAMPLE_RATE:.3f} s long; give at least "
                             f"{MIN_PROMPT_SECONDS} s of speech (up to 10 s are used)")
        if float(wave.abs().max()) < SILENCE_PEAK:
            raise ValueError("reference clip is silent; pass a clip with audible speech, scaled to [-1, 1]")
        mel = matcha_mel(wave).T.contiguous()  # [Tm, 80]
        wave16 = resample(wave, SAMPLE_RATE, SPEECH_SAMPLE_RATE)
        tokens = self.tokenizer.tokenize(wave16).cpu()  # [Tp]
        if mel.shape[0] != TOKEN_MEL_RATIO * tokens.shape[0]:
            tokens = tokens[: mel.shape[0] // TOKEN_MEL_RATIO]
        return S3GenConditioning(tokens.contiguous(), mel, self.speaker_encoder.embed(wave16).cpu())

    # -- whole utterances ----------------------------------------------------------------------------------------

    def _request(self, tokens: torch.Tensor, cond: S3GenConditioning, noise: torch.Tensor | None,
                 finalize: bool) -> FlowRequest:
        return FlowRequest(tokens.reshape(-1), cond.prompt_tokens, cond.prompt_mel, cond.speaker_embedding,
                           streaming=False, finalize=finalize, noise=noise)

    @torch.inference_mode()
    def mel(self, tokens: torch.Tensor, conditioning: S3GenConditioning, noise: torch.Tensor | None = None,
            finalize: bool = True) -> torch.Tensor:
        """The official flow_inference: tokens [T] -> mel [80, 2 (Tp + T') - Tm] (T' = T, or T - 3 unless
        finalize). noise [80, >= 2 (Tp + T')]: x_0 (default: N(0, 1) from the global RNG, laid out as the
        official randn_like)."""
        if noise is None:
            frames = TOKEN_MEL_RATIO * (conditioning.prompt_tokens.shape[0] + tokens.numel()
                                        - (0 if finalize else LOOKAHEAD_TOKENS))
            noise = torch.randn(1, NUM_MELS, frames, device=self.trim_fade.device)[0]
        return self.flow.inference_batch([self._request(tokens, conditioning, noise, finalize)])[0]

    @torch.inference_mode()
    def inference(self, tokens: torch.Tensor, conditioning: S3GenConditioning, noise: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The official S3Gen.inference: tokens [T] (or [1, T]) -> (pcm [1, 480 F], source [1, 1, 480 F]).
        Randomness as the official draws it (flow noise [1, 80, L], then HiFT's): from `generator`, else the
        global RNG, so torch.manual_seed(s) before the official call equals a generator seeded with s."""
        if noise is None:
            frames = TOKEN_MEL_RATIO * (conditioning.prompt_tokens.shape[0] + tokens.numel())
            device = self.trim_fade.device
            noise = torch.randn(1, NUM_MELS, frames, generator=generator, device=device)[0]
        mel = self.mel(tokens, conditioning, noise)
        pcm, source = self.mel2wav.inference(mel[None], None, None if generator is None else [generator])
        fade = self.trim_fade[: pcm.shape[1]]
        pcm[:, : fade.shape[0]] *= fade
        return pcm, source

    # -- streams -------------------------------------------------------------------------------------------------

    def new_stream(self, conditioning: S3GenConditioning, seed: int = 0) -> S3GenStream:
        """A request's decode state: its noise tape and HiFT stream, on generators derived from `seed`."""
        device = self.trim_fade.device
        noise = NoiseTape(torch.Generator(device).manual_seed(seed))
        vocoder = HiftStream(self.mel2wav, torch.Generator(device).manual_seed(seed + 1))
        return S3GenStream(conditioning, noise, vocoder)

    def _chunk_request(self, chunk: S3GenChunk) -> FlowRequest:
        used = chunk.end if chunk.is_last else chunk.end + LOOKAHEAD_TOKENS
        if chunk.is_last and chunk.end != chunk.tokens.shape[0]:
            raise ValueError(f"the last chunk must end at the last token ({chunk.tokens.shape[0]}), got {chunk.end}")
        if chunk.tokens.shape[0] < used or chunk.start >= chunk.end:
            raise ValueError(f"chunk [{chunk.start}, {chunk.end}) needs tokens up to {used}, "
                             f"got {chunk.tokens.shape[0]}")
        if chunk.start != chunk.stream.decoded:
            raise ValueError(f"chunks of a stream come in order: this one starts at {chunk.start}, "
                             f"the stream has decoded {chunk.stream.decoded} tokens")
        cond = chunk.stream.conditioning
        frames = TOKEN_MEL_RATIO * (cond.prompt_tokens.shape[0] + chunk.end)
        return self._request(chunk.tokens[:used], cond, chunk.stream.noise.take(frames), chunk.is_last)

    def _fade(self, stream: S3GenStream, pcm: torch.Tensor) -> torch.Tensor:
        """Apply the fade-in to the stream's first 2 * FADE_SAMPLES samples. pcm [n] -> [n]."""
        if stream.emitted < self.trim_fade.shape[0]:
            window = self.trim_fade[stream.emitted: stream.emitted + pcm.shape[0]]
            pcm = torch.cat([pcm[: window.shape[0]] * window, pcm[window.shape[0]:]])
        stream.emitted += pcm.shape[0]
        return pcm

    @torch.inference_mode()
    def decode_chunks(self, chunks: Sequence[S3GenChunk]) -> list[torch.Tensor]:
        """The flow for every chunk in one padded batch, then each stream's vocoder -> [pcm [n] per chunk]."""
        mels = self.flow.inference_batch([self._chunk_request(chunk) for chunk in chunks])
        out = []
        for chunk, mel in zip(chunks, mels, strict=True):
            cond = chunk.stream.conditioning
            first = max(0, TOKEN_MEL_RATIO * (cond.prompt_tokens.shape[0] + chunk.start) - cond.prompt_mel.shape[0])
            pcm = chunk.stream.vocoder.step(mel[None, :, first:], chunk.is_last)[0]
            chunk.stream.decoded = chunk.end
            out.append(self._fade(chunk.stream, pcm))
        return out

    def decode_chunk(self, stream: S3GenStream, tokens: torch.Tensor, start: int, end: int,
                     is_last: bool) -> torch.Tensor:
        return self.decode_chunks([S3GenChunk(stream, tokens, start, end, is_last)])[0]


# -- tiny checkpoints ----------------------------------------------------------------------------------------------


def _random_like(name: str, tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A lively random value for one tensor: weights N(0, 1/fan_in), biases N(0, 0.1^2), norm gains near 1,
    BatchNorm running statistics of a plausible scale."""
    if not tensor.is_floating_point():
        return torch.zeros_like(tensor)  # num_batches_tracked
    noise = torch.randn(tensor.shape, generator=generator)
    if name.endswith("running_var"):
        return 0.5 + torch.rand(tensor.shape, generator=generator)
    if name.endswith(("running_mean", "bias")):
        return 0.1 * noise
    if tensor.dim() == 1:  # LayerNorm / BatchNorm gains
        return 1 + 0.1 * noise
    return noise * tensor[0].numel() ** -0.5


def _random_module_state(module: nn.Module, generator: torch.Generator, keep: Sequence[str] = ()) -> dict:
    return {name: tensor.clone() if name in keep else _random_like(name, tensor, generator)
            for name, tensor in sorted(module.state_dict().items())}


def write_tiny_s3gen(path: str | Path, seed: int = 0, params: Mapping = TINY_S3GEN_PARAMS) -> Path:
    """A seeded random s3gen.safetensors for `params` holding every publisher key (the real strides and rates,
    tiny widths). The tokenizer's FSQ projection is scaled up so that clips give varied tokens."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tokenizer = S3TokenizerV2(**params["tokenizer"])
    state = {f"tokenizer.{k}": v for k, v in
             _random_module_state(tokenizer, generator, keep=("_mel_filters", "window")).items()}
    state["tokenizer.quantizer._codebook.project_down.weight"] *= 8.0
    speaker = CAMPPlus(**params["speaker_encoder"])
    state.update({f"speaker_encoder.{k}": v for k, v in _random_module_state(speaker, generator).items()})
    state.update({f"flow.{k}": v for k, v in tiny_flow_state_dict(params["flow"], seed).items()})
    state.update({f"mel2wav.{k}": v for k, v in tiny_hift_state_dict(params["hift"], seed).items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
