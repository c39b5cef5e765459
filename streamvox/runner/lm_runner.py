"""Runs one scheduled step of the backbone: builds the ragged batch, runs it over the paged KV cache, samples.

The runner keeps each request's backbone inputs (prompt, then every step's output fed back) and sampling state,
so the scheduler only sends positions and block tables; a preempted request recomputes its KV from these inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from streamvox.batch import ScheduledRow, StepBatch, StepOutput
from streamvox.layers.attention import AttentionMetadata, PrefillSpan, plan_decode
from streamvox.models.base import SpeechModel, StepToken
from streamvox.runner.sampler import SamplingState, sample, sample_extra


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


class LMRunner:
    def __init__(self, model: SpeechModel, num_blocks: int, block_size: int, dtype: torch.dtype) -> None:
        self.model = model
        self.block_size = block_size
        config = model.backbone.config
        shape = (config.num_hidden_layers, 2, num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=dtype)  # [layers, k/v, blocks, block_size, kv_heads, head_dim]
        self.position_bytes = 2 * config.num_key_value_heads * config.head_dim * self.kv_cache.element_size()
        self.requests: dict[str, _RunnerRequest] = {}

    @staticmethod
    def kv_bytes_per_block(model: SpeechModel, block_size: int, dtype: torch.dtype) -> int:
        config = model.backbone.config
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
        return per_token * block_size * torch.empty((), dtype=dtype).element_size()

    @torch.inference_mode()
    def execute(self, batch: StepBatch) -> StepOutput:
        for request_id in batch.finished_request_ids:
            self.requests.pop(request_id, None)
        for new in batch.new_requests:
            self.requests[new.request_id] = _RunnerRequest(
                list(new.prompt_token_ids), SamplingState(new.sampling), len(new.prompt_token_ids),
                list(new.text_ids), new.is_text_complete)
        for request_id, text_ids, is_final in batch.text_updates:
            if (request := self.requests.get(request_id)) is not None:
                request.text_ids.extend(text_ids)
                request.is_text_complete |= is_final
                request.feed(self.model)
        if not batch.rows:
            return StepOutput((), (), ())
        input_ids, positions, meta = self._prepare_inputs(batch.rows)
        hidden = self.model.backbone(input_ids, positions, meta, self.kv_cache)  # [T, H]
        last_index = torch.cumsum(torch.tensor([row.num_tokens for row in batch.rows]), 0) - 1
        sampled_rows = [i for i, row in enumerate(batch.rows) if row.is_sampled]
        if not sampled_rows:
            return StepOutput((), (), ())
        last_hidden = hidden[last_index[sampled_rows]]
        logits = self.model.backbone.compute_logits(last_hidden)  # [S, V]
        requests = [self.requests[batch.rows[i].request_id] for i in sampled_rows]
        states = [request.sampling for request in requests]
        early = [i for i, state in enumerate(states) if len(state.history) < self.model.min_steps]
        if early and self.model.stop_token_ids:
            logits[torch.tensor(early)[:, None], torch.tensor(sorted(self.model.stop_token_ids))] = float("-inf")
        lengths = [len(state.history) for state in states]
        try:
            tokens = self.model.complete_step(last_hidden, sample(logits, states),
                                              lambda extra_logits, index: sample_extra(extra_logits, states, index))
        except Exception:
            for state, length in zip(states, lengths, strict=True):  # the row-by-row retry samples afresh
                del state.history[length:]
            raise
        is_stop = []
        for request, token in zip(requests, tokens, strict=True):
            request.unfed.append(token)
            request.feed(self.model)
            is_stop.append(self.model.is_stop(token) and not request.sampling.params.ignore_eos)
        request_ids = tuple(batch.rows[i].request_id for i in sampled_rows)
        return StepOutput(request_ids, tuple(tokens), tuple(is_stop))

    def _prepare_inputs(self, rows: tuple[ScheduledRow, ...]):
        input_ids: list[StepToken] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_index, decode_tables, decode_lens, prefills = [], [], [], []
        for row in rows:
            tokens = self.requests[row.request_id].inputs
            span = range(row.start_position, row.start_position + row.num_tokens)
            token_start = len(input_ids)
            input_ids.extend(tokens[p] for p in span)
            positions.extend(span)
            bs = self.block_size
            slots.extend(row.block_ids[p // bs] * bs + p % bs for p in span)
            if row.num_tokens == 1:
                decode_index.append(token_start)
                decode_tables.append(row.block_ids)
                decode_lens.append(row.start_position + 1)
            else:
                table = torch.tensor(row.block_ids, dtype=torch.int64)
                prefills.append(PrefillSpan(token_start, row.num_tokens, row.start_position, table))
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            decode_groups=plan_decode(decode_index, decode_tables, decode_lens, self.block_size,
                                      self.position_bytes),
            prefills=tuple(prefills),
        )
        return torch.tensor(input_ids, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64), meta
