"""Step messages between the scheduler and the runners. Pure Python, no tensors."""

from __future__ import annotations

from dataclasses import dataclass

from streamvox.config import SamplingParams


@dataclass(frozen=True)
class NewRequest:
    """A request the runners have not seen yet; sent once, in the first step that schedules it."""

    request_id: str
    prompt_token_ids: tuple[int | tuple[int, ...], ...]  # one backbone input per position: a token id or a row
    sampling: SamplingParams  # resolved: seed is never None here
    codec_seed: int  # seeds the codec's noise for this request
    text_ids: tuple[int, ...] = ()  # text paired with the generated steps, one id a step (known so far)
    is_text_complete: bool = True  # no more text will come; past its end the steps get the family's padding


@dataclass(frozen=True)
class ScheduledRow:
    """Compute KV for positions [start_position, start_position + num_tokens) of one request."""

    request_id: str
    start_position: int
    num_tokens: int
    block_ids: tuple[int, ...]  # the request's whole block table, covering every position computed so far
    is_sampled: bool  # the row reaches the request's last known token, so a new token is sampled


@dataclass(frozen=True)
class StepBatch:
    """One engine step: new requests, rows to run, and requests whose runner state must be dropped."""

    new_requests: tuple[NewRequest, ...]
    rows: tuple[ScheduledRow, ...]
    finished_request_ids: tuple[str, ...]
    text_updates: tuple[tuple[str, tuple[int, ...], bool], ...] = ()  # (request_id, more text ids, is_final)

    @property
    def num_tokens(self) -> int:
        return sum(row.num_tokens for row in self.rows)

    @property
    def num_context_tokens(self) -> int:
        """Positions the step's rows attend over."""
        return sum(row.start_position + row.num_tokens for row in self.rows)


@dataclass(frozen=True)
class StepOutput:
    """Tokens sampled in one step, one entry per row with `is_sampled`, in row order."""

    request_ids: tuple[str, ...]
    token_ids: tuple[int | tuple[int, ...], ...]  # a token id, or a whole frame of codes for depth-decoder models
    is_stop: tuple[bool, ...]  # the sampled token ends the request's speech
