"""Runs one scheduled step of the backbone: builds the ragged batch, runs it over the paged KV cache, samples.

The runner keeps each request's backbone inputs (prompt, then every step's output fed back) and sampling state,
so the scheduler only sends positions and block tables; a preempted request recomputes its KV from these inputs.

On a GPU a step waits for the host once: its metadata (inputs, positions, slots, block tables, lengths, sampling
keys) goes to the device in one copy, and what the step produced (a token per row, or a whole frame per row
for depth-decoder families) comes back in one copy at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from streamvox.batch import ScheduledRow, StepBatch, StepOutput
from streamvox.layers.attention import (
    CPU_GROUP_BYTES,
    GPU_GROUP_BYTES,
    AttentionMetadata,
    DecodeGroup,
    PrefillSpan,
    plan_decode,
)
from streamvox.models.base import SpeechModel, StepToken
from streamvox.runner.sampler import SampleBatch, Sampler, SamplingState
from streamvox.runner.staging import Staging


@dataclass
class _RunnerRequest:
    inputs: list[StepToken]  # backbone input of every position: prompt, then each step's output fed back
    sampling: SamplingState
    prompt_len: int
    text_ids: list[int]  # text that rides along with the generated steps (text streamed in), in order
    is_text_complete: bool
    unfed: list[StepToken] = field(default_factory=list)  # outputs whose input waits for text

    def feed(self, model: SpeechModel) -> None:
        """Turn outputs into inputs while the text they pair with is known (or the text is complete)."""
        while self.unfed:
            step = len(self.inputs) - self.prompt_len
            if step >= len(self.text_ids) and not self.is_text_complete:
                return
            text_id = self.text_ids[step] if step < len(self.text_ids) else None
            self.inputs.append(model.next_input(self.unfed.pop(0), text_id))


@dataclass(frozen=True)
class _Step:
    """One step's batch on the device."""

    input_ids: torch.Tensor  # [T] or [T, C] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    last_index: torch.Tensor  # [S] int64: batch index of each sampled row's last token
    early: torch.Tensor | None  # [E] int64: sampled rows that may not stop yet (None: no such row)
    sampling: SampleBatch


class LMRunner:
    def __init__(self, model: SpeechModel, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | None = None) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device or model.device
        config = model.backbone.config
        shape = (config.num_hidden_layers, 2, num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        # [layers, k/v, blocks, block_size, kv_heads, head_dim]
        self.kv_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.position_bytes = 2 * config.num_key_value_heads * config.head_dim * self.kv_cache.element_size()
        self.group_bytes = GPU_GROUP_BYTES if self.device.type == "cuda" else CPU_GROUP_BYTES
        self.requests: dict[str, _RunnerRequest] = {}
        self.sampler = Sampler(config.vocab_size, self.device)
        self.staging = Staging(self.device)
        self.stop_ids = torch.tensor(sorted(model.stop_token_ids), dtype=torch.int64).to(self.device)

    @staticmethod
    def kv_bytes_per_block(model: SpeechModel, block_size: int, dtype: torch.dtype) -> int:
        config = model.backbone.config
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
        return per_token * block_size * torch.empty((), dtype=dtype).element_size()

    @torch.inference_mode()
    def execute(self, batch: StepBatch) -> StepOutput:
        for request_id in batch.finished_request_ids:
            if (request := self.requests.pop(request_id, None)) is not None:
                self.sampler.close(request.sampling)
        for new in batch.new_requests:
            if (old := self.requests.pop(new.request_id, None)) is not None:
                self.sampler.close(old.sampling)
            self.requests[new.request_id] = _RunnerRequest(
                list(new.prompt_token_ids), self.sampler.open(new.sampling), len(new.prompt_token_ids),
                list(new.text_ids), new.is_text_complete)
        for request_id, text_ids, is_final in batch.text_updates:
            if (request := self.requests.get(request_id)) is not None:
                request.text_ids.extend(text_ids)
                request.is_text_complete |= is_final
                request.feed(self.model)
        if not batch.rows:
            return StepOutput((), (), ())
        step = self._stage(batch.rows)
        hidden = self.model.backbone(step.input_ids, step.positions, step.meta, self.kv_cache)  # [T, H]
        states = step.sampling.states
        if not states:
            return StepOutput((), (), ())
        last_hidden = hidden[step.last_index]
        logits = self.model.backbone.compute_logits(last_hidden)  # [S, V] fp32
        if step.early is not None:
            logits[step.early[:, None], self.stop_ids] = float("-inf")
        first, values = self._sample(logits, last_hidden, step.sampling)
        if values is None:  # a row drew from candidates its filter may reach past: draw again, exactly
            first, values = self._sample(logits, last_hidden, step.sampling, exact=True)
        tokens = [tuple(v) if isinstance(v, list) else v for v in values]
        self.sampler.commit(step.sampling, first, [t[0] if isinstance(t, tuple) else t for t in tokens])
        is_stop = []
        sampled_ids = [row.request_id for row in batch.rows if row.is_sampled]
        for request_id, token in zip(sampled_ids, tokens, strict=True):
            request = self.requests[request_id]
            request.unfed.append(token)
            request.feed(self.model)
            is_stop.append(self.model.is_stop(token) and not request.sampling.params.ignore_eos)
        return StepOutput(tuple(sampled_ids), tuple(tokens), tuple(is_stop))

    def _sample(self, logits: torch.Tensor, hidden: torch.Tensor, batch: SampleBatch,
                exact: bool = False) -> tuple[torch.Tensor, list | None]:
        """Draw each row's token and complete its step -> (the tokens on the device, the step outputs copied to
        the host in the step's one copy), or values None when a row must be drawn again with `exact`."""
        sampler = self.sampler
        first = sampler.sample(logits, batch, exact)  # [S]
        produced = self.model.complete_step(hidden, first,
                                            lambda extra, index: sampler.sample_extra(extra, batch, index))
        if batch.inexact is None:
            return first, produced.tolist()
        rows = produced.reshape(len(batch.states), -1)
        packed = torch.cat([rows, batch.inexact[:, None].to(rows.dtype)], dim=1).tolist()  # flags ride along
        if any(row[-1] for row in packed):
            return first, None
        return first, [row[0] if produced.dim() == 1 else row[:-1] for row in packed]

    @torch.inference_mode()
    def logits(self, row: ScheduledRow) -> torch.Tensor:
        """Logits [num_tokens, vocab] fp32 at every position of one scheduled row of a request the runner holds
        (its KV is written, nothing is sampled): for checks against a reference model."""
        step = self._stage((row,))
        return self.model.backbone.compute_logits(
            self.model.backbone(step.input_ids, step.positions, step.meta, self.kv_cache))

    def _stage(self, rows: tuple[ScheduledRow, ...]) -> _Step:
        """Lay the step's metadata out on the host, send it in one copy, and wrap the device views."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_index, decode_tables, decode_lens, prefills = [], [], [], []
        last_index, states, early = [], [], []
        width = 0
        bs = self.block_size
        for row in rows:
            request = self.requests[row.request_id]
            span = range(row.start_position, row.start_position + row.num_tokens)
            token_start = len(positions)
            for p in span:
                token = request.inputs[p]
                if isinstance(token, tuple):
                    input_ids.extend(token)
                    width = len(token)
                else:
                    input_ids.append(token)
            positions.extend(span)
            slots.extend(row.block_ids[p // bs] * bs + p % bs for p in span)
            if row.num_tokens == 1:
                decode_index.append(token_start)
                decode_tables.append(row.block_ids)
                decode_lens.append(row.start_position + 1)
            else:
                context_len = row.start_position + row.num_tokens
                prefills.append((token_start, row.num_tokens, row.start_position,
                                 row.block_ids[: -(-context_len // bs)]))
            if row.is_sampled:
                if len(request.sampling.history) < self.model.min_steps and self.model.stop_token_ids:
                    early.append(len(states))
                last_index.append(len(positions) - 1)
                states.append(request.sampling)
        plans = plan_decode(decode_index, decode_tables, decode_lens, bs, self.position_bytes, self.group_bytes)
        arrays = [input_ids, positions, slots, last_index, early]
        for plan in plans:
            arrays += [plan.token_index, plan.block_ids, plan.context_lens or []]
        arrays += [list(table) for *_, table in prefills]
        arrays += self.sampler.stage(states)
        views = iter(self.staging.upload(arrays))
        ids, positions_d, slots_d, last_d, early_d = (next(views) for _ in range(5))
        groups = []
        for plan in plans:
            groups.append(DecodeGroup.on_device(plan, next(views), next(views), next(views)))
        spans = tuple(PrefillSpan(start, num, position, next(views)) for start, num, position, _ in prefills)
        meta = AttentionMetadata(slots_d, tuple(groups), spans)
        sampling = self.sampler.batch(states, list(views))
        return _Step(ids.view(-1, width) if width else ids, positions_d, meta, last_d, early_d if early else None,
                     sampling)
