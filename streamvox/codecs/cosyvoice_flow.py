"""CosyVoice2's flow-matching detokenizer ("flow"): 25 Hz speech tokens -> 80-bin mel at 50 Hz.

The computation of the publisher's `CausalMaskedDiffWithXvec.inference`, on weights in its flow.pt layout
(a state dict; `load_state_dict(strict=True)` both ways):

    mu   = encoder_proj(UpsampleConformerEncoder(input_embedding([prompt tokens, tokens])))  # [B, 80, L], L = 2 N
    spk  = spk_embed_affine_layer(normalize(x-vector))                                      # [B, 80]
    cond = prompt mel in its first Tm frames, zeros after                                    # [B, 80, L]
    x_0  = a fixed noise buffer's prefix (seed 0), x_{k+1} = x_k + dt_k v_k with 10 Euler steps on a cosine
           schedule, v = 1.7 v(x, mu, spk, cond) - 0.7 v(x, 0, 0, 0) (classifier-free guidance)
    mel  = x_10[:, :, Tm:]

v is the U-Net-like 1-D estimator (`CausalConditionalDecoder`: causal conv resnet blocks + transformer blocks,
sinusoidal timestep embedding). A streaming request uses static-chunk attention masks in encoder and estimator;
a non-final one (finalize=False) treats its last `pre_lookahead_len` tokens as lookahead context only (or, with
the encoder option `encode_lookahead`, encodes them like the others and drops their frames: Chatterbox's S3Gen,
whose flow also has static_chunk_size 0 in both, i.e. full attention; see streamvox.codecs.s3gen).

API
    CosyVoiceFlow.from_config(params) / .from_checkpoint(path, params, device)   params: the nested `flow:` section
        of cosyvoice2.yaml as a plain dict (COSYVOICE2_FLOW_PARAMS, TINY_FLOW_PARAMS)
    flow.inference(tokens [1, T], prompt_tokens [1, Tp], prompt_mel [1, Tm, 80], speaker_embedding [1, 192],
                   streaming=False, finalize=True, noise=None, temperature=1.0) -> mel [1, 80, frames] fp32
    flow.inference_batch([FlowRequest, ...]) -> [mel [80, frames], ...]: requests of any lengths and modes in one
        padded batch, each row equal to its own inference() (masks keep the rows apart)
    write_tiny_flow(directory, params=TINY_FLOW_PARAMS, seed=0) -> path of a seeded random flow.pt
    tiny_flow_state_dict(params, seed) -> those weights as a state dict; flow_params(encoder, estimator) -> params

Runs on the module's device and dtype (CPU fp32 is the reference); the solver loop never syncs with the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from streamvox.codecs.conformer import UpsampleConformerEncoder, attention_mask, lengths_mask

NOISE_FRAMES = 50 * 300  # the publisher's fixed noise: 300 s of mel frames, drawn after seeding 0
NUM_MELS = 80


class CausalConv1d(nn.Conv1d):
    """Conv1d with kernel_size - 1 zeros on the left: output t reads inputs <= t."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T] -> [B, C_out, T]
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


class CausalBlock1D(nn.Module):
    """mish(LayerNorm_C(causal_conv3(x * mask))) * mask; `block.0` / `block.2` are the published conv / norm."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.block = nn.ModuleDict({"0": CausalConv1d(dim, dim_out, 3), "2": nn.LayerNorm(dim_out)})

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # x [B, C, T], mask [B, 1, T]
        h = self.block["0"](x * mask)
        h = self.block["2"](h.transpose(1, 2)).transpose(1, 2)
        return F.mish(h) * mask


class CausalResnetBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, dim_out))
        self.block1 = CausalBlock1D(dim, dim_out)
        self.block2 = CausalBlock1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x, mask) + self.mlp(t_emb)[:, :, None]  # [B, C_out, T]
        return self.block2(h, mask) + self.res_conv(x * mask)


class Resample(nn.Module):
    """Holds the stride-2 conv (down) or transposed conv (up) of a non-innermost U-Net level as `.conv`."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Attention(nn.Module):
    """Multi-head self-attention, diffusers layout (to_q/to_k/to_v without bias, to_out.0)."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_k = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_v = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim)])

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:  # [B, T, C], [B, T, T] bool
        B, T, _ = x.shape
        q, k, v = (lin(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
                   for lin in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])  # [B, H, T, d]
        return self.to_out[0](out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


class GeluProjection(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class TransformerBlock(nn.Module):
    """x + attn(LN(x)), then x + W2 gelu(W1 LN(x)) (4x hidden); matcha's BasicTransformerBlock layout."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([GeluProjection(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:  # [B, T, C]
        x = x + self.attn1(self.norm1(x), allowed)
        h = self.norm3(x)
        for layer in self.ff.net:
            h = layer(h)
        return x + h


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] flow time in [0, 1] -> [B, dim]: sin and cos of 1000 t at frequencies 10000^(-k / (dim/2 - 1))."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    angle = 1000 * t[:, None] * freq[None]
    return torch.cat([angle.sin(), angle.cos()], dim=-1).to(t.dtype)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, time_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim, time_dim)
        self.linear_2 = nn.Linear(time_dim, time_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class CausalConditionalDecoder(nn.Module):
    """The velocity estimator: [x, mu, spk, cond] [B, 320, L] -> [B, 80, L], a 1-D U-Net whose levels are a
    causal resnet block and transformer blocks; `channels` has one entry per level (the published model: one)."""

    def __init__(self, in_channels: int, out_channels: int, channels: Sequence[int], attention_head_dim: int,
                 n_blocks: int, num_mid_blocks: int, num_heads: int, static_chunk_size: int) -> None:
        super().__init__()
        self.in_channels, self.static_chunk_size = in_channels, static_chunk_size
        channels, time_dim = tuple(channels), 4 * channels[0]
        self.time_mlp = TimestepEmbedding(in_channels, time_dim)

        def level(dim: int, dim_out: int) -> list[nn.Module]:
            blocks = [TransformerBlock(dim_out, num_heads, attention_head_dim) for _ in range(n_blocks)]
            return [CausalResnetBlock1D(dim, dim_out, time_dim), nn.ModuleList(blocks)]

        last = len(channels) - 1
        self.down_blocks = nn.ModuleList()
        for n, (dim, dim_out) in enumerate(zip((in_channels, *channels[:-1]), channels, strict=True)):
            down = CausalConv1d(dim_out, dim_out, 3) if n == last else Resample(nn.Conv1d(dim_out, dim_out, 3, 2, 1))
            self.down_blocks.append(nn.ModuleList([*level(dim, dim_out), down]))
        self.mid_blocks = nn.ModuleList(nn.ModuleList(level(channels[-1], channels[-1])) for _ in range(num_mid_blocks))
        self.up_blocks = nn.ModuleList()
        for n, (dim, dim_out) in enumerate(zip(channels[::-1], (*channels[::-1][1:], channels[0]), strict=True)):
            up = CausalConv1d(dim_out, dim_out, 3) if n == last else Resample(
                nn.ConvTranspose1d(dim_out, dim_out, 4, 2, 1))
            self.up_blocks.append(nn.ModuleList([*level(2 * dim, dim_out), up]))
        self.final_block = CausalBlock1D(channels[0], channels[0])
        self.final_proj = nn.Conv1d(channels[0], out_channels, 1)

    def _transform(self, blocks: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor,
                   streaming: torch.Tensor) -> torch.Tensor:  # x [B, C, T], mask [B, 1, T]
        allowed = attention_mask(mask[:, 0].bool(), streaming, self.static_chunk_size)  # [B, T, T]
        h = x.transpose(1, 2)
        for block in blocks:
            h = block(h, allowed)
        return h.transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, t: torch.Tensor, streaming: torch.Tensor) -> torch.Tensor:
        """x [B, 320, L] = [noisy mel, mu, spk, cond], mask [B, 1, L], t [B], streaming [B] bool -> [B, 80, L]."""
        t_emb = self.time_mlp(timestep_embedding(t, self.in_channels))  # [B, 4 C]
        skips, masks = [], [mask]
        for resnet, blocks, down in self.down_blocks:
            x = self._transform(blocks, resnet(x, masks[-1], t_emb), masks[-1], streaming)
            skips.append(x)
            x = down(x * masks[-1])
            masks.append(masks[-1][:, :, ::2])
        masks.pop()
        for resnet, blocks in self.mid_blocks:
            x = self._transform(blocks, resnet(x, masks[-1], t_emb), masks[-1], streaming)
        for resnet, blocks, up in self.up_blocks:
            level_mask, skip = masks.pop(), skips.pop()
            x = torch.cat([x[:, :, :skip.shape[-1]], skip], dim=1)
            x = self._transform(blocks, resnet(x, level_mask, t_emb), level_mask, streaming)
            x = up(x * level_mask)
        x = self.final_block(x, level_mask)
        return self.final_proj(x * level_mask) * mask


def fixed_noise(channels: int = NUM_MELS, frames: int = NOISE_FRAMES) -> torch.Tensor:
    """The publisher's noise buffer, bit-exact: randn [1, channels, frames] right after seeding 0."""
    return torch.randn([1, channels, frames], generator=torch.Generator().manual_seed(0), device="cpu")


class CausalConditionalCFM(nn.Module):
    """Euler solver of the conditional flow with classifier-free guidance; owns the estimator and the noise."""

    def __init__(self, estimator: CausalConditionalDecoder, inference_cfg_rate: float, t_scheduler: str = "cosine",
                 n_timesteps: int = 10) -> None:
        super().__init__()
        self.estimator, self.inference_cfg_rate = estimator, inference_cfg_rate
        self.t_scheduler, self.n_timesteps = t_scheduler, n_timesteps
        self.register_buffer("rand_noise", fixed_noise(), persistent=False)  # [1, 80, 15000], not in flow.pt

    def time_span(self, like: torch.Tensor) -> torch.Tensor:  # [n + 1] times from 0 to 1
        t_span = torch.linspace(0, 1, self.n_timesteps + 1, device=like.device, dtype=like.dtype)
        return 1 - torch.cos(t_span * 0.5 * torch.pi) if self.t_scheduler == "cosine" else t_span

    def forward(self, z: torch.Tensor, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor,
                streaming: torch.Tensor) -> torch.Tensor:
        """z, mu, cond [B, 80, L], mask [B, 1, L], spks [B, 80], streaming [B] bool -> mel [B, 80, L]."""
        B, L = z.shape[0], z.shape[2]
        given = torch.cat([mu, spks[:, :, None].expand(-1, -1, L), cond], dim=1)  # [B, 240, L]
        given = torch.cat([given, torch.zeros_like(given)])  # [2B, 240, L]: conditioned rows, then unconditioned
        mask2, streaming2 = torch.cat([mask, mask]), torch.cat([streaming, streaming])
        t_span, rate = self.time_span(z), self.inference_cfg_rate
        t, dt, x = t_span[0], t_span[1] - t_span[0], z
        for step in range(1, len(t_span)):
            x2 = torch.cat([x, x])
            v = self.estimator(torch.cat([x2, given], dim=1), mask2, t.expand(2 * B), streaming2)  # [2B, 80, L]
            v_cond, v_free = v[:B], v[B:]
            x = x + dt * ((1.0 + rate) * v_cond - rate * v_free)
            t = t + dt
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        return x


@dataclass
class FlowRequest:
    """One detokenization: the mel of `tokens`, continuing a prompt (tokens, mel, speaker x-vector)."""

    tokens: torch.Tensor  # [T] int speech tokens after the prompt (all of them so far, when streaming)
    prompt_tokens: torch.Tensor  # [Tp] int
    prompt_mel: torch.Tensor  # [Tm, 80], Tm = 2 Tp in practice
    speaker_embedding: torch.Tensor  # [192] x-vector (normalized here)
    streaming: bool = False  # chunk-causal attention, as the publisher's streaming chunks
    finalize: bool = True  # False: the last pre_lookahead_len tokens are lookahead context only
    noise: torch.Tensor | None = None  # [80, >= frames + Tm] x_0 instead of the fixed buffer's prefix
    temperature: float = 1.0


class CosyVoiceFlow(nn.Module):
    def __init__(self, vocab_size: int, input_size: int, output_size: int, spk_embed_dim: int,
                 pre_lookahead_len: int, encoder: UpsampleConformerEncoder, decoder: CausalConditionalCFM) -> None:
        super().__init__()
        self.output_size, self.pre_lookahead_len = output_size, pre_lookahead_len
        self.token_mel_ratio = encoder.stride
        self.input_embedding = nn.Embedding(vocab_size, input_size)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, output_size)
        self.encoder = encoder
        self.encoder_proj = nn.Linear(encoder.output_size, output_size)
        self.decoder = decoder

    @classmethod
    def from_config(cls, params: dict) -> CosyVoiceFlow:
        """Build from the `flow:` section of cosyvoice2.yaml as a nested dict (see COSYVOICE2_FLOW_PARAMS)."""
        check_config(params)
        enc, dec = params["encoder"], params["decoder"]
        est, cfm = dec["estimator"], dec["cfm_params"]
        encoder = UpsampleConformerEncoder(
            enc["input_size"], enc["output_size"], enc["attention_heads"], enc["linear_units"], enc["num_blocks"],
            enc.get("static_chunk_size", 0), lookahead=params["pre_lookahead_len"], stride=params["token_mel_ratio"],
            encode_lookahead=enc.get("encode_lookahead", False))
        estimator = CausalConditionalDecoder(
            est["in_channels"], est["out_channels"], est["channels"], est["attention_head_dim"], est["n_blocks"],
            est["num_mid_blocks"], est["num_heads"], est.get("static_chunk_size", 50))
        decoder = CausalConditionalCFM(estimator, float(cfm["inference_cfg_rate"]), cfm["t_scheduler"])
        return cls(params["vocab_size"], params["input_size"], params["output_size"], params["spk_embed_dim"],
                   params["pre_lookahead_len"], encoder, decoder)

    @classmethod
    def from_checkpoint(cls, path: str | Path, params: dict, device: str | torch.device = "cpu") -> CosyVoiceFlow:
        """Load the publisher's flow.pt (or write_tiny_flow's) strictly; eval mode, fp32, on `device`."""
        flow = cls.from_config(params)
        flow.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        return flow.to(device).eval()

    @torch.inference_mode()
    def inference(self, tokens: torch.Tensor, prompt_tokens: torch.Tensor, prompt_mel: torch.Tensor,
                  speaker_embedding: torch.Tensor, streaming: bool = False, finalize: bool = True,
                  noise: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
        """tokens [1, T], prompt_tokens [1, Tp], prompt_mel [1, Tm, 80], speaker_embedding [1, 192],
        noise [1, 80, N] or None -> mel [1, 80, 2 (Tp + T') - Tm] fp32 (T' = T, or T - lookahead if not final)."""
        request = FlowRequest(tokens[0], prompt_tokens[0], prompt_mel[0], speaker_embedding[0], streaming, finalize,
                              None if noise is None else noise[0], temperature)
        return self.inference_batch([request])[0][None]

    @torch.inference_mode()
    def inference_batch(self, requests: Sequence[FlowRequest]) -> list[torch.Tensor]:
        """Requests of any lengths and modes in one padded batch -> [mel [80, frames_b] fp32 per request]."""
        device, dtype = self.spk_embed_affine_layer.weight.device, self.spk_embed_affine_layer.weight.dtype
        num_tokens = [r.prompt_tokens.shape[0] + r.tokens.shape[0] for r in requests]
        lookahead = [0 if r.finalize else self.pre_lookahead_len for r in requests]
        num_encoded = [n - k for n, k in zip(num_tokens, lookahead, strict=True)]
        prompt_frames = [r.prompt_mel.shape[0] for r in requests]
        frames = [self.token_mel_ratio * n for n in num_encoded]  # mel frames incl. the prompt's
        if any(f < p for f, p in zip(frames, prompt_frames, strict=True)):
            raise ValueError("fewer encoded tokens than the prompt mel covers")
        streaming = torch.tensor([r.streaming for r in requests], device=device)  # [B] bool
        tokens = nn.utils.rnn.pad_sequence(
            [torch.cat([r.prompt_tokens, r.tokens]).to(device=device, dtype=torch.long) for r in requests],
            batch_first=True)  # [B, N]
        h = self.encoder(self.input_embedding(tokens.clamp(min=0)), num_tokens, num_encoded, streaming)
        mu = self.encoder_proj(h).transpose(1, 2)  # [B, 80, L]
        L = mu.shape[2]
        spks = self.spk_embed_affine_layer(
            F.normalize(torch.stack([r.speaker_embedding for r in requests]).to(device, dtype), dim=1))  # [B, 80]
        cond = torch.zeros_like(mu)
        for b, r in enumerate(requests):
            cond[b, :, :prompt_frames[b]] = r.prompt_mel.to(device, dtype).T
        mask = lengths_mask(torch.tensor(frames, device=device), L)[:, None].to(dtype)  # [B, 1, L]
        z = torch.stack([self._noise(r, f, L) for r, f in zip(requests, frames, strict=True)])  # [B, 80, L]
        mel = self.decoder(z, mu, mask, spks, cond, streaming)
        return [mel[b, :, prompt_frames[b]:frames[b]].float() for b in range(len(requests))]

    def _noise(self, request: FlowRequest, frames: int, size: int) -> torch.Tensor:
        """x_0 of one row: [80, size], the first `frames` from the request's noise or the fixed buffer."""
        source = self.decoder.rand_noise[0] if request.noise is None else request.noise
        if source.shape[-1] < frames:
            raise ValueError(f"noise covers {source.shape[-1]} mel frames, {frames} needed")
        weight = self.spk_embed_affine_layer.weight
        return F.pad(source[:, :frames].to(weight.device, weight.dtype) * request.temperature, (0, size - frames))


def check_config(params: dict) -> None:
    """Refuse the options of the publisher's classes this implementation does not have (their defaults where a
    key is missing)."""
    enc, est = params["encoder"], params["decoder"]["estimator"]
    cfm = params["decoder"]["cfm_params"]
    expected = [
        (params.get("output_type", "mel"), "mel"), (params["output_size"], NUM_MELS),
        (enc.get("input_layer", "conv2d"), "linear"), (enc.get("pos_enc_layer_type", "rel_pos"), "rel_pos_espnet"),
        (enc.get("selfattention_layer_type", "rel_selfattn"), "rel_selfattn"),
        (enc.get("activation_type", "swish"), "swish"),
        (enc.get("normalize_before", True), True), (enc.get("macaron_style", True), False),
        (enc.get("use_cnn_module", True), False), (enc["input_size"], params["input_size"]),
        (est.get("act_fn", "snake"), "gelu"), (est["out_channels"], NUM_MELS), (est["in_channels"], 4 * NUM_MELS),
        (cfm.get("solver", "euler"), "euler"), (cfm["t_scheduler"] in ("cosine", "linear"), True),
    ]
    for value, want in expected:
        if value != want:
            raise ValueError(f"unsupported flow config: {value!r} where {want!r} is implemented")


def flow_params(enc: dict, est: dict) -> dict:
    """The cosyvoice2.yaml `flow:` section with the given encoder / estimator sizes (and other overrides, e.g.
    `static_chunk_size`; the encoder also takes `encode_lookahead`, see streamvox.codecs.conformer)."""
    return {
        "input_size": enc["output_size"], "output_size": NUM_MELS, "spk_embed_dim": 192, "output_type": "mel",
        "vocab_size": 6561, "input_frame_rate": 25, "only_mask_loss": True, "token_mel_ratio": 2,
        "pre_lookahead_len": 3,
        "encoder": {
            "dropout_rate": 0.1, "positional_dropout_rate": 0.1, "attention_dropout_rate": 0.1,
            "normalize_before": True, "input_layer": "linear", "pos_enc_layer_type": "rel_pos_espnet",
            "selfattention_layer_type": "rel_selfattn", "input_size": enc["output_size"], "use_cnn_module": False,
            "macaron_style": False, "static_chunk_size": 25, **enc,
        },
        "decoder": {
            "in_channels": 240, "n_spks": 1, "spk_emb_dim": NUM_MELS,
            "cfm_params": {"sigma_min": 1e-06, "solver": "euler", "t_scheduler": "cosine", "training_cfg_rate": 0.2,
                           "inference_cfg_rate": 0.7, "reg_loss_type": "l1"},
            "estimator": {"in_channels": 320, "out_channels": NUM_MELS, "dropout": 0.0, "act_fn": "gelu",
                          "static_chunk_size": 50, "num_decoding_left_chunks": -1, **est},
        },
    }


COSYVOICE2_FLOW_PARAMS = flow_params(
    {"output_size": 512, "attention_heads": 8, "linear_units": 2048, "num_blocks": 6},
    {"channels": [256], "attention_head_dim": 64, "n_blocks": 4, "num_mid_blocks": 12, "num_heads": 8})
TINY_FLOW_PARAMS = flow_params(
    {"output_size": 64, "attention_heads": 2, "linear_units": 128, "num_blocks": 2},
    {"channels": [64], "attention_head_dim": 16, "n_blocks": 1, "num_mid_blocks": 2, "num_heads": 2})


def tiny_flow_state_dict(params: dict = TINY_FLOW_PARAMS, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights for `params` in the publisher's layout (our state dict): weights N(0, 1/fan_in),
    biases N(0, 0.1^2), LayerNorm gains 1 + N(0, 0.1^2)."""
    flow = CosyVoiceFlow.from_config(params)
    norms = {f"{name}.weight" for name, module in flow.named_modules() if isinstance(module, nn.LayerNorm)}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in sorted(flow.state_dict().items()):
        noise = torch.randn(tensor.shape, generator=generator)
        if name in norms:
            state[name] = 1 + 0.1 * noise
        elif name.endswith(".bias"):
            state[name] = 0.1 * noise
        else:
            state[name] = noise * math.prod(tensor.shape[1:]) ** -0.5
    return state


def write_tiny_flow(directory: str | Path, params: dict = TINY_FLOW_PARAMS, seed: int = 0) -> Path:
    """tiny_flow_state_dict(params, seed) saved as directory/flow.pt. Returns the file's path."""
    path = Path(directory) / "flow.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_flow_state_dict(params, seed), path)
    return path
