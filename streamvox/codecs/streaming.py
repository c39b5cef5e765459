"""Building blocks of causal codec decoders that run chunk by chunk, each request continuing its own state.

Every layer is causal, so a request decoded in chunks equals its whole-utterance decode, provided each layer
carries its left context from one chunk to the next (`StreamState`):
- a causal convolution keeps its last (kernel - 1) * dilation input samples (zeros before the first chunk,
  which is the constant padding of the whole-utterance decode);
- a transposed convolution keeps the kernel - stride output samples that overlap the next chunk's output,
  bias excluded (it is added once, to the finished samples);
- windowed attention keeps the keys and values of its last `sliding_window` - 1 positions, and the number of
  positions seen (for RoPE).

A batch may hold requests at different points of their streams; layers read each row's context from the
codec's `StatePool` (fixed device buffers, a row per request) and stage the new context, committed only once the
whole batch has decoded (`StateBatch`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from streamvox.layers.rotary import RotaryEmbedding


@dataclass
class StreamState:
    """One request's stream: its row of the codec's StatePool (given at its first decode) and how far it got."""

    row: int | None = None
    num_positions: int = 0  # transformer (25 Hz) positions decoded so far
    kept: dict[int, int] = field(default_factory=dict)  # per transformer layer: real past keys held (< window)
    is_released: bool = False


class StatePool:
    """Every request's left context in fixed device buffers, a row per request: [rows, channels, length] per
    streaming layer slot, [rows, kv_heads, window - 1, head_dim] keys and values per transformer layer (a row's
    kept keys right-aligned). A row is zeroed when it is handed out (the context before a stream's first chunk)
    and comes back when its request is released; the buffers grow (double) only when every row is taken, so a
    chunk allocates no state. Rows are handed out by the decoding thread; `release` may come from another."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.capacity = 0
        self.buffers: dict[tuple[str, int], torch.Tensor] = {}
        self._free: list[int] = []
        self._released: deque[int] = deque()  # appended by any thread, taken back by `assign`

    def assign(self, states: list[StreamState]) -> torch.Tensor:
        """The rows of `states` on the device [B] int64, handing fresh (zeroed) rows to new streams."""
        while self._released:
            self._free.append(self._released.popleft())
        for state in states:
            if state.row is None:
                if not self._free:
                    self._grow()
                state.row = self._free.pop()
                for buffer in self.buffers.values():
                    buffer[state.row].zero_()
        return torch.tensor([state.row for state in states], dtype=torch.int64).to(self.device)

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._released)

    def release(self, state: StreamState) -> None:
        """The stream is over: its row may go to another (at the next `assign`)."""
        if state.row is not None and not state.is_released:
            state.is_released = True
            self._released.append(state.row)

    def buffer(self, key: tuple[str, int], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """[capacity, *shape] of one layer's context (made, zeroed, on its first use)."""
        if (buffer := self.buffers.get(key)) is None:
            with torch.inference_mode(False):  # updated in place by decodes in and out of inference mode
                buffer = torch.zeros((self.capacity, *shape), dtype=dtype, device=self.device)
            self.buffers[key] = buffer
        return buffer

    def _grow(self) -> None:
        capacity = max(8, 2 * self.capacity)
        for key, old in self.buffers.items():
            with torch.inference_mode(False):
                new = old.new_zeros((capacity, *old.shape[1:]))
                new[: self.capacity] = old
            if old.is_cuda:  # made on another stream perhaps (a memory profile's): not reused before this copy
                old.record_stream(torch.cuda.current_stream(old.device))
            self.buffers[key] = new
        self._free += range(capacity - 1, self.capacity - 1, -1)  # lowest first
        self.capacity = capacity


class StateBatch:
    """The streams decoded together (rows in batch order). Layers read the old context from the pool and stage
    the new one; `commit` writes it only once the whole batch has decoded, so a failed batch leaves every stream
    as it was and its chunks can be retried."""

    def __init__(self, states: list[StreamState], pool: StatePool) -> None:
        self.states = states
        self.pool = pool
        self.rows = pool.assign(states)
        self._staged: list[tuple[tuple[str, int], torch.Tensor]] = []  # (buffer key, [B, ...] new context)
        self._kept: list[tuple[int, list[int]]] = []
        self._num_new_positions = 0

    def past(self, slot: int, channels: int, length: int, like: torch.Tensor) -> torch.Tensor:
        """[B, channels, length] context of one layer; zeros for a request's first chunk."""
        return self.pool.buffer(("conv", slot), (channels, length), like.dtype).index_select(0, self.rows)

    def keep(self, slot: int, context: torch.Tensor) -> None:
        self._staged.append((("conv", slot), context))

    def past_kv(self, layer_index: int, shape: tuple[int, int, int], num_past: int,
                like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, kv_heads, num_past, head_dim]: the last `num_past` of the window - 1 past keys and values the pool
        holds for one transformer layer (right-aligned; `kept` says how many of each row's are real)."""
        return tuple(self.pool.buffer((name, layer_index), shape, like.dtype).narrow(2, shape[1] - num_past, num_past)
                     .index_select(0, self.rows) for name in ("keys", "values"))

    def kept(self, layer_index: int) -> list[int]:
        return [state.kept.get(layer_index, 0) for state in self.states]

    def keep_kv(self, layer_index: int, keys: torch.Tensor, values: torch.Tensor, kept: list[int]) -> None:
        self._staged += [(("keys", layer_index), keys), (("values", layer_index), values)]
        self._kept.append((layer_index, kept))

    def advance(self, num_positions: int) -> None:
        """The attention positions this chunk adds (applied with the rest at commit)."""
        self._num_new_positions = num_positions

    def commit(self) -> None:
        for key, context in self._staged:  # into the last columns (a young stream's keys fill fewer than all)
            buffer = self.pool.buffers[key]
            buffer.narrow(2, buffer.shape[2] - context.shape[2], context.shape[2]).index_copy_(0, self.rows, context)
        for layer_index, kept in self._kept:
            for state, num_kept in zip(self.states, kept, strict=True):
                state.kept[layer_index] = num_kept
        for state in self.states:
            state.num_positions += self._num_new_positions
        self._staged, self._kept = [], []
        self._num_new_positions = 0


class CausalConv1d(nn.Module):
    """Conv1d over a stream: left context from the previous chunk instead of zero padding."""

    def __init__(self, slot: int, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1,
                 groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.slot = slot
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation, groups=groups, bias=bias)
        self.context = (kernel_size - 1) * dilation

    def forward(self, x: torch.Tensor, batch: StateBatch) -> torch.Tensor:  # [B, C, T] -> [B, C', T]
        if self.context:
            x = torch.cat([batch.past(self.slot, x.shape[1], self.context, x), x], dim=-1)
            batch.keep(self.slot, x[..., -self.context :])
        return self.conv(x)


class CausalConvTranspose1d(nn.Module):
    """ConvTranspose1d over a stream: each chunk's overlapping tail is added to the next chunk's head."""

    def __init__(self, slot: int, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        if kernel_size < stride:
            raise ValueError(f"transposed conv kernel {kernel_size} shorter than its stride {stride}")
        self.slot = slot
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias)
        self.tail = kernel_size - stride

    def forward(self, x: torch.Tensor, batch: StateBatch) -> torch.Tensor:  # [B, C, T] -> [B, C', T * stride]
        conv = self.conv
        y = F.conv_transpose1d(x, conv.weight, None, conv.stride, groups=conv.groups)  # [B, C', T*s + tail]
        num_out = x.shape[-1] * conv.stride[0]
        if self.tail:
            y = torch.cat([y[..., : self.tail] + batch.past(self.slot, y.shape[1], self.tail, y), y[..., self.tail :]],
                          dim=-1)
            batch.keep(self.slot, y[..., num_out:])
        y = y[..., :num_out]
        return y if conv.bias is None else y + conv.bias[:, None]


class LayerScale(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class ScaledTransformerLayer(nn.Module):
    """Pre-norm transformer layer over windowed attention, each branch scaled per channel; the codec picks its
    norm and feed-forward."""

    def __init__(self, config: dict, layer_index: int, norm: Callable[[int], nn.Module], mlp: nn.Module) -> None:
        super().__init__()
        hidden = config["hidden_size"]
        self.self_attn = WindowedAttention(config, layer_index)
        self.mlp = mlp
        self.input_layernorm = norm(hidden)
        self.post_attention_layernorm = norm(hidden)
        self.self_attn_layer_scale = LayerScale(hidden)
        self.mlp_layer_scale = LayerScale(hidden)

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, batch: StateBatch) -> torch.Tensor:
        x = x + self.self_attn_layer_scale(self.self_attn(self.input_layernorm(x), rotary, batch))
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))


class WindowedAttention(nn.Module):
    def __init__(self, config: dict, layer_index: int) -> None:
        super().__init__()
        hidden, bias = config["hidden_size"], config.get("attention_bias", False)
        self.num_heads, self.num_kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        self.head_dim = config.get("head_dim") or hidden // self.num_heads
        self.layer_index = layer_index
        self.window = config["sliding_window"]
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, batch: StateBatch) -> torch.Tensor:
        """x: [B, T, hidden]; each row continues its own request's positions and keys."""
        num_rows, num_new, _ = x.shape
        q = self.q_proj(x).view(num_rows, num_new, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(num_rows, num_new, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(num_rows, num_new, self.num_kv_heads, self.head_dim)
        device = x.device
        starts = torch.tensor([state.num_positions for state in batch.states]).to(device, non_blocking=True)
        positions = (starts[:, None] + torch.arange(num_new, device=device)[None, :]).reshape(-1)  # [B*T]
        q, k = rotary(q.reshape(-1, self.num_heads, self.head_dim), k.reshape(-1, self.num_kv_heads, self.head_dim),
                      positions)
        q = q.view(num_rows, num_new, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(num_rows, num_new, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.transpose(1, 2)
        # the rows' pasts, as many columns as the longest has (at most window - 1); columns before a row's own
        # kept keys are masked
        kept = batch.kept(self.layer_index)
        num_past = max(kept)
        past_k, past_v = batch.past_kv(self.layer_index, (self.num_kv_heads, self.window - 1, self.head_dim),
                                       num_past, k)
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        # key column j sits (num_past + i - j) positions before query i; it is visible if that distance is in
        # [0, window) and the column holds a real key of this row
        columns = torch.arange(num_past + num_new, device=device)
        distance = num_past + torch.arange(num_new, device=device)[:, None] - columns[None, :]  # [T, K]
        visible = (distance >= 0) & (distance < self.window)
        first_real = num_past - torch.tensor(kept).to(device, non_blocking=True)
        is_real = columns[None, :] >= first_real[:, None]  # [B, K]
        mask = visible[None] & is_real[:, None, :]  # [B, T, K]
        repeat = self.num_heads // self.num_kv_heads
        keys, values = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = torch.matmul(q, keys.transpose(2, 3)) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        out = torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), values)  # [B, H, T, D]
        num_keep = min(self.window - 1, num_past + num_new)
        batch.keep_kv(self.layer_index, k[:, :, k.shape[2] - num_keep :], v[:, :, v.shape[2] - num_keep :],
                      [min(self.window - 1, num_kept + num_new) for num_kept in kept])
        return self.o_proj(out.transpose(1, 2).reshape(num_rows, num_new, -1))


def random_tensors(shapes: dict[str, tuple[int, ...]], generator: torch.Generator, ones: tuple[str, ...],
                   small: tuple[str, ...] = (".bias",)) -> dict[str, torch.Tensor]:
    """Seeded weights for a tiny checkpoint: names ending in `ones` are 1, in `small` N(0, 0.01^2), the rest
    N(0, 1 / fan_in), so activations keep their scale through every layer."""
    tensors = {}
    for name, shape in sorted(shapes.items()):
        if name.endswith(ones):
            tensors[name] = torch.ones(shape)
        elif name.endswith(small):
            tensors[name] = torch.randn(shape, generator=generator) * 0.01
        else:
            tensors[name] = torch.randn(shape, generator=generator) * math.prod(shape[1:]) ** -0.5
    return tensors


class StreamingCodec:
    """Decodes the next chunk of many requests at once, each continuing its own `StreamState`. A subclass sets
    `num_codebooks`, `name`, `net`, `codebooks` and `projections`, and decodes one batch of equal-length chunks
    in `_decode_batch`. It runs in fp32 on its device; states live on that device too."""

    name: str
    num_codebooks: int
    net: nn.Module
    codebooks: list[torch.Tensor]
    projections: list[torch.Tensor]
    device = torch.device("cpu")

    def to(self, device: torch.device | str) -> StreamingCodec:
        self.device = torch.device(device)
        self.net.to(self.device)
        self.codebooks = [codebook.to(self.device) for codebook in self.codebooks]
        self.projections = [projection.to(self.device) for projection in self.projections]
        return self

    def new_state(self) -> StreamState:
        return StreamState()

    def release(self, state: StreamState) -> None:
        """A stream is over: its row of the state pool may serve another."""
        if (pool := getattr(self, "_pool", None)) is not None:
            pool.release(state)

    @property
    def pool(self) -> StatePool:
        if getattr(self, "_pool", None) is None or self._pool.device != self.device:
            self._pool = StatePool(self.device)
        return self._pool

    def decode(self, codes: list[torch.Tensor], states: list[StreamState]) -> list[torch.Tensor]:
        """codes [num_frames, num_codebooks] per request, each with its own state (a request appears at most
        once) -> float32 PCM per request. Chunks of the same length run as one batch."""
        if len(codes) != len(states) or len({id(state) for state in states}) != len(states):
            raise ValueError("decode needs one distinct state per chunk: a request's chunks go one call at a time")
        out: list[torch.Tensor | None] = [None] * len(codes)
        by_length: dict[int, list[int]] = {}
        batches: list[StateBatch] = []
        for index, chunk in enumerate(codes):
            if chunk.dim() != 2 or chunk.shape[1] != self.num_codebooks:
                raise ValueError(f"{self.name} codes must be [num_frames, {self.num_codebooks}], got "
                                 f"{list(chunk.shape)}")
            by_length.setdefault(chunk.shape[0], []).append(index)
        for num_frames, indices in by_length.items():
            if num_frames == 0:
                for index in indices:
                    out[index] = torch.zeros(0, device=self.device)
                continue
            batch = StateBatch([states[i] for i in indices], self.pool)
            pcm = self._decode_batch(torch.stack([codes[i] for i in indices]).to(self.device), batch)
            batches.append(batch)
            for row, index in enumerate(indices):
                out[index] = pcm[row]
        for batch in batches:  # only once every group has decoded: a failure leaves every state as it was
            batch.commit()
        return out

    def _decode_batch(self, codes: torch.Tensor, batch: StateBatch) -> torch.Tensor:
        """[B, T, num_codebooks] -> [B, T * samples_per_frame]; stages the new states (and `advance`s the
        attention positions) without committing them."""
        raise NotImplementedError
