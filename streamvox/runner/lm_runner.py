"""Runs one scheduled step of the backbone: builds the ragged batch, runs it over the paged KV cache, samples.

The runner keeps each request's backbone inputs (prompt, then every step's output fed back) and sampling state,
so the scheduler only sends positions and block tables; a preempted request recomputes its KV from these inputs.

On a GPU a step waits for the host once: its metadata (inputs, positions, slots, block tables, lengths, sampling
keys) goes to the device in one copy, and what the step produced (a token per row, or a whole frame per row
for depth-decoder families) comes back in one copy at the end.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from streamvox.batch import ScheduledRow, StepBatch, StepOutput
from streamvox.layers.attention import (
    CPU_GROUP_BYTES,
    GPU_GROUP_BYTES,
    PREFILL_TOKENS,
    AttentionMetadata,
    DecodeGroup,
    PagedDecode,
    PagedPrefill,
    PrefillSpan,
    flat_tables,
    plan_decode,
)
from streamvox.models.base import SpeechModel, StepToken
from streamvox.runner.graphs import Capture, DecodeGraphs, DepthGraphs
from streamvox.runner.sampler import SampleBatch, Sampler, SamplingState
from streamvox.runner.staging import Staging

logger = logging.getLogger(__name__)


@dataclass
class _RunnerRequest:
    inputs: list[StepToken]  # backbone input of every position: prompt, then each step's output fed back
    sampling: SamplingState
    prompt_len: int
    text_ids: list[int]  # text that rides along with the generated steps (text streamed in), in order
    is_text_complete: bool
    unfed: list[StepToken] = field(default_factory=list)  # outputs whose input waits for text
    lanes: list[list[StepToken]] = field(default_factory=list)  # the guidance rows' inputs (Prepared.guidance)
    lane_weights: tuple[float, ...] = ()  # the guidance rows' logit weights
    embeds: torch.Tensor | None = None  # [P, H] input vectors of the first P positions, on the device

    def feed(self, model: SpeechModel) -> None:
        """Turn outputs into inputs while the text they pair with is known (or the text is complete)."""
        while self.unfed:
            step = len(self.inputs) - self.prompt_len
            if step >= len(self.text_ids) and not self.is_text_complete:
                return
            text_id = self.text_ids[step] if step < len(self.text_ids) else None
            self.inputs.append(model.next_input(self.unfed.pop(0), text_id, step))
            for lane in self.lanes:
                lane.append(self.inputs[-1])

    @property
    def weights(self) -> tuple[float, ...]:
        """The logit weight of each row: the main one, then the guidance rows'."""
        return (1.0 - sum(self.lane_weights), *self.lane_weights)


@dataclass(frozen=True)
class _Forward:
    """Tokens run through the backbone eagerly."""

    input_ids: torch.Tensor  # [T] or [T, C] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    embeds: tuple[torch.Tensor, torch.Tensor] | None = None  # (token index [K], input vectors [K, H])


@dataclass(frozen=True)
class _Step:
    """One step's batch on the device: decode rows first, then prefill tokens."""

    graph: tuple[int, int, torch.Tensor] | None  # decode rows through DecodeGraphs: (bucket, table width, layout)
    num_graph_rows: int
    eager: _Forward | None  # every token, or the prefill tokens after the graph's rows
    last_index: torch.Tensor  # [S] int64: batch index of each sampled row's last token
    early: torch.Tensor | None  # [E] int64: sampled rows that may not stop yet (None: no such row)
    sampling: SampleBatch
    # guided requests in the step: last_index then covers every row of each sampled request, [N]; their logits
    # are mixed by `mix` [S, N] fp32 and `main_index` [S] picks each request's main row among them
    mix: torch.Tensor | None = None
    main_index: torch.Tensor | None = None


class LMRunner:
    def __init__(self, model: SpeechModel, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | None = None, attention: str = "gather", graph_rows: int = 0,
                 max_context: int = 0) -> None:
        """`attention`: a backend of layers/attention.py (resolved). `graph_rows` > 0 runs decode rows through
        DecodeGraphs up to that many rows a step (needs the triton backend; the graphs are captured by
        `capture_graphs`), `max_context` then bounds one row's context (0: the whole cache)."""
        self.model = model
        self.block_size = block_size
        self.device = device or model.device
        self.attention = attention
        config = model.backbone.config
        # one block past the pool's: the scratch block the graphs' padded rows write to
        shape = (config.num_hidden_layers, 2, num_blocks + (graph_rows > 0), block_size,
                 config.num_key_value_heads, config.head_dim)
        # [layers, k/v, blocks, block_size, kv_heads, head_dim]
        self.kv_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.position_bytes = 2 * config.num_key_value_heads * config.head_dim * self.kv_cache.element_size()
        self.group_bytes = GPU_GROUP_BYTES if self.device.type == "cuda" else CPU_GROUP_BYTES
        self.requests: dict[str, _RunnerRequest] = {}
        self.sampler = Sampler(config.vocab_size, self.device)
        self.staging = Staging(self.device)
        self.stop_ids = torch.tensor(sorted(model.stop_token_ids), dtype=torch.int64).to(self.device)
        self.graphs = self.depth_graphs = None
        if graph_rows:
            if attention != "triton":
                raise ValueError("decode graphs need the triton attention backend (a gather's shapes change)")
            max_blocks = -(-max_context // block_size) if max_context else num_blocks
            first = model.prepare_request("a", None).prompt[0]  # an input: one id, or a row of codes
            self.graphs = DecodeGraphs(model.backbone, self.kv_cache, num_blocks, graph_rows,
                                       min(max_blocks, num_blocks), len(first) if isinstance(first, tuple) else 0)
            if type(model).complete_step is not SpeechModel.complete_step:  # a depth loop completes each frame
                self.depth_graphs = DepthGraphs(model, self.sampler, graph_rows, config.hidden_size, dtype)

    def capture_graphs(self) -> Capture | None:
        """Capture the decode (and depth loop) graphs (CUDA; elsewhere their buffers run eagerly) -> what it
        cost, or None when nothing was captured. A capture that fails leaves its part eager."""
        if self.graphs is None or self.device.type != "cuda":
            return None
        captures = []
        for name, graphs in (("decode", self.graphs), ("depth loop", self.depth_graphs)):
            if graphs is None:
                continue
            try:
                with torch.inference_mode():
                    captures.append(graphs.capture())
            except Exception:  # noqa: BLE001 - serve eagerly rather than not at all
                logger.exception("capturing the %s graphs failed; it runs eagerly through the same buffers", name)
                graphs.graphs = {}
        if not captures:
            return None
        capture = Capture(captures[0].buckets, sum(c.seconds for c in captures), sum(c.bytes for c in captures))
        logger.info("captured %d graph sets for batch sizes %s in %.1f s, %.0f MiB", len(captures),
                    ",".join(map(str, capture.buckets)), capture.seconds, capture.bytes / 2**20)
        return capture

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
            self.requests[new.request_id] = self._new_request(new)
        for request_id, text_ids, is_final in batch.text_updates:
            if (request := self.requests.get(request_id)) is not None:
                request.text_ids.extend(text_ids)
                request.is_text_complete |= is_final
                request.feed(self.model)
        if not batch.rows:
            return StepOutput((), (), ())
        step = self._stage(batch.rows)
        hidden = self._forward(step)  # [T, H]
        states = step.sampling.states
        if not states:
            return StepOutput((), (), ())
        last_hidden = hidden[step.last_index]
        logits = self.model.backbone.compute_logits(last_hidden)  # [S, V] fp32
        if step.mix is not None:  # rows of guided requests: their logits mixed, their main rows' hidden states
            logits, last_hidden = step.mix @ logits, last_hidden[step.main_index]
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

    def _new_request(self, new) -> _RunnerRequest:
        request = _RunnerRequest(list(new.prompt_token_ids), self.sampler.open(new.sampling),
                                 len(new.prompt_token_ids), list(new.text_ids), new.is_text_complete)
        if new.guidance is not None:
            request.lanes = [list(prompt) for prompt in new.guidance.prompts]
            request.lane_weights = tuple(new.guidance.weights)
        if new.prompt_embeds is not None:
            request.embeds = new.prompt_embeds.to(self.device, self.model.dtype)
        return request

    def _sample(self, logits: torch.Tensor, hidden: torch.Tensor, batch: SampleBatch,
                exact: bool = False) -> tuple[torch.Tensor, list | None]:
        """Draw each row's token and complete its step -> (the tokens on the device, the step outputs copied to
        the host in the step's one copy), or values None when a row must be drawn again with `exact`."""
        sampler = self.sampler
        first = sampler.sample(logits, batch, exact)  # [S]
        if self.depth_graphs is not None and len(batch.states) <= self.depth_graphs.max_rows:
            produced = self.depth_graphs.run(hidden, first, batch)
        else:
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
        return self.model.backbone.compute_logits(self._forward(self._stage((row,))))

    def _forward(self, step: _Step) -> torch.Tensor:
        """Final hidden states [T, H] of a staged step: the graph's decode rows, then the eager tokens."""
        parts = []
        if step.graph is not None:
            parts.append(self.graphs.run(*step.graph)[: step.num_graph_rows])
        if step.eager is not None:
            eager = step.eager
            extra = {} if eager.embeds is None else {"embeds": eager.embeds}
            parts.append(self.model.backbone(eager.input_ids, eager.positions, eager.meta, self.kv_cache, **extra))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _stage(self, rows: tuple[ScheduledRow, ...]) -> _Step:
        """Lay the step's metadata out on the host, decode rows first, send it in one copy, and wrap the device
        views."""
        lane_rows = [lane for row in rows for lane in self._lanes(row)]
        decode = [lane for lane in lane_rows if lane[0].num_tokens == 1]
        ordered = decode + [lane for lane in lane_rows if lane[0].num_tokens > 1]
        graphs = self.graphs
        num_graph_rows = 0
        has_embeds = any(embeds is not None for *_, embeds in lane_rows)  # input vectors: an eager step
        if graphs is not None and not has_embeds and 0 < len(decode) <= graphs.max_rows and \
                all(row.start_position < graphs.max_context for row, *_ in decode):
            num_graph_rows = len(decode)
        host = _HostStep()
        for row, key, inputs, embeds in ordered:
            host.add(row, key, inputs, embeds, self.block_size, num_graph_rows)
        last_index, states, early, mix = [], [], [], []
        for row in rows:
            if row.is_sampled:
                request = self.requests[row.request_id]
                if len(request.sampling.history) < self.model.min_steps and self.model.stop_token_ids:
                    early.append(len(states))
                mix.append((len(last_index), request.weights))
                last_index += [host.last_token[(row.request_id, lane)] for lane in range(len(request.weights))]
                states.append(request.sampling)
        arrays = [last_index, early]
        graph = None
        if num_graph_rows:
            bucket, width, layout = graphs.layout(*host.decode_rows(num_graph_rows))
            graph = (bucket, width)
            arrays.append(layout)
        eager_from = num_graph_rows * max(1, host.width)
        eager_arrays, build_eager = host.eager(num_graph_rows, eager_from, self._plan_decode, self._plan_prefill)
        arrays += eager_arrays
        arrays += self.sampler.stage(states)
        views = iter(self.staging.upload(arrays))
        last_d, early_d = next(views), next(views)
        if graph is not None:
            graph = (*graph, next(views))
        eager = build_eager(views)
        sampling = self.sampler.batch(states, list(views))
        step = _Step(graph, num_graph_rows, eager, last_d, early_d if early else None, sampling)
        return self._mixed(step, mix, len(last_index)) if len(last_index) > len(states) else step

    def _lanes(self, row: ScheduledRow) -> list[tuple[ScheduledRow, tuple[str, int], list, torch.Tensor | None]]:
        """(row, key, inputs, input vectors) of each backbone row a scheduled row runs: one, or one per guidance
        row, each over its own blocks (block b of row r is the request's block b * rows + r)."""
        request = self.requests[row.request_id]
        embeds = request.embeds if request.embeds is not None and row.start_position < len(request.embeds) \
            else None
        if not request.lanes:
            return [(row, (row.request_id, 0), request.inputs, embeds)]
        count = 1 + len(request.lanes)
        return [(dataclasses.replace(row, block_ids=row.block_ids[lane::count]), (row.request_id, lane), inputs,
                 embeds) for lane, inputs in enumerate([request.inputs, *request.lanes])]

    def _mixed(self, step: _Step, mix: list[tuple[int, tuple[float, ...]]], num_rows: int) -> _Step:
        """`step` with the matrix that mixes each guided request's row logits into one, and its main rows."""
        matrix = torch.zeros(len(mix), num_rows)
        for index, (first, weights) in enumerate(mix):
            matrix[index, first : first + len(weights)] = torch.tensor(weights)
        main = torch.tensor([first for first, _ in mix], dtype=torch.int64)
        return dataclasses.replace(step, mix=matrix.to(self.device), main_index=main.to(self.device))

    def _plan_decode(self, tables: list, lens: list[int]) -> tuple[list[list[int]], Callable]:
        """The eager decode rows' attention metadata -> (host arrays, builder taking their device views)."""
        if self.attention == "triton":
            width, flat = flat_tables(tables, [-(-n // self.block_size) for n in lens], pad=0)

            def paged(views) -> tuple[tuple[DecodeGroup, ...], PagedDecode]:
                return (), PagedDecode(len(lens), next(views).view(len(lens), width), next(views))

            return [flat, lens], paged
        plans = plan_decode(range(len(lens)), tables, lens, self.block_size, self.position_bytes, self.group_bytes)

        def grouped(views) -> tuple[tuple[DecodeGroup, ...], None]:
            return tuple(DecodeGroup.on_device(plan, next(views), next(views), next(views)) for plan in plans), None

        return [a for plan in plans for a in (plan.token_index, plan.block_ids, plan.context_lens or [])], grouped

    def _plan_prefill(self, prefills: list[tuple[int, int, int, list[int]]]) -> tuple[list[list[int]], Callable]:
        """The prefill chunks' attention metadata -> (host arrays, builder taking their device views)."""
        if self.attention == "triton":
            width, flat = flat_tables([table for *_, table in prefills], [len(table) for *_, table in prefills],
                                      pad=0)
            tiles = [value for seq, (start, count, position, _) in enumerate(prefills)
                     for i in range(0, count, PREFILL_TOKENS)
                     for value in (start + i, min(PREFILL_TOKENS, count - i), seq, position + i + 1)]

            def paged(views) -> tuple[tuple[PrefillSpan, ...], PagedPrefill]:
                return (), PagedPrefill(next(views).view(len(prefills), width), next(views).view(-1, 4))

            return [flat, tiles], paged

        def spans(views) -> tuple[tuple[PrefillSpan, ...], None]:
            return tuple(PrefillSpan(start, num, position, next(views)) for start, num, position, _ in prefills), None

        return [table for *_, table in prefills], spans


class _HostStep:
    """A step's tokens on the host, decode rows first."""

    def __init__(self) -> None:
        self.input_ids: list[int] = []
        self.positions: list[int] = []
        self.slots: list[int] = []
        self.tables: list = []  # decode rows' block tables
        self.lens: list[int] = []  # decode rows' context lengths
        self.prefills: list[tuple[int, int, int, list[int]]] = []  # (token start, tokens, start position, table)
        self.last_token: dict[tuple[str, int], int] = {}  # (request id, row) -> batch index of its last token
        self.width = 0  # codebooks per input (0: one id)
        self.embeds: list[tuple[int, torch.Tensor]] = []  # (batch index of the first, input vectors [k, H])

    def add(self, row: ScheduledRow, key: tuple[str, int], inputs: list, embeds: torch.Tensor | None,
            block_size: int, num_graph_rows: int) -> None:
        """Take one backbone row (`key`: request id and row index): its positions' `inputs`, of which those
        below len(embeds) enter as those input vectors."""
        span = range(row.start_position, row.start_position + row.num_tokens)
        token_start = len(self.positions)
        for p in span:
            token = inputs[p]
            if isinstance(token, tuple):
                self.input_ids.extend(token)
                self.width = len(token)
            else:
                self.input_ids.append(token)
        if embeds is not None:
            end = min(span.stop, len(embeds))
            self.embeds.append((token_start, embeds[span.start : end]))
        self.positions.extend(span)
        self.slots.extend(row.block_ids[p // block_size] * block_size + p % block_size for p in span)
        if row.num_tokens == 1:
            self.tables.append(row.block_ids)
            self.lens.append(row.start_position + 1)
        else:
            context_len = row.start_position + row.num_tokens
            self.prefills.append((token_start - num_graph_rows, row.num_tokens, row.start_position,
                                  list(row.block_ids[: -(-context_len // block_size)])))
        self.last_token[key] = len(self.positions) - 1

    def decode_rows(self, count: int) -> tuple:
        """The first `count` (decode) rows' ids, positions, slots, context lengths and block tables."""
        return (self.input_ids[: count * max(1, self.width)], self.positions[:count], self.slots[:count],
                self.lens[:count], self.tables[:count])

    def eager(self, skip_rows: int, skip_ids: int, plan_decode: Callable,
              plan_prefill: Callable) -> tuple[list, Callable]:
        """Host arrays of the tokens past the first `skip_rows` (taken by the graphs), and a builder of their
        _Forward from the device views (None when no token is left)."""
        tables, lens = self.tables[skip_rows:], self.lens[skip_rows:]
        nothing = ([], lambda views: ((), None))
        decode_arrays, build_decode = plan_decode(tables, lens) if lens else nothing
        prefill_arrays, build_prefill = plan_prefill(self.prefills) if self.prefills else nothing
        arrays = [self.input_ids[skip_ids:], self.positions[skip_rows:], self.slots[skip_rows:], *decode_arrays,
                  *prefill_arrays]
        width = self.width
        # no graph rows when a step has input vectors: every index is the eager batch's
        embed_index = [start + i for start, values in self.embeds for i in range(len(values))]
        arrays.append(embed_index)

        def build(views) -> _Forward | None:
            ids, positions, slots = next(views), next(views), next(views)
            groups, paged = build_decode(views)
            spans, paged_prefill = build_prefill(views)
            index = next(views)
            if not positions.numel():
                return None
            meta = AttentionMetadata(slots, groups, spans, paged, paged_prefill)
            embeds = (index, torch.cat([values for _, values in self.embeds])) if self.embeds else None
            return _Forward(ids.view(-1, width) if width else ids, positions, meta, embeds)

        return arrays, build
