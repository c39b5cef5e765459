"""Scheduler-side state of one request (pure bookkeeping: counts and block ids, no tokens)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from streamvox.batch import AudioPlan
from streamvox.config import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # the model ended its speech
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"  # the client cancelled or went away
    CAPACITY = "capacity"  # the KV cache cannot hold this request even when it runs alone
    REFUSED = "refused"  # it waited in the queue past its bound without starting


@dataclass
class Request:
    """One request as the scheduler sees it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    codec_seed: int
    expected_tokens: int = 0  # LM steps its audio is expected to take (KV reservation); at most max_tokens
    status: RequestStatus = RequestStatus.WAITING
    num_output_tokens: int = 0  # tokens sampled so far
    num_computed_tokens: int = 0  # positions whose KV is in the cache
    block_ids: list[int] = field(default_factory=list)
    num_reserved_blocks: int = 0  # blocks set aside at admission (may exceed the blocks held so far)
    is_known_to_runner: bool = False
    finish_reason: FinishReason | None = None
    text_ids: list[int] = field(default_factory=list)  # text riding along with the generated steps, so far
    is_text_complete: bool = True
    arrival_s: float = 0.0
    is_paused: bool = False  # its client has not read what was sent: it makes no more until it does
    plan: AudioPlan | None = None  # its own chunk plan (the family's may depend on the prompt); None: the engine's
    num_lanes: int = 1  # backbone rows per position (classifier-free guidance: 2), each with its own KV blocks
    runner_inputs: tuple = (None, None)  # (prompt embeddings, guidance) for the runner; opaque here

    @property
    def is_waiting_for_text(self) -> bool:
        """Its next step needs text that has not arrived yet (text streamed in): it pauses, holding its KV."""
        return not self.is_text_complete and self.num_output_tokens > len(self.text_ids)

    @property
    def is_held(self) -> bool:
        """It takes no LM rows for now (paused by its reader, or waiting for text) but keeps its KV."""
        return self.is_paused or self.is_waiting_for_text

    def __post_init__(self) -> None:
        if self.expected_tokens <= 0 or self.sampling.ignore_eos:
            self.expected_tokens = self.sampling.max_tokens
        self.expected_tokens = min(self.expected_tokens, self.sampling.max_tokens)

    @property
    def num_committed_blocks(self) -> int:
        """Blocks the pool must keep for this request: those it holds or, if more, those set aside for it."""
        return max(len(self.block_ids), self.num_reserved_blocks)

    @property
    def num_tokens(self) -> int:
        """Positions known so far: prompt plus sampled tokens."""
        return len(self.prompt_token_ids) + self.num_output_tokens

    @property
    def num_pending_tokens(self) -> int:
        """Positions whose KV can be computed now: a paused request's last output has no input yet."""
        return self.num_tokens - self.num_computed_tokens - (1 if self.is_waiting_for_text else 0)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
